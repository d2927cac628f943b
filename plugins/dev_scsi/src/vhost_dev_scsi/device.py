"""The virtio-scsi device type: targets, features, config space, the native request table.

Targets come and go while a VM runs (hot-attach / hot-detach).  Every change to
the native target table runs on the controller's reactor thread through
``Reactor.exec_native``, so it never races the data path.
"""

from __future__ import annotations

import errno
import hashlib
import struct
import time
from typing import Any, Callable

import attrs

from vhost_core.bdev.interface import Bdev
from vhost_core.bdev.iostat import WORDS as IOSTAT_WORDS, IoStat
from vhost_core.log import get_logger, notice
from vhost_core.rpc.registry import RpcError

from vhost_dev_scsi._scsi_native import ffi, lib

log = get_logger("vhost_scsi")

#: SPDK_VHOST_SCSI_CTRLR_MAX_DEVS: targets 0..7, one LUN (0) each.
MAX_TARGETS = 8
#: Request queues served (virtqueues 2..); QEMU's num_queues may not exceed it.
MAX_REQUEST_QUEUES = 16
#: Control queue, event queue, request queues.
NUM_VIRTQUEUES = 2 + MAX_REQUEST_QUEUES

# virtio-scsi feature bits (virtio 1.x, 5.6.3)
F_INOUT = 0
F_HOTPLUG = 1
F_CHANGE = 2
F_T10_PI = 3

#: Data segments per request (the chain also carries the request and response
#: headers, and buffers split at memory-region boundaries; VN_MAX_IOV is 260).
SEG_MAX = 126
#: What scsi.c enforces (VN_MAX_TRANSFER), in 512-byte sectors.
MAX_SECTORS = lib.scsi_dev_max_transfer() // 512
CMD_PER_LUN = 128
EVENT_INFO_SIZE = 16
SENSE_SIZE = 96
CDB_SIZE = 32
REMOVE_TIMEOUT_S = 30

# num_queues, seg_max, max_sectors, cmd_per_lun, event_info_size, sense_size,
# cdb_size, max_channel, max_target, max_lun
CONFIG = struct.Struct("<IIIIIIIHHI")
assert CONFIG.size == 36
SENSE_SIZE_OFFSET = 20

#: Global SCSI device ids (SPDK numbers every SCSI device of the process).
_used_dev_ids: set[int] = set()


def _alloc_dev_id() -> int:
    i = 0
    while i in _used_dev_ids:
        i += 1
    _used_dev_ids.add(i)
    return i


def _ascii(text: str) -> bytes:
    return "".join(c if " " <= c <= "~" else "_" for c in text).encode()


def naa_locally_assigned(bdev_uuid: str) -> bytes:
    """An 8-byte NAA 3h (locally assigned) identifier, stable for a bdev uuid."""
    h = int.from_bytes(hashlib.sha256(bdev_uuid.lower().encode()).digest()[:8], "big")
    return ((0x3 << 60) | (h & ((1 << 60) - 1))).to_bytes(8, "big")


@attrs.define(eq=False)
class ScsiTarget:
    num: int
    bdev: Bdev
    dev_id: int
    on_removed: Callable[[Bdev], None]
    on_resized: Callable[[Bdev], None]
    removing: bool = False

    @property
    def name(self) -> str:
        return f"Target {self.num}"


