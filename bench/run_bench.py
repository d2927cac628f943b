#!/usr/bin/env python3
"""Benchmark vhost-user-blk targets with the native load generator (no VM).

Every target is started pinned to one core (default 0, via taskset) and the
load generator (bench/loadgen/vublk_loadgen) runs pinned to another core
(default 1) and talks vhost-user directly to the target's socket.

Targets:
  qsd-null         qemu-storage-daemon, null-co (reads do not touch the buffer)
  qsd-null-zeroes  qemu-storage-daemon, null-co,read-zeroes=on (reads memset)
  ours-null        our target (`vhost`), bdev_null_create Null0 1024 512
  ours-malloc      our target (`vhost`), bdev_malloc_create 1024 512 -b Malloc0
  ref-null         bench/loadgen/vublk_nullsrv: a zero-work polling C stub that
                   shows the ceiling of the load generator itself (calibration)

Results go to bench/results/ (JSON, PNG, markdown).  See bench/README.md.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
LOADGEN_DIR = BENCH_DIR / "loadgen"
LOADGEN = LOADGEN_DIR / "vublk_loadgen"
NULLSRV = LOADGEN_DIR / "vublk_nullsrv"

ALL_TARGETS = ["qsd-null", "qsd-null-zeroes", "ours-null", "ours-malloc", "ref-null"]
DEFAULT_TARGETS = ALL_TARGETS
# (ours, peer) pairs for the ratio table
PAIRS = [("ours-null", "qsd-null"), ("ours-malloc", "qsd-null-zeroes")]
DEFAULT_WORKLOADS = "randread:1,randread:32,randwrite:1,randwrite:32"
DEV_SIZE_MIB = 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# build
# --------------------------------------------------------------------------
def build_tools() -> None:
    for exe in (LOADGEN, NULLSRV):
        src = exe.with_suffix(".c")
        if exe.exists() and exe.stat().st_mtime >= src.stat().st_mtime:
            continue
        cmd = ["gcc", "-O2", "-g", "-Wall", "-Wextra", "-o", str(exe), str(src)]
        log("building: " + " ".join(cmd))
        subprocess.run(cmd, check=True)


# --------------------------------------------------------------------------
# machine info / noise
# --------------------------------------------------------------------------
def machine_info() -> dict:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    qsd_ver = None
    if shutil.which("qemu-storage-daemon"):
        try:
            out = subprocess.run(["qemu-storage-daemon", "--version"], capture_output=True,
                                 text=True, timeout=10).stdout
            qsd_ver = out.splitlines()[0] if out else None
        except Exception:  # noqa: BLE001
            pass
    git = None
    try:
        git = subprocess.run(["git", "-C", str(BENCH_DIR), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001
        pass
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "qemu_storage_daemon": qsd_ver,
        "git": git,
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
    }


def cpu_idle_fraction(interval: float = 1.0) -> list[float]:
    """Per-CPU idle fraction over `interval` seconds (to detect a noisy box)."""

    def snap():
        res = {}
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("cpu") and line[3:4].isdigit():
                f = line.split()
                vals = list(map(int, f[1:]))
                res[f[0]] = (vals[3] + vals[4], sum(vals))
        return res

    a = snap()
    time.sleep(interval)
    b = snap()
    out = []
    for k in sorted(a, key=lambda s: int(s[3:])):
        di = b[k][0] - a[k][0]
        dt = b[k][1] - a[k][1]
        out.append(di / dt if dt else 1.0)
    return out


def cpu_busy_ticks(cpus: list[int]) -> int:
    """Sum of non-idle ticks of the given cpus (from /proc/stat)."""
    want = {f"cpu{c}" for c in cpus}
    total = 0
    for line in Path("/proc/stat").read_text().splitlines():
        f = line.split()
        if f and f[0] in want:
            v = list(map(int, f[1:]))
            total += sum(v[:8]) - v[3] - v[4]  # minus idle, iowait (guest is in user)
    return total


def foreign_cpu_pct(target_pid: int | None, cpus: list[int], interval: float) -> float:
    """CPU% (of one core) used on `cpus` by anything but the target, sampled now."""
    b0 = cpu_busy_ticks(cpus)
    t0 = proc_tree_ticks(target_pid) if target_pid else 0
    time.sleep(interval)
    b1 = cpu_busy_ticks(cpus)
    t1 = proc_tree_ticks(target_pid) if target_pid else 0
    return max(0.0, 100.0 * ((b1 - b0) - (t1 - t0)) / CLK_TCK / interval)


def wait_quiet(target_pid: int | None, cpus: list[int], max_wait: float,
               threshold: float = 10.0) -> float:
    """Wait (up to max_wait s) until other processes use < threshold% on cpus."""
    deadline = time.monotonic() + max_wait
    warned = False
    while True:
        f = foreign_cpu_pct(target_pid, cpus, 0.5)
        if f < threshold or time.monotonic() >= deadline:
            return f
        if not warned:
            log(f"  machine busy ({f:.0f}% of a core used by other processes), waiting up to "
                f"{max_wait:g}s for quiet")
            warned = True


def proc_tree_ticks(pid: int) -> int:
    """utime+stime (clock ticks) of pid and all its descendants."""
    total = 0
    todo = [pid]
    seen = set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            total += int(fields[11]) + int(fields[12])
            for t in Path(f"/proc/{p}/task").iterdir():
                try:
                    ch = (t / "children").read_text().split()
                    todo.extend(int(c) for c in ch)
                except OSError:
                    pass
        except (OSError, ValueError):
            pass
    return total


# --------------------------------------------------------------------------
# target management
# --------------------------------------------------------------------------
class TargetError(Exception):
    pass


class Target:
    def __init__(self, name: str, args, workdir: Path, logdir: Path):
        self.name = name
        self.args = args
        self.workdir = workdir
        self.logfile = logdir / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self.socket_path: str | None = None
        self.mask = hex(1 << args.target_cpu)

    # -- helpers --
    def _spawn(self, cmd: list[str]) -> None:
        full = ["taskset", "-c", str(self.args.target_cpu)] + cmd
        log(f"[{self.name}] start: {' '.join(shlex.quote(c) for c in full)}")
        self._logfh = open(self.logfile, "ab")
        self._logfh.write(f"\n==== {time.ctime()} {' '.join(full)}\n".encode())
        self._logfh.flush()
        self.proc = subprocess.Popen(full, stdout=self._logfh, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     cwd=self.workdir)

    def _wait_socket(self, path: str, timeout: float, probe: bool = False) -> None:
        """Wait for a listening unix socket.  Only probe-connect when asked: a
        vhost-user target may serve one front-end at a time and could still be
        busy with the probe when the load generator connects (the load
        generator retries connect() itself)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc and self.proc.poll() is not None:
                raise TargetError(f"{self.name} exited with {self.proc.returncode} "
                                  f"before creating {path}; log: {self.logfile}\n"
                                  + self.log_tail())
            if os.path.exists(path) and stat.S_ISSOCK(os.stat(path).st_mode):
                if not probe:
                    return
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.connect(path)
                    return
                except OSError:
                    pass
                finally:
                    s.close()
            time.sleep(0.05)
        raise TargetError(f"{self.name}: socket {path} did not appear within {timeout}s; "
                          f"log: {self.logfile}\n" + self.log_tail())

    def log_tail(self, n: int = 15) -> str:
        try:
            lines = self.logfile.read_text(errors="replace").splitlines()
            return "\n".join("    " + s for s in lines[-n:])
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pid(self) -> int:
        assert self.proc
        return self.proc.pid

    def start(self) -> str:
        raise NotImplementedError

    def stop(self) -> None:
        if not self.proc:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)  # our own child's group
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log(f"[{self.name}] did not exit on SIGTERM, killing")
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=10)
        self.proc = None
        try:
            self._logfh.close()
        except Exception:  # noqa: BLE001
            pass


