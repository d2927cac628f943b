"""The reactor calls into librbd itself (rbd_non_blocking_aio off) only where librbd cannot
make it wait: librados' in-flight throttle is off by the plugin's defaults, and where one is
configured (here, with librbd's cache off) what the reactors have in librbd at once is bounded
by a per-cluster budget of half of it.  A guest that floods an RBD disk while its OSD is
stalled gets its requests held, in order, never a reactor asleep in librbd, and other
controllers on that reactor go on.  Discards and write-zeroes larger than a quarter of the
budget go as a sequence of chunks.  With librbd's writeback cache, or its writearound cache
over a throttle, requests go through librbd's dispatch thread."""

from __future__ import annotations

import threading
import time

from vhost_core.testing import connect_blk
from vhost_core.testing.constants import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_OUT

# The Objecter lets 4 object requests / 1 MiB be in flight: the budget is 2 requests / 512 KiB.
TINY_THROTTLE = {"objecter_inflight_ops": "4", "objecter_inflight_op_bytes": str(1 << 20)}


def _create(d, ceph, image, **extra):
    d.rpc("bdev_rbd_create", name="Ceph0", pool_name="rbd", rbd_name=str(image), block_size=512,
          config={**ceph.client_conf(), "rbd_cache": "false", **TINY_THROTTLE, **extra})
    d.rpc("vhost_create_blk_controller", ctrlr="vhost.0", dev_name="Ceph0")


def test_a_flood_on_a_stalled_osd_waits_in_order_while_the_reactor_serves_others(vhost_daemon, ceph, rbd_image):
    d = vhost_daemon
    _create(d, ceph, rbd_image)
    d.wait_log("requests go to librbd from the reactors, at most 2 object requests / 0.5 MiB in flight")
    d.rpc("bdev_malloc_create", name="Malloc0", num_blocks=8192, block_size=512)
    d.rpc("vhost_create_blk_controller", ctrlr="vhost.1", dev_name="Malloc0")
    with connect_blk(d.socket("vhost.0"), timeout=60) as dev, connect_blk(d.socket("vhost.1")) as other:
        dev.write(0, b"\x01" * 4096)
        ceph.stop_osd()
        results: list = []
        try:
            # 32 writes in flight at once, 16 times the budget: all but two wait in the target.
            flood = threading.Thread(target=lambda: results.extend(dev.submit_many(
                [(VIRTIO_BLK_T_OUT, 8 + 8 * i, bytes([i + 2]) * 4096) for i in range(32)], timeout=60)))
            flood.start()
            time.sleep(1.0)
            assert flood.is_alive() and not results, "the writes ended (or failed) with the OSD stopped"
            # Were the reactor asleep in the Objecter's throttle, this would wait for the OSD.
            t0 = time.monotonic()
            other.write(0, b"\x03" * 4096)
            assert other.read(0, 8) == b"\x03" * 4096
            took = time.monotonic() - t0
            assert took < 0.5, f"a controller on the same reactor waited {took:.2f} s for a stalled OSD"
        finally:
            ceph.cont_osd()
        flood.join(60)
        assert not flood.is_alive()
        assert [r.status for r in results] == [VIRTIO_BLK_S_OK] * 32, results
        for i in range(32):
            assert dev.read(8 + 8 * i, 8) == bytes([i + 2]) * 4096
        assert dev.read(0, 8) == b"\x01" * 4096
    assert d.proc.poll() is None


def test_large_discards_write_zeroes_and_a_write_over_the_budget_land_where_they_should(
        vhost_daemon, ceph, rbd_image):
    d = vhost_daemon
    _create(d, ceph, rbd_image)
    with connect_blk(d.socket("vhost.0"), timeout=60, queue_size=512) as dev:
        mib = 2048                                  # sectors
        # 4 MiB in one request: eight times the 512 KiB share, so it waits until it is alone.
        pattern = bytes(range(256)) * (4 * 4096)
        dev.write(0, pattern)
        assert dev.read(0, 4 * mib) == pattern
        dev.write(20 * mib, b"\x07" * (4 << 20))
        # 12 MiB of discard: three chunks of 4 MiB (one object's worth: the share is 2
        # object requests); 3 MiB of write-zeroes: 24 chunks of 128 KiB.  The edges stay.
        dev.discard(2 * mib, 12 * mib)
        dev.write_zeroes(20 * mib + 512, 3 * mib)
        assert dev.read(0, 2 * mib) == pattern[:2 << 20]
        for part in range(3):
            assert dev.read((2 + 4 * part) * mib, 4 * mib) == bytes(4 << 20)
        assert dev.read(20 * mib, 512) == b"\x07" * (256 << 10)
        assert dev.read(20 * mib + 512, 3 * mib) == bytes(3 << 20)
        assert dev.read(23 * mib + 512, 1536) == b"\x07" * (768 << 10)
    s = d.rpc("bdev_rbd_get_stats", name="Ceph0")[0]
    assert s["io_errors"] == 0, s


def test_requests_go_to_librbd_from_the_reactor_only_where_librbd_cannot_wait_in_the_caller(vhost_daemon, ceph):
    d = vhost_daemon
    conf = ceph.client_conf()
    # The plugin's defaults, with Ceph's writearound cache: no throttle to wait in.
    d.rpc("bdev_rbd_register_cluster", name="c1", config_param=conf)
    d.wait_log("rbd cluster c1 registered: monitors")
    line = [ln for ln in d.log().splitlines() if "rbd cluster c1 registered" in ln][-1]
    assert "requests go to librbd from the reactors (librados' in-flight throttle off)" in line, line
    # A throttle with the cache on: the writes the cache acknowledged stay in the Objecter
    # outside the budget.  A writeback cache waits in the caller on its dirty limit.
    for name, extra in (("c2", {"objecter_inflight_ops": "1024"}),
                        ("c3", {"rbd_cache_policy": "writeback"})):
        d.rpc("bdev_rbd_register_cluster", name=name, config_param={**conf, **extra})
        d.wait_log(f"rbd cluster {name} registered: monitors")
        line = [ln for ln in d.log().splitlines() if f"rbd cluster {name} registered" in ln][-1]
        assert "through its dispatch thread" in line, line
