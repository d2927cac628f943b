"""The ``vhost`` daemon: reactors, plugins, the RPC server and the controllers.

Start-up order: plugins load (a broken one costs a log line), reactors start,
plugins register their RPCs (the RPC state is SPDK's STARTUP), the RPC socket
listens, the start-up part of a ``--json`` config applies; then, at once or on
``framework_start_init`` with ``--wait-for-rpc``, the daemon serves (RUNTIME) and
the rest of the config applies.
SIGINT/SIGTERM (or ``spdk_kill_instance``): stop taking RPCs, stop every controller
(no new requests are fetched, in-flight ones drain), delete bdevs, stop reactors,
remove sockets, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Literal

import attrs

from vhost_core import __version__, commands, plugins
from vhost_core.bdev.iostat import IoStat
from vhost_core.bdev.interface import Bdev, BdevModuleRegistry
from vhost_core.bdev.registry import BdevRegistry
from vhost_core import log as logs
from vhost_core.controller import Controller
from vhost_core.controllers import ControllerRegistry
from vhost_core.device import DeviceTypeRegistry
from vhost_core.log import get_logger, notice, setup as setup_logging
from vhost_core.native import lib
from vhost_core.reactor import Reactors, format_mask, parse_cpumask
from vhost_core.rpc.json_config import ConfigError, JsonConfig
from vhost_core.rpc.registry import INVALID_PARAMS, RpcError, RpcRegistry, RpcState, unsupported
from vhost_core.rpc.server import RpcServer
from vhost_core.rpc.spdk import IGNORED, NOT_YET, Ignored, ignored_params_class

log = get_logger("app")

DEFAULT_RPC_SOCKET = "/var/tmp/spdk.sock"

#: What ``vhost --default-config`` creates: the README's quick start.
DEFAULT_CONFIG = {
    "subsystems": [
        {"subsystem": "bdev", "config": [
            {"method": "bdev_malloc_create",
             "params": {"name": "Malloc0", "num_blocks": 131072, "block_size": 512}}]},
        {"subsystem": "vhost_blk", "config": [
            {"method": "vhost_create_blk_controller",
             "params": {"ctrlr": "vhost.0", "dev_name": "Malloc0"}}]},
    ]
}


_BOTH = RpcState.STARTUP | RpcState.RUNTIME

#: spdk_kill_instance: SPDK's signals (by name or number) and, when refused here, why.
KILL_SIGNALS: dict[str, tuple[int, str | None]] = {
    "SIGINT": (signal.SIGINT, None),        # the clean shutdown, as Ctrl-C
    "SIGTERM": (signal.SIGTERM, None),      # the clean shutdown
    "SIGKILL": (signal.SIGKILL, None),      # a crash: guests' vhost-blk requests survive it
    "SIGQUIT": (signal.SIGQUIT, "it would dump core; use SIGINT or SIGTERM to stop the target"),
    "SIGHUP": (signal.SIGHUP, "it would kill the target without draining; use SIGINT or SIGTERM"),
    "SIGUSR1": (signal.SIGUSR1, "it would kill the target without draining; use SIGINT or SIGTERM"),
}


@attrs.frozen
class CtrlrParams:
    ctrlr: str


@attrs.frozen
class NameParams:
    name: str


@attrs.frozen
class GetControllersParams:
    name: str | None = None


@attrs.frozen
class GetBdevsParams:
    name: str | None = None
    timeout: int | None = None              # with name: milliseconds to wait for it to appear


@attrs.frozen
class NameOptParams:
    name: str | None = None


@attrs.frozen
class GetIostatParams:
    name: str | None = None                 # older rpc.py: -b NAME
    names: list[str] | None = None          # newer rpc.py: --names a,b
    per_channel: bool = unsupported(False, "it keeps per-bdev totals, not per-channel ones: omit -c")
    reset_mode: Literal["all", "maxmin", "error", "none"] | None = None


@attrs.frozen
class ResetIostatParams:
    name: str | None = None
    mode: Literal["all", "maxmin", "error", "none"] = "all"


@attrs.frozen
class GetConfigParams:
    name: str
    with_batches: bool = False              # nothing here is batched: the same list either way


@attrs.frozen
class KillParams:
    sig_name: str


@attrs.frozen
class LevelParams:
    level: str


@attrs.frozen
class FlagParams:
    flag: str


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
        self.bdev_modules = BdevModuleRegistry()
        self.device_types = DeviceTypeRegistry()
        self.controllers = ControllerRegistry(self)
        self.rpc = RpcRegistry()
        self.rpc.lock = self.lock
        self.rpc.rpc_state = RpcState.STARTUP
        self.rpc.hint_resolver = self._missing_method_hint
        #: What a plugin's command handlers see of the daemon.
        self.command_context = commands.CommandContext(self.bdevs, self.controllers, self.bdev_modules)
        self.plugins = plugins.load_plugins(disabled_plugins, plugin_modules)
        self.rpc_server: RpcServer | None = None
        self._stopped = False
        #: The ``--json`` config whose RUNTIME part applies at framework_start_init.
        self.json_config: JsonConfig | None = None
        self.initialized = False
        self._init_waiters: list[asyncio.Future] = []
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

    def register_core_methods(self) -> None:
        rpc = self.rpc

        @rpc.method("spdk_get_version", owner="vhost-core", deprecated_aliases=("get_spdk_version",),
                    states=_BOTH)
        def spdk_get_version(_p=None):
            major, minor, patch = (int(x) for x in __version__.split(".")[:3])
            return {"version": f"vhost-py v{__version__}",
                    "fields": {"major": major, "minor": minor, "patch": patch, "suffix": ""}}

        @rpc.method("framework_get_reactors", owner="vhost-core")
        def framework_get_reactors(_p=None):
            out = []
            for r in self.reactors:
                s = r.stats()
                out.append({
                    "lcore": r.core,
                    "tid": r.tid(),
                    "busy": s["busy_ns"],
                    "idle": s["idle_ns"],
                    "in_interrupt": r.interrupt_mode,
                    "lw_threads": [{"name": c, "id": i, "cpumask": format_mask(self.controllers.get(c).cpumask),
                                    "elapsed": 0}
                                   for i, c in enumerate(sorted(r.controllers)) if c in self.controllers],
                })
            return {"tick_rate": 1000000000, "reactors": out}

        @rpc.method("thread_get_stats", owner="vhost-core")
        def thread_get_stats(_p=None):
            """SPDK's shape, one thread per reactor: busy and idle time in ns (tick_rate 1e9)."""
            threads = []
            for i, r in enumerate(self.reactors, start=1):
                s = r.stats()
                served = [c for c in r.controllers if c in self.controllers]
                threads.append({"name": f"reactor_{r.core}", "id": i, "cpumask": f"{1 << r.core:x}",
                                "busy": s["busy_ns"], "idle": s["idle_ns"],
                                "active_pollers_count": sum(1 for c in served
                                                            if self.controllers.get(c).session is not None),
                                "timed_pollers_count": 0, "paused_pollers_count": 0})
            return {"tick_rate": 1000000000, "threads": threads}

        @rpc.method("framework_get_plugins", owner="vhost-core", states=_BOTH)
        def framework_get_plugins(_p=None):
            return [i.to_json() for i in self.plugins.infos]

        @rpc.method("framework_start_init", owner="vhost-core", states=RpcState.STARTUP)
        def framework_start_init(_p=None):
            """Leave the start-up state (vhost --wait-for-rpc): serve every method."""
            try:
                self.start_init()
            except ConfigError as exc:
                self.exit(1)
                raise RpcError(-errno.EINVAL, str(exc)) from None
            return True

        @rpc.method("framework_wait_init", owner="vhost-core", states=_BOTH)
        def framework_wait_init(_p=None):
            """Answer once the daemon serves (after framework_start_init with --wait-for-rpc)."""
            if self.initialized:
                return True
            fut = asyncio.get_running_loop().create_future()
            self._init_waiters.append(fut)
            return fut

        @rpc.method("spdk_kill_instance", params=KillParams, owner="vhost-core")
        def spdk_kill_instance(p: KillParams):
            """Send the daemon a signal: SIGINT/SIGTERM stop it cleanly, SIGKILL as a crash."""
            by_number = {str(int(num)): name for name, (num, _) in KILL_SIGNALS.items()}
            name = by_number.get(p.sig_name, p.sig_name)
            if name not in KILL_SIGNALS:
                raise RpcError(INVALID_PARAMS, f"spdk_kill_instance: sig_name '{p.sig_name}' is not one of "
                                               f"{', '.join(KILL_SIGNALS)}")
            num, refused = KILL_SIGNALS[name]
            if refused is not None:
                raise RpcError(-errno.ENOTSUP, f"spdk_kill_instance: sig_name={name} is not supported by "
                                               f"this target: {refused}")
            notice(log, "spdk_kill_instance: %s", name)
            # After the answer is on its way, as SPDK's client expects it (or a closed socket).
            asyncio.get_running_loop().call_later(0.05, os.kill, os.getpid(), num)
            return True

        @rpc.method("bdev_get_bdevs", params=GetBdevsParams, owner="vhost-core",
                    deprecated_aliases=("get_bdevs",))
        def bdev_get_bdevs(p: GetBdevsParams):
            if p.name is None:
                return [b.to_json() for b in self.bdevs]
            if p.timeout and not self._has_bdev(p.name):
                return self._wait_for_bdev(p.name, p.timeout / 1000)
            return [self.bdevs.get(p.name).to_json()]

        @rpc.method("bdev_wait_for_examine", owner="vhost-core")
        def bdev_wait_for_examine(_p=None):
            """Bdevs here are ready when created (nothing examines them): answers at once."""
            return True

        @rpc.method("get_bdevs_iostat", params=NameOptParams, owner="vhost-core",
                    deprecated="bdev_get_iostat")
        def get_bdevs_iostat(p: NameOptParams):
            # SPDK's old name answered a list: the tick rate first, then one object per bdev.
            bdevs = [self.bdevs.get(p.name)] if p.name is not None else list(self.bdevs)
            return [{"tick_rate": lib.vn_tick_rate()}] + [self.bdev_iostat(b).to_spdk(b.name) for b in bdevs]

        @rpc.method("bdev_get_iostat", params=GetIostatParams, owner="vhost-core")
        def bdev_get_iostat(p: GetIostatParams):
            names = list(p.names or []) + ([p.name] if p.name is not None else [])
            bdevs = [self.bdevs.get(n) for n in names] if names else list(self.bdevs)
            out = {"tick_rate": lib.vn_tick_rate(), "ticks": lib.vn_ticks_now(),
                   "bdevs": [self.bdev_iostat(b).to_spdk(b.name) for b in bdevs]}
            if p.reset_mode not in (None, "none", "error"):
                for b in bdevs:
                    self.reset_iostat(b, p.reset_mode)
            return out

        @rpc.method("bdev_reset_iostat", params=ResetIostatParams, owner="vhost-core")
        def bdev_reset_iostat(p: ResetIostatParams):
            for b in [self.bdevs.get(p.name)] if p.name is not None else list(self.bdevs):
                if p.mode in ("all", "maxmin"):
                    self.reset_iostat(b, p.mode)
            return True

        @rpc.method("vhost_get_controllers", params=GetControllersParams, owner="vhost-core",
                    deprecated_aliases=("get_vhost_controllers",))
        def vhost_get_controllers(p: GetControllersParams):
            if p.name is not None:
                return [self.controllers.get(p.name).to_json()]
            return [c.to_json() for c in self.controllers]

        @rpc.method("vhost_delete_controller", params=CtrlrParams, owner="vhost-core",
                    deprecated_aliases=("remove_vhost_controller",), blocking=True)
        def vhost_delete_controller(p: CtrlrParams):
            self.controllers.delete(p.ctrlr)
            return True

        @rpc.method("framework_get_subsystems", owner="vhost-core")
        def framework_get_subsystems(_p=None):
            return [{"subsystem": name, "depends_on": []} for name in self.config_by_subsystem()]

        @rpc.method("framework_get_config", params=GetConfigParams, owner="vhost-core")
        def framework_get_config(p: GetConfigParams):
            config = self.config_by_subsystem()
            if p.name not in config:
                raise RpcError(-errno.ENOENT, f"subsystem '{p.name}' does not exist; "
                                              f"see framework_get_subsystems")
            return config[p.name]

        @rpc.method("delete_bdev", params=NameParams, owner="vhost-core",
                    deprecated="the bdev type's delete method (bdev_malloc_delete, ...)", blocking=True)
        def delete_bdev(p: NameParams):
            """Deprecated SPDK name: delete a bdev of any module (hot-detaching it)."""
            self.bdevs.delete(p.name)
            return True

        @rpc.method("vhost_get_queue_stats", params=CtrlrParams, owner="vhost-core")
        def vhost_get_queue_stats(p: CtrlrParams):
            return self.controllers.get(p.ctrlr).queue_stats()

        self._register_log_methods()

    def _register_log_methods(self) -> None:
        rpc = self.rpc

        def level_of(method: str, name: str) -> int:
            try:
                return logs.parse_level(name)
            except ValueError as exc:
                raise RpcError(INVALID_PARAMS, f"{method}: {exc}") from None

        @rpc.method("log_set_print_level", params=LevelParams, owner="vhost-core", states=_BOTH)
        def log_set_print_level(p: LevelParams):
            """What the daemon prints (stderr): ERROR, WARNING, NOTICE, INFO or DEBUG."""
            logs.set_print_level(level_of("log_set_print_level", p.level))
            return True

        @rpc.method("log_get_print_level", owner="vhost-core", states=_BOTH)
        def log_get_print_level(_p=None):
            return logs.level_name(logs.get_print_level())

        @rpc.method("log_set_level", params=LevelParams, owner="vhost-core", states=_BOTH)
        def log_set_level(p: LevelParams):
            """SPDK's syslog level: kept and reported; this target logs to stderr only."""
            logs.set_level(level_of("log_set_level", p.level))
            return True

        @rpc.method("log_get_level", owner="vhost-core", states=_BOTH)
        def log_get_level(_p=None):
            return logs.level_name(logs.get_level())

        def set_flag(method: str, flag: str, enabled: bool) -> bool:
            try:
                logs.set_flag(flag, enabled)
            except ValueError as exc:
                raise RpcError(INVALID_PARAMS, f"{method}: {exc}") from None
            return True

        @rpc.method("log_set_flag", params=FlagParams, owner="vhost-core", states=_BOTH)
        def log_set_flag(p: FlagParams):
            """Debug lines of one area (vhost, vhost_ring, bdev, ... or all), at print level DEBUG."""
            return set_flag("log_set_flag", p.flag, True)

        @rpc.method("log_clear_flag", params=FlagParams, owner="vhost-core", states=_BOTH)
        def log_clear_flag(p: FlagParams):
            return set_flag("log_clear_flag", p.flag, False)

        @rpc.method("log_get_flags", owner="vhost-core", states=_BOTH)
        def log_get_flags(_p=None):
            return logs.get_flags()

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

    def _has_bdev(self, name: str) -> bool:
        return any(b.name == name or name in b.aliases for b in self.bdevs)

    async def _wait_for_bdev(self, name: str, timeout_s: float) -> list[dict]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            await asyncio.sleep(0.01)
            with self.lock:
                if self._has_bdev(name) or loop.time() >= deadline:
                    return [self.bdevs.get(name).to_json()]

    def bdev_iostat(self, bdev: Bdev) -> IoStat:
        """What every device drove on ``bdev``: live counters plus retired ones, less
        what bdev_reset_iostat set aside."""
        total = IoStat()
        total.add(bdev.iostat_retired)
        for desc in bdev.descriptors:
            total.add(desc.iostat())
        return total.since(bdev.iostat_base) if bdev.iostat_base is not None else total

    def reset_iostat(self, bdev: Bdev, mode: str) -> None:
        for desc in bdev.descriptors:
            desc.reset_iostat_maxmin()
        r = bdev.iostat_retired
        r.max_ticks[:] = [0] * len(r.max_ticks)
        r.min_ticks[:] = [0] * len(r.min_ticks)
        if mode == "all":
            bdev.iostat_base = None
            bdev.iostat_base = self.bdev_iostat(bdev)

    def config_by_subsystem(self) -> dict[str, list[dict]]:
        """RPC calls that recreate the current state, by subsystem: the bdev modules'
        bdevs first, then each device type's controllers."""
        out: dict[str, list[dict]] = {"bdev": []}
        bdevs = list(self.bdevs)
        for module in self.bdev_modules:
            out["bdev"].extend(module.config_json([b for b in bdevs if b.module == module.name]))
        for dtype in self.device_types:
            out.setdefault(dtype.subsystem, [])
        for ctrlr in self.controllers:
            dtype = self.device_types.get(ctrlr.device.device_type)
            if dtype is not None:
                out[dtype.subsystem].extend(ctrlr.device.config_json())
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
        for fut in self._init_waiters:
            if not fut.done():
                fut.set_result(True)
        self._init_waiters.clear()
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
        self.register_core_methods()
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vhost", description="vhost-user storage target (SPDK-compatible RPC)")
    p.add_argument("-S", "--socket-dir", default="/var/tmp",
                   help="directory for the controllers' vhost-user sockets (default /var/tmp)")
    p.add_argument("-m", "--cpumask", default="0x1",
                   help="reactor cores as a hex mask (0x3 = cores 0 and 1) or a list [0,1]")
    p.add_argument("-r", "--rpc-socket", default=DEFAULT_RPC_SOCKET,
                   help=f"JSON-RPC listen socket (default {DEFAULT_RPC_SOCKET})")
    p.add_argument("-s", "--mem-size", type=int, default=None, metavar="MB",
                   help="accepted for SPDK compatibility; memory is allocated as needed, no hugepages required")
    p.add_argument("--json", dest="json_config", metavar="FILE",
                   help="apply this SPDK JSON config (as save_config writes it) at start")
    p.add_argument("--json-ignore-init-errors", action="store_true",
                   help="log a --json entry that fails and go on with the others, instead of exiting")
    p.add_argument("--wait-for-rpc", action="store_true",
                   help="serve only start-up methods (log_*, options, rpc_get_methods ...) until the "
                        "framework_start_init RPC, as SPDK does")
    p.add_argument("--default-config", action="store_true",
                   help="start with a 64 MiB malloc disk Malloc0 behind vhost-blk controller vhost.0, "
                        "and print the QEMU command line to use it")
    p.add_argument("--interrupt-mode", action="store_true",
                   help="reactors sleep on the virtqueue kick eventfds instead of busy polling")
    p.add_argument("--list-plugins", action="store_true", help="list the plugins found and exit")
    p.add_argument("--disable-plugin", action="append", default=[], metavar="NAME",
                   help="do not load this plugin (repeatable; also VHOST_DISABLE_PLUGINS=a,b)")
    p.add_argument("-L", "--logflag", action="append", default=[], metavar="FLAG",
                   help="debug lines of an area (vhost, vhost_ring, bdev, ..., or all; see the "
                        "log_get_flags RPC), and print level DEBUG; repeatable")
    return p


