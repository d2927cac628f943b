"""The daemon's state: reactors, plugins and their registrations, bdevs, controllers,
the RPC method table, and its lifecycle (start, the SPDK RPC states, stop).

What plugins see of it is narrower: the registries their hooks get, a
CommandContext for their commands, a DeviceContext for their devices.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from typing import Any, Callable

import attrs

from vhost_core import commands, plugins
from vhost_core.bdev.interface import BdevModuleRegistry
from vhost_core.bdev.registry import BdevRegistry
from vhost_core.memory_registration import MemoryRegistry
from vhost_core.controllers import ControllerRegistry
from vhost_core.core_methods import CORE
from vhost_core.device import DeviceTypeRegistry
from vhost_core.log import get_logger, notice
from vhost_core.reactor import Reactors
from vhost_core.rpc.json_config import JsonConfig
from vhost_core.rpc.registry import RpcRegistry, RpcState
from vhost_core.rpc.server import RpcServer
from vhost_core.rpc.spdk import IGNORED, NOT_YET, Ignored, ignored_params_class

log = get_logger("app")


class App:
    def __init__(self, socket_dir: str, cpumask: int, rpc_path: str, interrupt_mode: bool = False,
                 disabled_plugins: tuple[str, ...] = (), plugin_modules: dict[str, Any] | None = None) -> None:
        self.socket_dir = os.path.abspath(socket_dir)
        self.rpc_path = rpc_path
        self.lock = threading.RLock()
        #: For waits that must not hold up the control plane (a ring draining a slow or
        #: stuck backend): ``lock_cond.wait(t)`` releases ``lock`` meanwhile.
        self.lock_cond = threading.Condition(self.lock)
        self.reactors = Reactors(cpumask, interrupt_mode)
        self.bdevs = BdevRegistry()
        self.bdevs.wait_unlocked = self.wait_unlocked
        self.bdevs.lock = self.lock
        self.bdev_modules = BdevModuleRegistry()
        #: Guest memory mappings, told to DMA-capable backends (memory_registration.py).
        self.memory = MemoryRegistry()
        self.device_types = DeviceTypeRegistry()
        self.controllers = ControllerRegistry(self)
        self.rpc = RpcRegistry()
        self.rpc.lock = self.lock
        self.rpc.rpc_state = RpcState.STARTUP
        self.rpc.hint_resolver = self._missing_method_hint
        #: What a plugin's command handlers see of the daemon.
        self.command_context = commands.CommandContext(self.bdevs, self.controllers, self.bdev_modules,
                                                       self.memory)
        self.plugins = plugins.load_plugins(disabled_plugins, plugin_modules)
        self.rpc_server: RpcServer | None = None
        self._stopped = False
        #: The ``--json`` config whose RUNTIME part applies at framework_start_init.
        self.json_config: JsonConfig | None = None
        self.initialized = False
        #: framework_wait_init calls waiting for the RUNTIME state.
        self.init_waiters: list[asyncio.Future] = []
        self._after_init: list[Callable[[], None]] = []
        #: Set by the daemon's main loop: ends it with this exit code.
        self.exit: Callable[[int], None] = lambda rc: None

    def wait_unlocked(self, seconds: float) -> None:
        """Sleep with the control lock released (re-taken before returning), so that a
        wait for a slow backend holds up no RPC and no other controller."""
        try:
            self.lock_cond.wait(seconds)
        except RuntimeError:        # not under the lock: nothing to release
            time.sleep(seconds)

    # ------------------------------------------------------------ RPC

    def _register_ignored_methods(self) -> None:
        """SPDK's options that mean nothing here (iobuf, sock, ...): accepted, with a NOTICE."""
        for method, spec in IGNORED.items():
            if method not in self.rpc:
                self.rpc.add(method, self._ignored(method, spec), params=ignored_params_class(method, spec),
                             owner="vhost-core", states=spec.states)
        for method, why in NOT_YET.items():
            if method not in self.rpc:
                self.rpc.set_missing_hint(method, f"{why} in this target.")

    @staticmethod
    def _ignored(method: str, spec: Ignored) -> Callable[[Any], bool]:
        def ignore(p: Any) -> bool:
            given = {k: v for k, v in attrs.asdict(p).items() if v is not None}
            which = "".join(f" {k}={json.dumps(given.pop(k))}" for k in spec.required if k in given)
            shown = ", ".join(list(given)[:6]) + (f", ... ({len(given)} options)" if len(given) > 6 else "")
            notice(log, "%s%s: ignored%s: %s", method, which, f" {shown}" if shown else "", spec.why)
            return True

        ignore.__doc__ = f"Accepted and ignored: {spec.why}."
        return ignore

    def config_by_subsystem(self) -> dict[str, list[dict]]:
        """RPC calls that recreate the current state, by subsystem: the bdev modules'
        bdevs first, then each device type's controllers."""
        out: dict[str, list[dict]] = {"bdev": []}
        bdevs = list(self.bdevs)
        for module in self.bdev_modules:
            mine = [b for b in bdevs if b.module == module.name]
            out["bdev"].extend(_with_qos(module.config_json(mine), mine))
        for dtype in self.device_types:
            out.setdefault(dtype.subsystem, [])
        for ctrlr in self.controllers:
            dtype = self.device_types.get(ctrlr.device.device_type)
            if dtype is not None:
                out[dtype.subsystem].extend(ctrlr.config_json())
        return out

    def call(self, method: str, params: dict | None = None) -> Any:
        """Run one RPC in-process (``--json`` config, tests)."""
        with self.lock:
            return self.rpc.dispatch(method, params)

    def load_config(self, config: Any, source: str, ignore_errors: bool = False) -> None:
        """Apply the start-up part of an SPDK config now, the rest at :meth:`start_init`."""
        self.json_config = JsonConfig(self, config, source, ignore_errors)
        self.json_config.run(RpcState.STARTUP)
        if self.initialized:
            self.json_config.run(RpcState.RUNTIME)

    def apply_config(self, config: Any, source: str = "config") -> None:
        """Apply a whole config to a serving daemon (both passes)."""
        cfg = JsonConfig(self, config, source)
        cfg.run(RpcState.STARTUP)
        cfg.run(RpcState.RUNTIME)

    def start_init(self) -> None:
        """Serve every method (SPDK's RUNTIME state) and apply the rest of the ``--json`` config."""
        self.rpc.rpc_state = RpcState.RUNTIME
        if self.json_config is not None:
            self.json_config.run(RpcState.RUNTIME)
        self.initialized = True
        for fut in self.init_waiters:
            if not fut.done():
                fut.set_result(True)
        self.init_waiters.clear()
        for fn in self._after_init:
            fn()
        self._after_init.clear()

    def after_init(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once the daemon serves (now, if it does)."""
        if self.initialized:
            fn()
        else:
            self._after_init.append(fn)

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self.reactors.start()
        self.register_rpc_methods()

    def register_rpc_methods(self) -> None:
        """The core's methods, every plugin's registrations, then SPDK's options that mean
        nothing here."""
        commands.register(self.rpc, CORE, self, owner="vhost-core")
        for name in self.plugins.names():
            try:
                self._register_plugin(name)
            except (ValueError, TypeError) as exc:
                log.error("plugin '%s' could not register its bdev modules, device types and commands: %s; "
                          "none of them is available, the other plugins' are", name, exc)
        self._register_ignored_methods()

    def _register_plugin(self, name: str) -> None:
        """All or nothing: a plugin half registered would answer some of its RPCs with
        objects whose other half (delete, save_config, ...) is missing."""
        reg = plugins.collect(self.plugins, name)
        for module in reg.bdev_modules:
            if module.name in self.bdev_modules:
                raise ValueError(f"bdev module '{module.name}' is already registered")
        for dtype in reg.device_types:
            if self.device_types.get(dtype.name) is not None:
                raise ValueError(f"device type '{dtype.name}' is already registered")
        commands.register(self.rpc, reg.commands, self.command_context, owner=name)
        for module in reg.bdev_modules:
            self.bdev_modules.add(module)
        for dtype in reg.device_types:
            self.device_types.add(dtype)

    @staticmethod
    def _missing_method_hint(method: str) -> str | None:
        dist = plugins.provider_of(method)
        return plugins.provider_hint(dist) if dist is not None else None

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        with self.lock:
            for name in self.controllers.names():
                try:
                    self.controllers.delete(name, force=True)
                except Exception:
                    log.exception("Controller %s: error while stopping", name)
            for bdev in list(self.bdevs):
                try:
                    self.bdevs.delete(bdev.name)
                except Exception:
                    log.exception("bdev %s: error while deleting", bdev.name)
            for module in self.bdev_modules:
                try:
                    module.fini()
                except Exception:
                    log.exception("bdev module %s failed to stop", module.name)
            self.reactors.stop()


def _with_qos(calls: list[dict], bdevs: list) -> list[dict]:
    """``calls`` with each limited bdev's ``bdev_set_qos_limit`` right after the call that
    creates it, as SPDK writes them (non-zero limits only)."""
    limited = {b.name: b for b in bdevs if any(b.qos_limits.values())}
    out = []
    for call in calls:
        out.append(call)
        bdev = limited.pop(call.get("params", {}).get("name"), None)
        if bdev is not None:
            out.append(_qos_call(bdev))
    return out + [_qos_call(b) for b in limited.values()]


def _qos_call(bdev) -> dict:
    return {"method": "bdev_set_qos_limit",
            "params": {"name": bdev.name, **{k: v for k, v in bdev.qos_limits.items() if v}}}
