#!/usr/bin/env python3
"""Write the seed corpora of the native fuzz targets into fuzz/corpus/<target>/.

The seeds are committed; this script is how they were made, and how to remake
them after an input format changes (each target's .c file documents its
format).  A seed is a well-formed request of every kind a target handles, so
that fuzzing starts from the interesting code instead of rediscovering the
ring layout or a CDB's opcode by chance.

    python3 fuzz/make_seeds.py            # rewrites every seed file
"""

from __future__ import annotations

import struct
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"

NEXT, WRITE, INDIRECT = 1, 2, 4
MEM_SIZE = 64 << 10


def write(target: str, name: str, data: bytes) -> None:
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / f"seed-{name}").write_bytes(data)


# --------------------------------------------------------------------- rings

class Ring:
    """A guest memory image with a split ring at GPA 0, as the targets place it."""

    def __init__(self, qsize: int, event_idx: bool = False) -> None:
        self.qsize = qsize
        self.img = bytearray(MEM_SIZE)
        self.avail = 16 * qsize
        self.used = (self.avail + 4 + 2 * qsize + 2 + 3) & ~3
        self.nd = 0
        self.heads: list[int] = []
        self.event_idx = event_idx

    def desc(self, i: int, addr: int, length: int, flags: int, nxt: int = 0, table: int = 0) -> None:
        struct.pack_into("<QIHH", self.img, table + 16 * i, addr, length, flags, nxt)

    def chain(self, segs: list[tuple[int, int, bool]]) -> int:
        """Descriptors for [(gpa, len, writable)], linked; returns the head."""
        head = self.nd
        for k, (gpa, length, w) in enumerate(segs):
            last = k == len(segs) - 1
            self.desc(self.nd, gpa, length, (WRITE if w else 0) | (0 if last else NEXT), self.nd + 1)
            self.nd += 1
        return head

    def indirect(self, table_gpa: int, segs: list[tuple[int, int, bool]]) -> int:
        for k, (gpa, length, w) in enumerate(segs):
            last = k == len(segs) - 1
            self.desc(k, gpa, length, (WRITE if w else 0) | (0 if last else NEXT), k + 1, table=table_gpa)
        head = self.nd
        self.desc(head, table_gpa, 16 * len(segs), INDIRECT)
        self.nd += 1
        return head

    def make_available(self, heads: list[int], base: int = 0) -> None:
        for k, h in enumerate(heads):
            struct.pack_into("<H", self.img, self.avail + 4 + 2 * ((base + k) % self.qsize), h)
        struct.pack_into("<H", self.img, self.avail + 2, (base + len(heads)) & 0xFFFF)

    def image(self) -> bytes:
        return bytes(self.img).rstrip(b"\0")


def qlog2(n: int) -> int:
    return n.bit_length() - 1


def walker_seed(ring: Ring, *, flags: int = 0, layout: int = 0, policy: int = 0, base: int = 0,
                rounds: int = 1, written: int = 1, call: bool = False) -> bytes:
    hdr = bytes([qlog2(ring.qsize), flags, layout, policy]) + struct.pack("<H", base) \
        + bytes([rounds - 1, written, 0, 1 if call else 0]) + bytes(6)
    return hdr + bytes(64) + ring.image()


def walker_seeds() -> None:
    r = Ring(8)
    r.make_available([r.chain([(0x4000, 16, False), (0x5000, 512, True), (0x6000, 1, True)])])
    write("vq_walker", "one-chain", walker_seed(r))

    r = Ring(8)
    h = r.indirect(0x3000, [(0x4000, 16, False), (0x5000, 4096, True), (0x6000, 1, True)])
    r.make_available([h])
    write("vq_walker", "indirect", walker_seed(r, flags=2))

    # 0x8000 is where the ADJACENT layout's two regions meet in GPA.
    r = Ring(16)
    r.make_available([r.chain([(0x7f00, 0x200, False), (0x9000, 1, True)])])
    write("vq_walker", "crosses-regions", walker_seed(r, layout=1))

    r = Ring(32, event_idx=True)
    heads = [r.chain([(0x4000 + 64 * i, 16, False), (0x6000 + 64 * i, 64, True)]) for i in range(12)]
    r.make_available(heads, base=65530)
    write("vq_walker", "event-idx-deferred-wrap",
          walker_seed(r, flags=1 | 4 | 8, policy=1 | 4, base=65530, rounds=4, call=True))

    r = Ring(8)
    r.desc(0, 0x4000, 16, NEXT, 9)     # next past the table: the ring is broken
    r.make_available([0])
    write("vq_walker", "next-out-of-range", walker_seed(r))

    r = Ring(8)
    r.make_available([r.chain([(0x4000, 16, False), (0x20000, 512, True), (0x6000, 1, True)])])
    write("vq_walker", "outside-memory", walker_seed(r))
    packed_walker_seeds()


