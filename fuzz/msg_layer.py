#!/usr/bin/env python3
"""Fuzz target (atheris): the vhost-user message layer, vhost_core's
``vhost_user/connection.py`` (framing, SCM_RIGHTS) and ``vhost_user/handler.py``
(``Session.handle``: every request, with its file descriptors).

Each input is a byte stream a front-end writes to the controller socket, with
the descriptors it passes: a socketpair stands in for the accepted socket, a
real ``Connection`` reads it, and a real ``Session`` handles each message under
the app lock, as ``Controller._serve`` does.  The controller around it is a
stand-in with native queues of the real core (on a reactor that never starts,
so control calls run inline) and the dev_blk plugin's device table.

Oracle: whatever the bytes and descriptors, a message ends in a reply, a
``ProtocolError`` (the connection is dropped) or an ``OSError`` from a
descriptor the front-end passed (``Controller._serve`` drops the connection
too); never another exception.  Then ``Session.close`` cleans up without an
exception, and no file descriptor is left open.

Input: records until the input ends.  ``0x00 u16 n`` + n raw bytes go to the
socket as they are (broken framing); any other kind byte is a message: ``u8
request, u8 flags, u8 nfds, u16 payload length``, the fds as ``u8 kind, u32
size`` each (see ``FD_KINDS``), then the payload.

    .venv/bin/python fuzz/msg_layer.py -max_total_time=60 fuzz/corpus/msg_layer
    .venv/bin/python fuzz/msg_layer.py --make-seeds fuzz/corpus/msg_layer
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import sys
import threading

import atheris

with atheris.instrument_imports(include=["vhost_core.vhost_user"]):
    from vhost_core.vhost_user import connection as vconn
    from vhost_core.vhost_user import handler as vhandler
    from vhost_core.vhost_user import messages as m

from vhost_core.native import ffi, lib

REC_RAW = 0
FD_EVENTFD, FD_MEMFD, FD_PIPE_R, FD_PIPE_W, FD_SOCKET, FD_DEVNULL, FD_SEALED_MEMFD = range(7)
FD_KINDS = 7
NUM_QUEUES = 2


# ------------------------------------------------------------ the stand-in controller

class FakeApp:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.lock_cond = threading.Condition(self.lock)
        from vhost_core.memory_registration import MemoryRegistry
        self.memory = MemoryRegistry()      # the daemon's registry of guest mappings (for DMA)

    def wait_unlocked(self, seconds: float) -> None:
        self.lock_cond.wait(seconds)


class FakeBackend:
    """A blk-like device type: real native table (dev_blk's), no bdev behind it."""

    device_type = "blk"
    num_queues = NUM_QUEUES
    packed_ring = True          # offer VIRTIO_F_RING_PACKED, as dev_blk does by default

    def __init__(self) -> None:
        from vhost_dev_blk._blk_native import ffi as bffi, lib as blib

        self._id = bffi.new("char[]", b"fuzz")
        self._native = blib.blk_dev_new(bffi.NULL, 0, self._id, 1 << 22)
        self.native_ops = int(bffi.cast("uintptr_t", blib.blk_device_ops()))
        self.native_ctx = int(bffi.cast("uintptr_t", self._native))
        self.stopping: list[int] = []

    def device_features(self) -> int:
        return (1 << 1) | (1 << 2) | (1 << 6) | (1 << 9) | (1 << 12)

    def get_config(self) -> bytes:
        return bytes(range(60))

    def set_config(self, offset: int, data: bytes) -> None:
        raise ValueError("the config space is read-only")

    def features_negotiated(self, features: int) -> None:
        pass

    def queue_stopping(self, index: int) -> None:
        self.stopping.append(index)


class FakeController:
    def __init__(self) -> None:
        self.name = "fuzz.0"
        self.app = FakeApp()
        self.device = FakeBackend()
        # A reactor that never starts: vn_reactor_exec runs control calls inline.
        self.reactor = lib.vn_reactor_new(-1, 1)
        ops = ffi.cast("const struct vn_device_ops *", self.device.native_ops)
        self.native_dev = lib.vn_dev_new(self.reactor, ops, ffi.cast("void *", self.device.native_ctx),
                                         ffi.NULL)
        assert self.native_dev != ffi.NULL
        self.native_vqs = [lib.vn_vq_new(self.native_dev, i) for i in range(NUM_QUEUES)]
        self.session = None

    def wait_unlocked(self, seconds: float) -> None:
        self.app.wait_unlocked(seconds)


CTRLR: FakeController | None = None


# ------------------------------------------------------------ input decoding

class Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def done(self) -> bool:
        return self.pos >= len(self.data)

    def take(self, n: int) -> bytes:
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b.ljust(n, b"\0")

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return struct.unpack("<H", self.take(2))[0]

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]


