"""The vring lifecycle of one session: each ring's control-plane state, and starting,
stopping and watching its native queue (``vn_vq``) on the reactor.

A ring starts once it has a size, addresses (translated, whole, into the session's
guest memory), a kick fd and, with protocol features, an enable.  Stopping waits for
the requests the device still holds: QUICK_STOP_MS under the control lock, then with
the lock released up to STOP_TIMEOUT_MS, so that a slow or stuck backend costs this
session only; a ring whose requests never complete is marked stuck and the session
wedged (the controller retires the ring with the memory its requests write to).
"""

from __future__ import annotations

import errno
import os
import time
from typing import TYPE_CHECKING

import attrs

from vhost_core.log import get_logger
from vhost_core.native import ffi, lib
from vhost_core.vhost_user import messages as m
from vhost_core.vhost_user.memory_table import UNSHARED_MEMORY_HINT

if TYPE_CHECKING:  # pragma: no cover
    from vhost_core.vhost_user.handler import Session

log = get_logger("vhost_user")

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


def queue_errors(v: Vring) -> int:
    stats = ffi.new("uint64_t[3]")
    lib.vn_vq_get_stats(v.native, stats)
    return int(stats[2])


class Vrings:
    """The rings of one session (indexable), started and stopped for it."""

    def __init__(self, session: Session, natives: list) -> None:
        self.session = session
        self.name = session.name
        self.rings = [Vring(i, q) for i, q in enumerate(natives)]
        self._errors_reported = [queue_errors(v) for v in self.rings]
        self._last_error_summary = float("-inf")

    def __iter__(self):
        return iter(self.rings)

    def __len__(self) -> int:
        return len(self.rings)

    def get(self, index: int) -> Vring:
        if index >= len(self.rings):
            raise m.ProtocolError(f"vring index {index} out of range (device has {len(self.rings)} queues)")
        return self.rings[index]

    def any_started(self) -> bool:
        return any(v.started for v in self.rings)

    def set_features(self, event_idx: bool, indirect: bool) -> None:
        for v in self.rings:
            lib.vn_vq_set_features(v.native, event_idx, indirect)

    def set_memory(self, native_mem: object) -> None:
        for v in self.rings:
            lib.vn_vq_set_mem(v.native, native_mem)

    # ---------------------------------------------------------------- starting

    def _translate(self, v: Vring) -> tuple:
        assert v.addr is not None
        s = self.session
        event = 2 if s.has_feature(m.VIRTIO_RING_F_EVENT_IDX) else 0
        if s.has_feature(m.VIRTIO_F_RING_PACKED):
            # The descriptor ring, and the driver's and the device's event suppression areas.
            parts = (("descriptor ring", v.addr.desc, 16 * v.size),
                     ("driver event area", v.addr.avail, 4),
                     ("device event area", v.addr.used, 4))
        else:
            parts = (("descriptor table", v.addr.desc, 16 * v.size),
                     ("avail ring", v.addr.avail, 4 + 2 * v.size + event),
                     ("used ring", v.addr.used, 4 + 8 * v.size + event))
        out = []
        for what, uva, length in parts:
            p = s.memory.uva_to_host(uva, length)
            if p == ffi.NULL:
                hint = UNSHARED_MEMORY_HINT if s.memory.nregions == 0 else (
                    "the front-end's ring addresses must lie inside the memory table it sent")
                raise ValueError(f"vring {v.index} {what} at {uva:#x}+{length} is not in guest memory: {hint}")
            out.append(p)
        if v.addr.desc % 16 or v.addr.avail % 2 or v.addr.used % 4:
            raise ValueError(f"vring {v.index} addresses are misaligned")
        if s.has_feature(m.VIRTIO_F_RING_PACKED):
            used = v.base >> 16 or v.base & 0xFFFF
            if (v.base & 0x7FFF) >= v.size or (used & 0x7FFF) >= v.size:
                raise ValueError(f"vring {v.index} base {v.base:#x} is outside the packed ring of {v.size}")
        elif v.base > 0xFFFF:
            raise ValueError(f"vring {v.index} base {v.base} exceeds 65535")
        return tuple(out)

    def start(self, v: Vring) -> None:
        s = self.session
        if v.started or v.kick_fd < 0 or s.closing:
            return
        if not v.size or v.addr is None:
            raise m.ProtocolError(f"vring {v.index} kicked before its size and addresses were set")
        if s.memory.native == ffi.NULL:
            if not s.memory.reported_unshared:
                s.memory.reported_unshared = True
                log.error("Controller %s: vring %d started without a memory table: %s",
                          self.name, v.index, UNSHARED_MEMORY_HINT)
            raise m.ProtocolError(f"vring {v.index} started without a memory table")
        try:
            desc, avail, used = self._translate(v)
        except ValueError as exc:
            if s.memory.nregions == 0 and not s.memory.reported_unshared:
                s.memory.reported_unshared = True
            raise m.ProtocolError(str(exc)) from None
        # The native ring layout must be the one just validated: the features of
        # this session, whatever an earlier session or RESET_OWNER left behind.
        lib.vn_vq_set_features(v.native, s.has_feature(m.VIRTIO_RING_F_EVENT_IDX),
                               s.has_feature(m.VIRTIO_RING_F_INDIRECT_DESC))
        lib.vn_vq_set_packed(v.native, s.has_feature(m.VIRTIO_F_RING_PACKED))
        lib.vn_vq_set_ring(v.native, v.size, desc, avail, used)
        lib.vn_vq_set_base(v.native, v.base)
        lib.vn_vq_set_kick(v.native, v.kick_fd)
        lib.vn_vq_set_call(v.native, v.call_fd)
        lib.vn_vq_set_enabled(v.native, v.enabled)
        self.apply_log(v)
        rc = lib.vn_vq_start(v.native)
        if rc < 0:
            raise m.ProtocolError(f"vring {v.index} could not start: {os.strerror(-rc)}")
        v.started = True
        log.debug("Controller %s: vring %d started (size %d, base %d)", self.name, v.index, v.size, v.base)
        if s.inflight.active:
            s.inflight.report_recovery(v)

    def apply_log(self, v: Vring) -> None:
        """Point ring v at the session's dirty log, or none (live migration)."""
        log_native, log_used, used_gpa = self.session.log_params(v)
        lib.vn_vq_set_log(v.native, log_native, log_used, used_gpa)

    # ---------------------------------------------------------------- stopping

    def stop(self, v: Vring) -> None:
        s = self.session
        # Another thread (a closing RPC, or this connection's own handler) may be
        # draining this ring with the lock released: let it finish.
        while v.stopping:
            s.wait_unlocked(0.01)
        if not v.started:
            return
        v.stopping = True
        try:
            left = lib.vn_vq_stop(v.native, 0)
            if left:
                # The ring fetches nothing new now; requests the device holds without
                # end (virtio-scsi event buffers) must be handed back for it to drain.
                s.device.queue_stopping(v.index)
                left = lib.vn_vq_stop(v.native, QUICK_STOP_MS)
            deadline = time.monotonic() + STOP_TIMEOUT_MS / 1000
            while left and time.monotonic() < deadline:
                # A slow or stuck backend (a frozen filesystem, a hung NFS mount)
                # must cost this session only, not every RPC and controller.
                s.wait_unlocked(0.01)
                left = lib.vn_vq_stop(v.native, 0)
            if left:
                # The backend never completed them.  The queue stays live on the
                # reactor for their late completions, so nothing of it may change:
                # the session ends, and the controller keeps the queue and this
                # session's memory until they complete (Controller.retire).
                v.stuck = True
                s.wedged = True
                log.error("Controller %s: vring %d stopped with %d requests still in flight after %g s; "
                          "dropping the front-end; its guest memory stays mapped until they complete",
                          self.name, v.index, left, STOP_TIMEOUT_MS / 1000)
            self.report_broken(v)
            v.broken_reported = False
            v.base = lib.vn_vq_get_base(v.native)
            v.started = False
        finally:
            v.stopping = False

    def stop_all(self) -> None:
        # Every ring stops fetching first: one still running while another drains
        # would take new requests from a front-end that is going away, and the
        # drains overlap instead of adding up.
        for v in self.rings:
            if v.started and not v.stopping:
                lib.vn_vq_stop(v.native, 0)
        for v in self.rings:
            self.stop(v)

    def detach(self) -> dict[int, object]:
        """The session ends (every ring stopped): fds off the native queues and closed,
        memory and inflight regions taken away from those that drained.  Returns the
        stuck ones (index -> native queue): still live on the reactor."""
        for v in self.rings:
            # On the reactor's thread (vn_vq_set_*): a stuck queue is still polled.
            lib.vn_vq_set_kick(v.native, -1)
            lib.vn_vq_set_call(v.native, -1)
            lib.vn_vq_set_enabled(v.native, 0)
            # The log is the session's and goes with it; a stuck ring completing
            # later has nobody left to migrate for.
            lib.vn_vq_set_log(v.native, ffi.NULL, 0, 0)
            v.close_fds()
        for v in self.rings:
            if not v.stuck:
                lib.vn_vq_set_mem(v.native, ffi.NULL)
                lib.vn_vq_set_inflight(v.native, ffi.NULL, 0)
        return {v.index: v.native for v in self.rings if v.stuck}

    # ---------------------------------------------------------------- watching

    def report_broken(self, v: Vring) -> None:
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

    def summarize_errors(self, final: bool = False) -> None:
        """Log the guest's bad requests since the last summary: the first at once,
        then at most one line per ERROR_SUMMARY_INTERVAL_S (and one at disconnect)."""
        if not final and time.monotonic() - self._last_error_summary < ERROR_SUMMARY_INTERVAL_S:
            return
        for v in self.rings:
            total = queue_errors(v)
            new = total - self._errors_reported[v.index]
            if new <= 0:
                continue
            self._errors_reported[v.index] = total
            self._last_error_summary = time.monotonic()
            log.error("Controller %s: vring %d: %d bad request%s from the guest failed (buffers outside "
                      "guest memory, too many segments, or a malformed ring); %d in all, see "
                      "vhost_get_queue_stats", self.name, v.index, new, "" if new == 1 else "s", total)
