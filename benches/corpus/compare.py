#!/usr/bin/env python3
"""Stores each part of the evaluation corpus with dase (--reduce full), restic
and borg (their default and max compression), and zstd -19 --long=31, in one
run, and prints a Markdown table of stored bytes (BENCHMARKS.md, "Reduction").

Usage: benches/corpus/compare.py CORPUS_DIR WORK_DIR [--dase PATH] [--parts a,b] [--idle SECS]
(--idle: the recompressed column from the mount's own idle passes instead of
an offline `dase clean --recompress`)
Needs restic, borgbackup and zstd (Debian packages) and root (FUSE).
dase's figure is its chunks after dedup, deltas and compression (what restic
and borg report too: no redundancy); "with parity" adds the 10+3 erasure code.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

PARTS = ["source", "wheels", "checkpoints", "logs", "media"]


def du(path):
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p):
                total += os.path.getsize(p)
    return total


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def restic(src, repo, compression):
    env = dict(os.environ, RESTIC_PASSWORD="dase-bench", RESTIC_CACHE_DIR=repo + ".cache")
    shutil.rmtree(repo, ignore_errors=True)
    sh(["restic", "-q", "init", "--repository-version", "2", "-r", repo], env=env,
       stdout=subprocess.DEVNULL)
    sh(["restic", "-q", "-r", repo, "backup", "--compression", compression, "."], env=env,
       cwd=src, stdout=subprocess.DEVNULL)
    return du(repo)


def borg(src, repo, compression):
    env = dict(os.environ, BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
               BORG_BASE_DIR=repo + ".base")
    shutil.rmtree(repo, ignore_errors=True)
    sh(["borg", "init", "-e", "none", repo], env=env)
    sh(["borg", "create", "--compression", compression, f"{repo}::a", "."], env=env, cwd=src)
    return du(repo)


def zstd_long(src):
    tar = subprocess.Popen(["tar", "cf", "-", "-C", src, "."], stdout=subprocess.PIPE)
    z = subprocess.run(["zstd", "-19", "--long=31", "-T2", "-c", "-q"], stdin=tar.stdout,
                       stdout=subprocess.PIPE, check=True)
    tar.wait()
    return len(z.stdout)


def proc_status(pid, key):
    """A byte count from /proc/PID/status (VmRSS, VmHWM: the peak RSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


class Dase:
    """13 D-nodes of `size` each under WORK/dase, a mount point WORK/mnt."""

    def __init__(self, binary, work, size="1G"):
        self.bin, self.dir = binary, os.path.join(work, "dase")
        self.cluster = os.path.join(self.dir, "cluster.toml")
        self.mnt = os.path.join(work, "mnt")
        os.makedirs(self.mnt, exist_ok=True)
        # `cluster up` returns once every D-node listens; they run detached.
        sh([binary, "cluster", "up", "--dir", self.dir, "--dnodes", "13", "--size", size,
            "--log", "warn"], stdout=subprocess.DEVNULL)

    def mount(self, args=("--log", "warn"), stderr=None, mkfs=True):
        """A fresh `--reduce full` file system (or, without mkfs, the one
        there), mounted; the mount process."""
        if mkfs:
            sh([self.bin, "mkfs", "--cluster", self.cluster, "--reduce", "full", "--force"],
               stdout=subprocess.DEVNULL)
        m = subprocess.Popen([self.bin, "mount", "--cluster", self.cluster, *args, self.mnt],
                             stdout=subprocess.DEVNULL, stderr=stderr)
        for _ in range(100):
            if os.path.ismount(self.mnt):
                break
            time.sleep(0.1)
        return m

    def unmount(self, m):
        sh(["umount", self.mnt])
        m.wait()

    def stats(self):
        out = subprocess.run([self.bin, "stats", "--cluster", self.cluster, "--json"],
                             check=True, stdout=subprocess.PIPE).stdout
        return json.loads(out)

    def store(self, src, idle=None):
        """`cp -r src` into a fresh file system; its stats after (and with
        `idle` SECS, the mount's own idle recompression: the stats once its
        passes are done, as "cold", and their seconds)."""
        log = None
        if idle is None:
            m = self.mount()
        else:
            log = os.path.join(self.dir, "idle-mount.log")
            with open(log, "w") as f:
                m = self.mount(("--log", "info", "--recompress-idle", str(idle)), stderr=f)
        t = time.time()
        sh(["cp", "-r", src, os.path.join(self.mnt, "x")])
        took = time.time() - t
        cold = None
        if idle is not None:
            fd = os.open(self.mnt, os.O_RDONLY)  # fsync of the root commits
            os.fsync(fd)
            os.close(fd)
            s = self.stats()
            t = time.time()
            # Done once the committed mark has reached the last segment
            # made (the cleaner's moves after a pass make new ones).
            while True:
                x = self.stats()
                if x["recompressed_level"] >= 19 and x["recompressed_below_segment"] >= x["segments_made"]:
                    break
                time.sleep(1)
            passes = time.time() - t
        hwm = proc_status(m.pid, "VmHWM")
        self.unmount(m)
        if idle is not None:
            # As the offline pass does after its work: fold the index journal.
            sh([self.bin, "clean", "--cluster", self.cluster], stdout=subprocess.DEVNULL)
            cold = self.stats()
            cold["seconds"] = passes
        if idle is None:
            took = time.time() - t
            s = self.stats()
        s["seconds"] = took
        s["rss_peak"] = hwm
        s["cold"] = cold
        return s

    def recompress(self):
        """`dase clean --recompress` offline (zstd 19); stats after, and its seconds."""
        t = time.time()
        sh([self.bin, "clean", "--cluster", self.cluster, "--recompress"],
           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        took = time.time() - t
        s = self.stats()
        s["seconds"] = took
        return s

    def close(self):
        sh([self.bin, "cluster", "down", "--dir", self.dir], stdout=subprocess.DEVNULL)


def mb(b):
    return f"{b / 1e6:.1f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("corpus")
    ap.add_argument("work")
    ap.add_argument("--dase", default=os.path.join(os.path.dirname(__file__), "../../build/release/dase"))
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--idle", type=float, default=None, metavar="SECS",
                    help="recompress through the mount's idle passes (dase mount --recompress-idle SECS) "
                         "instead of an offline dase clean --recompress")
    a = ap.parse_args()
    parts = a.parts.split(",")
    os.makedirs(a.work, exist_ok=True)
    d = Dase(os.path.abspath(a.dase), a.work)
    rows, totals = [], {}
    try:
        for p in parts:
            src = os.path.join(a.corpus, p)
            r = {"part": p, "logical": du(src)}
            s = d.store(src, a.idle)
            r.update(dedup=s["after_dedup_bytes"], similar=s["after_similarity_bytes"],
                     dase=s["after_compression_bytes"], parity=s["stored_bytes"],
                     dase_mbps=r["logical"] / s["seconds"] / 1e6)
            rc = s["cold"] if a.idle is not None else d.recompress()
            r.update(dase_cold=rc["after_compression_bytes"],
                     cold_mbps=r["logical"] / rc["seconds"] / 1e6)
            extra = {"rss_peak": s["rss_peak"], "chunks": s["chunks"],
                     # After `dase clean` (run by the recompression step) has
                     # folded the index journal into the bucket pages: right
                     # after ingest most entries are still in the journal.
                     "index_bytes": rc["chunk_index_bytes"] + rc["similar_index_bytes"],
                     "similar_entries": s["similar_entries"]}
            w = lambda n: os.path.join(a.work, n)
            r["restic"] = restic(src, w("restic-" + p), "auto")
            r["restic_max"] = restic(src, w("restic-max-" + p), "max")
            r["borg"] = borg(src, w("borg-" + p), "lz4")
            r["borg_max"] = borg(src, w("borg-max-" + p), "zstd,22")
            r["zstd_long"] = zstd_long(src)
            for k, v in r.items():
                if k not in ("part", "extra"):
                    totals[k] = totals.get(k, 0) + v
            rows.append(r)
            r["extra"] = extra
            print(json.dumps(r), file=sys.stderr, flush=True)
    finally:
        d.close()
    whole = zstd_long(a.corpus) if len(parts) == len(PARTS) else None
    cols = ["logical", "dedup", "similar", "dase", "dase_cold", "parity", "restic", "restic_max",
            "borg", "borg_max", "zstd_long"]
    cold = "dase after the mount's idle passes" if a.idle is not None else "dase after `clean --recompress`"
    print(f"| part | logical MB | dase after dedup | + similarity | + compression (dase) | {cold} | dase with 10+3 parity (before recompression) | restic (auto) | restic (max) | borg (lz4) | borg (zstd,22) | zstd -19 --long=31 |")
    print("|---|" + "---:|" * len(cols))
    for r in rows + [dict(totals, part="**all**")]:
        print(f"| {r['part']} | " + " | ".join(mb(r[c]) for c in cols) + " |")
    if whole:
        print(f"\nWhole corpus as one tar, zstd -19 --long=31: {mb(whole)} MB; "
              f"dase {mb(totals['dase'])} MB = {totals['dase'] / whole:.3f}x of it; "
              f"after recompression {mb(totals['dase_cold'])} MB = {totals['dase_cold'] / whole:.3f}x.")
    for r in rows:
        x = r["extra"]
        print(f"- {r['part']}: dase ingest through the mount {r['dase_mbps']:.0f} MB/s (cp -r, this VM), "
              f"recompression {r['cold_mbps']:.0f} MB/s of logical data"
              + (" (idle passes: from the end of cp -r, the idle wait included)" if a.idle is not None else "")
              + "; "
              f"mount peak RSS {x['rss_peak'] / 2**20:.0f} MiB; {x['chunks']} chunks; indexes on the "
              f"D-nodes {x['index_bytes'] / 2**20:.1f} MiB (all copies, journal folded in)")


if __name__ == "__main__":
    main()
