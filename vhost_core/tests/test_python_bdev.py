"""The Python-bdev adapter (vhost_core.bdev.python_adapter): a pure-Python object behind a
native vn_bdev.  A fake plugin distribution (on PYTHONPATH) provides bdevs in the
buffer-based (``readinto``) and minimal (read/write only) styles, and failing ones."""

from __future__ import annotations

import textwrap

import pytest

from vhost_core.testing.conformance.bdev import BdevConformance, BdevRecipe
from vhost_core.testing.daemon import VhostDaemon
from vhost_core.testing.blk import BlkIOError, connect_blk

PLUGIN = """
    import errno

    import attrs

    from vhost_core.bdev.python_adapter import make_python_bdev
    from vhost_core.hookspecs import hookimpl

    VHOST_CORE_API = (2,)


    class Minimal:
        \"\"\"read/write only: no flush, unmap or write_zeroes methods.\"\"\"

        def __init__(self, num_blocks, block_size):
            self.num_blocks, self.block_size = num_blocks, block_size
            self.data = bytearray(num_blocks * block_size)

        def read(self, off, n):
            bs = self.block_size
            return bytes(self.data[off * bs:(off + n) * bs])

        def write(self, off, data):
            self.data[off * self.block_size:off * self.block_size + len(data)] = data


    class Buffers(Minimal):
        \"\"\"readinto (zero-copy reads), flush, unmap.\"\"\"

        read = None

        def readinto(self, off, buffers):
            pos = off * self.block_size
            for b in buffers:
                b[:] = self.data[pos:pos + len(b)]
                pos += len(b)

        def flush(self):
            pass

        def unmap(self, off, n):
            bs = self.block_size
            self.data[off * bs:(off + n) * bs] = bytes(n * bs)


    class Failing(Minimal):
        def read(self, off, n):
            if off == 1:
                raise RuntimeError("boom in read")
            return super().read(off, n)

        def write(self, off, data):
            raise OSError(errno.ENOSPC, "full")


    KINDS = {"minimal": Minimal, "buffers": Buffers, "failing": Failing}


    @attrs.frozen
    class Create:
        name: str
        kind: str
        num_blocks: int = 4096
        block_size: int = 512


    @attrs.frozen
    class Delete:
        name: str


    @hookimpl
    def vhost_register_commands(registry):
        @registry.command("tp_py_create", params=Create)
        def create(ctx, p):
            impl = KINDS[p.kind](p.num_blocks, p.block_size)
            ctx.bdevs.add(make_python_bdev(p.name, impl, module="tp_py", product_name="Python test disk"))
            return p.name

        @registry.command("tp_py_delete", params=Delete, blocking=True)
        def delete(ctx, p):
            ctx.bdevs.delete(p.name, module="tp_py")
            return True
"""


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("pyplugin")
    (root / "tp_py.py").write_text(textwrap.dedent(PLUGIN))
    info = root / "third_party_py-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: third-party-py\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[vhost.plugins]\ntp_py = tp_py\n")
    return root


@pytest.fixture
def vhost_daemon(tmp_path, plugin_path):
    """vhost-core's fixture, with the fake plugin on the daemon's path."""
    d = VhostDaemon(tmp_path / "vhost", env={"PYTHONPATH": str(plugin_path)}).start()
    try:
        yield d
    finally:
        assert d.stop() == 0, d.log()


class TestPythonBdevs(BdevConformance):
    @pytest.fixture(params=["minimal", "buffers"])
    def bdev_recipe(self, request):
        block_size = 512 if request.param == "minimal" else 4096
        return BdevRecipe("tp_py_create", {"name": "Py0", "kind": request.param,
                                           "num_blocks": (2 << 20) // block_size, "block_size": block_size},
                          delete_method="tp_py_delete")


def test_io_types_follow_the_methods_the_object_has(vhost_daemon):
    d = vhost_daemon
    d.rpc("tp_py_create", name="Min0", kind="minimal")
    d.rpc("tp_py_create", name="Buf0", kind="buffers")
    io = {b["name"]: b["supported_io_types"] for b in d.rpc("bdev_get_bdevs")}
    assert io["Min0"]["write_zeroes"] is True        # emulated through write()
    assert not io["Min0"]["flush"] and not io["Min0"]["unmap"]
    assert io["Buf0"]["flush"] and io["Buf0"]["unmap"]


def test_exceptions_fail_the_io_with_ioerr_and_the_bdev_keeps_serving(vhost_daemon):
    d = vhost_daemon
    d.rpc("tp_py_create", name="Bad0", kind="failing")
    d.rpc("vhost_create_blk_controller", ctrlr="bad.0", dev_name="Bad0")
    with connect_blk(d.socket("bad.0")) as dev:
        for _ in range(3):
            with pytest.raises(BlkIOError):
                dev.read(1, 1)                        # RuntimeError in read()
        with pytest.raises(BlkIOError):
            dev.write(0, b"x" * 512)                  # OSError(ENOSPC) in write()
        assert dev.read(0, 1) == bytes(512)           # and it still serves
    log = d.log()
    assert log.count("the Python bdev failed an I/O") == 1, log   # the first failure, not every one
    assert log.count("Traceback") == 1, log
    d.rpc("tp_py_delete", name="Bad0")
    assert d.alive()
