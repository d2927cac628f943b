"""SPDK's own client (PyPI ``spdk``, its ``spdk-rpc`` command line) drives every method we list.

SPDK's rpc.py sends every optional parameter it knows, with its default value; a target that
accepts only what it implements breaks with each new client release.  This test runs the
seed's walkthrough (create, list, save, delete) and every other method ``rpc_get_methods``
lists through that command line, with the client's defaults, and checks SPDK's output shapes.
It fails if a listed method errors on the client's defaults, and if a method gets listed that
nothing here drives (add it to the scenario).

Methods SPDK's client has no command for (ours, and SPDK's old names, which today's client no
longer has) go through the same client's library, ``JSONRPCClient``, with the parameters the
command line of their time sent.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

try:
    import spdk.rpc.client as spdk_client
except ImportError as exc:      # a missing prerequisite fails with its fix, it does not skip
    raise ImportError("SPDK's client is missing: pip install spdk (scripts/install.sh --test does)") from exc

from vhost_core.testing.daemon import VhostDaemon  # noqa: E402

BDEV_KEYS = {"name", "aliases", "product_name", "block_size", "num_blocks", "uuid", "assigned_rate_limits",
             "claimed", "zoned", "supported_io_types", "driver_specific"}
CTRLR_KEYS = {"ctrlr", "cpumask", "delay_base_us", "iops_threshold", "socket", "sessions", "backend_specific"}
THREAD_KEYS = {"name", "id", "cpumask", "busy", "idle", "active_pollers_count", "timed_pollers_count",
               "paused_pollers_count"}
IOSTAT_KEYS = {"name", "bytes_read", "num_read_ops", "bytes_written", "num_write_ops", "bytes_unmapped",
               "num_unmap_ops", "read_latency_ticks", "write_latency_ticks", "unmap_latency_ticks"}


class SpdkRpc:
    """Runs ``spdk-rpc`` against one daemon and remembers which methods it drove."""

    instances: list[SpdkRpc] = []        # their --server clients end with the test

    def __init__(self, daemon: VhostDaemon) -> None:
        self.daemon = daemon
        self.driven: set[str] = set()
        self.server: subprocess.Popen | None = None
        SpdkRpc.instances.append(self)

    def run(self, *argv: str, stdin: str | None = None, methods: tuple[str, ...] = ()) -> str:
        if stdin is None:
            out = self._serve(argv)
        else:
            r = self.popen(*argv, stdin=stdin)
            out, err = r.communicate(timeout=60)
            assert r.returncode == 0, (f"spdk-rpc {' '.join(argv)} failed ({r.returncode}):\n{out}{err}\n"
                                       f"--- target log:\n{self.daemon.log()[-3000:]}")
        self.driven.update(methods or (argv[0],))
        return out

    def _serve(self, argv: tuple[str, ...]) -> str:
        """One command line through ``spdk-rpc --server``: the client's own mode for scripts
        that run many commands (each line parsed as a command line of its own, with the same
        parser and defaults), one interpreter start instead of one per command."""
        if self.server is None:
            self.server = subprocess.Popen([sys.executable, "-m", "spdk.spdk_rpc", "--server"],
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, text=True, bufsize=1)
        self.server.stdin.write(shlex.join(["-s", self.daemon.rpc_path, *argv]) + "\n")
        self.server.stdin.flush()
        out = []
        while True:
            line = self.server.stdout.readline()
            if not line:            # the client died: its traceback is on stderr
                err = self.server.stderr.read()
                self.server = None
                raise AssertionError(f"spdk-rpc --server died on {' '.join(argv)}:\n{''.join(out)}{err}")
            if line.startswith("**STATUS="):
                break
            out.append(line)
        assert line.strip() == "**STATUS=0", (f"spdk-rpc {' '.join(argv)} failed:\n{''.join(out)}\n"
                                              f"--- target log:\n{self.daemon.log()[-3000:]}")
        return "".join(out)

    def close(self) -> None:
        if self.server is not None:
            self.server.stdin.close()
            try:
                self.server.wait(10)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait()
            self.server.stdout.close()
            self.server.stderr.close()
            self.server = None

    def popen(self, *argv: str, stdin: str | None = None) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-m", "spdk.spdk_rpc", "-s", self.daemon.rpc_path, *argv],
                             stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if stdin is not None:
            p.stdin.write(stdin)
            p.stdin.close()
            p.stdin = None
        return p

    def json(self, *argv: str, methods: tuple[str, ...] = ()):
        return json.loads(self.run(*argv, methods=methods))

    def fails(self, *argv: str) -> str:
        r = subprocess.run([sys.executable, "-m", "spdk.spdk_rpc", "-s", self.daemon.rpc_path, *argv],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode != 0, f"spdk-rpc {' '.join(argv)} succeeded:\n{r.stdout}"
        return r.stdout + r.stderr

    def call(self, method: str, params: dict | None = None):
        """Through the client's library (``JSONRPCClient``), for methods its CLI does not have."""
        with spdk_client.JSONRPCClient(self.daemon.rpc_path, timeout=30) as c:
            result = c.call(method, params)
        self.driven.add(method)
        return result


