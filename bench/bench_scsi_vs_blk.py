#!/usr/bin/env python3
"""What vhost-scsi costs next to vhost-blk: fio inside one guest, on one disk of each.

One daemon (reactor on core 0) serves two malloc bdevs of the same size, one through a
vhost-blk controller and one as target 0 of a vhost-scsi controller.  One QEMU guest
(pinned to core 1) sees them as /dev/vda and /dev/sda; fio runs the same jobs on each,
one after the other, and the table shows IOPS, bandwidth and mean completion latency,
and scsi/blk.

The guest runs under TCG like the tests' guests; ``--kvm`` uses KVM instead (what the
numbers are really meant for, where /dev/kvm works).  Under TCG the emulated guest
dominates every number: read the ratio, not the absolute values.  Not a test; run it
on a quiet machine.

    python3 bench/bench_scsi_vs_blk.py                    # 10 s per job, polling reactor
    python3 bench/bench_scsi_vs_blk.py --time 5 --repeat 3 --interrupt-mode
    python3 bench/bench_scsi_vs_blk.py --jobs randread:4k:1,randwrite:4k:32
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from guestvm import GuestVM  # noqa: E402

from vhost_core.testing.daemon import VhostDaemon  # noqa: E402

DEFAULT_JOBS = "randread:4k:1,randread:4k:32,randwrite:4k:32,read:128k:8"
DISK_MB = 256


def kvm_usable() -> bool:
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
        return True
    except OSError:
        return False


class BenchVM(GuestVM):
    def __init__(self, *a, kvm: bool, **kw) -> None:
        super().__init__(*a, **kw)
        self.kvm = kvm

    def build_cmdline(self) -> list[str]:
        args = super().build_cmdline()
        if self.kvm:
            args[args.index("tcg")] = "kvm"
            args[args.index("max")] = "host"
        return args


def pin(pid: int, cpu: int) -> None:
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), {cpu})
        except OSError:
            pass


def target_counters(d, ctrlr: str) -> tuple[int, int]:
    """(reactor busy ns, requests served by ``ctrlr``) so far."""
    busy = sum(r["busy"] for r in d.rpc("framework_get_reactors")["reactors"])
    return busy, sum(q["requests"] for q in d.rpc("vhost_get_queue_stats", ctrlr=ctrlr))


def fio(vm: GuestVM, d, ctrlr: str, dev: str, rw: str, bs: str, qd: int, seconds: int) -> dict:
    busy0, reqs0 = target_counters(d, ctrlr)
    out = vm.check(f"fio --name=b --filename=/dev/{dev} --ioengine=libaio --direct=1 --rw={rw} --bs={bs} "
                   f"--iodepth={qd} --time_based --runtime={seconds} --ramp_time=1 --size={DISK_MB // 2}M "
                   f"--output-format=json", timeout=seconds + 120)
    job = json.loads(out[out.index("{"):])["jobs"][0]
    busy1, reqs1 = target_counters(d, ctrlr)
    side = job["read"] if "read" in rw else job["write"]
    # Reactor time spent on iterations that did work, per request: the target's own
    # cost, whatever the speed of the (emulated) guest.
    return {"iops": side["iops"], "mbps": side["bw_bytes"] / 1e6, "lat_us": side["clat_ns"]["mean"] / 1e3,
            "ns_per_req": (busy1 - busy0) / max(1, reqs1 - reqs0)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", default=DEFAULT_JOBS, help="rw:bs:qd list (default %(default)s)")
    p.add_argument("--time", type=int, default=10, help="seconds per fio job")
    p.add_argument("--repeat", type=int, default=1, help="runs per cell; the median is shown")
    p.add_argument("--interrupt-mode", action="store_true", help="reactor sleeps instead of polling")
    p.add_argument("--kvm", action="store_true", help="run the guest under KVM (needs a working /dev/kvm)")
    p.add_argument("--queues", type=int, default=1, help="virtqueues of each disk (guest vCPUs too)")
    args = p.parse_args()
    jobs = [(rw, bs, int(qd)) for rw, bs, qd in (j.split(":") for j in args.jobs.split(","))]
    kvm = args.kvm
    if kvm and not kvm_usable():
        p.error("--kvm: /dev/kvm cannot be opened")
    cores = sorted(os.sched_getaffinity(0))
    target_core, vm_core = cores[0], cores[-1]

    work = Path(tempfile.mkdtemp(prefix="bench-scsi-"))
    d = VhostDaemon(work, cpumask=hex(1 << target_core), interrupt_mode=args.interrupt_mode).start()
    try:
        blocks = DISK_MB * 1024 * 1024 // 512
        d.rpc("bdev_malloc_create", num_blocks=blocks, block_size=512, name="MallocBlk")
        d.rpc("bdev_malloc_create", num_blocks=blocks, block_size=512, name="MallocScsi")
        d.rpc("vhost_create_blk_controller", ctrlr="vhost.blk", dev_name="MallocBlk")
        d.rpc("vhost_create_scsi_controller", ctrlr="vhost.scsi")
        d.rpc("vhost_scsi_controller_add_target", ctrlr="vhost.scsi", scsi_target_num=0,
              bdev_name="MallocScsi")
        devices = ["-chardev", f"socket,id=cb,path={d.socket('vhost.blk')}",
                   "-device", f"vhost-user-blk-pci,chardev=cb,num-queues={args.queues}",
                   "-chardev", f"socket,id=cs,path={d.socket('vhost.scsi')}",
                   "-device", f"vhost-user-scsi-pci,id=scsi0,chardev=cs,num_queues={args.queues}"]
        with BenchVM(devices, kvm=kvm, smp=args.queues, mem_mb=1024, name="bench-scsi") as vm:
            vm.start().wait_ready(timeout=300)
            pin(vm.qemu_pid, vm_core)
            scsi_dev = vm.check("lsblk -n -d -o KNAME,VENDOR | awk '$2 == \"INTEL\" {print $1}'").split()[0]
            for dev in ("vda", scsi_dev):           # fill once so reads touch written pages
                vm.check(f"dd if=/dev/zero of=/dev/{dev} bs=1M count={DISK_MB // 2} oflag=direct 2>/dev/null",
                         timeout=600)
            rows = []
            for rw, bs, qd in jobs:
                res = {}
                for name, ctrlr, dev in (("blk", "vhost.blk", "vda"), ("scsi", "vhost.scsi", scsi_dev)):
                    runs = [fio(vm, d, ctrlr, dev, rw, bs, qd, args.time) for _ in range(args.repeat)]
                    res[name] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                rows.append((f"{rw} {bs} QD{qd}", res))
        mode = "interrupt" if args.interrupt_mode else "polling"
        print(f"\n## vhost-scsi vs vhost-blk, fio in one {'KVM' if kvm else 'TCG'} guest "
              f"({args.queues} vCPU/queue), malloc bdevs, {mode} reactor on core {target_core}, "
              f"QEMU on core {vm_core}, {args.time} s per job, median of {args.repeat}\n")
        print("| job | blk IOPS | scsi IOPS | scsi/blk | blk MB/s | scsi MB/s | blk lat us | scsi lat us "
              "| blk target ns/req | scsi target ns/req |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for label, r in rows:
            b, s = r["blk"], r["scsi"]
            print(f"| {label} | {b['iops']:.0f} | {s['iops']:.0f} | {s['iops'] / b['iops']:.2f} | "
                  f"{b['mbps']:.1f} | {s['mbps']:.1f} | {b['lat_us']:.1f} | {s['lat_us']:.1f} | "
                  f"{b['ns_per_req']:.0f} | {s['ns_per_req']:.0f} |")
        print("\n(target ns/req: reactor busy time over requests served, i.e. the target's own CPU cost "
              "per request, polling included)")
        if not kvm:
            print("\n(TCG guest: the emulation dominates; compare the ratio with care.)")
    finally:
        d.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
