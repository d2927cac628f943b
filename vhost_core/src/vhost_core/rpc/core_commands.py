"""The core's ``vhost-rpc`` sub-commands: its daemon commands (:mod:`vhost_core.core_methods`),
``rpc_get_methods``, and the procedures SPDK's ``rpc.py`` runs client-side (``save_config``,
``load_config``: several calls each), all built from command declarations.

Deprecated spellings (``get_bdevs`` ...) send the *old* RPC name with the old
parameters, exactly as SPDK's old client did; the server maps the alias.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import attrs

from vhost_core.commands import Cli, Command, CommandRegistry
from vhost_core.core_methods import CORE

from .cli import NO_OUTPUT, add_commands
from .registry import RpcGetMethodsParams, param

__all__ = ["CLIENT", "contribute"]

_INDENT_HELP = "Indent level; below 0 means compact. Default: 2"
_BATCHES_HELP = "Keep batch arrays (nothing here is batched: the same output)"


@attrs.frozen
class SaveConfigArgs:
    indent: int = param(2, "-i", "--indent", help=_INDENT_HELP)
    subsystems: str | None = param(None, "-s", "--subsystems",
                                   help="Comma-separated subsystems (and their dependencies) to save")
    with_batches: bool = param(False, "--with-batches", negatable=True, help=_BATCHES_HELP)


@attrs.frozen
class SaveSubsystemConfigArgs:
    name: str = param(attrs.NOTHING, "-n", "--name", help="Name of the subsystem (bdev, vhost_blk, vhost_scsi)")
    indent: int = param(2, "-i", "--indent", help=_INDENT_HELP)
    with_batches: bool = param(False, "--with-batches", negatable=True, help=_BATCHES_HELP)


@attrs.frozen
class LoadConfigArgs:
    include_aliases: bool = param(False, "-i", "--include-aliases", help="Accept deprecated method names")
    json_conf: str | None = param(None, "-j", "--json-conf", help="The JSON file (default: stdin)")


@attrs.frozen
class LoadSubsystemConfigArgs:
    json_conf: str | None = param(None, "-j", "--json-conf", help="The JSON file (default: stdin)")


def _indent(args: Any) -> int:
    return 2 if args.indent is None else args.indent


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
                                                        "with_batches": bool(args.with_batches)})}
        for e in subsystems if e["subsystem"] in wanted]}
    _dump(config, _indent(args))
    return NO_OUTPUT


def _save_subsystem_config(client: Any, args: argparse.Namespace) -> Any:
    _dump({"subsystem": args.name,
           "config": client.call("framework_get_config",
                                 {"name": args.name, "with_batches": bool(args.with_batches)})},
          _indent(args))
    return NO_OUTPUT


def _read_json(source: Any) -> Any:
    if source is None or source is sys.stdin or source == "-":
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
    _check_known(client, [e for s in subsystems for e in s["config"]], bool(args.include_aliases))
    if not subsystems and "framework_start_init" in client.call("rpc_get_methods", {"current": True}):
        client.call("framework_start_init")
    while subsystems:
        allowed = client.call("rpc_get_methods", {"current": True, "include_aliases": bool(args.include_aliases)})
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



#: What ``vhost-rpc`` offers besides the daemon's commands: rpc_get_methods (the RPC registry
#: serves it itself) and SPDK's client-side procedures.
CLIENT = CommandRegistry()
CLIENT.add(Command("rpc_get_methods", None, params=RpcGetMethodsParams, rpc=False,
                   help="List the RPC methods the target supports"))
CLIENT.add(Command("save_config", None, params=SaveConfigArgs, rpc=False,
                   cli=Cli(run=_save_config, help="Print the live configuration as JSON (SPDK format)")))
CLIENT.add(Command("save_subsystem_config", None, params=SaveSubsystemConfigArgs, rpc=False,
                   cli=Cli(run=_save_subsystem_config, help="Print one subsystem's live configuration")))
CLIENT.add(Command("load_config", None, params=LoadConfigArgs, rpc=False,
                   cli=Cli(run=_load_config, help="Apply a configuration written by save_config")))
CLIENT.add(Command("load_subsystem_config", None, params=LoadSubsystemConfigArgs, rpc=False,
                   cli=Cli(run=_load_subsystem_config,
                           help="Apply one subsystem's configuration written by save_subsystem_config")))


def contribute(subparsers: Any) -> None:
    add_commands(subparsers, [*CLIENT, *CORE])
