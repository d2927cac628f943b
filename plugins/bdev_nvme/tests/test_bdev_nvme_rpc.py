"""bdev_nvme's commands with SPDK's shapes, and every bad input a user can give: each answers
an error that names the fix, within the connect timeout, and leaves nothing half-attached."""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
from vhost_core.rpc.registry import RpcError
from vhost_core.testing.daemon import VhostDaemon


def rpc_error(d, method: str, **params) -> RpcError:
    with pytest.raises(RpcError) as ei:
        d.rpc(method, **params)
    return ei.value


def nothing_attached(d) -> None:
    assert d.rpc("bdev_nvme_get_controllers") == []
    assert [b["name"] for b in d.rpc("bdev_get_bdevs")] == []
    assert d.alive()


def vhost_rpc(d, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vhost_core.rpc.cli", "-s", d.rpc_path, *args],
                          capture_output=True, text=True, timeout=60)


class FakeTarget:
    """A TCP listener standing in for a target: silent (accepts, never answers), or answering
    the ICReq with ``reply``."""

    def __init__(self, reply: bytes | None = None) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.reply = reply
        self.conns: list[socket.socket] = []
        self._t = threading.Thread(target=self._serve, daemon=True)
        self._t.start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)
            if self.reply is not None:
                try:
                    c.recv(128)
                    c.sendall(self.reply)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


def icresp(pfv: int = 0, cpda: int = 0, digest: int = 0, maxdata: int = 1 << 17) -> bytes:
    pdu = bytearray(128)
    pdu[0], pdu[2] = 1, 128
    struct.pack_into("<IHBBI", pdu, 4, 128, pfv, cpda, digest, maxdata)
    return bytes(pdu)


def test_pcie_addresses_that_name_no_function_are_refused_naming_the_fix(vhost_daemon):
    """On the host (no NVMe function here): a malformed BDF and one that does not exist.
    The cases that need an NVMe controller (not bound to vfio-pci, not NVMe, attached
    twice) run in a guest: test_pcie_guest.py."""
    d = vhost_daemon
    e = rpc_error(d, "bdev_nvme_attach_controller", name="Nvme0", trtype="pcie", traddr="01:00")
    assert e.code == -errno.EINVAL
    assert "'01:00' is not a PCI address" in e.message and "-a 0000:01:00.0" in e.message
    assert not os.path.exists("/sys/bus/pci/devices/0000:7f:1f.7")
    e = rpc_error(d, "bdev_nvme_attach_controller", name="Nvme0", trtype="pcie", traddr="7f:1f.7")
    assert e.code == -errno.ENODEV
    assert "no PCI function 0000:7f:1f.7" in e.message and "lspci -D -d ::0108" in e.message
    # The seed's line, through the old name and SPDK's old flags.
    r = vhost_rpc(d, "construct_nvme_bdev", "-b", "Nvme0", "-t", "pcie", "-a", "0000:7f:1f.7")
    assert r.returncode == 1 and "no PCI function 0000:7f:1f.7" in r.stderr
    e = rpc_error(d, "bdev_nvme_attach_controller", name="Nvme0", trtype="rdma", traddr="192.0.2.1",
                  subnqn="nqn.2016-06.io.spdk:cnode1")
    assert e.code == -errno.ENOTSUP and "use -t tcp or -t pcie" in e.message
    nothing_attached(d)


def test_spdk_only_parameters_are_refused_by_name(vhost_daemon):
    d = vhost_daemon
    e = rpc_error(d, "bdev_nvme_attach_controller", name="Nvme0", trtype="tcp", traddr="127.0.0.1",
                  subnqn="nqn.2016-06.io.spdk:cnode1", psk="NVMeTLSkey-1:01:xxxx")
    assert e.code == -errno.ENOTSUP and "psk" in e.message and "TLS" in e.message
    e = rpc_error(d, "bdev_nvme_attach_controller", name="Nvme0", trtype="tcp", traddr="127.0.0.1")
    assert "subnqn is required" in e.message and "nvme discover" in e.message
    e = rpc_error(d, "bdev_nvme_attach_controller", name="Nvme0", trtype="tcp", traddr="127.0.0.1",
                  subnqn="nqn.2016-06.io.spdk:cnode1", ctrlr_loss_timeout_sec=10)
    assert "reconnect_delay_sec > 0" in e.message
    e = rpc_error(d, "bdev_nvme_attach_controller", name="Nvme0", trtype="tcp", traddr="127.0.0.1",
                  subnqn="nqn.2016-06.io.spdk:cnode1", ctrlr_loss_timeout_sec=10, reconnect_delay_sec=2,
                  fast_io_fail_timeout_sec=20)
    assert "must lie between" in e.message
    nothing_attached(d)


