"""Runs INSIDE the VFIO guest (bench/nvme_pcie_bench.py starts it, chrooted into the host's
root): the same emulated NVMe controller served over vhost-user-blk by our daemon (bdev_nvme,
-t pcie) and by qemu-storage-daemon's own userspace NVMe driver (nvme://, VFIO), each driven by
the project's load generator, one after the other.  Prints ``NVME-PCIE-BENCH <json>``.

Usage: nvme_pcie_guest.py SECONDS INTERRUPT_MODE(0/1)
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import run_bench as rb  # noqa: E402

from vhost_core.testing.daemon import VhostDaemon  # noqa: E402

WORKLOADS = [("randread", 1), ("randread", 32), ("randwrite", 1), ("randwrite", 32)]
CLK_TCK = os.sysconf("SC_CLK_TCK")


def nvme_function() -> str:
    (bdf,) = [os.path.basename(p) for p in glob.glob("/sys/bus/pci/devices/*")
              if open(os.path.join(p, "class")).read().strip() == "0x010802"]
    return bdf


def measure(args, sock: str, target) -> list[dict]:
    rows = []
    for rw, qd in WORKLOADS:
        v0, t0 = rb.proc_tree_ticks(target.pid()), time.monotonic()
        r = rb.run_loadgen(args, sock, rw, qd, target)
        wall = time.monotonic() - t0
        v1 = rb.proc_tree_ticks(target.pid())
        ios = r.get("ios") or 0
        row = {"rw": rw, "qd": qd, **{k: r.get(k) for k in ("iops", "mean_lat_us", "p99_lat_us", "errors",
                                                            "error")}}
        if ios and r.get("secs"):
            total = ios * wall / r["secs"]       # ticks cover the warmup too: scale the I/O count alike
            row["target_cpu_us_per_io"] = round((v1 - v0) / CLK_TCK / total * 1e6, 1)
        print(f"  {rw:9} QD{qd:<3} {row.get('iops') or 0:8.0f} IOPS  mean {row.get('mean_lat_us') or 0:9.1f} us"
              f"  target {row.get('target_cpu_us_per_io')} us/IO {row.get('error') or ''}", flush=True)
        rows.append(row)
    return rows


def main() -> None:
    seconds, interrupt_mode = float(sys.argv[1]), sys.argv[2] == "1"
    bdf = nvme_function()
    Path(f"/sys/bus/pci/devices/{bdf}/driver_override").write_text("vfio-pci")
    Path("/sys/bus/pci/drivers_probe").write_text(bdf)
    args = argparse.Namespace(bs=4096, time=seconds, warmup=1, queue_size=256, loadgen_cpu=1, target_cpu=0,
                              loadgen_args="", wait_quiet=0)
    out: dict = {"bdf": bdf}

    print("ours (bdev_nvme -t pcie):", flush=True)
    d = VhostDaemon(Path("/tmp/bench-ours"), cpumask="0x1", interrupt_mode=interrupt_mode).start(timeout=120)
    with d:
        d.rpc("bdev_nvme_attach_controller", name="Nvme0", trtype="pcie", traddr=bdf)
        d.rpc("vhost_create_blk_controller", ctrlr="vhost.0", dev_name="Nvme0n1")

        class Ours:
            logfile = str(d.log_path)

            def pid(self):
                return d.proc.pid

            def alive(self):
                return d.alive()

        out["ours"] = measure(args, d.socket("vhost.0"), Ours())
        out["ours_stats"] = d.rpc("bdev_nvme_get_controllers")[0]["ctrlrs"][0]["stats"]
        d.rpc("bdev_nvme_detach_controller", name="Nvme0")

    print("qemu-storage-daemon (nvme://, its own VFIO driver):", flush=True)
    sock = "/tmp/qsd.sock"
    log = open("/tmp/qsd.log", "wb")
    qsd = subprocess.Popen(["taskset", "-c", "0", shutil.which("qemu-storage-daemon"), "--blockdev",
                            f"driver=nvme,node-name=n0,device={bdf},namespace=1", "--export",
                            f"type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path={sock},writable=on"],
                           stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(sock):
            if qsd.poll() is not None or time.monotonic() > deadline:
                wchan = [f"{t}: {open(f'/proc/{qsd.pid}/task/{t}/wchan').read()}"
                         for t in os.listdir(f"/proc/{qsd.pid}/task")] if qsd.poll() is None else []
                out["qsd_error"] = (f"qemu-storage-daemon did not export within 60 s (rc {qsd.poll()}): "
                                    f"{open('/tmp/qsd.log').read()[-2000:]} {wchan}")
                print(out["qsd_error"], flush=True)
                print("NVME-PCIE-BENCH " + json.dumps(out), flush=True)
                return
            time.sleep(0.2)

        class Qsd:
            logfile = "/tmp/qsd.log"

            def pid(self):
                return qsd.pid

            def alive(self):
                return qsd.poll() is None

        out["qsd"] = measure(args, sock, Qsd())
    finally:
        qsd.terminate()
        try:
            qsd.wait(10)
        except subprocess.TimeoutExpired:
            qsd.kill()
            qsd.wait(10)
    print("NVME-PCIE-BENCH " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
