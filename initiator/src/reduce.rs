//! Data reduction, sans IO: content-defined chunking, fingerprints,
//! similarity sketches and the chunk codecs (plain compression and deltas
//! against a reference chunk). The file system (`cnode::fs`) drives these
//! and keeps the indexes; nothing here touches the network or the disk.

use serde::{Deserialize, Serialize};
use zstd::zstd_safe::{self, CCtx, CParameter, DCtx};

mod fingerprints;
use fingerprints::Fingerprinter;

/// A chunk's strong fingerprint (BLAKE3): the key of the chunk index.
pub type Fp = [u8; 32];

pub fn fingerprint(data: &[u8]) -> Fp {
    *blake3::hash(data).as_bytes()
}

/// The fingerprints of the `(offset, len)` ranges of `data`, in order:
/// `fingerprint` of each, computed together ([`Fingerprinter`]: ~1.6×
/// faster than one by one on the chunker's chunks, BENCHMARKS.md) with this thread's
/// scratch, so a write path calling it allocates nothing once warm.
pub fn fingerprints(
    data: &[u8],
    ranges: impl Iterator<Item = (usize, usize)> + Clone,
    out: &mut Vec<Fp>,
) {
    thread_local! {
        static SCRATCH: std::cell::RefCell<Fingerprinter> = std::cell::RefCell::default();
    }
    SCRATCH.with_borrow_mut(|f| f.fingerprints(data, ranges, out));
}

/// The fingerprint of a compression region's content (its members end to
/// end). BLAKE3 in key-derivation mode, so it can never be a chunk's own
/// fingerprint: a region and a chunk of the same bytes are different
/// entries of the one chunk index.
pub fn region_fingerprint(content: &[u8]) -> Fp {
    let mut h = blake3::Hasher::new_derive_key("dase 2026-12 compression region v1");
    h.update(content);
    *h.finalize().as_bytes()
}

/// What a file system does to the data written into it (chosen at mkfs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reduce {
    /// Bytes are stored as written.
    None,
    /// Content-defined chunks, each stored once.
    Dedup,
    /// Dedup, then deltas against similar chunks, then compression.
    #[default]
    Full,
}

impl std::str::FromStr for Reduce {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Reduce::None),
            "dedup" => Ok(Reduce::Dedup),
            "full" => Ok(Reduce::Full),
            _ => Err(format!("reduction {s:?}: expected none, dedup or full")),
        }
    }
}

impl std::fmt::Display for Reduce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Reduce::None => "none",
            Reduce::Dedup => "dedup",
            Reduce::Full => "full",
        })
    }
}

/// Average chunk size. 16 KiB: measured on the evaluation corpus
/// (BENCHMARKS.md), wheels store least at 8–16 KiB and source and logs at
/// 32–64 KiB; overall 16 KiB is within 1.5 % of the best, keeps archives
/// (the size-sensitive case) near their best, and its largest frame fits
/// twice in a 3+2 stripe of 64 KiB strips. Arrays of numbers are cut
/// coarser, within the same bounds ([`chunks_of_size`]).
pub const AVG_CHUNK: u32 = 16 << 10;
pub const MIN_CHUNK: u32 = AVG_CHUNK / 4;
pub const MAX_CHUNK: u32 = max_chunk(AVG_CHUNK);

/// The average chunk sizes a file system may choose at mkfs (powers of
/// two): below 4 KiB a chunk's index entries cost more than dedup finds,
/// and above 64 KiB its largest chunks (4× the average) no longer fit two
/// to a stripe of 64 KiB strips at 10+3.
pub const AVG_CHUNK_RANGE: std::ops::RangeInclusive<u32> = (4 << 10)..=(64 << 10);

/// Checks an average chunk size for a file system ([`AVG_CHUNK_RANGE`]).
pub fn check_avg_chunk(avg: u32) -> Result<(), String> {
    if avg.is_power_of_two() && AVG_CHUNK_RANGE.contains(&avg) {
        return Ok(());
    }
    Err(format!(
        "the average chunk size is a power of two from {} to {} KiB, not {avg} bytes",
        AVG_CHUNK_RANGE.start() >> 10,
        AVG_CHUNK_RANGE.end() >> 10
    ))
}

/// The largest chunk [`chunks_of_size`] cuts for average `avg`.
pub const fn max_chunk(avg: u32) -> u32 {
    avg * 4
}

/// One content-defined chunk of a buffer and its similarity sketch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub offset: usize,
    pub len: usize,
    /// Super-features (None for chunks too small to sketch).
    pub sketch: Option<[u64; SUPER_FEATURES]>,
    /// Cut as an array of numbers ([`Numbers`]).
    pub numbers: bool,
}

/// Content-defined chunks of `data` with their sketches. The last chunk
/// ends where `data` does.
pub fn chunks(data: &[u8]) -> Vec<Chunk> {
    chunks_of_size(data, AVG_CHUNK)
}

/// [`chunks`] with another average size (a power of two; min a quarter,
/// max four times it): a file system's choice at mkfs, and the bench's
/// sweep that measured the default.
///
/// Gear-hash chunking with FastCDC's normalization (Xia et al. 2016/2020:
/// no cut before `min`, a harder cut condition before `avg`, an easier one
/// after, a forced cut at `max`) fused with Odess's content-defined
/// sampling (Zhang et al. 2021): cut points are chosen among the sample
/// points, and one hash per sample both places cuts and makes features.
/// So it runs in two steps: [`samples`] finds the 1 in 128 positions whose
/// rolling gear hash has its low bits clear (which depend on the last 7
/// bytes only) and gives each the hash of the 64 bytes ending there
/// ([`window_hash`]); then a walk over the samples places the cuts and
/// takes each chunk's features from its own samples. A chunk's cuts and
/// sketch thus depend on its bytes and the 63 before it.
///
/// Arrays of little-endian numbers ([`Numbers`]: model weights) are cut
/// and sketched by the hash of their most significant bytes alone, which a
/// training step rarely changes: two versions of a tensor, every number
/// nudged, then still cut at the same places, have the same sketches and
/// pair up for the XOR delta. Those cuts fall between numbers.
pub fn chunks_of_size(data: &[u8], avg: u32) -> Vec<Chunk> {
    let avg = avg.max(1 << 10);
    let max = max_chunk(avg) as usize;
    let avg = avg as usize;
    let numbers = Numbers::detect(data);
    // Arrays of numbers are cut as if their average were the maximum, and
    // never below the average: most of their chunks end at the maximum.
    // A training step rewrites an array in place, so smaller chunks find
    // no more to share, while every chunk costs a zstd frame per byte
    // plane, index lookups and, for a delta, a second fetch on read. On
    // the corpus's checkpoints this stores 0.9 % less than 16 KiB chunks,
    // ingests 1.4-1.7x and reads deltas back 1.6x as fast (BENCHMARKS.md).
    let (min, target) = match numbers {
        Some(_) => (avg, max),
        None => (avg / 4, avg),
    };
    // Cut conditions are tested once per number, not per byte.
    let bits = (target / numbers.map_or(1, |n| n.width)).ilog2();
    // A cut needs `bits ± 1` zero bits: the sample bits and the top bits of
    // the sample's window hash (for numbers, of the rolling hash, whose top
    // bits depend on the last 64 numbers where its low ones depend on the
    // last few only).
    let top = |n: u32| !(u64::MAX >> (n - SAMPLE_BITS));
    let (hard, easy) = (top(bits + 1), top(bits - 1));
    let samples = match numbers {
        Some(n) => n.samples(data),
        None => samples(data),
    };
    let mut out = Vec::with_capacity(data.len() / avg + 1);
    let (mut start, mut next) = (0, 0);
    while start < data.len() {
        let mut end_max = data.len().min(start + max);
        if let Some(n) = numbers.filter(|_| end_max < data.len()) {
            // A forced cut, like a content-defined one, ends just after a
            // number's top byte, so the next chunk starts on a number: its
            // byte planes are then planes of the numbers.
            end_max -= (end_max + n.width - (n.top + 1) % n.width) % n.width;
        }
        let mid = end_max.min(start + target);
        // The first sample at or after `start + min` that is a cut point.
        let first = next + samples[next..].partition_point(|s| (s.pos as usize) < start + min);
        let end = samples[first..]
            .iter()
            .take_while(|s| (s.pos as usize) < end_max)
            .find(|s| {
                let mask = if (s.pos as usize) < mid { hard } else { easy };
                s.hash & mask == 0
            })
            .map_or(end_max, |s| s.pos as usize + 1);
        let stop = next + samples[next..].partition_point(|s| (s.pos as usize) < end);
        let f = Features::of(&samples[next..stop]);
        next = stop;
        out.push(Chunk {
            offset: start,
            len: end - start,
            sketch: f.finish(end - start),
            numbers: numbers.is_some(),
        });
        start = end;
    }
    out
}

/// The layout of an array of little-endian numbers of `width` bytes whose
/// most significant bytes (sign and exponent, for floats) sit at positions
/// `≡ top (mod width)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Numbers {
    pub width: usize,
    pub top: usize,
}

impl Numbers {
    /// Buffers shorter than this are chunked as bytes.
    const MIN_LEN: usize = 64 << 10;
    /// Most significant bytes of weights and activations take few values
    /// (sign and a narrow range of exponents); the others look random.
    const LOW: f64 = 6.0;
    const HIGH: f64 = 7.0;

    /// Whether `data` looks like an array of 2- or 4-byte numbers (bf16 or
    /// fp16, fp32 or int32): the byte entropy of one position in 4 (or 2 in
    /// 4, a width apart) is low and of the others high. Samples 16 blocks of
    /// 4 KiB spread over the buffer.
    pub fn detect(data: &[u8]) -> Option<Numbers> {
        if data.len() < Self::MIN_LEN {
            return None;
        }
        const BLOCK: usize = 4096;
        const BLOCKS: usize = 16;
        let mut hist = [[0u32; 256]; 4];
        let stride = (data.len() - BLOCK) / (BLOCKS - 1) / 4 * 4;
        for b in 0..BLOCKS {
            for (i, &x) in data[b * stride..b * stride + BLOCK].iter().enumerate() {
                hist[i % 4][x as usize] += 1;
            }
        }
        let n = (BLOCK * BLOCKS / 4) as f64;
        let e: Vec<f64> = hist
            .iter()
            .map(|h| {
                h.iter()
                    .filter(|&&c| c > 0)
                    .map(|&c| {
                        let p = c as f64 / n;
                        -p * p.log2()
                    })
                    .sum()
            })
            .collect();
        let low: Vec<usize> = (0..4).filter(|&i| e[i] < Self::LOW).collect();
        let high = (0..4).filter(|&i| e[i] > Self::HIGH).count();
        match low[..] {
            [t] if high == 3 => Some(Numbers { width: 4, top: t }),
            [a, b] if b == a + 2 && high == 2 => Some(Numbers { width: 2, top: a }),
            _ => None,
        }
    }

    /// The sample positions of the hash rolled over the most significant
    /// bytes only, in order: with AVX-512 VBMI where the CPU has it
    /// ([`simd::number_samples`]), else [`Numbers::samples_scalar`]. Both
    /// find exactly the same samples (tested).
    fn samples(self, data: &[u8]) -> Vec<Sample> {
        #[cfg(target_arch = "x86_64")]
        if simd::available() {
            // SAFETY: the CPU has the features `simd::number_samples` is
            // compiled for.
            return unsafe { simd::number_samples(data, self) };
        }
        self.samples_scalar(data)
    }

    /// The sample positions of the hash rolled over the most significant
    /// bytes only, in order, one number after another.
    fn samples_scalar(self, data: &[u8]) -> Vec<Sample> {
        assert!(
            data.len() <= u32::MAX as usize,
            "chunk buffers are far smaller"
        );
        let mut out = Vec::with_capacity(data.len() / self.width / 100 + 1);
        let mut h = 0u64;
        for (j, &b) in data
            .get(self.top..)
            .unwrap_or_default()
            .iter()
            .step_by(self.width)
            .enumerate()
        {
            h = (h << 1).wrapping_add(GEAR[b as usize]);
            if h & SAMPLE_MASK == 0 {
                out.push(Sample {
                    pos: (self.top + j * self.width) as u32,
                    hash: h,
                });
            }
        }
        out
    }
}

/// A position whose rolling hash has the sample bits clear. `repr(C)`,
/// hash first: the vector feature pass ([`simd::features`]) loads eight
/// samples' hashes as the even words of two 64-byte loads.
#[derive(Clone, Copy)]
#[repr(C)]
struct Sample {
    hash: u64,
    pos: u32,
}
const _: () = assert!(std::mem::size_of::<Sample>() == 16);

/// The sample positions of `data` in order: with AVX-512 VBMI where the
/// CPU has it ([`simd::samples`]), else [`samples_scalar`]. Both find
/// exactly the same samples (tested).
fn samples(data: &[u8]) -> Vec<Sample> {
    #[cfg(target_arch = "x86_64")]
    if simd::available() {
        // SAFETY: the CPU has the features `simd::samples` is compiled for.
        return unsafe { simd::samples(data) };
    }
    samples_scalar(data)
}

