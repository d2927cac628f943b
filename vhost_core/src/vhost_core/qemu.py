"""The QEMU command line that uses a controller (printed by ``vhost --default-config``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from vhost_core.controller import Controller
    from vhost_core.device import DeviceTypeRegistry


def qemu_command_line(ctrlr: Controller, device_types: DeviceTypeRegistry, mem_mb: int = 1024) -> str:
    cid = ctrlr.name.replace(".", "_")
    dtype = device_types.get(ctrlr.device.device_type)
    device = dtype.qemu_args(cid, min(4, ctrlr.device.num_queues)) if dtype is not None else "-device ..."
    return (f"qemu-system-x86_64 -m {mem_mb}M "
            f"-object memory-backend-memfd,id=mem,size={mem_mb}M,share=on -numa node,memdev=mem "
            f"-chardev socket,id={cid},path={ctrlr.path},reconnect=1 "
            f"{device} ...")
