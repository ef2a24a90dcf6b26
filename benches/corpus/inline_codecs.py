#!/usr/bin/env python3
"""Whether lz4 would make the write path's plain compression pay (BENCHMARKS.md,
"Data reduction"): zstd level 1 (what dase uses inline) against lz4 and
lz4-HC 9 on independent 16 KiB units (dase's average chunk) of the first
64 MB of the source, logs and checkpoints parts, one core: stored fraction
and MB/s of input. A unit that does not shrink counts as stored as is.

Usage: benches/corpus/inline_codecs.py CORPUS_DIR   (needs: pip install zstandard lz4)
"""
import os
import sys
import time

import lz4.block
import zstandard


def part_bytes(d, limit=64 << 20):
    out = bytearray()
    for dp, _, names in sorted(os.walk(d)):
        for n in sorted(names):
            out += open(os.path.join(dp, n), "rb").read()
            if len(out) >= limit:
                return bytes(out[:limit])
    return bytes(out)


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    z = zstandard.ZstdCompressor(level=1)
    codecs = [
        ("zstd 1", z.compress),
        ("lz4", lambda p: lz4.block.compress(p, store_size=False)),
        ("lz4-HC 9", lambda p: lz4.block.compress(p, mode="high_compression", compression=9,
                                                   store_size=False)),
    ]
    print("| part | " + " | ".join(n for n, _ in codecs) + " |")
    print("|---|" + "---:|" * len(codecs))
    for part in ("source", "logs", "checkpoints"):
        data = part_bytes(os.path.join(sys.argv[1], part))
        units = [data[i:i + (16 << 10)] for i in range(0, len(data), 16 << 10)]
        cells = []
        for _, f in codecs:
            t = time.perf_counter()
            n = sum(min(len(f(u)), len(u)) for u in units)
            secs = time.perf_counter() - t
            cells.append(f"{n / len(data):.3f}, {len(data) / secs / 1e6:.0f} MB/s")
        print(f"| {part} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
