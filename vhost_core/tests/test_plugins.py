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
    VHOST_CORE_API = (2,)

    @hookimpl
    def vhost_register_commands(registry):
        pass
"""


@pytest.fixture
def plugin_root(tmp_path):
    fake_dist(tmp_path, "third-party-good", "tp_good", "tp_good", GOOD)
    return tmp_path


def test_builtin_and_third_party_plugins_are_listed_with_distribution_and_hooks(plugin_root):
    out = list_plugins(plugin_root)
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "third-party-good" in lines["tp_good"] and "vhost_register_commands" in lines["tp_good"]
    assert "vhost-dev-blk" in lines["dev_blk"] and "vhost_register_commands" in lines["dev_blk"]
    assert "vhost-bdev-malloc" in lines["bdev_malloc"]


@pytest.mark.parametrize("source, expected", [
    ("raise RuntimeError('boom at import')\n", "failed to import"),
    ("from vhost_core.hookspecs import hookimpl\nVHOST_CORE_API = (2,)\n"
     "@hookimpl\ndef vhost_no_such_hook(app):\n    pass\n",
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


DUPLICATE_RPC = """
    from vhost_core.commands import Command
    from vhost_core.hookspecs import hookimpl
    VHOST_CORE_API = (2,)

    @hookimpl
    def vhost_register_commands(registry):
        registry.add(Command("tp_dup_first", lambda ctx: True))
        registry.add(Command("bdev_get_bdevs", lambda ctx: []))   # the core's: taken
"""


def test_a_plugin_registering_a_taken_rpc_name_is_rolled_back_and_the_others_serve(tmp_path):
    from vhost_core.testing.daemon import VhostDaemon

    fake_dist(tmp_path, "third-party-dup", "tp_dup", "tp_dup", DUPLICATE_RPC)
    with VhostDaemon(tmp_path / "d", env={"PYTHONPATH": str(tmp_path)}) as d:
        methods = d.rpc("rpc_get_methods")
        # None of the plugin's methods stays half registered...
        assert "tp_dup_first" not in methods
        # ...the name it wanted keeps its owner, and the other plugins serve.
        assert d.rpc("bdev_get_bdevs") == []
        assert d.rpc("bdev_malloc_create", num_blocks=8, block_size=512, name="M0") == "M0"
        lines = [line for line in d.log().splitlines() if "tp_dup" in line]
        assert len(lines) == 1, d.log()
        assert "'bdev_get_bdevs' is already registered by vhost-core" in lines[0]
        assert "Traceback" not in d.log()


BAD_ABI = """
    from vhost_core.bdev.interface import Bdev
    from vhost_core.device import Device, NativeDevice
    from vhost_core.hookspecs import hookimpl
    from vhost_core.native import ffi

    VHOST_CORE_API = (2,)
    _keep = []
    destructed = []


    def _table(abi_version):
        ops = ffi.new("uint64_t[8]")        # abi_version, then NULL function pointers
        ffi.cast("uint32_t *", ops)[0] = abi_version
        _keep.append(ops)
        return int(ffi.cast("uintptr_t", ops))


    class Backend(Device):
        device_type = "fake"

        def attach(self, ctx):
            return NativeDevice(ops=_table(99), ctx=0)


    @hookimpl
    def vhost_register_commands(registry):
        @registry.command("tp_abi_bdev_create")
        def bdev_create(ctx):
            vn_bdev = ffi.new("uint64_t[6]")
            vn_bdev[0] = _table(99)
            _keep.append(vn_bdev)
            ctx.bdevs.add(Bdev(name="Abi0", module="tp_abi", product_name="ABI test", block_size=512,
                               num_blocks=8, native=int(ffi.cast("uintptr_t", vn_bdev)),
                               destruct=lambda: destructed.append("Abi0")))
            return "Abi0"

        @registry.command("tp_abi_destructed")
        def was_destructed(ctx):
            return destructed

        @registry.command("tp_abi_controller_create")
        def controller_create(ctx):
            ctx.controllers.create("abi.0", Backend())
            return True
"""


def test_a_native_table_of_another_abi_is_refused_with_one_clear_error(tmp_path):
    from vhost_core.native import NATIVE_ABI_VERSION
    from vhost_core.rpc.registry import RpcError
    from vhost_core.testing.daemon import VhostDaemon

    fake_dist(tmp_path, "third-party-abi", "tp_abi", "tp_abi", BAD_ABI)
    with VhostDaemon(tmp_path / "d", env={"PYTHONPATH": str(tmp_path)}) as d:
        with pytest.raises(RpcError) as err:
            d.rpc("tp_abi_bdev_create")
        assert "bdev 'Abi0' (module tp_abi)" in err.value.message
        assert "native ABI 99" in err.value.message and f"provides ABI {NATIVE_ABI_VERSION}" in err.value.message
        assert d.rpc("bdev_get_bdevs") == []
        assert d.rpc("tp_abi_destructed") == ["Abi0"]     # refused, and freed by its module
        with pytest.raises(RpcError) as err:
            d.rpc("tp_abi_controller_create")
        assert "fake device type of controller abi.0" in err.value.message
        assert "native ABI 99" in err.value.message
        assert d.rpc("vhost_get_controllers") == []
        assert not os.path.exists(d.socket("abi.0"))
        errors = [line for line in d.log().splitlines() if "native ABI 99" in line]
        assert len(errors) == 2 and all("*ERROR*" in line for line in errors), d.log()
        assert "Traceback" not in d.log()
        assert d.alive()


def test_cli_names_the_wheel_of_a_known_method_whose_plugin_is_missing(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("VHOST_PLUGINS", "VHOST_DISABLE_PLUGINS")}
    env["VHOST_DISABLE_PLUGINS"] = "bdev_malloc"
    out = subprocess.run([sys.executable, "-m", "vhost_core.rpc.cli", "-s", str(tmp_path / "none.sock"),
                          "bdev_malloc_create", "-b", "Malloc0", "64", "512"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 2
    assert "pip install vhost-bdev-malloc" in out.stderr and "invalid choice" not in out.stderr
    # Unknown words still get argparse's answer.
    out = subprocess.run([sys.executable, "-m", "vhost_core.rpc.cli", "no_such_method"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 2 and "invalid choice" in out.stderr


def test_each_plugin_declares_the_methods_it_registers_and_the_hints_agree():
    """The provider hints come from data: each installed plugin's ``vhost.provides`` entry
    points, and rpc.spdk.DISTRIBUTIONS for plugins that are not installed.  Both must say
    what the plugins really register."""
    from vhost_core import plugins
    from vhost_core.rpc.spdk import DISTRIBUTIONS, family_match

    manager = plugins.load_plugins()
    declared: dict[str, set[str]] = {}
    for ep in plugins._entry_points(plugins.PROVIDES_GROUP):
        declared.setdefault(ep.dist.metadata["Name"], set()).add(ep.name)
    for info in manager.infos:
        if not info.distribution.startswith("vhost-"):
            continue
        reg = plugins.collect(manager, info.name)
        names = {n for c in reg.commands for n in (c.name, *c.aliases)}
        assert names == declared.get(info.distribution, set()), info.name
        for name in names:
            assert family_match(DISTRIBUTIONS, name) == info.distribution, name
            assert plugins.provider_of(name) == info.distribution, name
    assert plugins.provider_of("bdev_malloc_create_call") is None     # families hold SPDK's methods only