class QsdTarget(Target):
    """qemu-storage-daemon exporting one --blockdev (node n0) as vhost-user-blk.  The
    other benchmarks subclass it with their own blockdev()."""
    install_hint = "apt-get install qemu-utils"

    def __init__(self, name, args, workdir, logdir, read_zeroes: bool = False):
        super().__init__(name, args, workdir, logdir)
        self.read_zeroes = read_zeroes

    def blockdev(self) -> str:
        bd = f"driver=null-co,node-name=n0,size={DEV_SIZE_MIB * 1024 * 1024}"
        return bd + ",read-zeroes=on" if self.read_zeroes else bd

    def start(self) -> str:
        if not shutil.which("qemu-storage-daemon"):
            raise TargetError(f"qemu-storage-daemon not found ({self.install_hint})")
        sock = str(self.workdir / "qsd.sock")
        if os.path.exists(sock):
            os.unlink(sock)
        self._spawn(["qemu-storage-daemon", "--blockdev", self.blockdev(), "--export",
                     "type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,"
                     f"addr.path={sock},writable=on"])
        self._wait_socket(sock, 30)
        self.socket_path = sock
        return sock


class RefTarget(Target):
    def start(self) -> str:
        sock = str(self.workdir / "ref.sock")
        self._spawn([str(NULLSRV), "--socket", sock, "--size",
                     str(DEV_SIZE_MIB * 1024 * 1024)])
        self._wait_socket(sock, 10)
        self.socket_path = sock
        return sock


