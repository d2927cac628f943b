#!/usr/bin/env bash
# Install what the tests need, then run them all:
#   1. fuzz      every fuzz target replays its committed inputs, then fuzzes
#                FUZZ_SECONDS (default 10) each (fuzz/run.sh, fuzz/README.md)
#   2. sanitize  the hostile and device suites against daemons whose native
#                modules are built with ASan + UBSan (scripts/test-sanitizers.sh)
#   3. pytest    every other test: unit tests of every package, the daemon's RPC
#                and vhost-user behaviour, and end-to-end tests with a real QEMU
#                guest (TCG), a real Ceph and NVMe/TCP targets
# Every stage runs even when an earlier one failed; any failure fails the run.
# Extra arguments go to pytest and run stage 3 only (e.g. -k blk -x).
set -uo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh --test --fuzz || exit 1

if [ $# -gt 0 ]; then
    exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
fi

passed=0 failed=()
stage() {
    local name=$1 start=$SECONDS
    shift
    echo "==> $name: $*"
    if "$@"; then
        passed=$((passed + 1))
        echo "==> $name passed in $((SECONDS - start)) s"
    else
        failed+=("$name")
        echo "==> $name FAILED after $((SECONDS - start)) s"
    fi
}
stage fuzz fuzz/run.sh
stage sanitize scripts/test-sanitizers.sh
# The suites the sanitize stage ran are not run again here (scripts/sanitize-suites).
mapfile -t ignore < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' -e 's/^/--ignore=/' scripts/sanitize-suites)
stage pytest .venv/bin/python -m pytest -p no:cacheprovider --durations=25 "${ignore[@]}"
[ ${#failed[@]} -gt 0 ] && echo "failed stages: ${failed[*]}"
echo "stages: $passed passed, ${#failed[@]} failed"
[ ${#failed[@]} -eq 0 ]
