"""A third-party author's path: copy ``plugins/_template`` out of the tree, install it
next to vhost-core, and it is a plugin like the built-in ones: its RPC and CLI
commands exist, its own conformance tests pass, and a real QEMU guest writes and
reads its pure-Python bdev through vhost-blk.

The copy is pip-installed into this environment (``--no-build-isolation``, offline)
and uninstalled at teardown.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "plugins" / "_template"
DIST = "vhost-bdev-example"


def _pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def out_of_tree_plugin(tmp_path_factory):
    if _pip("show", "-q", DIST).returncode == 0:
        pytest.fail(f"{DIST} is already installed here: uninstall it first (this test installs and removes its own copy)")
    dst = tmp_path_factory.mktemp("third-party") / "vhost-bdev-example"
    shutil.copytree(TEMPLATE, dst, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    out = _pip("install", "-q", "--no-build-isolation", "--no-deps", "--no-index", str(dst))
    assert out.returncode == 0, out.stdout + out.stderr
    try:
        yield dst
    finally:
        _pip("uninstall", "-y", "-q", DIST)


def test_the_copied_template_is_listed_and_passes_its_own_conformance_suite(out_of_tree_plugin):
    listed = subprocess.run([sys.executable, "-m", "vhost_core.app", "--list-plugins"],
                            capture_output=True, text=True, timeout=60).stdout
    line = next(line for line in listed.splitlines() if line.startswith("bdev_example"))
    assert DIST in line and "vhost_register_commands" in line
    # The plugin's own tests, run the way its author runs them: from its folder.
    out = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "tests"],
                         cwd=out_of_tree_plugin, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "skipped" not in out.stdout, out.stdout[-2000:]


def test_a_qemu_guest_writes_and_reads_the_pure_python_bdev(out_of_tree_plugin, vhost_daemon):
    from guestvm import GuestVM

    d = vhost_daemon
    # The plugin's CLI command, as a user types it.
    cli = subprocess.run([sys.executable, "-m", "vhost_core.rpc.cli", "-s", d.rpc_path,
                          "bdev_example_create", "Example0", "32", "512"],
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0 and cli.stdout.strip() == "Example0", cli
    d.rpc("vhost_create_blk_controller", ctrlr="vhost.ex", dev_name="Example0")
    with GuestVM(["-chardev", f"socket,id=ex,path={d.socket('vhost.ex')}",
                  "-device", "vhost-user-blk-pci,chardev=ex,num-queues=2"], smp=2, name="vm-example") as vm:
        vm.start().wait_ready()
        assert int(vm.check("cat /sys/block/vda/size")) == 32 * 1024 * 1024 // 512
        vm.check("dd if=/dev/urandom of=/tmp/pattern bs=1M count=4 2>/dev/null")
        vm.check("dd if=/tmp/pattern of=/dev/vda bs=1M seek=1 oflag=direct 2>/dev/null")
        digest = vm.check("sha256sum /tmp/pattern").split()[0]
        vm.check("dd if=/dev/vda of=/tmp/back bs=1M skip=1 count=4 iflag=direct 2>/dev/null")
        assert vm.check("sha256sum /tmp/back").split()[0] == digest
        # Discard reaches the Python object (DictDisk.unmap) and the range reads zeroes.
        vm.check("blkdiscard -o 1048576 -l 1048576 /dev/vda")
        nonzero = vm.check("dd if=/dev/vda bs=1M skip=1 count=1 iflag=direct 2>/dev/null"
                           " | tr -d '\\000' | wc -c")
        assert nonzero.strip() == "0"
    info = d.rpc("bdev_get_bdevs", name="Example0")[0]
    assert info["product_name"] == "Example disk" and info["claimed"] is True
    assert "Traceback" not in d.log(), d.log()
