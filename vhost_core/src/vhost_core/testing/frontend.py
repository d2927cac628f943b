"""A fake vhost-user *frontend* (the QEMU side), in pure Python, for tests: the part
every device type shares.  The virtio-blk driver is :mod:`vhost_core.testing.blk`, the
virtio-scsi one ships with its plugin (``vhost_dev_scsi.testing``); a third party's
device type writes its own on top of :func:`handshake` and :class:`VirtioDevice`.

Three layers, use whichever a test needs:

1. **Raw wire** -- :meth:`VhostUserFrontend.send` / :meth:`~VhostUserFrontend.send_raw`
   / :meth:`~VhostUserFrontend.recv`: arbitrary headers, sizes, payloads, fds
   (truncated headers, lying size fields, unknown requests, 9 regions, region
   without fd, ...).
2. **Typed requests** -- one method per vhost-user request
   (``get_features()``, ``set_mem_table(mem)``, ``setup_vring(i, size)``, ...),
   with reply validation and automatic REPLY_ACK (``NEED_REPLY`` is set on
   requests without a natural reply once ``REPLY_ACK`` was negotiated; a
   non-zero ack raises :class:`VhostUserNack`).
3. **Device** -- :func:`handshake` performs QEMU's whole handshake for any
   device type; :class:`VirtioDevice` holds the result (rings, memory, config)
   and submits raw chains.  :func:`vhost_core.testing.blk.connect_blk` builds a
   virtio-blk driver on them (``read/write/flush/get_id/discard/write_zeroes``,
   ``submit``/``submit_many`` for many requests in flight on several queues).

Guest RAM is a :class:`~vhost_core.testing.memory.GuestMemory` (memfd) and the
rings are :class:`~vhost_core.testing.virtqueue.SplitVirtqueue` objects, both
re-exported here.

Minimal example::

    from vhost_core.testing.blk import connect_blk
    with connect_blk("/tmp/vhost.sock", num_queues=2) as dev:
        dev.write(0, b"\\xab" * 4096)
        assert dev.read(0, 8) == b"\\xab" * 4096
        dev.flush()

Lower level::

    fe = VhostUserFrontend("/tmp/vhost.sock")
    feats = fe.get_features()
    fe.send(999, b"")                        # unknown request
    assert fe.wait_closed(1.0) or fe.ping()  # what did the backend do?

Errors: :class:`VhostUserError` (base), :class:`ConnectionClosed` (EOF),
:class:`VhostUserProtocolError` (malformed reply), :class:`VhostUserNack`
(REPLY_ACK != 0); waits time out
with :class:`TimeoutError` (``socket.timeout`` is an alias of it).

All byte orders follow the specs: vhost-user messages are host-native, virtio
structures are little-endian.
"""

from __future__ import annotations

import array
import os
import select
import socket
import struct
import time
from dataclasses import dataclass
from typing import Callable, Iterable, NamedTuple, Sequence

from .constants import (
    REQUESTS_WITH_REPLY,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_FLAG_NEED_REPLY,
    VHOST_USER_FLAG_REPLY,
    VHOST_USER_HDR_SIZE,
    VHOST_USER_MAX_REGIONS,
    VHOST_USER_VERSION,
    VHOST_USER_VERSION_MASK,
    VHOST_USER_VRING_NOFD_MASK,
    VIRTIO_F_RING_PACKED,
    VIRTIO_RING_F_EVENT_IDX,
    VhostUserProtocolFeature as PF,
    VhostUserRequest as R,
    bit,
)
from .memory import GuestMemory, MemoryRegion
from .virtqueue import PackedVirtqueue, SplitVirtqueue, UsedElem, VirtqueueError

