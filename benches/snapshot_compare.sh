#!/usr/bin/env bash
# Whole-process snapshot timings, side by side with qemu-img, alternating, medians:
#   1. `snapshot -c` on a 64 GiB image whose every cluster is allocated
#      (qemu-img create -o preallocation=metadata: a sparse ~11 MB file, 1M clusters);
#   2. a 4-image group snapshot (`qcow2-tool transaction`) against one image's
#      `qcow2-tool snapshot -c` and one `qemu-img snapshot -c`, on fully written images.
# Usage: benches/snapshot_compare.sh            (ROUNDS=9 SIZE=1G DIR=... to change)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
rounds=${ROUNDS:-9}
size=${SIZE:-1G}
dir=${DIR:-$root/target/snapshot-compare}
tool=$root/target/release/qcow2-tool

(cd "$root" && cargo build --release -q -p qcow2-tool)
mkdir -p "$dir"
cd "$dir"

now_ns() { date +%s%N; }
median() { sort -n | awk '{ a[NR] = $1 } END { printf "%.1f", a[int((NR + 1) / 2)] / 1e6 }'; }

# 1. snapshot -c on 1M allocated clusters, each run on a fresh sparse copy.
[ -f big.qcow2 ] || qemu-img create -q -f qcow2 -o preallocation=metadata big.qcow2 64G
: > big-ours.ns
: > big-qemu.ns
for r in $(seq "$rounds"); do
    cp --sparse=always big.qcow2 a.qcow2
    cp --sparse=always big.qcow2 q.qcow2
    sync
    t0=$(now_ns); "$tool" snapshot -c s a.qcow2
    t1=$(now_ns); qemu-img snapshot -c s q.qcow2
    t2=$(now_ns)
    echo $((t1 - t0)) >> big-ours.ns
    echo $((t2 - t1)) >> big-qemu.ns
done
qemu-img check -q a.qcow2
ours=$(median < big-ours.ns)
qemu=$(median < big-qemu.ns)
echo "snapshot -c, 64 GiB all allocated: qcow2-tool $ours ms, qemu-img $qemu ms" \
    "($(awk "BEGIN { printf \"%.1f\", $qemu / $ours }")x)"

# 2. Group snapshot of 4 images against one image, fresh images each time this script runs.
for n in 0 1 2 3 4 5; do
    rm -f "d$n.qcow2"
    qemu-img create -q -f qcow2 "d$n.qcow2" "$size"
    qemu-io -c "write -P 0x5a 0 $size" "d$n.qcow2" > /dev/null
done
rm -rf group
sync
: > group.ns
: > single.ns
: > qemu.ns
for r in $(seq "$rounds"); do
    name="round-$r"
    {
        printf '{"group": "group", "actions": ['
        for n in 0 1 2 3; do
            [ "$n" = 0 ] || printf ','
            printf '{"type": "blockdev-snapshot-internal-sync", "data": {"image": "d%s.qcow2", "name": "%s"}}' "$n" "$name"
        done
        printf ']}\n'
    } > plan.json
    t0=$(now_ns); "$tool" transaction plan.json > /dev/null
    t1=$(now_ns); "$tool" snapshot -c "$name" d4.qcow2
    t2=$(now_ns); qemu-img snapshot -c "$name" d5.qcow2
    t3=$(now_ns)
    echo $((t1 - t0)) >> group.ns
    echo $((t2 - t1)) >> single.ns
    echo $((t3 - t2)) >> qemu.ns
done
for n in 0 1 2 3 4; do qemu-img check -q "d$n.qcow2"; done
group=$(median < group.ns)
single=$(median < single.ns)
qemu=$(median < qemu.ns)
echo "group snapshot of 4 x $size: $group ms; one image: qcow2-tool $single ms" \
    "($(awk "BEGIN { printf \"%.2f\", $group / $single }")x), qemu-img $qemu ms"
