"""Apply an SPDK JSON configuration (``vhost --json FILE``) the way SPDK's lib/init/json_config.c does.

Two passes over the subsystems, in file order: while the daemon is in its start-up state the
methods allowed then run; once it serves (at once, or after ``framework_start_init`` with
``--wait-for-rpc``) the others run.  A method allowed in both states runs in the first pass only.

What SPDK writes and this target has no use for is accepted: options of subsystems without a
meaning here answer with one NOTICE each (see :data:`vhost_core.rpc.spdk.IGNORED`), and methods
of a subsystem this target does not have are skipped with a NOTICE, as SPDK skips those of a
subsystem not linked into the application.  Anything else that fails (a bdev or controller that
cannot be created, a method of ours that does not exist, what is not implemented yet) fails the
load with an error naming the entry, unless ``--json-ignore-init-errors`` says to go on.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import attrs

from vhost_core.log import get_logger, notice

from .registry import RpcError, RpcState
from .spdk import IGNORED

if TYPE_CHECKING:  # pragma: no cover
    from vhost_core.app import App

__all__ = ["ConfigError", "JsonConfig"]

log = get_logger("app_config")

#: Subsystems whose methods this target knows even when it has nothing to say for them.
_KNOWN_SUBSYSTEMS = frozenset({"vhost"} | {spec.subsystem for spec in IGNORED.values()})


class ConfigError(Exception):
    """The configuration cannot be applied; the message names the entry and why."""


@attrs.frozen
class _Entry:
    subsystem: str
    index: int
    method: str
    params: dict[str, Any] | None

    def describe(self, source: str) -> str:
        where = f"{self.subsystem} entry {self.index}" if self.subsystem else f"entry {self.index}"
        return f"{source}: {where} ({self.method}{_short(self.params)})"


def _short(params: dict[str, Any] | None, limit: int = 120) -> str:
    if not params:
        return ""
    text = " " + " ".join(f"{k}={json.dumps(v)}" for k, v in params.items())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _entries(config: Any, source: str) -> list[_Entry]:
    if isinstance(config, list):
        sections = [("", config)]
    elif isinstance(config, dict) and isinstance(config.get("subsystems"), list):
        sections = []
        for sub in config["subsystems"]:
            if not isinstance(sub, dict) or not isinstance(sub.get("subsystem"), str):
                raise ConfigError(f"{source}: each of 'subsystems' must be an object with a 'subsystem' "
                                  f"name, got {json.dumps(sub)[:80]}")
            sections.append((sub["subsystem"], sub.get("config") or []))
    else:
        raise ConfigError(f"{source}: not an SPDK configuration: expected {{\"subsystems\": [...]}} as "
                          f"written by save_config, or a list of {{\"method\", \"params\"}} objects")
    out = []
    for subsystem, calls in sections:
        if not isinstance(calls, list):
            raise ConfigError(f"{source}: the config of subsystem '{subsystem}' must be a list")
        for i, call in enumerate(calls):
            if not isinstance(call, dict) or not isinstance(call.get("method"), str):
                raise ConfigError(f"{source}: {subsystem} entry {i}: expected {{\"method\": ..., "
                                  f"\"params\": {{...}}}}, got {json.dumps(call)[:80]}")
            params = call.get("params")
            if params is not None and not isinstance(params, dict):
                raise ConfigError(f"{source}: {subsystem} entry {i} ({call['method']}): params must be "
                                  f"an object")
            out.append(_Entry(subsystem, i, call["method"], params))
    return out


class JsonConfig:
    """One configuration being applied to ``app``: :meth:`run` once per RPC state."""

    def __init__(self, app: App, config: Any, source: str, ignore_errors: bool = False) -> None:
        self.app = app
        self.source = source
        self.ignore_errors = ignore_errors
        self.entries = _entries(config, source)
        self.errors: list[str] = []
        self._ran: set[int] = set()
        self._skipped: set[int] = set()

    def run(self, state: RpcState) -> None:
        """Apply the entries callable in ``state`` (ConfigError on the first failure)."""
        rpc = self.app.rpc
        for n, e in enumerate(self.entries):
            if n in self._ran or n in self._skipped:
                continue
            m = rpc.get(e.method)
            if m is None:
                # In file order among the runtime methods (most are), where it would have run.
                if state is RpcState.RUNTIME:
                    self._skipped.add(n)
                    self._missing(e)
                continue
            if state not in m.states:
                continue
            self._ran.add(n)
            try:
                self.app.call(e.method, e.params)
            except RpcError as exc:
                self._fail(e, exc.message)

    def _missing(self, e: _Entry) -> None:
        ours = set(self.app.config_by_subsystem()) | _KNOWN_SUBSYSTEMS
        if e.subsystem and e.subsystem not in ours and not self.app.rpc.has_hint(e.method):
            notice(log, "Skipping %s: this target has no '%s' subsystem", e.method, e.subsystem)
            return
        self._fail(e, self.app.rpc.not_found(e.method).message)

    def _fail(self, e: _Entry, why: str) -> None:
        message = f"{e.describe(self.source)}: {why}"
        self.errors.append(message)
        log.error("%s", message)
        if not self.ignore_errors:
            raise ConfigError(message)
