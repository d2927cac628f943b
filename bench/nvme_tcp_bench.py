#!/usr/bin/env python3
"""bdev_nvme over NVMe/TCP: IOPS, mean and p99 latency, and CPU per I/O, at QD1 and QD32.

The target is Linux's nvmet + nvmet-tcp in a TCG guest (plugins/bdev_nvme/tests/
nvmet_target.py): emulated, so it, not the initiator, bounds what is measured.  To state
that ceiling, the same runs go to two namespaces of that target:

  brd     a RAM disk (the data is copied in the target guest)
  null    null_blk (the target guest does no data work at all): the ceiling

Our daemon attaches both (bdev_nvme_attach_controller) and serves each namespace as a
vhost-blk controller; the project's native load generator (bench/loadgen/vublk_loadgen,
one queue, busy polling) drives them exactly as bench/run_bench.py drives the other
backends.  CPU per I/O: the target guest's QEMU process (all of TCG's emulation of the
target kernel) and our daemon, from their /proc tick counts over each run.

    python3 bench/nvme_tcp_bench.py                      # 5 s runs, results in bench/results/
    python3 bench/nvme_tcp_bench.py --time 3 --digests   # header and data digests on
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(REPO / "plugins" / "bdev_nvme" / "tests"))
import nvmet_target
import run_bench as rb

WORKLOADS = [("randread", 1), ("randread", 32), ("randwrite", 1), ("randwrite", 32)]
CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_ticks(pid: int) -> int:
    return rb.proc_tree_ticks(pid)


def run(args) -> dict:
    from vhost_core.testing.daemon import VhostDaemon

    rb.build_tools()
    target = nvmet_target.NvmetTarget(name="nvmet-bench").start()
    work = Path(tempfile.mkdtemp(prefix="nvme-bench-"))
    results: list[dict] = []
    try:
        qemu_pid = target.vm.qemu_pid
        with VhostDaemon(work / "vhost", cpumask=hex(1 << args.target_cpu),
                         interrupt_mode=args.interrupt_mode) as d:
            dig = {"hdgst": args.digests, "ddgst": args.digests}
            d.rpc("bdev_nvme_attach_controller", **target.attach_params("Nvme0", **dig))
            d.rpc("bdev_nvme_attach_controller", **target.attach_params("Nvme1", subnqn=nvmet_target.NULL_NQN,
                                                                        **dig))
            d.rpc("vhost_create_blk_controller", ctrlr="vhost.brd", dev_name="Nvme0n1")
            d.rpc("vhost_create_blk_controller", ctrlr="vhost.null", dev_name="Nvme1n1")
            lg_args = argparse.Namespace(bs=4096, time=args.time, warmup=1, queue_size=256,
                                         loadgen_cpu=args.loadgen_cpu, target_cpu=args.target_cpu,
                                         loadgen_args="", wait_quiet=0)

            class _T:          # what rb.run_loadgen asks of a target
                def pid(self):
                    return d.proc.pid

                def alive(self):
                    return d.alive()

            for ns, ctrlr in (("null", "vhost.null"), ("brd", "vhost.brd")):
                for rw, qd in WORKLOADS:
                    q0, v0 = proc_ticks(qemu_pid), proc_ticks(d.proc.pid)
                    t0 = time.monotonic()
                    r = rb.run_loadgen(lg_args, d.socket(ctrlr), rw, qd, _T())
                    wall = time.monotonic() - t0
                    q1, v1 = proc_ticks(qemu_pid), proc_ticks(d.proc.pid)
                    ios = r.get("ios") or 0
                    per_io = {}
                    if ios and r.get("secs"):
                        # ticks over the whole run (warmup included): scale the I/O count alike
                        total_ios = ios * wall / r["secs"]
                        per_io = {"target_cpu_us_per_io": round((q1 - q0) / CLK_TCK / total_ios * 1e6, 1),
                                  "ours_cpu_us_per_io": round((v1 - v0) / CLK_TCK / total_ios * 1e6, 1)}
                    row = {"namespace": ns, "rw": rw, "qd": qd, **{k: r.get(k) for k in (
                        "iops", "mean_lat_us", "p99_lat_us", "errors", "ios", "error")}, **per_io}
                    rb.log(f"{ns:5} {rw:9} qd{qd:<3} {row.get('iops') or 0:>8.0f} IOPS  mean "
                           f"{row.get('mean_lat_us') or 0:8.1f} us  p99 {row.get('p99_lat_us') or 0:8.1f} us  "
                           f"target {per_io.get('target_cpu_us_per_io')} us/IO  ours "
                           f"{per_io.get('ours_cpu_us_per_io')} us/IO")
                    results.append(row)
            stats = d.rpc("bdev_nvme_get_controllers")
    finally:
        target.close()
    return {"machine": rb.machine_info(), "digests": args.digests, "interrupt_mode": args.interrupt_mode,
            "time_s": args.time, "target_boot_s": round(target.boot_s, 1), "results": results,
            "controllers": stats}


def markdown(out: dict) -> str:
    m = out["machine"]
    lines = ["# bdev_nvme over NVMe/TCP against nvmet in a TCG guest",
             "",
             f"{m.get('cpu_model')}, {m.get('cores')} cores, kernel {m.get('kernel')}; 4 KiB random I/O, one "
             f"queue, {out['time_s']} s per run; digests {'on' if out['digests'] else 'off'}; our reactor "
             f"{'in interrupt mode' if out['interrupt_mode'] else 'polling'}.",
             "",
             "| namespace | workload | IOPS | mean lat (us) | p99 lat (us) | target CPU (us/IO) | ours CPU (us/IO) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in out["results"]:
        lines.append(f"| {r['namespace']} | {r['rw']} QD{r['qd']} | {r.get('iops') or 0:.0f} | "
                     f"{r.get('mean_lat_us') or 0:.1f} | {r.get('p99_lat_us') or 0:.1f} | "
                     f"{r.get('target_cpu_us_per_io', '-')} | {r.get('ours_cpu_us_per_io', '-')} |")
    lines += ["",
              "`null` is nvmet on null_blk: the target guest moves no data, so its row is the ceiling the "
              "emulated target sets (every NVMe/TCP PDU is handled by a kernel running under TCG).  "
              "`brd` adds the RAM disk's copy in the guest.  Target CPU per I/O is the TCG QEMU process's; "
              "ours is the whole vhost daemon's (reactor and Python control plane)."]
    return "\n".join(lines) + "\n"


def plot(out: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        rb.log("matplotlib not installed (pip install matplotlib): skipping plot")
        return False
    labels = [f"{rw}\nQD{qd}" for rw, qd in WORKLOADS]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for i, ns in enumerate(("null", "brd")):
        rows = [next(r for r in out["results"] if r["namespace"] == ns and r["rw"] == rw and r["qd"] == qd)
                for rw, qd in WORKLOADS]
        xs = [j + (i - 0.5) * 0.4 for j in range(len(WORKLOADS))]
        axes[0].bar(xs, [(r.get("iops") or 0) / 1e3 for r in rows], 0.4, label=ns)
        axes[1].bar(xs, [r.get("mean_lat_us") or 0 for r in rows], 0.4, label=f"{ns} mean")
        axes[1].scatter(xs, [r.get("p99_lat_us") or 0 for r in rows], marker="_", s=200, color="k")
        axes[2].bar(xs, [r.get("target_cpu_us_per_io") or 0 for r in rows], 0.4, label=f"{ns} target")
    for ax, title in zip(axes, ("kIOPS", "latency (us): bars mean, ticks p99", "target CPU per I/O (us)")):
        ax.set_xticks(range(len(WORKLOADS)))
        ax.set_xticklabels(labels)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("vhost-bdev-nvme over NVMe/TCP against nvmet in a TCG guest (null_blk = the target's ceiling)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--time", type=float, default=5)
    ap.add_argument("--digests", action="store_true", help="header and data digests on")
    ap.add_argument("--interrupt-mode", action="store_true",
                    help="our reactor sleeps between events (default: polls, as SPDK does)")
    ap.add_argument("--target-cpu", type=int, default=0)
    ap.add_argument("--loadgen-cpu", type=int, default=1)
    ap.add_argument("--name", default="nvme_tcp")
    args = ap.parse_args()
    out = run(args)
    res = BENCH_DIR / "results"
    res.mkdir(exist_ok=True)
    (res / f"{args.name}.json").write_text(json.dumps(out, indent=1))
    (res / f"{args.name}.md").write_text(markdown(out))
    plot(out, res / f"{args.name}.png")
    print(markdown(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
