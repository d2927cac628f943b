"""End to end: a QEMU guest (TCG) uses two NVMe/TCP namespaces of a real Linux target, one
through vhost-blk and one as a vhost-scsi LUN, with fio verify; what it writes is, byte for
byte, on the target's RAM disk."""

from __future__ import annotations

from guestvm import GuestVM

FIO = ("fio --name=v --filename={dev} --rw=randrw --bs=4k --iodepth=16 --ioengine=libaio --direct=1 "
       "--size=4M --verify=crc32c --do_verify=1 --verify_fatal=1")


def test_guest_fio_verify_through_blk_and_scsi(vhost_daemon, nvmet_target, nvmet_mod):
    d = vhost_daemon
    assert d.rpc("bdev_nvme_attach_controller", **nvmet_target.attach_params("Nvme0", hdgst=True)) == \
        ["Nvme0n1", "Nvme0n2"]
    d.rpc("vhost_create_blk_controller", ctrlr="vhost.1", dev_name="Nvme0n1")
    d.rpc("vhost_create_scsi_controller", ctrlr="vhost.0")
    d.rpc("vhost_scsi_controller_add_target", ctrlr="vhost.0", scsi_target_num=0, bdev_name="Nvme0n2")
    vm = GuestVM(["-chardev", f"socket,id=blk1,path={d.socket('vhost.1')}",
                  "-device", "vhost-user-blk-pci,chardev=blk1,num-queues=1",
                  "-chardev", f"socket,id=scsi0,path={d.socket('vhost.0')}",
                  "-device", "vhost-user-scsi-pci,id=scsi0,chardev=scsi0,num_queues=1"], name="vm-nvme")
    with vm:
        vm.start().wait_ready(timeout=180)
        size = nvmet_mod.RAM_MB << 20
        assert int(vm.check("cat /sys/block/vda/size")) * 512 == size
        lsblk = vm.check("lsblk -P -d --output NAME,MODEL,SIZE")
        assert 'NAME="sda" MODEL="NVMe disk ' in lsblk, lsblk      # the SCSI INQUIRY says it, space-padded
        for dev in ("/dev/vda", "/dev/sda"):
            out = vm.check(FIO.format(dev=dev), timeout=300)
            assert "err= 0" in out, out
        vm.check("dd if=/dev/urandom of=/tmp/p bs=1M count=4 2>/dev/null")
        vm.check("dd if=/tmp/p of=/dev/vda bs=1M seek=16 oflag=direct 2>/dev/null")
        vm.check("dd if=/tmp/p of=/dev/sda bs=1M seek=20 oflag=direct 2>/dev/null")
        digest = vm.check("sha256sum /tmp/p").split()[0]
        # On the target, the namespaces are /dev/ram0 and /dev/ram1.
        on_target = nvmet_target.run("dd if=/dev/ram0 bs=1M skip=16 count=4 2>/dev/null | sha256sum; "
                                     "dd if=/dev/ram1 bs=1M skip=20 count=4 2>/dev/null | sha256sum").split()
        assert on_target[0] == digest and on_target[2] == digest
        stats = d.rpc("bdev_nvme_get_controllers", name="Nvme0")[0]["ctrlrs"][0]["stats"]
        assert stats["errors"]["read"] == 0 and stats["errors"]["write"] == 0
        assert stats["r2t"] > 0 and stats["in_capsule_writes"] > 0      # both write paths were used
        # Detach while the guest runs: the SCSI disk is hot-detached, the blk disk fails its I/O.
        assert d.rpc("bdev_nvme_detach_controller", name="Nvme0") is True
        vm.check("for i in $(seq 100); do [ -e /sys/block/sda ] || exit 0; sleep 0.1; done; exit 1", timeout=30)
        rc, out = vm.run("dd if=/dev/vda of=/dev/null bs=4k count=1 iflag=direct 2>&1")
        assert rc != 0, out
    assert d.alive() and "Traceback" not in d.log()
