"""Fake guest RAM for vhost-user tests: memfd-backed, shareable with a backend.

Model
-----
A :class:`GuestMemory` is a set of non-overlapping :class:`MemoryRegion`
objects, each with

* a guest-physical address range ``[gpa, gpa + size)`` (what descriptors
  contain),
* a *frontend user address* ``uaddr`` (what ``SET_VRING_ADDR`` carries and what
  ``SET_MEM_TABLE`` pairs with the GPA; a backend must treat it as an opaque
  number that maps into the region),
* a memfd plus ``mmap_offset`` (where in that fd the region starts; the backend
  maps the fd and adds the offset).

By default all regions live in *one* memfd back to back (like QEMU's
``memory-backend-memfd`` split into below-4G / above-4G RAM), so the second
region has a non-zero ``mmap_offset`` and every region carries the same fd.
Pass ``separate_fds=True`` to give each region its own memfd at offset 0.

``uaddr`` is the real address of the frontend's own mmap of the region
(obtained with ctypes), unless ``fake_uaddr_base`` is given, in which case
region *i* gets ``fake_uaddr_base + <cumulative size of previous regions> +
i * 1 GiB`` (distinct, non-contiguous numbers that are not this process's
addresses -- useful to make sure a backend never dereferences them).

Allocation
----------
:meth:`GuestMemory.alloc` is a simple first-fit allocator over the regions (in
order), growing upwards like a bump allocator; :meth:`GuestMemory.free` returns
a block. Allocations never straddle regions. The first page of a region at
GPA 0 is reserved so that GPA 0 is never handed out (a NULL-looking address is
a useful hostile value for tests instead).

Thread safety: none; use from one thread (the backend is another *process* or
thread reading/writing the shared pages concurrently, which is fine).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from dataclasses import dataclass, field
from typing import Sequence

__all__ = ["GuestMemory", "MemoryRegion", "GuestMemoryError", "PAGE_SIZE"]

PAGE_SIZE = mmap.PAGESIZE
MiB = 1 << 20
GiB = 1 << 30


class GuestMemoryError(Exception):
    """Access outside guest RAM, allocation failure, bad layout."""


@dataclass(eq=False)
class MemoryRegion:
    """One guest RAM region (see module docstring).

    Attributes:
        gpa: guest-physical start address.
        size: length in bytes (multiple of the page size).
        uaddr: frontend user address of the region start (opaque to backends).
        fd: memfd backing the region (owned by the :class:`GuestMemory`).
        mmap_offset: offset of the region inside ``fd``.
        mm: this process's mapping of exactly the region.
    """

    gpa: int
    size: int
    uaddr: int
    fd: int
    mmap_offset: int
    mm: mmap.mmap = field(repr=False)
    # allocator state: sorted list of free [start, end) GPA extents
    _free: list = field(default_factory=list, repr=False)

    @property
    def end(self) -> int:
        """First GPA after the region."""
        return self.gpa + self.size

    def contains(self, gpa: int, length: int = 1) -> bool:
        """True if ``[gpa, gpa+length)`` lies entirely inside this region."""
        return self.gpa <= gpa and gpa + length <= self.end

    def pack(self) -> bytes:
        """32-byte vhost-user memory region description
        ``{u64 guest_addr, u64 size, u64 user_addr, u64 mmap_offset}``."""
        return struct.pack("=QQQQ", self.gpa, self.size, self.uaddr, self.mmap_offset)


def _mmap_address(mm: mmap.mmap) -> int:
    """Address of an mmap object's buffer (the export is released at once)."""
    c = ctypes.c_char.from_buffer(mm)
    try:
        return ctypes.addressof(c)
    finally:
        del c


