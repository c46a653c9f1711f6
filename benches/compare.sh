#!/usr/bin/env bash
# Side-by-side: `qcow2-tool bench` and `qemu-img bench` (threads, and io_uring when it works here)
# on the same image copies with the same parameters, alternating, ROUNDS rounds, plus raw-file
# baselines (`qcow2-tool bench -f raw`, i.e. pread/pwrite, and `qemu-img bench -f raw`). Prints
# a table of medians: MB/s, each as % of the raw file, and ours / qemu-img.
#
# Usage: benches/compare.sh            (from anywhere in the repository)
# Environment: ROUNDS (3), DEPTHS ("1 64"), QCOW2_BENCH_DIR (fixtures; benches/target/...),
#              KEEP_RESULTS=1 keeps the per-run TSV next to the fixtures.
#
# Fixtures are made the same way every time: a 1 GiB raw file filled with one pattern by one
# sequential qemu-io write, converted by qemu-img to qcow2 (64 KiB clusters, data contiguous in
# guest order). Allocating writes go into a host file whose every byte was written before: each
# run first puts a freshly created image's metadata back over its head (dd conv=notrunc), so both
# tools allocate into free but already written clusters and neither measures the host's page
# allocator (see issue 7's measurement pitfalls).
set -euo pipefail

ROUNDS=${ROUNDS:-3}
DEPTHS=${DEPTHS:-"1 64"}
root=$(cd "$(dirname "$0")/.." && pwd)
dir=${QCOW2_BENCH_DIR:-$root/benches/target/bench-fixtures}/compare
mkdir -p "$dir"
size=$((1 << 30))

echo "building qcow2-tool (release)" >&2
cargo build --release --quiet --manifest-path "$root/Cargo.toml" -p qcow2-tool
tool=$root/target/release/qcow2-tool

# --- fixtures (made once, reused; the recipe is fixed) ---
if [ ! -f "$dir/data.raw" ]; then
    echo "making fixtures in $dir" >&2
    qemu-img create -q -f raw "$dir/data.raw.tmp" $size
    qemu-io -f raw -c "write -q -P 0x5a 0 $size" "$dir/data.raw.tmp"
    mv "$dir/data.raw.tmp" "$dir/data.raw"
fi
if [ ! -f "$dir/pristine.qcow2" ]; then
    qemu-img convert -f raw -O qcow2 -o cluster_size=64k "$dir/data.raw" "$dir/pristine.qcow2.tmp"
    mv "$dir/pristine.qcow2.tmp" "$dir/pristine.qcow2"
fi
if [ ! -f "$dir/fresh.qcow2" ]; then
    qemu-img create -q -f qcow2 -o cluster_size=64k "$dir/fresh.qcow2.tmp" $size
    mv "$dir/fresh.qcow2.tmp" "$dir/fresh.qcow2"
fi
# Write targets: one copy per tool, made afresh each script run (overwrites change bytes only).
for t in ours qemu; do
    cp "$dir/pristine.qcow2" "$dir/over-$t.qcow2"
    cp "$dir/data.raw" "$dir/over-$t.raw"
    # Allocation target: written to its full length, then reset before every run.
    cp "$dir/pristine.qcow2" "$dir/alloc-$t.qcow2"
done
reset_alloc() {
    dd if="$dir/fresh.qcow2" of="$1" conv=notrunc status=none
}

# io_uring works with this qemu-img and kernel?
aios="threads"
if qemu-img bench -q -c 16 -i io_uring -f raw "$dir/data.raw" >/dev/null 2>&1; then
    aios="threads io_uring"
else
    echo "qemu-img bench -i io_uring does not work here; threads only" >&2
fi

# --- workloads: name, bench arguments, request count (bytes = count * size) ---
# The strided 4K step (257 * 4 KiB) visits a different cluster and L2 entry every request and
# wraps at 1 GiB without ever running past the end: qemu-img bench has no random mode.
stride=$((257 * 4096))
workloads=(
    "seq-64k-read|-s 64k|32768|65536|read"
    "strided-4k-read|-s 4k -S $stride|50000|4096|read"
    "seq-64k-overwrite|-w -s 64k|16384|65536|over"
    "strided-4k-overwrite|-w -s 4k -S $stride|50000|4096|over"
    "seq-64k-alloc-write|-w -s 64k|16384|65536|alloc"
)

results=$(mktemp)
trap 'rm -f "$results"' EXIT

