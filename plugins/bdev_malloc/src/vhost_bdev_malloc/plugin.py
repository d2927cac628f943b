"""bdev_malloc plugin: ``bdev_malloc_create`` / ``bdev_null_create`` and their deletes."""

from __future__ import annotations

import errno
import itertools
import os
import uuid as uuid_mod
from typing import Any

import attrs

from vhost_core.errors import VhostError
from vhost_core.bdev.interface import Bdev, BdevModule
from vhost_core.commands import Cli, CliArg, CommandContext, cli, param, unsupported
from vhost_core.hookspecs import hookimpl
from vhost_core.log import get_logger, notice

from vhost_bdev_malloc._malloc_native import ffi, lib

VHOST_CORE_API = (2,)
log = get_logger("bdev_malloc")
IO_TYPES = frozenset({"read", "write", "flush", "unmap", "write_zeroes", "reset"})


# SPDK's whole parameter set (v24.01 to 26.9): what this target does not do is refused only
# when asked for (see vhost_core.rpc.registry.unsupported).
_NO_MD = "it keeps no per-block metadata: omit md_size/md_interleave"
_NO_DIF = "it generates and checks no protection information (DIF/DIX): omit the dif_* options"
_PHYS = "the physical block size it reports is the block size: omit physical_block_size"


# The command line is SPDK rpc.py's: sizes in MiB (num_blocks is computed), and its options, so
# that a pasted SPDK command line parses; the target refuses the values it does not honour.
_MIB = "size of the bdev in MiB (float > 0)"
_UUID = param(None, "-u", "--uuid", help="UUID of the bdev")
_PHYS_BS = unsupported(None, _PHYS, same_as="block_size",
                       cli=cli("-p", "--physical-block-size", help="physical block size (= block_size)"))
_MD_SIZE = unsupported(0, _NO_MD, cli=cli("-m", "--md-size", help="metadata size: not supported (0)"))
_DIF_TYPE = unsupported(0, _NO_DIF, cli=cli("-t", "--dif-type", choices=[0, 1, 2, 3], help="not supported (0)"))
_DIF_HEAD = unsupported(False, _NO_DIF, cli=cli("-d", "--dif-is-head-of-md", help="not supported"))
_DIF_PI = unsupported(0, _NO_DIF, cli=cli("-f", "--dif-pi-format", choices=[0, 1, 2], help="not supported (0)"))


@attrs.frozen
class MallocCreateParams:
    num_blocks: int = param(hidden=True)
    block_size: int = param(help="data block size in bytes (512 or 4096)")
    name: str | None = param(None, "-b", "--name", help="name of the bdev")
    uuid: str | None = _UUID
    physical_block_size: int | None = _PHYS_BS
    optimal_io_boundary: int = unsupported(0, "it does not split requests at an I/O boundary: "
                                              "omit optimal_io_boundary",
                                           cli=cli("-o", "--optimal-io-boundary", help="not supported (0)"))
    md_size: int = _MD_SIZE
    md_interleave: bool = unsupported(False, _NO_MD, cli=cli("-i", "--md-interleave", help="not supported"))
    dif_type: int = _DIF_TYPE
    dif_is_head_of_md: bool = _DIF_HEAD
    dif_pi_format: int = _DIF_PI
    numa_id: int = unsupported(-1, "it allocates the memory on any NUMA node: omit numa_id (or -1)",
                               cli=cli("-n", "--numa-id", help="not supported (-1: any node)"))


_NO_HINTS = "it reports no write or unmap hints to guests: omit it"


def _hint(*flags: str) -> Any:
    return unsupported(0, _NO_HINTS, cli=cli(*flags, help="not supported (0)"))


@attrs.frozen
class NullCreateParams:
    name: str = param(help="block device name")
    num_blocks: int = param(hidden=True)
    block_size: int = param(help="block size in bytes")
    uuid: str | None = _UUID
    physical_block_size: int | None = _PHYS_BS
    md_size: int = _MD_SIZE
    dif_type: int = _DIF_TYPE
    dif_is_head_of_md: bool = _DIF_HEAD
    dif_pi_format: int = _DIF_PI
    preferred_write_alignment: int = _hint("-a", "--preferred-write-alignment")
    preferred_write_granularity: int = _hint("-g", "--preferred-write-granularity")
    optimal_write_size: int = _hint("-s", "--optimal-write-size")
    preferred_unmap_alignment: int = _hint("-c", "--preferred-unmap-alignment")
    preferred_unmap_granularity: int = _hint("-r", "--preferred-unmap-granularity")


