"""The small interface a device type (blk, scsi, ...) implements for the core.

The core owns the vhost-user session (features, memory, rings) and the native
virtqueues; a device type supplies what differs per device: feature bits, config
space, and the native ``vn_device_ops`` table that turns descriptor chains into
bdev I/O.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class DeviceBackend(Protocol):
    """What a controller needs from its device type.

    Required attributes:
      ``device_type``: short name shown in logs/RPC (``"blk"``, ``"scsi"``).
      ``num_queues``: the most request queues served (GET_QUEUE_NUM answers this).
      ``native_ops``: address of the plugin's ``struct vn_device_ops``.
      ``native_ctx``: address of the device's C context passed to every callback.
    """

    device_type: str
    num_queues: int
    native_ops: int
    native_ctx: int

    def device_features(self) -> int:
        """virtio device feature bits offered (the core adds VERSION_1, ring features)."""

    def get_config(self) -> bytes:
        """The device config space as the driver reads it (GET_CONFIG)."""

    def set_config(self, offset: int, data: bytes) -> None:
        """Driver wrote config space; raise ValueError to refuse."""

    def features_negotiated(self, features: int) -> None:
        """The driver acknowledged ``features`` (SET_FEATURES). Optional work."""

    # Optional (looked up with getattr; absent means nothing to do):
    #
    # def queue_stopping(self, index: int) -> None:
    #     """Virtqueue ``index`` stops and fetches nothing new, but requests are still
    #     in flight: complete those the device holds indefinitely (virtio-scsi event
    #     buffers) so that the queue drains.  Runs on the control plane; reach the
    #     data path through ``Reactor.exec_native``."""
    #
    # def bdev_iostat(self) -> list[tuple[str, list[int]]]:
    #     """(bdev name, struct vn_iostat as 25 words) for each bdev the device drives
    #     (bdev_get_iostat; see vhost_core.bdev.iostat).  A device that lets go of a
    #     bdev folds its counts into ``bdev.iostat_retired``."""
    #
    # def reset_iostat_maxmin(self, bdev_name: str) -> None:
    #     """Forget the largest and smallest latency seen on that bdev."""

    def backend_specific(self) -> dict[str, Any]:
        """The ``backend_specific`` object of ``vhost_get_controllers``."""

    def close(self) -> None:
        """Free native state; all queues are stopped and the device left its reactor."""
