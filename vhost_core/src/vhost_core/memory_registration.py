"""Memory registration: telling DMA-capable backends which host memory may be DMA'd.

A bdev whose device reads and writes memory itself (a PCIe NVMe SSD driven from
userspace through VFIO, an RDMA NIC) can only be handed buffers that were made known
to its IOMMU (``VFIO_IOMMU_MAP_DMA``) or NIC beforehand.  The buffers the core hands a
bdev are guest memory: iovecs of host virtual addresses inside the regions a
front-end's memory table made the daemon map.  So the core tells every *listener*
when such a mapping appears and before it goes, as SPDK does with
``spdk_mem_register`` / ``spdk_mem_unregister`` and the ``notify_cb`` of a
``spdk_mem_map``.

The contract:

- A *region* is one mapping of the daemon, ``(vaddr, length)``: host virtual address
  and length, both page-aligned (the file's page size: 4 KiB, or the huge page size on
  hugetlbfs).  It is the whole ``mmap`` of a front-end's memory region (its
  ``map_base``/``map_len`` in ``struct vn_region``), so every iovec a device builds
  from that region lies inside it.
- ``mem_register(vaddr, length)`` is called after the region is mapped and *before*
  any ring can translate a request into it (SET_MEM_TABLE, ADD_MEM_REG).
- ``mem_unregister(vaddr, length)`` is called *before* the region is unmapped and
  only once no request that could point into it is in flight: a new SET_MEM_TABLE
  stops the rings first; a region removed by REM_MEM_REG waits in the session's
  graveyard until every ring has been idle; a session whose requests outlived it hands
  its mappings to its controller, which unregisters them once those requests
  complete.  So a listener may tear its mapping down at once (``VFIO_IOMMU_UNMAP_DMA``).
- ``listen(listener)`` replays ``mem_register`` for every region registered already,
  so a backend attached while guests run sees their memory; if the replay fails, the
  regions it did register are unregistered again and the error is raised (the attach
  fails, nothing half-registered).  ``unlisten(listener)`` calls ``mem_unregister``
  for each registered region (the listener releases its mappings) and forgets it.
- A listener that raises from ``mem_register`` at run time does not stop the memory
  table (other backends and other tenants keep working): the error is logged, and the
  listener must make I/O into that region fail (or bounce it), never hang.
- Calls are serialised (one lock), on the control plane's threads (the vhost-user
  session thread under the daemon's control lock, or an RPC): never on a reactor.
  They may take a while (pinning pages), never block on the data path.

The natural identity mapping for an IOMMU is IOVA = host virtual address (SPDK's
"VA mode"): the iovecs a bdev receives then *are* bus addresses, and PRP lists or
SGLs are built from them without any lookup.

Where a plugin gets the registry: ``CommandContext.memory`` (a command that attaches a
DMA-capable device calls ``ctx.memory.listen(...)``, its detach ``unlisten``).
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

from vhost_core.log import get_logger

log = get_logger("vhost")


class MemoryListener(Protocol):
    """What a DMA-capable backend implements (SPDK's ``spdk_mem_map_ops.notify_cb``)."""

    def mem_register(self, vaddr: int, length: int) -> None:
        """Make [vaddr, vaddr+length) DMA-able (e.g. VFIO_IOMMU_MAP_DMA, iova=vaddr).
        Raise (OSError naming the cause) when it cannot."""

    def mem_unregister(self, vaddr: int, length: int) -> None:
        """The region goes: tear the mapping down.  Must not raise."""


class MemoryRegistry:
    """The daemon's registered memory regions and the listeners told about them."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        #: vaddr -> length of every registered region.
        self._regions: dict[int, int] = {}
        self._listeners: list[Any] = []

    # ------------------------------------------------------------ regions

    def register(self, vaddr: int, length: int) -> None:
        """A mapping appeared: tell every listener (failures are logged, see the module)."""
        if length <= 0:
            return
        with self._lock:
            if vaddr in self._regions:
                # A mapping at this address was freed without being unregistered (a bug): the
                # listeners' view must follow the new one, never refuse guest memory for it.
                log.error("memory registration: %#x was still registered when mapped again; "
                          "replacing it", vaddr)
                self.unregister(vaddr, self._regions[vaddr])
            self._regions[vaddr] = length
            for listener in list(self._listeners):
                try:
                    listener.mem_register(vaddr, length)
                except Exception as exc:    # one backend's failure is its own
                    log.error("memory registration: %r cannot map %#x..%#x for DMA: %s; I/O of that "
                              "backend into this memory fails", listener, vaddr, vaddr + length, exc)

    def unregister(self, vaddr: int, length: int) -> None:
        """A mapping goes (no I/O can reference it any more): tell every listener.
        A region never registered (an inflight buffer, an empty table) is ignored."""
        with self._lock:
            if self._regions.get(vaddr) != length:
                return
            del self._regions[vaddr]
            for listener in reversed(self._listeners):
                try:
                    listener.mem_unregister(vaddr, length)
                except Exception as exc:
                    log.error("memory registration: %r failed to unmap %#x..%#x: %s", listener, vaddr,
                              vaddr + length, exc)

    def regions(self) -> list[tuple[int, int]]:
        """The registered regions, (vaddr, length), by address."""
        with self._lock:
            return sorted(self._regions.items())

    # ------------------------------------------------------------ listeners

    def listen(self, listener: MemoryListener) -> None:
        """Add a listener and register every current region with it (all or nothing)."""
        with self._lock:
            if any(x is listener for x in self._listeners):
                raise ValueError(f"{listener!r} listens already")
            done: list[tuple[int, int]] = []
            try:
                for vaddr, length in sorted(self._regions.items()):
                    listener.mem_register(vaddr, length)
                    done.append((vaddr, length))
            except BaseException:
                for vaddr, length in reversed(done):
                    try:
                        listener.mem_unregister(vaddr, length)
                    except Exception:
                        pass
                raise
            self._listeners.append(listener)

    def unlisten(self, listener: MemoryListener) -> None:
        """Unregister every region with ``listener`` and forget it (no-op if unknown)."""
        with self._lock:
            if not any(x is listener for x in self._listeners):
                return
            self._listeners = [x for x in self._listeners if x is not listener]
            for vaddr, length in sorted(self._regions.items(), reverse=True):
                try:
                    listener.mem_unregister(vaddr, length)
                except Exception as exc:
                    log.error("memory registration: %r failed to unmap %#x..%#x: %s", listener, vaddr,
                              vaddr + length, exc)

    # ------------------------------------------------------------ native tables

    def register_mem(self, mem: Any, first: int = 0) -> None:
        """Register the regions of a native ``struct vn_mem`` from index ``first`` on."""
        from vhost_core.native import ffi

        if mem == ffi.NULL:
            return
        for i in range(first, mem.nregions):
            r = mem.regions[i]
            self.register(int(ffi.cast("uintptr_t", r.map_base)), int(r.map_len))

    def unregister_mem(self, mem: Any) -> None:
        """Unregister every region of a native ``struct vn_mem`` (call before freeing it)."""
        from vhost_core.native import ffi

        if mem == ffi.NULL:
            return
        for i in range(mem.nregions):
            r = mem.regions[i]
            self.unregister(int(ffi.cast("uintptr_t", r.map_base)), int(r.map_len))

    def free_mem(self, mem: Any) -> None:
        """Unregister, then unmap and free, a native ``struct vn_mem``."""
        from vhost_core.native import lib

        self.unregister_mem(mem)
        lib.vn_mem_free(mem)
