"""Memory hot-plug end to end: QEMU adds a DIMM to a running guest whose disk the target
serves (ADD_MEM_REG: the rings keep running), the guest onlines it and does its I/O
from it, then the DIMM is unplugged again (REM_MEM_REG) while the disk stays in use."""

from __future__ import annotations

import json
import time

from guestvm import GuestVM
from test_e2e_blk import blk_vm, make_disk

DIMM_MB = 128


def mem_total_kb(vm: GuestVM) -> int:
    for line in vm.check("cat /proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1])
    raise AssertionError("no MemTotal in /proc/meminfo")


def fio_verify(vm: GuestVM) -> None:
    out = vm.check("fio --name=hp --filename=/dev/vda --rw=randwrite --bs=256k --size=32M --ioengine=libaio "
                   "--direct=1 --iodepth=16 --verify=crc32c --do_verify=1 --verify_fatal=1 "
                   "--output-format=json 2>&1", timeout=300)
    job = json.loads(out[out.index("{"):])["jobs"][0]
    assert job["error"] == 0, out


def test_a_dimm_plugged_and_unplugged_under_io(vhost_daemon):
    d = vhost_daemon
    make_disk(d, mb=64)
    # online_movable: the guest can give the DIMM back (its pages can be migrated
    # away), and movable allocations (fio's buffers) prefer it.
    with blk_vm(d, "vhost.1", mem_mb=256, append="memhp_default_state=online_movable",
                extra_args=["-m", "256M,slots=2,maxmem=1G"]) as vm:
        vm.start().wait_ready()
        before = mem_total_kb(vm)
        vm.qmp("object-add", **{"qom-type": "memory-backend-memfd", "id": "dimm1", "size": DIMM_MB << 20,
                                "share": True})
        vm.qmp("device_add", driver="pc-dimm", id="d1", memdev="dimm1")
        d.wait_log(f"size {DIMM_MB} MiB added", timeout=30)
        deadline = time.monotonic() + 60
        while mem_total_kb(vm) < before + (DIMM_MB - 8) * 1024:
            assert time.monotonic() < deadline, vm.check("dmesg | tail -20")
            time.sleep(0.5)
        fio_verify(vm)

        vm.qmp("device_del", id="d1")
        d.wait_log(f"size {DIMM_MB} MiB removed", timeout=120)
        vm.qmp("object-del", id="dimm1")
        assert mem_total_kb(vm) < before + 8 * 1024
        fio_verify(vm)
    assert "Traceback" not in d.log(), d.log()
