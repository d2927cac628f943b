"""dev_blk plugin: the virtio-blk device type and ``vhost_create_blk_controller``."""

from __future__ import annotations

import errno

import attrs

from vhost_core.errors import VhostError
from vhost_core.commands import Cli, CommandContext, cli, extension, param, unsupported
from vhost_core.device import DeviceType
from vhost_core.hookspecs import hookimpl
from vhost_core.log import get_logger, notice

from vhost_dev_blk.device import MAX_QUEUES, BlkDevice

VHOST_CORE_API = (2,)
log = get_logger("vhost_blk")


@attrs.frozen
class CreateBlkParams:
    """SPDK's parameters (v24.01 to 26.9) and ``num_queues``, ours."""

    ctrlr: str = param(help="controller name (the socket file name in the -S directory)")
    dev_name: str = param(help="bdev name")
    cpumask: str | None = param(None, "--cpumask", help="cpu mask for this controller")
    readonly: bool = param(False, "-r", "--readonly", help="set the controller as read-only")
    transport: str | None = unsupported(None, "it serves vhost-user only: omit transport (or vhost_user_blk)",
                                        accepts=("vhost_user_blk",),
                                        cli=cli("--transport", help="virtio-blk transport: vhost_user_blk, the "
                                                                    "only one here"))
    # SPDK offers VIRTIO_F_RING_PACKED only with packed_ring; here it is offered unless
    # packed_ring is false (QEMU negotiates a packed ring only with the device's packed=on,
    # so offering it costs nothing; false keeps a guest on split rings).
    packed_ring: bool | None = param(None, "-p", "--packed-ring",
                                     help="offer packed virtqueues (the default; false: split only)")
    num_queues: int | None = extension(None, f"request queues offered to the guest, 1..{MAX_QUEUES} "
                                             f"(default {MAX_QUEUES})")


@hookimpl
def vhost_register_device_types(registry) -> None:
    registry.add(DeviceType("blk", subsystem="vhost_blk", qemu_device="vhost-user-blk-pci",
                            qemu_queues_property="num-queues"))


@hookimpl
def vhost_register_commands(registry) -> None:
    # Prints nothing, as rpc.py: the target's NOTICE says what was created.
    @registry.command("vhost_create_blk_controller", params=CreateBlkParams,
                      aliases=("construct_vhost_blk_controller",), cli=Cli(prints=False))
    def vhost_create_blk_controller(ctx: CommandContext, p: CreateBlkParams) -> bool:
        """Add a vhost-blk controller serving one bdev."""
        nq = MAX_QUEUES if p.num_queues is None else p.num_queues
        if not 1 <= nq <= MAX_QUEUES:
            raise VhostError(errno.EINVAL, f"num_queues {nq} out of range: use 1..{MAX_QUEUES}")
        device = BlkDevice(p.dev_name, p.readonly, nq, packed_ring=p.packed_ring is not False)
        ctx.controllers.create(p.ctrlr, device, p.cpumask)
        notice(log, "Controller %s: using bdev '%s'%s", p.ctrlr, device.bdev.name,
               " (read-only)" if device.readonly else "")
        return True
