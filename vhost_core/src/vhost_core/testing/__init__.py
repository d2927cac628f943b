"""Test helpers for vhost-user backends: a fake frontend (the QEMU side).

Public API (all re-exported here):

* :class:`GuestMemory` -- memfd-backed guest RAM with GPA regions, allocator,
  ``read``/``write``, frontend user addresses (:mod:`.memory`).
* :class:`SplitVirtqueue` -- driver side of a virtio 1.x split ring, EVENT_IDX,
  INDIRECT, raw accessors for hostile tests (:mod:`.virtqueue`).
* :class:`VhostUserFrontend` -- raw and typed vhost-user messages, REPLY_ACK;
  :func:`handshake` / :class:`VirtioDevice` -- QEMU's handshake and the common half
  of a driver for any device type (:mod:`.frontend`).
* :func:`connect_blk` / :class:`VirtioBlkDevice` -- the virtio-blk driver
  (``read/write/flush/get_id/discard/write_zeroes/submit``, :mod:`.blk`).  The
  virtio-scsi driver ships with its plugin: ``vhost_dev_scsi.testing``.
* Wire constants in :mod:`.constants` (independent of the backend's copy).
* Conformance suites every plugin runs unchanged: :mod:`.conformance.bdev`
  (bdev backends) and :mod:`.conformance.device` (device types).
* Pytest fixtures in :mod:`.pytest_plugin` (``guest_memory``,
  ``vhost_frontend_factory``, ``vhost_blk_factory``); enable with
  ``pytest_plugins = ["vhost_core.testing.pytest_plugin"]`` in a root
  conftest or ``-p vhost_core.testing.pytest_plugin``.

Nothing here imports the backend, so tests stay an independent check of it.
"""

from . import constants
from .constants import *  # noqa: F401,F403
from .blk import (
    DEFAULT_BLK_FEATURES,
    BlkIOError,
    BlkRequest,
    BlkResult,
    VirtioBlkConfig,
    VirtioBlkDevice,
    connect_blk,
)
from .frontend import (
    FRONTEND_PROTOCOL_FEATURES,
    ConnectionClosed,
    Handshake,
    Message,
    VhostUserError,
    VhostUserFrontend,
    VhostUserNack,
    VhostUserProtocolError,
    VirtioDevice,
    handshake,
)
from .memory import GuestMemory, GuestMemoryError, MemoryRegion
from .virtqueue import PackedVirtqueue, SplitVirtqueue, UsedElem, VirtqueueError, vring_need_event

__all__ = [
    "constants",
    "GuestMemory",
    "GuestMemoryError",
    "MemoryRegion",
    "SplitVirtqueue",
    "PackedVirtqueue",
    "UsedElem",
    "VirtqueueError",
    "vring_need_event",
    "VhostUserFrontend",
    "Message",
    "VhostUserError",
    "VhostUserProtocolError",
    "VhostUserNack",
    "ConnectionClosed",
    "Handshake",
    "VirtioDevice",
    "handshake",
    "VirtioBlkConfig",
    "VirtioBlkDevice",
    "BlkRequest",
    "BlkResult",
    "BlkIOError",
    "connect_blk",
    "DEFAULT_BLK_FEATURES",
    "FRONTEND_PROTOCOL_FEATURES",
] + list(constants.__all__)
