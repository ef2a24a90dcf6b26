//! Metadata on the D-nodes, version 1: what the file system is (inodes,
//! directories, extent maps, segments) and how it is committed.
//!
//! The metadata is a log. Each commit appends one [`MetaRecord`] — a
//! [`Batch`] of the inodes and segments that changed, or now and then a full
//! [`Image`] (a checkpoint) — as one or more *metadata stripes*: stripes of
//! geometry `1 + M` (one data strip mirrored by `M` parity strips, `M = m +
//! 1` where the cluster allows: more redundancy than the data's `m`). Every
//! metadata stripe names the one written before it, so the log is a chain
//! back to the newest checkpoint. The commit point is a [`CommitRecord`]
//! naming the chain's head, written to a slot in the reserved first MiB of
//! every D-node and acknowledged once a majority of D-nodes hold it;
//! recovery takes the newest valid one anywhere and replays the chain from
//! its checkpoint. A crash before the commit record leaves the previous
//! commit in force and everything written after it unreferenced.
//!
//! Every block is `magic | version | length | postcard bytes | CRC32C`, so a
//! torn or stale block is recognised and skipped, never misread.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::volume::StripeRecord;
use crate::reduce::{Encoding, Fp, Reduce};

/// Two commit slots per D-node (alternating by sequence number, so a torn
/// write of one leaves the previous commit in the other), after the
/// superblock copies (0, 4096) and the lease block (8192).
pub const COMMIT_OFFSET: u64 = 16384;
pub const COMMIT_SLOT: usize = 4096;
const _: () = assert!(COMMIT_OFFSET + 2 * COMMIT_SLOT as u64 <= super::volume::DATA_OFFSET);
const _: () = assert!(COMMIT_OFFSET >= super::lease::LEASE_OFFSET + 4096);

pub const COMMIT_MAGIC: [u8; 8] = *b"DASECOMT";
pub const META_MAGIC: [u8; 8] = *b"DASEMETA";
/// 2: inodes in pages of their own, the log holds where each page is.
/// 3: extents may name chunks; the chunk and similarity indexes in pages.
/// 4: index changes journalled in the log ([`IndexDelta`]) and merged into
///    the bucket pages in bulk.
/// 5: compression regions (chunk entries of encodings `Region` and `Slice`);
///    a version 4 file system is a version 5 one without them, so both are
///    read.
/// 6: arrays of numbers stored as byte planes (encodings `Planes` and
///    `XorPlanes`); older versions are version 6 without them.
/// 7: a [`RecordTail`] after each log record (how far idle recompression
///    has read); a version 6 record is one whose tail is the default.
/// 8: a file's extents in extent pages of their own ([`extent_page`]),
///    its inode's map empty, so a commit writes only the ranges of a file
///    that changed; a version 7 inode page holds whole maps and is read as
///    before (the two merge). A reader of 7 refuses 8: it would see holes.
pub const VERSION: u32 = 8;
pub const OLDEST_READ: u32 = 4;

/// Inodes per metadata page: a page of small inodes fits a strip or two,
/// and pages are what the C-node caches and evicts.
pub const PAGE_INODES: u64 = 256;

/// The page an inode lives in.
pub fn page_of(ino: u64) -> u64 {
    ino / PAGE_INODES
}

/// Extent pages are numbered from here ([`extent_page`]), below the index
/// pages and above every inode page.
pub const EXTENT_PAGES: u64 = 1 << 61;
/// File bytes whose extents one extent page holds: ~1,000 extents of
/// 16 KiB chunks, ~57 KB, one strip.
pub const EXTENT_RANGE: u64 = 16 << 20;
/// Bits of an extent page number for the range: files up to 4 PiB, and
/// inode numbers below 2^33.
const RANGE_BITS: u32 = 28;
/// The largest file ([`extent_page`]'s ranges): 4 PiB.
pub const MAX_FILE_BYTES: u64 = EXTENT_RANGE << RANGE_BITS;
/// Inode numbers are below this ([`extent_page`]'s bits): 8.6 billion.
pub const MAX_INO: u64 = 1 << (61 - RANGE_BITS);

/// The page holding the extents of file `ino` that start in range `r`
/// (bytes `[r·EXTENT_RANGE, (r+1)·EXTENT_RANGE)`): a [`PageBlob`] whose one
/// inode is the file's number with those extents as its content.
pub fn extent_page(ino: u64, r: u64) -> u64 {
    assert!(
        ino < MAX_INO && r < 1 << RANGE_BITS,
        "extent page of file {ino}, range {r}"
    );
    EXTENT_PAGES | (ino << RANGE_BITS) | r
}

/// The file and range of an extent page, or None for other pages.
pub fn extent_page_of(p: u64) -> Option<(u64, u64)> {
    (EXTENT_PAGES..CHUNK_PAGES).contains(&p).then(|| {
        (
            (p - EXTENT_PAGES) >> RANGE_BITS,
            p & ((1 << RANGE_BITS) - 1),
        )
    })
}

