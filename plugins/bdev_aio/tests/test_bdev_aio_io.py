"""I/O through bdev_aio with the fake front-end (no VM): data lands in the backing file,
unaligned guest buffers are bounced, the queue overflows gracefully, flushed data
survives SIGKILL, a rescan reaches new connections, and kernel errors fail only the
request that met them."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import struct
import subprocess
import time

import pytest

from vhost_core.testing import BlkRequest, connect_blk
from vhost_core.testing.daemon import wait_in_flight
from vhost_core.testing.constants import (
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
)

SECTOR = 512
MAX_TRANSFER = 4 << 20      # VN_MAX_TRANSFER
F_DISCARD = 13
F_WRITE_ZEROES = 14
ENGINES = ("aio", "io_uring")


def _setup(d, path, *, name="aio0", ctrlr="vhost.0", **kw) -> None:
    d.rpc("bdev_aio_create", filename=str(path), name=name, **kw)
    d.rpc("vhost_create_blk_controller", ctrlr=ctrlr, dev_name=name)


def _file_bytes(path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def _stats(d, name="aio0") -> dict:
    return d.rpc("bdev_aio_get_stats", name=name)[0]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("block_size", [512, 4096])
def test_round_trips_land_in_the_backing_file(vhost_daemon, backing_dir, helpers, engine, block_size):
    d = vhost_daemon
    f = helpers.make_file(backing_dir / "disk.img", 16 << 20)
    _setup(d, f, block_size=block_size, engine=engine)
    with connect_blk(d.socket("vhost.0"), num_queues=2) as dev:
        assert dev.capacity == (16 << 20) // SECTOR
        assert dev.config.blk_size == block_size
        assert dev.has_feature(F_DISCARD) and dev.has_feature(F_WRITE_ZEROES)
        data = os.urandom(256 << 10)
        dev.write(2048, data)
        dev.write(8192, data[:64 << 10], queue=1)
        dev.flush()
        assert dev.read(2048, len(data) // SECTOR, queue=1) == data
        assert _file_bytes(f, 2048 * SECTOR, len(data)) == data
        assert _file_bytes(f, 8192 * SECTOR, 64 << 10) == data[:64 << 10]
        # unmap punches a hole: zeros, and the blocks are given back to the filesystem
        allocated = os.stat(f).st_blocks
        dev.discard(2048, 128)
        assert dev.read(2048, 128) == bytes(128 * SECTOR)
        assert os.stat(f).st_blocks <= allocated - 128
        # write_zeroes
        dev.write_zeroes(2048 + 256, 64)
        assert dev.read(2048 + 128, 256) == data[128 * SECTOR:256 * SECTOR] + bytes(64 * SECTOR) \
            + data[320 * SECTOR:384 * SECTOR]
        # a large write_zeroes, beyond one zero-buffer chunk
        dev.write_zeroes(0, 8192)
        assert _file_bytes(f, 0, 4 << 20) == bytes(4 << 20)
        # out of range: an I/O error for that request, not a crash
        res = dev.submit(VIRTIO_BLK_T_IN, (16 << 20) // SECTOR, b"", 4096)
        assert res.status == VIRTIO_BLK_S_IOERR
    s = _stats(d)
    assert s["engine"] == engine
    assert s["completed"]["flush"] >= 1 and s["completed"]["unmap"] == 1
    assert s["completed"]["write_zeroes"] == 2
    assert s["io_errors"] == 0 and s["bounced"] == 0


def _odd_chain(dev, type_: int, sector: int, payload: bytes | None, length: int, misalign: int):
    """One request whose data buffer starts `misalign` bytes past a 512-byte boundary."""
    mem = dev.memory
    hdr = mem.alloc_bytes(struct.pack("<IIQ", type_, 0, sector), 16)
    buf = mem.alloc(length + 4096, 4096)
    data_gpa = buf + misalign
    if payload is not None:
        mem.write(data_gpa, payload)
    st = mem.alloc_bytes(b"\xff", 1)
    vq = dev.queues[0]
    vq.add_chain([(hdr, 16, False), (data_gpa, length, type_ == VIRTIO_BLK_T_IN), (st, 1, True)])
    vq.kick(force=True)
    vq.wait_used(timeout=10)
    status = mem.read(st, 1)[0]
    out = mem.read(data_gpa, length)
    for g in (hdr, buf, st):
        mem.free(g)
    return status, out


@pytest.mark.parametrize("engine", ENGINES)
def test_unaligned_guest_buffers_go_through_bounce_buffers(vhost_daemon, backing_dir, helpers, engine):
    d = vhost_daemon
    f = helpers.make_file(backing_dir / "disk.img", 4 << 20)
    _setup(d, f, engine=engine)
    with connect_blk(d.socket("vhost.0")) as dev:
        # lengths not a multiple of 512 (segments of 1000 bytes)
        data = os.urandom(64 << 10)
        dev.write(100, data, seg_size=1000)
        assert dev.read(100, 128, seg_size=1000) == data
        assert dev.read(100, 128) == data
        # addresses off the 512-byte grid, lengths fine
        data2 = os.urandom(8192)
        assert _odd_chain(dev, VIRTIO_BLK_T_OUT, 400, data2, 8192, misalign=8)[0] == VIRTIO_BLK_S_OK
        status, got = _odd_chain(dev, VIRTIO_BLK_T_IN, 400, None, 8192, misalign=24)
        assert status == VIRTIO_BLK_S_OK and got == data2
        # a large unaligned request (beyond the cached bounce sizes)
        big = os.urandom(2 << 20)
        dev.write(2048, big, seg_size=(1 << 20) - 8)
        assert dev.read(2048, len(big) // SECTOR, seg_size=(64 << 10) - 8) == big
    assert _file_bytes(f, 100 * SECTOR, len(data)) == data
    assert _file_bytes(f, 400 * SECTOR, 8192) == data2
    assert _file_bytes(f, 2048 * SECTOR, len(big)) == big
    s = _stats(d)
    assert s["bounced"] >= 6 and s["io_errors"] == 0


@pytest.mark.parametrize("engine", ENGINES)
def test_a_transfer_over_the_maximum_fails_and_moves_nothing(vhost_daemon, backing_dir, helpers, engine):
    """VN_MAX_TRANSFER bounds one READ or WRITE, and with it a bounce buffer and an
    io_uring SQE's length: exactly the maximum works, misaligned (bounced whole);
    a block more fails with E2BIG without touching the file or the guest buffer."""
    d = vhost_daemon
    f = helpers.make_file(backing_dir / "disk.img", 16 << 20)
    _setup(d, f, engine=engine)
    with connect_blk(d.socket("vhost.0"), memory_mb=32, queue_size=256, indirect=True) as dev:
        data = os.urandom(MAX_TRANSFER)
        dev.write(0, data, seg_size=20000, indirect=True)
        assert dev.read(0, MAX_TRANSFER // SECTOR, seg_size=30000, indirect=True) == data
        r = dev.submit(VIRTIO_BLK_T_OUT, 0, b"\x5a" * (MAX_TRANSFER + SECTOR))
        assert r.status == VIRTIO_BLK_S_IOERR
        r = dev.submit(VIRTIO_BLK_T_IN, 0, b"", MAX_TRANSFER + SECTOR, seg_size=20000, indirect=True)
        assert r.status == VIRTIO_BLK_S_IOERR
    assert _file_bytes(f, 0, MAX_TRANSFER + SECTOR) == data + bytes(SECTOR)
    s = _stats(d)
    assert (s["bytes_written"], s["bytes_read"], s["bounced"]) == (MAX_TRANSFER, MAX_TRANSFER, 2)
    if s["io_errors"]:          # refused here, not by the device type already
        assert s["last_error"]["errno"] == errno.E2BIG


@pytest.mark.parametrize("engine", ENGINES)
def test_more_requests_than_the_kernel_queue_wait_and_all_complete(vhost_daemon, backing_dir, helpers,
                                                                   engine):
    d = vhost_daemon
    f = helpers.make_file(backing_dir / "disk.img", 16 << 20)
    _setup(d, f, engine=engine)
    # 2 queues x 256 requests in flight (indirect descriptors) > 256 per channel
    n = 512
    blobs = [os.urandom(4096) for _ in range(n)]
    with connect_blk(d.socket("vhost.0"), num_queues=2, queue_size=256, indirect=True) as dev:
        res = dev.submit_many([BlkRequest(VIRTIO_BLK_T_OUT, i * 8, blobs[i], queue=i % 2) for i in range(n)],
                              timeout=60)
        assert all(r.status == VIRTIO_BLK_S_OK for r in res)
        dev.flush()
        res = dev.submit_many([BlkRequest(VIRTIO_BLK_T_IN, i * 8, b"", 4096, queue=(i + 1) % 2)
                               for i in range(n)], timeout=60)
        assert [r.data for r in res] == blobs
    assert _file_bytes(f, 0, n * 4096) == b"".join(blobs)
    s = _stats(d)
    assert s["queued_full"] > 0, s          # the queue did fill up ...
    assert s["io_errors"] == 0           # ... and nothing failed because of it
    assert s["completed"]["write"] == n and s["completed"]["read"] == n


def test_flushed_data_survives_sigkill(tmp_path, backing_dir, helpers):
    from vhost_core.testing.daemon import VhostDaemon

    f = helpers.make_file(backing_dir / "disk.img", 8 << 20)
    d = VhostDaemon(tmp_path / "v").start()
    try:
        _setup(d, f)
        data = os.urandom(1 << 20)
        with connect_blk(d.socket("vhost.0"), num_queues=2) as dev:
            dev.write(0, data[: 512 << 10])
            dev.write(1024, data[512 << 10:], queue=1)
            dev.flush()
            assert _stats(d)["completed"]["flush"] == 1
            d.stop(signal.SIGKILL)
    finally:
        d.stop()
    assert d.proc.returncode == -signal.SIGKILL
    assert _file_bytes(f, 0, 1 << 20) == data


def test_rescan_shows_the_new_size_to_a_new_connection(vhost_daemon, backing_dir, helpers):
    d = vhost_daemon
    f = helpers.make_file(backing_dir / "disk.img", 8 << 20)
    _setup(d, f)
    with connect_blk(d.socket("vhost.0")) as dev:
        assert dev.capacity == 16384
    with open(f, "r+b") as fh:
        fh.truncate(16 << 20)
    assert d.rpc("bdev_aio_rescan", name="aio0") is True
    assert d.rpc("bdev_get_bdevs", name="aio0")[0]["num_blocks"] == 32768
    assert "bdev aio0: size changed from 16384 to 32768 blocks" in d.log()
    with connect_blk(d.socket("vhost.0")) as dev:
        assert dev.capacity == 32768
        dev.write(30000, b"\x77" * 4096)
        assert dev.read(30000, 8) == b"\x77" * 4096
    # a size that is not a multiple of the block size is refused, and the bdev keeps its size
    with open(f, "r+b") as fh:
        fh.truncate((4 << 20) + 100)
    with pytest.raises(Exception) as ei:
        d.rpc("bdev_aio_rescan", name="aio0")
    assert "not a positive multiple of the block size 512" in str(ei.value)
    assert d.rpc("bdev_get_bdevs", name="aio0")[0]["num_blocks"] == 32768
    # shrinking: requests past the new end fail
    with open(f, "r+b") as fh:
        fh.truncate(4 << 20)
    d.rpc("bdev_aio_rescan", name="aio0")
    with connect_blk(d.socket("vhost.0")) as dev:
        assert dev.capacity == 8192
        assert dev.submit(VIRTIO_BLK_T_IN, 30000, b"", 4096).status == VIRTIO_BLK_S_IOERR


def test_file_truncated_under_the_bdev_fails_only_reads_past_the_end(vhost_daemon, backing_dir, helpers):
    """A short read (the file shrank without a rescan) is an I/O error for that request."""
    d = vhost_daemon
    f = helpers.make_file(backing_dir / "disk.img", 8 << 20)
    _setup(d, f)
    with connect_blk(d.socket("vhost.0")) as dev:
        dev.write(0, b"\x11" * 4096)
        with open(f, "r+b") as fh:
            fh.truncate(1 << 20)
        res = dev.submit_many([BlkRequest(VIRTIO_BLK_T_IN, 0, b"", 4096),
                               BlkRequest(VIRTIO_BLK_T_IN, 4096, b"", 4096),
                               BlkRequest(VIRTIO_BLK_T_IN, 8, b"", 4096)])
        assert [r.status for r in res] == [VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK]
        assert res[0].data == b"\x11" * 4096
    s = _stats(d)
    assert s["errors"]["read"] == 1
    assert s["first_error"] == {"io_type": "read", "errno": 5, "error": "Input/output error",
                                "offset_blocks": 4096, "num_blocks": 8}
    d.wait_log("bdev aio0: read of 8 blocks at block 4096")


EXT4_IOC_SHUTDOWN = 0x8004587D
EXT4_GOING_FLAGS_NOLOGFLUSH = 2


@pytest.mark.parametrize("engine", ENGINES)
def test_kernel_io_errors_fail_only_their_request_and_are_logged_rate_limited(tmp_path, helpers, mounts,
                                                                           engine):
    """Real errors from the kernel, on a small ext4 on a loop device: ENOSPC for writes
    into holes once the filesystem is full, then EIO for everything once the filesystem
    is shut down.  Another controller keeps serving."""
    from vhost_core.testing.daemon import VhostDaemon

    mp = mounts("ext4", size_mb=16)
    f = helpers.make_file(mp / "disk.img", 32 << 20)      # sparse: larger than the filesystem
    d = VhostDaemon(tmp_path / "v", env={"VHOST_BDEV_AIO_ERROR_SUMMARY_S": "2"}).start()
    try:
        _setup(d, f, engine=engine)
        d.rpc("bdev_malloc_create", num_blocks=2048, block_size=512, name="Malloc0")
        d.rpc("vhost_create_blk_controller", ctrlr="vhost.1", dev_name="Malloc0")
        chunk = os.urandom(1 << 20)
        with connect_blk(d.socket("vhost.0")) as dev:
            dev.write(0, chunk)                                  # allocated: rewriting it never fails
            statuses = [dev.submit(VIRTIO_BLK_T_OUT, 2048 * (i + 1), chunk).status for i in range(24)]
            assert VIRTIO_BLK_S_IOERR in statuses, "the 16 MiB filesystem never filled up"
            assert statuses[0] == VIRTIO_BLK_S_OK
            res = dev.submit_many([BlkRequest(VIRTIO_BLK_T_OUT, 0, chunk),
                                   BlkRequest(VIRTIO_BLK_T_OUT, 2048 * 30, chunk),
                                   BlkRequest(VIRTIO_BLK_T_IN, 0, b"", 1 << 20)])
            assert [r.status for r in res] == [VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK]
            assert res[2].data == chunk
            enospc = _stats(d)
            assert enospc["last_error"]["errno"] == 28 and enospc["errors"]["write"] >= 2
            log = d.wait_log("bdev aio0: write of 2048 blocks", timeout=5)
            assert "No space left on device (ENOSPC)" in log and "summarised every 2 s" in log
            # Now every request fails with EIO: shut the filesystem down under the bdev.
            fd = os.open(mp, os.O_RDONLY)
            try:
                fcntl.ioctl(fd, EXT4_IOC_SHUTDOWN, struct.pack("I", EXT4_GOING_FLAGS_NOLOGFLUSH))
            finally:
                os.close(fd)
            for _ in range(3):
                res = dev.submit_many([BlkRequest(VIRTIO_BLK_T_IN, 8 * i, b"", 4096) for i in range(100)])
                assert all(r.status == VIRTIO_BLK_S_IOERR for r in res)
            with connect_blk(d.socket("vhost.1")) as other:
                other.write(0, chunk[:4096])
                assert other.read(0, 8) == chunk[:4096]
        s = _stats(d)
        assert s["errors"]["read"] == 300 and s["last_error"]["errno"] == 5
        log = d.wait_log("in total: read 300", timeout=10)
        assert "Input/output error (EIO)" in log
        errors = [ln for ln in d.log().splitlines() if "*ERROR*" in ln and "aio0" in ln]
        # the first error and one summary (two on a very slow machine): not 300+ lines
        assert 2 <= len(errors) <= 3, errors
        assert d.alive()
        d.rpc("vhost_delete_controller", ctrlr="vhost.0")
        d.rpc("bdev_aio_delete", name="aio0")    # releases the file so that it can be unmounted
    finally:
        assert d.stop() == 0


def _open_files(pid: int) -> list[str]:
    """Targets of a process's fds; an fd may close between listing and reading it."""
    out = []
    for x in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{x}"))
        except FileNotFoundError:
            pass
    return out


