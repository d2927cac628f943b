"""A session's guest memory: the regions SET_MEM_TABLE maps (or ADD_MEM_REG and
REM_MEM_REG add and remove one by one, memory hot-plug), and who owns the mappings.

Every region the front-end sends is checked and mapped (native ``vn_mem``: the whole
file range checked against the file's size, SIGBUS-guarded) before the table replaces
the previous one.  SET_MEM_TABLE replaces everything: the session stops the running
rings around the swap.  ADD_MEM_REG and REM_MEM_REG keep the rings running: a new table
is made beside the old one and each ring switches to it between two reactor iterations;
a removed region stays mapped (``graveyard``) until no request fetched before the
switch can still write into it.  The mappings belong to the session until it ends, or
to the controller when rings it retires still have requests writing into them
(``release``).

Every region mapped is registered with the daemon's memory registry
(:mod:`vhost_core.memory_registration`) before a ring can translate into it, and
unregistered just before it is unmapped, once no request can point into it any more:
that is how DMA-capable backends (VFIO) learn what to map into their IOMMU.
"""

from __future__ import annotations

import errno
import os

from vhost_core.log import get_logger
from vhost_core.memory_registration import MemoryRegistry
from vhost_core.native import ffi, lib
from vhost_core.vhost_user import messages as m
from vhost_core.vhost_user.connection import Message

log = get_logger("vhost_user")

UNSHARED_MEMORY_HINT = (
    "guest memory is not shared with the vhost target: start QEMU with "
    "`-object memory-backend-memfd,id=mem,size=<RAM size>,share=on -numa node,memdev=mem` "
    "(or memory-backend-file with mem-path=/dev/hugepages and share=on)")

#: What vn_mem_add_region's errors mean for a memory region the front-end sent.
REGION_ERROR_HINTS = {
    errno.ERANGE: " (region lies past the end of its file)",
    errno.EBADFD: " (not a regular file: guest RAM must be a memfd, hugetlbfs or tmpfs file)",
    errno.EMEDIUMTYPE: (" (the file is on a filesystem that could stall the data path on page faults, "
                        "such as FUSE or NFS: back guest RAM with memory-backend-memfd, hugetlbfs or "
                        "/dev/shm)"),
    errno.EINVAL: " (offset or size not aligned to the file's page size: hugetlbfs needs huge-page alignment)",
}


