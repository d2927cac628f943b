#!/usr/bin/env bash
# Line coverage of the project's sources reached by a native target's corpora
# (committed + fuzz/build/corpus), e.g. to see which CDBs a change left unfuzzed.
#   fuzz/coverage.sh scsi_req            summary per source file
#   fuzz/coverage.sh scsi_req --show     ... and the annotated source
set -euo pipefail
cd "$(dirname "$0")/.."
t=${1:?target}
shift
CC=${CC:-$(command -v clang-14 || command -v clang)}
LLVM_BIN=$(dirname "$(readlink -f "$CC")")
out=fuzz/build/cov-$t
mkdir -p "$out"
# Same sources as fuzz/build.sh, without the sanitizers: coverage counters only.
eval "$(sed -n '/^declare -A SOURCES/,/^)/p' fuzz/build.sh | sed 's/\$BLK/plugins\/dev_blk\/src\/vhost_dev_blk/; s/\$SCSI/plugins\/dev_scsi\/src\/vhost_dev_scsi/g')"
# shellcheck disable=SC2086
"$CC" -g -O0 -std=gnu11 -w -fsanitize=fuzzer -fprofile-instr-generate -fcoverage-mapping \
    -Ivhost_core/src/vhost_core/include -Ivhost_core/src/vhost_core/_native -Ifuzz \
    -Iplugins/dev_blk/src/vhost_dev_blk -Iplugins/dev_scsi/src/vhost_dev_scsi \
    ${SOURCES[$t]} -lpthread -o "$out/$t"
mkdir -p "fuzz/build/corpus/$t"
LLVM_PROFILE_FILE="$out/$t.profraw" "$out/$t" -runs=0 "fuzz/build/corpus/$t" "fuzz/corpus/$t" \
    fuzz/regressions/"$t" >"$out/run.log" 2>&1
"$LLVM_BIN/llvm-profdata" merge -o "$out/$t.profdata" "$out/$t.profraw"
srcs=(vhost_core/src/vhost_core/_native/core.c plugins/dev_blk/src/vhost_dev_blk/blk.c
      plugins/dev_scsi/src/vhost_dev_scsi/virtio_scsi.c plugins/dev_scsi/src/vhost_dev_scsi/scsi_lun.c)
"$LLVM_BIN/llvm-cov" report "$out/$t" -instr-profile="$out/$t.profdata" "${srcs[@]}" 2>/dev/null
if [ "${1:-}" = "--show" ]; then
    "$LLVM_BIN/llvm-cov" show "$out/$t" -instr-profile="$out/$t.profdata" "${srcs[@]}" 2>/dev/null
fi
