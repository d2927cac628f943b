"""The core's own ``vhost-rpc`` sub-commands (names and options as in SPDK's rpc.py).

Deprecated spellings (``get_bdevs`` ...) send the *old* RPC name with the old
parameters, exactly as SPDK's old client did; the server maps the alias.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .cli import NO_OUTPUT

__all__ = ["contribute"]


def _params(**kwargs: Any) -> dict[str, Any]:
    """Drop unset options (rpc.py's ``remove_null``)."""
    return {k: v for k, v in kwargs.items() if v is not None}


def _rpc_get_methods(client: Any, args: argparse.Namespace) -> Any:
    params = {}
    if args.current:
        params["current"] = True
    if args.include_aliases:
        params["include_aliases"] = True
    return client.call("rpc_get_methods", params)


def _spdk_get_version(client: Any, args: argparse.Namespace) -> Any:
    return client.call("spdk_get_version")


def _framework_get_reactors(client: Any, args: argparse.Namespace) -> Any:
    return client.call("framework_get_reactors")


def _framework_get_plugins(client: Any, args: argparse.Namespace) -> Any:
    return client.call("framework_get_plugins")


def _bdev_get_bdevs(client: Any, args: argparse.Namespace) -> Any:
    return client.call("bdev_get_bdevs", _params(name=args.name, timeout=args.timeout_ms))


def _vhost_get_controllers(client: Any, args: argparse.Namespace) -> Any:
    return client.call("vhost_get_controllers", _params(name=args.name))


def _vhost_delete_controller(client: Any, args: argparse.Namespace) -> Any:
    client.call("vhost_delete_controller", {"ctrlr": args.ctrlr})
    return NO_OUTPUT


def _get_bdevs(client: Any, args: argparse.Namespace) -> Any:
    return client.call("get_bdevs", _params(name=args.name))


def _get_vhost_controllers(client: Any, args: argparse.Namespace) -> Any:
    return client.call("get_vhost_controllers", _params(name=args.name))


def _remove_vhost_controller(client: Any, args: argparse.Namespace) -> Any:
    client.call("remove_vhost_controller", {"ctrlr": args.ctrlr})
    return NO_OUTPUT


def _delete_bdev(client: Any, args: argparse.Namespace) -> Any:
    client.call("delete_bdev", {"name": args.bdev_name})
    return NO_OUTPUT


def _bdev_get_iostat(client: Any, args: argparse.Namespace) -> Any:
    return client.call("bdev_get_iostat", _params(name=args.name, names=args.names,
                                                   per_channel=args.per_channel or None,
                                                   reset_mode=args.reset_mode))


def _vhost_get_queue_stats(client: Any, args: argparse.Namespace) -> Any:
    return client.call("vhost_get_queue_stats", {"ctrlr": args.ctrlr})


def _bdev_reset_iostat(client: Any, args: argparse.Namespace) -> Any:
    client.call("bdev_reset_iostat", _params(name=args.name, mode=args.mode))
    return NO_OUTPUT


def _save_config(client: Any, args: argparse.Namespace) -> Any:
    # Same procedure as SPDK's rpc.py: ask for the subsystems, then each one's config.
    config: dict[str, Any] = {"subsystems": []}
    for elem in client.call("framework_get_subsystems"):
        name = elem["subsystem"]
        config["subsystems"].append(
            {"subsystem": name, "config": client.call("framework_get_config", {"name": name})}
        )
    indent = args.indent
    json.dump(config, sys.stdout, indent=None if indent < 0 else indent)
    sys.stdout.write("\n")
    return NO_OUTPUT


def contribute(subparsers: Any) -> None:
    p = subparsers.add_parser("rpc_get_methods", help="List the RPC methods the target supports")
    p.add_argument("-c", "--current", action="store_true",
                   help="Only methods callable in the current state")
    p.add_argument("-i", "--include-aliases", action="store_true",
                   help="Include deprecated method aliases")
    p.set_defaults(func=_rpc_get_methods)

    p = subparsers.add_parser("spdk_get_version", help="Show the target's version")
    p.set_defaults(func=_spdk_get_version)

    p = subparsers.add_parser("framework_get_reactors", help="List reactors and their threads")
    p.set_defaults(func=_framework_get_reactors)

    p = subparsers.add_parser("framework_get_plugins", help="List loaded plugins")
    p.set_defaults(func=_framework_get_plugins)

    p = subparsers.add_parser("save_config",
                              help="Print the live configuration as JSON (SPDK format)")
    p.add_argument("-i", "--indent", type=int, default=2,
                   help="Indent level; below 0 means compact. Default: 2")
    p.set_defaults(func=_save_config)

    p = subparsers.add_parser("bdev_get_bdevs", help="List all block devices, or one with -b")
    p.add_argument("-b", "--name", help="Name of the bdev, e.g. Malloc0")
    p.add_argument("-t", "--timeout-ms", dest="timeout_ms", type=int,
                   help="With -b: milliseconds to wait for the bdev to appear")
    p.set_defaults(func=_bdev_get_bdevs)

    p = subparsers.add_parser("bdev_get_iostat", help="I/O statistics of all bdevs, or of those named")
    p.add_argument("-b", "--name", help="Name of the bdev")
    p.add_argument("--names", type=lambda v: v.split(","), help="Comma-separated bdev names")
    p.add_argument("-c", "--per-channel", dest="per_channel", action="store_true",
                   help="Per-channel statistics (not kept by this target: an error)")
    p.add_argument("--reset-mode", choices=["all", "maxmin", "error", "none"],
                   help="Reset the statistics after reading them")
    p.set_defaults(func=_bdev_get_iostat)

    p = subparsers.add_parser("bdev_reset_iostat", help="Reset the I/O statistics of all bdevs, or one")
    p.add_argument("-b", "--name", help="Name of the bdev")
    p.add_argument("-m", "--mode", choices=["all", "maxmin", "error", "none"],
                   help="all (default): counts and max/min latency; maxmin: only those")
    p.set_defaults(func=_bdev_reset_iostat)

    p = subparsers.add_parser("vhost_get_queue_stats",
                              help="Per-queue counters of a controller (requests, interrupts, bad "
                                   "requests, in flight, resubmitted after a restart)")
    p.add_argument("ctrlr", help="Name of the vhost controller")
    p.set_defaults(func=_vhost_get_queue_stats)

    p = subparsers.add_parser("vhost_get_controllers", help="List all vhost controllers, or one with -n")
    p.add_argument("-n", "--name", help="Name of the vhost controller")
    p.set_defaults(func=_vhost_get_controllers)

    p = subparsers.add_parser("vhost_delete_controller", help="Delete a vhost controller")
    p.add_argument("ctrlr", help="Name of the vhost controller")
    p.set_defaults(func=_vhost_delete_controller)

    # Deprecated spellings from older SPDK releases.
    p = subparsers.add_parser("get_bdevs", help="Deprecated: use bdev_get_bdevs")
    p.add_argument("-b", "--name", help="Name of the bdev")
    p.set_defaults(func=_get_bdevs, deprecated_use="bdev_get_bdevs")

    p = subparsers.add_parser("get_vhost_controllers", help="Deprecated: use vhost_get_controllers")
    p.add_argument("-n", "--name", help="Name of the vhost controller")
    p.set_defaults(func=_get_vhost_controllers, deprecated_use="vhost_get_controllers")

    p = subparsers.add_parser("remove_vhost_controller", help="Deprecated: use vhost_delete_controller")
    p.add_argument("ctrlr", help="Name of the vhost controller")
    p.set_defaults(func=_remove_vhost_controller, deprecated_use="vhost_delete_controller")

    p = subparsers.add_parser("delete_bdev", help="Deprecated: use the bdev type's delete command")
    p.add_argument("bdev_name", help="Name of the bdev")
    p.set_defaults(func=_delete_bdev,
                   deprecated_use="the bdev type's delete command (e.g. bdev_malloc_delete)")
