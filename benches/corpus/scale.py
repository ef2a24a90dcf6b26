#!/usr/bin/env python3
"""What a C-node and the D-nodes spend on the reduction indexes as stored
data grows (BENCHMARKS.md, "Data reduction", scale).

Writes SIZE of unique data (from /dev/urandom, so every chunk is new and
lands in both indexes) into a fresh `dase mkfs --reduce full` file
system on 13 D-nodes through the mount, in files of 1 GiB, reading the
mount's resident memory after each; then reports, per size reached, the
mount's RSS (and its peak, VmHWM), the index bytes on the D-nodes, index lookups and page loads
per chunk and the peak of resident metadata pages (from the counters the
mount logs at unmount), and extrapolates the index bytes to a TB of logical data.

With --fresh-gib N it then mounts again, as a fresh C-node would (after a
failover, say), with --warm-filters as given, writes N GiB more of unique
data and reports that mount's page loads per chunk, its warm-up and its
MB/s.

Usage: benches/corpus/scale.py WORK_DIR [--gib 1,2,4] [--cache-pages N]
       [--index-buffer N] [--index-filters MiB] [--fresh-gib N]
       [--warm-filters true|false] [--dase PATH]
Needs root (FUSE). WORK_DIR needs about 1.4x the largest size free.
"""
import argparse
import os
import re
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare import Dase, proc_status, sh  # noqa: E402


def run(a, gib):
    work = os.path.join(a.work, f"scale-{gib}")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    d = Dase(a.dase, work, size=f"{max(2, (gib * 14 // 10) // 10 + 2)}G")
    try:
        log_path = os.path.join(work, "mount.log")
        with open(log_path, "w") as log:
            m = d.mount(["--log", "info", "--cache-pages", str(a.cache_pages),
                         "--index-buffer", str(a.index_buffer),
                         "--index-filters", str(a.index_filters)], stderr=log)
            rss_by_gib = []
            mbs_by_gib = []
            t0 = time.time()
            for i in range(gib):
                # dd from /dev/urandom: unique, incompressible, 1 GiB a file.
                sh(["dd", "if=/dev/urandom", f"of={d.mnt}/f{i}", "bs=4M", "count=256",
                    "status=none"])
                rss_by_gib.append(proc_status(m.pid, "VmRSS"))
                mbs_by_gib.append(2**30 / (time.time() - t0 - sum(2**30 / x for x in mbs_by_gib)))
            took = time.time() - t0
            peak = proc_status(m.pid, "VmHWM")
            d.unmount(m)
        s = d.stats()
        line = [l for l in open(log_path).read().splitlines() if "reduction since mount" in l]
        counters = dict(re.findall(r"(\w+)=(\d+)", line[-1])) if line else {}
        fresh = fresh_mount(a, d, gib, work) if a.fresh_gib else None
        return dict(seconds=took, rss_peak=peak, rss_by_gib=rss_by_gib, mbs_by_gib=mbs_by_gib,
                    stats=s, fresh=fresh,
                    counters={k: int(v) for k, v in counters.items()})
    finally:
        d.close()
        shutil.rmtree(work, ignore_errors=True)


