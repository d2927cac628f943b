"""bdev_aio's RPCs against a real daemon: what is created, and every way creation fails
without leaving anything behind."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest

from vhost_core.rpc.registry import RpcError
from vhost_core.testing import connect_blk


def _fds(d) -> list[str]:
    """What the daemon has open, except sockets (RPC connections come and go)."""
    out = []
    for f in os.listdir(f"/proc/{d.proc.pid}/fd"):
        try:
            target = os.readlink(f"/proc/{d.proc.pid}/fd/{f}")
            if not target.startswith("socket:"):
                out.append(target)
        except OSError:
            pass
    return out


def _fails(d, code: int, *needles: str, **params) -> str:
    """The create fails with ``code``, its message names the thing and the fix, and
    nothing is left: no bdev, no open file."""
    before = sorted(_fds(d))
    with pytest.raises(RpcError) as ei:
        d.rpc("bdev_aio_create", **params)
    err = ei.value
    assert err.code == code, (err.code, err.message)
    for n in needles:
        assert n in err.message, err.message
    assert d.rpc("bdev_get_bdevs") == []
    assert sorted(_fds(d)) == before
    return err.message


def test_create_shows_spdk_shape_and_detects_block_size(vhost_daemon, backing_dir, helpers):
    d = vhost_daemon
    f = helpers.make_file(backing_dir / "disk.img", 8 << 20)
    assert d.rpc("bdev_aio_create", filename=str(f), name="aio0") == "aio0"
    f1 = helpers.make_file(backing_dir / "b.img", 8 << 20)
    assert d.rpc("construct_aio_bdev", filename=str(f1), name="aio1", block_size=4096) == "aio1"
    (b0,) = d.rpc("bdev_get_bdevs", name="aio0")
    assert b0["product_name"] == "AIO disk"
    assert (b0["block_size"], b0["num_blocks"]) == (512, 16384)
    assert b0["driver_specific"]["aio"] == {"filename": str(f), "block_size_override": False,
                                            "readonly": False, "fallocate": True, "engine": "aio",
                                            "direct_io": True}
    io = b0["supported_io_types"]
    assert io["read"] and io["write"] and io["flush"] and io["unmap"] and io["write_zeroes"]
    assert not io["reset"]
    (b1,) = d.rpc("bdev_get_bdevs", name="aio1")
    assert (b1["block_size"], b1["num_blocks"]) == (4096, 2048)
    assert b1["driver_specific"]["aio"]["block_size_override"] is True
    assert "bdev aio0: AIO disk on file" in d.log() and "O_DIRECT" in d.log()
    # save_config: the calls that recreate them
    cfg = d.rpc("framework_get_config", name="bdev")
    assert {"method": "bdev_aio_create",
            "params": {"name": "aio0", "filename": str(f), "readonly": False, "uuid": b0["uuid"]}} in cfg
    assert any(c["params"].get("block_size") == 4096 for c in cfg)
    assert d.rpc("bdev_aio_delete", name="aio0") is True
    assert d.rpc("delete_aio_bdev", name="aio1") is True
    assert d.rpc("bdev_get_bdevs") == []
    assert not any(p.startswith(str(backing_dir)) for p in _fds(d))


def test_saved_config_recreates_the_bdevs(tmp_path, backing_dir, helpers):
    from vhost_core.testing.daemon import VhostDaemon

    f = helpers.make_file(backing_dir / "disk.img", 4 << 20)
    with VhostDaemon(tmp_path / "a") as d:
        d.rpc("bdev_aio_create", filename=str(f), name="aio0", block_size=4096, engine="io_uring")
        d.rpc("vhost_create_blk_controller", ctrlr="vhost.0", dev_name="aio0")
        config = {"subsystems": [{"subsystem": s, "config": d.rpc("framework_get_config", name=s)}
                                 for s in ("bdev", "vhost_blk")]}
        uuid = d.rpc("bdev_get_bdevs", name="aio0")[0]["uuid"]
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(config))
    with VhostDaemon(tmp_path / "b", extra_args=("--json", str(cfg))) as d:
        (b,) = d.rpc("bdev_get_bdevs", name="aio0")
        assert (b["block_size"], b["uuid"], b["driver_specific"]["aio"]["engine"]) == (4096, uuid, "io_uring")
        (c,) = d.rpc("vhost_get_controllers", name="vhost.0")
        assert c["backend_specific"]["block"]["bdev"] == "aio0"


def test_creation_errors_name_the_thing_and_the_fix(vhost_daemon, backing_dir, helpers):
    d = vhost_daemon
    good = helpers.make_file(backing_dir / "good.img", 1 << 20)
    _fails(d, -errno.ENOENT, "does not exist", "truncate -s",
           filename=str(backing_dir / "missing.img"), name="x")
    _fails(d, -errno.ENOENT, f"directory '{backing_dir}/nodir' does not exist",
           filename=str(backing_dir / "nodir" / "disk.img"), name="x")
    _fails(d, -errno.EISDIR, "is a directory", filename=str(backing_dir), name="x")
    _fails(d, -errno.EINVAL, "neither a regular file nor a block device", filename="/dev/null", name="x")
    odd = helpers.make_file(backing_dir / "odd.img", (1 << 20) + 100)
    _fails(d, -errno.EINVAL, "1048676 bytes, not a multiple of the block size 512",
           f"truncate -s 1049088 {odd}", filename=str(odd), name="x")
    _fails(d, -errno.EINVAL, "not a multiple of the block size 4096",
           filename=str(helpers.make_file(backing_dir / "odd4k.img", 6 << 10)), name="x", block_size=4096)
    _fails(d, -errno.EINVAL, "is empty", filename=str(helpers.make_file(backing_dir / "empty.img", 0)),
           name="x")
    _fails(d, -errno.EINVAL, "block_size 1000 is not supported", filename=str(good), name="x",
           block_size=1000)
    _fails(d, -errno.EINVAL, "engine 'spdk' is unknown", filename=str(good), name="x", engine="spdk")
    _fails(d, -errno.EINVAL, "not a UUID", filename=str(good), name="x", uuid="nope")
    # Root bypasses file modes; the immutable attribute stops even root from writing.
    with helpers.immutable(good):
        msg = _fails(d, -errno.EPERM, "permission denied opening", "read-write", "chattr -i",
                     "readonly=true", filename=str(good), name="x")
        assert str(good) in msg
        # ... and read-only is the stated way out.
        assert d.rpc("bdev_aio_create", filename=str(good), name="ro", readonly=True) == "ro"
        d.rpc("bdev_aio_delete", name="ro")
    # Names and files are not shared.
    d.rpc("bdev_aio_create", filename=str(good), name="aio0")
    with pytest.raises(RpcError) as ei:
        d.rpc("bdev_aio_create", filename=str(helpers.make_file(backing_dir / "o.img", 1 << 20)), name="aio0")
    assert ei.value.code == -errno.EEXIST
    with pytest.raises(RpcError) as ei:
        d.rpc("bdev_aio_create", filename=str(good), name="aio1")
    assert ei.value.code == -errno.EBUSY and "already used by aio bdev 'aio0'" in ei.value.message
    with pytest.raises(RpcError) as ei:
        d.rpc("bdev_aio_rescan", name="nope")
    assert ei.value.code == -errno.ENODEV
    d.rpc("bdev_malloc_create", num_blocks=256, block_size=512, name="Malloc0")
    with pytest.raises(RpcError) as ei:
        d.rpc("bdev_aio_delete", name="Malloc0")
    assert "malloc bdev, not an aio one" in ei.value.message
    assert [b["name"] for b in d.rpc("bdev_get_bdevs")] == ["aio0", "Malloc0"]
    assert "Traceback" not in d.log()


def test_read_only_filesystem_is_refused_read_write_and_served_read_only(vhost_daemon, backing_dir,
                                                                         helpers, mounts):
    d = vhost_daemon
    src = backing_dir / "src"
    src.mkdir()
    f = helpers.make_file(src / "disk.img", 1 << 20)
    ro = mounts("ro-bind", source=src)
    _fails(d, -errno.EROFS, "read-only filesystem", "readonly=true", filename=str(ro / "disk.img"), name="x")
    d.rpc("bdev_aio_create", filename=str(ro / "disk.img"), name="ro", readonly=True)
    (b,) = d.rpc("bdev_get_bdevs", name="ro")
    assert b["driver_specific"]["aio"]["readonly"] is True
    assert not b["supported_io_types"]["write"] and not b["supported_io_types"]["unmap"]
    d.rpc("vhost_create_blk_controller", ctrlr="vhost.ro", dev_name="ro")
    with connect_blk(d.socket("vhost.ro")) as dev:
        assert dev.has_feature(5)  # VIRTIO_BLK_F_RO
        assert dev.read(0, 8) == bytes(4096)
        assert dev.submit(1, 0, os.urandom(512)).status != 0
    assert f.read_bytes() == bytes(1 << 20)


def test_filesystem_without_o_direct_falls_back_to_buffered_io(vhost_daemon, mounts, helpers):
    d = vhost_daemon
    mp = mounts("ramfs")
    f = helpers.make_file(mp / "disk.img", 1 << 20)
    d.rpc("bdev_aio_create", filename=str(f), name="aio0")
    log = d.wait_log("without O_DIRECT")
    assert "using buffered I/O: durability relies on the fdatasync done for each guest flush" in log
    assert "(ramfs)" in log
    (b,) = d.rpc("bdev_get_bdevs", name="aio0")
    assert b["driver_specific"]["aio"]["direct_io"] is False
    # ramfs cannot punch holes: no unmap offered; write_zeroes still works, by writing zeros.
    assert not b["supported_io_types"]["unmap"] and b["supported_io_types"]["write_zeroes"]
    d.rpc("vhost_create_blk_controller", ctrlr="vhost.0", dev_name="aio0")
    data = os.urandom(8192)
    with connect_blk(d.socket("vhost.0")) as dev:
        assert not dev.has_feature(13)  # VIRTIO_BLK_F_DISCARD
        dev.write(3, data, seg_size=700)
        dev.flush()
        assert dev.read(3, 16) == data
        dev.write_zeroes(5, 4)
    assert f.read_bytes()[1536:1536 + 8192] == data[:1024] + bytes(2048) + data[3072:]
    with pytest.raises(RpcError) as ei:
        d.rpc("bdev_aio_create", filename=str(helpers.make_file(mp / "b.img", 1 << 20)), name="x",
              fallocate=True)
    assert ei.value.code == -errno.EOPNOTSUPP and "cannot punch holes" in ei.value.message


def test_block_device_block_size_is_detected_and_checked(vhost_daemon, backing_dir, helpers, loop_device):
    d = vhost_daemon
    dev512 = loop_device(helpers.make_file(backing_dir / "l1.img", 4 << 20))
    dev4k = loop_device(helpers.make_file(backing_dir / "l2.img", 4 << 20), sector_size=4096)
    d.rpc("bdev_aio_create", filename=dev512, name="l512")
    d.rpc("bdev_aio_create", filename=dev4k, name="l4k")
    got = [(b["block_size"], b["num_blocks"]) for b in d.rpc("bdev_get_bdevs")]
    assert got == [(512, 8192), (4096, 1024)]
    assert "AIO disk on block device" in d.log()
    d.rpc("bdev_aio_delete", name="l4k")
    with pytest.raises(RpcError) as ei:
        d.rpc("bdev_aio_create", filename=dev4k, name="x", block_size=512)
    assert ei.value.code == -errno.EINVAL
    assert "smaller than the logical block size 4096" in ei.value.message and "use 4096" in ei.value.message
    # I/O on the block device, with unmap through the loop driver.
    d.rpc("vhost_create_blk_controller", ctrlr="vhost.0", dev_name="l512")
    data = os.urandom(65536)
    with connect_blk(d.socket("vhost.0")) as dev:
        dev.write(64, data)
        dev.flush()
        assert dev.read(64, 128) == data
        if dev.has_feature(13):
            dev.discard(64, 64)
            assert dev.read(64, 64) == bytes(32768)
    with open(backing_dir / "l1.img", "rb") as f:
        f.seek(128 * 512)
        assert f.read(32768) == data[32768:]


def test_mounted_block_device_is_refused(vhost_daemon, backing_dir, helpers, mounts):
    d = vhost_daemon
    mp = mounts("ext4")
    src = subprocess.run(["findmnt", "-n", "-o", "SOURCE", str(mp)], capture_output=True,
                         text=True).stdout.strip()
    if not src.startswith("/dev/"):
        pytest.fail(f"no block device behind the scratch mount ({src!r})")
    _fails(d, -errno.EBUSY, "is in use", "unmount", filename=src, name="x")


def test_io_uring_unavailable_falls_back_to_aio_with_a_notice(tmp_path, backing_dir, helpers):
    from vhost_core.testing.daemon import VhostDaemon

    f = helpers.make_file(backing_dir / "disk.img", 1 << 20)
    with VhostDaemon(tmp_path / "v", env={"VHOST_BDEV_AIO_DISABLE_URING": "1",
                                          "VHOST_BDEV_AIO_ENGINE": "io_uring"}) as d:
        d.rpc("bdev_aio_create", filename=str(f), name="aio0")
        assert "bdev aio0: io_uring is not available here" in d.wait_log("using Linux AIO instead")
        assert d.rpc("bdev_get_bdevs", name="aio0")[0]["driver_specific"]["aio"]["engine"] == "aio"
        d.rpc("vhost_create_blk_controller", ctrlr="vhost.0", dev_name="aio0")
        with connect_blk(d.socket("vhost.0")) as dev:
            dev.write(0, b"\x5a" * 4096)
            assert dev.read(0, 8) == b"\x5a" * 4096


def test_cli_commands_match_spdk_rpc_py(vhost_daemon, backing_dir, helpers):
    d = vhost_daemon
    f = helpers.make_file(backing_dir / "disk.img", 4 << 20)

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "vhost_core.rpc.cli", "-s", d.rpc_path, *args],
                              capture_output=True, text=True, timeout=60)

    r = cli("bdev_aio_create", str(f), "aio0", "4096", "-r")
    assert (r.returncode, r.stdout.strip()) == (0, "aio0"), r.stderr
    (b,) = d.rpc("bdev_get_bdevs", name="aio0")
    assert (b["block_size"], b["driver_specific"]["aio"]["readonly"]) == (4096, True)
    with open(f, "r+b") as fh:
        fh.truncate(8 << 20)
    r = cli("bdev_aio_rescan", "aio0")
    assert r.returncode == 0 and r.stdout.strip() == "true", r.stderr
    assert d.rpc("bdev_get_bdevs", name="aio0")[0]["num_blocks"] == 2048
    r = cli("bdev_aio_get_stats", "-b", "aio0")
    assert r.returncode == 0 and json.loads(r.stdout)[0]["io_errors"] == 0
    r = cli("bdev_aio_delete", "aio0")
    assert (r.returncode, r.stdout) == (0, ""), r.stderr
    r = cli("construct_aio_bdev", str(f), "aio1", "--engine", "io_uring")
    assert r.returncode == 0 and "construct_aio_bdev is deprecated, use bdev_aio_create instead" in r.stderr
    assert d.rpc("bdev_get_bdevs", name="aio1")[0]["block_size"] == 512
    r = cli("bdev_aio_create", str(backing_dir / "nope.img"), "aio2")
    assert r.returncode != 0 and "does not exist" in r.stdout + r.stderr


def test_rescan_calls_the_resize_callbacks_in_process(backing_dir, helpers, tmp_path):
    """The hook a device uses to tell a running guest about the new size."""
    from vhost_core.app import App

    from vhost_bdev_aio import plugin

    app = App(str(tmp_path), 1 << min(os.sched_getaffinity(0)), str(tmp_path / "rpc.sock"),
              plugin_modules={"bdev_aio": plugin})
    app.register_rpc_methods()
    app.start_init()
    rpc = app.rpc
    f = helpers.make_file(backing_dir / "disk.img", 1 << 20)
    try:
        rpc.dispatch("bdev_aio_create", {"filename": str(f), "name": "aio0"})
        bdev = app.bdevs.get("aio0")
        seen = []
        app.bdevs.open("aio0", "test", on_resize=lambda desc: seen.append(desc.bdev.num_blocks))
        rpc.dispatch("bdev_aio_rescan", {"name": "aio0"})
        assert seen == []                       # unchanged size: nobody is bothered
        with open(f, "r+b") as fh:
            fh.truncate(3 << 20)
        assert rpc.dispatch("bdev_aio_rescan", {"name": "aio0"}) is True
        assert seen == [6144] and bdev.num_blocks == 6144
        app.bdevs.delete("aio0")
        assert app.bdev_modules.get("aio").states == {}
    finally:
        app.stop()
