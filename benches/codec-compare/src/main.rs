//! Compares Reed-Solomon crates on the shapes dase uses, one core, in one run,
//! each figure also stated as a fraction of memcpy measured alongside.
//!
//! Run: `cd benches/codec-compare && cargo run --release`
//!
//! Encode: k data strips -> m parity strips, GB/s of data.
//! Reconstruct: the first m data strips lost, rebuilt from k survivors, GB/s of data.

use std::hint::black_box;
use std::time::{Duration, Instant};

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Median GB/s of `bytes` processed per call of `f`, over several timed rounds.
fn rate(bytes: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..3 {
        f();
    }
    let mut rates = Vec::new();
    for _ in 0..7 {
        let t = Instant::now();
        let mut n = 0u64;
        while t.elapsed() < Duration::from_millis(150) {
            f();
            n += 1;
        }
        rates.push(bytes as f64 * n as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    rates.sort_by(|a, b| a.partial_cmp(b).unwrap());
    rates[rates.len() / 2]
}

struct Shape {
    k: usize,
    m: usize,
    strip: usize,
}

fn main() {
    let shapes = [
        Shape { k: 10, m: 3, strip: 64 << 10 },
        Shape { k: 10, m: 4, strip: 64 << 10 },
        Shape { k: 20, m: 6, strip: 64 << 10 },
        Shape { k: 146, m: 4, strip: 16 << 10 },
        Shape { k: 100, m: 30, strip: 16 << 10 },
    ];
    println!("| shape | strip | memcpy GB/s | crate | encode GB/s | enc/memcpy | reconstruct m GB/s | rec/memcpy |");
    println!("|---|---|---|---|---|---|---|---|");
    for s in &shapes {
        let (k, m, n) = (s.k, s.m, s.strip);
        let data: Vec<Vec<u8>> = (0..k).map(|i| pattern(n, i as u64 + 1)).collect();
        let total = k * n;
        let src = pattern(total, 99);
        let mut dst = vec![0u8; total];
        let memcpy = rate(total, || {
            dst.copy_from_slice(black_box(&src));
            black_box(&dst);
        });
        let mut row = |name: &str, enc: f64, rec: f64| {
            println!(
                "| {k}+{m} | {} KiB | {memcpy:.1} | {name} | {enc:.2} | {:.2} | {rec:.2} | {:.2} |",
                n >> 10,
                enc / memcpy,
                rec / memcpy
            );
        };

        // reed-solomon-erasure (simd-accel: C SSSE3/AVX2 kernels)
        {
            use reed_solomon_erasure::galois_8::ReedSolomon;
            let rs = ReedSolomon::new(k, m).unwrap();
            let mut parity = vec![vec![0u8; n]; m];
            let enc = rate(total, || rs.encode_sep(black_box(&data), &mut parity).unwrap());
            let mut shards: Vec<Vec<u8>> = data.iter().cloned().chain(parity.iter().cloned()).collect();
            let rec = rate(total, || {
                let mut v: Vec<(&mut [u8], bool)> = shards.iter_mut().enumerate().map(|(i, s)| (&mut s[..], i >= m)).collect();
                rs.reconstruct_data(&mut v).unwrap();
            });
            assert_eq!(shards[0], data[0]);
            row("reed-solomon-erasure 6 (simd-accel)", enc, rec);
        }
        // rustfs-erasure-codec (fork with AVX-512 and GFNI back-ends)
        {
            use rustfs_erasure_codec::galois_8::ReedSolomon;
            let rs = ReedSolomon::new(k, m).unwrap();
            let mut parity = vec![vec![0u8; n]; m];
            let enc = rate(total, || rs.encode_sep(black_box(&data), &mut parity).unwrap());
            let mut shards: Vec<Vec<u8>> = data.iter().cloned().chain(parity.iter().cloned()).collect();
            let rec = rate(total, || {
                let mut v: Vec<(&mut [u8], bool)> = shards.iter_mut().enumerate().map(|(i, s)| (&mut s[..], i >= m)).collect();
                rs.reconstruct_data(&mut v).unwrap();
            });
            assert_eq!(shards[0], data[0]);
            row("rustfs-erasure-codec 7.0.1 (avx512+gfni)", enc, rec);
        }
        // fec-rs (GFNI + AVX2, pure Rust)
        {
            let rs = fec_rs::ReedSolomon::new(k, m).unwrap();
            let mut parity = vec![vec![0u8; n]; m];
            let enc = rate(total, || rs.encode_sep(black_box(&data), &mut parity).unwrap());
            let full: Vec<Vec<u8>> = data.iter().cloned().chain(parity.iter().cloned()).collect();
            let rec = rate(total, || {
                let mut v: Vec<Option<Vec<u8>>> = full.iter().enumerate().map(|(i, s)| (i >= m).then(|| s.clone())).collect();
                rs.reconstruct_data(&mut v).unwrap();
                black_box(&v);
            });
            row("fec-rs 0.1 (gfni+avx2; rec. allocates)", enc, rec);
        }
        // reed-solomon-simd (Leopard-style O(n log n), AVX2)
        if reed_solomon_simd::ReedSolomonEncoder::supports(k, m) {
            let mut enc = reed_solomon_simd::ReedSolomonEncoder::new(k, m, n).unwrap();
            let mut parity: Vec<Vec<u8>> = Vec::new();
            let e = rate(total, || {
                for d in &data {
                    enc.add_original_shard(d).unwrap();
                }
                let r = enc.encode().unwrap();
                black_box(r.recovery(0));
            });
            {
                for d in &data {
                    enc.add_original_shard(d).unwrap();
                }
                let r = enc.encode().unwrap();
                parity.extend(r.recovery_iter().map(|p| p.to_vec()));
            }
            let mut dec = reed_solomon_simd::ReedSolomonDecoder::new(k, m, n).unwrap();
            let rec = rate(total, || {
                for (i, d) in data.iter().enumerate().skip(m) {
                    dec.add_original_shard(i, d).unwrap();
                }
                for (i, p) in parity.iter().enumerate() {
                    dec.add_recovery_shard(i, p).unwrap();
                }
                let r = dec.decode().unwrap();
                black_box(r.restored_original(0));
            });
            row("reed-solomon-simd 3", e, rec);
        }
    }
}
