"""Wire compatibility with SPDK's Python RPC client (scripts/rpc.py).

SPDK's ``JSONRPCClient`` sends ``json.dumps(req, indent=2)`` (several requests
joined by "\\n", a batch as one indented array) with no trailing newline, then
reads 4096-byte chunks, decodes each chunk as UTF-8 on its own, and
``raw_decode``s the left-stripped buffer until one whole value parses.  The
first tests re-implement that framing; the last ones drive the real client
(PyPI package ``spdk``) when it is installed.
"""

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

import attrs
import pytest


from vhost_core.rpc.registry import RpcError, RpcRegistry  # noqa: E402
from vhost_core.rpc.testing import ServerThread  # noqa: E402


class SpdkStyleClient:
    """Frames and reads exactly like SPDK's JSONRPCClient (independent re-implementation)."""

    def __init__(self, path, timeout=5.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.sock.settimeout(timeout)
        self.next_id = 0
        self.pending = []
        self.recv_buf = ""

    def add_request(self, method, params):
        self.next_id += 1
        r = {"jsonrpc": "2.0", "method": method, "id": self.next_id}
        if params:
            r["params"] = dict(params)
        self.pending.append(r)
        return self.next_id

    def flush(self, batch=False):
        if batch:
            text = json.dumps(self.pending, indent=2)
        else:
            text = "\n".join(json.dumps(r, indent=2) for r in self.pending)
        self.pending = []
        self.sock.sendall(text.encode("utf-8"))  # note: no trailing newline

    def _decode_one(self):
        buf = self.recv_buf.lstrip()
        try:
            obj, idx = json.JSONDecoder().raw_decode(buf)
        except ValueError:
            return None
        self.recv_buf = buf[idx:]
        return obj

    def recv(self):
        resp = self._decode_one()
        while not resp:
            data = self.sock.recv(4096)
            if not data:
                raise EOFError("connection closed with partial response: " + self.recv_buf)
            self.recv_buf += data.decode("utf-8")  # per chunk, like SPDK
            resp = self._decode_one()
        return resp

    def call(self, method, params=None):
        rid = self.add_request(method, params or {})
        self.flush()
        resp = self.recv()
        assert resp["id"] == rid
        if "error" in resp:
            raise RpcError(resp["error"]["code"], resp["error"]["message"])
        return resp["result"]

    def close(self):
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


@attrs.frozen
class GetBdevs:
    name: str | None = None
    timeout: int | None = None


@attrs.frozen
class Ctrlr:
    ctrlr: str


def make_registry():
    r = RpcRegistry()
    bdevs = [{"name": f"Malloc{i}", "product_name": "Malloc disk", "note": "ünïcödé " * 50} for i in range(40)]

    @r.method("bdev_get_bdevs", params=GetBdevs, deprecated_aliases=["get_bdevs"])
    def get(p):
        if p.name is None:
            return bdevs
        hit = [b for b in bdevs if b["name"] == p.name]
        if not hit:
            raise RpcError(-errno.ENODEV, "No such device")
        return hit

    @r.method("vhost_delete_controller", params=Ctrlr)
    def delete(p):
        return True

    @r.method("bdev_malloc_create")
    def create():
        return "Malloc40"

    @r.method("spdk_get_version")
    def version():
        return {"version": "vhost 0.1.0", "fields": {"major": 0, "minor": 1, "patch": 0, "suffix": ""}}

    return r


@pytest.fixture
def server():
    d = tempfile.mkdtemp(prefix="rpcspdk")
    with ServerThread(make_registry(), os.path.join(d, "spdk.sock")) as st:
        yield st
    shutil.rmtree(d, ignore_errors=True)


def test_spdk_framing_single_calls(server):
    c = SpdkStyleClient(server.path)
    try:
        big = c.call("bdev_get_bdevs")  # response spans many 4096-byte chunks, non-ASCII escaped
        assert len(big) == 40 and big[0]["note"].startswith("ünïcödé")
        assert c.call("bdev_get_bdevs", {"name": "Malloc3"})[0]["name"] == "Malloc3"
        assert c.call("spdk_get_version")["version"] == "vhost 0.1.0"
        assert c.call("rpc_get_methods", {"current": False, "include_aliases": False})
        with pytest.raises(RpcError) as ei:
            c.call("bdev_get_bdevs", {"name": "nope"})
        assert ei.value.code == -19
    finally:
        c.close()


def test_spdk_framing_pipelined_requests(server):
    c = SpdkStyleClient(server.path)
    ids = [c.add_request("bdev_get_bdevs", {"name": f"Malloc{i}"}) for i in range(5)]
    c.flush()  # five indented requests joined by "\n", sent in one write
    got = [c.recv() for _ in ids]
    assert [g["id"] for g in got] == ids
    assert [g["result"][0]["name"] for g in got] == [f"Malloc{i}" for i in range(5)]
    c.close()


def test_spdk_batch_mode(server):
    c = SpdkStyleClient(server.path)
    c.add_request("bdev_get_bdevs", {"name": "Malloc1"})
    c.add_request("vhost_delete_controller", {"ctrlr": "vhost.0"})
    c.add_request("bdev_get_bdevs", {"name": "nope"})
    c.flush(batch=True)
    resp = c.recv()
    assert isinstance(resp, list) and [r["id"] for r in resp] == [1, 2, 3]
    assert resp[1]["result"] is True and resp[2]["error"]["code"] == -19
    c.close()


# -- the real client, when the `spdk` package is installed ---------------------


def _spdk_client():
    import importlib

    # scripts/install.sh --test installs SPDK's client (PyPI "spdk").
    mod = importlib.import_module("spdk.rpc.client")
    return mod


def test_real_spdk_jsonrpc_client(server):
    mod = _spdk_client()
    client = mod.JSONRPCClient(server.path, timeout=5.0)
    try:
        assert len(client.call("bdev_get_bdevs")) == 40
        assert client.bdev_get_bdevs(name="Malloc2", timeout=None)[0]["name"] == "Malloc2"
        assert "get_bdevs" in client.rpc_get_methods(current=False, include_aliases=True)
        with pytest.raises(mod.JSONRPCException) as ei:
            client.call("bdev_get_bdevs", {"name": "nope"})
        assert '"code": -19' in ei.value.message and "No such device" in ei.value.message
    finally:
        client.close()


def _spdk_rpc(server, *args, stdin=None):
    mod = _spdk_client()
    site = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(mod.__file__))))
    env = dict(os.environ, PYTHONPATH=site)
    return subprocess.run(
        [sys.executable, "-m", "spdk.spdk_rpc", "-s", server.path, *args],
        input=stdin, capture_output=True, text=True, env=env, timeout=60,
    )


