"""Memory hot-plug (VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS) at the request level: the
fake front-end plays QEMU adding and removing a DIMM (ADD_MEM_REG / REM_MEM_REG) while
its rings run.  The real thing (QEMU's pc-dimm device_add / device_del under a guest's
I/O) is in test_e2e_memory_hotplug.py.
"""

from __future__ import annotations

import os

import pytest

from blk_helpers import BLK_HDR, connect
from vhost_core.testing import FRONTEND_PROTOCOL_FEATURES, ConnectionClosed, GuestMemory, VhostUserNack
from vhost_core.testing.constants import (
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VhostUserProtocolFeature as PF,
    bit,
)

GiB = 1 << 30
MiB = 1 << 20
DIMM_GPA = 8 * GiB


@pytest.fixture
def dev(blk_daemon):
    dev = connect(blk_daemon, "vhost.0", num_queues=2,
                  protocol_features=FRONTEND_PROTOCOL_FEATURES | bit(PF.CONFIGURE_MEM_SLOTS))
    try:
        yield dev
    finally:
        dev.close()


@pytest.fixture
def dimm():
    mem = GuestMemory([(DIMM_GPA, 8 * MiB)], name="vhost-test-dimm")
    try:
        yield mem
    finally:
        mem.close()


def dimm_mapped(d) -> bool:
    with open(f"/proc/{d.proc.pid}/maps") as f:
        return "vhost-test-dimm" in f.read()


def io(dev, type_: int, sector: int, buf: int, length: int, *, queue: int = 0) -> int:
    """One request whose data buffer is at guest-physical `buf`; returns its status."""
    mem = dev.memory
    hdr = mem.alloc_bytes(BLK_HDR.pack(type_, 0, sector), 16)
    st = mem.alloc_bytes(b"\xff", 1)
    try:
        dev.chain(queue, [(hdr, BLK_HDR.size, False), (buf, length, type_ == VIRTIO_BLK_T_IN), (st, 1, True)])
        return mem.read(st, 1)[0]
    finally:
        mem.free(hdr)
        mem.free(st)


def test_the_target_offers_memory_slots_enough_for_qemu(dev):
    assert dev.offered_protocol_features & bit(PF.CONFIGURE_MEM_SLOTS)
    # QEMU refuses to start a VM with more RAM slots (base RAM + DIMMs) than this.
    assert dev.frontend.get_max_mem_slots() >= 32


def test_a_region_added_while_rings_run_serves_at_once_and_goes_without_a_stop(blk_daemon, dev, dimm):
    data = os.urandom(64 * 1024)
    src = dev.memory.alloc_bytes(data, 4096)
    assert io(dev, VIRTIO_BLK_T_OUT, 128, src, len(data)) == VIRTIO_BLK_S_OK
    region = dimm.regions[0]
    dev.frontend.add_mem_reg(region)
    assert "Controller vhost.0: memory region gpa=0x200000000 size 8 MiB added" in blk_daemon.log()
    assert dimm_mapped(blk_daemon)
    # The rings kept running (no stop, no re-kick): both queues read into the DIMM.
    for q in (0, 1):
        dst = dimm.alloc(len(data), 4096)
        assert io(dev, VIRTIO_BLK_T_IN, 128, dst, len(data), queue=q) == VIRTIO_BLK_S_OK
        assert dimm.read(dst, len(data)) == data
        dimm.free(dst)
    # The same region again (QEMU re-sends them after a reconnect) changes nothing.
    dev.frontend.add_mem_reg(region)

    dev.frontend.rem_mem_reg(region)
    assert "Controller vhost.0: memory region gpa=0x200000000 size 8 MiB removed" in blk_daemon.log()
    # Nothing was in flight: the DIMM is unmapped at once (QEMU frees it next).
    assert not dimm_mapped(blk_daemon)
    # A buffer in the removed DIMM is no longer guest memory: that request fails, the
    # ring and the daemon go on.
    assert io(dev, VIRTIO_BLK_T_IN, 128, DIMM_GPA + 4096, 4096) == VIRTIO_BLK_S_IOERR
    dst = dev.memory.alloc(len(data), 4096)
    assert io(dev, VIRTIO_BLK_T_IN, 128, dst, len(data), queue=1) == VIRTIO_BLK_S_OK
    assert dev.memory.read(dst, len(data)) == data
    assert "stopping it" not in blk_daemon.log()


def test_rings_in_a_removed_region_are_stopped_the_others_go_on(blk_daemon, dev):
    """Removing the memory a ring lives in stops that ring (cleanly: its requests
    drain), never leaves it reading unmapped memory."""
    ring_region = dev.memory.region_of(dev.queues[1].used_gpa)
    dev.frontend.rem_mem_reg(ring_region)
    for q in (0, 1):
        assert (f"Controller vhost.0: vring {q} lies in memory region gpa={ring_region.gpa:#x} being removed; "
                f"stopping it") in blk_daemon.log()
    assert dev.frontend.ping()
    with connect(blk_daemon, "vhost.1") as other:
        data = os.urandom(4096)
        other.write(8, data)
        assert other.read(8, 8) == data


def test_bad_memory_slot_messages_cost_only_that_connection(blk_daemon, dev, dimm):
    # Removing what was never added is refused (a NACK), the session goes on.
    with pytest.raises(VhostUserNack):
        dev.frontend.rem_mem_reg(dimm.regions[0])
    assert dev.frontend.ping()
    # A region overlapping guest memory already mapped drops the connection.
    first = dev.memory.regions[0]
    overlapping = GuestMemory([(first.gpa, 4 * MiB)], name="vhost-test-overlap")
    try:
        with pytest.raises(ConnectionClosed):
            dev.frontend.add_mem_reg(overlapping.regions[0])
            dev.frontend.ping()
    finally:
        overlapping.close()
    assert "it overlaps a region already mapped" in blk_daemon.log()
    with connect(blk_daemon, "vhost.0") as other:
        data = os.urandom(4096)
        other.write(8, data)
        assert other.read(8, 8) == data


def test_a_region_without_its_file_descriptor_drops_the_connection(blk_daemon, dev, dimm):
    with pytest.raises(ConnectionClosed):
        dev.frontend.add_mem_reg(dimm.regions[0], with_fd=False)
        dev.frontend.ping()
    assert "ADD_MEM_REG carries 0 file descriptors, expected 1" in blk_daemon.log()
