"""dev_scsi plugin: vhost-scsi controllers, their targets, and the CLI commands for them.

RPC names, parameters and results follow SPDK's (``scripts/rpc.py``), old names
included as deprecated aliases.
"""

from __future__ import annotations

import argparse
import errno
from typing import Any

import attrs

from vhost_core.commands import CommandContext
from vhost_core.device import DeviceType
from vhost_core.hookspecs import hookimpl
from vhost_core.log import get_logger, notice
from vhost_core.rpc.registry import RpcError

from vhost_dev_scsi.device import MAX_TARGETS, ScsiDevice

VHOST_CORE_API = (2,)
log = get_logger("vhost_scsi")


@attrs.frozen
class CreateScsiParams:
    ctrlr: str
    cpumask: str | None = None
    delay: bool = False


@attrs.frozen
class CtrlrParams:
    ctrlr: str


@attrs.frozen
class AddTargetParams:
    ctrlr: str
    scsi_target_num: int
    bdev_name: str


@attrs.frozen
class RemoveTargetParams:
    ctrlr: str
    scsi_target_num: int


def _check_target_num(ctrlr: str, num: int) -> None:
    if not 0 <= num < MAX_TARGETS:
        raise RpcError(-errno.EINVAL, f"controller {ctrlr}: SCSI target number {num} is out of range: "
                                      f"use 0..{MAX_TARGETS - 1}, or -1 for the first free one")


@hookimpl
def vhost_register_device_types(registry) -> None:
    registry.add(DeviceType("scsi", subsystem="vhost_scsi", qemu_device="vhost-user-scsi-pci",
                            qemu_queues_property="num_queues"))


@hookimpl
def vhost_register_commands(registry) -> None:
    @registry.command("vhost_create_scsi_controller", params=CreateScsiParams,
                      aliases=("construct_vhost_scsi_controller",))
    def vhost_create_scsi_controller(ctx: CommandContext, p: CreateScsiParams) -> bool:
        """Add a vhost-scsi controller (targets are added with vhost_scsi_controller_add_target)."""
        device = ScsiDevice()
        device.started = not p.delay
        ctx.controllers.create(p.ctrlr, device, p.cpumask, listen=not p.delay)
        if p.delay:
            notice(log, "Controller %s: created; it accepts a front-end after vhost_start_scsi_controller %s",
                   p.ctrlr, p.ctrlr)
        return True

    @registry.command("vhost_start_scsi_controller", params=CtrlrParams)
    def vhost_start_scsi_controller(ctx: CommandContext, p: CtrlrParams) -> bool:
        """Start a vhost-scsi controller created with ``delay``: its socket starts listening."""
        device = _scsi_device(ctx, p.ctrlr)
        if not device.started:
            ctx.controllers.listen(p.ctrlr)
            device.started = True
            notice(log, "Controller %s: started", p.ctrlr)
        return True

    @registry.command("vhost_scsi_controller_add_target", params=AddTargetParams,
                      aliases=("add_vhost_scsi_lun",))
    def vhost_scsi_controller_add_target(ctx: CommandContext, p: AddTargetParams) -> int:
        """Attach a bdev as LUN 0 of a SCSI target; returns the target number (-1: first free)."""
        device = _scsi_device(ctx, p.ctrlr)
        num = p.scsi_target_num
        if num == -1:
            num = device.free_target_num()
        _check_target_num(p.ctrlr, num)
        if num in device.targets:
            raise RpcError(-errno.EEXIST, f"controller {p.ctrlr}: SCSI target {num} is already occupied "
                                          f"by bdev '{device.targets[num].bdev.name}': remove it first "
                                          f"(vhost_scsi_controller_remove_target {p.ctrlr} {num}) or pick "
                                          f"another number")
        bdev = ctx.bdevs.get(p.bdev_name)
        for t in device.targets.values():
            if t.bdev is bdev:
                raise RpcError(-errno.EBUSY, f"controller {p.ctrlr}: bdev '{bdev.name}' already backs "
                                             f"SCSI target {t.num}: a bdev serves one target")
        device.add_target(num, bdev.name)
        notice(log, "Controller %s: defined target 'Target %d' using lun '%s'", p.ctrlr, num, bdev.name)
        return num

    @registry.command("vhost_scsi_controller_remove_target", params=RemoveTargetParams,
                      aliases=("remove_vhost_scsi_dev", "remove_vhost_scsi_target"), blocking=True)
    def vhost_scsi_controller_remove_target(ctx: CommandContext, p: RemoveTargetParams) -> bool:
        """Hot-detach a SCSI target from a vhost-scsi controller."""
        device = _scsi_device(ctx, p.ctrlr)
        _check_target_num(p.ctrlr, p.scsi_target_num)
        if p.scsi_target_num not in device.targets:
            raise RpcError(-errno.ENODEV, f"controller {p.ctrlr}: SCSI target {p.scsi_target_num} is not "
                                          f"occupied; see vhost_get_controllers {p.ctrlr}")
        target = device.remove_target(p.scsi_target_num)
        notice(log, "Controller %s: removed target '%s' (bdev '%s')", p.ctrlr, target.name, target.bdev.name)
        return True


