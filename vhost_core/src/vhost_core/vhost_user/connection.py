"""A vhost-user socket: framed messages with file descriptors, in both directions."""

from __future__ import annotations

import array
import collections
import os
import select
import socket
import time
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
    """Message I/O on an accepted unix socket, read by one thread per connection.

    The socket is non-blocking.  Replies are sent under the app's control lock, so
    a front-end that does not read them must never make us wait: what the socket
    does not take at once waits in a bounded outgoing queue, flushed whenever the
    connection's thread waits for the next message, and a front-end that lets it
    fill up is dropped (:class:`~vhost_core.vhost_user.messages.ProtocolError`).
    """

    #: Seconds between ``on_idle`` calls while no message arrives.
    IDLE_INTERVAL = 0.2
    #: Reply bytes that may wait for a front-end that does not read them.  QEMU
    #: reads every reply before its next request: a few hundred bytes at most.
    MAX_PENDING_OUT = 64 * 1024

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.setblocking(False)
        #: Called (on the connection's thread) while waiting for the next message.
        self.on_idle: Callable[[], None] | None = None
        # (bytes, fds not yet sent): fds ride on the first byte of their message.
        self._out: collections.deque[tuple[bytes, list[int]]] = collections.deque()
        self._out_bytes = 0

    def _poll(self, want_read: bool, timeout: float | None) -> bool:
        """Wait until readable (or ``timeout``), flushing queued replies meanwhile.
        Returns whether the socket is readable."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            fd = self.sock.fileno()
            if fd < 0:
                raise OSError("connection closed")
            p = select.poll()
            events = (select.POLLIN if want_read else 0) | (select.POLLOUT if self._out else 0)
            if not events:
                return False
            p.register(fd, events)
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = p.poll(None if wait is None else int(wait * 1000) + 1)
            got = ready[0][1] if ready else 0
            if got & select.POLLOUT:
                self._flush()
            if got & (select.POLLIN | select.POLLHUP | select.POLLERR):
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False

    def _wait_readable(self) -> None:
        if self.on_idle is None:
            self._poll(True, None)
            return
        while not self._poll(True, self.IDLE_INTERVAL):
            self.on_idle()

    def _recv(self, n: int, fds: list[int]) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                data, anc, _flags, _addr = self.sock.recvmsg(
                    n - len(buf), socket.CMSG_SPACE(m.MAX_FDS * 4))
            except BlockingIOError:
                # The rest of a message is still on its way: only this
                # connection's thread waits for it.
                self._poll(True, None)
                continue
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
        """Send a reply without waiting.  The caller keeps (and closes) ``fds``:
        they are duplicated if they must wait in the queue."""
        data = m.HEADER.pack(request, m.VERSION | m.FLAG_REPLY, len(payload)) + payload
        if self._out_bytes + len(data) > self.MAX_PENDING_OUT:
            raise m.ProtocolError(f"the front-end does not read its replies ({self._out_bytes} bytes "
                                  f"waiting for it)")
        self._out.append((data, [os.dup(fd) for fd in fds or ()]))
        self._out_bytes += len(data)
        self._flush()

    def _flush(self) -> None:
        while self._out:
            data, fds = self._out[0]
            try:
                if fds:
                    sent = self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                       array.array("i", fds))])
                else:
                    sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                return
            for fd in fds:
                os.close(fd)
            self._out_bytes -= sent
            if sent < len(data):
                self._out[0] = (data[sent:], [])
                continue
            self._out.popleft()

    def drop_pending(self) -> None:
        for _data, fds in self._out:
            for fd in fds:
                os.close(fd)
        self._out.clear()
        self._out_bytes = 0

    def close(self) -> None:
        self.drop_pending()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
