"""SPDK's log levels and flags (log_set_print_level, log_set_flag, vhost -L) on our loggers."""

import io
import logging

import pytest

from vhost_core import log


@pytest.fixture
def out():
    root = logging.getLogger("vhost")
    saved = (root.handlers[:], root.propagate, root.level)
    stream = io.StringIO()
    log.setup(log.NOTICE, stream)
    yield stream
    log.set_flag("all", False)
    log.set_print_level(log.NOTICE)
    # Leave the "vhost" logger as other tests (caplog) expect it.
    root.handlers[:], root.propagate, _ = saved
    root.setLevel(saved[2])


def lines(stream: io.StringIO) -> list[str]:
    return [line[line.index("*"):] for line in stream.getvalue().splitlines()]


def test_debug_lines_only_from_flagged_areas_at_print_level_debug(out):
    ring, bdev = log.get_logger("vhost_user"), log.get_logger("bdev")
    log.set_print_level(logging.DEBUG)
    ring.debug("vring 0 started")
    bdev.debug("examined")
    log.set_flag("vhost_ring")                       # SPDK's name for our vhost_user logger
    ring.debug("vring 1 started")
    bdev.debug("examined again")
    log.set_print_level(log.NOTICE)
    ring.debug("vring 2 started")                    # flagged, but the print level hides it
    log.notice(bdev, "bdev Malloc0 deleted")
    assert lines(out) == ["*DEBUG*: vring 1 started", "*NOTICE*: bdev Malloc0 deleted"]


def test_overlapping_flags_keep_a_logger_on_until_both_are_cleared(out):
    log.set_print_level(logging.DEBUG)
    log.set_flag("vhost")                            # vhost and vhost_user
    log.set_flag("vhost_ring")                       # vhost_user
    log.set_flag("vhost_ring", False)
    log.get_logger("vhost_user").debug("still on")
    log.set_flag("vhost", False)
    log.get_logger("vhost_user").debug("off")
    assert lines(out) == ["*DEBUG*: still on"]
    assert log.get_flags()["vhost"] is False


def test_info_lines_follow_the_print_level(out):
    log.get_logger("rpc").info("hidden at NOTICE")
    log.set_print_level(logging.INFO)
    log.get_logger("rpc").info("shown at INFO")
    log.get_logger("rpc").debug("not without its flag")
    assert lines(out) == ["*INFO*: shown at INFO"]


def test_flags_are_spdks_names_and_our_loggers(out):
    log.get_logger("bdev_example")                   # a third-party plugin's logger
    names = log.flag_names()
    assert {"vhost", "vhost_ring", "vhost_blk", "vhost_scsi", "bdev", "aio", "bdev_malloc"} <= set(names)
    assert {"vhost_user", "bdev_example"} <= set(names)
    log.set_flag("all")
    assert all(log.get_flags().values())
    with pytest.raises(ValueError, match="log flag 'nvme' does not exist; valid flags: all, aio, "):
        log.set_flag("nvme")


def test_levels_by_spdk_name():
    assert log.parse_level("notice") == log.NOTICE and log.level_name(log.NOTICE) == "NOTICE"
    with pytest.raises(ValueError, match="'LOUD' is not one of ERROR, WARNING, NOTICE, INFO, DEBUG"):
        log.parse_level("LOUD")
    log.set_level(logging.ERROR)
    assert log.level_name(log.get_level()) == "ERROR"
    log.set_level(log.NOTICE)
