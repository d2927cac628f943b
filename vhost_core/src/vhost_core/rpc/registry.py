"""JSON-RPC method registry: names, deprecated aliases, parameter decoding.

A handler is a plain function.  When registered with ``params=SomeAttrsClass``
the JSON ``params`` object is decoded into an instance of that (frozen) attrs
class and the handler is called as ``fn(params_obj)``; with ``params=None`` the
handler is called as ``fn()`` and any parameter is rejected.

Errors follow SPDK's conventions: JSON-RPC 2.0 codes for protocol level
problems (``RpcError``) and negative errno values for the domain's errors, which
handlers raise as :class:`vhost_core.errors.VhostError` (``VhostError(errno.ENODEV,
"...")``) and this layer answers as ``RpcError(-errno, message)``.

SPDK's clients send every optional parameter they know, with its default value, so a
params class declares SPDK's *whole* parameter set for its method.  A parameter this
target does not honour is declared with :func:`unsupported`: its default passes
silently, any other value is refused with an error naming the parameter, the value
and why.  A name SPDK never had is refused with the list of valid ones.

Methods carry SPDK's RPC states (:class:`RpcState`): until the daemon leaves
``STARTUP`` (``framework_start_init``, or at once without ``--wait-for-rpc``) only
methods registered for ``STARTUP`` run, and the others get SPDK's own error.
"""

from __future__ import annotations

import asyncio
import collections.abc
import contextlib
import enum
import errno
import inspect
import json
import logging
import types
import typing
from typing import Any, Callable, Iterable, Sequence

import attrs

from vhost_core.errors import VhostError

__all__ = [
    "INVALID_STATE",
    "PARSE_ERROR",
    "INVALID_REQUEST",
    "METHOD_NOT_FOUND",
    "INVALID_PARAMS",
    "INTERNAL_ERROR",
    "RpcError",
    "RpcMethod",
    "RpcRegistry",
    "RpcState",
    "CliSpec",
    "cli",
    "extension",
    "param",
    "unsupported",
]

log = logging.getLogger("vhost.rpc")

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
#: SPDK_JSONRPC_ERROR_INVALID_STATE: the method is not allowed in the current RPC state.
INVALID_STATE = -1


class RpcState(enum.Flag):
    """SPDK's RPC states (``SPDK_RPC_STARTUP`` / ``SPDK_RPC_RUNTIME``)."""

    #: Before ``framework_start_init`` (the daemon was started with ``--wait-for-rpc``).
    STARTUP = enum.auto()
    #: Serving: every bdev and controller method.
    RUNTIME = enum.auto()


class RpcError(Exception):
    """An error that travels to the client as a JSON-RPC error object."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = int(code)
        self.message = str(message)
        self.data = data

    def to_json(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            err["data"] = self.data
        return err

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"RpcError({self.code}, {self.message!r})"


# --------------------------------------------------------------------------
# JSON -> attrs decoding
# --------------------------------------------------------------------------

_NoneType = type(None)


def _show(value: Any, limit: int = 60) -> str:
    """Render a received value in an error message as JSON, truncated."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


_UNSUPPORTED = "vhost_unsupported"
#: Field metadata key of a parameter's command-line spelling (CliSpec).
CLI = "vhost_cli"


@attrs.frozen
class CliSpec:
    """How ``vhost-rpc`` spells one parameter (see :func:`cli`)."""

    flags: tuple[str, ...] = ()
    positional: bool | None = None
    help: str | None = None
    choices: tuple[Any, ...] | None = None
    metavar: str | None = None
    hidden: bool = False
    negatable: bool = False


def cli(*flags: str, positional: bool | None = None, help: str | None = None,
        choices: Sequence[Any] | None = None, metavar: str | None = None, hidden: bool = False,
        negatable: bool = False) -> dict[str, Any]:
    """Field metadata: the parameter's ``vhost-rpc`` spelling, as SPDK's ``rpc.py`` has it.

    ``flags``: its options (``"-b", "--name"``); without flags a required parameter is a
    positional argument and an optional one ``--its-name``.  ``positional=True`` makes an
    optional parameter an optional positional argument.  ``hidden``: not on the command
    line (the command's CLI computes it).  ``help`` defaults to the field's ``help`` (or
    its unsupported/extension text); ``choices`` default to a Literal's values.  A bool
    is a flag that sends true; ``negatable`` adds ``--no-...``, which sends false.
    """
    return {CLI: CliSpec(tuple(flags), positional, help, tuple(choices) if choices is not None else None,
                         metavar, hidden, negatable)}


