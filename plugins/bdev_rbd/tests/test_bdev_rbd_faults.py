"""An OSD that stops answering for longer than rados_osd_op_timeout: the front-end gets an
I/O error for the requests that waited, the daemon and other controllers go on, and once
the OSD is back new I/O on the same bdev succeeds (nothing re-created)."""

from __future__ import annotations

import time

from vhost_core.testing import connect_blk
from vhost_core.testing.constants import VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT


def test_requests_fail_after_the_osd_timeout_others_go_on_and_io_resumes_when_the_osd_is_back(
        vhost_daemon, ceph, rbd_image):
    d = vhost_daemon
    # librbd's cache off: with it on (its writearound default), once anything has flushed
    # the image a write is acknowledged at once and reaches the OSD later, and this test
    # is about what waits for the OSD.
    d.rpc("bdev_rbd_create", name="Ceph0", pool_name="rbd", rbd_name=str(rbd_image), block_size=512,
          config={**ceph.client_conf(), "rados_osd_op_timeout": "4", "rbd_cache": "false"})
    d.rpc("vhost_create_blk_controller", ctrlr="vhost.0", dev_name="Ceph0")
    d.rpc("bdev_malloc_create", name="Malloc0", num_blocks=8192, block_size=512)
    d.rpc("vhost_create_blk_controller", ctrlr="vhost.1", dev_name="Malloc0")
    with connect_blk(d.socket("vhost.0"), timeout=60) as dev, connect_blk(d.socket("vhost.1")) as other:
        dev.write(0, b"\x01" * 4096)
        ceph.stop_osd()
        try:
            t0 = time.monotonic()
            # submit_many: in flight together; the malloc controller serves meanwhile.
            r = dev.submit(VIRTIO_BLK_T_OUT, 64, b"\x02" * 4096)
            took = time.monotonic() - t0
            assert r.status == VIRTIO_BLK_S_IOERR, (r, took)
            assert 3 < took < 30, took
            other.write(0, b"\x03" * 4096)
            assert other.read(0, 8) == b"\x03" * 4096
            r = dev.submit(VIRTIO_BLK_T_IN, 0, b"", 4096)
            assert r.status == VIRTIO_BLK_S_IOERR
        finally:
            ceph.cont_osd()
            ceph.wait_healthy()
        deadline = time.monotonic() + 60
        while True:
            r = dev.submit(VIRTIO_BLK_T_OUT, 128, b"\x04" * 4096)
            if r.status == VIRTIO_BLK_S_OK:
                break
            assert time.monotonic() < deadline, ("I/O never resumed after the OSD came back",
                                                 d.rpc("bdev_rbd_get_stats")[0]["last_error"], d.log()[-1500:])
            time.sleep(1)
        assert dev.read(128, 8) == b"\x04" * 4096
        assert dev.read(0, 8) == b"\x01" * 4096
    s = d.rpc("bdev_rbd_get_stats", name="Ceph0")[0]
    assert s["io_errors"] >= 2 and s["last_error"]["errno"] == 110, s
    d.wait_log("I/O error(s) on rbd/", timeout=5)
    assert "Connection timed out" in d.log()
    assert d.proc.poll() is None
