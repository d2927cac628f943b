"""The PCIe transport for real: QEMU's emulated NVMe controller in a q35 TCG guest with a
vIOMMU, driven through VFIO by the project's daemon running inside that guest (vfio_guest.py),
with the project's vhost-user test front-end beside it (pcie_guest_run.py, which asserts what
it sees).  After the guest powers off, the raw image file behind the controller must hold
exactly what the front-end wrote: every written range its bytes, the write-zeroes range zeros,
every other byte (but the discarded range) the pattern the file started with.

One boot covers: the bad input that needs a real function (not bound to vfio-pci, whose error
gives the lines that bind it, which are then run; not an NVMe controller; attached twice under
another name and under the same name), every case of vhost-core's bdev conformance suite on the
PCIe bdev (against the daemon already up, not one daemon per case), attach (bdev names, SPDK's
driver_specific.nvme with pci_address, model and serial, save_config), read/write through PRPs and PRP lists, a request
split at MDTS, an SGL for scattered buffers, flush, write zeroes, unmap, detach (the bdev goes,
the front-end's I/O fails) and attaching again (the VFIO group was released), then commands
the controller sits on (its drive throttled through QMP) failing after bdev_nvme_set_options'
timeout_us instead of hanging the guest, each sent an NVMe Abort.  Then, with the
controller behind a pcie-root-port, QMP device_del while the front-end reads and writes: the
VFIO request interrupt makes the daemon hot-remove the bdev and let go of the function, so that
the removal completes.  Both kinds of controller are on the namespace then: a vhost-scsi LUN
(whose INQUIRY says NVMe disk, and whose write is checked on the image too) is hot-detached (the
front-end gets the virtio-scsi transport reset event "removed" for its target, further commands
answer BAD_TARGET) while the vhost-blk device fails every further I/O.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

SERIAL = "VHOSTPYVFIO0001"
IMAGE_BYTES = 64 << 20
FILL = 0x5A


def test_pcie_controller_through_vfio_in_a_guest(vfio_mod, tmp_path):
    disk = tmp_path / "nvme.img"
    disk.write_bytes(bytes([FILL]) * IMAGE_BYTES)
    script = Path(__file__).with_name("pcie_guest_run.py")
    g = vfio_mod.VfioGuest(str(disk), SERIAL, root_port=True)

    def guest_log(deadline: float) -> str:
        log = g.read_file("/tmp/pcie.log") or ""
        if "Traceback" in log or time.monotonic() > deadline:
            time.sleep(2)                       # the whole traceback, not its first lines
            raise AssertionError(g.read_file("/tmp/pcie.log"))
        return log

    try:
        g.start()
        t0 = time.monotonic()
        g.start_python(script, SERIAL, str(IMAGE_BYTES), "/tmp/hr-ready", log="/tmp/pcie.log")
        log = ""
        throttle = dict(device="nvm0", bps=0, bps_rd=0, bps_wr=0, iops_rd=0, iops_wr=0)
        asks = {"throttle-me": lambda: g.vm.qmp("block_set_io_throttle", iops=1, **throttle),
                "unthrottle-me": lambda: g.vm.qmp("block_set_io_throttle", iops=0, **throttle)}
        answers = {"throttle-me": "throttled", "unthrottle-me": "unthrottled"}
        while g.read_file("/tmp/hr-ready") is None:
            log = guest_log(t0 + 150)
            for ask in list(asks):
                if g.read_file(f"/tmp/{ask}") is not None:
                    asks.pop(ask)()
                    g.vm.check(f"touch {vfio_mod.HOST}/tmp/{answers[ask]}", timeout=10)
            time.sleep(0.3)
        assert not asks
        g.vm.qmp("device_del", id="nvme0")      # while the front-end's I/O runs
        while not (lines := [x for x in log.splitlines() if x.startswith("PCIE-RESULT ")]):
            time.sleep(0.5)
            log = guest_log(t0 + 240)
        print(f"boot + setup {g.boot_s:.1f} s, then {time.monotonic() - t0:.1f} s\n{log}")
        result = json.loads(lines[-1].split(" ", 1)[1])
        # QEMU says DEVICE_DELETED when the guest powers the slot off, just after the function
        # left its sysfs (which is what the guest script waited for): a QMP round trip or a few.
        deadline = time.monotonic() + 30
        while not any(e["event"] == "DEVICE_DELETED" and e.get("data", {}).get("device") == "nvme0"
                      for e in g.vm.qmp_events):
            assert time.monotonic() < deadline, g.vm.qmp_events
            g.vm.qmp("query-status")
            time.sleep(0.2)
        assert g.vm.poweroff() == 0
    finally:
        g.close()

    data = disk.read_bytes()
    assert len(data) == IMAGE_BYTES
    expected_fill = bytearray([FILL]) * IMAGE_BYTES
    for off, n, sha in result["written"]:
        assert hashlib.sha256(data[off:off + n]).hexdigest() == sha, f"bytes {off}+{n} on the image"
        expected_fill[off:off + n] = data[off:off + n]
    for off, n in result["zeroed"]:
        assert data[off:off + n] == bytes(n), f"write zeroes {off}+{n} on the image"
        expected_fill[off:off + n] = bytes(n)
    for off, n in result["discarded"]:
        expected_fill[off:off + n] = data[off:off + n]     # deallocated: the controller may keep or drop it
    assert len(result["scratch"]) == 2, result["scratch"]
    for off, n in result["scratch"]:
        expected_fill[off:off + n] = data[off:off + n]     # the conformance suite's: checked by its reads
    assert data == bytes(expected_fill), "bytes outside the written ranges changed"
