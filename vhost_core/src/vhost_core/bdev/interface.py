"""The bdev contract: what a block backend provides, in two halves (as SPDK splits it).

**Module** (lifecycle, Python; one per backend type, SPDK's ``spdk_bdev_module``) - a
:class:`BdevModule` registered through the ``vhost_register_bdev_modules`` hook: its
name, the calls that recreate its bdevs (``save_config``) and what to do at shutdown.
Its commands (``bdev_<backend>_create`` / ``_delete``, registered through
``vhost_register_commands``) create :class:`Bdev` objects and add them to the bdev
registry their context hands them (``ctx.bdevs.add(bdev)``).

**Bdev** (one per block device) - the value object below, plus a native I/O table:
``Bdev.native`` is the address of a ``struct vn_bdev`` (see
``include/vhost_core/vhost_native.h``) whose ``ops`` the data path calls directly on
the reactor thread: ``submit`` (required), ``channel_create`` / ``channel_destroy`` /
``channel_poll`` / ``channel_fd`` (optional: per-reactor state and asynchronous
completion).  Python is never called per I/O.

A backend without C code uses the core's Python-bdev adapter instead:
:func:`vhost_core.bdev.python_adapter.make_python_bdev` wraps an object with
``read``/``write`` (and optional ``flush``/``unmap``/...) methods in a native
``vn_bdev`` served by a worker thread.  ``Bdev.native`` tables are checked against
the core's ``VN_ABI_VERSION`` when the bdev is added to the registry.

Devices do not hold a bdev, they open it (``BdevRegistry.open``, SPDK's descriptor);
the core owns the channels behind the descriptors.

DMA: the iovecs a bdev gets point into guest memory mapped by the daemon.  A bdev
whose hardware reads and writes them itself must have that memory mapped into its
IOMMU first: it listens to the daemon's memory registry (``CommandContext.memory``,
:mod:`vhost_core.memory_registration`), which announces every mapping before a
request can use it and withdraws it only once no request can.

Ownership: the module owns the native memory; ``Bdev.destruct`` frees it and is
called by the registry once every descriptor of the bdev is closed.
"""

from __future__ import annotations

import uuid as uuid_mod
from collections.abc import Iterator
from typing import Any, Callable

import attrs

from vhost_core.bdev.iostat import IoStat

#: bdev_set_qos_limit's limits, in the order of ``enum vn_qos_limit`` (core.h).
QOS_LIMITS = ("rw_ios_per_sec", "rw_mbytes_per_sec", "r_mbytes_per_sec", "w_mbytes_per_sec")

#: I/O types in the order of ``enum vn_io_type``.
IO_TYPES = ("read", "write", "flush", "unmap", "write_zeroes", "reset")


def io_type_mask(types: frozenset[str] | set[str]) -> int:
    """The ``vn_bdev.io_types`` bitmask for a set of I/O type names."""
    return sum(1 << IO_TYPES.index(t) for t in types)


def check_block_size(block_size: int) -> None:
    if block_size < 512 or block_size & (block_size - 1) or block_size > 65536:
        raise ValueError(f"block_size {block_size} is not supported: use a power of two "
                         f"from 512 to 65536 (512 or 4096 are the usual ones)")


