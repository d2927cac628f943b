"""bdev_get_iostat / bdev_reset_iostat: SPDK's per-bdev I/O statistics, counted by the
device types (vhost-blk, vhost-scsi) on the reactor and summed per bdev by the core."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from blk_helpers import connect, wait_no_session
from vhost_core.rpc.client import RpcError


def iostat(d, name: str) -> dict:
    out = d.rpc("bdev_get_iostat", name=name)
    assert 1e8 < out["tick_rate"] < 1e11 and out["ticks"] > 0
    (b,) = out["bdevs"]
    assert b["name"] == name
    return b


def test_counts_bytes_and_latencies_of_what_the_guest_did(blk_daemon):
    d = blk_daemon
    d.rpc("bdev_reset_iostat", name="Malloc0")
    with connect(d, "vhost.0") as dev:
        for i in range(10):
            dev.read(i * 8, 8)                  # 10 reads of 4 KiB
        for i in range(5):
            dev.write(i * 16, b"w" * 8192)      # 5 writes of 8 KiB
        dev.flush()
        dev.discard(64, 16)                     # 8 KiB
    s = iostat(d, "Malloc0")
    assert (s["num_read_ops"], s["bytes_read"]) == (10, 40960)
    assert (s["num_write_ops"], s["bytes_written"]) == (5, 40960)
    assert (s["num_unmap_ops"], s["bytes_unmapped"]) == (1, 8192)
    assert s["num_flush_ops"] == 1
    for kind in ("read", "write", "unmap"):
        ops = s[{"read": "num_read_ops", "write": "num_write_ops", "unmap": "num_unmap_ops"}[kind]]
        lo, hi, total = (s[f"min_{kind}_latency_ticks"], s[f"max_{kind}_latency_ticks"],
                         s[f"{kind}_latency_ticks"])
        assert 0 < lo <= total / ops <= hi, (kind, lo, total, hi)
    assert s["num_copy_ops"] == 0
    # The other controllers' bdevs saw none of it.


def test_reset_modes_and_totals_that_outlive_the_controller(blk_daemon):
    d = blk_daemon
    d.rpc("bdev_reset_iostat")
    with connect(d, "vhost.1") as dev:
        for i in range(3):
            dev.write(i, b"a" * 512)
    s = iostat(d, "Malloc1")
    assert s["num_write_ops"] == 3 and s["max_write_latency_ticks"] > 0
    d.rpc("bdev_reset_iostat", name="Malloc1", mode="maxmin")
    s = iostat(d, "Malloc1")
    assert s["num_write_ops"] == 3
    assert s["max_write_latency_ticks"] == s["min_write_latency_ticks"] == 0
    # reset_mode on the query itself: this answer still has the counts, the next does not.
    assert d.rpc("bdev_get_iostat", name="Malloc1", reset_mode="all")["bdevs"][0]["num_write_ops"] == 3
    assert iostat(d, "Malloc1")["num_write_ops"] == 0
    with connect(d, "vhost.1") as dev:
        dev.read(0, 1)
    wait_no_session(d, "vhost.1")
    d.rpc("vhost_delete_controller", ctrlr="vhost.1")
    # The controller is gone; what it did to the bdev is still counted.
    assert iostat(d, "Malloc1")["num_read_ops"] == 1
    d.rpc("bdev_malloc_delete", name="Malloc1")
    d.rpc("bdev_malloc_create", num_blocks=4096, block_size=512, name="Malloc1")
    assert iostat(d, "Malloc1")["num_read_ops"] == 0      # a new bdev starts from zero


def test_errors_name_the_bdev_and_the_fix(blk_daemon):
    with pytest.raises(RpcError) as e:
        blk_daemon.rpc("bdev_get_iostat", name="NoSuchBdev")
    assert "NoSuchBdev" in e.value.message
    with pytest.raises(RpcError) as e:
        blk_daemon.rpc("bdev_get_iostat", per_channel=True)
    assert "per_channel" in e.value.message


def test_spdk_rpc_py_reads_it(blk_daemon):
    d = blk_daemon
    with connect(d, "vhost.0") as dev:
        dev.read(0, 8)
    r = subprocess.run([sys.executable, "-m", "spdk.spdk_rpc", "-s", d.rpc_path, "bdev_get_iostat",
                        "--names", "Malloc0"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["bdevs"][0]["name"] == "Malloc0" and out["bdevs"][0]["num_read_ops"] >= 1


def test_vhost_rpc_cli(blk_daemon):
    d = blk_daemon
    with connect(d, "vhost.0") as dev:
        dev.write(0, b"c" * 512)
    cli = [os.path.join(os.path.dirname(sys.executable), "vhost-rpc"), "-s", d.rpc_path]
    r = subprocess.run(cli + ["bdev_get_iostat", "-b", "Malloc0"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["bdevs"][0]["num_write_ops"] >= 1
    r = subprocess.run(cli + ["bdev_reset_iostat", "-b", "Malloc0"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert iostat(d, "Malloc0")["num_write_ops"] == 0
    r = subprocess.run(cli + ["vhost_get_queue_stats", "vhost.0"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    q0 = json.loads(r.stdout)[0]
    assert q0["requests"] >= 1 and q0["in_flight"] == 0 and q0["resubmitted"] == 0


def test_old_name_answers_the_old_shape(blk_daemon):
    """SPDK's get_bdevs_iostat answered a list: the tick rate first, then the bdevs."""
    d = blk_daemon
    with connect(d, "vhost.0") as dev:
        dev.read(0, 1)
    out = d.rpc("get_bdevs_iostat", name="Malloc0")
    assert len(out) == 2 and out[0]["tick_rate"] > 0
    assert out[1]["name"] == "Malloc0" and out[1]["num_read_ops"] >= 1
    assert "'get_bdevs_iostat' is deprecated" in d.log()
