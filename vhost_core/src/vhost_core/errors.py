"""The errors of the daemon's own domain: bdevs, controllers, devices, plugins' modules.

Domain code raises :class:`VhostError` with an errno and a message that names the thing
and the fix ("bdev 'Malloc9' does not exist (existing bdevs: Malloc0); create it first").
It knows nothing of JSON-RPC: the RPC layer answers a VhostError as SPDK does, with the
negative errno as the error code and the message (``vhost_core.rpc.registry``).
"""

from __future__ import annotations

__all__ = ["VhostError"]


class VhostError(Exception):
    """What went wrong, as an errno (``errno.ENODEV``, positive) and a message for the user."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(message)
        self.errno = int(errno)
        self.message = str(message)

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"VhostError({self.errno}, {self.message!r})"
