"""A hostile or broken vhost-user front-end must not hurt the daemon.

Three kinds of trouble, three answers (see DESIGN.md, "Guest memory, the trust
boundary"):

* a bad *request* (buffer outside guest memory, short header, bad sector,
  write to a read-only device, unknown type) completes with an error status in
  the request's own status byte; the queue keeps serving;
* a malformed *ring* (loops, ``next``/head out of range, avail index jump, bad
  indirect table) stops that queue, the daemon logs why and signals the ring's
  error eventfd; the other queues keep serving;
* a malformed *message* drops the connection with a logged error.

Every case runs on its own connection; afterwards a well-behaved front-end gets
correct service from the same controller and from a second one, the daemon is
alive and printed no traceback.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import time

import pytest

from blk_helpers import (
    BLK_HDR,
    NEXT,
    WRITE,
    Guarded,
    assert_healthy,
    bad_buffer_request,
    blk_header,
    connect,
    eventfd_signalled,
    expect_no_completion,
    run_chain,
    status_byte,
    wait_no_session,
)
from vhost_core.testing import (
    DEFAULT_BLK_FEATURES,
    BlkIOError,
    GuestMemory,
    SplitVirtqueue,
    VhostUserFrontend,
    VhostUserNack,
)
from vhost_core.testing.constants import (
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_INDIRECT_DESC,
    VRING_DESC_F_INDIRECT,
    VhostUserRequest as R,
    bit,
)

GiB = 1 << 30
STATE = struct.Struct("=II")
U64 = struct.Struct("=Q")
ADDR = struct.Struct("=IIQQQQ")


@pytest.fixture
def d(shared_blk_daemon):
    """One daemon for the whole module (each case on its own connection)."""
    return shared_blk_daemon


def queue_errors(d, ctrlr="vhost.0", queue=0) -> int:
    return d.rpc("vhost_get_queue_stats", ctrlr=ctrlr)[queue]["errors"]


# ---------------------------------------------------------------------------
# bad requests: IOERR in the status byte, the queue keeps serving
# ---------------------------------------------------------------------------

# pc_like(16 MiB): RAM at [0, 8 MiB) and [4 GiB, 4 GiB + 8 MiB), a hole between.
BAD_BUFFERS = {
    "outside_every_region": (2 * GiB, 4096),
    "far_above_ram": (1 << 50, 512),
    "crosses_region_end_into_gap": (8 * (1 << 20) - 256, 512),
    "crosses_second_region_end": (4 * GiB + 8 * (1 << 20) - 512, 4096),
    "length_overflows_64_bits": ((1 << 64) - 512, 4096),
}


@pytest.mark.parametrize("direction", ["read", "write"])
@pytest.mark.parametrize("where", list(BAD_BUFFERS))
def test_data_buffer_outside_guest_memory(d, where, direction):
    addr, length = BAD_BUFFERS[where]
    with connect(d) as dev:
        before = queue_errors(d)
        type_ = VIRTIO_BLK_T_IN if direction == "read" else VIRTIO_BLK_T_OUT
        bad_buffer_request(dev, type_, addr, length)
        assert queue_errors(d) == before + 1
        # The same queue keeps serving.
        dev.write(8, b"\x11" * 512)
        assert dev.read(8, 1) == b"\x11" * 512
    assert_healthy(d)


def test_bad_requests_are_logged_as_rate_limited_summaries(d):
    """The first bad request is logged at once; a flood right after it costs no new line
    until the interval has passed or the front-end goes away, and then one line says how many."""
    line = "Controller vhost.0: vring 0: {} bad request{} from the guest failed"
    start = len(d.log())

    def logged(text: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while text not in d.log()[start:]:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    with connect(d) as dev:
        bad_buffer_request(dev, VIRTIO_BLK_T_IN, 2 * GiB, 4096)
        assert logged(line.format(1, ""), 5), d.log()[start:]
        for _ in range(40):
            bad_buffer_request(dev, VIRTIO_BLK_T_OUT, 1 << 50, 512)
        assert not logged("bad requests from the guest", 1)
    assert logged(line.format(40, "s"), 5), d.log()[start:]
    assert d.log()[start:].count("from the guest failed") == 2
    assert_healthy(d)


def test_header_outside_guest_memory(d):
    with connect(d) as dev:
        vq = dev.queues[0]
        data = Guarded(dev.memory, 512)
        st = status_byte(dev.memory)
        run_chain(vq, [(3 * GiB, 16, False), (data.gpa, 512, True), (st.gpa, 1, True)])
        assert st.read() == bytes([VIRTIO_BLK_S_IOERR])
        assert data.read() == bytes([0xA5]) * 512
        data.check_guards()
        st.check_guards()
        dev.write(0, b"\x13" * 512)
        assert dev.read(0, 1) == b"\x13" * 512
    assert_healthy(d)


def test_status_descriptor_outside_guest_memory(d):
    """No status byte to answer in: the request completes with length 0 and
    nothing is written anywhere."""
    with connect(d) as dev:
        vq = dev.queues[0]
        hdr = blk_header(dev.memory, VIRTIO_BLK_T_IN, 0)
        data = Guarded(dev.memory, 512)
        used = run_chain(vq, [(hdr.gpa, 16, False), (data.gpa, 512, True), (3 * GiB, 1, True)])
        assert used.len == 0
        assert data.read() == bytes([0xA5]) * 512
        data.check_guards()
        hdr.check_guards()
        dev.write(0, b"\x14" * 512)
        assert dev.read(0, 1) == b"\x14" * 512
    assert_healthy(d)


def test_request_without_writable_descriptor(d):
    """Nowhere to put a status: completed with length 0, nothing written."""
    with connect(d) as dev:
        vq = dev.queues[0]
        hdr = blk_header(dev.memory, VIRTIO_BLK_T_IN, 0)
        data = Guarded(dev.memory, 512)
        used = run_chain(vq, [(hdr.gpa, 16, False), (data.gpa, 512, False)])
        assert used.len == 0
        assert data.read() == bytes([0xA5]) * 512
        data.check_guards()
        hdr.check_guards()
        dev.write(0, b"\x15" * 512)
        assert dev.read(0, 1) == b"\x15" * 512
    assert_healthy(d)


@pytest.mark.parametrize("hdr_len", [0, 1, 8, 15])
def test_header_shorter_than_16_bytes(d, hdr_len):
    with connect(d) as dev:
        dev.write(0, b"\x22" * 512)
        vq = dev.queues[0]
        hdr = Guarded(dev.memory, 16, BLK_HDR.pack(VIRTIO_BLK_T_OUT, 0, 0))
        data = Guarded(dev.memory, 512, 0x33)
        st = status_byte(dev.memory)
        bufs = ([(hdr.gpa, hdr_len, False)] if hdr_len else []) + [(st.gpa, 1, True)]
        used = run_chain(vq, bufs)
        assert st.read() == bytes([VIRTIO_BLK_S_IOERR])
        assert used.len == 1
        for g in (hdr, data, st):
            g.check_guards()
        assert dev.read(0, 1) == b"\x22" * 512
    assert_healthy(d)


@pytest.mark.parametrize("direction", ["read", "write"])
@pytest.mark.parametrize("sector,nsectors", [
    (16384, 1),          # first sector past the end
    (16383, 2),          # starts inside, ends past the end
    (1 << 55, 1),        # sector * 512 overflows nothing, still far past
    ((1 << 64) - 1, 1),  # sector * 512 overflows 64 bits
])
def test_sector_past_the_end(d, direction, sector, nsectors):
    with connect(d) as dev:
        last = dev.read(16383, 1)
        vq = dev.queues[0]
        type_ = VIRTIO_BLK_T_IN if direction == "read" else VIRTIO_BLK_T_OUT
        hdr = blk_header(dev.memory, type_, sector)
        data = Guarded(dev.memory, 512 * nsectors, 0x44)
        st = status_byte(dev.memory)
        used = run_chain(vq, [(hdr.gpa, 16, False), (data.gpa, data.n, direction == "read"),
                              (st.gpa, 1, True)])
        assert st.read() == bytes([VIRTIO_BLK_S_IOERR])
        assert used.len == 1
        assert data.read() == b"\x44" * data.n
        for g in (hdr, data, st):
            g.check_guards()
        # The last sector is still readable and unchanged.
        assert dev.read(16383, 1) == last
    assert_healthy(d)


@pytest.mark.parametrize("type_", [2, 3, 9, 99, 0xFFFFFFFF])
def test_unknown_request_type_is_unsupp(d, type_):
    with connect(d) as dev:
        before = dev.read(0, 1)
        res = dev.submit(type_, 0, b"", 512)
        assert res.status == VIRTIO_BLK_S_UNSUPP
        res = dev.submit(type_, 0, b"\x55" * 512, 0)
        assert res.status == VIRTIO_BLK_S_UNSUPP
        assert dev.read(0, 1) == before
    assert_healthy(d)


@pytest.mark.parametrize("op", ["write", "write_zeroes", "discard"])
def test_write_to_read_only_device(d, op):
    with connect(d, "vhost.ro") as dev:
        assert dev.has_feature(5)  # VIRTIO_BLK_F_RO
        before = dev.read(0, 8)
        if op == "write":
            res = dev.submit(VIRTIO_BLK_T_OUT, 0, b"\x66" * 4096)
        else:
            type_ = VIRTIO_BLK_T_WRITE_ZEROES if op == "write_zeroes" else VIRTIO_BLK_T_DISCARD
            res = dev.submit(type_, 0, dev.segments_payload([(0, 8, 0)]))
        assert res.status in ((VIRTIO_BLK_S_IOERR,) if op == "write" else
                              (VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP))
        with pytest.raises(BlkIOError):
            dev.write(0, b"\x66" * 512)
        assert dev.read(0, 8) == before
        dev.flush()
    assert_healthy(d, ("vhost.0", "vhost.1"))


# ---------------------------------------------------------------------------
# malformed rings: the queue stops, the daemon says why, the others go on
# ---------------------------------------------------------------------------


def _ring_case(dev, case: str) -> str:
    """Make a malformed chain available on queue 0; returns the expected log text."""
    vq = dev.queues[0]
    mem = dev.memory
    hdr = blk_header(mem, VIRTIO_BLK_T_IN, 0)
    data = Guarded(mem, 512)
    st = status_byte(mem)
    dev._guards = [hdr, data, st]
    size = vq.size
    if case == "self_loop":
        (a,) = vq.reserve_descs(1)
        vq.write_desc(a, hdr.gpa, 16, NEXT, a)
        vq.push_head(a)
        return "descriptor chain loops"
    if case == "two_cycle":
        a, b = vq.reserve_descs(2)
        vq.write_desc(a, hdr.gpa, 16, NEXT, b)
        vq.write_desc(b, data.gpa, 512, NEXT, a)
        vq.push_head(a)
        return "descriptor chain loops"
    if case == "next_out_of_range":
        a, b = vq.reserve_descs(2)
        vq.write_desc(a, hdr.gpa, 16, NEXT, b)
        vq.write_desc(b, data.gpa, 512, NEXT | WRITE, size)
        vq.push_head(a)
        return "descriptor next index out of range"
    if case == "next_0xffff":
        (a,) = vq.reserve_descs(1)
        vq.write_desc(a, hdr.gpa, 16, NEXT, 0xFFFF)
        vq.push_head(a)
        return "descriptor next index out of range"
    if case == "head_out_of_range":
        vq.push_head(size)
        return "avail ring head index out of range"
    if case == "head_0xffff":
        vq.push_head(0xFFFF)
        return "avail ring head index out of range"
    if case == "avail_idx_jump":
        vq.set_avail_idx(vq.avail_idx + size + 1)
        return "avail index moved by more than the queue size"
    if case == "readable_after_writable":
        a, b, c = vq.reserve_descs(3)
        vq.write_desc(a, hdr.gpa, 16, NEXT, b)
        vq.write_desc(b, st.gpa, 1, NEXT | WRITE, c)
        vq.write_desc(c, data.gpa, 512, 0, 0)
        vq.push_head(a)
        return "device-readable descriptor after a device-writable one"
    # indirect tables
    table = Guarded(mem, 64 * 16, 0)
    dev._guards.append(table)
    good = [(hdr.gpa, 16, NEXT, 1), (data.gpa, 512, NEXT | WRITE, 2), (st.gpa, 1, WRITE, 0)]
    for i, desc in enumerate(good):
        vq.write_desc(i, *desc, table_gpa=table.gpa)
    (a,) = vq.reserve_descs(1)
    if case.startswith("indirect_len_"):
        length = int(case.rsplit("_", 1)[1])
        vq.write_desc(a, table.gpa, length, VRING_DESC_F_INDIRECT)
        vq.push_head(a)
        return "indirect table length is not a non-zero multiple of 16"
    if case == "indirect_nested":
        inner = mem.alloc(48, 16)
        for i, desc in enumerate(good):
            vq.write_desc(i, *desc, table_gpa=inner)
        vq.write_desc(0, inner, 48, VRING_DESC_F_INDIRECT, table_gpa=table.gpa)
        vq.write_desc(a, table.gpa, 48, VRING_DESC_F_INDIRECT)
        vq.push_head(a)
        return "nested indirect descriptor table"
    if case == "indirect_with_next":
        vq.write_desc(a, table.gpa, 48, VRING_DESC_F_INDIRECT | NEXT, a)
        vq.push_head(a)
        return "indirect descriptor with NEXT flag"
    if case == "indirect_outside_memory":
        vq.write_desc(a, 2 * GiB, 48, VRING_DESC_F_INDIRECT)
        vq.push_head(a)
        return "indirect table outside guest memory"
    if case == "indirect_crosses_region_end":
        vq.write_desc(a, 8 * (1 << 20) - 32, 48, VRING_DESC_F_INDIRECT)
        vq.push_head(a)
        return "indirect table outside guest memory"
    if case == "indirect_loop":
        vq.write_desc(2, st.gpa, 1, WRITE | NEXT, 1, table_gpa=table.gpa)
        vq.write_desc(a, table.gpa, 48, VRING_DESC_F_INDIRECT)
        vq.push_head(a)
        return "descriptor chain loops"
    if case == "indirect_next_out_of_range":
        vq.write_desc(2, st.gpa, 1, WRITE | NEXT, 3, table_gpa=table.gpa)
        vq.write_desc(a, table.gpa, 48, VRING_DESC_F_INDIRECT)
        vq.push_head(a)
        return "descriptor next index out of range"
    raise AssertionError(case)


RING_CASES = ["self_loop", "two_cycle", "next_out_of_range", "next_0xffff", "head_out_of_range",
              "head_0xffff", "avail_idx_jump", "readable_after_writable",
              "indirect_len_0", "indirect_len_24", "indirect_len_8", "indirect_nested",
              "indirect_with_next", "indirect_outside_memory", "indirect_crosses_region_end",
              "indirect_loop", "indirect_next_out_of_range"]


@pytest.mark.parametrize("case", RING_CASES)
def test_malformed_ring_stops_the_queue(d, case):
    with connect(d, num_queues=2) as dev:
        err_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            dev.frontend.set_vring_err(0, err_fd)
            expected = _ring_case(dev, case)
            dev.queues[0].kick(force=True)
            expect_no_completion(dev.queues[0])
            # The daemon says which ring broke and why, without waiting for a
            # disconnect, and signals the ring's error eventfd.
            d.wait_log("vring 0 ", timeout=5)
            d.wait_log(expected, timeout=5)
            assert eventfd_signalled(err_fd, 5.0), "SET_VRING_ERR eventfd was not signalled"
        finally:
            os.close(err_fd)
        # Nothing was written to the request's buffers.
        for g in dev._guards:
            g.check_guards()
        # The other queue of the same connection keeps serving.
        dev.write(0, b"\x77" * 1024, queue=1)
        assert dev.read(0, 2, queue=1) == b"\x77" * 1024
        assert dev.frontend.ping()
    assert_healthy(d)


def test_indirect_without_the_feature(d):
    with connect(d, features=DEFAULT_BLK_FEATURES & ~bit(VIRTIO_RING_F_INDIRECT_DESC)) as dev:
        vq = dev.queues[0]
        hdr = blk_header(dev.memory, VIRTIO_BLK_T_IN, 0)
        st = status_byte(dev.memory)
        table = dev.memory.alloc(32, 16)
        vq.write_desc(0, hdr.gpa, 16, NEXT, 1, table_gpa=table)
        vq.write_desc(1, st.gpa, 1, WRITE, 0, table_gpa=table)
        (a,) = vq.reserve_descs(1)
        vq.write_desc(a, table, 32, VRING_DESC_F_INDIRECT)
        vq.push_head(a)
        vq.kick(force=True)
        expect_no_completion(vq)
        d.wait_log("indirect descriptor without VIRTIO_RING_F_INDIRECT_DESC")
        assert st.read() == b"\xff"
    assert_healthy(d)


def test_broken_ring_is_reported_at_disconnect_and_restarts(d):
    """A reconnecting front-end (QEMU reconnect=) gets a working ring again."""
    with connect(d) as dev:
        dev.queues[0].push_head(0xFFFF)
        dev.queues[0].kick(force=True)
        expect_no_completion(dev.queues[0])
    d.wait_log("avail ring head index out of range")
    assert_healthy(d)


# ---------------------------------------------------------------------------
# malformed messages: the connection is dropped with a clear error
# ---------------------------------------------------------------------------


def _frontend(d, ctrlr="vhost.0", **kw) -> VhostUserFrontend:
    wait_no_session(d, ctrlr)
    return VhostUserFrontend(d.socket(ctrlr), **kw)


def _handshake(fe: VhostUserFrontend, mem: GuestMemory | None = None) -> None:
    fe.get_features()
    fe.set_features(bit(VIRTIO_F_VERSION_1))
    if mem is not None:
        fe.set_mem_table(mem)


def _assert_dropped(d, fe: VhostUserFrontend, log_text: str) -> None:
    assert fe.wait_closed(5.0), "the daemon kept a connection that broke the protocol"
    out = d.wait_log(log_text)
    assert "dropping the front-end connection" in out or "refused" in out


@pytest.mark.parametrize("code", [0, 41, 999, 0xFFFFFFFF])
def test_unknown_request_code(d, code):
    with _frontend(d) as fe:
        _handshake(fe)
        fe.send(code, b"\0" * 8)
        _assert_dropped(d, fe, f"request {code}")
    assert_healthy(d)


def test_unsupported_request_expecting_a_reply(d):
    """GET_STATUS (STATUS not offered): the front-end waits for an answer we
    cannot give, so the connection is dropped rather than left hanging."""
    with _frontend(d) as fe:
        _handshake(fe)
        fe.send(R.GET_STATUS)
        _assert_dropped(d, fe, "GET_STATUS")
    assert_healthy(d)


def test_unsupported_request_with_reply_ack_is_nacked(d):
    """A known request we do not implement and that has no reply is refused
    (REPLY_ACK non-zero) and the session goes on."""
    with connect(d) as dev:
        fe = dev.frontend
        with pytest.raises(VhostUserNack):
            fe.command(R.SEND_RARP, b"\0" * 8, ack=True)
        d.wait_log("unsupported vhost-user message SEND_RARP")
        assert fe.ping()
        dev.write(0, b"\x12" * 512)
        assert dev.read(0, 1) == b"\x12" * 512
    assert_healthy(d)


@pytest.mark.parametrize("size", [4097, 1 << 20, 0xFFFFFFFF])
def test_message_size_larger_than_any_payload(d, size):
    with _frontend(d) as fe:
        fe.send(R.SET_FEATURES, U64.pack(0), size=size)
        _assert_dropped(d, fe, f"payload size {size} of request 2 exceeds 4096")
    assert_healthy(d)


@pytest.mark.parametrize("nbytes", [1, 5, 11])
def test_truncated_header(d, nbytes):
    fe = _frontend(d)
    fe.send_raw(struct.pack("=III", R.GET_FEATURES, 1, 0)[:nbytes])
    fe.close()
    d.wait_log(f"truncated message header ({nbytes} of 12 bytes)")
    assert_healthy(d)


def test_truncated_payload(d):
    fe = _frontend(d)
    fe.send(R.SET_FEATURES, b"\0\0\0", size=8)
    fe.close()
    d.wait_log("payload of request 2 truncated (3 of 8 bytes)")
    assert_healthy(d)


def test_wrong_payload_size_for_its_request(d):
    with _frontend(d) as fe:
        fe.send(R.SET_VRING_NUM, b"\0" * 4)
        _assert_dropped(d, fe, "SET_VRING_NUM payload is 4 bytes, expected 8")
    assert_healthy(d)


@pytest.mark.parametrize("nfds", [8, 9])
def test_too_many_memory_regions(d, nfds):
    mem = GuestMemory([(i * (1 << 20), 1 << 16) for i in range(9)])
    try:
        with _frontend(d) as fe:
            _handshake(fe)
            fe.send(R.SET_MEM_TABLE, fe.mem_table_payload(mem.regions), mem.fds()[:nfds])
            _assert_dropped(d, fe, "SET_MEM_TABLE with 9 regions (at most 8)")
    finally:
        mem.close()
    assert_healthy(d)


def test_memory_region_without_fd(d):
    mem = GuestMemory.pc_like(1 << 20)
    try:
        with _frontend(d) as fe:
            _handshake(fe)
            fe.set_mem_table(mem, fds=[mem.regions[0].fd])
            _assert_dropped(d, fe, "memory table has 2 regions but 1 file descriptors")
    finally:
        mem.close()
    assert_healthy(d)


@pytest.mark.parametrize("case", ["offset_at_eof", "offset_past_eof", "size_past_eof",
                                  "offset_overflows"])
def test_memory_region_past_end_of_file(d, case):
    mem = GuestMemory.pc_like(1 << 20)
    r0, r1 = mem.regions
    total = r0.size + r1.size
    bad = {"offset_at_eof": dataclasses.replace(r1, mmap_offset=total),
           "offset_past_eof": dataclasses.replace(r1, mmap_offset=total + (1 << 30)),
           "size_past_eof": dataclasses.replace(r1, size=r1.size + 4096),
           "offset_overflows": dataclasses.replace(r1, mmap_offset=(1 << 64) - 4096)}[case]
    try:
        with _frontend(d) as fe:
            _handshake(fe)
            fe.set_mem_table([r0, bad])
            _assert_dropped(d, fe, "cannot map memory region")
    finally:
        mem.close()
    assert_healthy(d)


VRING_MESSAGES = {
    "SET_VRING_NUM": (R.SET_VRING_NUM, lambda i: STATE.pack(i, 128), False),
    "SET_VRING_BASE": (R.SET_VRING_BASE, lambda i: STATE.pack(i, 0), False),
    "SET_VRING_ADDR": (R.SET_VRING_ADDR, lambda i: ADDR.pack(i, 0, 0, 0, 0, 0), False),
    "GET_VRING_BASE": (R.GET_VRING_BASE, lambda i: STATE.pack(i, 0), False),
    "SET_VRING_ENABLE": (R.SET_VRING_ENABLE, lambda i: STATE.pack(i, 1), False),
    "SET_VRING_KICK": (R.SET_VRING_KICK, lambda i: U64.pack(i), True),
    "SET_VRING_CALL": (R.SET_VRING_CALL, lambda i: U64.pack(i), True),
    "SET_VRING_ERR": (R.SET_VRING_ERR, lambda i: U64.pack(i), True),
}


@pytest.mark.parametrize("index", [16, 255])
@pytest.mark.parametrize("msg", list(VRING_MESSAGES))
def test_vring_index_out_of_range(d, msg, index):
    code, payload, with_fd = VRING_MESSAGES[msg]
    with connect(d, num_queues=2) as dev:
        efd = os.eventfd(0, os.EFD_CLOEXEC)
        try:
            dev.frontend.send(code, payload(index), [efd] if with_fd else [])
        finally:
            os.close(efd)
        _assert_dropped(d, dev.frontend, f"vring index {index} out of range (device has 16 queues)")
    assert_healthy(d)


@pytest.mark.parametrize("num", [0, 3, 100, 65536, 1 << 31])
def test_ring_size_invalid(d, num):
    mem = GuestMemory.pc_like(1 << 20)
    try:
        with _frontend(d) as fe:
            _handshake(fe, mem)
            fe.set_vring_num(0, num)
            _assert_dropped(d, fe, f"vring 0 size {num} is not a power of two in 1..32768")
    finally:
        mem.close()
    assert_healthy(d)


@pytest.mark.parametrize("which", ["desc_outside", "used_outside", "avail_crosses_region_end",
                                   "desc_in_second_region_tail", "all_zero"])
def test_ring_addresses_not_in_guest_memory(d, which):
    mem = GuestMemory.pc_like(1 << 20)
    vq = SplitVirtqueue(mem, 128)
    try:
        desc, used, avail = vq.uaddrs()
        r0, r1 = mem.regions
        what = {"desc_outside": "descriptor table", "used_outside": "used ring",
                "avail_crosses_region_end": "avail ring", "desc_in_second_region_tail": "descriptor table",
                "all_zero": "descriptor table"}[which]
        if which == "desc_outside":
            desc = 0xDEAD0000
        elif which == "used_outside":
            used = max(r.uaddr + r.size for r in mem.regions) + 4096
        elif which == "avail_crosses_region_end":
            avail = r0.uaddr + r0.size - 64
        elif which == "desc_in_second_region_tail":
            desc = r1.uaddr + r1.size - 16 * 64
        else:
            desc = used = avail = 0
        with _frontend(d) as fe:
            _handshake(fe, mem)
            fe.set_vring_num(0, 128)
            fe.set_vring_base(0, 0)
            fe.set_vring_addr(0, desc, used, avail)
            fe.set_vring_kick(0, vq.kick_fd)
            _assert_dropped(d, fe, f"vring 0 {what} at")
        assert "is not in guest memory" in d.log()
    finally:
        vq.close()
        mem.close()
    assert_healthy(d)


def test_ring_started_without_memory_table(d):
    mem = GuestMemory.pc_like(1 << 20)
    vq = SplitVirtqueue(mem, 64)
    try:
        with _frontend(d) as fe:
            _handshake(fe)
            fe.set_vring_num(0, 64)
            fe.set_vring_addr(0, *vq.uaddrs())
            fe.set_vring_kick(0, vq.kick_fd)
            _assert_dropped(d, fe, "vring 0 started without a memory table")
    finally:
        vq.close()
        mem.close()
    assert_healthy(d)


def test_set_features_not_offered(d):
    with _frontend(d) as fe:
        fe.get_features()
        fe.set_features(bit(VIRTIO_F_VERSION_1) | bit(60))
        _assert_dropped(d, fe, "SET_FEATURES asks for bits")
    assert_healthy(d)


def _daemon_fds(d) -> int:
    return len(os.listdir(f"/proc/{d.proc.pid}/fd"))


def _wait_fds_at_most(d, n: int) -> None:
    deadline = time.monotonic() + 5
    while _daemon_fds(d) > n and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _daemon_fds(d) <= n, "the daemon kept file descriptors of a closed connection"


def test_unexpected_fds_are_closed(d):
    """File descriptors riding on messages that take none (or too many) are
    closed, not leaked."""
    wait_no_session(d, "vhost.0")
    baseline = _daemon_fds(d)
    efds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(8)]
    try:
        with connect(d) as dev:
            fe = dev.frontend
            fe.send(R.GET_FEATURES, b"", efds[:3])
            fe.recv_reply(R.GET_FEATURES, size=8)
            fe.send(R.SET_VRING_ENABLE, STATE.pack(0, 1), efds[:8])
            assert fe.ping()
            dev.write(0, b"\x31" * 512)
            fe.send(R.SET_VRING_CALL, U64.pack(0), efds[:2])
            _assert_dropped(d, fe, "SET_VRING_CALL for vring 0 carries 2 file descriptors, expected 1")
    finally:
        for fd in efds:
            os.close(fd)
    wait_no_session(d, "vhost.0")
    _wait_fds_at_most(d, baseline)
    assert_healthy(d)


@pytest.mark.parametrize("cut", ["second_region", "all"])
def test_memory_file_shrunk_under_the_mapping(d, cut):
    """The front-end truncates its RAM file after SET_MEM_TABLE: the daemon's next
    access would SIGBUS.  It must survive, drop that front-end, and keep serving."""
    mem = GuestMemory.pc_like(16 << 20)
    try:
        with connect(d, memory=mem) as dev:
            dev.write(0, b"\x41" * 512)
            r0, r1 = mem.regions
            buf = mem.alloc(4096, 512, region=1)
            hdr = blk_header(mem, VIRTIO_BLK_T_IN, 0)
            st = status_byte(mem)
            vq = dev.queues[0]
            vq.add_chain([(hdr.gpa, 16, False), (buf, 4096, True), (st.gpa, 1, True)])
            # From here on this process must not touch the lost pages either.
            os.ftruncate(r1.fd, r1.mmap_offset if cut == "second_region" else 0)
            vq.kick(force=True)
            _assert_dropped(d, dev.frontend, "guest memory lost its backing pages")
    finally:
        mem.close()
    assert_healthy(d)


# ---------------------------------------------------------------------------
# disconnects
# ---------------------------------------------------------------------------


def test_disconnect_with_io_in_flight(d):
    """Many requests in flight, then the socket closes abruptly: the daemon
    drains, unmaps, and serves the next front-end correctly."""
    for _round in range(3):
        dev = connect(d, num_queues=4, queue_size=128)
        chunk = 16 * 1024
        for q in range(4):
            vq = dev.queues[q]
            mem = dev.memory
            for i in range(40):
                hdr = mem.alloc_bytes(BLK_HDR.pack(VIRTIO_BLK_T_OUT, 0, 8192 + (q * 40 + i) * 32), 16)
                buf = mem.alloc_bytes(bytes([i + 1]) * chunk, 512)
                st = mem.alloc_bytes(b"\xff", 1)
                vq.add_chain([(hdr, 16, False), (buf, chunk, False), (st, 1, True)], publish=False)
            vq.publish()
        for q in range(4):
            dev.queues[q].kick(force=True)
        dev.close()
        wait_no_session(d, "vhost.0")
    d.wait_log("front-end disconnected")
    assert "still in flight" not in d.log()
    with connect(d, num_queues=2) as dev:
        # Every request either completed whole or not at all: each chunk is
        # either all zeros (never written; no other test writes there) or all
        # its byte.
        for q in range(4):
            for i in range(40):
                got = dev.read(8192 + (q * 40 + i) * 32, 32)
                assert got in (bytes(len(got)), bytes([i + 1]) * len(got))
    assert_healthy(d)


def test_disconnect_mid_handshake(d):
    mem = GuestMemory.pc_like(1 << 20)
    vq = SplitVirtqueue(mem, 64)
    try:
        for stop_after in range(5):
            fe = _frontend(d)
            steps = [lambda: _handshake(fe, mem), lambda: fe.set_vring_num(0, 64),
                     lambda: fe.set_vring_addr(0, *vq.uaddrs()),
                     lambda: fe.set_vring_kick(0, vq.kick_fd), lambda: fe.set_vring_call(0, vq.call_fd)]
            for step in steps[:stop_after + 1]:
                step()
            fe.close()
    finally:
        vq.close()
        mem.close()
    assert_healthy(d)


def test_second_frontend_is_refused_while_one_is_served(d):
    with connect(d) as dev:
        fe2 = VhostUserFrontend(d.socket("vhost.0"))
        assert fe2.wait_closed(2.0)    # refused at once, not served
        fe2.close()
        d.wait_log("refused a second front-end connection")
        dev.write(0, b"\x99" * 512)
        assert dev.read(0, 1) == b"\x99" * 512
    assert_healthy(d)


def test_status_ok_after_all_of_the_above(d):
    """Sanity check of the helpers themselves: a normal request reports OK."""
    with connect(d) as dev:
        res = dev.submit(VIRTIO_BLK_T_OUT, 0, b"\x01" * 512)
        assert res.status == VIRTIO_BLK_S_OK and res.used_len == 1
    assert_healthy(d)