@attrs.frozen
class DeleteParams:
    name: str = param(help="bdev name")


def _sized(args: dict[str, Any]) -> dict[str, Any]:
    """vhost-rpc's total_size (MiB) -> num_blocks."""
    total = args.pop("total_size")
    return {**args, "num_blocks": int(total * 1024 * 1024) // args["block_size"]}


def _malloc_cli_params(args: dict[str, Any]) -> dict[str, Any]:
    positional = args.pop("name_positional", None)
    if positional is not None and args.get("name") not in (None, positional):
        raise SystemExit(f"vhost-rpc: bdev_malloc_create: two names given ({positional} and -b "
                         f"{args['name']}): give one")
    if positional is not None:
        args["name"] = positional
    return _sized(args)


_TOTAL_SIZE = CliArg("total_size", type=float, help=_MIB)
MALLOC_CLI = Cli(arguments=(_TOTAL_SIZE, CliArg("name_positional", nargs="?", metavar="name",
                                                help="name of the bdev, as -b (the seed's "
                                                     "`construct_malloc_bdev 128 4096 Malloc0`)")),
                 positionals=("total_size", "block_size", "name_positional"), to_params=_malloc_cli_params)
NULL_CLI = Cli(arguments=(_TOTAL_SIZE,), positionals=("name", "total_size", "block_size"), to_params=_sized)


def _memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _check(method: str, num_blocks: int, block_size: int, uuid: str | None, ram: bool) -> str:
    if block_size not in (512, 1024, 2048, 4096):
        raise VhostError(errno.EINVAL, f"{method}: block_size {block_size} is not supported: "
                                      f"use 512 or 4096 (or 1024, 2048)")
    if num_blocks <= 0:
        raise VhostError(errno.EINVAL, f"{method}: num_blocks must be positive, got {num_blocks}")
    if ram and num_blocks * block_size > _memory_bytes():
        raise VhostError(errno.ENOMEM, f"{method}: {num_blocks * block_size >> 20} MiB exceeds this "
                                      f"machine's memory ({_memory_bytes() >> 20} MiB): make it smaller")
    if uuid is None:
        return str(uuid_mod.uuid4())
    try:
        return str(uuid_mod.UUID(uuid))
    except ValueError:
        raise VhostError(errno.EINVAL, f"{method}: uuid '{uuid}' is not a UUID "
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
            raise VhostError(errno.EEXIST, f"{method}: bdev name '{name}' is already taken: "
                                          f"pick another name or delete the existing bdev first")
        native = lib.ram_bdev_new(num_blocks, block_size, int(null))
        if native == ffi.NULL:
            raise VhostError(errno.ENOMEM, f"{method}: cannot allocate {num_blocks * block_size >> 20} MiB "
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
    @registry.command("bdev_malloc_create", params=MallocCreateParams, aliases=("construct_malloc_bdev",),
                      cli=MALLOC_CLI)
    def bdev_malloc_create(ctx: CommandContext, p: MallocCreateParams) -> str:
        """Create a bdev with malloc backend."""
        uuid = _check("bdev_malloc_create", p.num_blocks, p.block_size, p.uuid, ram=True)
        module = ctx.bdev_module("malloc")
        name = p.name or module.next_name(ctx.bdevs)
        return module.create(ctx.bdevs, "bdev_malloc_create", name, p.num_blocks, p.block_size, uuid)

    @registry.command("bdev_malloc_delete", params=DeleteParams, aliases=("delete_malloc_bdev",), blocking=True,
                      cli=Cli(prints=False))
    def bdev_malloc_delete(ctx: CommandContext, p: DeleteParams) -> bool:
        """Delete a malloc disk."""
        ctx.bdevs.delete(p.name, module="malloc")
        return True

    @registry.command("bdev_null_create", params=NullCreateParams, aliases=("construct_null_bdev",),
                      cli=NULL_CLI)
    def bdev_null_create(ctx: CommandContext, p: NullCreateParams) -> str:
        """Add a bdev with null backend."""
        uuid = _check("bdev_null_create", p.num_blocks, p.block_size, p.uuid, ram=False)
        return ctx.bdev_module("null").create(ctx.bdevs, "bdev_null_create", p.name, p.num_blocks,
                                              p.block_size, uuid)

    @registry.command("bdev_null_delete", params=DeleteParams, aliases=("delete_null_bdev",), blocking=True,
                      cli=Cli(prints=False))
    def bdev_null_delete(ctx: CommandContext, p: DeleteParams) -> bool:
        """Delete a null disk."""
        ctx.bdevs.delete(p.name, module="null")
        return True