/// The sample positions of `data` in order. Two lanes roll the gear hash
/// over the two halves at once (the second starts 64 bytes early, after
/// which its hash no longer depends on where it started): a lone lane is
/// bound by the hash's dependency chain, two run 1.6× faster here.
fn samples_scalar(data: &[u8]) -> Vec<Sample> {
    assert!(
        data.len() <= u32::MAX as usize,
        "chunk buffers are far smaller"
    );
    let mut lo = Vec::with_capacity(data.len() / 100 + 1);
    let half = data.len() / 2;
    if half < 64 {
        let mut h = 0;
        roll(data, 0, &mut h, &mut lo);
        return lo;
    }
    let mut hi = Vec::with_capacity(half / 100 + 1);
    let (mut h0, mut h1) = (0u64, 0u64);
    for &b in &data[half - 64..half] {
        h1 = (h1 << 1).wrapping_add(GEAR[b as usize]);
    }
    let (a, b) = data.split_at(half);
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        h0 = (h0 << 1).wrapping_add(GEAR[x as usize]);
        h1 = (h1 << 1).wrapping_add(GEAR[y as usize]);
        if (h0 & SAMPLE_MASK == 0) | (h1 & SAMPLE_MASK == 0) {
            if h0 & SAMPLE_MASK == 0 {
                lo.push(Sample {
                    pos: i as u32,
                    hash: window_hash(data, i),
                });
            }
            if h1 & SAMPLE_MASK == 0 {
                hi.push(Sample {
                    pos: (half + i) as u32,
                    hash: window_hash(data, half + i),
                });
            }
        }
    }
    // An odd length leaves one byte for the second lane.
    roll(data, 2 * half, &mut h1, &mut hi);
    lo.append(&mut hi);
    lo
}

/// Rolls `h` on over `data[from..]`, keeping the samples.
fn roll(data: &[u8], from: usize, h: &mut u64, out: &mut Vec<Sample>) {
    for (i, &b) in data.iter().enumerate().skip(from) {
        *h = (*h << 1).wrapping_add(GEAR[b as usize]);
        if *h & SAMPLE_MASK == 0 {
            out.push(Sample {
                pos: i as u32,
                hash: window_hash(data, i),
            });
        }
    }
}

/// The hash a sample at position `i` carries, which places cuts and makes
/// features: of the 64 bytes ending at `i` (zeros before the data). The
/// gear hash's full 64 bits would do (they depend on the same 64 bytes),
/// but where only the samples are wanted ([`simd`]) recomputing them is a
/// 64-step chain per sample; this is four independent 64×64→128-bit
/// multiplies (xxh3's pairing of words) and a final mix.
#[inline(always)]
fn window_hash(data: &[u8], i: usize) -> u64 {
    let w: [u8; 64] = match i.checked_sub(63) {
        Some(s) => data[s..=i].try_into().expect("64 bytes"),
        None => {
            let mut w = [0u8; 64];
            w[63 - i..].copy_from_slice(&data[..=i]);
            w
        }
    };
    let word = |m: usize| u64::from_le_bytes(w[8 * m..8 * m + 8].try_into().expect("8 bytes"));
    let mut acc = 0u64;
    for j in 0..4 {
        let a = word(2 * j) ^ WINDOW_KEYS[2 * j];
        let b = word(2 * j + 1) ^ WINDOW_KEYS[2 * j + 1];
        let p = a as u128 * b as u128;
        acc = acc.wrapping_add(p as u64 ^ (p >> 64) as u64);
    }
    splitmix(acc)
}

const WINDOW_KEYS: [u64; 8] = splitmix_table(0x3d0_0000);

/// The sampler with AVX-512 VBMI. A sample is a position whose gear hash
/// has its low [`SAMPLE_BITS`] bits clear, and those bits depend on the
/// last 7 bytes only: `Σ_{k<7} GEAR[b_{i-k}] << k mod 128`. That window
/// sum has no dependency chain, so 64 positions are tested at once: the
/// 256-entry table of the gears' low bits is two `vpermi2b` lookups, and
/// the sum is built by doubling (a window of 2, then 4, then 8 — the 8th
/// term is `<< 7`, nothing mod 128), each step adding the last step's sums
/// shifted along by 1, 2 or 4 positions (a `vpermt2b` that brings in the
/// previous 64's tail). The scalar sampler rolls one hash per lane through
/// every byte instead, a chain of one add per byte.
#[cfg(target_arch = "x86_64")]
mod simd {
    use super::{window_hash, Features, Numbers, Sample, FEATURES, GEAR, SAMPLE_MASK, TRANSFORMS};
    use std::arch::x86_64::*;

    /// The low 7 bits of every gear, as bytes.
    static GEAR_LO: [u8; 256] = {
        let mut t = [0u8; 256];
        let mut i = 0;
        while i < 256 {
            t[i] = (GEAR[i] & SAMPLE_MASK) as u8;
            i += 1;
        }
        t
    };

    pub(super) fn available() -> bool {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vbmi")
    }

    pub(super) fn features_available() -> bool {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512dq")
    }

    /// [`Features`] of `samples` (at least eight), vertically: each of the
    /// twelve transforms runs on eight samples' hashes in one vector, its
    /// running maxima kept per lane and folded at the end. One by one, a
    /// sample cost twelve scalar multiply-add-max steps, 29 % of the
    /// chunker's time (BENCHMARKS.md).
    ///
    /// # Safety
    /// The CPU must have AVX-512 F and DQ ([`features_available`]).
    #[target_feature(enable = "avx512f,avx512dq")]
    pub(super) unsafe fn features(samples: &[Sample]) -> Features {
        let mut acc = [_mm512_setzero_si512(); FEATURES];
        let hashes = _mm512_set_epi64(14, 12, 10, 8, 6, 4, 2, 0);
        let mut step = |h: __m512i, lanes: __mmask8| {
            for (a, &(m, c)) in acc.iter_mut().zip(TRANSFORMS.iter()) {
                let v = _mm512_add_epi64(
                    _mm512_mullo_epi64(h, _mm512_set1_epi64(m as i64)),
                    _mm512_set1_epi64(c as i64),
                );
                *a = _mm512_mask_max_epu64(*a, lanes, *a, v);
            }
        };
        let mut eights = samples.chunks_exact(8);
        for e in &mut eights {
            // SAFETY: 8 samples of 16 bytes (`repr(C)`, hash first).
            let p = e.as_ptr().cast::<u8>();
            let (lo, hi) = (
                _mm512_loadu_si512(p.cast()),
                _mm512_loadu_si512(p.add(64).cast()),
            );
            step(_mm512_permutex2var_epi64(lo, hashes, hi), 0xff);
        }
        let rest = eights.remainder();
        if !rest.is_empty() {
            let mut h = [0u64; 8];
            for (x, s) in h.iter_mut().zip(rest) {
                *x = s.hash;
            }
            // SAFETY: 64 bytes of `h`.
            let v = _mm512_loadu_si512(h.as_ptr().cast());
            step(v, (1u8 << rest.len()) - 1);
        }
        let mut f = Features {
            max: [0; FEATURES],
            sampled: true,
        };
        for (m, a) in f.max.iter_mut().zip(acc) {
            *m = _mm512_reduce_max_epu64(a);
        }
        f
    }

    /// Positions whose hits are found before their samples are taken.
    const BLOCK: usize = 4096;

    /// Indexes for `vpermt2b(previous, idx, current)` that move every byte
    /// `k` positions on: position `j` takes `current[j - k]`, or for
    /// `j < k` the previous vector's `previous[64 + j - k]`.
    fn along(k: u8) -> [u8; 64] {
        std::array::from_fn(|j| j as u8 + 64 - k)
    }

    /// The low-bit test of the gear hash over a run of bytes, a block at a
    /// time, carried from block to block: the previous 64 positions'
    /// gears and window sums of 2 and 4 (zero before the run: the hash
    /// starts at 0), and the tables.
    struct LowBits {
        tables: [__m512i; 4],
        by: [__m512i; 3],
        g0: __m512i,
        s1: __m512i,
        s2: __m512i,
    }

    impl LowBits {
        /// # Safety
        /// The CPU must have AVX-512 F, BW and VBMI ([`available`]).
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
        unsafe fn new() -> Self {
            // SAFETY (every load): 64 bytes of a 256- or 64-byte array.
            let t = GEAR_LO.as_ptr();
            let by = [along(1), along(2), along(4)];
            LowBits {
                tables: std::array::from_fn(|i| _mm512_loadu_si512(t.add(64 * i).cast())),
                by: std::array::from_fn(|i| _mm512_loadu_si512(by[i].as_ptr().cast())),
                g0: _mm512_setzero_si512(),
                s1: _mm512_setzero_si512(),
                s2: _mm512_setzero_si512(),
            }
        }

        /// The positions of `run` (the next at most [`BLOCK`] bytes of
        /// the run) whose hash has its low bits clear, as `at + index`, in
        /// order at the start of `hits`; returns how many.
        ///
        /// # Safety
        /// The CPU must have AVX-512 F, BW and VBMI ([`available`]).
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
        unsafe fn block(&mut self, run: &[u8], at: u32, hits: &mut [u32; BLOCK + 2]) -> usize {
            let len = run.len();
            assert!(len <= BLOCK);
            let [t0, t1, t2, t3] = self.tables;
            let [by1, by2, by4] = self.by;
            // Masked before a 16-bit shift so no bit crosses into the next
            // byte (only the low 7 bits of a sum matter).
            let (low6, low4) = (_mm512_set1_epi8(0x3f), _mm512_set1_epi8(0x0f));
            let low7 = _mm512_set1_epi8(0x7f);
            let (mut g0, mut s1, mut s2) = (self.g0, self.s1, self.s2);
            // The vector work first, leaving one mask of hits per 64
            // positions; then the positions. Apart, the loop over the
            // bytes has no branch that depends on them.
            let mut masks = [0u64; BLOCK / 64];
            for (m, mask) in masks[..len.div_ceil(64)].iter_mut().enumerate() {
                let (j, n) = (64 * m, len - 64 * m);
                // SAFETY: within `run` (the last 64 with a mask).
                let x = if n >= 64 {
                    // The hardware prefetcher alone left this load the
                    // loop's hottest instruction; 2 KiB ahead measured
                    // 8-10 % faster (a prefetch past the end cannot fault).
                    _mm_prefetch::<_MM_HINT_T0>(run.as_ptr().wrapping_add(j + 2048).cast());
                    _mm512_loadu_si512(run.as_ptr().add(j).cast())
                } else {
                    _mm512_maskz_loadu_epi8((1u64 << n) - 1, run.as_ptr().add(j).cast())
                };
                let lo = _mm512_permutex2var_epi8(t0, x, t1);
                let hi = _mm512_permutex2var_epi8(t2, x, t3);
                let g = _mm512_mask_blend_epi8(_mm512_movepi8_mask(x), lo, hi);
                // Window of 2: g[i] + 2 g[i-1].
                let v = _mm512_permutex2var_epi8(g0, by1, g);
                let w1 = _mm512_add_epi8(g, _mm512_add_epi8(v, v));
                // Window of 4: w1[i] + 4 w1[i-2].
                let v = _mm512_permutex2var_epi8(s1, by2, w1);
                let w2 = _mm512_add_epi8(w1, _mm512_slli_epi16::<2>(_mm512_and_si512(v, low6)));
                // Window of 8: w2[i] + 16 w2[i-4].
                let v = _mm512_permutex2var_epi8(s2, by4, w2);
                let w3 = _mm512_add_epi8(w2, _mm512_slli_epi16::<4>(_mm512_and_si512(v, low4)));
                (g0, s1, s2) = (g, w1, w2);
                *mask = _mm512_testn_epi8_mask(w3, low7);
                if n < 64 {
                    *mask &= (1u64 << n) - 1;
                }
            }
            (self.g0, self.s1, self.s2) = (g0, s1, s2);
            // Flattened without a branch per word: two positions are
            // written whatever the word holds and its count says how many
            // were real; only a word of three or more (1.4 % of them at
            // one hit in 128) takes a loop.
            let mut found = 0;
            for (m, &mask) in masks[..len.div_ceil(64)].iter().enumerate() {
                let first = at + 64 * m as u32;
                let next = mask & mask.wrapping_sub(1);
                hits[found] = first.wrapping_add(mask.trailing_zeros());
                hits[found + 1] = first.wrapping_add(next.trailing_zeros());
                let count = mask.count_ones() as usize;
                if count > 2 {
                    let mut rest = next & next.wrapping_sub(1);
                    for h in &mut hits[found + 2..found + count] {
                        *h = first + rest.trailing_zeros();
                        rest &= rest - 1;
                    }
                }
                found += count;
            }
            found
        }
    }

    /// # Safety
    /// The CPU must have AVX-512 F, BW and VBMI ([`available`]).
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
    pub(super) unsafe fn samples(data: &[u8]) -> Vec<Sample> {
        assert!(
            data.len() <= u32::MAX as usize,
            "chunk buffers are far smaller"
        );
        let mut out = Vec::with_capacity(data.len() / 100 + 1);
        let mut low = LowBits::new();
        // A block's hit positions: every position at worst (a run of a
        // byte whose gear has its low bits clear), and two written ahead.
        let mut hits = [0u32; BLOCK + 2];
        for (b, block) in data.chunks(BLOCK).enumerate() {
            let found = low.block(block, (b * BLOCK) as u32, &mut hits);
            hash_samples(data, &hits[..found], &mut out);
        }
        out
    }

    /// The samples at `positions` with their window hashes, apart from
    /// the vector loop: alone, the hashes' independent multiplies overlap
    /// and nothing of the vector loop's state is spilled around them.
    #[inline(never)]
    fn hash_samples(data: &[u8], positions: &[u32], out: &mut Vec<Sample>) {
        out.extend(positions.iter().map(|&p| Sample {
            pos: p,
            hash: window_hash(data, p as usize),
        }));
    }