class GuestMemory:
    """memfd-backed guest RAM with one or more regions.

    Args:
        regions: ``[(gpa, size), ...]``; sizes are rounded up to pages, GPAs must
            be page aligned, regions must not overlap. At most 8 regions are
            accepted by ``SET_MEM_TABLE`` but more can be created here (for
            hostile tests).
        separate_fds: one memfd per region (``mmap_offset == 0``) instead of
            one shared memfd (default, non-zero offsets for regions 1..n).
        fake_uaddr_base: use synthetic user addresses (see module docs).
        name: memfd name (visible in /proc/<pid>/fd of the backend).

    Example::

        mem = GuestMemory.pc_like(16 << 20)      # 8 MiB @0 + 8 MiB @4 GiB
        buf = mem.alloc(4096, align=512)
        mem.write(buf, b"x" * 4096)
        assert mem.read(buf, 1) == b"x"
        mem.close()
    """

    def __init__(
        self,
        regions: Sequence[tuple[int, int]],
        *,
        separate_fds: bool = False,
        fake_uaddr_base: int | None = None,
        name: str = "vhost-test-guest-ram",
    ) -> None:
        if not regions:
            raise GuestMemoryError("at least one region is required")
        spec = []
        for gpa, size in regions:
            if gpa % PAGE_SIZE:
                raise GuestMemoryError(f"region gpa {gpa:#x} is not page aligned")
            if size <= 0:
                raise GuestMemoryError("region size must be > 0")
            size = -(-size // PAGE_SIZE) * PAGE_SIZE
            spec.append((gpa, size))
        ordered = sorted(spec)
        for (a, asz), (b, _) in zip(ordered, ordered[1:]):
            if a + asz > b:
                raise GuestMemoryError(f"regions at {a:#x} and {b:#x} overlap")

        self.regions: list[MemoryRegion] = []
        self._allocs: dict[int, tuple[MemoryRegion, int, int]] = {}
        self._fds: list[int] = []
        self._closed = False
        try:
            shared_fd = None
            if not separate_fds:
                shared_fd = os.memfd_create(name, os.MFD_CLOEXEC)
                self._fds.append(shared_fd)
                os.ftruncate(shared_fd, sum(s for _, s in spec))
            file_off = 0
            fake_next = fake_uaddr_base
            for gpa, size in spec:  # keep caller's order (it defines the table order)
                if separate_fds:
                    fd = os.memfd_create(name, os.MFD_CLOEXEC)
                    self._fds.append(fd)
                    os.ftruncate(fd, size)
                    off = 0
                else:
                    fd = shared_fd
                    off = file_off
                    file_off += size
                mm = mmap.mmap(fd, size, mmap.MAP_SHARED,
                               mmap.PROT_READ | mmap.PROT_WRITE, offset=off)
                if fake_next is None:
                    uaddr = _mmap_address(mm)
                else:
                    uaddr = fake_next
                    fake_next += size + GiB
                r = MemoryRegion(gpa=gpa, size=size, uaddr=uaddr, fd=fd,
                                 mmap_offset=off, mm=mm)
                start = gpa if gpa != 0 else PAGE_SIZE
                if start < r.end:
                    r._free.append([start, r.end])
                self.regions.append(r)
        except BaseException:
            self.close()
            raise

    # -- constructors ------------------------------------------------------

    @classmethod
    def pc_like(cls, size: int = 16 * MiB, **kw) -> "GuestMemory":
        """Two regions like a PC's RAM split around the 32-bit PCI hole:
        ``size/2`` at GPA 0 and ``size/2`` at GPA 4 GiB."""
        half = max(PAGE_SIZE, (size // 2) // PAGE_SIZE * PAGE_SIZE)
        return cls([(0, half), (4 * GiB, half)], **kw)

    @classmethod
    def single(cls, size: int = 16 * MiB, gpa: int = 0, **kw) -> "GuestMemory":
        """One contiguous region."""
        return cls([(gpa, size)], **kw)

    # -- lookup ------------------------------------------------------------

    @property
    def size(self) -> int:
        """Total RAM bytes."""
        return sum(r.size for r in self.regions)

    def region_of(self, gpa: int) -> MemoryRegion:
        """Region containing ``gpa``; raises :class:`GuestMemoryError`."""
        for r in self.regions:
            if r.gpa <= gpa < r.end:
                return r
        raise GuestMemoryError(f"gpa {gpa:#x} is not guest RAM")

    def uaddr(self, gpa: int) -> int:
        """Frontend user address corresponding to ``gpa`` (for SET_VRING_ADDR)."""
        r = self.region_of(gpa)
        return r.uaddr + (gpa - r.gpa)

    def gpa_of_uaddr(self, uaddr: int) -> int:
        """Inverse of :meth:`uaddr`."""
        for r in self.regions:
            if r.uaddr <= uaddr < r.uaddr + r.size:
                return r.gpa + (uaddr - r.uaddr)
        raise GuestMemoryError(f"uaddr {uaddr:#x} is not in any region")

    def fds(self) -> list[int]:
        """One fd per region, in region order (what SET_MEM_TABLE sends)."""
        return [r.fd for r in self.regions]

    def _pieces(self, gpa: int, n: int):
        """Yield (region, offset, length) covering [gpa, gpa+n); contiguous
        regions may be crossed."""
        if n < 0:
            raise GuestMemoryError("negative length")
        while n > 0:
            r = self.region_of(gpa)
            off = gpa - r.gpa
            chunk = min(n, r.size - off)
            yield r, off, chunk
            gpa += chunk
            n -= chunk

    # -- access ------------------------------------------------------------

    def read(self, gpa: int, n: int) -> bytes:
        """Copy ``n`` bytes from guest RAM."""
        if n == 0:
            return b""
        parts = [r.mm[off:off + ln] for r, off, ln in self._pieces(gpa, n)]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` into guest RAM."""
        data = memoryview(data).cast("B")
        pos = 0
        for r, off, ln in self._pieces(gpa, len(data)):
            r.mm[off:off + ln] = data[pos:pos + ln]
            pos += ln

    def fill(self, gpa: int, n: int, byte: int = 0) -> None:
        """Set ``n`` bytes to ``byte``."""
        for r, off, ln in self._pieces(gpa, n):
            r.mm[off:off + ln] = bytes([byte]) * ln

    def read_u16(self, gpa: int) -> int:
        return struct.unpack("<H", self.read(gpa, 2))[0]

    def read_u32(self, gpa: int) -> int:
        return struct.unpack("<I", self.read(gpa, 4))[0]

    def read_u64(self, gpa: int) -> int:
        return struct.unpack("<Q", self.read(gpa, 8))[0]

    def write_u16(self, gpa: int, v: int) -> None:
        self.write(gpa, struct.pack("<H", v & 0xFFFF))

    def write_u32(self, gpa: int, v: int) -> None:
        self.write(gpa, struct.pack("<I", v & 0xFFFFFFFF))

    def write_u64(self, gpa: int, v: int) -> None:
        self.write(gpa, struct.pack("<Q", v & 0xFFFFFFFFFFFFFFFF))

    # -- allocation --------------------------------------------------------

    def alloc(self, size: int, align: int = 8, *, region: int | None = None,
              zero: bool = True) -> int:
        """Allocate ``size`` bytes aligned to ``align`` (power of two); return
        the GPA. ``region`` restricts to ``self.regions[region]``. The block
        is zero-filled unless ``zero=False``. Raises :class:`GuestMemoryError`
        when out of memory."""
        if size <= 0:
            raise GuestMemoryError("alloc size must be > 0")
        if align <= 0 or align & (align - 1):
            raise GuestMemoryError("align must be a power of two")
        cands = self.regions if region is None else [self.regions[region]]
        for r in cands:
            for i, ext in enumerate(r._free):
                start = (ext[0] + align - 1) & ~(align - 1)
                if start + size <= ext[1]:
                    # split the extent: [ext0,start) stays, [start+size,ext1) stays
                    tail = [start + size, ext[1]]
                    repl = []
                    if start > ext[0]:
                        repl.append([ext[0], start])
                    if tail[0] < tail[1]:
                        repl.append(tail)
                    r._free[i:i + 1] = repl
                    self._allocs[start] = (r, start, size)
                    if zero:
                        self.fill(start, size)
                    return start
        raise GuestMemoryError(f"out of guest memory allocating {size} bytes")

    def free(self, gpa: int) -> None:
        """Return a block obtained from :meth:`alloc`."""
        try:
            r, start, size = self._allocs.pop(gpa)
        except KeyError:
            raise GuestMemoryError(f"{gpa:#x} was not allocated") from None
        end = start + size
        fl = r._free
        i = 0
        while i < len(fl) and fl[i][0] < start:
            i += 1
        fl.insert(i, [start, end])
        # coalesce with neighbours
        if i + 1 < len(fl) and fl[i][1] == fl[i + 1][0]:
            fl[i][1] = fl[i + 1][1]
            del fl[i + 1]
        if i > 0 and fl[i - 1][1] == fl[i][0]:
            fl[i - 1][1] = fl[i][1]
            del fl[i]

    def alloc_bytes(self, data: bytes, align: int = 8, **kw) -> int:
        """Allocate ``len(data)`` bytes, copy ``data`` in, return the GPA."""
        gpa = self.alloc(max(1, len(data)), align, zero=False, **kw)
        self.write(gpa, data)
        return gpa

    @property
    def allocated(self) -> int:
        """Bytes currently allocated (leak checks in tests)."""
        return sum(s for _, _, s in self._allocs.values())

    # -- lifetime ----------------------------------------------------------

    def close(self) -> None:
        """Unmap and close the memfds (idempotent). The backend keeps its own
        mapping alive until it unmaps."""
        if self._closed:
            return
        self._closed = True
        for r in getattr(self, "regions", []):
            try:
                r.mm.close()
            except BufferError:  # pragma: no cover - exported views remain
                pass
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "GuestMemory":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        rs = ", ".join(f"[{r.gpa:#x}+{r.size:#x} off={r.mmap_offset:#x}]" for r in self.regions)
        return f"GuestMemory({rs})"

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

