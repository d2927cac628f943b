"""The ``vhost`` daemon: reactors, plugins, the RPC server and the controllers.

Start-up order: plugins load (a broken one costs a log line), reactors start,
plugins register their RPCs, the RPC socket listens, ``--json`` config applies.
SIGINT/SIGTERM: stop taking RPCs, stop every controller (no new requests are
fetched, in-flight ones drain), delete bdevs, stop reactors, remove sockets, exit 0.
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
from typing import Any, Callable, Literal

import attrs

from vhost_core import __version__, plugins
from vhost_core.bdev.iostat import IoStat
from vhost_core.bdev.interface import Bdev
from vhost_core.bdev.registry import BdevRegistry
from vhost_core.controller import Controller
from vhost_core.log import get_logger, notice, setup as setup_logging
from vhost_core.native import lib
from vhost_core.reactor import Reactors, format_mask, parse_cpumask
from vhost_core.rpc.registry import RpcError, RpcRegistry
from vhost_core.rpc.server import RpcServer
from vhost_core.vhost_user.backend import DeviceBackend

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
    timeout: int | None = None


@attrs.frozen
class NameOptParams:
    name: str | None = None


@attrs.frozen
class GetIostatParams:
    name: str | None = None                 # older rpc.py: -b NAME
    names: list[str] | None = None          # newer rpc.py: --names a,b
    per_channel: bool = False
    reset_mode: Literal["all", "maxmin", "error", "none"] | None = None


@attrs.frozen
class ResetIostatParams:
    name: str | None = None
    mode: Literal["all", "maxmin", "error", "none"] = "all"


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
        self.controllers: dict[str, Controller] = {}
        self.rpc = RpcRegistry()
        self.rpc.lock = self.lock
        self.plugins = plugins.load_plugins(disabled_plugins)
        self.rpc_server: RpcServer | None = None
        self._stopped = False

    # ------------------------------------------------------------ controllers

    def add_controller(self, name: str, make_backend: Callable[[], DeviceBackend],
                       cpumask: str | int | None = None, listen: bool = True) -> Controller:
        """Create a controller: validate, place on a reactor, build its device, listen.

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
        backend = make_backend()
        try:
            ctrlr = Controller(self, name, backend, reactor, mask if mask is not None else self.reactors.mask)
        except BaseException:
            backend.close()
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

        @rpc.method("spdk_get_version", owner="vhost-core", deprecated_aliases=("get_spdk_version",))
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

        @rpc.method("framework_get_plugins", owner="vhost-core")
        def framework_get_plugins(_p=None):
            return [i.to_json() for i in self.plugins.infos]

        @rpc.method("bdev_get_bdevs", params=GetBdevsParams, owner="vhost-core",
                    deprecated_aliases=("get_bdevs",))
        def bdev_get_bdevs(p: GetBdevsParams):
            if p.name is not None:
                return [self.bdevs.get(p.name).to_json()]
            return [b.to_json() for b in self.bdevs]

        @rpc.method("get_bdevs_iostat", params=NameOptParams, owner="vhost-core")
        def get_bdevs_iostat(p: NameOptParams):
            # SPDK's old name answered a list: the tick rate first, then one object per bdev.
            log.warning("rpc: method 'get_bdevs_iostat' is deprecated, use 'bdev_get_iostat'")
            bdevs = [self.bdevs.get(p.name)] if p.name is not None else list(self.bdevs)
            return [{"tick_rate": lib.vn_tick_rate()}] + [self.bdev_iostat(b).to_spdk(b.name) for b in bdevs]

        @rpc.method("bdev_get_iostat", params=GetIostatParams, owner="vhost-core")
        def bdev_get_iostat(p: GetIostatParams):
            if p.per_channel:
                raise RpcError(-errno.ENOTSUP, "per-channel statistics are not kept by this target: "
                                               "omit per_channel (-c) for the per-bdev totals")
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

        @rpc.method("framework_get_config", params=NameParams, owner="vhost-core")
        def framework_get_config(p: NameParams):
            config = self.config_by_subsystem()
            if p.name not in config:
                raise RpcError(-errno.ENOENT, f"subsystem '{p.name}' does not exist; "
                                              f"see framework_get_subsystems")
            return config[p.name]

        @rpc.method("delete_bdev", params=NameParams, owner="vhost-core")
        def delete_bdev(p: NameParams):
            """Deprecated SPDK name: delete a bdev of any module (hot-detaching it)."""
            self.bdevs.delete(p.name)
            return True

        @rpc.method("vhost_get_queue_stats", params=CtrlrParams, owner="vhost-core")
        def vhost_get_queue_stats(p: CtrlrParams):
            return self.get_controller(p.ctrlr).queue_stats()

    def bdev_iostat(self, bdev: Bdev) -> IoStat:
        """What every device drove on ``bdev``: live counters plus retired ones, less
        what bdev_reset_iostat set aside."""
        total = IoStat()
        total.add(bdev.iostat_retired)
        for ctrlr in self.controllers.values():
            report = getattr(ctrlr.backend, "bdev_iostat", None)
            if report is None:
                continue
            for name, words in report():
                if name == bdev.name:
                    total.add(IoStat.from_words(words))
        return total.since(bdev.iostat_base) if bdev.iostat_base is not None else total

    def reset_iostat(self, bdev: Bdev, mode: str) -> None:
        for ctrlr in self.controllers.values():
            reset = getattr(ctrlr.backend, "reset_iostat_maxmin", None)
            if reset is not None:
                reset(bdev.name)
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

    def apply_config(self, config: Any) -> None:
        calls: list[dict] = []
        if isinstance(config, dict) and "subsystems" in config:
            for sub in config["subsystems"]:
                calls.extend(sub.get("config") or [])
        elif isinstance(config, list):
            calls = config
        else:
            raise ValueError("config must be SPDK's {\"subsystems\": [...]} or a list of {method, params}")
        for call in calls:
            self.call(call["method"], call.get("params"))

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self.reactors.start()
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
        self.plugins.hook.vhost_app_started(app=self)

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
    p.add_argument("--json", dest="json_config", metavar="FILE", help="apply this JSON-RPC config at start")
    p.add_argument("--default-config", action="store_true",
                   help="start with a 64 MiB malloc disk Malloc0 behind vhost-blk controller vhost.0, "
                        "and print the QEMU command line to use it")
    p.add_argument("--interrupt-mode", action="store_true",
                   help="reactors sleep on the virtqueue kick eventfds instead of busy polling")
    p.add_argument("--list-plugins", action="store_true", help="list the plugins found and exit")
    p.add_argument("--disable-plugin", action="append", default=[], metavar="NAME",
                   help="do not load this plugin (repeatable; also VHOST_DISABLE_PLUGINS=a,b)")
    p.add_argument("-L", "--logflag", action="append", default=[], help="debug log for a component (or 'all')")
    return p


