"""One front-end must never stall, crash or reach past its own session.

Each test attacks controller vhost.0 the way a hostile tenant could, with a few
lines, while a well-behaved tenant on vhost.1 -- on the same reactor -- keeps
doing I/O and polling the RPC socket from another process (isolation_helpers.
Bystander).  What must hold (docs/design.md, "Threat model"): neither waits more
than a second, the daemon lives, and the attacker's own session is all that
breaks.  Every attack runs against the busy-polling reactor and the interrupt-
mode one.
"""

from __future__ import annotations

import os
import socket
import struct
import time

import pytest

from blk_helpers import BLK_HDR, NEXT, WRITE, Guarded, assert_healthy, blk_header, connect, status_byte, \
    wait_no_session
from blk_helpers import setup_blk_controllers as _setup_blk_controllers
from isolation_helpers import Bystander
from vhost_core.testing import GuestMemory, SplitVirtqueue, VhostUserFrontend
from vhost_core.testing.constants import (
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_IN,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    VRING_DESC_F_INDIRECT,
    VhostUserRequest as R,
    bit,
)

MiB = 1 << 20
EVENTFD_MAX = 0xFFFF_FFFF_FFFF_FFFE
MAX_TRANSFER = 4 * MiB


@pytest.fixture(scope="module", params=["interrupt", "poll"])
def d(request, tmp_path_factory):
    from vhost_core.testing.daemon import VhostDaemon

    daemon = VhostDaemon(tmp_path_factory.mktemp(f"iso-{request.param}"),
                         interrupt_mode=request.param == "interrupt").start()
    try:
        _setup_blk_controllers(daemon)
        yield daemon
        assert "Traceback" not in daemon.log(), daemon.log()
    finally:
        rc = daemon.stop()
    assert rc == 0, f"vhost exited with {rc} on SIGTERM:\n{daemon.log()}"


def _since(d, mark: int) -> str:
    return d.log()[mark:]


