import os
import sys
import time
from pathlib import Path

import pytest

from vhost_core.testing.daemon import VhostDaemon

# tests/guestvm.py and friends are plain modules next to the tests.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def blk_daemon(vhost_daemon):
    """The ``vhost_daemon`` with three malloc-backed vhost-blk controllers:

    * ``vhost.0`` on ``Malloc0`` (8 MiB, 512-byte blocks),
    * ``vhost.1`` on ``Malloc1`` (2 MiB, 512-byte blocks): the "other controller"
      that must keep serving whatever a front-end of ``vhost.0`` does,
    * ``vhost.ro`` on ``Malloc2`` (2 MiB, 512-byte blocks), read-only.
    """
    _setup_blk_controllers(vhost_daemon)
    return vhost_daemon


from blk_helpers import setup_blk_controllers as _setup_blk_controllers  # noqa: E402


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class DaemonView:
    """A shared daemon as one test sees it: ``log()``/``wait_log()`` cover only
    what it printed since the test started; everything else is the daemon's."""

    def __init__(self, daemon) -> None:
        self._daemon = daemon
        self._start = len(daemon.log())

    def __getattr__(self, name):
        return getattr(self._daemon, name)

    def log(self) -> str:
        return self._daemon.log()[self._start:]

    wait_log = VhostDaemon.wait_log     # over this view's log()


@pytest.fixture(scope="module")
def _shared_blk_daemon(tmp_path_factory):
    d = VhostDaemon(tmp_path_factory.mktemp("vhost")).start()
    try:
        _setup_blk_controllers(d)
        baseline = _open_fds(d.proc.pid)
        yield d
        # Whatever the module's front-ends did, nothing leaked: no fd (memfd,
        # eventfd, socket) is still open once every session is gone.
        from blk_helpers import wait_no_session

        if d.alive():
            for c in ("vhost.0", "vhost.1", "vhost.ro"):
                wait_no_session(d, c)
            deadline = time.monotonic() + 5
            while _open_fds(d.proc.pid) > baseline and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _open_fds(d.proc.pid) <= baseline, "the daemon leaks file descriptors:\n" + \
                "\n".join(sorted(os.readlink(f"/proc/{d.proc.pid}/fd/{f}")
                                 for f in os.listdir(f"/proc/{d.proc.pid}/fd")))
        assert "Traceback" not in d.log(), d.log()
    finally:
        rc = d.stop()
    assert rc == 0, f"vhost exited with {rc} on SIGTERM:\n{d.log()}"


@pytest.fixture
def shared_blk_daemon(_shared_blk_daemon):
    """Like ``blk_daemon``, but one daemon serves every test of the module (each
    test on its own connections): cheaper, and it proves that what one test did
    leaves nothing behind for the next.  ``log()`` starts at the test."""
    from blk_helpers import wait_no_session

    assert _shared_blk_daemon.alive(), _shared_blk_daemon.log()
    for c in ("vhost.0", "vhost.1", "vhost.ro"):
        wait_no_session(_shared_blk_daemon, c)
    return DaemonView(_shared_blk_daemon)