/// A digest of each range's extents (ranges without extents are absent: a
/// sparse file's holes cost nothing), to find the ranges a commit must
/// rewrite without each change having to say so.
/// BLAKE3, 128 bits: a range whose digest did not change is not written,
/// so a collision would lose its change; a 32-bit checksum would meet one
/// in some billions of commits, this never.
pub fn range_digests(map: &BTreeMap<u64, Extent>) -> BTreeMap<u64, u128> {
    const REC: usize = 49;
    let mut out: BTreeMap<u64, u128> = BTreeMap::new();
    // The extents' fields side by side, hashed a range (or 64 KiB) at a
    // time: ~30 ns an extent in all, ~90 with an update per extent.
    let mut buf = vec![0u8; 1337 * REC];
    let (mut fill, mut cur) = (0, None::<(u64, blake3::Hasher)>);
    let finish = |out: &mut BTreeMap<u64, u128>, r: u64, h: &mut blake3::Hasher, rest: &[u8]| {
        h.update(rest);
        let d = u128::from_le_bytes(h.finalize().as_bytes()[..16].try_into().unwrap());
        // 0 and u128::MAX mean "no page" and "unknown".
        out.insert(r, d.clamp(1, u128::MAX - 1));
    };
    for (&off, e) in map {
        let r = off / EXTENT_RANGE;
        if cur.as_ref().is_none_or(|(c, _)| *c != r) {
            if let Some((c, mut h)) = cur.take() {
                finish(&mut out, c, &mut h, &buf[..fill]);
            }
            (fill, cur) = (0, Some((r, blake3::Hasher::new())));
        }
        if fill == buf.len() {
            cur.as_mut().expect("a range").1.update(&buf);
            fill = 0;
        }
        let b = &mut buf[fill..fill + REC];
        b.fill(0);
        b[..8].copy_from_slice(&off.to_le_bytes());
        match e.at {
            Place::Seg(s) => b[8..16].copy_from_slice(&s.to_le_bytes()),
            Place::Chunk(fp) => {
                b[8..40].copy_from_slice(&fp);
                b[48] = 1;
            }
        }
        b[40..44].copy_from_slice(&e.offset.to_le_bytes());
        b[44..48].copy_from_slice(&e.len.to_le_bytes());
        fill += REC;
    }
    if let Some((c, mut h)) = cur {
        finish(&mut out, c, &mut h, &buf[..fill]);
    }
    out
}

/// The page numbers of every extent page file `ino` can have, in order.
pub fn extent_pages(ino: u64) -> std::ops::Range<u64> {
    let first = extent_page(ino, 0);
    first..first + (1 << RANGE_BITS)
}

/// The page blob of range `r` of file `i` (whose extents are `map`).
pub fn extent_blob(fs_uuid: [u8; 16], i: &Inode, map: &BTreeMap<u64, Extent>, r: u64) -> PageBlob {
    PageBlob {
        fs_uuid,
        page: extent_page(i.ino, r),
        inodes: vec![i.with_content(Content::File(range_extents(map, r)))],
        chunks: Vec::new(),
        similar: Vec::new(),
    }
}

/// The extents an extent page of file `ino` holds, or None when it does
/// not hold one inode of that number with extents.
pub fn extents_of_blob(blob: PageBlob, ino: u64) -> Option<BTreeMap<u64, Extent>> {
    match blob.inodes.into_iter().next() {
        Some(Inode {
            ino: i,
            content: Content::File(m),
            ..
        }) if i == ino => Some(m),
        _ => None,
    }
}

/// A file's extents that start in range `r`.
pub fn range_extents(map: &BTreeMap<u64, Extent>, r: u64) -> BTreeMap<u64, Extent> {
    map.range(r * EXTENT_RANGE..(r + 1) * EXTENT_RANGE)
        .map(|(&o, &e)| (o, e))
        .collect()
}

impl Inode {
    /// The inode with `content` in place of its own (an extent page's, or
    /// a file's without its extents): no copy of a large map.
    pub fn with_content(&self, content: Content) -> Inode {
        Inode {
            ino: self.ino,
            kind: self.kind,
            perm: self.perm,
            uid: self.uid,
            gid: self.gid,
            nlink: self.nlink,
            size: self.size,
            atime: self.atime,
            mtime: self.mtime,
            ctime: self.ctime,
            content,
        }
    }
}

/// Pages of the chunk index (fingerprint to chunk) are numbered from here,
/// pages of the similarity index (super-feature to chunk) from
/// [`SIMILAR_PAGES`]; inode pages below.
pub const CHUNK_PAGES: u64 = 1 << 62;
pub const SIMILAR_PAGES: u64 = 3 << 61;