def _wait_log(d, mark: int, text: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while text not in _since(d, mark):
        assert time.monotonic() < deadline, f"'{text}' not logged within {timeout}s:\n{_since(d, mark)}"
        time.sleep(0.05)
    return _since(d, mark)


def _post_read(dev, nbytes: int = 512, *, queue: int = 0, kick: bool = True):
    """Make one READ available without waiting for it (and without reading the call fd)."""
    vq = dev.queues[queue]
    hdr = blk_header(dev.memory, VIRTIO_BLK_T_IN, 0)
    buf = Guarded(dev.memory, nbytes)
    st = status_byte(dev.memory)
    vq.add_chain([(hdr.gpa, 16, False), (buf.gpa, nbytes, True), (st.gpa, 1, True)])
    if kick:
        vq.kick(force=True)
    return st


def _fill_eventfd(fd: int) -> None:
    """Counter at its maximum: the next write of 1 would block (or fail EAGAIN)."""
    was = os.get_blocking(fd)
    os.set_blocking(fd, False)
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass
    os.eventfd_write(fd, EVENTFD_MAX)
    os.set_blocking(fd, was)


def _frontend(d, ctrlr="vhost.0", **kw) -> VhostUserFrontend:
    wait_no_session(d, ctrlr)
    return VhostUserFrontend(d.socket(ctrlr), **kw)


# ---------------------------------------------------------------------------
# 1. the front-end's eventfds
# ---------------------------------------------------------------------------

def test_call_eventfd_made_blocking_and_full_costs_only_its_queue(d):
    """SPDK's weakness too: the peer shares the call eventfd's file description, clears
    O_NONBLOCK and fills the counter to one below its maximum; the reactor's next
    completion signal would block forever."""
    mark = len(d.log())
    with Bystander(d) as b:
        with connect(d) as dev:
            vq = dev.queues[0]
            _fill_eventfd(vq.call_fd)
            os.set_blocking(vq.call_fd, True)
            _post_read(dev)
            _wait_log(d, mark, "the call eventfd blocked the reactor")
            # Its completion was published before the signal: nothing is lost.
            assert [e.len for e in vq.get_used()] == [513]
    b.check()
    assert d.alive()
    assert_healthy(d)


def test_call_eventfd_swapped_on_a_running_ring_blocking_and_full(d):
    """The control thread signals a new call fd of a running ring (QEMU swaps them).
    A full one handed over blocking: the target makes it non-blocking before it
    signals, the signal is redundant (a wake-up is pending), and nothing waits.
    Made blocking again afterwards, it costs the ring (the reactor's guard)."""
    mark = len(d.log())
    with Bystander(d) as b:
        with connect(d) as dev:
            dev.write(0, b"\x01" * 512)
            fd = os.eventfd(0)          # blocking
            _fill_eventfd(fd)
            try:
                t = time.monotonic()
                dev.frontend.send(R.SET_VRING_CALL, struct.pack("<Q", 0), [fd])
                assert dev.frontend.ping()
                assert time.monotonic() - t < 1.0
                os.set_blocking(fd, True)
                _post_read(dev)
                _wait_log(d, mark, "the call eventfd blocked the reactor")
            finally:
                os.close(fd)
    b.check()
    assert_healthy(d)


def test_the_guard_still_covers_the_reactor_after_many_front_ends(d):
    """Each connection's thread that signals an fd gets a guard record; records of
    threads that ended are reused, so the watchdog's walk never grows past what it
    covers: after 300 front-ends the reactor is still guarded."""
    for _ in range(300):
        with connect(d) as dev:
            fd = os.eventfd(0, os.EFD_NONBLOCK)
            try:
                dev.frontend.set_vring_call(0, fd)      # signalled by the connection's thread
                assert dev.frontend.ping()
            finally:
                os.close(fd)
    test_call_eventfd_made_blocking_and_full_costs_only_its_queue(d)


def test_kick_eventfd_made_blocking_costs_only_its_queue(d):
    """In interrupt mode the reactor drains kick fds; the peer clears O_NONBLOCK on
    its kick eventfd (and keeps its counter at zero): a read would block forever."""
    mark = len(d.log())
    with Bystander(d) as b:
        with connect(d) as dev:
            dev.write(0, b"\x02" * 512)
            os.set_blocking(dev.queues[0].kick_fd, True)
            time.sleep(1.0)     # the bystander's kicks wake the reactor meanwhile
            if "--interrupt-mode" in d.args:
                _wait_log(d, mark, "the kick eventfd blocked the reactor")
    b.check()
    assert_healthy(d)


@pytest.mark.parametrize("kind", ["pipe", "socket", "memfd"])
def test_kick_call_err_fds_must_be_eventfds(d, kind):
    mark = len(d.log())
    if kind == "pipe":
        keep, fd = os.pipe()
    elif kind == "socket":
        a, b = socket.socketpair()
        keep, fd = a.detach(), b.detach()
    else:
        keep, fd = -1, os.memfd_create("not-an-eventfd")
    try:
        for req in (R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR):
            with connect(d) as dev:
                dev.frontend.send(req, struct.pack("<Q", 0), [fd])
                assert dev.frontend.wait_closed(5.0)
            _wait_log(d, mark, "the file descriptor is not an eventfd")
    finally:
        os.close(fd)
        if keep >= 0:
            os.close(keep)
    assert_healthy(d)


def test_error_eventfd_made_blocking_and_full(d):
    """The err fd is signalled by the control thread when the data path stops a
    malformed ring: a blocking, full one costs at most the guard's period."""
    mark = len(d.log())
    with Bystander(d) as b:
        with connect(d) as dev:
            err = os.eventfd(0)
            try:
                dev.frontend.set_vring_err(0, err)
                _fill_eventfd(err)
                os.set_blocking(err, True)
                vq = dev.queues[0]
                vq.write_avail_entry(vq.avail_idx, 40000)     # head out of range: ring broken
                vq.avail_idx = (vq.avail_idx + 1) & 0xFFFF
                vq.publish()
                vq.kick(force=True)
                _wait_log(d, mark, "was stopped after a malformed request")
                assert dev.frontend.ping()
            finally:
                os.close(err)
    b.check()
    assert_healthy(d)


# ---------------------------------------------------------------------------
# 2. replies nobody reads
# ---------------------------------------------------------------------------

def test_front_end_that_never_reads_its_backend_channel(d, tmp_path):
    """Config-change notices go out on the back-end channel under the control lock: a
    front-end that never reads it loses the channel, and nobody waits for it."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    d.rpc("bdev_aio_create", filename=str(disk), name="aio_bc")
    d.rpc("vhost_create_blk_controller", ctrlr="vhost.bc", dev_name="aio_bc")
    mark = len(d.log())
    try:
        with Bystander(d) as b:
            with connect(d, "vhost.bc", protocol_features=(1 << 3) | (1 << 5) | (1 << 9)) as dev:
                ours, theirs = socket.socketpair()
                # A tiny send buffer on the daemon's end: a few notices fill it.
                theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)
                dev.frontend.set_backend_req_fd(theirs.fileno())
                theirs.close()
                size = 1 << 20
                for _ in range(200):
                    size += 1 << 20
                    os.truncate(disk, size)
                    t = time.monotonic()
                    d.rpc("bdev_aio_rescan", name="aio_bc")
                    assert time.monotonic() - t < 1.0
                    if "does not read its back-end request channel" in _since(d, mark):
                        break
                _wait_log(d, mark, "does not read its back-end request channel")
                assert dev.frontend.ping()
                ours.close()
        b.check()
    finally:
        wait_no_session(d, "vhost.bc")
        d.rpc("vhost_delete_controller", ctrlr="vhost.bc")
        d.rpc("bdev_aio_delete", name="aio_bc")
    assert_healthy(d)


def test_front_end_that_never_reads_its_replies_is_dropped(d):
    mark = len(d.log())
    with Bystander(d) as b:
        fe = _frontend(d)
        fe.get_features()
        fe.set_features(bit(VIRTIO_F_VERSION_1) | bit(30))
        fe.set_protocol_features(fe.get_protocol_features())
        req = struct.pack("<III", 0, 60, 0) + bytes(60)
        msg = struct.pack("<III", R.GET_CONFIG, 1, len(req)) + req
        fe.sock.setblocking(False)
        sent = 0
        deadline = time.monotonic() + 20
        try:
            while time.monotonic() < deadline:
                try:
                    sent += fe.sock.send(msg * 64)
                except BlockingIOError:
                    time.sleep(0.01)
                if "does not read its replies" in _since(d, mark):
                    break
        except OSError:
            pass                # the daemon hung up on us: what we wanted
        _wait_log(d, mark, "the front-end does not read its replies")
        fe.close()
    b.check()
    assert_healthy(d)


# ---------------------------------------------------------------------------
# 3. ring layout state must follow the negotiated features
# ---------------------------------------------------------------------------

def test_event_idx_does_not_outlive_reset_owner(d):
    """EVENT_IDX negotiated, ring started, RESET_OWNER, then the ring restarted without
    SET_FEATURES: the used ring is validated without its trailing avail_event field,
    so the target must not write one.  The ring is placed so that the field would fall
    just past the region's end, into bytes the region does not cover."""
    qsize = 16
    used_len = 4 + 8 * qsize
    region = 1 * MiB - 2048          # the daemon maps whole pages: the tail is visible to it
    mem = GuestMemory([(0, 2 * MiB)])
    try:
        fe = _frontend(d)
        fe.get_features()
        fe.set_protocol_features(fe.get_protocol_features())
        fe.set_features(bit(VIRTIO_F_VERSION_1) | bit(30) | bit(VIRTIO_RING_F_EVENT_IDX))
        # A table that declares a shorter region than the memfd holds.
        r = mem.regions[0]
        payload = struct.pack("<II", 1, 0) + struct.pack("<QQQQ", 0, region, r.uaddr, r.mmap_offset)
        fe.command(R.SET_MEM_TABLE, payload, [r.fd])
        desc, avail = mem.alloc(16 * qsize, 16), mem.alloc(6 + 2 * qsize, 2)
        vq = SplitVirtqueue(mem, qsize, event_idx=True, desc_gpa=desc, avail_gpa=avail,
                            used_gpa=mem.alloc(used_len + 2, 4))
        mem.write(region, b"\xEE\xEE")
        fe.setup_vring(0, qsize, vq=vq)
        fe.set_vring_enable(0, True)
        fe.reset_owner()
        # Now the used ring ends exactly where the region does.
        vq2 = SplitVirtqueue(mem, qsize, event_idx=False, desc_gpa=desc, avail_gpa=avail,
                             used_gpa=region - used_len)
        fe.setup_vring(0, qsize, vq=vq2)
        fe.set_vring_enable(0, True)
        hdr = mem.alloc(16, 16)
        mem.write(hdr, BLK_HDR.pack(VIRTIO_BLK_T_IN, 0, 0))
        buf, st = mem.alloc(512, 512), mem.alloc(1, 1)
        vq2.add_chain([(hdr, 16, False), (buf, 512, True), (st, 1, True)])
        vq2.kick(force=True)
        vq2.wait_used(5)
        assert mem.read(st, 1) == bytes([VIRTIO_BLK_S_OK])
        assert mem.read(region, 2) == b"\xEE\xEE", "the target wrote past the end of a memory region"
        fe.close()
    finally:
        mem.close()
    assert_healthy(d)


# ---------------------------------------------------------------------------
# 4. request size
# ---------------------------------------------------------------------------

def _read_over_one_buffer(dev, nsegs: int, seg: int, *, indirect: bool = True):
    """A READ whose data segments all point at the same guest pages (as a hostile
    driver may): only the byte count says how big it is."""
    mem = dev.memory
    hdr = blk_header(mem, VIRTIO_BLK_T_IN, 0)
    buf = mem.alloc(seg, 4096)
    st = status_byte(mem)
    vq = dev.queues[0]
    vq.add_chain([(hdr.gpa, 16, False)] + [(buf, seg, True)] * nsegs + [(st.gpa, 1, True)], indirect=indirect)
    vq.kick(force=True)
    used = vq.wait_used(10)
    status = st.read()[0]
    hdr.free()
    st.free()
    mem.free(buf)
    return status, used[0].len


def test_requests_above_the_transfer_limit_fail_cleanly(d):
    with Bystander(d) as b:
        with connect(d, memory_mb=16, indirect=True) as dev:
            # At the limit: served.
            assert _read_over_one_buffer(dev, 4, MiB) == (VIRTIO_BLK_S_OK, MAX_TRANSFER + 1)
            # Past it, by one block, by a lot, or with 260 descriptors of 1 MiB each.
            assert _read_over_one_buffer(dev, 1, MAX_TRANSFER + 512)[0] == VIRTIO_BLK_S_IOERR
            assert _read_over_one_buffer(dev, 8, MiB)[0] == VIRTIO_BLK_S_IOERR
            assert _read_over_one_buffer(dev, 258, MiB)[0] == VIRTIO_BLK_S_IOERR
            # The queue still serves.
            dev.write(0, b"\x33" * 4096)
            assert dev.read(0, 8) == b"\x33" * 4096
    b.check()
    assert_healthy(d)


# ---------------------------------------------------------------------------
# 5. what may back guest memory
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["pipe", "socket", "procfs_file", "dev_zero"])
def test_memory_region_fds_of_the_wrong_kind_are_refused(d, kind):
    mark = len(d.log())
    keep = -1
    if kind == "pipe":
        fd, keep = os.pipe()
    elif kind == "socket":
        a, b = socket.socketpair()
        fd, keep = a.detach(), b.detach()
    elif kind == "procfs_file":
        fd = os.open("/proc/self/status", os.O_RDONLY)
    else:
        fd = os.open("/dev/zero", os.O_RDWR)
    try:
        fe = _frontend(d)
        fe.get_features()
        fe.set_features(bit(VIRTIO_F_VERSION_1))
        payload = struct.pack("<II", 1, 0) + struct.pack("<QQQQ", 0, MiB, 0x7f0000000000, 0)
        fe.send(R.SET_MEM_TABLE, payload, [fd])
        assert fe.wait_closed(5.0)
        out = _wait_log(d, mark, "cannot map memory region")
        assert ("not a regular file" in out) or ("filesystem that could stall" in out), out
        fe.close()
    finally:
        os.close(fd)
        if keep >= 0:
            os.close(keep)
    assert_healthy(d)


