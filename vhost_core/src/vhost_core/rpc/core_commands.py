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


def _dump(obj: Any, indent: int) -> None:
    json.dump(obj, sys.stdout, indent=None if indent < 0 else indent)
    sys.stdout.write("\n")


def _save_config(client: Any, args: argparse.Namespace) -> Any:
    # Same procedure as SPDK's rpc.py: the subsystems (and what they depend on), then each one's config.
    subsystems = client.call("framework_get_subsystems")
    deps: dict[str, set[str]] = {}
    for elem in subsystems:
        deps[elem["subsystem"]] = {elem["subsystem"]}.union(*(deps[d] for d in elem["depends_on"]))
    wanted = set(deps)
    if args.subsystems:
        wanted = set().union(*(deps[s] for s in args.subsystems.split(",")))
    config = {"subsystems": [
        {"subsystem": e["subsystem"],
         "config": client.call("framework_get_config", {"name": e["subsystem"],
                                                        "with_batches": args.with_batches})}
        for e in subsystems if e["subsystem"] in wanted]}
    _dump(config, args.indent)
    return NO_OUTPUT


def _save_subsystem_config(client: Any, args: argparse.Namespace) -> Any:
    _dump({"subsystem": args.name,
           "config": client.call("framework_get_config",
                                 {"name": args.name, "with_batches": args.with_batches})},
          args.indent)
    return NO_OUTPUT


def _read_json(source: Any) -> Any:
    if source is sys.stdin or source == "-":
        return json.load(sys.stdin)
    with open(source) as f:
        return json.load(f)


def _call_entries(client: Any, entries: list[Any], allowed: list[str]) -> bool:
    """Call, and remove from ``entries``, those whose method is in ``allowed``."""
    called = False
    for elem in list(entries):
        if elem["method"] in allowed:
            client.call(elem["method"], elem.get("params"))
            entries.remove(elem)
            called = True
    return called


def _check_known(client: Any, entries: list[Any], include_aliases: bool) -> None:
    known = client.call("rpc_get_methods", {"include_aliases": include_aliases})
    unknown = sorted({e["method"] for e in entries if e["method"] not in known})
    if unknown:
        raise SystemExit(f"vhost-rpc: the config calls methods this target does not have: "
                         f"{', '.join(unknown)}")


def _load_config(client: Any, args: argparse.Namespace) -> Any:
    # SPDK's rpc.py procedure: what the current state allows, framework_start_init, again.
    config = _read_json(args.json_conf)
    subsystems = [s for s in config["subsystems"] if s.get("config")]
    _check_known(client, [e for s in subsystems for e in s["config"]], args.include_aliases)
    if not subsystems and "framework_start_init" in client.call("rpc_get_methods", {"current": True}):
        client.call("framework_start_init")
    while subsystems:
        allowed = client.call("rpc_get_methods", {"current": True, "include_aliases": args.include_aliases})
        progress = False
        for sub in list(subsystems):
            progress |= _call_entries(client, sub["config"], allowed)
            if not sub["config"]:
                subsystems.remove(sub)
        if "framework_start_init" in allowed:
            client.call("framework_start_init")
            progress = True
        if not progress:
            break
    if subsystems:
        print("Some configs were skipped because the RPC state that can call them passed over.")
    return NO_OUTPUT


def _load_subsystem_config(client: Any, args: argparse.Namespace) -> Any:
    entries = list(_read_json(args.json_conf).get("config") or [])
    _check_known(client, entries, False)
    _call_entries(client, entries, client.call("rpc_get_methods", {"current": True}))
    if entries:
        print("Some configs were skipped because they cannot be called in the current RPC state.")
    return NO_OUTPUT


def _no_params(method: str) -> Any:
    return lambda client, args: client.call(method)