def test_real_rpc_py_cli(server):
    r = _spdk_rpc(server, "bdev_get_bdevs", "-b", "Malloc5")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)[0]["name"] == "Malloc5"
    r = _spdk_rpc(server, "spdk_get_version")
    assert r.returncode == 0 and json.loads(r.stdout)["version"] == "vhost 0.1.0"
    r = _spdk_rpc(server, "vhost_delete_controller", "vhost.0")
    assert (r.returncode, r.stdout) == (0, "")
    r = _spdk_rpc(server, "bdev_get_bdevs", "-b", "nope")
    assert r.returncode == 1 and "Got JSON-RPC error response" in r.stdout and '"code": -19' in r.stdout


def test_real_rpc_py_script_and_batch_mode(server):
    r = _spdk_rpc(server, stdin="bdev_get_bdevs -b Malloc1\nspdk_get_version\n")
    assert r.returncode == 0, r.stderr
    assert '"name": "Malloc1"' in r.stdout and "vhost 0.1.0" in r.stdout
    r = _spdk_rpc(server, "-b", stdin="bdev_get_bdevs -b Malloc1\nspdk_get_version\n")
    assert r.returncode == 0, r.stderr
    assert '"name": "Malloc1"' in r.stdout and "vhost 0.1.0" in r.stdout
