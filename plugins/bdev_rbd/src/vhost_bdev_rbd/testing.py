"""A throw-away single-node Ceph cluster on 127.0.0.1, for tests and benchmarks.

One monitor, one OSD on memstore (RAM), no manager, cephx on, pool ``rbd`` with size 1.
Every ``ceph``/``rbd`` command runs with a timeout: without a manager some commands wait
forever instead of failing.  Nothing here touches /etc/ceph or any system service: the
cluster lives in one directory and dies with :meth:`CephCluster.stop`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

#: What must be installed (Debian 12 packages), and how tests name the fix.
REQUIRED_TOOLS = ("ceph-mon", "ceph-osd", "ceph", "rbd", "monmaptool", "ceph-authtool")
INSTALL_HINT = ("install Ceph: scripts/install.sh --test (apt-get install ceph-mon ceph-osd ceph-common "
                "python3-rados python3-rbd librbd-dev)")
CLI_TIMEOUT_S = 30


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CephError(RuntimeError):
    pass


class CephCluster:
    """``start()`` brings the cluster up (a few seconds), ``stop()`` removes every trace."""

    def __init__(self, root: str | None = None, memstore_bytes: int = 2 << 30) -> None:
        missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
        if missing:
            raise CephError(f"{', '.join(missing)} not found: {INSTALL_HINT}")
        self.root = Path(root or tempfile.mkdtemp(prefix="vhost-ceph-"))
        self.fsid = str(uuid.uuid4())
        self.port = _free_port()
        self.mon_host = f"127.0.0.1:{self.port}"
        self.conf = self.root / "ceph.conf"
        self.keyring = self.root / "keyring"
        self.memstore_bytes = memstore_bytes
        self.mon: subprocess.Popen | None = None
        self.osd: subprocess.Popen | None = None
        self.admin_key = ""

    # ------------------------------------------------------------ plumbing

    def _write_conf(self) -> None:
        r = self.root
        self.conf.write_text(f"""[global]
fsid = {self.fsid}
mon host = v1:{self.mon_host}
public addr = 127.0.0.1
ms bind ipv4 = true
ms bind ipv6 = false
ms bind msgr2 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = {self.keyring}
run dir = {r}/run
admin socket = {r}/run/$name.asok
log file = {r}/$name.log
log to stderr = false
err to stderr = true
mon data = {r}/mon.$id
osd data = {r}/osd.$id
osd objectstore = memstore
memstore device bytes = {self.memstore_bytes}
memstore page set = true
memstore page size = 4096
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd pool default pg num = 8
osd pool default pgp num = 8
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 0
osd op num shards = 1
osd op num threads per shard = 2
# The default grace: a PG's read lease is 0.8x it, and an OSD stopped (SIGSTOP, in the
# fault tests) for longer than its lease can leave PGs laggy with ops stuck after SIGCONT.
osd heartbeat grace = 20
osd max object name len = 256
osd max object namespace len = 64
debug ms = 0