@pytest.fixture
def hugepages():
    """A few 2 MiB huge pages reserved for the test (and the reservation undone)."""
    path = "/proc/sys/vm/nr_hugepages"
    with open(path) as f:
        before = int(f.read())
    with open(path, "w") as f:
        f.write(str(before + 8))
    with open(path) as f:
        assert int(f.read()) >= before + 4, "cannot reserve 2 MiB huge pages here (needs root and free memory)"
    yield
    with open(path, "w") as f:
        f.write(str(before))


def _mappings_of(pid: int, name: str) -> int:
    with open(f"/proc/{pid}/maps") as f:
        return sum(name in line for line in f)


def test_hugetlbfs_region_of_odd_size_is_mapped_and_unmapped_in_whole_huge_pages(d, hugepages):
    """A region whose size is not a multiple of the huge page: munmap of the unrounded
    length fails on hugetlbfs and leaked the mapping and its huge pages."""
    fd = os.memfd_create("guest-huge", os.MFD_CLOEXEC | os.MFD_HUGETLB)
    try:
        os.ftruncate(fd, 4 * MiB)
        import mmap

        mm = mmap.mmap(fd, 4 * MiB)
        uaddr = 0x7e0000000000
        for _ in range(5):
            fe = _frontend(d)
            fe.get_features()
            fe.set_features(bit(VIRTIO_F_VERSION_1))
            payload = struct.pack("<II", 1, 0) + struct.pack("<QQQQ", 0, 3 * MiB + 4096, uaddr, 0)
            fe.command(R.SET_MEM_TABLE, payload, [fd])
            assert fe.ping()
            assert _mappings_of(d.proc.pid, "guest-huge") == 1
            fe.close()
            wait_no_session(d, "vhost.0")
        mm.close()
    finally:
        os.close(fd)
    assert _mappings_of(d.proc.pid, "guest-huge") == 0, "the daemon kept a huge-page region mapped"
    assert_healthy(d)


