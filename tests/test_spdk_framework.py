"""SPDK's framework and log methods on the real daemon: what scripts and SPDK's tools rely on."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import pytest

from vhost_core.rpc.registry import RpcError
from vhost_core.testing.daemon import VhostDaemon


def rpc_error(d: VhostDaemon, method: str, **params) -> RpcError:
    with pytest.raises(RpcError) as ei:
        d.rpc(method, **params)
    return ei.value


def test_bdev_get_bdevs_waits_timeout_ms_for_the_bdev_to_appear(vhost_daemon):
    d = vhost_daemon
    got = {}
    waiter = threading.Thread(target=lambda: got.update(r=d.rpc("bdev_get_bdevs", name="Late", timeout=5000)))
    waiter.start()
    time.sleep(0.2)
    d.rpc("bdev_malloc_create", num_blocks=64, block_size=512, name="Late")
    waiter.join(10)
    assert got["r"][0]["name"] == "Late"
    start = time.monotonic()
    assert rpc_error(d, "bdev_get_bdevs", name="Never", timeout=200).code == -19
    assert 0.2 <= time.monotonic() - start < 5


def test_spdk_kill_instance_refuses_a_signal_it_would_not_drain_on(vhost_daemon):
    e = rpc_error(vhost_daemon, "spdk_kill_instance", sig_name="SIGHUP")
    assert e.code == -95 and e.message.startswith("spdk_kill_instance: sig_name=SIGHUP is not supported")
    assert "SIGINT or SIGTERM" in e.message
    e = rpc_error(vhost_daemon, "spdk_kill_instance", sig_name="SIGWHAT")
    assert e.code == -32602 and "SIGINT, SIGTERM, SIGKILL" in e.message
    assert vhost_daemon.alive()


def test_spdk_kill_instance_sigkill_is_a_crash_and_sigint_by_number_a_clean_stop(tmp_path):
    with VhostDaemon(tmp_path / "a") as d:
        assert d.rpc("spdk_kill_instance", sig_name="SIGKILL") is True
        assert d.proc.wait(10) == -signal.SIGKILL
    with VhostDaemon(tmp_path / "b") as d:
        assert d.rpc("spdk_kill_instance", sig_name=str(int(signal.SIGINT))) is True    # SPDK takes "2"
        assert d.proc.wait(30) == 0 and "*NOTICE*: Exiting" in d.log()


def test_dash_L_turns_on_the_debug_lines_of_one_area(tmp_path):
    from vhost_core.testing import connect_blk

    with VhostDaemon(tmp_path, extra_args=("-L", "vhost_ring")) as d:
        d.rpc("bdev_malloc_create", num_blocks=64, block_size=512, name="Malloc0")
        d.rpc("vhost_create_blk_controller", ctrlr="vhost.0", dev_name="Malloc0")
        dev = connect_blk(d.socket("vhost.0"))
        dev.write(0, b"\1" * 512)
        dev.close()
        out = d.wait_log("started (size")
        assert "*DEBUG*: Controller vhost.0: vring 0 started" in out
        assert "rpc: call" not in out                        # the rpc area's flag is not set
        assert d.rpc("log_get_print_level") == "DEBUG"
        assert d.rpc("log_get_flags")["vhost_ring"] is True
        d.rpc("log_clear_flag", flag="vhost_ring")
        d.rpc("log_set_flag", flag="rpc")
        d.rpc("spdk_get_version")
        assert "*DEBUG*: rpc: call spdk_get_version" in d.wait_log("rpc: call spdk_get_version")


def test_an_unknown_log_flag_at_start_names_the_valid_ones(tmp_path):
    r = subprocess.run([sys.executable, "-m", "vhost_core.app", "-S", str(tmp_path), "-r",
                        str(tmp_path / "rpc.sock"), "-L", "nvme"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert "vhost: log flag 'nvme' does not exist; valid flags: all, aio, " in r.stderr


def test_log_methods_refuse_what_spdk_does_not_have(vhost_daemon):
    e = rpc_error(vhost_daemon, "log_set_print_level", level="LOUD")
    assert (e.code, e.message) == (-32602, "log_set_print_level: log level 'LOUD' is not one of ERROR, "
                                           "WARNING, NOTICE, INFO, DEBUG")
    e = rpc_error(vhost_daemon, "log_set_flag", flag="nvme")
    assert e.message.startswith("log_set_flag: log flag 'nvme' does not exist; valid flags: all, aio, ")


def test_framework_wait_init_answers_every_waiter_at_framework_start_init(tmp_path):
    with VhostDaemon(tmp_path, extra_args=("--wait-for-rpc",)) as d:
        results = []
        waiters = [threading.Thread(target=lambda: results.append(d.rpc("framework_wait_init")))
                   for _ in range(3)]
        for w in waiters:
            w.start()
        time.sleep(0.3)
        assert results == []
        e = rpc_error(d, "vhost_get_controllers")
        assert (e.code, e.message) == (-1, "Method may only be called after framework is initialized using "
                                           "framework_start_init RPC.")
        assert d.rpc("framework_start_init") is True
        for w in waiters:
            w.join(10)
        assert results == [True, True, True]
        assert d.rpc("vhost_get_controllers") == []