def qemu_command_line(ctrlr: Controller, device_types: DeviceTypeRegistry, mem_mb: int = 1024) -> str:
    cid = ctrlr.name.replace(".", "_")
    dtype = device_types.get(ctrlr.device.device_type)
    device = dtype.qemu_args(cid, min(4, ctrlr.device.num_queues)) if dtype is not None else "-device ..."
    return (f"qemu-system-x86_64 -m {mem_mb}M "
            f"-object memory-backend-memfd,id=mem,size={mem_mb}M,share=on -numa node,memdev=mem "
            f"-chardev socket,id={cid},path={ctrlr.path},reconnect=1 "
            f"{device} ...")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    if args.list_plugins:
        pm = plugins.load_plugins(args.disable_plugin)
        for info in pm.infos:
            print(f"{info.name:14} {info.distribution:20} {info.version:8} hooks: {', '.join(info.hooks)}")
        for name, why in pm.failed.items():
            print(f"{name:14} FAILED: {why}")
        return 0
    try:
        cpumask = parse_cpumask(args.cpumask)
        os.makedirs(args.socket_dir, exist_ok=True)
        app = App(args.socket_dir, cpumask, args.rpc_socket, args.interrupt_mode, tuple(args.disable_plugin))
        for flag in args.logflag:      # after the plugins loaded: their loggers are flags too
            logs.set_flag(flag)
    except (ValueError, OSError) as exc:
        print(f"vhost: {exc}", file=sys.stderr)
        return 2
    if args.logflag:
        logs.set_print_level(logs.LEVELS["DEBUG"])
    return asyncio.run(_run(app, args))


