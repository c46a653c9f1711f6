"""The guest-visible stall of a live 4-disk group snapshot, ours against qemu-storage-daemon.

Each server serves four qcow2 disks over NBD (one unix socket) and takes QMP on a second
socket. fio's nbd engine writes 4K blocks at random to all four (one job per disk) and logs
the completion time and latency of every request. Halfway through, one QMP `transaction` with
four `blockdev-snapshot-internal-sync` actions snapshots the disks (with SNAPSHOT=external, four
`blockdev-snapshot-sync` actions: the disks move to new overlays). A control run does the same
without the snapshot. For each run the table gives the longest window in which no request
completed on any disk (the stall a guest sees), the same for the disk that waited longest, the
worst completion latency, and how long the QMP command took. Servers alternate within each round; the table shows medians over rounds.

Run through benches/live_snapshot_stall.sh, which builds the tool and the QMP client's venv.
Environment: ROUNDS (3), RUNTIME (seconds of fio per run, 6), SIZES ("1G 16G"), IODEPTH (4),
SERVERS ("ours qsd"; "ours-none" and "qsd-none" serve around the page cache, cache=none),
SNAPSHOT ("internal" or "external"), QCOW2_BENCH_DIR (fixtures).
"""

import asyncio
import glob
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from qemu.qmp import QMPClient

DISKS = ["d0", "d1", "d2", "d3"]


def env(name, default):
    return os.environ.get(name, default)


ROUNDS = int(env("ROUNDS", "3"))
RUNTIME = float(env("RUNTIME", "6"))
SIZES = env("SIZES", "1G 16G").split()
IODEPTH = int(env("IODEPTH", "4"))
SERVERS = env("SERVERS", "ours qsd").split()
SNAPSHOT = env("SNAPSHOT", "internal")
if SNAPSHOT not in ("internal", "external"):
    sys.exit(f"SNAPSHOT must be internal or external, not {SNAPSHOT}")


def fixture(fixtures, size):
    """A qcow2 image of `size` with every cluster allocated (metadata preallocation: every L2
    entry points at a host cluster, so a snapshot raises the refcount of every cluster)."""
    path = os.path.join(fixtures, f"pristine-{size}.qcow2")
    if not os.path.exists(path):
        print(f"making {path}", file=sys.stderr)
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-o",
             "cluster_size=64k,preallocation=metadata", path + ".tmp", size],
            check=True)
        os.rename(path + ".tmp", path)
    return path


def wait_for(path, proc, what):
    for _ in range(1000):
        if os.path.exists(path):
            return
        if proc.poll() is not None:
            sys.exit(f"{what} exited with {proc.returncode}")
        time.sleep(0.01)
    sys.exit(f"{what} did not create {path}")


