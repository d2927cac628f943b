"""virtio-blk semantics of the vhost-blk controller, driven by the fake front-end.

Config space and features, GET_ID, data round trips over every chain layout
(single/multi-descriptor, indirect, split across memory regions), alignment and
bounds, flush/discard/write-zeroes, many requests on several queues, interrupt
suppression with and without EVENT_IDX, memory-table replacement under I/O,
GET_VRING_BASE and reconnecting at that base, and the controller RPC errors.
"""

from __future__ import annotations

import os
import threading

import pytest

from blk_helpers import (
    BLK_HDR,
    Guarded,
    blk_header,
    connect,
    run_chain,
    status_byte,
    wait_no_session,
)
from vhost_core.rpc.client import RpcError
from vhost_core.testing import (
    DEFAULT_BLK_FEATURES,
    FRONTEND_PROTOCOL_FEATURES,
    BlkIOError,
    BlkRequest,
    GuestMemory,
    VhostUserFrontend,
    VhostUserNack,
    VirtioBlkConfig,
    VirtioBlkDevice,
)
from vhost_core.testing.constants import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    VhostUserProtocolFeature as PF,
    VhostUserRequest as R,
    VirtioBlkFeature as BF,
    bit,
)

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30


@pytest.fixture(params=["split", "packed"])
def ring(request) -> str:
    """The ring layout a data-path test runs on (VIRTIO_F_RING_PACKED or not)."""
    return request.param


def ring_features(ring: str, features: int = DEFAULT_BLK_FEATURES) -> int:
    return features | bit(VIRTIO_F_RING_PACKED) if ring == "packed" else features


def make_ctrlr(d, name: str, block_size: int = 512, num_blocks: int = 4096, **kw) -> str:
    d.rpc("bdev_malloc_create", num_blocks=num_blocks, block_size=block_size, name=f"{name}_bdev")
    d.rpc("vhost_create_blk_controller", ctrlr=name, dev_name=f"{name}_bdev", **kw)
    return name


@pytest.fixture(params=[512, 4096], ids=["bs512", "bs4096"])
def any_bs(request, blk_daemon):
    """(daemon, controller, block size) for a 4096-block bdev of either block size."""
    bs = request.param
    return blk_daemon, make_ctrlr(blk_daemon, f"bs{bs}", bs, 4096), bs


def manual_connect(path: str, mem: GuestMemory, *, num_queues: int = 1, base: int = 0,
                   queue_size: int = 128, features: int = DEFAULT_BLK_FEATURES) -> VirtioBlkDevice:
    """QEMU's handshake with a chosen vring base and caller-owned guest memory
    (what a reconnecting QEMU does: same RAM, rings resume at GET_VRING_BASE)."""
    fe = VhostUserFrontend(path)
    offered = fe.get_features()
    acked = (offered & features) | bit(VHOST_USER_F_PROTOCOL_FEATURES)
    fe.set_protocol_features(fe.get_protocol_features() & FRONTEND_PROTOCOL_FEATURES)
    fe.set_owner()
    fe.set_features(acked)
    fe.set_mem_table(mem)
    queues = [fe.setup_vring(i, queue_size, base=base) for i in range(num_queues)]
    for i in range(num_queues):
        fe.set_vring_enable(i, True)
    return VirtioBlkDevice(fe, mem, queues, None, acked, own_memory=False)


# ---------------------------------------------------------------------------
# config space, features, GET_ID
# ---------------------------------------------------------------------------


def test_config_space(any_bs):
    d, name, bs = any_bs
    with connect(d, name) as dev:
        c = dev.config
        assert c.capacity == 4096 * bs // 512
        assert c.blk_size == bs
        assert c.seg_max == 126
        assert c.size_max == 32 * 1024 and c.seg_max * c.size_max <= 4 << 20
        assert c.num_queues == 16 == dev.frontend.get_queue_num()
        assert c.writeback == 1
        assert c.max_discard_seg == 1 and c.max_write_zeroes_seg == 1
        assert c.discard_sector_alignment == bs // 512
        assert c.max_discard_sectors > 0 and c.max_write_zeroes_sectors > 0
        assert c.write_zeroes_may_unmap == 1
        offered = dev.offered_features
        for f in (BF.SIZE_MAX, BF.SEG_MAX, BF.BLK_SIZE, BF.FLUSH, BF.MQ, BF.DISCARD, BF.WRITE_ZEROES,
                  VIRTIO_F_VERSION_1, VIRTIO_RING_F_INDIRECT_DESC, VIRTIO_RING_F_EVENT_IDX,
                  VHOST_USER_F_PROTOCOL_FEATURES):
            assert offered & bit(f), f"feature bit {int(f)} not offered"
        assert not offered & bit(BF.RO)
        assert dev.offered_protocol_features & bit(PF.MQ) and dev.offered_protocol_features & bit(PF.CONFIG)