def _scsi_device(ctx: CommandContext, name: str) -> ScsiDevice:
    device = ctx.controllers.get(name).device
    if not isinstance(device, ScsiDevice):
        raise RpcError(-errno.EINVAL, f"controller '{name}' is a vhost-{device.device_type} "
                                      f"controller, not vhost-scsi: targets exist only on "
                                      f"vhost_create_scsi_controller controllers")
    return device


@hookimpl
def vhost_add_cli_commands(subparsers) -> None:
    from vhost_core.rpc.cli import NO_OUTPUT

    def create(client, args):
        params: dict[str, Any] = {"ctrlr": args.ctrlr}
        if args.cpumask:
            params["cpumask"] = args.cpumask
        if args.delay:
            params["delay"] = True
        client.call(args.method_name, params)
        return NO_OUTPUT

    def start(client, args):
        client.call("vhost_start_scsi_controller", {"ctrlr": args.ctrlr})
        return NO_OUTPUT

    def add_target(client, args):
        return client.call(args.method_name, {"ctrlr": args.ctrlr, "scsi_target_num": args.scsi_target_num,
                                              "bdev_name": args.bdev_name})

    def remove_target(client, args):
        client.call(args.method_name, {"ctrlr": args.ctrlr, "scsi_target_num": args.scsi_target_num})
        return NO_OUTPUT

    def deprecated(p, name: str, new: str | None) -> None:
        p.set_defaults(method_name=name)
        if new:
            p.set_defaults(deprecated_use=new)

    for name, new in (("vhost_create_scsi_controller", None),
                      ("construct_vhost_scsi_controller", "vhost_create_scsi_controller")):
        p = subparsers.add_parser(name, help="Add new vhost controller" + (" (deprecated)" if new else ""),
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.add_argument("ctrlr", help="controller name")
        p.add_argument("--cpumask", help="cpu mask for this controller")
        p.add_argument("--delay", action="store_true", help="whether delay starting controller or not")
        p.set_defaults(func=create)
        deprecated(p, name, new)

    p = subparsers.add_parser("vhost_start_scsi_controller", help="Start vhost scsi controller")
    p.add_argument("ctrlr", help="controller name")
    p.set_defaults(func=start)

    for name, new in (("vhost_scsi_controller_add_target", None),
                      ("add_vhost_scsi_lun", "vhost_scsi_controller_add_target")):
        p = subparsers.add_parser(name, help="Add lun to vhost controller" + (" (deprecated)" if new else ""))
        p.add_argument("ctrlr", help="controller name where add lun")
        p.add_argument("scsi_target_num", type=int, help="scsi_target_num (-1: the first free one)")
        p.add_argument("bdev_name", help="bdev name")
        p.set_defaults(func=add_target)
        deprecated(p, name, new)

    for name, new in (("vhost_scsi_controller_remove_target", None),
                      ("remove_vhost_scsi_target", "vhost_scsi_controller_remove_target"),
                      ("remove_vhost_scsi_dev", "vhost_scsi_controller_remove_target")):
        p = subparsers.add_parser(name, help="Remove target from vhost controller"
                                  + (" (deprecated)" if new else ""))
        p.add_argument("ctrlr", help="controller name to remove target from")
        p.add_argument("scsi_target_num", type=int, help="scsi_target_num")
        p.set_defaults(func=remove_target)
        deprecated(p, name, new)

