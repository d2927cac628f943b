"""vhost-scsi end to end: a real QEMU guest (TCG) whose Linux virtio-scsi driver talks
to the real daemon through ``vhost-user-scsi-pci``.  Targets become SCSI disks
``H:0:T:0`` that look like SPDK's (vendor INTEL, model = the bdev's product name),
appear when attached to the running VM and disappear when detached or when their
bdev is deleted, while I/O on the other disks carries on.
"""

from __future__ import annotations

import hashlib
import re
import time

from guestvm import GuestVM

PATTERN_MB = 4


def scsi_vm(d, ctrlr: str = "vhost.0", *, num_queues: int = 1, smp: int = 1, name: str = "vm-scsi",
            **kw) -> GuestVM:
    cid = ctrlr.replace(".", "_")
    return GuestVM(["-chardev", f"socket,id={cid},path={d.socket(ctrlr)}",
                    "-device", f"vhost-user-scsi-pci,id=scsi0,chardev={cid},num_queues={num_queues}"],
                   smp=smp, name=name, **kw)


def add_disk(d, target: int, bdev: str, mb: int, block_size: int = 512, ctrlr: str = "vhost.0") -> None:
    d.rpc("bdev_malloc_create", num_blocks=mb * 1024 * 1024 // block_size, block_size=block_size, name=bdev)
    assert d.rpc("vhost_scsi_controller_add_target", ctrlr=ctrlr, scsi_target_num=target,
                 bdev_name=bdev) == target


def disks(vm: GuestVM) -> dict[int, dict[str, str]]:
    """The guest's SCSI disks by target number, from SPDK's lsblk command line."""
    out = vm.check("lsblk -P -d --output NAME,KNAME,MODEL,HCTL,SIZE,VENDOR,SUBSYSTEMS")
    found = {}
    for line in out.splitlines():
        row = _parse_pairs(line)
        hctl = row.get("HCTL", "")
        if hctl.count(":") == 3:
            found[int(hctl.split(":")[2])] = row
    return found


def _parse_pairs(line: str) -> dict[str, str]:
    """``KEY="value" KEY2="v 2"`` (lsblk -P) into a dict."""
    out, rest = {}, line.strip()
    while rest:
        key, _, rest = rest.partition('="')
        value, _, rest = rest.partition('"')
        out[key.strip()] = value.strip()   # vendor and model come space-padded
        rest = rest.strip()
    return out


def wait_disks(vm: GuestVM, predicate, timeout: float = 20.0) -> dict[int, dict[str, str]]:
    deadline = time.monotonic() + timeout
    while True:
        found = disks(vm)
        if predicate(found):
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"guest disks did not reach the expected state within {timeout}s: {found}\n"
                                 + vm.check("dmesg | tail -n 30"))
        time.sleep(0.2)


def write_pattern(vm: GuestVM, dev: str, seek_mb: int = 1) -> str:
    vm.check(f"dd if=/dev/urandom of=/tmp/pattern bs=1M count={PATTERN_MB} 2>/dev/null")
    vm.check(f"dd if=/tmp/pattern of=/dev/{dev} bs=1M seek={seek_mb} oflag=direct 2>/dev/null")
    return vm.check("sha256sum /tmp/pattern").split()[0]


def read_pattern(vm: GuestVM, dev: str, seek_mb: int = 1, mb: int = PATTERN_MB) -> str:
    return vm.check(f"dd if=/dev/{dev} bs=1M skip={seek_mb} count={mb} iflag=direct 2>/dev/null"
                    " | sha256sum").split()[0]


def zeros_sha(vm: GuestVM, mb: int = PATTERN_MB) -> str:
    return vm.check(f"dd if=/dev/zero bs=1M count={mb} 2>/dev/null | sha256sum").split()[0]


def start_background(vm: GuestVM, cmd: str, tag: str) -> None:
    """Run ``cmd`` in the guest without waiting (output in /tmp/<tag>.log, exit code in /tmp/<tag>.rc)."""
    vm.check(f"( ( {cmd} ) > /tmp/{tag}.log 2>&1; echo $? > /tmp/{tag}.rc ) > /dev/null 2>&1 &", timeout=None)


def wait_background(vm: GuestVM, tag: str, timeout: float) -> tuple[int, str]:
    vm.check(f"while [ ! -e /tmp/{tag}.rc ]; do sleep 0.5; done", timeout=timeout)
    return int(vm.check(f"cat /tmp/{tag}.rc")), vm.check(f"cat /tmp/{tag}.log")


def running(vm: GuestVM, tag: str) -> bool:
    return vm.run(f"test -e /tmp/{tag}.rc")[0] != 0


