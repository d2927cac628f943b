"""The virtio-blk device type: features, config space, and the native request table."""

from __future__ import annotations

import struct
from typing import Any

from vhost_core.bdev.interface import Bdev
from vhost_core.bdev.registry import BdevDescriptor
from vhost_core.device import Device, DeviceContext, NativeDevice
from vhost_core.log import get_logger, notice
from vhost_core.native import lib as core_lib

from vhost_dev_blk._blk_native import ffi, lib

log = get_logger("vhost_blk")

# virtio-blk feature bits (virtio 1.x, 5.2.3)
F_SIZE_MAX = 1
F_SEG_MAX = 2
F_RO = 5
F_BLK_SIZE = 6
F_FLUSH = 9
F_MQ = 12
F_DISCARD = 13
F_WRITE_ZEROES = 14

#: Data segments per request we advertise (seg_max); the chain also carries a
#: header and a status descriptor, and a buffer crossing a memory-region boundary
#: splits, all within VN_MAX_IOV (260).
SEG_MAX = 126
#: Bytes per segment (size_max): seg_max * size_max is the largest READ/WRITE a
#: guest sends, and it must stay within the core's VN_MAX_TRANSFER (4 MiB), which
#: blk.c enforces: 126 x 32 KiB = 3.9 MiB.
SIZE_MAX = (core_lib.vn_max_transfer() // SEG_MAX) & ~4095
#: Sectors per DISCARD / WRITE ZEROES (2 GiB, a multiple of every block size): no
#: data moves through guest memory, and bdevs that zero on the reactor do it
#: VN_MAX_TRANSFER bytes per iteration (bdev_malloc).
MAX_DISCARD_SECTORS = 1 << 22
MAX_QUEUES = 16

# capacity, size_max, seg_max, geometry(c,h,s), blk_size, topology(exp, align, min_io, opt_io),
# writeback, unused0, num_queues, max_discard_sectors, max_discard_seg,
# discard_sector_alignment, max_write_zeroes_sectors, max_write_zeroes_seg,
# write_zeroes_may_unmap, unused1[3]
CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3x")
assert CONFIG.size == 60


class BlkDevice(Device):
    """One vhost-blk controller's device half: one bdev, opened at attach."""

    device_type = "blk"

    def __init__(self, bdev_name: str, readonly: bool, num_queues: int = MAX_QUEUES, *,
                 packed_ring: bool = True) -> None:
        self.packed_ring = packed_ring
        self.bdev_name = bdev_name
        self.requested_readonly = readonly
        self.num_queues = num_queues
        self.desc: BdevDescriptor | None = None
        self.ctx: DeviceContext | None = None
        self.native = ffi.NULL
        # GET_ID: the bdev name, as SPDK answers (20 bytes, NUL-padded).
        self._id = ffi.new("char[]", bdev_name.encode()[:20])

    @property
    def bdev(self) -> Bdev:
        assert self.desc is not None
        return self.desc.bdev

    @property
    def readonly(self) -> bool:
        return self.requested_readonly or (self.desc is not None and self.desc.bdev.readonly)

    @property
    def removed(self) -> bool:
        """The bdev was hot-removed: I/O fails, the controller stays until deleted."""
        return self.desc is None or self.desc.closed

    def attach(self, ctx: DeviceContext) -> NativeDevice:
        self.ctx = ctx
        self.desc = ctx.open_bdev(self.bdev_name, on_remove=self._bdev_removed, on_resize=self._bdev_resized)
        self.native = lib.blk_dev_new(ffi.cast("void *", self.desc.address), int(self.readonly), self._id,
                                      MAX_DISCARD_SECTORS)
        if self.native == ffi.NULL:
            raise MemoryError("cannot allocate the blk device")
        return NativeDevice(ops=int(ffi.cast("uintptr_t", lib.blk_device_ops())),
                            ctx=int(ffi.cast("uintptr_t", self.native)))

    def _bdev_resized(self, desc: BdevDescriptor) -> None:
        """The bdev grew or shrank: a running guest learns it via a config-change message."""
        if self.ctx is not None:
            self.ctx.notify_config_change()

    def _bdev_removed(self, desc: BdevDescriptor) -> None:
        """Hot-remove: new I/O fails at once, in-flight I/O drains, then we let go."""
        desc.close()
        notice(log, "Controller %s: bdev '%s' was removed; I/O to this controller now fails. "
                    "Delete it with vhost_delete_controller %s", desc.owner, desc.bdev.name, desc.owner)

    def device_features(self) -> int:
        f = (1 << F_SIZE_MAX) | (1 << F_SEG_MAX) | (1 << F_BLK_SIZE) | (1 << F_MQ)
        io = self.bdev.io_types
        if "flush" in io:
            f |= 1 << F_FLUSH
        if self.readonly:
            f |= 1 << F_RO
        else:
            if "unmap" in io:
                f |= 1 << F_DISCARD
            if "write_zeroes" in io:
                f |= 1 << F_WRITE_ZEROES
        return f

    def get_config(self) -> bytes:
        b = self.bdev
        sectors = 0 if self.removed else b.size_bytes // 512
        align = b.block_size // 512
        return CONFIG.pack(sectors, SIZE_MAX, SEG_MAX, 0, 0, 0, b.block_size, 0, 0, 0, 0,
                           1 if "flush" in b.io_types else 0, 0, self.num_queues,
                           MAX_DISCARD_SECTORS, 1, align, MAX_DISCARD_SECTORS, 1, 1)

    def set_config(self, offset: int, data: bytes) -> None:
        # Only `writeback` (offset 32) is writable, and only with CONFIG_WCE,
        # which we do not offer: the cache mode is fixed by the bdev.
        raise ValueError("the virtio-blk config space is read-only on this target")

    def stats(self) -> dict[str, int]:
        s = ffi.new("struct blk_dev_stats *")
        lib.blk_dev_get_stats(self.native, s)
        return {k: getattr(s, k) for k in ("reads", "writes", "flushes", "unmaps", "bytes_read",
                                           "bytes_written", "errors", "invalid", "unsupported",
                                           "removed_io")}

    def backend_specific(self) -> dict[str, Any]:
        return {"block": {"readonly": self.readonly, "bdev": None if self.removed else self.bdev.name,
                          "transport": "vhost_user_blk"}}

    def config_json(self) -> list[dict[str, Any]]:
        if self.removed or self.ctx is None:
            return []
        return [{"method": "vhost_create_blk_controller",
                 "params": {"ctrlr": self.ctx.name, "dev_name": self.bdev.name, "cpumask": self.ctx.cpumask,
                            "readonly": self.readonly, "packed_ring": self.packed_ring}}]

    def detach(self) -> None:
        if self.native != ffi.NULL:
            lib.blk_dev_free(self.native)
            self.native = ffi.NULL