@attrs.define(eq=False)
class Bdev:
    """A registered block device.

    Required: ``name``, ``module`` (owning module's name, e.g. ``"malloc"``),
    ``product_name`` (e.g. ``"Malloc disk"``: SCSI shows it as the model),
    ``block_size``, ``num_blocks``, ``native`` (address of ``struct vn_bdev``),
    ``destruct`` (frees ``native``; called exactly once).
    Optional with defaults: ``uuid`` (random), ``io_types`` (read+write),
    ``driver_specific`` ({}), ``readonly`` (False), ``aliases`` ([]), ``drain`` (None).
    Managed by the registry: ``descriptors`` (who has it open, see
    :meth:`BdevRegistry.open <vhost_core.bdev.registry.BdevRegistry.open>`; a device is
    told through its descriptor's callbacks when the bdev is removed or resized) and
    ``claimed_by`` (the controller holding a claim on it).
    """

    name: str
    module: str
    product_name: str
    block_size: int
    num_blocks: int
    native: int
    destruct: Callable[[], None]
    uuid: str = attrs.Factory(lambda: str(uuid_mod.uuid4()))
    io_types: frozenset[str] = frozenset({"read", "write"})
    driver_specific: dict[str, Any] = attrs.Factory(dict)
    readonly: bool = False
    aliases: list[str] = attrs.Factory(list)
    #: Optional: ``drain(wait)`` lets the module finish what it still holds before
    #: ``destruct`` (a worker thread's queue), waiting only through ``wait(seconds)``,
    #: which releases the daemon's control lock meanwhile.  None: destruct is quick.
    drain: Callable[[Callable[[float], Any]], None] | None = None
    #: Open descriptors (BdevDescriptor), oldest first.
    descriptors: list[Any] = attrs.Factory(list)
    #: Set while the registry deletes it (open() refuses it meanwhile).
    deleting: bool = False
    #: bdev_get_iostat: counts of descriptors closed since (folded in when they close),
    #: and what bdev_reset_iostat set aside.
    iostat_retired: IoStat = attrs.Factory(IoStat)
    iostat_base: IoStat | None = None
    #: bdev_set_qos_limit: the limits in SPDK's units (IOPS, MiB/s), 0 = none; managed by
    #: the registry (:meth:`BdevRegistry.set_qos <vhost_core.bdev.registry.BdevRegistry.set_qos>`).
    qos_limits: dict[str, int] = attrs.Factory(lambda: dict.fromkeys(QOS_LIMITS, 0))
    #: The native ``struct vn_qos`` the limits are enforced with (None until first set).
    qos_native: Any = None

    @property
    def claimed_by(self) -> str | None:
        """The owner (controller name) of the descriptor that claims the bdev, if any."""
        for desc in self.descriptors:
            if desc.claim:
                return desc.owner
        return None

    @property
    def size_bytes(self) -> int:
        return self.block_size * self.num_blocks

    def to_json(self) -> dict[str, Any]:
        """The object ``bdev_get_bdevs`` returns, in SPDK's shape."""
        return {
            "name": self.name,
            "aliases": list(self.aliases),
            "product_name": self.product_name,
            "block_size": self.block_size,
            "num_blocks": self.num_blocks,
            "uuid": self.uuid,
            "assigned_rate_limits": dict(self.qos_limits),
            "claimed": self.claimed_by is not None,
            "zoned": False,
            "supported_io_types": {
                **{t: t in self.io_types for t in IO_TYPES},
                "nvme_admin": False, "nvme_io": False,
            },
            "driver_specific": dict(self.driver_specific),
        }


class BdevModule:
    """A bdev backend type (SPDK's ``spdk_bdev_module``): ``name`` is what its bdevs carry
    in ``Bdev.module``.  Subclass it to keep the module's state (open files, threads) on
    the instance rather than in module-level globals; the defaults do nothing.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def config_json(self, bdevs: list[Bdev]) -> list[dict[str, Any]]:
        """The RPC calls that recreate ``bdevs`` (this module's, in creation order) for
        ``save_config``: ``[{"method": "bdev_malloc_create", "params": {...}}, ...]``.
        Default: none (the module's bdevs are not saved)."""
        return []

    def fini(self) -> None:
        """The daemon stops: every bdev (this module's too) is deleted already; release
        what the module itself holds (threads, contexts).  Default: nothing."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


class BdevModuleRegistry:
    """The registered bdev modules, by name (``vhost_register_bdev_modules``)."""

    def __init__(self) -> None:
        self._modules: dict[str, BdevModule] = {}

    def add(self, module: BdevModule) -> BdevModule:
        if not isinstance(module, BdevModule):
            raise TypeError(f"bdev module {module!r} is not a vhost_core.bdev.interface.BdevModule")
        if module.name in self._modules:
            raise ValueError(f"bdev module '{module.name}' is already registered")
        self._modules[module.name] = module
        return module

    def remove(self, name: str) -> None:
        self._modules.pop(name, None)

    def get(self, name: str) -> BdevModule | None:
        return self._modules.get(name)

    def __iter__(self) -> Iterator[BdevModule]:
        return iter(list(self._modules.values()))

    def __contains__(self, name: object) -> bool:
        return name in self._modules
