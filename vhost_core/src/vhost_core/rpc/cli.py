"""``vhost-rpc``: command line client, modelled on SPDK's ``scripts/rpc.py``.

Its sub-commands are the daemon's commands (:mod:`vhost_core.commands`): the core's and
every installed plugin's, each built from its one declaration (:func:`add_commands`), the
deprecated aliases included.  Underneath, commands come from *contributors*: callables
``contribute(subparsers)`` that add argparse sub-commands and bind a handler with
``sub.set_defaults(func=handler)``, where ``handler(client, args) -> result``.
The result is printed like rpc.py's ``print_json``/``print_dict``
(``json.dumps(result, indent=2)`` with the surrounding quotes of a bare string
stripped, so a created bdev's name prints as ``Malloc0``).  A handler returns
:data:`NO_OUTPUT` (or ``None``) to print nothing, as rpc.py does for
``*_delete`` commands.

A sub-command that is a deprecated spelling sets
``set_defaults(deprecated_use="new_name")``; after it succeeds the CLI prints
``"<old> is deprecated, use <new> instead."`` to stderr, like rpc.py.
"""

from __future__ import annotations

import argparse
import collections.abc
import json
import logging
import shlex
import sys
import time
import types
import typing
from typing import TYPE_CHECKING, Any, Callable, Iterable, TextIO

import attrs

from .client import RpcClient
from .registry import CLI, CliSpec, RpcError

if TYPE_CHECKING:  # pragma: no cover
    from vhost_core.commands import Command

__all__ = [
    "DEFAULT_RPC_SOCKET",
    "NO_OUTPUT",
    "Contributor",
    "add_commands",
    "build_parser",
    "main",
    "print_array",
    "print_result",
]

#: Same default as SPDK, so SPDK's rpc.py reaches us without ``-s``.
DEFAULT_RPC_SOCKET = "/var/tmp/spdk.sock"

Contributor = Callable[[Any], None]


class _NoOutput:
    _instance: "_NoOutput | None" = None

    def __new__(cls) -> "_NoOutput":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NO_OUTPUT"

    def __bool__(self) -> bool:
        return False


#: Returned by a handler to print nothing.
NO_OUTPUT: Any = _NoOutput()


def print_result(result: Any, file: TextIO | None = None) -> None:
    """Print an RPC result the way SPDK's rpc.py does (``print_json``)."""
    if result is NO_OUTPUT or result is None:
        return
    print(json.dumps(result, indent=2).strip('"'), file=file if file is not None else sys.stdout)


def print_array(items: Iterable[str], file: TextIO | None = None) -> None:
    """rpc.py's ``print_array``: shell-quoted words on one line."""
    print(" ".join(shlex.quote(str(v)) for v in items), file=file if file is not None else sys.stdout)


class _DryRunClient:
    """``--dry-run``: show each request instead of sending it."""

    def __init__(self) -> None:
        self._next_id = 0

    def __enter__(self) -> "_DryRunClient":
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        self._next_id += 1
        req: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": self._next_id}
        if params:
            req["params"] = params
        print("Request:\n" + json.dumps(req, indent=2))
        return NO_OUTPUT


# --------------------------------------------------------------------------
# Sub-commands from command declarations
# --------------------------------------------------------------------------


