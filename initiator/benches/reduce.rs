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
//! average-chunk-size sweep.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use dase_initiator::reduce::{self, Decoder, Encoder, Encoding, Fp};

struct Stored {
    enc: Encoding,
    len: usize,
    base: Option<usize>,
    bytes: Vec<u8>,
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
}

/// One pass of the write path's decisions over `files`.
fn ingest(files: &[Vec<u8>], avg: u32, level: i32) -> (Totals, Vec<Stored>, Vec<Fp>) {
    let mut index: HashMap<Fp, usize> = HashMap::new();
    let mut similar: HashMap<u64, usize> = HashMap::new();
    let mut store: Vec<Stored> = Vec::new();
    let mut fps: Vec<Fp> = Vec::new();
    let mut t = Totals::default();
    let mut enc = Encoder::new(level);
    let mut out = Vec::new();
    let mut decoded: HashMap<usize, Vec<u8>> = HashMap::new();
    let mut dec = Decoder::default();
    for f in files {
        for (off, len) in reduce::chunks_of_size(f, avg) {
            let d = &f[off..off + len];
            t.logical += len as u64;
            t.chunks += 1;
            let fp = reduce::fingerprint(d);
            if index.contains_key(&fp) {
                t.duplicates += 1;
                continue;
            }
            t.unique += len as u64;
            let incompressible = reduce::looks_incompressible(d);
            let sketch = reduce::sketch(d);
            let base = sketch
                .into_iter()
                .flatten()
                .find_map(|sf| similar.get(&sf).copied());
            let mut chosen = None;
            if let Some(b) = base {
                // The reference as the read path sees it: decoded.
                decoded.entry(b).or_insert_with(|| {
                    let s = &store[b];
                    let mut v = Vec::new();
                    dec.decode(s.enc, &s.bytes, None, s.len, &mut v).unwrap();
                    v
                });
                // The reference must outlive the encoder that refers to it.
                let e = Encoder::new(level).delta(d, &decoded[&b], &mut out);
                if e.is_delta() && out.len() < len / 2 {
                    chosen = Some((e, Some(b)));
                    t.deltas += 1;
                }
            }
            let (e, b) = chosen.unwrap_or_else(|| {
                let e = if incompressible {
                    Encoding::Raw
                } else {
                    enc.compress(d, &mut out)
                };
                if e == Encoding::Raw {
                    out.clear();
                    out.extend_from_slice(d);
                }
                (e, None)
            });
            t.stored += out.len() as u64;
            t.after_similarity += if b.is_some() { out.len() } else { len } as u64;
            let id = store.len();
            index.insert(fp, id);
            if b.is_none() {
                for sf in sketch.into_iter().flatten() {
                    similar.entry(sf).or_insert(id);
                }
            }
            store.push(Stored {
                enc: e,
                len,
                base: b,
                bytes: out.clone(),
            });
            fps.push(fp);
        }
    }
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
    let t = Instant::now();
    let (tot, _, _) = ingest(
        std::slice::from_ref(&noise),
        reduce::AVG_CHUNK,
        reduce::LEVEL,
    );
    let s = t.elapsed().as_secs_f64();
    println!(
        "incompressible 256 MiB: ingest {:.2} GB/s one core (stored {:.3} of logical)",
        gbps(tot.logical, s),
        tot.stored as f64 / tot.logical as f64
    );
    let t = Instant::now();
    let n = reduce::chunks(&noise).count();
    let cdc = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for (o, l) in reduce::chunks(&noise) {
        std::hint::black_box(reduce::fingerprint(&noise[o..o + l]));
    }
    let fpt = t.elapsed().as_secs_f64() - cdc;
    let t = Instant::now();
    for (o, l) in reduce::chunks(&noise) {
        std::hint::black_box(reduce::sketch(&noise[o..o + l]));
    }
    let skt = t.elapsed().as_secs_f64() - cdc;
    let t = Instant::now();
    for (o, l) in reduce::chunks(&noise) {
        std::hint::black_box(reduce::looks_incompressible(&noise[o..o + l]));
    }
    let inc = t.elapsed().as_secs_f64() - cdc;
    println!(
        "  stages alone: FastCDC {:.2} GB/s ({n} chunks), BLAKE3 {:.2} GB/s, sketch {:.2} GB/s, entropy check {:.1} GB/s",
        gbps(noise.len() as u64, cdc),
        gbps(noise.len() as u64, fpt),
        gbps(noise.len() as u64, skt),
        gbps(noise.len() as u64, inc)
    );
    drop(noise);

    let Ok(corpus) = std::env::var("DASE_CORPUS") else {
        println!("(set DASE_CORPUS to a corpus from benches/corpus/build.py for the rest)");
        return;
    };
    let parts = ["source", "wheels", "checkpoints", "logs", "media"];
    println!(
        "\n| part | MB | ingest GB/s (one core) | after dedup | after similarity | after compression | deltas | delta read-back GB/s |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let mut all = Totals::default();
    let mut all_secs = 0.0;
    let mut sweep: Vec<Vec<Vec<u8>>> = Vec::new();
    for part in parts {
        let files = read_files(&Path::new(&corpus).join(part));
        let t = Instant::now();
        let (tot, store, fps) = ingest(&files, reduce::AVG_CHUNK, reduce::LEVEL);
        let secs = t.elapsed().as_secs_f64();
        // Read back every delta chunk as a read does: decode its reference,
        // then the delta, then check the fingerprint.
        let t = Instant::now();
        let mut dec = Decoder::default();
        let (mut base, mut outb) = (Vec::new(), Vec::new());
        let mut delta_bytes = 0u64;
        for (i, s) in store.iter().enumerate() {
            let Some(b) = s.base else { continue };
            let bs = &store[b];
            dec.decode(bs.enc, &bs.bytes, None, bs.len, &mut base)
                .unwrap();
            dec.decode(s.enc, &s.bytes, Some(&base), s.len, &mut outb)
                .unwrap();
            assert_eq!(reduce::fingerprint(&outb), fps[i]);
            delta_bytes += s.len as u64;
        }
        let rs = t.elapsed().as_secs_f64();
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
                format!("{:.2}", gbps(delta_bytes, rs))
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
        for level in [1, 3, 6, 9] {
            let (mut row, mut bytes, mut secs) = (Vec::new(), 0u64, 0.0);
            for f in &sweep {
                let t = Instant::now();
                let (tot, _, _) = ingest(f, reduce::AVG_CHUNK, level);
                secs += t.elapsed().as_secs_f64();
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
