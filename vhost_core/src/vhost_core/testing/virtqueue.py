"""Driver side of a VIRTIO 1.x *split* virtqueue living in :class:`GuestMemory`
(and, at the end, :class:`PackedVirtqueue`: the same interface over a packed ring).

Layout (all little-endian, in guest memory)::

    desc  table: size * {le64 addr, le32 len, le16 flags, le16 next}   align 16
    avail ring : le16 flags, le16 idx, le16 ring[size], le16 used_event align 2
    used  ring : le16 flags, le16 idx, {le32 id, le32 len}[size],
                 le16 avail_event                                       align 4

``used_event`` / ``avail_event`` are only meaningful with
``VIRTIO_RING_F_EVENT_IDX``.

Typical use (the frontend does the vhost-user part)::

    vq = SplitVirtqueue(mem, 128, event_idx=True)
    head = vq.add_chain([(hdr_gpa, 16, False), (buf_gpa, 512, True)])
    vq.kick()
    for head, length in vq.wait_used(timeout=5):
        ...

Hostile tests can bypass the bookkeeping with the raw accessors
(:meth:`SplitVirtqueue.write_desc`, :meth:`~SplitVirtqueue.push_head`,
:meth:`~SplitVirtqueue.set_avail_idx`, ...). Use
:meth:`~SplitVirtqueue.reserve_descs` to take descriptor slots out of the
allocator before crafting them by hand.

Strictness: by default (``strict=True``) the queue raises
:class:`VirtqueueError` when the *device* misbehaves (unknown head in the used
ring, used.idx moving by more than the number of outstanding chains, used
length larger than the writable space). Set ``strict=False`` to collect those
problems in :attr:`SplitVirtqueue.errors` instead.

Memory ordering: the driver publishes descriptors, then the avail ring entry,
then (after a full barrier) avail.idx, and uses a full barrier before reading
the notification-suppression fields, as required by the spec. Python has no
fence primitive; :func:`mb` acquires/releases a lock (an atomic RMW, i.e. a full
barrier on x86/arm64).
"""

from __future__ import annotations

import os
import select
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from .constants import (
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
)
from .memory import GuestMemory

__all__ = [
    "SplitVirtqueue",
    "VirtqueueError",
    "UsedElem",
    "Buffer",
    "vring_need_event",
    "mb",
    "split_ring_sizes",
    "PackedVirtqueue",
    "packed_vring_base",
    "VRING_PACKED_DESC_F_AVAIL",
    "VRING_PACKED_DESC_F_USED",
    "VRING_PACKED_EVENT_F_ENABLE",
    "VRING_PACKED_EVENT_F_DISABLE",
    "VRING_PACKED_EVENT_F_DESC",
]

_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")
_barrier_lock = threading.Lock()


def mb() -> None:
    """Full memory barrier (best effort from Python, see module docs)."""
    _barrier_lock.acquire()
    _barrier_lock.release()


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """The spec's ``vring_need_event``: True if moving the index from
    ``old_idx`` to ``new_idx`` crossed ``event_idx`` (all mod 2**16)."""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


def split_ring_sizes(size: int) -> tuple[int, int, int]:
    """Byte sizes (desc, avail, used) of a split ring with ``size`` entries,
    event-idx fields included."""
    return 16 * size, 6 + 2 * size, 6 + 8 * size


class VirtqueueError(Exception):
    """The device (backend) violated the split-ring protocol, or the driver
    side ran out of descriptors."""


#: A buffer of a chain: ``(gpa, length, device_writable)``.
Buffer = tuple  # (int, int, bool)


class UsedElem(tuple):
    """A used-ring completion: behaves as the tuple ``(head, len)``, and also
    carries ``.token`` (what was passed to :meth:`SplitVirtqueue.add_chain`)."""

    def __new__(cls, head: int, length: int, token: Any = None):
        self = super().__new__(cls, (head, length))
        self.token = token
        return self

    @property
    def head(self) -> int:
        return self[0]

    @property
    def len(self) -> int:
        return self[1]

    def __repr__(self) -> str:
        return f"UsedElem(head={self[0]}, len={self[1]})"


@dataclass
class _Chain:
    head: int
    descs: list[int]
    indirect_gpa: int | None
    writable: int
    token: Any = None


