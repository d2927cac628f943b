"""bdev_malloc plugin: ``bdev_malloc_create`` / ``bdev_null_create`` and their deletes."""

from __future__ import annotations

import errno
import itertools
import os
import uuid as uuid_mod
from typing import Any

import attrs

from vhost_core.bdev.interface import Bdev, io_type_mask  # noqa: F401  (documented contract)
from vhost_core.hookspecs import hookimpl
from vhost_core.log import get_logger, notice
from vhost_core.rpc.registry import RpcError

from vhost_bdev_malloc._malloc_native import ffi, lib

VHOST_CORE_API = (1,)
log = get_logger("bdev_malloc")
IO_TYPES = frozenset({"read", "write", "flush", "unmap", "write_zeroes", "reset"})
_counter = itertools.count()


@attrs.frozen
class MallocCreateParams:
    num_blocks: int
    block_size: int
    name: str | None = None
    uuid: str | None = None
    optimal_io_boundary: int = 0
    md_size: int = 0


@attrs.frozen
class NullCreateParams:
    name: str
    num_blocks: int
    block_size: int
    uuid: str | None = None
    md_size: int = 0


@attrs.frozen
class DeleteParams:
    name: str


def _memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _check(method: str, num_blocks: int, block_size: int, uuid: str | None, md_size: int, ram: bool) -> str:
    if block_size not in (512, 1024, 2048, 4096):
        raise RpcError(-errno.EINVAL, f"{method}: block_size {block_size} is not supported: "
                                      f"use 512 or 4096 (or 1024, 2048)")
    if num_blocks <= 0:
        raise RpcError(-errno.EINVAL, f"{method}: num_blocks must be positive, got {num_blocks}")
    if md_size:
        raise RpcError(-errno.ENOTSUP, f"{method}: separate metadata (md_size) is not supported: omit it")
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


def _create(app, method: str, name: str, num_blocks: int, block_size: int, uuid: str, null: bool) -> str:
    if name in app.bdevs:
        raise RpcError(-errno.EEXIST, f"{method}: bdev name '{name}' is already taken: "
                                      f"pick another name or delete the existing bdev first")
    native = lib.ram_bdev_new(num_blocks, block_size, int(null))
    if native == ffi.NULL:
        raise RpcError(-errno.ENOMEM, f"{method}: cannot allocate {num_blocks * block_size >> 20} MiB "
                                      f"for bdev '{name}': make it smaller")
    bdev = Bdev(
        name=name,
        module="null" if null else "malloc",
        product_name="Null disk" if null else "Malloc disk",
        block_size=block_size,
        num_blocks=num_blocks,
        native=int(ffi.cast("uintptr_t", native)),
        destruct=lambda: lib.ram_bdev_free(native),
        uuid=uuid,
        io_types=IO_TYPES,
    )
    app.bdevs.add(bdev)
    notice(log, "bdev %s: %s disk of %d blocks of %d bytes created", name,
           "null" if null else "malloc", num_blocks, block_size)
    return name


@hookimpl
def vhost_register_rpc_methods(rpc, app) -> None:
    @rpc.method("bdev_malloc_create", params=MallocCreateParams, owner="bdev_malloc",
                deprecated_aliases=("construct_malloc_bdev",))
    def bdev_malloc_create(p: MallocCreateParams) -> str:
        uuid = _check("bdev_malloc_create", p.num_blocks, p.block_size, p.uuid, p.md_size, ram=True)
        name = p.name
        if not name:
            name = f"Malloc{next(_counter)}"
            while name in app.bdevs:
                name = f"Malloc{next(_counter)}"
        return _create(app, "bdev_malloc_create", name, p.num_blocks, p.block_size, uuid, null=False)

    @rpc.method("bdev_malloc_delete", params=DeleteParams, owner="bdev_malloc",
                deprecated_aliases=("delete_malloc_bdev",))
    def bdev_malloc_delete(p: DeleteParams) -> bool:
        app.bdevs.delete(p.name, module="malloc")
        return True

    @rpc.method("bdev_null_create", params=NullCreateParams, owner="bdev_malloc",
                deprecated_aliases=("construct_null_bdev",))
    def bdev_null_create(p: NullCreateParams) -> str:
        uuid = _check("bdev_null_create", p.num_blocks, p.block_size, p.uuid, p.md_size, ram=False)
        return _create(app, "bdev_null_create", p.name, p.num_blocks, p.block_size, uuid, null=True)

    @rpc.method("bdev_null_delete", params=DeleteParams, owner="bdev_malloc",
                deprecated_aliases=("delete_null_bdev",))
    def bdev_null_delete(p: DeleteParams) -> bool:
        app.bdevs.delete(p.name, module="null")
        return True


@hookimpl
def vhost_config_json(app) -> dict[str, list[dict[str, Any]]]:
    calls = []
    for b in app.bdevs:
        if b.module == "malloc":
            calls.append({"method": "bdev_malloc_create",
                          "params": {"name": b.name, "num_blocks": b.num_blocks,
                                     "block_size": b.block_size, "uuid": b.uuid}})
        elif b.module == "null":
            calls.append({"method": "bdev_null_create",
                          "params": {"name": b.name, "num_blocks": b.num_blocks,
                                     "block_size": b.block_size, "uuid": b.uuid}})
    return {"bdev": calls}


def _mib_to_blocks(total_size_mib: float, block_size: int) -> int:
    return int(total_size_mib * 1024 * 1024) // block_size


@hookimpl
def vhost_add_cli_commands(subparsers) -> None:
    def malloc_create(client, args):
        params: dict[str, Any] = {"num_blocks": _mib_to_blocks(args.total_size, args.block_size),
                                  "block_size": args.block_size}
        if args.name:
            params["name"] = args.name
        if args.uuid:
            params["uuid"] = args.uuid
        return client.call(args.method_name, params)

    for name, deprecated in (("bdev_malloc_create", None), ("construct_malloc_bdev", "bdev_malloc_create")):
        p = subparsers.add_parser(name, help="Create a bdev with malloc backend")
        p.add_argument("-b", "--name", help="name of the bdev")
        p.add_argument("-u", "--uuid", help="UUID of the bdev")
        p.add_argument("total_size", type=float, help="size of malloc bdev in MiB (float > 0)")
        p.add_argument("block_size", type=int, help="data block size in bytes (512 or 4096)")
        p.set_defaults(func=malloc_create, method_name=name)
        if deprecated:
            p.set_defaults(deprecated_use=deprecated)

    def delete(client, args):
        client.call(args.method_name, {"name": args.name})
        from vhost_core.rpc.cli import NO_OUTPUT
        return NO_OUTPUT

    for name, what in (("bdev_malloc_delete", "malloc"), ("bdev_null_delete", "null")):
        p = subparsers.add_parser(name, help=f"Delete a {what} disk")
        p.add_argument("name", help=f"{what} bdev name")
        p.set_defaults(func=delete, method_name=name)

    def null_create(client, args):
        params: dict[str, Any] = {"name": args.name,
                                  "num_blocks": _mib_to_blocks(args.total_size, args.block_size),
                                  "block_size": args.block_size}
        if args.uuid:
            params["uuid"] = args.uuid
        return client.call("bdev_null_create", params)

    p = subparsers.add_parser("bdev_null_create", help="Add a bdev with null backend")
    p.add_argument("name", help="block device name")
    p.add_argument("total_size", type=float, help="size of null bdev in MiB (float > 0)")
    p.add_argument("block_size", type=int, help="block size in bytes")
    p.add_argument("-u", "--uuid", help="UUID of the bdev")
    p.set_defaults(func=null_create)
