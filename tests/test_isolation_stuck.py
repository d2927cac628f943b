"""Requests a backend never completes must cost their own session only.

A ring whose requests outlive the stop timeout cannot be stopped: the reactor
still holds it, and a late completion writes into its used ring, the guest
buffers and the inflight buffer.  So the session ends, the controller keeps
that queue and those mappings (and only those) until the requests complete,
and serves the next front-end with fresh queues.  Meanwhile the other
controller and the RPC socket keep answering, no session can pile up leaked
mappings, and deleting the controller does not free what the reactor holds.

The stuck backend is a Python bdev behind a gate the test opens (the stop
timeout is shortened to 1 s through VHOST_STOP_TIMEOUT_S).
"""

from __future__ import annotations

import struct
import textwrap
import time

import pytest

from blk_helpers import connect, wait_in_flight, wait_no_session
from isolation_helpers import Bystander
from vhost_core.testing import VhostUserError
from vhost_core.testing.constants import VIRTIO_BLK_S_OK, VhostUserRequest as R

PLUGIN = """
    import threading

    import attrs

    from vhost_core.bdev.python_adapter import make_python_bdev
    from vhost_core.hookspecs import hookimpl

    VHOST_CORE_API = (2,)
    GATES = {}


    class Gated:
        def __init__(self, name):
            self.num_blocks, self.block_size = 2048, 512
            self.open = GATES.setdefault(name, threading.Event())

        def read(self, off, n):
            self.open.wait()
            return bytes(n * self.block_size)

        def write(self, off, data):
            self.open.wait()


    @attrs.frozen
    class Create:
        name: str


    @attrs.frozen
    class Gate:
        name: str
        open: bool


    @hookimpl
    def vhost_register_commands(registry):
        @registry.command("tp_gated_create", params=Create)
        def create(ctx, p):
            ctx.bdevs.add(make_python_bdev(p.name, Gated(p.name), module="tp_gated", product_name="Gated"))
            return p.name

        @registry.command("tp_gate", params=Gate)
        def gate(ctx, p):
            (GATES[p.name].set if p.open else GATES[p.name].clear)()
            return True
"""


@pytest.fixture
def d(tmp_path):
    from vhost_core.testing.daemon import VhostDaemon

    root = tmp_path / "plugin"
    root.mkdir()
    (root / "tp_gated.py").write_text(textwrap.dedent(PLUGIN))
    info = root / "tp_gated-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tp-gated\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[vhost.plugins]\ntp_gated = tp_gated\n")
    daemon = VhostDaemon(tmp_path / "vhost", env={"PYTHONPATH": str(root), "VHOST_STOP_TIMEOUT_S": "1"}).start()
    try:
        daemon.rpc("tp_gated_create", name="Gated0")
        daemon.rpc("vhost_create_blk_controller", ctrlr="vhost.0", dev_name="Gated0")
        daemon.rpc("bdev_malloc_create", num_blocks=4096, block_size=512, name="Malloc1")
        daemon.rpc("vhost_create_blk_controller", ctrlr="vhost.1", dev_name="Malloc1")
        yield daemon
        assert "Traceback" not in daemon.log(), daemon.log()
    finally:
        daemon.rpc("tp_gate", name="Gated0", open=True) if daemon.alive() else None
        rc = daemon.stop()
    assert rc == 0, f"vhost exited with {rc} on SIGTERM:\n{daemon.log()}"


def _post_read(dev, queue: int = 0, indirect: bool = False):
    mem = dev.memory
    hdr = mem.alloc(16, 16)
    mem.write(hdr, struct.pack("<IIQ", 0, 0, 0))
    buf, st = mem.alloc(512, 512), mem.alloc(1, 1)
    mem.write(st, b"\xff")
    vq = dev.queues[queue]
    vq.add_chain([(hdr, 16, False), (buf, 512, True), (st, 1, True)], indirect=indirect)
    vq.kick(force=True)
    return st


