"""Requests a well-behaved virtio-scsi driver never sends: the controller answers
each with an error (or an empty completion when there is nowhere to put one),
touches no guest byte outside the buffers the chain gave it, and keeps serving.
"""

from __future__ import annotations

import os
import struct

import pytest

from vhost_dev_scsi.testing import (
    CHECK_CONDITION,
    EVENT,
    GOOD,
    ILLEGAL_REQUEST,
    REQ_HDR,
    RESP_SIZE,
    S_BAD_TARGET,
    S_FAILURE,
    S_OK,
    S_OVERRUN,
    TEST_UNIT_READY,
    connect_scsi,
    inquiry,
    lun_bytes,
    mode_select6,
    mode_sense6,
    report_luns,
    rw6,
    rw10,
    rw12,
    rw16,
    unmap,
    unmap_params,
    write_same16,
)

GUARD = 256
#: VN_MAX_TRANSFER: config max_sectors and the Block Limits VPD page state it.
MAX_XFER = 4 << 20
MAX_UNMAP_BYTES = 2 << 30


class Guarded:
    """``n`` bytes with 0xA5 guard bytes on both sides."""

    def __init__(self, mem, n: int, fill: int = 0xEE) -> None:
        self.mem, self.n = mem, n
        self.base = mem.alloc(n + 2 * GUARD, 512, zero=False)
        mem.fill(self.base, n + 2 * GUARD, 0xA5)
        self.gpa = self.base + GUARD
        if n:
            mem.fill(self.gpa, n, fill)

    def read(self) -> bytes:
        return self.mem.read(self.gpa, self.n)

    def guards_intact(self) -> bool:
        m = self.mem
        guard = b"\xa5" * GUARD
        return m.read(self.base, GUARD) == guard and m.read(self.gpa + self.n, GUARD) == guard


def header(target: int, cdb: bytes, lun: bytes | None = None) -> bytes:
    return REQ_HDR.pack(lun if lun is not None else lun_bytes(target), 1, 0, 0, 0, cdb.ljust(32, b"\0"))


def parse_resp(raw: bytes):
    sense_len, resid, _sq, status, response = struct.unpack_from("<IIHBB", raw)
    return response, status, resid, raw[12:12 + sense_len]


def marker(dev, lba: int = 900) -> bytes:
    data = os.urandom(512)
    r = dev.command(0, rw10(True, lba, 1), data_out=data)
    assert (r.response, r.status) == (S_OK, GOOD)
    return data


def healthy(dev, lba: int = 900, data: bytes | None = None) -> None:
    r = dev.command(0, rw10(False, lba, 1), data_in_len=512)
    assert (r.response, r.status) == (S_OK, GOOD)
    if data is not None:
        assert r.data == data


@pytest.mark.parametrize("resp_len", [0, 1, 12, 107])
def test_response_buffer_shorter_than_the_response_header(scsi_dev, resp_len):
    mem = scsi_dev.memory
    hdr = mem.alloc_bytes(header(0, rw10(False, 0, 1)))
    bufs = [(hdr, 51, False)]
    resp = Guarded(mem, resp_len)
    if resp_len:
        bufs.append((resp.gpa, resp_len, True))
    assert scsi_dev.chain(2, bufs) == 0
    assert resp.read() == b"\xee" * resp_len and resp.guards_intact()
    healthy(scsi_dev)


def test_request_header_shorter_than_its_layout(scsi_dev):
    mem = scsi_dev.memory
    for n in (1, 8, 18, 50):
        hdr = mem.alloc_bytes(header(0, TEST_UNIT_READY)[:n])
        resp = Guarded(mem, RESP_SIZE)
        assert scsi_dev.chain(2, [(hdr, n, False), (resp.gpa, RESP_SIZE, True)]) == RESP_SIZE
        assert parse_resp(resp.read())[0] == S_FAILURE
        assert resp.guards_intact()


def test_header_split_into_one_byte_descriptors_is_reassembled(scsi_dev):
    mem = scsi_dev.memory
    hdr_bytes = header(0, inquiry(36))
    hdr = mem.alloc_bytes(hdr_bytes)
    resp = Guarded(mem, RESP_SIZE + 36)
    bufs = [(hdr + i, 1, False) for i in range(51)] + [(resp.gpa + i, 1, True) for i in range(RESP_SIZE + 36)]
    assert scsi_dev.chain(2, bufs, indirect=True) == RESP_SIZE + 36
    raw = resp.read()
    assert parse_resp(raw)[:2] == (S_OK, GOOD)
    assert raw[RESP_SIZE + 8:RESP_SIZE + 16] == b"INTEL   " and resp.guards_intact()


