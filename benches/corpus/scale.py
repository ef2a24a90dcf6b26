#!/usr/bin/env python3
"""What a C-node and the D-nodes spend on the reduction indexes as stored
data grows (BENCHMARKS.md, "Data reduction", scale).

Writes SIZE of unique data (from /dev/urandom, so every chunk is new and
lands in both indexes) into a fresh `dase mkfs --reduce full` file
system on 13 D-nodes through the mount, in files of 1 GiB, sampling the
mount's resident memory as it goes; then reports, per size reached, the
mount's RSS, the index bytes on the D-nodes, index lookups and page loads
per chunk and the peak of resident metadata pages (from the counters the
mount logs at unmount), and extrapolates the index bytes to a TB of logical data.

Usage: benches/corpus/scale.py WORK_DIR [--gib 1,2,4] [--cache-pages N] [--dase PATH]
Needs root (FUSE). WORK_DIR needs about 1.4x the largest size free.
"""
import argparse
import json
import os
import re
import subprocess
import threading
import time


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def rss(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except FileNotFoundError:
        pass
    return 0


def run(a, gib):
    work = os.path.join(a.work, f"scale-{gib}")
    sh(["rm", "-rf", work])
    os.makedirs(work)
    cluster = os.path.join(work, "cluster.toml")
    mnt = os.path.join(work, "mnt")
    os.makedirs(mnt)
    per_node = max(2, (gib * 14 // 10) // 10 + 2)
    nodes = subprocess.Popen([a.dase, "cluster", "up", "--dir", work, "--dnodes", "13",
                              "--size", f"{per_node}G", "--log", "warn"])
    try:
        for _ in range(100):
            if os.path.exists(cluster):
                break
            time.sleep(0.1)
        time.sleep(1)
        sh([a.dase, "mkfs", "--cluster", cluster, "--reduce", "full", "--force"],
           stdout=subprocess.DEVNULL)
        log = open(os.path.join(work, "mount.log"), "w")
        m = subprocess.Popen([a.dase, "mount", "--cluster", cluster, "--log", "info",
                              "--cache-pages", str(a.cache_pages), mnt], stderr=log,
                             stdout=subprocess.DEVNULL)
        for _ in range(100):
            if os.path.ismount(mnt):
                break
            time.sleep(0.1)
        peak, samples, stop = [0], [], threading.Event()

        def sample():
            while not stop.is_set():
                r = rss(m.pid)
                peak[0] = max(peak[0], r)
                time.sleep(0.2)

        t = threading.Thread(target=sample)
        t.start()
        t0 = time.time()
        for i in range(gib):
            # dd from /dev/urandom: unique, incompressible, 1 GiB a file.
            sh(["dd", "if=/dev/urandom", f"of={mnt}/f{i}", "bs=4M", "count=256",
                "status=none"])
            samples.append((i + 1, rss(m.pid), peak[0]))
        took = time.time() - t0
        sh(["umount", mnt])
        m.wait()
        stop.set()
        t.join()
        log.close()
        s = json.loads(sh([a.dase, "stats", "--cluster", cluster, "--json"],
                          stdout=subprocess.PIPE).stdout)
        text = open(os.path.join(work, "mount.log")).read()
        line = [l for l in text.splitlines() if "reduction since mount" in l]
        counters = dict(re.findall(r"(\w+)=(\d+)", line[-1])) if line else {}
        return dict(gib=gib, seconds=took, rss_peak=peak[0], rss_by_gib=samples, stats=s,
                    counters={k: int(v) for k, v in counters.items()})
    finally:
        nodes.terminate()
        nodes.wait()
        sh(["rm", "-rf", work])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("work")
    ap.add_argument("--gib", default="1,2,4")
    ap.add_argument("--cache-pages", type=int, default=512)
    ap.add_argument("--dase", default=os.path.join(os.path.dirname(__file__),
                                                   "../../build/release/dase"))
    a = ap.parse_args()
    a.dase = os.path.abspath(a.dase)
    print("| logical GiB | chunks | mount peak RSS MiB | RSS after each GiB (MiB) | index on the D-nodes MiB (all copies) | index bytes per TB logical | lookups per chunk | index page loads per chunk | peak resident metadata pages | MB/s through the mount |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for g in [int(x) for x in a.gib.split(",")]:
        r = run(a, g)
        s, c = r["stats"], r["counters"]
        idx = s["chunk_index_bytes"] + s["similar_index_bytes"]
        chunks = max(1, s["chunks"])
        per_tb = idx / s["logical_bytes"] * 1e12
        by = ", ".join(f"{x[1] / 2**20:.0f}" for x in r["rss_by_gib"])
        print(f"| {g} | {s['chunks']} | {r['rss_peak'] / 2**20:.0f} | {by} | {idx / 2**20:.1f} | "
              f"{per_tb / 1e9:.1f} GB | {c.get('index_lookups', 0) / chunks:.2f} | "
              f"{c.get('index_page_loads', 0) / chunks:.3f} | {c.get('peak_resident_pages', 0)} | "
              f"{s['logical_bytes'] / r['seconds'] / 1e6:.0f} |", flush=True)


if __name__ == "__main__":
    main()
