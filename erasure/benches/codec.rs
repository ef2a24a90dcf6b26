//! `cargo bench -p dase-erasure`: encode and reconstruct speed of every
//! preset, one core, each stated as a fraction of memcpy measured in the same
//! run, plus rebuild read amplification (strips read per strip rebuilt).

use std::hint::black_box;
use std::time::{Duration, Instant};

use dase_erasure::{Codec, Geometry, Layout, PRESETS};

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

/// Median GB/s over seven 150 ms rounds.
fn rate(bytes: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..3 {
        f();
    }
    let mut r: Vec<f64> = (0..7)
        .map(|_| {
            let t = Instant::now();
            let mut n = 0u64;
            while t.elapsed() < Duration::from_millis(150) {
                f();
                n += 1;
            }
            bytes as f64 * n as f64 / t.elapsed().as_secs_f64() / 1e9
        })
        .collect();
    r.sort_by(|a, b| a.partial_cmp(b).unwrap());
    r[3]
}

fn main() {
    // `cargo bench` passes --bench; a filter argument selects presets.
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    println!("backend: {}", Codec::backend());
    println!("| geometry | strip | overhead | memcpy GB/s | encode GB/s | enc/memcpy | reconstruct GB/s (losses) | rec/memcpy | one-loss repair GB/s | read amp. (mean strips/strip) |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (name, k, m, layout) in PRESETS {
        if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        let strip = if *k > 64 { 16 << 10 } else { 64 << 10 };
        let geo = Geometry::new(*k, *m, strip, *layout).unwrap();
        let codec = Codec::new(geo).unwrap();
        let data: Vec<Vec<u8>> = (0..*k).map(|i| pattern(strip, i as u64 + 1)).collect();
        let mut parity = vec![vec![0u8; strip]; *m];
        let total = k * strip;
        let src = pattern(total, 7);
        let mut dst = vec![0u8; total];
        let memcpy = rate(total, || {
            dst.copy_from_slice(black_box(&src));
            black_box(&dst);
        });
        let d: Vec<&[u8]> = data.iter().map(|v| &v[..]).collect();
        let enc = rate(total, || {
            let mut p: Vec<&mut [u8]> = parity.iter_mut().map(|v| &mut v[..]).collect();
            codec.encode(black_box(&d), &mut p).unwrap();
        });
        let mut stripe: Vec<Vec<u8>> = data.iter().chain(parity.iter()).cloned().collect();
        // Worst case the code guarantees: that many data strips lost, all in
        // one group, so an LRC must solve with its global parities.
        let losses = geo.guaranteed_losses();
        let lost: Vec<usize> = (0..losses).collect();
        let rec = rate(total, || {
            let mut s: Vec<&mut [u8]> = stripe.iter_mut().map(|v| &mut v[..]).collect();
            codec.reconstruct(&mut s, &lost).unwrap();
        });
        assert_eq!(stripe[lost[0]], data[lost[0]]);
        // One lost data strip: what a single-node rebuild does per stripe.
        let one = rate(total, || {
            let mut s: Vec<&mut [u8]> = stripe.iter_mut().map(|v| &mut v[..]).collect();
            codec.reconstruct(&mut s, &[1]).unwrap();
        });
        let kind = if matches!(layout, Layout::Lrc { .. }) {
            " (LRC)"
        } else {
            ""
        };
        println!(
            "| {name}{kind} | {} KiB | {:.3} | {memcpy:.1} | {enc:.2} | {:.2} | {rec:.2} ({losses}) | {:.2} | {one:.2} | {:.1} |",
            strip >> 10,
            geo.overhead(),
            enc / memcpy,
            rec / memcpy,
            geo.rebuild_read_amplification()
        );
    }
    beyond_guarantee(&filter);
}

/// For each preset: of random patterns of `guaranteed + 1` and `+ 2` lost
/// strips, how many still reconstruct (the decoder checks rank; it never guesses).
fn beyond_guarantee(filter: &[String]) {
    println!();
    println!(
        "| geometry | guaranteed losses | recovered with +1 loss | recovered with +2 losses |"
    );
    println!("|---|---|---|---|");
    for (name, k, m, layout) in PRESETS {
        if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        let geo = Geometry::new(*k, *m, 64, *layout).unwrap();
        let codec = Codec::new(geo).unwrap();
        let w = geo.width();
        let data: Vec<Vec<u8>> = (0..*k).map(|i| pattern(64, i as u64 + 1)).collect();
        let mut parity = vec![vec![0u8; 64]; *m];
        let d: Vec<&[u8]> = data.iter().map(|v| &v[..]).collect();
        let mut p: Vec<&mut [u8]> = parity.iter_mut().map(|v| &mut v[..]).collect();
        codec.encode(&d, &mut p).unwrap();
        let good: Vec<Vec<u8>> = data.into_iter().chain(parity).collect();
        let mut x = 0x1234_5678u64;
        let mut frac = |extra: usize| {
            let n = geo.guaranteed_losses() + extra;
            if n > *m {
                return "n/a (> m)".to_string();
            }
            let trials = 500;
            let mut ok = 0;
            for _ in 0..trials {
                let mut lost = Vec::new();
                while lost.len() < n {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let i = (x % w as u64) as usize;
                    if !lost.contains(&i) {
                        lost.push(i);
                    }
                }
                let mut s = good.clone();
                let mut v: Vec<&mut [u8]> = s.iter_mut().map(|v| &mut v[..]).collect();
                if codec.reconstruct(&mut v, &lost).is_ok() {
                    assert_eq!(s, good, "reconstruction claimed success with wrong data");
                    ok += 1;
                }
            }
            format!("{:.1} %", 100.0 * ok as f64 / trials as f64)
        };
        let (a, b) = (frac(1), frac(2));
        println!("| {name} | {} | {a} | {b} |", geo.guaranteed_losses());
    }
}