def param(default: Any = attrs.NOTHING, *flags: str, help: str | None = None, **cli_kw: Any) -> Any:
    """An attrs field for a command's parameter: its default, its ``vhost-rpc`` flags (see
    :func:`cli`) and its help (``rpc_get_methods`` schemas and ``vhost-rpc --help``)."""
    metadata = cli(*flags, **cli_kw)
    if help is not None:
        metadata["help"] = help
    return attrs.field(default=default, metadata=metadata)


def unsupported(default: Any, why: str, *, accepts: tuple[Any, ...] = (), same_as: str | None = None,
                cli: dict[str, Any] | None = None) -> Any:
    """Declare a parameter SPDK has and this target does not honour.

    The default (and ``null``, any value in ``accepts``, or the value of the field named
    ``same_as``) is accepted silently: it asks for what this target does anyway.  Any
    other value is refused (``-ENOTSUP``) with a message naming the parameter, the value
    and ``why`` (what this target does instead, or how to do without it).  ``cli``: its
    ``vhost-rpc`` spelling (:func:`cli`), so that an SPDK command line pasted in parses.
    """
    return attrs.field(default=default, metadata={_UNSUPPORTED: {"why": why, "accepts": tuple(accepts),
                                                                 "same_as": same_as}, **(cli or {})})


def extension(default: Any, help: str, *, cli: dict[str, Any] | None = None) -> Any:
    """Declare a parameter of this target's own that SPDK does not have (``help`` says what it
    does); SPDK's clients never send it, this target's CLI and JSON configs may."""
    return attrs.field(default=default, metadata={"extension": help, **(cli or {})})


def _refusal(f: attrs.Attribute) -> dict[str, Any] | None:
    return f.metadata.get(_UNSUPPORTED) if f.metadata else None


def _check_unsupported(cls: type, obj: Any, method: str, prefix: str) -> None:
    for f in attrs.fields(cls):
        rule = _refusal(f)
        if rule is None:
            continue
        value = getattr(obj, f.name)
        ok = [f.default, *rule["accepts"]]
        if rule["same_as"] is not None:
            ok.append(getattr(obj, rule["same_as"]))
        if value is None or any(value == v and type(value) is type(v) for v in ok):
            continue
        raise RpcError(-errno.ENOTSUP, f"{method}: {prefix}{_field_key(f)}={_show(value)} is not supported "
                                       f"by this target: {rule['why']}")


def _describe(tp: Any) -> str:
    """Human description of an expected type ("an integer", "a list of strings")."""
    if tp is Any or tp is object:
        return "any value"
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        non_none = [a for a in args if a is not _NoneType]
        parts = [_describe(a) for a in non_none]
        if len(non_none) < len(args):
            parts.append("null")
        return " or ".join(parts)
    if origin is typing.Literal:
        return "one of " + ", ".join(_show(a) for a in args)
    if tp is bool:
        return "a boolean"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if tp in (list, tuple) or origin in (list, tuple, collections.abc.Sequence):
        if args and args[0] is not Ellipsis:
            inner = _describe(args[0])
            for article in ("an ", "a "):
                if inner.startswith(article):
                    inner = inner[len(article):]
                    break
            return f"a list of {inner}s"
        return "a list"
    if tp is dict or origin in (dict, collections.abc.Mapping):
        return "an object"
    if attrs.has(tp):
        return "an object"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(_show(m.value) for m in tp)
    return f"a {getattr(tp, '__name__', tp)}"


class _Mismatch(Exception):
    """Internal: value does not match the annotation (message is context-free)."""

    def __init__(self, path: str, expected: str, value: Any) -> None:
        super().__init__(path)
        self.path = path
        self.expected = expected
        self.value = value


