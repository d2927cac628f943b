"""The core's own commands: SPDK's framework, bdev, vhost and log methods it serves itself.

Each is one declaration (:mod:`vhost_core.commands`): the daemon serves it as a JSON-RPC
method (its handler gets the App) and ``vhost-rpc`` offers it as a sub-command, with the
deprecated aliases of both.  Importing this module starts nothing: ``vhost-rpc`` builds
its sub-commands from it.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
from typing import TYPE_CHECKING, Any, Callable, Literal

import attrs

from vhost_core.errors import VhostError
from vhost_core import __version__
from vhost_core import log as logs
from vhost_core.bdev.interface import QOS_LIMITS, Bdev
from vhost_core.bdev.iostat import IoStat
from vhost_core.commands import Cli, Command, CommandRegistry
from vhost_core.log import get_logger, notice
from vhost_core.rpc.json_config import ConfigError
from vhost_core.rpc.registry import INVALID_PARAMS, RpcError, RpcState, cli, param, unsupported

if TYPE_CHECKING:  # pragma: no cover
    from vhost_core.app import App

log = get_logger("app")

#: The core's commands; their handlers take the App as context.
CORE = CommandRegistry()
_BOTH = RpcState.STARTUP | RpcState.RUNTIME
_SILENT = Cli(prints=False)
LEVELS = ("ERROR", "WARNING", "NOTICE", "INFO", "DEBUG")
IOSTAT_MODES = Literal["all", "maxmin", "error", "none"]

#: spdk_kill_instance: SPDK's signals (by name or number) and, when refused here, why.
KILL_SIGNALS: dict[str, tuple[int, str | None]] = {
    "SIGINT": (signal.SIGINT, None),        # the clean shutdown, as Ctrl-C
    "SIGTERM": (signal.SIGTERM, None),      # the clean shutdown
    "SIGKILL": (signal.SIGKILL, None),      # a crash: guests' vhost-blk requests survive it
    "SIGQUIT": (signal.SIGQUIT, "it would dump core; use SIGINT or SIGTERM to stop the target"),
    "SIGHUP": (signal.SIGHUP, "it would kill the target without draining; use SIGINT or SIGTERM"),
    "SIGUSR1": (signal.SIGUSR1, "it would kill the target without draining; use SIGINT or SIGTERM"),
}


# --------------------------------------------------------------------------
# parameters
# --------------------------------------------------------------------------


@attrs.frozen
class CtrlrParams:
    ctrlr: str = param(help="Name of the vhost controller")


@attrs.frozen
class NameParams:
    name: str = param(help="Name of the bdev", metavar="bdev_name")


@attrs.frozen
class GetControllersParams:
    name: str | None = param(None, "-n", "--name", help="Name of the vhost controller")


@attrs.frozen
class GetBdevsParams:
    name: str | None = param(None, "-b", "--name", help="Name of the bdev, e.g. Malloc0")
    timeout: int | None = param(None, "-t", "--timeout-ms",
                                help="With -b: milliseconds to wait for the bdev to appear")


@attrs.frozen
class NameOptParams:
    name: str | None = param(None, "-b", "--name", help="Name of the bdev")


@attrs.frozen
class GetIostatParams:
    name: str | None = param(None, "-b", "--name", help="Name of the bdev")      # older rpc.py
    names: list[str] | None = param(None, "--names", help="Comma-separated bdev names")   # newer rpc.py
    per_channel: bool = unsupported(False, "it keeps per-bdev totals, not per-channel ones: omit -c",
                                    cli=cli("-c", "--per-channel", help="Per-channel statistics (not kept by "
                                                                        "this target: an error)"))
    reset_mode: IOSTAT_MODES | None = param(None, "--reset-mode",
                                            help="Reset the statistics after reading them")


@attrs.frozen
class ResetIostatParams:
    name: str | None = param(None, "-b", "--name", help="Name of the bdev")
    mode: IOSTAT_MODES = param("all", "-m", "--mode",
                               help="all (default): counts and max/min latency; maxmin: only those")


@attrs.frozen
class GetConfigParams:
    name: str = param(help="Name of the subsystem (bdev, vhost_blk, vhost_scsi)")
    with_batches: bool = param(False, "--with-batches", negatable=True,
                               help="Keep batch arrays (nothing here is batched: the same output)")


@attrs.frozen
class KillParams:
    sig_name: str = param(help="SIGINT or SIGTERM: clean shutdown; SIGKILL: as a crash",
                          choices=["SIGINT", "SIGTERM", "SIGQUIT", "SIGHUP", "SIGKILL", "SIGUSR1"])


@attrs.frozen
class LevelParams:
    level: str = param(help="Log level", choices=LEVELS)


@attrs.frozen
class FlagParams:
    flag: str = param(help="vhost, vhost_ring, bdev, ... (log_get_flags lists them), or all")


# --------------------------------------------------------------------------
# framework
# --------------------------------------------------------------------------


@CORE.command("spdk_get_version", aliases=("get_spdk_version",), states=_BOTH)
def spdk_get_version(app: App) -> dict[str, Any]:
    """Show the target's version."""
    major, minor, patch = (int(x) for x in __version__.split(".")[:3])
    return {"version": f"vhost-py v{__version__}",
            "fields": {"major": major, "minor": minor, "patch": patch, "suffix": ""}}