class OursTarget(Target):
    def __init__(self, name, args, workdir, logdir, bdev: str):
        super().__init__(name, args, workdir, logdir)
        self.bdev = bdev
        self.needs_precondition = bdev == "malloc"

    @staticmethod
    def available(args) -> str | None:
        """None if usable, else the reason why not."""
        for what, cmd in (("target", args.vhost_cmd), ("rpc client", args.rpc_cmd)):
            exe = shlex.split(cmd)[0]
            if not (shutil.which(exe) or (os.path.sep in exe and os.access(exe, os.X_OK))):
                return f"{what} command '{exe}' not found on PATH"
        return None

    def rpc(self, *rpc_args: str) -> str:
        cmd = shlex.split(self.args.rpc_cmd) + ["-s", self.rpc_sock] + list(rpc_args)
        log(f"[{self.name}] rpc: {' '.join(shlex.quote(c) for c in cmd)}")
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        with open(self.logfile, "a") as fh:
            fh.write(f"---- rpc {rpc_args} rc={r.returncode}\n{r.stdout}{r.stderr}\n")
        if r.returncode != 0:
            raise TargetError(f"{self.name}: rpc {' '.join(rpc_args)} failed rc={r.returncode}: "
                              f"{(r.stderr or r.stdout).strip()}")
        return r.stdout

    #: Reactor in --interrupt-mode (the other benchmarks' variants set it).
    interrupt = False

    def daemon_args(self) -> list[str]:
        """The target's command line beyond sockets, mask and RPC socket."""
        return ["--interrupt-mode"] if self.interrupt else []

    def create_bdev(self) -> str:
        """Make the bdev the controller serves (the daemon answers RPCs); its name."""
        if self.bdev == "null":
            self.rpc("bdev_null_create", "Null0", str(DEV_SIZE_MIB), "512")
            return "Null0"
        self.rpc("bdev_malloc_create", str(DEV_SIZE_MIB), "512", "-b", "Malloc0")
        return "Malloc0"

    def start(self) -> str:
        sockdir = self.workdir / "vhost"
        sockdir.mkdir(exist_ok=True)
        self.rpc_sock = str(self.workdir / "rpc.sock")
        for p in (self.rpc_sock, str(sockdir / "vhost.0")):
            if os.path.exists(p):
                os.unlink(p)
        self._spawn(shlex.split(self.args.vhost_cmd) + ["-S", str(sockdir), "-m", self.mask,
                                                        "-r", self.rpc_sock] + self.daemon_args())
        self._wait_socket(self.rpc_sock, 30, probe=True)
        name = self.create_bdev()
        self.rpc("vhost_create_blk_controller", "--cpumask", self.mask, "vhost.0", name)
        sock = str(sockdir / "vhost.0")
        self._wait_socket(sock, 20)
        self.socket_path = sock
        return sock


def make_target(name: str, args, workdir: Path, logdir: Path) -> Target:
    if name == "qsd-null":
        return QsdTarget(name, args, workdir, logdir, read_zeroes=False)
    if name == "qsd-null-zeroes":
        return QsdTarget(name, args, workdir, logdir, read_zeroes=True)
    if name == "ours-null":
        return OursTarget(name, args, workdir, logdir, bdev="null")
    if name == "ours-malloc":
        return OursTarget(name, args, workdir, logdir, bdev="malloc")
    if name == "ref-null":
        return RefTarget(name, args, workdir, logdir)
    raise ValueError(name)


