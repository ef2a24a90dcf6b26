//! BLAKE3's compression function sixteen times at once (AVX-512), each lane
//! with its own input, counter, length and flags.
//!
//! The crate's `hash_many` runs sixteen lanes too, but they all share one
//! length, and one counter (or counters one apart), so across chunks of
//! the chunker's varied lengths some pieces never fill a call of it. Here
//! a lane is just a [`Job`]: any 1 KiB piece of any input, a short last
//! one, a parent node. The compression is BLAKE3's (spec §2.2–2.4: the G
//! function, seven rounds, the message permutation), checked against
//! `blake3::hash` by the tests of the module above. Per full call it is
//! ~15 % slower than the crate's hand-written assembly (all sixteen lanes
//! of every call here ran 5.8 GB/s in cache, against 6.3 for the crate's
//! calls with idle lanes), so it takes only what the crate cannot.

use std::arch::x86_64::*;

use super::IV;

/// One lane's work: `blocks` 64-byte blocks of the source at `from` (the
/// last `last_len` bytes long, zero-padded as the spec pads), compressed
/// in turn from the IV; `flags` on every block, `first` added on the first
/// and `last` on the last. Its chaining value goes to `to`. A job of no
/// blocks is an idle lane.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Job {
    pub from: usize,
    pub to: usize,
    pub blocks: u32,
    pub last_len: u32,
    pub counter: u64,
    pub flags: u32,
    pub first: u32,
    pub last: u32,
}

const LANES: usize = 16;

pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw")
}

/// The message word order of each of the seven rounds: the spec's
/// permutation applied once per round to the one before.
const SCHEDULE: [[usize; 16]; 7] = {
    const PERMUTATION: [usize; 16] = [2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8];
    let mut s = [[0; 16]; 7];
    let mut i = 0;
    while i < 16 {
        s[0][i] = i;
        i += 1;
    }
    let mut r = 1;
    while r < 7 {
        let mut i = 0;
        while i < 16 {
            s[r][i] = s[r - 1][PERMUTATION[i]];
            i += 1;
        }
        r += 1;
    }
    s
};

/// Runs `jobs` sixteen at a time, each chaining value to its `to` in
/// `cvs`, little-endian.
///
/// # Safety
/// The CPU must have AVX-512 F and BW ([`available`]).
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn run(src: &[u8], jobs: &[Job], cvs: &mut [u8]) {
    let mut out = [[0u32; 8]; LANES];
    for group in jobs.chunks(LANES) {
        compress(src, group, &mut out);
        for (j, cv) in group.iter().zip(&out) {
            for (w, b) in cv.iter().zip(cvs[j.to..j.to + 32].chunks_exact_mut(4)) {
                b.copy_from_slice(&w.to_le_bytes());
            }
        }
    }
}

/// The chaining values of `jobs` (at most [`LANES`]), in order, each as
/// BLAKE3's eight little-endian words.
///
/// # Safety
/// The CPU must have AVX-512 F and BW ([`available`]).
///
/// # Panics
/// If a job's bytes are not all inside `src` or its last block is not 1 to
/// 64 bytes: the loads below are unchecked.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn compress(src: &[u8], jobs: &[Job], out: &mut [[u32; 8]; LANES]) {
    assert!(jobs.len() <= LANES);
    let mut blocks = [0u32; LANES];
    let mut last_len = [64u32; LANES];
    let mut lo = [0u32; LANES];
    let mut hi = [0u32; LANES];
    let mut flags = [0u32; LANES];
    let mut first = [0u32; LANES];
    let mut last = [0u32; LANES];
    let mut steps = 0;
    for (l, j) in jobs.iter().enumerate() {
        if j.blocks > 0 {
            assert!((1..=64).contains(&j.last_len));
            let end = j.from + (j.blocks as usize - 1) * 64 + j.last_len as usize;
            assert!(end <= src.len(), "a job past its source");
        }
        blocks[l] = j.blocks;
        last_len[l] = j.last_len;
        lo[l] = j.counter as u32;
        hi[l] = (j.counter >> 32) as u32;
        flags[l] = j.flags;
        first[l] = j.first;
        last[l] = j.last;
        steps = steps.max(j.blocks);
    }
    let load = |a: &[u32; LANES]| _mm512_loadu_si512(a.as_ptr().cast());
    let (blocks_v, last_len_v, lo_v, hi_v) = (load(&blocks), load(&last_len), load(&lo), load(&hi));
    let (flags_v, first_v, last_v) = (load(&flags), load(&first), load(&last));
    let full = _mm512_set1_epi32(64);
    let mut cv = IV.map(|w| _mm512_set1_epi32(w as i32));
    for step in 0..steps {
        let mut rows = [_mm512_setzero_si512(); LANES];
        for (row, j) in rows.iter_mut().zip(jobs) {
            if step < j.blocks {
                let p = src.as_ptr().add(j.from + step as usize * 64);
                *row = if step + 1 == j.blocks && j.last_len < 64 {
                    // Only the block's own bytes are read; the rest are
                    // the spec's zero padding.
                    _mm512_maskz_loadu_epi8((1u64 << j.last_len) - 1, p.cast())
                } else {
                    _mm512_loadu_si512(p.cast())
                };
            }
        }
        let m = transpose(&rows);
        let at = _mm512_set1_epi32(step as i32);
        let active = _mm512_cmpgt_epu32_mask(blocks_v, at);
        let ending = _mm512_cmpeq_epi32_mask(blocks_v, _mm512_set1_epi32(step as i32 + 1));
        let len = _mm512_mask_blend_epi32(ending, full, last_len_v);
        let mut f = flags_v;
        if step == 0 {
            f = _mm512_or_si512(f, first_v);
        }
        f = _mm512_mask_or_epi32(f, ending, f, last_v);
        let next = compress_one(&cv, &m, lo_v, hi_v, len, f);
        for (c, n) in cv.iter_mut().zip(next) {
            *c = _mm512_mask_blend_epi32(active, *c, n);
        }
    }
    let mut words = [[0u32; LANES]; 8];
    for (w, c) in words.iter_mut().zip(cv) {
        _mm512_storeu_si512(w.as_mut_ptr().cast(), c);
    }
    for (l, o) in out.iter_mut().enumerate().take(jobs.len()) {
        for (i, w) in o.iter_mut().enumerate() {
            *w = words[i][l];
        }
    }
}