@CORE.command("framework_get_reactors")
def framework_get_reactors(app: App) -> dict[str, Any]:
    """List reactors and their threads."""
    out = []
    for r in app.reactors:
        s = r.stats()
        out.append({
            "lcore": r.core,
            "tid": r.tid(),
            "busy": s["busy_ns"],
            "idle": s["idle_ns"],
            "in_interrupt": r.interrupt_mode,
            "lw_threads": [{"name": c, "id": i, "cpumask": hex(app.controllers.get(c).cpumask),
                            "elapsed": 0}
                           for i, c in enumerate(sorted(r.controllers)) if c in app.controllers],
        })
    return {"tick_rate": 1000000000, "reactors": out}


@CORE.command("thread_get_stats")
def thread_get_stats(app: App) -> dict[str, Any]:
    """Busy and idle time of each reactor thread (SPDK's shape, in ns: tick_rate 1e9)."""
    threads = []
    for i, r in enumerate(app.reactors, start=1):
        s = r.stats()
        served = [c for c in r.controllers if c in app.controllers]
        threads.append({"name": f"reactor_{r.core}", "id": i, "cpumask": f"{1 << r.core:x}",
                        "busy": s["busy_ns"], "idle": s["idle_ns"],
                        "active_pollers_count": sum(1 for c in served if app.controllers.get(c).session is not None),
                        "timed_pollers_count": 0, "paused_pollers_count": 0})
    return {"tick_rate": 1000000000, "threads": threads}


@CORE.command("framework_get_plugins", states=_BOTH)
def framework_get_plugins(app: App) -> list[dict[str, Any]]:
    """List loaded plugins."""
    return [i.to_json() for i in app.plugins.infos]


@CORE.command("framework_start_init", states=RpcState.STARTUP, cli=_SILENT)
def framework_start_init(app: App) -> bool:
    """Leave the start-up state (vhost --wait-for-rpc) and serve every method."""
    try:
        app.start_init()
    except ConfigError as exc:
        app.exit(1)
        raise VhostError(errno.EINVAL, str(exc)) from None
    return True


@CORE.command("framework_wait_init", states=_BOTH, cli=_SILENT)
def framework_wait_init(app: App) -> Any:
    """Wait until the target serves every method (after framework_start_init with --wait-for-rpc)."""
    if app.initialized:
        return True
    fut = asyncio.get_running_loop().create_future()
    app.init_waiters.append(fut)
    return fut


@CORE.command("spdk_kill_instance", params=KillParams, cli=_SILENT)
def spdk_kill_instance(app: App, p: KillParams) -> bool:
    """Send the target a signal: SIGINT/SIGTERM stop it cleanly, SIGKILL as a crash."""
    by_number = {str(int(num)): name for name, (num, _) in KILL_SIGNALS.items()}
    name = by_number.get(p.sig_name, p.sig_name)
    if name not in KILL_SIGNALS:
        raise RpcError(INVALID_PARAMS, f"spdk_kill_instance: sig_name '{p.sig_name}' is not one of "
                                       f"{', '.join(KILL_SIGNALS)}")
    num, refused = KILL_SIGNALS[name]
    if refused is not None:
        raise VhostError(errno.ENOTSUP, f"spdk_kill_instance: sig_name={name} is not supported by "
                                       f"this target: {refused}")
    notice(log, "spdk_kill_instance: %s", name)
    # After the answer is on its way, as SPDK's client expects it (or a closed socket).
    asyncio.get_running_loop().call_later(0.05, os.kill, os.getpid(), num)
    return True