__all__ = [
    "VhostUserFrontend",
    "Message",
    "VhostUserError",
    "VhostUserProtocolError",
    "VhostUserNack",
    "ConnectionClosed",
    "GuestMemory",
    "MemoryRegion",
    "SplitVirtqueue",
    "UsedElem",
    "VirtqueueError",
    "VirtioDevice",
    "Handshake",
    "handshake",
    "FRONTEND_PROTOCOL_FEATURES",
]

_HDR = struct.Struct("=III")
_U64 = struct.Struct("=Q")
_STATE = struct.Struct("=II")
_ADDR = struct.Struct("=IIQQQQ")
_CFG_HDR = struct.Struct("=III")
#: refuse to buffer absurd reply sizes (a broken backend could claim 4 GiB)
MAX_REPLY_PAYLOAD = 1 << 16

#: Protocol features :func:`handshake` accepts by default (what this fake
#: frontend implements behaviour for).
FRONTEND_PROTOCOL_FEATURES = bit(PF.MQ) | bit(PF.REPLY_ACK) | bit(PF.CONFIG)


# ---------------------------------------------------------------------------
# errors and messages
# ---------------------------------------------------------------------------


class VhostUserError(Exception):
    """Base class of frontend errors."""


class ConnectionClosed(VhostUserError, ConnectionError):
    """The backend closed the socket (EOF while reading, EPIPE on write)."""


class VhostUserProtocolError(VhostUserError):
    """The backend sent something the spec does not allow (wrong request code
    in a reply, missing REPLY flag, bad size, bad version...)."""


class VhostUserNack(VhostUserError):
    """A REPLY_ACK carried a non-zero status."""

    def __init__(self, request: int, status: int) -> None:
        self.request = request
        self.status = status
        super().__init__(f"{_req_name(request)} failed: ack status {status:#x}")


def _req_name(code: int) -> str:
    try:
        return R(code).name
    except ValueError:
        return f"request#{code}"