def packed_image(qsize: int, bufs: list[list[tuple[int, int, int]]], *, buf_id0: int = 0,
                 start: int = 0, wrap: int = 1, tables: dict[int, list[tuple[int, int, int]]] | None = None) -> bytes:
    """A packed ring at GPA 0: each buffer's descriptors [(gpa, len, flags)] made available
    from ring position ``start`` with wrap counter ``wrap`` (one id per buffer), and
    indirect tables (packed format) at the GPAs given."""
    img = bytearray(MEM_SIZE)
    pos, w = start, wrap
    for k, descs in enumerate(bufs):
        for gpa, length, flags in descs:
            avail = (1 << 7) if w else (1 << 15)
            struct.pack_into("<QIHH", img, 16 * pos, gpa, length, buf_id0 + k, flags | avail)
            pos += 1
            if pos == qsize:
                pos, w = 0, w ^ 1
    for table, descs in (tables or {}).items():
        for i, (gpa, length, flags) in enumerate(descs):
            struct.pack_into("<QIHH", img, table + 16 * i, gpa, length, 0, flags)
    return bytes(img).rstrip(b"\0")


def packed_walker_seeds() -> None:
    """Packed rings (header flag 16): a chain, an indirect table, chains wrapping the ring."""
    blk = [(0x4000, 16, NEXT), (0x5000, 512, NEXT | WRITE), (0x6000, 1, WRITE)]
    hdr = bytes([qlog2(8), 16, 0, 0]) + struct.pack("<H", 0x8000) + bytes([0, 1, 0, 0]) + bytes(6)
    write("vq_walker", "packed-one-chain", hdr + bytes(64) + packed_image(8, [blk]))
    hdr = bytes([qlog2(8), 16 | 2, 0, 1 | 4]) + struct.pack("<H", 0x8000) + bytes([1, 1, 0, 1]) + bytes(6)
    write("vq_walker", "packed-indirect", hdr + bytes(64) + packed_image(
        8, [[(0x3000, 48, INDIRECT)]], tables={0x3000: [(0x4000, 16, 0), (0x5000, 4096, WRITE), (0x6000, 1, WRITE)]}))
    # Five buffers from position 6 of a 16-entry ring: they wrap; completions out of order.
    bufs = [[(0x4000 + 64 * i, 16, NEXT), (0x6000 + 64 * i, 64, WRITE)] for i in range(5)]
    hdr = bytes([qlog2(16), 16 | 1 | 4 | 8, 0, 2 | 8]) + struct.pack("<H", 0x8000 | 6) \
        + bytes([3, 1, 0, 1]) + bytes(6)
    write("vq_walker", "packed-wrap-out-of-order", hdr + bytes(64) + packed_image(16, bufs, start=6))


