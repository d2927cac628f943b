#!/usr/bin/env python3
"""bdev_nvme over PCIe (VFIO) against qemu-storage-daemon's userspace NVMe driver (nvme://), on the
same emulated NVMe controller in the same guest: IOPS, latency and the target's CPU per I/O at
QD1 and QD32.

The guest is the PCIe test's (plugins/bdev_nvme/tests/vfio_guest.py): q35 under TCG with a
vIOMMU and QEMU's NVMe model on a RAM-backed raw file; the host's root is shared read-only, so
our daemon, qemu-storage-daemon and the project's load generator (bench/loadgen, one queue,
busy polling) all run inside it (bench/nvme_pcie_guest.py).  Under emulation no absolute speed
means anything: the controller is QEMU's model on the host, every MMIO doorbell a TCG exit.
What compares is the two drivers' CPU per I/O in the same place.

    python3 bench/nvme_pcie_bench.py                   # 4 s runs, our reactor in interrupt mode
    python3 bench/nvme_pcie_bench.py --poll --time 3
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(REPO / "plugins" / "bdev_nvme" / "tests"))
import run_bench as rb  # noqa: E402
import vfio_guest  # noqa: E402


def markdown(out: dict) -> str:
    m = out["machine"]
    lines = ["# bdev_nvme over PCIe (VFIO) against qemu-storage-daemon's nvme:// in a TCG guest", "",
             f"{m.get('cpu_model')}, {m.get('cores')} cores, kernel {m.get('kernel')}; guest: q35 TCG, 2 vCPUs, "
             f"intel-iommu, QEMU's NVMe model on a tmpfs file; 4 KiB random I/O, one queue, {out['time_s']} s "
             f"per run; our reactor {'in interrupt mode (MSI-X eventfds)' if out['interrupt_mode'] else 'polling'}.",
             "", "| target | workload | IOPS | mean lat (us) | p99 lat (us) | target CPU (us/IO) |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for name, key in (("ours (bdev_nvme -t pcie)", "ours"), ("qemu-storage-daemon nvme://", "qsd")):
        for r in out["guest"].get(key, []):
            lines.append(f"| {name} | {r['rw']} QD{r['qd']} | {r.get('iops') or 0:.0f} | "
                         f"{r.get('mean_lat_us') or 0:.1f} | {r.get('p99_lat_us') or 0:.1f} | "
                         f"{r.get('target_cpu_us_per_io', '-')} |")
    lines += ["", "Target CPU per I/O: the serving process's user+system time (our whole daemon: reactor and "
              "Python control plane; qemu-storage-daemon's threads) inside the guest, over the run, per I/O. "
              "Both sit behind the same emulated controller, whose cost (QEMU's NVMe model and the TCG exits "
              "of each doorbell write) is outside both numbers.", "",
              f"Our driver's counters after the runs: `{json.dumps(out['guest'].get('ours_stats', {}))}`"]
    if out["guest"].get("qsd_error"):
        lines += ["", f"qemu-storage-daemon: {out['guest']['qsd_error']}"]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--time", type=float, default=4.0)
    ap.add_argument("--poll", action="store_true", help="our reactor busy-polls (default: interrupt mode)")
    ap.add_argument("--out", default=str(BENCH_DIR / "results" / "nvme_pcie"))
    args = ap.parse_args()
    rb.build_tools()
    with tempfile.TemporaryDirectory(prefix="nvme-pcie-bench-", dir="/dev/shm") as tmp:
        disk = Path(tmp) / "nvme.img"
        with open(disk, "wb") as f:
            f.truncate(256 << 20)
        g = vfio_guest.VfioGuest(str(disk), "VHOSTPYBENCH0001", name="nvme-pcie-bench").start()
        try:
            text = g.run_python(BENCH_DIR / "nvme_pcie_guest.py", str(args.time), "0" if args.poll else "1",
                                timeout=900)
        finally:
            g.close()
    print(text)
    line = next(x for x in text.splitlines() if x.startswith("NVME-PCIE-BENCH "))
    out = {"machine": rb.machine_info(), "time_s": args.time, "interrupt_mode": not args.poll,
           "guest": json.loads(line.split(" ", 1)[1])}
    Path(args.out + ".json").write_text(json.dumps(out, indent=1))
    Path(args.out + ".md").write_text(markdown(out))
    print(markdown(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
