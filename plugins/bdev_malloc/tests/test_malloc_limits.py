"""What one request may cost the reactor on a malloc bdev: a READ or WRITE above
VN_MAX_TRANSFER fails without a byte copied; a large UNMAP or WRITE ZEROES is
zeroed in VN_MAX_TRANSFER chunks, one per reactor iteration, and still zeroes
exactly its range."""

from __future__ import annotations

import os

import pytest

from vhost_core.testing.constants import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN
from vhost_core.testing.blk import BlkIOError, connect_blk

MAX_TRANSFER = 4 << 20          # VN_MAX_TRANSFER
SECTOR = 512


def _blk(d, name: str, mib: int) -> None:
    d.rpc("bdev_malloc_create", name=name, num_blocks=mib << 11, block_size=512)
    d.rpc("vhost_create_blk_controller", ctrlr=f"vhost.{name}", dev_name=name)


def test_read_or_write_over_the_maximum_transfer_fails_and_copies_nothing(vhost_daemon):
    d = vhost_daemon
    _blk(d, "M0", 16)
    with connect_blk(d.socket("vhost.M0"), memory_mb=32, queue_size=256, indirect=True) as dev:
        before = os.urandom(MAX_TRANSFER)
        dev.write(0, before)                                    # exactly the maximum: fine
        assert dev.read(0, MAX_TRANSFER // SECTOR) == before
        with pytest.raises(BlkIOError):
            dev.write(0, b"\x5a" * (MAX_TRANSFER + SECTOR))
        r = dev.submit(VIRTIO_BLK_T_IN, 0, b"", MAX_TRANSFER + SECTOR)
        assert r.status != VIRTIO_BLK_S_OK
        assert dev.read(0, MAX_TRANSFER // SECTOR) == before, "the refused write copied data"


@pytest.mark.parametrize("op", ["write_zeroes", "discard"])
def test_zeroing_far_more_than_a_transfer_zeroes_exactly_the_range(vhost_daemon, op):
    d = vhost_daemon
    mib = 64
    _blk(d, "Z0", mib)
    sectors = mib << 11
    chunk = MAX_TRANSFER // SECTOR
    # Sectors either side of the range, and either side of chunk boundaries in it.
    probes = [0, 1, chunk, chunk + 1, 3 * chunk, 3 * chunk + 1, sectors - 2, sectors - 1]
    with connect_blk(d.socket("vhost.Z0"), num_queues=2) as dev:
        marks = {s: os.urandom(SECTOR) for s in probes}
        for s, data in marks.items():
            dev.write(s, data)
        getattr(dev, op)(1, sectors - 2)
        for s in probes:
            inside = 1 <= s < sectors - 1
            assert dev.read(s, 1, queue=1) == (bytes(SECTOR) if inside else marks[s]), s
