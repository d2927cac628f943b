"""bdev_aio end to end: a real QEMU guest (TCG) on a vhost-blk controller whose bdev is a
file on the host's disk.  What the guest writes must be, byte for byte, in that file."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile

import pytest
from test_e2e_blk import PATTERN_MB, blk_vm, read_pattern, write_pattern

DISK_TMP = os.environ.get("VHOST_TEST_DISK_TMP", "/var/tmp")


@pytest.fixture
def disk_file():
    d = tempfile.mkdtemp(prefix="e2e-aio-", dir=DISK_TMP)
    path = os.path.join(d, "disk.img")
    with open(path, "wb") as f:
        f.truncate(64 << 20)
    try:
        yield path
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _host_sha256(path: str, offset: int, length: int) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        return hashlib.sha256(f.read(length)).hexdigest()


def test_guest_pattern_lands_in_the_host_file(vhost_daemon, disk_file):
    d = vhost_daemon
    d.rpc("bdev_aio_create", filename=disk_file, name="aio0", block_size=4096, engine="io_uring")
    d.rpc("vhost_create_blk_controller", ctrlr="vhost.1", dev_name="aio0")
    with blk_vm(d, "vhost.1") as vm:
        vm.start().wait_ready()
        assert int(vm.check("cat /sys/block/vda/size")) == (64 << 20) // 512
        assert vm.check("cat /sys/block/vda/queue/logical_block_size").strip() == "4096"
        digest = write_pattern(vm, seek_mb=1)
        assert read_pattern(vm, seek_mb=1) == digest
        # a flush from the guest reaches fdatasync; a discard punches a hole
        vm.check("dd if=/tmp/pattern of=/dev/vda bs=1M seek=8 oflag=direct conv=fsync 2>/dev/null")
        vm.check("blkdiscard -o 9437184 -l 1048576 /dev/vda")
        assert vm.check("dd if=/dev/vda bs=1M skip=9 count=1 iflag=direct 2>/dev/null | tr -d '\\000' "
                        "| wc -c").strip() == "0"
        kept = vm.check("(dd if=/tmp/pattern bs=1M count=1; dd if=/tmp/pattern bs=1M skip=2) 2>/dev/null "
                        "| sha256sum").split()[0]
    assert _host_sha256(disk_file, 1 << 20, PATTERN_MB << 20) == digest
    with open(disk_file, "rb") as f:
        f.seek(8 << 20)
        eight = f.read(PATTERN_MB << 20)
    assert eight[1 << 20:2 << 20] == bytes(1 << 20)
    assert hashlib.sha256(eight[:1 << 20] + eight[2 << 20:]).hexdigest() == kept
    s = d.rpc("bdev_aio_get_stats", name="aio0")[0]
    assert s["engine"] == "io_uring" and s["io_errors"] == 0
    assert s["completed"]["flush"] >= 1 and s["completed"]["unmap"] >= 1
    assert "Traceback" not in d.log()


def test_fio_randrw_verify_on_four_queues_and_the_host_file_matches(vhost_daemon, disk_file):
    d = vhost_daemon
    d.rpc("bdev_aio_create", filename=disk_file, name="aio0")
    d.rpc("vhost_create_blk_controller", ctrlr="vhost.1", dev_name="aio0")
    with blk_vm(d, "vhost.1", num_queues=4, smp=4, mem_mb=768) as vm:
        vm.start().wait_ready(timeout=180)
        assert vm.check("ls /sys/block/vda/mq | wc -l").strip() == "4"
        out = vm.check("fio --name=v --filename=/dev/vda --rw=randrw --bs=4k --iodepth=16 "
                       "--ioengine=libaio --direct=1 --size=8M --numjobs=4 --offset_increment=8M "
                       "--cpus_allowed=0-3 --cpus_allowed_policy=split "
                       "--verify=crc32c --do_verify=1 --verify_fatal=1 --group_reporting", timeout=600)
        assert "err= 0" in out, out
        vm.check("sync")
        guest = vm.check("dd if=/dev/vda bs=1M count=32 iflag=direct 2>/dev/null | sha256sum").split()[0]
    assert _host_sha256(disk_file, 0, 32 << 20) == guest
    stats = d.rpc("vhost_get_queue_stats", ctrlr="vhost.1")
    assert len([q for q in stats if q["requests"] > 100]) == 4, stats
    s = d.rpc("bdev_aio_get_stats", name="aio0")[0]
    assert s["io_errors"] == 0 and s["completed"]["write"] > 1000, s
    # SPDK's view of the same I/O: every write the bdev completed, counted by the device.
    io = d.rpc("bdev_get_iostat", name="aio0")["bdevs"][0]
    assert io["num_write_ops"] == s["completed"]["write"] and io["num_read_ops"] == s["completed"]["read"]
    assert io["bytes_written"] == 4096 * io["num_write_ops"]      # fio writes 4 KiB blocks only
    mean_us = io["read_latency_ticks"] / io["num_read_ops"] / d.rpc("bdev_get_iostat")["tick_rate"] * 1e6
    assert 1 < mean_us < 1e6, mean_us
    assert "Traceback" not in d.log()


def test_rescan_after_growing_the_file_shows_the_new_size_in_the_running_guest(vhost_daemon, disk_file):
    import time

    d = vhost_daemon
    d.rpc("bdev_aio_create", filename=disk_file, name="aio0")
    d.rpc("vhost_create_blk_controller", ctrlr="vhost.1", dev_name="aio0")
    with blk_vm(d, "vhost.1") as vm:
        vm.start().wait_ready()
        assert int(vm.check("cat /sys/block/vda/size")) == (64 << 20) // 512
        digest = write_pattern(vm)
        with open(disk_file, "r+b") as f:
            f.truncate(96 << 20)
        d.rpc("bdev_aio_rescan", name="aio0")
        deadline = time.monotonic() + 30
        while int(vm.check("cat /sys/block/vda/size")) != (96 << 20) // 512:
            assert time.monotonic() < deadline, f"guest never saw the new size:\n{vm.console_log[-2000:]}"
            time.sleep(0.5)
        # The new tail is usable and the old data is intact.
        vm.check("dd if=/dev/urandom of=/dev/vda bs=1M seek=90 count=2 oflag=direct 2>/dev/null")
        assert read_pattern(vm) == digest
    assert "config space changed, front-end notified" in d.log()


@pytest.mark.parametrize("ring", ["split", "packed"])
def test_requests_in_flight_when_the_target_is_killed_are_resubmitted_by_its_successor(tmp_path, ring):
    """A target process killed (-9) with guest I/O in flight, completed out of order: QEMU
    (`reconnect=1`) keeps the inflight buffer it got from us (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD)
    and hands it to the next process, which resubmits exactly the requests that never completed.
    The guest sees neither an error nor a hang, and every byte it wrote is in the file.

    Without the buffer the new process can only resume the avail ring at used->idx, which is
    wrong once completions overtook each other: here a write is stuck while reads behind it
    complete, so the write would never be seen again and the guest would hang.  The write is
    stuck for certain because the backing file lives on an ext4 frozen with fsfreeze (io_uring
    parks it in a kernel worker; reads of a frozen filesystem go on).  The kill lands when the
    filesystem thaws.  On a packed ring (packed=on) QEMU cannot even tell the new process
    where the ring stood: the buffer says that too."""
    import subprocess
    import time

    from guestvm import GuestVM
    from vhost_core.testing.daemon import VhostDaemon

    scratch = tempfile.mkdtemp(prefix="e2e-inflight-", dir=DISK_TMP)
    mnt = os.path.join(scratch, "mnt")
    os.mkdir(mnt)
    img = os.path.join(scratch, "fs.img")
    with open(img, "wb") as f:
        f.truncate(128 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", img], check=True, capture_output=True)
    r = subprocess.run(["mount", "-o", "loop", img, mnt], capture_output=True, text=True)
    assert r.returncode == 0, f"cannot loop-mount an ext4 image here (needs root): {r.stderr}"
    disk = os.path.join(mnt, "disk.img")
    with open(disk, "wb") as f:
        f.truncate(64 << 20)

    def serve() -> VhostDaemon:
        d = VhostDaemon(tmp_path / "vhost", extra_args=("-L", "vhost_user")).start()
        d.rpc("bdev_aio_create", filename=disk, name="aio0", engine="io_uring")
        d.rpc("vhost_create_blk_controller", ctrlr="vhost.1", dev_name="aio0")
        return d

    first = serve()
    vm = GuestVM(["-chardev", f"socket,id=c1,path={first.socket('vhost.1')},reconnect=1",
                  "-device", "vhost-user-blk-pci,chardev=c1,num-queues=1"
                  + (",packed=on" if ring == "packed" else "")], name=f"vm-inflight-{ring}")
    second = None
    frozen = False
    try:
        vm.start().wait_ready()
        if ring == "packed":
            from test_e2e_packed import negotiated_packed

            assert negotiated_packed(vm).get(2) is True
        vm.check("dd if=/dev/urandom of=/tmp/pattern bs=1M count=8 2>/dev/null")
        digest = vm.check("sha256sum /tmp/pattern").split()[0]
        vm.check("(while [ ! -e /tmp/stop ]; do dd if=/dev/vda of=/dev/null bs=4k count=16 iflag=direct "
                 "2>/dev/null; done; echo > /tmp/reader.done) >/dev/null 2>&1 &")
        subprocess.run(["fsfreeze", "-f", mnt], check=True)
        frozen = True
        vm.check("(dd if=/tmp/pattern of=/dev/vda bs=64k seek=16 oflag=direct 2>/tmp/dd.err; "
                 "echo $? > /tmp/dd.rc) >/dev/null 2>&1 &")
        before = first.rpc("vhost_get_queue_stats", ctrlr="vhost.1")[0]["requests"]
        # The first write is stuck in the target; reads overtake it.
        deadline = time.monotonic() + 30
        while first.rpc("vhost_get_queue_stats", ctrlr="vhost.1")[0]["requests"] <= before + 10:
            assert time.monotonic() < deadline, "the guest's reads stopped behind the stuck write"
            time.sleep(0.1)
        assert vm.run("test -e /tmp/dd.rc")[0] != 0, "the guest's writes finished on a frozen filesystem"
        first.proc.kill()
        subprocess.run(["fsfreeze", "-u", mnt], check=True)
        frozen = False
        first.proc.wait(30)
        second = serve()
        second.wait_log("resubmitting", timeout=60)
        deadline = time.monotonic() + 60
        while vm.run("test -s /tmp/dd.rc")[0] != 0:
            assert time.monotonic() < deadline, "the guest's writes never finished:\n" + vm.check("dmesg | tail")
            time.sleep(0.5)
        assert vm.check("cat /tmp/dd.rc").strip() == "0", vm.check("cat /tmp/dd.err; dmesg | tail")
        vm.check("touch /tmp/stop")
        deadline = time.monotonic() + 30
        while vm.run("test -e /tmp/reader.done")[0] != 0:
            assert time.monotonic() < deadline, "the guest's reads never finished"
            time.sleep(0.5)
        assert vm.check("dd if=/dev/vda bs=64k skip=16 count=128 iflag=direct 2>/dev/null "
                        "| sha256sum").split()[0] == digest
        assert "I/O error" not in vm.check("dmesg")
        assert "Traceback" not in second.log()
    finally:
        if frozen:
            subprocess.run(["fsfreeze", "-u", mnt], capture_output=True)
        vm.kill()
        if second is not None:
            assert second.stop() == 0, second.log()
        first.stop()
    try:
        assert _host_sha256(disk, 1 << 20, 8 << 20) == digest
    finally:
        subprocess.run(["umount", "-l", mnt], capture_output=True)
        shutil.rmtree(scratch, ignore_errors=True)
