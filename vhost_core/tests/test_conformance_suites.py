"""The conformance suites cannot pass without running: a subclass that forgot its recipe,
or a daemon without vhost-dev-blk (which the bdev suite drives its bdevs through),
fails every test and says why, instead of skipping quietly."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

BDEV_SUITE = """
    import pytest
    from vhost_core.testing.conformance.bdev import BdevConformance, BdevRecipe


    class TestForgotTheRecipe(BdevConformance):
        pass


    class TestMallocWithoutBlk(BdevConformance):
        @pytest.fixture
        def bdev_recipe(self):
            return BdevRecipe("bdev_malloc_create", {"name": "M0", "num_blocks": 2048, "block_size": 512},
                              delete_method="bdev_malloc_delete")
"""

DEVICE_SUITE = """
    from vhost_core.testing.conformance.device import DeviceConformance


    class TestForgotTheRecipe(DeviceConformance):
        pass
"""


def _run(tmp_path, source: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    (tmp_path / "test_suite.py").write_text(textwrap.dedent(source))
    e = {k: v for k, v in os.environ.items() if k not in ("VHOST_PLUGINS", "VHOST_DISABLE_PLUGINS")}
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p",
                           "vhost_core.testing.pytest_plugin", "-q", "-rfs", *args, "test_suite.py"],
                          cwd=tmp_path, capture_output=True, text=True, env=e, timeout=600)


def test_a_bdev_suite_without_recipe_or_without_dev_blk_fails(tmp_path):
    out = _run(tmp_path, BDEV_SUITE, "-k", "round_trip or readonly or shared",
               env={"VHOST_DISABLE_PLUGINS": "dev_blk"})
    assert out.returncode == 1, out.stdout[-3000:]
    assert " passed" not in out.stdout.splitlines()[-1] and "skipped" not in out.stdout, out.stdout[-3000:]
    assert "TestForgotTheRecipe runs the bdev conformance suite without a bdev" in out.stdout
    assert "pip install vhost-dev-blk" in out.stdout


def test_a_device_suite_without_recipe_fails(tmp_path):
    out = _run(tmp_path, DEVICE_SUITE, "-k", "features")
    assert out.returncode == 1, out.stdout[-3000:]
    assert "skipped" not in out.stdout, out.stdout[-3000:]
    assert "TestForgotTheRecipe runs the device conformance suite without a device" in out.stdout