@dataclass(eq=False, repr=False)
class SplitVirtqueue:
    """Driver side of a split virtqueue.

    Args:
        mem: guest memory holding the rings (and indirect tables).
        size: number of entries (power of two per spec; not enforced so
            hostile tests can try odd sizes).
        index: vring index (only informational here; used by the frontend).
        event_idx: use VIRTIO_RING_F_EVENT_IDX semantics (must match what was
            negotiated with the device).
        region: allocate rings in ``mem.regions[region]`` (default: first fit).
        legacy_layout: one 4096-aligned block with the used ring on the next
            4096 boundary (legacy virtio layout) instead of the minimal
            virtio 1.x alignments (16/2/4).
        desc_gpa, avail_gpa, used_gpa: place the rings yourself (nothing is
            allocated then; all three must be given).
        start_idx: initial avail.idx / used.idx (pair with SET_VRING_BASE).
        strict: raise on device protocol violations (see module docs).

    Attributes:
        kick_fd: eventfd the driver writes to notify the device (send with
            SET_VRING_KICK).
        call_fd: eventfd the device writes to interrupt the driver (send with
            SET_VRING_CALL).
        avail_idx: shadow of the driver's avail.idx (free-running, mod 2**16).
        last_used_idx: next used-ring index the driver will consume.
        errors: device protocol violations seen in non-strict mode.
        kicks: number of eventfd kicks actually sent.
    """

    mem: GuestMemory
    size: int
    index: int = 0
    event_idx: bool = False
    region: int | None = None
    legacy_layout: bool = False
    desc_gpa: int | None = None
    avail_gpa: int | None = None
    used_gpa: int | None = None
    start_idx: int = 0
    strict: bool = True
    kick_fd: int = field(default=-1, init=False)
    call_fd: int = field(default=-1, init=False)
    avail_idx: int = field(default=0, init=False)
    last_used_idx: int = field(default=0, init=False)
    errors: list = field(default_factory=list, init=False)
    kicks: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if not 0 < self.size <= 0x10000:
            raise ValueError(f"bad queue size {self.size}")
        self._owned_allocs: list[int] = []
        dsz, asz, usz = split_ring_sizes(self.size)
        given = (self.desc_gpa, self.avail_gpa, self.used_gpa)
        if all(g is not None for g in given):
            pass
        elif any(g is not None for g in given):
            raise ValueError("give all of desc_gpa/avail_gpa/used_gpa or none")
        elif self.legacy_layout:
            used_off = (dsz + asz + 4095) & ~4095
            base = self.mem.alloc(used_off + usz, 4096, region=self.region)
            self._owned_allocs.append(base)
            self.desc_gpa, self.avail_gpa, self.used_gpa = base, base + dsz, base + used_off
        else:
            self.desc_gpa = self.mem.alloc(dsz, 16, region=self.region)
            self.avail_gpa = self.mem.alloc(asz, 2, region=self.region)
            self.used_gpa = self.mem.alloc(usz, 4, region=self.region)
            self._owned_allocs += [self.desc_gpa, self.avail_gpa, self.used_gpa]
        self._free: list[int] = list(range(self.size - 1, -1, -1))  # stack
        self._chains: dict[int, _Chain] = {}
        self.avail_idx = self.start_idx & 0xFFFF
        self.last_used_idx = self.start_idx & 0xFFFF
        self._kicked_idx = self.avail_idx
        self.mem.write_u16(self.avail_gpa, 0)
        self.mem.write_u16(self.avail_gpa + 2, self.avail_idx)
        self.mem.write_u16(self.used_gpa, 0)
        self.mem.write_u16(self.used_gpa + 2, self.avail_idx)
        self.kick_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.call_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        if self.event_idx:
            self.used_event = self.last_used_idx

    # ------------------------------------------------------------------
    # addresses of ring fields
    # ------------------------------------------------------------------

    def desc_addr(self, i: int) -> int:
        """GPA of descriptor ``i`` (no bounds check: hostile tests may want
        out-of-table addresses)."""
        return self.desc_gpa + 16 * i

    @property
    def used_event_gpa(self) -> int:
        return self.avail_gpa + 4 + 2 * self.size

    @property
    def avail_event_gpa(self) -> int:
        return self.used_gpa + 4 + 8 * self.size

    def uaddrs(self) -> tuple[int, int, int]:
        """Frontend user addresses ``(desc, used, avail)`` -- the order of the
        SET_VRING_ADDR payload fields."""
        m = self.mem
        return m.uaddr(self.desc_gpa), m.uaddr(self.used_gpa), m.uaddr(self.avail_gpa)

    # ------------------------------------------------------------------
    # raw accessors (hostile tests)
    # ------------------------------------------------------------------

    def write_desc(self, i: int, addr: int, length: int, flags: int = 0, next: int = 0,
                   *, table_gpa: int | None = None) -> None:
        """Write descriptor ``i`` of the ring's table, or of an indirect table
        at ``table_gpa``. Values are truncated to their field widths."""
        base = self.desc_gpa if table_gpa is None else table_gpa
        self.mem.write(base + 16 * i, _DESC.pack(addr & (2**64 - 1), length & 0xFFFFFFFF,
                                                 flags & 0xFFFF, next & 0xFFFF))

    def read_desc(self, i: int, *, table_gpa: int | None = None) -> tuple[int, int, int, int]:
        """``(addr, len, flags, next)`` of descriptor ``i``."""
        base = self.desc_gpa if table_gpa is None else table_gpa
        return _DESC.unpack(self.mem.read(base + 16 * i, 16))

    def write_avail_entry(self, slot: int, head: int) -> None:
        """avail.ring[slot % size] = head (does not touch avail.idx)."""
        self.mem.write_u16(self.avail_gpa + 4 + 2 * (slot % self.size), head)

    def read_avail_idx(self) -> int:
        return self.mem.read_u16(self.avail_gpa + 2)

    def set_avail_idx(self, value: int) -> None:
        """Write avail.idx in memory *and* the shadow (e.g. jump it by more
        than ``size`` to test the backend's sanity check)."""
        mb()
        self.avail_idx = value & 0xFFFF
        self.mem.write_u16(self.avail_gpa + 2, self.avail_idx)

    @property
    def avail_flags(self) -> int:
        return self.mem.read_u16(self.avail_gpa)

    @avail_flags.setter
    def avail_flags(self, v: int) -> None:
        self.mem.write_u16(self.avail_gpa, v)

    @property
    def used_event(self) -> int:
        """avail ring trailer: device should interrupt when used.idx passes it."""
        return self.mem.read_u16(self.used_event_gpa)

    @used_event.setter
    def used_event(self, v: int) -> None:
        self.mem.write_u16(self.used_event_gpa, v)

    @property
    def avail_event(self) -> int:
        """used ring trailer written by the device: kick when avail.idx passes it."""
        return self.mem.read_u16(self.avail_event_gpa)

    @property
    def used_flags(self) -> int:
        return self.mem.read_u16(self.used_gpa)

    def read_used_idx(self) -> int:
        return self.mem.read_u16(self.used_gpa + 2)

    def read_used_elem(self, slot: int) -> tuple[int, int]:
        """``(id, len)`` at used.ring[slot % size]."""
        return _USED_ELEM.unpack(self.mem.read(self.used_gpa + 4 + 8 * (slot % self.size), 8))

    def reserve_descs(self, n: int) -> list[int]:
        """Take ``n`` descriptor indices out of the free list (for crafting
        chains by hand with :meth:`write_desc`). Give them back with
        :meth:`release_descs`."""
        if n > len(self._free):
            raise VirtqueueError(f"only {len(self._free)} free descriptors")
        return [self._free.pop() for _ in range(n)]

    def release_descs(self, descs: Iterable[int]) -> None:
        self._free.extend(descs)

    def push_head(self, head: int, *, token: Any = None, publish: bool = True,
                  writable: int = 2**32) -> None:
        """Put ``head`` into the next avail slot without any descriptor
        bookkeeping (for hand-crafted/hostile chains). The head is registered
        as outstanding, so a completion for it is accepted (``writable`` bounds
        the accepted used length in strict mode)."""
        self._chains[head] = _Chain(head, [], None, writable, token)
        self.write_avail_entry(self.avail_idx, head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        if publish:
            self.publish()

    # ------------------------------------------------------------------
    # normal driver operations
    # ------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Free descriptor slots in the ring's table."""
        return len(self._free)

    @property
    def in_flight(self) -> int:
        """Chains made available and not yet returned by the device."""
        return len(self._chains)

    def add_chain(self, buffers: Sequence[Buffer], *, indirect: bool = False,
                  token: Any = None, publish: bool = True) -> int:
        """Build a descriptor chain and make it available; return its head.

        ``buffers`` is ``[(gpa, len, device_writable), ...]`` (readable
        buffers should precede writable ones, per spec -- not enforced).
        With ``indirect=True`` the buffers go into an indirect table allocated
        in guest memory and the ring uses one descriptor. With
        ``publish=False`` avail.idx is not updated yet: call :meth:`publish`
        (batching several chains into one index update). Raises
        :class:`VirtqueueError` if not enough descriptors are free.
        """
        bufs = [(int(g), int(ln), bool(w)) for g, ln, w in buffers]
        if not bufs:
            raise ValueError("empty chain")
        writable = sum(ln for _, ln, w in bufs if w)
        if indirect:
            if not self._free:
                raise VirtqueueError("no free descriptors")
            table = self.mem.alloc(16 * len(bufs), 16)
            for i, (g, ln, w) in enumerate(bufs):
                fl = (VRING_DESC_F_WRITE if w else 0)
                if i + 1 < len(bufs):
                    fl |= VRING_DESC_F_NEXT
                self.write_desc(i, g, ln, fl, i + 1 if i + 1 < len(bufs) else 0,
                                table_gpa=table)
            head = self._free.pop()
            self.write_desc(head, table, 16 * len(bufs), VRING_DESC_F_INDIRECT, 0)
            chain = _Chain(head, [head], table, writable, token)
        else:
            if len(bufs) > len(self._free):
                raise VirtqueueError(
                    f"chain of {len(bufs)} needs more than {len(self._free)} free descriptors")
            idxs = [self._free.pop() for _ in bufs]
            for k, ((g, ln, w), d) in enumerate(zip(bufs, idxs)):
                fl = VRING_DESC_F_WRITE if w else 0
                nxt = 0
                if k + 1 < len(idxs):
                    fl |= VRING_DESC_F_NEXT
                    nxt = idxs[k + 1]
                self.write_desc(d, g, ln, fl, nxt)
            head = idxs[0]
            chain = _Chain(head, idxs, None, writable, token)
        self._chains[head] = chain
        self.write_avail_entry(self.avail_idx, head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        if publish:
            self.publish()
        return head

    def publish(self) -> None:
        """Write the shadow avail.idx to memory (after a barrier)."""
        mb()
        self.mem.write_u16(self.avail_gpa + 2, self.avail_idx)

    def notify_needed(self) -> bool:
        """Whether the device asked to be notified for the chains published
        since the last :meth:`kick` (EVENT_IDX: avail_event crossed;
        otherwise: used.flags lacks NO_NOTIFY)."""
        mb()
        if self.event_idx:
            return vring_need_event(self.avail_event, self.avail_idx, self._kicked_idx)
        return not (self.used_flags & VRING_USED_F_NO_NOTIFY)

    def kick(self, force: bool = False) -> bool:
        """Notify the device through ``kick_fd`` if it wants it (or always
        with ``force=True``). Returns True if the eventfd was written."""
        need = force or self.notify_needed()
        self._kicked_idx = self.avail_idx
        if need:
            os.eventfd_write(self.kick_fd, 1)
            self.kicks += 1
        return need

    def _fail(self, msg: str) -> None:
        if self.strict:
            raise VirtqueueError(msg)
        self.errors.append(msg)

    def get_used(self) -> list[UsedElem]:
        """Consume all new used-ring entries without blocking; frees their
        descriptors/indirect tables and (EVENT_IDX) re-arms ``used_event``."""
        out: list[UsedElem] = []
        used_idx = self.read_used_idx()
        pending = (used_idx - self.last_used_idx) & 0xFFFF
        if pending == 0:
            return out
        if pending > self.size or pending > len(self._chains):
            self._fail(f"vq{self.index}: used.idx jumped from {self.last_used_idx} to "
                       f"{used_idx} with {len(self._chains)} chains outstanding")
            pending = min(pending, len(self._chains))
        mb()  # read used.idx before the entries
        for _ in range(pending):
            head, length = self.read_used_elem(self.last_used_idx)
            self.last_used_idx = (self.last_used_idx + 1) & 0xFFFF
            chain = self._chains.pop(head, None)
            if chain is None:
                self._fail(f"vq{self.index}: device returned unknown head {head}")
                out.append(UsedElem(head, length))
                continue
            if length > chain.writable:
                self._fail(f"vq{self.index}: used len {length} > writable {chain.writable} "
                           f"for head {head}")
            self._free.extend(chain.descs)
            if chain.indirect_gpa is not None and not self.mem.closed:
                self.mem.free(chain.indirect_gpa)
            out.append(UsedElem(head, length, chain.token))
        if self.event_idx:
            self.used_event = self.last_used_idx
            mb()
        return out

    def wait_call(self, timeout: float) -> bool:
        """Wait until the device signals ``call_fd``; consume the signal.
        Returns False on timeout."""
        r, _, _ = select.select([self.call_fd], [], [], max(0.0, timeout))
        if not r:
            return False
        try:
            os.eventfd_read(self.call_fd)
        except BlockingIOError:
            pass
        return True

    def wait_used(self, timeout: float = 5.0, *, min_count: int = 1, poll: bool = True,
                  poll_interval: float = 0.05, raise_on_timeout: bool = True) -> list[UsedElem]:
        """Wait until at least ``min_count`` completions were consumed; return
        them all (``[(head, len), ...]`` with ``.token``).

        Waits on ``call_fd``; with ``poll=True`` (default) it also re-reads the
        used ring every ``poll_interval`` seconds so a backend that does not
        signal still makes progress. Use ``poll=False`` to *require* the
        device's interrupt (tests of notification logic). On timeout raises
        :class:`TimeoutError` (or returns what was collected when
        ``raise_on_timeout=False``).
        """
        deadline = time.monotonic() + timeout
        got: list[UsedElem] = []
        while True:
            got += self.get_used()
            if len(got) >= min_count:
                return got
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if raise_on_timeout:
                    raise TimeoutError(
                        f"vq{self.index}: {len(got)}/{min_count} completions after {timeout}s "
                        f"(avail={self.avail_idx} used={self.read_used_idx()} "
                        f"in_flight={self.in_flight})")
                return got
            self.wait_call(min(remaining, poll_interval) if poll else remaining)

    def disable_interrupts(self) -> None:
        """Ask the device not to signal (avail.flags NO_INTERRUPT, which the
        device may ignore with EVENT_IDX; then also park used_event)."""
        self.avail_flags = VRING_AVAIL_F_NO_INTERRUPT
        if self.event_idx:
            self.used_event = (self.last_used_idx - 1) & 0xFFFF

    def enable_interrupts(self) -> None:
        self.avail_flags = 0
        if self.event_idx:
            self.used_event = self.last_used_idx
        mb()

    def __repr__(self) -> str:
        return (f"SplitVirtqueue(index={self.index}, size={self.size}, desc={self.desc_gpa:#x}, "
                f"avail={self.avail_gpa:#x}, used={self.used_gpa:#x}, avail_idx={self.avail_idx}, "
                f"last_used={self.last_used_idx}, in_flight={self.in_flight})")

    def close(self) -> None:
        """Close the eventfds and free ring memory owned by this queue."""
        for name in ("kick_fd", "call_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
                setattr(self, name, -1)
        if not self.mem.closed:
            for g in self._owned_allocs:
                self.mem.free(g)
            for c in self._chains.values():
                if c.indirect_gpa is not None:
                    self.mem.free(c.indirect_gpa)
        self._owned_allocs = []
        self._chains.clear()


# ---------------------------------------------------------------------------
# packed virtqueues (VIRTIO_F_RING_PACKED, virtio 1.1 section 2.8)
# ---------------------------------------------------------------------------

_PDESC = struct.Struct("<QIHH")     # addr, len, id, flags
_PEVENT = struct.Struct("<HH")      # off_wrap, flags

#: Packed descriptor flags: the driver's wrap counter in AVAIL (and its inverse in
#: USED) makes a descriptor available; AVAIL == USED == the device's wrap counter marks
#: it used.
VRING_PACKED_DESC_F_AVAIL = 1 << 7
VRING_PACKED_DESC_F_USED = 1 << 15
#: Event suppression flags (the driver and device areas).
VRING_PACKED_EVENT_F_ENABLE = 0
VRING_PACKED_EVENT_F_DISABLE = 1
VRING_PACKED_EVENT_F_DESC = 2


def packed_vring_base(avail_pos: int, avail_wrap: int, used_pos: int, used_wrap: int) -> int:
    """The vhost-user SET/GET_VRING_BASE value of a packed ring (QEMU's encoding):
    bits 0-14 the avail position, 15 its wrap counter, 16-30 the used position, 31
    its wrap counter."""
    return (avail_pos | (avail_wrap << 15)) | ((used_pos | (used_wrap << 15)) << 16)


@dataclass
class _PChain:
    id: int
    slots: int
    indirect_gpa: int | None
    writable: int
    token: Any = None


@dataclass(eq=False, repr=False)
class PackedVirtqueue:
    """Driver side of a packed virtqueue, with the interface of
    :class:`SplitVirtqueue` (``add_chain``, ``kick``, ``get_used``, ``wait_used``,
    ``uaddrs``, ...): what a test does with one, it does with the other.

    Completions are ``UsedElem(buffer id, len)``: the "head" of a packed buffer is its
    buffer id.  Layout: the descriptor ring (``size`` x 16 bytes, align 16), the driver
    event suppression area (``driver_gpa``, 4 bytes: off_wrap, flags) and the device's
    (``device_gpa``); SET_VRING_ADDR carries them as desc, avail (driver) and used
    (device).  :attr:`vring_base` is the SET_VRING_BASE value of the ring's position.

    Hostile tests write descriptors themselves with :meth:`write_desc` and
    :meth:`add_raw` (consecutive ring descriptors made available at once, with any
    ids, flags and lengths).
    """

    mem: GuestMemory
    size: int
    index: int = 0
    event_idx: bool = False
    region: int | None = None
    strict: bool = True
    kick_fd: int = field(default=-1, init=False)
    call_fd: int = field(default=-1, init=False)
    errors: list = field(default_factory=list, init=False)
    kicks: int = field(default=0, init=False)

    packed = True

    def __post_init__(self) -> None:
        if not 0 < self.size <= 0x8000:
            raise ValueError(f"bad packed queue size {self.size}")
        self.desc_gpa = self.mem.alloc(16 * self.size, 16, region=self.region)
        self.driver_gpa = self.mem.alloc(4, 4, region=self.region)
        self.device_gpa = self.mem.alloc(4, 4, region=self.region)
        self._owned_allocs = [self.desc_gpa, self.driver_gpa, self.device_gpa]
        self.mem.write(self.desc_gpa, bytes(16 * self.size))
        self.mem.write(self.device_gpa, bytes(4))
        self.next_avail = 0
        self.avail_wrap = 1
        self.last_used = 0
        self.used_wrap = 1
        self._free_ids: list[int] = list(range(self.size - 1, -1, -1))
        self._chains: dict[int, _PChain] = {}
        self._free_slots = self.size
        self._pending_heads: list[tuple[int, int]] = []
        self._kicked = (self.next_avail, self.avail_wrap)
        self.start_base = self.vring_base
        self.kick_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.call_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.enable_interrupts()

    # ------------------------------------------------------------------ addresses

    @property
    def vring_base(self) -> int:
        return packed_vring_base(self.next_avail, self.avail_wrap, self.last_used, self.used_wrap)

    def desc_addr(self, i: int) -> int:
        return self.desc_gpa + 16 * i

    def uaddrs(self) -> tuple[int, int, int]:
        """Front-end addresses ``(desc, used, avail)`` = (descriptor ring, device area,
        driver area), in SET_VRING_ADDR's order."""
        m = self.mem
        return m.uaddr(self.desc_gpa), m.uaddr(self.device_gpa), m.uaddr(self.driver_gpa)

    # ------------------------------------------------------------------ raw accessors

    def _avail_bits(self, wrap: int) -> int:
        return VRING_PACKED_DESC_F_AVAIL if wrap else VRING_PACKED_DESC_F_USED

    def write_desc(self, i: int, addr: int, length: int, flags: int = 0, id: int = 0, *,
                   table_gpa: int | None = None) -> None:
        """Write descriptor ``i`` of the ring (flags as given: no avail bits added) or of
        an indirect table at ``table_gpa``."""
        base = self.desc_gpa if table_gpa is None else table_gpa
        self.mem.write(base + 16 * i, _PDESC.pack(addr & (2**64 - 1), length & 0xFFFFFFFF, id & 0xFFFF,
                                                  flags & 0xFFFF))

    def read_desc(self, i: int) -> tuple[int, int, int, int]:
        """``(addr, len, id, flags)`` of ring descriptor ``i``."""
        return _PDESC.unpack(self.mem.read(self.desc_gpa + 16 * i, 16))

    @property
    def device_event(self) -> tuple[int, int]:
        """The device area: ``(off_wrap, flags)`` (VRING_PACKED_EVENT_F_*)."""
        return _PEVENT.unpack(self.mem.read(self.device_gpa, 4))

    def set_driver_event(self, off_wrap: int, flags: int) -> None:
        self.mem.write(self.driver_gpa, _PEVENT.pack(off_wrap & 0xFFFF, flags & 0xFFFF))
        mb()

    def _advance(self, n: int) -> None:
        self.next_avail += n
        while self.next_avail >= self.size:
            self.next_avail -= self.size
            self.avail_wrap ^= 1

    def add_raw(self, descs: Sequence[tuple[int, int, int, int]], *, register_id: int | None = None,
                writable: int = 2**32, token: Any = None, publish: bool = True) -> None:
        """Make ``descs`` (``(addr, len, flags, id)`` each; the avail bits are added)
        available at the next ring positions, head last.  ``register_id``: accept a
        completion with that id (taking ``len(descs)`` slots)."""
        pos, wrap = self.next_avail, self.avail_wrap
        writes = []
        for addr, length, flags, id_ in descs:
            writes.append((pos, addr, length, (flags | self._avail_bits(wrap)) & 0xFFFF, id_))
            pos += 1
            if pos == self.size:
                pos, wrap = 0, wrap ^ 1
        for p, addr, length, flags, id_ in writes[1:]:
            self.write_desc(p, addr, length, flags, id_)
        # The head: everything but its flags, then (after a barrier) the flags alone,
        # written once: the device may take the buffer and write its used descriptor
        # there at once.
        p, addr, length, flags, id_ = writes[0]
        self.write_desc(p, addr, length, 0, id_)
        self._advance(len(descs))
        if register_id is not None:
            self._chains[register_id] = _PChain(register_id, len(descs), None, writable, token)
            if register_id in self._free_ids:
                self._free_ids.remove(register_id)
        if publish:
            mb()
            self.mem.write_u16(self.desc_gpa + 16 * p + 14, flags)
        else:
            self._pending_heads.append((p, flags))

    # ------------------------------------------------------------------ driver

    @property
    def num_free(self) -> int:
        return self._free_slots

    @property
    def in_flight(self) -> int:
        return len(self._chains)

    def add_chain(self, buffers: Sequence[Buffer], *, indirect: bool = False, token: Any = None,
                  publish: bool = True) -> int:
        """Make a buffer available; returns its buffer id (see
        :meth:`SplitVirtqueue.add_chain`)."""
        bufs = [(int(g), int(ln), bool(w)) for g, ln, w in buffers]
        if not bufs:
            raise ValueError("empty chain")
        writable = sum(ln for _, ln, w in bufs if w)
        slots = 1 if indirect else len(bufs)
        if slots > self._free_slots or not self._free_ids:
            raise VirtqueueError(f"chain of {slots} needs more than {self._free_slots} free descriptors")
        id_ = self._free_ids.pop()
        table = None
        if indirect:
            table = self.mem.alloc(16 * len(bufs), 16)
            for i, (g, ln, w) in enumerate(bufs):
                self.write_desc(i, g, ln, VRING_DESC_F_WRITE if w else 0, id_, table_gpa=table)
            descs = [(table, 16 * len(bufs), VRING_DESC_F_INDIRECT, id_)]
        else:
            descs = [(g, ln, (VRING_DESC_F_WRITE if w else 0) | (VRING_DESC_F_NEXT if k + 1 < len(bufs) else 0),
                      id_) for k, (g, ln, w) in enumerate(bufs)]
        self.add_raw(descs, publish=publish)
        self._chains[id_] = _PChain(id_, slots, table, writable, token)
        self._free_slots -= slots
        return id_

    def publish(self) -> None:
        """Write the heads held back by ``publish=False`` (the first one last)."""
        mb()
        for p, flags in reversed(self._pending_heads):
            self.mem.write_u16(self.desc_gpa + 16 * p + 14, flags)
        self._pending_heads.clear()

    def notify_needed(self) -> bool:
        mb()
        off_wrap, flags = self.device_event
        if flags != VRING_PACKED_EVENT_F_DESC:
            return flags != VRING_PACKED_EVENT_F_DISABLE
        old_pos, old_wrap = self._kicked
        new, old = self.next_avail, old_pos
        if old_wrap != self.avail_wrap:
            old -= self.size
        event = off_wrap & 0x7FFF
        if (off_wrap >> 15) != self.avail_wrap:
            event -= self.size
        return vring_need_event(event & 0xFFFF, new & 0xFFFF, old & 0xFFFF)

    def kick(self, force: bool = False) -> bool:
        need = force or self.notify_needed()
        self._kicked = (self.next_avail, self.avail_wrap)
        if need:
            os.eventfd_write(self.kick_fd, 1)
            self.kicks += 1
        return need

    def _fail(self, msg: str) -> None:
        if self.strict:
            raise VirtqueueError(msg)
        self.errors.append(msg)

    def get_used(self) -> list[UsedElem]:
        """Consume every used descriptor the device wrote since the last call."""
        out: list[UsedElem] = []
        while self._chains:
            _addr, length, id_, flags = self.read_desc(self.last_used)
            avail = bool(flags & VRING_PACKED_DESC_F_AVAIL)
            used = bool(flags & VRING_PACKED_DESC_F_USED)
            if avail != used or used != bool(self.used_wrap):
                break
            mb()
            _addr, length, id_, _flags = self.read_desc(self.last_used)
            chain = self._chains.pop(id_, None)
            if chain is None:
                self._fail(f"vq{self.index}: device returned unknown buffer id {id_} at {self.last_used}")
                out.append(UsedElem(id_, length))
                break
            if length > chain.writable:
                self._fail(f"vq{self.index}: used len {length} > writable {chain.writable} for id {id_}")
            self.last_used += chain.slots
            if self.last_used >= self.size:
                self.last_used -= self.size
                self.used_wrap ^= 1
            self._free_slots += chain.slots
            self._free_ids.append(id_)
            if chain.indirect_gpa is not None and not self.mem.closed:
                self.mem.free(chain.indirect_gpa)
            out.append(UsedElem(id_, length, chain.token))
        if out and self._interrupts and self.event_idx:
            self.set_driver_event(self.last_used | (self.used_wrap << 15), VRING_PACKED_EVENT_F_DESC)
        return out

    wait_call = SplitVirtqueue.wait_call
    wait_used = SplitVirtqueue.wait_used

    def read_used_idx(self) -> int:
        """The next used position (for messages; packed rings have no used index)."""
        return self.last_used

    @property
    def avail_idx(self) -> int:
        return self.next_avail

    def disable_interrupts(self) -> None:
        self._interrupts = False
        self.set_driver_event(0, VRING_PACKED_EVENT_F_DISABLE)

    def enable_interrupts(self) -> None:
        self._interrupts = True
        if self.event_idx:
            self.set_driver_event(self.last_used | (self.used_wrap << 15), VRING_PACKED_EVENT_F_DESC)
        else:
            self.set_driver_event(0, VRING_PACKED_EVENT_F_ENABLE)

    def __repr__(self) -> str:
        return (f"PackedVirtqueue(index={self.index}, size={self.size}, desc={self.desc_gpa:#x}, "
                f"avail={self.next_avail}/{self.avail_wrap}, used={self.last_used}/{self.used_wrap}, "
                f"in_flight={self.in_flight})")

    close = SplitVirtqueue.close