class Message(NamedTuple):
    """A received vhost-user message: ``(request, flags, payload, fds)``.

    ``fds`` are *owned by the caller* (close them; the typed helpers do).
    """

    request: int
    flags: int
    payload: bytes
    fds: list

    @property
    def version(self) -> int:
        return self.flags & VHOST_USER_VERSION_MASK

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & VHOST_USER_FLAG_REPLY)

    def u64(self) -> int:
        """Payload as a native u64 (raises on wrong size)."""
        if len(self.payload) != 8:
            raise VhostUserProtocolError(
                f"{_req_name(self.request)} reply: expected 8-byte u64, got {len(self.payload)}")
        return _U64.unpack(self.payload)[0]

    def close_fds(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds.clear()


# ---------------------------------------------------------------------------
# the frontend
# ---------------------------------------------------------------------------


class VhostUserFrontend:
    """Client side of one vhost-user connection.

    Args:
        path: unix socket of the backend; connection is retried until
            ``connect_timeout`` (the backend may still be starting).
        sock: use an already connected ``AF_UNIX``/``SOCK_STREAM`` socket
            instead (e.g. one end of ``socket.socketpair()`` for in-process
            backends).
        timeout: default seconds to wait for a reply.
        reply_ack: set NEED_REPLY automatically once REPLY_ACK is negotiated
            (default True; turn off to test a backend's behaviour without it).

    State attributes (updated by the typed helpers):
        features: last value returned by GET_FEATURES.
        acked_features: last value sent with SET_FEATURES.
        backend_protocol_features / protocol_features: offered / acked.
        memory: the :class:`GuestMemory` sent with the last SET_MEM_TABLE.
        vrings: ``{index: SplitVirtqueue}`` set up by :meth:`setup_vring`
            (closed with the frontend).
        unexpected: messages received by :meth:`wait_closed` while waiting.
    """

    def __init__(self, path: str | os.PathLike | None = None, *,
                 sock: socket.socket | None = None, timeout: float = 5.0,
                 connect_timeout: float = 5.0, reply_ack: bool = True) -> None:
        if (path is None) == (sock is None):
            raise ValueError("give exactly one of path / sock")
        self.path = None if path is None else os.fspath(path)
        self.timeout = timeout
        self.use_reply_ack = reply_ack
        self.features: int | None = None
        self.acked_features: int | None = None
        self.backend_protocol_features: int | None = None
        self.protocol_features: int = 0
        self.memory: GuestMemory | None = None
        self.vrings: dict[int, SplitVirtqueue] = {}
        self.unexpected: list[Message] = []
        self._rxbuf = b""
        if sock is None:
            sock = self._connect(self.path, connect_timeout)
        self.sock = sock
        self.sock.settimeout(timeout)

    @staticmethod
    def _connect(path: str, connect_timeout: float) -> socket.socket:
        deadline = time.monotonic() + connect_timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                s.connect(path)
                return s
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)
            except BaseException:
                s.close()
                raise

    # -- context manager ----------------------------------------------------

    def __enter__(self) -> "VhostUserFrontend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the socket and the eventfds of all vrings (idempotent).
        Does not close :attr:`memory` (the caller owns it)."""
        for vq in self.vrings.values():
            vq.close()
        self.vrings.clear()
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None

    @property
    def closed(self) -> bool:
        return self.sock is None

    def fileno(self) -> int:
        return self.sock.fileno()

    # -- raw wire -----------------------------------------------------------

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send arbitrary bytes (fds ride on the first byte)."""
        data = bytes(data)
        try:
            if fds:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", list(fds)))]
                n = self.sock.sendmsg([data], anc)
            else:
                n = self.sock.send(data) if data else 0
            if n < len(data):
                self.sock.sendall(data[n:])
        except (BrokenPipeError, ConnectionResetError) as e:
            raise ConnectionClosed(f"send failed: {e}") from e

    def send(self, request: int, payload: bytes = b"", fds: Sequence[int] = (),
             flags: int | None = None, need_reply: bool = False,
             size: int | None = None) -> None:
        """Send one message.

        ``flags`` defaults to version 1 (``0x1``); ``need_reply`` ORs in
        NEED_REPLY. ``size`` overrides the header's size field (lie about the
        payload length); ``payload`` is sent verbatim either way. Nothing is
        read back -- use :meth:`recv`.
        """
        if flags is None:
            flags = VHOST_USER_VERSION
        if need_reply:
            flags |= VHOST_USER_FLAG_NEED_REPLY
        payload = bytes(payload)
        hdr = _HDR.pack(request & 0xFFFFFFFF, flags & 0xFFFFFFFF,
                        (len(payload) if size is None else size) & 0xFFFFFFFF)
        self.send_raw(hdr + payload, fds)

    def _recv_exact(self, n: int, fds: list, timeout: float | None) -> bytes:
        buf = bytearray()
        self.sock.settimeout(self.timeout if timeout is None else timeout)
        while len(buf) < n:
            try:
                data, anc, msg_flags, _ = self.sock.recvmsg(
                    n - len(buf), socket.CMSG_SPACE(4 * VHOST_USER_MAX_REGIONS),
                    socket.MSG_CMSG_CLOEXEC)
            except ConnectionResetError as e:
                raise ConnectionClosed(str(e)) from e
            for level, typ, cdata in anc:
                if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(cdata[: len(cdata) - len(cdata) % a.itemsize])
                    fds.extend(a)
            if msg_flags & socket.MSG_CTRUNC:
                raise VhostUserProtocolError("backend sent more fds than allowed (MSG_CTRUNC)")
            if not data:
                raise ConnectionClosed(
                    f"backend closed the connection ({len(buf)}/{n} bytes read)")
            buf += data
        return bytes(buf)

    def recv(self, timeout: float | None = None) -> Message:
        """Read one message ``(request, flags, payload, fds)``. Raises
        :class:`ConnectionClosed` on EOF and :class:`TimeoutError` on timeout
        (the stream is then out of sync; reconnect)."""
        fds: list[int] = []
        try:
            hdr = self._recv_exact(VHOST_USER_HDR_SIZE, fds, timeout)
            request, flags, size = _HDR.unpack(hdr)
            if size > MAX_REPLY_PAYLOAD:
                raise VhostUserProtocolError(f"reply size {size} is absurd")
            payload = self._recv_exact(size, fds, timeout) if size else b""
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return Message(request, flags, payload, fds)

    def wait_closed(self, timeout: float = 1.0) -> bool:
        """Wait until the backend closes the connection. Returns True on EOF,
        False on timeout; messages received meanwhile go to
        :attr:`unexpected` (their fds closed)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            r, _, _ = select.select([self.sock], [], [], remaining)
            if not r:
                return False
            try:
                msg = self.recv(timeout=max(0.01, deadline - time.monotonic()))
            except ConnectionClosed:
                return True
            except (TimeoutError, VhostUserProtocolError):
                return False
            msg.close_fds()
            self.unexpected.append(msg)

    def is_connected(self) -> bool:
        """True if the backend has not closed the socket (non-blocking peek)."""
        if self.sock is None:
            return False
        r, _, _ = select.select([self.sock], [], [], 0)
        if not r:
            return True
        try:
            return bool(self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except BlockingIOError:
            return True
        except OSError:
            return False

    # -- request/reply plumbing ----------------------------------------------

    @property
    def reply_ack_enabled(self) -> bool:
        """REPLY_ACK negotiated and not disabled via ``reply_ack=False``."""
        return self.use_reply_ack and bool(self.protocol_features & bit(PF.REPLY_ACK))

    def recv_reply(self, request: int, *, size: int | None = None,
                   min_size: int = 0, timeout: float | None = None) -> Message:
        """Receive and validate the reply to ``request`` (same request code,
        REPLY flag, version 1, exact ``size`` if given)."""
        msg = self.recv(timeout)
        try:
            if msg.request != request:
                raise VhostUserProtocolError(
                    f"expected reply to {_req_name(request)}, got {_req_name(msg.request)}")
            if not msg.is_reply:
                raise VhostUserProtocolError(f"{_req_name(request)} reply lacks the REPLY flag")
            if msg.version != VHOST_USER_VERSION:
                raise VhostUserProtocolError(
                    f"{_req_name(request)} reply has version {msg.version}")
            if size is not None and len(msg.payload) != size:
                raise VhostUserProtocolError(
                    f"{_req_name(request)} reply: payload {len(msg.payload)} bytes, expected {size}")
            if len(msg.payload) < min_size:
                raise VhostUserProtocolError(
                    f"{_req_name(request)} reply: payload {len(msg.payload)} < {min_size}")
        except BaseException:
            msg.close_fds()
            raise
        return msg

    def request(self, request: int, payload: bytes = b"", fds: Sequence[int] = (), *,
                reply_size: int | None = None, timeout: float | None = None) -> Message:
        """Send a request that has a natural reply and return the validated
        reply (caller owns its fds)."""
        self.send(request, payload, fds)
        return self.recv_reply(request, size=reply_size, timeout=timeout)

    def command(self, request: int, payload: bytes = b"", fds: Sequence[int] = (), *,
                ack: bool | None = None) -> None:
        """Send a request without a natural reply. If ``ack`` (default: REPLY_ACK
        negotiated and ``request`` has no natural reply), set NEED_REPLY, wait for the ack and raise
        :class:`VhostUserNack` if it is non-zero."""
        if ack is None:
            ack = self.reply_ack_enabled and request not in REQUESTS_WITH_REPLY
        self.send(request, payload, fds, need_reply=ack)
        if ack:
            msg = self.recv_reply(request, size=8)
            msg.close_fds()
            status = msg.u64()
            if status != 0:
                raise VhostUserNack(request, status)

    def ping(self) -> bool:
        """Round trip (GET_FEATURES) proving the backend processed everything
        sent before. Returns True, or raises (e.g. :class:`ConnectionClosed`)."""
        self.request(R.GET_FEATURES, reply_size=8).u64()
        return True

    # -- typed requests ----------------------------------------------------

    def get_features(self) -> int:
        """GET_FEATURES -> device feature bits offered."""
        self.features = self.request(R.GET_FEATURES, reply_size=8).u64()
        return self.features

    def set_features(self, features: int) -> None:
        """SET_FEATURES (include bit 30 to keep protocol features enabled)."""
        self.command(R.SET_FEATURES, _U64.pack(features))
        self.acked_features = features

    def get_protocol_features(self) -> int:
        """GET_PROTOCOL_FEATURES -> protocol feature bits offered."""
        self.backend_protocol_features = self.request(
            R.GET_PROTOCOL_FEATURES, reply_size=8).u64()
        return self.backend_protocol_features

    def set_protocol_features(self, features: int) -> None:
        """SET_PROTOCOL_FEATURES. REPLY_ACK takes effect for later requests
        (this one is never sent with NEED_REPLY)."""
        self.command(R.SET_PROTOCOL_FEATURES, _U64.pack(features), ack=False)
        self.protocol_features = features

    def set_owner(self) -> None:
        self.command(R.SET_OWNER)

    def reset_owner(self) -> None:
        self.command(R.RESET_OWNER)

    def reset_device(self) -> None:
        """RESET_DEVICE (needs the RESET_DEVICE protocol feature)."""
        self.command(R.RESET_DEVICE)

    def get_queue_num(self) -> int:
        """GET_QUEUE_NUM (needs MQ) -> max number of queues."""
        return self.request(R.GET_QUEUE_NUM, reply_size=8).u64()

    def get_max_mem_slots(self) -> int:
        """GET_MAX_MEM_SLOTS (needs CONFIGURE_MEM_SLOTS)."""
        return self.request(R.GET_MAX_MEM_SLOTS, reply_size=8).u64()

    def set_status(self, status: int) -> None:
        """SET_STATUS (needs STATUS): virtio device status byte."""
        self.command(R.SET_STATUS, _U64.pack(status))

    def get_status(self) -> int:
        return self.request(R.GET_STATUS, reply_size=8).u64()

    @staticmethod
    def mem_table_payload(regions: Iterable[MemoryRegion], nregions: int | None = None) -> bytes:
        """SET_MEM_TABLE payload: ``u32 nregions, u32 padding, regions[]``.
        ``nregions`` overrides the count field (lie about it)."""
        regions = list(regions)
        n = len(regions) if nregions is None else nregions
        return struct.pack("=II", n, 0) + b"".join(r.pack() for r in regions)

    def set_mem_table(self, memory: GuestMemory | Sequence[MemoryRegion], *,
                      fds: Sequence[int] | None = None) -> None:
        """SET_MEM_TABLE with every region of ``memory`` (one fd per region,
        or the explicit ``fds`` list -- e.g. fewer fds than regions)."""
        regions = memory.regions if isinstance(memory, GuestMemory) else list(memory)
        if fds is None:
            fds = [r.fd for r in regions]
        self.command(R.SET_MEM_TABLE, self.mem_table_payload(regions), fds)
        if isinstance(memory, GuestMemory):
            self.memory = memory

    def add_mem_reg(self, region: MemoryRegion, *, with_fd: bool = True) -> None:
        """ADD_MEM_REG (needs CONFIGURE_MEM_SLOTS): ``u64 padding + region``."""
        self.command(R.ADD_MEM_REG, _U64.pack(0) + region.pack(),
                     [region.fd] if with_fd else [])

    def rem_mem_reg(self, region: MemoryRegion, *, with_fd: bool = False) -> None:
        """REM_MEM_REG (needs CONFIGURE_MEM_SLOTS)."""
        self.command(R.REM_MEM_REG, _U64.pack(0) + region.pack(),
                     [region.fd] if with_fd else [])

    def set_vring_num(self, index: int, num: int) -> None:
        self.command(R.SET_VRING_NUM, _STATE.pack(index, num))

    def set_vring_base(self, index: int, base: int) -> None:
        """SET_VRING_BASE: the backend's initial last_avail_idx."""
        self.command(R.SET_VRING_BASE, _STATE.pack(index, base))

    def set_vring_addr(self, index: int, desc: int, used: int, avail: int, *,
                       flags: int = 0, log: int = 0) -> None:
        """SET_VRING_ADDR with *frontend user addresses* (see
        :meth:`SplitVirtqueue.uaddrs`). Payload order: index, flags, desc,
        used, avail, log."""
        self.command(R.SET_VRING_ADDR, _ADDR.pack(index, flags, desc, used, avail, log))

    def _vring_fd(self, request: int, index: int, fd: int | None) -> None:
        val = index & 0xFF
        if fd is None:
            val |= VHOST_USER_VRING_NOFD_MASK
        self.command(request, _U64.pack(val), [] if fd is None else [fd])

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        """SET_VRING_KICK with an eventfd, or ``None`` -> NOFD bit (polling)."""
        self._vring_fd(R.SET_VRING_KICK, index, fd)

    def set_vring_call(self, index: int, fd: int | None) -> None:
        """SET_VRING_CALL with an eventfd, or ``None`` -> NOFD bit."""
        self._vring_fd(R.SET_VRING_CALL, index, fd)

    def set_vring_err(self, index: int, fd: int | None) -> None:
        self._vring_fd(R.SET_VRING_ERR, index, fd)

    def set_vring_enable(self, index: int, enable: bool = True) -> None:
        """SET_VRING_ENABLE (rings start disabled when bit 30 is negotiated)."""
        self.command(R.SET_VRING_ENABLE, _STATE.pack(index, 1 if enable else 0))

    def get_vring_base(self, index: int) -> int:
        """GET_VRING_BASE: stops the ring, returns the backend's
        last_avail_idx. Closes nothing (the vring object stays usable for a
        later ``setup_vring(..., vq=vq, base=...)``)."""
        msg = self.request(R.GET_VRING_BASE, _STATE.pack(index, 0), reply_size=8)
        msg.close_fds()
        idx, num = _STATE.unpack(msg.payload)
        if idx != index:
            raise VhostUserProtocolError(f"GET_VRING_BASE reply for vring {idx}, asked {index}")
        return num

    def setup_vring(self, index: int, size: int = 128, *, vq: SplitVirtqueue | PackedVirtqueue | None = None,
                    memory: GuestMemory | None = None, base: int | None = None,
                    event_idx: bool | None = None, legacy_layout: bool = False,
                    region: int | None = None, kick: bool = True, call: bool = True,
                    enable: bool | None = None, strict: bool = True,
                    packed: bool | None = None) -> SplitVirtqueue | PackedVirtqueue:
        """Create (or reuse ``vq``) a split ring and configure vring ``index``
        the way QEMU does: SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR,
        SET_VRING_KICK, SET_VRING_CALL (then SET_VRING_ENABLE if ``enable`` is
        not None).

        ``memory`` defaults to the last SET_MEM_TABLE's; ``event_idx`` defaults
        to whether VIRTIO_RING_F_EVENT_IDX was acked; ``kick``/``call`` False
        send the NOFD flag instead of an eventfd. The queue is recorded in
        :attr:`vrings` (a previous queue at that index is closed).  ``packed``
        (default: whether VIRTIO_F_RING_PACKED was acked) makes a
        :class:`PackedVirtqueue`, whose base defaults to its own position."""
        mem = memory or self.memory
        if vq is None:
            if mem is None:
                raise VhostUserError("setup_vring needs guest memory (call set_mem_table first)")
            if event_idx is None:
                event_idx = bool((self.acked_features or 0) & bit(VIRTIO_RING_F_EVENT_IDX))
            if packed is None:
                packed = bool((self.acked_features or 0) & bit(VIRTIO_F_RING_PACKED))
            if packed:
                vq = PackedVirtqueue(mem, size, index=index, event_idx=event_idx, region=region,
                                     strict=strict)
            else:
                vq = SplitVirtqueue(mem, size, index=index, event_idx=event_idx,
                                    legacy_layout=legacy_layout, region=region,
                                    start_idx=base or 0, strict=strict)
        if base is None:
            base = vq.vring_base if getattr(vq, "packed", False) else 0
        old = self.vrings.get(index)
        if old is not None and old is not vq:
            old.close()
        self.vrings[index] = vq
        self.set_vring_num(index, vq.size)
        self.set_vring_base(index, base)
        self.set_vring_addr(index, *vq.uaddrs())
        self.set_vring_kick(index, vq.kick_fd if kick else None)
        self.set_vring_call(index, vq.call_fd if call else None)
        if enable is not None:
            self.set_vring_enable(index, enable)
        return vq

    def get_config(self, offset: int = 0, size: int = 60, flags: int = 0) -> bytes:
        """GET_CONFIG (needs CONFIG): returns ``size`` bytes of config space."""
        msg = self.request(R.GET_CONFIG, _CFG_HDR.pack(offset, size, flags) + bytes(size),
                           reply_size=_CFG_HDR.size + size)
        msg.close_fds()
        r_off, r_size, _ = _CFG_HDR.unpack_from(msg.payload)
        if (r_off, r_size) != (offset, size):
            raise VhostUserProtocolError(
                f"GET_CONFIG reply for offset {r_off} size {r_size}, asked {offset}/{size}")
        return msg.payload[_CFG_HDR.size:]

    def set_config(self, offset: int, data: bytes, flags: int = 0) -> None:
        """SET_CONFIG (needs CONFIG): write ``data`` at config ``offset``."""
        self.command(R.SET_CONFIG, _CFG_HDR.pack(offset, len(data), flags) + bytes(data))

    def set_backend_req_fd(self, fd: int) -> None:
        """SET_BACKEND_REQ_FD (needs BACKEND_REQ): hand over one end of a
        socketpair; the test must service backend requests on the other."""
        self.command(R.SET_BACKEND_REQ_FD, b"", [fd])


