//! Data reduction in the file system's write and read paths (the codecs
//! are in [`crate::reduce`]; this drives them against the indexes).
//!
//! Write. A file's sequential writes gather in its *pending buffer*; when
//! it holds [`PENDING_HIGH`] bytes (or the file is written elsewhere,
//! closed, truncated or synced) it is cut into content-defined chunks.
//! Every chunk is fingerprinted and looked up in the chunk index: a
//! duplicate costs a reference. A new chunk is sketched and its
//! super-features looked up in the similarity index; if a similar stored
//! chunk exists (itself no delta, so a read costs at most two chunks) the
//! new one is stored as a delta against it, else compressed (or as is when
//! it looks incompressible). Stored chunks are appended, each behind a
//! chunk header ([`meta::chunk_header`]), to the open segment like raw
//! writes are; the extent map then names chunks.
//!
//! Indexes. Both are linear-hashing tables whose buckets are metadata pages
//! (the same pages, cache and copy-on-write commit as inodes), so a C-node
//! holds only the buckets it uses and the tables grow a bucket at a time.
//!
//! References. A chunk counts the extents naming it and the deltas built on
//! it. Dropped references are queued (`State::ref_changes`, committed with
//! the metadata) and applied in batches before each commit; a chunk at zero
//! is removed and its bytes become dead in its segment. The cleaner moves
//! the live chunks out of mostly dead segments so whole segments free.

use std::sync::atomic::AtomicU64;

use super::*;
use crate::reduce::{self, Encoder, Encoding};
use meta::{chunk_page, similar_page, CHUNK_HEADER};

/// A file's pending bytes are chunked once this many have gathered: large
/// enough that cut points depend on content, not on where writes stopped.
pub(super) const PENDING_HIGH: usize = 4 << 20;
/// Chunks looked up and inserted together (bounds the pages one batch pins).
const BATCH_CHUNKS: usize = 64;
/// Reference changes applied in one step.
const REF_BATCH: usize = 256;
/// The background cleaner rewrites segments at most this full of live
/// chunks: moving half a segment frees a whole one.
pub const CLEAN_BELOW: f64 = 0.5;
/// Index entries journalled but not merged into their buckets: beyond
/// this many (the default of [`Options::index_buffer`]), every commit
/// merges some buckets ([`merge_pages`]); beyond four times as many,
/// writers wait for merges.
pub const MERGE_AT: usize = 1 << 16;
/// Decoded reference chunks kept by default ([`Options::reference_cache`]):
/// a thousand to four thousand references (16-64 KiB), what the deltas of
/// some hundred megabytes of a new version name.
pub const REFERENCE_CACHE: usize = 64 << 20;
/// Filters of evicted index buckets kept by default
/// ([`Options::index_filters`]): at ~6 bytes a chunk (its fingerprint's
/// tag and its two super-features'), the buckets of ~11 M chunks, some
/// 200 GiB of unique data in 18 KiB chunks.
pub const INDEX_FILTERS: usize = 64 << 20;

/// Buckets one commit merges the buffer into: a quarter of the page cache,
/// so merging never holds more pages than the cache would.
fn merge_pages(cache_pages: usize) -> usize {
    (cache_pages / 4).max(8)
}

/// Index entries newer than their bucket pages (see [`meta::IndexDelta`]):
/// lookups see these first; commits journal what changed; merges move
/// them into the buckets, whose pages then stay clean and evictable.
#[derive(Default)]
pub(super) struct IndexBuffer {
    chunks: HashMap<Fp, Option<ChunkEntry>>,
    similar: HashMap<u64, Fp>,
    /// Changed since the last commit snapshot.
    changed: HashSet<Fp>,
    new_similar: Vec<u64>,
    /// Buckets merged since the last commit snapshot.
    merged: Vec<u64>,
}

impl IndexBuffer {
    pub(super) fn len(&self) -> usize {
        self.chunks.len() + self.similar.len()
    }

    /// What changed since the last snapshot, for the commit's record.
    pub(super) fn take_delta(&mut self) -> meta::IndexDelta {
        // Drained, not replaced: the next interval fills them about as much,
        // and regrowing them costs a rehash per doubling.
        let (chunks, similar) = (&self.chunks, &self.similar);
        meta::IndexDelta {
            chunks: self
                .changed
                .drain()
                .filter_map(|fp| chunks.get(&fp).map(|e| (fp, e.clone())))
                .collect(),
            similar: self
                .new_similar
                .drain(..)
                .filter_map(|sf| similar.get(&sf).map(|fp| (sf, *fp)))
                .collect(),
            merged: std::mem::take(&mut self.merged),
        }
    }

    /// Everything buffered, for an image.
    pub(super) fn whole(&self) -> meta::IndexDelta {
        meta::IndexDelta {
            chunks: self.chunks.iter().map(|(k, v)| (*k, v.clone())).collect(),
            similar: self.similar.iter().map(|(k, v)| (*k, *v)).collect(),
            merged: Vec::new(),
        }
    }

    /// Replays one record's delta (`counts`: the record's, whose bucket
    /// numbers its merges used).
    pub(super) fn replay(&mut self, d: meta::IndexDelta, counts: &meta::Counts) {
        // The merge came first (the record's entries are what the buffer
        // held after it).
        if !d.merged.is_empty() {
            let merged: HashSet<u64> = d.merged.into_iter().collect();
            let (cb, sb) = (counts.chunk_buckets.max(1), counts.similar_buckets.max(1));
            self.chunks
                .retain(|fp, _| !merged.contains(&chunk_page(fp, cb)));
            self.similar
                .retain(|sf, _| !merged.contains(&similar_page(*sf, sb)));
        }
        self.chunks.extend(d.chunks);
        self.similar.extend(d.similar);
    }
}

/// What the write path (and the read path, for references) did, since
/// mount (for `dase stats` and benchmarks).
#[derive(Debug, Default)]
pub struct Ingest {
    pub chunks: AtomicU64,
    pub bytes: AtomicU64,
    pub duplicates: AtomicU64,
    pub deltas: AtomicU64,
    pub compressed: AtomicU64,
    pub raw: AtomicU64,
    /// Index pages read from the D-nodes (chunk and similarity).
    pub index_loads: AtomicU64,
    /// Index lookups made (one per page consulted per chunk).
    pub lookups: AtomicU64,
    /// Lookups a bucket's filter answered ("not there") without its page.
    pub filtered: AtomicU64,
    /// Filters made at mount from buckets read for them
    /// ([`Options::warm_filters`]).
    pub warmed_filters: AtomicU64,
    pub cleaned_segments: AtomicU64,
    /// Bucket pages the index buffer was merged into.
    pub merged_buckets: AtomicU64,
    /// Most index entries buffered at once.
    pub peak_buffered: AtomicU64,
    /// Time writers spent waiting for merges (the buffer at its bound),
    /// summed over writers, in microseconds.
    pub merge_wait_us: AtomicU64,
    /// Time commits held writers off (writing sealed segments, merging,
    /// taking the snapshot), in microseconds.
    pub commit_hold_us: AtomicU64,
    pub moved_bytes: AtomicU64,
    /// Most metadata pages (inodes and index buckets) resident at once,
    /// as seen when a page is loaded and when a commit begins.
    pub peak_pages: AtomicU64,
    /// Reference chunks fetched and decoded, for reads and writes of deltas.
    pub references_fetched: AtomicU64,
    /// Deltas read or written against a reference already decoded
    /// ([`Options::reference_cache`]).
    pub reference_hits: AtomicU64,
    /// References that failed a check (cached ones, or just read from the
    /// D-nodes) and were fetched again.
    pub references_rejected: AtomicU64,
    /// Writes of file data (an idle pass stops when this moves).
    pub writes: AtomicU64,
    /// Idle recompression passes run, the segments they read and the
    /// stored bytes they saved.
    pub idle_passes: AtomicU64,
    pub idle_segments: AtomicU64,
    pub idle_saved: AtomicU64,
}

/// Bytes of a file written but not yet chunked.
#[derive(Default)]
pub(super) struct Pending {
    start: u64,
    buf: Vec<u8>,
}

pub(super) type Writer = Arc<tokio::sync::Mutex<Pending>>;

/// Where a stored chunk's bytes are.
#[derive(Clone)]
enum Source {
    /// In a segment not yet on the D-nodes: its stored bytes.
    Mem(Arc<[u8]>),
    /// On the D-nodes: the segment's stripes and the chunk's offset in it.
    Disk(Vec<StripeRecord>, usize),
}

/// Where a chunk's stored form is: its own frame, or a slice of its
/// compression region's content.
#[derive(Clone)]
enum Where {
    Frame(Source),
    InRegion(ChunkEntry, Source),
}

/// A chunk to read: its entry and where it (and its delta's reference)
/// are.
#[derive(Clone)]
pub(super) struct ChunkRead {
    entry: ChunkEntry,
    src: Where,
    base: Option<(ChunkEntry, Where)>,
}

/// Decoded compression regions, most recently used first: reading a cold
/// file decodes each region once, not once per member. A region's content
/// never changes (its entry is named by the content's fingerprint), so an
/// entry is right for as long as it is kept.
#[derive(Default)]
pub(super) struct RegionCache {
    slots: Vec<(Fp, RegionSlot)>,
}

/// A region's decoded content, filled by its first reader.
type RegionSlot = Arc<tokio::sync::OnceCell<Arc<Vec<u8>>>>;

/// Decoded regions kept: a few readers' worth (a region is at most
/// [`MAX_REGION`] bytes).
const REGION_CACHE: usize = 4;

impl RegionCache {
    /// The slot of region `fp`, made (and the oldest dropped) if absent.
    fn slot(&mut self, fp: &Fp) -> RegionSlot {
        let cell = match self.slots.iter().position(|(f, _)| f == fp) {
            Some(i) => self.slots.remove(i).1,
            None => Arc::default(),
        };
        self.slots.insert(0, (*fp, cell.clone()));
        self.slots.truncate(REGION_CACHE);
        cell
    }
}

/// One chunk of a batch being stored.
struct Cand {
    off: usize,
    len: usize,
    fp: Fp,
    sketch: Option<[u64; reduce::SUPER_FEATURES]>,
    /// Cut as an array of numbers.
    numbers: bool,
}

/// What a batch's lookups decided for a chunk.
enum Plan {
    Duplicate,
    /// Delta against this stored chunk.
    Against(Box<ChunkRead>),
    /// Delta against an earlier new chunk of this batch.
    AgainstBatch(usize),
    New,
}

