//! The fingerprints of many chunks at once, each exactly `blake3::hash` of
//! its bytes.
//!
//! BLAKE3 is fast because it compresses up to 16 of its 1 KiB chunks side
//! by side (AVX-512 lanes), and the crate finds 16 side by side only
//! within one input: a 4–64 KiB chunk of ours whose length is not a
//! multiple of 16 KiB runs its last 1–15 KiB with idle lanes, and measured
//! on the chunk lengths the chunker makes BLAKE3 ran ~3 GB/s against ~5 on
//! 1 MiB inputs. So the lanes are filled *across* chunks instead: the
//! `c`-th 1 KiB piece of every chunk of a batch has the same counter, so
//! they are one `hash_many` call; then every tree level's parents across
//! the batch are one call more, and the roots one more. The tree and flags
//! are BLAKE3's own (spec §2.1, §5.1.2: left subtrees complete, pairs
//! joined left to right, the root flag on the last compression), and the
//! result is checked against `blake3::hash` for every length shape in the
//! tests.
//!
//! What that leaves is the pieces no full call of one counter takes: the
//! last under-16 of each counter, and every chunk's short last piece
//! (which `hash_many` cannot take at all, so it ran alone). With AVX-512
//! those go to [`lanes`], sixteen lanes of any counters and lengths: in
//! cache, 6.0–6.5 GB/s became 6.6–7.2 (`blake3::hash` of 1 MiB inputs:
//! 6.9–7.8; BENCHMARKS.md).

//! `blake3::platform` is the crate's undocumented SIMD entry point (its
//! own docs: for benchmarks only), so the crate is pinned to one version:
//! a change to that interface fails to build rather than hash wrongly, and
//! the tests compare with the crate's public hash in any case.

use blake3::hazmat::HasherExt;
use blake3::platform::Platform;
use blake3::{IncrementCounter, BLOCK_LEN, CHUNK_LEN, OUT_LEN};

use super::Fp;

#[cfg(target_arch = "x86_64")]
mod lanes;

/// BLAKE3's IV (spec §2.2: SHA-256's), the key words of plain hashing.
const IV: [u32; 8] = [
    0x6A09_E667,
    0xBB67_AE85,
    0x3C6E_F372,
    0xA54F_F53A,
    0x510E_527F,
    0x9B05_688C,
    0x1F83_D9AB,
    0x5BE0_CD19,
];
/// Compression flags (spec §2.1, table 3).
const CHUNK_START: u8 = 1 << 0;
const CHUNK_END: u8 = 1 << 1;
const PARENT: u8 = 1 << 2;
const ROOT: u8 = 1 << 3;

/// Reusable scratch for [`Fingerprinter::fingerprints`]: after the first
/// batches of a size it allocates nothing.
pub struct Fingerprinter {
    platform: Platform,
    /// Each input's chaining values of its current tree level, end to end:
    /// input `i`'s are `cvs[at[i]..][..32 * count[i]]`.
    cvs: Vec<u8>,
    at: Vec<usize>,
    count: Vec<usize>,
    /// The blocks of one `hash_many` call and where its outputs go.
    blocks: Vec<(usize, usize)>,
    out: Vec<u8>,
    /// With AVX-512: the pieces [`lanes`] takes, full ones first, then
    /// the short last pieces (sorted, longest first).
    #[cfg(target_arch = "x86_64")]
    lanes: bool,
    #[cfg(target_arch = "x86_64")]
    jobs: Vec<lanes::Job>,
    #[cfg(target_arch = "x86_64")]
    short: Vec<lanes::Job>,
}

impl Default for Fingerprinter {
    fn default() -> Self {
        Fingerprinter {
            platform: Platform::detect(),
            cvs: Vec::new(),
            at: Vec::new(),
            count: Vec::new(),
            blocks: Vec::new(),
            out: Vec::new(),
            #[cfg(target_arch = "x86_64")]
            lanes: lanes::available(),
            #[cfg(target_arch = "x86_64")]
            jobs: Vec::new(),
            #[cfg(target_arch = "x86_64")]
            short: Vec::new(),
        }
    }
}