def fresh_mount(a, d, gib, work):
    """A second mount writing a.fresh_gib GiB of new data after the first."""
    log_path = os.path.join(work, "fresh.log")
    with open(log_path, "w") as log:
        m = d.mount(["--log", "info", "--cache-pages", str(a.cache_pages),
                     "--index-buffer", str(a.index_buffer),
                     "--index-filters", str(a.index_filters),
                     "--warm-filters", a.warm_filters], stderr=log, mkfs=False)
        mbs = []
        t0 = time.time()
        for i in range(a.fresh_gib):
            sh(["dd", "if=/dev/urandom", f"of={d.mnt}/g{i}", "bs=4M", "count=256",
                "status=none"])
            mbs.append(2**30 / (time.time() - t0 - sum(2**30 / x for x in mbs)))
        took = time.time() - t0
        d.unmount(m)
    text = open(log_path).read().splitlines()
    line = [l for l in text if "reduction since mount" in l]
    c = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line[-1])} if line else {}
    warm = [l for l in text if "index filters warmed" in l]
    w = {k: int(v) for k, v in re.findall(r" (\w+)=(\d+)", warm[-1])} if warm else {}
    chunks = max(1, c.get("chunks", 0))
    return dict(gib=a.fresh_gib, seconds=took, mbs=mbs,
                loads=c.get("index_page_loads", 0) / chunks,
                filtered=c.get("filtered_lookups", 0) / chunks,
                warmed=w.get("filters", 0), warm_ms=w.get("ms", 0))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("work")
    ap.add_argument("--gib", default="1,2,4")
    ap.add_argument("--cache-pages", type=int, default=512)
    ap.add_argument("--index-buffer", type=int, default=65536)
    ap.add_argument("--index-filters", type=int, default=64,
                    help="MiB of filters of evicted index buckets (0: none)")
    ap.add_argument("--fresh-gib", type=int, default=0,
                    help="then write this many GiB more through a fresh mount")
    ap.add_argument("--warm-filters", default="true", choices=["true", "false"],
                    help="the fresh mount's --warm-filters")
    ap.add_argument("--dase", default=os.path.join(os.path.dirname(__file__),
                                                   "../../build/release/dase"))
    a = ap.parse_args()
    a.dase = os.path.abspath(a.dase)
    print("| logical GiB | chunks | mount peak RSS MiB | RSS after each GiB (MiB) | index on the D-nodes MiB (all copies) | index bytes per TB logical | lookups per chunk | index page loads per chunk | lookups answered by filters per chunk | filters MiB at unmount | peak resident metadata pages | peak index entries buffered | buckets merged | writers waiting for merges s | writers held off by commits s | metadata log + pages MiB | capacity the metadata takes MiB | MB/s through the mount | MB/s of each GiB |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for g in [int(x) for x in a.gib.split(",")]:
        r = run(a, g)
        s, c = r["stats"], r["counters"]
        idx = s["chunk_index_bytes"] + s["similar_index_bytes"]
        chunks = max(1, s["chunks"])
        per_tb = idx / s["logical_bytes"] * 1e12
        by = ", ".join(f"{x / 2**20:.0f}" for x in r["rss_by_gib"])
        print(f"| {g} | {s['chunks']} | {r['rss_peak'] / 2**20:.0f} | {by} | {idx / 2**20:.1f} | "
              f"{per_tb / 1e9:.1f} GB | {c.get('index_lookups', 0) / chunks:.2f} | "
              f"{c.get('index_page_loads', 0) / chunks:.3f} | "
              f"{c.get('filtered_lookups', 0) / chunks:.2f} | "
              f"{c.get('index_filter_bytes', 0) / 2**20:.1f} | {c.get('peak_resident_pages', 0)} | "
              f"{c.get('peak_buffered_entries', 0)} | {c.get('merged_buckets', 0)} | "
              f"{c.get('merge_wait_ms', 0) / 1000:.1f} | "
              f"{c.get('commit_hold_ms', 0) / 1000:.1f} | "
              f"{s['metadata_bytes'] / 2**20:.0f} | "
              f"{s.get('metadata_capacity_bytes', 0) / 2**20:.0f} | "
              f"{s['logical_bytes'] / r['seconds'] / 1e6:.0f} | "
              f"{', '.join(f'{x / 1e6:.0f}' for x in r['mbs_by_gib'])} |", flush=True)
        f = r["fresh"]
        if f:
            print(f"- then a fresh mount (--warm-filters {a.warm_filters}) wrote {f['gib']} GiB: "
                  f"{f['warmed']} filters warmed in {f['warm_ms']} ms; "
                  f"{f['loads']:.3f} index page loads and {f['filtered']:.2f} filtered lookups "
                  f"per chunk; {f['gib'] * 2**30 / f['seconds'] / 1e6:.0f} MB/s "
                  f"({', '.join(f'{x / 1e6:.0f}' for x in f['mbs'])} per GiB)", flush=True)


if __name__ == "__main__":
    main()
