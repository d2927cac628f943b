"""virtio-scsi over packed virtqueues: commands and hot-plug events on a packed ring,
event buffers the device holds (buffer ids in flight for as long as it likes), and the
hostile cases only a held buffer makes possible: a buffer id reused while in flight,
more ring descriptors outstanding than the ring has.  Split rings are the default of
every other test here; the conformance suite runs both layouts.
"""

from __future__ import annotations

import os
import time

from vhost_core.testing import PackedVirtqueue
from vhost_core.testing.constants import VIRTIO_F_RING_PACKED, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, bit
from vhost_dev_scsi.testing import (
    DEFAULT_FEATURES,
    EVT_RESET_RESCAN,
    GOOD,
    S_BAD_TARGET,
    S_OK,
    TEST_UNIT_READY,
    connect_scsi,
    inquiry,
    rw10,
    wait_no_session,
)

PACKED = DEFAULT_FEATURES | bit(VIRTIO_F_RING_PACKED)


def _wait_log(d, mark: int, text: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in d.log()[mark:]:
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{d.log()[mark:]}"
        time.sleep(0.05)


def test_commands_and_hotplug_events_over_packed_rings(vhost_daemon):
    d = vhost_daemon
    d.rpc("bdev_malloc_create", num_blocks=8192, block_size=512, name="M0")
    d.rpc("bdev_malloc_create", num_blocks=1024, block_size=4096, name="M1")
    d.rpc("vhost_create_scsi_controller", ctrlr="vhost.0")
    d.rpc("vhost_scsi_controller_add_target", ctrlr="vhost.0", scsi_target_num=0, bdev_name="M0")
    with connect_scsi(d.socket("vhost.0"), num_queues=2, queue_size=16, features=PACKED, post_events=4) as dev:
        assert all(isinstance(q, PackedVirtqueue) for q in dev.queues)
        # Enough commands to wrap the 16-entry rings several times, on both request queues.
        for i in range(40):
            data = os.urandom(4096)
            q = 2 + i % 2
            assert dev.command(0, rw10(True, 8 * i, 8), data_out=data, queue=q, split=1024).status == GOOD
            assert dev.command(0, rw10(False, 8 * i, 8), data_in_len=4096, queue=q).data == data
        d.rpc("vhost_scsi_controller_add_target", ctrlr="vhost.0", scsi_target_num=3, bdev_name="M1")
        event, lun, reason, _ = dev.wait_event()
        assert (lun[1], reason) == (3, EVT_RESET_RESCAN), (event, lun, reason)
        r = dev.command(3, inquiry(36), data_in_len=36)
        assert (r.response, r.status, r.data[8:16]) == (S_OK, GOOD, b"INTEL   ")
        # GET_VRING_BASE of the event queue hands the held buffers back first: the
        # used position catches up with the avail one, wrap counters included.
        base = dev.frontend.get_vring_base(1)
        assert base >> 16 == base & 0xFFFF, hex(base)
    assert "Traceback" not in d.log()


def test_a_buffer_id_reused_while_in_flight_stops_the_queue(vhost_daemon):
    d = vhost_daemon
    d.rpc("bdev_malloc_create", num_blocks=8192, block_size=512, name="M0")
    d.rpc("vhost_create_scsi_controller", ctrlr="vhost.0")
    d.rpc("vhost_scsi_controller_add_target", ctrlr="vhost.0", scsi_target_num=0, bdev_name="M0")
    with connect_scsi(d.socket("vhost.0"), features=PACKED) as dev:
        vq = dev.queues[1]
        mark = len(d.log())
        g1, g2 = dev.memory.alloc(16), dev.memory.alloc(16)
        vq.add_raw([(g1, 16, VRING_DESC_F_WRITE, 7)], register_id=7)
        vq.kick(force=True)
        time.sleep(0.2)     # the device holds it (no event yet)
        assert "vring 1" not in d.log()[mark:]
        vq.add_raw([(g2, 16, VRING_DESC_F_WRITE, 7)])
        vq.kick(force=True)
        _wait_log(d, mark, "buffer id already in flight")
        # The request queue of the same connection keeps serving.
        assert dev.command(0, TEST_UNIT_READY).status == GOOD
    wait_no_session(d, "vhost.0")
    with connect_scsi(d.socket("vhost.0"), features=PACKED) as dev:
        assert dev.command(0, TEST_UNIT_READY).status == GOOD
    assert "Traceback" not in d.log()


def test_more_descriptors_outstanding_than_the_ring_stops_the_queue(vhost_daemon):
    d = vhost_daemon
    d.rpc("vhost_create_scsi_controller", ctrlr="vhost.0")
    with connect_scsi(d.socket("vhost.0"), features=PACKED, queue_size=8) as dev:
        vq = dev.queues[1]
        mark = len(d.log())
        g = dev.memory.alloc(64)
        chain = [(g + 4 * i, 4, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 0) for i in range(4)] + \
                [(g + 16, 4, VRING_DESC_F_WRITE, 0)]
        vq.add_raw(chain)                           # 5 of the 8 ring descriptors, held
        vq.kick(force=True)
        time.sleep(0.2)
        assert "vring 1" not in d.log()[mark:]
        vq.add_raw([c[:3] + (1,) for c in chain])   # 5 more: 10 outstanding in a ring of 8
        vq.kick(force=True)
        _wait_log(d, mark, "more descriptors outstanding than the queue size")
        # The request queue of the same connection keeps answering (no target 0 here).
        assert dev.command(0, TEST_UNIT_READY).response == S_BAD_TARGET
    assert "Traceback" not in d.log()