    /// Indexes for `vpermt2b(a, idx, b)` that gather the top bytes of the
    /// numbers in `a` then `b` (of `width` bytes, top byte at `top`) into
    /// the vector's positions from `into` on.
    fn top_bytes(width: usize, top: usize, into: usize) -> [u8; 64] {
        std::array::from_fn(|i| (i.saturating_sub(into) * width + top).min(127) as u8)
    }

    /// [`Numbers::samples`](super::Numbers) with the low-bit test run 64
    /// numbers at a time: the numbers' top bytes are gathered, a block at
    /// a time, into a run of their own (one or two `vpermt2b` per 64),
    /// which [`LowBits`] tests as it tests bytes. A hit's hash is the gear
    /// hash the scalar sampler rolls, recomputed from its last 64 top bytes
    /// ([`gear_window`]): the same 64 bits. On the corpus's bf16
    /// checkpoints the scalar roll, a chain of one shift-add per number,
    /// was the chunker's whole cost (1.4-1.9 GB/s).
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW and VBMI ([`available`]).
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
    pub(super) unsafe fn number_samples(data: &[u8], n: Numbers) -> Vec<Sample> {
        assert!(
            data.len() <= u32::MAX as usize,
            "chunk buffers are far smaller"
        );
        assert!((n.width == 2 || n.width == 4) && n.top < n.width);
        let count = data.len().saturating_sub(n.top).div_ceil(n.width);
        let mut out = Vec::with_capacity(count / 100 + 1);
        let mut low = LowBits::new();
        // The last 64 top bytes before the block (zeros before the first,
        // never summed), then the block's.
        let mut run = [0u8; 64 + BLOCK];
        let mut hits = [0u32; BLOCK + 2];
        let (lo, hi) = (top_bytes(n.width, n.top, 0), top_bytes(n.width, n.top, 32));
        // SAFETY: 64 bytes each.
        let (lo, hi) = (
            _mm512_loadu_si512(lo.as_ptr().cast()),
            _mm512_loadu_si512(hi.as_ptr().cast()),
        );
        let mut first = 0;
        while first < count {
            let len = BLOCK.min(count - first);
            let block = &mut run[64..64 + len];
            // Whole vectors of 64 numbers while they are in the data, then
            // one by one.
            let whole = (data.len() / n.width).saturating_sub(first).min(len) / 64;
            for v in 0..whole {
                let p = data.as_ptr().add((first + 64 * v) * n.width);
                // As in `LowBits::block`: a prefetch past the end cannot fault.
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(2048).cast());
                // SAFETY: 64 numbers within `data` (`whole` says so).
                let a = _mm512_loadu_si512(p.cast());
                let b = _mm512_loadu_si512(p.add(64).cast());
                let tops = if n.width == 2 {
                    _mm512_permutex2var_epi8(a, lo, b)
                } else {
                    let c = _mm512_loadu_si512(p.add(128).cast());
                    let d = _mm512_loadu_si512(p.add(192).cast());
                    _mm512_mask_blend_epi8(
                        0xffff_ffff_0000_0000,
                        _mm512_permutex2var_epi8(a, lo, b),
                        _mm512_permutex2var_epi8(c, hi, d),
                    )
                };
                _mm512_storeu_si512(block.as_mut_ptr().add(64 * v).cast(), tops);
            }
            for (i, t) in block.iter_mut().enumerate().skip(64 * whole) {
                *t = data[n.top + (first + i) * n.width];
            }
            let found = low.block(block, 0, &mut hits);
            let block = &run[64..64 + len];
            let pos = |j: usize| (n.top + j * n.width) as u32;
            if found > len / 8 {
                // Top bytes that repeat (a tensor of zeros, of one value)
                // may hit at every number, where 64 terms each would cost
                // far more than rolling the hash through the block.
                let mut h = gear_window(&run[64 - first.min(64)..64]);
                for (i, &b) in block.iter().enumerate() {
                    h = (h << 1).wrapping_add(GEAR[b as usize]);
                    if h & SAMPLE_MASK == 0 {
                        out.push(Sample {
                            pos: pos(first + i),
                            hash: h,
                        });
                    }
                }
            } else {
                out.extend(hits[..found].iter().map(|&i| {
                    let (i, j) = (i as usize, first + i as usize);
                    let hash = if j >= 63 {
                        gear64(run[i + 1..=64 + i].try_into().expect("64 bytes"))
                    } else {
                        gear_window(&run[64 + i - j..=64 + i])
                    };
                    Sample { pos: pos(j), hash }
                }));
            }
            run.copy_within(len..len + 64, 0);
            first += len;
        }
        out
    }

    /// The gear hash rolled over `window` from 0 (`h = (h << 1) + gear`
    /// per byte): only the last 64 bytes reach it.
    fn gear_window(window: &[u8]) -> u64 {
        window
            .iter()
            .fold(0u64, |h, &b| (h << 1).wrapping_add(GEAR[b as usize]))
    }

    /// [`gear_window`] of 64 bytes as four independent rolls, one per
    /// residue of the position mod 4 (each shifting by 4 a step), joined
    /// at the end: four chains of 16 shift-adds, not one of 64.
    #[inline(always)]
    fn gear64(window: &[u8; 64]) -> u64 {
        let mut q = [0u64; 4];
        for four in window.chunks_exact(4) {
            for (q, &b) in q.iter_mut().zip(four) {
                *q = (*q << 4).wrapping_add(GEAR[b as usize]);
            }
        }
        (q[0] << 3)
            .wrapping_add(q[1] << 2)
            .wrapping_add(q[2] << 1)
            .wrapping_add(q[3])
    }
}

/// How a stored chunk is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Encoding {
    /// As is (incompressible, or reduction without compression).
    Raw,
    /// zstd.
    Zstd,
    /// zstd with the reference chunk as prefix: a byte-level delta.
    Delta,
    /// XOR with the reference, bytes grouped by their place in a 4-byte
    /// word, then zstd: a delta for arrays of numbers (floats of a model
    /// whose low bytes changed) that a byte delta cannot express.
    XorDelta,
    /// zstd of many chunks' content end to end: a *compression region*,
    /// which cold plain chunks are moved into so that each is compressed
    /// with the history of its neighbours (per-chunk zstd has none). Not a
    /// chunk of any file: its members point into it.
    Region,
    /// Bytes `[offset, offset + len)` of the region its `base` names: a
    /// chunk with no frame of its own.
    Slice,
    /// An array of numbers as the four byte planes of its 4-byte words,
    /// each compressed on its own or stored as is ([`planes_layout`]): the
    /// sign/exponent plane of floats compresses, the low mantissa does not
    /// and then costs a copy to read, not a decompression.
    Planes,
    /// [`Planes`](Encoding::Planes) of the XOR with the reference: the
    /// delta for arrays of numbers.
    XorPlanes,
}

impl Encoding {
    pub fn is_delta(self) -> bool {
        matches!(
            self,
            Encoding::Delta | Encoding::XorDelta | Encoding::XorPlanes
        )
    }

    /// Whether a chunk of this encoding may be a delta's reference: a read
    /// then costs at most two frames (the delta's and the reference's own,
    /// or its region's).
    pub fn can_be_reference(self) -> bool {
        matches!(
            self,
            Encoding::Raw | Encoding::Zstd | Encoding::Slice | Encoding::Planes
        )
    }
}

// ---- similarity sketches ---------------------------------------------------

/// Super-features per chunk: two chunks sharing any one are likely similar.
/// Two, not the three of Finesse and Odess: on the corpus a third found
/// deltas for 0.2 % of the stored bytes (178.8 against 179.2 MB) and cost a
/// third more similarity entries, index pages and lookups (BENCHMARKS.md).
/// The first two are the same values as before, so entries written with
/// three still match.
pub const SUPER_FEATURES: usize = 2;
const FEATURES_PER_SF: usize = 4;
const FEATURES: usize = SUPER_FEATURES * FEATURES_PER_SF;
/// Content-defined sampling (Odess): features are taken only at positions
/// whose rolling hash has these low bits clear (1 in 128).
const SAMPLE_BITS: u32 = 7;
const SAMPLE_MASK: u64 = (1 << SAMPLE_BITS) - 1;
/// Chunks smaller than this get no sketch (too few samples to mean much).
pub const MIN_SKETCH: usize = 1024;

const fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// `splitmix(seed + i)` for every `i`: the fixed pseudo-random constants
/// of the hashes here.
const fn splitmix_table<const N: usize>(seed: u64) -> [u64; N] {
    let mut t = [0u64; N];
    let mut i = 0;
    while i < N {
        t[i] = splitmix(seed + i as u64);
        i += 1;
    }
    t
}

const GEAR: [u64; 256] = splitmix_table(0x5eed_0000);

/// Odd multipliers and offsets of the linear transforms, one per feature.
const TRANSFORMS: [(u64, u64); FEATURES] = {
    let (m, a): ([u64; FEATURES], [u64; FEATURES]) =
        (splitmix_table(0xfea7_0000), splitmix_table(0xadd0_0000));
    let mut t = [(0u64, 0u64); FEATURES];
    let mut i = 0;
    while i < FEATURES {
        t[i] = (m[i] | 1, a[i]);
        i += 1;
    }
    t
};

/// The sketch of `data` as one chunk (as [`chunks`] computes it for a
/// chunk at the start of a buffer).
pub fn sketch(data: &[u8]) -> Option<[u64; SUPER_FEATURES]> {
    Features::of(&samples(data)).finish(data.len())
}

/// The running maxima of the feature transforms over a chunk's samples.
#[derive(Default)]
struct Features {
    max: [u64; FEATURES],
    sampled: bool,
}

impl Features {
    /// The features of one chunk's samples: eight samples at a time with
    /// AVX-512 DQ ([`simd::features`], the same maxima), else one by one.
    fn of(samples: &[Sample]) -> Features {
        #[cfg(target_arch = "x86_64")]
        if samples.len() >= 8 && simd::features_available() {
            // SAFETY: the CPU has the features `simd::features` needs.
            return unsafe { simd::features(samples) };
        }
        Self::of_scalar(samples)
    }

    fn of_scalar(samples: &[Sample]) -> Features {
        let mut f = Features::default();
        for s in samples {
            f.sample(s.hash);
        }
        f
    }

    #[inline(always)]
    fn sample(&mut self, h: u64) {
        self.sampled = true;
        for (fi, &(m, a)) in self.max.iter_mut().zip(TRANSFORMS.iter()) {
            *fi = (*fi).max(m.wrapping_mul(h).wrapping_add(a));
        }
    }

    fn finish(&self, len: usize) -> Option<[u64; SUPER_FEATURES]> {
        if len < MIN_SKETCH || !self.sampled {
            return None;
        }
        let mut sf = [0u64; SUPER_FEATURES];
        for (j, s) in sf.iter_mut().enumerate() {
            let mut x = j as u64;
            for v in &self.max[j * FEATURES_PER_SF..(j + 1) * FEATURES_PER_SF] {
                x = splitmix(x ^ v);
            }
            *s = x;
        }
        Some(sf)
    }
}

// ---- compressibility -------------------------------------------------------

/// Bytes of a chunk the compressibility check looks at.
const ENTROPY_SAMPLE: usize = 1024;

/// `c · log2 c` for every count a sample can have: the entropy of a
/// histogram without a logarithm per symbol.
static C_LOG_C: std::sync::LazyLock<[f32; ENTROPY_SAMPLE + 1]> = std::sync::LazyLock::new(|| {
    let mut t = [0f32; ENTROPY_SAMPLE + 1];
    for (c, v) in t.iter_mut().enumerate().skip(1) {
        *v = (c as f64 * (c as f64).log2()) as f32;
    }
    t
});

/// Whether a chunk looks incompressible: the order-0 entropy of a sample
/// of 1 KiB spread over the chunk is near 8 bits a byte (compressed media,
/// encrypted data), so such data skips the compressor (not the sketch:
/// compressed archives of two versions are near-identical). A larger
/// sample decides the same on the corpus and costs several times more.
pub fn looks_incompressible(data: &[u8]) -> bool {
    if data.len() < 512 {
        return false;
    }
    let mut hist = [0u16; 256];
    // Runs of a cache line spread evenly over the chunk, not single bytes
    // a stride apart: the same 1 KiB sampled, from 16 lines instead of one
    // line in every one of them (the chunk is out of L2 by now: the byte
    // stride made this check cost as much as the chunker's sampler).
    let n = data.len().min(ENTROPY_SAMPLE);
    if data.len() <= ENTROPY_SAMPLE {
        for &b in data {
            hist[b as usize] += 1;
        }
    } else {
        const RUN: usize = 64;
        const RUNS: usize = ENTROPY_SAMPLE / RUN;
        let gap = (data.len() - RUN) / (RUNS - 1);
        // All sixteen are asked for before any is counted: counted in
        // turn, each run waited for its own miss (on data out of cache the
        // check ran 7.0 GB/s, 11.7 with this; ingest of random data 3-4 %
        // faster).
        #[cfg(target_arch = "x86_64")]
        for k in 0..RUNS {
            // SAFETY: a prefetch is only a hint; it never faults.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    data.as_ptr().add(k * gap).cast(),
                )
            };
        }
        for k in 0..RUNS {
            for &b in &data[k * gap..k * gap + RUN] {
                hist[b as usize] += 1;
            }
        }
    }
    let t = &*C_LOG_C;
    // Eight sums side by side: one running sum is a chain of 256 dependent
    // float additions, which cost more than the histogram (0.44 against
    // 0.37 µs a 16 KiB chunk in cache).
    let mut lanes = [0f32; 8];
    for counts in hist.chunks_exact(8) {
        for (l, &c) in lanes.iter_mut().zip(counts) {
            *l += t[c as usize];
        }
    }
    let sum: f32 = lanes.iter().sum();
    let nf = n as f64;
    // H = log2 n − Σ c·log2 c / n.
    let entropy = nf.log2() - sum as f64 / nf;
    // A uniform sample of n bytes over 256 values measures a little under 8.
    let ceiling = 8.0 - 255.0 / (2.0 * nf * std::f64::consts::LN_2);
    entropy > ceiling - 0.05
}

