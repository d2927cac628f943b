"""Packed virtqueues against a hostile guest: the packed twins of the split-ring cases
of test_vhost_user_hostile.py and test_isolation.py.

* a bad *request* (a buffer outside guest memory) completes with IOERR in its own
  status byte and the queue keeps serving;
* a malformed *ring* (a chain longer than the ring or than 1040 descriptors, a buffer
  id out of range or already in flight, a bad indirect table, a readable descriptor
  after a writable one) stops that queue, the daemon logs why and signals the ring's
  error eventfd; the other queues and controllers keep serving;
* a packed ring's base (SET_VRING_BASE) outside the ring drops the connection;
* a ring of long invalid chains costs the neighbour on the same reactor no latency.
"""

from __future__ import annotations

import os
import struct
import time

import pytest

from blk_helpers import (
    WRITE,
    NEXT,
    Guarded,
    assert_healthy,
    bad_buffer_request,
    blk_header,
    connect,
    eventfd_signalled,
    expect_no_completion,
    status_byte,
    wait_no_session,
)
from isolation_helpers import Bystander
from vhost_core.testing import DEFAULT_BLK_FEATURES, GuestMemory, PackedVirtqueue, VhostUserFrontend
from vhost_core.testing.constants import (
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_INDIRECT_DESC,
    VRING_DESC_F_INDIRECT,
    bit,
)
from vhost_core.testing.virtqueue import VRING_PACKED_DESC_F_AVAIL, VRING_PACKED_DESC_F_USED

GiB = 1 << 30
MiB = 1 << 20
PACKED = DEFAULT_BLK_FEATURES | bit(VIRTIO_F_RING_PACKED)


@pytest.fixture
def d(shared_blk_daemon):
    return shared_blk_daemon


def pconnect(d, ctrlr: str = "vhost.0", **kw):
    dev = connect(d, ctrlr, features=kw.pop("features", PACKED), **kw)
    assert all(isinstance(q, PackedVirtqueue) for q in dev.queues)
    return dev


def queue_errors(d, ctrlr="vhost.0", queue=0) -> int:
    return d.rpc("vhost_get_queue_stats", ctrlr=ctrlr)[queue]["errors"]


# ---------------------------------------------------------------------------
# bad requests
# ---------------------------------------------------------------------------

BAD_BUFFERS = {
    "outside_every_region": (2 * GiB, 4096),
    "crosses_region_end_into_gap": (8 * MiB - 256, 512),
    "length_overflows_64_bits": ((1 << 64) - 512, 4096),
}


@pytest.mark.parametrize("direction", ["read", "write"])
@pytest.mark.parametrize("where", list(BAD_BUFFERS))
def test_data_buffer_outside_guest_memory(d, where, direction):
    addr, length = BAD_BUFFERS[where]
    with pconnect(d) as dev:
        before = queue_errors(d)
        bad_buffer_request(dev, VIRTIO_BLK_T_IN if direction == "read" else VIRTIO_BLK_T_OUT, addr, length)
        assert queue_errors(d) == before + 1
        dev.write(8, b"\x11" * 512)
        assert dev.read(8, 1) == b"\x11" * 512
    assert_healthy(d)


def test_header_and_status_outside_guest_memory(d):
    """A header outside memory: IOERR in the status byte; a status byte outside memory:
    the buffer comes back with length 0.  Either way the queue keeps serving."""
    with pconnect(d) as dev:
        vq = dev.queues[0]
        st = status_byte(dev.memory)
        buf = Guarded(dev.memory, 512)
        vq.add_chain([(2 * GiB, 16, False), (buf.gpa, 512, True), (st.gpa, 1, True)])
        vq.kick(force=True)
        (el,) = vq.wait_used(5)
        assert st.read() == bytes([VIRTIO_BLK_S_IOERR]) and el.len == 1
        hdr = blk_header(dev.memory, VIRTIO_BLK_T_IN, 0)
        vq.add_chain([(hdr.gpa, 16, False), (buf.gpa, 512, True), (2 * GiB, 1, True)])
        vq.kick(force=True)
        (el,) = vq.wait_used(5)
        assert el.len == 0
        buf.check_guards()
        dev.write(0, b"\x22" * 512)
        assert dev.read(0, 1) == b"\x22" * 512
    assert_healthy(d)


# ---------------------------------------------------------------------------
# malformed rings: the queue stops, the daemon says why, the others go on
# ---------------------------------------------------------------------------


