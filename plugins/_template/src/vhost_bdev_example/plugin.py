"""bdev_example plugin: ``bdev_example_create`` / ``bdev_example_delete``.

Three parts, as every bdev plugin has them:

1. the block device itself (:class:`DictDisk`): plain Python methods that the core's
   Python-bdev adapter calls from a worker thread (see
   ``vhost_core.bdev.python_adapter.PythonBdev`` for the contract);
2. its bdev module (hook ``vhost_register_bdev_modules``): the calls that recreate its
   bdevs for ``save_config``;
3. its commands (hook ``vhost_register_commands``): each one declaration that is both
   the daemon's JSON-RPC method and the ``vhost-rpc`` sub-command.
"""

from __future__ import annotations

import errno
import uuid as uuid_mod
from typing import Any

import attrs

from vhost_core.bdev.interface import Bdev, BdevModule, check_block_size
from vhost_core.bdev.python_adapter import make_python_bdev
from vhost_core.commands import Cli, CliArg, CommandContext, param
from vhost_core.errors import VhostError
from vhost_core.hookspecs import hookimpl
from vhost_core.log import get_logger, notice

#: The plugin API generations this plugin was written for (vhost_core.CORE_API_VERSION).
VHOST_CORE_API = (2,)
MODULE = "example"
log = get_logger("bdev_example")


# ---------------------------------------------------------------- the bdev


class DictDisk:
    """A RAM disk that keeps only the blocks written; the others read as zeroes.

    Called from the adapter's worker thread, one I/O at a time.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.blocks: dict[int, bytes] = {}
        self._zero = bytes(block_size)

    def read(self, offset_blocks: int, num_blocks: int) -> bytes:
        get, zero = self.blocks.get, self._zero
        return b"".join(get(i, zero) for i in range(offset_blocks, offset_blocks + num_blocks))

    def write(self, offset_blocks: int, data: bytes) -> None:
        bs = self.block_size
        for i in range(len(data) // bs):
            self.blocks[offset_blocks + i] = data[i * bs:(i + 1) * bs]

    def flush(self) -> None:
        pass                                  # RAM: nothing to make durable

    def unmap(self, offset_blocks: int, num_blocks: int) -> None:
        end = offset_blocks + num_blocks
        if num_blocks > len(self.blocks):     # a huge range over a sparse disk
            for i in [i for i in self.blocks if offset_blocks <= i < end]:
                del self.blocks[i]
        else:
            for i in range(offset_blocks, end):
                self.blocks.pop(i, None)

    write_zeroes = unmap                      # absent blocks read as zeroes

    def close(self) -> None:
        self.blocks.clear()


# ---------------------------------------------------------------- RPCs


@attrs.frozen
class CreateParams:
    """The JSON-RPC parameters; the field metadata is the vhost-rpc spelling and help."""

    name: str = param(help="bdev name")
    num_blocks: int = param(hidden=True)                  # vhost-rpc takes a size in MiB instead
    block_size: int = param(512, positional=True, help="block size in bytes (512 or 4096)")
    uuid: str | None = param(None, "-u", "--uuid", help="UUID of the bdev")


@attrs.frozen
class DeleteParams:
    name: str = param(help="bdev name")


def _num_blocks(args: dict[str, Any]) -> dict[str, Any]:
    """vhost-rpc's size in MiB -> the num_blocks the RPC takes."""
    total_mib = args.pop("total_size")
    return {**args, "num_blocks": int(total_mib * 1024 * 1024) // args.get("block_size", 512)}


#: ``vhost-rpc bdev_example_create NAME TOTAL_SIZE [BLOCK_SIZE] [-u UUID]``
CREATE_CLI = Cli(arguments=(CliArg("total_size", type=float, help="size in MiB"),),
                 positionals=("name", "total_size", "block_size"), to_params=_num_blocks)


class ExampleModule(BdevModule):
    """The bdev module: its name is what its bdevs carry in ``Bdev.module``."""

    def __init__(self) -> None:
        super().__init__(MODULE)

    def config_json(self, bdevs: list[Bdev]) -> list[dict[str, Any]]:
        """The calls that recreate this module's bdevs (``save_config``)."""
        return [{"method": "bdev_example_create",
                 "params": {"name": b.name, "num_blocks": b.num_blocks, "block_size": b.block_size,
                            "uuid": b.uuid}}
                for b in bdevs]


@hookimpl
def vhost_register_bdev_modules(registry) -> None:
    registry.add(ExampleModule())


@hookimpl
def vhost_register_commands(registry) -> None:
    @registry.command("bdev_example_create", params=CreateParams, cli=CREATE_CLI)
    def bdev_example_create(ctx: CommandContext, p: CreateParams) -> str:
        """Create an in-memory example bdev; returns its name."""
        try:
            check_block_size(p.block_size)
            uuid = str(uuid_mod.UUID(p.uuid)) if p.uuid else None
        except ValueError as exc:
            raise VhostError(errno.EINVAL, f"bdev_example_create: {exc}") from None
        if p.num_blocks <= 0:
            raise VhostError(errno.EINVAL, f"bdev_example_create: num_blocks must be positive, "
                                          f"got {p.num_blocks}")
        if p.name in ctx.bdevs:
            raise VhostError(errno.EEXIST, f"bdev_example_create: bdev name '{p.name}' is already taken: "
                                          f"pick another name or delete the existing bdev first")
        bdev = make_python_bdev(p.name, DictDisk(p.num_blocks, p.block_size), module=MODULE,
                                product_name="Example disk", uuid=uuid)
        ctx.bdevs.add(bdev)
        notice(log, "bdev %s: example disk of %d blocks of %d bytes created", p.name, p.num_blocks,
               p.block_size)
        return p.name

    # blocking: deleting waits for the I/O in flight (a controller using the bdev
    # lets go of it first), so it runs off the RPC server's event loop.
    @registry.command("bdev_example_delete", params=DeleteParams, blocking=True, cli=Cli(prints=False))
    def bdev_example_delete(ctx: CommandContext, p: DeleteParams) -> bool:
        """Delete an example bdev (a controller using it sees it hot-removed)."""
        ctx.bdevs.delete(p.name, module=MODULE)
        return True
