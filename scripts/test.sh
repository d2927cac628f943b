#!/usr/bin/env bash
# Install what the tests need, then run them all: unit tests of every package,
# hostile-input tests against the real daemon, and end-to-end tests with a real
# QEMU guest (TCG).  Extra arguments go to pytest (e.g. -k blk -x).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh --test
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