/// One compression of every lane: the first eight words of the output,
/// which are the chaining value (and, with the root flag, the hash).
#[inline]
#[target_feature(enable = "avx512f")]
fn compress_one(
    cv: &[__m512i; 8],
    m: &[__m512i; 16],
    lo: __m512i,
    hi: __m512i,
    len: __m512i,
    flags: __m512i,
) -> [__m512i; 8] {
    let s = |w: u32| _mm512_set1_epi32(w as i32);
    let mut v = [
        cv[0],
        cv[1],
        cv[2],
        cv[3],
        cv[4],
        cv[5],
        cv[6],
        cv[7],
        s(IV[0]),
        s(IV[1]),
        s(IV[2]),
        s(IV[3]),
        lo,
        hi,
        len,
        flags,
    ];
    for r in &SCHEDULE {
        g(&mut v, 0, 4, 8, 12, m[r[0]], m[r[1]]);
        g(&mut v, 1, 5, 9, 13, m[r[2]], m[r[3]]);
        g(&mut v, 2, 6, 10, 14, m[r[4]], m[r[5]]);
        g(&mut v, 3, 7, 11, 15, m[r[6]], m[r[7]]);
        g(&mut v, 0, 5, 10, 15, m[r[8]], m[r[9]]);
        g(&mut v, 1, 6, 11, 12, m[r[10]], m[r[11]]);
        g(&mut v, 2, 7, 8, 13, m[r[12]], m[r[13]]);
        g(&mut v, 3, 4, 9, 14, m[r[14]], m[r[15]]);
    }
    std::array::from_fn(|i| _mm512_xor_si512(v[i], v[i + 8]))
}

/// The spec's G, on one word of sixteen states at once.
#[inline]
#[target_feature(enable = "avx512f")]
fn g(v: &mut [__m512i; 16], a: usize, b: usize, c: usize, d: usize, x: __m512i, y: __m512i) {
    v[a] = _mm512_add_epi32(_mm512_add_epi32(v[a], v[b]), x);
    v[d] = _mm512_ror_epi32::<16>(_mm512_xor_si512(v[d], v[a]));
    v[c] = _mm512_add_epi32(v[c], v[d]);
    v[b] = _mm512_ror_epi32::<12>(_mm512_xor_si512(v[b], v[c]));
    v[a] = _mm512_add_epi32(_mm512_add_epi32(v[a], v[b]), y);
    v[d] = _mm512_ror_epi32::<8>(_mm512_xor_si512(v[d], v[a]));
    v[c] = _mm512_add_epi32(v[c], v[d]);
    v[b] = _mm512_ror_epi32::<7>(_mm512_xor_si512(v[b], v[c]));
}

/// Sixteen lanes' blocks (a row each) to the sixteen message words (a
/// lane each): a 16×16 transpose of 32-bit words in four steps, pairs of
/// words, then of pairs, then of 128-bit quarters twice.
#[inline]
#[target_feature(enable = "avx512f")]
fn transpose(r: &[__m512i; 16]) -> [__m512i; 16] {
    // Quarter k of t[2p] holds rows 2p, 2p+1 of words 4k, 4k+1; of
    // t[2p+1], of words 4k+2, 4k+3.
    let t: [__m512i; 16] = std::array::from_fn(|i| {
        let (a, b) = (r[i & !1], r[i | 1]);
        if i % 2 == 0 {
            _mm512_unpacklo_epi32(a, b)
        } else {
            _mm512_unpackhi_epi32(a, b)
        }
    });
    // Quarter k of q[4g + o] holds rows 4g..4g+3 of word 4k + o.
    let q: [__m512i; 16] = std::array::from_fn(|i| {
        let (g, o) = (i / 4, i % 4);
        let (a, b) = (t[4 * g + o / 2], t[4 * g + 2 + o / 2]);
        if o % 2 == 0 {
            _mm512_unpacklo_epi64(a, b)
        } else {
            _mm512_unpackhi_epi64(a, b)
        }
    });
    let mut m = [_mm512_setzero_si512(); 16];
    for o in 0..4 {
        let (v0, v1, v2, v3) = (q[o], q[4 + o], q[8 + o], q[12 + o]);
        let x0 = _mm512_shuffle_i32x4::<0b01_00_01_00>(v0, v1);
        let x1 = _mm512_shuffle_i32x4::<0b11_10_11_10>(v0, v1);
        let x2 = _mm512_shuffle_i32x4::<0b01_00_01_00>(v2, v3);
        let x3 = _mm512_shuffle_i32x4::<0b11_10_11_10>(v2, v3);
        m[o] = _mm512_shuffle_i32x4::<0b10_00_10_00>(x0, x2);
        m[4 + o] = _mm512_shuffle_i32x4::<0b11_01_11_01>(x0, x2);
        m[8 + o] = _mm512_shuffle_i32x4::<0b10_00_10_00>(x1, x3);
        m[12 + o] = _mm512_shuffle_i32x4::<0b11_01_11_01>(x1, x3);
    }
    m
}