def test_deleting_the_bdev_under_a_connected_front_end_fails_its_io_and_closes_the_file(
        vhost_daemon, backing_dir, helpers):
    d = vhost_daemon
    f = helpers.make_file(backing_dir / "disk.img", 4 << 20)
    _setup(d, f)
    with connect_blk(d.socket("vhost.0"), num_queues=2) as dev:
        dev.write(0, b"\x42" * 65536)
        d.rpc("bdev_aio_delete", name="aio0")
        assert dev.submit(VIRTIO_BLK_T_IN, 0, b"", 4096).status == VIRTIO_BLK_S_IOERR
    assert d.rpc("bdev_get_bdevs") == []
    assert str(f) not in _open_files(d.proc.pid)
    assert _file_bytes(f, 0, 65536) == b"\x42" * 65536
    assert "Traceback" not in d.log()


def test_flush_on_the_helper_thread_when_aio_cannot_fdatasync(tmp_path, backing_dir, helpers):
    """Kernels before 4.18 have no IOCB_CMD_FDSYNC: fdatasync then runs on the channel's
    helper thread and completes through the eventfd, still before the guest hears back."""
    from vhost_core.testing.daemon import VhostDaemon

    f = helpers.make_file(backing_dir / "disk.img", 4 << 20)
    with VhostDaemon(tmp_path / "v", env={"VHOST_BDEV_AIO_FSYNC_THREAD": "1"}) as d:
        _setup(d, f)
        with connect_blk(d.socket("vhost.0"), num_queues=2) as dev:
            for q in (0, 1, 0):
                dev.write(8 * q, os.urandom(4096), queue=q)
                dev.flush(queue=q)
        s = _stats(d)
        assert s["completed"]["flush"] == 3 and s["helper_ops"] == 3 and s["io_errors"] == 0