impl Fingerprinter {
    /// The fingerprint of each `data[offset..offset + len]` of `ranges`,
    /// in order, appended to `fps`.
    pub fn fingerprints(
        &mut self,
        data: &[u8],
        ranges: impl Iterator<Item = (usize, usize)> + Clone,
        fps: &mut Vec<Fp>,
    ) {
        let first = fps.len();
        self.cvs.clear();
        self.at.clear();
        self.count.clear();
        #[cfg(target_arch = "x86_64")]
        {
            self.jobs.clear();
            self.short.clear();
        }
        let mut longest = 0;
        for (_, len) in ranges.clone() {
            let chunks = len.div_ceil(CHUNK_LEN).max(1);
            self.at.push(self.cvs.len());
            self.count.push(chunks);
            // A one-chunk input is its own root: hashed whole below.
            if chunks > 1 {
                self.cvs.resize(self.cvs.len() + chunks * OUT_LEN, 0);
                longest = longest.max(len / CHUNK_LEN);
            }
        }
        // Room after the last chaining value for `hash_many`'s over-read
        // (below): the parents' inputs are in `cvs`.
        self.cvs.resize(self.cvs.len() + OVER_READ, 0);
        // Full 1 KiB chunks, one call per counter across the inputs.
        for c in 0..longest {
            self.blocks.clear();
            for (i, (off, len)) in ranges.clone().enumerate() {
                if self.count[i] > 1 && len / CHUNK_LEN > c {
                    let (from, to) = (off + c * CHUNK_LEN, self.at[i] + c * OUT_LEN);
                    if from + CHUNK_LEN + OVER_READ <= data.len() {
                        self.blocks.push((from, to));
                        continue;
                    }
                    // Too near the end of `data` for `hash_many`: in our
                    // lanes (whose loads read nothing past an input), or
                    // alone.
                    #[cfg(target_arch = "x86_64")]
                    if self.lanes {
                        self.jobs.push(piece_job(from, to, c, CHUNK_LEN));
                        continue;
                    }
                    self.cvs[to..to + OUT_LEN]
                        .copy_from_slice(&alone(&data[from..from + CHUNK_LEN], c * CHUNK_LEN));
                }
            }
            // The crate's sixteen lanes take the inputs sixteen at a time,
            // its narrower ones the rest: with ours those wait for a full
            // call of any counters.
            #[cfg(target_arch = "x86_64")]
            if self.lanes {
                let degree = self.platform.simd_degree();
                let whole = self.blocks.len() / degree * degree;
                self.jobs.extend(
                    self.blocks
                        .drain(whole..)
                        .map(|(from, to)| piece_job(from, to, c, CHUNK_LEN)),
                );
            }
            for group in self.blocks.chunks(GROUP) {
                compress::<CHUNK_LEN>(
                    self.platform,
                    data,
                    group,
                    c as u64,
                    0,
                    CHUNK_START,
                    CHUNK_END,
                    &mut self.out,
                );
                scatter(group, &self.out, &mut self.cvs);
            }
        }
        // A short last chunk: the crate's SIMD takes only whole chunks, so
        // alone, or in our lanes, longest first so a call's lanes end
        // together.
        for (i, (off, len)) in ranges.clone().enumerate() {
            let n = self.count[i];
            if n > 1 && len % CHUNK_LEN != 0 {
                let from = (n - 1) * CHUNK_LEN;
                #[cfg(target_arch = "x86_64")]
                if self.lanes {
                    self.short.push(piece_job(
                        off + from,
                        self.at[i] + (n - 1) * OUT_LEN,
                        n - 1,
                        len - from,
                    ));
                    continue;
                }
                let at = self.at[i] + (n - 1) * OUT_LEN;
                self.cvs[at..at + OUT_LEN]
                    .copy_from_slice(&alone(&data[off + from..off + len], from));
            }
        }
        #[cfg(target_arch = "x86_64")]
        if self.lanes {
            self.short
                .sort_unstable_by_key(|j| std::cmp::Reverse(j.blocks));
            self.jobs.append(&mut self.short);
            // SAFETY: `lanes` is set only where the CPU has AVX-512 F, BW.
            unsafe { lanes::run(data, &self.jobs, &mut self.cvs) };
        }
        // Parents, a level at a time, until every tree has two children of
        // its root left: BLAKE3 pairs a level's nodes left to right and
        // carries an odd last one up. A level is compacted in place: the
        // parent of pair `j` goes to slot `j`, which belongs to a pair at or
        // before `j`, already read (a group is read whole before its
        // outputs are written, and groups go in order).
        loop {
            self.blocks.clear();
            for (&at, &n) in self.at.iter().zip(&self.count) {
                if n > 2 {
                    self.blocks
                        .extend((0..n / 2).map(|j| (at + 2 * j * OUT_LEN, at + j * OUT_LEN)));
                }
            }
            if self.blocks.is_empty() {
                break;
            }
            for group in self.blocks.chunks(GROUP) {
                compress::<BLOCK_LEN>(
                    self.platform,
                    &self.cvs,
                    group,
                    0,
                    PARENT,
                    0,
                    0,
                    &mut self.out,
                );
                scatter(group, &self.out, &mut self.cvs);
            }
            for (&at, n) in self.at.iter().zip(self.count.iter_mut()) {
                if *n > 2 {
                    if *n % 2 == 1 {
                        let from = at + (*n - 1) * OUT_LEN;
                        self.cvs
                            .copy_within(from..from + OUT_LEN, at + *n / 2 * OUT_LEN);
                    }
                    *n = n.div_ceil(2);
                }
            }
        }
        // The roots, side by side too: a root's output is its chaining
        // value with the root flag (spec §2.5, for 32-byte hashes).
        self.blocks.clear();
        self.blocks.extend(
            self.at
                .iter()
                .zip(&self.count)
                .filter(|(_, &n)| n == 2)
                .map(|(&at, _)| (at, at)),
        );
        for group in self.blocks.chunks(GROUP) {
            compress::<BLOCK_LEN>(
                self.platform,
                &self.cvs,
                group,
                0,
                PARENT | ROOT,
                0,
                0,
                &mut self.out,
            );
            scatter(group, &self.out, &mut self.cvs);
        }
        for (i, (off, len)) in ranges.enumerate() {
            fps.push(if self.count[i] == 1 {
                *blake3::hash(&data[off..off + len]).as_bytes()
            } else {
                let at = self.at[i];
                self.cvs[at..at + OUT_LEN].try_into().expect("32 bytes")
            });
        }
        debug_assert_eq!(fps.len() - first, self.count.len());
    }
}