def make_fd(kind: int, size: int) -> tuple[int, list[int]]:
    """The descriptor to pass, and the harness's own descriptors to close after sending."""
    kind %= FD_KINDS
    if kind == FD_EVENTFD:
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        return fd, [fd]
    if kind in (FD_MEMFD, FD_SEALED_MEMFD):
        fd = os.memfd_create("fuzz-guest", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        # Page multiples up to 1 MiB: what a region or an inflight buffer needs.
        os.ftruncate(fd, (size % 257) * 4096)
        if kind == FD_SEALED_MEMFD:
            import fcntl
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        return fd, [fd]
    if kind in (FD_PIPE_R, FD_PIPE_W):
        r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        return (r if kind == FD_PIPE_R else w), [r, w]
    if kind == FD_SOCKET:
        a, b = socket.socketpair()
        fds = [a.detach(), b.detach()]
        return fds[0], fds
    fd = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    return fd, [fd]


def write_stream(r: Reader, sock: socket.socket) -> None:
    """Send what the input describes to the controller's end of the socket."""
    while not r.done():
        kind = r.u8()
        if kind == REC_RAW:
            sock.sendall(r.take(r.u16() % 4200))
            continue
        request, flags, nfds, size = r.u8(), r.u8(), r.u8() % 10, r.u16()
        fds, own = [], []
        try:
            for _ in range(nfds):
                fd, mine = make_fd(r.u8(), r.u32())
                fds.append(fd)
                own += mine
            # Flags: mostly version 1, the rest raw; a size that lies is the raw records' job.
            fl = m.VERSION | (flags & (m.FLAG_NEED_REPLY | m.FLAG_REPLY)) if flags < 0xF0 else flags
            payload = r.take(size % 4200)
            data = m.HEADER.pack(request, fl, len(payload)) + payload
            if fds:
                sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))])
                sock.sendall(data[sent:])
            else:
                sock.sendall(data)
        finally:
            for fd in own:
                os.close(fd)


def drain_replies(sock: socket.socket) -> None:
    """Read (and close the fds of) whatever the session answered so far."""
    while True:
        try:
            data, anc, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(64 * 4), socket.MSG_DONTWAIT)
        except (BlockingIOError, ConnectionResetError):
            return
        for level, kind, raw in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                for fd in struct.unpack(f"{len(raw) // 4}i", raw[: len(raw) - len(raw) % 4]):
                    os.close(fd)
        if not data:
            return


def open_fds() -> set[int]:
    return {int(f) for f in os.listdir("/proc/self/fd")}


# ------------------------------------------------------------ the target

def TestOneInput(data: bytes) -> None:
    global CTRLR
    if CTRLR is None:
        CTRLR = FakeController()
    ctrlr = CTRLR
    before = open_fds()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    # Enough room for the whole input: the stream is written before it is read.
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    conn = vconn.Connection(ours)
    session = vhandler.Session(ctrlr, conn)
    ctrlr.session = session
    try:
        write_stream(Reader(data), theirs)
        theirs.shutdown(socket.SHUT_WR)
        while True:
            try:
                msg = conn.recv()
            except m.ProtocolError:
                break
            if msg is None:
                break
            with ctrlr.app.lock:
                try:
                    session.handle(msg)
                except m.ProtocolError:
                    break
                except OSError as exc:
                    # A descriptor of the wrong kind (eventfd_write to a pipe's read
                    # end): Controller._serve drops the connection; nothing else.
                    if exc.errno not in (errno.EBADF, errno.EINVAL, errno.EAGAIN, errno.EPIPE, errno.ENOTSOCK):
                        raise
                    break
            drain_replies(theirs)
            session.check_rings()
    finally:
        with ctrlr.app.lock:
            session.close()
            ctrlr.session = None
        conn.close()
        drain_replies(theirs)
        theirs.close()
    leaked = open_fds() - before
    if leaked:
        raise AssertionError("file descriptors left open: " + ", ".join(
            f"{fd} -> {os.readlink(f'/proc/self/fd/{fd}')}" for fd in sorted(leaked)
            if os.path.exists(f"/proc/self/fd/{fd}")))


