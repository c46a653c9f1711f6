#!/usr/bin/env python3
"""Builds the hostile qcow2 corpus in testdata/hostile/.

Each image starts as a small, valid image made by qemu-img/qemu-io (512-byte clusters and a 64 KiB
virtual size unless a case needs something else) in a temporary directory, and is then broken in
one place with struct.pack_into. The output is deterministic: no snapshots are made by QEMU (the
snapshot table entries are written here, with fixed dates), so re-running the script gives the
same bytes.

Writes, next to the images:
- expected.tsv: file, when (open|read|snapshot:NAME|check), kind
  (Corrupt|Unsupported|Chain:Loop|Chain:TooDeep|Io), structure substring, offset (hex or -);
- README.md: each file and what is wrong with it.

Usage: python3 testdata/make-hostile.py [OUTDIR]   (default: testdata/hostile next to this script)
Needs qemu-img and qemu-io (qemu-utils). Standard library only.
"""

import os
import shutil
import struct
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.abspath(sys.argv[1]) if len(sys.argv) > 1 else os.path.join(HERE, "hostile")

MIB = 1 << 20
COPIED = 1 << 63
COMPRESSED = 1 << 62

# Header field offsets.
F_MAGIC, F_VERSION, F_BACKING_OFFSET, F_CLUSTER_BITS, F_SIZE = 0, 4, 8, 20, 24
F_CRYPT, F_L1_SIZE, F_L1_OFFSET, F_RT_OFFSET, F_RT_CLUSTERS = 32, 36, 40, 48, 56
F_NB_SNAPSHOTS, F_SNAPSHOTS_OFFSET, F_INCOMPAT, F_REFCOUNT_ORDER = 60, 64, 72, 96
F_HEADER_LENGTH, F_COMPRESSION_TYPE = 100, 104

ENV = dict(os.environ, LC_ALL="C")

CASES = []  # (file, when, kind, structure, offset or None, description)


def run(*args, cwd=None):
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, env=ENV, cwd=cwd)


class Base:
    """A qemu-made image, loaded as bytes, with its layout read from the header."""

    def __init__(self, tmp, name, cluster=512, compat="1.1", writes=(), opts="", backing=None,
                 size="64K"):
        path = os.path.join(tmp, name)
        o = f"cluster_size={cluster},compat={compat}" + (f",{opts}" if opts else "")
        cmd = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", o]
        if backing is not None:
            cmd += ["-u", "-b", backing, "-F", "qcow2"]
        run(*cmd, path, size, cwd=tmp)
        for w in writes:
            run("qemu-io", "-f", "qcow2", "-c", w, path)
        with open(path, "rb") as f:
            self.bytes = bytearray(f.read())
        b = self.bytes
        self.cluster = be32(b, F_CLUSTER_BITS)
        self.cluster = 1 << self.cluster
        assert self.cluster == cluster
        self.l1_offset = be64(b, F_L1_OFFSET)
        self.l1_size = be32(b, F_L1_SIZE)
        self.rt_offset = be64(b, F_RT_OFFSET)
        l1e = be64(b, self.l1_offset) if len(b) >= self.l1_offset + 8 else 0
        self.l2_offset = l1e & 0x00FF_FFFF_FFFF_FE00
        self.data_offset = None
        if self.l2_offset:
            self.data_offset = be64(b, self.l2_offset) & 0x00FF_FFFF_FFFF_FE00

    def copy(self):
        return bytearray(self.bytes)


def be32(b, off):
    return struct.unpack_from(">I", b, off)[0]


def be64(b, off):
    return struct.unpack_from(">Q", b, off)[0]


def p8(b, off, v):
    struct.pack_into(">B", b, off, v)


def p16(b, off, v):
    struct.pack_into(">H", b, off, v)


def p32(b, off, v):
    struct.pack_into(">I", b, off, v)


def p64(b, off, v):
    struct.pack_into(">Q", b, off, v)


def case(file, data, when, kind, structure, offset, description):
    assert not any(c[0] == file for c in CASES), file
    with open(os.path.join(OUT, file), "wb") as f:
        f.write(bytes(data))
    CASES.append((file, when, kind, structure, offset, description))


