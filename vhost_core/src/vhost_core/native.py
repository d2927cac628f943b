"""The core's native module (cffi, API mode) and small typed helpers around it."""

from __future__ import annotations

from vhost_core._vhost_native import ffi, lib  # noqa: F401  (built by setup.py)


def addr(ptr) -> int:
    """Integer address of a cdata pointer (how native objects cross plugin boundaries)."""
    return int(ffi.cast("uintptr_t", ptr))


def from_addr(ctype: str, address: int):
    """Reinterpret an integer address (from a plugin's own ffi) as a core cdata pointer."""
    return ffi.cast(ctype, address)