def test_disks_look_like_spdk_and_data_and_discard_round_trip(vhost_daemon):
    d = vhost_daemon
    d.rpc("vhost_create_scsi_controller", ctrlr="vhost.0", cpumask="0x1")
    add_disk(d, 0, "Malloc0", 48, 512)
    add_disk(d, 1, "Malloc1", 32, 4096)
    with scsi_vm(d) as vm:
        vm.start().wait_ready()
        found = disks(vm)
        assert sorted(found) == [0, 1], found
        host = found[0]["HCTL"].split(":")[0]
        for target, mb, bs in ((0, 48, 512), (1, 32, 4096)):
            row = found[target]
            assert row["VENDOR"] == "INTEL", row
            assert row["MODEL"] == "Malloc disk", row
            assert row["HCTL"] == f"{host}:0:{target}:0", row
            assert row["SUBSYSTEMS"] == "block:scsi:virtio:pci", row
            dev = row["KNAME"]
            assert int(vm.check(f"cat /sys/block/{dev}/size")) * 512 == mb << 20
            assert int(vm.check(f"cat /sys/block/{dev}/queue/logical_block_size")) == bs
            assert vm.check(f"cat /sys/block/{dev}/device/vendor").strip() == "INTEL"
            assert vm.check(f"cat /sys/block/{dev}/queue/rotational").strip() == "0"
            assert vm.check(f"cat /sys/block/{dev}/device/scsi_disk/*/provisioning_mode").strip() == "unmap"
            # A random pattern round trips, through the page cache as well as O_DIRECT.
            digest = write_pattern(vm, dev)
            assert read_pattern(vm, dev) == digest
            vm.check(f"sync; echo 3 > /proc/sys/vm/drop_caches; dd if=/dev/{dev} of=/tmp/cached bs=1M skip=1 "
                     f"count={PATTERN_MB} 2>/dev/null")
            assert vm.check("sha256sum /tmp/cached").split()[0] == digest
            # blkdiscard (UNMAP) and blkdiscard -z (WRITE SAME of zeros) read back as zeros.
            vm.check(f"blkdiscard -o {1 << 20} -l {2 << 20} /dev/{dev}")
            assert read_pattern(vm, dev, 1, 2) == zeros_sha(vm, 2)
            assert read_pattern(vm, dev, 3, 2) != zeros_sha(vm, 2), "outside the range: untouched"
            vm.check(f"blkdiscard -z -o {3 << 20} -l {2 << 20} /dev/{dev}")
            assert read_pattern(vm, dev, 1, 4) == zeros_sha(vm, 4)
    stats = d.rpc("vhost_get_queue_stats", ctrlr="vhost.0")
    assert all(q["errors"] == 0 for q in stats), stats
    assert "Traceback" not in d.log()


FIO = ("fio --ioengine=libaio --direct=1 --rw=randrw --bs=4k --iodepth=16 --size=6M "
       "--verify=crc32c --do_verify=1 --verify_fatal=1 --group_reporting")


def test_fio_on_two_targets_four_queues_while_a_third_is_hot_attached_and_detached(vhost_daemon):
    d = vhost_daemon
    d.rpc("vhost_create_scsi_controller", ctrlr="vhost.0")
    add_disk(d, 0, "Malloc0", 32)
    add_disk(d, 1, "Malloc1", 32, 4096)
    d.rpc("bdev_malloc_create", num_blocks=16 * 2048, block_size=512, name="Malloc2")
    with scsi_vm(d, num_queues=4, smp=4, mem_mb=768, name="vm-scsi-fio") as vm:
        vm.start().wait_ready(timeout=180)
        found = disks(vm)
        a, b = found[0]["KNAME"], found[1]["KNAME"]
        assert vm.check(f"ls /sys/block/{a}/mq | wc -l").strip() == "4"
        # One job per vCPU (so per request queue), two on each disk.
        jobs = " ".join(f"--name={dev}{i} --filename=/dev/{dev} --offset={i * 8}M --cpus_allowed={cpu}"
                        for cpu, (dev, i) in enumerate(((a, 0), (a, 1), (b, 0), (b, 1))))
        # fio runs again and again (each run writes, then verifies) until told to stop.
        start_background(vm, f"n=0; while [ ! -e /tmp/fio.stop ]; do {FIO} {jobs} || exit 1; n=$((n + 1)); "
                             f"done; echo runs=$n", "fio")

        t0 = time.monotonic()
        assert d.rpc("vhost_scsi_controller_add_target", ctrlr="vhost.0", scsi_target_num=2,
                     bdev_name="Malloc2") == 2
        new = wait_disks(vm, lambda f: 2 in f)[2]
        attach_s = time.monotonic() - t0
        assert (new["VENDOR"], new["MODEL"]) == ("INTEL", "Malloc disk")
        digest = write_pattern(vm, new["KNAME"])
        assert read_pattern(vm, new["KNAME"]) == digest
        t0 = time.monotonic()
        d.rpc("vhost_scsi_controller_remove_target", ctrlr="vhost.0", scsi_target_num=2)
        wait_disks(vm, lambda f: 2 not in f and 0 in f and 1 in f)
        detach_s = time.monotonic() - t0
        assert running(vm, "fio"), ("fio stopped during the hot-attach/detach",
                                    wait_background(vm, "fio", 10))

        vm.check("touch /tmp/fio.stop")
        rc, out = wait_background(vm, "fio", timeout=600)
        assert rc == 0 and "err= 0" in out and not re.search(r"err=\s*[1-9]", out), out
        assert attach_s < 10 and detach_s < 10, (attach_s, detach_s)
        dmesg = vm.check("dmesg")
        assert not re.search(rf"error.*dev ({a}|{b})\b|({a}|{b}).*(I/O|critical) error", dmesg), dmesg[-3000:]
    stats = d.rpc("vhost_get_queue_stats", ctrlr="vhost.0")
    busy = [q["queue"] for q in stats if q["requests"] > 100]
    assert busy == [2, 3, 4, 5], f"expected I/O on the four request queues: {stats}"
    assert all(q["errors"] == 0 for q in stats), stats
    assert "Traceback" not in d.log()


