"""Install only what you need: vhost-core plus two plugin wheels, in a fresh virtual
environment, make a working target; what is not installed is named, with its wheel.

The wheels are built from the source trees (sdist first, then the wheel from the
sdist, so an incomplete sdist fails here), once per test session.  The venv gets
nothing from the workspace: the three wheels, and attrs/cffi/pluggy/stevedore (and
their dependencies) as wheels from PyPI, cached in ``${VHOST_TEST_CACHE:-~/.cache/
vhost-tests}/pypi-wheels`` after the first download.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from vhost_core.rpc.registry import RpcError
from vhost_core.testing.daemon import VhostDaemon
from vhost_core.testing.frontend import connect_blk

REPO = Path(__file__).resolve().parents[1]
# Built in this order: the plugins compile against the core's header.
SOURCES = {"vhost-core": REPO / "vhost_core", "vhost-dev-blk": REPO / "plugins" / "dev_blk",
           "vhost-bdev-malloc": REPO / "plugins" / "bdev_malloc"}
#: Files each sdist must carry for a wheel to be built from it.
SDIST_MUST_HAVE = {
    "vhost-core": ["src/vhost_core/_native/core.c", "src/vhost_core/_native/core.h",
                   "src/vhost_core/_native/pybdev.c", "src/vhost_core/_native/pybdev.h",
                   "src/vhost_core/_native/build.py", "src/vhost_core/include/vhost_core/vhost_native.h",
                   "setup.py", "pyproject.toml"],
    "vhost-dev-blk": ["src/vhost_dev_blk/blk.c", "src/vhost_dev_blk/blk.h", "src/vhost_dev_blk/_build.py",
                      "setup.py", "pyproject.toml"],
    "vhost-bdev-malloc": ["src/vhost_bdev_malloc/malloc.c", "src/vhost_bdev_malloc/malloc_bdev.h",
                          "src/vhost_bdev_malloc/_build.py", "setup.py", "pyproject.toml"],
}
PYPI_DEPS = ["attrs>=21.3", "cffi>=1.15", "pluggy>=1.0", "stevedore>=3.0"]
SYSTEM_PYTHON = "/usr/bin/python3"


def _run(cmd: list, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kw)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{out.stdout}\n{out.stderr}"
    return out


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment without anything pointing at the workspace's venv or plugins."""
    drop = ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "VHOST_PLUGINS", "VHOST_DISABLE_PLUGINS")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if not p.startswith(str(REPO / ".venv")))
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory) -> Path:
    pytest.importorskip("build", reason="python -m build is needed: scripts/install.sh --test installs it")
    out = tmp_path_factory.mktemp("wheelhouse")
    for dist, src in SOURCES.items():
        _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", out, src])
        stem = dist.replace("-", "_")
        # Older setuptools keep the dashes in sdist names.
        sdist = next(p for p in out.glob("*.tar.gz") if p.name.replace("-", "_").startswith(f"{stem}_0"))
        with tarfile.open(sdist) as tar:
            names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        missing = [f for f in SDIST_MUST_HAVE[dist] if f not in names]
        assert not missing, f"{sdist.name} lacks {missing}"
        assert list(out.glob(f"{stem}-0.1.0-*.whl")), f"no wheel for {dist}"
    return out


def _pypi_cache() -> Path:
    root = Path(os.environ.get("VHOST_TEST_CACHE", Path.home() / ".cache" / "vhost-tests"))
    path = root / "pypi-wheels"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def fresh_venv(wheelhouse, tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("venv") / "v"
    # No pip inside: the workspace's pip installs into it (pip --python), which is quicker.
    _run([SYSTEM_PYTHON, "-m", "venv", "--without-pip", venv], env=_clean_env())
    py = venv / "bin" / "python"
    cache = _pypi_cache()
    install = [sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-index",
               "--find-links", wheelhouse, "--find-links", cache, "vhost-core", "vhost-dev-blk",
               "vhost-bdev-malloc"]
    first = subprocess.run([str(c) for c in install], capture_output=True, text=True, timeout=300,
                           env=_clean_env())
    if first.returncode != 0:
        # The PyPI dependencies are not cached yet: fetch them once (wheels only).
        _run([sys.executable, "-m", "pip", "--python", py, "download", "-q", "--only-binary", ":all:",
              "-d", cache, *PYPI_DEPS], env=_clean_env())
        _run(install, env=_clean_env())
    return venv


def test_only_the_installed_plugins_are_there(fresh_venv):
    py = fresh_venv / "bin" / "python"
    where = _run([py, "-c", "import vhost_core; print(vhost_core.__file__)"], env=_clean_env()).stdout
    assert where.startswith(str(fresh_venv)), where
    listed = _run([fresh_venv / "bin" / "vhost", "--list-plugins"], env=_clean_env()).stdout
    names = sorted(line.split()[0] for line in listed.splitlines() if line.strip())
    assert names == ["bdev_malloc", "dev_blk"], listed
    dists = _run([sys.executable, "-m", "pip", "--python", py, "list", "--format=freeze"],
                 env=_clean_env()).stdout.lower()
    assert "vhost-bdev-aio" not in dists and "vhost-dev-scsi" not in dists and "pytest" not in dists


def test_a_target_from_three_wheels_serves_io_and_names_the_missing_wheels(fresh_venv, tmp_path):
    py = fresh_venv / "bin" / "python"
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

        cli = subprocess.run([fresh_venv / "bin" / "vhost-rpc", "-s", d.rpc_path, "bdev_aio_create",
                              "/tmp/x", "aio0", "512"], capture_output=True, text=True, timeout=60,
                             env=_clean_env())
        assert cli.returncode == 2, cli
        assert "pip install vhost-bdev-aio" in cli.stderr and "invalid choice" not in cli.stderr
        assert "Traceback" not in d.log()
    assert d.proc.returncode == 0, d.log()
