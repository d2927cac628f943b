"""The device contract: what a device type (virtio-blk, virtio-scsi, ...) implements.

A *device* is the half of a vhost controller that differs per device type: feature
bits, config space, and the native ``struct vn_device_ops`` table that turns
descriptor chains into bdev I/O (``include/vhost_core/vhost_native.h``).  The core
owns everything else: the vhost-user session (features, memory, rings), the native
virtqueues, the reactor, and the bdev descriptors the device opens.

Lifecycle, all on the control plane under the daemon's control lock:

1. A plugin's RPC makes a :class:`Device` (plain Python state) and hands it to the
   core (``ctx.controllers.create(name, device, cpumask)``).
2. The core places the controller on a reactor and calls :meth:`Device.attach` with
   a :class:`DeviceContext`: the device opens its bdevs there
   (:meth:`DeviceContext.open_bdev`), makes its native state and returns its
   :class:`NativeDevice`.
3. Front-ends come and go; the core calls the feature/config methods below.
4. On deletion the core stops the queues, takes the device off its reactor, calls
   :meth:`Device.detach` and closes the descriptors the device left open.

A device sees the daemon only through its context: if it needs more, the contract
grows, documented, here.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, Callable, ClassVar

import attrs

from vhost_core.bdev.registry import BdevDescriptor, BdevRegistry, Callback
from vhost_core.log import get_logger

log = get_logger("vhost")

#: How long :meth:`DeviceContext.drain` waits by default.
DRAIN_TIMEOUT_S = 30.0
DRAIN_POLL_S = 0.001


@attrs.frozen
class DeviceType:
    """A device type as the core needs to know it (``vhost_register_device_types``)."""

    #: ``Device.device_type`` of its devices ("blk").
    name: str
    #: The SPDK subsystem ``save_config`` files its controllers under ("vhost_blk").
    subsystem: str
    #: The QEMU device that drives it ("vhost-user-blk-pci") and that device's property
    #: for the number of request queues ("num-queues"): the command line a user is shown.
    qemu_device: str
    qemu_queues_property: str

    def qemu_args(self, chardev_id: str, num_queues: int) -> str:
        return f"-device {self.qemu_device},chardev={chardev_id},{self.qemu_queues_property}={num_queues}"


class DeviceTypeRegistry:
    """The registered device types, by name."""

    def __init__(self) -> None:
        self._types: dict[str, DeviceType] = {}

    def add(self, device_type: DeviceType) -> DeviceType:
        if not isinstance(device_type, DeviceType):
            raise TypeError(f"device type {device_type!r} is not a vhost_core.device.DeviceType")
        if device_type.name in self._types:
            raise ValueError(f"device type '{device_type.name}' is already registered")
        self._types[device_type.name] = device_type
        return device_type

    def remove(self, name: str) -> None:
        self._types.pop(name, None)

    def get(self, name: str) -> DeviceType | None:
        return self._types.get(name)

    def __iter__(self) -> Iterator[DeviceType]:
        return iter(list(self._types.values()))


@attrs.frozen
class NativeDevice:
    """What :meth:`Device.attach` returns: the device's native table and context."""

    #: Address of the plugin's ``struct vn_device_ops`` (``abi_version`` first).
    ops: int
    #: Address passed to every callback of the table (the device's C state).
    ctx: int


