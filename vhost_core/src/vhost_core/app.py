"""The ``vhost`` command: its options, and the daemon's main loop (the state is state.App).

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
from typing import Any

from vhost_core import log as logs, plugins
from vhost_core.errors import VhostError
from vhost_core.log import get_logger, notice, setup as setup_logging
from vhost_core.qemu import qemu_command_line
from vhost_core.reactor import parse_cpumask
from vhost_core.rpc.json_config import ConfigError
from vhost_core.rpc.registry import RpcError
from vhost_core.rpc.server import RpcServer
from vhost_core.state import App

__all__ = ["App", "DEFAULT_CONFIG", "DEFAULT_RPC_SOCKET", "build_parser", "main"]

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
    except (ConfigError, RpcError, VhostError, OSError, ValueError, KeyError) as exc:
        log.error("start-up failed: %s", getattr(exc, "message", exc))
        exit_code[0] = 1
    finally:
        if app.rpc_server is not None:
            await app.rpc_server.close()
        app.stop()
    return exit_code[0]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
