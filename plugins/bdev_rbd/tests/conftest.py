"""Fixtures of the bdev_rbd tests: a real single-node Ceph cluster on 127.0.0.1 (one per
test session, a few seconds to start), and fresh RBD images in its pool ``rbd``."""

from __future__ import annotations

import itertools
import os

import pytest

from vhost_bdev_rbd.testing import CephCluster, CephError


_names = itertools.count()


@pytest.fixture(scope="session")
def ceph():
    """The cluster: started once, stopped (and its directory removed) at the end."""
    cluster = CephCluster(root=None)
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def rbd_image(ceph, vhost_daemon):
    """A new 64 MiB image (``rbd_image.make(size_mib)`` makes more), removed after the test's
    daemon stopped (an image open in a client is not removed)."""
    made: list[str] = []

    def make(size_mib: int = 64, name: str | None = None) -> str:
        name = name or f"img{os.getpid()}-{next(_names)}"
        ceph.rbd("create", "--size", f"{size_mib}M", f"rbd/{name}")
        made.append(name)
        return name

    first = make()

    class Images(str):
        pass

    img = Images(first)
    img.make = make
    #: Images a killed client still holds (its watch and lock expire after 30 s): not removed.
    img.leave = set()
    yield img
    for name in made:
        if name not in img.leave:
            try:
                ceph.run("rbd", "rm", "--no-progress", f"rbd/{name}", check=False, timeout=10)
            except CephError:
                pass            # still watched by a client that died: the cluster is thrown away anyway


@pytest.fixture(autouse=True)
def _short_rbd_timeouts(monkeypatch):
    """Daemons started by these tests give up on a monitor after 3 s (the bad-input tests
    wait for it) and on an OSD after 8 s; they look for images moved to the trash every 2 s."""
    monkeypatch.setenv("VHOST_BDEV_RBD_TIMEOUT_S", "3")
    monkeypatch.setenv("VHOST_BDEV_RBD_OSD_TIMEOUT_S", "8")
    monkeypatch.setenv("VHOST_BDEV_RBD_GONE_CHECK_S", "2")
