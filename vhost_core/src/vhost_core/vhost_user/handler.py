"""vhost-user message handling: one front-end session of one controller.

Runs on the connection's own thread, under the app's control lock.  Every field
the front-end sends is validated here before it reaches the native data path; a
violation raises :class:`ProtocolError` and the connection is dropped (the daemon
and every other controller keep serving).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from typing import TYPE_CHECKING, Callable

import attrs

from vhost_core.log import get_logger, notice
from vhost_core.native import ffi, lib
from vhost_core.vhost_user import messages as m
from vhost_core.vhost_user.connection import Connection, Message

if TYPE_CHECKING:  # pragma: no cover
    from vhost_core.controller import Controller

log = get_logger("vhost_user")

UNSHARED_MEMORY_HINT = (
    "guest memory is not shared with the vhost target: start QEMU with "
    "`-object memory-backend-memfd,id=mem,size=<RAM size>,share=on -numa node,memdev=mem` "
    "(or memory-backend-file with mem-path=/dev/hugepages and share=on)")

CORE_FEATURES = ((1 << m.VIRTIO_F_VERSION_1) | (1 << m.VHOST_USER_F_PROTOCOL_FEATURES)
                 | (1 << m.VIRTIO_RING_F_INDIRECT_DESC) | (1 << m.VIRTIO_RING_F_EVENT_IDX))
# BACKEND_REQ: a socket on which we tell the front-end that config space changed
# (a bdev was resized), so a running guest sees its disk's new size.
# INFLIGHT_SHMFD: requests in flight live on in a buffer the front-end keeps, so a
# target process that crashes and restarts resubmits them instead of losing them.
PROTOCOL_FEATURES = ((1 << m.ProtocolFeature.MQ) | (1 << m.ProtocolFeature.REPLY_ACK)
                     | (1 << m.ProtocolFeature.CONFIG) | (1 << m.ProtocolFeature.BACKEND_REQ)
                     | (1 << m.ProtocolFeature.INFLIGHT_SHMFD))
#: How long a stopping ring waits for requests its backend still holds (a stuck
#: NFS mount, a frozen filesystem) before the session is given up and the ring
#: retired.  VHOST_STOP_TIMEOUT_S overrides it.
STOP_TIMEOUT_MS = int(float(os.environ.get("VHOST_STOP_TIMEOUT_S", "30")) * 1000)
#: Draining a ring is waited for under the control lock this long; past it the lock is
#: released while waiting, so that RPCs and the other controllers are not held up.
QUICK_STOP_MS = 50
#: Bad requests from a guest are logged at most this often per session (a summary
#: with the count), so that a broken or hostile guest cannot flood the log.
ERROR_SUMMARY_INTERVAL_S = 10.0
#: Refused vhost-user messages logged one by one per session before summaries take over.
REFUSALS_LOGGED = 5
#: Requests we do not implement whose front-end side waits for a reply.
UNSUPPORTED_WITH_REPLY = frozenset({
    m.Request.IOTLB_MSG, m.Request.CREATE_CRYPTO_SESSION, m.Request.POSTCOPY_ADVISE,
    m.Request.GET_MAX_MEM_SLOTS, m.Request.GET_STATUS})
#: Why vn_vq_start did not use what it found in the inflight buffer (vn_vq_get_recovery).
INFLIGHT_RESET_REASONS = {
    1: "it was made for another ring size",
    2: "it does not match the used ring",
    3: "it is too small for the ring",
}


#: What vn_mem_add_region's errors mean for a memory region the front-end sent.
REGION_ERROR_HINTS = {
    errno.ERANGE: " (region lies past the end of its file)",
    errno.EBADFD: " (not a regular file: guest RAM must be a memfd, hugetlbfs or tmpfs file)",
    errno.EMEDIUMTYPE: (" (the file is on a filesystem that could stall the data path on page faults, "
                        "such as FUSE or NFS: back guest RAM with memory-backend-memfd, hugetlbfs or "
                        "/dev/shm)"),
    errno.EINVAL: " (offset or size not aligned to the file's page size: hugetlbfs needs huge-page alignment)",
}


def inflight_queue_stride(queue_size: int) -> int:
    """Bytes of one queue's part of the inflight buffer (QueueRegionSplit), 64-aligned."""
    raw = lib.VN_INFLIGHT_HEADER + lib.VN_INFLIGHT_DESC * queue_size
    return (raw + 63) & ~63