@pytest.mark.parametrize("engine", ENGINES)
def test_busy_polling_reactor_serves_everything_too(tmp_path, backing_dir, helpers, engine):
    """The daemon's default mode: the reactor polls and never sleeps on the eventfd."""
    from vhost_core.testing.daemon import VhostDaemon

    f = helpers.make_file(backing_dir / "disk.img", 4 << 20)
    with VhostDaemon(tmp_path / "v", interrupt_mode=False) as d:
        _setup(d, f, engine=engine)
        data = os.urandom(128 << 10)
        with connect_blk(d.socket("vhost.0"), num_queues=2) as dev:
            res = dev.submit_many([BlkRequest(VIRTIO_BLK_T_OUT, 256 * i, data, queue=i % 2) for i in range(8)])
            assert all(r.status == VIRTIO_BLK_S_OK for r in res)
            dev.flush()
            dev.discard(0, 64)
            dev.write_zeroes(256, 64)
            dev.write(512, data, seg_size=1500)
            assert dev.read(0, 256) == bytes(32768) + data[32768:]
            assert dev.read(256, 256) == bytes(32768) + data[32768:]
            assert dev.read(512, 256, seg_size=3000) == data
        s = _stats(d)
        assert s["io_errors"] == 0 and s["completed"]["flush"] == 1 and s["bounced"] == 2
    assert _file_bytes(f, 768 * SECTOR, len(data)) == data