def packed_inflight_seeds() -> None:
    """Packed rings (header byte 7 bit 1): a fresh buffer, and one whose three heads are in
    flight; phase 2 runs a driver that posts chains and dies at each crash point."""
    for crash in range(3):
        hdr = bytes([qlog2(16), 0, crash, 1, 3, 5, 0x80, 2 | 1, 4, 3, 5, 2, 1, 0, 1, 0])
        write("inflight", f"packed-crash{crash}", hdr + bytes(32 + 32 * 16) + bytes(64))
    region = bytearray(32 + 32 * 16)
    struct.pack_into("<QHHHHHHBB", region, 0, 0, 1, 16, 3, 3, 0, 0, 1, 1)
    for e in range(3):
        struct.pack_into("<BxHHHQHHIQ", region, 32 + 32 * e, 1, e + 1, e, 1, 10 - e, e, WRITE, 16, 0x8000)
    for e in range(3, 16):
        struct.pack_into("<BxHHHQHHIQ", region, 32 + 32 * e, 0, e + 1, 0, 0, 0, 0, 0, 0, 0)
    hdr = bytes([qlog2(16), 0, 0, 1, 1, 3, 0x80, 2, 1, 0, 0, 0, 0, 0, 0, 0])
    write("inflight", "packed-three-in-flight", hdr + bytes(region) + bytes(64))


# ------------------------------------------------------------------ inflight

def inflight_seed(ring: Ring, *, used_idx: int, region: bytes, capacity_shift: int = 0,
                  crash_point: int = 0, rounds: int = 2, policy: int = 1,
                  adds: tuple[int, ...] = (2, 1, 3, 0, 0, 0)) -> bytes:
    hdr = bytes([qlog2(ring.qsize), capacity_shift, crash_point, policy, rounds - 1]) \
        + struct.pack("<H", used_idx) + bytes([0]) + bytes(adds) + bytes(2)
    assert len(hdr) == 16
    region = region.ljust(16 + 16 * ring.qsize, b"\0")
    return hdr + region + ring.image()


def ifl_region(qsize: int, used_idx: int, inflight: dict[int, int], version: int = 1,
               last_batch_head: int = 0, nexts: dict[int, int] | None = None) -> bytes:
    b = bytearray(struct.pack("<QHHHH", 0, version, qsize, last_batch_head, used_idx))
    for i in range(qsize):
        b += struct.pack("<B5xHQ", 1 if i in inflight else 0, (nexts or {}).get(i, 0), inflight.get(i, 0))
    return bytes(b)


def inflight_seeds() -> None:
    r = Ring(8)
    heads = [r.chain([(0x4000 + 64 * i, 16, False), (0x6000 + 64 * i, 1, True)]) for i in range(4)]
    r.make_available(heads)
    write("inflight", "fresh-buffer", inflight_seed(r, used_idx=0, region=b""))
    # Heads 2 and 0 were in flight when the previous process died, 2 first.
    write("inflight", "two-in-flight",
          inflight_seed(r, used_idx=2, region=ifl_region(8, 2, {0: 7, 2: 5})))
    # It died after publishing used->idx (3) but before clearing the batch {1}.
    write("inflight", "unfinished-batch",
          inflight_seed(r, used_idx=3, region=ifl_region(8, 2, {1: 3, 3: 4}, last_batch_head=1)))
    write("inflight", "crash-mid-publish", inflight_seed(r, used_idx=0, region=b"", crash_point=1,
                                                         policy=2, rounds=3))


# ----------------------------------------------------------------------- blk

def blk_req_seed(config: bytes, reqs: list[bytes]) -> bytes:
    return config + b"".join(reqs)


def blk_request(segs: list[tuple[bool, bytes | int]], split: int = 0, error: int = 0) -> bytes:
    """segs: (writable, data or length); the harness's per-request encoding."""
    out = bytes([len(segs), split, error, 0])
    for w, d in segs:
        if isinstance(d, int):
            out += struct.pack("<BH", 1 if w else 0, d)
        else:
            out += struct.pack("<BH", 0, len(d)) + d
    return out


