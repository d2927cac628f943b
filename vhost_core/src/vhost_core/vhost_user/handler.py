"""vhost-user message handling: one front-end session of one controller.

Runs on the connection's own thread, under the app's control lock.  Every field
the front-end sends is validated here before it reaches the native data path; a
violation raises :class:`ProtocolError` and the connection is dropped (the daemon
and every other controller keep serving).

This module is the message dispatch: each request's payload checked and handed to
its owner.  The owners: :mod:`.vrings` (each ring's lifecycle: start, stop, drain,
breakage), :mod:`.memory_table` (the guest memory mapping and who owns it),
:mod:`.inflight` (the inflight buffer), and the controller's device (features and
config space).
"""

from __future__ import annotations

import errno
import os
import socket
import time
from typing import TYPE_CHECKING, Callable

from vhost_core.log import get_logger, notice
from vhost_core.native import ffi, lib
from vhost_core.vhost_user import messages as m
from vhost_core.vhost_user.connection import Connection, Message
from vhost_core.vhost_user.dirty_log import DirtyLog
from vhost_core.vhost_user.inflight import InflightBuffer
from vhost_core.vhost_user.memory_table import MemoryTable
from vhost_core.vhost_user.vrings import ERROR_SUMMARY_INTERVAL_S, Vring, Vrings

if TYPE_CHECKING:  # pragma: no cover
    from vhost_core.controller import Controller
    from vhost_core.device import Device

log = get_logger("vhost_user")

# VHOST_F_LOG_ALL with LOG_SHMFD below: live migration (the data path marks the guest
# pages it writes in QEMU's dirty log, see dirty_log.py).
CORE_FEATURES = ((1 << m.VIRTIO_F_VERSION_1) | (1 << m.VHOST_USER_F_PROTOCOL_FEATURES)
                 | (1 << m.VIRTIO_RING_F_INDIRECT_DESC) | (1 << m.VIRTIO_RING_F_EVENT_IDX)
                 | (1 << m.VHOST_F_LOG_ALL))
# BACKEND_REQ: a socket on which we tell the front-end that config space changed
# (a bdev was resized), so a running guest sees its disk's new size.
# INFLIGHT_SHMFD: requests in flight live on in a buffer the front-end keeps, so a
# target process that crashes and restarts resubmits them instead of losing them.
PROTOCOL_FEATURES = ((1 << m.ProtocolFeature.MQ) | (1 << m.ProtocolFeature.REPLY_ACK)
                     | (1 << m.ProtocolFeature.CONFIG) | (1 << m.ProtocolFeature.BACKEND_REQ)
                     | (1 << m.ProtocolFeature.INFLIGHT_SHMFD) | (1 << m.ProtocolFeature.LOG_SHMFD)
                     | (1 << m.ProtocolFeature.CONFIGURE_MEM_SLOTS))
