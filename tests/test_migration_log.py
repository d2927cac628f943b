"""Dirty page logging for live migration, at the request level: the fake front-end
plays QEMU's part (SET_LOG_BASE with a memfd, VHOST_F_LOG_ALL, SET_VRING_ADDR with
VHOST_VRING_F_LOG) and reads the bitmap QEMU would read.  The real thing (two QEMUs,
a guest running fio verify while it moves) is in test_e2e_migration.py.

Bitmap layout (vhost-user spec, "Migration"): one bit per 4 KiB guest-physical page,
bit ``page % 8`` of byte ``page // 8``.
"""

from __future__ import annotations

import mmap
import os

import pytest

from blk_helpers import BLK_HDR, connect
from vhost_core.testing import DEFAULT_BLK_FEATURES, FRONTEND_PROTOCOL_FEATURES, ConnectionClosed
from vhost_core.testing.constants import (
    VHOST_F_LOG_ALL,
    VHOST_VRING_F_LOG,
    VIRTIO_F_RING_PACKED,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VhostUserProtocolFeature as PF,
    VhostUserRequest as R,
    bit,
)

PAGE = 4096
NEXT, WRITE = 1, 2


class DirtyLog:
    """QEMU's side of the log: a memfd bitmap covering ``mem_bytes`` of guest memory."""

    def __init__(self, mem_bytes: int, *, size: int | None = None) -> None:
        self.size = size if size is not None else (mem_bytes // PAGE + 7) // 8
        self.fd = os.memfd_create("vhost-log", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, max(self.size, 1))
        self.map = mmap.mmap(self.fd, max(self.size, 1))

    def pages(self) -> set[int]:
        out = set()
        for i, byte in enumerate(self.map[: self.size]):
            for b in range(8):
                if byte & (1 << b):
                    out.add(i * 8 + b)
        return out

    def clear(self) -> None:
        self.map[: self.size] = bytes(self.size)

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


def pages_of(gpa: int, length: int) -> set[int]:
    return set(range(gpa // PAGE, (gpa + length - 1) // PAGE + 1))


def start_logging(dev, dlog: DirtyLog) -> None:
    """What QEMU does when a migration starts: the log, LOG_ALL, used-ring logging."""
    fe = dev.frontend
    reply = fe.request(R.SET_LOG_BASE, dlog_payload(dlog.size, 0), [dlog.fd], reply_size=8)
    reply.close_fds()
    fe.set_features(dev.features | bit(VHOST_F_LOG_ALL))
    for vq in dev.queues:
        desc, used, avail = vq.uaddrs()
        # QEMU's log address of the "used" part: a packed ring's device event area.
        used_gpa = vq.device_gpa if getattr(vq, "packed", False) else vq.used_gpa
        fe.set_vring_addr(vq.index, desc, used, avail, flags=bit(VHOST_VRING_F_LOG), log=used_gpa)


def stop_logging(dev) -> None:
    fe = dev.frontend
    fe.set_features(dev.features)
    for vq in dev.queues:
        desc, used, avail = vq.uaddrs()
        fe.set_vring_addr(vq.index, desc, used, avail)


def dlog_payload(size: int, offset: int) -> bytes:
    return size.to_bytes(8, "little") + offset.to_bytes(8, "little")


def page_buffer(mem, npages: int) -> int:
    """A buffer of whole pages that shares no page with anything else."""
    return mem.alloc(npages * PAGE, PAGE)


def request(dev, type_: int, sector: int, buf: int, length: int, *, queue: int = 0) -> int:
    mem = dev.memory
    hdr = page_buffer(mem, 1)
    st = page_buffer(mem, 1)
    mem.write(hdr, BLK_HDR.pack(type_, 0, sector))
    mem.write(st, b"\xff")
    writable = type_ == VIRTIO_BLK_T_IN
    dev.chain(queue, [(hdr, BLK_HDR.size, False), (buf, length, writable), (st, 1, True)])
    status = mem.read(st, 1)[0]
    assert status == VIRTIO_BLK_S_OK
    return hdr, st


@pytest.fixture
def dev(blk_daemon):
    dev = connect(blk_daemon, "vhost.0", num_queues=2,
                  protocol_features=FRONTEND_PROTOCOL_FEATURES | bit(PF.LOG_SHMFD))
    try:
        yield dev
    finally:
        dev.close()


def test_the_target_offers_what_qemu_needs_to_migrate(dev):
    """QEMU refuses to migrate ('Migration disabled: vhost-user backend lacks
    VHOST_USER_PROTOCOL_F_LOG_SHMFD feature') unless both are offered."""
    assert dev.offered_features & bit(VHOST_F_LOG_ALL)
    assert dev.offered_protocol_features & bit(PF.LOG_SHMFD)


def test_pages_the_target_writes_are_logged_and_pages_it_only_reads_are_not(blk_daemon, dev):
    dlog = DirtyLog(dev.memory.size)
    try:
        start_logging(dev, dlog)
        assert "Controller vhost.0: dirty page logging started (live migration)" in blk_daemon.log()
        mem = dev.memory
        out = page_buffer(mem, 4)
        mem.write(out, os.urandom(4 * PAGE))
        dlog.clear()
        hdr, st = request(dev, VIRTIO_BLK_T_OUT, 64, out, 4 * PAGE)
        dirty = dlog.pages()
        # A write only reads the guest's data: its pages stay clean, the status
        # byte and the used ring do not.
        assert not dirty & pages_of(out, 4 * PAGE)
        assert not dirty & pages_of(hdr, 16)
        assert pages_of(st, 1) <= dirty
        used = dev.queues[0].used_gpa
        assert pages_of(used, 4) <= dirty

        inp = page_buffer(mem, 5)
        dlog.clear()
        request(dev, VIRTIO_BLK_T_IN, 64, inp, 5 * PAGE, queue=1)
        dirty = dlog.pages()
        assert pages_of(inp, 5 * PAGE) <= dirty
        assert pages_of(dev.queues[1].used_gpa, 4) <= dirty
        assert mem.read(inp, 4 * PAGE) == mem.read(out, 4 * PAGE)

        # Migration over (or cancelled): nothing is marked any more.
        stop_logging(dev)
        assert "Controller vhost.0: dirty page logging stopped" in blk_daemon.log()
        dlog.clear()
        request(dev, VIRTIO_BLK_T_IN, 64, inp, 5 * PAGE)
        assert dlog.pages() == set()
    finally:
        dlog.close()


def test_a_resized_log_replaces_the_old_one_while_requests_run(dev):
    """QEMU re-sends SET_LOG_BASE when guest memory grows during a migration."""
    first, second = DirtyLog(dev.memory.size), DirtyLog(dev.memory.size * 2)
    try:
        start_logging(dev, first)
        reply = dev.frontend.request(R.SET_LOG_BASE, dlog_payload(second.size, 0), [second.fd], reply_size=8)
        reply.close_fds()
        first.clear()
        inp = page_buffer(dev.memory, 2)
        request(dev, VIRTIO_BLK_T_IN, 0, inp, 2 * PAGE)
        assert pages_of(inp, 2 * PAGE) <= second.pages()
        assert first.pages() == set()
    finally:
        first.close()
        second.close()


@pytest.mark.parametrize("size, offset, fds, why", [
    (0, 0, 1, "Invalid argument"),
    (1 << 20, 0, 1, "past the end of its file"),
    (4096, 1 << 40, 1, "Invalid argument"),
    (4096, 0, 0, "expected 1"),
])
def test_a_bad_log_costs_only_that_connection(blk_daemon, dev, size, offset, fds, why):
    dlog = DirtyLog(dev.memory.size, size=4096)
    try:
        with pytest.raises(ConnectionClosed):
            dev.frontend.request(R.SET_LOG_BASE, dlog_payload(size, offset), [dlog.fd] * fds, reply_size=8)
        assert why in blk_daemon.log()
    finally:
        dlog.close()
    with connect(blk_daemon, "vhost.0") as other:
        data = os.urandom(4096)
        other.write(8, data)
        assert other.read(8, 8) == data


def test_a_log_too_small_for_guest_memory_is_reported_not_overrun(blk_daemon, dev):
    """A front-end that lies about the log's size gets pages past its end unlogged
    (and an error line), never a write past the mapping."""
    dlog = DirtyLog(dev.memory.size, size=1)      # covers the first 32 KiB only
    try:
        start_logging(dev, dlog)
        inp = page_buffer(dev.memory, 16)
        assert inp + 16 * PAGE > 8 * PAGE
        request(dev, VIRTIO_BLK_T_IN, 0, inp, 16 * PAGE)
        stop_logging(dev)
        assert "guest pages written outside the dirty log QEMU gave" in blk_daemon.log()
    finally:
        dlog.close()


def test_used_ring_logging_alone_does_not_move_a_running_ring(blk_daemon, dev):
    """SET_VRING_ADDR on a running ring may only switch logging: moving the ring is refused."""
    desc, used, avail = dev.queues[0].uaddrs()
    with pytest.raises(ConnectionClosed):
        dev.frontend.set_vring_addr(0, desc, used + 4096, avail)
        dev.frontend.ping()
    assert "addresses changed while it runs" in blk_daemon.log()


def test_a_log_shrunk_under_the_target_costs_only_that_connection(blk_daemon, dev):
    """The log is the front-end's memory: truncating its file under the mapping would
    SIGBUS the reactor at the next mark.  The guard turns that into a dropped session."""
    dlog = DirtyLog(dev.memory.size)
    try:
        start_logging(dev, dlog)
        dlog.map.close()
        os.ftruncate(dlog.fd, 0)
        inp = page_buffer(dev.memory, 1)
        hdr = page_buffer(dev.memory, 1)
        st = page_buffer(dev.memory, 1)
        dev.memory.write(hdr, BLK_HDR.pack(VIRTIO_BLK_T_IN, 0, 0))
        dev.chain(0, [(hdr, BLK_HDR.size, False), (inp, PAGE, True), (st, 1, True)])
        with pytest.raises(ConnectionClosed):
            dev.frontend.ping()
            dev.frontend.ping()
        assert "the dirty log lost its backing pages" in blk_daemon.log()
    finally:
        os.close(dlog.fd)
    with connect(blk_daemon, "vhost.0") as other:
        data = os.urandom(4096)
        other.write(8, data)
        assert other.read(8, 8) == data


def test_packed_ring_descriptors_the_target_writes_back_are_logged(blk_daemon):
    """A packed ring has no used ring: the device writes each used descriptor into the
    descriptor ring, and those entries must reach the destination too."""
    dev = connect(blk_daemon, "vhost.0", num_queues=1, queue_size=512,
                  features=DEFAULT_BLK_FEATURES | bit(VIRTIO_F_RING_PACKED),
                  protocol_features=FRONTEND_PROTOCOL_FEATURES | bit(PF.LOG_SHMFD))
    dlog = DirtyLog(dev.memory.size)
    try:
        start_logging(dev, dlog)
        vq = dev.queues[0]
        assert getattr(vq, "packed", False)
        mem = dev.memory
        out = page_buffer(mem, 2)
        mem.write(out, os.urandom(2 * PAGE))
        ring_pages = pages_of(vq.desc_gpa, 16 * vq.size)
        assert len(ring_pages) >= 2
        logged_ring = set()
        for i in range(200):     # 600 descriptors: the used position crosses every page of the ring
            pos = vq.last_used
            dlog.clear()
            hdr, st = request(dev, VIRTIO_BLK_T_OUT, 64, out, 2 * PAGE)
            dirty = dlog.pages()
            assert pages_of(vq.desc_gpa + 16 * pos, 16) <= dirty, (i, pos)
            assert pages_of(st, 1) <= dirty and not dirty & pages_of(out, 2 * PAGE)
            logged_ring |= dirty & ring_pages
            mem.free(hdr)
            mem.free(st)
        assert logged_ring == ring_pages
        inp = page_buffer(mem, 3)
        dlog.clear()
        request(dev, VIRTIO_BLK_T_IN, 64, inp, 2 * PAGE)
        assert pages_of(inp, 2 * PAGE) <= dlog.pages()
        stop_logging(dev)
        dlog.clear()
        request(dev, VIRTIO_BLK_T_IN, 64, inp, 2 * PAGE)
        assert dlog.pages() == set()
    finally:
        dlog.close()
        dev.close()