def blk_seeds() -> None:
    # config: block size shift, capacity (blocks, u16), io types, readonly, completion mode
    cfg = bytes([0, 0x00, 0x01, 0x3F, 0, 0, 0, 0])
    hdr = lambda t, sector: struct.pack("<IIQ", t, 0, sector)  # noqa: E731
    seg = lambda sector, n, flags: struct.pack("<QII", sector, n, flags)  # noqa: E731
    write("blk_req", "read", blk_req_seed(cfg, [blk_request([(False, hdr(0, 2)), (True, 1024), (True, 1)])]))
    write("blk_req", "write", blk_req_seed(cfg, [blk_request([(False, hdr(1, 4) + bytes(512)), (True, 1)])]))
    write("blk_req", "flush", blk_req_seed(cfg, [blk_request([(False, hdr(4, 0)), (True, 1)])]))
    write("blk_req", "get-id", blk_req_seed(cfg, [blk_request([(False, hdr(8, 0)), (True, 20), (True, 1)])]))
    write("blk_req", "discard",
          blk_req_seed(cfg, [blk_request([(False, hdr(11, 0) + seg(8, 16, 0)), (True, 1)])]))
    write("blk_req", "write-zeroes",
          blk_req_seed(cfg, [blk_request([(False, hdr(13, 0) + seg(8, 16, 1)), (True, 1)])]))
    write("blk_req", "deferred-mixed", blk_req_seed(bytes([3, 0, 1, 0x3F, 0, 1, 0, 0]), [
        blk_request([(False, hdr(0, 0)), (True, 4096), (True, 1)], split=3),
        blk_request([(False, hdr(1, 8) + bytes(4096)), (True, 1)], split=2),
        blk_request([(False, hdr(4, 0)), (True, 1)])]))
    write("blk_req", "failing-bdev", blk_req_seed(bytes([0, 0, 1, 0x3F, 0, 4, 0, 0]), [
        blk_request([(False, hdr(0, 2)), (True, 1024), (True, 1)]),
        blk_request([(False, hdr(1, 4) + bytes(512)), (True, 1)])]))
    write("blk_req", "unmapped-chain", blk_req_seed(cfg, [blk_request([(True, 1)], error=1)]))


# ---------------------------------------------------------------------- scsi

def scsi_cmd(cdb: bytes, *, target: int = 0, lun: int = 0, dout: bytes = b"", din: int = 0,
             queue: int = 2, split: int = 0, flags: int = 0) -> bytes:
    lun_field = bytes([1, target, 0x40 | (lun >> 8), lun & 0xFF, 0, 0, 0, 0])
    req = lun_field + struct.pack("<QBBB", 1, 0, 0, 0) + cdb.ljust(32, b"\0")
    assert len(req) == 51
    return scsi_op(queue, req + dout, 108 + din, split, flags)


def scsi_op(queue: int, out: bytes, in_len: int, split: int = 0, flags: int = 0) -> bytes:
    """One request op: queue, readable bytes, writable length (harness encoding)."""
    return bytes([0x01, queue, split, flags]) + struct.pack("<HH", len(out), in_len) + out


def scsi_ctl(kind: int, target: int, value: int = 0) -> bytes:
    return bytes([kind, target, value, 0])


