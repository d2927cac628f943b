import time

import pytest

from vhost_dev_scsi.testing import connect_scsi, wait_no_session


def setup_targets(d) -> None:
    """``vhost.0`` with target 0 on Malloc0 (16 MiB, 512-byte blocks) and target 1
    on Malloc1 (8 MiB, 4096-byte blocks)."""
    d.rpc("bdev_malloc_create", num_blocks=32768, block_size=512, name="Malloc0")
    d.rpc("bdev_malloc_create", num_blocks=2048, block_size=4096, name="Malloc1")
    d.rpc("vhost_create_scsi_controller", ctrlr="vhost.0")
    d.rpc("vhost_scsi_controller_add_target", ctrlr="vhost.0", scsi_target_num=0, bdev_name="Malloc0")
    d.rpc("vhost_scsi_controller_add_target", ctrlr="vhost.0", scsi_target_num=1, bdev_name="Malloc1")


@pytest.fixture(scope="module")
def _shared_scsi_daemon(tmp_path_factory):
    from vhost_core.testing.daemon import VhostDaemon

    d = VhostDaemon(tmp_path_factory.mktemp("vhost")).start()
    try:
        setup_targets(d)
        yield d
        assert "Traceback" not in d.log(), d.log()
    finally:
        rc = d.stop()
    assert rc == 0, f"vhost exited with {rc} on SIGTERM:\n{d.log()}"


@pytest.fixture
def scsi_daemon(_shared_scsi_daemon):
    """One daemon per test module with ``vhost.0`` (targets 0 and 1, see
    setup_targets); each test connects its own front-end."""
    d = _shared_scsi_daemon
    assert d.alive(), d.log()
    wait_no_session(d, "vhost.0")
    return d


@pytest.fixture
def scsi_dev(scsi_daemon):
    """A connected virtio-scsi driver on ``vhost.0`` (one request queue, hotplug)."""
    dev = connect_scsi(scsi_daemon.socket("vhost.0"))
    try:
        yield dev
    finally:
        dev.close()
        # Leave the controller free for the next test.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            (c,) = scsi_daemon.rpc("vhost_get_controllers", name="vhost.0")
            if not c["sessions"]:
                break
            time.sleep(0.02)
