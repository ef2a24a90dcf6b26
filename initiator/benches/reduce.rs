//! The reduction pipeline on one core, without I/O: what a C-node's write
//! path spends per byte on chunking, fingerprints, sketches, the index
//! decisions and the codecs (the same functions and the same decisions as
//! `cnode::fs`, with the indexes in memory), and what read-back of deltas
//! costs.
//!
//!   DASE_CORPUS=/path/to/corpus cargo bench -p dase-initiator --bench reduce
//!
//! The corpus comes from benches/corpus/build.py. Without DASE_CORPUS only
//! the incompressible-data figures are measured. DASE_SWEEP=1 adds the
//! average-chunk-size sweep. DASE_FASTCDC=1 chunks with the fastcdc crate
//! and sketches in a second pass (the pipeline before the fused chunker),
//! for comparison. DASE_QUICK=1 stops after the incompressible figures.
//! DASE_PARTS=checkpoints,logs (say) measures only those parts of the corpus.
//! DASE_RUNS=N times every ingest and read-back N times and reports the
//! fastest (default 1): on a shared machine the slower runs measure the
//! neighbours; the stored bytes are the same every time (checked).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use dase_initiator::reduce::{self, Decoder, Encoder, Encoding, Fp};

/// The mount's pending buffer per file (`cnode::fs`).
const PENDING: usize = 4 << 20;

struct Stored {
    enc: Encoding,
    len: usize,
    base: Option<usize>,
    /// Where its stored bytes are in the log.
    at: std::ops::Range<usize>,
}

#[derive(Default, Debug)]
struct Totals {
    logical: u64,
    unique: u64,
    after_similarity: u64,
    stored: u64,
    chunks: u64,
    duplicates: u64,
    deltas: u64,
    /// Time spent, the log's first touch excepted.
    secs: f64,
}

/// One pass of the write path's decisions over `files`.
/// The stored chunks and, like a segment, one log of their bytes.
struct Store {
    chunks: Vec<Stored>,
    log: Vec<u8>,
}

impl Store {
    fn bytes(&self, i: usize) -> &[u8] {
        &self.log[self.chunks[i].at.clone()]
    }
}