// ---- codecs ------------------------------------------------------------------

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("zstd: {0}")]
    Zstd(&'static str),
    #[error("decoded {got} bytes, the chunk has {want}")]
    Length { got: usize, want: usize },
    #[error("a delta needs its reference chunk")]
    NoBase,
    #[error("a delta's reference starts like a zstd dictionary")]
    DictBase,
    #[error("a region's slice has no frame of its own")]
    NoFrame,
    #[error("a region's member table is damaged")]
    Table,
}

fn zerr(code: usize) -> CodecError {
    CodecError::Zstd(zstd_safe::get_error_name(code))
}

/// zstd level for chunks: 1. Measured in one run over the corpus
/// (BENCHMARKS.md), level 1 stores 0.2 % more than level 3 (4 % more of the
/// source releases, 2 % less of the logs) and ingests 22 % faster on one
/// core; 6 and 9 store 1 % and 2 % less at 60 % and 37 % of level 3's
/// speed; the deltas (wheels, checkpoints) store the same at every level.
pub const LEVEL: i32 = 1;

/// Compresses chunks. `'a` is how long the reference chunks of deltas live:
/// zstd refers to them rather than copying them into a dictionary.
pub struct Encoder<'a> {
    cctx: CCtx<'a>,
    scratch: Vec<u8>,
    /// The planes of a chunk, compressed (those that were tried).
    zplanes: [Vec<u8>; 4],
    /// A sparse plane's values and gaps ([`sparse_plane`]) before zstd.
    sparse: Vec<u8>,
    level: i32,
    /// The planes' compressor, made when first needed.
    planes: Option<CCtx<'static>>,
}

/// The write path's zstd level for byte planes: the fastest match finder
/// with Huffman-coded literals (negative levels turn those off unless
/// asked). A plane of exponents is a few symbols with few long repeats:
/// on the corpus's checkpoints it stores 0.36 of itself against level 1's
/// 0.40, and XOR planes 0.074 and 0.011 against 0.050 and 0.005, in 0.8×
/// the time — and reads back as literals.
const PLANES_FAST: i32 = -20;

/// The shortest match the planes' fast level looks for: zstd's longest
/// minimum. A plane of exponents is a few symbols whose short repeats
/// (4–6 bytes) cost a sequence each to decode and save little over their
/// Huffman-coded literals. On the corpus's checkpoints (1,129 exponent
/// planes of references, one core): 0.365 of the plane at the default
/// minimum, encoded at 0.33 GB/s and decoded in 16.7 µs a plane; 0.349 at
/// 7, 0.48 GB/s, 11.5 µs.
const PLANES_MIN_MATCH: u32 = 7;

impl<'a> Encoder<'a> {
    pub fn new(level: i32) -> Self {
        let mut cctx = CCtx::create();
        cctx.set_parameter(CParameter::CompressionLevel(level))
            .expect("valid zstd level");
        Encoder {
            cctx,
            scratch: Vec::new(),
            zplanes: Default::default(),
            sparse: Vec::new(),
            level,
            planes: None,
        }
    }

    /// Compresses `data` into `out`: `Zstd`, or `Raw` (out left empty) when
    /// that saves less than 1/32.
    pub fn compress(&mut self, data: &[u8], out: &mut Vec<u8>) -> Encoding {
        out.clear();
        out.reserve(zstd_safe::compress_bound(data.len()));
        match self.cctx.compress2(out, data) {
            Ok(n) if n < data.len() - data.len() / 32 => Encoding::Zstd,
            _ => {
                out.clear();
                Encoding::Raw
            }
        }
    }

    /// How a new chunk is stored, decided in one place for the write
    /// path and the bench: `out` gets the stored bytes (left empty for
    /// `Raw`: the chunk as is); a delta encoding means `base` is its
    /// reference.
    ///
    /// With a similar chunk, a delta: for arrays of numbers the XOR delta,
    /// otherwise a byte delta (then the XOR delta too when the byte delta
    /// keeps over 1/8: every number may have moved). A delta that keeps
    /// under half (three quarters for numbers, whose plain compression
    /// saves a few percent) is taken outright; a weaker one only when it
    /// beats plain compression by a tenth, since reading it costs a second
    /// chunk. Otherwise plain compression, or none for chunks that look
    /// incompressible.
    pub fn encode(
        &mut self,
        data: &[u8],
        base: Option<&'a [u8]>,
        kind: Kind,
        out: &mut Vec<u8>,
    ) -> Encoding {
        if let Some(base) = base {
            let e = if kind.numbers {
                Some(self.xor_delta(data, base, out))
            } else {
                self.byte_delta(data, base, out)
            };
            if let Some(e) = e {
                let keep = if kind.numbers {
                    4 * out.len() < 3 * data.len()
                } else {
                    2 * out.len() < data.len()
                };
                if keep {
                    return e;
                }
                let delta = std::mem::take(out);
                let p = self.plain(data, kind, out);
                let plain_len = if p == Encoding::Raw {
                    data.len()
                } else {
                    out.len()
                };
                if delta.len() < plain_len - plain_len / 10 {
                    *out = delta;
                    return e;
                }
                return p;
            }
        }
        self.plain(data, kind, out)
    }

    /// `data` stored again as `enc` says, at this encoder's level (a pass
    /// recompressing cold chunks harder than the write path can afford);
    /// None for `Raw` or when `base` cannot be `enc`'s reference.
    pub fn reencode(
        &mut self,
        enc: Encoding,
        data: &[u8],
        base: Option<&'a [u8]>,
        out: &mut Vec<u8>,
    ) -> Option<()> {
        out.clear();
        out.reserve(zstd_safe::compress_bound(data.len()));
        match enc {
            Encoding::Raw | Encoding::Slice | Encoding::Region => return None,
            Encoding::Zstd => {}
            Encoding::Delta => {
                let base = base.filter(|b| can_reference(b))?;
                self.cctx.ref_prefix(base).ok()?;
            }
            Encoding::XorDelta => {
                xor_shuffle(data, Some(base?), &mut self.scratch);
                return self.cctx.compress2(out, &self.scratch).ok().map(|_| ());
            }
            Encoding::Planes => {
                self.planes(data, None, out);
                return Some(());
            }
            Encoding::XorPlanes => {
                self.planes(data, Some(base?), out);
                return Some(());
            }
        }
        self.cctx.compress2(out, data).ok().map(|_| ())
    }

    /// A compression region's stored form (see [`region_members`]): the
    /// member table (fingerprint, length in order), then `content` (the
    /// members end to end; their lengths must sum to it) compressed as one
    /// at this encoder's level.
    pub fn region(&mut self, table: &[(Fp, u32)], content: &[u8], out: &mut Vec<u8>) -> Option<()> {
        let total: u64 = table.iter().map(|m| m.1 as u64).sum();
        if total != content.len() as u64 {
            return None;
        }
        out.clear();
        out.extend_from_slice(&u32::try_from(table.len()).ok()?.to_le_bytes());
        for (fp, len) in table {
            out.extend_from_slice(fp);
            out.extend_from_slice(&len.to_le_bytes());
        }
        let at = out.len();
        out.resize(at + zstd_safe::compress_bound(content.len()), 0);
        let n = self.cctx.compress2(&mut out[at..], content).ok()?;
        out.truncate(at + n);
        Some(())
    }

    fn plain(&mut self, data: &[u8], kind: Kind, out: &mut Vec<u8>) -> Encoding {
        if kind.numbers {
            // Per plane: whatever the whole chunk's entropy says, its
            // exponents may compress.
            self.planes(data, None, out);
            if out.len() < data.len() - data.len() / 32 {
                return Encoding::Planes;
            }
            out.clear();
            return Encoding::Raw;
        }
        if kind.incompressible {
            out.clear();
            return Encoding::Raw;
        }
        self.compress(data, out)
    }

    /// A zstd byte delta against `base`, or the XOR delta when that is
    /// smaller; None if `base` cannot be a reference.
    fn byte_delta(&mut self, data: &[u8], base: &'a [u8], out: &mut Vec<u8>) -> Option<Encoding> {
        if !can_reference(base) {
            return None;
        }
        out.clear();
        out.reserve(zstd_safe::compress_bound(data.len()));
        self.cctx.ref_prefix(base).ok()?;
        self.cctx.compress2(out, data).ok()?;
        if out.len() > data.len() / 8 {
            let mut alt = Vec::new();
            let e = self.xor_delta(data, base, &mut alt);
            if alt.len() < out.len() {
                *out = alt;
                return Some(e);
            }
        }
        Some(Encoding::Delta)
    }

    fn xor_delta(&mut self, data: &[u8], base: &[u8], out: &mut Vec<u8>) -> Encoding {
        self.planes(data, Some(base), out);
        Encoding::XorPlanes
    }

    /// `data` (XOR `base`) as byte planes into `out` ([`planes_layout`]):
    /// a plane that is mostly zero bytes is stored as its non-zero bytes and the gaps between them
    /// ([`SPARSE_PLANE`]), another compressed when the entropy check lets
    /// it be tried; either kept when zstd saves 1/32 of the plane.
    fn planes(&mut self, data: &[u8], base: Option<&[u8]>, out: &mut Vec<u8>) {
        xor_shuffle(data, base, &mut self.scratch);
        let cctx = planes_cctx(&mut self.planes, self.level);
        let words = data.len() / 4;
        let plane = |p: usize| p * words..(p + 1) * words;
        let mut flags = 0u8;
        for (p, z) in self.zplanes.iter_mut().enumerate() {
            let src = &self.scratch[plane(p)];
            if words == 0 {
                continue;
            }
            let n = nonzero(src);
            let sparse = n <= words / SPARSE_PLANE;
            let src = if sparse {
                sparse_plane(src, n, &mut self.sparse);
                &self.sparse[..]
            } else if looks_incompressible(src) {
                continue;
            } else {
                src
            };
            z.clear();
            z.reserve(zstd_safe::compress_bound(src.len()));
            if cctx.compress2(z, src).is_ok_and(|n| n < words - words / 32) {
                flags |= (1 << p) | (u8::from(sparse) << (4 + p));
            }
        }
        // Assembled once: the header, then each plane from where it is.
        let compressed = |p: usize| flags & (1 << p) != 0;
        out.clear();
        out.push(flags);
        for (p, z) in self.zplanes.iter().enumerate() {
            if compressed(p) {
                out.extend_from_slice(&(z.len() as u32).to_le_bytes());
            }
        }
        for (p, z) in self.zplanes.iter().enumerate() {
            out.extend_from_slice(if compressed(p) {
                z
            } else {
                &self.scratch[plane(p)]
            });
        }
        out.extend_from_slice(&self.scratch[4 * words..]);
    }
}

/// A plane is stored sparse when at most 1 in this many of its bytes are
/// not zero: the XOR planes of an updated tensor's high bytes (its sign,
/// exponent and top mantissa bits barely move). zstd's fast levels spend a
/// sequence on each non-zero byte, which is what a read of such a plane
/// decodes; the values and gaps compress better and expand with a store
/// each. On the corpus's checkpoints (3,032 XOR planes under 1/16 non-zero,
/// 1 % on average): zstd alone 0.037 of the plane, decoded in 6.5 µs;
/// values and gaps 0.017, decoded and expanded in 1.8 µs.
const SPARSE_PLANE: usize = 8;

/// `plane`, which has `nonzero` bytes that are not zero, as `value count
/// (u32 LE) | values | gaps` into `out`: the non-zero bytes in order, then
/// for each the zero bytes before it since the last one (a run of 255 or
/// more as 255s that name no value, then the rest). One pass, eight bytes
/// at a time: in a sparse plane most words are zero.
fn sparse_plane(plane: &[u8], nonzero: usize, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&(nonzero as u32).to_le_bytes());
    out.resize(4 + nonzero, 0);
    let (mut v, mut last) = (4, 0);
    let mut one = |at: usize, b: u8, out: &mut Vec<u8>| {
        out[v] = b;
        v += 1;
        let mut g = at - last;
        while g >= 255 {
            out.push(255);
            g -= 255;
        }
        out.push(g as u8);
        last = at + 1;
    };
    let words = plane.chunks_exact(8);
    let rest = words.remainder();
    for (w, x) in words.enumerate() {
        let mut x = u64::from_le_bytes(x.try_into().unwrap());
        while x != 0 {
            let i = x.trailing_zeros() as usize / 8;
            one(8 * w + i, (x >> (8 * i)) as u8, out);
            x &= !(0xFF << (8 * i));
        }
    }
    let base = plane.len() - rest.len();
    for (i, &b) in rest.iter().enumerate().filter(|(_, &b)| b != 0) {
        one(base + i, b, out);
    }
    assert_eq!(v, 4 + nonzero, "the count was of this plane");
}