def qemu_command_line(ctrlr: Controller, mem_mb: int = 1024) -> str:
    cid = ctrlr.name.replace(".", "_")
    dev = "vhost-user-blk-pci" if ctrlr.backend.device_type == "blk" else "vhost-user-scsi-pci"
    queues = "num-queues" if ctrlr.backend.device_type == "blk" else "num_queues"
    return (f"qemu-system-x86_64 -m {mem_mb}M "
            f"-object memory-backend-memfd,id=mem,size={mem_mb}M,share=on -numa node,memdev=mem "
            f"-chardev socket,id={cid},path={ctrlr.path},reconnect=1 "
            f"-device {dev},chardev={cid},{queues}={min(4, ctrlr.backend.num_queues)} ...")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import logging
    setup_logging(logging.DEBUG if args.logflag else 25)
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
    except (ValueError, OSError) as exc:
        print(f"vhost: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(_run(app, args))


async def _run(app: App, args) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    app.start()
    rc = 0
    try:
        app.rpc_server = RpcServer(app.rpc, app.rpc_path)
        await app.rpc_server.start()
        notice(log, "JSON-RPC listening on %s", app.rpc_path)
        config = DEFAULT_CONFIG if args.default_config else None
        if args.json_config:
            with open(args.json_config) as f:
                config = json.load(f)
        if config is not None:
            app.apply_config(config)
        if args.default_config:
            ctrlr = app.controllers["vhost.0"]
            print("vhost target ready: Malloc0 (64 MiB, 512-byte blocks) on vhost-blk controller vhost.0\n"
                  "Start a VM with:\n  " + qemu_command_line(ctrlr), flush=True)
        await stop.wait()
        notice(log, "Exiting")
    except (RpcError, OSError, ValueError, KeyError) as exc:
        log.error("start-up failed: %s", getattr(exc, "message", exc))
        rc = 1
    finally:
        if app.rpc_server is not None:
            await app.rpc_server.close()
        app.stop()
    return rc


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
