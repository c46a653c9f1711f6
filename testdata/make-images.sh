#!/usr/bin/env bash
# Generate the qcow2 fixture matrix with real qemu-img / qemu-io.
#
# Usage: make-images.sh OUTDIR
#
# Writes the images into OUTDIR plus OUTDIR/manifest.tsv, one line per image:
#   name <TAB> relative_path <TAB> snapshot names (comma separated, or -) <TAB> notes
#
# The notes column is "key=value key=value ...; free text". Keys used:
#   cluster=BYTES rcbits=N compat=0.10|1.1 vsize=BYTES   (checked against qemu-img info)
#   check=N          expected `qemu-img check` exit code (default 0)
#   extl2=on         extended L2 entries
#   compression=zlib|zstd
#   backing=FILE     (relative) backing file name recorded in the header
#   data_file=FILE   external data file name recorded in the header
#   deps=a,b         other files in OUTDIR the image needs (backing chain, data file)
#   feature_table=yes|no  whether QEMU wrote a feature name table extension
#   no_convert       do not call qemu_convert_raw on it (4 TiB virtual size)
#
# Everything is deterministic except QEMU's own timestamps (snapshot dates) and
# whatever the installed QEMU version decides about layout.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUTDIR" >&2
    exit 64
fi

command -v qemu-img >/dev/null || { echo "qemu-img not found: install qemu-utils" >&2; exit 69; }
command -v qemu-io >/dev/null || { echo "qemu-io not found: install qemu-utils" >&2; exit 69; }
command -v python3 >/dev/null || { echo "python3 not found" >&2; exit 69; }

OUT=$1
mkdir -p "$OUT"
cd "$OUT"
ulimit -c 0

MANIFEST=manifest.tsv.partial
: >"$MANIFEST"

KiB=1024
MiB=$((1024 * 1024))

# add NAME PATH SNAPSHOTS NOTES
add() {
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$MANIFEST"
}

# create FILE SIZE OPTIONS...   (qcow2, quiet)
create() {
    local f=$1 size=$2
    shift 2
    local opts
    opts=$(IFS=,; echo "$*")
    if [[ -n $opts ]]; then
        qemu-img create -q -f qcow2 -o "$opts" "$f" "$size"
    else
        qemu-img create -q -f qcow2 "$f" "$size"
    fi
}

# io FILE CMD...   run several qemu-io commands in one open of a qcow2 image
io() {
    local f=$1
    shift
    local args=() c
    for c in "$@"; do args+=(-c "$c"); done
    qemu-io -f qcow2 "${args[@]}" "$f" >/dev/null
}

# io_raw FILE CMD...
io_raw() {
    local f=$1
    shift
    local args=() c
    for c in "$@"; do args+=(-c "$c"); done
    qemu-io -f raw "${args[@]}" "$f" >/dev/null
}

# prand SEED LEN > file : deterministic pseudo-random bytes
prand() {
    python3 -c 'import random,sys; sys.stdout.buffer.write(random.Random(int(sys.argv[1])).randbytes(int(sys.argv[2])))' "$1" "$2"
}

# put_prand FILE FORMAT SEED OFFSET LEN : write pseudo-random bytes into an image via qemu-io
# (qemu-io cannot read a file, so go through a raw temp file + qemu-img dd is awkward;
# instead write into a raw image with dd, which is what callers use this for.)
put_prand_raw() {
    local f=$1 seed=$2 off=$3 len=$4
    prand "$seed" "$len" | dd of="$f" bs=4096 seek="$off" oflag=seek_bytes conv=notrunc status=none
}

# A generic mixed workload scaled to the cluster size CS on an image of size VS.
# Leaves: normal data, partial clusters, zero clusters (-z and -z -u), discarded
# clusters, and data in the last (possibly partial) cluster.
workload() {
    local f=$1 cs=$2 vs=$3
    local last=$((vs - 4096))
    io "$f" \
        "write -P 0x11 0 $((3 * cs))" \
        "write -P 0x22 $((cs / 2)) $((cs / 4 + 7))" \
        "write -P 0x33 $((4 * cs + 512)) 1000" \
        "write -P 0x44 $((6 * cs)) $((2 * cs))" \
        "write -z $((6 * cs)) $cs" \
        "write -P 0x55 $((9 * cs)) $((2 * cs))" \
        "write -z -u $((10 * cs)) $cs" \
        "write -P 0x66 $((12 * cs)) $((3 * cs))" \
        "discard $((13 * cs)) $cs" \
        "write -P 0x77 $((vs / 2 + 333)) 5000" \
        "write -P 0x88 $((vs / 2 + 3 * cs)) $cs" \
        "write -z $((vs / 2 + 3 * cs + 512)) 1024" \
        "write -P 0x99 $last 4096" \
        "write -P 0x9a $((vs - 1)) 1"
}