# ---------------------------------------------------------------------------
# any device type: QEMU's handshake, and the device it leaves
# ---------------------------------------------------------------------------


@dataclass
class Handshake:
    """What :func:`handshake` negotiated and set up."""

    frontend: VhostUserFrontend
    memory: GuestMemory
    own_memory: bool
    queues: list[SplitVirtqueue]
    config: bytes | None            # raw config space (CONFIG negotiated), else None
    features: int                   # acked device features
    offered_features: int
    protocol_features: int          # acked
    offered_protocol_features: int


def handshake(path: str | os.PathLike, device_features: int, num_queues: int, *, queue_size: int = 128,
              memory_mb: int = 16, protocol_features: int | None = None, memory: GuestMemory | None = None,
              timeout: float = 10.0, connect_timeout: float = 5.0, config_size: int = 0,
              legacy_layout: bool = False, enable: bool = True,
              check: Callable[[int, int, bytes | None], None] | None = None) -> Handshake:
    """QEMU's handshake with a vhost-user back-end of any device type:

    GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM (if MQ),
    SET_OWNER, GET_CONFIG (if CONFIG and ``config_size``), SET_FEATURES, SET_MEM_TABLE,
    then per virtqueue SET_VRING_NUM/BASE/ADDR/KICK/CALL, then SET_VRING_ENABLE for each
    (if protocol features were negotiated and ``enable``).

    ``device_features``: acked = offered & this (VHOST_USER_F_PROTOCOL_FEATURES is added
    when offered); ``protocol_features``: acked = offered & this (default
    :data:`FRONTEND_PROTOCOL_FEATURES`); ``memory``: use this guest memory (not closed by
    the device) instead of ``GuestMemory.pc_like(memory_mb MiB)``; ``check(acked,
    backend_queues, config)``: the device type's own refusals, before SET_FEATURES
    (raise :class:`VhostUserError`).  Raises :class:`VhostUserError` if the back-end
    cannot serve ``num_queues`` virtqueues.
    """
    fe = VhostUserFrontend(path, timeout=timeout, connect_timeout=connect_timeout)
    own_memory = memory is None
    try:
        offered = fe.get_features()
        acked = offered & device_features & ~bit(VHOST_USER_F_PROTOCOL_FEATURES)
        offered_pf = 0
        pf = 0
        if offered & bit(VHOST_USER_F_PROTOCOL_FEATURES):
            acked |= bit(VHOST_USER_F_PROTOCOL_FEATURES)
            offered_pf = fe.get_protocol_features()
            pf = offered_pf & (FRONTEND_PROTOCOL_FEATURES if protocol_features is None else protocol_features)
            fe.set_protocol_features(pf)
        maxq = num_queues
        if pf & bit(PF.MQ):
            maxq = fe.get_queue_num()
            if num_queues > maxq:
                raise VhostUserError(f"backend supports {maxq} queues, {num_queues} requested")
        fe.set_owner()
        config = fe.get_config(0, config_size) if pf & bit(PF.CONFIG) and config_size else None
        if check is not None:
            check(acked, maxq, config)
        fe.set_features(acked)
        if memory is None:
            memory = GuestMemory.pc_like(memory_mb << 20)
        fe.set_mem_table(memory)
        event_idx = bool(acked & bit(VIRTIO_RING_F_EVENT_IDX))
        queues = [fe.setup_vring(i, queue_size, event_idx=event_idx, legacy_layout=legacy_layout)
                  for i in range(num_queues)]
        if enable and acked & bit(VHOST_USER_F_PROTOCOL_FEATURES):
            for i in range(num_queues):
                fe.set_vring_enable(i, True)
        return Handshake(fe, memory, own_memory, queues, config, acked, offered, pf, offered_pf)
    except BaseException:
        fe.close()
        if own_memory and memory is not None:
            memory.close()
        raise


