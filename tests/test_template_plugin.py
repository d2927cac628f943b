"""A third-party author's paths, each ending in a plugin like the built-in ones:

- the plugin of ``docs/writing-a-bdev-plugin.md``, built from the page alone (its code
  blocks, in the files they name): it installs, its own conformance tests pass, its
  command line, errors and ``save_config`` work;
- ``plugins/_template`` copied out of the tree: its RPC and CLI commands exist, its own
  conformance tests pass, and a real QEMU guest writes and reads its pure-Python bdev
  through vhost-blk.

Each is pip-installed into this environment (``--no-build-isolation``, offline) and
uninstalled at teardown.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from vhost_core.testing import connect_blk

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "plugins" / "_template"
GUIDE = REPO / "docs" / "writing-a-bdev-plugin.md"
DIST = "vhost-bdev-example"
DOC_DIST = "vhost-bdev-mydisk"


def _pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=300)


@contextlib.contextmanager
def _installed(src: Path, dist: str):
    if _pip("show", "-q", dist).returncode == 0:
        pytest.fail(f"{dist} is already installed here: uninstall it first (this test installs and removes its own copy)")
    out = _pip("install", "-q", "--no-build-isolation", "--no-deps", "--no-index", str(src))
    assert out.returncode == 0, out.stdout + out.stderr
    try:
        yield src
    finally:
        _pip("uninstall", "-y", "-q", dist)


def _listed(entry_point: str) -> str:
    listed = subprocess.run([sys.executable, "-m", "vhost_core.app", "--list-plugins"],
                            capture_output=True, text=True, timeout=60).stdout
    return next(line for line in listed.splitlines() if line.startswith(entry_point))


def _own_tests_pass(folder: Path) -> None:
    """The plugin's own tests, run the way its author runs them: from its folder (in a
    short base directory of their own: the daemons' sockets live there)."""
    with tempfile.TemporaryDirectory(prefix="vt-") as basetemp:
        out = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
                              f"--basetemp={basetemp}/t", "tests"],
                             cwd=folder, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "skipped" not in out.stdout, out.stdout[-2000:]


def guide_files(text: str) -> dict[str, str]:
    """The files the guide's code blocks make: a ``**File `path`**`` line names the file
    of the fenced block after it (``, continued``: appended to what it has so far)."""
    files: dict[str, str] = {}
    for m in re.finditer(r"^\*\*File `([^`]+)`(, continued)?\*\*\n+```[a-z]*\n(.*?)^```$", text, re.M | re.S):
        path, continued, body = m.groups()
        assert (path in files) == bool(continued), f"{path}: 'continued' where the file starts, or not where it goes on"
        files[path] = files[path] + "\n\n" + body if continued else body
    return files


@pytest.fixture(scope="module")
def guide_plugin(tmp_path_factory):
    files = guide_files(GUIDE.read_text())
    assert {"pyproject.toml", "src/vhost_bdev_mydisk/plugin.py", "tests/test_conformance.py"} <= set(files)
    dst = tmp_path_factory.mktemp("from-the-guide") / DOC_DIST
    for path, body in files.items():
        (dst / path).parent.mkdir(parents=True, exist_ok=True)
        (dst / path).write_text(body)
    with _installed(dst, DOC_DIST):
        yield dst


def test_the_guides_plugin_installs_and_passes_its_own_conformance_suite(guide_plugin):
    line = _listed("bdev_mydisk")
    assert DOC_DIST in line and "vhost_register_commands" in line and "vhost_register_bdev_modules" in line
    _own_tests_pass(guide_plugin)


def test_the_guides_plugin_from_the_command_line(guide_plugin, vhost_daemon):
    d = vhost_daemon

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "vhost_core.rpc.cli", "-s", d.rpc_path, *args],
                              capture_output=True, text=True, timeout=60)

    # As the guide spells it: vhost-rpc bdev_mydisk_create NAME NUM_BLOCKS [-s BLOCK_SIZE]
    out = cli("bdev_mydisk_create", "Mydisk0", "256", "-s", "4096")
    assert out.returncode == 0 and out.stdout.strip() == "Mydisk0", out
    assert "-s BLOCK_SIZE" in cli("bdev_mydisk_create", "--help").stdout
    info = d.rpc("bdev_get_bdevs", name="Mydisk0")[0]
    assert (info["num_blocks"], info["block_size"], info["product_name"]) == (256, 4096, "My disk")
    # Its VhostError reaches the client as -errno and the message.
    bad = cli("bdev_mydisk_create", "Mydisk1", "0")
    assert bad.returncode != 0 and "num_blocks must be positive" in bad.stdout + bad.stderr
    taken = cli("bdev_mydisk_create", "Mydisk0", "8")
    assert taken.returncode != 0 and "already taken" in taken.stdout + taken.stderr
    # I/O through a vhost-blk controller reaches MyDisk and reads back.
    d.rpc("vhost_create_blk_controller", ctrlr="vhost.md", dev_name="Mydisk0")
    dev = connect_blk(d.socket("vhost.md"))
    try:
        pattern = bytes(range(256)) * 32              # two 4096-byte blocks
        dev.write(8, pattern)
        assert dev.read(8, len(pattern) // 512) == pattern
    finally:
        dev.close()
    # save_config recreates it (the module's config_json).
    config = cli("save_config")
    assert config.returncode == 0, config
    saved = [m for s in json.loads(config.stdout)["subsystems"] if s["subsystem"] == "bdev" for m in s["config"]]
    assert {"method": "bdev_mydisk_create",
            "params": {"name": "Mydisk0", "num_blocks": 256, "block_size": 4096}} in saved
    d.rpc("vhost_delete_controller", ctrlr="vhost.md")
    assert cli("bdev_mydisk_delete", "Mydisk0").returncode == 0
    assert d.rpc("bdev_get_bdevs") == []
    assert "Traceback" not in d.log(), d.log()


@pytest.fixture(scope="module")
def out_of_tree_plugin(tmp_path_factory):
    dst = tmp_path_factory.mktemp("third-party") / "vhost-bdev-example"
    shutil.copytree(TEMPLATE, dst, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    with _installed(dst, DIST):
        yield dst


def test_the_copied_template_is_listed_and_passes_its_own_conformance_suite(out_of_tree_plugin):
    line = _listed("bdev_example")
    assert DIST in line and "vhost_register_commands" in line
    _own_tests_pass(out_of_tree_plugin)


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
    assert info["product_name"] == "Example disk" and info["claimed"] is False   # opened, not claimed (SPDK)
    assert "Traceback" not in d.log(), d.log()