@pytest.fixture(autouse=True)
def _close_rpc_clients():
    yield
    while SpdkRpc.instances:
        SpdkRpc.instances.pop().close()


@pytest.fixture
def daemon(tmp_path):
    d = VhostDaemon(tmp_path, extra_args=("--wait-for-rpc",)).start()
    yield d
    d.stop()


def test_every_listed_method_answers_spdk_rpc_py_with_its_defaults(daemon, tmp_path):
    rpc = SpdkRpc(daemon)
    listed = rpc.json("rpc_get_methods")
    assert "bdev_malloc_create" in listed and "construct_malloc_bdev" not in listed
    assert "construct_malloc_bdev" in rpc.json("rpc_get_methods", "-i")

    # --- start-up state (vhost --wait-for-rpc): options and log settings, then framework_start_init
    startup = set(rpc.json("rpc_get_methods", "-c"))
    assert {"framework_start_init", "iobuf_set_options", "log_set_flag"} <= startup
    assert "bdev_malloc_create" not in startup
    assert "framework_start_init" in rpc.fails("bdev_malloc_create", "64", "512")
    assert rpc.json("spdk_get_version")["fields"].keys() == {"major", "minor", "patch", "suffix"}
    rpc.run("iobuf_set_options")
    rpc.run("sock_set_default_impl", "-i", "posix")
    rpc.run("sock_impl_set_options", "-i", "posix")
    rpc.run("accel_set_options")
    rpc.run("bdev_set_options")
    rpc.run("bdev_raid_set_options")
    rpc.run("bdev_nvme_set_options")
    rpc.run("framework_set_scheduler", "static")
    rpc.run("log_set_print_level", "INFO")
    assert rpc.json("log_get_print_level") == "INFO"
    rpc.run("log_set_print_level", "NOTICE")
    rpc.run("log_set_level", "WARNING")
    assert rpc.json("log_get_level") == "WARNING"
    rpc.run("log_set_flag", "vhost_ring")
    flags = rpc.json("log_get_flags")
    assert flags["vhost_ring"] is True and flags["bdev"] is False and {"vhost", "vhost_scsi"} <= flags.keys()
    rpc.run("log_clear_flag", "vhost_ring")
    assert rpc.json("log_get_flags")["vhost_ring"] is False
    assert "iobuf_set_options: ignored" in daemon.log()
    waiter = rpc.popen("framework_wait_init")        # answers once the framework is initialized
    time.sleep(0.3)
    assert waiter.poll() is None
    rpc.run("framework_start_init")
    assert waiter.wait(10) == 0
    rpc.driven.add("framework_wait_init")
    rpc.run("framework_wait_init")
    assert "Use --wait-for-rpc" in rpc.fails("iobuf_set_options")

    # --- the seed's walkthrough, today's names (its SSD is not in this machine: the attach
    # says what it found at that address)
    why = rpc.fails("bdev_nvme_attach_controller", "-b", "Nvme0", "-t", "pcie", "-a", "0000:01:00.0")
    assert any(w in why for w in ("no PCI function 0000:01:00.0", "0000:01:00.0 is not an NVMe controller",
                                  "not vfio-pci")), why
    assert rpc.run("bdev_malloc_create", "128", "4096", "-b", "Malloc0").strip() == "Malloc0"
    assert rpc.run("vhost_create_scsi_controller", "--cpumask", "0x1", "vhost.0") == ""
    assert rpc.run("vhost_scsi_controller_add_target", "vhost.0", "1", "Malloc0").strip() == "1"
    assert rpc.run("bdev_malloc_create", "64", "512", "-b", "Malloc1").strip() == "Malloc1"
    assert rpc.run("vhost_create_blk_controller", "--cpumask", "0x1", "vhost.1", "Malloc1") == ""
    assert "Controller vhost.1: using bdev 'Malloc1'" in daemon.log()
    # ... and the rest of what we serve.
    img = tmp_path / "disk.img"
    img.write_bytes(b"\0" * (8 << 20))
    assert rpc.run("bdev_aio_create", str(img), "Aio0").strip() == "Aio0"
    assert rpc.run("bdev_null_create", "Null0", "16", "512").strip() == "Null0"
    with img.open("ab") as f:
        f.truncate(16 << 20)
    rpc.run("bdev_aio_rescan", "Aio0")
    rpc.run("vhost_create_scsi_controller", "--delay", "vhost.2")
    rpc.run("vhost_scsi_controller_add_target", "vhost.2", "0", "Aio0")
    rpc.run("vhost_start_scsi_controller", "vhost.2")
    rpc.run("bdev_wait_for_examine")
    rpc.run("bdev_nvme_set_hotplug", "--no-hotplug")
    # NVMe/TCP needs a target (plugins/bdev_nvme/tests boot one): here, the answers without one.
    assert rpc.json("bdev_nvme_get_controllers") == []
    assert "does not exist" in rpc.fails("bdev_nvme_detach_controller", "Nvme0")
    assert "no PCIe NVMe controller 'Nvme0'" in rpc.fails("bdev_nvme_reset_controller", "Nvme0")
    rpc.driven.update({"bdev_nvme_attach_controller", "bdev_nvme_detach_controller",     # fails() above
                       "bdev_nvme_reset_controller"})
    rpc.run("bdev_raid_set_options")
    rpc.run("framework_set_scheduler", "static")
    # SPDK's v24.05 walkthrough: a read-only vhost-blk sharing Malloc0 with a SCSI target, QoS, coalescing.
    assert rpc.run("vhost_create_blk_controller", "--cpumask", "0x1", "-r", "vhost.3", "Malloc0") == ""
    rpc.run("bdev_set_qos_limit", "Malloc0", "--rw-ios-per-sec", "20000")
    rpc.run("vhost_controller_set_coalescing", "vhost.3", "50", "60000")

    # --- listing, in SPDK's shapes
    bdevs = {b["name"]: b for b in rpc.json("bdev_get_bdevs")}
    assert set(bdevs) == {"Malloc0", "Malloc1", "Aio0", "Null0"}
    assert all(b.keys() >= BDEV_KEYS for b in bdevs.values())
    assert (bdevs["Malloc0"]["block_size"], bdevs["Malloc0"]["num_blocks"]) == (4096, 32768)
    assert bdevs["Aio0"]["num_blocks"] == (16 << 20) // 512
    assert rpc.json("bdev_get_bdevs", "-b", "Malloc1", "-t", "10")[0]["name"] == "Malloc1"
    ctrlrs = {c["ctrlr"]: c for c in rpc.json("vhost_get_controllers")}
    assert set(ctrlrs) == {"vhost.0", "vhost.1", "vhost.2", "vhost.3"}
    assert ctrlrs["vhost.3"]["backend_specific"]["block"] == {"readonly": True, "bdev": "Malloc0",
                                                             "transport": "vhost_user_blk"}
    assert (ctrlrs["vhost.3"]["delay_base_us"], ctrlrs["vhost.3"]["iops_threshold"]) == (50, 60000)
    assert bdevs["Malloc0"]["assigned_rate_limits"]["rw_ios_per_sec"] == 20000
    assert all(c.keys() >= CTRLR_KEYS for c in ctrlrs.values())
    assert ctrlrs["vhost.1"]["backend_specific"]["block"]["bdev"] == "Malloc1"
    assert rpc.json("vhost_get_controllers", "-n", "vhost.0")[0]["backend_specific"]["scsi"][0]["luns"] == [
        {"id": 0, "bdev_name": "Malloc0"}]
    stat = rpc.json("bdev_get_iostat")
    assert {"tick_rate", "ticks", "bdevs"} <= stat.keys()
    assert all(b.keys() >= IOSTAT_KEYS for b in stat["bdevs"])
    assert [b["name"] for b in rpc.json("bdev_get_iostat", "--names", "Malloc1")["bdevs"]] == ["Malloc1"]
    rpc.run("bdev_reset_iostat")
    reactors = rpc.json("framework_get_reactors")
    assert reactors["tick_rate"] > 0 and reactors["reactors"][0].keys() >= {"lcore", "busy", "idle",
                                                                            "lw_threads"}
    threads = rpc.json("thread_get_stats")
    assert threads["tick_rate"] > 0 and threads["threads"] and threads["threads"][0].keys() >= THREAD_KEYS
    subsystems = rpc.json("framework_get_subsystems")
    assert [s["subsystem"] for s in subsystems] == ["bdev", "vhost_blk", "vhost_scsi"]
    assert all(s["depends_on"] == [] for s in subsystems)
    assert {c["method"] for c in rpc.json("framework_get_config", "bdev")} == {
        "bdev_malloc_create", "bdev_aio_create", "bdev_null_create", "bdev_set_qos_limit"}

    # --- saving
    saved = rpc.json("save_config", methods=("framework_get_subsystems", "framework_get_config"))
    assert [s["subsystem"] for s in saved["subsystems"]] == ["bdev", "vhost_blk", "vhost_scsi"]
    (tmp_path / "saved.json").write_text(json.dumps(saved))
    bdev_only = rpc.json("save_subsystem_config", "-n", "bdev", methods=("framework_get_config",))
    assert bdev_only == saved["subsystems"][0]

    # --- ours, which SPDK's command line has no command for
    assert {p["name"] for p in rpc.call("framework_get_plugins")} >= {"bdev_malloc", "dev_blk"}
    assert rpc.call("vhost_get_queue_stats", {"ctrlr": "vhost.1"})[0].keys() >= {"queue", "requests"}
    assert rpc.call("bdev_aio_get_stats", {"name": "Aio0"})[0]["name"] == "Aio0"

    # --- deleting
    rpc.run("vhost_scsi_controller_remove_target", "vhost.0", "1")
    rpc.run("vhost_scsi_controller_remove_target", "vhost.2", "0")
    for c in ("vhost.0", "vhost.1", "vhost.2", "vhost.3"):
        rpc.run("vhost_delete_controller", c)
    rpc.run("bdev_malloc_delete", "Malloc0")
    rpc.run("bdev_malloc_delete", "Malloc1")
    rpc.run("bdev_null_delete", "Null0")
    rpc.run("bdev_aio_delete", "Aio0")
    assert rpc.json("bdev_get_bdevs") == [] and rpc.json("vhost_get_controllers") == []

    # --- loading what was saved: the same objects again
    rpc.run("load_config", "-j", str(tmp_path / "saved.json"), methods=("rpc_get_methods",))
    assert {b["name"] for b in rpc.json("bdev_get_bdevs")} == set(bdevs)
    assert {c["ctrlr"] for c in rpc.json("vhost_get_controllers")} == set(ctrlrs)
    assert rpc.json("save_config") == saved
    # A vhost-scsi controller with targets is not deleted (SPDK: EBUSY): the targets go first.
    out = rpc.fails("vhost_delete_controller", "vhost.0")
    assert "SCSI target 1 is still present" in out and "vhost_scsi_controller_remove_target vhost.0 1" in out
    rpc.run("vhost_scsi_controller_remove_target", "vhost.0", "1")
    rpc.run("vhost_scsi_controller_remove_target", "vhost.2", "0")
    for c in ("vhost.0", "vhost.1", "vhost.2", "vhost.3"):
        rpc.run("vhost_delete_controller", c)
    rpc.run("bdev_null_delete", "Null0")
    rpc.run("load_subsystem_config", stdin=json.dumps({"subsystem": "bdev", "config": [
        c for c in bdev_only["config"] if c["method"] == "bdev_null_create"]}), methods=("rpc_get_methods",))
    assert rpc.json("bdev_get_bdevs", "-b", "Null0")[0]["uuid"] == bdevs["Null0"]["uuid"]

    _seed_old_names(rpc)
    _rbd(rpc)

    listed = set(rpc.json("rpc_get_methods"))

    # --- and the end: SIGTERM through the RPC, the clean shutdown
    rpc.run("spdk_kill_instance", "SIGTERM")
    assert daemon.proc.wait(30) == 0
    assert "*NOTICE*: Exiting" in daemon.log() and "Traceback" not in daemon.log()

    unlisted = listed - rpc.driven
    assert not unlisted, f"listed by rpc_get_methods but not driven by this test: {sorted(unlisted)}"


