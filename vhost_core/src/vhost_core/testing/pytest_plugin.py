"""Pytest fixtures for testing vhost-user backends with the fake frontend.

Enable with ``pytest_plugins = ["vhost_core.testing.pytest_plugin"]`` in the
root ``conftest.py``, ``-p vhost_core.testing.pytest_plugin`` on the command
line, or by importing the fixtures into a test module.

Fixtures:

``guest_memory``
    A fresh :class:`~vhost_core.testing.GuestMemory` (16 MiB, PC-like: 8 MiB at
    GPA 0 and 8 MiB at 4 GiB, one shared memfd), closed at teardown.

``vhost_frontend_factory``
    ``factory(path, **kwargs) -> VhostUserFrontend``; kwargs go to
    :class:`~vhost_core.testing.VhostUserFrontend` (``timeout``,
    ``connect_timeout``, ``reply_ack``). Every frontend is closed at teardown.

``vhost_blk_factory``
    ``factory(path, **kwargs) -> VirtioBlkDevice`` via
    :func:`~vhost_core.testing.connect_blk`; closed at teardown.

``vhost_daemon``
    A running ``vhost`` daemon (:class:`~vhost_core.testing.daemon.VhostDaemon`).

The plugin is opt-in (no ``pytest11`` entry point: installing vhost-core does not
load it into every pytest run on the machine): a plugin's ``tests/conftest.py``
says ``pytest_plugins = ["vhost_core.testing.pytest_plugin"]``, as
``plugins/_template`` does.  The conformance suites build on these fixtures: subclass
:class:`vhost_core.testing.conformance.bdev.BdevConformance` (bdev backends) or
:class:`vhost_core.testing.conformance.device.DeviceConformance` (device types)
and provide one recipe fixture; see those modules.
"""

from __future__ import annotations

import pytest

from .blk import connect_blk
from .frontend import VhostUserFrontend
from .memory import GuestMemory

__all__ = ["guest_memory", "vhost_frontend_factory", "vhost_blk_factory", "vhost_daemon"]


@pytest.fixture
def guest_memory():
    mem = GuestMemory.pc_like(16 << 20)
    try:
        yield mem
    finally:
        mem.close()


@pytest.fixture
def vhost_frontend_factory():
    made: list[VhostUserFrontend] = []

    def factory(path, **kwargs) -> VhostUserFrontend:
        fe = VhostUserFrontend(path, **kwargs)
        made.append(fe)
        return fe

    try:
        yield factory
    finally:
        for fe in made:
            fe.close()


@pytest.fixture
def vhost_blk_factory():
    made = []

    def factory(path, **kwargs):
        dev = connect_blk(path, **kwargs)
        made.append(dev)
        return dev

    try:
        yield factory
    finally:
        for dev in made:
            dev.close()


@pytest.fixture
def vhost_daemon(tmp_path):
    """A running ``vhost`` daemon (interrupt mode, core 0); stopped with SIGTERM at teardown,
    which must exit 0."""
    from .daemon import VhostDaemon

    d = VhostDaemon(tmp_path / "vhost").start()
    try:
        yield d
    finally:
        rc = d.stop()
        assert rc == 0, f"vhost exited with {rc} on SIGTERM:\n{d.log()}"
