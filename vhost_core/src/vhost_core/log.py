"""SPDK-style log lines: ``[time] file.py: line:func: *NOTICE*: Controller vhost.1: ...``.

Levels and flags work as SPDK's do (``log_set_print_level``, ``log_set_flag``, ``vhost -L``):
ERROR, WARNING and NOTICE lines always go out (down to the print level); INFO lines when
the print level is INFO or DEBUG; DEBUG lines only from the areas whose flag is set, and
only at print level DEBUG.  A flag is one of SPDK's names (``vhost``, ``vhost_ring``,
``bdev``, ... mapped onto our loggers by :data:`SPDK_FLAGS`) or the name of one of our
loggers (``vhost.<name>``: ``vhost_user``, ``bdev_aio``, a third-party plugin's ...).
"""

from __future__ import annotations

import logging
import sys
import time

NOTICE = 25
logging.addLevelName(NOTICE, "NOTICE")

_LEVEL_NAMES = {logging.DEBUG: "DEBUG", logging.INFO: "INFO", NOTICE: "NOTICE",
                logging.WARNING: "WARNING", logging.ERROR: "ERROR", logging.CRITICAL: "ERROR"}

#: SPDK's level names, as ``log_set_level`` / ``log_set_print_level`` take them.
LEVELS = {"ERROR": logging.ERROR, "WARNING": logging.WARNING, "NOTICE": NOTICE,
          "INFO": logging.INFO, "DEBUG": logging.DEBUG}

#: SPDK's log flags (SPDK_LOG_REGISTER_COMPONENT in the vhost target's libraries) and the
#: loggers (``vhost.<name>``) whose debug lines each one switches on here.
SPDK_FLAGS: dict[str, tuple[str, ...]] = {
    "aio": ("bdev_aio",),
    "app_config": ("app_config",),
    "app_rpc": ("app",),
    "bdev": ("bdev", "bdev_python"),
    "bdev_malloc": ("bdev_malloc",),
    "bdev_null": ("bdev_malloc",),          # null bdevs live in the malloc plugin
    "log_rpc": ("log",),
    "reactor": ("reactor",),
    "rpc": ("rpc",),
    "rpc_client": ("rpc.client",),
    "scsi": ("vhost_scsi",),
    "thread": ("reactor",),
    "vhost": ("vhost", "vhost_user"),
    "vhost_blk": ("vhost_blk",),
    "vhost_blk_data": ("vhost_blk",),
    "vhost_ring": ("vhost_user",),          # vring start/stop and inflight recovery
    "vhost_rpc": ("rpc",),
    "vhost_scsi": ("vhost_scsi",),
    "vhost_scsi_data": ("vhost_scsi",),
    "vhost_scsi_queue": ("vhost_scsi",),
}

_ROOT = "vhost"
_print_level = NOTICE
_level = NOTICE
_flags: set[str] = set()


class SpdkFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        t = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
        level = _LEVEL_NAMES.get(record.levelno, record.levelname)
        line = (f"[{t}.{int(record.msecs):03d}] {record.filename}:{record.lineno:4d}:"
                f"{record.funcName}: *{level}*: {record.getMessage()}")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(f"{_ROOT}.{name}")


def notice(logger: logging.Logger, msg: str, *args) -> None:
    logger.log(NOTICE, msg, *args, stacklevel=2)


def setup(level: int = NOTICE, stream=None) -> None:
    """Send the daemon's log to ``stream`` (stderr) at print level ``level``."""
    global _print_level
    root = logging.getLogger(_ROOT)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(SpdkFormatter())
    root.handlers[:] = [handler]
    root.propagate = False
    _print_level = level
    _apply()


def _apply() -> None:
    root = logging.getLogger(_ROOT)
    # Unflagged areas never produce DEBUG records (as SPDK_DEBUGLOG needs its flag).
    root.setLevel(max(_print_level, logging.INFO))
    for h in root.handlers:
        h.setLevel(_print_level)
    wanted = {name for flag in _flags for name in _loggers_of(flag)}
    for name in _our_loggers() | wanted:
        logging.getLogger(f"{_ROOT}.{name}").setLevel(logging.DEBUG if name in wanted else logging.NOTSET)


def _our_loggers() -> set[str]:
    prefix = _ROOT + "."
    return {n[len(prefix):] for n in logging.Logger.manager.loggerDict if n.startswith(prefix)}


def _loggers_of(flag: str) -> tuple[str, ...]:
    return SPDK_FLAGS.get(flag, (flag,))


def level_name(level: int) -> str:
    return _LEVEL_NAMES.get(level, logging.getLevelName(level))


def parse_level(name: str) -> int:
    """SPDK's level name (any case) -> logging level; ValueError naming the valid ones."""
    try:
        return LEVELS[name.upper()]
    except (KeyError, AttributeError):
        raise ValueError(f"log level '{name}' is not one of {', '.join(LEVELS)}") from None


def set_print_level(level: int) -> None:
    """What goes to stderr (``log_set_print_level``)."""
    global _print_level
    _print_level = level
    _apply()


def get_print_level() -> int:
    return _print_level


def set_level(level: int) -> None:
    """SPDK's syslog level (``log_set_level``).  This target does not write to syslog:
    the level is kept and reported, and the print level decides what is printed."""
    global _level
    _level = level


def get_level() -> int:
    return _level


def flag_names() -> list[str]:
    """Every flag ``log_set_flag`` takes: SPDK's names and our loggers' names."""
    mapped = {name for names in SPDK_FLAGS.values() for name in names}
    return sorted(set(SPDK_FLAGS) | mapped | _our_loggers())


def get_flags() -> dict[str, bool]:
    return {f: f in _flags for f in flag_names()}


def set_flag(flag: str, enabled: bool = True) -> None:
    """Switch an area's debug lines on or off; ``all`` means every flag.  ValueError
    naming the valid flags for an unknown one."""
    names = flag_names()
    if flag != "all" and flag not in names:
        raise ValueError(f"log flag '{flag}' does not exist; valid flags: all, {', '.join(names)}")
    targets = names if flag == "all" else [flag]
    if enabled:
        _flags.update(targets)
    else:
        _flags.difference_update(targets)
    _apply()
