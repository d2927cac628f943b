#!/usr/bin/env python3
"""bdev_aio benchmark: 4 KiB random reads and writes at QD32 on a file on the real disk.

Three ways to reach the same file, all O_DIRECT:

  fio          fio on the host itself (ioengine=libaio, direct=1), pinned to the target core:
               the ceiling, with no vhost-user hop at all
  qsd          qemu-storage-daemon --blockdev driver=file,aio=native,cache.direct=on
               exporting the file as vhost-user-blk
  ours         our target: bdev_aio_create on the file (Linux AIO engine, polling reactor)
  ours-intr    (optional) the same with --interrupt-mode
  ours-uring   (optional) the same with engine io_uring

qsd and ours are driven by the same load generator (bench/loadgen/vublk_loadgen, one
queue, busy polling) on the other core, exactly as bench/run_bench.py does; this script
reuses run_bench.py's target handling, load generator runner and tables.

The file is written in full first, so that reads hit allocated blocks (reading a hole
never touches the disk) and writes overwrite them.  Bars: ours >= 0.9x host fio and
>= 1.0x qsd (IOPS).  Not a test: run it on a quiet machine.

    python3 bench/bench_aio.py                      # 1 GiB file in /var/tmp, 5 s runs, best of 3
    python3 bench/bench_aio.py --targets fio,qsd,ours,ours-intr,ours-uring --repeat 5
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
import run_bench as rb  # noqa: E402 -- the shared benchmark machinery

ALL_TARGETS = ["fio", "qsd", "ours", "ours-intr", "ours-uring"]
DEFAULT_TARGETS = "fio,qsd,ours"
WORKLOADS = [("randread", 32), ("randwrite", 32)]
BARS = {"fio": 0.9, "qsd": 1.0}


class QsdFileTarget(rb.QsdTarget):
    def __init__(self, name, args, workdir, logdir, path: str):
        super().__init__(name, args, workdir, logdir)
        self.path = path

    def blockdev(self) -> str:
        return f"driver=file,filename={self.path},aio=native,cache.direct=on,node-name=n0"


class OursFileTarget(rb.OursTarget):
    def __init__(self, name, args, workdir, logdir, path: str, interrupt: bool, engine: str):
        super().__init__(name, args, workdir, logdir, bdev="aio")
        self.needs_precondition = False
        self.path = path
        self.interrupt = interrupt
        self.engine = engine

    def create_bdev(self) -> str:
        self.rpc("bdev_aio_create", self.path, "Aio0", "--engine", self.engine)
        return "Aio0"


def make_target(name: str, args, workdir: Path, logdir: Path, path: str) -> rb.Target:
    if name == "qsd":
        return QsdFileTarget(name, args, workdir, logdir, path)
    if name == "ours":
        return OursFileTarget(name, args, workdir, logdir, path, interrupt=False, engine="aio")
    if name == "ours-intr":
        return OursFileTarget(name, args, workdir, logdir, path, interrupt=True, engine="aio")
    if name == "ours-uring":
        return OursFileTarget(name, args, workdir, logdir, path, interrupt=False, engine="io_uring")
    raise ValueError(name)


def run_fio(args, path: str, rw: str, qd: int) -> dict:
    cpus = sorted({args.target_cpu, args.loadgen_cpu})
    if args.wait_quiet > 0:
        rb.wait_quiet(None, cpus, args.wait_quiet)
    cmd = ["fio", "--name=host", f"--filename={path}", f"--rw={rw}", f"--bs={args.bs}",
           f"--iodepth={qd}", "--ioengine=libaio", "--direct=1", "--time_based",
           f"--runtime={args.time:g}", f"--ramp_time={args.warmup:g}", f"--size={args.size_mib}M",
           "--norandommap", "--randrepeat=0", f"--cpus_allowed={args.target_cpu}",
           "--output-format=json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.time + args.warmup + 120)
    if r.returncode:
        return {"error": f"fio failed: {r.stderr.strip()[-300:]}"}
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    part = job["read" if "read" in rw else "write"]
    return {"iops": part["iops"], "mean_lat_us": part["lat_ns"]["mean"] / 1000,
            "p99_lat_us": part["clat_ns"]["percentile"].get("99.000000", 0) / 1000,
            "errors": job.get("error", 0), "target_cpu_pct": job["usr_cpu"] + job["sys_cpu"],
            "loadgen_cpu_pct": None, "other_cpu_pct": None}


def prepare_file(path: str, size_mib: int) -> None:
    """Write the whole file once (O_DIRECT, sequential) unless it already has that size."""
    if os.path.exists(path) and os.path.getsize(path) == size_mib << 20 \
            and os.stat(path).st_blocks * 512 >= size_mib << 20:
        return
    rb.log(f"writing {size_mib} MiB to {path} (once)")
    subprocess.run(["fio", "--name=fill", f"--filename={path}", "--rw=write", "--bs=1M", "--iodepth=8",
                    "--ioengine=libaio", "--direct=1", f"--size={size_mib}M", "--output-format=terse"],
                   check=True, capture_output=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default=DEFAULT_TARGETS, help=f"comma list from {','.join(ALL_TARGETS)}")
    ap.add_argument("--file", help="backing file (default: a new one in --dir, removed at the end)")
    ap.add_argument("--dir", default="/var/tmp", help="where to put the backing file: on the real disk")
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--time", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=3, help="runs per cell, interleaved across targets")
    ap.add_argument("--pick", choices=["best", "median"], default="best")
    ap.add_argument("--wait-quiet", type=float, default=20.0)
    ap.add_argument("--bs", type=int, default=4096)
    ap.add_argument("--queue-size", type=int, default=256)
    ap.add_argument("--target-cpu", type=int, default=0)
    ap.add_argument("--loadgen-cpu", type=int, default=1)
    ap.add_argument("--loadgen-args", default="")
    venv_bin = Path(sys.executable).parent
    ap.add_argument("--vhost-cmd",
                    default=str(venv_bin / "vhost") if (venv_bin / "vhost").exists() else "vhost")
    ap.add_argument("--rpc-cmd", default=str(venv_bin / "vhost-rpc") if (venv_bin / "vhost-rpc").exists()
                    else "vhost-rpc")
    ap.add_argument("--out", default=None, help="also save <name>.md/.json there (e.g. bench/results)")
    ap.add_argument("--name", default=None, help="results file stem (default aio_<time>)")
    args = ap.parse_args()

    # SIGTERM/SIGINT: still stop the targets and remove the file (the finally blocks below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    for t in targets:
        if t not in ALL_TARGETS:
            ap.error(f"unknown target {t}; choose from {','.join(ALL_TARGETS)}")
    if not shutil.which("fio"):
        ap.error("fio is needed (apt-get install fio)")
    rb.build_tools()
    logdir = Path(args.out) / "logs" if args.out else Path(tempfile.mkdtemp(prefix="bench-aio-logs-"))
    logdir.mkdir(parents=True, exist_ok=True)
    machine = rb.machine_info()
    print(f"machine: {machine['cpu_model']} | {machine['cores']} cores | kernel {machine['kernel']} | "
          f"{machine['qemu_storage_daemon']}")
    workdir = Path(tempfile.mkdtemp(prefix="bench-aio-"))
    own_file = args.file is None
    path = args.file or os.path.join(args.dir, f"bench-aio-{os.getpid()}.img")
    runs: dict[tuple[str, str, int], list[dict]] = {}
    try:
        prepare_file(path, args.size_mib)
        for rep in range(args.repeat):
            for t in targets:
                if t == "fio":
                    for rw, qd in WORKLOADS:
                        res = run_fio(args, path, rw, qd)
                        runs.setdefault((t, rw, qd), []).append(res)
                        rb.log(f"[fio] {rw} qd{qd} run {rep + 1}: " + (res.get("error") or
                               f"{res['iops']:,.0f} IOPS, mean {res['mean_lat_us']:.1f} us"))
                    continue
                (workdir / t).mkdir(exist_ok=True)
                target = make_target(t, args, workdir / t, logdir, path)
                try:
                    sock = target.start()
                    for rw, qd in WORKLOADS:
                        res = rb.run_loadgen(args, sock, rw, qd, target)
                        runs.setdefault((t, rw, qd), []).append(res)
                        rb.log(f"[{t}] {rw} qd{qd} run {rep + 1}: " + (res.get("error") or
                               f"{res['iops']:,.0f} IOPS, mean {res['mean_lat_us']:.1f} us, "
                               f"errors {res['errors']}, cpu% target {res['target_cpu_pct']} "
                               f"other {res['other_cpu_pct']}"))
                except rb.TargetError as e:
                    for rw, qd in WORKLOADS:
                        runs.setdefault((t, rw, qd), []).append({"error": str(e).splitlines()[0]})
                finally:
                    target.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if own_file:
            try:
                os.unlink(path)
            except OSError:
                pass

    results = []
    for (t, rw, qd), rs in runs.items():
        good = [r for r in rs if not r.get("error")]
        entry = {"target": t, "rw": rw, "qd": qd, "runs": rs}
        if good:
            pick = max(r["iops"] for r in good) if args.pick == "best" else \
                statistics.median_low([r["iops"] for r in good])
            entry["result"] = next(r for r in good if r["iops"] == pick)
        else:
            entry["error"] = rs[-1].get("error")
        results.append(entry)
    rows, _ = rb.build_tables(results, WORKLOADS)

    def iops(t, rw, qd):
        for r in results:
            if (r["target"], r["rw"], r["qd"]) == (t, rw, qd) and r.get("result"):
                return r["result"]["iops"]
        return None

    ours_names = [t for t in targets if t.startswith("ours")]
    peers = [p for p in ("fio", "qsd") if p in targets]
    ratio_rows = [["workload"] + [f"{o}/{p}" for o in ours_names for p in peers]]
    verdicts = []
    for rw, qd in WORKLOADS:
        row = [f"{rw} qd{qd}"]
        for o in ours_names:
            for p in peers:
                a, b = iops(o, rw, qd), iops(p, rw, qd)
                if a and b:
                    ok = a / b >= BARS[p]
                    row.append(f"{a / b:.2f}x {'ok' if ok else 'BELOW'}")
                    if o == "ours":
                        verdicts.append(ok)
                else:
                    row.append("-")
        ratio_rows.append(row)
    hdr = (f"4 KiB random I/O at QD32 on a {args.size_mib} MiB file in {os.path.dirname(path)}, "
           f"O_DIRECT everywhere; target core "
           f"{args.target_cpu}, load generator core {args.loadgen_cpu}; "
           f"{args.time:g}s (+{args.warmup:g}s warmup) "
           f"per run, {args.pick} of {args.repeat}, interleaved. fio runs on the target core with no "
           f"vhost-user hop. Bars: ours >= {BARS['fio']}x fio, >= {BARS['qsd']}x qsd (IOPS).")
    print()
    print(hdr)
    print()
    print(rb.text_table(rows))
    print()
    print(rb.text_table(ratio_rows))
    print(f"\n(target logs: {logdir})")
    if args.out:
        outdir = Path(args.out)
        stem = args.name or "aio_" + time.strftime("%Y%m%d-%H%M%S")
        md = [f"## bdev_aio benchmark ({machine['date']})", "", hdr, "", rb.md_table(rows), "",
              rb.md_table(ratio_rows)]
        (outdir / f"{stem}.md").write_text("\n".join(md) + "\n")
        (outdir / f"{stem}.json").write_text(json.dumps({"machine": machine, "args": vars(args),
                                                         "results": results}, indent=1) + "\n")
        print(f"wrote: {outdir / (stem + '.md')}, {outdir / (stem + '.json')}")
    bad = [r for r in results if r.get("error") or (r.get("result") or {}).get("errors")]
    return 1 if bad or not all(verdicts) else 0


if __name__ == "__main__":
    sys.exit(main())
