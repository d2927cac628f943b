"""Soak: everything an operator does to a target at once, round after round.

Two VMs with four vCPUs and four queues each: ``vm-scsi`` on a vhost-scsi controller over a
malloc bdev, up for the whole soak, and ``vm-blk`` on a vhost-blk controller over an aio
file, booted anew each round.  In both guests fio writes and verifies (crc32c) on all four
queues the whole time.  Every round, meanwhile:

* hot-attach / detach churn: a new malloc bdev is attached to the SCSI controller as
  target 1, the guest sees the disk, writes and reads it back, and it is detached and
  its bdev deleted, again and again;
* RPC churn on every daemon: bdevs created and deleted, controllers, iostat and the
  configuration read (what save_config gathers);
* one ``kill -9`` of the daemon serving ``vm-blk`` (QEMU, ``reconnect=1``, waits for its
  successor, which resubmits what was in flight from the inflight buffer);
* one migration of ``vm-blk`` to a second daemon serving the same file, stop-and-copy,
  with fio's requests in flight when the source stops (see below for why not live); the
  next round's ``vm-blk`` starts there.

Asserted: every fio pass of every round verifies, no guest logs an I/O error on its
disks, every attached disk reads back what was written, no daemon logs a traceback or
a sanitizer report, every daemon stopped with SIGTERM exits 0, and the long-lived SCSI
daemon's open files stay exactly level and its RSS roughly level from the first round on
(a leak of anything per request, per connection or per RPC shows up there).

``VHOST_SOAK_SECONDS`` sets how long the soak goes on, from the first boot (default 300:
the CI version; a round starts only if it fits, and at least two run);
the scheduled job (``.ci/soak``) runs it for an hour.  A round takes about 40 s.

Why stop-and-copy, not live: QEMU 7.2's TCG corrupts the memory of a 4-vCPU guest that
does disk I/O while it is live-migrated, more often the busier the host -- with QEMU's own
virtio-blk and no vhost-user at all as well as with this target or qemu-storage-daemon
(fio dying on "malloc assertion failure", kernel oopses and panics on the destination;
docs/testing.md has the runs).  A stopped guest moves intact (no failure in 50 hops under
the same load).  What the live phase adds, the dirty log of pages the target writes while
the guest runs, is asserted by tests/test_e2e_migration.py, whose lighter guests migrate
once.  What this soak keeps: the drain of in-flight requests when QEMU stops the rings
(GET_VRING_BASE), the hand-over of four rings' positions to the destination daemon, and the
destination resuming them, round after round, after a kill -9 and resubmission.
"""

from __future__ import annotations

import os
import re
import threading
import time

import pytest
from guestvm import GuestVM
from test_e2e_aio import disk_file  # noqa: F401  (the fixture: a 64 MiB file on a disk filesystem)
from test_e2e_migration import free_port, wait_migration
from test_e2e_scsi import disks, read_pattern, start_background, wait_background, wait_disks, write_pattern

from vhost_core.testing.daemon import VhostDaemon, wait_no_session

SOAK_SECONDS = float(os.environ.get("VHOST_SOAK_SECONDS", "300"))
MEM_MB = 512
QUEUES = 4
CHURN_SECONDS = 12
# The rounds, plus room for the boots and the round that is running when time is up.
pytestmark = pytest.mark.timeout(SOAK_SECONDS + 900)

# One job per vCPU (so per queue), each on its own 4 MiB slice; the loop runs fio again
# and again until /tmp/fio.stop exists, and fails at the first pass that does not verify.
FIO = ("fio --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=8 --size=4M "
       "--verify=crc32c --do_verify=1 --verify_fatal=1 --group_reporting")


def fio_loop(dev: str) -> str:
    jobs = " ".join(f"--name=j{cpu} --filename={dev} --offset={cpu * 4}M --cpus_allowed={cpu}"
                    for cpu in range(QUEUES))
    return (f"rm -f /tmp/fio.stop; n=0; while [ ! -e /tmp/fio.stop ]; do {FIO} {jobs} || exit 1; "
            f"n=$((n + 1)); done; echo runs=$n")


def finish_fio(vm: GuestVM, what: str) -> int:
    vm.check("touch /tmp/fio.stop")
    rc, out = wait_background(vm, "fio", timeout=600)
    assert rc == 0 and not re.search(r"err=\s*[1-9]", out), f"fio failed in {what}:\n{out[-4000:]}"
    runs = int(re.search(r"runs=(\d+)", out).group(1))
    assert runs >= 1, f"no fio pass completed in {what}:\n{out[-2000:]}"
    vm.check("rm -f /tmp/fio.rc /tmp/fio.log")
    return runs