def test_deleting_a_bdev_under_a_running_vm_removes_only_its_disk(vhost_daemon):
    d = vhost_daemon
    d.rpc("vhost_create_scsi_controller", ctrlr="vhost.0")
    add_disk(d, 0, "Malloc0", 32)
    add_disk(d, 3, "Malloc1", 16)
    with scsi_vm(d, name="vm-scsi-del") as vm:
        vm.start().wait_ready()
        found = disks(vm)
        keep, gone = found[0]["KNAME"], found[3]["KNAME"]
        digest = write_pattern(vm, keep, seek_mb=12)        # past what fio uses
        start_background(vm, f"while [ ! -e /tmp/fio.stop ]; do {FIO} --name=keep --filename=/dev/{keep} "
                             f"--size=8M || exit 1; done", "fio")
        d.rpc("bdev_malloc_delete", name="Malloc1")
        wait_disks(vm, lambda f: sorted(f) == [0])
        assert vm.run(f"test -e /sys/block/{gone}")[0] != 0
        assert running(vm, "fio"), wait_background(vm, "fio", 10)
        vm.check("touch /tmp/fio.stop")
        rc, out = wait_background(vm, "fio", timeout=300)
        assert rc == 0 and "err= 0" in out and not re.search(r"err=\s*[1-9]", out), out
        assert read_pattern(vm, keep, seek_mb=12) == digest
        assert not re.search(rf"error.*dev {keep}\b|{keep}.*(I/O|critical) error", vm.check("dmesg")), \
            vm.check("dmesg | tail -n 30")
    d.wait_log("bdev 'Malloc1' was removed: hot-detached target 'Target 3'")
    (c,) = d.rpc("vhost_get_controllers", name="vhost.0")
    assert [t["scsi_dev_num"] for t in c["backend_specific"]["scsi"]] == [0]
    assert "Traceback" not in d.log()


def test_aio_over_scsi_data_lands_in_the_file_and_rescan_resizes_the_running_guests_disk(vhost_daemon, tmp_path):
    import os
    import tempfile

    d = vhost_daemon
    path = os.path.join(tempfile.mkdtemp(prefix="e2e-scsi-aio-", dir="/var/tmp"), "disk.img")
    with open(path, "wb") as f:
        f.truncate(32 << 20)
    try:
        d.rpc("vhost_create_scsi_controller", ctrlr="vhost.0")
        d.rpc("bdev_aio_create", filename=path, name="aio0")
        d.rpc("vhost_scsi_controller_add_target", ctrlr="vhost.0", scsi_target_num=0, bdev_name="aio0")
        with scsi_vm(d) as vm:
            vm.start().wait_ready()
            dev = wait_disks(vm, lambda f: 0 in f)[0]["NAME"]
            assert int(vm.check(f"cat /sys/block/{dev}/size")) == (32 << 20) // 512
            with open(path, "r+b") as f:
                f.truncate(48 << 20)
            d.rpc("bdev_aio_rescan", name="aio0")
            deadline = time.monotonic() + 30
            while int(vm.check(f"cat /sys/block/{dev}/size")) != (48 << 20) // 512:
                assert time.monotonic() < deadline, vm.check("dmesg | tail -n 20")
                time.sleep(0.5)
            # The new tail is usable, and what the guest writes over SCSI is in the host file.
            vm.check("dd if=/dev/urandom of=/tmp/r bs=1M count=2 2>/dev/null")
            vm.check(f"dd if=/tmp/r of=/dev/{dev} bs=1M seek=40 oflag=direct conv=fsync 2>/dev/null")
            tail = vm.check("sha256sum /tmp/r").split()[0]
            out = vm.check(f"fio --name=v --filename=/dev/{dev} --rw=randrw --bs=4k --iodepth=16 "
                           "--ioengine=libaio --direct=1 --size=8M --verify=crc32c --do_verify=1 "
                           "--verify_fatal=1", timeout=300)
            assert "err= 0" in out, out
            head = vm.check(f"dd if=/dev/{dev} bs=1M count=8 iflag=direct 2>/dev/null | sha256sum").split()[0]
        assert "capacity changed" in d.log()
        with open(path, "rb") as f:
            assert hashlib.sha256(f.read(8 << 20)).hexdigest() == head
            f.seek(40 << 20)
            assert hashlib.sha256(f.read(2 << 20)).hexdigest() == tail
    finally:
        os.unlink(path)
        os.rmdir(os.path.dirname(path))
