"""The virtio-scsi device type: targets, features, config space, the native request table.

Targets come and go while a VM runs (hot-attach / hot-detach).  Every change to
the native target table runs on the controller's reactor thread
(``DeviceContext.run``), so it never races the data path.
"""

from __future__ import annotations

import errno
import hashlib
import struct
from typing import Any

import attrs

from vhost_core.errors import VhostError
from vhost_core.bdev.interface import Bdev
from vhost_core.bdev.registry import BdevDescriptor
from vhost_core.device import Device, DeviceContext, NativeDevice
from vhost_core.log import get_logger, notice

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
#: What scsi_lun.c enforces (VN_MAX_TRANSFER), in 512-byte sectors.
MAX_SECTORS = lib.scsi_dev_max_transfer() // 512
CMD_PER_LUN = 128
EVENT_INFO_SIZE = 16
SENSE_SIZE = 96
CDB_SIZE = 32

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
    desc: BdevDescriptor
    dev_id: int
    removing: bool = False

    @property
    def bdev(self) -> Bdev:
        return self.desc.bdev

    @property
    def name(self) -> str:
        return f"Target {self.num}"


class ScsiDevice(Device):
    """One vhost-scsi controller's device half: up to MAX_TARGETS bdevs, one per target."""

    device_type = "scsi"

    def __init__(self) -> None:
        self.num_queues = NUM_VIRTQUEUES
        #: False while a controller created with ``delay`` waits for vhost_start_scsi_controller.
        self.started = False
        self.targets: dict[int, ScsiTarget] = {}
        self.ctx: DeviceContext | None = None
        self.native = ffi.NULL

    @property
    def ctrlr_name(self) -> str:
        return self.ctx.name if self.ctx is not None else "?"

    def attach(self, ctx: DeviceContext) -> NativeDevice:
        self.ctx = ctx
        self.native = lib.scsi_dev_new()
        if self.native == ffi.NULL:
            raise MemoryError("cannot allocate the scsi device")
        return NativeDevice(ops=int(ffi.cast("uintptr_t", lib.scsi_device_ops())),
                            ctx=int(ffi.cast("uintptr_t", self.native)))

    # ------------------------------------------------------------ reactor calls

    def _run(self, fn_name: str, arg) -> int:
        """Run ``int fn(void *arg)`` of virtio_scsi.c on the controller's reactor thread."""
        assert self.ctx is not None
        fn = int(ffi.cast("uintptr_t", ffi.addressof(lib, fn_name)))
        return self.ctx.run(fn, int(ffi.cast("uintptr_t", arg)))

    def _ctl(self, target: int = 0, value: int = 0):
        return ffi.new("struct scsi_ctl *", {"dev": self.native, "target": target, "value": value})

    # ------------------------------------------------------------ targets

    def free_target_num(self) -> int:
        for n in range(MAX_TARGETS):
            if n not in self.targets:
                return n
        raise VhostError(errno.ENOSPC, f"controller {self.ctrlr_name}: all {MAX_TARGETS} SCSI target slots "
                                      f"are in use: remove one with vhost_scsi_controller_remove_target")

    def add_target(self, num: int, bdev_name: str) -> ScsiTarget:
        """Hot-attach bdev ``bdev_name`` as LUN 0 of target ``num``."""
        assert self.ctx is not None
        desc = self.ctx.open_bdev(bdev_name, on_remove=lambda d: self._bdev_removed(num, d),
                                  on_resize=lambda d: self._bdev_resized(num, d))
        bdev = desc.bdev
        native = ffi.new("struct scsi_target_desc *")
        native.dev = self.native
        native.desc = ffi.cast("void *", desc.address)
        native.target = num
        native.readonly = int(bdev.readonly)
        product = _ascii(bdev.product_name)[:16].ljust(16)
        ffi.memmove(native.product, product, 16)
        serial = _ascii(bdev.name)[:64]
        ffi.memmove(native.serial, serial, len(serial))
        native.serial_len = len(serial)
        ffi.memmove(native.naa, naa_locally_assigned(bdev.uuid), 8)
        t10 = _ascii(bdev.uuid)[:40]
        ffi.memmove(native.t10_id, t10, len(t10))
        native.t10_id_len = len(t10)
        rc = self._run("scsi_dev_add_target", native)
        if rc < 0:
            desc.close()
            raise VhostError(-rc, f"controller {self.ctrlr_name}: cannot attach bdev '{bdev.name}' as "
                               f"target {num}")
        target = ScsiTarget(num, desc, _alloc_dev_id())
        self.targets[num] = target
        return target

    def remove_target(self, num: int) -> ScsiTarget:
        """Hot-detach target ``num``: new commands to it fail at once (BAD_TARGET),
        commands in flight drain (with the control lock released), then the driver
        gets a REMOVED event and the bdev is let go."""
        assert self.ctx is not None
        target = self.targets[num]
        if target.removing:
            raise VhostError(errno.EBUSY, f"controller {self.ctrlr_name}: SCSI target {num} is already "
                                         f"being removed")
        target.removing = True
        ctl = self._ctl(num)
        self.ctx.drain(lambda: self._run("scsi_dev_remove_target", ctl),
                       f"commands still in flight on target {num} (bdev '{target.bdev.name}')")
        del self.targets[num]
        _used_dev_ids.discard(target.dev_id)
        target.desc.close()
        return target

    def _bdev_resized(self, num: int, desc: BdevDescriptor) -> None:
        """The bdev grew or shrank: capacity-changed unit attention (+ PARAM_CHANGE event)."""
        target = self.targets.get(num)
        if target is None or target.desc is not desc:
            return
        self._run("scsi_dev_capacity_changed", self._ctl(num))
        notice(log, "Controller %s: target %d capacity changed to %d blocks (bdev '%s')",
               self.ctrlr_name, num, desc.bdev.num_blocks, desc.bdev.name)

    def _bdev_removed(self, num: int, desc: BdevDescriptor) -> None:
        """The bdev is being deleted: hot-detach the target that holds it."""
        target = self.targets.get(num)
        if target is None or target.desc is not desc or target.removing:
            return
        self.remove_target(num)
        notice(log, "Controller %s: bdev '%s' was removed: hot-detached target '%s'",
               self.ctrlr_name, desc.bdev.name, target.name)

    # ------------------------------------------------------------ Device

    def delete_refused(self) -> str | None:
        if not self.targets:
            return None
        nums = sorted(self.targets)
        fix = "; ".join(f"vhost_scsi_controller_remove_target {self.ctrlr_name} {n}" for n in nums)
        return (f"SCSI target{'s' if len(nums) > 1 else ''} {', '.join(map(str, nums))} "
                f"{'are' if len(nums) > 1 else 'is'} still present: remove the targets first ({fix})")

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
        self._run("scsi_dev_set_features", self._ctl(value=value))

    def queue_stopping(self, index: int) -> None:
        """The core stops virtqueue ``index``: give back the event buffers (queue 1) or
        the task management functions (queue 0) held on it."""
        self._run("scsi_dev_queue_stopping", self._ctl(value=index))

    def stats(self) -> dict[str, int]:
        s = ffi.new("struct scsi_dev_stats *")
        lib.scsi_dev_get_stats(self.native, s)
        return {name: getattr(s, name) for name in dir(s)}

    def backend_specific(self) -> dict[str, Any]:
        return {"scsi": [
            {"scsi_dev_num": t.num, "id": t.dev_id, "target_name": t.name,
             "luns": [{"id": 0, "bdev_name": t.bdev.name}]}
            for _, t in sorted(self.targets.items()) if not t.removing]}

    def config_json(self) -> list[dict[str, Any]]:
        assert self.ctx is not None
        calls: list[dict[str, Any]] = [{"method": "vhost_create_scsi_controller",
                                        "params": {"ctrlr": self.ctx.name, "cpumask": self.ctx.cpumask}}]
        for num, t in sorted(self.targets.items()):
            if not t.removing:
                calls.append({"method": "vhost_scsi_controller_add_target",
                              "params": {"ctrlr": self.ctx.name, "scsi_target_num": num,
                                         "bdev_name": t.bdev.name}})
        return calls

    def detach(self) -> None:
        for target in self.targets.values():
            _used_dev_ids.discard(target.dev_id)
        self.targets.clear()
        if self.native != ffi.NULL:
            lib.scsi_dev_free(self.native)
            self.native = ffi.NULL