/// The lanes' job of the `counter`-th 1 KiB piece of an input, `bytes`
/// long (1 to 1024), at `from`; its chaining value to `to`.
#[cfg(target_arch = "x86_64")]
fn piece_job(from: usize, to: usize, counter: usize, bytes: usize) -> lanes::Job {
    let blocks = bytes.div_ceil(BLOCK_LEN);
    lanes::Job {
        from,
        to,
        blocks: blocks as u32,
        last_len: (bytes - (blocks - 1) * BLOCK_LEN) as u32,
        counter: counter as u64,
        flags: 0,
        first: CHUNK_START.into(),
        last: CHUNK_END.into(),
    }
}

/// The chaining value of one 1 KiB piece (or a short last one) that
/// starts `at` bytes into its input, hashed on its own.
fn alone(piece: &[u8], at: usize) -> [u8; OUT_LEN] {
    blake3::Hasher::new()
        .set_input_offset(at as u64)
        .update(piece)
        .finalize_non_root()
}

/// Inputs per SIMD call: a multiple of the widest (16 lanes), on the stack.
const GROUP: usize = 64;

/// Bytes past its inputs the crate's `hash_many` may read. Its AVX-512
/// two-input path (1.8.7, `blake3_avx512_x86-64_unix.S`) loads 32 bytes at
/// offset 48 of each block, 16 past the block's end, and keeps only the
/// first 16: harmless inside an allocation, a fault at the end of mapped
/// memory (found by the guard-page test below). The crate's own hashing
/// never passes an input's last block to it; we do, so every input we
/// pass has this much readable memory after it.
const OVER_READ: usize = 64;

/// Compresses the `N`-byte inputs at `src[from..]` of `group` (at most
/// [`GROUP`]) side by side into `out`, 32 bytes each, in order.
#[allow(clippy::too_many_arguments)]
fn compress<const N: usize>(
    platform: Platform,
    src: &[u8],
    group: &[(usize, usize)],
    counter: u64,
    flags: u8,
    flags_start: u8,
    flags_end: u8,
    out: &mut Vec<u8>,
) {
    debug_assert!(group.len() <= GROUP);
    let first: &[u8; N] = src[group[0].0..][..N].try_into().expect("N bytes");
    let mut inputs = [first; GROUP];
    for (slot, &(from, _)) in inputs.iter_mut().zip(group) {
        *slot = src[from..][..N].try_into().expect("N bytes");
    }
    out.resize(group.len() * OUT_LEN, 0);
    platform.hash_many(
        &inputs[..group.len()],
        &IV,
        counter,
        IncrementCounter::No,
        flags,
        flags_start,
        flags_end,
        out,
    );
}

