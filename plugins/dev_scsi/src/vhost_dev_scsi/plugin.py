"""dev_scsi plugin: vhost-scsi controllers, their targets, and the CLI commands for them.

RPC names, parameters and results follow SPDK's (``scripts/rpc.py``), old names
included as deprecated aliases.
"""

from __future__ import annotations

import errno

import attrs

from vhost_core.errors import VhostError
from vhost_core.commands import Cli, CommandContext, param
from vhost_core.device import DeviceType
from vhost_core.hookspecs import hookimpl
from vhost_core.log import get_logger, notice

from vhost_dev_scsi.device import MAX_TARGETS, ScsiDevice

VHOST_CORE_API = (2,)
log = get_logger("vhost_scsi")


@attrs.frozen
class CreateScsiParams:
    ctrlr: str = param(help="controller name")
    cpumask: str | None = param(None, "--cpumask", help="cpu mask for this controller")
    delay: bool = param(False, "--delay", help="whether delay starting controller or not")


@attrs.frozen
class CtrlrParams:
    ctrlr: str = param(help="controller name")


@attrs.frozen
class AddTargetParams:
    ctrlr: str = param(help="controller name where add lun")
    scsi_target_num: int = param(help="scsi_target_num (-1: the first free one)")
    bdev_name: str = param(help="bdev name")


@attrs.frozen
class RemoveTargetParams:
    ctrlr: str = param(help="controller name to remove target from")
    scsi_target_num: int = param(help="scsi_target_num")


def _check_target_num(ctrlr: str, num: int) -> None:
    if not 0 <= num < MAX_TARGETS:
        raise VhostError(errno.EINVAL, f"controller {ctrlr}: SCSI target number {num} is out of range: "
                                      f"use 0..{MAX_TARGETS - 1}, or -1 for the first free one")


@hookimpl
def vhost_register_device_types(registry) -> None:
    registry.add(DeviceType("scsi", subsystem="vhost_scsi", qemu_device="vhost-user-scsi-pci",
                            qemu_queues_property="num_queues"))


@hookimpl
def vhost_register_commands(registry) -> None:
    @registry.command("vhost_create_scsi_controller", params=CreateScsiParams,
                      aliases=("construct_vhost_scsi_controller",), cli=Cli(prints=False))
    def vhost_create_scsi_controller(ctx: CommandContext, p: CreateScsiParams) -> bool:
        """Add a vhost-scsi controller (targets are added with vhost_scsi_controller_add_target)."""
        device = ScsiDevice()
        device.started = not p.delay
        ctx.controllers.create(p.ctrlr, device, p.cpumask, listen=not p.delay)
        if p.delay:
            notice(log, "Controller %s: created; it accepts a front-end after vhost_start_scsi_controller %s",
                   p.ctrlr, p.ctrlr)
        return True

    @registry.command("vhost_start_scsi_controller", params=CtrlrParams, cli=Cli(prints=False))
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
            raise VhostError(errno.EEXIST, f"controller {p.ctrlr}: SCSI target {num} is already occupied "
                                          f"by bdev '{device.targets[num].bdev.name}': remove it first "
                                          f"(vhost_scsi_controller_remove_target {p.ctrlr} {num}) or pick "
                                          f"another number")
        bdev = ctx.bdevs.get(p.bdev_name)
        for t in device.targets.values():
            if t.bdev is bdev:
                raise VhostError(errno.EBUSY, f"controller {p.ctrlr}: bdev '{bdev.name}' already backs "
                                             f"SCSI target {t.num}: a bdev serves one target")
        device.add_target(num, bdev.name)
        notice(log, "Controller %s: defined target 'Target %d' using lun '%s'", p.ctrlr, num, bdev.name)
        return num

    @registry.command("vhost_scsi_controller_remove_target", params=RemoveTargetParams,
                      aliases=("remove_vhost_scsi_dev", "remove_vhost_scsi_target"), blocking=True,
                      cli=Cli(prints=False))
    def vhost_scsi_controller_remove_target(ctx: CommandContext, p: RemoveTargetParams) -> bool:
        """Hot-detach a SCSI target from a vhost-scsi controller."""
        device = _scsi_device(ctx, p.ctrlr)
        _check_target_num(p.ctrlr, p.scsi_target_num)
        if p.scsi_target_num not in device.targets:
            raise VhostError(errno.ENODEV, f"controller {p.ctrlr}: SCSI target {p.scsi_target_num} is not "
                                          f"occupied; see vhost_get_controllers {p.ctrlr}")
        target = device.remove_target(p.scsi_target_num)
        notice(log, "Controller %s: removed target '%s' (bdev '%s')", p.ctrlr, target.name, target.bdev.name)
        return True


def _scsi_device(ctx: CommandContext, name: str) -> ScsiDevice:
    device = ctx.controllers.get(name).device
    if not isinstance(device, ScsiDevice):
        raise VhostError(errno.EINVAL, f"controller '{name}' is a vhost-{device.device_type} "
                                      f"controller, not vhost-scsi: targets exist only on "
                                      f"vhost_create_scsi_controller controllers")
    return device