###############################################################################
# Cluster size matrix (v3, refcount_bits 16)
###############################################################################
create c512.qcow2 $((4 * MiB)) cluster_size=512
workload c512.qcow2 512 $((4 * MiB))
add c512 c512.qcow2 - "cluster=512 rcbits=16 compat=1.1 vsize=$((4 * MiB)) feature_table=no; 512 B clusters, mixed data/zero/discard workload"

create c4k.qcow2 $((8 * MiB)) cluster_size=4096
workload c4k.qcow2 4096 $((8 * MiB))
add c4k c4k.qcow2 - "cluster=4096 rcbits=16 compat=1.1 vsize=$((8 * MiB)) feature_table=no; 4 KiB clusters (v3, QEMU writes no feature table), mixed workload"

create c64k.qcow2 $((16 * MiB)) cluster_size=65536
workload c64k.qcow2 65536 $((16 * MiB))
add c64k c64k.qcow2 - "cluster=65536 rcbits=16 compat=1.1 vsize=$((16 * MiB)) feature_table=yes; 64 KiB clusters (v3 with feature table), mixed workload"

create c2m.qcow2 $((64 * MiB)) cluster_size=$((2 * MiB))
io c2m.qcow2 \
    "write -P 0x11 0 $((2 * MiB))" \
    "write -P 0x22 $((5 * MiB + 4096)) 8192" \
    "write -P 0x33 $((9 * MiB - 100)) 200" \
    "write -z $((16 * MiB)) $((2 * MiB))" \
    "write -P 0x44 $((20 * MiB)) 4096" \
    "write -z -u $((20 * MiB)) $((2 * MiB))" \
    "write -P 0x55 $((30 * MiB)) 65536" \
    "discard $((30 * MiB)) $((2 * MiB))" \
    "write -P 0x66 $((64 * MiB - 512)) 512"
add c2m c2m.qcow2 - "cluster=$((2 * MiB)) rcbits=16 compat=1.1 vsize=$((64 * MiB)) feature_table=yes; 2 MiB clusters, few sparse writes, zero/unmap/discard"

###############################################################################
# refcount_bits matrix (4 KiB clusters so refcount blocks fill up quickly)
###############################################################################
for rb in 1 2 4 8 16 32 64; do
    create "rc$rb.qcow2" $((8 * MiB)) cluster_size=4096 refcount_bits=$rb
    workload "rc$rb.qcow2" 4096 $((8 * MiB))
    # a few MiB of data so several refcount blocks are needed for wide refcounts
    io "rc$rb.qcow2" "write -P 0x$((rb % 10))c $((2 * MiB)) $((2 * MiB))"
    add "rc$rb" "rc$rb.qcow2" - "cluster=4096 rcbits=$rb compat=1.1 vsize=$((8 * MiB)); refcount_bits=$rb, mixed workload plus 2 MiB contiguous data"
done

###############################################################################
# compat 0.10
###############################################################################
create v2.qcow2 $((16 * MiB)) compat=0.10
workload v2.qcow2 65536 $((16 * MiB))
add v2 v2.qcow2 - "cluster=65536 rcbits=16 compat=0.10 vsize=$((16 * MiB)); compat 0.10 (v2): write -z writes real zeros, mixed workload"

create v2-c4k.qcow2 $((5 * MiB)) compat=0.10 cluster_size=4096
workload v2-c4k.qcow2 4096 $((5 * MiB))
add v2-c4k v2-c4k.qcow2 - "cluster=4096 rcbits=16 compat=0.10 vsize=$((5 * MiB)); compat 0.10 with 4 KiB clusters"