def _maps(d) -> int:
    with open(f"/proc/{d.proc.pid}/maps") as f:
        return sum(1 for _ in f)


def _stuck_session(d) -> None:
    """A front-end with a read stuck at the gate asks for the ring's base: the stop
    times out, and the daemon drops the session rather than answer a base from which
    the ring cannot resume."""
    wait_no_session(d, "vhost.0")
    dev = connect(d, "vhost.0", memory_mb=16)
    _post_read(dev)
    wait_in_flight(d, "vhost.0")             # at the gate
    t = time.monotonic()
    with pytest.raises(VhostUserError):
        dev.frontend.get_vring_base(0)
    assert time.monotonic() - t < 5
    dev.close()


def test_stuck_requests_retire_their_ring_and_nothing_else(d):
    mark = len(d.log())
    with Bystander(d) as b:
        _stuck_session(d)
        assert "vring 0 stopped with 1 requests still in flight" in d.log()[mark:]
        maps_one = _maps(d)
        # A second front-end gets fresh queues and is served (GET_CONFIG, rings start).
        _stuck_session(d)
        # Two sessions' worth of stuck requests: the next front-end is refused until
        # they complete, so that no front-end can pile up mappings.
        wait_no_session(d, "vhost.0")
        with pytest.raises((VhostUserError, ConnectionError, OSError)):
            connect(d, "vhost.0", timeout=3).close()
        d.wait_log("earlier sessions still have requests the backend never completed")
        assert _maps(d) <= maps_one + 40
        # The backend recovers: the late completions land in the retired rings, the
        # mappings go, and the controller serves again.
        d.rpc("tp_gate", name="Gated0", open=True)
        deadline = time.monotonic() + 10
        while d.log()[mark:].count("requests left by an earlier front-end completed") < 2:
            assert time.monotonic() < deadline, d.log()[mark:]
            time.sleep(0.05)
        with connect(d, "vhost.0") as dev:
            assert dev.read(0, 1) == bytes(512)
    b.check()


def test_more_outstanding_requests_than_the_queue_size_stop_the_queue(d):
    """Requests in flight count: a driver with 3 taken and 2 more made available on a
    4-entry ring would have the device overrun its used ring."""
    mark = len(d.log())
    with connect(d, "vhost.0", queue_size=4, indirect=True) as dev:
        for _ in range(3):
            _post_read(dev, indirect=True)
        wait_in_flight(d, "vhost.0", 3)
        assert d.rpc("vhost_get_queue_stats", ctrlr="vhost.0")[0]["in_flight"] == 3
        vq = dev.queues[0]
        vq.avail_idx = (vq.avail_idx + 2) & 0xFFFF
        vq.publish()
        vq.kick(force=True)
        d.wait_log("more requests outstanding than the queue size")
        d.rpc("tp_gate", name="Gated0", open=True)
    assert "Traceback" not in d.log()[mark:]


def test_deleting_a_controller_with_stuck_requests_frees_its_device_once_they_complete(d):
    mark = len(d.log())
    dev = connect(d, "vhost.0")
    _post_read(dev)
    wait_in_flight(d, "vhost.0")
    dev.close()         # the VM goes away with a request stuck at the backend
    d.wait_log("vring 0 stopped with 1 requests still in flight")
    wait_no_session(d, "vhost.0")
    t = time.monotonic()
    d.rpc("vhost_delete_controller", ctrlr="vhost.0")
    assert time.monotonic() - t < 5
    d.wait_log("its device and bdev are released once they complete")
    assert [c["ctrlr"] for c in d.rpc("vhost_get_controllers")] == ["vhost.1"]
    d.rpc("tp_gate", name="Gated0", open=True)
    d.wait_log("requests left by an earlier front-end completed")
    # The bdev is free again: a new controller may use it.
    d.rpc("vhost_create_blk_controller", ctrlr="vhost.2", dev_name="Gated0")
    with connect(d, "vhost.2") as dev2:
        assert dev2.read(0, 1) == bytes(512)
    assert "Traceback" not in d.log()[mark:]
