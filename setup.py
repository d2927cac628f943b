"""vhost-py, the root of a clone: ``pip install .`` installs the daemon with its built-in plugins.

No code of its own: it depends on vhost-core and on every plugin folder that is not a
template (``plugins/_*``), each by path (``vhost-dev-blk @ file:///.../plugins/dev_blk``),
so pip builds and installs each from its own folder as its own distribution.  Its
version is vhost-core's.
"""

import re
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CORE = ROOT / "vhost_core"

if not (CORE / "pyproject.toml").is_file():
    raise SystemExit(f"vhost-py installs the distributions of a vhost-py clone, and {CORE} is not there: "
                     "build from the repository (pip install .), not from an sdist of it")


def _field(path: Path, pattern: str) -> str:
    return re.search(pattern, path.read_text(), re.M).group(1)


folders = [CORE] + sorted(p for p in (ROOT / "plugins").iterdir()
                          if not p.name.startswith("_") and (p / "pyproject.toml").is_file())
NAME = r'^name = "([^"]+)"'
setup(
    version=_field(CORE / "src" / "vhost_core" / "__init__.py", r'^__version__ = "([^"]+)"'),
    install_requires=[f"{_field(f / 'pyproject.toml', NAME)} @ {f.as_uri()}" for f in folders],
)