class VirtioDevice:
    """A driver's common half over a :class:`VhostUserFrontend`: the rings, guest
    memory, negotiated features, and raw chains.  Device types subclass it.

    Attributes: ``frontend``, ``memory``, ``queues`` (list of :class:`SplitVirtqueue`),
    ``features`` (acked device features), ``timeout``.
    """

    def __init__(self, frontend: VhostUserFrontend, memory: GuestMemory, queues: list[SplitVirtqueue],
                 features: int, *, own_memory: bool = True, timeout: float = 10.0) -> None:
        self.frontend = frontend
        self.memory = memory
        self.queues = queues
        self.features = features
        self.own_memory = own_memory
        self.timeout = timeout

    def close(self) -> None:
        """Close the connection (the back-end sees a disconnect), the rings' eventfds
        and (if owned) guest memory."""
        self.frontend.close()
        for q in self.queues:
            q.close()
        if self.own_memory:
            self.memory.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def has_feature(self, b: int) -> bool:
        """Whether device feature bit number ``b`` was acked."""
        return bool(self.features & bit(b))

    def chain(self, queue: int, bufs, *, timeout: float | None = None, indirect: bool = False) -> int:
        """Submit ``[(gpa, len, writable), ...]`` on ``queue``; wait; return the used length."""
        vq = self.queues[queue]
        head = vq.add_chain(bufs, indirect=indirect)
        vq.kick()
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            for el in vq.wait_used(max(0.01, deadline - time.monotonic())):
                if el.head == head:
                    return el.len
                # a late completion of another chain: ignore
