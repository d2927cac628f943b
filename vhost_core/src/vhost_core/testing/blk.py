"""A virtio-blk driver over the fake vhost-user front-end (:mod:`vhost_core.testing.frontend`).

:func:`connect_blk` performs QEMU's whole handshake and returns a
:class:`VirtioBlkDevice` with ``read/write/flush/get_id/discard/write_zeroes`` and
``submit``/``submit_many`` for many requests in flight on several queues::

    from vhost_core.testing.blk import connect_blk
    with connect_blk("/tmp/vhost.sock", num_queues=2) as dev:
        dev.write(0, b"\\xab" * 4096)
        assert dev.read(0, 8) == b"\\xab" * 4096

A request that completes with a status other than OK raises :class:`BlkIOError`.
"""

from __future__ import annotations

import os
import select
import struct
import time
from dataclasses import dataclass, fields
from typing import Iterable

from .constants import (
    VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_SECTOR_SIZE,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_F_UNMAP,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    VirtioBlkFeature as BF,
    bit,
)
from .frontend import VhostUserError, VhostUserFrontend, VirtioDevice, handshake
from .memory import GuestMemory
from .virtqueue import SplitVirtqueue, UsedElem, VirtqueueError

__all__ = [
    "VirtioBlkConfig",
    "VirtioBlkDevice",
    "BlkRequest",
    "BlkResult",
    "BlkIOError",
    "connect_blk",
    "DEFAULT_BLK_FEATURES",
]

#: Device features :func:`connect_blk` acks by default (if offered).
DEFAULT_BLK_FEATURES = (
    bit(VIRTIO_F_VERSION_1)
    | bit(VIRTIO_RING_F_INDIRECT_DESC)
    | bit(VIRTIO_RING_F_EVENT_IDX)
    | bit(BF.SIZE_MAX) | bit(BF.SEG_MAX) | bit(BF.GEOMETRY) | bit(BF.RO)
    | bit(BF.BLK_SIZE) | bit(BF.FLUSH) | bit(BF.TOPOLOGY) | bit(BF.CONFIG_WCE)
    | bit(BF.MQ) | bit(BF.DISCARD) | bit(BF.WRITE_ZEROES)
)

_BLK_CFG = struct.Struct("<QIIHBBIBBHIBxHIIIIIB3x")
_BLK_HDR = struct.Struct("<IIQ")
_BLK_SEG = struct.Struct("<QII")


@dataclass(frozen=True)
class VirtioBlkConfig:
    """virtio-blk config space (first 60 bytes; later fields ignored).

    Fields are raw values; ``capacity`` is in 512-byte sectors regardless of
    ``blk_size``. Fields beyond what the backend returned read as 0.
    """

    capacity: int = 0
    size_max: int = 0
    seg_max: int = 0
    cylinders: int = 0
    heads: int = 0
    sectors: int = 0
    blk_size: int = 0
    physical_block_exp: int = 0
    alignment_offset: int = 0
    min_io_size: int = 0
    opt_io_size: int = 0
    writeback: int = 0
    num_queues: int = 0
    max_discard_sectors: int = 0
    max_discard_seg: int = 0
    discard_sector_alignment: int = 0
    max_write_zeroes_sectors: int = 0
    max_write_zeroes_seg: int = 0
    write_zeroes_may_unmap: int = 0

    SIZE = _BLK_CFG.size  # 60

    @classmethod
    def parse(cls, data: bytes) -> "VirtioBlkConfig":
        """Parse (zero-padding short input)."""
        raw = bytes(data[: cls.SIZE]).ljust(cls.SIZE, b"\0")
        return cls(*_BLK_CFG.unpack(raw))

    def pack(self) -> bytes:
        """Serialize back to the 60-byte little-endian layout (handy for
        writing backend-side tests)."""
        return _BLK_CFG.pack(*(getattr(self, f.name) for f in fields(self)))

    @property
    def size_bytes(self) -> int:
        return self.capacity * VIRTIO_BLK_SECTOR_SIZE


@dataclass
class BlkRequest:
    """One virtio-blk request for :meth:`VirtioBlkDevice.submit_many`.

    ``data_out`` is device-readable payload (after the 16-byte header);
    ``data_in_len`` device-writable bytes (before the status byte).
    ``indirect``/``seg_size`` override the device defaults for this request
    (``seg_size`` splits data into descriptors of at most that many bytes).
    """

    type: int
    sector: int = 0
    data_out: bytes = b""
    data_in_len: int = 0
    queue: int = 0
    indirect: bool | None = None
    seg_size: int | None = None
    ioprio: int = 0