def test_data_in_and_data_out_both_set_fail_and_move_nothing(scsi_dev):
    before = marker(scsi_dev)
    mem = scsi_dev.memory
    for cdb in (rw10(False, 900, 1), rw10(True, 900, 1), inquiry(36)):
        hdr = mem.alloc_bytes(header(0, cdb))
        out = mem.alloc_bytes(os.urandom(512))
        resp = Guarded(mem, RESP_SIZE)
        din = Guarded(mem, 512)
        used = scsi_dev.chain(2, [(hdr, 51, False), (out, 512, False), (resp.gpa, RESP_SIZE, True),
                                  (din.gpa, 512, True)])
        assert used == RESP_SIZE
        assert parse_resp(resp.read())[0] == S_FAILURE
        assert din.read() == b"\xee" * 512 and din.guards_intact()
    healthy(scsi_dev, data=before)


def test_read_longer_than_the_buffer_is_an_overrun(scsi_dev):
    before = marker(scsi_dev)
    r = scsi_dev.command(0, rw10(False, 900, 8), data_in_len=8 * 512 - 1)
    assert r.response == S_OVERRUN and r.used_len == RESP_SIZE
    assert r.data == b"\xee" * (8 * 512 - 1), "not a byte of data written"
    r = scsi_dev.command(0, rw16(False, 900, 1))                 # no buffer at all
    assert r.response == S_OVERRUN
    r = scsi_dev.command(0, rw10(True, 900, 2), data_out=os.urandom(1000))
    assert r.response == S_OVERRUN
    healthy(scsi_dev, data=before)


def test_buffer_longer_than_the_transfer_reports_the_residual(scsi_dev):
    before = marker(scsi_dev)
    r = scsi_dev.command(0, rw10(False, 900, 1), data_in_len=8192)
    assert (r.response, r.status, r.resid, r.used_len) == (S_OK, GOOD, 8192 - 512, RESP_SIZE + 512)
    assert r.data[:512] == before and r.data[512:] == b"\xee" * (8192 - 512)
    data = os.urandom(512)
    r = scsi_dev.command(0, rw10(True, 901, 1), data_out=data + os.urandom(1536))
    assert (r.response, r.status, r.resid) == (S_OK, GOOD, 1536)
    healthy(scsi_dev, lba=901, data=data)


def test_allocation_length_larger_than_the_buffer(scsi_dev):
    mem = scsi_dev.memory
    for cdb, n in ((inquiry(255), 10), (mode_sense6(0x3F, alloc=255), 7), (report_luns(0xFFFFFFFF), 16),
                   (inquiry(0xFFFF, evpd=True, page=0x83), 5)):
        hdr = mem.alloc_bytes(header(0, cdb))
        resp = Guarded(mem, RESP_SIZE)
        din = Guarded(mem, n)
        used = scsi_dev.chain(2, [(hdr, 51, False), (resp.gpa, RESP_SIZE, True), (din.gpa, n, True)])
        response, status, resid, _ = parse_resp(resp.read())
        assert (response, status, resid, used) == (S_OK, GOOD, 0, RESP_SIZE + n)
        assert din.guards_intact() and resp.guards_intact()


def test_parameter_list_longer_than_the_data_out_buffer(scsi_dev):
    p = unmap_params((900, 1))
    assert scsi_dev.command(0, unmap(len(p) + 16), data_out=p).response == S_OVERRUN
    r = scsi_dev.command(0, mode_sense6(0x08), data_in_len=255)
    params = bytes([0]) + r.data[1:r.data[0] + 1]
    assert scsi_dev.command(0, mode_select6(len(params) + 1), data_out=params).response == S_OVERRUN
    # A block descriptor data length larger than the list: only complete descriptors count.
    lying = bytearray(p)
    lying[2:4] = struct.pack(">H", 4096)
    r = scsi_dev.command(0, unmap(len(p)), data_out=bytes(lying))
    assert (r.response, r.status) == (S_OK, GOOD)
    healthy(scsi_dev, data=bytes(512))


