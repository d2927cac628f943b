#!/usr/bin/env bash
# Build the native fuzz targets into fuzz/build/ with libFuzzer, ASan and UBSan.
#   fuzz/build.sh              every target
#   fuzz/build.sh vq_walker    one target
# CC (default: clang-14, else clang) must support -fsanitize=fuzzer: on Debian 12
# that is clang-14 plus libclang-rt-14-dev (scripts/install.sh --fuzz installs both).
set -euo pipefail
cd "$(dirname "$0")/.."

CC=${CC:-$(command -v clang-14 || command -v clang || true)}
if [ -z "$CC" ]; then
    echo "fuzz/build.sh: no clang found: run scripts/install.sh --fuzz" >&2
    exit 1
fi

CORE=vhost_core/src/vhost_core
BLK=plugins/dev_blk/src/vhost_dev_blk
SCSI=plugins/dev_scsi/src/vhost_dev_scsi
# -O1 keeps the sanitizers' reports readable; UBSan aborts so that libFuzzer
# keeps the input (a report that recovers would be lost in the log).
CFLAGS=(-g -O1 -std=gnu11 -fno-omit-frame-pointer -Wall -Wno-unused-function
        -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all
        -I"$CORE/include" -I"$CORE/_native" -Ifuzz)

# target: sources (the project's own files, compiled unchanged)
declare -A SOURCES=(
    [vq_walker]="fuzz/vq_walker.c"
    [inflight]="fuzz/inflight.c"
    [blk_req]="fuzz/blk_req.c $BLK/blk.c"
    [scsi_req]="fuzz/scsi_req.c $SCSI/virtio_scsi.c $SCSI/scsi_lun.c"
    [nvme_tcp_rx]="fuzz/nvme_tcp_rx.c"
)
NVME=plugins/bdev_nvme/src/vhost_bdev_nvme
EXTRA_INC=(-I"$BLK" -I"$SCSI" -I"$NVME")

targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(vq_walker inflight blk_req scsi_req nvme_tcp_rx)
mkdir -p fuzz/build
for t in "${targets[@]}"; do
    [ -n "${SOURCES[$t]:-}" ] || { echo "fuzz/build.sh: unknown target $t" >&2; exit 2; }
    # shellcheck disable=SC2086
    "$CC" "${CFLAGS[@]}" "${EXTRA_INC[@]}" ${SOURCES[$t]} -lpthread -o "fuzz/build/$t"
done
