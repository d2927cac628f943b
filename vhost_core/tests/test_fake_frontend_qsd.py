"""Validate the fake vhost-user frontend (vhost_core.testing) against a real
backend: qemu-storage-daemon's vhost-user-blk export.

Also contains backend-free unit tests of GuestMemory / SplitVirtqueue.
Skips the qsd tests when ``qemu-storage-daemon`` is not installed.
"""

from __future__ import annotations

import os
import pathlib
import random
import shutil
import subprocess
import time

import pytest


from vhost_core.testing import (  # noqa: E402
    DEFAULT_BLK_FEATURES,
    BlkIOError,
    BlkRequest,
    GuestMemory,
    GuestMemoryError,
    SplitVirtqueue,
    VhostUserFrontend,
    VirtioBlkConfig,
    VirtqueueError,
    connect_blk,
    vring_need_event,
)
from vhost_core.testing.constants import (  # noqa: E402
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_FLAG_REPLY,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VhostUserProtocolFeature as PF,
    VhostUserRequest as R,
    VirtioBlkFeature as BF,
    bit,
)
# Fixtures (guest_memory, vhost_blk_factory, vhost_frontend_factory) come from the
# vhost_core.testing pytest plugin (-p vhost_core.testing.pytest_plugin in the root pyproject.toml).

QSD = shutil.which("qemu-storage-daemon")
IMAGE_SIZE = 64 << 20
SECTOR = 512

# ---------------------------------------------------------------------------
# backend-free unit tests
# ---------------------------------------------------------------------------


def test_guest_memory_layout_and_allocator():
    with GuestMemory.pc_like(16 << 20) as mem:
        r0, r1 = mem.regions
        assert (r0.gpa, r0.size) == (0, 8 << 20)
        assert (r1.gpa, r1.size) == (4 << 30, 8 << 20)
        assert r0.fd == r1.fd and r1.mmap_offset == r0.size  # one shared memfd
        assert r0.uaddr != r1.uaddr
        assert mem.uaddr(r1.gpa + 5) == r1.uaddr + 5
        assert mem.gpa_of_uaddr(r1.uaddr + 5) == r1.gpa + 5
        a = mem.alloc(100, 512)
        assert a != 0 and a % 512 == 0
        mem.write(a, b"hello")
        assert mem.read(a, 5) == b"hello"
        # data is visible through the memfd, i.e. to a backend mapping it
        assert os.pread(r0.fd, 5, r0.mmap_offset + a) == b"hello"
        hi = mem.alloc(4096, 4096, region=1)
        mem.write(hi, b"x" * 4096)
        assert os.pread(r1.fd, 1, r1.mmap_offset + hi - r1.gpa) == b"x"
        with pytest.raises(GuestMemoryError):
            mem.read(8 << 20, 1)  # the gap
        mem.free(a)
        mem.free(hi)
        assert mem.allocated == 0
        with pytest.raises(GuestMemoryError):
            mem.alloc(9 << 20)


def test_guest_memory_separate_fds_fake_uaddr():
    base = 0x5555_0000_0000
    with GuestMemory([(0, 1 << 20), (1 << 20, 1 << 20)], separate_fds=True,
                     fake_uaddr_base=base) as mem:
        r0, r1 = mem.regions
        assert r0.fd != r1.fd and r0.mmap_offset == r1.mmap_offset == 0
        assert r0.uaddr == base and r1.uaddr > r0.uaddr + r0.size
        # contiguous GPAs: accesses may straddle regions
        mem.write((1 << 20) - 2, b"abcd")
        assert mem.read((1 << 20) - 2, 4) == b"abcd"


def test_split_ring_layout_and_chains(guest_memory):
    vq = SplitVirtqueue(guest_memory, 8, event_idx=True)
    try:
        assert vq.desc_gpa % 16 == 0 and vq.avail_gpa % 2 == 0 and vq.used_gpa % 4 == 0
        head = vq.add_chain([(0x2000, 16, False), (0x3000, 512, True)])
        addr, ln, fl, nxt = vq.read_desc(head)
        assert (addr, ln, fl) == (0x2000, 16, VRING_DESC_F_NEXT)
        assert vq.read_desc(nxt)[:3] == (0x3000, 512, VRING_DESC_F_WRITE)
        assert vq.read_avail_idx() == 1 and vq.num_free == 6
        ih = vq.add_chain([(0x2000, 16, False), (0x3000, 1, True)], indirect=True)
        taddr, tlen, tfl, _ = vq.read_desc(ih)
        assert tfl == VRING_DESC_F_INDIRECT and tlen == 32
        assert vq.read_desc(1, table_gpa=taddr)[:3] == (0x3000, 1, VRING_DESC_F_WRITE)
        # play device: complete the indirect chain first
        guest_memory.write(vq.used_gpa + 4, (ih).to_bytes(4, "little") + (1).to_bytes(4, "little"))
        guest_memory.write_u16(vq.used_gpa + 2, 1)
        (el,) = vq.get_used()
        assert tuple(el) == (ih, 1) and vq.used_event == 1 and vq.num_free == 6
        # a bogus completion is a device bug
        guest_memory.write(vq.used_gpa + 12, (7).to_bytes(4, "little") + bytes(4))
        guest_memory.write_u16(vq.used_gpa + 2, 2)
        with pytest.raises(VirtqueueError):
            vq.get_used()
    finally:
        vq.close()


