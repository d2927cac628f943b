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
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo

# To build: gcc and Python's headers for the cffi extensions, libc6-dev (and with it
# linux-libc-dev: bdev_aio uses Linux AIO and io_uring through raw system calls and the
# kernel's uapi headers, no libaio, no liburing).  make: only for bench/loadgen/Makefile.
pkgs=(python3 python3-venv python3-dev gcc libc6-dev make)
# bdev_rbd: librbd's and librados' headers to build it, Ceph's Python bindings to run it
# (the venv sees Debian's through --system-site-packages).
pkgs+=(librbd-dev librados-dev python3-rados python3-rbd)
if [ $want_test = 1 ]; then
    # No linux-image-amd64: the guest's kernel is extracted from it below, not installed.
    pkgs+=(qemu-system-x86 qemu-utils busybox-static fio cpio kmod util-linux)
    # bdev_rbd's tests start a single-node Ceph (mon + memstore OSD); its benchmark's peer is
    # qemu-storage-daemon's rbd driver (qemu-block-extra).
    pkgs+=(ceph-mon ceph-osd ceph-common qemu-block-extra)
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
apt_updated=0
if [ ${#missing[@]} -gt 0 ]; then
    echo "==> apt-get install ${missing[*]}"
    $SUDO apt-get update -qq
    apt_updated=1
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian's python3 so that Debian-packaged bindings (python3-rbd) stay importable.
PY=/usr/bin/python3
if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv"
    "$PY" -m venv --system-site-packages .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if [ $want_test = 1 ]; then
    # setuptools: the template plugin's test installs a copy without build isolation.
    .venv/bin/python -m pip install -q pytest pytest-timeout build spdk "setuptools>=77"
fi
if [ $want_fuzz = 1 ]; then
    .venv/bin/python -m pip install -q atheris
fi

# What a user types in a clone: the root distribution (vhost-py) depends on vhost_core/ and
# on every plugins/<name>/ but the template, and pip builds each from its own folder.
echo "==> pip install . (vhost-core and the built-in plugins)"
.venv/bin/python -m pip install -q .
echo "==> installed: $(.venv/bin/vhost --list-plugins | awk '{print $1}' | tr '\n' ' ')"

if [ $want_test = 1 ]; then
    # The test guest's kernel and modules: linux-image-amd64's files, extracted into the
    # tests' cache (apt-get download + dpkg-deb -x + depmod, as this user), not installed.
    echo "==> guest kernel: linux-image-amd64, extracted into ${VHOST_TEST_CACHE:-$HOME/.cache/vhost-tests}/kernel"
    if ! .venv/bin/python tests/guest/build_image.py --fetch-kernel >/dev/null; then
        [ $apt_updated = 1 ] && exit 1
        echo "==> apt-get update (for apt-get download), then again"
        $SUDO apt-get update -qq
        .venv/bin/python tests/guest/build_image.py --fetch-kernel >/dev/null
    fi
fi