def test_config_space_read_only_and_num_queues(blk_daemon):
    d = blk_daemon
    make_ctrlr(d, "ro4", 512, 1024, readonly=True, num_queues=4)
    with connect(d, "ro4", num_queues=4) as dev:
        assert dev.offered_features & bit(BF.RO)
        assert not dev.offered_features & (bit(BF.DISCARD) | bit(BF.WRITE_ZEROES))
        assert dev.config.num_queues == 4 == dev.frontend.get_queue_num()
        assert dev.config.capacity == 1024


def test_get_config_256_bytes(blk_daemon):
    """SPDK's initiator asks for 256 bytes: exactly 256 come back, zero past the struct."""
    d = blk_daemon
    with connect(d, "vhost.0", config_size=256) as dev:
        raw = dev.frontend.get_config(0, 256)
        assert len(raw) == 256
        assert raw[VirtioBlkConfig.SIZE:] == bytes(256 - VirtioBlkConfig.SIZE)
        assert VirtioBlkConfig.parse(raw) == dev.config
        assert dev.config.capacity == 16384
        # A window inside the struct (size_max at offset 8).
        assert dev.frontend.get_config(8, 4) == (32 * 1024).to_bytes(4, "little")
        # Past the struct entirely: zeros.
        assert dev.frontend.get_config(200, 56) == bytes(56)


def test_get_config_reply_is_as_long_as_the_request_payload(blk_daemon):
    """A front-end whose payload carries more room than its size field asks for (SPDK's
    virtio-user, patched so): the reply matches the payload, as the spec says, with the
    asked bytes first and zeros after."""
    import struct

    d = blk_daemon
    with connect(d, "vhost.0") as dev:
        fe = dev.frontend
        fe.send(R.GET_CONFIG, struct.pack("<III", 8, 4, 0) + bytes(60))
        reply = fe.recv(timeout=5)
        assert len(reply.payload) == 12 + 60
        assert struct.unpack_from("<III", reply.payload) == (8, 4, 0)
        assert reply.payload[12:16] == (32 * 1024).to_bytes(4, "little")
        assert reply.payload[16:] == bytes(56)
        assert fe.ping()


def test_set_config_is_refused(blk_daemon):
    d = blk_daemon
    with connect(d) as dev:
        with pytest.raises(VhostUserNack):
            dev.frontend.set_config(32, b"\0")
        d.wait_log("config space is read-only")
        assert dev.frontend.ping()


def test_get_id_returns_bdev_name(blk_daemon):
    d = blk_daemon
    with connect(d) as dev:
        assert dev.get_id() == b"Malloc0"
        assert dev.get_id(raw=True) == b"Malloc0".ljust(20, b"\0")
        # A bigger buffer: 20 bytes written, the rest untouched.
        res = dev.submit(VIRTIO_BLK_T_GET_ID, 0, b"", 512)
        assert res.status == VIRTIO_BLK_S_OK and res.used_len == 21
        assert res.data[:20] == b"Malloc0".ljust(20, b"\0")
    long_name = "a_rather_long_bdev_name_0123"
    d.rpc("bdev_malloc_create", num_blocks=64, block_size=512, name=long_name)
    d.rpc("vhost_create_blk_controller", ctrlr="long", dev_name=long_name)
    with connect(d, "long") as dev:
        # 20 bytes, no terminating NUL (virtio 5.2.6).
        assert dev.get_id(raw=True) == long_name.encode()[:20]


# ---------------------------------------------------------------------------
# data path
# ---------------------------------------------------------------------------