@CORE.command("framework_get_subsystems")
def framework_get_subsystems(app: App) -> list[dict[str, Any]]:
    """List the subsystems save_config writes."""
    return [{"subsystem": name, "depends_on": []} for name in app.config_by_subsystem()]


@CORE.command("framework_get_config", params=GetConfigParams)
def framework_get_config(app: App, p: GetConfigParams) -> list[dict[str, Any]]:
    """Print one subsystem's configuration."""
    config = app.config_by_subsystem()
    if p.name not in config:
        raise VhostError(errno.ENOENT, f"subsystem '{p.name}' does not exist; see framework_get_subsystems")
    return config[p.name]


# --------------------------------------------------------------------------
# bdevs
# --------------------------------------------------------------------------


def _has_bdev(app: App, name: str) -> bool:
    return any(b.name == name or name in b.aliases for b in app.bdevs)


async def _wait_for_bdev(app: App, name: str, timeout_s: float) -> list[dict[str, Any]]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        await asyncio.sleep(0.01)
        with app.lock:
            if _has_bdev(app, name) or loop.time() >= deadline:
                return [app.bdevs.get(name).to_json()]


@CORE.command("bdev_get_bdevs", params=GetBdevsParams, aliases=("get_bdevs",))
def bdev_get_bdevs(app: App, p: GetBdevsParams) -> Any:
    """List all block devices, or one with -b."""
    if p.name is None:
        return [b.to_json() for b in app.bdevs]
    if p.timeout and not _has_bdev(app, p.name):
        return _wait_for_bdev(app, p.name, p.timeout / 1000)
    return [app.bdevs.get(p.name).to_json()]


@attrs.frozen
class QosLimitParams:
    name: str = param(help="Name of the bdev", metavar="bdev_name")
    rw_ios_per_sec: int | None = param(None, "--rw_ios_per_sec", "--rw-ios-per-sec",
                                       help="R/W IOs per second limit (>=1000, example: 20000). 0 means unlimited.")
    rw_mbytes_per_sec: int | None = param(None, "--rw_mbytes_per_sec", "--rw-mbytes-per-sec",
                                          help="R/W megabytes per second limit (>=1, example: 100). "
                                               "0 means unlimited.")
    r_mbytes_per_sec: int | None = param(None, "--r_mbytes_per_sec", "--r-mbytes-per-sec",
                                         help="Read megabytes per second limit (>=1, example: 100). "
                                              "0 means unlimited.")
    w_mbytes_per_sec: int | None = param(None, "--w_mbytes_per_sec", "--w-mbytes-per-sec",
                                         help="Write megabytes per second limit (>=1, example: 100). "
                                              "0 means unlimited.")


#: SPDK_BDEV_QOS_MIN_IOS_PER_SEC: IOPS limits are whole thousands (SPDK rounds up).
QOS_IOPS_STEP = 1000
#: SPDK_BDEV_QOS_MAX_MBYTES_PER_SEC: more would overflow the byte count.
QOS_MAX_MBYTES = ((1 << 64) - 1) >> 20