def _rbd(rpc: SpdkRpc) -> None:
    """bdev_rbd_*, on a throw-away single-node Ceph cluster (vhost-bdev-rbd's test helper)."""
    from vhost_bdev_rbd.testing import CephCluster

    with CephCluster() as ceph:
        ceph.rbd("create", "--size", "16M", "rbd/spdk")
        conf = ceph.client_conf()
        assert rpc.run("bdev_rbd_register_cluster", "c1", "--user", "admin",
                       *[a for k, v in conf.items() for a in ("--config-param", f"{k}={v}")]).strip() == "c1"
        assert rpc.json("bdev_rbd_get_clusters_info", "-b", "c1")["config_param"] == conf
        assert rpc.run("bdev_rbd_create", "rbd", "spdk", "512", "-b", "Rbd0", "-c", "c1").strip() == "Rbd0"
        rpc.run("bdev_rbd_resize", "Rbd0", "32")
        (b,) = rpc.json("bdev_get_bdevs", "-b", "Rbd0")
        assert b["num_blocks"] == (32 << 20) // 512
        assert b["driver_specific"]["rbd"] == {"pool_name": "rbd", "rbd_name": "spdk", "cluster_name": "c1"}
        assert rpc.call("bdev_rbd_get_stats", {"name": "Rbd0"})[0]["io_errors"] == 0
        rpc.run("bdev_rbd_delete", "Rbd0")
        rpc.run("bdev_rbd_unregister_cluster", "c1")
        assert rpc.json("bdev_rbd_get_clusters_info") == []


