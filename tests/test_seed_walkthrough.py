"""The seed's vhost guide (SPDK's doc/vhost.md of 2018, ../shared/seed-vhost.md) pasted into ``vhost-rpc``.

Each ``scripts/rpc.py ...`` line of the guide and of its example output is run as ``vhost-rpc ...``,
unchanged, and must do what it did with SPDK: print what rpc.py printed, leave SPDK's NOTICE
lines in the target's log, and fail where SPDK would have (no NVMe plugin here: it says which wheel).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest

from vhost_core.testing.daemon import VhostDaemon


def vhost_rpc(d: VhostDaemon, line: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vhost_core.rpc.cli", "-s", d.rpc_path, *shlex.split(line)],
                          capture_output=True, text=True, timeout=60)


def paste(d: VhostDaemon, line: str, out: str = "") -> None:
    r = vhost_rpc(d, line)
    assert r.returncode == 0, f"vhost-rpc {line}:\n{r.stdout}{r.stderr}"
    assert r.stdout == out, f"vhost-rpc {line} printed {r.stdout!r}, rpc.py printed {out!r}"


def test_the_guide(vhost_daemon):
    d = vhost_daemon
    paste(d, "construct_malloc_bdev 64 512 -b Malloc0", "Malloc0\n")
    paste(d, "construct_vhost_scsi_controller --cpumask 0x1 vhost.0")
    paste(d, "add_vhost_scsi_lun vhost.0 0 Malloc0", "0\n")
    paste(d, "remove_vhost_scsi_dev vhost.0 0")
    paste(d, "construct_vhost_blk_controller --cpumask 0x1 vhost.1 Malloc0")
    # The guide shows the read-only variant as an alternative for the same name.
    paste(d, "remove_vhost_controller vhost.1")
    paste(d, "construct_vhost_blk_controller --cpumask 0x1 -r vhost.1 Malloc0")
    (c,) = d.rpc("vhost_get_controllers", name="vhost.1")
    assert c["backend_specific"]["block"] == {"readonly": True, "bdev": "Malloc0",
                                              "transport": "vhost_user_blk"}
    paste(d, "remove_vhost_controller vhost.1")
    paste(d, "add_vhost_scsi_lun vhost.0 0 Malloc0", "0\n")         # hot-attach
    paste(d, "remove_vhost_scsi_dev vhost.0 0")                      # hot-detach
    paste(d, "add_vhost_scsi_lun vhost.0 0 Malloc0", "0\n")
    paste(d, "delete_bdev Malloc0")                                   # detaches it as well
    assert d.rpc("vhost_get_controllers", name="vhost.0")[0]["backend_specific"]["scsi"] == []


def test_the_example_output(tmp_path):
    cores = sorted(os.sched_getaffinity(0))
    assert len(cores) >= 2, "the seed's example runs the target on two cores: run the tests with two CPUs"
    mask = (1 << cores[0]) | (1 << cores[1])
    with VhostDaemon(tmp_path, cpumask=hex(mask)) as d:
        # The seed's SSD is not in this machine: the PCIe attach says what it found there
        # (plugins/bdev_nvme/tests/test_pcie_guest.py attaches a real one, in a guest).
        r = vhost_rpc(d, "construct_nvme_bdev -b Nvme0 -t pcie -a 0000:01:00.0")
        assert r.returncode == 1 and any(why in r.stderr for why in (
            "no PCI function 0000:01:00.0", "0000:01:00.0 is not an NVMe controller", "not vfio-pci"))
        paste(d, "construct_malloc_bdev 128 4096 Malloc0", "Malloc0\n")      # the name given positionally
        paste(d, f"construct_vhost_scsi_controller --cpumask {hex(1 << cores[0])} vhost.0")   # 0x1 there
        assert "Controller vhost.0: new controller added" in d.log()
        r = vhost_rpc(d, "add_vhost_scsi_lun vhost.0 0 Nvme0n1")             # Nvme0 was not created
        assert r.returncode == 1 and "bdev 'Nvme0n1' does not exist" in r.stderr
        paste(d, "add_vhost_scsi_lun vhost.0 1 Malloc0", "1\n")
        assert "Controller vhost.0: defined target 'Target 1' using lun 'Malloc0'" in d.log()
        paste(d, "construct_malloc_bdev 64 512 -b Malloc1", "Malloc1\n")
        paste(d, f"construct_vhost_blk_controller --cpumask {hex(1 << cores[1])} vhost.1 Malloc1")
        assert "Controller vhost.1: using bdev 'Malloc1'" in d.log()
        bdevs = {b["name"]: (b["block_size"], b["num_blocks"]) for b in d.rpc("bdev_get_bdevs")}
        assert bdevs == {"Malloc0": (4096, 32768), "Malloc1": (512, 131072)}
    assert "*NOTICE*: Exiting" in d.log()
