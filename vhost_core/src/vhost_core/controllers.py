"""The daemon's controllers by name, and the one way to make one from a device."""

from __future__ import annotations

import errno
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, TypeVar

from vhost_core.errors import VhostError
from vhost_core.controller import Controller
from vhost_core.device import Device, DeviceContext
from vhost_core.log import get_logger, notice
from vhost_core.reactor import format_mask, parse_cpumask

if TYPE_CHECKING:  # pragma: no cover
    from vhost_core.app import App

log = get_logger("app")

CONTROLLER_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
D = TypeVar("D", bound=Device)


class ControllerRegistry:
    """Iterating gives the controllers; ``name in controllers`` tests a name."""

    def __init__(self, app: App) -> None:
        self._app = app
        self._ctrlrs: dict[str, Controller] = {}

    def __iter__(self) -> Iterator[Controller]:
        return iter(list(self._ctrlrs.values()))

    def __contains__(self, name: object) -> bool:
        return name in self._ctrlrs

    def __len__(self) -> int:
        return len(self._ctrlrs)

    def names(self) -> list[str]:
        return sorted(self._ctrlrs)

    def find(self, name: str) -> Controller | None:
        return self._ctrlrs.get(name)

    def get(self, name: str) -> Controller:
        ctrlr = self._ctrlrs.get(name)
        if ctrlr is None:
            known = ", ".join(sorted(self._ctrlrs)) or "none"
            raise VhostError(errno.ENODEV, f"controller '{name}' does not exist (existing controllers: "
                                          f"{known}); see vhost_get_controllers")
        return ctrlr

    def device(self, name: str, device_class: type[D] = Device) -> D:  # type: ignore[assignment]
        """The device of controller ``name``, which must be a ``device_class``."""
        device = self.get(name).device
        if not isinstance(device, device_class):
            raise VhostError(errno.EINVAL, f"controller '{name}' is a vhost-{device.device_type} controller, "
                                          f"not vhost-{device_class.device_type}")
        return device

    def create(self, name: str, device: Device, cpumask: str | int | None = None,
               listen: bool = True) -> Controller:
        """Create a controller: validate, place on a reactor, attach its device, listen.

        ``listen=False`` leaves the socket closed until :meth:`listen` (SPDK's
        ``vhost_create_scsi_controller --delay``)."""
        app = self._app
        if not CONTROLLER_NAME.match(name or ""):
            raise VhostError(errno.EINVAL, f"controller name '{name}' is invalid: use 1-64 letters, "
                                          f"digits, '.', '_', ':' or '-' (it becomes the socket file name)")
        if name in self._ctrlrs:
            raise VhostError(errno.EEXIST, f"controller '{name}' already exists: pick another name or "
                                          f"vhost_delete_controller {name} first")
        try:
            mask = None if cpumask is None else parse_cpumask(cpumask)
            reactor = app.reactors.place(mask)
        except ValueError as exc:
            raise VhostError(errno.EINVAL, f"controller {name}: {exc}") from None
        mask = mask if mask is not None else app.reactors.mask

        def notify() -> bool:
            ctrlr = self._ctrlrs.get(name)
            return ctrlr is not None and ctrlr.session is not None and ctrlr.session.notify_config_change()

        ctx = DeviceContext(name, format_mask(mask), reactor, app.bdevs, app.wait_unlocked, notify)
        try:
            native = device.attach(ctx)
            ctrlr = Controller(app, name, device, ctx, reactor, mask, native)
        except BaseException:
            ctx.release(device)
            raise
        try:
            if listen:
                ctrlr.listen()
        except BaseException:
            ctrlr.close()
            raise
        reactor.controllers.add(name)
        self._ctrlrs[name] = ctrlr
        notice(log, "Controller %s: new controller added", name)
        return ctrlr

    def listen(self, name: str) -> None:
        """Open the socket of a controller created with ``listen=False``."""
        self.get(name).listen()

    def delete(self, name: str, force: bool = False) -> None:
        ctrlr = self.get(name)
        if ctrlr.session is not None and not force:
            raise VhostError(errno.EBUSY, f"controller '{name}' has a connected front-end (a running VM): "
                                         f"shut the VM down or unplug the device first, then delete it")
        why = None if force else ctrlr.device.delete_refused()
        if why is not None:
            log.error("Controller %s: not deleted: %s", name, why)
            raise VhostError(errno.EBUSY, f"controller '{name}' cannot be deleted: {why}")
        del self._ctrlrs[name]
        ctrlr.reactor.controllers.discard(name)
        ctrlr.close()
        notice(log, "Controller %s: removed", name)