/// A segment on the D-nodes: its number, stripes, bytes written and live.
type WrittenSegment = (u64, Vec<StripeRecord>, u32, u64);

/// Which segments a recompression pass reads, and what it stores again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PassScope {
    /// Every written segment, every compressed chunk (`dase clean
    /// --recompress`).
    All,
    /// The mount's pass once idle: only segments written since the last
    /// pass at this level or higher (the mark in [`meta::RecordTail`]),
    /// only text-like chunks (plain zstd and byte deltas: arrays of
    /// numbers gain ~0.1 % at level 19 and cost the most time, BENCHMARKS.md),
    /// and it stops at the next segment once anything is written or the
    /// mount closes.
    Idle,
}

impl PassScope {
    /// Whether a chunk stored as `enc` below the pass's level is stored
    /// again, alone or in a region.
    fn redoes(self, enc: Encoding) -> bool {
        match enc {
            Encoding::Zstd | Encoding::Delta => true,
            Encoding::XorDelta | Encoding::Planes | Encoding::XorPlanes => self == PassScope::All,
            _ => false,
        }
    }
}

/// What a recompression pass did ([`FileSystem::recompress`]).
#[derive(Debug, Default)]
pub struct RecompressReport {
    /// Segments read.
    pub segments: u64,
    /// Stopped early (an idle pass that saw a write, or the mount closing).
    pub stopped: bool,
    /// Chunks stored again, smaller (alone or in a region).
    pub chunks: u64,
    /// Compression regions made.
    pub regions: u64,
    /// Their stored bytes before and after.
    pub before: u64,
    pub after: u64,
}

/// A chunk read for a compression region: where its frame was, its entry
/// then, its content.
struct Member {
    from: Origin,
    entry: ChunkEntry,
    data: Vec<u8>,
}

/// Where a region's member was stored when it was read.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// A frame of its own at this segment and offset, of this many stored
    /// bytes.
    Frame(u64, usize, u32),
    /// A slice at this offset of a partly dead region.
    Region(Fp, u32),
}

impl Origin {
    /// Whether `e` (the member's entry now) is still stored there.
    fn holds(&self, e: &ChunkEntry) -> bool {
        match *self {
            Origin::Frame(seg, off, stored) => {
                e.seg == seg
                    && e.offset as usize == off
                    && e.stored == stored
                    && e.enc == Encoding::Zstd
            }
            Origin::Region(r, at) => {
                e.enc == Encoding::Slice && e.base == Some(r) && e.offset == at
            }
        }
    }
}

/// A partly dead region is rewritten (its live members into new regions)
/// once at most this share of its members lives.
const REGION_REWRITE_BELOW: f64 = 0.5;

/// Content a compression region gathers unless told (`dase clean
/// --recompress --region`). Measured on the corpus logs in 48 KiB chunks
/// at level 19 (BENCHMARKS.md): 9.41 MB alone, 8.75 in regions of 0.75 MiB,
/// 8.67 of 1.5 MiB, 8.60 of 3 MiB; reading one member at random decodes
/// its whole region (~1 ms per MiB), so the gain past a few MiB is not
/// worth it.
pub const REGION_BYTES: usize = 4 << 20;
/// The largest region (bounds the C-node's memory: decoded regions are
/// cached whole).
pub const MAX_REGION: usize = 16 << 20;

/// The zstd level `dase clean --recompress` uses unless told: the highest
/// before zstd's "ultra" levels, whose windows exceed any chunk.
pub const RECOMPRESS_LEVEL: i32 = 19;

#[derive(Debug, Default)]
pub struct CleanReport {
    pub segments: u64,
    pub chunks_moved: u64,
    pub bytes_moved: u64,
}

impl State {
    pub(super) fn require_pages(
        &mut self,
        pages: impl IntoIterator<Item = u64>,
    ) -> Result<(), FsError> {
        self.inodes.clock += 1;
        let now = self.inodes.clock;
        for p in pages {
            if let Some(p) = self.inodes.missing_page(p) {
                return Err(FsError::NotLoaded(p));
            }
            if let Some(pg) = self.inodes.pages.get_mut(&p) {
                pg.used = now;
            }
        }
        Ok(())
    }

    /// The bucket looking up `fp` must load first, if any (none when it
    /// is buffered, its bucket resident, or the bucket's filter says no).
    fn chunk_to_load(&self, fp: &Fp) -> Option<u64> {
        if self.index.chunks.contains_key(fp) {
            return None;
        }
        self.inodes
            .bucket_to_load(self.chunk_page(fp), filters::chunk_tag(fp))
    }

    fn similar_to_load(&self, sf: u64) -> Option<u64> {
        if self.index.similar.contains_key(&sf) {
            return None;
        }
        self.inodes
            .bucket_to_load(self.similar_page(sf), filters::similar_tag(sf))
    }

    /// Whether a lookup of `fp` that found nothing was answered by its
    /// bucket's filter (not buffered, the bucket not resident).
    fn chunk_filtered(&self, fp: &Fp) -> bool {
        !self.index.chunks.contains_key(fp)
            && self.inodes.missing_page(self.chunk_page(fp)).is_some()
    }

    fn similar_filtered(&self, sf: u64) -> bool {
        !self.index.similar.contains_key(&sf)
            && self.inodes.missing_page(self.similar_page(sf)).is_some()
    }