def _ring_case(dev, case: str) -> str:
    """Make a malformed buffer available on queue 0; returns the expected log text."""
    vq: PackedVirtqueue = dev.queues[0]
    mem = dev.memory
    hdr = blk_header(mem, VIRTIO_BLK_T_IN, 0)
    data = Guarded(mem, 512)
    st = status_byte(mem)
    dev._guards = [hdr, data, st]
    size = vq.size
    good = [(hdr.gpa, 16, NEXT, 0), (data.gpa, 512, NEXT | WRITE, 0), (st.gpa, 1, WRITE, 0)]
    if case == "chain_longer_than_the_ring":
        vq.add_raw([(hdr.gpa, 16, NEXT, 0)] * size)
        return "descriptor chain longer than the ring"
    if case == "chain_wraps_onto_itself":
        # Starting mid-ring: the chain wraps around the end and meets its own head.
        dev.read(0, 1)
        vq.add_raw([(hdr.gpa, 16, NEXT, 0)] * (size - 1) + [(st.gpa, 1, WRITE | NEXT, 0)])
        return "descriptor chain longer than the ring"
    if case in ("id_out_of_range", "id_0xffff"):
        bad = size if case == "id_out_of_range" else 0xFFFF
        vq.add_raw([desc[:3] + (bad,) for desc in good])
        return "buffer id out of range"
    if case == "id_only_on_the_first_descriptor_out_of_range":
        # The id is the last descriptor's: a good one there, junk before, is served;
        # junk there is refused.
        vq.add_raw([good[0][:3] + (3,), good[1], good[2][:3] + (size + 7,)])
        return "buffer id out of range"
    if case == "readable_after_writable":
        vq.add_raw([good[0], (st.gpa, 1, NEXT | WRITE, 0), (data.gpa, 512, 0, 0)])
        return "device-readable descriptor after a device-writable one"
    # indirect tables (packed format: addr, len, id, flags; read in order, no NEXT)
    table = Guarded(mem, 64 * 16, 0)
    dev._guards.append(table)
    for i, (a, ln, fl, _id) in enumerate(good):
        vq.write_desc(i, a, ln, fl & WRITE, table_gpa=table.gpa)
    if case.startswith("indirect_len_"):
        vq.add_raw([(table.gpa, int(case.rsplit("_", 1)[1]), VRING_DESC_F_INDIRECT, 0)])
        return "indirect table length is not a non-zero multiple of 16"
    if case == "indirect_nested":
        inner = mem.alloc(48, 16)
        for i, (a, ln, fl, _id) in enumerate(good):
            vq.write_desc(i, a, ln, fl & WRITE, table_gpa=inner)
        vq.write_desc(0, inner, 48, VRING_DESC_F_INDIRECT, table_gpa=table.gpa)
        vq.add_raw([(table.gpa, 48, VRING_DESC_F_INDIRECT, 0)])
        return "nested indirect descriptor table"
    if case == "indirect_with_next":
        vq.add_raw([(table.gpa, 48, VRING_DESC_F_INDIRECT | NEXT, 0), good[2]])
        return "indirect descriptor with NEXT flag"
    if case == "indirect_inside_a_chain":
        vq.add_raw([good[0], (table.gpa, 48, VRING_DESC_F_INDIRECT, 0)])
        return "indirect descriptor inside a chain"
    if case == "indirect_outside_memory":
        vq.add_raw([(2 * GiB, 48, VRING_DESC_F_INDIRECT, 0)])
        return "indirect table outside guest memory"
    if case == "indirect_crosses_region_end":
        vq.add_raw([(8 * MiB - 32, 48, VRING_DESC_F_INDIRECT, 0)])
        return "indirect table outside guest memory"
    if case == "indirect_longer_than_the_limit":
        big = mem.alloc(16 * 1041, 16)
        mem.write(big, struct.pack("<QIHH", hdr.gpa, 0, 0, 0) * 1040 + struct.pack("<QIHH", st.gpa, 1, 0, WRITE))
        vq.add_raw([(big, 16 * 1041, VRING_DESC_F_INDIRECT, 0)])
        return "descriptor chain longer than 1040 descriptors"
    raise AssertionError(case)


RING_CASES = ["chain_longer_than_the_ring", "chain_wraps_onto_itself", "id_out_of_range", "id_0xffff",
              "id_only_on_the_first_descriptor_out_of_range", "readable_after_writable",
              "indirect_len_0", "indirect_len_24", "indirect_len_8", "indirect_nested", "indirect_with_next",
              "indirect_inside_a_chain", "indirect_outside_memory", "indirect_crosses_region_end",
              "indirect_longer_than_the_limit"]


