"""One NVMe PCIe controller through VFIO: checks, bring-up, DMA mappings, hot-removal.

The function must be bound to vfio-pci (the checks say how, with the lines to run).
Bring-up (nvme_pcie.c, each step bounded): VFIO container, group and device, BAR0, bus
mastering, controller reset and enable, admin queue; then Identify, Set Features (Number
of Queues) and one I/O queue pair per reactor channel (made here, taken by the reactors).
Guest memory reaches the controller through the core's memory registration: the
controller listens (``MemoryRegistry.listen``) and maps each region into its IOMMU at
IOVA = host virtual address, so PRP lists are the request's iovecs.  The VFIO request
interrupt (the kernel asks for the device back: hot-removal) makes the controller's
thread hot-remove the namespaces' bdevs and release the device.
"""

from __future__ import annotations

import errno
import os
import re
import select
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from vhost_core.log import get_logger, notice

from vhost_bdev_nvme._nvme_pcie import ffi, lib
from vhost_bdev_nvme.controller import (
    ADMIN_TIMEOUT_MS,
    Controller,
    ControllerError,
    Namespace,
    Timeouts,
    Trid,
    status_text,
)

log = get_logger("bdev_nvme")

NVME_CLASS = 0x010802
SYSFS_PCI = "/sys/bus/pci/devices"
#: I/O queue pairs made at attach (reactor channels take one each) and their depth.
IO_QUEUES = 4
IO_QUEUE_DEPTH = 128
#: A command unanswered this long fails its request (the guest sees an I/O error).
IO_TIMEOUT_MS = 30000
# VHOST_NVME_NO_SGL=1 in the daemon's environment: never send SGLs, as with the many SSDs that
# have none (buffers PRPs cannot describe then go through bounce buffers; the tests use it).
BDF_RE = re.compile(r"^(?:([0-9a-fA-F]{4}):)?([0-9a-fA-F]{2}):([0-9a-fA-F]{2})\.([0-7])$")


def normalize_bdf(traddr: str) -> str | None:
    """``0000:00:04.0`` from ``00:04.0`` or ``0000:00:04.0`` (SPDK also writes ``0000:00:04.0``)."""
    m = BDF_RE.match(traddr.strip())
    if not m:
        return None
    return f"{(m.group(1) or '0000').lower()}:{m.group(2).lower()}:{m.group(3).lower()}.{m.group(4)}"


def bind_lines(bdf: str, driver: str | None) -> str:
    lines = ["modprobe vfio-pci",
             f"echo vfio-pci > {SYSFS_PCI}/{bdf}/driver_override"]
    if driver:
        lines.append(f"echo {bdf} > {SYSFS_PCI}/{bdf}/driver/unbind")
    lines.append(f"echo {bdf} > /sys/bus/pci/drivers_probe")
    return "; ".join(lines)


def check_function(bdf: str) -> None:
    """ControllerError unless ``bdf`` is an NVMe controller bound to vfio-pci, with an IOMMU group."""
    dev = os.path.join(SYSFS_PCI, bdf)
    if not os.path.isdir(dev):
        raise ControllerError(errno.ENODEV, f"there is no PCI function {bdf} on this host: check traddr (-a); "
                                            f"`lspci -D -d ::0108` lists the NVMe controllers")
    try:
        with open(os.path.join(dev, "class")) as f:
            cls = int(f.read().strip(), 16)
    except (OSError, ValueError):
        cls = -1
    if cls != NVME_CLASS:
        raise ControllerError(errno.ENODEV, f"PCI function {bdf} is not an NVMe controller (class {cls:#08x}; "
                                            f"NVMe is {NVME_CLASS:#08x}): check traddr (-a); `lspci -D -d ::0108` "
                                            f"lists the NVMe controllers")
    try:
        driver = os.path.basename(os.readlink(os.path.join(dev, "driver")))
    except OSError:
        driver = None
    if driver != "vfio-pci":
        now = f"bound to the {driver} driver" if driver else "bound to no driver"
        raise ControllerError(errno.EBUSY, f"PCI function {bdf} is {now}, not vfio-pci: hand it to vfio-pci "
                                           f"(its data on the kernel's side is then out of reach) with: "
                                           f"{bind_lines(bdf, driver)}")
    if not os.path.exists(os.path.join(dev, "iommu_group")):
        raise ControllerError(errno.ENODEV, f"PCI function {bdf} has no IOMMU group: enable the IOMMU "
                                            f"(intel_iommu=on or amd_iommu=on on the kernel command line)")


