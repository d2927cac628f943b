import asyncio
import errno
import json
import logging
import os
import shutil
import socket
import tempfile
import time

import attrs
import pytest


from vhost_core.rpc.registry import RpcError, RpcRegistry  # noqa: E402
from vhost_core.rpc.server import RpcServer, RpcSocketInUseError  # noqa: E402
from vhost_core.rpc.testing import ServerThread  # noqa: E402


@attrs.frozen
class EchoParams:
    value: object = None
    text: str = ""


def make_registry():
    r = RpcRegistry()
    calls = []

    @r.method("echo", params=EchoParams, deprecated_aliases=["old_echo"])
    def echo(p):
        calls.append(p)
        return p.value

    @r.method("fail")
    def fail():
        raise RpcError(-errno.EEXIST, "name taken")

    @r.method("nonjson")
    def nonjson():
        return object()

    @r.method("sleepy")
    async def sleepy():
        await asyncio.sleep(0.05)
        return "awake"

    @r.method("ü_text")
    def text():
        return "grüße"

    r.set_missing_hint("bdev_aio_create", "It is provided by the vhost-bdev-aio plugin: pip install vhost-bdev-aio")
    r.calls = calls
    return r


@pytest.fixture
def sock_path():
    # Unix socket paths are limited to ~107 bytes; pytest's tmp_path can be longer.
    d = tempfile.mkdtemp(prefix="rpcs")
    yield os.path.join(d, "r.sock")
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def server(sock_path):
    reg = make_registry()
    with ServerThread(reg, sock_path) as st:
        yield st


class Conn:
    """Raw socket with an incremental JSON reader (like SPDK's client)."""

    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(5)
        self.s.connect(path)
        self.buf = ""
        self.raw = b""

    def send(self, data):
        if isinstance(data, str):
            data = data.encode()
        self.s.sendall(data)

    def recv_value(self):
        dec = json.JSONDecoder()
        while True:
            b = self.buf.lstrip()
            if b:
                try:
                    obj, end = dec.raw_decode(b)
                    self.buf = b[end:]
                    return obj
                except ValueError:
                    pass
            chunk = self.s.recv(4096)
            if not chunk:
                raise EOFError(self.buf)
            self.raw += chunk
            self.buf += chunk.decode("ascii")

    def expect_closed(self):
        self.s.settimeout(5)
        rest = b""
        while True:
            chunk = self.s.recv(4096)
            if not chunk:
                return rest
            rest += chunk

    def nothing_pending(self, wait=0.2):
        self.s.settimeout(wait)
        try:
            data = self.s.recv(4096)
        except socket.timeout:
            return True
        finally:
            self.s.settimeout(5)
        self.buf += data.decode()
        return False

    def close(self):
        self.s.close()


@pytest.fixture
def conn(server):
    c = Conn(server.path)
    yield c
    c.close()


def req(method, params=None, rid=1, **extra):
    r = {"jsonrpc": "2.0", "method": method, "id": rid, **extra}
    if params is not None:
        r["params"] = params
    return r


def test_simple_call_response_format(conn):
    conn.send(json.dumps(req("echo", {"value": {"a": [1, 2]}})))
    assert conn.recv_value() == {"jsonrpc": "2.0", "id": 1, "result": {"a": [1, 2]}}
    # compact JSON, key order like SPDK, one trailing newline
    assert conn.raw == b'{"jsonrpc":"2.0","id":1,"result":{"a":[1,2]}}\n'


def test_spdk_style_indented_without_newline(conn):
    conn.send(json.dumps(req("echo", {"value": "x"}, rid=7), indent=2))
    assert conn.recv_value() == {"jsonrpc": "2.0", "id": 7, "result": "x"}


def test_request_split_across_writes(conn):
    data = json.dumps(req("echo", {"value": "a \"quoted\" {brace} [x] \\ back", "text": "}"}))
    for i in range(len(data)):
        conn.send(data[i])
        if i % 7 == 0:
            time.sleep(0.001)
    assert conn.recv_value()["result"] == "a \"quoted\" {brace} [x] \\ back"


def test_split_in_escape_and_multibyte(conn):
    data = json.dumps(req("echo", {"value": "Zürich \\ \"q\""}), ensure_ascii=False).encode()
    cut1 = data.index("ü".encode()) + 1  # middle of the 2-byte sequence
    cut2 = data.index(b"\\\\") + 1  # between backslash and escaped char
    for part in (data[:cut1], data[cut1:cut2], data[cut2:]):
        conn.send(part)
        time.sleep(0.02)
    resp = conn.recv_value()
    assert resp["result"] == "Zürich \\ \"q\""
    assert b"\\u00fc" in conn.raw  # responses are pure ASCII


