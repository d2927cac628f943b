"""In-flight tracking across a target crash (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), at the
request level: the fake front-end plays QEMU, and the state a crashed target process leaves
behind (ring and inflight buffer) is written by hand, so each recovery path is exercised
exactly.  The real thing (QEMU, a guest, kill -9) is in test_e2e_aio.py.

Buffer layout (vhost-user spec, "Inflight I/O tracking", split virtqueue; the packed
layout is at the end): per queue a
16-byte header {u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16 used_idx}
then desc_num 16-byte entries {u8 inflight; u8 pad[5]; u16 next; u64 counter}; queue
regions are 64-byte aligned.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct

import pytest

from blk_helpers import BLK_HDR, connect, wait_no_session
from vhost_core.testing import (
    DEFAULT_BLK_FEATURES,
    FRONTEND_PROTOCOL_FEATURES,
    ConnectionClosed,
    GuestMemory,
    VhostUserFrontend,
    VhostUserNack,
    VirtioBlkDevice,
)
from vhost_core.testing.constants import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_BLK_S_OK,
    VIRTIO_F_RING_PACKED,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VhostUserProtocolFeature as PF,
    VhostUserRequest as R,
    bit,
)
from vhost_core.testing.virtqueue import PackedVirtqueue, SplitVirtqueue, packed_vring_base

MiB = 1 << 20
INFLIGHT = struct.Struct("<QQHH4x")
HEADER = struct.Struct("<QHHHH")
DESC = struct.Struct("<B5xHQ")


def stride(queue_size: int) -> int:
    return (HEADER.size + DESC.size * queue_size + 63) & ~63


def mark(region, head: int, counter: int, *, next_: int = 0, queue_base: int = 0) -> None:
    """Write DescStateSplit ``head`` of the queue region at ``queue_base`` as in flight."""
    off = queue_base + HEADER.size + head * DESC.size
    region[off:off + DESC.size] = DESC.pack(1, next_, counter)


def handshake(path: str, *, inflight: bool = True) -> tuple[VhostUserFrontend, int]:
    fe = VhostUserFrontend(path)
    acked = (fe.get_features() & DEFAULT_BLK_FEATURES) | bit(VHOST_USER_F_PROTOCOL_FEATURES)
    offered = fe.get_protocol_features()
    assert offered & bit(PF.INFLIGHT_SHMFD)
    fe.set_protocol_features(offered & (FRONTEND_PROTOCOL_FEATURES | (bit(PF.INFLIGHT_SHMFD) if inflight else 0)))
    fe.set_owner()
    fe.set_features(acked)
    return fe, acked


def get_inflight(fe: VhostUserFrontend, num_queues: int = 1, queue_size: int = 128) -> tuple[int, int]:
    msg = fe.request(R.GET_INFLIGHT_FD, INFLIGHT.pack(0, 0, num_queues, queue_size), reply_size=INFLIGHT.size)
    size, offset, nq, qs = INFLIGHT.unpack(msg.payload)
    assert (offset, nq, qs) == (0, num_queues, queue_size)
    assert len(msg.fds) == 1
    return msg.fds[0], size


def set_inflight(fe: VhostUserFrontend, fd: int, size: int, num_queues: int = 1, queue_size: int = 128) -> None:
    fe.command(R.SET_INFLIGHT_FD, INFLIGHT.pack(size, 0, num_queues, queue_size), [fd])


def blk_chain(mem: GuestMemory, vq: SplitVirtqueue, type_: int, sector: int, data: bytes = b"",
              read_len: int = 0) -> tuple[int, int]:
    """Make a virtio-blk request available; returns (head, status gpa)."""
    bufs = [(mem.alloc_bytes(BLK_HDR.pack(type_, 0, sector), 16), 16, False)]
    if data:
        bufs.append((mem.alloc_bytes(data, 512), len(data), False))
    if read_len:
        bufs.append((mem.alloc(read_len, 512), read_len, True))
    status = mem.alloc_bytes(b"\xff", 1)
    bufs.append((status, 1, True))
    return vq.add_chain(bufs), status


@pytest.fixture
def mem():
    m = GuestMemory.pc_like(16 * MiB)
    yield m
    m.close()


def test_get_inflight_fd_gives_a_sealed_buffer_sized_for_the_queues(blk_daemon):
    fe, _ = handshake(blk_daemon.socket("vhost.0"))
    with fe:
        fd, size = get_inflight(fe, num_queues=2, queue_size=256)
        try:
            assert size == 2 * stride(256) == os.fstat(fd).st_size
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW and seals & fcntl.F_SEAL_SEAL
            with pytest.raises(PermissionError):
                os.ftruncate(fd, 0)     # nobody can pull pages from under a mapping
            with mmap.mmap(fd, size) as m:
                assert m[:size] == bytes(size)
        finally:
            os.close(fd)


@pytest.mark.parametrize("died", ["before publishing", "after publishing"])
def test_requests_left_in_flight_are_resubmitted_in_order_and_the_ring_resumes_after_them(
        blk_daemon, mem, died):
    """The previous process took A (write), B (write) and C (read) from the ring and completed
    only C.  It died either before publishing C (used->idx still 0: all three are resubmitted)
    or right after publishing it but before clearing C's flag (used->idx 1, the buffer's
    used_idx 0: the last batch is repaired and only A and B come back)."""
    d = blk_daemon
    path = d.socket("vhost.0")
    wait_no_session(d, "vhost.0")
    fe, acked = handshake(path)
    with fe:
        fd, size = get_inflight(fe)
        fe.set_mem_table(mem)
        vq = SplitVirtqueue(mem, 128)
        a, a_st = blk_chain(mem, vq, VIRTIO_BLK_T_OUT, 0, b"A" * 512)
        b, b_st = blk_chain(mem, vq, VIRTIO_BLK_T_OUT, 8, b"B" * 512)
        c, c_st = blk_chain(mem, vq, VIRTIO_BLK_T_IN, 16, read_len=512)
        with mmap.mmap(fd, size) as region:
            published = died == "after publishing"
            if published:   # C's used element and used->idx reached the guest
                mem.write(vq.used_gpa + 4, struct.pack("<II", c, 513))
                mem.write_u16(vq.used_gpa + 2, 1)
                assert [e.head for e in vq.get_used()] == [c]
            region[:HEADER.size] = HEADER.pack(0, 1, 128, c, 0)
            for head, counter in ((a, 5), (b, 6), (c, 7)):
                mark(region, head, counter)
            set_inflight(fe, fd, size)
            vq2 = fe.setup_vring(0, vq=vq, base=1 if published else 0)
            fe.set_vring_enable(0, True)
            want = [a, b] if published else [a, b, c]
            got = vq2.wait_used(5, min_count=len(want))
            assert [e.head for e in got] == want          # oldest first
            assert mem.read(a_st, 1)[0] == mem.read(b_st, 1)[0] == VIRTIO_BLK_S_OK
            if not published:
                assert mem.read(c_st, 1)[0] == VIRTIO_BLK_S_OK
            # Bookkeeping after the batch: nothing marked, used_idx caught up.
            used = 3
            assert HEADER.unpack_from(region)[4] == used
            assert all(region[HEADER.size + h * DESC.size] == 0 for h in (a, b, c))
        dev = VirtioBlkDevice(fe, mem, [vq2], None, acked, own_memory=False)
        assert dev.read(0, 1) == b"A" * 512 and dev.read(8, 1) == b"B" * 512
        assert fe.get_vring_base(0) == used + 2
        os.close(fd)
    d.wait_log(f"vring 0: resubmitting {len(want)} requests left in flight")
    assert d.rpc("vhost_get_queue_stats", ctrlr="vhost.0")[0]["resubmitted"] == len(want)
    assert "Traceback" not in d.log()


@pytest.mark.parametrize("damage", ["another ring size", "used_idx far from the ring", "batch list out of range"])
def test_an_inconsistent_buffer_is_ignored_with_a_warning_and_the_ring_serves(blk_daemon, mem, damage):
    d = blk_daemon
    wait_no_session(d, "vhost.0")
    fe, acked = handshake(d.socket("vhost.0"))
    with fe:
        fd, size = get_inflight(fe)
        with mmap.mmap(fd, size) as region:
            header = {"another ring size": HEADER.pack(0, 1, 64, 0, 0),
                      "used_idx far from the ring": HEADER.pack(0, 1, 128, 0, 30000),
                      "batch list out of range": HEADER.pack(0, 1, 128, 4000, 65535)}[damage]
            region[:HEADER.size] = header
            for h in range(128):    # everything "in flight": none of it may be resubmitted
                mark(region, h, h)
        set_inflight(fe, fd, size)
        os.close(fd)
        fe.set_mem_table(mem)
        vq = fe.setup_vring(0, 128, base=0)
        fe.set_vring_enable(0, True)
        dev = VirtioBlkDevice(fe, mem, [vq], None, acked, own_memory=False)
        dev.write(0, b"\x5a" * 512)
        assert dev.read(0, 1) == b"\x5a" * 512
        assert fe.get_vring_base(0) == 2
    d.wait_log("ignoring the front-end's inflight buffer")
    assert "resubmitting" not in d.log()


def test_a_hostile_buffer_marking_everything_in_flight_costs_only_that_connection(blk_daemon, mem):
    """Every head marked, the descriptor table all zeros: what is resubmitted is checked like
    any request from the ring; the daemon and the other controller carry on."""
    d = blk_daemon
    wait_no_session(d, "vhost.0")
    fe, _ = handshake(d.socket("vhost.0"))
    with fe:
        fd, size = get_inflight(fe)
        with mmap.mmap(fd, size) as region:
            region[:HEADER.size] = HEADER.pack(0, 1, 128, 0, 0)
            for h in range(128):
                mark(region, h, (h * 7919) % 128, next_=0xFFFF)
        set_inflight(fe, fd, size)
        os.close(fd)
        fe.set_mem_table(mem)
        fe.setup_vring(0, 128, base=0)
        fe.set_vring_enable(0, True)
        try:
            fe.ping()
        except ConnectionClosed:
            pass
    with connect(d, "vhost.1") as other:
        other.write(0, b"\x33" * 512)
        assert other.read(0, 1) == b"\x33" * 512
    assert d.alive() and "Traceback" not in d.log()


def _expect_drop(fe: VhostUserFrontend, request: int, payload: bytes, fds=()) -> None:
    fe.send(request, payload, fds)
    assert fe.wait_closed(5), "the daemon kept a connection that broke the protocol"


@pytest.mark.parametrize("num_queues,queue_size", [(0, 128), (17, 128), (1, 0), (1, 100), (1, 65535)])
def test_get_inflight_fd_with_impossible_geometry_drops_the_connection(blk_daemon, num_queues, queue_size):
    fe, _ = handshake(blk_daemon.socket("vhost.0"))
    with fe:
        _expect_drop(fe, R.GET_INFLIGHT_FD, INFLIGHT.pack(0, 0, num_queues, queue_size))
    assert blk_daemon.alive()


def test_inflight_messages_need_the_protocol_feature(blk_daemon):
    fe, _ = handshake(blk_daemon.socket("vhost.0"), inflight=False)
    with fe:
        _expect_drop(fe, R.GET_INFLIGHT_FD, INFLIGHT.pack(0, 0, 1, 128))


def test_set_inflight_fd_without_a_descriptor_drops_the_connection(blk_daemon):
    fe, _ = handshake(blk_daemon.socket("vhost.0"))
    with fe:
        _expect_drop(fe, R.SET_INFLIGHT_FD, INFLIGHT.pack(stride(128), 0, 1, 128))


def test_set_inflight_fd_with_a_buffer_too_small_is_refused(blk_daemon, tmp_path):
    fe, _ = handshake(blk_daemon.socket("vhost.0"))
    with fe:
        fd, size = get_inflight(fe)
        try:
            with pytest.raises(VhostUserNack):      # mmap_size smaller than the geometry needs
                fe.command(R.SET_INFLIGHT_FD, INFLIGHT.pack(size - 64, 0, 1, 128), [fd])
            with pytest.raises(VhostUserNack):      # the file itself is shorter than it says
                short = os.open(tmp_path / "short", os.O_RDWR | os.O_CREAT)
                try:
                    fe.command(R.SET_INFLIGHT_FD, INFLIGHT.pack(size, 0, 1, 128), [short])
                finally:
                    os.close(short)
            set_inflight(fe, fd, size)              # and the connection is still good
        finally:
            os.close(fd)
    assert "cannot map the inflight buffer" in blk_daemon.log()


def test_each_queue_recovers_from_its_own_part_of_the_buffer(blk_daemon, mem):
    """Two queues: only queue 1 had a request in flight, recorded in the second 64-byte
    aligned region of the buffer; it is resubmitted on queue 1 and queue 0 starts clean."""
    d = blk_daemon
    wait_no_session(d, "vhost.0")
    fe, acked = handshake(d.socket("vhost.0"))
    with fe:
        fd, size = get_inflight(fe, num_queues=2)
        fe.set_mem_table(mem)
        vq0, vq1 = SplitVirtqueue(mem, 128, index=0), SplitVirtqueue(mem, 128, index=1)
        head, st = blk_chain(mem, vq1, VIRTIO_BLK_T_OUT, 24, b"Q" * 512)
        with mmap.mmap(fd, size) as region:
            base = stride(128)
            region[:HEADER.size] = HEADER.pack(0, 1, 128, 0, 0)
            region[base:base + HEADER.size] = HEADER.pack(0, 1, 128, 0, 0)
            mark(region, head, 1, queue_base=base)
        set_inflight(fe, fd, size, num_queues=2)
        os.close(fd)
        q0 = fe.setup_vring(0, vq=vq0, base=0)
        q1 = fe.setup_vring(1, vq=vq1, base=0)
        fe.set_vring_enable(0, True)
        fe.set_vring_enable(1, True)
        assert [e.head for e in q1.wait_used(5)] == [head]
        assert mem.read(st, 1)[0] == VIRTIO_BLK_S_OK
        dev = VirtioBlkDevice(fe, mem, [q0, q1], None, acked, own_memory=False)
        assert dev.read(24, 1) == b"Q" * 512
        assert fe.get_vring_base(1) == 1 and fe.get_vring_base(0) == 1
    d.wait_log("vring 1: resubmitting 1 request left in flight")
    assert "vring 0: resubmitting" not in d.log()


# ---------------------------------------------------------------------------
# packed rings: QueueRegionPacked
# ---------------------------------------------------------------------------

#: QueueRegionPacked's header: features, version, desc_num, free_head, old_free_head,
#: used_idx, old_used_idx, used_wrap_counter, old_used_wrap_counter (then padding to 32).
PHEADER = struct.Struct("<QHHHHHHBB10x")
#: DescStatePacked: inflight, next, last, num, counter, id, flags, len, addr.
PDESC = struct.Struct("<BxHHHQHHIQ")


def pstride(queue_size: int) -> int:
    return (PHEADER.size + PDESC.size * queue_size + 63) & ~63


def packed_handshake(path: str) -> tuple[VhostUserFrontend, int]:
    fe = VhostUserFrontend(path)
    acked = (fe.get_features() & (DEFAULT_BLK_FEATURES | bit(VIRTIO_F_RING_PACKED))) \
        | bit(VHOST_USER_F_PROTOCOL_FEATURES)
    assert acked & bit(VIRTIO_F_RING_PACKED)
    offered = fe.get_protocol_features()
    fe.set_protocol_features(offered & (FRONTEND_PROTOCOL_FEATURES | bit(PF.INFLIGHT_SHMFD)))
    fe.set_owner()
    fe.set_features(acked)      # before GET_INFLIGHT_FD, as QEMU (>= 5.2) does
    return fe, acked


def test_get_inflight_fd_sizes_packed_regions_once_packed_rings_are_negotiated(blk_daemon):
    fe, _ = packed_handshake(blk_daemon.socket("vhost.0"))
    with fe:
        fd, size = get_inflight(fe, num_queues=2, queue_size=256)
        os.close(fd)
        assert size == 2 * pstride(256) > 2 * stride(256)


@pytest.mark.parametrize("died", ["before publishing", "after publishing"])
def test_packed_requests_left_in_flight_are_resubmitted_and_the_ring_resumes_after_them(
        blk_daemon, mem, died):
    """The previous process took A (write), B (write) and C (read), three descriptors each,
    from a 16-entry packed ring, and completed only C, whose used descriptor goes at ring
    position 0.  It died after linking C back on the free list and moving used_idx, either
    before writing that descriptor's flags (rolled back: A, B and C come back) or right
    after (committed: only A and B).  The front-end sends the base it started with (a
    packed ring has no index it could read back): the ring resumes after the nine
    descriptors taken, as the buffer says."""
    d = blk_daemon
    path = d.socket("vhost.0")
    wait_no_session(d, "vhost.0")
    fe, acked = packed_handshake(path)
    with fe:
        fd, size = get_inflight(fe, queue_size=16)
        fe.set_mem_table(mem)
        vq = PackedVirtqueue(mem, 16)
        start_base = vq.vring_base
        a, a_st = blk_chain(mem, vq, VIRTIO_BLK_T_OUT, 0, b"A" * 512)
        b, b_st = blk_chain(mem, vq, VIRTIO_BLK_T_OUT, 8, b"B" * 512)
        c, c_st = blk_chain(mem, vq, VIRTIO_BLK_T_IN, 16, read_len=512)
        assert vq.next_avail == 9
        descs = [vq.read_desc(i) for i in range(9)]     # (addr, len, id, flags) as taken
        with mmap.mmap(fd, size) as region:
            published = died == "after publishing"
            for e, (addr, length, id_, flags) in enumerate(descs):
                head = e - e % 3
                region[PHEADER.size + e * PDESC.size:PHEADER.size + (e + 1) * PDESC.size] = PDESC.pack(
                    1 if e == head else 0, e + 1, head + 2 if e == head else 0, 3 if e == head else 0,
                    5 + head // 3 if e == head else 0, id_, flags, length, addr)
            for e in range(9, 16):
                region[PHEADER.size + e * PDESC.size:PHEADER.size + (e + 1) * PDESC.size] = PDESC.pack(
                    0, e + 1, 0, 0, 0, 0, 0, 0, 0)
            # C's entries back on the free list (8 -> 9), free_head 6, used_idx 3; old_* before.
            region[PHEADER.size + 8 * PDESC.size + 2:PHEADER.size + 8 * PDESC.size + 4] = struct.pack("<H", 9)
            region[:PHEADER.size] = PHEADER.pack(0, 1, 16, 6, 9, 3, 0, 1, 1)
            if published:   # C's used descriptor reached the guest
                vq.write_desc(0, descs[0][0], 513, 0x8080 | 2, c)
                assert [e.head for e in vq.get_used()] == [c]
            set_inflight(fe, fd, size, queue_size=16)
            vq2 = fe.setup_vring(0, vq=vq, base=start_base)
            fe.set_vring_enable(0, True)
            want = [a, b] if published else [a, b, c]
            got = vq2.wait_used(5, min_count=len(want))
            assert [e.head for e in got] == want          # oldest first
            assert mem.read(a_st, 1)[0] == mem.read(b_st, 1)[0] == VIRTIO_BLK_S_OK
            if not published:
                assert mem.read(c_st, 1)[0] == VIRTIO_BLK_S_OK
            # Bookkeeping: nothing in flight, the used position after the nine descriptors.
            header = PHEADER.unpack_from(region)
            assert header[5:] == (9, 9, 1, 1), header
            assert all(region[PHEADER.size + e * PDESC.size] == 0 for e in range(16))
        dev = VirtioBlkDevice(fe, mem, [vq2], None, acked, own_memory=False)
        assert dev.read(0, 1) == b"A" * 512 and dev.read(8, 1) == b"B" * 512
        assert fe.get_vring_base(0) == packed_vring_base(15, 1, 15, 1)
        os.close(fd)
    d.wait_log(f"vring 0: resubmitting {len(want)} requests left in flight")
    assert "Traceback" not in d.log()


@pytest.mark.parametrize("damage", ["another ring size", "free list out of range", "more in flight than the ring"])
def test_an_inconsistent_packed_buffer_is_ignored_with_a_warning_and_the_ring_serves(blk_daemon, mem, damage):
    d = blk_daemon
    wait_no_session(d, "vhost.0")
    fe, acked = packed_handshake(d.socket("vhost.0"))
    with fe:
        fd, size = get_inflight(fe, queue_size=16)
        with mmap.mmap(fd, size) as region:
            region[:PHEADER.size] = {"another ring size": PHEADER.pack(0, 1, 64, 0, 0, 0, 0, 1, 1),
                                     "free list out of range": PHEADER.pack(0, 1, 16, 4000, 4000, 0, 0, 1, 1),
                                     "more in flight than the ring": PHEADER.pack(0, 1, 16, 0, 0, 0, 0, 1, 1)}[damage]
            for e in range(16):   # every entry a head "in flight" of 3 descriptors: 48 > 16
                region[PHEADER.size + e * PDESC.size:PHEADER.size + (e + 1) * PDESC.size] = PDESC.pack(
                    1, 0xFFFF, e, 3, e, e, 0, 16, 0)
        set_inflight(fe, fd, size, queue_size=16)
        os.close(fd)
        fe.set_mem_table(mem)
        vq = fe.setup_vring(0, 16)
        fe.set_vring_enable(0, True)
        dev = VirtioBlkDevice(fe, mem, [vq], None, acked, own_memory=False)
        dev.write(0, b"\x5a" * 512)
        assert dev.read(0, 1) == b"\x5a" * 512
        assert fe.get_vring_base(0) == packed_vring_base(6, 1, 6, 1)
    d.wait_log("ignoring the front-end's inflight buffer")
    assert "resubmitting" not in d.log()


def test_a_hostile_packed_buffer_costs_only_that_connection(blk_daemon, mem):
    """Heads in flight whose stored descriptors are junk (no end of chain, ids out of
    range, addresses outside memory): what is resubmitted is checked like the ring; the
    queue may break, the daemon and the other controller carry on."""
    d = blk_daemon
    wait_no_session(d, "vhost.0")
    fe, _ = packed_handshake(d.socket("vhost.0"))
    with fe:
        fd, size = get_inflight(fe, queue_size=16)
        with mmap.mmap(fd, size) as region:
            region[:PHEADER.size] = PHEADER.pack(0, 1, 16, 15, 15, 0, 0, 1, 1)
            for e in range(15):
                region[PHEADER.size + e * PDESC.size:PHEADER.size + (e + 1) * PDESC.size] = PDESC.pack(
                    1 if e < 5 else 0, (e * 7) % 16, e, 1 + e % 3, 100 - e, 0xFFFF - e, 1, 1 << 31, 1 << 50)
        set_inflight(fe, fd, size, queue_size=16)
        os.close(fd)
        fe.set_mem_table(mem)
        fe.setup_vring(0, 16)
        fe.set_vring_enable(0, True)
        try:
            fe.ping()
        except ConnectionClosed:
            pass
    with connect(d, "vhost.1") as other:
        other.write(0, b"\x33" * 512)
        assert other.read(0, 1) == b"\x33" * 512
    assert d.alive() and "Traceback" not in d.log()
