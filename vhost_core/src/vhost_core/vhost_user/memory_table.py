"""A session's guest memory: the regions SET_MEM_TABLE maps, and who owns the mapping.

Every region the front-end sends is checked and mapped (native ``vn_mem``: the whole
file range checked against the file's size, SIGBUS-guarded) before the table replaces
the previous one; the running rings are stopped around the swap by the session.  The
mapping belongs to the session until it ends, or to the controller when rings it retires
still have requests writing into it (``release``).
"""

from __future__ import annotations

import errno
import os

from vhost_core.log import get_logger
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

    def __init__(self, name: str) -> None:
        self.name = name
        self.native = ffi.NULL
        self.nregions = 0
        #: A SET_MEM_TABLE arrived (even one refused).
        self.seen = False
        self.reported_unshared = False

    def report_unshared(self, what: str) -> None:
        """Say once per session that guest RAM is not shared, and how to share it."""
        if not self.reported_unshared:
            self.reported_unshared = True
            log.error("Controller %s: %s: %s", self.name, what, UNSHARED_MEMORY_HINT)

    def map(self, msg: Message) -> tuple[object, int]:
        """Check SET_MEM_TABLE and map its regions: (the new ``vn_mem``, its region count),
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
        return new, nregions

    def install(self, new: object, nregions: int) -> None:
        """Make ``new`` (from :meth:`map`) the table; the previous one is unmapped (the
        rings using it must be stopped and pointed at the new one first)."""
        old, self.native, self.nregions = self.native, new, nregions
        lib.vn_mem_free(old)
        log.debug("Controller %s: memory table with %d regions", self.name, nregions)

    def check(self) -> None:
        """ProtocolError once a mapping lost its file pages (the front-end shrank a file)."""
        if self.native != ffi.NULL and lib.vn_mem_faulted(self.native):
            raise m.ProtocolError(
                "guest memory lost its backing pages (the front-end shrank a memory file under a "
                "mapped region, SIGBUS); those pages now read as zeros")

    def uva_to_host(self, uva: int, length: int) -> object:
        """Host pointer for [uva, uva+length) wholly inside one region, else NULL."""
        return lib.vn_mem_uva_to_host(self.native, uva, length)

    def release(self) -> object:
        """Hand the mapping to someone else (the controller, for retired rings)."""
        native, self.native = self.native, ffi.NULL
        return native

    def free(self) -> None:
        lib.vn_mem_free(self.release())
