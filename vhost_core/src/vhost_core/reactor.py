"""Reactors: one pinned native thread per core of the daemon's cpumask.

Controllers are placed on the least-loaded core of their own cpumask, which must
lie inside the daemon's.  The control plane reaches a reactor only through
``vn_reactor_exec`` (run a native function on the reactor thread and wait), so no
RPC ever races the data path.
"""

from __future__ import annotations

import os

import attrs

from vhost_core.log import get_logger, notice
from vhost_core.native import ffi, lib

log = get_logger("reactor")


def parse_cpumask(text: str | int) -> int:
    """``0x3``, ``3`` (hex, as SPDK reads it) or ``[0,1]`` / ``[0-3]`` core lists."""
    if isinstance(text, int):
        return text
    s = text.strip()
    if s.startswith("[") and s.endswith("]"):
        mask = 0
        for part in s[1:-1].split(","):
            part = part.strip()
            if not part:
                continue
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if lo > hi:
                    raise ValueError(f"bad core range '{part}' in cpumask {text}")
                for c in range(lo, hi + 1):
                    mask |= 1 << c
            else:
                mask |= 1 << int(part)
        return mask
    try:
        return int(s, 16)
    except ValueError:
        raise ValueError(f"cpumask '{text}' is not a hex mask like 0x3 or a core list like [0,1]") from None


def mask_cores(mask: int) -> list[int]:
    return [i for i in range(mask.bit_length()) if mask >> i & 1]


def format_mask(mask: int) -> str:
    return hex(mask)


@attrs.define(eq=False)
class Reactor:
    core: int
    interrupt_mode: bool
    native: object = None
    controllers: set[str] = attrs.Factory(set)

    def start(self) -> None:
        self.native = lib.vn_reactor_new(self.core, int(self.interrupt_mode))
        rc = lib.vn_reactor_start(self.native)
        if rc < 0:
            raise OSError(-rc, f"cannot start reactor on core {self.core}")
        notice(log, "Reactor started on core %d%s", self.core,
               " (interrupt mode)" if self.interrupt_mode else "")

    def stop(self) -> None:
        if self.native is not None:
            lib.vn_reactor_free(self.native)
            self.native = None

    def tid(self) -> int:
        """Linux thread id of the reactor (for taskset/perf), 0 when stopped."""
        return lib.vn_reactor_tid(self.native) if self.native is not None else 0

    def stats(self) -> dict:
        out = ffi.new("uint64_t[4]")
        lib.vn_reactor_get_stats(self.native, out)
        return {"loops": out[0], "busy_loops": out[1], "idle_ns": out[2], "busy_ns": out[3]}

    def run(self, fn_addr: int, arg_addr: int) -> int:
        """Run a plugin's ``int fn(void *arg)`` (by address) on this reactor's thread and
        wait for its result."""
        fn = ffi.cast("vn_exec_fn", fn_addr)
        return lib.vn_reactor_exec(self.native, fn, ffi.cast("void *", arg_addr))


class Reactors:
    """All reactors of the daemon, and controller placement over them."""

    def __init__(self, cpumask: int, interrupt_mode: bool = False) -> None:
        if cpumask <= 0:
            raise ValueError("the reactor mask (-m) selects no core")
        available = os.sched_getaffinity(0)
        cores = mask_cores(cpumask)
        missing = [c for c in cores if c not in available]
        if missing:
            raise ValueError(f"cpumask {format_mask(cpumask)} names core(s) {missing} that this process "
                             f"cannot run on (available: {sorted(available)})")
        self.mask = cpumask
        self.interrupt_mode = interrupt_mode
        self.by_core = {c: Reactor(c, interrupt_mode) for c in cores}

    def start(self) -> None:
        notice(log, "Total cores available: %d", len(self.by_core))
        for r in self.by_core.values():
            r.start()

    def stop(self) -> None:
        for r in self.by_core.values():
            r.stop()

    def place(self, cpumask: int | None) -> Reactor:
        """The least-loaded reactor of ``cpumask`` (default: the daemon's mask)."""
        mask = self.mask if cpumask is None else cpumask
        if mask & ~self.mask or mask == 0:
            raise ValueError(f"cpumask {format_mask(mask)} is not within the app's cpumask "
                             f"{format_mask(self.mask)}: pass a --cpumask that is a subset of vhost -m")
        candidates = [self.by_core[c] for c in mask_cores(mask)]
        return min(candidates, key=lambda r: (len(r.controllers), r.core))

    def __iter__(self):
        return iter(self.by_core.values())
