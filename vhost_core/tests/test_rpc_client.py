import asyncio
import errno
import os
import shutil
import socket
import tempfile

import attrs
import pytest


from vhost_core.rpc.client import RpcClient  # noqa: E402
from vhost_core.rpc.registry import RpcError, RpcRegistry  # noqa: E402
from vhost_core.rpc.testing import ServerThread  # noqa: E402


@attrs.frozen
class NameParams:
    name: str


def make_registry():
    r = RpcRegistry()

    @r.method("bdev_get", params=NameParams)
    def bdev_get(p):
        if p.name != "Malloc0":
            raise RpcError(-errno.ENODEV, f"bdev '{p.name}' does not exist")
        return {"name": p.name, "text": "ß"}

    @r.method("slow")
    async def slow():
        await asyncio.sleep(2)
        return 1

    @r.method("big")
    def big():
        return ["x" * 1000] * 500

    return r


@pytest.fixture
def sock_path():
    d = tempfile.mkdtemp(prefix="rpcc")
    yield os.path.join(d, "c.sock")
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def server(sock_path):
    with ServerThread(make_registry(), sock_path) as st:
        yield st


def test_call_result(server):
    with RpcClient(server.path) as c:
        assert c.call("bdev_get", {"name": "Malloc0"}) == {"name": "Malloc0", "text": "ß"}
        # connection reused for several calls
        assert c.call("rpc_get_methods") == ["bdev_get", "big", "rpc_get_methods", "slow"]
        assert len(c.call("big")) == 500
        assert c.connected
    assert not c.connected


def test_error_response(server):
    c = RpcClient(server.path)
    with pytest.raises(RpcError) as ei:
        c.call("bdev_get", {"name": "nope"})
    assert (ei.value.code, ei.value.message) == (-19, "bdev 'nope' does not exist")
    assert ei.value.request == {"method": "bdev_get", "params": {"name": "nope"}, "id": 1}
    # still usable after an error response
    assert c.call("bdev_get", {"name": "Malloc0"})["name"] == "Malloc0"
    c.close()


def test_params_errors_surface(server):
    with RpcClient(server.path) as c:
        with pytest.raises(RpcError) as ei:
            c.call("bdev_get")
        assert ei.value.code == -32602
        assert ei.value.message == "bdev_get: missing required parameter 'name'"


def test_missing_socket(sock_path):
    with pytest.raises(ConnectionError) as ei:
        RpcClient(sock_path).call("rpc_get_methods")
    msg = str(ei.value)
    assert sock_path in msg
    assert "is the vhost target running? start it with `vhost` or pass -s SOCKET" in msg
    assert ei.value.errno == errno.ENOENT


def test_refused_socket(sock_path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(sock_path)
    s.close()
    with pytest.raises(ConnectionError) as ei:
        with RpcClient(sock_path):
            pass
    assert "refused" in str(ei.value) and sock_path in str(ei.value)
    assert "pass -s SOCKET" in str(ei.value)


def test_timeout(server):
    c = RpcClient(server.path, timeout=0.2)
    with pytest.raises(TimeoutError, match="'slow'"):
        c.call("slow")
    assert not c.connected
    # reconnects on next call
    c.timeout = 5
    assert c.call("bdev_get", {"name": "Malloc0"})["name"] == "Malloc0"
    c.close()


def test_server_goes_away(sock_path):
    st = ServerThread(make_registry(), sock_path).start()
    c = RpcClient(sock_path)
    assert c.call("bdev_get", {"name": "Malloc0"})
    st.stop()
    with pytest.raises(ConnectionError):
        c.call("bdev_get", {"name": "Malloc0"})
    c.close()
