"""A virtio-scsi driver over the fake vhost-user front-end of vhost_core.testing, shipped
with the device type so that third parties (a bdev plugin that wants to see its disk
through SCSI, a packager's smoke test) can drive vhost-scsi controllers too.

Layout (virtio 1.x, 5.6): virtqueue 0 control, 1 event, 2.. requests.  A command
is ``[request header | data-out]`` device-readable then ``[response | data-in]``
device-writable; :meth:`VirtioScsiDevice.command` builds that chain, and
:meth:`VirtioScsiDevice.chain` submits any hand-made (hostile) chain.

Example::

    with connect_scsi(d.socket("vhost.0")) as dev:
        r = dev.command(0, inquiry(alloc=96), data_in_len=96)
        assert r.response == S_OK and r.status == GOOD and r.data[8:16] == b"INTEL   "
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vhost_core.testing import GuestMemory, VhostUserFrontend, VirtioDevice, handshake
from vhost_core.testing.daemon import wait_in_flight, wait_no_session  # noqa: F401  (for the tests)
from vhost_core.testing.constants import (
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    VhostUserProtocolFeature as PF,
    bit,
)

# virtio-scsi (linux/virtio_scsi.h)
F_INOUT, F_HOTPLUG, F_CHANGE, F_T10_PI = 0, 1, 2, 3
S_OK, S_OVERRUN, S_ABORTED, S_BAD_TARGET, S_RESET, S_BUSY = 0, 1, 2, 3, 4, 5
S_TRANSPORT_FAILURE, S_TARGET_FAILURE, S_NEXUS_FAILURE, S_FAILURE = 6, 7, 8, 9
S_FUNCTION_COMPLETE, S_FUNCTION_SUCCEEDED, S_FUNCTION_REJECTED, S_INCORRECT_LUN = 0, 10, 11, 12
T_TMF, T_AN_QUERY, T_AN_SUBSCRIBE = 0, 1, 2
TMF_ABORT_TASK, TMF_ABORT_TASK_SET, TMF_CLEAR_ACA, TMF_CLEAR_TASK_SET = 0, 1, 2, 3
TMF_I_T_NEXUS_RESET, TMF_LOGICAL_UNIT_RESET, TMF_QUERY_TASK, TMF_QUERY_TASK_SET = 4, 5, 6, 7
T_NO_EVENT, T_TRANSPORT_RESET, T_EVENTS_MISSED = 0, 1, 0x80000000
EVT_RESET_HARD, EVT_RESET_RESCAN, EVT_RESET_REMOVED = 0, 1, 2

REQ_HDR = struct.Struct("<8sQBBB32s")      # 51 bytes
RESP_HDR = struct.Struct("<IIHBB")         # 12 bytes, then sense[96]
RESP_SIZE = RESP_HDR.size + 96
CONFIG = struct.Struct("<IIIIIIIHHI")
EVENT = struct.Struct("<I8sI")

# SCSI
GOOD, CHECK_CONDITION = 0x00, 0x02
NO_SENSE, MEDIUM_ERROR, ILLEGAL_REQUEST, UNIT_ATTENTION, DATA_PROTECT = 0x0, 0x3, 0x5, 0x6, 0x7

DEFAULT_FEATURES = (bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_RING_F_EVENT_IDX)
                    | bit(VIRTIO_RING_F_INDIRECT_DESC) | bit(F_HOTPLUG))


def lun_bytes(target: int, lun: int = 0) -> bytes:
    """The 8-byte LUN field as Linux builds it (flat space addressing)."""
    return bytes([1, target, 0x40 | (lun >> 8), lun & 0xFF, 0, 0, 0, 0])


@dataclass
class ScsiConfig:
    num_queues: int
    seg_max: int
    max_sectors: int
    cmd_per_lun: int
    event_info_size: int
    sense_size: int
    cdb_size: int
    max_channel: int
    max_target: int
    max_lun: int

    @classmethod
    def parse(cls, data: bytes) -> "ScsiConfig":
        return cls(*CONFIG.unpack(bytes(data[:CONFIG.size]).ljust(CONFIG.size, b"\0")))


@dataclass
class Sense:
    raw: bytes

    @property
    def response_code(self) -> int:
        return self.raw[0] & 0x7F

    @property
    def key(self) -> int:
        return self.raw[2] & 0x0F

    @property
    def asc(self) -> int:
        return self.raw[12]

    @property
    def ascq(self) -> int:
        return self.raw[13]

    @property
    def sksv(self) -> bool:
        return bool(self.raw[15] & 0x80)

    @property
    def field(self) -> int:
        return struct.unpack(">H", self.raw[16:18])[0]

    @property
    def cd(self) -> bool:
        return bool(self.raw[15] & 0x40)

    def __repr__(self) -> str:
        return f"Sense(key={self.key:#x}, asc={self.asc:#04x}, ascq={self.ascq:#04x})"


@dataclass
class ScsiResult:
    response: int
    status: int
    sense_len: int
    resid: int
    sense: Sense
    data: bytes
    used_len: int

    def __repr__(self) -> str:
        sense = self.sense if self.sense_len else ""
        return (f"ScsiResult(response={self.response}, status={self.status:#x}, {sense}"
                f" resid={self.resid}, data=<{len(self.data)}>, used={self.used_len})")


class VirtioScsiDevice(VirtioDevice):
    """Queues: 0 control, 1 event, 2.. requests.  Normally made by :func:`connect_scsi`."""

    def __init__(self, fe: VhostUserFrontend, memory: GuestMemory, queues, config, features: int,
                 own_memory: bool, timeout: float) -> None:
        super().__init__(fe, memory, queues, features, own_memory=own_memory, timeout=timeout)
        self.config = config
        self._events: dict[int, int] = {}   # head -> gpa of posted event buffers
        self._pending_events: list = []
        self._tag = 0
        self._tmf_done: set[int] = set()

    # ------------------------------------------------------------ commands

    def command(self, target: int, cdb: bytes, *, data_out: bytes = b"", data_in_len: int = 0,
                lun: int = 0, lun_raw: bytes | None = None, queue: int = 2, resp_len: int = RESP_SIZE,
                split: int | None = None, timeout: float | None = None) -> ScsiResult:
        """One SCSI command; ``split`` cuts data buffers into descriptors of that size."""
        mem = self.memory
        self._tag += 1
        hdr = REQ_HDR.pack(lun_raw if lun_raw is not None else lun_bytes(target, lun), self._tag, 0, 0, 0,
                           bytes(cdb).ljust(32, b"\0"))
        allocs = []
        try:
            g = mem.alloc_bytes(hdr)
            allocs.append(g)
            bufs = [(g, len(hdr), False)]
            if data_out:
                g = mem.alloc_bytes(data_out, 512)
                allocs.append(g)
                bufs += _segments(g, len(data_out), False, split)
            resp = mem.alloc(max(1, resp_len), 8, zero=False)
            mem.fill(resp, max(1, resp_len), 0xEE)
            allocs.append(resp)
            if resp_len:
                bufs.append((resp, resp_len, True))
            din = None
            if data_in_len:
                din = mem.alloc(data_in_len, 512, zero=False)
                mem.fill(din, data_in_len, 0xEE)
                allocs.append(din)
                bufs += _segments(din, data_in_len, True, split)
            used = self.chain(queue, bufs, timeout=timeout)
            raw = mem.read(resp, resp_len)
            if resp_len >= RESP_SIZE:
                sense_len, resid, _sq, status, response = RESP_HDR.unpack_from(raw)
                sense = Sense(raw[12:12 + min(sense_len, 96)])
            else:
                sense_len = resid = status = response = -1
                sense = Sense(b"")
            data = mem.read(din, data_in_len) if din is not None else b""
            return ScsiResult(response, status, sense_len, resid, sense, data, used)
        finally:
            for g in allocs:
                mem.free(g)

    def tmf(self, target: int, subtype: int, *, lun: int = 0, lun_raw: bytes | None = None,
            timeout: float | None = None) -> int:
        mem = self.memory
        lun_field = lun_raw if lun_raw is not None else lun_bytes(target, lun)
        req = struct.pack("<II8sQ", T_TMF, subtype, lun_field, 7)
        g = mem.alloc_bytes(req)
        r = mem.alloc(1)
        mem.fill(r, 1, 0xEE)
        try:
            used = self.chain(0, [(g, len(req), False), (r, 1, True)], timeout=timeout)
            assert used == 1, used
            return mem.read(r, 1)[0]
        finally:
            mem.free(g)
            mem.free(r)

    def post_tmf(self, target: int, subtype: int, *, lun: int = 0) -> tuple[int, int]:
        """A TMF made available without waiting: ``(head, gpa of its response byte)``;
        see :meth:`tmf_response`."""
        mem = self.memory
        req = mem.alloc_bytes(struct.pack("<II8sQ", T_TMF, subtype, lun_bytes(target, lun), 7))
        resp = mem.alloc(1)
        mem.fill(resp, 1, 0xEE)
        head = self.queues[0].add_chain([(req, 24, False), (resp, 1, True)])
        self.queues[0].kick()
        return head, resp

    def tmf_response(self, posted: tuple[int, int]) -> int | None:
        """The response of a :meth:`post_tmf` TMF once the control queue returned it,
        else None (other control-queue completions are consumed and dropped)."""
        head, resp = posted
        if any(el.head == head for el in self.queues[0].get_used()):
            self._tmf_done.add(head)
        if head not in self._tmf_done:
            return None
        return self.memory.read(resp, 1)[0]

    def an(self, kind: int, target: int, events: int = 0xFFFFFFFF) -> tuple[int, int]:
        mem = self.memory
        req = struct.pack("<I8sI", kind, lun_bytes(target), events)
        g = mem.alloc_bytes(req)
        r = mem.alloc(5)
        mem.fill(r, 5, 0xEE)
        try:
            used = self.chain(0, [(g, len(req), False), (r, 5, True)])
            assert used == 5, used
            return struct.unpack("<IB", mem.read(r, 5))
        finally:
            mem.free(g)
            mem.free(r)

    # ------------------------------------------------------------ events

    def post_events(self, n: int = 4) -> None:
        vq = self.queues[1]
        for _ in range(n):
            g = self.memory.alloc(EVENT.size)
            self.memory.fill(g, EVENT.size, 0xEE)
            head = vq.add_chain([(g, EVENT.size, True)])
            self._events[head] = g
        vq.kick()

    def wait_event(self, timeout: float = 5.0) -> tuple[int, bytes, int, int]:
        """Next completed event buffer: ``(event, lun, reason, used_len)``."""
        if self._pending_events:
            return self._pending_events.pop(0)
        for el in self.queues[1].wait_used(timeout, min_count=1):
            g = self._events.pop(el.head)
            event, lun, reason = EVENT.unpack(self.memory.read(g, EVENT.size))
            self.memory.free(g)
            self._pending_events.append((event, lun, reason, el.len))
        return self._pending_events.pop(0)

    def events_completed(self, timeout: float = 0.2) -> list:
        """Whatever event buffers came back within ``timeout``."""
        out = []
        for el in self.queues[1].wait_used(timeout, min_count=1, raise_on_timeout=False):
            g = self._events.pop(el.head)
            out.append(EVENT.unpack(self.memory.read(g, EVENT.size)) + (el.len,))
            self.memory.free(g)
        return out


class ReadStream:
    """One-block READs of ``target`` posted on ``queue`` without waiting, as a driver
    keeping I/O in flight does: :meth:`keep` tops them up to a depth.  Buffers are
    allocated up front, so a second thread may drive it (it touches only its queue)."""

    def __init__(self, dev: VirtioScsiDevice, target: int = 0, lba: int = 0, queue: int = 2,
                 slots: int = 16) -> None:
        self.dev, self.vq = dev, dev.queues[queue]
        mem = dev.memory
        hdr = REQ_HDR.pack(lun_bytes(target), 1, 0, 0, 0, rw10(False, lba, 1))
        self.free = [(mem.alloc_bytes(hdr), mem.alloc(RESP_SIZE), mem.alloc(512)) for _ in range(slots)]
        self.posted: dict[int, tuple[int, int, int]] = {}
        self.completed = 0
        #: (asc, ascq) of each UNIT ATTENTION the reads were answered with
        self.unit_attentions: list[tuple[int, int]] = []

    def post(self) -> None:
        slot = self.free.pop()
        hdr, resp, din = slot
        head = self.vq.add_chain([(hdr, REQ_HDR.size, False), (resp, RESP_SIZE, True), (din, 512, True)])
        self.posted[head] = slot
        self.vq.kick()

    def reap(self) -> None:
        for el in self.vq.get_used():
            slot = self.posted.pop(el.head)
            raw = self.dev.memory.read(slot[1], RESP_SIZE)
            if raw[10] == CHECK_CONDITION and raw[12 + 2] & 0x0F == UNIT_ATTENTION:
                self.unit_attentions.append((raw[12 + 12], raw[12 + 13]))
            self.free.append(slot)
            self.completed += 1

    def keep(self, depth: int) -> None:
        self.reap()
        while len(self.posted) < depth:
            self.post()

    @property
    def in_flight(self) -> int:
        return len(self.posted)


def _segments(gpa: int, n: int, writable: bool, seg: int | None):
    if not seg:
        return [(gpa, n, writable)]
    return [(gpa + o, min(seg, n - o), writable) for o in range(0, n, seg)]


def connect_scsi(path: str, num_queues: int = 1, queue_size: int = 128, features: int | None = None,
                 memory_mb: int = 16, timeout: float = 10.0, post_events: int = 0) -> VirtioScsiDevice:
    """QEMU's handshake for vhost-user-scsi with ``num_queues`` request queues."""
    h = handshake(path, DEFAULT_FEATURES if features is None else features, 2 + num_queues,
                  queue_size=queue_size, memory_mb=memory_mb, timeout=timeout,
                  protocol_features=bit(PF.MQ) | bit(PF.REPLY_ACK) | bit(PF.CONFIG), config_size=CONFIG.size)
    config = ScsiConfig.parse(h.config) if h.config is not None else None
    dev = VirtioScsiDevice(h.frontend, h.memory, h.queues, config, h.features, h.own_memory, timeout)
    try:
        if post_events:
            dev.post_events(post_events)
    except BaseException:
        dev.close()
        raise
    return dev