@contextlib.contextmanager
def _frozen(mnt):
    """fsfreeze ``mnt``: the writes the target sends there stay in the kernel.  Yields
    ``thaw()``; the filesystem is thawed at exit in any case."""
    subprocess.run(["fsfreeze", "-f", str(mnt)], check=True)
    state = {"frozen": True}

    def thaw() -> None:
        subprocess.run(["fsfreeze", "-u", str(mnt)], check=True)
        state["frozen"] = False

    try:
        yield thaw
    finally:
        if state["frozen"]:
            subprocess.run(["fsfreeze", "-u", str(mnt)], capture_output=True)


def _post_write(dev, sector: int, byte: int) -> int:
    """Make one 4 KiB write available and kick, without waiting; returns its status byte's address."""
    mem, vq = dev.memory, dev.queues[0]
    hdr = mem.alloc_bytes(struct.pack("<IIQ", VIRTIO_BLK_T_OUT, 0, sector), 16)
    data = mem.alloc_bytes(bytes([byte]) * 4096, 512)
    st = mem.alloc_bytes(b"\xff", 1)
    vq.add_chain([(hdr, 16, False), (data, 4096, False), (st, 1, True)])
    vq.kick(force=True)
    return st


def test_a_stuck_backend_holds_up_only_its_own_controller(vhost_daemon, mounts, helpers):
    """A front-end goes away while its write is stuck in the kernel (its ext4 is frozen).
    The session must wait for that write before it unmaps guest memory, but without
    holding up the control plane: RPCs and other controllers are served meanwhile.  After
    the thaw the write lands in the file and the controller serves a new front-end."""
    d = vhost_daemon
    mnt = mounts("ext4", 64)
    path = helpers.make_file(mnt / "disk.img", 8 << 20)
    _setup(d, path, engine="io_uring")
    d.rpc("bdev_malloc_create", num_blocks=2048, block_size=512, name="m1")
    d.rpc("vhost_create_blk_controller", ctrlr="vhost.1", dev_name="m1")
    dev = connect_blk(d.socket("vhost.0"))
    with _frozen(mnt) as thaw:
        st = _post_write(dev, 0, 0x77)
        wait_in_flight(d, "vhost.0")           # at the frozen filesystem
        assert dev.memory.read(st, 1) == b"\xff", "the write completed on a frozen filesystem"
        assert d.rpc("vhost_get_queue_stats", ctrlr="vhost.0")[0]["in_flight"] == 1
        dev.close()                     # gone, with the write in flight
        time.sleep(0.5)                 # the session now waits for it
        t0 = time.monotonic()
        assert d.rpc("spdk_get_version")
        with connect_blk(d.socket("vhost.1")) as other:
            other.write(0, b"\x42" * 512)
            assert other.read(0, 1) == b"\x42" * 512
        assert time.monotonic() - t0 < 5, "the control plane waited for another controller's stuck I/O"
        assert "Controller vhost.0: front-end disconnected" not in d.log()
        thaw()
    d.wait_log("Controller vhost.0: front-end disconnected", timeout=20)
    assert _file_bytes(path, 0, 4096) == b"\x77" * 4096
    with connect_blk(d.socket("vhost.0")) as again:
        again.write(8, b"\x99" * 512)
        assert again.read(8, 1) == b"\x99" * 512
    assert "Traceback" not in d.log()