@pytest.mark.parametrize("lun", [bytes([0, 0, 0x40, 0, 0, 0, 0, 0]),        # not the single-level format
                                 bytes([0xFF] * 8),
                                 bytes([1, 8, 0x40, 0, 0, 0, 0, 0]),        # target 8 does not exist
                                 bytes([1, 255, 0x40, 0, 0, 0, 0, 0])])
def test_lun_field_garbage_naming_no_target(scsi_dev, lun):
    r = scsi_dev.command(0, TEST_UNIT_READY, lun_raw=lun)
    assert r.response == S_BAD_TARGET and r.used_len == RESP_SIZE


@pytest.mark.parametrize("lun", [bytes([1, 0, 0x80, 0, 0, 0, 0, 0]),        # logical unit addressing
                                 bytes([1, 0, 0xC0, 0, 0, 0, 0, 0]),        # extended addressing
                                 bytes([1, 0, 0x05, 0, 0, 0, 0, 0]),        # peripheral, bus 5
                                 bytes([1, 0, 0x40, 0, 0, 0, 0, 1])])       # second level set
def test_lun_field_garbage_on_a_present_target(scsi_dev, lun):
    r = scsi_dev.command(0, TEST_UNIT_READY, lun_raw=lun)
    assert (r.response, r.status) == (S_OK, CHECK_CONDITION)
    assert (r.sense.key, r.sense.asc) == (ILLEGAL_REQUEST, 0x25)
    r = scsi_dev.command(0, inquiry(36), lun_raw=lun, data_in_len=36)
    assert r.data[0] == 0x7F


def test_descriptor_outside_guest_memory(scsi_dev):
    mem = scsi_dev.memory
    hdr = mem.alloc_bytes(header(0, rw10(False, 0, 1)))
    resp = Guarded(mem, RESP_SIZE)
    assert scsi_dev.chain(2, [(hdr, 51, False), (resp.gpa, RESP_SIZE, True), (1 << 50, 512, True)]) == 0
    assert resp.read() == b"\xee" * RESP_SIZE
    healthy(scsi_dev)


def test_control_and_event_queue_garbage(scsi_dev):
    mem = scsi_dev.memory
    # Unknown control request type; a TMF without room for its response; an empty request.
    req = mem.alloc_bytes(struct.pack("<I", 77) + bytes(20))
    resp = Guarded(mem, 8)
    assert scsi_dev.chain(0, [(req, 24, False), (resp.gpa, 8, True)]) == 0
    assert resp.read() == b"\xee" * 8
    tmf = mem.alloc_bytes(struct.pack("<II8sQ", 0, 5, lun_bytes(0), 0))
    assert scsi_dev.chain(0, [(tmf, 24, False)]) == 0
    assert scsi_dev.chain(0, [(resp.gpa, 8, True)]) == 0
    # An AN request whose response does not fit.
    an = mem.alloc_bytes(struct.pack("<I8sI", 1, lun_bytes(0), 0))
    assert scsi_dev.chain(0, [(an, 16, False), (resp.gpa, 4, True)]) == 0
    assert resp.guards_intact()
    # Event buffers smaller than an event come back at once, unwritten.
    ev = Guarded(mem, 8)
    assert scsi_dev.chain(1, [(ev.gpa, 8, True)]) == 0
    assert ev.read() == b"\xee" * 8 and ev.guards_intact()
    assert EVENT.size == 16
    healthy(scsi_dev)


def test_a_hostile_session_leaves_the_controller_serving_the_next_one(scsi_daemon):
    with connect_scsi(scsi_daemon.socket("vhost.0"), post_events=8) as dev:
        mem = dev.memory
        hdr = mem.alloc_bytes(header(0, rw10(True, 0, 1)))
        dev.queues[2].add_chain([(hdr, 51, False)])            # no response buffer: never answered well
        dev.queues[2].kick()
        dev.queues[2].wait_used(5)
    from vhost_dev_scsi.testing import wait_no_session
    wait_no_session(scsi_daemon, "vhost.0")
    with connect_scsi(scsi_daemon.socket("vhost.0"), num_queues=2) as dev:
        data = os.urandom(4096)
        r = dev.command(1, rw10(True, 5, 1), data_out=data, queue=3)
        assert (r.response, r.status) == (S_OK, GOOD)
        assert dev.command(1, rw10(False, 5, 1), data_in_len=4096, queue=2).data == data
    assert scsi_daemon.alive()
    assert "Traceback" not in scsi_daemon.log()