@attrs.define
class Vring:
    """Control-plane view of one virtqueue; ``native`` is its ``struct vn_vq``."""

    index: int
    native: object
    size: int = 0
    base: int = 0
    addr: m.VringAddr | None = None
    kick_fd: int = -1
    call_fd: int = -1
    err_fd: int = -1
    enabled: bool = False
    started: bool = False
    stopping: bool = False      # a thread drains it with the control lock released
    stuck: bool = False         # its requests never completed: still live on the reactor
    broken_reported: bool = False

    def close_fds(self) -> None:
        for name in ("kick_fd", "call_fd", "err_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)


def _check_eventfd(fd: int, what: str) -> None:
    """Kick, call and error fds must be eventfds: a pipe or socket could block the
    reactor in ways the fd guard of the data path does not bound.  Made
    non-blocking here (the front-end may undo that; the guard covers it)."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        target = "?"
    if target != "anon_inode:[eventfd]":
        raise m.ProtocolError(f"{what}: the file descriptor is not an eventfd ({target})")
    os.set_blocking(fd, False)


def _request_name(code: int) -> str:
    try:
        return m.Request(code).name
    except ValueError:
        return f"request {code}"


class Session:
    """State of one front-end connection to a controller."""

    def __init__(self, ctrlr: Controller, conn: Connection) -> None:
        self.ctrlr = ctrlr
        self.conn = conn
        self.name = ctrlr.name
        self.features = 0
        self.features_set = False
        self.protocol_features = 0
        self.mem = ffi.NULL
        self.nregions = 0
        self.vrings = [Vring(i, q) for i, q in enumerate(ctrlr.native_vqs)]
        self.reported_unshared = False
        self.mem_table_seen = False
        #: Set when a ring's requests outlived STOP_TIMEOUT_MS: the session is
        #: dropped after the current message and the ring retired (Controller.retire).
        self.wedged = False
        self.backend_sock: socket.socket | None = None
        self.inflight_mem = ffi.NULL
        self._reply_fds: list[int] = []
        self.closing = False
        self.closed = False
        self._errors_reported = [self._queue_errors(v) for v in self.vrings]
        self._refusals = self._refusals_unlogged = 0
        self._last_refusal = ""
        self._last_refusal_summary = float("-inf")
        self._last_error_summary = float("-inf")
        conn.on_idle = self.check_rings
        self._handlers: dict[int, Callable[[Message], bytes | None]] = {
            m.Request.GET_FEATURES: self._get_features,
            m.Request.SET_FEATURES: self._set_features,
            m.Request.SET_OWNER: lambda msg: None,
            m.Request.RESET_OWNER: self._reset_owner,
            m.Request.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            m.Request.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            m.Request.GET_QUEUE_NUM: self._get_queue_num,
            m.Request.SET_MEM_TABLE: self._set_mem_table,
            m.Request.SET_VRING_NUM: self._set_vring_num,
            m.Request.SET_VRING_ADDR: self._set_vring_addr,
            m.Request.SET_VRING_BASE: self._set_vring_base,
            m.Request.GET_VRING_BASE: self._get_vring_base,
            m.Request.SET_VRING_KICK: self._set_vring_kick,
            m.Request.SET_VRING_CALL: self._set_vring_call,
            m.Request.SET_VRING_ERR: self._set_vring_err,
            m.Request.SET_VRING_ENABLE: self._set_vring_enable,
            m.Request.GET_CONFIG: self._get_config,
            m.Request.SET_CONFIG: self._set_config,
            m.Request.SET_BACKEND_REQ_FD: self._set_backend_req_fd,
            m.Request.GET_INFLIGHT_FD: self._get_inflight_fd,
            m.Request.SET_INFLIGHT_FD: self._set_inflight_fd,
        }
        # Requests whose reply is their own answer (no REPLY_ACK on top).
        self._with_reply = {m.Request.GET_FEATURES, m.Request.GET_PROTOCOL_FEATURES,
                            m.Request.GET_QUEUE_NUM, m.Request.GET_VRING_BASE,
                            m.Request.GET_CONFIG, m.Request.GET_INFLIGHT_FD}

    # ---------------------------------------------------------------- dispatch

    def handle(self, msg: Message) -> None:
        """Process one message; raises ProtocolError to drop the connection."""
        try:
            if self.closing:
                raise m.ProtocolError("the session is being closed")
            self._check_memory()
        except BaseException:
            msg.close_fds()
            raise
        handler = self._handlers.get(msg.request)
        if log.isEnabledFor(10):
            log.debug("Controller %s: %s, %d bytes, %d fds", self.name, _request_name(msg.request),
                      len(msg.payload), len(msg.fds))
        try:
            if handler is None:
                try:
                    name = m.Request(msg.request).name
                except ValueError:
                    # Not a vhost-user request at all: we cannot even tell whether
                    # the front-end waits for a reply.
                    raise m.ProtocolError(f"unknown vhost-user request {msg.request}") from None
                if msg.request in UNSUPPORTED_WITH_REPLY:
                    # The front-end waits for an answer we cannot give: leaving it
                    # hanging is worse than dropping the connection.
                    raise m.ProtocolError(f"unsupported vhost-user message {name} "
                                          f"(it expects a reply; its feature was not offered)")
                self._refused(f"unsupported vhost-user message {name}, refused")
                ok, reply = False, None
            else:
                try:
                    reply = handler(msg)
                    ok = True
                    if self.wedged:
                        raise m.ProtocolError("requests of a stopped ring never completed (the backend "
                                              "is stuck); the session cannot go on")
                except ValueError as exc:
                    self._refused(f"{m.Request(msg.request).name} refused: {exc}")
                    ok, reply = False, None
        finally:
            msg.close_fds()
        if reply is not None:
            fds, self._reply_fds = self._reply_fds, []
            try:
                self.conn.reply(msg.request, reply, fds)
            finally:
                for fd in fds:
                    os.close(fd)
        elif msg.request in self._with_reply:
            # A GET we could not answer: the front-end waits for a reply, so the
            # only honest move is to drop the connection.
            raise m.ProtocolError(f"cannot answer {m.Request(msg.request).name}")
        elif (msg.flags & m.FLAG_NEED_REPLY
              and self.protocol_features & (1 << m.ProtocolFeature.REPLY_ACK)):
            self.conn.reply(msg.request, m.U64.pack(0 if ok else 1))

    # ---------------------------------------------------------------- helpers

    def _refused(self, what: str) -> None:
        """Log a refused message: the first REFUSALS_LOGGED of a session one by one,
        then one summary per ERROR_SUMMARY_INTERVAL_S (a front-end repeating a bad
        message must not flood the log)."""
        self._refusals += 1
        if self._refusals <= REFUSALS_LOGGED:
            log.error("Controller %s: %s", self.name, what)
            self._last_refusal_summary = time.monotonic()
            return
        self._refusals_unlogged += 1
        self._last_refusal = what
        now = time.monotonic()
        if now - self._last_refusal_summary >= ERROR_SUMMARY_INTERVAL_S:
            self._summarize_refusals()

    def _summarize_refusals(self) -> None:
        if not self._refusals_unlogged:
            return
        log.error("Controller %s: %d more vhost-user messages refused (last: %s)", self.name,
                  self._refusals_unlogged, self._last_refusal)
        self._refusals_unlogged = 0
        self._last_refusal_summary = time.monotonic()

    def _payload(self, msg: Message, st) -> tuple:
        if len(msg.payload) != st.size:
            raise m.ProtocolError(
                f"{m.Request(msg.request).name} payload is {len(msg.payload)} bytes, expected {st.size}")
        return st.unpack(msg.payload)

    def _vring(self, index: int) -> Vring:
        if index >= len(self.vrings):
            raise m.ProtocolError(f"vring index {index} out of range (device has {len(self.vrings)} queues)")
        return self.vrings[index]

    def offered_features(self) -> int:
        return CORE_FEATURES | self.ctrlr.backend.device_features()

    # ---------------------------------------------------------------- features

    def _get_features(self, msg: Message) -> bytes:
        return m.U64.pack(self.offered_features())

    def _set_features(self, msg: Message) -> None:
        (features,) = self._payload(msg, m.U64)
        extra = features & ~self.offered_features()
        if extra:
            raise m.ProtocolError(f"SET_FEATURES asks for bits {extra:#x} that were not offered")
        if any(v.started for v in self.vrings) and (features ^ self.features) & (
                (1 << m.VIRTIO_RING_F_EVENT_IDX) | (1 << m.VIRTIO_RING_F_INDIRECT_DESC)):
            raise ValueError("ring features cannot change while queues run")
        self.features = features
        self.features_set = True
        event_idx = bool(features & (1 << m.VIRTIO_RING_F_EVENT_IDX))
        indirect = bool(features & (1 << m.VIRTIO_RING_F_INDIRECT_DESC))
        for v in self.vrings:
            lib.vn_vq_set_features(v.native, event_idx, indirect)
        self.ctrlr.backend.features_negotiated(features)
        return None

    def _get_protocol_features(self, msg: Message) -> bytes:
        return m.U64.pack(PROTOCOL_FEATURES)

    def _set_protocol_features(self, msg: Message) -> None:
        (features,) = self._payload(msg, m.U64)
        extra = features & ~PROTOCOL_FEATURES
        if extra:
            raise m.ProtocolError(f"SET_PROTOCOL_FEATURES asks for bits {extra:#x} that were not offered")
        self.protocol_features = features

    def _get_queue_num(self, msg: Message) -> bytes:
        return m.U64.pack(self.ctrlr.backend.num_queues)

    def _reset_owner(self, msg: Message) -> None:
        self.stop_all()
        self.features = 0
        self.features_set = False
        for v in self.vrings:
            lib.vn_vq_set_features(v.native, 0, 0)

    # ---------------------------------------------------------------- memory

    def _set_mem_table(self, msg: Message) -> None:
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
        self.mem_table_seen = True
        if nregions == 0:
            self._report_unshared("the memory table has no regions")
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
        # Replace the table under running queues: stop, swap, re-translate, restart.
        running = [v for v in self.vrings if v.started]
        for v in running:
            self._stop_vring(v)
        if self.closing or self.wedged:     # closed meanwhile, or a ring never drained
            lib.vn_mem_free(new)
            raise m.ProtocolError("the session was closed while its memory table was replaced")
        old, self.mem, self.nregions = self.mem, new, nregions
        for v in self.vrings:
            lib.vn_vq_set_mem(v.native, new)
        lib.vn_mem_free(old)
        log.debug("Controller %s: memory table with %d regions", self.name, nregions)
        for v in running:
            self._start_vring(v)

    def _report_unshared(self, what: str) -> None:
        if not self.reported_unshared:
            self.reported_unshared = True
            log.error("Controller %s: %s: %s", self.name, what, UNSHARED_MEMORY_HINT)

    # ---------------------------------------------------------------- vrings

    def _set_vring_num(self, msg: Message) -> None:
        index, num = self._payload(msg, m.VRING_STATE)
        v = self._vring(index)
        if num == 0 or num > m.MAX_QUEUE_SIZE or num & (num - 1):
            raise m.ProtocolError(f"vring {index} size {num} is not a power of two in 1..{m.MAX_QUEUE_SIZE}")
        if v.started:
            raise m.ProtocolError(f"vring {index} size changed while it runs")
        v.size = num

    def _set_vring_addr(self, msg: Message) -> None:
        addr = m.VringAddr(*self._payload(msg, m.VRING_ADDR))
        v = self._vring(addr.index)
        if v.started:
            raise m.ProtocolError(f"vring {addr.index} addresses changed while it runs")
        v.addr = addr

    def _set_vring_base(self, msg: Message) -> None:
        index, num = self._payload(msg, m.VRING_STATE)
        v = self._vring(index)
        if num > 0xFFFF:
            raise m.ProtocolError(f"vring {index} base {num} exceeds 65535")
        if v.started:
            raise m.ProtocolError(f"vring {index} base changed while it runs")
        v.base = num

    def _get_vring_base(self, msg: Message) -> bytes:
        index, _num = self._payload(msg, m.VRING_STATE)
        v = self._vring(index)
        if v.started:
            self._stop_vring(v)
        base = v.base
        # The ring is stopped until the next SET_VRING_KICK.
        if v.kick_fd >= 0:
            lib.vn_vq_set_kick(v.native, -1)
            os.close(v.kick_fd)
            v.kick_fd = -1
        v.enabled = False
        return m.VRING_STATE.pack(index, base)

    def _vring_fd(self, msg: Message) -> tuple[Vring, int]:
        (value,) = self._payload(msg, m.U64)
        if value & ~(m.VRING_IDX_MASK | m.VRING_NOFD_MASK):
            raise m.ProtocolError(f"{m.Request(msg.request).name} reserved bits set in {value:#x}")
        v = self._vring(value & m.VRING_IDX_MASK)
        if value & m.VRING_NOFD_MASK:
            return v, -1
        if len(msg.fds) != 1:
            raise m.ProtocolError(f"{m.Request(msg.request).name} for vring {v.index} carries "
                                  f"{len(msg.fds)} file descriptors, expected 1")
        fd = msg.take_fd()
        try:
            _check_eventfd(fd, f"{m.Request(msg.request).name} for vring {v.index}")
        except BaseException:
            os.close(fd)
            raise
        return v, fd

    def _set_vring_kick(self, msg: Message) -> None:
        v, fd = self._vring_fd(msg)
        if v.started:
            self._stop_vring(v)
        if v.kick_fd >= 0:
            os.close(v.kick_fd)
        v.kick_fd = fd
        if not self.protocol_features_negotiated():
            v.enabled = True
        self._start_vring(v)

    def _set_vring_call(self, msg: Message) -> None:
        v, fd = self._vring_fd(msg)
        old = v.call_fd
        v.call_fd = fd
        lib.vn_vq_set_call(v.native, fd)
        if old >= 0:
            os.close(old)
        if fd >= 0 and v.started:
            # QEMU swaps the call fds of running rings right after starting the
            # device; a completion signalled on the old one is lost and the driver
            # waits forever.  A spurious interrupt costs nothing (libvhost-user
            # signals every new call fd for the same reason).
            if lib.vn_fd_signal(fd) == -errno.EINTR:
                raise m.ProtocolError(f"vring {v.index} call eventfd blocked (the front-end made it "
                                      f"blocking and filled its counter)")

    def _set_vring_err(self, msg: Message) -> None:
        v, fd = self._vring_fd(msg)
        if v.err_fd >= 0:
            os.close(v.err_fd)
        v.err_fd = fd

    def _set_vring_enable(self, msg: Message) -> None:
        index, num = self._payload(msg, m.VRING_STATE)
        v = self._vring(index)
        if num not in (0, 1):
            raise m.ProtocolError(f"SET_VRING_ENABLE {index} with value {num}")
        v.enabled = bool(num)
        lib.vn_vq_set_enabled(v.native, v.enabled)
        if v.enabled and not v.started and v.kick_fd >= 0:
            self._start_vring(v)

    def _has(self, bit: int) -> bool:
        return bool(self.features & (1 << bit))

    def protocol_features_negotiated(self) -> bool:
        return bool(self.features & (1 << m.VHOST_USER_F_PROTOCOL_FEATURES))

    def _translate_ring(self, v: Vring) -> tuple:
        assert v.addr is not None
        event = 2 if self.features & (1 << m.VIRTIO_RING_F_EVENT_IDX) else 0
        parts = (("descriptor table", v.addr.desc, 16 * v.size),
                 ("avail ring", v.addr.avail, 4 + 2 * v.size + event),
                 ("used ring", v.addr.used, 4 + 8 * v.size + event))
        out = []
        for what, uva, length in parts:
            p = lib.vn_mem_uva_to_host(self.mem, uva, length)
            if p == ffi.NULL:
                hint = UNSHARED_MEMORY_HINT if self.nregions == 0 else (
                    "the front-end's ring addresses must lie inside the memory table it sent")
                raise ValueError(f"vring {v.index} {what} at {uva:#x}+{length} is not in guest memory: {hint}")
            out.append(p)
        if v.addr.desc % 16 or v.addr.avail % 2 or v.addr.used % 4:
            raise ValueError(f"vring {v.index} addresses are misaligned")
        return tuple(out)

    def _start_vring(self, v: Vring) -> None:
        if v.started or v.kick_fd < 0 or self.closing:
            return
        if not v.size or v.addr is None:
            raise m.ProtocolError(f"vring {v.index} kicked before its size and addresses were set")
        if self.mem == ffi.NULL:
            if not self.reported_unshared:
                self.reported_unshared = True
                log.error("Controller %s: vring %d started without a memory table: %s",
                          self.name, v.index, UNSHARED_MEMORY_HINT)
            raise m.ProtocolError(f"vring {v.index} started without a memory table")
        try:
            desc, avail, used = self._translate_ring(v)
        except ValueError as exc:
            if self.nregions == 0 and not self.reported_unshared:
                self.reported_unshared = True
            raise m.ProtocolError(str(exc)) from None
        # The native ring layout must be the one just validated: the features of
        # this session, whatever an earlier session or RESET_OWNER left behind.
        lib.vn_vq_set_features(v.native, self._has(m.VIRTIO_RING_F_EVENT_IDX),
                               self._has(m.VIRTIO_RING_F_INDIRECT_DESC))
        lib.vn_vq_set_ring(v.native, v.size, desc, avail, used)
        lib.vn_vq_set_base(v.native, v.base)
        lib.vn_vq_set_kick(v.native, v.kick_fd)
        lib.vn_vq_set_call(v.native, v.call_fd)
        lib.vn_vq_set_enabled(v.native, v.enabled)
        rc = lib.vn_vq_start(v.native)
        if rc < 0:
            raise m.ProtocolError(f"vring {v.index} could not start: {os.strerror(-rc)}")
        v.started = True
        log.debug("Controller %s: vring %d started (size %d, base %d)", self.name, v.index, v.size, v.base)
        if self.inflight_mem != ffi.NULL:
            rec = ffi.new("uint32_t[2]")
            lib.vn_vq_get_recovery(v.native, rec)
            log.debug("Controller %s: vring %d inflight recovery: %d resubmitted, reset reason %d, base now %d",
                      self.name, v.index, rec[0], rec[1], lib.vn_vq_get_base(v.native))
            if rec[1]:
                log.warning("Controller %s: vring %d: ignoring the front-end's inflight buffer: %s; "
                            "nothing is resubmitted", self.name, v.index,
                            INFLIGHT_RESET_REASONS.get(rec[1], "it is inconsistent"))
            if rec[0]:
                notice(log, "Controller %s: vring %d: resubmitting %d request%s left in flight "
                       "by the previous target process", self.name, v.index, rec[0],
                       "" if rec[0] == 1 else "s")

    def _wait_unlocked(self, seconds: float) -> None:
        """Sleep with the control lock released (re-taken before returning)."""
        try:
            self.ctrlr.app.lock_cond.wait(seconds)
        except (RuntimeError, AttributeError):     # not under the app's lock (a bare Session)
            time.sleep(seconds)

    def _stop_vring(self, v: Vring) -> None:
        # Another thread (a closing RPC, or this connection's own handler) may be
        # draining this ring with the lock released: let it finish.
        while v.stopping:
            self._wait_unlocked(0.01)
        if not v.started:
            return
        v.stopping = True
        try:
            left = lib.vn_vq_stop(v.native, 0)
            queue_stopping = getattr(self.ctrlr.backend, "queue_stopping", None)
            if left and queue_stopping is not None:
                # The ring fetches nothing new now; requests the device holds without
                # end (virtio-scsi event buffers) must be handed back for it to drain.
                queue_stopping(v.index)
            if left:
                left = lib.vn_vq_stop(v.native, QUICK_STOP_MS)
            deadline = time.monotonic() + STOP_TIMEOUT_MS / 1000
            while left and time.monotonic() < deadline:
                # A slow or stuck backend (a frozen filesystem, a hung NFS mount)
                # must cost this session only, not every RPC and controller.
                self._wait_unlocked(0.01)
                left = lib.vn_vq_stop(v.native, 0)
            if left:
                # The backend never completed them.  The queue stays live on the
                # reactor for their late completions, so nothing of it may change:
                # the session ends, and the controller keeps the queue and this
                # session's memory until they complete (Controller.retire).
                v.stuck = True
                self.wedged = True
                log.error("Controller %s: vring %d stopped with %d requests still in flight after %g s; "
                          "dropping the front-end; its guest memory stays mapped until they complete",
                          self.name, v.index, left, STOP_TIMEOUT_MS / 1000)
            self._report_broken(v)
            v.broken_reported = False
            v.base = lib.vn_vq_get_base(v.native)
            v.started = False
        finally:
            v.stopping = False

    def _report_broken(self, v: Vring) -> None:
        """Log (once) why the data path stopped a ring, and signal its error eventfd."""
        if v.broken_reported or not v.started:
            return
        reason = lib.vn_vq_broken_reason(v.native)
        if reason == ffi.NULL:
            return
        v.broken_reported = True
        log.error("Controller %s: vring %d was stopped after a malformed request: %s",
                  self.name, v.index, ffi.string(reason).decode())
        if v.err_fd >= 0 and lib.vn_fd_signal(v.err_fd) == -errno.EINTR:
            # Not worth a stall each time: the front-end will learn from the log.
            os.close(v.err_fd)
            v.err_fd = -1

    def _check_memory(self) -> None:
        if self.mem != ffi.NULL and lib.vn_mem_faulted(self.mem):
            raise m.ProtocolError(
                "guest memory lost its backing pages (the front-end shrank a memory file under a "
                "mapped region, SIGBUS); those pages now read as zeros")
        if self.inflight_mem != ffi.NULL and lib.vn_mem_faulted(self.inflight_mem):
            raise m.ProtocolError("the front-end shrank the inflight buffer under its mapping (SIGBUS)")

    def check_rings(self) -> None:
        """Called while the connection is idle: report rings the data path stopped,
        without waiting for the front-end to stop them (which may be never), and
        drop a front-end whose guest memory faulted."""
        with self.ctrlr.app.lock:
            if self.ctrlr.session is not self:
                return
            for v in self.vrings:
                self._report_broken(v)
            self._summarize_errors()
            if time.monotonic() - self._last_refusal_summary >= ERROR_SUMMARY_INTERVAL_S:
                self._summarize_refusals()
            self._check_memory()

    @staticmethod
    def _queue_errors(v: Vring) -> int:
        stats = ffi.new("uint64_t[3]")
        lib.vn_vq_get_stats(v.native, stats)
        return int(stats[2])

    def _summarize_errors(self, final: bool = False) -> None:
        """Log the guest's bad requests since the last summary: the first at once,
        then at most one line per ERROR_SUMMARY_INTERVAL_S (and one at disconnect)."""
        if not final and time.monotonic() - self._last_error_summary < ERROR_SUMMARY_INTERVAL_S:
            return
        for v in self.vrings:
            total = self._queue_errors(v)
            new = total - self._errors_reported[v.index]
            if new <= 0:
                continue
            self._errors_reported[v.index] = total
            self._last_error_summary = time.monotonic()
            log.error("Controller %s: vring %d: %d bad request%s from the guest failed (buffers outside "
                      "guest memory, too many segments, or a malformed ring); %d in all, see "
                      "vhost_get_queue_stats", self.name, v.index, new, "" if new == 1 else "s", total)

    # ---------------------------------------------------------------- inflight

    def _inflight_payload(self, msg: Message) -> tuple[int, int, int, int]:
        mmap_size, mmap_offset, num_queues, queue_size = self._payload(msg, m.INFLIGHT)
        name = m.Request(msg.request).name
        if not self.protocol_features & (1 << m.ProtocolFeature.INFLIGHT_SHMFD):
            raise m.ProtocolError(f"{name} without the INFLIGHT_SHMFD protocol feature")
        if not 1 <= num_queues <= len(self.vrings):
            raise m.ProtocolError(f"{name} for {num_queues} queues (device has {len(self.vrings)})")
        if queue_size == 0 or queue_size > m.MAX_QUEUE_SIZE or queue_size & (queue_size - 1):
            raise m.ProtocolError(f"{name} queue size {queue_size} is not a power of two "
                                  f"in 1..{m.MAX_QUEUE_SIZE}")
        return mmap_size, mmap_offset, num_queues, queue_size

    def _get_inflight_fd(self, msg: Message) -> bytes:
        _size, _offset, num_queues, queue_size = self._inflight_payload(msg)
        size = num_queues * inflight_queue_stride(queue_size)
        fd = os.memfd_create("vhost-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            # Sealed, so that nobody can shrink it under a mapping (SIGBUS).
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        except OSError:
            os.close(fd)
            raise
        self._reply_fds = [fd]
        return m.INFLIGHT.pack(size, 0, num_queues, queue_size)

    def _set_inflight_fd(self, msg: Message) -> None:
        mmap_size, mmap_offset, num_queues, queue_size = self._inflight_payload(msg)
        if len(msg.fds) != 1:
            raise m.ProtocolError(f"SET_INFLIGHT_FD carries {len(msg.fds)} file descriptors, expected 1")
        if any(v.started for v in self.vrings):
            raise ValueError("the inflight buffer cannot change while queues run")
        stride = inflight_queue_stride(queue_size)
        need = num_queues * stride
        if mmap_size < need:
            raise ValueError(f"inflight buffer of {mmap_size} bytes is too small for {num_queues} queues "
                             f"of {queue_size} ({need} bytes)")
        # A mapping like guest memory's: SIGBUS-guarded, should the front-end shrink the file.
        new = lib.vn_mem_new()
        rc = lib.vn_mem_add_region(new, msg.fds[0], 0, need, 0, mmap_offset)
        if rc < 0:
            lib.vn_mem_free(new)
            raise ValueError(f"cannot map the inflight buffer ({need} bytes at offset {mmap_offset}): "
                             f"{os.strerror(-rc)}")
        base = ffi.cast("uint8_t *", lib.vn_mem_gpa_to_host(new, 0, need))
        self._drop_inflight()
        self.inflight_mem = new
        for v in self.vrings:
            if v.index < num_queues:
                lib.vn_vq_set_inflight(v.native, base + v.index * stride, queue_size)
        log.debug("Controller %s: inflight buffer for %d queues of %d", self.name, num_queues, queue_size)

    def _drop_inflight(self) -> None:
        """Stop tracking (queues must be stopped) and unmap the buffer."""
        for v in self.vrings:
            lib.vn_vq_set_inflight(v.native, ffi.NULL, 0)
        lib.vn_mem_free(self.inflight_mem)
        self.inflight_mem = ffi.NULL

    # ---------------------------------------------------------------- config

    def _get_config(self, msg: Message) -> bytes:
        if len(msg.payload) < m.CONFIG_HEADER.size:
            raise m.ProtocolError("GET_CONFIG payload shorter than its header")
        offset, size, flags = m.CONFIG_HEADER.unpack_from(msg.payload)
        if size > m.MAX_PAYLOAD - m.CONFIG_HEADER.size or offset > m.MAX_PAYLOAD:
            raise m.ProtocolError(f"GET_CONFIG offset {offset} size {size} too large")
        config = self.ctrlr.backend.get_config()
        # The reply is as long as the request's payload (the spec: "the back-end's
        # payload size MUST match the front-end's request"; libvhost-user and DPDK do
        # so), whatever its size field says; the tail past our config reads as zeros.
        room = len(msg.payload) - m.CONFIG_HEADER.size
        data = config[offset: offset + min(size, room)]
        data += bytes(room - len(data))
        return m.CONFIG_HEADER.pack(offset, size, flags) + data

    def _set_config(self, msg: Message) -> None:
        if len(msg.payload) < m.CONFIG_HEADER.size:
            raise m.ProtocolError("SET_CONFIG payload shorter than its header")
        offset, size, _flags = m.CONFIG_HEADER.unpack_from(msg.payload)
        data = msg.payload[m.CONFIG_HEADER.size:]
        if len(data) != size:
            raise m.ProtocolError("SET_CONFIG size does not match its payload")
        self.ctrlr.backend.set_config(offset, data)

    def _set_backend_req_fd(self, msg: Message) -> None:
        if not self.protocol_features & (1 << m.ProtocolFeature.BACKEND_REQ):
            raise m.ProtocolError("SET_BACKEND_REQ_FD without the BACKEND_REQ protocol feature")
        if len(msg.fds) != 1:
            raise m.ProtocolError(f"SET_BACKEND_REQ_FD carries {len(msg.fds)} file descriptors, expected 1")
        fd = msg.take_fd()
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            os.close(fd)
            raise ValueError("the back-end request fd is not a socket") from None
        # Written under the control lock: it must never wait for the front-end.
        sock.setblocking(False)
        if self.backend_sock is not None:
            self.backend_sock.close()
        self.backend_sock = sock

    def notify_config_change(self) -> bool:
        """Tell the front-end to re-read config space (QEMU then interrupts the guest).

        Returns False when the front-end gave us no back-end channel (it will see
        the new config on its next GET_CONFIG, e.g. after a reconnect)."""
        if self.backend_sock is None:
            return False
        data = m.HEADER.pack(m.BackendRequest.CONFIG_CHANGE_MSG, m.VERSION, 0)
        try:
            sent = self.backend_sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            log.error("Controller %s: cannot notify the front-end of a config change: %s", self.name, exc)
            return False
        if sent < len(data):
            # The front-end does not read its back-end channel (and a partial
            # message would garble it): give the channel up rather than wait.
            log.error("Controller %s: the front-end does not read its back-end request channel; closing "
                      "it (the guest sees the new config after a reconnect)", self.name)
            self.backend_sock.close()
            self.backend_sock = None
            return False
        notice(log, "Controller %s: config space changed, front-end notified", self.name)
        return True

    # ---------------------------------------------------------------- teardown

    def stop_all(self) -> None:
        # Every ring stops fetching first: one still running while another drains
        # would take new requests from a front-end that is going away, and the
        # drains overlap instead of adding up.
        for v in self.vrings:
            if v.started and not v.stopping:
                lib.vn_vq_stop(v.native, 0)
        for v in self.vrings:
            self._stop_vring(v)

    def close(self) -> None:
        """The front-end went away: stop every ring, then unmap its memory.

        Safe to call from two threads (the connection's, and an RPC deleting the
        controller or stopping the daemon): the second waits for the first."""
        if self.closing:
            while not self.closed:
                self._wait_unlocked(0.01)
            return
        self.closing = True
        try:
            self._close()
        finally:
            self.closed = True

    def _close(self) -> None:
        if self.features_set and not self.mem_table_seen:
            # QEMU's reaction to unshared guest RAM: it acks features, fails to
            # build the memory table ("Failed initializing vhost-user memory map")
            # and disconnects.  Say what the user must change.
            self._report_unshared("the front-end started the device without sending a memory table "
                                  "(QEMU does this when its guest RAM is not shared)")
        self.stop_all()
        self._summarize_errors(final=True)
        self._summarize_refusals()
        for v in self.vrings:
            # On the reactor's thread (vn_vq_set_*): a stuck queue is still polled.
            lib.vn_vq_set_kick(v.native, -1)
            lib.vn_vq_set_call(v.native, -1)
            lib.vn_vq_set_enabled(v.native, 0)
            v.close_fds()
        for v in self.vrings:
            if not v.stuck:
                lib.vn_vq_set_mem(v.native, ffi.NULL)
                lib.vn_vq_set_inflight(v.native, ffi.NULL, 0)
        stuck = {v.index: v.native for v in self.vrings if v.stuck}
        if stuck:
            # Late completions write into the used ring, the guest buffers and the
            # inflight buffer: the controller keeps those queues and mappings
            # until they drain, and serves the next front-end with fresh queues.
            self.ctrlr.retire(stuck, [self.mem, self.inflight_mem])
        else:
            lib.vn_mem_free(self.mem)
            lib.vn_mem_free(self.inflight_mem)
        self.mem = self.inflight_mem = ffi.NULL
        if self.backend_sock is not None:
            self.backend_sock.close()
            self.backend_sock = None
        notice(log, "Controller %s: front-end disconnected", self.name)
