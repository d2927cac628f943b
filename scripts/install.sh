#!/usr/bin/env bash
# Install the vhost target into ./.venv (Debian 12, as root or with sudo).
#   scripts/install.sh          the daemon, the CLI and the built-in plugins
#   scripts/install.sh --test   also what the test suite needs (QEMU, a guest kernel, fio, pytest)
#   scripts/install.sh --fuzz   also the fuzzers' and sanitizers' tools (clang, libFuzzer, ASan, atheris)
# The two options combine (scripts/test.sh passes both).
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0 want_fuzz=0
for arg in "$@"; do
    case "$arg" in
        --test) want_test=1 ;;
        --fuzz) want_fuzz=1 ;;
        *) echo "install.sh: unknown option $arg" >&2; exit 2 ;;
    esac
done

pkgs=(python3 python3-venv python3-dev gcc make libaio-dev liburing-dev pkg-config)
if [ $want_test = 1 ]; then
    pkgs+=(qemu-system-x86 qemu-utils linux-image-amd64 busybox-static fio cpio kmod util-linux)
fi
if [ $want_fuzz = 1 ]; then
    # -fsanitize=fuzzer needs clang's runtime libraries, a separate package on Debian 12;
    # the sanitizer job's gcc build needs the ASan and UBSan runtimes (and nm, to check them).
    pkgs+=(clang-14 libclang-rt-14-dev libasan8 libubsan1 binutils)
fi

missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "==> apt-get install ${missing[*]}"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian's python3 so that Debian-packaged bindings (python3-rbd) stay importable.
PY=/usr/bin/python3
if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv"
    "$PY" -m venv --system-site-packages .venv
fi
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel cffi attrs pluggy stevedore
if [ $want_test = 1 ]; then
    .venv/bin/python -m pip install -q pytest pytest-timeout build spdk
fi
if [ $want_fuzz = 1 ]; then
    .venv/bin/python -m pip install -q atheris
fi

# The core first: plugins compile against its header (vhost_core.get_include()).
echo "==> building vhost-core and the plugins"
.venv/bin/python -m pip install -q --no-build-isolation ./vhost_core
plugins=()
for d in plugins/*/; do
    case "$d" in plugins/_*) continue ;; esac
    [ -f "$d/pyproject.toml" ] && plugins+=("./$d")
done
.venv/bin/python -m pip install -q --no-build-isolation "${plugins[@]}"
echo "==> installed: $(.venv/bin/vhost --list-plugins | awk '{print $1}' | tr '\n' ' ')"