# ---------------------------------------------------------------- CDB builders

def inquiry(alloc: int = 96, evpd: bool = False, page: int = 0) -> bytes:
    return struct.pack(">BBBHB", 0x12, int(evpd), page, alloc, 0)


def read_capacity10(lba: int = 0, pmi: bool = False) -> bytes:
    return struct.pack(">BBIHBB", 0x25, 0, lba, 0, int(pmi), 0)


def read_capacity16(alloc: int = 32) -> bytes:
    return struct.pack(">BBQIBB", 0x9E, 0x10, 0, alloc, 0, 0)


def rw6(write: bool, lba: int, n: int) -> bytes:
    return struct.pack(">BBHBB", 0x0A if write else 0x08, (lba >> 16) & 0x1F, lba & 0xFFFF, n & 0xFF, 0)


def rw10(write: bool, lba: int, n: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIBHB", 0x2A if write else 0x28, flags, lba, 0, n, 0)


def rw12(write: bool, lba: int, n: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIIBB", 0xAA if write else 0xA8, flags, lba, n, 0, 0)


def rw16(write: bool, lba: int, n: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQIBB", 0x8A if write else 0x88, flags, lba, n, 0, 0)


def write_same10(lba: int, n: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIBHB", 0x41, flags, lba, 0, n, 0)


def write_same16(lba: int, n: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQIBB", 0x93, flags, lba, n, 0, 0)


def unmap(plen: int, anchor: bool = False) -> bytes:
    return struct.pack(">BBIBHB", 0x42, int(anchor), 0, 0, plen, 0)


def unmap_params(*ranges: tuple[int, int]) -> bytes:
    descs = b"".join(struct.pack(">QII", lba, n, 0) for lba, n in ranges)
    return struct.pack(">HHI", 6 + len(descs), len(descs), 0) + descs


def sync_cache10(lba: int = 0, n: int = 0) -> bytes:
    return struct.pack(">BBIBHB", 0x35, 0, lba, 0, n, 0)


def sync_cache16(lba: int = 0, n: int = 0) -> bytes:
    return struct.pack(">BBQIBB", 0x91, 0, lba, n, 0, 0)


def mode_sense6(page: int, pc: int = 0, dbd: bool = False, sub: int = 0, alloc: int = 255) -> bytes:
    return struct.pack(">BBBBBB", 0x1A, 0x08 if dbd else 0, pc << 6 | page, sub, alloc, 0)


def mode_sense10(page: int, pc: int = 0, dbd: bool = False, llbaa: bool = False, sub: int = 0,
                 alloc: int = 1024) -> bytes:
    return struct.pack(">BBBBBBBHB", 0x5A, (0x08 if dbd else 0) | (0x10 if llbaa else 0), pc << 6 | page, sub,
                       0, 0, 0, alloc, 0)


def mode_select6(plen: int, sp: bool = False) -> bytes:
    return struct.pack(">BBBBBB", 0x15, 0x10 | int(sp), 0, 0, plen, 0)


def mode_select10(plen: int, sp: bool = False) -> bytes:
    return struct.pack(">BBBBBBBHB", 0x55, 0x10 | int(sp), 0, 0, 0, 0, 0, plen, 0)


def report_luns(alloc: int = 256, select: int = 0) -> bytes:
    return struct.pack(">BBBBBBIBB", 0xA0, 0, select, 0, 0, 0, alloc, 0, 0)


def request_sense(alloc: int = 252, desc: bool = False) -> bytes:
    return struct.pack(">BBBBBB", 0x03, int(desc), 0, 0, alloc, 0)


TEST_UNIT_READY = bytes(6)
START_STOP_UNIT = bytes([0x1B, 0, 0, 0, 1, 0])
