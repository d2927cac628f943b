"""The README's list of SPDK's methods is what scripts/rpc_coverage.py generates from the code."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_lists_what_the_code_serves():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import rpc_coverage
    finally:
        sys.path.pop(0)
    generated = subprocess.run([sys.executable, str(ROOT / "scripts" / "rpc_coverage.py")],
                               capture_output=True, text=True, check=True).stdout
    in_readme = rpc_coverage.readme_section((ROOT / "README.md").read_text())
    assert in_readme == generated, ("README.md's SPDK method list is out of date: run "
                                    ".venv/bin/python scripts/rpc_coverage.py --write")
