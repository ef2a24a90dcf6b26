#!/usr/bin/env python3
"""What the logs part of the corpus costs to compress well (BENCHMARKS.md,
"Data reduction"): zstd over independent units of 16 KiB to 1 MiB (a chunk
store's chunk, or a compression region of several) at levels 1 to 19, with
the stored MB and the single-core speed. Shows whether the gap to borg's
zstd,22 on 2 MiB chunks is one of history (unit size) or of effort (level).

Usage: benches/corpus/levels.py CORPUS_DIR [PART]   (needs: pip install zstandard)
"""
import os
import sys
import time

import zstandard


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    part = sys.argv[2] if len(sys.argv) == 3 else "logs"
    d = os.path.join(sys.argv[1], part)
    data = b"".join(open(os.path.join(d, n), "rb").read() for n in sorted(os.listdir(d)))
    print(f"{part}: {len(data) / 1e6:.1f} MB")
    print("| unit | " + " | ".join(f"level {l}" for l in (1, 3, 6, 9, 19)) + " |")
    print("|---|" + "---:|" * 5)
    for unit in (16 << 10, 64 << 10, 256 << 10, 1 << 20):
        cells = []
        for level in (1, 3, 6, 9, 19):
            c = zstandard.ZstdCompressor(level=level)
            # Level 19 is slow: measure it on a quarter and scale.
            sample = data if level < 19 else data[: len(data) // 4]
            t = time.perf_counter()
            n = sum(len(c.compress(sample[i:i + unit])) for i in range(0, len(sample), unit))
            secs = time.perf_counter() - t
            n = n * len(data) / len(sample)
            cells.append(f"{n / 1e6:.2f} MB, {len(sample) / secs / 1e6:.0f} MB/s")
        print(f"| {unit >> 10} KiB | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