/// Chunk entries a chunk-index bucket holds on average before the index
/// grows by a bucket (~60 KiB of entries: one metadata part).
pub const CHUNKS_PER_BUCKET: u64 = 512;
/// Similarity entries per bucket (each ~40 bytes).
pub const SIMILAR_PER_BUCKET: u64 = 1024;

/// The bucket of hash `h` in a linear-hashing table of `n` buckets (n >= 1):
/// the table grows one bucket at a time, splitting bucket `n - 2^level`,
/// so only one page changes when it grows.
pub fn bucket(h: u64, n: u64) -> u64 {
    let lo = 1u64 << (63 - n.max(1).leading_zeros());
    let b = h & (2 * lo - 1);
    if b >= n {
        b & (lo - 1)
    } else {
        b
    }
}

/// The bucket split when a table of `n` buckets grows to `n + 1`.
pub fn split_source(n: u64) -> u64 {
    n - (1u64 << (63 - n.leading_zeros()))
}

/// The hash a fingerprint is bucketed by.
pub fn fp_hash(fp: &Fp) -> u64 {
    u64::from_le_bytes(fp[..8].try_into().unwrap())
}

pub fn chunk_page(fp: &Fp, buckets: u64) -> u64 {
    CHUNK_PAGES | bucket(fp_hash(fp), buckets)
}

pub fn similar_page(sf: u64, buckets: u64) -> u64 {
    SIMILAR_PAGES | bucket(sf, buckets)
}

/// The `seg` of a chunk entry with no frame of its own (a region's slice):
/// no segment has this id, so no segment walk finds the entry live.
pub const NO_FRAME: u64 = u64::MAX;

/// One stored chunk, in the chunk index. A compression region has an entry
/// too (encoding `Region`, fingerprint [`crate::reduce::region_fingerprint`],
/// `refs` its live members); a member's (`Slice`) has `seg` [`NO_FRAME`],
/// `offset` its place in the region's content, `stored` 0 and `base` the
/// region.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkEntry {
    pub fp: Fp,
    /// Where its frame ([`chunk_header`] then the stored bytes) is.
    pub seg: u64,
    pub offset: u32,
    /// Stored bytes (after the header).
    pub stored: u32,
    /// The chunk's own length.
    pub len: u32,
    pub enc: Encoding,
    /// The reference chunk of a delta (never itself a delta).
    pub base: Option<Fp>,
    /// Extents naming it plus deltas built on it; at zero it is freed.
    pub refs: u32,
}

impl ChunkEntry {
    /// Bytes the chunk takes in its segment.
    pub fn frame_len(&self) -> u64 {
        if self.enc == Encoding::Slice {
            return 0;
        }
        CHUNK_HEADER as u64 + self.stored as u64
    }
}

/// Before every stored chunk in a segment, so a segment can be walked
/// without the index (the cleaner does: a chunk is live when the index
/// entry of its fingerprint points back at it).
/// `magic "DCHK" | len u32 | stored u32 | encoding u8 | effort u8 | members
/// u16 | fp [32]`, little-endian. *effort* is 0 for a frame the write path
/// made and the zstd level for one a recompression pass made (so a later
/// pass at that level passes it by); readers ignore it. *encoding* 4 is a
/// compression region (frame version 3), whose *members* field counts the
/// chunks it was made of (0 in other frames); 6 and 7 are byte planes of
/// numbers, plain and XOR delta (frame version 4).
pub const CHUNK_HEADER: usize = 48;
pub const CHUNK_MAGIC: [u8; 4] = *b"DCHK";

/// The effort byte of the frame header at the start of `b` (0 if none).
pub fn frame_effort(b: &[u8]) -> u8 {
    if b.len() >= CHUNK_HEADER && b[..4] == CHUNK_MAGIC {
        b[13]
    } else {
        0
    }
}

pub fn chunk_header(e: &ChunkEntry, effort: u8) -> [u8; CHUNK_HEADER] {
    debug_assert_ne!(e.enc, Encoding::Slice, "a slice has no frame");
    let mut h = [0u8; CHUNK_HEADER];
    h[..4].copy_from_slice(&CHUNK_MAGIC);
    h[4..8].copy_from_slice(&e.len.to_le_bytes());
    h[8..12].copy_from_slice(&e.stored.to_le_bytes());
    h[12] = match e.enc {
        Encoding::Raw => 0,
        Encoding::Zstd => 1,
        Encoding::Delta => 2,
        Encoding::XorDelta => 3,
        Encoding::Region => 4,
        Encoding::Slice => 5,
        Encoding::Planes => 6,
        Encoding::XorPlanes => 7,
    };
    h[13] = effort;
    if e.enc == Encoding::Region {
        h[14..16].copy_from_slice(&(e.refs.min(u16::MAX as u32) as u16).to_le_bytes());
    }
    h[16..48].copy_from_slice(&e.fp);
    h
}