# --------------------------------------------------------------------------
# load generator
# --------------------------------------------------------------------------
def precondition(args, sock: str, target: Target) -> None:
    """Sequentially write the whole device once, so that later reads of a RAM
    disk hit written memory rather than never-touched (zero-page) memory."""
    if args.precondition <= 0 or not getattr(target, "needs_precondition", False):
        return
    nblocks = DEV_SIZE_MIB * 1024 * 1024 // args.bs
    cmd = [str(LOADGEN), "--socket", sock, "--rw", "write", "--qd", "32", "--bs", str(args.bs),
           "--ios", str(nblocks), "--time", str(args.precondition), "--warmup", "0",
           "--queue-size", str(args.queue_size), "--cpu", str(args.loadgen_cpu)]
    log(f"[{target.name}] precondition: sequential write of the whole device "
        f"(at most {args.precondition:g}s)")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.precondition + 60)
    line = next((s for s in r.stdout.splitlines() if s.startswith("{")), None)
    if not line:
        raise TargetError(f"{target.name}: precondition write failed: {r.stderr.strip()[-300:]}")
    res = json.loads(line)
    covered = res["ios"] * args.bs / max(res["capacity_bytes"], 1)
    msg = (f"[{target.name}] precondition wrote {covered:.2f}x the device in {res['secs']:.2f}s "
           f"({res['iops']:,.0f} IOPS), {res['errors']} errors")
    if covered < 0.999:
        msg += " (WARNING: not the whole device; raise --precondition)"
    log(msg)


def run_loadgen(args, sock: str, rw: str, qd: int, target: Target) -> dict:
    cmd = [str(LOADGEN), "--socket", sock, "--rw", rw, "--qd", str(qd), "--bs", str(args.bs),
           "--time", str(args.time), "--warmup", str(args.warmup),
           "--queue-size", str(args.queue_size), "--cpu", str(args.loadgen_cpu)]
    cmd += shlex.split(args.loadgen_args)
    cpus = sorted({args.target_cpu, args.loadgen_cpu})
    if args.wait_quiet > 0:
        wait_quiet(target.pid(), cpus, args.wait_quiet)
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t_ticks0 = proc_tree_ticks(target.pid())
    b0 = cpu_busy_ticks(cpus)
    t0 = time.monotonic()
    timeout = args.time + args.warmup + 60
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"load generator timed out after {timeout}s", "cmd": cmd}
    wall = time.monotonic() - t0
    b1 = cpu_busy_ticks(cpus)
    t_ticks1 = proc_tree_ticks(target.pid())
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    res: dict = {}
    line = next((s for s in r.stdout.splitlines() if s.startswith("{")), None)
    if line:
        res = json.loads(line)
    else:
        res["error"] = f"no result (rc={r.returncode}): {r.stderr.strip()[-500:]}"
    if r.stderr.strip():
        res["loadgen_stderr"] = r.stderr.strip()[-2000:]
    res["rc"] = r.returncode
    res["cmd"] = " ".join(shlex.quote(c) for c in cmd)
    # CPU accounting over the whole loadgen process lifetime (incl. warmup).
    lg_user = ru1.ru_utime - ru0.ru_utime
    lg_sys = ru1.ru_stime - ru0.ru_stime
    res["loadgen_cpu_pct"] = round(100 * (lg_user + lg_sys) / wall, 1) if wall else None
    res["loadgen_sys_pct"] = round(100 * lg_sys / wall, 1) if wall else None
    res["target_cpu_pct"] = round(100 * (t_ticks1 - t_ticks0) / CLK_TCK / wall, 1) if wall else None
    # everything else that ran on the two benchmark cores during the run
    other = (b1 - b0) - (t_ticks1 - t_ticks0) - (lg_user + lg_sys) * CLK_TCK
    res["other_cpu_pct"] = round(max(0.0, 100 * other / CLK_TCK / wall), 1) if wall else None
    if not target.alive():
        res.setdefault("error", f"target died during run; log: {target.logfile}")
    return res


# --------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------
def fmt_iops(v) -> str:
    return "-" if v is None else f"{v:,.0f}"


