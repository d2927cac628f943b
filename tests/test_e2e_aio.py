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
