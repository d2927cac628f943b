"""SCSI command emulation of the vhost-scsi controller against SPC-4 / SBC-3, driven
by the fake front-end through a real daemon.

Target 0 is Malloc0 (32768 blocks of 512 bytes), target 1 Malloc1 (2048 blocks of
4096 bytes), both "Malloc disk" (see conftest.setup_targets).
"""

from __future__ import annotations

import hashlib
import os
import struct

import pytest

from vhost_dev_scsi.testing import (
    CHECK_CONDITION,
    F_CHANGE,
    F_HOTPLUG,
    F_INOUT,
    F_T10_PI,
    GOOD,
    ILLEGAL_REQUEST,
    NO_SENSE,
    RESP_SIZE,
    S_BAD_TARGET,
    S_FAILURE,
    S_FUNCTION_COMPLETE,
    S_FUNCTION_REJECTED,
    S_INCORRECT_LUN,
    S_OK,
    START_STOP_UNIT,
    TEST_UNIT_READY,
    TMF_ABORT_TASK,
    TMF_ABORT_TASK_SET,
    TMF_CLEAR_ACA,
    TMF_CLEAR_TASK_SET,
    TMF_I_T_NEXUS_RESET,
    TMF_LOGICAL_UNIT_RESET,
    TMF_QUERY_TASK,
    TMF_QUERY_TASK_SET,
    T_AN_QUERY,
    T_AN_SUBSCRIBE,
    UNIT_ATTENTION,
    connect_scsi,
    inquiry,
    mode_select6,
    mode_select10,
    mode_sense6,
    mode_sense10,
    read_capacity10,
    read_capacity16,
    report_luns,
    request_sense,
    rw6,
    rw10,
    rw12,
    rw16,
    sync_cache10,
    sync_cache16,
    unmap,
    unmap_params,
    write_same10,
    write_same16,
)

GEOMETRY = {0: (512, 32768), 1: (4096, 2048)}
MAX_XFER = 4 << 20
MAX_UNMAP_BYTES = 2 << 30


def good(r, data_len: int | None = None):
    assert (r.response, r.status) == (S_OK, GOOD), r
    assert r.sense_len == 0
    if data_len is not None:
        assert r.used_len == RESP_SIZE + data_len, r
    return r


def checked(r, key: int, asc: int, ascq: int = 0, *, field: int | None = None, cdb: bool = True):
    """CHECK CONDITION with fixed-format sense (SPC-4 4.5.3) carrying key/asc/ascq."""
    assert (r.response, r.status) == (S_OK, CHECK_CONDITION), r
    assert r.sense_len == 18
    s = r.sense
    assert s.response_code == 0x70, s.raw.hex()
    assert s.raw[7] == 10, "additional sense length"
    assert (s.key, s.asc, s.ascq) == (key, asc, ascq), s
    if field is not None:
        assert s.sksv and s.cd == cdb and s.field == field, s.raw.hex()
    return r


def invalid_field(r, field: int):
    return checked(r, ILLEGAL_REQUEST, 0x24, field=field)


def uuid_of(d, bdev: str) -> str:
    return d.rpc("bdev_get_bdevs", name=bdev)[0]["uuid"]


# ---------------------------------------------------------------------- virtio-scsi

def test_config_space_and_features(scsi_dev):
    c = scsi_dev.config
    assert (c.num_queues, c.seg_max, c.max_sectors, c.cmd_per_lun) == (16, 126, 8192, 128)
    assert (c.event_info_size, c.sense_size, c.cdb_size) == (16, 96, 32)
    assert (c.max_channel, c.max_target, c.max_lun) == (0, 7, 0)
    offered = scsi_dev.frontend.features
    assert offered & (1 << F_HOTPLUG) and offered & (1 << F_CHANGE)
    assert not offered & ((1 << F_INOUT) | (1 << F_T10_PI))


