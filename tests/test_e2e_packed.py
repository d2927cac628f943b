"""Packed virtqueues end to end: one real QEMU guest (TCG) with a vhost-user-blk and a
vhost-user-scsi device, both ``packed=on``, whose Linux drivers negotiate
VIRTIO_F_RING_PACKED with the daemon; fio writes and verifies on both disks at once
(several queues, requests of several sizes, completions out of order), then the guest
reboots (the rings stop with GET_VRING_BASE and restart at the wrap counters it
returned) and the data is still there.
"""

from __future__ import annotations

from guestvm import GuestVM
from test_e2e_scsi import disks

#: fio on both disks at once, one job each, writing then verifying.
FIO = ("fio --ioengine=libaio --direct=1 --rw=randrw --bssplit=4k/70:64k/30 --iodepth=16 "
       "--size=3M --verify=crc32c --do_verify=1 --verify_fatal=1 --group_reporting "
       "--name=blk --filename=/dev/vda --name=scsi --filename=/dev/{scsi}")


def negotiated_packed(vm: GuestVM) -> dict[int, bool]:
    """virtio device id -> whether the guest's driver negotiated VIRTIO_F_RING_PACKED
    (bit 34 of the features string in sysfs)."""
    out = vm.check("for d in /sys/bus/virtio/devices/*; do echo $(cat $d/device) $(cat $d/features); done")
    found = {}
    for line in out.splitlines():
        dev, feats = line.split()
        found[int(dev, 16)] = feats[34] == "1"
    return found


def test_guest_drives_packed_rings_on_blk_and_scsi_with_fio_verify(vhost_daemon):
    d = vhost_daemon
    d.rpc("bdev_malloc_create", num_blocks=32 * 2048, block_size=512, name="MBlk")
    d.rpc("vhost_create_blk_controller", ctrlr="vhost.blk", dev_name="MBlk")
    d.rpc("bdev_malloc_create", num_blocks=32 * 2048, block_size=512, name="MScsi")
    d.rpc("vhost_create_scsi_controller", ctrlr="vhost.scsi")
    d.rpc("vhost_scsi_controller_add_target", ctrlr="vhost.scsi", scsi_target_num=0, bdev_name="MScsi")
    vm = GuestVM(["-chardev", f"socket,id=cb,path={d.socket('vhost.blk')}",
                  "-device", "vhost-user-blk-pci,chardev=cb,num-queues=2,packed=on",
                  "-chardev", f"socket,id=cs,path={d.socket('vhost.scsi')}",
                  "-device", "vhost-user-scsi-pci,id=scsi0,chardev=cs,num_queues=2,packed=on"],
                 smp=2, mem_mb=768, name="vm-packed")
    with vm:
        vm.start().wait_ready()
        packed = negotiated_packed(vm)
        assert packed.get(2) is True and packed.get(8) is True, packed   # virtio-blk, virtio-scsi
        scsi = disks(vm)[0]["KNAME"]
        out = vm.check(FIO.format(scsi=scsi), timeout=600)
        assert "err= 0" in out, out
        vm.check(f"dd if=/dev/urandom of=/tmp/p bs=1M count=2 2>/dev/null; "
                 f"dd if=/tmp/p of=/dev/vda bs=1M seek=8 oflag=direct 2>/dev/null; "
                 f"dd if=/tmp/p of=/dev/{scsi} bs=1M seek=8 oflag=direct 2>/dev/null")
        digest = vm.check("sha256sum /tmp/p").split()[0]
        vm.reboot()
        scsi = disks(vm)[0]["KNAME"]
        for dev in ("vda", scsi):
            back = vm.check(f"dd if=/dev/{dev} bs=1M skip=8 count=2 iflag=direct 2>/dev/null | sha256sum")
            assert back.split()[0] == digest, dev
    for ctrlr in ("vhost.blk", "vhost.scsi"):
        stats = d.rpc("vhost_get_queue_stats", ctrlr=ctrlr)
        assert all(q["errors"] == 0 for q in stats), (ctrlr, stats)
        assert sum(q["requests"] for q in stats) > 200, (ctrlr, stats)
    log = d.log()
    assert "malformed" not in log and "Traceback" not in log, log
