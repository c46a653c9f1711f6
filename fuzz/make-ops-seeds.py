#!/usr/bin/env python3
"""Writes the hand-made seeds of the `ops` fuzz target to fuzz/regressions/ops/.

The encoding is `OpsInput::from_bytes` in fuzz/src/targets/ops/input.rs: a config, then steps, each an
opcode byte and its fields. Rerun after changing that decoding (and keep the crash-* files, which
are found inputs, not seeds).
"""
import os

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "regressions", "ops")

V2, LAZY, EXTL2, ZSTD, BACKING, SECTOR, BITMAP, BITMAP512 = 1, 2, 4, 8, 0x10, 0x20, 0x40, 0x80


def u16(v):
    return v.to_bytes(2, "big")


def config(cluster_bits, refcount_order=4, flags=0, clusters=16, odd=0, backing=None):
    """backing: (length in sectors, extra bytes, seed)."""
    out = bytes([cluster_bits - 9, refcount_order, flags, clusters]) + u16(odd)
    if flags & BACKING:
        sectors, extra, seed = backing
        out += u16(sectors) + bytes([extra, seed])
    return out


def rng(mode, start, length):
    """mode: bits 0-1 grain (cluster, byte, sector, subcluster), bit 2 to the end, bit 3 odd tail,
    0xE0 overrun."""
    return bytes([mode]) + start.to_bytes(4, "big") + u16(length)


def write(mode, start, length, byte):
    return bytes([0]) + rng(mode, start, length) + bytes([byte])


def zero(mode, start, length, unmap=False):
    return bytes([3]) + rng(mode, start, length) + bytes([int(unmap)])


def discard(mode, start, length):
    return bytes([4]) + rng(mode, start, length)


def compressed(cluster, two=False, kind=0, byte=0x11, misaligned=False):
    flags = int(two) | kind << 1 | (0xF0 if misaligned else 0)
    return bytes([5]) + u16(cluster) + bytes([flags, byte])


def resize(clusters, odd=0, allow_data_loss=False, sector_aligned=False):
    return bytes([6, clusters]) + u16(odd) + bytes([int(allow_data_loss) | int(sector_aligned) << 1])


FLUSH = bytes([7])
REOPEN = bytes([11])


def create(name):
    return bytes([8, name])


def apply(index, by_id=False):
    return bytes([9, index | (0x80 if by_id else 0)])


def delete(index, by_id=False):
    return bytes([10, index | (0x80 if by_id else 0)])


def crash(mode, cut, seed=0):
    """mode: bits 0-1 lost / kept / torn; bit 2 cut at a checkpoint."""
    return bytes([12, mode]) + u16(cut) + u16(seed)


BITMAP_CLEAR = bytes([0xF0])


def bitmap_enable(on):
    return bytes([0xF1, int(on)])


def bitmap_remove_or_add(shift=0):
    return bytes([0xF2, shift])


