#!/usr/bin/env bash
# NBD export speed: `qcow2-tool serve` against `qemu-nbd --cache=writeback` and
# qemu-storage-daemon (cache.direct=off) serving the same 1 GiB qcow2 image over a unix socket.
# fio's nbd engine runs 4K random reads and writes at iodepth 1 and 16 and 64K sequential reads
# and writes; nbdcopy copies the whole export to null:. Servers alternate within each round
# (one at a time: each holds the image's write lock); ROUNDS rounds; the table shows medians.
#
# Usage: benches/nbd_compare.sh     (from anywhere in the repository)
# Environment: ROUNDS (3), RUNTIME (seconds per fio job, 5), QCOW2_BENCH_DIR (fixtures),
#              SERVERS ("ours qemu-nbd qsd"), KEEP_RESULTS=1 keeps the per-run TSV.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-5}
SERVERS=${SERVERS:-"ours qemu-nbd qsd"}
root=$(cd "$(dirname "$0")/.." && pwd)
dir=${QCOW2_BENCH_DIR:-$root/benches/target/bench-fixtures}/nbd
mkdir -p "$dir"
size=$((1 << 30))
for t in fio nbdcopy qemu-nbd qemu-storage-daemon qemu-img qemu-io; do
    command -v $t >/dev/null || { echo "$t is missing (qemu-utils, qemu-system-common, libnbd-bin, fio)" >&2; exit 1; }
done

echo "building qcow2-tool (release)" >&2
cargo build --release --quiet --manifest-path "$root/Cargo.toml" -p qcow2-tool
tool=$root/target/release/qcow2-tool

# Fixture: every cluster allocated (so writes overwrite in place for every server), made once.
if [ ! -f "$dir/pristine.qcow2" ]; then
    echo "making the fixture in $dir" >&2
    qemu-img create -q -f raw "$dir/data.raw" $size
    qemu-io -f raw -c "write -q -P 0x5a 0 $size" "$dir/data.raw"
    qemu-img convert -f raw -O qcow2 -o cluster_size=64k "$dir/data.raw" "$dir/pristine.qcow2.tmp"
    rm -f "$dir/data.raw"
    mv "$dir/pristine.qcow2.tmp" "$dir/pristine.qcow2"
fi
img=$dir/bench.qcow2
cp "$dir/pristine.qcow2" "$img"
sock=$dir/nbd.sock
pidf=$dir/server.pid

# start SERVER: serves $img on $sock; sets $uri and $server_pid.
start() {
    rm -f "$pidf" "$sock"
    case $1 in
        ours)
            "$tool" serve -t -e 0 -k "$sock" --pid-file "$pidf" "$img" &
            uri="nbd+unix:///?socket=$sock" ;;
        qemu-nbd)
            qemu-nbd -t -e 0 --cache=writeback -f qcow2 -k "$sock" --pid-file "$pidf" "$img" &
            uri="nbd+unix:///?socket=$sock" ;;
        qsd)
            qemu-storage-daemon \
                --blockdev driver=file,filename="$img",node-name=f,cache.direct=off \
                --blockdev driver=qcow2,file=f,node-name=n \
                --nbd-server addr.type=unix,addr.path="$sock" \
                --export type=nbd,id=e0,node-name=n,writable=on \
                --pidfile "$pidf" &
            uri="nbd+unix:///n?socket=$sock" ;;
    esac
    server_pid=$!
    for _ in $(seq 500); do
        [ -f "$pidf" ] && [ -S "$sock" ] && return 0
        sleep 0.02
    done
    echo "$1 did not start" >&2
    exit 1
}

stop() {
    kill -TERM "$server_pid"
    wait "$server_pid" 2>/dev/null || true
}

# workload name | fio arguments | what to report
workloads=(
    "4k-randread-qd1|--rw=randread --bs=4k --iodepth=1|iops"
    "4k-randread-qd16|--rw=randread --bs=4k --iodepth=16|iops"
    "4k-randwrite-qd1|--rw=randwrite --bs=4k --iodepth=1|iops"
    "4k-randwrite-qd16|--rw=randwrite --bs=4k --iodepth=16|iops"
    "64k-seqread-qd4|--rw=read --bs=64k --iodepth=4|mbs"
    "64k-seqwrite-qd4|--rw=write --bs=64k --iodepth=4|mbs"
)

results=$(mktemp)
trap 'rm -f "$results"; [ -n "${server_pid:-}" ] && kill "$server_pid" 2>/dev/null || true' EXIT

# fio_one NAME ARGS KIND: one fio job against $uri, appends "server name value" to $results.
fio_one() {
    local json value
    # shellcheck disable=SC2086
    json=$(fio --name=b --ioengine=nbd --uri="$uri" --size=$size $2 \
        --time_based --runtime="$RUNTIME" --ramp_time=1 --output-format=json)
    value=$(python3 -c '
import json, sys
text = sys.stdin.read()
# the nbd engine prints a line before the JSON document
j = json.loads(text[text.index("{"):])["jobs"][0]
side = j["read"] if j["read"]["io_bytes"] > 0 else j["write"]
print(round(side["iops"]) if sys.argv[1] == "iops" else round(side["bw_bytes"] / 1e6, 1))
' "$3" <<<"$json")
    printf '%s\t%s\t%s\n' "$server" "$1" "$value" >>"$results"
}

for round in $(seq "$ROUNDS"); do
    # Alternate the order: each round starts with a different server.
    order=($SERVERS)
    n=${#order[@]}
    shift_by=$(( (round - 1) % n ))
    order=("${order[@]:shift_by}" "${order[@]:0:shift_by}")
    for server in "${order[@]}"; do
        echo "round $round: $server" >&2
        start "$server"
        for w in "${workloads[@]}"; do
            IFS='|' read -r name args kind <<<"$w"
            fio_one "$name" "$args" "$kind"
        done
        t0=$(date +%s.%N)
        nbdcopy "$uri" null:
        t1=$(date +%s.%N)
        mbs=$(python3 -c "print(round($size / ($t1 - $t0) / 1e6, 1))")
        printf '%s\t%s\t%s\n' "$server" "nbdcopy-to-null" "$mbs" >>"$results"
        stop
    done
done

if [ "${KEEP_RESULTS:-}" = 1 ]; then
    cp "$results" "$dir/results-$(date +%Y%m%d-%H%M%S).tsv"
fi

python3 - "$results" "$SERVERS" <<'EOF'
import statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
servers = sys.argv[2].split()
names = []
vals = {}
for s, n, v in rows:
    if n not in names:
        names.append(n)
    vals.setdefault((s, n), []).append(float(v))
med = {k: statistics.median(v) for k, v in vals.items()}
unit = lambda n: "IOPS" if n.startswith("4k") else "MB/s"
head = "| workload | unit | " + " | ".join(servers) + " | ours / qemu-nbd |"
print(head)
print("|" + "---|" * (len(servers) + 3))
for n in names:
    cells = [f"{med.get((s, n), float('nan')):.0f}" if unit(n) == "IOPS" else f"{med.get((s, n), float('nan')):.1f}" for s in servers]
    ratio = ""
    if ("ours", n) in med and ("qemu-nbd", n) in med and med[("qemu-nbd", n)] > 0:
        ratio = f"{med[('ours', n)] / med[('qemu-nbd', n)]:.2f}x"
    print(f"| {n} | {unit(n)} | " + " | ".join(cells) + f" | {ratio} |")
EOF