def test_two_requests_in_one_write(conn):
    a = json.dumps(req("echo", {"value": 1}, rid=1))
    b = json.dumps(req("echo", {"value": 2}, rid=2), indent=2)
    conn.send(a + b)  # no separator at all
    assert conn.recv_value()["id"] == 1
    assert conn.recv_value()["id"] == 2
    conn.send(a + "\n\r\t " + b + "\n")
    assert [conn.recv_value()["result"], conn.recv_value()["result"]] == [1, 2]


def test_batch(conn):
    batch = [
        req("echo", {"value": "a"}, rid=1),
        {"jsonrpc": "2.0", "method": "echo", "params": {"value": "note"}},  # notification
        req("fail", rid="two"),
        req("nope", rid=3),
        5,
    ]
    conn.send(json.dumps(batch))
    resp = conn.recv_value()
    assert isinstance(resp, list)
    assert resp[0] == {"jsonrpc": "2.0", "id": 1, "result": "a"}
    assert resp[1] == {"jsonrpc": "2.0", "id": "two", "error": {"code": -17, "message": "name taken"}}
    assert resp[2]["error"]["code"] == -32601
    assert resp[3]["id"] is None and resp[3]["error"]["code"] == -32600
    assert len(resp) == 4


def test_batch_of_notifications_gets_no_response(server, conn):
    conn.send(json.dumps([{"jsonrpc": "2.0", "method": "echo", "params": {"value": 1}}] * 2))
    conn.send(json.dumps(req("echo", {"value": "after"}, rid=9)))
    assert conn.recv_value() == {"jsonrpc": "2.0", "id": 9, "result": "after"}
    assert len(server.registry.calls) == 3


def test_empty_batch(conn):
    conn.send("[]")
    resp = conn.recv_value()
    assert resp["id"] is None and resp["error"]["code"] == -32600


def test_notification_no_response(server, conn):
    conn.send(json.dumps({"jsonrpc": "2.0", "method": "echo", "params": {"value": "n"}}))
    conn.send(json.dumps({"jsonrpc": "2.0", "method": "fail"}))  # errors of notifications are silent too
    assert conn.nothing_pending()
    conn.send(json.dumps(req("echo", {"value": "r"}, rid=2)))
    assert conn.recv_value() == {"jsonrpc": "2.0", "id": 2, "result": "r"}
    assert [c.value for c in server.registry.calls] == ["n", "r"]


def test_parse_error_then_close(conn):
    conn.send('{"jsonrpc": "2.0", "method": "echo", "id": 1,}')
    resp = conn.recv_value()
    assert resp["id"] is None and resp["error"]["code"] == -32700
    assert resp["error"]["message"].startswith("Parse error")
    assert conn.expect_closed() == b""


def test_garbage_parse_error(conn):
    conn.send("hello\n")
    assert conn.recv_value()["error"]["code"] == -32700
    conn.expect_closed()


def test_invalid_utf8_parse_error(conn):
    conn.send(b'{"a": "\xff\xfe"}')
    assert conn.recv_value()["error"]["code"] == -32700


def test_request_too_large(sock_path):
    reg = make_registry()
    with ServerThread(reg, sock_path, max_request_bytes=1000):
        c = Conn(sock_path)
        c.send('{"jsonrpc": "2.0", "method": "echo", "params": {"value": "' + "x" * 2000)
        resp = c.recv_value()
        assert resp["error"]["code"] == -32700 and "larger than 1000 bytes" in resp["error"]["message"]
        c.expect_closed()
        c.close()


def test_large_request_within_limit(conn):
    big = "y" * 300_000
    conn.send(json.dumps(req("echo", {"value": big})))
    assert conn.recv_value()["result"] == big


@pytest.mark.parametrize(
    "payload,rid",
    [
        ({"method": "echo", "id": 1}, 1),  # no jsonrpc member
        ({"jsonrpc": "1.0", "method": "echo", "id": 1}, 1),
        ({"jsonrpc": "2.0", "id": 1}, 1),
        ({"jsonrpc": "2.0", "method": 5, "id": 1}, 1),
        ({"jsonrpc": "2.0", "method": "echo", "id": {"x": 1}}, None),
        ({"jsonrpc": "2.0", "method": "echo", "id": 1, "params": "x"}, 1),
    ],
)
def test_invalid_requests(conn, payload, rid):
    conn.send(json.dumps(payload))
    resp = conn.recv_value()
    assert resp["id"] == rid and resp["error"]["code"] == -32600
    # connection stays usable
    conn.send(json.dumps(req("echo", {"value": 1}, rid=5)))
    assert conn.recv_value()["result"] == 1


def test_bare_scalar_is_invalid_request(conn):
    conn.send("123 ")
    assert conn.recv_value()["error"]["code"] == -32600


def test_positional_params(conn):
    conn.send(json.dumps(req("echo", [1])))
    err = conn.recv_value()["error"]
    assert err["code"] == -32602 and "positional" in err["message"]