SEEDS = {
    # A persistent bitmap marks every request at its granularity, survives reopens and power cuts
    # (durable bits), stops marking while disabled, and is cleared, removed and added again.
    "v3-c4k-bitmap": config(12, flags=BITMAP | BITMAP512, clusters=20, odd=700)
    + write(1, 1000, 3000, 0x71)
    + zero(0, 3, 1)
    + discard(0, 5, 2)
    + compressed(9)
    + FLUSH
    + write(2, 60, 9, 0x72)
    + crash(1, 100, 4)
    + crash(2, 40, 5)
    + bitmap_enable(False)
    + write(0, 12, 1, 0x73)
    + bitmap_enable(True)
    + REOPEN
    + write(1, 50000, 10, 0x74)
    + create(0)
    + apply(0)
    + BITMAP_CLEAR
    + write(0, 1, 1, 0x75)
    + resize(24)
    + bitmap_remove_or_add()
    + bitmap_remove_or_add(3)
    + write(1, 7, 60000, 0x76)
    + crash(2, 300, 6)
    + FLUSH
    + crash(4, 1),
    # Without a bitmap, clear and enable are refused; v2 images never get one.
    "v2-c64k-no-bitmap": config(16, flags=V2, clusters=4)
    + BITMAP_CLEAR
    + bitmap_enable(True)
    + bitmap_remove_or_add(1)
    + write(0, 1, 1, 0x77),

    # Writes, zero writes and discards of every grain on v3, with flushes and power cuts.
    "v3-c4k-write-zero-discard": config(12, clusters=20, odd=1000)
    + write(0, 2, 3, 0xAA)
    + write(1, 5000, 20000, 0xBB)
    + write(9, 70000, 1, 0xCC)
    + zero(0, 3, 2, unmap=True)
    + zero(1, 1234, 9000)
    + FLUSH
    + discard(1, 100, 30000)
    + discard(4, 18, 0)
    + crash(2, 0, 7)
    + crash(4, 1)
    + write(2, 1, 40, 0xDD)
    + crash(1, 60000),
    # v2 over a raw backing file: copy-on-write, discards (which keep the data there), grow,
    # shrink, reopen.
    "v2-c512-backing-discard-resize": config(9, flags=V2 | BACKING, clusters=100, odd=300,
                                             backing=(120, 17, 0x42))
    + write(1, 700, 100, 0x01)
    + write(0, 10, 4, 0x02)
    + discard(0, 10, 2)
    + zero(1, 3000, 600)
    + resize(140, 100)
    + resize(50, 7, allow_data_loss=True)
    + resize(130)
    + FLUSH
    + REOPEN
    + discard(4, 40, 0)
    + crash(2, 500, 3),
    # Snapshots: create, write, apply by name and by id, delete, missing names, reopen.
    "v3-c8k-snapshots": config(13, clusters=12, odd=512)
    + write(0, 1, 2, 0x10)
    + create(0)
    + write(1, 9000, 20000, 0x20)
    + create(1)
    + zero(0, 0, 4, unmap=True)
    + apply(0)
    + create(0)
    + delete(1)
    + apply(1, by_id=True)
    + delete(3)
    + apply(2)
    + delete(9, by_id=True)
    + resize(20)
    + create(2)
    + REOPEN
    + apply(2)
    + crash(4, 3)
    + crash(2, 200, 9)
    + delete(0),
    # 1-bit refcounts: snapshots of data must be refused (overflow) and change nothing.
    "v3-c4k-refcount1-overflow": config(12, refcount_order=0, clusters=8)
    + create(0)
    + write(0, 1, 1, 0x31)
    + create(1)
    + compressed(3)
    + compressed(5, two=True, kind=3)
    + create(2)
    + apply(0)
    + delete(0)
    + crash(2, 100, 1),
    # Extended L2 with zstd and lazy refcounts: subcluster writes, compressed clusters, zero
    # writes inside compressed clusters, dirty crash images.
    "v3-c16k-extl2-zstd-lazy": config(14, flags=LAZY | EXTL2 | ZSTD, clusters=10, odd=5000)
    + write(3, 3, 2, 0x41)
    + compressed(2, kind=0, byte=0x42)
    + compressed(4, two=True, kind=2)
    + compressed(9, kind=1)
    + zero(3, 64 + 5, 3)
    + zero(1, 30000, 10000, unmap=True)
    + discard(3, 100, 40)
    + crash(2, 300, 5)
    + FLUSH
    + create(0)
    + write(3, 66, 1, 0x43)
    + crash(0, 1000)
    + REOPEN,
    # L1 growth with 512-byte clusters, then a shrink over data (refused, then allowed).
    "v3-c512-l1-growth": config(9, clusters=10, flags=SECTOR)
    + write(0, 9, 1, 0x51)
    + resize(150, 100)
    + write(0, 140, 3, 0x52)
    + create(0)
    + resize(20)
    + resize(20, allow_data_loss=True)
    + resize(160)
    + apply(0)
    + crash(2, 9999, 2)
    + REOPEN,
    # Requests that must be refused: past the end, misaligned compressed writes.
    "refused-requests": config(10, clusters=6, odd=100)
    + write(0xE0, 5, 1, 0x61)
    + zero(0xE1, 1, 1)
    + discard(0xE2, 3, 0)
    + compressed(1, misaligned=True)
    + write(4, 3, 0, 0x62)
    + write(1, 6 * 1024 + 100, 0, 0x63),
}


def main():
    os.makedirs(OUT, exist_ok=True)
    for name, data in SEEDS.items():
        with open(os.path.join(OUT, name), "wb") as f:
            f.write(data)
    print(f"wrote {len(SEEDS)} seeds to {OUT}")


if __name__ == "__main__":
    main()
