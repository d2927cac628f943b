"""vhost-scsi controllers and their targets: the SPDK RPCs and CLI commands,
hot-attach / hot-detach as the driver sees them (transport reset events, or unit
attentions when it did not negotiate hotplug), and bdev removal.

Each test runs its own daemon (``vhost_daemon``): they change the topology.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import threading
import time

import pytest

from vhost_dev_scsi.testing import (
    CHECK_CONDITION,
    DEFAULT_FEATURES,
    DATA_PROTECT,
    EVT_RESET_REMOVED,
    EVT_RESET_RESCAN,
    F_HOTPLUG,
    GOOD,
    ILLEGAL_REQUEST,
    RESP_SIZE,
    S_BAD_TARGET,
    S_OK,
    TEST_UNIT_READY,
    T_EVENTS_MISSED,
    T_NO_EVENT,
    T_TRANSPORT_RESET,
    UNIT_ATTENTION,
    connect_scsi,
    inquiry,
    mode_sense6,
    report_luns,
    rw6,
    rw10,
    sync_cache10,
    unmap,
    unmap_params,
    wait_no_session,
    write_same16,
)
from vhost_core.rpc.client import RpcError


def malloc(d, name: str, mb: int = 4, block_size: int = 512) -> None:
    d.rpc("bdev_malloc_create", num_blocks=mb * 1024 * 1024 // block_size, block_size=block_size, name=name)


def scsi_of(d, ctrlr: str = "vhost.0") -> list:
    return d.rpc("vhost_get_controllers", name=ctrlr)[0]["backend_specific"]["scsi"]


def rpc_error(d, method: str, **params) -> RpcError:
    with pytest.raises(RpcError) as exc:
        d.rpc(method, **params)
    return exc.value


def event_for(ev, target: int, reason: int, missed: bool = False) -> bool:
    event, lun, r, used = ev
    want = T_TRANSPORT_RESET | (T_EVENTS_MISSED if missed else 0)
    return (event, lun[:2], lun[2:], r, used) == (want, bytes([1, target]), bytes(6), reason, 16)


# ---------------------------------------------------------------------- RPCs

def test_rpc_lifecycle_and_output_shapes(vhost_daemon):
    d = vhost_daemon
    for i in range(10):
        malloc(d, f"Malloc{i}", mb=1)
    assert d.rpc("vhost_create_scsi_controller", ctrlr="vhost.0", cpumask="0x1") is True
    (c,) = d.rpc("vhost_get_controllers")
    assert c["ctrlr"] == "vhost.0" and c["backend_specific"] == {"scsi": []}
    assert d.rpc("vhost_scsi_controller_add_target", ctrlr="vhost.0", scsi_target_num=3,
                 bdev_name="Malloc0") == 3
    assert d.rpc("vhost_scsi_controller_add_target", ctrlr="vhost.0", scsi_target_num=-1,
                 bdev_name="Malloc1") == 0
    assert scsi_of(d) == [
        {"scsi_dev_num": 0, "id": 1, "target_name": "Target 0", "luns": [{"id": 0, "bdev_name": "Malloc1"}]},
        {"scsi_dev_num": 3, "id": 0, "target_name": "Target 3", "luns": [{"id": 0, "bdev_name": "Malloc0"}]}]
    # vhost opens bdevs, it does not claim them (SPDK's bdev_get_bdevs shows them unclaimed).
    assert d.rpc("bdev_get_bdevs", name="Malloc0")[0]["claimed"] is False

    assert rpc_error(d, "vhost_scsi_controller_add_target", ctrlr="vhost.0", scsi_target_num=3,
                     bdev_name="Malloc2").code == -17                       # EEXIST
    assert rpc_error(d, "vhost_scsi_controller_add_target", ctrlr="vhost.0", scsi_target_num=8,
                     bdev_name="Malloc2").code == -22                       # EINVAL
    assert rpc_error(d, "vhost_scsi_controller_add_target", ctrlr="vhost.0", scsi_target_num=-2,
                     bdev_name="Malloc2").code == -22
    assert rpc_error(d, "vhost_scsi_controller_add_target", ctrlr="vhost.0", scsi_target_num=4,
                     bdev_name="Malloc0").code == -16                       # EBUSY: one target per bdev
    assert rpc_error(d, "vhost_scsi_controller_add_target", ctrlr="vhost.0", scsi_target_num=4,
                     bdev_name="Nope").code == -19                          # ENODEV
    assert rpc_error(d, "vhost_scsi_controller_add_target", ctrlr="vhost.9", scsi_target_num=4,
                     bdev_name="Malloc2").code == -19
    d.rpc("vhost_create_blk_controller", ctrlr="vhost.b", dev_name="Malloc9")
    e = rpc_error(d, "vhost_scsi_controller_add_target", ctrlr="vhost.b", scsi_target_num=0,
                  bdev_name="Malloc2")
    assert e.code == -22 and "not vhost-scsi" in e.message
    # A bdev another controller uses is shared, not refused (SPDK).
    assert d.rpc("vhost_scsi_controller_add_target", ctrlr="vhost.0", scsi_target_num=1,
                 bdev_name="Malloc9") == 1
    d.rpc("vhost_scsi_controller_remove_target", ctrlr="vhost.0", scsi_target_num=1)
    for i in range(2, 8):
        assert d.rpc("vhost_scsi_controller_add_target", ctrlr="vhost.0", scsi_target_num=-1,
                     bdev_name=f"Malloc{i}") in (1, 2, 4, 5, 6, 7)
    assert rpc_error(d, "vhost_scsi_controller_add_target", ctrlr="vhost.0", scsi_target_num=-1,
                     bdev_name="Malloc8").code == -28                       # ENOSPC

    assert d.rpc("vhost_scsi_controller_remove_target", ctrlr="vhost.0", scsi_target_num=3) is True
    assert rpc_error(d, "vhost_scsi_controller_remove_target", ctrlr="vhost.0", scsi_target_num=3).code == -19
    assert 3 not in [t["scsi_dev_num"] for t in scsi_of(d)]
    # SPDK's old names.
    assert d.rpc("add_vhost_scsi_lun", ctrlr="vhost.0", scsi_target_num=3, bdev_name="Malloc8") == 3
    d.rpc("remove_vhost_scsi_dev", ctrlr="vhost.0", scsi_target_num=3)
    d.rpc("add_vhost_scsi_lun", ctrlr="vhost.0", scsi_target_num=3, bdev_name="Malloc8")
    d.rpc("remove_vhost_scsi_target", ctrlr="vhost.0", scsi_target_num=3)
    d.rpc("construct_vhost_scsi_controller", ctrlr="vhost.1")

    config = d.rpc("framework_get_config", name="vhost_scsi")
    assert config[0] == {"method": "vhost_create_scsi_controller",
                         "params": {"ctrlr": "vhost.0", "cpumask": "0x1"}}
    assert {"method": "vhost_scsi_controller_add_target",
            "params": {"ctrlr": "vhost.0", "scsi_target_num": 0, "bdev_name": "Malloc1"}} in config
    assert config[-1]["params"]["ctrlr"] == "vhost.1"
    # A controller with targets is not deleted (SPDK: EBUSY); the error names the fix.
    e = rpc_error(d, "vhost_delete_controller", ctrlr="vhost.0")
    present = sorted(t["scsi_dev_num"] for t in scsi_of(d))
    assert e.code == -16 and "still present" in e.message, e.message
    assert all(f"vhost_scsi_controller_remove_target vhost.0 {n}" in e.message for n in present), e.message
    assert "vhost.0" in d.rpc("vhost_get_controllers")[0]["ctrlr"]
    for n in present:
        d.rpc("vhost_scsi_controller_remove_target", ctrlr="vhost.0", scsi_target_num=n)
    d.rpc("vhost_delete_controller", ctrlr="vhost.0")
    # It let go of every bdev it held: deleting them tells no controller.
    for i in range(9):
        d.rpc("bdev_malloc_delete", name=f"Malloc{i}")
    assert "was removed" not in d.log()
    assert "Traceback" not in d.log()


def test_delay_keeps_the_socket_closed_until_start(vhost_daemon):
    d = vhost_daemon
    malloc(d, "Malloc0")
    d.rpc("vhost_create_scsi_controller", ctrlr="vhost.0", delay=True)
    d.rpc("vhost_scsi_controller_add_target", ctrlr="vhost.0", scsi_target_num=0, bdev_name="Malloc0")
    assert not os.path.exists(d.socket("vhost.0"))
    assert d.rpc("vhost_start_scsi_controller", ctrlr="vhost.0") is True
    assert d.rpc("vhost_start_scsi_controller", ctrlr="vhost.0") is True
    with connect_scsi(d.socket("vhost.0")) as dev:
        assert dev.command(0, TEST_UNIT_READY).status == GOOD
    malloc(d, "Malloc1")
    d.rpc("vhost_create_blk_controller", ctrlr="vhost.1", dev_name="Malloc1")
    assert rpc_error(d, "vhost_start_scsi_controller", ctrlr="vhost.1").code == -22


def test_cli_commands_take_spdk_positional_arguments(vhost_daemon):
    d = vhost_daemon
    malloc(d, "Malloc0")
    malloc(d, "Malloc1")
    cli = [os.path.join(os.path.dirname(sys.executable), "vhost-rpc"), "-s", d.rpc_path]

    def run(*args) -> subprocess.CompletedProcess:
        return subprocess.run(cli + list(args), capture_output=True, text=True, timeout=60)

    assert run("vhost_create_scsi_controller", "--cpumask", "0x1", "vhost.0").returncode == 0
    r = run("vhost_scsi_controller_add_target", "vhost.0", "0", "Malloc0")
    assert (r.returncode, r.stdout.strip()) == (0, "0"), r.stderr
    r = run("add_vhost_scsi_lun", "vhost.0", "-1", "Malloc1")
    assert (r.returncode, r.stdout.strip()) == (0, "1") and "deprecated" in r.stderr
    r = run("remove_vhost_scsi_dev", "vhost.0", "1")
    assert (r.returncode, r.stdout) == (0, "")
    r = run("vhost_scsi_controller_remove_target", "vhost.0", "0")
    assert r.returncode == 0
    r = run("construct_vhost_scsi_controller", "--delay", "vhost.1")
    assert r.returncode == 0 and not os.path.exists(d.socket("vhost.1"))
    assert run("vhost_start_scsi_controller", "vhost.1").returncode == 0
    assert os.path.exists(d.socket("vhost.1"))
    r = run("vhost_scsi_controller_remove_target", "vhost.0", "5")
    assert r.returncode != 0 and "not occupied" in r.stdout + r.stderr


# ---------------------------------------------------------------------- hot-attach / detach

def test_hot_attach_and_detach_send_transport_reset_events(vhost_daemon):
    d = vhost_daemon
    malloc(d, "Malloc0")
    malloc(d, "Malloc1", block_size=4096)
    d.rpc("vhost_create_scsi_controller", ctrlr="vhost.0")
    d.rpc("vhost_scsi_controller_add_target", ctrlr="vhost.0", scsi_target_num=0, bdev_name="Malloc0")
    with connect_scsi(d.socket("vhost.0"), post_events=4) as dev:
        assert dev.features & (1 << F_HOTPLUG)
        assert dev.command(5, TEST_UNIT_READY).response == S_BAD_TARGET
        d.rpc("vhost_scsi_controller_add_target", ctrlr="vhost.0", scsi_target_num=5, bdev_name="Malloc1")
        assert event_for(dev.wait_event(), 5, EVT_RESET_RESCAN)
        r = dev.command(5, inquiry(36), data_in_len=36)
        assert (r.response, r.status, r.data[8:16]) == (S_OK, GOOD, b"INTEL   ")
        data = os.urandom(4096)
        assert dev.command(5, rw10(True, 1, 1), data_out=data).status == GOOD
        assert dev.command(5, rw10(False, 1, 1), data_in_len=4096).data == data

        d.rpc("vhost_scsi_controller_remove_target", ctrlr="vhost.0", scsi_target_num=5)
        assert event_for(dev.wait_event(), 5, EVT_RESET_REMOVED)
        assert dev.command(5, TEST_UNIT_READY).response == S_BAD_TARGET
        assert dev.command(0, TEST_UNIT_READY).status == GOOD, "no unit attention when events work"
        assert dev.events_completed(0.2) == []
    assert "Traceback" not in d.log()


def test_an_event_without_a_buffer_sets_events_missed_on_the_next(vhost_daemon):
    d = vhost_daemon
    malloc(d, "Malloc0")
    malloc(d, "Malloc1")
    d.rpc("vhost_create_scsi_controller", ctrlr="vhost.0")
    with connect_scsi(d.socket("vhost.0")) as dev:
        d.rpc("vhost_scsi_controller_add_target", ctrlr="vhost.0", scsi_target_num=0, bdev_name="Malloc0")
        dev.post_events(2)
        event, _lun, _reason, used = dev.wait_event()
        assert event == T_NO_EVENT | T_EVENTS_MISSED and used == 16
        d.rpc("vhost_scsi_controller_add_target", ctrlr="vhost.0", scsi_target_num=1, bdev_name="Malloc1")
        assert event_for(dev.wait_event(), 1, EVT_RESET_RESCAN), "back to normal events"


def test_without_hotplug_the_driver_gets_a_unit_attention(vhost_daemon):
    d = vhost_daemon
    malloc(d, "Malloc0")
    malloc(d, "Malloc1")
    d.rpc("vhost_create_scsi_controller", ctrlr="vhost.0")
    d.rpc("vhost_scsi_controller_add_target", ctrlr="vhost.0", scsi_target_num=0, bdev_name="Malloc0")
    no_hotplug = DEFAULT_FEATURES & ~(1 << F_HOTPLUG)
    with connect_scsi(d.socket("vhost.0"), features=no_hotplug, post_events=2) as dev:
        assert not dev.features & (1 << F_HOTPLUG)
        d.rpc("vhost_scsi_controller_add_target", ctrlr="vhost.0", scsi_target_num=2, bdev_name="Malloc1")
        assert dev.events_completed(0.2) == [], "no event without VIRTIO_SCSI_F_HOTPLUG"
        assert dev.command(0, inquiry(36), data_in_len=36).status == GOOD     # INQUIRY does not report it
        r = dev.command(0, TEST_UNIT_READY)
        assert (r.status, r.sense.key, r.sense.asc, r.sense.ascq) == \
            (CHECK_CONDITION, UNIT_ATTENTION, 0x3F, 0x0E)
        assert dev.command(0, TEST_UNIT_READY).status == GOOD
        assert dev.command(2, TEST_UNIT_READY).status == GOOD, "the new target itself has nothing to report"
        d.rpc("vhost_scsi_controller_remove_target", ctrlr="vhost.0", scsi_target_num=2)
        assert dev.command(2, TEST_UNIT_READY).response == S_BAD_TARGET
        assert dev.command(0, report_luns(), data_in_len=64).status == GOOD   # REPORT LUNS clears it
        assert dev.command(0, TEST_UNIT_READY).status == GOOD


def test_disconnect_hands_back_held_event_buffers(vhost_daemon):
    d = vhost_daemon
    malloc(d, "Malloc0")
    d.rpc("vhost_create_scsi_controller", ctrlr="vhost.0")
    d.rpc("vhost_scsi_controller_add_target", ctrlr="vhost.0", scsi_target_num=0, bdev_name="Malloc0")
    with connect_scsi(d.socket("vhost.0"), post_events=8) as dev:
        assert dev.command(0, TEST_UNIT_READY).status == GOOD
        # Stopping the event queue (QEMU does it at every device reset) returns at once,
        # with the buffers completed as NO_EVENT.
        t0 = time.monotonic()
        base = dev.frontend.get_vring_base(1)
        assert time.monotonic() - t0 < 2
        assert base == 8
        evs = dev.events_completed(1.0)
        assert len(evs) == 8 and all(e[0] == T_NO_EVENT and e[3] == 16 for e in evs)
        assert dev.command(0, TEST_UNIT_READY).status == GOOD, "the request queues still run"
    wait_no_session(d, "vhost.0", timeout=5)
    with connect_scsi(d.socket("vhost.0"), post_events=8) as dev:
        assert dev.command(0, TEST_UNIT_READY).status == GOOD
        pass
    t0 = time.monotonic()
    wait_no_session(d, "vhost.0", timeout=5)
    assert time.monotonic() - t0 < 3
    assert "still in flight" not in d.log()


def test_deleting_the_bdev_hot_detaches_its_target(vhost_daemon):
    d = vhost_daemon
    malloc(d, "Malloc0")
    malloc(d, "Malloc1")
    malloc(d, "Malloc2")
    d.rpc("vhost_create_scsi_controller", ctrlr="vhost.0")
    d.rpc("vhost_scsi_controller_add_target", ctrlr="vhost.0", scsi_target_num=0, bdev_name="Malloc0")
    d.rpc("vhost_scsi_controller_add_target", ctrlr="vhost.0", scsi_target_num=1, bdev_name="Malloc1")
    d.rpc("vhost_scsi_controller_add_target", ctrlr="vhost.0", scsi_target_num=2, bdev_name="Malloc2")
    with connect_scsi(d.socket("vhost.0"), post_events=4, num_queues=2) as dev:
        data = os.urandom(8192)
        assert dev.command(0, rw10(True, 0, 16), data_out=data).status == GOOD
        d.rpc("bdev_malloc_delete", name="Malloc1")
        assert event_for(dev.wait_event(), 1, EVT_RESET_REMOVED)
        d.rpc("delete_bdev", name="Malloc2")
        assert event_for(dev.wait_event(), 2, EVT_RESET_REMOVED)
        assert dev.command(1, TEST_UNIT_READY).response == S_BAD_TARGET
        assert dev.command(0, rw10(False, 0, 16), data_in_len=8192, queue=3).data == data
    assert [t["scsi_dev_num"] for t in scsi_of(d)] == [0]
    assert [b["name"] for b in d.rpc("bdev_get_bdevs")] == ["Malloc0"]
    d.wait_log("bdev 'Malloc1' was removed: hot-detached target 'Target 1'")
    d.wait_log("bdev 'Malloc2' was removed: hot-detached target 'Target 2'")
    # The slot is free again.
    malloc(d, "Malloc1")
    assert d.rpc("vhost_scsi_controller_add_target", ctrlr="vhost.0", scsi_target_num=-1,
                 bdev_name="Malloc1") == 1


def test_hot_detach_under_io_on_other_targets(vhost_daemon):
    """Attach and detach targets in a loop while another target carries I/O on
    two queues: that I/O never sees an error."""
    d = vhost_daemon
    malloc(d, "Malloc0", mb=8)
    malloc(d, "Malloc1")
    d.rpc("vhost_create_scsi_controller", ctrlr="vhost.0")
    d.rpc("vhost_scsi_controller_add_target", ctrlr="vhost.0", scsi_target_num=0, bdev_name="Malloc0")
    stop = threading.Event()
    errors: list = []
    with connect_scsi(d.socket("vhost.0"), post_events=16, num_queues=2) as dev:
        def io():
            i = 0
            while not stop.is_set():
                data = os.urandom(4096)
                lba = (i % 512) * 8
                w = dev.command(0, rw10(True, lba, 8), data_out=data, queue=2 + i % 2)
                r = dev.command(0, rw10(False, lba, 8), data_in_len=4096, queue=3 - i % 2)
                if (w.response, w.status, r.response, r.status) != (S_OK, GOOD, S_OK, GOOD) or r.data != data:
                    errors.append((w, r))
                i += 1

        # The fake driver is single-threaded: I/O runs in a thread and events are read
        # after it stops.
        t = threading.Thread(target=io)
        t.start()
        try:
            for _ in range(20):
                d.rpc("vhost_scsi_controller_add_target", ctrlr="vhost.0", scsi_target_num=4,
                      bdev_name="Malloc1")
                d.rpc("vhost_scsi_controller_remove_target", ctrlr="vhost.0", scsi_target_num=4)
        finally:
            stop.set()
            t.join()
        assert not errors, errors[:3]
        evs = dev.events_completed(1.0)
        assert len(evs) == 16 and evs[0][0] == T_TRANSPORT_RESET
    assert "Traceback" not in d.log()


# ---------------------------------------------------------------------- asynchronous bdev

@pytest.fixture
def aio_file(tmp_path):
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(8 << 20)
    return str(path)


def test_write_same_with_large_blocks_stays_within_the_transfer_limit(vhost_daemon, aio_file):
    """WRITE SAME repeats the block in writes of up to VN_MAX_IOV segments: with
    64 KiB blocks that would be 16 MiB per write, which bdevs refuse above
    VN_MAX_TRANSFER.  It writes in pieces of at most that instead."""
    d = vhost_daemon
    if "bdev_aio_create" not in d.rpc("rpc_get_methods"):
        pytest.fail("the bdev_aio plugin is not installed: scripts/install.sh installs it")
    bs = 65536
    os.truncate(aio_file, 32 << 20)             # 512 blocks: room for a READ (6) of 256
    d.rpc("bdev_aio_create", filename=aio_file, name="Aio64", block_size=bs)
    d.rpc("vhost_create_scsi_controller", ctrlr="vhost.0")
    d.rpc("vhost_scsi_controller_add_target", ctrlr="vhost.0", scsi_target_num=0, bdev_name="Aio64")
    block = bytes(range(256)) * (bs // 256)
    n = 100                                     # 6.25 MiB, in one command
    with connect_scsi(d.socket("vhost.0")) as dev:
        r = dev.command(0, write_same16(4, n), data_out=block)
        assert (r.response, r.status) == (S_OK, GOOD), r
        # The limit in blocks is 64 here, and READ (6)'s 256 blocks exceed it.
        b0 = dev.command(0, inquiry(64, evpd=True, page=0xB0), data_in_len=64).data
        assert struct.unpack(">I", b0[8:12])[0] == (4 << 20) // bs
        r = dev.command(0, rw6(False, 0, 0), data_in_len=bs)
        assert (r.status, r.sense.key, r.sense.asc) == (CHECK_CONDITION, ILLEGAL_REQUEST, 0x24)
        assert r.sense.field == 4, "TRANSFER LENGTH"
    with open(aio_file, "rb") as f:
        f.seek(3 * bs)
        assert f.read((n + 2) * bs) == bytes(bs) + block * n + bytes(bs)


def test_target_on_an_asynchronous_readonly_bdev(vhost_daemon, aio_file):
    """A bdev that completes from its channel poller (aio): commands in flight drain
    before the target goes, and a read-only bdev is write protected."""
    d = vhost_daemon
    if "bdev_aio_create" not in d.rpc("rpc_get_methods"):
        pytest.fail("the bdev_aio plugin is not installed: scripts/install.sh installs it")
    d.rpc("bdev_aio_create", filename=aio_file, name="Aio0", block_size=512)
    with open(aio_file + ".ro", "wb") as f:
        f.truncate(1 << 20)
    d.rpc("bdev_aio_create", filename=aio_file + ".ro", name="AioRO", block_size=512, readonly=True)
    d.rpc("vhost_create_scsi_controller", ctrlr="vhost.0")
    d.rpc("vhost_scsi_controller_add_target", ctrlr="vhost.0", scsi_target_num=0, bdev_name="Aio0")
    d.rpc("vhost_scsi_controller_add_target", ctrlr="vhost.0", scsi_target_num=1, bdev_name="AioRO")
    with connect_scsi(d.socket("vhost.0"), post_events=4) as dev:
        data = os.urandom(64 * 1024)
        assert dev.command(0, rw10(True, 64, 128), data_out=data).status == GOOD
        assert dev.command(0, rw10(False, 64, 128), data_in_len=len(data)).data == data
        r = dev.command(1, mode_sense6(0x08, dbd=True), data_in_len=64)
        assert r.data[2] & 0x80, "WP"
        r = dev.command(1, rw10(True, 0, 1), data_out=bytes(512))
        assert (r.status, r.sense.key, r.sense.asc) == (CHECK_CONDITION, DATA_PROTECT, 0x27)
        # Many commands in flight, then hot-detach: they all complete before the event.
        vq = dev.queues[2]
        mem = dev.memory
        from vhost_dev_scsi.testing import REQ_HDR, lun_bytes
        for i in range(32):
            cdb = rw10(False, i * 8, 8).ljust(32, b"\0")
            hdr = mem.alloc_bytes(REQ_HDR.pack(lun_bytes(0), i, 0, 0, 0, cdb))
            resp = mem.alloc(RESP_SIZE + 4096)
            vq.add_chain([(hdr, 51, False), (resp, RESP_SIZE, True), (resp + RESP_SIZE, 4096, True)],
                         publish=False)
        vq.publish()
        vq.kick()
        d.rpc("vhost_scsi_controller_remove_target", ctrlr="vhost.0", scsi_target_num=0)
        done = vq.wait_used(5, min_count=32)
        assert len(done) == 32
        assert event_for(dev.wait_event(), 0, EVT_RESET_REMOVED)
    assert "Traceback" not in d.log()


def test_a_new_call_fd_of_a_running_ring_is_signalled(vhost_daemon):
    """QEMU swaps the call fds right after starting the device: a completion
    signalled on the old fd would be lost (the guest's first INQUIRY hung), so
    the new fd gets one (possibly spurious) signal."""
    d = vhost_daemon
    malloc(d, "Malloc0")
    d.rpc("vhost_create_scsi_controller", ctrlr="vhost.0")
    d.rpc("vhost_scsi_controller_add_target", ctrlr="vhost.0", scsi_target_num=0, bdev_name="Malloc0")
    with connect_scsi(d.socket("vhost.0")) as dev:
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            dev.frontend.set_vring_call(2, fd)
            assert os.eventfd_read(fd) >= 1
            assert dev.command(0, TEST_UNIT_READY).status == GOOD
        finally:
            os.close(fd)


def test_sigterm_with_a_connected_driver_holding_event_buffers(vhost_daemon):
    d = vhost_daemon
    malloc(d, "Malloc0")
    d.rpc("vhost_create_scsi_controller", ctrlr="vhost.0")
    d.rpc("vhost_scsi_controller_add_target", ctrlr="vhost.0", scsi_target_num=0, bdev_name="Malloc0")
    with connect_scsi(d.socket("vhost.0"), post_events=8, num_queues=2) as dev:
        assert dev.command(0, rw10(True, 0, 1), data_out=bytes(512)).status == GOOD
        t0 = time.monotonic()
        assert d.stop() == 0, d.log()
        assert time.monotonic() - t0 < 10
        assert len(dev.events_completed(1.0)) == 8
    assert "still in flight" not in d.log() and "Traceback" not in d.log()


def test_bdev_get_iostat_counts_each_target_and_keeps_it_after_hot_detach(vhost_daemon):
    d = vhost_daemon
    malloc(d, "M0")                              # 512-byte blocks
    malloc(d, "M1", block_size=4096)
    d.rpc("vhost_create_scsi_controller", ctrlr="vhost.0")
    d.rpc("vhost_scsi_controller_add_target", ctrlr="vhost.0", scsi_target_num=0, bdev_name="M0")
    d.rpc("vhost_scsi_controller_add_target", ctrlr="vhost.0", scsi_target_num=1, bdev_name="M1")

    def stat(name: str) -> dict:
        return d.rpc("bdev_get_iostat", name=name)["bdevs"][0]

    with connect_scsi(d.socket("vhost.0")) as dev:
        for i in range(3):
            assert dev.command(0, rw10(True, i * 8, 8), data_out=b"s" * 4096).status == GOOD
        for i in range(2):
            assert dev.command(1, rw10(False, i, 2), data_in_len=8192).status == GOOD
        params = unmap_params((100, 16), (200, 8))
        assert dev.command(0, unmap(len(params)), data_out=params).status == GOOD
        assert dev.command(0, sync_cache10()).status == GOOD
        m0, m1 = stat("M0"), stat("M1")
        assert (m0["num_write_ops"], m0["bytes_written"]) == (3, 3 * 4096)
        assert (m0["num_unmap_ops"], m0["bytes_unmapped"]) == (1, 24 * 512)
        assert m0["num_flush_ops"] == 1 and m0["num_read_ops"] == 0
        assert (m1["num_read_ops"], m1["bytes_read"]) == (2, 2 * 8192) and m1["num_write_ops"] == 0
        assert 0 < m1["min_read_latency_ticks"] <= m1["max_read_latency_ticks"]
        d.rpc("vhost_scsi_controller_remove_target", ctrlr="vhost.0", scsi_target_num=0)
        assert stat("M0")["num_write_ops"] == 3          # detached: the totals stay with the bdev
        d.rpc("vhost_scsi_controller_add_target", ctrlr="vhost.0", scsi_target_num=2, bdev_name="M0")
        dev.post_events(4)
        for _ in range(20):      # the driver may see a unit attention once after the rescan
            if dev.command(2, rw10(True, 0, 8), data_out=b"t" * 4096).status == GOOD:
                break
        assert stat("M0")["num_write_ops"] == 4