@CORE.command("bdev_set_qos_limit", params=QosLimitParams, cli=_SILENT)
def bdev_set_qos_limit(app: App, p: QosLimitParams) -> bool:
    """Set a bdev's QoS rate limits, enforced for every controller using it (0 clears one)."""
    given = {k: getattr(p, k) for k in QOS_LIMITS if getattr(p, k) is not None}
    if not given:
        raise RpcError(INVALID_PARAMS, f"bdev_set_qos_limit {p.name}: no rate limits specified: give at least "
                                       f"one of {', '.join(QOS_LIMITS)} (0 clears one)")
    bdev = app.bdevs.get(p.name)
    for key, value in list(given.items()):
        if value < 0:
            raise RpcError(INVALID_PARAMS, f"bdev_set_qos_limit {p.name}: {key} {value} is negative: "
                                           f"give a limit, or 0 for none")
        if key == "rw_ios_per_sec" and value % QOS_IOPS_STEP:
            rounded = value + QOS_IOPS_STEP - value % QOS_IOPS_STEP
            notice(log, "bdev %s: requested rw_ios_per_sec %d is not a multiple of %d: rounded up to %d",
                   bdev.name, value, QOS_IOPS_STEP, rounded)
            given[key] = rounded
        elif key != "rw_ios_per_sec" and value > QOS_MAX_MBYTES:
            notice(log, "bdev %s: requested %s %d would overflow: reset to %d", bdev.name, key, value,
                   QOS_MAX_MBYTES)
            given[key] = QOS_MAX_MBYTES
    limits = app.bdevs.set_qos(p.name, given)
    shown = ", ".join(f"{k}={v}" for k, v in limits.items() if v)
    notice(log, "bdev %s: QoS rate limits %s", bdev.name, shown if shown else "cleared")
    return True


@CORE.command("bdev_wait_for_examine", cli=_SILENT)
def bdev_wait_for_examine(app: App) -> bool:
    """Bdevs here are ready when created (nothing examines them): answers at once."""
    return True


def bdev_iostat(bdev: Bdev) -> IoStat:
    """What every descriptor of ``bdev`` completed: the open ones' counters plus those
    folded in when descriptors closed, less what bdev_reset_iostat set aside."""
    total = IoStat()
    total.add(bdev.iostat_retired)
    for desc in bdev.descriptors:
        total.add(desc.iostat())
    return total.since(bdev.iostat_base) if bdev.iostat_base is not None else total


def reset_iostat(bdev: Bdev, mode: str) -> None:
    for desc in bdev.descriptors:
        desc.reset_iostat_maxmin()
    r = bdev.iostat_retired
    r.max_ticks[:] = [0] * len(r.max_ticks)
    r.min_ticks[:] = [0] * len(r.min_ticks)
    if mode == "all":
        bdev.iostat_base = None
        bdev.iostat_base = bdev_iostat(bdev)


@CORE.command("get_bdevs_iostat", params=NameOptParams, deprecated="bdev_get_iostat")
def get_bdevs_iostat(app: App, p: NameOptParams) -> list[dict[str, Any]]:
    """SPDK's old name answered a list: the tick rate first, then one object per bdev."""
    from vhost_core.native import lib

    bdevs = [app.bdevs.get(p.name)] if p.name is not None else list(app.bdevs)
    return [{"tick_rate": lib.vn_tick_rate()}] + [bdev_iostat(b).to_spdk(b.name) for b in bdevs]


@CORE.command("bdev_get_iostat", params=GetIostatParams)
def bdev_get_iostat(app: App, p: GetIostatParams) -> dict[str, Any]:
    """I/O statistics of all bdevs, or of those named."""
    from vhost_core.native import lib

    names = list(p.names or []) + ([p.name] if p.name is not None else [])
    bdevs = [app.bdevs.get(n) for n in names] if names else list(app.bdevs)
    out = {"tick_rate": lib.vn_tick_rate(), "ticks": lib.vn_ticks_now(),
           "bdevs": [bdev_iostat(b).to_spdk(b.name) for b in bdevs]}
    if p.reset_mode not in (None, "none", "error"):
        for b in bdevs:
            reset_iostat(b, p.reset_mode)
    return out


@CORE.command("bdev_reset_iostat", params=ResetIostatParams, cli=_SILENT)
def bdev_reset_iostat(app: App, p: ResetIostatParams) -> bool:
    """Reset the I/O statistics of all bdevs, or one."""
    for b in [app.bdevs.get(p.name)] if p.name is not None else list(app.bdevs):
        if p.mode in ("all", "maxmin"):
            reset_iostat(b, p.mode)
    return True


@CORE.command("delete_bdev", params=NameParams, deprecated="the bdev type's delete method (bdev_malloc_delete, ...)",
              blocking=True, cli=_SILENT)
def delete_bdev(app: App, p: NameParams) -> bool:
    """Deprecated SPDK name: delete a bdev of any module (hot-detaching it)."""
    app.bdevs.delete(p.name)
    return True


# --------------------------------------------------------------------------
# controllers
# --------------------------------------------------------------------------


