"""``vhost --json`` with the configuration SPDK v24.05 itself wrote (../shared/spdk/v24.05-save_config.json).

That file holds what SPDK always writes (iobuf, sock, accel, scheduler, bdev and nvme options) besides
two malloc bdevs, an aio bdev, a vhost-scsi controller with two targets and two vhost-blk controllers.
What this target serves is created; options that mean nothing here are accepted with one NOTICE each;
what it cannot create fails the load with an error naming it.

The file also sets a QoS limit on Malloc1 (bdev_set_qos_limit), interrupt coalescing on vhost.2
(vhost_controller_set_coalescing), and lets the read-only vhost.2 share Malloc1 with the SCSI target
of vhost.0: ``test_spdk_v24_05_config_loads_unchanged`` loads it without ``--json-ignore-init-errors``.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from vhost_core.testing.daemon import VhostDaemon

SPDK_CONFIG = Path(__file__).resolve().parents[2] / "shared" / "spdk" / "v24.05-save_config.json"
if not SPDK_CONFIG.exists():   # a worktree under /work: ../shared from the repository's parent
    SPDK_CONFIG = Path("/work/shared/spdk/v24.05-save_config.json")
AIO_FILE = Path("/var/tmp/spdk-config/disk.img")     # the path in SPDK's file

#: One NOTICE per ignored option, in file order, and what each must name.
IGNORED_NOTICES = [
    ("iobuf_set_options: ignored small_pool_count", "no iobuf buffer pools"),
    ('sock_set_default_impl impl_name="posix": ignored', "no sock layer"),
    ('sock_impl_set_options impl_name="ssl": ignored recv_buf_size', "no sock layer"),
    ('sock_impl_set_options impl_name="posix": ignored recv_buf_size', "no sock layer"),
    ("accel_set_options: ignored small_cache_size", "no acceleration framework"),
    ("bdev_set_options: ignored bdev_io_pool_size", "no bdev_io pools"),
    ("bdev_raid_set_options: ignored process_window_size_kb", "RAID bdevs are not implemented"),
    ("bdev_nvme_set_options: ignored timeout_admin_us", "no such knob"),   # action_on_timeout: honoured
    ('framework_set_scheduler name="static": ignored', "static scheduler"),
    ("bdev_nvme_set_hotplug enable=false: ignored period_us", "removal is always noticed"),
]


@pytest.fixture(scope="module")
def spdk_config() -> Path:
    assert SPDK_CONFIG.exists(), f"{SPDK_CONFIG} is missing: the tests need ../shared beside the checkout"
    AIO_FILE.parent.mkdir(parents=True, exist_ok=True)
    if not AIO_FILE.exists():                             # SPDK's README: a 64 MiB file there
        with AIO_FILE.open("wb") as f:
            f.truncate(64 << 20)
    return SPDK_CONFIG


def run_to_exit(workdir: Path, *args: str, timeout: float = 60) -> tuple[int, str]:
    """Start vhost with ``args`` and wait for it to exit (a failed start-up)."""
    d = VhostDaemon(workdir, extra_args=args)
    d.socket_dir.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(d.args, capture_output=True, text=True, timeout=timeout, env=d.env)
    return r.returncode, r.stdout + r.stderr


def errors(log: str) -> list[str]:
    return [line.split("*ERROR*: ", 1)[1] for line in log.splitlines()
            if "*ERROR*: " in line and "start-up failed" not in line]


def test_spdk_v24_05_config_loads_unchanged(spdk_config, tmp_path):
    with VhostDaemon(tmp_path, extra_args=("--json", str(spdk_config))) as d:
        (malloc1,) = d.rpc("bdev_get_bdevs", name="Malloc1")
        assert malloc1["assigned_rate_limits"]["rw_ios_per_sec"] == 20000
        (vhost2,) = d.rpc("vhost_get_controllers", name="vhost.2")
        assert vhost2["backend_specific"]["block"] == {"readonly": True, "bdev": "Malloc1",
                                                       "transport": "vhost_user_blk"}
        assert (vhost2["delay_base_us"], vhost2["iops_threshold"]) == (50, 60000)
        assert {c["ctrlr"] for c in d.rpc("vhost_get_controllers")} == {"vhost.0", "vhost.1", "vhost.2"}


@pytest.fixture(scope="module")
def loaded(spdk_config, tmp_path_factory):
    """The daemon that loaded SPDK's file."""
    d = VhostDaemon(tmp_path_factory.mktemp("v2405"), extra_args=("--json", str(spdk_config))).start()
    yield d
    assert d.stop() == 0


