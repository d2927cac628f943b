"""SPDK-style log lines: ``[time] file.py: line:func: *NOTICE*: Controller vhost.1: ...``."""

from __future__ import annotations

import logging
import sys
import time

NOTICE = 25
logging.addLevelName(NOTICE, "NOTICE")

_LEVEL_NAMES = {logging.DEBUG: "DEBUG", logging.INFO: "INFO", NOTICE: "NOTICE",
                logging.WARNING: "WARNING", logging.ERROR: "ERROR", logging.CRITICAL: "ERROR"}


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
    return logging.getLogger(f"vhost.{name}")


def notice(logger: logging.Logger, msg: str, *args) -> None:
    logger.log(NOTICE, msg, *args, stacklevel=2)


def setup(level: int = NOTICE, stream=None) -> None:
    root = logging.getLogger("vhost")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(SpdkFormatter())
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