/// `(fp, stored)` of the chunk frame at the start of `b`, if one is there.
pub fn parse_chunk_header(b: &[u8]) -> Option<(Fp, u32)> {
    if b.len() < CHUNK_HEADER || b[..4] != CHUNK_MAGIC {
        return None;
    }
    let stored = u32::from_le_bytes(b[8..12].try_into().unwrap());
    Some((b[16..48].try_into().unwrap(), stored))
}

/// magic (8) + version (4) + length (4) before the payload, CRC32C (4) after.
pub const FRAME_OVERHEAD: usize = 20;
/// Room a metadata stripe keeps for its part header (the previous stripe's
/// record is at most a few hundred bytes even for the widest geometry).
pub const PART_HEADER_ROOM: usize = 1024;

/// The inode number of the root directory (FUSE's too).
pub const ROOT_INO: u64 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    File,
    Dir,
    Symlink,
}

/// A file's bytes `[file_offset, file_offset + len)` are bytes `[offset,
/// offset + len)` of what `at` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    pub at: Place,
    pub offset: u32,
    pub len: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Place {
    /// A segment's bytes as written (file systems without reduction).
    Seg(u64),
    /// A chunk's content (found through the chunk index).
    Chunk(Fp),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Content {
    /// Extents keyed by file offset; gaps read as zeros (sparse files).
    File(BTreeMap<u64, Extent>),
    /// Entries by name (inode and its kind, so listing needs no other
    /// inode), and the parent directory (for `..`).
    Dir {
        parent: u64,
        entries: BTreeMap<Vec<u8>, (u64, Kind)>,
    },
    Symlink(Vec<u8>),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inode {
    pub ino: u64,
    pub kind: Kind,
    /// Permission bits (and setuid/setgid/sticky), not the type.
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub size: u64,
    /// Nanoseconds since the Unix epoch.
    pub atime: i64,
    pub mtime: i64,
    pub ctime: i64,
    pub content: Content,
}

/// A segment: one unit of the data log, `k * strip_size` bytes of file data
/// appended in write order, stored as one or more stripes (more than one
/// when D-nodes were down and stripes had to be narrower). `records[i]`
/// holds the segment's bytes after those of `records[..i]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    pub records: Vec<StripeRecord>,
    /// Bytes of the segment written.
    pub len: u32,
    /// Bytes still referenced by some file; at zero the segment is freed.
    pub live: u64,
}

/// Where a page's blob is: the metadata stripes holding its parts, in order.
pub type PageLocation = Vec<StripeRecord>;

/// File system totals, kept so that reporting needs no scan of every inode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub inodes: u64,
    pub files: u64,
    pub dirs: u64,
    /// Sum of regular files' sizes.
    pub logical_bytes: u64,
    /// Stored chunks, and the chunk index's buckets.
    pub chunks: u64,
    pub chunk_buckets: u64,
    /// Similarity index entries and buckets.
    pub similar: u64,
    pub similar_buckets: u64,
    /// Sum of the stored chunks' lengths (what is left after dedup).
    pub unique_bytes: u64,
    /// Lengths of the chunks stored as deltas, and their stored bytes.
    pub delta_in: u64,
    pub delta_out: u64,
    /// Stored bytes of all chunks (after dedup, deltas and compression).
    pub stored_bytes: u64,
}

impl Counts {
    /// Adds (`sign` 1) or takes away (`sign` -1) a stored chunk's share of
    /// the reduction totals.
    pub fn count_chunk(&mut self, e: &ChunkEntry, sign: i64) {
        let add = |v: &mut u64, d: u32| *v = (*v as i64 + sign * d as i64) as u64;
        if e.enc == Encoding::Region {
            // Its members are the chunks; it is only their stored bytes.
            add(&mut self.stored_bytes, e.stored);
            return;
        }
        add(&mut self.chunks, 1);
        add(&mut self.unique_bytes, e.len);
        add(&mut self.stored_bytes, e.stored);
        if e.enc.is_delta() {
            add(&mut self.delta_in, e.len);
            add(&mut self.delta_out, e.stored);
        }
    }

    /// Bytes left after dedup and similarity deltas (before compression).
    pub fn after_similarity(&self) -> u64 {
        self.unique_bytes - self.delta_in + self.delta_out
    }
}

/// The whole file system at one commit: where every page is, and the segments.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Image {
    /// What the file system does to data (chosen at mkfs).
    pub reduce: Reduce,
    pub next_ino: u64,
    pub next_seg: u64,
    pub pages: Vec<(u64, PageLocation)>,
    pub segments: Vec<(u64, Segment)>,
    pub counts: Counts,
    /// Inodes unlinked while open: freed at the next mount if still there.
    pub orphans: Vec<u64>,
    /// Chunk reference changes not yet applied to the chunk index.
    pub ref_changes: Vec<(Fp, i32)>,
    /// Every index entry not yet merged into its bucket page.
    pub index: IndexDelta,
}

