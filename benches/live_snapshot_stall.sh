#!/usr/bin/env bash
# The guest-visible stall of a live 4-disk group snapshot (QMP `transaction` of four
# `blockdev-snapshot-internal-sync` actions) under fio random-write load through NBD:
# `qcow2-tool serve --qmp` against qemu-storage-daemon on the same images, 1 GiB and 16 GiB
# fully allocated (see live_snapshot_stall.py for what is measured).
#
# Usage: benches/live_snapshot_stall.sh     (from anywhere in the repository)
# Environment: ROUNDS (3), RUNTIME (6), SIZES ("1G 16G"), IODEPTH (4), SERVERS ("ours qsd"; also "ours-none", "qsd-none": cache=none),
#              SNAPSHOT ("internal", or "external" for blockdev-snapshot-sync),
#              QCOW2_BENCH_DIR (fixtures; the 16G ones are sparse files).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
dir=${QCOW2_BENCH_DIR:-$root/benches/target/bench-fixtures}/live
for t in fio qemu-storage-daemon qemu-img python3; do
    command -v $t >/dev/null || { echo "$t is missing (qemu-utils, qemu-system-common, fio)" >&2; exit 1; }
done
venv=$root/target/qmp-venv
if ! "$venv/bin/python" -c 'import qemu.qmp' 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q qemu.qmp
fi
echo "building qcow2-tool (release)" >&2
cargo build --release --quiet --manifest-path "$root/Cargo.toml" -p qcow2-tool
exec "$venv/bin/python" "$root/benches/live_snapshot_stall.py" "$root/target/release/qcow2-tool" "$dir"
