"""Run a real ``vhost`` daemon in a subprocess for tests (fixture ``vhost_daemon``).

The daemon runs exactly as a user starts it (interrupt mode by default, so it
leaves the machine's other core to the test or a TCG guest).  ``rpc()`` talks to
it over its JSON-RPC socket; ``log()`` returns what it printed so far.

A daemon whose native modules were built with sanitizers (scripts/test-sanitizers.sh)
prints their reports to its log: ``stop()`` fails the test that started it when
the log holds one, whatever the test itself saw.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from vhost_core.rpc.client import RpcClient

#: The first line of an AddressSanitizer or UndefinedBehaviorSanitizer report.
SANITIZER_REPORT = re.compile(r"^(==\d+==ERROR: \w+Sanitizer|.*: runtime error: |SUMMARY: \w+Sanitizer)",
                              re.MULTILINE)


class VhostDaemon:
    def __init__(self, workdir: Path, cpumask: str = "0x1", interrupt_mode: bool = True,
                 extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None,
                 python: str | None = None, pass_fds: tuple[int, ...] = ()) -> None:
        """``python``: the interpreter that runs the daemon (default: this one), e.g. a
        virtual environment's, to test what exactly that environment has installed."""
        self.workdir = Path(workdir)
        self.socket_dir = self.workdir / "sockets"
        self.rpc_path = str(self.workdir / "rpc.sock")
        self.log_path = self.workdir / "vhost.log"
        self.cpumask = cpumask
        self.args = [python or sys.executable, "-m", "vhost_core.app", "-S", str(self.socket_dir),
                     "-m", cpumask, "-r", self.rpc_path,
                     *(["--interrupt-mode"] if interrupt_mode else []), *extra_args]
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.pass_fds = pass_fds

    def start(self, timeout: float = 15.0) -> VhostDaemon:
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        self._logf = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.args, stdout=self._logf, stderr=subprocess.STDOUT, env=self.env,
                                     pass_fds=self.pass_fds)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vhost exited with {self.proc.returncode} at start:\n{self.log()}")
            if os.path.exists(self.rpc_path):
                try:
                    self.rpc("spdk_get_version")
                    return self
                except (ConnectionError, OSError):
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"vhost did not answer on {self.rpc_path} within {timeout}s:\n{self.log()}")

    def rpc(self, method: str, **params: Any) -> Any:
        with RpcClient(self.rpc_path, timeout=60) as client:
            return client.call(method, params or None)

    def socket(self, ctrlr: str) -> str:
        return str(self.socket_dir / ctrlr)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, text: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.log()
            if text in out:
                return out
            time.sleep(0.05)
        raise AssertionError(f"'{text}' did not appear in the vhost log within {timeout}s:\n{self.log()}")

    def sanitizer_report(self) -> str | None:
        """The log from its first sanitizer report on, or None."""
        out = self.log()
        found = SANITIZER_REPORT.search(out)
        return out[found.start():] if found else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._logf.close()
        report = self.sanitizer_report()
        if report is not None:
            raise AssertionError(f"vhost (pid {self.proc.pid}) made a sanitizer report:\n{report}")
        return self.proc.returncode

    def __enter__(self) -> VhostDaemon:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_no_session(d: Any, ctrlr: str, timeout: float = 10.0) -> None:
    """Wait until daemon ``d`` has torn down the previous front-end of ``ctrlr`` (one
    front-end at a time: a connection made earlier would be refused)."""
    deadline = time.monotonic() + timeout
    while True:
        (c,) = d.rpc("vhost_get_controllers", name=ctrlr)
        if not c["sessions"]:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"controller {ctrlr} still has a session after {timeout}s:\n{d.log()}")
        time.sleep(0.02)


def wait_in_flight(d: Any, ctrlr: str, count: int = 1, *, queue: int = 0, timeout: float = 10.0) -> None:
    """Wait until ``count`` requests of ``ctrlr``'s virtqueue ``queue`` are in flight (taken
    from the ring, not completed: ``vhost_get_queue_stats``), e.g. at a backend that holds
    them: what a test waits for instead of sleeping."""
    deadline = time.monotonic() + timeout
    while True:
        n = d.rpc("vhost_get_queue_stats", ctrlr=ctrlr)[queue]["in_flight"]
        if n >= count:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"controller {ctrlr} queue {queue}: {n} requests in flight after {timeout}s, "
                                 f"expected {count}:\n{d.log()}")
        time.sleep(0.01)