/// Writes each output of a [`compress`]ed group to its place in `cvs`.
fn scatter(group: &[(usize, usize)], out: &[u8], cvs: &mut [u8]) {
    for (&(_, to), cv) in group.iter().zip(out.chunks_exact(OUT_LEN)) {
        cvs[to..to + OUT_LEN].copy_from_slice(cv);
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::noise;
    use super::*;
    use proptest::prelude::*;

    /// Fingerprinters of every way this CPU can run: the crate's SIMD,
    /// and with AVX-512 the sixteen lanes of our own.
    fn fingerprinters() -> Vec<Fingerprinter> {
        // The crate's SIMD, at every width this CPU has.
        let platforms = [
            Some(Platform::portable()),
            Platform::sse2(),
            Platform::sse41(),
            Platform::avx2(),
            Platform::avx512(),
        ];
        let mut all: Vec<Fingerprinter> = platforms
            .into_iter()
            .flatten()
            .map(|platform| Fingerprinter {
                platform,
                #[cfg(target_arch = "x86_64")]
                lanes: false,
                ..Fingerprinter::default()
            })
            .collect();
        #[cfg(target_arch = "x86_64")]
        if lanes::available() {
            all.push(Fingerprinter::default());
        }
        all
    }

    fn check(data: &[u8], ranges: &[(usize, usize)]) {
        for f in fingerprinters() {
            check_with(f, data, ranges);
        }
    }

    fn check_with(mut f: Fingerprinter, data: &[u8], ranges: &[(usize, usize)]) {
        let mut fps = vec![[7u8; 32]];
        f.fingerprints(data, ranges.iter().copied(), &mut fps);
        assert_eq!(fps.len(), ranges.len() + 1);
        assert_eq!(fps[0], [7u8; 32], "appended, not overwritten");
        for (fp, &(off, len)) in fps[1..].iter().zip(ranges) {
            assert_eq!(
                fp,
                blake3::hash(&data[off..off + len]).as_bytes(),
                "len {len}"
            );
        }
    }

    #[test]
    fn every_tree_shape_up_to_70_chunks_is_blake3() {
        // Lengths around every chunk boundary up to 70 KiB: full and short
        // last chunks, odd and even counts at every level, in one batch
        // (more than one SIMD group) and one at a time.
        let data = noise(1, 80 << 10);
        let mut ranges = vec![(0, 0), (5, 1), (0, 64), (3, 1023), (0, 1024), (1, 1025)];
        for n in 2..=70usize {
            for d in [-1isize, 0, 1, 512] {
                let len = (n * CHUNK_LEN) as isize + d;
                ranges.push(((n * 7) % 100, len as usize));
            }
        }
        check(&data, &ranges);
        for r in &ranges {
            check(&data, std::slice::from_ref(r));
        }
        check(&data, &[]);
    }

    #[test]
    fn a_reused_fingerprinter_forgets_the_last_batch() {
        let data = noise(2, 300 << 10);
        for mut f in fingerprinters() {
            let mut fps = Vec::new();
            f.fingerprints(&data, [(0, 200 << 10), (1, 9000)].into_iter(), &mut fps);
            fps.clear();
            f.fingerprints(&data, [(17, 3000)].into_iter(), &mut fps);
            assert_eq!(fps, vec![*blake3::hash(&data[17..3017]).as_bytes()]);
        }
    }

    /// Inputs that end where readable memory ends: the lanes' loads of a
    /// short last block must read only its own bytes (a read past them
    /// would fault on the guard page here, not just read a neighbour's).
    #[test]
    fn inputs_ending_at_a_guard_page_are_read_no_further() {
        const PAGE: usize = 4096;
        let len = 16 * PAGE;
        // SAFETY: a fresh anonymous mapping, its last page made
        // inaccessible, unmapped at the end; only the first `len` bytes are
        // used as a slice.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                len + PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            assert_eq!(
                libc::mprotect(p.cast::<u8>().add(len).cast(), PAGE, libc::PROT_NONE),
                0
            );
            let data = std::slice::from_raw_parts_mut(p.cast::<u8>(), len);
            data.copy_from_slice(&noise(3, len));
            // Every short-last-piece length, each input ending at the
            // guard; and 1 to 20 inputs whose last full piece does, at one
            // counter (every width of the crate's SIMD calls).
            let mut ranges: Vec<(usize, usize)> = (1..=1024)
                .step_by(7)
                .chain([1023, 1024, 1025])
                .map(|tail| (len - (5 * CHUNK_LEN + tail), 5 * CHUNK_LEN + tail))
                .collect();
            check(data, &ranges);
            for n in 1..=20 {
                ranges = vec![(len - 6 * CHUNK_LEN, 6 * CHUNK_LEN); n];
                check(data, &ranges);
            }
            for r in &ranges {
                check(data, std::slice::from_ref(r));
            }
            assert_eq!(libc::munmap(p, len + PAGE), 0);
        }
    }

    proptest! {
        #[test]
        fn any_batch_is_blake3(
            seed in any::<u64>(),
            ranges in prop::collection::vec((0usize..4096, 0usize..(66 << 10)), 0..150),
        ) {
            let data = noise(seed, 72 << 10);
            check(&data, &ranges);
        }
    }
}
