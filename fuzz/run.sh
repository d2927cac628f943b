#!/usr/bin/env bash
# Replay every committed input of each fuzz target, then fuzz it for a while.
#   fuzz/run.sh                     all targets, FUZZ_SECONDS (default 10) each
#   fuzz/run.sh -t 600 scsi_req     one target, ten minutes
#   fuzz/run.sh -t 0                replay only
# Fails when an input crashes or breaks an oracle; a new crashing input lands in
# fuzz/build/crashes/<target>/ (see fuzz/README.md: how it becomes a regression).
# Builds the native targets first (fuzz/build.sh); expects clang and atheris
# (scripts/install.sh --fuzz).  One process per target, FUZZ_JOBS (default: one per
# core) targets at a time.
set -uo pipefail
cd "$(dirname "$0")/.."

seconds=${FUZZ_SECONDS:-10}
if [ "${1:-}" = "-t" ]; then seconds=$2; shift 2; fi
ALL=(vq_walker inflight blk_req scsi_req nvme_tcp_rx msg_layer)
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=("${ALL[@]}")

PY=${PYTHON:-.venv/bin/python}
native=()
for t in "${targets[@]}"; do [ "$t" != msg_layer ] && native+=("$t"); done
if [ ${#native[@]} -gt 0 ]; then
    fuzz/build.sh "${native[@]}" || exit 1
fi

# Longest input each target reads (the ring targets' guest memory image is 64 KiB).
declare -A MAX_LEN=([vq_walker]=66000 [inflight]=74000 [blk_req]=65536 [scsi_req]=16384 [nvme_tcp_rx]=16384 [msg_layer]=8192)

# One target: replay, then fuzz; its report line goes to fuzz/build/<target>.result.
fuzz_one() {
    local t=$1 cmd work crashes log opts regressions run start rc took runs speed cov
    if [ "$t" = msg_layer ]; then cmd=("$PY" fuzz/msg_layer.py); else cmd=("fuzz/build/$t"); fi
    work=fuzz/build/corpus/$t crashes=fuzz/build/crashes/$t log=fuzz/build/$t.log
    mkdir -p "$work" "$crashes" "fuzz/regressions/$t"
    opts=(-max_len="${MAX_LEN[$t]}" -timeout=10 -rss_limit_mb=2048 -artifact_prefix="$crashes/"
          -print_final_stats=1)

    # Replay first: a committed crash that comes back is a regression, said as such.
    regressions=(fuzz/regressions/"$t"/*)
    if [ -e "${regressions[0]}" ]; then
        if ! "${cmd[@]}" "${opts[@]}" -runs=0 "${regressions[@]}" >"$log" 2>&1; then
            { echo "FAIL $t: a committed regression input crashes again:"
              grep -E "oracle failed|ERROR: |SUMMARY: |Running: " "$log" | tail -5; } >"fuzz/build/$t.result"
            return 1
        fi
    fi
    # The working corpus comes first: libFuzzer adds what it finds there, not to
    # the committed seeds.  The committed corpus runs in full before any mutation.
    if [ "$seconds" -gt 0 ]; then run=(-max_total_time="$seconds"); else run=(-runs=0); fi
    start=$(date +%s)
    "${cmd[@]}" "${opts[@]}" "${run[@]}" "$work" "fuzz/corpus/$t" >"$log" 2>&1
    rc=$?
    took=$(( $(date +%s) - start ))
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    cov=$(grep -oE '(DONE|INITED) +cov: [0-9]+ ft: [0-9]+' "$log" | tail -1 | sed -E 's/(DONE|INITED) +//')
    if [ $rc -ne 0 ]; then
        { echo "FAIL $t after ${took}s: $(grep -hE 'oracle failed|ERROR: |SUMMARY: ' "$log" | head -2 | tr '\n' ' ')"
          echo "     input: $(ls -t "$crashes" | head -1 | sed "s|^|$crashes/|")  (log: $log)"; } >"fuzz/build/$t.result"
        return 1
    fi
    echo "ok   $t: ${took}s, ${runs:-?} runs, ${speed:-?} exec/s, ${cov:-?}, corpus $(ls "$work" | wc -l)+$(ls "fuzz/corpus/$t" | wc -l)" >"fuzz/build/$t.result"
}

for t in "${targets[@]}"; do
    [ -n "${MAX_LEN[$t]:-}" ] || { echo "fuzz/run.sh: unknown target $t" >&2; exit 2; }
done
# Targets are independent single-threaded processes: FUZZ_JOBS (default: one per core) at once.
jobs=${FUZZ_JOBS:-$(nproc)}
declare -A pid_of=()
for t in "${targets[@]}"; do
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n; done
    rm -f "fuzz/build/$t.result"
    fuzz_one "$t" &
    pid_of[$t]=$!
done
failed=()
for t in "${targets[@]}"; do
    wait "${pid_of[$t]}" || failed+=("$t")
    cat "fuzz/build/$t.result" 2>/dev/null || echo "FAIL $t: no report (fuzz/build/$t.log)"
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz: ${#failed[@]} of ${#targets[@]} targets failed: ${failed[*]}"
    exit 1
fi