###############################################################################
# extended L2
###############################################################################
for spec in "32k 32768 $((8 * MiB))" "64k 65536 $((16 * MiB))" "2m $((2 * MiB)) $((64 * MiB))"; do
    read -r tag cs vs <<<"$spec"
    sc=$((cs / 32))
    f="ext-l2-$tag.qcow2"
    create "$f" "$vs" cluster_size="$cs" extended_l2=on
    io "$f" \
        "write -P 0x11 0 $sc" \
        "write -P 0x12 $((3 * sc + 5)) $((sc / 2))" \
        "write -P 0x13 $((cs - sc)) $sc" \
        "write -P 0x21 $cs $cs" \
        "write -z $((cs + 4 * sc)) $((4 * sc))" \
        "write -z -u $((cs + 10 * sc)) $((2 * sc))" \
        "discard $((cs + 20 * sc)) $sc" \
        "write -z $((2 * cs)) $((3 * sc))" \
        "write -z -u $((3 * cs)) $cs" \
        "write -P 0x41 $((4 * cs + 7 * sc)) $((5 * sc + 100))" \
        "write -P 0x51 $((5 * cs)) $((2 * cs))" \
        "write -z -u $((5 * cs + 31 * sc)) $((2 * sc))" \
        "write -c -P 0x61 $((8 * cs)) $cs" \
        "write -P 0x71 $((vs - sc / 2)) $((sc / 2))"
    add "ext-l2-$tag" "$f" - "cluster=$cs rcbits=16 compat=1.1 vsize=$vs extl2=on; extended L2 ($tag clusters, $sc B subclusters): partial subclusters, zero subclusters, -z -u, discard, one compressed cluster"
done

# extended L2 overlay over a raw backing file: unallocated subclusters fall through
qemu-img create -q -f raw extl2-base.raw $((4 * MiB))
io_raw extl2-base.raw "write -P 0xb0 0 $((4 * MiB))"
qemu-img create -q -f qcow2 -o cluster_size=65536,extended_l2=on -b extl2-base.raw -F raw ext-l2-overlay.qcow2 $((6 * MiB))
io ext-l2-overlay.qcow2 \
    "write -P 0xc1 4096 2048" \
    "write -P 0xc2 $((65536 + 30000)) 10000" \
    "write -z $((131072 + 8192)) 4096" \
    "write -z -u $((196608)) 65536" \
    "write -P 0xc3 $((4 * MiB - 1000)) 3000" \
    "write -P 0xc4 $((6 * MiB - 2048)) 2048"
add ext-l2-overlay ext-l2-overlay.qcow2 - "cluster=65536 rcbits=16 compat=1.1 vsize=$((6 * MiB)) extl2=on backing=extl2-base.raw deps=extl2-base.raw; extended L2 overlay on a 4 MiB raw backing (0xb0), partly allocated subclusters, larger than backing"

###############################################################################
# compressed images
###############################################################################
# source: compressible patterns, pseudo-random (incompressible) regions, a mixed cluster
qemu-img create -q -f raw comp-src.raw $((8 * MiB))
io_raw comp-src.raw \
    "write -P 0x11 0 $((1 * MiB))" \
    "write -P 0x22 $((1 * MiB)) 5000" \
    "write -P 0x33 $((3 * MiB)) $((512 * KiB))"
put_prand_raw comp-src.raw 1 $((2 * MiB)) $((512 * KiB))
put_prand_raw comp-src.raw 2 $((4 * MiB + 32768)) 32768
put_prand_raw comp-src.raw 3 $((6 * MiB)) 300000
io_raw comp-src.raw "write -P 0x44 $((8 * MiB - 4096)) 4096"

for ct in zlib zstd; do
    qemu-img convert -c -O qcow2 -o compression_type=$ct comp-src.raw "$ct.qcow2"
    io "$ct.qcow2" \
        "write -P 0xa1 65536 4096" \
        "write -P 0xa2 $((3 * MiB + 100)) 70000" \
        "write -z $((1 * MiB)) 65536" \
        "discard $((512 * KiB)) 131072" \
        "write -c -P 0xa3 $((5 * MiB)) 262144"
    add "$ct" "$ct.qcow2" - "cluster=65536 rcbits=16 compat=1.1 vsize=$((8 * MiB)) compression=$ct; qemu-img convert -c ($ct) of patterns + pseudo-random data, then partly overwritten (normal clusters), zeroed, discarded and write -c"