def test_sigterm_with_a_write_in_flight_waits_for_it_and_exits_cleanly(tmp_path, mounts, helpers):
    """Shutting down with I/O in flight (stuck on a frozen filesystem): the daemon does not
    exit under the guest's feet; once the write completes it finishes shutting down, exit 0,
    and the write is in the file."""
    from vhost_core.testing.daemon import VhostDaemon

    mnt = mounts("ext4", 64)
    path = helpers.make_file(mnt / "disk.img", 8 << 20)
    d = VhostDaemon(tmp_path / "vhost").start()
    try:
        _setup(d, path, engine="io_uring")
        dev = connect_blk(d.socket("vhost.0"))
        with _frozen(mnt) as thaw:
            st = _post_write(dev, 16, 0x5C)
            wait_in_flight(d, "vhost.0")
            d.proc.send_signal(signal.SIGTERM)
            d.wait_log("Exiting")               # it is stopping, and waits for the write
            time.sleep(0.5)
            assert d.alive(), "the daemon exited with a write still in flight"
            thaw()
        assert d.proc.wait(30) == 0, d.log()
        assert dev.memory.read(st, 1) == bytes([VIRTIO_BLK_S_OK])
        assert _file_bytes(path, 16 * SECTOR, 4096) == b"\x5c" * 4096
        dev.close()
    finally:
        d.stop()
    assert "Traceback" not in d.log()