    /// The chunk-index buckets that looking up `fps` needs.
    fn chunk_pages<'a>(&self, fps: impl Iterator<Item = &'a Fp>) -> Vec<u64> {
        fps.filter_map(|f| self.chunk_to_load(f)).collect()
    }

    /// The similarity buckets that looking up `sfs` needs.
    fn similar_pages(&self, sfs: impl Iterator<Item = u64>) -> Vec<u64> {
        sfs.filter_map(|sf| self.similar_to_load(sf)).collect()
    }

    /// Loads the chunk-index buckets of `fps` (see `require_pages`).
    fn require_chunks<'a>(&mut self, fps: impl Iterator<Item = &'a Fp>) -> Result<(), FsError> {
        let pages = self.chunk_pages(fps);
        self.require_pages(pages)
    }

    /// Loads the similarity buckets of `sfs`.
    fn require_similar(&mut self, sfs: impl Iterator<Item = u64>) -> Result<(), FsError> {
        let pages = self.similar_pages(sfs);
        self.require_pages(pages)
    }

    fn chunk_page(&self, fp: &Fp) -> u64 {
        chunk_page(fp, self.counts.chunk_buckets.max(1))
    }

    fn similar_page(&self, sf: u64) -> u64 {
        similar_page(sf, self.counts.similar_buckets.max(1))
    }

    /// The chunk's entry: the buffer's, else its page's (which must then be
    /// resident or new, or its filter have said no).
    pub(super) fn chunk(&self, fp: &Fp) -> Option<&ChunkEntry> {
        match self.index.chunks.get(fp) {
            Some(e) => e.as_ref(),
            None => self.inodes.pages.get(&self.chunk_page(fp))?.chunks.get(fp),
        }
    }

    /// Changes a chunk's entry (through the buffer: its page stays clean);
    /// false if there is no such chunk.
    fn update_chunk(&mut self, fp: &Fp, f: impl FnOnce(&mut ChunkEntry)) -> bool {
        let Some(mut e) = self.chunk(fp).cloned() else {
            return false;
        };
        f(&mut e);
        self.put_chunk(*fp, Some(e));
        true
    }

    fn put_chunk(&mut self, fp: Fp, e: Option<ChunkEntry>) {
        self.index.chunks.insert(fp, e);
        self.index.changed.insert(fp);
        self.changes += 1;
    }

    fn similar(&self, sf: u64) -> Option<Fp> {
        if let Some(fp) = self.index.similar.get(&sf) {
            return Some(*fp);
        }
        self.inodes
            .pages
            .get(&self.similar_page(sf))?
            .similar
            .get(&sf)
            .copied()
    }

    fn add_similar(&mut self, sf: u64, fp: Fp) {
        self.index.similar.insert(sf, fp);
        self.index.new_similar.push(sf);
        self.counts.similar += 1;
    }

    /// The bucket pages holding the most buffered entries, at most `max`.
    fn merge_choice(&self, max: usize) -> Vec<u64> {
        let mut per: HashMap<u64, usize> = HashMap::new();
        for fp in self.index.chunks.keys() {
            *per.entry(self.chunk_page(fp)).or_default() += 1;
        }
        for sf in self.index.similar.keys() {
            *per.entry(self.similar_page(*sf)).or_default() += 1;
        }
        let mut v: Vec<(usize, u64)> = per.into_iter().map(|(p, n)| (n, p)).collect();
        v.sort_unstable_by(|a, b| b.cmp(a));
        v.into_iter().take(max).map(|(_, p)| p).collect()
    }

    /// Moves the buffered entries of `pages` (those resident) into them.
    /// The commit this is part of writes them and records the merge.
    pub(super) fn merge_into(&mut self, pages: &[u64], ing: &Ingest) {
        let pages: Vec<u64> = pages
            .iter()
            .copied()
            .filter(|&p| self.inodes.missing_page(p).is_none())
            .collect();
        if pages.is_empty() {
            return;
        }
        ing.merged_buckets
            .fetch_add(pages.len() as u64, Ordering::Relaxed);
        let set: HashSet<u64> = pages.iter().copied().collect();
        let fps: Vec<Fp> = self
            .index
            .chunks
            .keys()
            .filter(|fp| set.contains(&self.chunk_page(fp)))
            .copied()
            .collect();
        for fp in fps {
            let e = self.index.chunks.remove(&fp).unwrap();
            let pg = self.inodes.page_mut(self.chunk_page(&fp));
            match e {
                Some(e) => pg.chunks.insert(fp, e),
                None => pg.chunks.remove(&fp),
            };
        }
        let sfs: Vec<u64> = self
            .index
            .similar
            .keys()
            .filter(|sf| set.contains(&self.similar_page(**sf)))
            .copied()
            .collect();
        for sf in sfs {
            let fp = self.index.similar.remove(&sf).unwrap();
            let p = self.similar_page(sf);
            self.inodes.page_mut(p).similar.insert(sf, fp);
        }
        self.index.merged.extend_from_slice(&pages);
        self.changes += 1;
    }

    /// Where a segment's bytes are.
    fn seg_source(&self, seg: u64, offset: usize, len: usize) -> Result<Source, FsError> {
        if let Some(o) = self.open.as_ref().filter(|o| o.id == seg) {
            return Ok(Source::Mem(o.buf[offset..offset + len].into()));
        }
        if let Some(b) = self.unwritten.get(&seg) {
            return Ok(Source::Mem(b[offset..offset + len].into()));
        }
        let s = self
            .segs
            .get(&seg)
            .ok_or_else(|| FsError::Io(format!("segment {seg} is missing")))?;
        Ok(Source::Disk(s.records.clone(), offset))
    }

    /// Where chunk `e`'s stored form is (its region's entry loaded if it is
    /// a slice).
    fn chunk_where(&mut self, e: &ChunkEntry) -> Result<Where, FsError> {
        if e.enc != Encoding::Slice {
            return Ok(Where::Frame(self.chunk_source(e)?));
        }
        let r = e
            .base
            .ok_or_else(|| FsError::Io(format!("chunk {} names no region", hex(&e.fp))))?;
        self.require_chunks(std::iter::once(&r))?;
        let re = self
            .chunk(&r)
            .filter(|re| re.enc == Encoding::Region)
            .cloned()
            .ok_or_else(|| {
                FsError::Io(format!(
                    "chunk {}: its region {} is missing",
                    hex(&e.fp),
                    hex(&r)
                ))
            })?;
        if e.offset as u64 + e.len as u64 > re.len as u64 {
            return Err(FsError::Io(format!(
                "chunk {} lies outside its region",
                hex(&e.fp)
            )));
        }
        let src = self.chunk_source(&re)?;
        Ok(Where::InRegion(re, src))
    }

    fn chunk_source(&self, e: &ChunkEntry) -> Result<Source, FsError> {
        let bad = || FsError::Io(format!("chunk entry points outside segment {}", e.seg));
        let off = e.offset as usize + CHUNK_HEADER;
        let end = off.checked_add(e.stored as usize).ok_or_else(bad)?;
        match self.seg_source(e.seg, off, e.stored as usize) {
            Err(err) => Err(err),
            Ok(src) => {
                if let Some(s) = self.segs.get(&e.seg) {
                    if !s.records.is_empty() && end > s.len as usize {
                        return Err(bad());
                    }
                }
                Ok(src)
            }
        }
    }

    /// Everything needed to read chunk `fp`, loading pages as needed.
    pub(super) fn locate_chunk(&mut self, fp: &Fp) -> Result<ChunkRead, FsError> {
        self.require_chunks(std::iter::once(fp))?;
        let entry = self
            .chunk(fp)
            .cloned()
            .ok_or_else(|| FsError::Io(format!("chunk {} is missing", hex(fp))))?;
        let base = match entry.base.filter(|_| entry.enc.is_delta()) {
            None => None,
            Some(b) => Some(self.locate_reference(&b)?),
        };
        let src = self.chunk_where(&entry)?;
        Ok(ChunkRead { entry, src, base })
    }

    /// The entry of a delta's reference chunk and where it is.
    fn locate_reference(&mut self, b: &Fp) -> Result<(ChunkEntry, Where), FsError> {
        self.require_chunks(std::iter::once(b))?;
        let be = self
            .chunk(b)
            .cloned()
            .ok_or_else(|| FsError::Io(format!("reference chunk {} is missing", hex(b))))?;
        let w = self.chunk_where(&be)?;
        Ok((be, w))
    }

    /// A segment with room for `frame` bytes (sealing the open one if it
    /// has not), and the offset the frame goes to.
    fn room_for(&mut self, frame: usize, seg_bytes: usize, sealed: &mut Vec<u64>) -> (u64, usize) {
        if self
            .open
            .as_ref()
            .is_some_and(|o| o.buf.len() + frame > seg_bytes)
        {
            sealed.extend(self.seal());
        }
        let o = self.open_segment(seg_bytes);
        (o.id, o.buf.len())
    }

    /// Appends a chunk frame to the open segment; returns its entry.
    #[allow(clippy::too_many_arguments)]
    fn append_chunk(
        &mut self,
        fp: Fp,
        len: usize,
        enc: Encoding,
        base: Option<Fp>,
        stored: &[u8],
        seg_bytes: usize,
        sealed: &mut Vec<u64>,
    ) -> ChunkEntry {
        let mut e = ChunkEntry {
            fp,
            seg: 0,
            offset: 0,
            stored: stored.len() as u32,
            len: len as u32,
            enc,
            base,
            refs: 1,
        };
        (e.seg, e.offset) = self.append_frame(&e, 0, stored, seg_bytes, sealed);
        e
    }

    /// Appends the frame of `e` (header with `effort`, then `stored`) to
    /// the open segment and counts it live there; returns where it went.
    fn append_frame(
        &mut self,
        e: &ChunkEntry,
        effort: u8,
        stored: &[u8],
        seg_bytes: usize,
        sealed: &mut Vec<u64>,
    ) -> (u64, u32) {
        debug_assert_eq!(e.stored as usize, stored.len());
        let (seg, offset) = self.room_for(CHUNK_HEADER + stored.len(), seg_bytes, sealed);
        self.note_filled(seg, e.enc, effort);
        let o = self.open.as_mut().unwrap();
        o.buf.extend_from_slice(&meta::chunk_header(e, effort));
        o.buf.extend_from_slice(stored);
        let full = o.buf.len() + CHUNK_HEADER >= seg_bytes;
        self.segs.get_mut(&seg).unwrap().live += e.frame_len();
        if full {
            sealed.extend(self.seal());
        }
        (seg, offset as u32)
    }

    /// Notes a frame of `enc` at `effort` put in segment `seg` (`filled`).
    fn note_filled(&mut self, seg: u64, enc: Encoding, effort: u8) {
        if !self.track_filled {
            return;
        }
        let worth = self.filled.entry(seg).or_insert(u8::MAX);
        if PassScope::Idle.redoes(enc) {
            *worth = (*worth).min(effort);
        }
    }

    fn insert_chunk(&mut self, e: ChunkEntry) {
        self.counts.count_chunk(&e, 1);
        self.put_chunk(e.fp, Some(e));
    }

    /// Removes a chunk nothing references; returns its base, whose
    /// reference it held.
    fn remove_chunk(&mut self, fp: &Fp) -> Option<Fp> {
        let e = self.chunk(fp).cloned()?;
        self.put_chunk(*fp, None);
        self.counts.count_chunk(&e, -1);
        self.release(e.seg, e.frame_len());
        e.base
    }
}

impl State {
    /// The segments a recompression pass at `effort` reads (see
    /// [`State::written_segments`]), and the bound
    /// it has read all below when done: the oldest segment not yet
    /// written (sealed segments never change, the unwritten ones may
    /// still be filled or fail to write).
    fn pass_segments(&self, scope: PassScope, effort: u8) -> (Vec<WrittenSegment>, u64) {
        let to = self.pass_bound();
        if scope == PassScope::All {
            return (self.written_segments(|s| s.live > 0), to);
        }
        let from = if self.tail.recompressed_level >= effort {
            self.tail.recompressed_below
        } else {
            0
        };
        let segs = self
            .segs
            .iter()
            .filter(|(id, s)| {
                (from..to).contains(*id)
                    && s.live > 0
                    // Filled by this mount with nothing to redo: not read.
                    && self.filled.get(id).is_none_or(|w| *w < effort)
            })
            .map(|(id, s)| (*id, s.records.clone(), s.len, s.live))
            .collect();
        (segs, to)
    }

    /// The oldest segment not yet written, or the next to be made.
    fn pass_bound(&self) -> u64 {
        self.segs
            .iter()
            .filter(|(_, s)| s.records.is_empty())
            .map(|(id, _)| *id)
            .min()
            .unwrap_or(self.next_seg)
            .min(self.next_seg)
    }

    /// Whether an idle pass at `effort` has anything to do: segments
    /// written since the mark (it may find them all known to need nothing,
    /// and then only moves the mark, so that a later mount need not read
    /// them to learn that).
    fn pass_due(&self, effort: u8) -> bool {
        self.tail.recompressed_level < effort || self.tail.recompressed_below < self.pass_bound()
    }

    /// Records that every segment below `upto` had its chunks read by a
    /// pass at `effort`: the next idle pass at that level starts there.
    fn pass_done(&mut self, upto: u64, effort: u8) {
        let t = meta::RecordTail {
            recompressed_below: upto,
            recompressed_level: effort,
        };
        if self.tail != t {
            self.tail = t;
            self.filled.retain(|id, _| *id >= upto);
            self.changes += 1;
        }
    }

    /// Segments on the D-nodes (not the open one) that `keep` accepts:
    /// `(id, stripes, length, live bytes)`, the input of the passes that
    /// walk segments' frames (cleaner, recompression).
    fn written_segments(&self, keep: impl Fn(&Segment) -> bool) -> Vec<WrittenSegment> {
        let open = self.open.as_ref().map(|o| o.id);
        self.segs
            .iter()
            .filter(|(id, s)| Some(**id) != open && !s.records.is_empty() && keep(s))
            .map(|(id, s)| (*id, s.records.clone(), s.len, s.live))
            .collect()
    }
}

/// The chunk frames of a segment's bytes, in order: `(offset, fingerprint,
/// end)`, up to the first that is not one (the unused tail).
fn segment_frames(bytes: &[u8]) -> Vec<(usize, Fp, usize)> {
    let mut frames = Vec::new();
    let mut off = 0usize;
    while let Some((fp, stored)) = meta::parse_chunk_header(&bytes[off..]) {
        let end = off + CHUNK_HEADER + stored as usize;
        if end > bytes.len() {
            break;
        }
        frames.push((off, fp, end));
        off = end;
    }
    frames
}

/// Whether decoded content (`got`, its fingerprint) is what `fp` names:
/// else the read fails rather than return other bytes.
fn verified(what: &str, fp: &Fp, got: Fp) -> Result<(), FsError> {
    if got == *fp {
        return Ok(());
    }
    Err(FsError::Io(format!(
        "{what} {}: content does not match its fingerprint",
        hex(fp)
    )))
}

/// Checks a compression region size (`dase clean --recompress --region`):
/// 0 (none) or from two of the largest chunks of average `avg_chunk`
/// (smaller makes no region) to [`MAX_REGION`].
pub fn check_region_bytes(n: usize, avg_chunk: u32) -> Result<(), String> {
    let least = 2 * reduce::max_chunk(avg_chunk) as usize;
    if n == 0 || (least..=MAX_REGION).contains(&n) {
        return Ok(());
    }
    Err(format!(
        "compression regions hold {least} to {MAX_REGION} bytes (0: none), not {n}"
    ))
}