# ---------------------------------------------------------------- request size

def invalid_cdb_field(r, field: int) -> None:
    assert (r.response, r.status) == (S_OK, CHECK_CONDITION), r
    assert (r.sense.key, r.sense.asc, r.sense.ascq) == (ILLEGAL_REQUEST, 0x24, 0), r
    assert r.sense.sksv and r.sense.cd and r.sense.field == field, r.sense.raw.hex()


@pytest.mark.parametrize("write", [False, True], ids=["read", "write"])
@pytest.mark.parametrize("size, field", [(10, 7), (12, 6), (16, 10)])
def test_transfer_one_block_over_the_maximum_moves_nothing(scsi_dev, write, size, field):
    """The buffer holds the whole transfer and the LBA range is on the disk: only the
    length is wrong, and the command fails before the bdev sees it."""
    cdb = {10: rw10, 12: rw12, 16: rw16}[size]
    before = marker(scsi_dev)
    n = MAX_XFER // 512 + 1
    if write:
        r = scsi_dev.command(0, cdb(True, 0, n), data_out=b"\x5a" * (n * 512))
        assert r.resid == n * 512
    else:
        r = scsi_dev.command(0, cdb(False, 0, n), data_in_len=n * 512)
        assert r.used_len == RESP_SIZE and r.resid == n * 512
        assert r.data == b"\xee" * (n * 512), "data-in written"
    invalid_cdb_field(r, field)
    healthy(scsi_dev, data=before)


def test_transfer_lengths_the_cdb_can_hold_move_nothing(scsi_dev):
    """The largest length of each CDB, with a small buffer: refused (too long, or past
    the end of the disk) before any byte moves, whatever the buffer."""
    before = marker(scsi_dev)
    mem = scsi_dev.memory
    for cdb in (rw10(False, 0, 0xFFFF), rw10(True, 0, 0xFFFF), rw12(False, 0, 0xFFFFFFFF),
                rw12(True, 0, 0xFFFFFFFF), rw16(False, 0, 0xFFFFFFFF), rw16(True, 2**63, 0xFFFFFFFF),
                rw6(True, 0, 0)):           # 256 blocks: within the limit, but no buffer for them
        for din, dout in ((4096, 0), (0, 4096), (0, 0)):
            hdr = mem.alloc_bytes(header(0, cdb))
            bufs = [(hdr, 51, False)]
            out = Guarded(mem, dout, fill=0x5A)
            if dout:
                bufs.append((out.gpa, dout, False))
            resp = Guarded(mem, RESP_SIZE)
            bufs.append((resp.gpa, RESP_SIZE, True))
            data = Guarded(mem, din)
            if din:
                bufs.append((data.gpa, din, True))
            used = scsi_dev.chain(2, bufs)
            response, status, _resid, sense = parse_resp(resp.read())
            assert used == RESP_SIZE
            if status == CHECK_CONDITION:
                assert response == S_OK and sense[2] & 0x0F == ILLEGAL_REQUEST and sense[12] in (0x21, 0x24)
            else:
                assert response == S_OVERRUN, (cdb.hex(), din, dout, response, status)
            assert data.read() == b"\xee" * din and data.guards_intact() and resp.guards_intact()
    healthy(scsi_dev, data=before)


LONG = b"\xff" * 4
UNSUPPORTED_DATA_COMMANDS = {
    "compare-and-write": bytes([0x89]) + bytes(12) + b"\xff" + bytes(2),
    "write-and-verify-10": bytes([0x2E]) + bytes(6) + b"\xff\xff\x00",
    "write-and-verify-16": bytes([0x8E]) + bytes(9) + LONG + bytes(2),
    "verify-16": bytes([0x8F]) + bytes(9) + LONG + bytes(2),
    "orwrite-16": bytes([0x8B]) + bytes(9) + LONG + bytes(2),
    "write-atomic-16": bytes([0x9C]) + bytes(9) + LONG + bytes(2),
    "write-32": bytes([0x7F]) + bytes(6) + bytes([0x18, 0x00, 0x0B]) + bytes(18) + LONG,
}


