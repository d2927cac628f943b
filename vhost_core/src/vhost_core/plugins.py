"""Plugin discovery (stevedore, over one entry-point group) and hook dispatch (pluggy).

Every plugin, built-in or third-party, is an entry point in ``vhost.plugins`` that
names one module.  Loading never fails the daemon: a plugin that cannot be imported,
implements a hook that is not in :mod:`vhost_core.hookspecs`, or is built for another
core API costs one clear log line, and the others load.

Selection:
- ``VHOST_PLUGINS=a,b`` loads only those plugins (allow-list);
- ``VHOST_DISABLE_PLUGINS=a,b`` or ``vhost --disable-plugin NAME`` blocks them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from importlib import metadata
from typing import Any

import attrs
import pluggy
import stevedore

from vhost_core import CORE_API_VERSION, hookspecs
from vhost_core.bdev.interface import BdevModuleRegistry
from vhost_core.commands import CommandRegistry
from vhost_core.device import DeviceTypeRegistry
from vhost_core.log import get_logger

ENTRY_POINT_GROUP = "vhost.plugins"
#: Entry points a plugin distribution declares for the RPC methods it serves (name: a method,
#: value: its plugin module), so that a daemon where it is installed but not loaded
#: (disabled, broken) can say which wheel serves a method.
PROVIDES_GROUP = "vhost.provides"
log = get_logger("plugins")


def provider_hint(dist: str) -> str:
    return f"It is provided by the {dist} plugin: pip install {dist}"


def _entry_points(group: str) -> list[Any]:
    eps = metadata.entry_points()
    if hasattr(eps, "select"):
        return list(eps.select(group=group))
    return list(eps.get(group, ()))  # type: ignore[attr-defined]  # Python 3.9


def provider_of(method: str) -> str | None:
    """The plugin distribution that serves RPC method ``method``: from the installed
    distributions' own declarations first, else from SPDK's method families
    (``rpc.spdk.DISTRIBUTIONS``); None when no plugin of ours serves it."""
    from vhost_core.rpc.spdk import DISTRIBUTIONS, family_match

    for ep in _entry_points(PROVIDES_GROUP):
        dist = getattr(ep, "dist", None)
        if ep.name == method and dist is not None:
            return dist.metadata["Name"]
    return family_match(DISTRIBUTIONS, method)


@attrs.frozen
class PluginInfo:
    """What ``vhost --list-plugins`` and ``framework_get_plugins`` show."""

    name: str
    distribution: str
    version: str
    module: str
    hooks: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "distribution": self.distribution, "version": self.version,
                "module": self.module, "hooks": list(self.hooks)}


class PluginManager:
    """The pluggy manager plus what was loaded; ``.hook`` dispatches."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.infos: list[PluginInfo] = []
        self.failed: dict[str, str] = {}

    @property
    def hook(self):
        return self.pm.hook

    def names(self) -> list[str]:
        return [i.name for i in self.infos]

    def register_module(self, name: str, module: Any, distribution: str = "", version: str = "") -> bool:
        supported = getattr(module, "VHOST_CORE_API", (1,))
        if CORE_API_VERSION not in tuple(supported):
            self._fail(name, f"plugin '{name}' ({distribution or module.__name__}) supports core API "
                             f"{tuple(supported)}, this vhost-core provides {CORE_API_VERSION}: "
                             f"install a matching version of {distribution or name}")
            return False
        try:
            self.pm.register(module, name=name)
            self.pm.check_pending()
        except (ValueError, pluggy.PluginValidationError) as exc:
            if self.pm.is_registered(module):
                self.pm.unregister(module)
            self._fail(name, f"plugin '{name}' was not loaded: {exc}")
            return False
        hooks = tuple(sorted(h.name for h in self.pm.get_hookcallers(module) or ()))
        self.infos.append(PluginInfo(name, distribution, version, module.__name__, hooks))
        return True

    def _fail(self, name: str, message: str) -> None:
        self.failed[name] = message
        log.error("%s", message)


@attrs.define
class Registrations:
    """What one plugin registered through its hooks."""

    bdev_modules: BdevModuleRegistry = attrs.Factory(BdevModuleRegistry)
    device_types: DeviceTypeRegistry = attrs.Factory(DeviceTypeRegistry)
    commands: CommandRegistry = attrs.Factory(CommandRegistry)


def collect(manager: PluginManager, plugin_name: str) -> Registrations:
    """Call ``plugin_name``'s registration hooks into fresh registries (ValueError or
    TypeError when one of them refuses what the plugin registers)."""
    module = manager.pm.get_plugin(plugin_name)
    out = Registrations()
    hooks = manager.pm.hook
    for caller, kwargs in ((hooks.vhost_register_bdev_modules, {"registry": out.bdev_modules}),
                           (hooks.vhost_register_device_types, {"registry": out.device_types}),
                           (hooks.vhost_register_commands, {"registry": out.commands})):
        for impl in caller.get_hookimpls():
            if impl.plugin is module:
                impl.function(*[kwargs[a] for a in impl.argnames])
    return out


def _selection(disabled: Iterable[str]) -> tuple[set[str] | None, set[str]]:
    allow = os.environ.get("VHOST_PLUGINS")
    allowed = {p.strip() for p in allow.split(",") if p.strip()} if allow else None
    blocked = {p.strip() for p in os.environ.get("VHOST_DISABLE_PLUGINS", "").split(",") if p.strip()}
    blocked.update(disabled)
    return allowed, blocked


def load_plugins(disabled: Iterable[str] = (), modules: dict[str, Any] | None = None) -> PluginManager:
    """Find, filter and register every plugin of the ``vhost.plugins`` group; or, with
    ``modules`` (name -> plugin module), exactly those (an in-process daemon in a test)."""
    manager = PluginManager()
    if modules is not None:
        for name, module in modules.items():
            manager.register_module(name, module)
        return manager
    allowed, blocked = _selection(disabled)

    def on_load_failure(_mgr, ep, exc):
        manager._fail(ep.name, f"plugin '{ep.name}' failed to import ({ep.value}): "
                               f"{type(exc).__name__}: {exc}; the daemon continues without it")

    def check(ext) -> bool:
        if ext.name in blocked:
            return False
        return allowed is None or ext.name in allowed

    ext_mgr = stevedore.EnabledExtensionManager(
        ENTRY_POINT_GROUP, check_func=check, invoke_on_load=False,
        on_load_failure_callback=on_load_failure)
    seen: set[str] = set()
    for ext in sorted(ext_mgr.extensions, key=lambda e: e.name):
        if ext.name in seen:
            manager._fail(ext.name, f"plugin name '{ext.name}' is registered twice "
                                    f"(second one: {ext.entry_point.value}); the second is ignored")
            continue
        seen.add(ext.name)
        dist, version = _distribution_of(ext.entry_point)
        manager.register_module(ext.name, ext.plugin, dist, version)
    return manager


def _distribution_of(ep) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is not None:
        return dist.metadata["Name"], dist.version
    try:  # older importlib without EntryPoint.dist
        for d in metadata.distributions():
            for e in d.entry_points:
                if e.group == ENTRY_POINT_GROUP and e.name == ep.name:
                    return d.metadata["Name"], d.version
    except Exception:  # pragma: no cover
        pass
    return "", ""
