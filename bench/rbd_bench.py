#!/usr/bin/env python3
"""bdev_rbd benchmark: 4 KiB random reads and writes at QD1 and QD16 on one RBD image.

Three ways to drive the same image of a throw-away single-node cluster (one mon, one
memstore OSD on this machine: vhost_bdev_rbd.testing.CephCluster):

  rbd-bench    `rbd bench` (librbd in-process; --io-threads 16 for QD16, 1 for QD1): the
               ceiling, with no vhost-user hop at all
  qsd          qemu-storage-daemon --blockdev driver=rbd (Debian's qemu-block-extra)
               exporting the image as vhost-user-blk
  ours         our target: bdev_rbd_create on the image, vhost-blk controller, reactor in
               --interrupt-mode: like qsd, everything (reactor, librbd's threads) on the target core
  ours-dispatch  the same with rbd_non_blocking_aio=true: librbd's dispatch thread sends the
               requests instead of the reactor (what the plugin did before it bounded its
               requests in librbd itself)
  ours-poll    the same with a busy-polling reactor on the target core and librbd's threads
               moved to the load generator's core (bdev_rbd_register_cluster --core-mask): a
               polling reactor starves threads that share its core

qsd and ours are driven by the project's load generator (bench/loadgen/vublk_loadgen, one
queue) on the other core, as bench/run_bench.py does; this reuses its machinery.  CPU per
I/O on the target: the target's CPU time (the whole process tree; for rbd bench the rbd
process, which is its own load generator) over the I/Os it completed.

The OSD runs on the same two cores, so every number here is bound by it; the comparison is
what matters.  Not a test: run it on a quiet machine.

    python3 bench/rbd_bench.py --out bench/results
"""
from __future__ import annotations

import argparse
import json
import math
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
import run_bench as rb  # noqa: E402 -- the shared benchmark machinery

from vhost_bdev_rbd.testing import CephCluster  # noqa: E402

ALL_TARGETS = ["rbd-bench", "qsd", "ours", "ours-dispatch", "ours-poll"]
WORKLOADS = [("randread", 1), ("randread", 16), ("randwrite", 1), ("randwrite", 16)]
BARS = {"rbd-bench": 0.9, "qsd": 1.0}
IMAGE = "bench"


class QsdRbdTarget(rb.QsdTarget):
    install_hint = "apt-get install qemu-utils qemu-block-extra"

    def __init__(self, name, args, workdir, logdir, ceph: CephCluster):
        super().__init__(name, args, workdir, logdir)
        self.ceph = ceph

    def blockdev(self) -> str:
        # QEMU's rbd driver sets rbd_cache from cache.direct (off with direct=on).
        return (f"driver=rbd,pool=rbd,image={IMAGE},conf={self.args.client_conf},user=admin,node-name=n0,"
                f"cache.direct={'on' if self.args.cache == 'off' else 'off'}")


class OursRbdTarget(rb.OursTarget):
    def __init__(self, name, args, workdir, logdir, ceph: CephCluster, poll: bool):
        super().__init__(name, args, workdir, logdir, bdev="rbd")
        self.needs_precondition = False
        self.ceph = ceph
        self.poll = poll
        self.interrupt = not poll

    def create_bdev(self) -> str:
        pin = ["--core-mask", hex(1 << self.args.loadgen_cpu)] if self.poll else []
        if self.name == "ours-dispatch":
            pin += ["--config-param", "rbd_non_blocking_aio=true"]
        self.rpc("bdev_rbd_register_cluster", "c0", "--config-file", str(self.args.client_conf), *pin)
        self.rpc("bdev_rbd_create", "rbd", IMAGE, "4096", "-b", "Ceph0", "-c", "c0")
        return "Ceph0"


def _rbd_bench_once(args, ceph: CephCluster, io_type: str, qd: int, ops: int) -> tuple[subprocess.CompletedProcess,
                                                                                        float, float]:
    cmd = ["taskset", "-c", str(args.target_cpu), "rbd", "-c", str(args.client_conf), "bench", "--io-type", io_type,
           "--io-size", str(args.bs), "--io-threads", str(qd), "--io-total", str(ops * args.bs),
           "--io-pattern", "rand", f"rbd/{IMAGE}"]
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ceph.env())
    wall = time.monotonic() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r, wall, (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)