@pytest.mark.parametrize("cdb", list(UNSUPPORTED_DATA_COMMANDS.values()), ids=list(UNSUPPORTED_DATA_COMMANDS))
def test_unsupported_data_commands_move_nothing(scsi_dev, cdb):
    before = marker(scsi_dev)
    r = scsi_dev.command(0, cdb, data_out=b"\x5a" * 8192)
    assert (r.response, r.status, r.sense.key, r.sense.asc) == (S_OK, CHECK_CONDITION, ILLEGAL_REQUEST, 0x20)
    healthy(scsi_dev, data=before)


def test_unmap_block_count_is_bounded_for_the_whole_list(scsi_daemon):
    """MAXIMUM UNMAP LBA COUNT (Block Limits VPD page) bounds the sum of the
    descriptors (SBC-3, UNMAP), not each one: 64 descriptors of the maximum would
    be 64 times the work.  On a 1 GiB null bdev, two descriptors reach it."""
    d = scsi_daemon
    blocks = 1 << 21
    assert 2 * blocks * 512 == MAX_UNMAP_BYTES
    d.rpc("bdev_null_create", name="NullU", num_blocks=blocks, block_size=512)
    d.rpc("vhost_create_scsi_controller", ctrlr="vhost.u")
    try:
        d.rpc("vhost_scsi_controller_add_target", ctrlr="vhost.u", scsi_target_num=0, bdev_name="NullU")
        with connect_scsi(d.socket("vhost.u")) as dev:
            dev.command(0, TEST_UNIT_READY)
            over = unmap_params((0, blocks), (0, blocks), (blocks - 1, 1))
            r = dev.command(0, unmap(len(over)), data_out=over)
            assert (r.response, r.status) == (S_OK, CHECK_CONDITION), r
            assert (r.sense.key, r.sense.asc) == (ILLEGAL_REQUEST, 0x26), r
            assert r.sense.sksv and not r.sense.cd and r.sense.field == 8 + 16 * 2 + 8, r.sense.raw.hex()
            exact = unmap_params((0, blocks), (0, blocks))
            r = dev.command(0, unmap(len(exact)), data_out=exact)
            assert (r.response, r.status) == (S_OK, GOOD), r
    finally:
        d.rpc("vhost_scsi_controller_remove_target", ctrlr="vhost.u", scsi_target_num=0)
        d.rpc("vhost_delete_controller", ctrlr="vhost.u")
        d.rpc("bdev_null_delete", name="NullU")


@pytest.mark.parametrize("kind, count", [("write-same", 1), ("unmap", 1), ("write-same", 3)])
def test_a_command_that_copies_the_whole_disk_does_not_hold_up_the_next(scsi_dev, kind, count):
    """A malloc bdev copies and zeroes on the reactor: a WRITE SAME or UNMAP over the
    whole 16 MiB disk gets VN_MAX_TRANSFER of that per reactor iteration (and
    several such commands take turns), so a READ posted right behind them, in the
    same kick, completes first."""
    mem, vq = scsi_dev.memory, scsi_dev.queues[2]
    nb = 32768
    block = bytes(range(256)) * 2
    if kind == "write-same":
        cdb, out = write_same16(0, nb), block
    else:
        out = unmap_params(*[(i * 512, 512) for i in range(64)])
        cdb = unmap(len(out))
    big, big_resps = [], []
    for _ in range(count):
        hdr, data, resp = mem.alloc_bytes(header(0, cdb)), mem.alloc_bytes(out), Guarded(mem, RESP_SIZE)
        big.append(vq.add_chain([(hdr, 51, False), (data, len(out), False), (resp.gpa, RESP_SIZE, True)],
                                publish=False))
        big_resps.append(resp)
    rd_hdr = mem.alloc_bytes(header(0, rw10(False, 900, 1)))
    rd_resp, rd_data = Guarded(mem, RESP_SIZE), Guarded(mem, 512)
    rd = vq.add_chain([(rd_hdr, 51, False), (rd_resp.gpa, RESP_SIZE, True), (rd_data.gpa, 512, True)],
                      publish=False)
    vq.publish()
    vq.kick(force=True)
    done = vq.wait_used(10, min_count=count + 1)
    assert done[0].head == rd and sorted(el.head for el in done[1:]) == sorted(big)
    assert parse_resp(rd_resp.read())[:2] == (S_OK, GOOD)
    assert all(parse_resp(r.read())[:2] == (S_OK, GOOD) for r in big_resps)
    expect = block if kind == "write-same" else bytes(512)
    for lba in (0, 8191, 8192, 8193, 16384, nb - 1):
        healthy(scsi_dev, lba=lba, data=expect)