def fmt_f(v, nd=1) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def build_tables(results: list[dict], workloads: list[tuple[str, int]]):
    """Return (rows, ratio_rows) as lists of string lists, first row = header."""
    rows = [["target", "workload", "IOPS", "mean lat us", "p99 lat us", "errors",
             "target CPU%", "loadgen CPU%", "other CPU%"]]
    for r in results:
        m = r.get("result") or {}
        wl = f"{r['rw']} qd{r['qd']}"
        if r.get("error"):
            rows.append([r["target"], wl, "ERROR", "-", "-", "-", "-", "-", "-"])
            continue
        rows.append([r["target"], wl, fmt_iops(m.get("iops")), fmt_f(m.get("mean_lat_us"), 2),
                     fmt_f(m.get("p99_lat_us"), 2), str(m.get("errors")),
                     fmt_f(m.get("target_cpu_pct"), 0), fmt_f(m.get("loadgen_cpu_pct"), 0),
                     fmt_f(m.get("other_cpu_pct"), 0)])

    def get(t, rw, qd):
        for r in results:
            if r["target"] == t and r["rw"] == rw and r["qd"] == qd and not r.get("error"):
                return r["result"]
        return None

    ratio_rows = [["workload"]]
    for ours, peer in PAIRS:
        ratio_rows[0] += [f"{ours}/{peer} IOPS", f"{ours}/{peer} mean lat"]
    any_ratio = False
    for rw, qd in workloads:
        row = [f"{rw} qd{qd}"]
        for ours, peer in PAIRS:
            a, b = get(ours, rw, qd), get(peer, rw, qd)
            if a and b and b.get("iops") and b.get("mean_lat_us"):
                row += [f"{a['iops'] / b['iops']:.2f}x",
                        f"{a['mean_lat_us'] / b['mean_lat_us']:.2f}x"]
                any_ratio = True
            else:
                row += ["-", "-"]
        ratio_rows.append(row)
    return rows, (ratio_rows if any_ratio else None)


def text_table(rows: list[list[str]]) -> str:
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for k, r in enumerate(rows):
        out.append("  ".join(c.rjust(w[i]) if i >= 2 else c.ljust(w[i]) for i, c in enumerate(r)))
        if k == 0:
            out.append("  ".join("-" * x for x in w))
    return "\n".join(out)


def md_table(rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(rows[0]) + " |",
           "|" + "|".join("---" if i < 2 else "---:" for i in range(len(rows[0]))) + "|"]
    for r in rows[1:]:
        out.append("| " + " | ".join(r) + " |")
    return "\n".join(out)


