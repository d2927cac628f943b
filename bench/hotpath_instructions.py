#!/usr/bin/env python3
"""Instructions per request on the reactor, counted by callgrind: a cost figure that
does not depend on what else the machine is doing (wall-clock IOPS on 2 shared cores
drift by 10%), for A/B comparisons of two builds of the target.

For each build (a `vhost` command, e.g. two venvs), the target serves a null bdev
over vhost-blk under `valgrind --tool=callgrind --toggle-collect=reactor_main`
(only the reactor's work is counted: popping, walking, submitting, completing,
signalling), the native load generator sends a fixed number of 4 KiB reads and
writes at QD1 and QD32, and the script prints instructions per request.

    bench/hotpath_instructions.py --build old=/path/old/.venv/bin/vhost \\
                                  --build new=.venv/bin/vhost

A build may name a QoS setup after '@' (targets with bdev_set_qos_limit only), to show what
QoS checks cost the measured, uncapped bdev:

    @neighbour  a second null bdev on the same reactor, with its own controller, is capped
                (rw_ios_per_sec 1000): the measured bdev has no limit
    @unreached  the measured bdev itself is capped far above what the run reaches
                (rw_ios_per_sec 100000000): every request goes through the token bucket

    bench/hotpath_instructions.py --build before=/tmp/old/.venv/bin/vhost --build after=.venv/bin/vhost \\
                                  --build after+neighbour=.venv/bin/vhost@neighbour \\
                                  --build after+unreached=.venv/bin/vhost@unreached
"""
from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
LOADGEN = BENCH / "loadgen" / "vublk_loadgen"


def rpc(vhost: str, sock: str, *args: str) -> str:
    rpc_cmd = str(Path(vhost).with_name("vhost-rpc"))
    return subprocess.run([rpc_cmd, "-s", sock, *args], check=True, capture_output=True, text=True).stdout


def measure(vhost: str, rw: str, qd: int, ios: int, qos: str = "", loadgen_args: tuple = ()) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        rpc_sock = os.path.join(tmp, "rpc.sock")
        out = os.path.join(tmp, "cg.out")
        proc = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--toggle-collect=reactor_main",
             "--dump-instr=no", vhost, "-S", tmp, "-m", "0x1", "-r", rpc_sock, "--interrupt-mode"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 600    # valgrind starts Python slowly on a busy machine
            while True:
                try:
                    rpc(vhost, rpc_sock, "spdk_get_version")
                    break
                except subprocess.CalledProcessError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise SystemExit(f"{vhost} did not start under valgrind")
                    time.sleep(0.5)
            rpc(vhost, rpc_sock, "bdev_null_create", "Null0", "64", "512")
            rpc(vhost, rpc_sock, "vhost_create_blk_controller", "vhost.0", "Null0")
            if qos == "neighbour":
                rpc(vhost, rpc_sock, "bdev_null_create", "Null1", "64", "512")
                rpc(vhost, rpc_sock, "vhost_create_blk_controller", "vhost.1", "Null1")
                rpc(vhost, rpc_sock, "bdev_set_qos_limit", "Null1", "--rw_ios_per_sec", "1000")
            elif qos == "unreached":
                rpc(vhost, rpc_sock, "bdev_set_qos_limit", "Null0", "--rw_ios_per_sec", "100000000")
            elif qos:
                raise SystemExit(f"unknown QoS setup '{qos}': use neighbour or unreached")
            subprocess.run([str(LOADGEN), "--socket", os.path.join(tmp, "vhost.0"), "--rw", rw, "--qd", str(qd),
                            "--ios", str(ios), "--time", "600", "--warmup", "0", "--no-call", *loadgen_args],
                           check=True, capture_output=True, timeout=900)
            stats = rpc(vhost, rpc_sock, "vhost_get_queue_stats", "vhost.0")
        finally:
            proc.terminate()
            proc.wait(120)
        import json

        requests = sum(q["requests"] for q in json.loads(stats))
        total = 0
        for f in glob.glob(out + "*"):
            for line in open(f):
                if line.startswith("summary:") or line.startswith("totals:"):
                    total = max(total, int(line.split()[1]))
        return total / max(requests, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", action="append", required=True, help="NAME=/path/to/vhost")
    ap.add_argument("--ios", type=int, default=200000)
    args = ap.parse_args()
    if not LOADGEN.exists():
        subprocess.run(["make", "-s", "-C", str(LOADGEN.parent)], check=True)
    builds = [b.split("=", 1) for b in args.build]
    rows = []
    for rw, qd in (("randread", 1), ("randread", 32), ("randwrite", 1), ("randwrite", 32)):
        row = [f"{rw} QD{qd}"]
        for _name, vhost in builds:
            path, _, qos = vhost.partition("@")
            row.append(f"{measure(path, rw, qd, args.ios, qos):.0f}")
        rows.append(row)
    print("| workload | " + " | ".join(n for n, _ in builds) + " |")
    print("|---|" + "---:|" * len(builds))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
