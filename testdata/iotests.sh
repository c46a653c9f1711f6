#!/usr/bin/env bash
# Runs QEMU's own qemu-iotests for qcow2 twice: once with the installed qemu-img/qemu-io, once with
# `qcow2-tool` in their place, and prints both pass counts and the tests only QEMU passes.
#
# Only the tests that drive qemu-img and qemu-io as scripts are run: every test that starts the
# system emulator, a storage daemon or an NBD server is left out (the list is worked out from the
# test sources, see `select_tests`). Not part of `cargo test`: a full run takes several minutes.
#
# Usage: testdata/iotests.sh [--ours | --qemu] [TEST...]
#   --ours / --qemu   run only one side
#   TEST...           run these tests (e.g. 001 060 qcow2-internal-snapshots) instead of all
# Environment:
#   IOTESTS_CACHE     where the QEMU sources, wrappers and results live (default: target/iotests)
#   IOTESTS_TARBALL   a local QEMU source tarball (or a URL) to take the tests from; by default the
#                     Debian source of QEMU $QEMU_VERSION is fetched from the apt mirror this
#                     machine is configured with
#   IOTESTS_JOBS      tests run at once (default 1)
#   QCOW2_TOOL        the binary to test (default: target/release/qcow2-tool, built if missing)
set -euo pipefail

QEMU_VERSION=10.0.2
DEBIAN_ORIG=qemu_${QEMU_VERSION}+ds.orig.tar.xz

repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${IOTESTS_CACHE:-$repo/target/iotests}
jobs=${IOTESTS_JOBS:-1}
sides=(qemu ours)
tests=()
for arg in "$@"; do
    case $arg in
        --ours) sides=(ours) ;;
        --qemu) sides=(qemu) ;;
        -h | --help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) tests+=("$arg") ;;
    esac
done

mkdir -p "$cache"
src=$cache/qemu-$QEMU_VERSION
iotests=$src/tests/qemu-iotests

# The apt mirror this machine already uses for Debian packages, read from apt's own sources.
debian_mirror() {
    local uri
    uri=$(grep -hoE '^(URIs:|deb) +[^ ]*debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null |
        awk '{print $2}' | grep -v security | head -n1)
    [ -n "$uri" ] || { echo "iotests.sh: no Debian mirror in apt's sources; set IOTESTS_TARBALL" >&2; exit 2; }
    echo "${uri%/}"
}