[osd]
keyring = {r}/osd.$id/keyring
""")

    def env(self) -> dict[str, str]:
        # Ceph's own programs run as installed: a sanitizer runtime preloaded into the
        # test process (scripts/test-sanitizers.sh) must not be forced into them.
        env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS")}
        return {**env, "CEPH_CONF": str(self.conf)}

    def run(self, *args: str, timeout: float = CLI_TIMEOUT_S, check: bool = True,
            input: bytes | None = None) -> subprocess.CompletedProcess:
        """A Ceph command line (ceph, rbd, rados, ...) against this cluster, with a timeout."""
        argv = [args[0], "-c", str(self.conf), *args[1:]] if args[0] in ("ceph", "rbd", "rados") else list(args)
        try:
            cp = subprocess.run(argv, capture_output=True, timeout=timeout, env=self.env(), input=input)
        except subprocess.TimeoutExpired:
            raise CephError(f"{' '.join(argv)}: no answer within {timeout} s") from None
        if check and cp.returncode:
            raise CephError(f"{' '.join(argv)} failed ({cp.returncode}): "
                            f"{cp.stderr.decode(errors='replace').strip()}")
        return cp

    def ceph(self, *args: str, **kw) -> str:
        return self.run("ceph", *args, **kw).stdout.decode()

    def rbd(self, *args: str, **kw) -> str:
        return self.run("rbd", *args, **kw).stdout.decode()

    # ------------------------------------------------------------ lifecycle

    def start(self) -> CephCluster:
        (self.root / "run").mkdir(parents=True, exist_ok=True)
        self._write_conf()
        kr = str(self.keyring)
        self.run("ceph-authtool", "--create-keyring", kr, "--gen-key", "-n", "mon.", "--cap", "mon", "allow *")
        self.run("ceph-authtool", kr, "--gen-key", "-n", "client.admin", "--cap", "mon", "allow *",
                 "--cap", "osd", "allow *", "--cap", "mgr", "allow *")
        monmap = str(self.root / "monmap")
        self.run("monmaptool", "--create", "--fsid", self.fsid, "--addv", "a", f"[v1:{self.mon_host}]", monmap)
        self.run("ceph-mon", "-c", str(self.conf), "--mkfs", "-i", "a", "--monmap", monmap, "--keyring", kr)
        self.mon = self._spawn("ceph-mon", "a")
        def mon_up() -> bool:
            try:
                return self.run("ceph", "mon", "stat", check=False, timeout=10).returncode == 0
            except CephError:
                return False
        self._wait(mon_up, 30, "the monitor")
        osd_uuid = str(uuid.uuid4())
        osd_id = self.ceph("osd", "new", osd_uuid).strip()
        if osd_id != "0":
            raise CephError(f"osd new gave id {osd_id}, expected 0")
        (self.root / "osd.0").mkdir(exist_ok=True)
        self.run("ceph-osd", "-c", str(self.conf), "-i", "0", "--mkfs", "--mkkey", "--osd-uuid", osd_uuid,
                 "--no-mon-config")
        self.ceph("auth", "add", "osd.0", "osd", "allow *", "mon", "allow profile osd",
                  "-i", str(self.root / "osd.0" / "keyring"))
        self.start_osd()
        self.ceph("osd", "pool", "create", "rbd", "8", "8")
        self.ceph("osd", "pool", "set", "rbd", "size", "1", "--yes-i-really-mean-it")
        self.ceph("osd", "pool", "application", "enable", "rbd", "rbd")
        self.wait_healthy()
        self.admin_key = self.ceph("auth", "get-key", "client.admin").strip()
        return self

    def _spawn(self, daemon: str, ident: str) -> subprocess.Popen:
        log = open(self.root / f"{daemon}.{ident}.out", "ab")
        try:
            return subprocess.Popen([daemon, "-f", "-c", str(self.conf), "-i", ident], stdout=log,
                                    stderr=subprocess.STDOUT, env=self.env(), start_new_session=True)
        finally:
            log.close()

    @staticmethod
    def _wait(cond, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return
            time.sleep(0.2)
        raise CephError(f"{what} did not come up within {timeout} s")

    def start_osd(self) -> None:
        self.osd = self._spawn("ceph-osd", "0")
        self._wait(self._osd_up, 60, "osd.0")

    def _osd_up(self) -> bool:
        try:
            cp = self.run("ceph", "osd", "dump", "--format", "plain", check=False, timeout=10)
        except CephError:
            return False
        return cp.returncode == 0 and any(line.startswith("osd.0 up") for line in cp.stdout.decode().splitlines())

    def wait_healthy(self, timeout: float = 120) -> None:
        """Every PG of pool rbd active (a write to it then succeeds at once)."""
        def writable() -> bool:
            try:
                cp = self.run("rados", "-p", "rbd", "put", "vhost-probe", "/dev/null", check=False, timeout=10)
            except CephError:       # no answer yet (an OSD catching up)
                return False
            return cp.returncode == 0
        self._wait(writable, timeout, "pool rbd")

    def kill_osd(self) -> None:
        """kill -9 the OSD (its memstore data is lost with it: see restart notes in tests)."""
        if self.osd is not None:
            self.osd.send_signal(signal.SIGKILL)
            self.osd.wait(10)
            self.osd = None

    def stop_osd(self) -> None:
        if self.osd is not None:
            self.osd.send_signal(signal.SIGSTOP)

    def cont_osd(self) -> None:
        if self.osd is not None:
            self.osd.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        for p in (self.osd, self.mon):
            if p is None:
                continue
            try:
                p.send_signal(signal.SIGCONT)
                p.terminate()
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
            except ProcessLookupError:
                pass
        self.osd = self.mon = None
        shutil.rmtree(self.root, ignore_errors=True)

    def client_conf(self) -> dict[str, str]:
        """What bdev_rbd_register_cluster's config_param needs to reach this cluster as admin."""
        return {"mon_host": f"v1:{self.mon_host}", "key": self.admin_key}

    def __enter__(self) -> CephCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