class MemoryTable:
    """The guest memory of one session (``native``: its ``struct vn_mem``, or NULL)."""

    def __init__(self, name: str, registry: MemoryRegistry | None = None) -> None:
        self.name = name
        #: Where mappings are registered for DMA (the daemon's; a private one if none).
        self.registry = registry if registry is not None else MemoryRegistry()
        self.native = ffi.NULL
        self.nregions = 0
        #: The regions as the front-end described them, in table order.
        self.regions: list[m.MemoryRegion] = []
        #: Removed regions still mapped (native vn_mem each), for requests in flight.
        self.graveyard: list[object] = []
        #: A SET_MEM_TABLE arrived (even one refused).
        self.seen = False
        self.reported_unshared = False

    def report_unshared(self, what: str) -> None:
        """Say once per session that guest RAM is not shared, and how to share it."""
        if not self.reported_unshared:
            self.reported_unshared = True
            log.error("Controller %s: %s: %s", self.name, what, UNSHARED_MEMORY_HINT)

    def map(self, msg: Message) -> tuple[object, list[m.MemoryRegion]]:
        """Check SET_MEM_TABLE and map its regions: (the new ``vn_mem``, its regions),
        not installed yet.  ProtocolError drops the connection, ValueError refuses it."""
        if len(msg.payload) < m.MEM_HEADER.size:
            raise m.ProtocolError("SET_MEM_TABLE payload shorter than its header")
        nregions, _pad = m.MEM_HEADER.unpack_from(msg.payload)
        if nregions > m.MAX_MEM_REGIONS:
            raise m.ProtocolError(f"SET_MEM_TABLE with {nregions} regions (at most {m.MAX_MEM_REGIONS})")
        expected = m.MEM_HEADER.size + nregions * m.MEM_REGION.size
        # QEMU always sends the full 8-region array; accept the exact or full size.
        full = m.MEM_HEADER.size + m.MAX_MEM_REGIONS * m.MEM_REGION.size
        if len(msg.payload) not in (expected, full):
            raise m.ProtocolError(f"SET_MEM_TABLE payload is {len(msg.payload)} bytes for {nregions} regions")
        self.seen = True
        if nregions == 0:
            self.report_unshared("the memory table has no regions")
            raise ValueError("memory table has no regions")
        if len(msg.fds) != nregions:
            if not self.reported_unshared:
                self.reported_unshared = True
                log.error("Controller %s: memory table has %d regions but %d file descriptors: %s",
                          self.name, nregions, len(msg.fds), UNSHARED_MEMORY_HINT)
            raise m.ProtocolError("memory regions without file descriptors")
        regions = [m.MemoryRegion(*m.MEM_REGION.unpack_from(msg.payload, m.MEM_HEADER.size + i * m.MEM_REGION.size))
                   for i in range(nregions)]
        new = lib.vn_mem_new()
        try:
            for r, fd in zip(regions, msg.fds):
                rc = lib.vn_mem_add_region(new, fd, r.guest_phys_addr, r.memory_size,
                                           r.userspace_addr, r.mmap_offset)
                if rc < 0:
                    raise m.ProtocolError(
                        f"cannot map memory region gpa={r.guest_phys_addr:#x} size={r.memory_size:#x} "
                        f"offset={r.mmap_offset:#x}: {os.strerror(-rc)}" + REGION_ERROR_HINTS.get(-rc, ""))
        except BaseException:
            lib.vn_mem_free(new)
            raise
        self.registry.register_mem(new)
        return new, regions

    def discard(self, new: object) -> None:
        """Free a table from :meth:`map` that was never installed."""
        self.registry.free_mem(new)

    def install(self, new: object, regions: list[m.MemoryRegion]) -> None:
        """Make ``new`` (from :meth:`map`, :meth:`with_region` or :meth:`without_region`)
        the table; the previous one is freed (the rings using it must be pointed at the
        new one first; after with/without_region it is an empty shell)."""
        old, self.native = self.native, new
        self.regions = list(regions)
        self.nregions = len(regions)
        self.registry.free_mem(old)
        log.debug("Controller %s: memory table with %d regions", self.name, self.nregions)

    @staticmethod
    def region_message(msg: Message) -> m.MemoryRegion:
        """The region of an ADD_MEM_REG / REM_MEM_REG payload (u64 padding, then the region)."""
        if len(msg.payload) != 8 + m.MEM_REGION.size:
            raise m.ProtocolError(f"{m.Request(msg.request).name} payload is {len(msg.payload)} bytes, "
                                  f"expected {8 + m.MEM_REGION.size}")
        return m.MemoryRegion(*m.MEM_REGION.unpack_from(msg.payload, 8))

    def with_region(self, msg: Message) -> tuple[object, m.MemoryRegion] | None:
        """Check ADD_MEM_REG and map its region: (the new table, the region), not
        installed yet; None when that very region is already there (QEMU re-sends
        its regions after a reconnect)."""
        r = self.region_message(msg)
        if len(msg.fds) != 1:
            raise m.ProtocolError(f"ADD_MEM_REG carries {len(msg.fds)} file descriptors, expected 1")
        self.seen = True
        if r in self.regions:
            return None
        if r.memory_size == 0:
            raise m.ProtocolError("ADD_MEM_REG with an empty region")
        err = ffi.new("int *")
        base = self.native if self.native != ffi.NULL else lib.vn_mem_new()
        new = lib.vn_mem_with_region(base, msg.fds[0], r.guest_phys_addr, r.memory_size, r.userspace_addr,
                                     r.mmap_offset, err)
        if base != self.native:
            lib.vn_mem_free(base)
        if new == ffi.NULL:
            what = {errno.EEXIST: " (it overlaps a region already mapped)",
                    errno.E2BIG: f" (all {lib.VN_MAX_REGIONS} memory slots are in use)"}.get(-err[0], "")
            raise m.ProtocolError(
                f"cannot add memory region gpa={r.guest_phys_addr:#x} size={r.memory_size:#x} "
                f"offset={r.mmap_offset:#x}: {os.strerror(-err[0])}"
                + (what or REGION_ERROR_HINTS.get(-err[0], "")))
        self.registry.register_mem(new, new.nregions - 1)
        return new, r

    def without_region(self, msg: Message) -> tuple[object, object, m.MemoryRegion]:
        """Check REM_MEM_REG: (the new table, the removed region's still-mapped vn_mem,
        the region), not installed yet.  ValueError when no such region is mapped."""
        r = self.region_message(msg)
        if len(msg.fds) > 1:
            raise m.ProtocolError(f"REM_MEM_REG carries {len(msg.fds)} file descriptors, expected 0 or 1")
        if r not in self.regions or self.native == ffi.NULL:
            raise ValueError(f"no memory region gpa={r.guest_phys_addr:#x} size={r.memory_size:#x} is mapped")
        err = ffi.new("int *")
        gone = ffi.new("struct vn_mem **")
        new = lib.vn_mem_without_region(self.native, r.guest_phys_addr, r.memory_size, r.userspace_addr,
                                        gone, err)
        if new == ffi.NULL:
            raise ValueError(f"cannot remove memory region gpa={r.guest_phys_addr:#x}: {os.strerror(-err[0])}")
        return new, gone[0], r

    def free_graveyard(self) -> None:
        for mem in self.graveyard:
            self.registry.free_mem(mem)
        self.graveyard.clear()

    def check(self) -> None:
        """ProtocolError once a mapping lost its file pages (the front-end shrank a file)."""
        if self.native != ffi.NULL and lib.vn_mem_faulted(self.native):
            raise m.ProtocolError(
                "guest memory lost its backing pages (the front-end shrank a memory file under a "
                "mapped region, SIGBUS); those pages now read as zeros")

    def uva_to_host(self, uva: int, length: int) -> object:
        """Host pointer for [uva, uva+length) wholly inside one region, else NULL."""
        return lib.vn_mem_uva_to_host(self.native, uva, length)

    def release(self) -> list:
        """Hand the mappings to someone else (the controller, for retired rings)."""
        native, self.native = self.native, ffi.NULL
        out, self.graveyard = [native] + self.graveyard, []
        self.regions = []
        return out

    def free(self) -> None:
        for mem in self.release():
            self.registry.free_mem(mem)