/// Index entries newer than their bucket pages' copies. Index changes are
/// journalled here rather than written into the buckets: fingerprints and
/// super-features are random, so writing buckets in place would rewrite
/// every bucket at every commit; instead they are merged in bulk, a few
/// buckets per commit, when enough have gathered (one level of an LSM tree).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexDelta {
    /// The newest entry of each chunk (None: removed).
    pub chunks: Vec<(Fp, Option<ChunkEntry>)>,
    /// New similarity entries.
    pub similar: Vec<(u64, Fp)>,
    /// Bucket pages this commit merged the journalled entries into (after
    /// this record's own entries are applied, none of theirs is pending).
    pub merged: Vec<u64>,
}

/// What changed since the previous commit.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Batch {
    pub next_ino: u64,
    pub next_seg: u64,
    /// `None`: the page no longer holds any inode.
    pub pages: Vec<(u64, Option<PageLocation>)>,
    /// `None`: the segment was freed.
    pub segments: Vec<(u64, Option<Segment>)>,
    pub counts: Counts,
    pub orphans: Vec<u64>,
    pub ref_changes: Vec<(Fp, i32)>,
    /// Index changes since the previous commit.
    pub index: IndexDelta,
}

/// The content of one page, written as metadata parts of its own (not in
/// the log chain: the log names them).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PageBlob {
    pub fs_uuid: [u8; 16],
    pub page: u64,
    pub inodes: Vec<Inode>,
    pub chunks: Vec<ChunkEntry>,
    /// Super-feature to the chunk that has it.
    pub similar: Vec<(u64, Fp)>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum MetaRecord {
    Image(Image),
    Batch(Batch),
}

/// Fields of the file system's state that version 7 added, encoded after
/// each record (image or batch: the newest record's tail is in force).
/// Kept apart from [`Image`] and [`Batch`] so that their version 6
/// encodings stay readable as they are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordTail {
    /// Every segment numbered below this had its chunks read by a
    /// recompression pass at zstd level [`RecordTail::recompressed_level`]
    /// or higher (0 and 0: none yet). Segments are never appended to once
    /// sealed, so an incremental pass starts here.
    pub recompressed_below: u64,
    pub recompressed_level: u8,
}

/// The bytes of a log record and its tail ([`RecordTail`]).
pub fn encode_record(record: &MetaRecord, tail: &RecordTail) -> Vec<u8> {
    let mut b = encode(record);
    b.extend_from_slice(&encode(tail));
    b
}

/// Reads what [`encode_record`] wrote, or a version 6 record (no tail).
pub fn decode_record(b: &[u8]) -> Result<(MetaRecord, RecordTail), MetaError> {
    let bad = |e: postcard::Error| MetaError::Corrupt(format!("metadata record: {e}"));
    let (record, rest) = postcard::take_from_bytes::<MetaRecord>(b).map_err(bad)?;
    if rest.is_empty() {
        return Ok((record, RecordTail::default()));
    }
    let (tail, rest) = postcard::take_from_bytes::<RecordTail>(rest).map_err(bad)?;
    if !rest.is_empty() {
        return Err(MetaError::Corrupt(format!(
            "metadata record: {} bytes after its tail",
            rest.len()
        )));
    }
    Ok((record, tail))
}

/// The header of one metadata stripe: a part of one record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaPart {
    pub fs_uuid: [u8; 16],
    /// The commit this part belongs to.
    pub seq: u64,
    /// Part of an [`Image`] (the chain ends at an image's part 0).
    pub image: bool,
    /// Index of this part within its record.
    pub part: u32,
    /// The record's last part.
    pub last: bool,
    /// The metadata stripe written before this one (None: none, only for
    /// an image's part 0).
    pub prev: Option<StripeRecord>,
    pub payload: Vec<u8>,
}

/// The commit point: which metadata stripe is the head of the log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitRecord {
    pub fs_uuid: [u8; 16],
    pub seq: u64,
    /// Distinguishes mounts: of two records with one `seq` (a commit that
    /// reached only a few D-nodes before a crash, and the next mount's own
    /// commit of that number) the later mount's wins.
    pub epoch: u64,
    pub head: StripeRecord,
}

impl CommitRecord {
    pub fn order(&self) -> (u64, u64) {
        (self.seq, self.epoch)
    }
    /// The slot this commit goes to on every D-node.
    pub fn offset(&self) -> u64 {
        COMMIT_OFFSET + (self.seq % 2) * COMMIT_SLOT as u64
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("metadata block: {0}")]
    Corrupt(String),
    #[error("metadata record of {0} bytes does not fit its frame")]
    TooBig(usize),
}