/// How many bytes of `plane` are not zero (summed in bytes, 255 at most at
/// a time, which vectorises; a `usize` count per byte does not).
fn nonzero(plane: &[u8]) -> usize {
    plane
        .chunks(255)
        .map(|c| c.iter().map(|&b| u8::from(b != 0)).sum::<u8>() as usize)
        .sum()
}

/// The inverse of [`sparse_plane`]: `stream` expanded into the `words`
/// bytes of `out`. Bounded: a gap past the plane, a value too many or too
/// few is an error.
fn expand_sparse(stream: &[u8], words: usize, out: &mut Vec<u8>) -> Result<(), CodecError> {
    let head = stream.get(..4).ok_or(CodecError::Table)?;
    let n = u32::from_le_bytes(head.try_into().unwrap()) as usize;
    let mut values = stream.get(4..4 + n).ok_or(CodecError::Table)?.iter();
    let gaps = &stream[4 + n..];
    out.clear();
    out.resize(words, 0);
    let mut at = 0usize;
    for &g in gaps {
        at += g as usize;
        if g == 255 {
            continue;
        }
        let slot = out.get_mut(at).ok_or(CodecError::Table)?;
        *slot = *values.next().ok_or(CodecError::Table)?;
        at += 1;
    }
    match values.next() {
        Some(_) => Err(CodecError::Table),
        None => Ok(()),
    }
}

/// The most a sparse plane's stream of `words` bytes can hold: the count,
/// then at most one value and one gap a byte plus a 255 for every 255
/// bytes of zeros.
fn sparse_bound(words: usize) -> usize {
    4 + 2 * words + words / 255 + 1
}

/// The compressor of planes: at the write path's level, the fast one
/// ([`PLANES_FAST`]); at a recompression pass's, that level.
fn planes_cctx<'s>(slot: &'s mut Option<CCtx<'static>>, level: i32) -> &'s mut CCtx<'static> {
    slot.get_or_insert_with(|| {
        let mut c = CCtx::create();
        let l = if level <= LEVEL { PLANES_FAST } else { level };
        c.set_parameter(CParameter::CompressionLevel(l))
            .expect("valid zstd level");
        c.set_parameter(CParameter::LiteralCompressionMode(
            zstd_safe::ParamSwitch::Enable,
        ))
        .expect("literal compression is a known parameter");
        if l == PLANES_FAST {
            c.set_parameter(CParameter::MinMatch(PLANES_MIN_MATCH))
                .expect("a valid match length");
        }
        c
    })
}

/// What the chunker and the compressibility check found about a chunk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Kind {
    /// Cut as an array of numbers ([`Numbers`]).
    pub numbers: bool,
    /// [`looks_incompressible`].
    pub incompressible: bool,
}

/// `data XOR base` (base shorter: the rest as is; no base: `data`), then
/// the bytes grouped by their position in a 4-byte word: for floats, the
/// sign/exponent bytes (nearly all zero after the XOR) together, the noisy
/// low mantissa apart. `[plane 0 | plane 1 | plane 2 | plane 3 | tail]`,
/// each plane `len / 4` bytes.
fn xor_shuffle(data: &[u8], base: Option<&[u8]>, out: &mut Vec<u8>) {
    // Every byte is written below: no need to clear what is reused.
    out.resize(data.len(), 0);
    let words = data.len() / 4;
    let base = base.map(|b| at_least(b, data.len()));
    let (lanes, tail) = out.split_at_mut(words * 4);
    let (l0, r) = lanes.split_at_mut(words);
    let (l1, r) = r.split_at_mut(words);
    let (l2, l3) = r.split_at_mut(words);
    // Whole blocks of 16 words by vector shuffles, the rest one by one.
    #[cfg(target_arch = "x86_64")]
    let done = pack_words(
        data,
        base.as_deref(),
        [&mut *l0, &mut *l1, &mut *l2, &mut *l3],
    );
    #[cfg(not(target_arch = "x86_64"))]
    let done = 0;
    let word = |b: &[u8]| u32::from_le_bytes(b.try_into().unwrap());
    let rest = data[4 * done..4 * words].chunks_exact(4);
    let planes = (l0[done..].iter_mut().zip(&mut l1[done..]))
        .zip(l2[done..].iter_mut().zip(&mut l3[done..]));
    match base {
        Some(base) => {
            let pairs = rest.zip(base[4 * done..].chunks_exact(4));
            for (((x0, x1), (x2, x3)), (d, b)) in planes.zip(pairs) {
                [*x0, *x1, *x2, *x3] = (word(d) ^ word(b)).to_le_bytes();
            }
            for (i, t) in tail.iter_mut().enumerate() {
                *t = data[words * 4 + i] ^ base[words * 4 + i];
            }
        }
        None => {
            for (((x0, x1), (x2, x3)), d) in planes.zip(rest) {
                [*x0, *x1, *x2, *x3] = [d[0], d[1], d[2], d[3]];
            }
            tail.copy_from_slice(&data[words * 4..]);
        }
    }
}

/// Splits `data`'s first whole blocks of 16 words (XOR `base`) into the
/// four planes with SSSE3 where the CPU has it; returns the words done. A
/// byte shuffle groups each 4 words' bytes by plane, then a 4×4 transpose
/// of 32-bit lanes gathers each plane's 16 bytes: 12 shuffles per 64
/// bytes. The scalar loop, a byte at a time into four places, ran ~3 GB/s
/// and was a tenth of a checkpoint's ingest.
#[cfg(target_arch = "x86_64")]
fn pack_words(data: &[u8], base: Option<&[u8]>, planes: [&mut [u8]; 4]) -> usize {
    if !is_x86_feature_detected!("ssse3") {
        return 0;
    }
    assert!(planes.iter().all(|p| p.len() >= data.len() / 4));
    assert!(base.is_none_or(|b| b.len() >= data.len()));
    // SAFETY: the CPU has SSSE3; the lengths are asserted.
    unsafe { pack_words_ssse3(data, base, planes) }
}

/// # Safety
/// The CPU must have SSSE3; each plane must hold `data.len() / 4` bytes
/// and `base`, if any, `data.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "ssse3")]
unsafe fn pack_words_ssse3(data: &[u8], base: Option<&[u8]>, planes: [&mut [u8]; 4]) -> usize {
    use std::arch::x86_64::*;
    let blocks = data.len() / 64;
    let by_plane = _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    let [l0, l1, l2, l3] = planes;
    for k in 0..blocks {
        let (w, o) = (16 * k, 64 * k);
        // SAFETY: `data` and `base` hold o + 64 bytes, each plane w + 16;
        // unaligned loads and stores.
        let mut v: [__m128i; 4] =
            std::array::from_fn(|j| _mm_loadu_si128(data.as_ptr().add(o + 16 * j).cast()));
        if let Some(base) = base {
            for (j, x) in v.iter_mut().enumerate() {
                let b = _mm_loadu_si128(base.as_ptr().add(o + 16 * j).cast());
                *x = _mm_xor_si128(*x, b);
            }
        }
        // v[j] = planes 0..3 of words 4j..4j+4, four bytes each.
        let v = v.map(|x| _mm_shuffle_epi8(x, by_plane));
        let (t0, t1) = (
            _mm_unpacklo_epi32(v[0], v[1]),
            _mm_unpackhi_epi32(v[0], v[1]),
        );
        let (t2, t3) = (
            _mm_unpacklo_epi32(v[2], v[3]),
            _mm_unpackhi_epi32(v[2], v[3]),
        );
        let st = |p: &mut [u8], x: __m128i| _mm_storeu_si128(p.as_mut_ptr().add(w).cast(), x);
        st(l0, _mm_unpacklo_epi64(t0, t2));
        st(l1, _mm_unpackhi_epi64(t0, t2));
        st(l2, _mm_unpacklo_epi64(t1, t3));
        st(l3, _mm_unpackhi_epi64(t1, t3));
    }
    16 * blocks
}

/// The inverse of [`xor_shuffle`], from the four planes and the tail.
fn xor_unshuffle(planes: [&[u8]; 4], tail: &[u8], base: Option<&[u8]>, out: &mut [u8]) {
    let words = out.len() / 4;
    assert!(planes.iter().all(|p| p.len() >= words) && tail.len() == out.len() - 4 * words);
    let base = base.map(|b| at_least(b, out.len()));
    // Whole blocks of 16 words by vector unpacks (the read path's copy).
    #[cfg(target_arch = "x86_64")]
    let done = unpack_words(planes, base.as_deref(), out);
    #[cfg(not(target_arch = "x86_64"))]
    let done = 0;
    let [l0, l1, l2, l3] = planes.map(|p| &p[done..words]);
    let out_words = &mut out[4 * done..];
    let lanes = l0.iter().zip(l1).zip(l2.iter().zip(l3));
    match base {
        Some(base) => {
            let quads = out_words
                .chunks_exact_mut(4)
                .zip(base[4 * done..].chunks_exact(4));
            for (((&x0, &x1), (&x2, &x3)), (o, b)) in lanes.zip(quads) {
                let x = u32::from_le_bytes([x0, x1, x2, x3])
                    ^ u32::from_le_bytes(b.try_into().unwrap());
                o.copy_from_slice(&x.to_le_bytes());
            }
            for (i, t) in tail.iter().enumerate() {
                out[words * 4 + i] = t ^ base[words * 4 + i];
            }
        }
        None => {
            for (((&x0, &x1), (&x2, &x3)), o) in lanes.zip(out_words.chunks_exact_mut(4)) {
                o.copy_from_slice(&[x0, x1, x2, x3]);
            }
            out[words * 4..].copy_from_slice(tail);
        }
    }
}

/// Interleaves the planes' first whole blocks of 16 words into `out` (XOR
/// `base`) with SSE2, which every x86-64 has; returns the words done.
#[cfg(target_arch = "x86_64")]
fn unpack_words(planes: [&[u8]; 4], base: Option<&[u8]>, out: &mut [u8]) -> usize {
    use std::arch::x86_64::*;
    let blocks = out.len() / 64;
    let [l0, l1, l2, l3] = planes;
    for k in 0..blocks {
        let (w, o) = (16 * k, 64 * k);
        // SAFETY: each plane holds out.len() / 4 >= w + 16 bytes, `out`
        // and `base` (as long as `out`) hold o + 64; unaligned loads and
        // stores; SSE2 is part of x86-64.
        unsafe {
            let ld = |p: &[u8]| _mm_loadu_si128(p.as_ptr().add(w).cast());
            let (a, b, c, d) = (ld(l0), ld(l1), ld(l2), ld(l3));
            let (ab_lo, ab_hi) = (_mm_unpacklo_epi8(a, b), _mm_unpackhi_epi8(a, b));
            let (cd_lo, cd_hi) = (_mm_unpacklo_epi8(c, d), _mm_unpackhi_epi8(c, d));
            let mut v = [
                _mm_unpacklo_epi16(ab_lo, cd_lo),
                _mm_unpackhi_epi16(ab_lo, cd_lo),
                _mm_unpacklo_epi16(ab_hi, cd_hi),
                _mm_unpackhi_epi16(ab_hi, cd_hi),
            ];
            if let Some(base) = base {
                for (j, x) in v.iter_mut().enumerate() {
                    let b = _mm_loadu_si128(base.as_ptr().add(o + 16 * j).cast());
                    *x = _mm_xor_si128(*x, b);
                }
            }
            for (j, x) in v.iter().enumerate() {
                _mm_storeu_si128(out.as_mut_ptr().add(o + 16 * j).cast(), *x);
            }
        }
    }
    16 * blocks
}

/// How one plane of [`planes_layout`] is stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Plane {
    /// As is: its len / 4 bytes.
    #[default]
    Copied,
    /// A zstd frame of the plane.
    Zstd,
    /// A zstd frame of its non-zero bytes and the gaps between them
    /// ([`SPARSE_PLANE`]).
    Sparse,
}

/// The stored form of [`Encoding::Planes`] and [`Encoding::XorPlanes`]:
/// `flags u8 | compressed length u32 per compressed plane | planes in order
/// (a compressed one as a zstd frame, another as its len / 4 bytes) | tail
/// (len % 4 bytes) as is`; bit p of *flags* is set when plane p is
/// compressed, bit 4 + p too when that frame holds the plane's non-zero
/// bytes and the gaps between them rather than the plane. Where each plane's bytes are, and how
/// stored; bounded: a sparse bit without its plane's compressed bit, or
/// lengths that do not add up to the stored bytes, are an error.
pub fn planes_layout(
    stored: &[u8],
    len: usize,
) -> Result<[(std::ops::Range<usize>, Plane); 5], CodecError> {
    let words = len / 4;
    let flags = *stored.first().ok_or(CodecError::Table)?;
    let (compressed, sparse) = (flags & 0xF, flags >> 4);
    if sparse & !compressed != 0 {
        return Err(CodecError::Table);
    }
    let mut at = 1 + 4 * compressed.count_ones() as usize;
    let mut lens = stored.get(1..at).ok_or(CodecError::Table)?.chunks_exact(4);
    let mut out: [(std::ops::Range<usize>, Plane); 5] = Default::default();
    for (p, slot) in out.iter_mut().enumerate() {
        let (n, z) = match p {
            4 => (len % 4, Plane::Copied),
            _ if compressed & (1 << p) != 0 => {
                let n = lens.next().expect("one length per flag");
                let n = u32::from_le_bytes(n.try_into().unwrap()) as usize;
                match sparse & (1 << p) {
                    0 => (n, Plane::Zstd),
                    _ => (n, Plane::Sparse),
                }
            }
            _ => (words, Plane::Copied),
        };
        let end = at
            .checked_add(n)
            .filter(|&e| e <= stored.len())
            .ok_or(CodecError::Table)?;
        *slot = (at..end, z);
        at = end;
    }
    if at != stored.len() {
        return Err(CodecError::Table);
    }
    Ok(out)
}