fn ingest(files: &[Vec<u8>], avg: u32, level: i32) -> (Totals, Store, Vec<Fp>) {
    let mut index: HashMap<Fp, usize> = HashMap::new();
    let mut similar: HashMap<u64, usize> = HashMap::new();
    // The log is written before the clock starts so that the first touch
    // of its pages (the kernel's cost, not the pipeline's) is not timed.
    let total: usize = files.iter().map(|f| f.len()).sum();
    let mut store = Store {
        chunks: Vec::new(),
        log: vec![1; total + (1 << 20)],
    };
    store.log.clear();
    let clock = Instant::now();
    let mut fps: Vec<Fp> = Vec::new();
    let mut t = Totals::default();
    // One encoder for every chunk, as the mount has one per batch of 64
    // (a zstd context per chunk would cost more than a small chunk's
    // compression). Its references must outlive it: decoded references are
    // kept for the whole run anyway, so they are leaked to 'static.
    let mut enc: Encoder<'static> = Encoder::new(level);
    let mut out = Vec::new();
    let mut decoded: HashMap<usize, &'static [u8]> = HashMap::new();
    let mut dec = Decoder::default();
    // As the mount does: a file's bytes gather in a pending buffer of
    // PENDING bytes, which is chunked; the last chunk (cut only because
    // the buffer ended) waits for the bytes that follow.
    let mut pending: Vec<u8> = Vec::with_capacity(2 * PENDING);
    let mut cuts: Vec<reduce::Chunk> = Vec::new();
    let mut batch_fps: Vec<Fp> = Vec::new();
    let fastcdc = std::env::var("DASE_FASTCDC").is_ok();
    for f in files {
        let mut fed = 0;
        pending.clear();
        while fed < f.len() || !pending.is_empty() {
            let take = PENDING.min(f.len() - fed);
            pending.extend_from_slice(&f[fed..fed + take]);
            fed += take;
            let last = fed == f.len();
            if fastcdc {
                cuts.clear();
                cuts.extend(
                    fastcdc::v2020::FastCDC::new(&pending, avg / 4, avg, avg * 4).map(|c| {
                        reduce::Chunk {
                            offset: c.offset,
                            len: c.length,
                            sketch: None,
                            numbers: false,
                        }
                    }),
                );
            } else {
                cuts = reduce::chunks_of_size(&pending, avg);
            }
            if !last && cuts.len() > 1 {
                cuts.pop();
            }
            let done = cuts.last().map_or(0, |c| c.offset + c.len);
            // The whole buffer's fingerprints at once, as the mount takes them.
            batch_fps.clear();
            reduce::fingerprints(
                &pending,
                cuts.iter().map(|c| (c.offset, c.len)),
                &mut batch_fps,
            );
            for (c, &fp) in cuts.iter().zip(&batch_fps) {
                let (off, len) = (c.offset, c.len);
                let d = &pending[off..off + len];
                t.logical += len as u64;
                t.chunks += 1;
                if index.contains_key(&fp) {
                    t.duplicates += 1;
                    continue;
                }
                t.unique += len as u64;
                let sketch = if fastcdc { reduce::sketch(d) } else { c.sketch };
                let base = sketch
                    .into_iter()
                    .flatten()
                    .find_map(|sf| similar.get(&sf).copied());
                let kind = reduce::Kind {
                    numbers: c.numbers,
                    incompressible: reduce::looks_incompressible(d),
                };
                let e = if let Some(b) = base {
                    // The reference as the read path sees it: decoded.
                    let r = *decoded.entry(b).or_insert_with(|| {
                        let s = &store.chunks[b];
                        let mut v = Vec::new();
                        dec.decode(s.enc, store.bytes(b), None, s.len, &mut v)
                            .unwrap();
                        Vec::leak(v)
                    });
                    enc.encode(d, Some(r), kind, &mut out)
                } else {
                    enc.encode(d, None, kind, &mut out)
                };
                let b = base.filter(|_| e.is_delta());
                // A raw chunk is stored from the buffer itself, as the
                // mount does (no copy into `out`).
                let stored: &[u8] = if e == Encoding::Raw { d } else { &out };
                t.deltas += b.is_some() as u64;
                t.stored += stored.len() as u64;
                t.after_similarity += if b.is_some() { stored.len() } else { len } as u64;
                let id = store.chunks.len();
                index.insert(fp, id);
                if b.is_none() {
                    for sf in sketch.into_iter().flatten() {
                        similar.entry(sf).or_insert(id);
                    }
                }
                let at = store.log.len();
                store.log.extend_from_slice(stored);
                store.chunks.push(Stored {
                    enc: e,
                    len,
                    base: b,
                    at: at..store.log.len(),
                });
                fps.push(fp);
            }
            pending.drain(..done);
        }
    }
    t.secs = clock.elapsed().as_secs_f64();
    (t, store, fps)
}

fn read_files(dir: &Path) -> Vec<Vec<u8>> {
    let mut paths: Vec<PathBuf> = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                paths.push(p);
            }
        }
    }
    paths.sort();
    paths.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

/// How many times each figure is measured (`DASE_RUNS`).
fn runs() -> usize {
    std::env::var("DASE_RUNS").map_or(1, |v| v.parse().expect("DASE_RUNS: a count"))
}

/// [`ingest`] `runs()` times: the fastest run.
fn fastest_ingest(files: &[Vec<u8>], avg: u32, level: i32) -> (Totals, Store, Vec<Fp>) {
    let mut best = ingest(files, avg, level);
    for _ in 1..runs() {
        let next = ingest(files, avg, level);
        assert_eq!(next.0.stored, best.0.stored, "the same bytes every run");
        if next.0.secs < best.0.secs {
            best = next;
        }
    }
    best
}

fn gbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

