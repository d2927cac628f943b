"""Shared helpers of the vhost-user hostile-input and virtio-blk request tests.

They drive a real daemon (the ``blk_daemon`` fixture of conftest.py) through the
fake front-end of :mod:`vhost_core.testing`.
"""

from __future__ import annotations

import os
import select
import struct

from vhost_core.testing import VirtioBlkDevice, connect_blk
from vhost_core.testing.daemon import wait_in_flight, wait_no_session  # noqa: F401  (the tests' helpers)
from vhost_core.testing.constants import (
    VIRTIO_BLK_S_IOERR,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
)

NEXT = VRING_DESC_F_NEXT
WRITE = VRING_DESC_F_WRITE
BLK_HDR = struct.Struct("<IIQ")
GUARD = 512
GUARD_BYTE = 0xA5


def setup_blk_controllers(d) -> None:
    """vhost.0 on Malloc0 (8 MiB), vhost.1 on Malloc1 (2 MiB: the "other controller"),
    vhost.ro on Malloc2 (2 MiB, read-only), all 512-byte blocks."""
    d.rpc("bdev_malloc_create", num_blocks=16384, block_size=512, name="Malloc0")
    d.rpc("vhost_create_blk_controller", ctrlr="vhost.0", dev_name="Malloc0")
    d.rpc("bdev_malloc_create", num_blocks=4096, block_size=512, name="Malloc1")
    d.rpc("vhost_create_blk_controller", ctrlr="vhost.1", dev_name="Malloc1")
    d.rpc("bdev_malloc_create", num_blocks=4096, block_size=512, name="Malloc2")
    d.rpc("vhost_create_blk_controller", ctrlr="vhost.ro", dev_name="Malloc2", readonly=True)


def connect(d, ctrlr: str = "vhost.0", **kw) -> VirtioBlkDevice:
    wait_no_session(d, ctrlr)
    return connect_blk(d.socket(ctrlr), **kw)


def check_service(d, ctrlr: str, sector: int = 256) -> None:
    """A fresh, well-behaved front-end gets correct service on two queues."""
    with connect(d, ctrlr, num_queues=2) as dev:
        for q in (0, 1):
            data = os.urandom(8192)
            dev.write(sector + 16 * q, data, queue=q)
            assert dev.read(sector + 16 * q, 16, queue=q) == data


def assert_healthy(d, controllers=("vhost.0", "vhost.1")) -> None:
    """The daemon is alive, serves every controller, and printed no traceback."""
    assert d.alive(), d.log()
    for c in controllers:
        check_service(d, c)
    assert d.alive(), d.log()
    assert "Traceback" not in d.log(), d.log()


class Guarded:
    """``n`` bytes of guest memory with GUARD bytes of 0xA5 on both sides, to
    prove the device touched nothing but the buffer it was given."""

    def __init__(self, mem, n: int, fill: int | bytes = GUARD_BYTE) -> None:
        self.mem = mem
        self.n = n
        self.base = mem.alloc(n + 2 * GUARD, 512, zero=False)
        mem.fill(self.base, n + 2 * GUARD, GUARD_BYTE)
        self.gpa = self.base + GUARD
        if isinstance(fill, int):
            mem.fill(self.gpa, n, fill)
        else:
            assert len(fill) == n
            mem.write(self.gpa, fill)

    def read(self) -> bytes:
        return self.mem.read(self.gpa, self.n)

    def check_guards(self) -> None:
        before = self.mem.read(self.base, GUARD)
        after = self.mem.read(self.gpa + self.n, GUARD)
        assert before == bytes([GUARD_BYTE]) * GUARD, "device wrote before the buffer"
        assert after == bytes([GUARD_BYTE]) * GUARD, "device wrote after the buffer"

    def free(self) -> None:
        self.mem.free(self.base)


def blk_header(mem, type_: int, sector: int = 0) -> Guarded:
    g = Guarded(mem, 16, BLK_HDR.pack(type_, 0, sector))
    return g


def status_byte(mem) -> Guarded:
    return Guarded(mem, 1, 0xFF)


def run_chain(vq, bufs, *, indirect: bool = False, timeout: float = 5.0):
    """Make one chain available, kick, and return its completion (head, len)."""
    head = vq.add_chain(bufs, indirect=indirect)
    vq.kick(force=True)
    got = vq.wait_used(timeout)
    assert [e.head for e in got] == [head], got
    return got[0]


def expect_no_completion(vq, wait: float = 0.3) -> None:
    got = vq.wait_used(wait, raise_on_timeout=False)
    assert got == [], f"a malformed chain was completed: {got}"


def bad_buffer_request(dev, type_: int, buf_addr: int, buf_len: int, *, queue: int = 0):
    """A request whose data descriptor lies (partly) outside guest memory: the
    device must answer IOERR in the (valid) status byte and touch nothing else."""
    vq = dev.queues[queue]
    hdr = blk_header(dev.memory, type_, 0)
    st = status_byte(dev.memory)
    writable = type_ == 0  # VIRTIO_BLK_T_IN
    used = run_chain(vq, [(hdr.gpa, 16, False), (buf_addr, buf_len, writable), (st.gpa, 1, True)])
    assert st.read() == bytes([VIRTIO_BLK_S_IOERR]), f"status {st.read()!r}"
    assert used.len == 1
    for g in (hdr, st):
        g.check_guards()
    assert hdr.read() == BLK_HDR.pack(type_, 0, 0)
    hdr.free()
    st.free()


def eventfd_signalled(fd: int, timeout: float) -> bool:
    r, _, _ = select.select([fd], [], [], timeout)
    if r:
        os.eventfd_read(fd)
    return bool(r)