#: Refused vhost-user messages logged one by one per session before summaries take over.
REFUSALS_LOGGED = 5
#: Requests we do not implement whose front-end side waits for a reply.
UNSUPPORTED_WITH_REPLY = frozenset({
    m.Request.IOTLB_MSG, m.Request.CREATE_CRYPTO_SESSION, m.Request.POSTCOPY_ADVISE,
    m.Request.GET_STATUS})


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
        self.device: Device = ctrlr.device
        self.conn = conn
        self.name = ctrlr.name
        self.features = 0
        self.features_set = False
        self.protocol_features = 0
        self.memory = MemoryTable(self.name, ctrlr.app.memory)
        self.inflight = InflightBuffer(self.name)
        self.dirty_log = DirtyLog(self.name)
        self.logging = False
        self.vrings = Vrings(self, ctrlr.native_vqs)
        #: Set when a ring's requests outlived the stop timeout: the session is
        #: dropped after the current message and the ring retired (Controller.retire).
        self.wedged = False
        self.backend_sock: socket.socket | None = None
        self._reply_fds: list[int] = []
        self.closing = False
        self.closed = False
        self._refusals = self._refusals_unlogged = 0
        self._last_refusal = ""
        self._last_refusal_summary = float("-inf")
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
            m.Request.SET_LOG_BASE: self._set_log_base,
            m.Request.SET_LOG_FD: self._set_log_fd,
            m.Request.GET_MAX_MEM_SLOTS: self._get_max_mem_slots,
            m.Request.ADD_MEM_REG: self._add_mem_reg,
            m.Request.REM_MEM_REG: self._rem_mem_reg,
        }
        # Requests whose reply is their own answer (no REPLY_ACK on top).
        self._with_reply = {m.Request.GET_FEATURES, m.Request.GET_PROTOCOL_FEATURES,
                            m.Request.GET_QUEUE_NUM, m.Request.GET_VRING_BASE,
                            m.Request.GET_CONFIG, m.Request.GET_INFLIGHT_FD, m.Request.SET_LOG_BASE,
                            m.Request.GET_MAX_MEM_SLOTS}

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

    def offered_features(self) -> int:
        packed = (1 << m.VIRTIO_F_RING_PACKED) if self.device.packed_ring else 0
        return CORE_FEATURES | packed | self.device.device_features()

    # ---------------------------------------------------------------- features

    def _get_features(self, msg: Message) -> bytes:
        return m.U64.pack(self.offered_features())

    def _set_features(self, msg: Message) -> None:
        (features,) = self._payload(msg, m.U64)
        extra = features & ~self.offered_features()
        if extra:
            raise m.ProtocolError(f"SET_FEATURES asks for bits {extra:#x} that were not offered")
        if self.vrings.any_started() and (features ^ self.features) & (
                (1 << m.VIRTIO_RING_F_EVENT_IDX) | (1 << m.VIRTIO_RING_F_INDIRECT_DESC)
                | (1 << m.VIRTIO_F_RING_PACKED)):
            raise ValueError("ring features cannot change while queues run")
        packed_changed = (features ^ self.features) & (1 << m.VIRTIO_F_RING_PACKED)
        self.features = features
        self.features_set = True
        if packed_changed and self.inflight.active:
            self.inflight.assign(self.vrings, self.has_feature(m.VIRTIO_F_RING_PACKED))
        self.vrings.set_features(bool(features & (1 << m.VIRTIO_RING_F_EVENT_IDX)),
                                 bool(features & (1 << m.VIRTIO_RING_F_INDIRECT_DESC)))
        self.device.features_negotiated(features)
        self.update_logging()
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
        return m.U64.pack(self.device.num_queues)

    def _reset_owner(self, msg: Message) -> None:
        self.vrings.stop_all()
        self.features = 0
        self.features_set = False
        self.vrings.set_features(False, False)
        self.update_logging()

    # ---------------------------------------------------------------- memory

    def _set_mem_table(self, msg: Message) -> None:
        new, regions = self.memory.map(msg)
        # Replace the table under running queues: stop, swap, re-translate, restart.
        running = [v for v in self.vrings if v.started]
        for v in running:
            self.vrings.stop(v)
        if self.closing or self.wedged:     # closed meanwhile, or a ring never drained
            self.memory.discard(new)
            raise m.ProtocolError("the session was closed while its memory table was replaced")
        self.vrings.set_memory(new)
        self.memory.install(new, regions)
        for v in running:
            self.vrings.start(v)

    # ---------------------------------------------------------------- memory hot-plug

    def _get_max_mem_slots(self, msg: Message) -> bytes:
        return m.U64.pack(lib.VN_MAX_REGIONS)

    def _switch_memory(self, new: object, regions: list[m.MemoryRegion]) -> None:
        # Each ring, running or not, translates with the new table from its next
        # reactor iteration on; only then is the old one (an empty shell) freed.
        self.vrings.set_memory(new)
        self.memory.install(new, regions)

    def _add_mem_reg(self, msg: Message) -> None:
        added = self.memory.with_region(msg)
        if added is None:
            return
        new, region = added
        self._switch_memory(new, self.memory.regions + [region])
        notice(log, "Controller %s: memory region gpa=%#x size %d MiB added", self.name,
               region.guest_phys_addr, region.memory_size >> 20)

    def _rem_mem_reg(self, msg: Message) -> None:
        r = self.memory.region_message(msg)
        lo, hi = r.userspace_addr, r.userspace_addr + r.memory_size
        # A ring whose own memory goes away stops first (its requests drain); it
        # serves again once the front-end gives it addresses that translate.
        for v in self.vrings:
            if v.started and v.addr is not None and any(lo <= a < hi for a in (v.addr.desc, v.addr.avail,
                                                                               v.addr.used)):
                log.error("Controller %s: vring %d lies in memory region gpa=%#x being removed; stopping it",
                          self.name, v.index, r.guest_phys_addr)
                self.vrings.stop(v)
        new, gone, region = self.memory.without_region(msg)
        self._switch_memory(new, [x for x in self.memory.regions if x != region])
        self.memory.graveyard.append(gone)
        self.bury_removed_memory()
        notice(log, "Controller %s: memory region gpa=%#x size %d MiB removed", self.name,
               region.guest_phys_addr, region.memory_size >> 20)

    def bury_removed_memory(self) -> None:
        """Unmap removed regions once no request fetched before their removal can be
        in flight any more (every ring idle at least once since)."""
        if self.memory.graveyard and all(lib.vn_vq_inflight(v.native) == 0 for v in self.vrings):
            self.memory.free_graveyard()

    # ---------------------------------------------------------------- vrings

    def _set_vring_num(self, msg: Message) -> None:
        index, num = self._payload(msg, m.VRING_STATE)
        v = self.vrings.get(index)
        if num == 0 or num > m.MAX_QUEUE_SIZE or num & (num - 1):
            raise m.ProtocolError(f"vring {index} size {num} is not a power of two in 1..{m.MAX_QUEUE_SIZE}")
        if v.started:
            raise m.ProtocolError(f"vring {index} size changed while it runs")
        v.size = num

    def _set_vring_addr(self, msg: Message) -> None:
        addr = m.VringAddr(*self._payload(msg, m.VRING_ADDR))
        v = self.vrings.get(addr.index)
        if addr.flags & ~(1 << m.VHOST_VRING_F_LOG):
            raise m.ProtocolError(f"vring {addr.index} address flags {addr.flags:#x} unknown")
        if v.started:
            # QEMU turns used-ring logging on and off this way while the ring runs
            # (live migration); the ring itself may not move.
            old = v.addr
            assert old is not None
            if (addr.desc, addr.avail, addr.used) != (old.desc, old.avail, old.used):
                raise m.ProtocolError(f"vring {addr.index} addresses changed while it runs")
            v.addr = addr
            self.vrings.apply_log(v)
            return
        v.addr = addr

    def _set_vring_base(self, msg: Message) -> None:
        index, num = self._payload(msg, m.VRING_STATE)
        v = self.vrings.get(index)
        # Packed rings: bits 0-14 the avail position, 15 its wrap counter, and the used
        # position and wrap counter in the upper half (checked against the size at start).
        if num > 0xFFFF and not self.has_feature(m.VIRTIO_F_RING_PACKED):
            raise m.ProtocolError(f"vring {index} base {num} exceeds 65535")
        if v.started:
            raise m.ProtocolError(f"vring {index} base changed while it runs")
        v.base = num

    def _get_vring_base(self, msg: Message) -> bytes:
        index, _num = self._payload(msg, m.VRING_STATE)
        v = self.vrings.get(index)
        if v.started:
            self.vrings.stop(v)
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
        v = self.vrings.get(value & m.VRING_IDX_MASK)
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
            self.vrings.stop(v)
        if v.kick_fd >= 0:
            os.close(v.kick_fd)
        v.kick_fd = fd
        if not self.protocol_features_negotiated():
            v.enabled = True
        self.vrings.start(v)

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
        v = self.vrings.get(index)
        if num not in (0, 1):
            raise m.ProtocolError(f"SET_VRING_ENABLE {index} with value {num}")
        v.enabled = bool(num)
        lib.vn_vq_set_enabled(v.native, v.enabled)
        if v.enabled and not v.started and v.kick_fd >= 0:
            self.vrings.start(v)

    def has_feature(self, bit: int) -> bool:
        return bool(self.features & (1 << bit))

    def protocol_features_negotiated(self) -> bool:
        return bool(self.features & (1 << m.VHOST_USER_F_PROTOCOL_FEATURES))

    def wait_unlocked(self, seconds: float) -> None:
        """Sleep with the control lock released (re-taken before returning)."""
        self.ctrlr.wait_unlocked(seconds)

    def _check_memory(self) -> None:
        self.bury_removed_memory()
        self.memory.check()
        self.inflight.check()
        self.dirty_log.check()

    # ---------------------------------------------------------------- live migration

    def _set_log_base(self, msg: Message) -> bytes:
        if not self.protocol_features & (1 << m.ProtocolFeature.LOG_SHMFD):
            raise m.ProtocolError("SET_LOG_BASE without the LOG_SHMFD protocol feature")
        new = self.dirty_log.map(msg)
        (size, _offset) = m.VHOST_USER_LOG.unpack(msg.payload)
        old = self.dirty_log.install(new, size)
        # Every ring switches to the new bitmap on its reactor before the old one
        # is unmapped: no mark can land in a freed mapping.
        self.update_logging()
        lib.vn_log_free(old)
        # QEMU waits for this reply (its payload is not read) before it reads the log.
        return m.U64.pack(0)

    def _set_log_fd(self, msg: Message) -> None:
        # An eventfd on which a back-end could ask QEMU to resize the log; we never
        # need to (QEMU sizes it for all of guest memory).
        if len(msg.fds) != 1:
            raise m.ProtocolError(f"SET_LOG_FD carries {len(msg.fds)} file descriptors, expected 1")

    def update_logging(self) -> None:
        """Logging is on while the driver's features carry VHOST_F_LOG_ALL and a log is
        mapped: tell every ring, and say so when it changes."""
        on = self.has_feature(m.VHOST_F_LOG_ALL) and self.dirty_log.mapped
        for v in self.vrings:
            self.vrings.apply_log(v)
        if on != self.logging:
            self.logging = on
            if on:
                notice(log, "Controller %s: dirty page logging started (live migration)", self.name)
            else:
                notice(log, "Controller %s: dirty page logging stopped", self.name)
            missed = self.dirty_log.missed()
            if missed:
                log.error("Controller %s: %d guest pages written outside the dirty log QEMU gave "
                          "(too small for guest memory): the migrated copy may miss them", self.name, missed)

    def log_params(self, v: Vring) -> tuple[object, bool, int]:
        """(vn_log or NULL, log the used ring, its guest-physical address) for ring v."""
        if not (self.has_feature(m.VHOST_F_LOG_ALL) and self.dirty_log.mapped):
            return ffi.NULL, False, 0
        addr = v.addr
        log_used = addr is not None and bool(addr.flags & (1 << m.VHOST_VRING_F_LOG))
        return self.dirty_log.native, log_used, addr.log if log_used and addr is not None else 0

    def check_rings(self) -> None:
        """Called while the connection is idle: report rings the data path stopped,
        without waiting for the front-end to stop them (which may be never), and
        drop a front-end whose guest memory faulted."""
        with self.ctrlr.app.lock:
            if self.ctrlr.session is not self:
                return
            for v in self.vrings:
                self.vrings.report_broken(v)
            self.vrings.summarize_errors()
            if time.monotonic() - self._last_refusal_summary >= ERROR_SUMMARY_INTERVAL_S:
                self._summarize_refusals()
            self._check_memory()

    # ---------------------------------------------------------------- inflight

    def _get_inflight_fd(self, msg: Message) -> bytes:
        reply, fd = self.inflight.get_fd(msg, self.protocol_features, len(self.vrings),
                                         self.has_feature(m.VIRTIO_F_RING_PACKED))
        self._reply_fds = [fd]
        return reply

    def _set_inflight_fd(self, msg: Message) -> None:
        self.inflight.set_fd(msg, self.protocol_features, list(self.vrings),
                             self.has_feature(m.VIRTIO_F_RING_PACKED))

    # ---------------------------------------------------------------- config

    def _get_config(self, msg: Message) -> bytes:
        if len(msg.payload) < m.CONFIG_HEADER.size:
            raise m.ProtocolError("GET_CONFIG payload shorter than its header")
        offset, size, flags = m.CONFIG_HEADER.unpack_from(msg.payload)
        if size > m.MAX_PAYLOAD - m.CONFIG_HEADER.size or offset > m.MAX_PAYLOAD:
            raise m.ProtocolError(f"GET_CONFIG offset {offset} size {size} too large")
        config = self.device.get_config()
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
        self.device.set_config(offset, data)

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
        self.vrings.stop_all()

    def close(self) -> None:
        """The front-end went away: stop every ring, then unmap its memory.

        Safe to call from two threads (the connection's, and an RPC deleting the
        controller or stopping the daemon): the second waits for the first."""
        if self.closing:
            while not self.closed:
                self.wait_unlocked(0.01)
            return
        self.closing = True
        try:
            self._close()
        finally:
            self.closed = True

    def _close(self) -> None:
        if self.features_set and not self.memory.seen:
            # QEMU's reaction to unshared guest RAM: it acks features, fails to
            # build the memory table ("Failed initializing vhost-user memory map")
            # and disconnects.  Say what the user must change.
            self.memory.report_unshared("the front-end started the device without sending a memory table "
                                        "(QEMU does this when its guest RAM is not shared)")
        self.vrings.stop_all()
        self.vrings.summarize_errors(final=True)
        self._summarize_refusals()
        stuck = self.vrings.detach()
        self.dirty_log.free()
        if stuck:
            # Late completions write into the used ring, the guest buffers and the
            # inflight buffer: the controller keeps those queues and mappings
            # until they drain, and serves the next front-end with fresh queues.
            self.ctrlr.retire(stuck, self.memory.release() + [self.inflight.release()])
        else:
            self.memory.free()
            self.inflight.free()
        if self.backend_sock is not None:
            self.backend_sock.close()
            self.backend_sock = None
        notice(log, "Controller %s: front-end disconnected", self.name)