def _convert(value: Any, tp: Any, path: str, method: str) -> Any:
    """Check ``value`` (decoded JSON) against annotation ``tp`` and convert it."""
    if tp is Any or tp is object or tp is None:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if origin is typing.Union or origin is types.UnionType:
        if value is None and _NoneType in args:
            return None
        candidates = [a for a in args if a is not _NoneType]
        if len(candidates) == 1:
            try:
                return _convert(value, candidates[0], path, method)
            except _Mismatch as exc:
                if exc.path == path:
                    raise _Mismatch(path, _describe(tp), value) from None
                raise
        for cand in candidates:
            try:
                return _convert(value, cand, path, method)
            except _Mismatch:
                continue
        raise _Mismatch(path, _describe(tp), value)

    if origin is typing.Literal:
        for allowed in args:
            if value == allowed and type(value) is type(allowed):
                return value
        raise _Mismatch(path, _describe(tp), value)

    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch(path, _describe(tp), value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch(path, _describe(tp), value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch(path, _describe(tp), value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch(path, _describe(tp), value)

    if tp in (list, tuple) or origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, list):
            raise _Mismatch(path, _describe(tp), value)
        if args and args[0] is not Ellipsis and not (origin is tuple and len(args) != 2):
            elem_tp = args[0]
            out = []
            for i, item in enumerate(value):
                try:
                    out.append(_convert(item, elem_tp, f"{path}[{i}]", method))
                except _Mismatch as exc:
                    if exc.path == f"{path}[{i}]":
                        # Report as a whole-list type error, pointing at the element.
                        raise _Mismatch(path, _describe(tp), value) from None
                    raise
            value = out
        if tp is tuple or origin is tuple:
            return tuple(value)
        return list(value)

    if tp is dict or origin in (dict, collections.abc.Mapping):
        if not isinstance(value, dict):
            raise _Mismatch(path, _describe(tp), value)
        if len(args) == 2 and args[1] is not Any:
            return {k: _convert(v, args[1], f"{path}.{k}", method) for k, v in value.items()}
        return dict(value)

    if attrs.has(tp):
        if not isinstance(value, dict):
            raise _Mismatch(path, _describe(tp), value)
        return _build(tp, value, method, prefix=f"{path}.")

    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        for member in tp:
            if member.value == value and type(member.value) is type(value):
                return member
        raise _Mismatch(path, _describe(tp), value)

    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _Mismatch(path, _describe(tp), value)
    return value


_hints_cache: dict[type, dict[str, Any]] = {}


def _field_types(cls: type) -> dict[str, Any]:
    hints = _hints_cache.get(cls)
    if hints is None:
        try:
            hints = typing.get_type_hints(cls)
        except Exception:  # unresolved forward references: fall back to raw
            hints = {}
        resolved: dict[str, Any] = {}
        for f in attrs.fields(cls):
            resolved[f.name] = hints.get(f.name, f.type if not isinstance(f.type, str) else Any)
        hints = resolved
        _hints_cache[cls] = hints
    return hints


def _field_key(f: attrs.Attribute) -> str:
    """JSON key for an attrs field (private ``_x`` fields are spelled ``x``)."""
    return getattr(f, "alias", None) or f.name.lstrip("_")


def _required(f: attrs.Attribute) -> bool:
    return f.default is attrs.NOTHING and f.init


def _build(cls: type, obj: dict[str, Any], method: str, prefix: str = "") -> Any:
    fields = [f for f in attrs.fields(cls) if f.init]
    by_key = {_field_key(f): f for f in fields}
    for key in obj:
        if key not in by_key:
            valid = ", ".join(by_key) if by_key else "(none)"
            raise RpcError(
                INVALID_PARAMS,
                f"{method}: unknown parameter '{prefix}{key}'; valid parameters: {valid}",
            )
    for key, f in by_key.items():
        if _required(f) and key not in obj:
            raise RpcError(INVALID_PARAMS, f"{method}: missing required parameter '{prefix}{key}'")
    types_ = _field_types(cls)
    kwargs: dict[str, Any] = {}
    for key, f in by_key.items():
        # null for an optional parameter means "absent": SPDK clients write it so.
        if key not in obj or (obj[key] is None and not _required(f)):
            continue
        try:
            kwargs[key] = _convert(obj[key], types_.get(f.name, Any), f"{prefix}{key}", method)
        except _Mismatch as exc:
            raise RpcError(
                INVALID_PARAMS,
                f"{method}: parameter '{exc.path}' must be {exc.expected}, got {_show(exc.value)}",
            ) from None
    try:
        built = cls(**kwargs)
    except RpcError:
        raise
    except (ValueError, TypeError) as exc:
        raise RpcError(INVALID_PARAMS, f"{method}: {exc}") from None
    _check_unsupported(cls, built, method, prefix)
    return built


def _describe_params(cls: type | None) -> list[dict[str, Any]]:
    if cls is None:
        return []
    types_ = _field_types(cls)
    out = []
    for f in attrs.fields(cls):
        if not f.init:
            continue
        entry: dict[str, Any] = {
            "name": _field_key(f),
            "type": _describe(types_.get(f.name, Any)),
            "required": _required(f),
        }
        if not _required(f):
            default = f.default
            if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
                default = None if default.takes_self else default.factory()
            try:
                json.dumps(default)
                entry["default"] = default
            except (TypeError, ValueError):
                entry["default"] = repr(default)
        help_text = f.metadata.get("help") if f.metadata else None
        if help_text:
            entry["help"] = help_text
        if f.metadata and "extension" in f.metadata:
            entry["extension"] = f.metadata["extension"]
        rule = _refusal(f)
        if rule is not None:
            entry["unsupported"] = rule["why"]
            if rule["accepts"]:
                entry["accepts"] = list(rule["accepts"])
            if rule["same_as"]:
                entry["same_as"] = rule["same_as"]
        out.append(entry)
    return out


# --------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------


@attrs.frozen
class RpcMethod:
    """One registered method (aliases point at the same object)."""

    name: str
    fn: Callable[..., Any]
    params: type | None
    deprecated_aliases: tuple[str, ...]
    owner: str | None
    #: The RPC states in which the method may be called (SPDK's state mask).
    states: RpcState = RpcState.RUNTIME
    #: An old SPDK name kept as a method of its own: what to use instead.  Listed, like
    #: aliases, only with ``include_aliases``; the first call logs a deprecation warning.
    deprecated: str | None = None
    #: The handler may wait (drains, stops queues): the RPC server runs it on a worker
    #: thread so that its event loop keeps answering other clients.
    blocking: bool = False

    def decode(self, params: Any, called_as: str | None = None) -> Any:
        """Turn the JSON ``params`` value into what the handler takes."""
        label = called_as or self.name
        if params is None:
            params = {}
        if isinstance(params, list):
            raise RpcError(
                INVALID_PARAMS,
                f"{label}: positional (array) params are not supported; pass an object",
            )
        if not isinstance(params, dict):
            raise RpcError(INVALID_PARAMS, f"{label}: params must be an object, got {_show(params)}")
        if self.params is None:
            if params:
                key = next(iter(params))
                raise RpcError(
                    INVALID_PARAMS,
                    f"{label}: unknown parameter '{key}'; this method takes no parameters",
                )
            return None
        return _build(self.params, params, label)


class RpcRegistry:
    """Name -> handler table shared by the server, the CLI and introspection.

    ``builtins=True`` (default) registers ``rpc_get_methods`` (deprecated alias
    ``get_rpc_methods``) on construction, answering the way SPDK's does.

    ``rpc_state`` is the current RPC state (``RUNTIME`` unless the owner says otherwise);
    a method called outside its ``states`` is refused with SPDK's error.
    """

    def __init__(self, *, builtins: bool = True) -> None:
        self.rpc_state = RpcState.RUNTIME
        self._methods: dict[str, RpcMethod] = {}
        self._aliases: dict[str, str] = {}
        self._hints: dict[str, str] = {}
        #: Asked, for a method neither registered nor given a hint, what else to answer
        #: (which plugin serves it); None: nothing.
        self.hint_resolver: Callable[[str], str | None] | None = None
        self._warned: set[str] = set()
        #: Held around every handler call; the daemon sets its control lock here so
        #: that no RPC races a vhost-user message.
        self.lock: Any = contextlib.nullcontext()
        if builtins:
            self.add(
                "rpc_get_methods",
                self._rpc_get_methods,
                params=RpcGetMethodsParams,
                deprecated_aliases=("get_rpc_methods",),
                owner="vhost-core",
                states=RpcState.STARTUP | RpcState.RUNTIME,
            )

    # -- registration -----------------------------------------------------

    def add(
        self,
        name: str,
        fn: Callable[..., Any],
        *,
        params: type | None = None,
        deprecated_aliases: Sequence[str] = (),
        owner: str | None = None,
        states: RpcState = RpcState.RUNTIME,
        deprecated: str | None = None,
        blocking: bool = False,
    ) -> RpcMethod:
        """Register ``fn`` as ``name``; ``states``: where it may be called (default: once
        the daemon serves, as SPDK's ``SPDK_RPC_RUNTIME``); ``deprecated``: ``name`` is an
        old SPDK name and this is what to use instead; ``blocking``: ``fn`` may wait, run
        it off the server's event loop."""
        if isinstance(deprecated_aliases, str):
            deprecated_aliases = (deprecated_aliases,)
        if params is not None and not attrs.has(params):
            raise TypeError(f"RPC method '{name}': params must be an attrs class, got {params!r}")
        for n in (name, *deprecated_aliases):
            if not isinstance(n, str) or not n:
                raise ValueError(f"invalid RPC method name {n!r}")
            existing = self._lookup(n)
            if existing is not None:
                raise ValueError(
                    f"RPC method '{n}' is already registered by {existing.owner or 'an unnamed owner'}"
                )
        if len(set((name, *deprecated_aliases))) != 1 + len(deprecated_aliases):
            raise ValueError(f"RPC method '{name}': duplicate name among its aliases")
        m = RpcMethod(
            name=name,
            fn=fn,
            params=params,
            deprecated_aliases=tuple(deprecated_aliases),
            owner=owner,
            states=states,
            deprecated=deprecated,
            blocking=blocking,
        )
        self._methods[name] = m
        for alias in deprecated_aliases:
            self._aliases[alias] = name
        return m

    def method(
        self,
        name: str,
        *,
        params: type | None = None,
        deprecated_aliases: Sequence[str] = (),
        owner: str | None = None,
        states: RpcState = RpcState.RUNTIME,
        deprecated: str | None = None,
        blocking: bool = False,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator form of :meth:`add`; returns the function unchanged."""

        def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
            self.add(name, fn, params=params, deprecated_aliases=deprecated_aliases, owner=owner,
                     states=states, deprecated=deprecated, blocking=blocking)
            return fn

        return deco

    def remove(self, name: str) -> None:
        """Unregister a method and its aliases (KeyError if unknown)."""
        m = self._methods.pop(name)
        for alias in m.deprecated_aliases:
            self._aliases.pop(alias, None)

    def set_missing_hint(self, method_name: str, hint: str) -> None:
        """Explain, when ``method_name`` is called but not registered, where it comes from."""
        self._hints[method_name] = hint

    # -- introspection ----------------------------------------------------

    def _lookup(self, name: str) -> RpcMethod | None:
        m = self._methods.get(name)
        if m is None and name in self._aliases:
            m = self._methods[self._aliases[name]]
        return m

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._lookup(name) is not None

    def get(self, name: str) -> RpcMethod | None:
        """The method registered under ``name`` (canonical name or alias), or None."""
        return self._lookup(name)

    def names(self, include_aliases: bool = True, current: bool = False) -> list[str]:
        """Method names, sorted; ``current``: only those callable in the current state."""
        out = [n for n, m in self._methods.items() if not current or self.rpc_state in m.states]
        if include_aliases:
            out.extend(a for a, n in self._aliases.items() if n in out)
        else:
            out = [n for n in out if self._methods[n].deprecated is None]
        return sorted(out)

    def aliases(self) -> dict[str, str]:
        """Deprecated alias -> canonical name."""
        return dict(self._aliases)

    def schema(self, name: str) -> dict[str, Any]:
        """JSON-serialisable description of a method (KeyError if unknown)."""
        m = self._lookup(name)
        if m is None:
            raise KeyError(name)
        doc = inspect.getdoc(m.fn) or ""
        return {
            "name": m.name,
            "owner": m.owner,
            "deprecated_aliases": list(m.deprecated_aliases),
            "deprecated": m.deprecated,
            "states": [s.name.lower() for s in RpcState if s in m.states],
            "params": _describe_params(m.params),
            "help": doc.split("\n\n", 1)[0] if doc else "",
        }

    # -- calling ------------------------------------------------------------

    def _hint(self, name: str) -> str | None:
        hint = self._hints.get(name)
        if hint is None and self.hint_resolver is not None:
            hint = self.hint_resolver(name)
        return hint

    def has_hint(self, name: str) -> bool:
        """Whether calling the unregistered ``name`` answers more than "not found"."""
        return self._hint(name) is not None

    def not_found(self, name: str) -> RpcError:
        """The error calling the unregistered ``name`` answers (with its hint, if any)."""
        return self._not_found(name)

    def _not_found(self, name: str) -> RpcError:
        hint = self._hint(name)
        if hint:
            return RpcError(METHOD_NOT_FOUND, f"Method not found: '{name}'. {hint}")
        return RpcError(METHOD_NOT_FOUND, f"Method not found: '{name}'. See rpc_get_methods for the list.")

    def resolve(self, name: str) -> RpcMethod:
        """Find a method by name or alias (warning once per deprecated alias)."""
        if not isinstance(name, str):
            raise RpcError(INVALID_REQUEST, "Invalid request: 'method' must be a string")
        m = self._lookup(name)
        if m is None:
            raise self._not_found(name)
        if (name != m.name or m.deprecated) and name not in self._warned:
            self._warned.add(name)
            log.warning("rpc: method '%s' is deprecated, use '%s'", name, m.deprecated or m.name)
        return m

    def check_state(self, m: RpcMethod) -> None:
        """Refuse ``m`` outside its states, with SPDK's words (rpc.c ``jsonrpc_handler``)."""
        if self.rpc_state in m.states:
            return
        if self.rpc_state is RpcState.STARTUP:
            raise RpcError(INVALID_STATE, "Method may only be called after framework is initialized "
                                          "using framework_start_init RPC.")
        raise RpcError(INVALID_STATE, "Method may only be called before framework is initialized. "
                                      "Use --wait-for-rpc command line parameter and then issue this RPC "
                                      "before the framework_start_init RPC.")

    def _invoke(self, name: str, params: Any) -> Any:
        m = self.resolve(name)
        self.check_state(m)
        arg = m.decode(params, called_as=name)
        try:
            with self.lock:
                if m.params is None:
                    return m.fn()
                return m.fn(arg)
        except RpcError:
            raise
        except VhostError as exc:
            raise RpcError(-exc.errno, exc.message) from None
        except Exception as exc:
            raise self._internal(name, exc) from exc

    @staticmethod
    def _internal(name: str, exc: BaseException) -> RpcError:
        log.error("rpc: method '%s' failed", name, exc_info=exc)
        text = str(exc) or type(exc).__name__
        return RpcError(INTERNAL_ERROR, f"{name}: {text}")

    def dispatch(self, name: str, params: dict[str, Any] | None = None) -> Any:
        """Call a method synchronously; every failure is an :class:`RpcError`."""
        result = self._invoke(name, params)
        if inspect.isawaitable(result):
            if inspect.iscoroutine(result):
                result.close()
            raise RpcError(
                INTERNAL_ERROR,
                f"{name}: handler is asynchronous; call it through the RPC server (dispatch_async)",
            )
        return result

    async def dispatch_async(self, name: str, params: dict[str, Any] | None = None) -> Any:
        """Like :meth:`dispatch`, but also awaits handlers that return awaitables, and runs
        ``blocking`` methods on a worker thread (the event loop keeps serving)."""
        m = self._lookup(name) if isinstance(name, str) else None
        if m is not None and m.blocking:
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(None, self._invoke, name, params)
        else:
            result = self._invoke(name, params)
        if inspect.isawaitable(result):
            try:
                result = await result
            except RpcError:
                raise
            except VhostError as exc:
                raise RpcError(-exc.errno, exc.message) from None
            except Exception as exc:
                raise self._internal(name, exc) from exc
        return result

    # -- builtin methods ----------------------------------------------------

    def _rpc_get_methods(self, p: "RpcGetMethodsParams") -> list[str]:
        """List the RPC methods this target answers (``current``: those callable now)."""
        return self.names(include_aliases=p.include_aliases, current=p.current)


@attrs.frozen
class RpcGetMethodsParams:
    current: bool = param(False, "-c", "--current", help="only methods callable now")
    include_aliases: bool = param(False, "-i", "--include-aliases", help="include deprecated aliases")


def iter_methods(registry: RpcRegistry) -> Iterable[RpcMethod]:
    """Each registered method once (aliases folded), sorted by name."""
    for name in registry.names(include_aliases=False):
        m = registry.get(name)
        if m is not None:
            yield m