class BlkResult(tuple):
    """``(status, data)``; also ``.used_len`` (what the device reported in the
    used ring) and ``.request``."""

    def __new__(cls, status: int, data: bytes, used_len: int = 0,
                request: BlkRequest | None = None):
        self = super().__new__(cls, (status, data))
        self.used_len = used_len
        self.request = request
        return self

    @property
    def status(self) -> int:
        return self[0]

    @property
    def data(self) -> bytes:
        return self[1]

    def __repr__(self) -> str:
        return f"BlkResult(status={self[0]}, data=<{len(self[1])} bytes>, used_len={self.used_len})"


class BlkIOError(VhostUserError):
    """A virtio-blk request completed with status != OK."""

    def __init__(self, status: int, what: str = "") -> None:
        self.status = status
        super().__init__(f"virtio-blk {what} failed with status {status}")


@dataclass
class _Inflight:
    pos: int
    req: BlkRequest
    allocs: list
    in_gpa: int | None
    status_gpa: int


class VirtioBlkDevice(VirtioDevice):
    """A virtio-blk driver over a :class:`VhostUserFrontend`.

    Normally made by :func:`connect_blk`. Attributes: ``frontend``,
    ``memory``, ``queues`` (list of :class:`SplitVirtqueue`), ``config``
    (:class:`VirtioBlkConfig` or None without the CONFIG protocol feature),
    ``features`` (acked device features), ``offered_features``,
    ``protocol_features`` (acked), ``offered_protocol_features``,
    ``default_indirect``, ``default_seg_size``, ``timeout``.

    Completion waiting uses the call eventfds and also polls the used rings
    (see :meth:`SplitVirtqueue.wait_used`); set ``require_interrupts=True``
    to fail instead when the backend does not signal.
    """

    def __init__(self, frontend: VhostUserFrontend, memory: GuestMemory,
                 queues: list[SplitVirtqueue], config: VirtioBlkConfig | None,
                 features: int, *, offered_features: int = 0,
                 protocol_features: int = 0, offered_protocol_features: int = 0,
                 own_memory: bool = True, timeout: float = 10.0,
                 default_indirect: bool = False, default_seg_size: int | None = None,
                 require_interrupts: bool = False) -> None:
        super().__init__(frontend, memory, queues, features, own_memory=own_memory, timeout=timeout)
        self.config = config
        self.offered_features = offered_features
        self.protocol_features = protocol_features
        self.offered_protocol_features = offered_protocol_features
        self.default_indirect = default_indirect
        self.default_seg_size = default_seg_size
        self.require_interrupts = require_interrupts

    @property
    def capacity(self) -> int:
        """Capacity in 512-byte sectors (needs config)."""
        if self.config is None:
            raise VhostUserError("config space unavailable (CONFIG not negotiated)")
        return self.config.capacity

    # -- requests -------------------------------------------------------

    def _segments(self, gpa: int, n: int, writable: bool, seg: int | None):
        if n == 0:
            return []
        if not seg:
            return [(gpa, n, writable)]
        return [(gpa + o, min(seg, n - o), writable) for o in range(0, n, seg)]

    def _start(self, pos: int, req: BlkRequest) -> tuple[SplitVirtqueue, list, _Inflight]:
        mem = self.memory
        allocs = []
        hdr = mem.alloc_bytes(_BLK_HDR.pack(req.type, req.ioprio, req.sector), 16)
        allocs.append(hdr)
        seg = req.seg_size if req.seg_size is not None else self.default_seg_size
        bufs = [(hdr, _BLK_HDR.size, False)]
        if req.data_out:
            g = mem.alloc_bytes(req.data_out, 512)
            allocs.append(g)
            bufs += self._segments(g, len(req.data_out), False, seg)
        in_gpa = None
        if req.data_in_len:
            in_gpa = mem.alloc(req.data_in_len, 512)
            allocs.append(in_gpa)
            bufs += self._segments(in_gpa, req.data_in_len, True, seg)
        st = mem.alloc_bytes(b"\xff", 1)  # 0xff: lets us see a missing status write
        allocs.append(st)
        bufs.append((st, 1, True))
        return self.queues[req.queue], bufs, _Inflight(pos, req, allocs, in_gpa, st)

    def _finish(self, inf: _Inflight, used_len: int) -> BlkResult:
        mem = self.memory
        status = mem.read(inf.status_gpa, 1)[0]
        data = mem.read(inf.in_gpa, inf.req.data_in_len) if inf.in_gpa is not None else b""
        for g in inf.allocs:
            mem.free(g)
        return BlkResult(status, data, used_len, inf.req)

    def _wait_any(self, qset: set[int], deadline: float) -> list[tuple[int, UsedElem]]:
        """Collect ``(queue, completion)`` pairs from the queues in ``qset``,
        blocking until at least one arrives."""
        while True:
            got = []
            for qi in qset:
                got += [(qi, el) for el in self.queues[qi].get_used()]
            if got:
                return got
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                states = ", ".join(repr(self.queues[qi]) for qi in sorted(qset))
                raise TimeoutError(f"virtio-blk requests did not complete: {states}")
            wait = remaining if self.require_interrupts else min(remaining, 0.05)
            fds = [self.queues[qi].call_fd for qi in qset]
            r, _, _ = select.select(fds, [], [], wait)
            for fd in r:
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    pass

    def submit_many(self, requests: Iterable[BlkRequest | tuple], *,
                    timeout: float | None = None) -> list[BlkResult]:
        """Put all requests in flight (as many at once as the rings allow),
        kick each queue once per batch, and wait for all completions.
        Returns results in request order. Tuples are accepted as
        ``BlkRequest(*t)``. Buffers of requests that time out are leaked on
        purpose (the device may still write them)."""
        reqs = [r if isinstance(r, BlkRequest) else BlkRequest(*r) for r in requests]
        for r in reqs:
            if not 0 <= r.queue < len(self.queues):
                raise ValueError(f"queue {r.queue} does not exist")
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        results: list[BlkResult | None] = [None] * len(reqs)
        inflight: dict[tuple[int, int], _Inflight] = {}
        active: set[int] = set()
        todo = list(enumerate(reqs))
        todo.reverse()
        while todo or inflight:
            touched = set()
            while todo:
                pos, req = todo[-1]
                vq, bufs, inf = self._start(pos, req)
                indirect = self.default_indirect if req.indirect is None else req.indirect
                need = 1 if indirect else len(bufs)
                if vq.num_free < need:
                    for g in inf.allocs:
                        self.memory.free(g)
                    if not vq.in_flight:
                        raise VirtqueueError(f"request needs {need} descriptors, "
                                             f"queue {req.queue} has {vq.size}")
                    break  # wait for completions first
                todo.pop()
                head = vq.add_chain(bufs, indirect=indirect, token=pos)
                inflight[(req.queue, head)] = inf
                touched.add(req.queue)
                active.add(req.queue)
            for qi in touched:
                self.queues[qi].kick()
            if not inflight:
                continue
            for qi, el in self._wait_any(active, deadline):
                inf = inflight.pop((qi, el.head), None)
                if inf is None:  # only possible with strict=False queues
                    continue
                results[inf.pos] = self._finish(inf, el.len)
            active = {qi for qi, _ in inflight}
        return results  # type: ignore[return-value]

    def submit(self, type: int, sector: int = 0, data_out: bytes = b"",
               data_in_len: int = 0, *, queue: int = 0, indirect: bool | None = None,
               seg_size: int | None = None, timeout: float | None = None) -> BlkResult:
        """Submit one request and wait: returns ``(status, data_in)``."""
        return self.submit_many(
            [BlkRequest(type, sector, data_out, data_in_len, queue, indirect, seg_size)],
            timeout=timeout)[0]

    @staticmethod
    def _check(res: BlkResult, what: str) -> BlkResult:
        if res.status != VIRTIO_BLK_S_OK:
            raise BlkIOError(res.status, what)
        return res

    def read(self, sector: int, nsectors: int, *, queue: int = 0, **kw) -> bytes:
        """Read ``nsectors`` 512-byte sectors; raises :class:`BlkIOError`."""
        return self._check(self.submit(VIRTIO_BLK_T_IN, sector, b"",
                                       nsectors * VIRTIO_BLK_SECTOR_SIZE, queue=queue, **kw),
                           "read").data

    def write(self, sector: int, data: bytes, *, queue: int = 0, **kw) -> None:
        """Write ``data`` (a multiple of 512 bytes) at ``sector``."""
        if len(data) % VIRTIO_BLK_SECTOR_SIZE:
            raise ValueError("write length must be a multiple of 512 (use submit() to misbehave)")
        self._check(self.submit(VIRTIO_BLK_T_OUT, sector, bytes(data), 0, queue=queue, **kw),
                    "write")

    def flush(self, *, queue: int = 0, **kw) -> None:
        self._check(self.submit(VIRTIO_BLK_T_FLUSH, 0, b"", 0, queue=queue, **kw), "flush")

    def get_id(self, *, queue: int = 0, raw: bool = False, **kw) -> bytes:
        """GET_ID: the serial (trailing NULs stripped unless ``raw``)."""
        data = self._check(self.submit(VIRTIO_BLK_T_GET_ID, 0, b"", VIRTIO_BLK_ID_BYTES,
                                       queue=queue, **kw), "get_id").data
        return data if raw else data.rstrip(b"\0")

    @staticmethod
    def segments_payload(segments: Iterable[tuple]) -> bytes:
        """Discard/write-zeroes payload from ``[(sector, nsectors, flags), ...]``."""
        return b"".join(_BLK_SEG.pack(*(tuple(s) + (0,) * (3 - len(s)))) for s in segments)

    def discard(self, sector: int, nsectors: int, *, segments: Iterable[tuple] | None = None,
                queue: int = 0, **kw) -> None:
        """DISCARD one range (or several ``segments``)."""
        segs = [(sector, nsectors, 0)] if segments is None else segments
        self._check(self.submit(VIRTIO_BLK_T_DISCARD, 0, self.segments_payload(segs), 0,
                                queue=queue, **kw), "discard")

    def write_zeroes(self, sector: int, nsectors: int, *, unmap: bool = False,
                     segments: Iterable[tuple] | None = None, queue: int = 0, **kw) -> None:
        """WRITE_ZEROES one range (or several ``segments``)."""
        fl = VIRTIO_BLK_WRITE_ZEROES_F_UNMAP if unmap else 0
        segs = [(sector, nsectors, fl)] if segments is None else segments
        self._check(self.submit(VIRTIO_BLK_T_WRITE_ZEROES, 0, self.segments_payload(segs), 0,
                                queue=queue, **kw), "write_zeroes")