def test_repeated_memory_tables_do_not_accumulate_mappings(d):
    """Each SET_MEM_TABLE replaces the last: 600 tables of 8 regions would exhaust the
    daemon-wide SIGBUS guard (4096 slots) if any were kept, and every tenant's next
    table would then fail."""
    mem = GuestMemory([(i * 2 * MiB, MiB) for i in range(8)])
    fe = _frontend(d)
    try:
        fe.get_features()
        fe.set_features(bit(VIRTIO_F_VERSION_1))
        fe.set_mem_table(mem)
        assert fe.ping()
        before = _mappings_of(d.proc.pid, "")
        for _ in range(600):
            fe.set_mem_table(mem)
        assert fe.ping()
        after = _mappings_of(d.proc.pid, "")
        assert after <= before + 16, f"{after - before} more mappings in the daemon after 600 memory tables"
    finally:
        fe.close()
        mem.close()
    assert_healthy(d)


# ---------------------------------------------------------------------------
# 6. fairness
# ---------------------------------------------------------------------------

def test_a_ring_of_long_invalid_chains_does_not_starve_the_other_controller(d):
    """A 32768-entry ring whose every entry is a 1000-descriptor indirect chain of
    buffers outside guest memory: each costs the walk, none does I/O.  The work per
    queue per reactor iteration is bounded, so the neighbour's latency stays low."""
    with Bystander(d) as b:
        with connect(d, queue_size=32768, memory_mb=64, indirect=True) as dev:
            vq = dev.queues[0]
            mem = dev.memory
            st = mem.alloc(1, 1)
            table = mem.alloc(16 * 1000, 16)
            entries = b"".join(struct.pack("<QIHH", 1 << 50, 512, NEXT, i + 1) for i in range(999))
            mem.write(table, entries + struct.pack("<QIHH", st, 1, WRITE, 0))
            vq.write_desc(0, table, 16 * 1000, VRING_DESC_F_INDIRECT, 0)
            t0 = time.monotonic()
            while time.monotonic() - t0 < 3:
                # Every avail entry is 0 (the ring was zeroed): keep all 32768 of them
                # available, refilling what the device returned.
                vq.avail_idx = (vq.read_used_idx() + 32768) & 0xFFFF
                vq.publish()
                vq.kick(force=True)
                time.sleep(0.2)
            errors = d.rpc("vhost_get_queue_stats", ctrlr="vhost.0")[0]["errors"]
            assert errors > 1000, f"the poisoned ring was hardly processed ({errors} errors)"
    b.check(max_wait=0.25)
    assert_healthy(d)