# run TOOL_LABEL WORKLOAD DEPTH ROUND BYTES -- command...
run() {
    local label=$1 name=$2 depth=$3 round=$4 bytes=$5
    shift 6
    local out secs rc=0
    out=$("$@" 2>&1) || rc=$?
    if [ "$rc" != 0 ]; then
        echo "FAILED (exit $rc; the median uses the other rounds): $*" >&2
        echo "$out" >&2
        return 0
    fi
    secs=$(sed -n 's/^Run completed in \([0-9.]*\) seconds\./\1/p' <<<"$out")
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$name" "$depth" "$label" "$secs" "$bytes" >>"$results"
}

for round in $(seq "$ROUNDS"); do
    echo "round $round/$ROUNDS" >&2
    for w in "${workloads[@]}"; do
        IFS='|' read -r name args count reqsize kind <<<"$w"
        bytes=$((count * reqsize))
        for depth in $DEPTHS; do
            # shellcheck disable=SC2086 # $args is a word list on purpose
            common=(-c "$count" -d "$depth" $args)
            case $kind in
                read)
                    q_ours=$dir/pristine.qcow2 q_qemu=$dir/pristine.qcow2
                    r_ours=$dir/data.raw r_qemu=$dir/data.raw ;;
                over)
                    q_ours=$dir/over-ours.qcow2 q_qemu=$dir/over-qemu.qcow2
                    r_ours=$dir/over-ours.raw r_qemu=$dir/over-qemu.raw ;;
                alloc)
                    q_ours=$dir/alloc-ours.qcow2 q_qemu=$dir/alloc-qemu.qcow2
                    r_ours=$dir/over-ours.raw r_qemu=$dir/over-qemu.raw ;;
            esac
            # Alternate: ours, qemu (each aio), raw baselines; allocation targets reset first.
            [ "$kind" = alloc ] && reset_alloc "$q_ours"
            run qcow2-tool "$name" "$depth" "$round" "$bytes" -- \
                "$tool" bench -q -f qcow2 "${common[@]}" "$q_ours"
            for aio in $aios; do
                [ "$kind" = alloc ] && reset_alloc "$q_qemu"
                run "qemu-$aio" "$name" "$depth" "$round" "$bytes" -- \
                    qemu-img bench -f qcow2 -i "$aio" "${common[@]}" "$q_qemu"
            done
            run raw-pread "$name" "$depth" "$round" "$bytes" -- \
                "$tool" bench -q -f raw "${common[@]}" "$r_ours"
            run qemu-raw-threads "$name" "$depth" "$round" "$bytes" -- \
                qemu-img bench -f raw -i threads "${common[@]}" "$r_qemu"
        done
    done
done

if [ "${KEEP_RESULTS:-0}" = 1 ]; then
    cp "$results" "$dir/results.tsv"
fi

echo
echo "machine: $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p' | head -1); $(qemu-img --version | head -1)"
echo "medians of $ROUNDS rounds; MB/s = 10^6 bytes/s; % = of raw-pread (qcow2-tool bench -f raw) at the same depth"
python3 - "$results" "$aios" <<'EOF'
import statistics, sys
from collections import defaultdict
path, aios = sys.argv[1], sys.argv[2].split()
runs = defaultdict(list)
order = []
for line in open(path):
    rnd, name, depth, label, secs, nbytes = line.rstrip("\n").split("\t")
    if not secs:
        continue
    key = (name, int(depth))
    if key not in order:
        order.append(key)
    runs[key + (label,)].append(int(nbytes) / max(float(secs), 1e-6) / 1e6)
labels = ["raw-pread", "qcow2-tool"] + [f"qemu-{a}" for a in aios] + ["qemu-raw-threads"]
def med(key, label):
    v = runs.get(key + (label,))
    return statistics.median(v) if v else None
head = ["workload", "QD"] + labels + ["ours/qemu-" + a for a in aios]
rows = [head]
for key in order:
    raw = med(key, "raw-pread")
    row = [key[0], str(key[1])]
    for label in labels:
        m = med(key, label)
        if m is None:
            row.append("-")
        elif label == "raw-pread" or not raw:
            row.append(f"{m:.0f}")
        else:
            row.append(f"{m:.0f} ({100 * m / raw:.0f}%)")
    ours = med(key, "qcow2-tool")
    for a in aios:
        q = med(key, f"qemu-{a}")
        row.append(f"{ours / q:.2f}x" if ours and q else "-")
    rows.append(row)
widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
for i, r in enumerate(rows):
    print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
    if i == 0:
        print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
EOF