/// The reference as long as the chunk at least: a shorter one zero-extended
/// (rare: the XOR delta's references are usually the same tensor's
/// previous chunk).
fn at_least(base: &[u8], len: usize) -> std::borrow::Cow<'_, [u8]> {
    if base.len() >= len {
        return std::borrow::Cow::Borrowed(base);
    }
    let mut v = base.to_vec();
    v.resize(len, 0);
    std::borrow::Cow::Owned(v)
}

/// The first bytes of a zstd dictionary. zstd's decoder takes a dictionary
/// that starts with them for a trained one and parses tables out of it, so
/// a chunk starting with them (a dictionary file, say) could not be the
/// reference of a byte delta: the delta would not decode.
const DICT_MAGIC: [u8; 4] = 0xEC30_A437u32.to_le_bytes();

/// Whether `base` can be the reference of a byte delta.
pub fn can_reference(base: &[u8]) -> bool {
    !base.starts_with(&DICT_MAGIC)
}

/// Bytes per member in a region's table: fingerprint and length.
const REGION_MEMBER: usize = 36;

/// The member table at the start of a region's stored bytes — `count u32 |
/// count × (fingerprint [32], length u32) | zstd of the members' content
/// end to end` — and the offset of the zstd frame. Bounded: a table that
/// does not fit the stored bytes is an error. (The table lets a pass find a
/// partly dead region's live members without the index.)
pub fn region_members(stored: &[u8]) -> Result<(Vec<(Fp, u32)>, usize), CodecError> {
    let head = stored.get(..4).ok_or(CodecError::Table)?;
    let n = u32::from_le_bytes(head.try_into().unwrap()) as usize;
    let end = n
        .checked_mul(REGION_MEMBER)
        .and_then(|t| t.checked_add(4))
        .filter(|&e| e <= stored.len())
        .ok_or(CodecError::Table)?;
    let members = stored[4..end]
        .chunks_exact(REGION_MEMBER)
        .map(|m| {
            let fp: Fp = m[..32].try_into().unwrap();
            (fp, u32::from_le_bytes(m[32..].try_into().unwrap()))
        })
        .collect();
    Ok((members, end))
}

fn expect_len(got: usize, want: usize) -> Result<(), CodecError> {
    if got == want {
        Ok(())
    } else {
        Err(CodecError::Length { got, want })
    }
}

/// Decodes stored chunks. Keep one per thread ([`decode`]): creating a
/// zstd context costs more than decoding a small chunk.
pub struct Decoder {
    dctx: DCtx<'static>,
    scratch: Vec<u8>,
    /// The compressed planes of a chunk, decompressed.
    planes: [Vec<u8>; 4],
}

thread_local! {
    static DECODER: std::cell::RefCell<Decoder> = std::cell::RefCell::new(Decoder::default());
}

/// [`Decoder::decode`] with this thread's decoder.
pub fn decode(
    enc: Encoding,
    stored: &[u8],
    base: Option<&[u8]>,
    len: usize,
    out: &mut Vec<u8>,
) -> Result<(), CodecError> {
    DECODER.with(|d| d.borrow_mut().decode(enc, stored, base, len, out))
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder {
            dctx: DCtx::create(),
            scratch: Vec::new(),
            planes: Default::default(),
        }
    }
}

impl Decoder {
    /// Decodes a stored chunk of `len` bytes into `out` (cleared first).
    /// Bounded: a stored chunk that claims more than `len` is an error.
    pub fn decode(
        &mut self,
        enc: Encoding,
        stored: &[u8],
        base: Option<&[u8]>,
        len: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), CodecError> {
        out.clear();
        match enc {
            Encoding::Raw => out.extend_from_slice(stored),
            Encoding::Slice => return Err(CodecError::NoFrame),
            Encoding::Region => {
                let (members, at) = region_members(stored)?;
                let total: u64 = members.iter().map(|m| m.1 as u64).sum();
                if total != len as u64 {
                    return Err(CodecError::Table);
                }
                out.reserve(len);
                self.dctx.decompress(out, &stored[at..]).map_err(zerr)?;
            }
            Encoding::Zstd => {
                out.reserve(len);
                self.dctx.decompress(out, stored).map_err(zerr)?;
            }
            Encoding::Delta => {
                let base = base.ok_or(CodecError::NoBase)?;
                if !can_reference(base) {
                    return Err(CodecError::DictBase);
                }
                out.reserve(len);
                // A content-only dictionary is what a prefix is to the
                // decoder, and it is referenced, not copied.
                self.dctx
                    .decompress_using_dict(out, stored, base)
                    .map_err(zerr)?;
            }
            Encoding::XorDelta => {
                let base = base.ok_or(CodecError::NoBase)?;
                self.scratch.clear();
                self.scratch.reserve(len);
                self.dctx
                    .decompress(&mut self.scratch, stored)
                    .map_err(zerr)?;
                expect_len(self.scratch.len(), len)?;
                out.resize(len, 0);
                let words = len / 4;
                let s = &self.scratch;
                let planes = [0, 1, 2, 3].map(|p| &s[p * words..(p + 1) * words]);
                xor_unshuffle(planes, &s[4 * words..], Some(base), out);
            }
            Encoding::Planes | Encoding::XorPlanes => {
                let base = match enc {
                    Encoding::XorPlanes => Some(base.ok_or(CodecError::NoBase)?),
                    _ => None,
                };
                let layout = planes_layout(stored, len)?;
                let words = len / 4;
                for (p, (at, form)) in layout[..4].iter().enumerate() {
                    let buf = &mut self.planes[p];
                    match form {
                        Plane::Copied => {}
                        Plane::Zstd => {
                            buf.clear();
                            buf.reserve(words);
                            self.dctx
                                .decompress(buf, &stored[at.clone()])
                                .map_err(zerr)?;
                            expect_len(buf.len(), words)?;
                        }
                        Plane::Sparse => {
                            let s = &mut self.scratch;
                            s.clear();
                            s.reserve(sparse_bound(words));
                            self.dctx.decompress(s, &stored[at.clone()]).map_err(zerr)?;
                            expand_sparse(s, words, buf)?;
                        }
                    }
                }
                let planes = [0, 1, 2, 3].map(|p| match &layout[p] {
                    (at, Plane::Copied) => &stored[at.clone()],
                    _ => &self.planes[p][..],
                });
                out.resize(len, 0);
                xor_unshuffle(planes, &stored[layout[4].0.clone()], base, out);
            }
        }
        expect_len(out.len(), len)
    }
}

/// Decoded reference chunks, the most recently used kept within a byte
/// budget. A delta costs its reference's fetch and decode on top of its
/// own, and on versioned data most of them name the same few references:
/// a reference is never itself a delta, so every later version of a chunk
/// deltas against its first stored version, and reading (or writing) each
/// version again fetched and decoded those. Named by the content's
/// fingerprint, an entry never goes stale, whatever moves or frees the
/// chunk it came from. Entries are memory held for long, so they are not
/// trusted: a read's delta check vouches for the entry it used, and a write
/// hashes an entry before building deltas on it (a bad one would spoil
/// every delta built on it, found only when those are read).
pub struct ReferenceCache {
    lru: lru::LruCache<Fp, std::sync::Arc<Vec<u8>>>,
    bytes: usize,
    budget: usize,
}

impl ReferenceCache {
    /// A cache holding up to `budget` bytes of content (0: none).
    pub fn new(budget: usize) -> Self {
        ReferenceCache {
            lru: lru::LruCache::unbounded(),
            bytes: 0,
            budget,
        }
    }

    pub fn get(&mut self, fp: &Fp) -> Option<std::sync::Arc<Vec<u8>>> {
        self.lru.get(fp).cloned()
    }

    /// Keeps `content` as `fp`'s, dropping the least recently used beyond
    /// the budget. Content larger than the whole budget is not kept.
    pub fn insert(&mut self, fp: Fp, content: std::sync::Arc<Vec<u8>>) {
        if content.len() > self.budget {
            return;
        }
        self.bytes += content.len();
        if let Some(old) = self.lru.put(fp, content) {
            self.bytes -= old.len();
        }
        while self.bytes > self.budget {
            let Some((_, old)) = self.lru.pop_lru() else {
                break;
            };
            self.bytes -= old.len();
        }
    }

    pub fn remove(&mut self, fp: &Fp) {
        if let Some(old) = self.lru.pop(fp) {
            self.bytes -= old.len();
        }
    }

