"""JSON-RPC 2.0 server on a Unix stream socket, wire compatible with SPDK.

Framing follows SPDK's server: a connection carries a stream of JSON values,
each a request object or a batch array, with or without whitespace between
them (SPDK's ``rpc.py`` sends ``json.dumps(req, indent=2)`` with no trailing
newline).  Each response is written as compact JSON followed by ``"\\n"``,
exactly like SPDK's ``end_response()``; clients that decode incrementally
(``rpc.py`` strips leading whitespace and uses ``raw_decode``) and clients that
read lines both work.  Responses are pure ASCII (``ensure_ascii``), so a client
that decodes each ``recv()`` chunk separately cannot split a multi-byte
character.

Requests on one connection are handled in order, one at a time; handlers are
plain functions called in the event loop thread (a handler may also return an
awaitable, which is awaited before the next request of that connection).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import enum
import errno
import fcntl
import json
import logging
import os
import re
import socket
import stat
from typing import Any

import attrs

from .registry import (
    INTERNAL_ERROR,
    INVALID_REQUEST,
    PARSE_ERROR,
    RpcError,
    RpcRegistry,
)

__all__ = ["RpcServer", "RpcSocketInUseError", "MAX_REQUEST_BYTES", "encode_response"]

log = logging.getLogger("vhost.rpc")

#: Largest single JSON value (request or batch) accepted on a connection.
MAX_REQUEST_BYTES = 1 << 20

_READ_CHUNK = 64 * 1024
_WS = re.compile(r"[ \t\n\r]*")
_OUTSIDE = re.compile(r'["{}\[\]]')
_INSIDE = re.compile(r'["\\]')


class RpcSocketInUseError(RuntimeError):
    """Another live process owns the RPC socket path."""


# --------------------------------------------------------------------------
# Stream framing
# --------------------------------------------------------------------------


class _FrameSplitter:
    """Cut a character stream into top-level JSON values.

    Objects and arrays are delimited by tracking bracket depth outside string
    literals, so an incomplete value is told apart from a malformed one
    without re-parsing the whole buffer on every read.  ``next_value`` returns
    ``None`` (need more data), ``("value", obj)`` or ``("error", message)``.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._decoder = codecs.getincrementaldecoder("utf-8")("strict")
        self._buf = ""
        self._reset()

    def _reset(self) -> None:
        self._scanning = False
        self._pos = 0
        self._depth = 0
        self._in_str = False

    def feed(self, data: bytes) -> None:
        """Append raw bytes (UnicodeDecodeError on invalid UTF-8)."""
        self._buf += self._decoder.decode(data)

    @property
    def pending(self) -> int:
        """Characters buffered that do not yet form a complete value."""
        return len(self._buf)

    def next_value(self) -> tuple[str, Any] | None:
        buf = self._buf
        if not self._scanning:
            skip = _WS.match(buf).end()  # type: ignore[union-attr]
            if skip:
                buf = self._buf = buf[skip:]
            if not buf:
                return None
            if buf[0] not in "{[":
                # A bare scalar is never a request; accept it if it parses so
                # the caller can answer "Invalid request", else it's garbage.
                try:
                    obj, end = json.JSONDecoder().raw_decode(buf)
                except json.JSONDecodeError as exc:
                    return ("error", f"Parse error: {exc.msg} at offset {exc.pos}")
                self._buf = buf[end:]
                return ("value", obj)
            self._scanning = True
            self._pos = 0
            self._depth = 0
            self._in_str = False

        pos = self._pos
        n = len(buf)
        while pos < n:
            if self._in_str:
                m = _INSIDE.search(buf, pos)
                if m is None:
                    pos = n
                    break
                i = m.start()
                if buf[i] == "\\":
                    if i + 1 >= n:  # escape split across reads: rescan it later
                        pos = i
                        break
                    pos = i + 2
                    continue
                self._in_str = False
                pos = i + 1
                continue
            m = _OUTSIDE.search(buf, pos)
            if m is None:
                pos = n
                break
            i = m.start()
            c = buf[i]
            pos = i + 1
            if c == '"':
                self._in_str = True
            elif c in "{[":
                self._depth += 1
            else:
                self._depth -= 1
                if self._depth == 0:
                    frame = buf[:pos]
                    self._buf = buf[pos:]
                    self._reset()
                    if len(frame) > self._limit:
                        return ("error", f"Parse error: request larger than {self._limit} bytes")
                    try:
                        return ("value", json.loads(frame))
                    except json.JSONDecodeError as exc:
                        return ("error", f"Parse error: {exc.msg} at offset {exc.pos}")
        self._pos = pos
        return None