#: One CDB per command the emulation knows, and a few it must refuse.
SCSI_CDBS = {
    "test-unit-ready": (bytes(6), 0, b""),
    "request-sense": (bytes([0x03, 0, 0, 0, 18, 0]), 18, b""),
    "read6": (bytes([0x08, 0, 0, 1, 1, 0]), 512, b""),
    "write6": (bytes([0x0A, 0, 0, 1, 1, 0]), 0, bytes(512)),
    "read10": (bytes([0x28, 0, 0, 0, 0, 2, 0, 0, 2, 0]), 1024, b""),
    "write10-fua": (bytes([0x2A, 0x08, 0, 0, 0, 2, 0, 0, 1, 0]), 0, bytes(512)),
    "read12": (bytes([0xA8, 0, 0, 0, 0, 3, 0, 0, 0, 1, 0, 0]), 512, b""),
    "write12": (bytes([0xAA, 0, 0, 0, 0, 3, 0, 0, 0, 1, 0, 0]), 0, bytes(512)),
    "read16": (bytes([0x88, 0] + [0] * 7 + [4, 0, 0, 0, 1, 0, 0]), 512, b""),
    "write16": (bytes([0x8A, 0] + [0] * 7 + [4, 0, 0, 0, 1, 0, 0]), 0, bytes(512)),
    "inquiry": (bytes([0x12, 0, 0, 0, 96, 0]), 96, b""),
    "inquiry-vpd-00": (bytes([0x12, 1, 0x00, 0, 255, 0]), 255, b""),
    "inquiry-vpd-80": (bytes([0x12, 1, 0x80, 0, 255, 0]), 255, b""),
    "inquiry-vpd-83": (bytes([0x12, 1, 0x83, 0, 255, 0]), 255, b""),
    "inquiry-vpd-b0": (bytes([0x12, 1, 0xB0, 0, 255, 0]), 255, b""),
    "inquiry-vpd-b1": (bytes([0x12, 1, 0xB1, 0, 255, 0]), 255, b""),
    "inquiry-vpd-b2": (bytes([0x12, 1, 0xB2, 0, 255, 0]), 255, b""),
    "mode-sense6-all": (bytes([0x1A, 0, 0x3F, 0, 255, 0]), 255, b""),
    "mode-sense10-caching": (bytes([0x5A, 0, 0x08, 0, 0, 0, 0, 0, 255, 0]), 255, b""),
    "mode-select6": (bytes([0x15, 0x10, 0, 0, 12, 0]), 0, bytes([0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 2, 0])),
    "mode-select10": (bytes([0x55, 0x10, 0, 0, 0, 0, 0, 0, 8, 0]), 0, bytes(8)),
    "start-stop-unit": (bytes([0x1B, 0, 0, 0, 1, 0]), 0, b""),
    "read-capacity10": (bytes([0x25] + [0] * 9), 8, b""),
    "read-capacity16": (bytes([0x9E, 0x10] + [0] * 8 + [0, 0, 0, 32, 0, 0]), 32, b""),
    "sync-cache10": (bytes([0x35] + [0] * 9), 0, b""),
    "sync-cache16": (bytes([0x91] + [0] * 15), 0, b""),
    "write-same10": (bytes([0x41, 0, 0, 0, 0, 8, 0, 0, 4, 0]), 0, bytes(512)),
    "write-same16-ndob-unmap": (bytes([0x93, 0x09] + [0] * 6 + [0, 8, 0, 0, 0, 4, 0, 0]), 0, b""),
    "write-same10-data": (bytes([0x41, 0, 0, 0, 0, 8, 0, 0, 4, 0]), 0, b"\x5a" * 512),
    "unmap": (bytes([0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0]), 0,
              struct.pack(">HH4x", 22, 16) + struct.pack(">QI4x", 8, 8)),
    "report-luns": (bytes([0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]), 256, b""),
    "unknown-opcode": (bytes([0xC0] + [0] * 15), 0, b""),
    "naca-set": (bytes([0x00, 0, 0, 0, 0, 0x04]), 0, b""),
}


def scsi_seeds() -> None:
    # config: two targets (512 and 4096-byte blocks), hotplug+change, completion mode
    cfg = bytes([0x03, 0, 0x3F, 0, 0x03, 0, 0, 0])
    for name, (cdb, din, dout) in SCSI_CDBS.items():
        write("scsi_req", f"cdb-{name}", cfg + scsi_cmd(cdb, din=din, dout=dout))
    write("scsi_req", "cdb-read10-4k-target", cfg + scsi_cmd(bytes([0x28, 0, 0, 0, 0, 1, 0, 0, 1, 0]),
                                                            target=1, din=4096))
    # Target 7 is the huge disk: 64-bit LBAs, and a transfer over the 4 MiB cap.
    write("scsi_req", "cdb-read16-huge-lba", cfg + scsi_cmd(bytes([0x88, 0, 0, 0, 0, 0xFF] + [0] * 4
                                                                   + [0, 0, 0, 1, 0, 0]), target=7, din=4096))
    write("scsi_req", "cdb-read10-over-max-transfer",
          cfg + scsi_cmd(bytes([0x28, 0, 0, 0, 0, 0, 0, 0x04, 0x01, 0]), target=7, din=512))
    # Data scattered over many iovecs, and a bdev that fails every other I/O.
    write("scsi_req", "cdb-write10-scattered-failing",
          bytes([0x03, 0, 0x3F, 0, 0x03, 4, 0, 0])
          + scsi_cmd(bytes([0x2A, 0, 0, 0, 0, 1, 0, 0, 8, 0]), dout=bytes(4096), split=0x13, flags=0x30)
          + scsi_cmd(bytes([0x28, 0, 0, 0, 0, 1, 0, 0, 8, 0]), din=4096, split=0x2c, flags=0x30))
    # Block sizes up to 64 KiB (what check_block_size allows): WRITE SAME (16)
    # with NDOB on target 7, which then has 64 KiB blocks.
    write("scsi_req", "cdb-write-same16-ndob-64k-blocks",
          bytes([0x83, 0, 0x0F, 0, 0x03, 0, 0, 0x80])
          + scsi_cmd(bytes([0x93, 0x01] + [0] * 6 + [0, 8, 0, 0, 0, 2, 0, 0]), target=7))
    write("scsi_req", "lun1-inquiry", cfg + scsi_cmd(bytes([0x12, 0, 0, 0, 96, 0]), lun=1, din=96))
    tmf = struct.pack("<II", 0, 5) + bytes([1, 0, 0x40, 0, 0, 0, 0, 0]) + struct.pack("<Q", 1)
    write("scsi_req", "tmf-lun-reset-behind-io",
          bytes([0x03, 0, 0x3F, 0, 0x03, 1, 0, 0])
          + scsi_cmd(bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]), din=512) + scsi_op(0, tmf, 1))
    an = struct.pack("<I", 1) + bytes([1, 0, 0x40, 0, 0, 0, 0, 0]) + struct.pack("<I", 0)
    write("scsi_req", "an-query", cfg + scsi_op(0, an, 5))
    write("scsi_req", "event-hotplug",
          cfg + scsi_op(1, b"", 16) + scsi_op(1, b"", 16) + scsi_ctl(0x03, 2) + scsi_ctl(0x04, 1)
          + scsi_ctl(0x05, 0))


