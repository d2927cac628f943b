"""Blocking JSON-RPC client for the vhost target's Unix socket.

Speaks the same framing as SPDK's ``JSONRPCClient``: one JSON request per
call, response decoded incrementally from the stream (so it also works against
a real SPDK application).
"""

from __future__ import annotations

import errno
import json
import logging
import socket
import time
from typing import Any

from .registry import RpcError

__all__ = ["RpcClient", "RpcClientError"]

log = logging.getLogger("vhost.rpc.client")

_START_HINT = "is the vhost target running? start it with `vhost` or pass -s SOCKET"


class RpcClientError(ConnectionError):
    """The conversation with the server failed (not an error *response*).

    ``str(exc)`` is the bare human message; ``exc.errno`` is set when known.
    """

    def __init__(self, code: int | None, message: str) -> None:
        super().__init__(message)
        self.errno = code
        self.strerror = message

    def __str__(self) -> str:
        return self.strerror or ""


class RpcClient:
    """``with RpcClient(path) as c: c.call("bdev_get_bdevs")``.

    The connection is opened on first use (or on ``__enter__``) and reused for
    later calls.  ``call`` returns the ``result`` member, raises
    :class:`RpcError` for an error response, ``ConnectionError`` when the
    socket cannot be reached or the server hangs up, and ``TimeoutError`` when
    no complete response arrives within ``timeout`` seconds.
    """

    def __init__(self, path: str, timeout: float = 60.0) -> None:
        self.path = str(path)
        self.timeout = float(timeout)
        self._sock: socket.socket | None = None
        self._buf = ""
        self._next_id = 0
        self._decoder = json.JSONDecoder()

    # -- connection -----------------------------------------------------------

    def __enter__(self) -> "RpcClient":
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def connect(self) -> None:
        if self._sock is not None:
            return
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout if self.timeout > 0 else None)
        try:
            s.connect(self.path)
        except FileNotFoundError:
            s.close()
            raise RpcClientError(
                errno.ENOENT,
                f"cannot connect to RPC socket {self.path}: no such file; {_START_HINT}",
            ) from None
        except ConnectionRefusedError:
            s.close()
            raise RpcClientError(
                errno.ECONNREFUSED,
                f"cannot connect to RPC socket {self.path}: connection refused "
                f"(stale socket file?); {_START_HINT}",
            ) from None
        except PermissionError:
            s.close()
            raise RpcClientError(
                errno.EACCES,
                f"cannot connect to RPC socket {self.path}: permission denied "
                "(run as the user that started the vhost target, e.g. root)",
            ) from None
        except OSError as exc:
            s.close()
            raise RpcClientError(
                exc.errno or errno.EIO,
                f"cannot connect to RPC socket {self.path}: {exc.strerror or exc}; {_START_HINT}",
            ) from None
        self._sock = s
        self._buf = ""

    def close(self) -> None:
        s, self._sock = self._sock, None
        if s is not None:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self._buf = ""

    # -- calls --------------------------------------------------------------

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        self.connect()
        self._next_id += 1
        rid = self._next_id
        req: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": rid}
        if params:
            req["params"] = params
        text = json.dumps(req)
        log.debug("request: %s", text)
        assert self._sock is not None
        deadline = time.monotonic() + self.timeout
        try:
            self._sock.sendall(text.encode("utf-8") + b"\n")
        except OSError as exc:
            self.close()
            raise RpcClientError(
                exc.errno or errno.EPIPE,
                f"lost connection to RPC socket {self.path} while sending '{method}': {exc}",
            ) from None
        while True:
            resp = self._recv(method, deadline)
            log.debug("response: %s", json.dumps(resp))
            if isinstance(resp, dict) and resp.get("id") not in (rid, None):
                log.debug("ignoring response to another request id %r", resp.get("id"))
                continue
            break
        if not isinstance(resp, dict):
            raise RpcError(-32603, f"malformed response from server: {json.dumps(resp)[:200]}")
        if "error" in resp:
            err = resp["error"] if isinstance(resp["error"], dict) else {}
            exc = RpcError(int(err.get("code", -32603)), str(err.get("message", "unknown error")), err.get("data"))
            exc.request = {"method": method, "params": params or {}, "id": rid}  # type: ignore[attr-defined]
            exc.response = resp["error"]  # type: ignore[attr-defined]
            if resp.get("id") is None:
                # Protocol-level failure (e.g. parse error): server closes the connection.
                self.close()
            raise exc
        if "result" not in resp:
            raise RpcError(-32603, f"malformed response from server (no result): {json.dumps(resp)[:200]}")
        return resp["result"]

    def _decode_one(self) -> tuple[bool, Any]:
        buf = self._buf.lstrip()
        if not buf:
            self._buf = ""
            return False, None
        try:
            obj, end = self._decoder.raw_decode(buf)
        except ValueError:
            self._buf = buf
            return False, None
        self._buf = buf[end:]
        return True, obj

    def _recv(self, method: str, deadline: float) -> Any:
        assert self._sock is not None
        raw = b""
        while True:
            ok, obj = self._decode_one()
            if ok:
                return obj
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.close()
                raise TimeoutError(
                    f"timed out after {self.timeout:g}s waiting for the response to '{method}' from {self.path}"
                )
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(65536)
            except socket.timeout:
                continue
            except OSError as exc:
                self.close()
                raise RpcClientError(
                    exc.errno or errno.ECONNRESET,
                    f"lost connection to RPC socket {self.path} waiting for '{method}': {exc}",
                ) from None
            if not chunk:
                partial = self._buf
                self.close()
                raise RpcClientError(
                    errno.ECONNRESET,
                    f"RPC server on {self.path} closed the connection before answering '{method}'"
                    + (f" (partial response: {partial[:200]!r})" if partial.strip() else ""),
                )
            raw += chunk
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                if exc.end == len(raw):  # incomplete multi-byte sequence at the end
                    continue
                self.close()
                raise RpcClientError(errno.EPROTO, f"invalid UTF-8 from RPC server on {self.path}") from None
            raw = b""
            self._buf += text