done

create zlib-c4k.qcow2 $((4 * MiB)) cluster_size=4096
io zlib-c4k.qcow2 \
    "write -c -P 0x31 0 $((64 * KiB))" \
    "write -P 0x32 8192 100" \
    "write -c -P 0x33 $((1 * MiB)) 4096" \
    "write -c $((2 * MiB)) 12288" \
    "write -c -P 0x34 $((4 * MiB - 4096)) 4096"
add zlib-c4k zlib-c4k.qcow2 - "cluster=4096 rcbits=16 compat=1.1 vsize=$((4 * MiB)) compression=zlib; 4 KiB clusters, qemu-io write -c compressed clusters, one then partly overwritten"

create zstd-c512.qcow2 $((1 * MiB)) cluster_size=512 compression_type=zstd
io zstd-c512.qcow2 \
    "write -c -P 0x41 0 8192" \
    "write -P 0x42 1024 10" \
    "write -c -P 0x43 65536 512" \
    "write -c -P 0x44 $((1 * MiB - 512)) 512"
add zstd-c512 zstd-c512.qcow2 - "cluster=512 rcbits=16 compat=1.1 vsize=$((1 * MiB)) compression=zstd; 512 B clusters with zstd write -c compressed clusters"

###############################################################################
# backing chain raw <- qcow2 (4 KiB) <- qcow2 (64 KiB), relative names
###############################################################################
qemu-img create -q -f raw chain-base.raw $((4 * MiB))
io_raw chain-base.raw \
    "write -P 0xb1 0 $((4 * MiB))" \
    "write -P 0xb2 $((1 * MiB)) 12345"
qemu-img create -q -f qcow2 -o cluster_size=4096 -b chain-base.raw -F raw chain-mid.qcow2 $((6 * MiB))
io chain-mid.qcow2 \
    "write -P 0xc1 4096 4096" \
    "write -P 0xc2 $((64 * KiB + 100)) 300" \
    "write -z $((128 * KiB)) 8192" \
    "write -z -u $((192 * KiB)) 4096" \
    "discard $((256 * KiB)) 4096" \
    "write -P 0xc3 $((4 * MiB - 2048)) 4096" \
    "write -P 0xc4 $((5 * MiB)) 4096"
qemu-img create -q -f qcow2 -o cluster_size=65536 -b chain-mid.qcow2 -F qcow2 chain-top.qcow2 $((8 * MiB))
io chain-top.qcow2 \
    "write -P 0xd1 0 1000" \
    "write -P 0xd2 $((64 * KiB + 200)) 50" \
    "write -z $((320 * KiB)) 65536" \
    "write -z -u $((384 * KiB)) 65536" \
    "discard $((448 * KiB)) 65536" \
    "write -P 0xd3 $((5 * MiB + 4096)) 4096" \
    "write -P 0xd4 $((8 * MiB - 4096)) 4096"
add chain-base chain-base.raw - "format=raw vsize=$((4 * MiB)); raw base of the chain (0xb1 with a 0xb2 stripe)"
add chain-mid chain-mid.qcow2 - "cluster=4096 rcbits=16 compat=1.1 vsize=$((6 * MiB)) backing=chain-base.raw deps=chain-base.raw; 4 KiB-cluster overlay on chain-base.raw (relative), larger than its backing"
add chain-top chain-top.qcow2 - "cluster=65536 rcbits=16 compat=1.1 vsize=$((8 * MiB)) backing=chain-mid.qcow2 deps=chain-mid.qcow2,chain-base.raw; 64 KiB-cluster overlay on chain-mid.qcow2 (relative), larger than its backing; partial-cluster COW from 4 KiB backing, zero/unmap/discard over backing data"