def _plain_type(tp: Any) -> tuple[Any, bool]:
    """The annotation without None, and whether it allowed None."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is getattr(types, "UnionType", None):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else Any), True
    return tp, False


def _comma_list(text: str) -> list[str]:
    return [v for v in text.split(",") if v]


def _argument(tp: Any, spec: CliSpec, required: bool, default: Any, help_text: str,
              positional: bool) -> dict[str, Any]:
    tp, _ = _plain_type(tp)
    kw: dict[str, Any] = {"help": help_text or None}
    origin = typing.get_origin(tp)
    if tp is bool and not positional:
        negatable = spec.negatable or default is True
        kw["action"] = argparse.BooleanOptionalAction if negatable else "store_true"
        kw["default"] = None if negatable else False
        return kw
    if origin is typing.Literal:
        kw["choices"] = list(typing.get_args(tp))
    elif tp in (int, float, str):
        kw["type"] = tp
    elif tp in (list, tuple) or origin in (list, tuple, collections.abc.Sequence):
        kw["type"] = _comma_list
    if spec.choices is not None:
        kw["choices"] = list(spec.choices)
    if spec.metavar:
        kw["metavar"] = spec.metavar
    if positional:
        if not required:
            kw["nargs"] = "?"
    else:
        kw["default"] = None
        if required:
            kw["required"] = True
    return kw


def _field_help(f: attrs.Attribute, spec: CliSpec) -> str:
    md = f.metadata or {}
    if spec.help:
        return spec.help
    if md.get("help"):
        return md["help"]
    if md.get("extension"):
        return md["extension"]
    refusal = md.get("vhost_unsupported")
    if refusal:
        return f"not supported: {refusal['why']}"
    return ""


#: What the top-level parser and the runner keep in the namespace: a parameter of that name
#: gets another dest.
_RESERVED = frozenset({"server_addr", "timeout", "conn_retries", "verbose", "dry_run", "called_rpc_name",
                       "func", "method_name", "deprecated_use"})


def _dest(key: str) -> str:
    return f"{key}_param" if key in _RESERVED else key


def _add_subcommand(subparsers: Any, command: Command, name: str, deprecated_use: str | None) -> None:
    cli = command.cli
    summary = cli.help or command.summary()
    p = subparsers.add_parser(name, help=(summary + (" (deprecated)" if deprecated_use else "")) or None,
                              description=summary or None)
    positional: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}
    order: list[str] = []
    keys: list[str] = []
    flags: set[str] = set()         # store_true: False means "not given"
    if command.params is not None:
        hints = typing.get_type_hints(command.params)
        for f in attrs.fields(command.params):
            spec = (f.metadata or {}).get(CLI) or CliSpec()
            if not f.init or spec.hidden:
                continue
            key = getattr(f, "alias", None) or f.name.lstrip("_")
            required = f.default is attrs.NOTHING
            is_pos = spec.positional if spec.positional is not None else (required and not spec.flags)
            kw = _argument(hints.get(f.name, Any), spec, required, None if required else f.default,
                           _field_help(f, spec), is_pos)
            keys.append(key)
            if kw.get("action") == "store_true":
                flags.add(key)
            if is_pos:
                positional[key] = ((_dest(key),), kw)
                order.append(key)
            else:
                p.add_argument(*(spec.flags or (f"--{key.replace('_', '-')}",)), dest=_dest(key), **kw)
    for a in cli.arguments:
        kw = {"help": a.help or None}
        for k in ("type", "nargs", "metavar"):
            if getattr(a, k) is not None:
                kw[k] = getattr(a, k)
        keys.append(a.name)
        if a.flags:
            p.add_argument(*a.flags, dest=a.name, **kw)
        else:
            positional[a.name] = ((a.name,), kw)
            order.append(a.name)
    for key in (cli.positionals or tuple(order)):
        args, kw = positional[key]
        p.add_argument(*args, **kw)

    def run(client: Any, ns: argparse.Namespace) -> Any:
        if cli.run is not None:
            return cli.run(client, ns)
        values = {k: getattr(ns, _dest(k), None) for k in keys}
        given = {k: v for k, v in values.items() if v is not None and not (k in flags and v is False)}
        params = cli.to_params(given) if cli.to_params is not None else given
        result = client.call(ns.method_name, params or None)
        if callable(cli.prints):
            cli.prints(result)
            return NO_OUTPUT
        return result if cli.prints else NO_OUTPUT

    p.set_defaults(func=run, method_name=name)
    if deprecated_use:
        p.set_defaults(deprecated_use=deprecated_use)


def add_commands(subparsers: Any, commands: Iterable[Command]) -> None:
    """A sub-command for each command and each of its deprecated aliases (which send the
    old name, and say what to use instead)."""
    for command in commands:
        _add_subcommand(subparsers, command, command.name, command.deprecated)
        for alias in command.aliases:
            _add_subcommand(subparsers, command, alias, command.name)


# --------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------


def _add_call_command(subparsers: Any) -> None:
    def call(client: Any, args: argparse.Namespace) -> Any:
        params = _load_params(args.params)
        return client.call(args.method, params)

    p = subparsers.add_parser(
        "call",
        help="Call any RPC method: call METHOD ['{\"json\": \"params\"}' | -]",
        description="Send METHOD with optional params given as a JSON object "
        "(or '-' to read it from stdin) and print the result.",
    )
    p.add_argument("method", help="RPC method name, e.g. bdev_get_bdevs")
    p.add_argument("params", nargs="?", help="params as a JSON object, or '-' for stdin")
    p.set_defaults(func=call)


def _load_params(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    if text == "-":
        text = sys.stdin.read()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _UsageError(f"params are not valid JSON: {exc}") from None
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _UsageError("params must be a JSON object, e.g. '{\"name\": \"Malloc0\"}'")
    return value


class _UsageError(Exception):
    pass


def build_parser(contributors: Iterable[Contributor]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vhost-rpc",
        description="vhost target JSON-RPC command line interface (SPDK rpc.py compatible)",
    )
    parser.add_argument(
        "-s", "--server", dest="server_addr", default=DEFAULT_RPC_SOCKET, metavar="SOCKET",
        help=f"RPC Unix socket path. Default: {DEFAULT_RPC_SOCKET}",
    )
    parser.add_argument(
        "-t", "--timeout", dest="timeout", type=float, default=60.0, metavar="SECONDS",
        help="Seconds to wait for a response. Default: 60.0",
    )
    parser.add_argument(
        "-r", "--conn-retries", dest="conn_retries", type=int, default=0, metavar="N",
        help="Retry connecting N times with 0.2s interval. Default: 0",
    )
    parser.add_argument(
        "-v", "--verbose", dest="verbose", action="count", default=0,
        help="Log requests and responses (-v: INFO, -vv: DEBUG)",
    )
    parser.add_argument(
        "--dry-run", dest="dry_run", action="store_true",
        help="Print the requests instead of sending them",
    )
    subparsers = parser.add_subparsers(dest="called_rpc_name", metavar="COMMAND", help="RPC commands")
    _add_call_command(subparsers)
    for contribute in contributors:
        try:
            contribute(subparsers)
        except Exception as exc:  # a broken plugin must not take the core CLI down
            name = getattr(contribute, "__qualname__", repr(contribute))
            print(f"vhost-rpc: warning: commands from {name} not loaded: {exc}", file=sys.stderr)
    return parser


def _plugin_contributors() -> list[Contributor]:
    """One contributor per plugin: its commands (vhost_register_commands), as sub-commands."""
    try:
        from vhost_core.plugins import collect, load_plugins  # type: ignore[import-not-found]
    except ImportError:
        return []
    try:
        pm = load_plugins()
    except Exception as exc:
        print(f"vhost-rpc: warning: plugins not loaded: {exc}", file=sys.stderr)
        return []

    def contributor(name: str) -> Contributor:
        def plugin_commands(subparsers: Any) -> None:
            add_commands(subparsers, collect(pm, name).commands)

        plugin_commands.__qualname__ = f"plugin {name}"
        return plugin_commands

    return [contributor(name) for name in pm.names()]


def _default_contributors() -> list[Contributor]:
    from . import core_commands

    return [core_commands.contribute, *_plugin_contributors()]


# --------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------


def _replace_arg_underscores(argv: list[str]) -> None:
    # rpc.py accepts --tgt_name for --tgt-name; so do we.
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if arg.startswith("--") and "_" in arg:
            opt, sep, value = arg.partition("=")
            argv[i] = opt.replace("_", "-") + sep + value


def _setup_logging(verbose: int) -> None:
    if verbose <= 0:
        return
    level = logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s: %(message)s")
    logging.getLogger("vhost.rpc").setLevel(level)


def _connect(args: argparse.Namespace) -> Any:
    if args.dry_run:
        return _DryRunClient()
    client = RpcClient(args.server_addr, timeout=args.timeout)
    for _ in range(max(0, args.conn_retries)):
        try:
            client.connect()
            return client
        except ConnectionError:
            time.sleep(0.2)
    client.connect()
    return client


def _format_rpc_error(exc: RpcError) -> str:
    # Same layout as rpc.py's JSONRPCException message.
    request = dict(getattr(exc, "request", None) or {})
    shown = dict(request.get("params") or {})
    if request:
        shown["method"] = request.get("method")
        shown["req_id"] = request.get("id")
    response = getattr(exc, "response", None) or exc.to_json()
    return "\n".join(
        [
            "request:",
            json.dumps(shown, indent=2),
            "Got JSON-RPC error response",
            "response:",
            json.dumps(response, indent=2),
        ]
    )


def _run_command(client: Any, args: argparse.Namespace) -> None:
    result = args.func(client, args)
    print_result(result)
    new = getattr(args, "deprecated_use", None)
    if new:
        print(f"{args.called_rpc_name} is deprecated, use {new} instead.", file=sys.stderr)


def _run_script(parser: argparse.ArgumentParser, client: Any, lines: Iterable[str]) -> int:
    """rpc.py's stdin mode: one command per line over one connection."""
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        argv = shlex.split(line)
        _replace_arg_underscores(argv)
        hint = _missing_plugin_hint(parser, argv)
        if hint is not None:
            print(hint, file=sys.stderr)
            return 2
        args = parser.parse_args(argv)
        if not hasattr(args, "func"):
            print(f"vhost-rpc: no command in line: {line}", file=sys.stderr)
            return 1
        try:
            _run_command(client, args)
        except RpcError as exc:
            print(f"vhost-rpc: failed: {line}", file=sys.stderr)
            print(_format_rpc_error(exc), file=sys.stderr)
            return 1
    return 0


