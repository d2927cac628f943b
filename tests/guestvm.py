"""Drive a small QEMU (TCG) guest from pytest.

Example::

    with GuestVM(["-chardev", f"socket,id=c1,path={sock}",
                  "-device", "vhost-user-blk-pci,chardev=c1,num-queues=2"]) as vm:
        vm.start()
        vm.wait_ready()
        assert vm.check("cat /sys/block/vda/size").strip() == "131072"

The guest is the initramfs built by ``tests/guest/build_image.py`` (busybox,
fio, lsblk/blkdiscard/blockdev, virtio modules).  Its ``/init`` runs a
command agent on a virtio-serial port, so the serial console (``ttyS0``,
captured in ``console_log``) only carries kernel / init messages and never
interferes with command output.

Agent protocol (host side in this file, guest side in build_image.py):
the host sends ``<id> <guest-timeout> <base64(cmd)>\\n``; the agent answers
``\\n@@VT-BEGIN:<id>@@\\n`` + combined stdout/stderr of ``sh -c cmd`` +
``\\n@@VT-END:<id>:<rc>@@\\n``.  ids are random, anything received outside
the markers of the command being waited for (leftovers of a command that
timed out, answers to older pings) is discarded.
"""
from __future__ import annotations

import base64
import functools
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_QBOOT = "/usr/share/qemu/qboot.rom"
_BUILD_SCRIPT = _HERE / "guest" / "build_image.py"


