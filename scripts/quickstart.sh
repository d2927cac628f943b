#!/usr/bin/env bash
# Quick start: install everything, then run the target with its embedded default
# (a 64 MiB malloc disk behind vhost-blk controller vhost.0, socket in /var/tmp).
# It prints the QEMU command line to use.  Extra arguments go to `vhost`
# (e.g. --interrupt-mode on a shared machine, -m 0x3 for two reactors).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
exec .venv/bin/vhost -S /var/tmp --default-config "$@"