def test_a_chain_longer_than_the_limit_stops_only_its_queue(d):
    mark = len(d.log())
    with connect(d, indirect=True) as dev:
        mem = dev.memory
        st = mem.alloc(1, 1)
        buf = mem.alloc(512, 512)
        n = 1100
        table = mem.alloc(16 * n, 16)
        entries = b"".join(struct.pack("<QIHH", buf, 0, NEXT, i + 1) for i in range(n - 1))
        mem.write(table, entries + struct.pack("<QIHH", st, 1, WRITE, 0))
        vq = dev.queues[0]
        vq.write_desc(0, table, 16 * n, VRING_DESC_F_INDIRECT, 0)
        vq.push_head(0)
        vq.kick(force=True)
        _wait_log(d, mark, "descriptor chain longer than 1040 descriptors")
    assert_healthy(d)


# ---------------------------------------------------------------------------
# 8. smaller ones
# ---------------------------------------------------------------------------

def test_refused_messages_are_logged_as_summaries(d):
    mark = len(d.log())
    fe = _frontend(d)
    fe.get_features()
    fe.set_features(bit(VIRTIO_F_VERSION_1))
    for _ in range(200):
        fe.send(R.SET_VRING_ENDIAN)
    assert fe.ping()
    fe.close()
    out = _wait_log(d, mark, "195 more vhost-user messages refused")
    assert out.count("*ERROR*: Controller vhost.0: unsupported vhost-user message SET_VRING_ENDIAN") == 5, out
    assert_healthy(d)


def test_file_descriptors_above_1024(tmp_path):
    """select() cannot watch fds >= 1024; a daemon with many open files (many
    controllers, many guests) must still serve a front-end on such an fd."""
    from vhost_core.testing.daemon import VhostDaemon

    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    held = [os.open("/dev/null", os.O_RDONLY) for _ in range(1100)]
    try:
        daemon = VhostDaemon(tmp_path / "vhost", pass_fds=tuple(held)).start()
    finally:
        for fd in held:
            os.close(fd)
    try:
        _setup_blk_controllers(daemon)
        with connect(daemon) as dev:
            dev.write(0, b"\x44" * 512)
            time.sleep(0.5)     # idle: the connection thread waits with its fd >= 1024
            assert dev.read(0, 1) == b"\x44" * 512
        assert "Traceback" not in daemon.log(), daemon.log()
    finally:
        assert daemon.stop() == 0, daemon.log()