pub(super) fn hex(fp: &Fp) -> String {
    fp[..8].iter().map(|b| format!("{b:02x}")).collect()
}

impl FileSystem {
    pub fn reduce(&self) -> Reduce {
        self.state.lock().unwrap().reduce
    }

    fn writer(&self, ino: u64) -> Writer {
        self.writers.lock().unwrap().entry(ino).or_default().clone()
    }

    fn writer_if_any(&self, ino: u64) -> Option<Writer> {
        self.writers.lock().unwrap().get(&ino).cloned()
    }

    /// Writes `data` at `offset` of file `ino` in a reducing file system:
    /// into the file's pending buffer, chunking what has gathered.
    pub async fn write_reduced(&self, ino: u64, offset: u64, data: &[u8]) -> Result<(), FsError> {
        self.check_writable()?;
        let end = super::file_end(offset, data.len())?;
        self.ingest.writes.fetch_add(1, Ordering::Release);
        let w = self.writer(ino);
        let mut p = w.lock().await;
        self.with_state(|st| {
            st.require(&[ino])?;
            let i = st.inodes.get_mut(&ino).ok_or(FsError::NotFound)?;
            match i.kind {
                Kind::Dir => return Err(FsError::IsDir),
                Kind::Symlink => return Err(FsError::Invalid("writing a symlink".into())),
                Kind::File => {}
            }
            let t = now_ns();
            let grew = end.saturating_sub(i.size);
            i.size += grew;
            i.mtime = t;
            i.ctime = t;
            st.counts.logical_bytes += grew;
            st.touch(ino);
            Ok(())
        })
        .await?;
        let contiguous = p.start + p.buf.len() as u64 == offset;
        if !p.buf.is_empty() && (!contiguous || p.buf.len() + data.len() > 2 * PENDING_HIGH) {
            self.flush_pending(ino, &mut p, true).await?;
        }
        if p.buf.is_empty() {
            p.start = offset;
        }
        p.buf.extend_from_slice(data);
        if p.buf.len() >= PENDING_HIGH {
            self.flush_pending(ino, &mut p, false).await?;
        }
        Ok(())
    }

    /// Chunks and stores a file's pending bytes: all of them, or (`all`
    /// false) up to the last content-defined cut, keeping the tail for the
    /// bytes that follow. On failure the bytes stay pending.
    async fn flush_pending(&self, ino: u64, p: &mut Pending, all: bool) -> Result<(), FsError> {
        if p.buf.is_empty() {
            return Ok(());
        }
        let mut cuts = reduce::chunks_of_size(&p.buf, self.sb.avg_chunk());
        if !all && cuts.len() > 1 {
            cuts.pop();
        }
        let done = cuts.last().map(|c| c.offset + c.len).unwrap_or(0);
        // All at once: BLAKE3's SIMD lanes are filled across chunks, and
        // the more chunks the fewer lanes idle.
        let mut fps = Vec::with_capacity(cuts.len());
        reduce::fingerprints(&p.buf, cuts.iter().map(|c| (c.offset, c.len)), &mut fps);
        for (batch, fps) in cuts.chunks(BATCH_CHUNKS).zip(fps.chunks(BATCH_CHUNKS)) {
            self.store_chunks(ino, p.start, &p.buf, batch, fps).await?;
        }
        p.buf.drain(..done);
        p.start += done as u64;
        if p.buf.is_empty() {
            p.buf = Vec::new();
        }
        Ok(())
    }

    /// Stores a file's pending bytes (before a read of them is not needed:
    /// reads see pending bytes; before truncation, release and commit).
    pub(super) async fn flush_file(&self, ino: u64) -> Result<(), FsError> {
        let Some(w) = self.writer_if_any(ino) else {
            return Ok(());
        };
        let mut p = w.lock().await;
        self.flush_pending(ino, &mut p, true).await
    }

    /// Flushes every file's pending bytes and forgets closed files' buffers.
    pub(super) async fn flush_all_pending(&self) -> Result<(), FsError> {
        let all: Vec<(u64, Writer)> = self
            .writers
            .lock()
            .unwrap()
            .iter()
            .map(|(i, w)| (*i, w.clone()))
            .collect();
        for (ino, w) in all {
            let mut p = w.lock().await;
            self.flush_pending(ino, &mut p, true).await?;
        }
        Ok(())
    }

    /// Drops the writer of a file no longer open (after its bytes are stored).
    pub(super) async fn forget_writer(&self, ino: u64) -> Result<(), FsError> {
        self.flush_file(ino).await?;
        let mut w = self.writers.lock().unwrap();
        if let Some(x) = w.get(&ino) {
            // Only if nobody holds it meanwhile.
            if Arc::strong_count(x) == 1 {
                w.remove(&ino);
            }
        }
        Ok(())
    }

    /// Looks up, encodes and stores one batch of chunks of `buf` (at file
    /// offset `start`), then points the file at them.
    async fn store_chunks(
        &self,
        ino: u64,
        start: u64,
        buf: &[u8],
        cuts: &[reduce::Chunk],
        fps: &[Fp],
    ) -> Result<(), FsError> {
        let mode = self.reduce();
        let full = mode == Reduce::Full;
        // Sketches come with the cut points, for every chunk (the chunker's
        // hash picks the samples), and are used for the new ones, even
        // incompressible: archives of compressed members (wheels, zips) are
        // high-entropy yet near-identical between versions, which only a
        // delta finds.
        let cands: Vec<Cand> = cuts
            .iter()
            .zip(fps)
            .map(|(c, &fp)| Cand {
                off: c.offset,
                len: c.len,
                fp,
                sketch: if full { c.sketch } else { None },
                numbers: c.numbers,
            })
            .collect();
        let ing = &self.ingest;
        ing.chunks.fetch_add(cands.len() as u64, Ordering::Relaxed);
        ing.bytes
            .fetch_add(cuts.iter().map(|c| c.len as u64).sum(), Ordering::Relaxed);
        // Lookups: exact first, then similar for what is new; the buckets
        // they need are fetched together first.
        let pages = self
            .state
            .lock()
            .unwrap()
            .chunk_pages(cands.iter().map(|c| &c.fp));
        self.prefetch_pages(pages).await;
        let pages = {
            // Those known new (their bucket resident, no entry) look for
            // similar chunks.
            let st = self.state.lock().unwrap();
            st.similar_pages(
                cands
                    .iter()
                    .filter(|c| st.chunk_to_load(&c.fp).is_none() && st.chunk(&c.fp).is_none())
                    .flat_map(|c| c.sketch.into_iter().flatten()),
            )
        };
        self.prefetch_pages(pages).await;
        let plans = self
            .with_state(|st| {
                st.require_chunks(cands.iter().map(|c| &c.fp))?;
                let sfs: Vec<u64> = cands
                    .iter()
                    .filter(|c| st.chunk(&c.fp).is_none())
                    .flat_map(|c| c.sketch.into_iter().flatten())
                    .collect();
                st.require_similar(sfs.into_iter())?;
                let mut plans = Vec::with_capacity(cands.len());
                let mut batch_sf: HashMap<u64, usize> = HashMap::new();
                let mut seen: HashSet<Fp> = HashSet::new();
                let mut lookups = cands.len() as u64;
                let mut filtered = 0;
                for (i, c) in cands.iter().enumerate() {
                    if st.chunk(&c.fp).is_some() || !seen.insert(c.fp) {
                        plans.push(Plan::Duplicate);
                        continue;
                    }
                    filtered += u64::from(st.chunk_filtered(&c.fp));
                    let mut plan = Plan::New;
                    for sf in c.sketch.into_iter().flatten() {
                        lookups += 1;
                        if let Some(&j) = batch_sf.get(&sf) {
                            plan = Plan::AgainstBatch(j);
                            break;
                        }
                        let Some(b) = st.similar(sf) else {
                            filtered += u64::from(st.similar_filtered(sf));
                            continue;
                        };
                        if b == c.fp {
                            continue;
                        }
                        let r = st.locate_chunk(&b);
                        match r {
                            Ok(r) if r.entry.enc.can_be_reference() => {
                                plan = Plan::Against(Box::new(r));
                                break;
                            }
                            Err(FsError::NotLoaded(p)) => return Err(FsError::NotLoaded(p)),
                            _ => {}
                        }
                    }
                    if matches!(plan, Plan::New) {
                        for sf in c.sketch.into_iter().flatten() {
                            batch_sf.entry(sf).or_insert(i);
                        }
                    }
                    plans.push(plan);
                }
                ing.lookups.fetch_add(lookups, Ordering::Relaxed);
                ing.filtered.fetch_add(filtered, Ordering::Relaxed);
                Ok(plans)
            })
            .await?;
        let bases = self.fetch_references(&plans).await?;
        // Encode.
        let mut enc = Encoder::new(reduce::LEVEL);
        let mut out: Vec<(Encoding, Option<Fp>, Vec<u8>)> = Vec::with_capacity(cands.len());
        let mut scratch = Vec::new();
        for (c, plan) in cands.iter().zip(&plans) {
            let d = &buf[c.off..c.off + c.len];
            let base: Option<(Fp, &[u8])> = match plan {
                Plan::Duplicate => {
                    out.push((Encoding::Raw, None, Vec::new()));
                    continue;
                }
                Plan::Against(r) => Some((r.entry.fp, &bases[&r.entry.fp][..])),
                Plan::AgainstBatch(j) => {
                    let b = &cands[*j];
                    Some((b.fp, &buf[b.off..b.off + b.len]))
                }
                Plan::New => None,
            };
            let r = match mode {
                Reduce::Full => {
                    // Only new chunks are checked: a duplicate's bytes are
                    // never encoded.
                    let kind = reduce::Kind {
                        numbers: c.numbers,
                        incompressible: reduce::looks_incompressible(d),
                    };
                    let e = enc.encode(d, base.map(|b| b.1), kind, &mut scratch);
                    let reference = base.filter(|_| e.is_delta()).map(|b| b.0);
                    (e, reference, std::mem::take(&mut scratch))
                }
                _ => (Encoding::Raw, None, Vec::new()),
            };
            out.push(r);
        }
        // The index buffer is the write path's memory: past its bound,
        // merge before adding more.
        if self.state.lock().unwrap().index.len() > self.opts.index_buffer.saturating_mul(4) {
            let _waited = Held(std::time::Instant::now(), &ing.merge_wait_us);
            while self.state.lock().unwrap().index.len() > self.opts.index_buffer.saturating_mul(4)
            {
                self.commit_changes().await?;
            }
        }
        // Insert, holding writers' side of the commit lock.
        let _guard = self.quiesce.read().await;
        let seg_bytes = self.seg_bytes;
        let sealed = self
            .with_state(|st| {
                st.require(&[ino])?;
                st.require_chunks(
                    cands
                        .iter()
                        .map(|c| &c.fp)
                        .chain(out.iter().filter_map(|o| o.1.as_ref())),
                )?;
                st.require_similar(cands.iter().flat_map(|c| c.sketch.into_iter().flatten()))?;
                if !st
                    .inodes
                    .get(&ino)
                    .is_some_and(|i| matches!(i.content, Content::File(_)))
                {
                    // Deleted meanwhile: the bytes are nobody's.
                    return Ok(Vec::new());
                }
                let mut sealed = Vec::new();
                let mut dead = Vec::new();
                for (c, (enc, base, stored)) in cands.iter().zip(&out) {
                    if st.update_chunk(&c.fp, |e| e.refs = e.refs.saturating_add(1)) {
                        ing.duplicates.fetch_add(1, Ordering::Relaxed);
                    } else {
                        // Raw chunks come from the buffer itself (and so do
                        // planned duplicates whose original went meanwhile,
                        // and deltas whose reference chunk did).
                        let raw = &buf[c.off..c.off + c.len];
                        let (enc, base, stored): (Encoding, Option<Fp>, &[u8]) = match (enc, base) {
                            (Encoding::Raw, _) => (Encoding::Raw, None, raw),
                            (_, Some(b))
                                if st.chunk(b).is_none_or(|e| !e.enc.can_be_reference()) =>
                            {
                                (Encoding::Raw, None, raw)
                            }
                            _ => (*enc, *base, &stored[..]),
                        };
                        if let Some(b) = base {
                            st.update_chunk(&b, |be| be.refs = be.refs.saturating_add(1));
                        }
                        let e =
                            st.append_chunk(c.fp, c.len, enc, base, stored, seg_bytes, &mut sealed);
                        match enc {
                            Encoding::Raw => &ing.raw,
                            Encoding::Zstd | Encoding::Planes => &ing.compressed,
                            _ => &ing.deltas,
                        }
                        .fetch_add(1, Ordering::Relaxed);
                        st.insert_chunk(e);
                        if base.is_none() {
                            for sf in c.sketch.into_iter().flatten() {
                                if st.similar(sf).is_none() {
                                    st.add_similar(sf, c.fp);
                                }
                            }
                        }
                    }
                    let i = st.inodes.get_mut(&ino).unwrap();
                    if let Content::File(map) = &mut i.content {
                        let e = Extent {
                            at: Place::Chunk(c.fp),
                            offset: 0,
                            len: c.len as u32,
                        };
                        insert_extent(map, start + c.off as u64, e, &mut dead);
                    }
                }
                for u in dead {
                    st.unref(u);
                }
                st.touch(ino);
                Ok(sealed)
            })
            .await?;
        self.write_segments(&sealed).await?;
        drop(_guard);
        self.grow_indexes().await
    }