def _seed_old_names(rpc: SpdkRpc) -> None:
    """The seed guide's names, with the parameters its rpc.py sent (today's client lacks them)."""
    old = set(rpc.call("rpc_get_methods", {"include_aliases": True})) - set(rpc.call("rpc_get_methods"))
    assert {"construct_malloc_bdev", "construct_vhost_scsi_controller", "add_vhost_scsi_lun",
            "remove_vhost_scsi_dev", "construct_vhost_blk_controller", "get_bdevs", "get_vhost_controllers",
            "remove_vhost_controller", "delete_bdev", "construct_aio_bdev", "get_bdevs_iostat"} <= old
    assert rpc.call("construct_malloc_bdev", {"num_blocks": 32768, "block_size": 4096,
                                              "name": "OldMalloc"}) == "OldMalloc"
    assert rpc.call("construct_vhost_scsi_controller", {"ctrlr": "old.0", "cpumask": "0x1"}) is True
    assert rpc.call("add_vhost_scsi_lun", {"ctrlr": "old.0", "scsi_target_num": 0,
                                           "bdev_name": "OldMalloc"}) == 0
    assert rpc.call("get_vhost_controllers", {"name": "old.0"})[0]["ctrlr"] == "old.0"
    assert rpc.call("remove_vhost_scsi_dev", {"ctrlr": "old.0", "scsi_target_num": 0}) is True
    assert rpc.call("remove_vhost_controller", {"ctrlr": "old.0"}) is True
    assert rpc.call("construct_vhost_blk_controller", {"ctrlr": "old.1", "dev_name": "OldMalloc",
                                                       "cpumask": "0x1", "readonly": True}) is True
    assert rpc.call("get_bdevs", {"name": "OldMalloc"})[0]["claimed"] is False     # opened, not claimed (SPDK)
    assert rpc.call("get_bdevs_iostat", {"name": "OldMalloc"})[0].keys() == {"tick_rate"}
    assert rpc.call("remove_vhost_controller", {"ctrlr": "old.1"}) is True
    assert rpc.call("delete_bdev", {"name": "OldMalloc"}) is True
    img = Path(rpc.daemon.workdir) / "old.img"
    img.write_bytes(b"\0" * (1 << 20))
    assert rpc.call("construct_aio_bdev", {"filename": str(img), "name": "OldAio",
                                           "block_size": 512}) == "OldAio"
    assert rpc.call("delete_bdev", {"name": "OldAio"}) is True
    log = rpc.daemon.log()
    assert "'construct_malloc_bdev' is deprecated, use 'bdev_malloc_create'" in log
    assert "'delete_bdev' is deprecated" in log