class DeviceContext:
    """What a device may use of the daemon, handed to :meth:`Device.attach`.

    ``name``: the controller's name; ``cpumask``: its cpumask (``"0x1"``);
    ``reactor``: the reactor it runs on (``reactor.core``; :meth:`run` reaches the
    device's C half on that thread).
    """

    def __init__(self, name: str, cpumask: str, reactor: Any, bdevs: BdevRegistry,
                 wait_unlocked: Callable[[float], Any] = time.sleep,
                 notify_config_change: Callable[[], bool] = lambda: False) -> None:
        self.name = name
        self.cpumask = cpumask
        self.reactor = reactor
        self._bdevs = bdevs
        self._wait_unlocked = wait_unlocked
        self._notify = notify_config_change
        self._descriptors: list[BdevDescriptor] = []
        self._draining = 0

    def open_bdev(self, name: str, *, on_remove: Callback | None = None,
                  on_resize: Callback | None = None) -> BdevDescriptor:
        """Open bdev ``name`` on this controller's reactor (see :meth:`BdevRegistry.open`):
        shared, not claimed, so other controllers may open it too, as in SPDK.
        ``desc.address`` is what the device's C half submits through.  Descriptors still
        open after :meth:`Device.detach` are closed by the core."""
        desc = self._bdevs.open(name, self.name, reactor=self.reactor, on_remove=on_remove,
                                on_resize=on_resize)
        self._descriptors = [d for d in self._descriptors if not d.closed] + [desc]
        return desc

    def run(self, fn: int, arg: int) -> int:
        """Run the device's native ``int fn(void *arg)`` (both addresses) on its reactor's
        thread and wait for its result: how the control plane changes the device's C
        state without racing the data path."""
        return self.reactor.run(fn, arg)

    def drain(self, pending: Callable[[], int], what: str, timeout_s: float = DRAIN_TIMEOUT_S) -> int:
        """Wait until ``pending()`` returns 0, with the control lock released meanwhile
        (a stuck backend holds up only this device).  Returns what was still pending at
        the deadline (0: drained); logs it, naming ``what``."""
        deadline = time.monotonic() + timeout_s
        self._draining += 1
        try:
            left = pending()
            while left > 0 and time.monotonic() < deadline:
                self._wait_unlocked(DRAIN_POLL_S)
                left = pending()
        finally:
            self._draining -= 1
        if left > 0:
            log.error("Controller %s: %d %s after %d s; letting go anyway", self.name, left, what, timeout_s)
        return left

    def notify_config_change(self) -> bool:
        """Tell a connected front-end that config space changed (a resized disk);
        False when no front-end is connected or it gave no back-end channel."""
        return self._notify()

    def release(self, device: Device) -> None:
        """The core's, once the device left its reactor: wait for drains in progress
        (another thread may be in one, with the lock released), detach the device, and
        close the descriptors it left open."""
        while self._draining:
            self._wait_unlocked(DRAIN_POLL_S)
        try:
            device.detach()
        finally:
            for desc in self._descriptors:
                desc.close()
            self._descriptors.clear()


class Device:
    """Base class of a controller's device half.  Subclasses set ``device_type`` and
    implement :meth:`attach`, :meth:`device_features` and :meth:`get_config`; every other
    method has the default documented on it."""

    #: Short name shown in logs and RPC results, and the key of its DeviceType ("blk").
    device_type: ClassVar[str] = ""
    #: The most virtqueues served (GET_QUEUE_NUM answers this).
    num_queues: int = 1
    #: Offer VIRTIO_F_RING_PACKED (the core serves split and packed rings alike; the
    #: front-end chooses: QEMU negotiates packed only with the device's packed=on).
    packed_ring: bool = True

    def attach(self, ctx: DeviceContext) -> NativeDevice:
        """The controller was placed on ``ctx.reactor``: open bdevs, make the native
        state, return its table.  Raising here fails the controller's creation (after
        :meth:`detach` and the closing of what was opened)."""
        raise NotImplementedError

    def detach(self) -> None:
        """The device left its reactor (every queue stopped, no request in flight):
        free native state.  Default: nothing.  Open descriptors are closed after it."""

    def device_features(self) -> int:
        """virtio device feature bits offered (the core adds VERSION_1 and ring features)."""
        raise NotImplementedError

    def get_config(self) -> bytes:
        """The device config space as the driver reads it (GET_CONFIG)."""
        raise NotImplementedError

    def set_config(self, offset: int, data: bytes) -> None:
        """The driver wrote config space.  Default: refused (ValueError), config is read-only."""
        raise ValueError(f"the virtio-{self.device_type} config space is read-only on this target")

    def features_negotiated(self, features: int) -> None:
        """The driver acknowledged ``features`` (SET_FEATURES).  Default: nothing."""

    def queue_stopping(self, index: int) -> None:
        """Virtqueue ``index`` fetches nothing new, but requests are still in flight:
        complete those the device holds indefinitely (virtio-scsi event buffers) so
        that the queue drains.  Default: nothing."""

    def delete_refused(self) -> str | None:
        """Why ``vhost_delete_controller`` must refuse this controller now (EBUSY), worded
        as the fix (SPDK refuses a vhost-scsi controller that still has targets); None
        (the default): it may be deleted.  Daemon shutdown deletes regardless."""
        return None

    def backend_specific(self) -> dict[str, Any]:
        """The ``backend_specific`` object of ``vhost_get_controllers``.  Default: {}."""
        return {}

    def config_json(self) -> list[dict[str, Any]]:
        """The RPC calls that recreate this controller (``save_config``), in order.
        Default: none."""
        return []
