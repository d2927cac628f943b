"""A session's dirty log: the bitmap QEMU hands over for live migration.

While a VM migrates, QEMU copies guest RAM to the destination and then re-copies
every page that changed meanwhile; pages the vhost target writes (read data, status
bytes, used rings) change behind its back, so it asks the back-end to mark them in
a shared bitmap (``VHOST_F_LOG_ALL`` in SET_FEATURES, the bitmap in SET_LOG_BASE,
the used ring's guest-physical address in SET_VRING_ADDR with ``VHOST_VRING_F_LOG``).
The native data path marks the pages; this module maps the bitmap (checked against
its file, SIGBUS-guarded), hands it to the session's rings and replaces it when QEMU
resizes it (a memory hot-plug during migration).
"""

from __future__ import annotations

import errno
import os

from vhost_core.log import get_logger
from vhost_core.native import ffi, lib
from vhost_core.vhost_user import messages as m
from vhost_core.vhost_user.connection import Message

log = get_logger("vhost_user")

#: VhostUserLog: mmap_size, mmap_offset
LOG_PAYLOAD = m.VHOST_USER_LOG

_LOG_ERROR_HINTS = {
    "ERANGE": " (the log lies past the end of its file)",
    "EBADFD": " (not a regular file: QEMU sends a memfd)",
    "EINVAL": f" (its size must be 1 byte .. {lib.VN_LOG_MAX_BYTES >> 20} MiB)",
}


class DirtyLog:
    """The mapped bitmap (``native``: its ``struct vn_log``, or NULL)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.native = ffi.NULL
        self.size = 0

    @property
    def mapped(self) -> bool:
        return self.native != ffi.NULL

    def map(self, msg: Message) -> object:
        """Check SET_LOG_BASE and map its bitmap: the new ``vn_log``, not installed yet."""
        if len(msg.payload) != LOG_PAYLOAD.size:
            raise m.ProtocolError(f"SET_LOG_BASE payload is {len(msg.payload)} bytes, expected {LOG_PAYLOAD.size}")
        size, offset = LOG_PAYLOAD.unpack(msg.payload)
        if len(msg.fds) != 1:
            raise m.ProtocolError(f"SET_LOG_BASE carries {len(msg.fds)} file descriptors, expected 1 "
                                  f"(the log is shared memory: VHOST_USER_PROTOCOL_F_LOG_SHMFD)")
        err = ffi.new("int *")
        new = lib.vn_log_new(msg.fds[0], size, offset, err)
        if new == ffi.NULL:
            name = os.strerror(-err[0])
            hint = _LOG_ERROR_HINTS.get(errno.errorcode.get(-err[0], ""), "")
            raise m.ProtocolError(f"cannot map the dirty log (size {size:#x}, offset {offset:#x}): {name}{hint}")
        log.debug("Controller %s: dirty log of %d bytes (%d MiB of guest memory)", self.name, size,
                  size * 8 * lib.VN_LOG_PAGE >> 20)
        return new

    def install(self, new: object, size: int) -> object:
        """Make ``new`` the log; returns the previous one, to be freed once no ring uses it."""
        old, self.native, self.size = self.native, new, size
        return old

    def check(self) -> None:
        """ProtocolError once the log's file was shrunk under the mapping (SIGBUS)."""
        if self.mapped and lib.vn_log_faulted(self.native):
            raise m.ProtocolError("the dirty log lost its backing pages (the front-end shrank its file)")

    def missed(self) -> int:
        return int(lib.vn_log_missed(self.native)) if self.mapped else 0

    def free(self) -> None:
        lib.vn_log_free(self.install(ffi.NULL, 0))
