"""dev_blk plugin: the ``vhost_create_blk_controller`` RPC and its CLI command."""

from __future__ import annotations

import argparse
import errno
from typing import Any

import attrs

from vhost_core.commands import CommandContext
from vhost_core.device import DeviceType
from vhost_core.hookspecs import hookimpl
from vhost_core.log import get_logger, notice
from vhost_core.rpc.registry import RpcError, extension, unsupported

from vhost_dev_blk.device import MAX_QUEUES, BlkDevice

VHOST_CORE_API = (2,)
log = get_logger("vhost_blk")


@attrs.frozen
class CreateBlkParams:
    """SPDK's parameters (v24.01 to 26.9) and ``num_queues``, ours."""

    ctrlr: str
    dev_name: str
    cpumask: str | None = None
    readonly: bool = False
    transport: str | None = unsupported(None, "it serves vhost-user only: omit transport (or vhost_user_blk)",
                                        accepts=("vhost_user_blk",))
    packed_ring: bool = unsupported(False, "it serves split virtqueues (which every QEMU offers): "
                                           "omit packed_ring (-p)")
    num_queues: int | None = extension(None, f"request queues offered to the guest, 1..{MAX_QUEUES} "
                                             f"(default {MAX_QUEUES})")


@hookimpl
def vhost_register_device_types(registry) -> None:
    registry.add(DeviceType("blk", subsystem="vhost_blk", qemu_device="vhost-user-blk-pci",
                            qemu_queues_property="num-queues"))


@hookimpl
def vhost_register_commands(registry) -> None:
    @registry.command("vhost_create_blk_controller", params=CreateBlkParams,
                      aliases=("construct_vhost_blk_controller",))
    def vhost_create_blk_controller(ctx: CommandContext, p: CreateBlkParams) -> bool:
        """Add a vhost-blk controller serving one bdev."""
        nq = MAX_QUEUES if p.num_queues is None else p.num_queues
        if not 1 <= nq <= MAX_QUEUES:
            raise RpcError(-errno.EINVAL, f"num_queues {nq} out of range: use 1..{MAX_QUEUES}")
        device = BlkDevice(p.dev_name, p.readonly, nq)
        ctx.controllers.create(p.ctrlr, device, p.cpumask)
        notice(log, "Controller %s: using bdev '%s'%s", p.ctrlr, device.bdev.name,
               " (read-only)" if device.readonly else "")
        return True


@hookimpl
def vhost_add_cli_commands(subparsers) -> None:
    from vhost_core.rpc.cli import NO_OUTPUT

    def create(client, args):
        params: dict[str, Any] = {"ctrlr": args.ctrlr, "dev_name": args.dev_name}
        if args.cpumask:
            params["cpumask"] = args.cpumask
        if args.readonly:
            params["readonly"] = True
        if args.packed_ring:
            params["packed_ring"] = True
        if args.transport:
            params["transport"] = args.transport
        client.call(args.method_name, params)
        return NO_OUTPUT        # as rpc.py: the target's NOTICE says what was created

    for name, deprecated in (("vhost_create_blk_controller", None),
                             ("construct_vhost_blk_controller", "vhost_create_blk_controller")):
        p = subparsers.add_parser(name, help="Add a new vhost-blk controller"
                                  + (" (deprecated)" if deprecated else ""),
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.add_argument("ctrlr", help="controller name (the socket file name in the -S directory)")
        p.add_argument("dev_name", help="bdev name")
        p.add_argument("--cpumask", help="cpu mask for this controller")
        p.add_argument("-r", "--readonly", action="store_true", help="set the controller as read-only")
        p.add_argument("-p", "--packed-ring", action="store_true", help="use a packed ring (unsupported)")
        p.add_argument("--transport", help="virtio-blk transport: vhost_user_blk, the only one here")
        p.set_defaults(func=create, method_name=name)
        if deprecated:
            p.set_defaults(deprecated_use=deprecated)
