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
import json
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

import attrs

from vhost_core import commands, plugins
from vhost_core.bdev.interface import BdevModuleRegistry
from vhost_core.bdev.registry import BdevRegistry
from vhost_core import log as logs
from vhost_core.controller import Controller
from vhost_core.controllers import ControllerRegistry
from vhost_core.core_methods import CORE
from vhost_core.device import DeviceTypeRegistry
from vhost_core.log import get_logger, notice, setup as setup_logging
from vhost_core.reactor import Reactors, parse_cpumask
from vhost_core.rpc.json_config import ConfigError, JsonConfig
from vhost_core.rpc.registry import RpcError, RpcRegistry, RpcState
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
