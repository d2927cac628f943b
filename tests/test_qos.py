"""bdev_set_qos_limit through the fake front-ends: SPDK's parameters and rounding, what
bdev_get_bdevs and save_config show, and what the data path does with I/O over a limit:
held back in order, never failed, shared by every controller (blk and scsi) using the bdev,
failed only when the bdev goes away."""

from __future__ import annotations

import struct
import time

import pytest

from vhost_core.rpc.client import RpcError
from vhost_core.testing import connect_blk
from vhost_core.testing.blk import BlkIOError, BlkRequest
from vhost_core.testing.constants import VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from vhost_dev_scsi.testing import GOOD, TEST_UNIT_READY, connect_scsi, rw10

NONE = {"rw_ios_per_sec": 0, "rw_mbytes_per_sec": 0, "r_mbytes_per_sec": 0, "w_mbytes_per_sec": 0}


def _limits(d, name: str) -> dict:
    return d.rpc("bdev_get_bdevs", name=name)[0]["assigned_rate_limits"]


@pytest.fixture
def malloc(vhost_daemon):
    d = vhost_daemon
    d.rpc("bdev_malloc_create", num_blocks=16384, block_size=512, name="Malloc0")
    return d


def test_limits_are_set_shown_rounded_cleared_and_saved(malloc):
    d = malloc
    assert _limits(d, "Malloc0") == NONE
    assert d.rpc("bdev_set_qos_limit", name="Malloc0", rw_ios_per_sec=1500, w_mbytes_per_sec=10) is True
    assert _limits(d, "Malloc0") == {**NONE, "rw_ios_per_sec": 2000, "w_mbytes_per_sec": 10}
    assert ("bdev Malloc0: requested rw_ios_per_sec 1500 is not a multiple of 1000: rounded up to 2000"
            in d.log())
    # Absent limits stay, 0 clears one.
    d.rpc("bdev_set_qos_limit", name="Malloc0", r_mbytes_per_sec=5)
    d.rpc("bdev_set_qos_limit", name="Malloc0", w_mbytes_per_sec=0)
    assert _limits(d, "Malloc0") == {**NONE, "rw_ios_per_sec": 2000, "r_mbytes_per_sec": 5}
    config = d.rpc("framework_get_config", name="bdev")
    create = next(i for i, e in enumerate(config) if e["params"].get("name") == "Malloc0")
    assert config[create + 1] == {"method": "bdev_set_qos_limit",
                                  "params": {"name": "Malloc0", "rw_ios_per_sec": 2000, "r_mbytes_per_sec": 5}}
    d.rpc("bdev_set_qos_limit", name="Malloc0", rw_ios_per_sec=0, r_mbytes_per_sec=0)
    assert _limits(d, "Malloc0") == NONE
    assert all(e["method"] != "bdev_set_qos_limit" for e in d.rpc("framework_get_config", name="bdev"))
    assert "bdev Malloc0: QoS rate limits cleared" in d.log()


@pytest.mark.parametrize("params,message", [
    ({"name": "Malloc0"}, "no rate limits specified"),
    ({"name": "Malloc0", "rw_ios_per_sec": -1}, "rw_ios_per_sec -1 is negative"),
    ({"name": "Nope", "rw_ios_per_sec": 1000}, "bdev 'Nope' does not exist"),
])
def test_refusals_name_the_fix(malloc, params, message):
    with pytest.raises(RpcError) as err:
        malloc.rpc("bdev_set_qos_limit", **params)
    assert message in err.value.message
    assert _limits(malloc, "Malloc0") == NONE


def _blk_rw(dev, requests):
    """(type, sector, data) requests, as many in flight as the ring takes: results in order."""
    return dev.submit_many([BlkRequest(t, s, data, 0 if data else 512, 0, True, None) for t, s, data in requests],
                           timeout=60)