/// Frames `value` in `size` bytes (zero padded): magic, version, length,
/// postcard encoding, CRC32C of everything before it.
pub fn frame<T: Serialize>(magic: [u8; 8], value: &T, size: usize) -> Result<Vec<u8>, MetaError> {
    let body = postcard::to_allocvec(value).map_err(|e| MetaError::Corrupt(e.to_string()))?;
    if body.len() + FRAME_OVERHEAD > size {
        return Err(MetaError::TooBig(body.len()));
    }
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&magic);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out.resize(size, 0);
    Ok(out)
}

/// Reads a frame written by [`frame`]; any damage is an error, never a
/// misread value.
pub fn unframe<T: for<'de> Deserialize<'de>>(magic: [u8; 8], b: &[u8]) -> Result<T, MetaError> {
    let (version, body) = frame_parts(magic, b)?;
    if !(OLDEST_READ..=VERSION).contains(&version) {
        return Err(MetaError::Corrupt(format!(
            "version {version} is not supported (this dase reads versions {OLDEST_READ} to {VERSION})"
        )));
    }
    postcard::from_bytes(body).map_err(|e| MetaError::Corrupt(e.to_string()))
}

/// The version and body of an intact frame: magic, length and checksum
/// checked, the version not.
fn frame_parts(magic: [u8; 8], b: &[u8]) -> Result<(u32, &[u8]), MetaError> {
    let bad = |s: &str| Err(MetaError::Corrupt(s.to_string()));
    if b.len() < FRAME_OVERHEAD || b[..8] != magic {
        return bad("bad magic");
    }
    let version = u32::from_le_bytes(b[8..12].try_into().unwrap());
    let len = u32::from_le_bytes(b[12..16].try_into().unwrap()) as usize;
    if len > b.len() - FRAME_OVERHEAD {
        return bad("length beyond the block");
    }
    let end = 16 + len;
    let crc = u32::from_le_bytes(b[end..end + 4].try_into().unwrap());
    if crc32c::crc32c(&b[..end]) != crc {
        return bad("checksum mismatch");
    }
    Ok((version, &b[16..end]))
}

/// The version of an intact frame (magic and checksum right) written by a
/// newer dase than this one, if `b` is one. Such a frame is not damage: a
/// reader that skipped it as damaged would take an older commit for the
/// newest and lose what came after.
pub fn newer_version(magic: [u8; 8], b: &[u8]) -> Option<u32> {
    let (version, _) = frame_parts(magic, b).ok()?;
    (version > VERSION).then_some(version)
}

/// The postcard encoding of a metadata value (a record, a page).
pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_allocvec(v).expect("metadata values always serialize")
}