def test_unknown_method_with_hint(conn):
    conn.send(json.dumps(req("bdev_aio_create", {"filename": "/dev/x"})))
    assert conn.recv_value()["error"] == {
        "code": -32601,
        "message": "Method not found: 'bdev_aio_create'. It is provided by the vhost-bdev-aio plugin: "
        "pip install vhost-bdev-aio",
    }
    conn.send(json.dumps(req("whatever", rid=2)))
    assert conn.recv_value()["error"]["message"] == "Method not found: 'whatever'. See rpc_get_methods for the list."


def test_deprecated_alias_logged_once(server, conn, caplog):
    caplog.set_level(logging.WARNING, logger="vhost.rpc")
    for i in range(3):
        conn.send(json.dumps(req("old_echo", {"value": i}, rid=i)))
        assert conn.recv_value()["result"] == i
    msgs = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    assert msgs == ["rpc: method 'old_echo' is deprecated, use 'echo'"]


def test_non_serialisable_result(conn):
    conn.send(json.dumps(req("nonjson")))
    err = conn.recv_value()["error"]
    assert err["code"] == -32603 and "not JSON serialisable" in err["message"]
    conn.send(json.dumps(req("echo", {"value": 1}, rid=2)))
    assert conn.recv_value()["result"] == 1


def test_async_handler_and_non_ascii_result(conn):
    conn.send(json.dumps(req("sleepy")) + json.dumps(req("ü_text", rid=2)))
    assert conn.recv_value() == {"jsonrpc": "2.0", "id": 1, "result": "awake"}
    assert conn.recv_value()["result"] == "grüße"
    assert conn.raw.isascii()


def test_half_close_still_answered(server):
    c = Conn(server.path)
    c.send(json.dumps(req("echo", {"value": "bye"})))
    c.s.shutdown(socket.SHUT_WR)
    assert c.recv_value()["result"] == "bye"
    c.close()


def test_many_connections(server):
    conns = [Conn(server.path) for _ in range(20)]
    for i, c in enumerate(conns):
        c.send(json.dumps(req("echo", {"value": i})))
    assert [c.recv_value()["result"] for c in conns] == list(range(20))
    for c in conns:
        c.close()


# -- socket lifecycle ------------------------------------------------------


def test_close_unlinks_socket(sock_path):
    st = ServerThread(make_registry(), sock_path).start()
    assert os.path.exists(sock_path)
    st.stop()
    assert not os.path.exists(sock_path)
    assert not os.path.exists(sock_path + ".lock")


def test_close_with_open_connection(sock_path):
    st = ServerThread(make_registry(), sock_path).start()
    c = Conn(sock_path)
    c.send('{"jsonrpc": "2.0", "met')  # leave a request half-sent
    time.sleep(0.05)
    st.stop()
    assert c.expect_closed() == b""
    c.close()


def test_stale_socket_is_replaced(sock_path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(sock_path)
    s.close()  # file remains, nobody listens
    assert os.path.exists(sock_path)
    with ServerThread(make_registry(), sock_path):
        c = Conn(sock_path)
        c.send(json.dumps(req("echo", {"value": 1})))
        assert c.recv_value()["result"] == 1
        c.close()


def test_live_socket_refused(sock_path):
    # another (non-vhost) process listening: detected by connecting
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(sock_path)
    s.listen(1)
    try:
        with pytest.raises(RpcSocketInUseError, match="in use"):
            asyncio.run(RpcServer(make_registry(), sock_path).start())
        assert os.path.exists(sock_path)
    finally:
        s.close()


def test_second_server_refused(server):
    async def go():
        await RpcServer(make_registry(), server.path).start()

    with pytest.raises(RpcSocketInUseError, match=server.path):
        asyncio.run(go())
    # first server still fine
    c = Conn(server.path)
    c.send(json.dumps(req("echo", {"value": 1})))
    assert c.recv_value()["result"] == 1
    c.close()


def test_non_socket_path_refused(sock_path):
    with open(sock_path, "w") as f:
        f.write("important")
    with pytest.raises(FileExistsError, match="not a socket"):
        asyncio.run(RpcServer(make_registry(), sock_path).start())
    assert open(sock_path).read() == "important"


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        asyncio.run(RpcServer(make_registry(), str(tmp_path / "nodir" / "x.sock")).start())


def test_async_context_manager(sock_path):
    async def go():
        async with RpcServer(make_registry(), sock_path) as srv:
            assert srv.is_serving
            reader, writer = await asyncio.open_unix_connection(sock_path)
            writer.write(json.dumps(req("echo", {"value": 3})).encode())
            line = await reader.readline()  # newline-terminated responses work for line readers
            writer.close()
            return json.loads(line)

    assert asyncio.run(go())["result"] == 3
    assert not os.path.exists(sock_path)