def extension(b, at, kind, payload, declared_len=None):
    """Writes one header extension at `at` followed by the end marker."""
    n = len(payload) if declared_len is None else declared_len
    p32(b, at, kind)
    p32(b, at + 4, n)
    b[at + 8 : at + 8 + len(payload)] = payload
    end = at + 8 + ((len(payload) + 7) & ~7)
    b[end : end + 8] = bytes(8)


def snapshot_entry(l1_offset, l1_size, sid, name, extra, extra_size=None, name_size=None):
    """One snapshot table entry with fixed (zero) dates."""
    e = bytearray(40)
    p64(e, 0, l1_offset)
    p32(e, 8, l1_size)
    p16(e, 12, len(sid))
    p16(e, 14, len(name) if name_size is None else name_size)
    # date_sec, date_nsec, vm_clock_nsec, vm_state_size stay 0: deterministic.
    p32(e, 36, len(extra) if extra_size is None else extra_size)
    return e + extra + sid + name


def build(tmp):
    # 512-byte clusters, 64 KiB: header, reftable 0x200, refblock 0x400, L1 (2 entries) 0x600.
    empty = Base(tmp, "empty.qcow2")
    # The same with an L2 table at 0x800 (guest cluster 0 written as zeros: no data cluster).
    zl2 = Base(tmp, "zl2.qcow2", writes=["write -z 0 512"])
    # The same with a data cluster at 0xa00.
    data = Base(tmp, "data.qcow2", writes=["write -P 0x5a 0 512"])
    v2 = Base(tmp, "v2.qcow2", compat="0.10", writes=["write -z 0 512"])
    # 1 KiB clusters (512-byte clusters have no unaligned offsets: bits 0-8 are reserved bits).
    c1k = Base(tmp, "c1k.qcow2", cluster=1024, writes=["write -z 0 1024"])
    comp = Base(tmp, "comp.qcow2", writes=["write -c -P 0x5a 0 512"])
    # 16 KiB clusters, the smallest extended L2 allows.
    ext = Base(tmp, "ext.qcow2", cluster=16384, opts="extended_l2=on", size="1M")
    assert (empty.l1_offset, empty.l1_size, empty.rt_offset) == (0x600, 2, 0x200)
    assert len(empty.bytes) == 0x610
    assert (zl2.l2_offset, len(zl2.bytes)) == (0x800, 0xA00)
    assert (data.l2_offset, data.data_offset, len(data.bytes)) == (0x800, 0xA00, 0xC00)
    assert (v2.l2_offset, len(v2.bytes), be32(v2.bytes, F_VERSION)) == (0x800, 0xA00, 2)
    assert (c1k.l1_offset, c1k.l2_offset, len(c1k.bytes)) == (0xC00, 0x1000, 0x1400)
    assert comp.l2_offset == 0x800
    assert (ext.rt_offset, ext.l1_offset, ext.l1_size) == (0x4000, 0xC000, 1)

    # ---------------------------------------------------------------- header fields (open)
    # Cases marked `cut` are refused by the header fields alone, which every reader decodes
    # before it locates any table, so their files keep only the 512-byte header cluster (the
    # corpus must stay small). The others keep the whole image: the file length matters to them.
    def header_case(file, patch, kind, field, offset, description, cut=False):
        b = empty.copy()
        patch(b)
        if cut:
            del b[empty.cluster :]
            description += " (header cluster only)"
        case(file, b, "open", kind, f"header field {field}", offset, description)

    header_case("bad-magic.qcow2", lambda b: p32(b, F_MAGIC, 0x514649FC),
                "Corrupt", "magic", F_MAGIC, "magic is QFI\\xfc instead of QFI\\xfb", cut=True)
    header_case("version-1.qcow2", lambda b: p32(b, F_VERSION, 1),
                "Unsupported", "version", F_VERSION, "version 1 (qcow, not qcow2)", cut=True)
    header_case("version-4.qcow2", lambda b: p32(b, F_VERSION, 4),
                "Unsupported", "version", F_VERSION, "version 4 does not exist", cut=True)
    header_case("cluster-bits-8.qcow2", lambda b: p32(b, F_CLUSTER_BITS, 8),
                "Corrupt", "cluster_bits", F_CLUSTER_BITS, "cluster_bits 8 (256-byte clusters, below 512)", cut=True)
    header_case("cluster-bits-22.qcow2", lambda b: p32(b, F_CLUSTER_BITS, 22),
                "Corrupt", "cluster_bits", F_CLUSTER_BITS, "cluster_bits 22 (4 MiB clusters, above QEMU's 2 MiB)", cut=True)
    header_case("l1-size-over-32mib.qcow2", lambda b: p32(b, F_L1_SIZE, (32 * MIB // 8) + 1),
                "Corrupt", "l1_size", F_L1_SIZE, "l1_size 0x400001: one entry more than 32 MiB of L1")
    header_case("l1-size-at-limit-past-eof.qcow2", lambda b: p32(b, F_L1_SIZE, 32 * MIB // 8),
                "Corrupt", "l1_table_offset", F_L1_OFFSET,
                "l1_size 0x400000 (exactly 32 MiB, allowed) but the file ends 16 bytes into it: "
                "must be refused before allocating 32 MiB")
    header_case("l1-size-too-small.qcow2", lambda b: p32(b, F_L1_SIZE, 1),
                "Corrupt", "l1_size", F_L1_SIZE, "l1_size 1 cannot cover 64 KiB with 512-byte clusters (needs 2)")
    header_case("l1-offset-unaligned.qcow2", lambda b: p64(b, F_L1_OFFSET, 0x610),
                "Corrupt", "l1_table_offset", F_L1_OFFSET, "l1_table_offset 0x610 is not cluster aligned")
    header_case("l1-offset-beyond-eof.qcow2", lambda b: p64(b, F_L1_OFFSET, 0x100000),
                "Corrupt", "l1_table_offset", F_L1_OFFSET, "l1_table_offset 0x100000 is past the end of the 1552-byte file")
    header_case("reftable-offset-unaligned.qcow2", lambda b: p64(b, F_RT_OFFSET, 0x210),
                "Corrupt", "refcount_table_offset", F_RT_OFFSET, "refcount_table_offset 0x210 is not cluster aligned")
    header_case("reftable-offset-beyond-eof.qcow2", lambda b: p64(b, F_RT_OFFSET, 0x100000),
                "Corrupt", "refcount_table_offset", F_RT_OFFSET, "refcount_table_offset 0x100000 is past the end of the file")
    header_case("reftable-offset-zero.qcow2", lambda b: p64(b, F_RT_OFFSET, 0),
                "Corrupt", "refcount_table_offset", F_RT_OFFSET, "refcount_table_offset 0 (the refcount table would be the header)")
    header_case("reftable-clusters-zero.qcow2", lambda b: p32(b, F_RT_CLUSTERS, 0),
                "Corrupt", "refcount_table_clusters", F_RT_CLUSTERS, "refcount_table_clusters 0")
    header_case("reftable-clusters-huge.qcow2", lambda b: p32(b, F_RT_CLUSTERS, 0xFFFFFFFF),
                "Corrupt", "refcount_table_clusters", F_RT_CLUSTERS,
                "refcount_table_clusters 0xffffffff (2 TiB of refcount table, limit 8 MiB)")
    header_case("refcount-order-7.qcow2", lambda b: p32(b, F_REFCOUNT_ORDER, 7),
                "Corrupt", "refcount_order", F_REFCOUNT_ORDER, "refcount_order 7 (128-bit refcounts; maximum is 6)", cut=True)
    header_case("header-length-100.qcow2", lambda b: p32(b, F_HEADER_LENGTH, 100),
                "Corrupt", "header_length", F_HEADER_LENGTH, "v3 header_length 100, below the 104 minimum", cut=True)
    header_case("header-length-over-cluster.qcow2", lambda b: p32(b, F_HEADER_LENGTH, 1024),
                "Corrupt", "header_length", F_HEADER_LENGTH, "header_length 1024, larger than the 512-byte cluster", cut=True)

    def many_snapshots(b):
        p32(b, F_NB_SNAPSHOTS, 100000)
        p64(b, F_SNAPSHOTS_OFFSET, 0x800)

    header_case("nb-snapshots-100000.qcow2", many_snapshots,
                "Corrupt", "nb_snapshots", F_NB_SNAPSHOTS, "nb_snapshots 100000, above QEMU's 65536")

    def snapshots_past_eof(b):
        p32(b, F_NB_SNAPSHOTS, 1)
        p64(b, F_SNAPSHOTS_OFFSET, 0x100000)

    header_case("snapshots-offset-beyond-eof.qcow2", snapshots_past_eof,
                "Corrupt", "snapshots_offset", F_SNAPSHOTS_OFFSET, "one snapshot at 0x100000, past the end of the file")
    # A legacy AES image has no header of its own to check: what is refused is the L1 table
    # the cut leaves past the end of the file.
    header_case("crypt-method-1.qcow2", lambda b: p32(b, F_CRYPT, 1),
                "Corrupt", "l1_table_offset", F_L1_OFFSET, "crypt_method 1 (legacy AES), its L1 table cut off", cut=True)
    header_case("crypt-method-2.qcow2", lambda b: p32(b, F_CRYPT, 2),
                "Corrupt", "crypt_method", F_CRYPT, "crypt_method 2 (LUKS) without its LUKS header extension", cut=True)
    header_case("incompat-bit-5.qcow2", lambda b: p64(b, F_INCOMPAT, 1 << 5),
                "Unsupported", "incompatible_features", F_INCOMPAT, "unknown incompatible feature bit 5", cut=True)

    def compression_type_2(b):
        p64(b, F_INCOMPAT, 1 << 3)
        p8(b, F_COMPRESSION_TYPE, 2)

    header_case("compression-type-2.qcow2", compression_type_2,
                "Unsupported", "compression_type", F_COMPRESSION_TYPE,
                "compression_type 2 (unknown), with incompatible bit 3 set", cut=True)
    header_case("compression-bit-without-type.qcow2", lambda b: p64(b, F_INCOMPAT, 1 << 3),
                "Corrupt", "compression_type", F_COMPRESSION_TYPE,
                "incompatible bit 3 (compression type) set but compression_type is 0", cut=True)
    header_case("virtual-size-2-63.qcow2", lambda b: p64(b, F_SIZE, 1 << 63),
                "Corrupt", "size", F_SIZE, "virtual size 2^63", cut=True)

    # ---------------------------------------------------------------- header extensions (open)
    ext_at = 0x70  # header_length 112: extensions start right after the header

    def ext_case(file, kind_magic, payload, declared, kind, structure, description):
        b = empty.copy()[: empty.cluster]  # the header cluster decides (see header_case)
        extension(b, ext_at, kind_magic, payload, declared)
        description += " (header cluster only)"
        case(file, b, "open", kind, structure, ext_at, description)

    ext_case("ext-past-cluster.qcow2", 0x12345678, b"\xAB" * 8, 0x1000, "Corrupt",
             "header extension 0x12345678",
             "unknown extension at 0x70 declares 4096 bytes: runs past the 512-byte header cluster")
    ext_case("ext-bitmaps-wrong-length.qcow2", 0x23852875, struct.pack(">IIQ", 1, 0, 0), None,
             "Corrupt", "bitmaps extension", "bitmaps extension of 16 bytes instead of 24")
    ext_case("ext-backing-format-20-bytes.qcow2", 0xE2792ACA, b"qcow2qcow2qcow2qcow2", None,
             "Corrupt", "backing format extension", "backing format extension of 20 bytes (QEMU's limit is 15)")
    ext_case("ext-encryption.qcow2", 0x0537BE77, struct.pack(">QQ", 0x10000, 0x1000), None,
             "Corrupt", "full disk encryption extension",
             "full disk encryption header pointer extension on a clear image (crypt_method 0)")

    # ---------------------------------------------------------------- L1 entries (read)
    l1 = empty.l1_offset

    def l1_case(file, entry, structure_off, description, base=empty):
        b = base.copy()
        p64(b, base.l1_offset, entry)
        case(file, b, "read", "Corrupt", "L1 entry 0", structure_off, description)

    l1_case("l1-entry-at-l1.qcow2", COPIED | l1, l1,
            "L1 entry 0 points at the L1 table itself (0x600) as its L2 table")
    l1_case("l1-entry-at-reftable.qcow2", COPIED | empty.rt_offset, l1,
            "L1 entry 0 points at the refcount table (0x200) as its L2 table")
    l1_case("l1-entry-beyond-eof.qcow2", COPIED | 0x100000, l1,
            "L1 entry 0 points at 0x100000, past the end of the file")
    l1_case("l1-entry-unaligned.qcow2", COPIED | (c1k.l2_offset + 0x200), c1k.l1_offset,
            "1 KiB clusters: L1 entry 0 points at 0x1200 (inside its real L2 table at 0x1000), "
            "not cluster aligned", base=c1k)
    l1_case("l1-entry-reserved-bits.qcow2", COPIED | (1 << 56) | 0x800, l1,
            "L1 entry 0 has reserved bit 56 set")

    # ---------------------------------------------------------------- L2 entries (read)
    def l2_case(file, entry, description, base=zl2):
        b = base.copy()
        p64(b, base.l2_offset, entry)
        case(file, b, "read", "Corrupt", "L2 entry 0", base.l2_offset, description)

    l2_case("l2-data-overlaps-l1.qcow2", COPIED | data.l1_offset,
            "L2 entry 0 maps guest cluster 0 to the L1 table (0x600)")
    l2_case("l2-data-beyond-eof.qcow2", COPIED | 0x100000,
            "L2 entry 0 maps guest cluster 0 to 0x100000, past the end of the file")
    l2_case("l2-data-unaligned.qcow2", COPIED | (c1k.l2_offset + 0x200),
            "1 KiB clusters: L2 entry 0 maps guest cluster 0 to 0x1200, not cluster aligned", base=c1k)
    l2_case("l2-reserved-bits.qcow2", COPIED | (1 << 56) | data.data_offset,
            "L2 entry 0 maps guest cluster 0 to its data at 0xa00 but has reserved bit 56 set",
            base=data)
    l2_case("l2-zero-flag-v2.qcow2", 1,
            "version 2 image whose L2 entry 0 has the zero flag (bit 0), which only v3 has", base=v2)
    l2_case("compressed-beyond-eof.qcow2", COMPRESSED | 0x100000,
            "L2 entry 0 is a compressed descriptor whose data is at 0x100000, past the end of the file")
    l2_case("compressed-into-header.qcow2", COMPRESSED | 0x100,
            "L2 entry 0 is a compressed descriptor whose data is at 0x100, inside the header cluster")

    # Garbage compressed data: QEMU's compressed cluster at 0xa00, overwritten with 0xff bytes
    # (deflate block type 3, which does not exist). The entry and length are rewritten so the
    # file does not depend on the zlib version that compressed it.
    b = comp.copy()
    assert be64(b, comp.l2_offset) & COMPRESSED
    p64(b, comp.l2_offset, COMPRESSED | 0xA00)
    del b[0xA00:]
    b.extend(b"\xff" * 16)
    case("compressed-garbage.qcow2", b, "read", "Corrupt", "compressed cluster", 0xA00,
         "L2 entry 0 is a compressed cluster at 0xa00 whose 16 bytes are 0xff: deflate fails")

    # ---------------------------------------------------------------- extended L2 (read)
    # 16 KiB clusters (the smallest extended L2 allows). The refcount block cluster (0x8000) is
    # reused as the L2 table so the file stays at QEMU's 48 KiB + 8 (refcounts are then wrong,
    # which only check() notices).
    def ext_l2_case(file, word0, bitmap, description):
        b = ext.copy()
        l2 = 0x8000
        b[l2 : l2 + ext.cluster] = bytes(ext.cluster)
        p64(b, ext.l1_offset, COPIED | l2)
        p64(b, l2, word0)
        p64(b, l2 + 8, bitmap)
        case(file, b, "read", "Corrupt", "L2 entry 0", l2, description)

    ext_l2_case("extl2-alloc-and-zero.qcow2", COPIED | 0x10000, (1 << 32) | 1,
                "extended L2 entry 0: subcluster 0 has both its allocation and its zero bit set")
    ext_l2_case("extl2-alloc-unallocated.qcow2", 0, 0x3,
                "extended L2 entry 0: no host cluster, but subclusters 0 and 1 are marked allocated")

    # ---------------------------------------------------------------- snapshot table
    snap_at = len(zl2.bytes)  # 0xa00, cluster aligned: the table goes at the end of the file
    extra = struct.pack(">QQ", 0, 64 << 10)  # vm_state_size_large, disk_size

    def snap_case(file, entry, when, structure, offset, description, nb=1, table_offset=snap_at):
        b = zl2.copy()
        b.extend(entry)
        p32(b, F_NB_SNAPSHOTS, nb)
        p64(b, F_SNAPSHOTS_OFFSET, table_offset)
        case(file, b, when, "Corrupt", structure, offset, description)

    snap_case("snapshot-extra-data-2000.qcow2",
              snapshot_entry(zl2.l1_offset, 2, b"1", b"s1", bytes(2000)),
              "open", "snapshot table entry 0", snap_at,
              "snapshot entry 0 (at 0xa00) has extra_data_size 2000 (limit 1024)")
    # Written without the padding: the file ends 2 bytes into the declared 65535-byte name.
    b = zl2.copy()
    b.extend(snapshot_entry(zl2.l1_offset, 2, b"1", b"s1", extra, name_size=0xFFFF))
    p32(b, F_NB_SNAPSHOTS, 1)
    p64(b, F_SNAPSHOTS_OFFSET, snap_at)
    case("snapshot-name-past-eof.qcow2", b, "open", "Corrupt", "snapshot table entry 0", snap_at,
         "snapshot entry 0 (at 0xa00) declares a 65535-byte name; the file ends 2 bytes into it")
    snap_case("snapshot-l1-unaligned.qcow2",
              snapshot_entry(0x610, 2, b"1", b"unaligned", extra),
              "snapshot:unaligned", "L1 table of snapshot 1", 0x610,
              "snapshot 1 'unaligned' has its L1 table at 0x610, not cluster aligned "
              "(the image opens; opening the snapshot fails)")
    # A snapshot with its own (empty) L1 table of 2 entries at 0xa00 and the table at 0xc00,
    # whose extra data claims a disk size of 2^62: far more than 2 L1 entries can map.
    b = zl2.copy()
    b.extend(bytes(512))  # the snapshot's L1 table: 2 zero entries, padded to the cluster
    table = len(b)
    b.extend(snapshot_entry(snap_at, 2, b"1", b"huge", struct.pack(">QQ", 0, 1 << 62)))
    p32(b, F_NB_SNAPSHOTS, 1)
    p64(b, F_SNAPSHOTS_OFFSET, table)
    case("snapshot-disk-size-huge.qcow2", b, "snapshot:huge", "Corrupt", "L1 table of snapshot 1",
         snap_at, "snapshot 1 'huge' records a disk size of 2^62 but its L1 table at 0xa00 has 2 "
         "entries (64 KiB): opening the snapshot must fail, not give a 4 EiB view")
    snap_case("snapshot-table-over-reftable.qcow2", b"", "open", "snapshot table", zl2.rt_offset,
              "snapshots_offset 0x200 puts the one-entry snapshot table on the refcount table",
              table_offset=zl2.rt_offset)

    # ---------------------------------------------------------------- truncated files (open)
    case("truncated-0.qcow2", b"", "open", "Corrupt", "header", 0, "empty file")
    case("truncated-50.qcow2", zl2.bytes[:50], "open", "Corrupt", "header", 0,
         "the first 50 bytes of an image: the header is cut short")
    case("truncated-header-cluster.qcow2", zl2.bytes[:512], "open", "Corrupt",
         "header field l1_table_offset", F_L1_OFFSET,
         "only the 512-byte header cluster: the L1 table at 0x600 is missing")

    # ---------------------------------------------------------------- backing chains (open)
    def backing_case(file, backing, when_kind, description):
        b = Base(tmp, file, backing=backing)
        case(file, b.bytes, "open", when_kind, "-", None, description)

    backing_case("backing-self.qcow2", "backing-self.qcow2", "Chain:Loop",
                 "names itself as its backing file")
    backing_case("backing-loop-a.qcow2", "backing-loop-b.qcow2", "Chain:Loop",
                 "backing file is backing-loop-b.qcow2, whose backing file is this image")
    backing_case("backing-loop-b.qcow2", "backing-loop-a.qcow2", "Chain:Loop",
                 "backing file is backing-loop-a.qcow2, whose backing file is this image")
    backing_case("backing-missing.qcow2", "no-such-backing-file.qcow2", "Chain:Missing",
                 "backing file no-such-backing-file.qcow2 does not exist")


def write_manifest():
    with open(os.path.join(OUT, "expected.tsv"), "w") as f:
        for file, when, kind, structure, offset, _ in CASES:
            off = "-" if offset is None else f"{offset:#x}"
            f.write(f"{file}\t{when}\t{kind}\t{structure}\t{off}\n")


def write_readme():
    total = sum(os.path.getsize(os.path.join(OUT, c[0])) for c in CASES)
    lines = [
        "# Hostile qcow2 images",
        "",
        "Generated by `testdata/make-hostile.py` (do not edit by hand; re-run the script). Each image",
        "is a small valid image made by qemu-img/qemu-io (512-byte clusters, 64 KiB virtual size unless",
        "noted), broken in one place. `qcow2/tests/hostile.rs` proves the engine answers each with a",
        "typed error naming the structure and its offset, and never panics, hangs or over-allocates.",
        "",
        "`expected.tsv` columns: file, when the error appears (`open`, `read` = reading the whole",
        "disk, `snapshot:NAME` = opening that snapshot), error kind, a substring of the error's",
        "`structure`, and its offset (`-` for chain and I/O errors, which have none).",
        "",
        "The 70-deep backing chain (over the default limit of 64) is generated at test time.",
        "",
        "\"Header cluster only\": the file keeps just its 512-byte header cluster (to keep the corpus",
        "under 200 KiB). Those faults are in header fields that are decoded before any table is",
        "located, so the missing tables are never reached. The two extended-L2 images need 16 KiB",
        "clusters and are 48 KiB each, the smallest file that holds their header, refcount table, L1 and L2.",
        "",
        "Files the engine does not yet handle as expected are marked `#[ignore = \"engine bug: ...\"]`",
        "in the tests (currently `snapshot-disk-size-huge.qcow2`).",
        "",
        f"{len(CASES)} files, {total} bytes in total.",
        "",
        "| File | When | Error | Structure | Offset | What is wrong |",
        "|------|------|-------|-----------|-------:|---------------|",
    ]
    for file, when, kind, structure, offset, description in CASES:
        off = "-" if offset is None else f"{offset:#x}"
        desc = description.replace("|", "\\|")
        lines.append(f"| `{file}` | {when} | {kind} | {structure} | {off} | {desc} |")
    with open(os.path.join(OUT, "README.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    if os.path.isdir(OUT):
        for name in os.listdir(OUT):
            if name.endswith(".qcow2") or name in ("expected.tsv", "README.md"):
                os.remove(os.path.join(OUT, name))
    os.makedirs(OUT, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="make-hostile-")
    try:
        build(tmp)
    finally:
        shutil.rmtree(tmp)
    write_manifest()
    write_readme()
    total = sum(os.path.getsize(os.path.join(OUT, c[0])) for c in CASES)
    print(f"{len(CASES)} hostile images, {total} bytes, in {OUT}")


if __name__ == "__main__":
    main()
