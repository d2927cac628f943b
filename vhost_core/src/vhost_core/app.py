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
import re
import signal
import sys
import threading
import time
from typing import Any, Callable, Literal

import attrs

from vhost_core import __version__, plugins
from vhost_core.bdev.iostat import IoStat
from vhost_core.bdev.interface import Bdev
from vhost_core.bdev.registry import BdevRegistry
from vhost_core import log as logs
from vhost_core.controller import Controller
from vhost_core.log import get_logger, notice, setup as setup_logging
from vhost_core.native import lib
from vhost_core.reactor import Reactors, format_mask, parse_cpumask
from vhost_core.rpc.json_config import ConfigError, JsonConfig
from vhost_core.rpc.registry import INVALID_PARAMS, RpcError, RpcRegistry, RpcState, unsupported
from vhost_core.rpc.server import RpcServer
from vhost_core.rpc.spdk import IGNORED, NOT_YET, Ignored, ignored_params_class
from vhost_core.device import Device, DeviceContext

log = get_logger("app")

DEFAULT_RPC_SOCKET = "/var/tmp/spdk.sock"
CONTROLLER_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")

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
                 disabled_plugins: tuple[str, ...] = ()) -> None:
        self.socket_dir = os.path.abspath(socket_dir)
        self.rpc_path = rpc_path
        self.lock = threading.RLock()
        #: For waits that must not hold up the control plane (a ring draining a slow or
        #: stuck backend): ``lock_cond.wait(t)`` releases ``lock`` meanwhile.
        self.lock_cond = threading.Condition(self.lock)
        self.reactors = Reactors(cpumask, interrupt_mode)
        self.bdevs = BdevRegistry()
        self.bdevs.wait_unlocked = self.wait_unlocked
        self.controllers: dict[str, Controller] = {}
        self.rpc = RpcRegistry()
        self.rpc.lock = self.lock
        self.rpc.rpc_state = RpcState.STARTUP
        self.plugins = plugins.load_plugins(disabled_plugins)
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

    # ------------------------------------------------------------ controllers

    def add_controller(self, name: str, device: Device, cpumask: str | int | None = None,
                       listen: bool = True) -> Controller:
        """Create a controller: validate, place on a reactor, attach its device, listen.

        ``listen=False`` leaves the socket closed until the caller runs
        ``ctrlr.listen()`` (SPDK's ``vhost_create_scsi_controller --delay``)."""
        if not CONTROLLER_NAME.match(name or ""):
            raise RpcError(-errno.EINVAL, f"controller name '{name}' is invalid: use 1-64 letters, "
                                          f"digits, '.', '_', ':' or '-' (it becomes the socket file name)")
        if name in self.controllers:
            raise RpcError(-errno.EEXIST, f"controller '{name}' already exists: pick another name or "
                                          f"vhost_delete_controller {name} first")
        try:
            mask = None if cpumask is None else parse_cpumask(cpumask)
            reactor = self.reactors.place(mask)
        except ValueError as exc:
            raise RpcError(-errno.EINVAL, f"controller {name}: {exc}") from None
        mask = mask if mask is not None else self.reactors.mask

        def notify() -> bool:
            ctrlr = self.controllers.get(name)
            return ctrlr is not None and ctrlr.session is not None and ctrlr.session.notify_config_change()

        ctx = DeviceContext(name, format_mask(mask), reactor, self.bdevs, self.wait_unlocked, notify)
        try:
            native = device.attach(ctx)
            ctrlr = Controller(self, name, device, ctx, reactor, mask, native)
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
        self.controllers[name] = ctrlr
        notice(log, "Controller %s: new controller added", name)
        return ctrlr

    def get_controller(self, name: str) -> Controller:
        ctrlr = self.controllers.get(name)
        if ctrlr is None:
            known = ", ".join(sorted(self.controllers)) or "none"
            raise RpcError(-errno.ENODEV, f"controller '{name}' does not exist (existing controllers: "
                                          f"{known}); see vhost_get_controllers")
        return ctrlr

    def delete_controller(self, name: str, force: bool = False) -> None:
        ctrlr = self.get_controller(name)
        if ctrlr.session is not None and not force:
            raise RpcError(-errno.EBUSY, f"controller '{name}' has a connected front-end (a running VM): "
                                         f"shut the VM down or unplug the device first, then delete it")
        del self.controllers[name]
        ctrlr.reactor.controllers.discard(name)
        ctrlr.close()
        notice(log, "Controller %s: removed", name)

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
                    "lw_threads": [{"name": c, "id": i, "cpumask": format_mask(self.controllers[c].cpumask),
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
                                                            if self.controllers[c].session is not None),
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
                return [self.get_controller(p.name).to_json()]
            return [c.to_json() for c in self.controllers.values()]

        @rpc.method("vhost_delete_controller", params=CtrlrParams, owner="vhost-core",
                    deprecated_aliases=("remove_vhost_controller",))
        def vhost_delete_controller(p: CtrlrParams):
            self.delete_controller(p.ctrlr)
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
                    deprecated="the bdev type's delete method (bdev_malloc_delete, ...)")
        def delete_bdev(p: NameParams):
            """Deprecated SPDK name: delete a bdev of any module (hot-detaching it)."""
            self.bdevs.delete(p.name)
            return True

        @rpc.method("vhost_get_queue_stats", params=CtrlrParams, owner="vhost-core")
        def vhost_get_queue_stats(p: CtrlrParams):
            return self.get_controller(p.ctrlr).queue_stats()

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
        """RPC calls that recreate the current state, by subsystem (bdev first)."""
        out: dict[str, list[dict]] = {"bdev": [], "vhost_blk": [], "vhost_scsi": []}
        for part in self.plugins.hook.vhost_config_json(app=self):
            for subsystem, calls in (part or {}).items():
                out.setdefault(subsystem, []).extend(calls)
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
        self.plugins.hook.vhost_app_started(app=self)

    def register_rpc_methods(self) -> None:
        """The core's methods, every plugin's, then SPDK's options that mean nothing here."""
        self.register_core_methods()
        for impl in self.plugins.pm.hook.vhost_register_rpc_methods.get_hookimpls():
            before = set(self.rpc.names(include_aliases=False))
            try:
                impl.function(rpc=self.rpc, app=self)
            except (ValueError, TypeError) as exc:
                # All or nothing: a plugin half registered would answer some of its
                # RPCs with objects whose other half (delete, ...) is missing.
                for name in set(self.rpc.names(include_aliases=False)) - before:
                    self.rpc.remove(name)
                log.error("plugin '%s' could not register its RPC methods: %s; none of its methods "
                          "are available, the other plugins are", impl.plugin_name, exc)
        registered = set(self.rpc.names())
        for method, dist in plugins.KNOWN_PROVIDERS.items():
            if method not in registered:
                self.rpc.set_missing_hint(method, plugins.provider_hint(dist))
        self._register_ignored_methods()

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        with self.lock:
            for name in list(self.controllers):
                try:
                    self.delete_controller(name, force=True)
                except Exception:
                    log.exception("Controller %s: error while stopping", name)
            try:
                self.plugins.hook.vhost_app_stopping(app=self)
            except Exception:
                log.exception("a plugin failed while stopping")
            for bdev in list(self.bdevs):
                try:
                    self.bdevs.delete(bdev.name)
                except Exception:
                    log.exception("bdev %s: error while deleting", bdev.name)
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


def qemu_command_line(ctrlr: Controller, mem_mb: int = 1024) -> str:
    cid = ctrlr.name.replace(".", "_")
    dev = "vhost-user-blk-pci" if ctrlr.device.device_type == "blk" else "vhost-user-scsi-pci"
    queues = "num-queues" if ctrlr.device.device_type == "blk" else "num_queues"
    return (f"qemu-system-x86_64 -m {mem_mb}M "
            f"-object memory-backend-memfd,id=mem,size={mem_mb}M,share=on -numa node,memdev=mem "
            f"-chardev socket,id={cid},path={ctrlr.path},reconnect=1 "
            f"-device {dev},chardev={cid},{queues}={min(4, ctrlr.device.num_queues)} ...")


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
                "Start a VM with:\n  " + qemu_command_line(app.controllers["vhost.0"]), flush=True))
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
