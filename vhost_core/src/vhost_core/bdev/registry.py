"""The daemon's bdevs by name: creation, claims by controllers, and removal."""

from __future__ import annotations

import errno
from collections.abc import Iterator

from vhost_core.bdev.interface import Bdev
from vhost_core.log import get_logger, notice
from vhost_core.rpc.registry import RpcError

log = get_logger("bdev")


class BdevRegistry:
    def __init__(self) -> None:
        self._bdevs: dict[str, Bdev] = {}

    def __iter__(self) -> Iterator[Bdev]:
        return iter(list(self._bdevs.values()))

    def __contains__(self, name: str) -> bool:
        return name in self._bdevs

    def add(self, bdev: Bdev) -> Bdev:
        """Register ``bdev`` (on refusal it is destructed and an RpcError raised)."""
        from vhost_core.native import abi_mismatch, bdev_ops_address

        why = abi_mismatch(f"bdev '{bdev.name}' (module {bdev.module})",
                           bdev_ops_address(bdev.native) if bdev.native else 0)
        if why is not None:
            bdev.destruct()
            log.error("%s", why)
            raise RpcError(-errno.EPROTO, why)
        if bdev.name in self._bdevs or any(bdev.name in b.aliases for b in self._bdevs.values()):
            bdev.destruct()
            raise RpcError(-errno.EEXIST, f"bdev name '{bdev.name}' is already taken: "
                                          f"pick another name or delete the existing bdev first")
        self._bdevs[bdev.name] = bdev
        return bdev

    def get(self, name: str) -> Bdev:
        bdev = self._bdevs.get(name)
        if bdev is None:
            for b in self._bdevs.values():
                if name in b.aliases:
                    return b
            known = ", ".join(sorted(self._bdevs)) or "none"
            raise RpcError(-errno.ENODEV, f"bdev '{name}' does not exist (existing bdevs: {known}); "
                                          f"create it first, e.g. bdev_malloc_create")
        return bdev

    def claim(self, name: str, owner: str) -> Bdev:
        bdev = self.get(name)
        if bdev.claimed_by is not None and bdev.claimed_by != owner:
            raise RpcError(-errno.EBUSY, f"bdev '{name}' is already claimed by controller "
                                         f"'{bdev.claimed_by}': a bdev serves one controller; "
                                         f"create another bdev or delete that controller")
        bdev.claimed_by = owner
        return bdev

    def release(self, bdev: Bdev, owner: str) -> None:
        if bdev.claimed_by == owner:
            bdev.claimed_by = None

    def delete(self, name: str, module: str | None = None) -> None:
        """Remove a bdev: whoever holds it is told first (hot-detach), then it is freed."""
        bdev = self.get(name)
        if module is not None and bdev.module != module:
            raise RpcError(-errno.EINVAL, f"bdev '{name}' is a {bdev.module} bdev, not {module}: "
                                          f"use bdev_{bdev.module}_delete")
        for cb in list(bdev.removal_callbacks):
            try:
                cb(bdev)
            except Exception:
                log.exception("bdev %s: a removal callback failed", name)
        bdev.removal_callbacks.clear()
        del self._bdevs[bdev.name]
        bdev.destruct()
        notice(log, "bdev %s deleted", name)