    /// Bytes of content held.
    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.bytes
    }

    /// Fault injection for tests: flips a byte in every entry, as memory
    /// gone bad would. Returns the entries damaged.
    #[doc(hidden)]
    pub fn damage(&mut self) -> usize {
        let mut n = 0;
        for (_, c) in self.lru.iter_mut() {
            if !c.is_empty() {
                let mut v = c.as_ref().clone();
                let at = v.len() / 2;
                v[at] ^= 0x5A;
                *c = std::sync::Arc::new(v);
                n += 1;
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn noise(seed: u64, n: usize) -> Vec<u8> {
        (0..n as u64)
            .map(|i| splitmix(seed.wrapping_mul(0x1_0000_0001) ^ i) as u8)
            .collect()
    }

    fn text(n: usize) -> Vec<u8> {
        let words = [
            "storage ", "stripe ", "chunk ", "delta ", "parity ", "node\n",
        ];
        (0..)
            .map(|i: usize| words[(i * 7 + i / 3) % 6])
            .flat_map(|w| w.bytes())
            .take(n)
            .collect()
    }

    /// The chunker written the plain way: one hash rolled over every byte,
    /// cut and sample conditions tested as it goes.
    fn chunks_one_lane(data: &[u8], avg: usize) -> Vec<Chunk> {
        let bits = avg.ilog2();
        let top = |n: u32| !(u64::MAX >> (n - SAMPLE_BITS));
        let (hard, easy) = (top(bits + 1), top(bits - 1));
        let (mut out, mut start, mut h) = (Vec::new(), 0, 0u64);
        let mut f = Features::default();
        for (i, &b) in data.iter().enumerate() {
            h = (h << 1).wrapping_add(GEAR[b as usize]);
            let len = i + 1 - start;
            let mut cut = len == avg * 4 || i + 1 == data.len();
            if h & SAMPLE_MASK == 0 {
                let w = window_hash(data, i);
                f.sample(w);
                let mask = if len <= avg { hard } else { easy };
                cut |= len > avg / 4 && w & mask == 0;
            }
            if cut {
                out.push(Chunk {
                    offset: start,
                    len,
                    sketch: f.finish(len),
                    numbers: false,
                });
                f = Features::default();
                start = i + 1;
            }
        }
        out
    }

    #[test]
    fn two_lanes_cut_and_sketch_as_one_lane_does() {
        for (seed, n) in [
            (5, 0),
            (6, 1),
            (7, 127),
            (8, 129),
            (9, 5000),
            (10, 1 << 20),
            (11, (1 << 20) + 1),
        ] {
            let d = noise(seed, n);
            for avg in [4096, AVG_CHUNK as usize] {
                assert_eq!(
                    chunks_of_size(&d, avg as u32),
                    chunks_one_lane(&d, avg),
                    "{n} {avg}"
                );
            }
        }
        // Long runs of one byte: no samples, cuts forced at the maximum.
        let z = vec![0u8; 300_000];
        let c = chunks(&z);
        assert!(c[..c.len() - 1].iter().all(|c| c.len == MAX_CHUNK as usize));
        assert_eq!(c, chunks_one_lane(&z, AVG_CHUNK as usize));
    }

    #[test]
    fn chunks_cover_the_data_and_resync_after_an_insertion() {
        let a = noise(1, 1 << 20);
        let cuts = chunks(&a);
        assert_eq!(cuts.iter().map(|c| c.len).sum::<usize>(), a.len());
        assert!(cuts.iter().all(|c| c.len <= MAX_CHUNK as usize));
        assert!(cuts[..cuts.len() - 1]
            .iter()
            .all(|c| c.len > MIN_CHUNK as usize));
        assert_eq!(cuts[0].sketch, sketch(&a[..cuts[0].len]));
        let mut b = a.clone();
        b.splice(1000..1000, *b"inserted");
        let piece = |d: &[u8], c: &Chunk| fingerprint(&d[c.offset..c.offset + c.len]);
        let fa: std::collections::HashSet<Fp> = cuts.iter().map(|c| piece(&a, c)).collect();
        let cb = chunks(&b);
        let shared = cb.iter().filter(|c| fa.contains(&piece(&b, c))).count();
        assert!(shared + 2 >= cuts.len(), "{shared} of {}", cuts.len());
        // And the chunks after the edit keep their sketches.
        let sa: std::collections::HashSet<_> = cuts.iter().map(|c| c.sketch).collect();
        let same = cb.iter().filter(|c| sa.contains(&c.sketch)).count();
        assert!(same + 2 >= cuts.len(), "{same} of {}", cuts.len());
    }

    #[test]
    fn similar_chunks_share_a_super_feature_and_different_ones_do_not() {
        let a = noise(2, 16 << 10);
        let mut b = a.clone();
        for i in (0..b.len()).step_by(4096) {
            b[i] ^= 0xff;
        }
        let (sa, sb) = (sketch(&a).unwrap(), sketch(&b).unwrap());
        assert!(sa.iter().any(|x| sb.contains(x)), "{sa:?} {sb:?}");
        let c = noise(3, 16 << 10);
        let sc = sketch(&c).unwrap();
        assert!(!sa.iter().any(|x| sc.contains(x)));
        assert!(sketch(&a[..100]).is_none());
    }

    /// `n` weight-like floats (about normal, σ ≈ 0.05).
    fn weights(seed: u64, n: usize) -> Vec<f32> {
        let u = |i: u64| (splitmix(seed ^ i) >> 11) as f32 / (1u64 << 53) as f32;
        (0..n as u64)
            .map(|i| (u(4 * i) + u(4 * i + 1) + u(4 * i + 2) + u(4 * i + 3) - 2.0) * 0.09)
            .collect()
    }

    fn le32(w: &[f32]) -> Vec<u8> {
        w.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn bf16(w: &[f32]) -> Vec<u8> {
        w.iter()
            .flat_map(|x| ((x.to_bits() >> 16) as u16).to_le_bytes())
            .collect()
    }

    #[test]
    fn arrays_of_numbers_are_recognised() {
        let w = weights(1, 100_000);
        let mut f = le32(&w);
        assert_eq!(Numbers::detect(&f), Some(Numbers { width: 4, top: 3 }));
        f.insert(0, b'{');
        assert_eq!(Numbers::detect(&f), Some(Numbers { width: 4, top: 0 }));
        assert_eq!(
            Numbers::detect(&bf16(&w)),
            Some(Numbers { width: 2, top: 1 })
        );
        assert_eq!(Numbers::detect(&noise(1, 400_000)), None);
        assert_eq!(Numbers::detect(&text(400_000)), None);
        assert_eq!(
            Numbers::detect(&le32(&w[..1000])),
            None,
            "too short to tell"
        );
    }

    #[test]
    fn nudged_numbers_keep_their_cuts_and_sketches_and_pair_as_xor_deltas() {
        let w1 = weights(2, 1 << 19);
        // A training step: every weight moves by about 1e-4 of itself.
        let w2: Vec<f32> = w1
            .iter()
            .enumerate()
            .map(|(i, x)| x * (1.0 + ((splitmix(i as u64) % 2001) as f32 - 1000.0) * 1e-7))
            .collect();
        let header = b"{\"weights\":{\"dtype\":\"F32\"}}  ".to_vec();
        let at = header.len();
        let (mut a, mut b) = (header.clone(), header);
        a.extend(le32(&w1));
        b.extend(le32(&w2));
        assert!(a.iter().zip(&b).filter(|(x, y)| x != y).count() > a.len() / 3);
        let (ca, cb) = (chunks(&a), chunks(&b));
        assert!(ca.iter().all(|c| c.numbers) && ca.len() > 25);
        // Cut coarser than bytes, within the same bounds.
        assert!(ca[..ca.len() - 1]
            .iter()
            .all(|c| (AVG_CHUNK..=MAX_CHUNK).contains(&(c.len as u32))));
        let same = |f: &dyn Fn(&Chunk) -> Option<[u64; SUPER_FEATURES]>| {
            let sa: std::collections::HashSet<_> = ca.iter().map(|c| (c.offset, f(c))).collect();
            cb.iter().filter(|c| sa.contains(&(c.offset, f(c)))).count()
        };
        assert!(same(&|_| None) * 10 >= ca.len() * 9, "cuts moved");
        assert!(same(&|c| c.sketch) * 10 >= ca.len() * 9, "sketches moved");
        // Cuts fall between numbers.
        assert!(ca[1..].iter().all(|c| (c.offset - at).is_multiple_of(4)));
        let mut enc = Encoder::new(LEVEL);
        let (mut xor, mut bytes, mut plain, mut out) = (0, 0, 0, Vec::new());
        for c in &cb[1..] {
            let (d, base) = (
                &b[c.offset..c.offset + c.len],
                &a[c.offset..c.offset + c.len],
            );
            let kind = Kind {
                numbers: true,
                incompressible: false,
            };
            let e = enc.encode(d, Some(base), kind, &mut out);
            assert_eq!(e, Encoding::XorPlanes);
            xor += out.len();
            decode(e, &out, Some(base), d.len(), &mut Vec::new()).unwrap();
            let e = enc.encode(d, Some(base), Kind::default(), &mut Vec::new());
            assert!(e.is_delta());
            // The plain zstd byte delta, for comparison.
            let mut cctx = CCtx::create();
            let mut bd = Vec::with_capacity(zstd_safe::compress_bound(d.len()));
            cctx.ref_prefix(base).unwrap();
            cctx.compress2(&mut bd, d).unwrap();
            bytes += bd.len();
            enc.compress(d, &mut out);
            plain += out.len().max(1);
        }
        // The XOR delta keeps well under three quarters, beats plain
        // compression and the byte delta.
        let n: usize = cb[1..].iter().map(|c| c.len).sum();
        assert!(
            4 * xor < 3 * n && xor < plain && xor < bytes,
            "{xor} {bytes} {plain} of {n}"
        );
    }

    /// The vector samplers find exactly the scalar samplers' samples, of
    /// bytes and of numbers' top bytes, at every length around their
    /// block and vector sizes, on random bytes, text, weights and runs of
    /// one byte (of byte 76 every position passes the low-bit test).
    #[test]
    fn vector_and_scalar_samplers_agree() {
        #[cfg(target_arch = "x86_64")]
        if simd::available() {
            let key = |v: Vec<Sample>| v.into_iter().map(|s| (s.pos, s.hash)).collect::<Vec<_>>();
            let mut inputs = vec![noise(9, 300_000), text(300_000), vec![0u8; 20_000]];
            inputs.push(vec![0x5a; 9000]);
            inputs.push(le32(&weights(3, 80_000)));
            // The one byte whose gear has its low 7 bits clear: a run of it
            // is a sample at every position, and blocks of numbers dense
            // with hits take the rolling path, here beside sparse ones.
            assert_eq!(GEAR[76] & SAMPLE_MASK, 0);
            inputs.push(vec![76; 40_000]);
            let mut mixed = noise(10, 120_000);
            mixed[30_000..70_000].fill(76);
            inputs.push(mixed);
            for data in &inputs {
                for len in [
                    0,
                    1,
                    7,
                    8,
                    63,
                    64,
                    65,
                    127,
                    4095,
                    4096,
                    4097,
                    8191,
                    8192,
                    8193,
                    8200,
                    16_383,
                    16_384,
                    16_385,
                    16_386,
                    16_387,
                    20_000,
                    data.len(),
                ] {
                    let d = &data[..len.min(data.len())];
                    // SAFETY: the features are there (checked above).
                    let v = unsafe { simd::samples(d) };
                    assert_eq!(key(v), key(samples_scalar(d)), "length {}", d.len());
                    for (width, top) in [(2, 0), (2, 1), (4, 0), (4, 3)] {
                        let n = Numbers { width, top };
                        // SAFETY: as above.
                        let v = unsafe { simd::number_samples(d, n) };
                        let what = format!("length {} numbers {n:?}", d.len());
                        assert_eq!(key(v), key(n.samples_scalar(d)), "{what}");
                    }
                }
            }
        } else {
            eprintln!("no AVX-512 VBMI here: only the scalar sampler runs");
        }
    }

    /// The vector feature pass takes the same maxima as the scalar one, for
    /// every count of samples around its eight lanes.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_features_are_the_scalar_ones() {
        if !simd::features_available() {
            eprintln!("no AVX-512 DQ here: only the scalar feature pass runs");
            return;
        }
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let all: Vec<Sample> = (0..310)
            .map(|i| {
                x = splitmix(x);
                // Extremes too: the maxima are unsigned.
                let hash = match i % 50 {
                    0 => 0,
                    1 => u64::MAX,
                    _ => x,
                };
                Sample { hash, pos: i }
            })
            .collect();
        for n in (8..=40).chain([63, 64, 65, 299, 300]) {
            for from in [0, 1, 7] {
                let s = &all[from..from + n];
                // SAFETY: the features are there (checked above).
                let v = unsafe { simd::features(s) };
                let f = Features::of_scalar(s);
                assert_eq!((v.max, v.sampled), (f.max, f.sampled), "{n} samples");
                assert_eq!(v.finish(4096), f.finish(4096));
            }
        }
    }

    /// A region is its members' content end to end in one zstd frame,
    /// named by a fingerprint no chunk can have; a slice has no frame.
    #[test]
    fn regions_round_trip_and_are_named_apart_from_chunks() {
        let members: Vec<Vec<u8>> = (0..8).map(|i| text(20000 + i * 100)).collect();
        let content: Vec<u8> = members.concat();
        let mut enc = Encoder::new(19);
        let mut dec = Decoder::default();
        let (mut s, mut out) = (Vec::new(), Vec::new());
        let named: Vec<(Fp, u32)> = members
            .iter()
            .map(|m| (fingerprint(m), m.len() as u32))
            .collect();
        enc.region(&named, &content, &mut s).unwrap();
        dec.decode(Encoding::Region, &s, None, content.len(), &mut out)
            .unwrap();
        assert_eq!(out, content);
        let (table, _) = region_members(&s).unwrap();
        assert_eq!(table, named);
        // A table claiming more members than the bytes hold is an error.
        let mut t = s.clone();
        t[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(region_members(&t), Err(CodecError::Table)));
        assert!(dec
            .decode(Encoding::Region, &t, None, content.len(), &mut out)
            .is_err());
        assert_ne!(region_fingerprint(&content), fingerprint(&content));
        assert_eq!(
            region_fingerprint(&content),
            region_fingerprint(&members.concat())
        );
        // Bounded like a chunk: a region claiming less than it holds fails.
        assert!(dec
            .decode(Encoding::Region, &s, None, content.len() - 1, &mut out)
            .is_err());
        assert!(matches!(
            dec.decode(Encoding::Slice, &s, None, 10, &mut out),
            Err(CodecError::NoFrame)
        ));
        assert!(enc
            .reencode(Encoding::Slice, &content, None, &mut s)
            .is_none());
        assert!(enc
            .reencode(Encoding::Region, &content, None, &mut s)
            .is_none());
        assert!(Encoding::Slice.can_be_reference() && !Encoding::Region.can_be_reference());
    }

    #[test]
    fn numbers_are_stored_as_byte_planes_and_older_xor_deltas_still_read() {
        let w = weights(3, 4099);
        let mut a = le32(&w);
        a.extend_from_slice(&[1, 2, 3]); // a tail that is no whole word
        let b: Vec<u8> = a
            .chunks(4)
            .enumerate()
            .flat_map(|(i, c)| match <[u8; 4]>::try_from(c) {
                Ok(c) => {
                    let v = f32::from_le_bytes(c) * (1.0 + (i % 7) as f32 * 1e-6);
                    v.to_le_bytes().to_vec()
                }
                Err(_) => c.to_vec(),
            })
            .collect();
        let kind = Kind {
            numbers: true,
            incompressible: true,
        };
        let (mut enc, mut dec) = (Encoder::new(LEVEL), Decoder::default());
        let (mut s, mut out) = (Vec::new(), Vec::new());
        // Plain: the exponent plane compresses though the chunk looks
        // incompressible as a whole; the low mantissa is stored as is.
        assert_eq!(enc.encode(&a, None, kind, &mut s), Encoding::Planes);
        let layout = planes_layout(&s, a.len()).unwrap();
        assert!(
            layout[3].1 == Plane::Zstd && layout[0].1 == Plane::Copied,
            "{layout:?}"
        );
        assert!(s.len() < a.len() * 9 / 10);
        dec.decode(Encoding::Planes, &s, None, a.len(), &mut out)
            .unwrap();
        assert_eq!(out, a);
        // The delta: XOR planes, smaller still.
        let plain = s.len();
        assert_eq!(enc.encode(&b, Some(&a), kind, &mut s), Encoding::XorPlanes);
        assert!(s.len() < plain);
        dec.decode(Encoding::XorPlanes, &s, Some(&a), b.len(), &mut out)
            .unwrap();
        assert_eq!(out, b);
        // Every damage or lie is an error: a plane marked sparse but not
        // compressed, a plane length past the end, a byte more or less, no
        // reference.
        let mut bad = s.clone();
        bad[0] = (bad[0] & 0xE) | 0x10;
        assert!(dec
            .decode(Encoding::XorPlanes, &bad, Some(&a), b.len(), &mut out)
            .is_err());
        for cut in [0, 1, 3, s.len() - 1] {
            let r = dec.decode(Encoding::XorPlanes, &s[..cut], Some(&a), b.len(), &mut out);
            assert!(r.is_err(), "cut at {cut}");
        }
        let mut long = s.clone();
        long.push(0);
        assert!(dec
            .decode(Encoding::XorPlanes, &long, Some(&a), b.len(), &mut out)
            .is_err());
        assert!(dec
            .decode(Encoding::XorPlanes, &s, None, b.len(), &mut out)
            .is_err());
        assert!(dec
            .decode(Encoding::XorPlanes, &s, Some(&a), b.len() + 4, &mut out)
            .is_err());
        // The earlier XOR delta (one zstd frame of the shuffled XOR), as
        // file systems before version 6 hold it, reads as it did.
        enc.reencode(Encoding::XorDelta, &b, Some(&a), &mut s)
            .unwrap();
        dec.decode(Encoding::XorDelta, &s, Some(&a), b.len(), &mut out)
            .unwrap();
        assert_eq!(out, b);
        // Planes and XOR planes re-encode (the recompression pass).
        enc.reencode(Encoding::Planes, &a, None, &mut s).unwrap();
        dec.decode(Encoding::Planes, &s, None, a.len(), &mut out)
            .unwrap();
        assert_eq!(out, a);
        assert!(Encoding::Planes.can_be_reference() && !Encoding::XorPlanes.can_be_reference());
        assert!(Encoding::XorPlanes.is_delta() && !Encoding::Planes.is_delta());
    }

    /// The vector split into planes is the plain definition — byte `j` of
    /// word `w` (XOR the reference's, which counts as zeros where it is
    /// short) to plane `j` at `w`, the tail as is — at every length
    /// around its 64-byte blocks, and `xor_unshuffle` undoes it.
    #[test]
    fn byte_planes_are_the_bytes_of_each_word_by_place() {
        let data = noise(21, 700);
        let reference = noise(22, 700);
        let mut out = vec![7u8; 3];
        for len in (0..=200).chain([639, 640, 641, 700]) {
            let d = &data[..len];
            for base in [None, Some(&reference[..len]), Some(&reference[..len / 2])] {
                xor_shuffle(d, base, &mut out);
                let b = |i: usize| base.and_then(|r| r.get(i)).copied().unwrap_or(0);
                let words = len / 4;
                let mut want = vec![0u8; len];
                for i in 0..4 * words {
                    want[(i % 4) * words + i / 4] = d[i] ^ b(i);
                }
                for i in 4 * words..len {
                    want[i] = d[i] ^ b(i);
                }
                assert_eq!(
                    out,
                    want,
                    "length {len}, reference {:?}",
                    base.map(|r| r.len())
                );
                let planes: [&[u8]; 4] = std::array::from_fn(|p| &out[p * words..(p + 1) * words]);
                let mut back = vec![0u8; len];
                xor_unshuffle(planes, &out[4 * words..], base, &mut back);
                assert_eq!(back, d);
            }
        }
    }

    #[test]
    fn sparse_planes_round_trip_and_every_lie_in_them_is_an_error() {
        // Gaps of every kind: none, a run of exactly 255 and of more, a
        // value at either end, an all-zero plane, an empty one.
        let mut plane = vec![0u8; 5000];
        for (at, v) in [(0, 9), (1, 1), (257, 3), (1000, 255), (4999, 7)] {
            plane[at] = v;
        }
        let (mut stream, mut back) = (Vec::new(), Vec::new());
        for p in [&plane[..], &[0; 700][..], &[][..], &[5][..]] {
            sparse_plane(p, nonzero(p), &mut stream);
            assert!(stream.len() <= sparse_bound(p.len()));
            expand_sparse(&stream, p.len(), &mut back).unwrap();
            assert_eq!(back, p);
        }
        sparse_plane(&plane, nonzero(&plane), &mut stream);
        assert_eq!(stream[..4], 5u32.to_le_bytes());
        // A plane shorter than the gaps reach, a value missing, one over.
        assert!(expand_sparse(&stream, 4999, &mut back).is_err());
        assert!(expand_sparse(&stream[..stream.len() - 1], 5000, &mut back).is_err());
        let mut over = stream.clone();
        over.push(1);
        assert!(expand_sparse(&over, 5000, &mut back).is_err());
        // A value count past the stream, a stream with no count.
        let mut long = stream.clone();
        long[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(expand_sparse(&long, 5000, &mut back).is_err());
        assert!(expand_sparse(&stream[..3], 5000, &mut back).is_err());

        // An updated tensor's XOR planes: the high bytes barely change and
        // are stored sparse; they read back exactly.
        let w = weights(5, 16384);
        let a = le32(&w);
        let b = le32(
            &w.iter()
                .enumerate()
                .map(|(i, x)| if i % 61 == 0 { x * 1.01 } else { *x })
                .collect::<Vec<_>>(),
        );
        let kind = Kind {
            numbers: true,
            incompressible: true,
        };
        let (mut enc, mut dec) = (Encoder::new(LEVEL), Decoder::default());
        let (mut s, mut out) = (Vec::new(), Vec::new());
        assert_eq!(enc.encode(&b, Some(&a), kind, &mut s), Encoding::XorPlanes);
        let layout = planes_layout(&s, b.len()).unwrap();
        assert!(
            layout[..4].iter().all(|l| l.1 == Plane::Sparse),
            "{layout:?}"
        );
        assert!(s.len() < b.len() / 40, "{} of {}", s.len(), b.len());
        dec.decode(Encoding::XorPlanes, &s, Some(&a), b.len(), &mut out)
            .unwrap();
        assert_eq!(out, b);
        // A sparse plane read as a plain one, or a plain one as sparse
        // (the frame decodes to the wrong thing): errors, not garbage.
        let mut bad = s.clone();
        bad[0] &= !0x10;
        assert!(dec
            .decode(Encoding::XorPlanes, &bad, Some(&a), b.len(), &mut out)
            .is_err());
        let (mut pl, mut ps) = (Vec::new(), Vec::new());
        enc.encode(&a, None, kind, &mut pl);
        let layout = planes_layout(&pl, a.len()).unwrap();
        let z = (0..4).find(|&p| layout[p].1 == Plane::Zstd).unwrap();
        ps.extend_from_slice(&pl);
        ps[0] |= 0x10 << z;
        assert!(dec
            .decode(Encoding::Planes, &ps, None, a.len(), &mut out)
            .is_err());
    }

    #[test]
    fn codecs_round_trip() {
        let t = text(20000);
        let f1: Vec<u8> = (0..5000)
            .flat_map(|i| (1.0f32 + i as f32 * 1e-3).to_le_bytes())
            .collect();
        let mut enc = Encoder::new(LEVEL);
        let mut dec = Decoder::default();
        let (mut s, mut out) = (Vec::new(), Vec::new());
        assert_eq!(enc.compress(&t, &mut s), Encoding::Zstd);
        assert!(s.len() < t.len() / 4);
        dec.decode(Encoding::Zstd, &s, None, t.len(), &mut out)
            .unwrap();
        assert_eq!(out, t);
        // Incompressible data is recognised and stored as is.
        let n = noise(4, 20000);
        assert!(looks_incompressible(&n) && !looks_incompressible(&t));
        assert_eq!(enc.compress(&n, &mut s), Encoding::Raw);
        // A byte delta of a slightly edited chunk is tiny.
        let mut t2 = t.clone();
        t2[5000..5010].copy_from_slice(b"0123456789");
        let e = enc.encode(&t2, Some(&t), Kind::default(), &mut s);
        assert_eq!(e, Encoding::Delta);
        assert!(s.len() < 100, "{}", s.len());
        dec.decode(e, &s, Some(&t), t2.len(), &mut out).unwrap();
        assert_eq!(out, t2);
        // Floats whose low bits all moved: the XOR delta wins.
        let f2: Vec<u8> = f1
            .chunks(4)
            .enumerate()
            .flat_map(|(i, c)| {
                let v = f32::from_le_bytes(c.try_into().unwrap());
                (v + (splitmix(i as u64) % 100) as f32 * 1e-7).to_le_bytes()
            })
            .collect();
        let e = enc.encode(&f2, Some(&f1), Kind::default(), &mut s);
        assert_eq!(e, Encoding::XorPlanes);
        dec.decode(e, &s, Some(&f1), f2.len(), &mut out).unwrap();
        assert_eq!(out, f2);
        // A shorter reference counts as zero-extended.
        let kind = Kind {
            numbers: true,
            incompressible: false,
        };
        let e = enc.encode(&f2, Some(&f1[..f1.len() - 6]), kind, &mut s);
        assert_eq!(e, Encoding::XorPlanes);
        dec.decode(e, &s, Some(&f1[..f1.len() - 6]), f2.len(), &mut out)
            .unwrap();
        assert_eq!(out, f2);
        // A reference that looks like a zstd dictionary is not used as one.
        let mut d = DICT_MAGIC.to_vec();
        d.extend_from_slice(&t);
        let mut d2 = d.clone();
        d2[300] ^= 1;
        let e = Encoder::new(LEVEL).encode(&d2, Some(&d), Kind::default(), &mut s);
        assert_eq!(e, Encoding::Zstd);
        dec.decode(e, &s, None, d2.len(), &mut out).unwrap();
        assert_eq!(out, d2);
        // Why: zstd's own decoder reads such a reference as a trained
        // dictionary and cannot decode the delta.
        let mut cctx = CCtx::create();
        let mut raw = Vec::with_capacity(zstd_safe::compress_bound(d2.len()));
        cctx.ref_prefix(&d).unwrap();
        cctx.compress2(&mut raw, &d2).unwrap();
        let mut plain = Vec::with_capacity(d2.len());
        let decoded = DCtx::create().decompress_using_dict(&mut plain, &raw, &d);
        assert!(decoded.is_err() || plain != d2);
        // Damage and lies are errors, not panics.
        assert!(dec
            .decode(Encoding::Zstd, &s[..s.len() / 2], None, f2.len(), &mut out)
            .is_err());
        assert!(dec.decode(e, &s, None, f2.len(), &mut out).is_err());
        assert!(dec.decode(e, &s, Some(&f1), 7, &mut out).is_err());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
        /// Stored bytes read back from a D-node are untrusted: a damaged
        /// frame of any encoding, a wrong reference or a wrong length
        /// decodes to an error or to exactly `len` bytes, never a panic.
        #[test]
        fn damaged_stored_chunks_never_panic(
            seed in 0u64..1 << 32,
            n in 0usize..40_000,
            flips in proptest::collection::vec((0usize..1 << 16, 0u8..=255), 0..6),
            cut in 0usize..1 << 16,
            len_off in -3i64..4,
            which in 0u8..7,
        ) {
            let base = text(n.max(1) + (seed as usize % 97));
            let mut data = base.clone();
            for (i, b) in data.iter_mut().enumerate().skip(seed as usize % 500).step_by(997) {
                *b = (*b).wrapping_add(i as u8);
            }
            let mut enc = Encoder::new(LEVEL);
            let mut stored = Vec::new();
            let kind = Kind { numbers: which == 3 || which == 5, incompressible: false };
            let e = match which {
                0 => Encoding::Raw,
                1 => enc.compress(&data, &mut stored),
                4 => {
                    // A region of two members: the data in halves.
                    let (a, b) = data.split_at(data.len() / 2);
                    let table = [(fingerprint(a), a.len() as u32), (fingerprint(b), b.len() as u32)];
                    enc.region(&table, &data, &mut stored).unwrap();
                    Encoding::Region
                }
                // Planes of the chunk itself (no reference).
                5 => enc.encode(&data, None, kind, &mut stored),
                // The XOR delta file systems before version 6 hold.
                6 => {
                    enc.reencode(Encoding::XorDelta, &data, Some(&base), &mut stored).unwrap();
                    Encoding::XorDelta
                }
                _ => enc.encode(&data, Some(&base), kind, &mut stored),
            };
            if e == Encoding::Raw {
                stored = data.clone();
            }
            for (at, x) in &flips {
                if !stored.is_empty() {
                    let i = at % stored.len();
                    stored[i] ^= x;
                }
            }
            stored.truncate(stored.len().saturating_sub(cut % 8));
            let len = (data.len() as i64 + len_off).max(0) as usize;
            let mut dec = Decoder::default();
            let mut out = Vec::new();
            for b in [Some(&base[..]), Some(&base[..base.len() / 2]), None] {
                if dec.decode(e, &stored, b, len, &mut out).is_ok() {
                    proptest::prop_assert_eq!(out.len(), len);
                }
            }
        }
    }

    #[test]
    fn the_reference_cache_keeps_the_recently_used_within_its_budget() {
        use std::sync::Arc;
        let chunk = |seed| Arc::new(noise(seed, 1000));
        let (a, b, c) = (chunk(1), chunk(2), chunk(3));
        let (fa, fb, fc) = (fingerprint(&a), fingerprint(&b), fingerprint(&c));
        let mut cache = ReferenceCache::new(2500);
        cache.insert(fa, a.clone());
        cache.insert(fb, b.clone());
        // `a` used since `b` was inserted: `b` is the one to go.
        assert!(cache.get(&fa).is_some());
        cache.insert(fc, c.clone());
        assert!(cache.get(&fb).is_none());
        assert_eq!(cache.bytes(), 2000);
        // Inserting again replaces, never counts twice.
        cache.insert(fc, c.clone());
        assert_eq!(cache.bytes(), 2000);
        // Larger than the whole budget: not kept.
        cache.insert(fa, Arc::new(noise(4, 3000)));
        assert_eq!(cache.bytes(), 2000);
        assert!(cache.get(&fa).unwrap() == a);
        // Damaged entries no longer match their fingerprints.
        assert_eq!(cache.damage(), 2);
        assert_ne!(fingerprint(&cache.get(&fa).unwrap()), fa);
        assert_eq!(cache.bytes(), 2000);
        cache.remove(&fa);
        assert!(cache.get(&fa).is_none());
        assert_eq!(cache.bytes(), 1000);
        let mut none = ReferenceCache::new(0);
        none.insert(fa, a);
        assert!(none.get(&fa).is_none());
        none.insert(fb, Arc::new(Vec::new()));
        none.remove(&fb);
        assert_eq!(none.bytes(), 0);
    }
}
