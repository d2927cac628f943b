#!/usr/bin/env python3
"""Packed virtqueues against split ones on the same target: instructions per request on
the reactor (callgrind, deterministic: see hotpath_instructions.py) and wall-clock IOPS
(noisy on a shared machine: interleaved rounds, medians).

Three columns of instructions: split rings on a baseline build (to show that split's hot
path did not get dearer with packed rings in the same reactor), split and packed rings
on this build.  The native load generator drives a null bdev over vhost-blk, 4 KiB,
--no-call (a polling guest), the target in interrupt mode; ``--packed`` makes the load
generator negotiate VIRTIO_F_RING_PACKED.

    bench/packed_vs_split.py --baseline /tmp/main/.venv/bin/vhost --vhost .venv/bin/vhost
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hotpath_instructions import LOADGEN, measure, rpc  # noqa: E402

#: callgrind: the workloads whose count repeats (at QD1 the empty iterations around each
#: interrupt-mode wake-up vary from run to run: bench/results/session3_isolation.md).
CALLGRIND_WORKLOADS = (("randread", 32), ("randwrite", 32))
WORKLOADS = (("randread", 1), ("randread", 32))


def iops_rounds(vhost: str, rounds: int, seconds: float) -> dict:
    """Interleaved split/packed runs against one target (busy-polling reactor on core 0,
    load generator on core 1): {(layout, rw, qd): [iops, ...]}."""
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        rpc_sock = os.path.join(tmp, "rpc.sock")
        proc = subprocess.Popen([vhost, "-S", tmp, "-m", "0x1", "-r", rpc_sock],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    rpc(vhost, rpc_sock, "spdk_get_version")
                    break
                except subprocess.CalledProcessError:
                    if time.monotonic() > deadline:
                        raise SystemExit("the target did not start")
                    time.sleep(0.2)
            rpc(vhost, rpc_sock, "bdev_null_create", "Null0", "64", "512")
            rpc(vhost, rpc_sock, "vhost_create_blk_controller", "vhost.0", "Null0")
            for _ in range(rounds):
                for rw, qd in WORKLOADS:
                    for layout in ("split", "packed"):
                        extra = ["--packed"] if layout == "packed" else []
                        r = subprocess.run([str(LOADGEN), "--socket", os.path.join(tmp, "vhost.0"), "--rw", rw,
                                            "--qd", str(qd), "--time", str(seconds), "--warmup", "0.5",
                                            "--no-call", "--event-idx", "--cpu", "1", *extra],
                                           check=True, capture_output=True, text=True, timeout=120)
                        out.setdefault((layout, rw, qd), []).append(json.loads(r.stdout)["iops"])
        finally:
            proc.terminate()
            proc.wait(30)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", required=True, help="vhost of the build before packed rings")
    ap.add_argument("--vhost", required=True, help="vhost of this build")
    ap.add_argument("--ios", type=int, default=50000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=2.0)
    args = ap.parse_args()
    if not LOADGEN.exists():
        subprocess.run(["make", "-s", "-C", str(LOADGEN.parent)], check=True)
    t0 = time.monotonic()
    print("## Instructions per request on the reactor (callgrind)\n")
    print("| workload | split, baseline | split, this build | packed, this build | packed/split |")
    print("|---|---:|---:|---:|---:|")
    for rw, qd in CALLGRIND_WORKLOADS:
        base = measure(args.baseline, rw, qd, args.ios)
        split = measure(args.vhost, rw, qd, args.ios)
        packed = measure(args.vhost, rw, qd, args.ios, loadgen_args=("--packed",))
        print(f"| {rw} QD{qd} | {base:.0f} | {split:.0f} | {packed:.0f} | {packed / split:.3f} |")
        sys.stdout.flush()
    print(f"\n## IOPS ({args.rounds} interleaved rounds of {args.seconds:g} s, busy-polling target)\n")
    print("| workload | split | packed | packed/split (medians) |")
    print("|---|---|---|---:|")
    res = iops_rounds(args.vhost, args.rounds, args.seconds)
    for rw, qd in WORKLOADS:
        s, p = res[("split", rw, qd)], res[("packed", rw, qd)]
        fmt = ", ".join
        print(f"| {rw} QD{qd} | {fmt(f'{x / 1000:.0f}k' for x in s)} | {fmt(f'{x / 1000:.0f}k' for x in p)} | "
              f"{statistics.median(p) / statistics.median(s):.3f} |")
    print(f"\n(took {time.monotonic() - t0:.0f} s)")


if __name__ == "__main__":
    main()
