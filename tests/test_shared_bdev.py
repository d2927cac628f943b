"""One bdev backing several controllers at once, as SPDK allows (vhost opens bdevs, it does
not claim them): a vhost-blk beside a vhost-scsi target, two vhost-blk (one read-only), and
what reaches every opener: the data, hot-removal, a resize, the I/O statistics."""

from __future__ import annotations

import os

import pytest

from vhost_core.rpc.client import RpcError
from vhost_core.testing import connect_blk
from vhost_core.testing.blk import BlkIOError, VirtioBlkConfig
from vhost_core.testing.daemon import wait_no_session
from vhost_dev_scsi.testing import (
    CHECK_CONDITION,
    GOOD,
    TEST_UNIT_READY,
    UNIT_ATTENTION,
    connect_scsi,
    read_capacity16,
    rw10,
)

def _scsi_read(dev, lba: int, n: int) -> bytes:
    r = dev.command(0, rw10(False, lba, n), data_in_len=512 * n)
    assert r.status == GOOD, r
    return r.data


def _scsi_write(dev, lba: int, data: bytes) -> None:
    r = dev.command(0, rw10(True, lba, len(data) // 512), data_out=data)
    assert r.status == GOOD, r


def _iostat(d, name: str) -> dict:
    (b,) = d.rpc("bdev_get_iostat", name=name)["bdevs"]
    return b


def test_a_read_only_blk_shares_a_bdev_with_a_read_write_scsi_target(vhost_daemon):
    """SPDK's v24.05 example: vhost.0 writes through SCSI, vhost.2 reads the same blocks
    through a read-only vhost-blk; both count in the bdev's iostat."""
    d = vhost_daemon
    d.rpc("bdev_malloc_create", num_blocks=16384, block_size=512, name="Malloc1")
    d.rpc("vhost_create_scsi_controller", ctrlr="vhost.0")
    d.rpc("vhost_scsi_controller_add_target", ctrlr="vhost.0", scsi_target_num=0, bdev_name="Malloc1")
    d.rpc("vhost_create_blk_controller", ctrlr="vhost.2", dev_name="Malloc1", readonly=True)
    assert d.rpc("bdev_get_bdevs", name="Malloc1")[0]["claimed"] is False
    (blk,) = d.rpc("vhost_get_controllers", name="vhost.2")
    assert blk["backend_specific"]["block"] == {"readonly": True, "bdev": "Malloc1",
                                               "transport": "vhost_user_blk"}
    data = os.urandom(8 * 512)
    with connect_scsi(d.socket("vhost.0")) as scsi, connect_blk(d.socket("vhost.2")) as ro:
        scsi.command(0, TEST_UNIT_READY)              # TEST UNIT READY: takes the power-on unit attention
        _scsi_write(scsi, 100, data)
        assert ro.read(100, 8) == data
        with pytest.raises(BlkIOError):
            ro.write(100, b"\0" * 512)            # read-only stays read-only
        assert _scsi_read(scsi, 100, 8) == data
    s = _iostat(d, "Malloc1")
    assert (s["num_write_ops"], s["num_read_ops"]) == (1, 2), s
    assert s["bytes_read"] == 2 * len(data)


def test_two_blk_controllers_share_a_bdev_and_its_removal_reaches_both(vhost_daemon):
    d = vhost_daemon
    d.rpc("bdev_malloc_create", num_blocks=4096, block_size=512, name="Base")
    d.rpc("vhost_create_blk_controller", ctrlr="vm.a", dev_name="Base")
    d.rpc("vhost_create_blk_controller", ctrlr="vm.b", dev_name="Base")
    with connect_blk(d.socket("vm.a")) as a, connect_blk(d.socket("vm.b")) as b:
        a.write(8, b"\x5a" * 4096)
        assert b.read(8, 8) == b"\x5a" * 4096
        b.write(16, b"\xa5" * 512)
        assert a.read(16, 1) == b"\xa5" * 512
        d.rpc("bdev_malloc_delete", name="Base")
        for dev in (a, b):
            with pytest.raises(BlkIOError):
                dev.read(0, 1)
    for ctrlr in ("vm.a", "vm.b"):
        assert f"Controller {ctrlr}: bdev 'Base' was removed" in d.log()
        assert d.rpc("vhost_get_controllers", name=ctrlr)[0]["backend_specific"]["block"]["bdev"] is None
        wait_no_session(d, ctrlr)
        d.rpc("vhost_delete_controller", ctrlr=ctrlr)
    assert d.rpc("bdev_get_bdevs") == []
    assert "Traceback" not in d.log()


def test_deleting_one_sharer_leaves_the_other_serving(vhost_daemon):
    d = vhost_daemon
    d.rpc("bdev_malloc_create", num_blocks=4096, block_size=512, name="Base")
    d.rpc("vhost_create_blk_controller", ctrlr="vm.a", dev_name="Base")
    d.rpc("vhost_create_scsi_controller", ctrlr="vm.s")
    d.rpc("vhost_scsi_controller_add_target", ctrlr="vm.s", scsi_target_num=0, bdev_name="Base")
    with connect_blk(d.socket("vm.a")) as a:
        a.write(0, b"\x11" * 512)
    d.rpc("vhost_scsi_controller_remove_target", ctrlr="vm.s", scsi_target_num=0)
    d.rpc("vhost_delete_controller", ctrlr="vm.s")
    wait_no_session(d, "vm.a")
    with connect_blk(d.socket("vm.a")) as a:
        assert a.read(0, 1) == b"\x11" * 512
        a.write(1, b"\x22" * 512)
    # The closed sharer's I/O is still counted with the bdev.
    assert _iostat(d, "Base")["num_write_ops"] == 2
    # A name taken is still refused, a bdev taken is not.
    with pytest.raises(RpcError) as err:
        d.rpc("vhost_create_blk_controller", ctrlr="vm.a", dev_name="Base")
    assert "already exists" in err.value.message


def test_a_resize_reaches_every_controller_sharing_the_bdev(vhost_daemon, tmp_path):
    d = vhost_daemon
    img = tmp_path / "disk.img"
    img.write_bytes(b"\0" * (4 << 20))
    d.rpc("bdev_aio_create", filename=str(img), name="Aio0", block_size=512)
    d.rpc("vhost_create_blk_controller", ctrlr="vm.a", dev_name="Aio0")
    d.rpc("vhost_create_scsi_controller", ctrlr="vm.s")
    d.rpc("vhost_scsi_controller_add_target", ctrlr="vm.s", scsi_target_num=0, bdev_name="Aio0")
    with connect_scsi(d.socket("vm.s")) as scsi, connect_blk(d.socket("vm.a")) as blk:
        scsi.command(0, TEST_UNIT_READY)
        assert blk.capacity == (4 << 20) // 512
        os.truncate(img, 8 << 20)
        d.rpc("bdev_aio_rescan", name="Aio0")
        r = scsi.command(0, TEST_UNIT_READY)          # the SCSI target got a capacity-changed unit attention
        assert (r.status, r.sense.key, r.sense.asc, r.sense.ascq) == (CHECK_CONDITION, UNIT_ATTENTION, 0x2A, 0x09)
        r = scsi.command(0, read_capacity16(), data_in_len=32)
        assert int.from_bytes(r.data[:8], "big") + 1 == (8 << 20) // 512
        # The running blk front-end reads the new size and may use it at once.
        assert VirtioBlkConfig.parse(blk.frontend.get_config()).capacity == (8 << 20) // 512
        blk.write((8 << 20) // 512 - 1, b"\x33" * 512)
    assert "Controller vm.s: target 0 capacity changed to 16384 blocks (bdev 'Aio0')" in d.log()
