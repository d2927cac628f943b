"""Task management against a driver that never lets the target go idle.

A held TMF (LOGICAL UNIT RESET, ABORT TASK SET, ...) completes once the commands
the logical unit had when it arrived are done: not the ones sent after it, or a
driver that keeps I/O in flight would hold it, and with it the stop of the
control queue, for as long as it likes.  Stopping the control queue hands a held
TMF back at once.

The target is a Python bdev whose reads each take DELAY seconds, served one at a
time by the adapter's worker thread: with a few reads posted at all times the
target always has commands in flight.
"""

from __future__ import annotations

import textwrap
import threading
import time

import pytest

from vhost_dev_scsi.testing import (
    CHECK_CONDITION,
    S_FUNCTION_COMPLETE,
    S_FUNCTION_REJECTED,
    S_OK,
    TMF_ABORT_TASK_SET,
    TMF_LOGICAL_UNIT_RESET,
    UNIT_ATTENTION,
    ReadStream,
    connect_scsi,
    rw10,
    wait_in_flight,
    wait_no_session,
)

PLUGIN = """
    import time

    import attrs

    from vhost_core.bdev.python_adapter import make_python_bdev
    from vhost_core.hookspecs import hookimpl

    VHOST_CORE_API = (2,)


    class Slow:
        def __init__(self, num_blocks, block_size, delay):
            self.num_blocks, self.block_size, self.delay = num_blocks, block_size, delay

        def read(self, off, n):
            time.sleep(self.delay)
            return bytes(n * self.block_size)

        def write(self, off, data):
            pass


    @attrs.frozen
    class Create:
        name: str
        delay: float
        num_blocks: int = 2048
        block_size: int = 512


    @hookimpl
    def vhost_register_commands(registry):
        @registry.command("tp_slow_create", params=Create)
        def create(ctx, p):
            ctx.bdevs.add(make_python_bdev(p.name, Slow(p.num_blocks, p.block_size, p.delay),
                                           module="tp_slow", product_name="Slow disk"))
            return p.name
"""

DELAY = 0.3         # seconds per read
DEPTH = 3           # reads the driver keeps posted


@pytest.fixture(scope="module")
def slow_daemon(tmp_path_factory):
    from vhost_core.testing.daemon import VhostDaemon

    root = tmp_path_factory.mktemp("slowplugin")
    (root / "tp_slow.py").write_text(textwrap.dedent(PLUGIN))
    info = root / "tp_slow-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tp-slow\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[vhost.plugins]\ntp_slow = tp_slow\n")
    d = VhostDaemon(tmp_path_factory.mktemp("vhost"), env={"PYTHONPATH": str(root)}).start()
    try:
        d.rpc("tp_slow_create", name="Slow0", delay=DELAY)
        d.rpc("vhost_create_scsi_controller", ctrlr="vhost.0")
        d.rpc("vhost_scsi_controller_add_target", ctrlr="vhost.0", scsi_target_num=0, bdev_name="Slow0")
        yield d
        assert "Traceback" not in d.log(), d.log()
    finally:
        assert d.stop() == 0, d.log()


class Pump(threading.Thread):
    """Keeps ``depth`` reads in flight until stopped."""

    def __init__(self, reads: ReadStream, depth: int) -> None:
        super().__init__(daemon=True)
        self.reads, self.depth = reads, depth
        self.halt = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.halt.is_set():
                self.reads.keep(self.depth)
                time.sleep(0.005)
        except BaseException as exc:        # surfaced by stop()
            self.error = exc

    def stop(self) -> None:
        self.halt.set()
        self.join(10)
        if self.error is not None:
            raise self.error