    /// Splits index buckets until both tables are within their load.
    async fn grow_indexes(&self) -> Result<(), FsError> {
        loop {
            let grew = self
                .with_state(|st| {
                    let c = st.counts;
                    let n = c.chunk_buckets.max(1);
                    if c.chunks > n * meta::CHUNKS_PER_BUCKET {
                        let src = meta::CHUNK_PAGES | meta::split_source(n);
                        st.require_pages([src])?;
                        let moved: Vec<ChunkEntry> = {
                            let pg = st.inodes.page_mut(src);
                            let keys: Vec<Fp> = pg
                                .chunks
                                .keys()
                                .filter(|f| meta::bucket(meta::fp_hash(f), n + 1) == n)
                                .copied()
                                .collect();
                            keys.iter().filter_map(|k| pg.chunks.remove(k)).collect()
                        };
                        let dst = st.inodes.page_mut(meta::CHUNK_PAGES | n);
                        dst.chunks.extend(moved.into_iter().map(|e| (e.fp, e)));
                        st.counts.chunk_buckets = n + 1;
                        st.changes += 1;
                        return Ok(true);
                    }
                    let n = c.similar_buckets.max(1);
                    if c.similar > n * meta::SIMILAR_PER_BUCKET {
                        let src = meta::SIMILAR_PAGES | meta::split_source(n);
                        st.require_pages([src])?;
                        let moved: Vec<(u64, Fp)> = {
                            let pg = st.inodes.page_mut(src);
                            let keys: Vec<u64> = pg
                                .similar
                                .keys()
                                .filter(|&&sf| meta::bucket(sf, n + 1) == n)
                                .copied()
                                .collect();
                            keys.iter()
                                .filter_map(|k| pg.similar.remove(k).map(|v| (*k, v)))
                                .collect()
                        };
                        let dst = st.inodes.page_mut(meta::SIMILAR_PAGES | n);
                        dst.similar.extend(moved);
                        st.counts.similar_buckets = n + 1;
                        st.changes += 1;
                        return Ok(true);
                    }
                    Ok(false)
                })
                .await?;
            if !grew {
                return Ok(());
            }
        }
    }

    /// Chooses the buckets holding the most buffered index entries and
    /// loads their pages (in parallel, writers still running); the commit
    /// then merges those still resident in the same step as its snapshot,
    /// so no bucket split or index change falls between merge and record.
    pub(super) async fn load_merge_pages(&self) -> Result<Vec<u64>, FsError> {
        let pages = self
            .state
            .lock()
            .unwrap()
            .merge_choice(merge_pages(self.opts.cache_pages));
        for r in join_all(pages.iter().map(|&p| self.load_page(p, &pages))).await {
            r?;
        }
        Ok(pages)
    }