def test_vring_need_event():
    assert vring_need_event(0, 1, 0)
    assert not vring_need_event(5, 3, 0)
    assert vring_need_event(0xFFFF, 0, 0xFFFE)  # wrap-around


def test_blk_config_roundtrip():
    cfg = VirtioBlkConfig(capacity=123, seg_max=126, blk_size=4096, num_queues=3,
                          max_write_zeroes_seg=1, write_zeroes_may_unmap=1)
    raw = cfg.pack()
    assert len(raw) == 60 and raw[:8] == (123).to_bytes(8, "little")
    assert raw[34:36] == (3).to_bytes(2, "little") and raw[56] == 1
    assert VirtioBlkConfig.parse(raw) == cfg
    assert VirtioBlkConfig.parse(raw[:8]).capacity == 123  # short config


# ---------------------------------------------------------------------------
# against qemu-storage-daemon
# ---------------------------------------------------------------------------


class Qsd:
    def __init__(self, tmp_path: pathlib.Path, num_queues: int = 2) -> None:
        self.image = tmp_path / "disk.raw"
        with open(self.image, "wb") as f:
            f.truncate(IMAGE_SIZE)
        self.sock = str(tmp_path / "vhost.sock")
        self.log = open(tmp_path / "qsd.log", "w+b")
        self.proc = subprocess.Popen(
            [QSD,
             "--blockdev", f"driver=file,filename={self.image},node-name=f0",
             "--export", "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,"
                         f"addr.path={self.sock},writable=on,num-queues={num_queues}"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"qemu-storage-daemon did not start: {self.output()}")
            time.sleep(0.02)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def file_data(self, offset: int, n: int) -> bytes:
        with open(self.image, "rb") as f:
            return os.pread(f.fileno(), n, offset)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture
def qsd(tmp_path):
    assert QSD is not None, "qemu-storage-daemon is missing: scripts/install.sh --test installs qemu-utils"
    d = Qsd(tmp_path)
    try:
        yield d
        assert d.proc.poll() is None, f"qemu-storage-daemon died: {d.output()}"
    finally:
        d.stop()


def test_handshake_and_config(qsd, vhost_blk_factory):
    dev = vhost_blk_factory(qsd.sock, num_queues=2)
    assert dev.features & bit(VIRTIO_F_VERSION_1)
    assert dev.features & bit(VHOST_USER_F_PROTOCOL_FEATURES)
    assert dev.protocol_features & bit(PF.CONFIG)
    assert dev.protocol_features & bit(PF.MQ)
    assert dev.config is not None
    assert dev.config.capacity == IMAGE_SIZE // SECTOR
    assert dev.config.num_queues == 2
    assert dev.has_feature(BF.FLUSH)
    assert len(dev.queues) == 2


def test_io_two_queues_many_in_flight(qsd, vhost_blk_factory):
    dev = vhost_blk_factory(qsd.sock, num_queues=2, queue_size=64)
    rng = random.Random(1234)
    reqs, expect = [], {}
    sector = 0
    for i in range(32):
        n = rng.randint(1, 32)
        data = rng.randbytes(n * SECTOR)
        expect[sector] = data
        reqs.append(BlkRequest(VIRTIO_BLK_T_OUT, sector, data, queue=i % 2,
                               indirect=bool(i % 3 == 0), seg_size=4096 if i % 4 == 1 else None))
        sector += n + rng.randint(0, 8)
    results = dev.submit_many(reqs)
    assert [r.status for r in results] == [VIRTIO_BLK_S_OK] * len(reqs)
    # 32 chains went out with a handful of kicks: they were really in flight together
    assert sum(q.kicks for q in dev.queues) < len(reqs)
    dev.flush(queue=1)

    reads = [BlkRequest(VIRTIO_BLK_T_IN, s, b"", len(d), queue=(k + 1) % 2,
                        indirect=bool(k % 2))
             for k, (s, d) in enumerate(expect.items())]
    for res, (s, d) in zip(dev.submit_many(reads), expect.items()):
        assert res.status == VIRTIO_BLK_S_OK
        assert res.data == d
        assert res.used_len >= len(d)  # data + status byte per spec
        assert qsd.file_data(s * SECTOR, len(d)) == d  # landed in the host file

    assert dev.memory.allocated == sum(
        16 * q.size + 6 + 2 * q.size + 6 + 8 * q.size for q in dev.queues)  # no buffer leak
    # GET_VRING_BASE reports how many requests the backend consumed on each ring
    n0 = sum(1 for r in reqs + reads if r.queue == 0) + 0
    n1 = sum(1 for r in reqs + reads if r.queue == 1) + 1  # + flush
    assert dev.frontend.get_vring_base(0) == n0
    assert dev.frontend.get_vring_base(1) == n1


def test_get_id_and_errors(qsd, vhost_blk_factory):
    dev = vhost_blk_factory(qsd.sock, num_queues=1)
    ident = dev.get_id()
    assert ident and len(ident) <= 20
    assert dev.submit(99).status == VIRTIO_BLK_S_UNSUPP
    res = dev.submit(VIRTIO_BLK_T_IN, dev.capacity, b"", SECTOR)
    assert res.status == VIRTIO_BLK_S_IOERR
    with pytest.raises(BlkIOError):
        dev.read(dev.capacity - 1, 2)


def test_write_zeroes_and_discard(qsd, vhost_blk_factory):
    dev = vhost_blk_factory(qsd.sock)
    dev.write(100, b"\xaa" * 8 * SECTOR)
    if dev.has_feature(BF.WRITE_ZEROES):
        dev.write_zeroes(102, 2)
        got = dev.read(100, 8)
        assert got == b"\xaa" * 2 * SECTOR + bytes(2 * SECTOR) + b"\xaa" * 4 * SECTOR
    if dev.has_feature(BF.DISCARD):
        dev.discard(104, 4)


def test_reconnect(qsd):
    data = os.urandom(64 * SECTOR)
    with connect_blk(qsd.sock, num_queues=2) as dev:
        dev.write(2048, data, queue=1)
        dev.flush()
    # new connection, new guest RAM with another layout and ring placement
    mem = GuestMemory([(0x10000, 4 << 20), (1 << 32, 4 << 20)], separate_fds=True)
    try:
        with connect_blk(qsd.sock, num_queues=2, memory=mem, legacy_layout=True,
                         indirect=True) as dev:
            assert dev.read(2048, 64, queue=0) == data
            assert dev.read(2048, 64, queue=1) == data
    finally:
        mem.close()
    with connect_blk(qsd.sock, num_queues=1) as dev:
        assert dev.read(2048, 64) == data


def test_no_event_idx_no_indirect_interrupts_required(qsd):
    feats = DEFAULT_BLK_FEATURES & ~bit(VIRTIO_RING_F_EVENT_IDX) & ~bit(VIRTIO_RING_F_INDIRECT_DESC)
    with connect_blk(qsd.sock, features=feats, require_interrupts=True,
                     protocol_features=bit(PF.CONFIG)) as dev:  # no REPLY_ACK, no MQ
        assert not dev.features & bit(VIRTIO_RING_F_EVENT_IDX)
        assert not dev.frontend.reply_ack_enabled
        data = os.urandom(4 * SECTOR)
        results = dev.submit_many([BlkRequest(VIRTIO_BLK_T_OUT, 8 * i, data) for i in range(8)],
                                  timeout=5)
        assert all(r.status == VIRTIO_BLK_S_OK for r in results)
        assert dev.read(56, 4) == data


def test_raw_and_typed_messages(qsd, vhost_frontend_factory, guest_memory):
    fe: VhostUserFrontend = vhost_frontend_factory(qsd.sock)
    fe.send(R.GET_FEATURES)
    msg = fe.recv()
    assert msg.request == R.GET_FEATURES and msg.flags & VHOST_USER_FLAG_REPLY
    assert msg.u64() == fe.get_features()
    offered = fe.get_protocol_features()
    fe.set_protocol_features(offered & (bit(PF.REPLY_ACK) | bit(PF.MQ) | bit(PF.CONFIG)))
    assert fe.reply_ack_enabled == bool(offered & bit(PF.REPLY_ACK))
    assert fe.get_queue_num() >= 2
    fe.set_owner()
    cfg = VirtioBlkConfig.parse(fe.get_config(0, 60))
    assert cfg.capacity == IMAGE_SIZE // SECTOR
    # a short read at offset 0 (qsd 7.2 ignores non-zero offsets, QEMU never sends them)
    assert fe.get_config(0, 8) == cfg.capacity.to_bytes(8, "little")
    fe.set_features(fe.features & (bit(VIRTIO_F_VERSION_1) | bit(VHOST_USER_F_PROTOCOL_FEATURES)))
    fe.set_mem_table(guest_memory)
    vq = fe.setup_vring(0, 16, enable=True)
    # hand-build a read request in the high region
    hdr = guest_memory.alloc_bytes(VIRTIO_BLK_T_IN.to_bytes(4, "little") + bytes(12), region=1)
    buf = guest_memory.alloc(SECTOR, SECTOR, region=1)
    st = guest_memory.alloc_bytes(b"\xff", region=1)
    head = vq.add_chain([(hdr, 16, False), (buf, SECTOR, True), (st, 1, True)])
    vq.kick()
    (el,) = vq.wait_used(5)
    assert el.head == head and guest_memory.read(st, 1) == bytes([VIRTIO_BLK_S_OK])
    assert fe.get_vring_base(0) == 1
    assert fe.ping()
