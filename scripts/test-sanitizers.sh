#!/usr/bin/env bash
# The sanitizer job: build vhost-core's and every plugin's native module with
# AddressSanitizer + UndefinedBehaviorSanitizer (VHOST_SANITIZE=1) into .venv-asan,
# then run the hostile-input and device suites against daemons built that way.
# Any sanitizer report fails the run (VhostDaemon.stop checks each daemon's log).
#   scripts/test-sanitizers.sh               the suites below
#   scripts/test-sanitizers.sh tests/x.py    other pytest arguments instead
# Expects scripts/install.sh --test to have run (the system packages).
set -euo pipefail
cd "$(dirname "$0")/.."

# The suites: scripts/sanitize-suites (the pytest stage of scripts/test.sh leaves them
# out, so they run once, here).  Not there, for CI's time: the NVMe/TCP and RBD
# conformance suites (a target guest, a Ceph cluster; only the RBD request budget test,
# which starts one, is there); their native code's input
# handling is what test_hostile_target.py and the nvme_tcp_rx fuzzer cover.  Run them
# alike with: scripts/test-sanitizers.sh <path>.
mapfile -t SUITES < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' scripts/sanitize-suites)
[ $# -gt 0 ] && SUITES=("$@")

VENV=.venv-asan
if [ ! -x $VENV/bin/python ]; then
    echo "==> creating $VENV"
    /usr/bin/python3 -m venv --system-site-packages $VENV
fi
$VENV/bin/python -m pip install -q --upgrade pip setuptools wheel cffi attrs pluggy stevedore \
    pytest pytest-timeout spdk

# Build from a copy: setuptools builds in the source tree's build/ and reuses a
# module that looks newer than its sources, so the plain and the sanitized
# builds must never share one.
SRC=$VENV/src
rm -rf "$SRC"
mkdir -p "$SRC/plugins"
cp -r vhost_core "$SRC/"
plugins=()
for d in plugins/*/; do
    case "$d" in plugins/_*) continue ;; esac
    [ -f "$d/pyproject.toml" ] || continue
    cp -r "$d" "$SRC/plugins/"
    plugins+=("$SRC/$d")
done
find "$SRC" -depth \( -name build -o -name '*.egg-info' -o -name '*.so' \) -exec rm -rf {} +
echo "==> building vhost-core and the plugins with ASan + UBSan"
VHOST_SANITIZE=1 $VENV/bin/python -m pip install -q --no-build-isolation "$SRC/vhost_core"
VHOST_SANITIZE=1 $VENV/bin/python -m pip install -q --no-build-isolation "${plugins[@]}"

# Python itself is not instrumented: the ASan runtime must be loaded first.
# Leak checking is off (the interpreter's own allocations would be reported);
# the first report aborts the process that made it.
ASAN_LIB=$(gcc -print-file-name=libasan.so)
[ -f "$ASAN_LIB" ] || { echo "test-sanitizers.sh: no libasan.so (apt-get install libasan8)" >&2; exit 1; }
# libstdc++ too: a C++ library loaded later (librados, by the RBD plugin) throws
# exceptions, and ASan's __cxa_throw interceptor finds the real one only if it is
# there when the runtime starts.
export LD_PRELOAD="$ASAN_LIB $(gcc -print-file-name=libstdc++.so)"
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1:allow_user_segv_handler=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
# Guard against a stale build: every native module must carry ASan.
$VENV/bin/python - <<'EOF'
import pathlib, subprocess, sysconfig
mods = sorted(pathlib.Path(sysconfig.get_paths()["purelib"]).glob("vhost_*/*.so"))
assert mods, "no native module installed"
for path in mods:
    assert "__asan_" in subprocess.run(["nm", "-D", path], capture_output=True, text=True).stdout, \
        f"{path} is not built with ASan"
EOF
exec $VENV/bin/python -m pytest -p no:cacheprovider -q "${SUITES[@]}"