###############################################################################
# internal snapshots
###############################################################################
create snap.qcow2 $((16 * MiB))
io snap.qcow2 "write -P 0x01 0 $((1 * MiB))" "write -P 0x02 $((8 * MiB)) 100000"
qemu-img snapshot -c s1 snap.qcow2
io snap.qcow2 "write -P 0x03 65536 4096" "write -P 0x04 $((2 * MiB)) 65536"
qemu-img snapshot -c s2 snap.qcow2
io snap.qcow2 "discard 0 131072" "write -z $((8 * MiB)) 65536" "write -P 0x05 $((12 * MiB + 5)) 5"
qemu-img snapshot -c s3 snap.qcow2
io snap.qcow2 "write -P 0x06 $((512 * KiB)) $((300 * KiB))" "write -P 0x07 $((16 * MiB - 512)) 512"
qemu-img snapshot -c s4 snap.qcow2
io snap.qcow2 "write -P 0x08 0 4096" "write -z -u $((2 * MiB)) 65536"
qemu-img snapshot -d s2 snap.qcow2
add snap snap.qcow2 s1,s3,s4 "cluster=65536 rcbits=16 compat=1.1 vsize=$((16 * MiB)); four internal snapshots s1..s4 with data changed between them, s2 deleted, active layer changed after s4"

create snap-v2.qcow2 $((4 * MiB)) compat=0.10 cluster_size=4096
io snap-v2.qcow2 "write -P 0x11 0 65536"
qemu-img snapshot -c before snap-v2.qcow2
io snap-v2.qcow2 "write -P 0x12 4096 4096" "write -P 0x13 $((3 * MiB)) 4096"
qemu-img snapshot -c after snap-v2.qcow2
io snap-v2.qcow2 "write -P 0x14 0 512"
add snap-v2 snap-v2.qcow2 before,after "cluster=4096 rcbits=16 compat=0.10 vsize=$((4 * MiB)); compat 0.10 image with two internal snapshots"

###############################################################################
# lazy refcounts, left dirty by a crash
###############################################################################
create lazy-dirty.qcow2 $((8 * MiB)) lazy_refcounts=on
io lazy-dirty.qcow2 "write -P 0x21 0 65536"
# qemu-io dies with SIGABRT here; run it in a subshell so bash's "Aborted" notice is silenced too
(qemu-io -f qcow2 -c "write -P 0x22 $((1 * MiB)) 131072" -c "write -P 0x23 100 100" -c flush -c abort lazy-dirty.qcow2 || true) >/dev/null 2>&1
add lazy-dirty lazy-dirty.qcow2 - "cluster=65536 rcbits=16 compat=1.1 vsize=$((8 * MiB)) check=2 dirty; lazy_refcounts=on, written + flushed then qemu-io abort: dirty bit set, refcounts stale (check exits 2). Opening it read-write makes QEMU repair it, so only copy it"

create lazy-clean.qcow2 $((8 * MiB)) lazy_refcounts=on
io lazy-clean.qcow2 "write -P 0x31 0 65536" "write -P 0x32 $((3 * MiB)) 4096"
add lazy-clean lazy-clean.qcow2 - "cluster=65536 rcbits=16 compat=1.1 vsize=$((8 * MiB)); lazy_refcounts=on, closed cleanly"

###############################################################################
# huge sparse image
###############################################################################
TiB=$((1024 * 1024 * MiB))
create big-4t.qcow2 $((4 * TiB))
io big-4t.qcow2 \
    "write -P 0x11 0 65536" \
    "write -P 0x22 $((1 * TiB + 12345)) 10000" \
    "write -P 0x33 $((2 * TiB + 5 * MiB)) 65536" \
    "write -z $((3 * TiB)) $((1 * MiB))" \
    "write -P 0x44 $((4 * TiB - 4096)) 4096"
add big-4t big-4t.qcow2 - "cluster=65536 rcbits=16 compat=1.1 vsize=$((4 * TiB)) no_convert; 4 TiB sparse image with a few writes far apart (do not convert to raw)"

###############################################################################
# virtual sizes not a multiple of the cluster size
###############################################################################
vs=$((5 * MiB + 1536))
create odd-4k.qcow2 $vs cluster_size=4096
io odd-4k.qcow2 \
    "write -P 0x11 0 4096" \
    "write -P 0x12 $((5 * MiB - 4096)) 4096" \
    "write -P 0x13 $((5 * MiB)) 1536"
add odd-4k odd-4k.qcow2 - "cluster=4096 rcbits=16 compat=1.1 vsize=$vs; virtual size 5 MiB + 1536 B, data in the last partial cluster"

