"""A vhost-user socket: framed messages with file descriptors, in both directions."""

from __future__ import annotations

import array
import os
import select
import socket
from typing import Callable

import attrs

from vhost_core.vhost_user import messages as m


@attrs.define
class Message:
    request: int
    flags: int
    payload: bytes
    fds: list[int]

    def close_fds(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []

    def take_fd(self) -> int:
        return self.fds.pop(0)


class Connection:
    """Blocking message I/O on an accepted unix socket (one thread per connection)."""

    #: Seconds between ``on_idle`` calls while no message arrives.
    IDLE_INTERVAL = 0.2

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        #: Called (on the connection's thread) while waiting for the next message.
        self.on_idle: Callable[[], None] | None = None

    def _wait_readable(self) -> None:
        while self.on_idle is not None:
            fd = self.sock.fileno()
            if fd < 0:
                raise OSError("connection closed")
            r, _, _ = select.select([fd], [], [], self.IDLE_INTERVAL)
            if r:
                return
            self.on_idle()

    def _recv(self, n: int, fds: list[int]) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            data, anc, _flags, _addr = self.sock.recvmsg(
                n - len(buf), socket.CMSG_SPACE(m.MAX_FDS * 4))
            for level, kind, raw in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(raw[: len(raw) - len(raw) % a.itemsize])
                    fds.extend(a)
            if not data:
                return bytes(buf)
            buf += data
        return bytes(buf)

    def recv(self) -> Message | None:
        """Next message, or None when the peer closed.  Raises ProtocolError."""
        fds: list[int] = []
        self._wait_readable()
        try:
            hdr = self._recv(m.HEADER_SIZE, fds)
            if not hdr:
                return None
            if len(hdr) < m.HEADER_SIZE:
                raise m.ProtocolError(f"truncated message header ({len(hdr)} of {m.HEADER_SIZE} bytes)")
            request, flags, size = m.HEADER.unpack(hdr)
            if flags & m.VERSION_MASK != m.VERSION:
                raise m.ProtocolError(f"unsupported protocol version {flags & m.VERSION_MASK}")
            if size > m.MAX_PAYLOAD:
                raise m.ProtocolError(f"payload size {size} of request {request} exceeds {m.MAX_PAYLOAD} bytes")
            payload = self._recv(size, fds) if size else b""
            if len(payload) < size:
                raise m.ProtocolError(f"payload of request {request} truncated ({len(payload)} of {size} bytes)")
            if len(fds) > m.MAX_FDS:
                raise m.ProtocolError(f"{len(fds)} file descriptors in one message")
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return Message(request, flags, payload, fds)

    def reply(self, request: int, payload: bytes, fds: list[int] | None = None) -> None:
        data = m.HEADER.pack(request, m.VERSION | m.FLAG_REPLY, len(payload)) + payload
        if not fds:
            self.sock.sendall(data)
            return
        # The descriptors ride on the first byte; the rest follows as usual.
        sent = self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        if sent < len(data):
            self.sock.sendall(data[sent:])

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