/// Decodes what [`encode`] wrote; `what` names it in the error.
pub fn decode<T: for<'de> Deserialize<'de>>(b: &[u8], what: &str) -> Result<T, MetaError> {
    postcard::from_bytes(b).map_err(|e| MetaError::Corrupt(format!("{what}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_of_a_newer_version_is_told_from_damage() {
        let magic = *b"DASETEST";
        let mut b = frame(magic, &42u32, 4096).unwrap();
        assert_eq!(newer_version(magic, &b), None, "this version's own");
        b[8..12].copy_from_slice(&(VERSION + 1).to_le_bytes());
        let end = 16 + u32::from_le_bytes(b[12..16].try_into().unwrap()) as usize;
        let crc = crc32c::crc32c(&b[..end]);
        b[end..end + 4].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(newer_version(magic, &b), Some(VERSION + 1));
        assert!(
            unframe::<u32>(magic, &b).is_err(),
            "and not read as if it were known"
        );
        b[20] ^= 1;
        assert_eq!(
            newer_version(magic, &b),
            None,
            "damaged: not a newer version"
        );
        assert_eq!(newer_version(*b"OTHERMAG", &b), None);
    }

    #[test]
    fn range_digests_change_with_their_range_only() {
        let ext = |fp: u8, len: u32| Extent {
            at: Place::Chunk([fp; 32]),
            offset: 0,
            len,
        };
        let mut m = BTreeMap::new();
        assert!(range_digests(&m).is_empty());
        m.insert(0, ext(1, 4096));
        m.insert(EXTENT_RANGE + 7, ext(2, 4096));
        m.insert(3 * EXTENT_RANGE, ext(3, 4096));
        let d = range_digests(&m);
        assert_eq!(
            d.keys().copied().collect::<Vec<_>>(),
            vec![0, 1, 3],
            "holes are absent"
        );
        // One extent changed (its length): its range's digest alone.
        m.insert(EXTENT_RANGE + 7, ext(2, 4097));
        let e = range_digests(&m);
        assert!(e[&0] == d[&0] && e[&1] != d[&1] && e[&3] == d[&3]);
        // A file as sparse as can be costs one entry, not 2^28.
        let mut far = BTreeMap::new();
        far.insert(MAX_FILE_BYTES - 4096, ext(4, 4096));
        assert_eq!(range_digests(&far).len(), 1);
        // A segment's place is not a chunk's with the same bytes.
        let mut seg = BTreeMap::new();
        seg.insert(
            0,
            Extent {
                at: Place::Seg(0x0101_0101_0101_0101),
                offset: 0,
                len: 4096,
            },
        );
        let mut chunk = BTreeMap::new();
        let mut fp = [0u8; 32];
        fp[..8].copy_from_slice(&0x0101_0101_0101_0101u64.to_le_bytes());
        chunk.insert(
            0,
            Extent {
                at: Place::Chunk(fp),
                offset: 0,
                len: 4096,
            },
        );
        assert_ne!(range_digests(&seg), range_digests(&chunk));
        // Every range's extents, and only its own.
        assert_eq!(
            range_extents(&m, 1).keys().copied().collect::<Vec<_>>(),
            vec![EXTENT_RANGE + 7]
        );
        assert_eq!(extent_page_of(extent_page(42, 3)), Some((42, 3)));
        assert_eq!(extent_page_of(CHUNK_PAGES), None);
        assert_eq!(extent_page_of(page_of(u64::from(u32::MAX))), None);
    }

    fn rec() -> StripeRecord {
        StripeRecord {
            stripe: 7,
            k: 1,
            m: 4,
            nodes: vec![1, 2, 3, 4, 5],
            crcs: vec![9; 5],
        }
    }

    fn commit() -> CommitRecord {
        CommitRecord {
            fs_uuid: [3; 16],
            seq: 42,
            epoch: 5,
            head: rec(),
        }
    }

    #[test]
    fn frames_round_trip_and_reject_damage() {
        let c = commit();
        let b = frame(COMMIT_MAGIC, &c, COMMIT_SLOT).unwrap();
        assert_eq!(b.len(), COMMIT_SLOT);
        assert_eq!(unframe::<CommitRecord>(COMMIT_MAGIC, &b).unwrap(), c);
        assert!(unframe::<CommitRecord>(META_MAGIC, &b).is_err());
        for i in [0, 9, 13, 20, 40] {
            let mut d = b.clone();
            d[i] ^= 1;
            assert!(
                unframe::<CommitRecord>(COMMIT_MAGIC, &d).is_err(),
                "byte {i}"
            );
        }
        assert!(unframe::<CommitRecord>(COMMIT_MAGIC, &[0u8; 4096]).is_err());
        assert!(unframe::<CommitRecord>(COMMIT_MAGIC, &b[..10]).is_err());
        assert!(matches!(
            frame(COMMIT_MAGIC, &vec![0u8; 5000], COMMIT_SLOT),
            Err(MetaError::TooBig(_))
        ));
    }

    #[test]
    fn frames_of_older_versions_read_and_newer_ones_are_refused() {
        let c = commit();
        let b = frame(COMMIT_MAGIC, &c, COMMIT_SLOT).unwrap();
        let as_version = |v: u32| {
            let mut d = b.clone();
            d[8..12].copy_from_slice(&v.to_le_bytes());
            let len = u32::from_le_bytes(d[12..16].try_into().unwrap()) as usize;
            let crc = crc32c::crc32c(&d[..16 + len]);
            d[16 + len..20 + len].copy_from_slice(&crc.to_le_bytes());
            unframe::<CommitRecord>(COMMIT_MAGIC, &d)
        };
        for v in OLDEST_READ..=VERSION {
            assert_eq!(as_version(v).unwrap(), c, "version {v}");
        }
        for v in [OLDEST_READ - 1, VERSION + 1] {
            let e = as_version(v).unwrap_err().to_string();
            assert!(e.contains(&format!("version {v} is not supported")), "{e}");
        }
        // A chunk entry of each encoding a version-6 file system can hold
        // survives its page's encoding.
        let encs = [
            Encoding::Raw,
            Encoding::Zstd,
            Encoding::Delta,
            Encoding::XorDelta,
            Encoding::Region,
            Encoding::Slice,
            Encoding::Planes,
            Encoding::XorPlanes,
        ];
        for (i, enc) in encs.into_iter().enumerate() {
            let e = ChunkEntry {
                fp: [i as u8; 32],
                seg: 3,
                offset: 64,
                stored: 100,
                len: 200,
                enc,
                base: enc.is_delta().then_some([9; 32]),
                refs: 1,
            };
            let back: ChunkEntry =
                postcard::from_bytes(&postcard::to_allocvec(&e).unwrap()).unwrap();
            assert_eq!(back, e);
            if enc != Encoding::Slice {
                assert_eq!(chunk_header(&e, 0)[12] as usize, i, "frame code of {enc:?}");
            }
        }
    }

    #[test]
    fn records_round_trip() {
        let mut ext = BTreeMap::new();
        ext.insert(
            4096,
            Extent {
                at: Place::Seg(3),
                offset: 100,
                len: 200,
            },
        );
        ext.insert(
            8192,
            Extent {
                at: Place::Chunk([7; 32]),
                offset: 10,
                len: 20,
            },
        );
        let inode = Inode {
            ino: 2,
            kind: Kind::File,
            perm: 0o644,
            uid: 0,
            gid: 0,
            nlink: 1,
            size: 4296,
            atime: 1,
            mtime: 2,
            ctime: 3,
            content: Content::File(ext),
        };
        let blob = PageBlob {
            fs_uuid: [1; 16],
            page: 0,
            inodes: vec![inode],
            chunks: vec![ChunkEntry {
                fp: [7; 32],
                seg: 3,
                offset: 300,
                stored: 9,
                len: 30,
                enc: Encoding::Delta,
                base: Some([8; 32]),
                refs: 2,
            }],
            similar: vec![(42, [8; 32])],
        };
        let back: PageBlob = decode(&encode(&blob), "page").unwrap();
        assert_eq!(back.inodes, blob.inodes);
        assert_eq!(back.chunks, blob.chunks);
        assert_eq!(back.similar, blob.similar);
        let r = MetaRecord::Batch(Batch {
            next_ino: 9,
            next_seg: 4,
            pages: vec![(0, Some(vec![rec()])), (3, None)],
            counts: Counts {
                inodes: 2,
                files: 1,
                dirs: 1,
                logical_bytes: 4296,
                chunks: 1,
                ..Default::default()
            },
            orphans: vec![5],
            ref_changes: vec![([7; 32], -1)],
            index: IndexDelta {
                chunks: vec![([9; 32], None)],
                similar: vec![(7, [9; 32])],
                merged: vec![CHUNK_PAGES | 1],
            },
            segments: vec![
                (
                    3,
                    Some(Segment {
                        records: vec![rec()],
                        len: 300,
                        live: 200,
                    }),
                ),
                (1, None),
            ],
        });
        let b = encode(&r);
        let MetaRecord::Batch(back) = decode::<MetaRecord>(&b, "record").unwrap() else {
            panic!("kind changed")
        };
        assert_eq!(back.pages[0].1.as_ref().unwrap()[0], rec());
        assert_eq!(back.counts.files, 1);
        assert_eq!(back.segments[0].1.as_ref().unwrap().records[0], rec());
        assert_eq!(back.index.chunks, vec![([9; 32], None)]);
        assert_eq!(back.index.merged, vec![CHUNK_PAGES | 1]);
        assert!(decode::<MetaRecord>(&b[..b.len() / 2], "record").is_err());
        // Version 7: the tail follows; a version 6 record has none.
        let tail = RecordTail {
            recompressed_below: 300,
            recompressed_level: 19,
        };
        let b7 = encode_record(&r, &tail);
        assert_eq!(&b7[..b.len()], &b[..]);
        let (MetaRecord::Batch(back), t) = decode_record(&b7).unwrap() else {
            panic!("kind changed")
        };
        assert_eq!((back.next_seg, t), (4, tail));
        assert_eq!(decode_record(&b).unwrap().1, RecordTail::default());
        let mut longer = b7.clone();
        longer.push(0);
        assert!(decode_record(&longer).is_err());
        assert!(decode_record(&b7[..b7.len() - 1]).is_err());
    }
}

#[cfg(test)]
mod index_tests {
    use super::*;

    /// Linear hashing: every hash has one bucket below `n`, and growing the
    /// table by one moves entries only out of the split bucket, into the new one.
    #[test]
    fn buckets_split_one_at_a_time() {
        let hashes: Vec<u64> = (0..5000u64)
            .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            .collect();
        for n in 1..300u64 {
            for &h in &hashes {
                let a = bucket(h, n);
                let b = bucket(h, n + 1);
                assert!(a < n && b <= n);
                if a != b {
                    assert_eq!((a, b), (split_source(n), n), "n={n} h={h:x}");
                }
            }
        }
    }

    #[test]
    fn chunk_headers_round_trip() {
        let e = ChunkEntry {
            fp: [3; 32],
            seg: 1,
            offset: 0,
            stored: 77,
            len: 100,
            enc: Encoding::Zstd,
            base: None,
            refs: 1,
        };
        let h = chunk_header(&e, 19);
        assert_eq!(parse_chunk_header(&h), Some(([3; 32], 77)));
        assert_eq!(frame_effort(&h), 19);
        assert_eq!(frame_effort(&chunk_header(&e, 0)), 0);
        assert_eq!(frame_effort(&h[..40]), 0);
        assert_eq!(parse_chunk_header(&h[..40]), None);
        assert_eq!(parse_chunk_header(&[0u8; 48]), None);
    }
}