def run_rbd_bench(args, ceph: CephCluster, rw: str, qd: int) -> dict:
    """`rbd bench` for as long as a load generator run, measured as one: it has no time
    limit, so a short calibration run sizes it for warmup + time seconds, and its
    per-second progress lines give the rate after the warmup.  (A fixed, short I/O count
    flattered it: with librbd's cache on, its first ~24 MiB of writes are acknowledged from
    the cache's dirty budget before the OSD sets the pace.)"""
    io_type = "read" if rw == "randread" else "write"
    if args.bench_ops:
        ops = args.bench_ops
    else:
        r, wall, _ = _rbd_bench_once(args, ceph, io_type, qd, 2000)
        m = re.search(r"ops/sec:\s*([\d.]+)", r.stdout)
        if r.returncode or not m:
            return {"error": f"rbd bench failed: {(r.stderr or r.stdout).strip()[-300:]}"}
        ops = max(int(float(m.group(1)) * (args.warmup + args.time) * 1.1), 2000)
    r, wall, cpu = _rbd_bench_once(args, ceph, io_type, qd, ops)
    m = re.search(r"elapsed:\s*([\d.]+)\s+ops:\s*(\d+)\s+ops/sec:\s*([\d.]+)", r.stdout)
    if r.returncode or not m:
        return {"error": f"rbd bench failed: {(r.stderr or r.stdout).strip()[-300:]}"}
    done, iops = int(m.group(2)), float(m.group(3))
    # "  SEC       OPS   OPS/SEC   BYTES/SEC": the count of I/Os done by each second.
    ticks = {int(a): int(b) for a, b in re.findall(r"^\s+(\d+)\s+(\d+)\s+[\d.]+\s", r.stdout, re.M)}
    warm = max(1, round(args.warmup))
    last = max(ticks, default=0)
    if last > warm and warm in ticks:
        iops = (ticks[last] - ticks[warm]) / (last - warm)
    return {"iops": iops, "mean_lat_us": qd / iops * 1e6 if iops else None, "p99_lat_us": None, "errors": 0,
            "target_cpu_pct": round(100 * cpu / wall, 1), "loadgen_cpu_pct": None, "other_cpu_pct": None,
            "cpu_us_per_io": cpu / done * 1e6 if done else None, "ops": done, "seconds": round(wall, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default=",".join(ALL_TARGETS))
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--time", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--bench-ops", type=int, default=0,
                    help="I/Os per rbd bench run (default: as many as take warmup + time seconds)")
    ap.add_argument("--wait-quiet", type=float, default=3.0)
    ap.add_argument("--bs", type=int, default=4096)
    ap.add_argument("--queue-size", type=int, default=256)
    ap.add_argument("--target-cpu", type=int, default=0)
    ap.add_argument("--loadgen-cpu", type=int, default=1)
    ap.add_argument("--loadgen-args", default="")
    venv_bin = Path(sys.executable).parent
    ap.add_argument("--vhost-cmd", default=str(venv_bin / "vhost") if (venv_bin / "vhost").exists() else "vhost")
    ap.add_argument("--rpc-cmd", default=str(venv_bin / "vhost-rpc") if (venv_bin / "vhost-rpc").exists()
                    else "vhost-rpc")
    ap.add_argument("--out", default=None, help="also save <name>.md/.json there (e.g. bench/results)")
    ap.add_argument("--name", default=None)
    ap.add_argument("--cache", choices=("rbd-cli", "off"), default="rbd-cli",
                    help="librbd's cache for every target alike: as the rbd CLI sets it (on, writes "
                         "acknowledged before a first flush too), or off")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    rb.build_tools()
    logdir = Path(args.out) / "logs" if args.out else Path(tempfile.mkdtemp(prefix="bench-rbd-logs-"))
    logdir.mkdir(parents=True, exist_ok=True)
    machine = rb.machine_info()
    workdir = Path(tempfile.mkdtemp(prefix="bench-rbd-"))
    runs: dict[tuple[str, str, int], list[dict]] = {}
    ceph = CephCluster(memstore_bytes=(args.size_mib + 512) << 20)
    try:
        ceph.start()
        # One client configuration for all three, so that librbd behaves the same under each:
        # the rbd CLI turns rbd_cache_writethrough_until_flush off for itself (a tool has no
        # guest that would flush), so with the cache on every target gets that too.
        args.client_conf = workdir / "client.conf"
        extra = ("rbd cache = false\n" if args.cache == "off" else
                 "rbd cache = true\nrbd cache writethrough until flush = false\n")
        args.client_conf.write_text(ceph.conf.read_text() + "\n[client]\n" + extra)
        ceph.rbd("create", "--size", f"{args.size_mib}M", f"rbd/{IMAGE}")
        rb.log(f"writing {args.size_mib} MiB to rbd/{IMAGE} (once)")
        ceph.rbd("bench", "--io-type", "write", "--io-size", "4M", "--io-threads", "4", "--io-total",
                 f"{args.size_mib}M", "--io-pattern", "seq", f"rbd/{IMAGE}", timeout=300)
        # Every target runs at once (idle ones sleep), and each workload's runs follow one
        # another: the OSD's state drifts as the runs write, by more than the targets differ,
        # so a ratio is taken between runs seconds apart, not minutes.  A polling reactor
        # does not sleep: ours-poll runs only for its own runs.
        started: dict[str, rb.Target] = {}
        socks: dict[str, str | None] = {}
        errors: dict[str, str] = {}

        def start(t: str) -> None:
            (workdir / t).mkdir(exist_ok=True)
            target = (QsdRbdTarget(t, args, workdir / t, logdir, ceph) if t == "qsd" else
                      OursRbdTarget(t, args, workdir / t, logdir, ceph, poll=t == "ours-poll"))
            started[t] = target
            try:
                socks[t] = target.start()
            except rb.TargetError as e:
                socks[t] = None
                errors[t] = str(e).splitlines()[0]

        try:
            for t in targets:
                if t not in ("rbd-bench", "ours-poll"):
                    start(t)
            for rep in range(args.repeat):
                for rw, qd in WORKLOADS:
                    # Every other repeat in reverse: no target always runs first or last.
                    for t in (targets if rep % 2 == 0 else targets[::-1]):
                        if t == "rbd-bench":
                            res = run_rbd_bench(args, ceph, rw, qd)
                            runs.setdefault((t, rw, qd), []).append(res)
                            rb.log(f"[{t}] {rw} qd{qd} run {rep + 1}: " + (res.get("error") or
                                   f"{res['iops']:,.0f} IOPS, {res['cpu_us_per_io']:.1f} us CPU/IO"))
                            continue
                        if t == "ours-poll":
                            start(t)
                        try:
                            if socks[t] is None:
                                runs.setdefault((t, rw, qd), []).append({"error": errors[t]})
                                continue
                            res = rb.run_loadgen(args, socks[t], rw, qd, started[t])
                        finally:
                            if t == "ours-poll":
                                started.pop(t).stop()
                        if res.get("iops") and res.get("target_cpu_pct") is not None:
                            res["cpu_us_per_io"] = res["target_cpu_pct"] / 100 / res["iops"] * 1e6
                        runs.setdefault((t, rw, qd), []).append(res)
                        rb.log(f"[{t}] {rw} qd{qd} run {rep + 1}: " + (res.get("error") or
                               f"{res['iops']:,.0f} IOPS, mean {res['mean_lat_us']:.1f} us, "
                               f"target cpu {res['target_cpu_pct']}%"))
        finally:
            for target in started.values():
                target.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        ceph.stop()

    results = []
    for (t, rw, qd), rs in runs.items():
        good = [r for r in rs if not r.get("error")]
        entry = {"target": t, "rw": rw, "qd": qd, "runs": rs}
        if good:
            # The median run: the OSD's pace swings by +-30% from one run to the next here,
            # and a best-of reports the luckiest moment of each target.
            ranked = sorted(good, key=lambda r: r["iops"])
            entry["result"] = ranked[(len(ranked) - 1) // 2]
            entry["best_iops"] = ranked[-1]["iops"]
        else:
            entry["error"] = rs[-1].get("error")
        results.append(entry)

    def get(t, rw, qd):
        for r in results:
            if (r["target"], r["rw"], r["qd"]) == (t, rw, qd) and r.get("result"):
                return r["result"]
        return None

    rows = [["target", "workload", "IOPS", "best IOPS", "mean lat us", "target CPU%", "CPU us per I/O"]]
    ours_names = [t for t in targets if t.startswith("ours")]
    for rw, qd in WORKLOADS:
        for t in targets:
            m = get(t, rw, qd)
            if m is None:
                rows.append([t, f"{rw} qd{qd}", "ERROR", "-", "-", "-", "-"])
                continue
            best = next(r["best_iops"] for r in results if (r["target"], r["rw"], r["qd"]) == (t, rw, qd))
            rows.append([t, f"{rw} qd{qd}", rb.fmt_iops(m["iops"]), rb.fmt_iops(best), rb.fmt_f(m.get("mean_lat_us"), 1),
                         rb.fmt_f(m.get("target_cpu_pct"), 0), rb.fmt_f(m.get("cpu_us_per_io"), 1)])
    peers = [p for p in ("rbd-bench", "qsd") if p in targets]
    ratio_rows = [["workload"] + [f"{o}/{p}" for o in ours_names for p in peers]]
    verdicts = []
    for rw, qd in WORKLOADS:
        row = [f"{rw} qd{qd}"]
        for o in ours_names:
            for p in peers:
                a, b = get(o, rw, qd), get(p, rw, qd)
                if a and b:
                    ok = a["iops"] / b["iops"] >= BARS[p]
                    if o == "ours":
                        verdicts.append(ok)
                    row.append(f"{a['iops'] / b['iops']:.2f}x {'ok' if ok else 'BELOW'}")
                else:
                    row.append("-")
        ratio_rows.append(row)
    # Paired: each repeat's ours against the peer measured next to it, as the OSD's state
    # moves between repeats more than the targets differ (the medians pair runs of
    # different repeats).
    paired_rows = [["workload"] + [f"{o}/{p} per repeat" for o in ours_names for p in peers]]
    for rw, qd in WORKLOADS:
        row = [f"{rw} qd{qd}"]
        for o in ours_names:
            for p in peers:
                ratios = [a["iops"] / b["iops"] for a, b in zip(runs.get((o, rw, qd), []), runs.get((p, rw, qd), []))
                          if a.get("iops") and b.get("iops")]
                if ratios:
                    gm = math.exp(sum(map(math.log, ratios)) / len(ratios))
                    row.append(f"{gm:.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")
                else:
                    row.append("-")
        paired_rows.append(row)
    hdr = (f"4 KiB random I/O on a {args.size_mib} MiB RBD image (written in full first) of a single-node "
           f"cluster on this machine (1 mon, 1 memstore OSD, unpinned); targets on core {args.target_cpu}, "
           f"load generator on core {args.loadgen_cpu}; {args.time:g}s (+{args.warmup:g}s warmup) per "
           f"loadgen run and rbd bench run alike ("
           + (f"{args.bench_ops} I/Os per rbd bench run" if args.bench_ops else
              "rbd bench sized to run as long, its rate taken from its per-second lines after the warmup")
           + f"), {args.repeat} rounds, every target once per workload in each; a target's row is its "
           f"median run (and its best IOPS). rbd bench's CPU "
           f"includes its own I/O generation. Bars: ours >= {BARS['rbd-bench']}x rbd bench, "
           f">= {BARS['qsd']}x qsd (IOPS). librbd's cache for all: "
           + ("off (rbd_cache=false; qsd cache.direct=on)." if args.cache == "off" else
              "on, as the rbd CLI sets it (rbd_cache_writethrough_until_flush=false; qsd cache.direct=off)."))
    paired_note = "Geometric mean (and range) of the per-repeat ratios, each repeat's runs side by side:"
    print("\n" + hdr + "\n\n" + rb.text_table(rows) + "\n\n" + rb.text_table(ratio_rows) + "\n\n" + paired_note
          + "\n\n" + rb.text_table(paired_rows))
    if args.out:
        outdir = Path(args.out)
        stem = args.name or "rbd_" + time.strftime("%Y%m%d-%H%M%S")
        md = [f"## bdev_rbd benchmark ({machine['date']})", "",
              f"{machine['cpu_model']} | {machine['cores']} cores | kernel {machine['kernel']} | "
              f"{machine['qemu_storage_daemon']}", "", hdr, "", rb.md_table(rows), "", rb.md_table(ratio_rows), "", paired_note, "",
              rb.md_table(paired_rows)]
        (outdir / f"{stem}.md").write_text("\n".join(md) + "\n")
        (outdir / f"{stem}.json").write_text(json.dumps({"machine": machine, "args": vars(args),
                                                         "results": results}, indent=1, default=str) + "\n")
        if rb.plot(results, WORKLOADS, targets, {**machine, "target_cpu": args.target_cpu,
                                                 "loadgen_cpu": args.loadgen_cpu}, outdir / f"{stem}.png"):
            md.insert(2, f"![IOPS and latency]({stem}.png)\n")
            (outdir / f"{stem}.md").write_text("\n".join(md) + "\n")
        print(f"wrote: {outdir / (stem + '.md')}")
    return 0 if verdicts and all(verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