def plot(results: list[dict], workloads, targets, machine: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not installed (pip install matplotlib): skipping plot")
        return False
    labels = [f"{rw}\nqd{qd}" for rw, qd in workloads]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    n = len(targets)
    width = 0.8 / max(n, 1)
    for ti, t in enumerate(targets):
        iops, lat = [], []
        for rw, qd in workloads:
            m = next((r["result"] for r in results if r["target"] == t and r["rw"] == rw
                      and r["qd"] == qd and not r.get("error")), None)
            iops.append(m["iops"] / 1e3 if m else 0)
            lat.append(m["mean_lat_us"] if m else 0)
        xs = [i + (ti - (n - 1) / 2) * width for i in range(len(workloads))]
        axes[0].bar(xs, iops, width, label=t)
        axes[1].bar(xs, lat, width, label=t)
        for x, v in zip(xs, iops):
            if v:
                axes[0].text(x, v, f"{v:.0f}", ha="center", va="bottom", fontsize=6, rotation=90)
    for ax, title, yl in ((axes[0], "IOPS (thousands)", "kIOPS"),
                          (axes[1], "mean latency (us)", "us")):
        ax.set_xticks(range(len(workloads)))
        ax.set_xticklabels(labels)
        ax.set_title(title)
        ax.set_ylabel(yl)
        ax.grid(axis="y", alpha=0.3)
    axes[1].set_yscale("log")
    from matplotlib.ticker import ScalarFormatter
    fmt = ScalarFormatter()
    fmt.set_scientific(False)
    axes[1].yaxis.set_major_formatter(fmt)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"vhost-user-blk, {results[0]['result'].get('bs', 4096) if results and results[0].get('result') else 4096}B random I/O, "
                 f"target core {machine.get('target_cpu')}, loadgen core {machine.get('loadgen_cpu')}\n"
                 f"{machine['cpu_model']}, {machine['cores']} cores, kernel {machine['kernel']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------
def parse_workloads(s: str) -> list[tuple[str, int]]:
    out = []
    for item in s.split(","):
        rw, qd = item.strip().split(":")
        if rw not in ("randread", "randwrite"):
            raise SystemExit(f"bad workload {item}")
        out.append((rw, int(qd)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                    help=f"comma list from {','.join(ALL_TARGETS)} (default: all)")
    ap.add_argument("--workloads", default=DEFAULT_WORKLOADS,
                    help=f"comma list of rw:qd (default {DEFAULT_WORKLOADS})")
    ap.add_argument("--time", type=float, default=5.0, help="measured seconds per run")
    ap.add_argument("--warmup", type=float, default=1.0, help="warmup seconds per run")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs per (target, workload); see --pick")
    ap.add_argument("--pick", choices=["best", "median"], default="best",
                    help="which of the --repeat runs to report (default best: interference "
                         "from other processes only ever lowers IOPS)")
    ap.add_argument("--wait-quiet", type=float, default=20.0,
                    help="before each run wait up to SEC for other processes to stop using "
                         "the benchmark cores (0 = don't wait)")
    ap.add_argument("--bs", type=int, default=4096)
    ap.add_argument("--queue-size", type=int, default=256)
    ap.add_argument("--target-cpu", type=int, default=0)
    ap.add_argument("--loadgen-cpu", type=int, default=1)
    ap.add_argument("--loadgen-args", default="",
                    help="extra load generator flags, e.g. '--event-idx --no-call'")
    ap.add_argument("--vhost-cmd", default="vhost", help="command that starts our target")
    ap.add_argument("--rpc-cmd", default="vhost-rpc", help="our RPC client command")
    ap.add_argument("--precondition", type=float, default=60.0,
                    help="before measuring RAM-backed targets (ours-malloc), write the whole "
                         "device once sequentially at QD32, taking at most SEC seconds, so "
                         "reads hit written memory rather than the zero page (0 = off)")
    ap.add_argument("--fresh-target", action="store_true",
                    help="restart the target for every run (default: one target per "
                         "target type, one new vhost-user connection per run)")
    ap.add_argument("--out", default=str(BENCH_DIR / "results"), help="results directory")
    ap.add_argument("--name", default=None, help="results file stem (default bench_<time>)")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args()

    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    for t in targets:
        if t not in ALL_TARGETS:
            ap.error(f"unknown target {t}; choose from {','.join(ALL_TARGETS)}")
    workloads = parse_workloads(args.workloads)
    ncpu = os.cpu_count() or 1
    if max(args.target_cpu, args.loadgen_cpu) >= ncpu:
        ap.error(f"only {ncpu} cpus")
    if args.target_cpu == args.loadgen_cpu:
        log("WARNING: target and load generator share a core; numbers will be meaningless "
            "for busy-polling targets")

    build_tools()
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    logdir = outdir / "logs"
    logdir.mkdir(exist_ok=True)
    stem = args.name or "bench_" + _dt.datetime.now().strftime("%Y%m%d-%H%M%S")

    machine = machine_info()
    machine["target_cpu"] = args.target_cpu
    machine["loadgen_cpu"] = args.loadgen_cpu
    idle = cpu_idle_fraction(1.0)
    machine["idle_before_start"] = [round(x, 2) for x in idle]
    print(f"machine: {machine['cpu_model']} | {machine['cores']} cores | "
          f"kernel {machine['kernel']} | {machine['qemu_storage_daemon']}")
    busy = [i for i, x in enumerate(idle) if x < 0.9]
    if busy:
        print(f"WARNING: cpu(s) {busy} were busy before starting (idle {idle}); other "
              f"processes will add noise to the results")

    skipped: dict[str, str] = {}
    reason = OursTarget.available(args)
    if reason:
        for t in targets:
            if t.startswith("ours-"):
                skipped[t] = reason
                print(f"SKIP {t}: {reason} (our target is started as "
                      f"`{args.vhost_cmd} -S DIR -m MASK -r RPCSOCK`)")
    run_targets = [t for t in targets if t not in skipped]

    results: list[dict] = []
    workdir = Path(tempfile.mkdtemp(prefix="vublk-bench-"))
    try:
        for tname in run_targets:
            target = make_target(tname, args, workdir / tname, logdir)
            (workdir / tname).mkdir(exist_ok=True)
            try:
                if not args.fresh_target:
                    sock = target.start()
                    precondition(args, sock, target)
                for rw, qd in workloads:
                    runs = []
                    for rep in range(args.repeat):
                        if args.fresh_target:
                            sock = target.start()
                            precondition(args, sock, target)
                        res = run_loadgen(args, sock, rw, qd, target)
                        if args.fresh_target:
                            target.stop()
                        runs.append(res)
                        if res.get("error"):
                            log(f"[{tname}] {rw} qd{qd}: ERROR {res['error']}")
                        else:
                            log(f"[{tname}] {rw} qd{qd} run {rep + 1}: "
                                f"{res['iops']:,.0f} IOPS, mean {res['mean_lat_us']:.2f} us, "
                                f"p99 {res['p99_lat_us']:.2f} us, errors {res['errors']}, "
                                f"cpu% target {res['target_cpu_pct']} loadgen "
                                f"{res['loadgen_cpu_pct']} other {res['other_cpu_pct']}")
                        if not target.alive() and not args.fresh_target:
                            break
                    good = [r for r in runs if not r.get("error")]
                    entry = {"target": tname, "rw": rw, "qd": qd, "runs": runs}
                    if good:
                        if args.pick == "best":
                            pick = max(r["iops"] for r in good)
                        else:
                            pick = statistics.median_low([r["iops"] for r in good])
                        entry["result"] = next(r for r in good if r["iops"] == pick)
                    else:
                        entry["error"] = runs[-1].get("error") if runs else "no runs"
                    results.append(entry)
                    if not args.fresh_target and not target.alive():
                        raise TargetError(f"{tname} died; log tail:\n{target.log_tail()}")
            except TargetError as e:
                print(f"ERROR {tname}: {e}")
                done = {(r["rw"], r["qd"]) for r in results if r["target"] == tname}
                for rw, qd in workloads:
                    if (rw, qd) not in done:
                        results.append({"target": tname, "rw": rw, "qd": qd,
                                        "error": str(e).splitlines()[0]})
            finally:
                target.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    rows, ratio_rows = build_tables(results, workloads)
    hdr = (f"Machine: {machine['cpu_model']}, {machine['cores']} cores, kernel "
           f"{machine['kernel']}; target on core {args.target_cpu}, load generator on core "
           f"{args.loadgen_cpu}; bs={args.bs}, {args.time:g}s (+{args.warmup:g}s warmup) per "
           f"run, best-of/median: {args.pick} of {args.repeat}, loadgen args "
           f"'{args.loadgen_args}'. 'other CPU%' = CPU used on the two benchmark cores by "
           f"other processes during the run (noise; should be ~0)")
    print()
    print(hdr)
    print()
    print(text_table(rows))
    if ratio_rows:
        print()
        print(text_table(ratio_rows))
    errs = sorted({(r["target"], str(r["error"]).splitlines()[0][:300])
                   for r in results if r.get("error")})
    for t, e in errs:
        print(f"ERROR {t}: {e}")
    for t, why in skipped.items():
        print(f"(skipped {t}: {why})")

    md = [f"## vhost-user-blk benchmark ({machine['date']})", "", hdr, "", md_table(rows)]
    if ratio_rows:
        md += ["", "Ratios (>1x IOPS and <1x latency mean ours is better):", "",
               md_table(ratio_rows)]
    for t, e in errs:
        md.append(f"\n**ERROR {t}**: `{e}`")
    for t, why in skipped.items():
        md.append(f"\n_skipped {t}: {why}_")
    md_text = "\n".join(md) + "\n"
    print()
    print(md_text)

    doc = {"machine": machine, "args": vars(args), "skipped": skipped, "results": results}
    jpath = outdir / f"{stem}.json"
    jpath.write_text(json.dumps(doc, indent=1) + "\n")
    (outdir / f"{stem}.md").write_text(md_text)
    written = [jpath, outdir / f"{stem}.md"]
    if not args.no_plot and any(r.get("result") for r in results):
        ppath = outdir / f"{stem}.png"
        plotted = [t for t in targets if t in run_targets]
        if plot(results, workloads, plotted, machine, ppath):
            written.append(ppath)
    print("wrote: " + ", ".join(str(p) for p in written))
    bad = [r for r in results if r.get("error") or (r.get("result") or {}).get("errors")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
