"""bdev_malloc plugin: ``bdev_malloc_create`` / ``bdev_null_create`` and their deletes."""

from __future__ import annotations

import errno
import itertools
import os
import uuid as uuid_mod
from typing import Any

import attrs

from vhost_core.bdev.interface import Bdev, BdevModule
from vhost_core.commands import CommandContext
from vhost_core.hookspecs import hookimpl
from vhost_core.log import get_logger, notice
from vhost_core.rpc.registry import RpcError, unsupported

from vhost_bdev_malloc._malloc_native import ffi, lib

VHOST_CORE_API = (2,)
log = get_logger("bdev_malloc")
IO_TYPES = frozenset({"read", "write", "flush", "unmap", "write_zeroes", "reset"})


# SPDK's whole parameter set (v24.01 to 26.9): what this target does not do is refused only
# when asked for (see vhost_core.rpc.registry.unsupported).
_NO_MD = "it keeps no per-block metadata: omit md_size/md_interleave"
_NO_DIF = "it generates and checks no protection information (DIF/DIX): omit the dif_* options"
_PHYS = "the physical block size it reports is the block size: omit physical_block_size"


@attrs.frozen
class MallocCreateParams:
    num_blocks: int
    block_size: int
    name: str | None = None
    uuid: str | None = None
    physical_block_size: int | None = unsupported(None, _PHYS, same_as="block_size")
    optimal_io_boundary: int = unsupported(0, "it does not split requests at an I/O boundary: "
                                              "omit optimal_io_boundary")
    md_size: int = unsupported(0, _NO_MD)
    md_interleave: bool = unsupported(False, _NO_MD)
    dif_type: int = unsupported(0, _NO_DIF)
    dif_is_head_of_md: bool = unsupported(False, _NO_DIF)
    dif_pi_format: int = unsupported(0, _NO_DIF)
    numa_id: int = unsupported(-1, "it allocates the memory on any NUMA node: omit numa_id (or -1)")


_NO_HINTS = "it reports no write or unmap hints to guests: omit it"


@attrs.frozen
class NullCreateParams:
    name: str
    num_blocks: int
    block_size: int
    uuid: str | None = None
    physical_block_size: int | None = unsupported(None, _PHYS, same_as="block_size")
    md_size: int = unsupported(0, _NO_MD)
    dif_type: int = unsupported(0, _NO_DIF)
    dif_is_head_of_md: bool = unsupported(False, _NO_DIF)
    dif_pi_format: int = unsupported(0, _NO_DIF)
    preferred_write_alignment: int = unsupported(0, _NO_HINTS)
    preferred_write_granularity: int = unsupported(0, _NO_HINTS)
    optimal_write_size: int = unsupported(0, _NO_HINTS)
    preferred_unmap_alignment: int = unsupported(0, _NO_HINTS)
    preferred_unmap_granularity: int = unsupported(0, _NO_HINTS)


@attrs.frozen
class DeleteParams:
    name: str


def _memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _check(method: str, num_blocks: int, block_size: int, uuid: str | None, ram: bool) -> str:
    if block_size not in (512, 1024, 2048, 4096):
        raise RpcError(-errno.EINVAL, f"{method}: block_size {block_size} is not supported: "
                                      f"use 512 or 4096 (or 1024, 2048)")
    if num_blocks <= 0:
        raise RpcError(-errno.EINVAL, f"{method}: num_blocks must be positive, got {num_blocks}")
    if ram and num_blocks * block_size > _memory_bytes():
        raise RpcError(-errno.ENOMEM, f"{method}: {num_blocks * block_size >> 20} MiB exceeds this "
                                      f"machine's memory ({_memory_bytes() >> 20} MiB): make it smaller")
    if uuid is None:
        return str(uuid_mod.uuid4())
    try:
        return str(uuid_mod.UUID(uuid))
    except ValueError:
        raise RpcError(-errno.EINVAL, f"{method}: uuid '{uuid}' is not a UUID "
                                      f"(e.g. 1b9e4f5a-6a3c-4a2b-9b8e-0d3c5f7a9e21)") from None