def test_rpc_py_load_config_of_spdks_own_config_into_a_target_waiting_for_rpc(tmp_path):
    """SPDK's way to configure a target started with --wait-for-rpc: load_config calls the start-up
    methods, framework_start_init, then the rest."""
    from test_spdk_config import SPDK_CONFIG

    assert SPDK_CONFIG.exists(), f"{SPDK_CONFIG} is missing: the tests need ../shared beside the checkout"
    spdk = json.loads(SPDK_CONFIG.read_text())
    # Not implemented yet (other sessions of issue 12): QoS, coalescing, vhost.2 sharing Malloc1.
    # rpc.py refuses a whole file naming a method the target does not list, so they are left out.
    for sub in spdk["subsystems"]:
        sub["config"] = [c for c in sub["config"] or []
                         if c["method"] not in ("bdev_set_qos_limit", "vhost_controller_set_coalescing")
                         and (c.get("params") or {}).get("ctrlr") != "vhost.2"]
        for c in sub["config"]:
            if c["method"] == "bdev_aio_create":
                c["params"]["filename"] = str(tmp_path / "disk.img")
    (tmp_path / "disk.img").write_bytes(b"\0" * (4 << 20))
    (tmp_path / "spdk.json").write_text(json.dumps(spdk))
    with VhostDaemon(tmp_path / "d", extra_args=("--wait-for-rpc",)) as d:
        rpc = SpdkRpc(d)
        out = rpc.run("load_config", "-j", str(tmp_path / "spdk.json"))
        assert "Some configs were skipped" not in out
        assert "framework_start_init" not in rpc.json("rpc_get_methods", "-c")
        assert {b["name"] for b in rpc.json("bdev_get_bdevs")} == {"Malloc0", "Malloc1", "Aio0"}
        assert {c["ctrlr"] for c in rpc.json("vhost_get_controllers")} == {"vhost.0", "vhost.1"}
        assert d.log().count(": ignored") == 10
