"""bdev_rbd's RPCs against a real daemon and a real cluster: what users see of a created
bdev, registered clusters, resizes, snapshots and clones, and every way creation fails
(named, with its fix, within the timeout, nothing left behind)."""

from __future__ import annotations

import errno
import os
import socket
import threading
import time

import pytest

from vhost_core.rpc.registry import RpcError
from vhost_core.testing import connect_blk

MIB = 1 << 20


def _create(d, ceph, image: str, name: str = "Ceph0", block_size: int = 512, **extra) -> str:
    return d.rpc("bdev_rbd_create", name=name, pool_name="rbd", rbd_name=image, block_size=block_size,
                 config=ceph.client_conf(), **extra)


def _fails(d, method: str, code: int, *needles: str, within: float | None = None, **params) -> str:
    t0 = time.monotonic()
    with pytest.raises(RpcError) as ei:
        d.rpc(method, **params)
    took = time.monotonic() - t0
    err = ei.value
    assert err.code == code, (err.code, err.message)
    for n in needles:
        assert n in err.message, err.message
    if within is not None:
        assert took < within, f"{method} took {took:.1f} s"
    assert d.rpc("bdev_get_bdevs") == []
    return err.message


def test_create_shows_spdk_shape_and_data_reaches_the_image(vhost_daemon, ceph, rbd_image, tmp_path):
    d = vhost_daemon
    assert _create(d, ceph, rbd_image, block_size=4096) == "Ceph0"
    (b,) = d.rpc("bdev_get_bdevs", name="Ceph0")
    assert b["product_name"] == "Ceph Rbd Disk"
    assert (b["block_size"], b["num_blocks"]) == (4096, 64 * MIB // 4096)
    assert b["driver_specific"]["rbd"] == {"pool_name": "rbd", "rbd_name": str(rbd_image),
                                           "config": ceph.client_conf()}
    io = b["supported_io_types"]
    assert io["read"] and io["write"] and io["flush"] and io["unmap"] and io["write_zeroes"]
    assert not io["reset"]
    d.rpc("vhost_create_blk_controller", ctrlr="vhost.0", dev_name="Ceph0")
    data = os.urandom(256 << 10)
    with connect_blk(d.socket("vhost.0"), num_queues=2) as dev:
        assert dev.capacity == 64 * MIB // 512
        dev.write(2048, data)
        dev.write(8, data[:4096], queue=1)
        dev.flush()
        assert dev.read(2048, len(data) // 512, queue=1) == data
    out = tmp_path / "export"
    ceph.rbd("export", "--no-progress", f"rbd/{rbd_image}", str(out))
    blob = out.read_bytes()
    assert blob[2048 * 512:2048 * 512 + len(data)] == data and blob[4096:8192] == data[:4096]
    s = d.rpc("bdev_rbd_get_stats", name="Ceph0")[0]
    assert s["io_errors"] == 0 and s["completed"]["write"] == 2 and s["completed"]["flush"] >= 1
    assert "bdev Ceph0: Ceph RBD image rbd/" in d.log()


def test_old_names_work_and_log_their_replacement(vhost_daemon, ceph, rbd_image):
    d = vhost_daemon
    assert d.rpc("construct_rbd_bdev", pool_name="rbd", rbd_name=str(rbd_image), block_size=512,
                 config=ceph.client_conf()) == "Ceph0"
    assert d.rpc("delete_rbd_bdev", name="Ceph0") is True
    assert d.rpc("bdev_get_bdevs") == []
    log = d.log()
    assert "construct_rbd_bdev" in log and "bdev_rbd_create" in log


def test_registered_cluster_is_shared_listed_saved_and_unregistered_only_when_unused(vhost_daemon, ceph,
                                                                                     rbd_image):
    d = vhost_daemon
    conf = ceph.client_conf()
    assert d.rpc("bdev_rbd_register_cluster", name="c1", user_id="admin", config_param=conf) == "c1"
    assert d.rpc("bdev_rbd_get_clusters_info") == [{"cluster_name": "c1", "user_id": "admin",
                                                    "config_param": conf}]
    assert d.rpc("bdev_rbd_get_clusters_info", name="c1")["cluster_name"] == "c1"
    second = rbd_image.make(32)
    d.rpc("bdev_rbd_create", name="A", pool_name="rbd", rbd_name=str(rbd_image), block_size=512,
          cluster_name="c1")
    d.rpc("bdev_rbd_create", name="B", pool_name="rbd", rbd_name=second, block_size=4096, cluster_name="c1",
          read_only=True)
    (a,) = d.rpc("bdev_get_bdevs", name="A")
    assert a["driver_specific"]["rbd"] == {"pool_name": "rbd", "rbd_name": str(rbd_image), "cluster_name": "c1"}
    (b,) = d.rpc("bdev_get_bdevs", name="B")
    assert not b["supported_io_types"]["write"] and b["num_blocks"] == 32 * MIB // 4096
    with pytest.raises(RpcError) as ei:
        d.rpc("bdev_rbd_unregister_cluster", name="c1")
    assert ei.value.code == -errno.EBUSY and "A, B" in ei.value.message and "bdev_rbd_delete" in ei.value.message
    # save_config (rpc.py) is framework_get_config per subsystem.
    bdev_calls = [c for c in d.rpc("framework_get_config", name="bdev") if c["method"].startswith("bdev_rbd")]
    assert [c["method"] for c in bdev_calls] == ["bdev_rbd_register_cluster", "bdev_rbd_create",
                                                 "bdev_rbd_create"]
    assert bdev_calls[2]["params"]["read_only"] is True
    uuids = {x["name"]: x["uuid"] for x in d.rpc("bdev_get_bdevs")}
    d.rpc("bdev_rbd_delete", name="A")
    d.rpc("bdev_rbd_delete", name="B")
    assert d.rpc("bdev_rbd_unregister_cluster", name="c1") is True
    assert d.rpc("bdev_rbd_get_clusters_info") == []
    # save_config's calls recreate the same bdevs.
    for c in bdev_calls:
        d.rpc(c["method"], **c["params"])
    assert {x["name"]: x["uuid"] for x in d.rpc("bdev_get_bdevs")} == uuids


def test_resize_rpc_grows_the_image_and_refuses_to_shrink(vhost_daemon, ceph, rbd_image):
    d = vhost_daemon
    _create(d, ceph, rbd_image)
    assert d.rpc("bdev_rbd_resize", name="Ceph0", new_size=96) is True
    assert d.rpc("bdev_get_bdevs", name="Ceph0")[0]["num_blocks"] == 96 * MIB // 512
    assert "size 96 MiB" in ceph.rbd("info", f"rbd/{rbd_image}")
    with pytest.raises(RpcError) as ei:
        d.rpc("bdev_rbd_resize", name="Ceph0", new_size=32)
    assert ei.value.code == -errno.EINVAL and "smaller" in ei.value.message
    assert "size 96 MiB" in ceph.rbd("info", f"rbd/{rbd_image}")


def test_an_image_grown_with_the_rbd_cli_is_noticed_without_any_rpc(vhost_daemon, ceph, rbd_image):
    d = vhost_daemon
    _create(d, ceph, rbd_image)
    d.rpc("vhost_create_blk_controller", ctrlr="vhost.0", dev_name="Ceph0")
    with connect_blk(d.socket("vhost.0")) as dev:
        assert dev.capacity == 64 * MIB // 512
        ceph.rbd("resize", "--size", "80M", f"rbd/{rbd_image}")
        deadline = time.monotonic() + 15
        while d.rpc("bdev_get_bdevs", name="Ceph0")[0]["num_blocks"] != 80 * MIB // 512:
            assert time.monotonic() < deadline, d.log()
            time.sleep(0.1)
        # The new tail is usable at once.
        dev.write(80 * MIB // 512 - 8, b"\xa5" * 4096)
        assert dev.read(80 * MIB // 512 - 8, 8) == b"\xa5" * 4096
    assert "resized outside the target" in d.log()


def test_snapshot_and_clone_made_with_the_rbd_cli_are_readable_as_bdevs(vhost_daemon, ceph, rbd_image, tmp_path):
    d = vhost_daemon
    src = tmp_path / "src"
    payload = os.urandom(4 * MIB)
    src.write_bytes(payload)
    ceph.rbd("import", "--no-progress", str(src), "rbd/golden")
    try:
        ceph.rbd("snap", "create", "rbd/golden@s1")
        ceph.rbd("snap", "protect", "rbd/golden@s1")
        ceph.rbd("clone", "rbd/golden@s1", "rbd/golden-clone")
        # The image moves on after the snapshot; the snapshot does not.
        ceph.rbd("bench", "--io-type", "write", "--io-size", "4K", "--io-total", "64K", "--io-pattern", "seq",
                 "rbd/golden", timeout=60)
        d.rpc("bdev_rbd_create", name="Snap", pool_name="rbd", rbd_name="golden@s1", block_size=512,
              config=ceph.client_conf())
        d.rpc("bdev_rbd_create", name="Clone", pool_name="rbd", rbd_name="golden-clone", block_size=512,
              config=ceph.client_conf())
        (snap,) = d.rpc("bdev_get_bdevs", name="Snap")
        assert not snap["supported_io_types"]["write"]
        d.rpc("vhost_create_blk_controller", ctrlr="vhost.0", dev_name="Snap")
        d.rpc("vhost_create_blk_controller", ctrlr="vhost.1", dev_name="Clone")
        def read_all(dev) -> bytes:
            return b"".join(dev.read(i * 2048, 2048) for i in range(len(payload) // MIB))

        with connect_blk(d.socket("vhost.0"), memory_mb=32) as dev:
            assert read_all(dev) == payload
        with connect_blk(d.socket("vhost.1"), memory_mb=32) as dev:
            assert read_all(dev) == payload
            dev.write(0, b"\x11" * 4096)            # copy-up: the parent is untouched
            assert dev.read(0, 8) == b"\x11" * 4096
        for c in ("vhost.0", "vhost.1"):
            d.rpc("vhost_delete_controller", ctrlr=c)
        d.rpc("bdev_rbd_delete", name="Snap")
        d.rpc("bdev_rbd_delete", name="Clone")
    finally:
        ceph.run("rbd", "rm", "--no-progress", "rbd/golden-clone", check=False)
        ceph.run("rbd", "snap", "unprotect", "rbd/golden@s1", check=False)
        ceph.run("rbd", "snap", "purge", "--no-progress", "rbd/golden", check=False)
        ceph.run("rbd", "rm", "--no-progress", "rbd/golden", check=False)


# ------------------------------------------------------------------ bad input


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_monitor_fails_within_the_timeout_and_the_rpc_socket_keeps_answering(vhost_daemon,
                                                                                        ceph, rbd_image):
    d = vhost_daemon
    conf = {**ceph.client_conf(), "mon_host": f"127.0.0.1:{_dead_port()}"}
    answered: list[float] = []
    stop = threading.Event()

    def probe() -> None:
        from vhost_core.rpc.client import RpcClient
        with RpcClient(d.rpc_path) as c:
            while not stop.is_set():
                t0 = time.monotonic()
                c.call("bdev_get_bdevs")
                answered.append(time.monotonic() - t0)
                time.sleep(0.2)

    t = threading.Thread(target=probe)
    t.start()
    try:
        msg = _fails(d, "bdev_rbd_create", -errno.ETIMEDOUT, conf["mon_host"], "ceph-mon", within=12,
                     pool_name="rbd", rbd_name=str(rbd_image), block_size=512, config=conf)
    finally:
        stop.set()
        t.join()
    assert len(answered) >= 5 and max(answered) < 1.0, answered
    assert "mon_host" in msg


def test_wrong_key_is_refused_naming_the_key(vhost_daemon, ceph, rbd_image):
    conf = {**ceph.client_conf(), "key": "AQBVHqFhAAAAABAAw3MRGrP6rUqfWSjPL+ZTXw=="}
    _fails(vhost_daemon, "bdev_rbd_create", -errno.EACCES, "client.admin", "key", within=12,
           pool_name="rbd", rbd_name=str(rbd_image), block_size=512, config=conf)


def test_missing_pool_and_image_and_snapshot_name_what_exists_and_how_to_create_it(vhost_daemon, ceph, rbd_image):
    d = vhost_daemon
    conf = ceph.client_conf()
    _fails(d, "bdev_rbd_create", -errno.ENOENT, "pool 'nopool'", "pools: rbd", "ceph osd pool create nopool",
           pool_name="nopool", rbd_name=str(rbd_image), block_size=512, config=conf)
    _fails(d, "bdev_rbd_create", -errno.ENOENT, "image 'noimg'", str(rbd_image), "rbd create",
           pool_name="rbd", rbd_name="noimg", block_size=512, config=conf)
    _fails(d, "bdev_rbd_create", -errno.ENOENT, "no snapshot 'nosnap'", "rbd snap create",
           pool_name="rbd", rbd_name=f"{rbd_image}@nosnap", block_size=512, config=conf)


def test_bad_config_key_block_size_cluster_and_mon_address_are_refused_with_their_fix(vhost_daemon, ceph,
                                                                                    rbd_image, tmp_path):
    d = vhost_daemon
    conf = ceph.client_conf()
    _fails(d, "bdev_rbd_create", -errno.EINVAL, "'no_such_option'", "fix or drop it",
           pool_name="rbd", rbd_name=str(rbd_image), block_size=512, config={**conf, "no_such_option": "1"})
    _fails(d, "bdev_rbd_create", -errno.EINVAL, "block_size 1000", pool_name="rbd", rbd_name=str(rbd_image),
           block_size=1000, config=conf)
    _fails(d, "bdev_rbd_create", -errno.ENOENT, "no cluster 'nope'", "bdev_rbd_register_cluster",
           pool_name="rbd", rbd_name=str(rbd_image), block_size=512, cluster_name="nope")
    if not os.path.exists("/etc/ceph/ceph.conf"):
        _fails(d, "bdev_rbd_create", -errno.EINVAL, "no monitor address", "mon_host", "config_file",
               pool_name="rbd", rbd_name=str(rbd_image), block_size=512, config={"key": conf["key"]})
    _fails(d, "bdev_rbd_register_cluster", -errno.ENOENT, str(tmp_path / "nope.conf"),
           name="c", config_file=str(tmp_path / "nope.conf"))
    _fails(d, "bdev_rbd_register_cluster", -errno.EINVAL, "core_mask 0x400", "names no core", name="c",
           config_param=conf, core_mask="0x400")
    assert d.rpc("bdev_rbd_get_clusters_info") == []
    with pytest.raises(RpcError) as ei:
        d.rpc("bdev_rbd_unregister_cluster", name="c")
    assert ei.value.code == -errno.ENOENT


def test_a_registered_cluster_from_a_config_file_and_key_file(vhost_daemon, ceph, rbd_image, tmp_path):
    d = vhost_daemon
    conf = tmp_path / "c.conf"
    conf.write_text(f"[global]\nmon host = v1:{ceph.mon_host}\n")
    keyring = tmp_path / "keyring"
    keyring.write_text(f"[client.admin]\n\tkey = {ceph.admin_key}\n")
    d.rpc("bdev_rbd_register_cluster", name="cf", config_file=str(conf), key_file=str(keyring))
    d.rpc("bdev_rbd_create", name="X", pool_name="rbd", rbd_name=str(rbd_image), block_size=512,
          cluster_name="cf")
    assert d.rpc("bdev_get_bdevs", name="X")[0]["num_blocks"] == 64 * MIB // 512
    d.rpc("bdev_rbd_delete", name="X")
    d.rpc("bdev_rbd_unregister_cluster", name="cf")


def test_core_mask_pins_librados_threads_and_nothing_else(vhost_daemon, ceph):
    d = vhost_daemon
    last = os.cpu_count() - 1
    d.rpc("bdev_rbd_register_cluster", name="c", config_param=ceph.client_conf(), core_mask=hex(1 << last))
    assert d.rpc("bdev_rbd_get_clusters_info", name="c")["core_mask"] == hex(1 << last)
    pinned, others = [], []
    for tid in os.listdir(f"/proc/{d.proc.pid}/task"):
        try:
            comm = open(f"/proc/{d.proc.pid}/task/{tid}/comm").read().strip()
            status = open(f"/proc/{d.proc.pid}/task/{tid}/status").read()
        except OSError:
            continue
        cpus = next(line.split()[1] for line in status.splitlines() if line.startswith("Cpus_allowed_list"))
        (pinned if cpus == str(last) else others).append(comm)
    assert any(c.startswith("msgr-worker") for c in pinned), (pinned, others)
    assert not any(c.startswith("msgr-worker") for c in others) or last == 0, (pinned, others)
    # the daemon's own threads (RPC server, the main thread) are not pinned by it
    assert any(c in ("vhost", "python3", "python") or c.startswith("vhost") for c in others) or last == 0, others


def test_an_image_moved_to_the_trash_under_a_controller_is_hot_removed(vhost_daemon, ceph, rbd_image):
    """`rbd rm` refuses an image the target has open (it is watched); `rbd trash mv` does not:
    the image is gone for its users, so its bdev is hot-removed and the front-end's I/O fails."""
    d = vhost_daemon
    _create(d, ceph, rbd_image)
    d.rpc("vhost_create_blk_controller", ctrlr="vhost.0", dev_name="Ceph0")
    with connect_blk(d.socket("vhost.0")) as dev:
        dev.write(0, b"\x07" * 4096)
        assert ceph.run("rbd", "rm", "--no-progress", f"rbd/{rbd_image}", check=False).returncode != 0
        ceph.rbd("trash", "mv", f"rbd/{rbd_image}")
        deadline = time.monotonic() + 20
        while d.rpc("bdev_get_bdevs"):
            assert time.monotonic() < deadline, d.log()
            time.sleep(0.2)
        r = dev.submit(0, 0, b"", 4096)          # VIRTIO_BLK_T_IN
        assert r.status != 0
    assert "moved to the trash" in d.log()
    ceph.run("rbd", "trash", "purge", "--no-progress", "rbd", check=False)
