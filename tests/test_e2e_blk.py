"""vhost-blk end to end: a real QEMU guest (TCG) whose Linux virtio-blk driver talks
to the real daemon.  Each test boots the cached busybox+fio guest (~6 s)."""

from __future__ import annotations

import os
import signal

import pytest
from guestvm import GuestVM

PATTERN_MB = 4


def blk_vm(d, ctrlr: str, *, num_queues: int = 1, smp: int = 1, name: str = "vm", **kw) -> GuestVM:
    cid = ctrlr.replace(".", "_")
    vm = GuestVM(["-chardev", f"socket,id={cid},path={d.socket(ctrlr)}",
                  "-device", f"vhost-user-blk-pci,chardev={cid},num-queues={num_queues}"],
                 smp=smp, name=name, **kw)
    return vm


def make_disk(d, bdev: str = "Malloc0", ctrlr: str = "vhost.1", mb: int = 64, block_size: int = 512,
              readonly: bool = False) -> None:
    d.rpc("bdev_malloc_create", num_blocks=mb * 1024 * 1024 // block_size, block_size=block_size, name=bdev)
    d.rpc("vhost_create_blk_controller", ctrlr=ctrlr, dev_name=bdev, readonly=readonly)


def write_pattern(vm: GuestVM, seek_mb: int = 1) -> str:
    """Write a random pattern with O_DIRECT; return its checksum."""
    vm.check(f"dd if=/dev/urandom of=/tmp/pattern bs=1M count={PATTERN_MB} 2>/dev/null")
    vm.check(f"dd if=/tmp/pattern of=/dev/vda bs=1M seek={seek_mb} oflag=direct 2>/dev/null")
    return vm.check("sha256sum /tmp/pattern").split()[0]


def read_pattern(vm: GuestVM, seek_mb: int = 1) -> str:
    vm.check(f"dd if=/dev/vda of=/tmp/readback bs=1M skip={seek_mb} count={PATTERN_MB} iflag=direct 2>/dev/null")
    return vm.check("sha256sum /tmp/readback").split()[0]


@pytest.mark.parametrize("block_size", [512, 4096])
def test_guest_sees_disk_size_and_block_size_and_data_round_trips(vhost_daemon, block_size):
    d = vhost_daemon
    make_disk(d, mb=48, block_size=block_size)
    with blk_vm(d, "vhost.1") as vm:
        vm.start().wait_ready()
        assert int(vm.check("cat /sys/block/vda/size")) == 48 * 1024 * 1024 // 512
        assert int(vm.check("cat /sys/block/vda/queue/logical_block_size")) == block_size
        assert vm.check("cat /sys/block/vda/ro").strip() == "0"
        assert vm.check("cat /sys/block/vda/serial 2>/dev/null || true").strip() in ("Malloc0", "")
        digest = write_pattern(vm)
        assert read_pattern(vm) == digest
        vm.check("sync")
        # The bytes are in the bdev: a second, independent reader sees them too.
        assert vm.check(f"dd if=/dev/vda bs=1M skip=1 count={PATTERN_MB} iflag=direct 2>/dev/null"
                        " | sha256sum").split()[0] == digest


def test_data_survives_guest_reboot_and_qemu_restart(vhost_daemon):
    d = vhost_daemon
    make_disk(d)
    with blk_vm(d, "vhost.1") as vm:
        vm.start().wait_ready()
        digest = write_pattern(vm)
        vm.reboot()                      # the guest resets the device: rings stop and restart
        assert read_pattern(vm) == digest
        digest2 = write_pattern(vm, seek_mb=8)
    d.wait_log("Controller vhost.1: front-end disconnected")
    with blk_vm(d, "vhost.1", name="vm2") as vm:   # a new QEMU process reconnects
        vm.start().wait_ready()
        assert read_pattern(vm) == digest
        assert read_pattern(vm, seek_mb=8) == digest2
    assert "Traceback" not in d.log()


def test_readonly_controller_refuses_writes(vhost_daemon):
    d = vhost_daemon
    make_disk(d, readonly=True)
    with blk_vm(d, "vhost.1") as vm:
        vm.start().wait_ready()
        assert vm.check("cat /sys/block/vda/ro").strip() == "1"
        vm.check("dd if=/dev/urandom of=/tmp/p bs=4k count=4 2>/dev/null")
        rc, out = vm.run("dd if=/tmp/p of=/dev/vda bs=4k oflag=direct conv=notrunc 2>&1")
        assert rc != 0, out
        # reads still work
        vm.check("dd if=/dev/vda of=/dev/null bs=4k count=16 iflag=direct 2>/dev/null")
    ctrlr = d.rpc("vhost_get_controllers", name="vhost.1")[0]
    assert ctrlr["backend_specific"]["block"]["readonly"] is True


def test_two_vms_on_two_controllers_at_once(vhost_daemon):
    d = vhost_daemon
    make_disk(d, bdev="Malloc0", ctrlr="vhost.1")
    make_disk(d, bdev="Malloc1", ctrlr="vhost.2", block_size=4096)
    with blk_vm(d, "vhost.1", name="vmA") as a, blk_vm(d, "vhost.2", name="vmB") as b:
        a.start()
        b.start()
        a.wait_ready()
        b.wait_ready()
        da, db = write_pattern(a), write_pattern(b)
        assert da != db
        assert read_pattern(a) == da
        assert read_pattern(b) == db
        assert b.check("cat /sys/block/vda/queue/logical_block_size").strip() == "4096"
    assert len(d.rpc("vhost_get_controllers")) == 2


def test_unshared_guest_memory_logs_the_fix(vhost_daemon):
    d = vhost_daemon
    make_disk(d)
    vm = blk_vm(d, "vhost.1", shared_memory=False)
    try:
        vm.start()
        log = d.wait_log("share=on", timeout=60)
    finally:
        vm.kill()
    assert "guest memory is not shared" in log
    assert "memory-backend-memfd" in log and "-numa node,memdev=mem" in log
    assert d.alive()
    assert "Traceback" not in d.log()


def test_sigterm_with_a_running_vm_drains_and_exits_zero(vhost_daemon):
    d = vhost_daemon
    make_disk(d)
    with blk_vm(d, "vhost.1") as vm:
        vm.start().wait_ready()
        write_pattern(vm)
        rc = d.stop(signal.SIGTERM)
        assert rc == 0, d.log()
        assert not os.path.exists(d.socket("vhost.1"))
        assert not os.path.exists(d.rpc_path)
        assert "Exiting" in d.log()


def test_qemu_reconnects_to_a_restarted_target(tmp_path):
    """QEMU with `reconnect=1`: the target restarts (SIGTERM, new process, same
    socket) and the running guest's disk serves I/O again without a guest reboot."""
    from vhost_core.testing.daemon import VhostDaemon

    first = VhostDaemon(tmp_path / "vhost").start()
    make_disk(first)
    vm = GuestVM(["-chardev", f"socket,id=c1,path={first.socket('vhost.1')},reconnect=1",
                  "-device", "vhost-user-blk-pci,chardev=c1,num-queues=1"], name="vm-reconnect")
    second = None
    try:
        vm.start().wait_ready()
        write_pattern(vm)
        assert first.stop(signal.SIGTERM) == 0, first.log()
        second = VhostDaemon(tmp_path / "vhost").start()
        make_disk(second)
        second.wait_log("Controller vhost.1: front-end connected", timeout=30)
        # Malloc data lived in the old process; the disk itself must work again.
        digest = write_pattern(vm, seek_mb=2)
        assert read_pattern(vm, seek_mb=2) == digest
        assert "Traceback" not in second.log()
    finally:
        vm.kill()
        if second is not None:
            assert second.stop() == 0, second.log()


def test_polling_reactor_serves_a_guest(tmp_path):
    """The default (busy-polling) reactor, on one core, with a real guest on the other."""
    from vhost_core.testing.daemon import VhostDaemon

    with VhostDaemon(tmp_path / "vhost", interrupt_mode=False) as d:
        make_disk(d, block_size=4096)
        with blk_vm(d, "vhost.1") as vm:
            vm.start().wait_ready()
            digest = write_pattern(vm)
            assert read_pattern(vm) == digest
            vm.check("fio --name=p --filename=/dev/vda --rw=randrw --bs=4k --iodepth=8 --ioengine=libaio "
                     "--direct=1 --size=4M --verify=crc32c --do_verify=1 --verify_fatal=1", timeout=300)
        reactors = d.rpc("framework_get_reactors")["reactors"]
        assert reactors[0]["in_interrupt"] is False and reactors[0]["busy"] > 0


def test_the_default_config_prints_a_qemu_line_that_boots_a_guest_and_survives_a_restart(tmp_path):
    """The quick start: `vhost --default-config` prints the QEMU options to use.  Those very
    options give a guest its 64 MiB disk, and (reconnect=1) the disk works again after
    the target is killed and started anew."""
    import shlex
    import time

    from vhost_core.testing.daemon import VhostDaemon

    def start() -> tuple[VhostDaemon, list[str]]:
        d = VhostDaemon(tmp_path / "vhost", extra_args=("--default-config",)).start()
        out = d.wait_log("Start a VM with:", timeout=10)
        line = out[out.index("Start a VM with:"):].splitlines()[1].strip()
        words = shlex.split(line)
        assert words[0] == "qemu-system-x86_64" and "share=on" in line and "reconnect=1" in line
        # The guest harness brings its own shared memory: take the disk's options.
        opts = []
        for flag, value in zip(words, words[1:]):
            if flag in ("-chardev", "-device"):
                opts += [flag, value]
        return d, opts

    first, opts = start()
    vm = GuestVM(opts, name="vm-quickstart")
    second = None
    try:
        vm.start().wait_ready()
        assert int(vm.check("cat /sys/block/vda/size")) == (64 << 20) // 512
        write_pattern(vm)
        first.proc.kill()
        first.proc.wait(10)
        second, _ = start()
        second.wait_log("Controller vhost.0: front-end connected", timeout=30)
        deadline = time.monotonic() + 30
        while vm.run("dd if=/dev/vda of=/dev/null bs=4k count=1 iflag=direct 2>/dev/null")[0] != 0:
            assert time.monotonic() < deadline, vm.check("dmesg | tail")
            time.sleep(0.5)
        digest = write_pattern(vm, seek_mb=2)
        assert read_pattern(vm, seek_mb=2) == digest
    finally:
        vm.kill()
        if second is not None:
            assert second.stop() == 0, second.log()
        first.stop()