def connect_blk(path: str | os.PathLike, num_queues: int = 1, queue_size: int = 128,
                memory_mb: int = 16, features: int | None = None, *,
                protocol_features: int | None = None, memory: GuestMemory | None = None,
                timeout: float = 10.0, connect_timeout: float = 5.0,
                config_size: int = VirtioBlkConfig.SIZE, indirect: bool = False,
                legacy_layout: bool = False, enable: bool = True,
                require_interrupts: bool = False) -> VirtioBlkDevice:
    """Connect to a vhost-user-blk backend and do QEMU's handshake:

    GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES,
    GET_QUEUE_NUM (if MQ), SET_OWNER, GET_CONFIG (if CONFIG), SET_FEATURES,
    SET_MEM_TABLE, then per queue SET_VRING_NUM/BASE/ADDR/KICK/CALL, then
    SET_VRING_ENABLE for each queue (if protocol features were negotiated and
    ``enable``).

    Args:
        features: device features to ack = ``offered & features``
            (default :data:`DEFAULT_BLK_FEATURES`); bit 30 is added when offered.
        protocol_features: protocol features to ack = ``offered & this``
            (default :data:`FRONTEND_PROTOCOL_FEATURES`).
        memory: use this guest memory (not closed by the device) instead of
            ``GuestMemory.pc_like(memory_mb MiB)``.
        indirect: default for requests (only if INDIRECT_DESC was acked).
        legacy_layout: 4096-aligned legacy ring layout.
        require_interrupts: completions must be signalled via call eventfd.

    Raises :class:`VhostUserError` if the backend cannot serve ``num_queues``.
    """
    def check(acked: int, backend_queues: int, config: bytes | None) -> None:
        if num_queues > 1 and not acked & bit(BF.MQ):
            raise VhostUserError("num_queues > 1 but VIRTIO_BLK_F_MQ is not offered")
        parsed = VirtioBlkConfig.parse(config) if config is not None else None
        if parsed is not None and acked & bit(BF.MQ) and parsed.num_queues and num_queues > parsed.num_queues:
            raise VhostUserError(f"config num_queues={parsed.num_queues} < {num_queues} requested")

    h = handshake(path, DEFAULT_BLK_FEATURES if features is None else features, num_queues,
                  queue_size=queue_size, memory_mb=memory_mb, protocol_features=protocol_features,
                  memory=memory, timeout=timeout, connect_timeout=connect_timeout, config_size=config_size,
                  legacy_layout=legacy_layout, enable=enable, check=check)
    config = VirtioBlkConfig.parse(h.config) if h.config is not None else None
    seg_size = None
    if config is not None and h.features & bit(BF.SIZE_MAX) and config.size_max:
        seg_size = config.size_max
    return VirtioBlkDevice(
        h.frontend, h.memory, h.queues, config, h.features, offered_features=h.offered_features,
        protocol_features=h.protocol_features, offered_protocol_features=h.offered_protocol_features,
        own_memory=h.own_memory, timeout=timeout,
        default_indirect=indirect and bool(h.features & bit(VIRTIO_RING_F_INDIRECT_DESC)),
        default_seg_size=seg_size, require_interrupts=require_interrupts)