def _load_build_module():
    spec = importlib.util.spec_from_file_location("vhost_test_guest_build_image", _BUILD_SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_build = _load_build_module()
AGENT_PORT_NAME = _build.AGENT_PORT_NAME
BOOT_BANNER = _build.BOOT_BANNER


@functools.lru_cache(maxsize=None)
def find_kernel_and_initrd() -> tuple[str, str]:
    """(kernel, initrd) for the test guest; builds and caches the initrd the
    first time (``${VHOST_TEST_CACHE:-~/.cache/vhost-tests}``)."""
    return _build.build()


def _cleanup_vm(procs: list, workdir: str | None) -> None:
    """Finalizer of a GuestVM: kill QEMU if still running, remove the workdir."""
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    if workdir:
        shutil.rmtree(workdir, ignore_errors=True)


class GuestError(Exception):
    """The guest/QEMU did not behave (QEMU exited, agent gone, panic, ...)."""


class GuestTimeout(GuestError, TimeoutError):
    def __init__(self, msg: str, output: str = ""):
        super().__init__(msg)
        self.output = output


class GuestCommandError(GuestError):
    def __init__(self, cmd: str, rc: int, output: str):
        super().__init__(f"guest command failed (rc={rc}): {cmd}\n--- output ---\n{output}")
        self.cmd = cmd
        self.rc = rc
        self.output = output


class GuestVM:
    """A QEMU guest booted from the cached test initramfs.

    ``devices`` are raw QEMU arguments appended to the command line.
    Files (``qemu.log``: QEMU's stdout+stderr, ``console.log``: serial
    console, ``agent.log``: agent transcript, sockets) live in ``workdir``,
    which is removed by ``close()`` unless ``keep_workdir`` (or the env var
    ``VHOST_TEST_KEEP_VM=1``); the logs stay readable through the properties.
    """

    def __init__(self, devices: list[str] | tuple[str, ...] = (), *, mem_mb: int = 512,
                 smp: int = 1, shared_memory: bool = True, extra_args=(), name: str = "vm",
                 append: str = "", kernel: str | None = None, initrd: str | None = None,
                 qemu: str | None = None, bios: str | None = None,
                 workdir: str | None = None,
                 keep_workdir: bool | None = None):
        self.devices = list(devices)
        self.mem_mb = mem_mb
        self.smp = smp
        self.shared_memory = shared_memory
        self.extra_args = list(extra_args)
        self.name = name
        self.append = append
        self._kernel = kernel
        self._initrd = initrd
        self.qemu = qemu or os.environ.get("VHOST_TEST_QEMU", "qemu-system-x86_64")
        # qboot instead of SeaBIOS when available: ~2 s less per boot under TCG.
        # VHOST_TEST_BIOS=default (or bios="default") keeps QEMU's default.
        if bios is None:
            bios = os.environ.get("VHOST_TEST_BIOS") or (
                _QBOOT if os.path.exists(_QBOOT) else "default")
        self.bios = None if bios == "default" else bios
        if workdir is None:
            workdir = tempfile.mkdtemp(prefix=f"gvm-{name[:24]}-",
                                       dir=os.environ.get("VHOST_TEST_TMPDIR"))
        else:
            os.makedirs(workdir, exist_ok=True)
        self.workdir = workdir
        if keep_workdir is None:
            keep_workdir = os.environ.get("VHOST_TEST_KEEP_VM") == "1"
        self.keep_workdir = keep_workdir
        self.qemu_log_path = os.path.join(workdir, "qemu.log")
        self.console_log_path = os.path.join(workdir, "console.log")
        self.agent_log_path = os.path.join(workdir, "agent.log")
        self.agent_sock_path = os.path.join(workdir, "agent.sock")
        self.qmp_sock_path = os.path.join(workdir, "qmp.sock")

        self.boot_id: str | None = None
        self.boot_time: float | None = None  # seconds from start() to first agent answer
        self.cmdline: list[str] = []
        self._proc: subprocess.Popen | None = None
        self._start_time = 0.0
        self._sock: socket.socket | None = None
        self._reader: threading.Thread | None = None
        self._cond = threading.Condition()
        self._buf = bytearray()
        self._eof = False
        self._cmd_lock = threading.Lock()
        self._agent_log = None
        self._qmp: socket.socket | None = None
        self._qmp_file = None
        self.qmp_events: list[dict] = []
        self._closed = False
        self._saved_logs: dict[str, str] = {}
        # Kill QEMU / remove the workdir once the object is gone (or at exit)
        # even if the test only called kill(); close() does it right away.
        self._procs: list[subprocess.Popen] = []
        self._cleanup = weakref.finalize(
            self, _cleanup_vm, self._procs, None if keep_workdir else self.workdir)

    # ------------------------------------------------------------------ setup

    def build_cmdline(self) -> list[str]:
        if self._kernel is None or self._initrd is None:
            k, i = find_kernel_and_initrd()
            if not (os.path.exists(k) and os.path.exists(i)):  # cache cleaned meanwhile
                find_kernel_and_initrd.cache_clear()
                k, i = find_kernel_and_initrd()
            self._kernel = self._kernel or k
            self._initrd = self._initrd or i
        append = "console=ttyS0 quiet loglevel=4 mitigations=off"
        if self.append:
            append += " " + self.append
        args = [
            self.qemu, "-name", self.name,
            "-accel", "tcg", "-cpu", "max", "-smp", str(self.smp),
            "-nodefaults", "-no-user-config", "-display", "none",
            "-m", f"{self.mem_mb}M",
        ]
        if self.bios:
            args += ["-bios", self.bios]
        if self.shared_memory:
            args += ["-object", f"memory-backend-memfd,id=mem,size={self.mem_mb}M,share=on",
                     "-numa", "node,memdev=mem"]
        args += [
            "-kernel", self._kernel, "-initrd", self._initrd, "-append", append,
            "-chardev", f"file,id=vtcon,path={self.console_log_path}",
            "-serial", "chardev:vtcon",
            "-qmp", f"unix:{self.qmp_sock_path},server=on,wait=off",
        ]
        args += self.devices
        # Agent channel last, so user devices get the low PCI slots.
        args += [
            "-chardev", f"socket,id=vtagent,path={self.agent_sock_path},server=on,wait=off",
            "-device", "virtio-serial-pci,id=vtagentser",
            "-device", f"virtserialport,bus=vtagentser.0,chardev=vtagent,name={AGENT_PORT_NAME}",
        ]
        args += self.extra_args
        return args

    def start(self) -> "GuestVM":
        """Launch QEMU.  Does not raise if QEMU exits right away (a test may
        expect that): check ``qemu_returncode`` / ``qemu_log`` or call
        ``wait_ready()``, which raises with the log."""
        if self._proc is not None:
            raise GuestError("already started")
        self.cmdline = self.build_cmdline()
        with open(self.qemu_log_path, "wb") as log:
            log.write(("+ " + " ".join(self.cmdline) + "\n").encode())
            log.flush()
            self._start_time = time.monotonic()
            self._proc = subprocess.Popen(self._wrapper() + self.cmdline,
                                          stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True)
            self._procs.append(self._proc)
        self._agent_log = open(self.agent_log_path, "ab")
        self._connect_agent()
        return self

    @staticmethod
    def _wrapper() -> list[str]:
        """SIGKILL QEMU when the test process dies (a killed pytest must not
        leave TCG guests burning CPU).  The parent-death signal follows the
        *thread* that forked, so only when starting from the main thread."""
        setpriv = shutil.which("setpriv")
        if setpriv and threading.current_thread() is threading.main_thread():
            return [setpriv, "--pdeathsig", "KILL", "--"]
        return []

    def _connect_agent(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                return  # QEMU died: wait_ready()/run() report it
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.agent_sock_path)
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    raise GuestError(f"cannot connect to the agent socket\n{self.describe()}")
                time.sleep(0.02)
                continue
            self._sock = s
            break
        self._reader = threading.Thread(target=self._read_loop, name=f"{self.name}-agent",
                                        daemon=True)
        self._reader.start()

    def _read_loop(self) -> None:
        sock = self._sock
        while True:
            try:
                data = sock.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                with self._cond:
                    self._eof = True
                    self._cond.notify_all()
                return
            with self._cond:
                self._buf += data
                self._cond.notify_all()
            try:
                self._agent_log.write(data)
                self._agent_log.flush()
            except (ValueError, OSError):
                pass

    # --------------------------------------------------------------- commands

    def _send(self, line: str) -> None:
        if self._sock is None:
            raise GuestError(f"agent not connected (QEMU exited?)\n{self.describe()}")
        try:
            if self._agent_log:
                self._agent_log.write(f"\n>>> {line}".encode())
            self._sock.sendall(line.encode())
        except OSError as e:
            raise GuestError(f"agent connection lost: {e}\n{self.describe()}") from e

    def _wait_locked(self, deadline: float | None, what: str) -> None:
        """Wait (self._cond held) for more data; raise on timeout/EOF/exit."""
        if self._eof:
            raise GuestError(f"agent connection closed while waiting for {what}\n"
                             f"{self.describe()}")
        if self._proc.poll() is not None:
            raise GuestError(f"QEMU exited (rc={self._proc.returncode}) while waiting for "
                             f"{what}\n{self.describe()}")
        wait = 0.5
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GuestTimeout(f"timeout waiting for {what}")
            wait = min(wait, remaining)
        self._cond.wait(wait)

    def _exec(self, cmd: str, timeout: float | None, wait_end: bool = True):
        # The guest kills the command (and its process group) shortly after
        # the host gave up, so the agent is available again.
        guest_timeout = int(timeout) + 2 if timeout else 0
        cid = secrets.token_hex(8)
        begin = f"@@VT-BEGIN:{cid}@@\n".encode()
        end = f"\n@@VT-END:{cid}:".encode()
        deadline = time.monotonic() + timeout if timeout else None
        what = f"command {cmd!r}"
        with self._cmd_lock:
            self._send(f"{cid} {guest_timeout} {base64.b64encode(cmd.encode()).decode()}\n")
            if not wait_end:
                return None
            with self._cond:
                scan = 0
                while True:
                    i = self._buf.find(begin, scan)
                    if i >= 0:
                        del self._buf[:i + len(begin)]
                        break
                    scan = max(0, len(self._buf) - len(begin))
                    self._wait_locked(deadline, what)
                scan = 0
                while True:
                    i = self._buf.find(end, scan)
                    if i >= 0:
                        j = self._buf.find(b"@@\n", i + len(end))
                        if j >= 0:
                            rc = int(self._buf[i + len(end):j])
                            out = bytes(self._buf[:i]).decode("utf-8", "replace")
                            del self._buf[:j + 3]
                            return rc, out
                    else:
                        scan = max(0, len(self._buf) - len(end))
                    try:
                        self._wait_locked(deadline, what)
                    except GuestTimeout as e:
                        partial = bytes(self._buf).decode("utf-8", "replace")
                        raise GuestTimeout(f"{e} after {timeout}s\n--- partial output ---\n"
                                           f"{partial[-4000:]}", partial) from None

    def run(self, cmd: str, timeout: float | None = 60) -> tuple[int, str]:
        """Run ``cmd`` with the guest's ``/bin/sh -c`` (busybox ash), stdin
        from /dev/null; return (exit code, combined stdout+stderr).  Raises
        GuestTimeout after ``timeout`` seconds (the guest kills the command's
        process group ~2 s later; a later command waits for that).
        ``timeout=None``: no limit."""
        return self._exec(cmd, timeout)

    def check(self, cmd: str, timeout: float | None = 60) -> str:
        """Like run() but raise GuestCommandError on a non-zero exit code."""
        rc, out = self._exec(cmd, timeout)
        if rc != 0:
            raise GuestCommandError(cmd, rc, out)
        return out

    def wait_agent(self, timeout: float = 120) -> "GuestVM":
        """Wait until the agent answers.  The block/SCSI drivers may still be
        loading (or hanging in probe, with a broken backend): use this instead
        of wait_ready() to look around in such a guest."""
        self._wait_boot(timeout, previous_boot_id=None)
        return self

    def wait_ready(self, timeout: float = 120) -> "GuestVM":
        """Wait until the guest booted, the agent answers and every driver
        is loaded (virtio-blk / virtio-scsi probes done: /dev/vdX, /dev/sdX
        exist)."""
        deadline = time.monotonic() + timeout
        self._wait_boot(timeout, previous_boot_id=None)
        self._wait_drivers(deadline)
        return self

    def _wait_drivers(self, deadline: float) -> None:
        while True:
            remaining = deadline - time.monotonic()
            rc, _ = self._exec("test -e /run/guest-ready", timeout=max(remaining, 1.0))
            if rc == 0:
                return
            if time.monotonic() >= deadline:
                try:
                    _, diag = self._exec("ps -o pid,stat,args | grep -v ' \\['; "
                                         "dmesg | tail -n 40", timeout=10)
                except GuestError as e:
                    diag = f"(no diagnostics: {e})"
                raise GuestTimeout(f"guest drivers still loading after the deadline (a device "
                                   f"probe hangs?)\n--- guest ps/dmesg ---\n{diag}\n"
                                   f"{self.describe()}")
            time.sleep(0.1)

    def _wait_boot(self, timeout: float, previous_boot_id: str | None) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self._proc is None:
                raise GuestError("not started")
            if self._proc.poll() is not None or self._sock is None:
                raise GuestError(f"QEMU exited (rc={self._proc.poll()}) before the guest "
                                 f"was ready\n{self.describe()}")
            if "Kernel panic" in self.console_log:
                raise GuestError(f"guest kernel panic\n{self.describe()}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GuestTimeout(f"guest not ready after {timeout}s\n{self.describe()}")
            try:
                rc, out = self._exec("cat /proc/sys/kernel/random/boot_id",
                                     timeout=min(5.0, remaining))
            except GuestTimeout:
                continue  # ping lost (reboot in progress) or still booting: ask again
            boot_id = out.strip()
            if rc == 0 and boot_id and boot_id != previous_boot_id:
                self.boot_id = boot_id
                if self.boot_time is None:
                    self.boot_time = time.monotonic() - self._start_time
                return
            time.sleep(0.2)

    def reboot(self, timeout: float = 120) -> "GuestVM":
        """Guest-initiated reboot (``reboot -f``, no shutdown of the devices
        beyond what the kernel does); returns once the new boot is ready
        (as wait_ready()).  QEMU keeps running."""
        old = self.boot_id
        if old is None:
            self.wait_ready(timeout)
            old = self.boot_id
        deadline = time.monotonic() + timeout
        count = self.boot_count
        self._exec("sync; reboot -f", timeout=None, wait_end=False)
        # Wait for /init of the new boot before pinging: a ping sent while the
        # old kernel still runs would be swallowed by the device reset.
        while self.boot_count <= count:
            if self._proc.poll() is not None:
                raise GuestError(f"QEMU exited (rc={self._proc.returncode}) during reboot\n"
                                 f"{self.describe()}")
            if time.monotonic() > deadline:
                raise GuestTimeout(f"guest did not reboot within {timeout}s\n{self.describe()}")
            time.sleep(0.1)
        self._wait_boot(max(1.0, deadline - time.monotonic()), previous_boot_id=old)
        self._wait_drivers(deadline)
        return self

    def poweroff(self, timeout: float = 60) -> int:
        """Guest-initiated power off; waits for QEMU to exit, returns its exit code."""
        if self._proc is None:
            raise GuestError("not started")
        if self._proc.poll() is None:
            try:
                self._exec("sync; poweroff -f", timeout=None, wait_end=False)
            except GuestError:
                pass
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise GuestTimeout(f"QEMU still running {timeout}s after poweroff\n"
                                   f"{self.describe()}") from None
        self._disconnect()
        return self._proc.returncode

    def wait_exit(self, timeout: float | None = 30) -> int:
        """Wait for QEMU to exit on its own; returns the exit code."""
        if self._proc is None:
            raise GuestError("not started")
        try:
            rc = self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise GuestTimeout(f"QEMU still running after {timeout}s") from None
        self._disconnect()
        return rc

    def kill(self) -> None:
        """Kill QEMU (SIGKILL) and wait for it."""
        if self._proc is not None and self._proc.poll() is None:
            try:
                self._proc.send_signal(signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._proc.wait()
        self._disconnect()

    # --------------------------------------------------------------------- QMP

    def qmp(self, command: str, **arguments):
        """Execute a QMP command, return its "return" value (raise on error)."""
        if self._qmp is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(30)
            s.connect(self.qmp_sock_path)
            self._qmp = s
            self._qmp_file = s.makefile("rwb")
            json.loads(self._qmp_file.readline())  # greeting
            self._qmp_call("qmp_capabilities")
        return self._qmp_call(command, **arguments)

    def _qmp_call(self, command: str, **arguments):
        msg = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self._qmp_file.write(json.dumps(msg).encode() + b"\n")
        self._qmp_file.flush()
        while True:
            line = self._qmp_file.readline()
            if not line:
                raise GuestError("QMP connection closed")
            resp = json.loads(line)
            if "event" in resp:
                self.qmp_events.append(resp)
                continue
            if "error" in resp:
                raise GuestError(f"QMP {command}: {resp['error']}")
            return resp.get("return")

    # --------------------------------------------------------------- teardown

    def _disconnect(self) -> None:
        for s in (self._sock, self._qmp):
            if s is not None:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
        self._sock = None
        self._qmp = None
        if self._qmp_file is not None:
            try:
                self._qmp_file.close()
            except OSError:
                pass
            self._qmp_file = None
        if self._reader is not None:
            self._reader.join(5)
            self._reader = None
        if self._agent_log is not None:
            self._agent_log.close()
            self._agent_log = None

    def close(self) -> None:
        """Kill QEMU if still running and remove the workdir (logs are kept
        in memory and remain available through the properties)."""
        if self._closed:
            return
        self.kill()
        self._closed = True
        if not self.keep_workdir:
            self._saved_logs = {"qemu": self.qemu_log, "console": self.console_log,
                                "agent": self.agent_log}
        self._cleanup()

    def __enter__(self) -> "GuestVM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ inspection

    @property
    def qemu_pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def qemu_returncode(self) -> int | None:
        """None while QEMU runs (or was never started)."""
        return self._proc.poll() if self._proc else None

    def _read_log(self, path: str, key: str) -> str:
        if key in self._saved_logs:
            return self._saved_logs[key]
        try:
            with open(path, "rb") as f:
                return f.read().decode("utf-8", "replace").replace("\r\n", "\n")
        except FileNotFoundError:
            return ""

    @property
    def console_log(self) -> str:
        """Everything the guest printed on its serial console (kernel, /init)."""
        return self._read_log(self.console_log_path, "console")

    @property
    def qemu_log(self) -> str:
        """QEMU's own stdout+stderr (first line: the command line)."""
        return self._read_log(self.qemu_log_path, "qemu")

    @property
    def agent_log(self) -> str:
        """Raw transcript of the agent channel (">>> " lines are host->guest)."""
        return self._read_log(self.agent_log_path, "agent")

    @property
    def boot_count(self) -> int:
        """Number of times /init finished booting (1 + reboots)."""
        return self.console_log.count(BOOT_BANNER)

    def describe(self, tail: int = 60) -> str:
        """Human readable state + log tails, for test failure messages."""
        def last(text: str) -> str:
            return "\n".join(text.splitlines()[-tail:])
        rc = self.qemu_returncode
        return (f"=== GuestVM {self.name}: pid={self.qemu_pid} "
                f"returncode={rc} workdir={self.workdir}\n"
                f"--- QEMU log ---\n{last(self.qemu_log)}\n"
                f"--- console (last {tail} lines) ---\n{last(self.console_log)}\n"
                f"--- agent (last {tail} lines) ---\n{last(self.agent_log)}\n")
