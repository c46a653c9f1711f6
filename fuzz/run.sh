#!/usr/bin/env bash
# Run every fuzz target for SECONDS each, then summarise.
#
# Usage: fuzz/run.sh [SECONDS] [TARGET...]      (default: 60 seconds, every target)
#
# Each target runs under libFuzzer's fork mode (one worker) with crashes, timeouts and OOMs
# ignored, so one finding does not end the run: every crashing input lands in
# fuzz/artifacts/TARGET/. Set FUZZ_FORK=0 for the classic mode, which stops at the first crash.
# Logs go to fuzz/logs/TARGET.log. The corpus (fuzz/corpus/TARGET, not committed) is seeded on
# first use by make-corpus.sh when QEMU is installed, and fuzz/regressions/TARGET is always read.
set -euo pipefail

FUZZ=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$FUZZ")
SECONDS_EACH=${1:-60}
shift || true
TARGETS=("$@")
if [[ ${#TARGETS[@]} -eq 0 ]]; then
    TARGETS=(header open_read snapshot_table tables ops transaction journal nbd_server nbd_wire)
fi

# Largest input per target: open_read takes whole images (the seed images are under 256 KiB);
# header needs at most a cluster (QEMU images put everything it reads in the first 64 KiB);
# tables reads at most 4 header bytes + 255 entries + a 4 KiB refblock; ops decodes a 10-byte
# config and at most 64 steps of at most 9 bytes; transaction decodes at most 3 images of 16 bytes,
# 4 actions and 12 bytes of fault and cut; journal takes a real journal of a few KiB.
max_len() {
    case $1 in
        open_read) echo 262144 ;;
        header | snapshot_table) echo 65536 ;;
        tables) echo 6144 ;;
        ops) echo 1024 ;;
        transaction) echo 256 ;;
        journal) echo 16384 ;;
        nbd_server) echo 4096 ;;
        nbd_wire) echo 512 ;;
        *) echo 65536 ;;
    esac
}

if [[ ! -d $FUZZ/corpus/open_read ]] && command -v qemu-img >/dev/null; then
    bash "$FUZZ/make-corpus.sh" || echo "warning: make-corpus.sh failed; fuzzing from the regression seeds only" >&2
fi

# Build every target once, then run the binaries directly: `cargo fuzz run` would rebuild before
# each target and pick up (or trip over) engine edits made while the run is going.
cd "$ROOT"
mkdir -p "$FUZZ/logs"
# No sanitizer by default: the engine is `#![forbid(unsafe_code)]`, so ASan finds nothing the
# Rust checks miss and costs several times the speed. FUZZ_SANITIZER=address brings it back.
SANITIZER=${FUZZ_SANITIZER:-none}
if ! cargo +nightly fuzz build --fuzz-dir "$FUZZ" --sanitizer "$SANITIZER" \
    >"$FUZZ/logs/build.log" 2>&1; then
    tail -40 "$FUZZ/logs/build.log" >&2
    echo "error: cargo fuzz build failed (full log: fuzz/logs/build.log)" >&2
    exit 1
fi
TRIPLE=$(rustc +nightly -vV | sed -n 's/^host: //p')
BIN=$FUZZ/target/$TRIPLE/release

# The transaction targets print their stage counters (QCOW2_FUZZ_STATS) and step over findings
# already listed in regressions/KNOWN_FAILING (QCOW2_FUZZ_TOLERATE_KNOWN), so one known bug does
# not hide the next.
export QCOW2_FUZZ_STATS=1 QCOW2_FUZZ_TOLERATE_KNOWN=1

fork_args=(-fork=1 -ignore_crashes=1 -ignore_timeouts=1 -ignore_ooms=1)
if [[ ${FUZZ_FORK:-1} == 0 ]]; then
    fork_args=()
fi

for target in "${TARGETS[@]}"; do
    mkdir -p "$FUZZ/corpus/$target" "$FUZZ/artifacts/$target"
    seeds=()
    [[ -d $FUZZ/regressions/$target ]] && seeds=("$FUZZ/regressions/$target")
    echo "== $target: ${SECONDS_EACH}s" >&2
    "$BIN/$target" -artifact_prefix="$FUZZ/artifacts/$target/" \
        -max_total_time="$SECONDS_EACH" -rss_limit_mb=2048 -timeout=10 \
        -max_len="$(max_len "$target")" -print_final_stats=1 "${fork_args[@]}" \
        "$FUZZ/corpus/$target" "${seeds[@]}" >"$FUZZ/logs/$target.log" 2>&1 || true
done

echo
printf '%-16s %12s %12s %10s  %s\n' target execs exec/s corpus artifacts
for target in "${TARGETS[@]}"; do
    log=$FUZZ/logs/$target.log
    # Classic mode ends with "stat::number_of_executed_units: N" / "stat::average_exec_per_sec: X"
    # (or a "#N DONE ... exec/s: X" line); fork mode prints "#N: cov: ... exec/s X ..." lines.
    execs=$(grep -oE 'stat::number_of_executed_units: [0-9]+' "$log" | tail -1 | grep -oE '[0-9]+$' || true)
    rate=$(grep -oE 'stat::average_exec_per_sec: [0-9]+' "$log" | tail -1 | grep -oE '[0-9]+$' || true)
    if [[ -z $rate ]]; then
        last=$(grep -E '^#[0-9]+' "$log" | grep -E 'exec/s:? [0-9]+' | tail -1 || true)
        rate=$(grep -oE 'exec/s:? [0-9]+' <<<"$last" | grep -oE '[0-9]+$' || true)
        execs=$(grep -oE '^#[0-9]+' <<<"$last" | tr -d '#' || true)
        # Fork mode's exec/s is the last job's; the whole run's rate is execs over time.
        time=$(grep -oE 'time: [0-9]+s' <<<"$last" | grep -oE '[0-9]+' || true)
        if [[ -n $execs && -n $time && $time -gt 0 ]]; then
            rate=$((execs / time))
        fi
    fi
    corpus=$(find "$FUZZ/corpus/$target" -type f | wc -l)
    counts=""
    for kind in crash timeout oom leak slow-unit; do
        n=$(find "$FUZZ/artifacts/$target" -type f -name "$kind-*" | wc -l)
        ((n > 0)) && counts+="$kind:$n "
    done
    printf '%-16s %12s %12s %10s  %s\n' "$target" "${execs:-?}" "${rate:-?}" "$corpus" "${counts:-none}"
done

# Which stages the transaction targets reached (classic mode only: fork mode drops the workers'
# stderr).
for target in "${TARGETS[@]}"; do
    line=$(grep -E '^txn stats:' "$FUZZ/logs/$target.log" 2>/dev/null | tail -1 || true)
    if [[ -n $line ]]; then
        echo "$target: ${line#txn stats: }"
    fi
done