def test_config_accepts_the_default_sizes_and_refuses_others(scsi_dev):
    fe = scsi_dev.frontend
    fe.set_config(20, struct.pack("<II", 96, 32))      # what Linux writes at probe
    from vhost_core.testing import VhostUserNack
    with pytest.raises(VhostUserNack):
        fe.set_config(20, struct.pack("<I", 252))
    with pytest.raises(VhostUserNack):
        fe.set_config(0, struct.pack("<I", 1))


def test_missing_target_answers_bad_target(scsi_dev):
    for target in (2, 7):
        r = scsi_dev.command(target, TEST_UNIT_READY)
        assert r.response == S_BAD_TARGET, r
        assert r.used_len == RESP_SIZE


def test_commands_on_every_request_queue(scsi_daemon):
    with connect_scsi(scsi_daemon.socket("vhost.0"), num_queues=4) as dev:
        for q in range(2, 6):
            data = os.urandom(4096)
            good(dev.command(0, rw10(True, 64 * q, 8), data_out=data, queue=q))
            assert good(dev.command(0, rw10(False, 64 * q, 8), data_in_len=4096, queue=q)).data == data
    stats = scsi_daemon.rpc("vhost_get_queue_stats", ctrlr="vhost.0")
    assert all(stats[q]["requests"] >= 2 for q in range(2, 6)), stats


# ---------------------------------------------------------------------- INQUIRY

def test_standard_inquiry(scsi_dev):
    r = good(scsi_dev.command(0, inquiry(96), data_in_len=96), 96)
    b = r.data
    assert b[0] == 0x00, "peripheral qualifier 0, direct access block device"
    assert b[2] == 0x06, "SPC-4"
    assert b[3] & 0x0F == 2, "response data format"
    assert b[4] == 96 - 5
    assert b[7] & 0x02, "CMDQUE"
    assert b[8:16] == b"INTEL   "
    assert b[16:32] == b"Malloc disk     "
    assert b[32:36] == b"0001"
    assert struct.unpack(">3H", b[58:64]) == (0x00A0, 0x0460, 0x04C0)  # SAM-5, SPC-4, SBC-3
    # The allocation length cuts the data; the rest of the buffer is residual.
    r = good(scsi_dev.command(1, inquiry(36), data_in_len=96), 36)
    assert r.data[:36] == b[:36] and r.resid == 60
    r = good(scsi_dev.command(0, inquiry(0), data_in_len=96), 0)
    assert r.resid == 96


def test_inquiry_invalid_fields(scsi_dev):
    invalid_field(scsi_dev.command(0, inquiry(96, evpd=False, page=0x80), data_in_len=96), 2)
    invalid_field(scsi_dev.command(0, inquiry(96, evpd=True, page=0x99), data_in_len=96), 2)
    invalid_field(scsi_dev.command(0, bytes([0x12, 0x02, 0, 0, 96, 0]), data_in_len=96), 1)  # CMDDT


def vpd(dev, target: int, page: int) -> bytes:
    r = good(dev.command(target, inquiry(255, evpd=True, page=page), data_in_len=255))
    b = r.data
    assert b[0] == 0 and b[1] == page
    n = struct.unpack(">H", b[2:4])[0]
    assert r.used_len == RESP_SIZE + 4 + n
    return b[:4 + n]


def test_vpd_supported_pages_and_serial(scsi_dev):
    assert vpd(scsi_dev, 0, 0x00)[4:] == bytes([0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2])
    assert vpd(scsi_dev, 0, 0x80)[4:] == b"Malloc0"
    assert vpd(scsi_dev, 1, 0x80)[4:] == b"Malloc1"


def designators(page: bytes) -> list[tuple[int, int, int, bytes]]:
    out, p = [], page[4:]
    while p:
        code_set, piv_assoc_type, length = p[0] & 0x0F, p[1], p[3]
        out.append((code_set, (piv_assoc_type >> 4) & 3, piv_assoc_type & 0x0F, p[4:4 + length]))
        p = p[4 + length:]
    return out