fetch_sources() {
    [ -x "$iotests/check" ] && return
    local tarball=${IOTESTS_TARBALL:-}
    if [ -z "$tarball" ]; then
        tarball="$(debian_mirror)/pool/main/q/qemu/$DEBIAN_ORIG"
    fi
    if [[ $tarball == *://* ]]; then
        echo "fetching $tarball" >&2
        curl -sSfL -o "$cache/$(basename "$tarball")" "$tarball"
        tarball=$cache/$(basename "$tarball")
    fi
    # Only the tests and the Python helpers they import are needed.
    tar -xf "$tarball" -C "$cache" "qemu-$QEMU_VERSION/tests/qemu-iotests" "qemu-$QEMU_VERSION/python"
}

# The harness decodes each test's output as strict UTF-8 to diff it, and one test whose output
# holds other bytes (261 dumps snapshot extra data raw) ends the whole run, silently dropping
# the tests still queued. Undecodable bytes become U+FFFD instead: that test fails, the rest run.
patch_harness() {
    sed -i 's/open(file2, encoding="utf-8")/open(file2, encoding="utf-8", errors="replace")/' \
        "$iotests/testrunner.py"
    grep -q 'errors="replace"' "$iotests/testrunner.py" ||
        { echo "iotests.sh: could not patch testrunner.py's file_diff" >&2; exit 2; }
}

# Tests that need only qemu-img and qemu-io: no system emulator ($QEMU, _launch_qemu, iotests.VM),
# no storage daemon, no NBD server. Tests for other formats are in the list and skip themselves.
select_tests() {
    local t
    (
        cd "$iotests"
        for t in [0-9][0-9][0-9] tests/*; do
            case $t in *.out | *.out.*) continue ;; esac
            [ -f "$t" ] || continue
            grep -qE '\$\{?QEMU\}?([^_A-Za-z]|$)|_launch_qemu|_send_qemu_cmd|iotests\.VM|QEMU_PROG|qemu_prog|\bVM\(|QemuStorageDaemon|\$QSD|_launch_qsd|qemu_nbd|QEMU_NBD|_nbd_server' "$t" ||
                echo "${t#tests/}"
        done
    )
}

make_wrappers() {
    local tool=${QCOW2_TOOL:-$repo/target/release/qcow2-tool}
    if [ -z "${QCOW2_TOOL:-}" ] && [ ! -x "$tool" ]; then
        (cd "$repo" && cargo build --release -p qcow2-tool)
    fi
    mkdir -p "$cache/bin/qemu" "$cache/bin/ours"
    printf '#!/bin/sh\nexec %q "$@"\n' "$(command -v qemu-img)" >"$cache/bin/qemu/qemu-img"
    printf '#!/bin/sh\nexec %q "$@"\n' "$(command -v qemu-io)" >"$cache/bin/qemu/qemu-io"
    # Links named after QEMU's tools: invoked as `qemu-io`, qcow2-tool runs its `io` command, and
    # under either name it starts its messages with that name, as QEMU's tools do.
    ln -sfn "$tool" "$cache/bin/ours/qemu-img"
    ln -sfn "$tool" "$cache/bin/ours/qemu-io"
    # The harness insists on a system emulator binary even when no selected test starts one.
    for side in qemu ours; do
        cat >"$cache/bin/$side/qemu-system" <<'EOF'
#!/bin/sh
[ "$1 $2" = "-machine help" ] && exit 0
echo "qemu-system: not available in this run" >&2
exit 1
EOF
        chmod +x "$cache/bin/$side/qemu-system"
    done
    chmod +x "$cache/bin/qemu/"*
}

# Runs ./check for one side; leaves `ok`/`not ok` lines in $cache/results/$side.tap and the diffs
# of failing tests in $cache/results/$side.diff.
run_side() {
    local side=$1
    shift
    local out=$cache/results
    mkdir -p "$out"
    rm -rf "$cache/scratch-$side" "$cache/sock-$side"
    (
        cd "$iotests"
        QEMU_PROG=$cache/bin/$side/qemu-system \
            QEMU_IMG_PROG=$cache/bin/$side/qemu-img \
            QEMU_IO_PROG=$cache/bin/$side/qemu-io \
            QEMU_NBD_PROG=$(command -v qemu-nbd || echo /bin/false) \
            QSD_PROG=$(command -v qemu-storage-daemon || echo /bin/false) \
            TEST_DIR=$cache/scratch-$side SOCK_DIR=$cache/sock-$side \
            python3 ./check -tap -j "$jobs" -qcow2 "$@" >"$out/$side.tap" 2>"$out/$side.diff" || true
    )
}

count() { grep -cE "^ok qcow2 [^ ]+$" "$cache/results/$1.tap" || true; }
# Tests that were asked for but have no result line (the harness stopped early).
not_run() {
    comm -23 <(printf '%s\n' "${tests[@]}" | sort) \
        <(grep -E "^(not )?ok qcow2 " "$cache/results/$1.tap" | sed -E 's/^(not )?ok qcow2 ([^ ]+).*/\2/' | sort)
}
passed() { grep -E "^ok qcow2 [^ ]+$" "$cache/results/$1.tap" | awk '{print $3}' | sort; }
failed() { grep -E "^not ok qcow2 " "$cache/results/$1.tap" | awk '{print $4}' | sort; }

fetch_sources
patch_harness
make_wrappers
if [ ${#tests[@]} -eq 0 ]; then
    mapfile -t tests < <(select_tests)
fi
for side in "${sides[@]}"; do
    echo "running ${#tests[@]} iotests with $side qemu-img/qemu-io..." >&2
    run_side "$side" "${tests[@]}"
done

for side in "${sides[@]}"; do
    echo "$side: $(count "$side") passed, $(failed "$side" | wc -l) failed, $(not_run "$side" | wc -l) not run"
    missing=$(not_run "$side" | tr '\n' ' ')
    [ -z "$missing" ] || echo "  not run (the harness stopped; see $cache/results/$side.diff): $missing"
done
if [ ${#sides[@]} -eq 2 ]; then
    echo "passed with QEMU, not with qcow2-tool:"
    comm -23 <(passed qemu) <(passed ours) | tr '\n' ' ' | fold -s -w 100
    echo
fi
echo "failing with ${sides[-1]}: $(failed "${sides[-1]}" | tr '\n' ' ')"
echo "diffs: $cache/results/${sides[-1]}.diff"
