"""Inflight I/O tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD, split and packed rings).

GET_INFLIGHT_FD hands the front-end a sealed memfd, one ``QueueRegionSplit`` per queue
(16-byte header, 16 bytes per descriptor, 64-byte aligned, as in the vhost-user spec),
or ``QueueRegionPacked`` (32-byte header, 32 bytes per descriptor) once the driver
negotiated VIRTIO_F_RING_PACKED (QEMU sends SET_FEATURES before GET_INFLIGHT_FD);
the front-end keeps it across reconnects and hands it to every new target process with
SET_INFLIGHT_FD.  The buffer is mapped like guest memory (SIGBUS-guarded) and each
queue's part given to its native ring, which marks heads in flight and, at its next
start, resubmits what a previous target process left unfinished (core.c).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING

from vhost_core.log import get_logger, notice
from vhost_core.native import ffi, lib
from vhost_core.vhost_user import messages as m
from vhost_core.vhost_user.connection import Message

if TYPE_CHECKING:  # pragma: no cover
    from vhost_core.vhost_user.vrings import Vring

log = get_logger("vhost_user")

#: Why vn_vq_start did not use what it found in the inflight buffer (vn_vq_get_recovery).
INFLIGHT_RESET_REASONS = {
    1: "it was made for another ring size",
    2: "it does not match the ring",
    3: "it is too small for the ring",
}


def inflight_queue_stride(queue_size: int, packed: bool = False) -> int:
    """Bytes of one queue's part of the inflight buffer (QueueRegionSplit, or
    QueueRegionPacked for packed rings), 64-aligned."""
    if packed:
        raw = lib.VN_INFLIGHT_PACKED_HEADER + lib.VN_INFLIGHT_PACKED_DESC * queue_size
    else:
        raw = lib.VN_INFLIGHT_HEADER + lib.VN_INFLIGHT_DESC * queue_size
    return (raw + 63) & ~63


class InflightBuffer:
    """The inflight buffer of one session (``native``: its mapping, or NULL)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.native = ffi.NULL
        self._layout: tuple | None = None     # (base, mmap_size, num_queues, queue_size)

    @property
    def active(self) -> bool:
        return self.native != ffi.NULL

    @staticmethod
    def _payload(msg: Message, protocol_features: int, num_vrings: int) -> tuple[int, int, int, int]:
        if len(msg.payload) != m.INFLIGHT.size:
            raise m.ProtocolError(f"{m.Request(msg.request).name} payload is {len(msg.payload)} bytes, "
                                  f"expected {m.INFLIGHT.size}")
        mmap_size, mmap_offset, num_queues, queue_size = m.INFLIGHT.unpack(msg.payload)
        name = m.Request(msg.request).name
        if not protocol_features & (1 << m.ProtocolFeature.INFLIGHT_SHMFD):
            raise m.ProtocolError(f"{name} without the INFLIGHT_SHMFD protocol feature")
        if not 1 <= num_queues <= num_vrings:
            raise m.ProtocolError(f"{name} for {num_queues} queues (device has {num_vrings})")
        if queue_size == 0 or queue_size > m.MAX_QUEUE_SIZE or queue_size & (queue_size - 1):
            raise m.ProtocolError(f"{name} queue size {queue_size} is not a power of two "
                                  f"in 1..{m.MAX_QUEUE_SIZE}")
        return mmap_size, mmap_offset, num_queues, queue_size

    def get_fd(self, msg: Message, protocol_features: int, num_vrings: int,
               packed: bool = False) -> tuple[bytes, int]:
        """GET_INFLIGHT_FD: a new sealed, zeroed buffer: (the reply, its fd to send)."""
        _size, _offset, num_queues, queue_size = self._payload(msg, protocol_features, num_vrings)
        size = num_queues * inflight_queue_stride(queue_size, packed)
        fd = os.memfd_create("vhost-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            # Sealed, so that nobody can shrink it under a mapping (SIGBUS).
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        except OSError:
            os.close(fd)
            raise
        return m.INFLIGHT.pack(size, 0, num_queues, queue_size), fd

    def set_fd(self, msg: Message, protocol_features: int, vrings: list[Vring], packed: bool = False) -> None:
        """SET_INFLIGHT_FD: map the buffer and give each of the first queues its part."""
        mmap_size, mmap_offset, num_queues, queue_size = self._payload(msg, protocol_features, len(vrings))
        if len(msg.fds) != 1:
            raise m.ProtocolError(f"SET_INFLIGHT_FD carries {len(msg.fds)} file descriptors, expected 1")
        if any(v.started for v in vrings):
            raise ValueError("the inflight buffer cannot change while queues run")
        need = num_queues * inflight_queue_stride(queue_size)
        if mmap_size < need:
            raise ValueError(f"inflight buffer of {mmap_size} bytes is too small for {num_queues} queues "
                             f"of {queue_size} ({need} bytes)")
        # A mapping like guest memory's: SIGBUS-guarded, should the front-end shrink the file.
        new = lib.vn_mem_new()
        need = max(need, min(mmap_size, num_queues * inflight_queue_stride(queue_size, True)))
        rc = lib.vn_mem_add_region(new, msg.fds[0], 0, need, 0, mmap_offset)
        if rc < 0:
            lib.vn_mem_free(new)
            raise ValueError(f"cannot map the inflight buffer ({need} bytes at offset {mmap_offset}): "
                             f"{os.strerror(-rc)}")
        base = ffi.cast("uint8_t *", lib.vn_mem_gpa_to_host(new, 0, need))
        self.drop(vrings)
        self.native = new
        self._layout = (base, need, num_queues, queue_size)
        self.assign(vrings, packed)
        log.debug("Controller %s: inflight buffer for %d queues of %d", self.name, num_queues, queue_size)

    def assign(self, vrings: Iterable[Vring], packed: bool) -> None:
        """Give each of the first queues its part, in the layout of its rings (split or
        packed: the negotiated features may change after SET_INFLIGHT_FD)."""
        if self._layout is None or self.native == ffi.NULL:
            return
        base, mapped, num_queues, queue_size = self._layout
        stride = inflight_queue_stride(queue_size, packed)
        for v in vrings:
            if v.index >= num_queues:
                continue
            if (v.index + 1) * stride > mapped:
                lib.vn_vq_set_inflight(v.native, ffi.NULL, 0)
                log.warning("Controller %s: vring %d: the inflight buffer is too small for %s rings of %d; "
                            "its requests are not tracked", self.name, v.index,
                            "packed" if packed else "split", queue_size)
                continue
            lib.vn_vq_set_inflight(v.native, base + v.index * stride, queue_size)

    def report_recovery(self, v: Vring) -> None:
        """After a ring started with tracking: what it found and resubmitted."""
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
                   "by the previous target process", self.name, v.index, rec[0], "" if rec[0] == 1 else "s")

    def check(self) -> None:
        if self.native != ffi.NULL and lib.vn_mem_faulted(self.native):
            raise m.ProtocolError("the front-end shrank the inflight buffer under its mapping (SIGBUS)")

    def drop(self, vrings: Iterable[Vring]) -> None:
        """Stop tracking (the queues must be stopped) and unmap the buffer."""
        for v in vrings:
            lib.vn_vq_set_inflight(v.native, ffi.NULL, 0)
        self.free()

    def release(self) -> object:
        """Hand the mapping to someone else (the controller, for retired rings)."""
        self._layout = None
        native, self.native = self.native, ffi.NULL
        return native

    def free(self) -> None:
        lib.vn_mem_free(self.release())