# --------------------------------------------------------------------------
# Response encoding
# --------------------------------------------------------------------------


def _json_default(obj: Any) -> Any:
    if attrs.has(type(obj)):
        return attrs.asdict(obj, recurse=True)
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def _dumps(obj: Any) -> str:
    return json.dumps(
        obj, separators=(",", ":"), ensure_ascii=True, allow_nan=False, default=_json_default
    )


def _error_obj(rid: Any, code: int, message: str, data: Any = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        err["data"] = data
    return {"jsonrpc": "2.0", "id": rid, "error": err}


def encode_response(rid: Any, *, result: Any = None, error: RpcError | None = None) -> str:
    """One response object as compact JSON text (no trailing newline)."""
    if error is not None:
        try:
            return _dumps(_error_obj(rid, error.code, error.message, error.data))
        except (TypeError, ValueError):
            return _dumps(_error_obj(rid, error.code, error.message))
    try:
        return _dumps({"jsonrpc": "2.0", "id": rid, "result": result})
    except (TypeError, ValueError) as exc:
        log.error("rpc: result of request id %r is not JSON serialisable: %s", rid, exc)
        return _dumps(_error_obj(rid, INTERNAL_ERROR, f"Internal error: result is not JSON serialisable: {exc}"))


# --------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------


class RpcServer:
    """Serve ``registry`` on the Unix socket ``path`` in the running event loop."""

    def __init__(
        self,
        registry: RpcRegistry,
        path: str,
        *,
        max_request_bytes: int = MAX_REQUEST_BYTES,
    ) -> None:
        self.registry = registry
        self.path = str(path)
        self.max_request_bytes = max_request_bytes
        self._server: asyncio.AbstractServer | None = None
        self._conn_tasks: set[asyncio.Task[Any]] = set()
        self._sock_id: tuple[int, int] | None = None
        self._lock_fd: int | None = None
        self._lock_path = self.path + ".lock"

    # -- lifecycle ----------------------------------------------------------

    @property
    def is_serving(self) -> bool:
        return self._server is not None and self._server.is_serving()

    async def __aenter__(self) -> "RpcServer":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError(f"RPC server on {self.path} is already started")
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(directory):
            raise FileNotFoundError(
                errno.ENOENT,
                f"cannot create RPC socket {self.path}: directory {directory} does not exist",
            )
        self._take_lock()
        try:
            await self._clear_stale_socket()
            self._server = await asyncio.start_unix_server(self._on_connection, path=self.path)
            st = os.stat(self.path)
            self._sock_id = (st.st_dev, st.st_ino)
        except BaseException:
            self._release_lock()
            raise
        log.info("rpc: listening on %s", self.path)

    def _take_lock(self) -> None:
        # Same convention as SPDK (flock on "<socket>.lock"), so we also
        # refuse to start next to a live SPDK app using the same path.
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RpcSocketInUseError(
                    f"RPC socket {self.path} is in use: another process holds {self._lock_path}. "
                    "Stop the other vhost/SPDK instance or choose a different RPC socket path."
                ) from None
            raise
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._lock_path)
        os.close(self._lock_fd)
        self._lock_fd = None

    async def _clear_stale_socket(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(
                errno.EEXIST,
                f"cannot create RPC socket {self.path}: the path exists and is not a socket",
            )
        if await _socket_is_live(self.path):
            raise RpcSocketInUseError(
                f"RPC socket {self.path} is in use: another process is listening on it. "
                "Stop the other vhost/SPDK instance or choose a different RPC socket path."
            )
        log.info("rpc: removing stale socket %s", self.path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        tasks = list(self._conn_tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        if self._sock_id is not None:
            try:
                st = os.lstat(self.path)
                if (st.st_dev, st.st_ino) == self._sock_id:
                    os.unlink(self.path)
            except FileNotFoundError:
                pass
            self._sock_id = None
        self._release_lock()

    # -- connections --------------------------------------------------------

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._conn_tasks.add(task)
        try:
            await self._serve_connection(reader, writer)
        except (ConnectionError, BrokenPipeError):
            pass
        except asyncio.CancelledError:
            pass
        except Exception:  # never let a connection bug kill the server
            log.exception("rpc: connection handler failed")
        finally:
            if task is not None:
                self._conn_tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        splitter = _FrameSplitter(self.max_request_bytes)
        while True:
            data = await reader.read(_READ_CHUNK)
            if not data:
                return
            try:
                splitter.feed(data)
            except UnicodeDecodeError as exc:
                await self._send(writer, encode_response(None, error=RpcError(PARSE_ERROR, f"Parse error: invalid UTF-8 ({exc.reason})")))
                return
            while True:
                item = splitter.next_value()
                if item is None:
                    break
                kind, value = item
                if kind == "error":
                    log.warning("rpc: %s; closing connection", value)
                    await self._send(writer, encode_response(None, error=RpcError(PARSE_ERROR, value)))
                    return
                out = await self._handle_value(value)
                if out is not None:
                    await self._send(writer, out)
            if splitter.pending > self.max_request_bytes:
                msg = f"Parse error: request larger than {self.max_request_bytes} bytes"
                log.warning("rpc: %s; closing connection", msg)
                await self._send(writer, encode_response(None, error=RpcError(PARSE_ERROR, msg)))
                return

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, text: str) -> None:
        writer.write(text.encode("ascii") + b"\n")
        await writer.drain()

    async def _handle_value(self, value: Any) -> str | None:
        """Answer one top-level value; None when nothing is to be sent."""
        if isinstance(value, list):
            if not value:
                return encode_response(None, error=RpcError(INVALID_REQUEST, "Invalid request: empty batch"))
            parts = []
            for req in value:
                out = await self._handle_request(req)
                if out is not None:
                    parts.append(out)
            if not parts:
                return None
            return "[" + ",".join(parts) + "]"
        return await self._handle_request(value)

    async def _handle_request(self, req: Any) -> str | None:
        if not isinstance(req, dict):
            return encode_response(None, error=RpcError(INVALID_REQUEST, "Invalid request: expected a JSON object"))
        has_id = "id" in req
        rid = req.get("id")
        if has_id and not (rid is None or (isinstance(rid, (str, int, float)) and not isinstance(rid, bool))):
            return encode_response(None, error=RpcError(INVALID_REQUEST, "Invalid request: 'id' must be a string, a number or null"))
        if req.get("jsonrpc") != "2.0":
            return encode_response(rid, error=RpcError(INVALID_REQUEST, "Invalid request: 'jsonrpc' must be \"2.0\""))
        method = req.get("method")
        if not isinstance(method, str):
            return encode_response(rid, error=RpcError(INVALID_REQUEST, "Invalid request: 'method' must be a string"))
        params = req.get("params")
        if params is not None and not isinstance(params, (dict, list)):
            return encode_response(rid, error=RpcError(INVALID_REQUEST, "Invalid request: 'params' must be an object"))

        log.debug("rpc: call %s %s", method, _short(params))
        try:
            result = await self.registry.dispatch_async(method, params)
        except RpcError as exc:
            log.debug("rpc: %s -> error %d %s", method, exc.code, exc.message)
            return encode_response(rid, error=exc) if has_id else None
        except Exception as exc:  # registry bug; handler errors are already RpcError
            log.exception("rpc: dispatch of '%s' failed", method)
            err = RpcError(INTERNAL_ERROR, f"{method}: {exc or type(exc).__name__}")
            return encode_response(rid, error=err) if has_id else None
        if not has_id:
            return None
        return encode_response(rid, result=result)


def _short(obj: Any, limit: int = 200) -> str:
    try:
        text = json.dumps(obj)
    except (TypeError, ValueError):
        text = repr(obj)
    return text if len(text) <= limit else text[: limit - 3] + "..."


async def _socket_is_live(path: str) -> bool:
    """True when something accepts connections on the Unix socket ``path``."""
    loop = asyncio.get_running_loop()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(s, path), timeout=1.0)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except (asyncio.TimeoutError, BlockingIOError):
        return True  # backlog full or slow: someone is there
    except PermissionError as exc:
        raise RpcSocketInUseError(
            f"RPC socket {path} exists and cannot be probed ({exc.strerror}); "
            "is it owned by another user's running instance?"
        ) from None
    finally:
        s.close()
    return True