# ------------------------------------------------------------ seeds

def _msg(request: int, payload: bytes = b"", fds: list[tuple[int, int]] = (), flags: int = 0) -> bytes:
    out = bytes([1, request, flags, len(fds)]) + struct.pack("<H", len(payload))
    for kind, size in fds:
        out += bytes([kind]) + struct.pack("<I", size)
    return out + payload


def make_seeds(directory: str) -> None:
    """A QEMU-like session (and a few variants) in this harness's input encoding."""
    R = m.Request
    u64 = lambda v: struct.pack("<Q", v)  # noqa: E731
    state = lambda i, n: struct.pack("<II", i, n)  # noqa: E731
    mem = struct.pack("<II", 1, 0) + struct.pack("<QQQQ", 0, 256 << 10, 0x7F0000000000, 0)
    addr = lambda i: struct.pack("<IIQQQQ", i, 0, 0x7F0000000000 + i * 0x4000,  # noqa: E731
                                 0x7F0000000000 + i * 0x4000 + 0x2000, 0x7F0000000000 + i * 0x4000 + 0x1000, 0)
    feats = (1 << 32) | (1 << 30) | (1 << 28) | (1 << 29) | (1 << 9)
    proto = (1 << 0) | (1 << 3) | (1 << 9) | (1 << 5) | (1 << 12)
    start = [
        _msg(R.GET_FEATURES), _msg(R.GET_PROTOCOL_FEATURES),
        _msg(R.SET_PROTOCOL_FEATURES, u64(proto)), _msg(R.GET_QUEUE_NUM),
        _msg(R.SET_OWNER), _msg(R.GET_CONFIG, struct.pack("<III", 0, 60, 0) + bytes(60)),
        _msg(R.SET_FEATURES, u64(feats)),
        _msg(R.SET_MEM_TABLE, mem, [(FD_MEMFD, 64)], flags=m.FLAG_NEED_REPLY),
    ]
    ring = []
    for i in range(NUM_QUEUES):
        ring += [_msg(R.SET_VRING_NUM, state(i, 128)), _msg(R.SET_VRING_ADDR, addr(i)),
                 _msg(R.SET_VRING_BASE, state(i, 0)), _msg(R.SET_VRING_CALL, u64(i), [(FD_EVENTFD, 0)]),
                 _msg(R.SET_VRING_KICK, u64(i), [(FD_EVENTFD, 0)]), _msg(R.SET_VRING_ENABLE, state(i, 1))]
    stop = [_msg(R.GET_VRING_BASE, state(i, 0)) for i in range(NUM_QUEUES)]
    inflight = struct.pack("<QQHH4x", 0, 0, NUM_QUEUES, 128)
    seeds = {
        "qemu-session": start + ring + stop,
        "inflight": start + [_msg(R.GET_INFLIGHT_FD, inflight),
                             _msg(R.SET_INFLIGHT_FD, struct.pack("<QQHH4x", 8192, 0, NUM_QUEUES, 128),
                                  [(FD_SEALED_MEMFD, 2)])] + ring + stop,
        "reset-owner-restart": start + ring + [_msg(R.RESET_OWNER)] + ring,
        "backend-req-fd": start + [_msg(R.SET_BACKEND_REQ_FD, b"", [(FD_SOCKET, 0)]),
                                   _msg(R.SET_VRING_ERR, u64(0), [(FD_EVENTFD, 0)])],
        "mem-table-swap": start + ring + [_msg(R.SET_MEM_TABLE, mem, [(FD_MEMFD, 128)])],
        "truncated-header": [bytes([REC_RAW]) + struct.pack("<H", 7) + bytes([1, 0, 0, 0, 1, 0, 0])],
    }
    os.makedirs(directory, exist_ok=True)
    for name, records in seeds.items():
        with open(os.path.join(directory, f"seed-{name}"), "wb") as f:
            f.write(b"".join(records))


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--make-seeds":
        make_seeds(sys.argv[2])
        return
    # A reactor-less daemon logs refusals at error level: keep the fuzzer's output readable.
    import logging
    logging.disable(logging.CRITICAL)
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