fn main() {
    // Incompressible data: the fast path (no sketch, no compressor).
    let mut x = 0x1234_5678_9abc_def1u64;
    let noise: Vec<u8> = (0..(256 << 20) / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect();
    let (tot, _, _) = fastest_ingest(
        std::slice::from_ref(&noise),
        reduce::AVG_CHUNK,
        reduce::LEVEL,
    );
    let s = tot.secs;
    println!(
        "incompressible 256 MiB: ingest {:.2} GB/s one core (stored {:.3} of logical)",
        gbps(tot.logical, s),
        tot.stored as f64 / tot.logical as f64
    );
    // Stage by stage, in pieces of the pending buffer's size as the mount
    // chunks (one 256 MiB buffer would time the page faults of its
    // sample list).
    let t = Instant::now();
    let mut cuts = Vec::new();
    for (p, piece) in noise.chunks(PENDING).enumerate() {
        cuts.extend(reduce::chunks(piece).into_iter().map(|mut c| {
            c.offset += p * PENDING;
            c
        }));
    }
    let cdc = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let n_old: usize = noise
        .chunks(PENDING)
        .map(|piece| fastcdc::v2020::FastCDC::new(piece, 4096, 16384, 65536).count())
        .sum();
    let crate_cdc = t.elapsed().as_secs_f64();
    let piece = |c: &reduce::Chunk| &noise[c.offset..c.offset + c.len];
    let t = Instant::now();
    for c in &cuts {
        std::hint::black_box(reduce::fingerprint(piece(c)));
    }
    let fpt = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut fps = Vec::new();
    let mut first = 0;
    for (p, piece) in noise.chunks(PENDING).enumerate() {
        let n = cuts[first..].partition_point(|c| c.offset < (p + 1) * PENDING);
        fps.clear();
        reduce::fingerprints(
            piece,
            cuts[first..first + n]
                .iter()
                .map(|c| (c.offset - p * PENDING, c.len)),
            &mut fps,
        );
        std::hint::black_box(&fps);
        first += n;
    }
    let fpb = t.elapsed().as_secs_f64();
    // In cache, best of 50: the batching's own speed against the crate's
    // on inputs long enough to fill its lanes (1 MiB).
    let (first_piece, n_cuts) = (
        &noise[..PENDING],
        cuts.partition_point(|c| c.offset < PENDING),
    );
    let best = |f: &mut dyn FnMut()| {
        (0..50)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .fold(f64::MAX, f64::min)
    };
    let fp_cached = best(&mut || {
        fps.clear();
        reduce::fingerprints(
            first_piece,
            cuts[..n_cuts].iter().map(|c| (c.offset, c.len)),
            &mut fps,
        );
        std::hint::black_box(&fps);
    });
    let crate_cached = best(&mut || {
        for mib in first_piece.chunks(1 << 20) {
            std::hint::black_box(reduce::fingerprint(mib));
        }
    });
    let t = Instant::now();
    for c in &cuts {
        std::hint::black_box(reduce::looks_incompressible(piece(c)));
    }
    let inc = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for c in &cuts {
        std::hint::black_box(reduce::sketch(piece(c)));
    }
    let skt = t.elapsed().as_secs_f64();
    let n = noise.len() as u64;
    println!(
        "  stages alone: chunking with sketches {:.2} GB/s ({} chunks), BLAKE3 {:.2} GB/s a chunk at a time, {:.2} GB/s batched, entropy check {:.1} GB/s",
        gbps(n, cdc),
        cuts.len(),
        gbps(n, fpt),
        gbps(n, fpb),
        gbps(n, inc)
    );
    println!(
        "  BLAKE3 in cache (best of 50 over {} MiB): batched {:.2} GB/s, blake3::hash of 1 MiB inputs {:.2} GB/s",
        PENDING >> 20,
        gbps(PENDING as u64, fp_cached),
        gbps(PENDING as u64, crate_cached)
    );
    println!(
        "  for comparison: the fastcdc crate (v2020, cut points only) {:.2} GB/s ({n_old} chunks); a separate sketch pass {:.2} GB/s",
        gbps(n, crate_cdc),
        gbps(n, skt)
    );
    // The ceilings of the same run: the goal is 0.71× the crate's
    // chunking alone; chunking then hashing with the crate is what a
    // pipeline without a faster chunker could at best do.
    let ingested = gbps(tot.logical, s);
    let serial = 1.0 / (1.0 / gbps(n, crate_cdc) + 1.0 / gbps(n, fpt));
    println!(
        "  ingest / fastcdc crate {:.2}×; / (fastcdc crate, then BLAKE3) {:.2}× (that ceiling {serial:.2} GB/s)",
        ingested / gbps(n, crate_cdc),
        ingested / serial
    );
    drop(noise);
    if std::env::var("DASE_QUICK").is_ok() {
        return;
    }

    let Ok(corpus) = std::env::var("DASE_CORPUS") else {
        println!("(set DASE_CORPUS to a corpus from benches/corpus/build.py for the rest)");
        return;
    };
    // DASE_PARTS=checkpoints,logs times those parts alone; a part the
    // corpus lacks is skipped, said so.
    let only = std::env::var("DASE_PARTS").ok();
    let parts: Vec<&str> = ["source", "wheels", "checkpoints", "logs", "media"]
        .into_iter()
        .filter(|p| only.as_ref().is_none_or(|o| o.split(',').any(|x| x == *p)))
        .filter(|p| {
            let there = Path::new(&corpus).join(p).is_dir();
            if !there {
                println!("(no {p}/ in {corpus}: skipped)");
            }
            there
        })
        .collect();
    println!(
        "\n| part | MB | ingest GB/s (one core) | after dedup | after similarity | after compression | deltas | delta read-back GB/s (each reference decoded per delta; through a 64 MiB reference cache) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let mut all = Totals::default();
    let mut all_secs = 0.0;
    let mut sweep: Vec<Vec<Vec<u8>>> = Vec::new();
    for &part in &parts {
        let files = read_files(&Path::new(&corpus).join(part));
        let (tot, store, fps) = fastest_ingest(&files, reduce::AVG_CHUNK, reduce::LEVEL);
        let secs = tot.secs;
        // Read back every delta chunk as a read does: decode its reference,
        // then the delta, then check the delta's fingerprint (which vouches
        // for the reference too: a read hashes that only if this fails).
        let mut dec = Decoder::default();
        let (mut base, mut outb) = (Vec::new(), Vec::new());
        let deltas = store.chunks.iter().filter(|s| s.base.is_some()).count() as f64;
        let delta_bytes: u64 = store
            .chunks
            .iter()
            .filter(|s| s.base.is_some())
            .map(|s| s.len as u64)
            .sum();
        let (mut rs, mut split) = (f64::MAX, [0f64; 3]);
        for _ in 0..runs() {
            let t = Instant::now();
            // Where the time goes: reference decode, delta decode, hash.
            let mut this_split = [0f64; 3];
            for (i, s) in store.chunks.iter().enumerate() {
                let Some(b) = s.base else { continue };
                let bs = &store.chunks[b];
                let t0 = Instant::now();
                dec.decode(bs.enc, store.bytes(b), None, bs.len, &mut base)
                    .unwrap();
                let t1 = Instant::now();
                dec.decode(s.enc, store.bytes(i), Some(&base), s.len, &mut outb)
                    .unwrap();
                let t2 = Instant::now();
                assert_eq!(reduce::fingerprint(&outb), fps[i]);
                let t3 = Instant::now();
                for (x, d) in this_split.iter_mut().zip([t1 - t0, t2 - t1, t3 - t2]) {
                    *x += d.as_secs_f64();
                }
            }
            let secs = t.elapsed().as_secs_f64();
            if secs < rs {
                (rs, split) = (secs, this_split);
            }
        }
        if delta_bytes > 0 {
            let per = |x: f64| format!("{:.1} µs", x * 1e6 / deltas);
            eprintln!(
                "  {part}: per delta ({:.0} KiB average) reference decode {}, delta decode {}, BLAKE3 {}",
                delta_bytes as f64 / deltas / 1024.0,
                per(split[0]),
                per(split[1]),
                per(split[2])
            );
        }
        // The same through the mount's reference cache, at its default
        // size: a reference decoded for one delta serves the deltas after
        // it (vouched for by their fingerprints, as on the read path). The
        // cache starts full, as a mount's is once it has read a while: a
        // decode then reuses an evicted entry's memory, where an empty
        // cache's first 64 MiB are fresh pages, each a fault (on this
        // machine those faults cost more than the decodes the cache saves).
        let mut cached = f64::MAX;
        for _ in 0..runs() {
            let mut refs = reduce::ReferenceCache::new(64 << 20);
            for k in 0..1024u32 {
                let mut fp = [0xEE; 32];
                fp[..4].copy_from_slice(&k.to_le_bytes());
                refs.insert(fp, std::sync::Arc::new(vec![7; 64 << 10]));
            }
            let t = Instant::now();
            for (i, s) in store.chunks.iter().enumerate() {
                let Some(b) = s.base else { continue };
                let r = match refs.get(&fps[b]) {
                    Some(r) => r,
                    None => {
                        let bs = &store.chunks[b];
                        let mut v = Vec::new();
                        dec.decode(bs.enc, store.bytes(b), None, bs.len, &mut v)
                            .unwrap();
                        let v = std::sync::Arc::new(v);
                        refs.insert(fps[b], v.clone());
                        v
                    }
                };
                dec.decode(s.enc, store.bytes(i), Some(&r), s.len, &mut outb)
                    .unwrap();
                assert_eq!(reduce::fingerprint(&outb), fps[i]);
            }
            cached = cached.min(t.elapsed().as_secs_f64());
        }
        let mb = |b: u64| format!("{:.1}", b as f64 / 1e6);
        println!(
            "| {part} | {} | {:.2} | {} | {} | {} | {} | {} |",
            mb(tot.logical),
            gbps(tot.logical, secs),
            mb(tot.unique),
            mb(tot.after_similarity),
            mb(tot.stored),
            tot.deltas,
            if delta_bytes > 0 {
                format!(
                    "{:.2} cold, {:.2} cached",
                    gbps(delta_bytes, rs),
                    gbps(delta_bytes, cached)
                )
            } else {
                "-".into()
            }
        );
        all.logical += tot.logical;
        all.unique += tot.unique;
        all.after_similarity += tot.after_similarity;
        all.stored += tot.stored;
        all_secs += secs;
        sweep.push(files);
    }
    println!(
        "| all | {:.1} | {:.2} | {:.1} | {:.1} | {:.1} | | |",
        all.logical as f64 / 1e6,
        gbps(all.logical, all_secs),
        all.unique as f64 / 1e6,
        all.after_similarity as f64 / 1e6,
        all.stored as f64 / 1e6
    );
    if std::env::var("DASE_SWEEP").is_ok() {
        println!(
            "\naverage chunk size: stored MB per part ({})",
            parts.join(" | ")
        );
        for avg in [8u32 << 10, 16 << 10, 32 << 10, 64 << 10] {
            let row: Vec<String> = sweep
                .iter()
                .map(|f| format!("{:.1}", ingest(f, avg, reduce::LEVEL).0.stored as f64 / 1e6))
                .collect();
            println!("  {:>2} KiB: {}", avg >> 10, row.join(" | "));
        }
        println!("\nzstd level: stored MB per part, and one-core ingest GB/s over the corpus");
        // DASE_LEVELS=-5,-1,1 (say) measures others, negative (fast) ones too.
        let levels: Vec<i32> = std::env::var("DASE_LEVELS")
            .ok()
            .map(|v| v.split(',').filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_else(|| vec![1, 3, 6, 9]);
        for level in levels {
            let (mut row, mut bytes, mut secs) = (Vec::new(), 0u64, 0.0);
            for f in &sweep {
                let (tot, _, _) = ingest(f, reduce::AVG_CHUNK, level);
                secs += tot.secs;
                bytes += tot.logical;
                row.push(format!("{:.1}", tot.stored as f64 / 1e6));
            }
            println!(
                "  level {level}: {} | {:.2} GB/s",
                row.join(" | "),
                gbps(bytes, secs)
            );
        }
    }
}