class PcieController(Controller):
    """An NVMe controller on PCIe, driven from userspace through VFIO."""

    def __init__(self, name: str, bdf: str, num_io_queues: int, memory: Any, io_timeout_ms: int = 0,
                 action_on_timeout: str = "abort") -> None:
        # Not Controller.__init__: no NVMe/TCP state.  The Identify parsing is shared.
        self._init_state(name, Trid("PCIe", "", bdf, "", ""), "", False, False, num_io_queues, Timeouts())
        self.bdf = bdf
        self.memory = memory
        self.io_timeout_ms = io_timeout_ms or IO_TIMEOUT_MS
        self.listening = False
        self.map_failures = 0
        self.native = ffi.NULL
        self._freed = False
        self.removed = False
        self.aborts = {"sent": 0, "aborted": 0, "not_aborted": 0, "failed": 0}
        #: bdev_nvme_set_options action_on_timeout: "abort" (then a reset if the Abort fails),
        #: "reset", or "none" (the request fails, nothing is sent).
        self.action_on_timeout = action_on_timeout
        self.resets = 0

    def __repr__(self) -> str:
        return f"<NVMe controller {self.name} at {self.bdf}>"

    # ------------------------------------------------------------ admin commands

    def _admin_native(self, sqe: bytes, cbuf: Any, length: int, to_ctrlr: int, timeout_ms: int, cqe: Any,
                      err: Any, err_len: int) -> int:
        return lib.nvp_admin(self.native, sqe, cbuf, length, to_ctrlr, timeout_ms, cqe, err, err_len)

    # ------------------------------------------------------------ bring-up

    def bring_up(self, deadline: float) -> None:
        """Open, enable, identify, make the I/O queues, map guest memory; ControllerError
        (everything released) on failure."""
        check_function(self.bdf)
        err = ffi.new("char[240]")
        native = lib.nvp_open(self.bdf.encode(), err, 240)
        if native == ffi.NULL:
            e = ffi.errno or errno.EIO
            raise ControllerError(e, f"cannot open {self.bdf} through VFIO: {ffi.string(err).decode(errors='replace')}")
        self.native = native
        try:
            rc = lib.nvp_enable(self.native, ADMIN_TIMEOUT_MS, err, 240)
            if rc:
                raise ControllerError(-rc, f"{self.bdf}: {ffi.string(err).decode(errors='replace')}")
            vs = lib.nvp_vs(self.native)
            self.version = f"{vs >> 16}.{(vs >> 8) & 0xFF}" + (f".{vs & 0xFF}" if vs & 0xFF else "")
            cap = lib.nvp_cap(self.native)
            self.mqes = (cap & 0xFFFF) + 1
            self.mpsmin = (cap >> 48) & 0xF
            with self.admin_lock:
                self._identify_controller()
                self.cntlid = self.cdata["cntlid"]
                self.trid = Trid("PCIe", "", self.bdf, "", self.cdata.get("subnqn", ""))
                self.granted_queues = self._set_num_queues()
                mdts = self.cdata["mdts"]
                max_xfer = (1 << mdts) * 4096 if mdts else 0
                sgls = struct.unpack_from("<I", self._identify_raw, 536)[0]
                use_sgl = bool(sgls & 3) and os.environ.get("VHOST_NVME_NO_SGL", "0") in ("", "0")
                lib.nvp_set_limits(self.native, min(max_xfer, 0xFFFFFFFF), int(use_sgl), self.io_timeout_ms)
                made = lib.nvp_create_io_queues(self.native, min(self.granted_queues, IO_QUEUES), IO_QUEUE_DEPTH,
                                                ADMIN_TIMEOUT_MS, err, 240)
                if made <= 0:
                    raise ControllerError(-made if made < 0 else errno.EIO,
                                          f"{self.bdf}: cannot create I/O queues: "
                                          f"{ffi.string(err).decode(errors='replace')}")
                self.granted_queues = made
                self.namespaces = self._identify_namespaces()
            try:
                self.memory.listen(self)
            except OSError as exc:
                raise ControllerError(exc.errno or errno.EIO, f"{self.bdf}: cannot map guest memory for DMA: "
                                                              f"{exc.strerror or exc}") from None
            self.listening = True
        except BaseException:
            self._release()
            raise

    def _identify_controller(self) -> None:
        d = self._identify(1)
        self._identify_raw = bytes(d)
        from vhost_bdev_nvme.controller import _text
        oacs = struct.unpack_from("<H", d, 256)[0]
        oncs = struct.unpack_from("<H", d, 520)[0]
        self.cdata = {
            "vid": struct.unpack_from("<H", d, 0)[0], "ssvid": struct.unpack_from("<H", d, 2)[0],
            "sn": _text(d[4:24]), "mn": _text(d[24:64]), "fr": _text(d[64:72]),
            "mdts": d[77], "cntlid": struct.unpack_from("<H", d, 78)[0], "oacs": oacs, "oncs": oncs,
            "vwc": d[525], "nn": struct.unpack_from("<I", d, 516)[0], "cmic": d[76],
            "subnqn": _text(d[768:1024]),
        }

    # ------------------------------------------------------------ memory registration

    def mem_register(self, vaddr: int, length: int) -> None:
        rc = lib.nvp_dma_map(self.native, vaddr, length)
        if rc:
            self.map_failures += 1
            hint = (" (the IOMMU's address width may not reach host virtual addresses: on a QEMU guest use "
                    "-device intel-iommu,aw-bits=48)" if -rc in (errno.EINVAL, errno.ENOSPC, errno.EFAULT) else "")
            raise OSError(-rc, f"{self.name}: VFIO_IOMMU_MAP_DMA {vaddr:#x}+{length:#x}: {os.strerror(-rc)}{hint}")

    def mem_unregister(self, vaddr: int, length: int) -> None:
        if self.native != ffi.NULL and not self._freed:
            lib.nvp_dma_unmap(self.native, vaddr, length)

    # ------------------------------------------------------------ run time

    def ns_new(self, ns: Namespace, io_type_bits: int) -> Any:
        native = lib.nvp_ns_new(self.native, ns.nsid, ns.block_size, ns.num_blocks, io_type_bits)
        return None if native == ffi.NULL else native

    def ns_free(self, native: Any) -> None:
        lib.nvp_ns_free(native)

    def native_address(self, native: Any) -> int:
        return int(ffi.cast("uintptr_t", native))

    def up(self) -> None:
        self.state = "enabled"
        lib.nvp_fail(self.native, 0)

    def fail_io(self) -> None:
        lib.nvp_fail(self.native, 1)

    def start(self, on_lost: Callable[[Controller, str], None]) -> None:
        """Watch the VFIO request interrupt (the kernel wants the device back: hot-removal) and
        the commands the reactors gave up on after the I/O timeout (each is sent an Abort)."""
        self.on_lost = on_lost
        fd = lib.nvp_request_eventfd(self.native)
        if fd < 0:
            notice(log, "%s: %s has no VFIO request interrupt (%s): a hot-removal is not noticed", self.name,
                   self.bdf, os.strerror(-fd))
        fds = [x for x in (fd, lib.nvp_timeout_eventfd(self.native)) if x >= 0]
        self._thread = threading.Thread(target=self._watch, args=(fd, fds), name=f"nvme_{self.name}",
                                        daemon=True)
        self._thread.start()

    def _watch(self, req_fd: int, fds: list[int]) -> None:
        while not self._stop.is_set():
            r, _, _ = select.select(fds, [], [], 0.2)
            if not r:
                continue
            for fd in r:
                try:
                    os.read(fd, 8)
                except OSError:
                    pass
            if self._stop.is_set():
                return
            if req_fd in r:
                self.removed = True
                self.state = "failed"
                log.error("%s: the kernel asks for %s back (the device is being removed): its namespaces are "
                          "hot-removed", self.name, self.bdf)
                lib.nvp_fail(self.native, 1)
                if self.on_lost is not None:
                    self.on_lost(self, "hot-removed")
                return
            self._abort_timed_out()

    def _abort_timed_out(self) -> None:
        """What action_on_timeout says for the I/O commands past the timeout (their requests
        failed already): an NVMe Abort (admin opcode 0x08) each, so that the controller may drop
        it instead of running it late, and a controller reset if an Abort fails; or a reset."""
        out = ffi.new("uint32_t[64]")
        reset = False
        while (n := lib.nvp_take_timed_out(self.native, out, 64)) > 0:
            for i in range(n):
                sqid, cid = out[i] & 0xFFFF, out[i] >> 16
                if self.action_on_timeout == "reset":
                    reset = True
                if self.action_on_timeout != "abort" or reset:
                    continue
                sqe = bytearray(64)
                sqe[0] = 0x08
                struct.pack_into("<I", sqe, 40, sqid | cid << 16)
                self.aborts["sent"] += 1
                try:
                    with self.admin_lock:
                        cqe = self._admin(sqe, timeout_ms=min(self.io_timeout_ms, ADMIN_TIMEOUT_MS))
                except ControllerError as exc:
                    self.aborts["failed"] += 1
                    log.error("%s: Abort of command %d on I/O queue %d: %s", self.name, cid, sqid, exc.message)
                    reset = True
                    continue
                done = "not_aborted" if struct.unpack_from("<I", cqe, 0)[0] & 1 else "aborted"
                self.aborts[done] += 1
                log.warning("%s: command %d on I/O queue %d timed out after %d ms: Abort sent, the controller "
                            "answered %s", self.name, cid, sqid, self.io_timeout_ms, done.replace("_", " "))
        if reset:
            self.reset()

    def reset(self) -> bool:
        """Controller reset: the reactors fail their queued and in-flight I/O and let go of
        their queues; CC.EN=0, CSTS.RDY=0, the admin queue again, enable; Set Features
        (number of queues) and the I/O queues created again; I/O flows.  If the controller
        does not come back, it is failed and its namespaces hot-removed."""
        t0 = time.monotonic()
        self.resets += 1
        log.error("%s: %s: resetting the controller", self.name, self.bdf)
        err = ffi.new("char[240]")
        why = ""
        with self.admin_lock:
            rc = lib.nvp_reset_begin(self.native, ADMIN_TIMEOUT_MS)
            if rc:
                why = f"the reactors did not let go of their queues: {os.strerror(-rc)}"
            else:
                rc = lib.nvp_enable(self.native, ADMIN_TIMEOUT_MS, err, 240)
                if rc:
                    why = ffi.string(err).decode(errors="replace")
            if not rc:
                try:
                    self._set_num_queues()
                except ControllerError as exc:
                    rc, why = -exc.errno, exc.message
            if not rc:
                rc = lib.nvp_reset_queues(self.native, ADMIN_TIMEOUT_MS, err, 240)
                if rc:
                    why = "cannot create the I/O queues again: " + ffi.string(err).decode(errors="replace")
        if rc:
            log.error("%s: the reset of %s failed (%s): its namespaces are hot-removed", self.name, self.bdf,
                      why)
            self.state = "failed"
            lib.nvp_fail(self.native, 1)
            if self.on_lost is not None:
                self.on_lost(self, "controller reset failed")
            return False
        lib.nvp_reset_end(self.native)
        notice(log, "%s: controller %s reset in %.1f s; I/O flows again", self.name, self.bdf,
               time.monotonic() - t0)
        return True

    def _release(self) -> None:
        if self.listening:
            self.listening = False
            self.memory.unlisten(self)
        if self.native != ffi.NULL and not self._freed:
            self._freed = True
            lib.nvp_fail(self.native, 1)
            if not self.removed:
                lib.nvp_shutdown(self.native, 2000)
            lib.nvp_put(self.native)

    def close(self) -> None:
        """Stop watching, unmap guest memory, shut the controller down and drop it: the
        VFIO fds go once the namespaces' bdevs let go (they are deleted first)."""
        self.stop()
        self._release()

    def stats(self) -> dict[str, Any]:
        s = ffi.new("struct nvp_stats *")
        if self.native == ffi.NULL or self._freed:
            return {}
        lib.nvp_get_stats(self.native, s)
        types = ("read", "write", "flush", "unmap", "write_zeroes", "reset")
        return {
            "completed": {t: s.ops[i] for i, t in enumerate(types)},
            "errors": {t: s.errors[i] for i, t in enumerate(types)},
            "bytes_read": s.bytes_read, "bytes_written": s.bytes_written, "commands": s.commands,
            "prp_lists": s.prp_lists, "sgls": s.sgls, "unaligned_failed": s.unaligned, "timeouts": s.timeouts,
            "queue_full": s.queue_full, "failed_removed": s.failed_removed, "status_errors": s.status_errors,
            "bounced": s.bounced,
            "last_status": status_text(s.last_status) if s.status_errors else None,
            "io_queues_in_use": lib.nvp_queues_in_use(self.native), "dma_map_failures": self.map_failures,
            "io_timeout_ms": self.io_timeout_ms, "msix_vectors": lib.nvp_interrupts(self.native),
            "aborts": dict(self.aborts), "resets": self.resets, "action_on_timeout": self.action_on_timeout,
        }
