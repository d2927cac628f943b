"""Interrupt coalescing (SPDK's vhost_controller_set_coalescing): a queue doing more than
iops_threshold requests per second gets its guest interrupts (call-eventfd signals) spaced
by up to delay_base_us, so that one interrupt reports many completions.

The front-end counts the signals itself: an eventfd's counter is the number of writes
since it was last read."""

from __future__ import annotations

import os
import struct
import time

import pytest

from vhost_core.rpc.client import RpcError
from vhost_core.testing import connect_blk
from vhost_core.testing.constants import VIRTIO_BLK_T_IN, VIRTIO_F_RING_PACKED, VIRTIO_RING_F_EVENT_IDX
from vhost_core.testing.daemon import wait_no_session

BLK_HDR = struct.Struct("<IIQ")
#: Without EVENT_IDX every completion the device publishes asks for an interrupt (no
#: used_event the driver parks): what is counted is the device's own batching.  On
#: split rings, or (with VIRTIO_F_RING_PACKED) packed ones.
NO_EVENT_IDX = ((1 << 64) - 1) & ~(1 << VIRTIO_RING_F_EVENT_IDX) & ~(1 << VIRTIO_F_RING_PACKED)
DELAY_US = 5000


def _signals(vq) -> int:
    try:
        return os.eventfd_read(vq.call_fd)
    except BlockingIOError:
        return 0


def _paced_reads(dev, n: int, depth: int = 32) -> float:
    """``n`` one-sector reads made available and kicked one at a time, as a guest issuing
    I/O does, at most ``depth`` outstanding; completions are reaped from the used ring
    (never waiting on the call eventfd, whose counter the caller reads).  Returns seconds."""
    vq, mem = dev.queues[0], dev.memory
    hdr = mem.alloc_bytes(BLK_HDR.pack(VIRTIO_BLK_T_IN, 0, 0), 16)
    data = mem.alloc(512, 512)
    status = mem.alloc(depth, 1)
    sent = done = 0
    start = time.monotonic()
    deadline = start + 60
    while done < n:
        while sent < n and sent - done < depth:
            vq.add_chain([(hdr, 16, False), (data, 512, True), (status + sent % depth, 1, True)], indirect=True)
            vq.kick()
            sent += 1
        done += len(vq.get_used())
        assert time.monotonic() < deadline, f"{done} of {n} reads completed"
    elapsed = time.monotonic() - start
    for g in (hdr, data, status):
        mem.free(g)
    return elapsed


@pytest.fixture
def blk(vhost_daemon):
    d = vhost_daemon
    d.rpc("bdev_malloc_create", num_blocks=2048, block_size=512, name="Malloc0")
    d.rpc("vhost_create_blk_controller", ctrlr="vhost.0", dev_name="Malloc0")
    return d


@pytest.mark.parametrize("ring", ["split", "packed"])
def test_coalescing_batches_interrupts_of_a_busy_queue(blk, ring):
    d = blk
    features = NO_EVENT_IDX | ((1 << VIRTIO_F_RING_PACKED) if ring == "packed" else 0)
    with connect_blk(d.socket("vhost.0"), features=features, queue_size=256, indirect=True) as dev:
        vq = dev.queues[0]
        _paced_reads(dev, 200)
        _signals(vq)
        _paced_reads(dev, 2000)
        plain = _signals(vq)

        d.rpc("vhost_controller_set_coalescing", ctrlr="vhost.0", delay_base_us=DELAY_US, iops_threshold=100)
        _paced_reads(dev, 200)            # the rate is measured over 10 ms periods: let it see the load
        # The daemon's count first, then the eventfd's: a held-back signal that fires in
        # between is then in the daemon's difference only, never in the eventfd's alone.
        stats0 = d.rpc("vhost_get_queue_stats", ctrlr="vhost.0")[0]["interrupts"]
        _signals(vq)
        elapsed = _paced_reads(dev, 2000)
        coalesced = _signals(vq)
        stats1 = d.rpc("vhost_get_queue_stats", ctrlr="vhost.0")[0]["interrupts"]
        # Under load, far fewer interrupts than each completion's own.  (Not "one per
        # delay_base": the delay follows each 10 ms period's rate, and a busy host that
        # stalls this process shortens it, as it should.)
        assert coalesced * 4 < plain, (coalesced, elapsed, plain)
        assert stats1 - stats0 >= coalesced

        # A driver that waits for its interrupt still gets every completion (the held
        # back signal comes once the delay passed, also when the queue goes idle).
        dev.require_interrupts = True
        for i in range(20):
            assert dev.read(i, 1) == b"\0" * 512

        d.rpc("vhost_controller_set_coalescing", ctrlr="vhost.0", delay_base_us=0, iops_threshold=60000)
        _paced_reads(dev, 200)
        _signals(vq)
        _paced_reads(dev, 2000)
        again = _signals(vq)
        assert again > 4 * coalesced, (again, coalesced)
    assert "Controller vhost.0: interrupt coalescing delay_base_us=5000 iops_threshold=100" in d.log()
    assert "Controller vhost.0: interrupt coalescing off" in d.log()


def test_coalescing_is_shown_saved_and_checked(blk, tmp_path):
    d = blk
    (c,) = d.rpc("vhost_get_controllers", name="vhost.0")
    assert (c["delay_base_us"], c["iops_threshold"]) == (0, 60000)
    assert d.rpc("vhost_controller_set_coalescing", ctrlr="vhost.0", delay_base_us=50,
                 iops_threshold=60000) is True
    (c,) = d.rpc("vhost_get_controllers", name="vhost.0")
    assert (c["delay_base_us"], c["iops_threshold"]) == (50, 60000)
    config = d.rpc("framework_get_config", name="vhost_blk")
    assert config[-1] == {"method": "vhost_controller_set_coalescing",
                          "params": {"ctrlr": "vhost.0", "delay_base_us": 50, "iops_threshold": 60000}}

    with pytest.raises(RpcError) as err:
        d.rpc("vhost_controller_set_coalescing", ctrlr="vhost.0", delay_base_us=50, iops_threshold=99)
    assert "iops_threshold 99" in err.value.message and "at least 100" in err.value.message
    with pytest.raises(RpcError) as err:
        d.rpc("vhost_controller_set_coalescing", ctrlr="nope", delay_base_us=50, iops_threshold=100)
    assert "controller 'nope' does not exist" in err.value.message
    assert d.rpc("vhost_get_controllers", name="vhost.0")[0]["delay_base_us"] == 50

    # Turned off, save_config writes nothing for it (as SPDK).
    d.rpc("vhost_controller_set_coalescing", ctrlr="vhost.0", delay_base_us=0, iops_threshold=60000)
    assert all(e["method"] != "vhost_controller_set_coalescing"
               for e in d.rpc("framework_get_config", name="vhost_blk"))
    wait_no_session(d, "vhost.0")