class RamModule(BdevModule):
    """malloc and null: RAM-backed bdevs (malloc.c); one module object for each name."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._counter = itertools.count()

    def next_name(self, bdevs) -> str:
        name = f"Malloc{next(self._counter)}"
        while name in bdevs:
            name = f"Malloc{next(self._counter)}"
        return name

    def create(self, bdevs, method: str, name: str, num_blocks: int, block_size: int, uuid: str) -> str:
        null = self.name == "null"
        if name in bdevs:
            raise RpcError(-errno.EEXIST, f"{method}: bdev name '{name}' is already taken: "
                                          f"pick another name or delete the existing bdev first")
        native = lib.ram_bdev_new(num_blocks, block_size, int(null))
        if native == ffi.NULL:
            raise RpcError(-errno.ENOMEM, f"{method}: cannot allocate {num_blocks * block_size >> 20} MiB "
                                          f"for bdev '{name}': make it smaller")
        bdev = Bdev(
            name=name,
            module=self.name,
            product_name="Null disk" if null else "Malloc disk",
            block_size=block_size,
            num_blocks=num_blocks,
            native=int(ffi.cast("uintptr_t", native)),
            destruct=lambda: lib.ram_bdev_free(native),
            uuid=uuid,
            io_types=IO_TYPES,
        )
        bdevs.add(bdev)
        notice(log, "bdev %s: %s disk of %d blocks of %d bytes created", name, self.name, num_blocks, block_size)
        return name

    def config_json(self, bdevs: list[Bdev]) -> list[dict[str, Any]]:
        return [{"method": f"bdev_{self.name}_create",
                 "params": {"name": b.name, "num_blocks": b.num_blocks, "block_size": b.block_size,
                            "uuid": b.uuid}}
                for b in bdevs]


@hookimpl
def vhost_register_bdev_modules(registry) -> None:
    registry.add(RamModule("malloc"))
    registry.add(RamModule("null"))


@hookimpl
def vhost_register_commands(registry) -> None:
    @registry.command("bdev_malloc_create", params=MallocCreateParams, aliases=("construct_malloc_bdev",))
    def bdev_malloc_create(ctx: CommandContext, p: MallocCreateParams) -> str:
        uuid = _check("bdev_malloc_create", p.num_blocks, p.block_size, p.uuid, ram=True)
        module = ctx.bdev_module("malloc")
        name = p.name or module.next_name(ctx.bdevs)
        return module.create(ctx.bdevs, "bdev_malloc_create", name, p.num_blocks, p.block_size, uuid)

    @registry.command("bdev_malloc_delete", params=DeleteParams, aliases=("delete_malloc_bdev",), blocking=True)
    def bdev_malloc_delete(ctx: CommandContext, p: DeleteParams) -> bool:
        ctx.bdevs.delete(p.name, module="malloc")
        return True

    @registry.command("bdev_null_create", params=NullCreateParams, aliases=("construct_null_bdev",))
    def bdev_null_create(ctx: CommandContext, p: NullCreateParams) -> str:
        uuid = _check("bdev_null_create", p.num_blocks, p.block_size, p.uuid, ram=False)
        return ctx.bdev_module("null").create(ctx.bdevs, "bdev_null_create", p.name, p.num_blocks,
                                              p.block_size, uuid)

    @registry.command("bdev_null_delete", params=DeleteParams, aliases=("delete_null_bdev",), blocking=True)
    def bdev_null_delete(ctx: CommandContext, p: DeleteParams) -> bool:
        ctx.bdevs.delete(p.name, module="null")
        return True


def _mib_to_blocks(total_size_mib: float, block_size: int) -> int:
    return int(total_size_mib * 1024 * 1024) // block_size


def _add_spdk_options(p: Any, *, malloc: bool) -> None:
    """SPDK rpc.py's options for these commands, so a pasted SPDK command line parses; the
    target refuses the values it does not honour."""
    p.add_argument("-u", "--uuid", help="UUID of the bdev")
    p.add_argument("-p", "--physical-block-size", type=int, help="physical block size (= block_size)")
    if malloc:
        p.add_argument("-o", "--optimal-io-boundary", type=int, help="not supported (0)")
    p.add_argument("-m", "--md-size", type=int, help="metadata size: not supported (0)")
    if malloc:
        p.add_argument("-i", "--md-interleave", action="store_true", help="not supported")
    p.add_argument("-t", "--dif-type", type=int, choices=[0, 1, 2, 3], help="not supported (0)")
    p.add_argument("-d", "--dif-is-head-of-md", action="store_true", help="not supported")
    p.add_argument("-f", "--dif-pi-format", type=int, choices=[0, 1, 2], help="not supported (0)")
    if malloc:
        p.add_argument("-n", "--numa-id", type=int, help="not supported (-1: any node)")
    else:
        for short, opt in (("-a", "--preferred-write-alignment"), ("-g", "--preferred-write-granularity"),
                           ("-s", "--optimal-write-size"), ("-c", "--preferred-unmap-alignment"),
                           ("-r", "--preferred-unmap-granularity")):
            p.add_argument(short, opt, type=int, help="not supported (0)")


_SPDK_OPTIONS = ("uuid", "physical_block_size", "optimal_io_boundary", "md_size", "md_interleave", "dif_type",
                 "dif_is_head_of_md", "dif_pi_format", "numa_id", "preferred_write_alignment",
                 "preferred_write_granularity", "optimal_write_size", "preferred_unmap_alignment",
                 "preferred_unmap_granularity")


def _given(args: Any) -> dict[str, Any]:
    """The SPDK options given on the command line (unset and false ones are not sent)."""
    return {k: getattr(args, k) for k in _SPDK_OPTIONS if getattr(args, k, None) not in (None, False)}


@hookimpl
def vhost_add_cli_commands(subparsers) -> None:
    from vhost_core.rpc.cli import NO_OUTPUT

    def malloc_create(client, args):
        if args.name and args.name_positional and args.name != args.name_positional:
            raise SystemExit(f"vhost-rpc: {args.called_rpc_name}: two names given ({args.name_positional} "
                             f"and -b {args.name}): give one")
        params: dict[str, Any] = {"num_blocks": _mib_to_blocks(args.total_size, args.block_size),
                                  "block_size": args.block_size}
        name = args.name or args.name_positional
        if name:
            params["name"] = name
        params.update(_given(args))
        return client.call(args.method_name, params)

    for name, deprecated in (("bdev_malloc_create", None), ("construct_malloc_bdev", "bdev_malloc_create")):
        p = subparsers.add_parser(name, help="Create a bdev with malloc backend")
        p.add_argument("-b", "--name", help="name of the bdev")
        p.add_argument("total_size", type=float, help="size of malloc bdev in MiB (float > 0)")
        p.add_argument("block_size", type=int, help="data block size in bytes (512 or 4096)")
        p.add_argument("name_positional", nargs="?", metavar="name",
                       help="name of the bdev, as -b (the seed's `construct_malloc_bdev 128 4096 Malloc0`)")
        _add_spdk_options(p, malloc=True)
        p.set_defaults(func=malloc_create, method_name=name)
        if deprecated:
            p.set_defaults(deprecated_use=deprecated)

    def delete(client, args):
        client.call(args.method_name, {"name": args.name})
        return NO_OUTPUT

    for name, what in (("bdev_malloc_delete", "malloc"), ("bdev_null_delete", "null")):
        p = subparsers.add_parser(name, help=f"Delete a {what} disk")
        p.add_argument("name", help=f"{what} bdev name")
        p.set_defaults(func=delete, method_name=name)

    def null_create(client, args):
        params: dict[str, Any] = {"name": args.name,
                                  "num_blocks": _mib_to_blocks(args.total_size, args.block_size),
                                  "block_size": args.block_size}
        params.update(_given(args))
        return client.call("bdev_null_create", params)

    p = subparsers.add_parser("bdev_null_create", help="Add a bdev with null backend")
    p.add_argument("name", help="block device name")
    p.add_argument("total_size", type=float, help="size of null bdev in MiB (float > 0)")
    p.add_argument("block_size", type=int, help="block size in bytes")
    _add_spdk_options(p, malloc=False)
    p.set_defaults(func=null_create)