#: Global options that take a value (the command is the first word after them).
_VALUE_OPTIONS = {"-s", "--server", "-t", "--timeout", "-r", "--conn-retries"}


def _command_word(argv: list[str]) -> str | None:
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _VALUE_OPTIONS:
            skip = True
        elif not arg.startswith("-"):
            return arg
    return None


def _missing_plugin_hint(parser: argparse.ArgumentParser, argv: list[str]) -> str | None:
    """For a known SPDK method whose plugin is not installed: which wheel provides it."""
    command = _command_word(argv)
    if command is None:
        return None
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            return None
    try:
        from vhost_core.plugins import provider_of
    except ImportError:  # pragma: no cover
        return None
    dist = provider_of(command)
    if dist is None:
        return None
    return (f"vhost-rpc: '{command}' is provided by the {dist} plugin, which is not installed "
            f"(or is disabled) here: pip install {dist}")


def main(argv: list[str] | None = None, *, contributors: Iterable[Contributor] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _replace_arg_underscores(argv)
    parser = build_parser(_default_contributors() if contributors is None else contributors)
    hint = _missing_plugin_hint(parser, argv)
    if hint is not None:
        print(hint, file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)

    script_mode = not hasattr(args, "func")
    if script_mode and (sys.stdin is None or sys.stdin.isatty()):
        parser.print_help(sys.stderr)
        return 1

    try:
        client = _connect(args)
        with client:
            if script_mode:
                return _run_script(parser, client, sys.stdin)
            _run_command(client, args)
    except RpcError as exc:
        print(_format_rpc_error(exc), file=sys.stderr)
        return 1
    except _UsageError as exc:
        print(f"vhost-rpc: {exc}", file=sys.stderr)
        return 2
    except (ConnectionError, TimeoutError) as exc:
        print(f"vhost-rpc: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    # python -m: run the imported module's main, so that NO_OUTPUT is the one plugins import.
    from vhost_core.rpc import cli as _cli

    sys.exit(_cli.main())
