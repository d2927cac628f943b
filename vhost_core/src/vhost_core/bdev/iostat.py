"""bdev I/O statistics in the shape of SPDK's ``bdev_get_iostat``.

Device types count what they complete per bdev in a ``struct vn_iostat``
(vhost_native.h) and hand it over as its 25 uint64 words; a device backend that
keeps such counters implements::

    def bdev_iostat(self) -> list[tuple[str, list[int]]]:
        '''(bdev name, words) for every bdev this device drives.'''

    def reset_iostat_maxmin(self, bdev_name: str) -> None:
        '''Forget the largest and smallest latency seen (bdev_reset_iostat).'''

The core sums the devices using a bdev and subtracts what ``bdev_reset_iostat``
set aside, so the native counters never need to be written from the control plane.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

#: Order of enum vn_stat_kind (that of enum vn_io_type).
KINDS = ("read", "write", "flush", "unmap", "write_zeroes")
WORDS = 5 * len(KINDS)
#: SPDK's field names per kind; flush and write_zeroes are ours (SPDK has no such fields).
_SPDK = {"read": ("bytes_read", "num_read_ops", "read"),
         "write": ("bytes_written", "num_write_ops", "write"),
         "unmap": ("bytes_unmapped", "num_unmap_ops", "unmap"),
         "write_zeroes": ("bytes_zeroed", "num_write_zeroes_ops", "write_zeroes"),
         "flush": (None, "num_flush_ops", "flush")}


def _zeros() -> list[int]:
    return [0] * len(KINDS)


@attrs.define
class IoStat:
    ops: list[int] = attrs.field(factory=_zeros)
    bytes: list[int] = attrs.field(factory=_zeros)
    ticks: list[int] = attrs.field(factory=_zeros)
    max_ticks: list[int] = attrs.field(factory=_zeros)
    min_ticks: list[int] = attrs.field(factory=_zeros)

    @classmethod
    def from_words(cls, words: Sequence[int]) -> IoStat:
        n = len(KINDS)
        if len(words) != WORDS:
            raise ValueError(f"struct vn_iostat is {WORDS} words, got {len(words)}")
        return cls(*(list(words[i * n:(i + 1) * n]) for i in range(5)))

    def add(self, other: IoStat) -> None:
        """Merge another device's counters for the same bdev."""
        for k in range(len(KINDS)):
            self.ops[k] += other.ops[k]
            self.bytes[k] += other.bytes[k]
            self.ticks[k] += other.ticks[k]
            self.max_ticks[k] = max(self.max_ticks[k], other.max_ticks[k])
            mins = [m for m in (self.min_ticks[k], other.min_ticks[k]) if m]
            self.min_ticks[k] = min(mins) if mins else 0

    def since(self, base: IoStat) -> IoStat:
        """Counters accumulated after ``base`` was taken (max/min are never subtracted)."""
        return IoStat([a - b for a, b in zip(self.ops, base.ops)],
                      [a - b for a, b in zip(self.bytes, base.bytes)],
                      [a - b for a, b in zip(self.ticks, base.ticks)],
                      list(self.max_ticks), list(self.min_ticks))

    def to_spdk(self, name: str) -> dict:
        out: dict = {"name": name}
        for k, kind in enumerate(KINDS):
            bytes_key, ops_key, _ = _SPDK[kind]
            if bytes_key:
                out[bytes_key] = self.bytes[k]
            out[ops_key] = self.ops[k]
        for k, kind in enumerate(KINDS):
            prefix = _SPDK[kind][2]
            out[f"{prefix}_latency_ticks"] = self.ticks[k]
            out[f"max_{prefix}_latency_ticks"] = self.max_ticks[k]
            out[f"min_{prefix}_latency_ticks"] = self.min_ticks[k]
        # SPDK's fields for I/O kinds a vhost target never issues.
        out.update({"bytes_copied": 0, "num_copy_ops": 0, "copy_latency_ticks": 0,
                    "max_copy_latency_ticks": 0, "min_copy_latency_ticks": 0})
        return out