def test_vpd_device_identification_is_stable_and_from_the_bdev_uuid(scsi_daemon, scsi_dev):
    descs = designators(vpd(scsi_dev, 0, 0x83))
    (naa,) = [d for d in descs if d[2] == 3]
    code_set, assoc, _, ident = naa
    assert code_set == 1 and assoc == 0 and len(ident) == 8
    assert ident[0] >> 4 == 3, "NAA 3h: locally assigned"
    uuid = uuid_of(scsi_daemon, "Malloc0")
    h = int.from_bytes(hashlib.sha256(uuid.encode()).digest()[:8], "big") & ((1 << 60) - 1)
    assert int.from_bytes(ident, "big") == (3 << 60) | h
    (t10,) = [d for d in descs if d[2] == 1]
    assert t10[0] == 2 and t10[3] == b"INTEL   " + uuid.encode()
    assert designators(vpd(scsi_dev, 0, 0x83)) == descs
    other = [d for d in designators(vpd(scsi_dev, 1, 0x83)) if d[2] == 3][0][3]
    assert other != ident


@pytest.mark.parametrize("target", [0, 1])
def test_vpd_block_limits_characteristics_and_provisioning(scsi_dev, target):
    bs, _ = GEOMETRY[target]
    b0 = vpd(scsi_dev, target, 0xB0)
    assert len(b0) == 64 and b0[4] & 0x01, "WSNZ"
    max_xfer, opt_xfer, _prefetch, max_unmap, max_desc, gran = struct.unpack(">IIIIII", b0[8:32])
    assert max_xfer == MAX_XFER // bs
    assert (max_unmap, max_desc, gran) == (MAX_UNMAP_BYTES // bs, 64, 1)
    assert struct.unpack(">Q", b0[36:44])[0] == MAX_UNMAP_BYTES // bs, "MAXIMUM WRITE SAME LENGTH"
    b1 = vpd(scsi_dev, target, 0xB1)
    assert len(b1) == 64 and struct.unpack(">H", b1[4:6])[0] == 1, "non-rotating medium"
    b2 = vpd(scsi_dev, target, 0xB2)
    assert len(b2) == 8
    assert b2[5] & 0xE0 == 0xE0, "LBPU, LBPWS, LBPWS10"
    assert b2[6] & 0x07 == 2, "thin provisioned"


# ---------------------------------------------------------------------- capacity

@pytest.mark.parametrize("target", [0, 1])
def test_read_capacity_10_and_16(scsi_dev, target):
    bs, nb = GEOMETRY[target]
    r = good(scsi_dev.command(target, read_capacity10(), data_in_len=8), 8)
    assert struct.unpack(">II", r.data) == (nb - 1, bs)
    r = good(scsi_dev.command(target, read_capacity16(32), data_in_len=32), 32)
    last, blen, prot, exp, lbp = struct.unpack(">QIBBH", r.data[:16])
    assert (last, blen, prot, exp) == (nb - 1, bs, 0, 0)
    assert lbp & 0x8000, "LBPME"
    assert lbp & 0x3FFF == 0, "lowest aligned LBA"
    r = good(scsi_dev.command(target, read_capacity16(12), data_in_len=32), 12)
    assert r.resid == 20
    invalid_field(scsi_dev.command(target, read_capacity10(lba=5), data_in_len=8), 2)
    good(scsi_dev.command(target, read_capacity10(lba=5, pmi=True), data_in_len=8), 8)
    invalid_field(scsi_dev.command(target, bytes([0x9E, 0x11]) + bytes(14), data_in_len=32), 1)


# ---------------------------------------------------------------------- READ / WRITE

@pytest.mark.parametrize("target", [0, 1])
@pytest.mark.parametrize("size", [6, 10, 12, 16])
def test_write_then_read_round_trips(scsi_dev, target, size):
    bs, _ = GEOMETRY[target]
    cdb = {6: rw6, 10: rw10, 12: rw12, 16: rw16}[size]
    lba, n = 100 + size, 5
    data = os.urandom(n * bs)
    good(scsi_dev.command(target, cdb(True, lba, n), data_out=data, split=1024), 0)
    r = good(scsi_dev.command(target, cdb(False, lba, n), data_in_len=n * bs, split=1536), n * bs)
    assert r.data == data and r.resid == 0
    # Neighbours untouched; a read with a larger buffer reports the residual.
    r = good(scsi_dev.command(target, rw16(False, lba - 1, 1), data_in_len=2 * bs), bs)
    assert r.resid == bs


def test_read6_length_zero_means_256_blocks(scsi_dev):
    data = os.urandom(256 * 512)
    good(scsi_dev.command(0, rw10(True, 2000, 256), data_out=data))
    r = good(scsi_dev.command(0, rw6(False, 2000, 0), data_in_len=256 * 512), 256 * 512)
    assert r.data == data


def test_fua_write_is_good(scsi_dev):
    data = os.urandom(4096)
    good(scsi_dev.command(1, rw16(True, 7, 1, flags=0x08), data_out=data))
    assert good(scsi_dev.command(1, rw10(False, 7, 1, flags=0x10), data_in_len=4096)).data == data


@pytest.mark.parametrize("target", [0, 1])
def test_lba_out_of_range(scsi_dev, target):
    bs, nb = GEOMETRY[target]
    for cdb in (rw10(False, nb, 1), rw16(False, nb - 1, 2), rw16(False, 2**64 - 1, 2),
                rw12(False, 0, nb + 1)):
        r = checked(scsi_dev.command(target, cdb, data_in_len=2 * bs), ILLEGAL_REQUEST, 0x21)
        assert r.resid == 2 * bs and r.data == b"\xee" * 2 * bs
    checked(scsi_dev.command(target, rw10(True, nb, 1), data_out=bytes(bs)), ILLEGAL_REQUEST, 0x21)
    good(scsi_dev.command(target, rw10(False, nb - 1, 1), data_in_len=bs), bs)
    good(scsi_dev.command(target, rw10(False, nb, 0)), 0)      # zero blocks at the end: no transfer


def test_transfer_length_over_the_maximum(scsi_dev):
    r = scsi_dev.command(0, rw16(False, 0, MAX_XFER // 512 + 1), data_in_len=512)
    invalid_field(r, 10)
    invalid_field(scsi_dev.command(0, rw10(False, 0, MAX_XFER // 512 + 1), data_in_len=512), 7)


def test_protection_fields_are_refused(scsi_dev):
    invalid_field(scsi_dev.command(0, rw10(False, 0, 1, flags=0x20), data_in_len=512), 1)
    invalid_field(scsi_dev.command(0, rw16(True, 0, 1, flags=0x40), data_out=bytes(512)), 1)


# ---------------------------------------------------------------------- WRITE SAME / UNMAP / SYNC

def read(dev, target, lba, n):
    bs, _ = GEOMETRY[target]
    step = MAX_XFER // bs
    return b"".join(good(dev.command(target, rw16(False, at, min(step, lba + n - at)),
                                     data_in_len=min(step, lba + n - at) * bs)).data
                    for at in range(lba, lba + n, step))


def fill(dev, target, lba, n):
    bs, _ = GEOMETRY[target]
    data = os.urandom(n * bs)
    good(dev.command(target, rw16(True, lba, n), data_out=data))
    return data


@pytest.mark.parametrize("target", [0, 1])
def test_write_same_writes_the_block_everywhere(scsi_dev, target):
    bs, _ = GEOMETRY[target]
    block = os.urandom(bs)
    fill(scsi_dev, target, 300, 40)
    good(scsi_dev.command(target, write_same10(301, 37), data_out=block, split=bs // 2))
    got = read(scsi_dev, target, 300, 40)
    assert got[bs:38 * bs] == block * 37
    # Long enough to take many bdev I/Os (the block is replicated in chunks).
    good(scsi_dev.command(target, write_same16(400, 1500), data_out=block))
    assert read(scsi_dev, target, 400, 1500) == block * 1500


@pytest.mark.parametrize("flags", [0x00, 0x08, 0x01])   # zeros / zeros + UNMAP / NDOB
def test_write_same_of_zeros(scsi_dev, flags):
    fill(scsi_dev, 0, 3000, 64)
    out = b"" if flags & 0x01 else bytes(512)
    good(scsi_dev.command(0, write_same16(3000, 64, flags=flags), data_out=out))
    assert read(scsi_dev, 0, 3000, 64) == bytes(64 * 512)


def test_write_same_invalid(scsi_dev):
    invalid_field(scsi_dev.command(0, write_same16(0, 0), data_out=bytes(512)), 10)   # WSNZ
    invalid_field(scsi_dev.command(0, write_same10(0, 0), data_out=bytes(512)), 7)
    invalid_field(scsi_dev.command(0, write_same16(0, 1, flags=0x10), data_out=bytes(512)), 1)  # ANCHOR
    invalid_field(scsi_dev.command(0, write_same10(0, 1, flags=0x01), data_out=bytes(512)), 1)
    invalid_field(scsi_dev.command(0, write_same10(0, 1, flags=0x02), data_out=bytes(512)), 1)  # LBDATA
    invalid_field(scsi_dev.command(0, write_same16(0, MAX_UNMAP_BYTES // 512 + 1), data_out=bytes(512)), 10)
    checked(scsi_dev.command(0, write_same16(32767, 2), data_out=bytes(512)), ILLEGAL_REQUEST, 0x21)


@pytest.mark.parametrize("target", [0, 1])
def test_unmap_zeroes_the_ranges(scsi_dev, target):
    bs, _ = GEOMETRY[target]
    before = fill(scsi_dev, target, 500, 30)
    params = unmap_params((502, 3), (510, 10), (520, 0))
    good(scsi_dev.command(target, unmap(len(params)), data_out=params), 0)
    after = read(scsi_dev, target, 500, 30)
    expect = bytearray(before)
    expect[2 * bs:5 * bs] = bytes(3 * bs)
    expect[10 * bs:20 * bs] = bytes(10 * bs)
    assert after == bytes(expect)


def test_unmap_parameter_errors_change_nothing(scsi_dev):
    before = fill(scsi_dev, 0, 700, 8)
    good(scsi_dev.command(0, unmap(0)))
    p = unmap_params((700, 2))
    checked(scsi_dev.command(0, unmap(6), data_out=p), ILLEGAL_REQUEST, 0x1A)          # < 8 bytes
    two = unmap_params((700, 2), (32767, 2))                                           # 2nd range out
    checked(scsi_dev.command(0, unmap(len(two)), data_out=two), ILLEGAL_REQUEST, 0x21)
    invalid_field(scsi_dev.command(0, unmap(len(p), anchor=True), data_out=p), 1)
    many = unmap_params(*[(700, 1)] * 65)
    r = checked(scsi_dev.command(0, unmap(len(many)), data_out=many), ILLEGAL_REQUEST, 0x26)
    assert r.sense.sksv and not r.sense.cd and r.sense.field == 2
    big = unmap_params((0, MAX_UNMAP_BYTES // 512 + 1))
    r = checked(scsi_dev.command(0, unmap(len(big)), data_out=big), ILLEGAL_REQUEST, 0x21)
    assert read(scsi_dev, 0, 700, 8) == before


def test_synchronize_cache(scsi_dev):
    good(scsi_dev.command(0, sync_cache10()))
    good(scsi_dev.command(0, sync_cache16(100, 10)))
    good(scsi_dev.command(1, sync_cache16(2047, 1)))
    checked(scsi_dev.command(1, sync_cache10(2048, 1)), ILLEGAL_REQUEST, 0x21)
    checked(scsi_dev.command(0, sync_cache16(32760, 9)), ILLEGAL_REQUEST, 0x21)


# ---------------------------------------------------------------------- MODE SENSE / SELECT

CACHING = 0x08
CONTROL = 0x0A


def pages(buf: bytes) -> dict[int, bytes]:
    out = {}
    while buf:
        code, length = buf[0] & 0x3F, buf[1]
        out[code] = buf[:2 + length]
        buf = buf[2 + length:]
    return out


@pytest.mark.parametrize("target", [0, 1])
def test_mode_sense6(scsi_dev, target):
    bs, nb = GEOMETRY[target]
    r = good(scsi_dev.command(target, mode_sense6(0x3F), data_in_len=255))
    b = r.data[:r.data[0] + 1]
    assert len(b) == r.used_len - RESP_SIZE
    mdl, medium, devspec, bdl = b[:4]
    assert medium == 0 and devspec & 0x80 == 0, "not write protected"
    assert bdl == 8 and struct.unpack(">I", b[4:8])[0] == nb and int.from_bytes(b[9:12], "big") == bs
    p = pages(b[12:])
    assert sorted(p) == [CACHING, CONTROL]
    assert len(p[CACHING]) == 20 and p[CACHING][2] & 0x04, "WCE: the bdev has a flush"
    assert p[CACHING][2] & 0x01 == 0, "read cache enabled"
    assert len(p[CONTROL]) == 12 and p[CONTROL][2] & 0x04 == 0, "D_SENSE 0: fixed format sense"
    # One page, without block descriptor.
    r = good(scsi_dev.command(target, mode_sense6(CACHING, dbd=True), data_in_len=255))
    assert r.data[3] == 0 and r.data[0] + 1 == 4 + 20 and pages(r.data[4:24]) == {CACHING: p[CACHING]}
    # Changeable values: nothing is.
    r = good(scsi_dev.command(target, mode_sense6(0x3F, pc=1, dbd=True), data_in_len=255))
    assert all(not any(v[2:]) for v in pages(r.data[4:r.data[0] + 1]).values())
    # Default values are the current ones.
    r = good(scsi_dev.command(target, mode_sense6(CONTROL, pc=2, dbd=True), data_in_len=255))
    assert r.data[4:16] == p[CONTROL]
    # Allocation length.
    r = good(scsi_dev.command(target, mode_sense6(0x3F, alloc=4), data_in_len=255), 4)
    assert r.data[0] == len(b) - 1


def test_mode_sense10_with_long_lba_descriptor(scsi_dev):
    r = good(scsi_dev.command(1, mode_sense10(0x3F, llbaa=True), data_in_len=1024))
    b = r.data
    length = struct.unpack(">H", b[:2])[0] + 2
    assert length == r.used_len - RESP_SIZE == 8 + 16 + 20 + 12
    assert b[4] & 0x01, "LONGLBA"
    assert struct.unpack(">H", b[6:8])[0] == 16
    assert struct.unpack(">Q", b[8:16])[0] == 2048 and struct.unpack(">I", b[20:24])[0] == 4096
    assert sorted(pages(b[24:length])) == [CACHING, CONTROL]
    r = good(scsi_dev.command(0, mode_sense10(CONTROL, dbd=True, sub=0xFF), data_in_len=1024))
    assert struct.unpack(">H", r.data[:2])[0] + 2 == 8 + 12


def test_mode_sense_errors(scsi_dev):
    checked(scsi_dev.command(0, mode_sense6(0x3F, pc=3), data_in_len=255), ILLEGAL_REQUEST, 0x39)
    invalid_field(scsi_dev.command(0, mode_sense6(0x19), data_in_len=255), 2)
    invalid_field(scsi_dev.command(0, mode_sense10(CACHING, sub=0x01), data_in_len=255), 3)


def test_mode_select_accepts_current_values_only(scsi_dev):
    r = good(scsi_dev.command(0, mode_sense6(CACHING), data_in_len=255))
    current = r.data[:r.data[0] + 1]
    params = bytes([0]) + current[1:]               # mode data length is reserved in MODE SELECT
    good(scsi_dev.command(0, mode_select6(len(params)), data_out=params))
    good(scsi_dev.command(0, mode_select6(0)))
    # Turning the write cache off is not possible: INVALID FIELD IN PARAMETER LIST at byte 14.
    changed = bytearray(params)
    changed[12 + 2] &= ~0x04
    r = checked(scsi_dev.command(0, mode_select6(len(changed)), data_out=bytes(changed)),
                ILLEGAL_REQUEST, 0x26)
    assert r.sense.sksv and not r.sense.cd and r.sense.field == 14
    invalid_field(scsi_dev.command(0, mode_select6(len(params), sp=True), data_out=params), 1)
    # Wrong block length in the block descriptor.
    bad_bd = bytearray(params)
    bad_bd[4 + 5:4 + 8] = (4096).to_bytes(3, "big")
    checked(scsi_dev.command(0, mode_select6(len(bad_bd)), data_out=bytes(bad_bd)), ILLEGAL_REQUEST, 0x26)
    # A page that runs past the parameter list.
    checked(scsi_dev.command(0, mode_select6(len(params) - 3), data_out=params[:-3]), ILLEGAL_REQUEST, 0x1A)
    # MODE SELECT (10) of the control page.
    r = good(scsi_dev.command(0, mode_sense10(CONTROL, dbd=True), data_in_len=255))
    p10 = bytes(2) + r.data[2:8 + 12]
    good(scsi_dev.command(0, mode_select10(len(p10)), data_out=p10))


# ---------------------------------------------------------------------- the rest of SPC

def test_report_luns(scsi_dev):
    r = good(scsi_dev.command(0, report_luns(), data_in_len=256), 16)
    assert r.data[:16] == struct.pack(">II", 8, 0) + bytes(8)
    r = good(scsi_dev.command(1, report_luns(select=2), data_in_len=256), 16)
    assert struct.unpack(">I", r.data[:4])[0] == 8
    r = good(scsi_dev.command(0, report_luns(select=1), data_in_len=256), 8)
    assert r.data[:8] == bytes(8), "no well-known logical units"
    invalid_field(scsi_dev.command(0, report_luns(alloc=15), data_in_len=256), 6)
    invalid_field(scsi_dev.command(0, report_luns(select=0x10), data_in_len=256), 2)


def test_test_unit_ready_start_stop_and_request_sense(scsi_dev):
    good(scsi_dev.command(0, TEST_UNIT_READY), 0)
    good(scsi_dev.command(1, START_STOP_UNIT), 0)
    r = good(scsi_dev.command(0, request_sense(), data_in_len=252), 18)
    assert r.data[0] == 0x70 and r.data[2] == NO_SENSE and r.data[7] == 10 and r.data[12:14] == b"\0\0"
    invalid_field(scsi_dev.command(0, request_sense(desc=True), data_in_len=252), 1)


@pytest.mark.parametrize("cdb", [bytes([0x04]) + bytes(5),          # FORMAT UNIT
                                 bytes([0x2F]) + bytes(9),          # VERIFY (10)
                                 bytes([0xA3, 0x0C]) + bytes(10),   # REPORT SUPPORTED OPERATION CODES
                                 bytes([0x7F]) + bytes(31),         # variable length CDB
                                 bytes([0xC0]) + bytes(15)])        # vendor specific
def test_unsupported_commands_are_invalid_operation_codes(scsi_dev, cdb):
    r = checked(scsi_dev.command(0, cdb, data_in_len=64), ILLEGAL_REQUEST, 0x20, field=0)
    assert r.resid == 64 and r.data == b"\xee" * 64


def test_naca_is_refused(scsi_dev):
    invalid_field(scsi_dev.command(0, bytes([0x00, 0, 0, 0, 0, 0x04])), 5)
    invalid_field(scsi_dev.command(0, rw10(False, 0, 1)[:9] + b"\x04", data_in_len=512), 9)


def test_lun_other_than_zero_is_not_present(scsi_dev):
    r = good(scsi_dev.command(0, inquiry(96), lun=1, data_in_len=96), 96)
    assert r.data[0] == 0x7F, "peripheral qualifier 011b, no device type"
    checked(scsi_dev.command(0, inquiry(96, evpd=True), lun=1, data_in_len=96), ILLEGAL_REQUEST, 0x25)
    checked(scsi_dev.command(0, TEST_UNIT_READY, lun=1), ILLEGAL_REQUEST, 0x25)
    checked(scsi_dev.command(1, rw10(False, 0, 1), lun=255, data_in_len=4096), ILLEGAL_REQUEST, 0x25)
    r = good(scsi_dev.command(0, request_sense(), lun=3, data_in_len=252), 18)
    assert (r.data[2] & 0x0F, r.data[12], r.data[13]) == (ILLEGAL_REQUEST, 0x25, 0)
    r = good(scsi_dev.command(0, report_luns(), lun=1, data_in_len=256), 16)
    assert r.data[:16] == struct.pack(">II", 8, 0) + bytes(8)
    # LUN 0 in peripheral device addressing is LUN 0 too.
    good(scsi_dev.command(0, TEST_UNIT_READY, lun_raw=bytes([1, 0, 0, 0, 0, 0, 0, 0])))


# ---------------------------------------------------------------------- task management

def test_lun_reset_completes_and_raises_a_unit_attention(scsi_dev):
    assert scsi_dev.tmf(0, TMF_LOGICAL_UNIT_RESET) == S_FUNCTION_COMPLETE
    # INQUIRY neither reports nor clears it; the next other command reports it once.
    good(scsi_dev.command(0, inquiry(36), data_in_len=36))
    checked(scsi_dev.command(0, TEST_UNIT_READY), UNIT_ATTENTION, 0x29, 0x03)
    good(scsi_dev.command(0, TEST_UNIT_READY))
    good(scsi_dev.command(1, TEST_UNIT_READY))      # the other target saw no reset
    assert scsi_dev.tmf(1, TMF_I_T_NEXUS_RESET) == S_FUNCTION_COMPLETE
    r = good(scsi_dev.command(1, request_sense(), data_in_len=18), 18)   # REQUEST SENSE reports and clears
    assert (r.data[2] & 0x0F, r.data[12], r.data[13]) == (UNIT_ATTENTION, 0x29, 0x07)
    good(scsi_dev.command(1, TEST_UNIT_READY))


def test_other_task_management_functions(scsi_dev):
    for f in (TMF_ABORT_TASK, TMF_ABORT_TASK_SET, TMF_CLEAR_TASK_SET):
        assert scsi_dev.tmf(0, f) == S_FUNCTION_COMPLETE
    good(scsi_dev.command(0, TEST_UNIT_READY))      # aborts leave no unit attention
    for f in (TMF_CLEAR_ACA, TMF_QUERY_TASK, TMF_QUERY_TASK_SET, 99):
        assert scsi_dev.tmf(0, f) == S_FUNCTION_REJECTED
    assert scsi_dev.tmf(4, TMF_LOGICAL_UNIT_RESET) == S_BAD_TARGET
    assert scsi_dev.tmf(0, TMF_LOGICAL_UNIT_RESET, lun=2) == S_INCORRECT_LUN
    good(scsi_dev.command(0, TEST_UNIT_READY))      # the rejected reset set nothing


def test_asynchronous_notification_requests(scsi_dev):
    assert scsi_dev.an(T_AN_QUERY, 0) == (0, S_OK)
    assert scsi_dev.an(T_AN_SUBSCRIBE, 1, events=0x7E) == (0, S_OK)
    assert scsi_dev.an(T_AN_QUERY, 5)[1] == S_BAD_TARGET


def test_truncated_task_management_request_fails(scsi_dev):
    mem = scsi_dev.memory
    req = mem.alloc_bytes(struct.pack("<II", 0, TMF_LOGICAL_UNIT_RESET))
    resp = mem.alloc(1)
    assert scsi_dev.chain(0, [(req, 8, False), (resp, 1, True)]) == 1
    assert mem.read(resp, 1)[0] == S_FAILURE