LAYOUTS = {
    "single": dict(indirect=False, seg_size=None),
    "multi_desc": dict(indirect=False, seg_size=4096),
    "odd_segments": dict(indirect=False, seg_size=1000),
    "indirect": dict(indirect=True, seg_size=None),
    "indirect_multi": dict(indirect=True, seg_size=512),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_read_write_round_trip(any_bs, layout, ring):
    d, name, bs = any_bs
    kw = LAYOUTS[layout]
    with connect(d, name, num_queues=2, features=ring_features(ring)) as dev:
        size = 48 * KiB if layout != "indirect_multi" else 63 * KiB  # 126 x 512 = seg_max
        if size % bs:
            size = size // bs * bs
        data = os.urandom(size)
        for q in (0, 1):
            sector = 64 + q * 256
            dev.write(sector, data, queue=q, **kw)
            assert dev.read(sector, size // 512, queue=q, **kw) == data
            # Read back through another layout, too.
            assert dev.read(sector, size // 512, queue=1 - q) == data
        # Partial reads inside what was written.
        assert dev.read(64 + bs // 512, bs // 512, **kw) == data[bs:2 * bs]


def test_seg_max_segments_in_one_request(blk_daemon, ring):
    d = blk_daemon
    with connect(d, queue_size=128, features=ring_features(ring)) as dev:
        data = os.urandom(126 * 512)
        dev.write(0, data, indirect=True, seg_size=512)
        assert dev.read(0, 126, indirect=True, seg_size=512) == data
        # 126 data + header + status = 128 descriptors: the whole ring, direct.
        dev.write(200, data, indirect=False, seg_size=512)
        assert dev.read(200, 126, indirect=False, seg_size=512) == data


@pytest.mark.parametrize("queue_size", [2, 32768])
def test_ring_sizes_at_the_limits(blk_daemon, queue_size, ring):
    d = blk_daemon
    with connect(d, queue_size=queue_size, indirect=True, memory_mb=32, features=ring_features(ring)) as dev:
        data = os.urandom(8192)
        dev.write(8, data)
        assert dev.read(8, 16) == data
        # More requests than the device keeps in flight per queue (256).
        n = 300 if queue_size > 2 else 4
        reqs = [BlkRequest(VIRTIO_BLK_T_IN, 8, b"", 512) for _ in range(n)]
        assert all(r.status == VIRTIO_BLK_S_OK and r.data == data[:512] for r in dev.submit_many(reqs))


def test_read_of_unwritten_areas_is_zero(any_bs):
    d, name, bs = any_bs
    with connect(d, name) as dev:
        total = 4096 * bs // 512
        for sector in (0, 8, total // 2, total - 8):
            assert dev.read(sector, 8) == bytes(4096)
        dev.write(16, b"\xee" * 4096)
        assert dev.read(8, 8) == bytes(4096)
        assert dev.read(24, 8) == bytes(4096)


def _split_memory() -> GuestMemory:
    """Regions contiguous in guest-physical space but mapped separately: a
    buffer across a boundary becomes several host segments."""
    mem = GuestMemory([(0, 4 * MiB), (4 * MiB, 64 * KiB), (4 * MiB + 64 * KiB, 4 * KiB),
                       (4 * MiB + 68 * KiB, 64 * KiB)])
    # Keep the allocator (rings, headers of normal requests) out of regions 1-3.
    for i in (1, 2, 3):
        mem.alloc(mem.regions[i].size, 4096, region=i)
    return mem


SPLITS = {
    "two_regions": (4 * MiB + 60 * KiB, 8 * KiB),        # region 1 tail + region 2
    "three_regions": (4 * MiB + 62 * KiB, 8 * KiB),      # region 1, all of 2, region 3
    "long_span": (4 * MiB + 32 * KiB, 64 * KiB),         # 32K + 4K + 28K
}


@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("direction", ["write", "read"])
def test_request_across_memory_regions(blk_daemon, direction, split):
    d = blk_daemon
    mem = _split_memory()
    try:
        gpa, length = SPLITS[split]
        data = os.urandom(length)
        with connect(d, memory=mem) as dev:
            vq = dev.queues[0]
            st = status_byte(mem)
            if direction == "write":
                mem.write(gpa, data)
                hdr = blk_header(mem, VIRTIO_BLK_T_OUT, 40)
                run_chain(vq, [(hdr.gpa, 16, False), (gpa, length, False), (st.gpa, 1, True)])
                assert st.read() == bytes([VIRTIO_BLK_S_OK])
                assert dev.read(40, length // 512) == data
            else:
                dev.write(40, data)
                mem.fill(gpa - 512, length + 1024, 0xA5)
                hdr = blk_header(mem, VIRTIO_BLK_T_IN, 40)
                used = run_chain(vq, [(hdr.gpa, 16, False), (gpa, length, True), (st.gpa, 1, True)])
                assert st.read() == bytes([VIRTIO_BLK_S_OK])
                assert used.len == length + 1
                assert mem.read(gpa, length) == data
                assert mem.read(gpa - 512, 512) == b"\xa5" * 512
                assert mem.read(gpa + length, 512) == b"\xa5" * 512
    finally:
        mem.close()


def test_header_and_status_across_memory_regions(blk_daemon):
    """The 16-byte header split 8+8 across two regions still parses."""
    d = blk_daemon
    mem = _split_memory()
    try:
        with connect(d, memory=mem) as dev:
            vq = dev.queues[0]
            hdr_gpa = 4 * MiB + 64 * KiB - 8
            mem.write(hdr_gpa, BLK_HDR.pack(VIRTIO_BLK_T_OUT, 0, 8))
            data = Guarded(mem, 1024, os.urandom(1024))
            st_gpa = 4 * MiB + 68 * KiB - 1
            mem.write(st_gpa, b"\xff")
            run_chain(vq, [(hdr_gpa, 16, False), (data.gpa, 1024, False), (st_gpa, 1, True)])
            assert mem.read(st_gpa, 1) == bytes([VIRTIO_BLK_S_OK])
            assert dev.read(8, 2) == data.read()
    finally:
        mem.close()


def test_header_in_two_descriptors(blk_daemon):
    d = blk_daemon
    with connect(d) as dev:
        vq = dev.queues[0]
        hdr = blk_header(dev.memory, VIRTIO_BLK_T_OUT, 100)
        data = Guarded(dev.memory, 512, b"\x3c" * 512)
        st = status_byte(dev.memory)
        run_chain(vq, [(hdr.gpa, 8, False), (hdr.gpa + 8, 8, False), (data.gpa, 512, False),
                       (st.gpa, 1, True)])
        assert st.read() == bytes([VIRTIO_BLK_S_OK])
        assert dev.read(100, 1) == b"\x3c" * 512


def test_data_and_status_in_one_descriptor(blk_daemon):
    """Any layout is allowed (VIRTIO_F_ANY_LAYOUT is implied by VERSION_1):
    read data and the status byte share one writable descriptor."""
    d = blk_daemon
    with connect(d) as dev:
        dev.write(300, b"\x5e" * 1024)
        vq = dev.queues[0]
        hdr = blk_header(dev.memory, VIRTIO_BLK_T_IN, 300)
        buf = Guarded(dev.memory, 1025, 0)
        used = run_chain(vq, [(hdr.gpa, 16, False), (buf.gpa, 1025, True)])
        assert used.len == 1025
        assert buf.read() == b"\x5e" * 1024 + bytes([VIRTIO_BLK_S_OK])
        buf.check_guards()


@pytest.mark.parametrize("sector,nbytes", [(1, 4096), (0, 512), (0, 4096 + 512), (4, 1024), (7, 4096)])
@pytest.mark.parametrize("direction", ["read", "write"])
def test_misaligned_io_on_4096_bdev(blk_daemon, direction, sector, nbytes):
    d = blk_daemon
    make_ctrlr(d, "bs4k", 4096, 256)
    with connect(d, "bs4k") as dev:
        dev.write(0, b"\x61" * 16384)
        if direction == "read":
            res = dev.submit(VIRTIO_BLK_T_IN, sector, b"", nbytes)
        else:
            res = dev.submit(VIRTIO_BLK_T_OUT, sector, b"\x62" * nbytes)
        assert res.status == VIRTIO_BLK_S_IOERR
        assert res.used_len == 1
        assert dev.read(0, 32) == b"\x61" * 16384
        # Aligned I/O still works.
        dev.write(8, b"\x63" * 4096)
        assert dev.read(8, 8) == b"\x63" * 4096


@pytest.mark.parametrize("type_", [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT])
def test_zero_length_io_is_ioerr(blk_daemon, type_):
    d = blk_daemon
    with connect(d) as dev:
        res = dev.submit(type_, 0, b"", 0)
        assert res.status == VIRTIO_BLK_S_IOERR


def test_flush(blk_daemon):
    d = blk_daemon
    with connect(d) as dev:
        dev.write(0, b"\x01" * 512)
        dev.flush()
        res = dev.submit(4, 0, b"", 0)  # VIRTIO_BLK_T_FLUSH
        assert res.status == VIRTIO_BLK_S_OK and res.used_len == 1
    with connect(d, "vhost.ro") as dev:
        dev.flush()


@pytest.mark.parametrize("op", ["discard", "write_zeroes", "write_zeroes_unmap"])
def test_discard_and_write_zeroes_zero_the_data(any_bs, op):
    d, name, bs = any_bs
    with connect(d, name) as dev:
        pattern = os.urandom(64 * 512)
        dev.write(0, pattern)
        start, count = 16, 16  # sectors, aligned for both block sizes
        if op == "discard":
            dev.discard(start, count)
        else:
            dev.write_zeroes(start, count, unmap=op.endswith("unmap"))
        got = dev.read(0, 64)
        assert got[: start * 512] == pattern[: start * 512]
        assert got[start * 512:(start + count) * 512] == bytes(count * 512)
        assert got[(start + count) * 512:] == pattern[(start + count) * 512:]


@pytest.mark.parametrize("type_", [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES])
def test_discard_and_write_zeroes_bad_segments(blk_daemon, type_):
    d = blk_daemon
    with connect(d) as dev:
        dev.write(0, b"\x71" * 8192)
        seg = dev.segments_payload

        def status(payload):
            return dev.submit(type_, 0, payload).status

        # Flags: discard takes none, write-zeroes only UNMAP.
        assert status(seg([(0, 8, 2)])) == VIRTIO_BLK_S_UNSUPP
        if type_ == VIRTIO_BLK_T_DISCARD:
            assert status(seg([(0, 8, 1)])) == VIRTIO_BLK_S_UNSUPP
        assert status(seg([(0, 8, 0x80000000)])) == VIRTIO_BLK_S_UNSUPP
        # More segments than max_discard_seg (1), none, or a partial one.
        assert status(seg([(0, 8, 0), (8, 8, 0)])) == VIRTIO_BLK_S_IOERR
        assert status(b"") == VIRTIO_BLK_S_IOERR
        assert status(seg([(0, 8, 0)])[:12]) == VIRTIO_BLK_S_IOERR
        # Empty and out-of-range ranges.
        assert status(seg([(0, 0, 0)])) == VIRTIO_BLK_S_IOERR
        assert status(seg([(16384, 1, 0)])) == VIRTIO_BLK_S_IOERR
        assert status(seg([(16380, 8, 0)])) == VIRTIO_BLK_S_IOERR
        assert status(seg([((1 << 64) - 1, 1, 0)])) == VIRTIO_BLK_S_IOERR
        assert dev.read(0, 16) == b"\x71" * 8192


def test_discard_misaligned_on_4096_bdev(blk_daemon):
    d = blk_daemon
    make_ctrlr(d, "bs4k", 4096, 256)
    with connect(d, "bs4k") as dev:
        dev.write(0, b"\x72" * 8192)
        with pytest.raises(BlkIOError):
            dev.discard(1, 8)
        with pytest.raises(BlkIOError):
            dev.write_zeroes(0, 4)
        assert dev.read(0, 16) == b"\x72" * 8192


def test_many_requests_in_flight_on_several_queues(blk_daemon, ring):
    d = blk_daemon
    nq, per_q = 4, 96
    with connect(d, num_queues=nq, queue_size=64, features=ring_features(ring)) as dev:
        blobs = {}
        reqs = []
        for q in range(nq):
            for i in range(per_q):
                lba = (q * per_q + i) * 8
                blobs[lba] = os.urandom(4096)
                reqs.append(BlkRequest(VIRTIO_BLK_T_OUT, lba, blobs[lba], 0, q,
                                       indirect=bool(i % 2)))
        before = d.rpc("vhost_get_queue_stats", ctrlr="vhost.0")
        results = dev.submit_many(reqs)
        assert all(r.status == VIRTIO_BLK_S_OK for r in results)
        reads = [BlkRequest(VIRTIO_BLK_T_IN, lba, b"", 4096, (i + 1) % nq)
                 for i, lba in enumerate(blobs)]
        results = dev.submit_many(reads)
        for r in results:
            assert r.status == VIRTIO_BLK_S_OK
            assert r.data == blobs[r.request.sector]
        after = d.rpc("vhost_get_queue_stats", ctrlr="vhost.0")
        for q in range(nq):
            assert after[q]["requests"] - before[q]["requests"] == 2 * per_q
            assert after[q]["errors"] == before[q]["errors"]


@pytest.mark.parametrize("event_idx", [True, False], ids=["event_idx", "no_event_idx"])
def test_interrupts_with_and_without_event_idx(blk_daemon, event_idx, ring):
    d = blk_daemon
    features = DEFAULT_BLK_FEATURES if event_idx else DEFAULT_BLK_FEATURES & ~bit(VIRTIO_RING_F_EVENT_IDX)
    features = ring_features(ring, features)
    with connect(d, num_queues=2, features=features, require_interrupts=True, timeout=5) as dev:
        assert dev.has_feature(VIRTIO_RING_F_EVENT_IDX) == event_idx
        for q in (0, 1):
            assert dev.queues[q].event_idx == event_idx
        for i in range(20):
            data = os.urandom(4096)
            dev.write(i * 8, data, queue=i % 2)
            assert dev.read(i * 8, 8, queue=i % 2) == data
        reqs = [BlkRequest(VIRTIO_BLK_T_IN, i * 8, b"", 4096, i % 2) for i in range(100)]
        assert all(r.status == VIRTIO_BLK_S_OK for r in dev.submit_many(reqs))
        # The device tells the driver when it wants kicks.
        vq = dev.queues[0]
        if ring == "packed":
            # Kicks enabled in the device event area (an idle interrupt-mode reactor).
            assert vq.device_event[1] == 0
        elif event_idx:
            assert vq.avail_event == vq.avail_idx
        else:
            assert vq.used_flags == 0
        # Interrupts suppressed by the driver: completions still arrive (polled).
        vq.disable_interrupts()
        head = vq.add_chain([(dev.memory.alloc_bytes(BLK_HDR.pack(VIRTIO_BLK_T_IN, 0, 0), 16), 16, False),
                             (dev.memory.alloc(512), 512, True), (dev.memory.alloc(1), 1, True)])
        vq.kick(force=True)
        got = vq.wait_used(5.0)
        assert [e.head for e in got] == [head]
        vq.enable_interrupts()
        stats = d.rpc("vhost_get_queue_stats", ctrlr="vhost.0")
        assert stats[0]["interrupts"] > 0 and stats[1]["interrupts"] > 0


def test_memory_table_replaced_while_queues_run(blk_daemon, ring):
    """QEMU memory hotplug: a new table (old regions + a new one) arrives while
    I/O runs; requests keep completing correctly, including ones whose buffers
    live in the new region.  Then the region goes away again (unplug):
    buffers there fail cleanly."""
    d = blk_daemon
    mem = GuestMemory([(0, 8 * MiB), (4 * GiB, 4 * MiB), (8 * GiB, 4 * MiB)])
    all_regions = mem.regions
    mem.regions = all_regions[:2]
    try:
        with connect(d, num_queues=2, memory=mem, features=ring_features(ring)) as dev:
            mem.regions = all_regions
            mem.regions[2]._free = [[8 * GiB, 8 * GiB + 4 * MiB]]
            stop = threading.Event()
            errors: list[BaseException] = []
            rounds = [0]

            def io_loop():
                try:
                    i = 0
                    while not stop.is_set():
                        payload = bytes([i % 251]) * 4096
                        dev.write(1000 + (i % 32) * 8, payload, queue=1)
                        assert dev.read(1000 + (i % 32) * 8, 8, queue=1) == payload
                        i += 1
                    rounds[0] = i
                except BaseException as exc:  # noqa: BLE001
                    errors.append(exc)

            # Region 2 is not in the table yet: alloc from it by hand below.
            t = threading.Thread(target=io_loop)
            t.start()
            try:
                for _ in range(5):
                    dev.frontend.set_mem_table(list(all_regions))
                    dev.frontend.set_mem_table(list(all_regions[:2]))
                dev.frontend.set_mem_table(list(all_regions))
            finally:
                stop.set()
                t.join(30)
            assert not t.is_alive()
            assert not errors, errors
            assert rounds[0] > 0
            # A request whose data lives in the hot-plugged region.
            vq = dev.queues[0]
            data = os.urandom(4096)
            buf = mem.alloc(4096, 512, region=2, zero=False)
            mem.write(buf, data)
            hdr = blk_header(mem, VIRTIO_BLK_T_OUT, 500)
            st = status_byte(mem)
            run_chain(vq, [(hdr.gpa, 16, False), (buf, 4096, False), (st.gpa, 1, True)])
            assert st.read() == bytes([VIRTIO_BLK_S_OK])
            assert dev.read(500, 8) == data
            # Unplug region 2: the same buffer is now outside guest memory.
            dev.frontend.set_mem_table(list(all_regions[:2]))
            st2 = status_byte(mem)
            hdr2 = blk_header(mem, VIRTIO_BLK_T_IN, 500)
            run_chain(vq, [(hdr2.gpa, 16, False), (buf, 4096, True), (st2.gpa, 1, True)])
            assert st2.read() == bytes([VIRTIO_BLK_S_IOERR])
            assert mem.read(buf, 4096) == data
            assert dev.read(500, 8) == data
    finally:
        mem.regions = all_regions
        mem.close()
    assert "Traceback" not in d.log()


@pytest.mark.parametrize("start", [0, 65530], ids=["base0", "wraps"])
def test_get_vring_base_and_reconnect(blk_daemon, start):
    d = blk_daemon
    mem = GuestMemory.pc_like(16 * MiB)
    path = d.socket("vhost.0")
    try:
        wait_no_session(d, "vhost.0")
        dev = manual_connect(path, mem, base=start)
        for i in range(10):
            dev.write(i * 8, bytes([i + 1]) * 4096)
        base = dev.frontend.get_vring_base(0)
        assert base == (start + 10) & 0xFFFF
        # The ring is stopped: a new request is not served.
        vq = dev.queues[0]
        vq.add_chain([(mem.alloc_bytes(BLK_HDR.pack(VIRTIO_BLK_T_IN, 0, 0), 16), 16, False),
                      (mem.alloc(1), 1, True)])
        vq.kick(force=True)
        assert vq.wait_used(0.3, raise_on_timeout=False) == []
        dev.close()

        wait_no_session(d, "vhost.0")
        dev = manual_connect(path, mem, base=base)
        for i in range(10):
            assert dev.read(i * 8, 8) == bytes([i + 1]) * 4096
        dev.write(200, b"\x42" * 512)
        assert dev.frontend.get_vring_base(0) == (base + 11) & 0xFFFF
        dev.close()
    finally:
        mem.close()
    assert "Traceback" not in d.log()


def test_packed_ring_stops_and_restarts_at_its_wrap_counters(blk_daemon):
    """GET_VRING_BASE of a packed ring that wrapped (odd laps): the position and both
    wrap counters; the same ring restarted there carries on."""
    d = blk_daemon
    with connect(d, queue_size=8, features=ring_features("packed")) as dev:
        vq = dev.queues[0]
        for i in range(7):                  # 21 descriptors: 2 laps and 5
            dev.write(i, bytes([i + 1]) * 512)
        assert (vq.next_avail, vq.avail_wrap) == (5, 1)
        fe = dev.frontend
        base = fe.get_vring_base(0)
        assert base == vq.vring_base == (5 | 1 << 15) | (5 | 1 << 15) << 16
        for i in range(2):                  # 12 more: two more laps, restarted at each stop
            dev.queues[0] = fe.setup_vring(0, vq=vq, base=fe.get_vring_base(0) if i else base)
            fe.set_vring_enable(0, True)
            dev.write(100, b"\x0f" * 512)
            assert dev.read(i, 1) == bytes([i + 1]) * 512
        assert (vq.next_avail, vq.avail_wrap) == (1, 1)
        assert fe.get_vring_base(0) == (1 | 1 << 15) | (1 | 1 << 15) << 16
        dev.queues[0] = fe.setup_vring(0, vq=vq, base=vq.vring_base)
        fe.set_vring_enable(0, True)
        for i in range(3):                  # 9 more: the ring wraps once, the counters flip
            assert dev.read(i, 1) == bytes([i + 1]) * 512
        assert (vq.next_avail, vq.avail_wrap) == (2, 0)
        assert fe.get_vring_base(0) == 2 | 2 << 16


def test_get_vring_base_then_restart_on_same_connection(blk_daemon):
    d = blk_daemon
    with connect(d) as dev:
        for i in range(5):
            dev.write(i, b"\x0f" * 512)
        fe = dev.frontend
        base = fe.get_vring_base(0)
        assert base == 5
        vq = fe.setup_vring(0, 128, base=base)
        fe.set_vring_enable(0, True)
        dev.queues[0] = vq
        assert dev.read(0, 5) == b"\x0f" * 2560
        assert fe.get_vring_base(0) == 6


# ---------------------------------------------------------------------------
# controller RPC errors
# ---------------------------------------------------------------------------


def _rpc_error(d, method, **params) -> RpcError:
    with pytest.raises(RpcError) as exc:
        d.rpc(method, **params)
    return exc.value


def test_create_controller_on_missing_bdev(blk_daemon):
    err = _rpc_error(blk_daemon, "vhost_create_blk_controller", ctrlr="x", dev_name="NoSuchBdev")
    assert "NoSuchBdev" in err.message and "does not exist" in err.message


def test_a_second_controller_shares_a_bdev_in_use(blk_daemon):
    """vhost opens bdevs, it does not claim them (SPDK): a second controller on Malloc0
    sees what vhost.0 wrote."""
    d = blk_daemon
    d.rpc("vhost_create_blk_controller", ctrlr="x", dev_name="Malloc0", readonly=True)
    with connect(d, "vhost.0") as dev:
        dev.write(7, b"\x77" * 512)
    with connect(d, "x") as dev:
        assert dev.read(7, 1) == b"\x77" * 512


@pytest.mark.parametrize("dev_name", ["Malloc0", "Malloc3"])
def test_create_controller_with_a_taken_name(blk_daemon, dev_name):
    d = blk_daemon
    d.rpc("bdev_malloc_create", num_blocks=64, block_size=512, name="Malloc3")
    err = _rpc_error(d, "vhost_create_blk_controller", ctrlr="vhost.0", dev_name=dev_name)
    assert "vhost.0" in err.message and "already exists" in err.message
    # The failed call released nothing it did not take: vhost.0 still serves Malloc0.
    d.rpc("vhost_create_blk_controller", ctrlr="other", dev_name="Malloc3")
    with connect(d, "vhost.0") as dev:
        dev.write(0, b"\x21" * 512)
        assert dev.read(0, 1) == b"\x21" * 512


def test_create_controller_cpumask_outside_app_mask(blk_daemon):
    d = blk_daemon
    d.rpc("bdev_malloc_create", num_blocks=64, block_size=512, name="Malloc3")
    err = _rpc_error(d, "vhost_create_blk_controller", ctrlr="x", dev_name="Malloc3", cpumask="0x2")
    assert "0x2" in err.message and "cpumask" in err.message and "0x1" in err.message
    # Nothing half-made: the bdev is free and the name unused.
    d.rpc("vhost_create_blk_controller", ctrlr="x", dev_name="Malloc3", cpumask="0x1")
    with connect(d, "x") as dev:
        assert dev.get_id() == b"Malloc3"


def test_immediate_reconnect_after_disconnect_is_served(blk_daemon):
    """QEMU (and load generators) reconnect right after hanging up; the previous
    session may still be tearing down, which must not refuse the new one."""
    from vhost_core.testing import connect_blk

    d = blk_daemon
    for i in range(5):
        dev = connect_blk(d.socket("vhost.0"))
        data = bytes([i]) * 4096
        dev.write(0, data)
        assert dev.read(0, 8) == data
        dev.close()
    assert "refused a second front-end" not in d.log()


@pytest.mark.parametrize("packed_ring,offered", [(None, True), (True, True), (False, False)],
                         ids=["default", "true", "false"])
def test_packed_ring_parameter_decides_whether_packed_rings_are_offered(blk_daemon, packed_ring, offered):
    """SPDK's packed_ring: offered by default (QEMU negotiates it only with packed=on),
    and with true; false keeps the controller on split rings.  save_config keeps it."""
    d = blk_daemon
    kw = {} if packed_ring is None else {"packed_ring": packed_ring}
    make_ctrlr(d, "pr", 512, 64, **kw)
    wait_no_session(d, "pr")
    with VhostUserFrontend(d.socket("pr")) as fe:
        assert bool(fe.get_features() & bit(VIRTIO_F_RING_PACKED)) == offered
    entry = next(e for e in d.rpc("framework_get_config", name="vhost_blk") if e["params"].get("ctrlr") == "pr")
    assert entry["params"]["packed_ring"] is offered
