"""Packaging as users and distribution packagers meet it.

- Install only what you need: in a fresh virtual environment, the command a user
  types in a clone, ``pip install ./vhost_core ./plugins/dev_blk ./plugins/bdev_malloc``
  (isolated builds, no ``--no-build-isolation``), makes a working target; what is not
  installed is named, with its distribution.
- ``pip install .`` at the root installs the daemon with every built-in plugin.
- Each distribution builds on its own: a plugin's sdist carries the core's header and
  build helper, so its wheel builds from the sdist in isolation with nothing but
  setuptools and cffi.
- License metadata (SPDX) and files everywhere, and no license deprecation warning.

No index serves vhost-core here: pip runs with ``--no-index`` semantics
(``PIP_NO_INDEX``) and finds only third-party wheels (setuptools and cffi for the
builds, attrs/cffi/pluggy/stevedore and their dependencies to run), downloaded from
the configured index once into ``${VHOST_TEST_CACHE:-~/.cache/vhost-tests}/pypi-wheels``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from vhost_core.rpc.registry import RpcError
from vhost_core.testing.daemon import VhostDaemon
from vhost_core.testing.blk import connect_blk

REPO = Path(__file__).resolve().parents[1]
SOURCES = {"vhost-core": REPO / "vhost_core", "vhost-dev-blk": REPO / "plugins" / "dev_blk",
           "vhost-bdev-malloc": REPO / "plugins" / "bdev_malloc"}
#: Every distribution of the repository: the root (vhost-py), the core, the plugins, the template.
DIST_DIRS = [REPO, REPO / "vhost_core", *sorted(p.parent for p in (REPO / "plugins").glob("*/pyproject.toml"))]
BUILTIN_PLUGIN_DIRS = [p for p in DIST_DIRS if p.parent.name == "plugins" and not p.name.startswith("_")]
VENDORED = ["vhost_core_build/native_build.py", "vhost_core_build/include/vhost_core/vhost_native.h"]
#: Files each sdist must carry for a wheel to be built from it.
SDIST_MUST_HAVE = {
    "vhost-core": ["src/vhost_core/_native/core.c", "src/vhost_core/_native/core.h",
                   "src/vhost_core/_native/pybdev.c", "src/vhost_core/_native/pybdev.h",
                   "src/vhost_core/_native/build.py", "src/vhost_core/include/vhost_core/vhost_native.h",
                   "src/vhost_core/native_build.py", "setup.py", "pyproject.toml", "LICENSE"],
    "vhost-dev-blk": ["src/vhost_dev_blk/blk.c", "src/vhost_dev_blk/blk.h", "src/vhost_dev_blk/_build.py",
                      "setup.py", "pyproject.toml", "LICENSE", *VENDORED],
    "vhost-bdev-malloc": ["src/vhost_bdev_malloc/malloc.c", "src/vhost_bdev_malloc/malloc_bdev.h",
                          "src/vhost_bdev_malloc/_build.py", "setup.py", "pyproject.toml", "LICENSE",
                          *VENDORED],
}
#: What the builds (setuptools, cffi) and the installed target (the rest) take from an index.
PYPI_DEPS = ["setuptools>=77", "cffi>=1.15", "attrs>=21.3", "pluggy>=1.0", "stevedore>=3.0"]
SYSTEM_PYTHON = "/usr/bin/python3"
LICENSE = "BSD-3-Clause"


def _run(cmd: list, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kw)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{out.stdout[-8000:]}\n{out.stderr[-8000:]}"
    return out


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment without anything pointing at the workspace's venv or plugins."""
    drop = ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "VHOST_PLUGINS", "VHOST_DISABLE_PLUGINS")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if not p.startswith(str(REPO / ".venv")))
    env.update(extra)
    return env


def _no_license_deprecation(output: str) -> None:
    """setuptools >= 77 warns at length about license classifiers and license tables."""
    bad = [line for line in output.splitlines()
           if re.search(r"deprecat", line, re.I) and re.search(r"licen[cs]e", line, re.I)]
    assert not bad, "license deprecation warnings:\n" + "\n".join(bad)


