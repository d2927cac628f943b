"""bdev_rbd under real QEMU guests (TCG): fio verify over vhost-blk and vhost-scsi, then
`rbd export` of the image compared byte for byte with what the guest reads; an OSD that
stalls under fio; resizes the running guest sees; a target killed -9 after a guest flush.

The guests are the repository's test guests (tests/guestvm.py, the cached kernel and
initramfs), as every other end-to-end test boots them."""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))
from test_e2e_blk import blk_vm  # noqa: E402
from test_e2e_scsi import scsi_vm, start_background, wait_background, wait_disks  # noqa: E402

MIB = 1 << 20


def _export_sha(ceph, image: str, tmp_path: Path, offset: int, length: int) -> str:
    out = tmp_path / f"{image}.export"
    out.unlink(missing_ok=True)
    ceph.rbd("export", "--no-progress", f"rbd/{image}", str(out), timeout=120)
    with open(out, "rb") as f:
        f.seek(offset)
        return hashlib.sha256(f.read(length)).hexdigest()


def _wait_guest_size(vm, dev: str, size: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while int(vm.check(f"cat /sys/block/{dev}/size")) != size // 512:
        assert time.monotonic() < deadline, f"guest never saw {size} bytes:\n" + vm.check("dmesg | tail -n 20")
        time.sleep(0.5)


def _writes(d, name: str) -> int:
    return d.rpc("bdev_rbd_get_stats", name=name)[0]["completed"]["write"]


def test_fio_verify_over_vhost_blk_rides_out_a_stalled_osd_sees_both_resizes_and_lands_in_the_image(
        vhost_daemon, ceph, rbd_image, tmp_path):
    d = vhost_daemon
    img = str(rbd_image)
    # Requests wait for a stalled OSD up to rados_osd_op_timeout; a loaded machine running a
    # TCG guest needs a while to catch up after the OSD is back, so give them a minute.
    d.rpc("bdev_rbd_create", name="Ceph0", pool_name="rbd", rbd_name=img, block_size=4096,
          config={**ceph.client_conf(), "rados_osd_op_timeout": "60"})
    d.rpc("vhost_create_blk_controller", ctrlr="vhost.1", dev_name="Ceph0")
    with blk_vm(d, "vhost.1", num_queues=2, smp=2) as vm:
        vm.start().wait_ready(timeout=180)
        assert int(vm.check("cat /sys/block/vda/size")) == 64 * MIB // 512
        assert vm.check("cat /sys/block/vda/queue/logical_block_size").strip() == "4096"
        start_background(vm, "fio --name=v --filename=/dev/vda --rw=randrw --bs=4k --iodepth=16 "
                             "--ioengine=libaio --direct=1 --size=8M --numjobs=2 --offset_increment=8M "
                             "--verify=crc32c --do_verify=1 --verify_fatal=1 --group_reporting", "fio")
        deadline = time.monotonic() + 120
        while _writes(d, "Ceph0") < 200:
            assert time.monotonic() < deadline, "fio never got going"
            time.sleep(0.2)
        # The OSD stops answering (SIGSTOP: to a client, an OSD that hangs); I/O waits for it...
        ceph.stop_osd()
        try:
            time.sleep(1)
            stalled = _writes(d, "Ceph0")
            time.sleep(2)
            assert _writes(d, "Ceph0") == stalled, "writes completed while the only OSD was stopped"
            assert d.rpc("bdev_get_bdevs", name="Ceph0")        # the daemon answers meanwhile
        finally:
            ceph.cont_osd()
        # ... and resumes when it is back: no error reaches the guest.
        rc, out = wait_background(vm, "fio", timeout=600)
        errors = [line for line in d.log().splitlines() if "*ERROR*" in line]
        assert rc == 0 and "err= 0" in out, f"{errors}\n{out[-1000:]}"
        assert _writes(d, "Ceph0") > stalled
        guest = vm.check("dd if=/dev/vda bs=1M count=16 iflag=direct 2>/dev/null | sha256sum").split()[0]
        # Resized by the target's RPC, then by someone else with the rbd CLI: the guest sees both.
        d.rpc("bdev_rbd_resize", name="Ceph0", new_size=96)
        _wait_guest_size(vm, "vda", 96 * MIB)
        ceph.rbd("resize", "--size", "128M", f"rbd/{img}")
        _wait_guest_size(vm, "vda", 128 * MIB)
        vm.check("dd if=/dev/urandom of=/tmp/t bs=1M count=2 2>/dev/null")
        vm.check("dd if=/tmp/t of=/dev/vda bs=1M seek=120 oflag=direct conv=fsync 2>/dev/null")
        tail = vm.check("sha256sum /tmp/t").split()[0]
        assert "I/O error" not in vm.check("dmesg")
    assert _export_sha(ceph, img, tmp_path, 0, 16 * MIB) == guest
    assert _export_sha(ceph, img, tmp_path, 120 * MIB, 2 * MIB) == tail
    s = d.rpc("bdev_rbd_get_stats", name="Ceph0")[0]
    assert s["io_errors"] == 0, s
    log = d.log()
    assert "resized outside the target" in log and "config space changed" in log
    assert "Traceback" not in log


def test_fio_verify_over_vhost_scsi_and_a_flushed_write_survives_kill_9_of_the_target(ceph, rbd_image, tmp_path,
                                                                                       request):
    from vhost_core.testing.daemon import VhostDaemon

    d = VhostDaemon(tmp_path / "killed").start()     # not the fixture's: this one is killed
    request.addfinalizer(d.stop)
    img = rbd_image.make(64)
    rbd_image.leave.add(img)
    d.rpc("vhost_create_scsi_controller", ctrlr="vhost.0")
    d.rpc("bdev_rbd_create", name="Ceph0", pool_name="rbd", rbd_name=img, block_size=512,
          config=ceph.client_conf())
    d.rpc("vhost_scsi_controller_add_target", ctrlr="vhost.0", scsi_target_num=0, bdev_name="Ceph0")
    with scsi_vm(d) as vm:
        vm.start().wait_ready(timeout=180)
        disk = wait_disks(vm, lambda f: 0 in f)[0]
        dev = disk["NAME"]
        assert int(vm.check(f"cat /sys/block/{dev}/size")) == 64 * MIB // 512
        out = vm.check(f"fio --name=v --filename=/dev/{dev} --rw=randrw --bs=4k --iodepth=16 "
                       "--ioengine=libaio --direct=1 --size=8M --verify=crc32c --do_verify=1 "
                       "--verify_fatal=1", timeout=600)
        assert "err= 0" in out, out
        fio_sha = vm.check(f"dd if=/dev/{dev} bs=1M count=8 iflag=direct 2>/dev/null | sha256sum").split()[0]
        # A write the guest flushed (conv=fsync: SYNCHRONIZE CACHE) is in the cluster even if
        # the target dies the moment after.
        vm.check("dd if=/dev/urandom of=/tmp/p bs=1M count=4 2>/dev/null")
        vm.check(f"dd if=/tmp/p of=/dev/{dev} bs=1M seek=16 conv=fsync 2>/dev/null")
        flushed = vm.check("sha256sum /tmp/p").split()[0]
        assert d.rpc("bdev_rbd_get_stats", name="Ceph0")[0]["completed"]["flush"] >= 1
        d.proc.kill()
        d.proc.wait(30)
    assert _export_sha(ceph, img, tmp_path, 0, 8 * MIB) == fio_sha
    assert _export_sha(ceph, img, tmp_path, 16 * MIB, 4 * MIB) == flushed