@CORE.command("vhost_get_controllers", params=GetControllersParams, aliases=("get_vhost_controllers",))
def vhost_get_controllers(app: App, p: GetControllersParams) -> list[dict[str, Any]]:
    """List all vhost controllers, or one with -n."""
    if p.name is not None:
        return [app.controllers.get(p.name).to_json()]
    return [c.to_json() for c in app.controllers]


@CORE.command("vhost_delete_controller", params=CtrlrParams, aliases=("remove_vhost_controller",),
              blocking=True, cli=_SILENT)
def vhost_delete_controller(app: App, p: CtrlrParams) -> bool:
    """Delete a vhost controller."""
    app.controllers.delete(p.ctrlr)
    return True


@attrs.frozen
class CoalescingParams:
    ctrlr: str = param(help="controller name")
    delay_base_us: int = param(help="base delay time (us); 0 turns coalescing off")
    iops_threshold: int = param(help="IOPS threshold when coalescing is enabled")


@CORE.command("vhost_controller_set_coalescing", params=CoalescingParams, cli=_SILENT)
def vhost_controller_set_coalescing(app: App, p: CoalescingParams) -> bool:
    """Set interrupt coalescing: a queue doing more than iops_threshold requests per second
    gets its interrupts delayed (up to delay_base_us) so that one reports several completions."""
    ctrlr = app.controllers.get(p.ctrlr)
    ctrlr.set_coalescing(p.delay_base_us, p.iops_threshold)
    notice(log, "Controller %s: interrupt coalescing %s", p.ctrlr,
           f"delay_base_us={p.delay_base_us} iops_threshold={p.iops_threshold}" if p.delay_base_us else "off")
    return True


@CORE.command("vhost_get_queue_stats", params=CtrlrParams)
def vhost_get_queue_stats(app: App, p: CtrlrParams) -> list[dict[str, int]]:
    """Per-queue counters of a controller (requests, interrupts, bad requests, in flight,
    resubmitted after a restart)."""
    return app.controllers.get(p.ctrlr).queue_stats()


# --------------------------------------------------------------------------
# log
# --------------------------------------------------------------------------


def _levels(what: str, setter: Callable[[int], None], getter: Callable[[], int], set_help: str) -> None:
    """``log_set_<what>`` and ``log_get_<what>``: SPDK's pair for one of the two log levels."""

    def set_level(app: App, p: LevelParams) -> bool:
        try:
            setter(logs.parse_level(p.level))
        except ValueError as exc:
            raise RpcError(INVALID_PARAMS, f"log_set_{what}: {exc}") from None
        return True

    def get_level(app: App) -> str:
        return logs.level_name(getter())

    CORE.add(Command(f"log_set_{what}", set_level, params=LevelParams, states=_BOTH, cli=_SILENT, help=set_help))
    CORE.add(Command(f"log_get_{what}", get_level, states=_BOTH, help=f"Show the log {what.replace('_', ' ')}."))


_levels("print_level", logs.set_print_level, logs.get_print_level,
        "Set what the target prints (stderr): ERROR, WARNING, NOTICE, INFO or DEBUG.")
_levels("level", logs.set_level, logs.get_level,
        "Set SPDK's syslog level (kept and reported; this target logs to stderr only).")


def _set_flag(method: str, flag: str, enabled: bool) -> bool:
    try:
        logs.set_flag(flag, enabled)
    except ValueError as exc:
        raise RpcError(INVALID_PARAMS, f"{method}: {exc}") from None
    return True


@CORE.command("log_set_flag", params=FlagParams, states=_BOTH, cli=_SILENT)
def log_set_flag(app: App, p: FlagParams) -> bool:
    """Turn on the debug lines of an area (vhost, vhost_ring, bdev, ... or all), at print level DEBUG."""
    return _set_flag("log_set_flag", p.flag, True)


@CORE.command("log_clear_flag", params=FlagParams, states=_BOTH, cli=_SILENT)
def log_clear_flag(app: App, p: FlagParams) -> bool:
    """Turn off the debug lines of an area."""
    return _set_flag("log_clear_flag", p.flag, False)


@CORE.command("log_get_flags", states=_BOTH)
def log_get_flags(app: App) -> dict[str, bool]:
    """Show the log flags."""
    return logs.get_flags()