def _read_config(args) -> tuple[Any, str] | None:
    if args.json_config:
        try:
            with open(args.json_config) as f:
                return json.load(f), args.json_config
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--json {args.json_config}: not valid JSON: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"--json {args.json_config}: cannot read it: {exc.strerror}") from None
    if args.default_config:
        return DEFAULT_CONFIG, "--default-config"
    return None


async def _run(app: App, args) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    exit_code = [0]

    def finish(rc: int) -> None:
        exit_code[0] = exit_code[0] or rc
        stop.set()

    app.exit = finish
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    app.start()
    try:
        app.rpc_server = RpcServer(app.rpc, app.rpc_path)
        await app.rpc_server.start()
        notice(log, "JSON-RPC listening on %s", app.rpc_path)
        config = _read_config(args)
        if config is not None:
            app.load_config(*config, ignore_errors=args.json_ignore_init_errors)
        if args.wait_for_rpc:
            notice(log, "Waiting for the framework_start_init RPC (--wait-for-rpc): until then only "
                        "start-up methods are served")
        else:
            app.start_init()
        if args.default_config:
            app.after_init(lambda: print(
                "vhost target ready: Malloc0 (64 MiB, 512-byte blocks) on vhost-blk controller vhost.0\n"
                "Start a VM with:\n  " + qemu_command_line(app.controllers.get("vhost.0"), app.device_types),
                flush=True))
        await stop.wait()
        notice(log, "Exiting")
    except (ConfigError, RpcError, OSError, ValueError, KeyError) as exc:
        log.error("start-up failed: %s", getattr(exc, "message", exc))
        exit_code[0] = 1
    finally:
        if app.rpc_server is not None:
            await app.rpc_server.close()
        app.stop()
    return exit_code[0]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
