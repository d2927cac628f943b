"""Controller loss, for real: the target guest is killed under I/O.  I/O fails once
fast_io_fail_timeout_sec has passed (never hangs); a controller past its
ctrlr_loss_timeout_sec has its namespaces hot-removed; the target coming back on the same
address is reconnected within reconnect_delay_sec and serves I/O again."""

from __future__ import annotations

import os
import threading
import time

from vhost_core.testing import connect_blk
from vhost_core.testing.blk import BlkIOError


def wait_for(what: str, cond, timeout: float, d) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what}: not within {timeout} s\n{d.log()[-4000:]}")
        time.sleep(0.05)
    return time.monotonic() - t0


def test_target_killed_under_io_then_back(vhost_daemon, nvmet_mod):
    d = vhost_daemon
    t = nvmet_mod.NvmetTarget(name="nvmet-loss").start()
    try:
        d.rpc("bdev_nvme_attach_controller", **t.attach_params("Nvme0", ctrlr_loss_timeout_sec=120,
                                                               reconnect_delay_sec=1, fast_io_fail_timeout_sec=2))
        d.rpc("bdev_nvme_attach_controller", **t.attach_params("Nvme1", subnqn=nvmet_mod.NULL_NQN,
                                                               ctrlr_loss_timeout_sec=3, reconnect_delay_sec=1))
        d.rpc("vhost_create_blk_controller", ctrlr="vhost.0", dev_name="Nvme0n1")
        d.rpc("vhost_create_blk_controller", ctrlr="vhost.1", dev_name="Nvme1n1")
        with connect_blk(d.socket("vhost.0"), timeout=30) as dev, connect_blk(d.socket("vhost.1"), timeout=30) as dev1:
            data = os.urandom(64 << 10)
            dev.write(0, data)
            assert dev.read(0, 128) == data
            dev1.read(0, 8)

            results: list[tuple[float, bool]] = []
            stop = threading.Event()

            def io_loop() -> None:
                while not stop.is_set():
                    try:
                        dev.write(1024, data)
                        ok = dev.read(1024, 128) == data
                    except BlkIOError:
                        ok = False
                    results.append((time.monotonic(), ok))

            io = threading.Thread(target=io_loop, daemon=True)
            io.start()
            wait_for("I/O running", lambda: len(results) >= 3, 20, d)
            t.kill()
            killed = time.monotonic()
            # I/O in flight and after: fails once fast_io_fail_timeout_sec (2 s) passed, never hangs.
            wait_for("an I/O error after the target died", lambda: any(not ok for _, ok in results), 15, d)
            first_err = min(ts for ts, ok in results if not ok) - killed
            assert first_err < 2 + 3, first_err
            d.wait_log("Nvme0: controller TCP 127.0.0.1", timeout=5)
            assert "reconnecting every 1 s" in d.log()
            # Nvme1 (ctrlr_loss_timeout_sec 3): its namespace is hot-removed from its controller.
            wait_for("Nvme1n1 hot-removed", lambda: "Nvme1n1" not in [b["name"] for b in d.rpc("bdev_get_bdevs")],
                     15, d)
            assert time.monotonic() - killed >= 3
            assert d.rpc("vhost_get_controllers", name="vhost.1")[0]["backend_specific"]["block"]["bdev"] is None
            try:
                dev1.read(0, 8)
                raise AssertionError("a read on the removed namespace succeeded")
            except BlkIOError:
                pass
            assert [c["name"] for c in d.rpc("bdev_nvme_get_controllers")] == ["Nvme0"]
            assert d.rpc("bdev_nvme_get_controllers", name="Nvme0")[0]["ctrlrs"][0]["state"] == "resetting"

            # The target comes back on the same address: reconnected within reconnect_delay_sec.
            t.start()
            back = time.monotonic()
            took = wait_for("Nvme0 reconnected", lambda: d.rpc("bdev_nvme_get_controllers", name="Nvme0")[0]
                            ["ctrlrs"][0]["state"] == "enabled", 10, d)
            # The first attempt after the target is back succeeds (one reconnect_delay_sec),
            # plus the connect itself through user networking into a TCG guest.
            assert took < 1 + 8, took
            n = len(results)
            wait_for("I/O succeeding again", lambda: any(ok for ts, ok in results[n:] if ts > back), 15, d)
            stop.set()
            io.join(30)
            assert not io.is_alive()
            dev.write(0, data)
            assert dev.read(0, 128) == data
        stats = d.rpc("bdev_nvme_get_controllers", name="Nvme0")[0]["ctrlrs"][0]["stats"]
        assert stats["io_queue_disconnects"] >= 1 and stats["io_queue_connects"] >= 2
        assert "reconnected after" in d.log()
        assert d.alive() and "Traceback" not in d.log()
    finally:
        t.close()