vs=$((7 * MiB + 40 * KiB + 512))
create odd-64k.qcow2 $vs cluster_size=65536
io odd-64k.qcow2 \
    "write -P 0x21 0 100" \
    "write -P 0x22 $((7 * MiB - 1000)) 2000" \
    "write -z $((7 * MiB + 4096)) 8192" \
    "write -P 0x23 $((vs - 512)) 512"
add odd-64k odd-64k.qcow2 - "cluster=65536 rcbits=16 compat=1.1 vsize=$vs; virtual size 7 MiB + 40.5 KiB, data and zeroes in the last partial cluster"

vs=$((3 * MiB + 2048))
create odd-zlib.qcow2 $vs cluster_size=65536
io odd-zlib.qcow2 "write -c -P 0x31 $((3 * MiB)) 2048" "write -c -P 0x32 0 65536"
add odd-zlib odd-zlib.qcow2 - "cluster=65536 rcbits=16 compat=1.1 vsize=$vs compression=zlib; compressed write of the last partial cluster"

###############################################################################
# external data files (relative names)
###############################################################################
create datafile-raw.qcow2 $((4 * MiB)) cluster_size=65536 data_file=datafile-raw.data data_file_raw=on
io datafile-raw.qcow2 \
    "write -P 0x41 0 65536" \
    "write -P 0x42 $((1 * MiB + 100)) 1000" \
    "write -z $((2 * MiB)) 65536" \
    "write -P 0x43 $((4 * MiB - 512)) 512"
add datafile-raw datafile-raw.qcow2 - "cluster=65536 rcbits=16 compat=1.1 vsize=$((4 * MiB)) data_file=datafile-raw.data deps=datafile-raw.data; external data file with data_file_raw=on (guest offset == host offset)"

create datafile.qcow2 $((4 * MiB)) cluster_size=4096 data_file=datafile.data
io datafile.qcow2 \
    "write -P 0x51 $((2 * MiB)) 8192" \
    "write -P 0x52 0 4096" \
    "write -z 4096 4096" \
    "write -P 0x53 $((1 * MiB + 5)) 5" \
    "discard $((2 * MiB)) 4096"
add datafile datafile.qcow2 - "cluster=4096 rcbits=16 compat=1.1 vsize=$((4 * MiB)) data_file=datafile.data deps=datafile.data; external data file without data_file_raw"

###############################################################################
# bitmaps extension and an unknown header extension
###############################################################################
create bitmaps.qcow2 $((8 * MiB))
qemu-img bitmap --add bitmaps.qcow2 b0
qemu-img bitmap --add -g 4096 bitmaps.qcow2 b1-4k
qemu-img bitmap --add bitmaps.qcow2 b2-disabled
qemu-img bitmap --disable bitmaps.qcow2 b2-disabled
io bitmaps.qcow2 "write -P 0x61 0 4096" "write -P 0x62 $((5 * MiB)) 200000"
add bitmaps bitmaps.qcow2 - "cluster=65536 rcbits=16 compat=1.1 vsize=$((8 * MiB)) bitmaps=b0,b1-4k,b2-disabled; persistent dirty bitmaps (bitmaps header extension, autoclear bit 0) with some dirty data"

create unknown-ext.qcow2 $((4 * MiB))
io unknown-ext.qcow2 "write -P 0x71 0 65536"
python3 - unknown-ext.qcow2 <<'EOF'
import struct, sys
path = sys.argv[1]
with open(path, "r+b") as f:
    hdr = f.read(65536)
    hdr_len = struct.unpack(">I", hdr[100:104])[0]
    off = hdr_len
    while True:
        typ, ln = struct.unpack(">II", hdr[off:off + 8])
        if typ == 0:
            break
        off += 8 + ((ln + 7) & ~7)
    payload = b"qcow2-testdata unknown extension"[:29]  # 29 bytes: exercises padding
    ext = struct.pack(">II", 0x12345678, len(payload)) + payload + b"\0" * (-len(payload) % 8)
    f.seek(off)
    f.write(ext + b"\0" * 8)
EOF
add unknown-ext unknown-ext.qcow2 - "cluster=65536 rcbits=16 compat=1.1 vsize=$((4 * MiB)) feature_table=yes; unknown header extension 0x12345678 (29 bytes + padding) after the feature table"

###############################################################################
mv "$MANIFEST" manifest.tsv
rm -f comp-src.raw