@pytest.mark.parametrize("subtype", [TMF_LOGICAL_UNIT_RESET, TMF_ABORT_TASK_SET])
def test_a_held_tmf_completes_while_the_driver_keeps_io_in_flight(slow_daemon, subtype):
    wait_no_session(slow_daemon, "vhost.0")
    with connect_scsi(slow_daemon.socket("vhost.0")) as dev:
        reads = ReadStream(dev)
        reads.keep(DEPTH)
        wait_in_flight(slow_daemon, "vhost.0", DEPTH, queue=2)     # the reads are at the bdev
        tmf = dev.post_tmf(0, subtype)
        time.sleep(0.05)
        assert dev.tmf_response(tmf) is None, "completed with the commands before it still in flight"
        t0 = time.monotonic()
        response = None
        while response is None and time.monotonic() - t0 < 10 * DELAY * DEPTH:
            reads.keep(DEPTH)
            response = dev.tmf_response(tmf)
            time.sleep(0.005)
        assert response is not None, "the TMF waited for commands sent after it"
        assert reads.in_flight > 0
        assert response == S_FUNCTION_COMPLETE
        # It waited for the DEPTH commands before it (DEPTH x DELAY), not for the later ones.
        assert time.monotonic() - t0 < 2 * DELAY * (DEPTH + 1)
        while reads.in_flight:
            reads.reap()
            time.sleep(0.01)
        # The reset happened: a command after it reports it (one the driver posted
        # after the TMF completed, or the next one).
        r = dev.command(0, rw10(False, 0, 1), data_in_len=512)
        if r.status == CHECK_CONDITION and r.sense.key == UNIT_ATTENTION:
            reads.unit_attentions.append((r.sense.asc, r.sense.ascq))
        expect = [(0x29, 0x03)] if subtype == TMF_LOGICAL_UNIT_RESET else []
        assert reads.unit_attentions == expect


def test_stopping_the_control_queue_hands_back_a_held_tmf(slow_daemon):
    """GET_VRING_BASE of the control queue while a TMF waits and the driver keeps
    reads flowing on queue 2: the stop returns at once, the TMF rejected."""
    wait_no_session(slow_daemon, "vhost.0")
    with connect_scsi(slow_daemon.socket("vhost.0")) as dev:
        reads = ReadStream(dev)
        reads.keep(DEPTH)
        wait_in_flight(slow_daemon, "vhost.0", DEPTH, queue=2)
        tmf = dev.post_tmf(0, TMF_LOGICAL_UNIT_RESET)
        pump = Pump(reads, DEPTH)
        pump.start()
        try:
            time.sleep(0.05)
            t0 = time.monotonic()
            dev.frontend.get_vring_base(0)
            elapsed = time.monotonic() - t0
            deadline = time.monotonic() + 10 * DELAY
            while reads.completed < 1 and time.monotonic() < deadline:     # the request queue serves on
                time.sleep(0.01)
        finally:
            pump.stop()
        assert elapsed < 1.0, f"stopping the control queue took {elapsed:.1f}s"
        assert dev.tmf_response(tmf) == S_FUNCTION_REJECTED
        # The request queue serves on; rejected, the reset raised no unit attention.
        assert reads.completed >= 1 and reads.unit_attentions == []


def test_disconnect_with_a_held_tmf_and_io_still_flowing_is_prompt(slow_daemon):
    """The front-end goes away with a TMF held while its memory still feeds queue 2
    (a hostile guest keeps adding reads after the socket closed): the session ends
    once the reads in flight at the stop are done, not when the guest stops."""
    d = slow_daemon
    wait_no_session(d, "vhost.0")
    dev = connect_scsi(d.socket("vhost.0"))
    try:
        reads = ReadStream(dev)
        reads.keep(DEPTH)
        wait_in_flight(d, "vhost.0", DEPTH, queue=2)
        dev.post_tmf(0, TMF_LOGICAL_UNIT_RESET)
        pump = Pump(reads, DEPTH)
        pump.start()
        try:
            time.sleep(0.05)
            t0 = time.monotonic()
            # Only the socket: the rings and their kick eventfds stay the guest's.
            sock, dev.frontend.sock = dev.frontend.sock, None
            sock.close()
            wait_no_session(d, "vhost.0", timeout=15)
            elapsed = time.monotonic() - t0
        finally:
            pump.stop()
    finally:
        dev.close()
    # The queue stops take the reads they hold (DEPTH x DELAY), never the guest's pace.
    assert elapsed < DELAY * DEPTH + 2.0, f"the disconnect took {elapsed:.1f}s"
    wait_no_session(d, "vhost.0")
    with connect_scsi(d.socket("vhost.0")) as again:
        r = again.command(0, rw10(False, 0, 1), data_in_len=512, timeout=10)
        assert r.response == S_OK
