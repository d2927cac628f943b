"""A target that sends what no correct target sends, on an I/O queue: the request fails (the
guest gets an I/O error, after the command was tried MAX_SENDS times on fresh connections),
the log says what was wrong, and the daemon and the connection's next user carry on."""

from __future__ import annotations

import os

import pytest
from vhost_core.testing import connect_blk
from vhost_core.testing.blk import BlkIOError

CASES = {
    "overrun": ("read", "data bytes 0+4608 for command"),
    "badcid": ("read", "which is not in flight"),
    "offset": ("read", "data bytes 512+512 for command"),
    "r2t": ("write", "R2T for bytes 0+20480"),
    "ddgst": ("read", "data digest error in read data"),
}


@pytest.mark.parametrize("mode", list(CASES))
def test_a_bad_pdu_fails_the_request_not_the_daemon(vhost_daemon, fake_mod, mode):
    d = vhost_daemon
    op, words = CASES[mode]
    fake = fake_mod.FakeController(mode)
    try:
        assert d.rpc("bdev_nvme_attach_controller", name="Nvme0", trtype="tcp", traddr="127.0.0.1",
                     trsvcid=str(fake.port), subnqn="nqn.2026-12.io.vhost-py:fake",
                     ddgst=mode == "ddgst") == ["Nvme0n1"]
        d.rpc("vhost_create_blk_controller", ctrlr="vhost.0", dev_name="Nvme0n1")
        with connect_blk(d.socket("vhost.0"), timeout=20) as dev:
            small = os.urandom(4096)
            dev.write(64, small)                      # in-capsule: fine in every mode
            with pytest.raises(BlkIOError):
                if op == "read":
                    dev.read(0, 8)
                else:
                    dev.write(0, os.urandom(16384))   # past the 8 KiB in-capsule size: R2T
            # The next request on a fresh connection is served.
            dev.write(72, small)
        (c,) = d.rpc("bdev_nvme_get_controllers")
        stats = c["ctrlrs"][0]["stats"]
        assert words in (stats["last_io_queue_error"] or ""), stats
        assert stats["errors"][op] == 1 and stats["io_queue_disconnects"] >= 4
        assert c["ctrlrs"][0]["state"] == "enabled"
        assert fake.disk[72 * 512:80 * 512] == small
        d.wait_log("I/O queue connection(s) lost", timeout=5)     # the reactors' losses reach the log
        assert words in d.log()
        assert d.alive() and "Traceback" not in d.log()
    finally:
        fake.close()