def _pypi_cache() -> Path:
    root = Path(os.environ.get("VHOST_TEST_CACHE", Path.home() / ".cache" / "vhost-tests"))
    path = root / "pypi-wheels"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def offline_pip(tmp_path_factory) -> dict[str, str]:
    """An environment in which pip sees no index, only the cached third-party wheels.

    Filled the first time from the configured index (wheels only), by a throw-away
    venv's pip so that the wheels fit the Python the tests' venvs use."""
    cache = _pypi_cache()
    assert not list(cache.glob("vhost*")), f"{cache} must not hold vhost distributions"
    probe = tmp_path_factory.mktemp("probe") / "v"
    _run([SYSTEM_PYTHON, "-m", "venv", probe], env=_clean_env())
    env = _clean_env(PIP_NO_INDEX="1", PIP_FIND_LINKS=str(cache), PIP_DISABLE_PIP_VERSION_CHECK="1")
    have = subprocess.run([probe / "bin" / "python", "-m", "pip", "download", "-q", "--only-binary", ":all:",
                           "-d", tmp_path_factory.mktemp("dl"), *PYPI_DEPS],
                          capture_output=True, text=True, timeout=300, env=env)
    if have.returncode != 0:
        _run([probe / "bin" / "python", "-m", "pip", "download", "-q", "--only-binary", ":all:",
              "-d", cache, *PYPI_DEPS], env=_clean_env())
    return env


def _venv(tmp_path_factory, name: str) -> Path:
    venv = tmp_path_factory.mktemp(name) / "v"
    _run([SYSTEM_PYTHON, "-m", "venv", venv], env=_clean_env())
    return venv


@pytest.fixture(scope="session")
def three_folder_venv(offline_pip, tmp_path_factory) -> tuple[Path, str]:
    """A fresh venv after exactly ``pip install ./vhost_core ./plugins/dev_blk
    ./plugins/bdev_malloc`` in the clone (``-v``: the build backends' output is kept)."""
    venv = _venv(tmp_path_factory, "three")
    out = _run([venv / "bin" / "pip", "install", "-v", "./vhost_core", "./plugins/dev_blk",
                "./plugins/bdev_malloc"], cwd=REPO, env=offline_pip)
    return venv, out.stdout + out.stderr


@pytest.fixture(scope="session")
def root_venv(offline_pip, tmp_path_factory) -> tuple[Path, str]:
    """A fresh venv after ``pip install .`` at the root of the clone."""
    venv = _venv(tmp_path_factory, "root")
    out = _run([venv / "bin" / "pip", "install", "-v", "."], cwd=REPO, env=offline_pip)
    return venv, out.stdout + out.stderr


def _pyproject(d: Path) -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((d / "pyproject.toml").read_text())


def test_every_distribution_states_its_license_python_and_one_version_source():
    license_text = (REPO / "LICENSE").read_text()
    assert "BSD 3-Clause" in license_text
    for d in DIST_DIRS:
        meta = _pyproject(d)
        project, where = meta["project"], d.relative_to(REPO) or "."
        assert project.get("license") == LICENSE and project.get("license-files") == ["LICENSE"], where
        assert (d / "LICENSE").read_text() == license_text, f"{where}/LICENSE differs from LICENSE"
        assert not [c for c in project.get("classifiers", []) if c.startswith("License ::")], where
        assert project["requires-python"] == ">=3.10", where
        # One version source: never a literal next to a package __version__.
        assert "version" not in project and "version" in project["dynamic"], where
        build_requires = meta["build-system"]["requires"]
        assert not [r for r in build_requires if r.startswith("vhost")], f"{where} needs vhost-core to build"
        assert "pytest11" not in project.get("entry-points", {}), f"{where}: pytest plugins are opt-in"
    # A plugin's copy of the core's header and build helper is the core's, by link.
    core = REPO / "vhost_core" / "src" / "vhost_core"
    for d in BUILTIN_PLUGIN_DIRS:
        for f in ("native_build.py", "include"):
            assert (d / "vhost_core_build" / f).resolve() == core / f, f"{d.name}/vhost_core_build/{f}"


def test_the_native_abi_version_is_the_compiled_one():
    import vhost_core
    from vhost_core.native import NATIVE_ABI_VERSION

    header = (REPO / "vhost_core/src/vhost_core/include/vhost_core/vhost_native.h").read_text()
    assert NATIVE_ABI_VERSION == int(re.search(r"^#define VN_ABI_VERSION (\d+)$", header, re.M).group(1))
    assert not hasattr(vhost_core, "NATIVE_ABI_VERSION"), "a second, hand-kept copy"