def start_server(kind, tool, work, images):
    nbd = os.path.join(work, "nbd.sock")
    qmp = os.path.join(work, "qmp.sock")
    direct = kind.endswith("-none")
    if kind.startswith("ours"):
        group = os.path.join(work, "group")
        argv = [tool, "serve", "-t", "-e", "0", "-k", nbd, "--qmp", qmp, "--group", group]
        if direct:
            argv += ["--cache=none"]
        argv += [f"{d}={p}" for d, p in zip(DISKS, images)]
    else:
        argv = ["qemu-storage-daemon"]
        cache = "on" if direct else "off"
        for d, p in zip(DISKS, images):
            argv += ["--blockdev", f"driver=file,filename={p},node-name=f{d},cache.direct={cache}",
                     "--blockdev", f"driver=qcow2,file=f{d},node-name={d}"]
        argv += ["--nbd-server", f"addr.type=unix,addr.path={nbd}"]
        for d in DISKS:
            argv += ["--export", f"type=nbd,id=e{d},node-name={d},name={d},writable=on"]
        argv += ["--chardev", f"socket,path={qmp},server=on,wait=off,id=mon",
                 "--monitor", "chardev=mon"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    wait_for(nbd, proc, kind)
    wait_for(qmp, proc, kind)
    return proc, nbd, qmp


def overlay_of(image):
    return image[:-len(".qcow2")] + ".top.qcow2"


def snapshot_action(disk, image, name):
    if SNAPSHOT == "external":
        return {"type": "blockdev-snapshot-sync",
                "data": {"node-name": disk, "snapshot-file": overlay_of(image),
                         "snapshot-node-name": f"{disk}-top", "format": "qcow2"}}
    return {"type": "blockdev-snapshot-internal-sync", "data": {"device": disk, "name": name}}


async def snapshot(qmp_path, images, name, delay):
    """Waits `delay` seconds, then runs the 4-disk transaction; returns (sent, returned) in
    Unix milliseconds."""
    qmp = QMPClient("stall-bench")
    await qmp.connect(qmp_path)
    await asyncio.sleep(delay)
    sent = time.time() * 1000
    await qmp.execute("transaction", {"actions": [
        snapshot_action(d, p, name) for d, p in zip(DISKS, images)]})
    returned = time.time() * 1000
    await qmp.disconnect()
    return sent, returned


async def quit_server(qmp_path):
    qmp = QMPClient("stall-bench")
    await qmp.connect(qmp_path)
    try:
        await qmp.execute("quit")
        await qmp.disconnect()
    except (EOFError, ConnectionResetError):
        pass  # qemu-storage-daemon may close the socket before the client's goodbye



def read_logs(prefix):
    """Per job (disk): (completion time in ms, latency in ms) of every logged request."""
    jobs = []
    for path in glob.glob(prefix + "_clat.*.log"):
        done = []
        with open(path) as f:
            for line in f:
                fields = line.split(",")
                done.append((int(fields[0]), int(fields[1]) / 1e6))
        jobs.append(done)
    return jobs


def longest_gap(times, low, high):
    """The longest time between consecutive completions among gaps that overlap [low, high]."""
    times = sorted(times)
    return max((b - a for a, b in zip(times, times[1:]) if b >= low and a <= high),
               default=float("nan"))


def measure(kind, tool, work, pristine, with_snapshot):
    images = []
    for d in DISKS:
        path = os.path.join(work, f"{d}.qcow2")
        subprocess.run(["cp", "--sparse=always", pristine, path], check=True)
        images.append(path)
    proc, nbd, qmp = start_server(kind, tool, work, images)
    prefix = os.path.join(work, "lat")
    fio = ["fio", "--ioengine=nbd", "--rw=randwrite", "--bs=4k", f"--iodepth={IODEPTH}",
           "--time_based", f"--runtime={RUNTIME}", f"--write_lat_log={prefix}",
           "--log_avg_msec=0", "--log_unix_epoch=1", "--output=/dev/null"]
    for d in DISKS:
        fio += [f"--name={d}", f"--uri=nbd+unix:///{d}?socket={nbd}"]
    started = time.time() * 1000
    fio_proc = subprocess.Popen(fio)
    sent = returned = None
    try:
        if with_snapshot:
            sent, returned = asyncio.run(snapshot(qmp, images, "stall", RUNTIME / 2))
        if fio_proc.wait() != 0:
            sys.exit(f"fio failed against {kind}")
        asyncio.run(quit_server(qmp))
        proc.wait(timeout=60)
    finally:
        for p in (fio_proc, proc):
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()
    jobs = read_logs(prefix)
    done = [d for job in jobs for d in job]
    for path in glob.glob(prefix + "_*.log"):
        os.remove(path)
    if with_snapshot:
        for path in images:
            if SNAPSHOT == "external":
                out = subprocess.run(["qemu-img", "info", overlay_of(path)], check=True,
                                     capture_output=True, text=True).stdout
                if "backing file: " not in out:
                    sys.exit(f"{kind}: no overlay over {path}")
                path = overlay_of(path)
            else:
                out = subprocess.run(["qemu-img", "snapshot", "-l", path], check=True,
                                     capture_output=True, text=True).stdout
                if "stall" not in out:
                    sys.exit(f"{kind}: no snapshot in {path}")
            subprocess.run(["qemu-img", "check", "-q", path], check=True)
    # Gaps that overlap the middle of the run (one second after the start to one second before
    # the planned end), so ramp-up and the jobs' staggered ends do not count as stalls, while a
    # stall that runs past the planned end still counts in full: on all disks together, and on
    # the disk that waited longest.
    low, high = started + 1000, started + (RUNTIME - 1) * 1000
    gap = longest_gap([t for t, _ in done], low, high)
    disk_gap = max(longest_gap([t for t, _ in job], low, high) for job in jobs)
    worst = max((lat for _, lat in done), default=float("nan"))
    qmp_ms = returned - sent if with_snapshot else float("nan")
    return gap, disk_gap, worst, qmp_ms, len(done)


def main():
    tool, fixtures = sys.argv[1], sys.argv[2]
    os.makedirs(fixtures, exist_ok=True)
    results = {}
    for size in SIZES:
        pristine = fixture(fixtures, size)
        for round_no in range(ROUNDS):
            for kind in SERVERS:
                for with_snapshot in (False, True):
                    work = tempfile.mkdtemp(dir=fixtures, prefix="run-")
                    try:
                        r = measure(kind, tool, work, pristine, with_snapshot)
                    finally:
                        shutil.rmtree(work)
                    results.setdefault((size, kind, with_snapshot), []).append(r)
                    label = "snapshot" if with_snapshot else "control"
                    print(f"{size} round {round_no + 1} {kind} {label}: longest gap "
                          f"{r[0]:.0f} ms (one disk {r[1]:.0f} ms), worst latency "
                          f"{r[2]:.1f} ms, qmp {r[3]:.1f} ms, {r[4]} writes", file=sys.stderr)
    print(f"\n{ROUNDS} rounds, medians; {IODEPTH} requests in flight per disk, "
          f"{RUNTIME:.0f} s of 4K random writes per run, {SNAPSHOT} snapshots\n")
    print("| size | server | run | longest window without a completion, all disks (ms) "
          "| the same on one disk (ms) | worst write latency (ms) | QMP transaction (ms) "
          "| writes |")
    print("|---|---|---|---|---|---|---|---|")
    for size in SIZES:
        for kind in SERVERS:
            for with_snapshot in (False, True):
                rs = results[(size, kind, with_snapshot)]
                med = [statistics.median(r[i] for r in rs) for i in range(5)]
                label = "snapshot" if with_snapshot else "control"
                qmp = f"{med[3]:.1f}" if with_snapshot else "-"
                print(f"| {size} | {kind} | {label} | {med[0]:.0f} | {med[1]:.0f} "
                      f"| {med[2]:.1f} | {qmp} | {med[4]:.0f} |")
    print()
    for size in SIZES:
        if "ours" in SERVERS and "qsd" in SERVERS:
            for i, what in ((0, "all disks"), (1, "one disk")):
                ours = statistics.median(r[i] for r in results[(size, "ours", True)])
                qsd = statistics.median(r[i] for r in results[(size, "qsd", True)])
                print(f"{size}, {what}: our stall / qemu-storage-daemon's = {ours / qsd:.2f}")


if __name__ == "__main__":
    main()