class ScsiDevice:
    """One vhost-scsi controller's device half (implements DeviceBackend)."""

    device_type = "scsi"

    def __init__(self, app, ctrlr_name: str) -> None:
        self.app = app
        self.ctrlr_name = ctrlr_name
        self.num_queues = NUM_VIRTQUEUES
        #: False while a controller created with ``delay`` waits for vhost_start_scsi_controller.
        self.started = False
        self.targets: dict[int, ScsiTarget] = {}
        #: The controller's reactor, set once the controller exists; kept (not looked
        #: up by name) because a controller being deleted is no longer in
        #: ``app.controllers`` while its queues stop.
        self.reactor = None
        self.native = lib.scsi_dev_new()
        if self.native == ffi.NULL:
            raise MemoryError("cannot allocate the scsi device")
        self.native_ops = int(ffi.cast("uintptr_t", lib.scsi_device_ops()))
        self.native_ctx = int(ffi.cast("uintptr_t", self.native))

    # ------------------------------------------------------------ reactor calls

    def _exec(self, fn_name: str, arg) -> int:
        """Run ``int fn(void *arg)`` of scsi.c on the controller's reactor thread."""
        if self.reactor is None:
            # Not placed on a reactor yet: nothing else touches the device.
            return getattr(lib, fn_name)(arg)
        fn = int(ffi.cast("uintptr_t", ffi.addressof(lib, fn_name)))
        return self.reactor.exec_native(fn, int(ffi.cast("uintptr_t", arg)))

    def _ctl(self, target: int = 0, value: int = 0):
        return ffi.new("struct scsi_ctl *", {"dev": self.native, "target": target, "value": value})

    # ------------------------------------------------------------ targets

    def free_target_num(self) -> int:
        for n in range(MAX_TARGETS):
            if n not in self.targets:
                return n
        raise RpcError(-errno.ENOSPC, f"controller {self.ctrlr_name}: all {MAX_TARGETS} SCSI target slots "
                                      f"are in use: remove one with vhost_scsi_controller_remove_target")

    def add_target(self, num: int, bdev: Bdev) -> None:
        """Hot-attach ``bdev`` as LUN 0 of target ``num`` (the caller claimed the bdev)."""
        desc = ffi.new("struct scsi_target_desc *")
        desc.dev = self.native
        desc.bdev = ffi.cast("void *", bdev.native)
        desc.target = num
        desc.readonly = int(bdev.readonly)
        product = _ascii(bdev.product_name)[:16].ljust(16)
        ffi.memmove(desc.product, product, 16)
        serial = _ascii(bdev.name)[:64]
        ffi.memmove(desc.serial, serial, len(serial))
        desc.serial_len = len(serial)
        ffi.memmove(desc.naa, naa_locally_assigned(bdev.uuid), 8)
        t10 = _ascii(bdev.uuid)[:40]
        ffi.memmove(desc.t10_id, t10, len(t10))
        desc.t10_id_len = len(t10)
        target = ScsiTarget(num, bdev, _alloc_dev_id(), on_removed=lambda b: self.on_bdev_removed(num, b),
                            on_resized=lambda b: self.on_bdev_resized(num, b))
        rc = self._exec("scsi_dev_add_target", desc)
        if rc < 0:
            _used_dev_ids.discard(target.dev_id)
            raise RpcError(rc, f"controller {self.ctrlr_name}: cannot attach bdev '{bdev.name}' as "
                               f"target {num}: its I/O channel could not be created")
        self.targets[num] = target
        bdev.removal_callbacks.append(target.on_removed)
        bdev.resize_callbacks.append(target.on_resized)

    def remove_target(self, num: int) -> ScsiTarget:
        """Hot-detach target ``num``: new commands to it fail at once (BAD_TARGET),
        commands in flight drain, then the driver gets a REMOVED event."""
        target = self.targets[num]
        target.removing = True
        ctl = self._ctl(num)
        deadline = time.monotonic() + REMOVE_TIMEOUT_S
        while True:
            left = self._exec("scsi_dev_remove_target", ctl)
            if left <= 0:
                break
            if time.monotonic() > deadline:
                log.error("Controller %s: %d commands still outstanding on target %d (bdev '%s') "
                          "after %ds; letting go of it anyway", self.ctrlr_name, left, num,
                          target.bdev.name, REMOVE_TIMEOUT_S)
                break
            time.sleep(0.001)
        del self.targets[num]
        self._retire_iostat(num, target)
        _used_dev_ids.discard(target.dev_id)
        if target.on_removed in target.bdev.removal_callbacks:
            target.bdev.removal_callbacks.remove(target.on_removed)
        if target.on_resized in target.bdev.resize_callbacks:
            target.bdev.resize_callbacks.remove(target.on_resized)
        self.app.bdevs.release(target.bdev, self.ctrlr_name)
        return target

    def on_bdev_resized(self, num: int, bdev: Bdev) -> None:
        """The bdev grew or shrank: capacity-changed unit attention (+ PARAM_CHANGE event)."""
        target = self.targets.get(num)
        if target is None or target.bdev is not bdev:
            return
        self._exec("scsi_dev_capacity_changed", self._ctl(num))
        notice(log, "Controller %s: target %d capacity changed to %d blocks (bdev '%s')",
               self.ctrlr_name, num, bdev.num_blocks, bdev.name)

    def on_bdev_removed(self, num: int, bdev: Bdev) -> None:
        """The bdev is being deleted: hot-detach the target that holds it."""
        target = self.targets.get(num)
        if target is None or target.bdev is not bdev:
            return
        self.remove_target(num)
        notice(log, "Controller %s: bdev '%s' was removed: hot-detached target '%s'",
               self.ctrlr_name, bdev.name, target.name)

    # ------------------------------------------------------------ DeviceBackend

    def device_features(self) -> int:
        # CHANGE as SPDK: QEMU's vhost-user-scsi passes its own CHANGE bit through to
        # SET_FEATURES unmasked.  Offering it only permits PARAM_CHANGE events; we
        # never send one.
        return (1 << F_HOTPLUG) | (1 << F_CHANGE)

    def get_config(self) -> bytes:
        return CONFIG.pack(MAX_REQUEST_QUEUES, SEG_MAX, MAX_SECTORS, CMD_PER_LUN, EVENT_INFO_SIZE,
                           SENSE_SIZE, CDB_SIZE, 0, MAX_TARGETS - 1, 0)

    def set_config(self, offset: int, data: bytes) -> None:
        # The driver may write sense_size and cdb_size (Linux writes the defaults);
        # the sizes of the request and response layouts are fixed here.
        config = bytearray(self.get_config())
        end = offset + len(data)
        if offset < SENSE_SIZE_OFFSET or end > SENSE_SIZE_OFFSET + 8:
            raise ValueError(f"virtio-scsi config bytes {offset}..{end} are read-only")
        config[offset:end] = data
        if bytes(config) != self.get_config():
            raise ValueError(f"sense_size and cdb_size are fixed at {SENSE_SIZE} and {CDB_SIZE}")

    def features_negotiated(self, features: int) -> None:
        value = int(bool(features & (1 << F_HOTPLUG))) | int(bool(features & (1 << F_CHANGE))) << 1
        self._exec("scsi_dev_set_features", self._ctl(value=value))

    def queue_stopping(self, index: int) -> None:
        """The core stops virtqueue ``index``: give back the event buffers (queue 1) or
        the task management functions (queue 0) held on it."""
        self._exec("scsi_dev_queue_stopping", self._ctl(value=index))

    def stats(self) -> dict[str, int]:
        s = ffi.new("struct scsi_dev_stats *")
        lib.scsi_dev_get_stats(self.native, s)
        return {name: getattr(s, name) for name in dir(s)}

    def _iostat_words(self, num: int) -> list[int]:
        words = ffi.new("uint64_t[]", IOSTAT_WORDS)
        lib.scsi_dev_get_iostat(self.native, num, words)
        return list(words)

    def _retire_iostat(self, num: int, target: ScsiTarget) -> None:
        """Letting go of a target's bdev: its totals stay with it (bdev_get_iostat)."""
        if self.native != ffi.NULL:
            target.bdev.iostat_retired.add(IoStat.from_words(self._iostat_words(num)))

    def bdev_iostat(self) -> list[tuple[str, list[int]]]:
        """bdev_get_iostat: what each target completed on its bdev."""
        if self.native == ffi.NULL:
            return []
        return [(t.bdev.name, self._iostat_words(n)) for n, t in sorted(self.targets.items())]

    def reset_iostat_maxmin(self, bdev_name: str) -> None:
        for n, t in self.targets.items():
            if t.bdev.name == bdev_name and self.native != ffi.NULL:
                lib.scsi_dev_reset_iostat_maxmin(self.native, n)

    def backend_specific(self) -> dict[str, Any]:
        return {"scsi": [
            {"scsi_dev_num": t.num, "id": t.dev_id, "target_name": t.name,
             "luns": [{"id": 0, "bdev_name": t.bdev.name}]}
            for _, t in sorted(self.targets.items()) if not t.removing]}

    def close(self) -> None:
        for num, target in self.targets.items():
            self._retire_iostat(num, target)
            if target.on_removed in target.bdev.removal_callbacks:
                target.bdev.removal_callbacks.remove(target.on_removed)
            if target.on_resized in target.bdev.resize_callbacks:
                target.bdev.resize_callbacks.remove(target.on_resized)
            self.app.bdevs.release(target.bdev, self.ctrlr_name)
            _used_dev_ids.discard(target.dev_id)
        self.targets.clear()
        if self.native != ffi.NULL:
            lib.scsi_dev_free(self.native)
            self.native = ffi.NULL