def test_nothing_listening_names_address_and_port(vhost_daemon):
    d = vhost_daemon
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]      # closed again: nothing listens there
    t0 = time.monotonic()
    e = rpc_error(d, "bdev_nvme_attach_controller", name="Nvme0", trtype="tcp", traddr="127.0.0.1",
                  trsvcid=str(port), subnqn="nqn.2016-06.io.spdk:cnode1")
    assert time.monotonic() - t0 < 5
    assert e.code == -errno.ECONNREFUSED
    assert f"nothing listens on 127.0.0.1:{port}" in e.message and "trsvcid" in e.message
    nothing_attached(d)


def test_a_silent_target_fails_within_the_connect_timeout(vhost_daemon):
    d = vhost_daemon
    fake = FakeTarget()
    try:
        answered: list[float] = []

        def other_client() -> None:
            time.sleep(0.5)                          # while the attach waits for the target
            t = time.monotonic()
            d.rpc("bdev_get_bdevs")
            answered.append(time.monotonic() - t)

        other = threading.Thread(target=other_client)
        other.start()
        t0 = time.monotonic()
        e = rpc_error(d, "bdev_nvme_attach_controller", name="Nvme0", trtype="tcp", traddr="127.0.0.1",
                      trsvcid=str(fake.port), subnqn="nqn.2016-06.io.spdk:cnode1",
                      fabrics_connect_timeout_us=1_500_000)
        took = time.monotonic() - t0
        other.join()
        assert 1.4 < took < 4, took
        assert e.code == -errno.ETIMEDOUT
        assert "ICReq" in e.message and "within 1500 ms" in e.message and "reachable" in e.message
        # Another client was answered meanwhile: the attach waits without the control lock.
        assert answered and answered[0] < 0.5, answered
        nothing_attached(d)
    finally:
        fake.close()


@pytest.mark.parametrize("reply, words", [
    (icresp(pfv=1), "PDU format version 1"),
    (icresp(maxdata=100), "MAXH2CDATA 100"),
    (icresp(digest=3), "digests"),
    (b"HTTP/1.1 400 Bad Request\r\n\r\n" + bytes(100), "unexpected or malformed PDU"),
])
def test_a_bad_icresp_fails_the_connection_not_the_daemon(vhost_daemon, reply, words):
    d = vhost_daemon
    fake = FakeTarget(reply)
    try:
        e = rpc_error(d, "bdev_nvme_attach_controller", name="Nvme0", trtype="tcp", traddr="127.0.0.1",
                      trsvcid=str(fake.port), subnqn="nqn.2016-06.io.spdk:cnode1",
                      fabrics_connect_timeout_us=3_000_000)
        assert e.code == -errno.EPROTO and words in e.message and "NVMe/TCP port" in e.message
        nothing_attached(d)
    finally:
        fake.close()


def test_wrong_subsystem_nqn_names_the_fix(vhost_daemon, nvmet_target):
    d = vhost_daemon
    e = rpc_error(d, "bdev_nvme_attach_controller",
                  **nvmet_target.attach_params(subnqn="nqn.2026-12.io.vhost-py:no-such-subsystem"))
    assert e.code == -errno.ENODEV
    assert "has no subsystem 'nqn.2026-12.io.vhost-py:no-such-subsystem'" in e.message
    assert "nvme discover" in e.message
    nothing_attached(d)


def test_a_target_refusing_the_host_names_the_host_nqn(vhost_daemon, nvmet_target, nvmet_mod):
    d = vhost_daemon
    e = rpc_error(d, "bdev_nvme_attach_controller",
                  **nvmet_target.attach_params(subnqn=nvmet_mod.RESTRICTED_NQN,
                                               hostnqn="nqn.2026-12.io.vhost-py:stranger"))
    assert e.code == -errno.EACCES
    assert "refuses host 'nqn.2026-12.io.vhost-py:stranger'" in e.message and "allowed_hosts" in e.message
    nothing_attached(d)
    # The allowed host gets in; that subsystem has no namespace: no bdevs.
    assert d.rpc("bdev_nvme_attach_controller",
                 **nvmet_target.attach_params(subnqn=nvmet_mod.RESTRICTED_NQN,
                                              hostnqn=nvmet_mod.ALLOWED_HOST)) == []
    (c,) = d.rpc("bdev_nvme_get_controllers")
    assert c["ctrlrs"][0]["host"]["nqn"] == nvmet_mod.ALLOWED_HOST
    assert d.rpc("bdev_nvme_detach_controller", name="Nvme0") is True
    nothing_attached(d)


