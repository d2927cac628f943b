"""The virtio-blk device type: features, config space, and the native request table."""

from __future__ import annotations

import struct
import time
from typing import Any

from vhost_core.bdev.interface import Bdev
from vhost_core.bdev.iostat import WORDS as IOSTAT_WORDS, IoStat
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
REMOVE_TIMEOUT_S = 30

# capacity, size_max, seg_max, geometry(c,h,s), blk_size, topology(exp, align, min_io, opt_io),
# writeback, unused0, num_queues, max_discard_sectors, max_discard_seg,
# discard_sector_alignment, max_write_zeroes_sectors, max_write_zeroes_seg,
# write_zeroes_may_unmap, unused1[3]
CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3x")
assert CONFIG.size == 60


class BlkDevice:
    """One vhost-blk controller's device half (implements DeviceBackend)."""

    device_type = "blk"

    def __init__(self, app, ctrlr_name: str, bdev: Bdev, readonly: bool, num_queues: int = MAX_QUEUES) -> None:
        self.app = app
        self.ctrlr_name = ctrlr_name
        self.bdev = bdev
        self.readonly = readonly or bdev.readonly
        self.num_queues = num_queues
        self.removed = False
        # GET_ID: the bdev name, as SPDK answers (20 bytes, NUL-padded).
        self._id = ffi.new("char[]", bdev.name.encode()[:20])
        self.native = lib.blk_dev_new(ffi.cast("void *", bdev.native), int(self.readonly), self._id,
                                      MAX_DISCARD_SECTORS)
        if self.native == ffi.NULL:
            raise MemoryError("cannot allocate the blk device")
        self.native_ops = int(ffi.cast("uintptr_t", lib.blk_device_ops()))
        self.native_ctx = int(ffi.cast("uintptr_t", self.native))
        bdev.removal_callbacks.append(self.on_bdev_removed)
        bdev.resize_callbacks.append(self.on_bdev_resized)

    def on_bdev_resized(self, bdev: Bdev) -> None:
        """The bdev grew or shrank: a running guest learns it via a config-change message."""
        ctrlr = self.app.controllers.get(self.ctrlr_name)
        session = ctrlr.session if ctrlr is not None and ctrlr.backend is self else None
        if session is not None:
            session.notify_config_change()

    def on_bdev_removed(self, bdev: Bdev) -> None:
        """Hot-remove: new I/O fails at once, in-flight I/O drains, then we let go."""
        ctrlr = self.app.controllers.get(self.ctrlr_name)
        fn = int(ffi.cast("uintptr_t", lib.blk_dev_remove_bdev_ptr()))
        deadline = time.monotonic() + REMOVE_TIMEOUT_S
        while ctrlr is not None and ctrlr.backend is self:
            left = ctrlr.reactor.exec_native(fn, self.native_ctx)
            if left == 0:
                break
            if time.monotonic() > deadline:
                log.error("Controller %s: %d I/O still outstanding on removed bdev '%s'",
                          self.ctrlr_name, left, bdev.name)
                break
            time.sleep(0.001)
        self._retire_iostat()
        self.removed = True
        self.app.bdevs.release(bdev, self.ctrlr_name)
        notice(log, "Controller %s: bdev '%s' was removed; I/O to this controller now fails. "
                    "Delete it with vhost_delete_controller %s", self.ctrlr_name, bdev.name, self.ctrlr_name)

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

    def features_negotiated(self, features: int) -> None:
        pass

    def stats(self) -> dict[str, int]:
        s = ffi.new("struct blk_dev_stats *")
        lib.blk_dev_get_stats(self.native, s)
        return {k: getattr(s, k) for k in ("reads", "writes", "flushes", "unmaps", "bytes_read",
                                           "bytes_written", "errors", "invalid", "unsupported",
                                           "removed_io")}

    def _iostat_words(self) -> list[int]:
        words = ffi.new("uint64_t[]", IOSTAT_WORDS)
        lib.blk_dev_get_iostat(self.native, words)
        return list(words)

    def bdev_iostat(self) -> list[tuple[str, list[int]]]:
        """bdev_get_iostat: what this controller completed on its bdev."""
        if self.removed or self.native == ffi.NULL:
            return []
        return [(self.bdev.name, self._iostat_words())]

    def reset_iostat_maxmin(self, bdev_name: str) -> None:
        if not self.removed and self.native != ffi.NULL and bdev_name == self.bdev.name:
            lib.blk_dev_reset_iostat_maxmin(self.native)

    def _retire_iostat(self) -> None:
        """Letting go of the bdev: its totals stay with it (bdev_get_iostat)."""
        if self.native != ffi.NULL:
            self.bdev.iostat_retired.add(IoStat.from_words(self._iostat_words()))

    def backend_specific(self) -> dict[str, Any]:
        return {"block": {"readonly": self.readonly, "bdev": None if self.removed else self.bdev.name,
                          "transport": "vhost_user_blk"}}

    def close(self) -> None:
        if self.on_bdev_removed in self.bdev.removal_callbacks:
            self.bdev.removal_callbacks.remove(self.on_bdev_removed)
        if self.on_bdev_resized in self.bdev.resize_callbacks:
            self.bdev.resize_callbacks.remove(self.on_bdev_resized)
        if not self.removed:
            self._retire_iostat()
            self.app.bdevs.release(self.bdev, self.ctrlr_name)
        if self.native != ffi.NULL:
            lib.blk_dev_free(self.native)
            self.native = ffi.NULL