    /// Folds the whole index buffer into the buckets, a commit per
    /// [`merge_pages`] buckets.
    /// (`dase clean` does, after cleaning; the background cleaner does not.)
    pub async fn merge_index(&self) -> Result<(), FsError> {
        /// Clears the flag however the fold ends (dropped too: left set,
        /// every later commit would merge).
        struct Folding<'a>(&'a AtomicBool);
        impl Drop for Folding<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Relaxed);
            }
        }
        self.merge_all.store(true, Ordering::Relaxed);
        let _folding = Folding(&self.merge_all);
        async {
            // Writers may keep adding entries: stop after a pass's worth.
            let mut rounds = {
                let st = self.state.lock().unwrap();
                st.merge_choice(usize::MAX).len() / merge_pages(self.opts.cache_pages) + 2
            };
            while rounds > 0 && self.state.lock().unwrap().index.len() > 0 {
                self.commit_changes().await?;
                rounds -= 1;
            }
            Ok(())
        }
        .await
    }

    /// Applies the queued reference changes to the chunk index, freeing
    /// chunks nothing references any more.
    pub(super) async fn apply_ref_changes(&self) -> Result<(), FsError> {
        loop {
            let done = self
                .with_state(|st| {
                    if st.ref_changes.is_empty() {
                        return Ok(true);
                    }
                    let n = st.ref_changes.len().min(REF_BATCH);
                    let mut net: BTreeMap<Fp, i64> = BTreeMap::new();
                    for (fp, d) in &st.ref_changes[..n] {
                        *net.entry(*fp).or_default() += *d as i64;
                    }
                    st.require_chunks(net.keys())?;
                    let mut freed_bases = Vec::new();
                    for (fp, d) in net {
                        let Some(e) = st.chunk(&fp) else {
                            tracing::warn!(chunk = %hex(&fp), "reference change for a chunk not in the index");
                            continue;
                        };
                        let refs = e.refs as i64 + d;
                        if refs > 0 {
                            st.update_chunk(&fp, |e| e.refs = refs.min(u32::MAX as i64) as u32);
                        } else if let Some(b) = st.remove_chunk(&fp) {
                            freed_bases.push((b, -1));
                        }
                    }
                    st.ref_changes.drain(..n);
                    st.ref_changes.extend(freed_bases);
                    st.changes += 1;
                    Ok(false)
                })
                .await?;
            if done {
                return Ok(());
            }
        }
    }

    /// Reads, decodes and verifies one chunk.
    pub(super) async fn fetch_chunk(&self, r: &ChunkRead) -> Result<Vec<u8>, FsError> {
        let Some((be, bw)) = &r.base else {
            return self.decode_chunk(&r.entry, &r.src, None, true).await;
        };
        let cached = self.references.lock().unwrap().get(&be.fp);
        if let Some(c) = cached {
            let got = self.decode_chunk(&r.entry, &r.src, Some(&c), true).await;
            if got.is_ok() {
                self.ingest.reference_hits.fetch_add(1, Ordering::Relaxed);
                return got;
            }
            // The delta or the cached reference is bad: decoding both
            // afresh says which.
            self.reject_cached_reference(&be.fp);
        }
        // The delta's fingerprint vouches for its reference too (a wrong
        // reference cannot decode to the right content), so the reference
        // is hashed on its own only when the delta's check fails, to say
        // which chunk is damaged: one BLAKE3 pass per delta read, not two.
        // Its strips passed their checksums, so a reference found wrong
        // went bad after they were read (in memory): it is fetched once
        // more before the read fails.
        for again in [false, true] {
            let base = self.fetch_reference(be, bw).await?;
            let e = match self.decode_chunk(&r.entry, &r.src, Some(&base), true).await {
                Err(e) => e,
                ok => {
                    self.references
                        .lock()
                        .unwrap()
                        .insert(be.fp, Arc::new(base));
                    return ok;
                }
            };
            let got = reduce::fingerprint(&base);
            if got == be.fp {
                return Err(e);
            }
            if again {
                verified("reference chunk", &be.fp, got)?;
            }
            self.ingest
                .references_rejected
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                reference = %hex(&be.fp),
                "a reference chunk read from the D-nodes does not match its fingerprint; reading it again"
            );
        }
        unreachable!("the second pass returns")
    }

    /// A reference chunk read from where `w` says and decoded, unchecked.
    async fn fetch_reference(&self, be: &ChunkEntry, w: &Where) -> Result<Vec<u8>, FsError> {
        let mut base = self.decode_chunk(be, w, None, false).await?;
        self.ingest
            .references_fetched
            .fetch_add(1, Ordering::Relaxed);
        let damage = &self.damage_fetched;
        if damage
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
        {
            // Throughout: a delta need not use every byte of its reference.
            for b in base.iter_mut().step_by(509) {
                *b ^= 0x55;
            }
        }
        Ok(base)
    }

    /// Fault injection for tests: damages the next `n` reference chunks
    /// fetched from the D-nodes, in memory, before the deltas on them are
    /// decoded.
    #[doc(hidden)]
    pub fn damage_fetched_references(&self, n: usize) {
        self.damage_fetched.store(n, Ordering::Relaxed);
    }

    /// Drops a cached reference found not to be what its fingerprint says.
    fn reject_cached_reference(&self, fp: &Fp) {
        self.references.lock().unwrap().remove(fp);
        self.ingest
            .references_rejected
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            reference = %hex(fp),
            "a cached reference chunk failed its check (memory, or the delta on it); fetching both again"
        );
    }

    /// The decoded content of the references `plans` name, each checked
    /// against its fingerprint: a write builds new deltas on them. From
    /// the reference cache where it holds them (hashed again: a bad entry
    /// would spoil every delta built on it), the others fetched together
    /// (independent reads, each a round trip).
    async fn fetch_references(&self, plans: &[Plan]) -> Result<HashMap<Fp, Arc<Vec<u8>>>, FsError> {
        let mut bases: HashMap<Fp, Arc<Vec<u8>>> = HashMap::new();
        let mut missing: Vec<&ChunkRead> = Vec::new();
        for p in plans {
            let Plan::Against(r) = p else { continue };
            let fp = r.entry.fp;
            if bases.contains_key(&fp) || missing.iter().any(|m| m.entry.fp == fp) {
                continue;
            }
            let cached = self.references.lock().unwrap().get(&fp);
            match cached {
                Some(c) if reduce::fingerprint(&c) == fp => {
                    self.ingest.reference_hits.fetch_add(1, Ordering::Relaxed);
                    bases.insert(fp, c);
                }
                Some(_) => {
                    self.reject_cached_reference(&fp);
                    missing.push(r);
                }
                None => missing.push(r),
            }
        }
        let fetched = join_all(missing.iter().map(|r| self.fetch_chunk(r))).await;
        self.ingest
            .references_fetched
            .fetch_add(missing.len() as u64, Ordering::Relaxed);
        for (r, b) in missing.iter().zip(fetched) {
            // A reference is no delta: `fetch_chunk` checked it.
            let b = Arc::new(b?);
            self.references
                .lock()
                .unwrap()
                .insert(r.entry.fp, b.clone());
            bases.insert(r.entry.fp, b);
        }
        Ok(bases)
    }

    /// Fault injection for tests: damages every cached reference chunk
    /// ([`crate::reduce::ReferenceCache::damage`]). Returns how many.
    #[doc(hidden)]
    pub fn damage_reference_cache(&self) -> usize {
        self.references.lock().unwrap().damage()
    }

    /// Decodes a chunk, and verifies its fingerprint if `verify`.
    async fn decode_chunk(
        &self,
        e: &ChunkEntry,
        w: &Where,
        base: Option<&[u8]>,
        verify: bool,
    ) -> Result<Vec<u8>, FsError> {
        let src = match w {
            Where::Frame(src) => src,
            Where::InRegion(re, src) => {
                let content = self.region_content(re, src).await?;
                let out = content
                    .get(e.offset as usize..e.offset as usize + e.len as usize)
                    .ok_or_else(|| {
                        FsError::Io(format!("chunk {} lies outside its region", hex(&e.fp)))
                    })?
                    .to_vec();
                if verify {
                    verified("chunk", &e.fp, reduce::fingerprint(&out))?;
                }
                return Ok(out);
            }
        };
        self.decode_frame(e, src, base, verify).await
    }

    /// A region's content, decoded and verified once for all its readers.
    async fn region_content(&self, re: &ChunkEntry, src: &Source) -> Result<Arc<Vec<u8>>, FsError> {
        let cell = self.regions.lock().unwrap().slot(&re.fp);
        let content = cell
            .get_or_try_init(|| async {
                let stored = self.frame_bytes(re, src).await?;
                let (fp, len) = (re.fp, re.len as usize);
                // Decoding megabytes is CPU work: off the async threads.
                tokio::task::spawn_blocking(move || {
                    let mut out = Vec::new();
                    reduce::decode(Encoding::Region, &stored, None, len, &mut out)
                        .map_err(|err| FsError::Io(format!("region {}: {err}", hex(&fp))))?;
                    verified("region", &fp, reduce::region_fingerprint(&out))?;
                    Ok::<_, FsError>(Arc::new(out))
                })
                .await
                .map_err(|e| FsError::Io(format!("region decoding task: {e}")))?
            })
            .await?;
        Ok(content.clone())
    }

    async fn frame_bytes(&self, e: &ChunkEntry, src: &Source) -> Result<Arc<[u8]>, FsError> {
        Ok(match src {
            Source::Mem(b) => b.clone(),
            Source::Disk(records, off) => self
                .read_segment_range(records, *off, e.stored as usize)
                .await?
                .into(),
        })
    }

    /// Decodes a chunk's own frame (and verifies it if `verify`).
    async fn decode_frame(
        &self,
        e: &ChunkEntry,
        src: &Source,
        base: Option<&[u8]>,
        verify: bool,
    ) -> Result<Vec<u8>, FsError> {
        let stored = self.frame_bytes(e, src).await?;
        let mut out = Vec::with_capacity(e.len as usize);
        reduce::decode(e.enc, &stored, base, e.len as usize, &mut out)
            .map_err(|err| FsError::Io(format!("chunk {}: {err}", hex(&e.fp))))?;
        if verify {
            verified("chunk", &e.fp, reduce::fingerprint(&out))?;
        }
        Ok(out)
    }

    /// A written segment's first `len` bytes, or None if it was freed or
    /// moved since `records` were taken (a pass over segments reads them
    /// without the state lock; a freed segment's stripes may be reused, so
    /// a failed read of one is not an error).
    async fn read_written_segment(
        &self,
        seg: u64,
        records: &[StripeRecord],
        len: u32,
    ) -> Result<Option<Vec<u8>>, FsError> {
        let r = self.read_segment_range(records, 0, len as usize).await;
        let same = self
            .state
            .lock()
            .unwrap()
            .segs
            .get(&seg)
            .is_some_and(|s| s.records == records);
        match r {
            Ok(b) => Ok(Some(b)),
            Err(_) if !same => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Whether chunk `e` is no longer stored where its entry said (moved,
    /// recompressed, put in a region, or freed).
    fn moved_since(&self, e: &ChunkEntry) -> bool {
        let st = self.state.lock().unwrap();
        st.chunk(&e.fp).is_none_or(|now| {
            (now.seg, now.offset, now.stored, now.enc) != (e.seg, e.offset, e.stored, e.enc)
        })
    }

    /// Bytes `[off, off + len)` of a written segment.
    pub(super) async fn read_segment_range(
        &self,
        records: &[StripeRecord],
        off: usize,
        len: usize,
    ) -> Result<Vec<u8>, FsError> {
        let s = self.data.geometry().strip_size();
        let mut reads = Vec::new();
        let mut base = 0usize;
        for r in records {
            let cap = r.k as usize * s;
            let lo = off.max(base);
            let hi = (off + len).min(base + cap);
            if lo < hi {
                reads.push((lo - off, r, lo - base, hi - lo));
            }
            base += cap;
        }
        if base < off + len {
            return Err(FsError::Io("read beyond a segment's stripes".into()));
        }
        let mut out = vec![0u8; len];
        let results = join_all(
            reads
                .iter()
                .map(|&(at, r, o, n)| async move { (at, self.data.read(r, o, n).await) }),
        )
        .await;
        for (at, r) in results {
            let b = r?;
            out[at..at + b.len()].copy_from_slice(&b);
        }
        Ok(out)
    }

    /// Reads the chunks `jobs` name into `out`: `(at, offset in chunk,
    /// len, chunk)`.
    pub(super) async fn read_chunks(
        &self,
        out: &mut [u8],
        jobs: Vec<(usize, usize, usize, ChunkRead)>,
    ) -> Result<(), FsError> {
        let results = join_all(jobs.iter().map(|(_, _, _, r)| self.fetch_chunk(r))).await;
        for ((at, o, n, job), r) in jobs.iter().zip(results) {
            let b = match r {
                Ok(b) => b,
                Err(e) => self.fetch_again(job, e).await?,
            };
            let src = b
                .get(*o..*o + *n)
                .ok_or_else(|| FsError::Io("extent beyond its chunk".into()))?;
            out[*at..*at + *n].copy_from_slice(src);
        }
        Ok(())
    }

    /// A chunk whose read failed, read again from where its entry (and
    /// its reference's) now say, if they moved meanwhile: the cleaner, a
    /// recompression pass or a region may move a chunk between the lookup
    /// and the read, and the old stripes may be reused once the move is
    /// committed. A failure where nothing moved is the error it was.
    async fn fetch_again(&self, r: &ChunkRead, err: FsError) -> Result<Vec<u8>, FsError> {
        let mut r = r.clone();
        let mut err = err;
        for _ in 0..3 {
            let moved = self.moved_since(&r.entry)
                || r.base.as_ref().is_some_and(|(be, _)| self.moved_since(be))
                || matches!(&r.src, Where::InRegion(re, _) if self.moved_since(re));
            if !moved {
                return Err(err);
            }
            let fp = r.entry.fp;
            r = self.with_state(|st| st.locate_chunk(&fp)).await?;
            match self.fetch_chunk(&r).await {
                Ok(b) => return Ok(b),
                Err(e) => err = e,
            }
        }
        Err(err)
    }

    /// Pending bytes of `ino` over `[offset, offset + out.len())`, copied
    /// into `out` (they are newer than anything in the extent map).
    pub(super) fn overlay_pending(p: &Pending, offset: u64, out: &mut [u8]) {
        let lo = p.start.max(offset);
        let hi = (p.start + p.buf.len() as u64).min(offset + out.len() as u64);
        if lo < hi {
            let n = (hi - lo) as usize;
            out[(lo - offset) as usize..][..n]
                .copy_from_slice(&p.buf[(lo - p.start) as usize..][..n]);
        }
    }

    pub(super) async fn pending_guard(
        &self,
        ino: u64,
    ) -> Option<tokio::sync::OwnedMutexGuard<Pending>> {
        Some(self.writer_if_any(ino)?.lock_owned().await)
    }

    /// Moves the live chunks out of written segments at most `max_live`
    /// live (a fraction), so the segments free at the next commit.
    pub async fn clean(&self, max_live: f64) -> Result<CleanReport, FsError> {
        self.check_writable()?;
        // Rebuilds replace segments' stripes: not while their chunks move.
        let one = self.rebuilding.lock().await;
        self.clean_holding(max_live, one).await
    }

    /// [`FileSystem::clean`] unless a rebuild or a recompression pass is
    /// running (None): the background loop, which also renews the lease
    /// and commits, must never wait for one of those to end.
    pub(super) async fn clean_if_free(
        &self,
        max_live: f64,
    ) -> Option<Result<CleanReport, FsError>> {
        if let Err(e) = self.check_writable() {
            return Some(Err(e));
        }
        let one = self.rebuilding.try_lock().ok()?;
        Some(self.clean_holding(max_live, one).await)
    }

    async fn clean_holding(
        &self,
        max_live: f64,
        _one: tokio::sync::MutexGuard<'_, ()>,
    ) -> Result<CleanReport, FsError> {
        self.apply_ref_changes().await?;
        let mut candidates = self
            .state
            .lock()
            .unwrap()
            .written_segments(|s| s.len > 0 && (s.live as f64) <= max_live * s.len as f64);
        candidates.sort_by_key(|x| x.3);
        let mut rep = CleanReport::default();
        for (seg, records, len, _) in candidates {
            let Some(bytes) = self.read_written_segment(seg, &records, len).await? else {
                continue; // freed or moved meanwhile
            };
            let frames = segment_frames(&bytes);
            let _guard = self.quiesce.read().await;
            let seg_bytes = self.seg_bytes;
            let (sealed, moved, mbytes) = self
                .with_state(|st| {
                    st.require_chunks(frames.iter().map(|f| &f.1))?;
                    if !st.segs.get(&seg).is_some_and(|s| s.records == records) {
                        return Ok((Vec::new(), 0, 0)); // moved or freed meanwhile
                    }
                    let mut sealed = Vec::new();
                    let (mut moved, mut mbytes) = (0u64, 0u64);
                    for &(o, fp, end) in &frames {
                        let Some(enc) = st
                            .chunk(&fp)
                            .filter(|e| e.seg == seg && e.offset as usize == o)
                            .map(|e| e.enc)
                        else {
                            continue;
                        };
                        let frame = &bytes[o..end];
                        let (nseg, noff) = st.room_for(frame.len(), seg_bytes, &mut sealed);
                        st.note_filled(nseg, enc, meta::frame_effort(frame));
                        st.open.as_mut().unwrap().buf.extend_from_slice(frame);
                        st.segs.get_mut(&nseg).unwrap().live += frame.len() as u64;
                        st.update_chunk(&fp, |e| {
                            e.seg = nseg;
                            e.offset = noff as u32;
                        });
                        st.release(seg, frame.len() as u64);
                        moved += 1;
                        mbytes += frame.len() as u64;
                    }
                    st.changes += 1;
                    Ok((sealed, moved, mbytes))
                })
                .await?;
            self.write_segments(&sealed).await?;
            rep.segments += 1;
            rep.chunks_moved += moved;
            rep.bytes_moved += mbytes;
            self.ingest.cleaned_segments.fetch_add(1, Ordering::Relaxed);
            self.ingest.moved_bytes.fetch_add(mbytes, Ordering::Relaxed);
        }
        Ok(rep)
    }

    /// Stores cold data again at zstd `level`: the write path compresses
    /// each chunk at level 1, alone, to keep up with ingest; cold data can
    /// afford the highest levels and the history of its neighbours.
    ///
    /// Plain compressed chunks are gathered, in segment order (write order),
    /// into *compression regions* of about `region_bytes` of content
    /// compressed as one (0: none, each chunk alone); a region that saves
    /// under 1/32 of its members' stored bytes is not made. Deltas keep
    /// their encoding and reference and are recompressed one by one (as
    /// are plain chunks without regions), where that saves 1/32. New
    /// frames go to the open segment like a cleaner's moves: old bytes die
    /// and free with their segment after the commit that records the move,
    /// so a crash at any point leaves the previous commit's chunks in
    /// force. Frames a pass wrote carry its level, so a later pass at that
    /// level passes them by; `progress(done, total)` counts segments.
    pub async fn recompress(
        &self,
        level: i32,
        region_bytes: usize,
        scope: PassScope,
        progress: impl Fn(u64, u64),
    ) -> Result<RecompressReport, FsError> {
        self.check_writable()?;
        if !(1..=22).contains(&level) {
            return Err(FsError::Invalid(format!(
                "zstd level {level}: the levels are 1 to 22"
            )));
        }
        check_region_bytes(region_bytes, self.sb.avg_chunk()).map_err(FsError::Invalid)?;
        let effort = level as u8;
        // Rebuilds replace segments' stripes: not while their chunks move.
        let _one = self.rebuilding.lock().await;
        self.apply_ref_changes().await?;
        let writes = self.ingest.writes.load(Ordering::Acquire);
        let (mut segs, to) = self.state.lock().unwrap().pass_segments(scope, effort);
        segs.sort_unstable_by_key(|x| x.0);
        let total = segs.len() as u64;
        if scope == PassScope::Idle {
            tracing::info!(segments = total, "idle recompression pass starts");
        }
        let mut rep = RecompressReport::default();
        let mut group: Vec<Member> = Vec::new();
        let mut group_bytes = 0usize;
        // Every segment below this was read (or needs no pass).
        let mut upto = to;
        for (i, (seg, records, len, _)) in segs.into_iter().enumerate() {
            progress(i as u64, total);
            if scope == PassScope::Idle
                && (self.closing.load(Ordering::Acquire)
                    || self.ingest.writes.load(Ordering::Acquire) != writes)
            {
                rep.stopped = true;
                upto = seg;
                break;
            }
            rep.segments += 1;
            let Some(bytes) = self.read_written_segment(seg, &records, len).await? else {
                continue; // freed or moved meanwhile
            };
            let frames: Vec<(usize, Fp, u8)> = segment_frames(&bytes)
                .into_iter()
                .map(|(o, fp, _)| (o, fp, meta::frame_effort(&bytes[o..])))
                .collect();
            // The live frames to work on (their entries point here): plain
            // chunks for a region, compressed ones to redo alone; and where
            // the references of the deltas among them are.
            let (members, jobs, partly_dead) = self
                .with_state(|st| {
                    st.require_chunks(frames.iter().map(|f| &f.1))?;
                    if !st.segs.get(&seg).is_some_and(|s| s.records == records) {
                        // Moved or freed meanwhile.
                        return Ok((Vec::new(), Vec::new(), Vec::new()));
                    }
                    let mut members = Vec::new();
                    let mut alone = Vec::new();
                    let mut partly_dead = Vec::new();
                    for &(o, fp, eff) in &frames {
                        let Some(e) = st
                            .chunk(&fp)
                            .filter(|e| e.seg == seg && e.offset as usize == o)
                        else {
                            continue;
                        };
                        match e.enc {
                            Encoding::Zstd if region_bytes > 0 => members.push((o, e.clone())),
                            Encoding::Region if region_bytes > 0 => {
                                let at = o + CHUNK_HEADER;
                                let Some(Ok((table, _))) = bytes
                                    .get(at..at + e.stored as usize)
                                    .map(reduce::region_members)
                                else {
                                    continue; // a read of a member reports it
                                };
                                if e.refs as f64 > REGION_REWRITE_BELOW * table.len() as f64 {
                                    continue;
                                }
                                // Its live members: those whose entries
                                // still point into it where the table says.
                                let e = e.clone();
                                st.require_chunks(table.iter().map(|m| &m.0))?;
                                let mut live = Vec::new();
                                let mut pos = 0u32;
                                for (fp, len) in table {
                                    if let Some(m) = st.chunk(&fp).filter(|m| {
                                        Origin::Region(e.fp, pos).holds(m) && m.len == len
                                    }) {
                                        live.push((pos, m.clone()));
                                    }
                                    pos = pos.saturating_add(len);
                                }
                                partly_dead.push((o, e, live));
                            }
                            enc if eff < effort && scope.redoes(enc) => alone.push((o, e.clone())),
                            _ => {}
                        }
                    }
                    let mut jobs = Vec::with_capacity(alone.len());
                    for (o, e) in alone {
                        let base = match e.base.filter(|_| e.enc.is_delta()) {
                            None => None,
                            Some(b) => Some(st.locate_reference(&b)?),
                        };
                        jobs.push((o, e, base));
                    }
                    Ok((members, jobs, partly_dead))
                })
                .await?;
            let mut bases: HashMap<Fp, Arc<Vec<u8>>> = HashMap::new();
            for (_, _, b) in &jobs {
                if let Some((be, w)) = b {
                    if bases.contains_key(&be.fp) {
                        continue;
                    }
                    match self.decode_chunk(be, w, None, true).await {
                        Ok(d) => {
                            bases.insert(be.fp, Arc::new(d));
                        }
                        // A reference moved or freed since it was located
                        // (its old stripes may be reused): its deltas wait
                        // for the next pass.
                        Err(_) if self.moved_since(be) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            type Work = (usize, ChunkEntry, Option<Arc<Vec<u8>>>);
            let work: Vec<Work> = jobs
                .into_iter()
                .filter_map(|(o, e, b)| match b {
                    None => Some((o, e, None)),
                    Some((be, _)) => Some((o, e, Some(bases.get(&be.fp)?.clone()))),
                })
                .collect();
            // The compressor's work, off the async threads: level 19 runs
            // at a few MB/s.
            let (smaller, decoded) = tokio::task::spawn_blocking(move || {
                let mut enc = Encoder::new(level);
                let mut out = Vec::new();
                let mut smaller = Vec::new();
                let decode = |e: &ChunkEntry, o: usize, base: Option<&[u8]>| {
                    let at = o + CHUNK_HEADER;
                    let mut data = Vec::new();
                    let name = if e.enc == Encoding::Region {
                        reduce::region_fingerprint
                    } else {
                        reduce::fingerprint
                    };
                    let ok = bytes
                        .get(at..at + e.stored as usize)
                        .is_some_and(|st| reduce::decode(e.enc, st, base, e.len as usize, &mut data).is_ok())
                        && name(&data) == e.fp;
                    if !ok {
                        // Left as it is: a read reports it (and repairs the
                        // strip from parity when its CRC fails).
                        tracing::warn!(chunk = %hex(&e.fp), "recompression: chunk does not decode; left as it is");
                    }
                    ok.then_some(data)
                };
                for (o, e, base) in &work {
                    let base = base.as_deref().map(Vec::as_slice);
                    let Some(data) = decode(e, *o, base) else { continue };
                    if enc.reencode(e.enc, &data, base, &mut out).is_some()
                        && out.len() < e.stored as usize - e.stored as usize / 32
                    {
                        smaller.push((*o, e.clone(), std::mem::take(&mut out)));
                    }
                }
                let mut decoded: Vec<Member> = members
                    .into_iter()
                    .filter_map(|(o, e)| {
                        let data = decode(&e, o, None)?;
                        Some(Member {
                            from: Origin::Frame(seg, o, e.stored),
                            entry: e,
                            data,
                        })
                    })
                    .collect();
                for (o, region, live) in partly_dead {
                    let Some(content) = decode(&region, o, None) else {
                        continue;
                    };
                    for (at, e) in live {
                        let Some(data) = content.get(at as usize..at as usize + e.len as usize)
                        else {
                            continue;
                        };
                        if reduce::fingerprint(data) == e.fp {
                            decoded.push(Member {
                                from: Origin::Region(region.fp, at),
                                data: data.to_vec(),
                                entry: e,
                            });
                        }
                    }
                }
                (smaller, decoded)
            })
            .await
            .map_err(|e| FsError::Io(format!("recompression task: {e}")))?;
            if !smaller.is_empty() {
                let (n, before, after) = self.store_recompressed(seg, smaller, effort).await?;
                rep.chunks += n;
                rep.before += before;
                rep.after += after;
            }
            for m in decoded {
                group_bytes += m.data.len();
                group.push(m);
                if group_bytes >= region_bytes {
                    self.store_regions(std::mem::take(&mut group), level, &mut rep)
                        .await?;
                    group_bytes = 0;
                }
            }
        }
        if group.len() > 1 || group.iter().any(|m| matches!(m.from, Origin::Region(..))) {
            self.store_regions(group, level, &mut rep).await?;
        }
        self.with_state(|st| {
            st.pass_done(upto, effort);
            Ok(())
        })
        .await?;
        progress(total, total);
        Ok(rep)
    }

    /// Whether an idle pass at `level` has segments to read.
    pub(super) fn recompress_due(&self, level: i32) -> bool {
        self.state.lock().unwrap().pass_due(level as u8)
    }

    /// One idle recompression pass ([`PassScope::Idle`]), logged.
    pub(super) async fn idle_recompress(&self) {
        if self.closing.load(Ordering::Acquire) {
            return;
        }
        let ing = &self.ingest;
        match self
            .recompress(
                RECOMPRESS_LEVEL,
                self.opts.recompress_region,
                PassScope::Idle,
                |_, _| {},
            )
            .await
        {
            Ok(r) => {
                ing.idle_passes.fetch_add(1, Ordering::Relaxed);
                ing.idle_segments.fetch_add(r.segments, Ordering::Relaxed);
                ing.idle_saved
                    .fetch_add(r.before.saturating_sub(r.after), Ordering::Relaxed);
                tracing::info!(
                    segments = r.segments,
                    chunks = r.chunks,
                    regions = r.regions,
                    before = r.before,
                    after = r.after,
                    stopped = r.stopped,
                    "idle recompression pass"
                );
            }
            Err(e) => {
                // Not again at every tick (a D-node down, say): after a
                // minute, or the idle time if longer.
                let wait = self
                    .opts
                    .recompress_idle
                    .unwrap_or_default()
                    .max(Duration::from_secs(60));
                *self.idle_retry_at.lock().unwrap() = Some(std::time::Instant::now() + wait);
                tracing::warn!(error = %e, retry_in_s = wait.as_secs(), "idle recompression failed");
            }
        }
    }

    /// Records chunks recompressed one by one (`(offset in seg, entry as
    /// read, new stored bytes)`): `(chunks, stored before, after)`.
    async fn store_recompressed(
        &self,
        seg: u64,
        results: Vec<(usize, ChunkEntry, Vec<u8>)>,
        effort: u8,
    ) -> Result<(u64, u64, u64), FsError> {
        let _guard = self.quiesce.read().await;
        let seg_bytes = self.seg_bytes;
        let (sealed, n, before, after) = self
            .with_state(|st| {
                st.require_chunks(results.iter().map(|r| &r.1.fp))?;
                let mut sealed = Vec::new();
                let (mut n, mut before, mut after) = (0u64, 0u64, 0u64);
                for (o, old, stored) in &results {
                    // Unless it moved, died or changed meanwhile.
                    let Some(cur) = st.chunk(&old.fp).cloned().filter(|e| {
                        e.seg == seg
                            && e.offset as usize == *o
                            && e.stored == old.stored
                            && e.enc == old.enc
                    }) else {
                        continue;
                    };
                    let mut e = cur.clone();
                    e.stored = stored.len() as u32;
                    (e.seg, e.offset) = st.append_frame(&e, effort, stored, seg_bytes, &mut sealed);
                    st.counts.count_chunk(&cur, -1);
                    st.counts.count_chunk(&e, 1);
                    st.put_chunk(e.fp, Some(e));
                    st.release(seg, cur.frame_len());
                    n += 1;
                    before += cur.stored as u64;
                    after += stored.len() as u64;
                }
                st.changes += 1;
                Ok((sealed, n, before, after))
            })
            .await?;
        self.write_segments(&sealed).await?;
        Ok((n, before, after))
    }

    /// Compresses `members` (decoded, in order) into regions at `level` —
    /// one, or halves of it where its frame would take over half a
    /// segment — and moves them in.
    async fn store_regions(
        &self,
        members: Vec<Member>,
        level: i32,
        rep: &mut RecompressReport,
    ) -> Result<(), FsError> {
        let max_stored = self.seg_bytes / 2 - CHUNK_HEADER;
        let (members, regions) = tokio::task::spawn_blocking(move || {
            let mut enc = Encoder::new(level);
            let mut regions = Vec::new();
            // Ranges of members still to compress (a stack: in order).
            let mut todo: Vec<std::ops::Range<usize>> = Vec::new();
            todo.push(0..members.len());
            while let Some(r) = todo.pop() {
                let ms = &members[r.clone()];
                let table: Vec<(Fp, u32)> = ms.iter().map(|m| (m.entry.fp, m.entry.len)).collect();
                let content = ms.iter().map(|m| &m.data[..]).collect::<Vec<_>>().concat();
                let mut out = Vec::new();
                if enc.region(&table, &content, &mut out).is_none() {
                    continue;
                }
                if out.len() > max_stored && r.len() > 1 {
                    let mid = r.start + r.len() / 2;
                    todo.push(mid..r.end);
                    todo.push(r.start..mid);
                    continue;
                }
                // Members of partly dead regions move whatever it saves
                // (their old regions' dead bytes free with them); others
                // only to save 1/32 of their frames.
                let rewrite = ms.iter().any(|m| matches!(m.from, Origin::Region(..)));
                let was: usize = ms.iter().map(|m| m.entry.stored as usize).sum();
                if (r.len() > 1 || rewrite)
                    && out.len() <= max_stored
                    && (rewrite || out.len() < was - was / 32)
                {
                    regions.push((r, reduce::region_fingerprint(&content), content.len(), out));
                }
            }
            (members, regions)
        })
        .await
        .map_err(|e| FsError::Io(format!("recompression task: {e}")))?;
        for (r, rfp, len, stored) in regions {
            let ms = &members[r];
            let _guard = self.quiesce.read().await;
            let seg_bytes = self.seg_bytes;
            let effort = level as u8;
            let (sealed, before) = self
                .with_state(|st| {
                    let olds: Vec<Fp> = ms
                        .iter()
                        .filter_map(|m| match m.from {
                            Origin::Region(old, _) => Some(old),
                            Origin::Frame(..) => None,
                        })
                        .collect();
                    st.require_chunks(ms.iter().map(|m| &m.entry.fp).chain(&olds).chain([&rfp]))?;
                    // Every member as it was read (not moved, died or
                    // changed meanwhile), else the region would hold dead
                    // bytes: then not made at all.
                    let current = ms
                        .iter()
                        .all(|m| st.chunk(&m.entry.fp).is_some_and(|e| m.from.holds(e)));
                    if !current || st.chunk(&rfp).is_some() {
                        return Ok((Vec::new(), None));
                    }
                    let mut sealed = Vec::new();
                    let mut region = ChunkEntry {
                        fp: rfp,
                        seg: 0,
                        offset: 0,
                        stored: stored.len() as u32,
                        len: len as u32,
                        enc: Encoding::Region,
                        base: None,
                        refs: ms.len() as u32,
                    };
                    (region.seg, region.offset) =
                        st.append_frame(&region, effort, &stored, seg_bytes, &mut sealed);
                    st.insert_chunk(region);
                    let (mut at, mut before) = (0u32, 0u64);
                    for m in ms {
                        let cur = st.chunk(&m.entry.fp).cloned().unwrap();
                        let mut e = cur.clone();
                        e.seg = meta::NO_FRAME;
                        e.offset = at;
                        e.stored = 0;
                        e.enc = Encoding::Slice;
                        e.base = Some(rfp);
                        at += cur.len;
                        before += cur.stored as u64;
                        st.counts.count_chunk(&cur, -1);
                        st.counts.count_chunk(&e, 1);
                        st.put_chunk(e.fp, Some(e));
                        match m.from {
                            Origin::Frame(seg, ..) => st.release(seg, cur.frame_len()),
                            // Its old region loses a member (and, with its
                            // last, its frame).
                            Origin::Region(old, _) => {
                                // Its share of the old region's bytes.
                                before += st.chunk(&old).map_or(0, |r| {
                                    r.stored as u64 * cur.len as u64 / r.len.max(1) as u64
                                });
                                let gone = st.chunk(&old).is_some_and(|r| r.refs <= 1);
                                if gone {
                                    st.remove_chunk(&old);
                                } else {
                                    st.update_chunk(&old, |r| r.refs -= 1);
                                }
                            }
                        }
                    }
                    st.changes += 1;
                    Ok((sealed, Some(before)))
                })
                .await?;
            self.write_segments(&sealed).await?;
            if let Some(before) = before {
                rep.regions += 1;
                rep.chunks += ms.len() as u64;
                rep.before += before;
                rep.after += stored.len() as u64;
            }
        }
        Ok(())
    }
}