@pytest.mark.parametrize("case", RING_CASES)
def test_malformed_packed_ring_stops_the_queue(d, case):
    with pconnect(d, num_queues=2, queue_size=64) as dev:
        err_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            dev.frontend.set_vring_err(0, err_fd)
            mark = len(d.log())
            expected = _ring_case(dev, case)
            dev.queues[0].kick(force=True)
            expect_no_completion(dev.queues[0])
            deadline = time.monotonic() + 5
            while expected not in d.log()[mark:]:
                assert time.monotonic() < deadline, d.log()[mark:]
                time.sleep(0.05)
            assert "vring 0 " in d.log()[mark:]
            assert eventfd_signalled(err_fd, 5.0), "SET_VRING_ERR eventfd was not signalled"
        finally:
            os.close(err_fd)
        for g in dev._guards:
            g.check_guards()
        dev.write(0, b"\x77" * 1024, queue=1)
        assert dev.read(0, 2, queue=1) == b"\x77" * 1024
        assert dev.frontend.ping()
    assert_healthy(d)


def test_indirect_without_the_feature(d):
    with pconnect(d, features=PACKED & ~bit(VIRTIO_RING_F_INDIRECT_DESC)) as dev:
        vq = dev.queues[0]
        hdr = blk_header(dev.memory, VIRTIO_BLK_T_IN, 0)
        st = status_byte(dev.memory)
        table = dev.memory.alloc(32, 16)
        vq.write_desc(0, hdr.gpa, 16, 0, table_gpa=table)
        vq.write_desc(1, st.gpa, 1, WRITE, table_gpa=table)
        mark = len(d.log())
        vq.add_raw([(table, 32, VRING_DESC_F_INDIRECT, 0)])
        vq.kick(force=True)
        expect_no_completion(vq)
        deadline = time.monotonic() + 5
        while "indirect descriptor without VIRTIO_RING_F_INDIRECT_DESC" not in d.log()[mark:]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert st.read() == b"\xff"
    assert_healthy(d)


def test_descriptors_not_marked_available_are_not_taken(d):
    """Wrong avail/used bits for the wrap counter (the driver's previous lap, or a
    used pattern) are not available: nothing is taken, nothing breaks; once the
    flags are right the same buffer is served."""
    with pconnect(d, queue_size=8) as dev:
        vq = dev.queues[0]
        hdr = blk_header(dev.memory, VIRTIO_BLK_T_IN, 0)
        data = Guarded(dev.memory, 512)
        st = status_byte(dev.memory)
        descs = [(hdr.gpa, 16, NEXT, 5), (data.gpa, 512, NEXT | WRITE, 5), (st.gpa, 1, WRITE, 5)]
        pos = vq.next_avail
        for wrong in (0, VRING_PACKED_DESC_F_USED, VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED):
            for i, (a, ln, fl, id_) in enumerate(descs):
                vq.write_desc(pos + i, a, ln, fl | wrong, id_)
            vq.kick(force=True)
            expect_no_completion(vq, 0.2)
        vq.add_raw(descs, register_id=5, writable=513)
        vq.kick(force=True)
        (el,) = vq.wait_used(5)
        assert (el.head, el.len) == (5, 513) and st.read() == b"\x00"
        dev.write(0, b"\x44" * 512)
        assert dev.read(0, 1) == b"\x44" * 512
    assert_healthy(d)


# ---------------------------------------------------------------------------
# malformed messages: the ring's base
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("base", [64, 0x8000 | 64, (64 << 16) | 0x8000, 0xFFFFFFFF])
def test_packed_base_outside_the_ring_drops_the_connection(d, base):
    wait_no_session(d, "vhost.0")
    mem = GuestMemory.pc_like(16 * MiB)
    fe = VhostUserFrontend(d.socket("vhost.0"))
    try:
        fe.get_features()
        fe.set_features(bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_F_RING_PACKED))
        fe.set_mem_table(mem)
        mark = len(d.log())
        vq = PackedVirtqueue(mem, 64)
        fe.set_vring_num(0, 64)
        fe.set_vring_base(0, base)
        fe.set_vring_addr(0, *vq.uaddrs())
        try:
            fe.set_vring_kick(0, vq.kick_fd)
        except OSError:
            pass
        assert fe.wait_closed(5.0), "a base outside the ring was accepted"
        deadline = time.monotonic() + 5
        while "outside the packed ring of 64" not in d.log()[mark:]:
            assert time.monotonic() < deadline, d.log()[mark:]
            time.sleep(0.05)
        vq.close()
    finally:
        fe.close()
        mem.close()
    assert_healthy(d)


