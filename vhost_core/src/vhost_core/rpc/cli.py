"""``vhost-rpc``: command line client, modelled on SPDK's ``scripts/rpc.py``.

Commands come from *contributors*: callables ``contribute(subparsers)`` that add
argparse sub-commands and bind a handler with
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
import json
import logging
import shlex
import sys
import time
from typing import Any, Callable, Iterable, TextIO

from .client import RpcClient
from .registry import RpcError

__all__ = [
    "DEFAULT_RPC_SOCKET",
    "NO_OUTPUT",
    "Contributor",
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
    try:
        from vhost_core.plugins import load_plugins  # type: ignore[import-not-found]
    except ImportError:
        return []
    try:
        pm = load_plugins()
    except Exception as exc:
        print(f"vhost-rpc: warning: plugins not loaded: {exc}", file=sys.stderr)
        return []

    def plugin_commands(subparsers: Any) -> None:
        pm.hook.vhost_add_cli_commands(subparsers=subparsers)

    return [plugin_commands]


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
