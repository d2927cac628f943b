"""Plugin discovery through real entry points: fake distributions are laid out as
``*.dist-info`` folders on PYTHONPATH, and ``vhost --list-plugins`` runs in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest


def fake_dist(root: Path, dist: str, ep_name: str, module: str, source: str) -> None:
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[vhost.plugins]\n{ep_name} = {module}\n")


def list_plugins(root: Path, *args: str, env: dict[str, str] | None = None) -> str:
    e = {k: v for k, v in os.environ.items() if k not in ("VHOST_PLUGINS", "VHOST_DISABLE_PLUGINS")}
    e.update({"PYTHONPATH": str(root), **(env or {})})
    out = subprocess.run([sys.executable, "-m", "vhost_core.app", "--list-plugins", *args],
                         capture_output=True, text=True, env=e, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout + out.stderr


GOOD = """
    from vhost_core.hookspecs import hookimpl
    VHOST_CORE_API = (1,)

    @hookimpl
    def vhost_app_started(app):
        pass
"""


@pytest.fixture
def plugin_root(tmp_path):
    fake_dist(tmp_path, "third-party-good", "tp_good", "tp_good", GOOD)
    return tmp_path


def test_builtin_and_third_party_plugins_are_listed_with_distribution_and_hooks(plugin_root):
    out = list_plugins(plugin_root)
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "third-party-good" in lines["tp_good"] and "vhost_app_started" in lines["tp_good"]
    assert "vhost-dev-blk" in lines["dev_blk"] and "vhost_register_rpc_methods" in lines["dev_blk"]
    assert "vhost-bdev-malloc" in lines["bdev_malloc"]


@pytest.mark.parametrize("source, expected", [
    ("raise RuntimeError('boom at import')\n", "failed to import"),
    ("from vhost_core.hookspecs import hookimpl\n@hookimpl\ndef vhost_no_such_hook(app):\n    pass\n",
     "vhost_no_such_hook"),
    ("VHOST_CORE_API = (99,)\n", "supports core API (99,)"),
])
def test_a_broken_plugin_costs_one_log_line_and_the_others_load(plugin_root, source, expected):
    fake_dist(plugin_root, "third-party-bad", "tp_bad", "tp_bad", source)
    out = list_plugins(plugin_root)
    bad = [line for line in out.splitlines() if "tp_bad" in line and "FAILED" in line]
    assert len(bad) == 1 and expected in bad[0], out
    assert "Traceback" not in out
    names = [line.split()[0] for line in out.splitlines() if "FAILED" not in line and line.strip()]
    assert {"tp_good", "dev_blk", "bdev_malloc"} <= set(names)


def test_disable_and_allow_lists(plugin_root):
    out = list_plugins(plugin_root, "--disable-plugin", "tp_good")
    assert "tp_good" not in out and "dev_blk" in out
    out = list_plugins(plugin_root, env={"VHOST_DISABLE_PLUGINS": "dev_blk,tp_good"})
    assert "dev_blk" not in out and "tp_good" not in out and "bdev_malloc" in out
    out = list_plugins(plugin_root, env={"VHOST_PLUGINS": "tp_good"})
    assert [line.split()[0] for line in out.splitlines() if line.strip()] == ["tp_good"]


def test_missing_plugin_rpc_names_the_wheel_to_install(tmp_path):
    from vhost_core.rpc.client import RpcClient
    from vhost_core.rpc.registry import RpcError
    from vhost_core.testing.daemon import VhostDaemon

    with VhostDaemon(tmp_path, env={"VHOST_DISABLE_PLUGINS": "bdev_malloc"}) as d:
        with RpcClient(d.rpc_path) as c:
            with pytest.raises(RpcError) as err:
                c.call("bdev_malloc_create", {"num_blocks": 8, "block_size": 512})
        assert err.value.code == -32601
        assert "pip install vhost-bdev-malloc" in err.value.message
        methods = d.rpc("rpc_get_methods")
        assert "vhost_create_blk_controller" in methods and "bdev_malloc_create" not in methods
        plugins = {p["name"]: p for p in d.rpc("framework_get_plugins")}
        assert set(plugins) >= {"dev_blk"} and "bdev_malloc" not in plugins
        assert plugins["dev_blk"]["distribution"] == "vhost-dev-blk"
