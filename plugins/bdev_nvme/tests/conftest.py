"""Fixtures of the bdev_nvme tests: a real NVMe/TCP target (Linux nvmet in a TCG guest)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

# The project's fixtures (vhost_daemon, ...) come from vhost_core.testing.pytest_plugin,
# which the repository's pyproject.toml loads for every suite.


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bdev_nvme_{name}", Path(__file__).parent / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


nvmet = _load("nvmet_target")
fake = _load("fake_target")
vfio = _load("vfio_guest")


@pytest.fixture(scope="session")
def fake_mod():
    """The fake_target helper module: a scripted, misbehaving NVMe/TCP controller."""
    return fake


@pytest.fixture(scope="session")
def nvmet_mod():
    """The nvmet_target helper module (importlib mode cannot import it from the tests)."""
    return nvmet


@pytest.fixture(scope="session")
def vfio_mod():
    """The vfio_guest helper module: a q35 guest with a vIOMMU and an emulated NVMe controller."""
    return vfio


@pytest.fixture(scope="session")
def nvmet_target():
    """One nvmet target guest for the session (its subsystems: nvmet_target.py)."""
    t = nvmet.NvmetTarget(name="nvmet-session").start()
    try:
        yield t
    finally:
        t.close()