def test_everything_of_the_spdk_config_is_served(loaded):
    d = loaded
    assert errors(d.log()) == []
    bdevs = {b["name"]: b for b in d.rpc("bdev_get_bdevs")}
    assert set(bdevs) == {"Malloc0", "Malloc1", "Aio0"}
    for name, uuid in (("Malloc0", "edb1bcbf-3e8c-41b6-8744-971b3e1204f9"),
                       ("Malloc1", "ea969f03-9403-472d-839b-d6fc7da1dd7d")):
        b = bdevs[name]
        assert (b["num_blocks"], b["block_size"], b["uuid"]) == (131072, 512, uuid)
    assert bdevs["Aio0"]["driver_specific"]["aio"]["filename"] == str(AIO_FILE)
    assert (bdevs["Aio0"]["block_size"], bdevs["Aio0"]["num_blocks"]) == (512, (64 << 20) // 512)
    assert bdevs["Aio0"]["driver_specific"]["aio"]["fallocate"] is False      # SPDK's "fallocate": false
    ctrlrs = {c["ctrlr"]: c for c in d.rpc("vhost_get_controllers")}
    scsi = ctrlrs["vhost.0"]["backend_specific"]["scsi"]
    assert [(t["scsi_dev_num"], t["luns"][0]["bdev_name"]) for t in scsi] == [(0, "Malloc1"), (1, "Aio0")]
    assert ctrlrs["vhost.1"]["backend_specific"]["block"]["bdev"] == "Malloc0"
    assert ctrlrs["vhost.1"]["cpumask"] == "0x1"
    # vhost_create_scsi_controller "delay": true, then vhost_start_scsi_controller: it listens.
    assert os.path.exists(d.socket("vhost.0")) and os.path.exists(d.socket("vhost.1"))


def test_each_ignored_option_gets_one_notice_naming_it(loaded):
    notices = [line.split("*NOTICE*: ", 1)[1] for line in loaded.log().splitlines() if ": ignored" in line]
    assert len(notices) == len(IGNORED_NOTICES), "\n".join(notices)
    for line, (start, why) in zip(notices, IGNORED_NOTICES):
        assert line.startswith(start) and why in line, line


def test_what_spdk_saved_is_saved_again_and_reloads(loaded, spdk_config, tmp_path):
    subsystems = [s["subsystem"] for s in loaded.rpc("framework_get_subsystems")]
    config = {"subsystems": [{"subsystem": s, "config": loaded.rpc("framework_get_config", name=s)}
                             for s in subsystems]}
    saved = tmp_path / "saved.json"
    saved.write_text(json.dumps(config))
    with VhostDaemon(tmp_path / "again", extra_args=("--json", str(saved))) as d:
        uuids = {b["uuid"] for b in loaded.rpc("bdev_get_bdevs")}
        assert {b["uuid"] for b in d.rpc("bdev_get_bdevs")} == uuids
        assert ({c["ctrlr"]: c["backend_specific"] for c in d.rpc("vhost_get_controllers")}
                == {c["ctrlr"]: c["backend_specific"] for c in loaded.rpc("vhost_get_controllers")})
        # QoS and coalescing are saved too, in SPDK's places.
        assert d.rpc("bdev_get_bdevs", name="Malloc1")[0]["assigned_rate_limits"]["rw_ios_per_sec"] == 20000
        assert d.rpc("vhost_get_controllers", name="vhost.2")[0]["delay_base_us"] == 50
        spdk = json.loads(spdk_config.read_text())
        ours = {s["subsystem"]: s["config"] for s in config["subsystems"]}
        theirs = {s["subsystem"]: s["config"] for s in spdk["subsystems"]}
        assert ([e for e in ours["bdev"] if e["method"] == "bdev_set_qos_limit"]
                == [e for e in theirs["bdev"] if e["method"] == "bdev_set_qos_limit"])
        assert ours["vhost_blk"][-1] == theirs["vhost_blk"][-1]
        assert "*ERROR*" not in d.log()


def test_wait_for_rpc_applies_start_up_options_first_and_the_rest_at_framework_start_init(spdk_config,
                                                                                           tmp_path):
    with VhostDaemon(tmp_path, extra_args=("--wait-for-rpc", "--json", str(spdk_config),
                                           "--json-ignore-init-errors")) as d:
        assert "iobuf_set_options: ignored" in d.log() and "bdev Malloc0" not in d.log()
        assert "bdev_get_bdevs" not in d.rpc("rpc_get_methods", current=True)
        assert d.rpc("framework_start_init") is True
        assert {b["name"] for b in d.rpc("bdev_get_bdevs")} == {"Malloc0", "Malloc1", "Aio0"}
        assert d.log().count("iobuf_set_options: ignored") == 1


@pytest.mark.parametrize("config,message", [
    # A bdev that cannot be created: the load fails naming it and why.
    ({"subsystems": [{"subsystem": "bdev", "config": [
        {"method": "bdev_aio_create", "params": {"name": "Aio9", "filename": "/nonexistent/disk.img"}}]}]},
     "bdev entry 0 (bdev_aio_create name=\"Aio9\" filename=\"/nonexistent/disk.img\"): bdev_aio_create: "
     "cannot open '/nonexistent/disk.img': directory '/nonexistent' does not exist: fix the path"),
    # An RBD image with no cluster to reach (SPDK's config relied on /etc/ceph): says what to give.
    # (A bdev type whose plugin is not installed is test_install_only_what_you_need's.)
    ({"subsystems": [{"subsystem": "bdev", "config": [
        {"method": "bdev_rbd_create", "params": {"name": "Ceph0", "pool_name": "rbd", "rbd_name": "foo",
                                                 "block_size": 512}}]}]},
     "bdev entry 0 (bdev_rbd_create name=\"Ceph0\" pool_name=\"rbd\" rbd_name=\"foo\" block_size=512): "
     "bdev_rbd_create: no monitor address for the cluster: give config_file (a ceph.conf), or mon_host in "
     "config_param/config (e.g. mon_host=10.0.0.1:6789)"),
    # An NVMe SSD that is not in this machine (SPDK's config came from another): names the address
    # and how to list the controllers there are.
    ({"subsystems": [{"subsystem": "bdev", "config": [
        {"method": "bdev_nvme_attach_controller", "params": {"name": "Nvme0", "trtype": "pcie",
                                                             "traddr": "0000:7f:1f.7"}}]}]},
     "bdev entry 0 (bdev_nvme_attach_controller name=\"Nvme0\" trtype=\"pcie\" traddr=\"0000:7f:1f.7\"): "
     "bdev_nvme_attach_controller: Nvme0: there is no PCI function 0000:7f:1f.7 on this host: check traddr "
     "(-a); `lspci -D -d ::0108` lists the NVMe controllers"),
    # A controller option we do not honour: names the parameter and the value.
    ({"subsystems": [{"subsystem": "bdev", "config": [
        {"method": "bdev_malloc_create", "params": {"name": "M", "num_blocks": 64, "block_size": 512}}]},
        {"subsystem": "vhost_blk", "config": [
            {"method": "vhost_create_blk_controller", "params": {"ctrlr": "vhost.0", "dev_name": "M",
                                                                 "transport": "vfio_user_blk"}}]}]},
     "vhost_blk entry 0 (vhost_create_blk_controller ctrlr=\"vhost.0\" dev_name=\"M\" "
     "transport=\"vfio_user_blk\"): vhost_create_blk_controller: transport=\"vfio_user_blk\" is not supported"),
])
def test_what_cannot_be_created_fails_the_load_naming_it(tmp_path, config, message):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    rc, log = run_to_exit(tmp_path, "--json", str(path))
    assert rc == 1 and f"start-up failed: {path}: {message}" in log, log


def test_a_subsystem_this_target_does_not_have_is_skipped_with_a_notice(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"subsystems": [
        {"subsystem": "nvmf", "config": [{"method": "nvmf_create_transport", "params": {"trtype": "TCP"}}]},
        {"subsystem": "bdev", "config": [{"method": "bdev_malloc_create",
                                          "params": {"name": "M", "num_blocks": 64, "block_size": 512}}]}]}))
    with VhostDaemon(tmp_path, extra_args=("--json", str(path))) as d:
        assert "*NOTICE*: Skipping nvmf_create_transport: this target has no 'nvmf' subsystem" in d.log()
        assert d.rpc("bdev_get_bdevs", name="M")[0]["num_blocks"] == 64