def open_fds(d: VhostDaemon) -> int:
    return len(os.listdir(f"/proc/{d.proc.pid}/fd"))


def rss_kib(d: VhostDaemon) -> int:
    with open(f"/proc/{d.proc.pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


def assert_clean(d: VhostDaemon) -> None:
    log = d.log()
    assert "Traceback" not in log and d.sanitizer_report() is None, log[-5000:]


class BlkSide:
    """The daemons that serve vm-blk's file, in turn: ``current`` serves the VM, ``other``
    waits for it (the next migration's destination).  Killed daemons are replaced by a
    new process in the same directory (same socket path, so QEMU reconnects to it)."""

    def __init__(self, tmp_path, disk: str) -> None:
        self.disk = disk
        self.dirs = [tmp_path / "vhost-blk-a", tmp_path / "vhost-blk-b"]
        self.daemons = [self._serve(p) for p in self.dirs]
        self.cur = 0
        self.idle_fds = open_fds(self.daemons[0])   # serving a controller, no front-end

    def _serve(self, path) -> VhostDaemon:
        d = VhostDaemon(path).start()
        d.rpc("bdev_aio_create", filename=self.disk, name="aio0")
        d.rpc("vhost_create_blk_controller", ctrlr="vhost.0", dev_name="aio0")
        return d

    @property
    def current(self) -> VhostDaemon:
        return self.daemons[self.cur]

    @property
    def other(self) -> VhostDaemon:
        return self.daemons[1 - self.cur]

    def device_args(self, d: VhostDaemon) -> list[str]:
        return ["-chardev", f"socket,id=c0,path={d.socket('vhost.0')},reconnect=1",
                "-device", f"vhost-user-blk-pci,chardev=c0,num-queues={QUEUES}"]

    def kill_current(self) -> VhostDaemon:
        """kill -9 the serving daemon, start its successor; the successor."""
        old = self.current
        old.proc.kill()
        old.proc.wait(30)
        assert_clean(old)
        self.daemons[self.cur] = self._serve(self.dirs[self.cur])
        return self.current

    def stop_all(self) -> None:
        for d in self.daemons:
            assert_clean(d)
            rc = d.stop()
            assert rc == 0, f"blk daemon exited with {rc} on SIGTERM:\n{d.log()[-3000:]}"


def wait_requests(d: VhostDaemon, ctrlr: str, more_than: int, timeout: float, what: str,
                  every_queue: int = 0) -> int:
    """Until the controller served more than ``more_than`` requests and, with
    ``every_queue=N``, at least one on each of its first N queues; the count."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            stats = d.rpc("vhost_get_queue_stats", ctrlr=ctrlr)
        except Exception:       # not connected yet: no rings
            stats = []
        n = sum(q["requests"] for q in stats)
        if n > more_than and all(q["requests"] > 0 for q in stats[:every_queue]) and len(stats) >= every_queue:
            return n
        assert time.monotonic() < deadline, (f"{what}: not enough guest I/O reached the daemon within "
                                             f"{timeout} s: {stats}\n" + d.log()[-3000:])
        time.sleep(0.5)


def wait_listening(port: int, vm: GuestVM, timeout: float = 60) -> None:
    """Until the destination QEMU listens for the incoming migration (a probe connection
    would be taken for the migration stream: read the kernel's socket table instead)."""
    deadline = time.monotonic() + timeout
    want = f":{port:04X}"
    while True:
        with open("/proc/net/tcp") as f:
            rows = [line.split() for line in f.readlines()[1:]]
            if any(r[1].endswith(want) and r[3] == "0A" for r in rows):   # local address, LISTEN
                return
        assert vm.qemu_returncode is None, f"destination QEMU exited:\n{vm.qemu_log[-3000:]}"
        assert time.monotonic() < deadline, f"destination QEMU not listening on {port} within {timeout} s"
        time.sleep(0.1)


def wait_incoming_done(vm: GuestVM, timeout: float = 60) -> None:
    """Until the destination QEMU has loaded the whole incoming state (it then waits,
    paused, for ``cont``: the source was stopped)."""
    deadline = time.monotonic() + timeout
    while vm.qmp("query-status")["status"] == "inmigrate":
        assert time.monotonic() < deadline, f"destination still in migration after {timeout} s"
        time.sleep(0.1)


def rpc_churn(daemons: list[VhostDaemon], i: int) -> None:
    for d in daemons:
        d.rpc("bdev_malloc_create", name=f"Spare{i}", num_blocks=2048, block_size=512)
        assert any(b["name"] == f"Spare{i}" for b in d.rpc("bdev_get_bdevs"))
        d.rpc("vhost_get_controllers")
        d.rpc("bdev_get_iostat")
        for subsystem in d.rpc("framework_get_subsystems"):
            d.rpc("framework_get_config", name=subsystem["subsystem"])
        d.rpc("bdev_malloc_delete", name=f"Spare{i}")


def attach_churn(d: VhostDaemon, vm: GuestVM, i: int) -> None:
    """One hot-attach/detach cycle of target 1 on the running SCSI VM."""
    name = f"Churn{i}"
    d.rpc("bdev_malloc_create", name=name, num_blocks=8 << 11, block_size=512)
    assert d.rpc("vhost_scsi_controller_add_target", ctrlr="vhost.0", scsi_target_num=1, bdev_name=name) == 1
    dev = wait_disks(vm, lambda f: 1 in f, timeout=60)[1]["KNAME"]
    digest = write_pattern(vm, dev)
    assert read_pattern(vm, dev) == digest, f"hot-attached disk {dev} ({name}) read back other data"
    d.rpc("vhost_scsi_controller_remove_target", ctrlr="vhost.0", scsi_target_num=1)
    wait_disks(vm, lambda f: 1 not in f and 0 in f, timeout=60)
    d.rpc("bdev_malloc_delete", name=name)


def guest_io_errors(vm: GuestVM) -> list[str]:
    return [line for line in vm.check("dmesg").splitlines()
            if re.search(r"I/O error|critical .*error|blk_update_request|Buffer I/O", line)]


def test_two_vms_through_churn_kill_9_and_migration_round_after_round(tmp_path, disk_file):
    scsi_d = VhostDaemon(tmp_path / "vhost-scsi").start()
    scsi_d.rpc("bdev_malloc_create", name="Malloc0", num_blocks=32 << 11, block_size=512)
    scsi_d.rpc("vhost_create_scsi_controller", ctrlr="vhost.0")
    scsi_d.rpc("vhost_scsi_controller_add_target", ctrlr="vhost.0", scsi_target_num=0, bdev_name="Malloc0")
    blk = BlkSide(tmp_path, disk_file)
    vm_scsi = GuestVM(["-chardev", f"socket,id=s0,path={scsi_d.socket('vhost.0')}",
                       "-device", f"vhost-user-scsi-pci,id=scsi0,chardev=s0,num_queues={QUEUES}"],
                      mem_mb=MEM_MB, smp=QUEUES, name="soak-scsi")
    vms = [vm_scsi]
    samples: list[tuple[int, int]] = []     # the SCSI daemon's (open fds, RSS KiB) after each round
    report = []
    start = time.monotonic()        # the soak's time counts from the first boot
    passed = False
    try:
        vm_scsi.start().wait_ready(timeout=240)
        scsi_dev = "/dev/" + disks(vm_scsi)[0]["KNAME"]
        rnd = 0
        cycles = 0
        longest = 0.0      # a round starts only if one as long as the longest so far still fits
        while rnd < 2 or time.monotonic() - start + longest <= SOAK_SECONDS:
            rnd += 1
            t_round = time.monotonic()
            # vm-blk is booted anew each round: a TCG guest migrated again and again under
            # I/O load is not reliable in QEMU 7.2 with any back-end (with qemu-storage-daemon
            # as the back-end, a 4-vCPU guest panicked after its 5th and 6th migration here).
            vm_blk = GuestVM(blk.device_args(blk.current), mem_mb=MEM_MB, smp=QUEUES, name=f"soak-blk-{rnd}")
            vms.append(vm_blk)
            vm_blk.start().wait_ready(timeout=240)
            start_background(vm_scsi, fio_loop(scsi_dev), "fio")
            start_background(vm_blk, fio_loop("/dev/vda"), "fio")
            seen = wait_requests(blk.current, "vhost.0", 0, 60, f"round {rnd}: vm-blk's fio")

            # Churn while both VMs verify.  The RPC churn runs beside the attach churn.
            stop = threading.Event()
            errors: list[BaseException] = []

            def churn_rpcs() -> None:
                i = 0
                try:
                    while not stop.is_set():
                        rpc_churn([scsi_d, *blk.daemons], i)
                        i += 1
                except BaseException as e:     # reported by the test thread
                    errors.append(e)

            rpc_thread = threading.Thread(target=churn_rpcs, daemon=True)
            rpc_thread.start()
            t_churn = time.monotonic()
            try:
                while time.monotonic() - t_churn < CHURN_SECONDS:
                    attach_churn(scsi_d, vm_scsi, cycles)
                    cycles += 1
            finally:
                stop.set()
                rpc_thread.join(120)
            assert not errors, f"round {rnd}: RPC churn failed: {errors[0]!r}"

            # kill -9 under load: QEMU reconnects to the successor, which resubmits.
            wait_requests(blk.current, "vhost.0", seen, 60, f"round {rnd}: vm-blk before the kill")
            successor = blk.kill_current()
            # Every queue resumed (asserted again on this daemon once the VM has left it).
            wait_requests(successor, "vhost.0", 0, 120, f"round {rnd}: vm-blk after kill -9 and restart",
                          every_queue=QUEUES)

            # Migration to the other daemon, with fio's requests in flight: stop-and-copy
            # (the module docstring says why not live).
            port = free_port()
            dst_vm = GuestVM(blk.device_args(blk.other), mem_mb=MEM_MB, smp=QUEUES, name=f"soak-blk-{rnd}-dst",
                             extra_args=["-incoming", f"tcp:127.0.0.1:{port}"])
            vms.append(dst_vm)
            dst_vm.start()
            wait_listening(port, dst_vm)
            vm_blk.qmp("stop")
            vm_blk.qmp("migrate", uri=f"tcp:127.0.0.1:{port}")
            info = wait_migration(vm_blk)
            assert info["status"] == "completed", f"round {rnd}: migration {info}"
            wait_incoming_done(dst_vm)
            dst_vm.qmp("cont")
            vm_blk.kill()
            vms.remove(vm_blk)
            vm_blk.close()
            vm_blk = dst_vm
            vm_blk.wait_agent()
            left = blk.current
            blk.cur = 1 - blk.cur
            wait_requests(blk.current, "vhost.0", 0, 60, f"round {rnd}: vm-blk after the migration")

            runs_blk = finish_fio(vm_blk, f"vm-blk, round {rnd}")
            runs_scsi = finish_fio(vm_scsi, f"vm-scsi, round {rnd}")
            errs = guest_io_errors(vm_blk)
            assert not errs, f"vm-blk logged I/O errors in round {rnd}:\n" + "\n".join(errs[-20:])
            vm_blk.kill()
            vms.remove(vm_blk)
            vm_blk.close()
            # One fio job per vCPU: every queue carried I/O, none failed a request.
            stats = left.rpc("vhost_get_queue_stats", ctrlr="vhost.0")[:QUEUES]
            assert all(q["requests"] > 0 for q in stats) and not any(q["errors"] for q in stats), \
                f"round {rnd}: vm-blk's four queues on the daemon it left: {stats}"
            # The daemons the VM left hold nothing of it any more.
            for d in (left, blk.current):
                wait_no_session(d, "vhost.0", timeout=30)
                deadline = time.monotonic() + 10
                while open_fds(d) > blk.idle_fds and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert open_fds(d) <= blk.idle_fds, (f"round {rnd}: a blk daemon keeps "
                                                     f"{open_fds(d) - blk.idle_fds} more files open after its VM left")
            for d in (scsi_d, *blk.daemons):
                assert_clean(d)
            samples.append((open_fds(scsi_d), rss_kib(scsi_d)))
            longest = max(longest, time.monotonic() - t_round)
            report.append(f"round {rnd}: {time.monotonic() - t_round:.0f} s, fio passes blk {runs_blk} "
                          f"scsi {runs_scsi}, attach cycles so far {cycles}, scsi daemon fds {samples[-1][0]} "
                          f"rss {samples[-1][1] // 1024} MiB")
            print(report[-1], flush=True)

        stats = scsi_d.rpc("vhost_get_queue_stats", ctrlr="vhost.0")
        busy = [q["queue"] for q in stats if q["requests"] > 100]
        assert busy == [2, 3, 4, 5], f"expected I/O on vm-scsi's four request queues: {stats}"
        assert all(q["errors"] == 0 for q in stats), stats
        errs = guest_io_errors(vm_scsi)
        assert not errs, "vm-scsi logged I/O errors:\n" + "\n".join(errs[-20:])
        # Level from the first round on: the same open files, RSS within 16 MiB.
        fds = [f for f, _ in samples]
        assert len(set(fds)) == 1, f"the SCSI daemon's open files changed between rounds: {fds}\n" + \
            "\n".join(report)
        growth = samples[-1][1] - samples[0][1]
        assert growth < 16 << 10, f"the SCSI daemon's RSS grew {growth} KiB over the rounds:\n" + "\n".join(report)
        assert cycles >= rnd, report
        passed = True
    finally:
        for vm in vms:
            vm.kill()
            vm.close()
        if not passed:
            # A failed soak must not leave its daemons running after pytest (they would
            # hold a core each on the next run's machine).
            for d in (scsi_d, *blk.daemons):
                if d.proc.poll() is None:
                    d.proc.kill()
                    d.proc.wait(30)
    assert_clean(scsi_d)
    rc = scsi_d.stop()
    assert rc == 0, f"scsi daemon exited with {rc} on SIGTERM:\n{scsi_d.log()[-3000:]}"
    blk.stop_all()