# ---------------------------------------------------------------------------
# isolation: one reactor, a hostile packed ring and a neighbour
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["interrupt", "poll"])
def iso(request, tmp_path_factory):
    from blk_helpers import setup_blk_controllers
    from vhost_core.testing.daemon import VhostDaemon

    daemon = VhostDaemon(tmp_path_factory.mktemp(f"piso-{request.param}"),
                         interrupt_mode=request.param == "interrupt").start()
    try:
        setup_blk_controllers(daemon)
        yield daemon
        assert "Traceback" not in daemon.log(), daemon.log()
    finally:
        rc = daemon.stop()
    assert rc == 0, f"vhost exited with {rc} on SIGTERM:\n{daemon.log()}"


def test_a_packed_ring_of_long_invalid_chains_does_not_starve_the_other_controller(iso):
    """A 32768-entry packed ring whose every entry is a 1000-descriptor indirect table
    of buffers outside guest memory, made available again lap after lap: each costs
    the walk, none does I/O; the per-queue budget keeps the neighbour's latency low."""
    d = iso
    with Bystander(d) as b:
        with pconnect(d, queue_size=32768, memory_mb=64, indirect=True) as dev:
            vq = dev.queues[0]
            mem = dev.memory
            st = mem.alloc(1, 1)
            table = mem.alloc(16 * 1000, 16)
            mem.write(table, struct.pack("<QIHH", 1 << 50, 512, 0, 0) * 999 + struct.pack("<QIHH", st, 1, 0, WRITE))
            t0 = time.monotonic()
            laps = 0
            wrap = 1
            while time.monotonic() - t0 < 3:
                avail = VRING_PACKED_DESC_F_AVAIL if wrap else VRING_PACKED_DESC_F_USED
                ring = b"".join(struct.pack("<QIHH", table, 16 * 1000, i, VRING_DESC_F_INDIRECT | avail)
                                for i in range(32768))
                mem.write(vq.desc_gpa, ring)
                vq.kick(force=True)
                # Wait for the lap to come back used (AVAIL == USED == wrap at the end).
                used = (VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED) if wrap else 0
                deadline = time.monotonic() + 10
                while vq.read_desc(32767)[3] & (VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED) != used:
                    assert time.monotonic() < deadline, "the device stopped taking the poisoned buffers"
                    time.sleep(0.05)
                laps += 1
                wrap ^= 1
            errors = d.rpc("vhost_get_queue_stats", ctrlr="vhost.0")[0]["errors"]
            assert laps >= 1 and errors >= 32768, (laps, errors)
    b.check(max_wait=0.25)
    assert_healthy(d)


def test_packed_layout_does_not_outlive_reset_owner(d):
    """Packed rings negotiated and one started, then RESET_OWNER and the ring restarted
    without SET_FEATURES: it is a split ring now (validated and walked as one), and the
    target writes nothing where the packed ring's device area was."""
    wait_no_session(d, "vhost.0")
    mem = GuestMemory.pc_like(16 * MiB)
    fe = VhostUserFrontend(d.socket("vhost.0"))
    try:
        fe.get_features()
        fe.set_protocol_features(fe.get_protocol_features())
        fe.set_features(bit(VIRTIO_F_VERSION_1) | bit(30) | bit(VIRTIO_F_RING_PACKED))
        fe.set_mem_table(mem)
        pvq = fe.setup_vring(0, 16)
        assert isinstance(pvq, PackedVirtqueue)
        fe.set_vring_enable(0, True)
        fe.reset_owner()
        fe.vrings.pop(0)            # keep the packed ring's memory allocated (and guarded)
        svq = fe.setup_vring(0, 16, packed=False, base=0)
        fe.set_vring_enable(0, True)
        mem.write(pvq.device_gpa, b"\xEE\xEE\xEE\xEE")
        hdr = blk_header(mem, VIRTIO_BLK_T_IN, 0)
        buf, st = Guarded(mem, 512), status_byte(mem)
        svq.add_chain([(hdr.gpa, 16, False), (buf.gpa, 512, True), (st.gpa, 1, True)])
        svq.kick(force=True)
        (el,) = svq.wait_used(5)
        assert st.read() == b"\x00" and el.len == 513
        assert fe.get_vring_base(0) == 1
        assert mem.read(pvq.device_gpa, 4) == b"\xEE\xEE\xEE\xEE"
        pvq.close()
    finally:
        fe.close()
        mem.close()
    assert_healthy(d)
