#!/usr/bin/env bash
# `qcow2-tool convert` against `qemu-img convert`, whole processes, in every direction (issue 16):
# raw→qcow2, qcow2→raw, qcow2→qcow2 into new files and into existing targets (`-n`, the target
# created just before), and compressed (`-c`) qcow2→qcow2. The two tools alternate (which one
# goes first swaps every round), every run writes a fresh target, the sources are read once
# before the first round so both tools find them in the page cache, and `sync` runs before each
# timed command so neither inherits the other's write-back. Both tools get the same `-t` mode
# (writeback: the output is synced before the command ends). Medians of ROUNDS; every output is
# checked with `qemu-img compare` against the source.
#
# The source is SIZE (1G) of mixed content, per 8 MiB: 3 MiB of random bytes, 1 MiB of zeros
# (written zeros in the raw source, zero clusters in the qcow2 one), 2 MiB of 64 KiB pieces of
# compressible text with 64 KiB holes between them, then a 2 MiB hole: half data.
#
# Usage: benches/convert_compare.sh     (ROUNDS=5 SIZE=1G CACHE=writeback|unsafe DIR=...
#                                        CASES="raw-qcow2 ..." to change)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
rounds=${ROUNDS:-5}
size=${SIZE:-1G}
cache=${CACHE:-writeback}
dir=${DIR:-$root/target/convert-compare}
tool=$root/target/release/qcow2-tool
cases=${CASES:-"raw-qcow2 qcow2-raw qcow2-qcow2 raw-qcow2-n qcow2-raw-n qcow2-qcow2-n qcow2-qcow2-c"}

(cd "$root" && cargo build --release -q -p qcow2-tool)
mkdir -p "$dir"
cd "$dir"

bytes=$(numfmt --from=iec "$size")
if [ ! -f "src-$size.raw" ] || [ ! -f "src-$size.qcow2" ]; then
    python3 - "$bytes" "src-$size.raw" <<'EOF'
import base64, os, random, sys
size, path = int(sys.argv[1]), sys.argv[2]
MiB = 1 << 20
rng = random.Random(16)
fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
os.ftruncate(fd, size)
for seg in range(0, size, 8 * MiB):
    os.pwrite(fd, rng.randbytes(3 * MiB), seg)
    os.pwrite(fd, bytes(MiB), seg + 3 * MiB)
    for piece in range(0, 2 * MiB, 128 * 1024):
        text = base64.b64encode(rng.randbytes(48 * 1024))
        os.pwrite(fd, text, seg + 4 * MiB + piece)
os.close(fd)
EOF
    qemu-img convert -f raw -O qcow2 "src-$size.raw" "src-$size.qcow2.tmp"
    zeros=()
    for ((seg = 0; seg < bytes; seg += 8 << 20)); do
        zeros+=(-c "write -z $((seg + (3 << 20))) 1M")
    done
    qemu-io -f qcow2 "${zeros[@]}" "src-$size.qcow2.tmp" > /dev/null
    mv "src-$size.qcow2.tmp" "src-$size.qcow2"
fi
# Both tools read the sources from the page cache.
cat "src-$size.raw" "src-$size.qcow2" > /dev/null

now_ns() { date +%s%N; }
median() { sort -n | awk '{ a[NR] = $1 } END { printf "%.3f", a[int((NR + 1) / 2)] / 1e9 }'; }

# case -> source format, output format, extra convert flags, whether the target exists
describe() {
    case $1 in
        raw-qcow2) echo "raw qcow2 - new" ;;
        qcow2-raw) echo "qcow2 raw - new" ;;
        qcow2-qcow2) echo "qcow2 qcow2 - new" ;;
        raw-qcow2-n) echo "raw qcow2 - existing" ;;
        qcow2-raw-n) echo "qcow2 raw - existing" ;;
        qcow2-qcow2-n) echo "qcow2 qcow2 - existing" ;;
        qcow2-qcow2-c) echo "qcow2 qcow2 -c new" ;;
        *) echo "unknown case $1" >&2; exit 1 ;;
    esac
}

# run TOOL CASE OUT: one timed conversion into a fresh OUT; prints nanoseconds.
run() {
    local who=$1 name=$2 out=$3 src_fmt out_fmt flag target
    read -r src_fmt out_fmt flag target < <(describe "$name")
    rm -f "$out"
    local args=(convert -f "$src_fmt" -O "$out_fmt" -t "$cache")
    [ "$flag" = - ] || args+=("$flag")
    if [ "$target" = existing ]; then
        qemu-img create -q -f "$out_fmt" "$out" "$size"
        args+=(-n)
    fi
    args+=("src-$size.$src_fmt" "$out")
    sync
    local t0 t1
    if [ "$who" = ours ]; then
        t0=$(now_ns); "$tool" "${args[@]}"; t1=$(now_ns)
    else
        t0=$(now_ns); qemu-img "${args[@]}"; t1=$(now_ns)
    fi
    echo $((t1 - t0))
}

echo "load before: $(uptime)"
results=()
for name in $cases; do
    read -r src_fmt out_fmt flag target < <(describe "$name")
    : > "$name.ours.ns"
    : > "$name.qemu.ns"
    for r in $(seq "$rounds"); do
        if [ $((r % 2)) = 1 ]; then order="ours qemu"; else order="qemu ours"; fi
        for who in $order; do
            run "$who" "$name" "out-$who.$out_fmt" >> "$name.$who.ns"
        done
    done
    for who in ours qemu; do
        if ! qemu-img compare -q -f "$src_fmt" -F "$out_fmt" "src-$size.$src_fmt" "out-$who.$out_fmt"; then
            echo "$name: the $who output differs from the source" >&2
            exit 1
        fi
    done
    ours=$(median < "$name.ours.ns")
    qemu=$(median < "$name.qemu.ns")
    shown=$([ "$flag" = - ] && echo "" || echo "$flag")
    [ "$target" = existing ] && shown="-n $shown"
    results+=("$(printf '| %s→%s | %s | %s | %s s | %s s | %.2f |' "$src_fmt" "$out_fmt" \
        "$target" "$shown" "$ours" "$qemu" "$(awk "BEGIN { print $ours / $qemu }")")")
    echo "${results[-1]}"
done
echo "load after: $(uptime)"
echo
echo "ROUNDS=$rounds SIZE=$size CACHE=$cache, medians, outputs compared equal to the source"
echo "| direction | target | flags | qcow2-tool | qemu-img | ours / qemu-img |"
echo "|---|---|---|---|---|---|"
printf '%s\n' "${results[@]}"