def _void(method: str, *keys: str) -> Any:
    """A command that sends ``keys`` from its arguments and prints nothing (as rpc.py)."""
    def run(client: Any, args: argparse.Namespace) -> Any:
        client.call(method, {k: getattr(args, k) for k in keys} or None)
        return NO_OUTPUT
    return run


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
    p.add_argument("-s", "--subsystems", help="Comma-separated subsystems (and their dependencies) to save")
    p.add_argument("--with-batches", action=argparse.BooleanOptionalAction, default=False,
                   help="Keep batch arrays (nothing here is batched: the same output)")
    p.set_defaults(func=_save_config)

    p = subparsers.add_parser("save_subsystem_config", help="Print one subsystem's live configuration")
    p.add_argument("-i", "--indent", type=int, default=2,
                   help="Indent level; below 0 means compact. Default: 2")
    p.add_argument("-n", "--name", required=True, help="Name of the subsystem (bdev, vhost_blk, vhost_scsi)")
    p.add_argument("--with-batches", action=argparse.BooleanOptionalAction, default=False,
                   help="Keep batch arrays (nothing here is batched: the same output)")
    p.set_defaults(func=_save_subsystem_config)

    p = subparsers.add_parser("load_config", help="Apply a configuration written by save_config")
    p.add_argument("-i", "--include-aliases", action="store_true", help="Accept deprecated method names")
    p.add_argument("-j", "--json-conf", default=sys.stdin, help="The JSON file (default: stdin)")
    p.set_defaults(func=_load_config)

    p = subparsers.add_parser("load_subsystem_config",
                              help="Apply one subsystem's configuration written by save_subsystem_config")
    p.add_argument("-j", "--json-conf", default=sys.stdin, help="The JSON file (default: stdin)")
    p.set_defaults(func=_load_subsystem_config)

    p = subparsers.add_parser("framework_get_subsystems", help="List the subsystems save_config writes")
    p.set_defaults(func=_no_params("framework_get_subsystems"))

    p = subparsers.add_parser("framework_get_config", help="Print one subsystem's configuration")
    p.add_argument("name", help="Name of the subsystem (bdev, vhost_blk, vhost_scsi)")
    p.add_argument("--with-batches", action=argparse.BooleanOptionalAction, default=False,
                   help="Keep batch arrays (nothing here is batched: the same output)")
    p.set_defaults(func=lambda client, args: client.call(
        "framework_get_config", {"name": args.name, "with_batches": args.with_batches}))

    p = subparsers.add_parser("framework_start_init",
                              help="Leave the start-up state (vhost --wait-for-rpc) and serve every method")
    p.set_defaults(func=_void("framework_start_init"))

    p = subparsers.add_parser("framework_wait_init", help="Wait until the target serves every method")
    p.set_defaults(func=_void("framework_wait_init"))

    p = subparsers.add_parser("spdk_kill_instance", help="Send the target a signal")
    p.add_argument("sig_name", choices=["SIGINT", "SIGTERM", "SIGQUIT", "SIGHUP", "SIGKILL", "SIGUSR1"],
                   help="SIGINT or SIGTERM: clean shutdown; SIGKILL: as a crash")
    p.set_defaults(func=_void("spdk_kill_instance", "sig_name"))

    p = subparsers.add_parser("thread_get_stats", help="Busy and idle time of each reactor thread")
    p.set_defaults(func=_no_params("thread_get_stats"))

    p = subparsers.add_parser("bdev_wait_for_examine",
                              help="Wait until every bdev is examined (at once here)")
    p.set_defaults(func=_void("bdev_wait_for_examine"))

    levels = ["ERROR", "WARNING", "NOTICE", "INFO", "DEBUG"]
    for name, what in (("log_set_print_level", "what the target prints"),
                       ("log_set_level", "SPDK's syslog level (kept; this target prints only)")):
        p = subparsers.add_parser(name, help=f"Set {what}")
        p.add_argument("level", choices=levels, help="Log level")
        p.set_defaults(func=_void(name, "level"))
    for name in ("log_get_print_level", "log_get_level", "log_get_flags"):
        p = subparsers.add_parser(name, help=name.replace("_", " ").replace("log get", "Show the log"))
        p.set_defaults(func=_no_params(name))
    for name, what in (("log_set_flag", "Turn on"), ("log_clear_flag", "Turn off")):
        p = subparsers.add_parser(name, help=f"{what} the debug lines of an area")
        p.add_argument("flag", help="vhost, vhost_ring, bdev, ... (log_get_flags lists them), or all")
        p.set_defaults(func=_void(name, "flag"))

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
