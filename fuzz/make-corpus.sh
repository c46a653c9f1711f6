#!/usr/bin/env bash
# Seed the local fuzz corpora (not committed; fuzz/corpus is in .gitignore) from QEMU-made images.
#
# Usage: fuzz/make-corpus.sh [FIXTURES_DIR]
#
# FIXTURES_DIR defaults to a fresh run of testdata/make-images.sh (needs qemu-img and qemu-io).
# Images under 256 KiB, plus testdata/hostile/* if present, go to corpus/open_read/; the first
# cluster of each (its header and extensions) goes to corpus/header/. The hand-made seeds under
# regressions/TARGET/ are copied into corpus/TARGET/ too (the only seeds of `ops`, whose inputs are
# operation sequences, not images).
set -euo pipefail

FUZZ=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$FUZZ")
MAX_IMAGE_BYTES=$((256 * 1024))

if [[ $# -ge 1 ]]; then
    SRC=$1
else
    SRC=$(mktemp -d "${TMPDIR:-/tmp}/qcow2-fuzz-fixtures.XXXXXX")
    trap 'rm -rf "$SRC"' EXIT
    echo "generating fixtures with testdata/make-images.sh into $SRC" >&2
    bash "$ROOT/testdata/make-images.sh" "$SRC" >/dev/null
fi

mkdir -p "$FUZZ"/corpus/{open_read,header,snapshot_table,tables,ops}

# The cluster size a qcow2 header declares (bytes 20..24), or nothing if it is not qcow2.
cluster_size() {
    local magic bits
    magic=$(od -An -tx1 -N4 "$1" | tr -d ' \n')
    [[ $magic == 514649fb ]] || return 1
    bits=$((16#$(od -An -tx1 -j20 -N4 "$1" | tr -d ' \n')))
    ((bits >= 9 && bits <= 21)) || return 1
    echo $((1 << bits))
}

added=0
add_image() {
    local image=$1 name=$2 size cs
    size=$(stat -c %s "$image")
    ((size < MAX_IMAGE_BYTES)) || return 0
    cp "$image" "$FUZZ/corpus/open_read/$name"
    if cs=$(cluster_size "$image"); then
        head -c "$cs" "$image" >"$FUZZ/corpus/header/$name"
    else
        head -c 4096 "$image" >"$FUZZ/corpus/header/$name"
    fi
    added=$((added + 1))
}

while IFS= read -r -d '' image; do
    rel=${image#"$SRC"/}
    add_image "$image" "fixture-${rel//\//-}"
done < <(find "$SRC" -type f ! -name 'manifest.tsv*' -print0 | sort -z)

if [[ -d $ROOT/testdata/hostile ]]; then
    for image in "$ROOT"/testdata/hostile/*; do
        case $image in *.md | *.tsv | *.txt) continue ;; esac
        [[ -f $image ]] && add_image "$image" "hostile-$(basename "$image")"
    done
fi

shopt -s nullglob
for dir in "$FUZZ"/regressions/*/; do
    target=$(basename "$dir")
    mkdir -p "$FUZZ/corpus/$target"
    for seed in "$dir"*; do
        cp "$seed" "$FUZZ/corpus/$target/"
    done
done

echo "added $added images; corpus sizes:" >&2
for dir in "$FUZZ"/corpus/*/; do
    echo "  $(basename "$dir"): $(find "$dir" -type f | wc -l) files" >&2
done