def test_io_over_the_limit_waits_in_order_and_is_never_failed(malloc):
    """Writes of the same block queued behind the limit land in the order the guest sent
    them; reads after them see the last one."""
    d = malloc
    d.rpc("vhost_create_blk_controller", ctrlr="vhost.0", dev_name="Malloc0")
    d.rpc("bdev_set_qos_limit", name="Malloc0", rw_ios_per_sec=1000)
    with connect_blk(d.socket("vhost.0"), queue_size=256, indirect=True) as dev:
        reqs = [(VIRTIO_BLK_T_OUT, 8, struct.pack("<I", i) * 128) for i in range(200)]
        reqs += [(VIRTIO_BLK_T_IN, 8, b"")] * 50
        results = _blk_rw(dev, reqs)
    assert all(r.status == VIRTIO_BLK_S_OK for r in results)
    assert all(r.data == struct.pack("<I", 199) * 128 for r in results[200:])
    stats = d.rpc("bdev_get_iostat", name="Malloc0")["bdevs"][0]
    assert (stats["num_write_ops"], stats["num_read_ops"]) == (200, 50)


def test_blk_and_scsi_sharing_a_capped_bdev_share_its_limit(malloc):
    """Every device type, one bucket: 2 MiB read through vhost-blk and 2 MiB through
    vhost-scsi at r_mbytes_per_sec=1 take 4 s (less the 100 ms burst), within 5%."""
    d = malloc
    d.rpc("vhost_create_blk_controller", ctrlr="vhost.b", dev_name="Malloc0")
    d.rpc("vhost_create_scsi_controller", ctrlr="vhost.s")
    d.rpc("vhost_scsi_controller_add_target", ctrlr="vhost.s", scsi_target_num=0, bdev_name="Malloc0")
    with connect_blk(d.socket("vhost.b"), queue_size=128) as blk, connect_scsi(d.socket("vhost.s")) as scsi:
        scsi.command(0, TEST_UNIT_READY)
        d.rpc("bdev_set_qos_limit", name="Malloc0", r_mbytes_per_sec=1)
        time.sleep(0.2)                            # the bucket's burst fills: it is counted below
        start = time.monotonic()
        for i in range(32):                         # 64 KiB each way, alternating
            assert len(blk.read(i * 128, 128)) == 65536
            r = scsi.command(0, rw10(False, i * 128, 128), data_in_len=65536)
            assert r.status == GOOD, r
        elapsed = time.monotonic() - start
    expected = 4.0 - 0.1
    assert abs(elapsed - expected) <= 0.05 * expected, elapsed


def test_deleting_a_bdev_fails_what_its_limit_holds_back(malloc):
    d = malloc
    d.rpc("vhost_create_blk_controller", ctrlr="vhost.0", dev_name="Malloc0")
    d.rpc("bdev_set_qos_limit", name="Malloc0", r_mbytes_per_sec=1)
    with connect_blk(d.socket("vhost.0"), queue_size=128, indirect=True, memory_mb=32) as dev:
        vq, mem = dev.queues[0], dev.memory
        # 64 reads of 64 KiB at 1 MiB/s: 4 s of work, nearly all of it waiting in the target
        # when the bdev is deleted.
        reads = [dev._start(i, BlkRequest(VIRTIO_BLK_T_IN, 0, b"", 65536, 0, True, None))[1:]
                 for i in range(64)]
        for bufs, _ in reads:
            vq.add_chain(bufs, indirect=True)
        vq.kick(force=True)
        d.rpc("bdev_malloc_delete", name="Malloc0")
        done = []
        while len(done) < 64:
            done += vq.wait_used(timeout=10, min_count=1)
        statuses = [mem.read(inf.status_gpa, 1)[0] for _, inf in reads]
        assert statuses.count(VIRTIO_BLK_S_IOERR) > 32 and set(statuses) <= {VIRTIO_BLK_S_OK,
                                                                              VIRTIO_BLK_S_IOERR}, statuses
        with pytest.raises(BlkIOError):
            dev.read(0, 1)
    assert "Controller vhost.0: bdev 'Malloc0' was removed" in d.log()
    assert "Traceback" not in d.log()