def test_each_sdist_is_complete_and_a_plugin_builds_from_its_sdist_alone(offline_pip, tmp_path):
    pytest.importorskip("build", reason="python -m build is needed: scripts/install.sh --test installs it")
    out = tmp_path / "dist"
    for dist, src in SOURCES.items():
        built = _run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", out, src])
        _no_license_deprecation(built.stdout + built.stderr)
        stem = dist.replace("-", "_")
        (sdist,) = out.glob(f"{stem}-*.tar.gz")
        with tarfile.open(sdist) as tar:
            members = {m.name.split("/", 1)[1]: m for m in tar.getmembers() if "/" in m.name}
            pkg_info = tar.extractfile(f"{sdist.name[:-len('.tar.gz')]}/PKG-INFO").read().decode()
        missing = [f for f in SDIST_MUST_HAVE[dist] if f not in members]
        assert not missing, f"{sdist.name} lacks {missing}"
        links = [n for n, m in members.items() if m.issym() or m.islnk()]
        assert not links, f"{sdist.name} has links, which point nowhere once unpacked: {links}"
        assert f"License-Expression: {LICENSE}" in pkg_info and "License-File: LICENSE" in pkg_info, pkg_info

    # A plugin on its own: its sdist, an isolated build env with setuptools and cffi, no vhost-core.
    (blk,) = out.glob("vhost_dev_blk-*.tar.gz")
    built = _run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "-w", tmp_path / "wheels", blk],
                 env=offline_pip)
    _no_license_deprecation(built.stdout + built.stderr)
    (wheel,) = (tmp_path / "wheels").glob("vhost_dev_blk-*.whl")
    with zipfile.ZipFile(wheel) as whl:
        names = whl.namelist()
        metadata = whl.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    assert any(re.match(r"vhost_dev_blk/_blk_native\..*so$", n) for n in names), names
    assert f"License-Expression: {LICENSE}" in metadata, metadata


def test_only_the_installed_plugins_are_there(three_folder_venv):
    venv, output = three_folder_venv
    _no_license_deprecation(output)
    py = venv / "bin" / "python"
    where = _run([py, "-c", "import vhost_core; print(vhost_core.__file__)"], env=_clean_env()).stdout
    assert where.startswith(str(venv)), where
    listed = _run([venv / "bin" / "vhost", "--list-plugins"], env=_clean_env()).stdout
    names = sorted(line.split()[0] for line in listed.splitlines() if line.strip())
    assert names == ["bdev_malloc", "dev_blk"], listed
    dists = _run([py, "-m", "pip", "list", "--format=freeze"], env=_clean_env()).stdout.lower()
    assert "vhost-bdev-aio" not in dists and "vhost-dev-scsi" not in dists and "pytest" not in dists


def test_a_target_from_three_folders_serves_io_and_names_the_missing_distributions(three_folder_venv, tmp_path):
    venv, _ = three_folder_venv
    py = venv / "bin" / "python"
    d = VhostDaemon(tmp_path / "vhost", python=str(py), env=_clean_env())
    d.env = _clean_env()            # exactly the venv: not this process's PYTHONPATH
    with d:
        versions = {p["name"]: p["distribution"] for p in d.rpc("framework_get_plugins")}
        assert versions == {"bdev_malloc": "vhost-bdev-malloc", "dev_blk": "vhost-dev-blk"}
        d.rpc("bdev_malloc_create", name="Malloc0", num_blocks=4096, block_size=512)
        d.rpc("vhost_create_blk_controller", ctrlr="vhost.0", dev_name="Malloc0")
        with connect_blk(d.socket("vhost.0"), num_queues=2) as dev:
            data = bytes(range(256)) * 16
            dev.write(8, data, queue=1)
            assert dev.read(8, 8) == data

        for method, params, dist in (
                ("bdev_aio_create", {"filename": "/tmp/x", "name": "aio0"}, "vhost-bdev-aio"),
                ("vhost_create_scsi_controller", {"ctrlr": "vhost.s"}, "vhost-dev-scsi")):
            with pytest.raises(RpcError) as err:
                d.rpc(method, **params)
            assert err.value.code == -32601
            assert f"pip install {dist}" in err.value.message

        cli = subprocess.run([venv / "bin" / "vhost-rpc", "-s", d.rpc_path, "bdev_aio_create",
                              "/tmp/x", "aio0", "512"], capture_output=True, text=True, timeout=60,
                             env=_clean_env())
        assert cli.returncode == 2, cli
        assert "pip install vhost-bdev-aio" in cli.stderr and "invalid choice" not in cli.stderr
        assert "Traceback" not in d.log()
    assert d.proc.returncode == 0, d.log()


def test_pip_install_dot_at_the_root_installs_the_daemon_with_every_builtin_plugin(root_venv):
    venv, output = root_venv
    _no_license_deprecation(output)
    want = sorted(name for d in BUILTIN_PLUGIN_DIRS
                  for name in _pyproject(d)["project"]["entry-points"]["vhost.plugins"])
    assert len(want) >= 4, want
    listed = _run([venv / "bin" / "vhost", "--list-plugins"], env=_clean_env()).stdout
    lines = [line for line in listed.splitlines() if line.strip()]
    assert sorted(line.split()[0] for line in lines) == want, listed
    assert "FAILED" not in listed, listed
    dists = _run([venv / "bin" / "python", "-m", "pip", "list", "--format=freeze"], env=_clean_env()).stdout
    assert "vhost-py==" in dists and "vhost-bdev-example" not in dists, dists