def test_attach_shows_get_detach_like_spdk(vhost_daemon, nvmet_target, nvmet_mod, tmp_path):
    d = vhost_daemon
    port = str(nvmet_target.port)
    r = vhost_rpc(d, "bdev_nvme_attach_controller", "-b", "Nvme0", "-t", "tcp", "-a", "127.0.0.1", "-f", "ipv4",
                  "-s", port, "-n", nvmet_mod.DISK_NQN)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["Nvme0n1", "Nvme0n2"]
    (b,) = d.rpc("bdev_get_bdevs", name="Nvme0n1")
    assert b["product_name"] == "NVMe disk" and b["block_size"] == 512
    assert b["num_blocks"] == nvmet_mod.RAM_MB << 11
    nvme = b["driver_specific"]["nvme"][0]
    assert nvme["trid"] == {"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": port,
                            "subnqn": nvmet_mod.DISK_NQN}
    assert nvme["ctrlr_data"]["serial_number"] == nvmet_mod.SERIAL
    assert nvme["ctrlr_data"]["model_number"] == "vhost-py nvmet disk"
    assert nvme["ns_data"]["id"] == 1
    assert b["supported_io_types"]["unmap"] and b["supported_io_types"]["write_zeroes"]
    (c,) = d.rpc("get_nvme_controllers")                      # the old name
    assert c["name"] == "Nvme0" and c["ctrlrs"][0]["state"] == "enabled"
    assert c["ctrlrs"][0]["trid"]["subnqn"] == nvmet_mod.DISK_NQN
    # One name, one path.
    e = rpc_error(d, "bdev_nvme_attach_controller", **nvmet_target.attach_params("Nvme0"))
    assert e.code == -errno.EEXIST and "already exists" in e.message
    e = rpc_error(d, "bdev_nvme_attach_controller", **nvmet_target.attach_params("Nvme1"))
    assert e.code == -errno.EEXIST and "already attached as 'Nvme0'" in e.message
    # save_config recreates it.
    saved = d.rpc("framework_get_config", name="bdev")
    attach = [c for c in saved if c["method"] == "bdev_nvme_attach_controller"]
    assert attach and attach[0]["params"]["subnqn"] == nvmet_mod.DISK_NQN
    assert attach[0]["params"]["trsvcid"] == port
    config = tmp_path / "nvme.json"
    config.write_text(json.dumps({"subsystems": [{"subsystem": "bdev", "config": saved}]}))
    e = rpc_error(d, "bdev_nvme_detach_controller", name="Nvme0", traddr="192.0.2.7")
    assert e.code == -errno.ENODEV and "no path with traddr 192.0.2.7" in e.message
    r = vhost_rpc(d, "delete_nvme_controller", "Nvme0")       # the old name
    assert r.returncode == 0 and r.stdout == "", r.stderr
    nothing_attached(d)
    e = rpc_error(d, "bdev_nvme_detach_controller", name="Nvme0")
    assert e.code == -errno.ENODEV
    # What was saved attaches again at start-up (vhost --json).
    with VhostDaemon(tmp_path / "again", extra_args=("--json", str(config))) as again:
        assert [b["name"] for b in again.rpc("bdev_get_bdevs")] == ["Nvme0n1", "Nvme0n2"]
        assert again.rpc("bdev_nvme_get_controllers")[0]["ctrlrs"][0]["trid"]["trsvcid"] == port


def test_set_options_sets_the_defaults_of_later_attaches(vhost_daemon, nvmet_target):
    d = vhost_daemon
    # What SPDK's save_config writes: every option; the timeouts are honoured.
    assert d.rpc("bdev_nvme_set_options", action_on_timeout="none", timeout_us=0, timeout_admin_us=0,
                 keep_alive_timeout_ms=10000, transport_retry_count=4, bdev_retry_count=3,
                 ctrlr_loss_timeout_sec=30, reconnect_delay_sec=2, fast_io_fail_timeout_sec=0,
                 generate_uuids=False, transport_tos=0) is True
    assert "bdev_nvme_set_options: ignored timeout_admin_us, transport_retry_count" in d.log()
    e = rpc_error(d, "bdev_nvme_set_options", action_on_timeout="retry")
    assert e.code == -errno.EINVAL and "action_on_timeout must be none, abort or reset" in e.message, e.message
    d.rpc("bdev_nvme_attach_controller", **nvmet_target.attach_params())
    (c,) = d.rpc("bdev_nvme_get_controllers", name="Nvme0")
    assert c["ctrlrs"][0]["ctrlr_loss_timeout_sec"] == 30 and c["ctrlrs"][0]["reconnect_delay_sec"] == 2
    e = rpc_error(d, "bdev_nvme_reset_controller", name="Nvme0")      # PCIe only (the guest test)
    assert e.code == -errno.ENOTSUP and "NVMe/TCP controllers reset by reconnecting" in e.message, e.message
    e = rpc_error(d, "bdev_nvme_reset_controller", name="Nvme9")
    assert e.code == -errno.ENODEV and "no PCIe NVMe controller 'Nvme9'" in e.message, e.message
    assert d.rpc("bdev_nvme_set_hotplug", enable=False) is True
    d.rpc("bdev_nvme_detach_controller", name="Nvme0")
    nothing_attached(d)
