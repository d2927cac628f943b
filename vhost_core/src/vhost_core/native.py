"""The core's native module (cffi, API mode) and small typed helpers around it."""

from __future__ import annotations

from vhost_core._vhost_native import ffi, lib  # noqa: F401  (built by setup.py)

#: VN_ABI_VERSION of include/vhost_core/vhost_native.h, as this core was compiled with it:
#: the version a plugin's native tables must carry.
NATIVE_ABI_VERSION: int = lib.VN_ABI_VERSION


def addr(ptr) -> int:
    """Integer address of a cdata pointer (how native objects cross plugin boundaries)."""
    return int(ffi.cast("uintptr_t", ptr))


def from_addr(ctype: str, address: int):
    """Reinterpret an integer address (from a plugin's own ffi) as a core cdata pointer."""
    return ffi.cast(ctype, address)


def ops_abi_version(ops_address: int) -> int:
    """``abi_version``, the first member of a plugin's ``vn_device_ops``/``vn_bdev_ops`` table."""
    return int(ffi.cast("uint32_t *", ops_address)[0])


def bdev_ops_address(vn_bdev_address: int) -> int:
    """The ``ops`` pointer, first member of a ``struct vn_bdev``."""
    return int(ffi.cast("uintptr_t *", vn_bdev_address)[0])


def abi_mismatch(what: str, ops_address: int) -> str | None:
    """Why a native table cannot be used by this core, or None when it can.

    ``what`` names the table's owner in the message ("bdev 'Malloc0' (module malloc)").
    """
    if not ops_address:
        return f"{what} has no native I/O table (NULL ops)"
    version = ops_abi_version(ops_address)
    if version != NATIVE_ABI_VERSION:
        return (f"{what} was refused: its native table was built for vhost-core native ABI {version}, "
                f"this vhost-core provides ABI {NATIVE_ABI_VERSION}: rebuild and reinstall that plugin "
                f"against this vhost-core, or install the vhost-core version it was built for")
    return None
