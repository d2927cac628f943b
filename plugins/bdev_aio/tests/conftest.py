"""Fixtures of the bdev_aio tests: backing files on the real disk, scratch filesystems."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

#: Backing files live on the real disk: /tmp may be a tmpfs (no O_DIRECT on older kernels,
#: and no durability to test).
DISK_TMP = os.environ.get("VHOST_TEST_DISK_TMP", "/var/tmp")


def _fs_type(path: str) -> str:
    st = os.stat(path)
    want = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    found = ""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if left.split()[2] == want:
                found = right.split()[0]
    return found


@pytest.fixture
def backing_dir():
    if _fs_type(DISK_TMP) in ("tmpfs", "ramfs"):
        pytest.fail(f"{DISK_TMP} is a {_fs_type(DISK_TMP)}: set VHOST_TEST_DISK_TMP to a directory on a disk")
    d = Path(tempfile.mkdtemp(prefix="bdev-aio-", dir=DISK_TMP))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def make_file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@pytest.fixture
def mounts(backing_dir):
    """``mounts(kind, size_mb)`` mounts a scratch filesystem ("ramfs", "ext4" on a loop
    device, or a read-only bind of a directory) under backing_dir and returns its path;
    all are unmounted at teardown.  Skips when this machine does not let us mount."""
    done: list[Path] = []
    n = [0]

    def mount(kind: str, size_mb: int = 16, source: Path | None = None) -> Path:
        if os.geteuid() != 0:
            pytest.fail("mounting scratch filesystems needs root")
        n[0] += 1
        mp = backing_dir / f"mnt{n[0]}"
        mp.mkdir()
        if kind == "ramfs":
            cmds = [["mount", "-t", "ramfs", "ramfs", str(mp)]]
        elif kind == "ext4":
            img = make_file(backing_dir / f"fs{n[0]}.img", size_mb << 20)
            subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True, capture_output=True)
            cmds = [["mount", "-o", "loop", str(img), str(mp)]]
        elif kind == "ro-bind":
            cmds = [["mount", "--bind", str(source), str(mp)],
                    ["mount", "-o", "remount,bind,ro", str(mp)]]
        else:
            raise ValueError(kind)
        for cmd in cmds:
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                if cmd is not cmds[0]:
                    subprocess.run(["umount", str(mp)], capture_output=True)
                pytest.fail(f"cannot mount a scratch {kind} here: {r.stderr.strip()}")
        done.append(mp)
        return mp

    try:
        yield mount
    finally:
        for mp in reversed(done):
            subprocess.run(["umount", "-l", str(mp)], capture_output=True)


@pytest.fixture
def loop_device(backing_dir):
    """``loop_device(path, sector_size=512)`` attaches a loop device, detached at teardown."""
    devs: list[str] = []

    def attach(path: Path, sector_size: int = 512) -> str:
        if os.geteuid() != 0 or not shutil.which("losetup"):
            pytest.fail("loop devices need root and losetup")
        r = subprocess.run(["losetup", "-f", "--show", "--sector-size", str(sector_size), str(path)],
                           capture_output=True, text=True)
        if r.returncode:
            pytest.fail(f"cannot attach a loop device: {r.stderr.strip()}")
        devs.append(r.stdout.strip())
        return devs[-1]

    try:
        yield attach
    finally:
        for dev in devs:
            subprocess.run(["losetup", "-d", dev], capture_output=True)


@contextlib.contextmanager
def immutable(path: Path):
    r = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if r.returncode:
        pytest.fail(f"chattr +i does not work here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)


@pytest.fixture
def helpers():
    """Module-level helpers for the test modules (importlib mode cannot import conftest)."""
    import types

    return types.SimpleNamespace(make_file=make_file, immutable=immutable, fs_type=_fs_type)