# --------------------------------------------------------------------- nvme/tcp

def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def nvme_pdu(ptype: int, flags: int, body: bytes, hd: int, data: bytes = b"", dd: int = 0) -> bytes:
    """A PDU as a target sends it: common header, body, digests."""
    hlen = 8 + len(body)
    flags |= (1 if hd else 0) | (2 if data and dd else 0)
    pdo = hlen + hd if data else 0
    head = bytes([ptype, flags, hlen, pdo]) + struct.pack("<I", hlen + hd + len(data) + (dd if data else 0)) + body
    out = head + (struct.pack("<I", crc32c(head)) if hd else b"") + data
    return out + (struct.pack("<I", crc32c(data)) if data and dd else b"")


def nvme_seeds() -> None:
    """Config byte, requests (read 2 blocks, 1-block write in the capsule, 4-block write by
    R2T; or flush, unmap, write zeroes), then well-formed answers in 255-byte chunks."""
    def rsp(cid: int, hd: int) -> bytes:
        return nvme_pdu(5, 0, struct.pack("<IIHHHH", 0, 0, 0, 0, cid, 0), hd)

    def chunks(stream: bytes) -> bytes:
        return b"".join(bytes([len(stream[i:i + 255])]) + stream[i:i + 255] for i in range(0, len(stream), 255))

    for hd in (0, 4):
        for dd in (0, 4):
            cfg = (1 if hd else 0) | (2 if dd else 0) | (2 << 2)
            stream = (nvme_pdu(7, 4, struct.pack("<HHIII", 0, 0, 0, 1024, 0), hd, bytes(1024), dd) + rsp(0, hd)
                      + rsp(1, hd) + nvme_pdu(9, 0, struct.pack("<HHIII", 2, 7, 0, 2048, 0), hd) + rsp(2, hd))
            write("nvme_tcp_rx", f"rw-h{hd}-d{dd}", bytes([cfg, 0, 1, 0, 0, 3, 0, 4, 0, 3, 3, 8, 0]) + chunks(stream))
            write("nvme_tcp_rx", f"misc-h{hd}-d{dd}", bytes([cfg, 5, 0, 0, 0, 6, 3, 0, 0, 7, 5, 0, 0])
                  + chunks(rsp(0, hd) + rsp(1, hd) + rsp(2, hd)))


def main() -> None:
    walker_seeds()
    inflight_seeds()
    packed_inflight_seeds()
    blk_seeds()
    scsi_seeds()
    nvme_seeds()


if __name__ == "__main__":
    main()
