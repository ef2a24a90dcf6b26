//! The file system: POSIX operations over a data log and a metadata log,
//! both on the D-nodes (formats in [`super::meta`]).
//!
//! Data path. A write copies its bytes into the *open segment* (one
//! stripe's worth of data, `k * strip_size`) and points the file's extent
//! map at them; a full segment is written as one stripe of `k + m` strips
//! to `k + m` D-nodes in parallel (full-stripe writes only: no parity is
//! ever read back and modified). Overwritten bytes become dead in their old
//! segment; a segment whose bytes are all dead is freed. A read looks up
//! the extent map and reads only the byte range of the strips that hold it
//! (or the open segment's memory).
//!
//! Commit. `fsync`, `unlink`, `rename`, `rmdir` and a timer commit: writes
//! are held off briefly while the open segment is written and the changed
//! metadata is captured, then the metadata goes out as metadata stripes and
//! the commit record to every D-node; a majority acknowledges it. Freed
//! stripes are reused only after the commit that freed them is durable, so
//! recovery to any durable commit finds its data intact.
//!
//! What the C-node holds is a cache of the committed state plus what is not
//! yet committed; any other C-node that mounts after it rebuilds the same
//! state from the D-nodes.

use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dase_erasure::{Geometry, Layout};

use super::cluster::{Cluster, ClusterFile};
use super::lease::Lease;
use super::meta::{
    self, page_of, Batch, ChunkEntry, CommitRecord, Content, Counts, Extent, Image, Inode, Kind,
    MetaPart, MetaRecord, PageBlob, PageLocation, Place, Segment, COMMIT_MAGIC, COMMIT_SLOT,
    META_MAGIC, ROOT_INO,
};
use crate::reduce::{Encoding, Fp, Reduce};
use meta::IndexDelta;

mod filters;
mod reduce;
use super::superblock::{self, Superblock};
use super::volume::{StripeRecord, Volume, VolumeError};
use crate::host::{join_all, ControllerOptions};
pub use reduce::{
    check_region_bytes, Ingest, PassScope, RecompressReport, RECOMPRESS_LEVEL, REGION_BYTES,
};

pub const NAME_MAX: usize = 255;

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("file exists")]
    Exists,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("directory not empty")]
    NotEmpty,
    #[error("file name too long")]
    NameTooLong,
    #[error("operation not permitted")]
    NotPermitted,
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("no space left on the D-nodes")]
    NoSpace,
    #[error("files are at most {} bytes", meta::MAX_FILE_BYTES)]
    FileTooBig,
    #[error("read-only: {0}")]
    ReadOnly(String),
    #[error("I/O error: {0}")]
    Io(String),
    /// Internal: the page holding an inode must be read from the D-nodes
    /// first (the operation is retried); never returned to callers.
    #[error("metadata page {0} not loaded")]
    NotLoaded(u64),
}

impl FsError {
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc_errno::ENOENT,
            FsError::Exists => libc_errno::EEXIST,
            FsError::NotDir => libc_errno::ENOTDIR,
            FsError::IsDir => libc_errno::EISDIR,
            FsError::NotEmpty => libc_errno::ENOTEMPTY,
            FsError::NameTooLong => libc_errno::ENAMETOOLONG,
            FsError::NotPermitted => libc_errno::EPERM,
            FsError::Invalid(_) => libc_errno::EINVAL,
            FsError::NoSpace => libc_errno::ENOSPC,
            FsError::FileTooBig => libc_errno::EFBIG,
            FsError::ReadOnly(_) => libc_errno::EROFS,
            FsError::Io(_) | FsError::NotLoaded(_) => libc_errno::EIO,
        }
    }
}

/// The errno values this module returns (Linux numbering).
mod libc_errno {
    pub const EPERM: i32 = 1;
    pub const ENOENT: i32 = 2;
    pub const EIO: i32 = 5;
    pub const EEXIST: i32 = 17;
    pub const ENOTDIR: i32 = 20;
    pub const EISDIR: i32 = 21;
    pub const EINVAL: i32 = 22;
    pub const EFBIG: i32 = 27;
    pub const ENOSPC: i32 = 28;
    pub const EROFS: i32 = 30;
    pub const ENAMETOOLONG: i32 = 36;
    pub const ENOTEMPTY: i32 = 39;
}

impl From<VolumeError> for FsError {
    fn from(e: VolumeError) -> Self {
        FsError::Io(e.to_string())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Superblock(#[from] superblock::SuperblockError),
    #[error(transparent)]
    Lease(#[from] super::lease::LeaseError),
    #[error("recovering the metadata: {0}")]
    Recovery(String),
}

/// What a caller sees of an inode.
#[derive(Clone, Debug)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub size: u64,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
}

/// A time to set: a given one or now.
#[derive(Clone, Copy, Debug)]
pub enum SetTime {
    At(SystemTime),
    Now,
}

#[derive(Clone, Debug, Default)]
pub struct SetAttr {
    pub perm: Option<u16>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
}

/// What [`FileSystem::create`] makes.
#[derive(Clone, Copy, Debug)]
pub enum NewKind<'a> {
    File,
    Dir,
    /// A symbolic link to this target.
    Symlink(&'a [u8]),
}

pub struct DirEntry {
    pub ino: u64,
    pub kind: Kind,
    pub name: Vec<u8>,
}

#[derive(Clone, Debug)]
pub struct Options {
    pub lease_ttl: Duration,
    /// Uncommitted changes are committed at least this often.
    pub commit_interval: Duration,
    /// Who holds the lease (for other C-nodes' error messages).
    pub description: String,
    /// Open without the lease and never write (stats, fsck without repair).
    pub read_only: bool,
    /// Re-stripe the data of a D-node that stays down this long over the
    /// others (None: only on request).
    pub rebuild_after: Option<Duration>,
    /// Metadata pages (of `meta::PAGE_INODES` inodes) kept in memory once
    /// committed; dirty pages stay until their commit.
    pub cache_pages: usize,
    /// Index entries journalled before commits start merging them into
    /// their buckets; writers wait beyond four times as many (the index
    /// buffer's share of memory, about 150 bytes an entry).
    pub index_buffer: usize,
    /// Bytes of decoded reference chunks kept for the deltas that follow
    /// ([`crate::reduce::ReferenceCache`]; 0: none).
    pub reference_cache: usize,
    /// Bytes of filters of evicted index buckets kept
    /// (`filters`; 0: none), ~8 bytes a stored chunk.
    pub index_filters: usize,
    /// At mount, read the index buckets (within the filters' budget) to
    /// make their filters, so that a fresh C-node's lookups of new chunks
    /// load no pages from the start ([`FileSystem::warm_filters`]).
    pub warm_filters: bool,
    /// Once nothing has been written for this long, a reducing mount
    /// recompresses what was written since its last pass
    /// ([`FileSystem::recompress`] with [`PassScope::Idle`]; None: never).
    pub recompress_idle: Option<Duration>,
    /// Content per compression region of those passes (0: chunk by chunk).
    pub recompress_region: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            lease_ttl: Duration::from_secs(10),
            commit_interval: Duration::from_secs(2),
            description: format!("pid {}", std::process::id()),
            read_only: false,
            rebuild_after: None,
            cache_pages: 512,
            index_buffer: reduce::MERGE_AT,
            reference_cache: reduce::REFERENCE_CACHE,
            index_filters: reduce::INDEX_FILTERS,
            warm_filters: true,
            recompress_idle: None,
            recompress_region: REGION_BYTES,
        }
    }
}

/// The metadata geometry for a data geometry over `nodes` D-nodes: one
/// strip mirrored `m + 1` times (more redundancy than data), fewer where
/// the cluster is too small.
pub fn meta_geometry(data: &Geometry, nodes: usize) -> Result<Geometry, dase_erasure::Error> {
    let m = (data.m() + 1).min(nodes.saturating_sub(1)).max(1);
    Geometry::new(1, m, data.strip_size(), Layout::ReedSolomon)
}

/// Where a write of `len` bytes at `offset` ends, if a file may hold it.
pub(super) fn file_end(offset: u64, len: usize) -> Result<u64, FsError> {
    match offset.checked_add(len as u64) {
        None => Err(FsError::Invalid("offset + length overflows".into())),
        Some(end) if end > meta::MAX_FILE_BYTES => Err(FsError::FileTooBig),
        Some(end) => Ok(end),
    }
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn to_time(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

fn from_time(t: SetTime) -> i64 {
    match t {
        SetTime::Now => now_ns(),
        SetTime::At(t) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => d.as_nanos() as i64,
            Err(e) => -(e.duration().as_nanos() as i64),
        },
    }
}

/// What a commit captured while writers were held off.
struct Snapshot {
    /// Changed pages, encoded (None: the page is now empty).
    pages: Vec<(u64, Option<Vec<u8>>)>,
    segments: Vec<(u64, Option<Segment>)>,
    next_ino: u64,
    next_seg: u64,
    counts: Counts,
    orphans: Vec<u64>,
    ref_changes: Vec<(Fp, i32)>,
    /// Index changes since the last snapshot (for an image: all of them).
    index: IndexDelta,
    tail: meta::RecordTail,
    to_free: Vec<u64>,
    changes: u64,
}

/// The segment being filled.
struct OpenSegment {
    id: u64,
    buf: Vec<u8>,
}

/// One page of inodes in memory.
#[derive(Default)]
struct Page {
    inodes: HashMap<u64, Inode>,
    /// Chunk-index pages hold these instead.
    chunks: HashMap<Fp, ChunkEntry>,
    /// Similarity-index pages hold these.
    similar: HashMap<u64, Fp>,
    /// Inode pages: for each file of the page (and each freed since whose
    /// extent pages are not yet removed), the digest of what each of its
    /// extent pages holds on the D-nodes ([`meta::range_digests`]; 0: no
    /// page, [`UNKNOWN_RANGE`]: unknown, so rewritten): a commit writes the
    /// ranges whose extents differ from it.
    ranges: HashMap<u64, BTreeMap<u64, u128>>,
    /// Last use (a clock tick), for eviction.
    used: u64,
}

/// A range digest no extents have: the range's page is written (or
/// removed) at the next commit whatever it holds.
const UNKNOWN_RANGE: u128 = u128::MAX;

impl Page {
    fn is_empty(&self) -> bool {
        self.inodes.is_empty() && self.chunks.is_empty() && self.similar.is_empty()
    }
}

/// The inodes: a cache of pages over their committed copies on the
/// D-nodes. An inode is visible only when its page is resident: every
/// operation first `require`s the inodes it touches (loading pages and
/// retrying as needed) and only then changes anything.
#[derive(Default)]
struct Inodes {
    pages: HashMap<u64, Page>,
    /// Where each page's committed blob is.
    map: BTreeMap<u64, PageLocation>,
    /// Pages changed since the last commit snapshot.
    dirty: BTreeSet<u64>,
    /// Inodes changed since the last commit snapshot (every change goes
    /// through `get_mut`, `insert` or `remove`): the only files whose
    /// extent ranges it digests, besides those whose digests are unknown.
    touched: HashSet<u64>,
    /// Pages a commit has captured but whose new location is not yet in
    /// `map`: evicting one now would lose its changes.
    committing: BTreeSet<u64>,
    /// Most pages kept in memory (beyond dirty and committing ones).
    limit: usize,
    clock: u64,
    /// Of index buckets evicted (see [`filters`]).
    filters: filters::Filters,
}

impl Inodes {
    /// The page to load before `ino` can be looked at, if any.
    fn missing(&self, ino: u64) -> Option<u64> {
        self.missing_page(page_of(ino))
    }

    /// Whether page `p` exists on the D-nodes and is not in memory.
    fn missing_page(&self, p: u64) -> Option<u64> {
        (!self.pages.contains_key(&p) && self.map.contains_key(&p)).then_some(p)
    }

    /// The page to load before looking up a key of `tag` in bucket `p`, if
    /// any: none when the bucket is resident, does not exist, or its
    /// filter says the key is not there.
    fn bucket_to_load(&self, p: u64, tag: u16) -> Option<u64> {
        let p = self.missing_page(p)?;
        (self.filters.may_hold(p, tag) != Some(false)).then_some(p)
    }

    /// Page `p` (resident or new), marked changed.
    fn page_mut(&mut self, p: u64) -> &mut Page {
        debug_assert!(self.missing_page(p).is_none());
        // Its filter (if any) described it before this change.
        self.filters.remove(p);
        self.dirty.insert(p);
        let used = self.clock;
        self.pages.entry(p).or_insert_with(|| Page {
            used,
            ..Default::default()
        })
    }

    fn get(&self, ino: &u64) -> Option<&Inode> {
        self.pages.get(&page_of(*ino))?.inodes.get(ino)
    }

    fn get_mut(&mut self, ino: &u64) -> Option<&mut Inode> {
        let p = page_of(*ino);
        let i = self.pages.get_mut(&p)?.inodes.get_mut(ino)?;
        self.dirty.insert(p);
        self.touched.insert(*ino);
        Some(i)
    }

    /// The page must be resident or new (`require` saw to it).
    fn insert(&mut self, ino: u64, i: Inode) {
        let p = page_of(ino);
        debug_assert!(self.missing(ino).is_none());
        self.dirty.insert(p);
        self.touched.insert(ino);
        self.pages.entry(p).or_default().inodes.insert(ino, i);
    }

    fn remove(&mut self, ino: &u64) -> Option<Inode> {
        let p = page_of(*ino);
        let i = self.pages.get_mut(&p)?.inodes.remove(ino)?;
        self.dirty.insert(p);
        self.touched.insert(*ino);
        Some(i)
    }

    /// Drops clean pages, least recently used first, down to the limit.
    /// (A quarter more is tolerated first, so one sort serves many loads.)
    /// Pages in `pinned` stay: an operation is loading them one by one.
    fn evict(&mut self, pinned: &[u64]) {
        let keep = self.limit.max(1);
        if self.pages.len() <= keep + keep / 4 {
            return;
        }
        let mut clean: Vec<(u64, u64)> = self
            .pages
            .iter()
            .filter(|(p, _)| {
                !self.dirty.contains(p)
                    && !self.committing.contains(p)
                    && self.map.contains_key(p)
                    && !pinned.contains(p)
            })
            .map(|(p, pg)| (pg.used, *p))
            .collect();
        clean.sort_unstable();
        let excess = self.pages.len().saturating_sub(keep);
        for (_, p) in clean.into_iter().take(excess) {
            let Some(pg) = self.pages.remove(&p) else {
                continue;
            };
            if filters::is_bucket(p) {
                // Clean, so what it holds is what is committed, and it
                // cannot change until it is loaded again.
                let f = filters::Filter::of_bucket(p, pg.chunks.keys(), pg.similar.keys());
                self.filters.insert(p, f);
            }
        }
    }
}

/// Adds the time since `.0` to `.1` (microseconds) when dropped.
struct Held<'a>(std::time::Instant, &'a std::sync::atomic::AtomicU64);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.1
            .fetch_add(self.0.elapsed().as_micros() as u64, Ordering::Relaxed);
    }
}

impl reduce::Ingest {
    /// Samples the resident pages for the peak ([`reduce::Ingest::peak_pages`]).
    /// And the index buffer's ([`reduce::Ingest::peak_buffered`]).
    fn note_resident(&self, st: &State) {
        self.peak_pages
            .fetch_max(st.inodes.pages.len() as u64, Ordering::Relaxed);
        self.peak_buffered
            .fetch_max(st.index.len() as u64, Ordering::Relaxed);
    }
}

impl std::ops::Index<&u64> for Inodes {
    type Output = Inode;
    fn index(&self, ino: &u64) -> &Inode {
        self.get(ino).expect("required inode is resident")
    }
}

#[derive(Default)]
struct State {
    inodes: Inodes,
    counts: Counts,
    /// Unlinked but still open: freed at release, or at the next mount.
    orphans: BTreeSet<u64>,
    /// Every segment, written or not (records empty until written).
    segs: HashMap<u64, Segment>,
    next_ino: u64,
    next_seg: u64,
    /// How far recompression passes have read (committed with the log).
    tail: meta::RecordTail,
    /// Segments this mount filled: the lowest effort among their frames an
    /// idle pass would store again (`u8::MAX`: none), so that idle passes
    /// need not read segments of raw chunks and number planes to find
    /// that out. Forgotten once the pass mark is past them or they are
    /// freed; kept only with idle passes on (`track_filled`), since
    /// nothing else would ever forget them.
    filled: HashMap<u64, u8>,
    track_filled: bool,
    open: Option<OpenSegment>,
    /// Sealed segments not yet written (or whose write failed: the next
    /// commit retries them). Reads are served from here meanwhile.
    unwritten: BTreeMap<u64, Bytes>,
    /// Stripes below `high` that are free; `high` and above are free too.
    free: BTreeSet<u64>,
    high: u64,
    capacity: u64,
    /// Freed since the last commit snapshot: reusable once that commit is durable.
    pending_free: Vec<u64>,
    dirty_segs: HashSet<u64>,
    open_handles: HashMap<u64, u32>,
    /// Bumped by every change; a commit covers the changes up to its snapshot.
    changes: u64,
    reduce: Reduce,
    /// Reference count changes of chunks not yet applied to the chunk index
    /// (extents dropped or split, deltas freed): applied in batches before
    /// each commit, and committed with it if they could not be.
    ref_changes: Vec<(Fp, i32)>,
    /// Index entries not yet merged into their bucket pages.
    index: reduce::IndexBuffer,
}

/// The committed log.
struct LogState {
    seq: u64,
    head: Option<StripeRecord>,
    /// Stripes of the log since (and including) its newest image.
    chain: Vec<u64>,
    journal_bytes: usize,
    image_bytes: usize,
    committed_changes: u64,
    /// Write an image at the next commit (after a failed commit, the
    /// in-memory dirty sets no longer describe the difference).
    force_image: bool,
}

pub struct FileSystem {
    cluster: Arc<Cluster>,
    data: Volume,
    meta: Volume,
    sb: Superblock,
    seg_bytes: usize,
    state: Mutex<State>,
    /// Writers hold it shared while they copy into and write segments; a
    /// commit holds it exclusively while it captures a consistent snapshot.
    quiesce: Arc<tokio::sync::RwLock<()>>,
    log: tokio::sync::Mutex<LogState>,
    lease: tokio::sync::Mutex<Option<Lease>>,
    epoch: u64,
    opts: Options,
    /// Set when the file system must stop writing (lease lost, commit failed).
    stopped: Mutex<Option<String>>,
    shutdown: tokio::sync::Notify,
    closing: AtomicBool,
    /// One rebuild at a time: each replaces segment records it read earlier.
    rebuilding: tokio::sync::Mutex<()>,
    /// Held by an idle recompression pass while it runs: a close waits
    /// for it (it stops at its next segment), so that nothing writes
    /// after the lease is released.
    idle_pass: tokio::sync::Mutex<()>,
    /// After a failed idle pass, none starts before this.
    idle_retry_at: Mutex<Option<std::time::Instant>>,
    /// Commits merge the index buffer even below its threshold
    /// (`merge_index` sets it while it folds the buffer in).
    merge_all: AtomicBool,
    /// Pending (not yet chunked) bytes of files being written, when reducing.
    writers: Mutex<HashMap<u64, reduce::Writer>>,
    ingest: Ingest,
    /// Compression regions recently decoded (for reads of their members).
    regions: Mutex<reduce::RegionCache>,
    /// Reference chunks recently decoded (for the deltas on them).
    references: Mutex<crate::reduce::ReferenceCache>,
    /// Fault injection for tests: this many reference chunks fetched next
    /// are damaged in memory before the delta on them is decoded.
    damage_fetched: std::sync::atomic::AtomicUsize,
    /// This file system, for work that must outlive the call that started
    /// it (a commit: see [`FileSystem::commit_changes`]). Set by `open`.
    me: std::sync::OnceLock<std::sync::Weak<FileSystem>>,
}

/// What `fsck` found.
#[derive(Debug, Default)]
pub struct FsckReport {
    pub inodes: usize,
    pub chunks: usize,
    pub files: usize,
    pub dirs: usize,
    pub segments: usize,
    pub stripes_checked: usize,
    pub strips_repaired: usize,
    /// Stripes with strips on D-nodes that are down.
    pub degraded_stripes: usize,
    pub problems: Vec<String>,
}

/// What `stats` reports.
#[derive(Debug, Default)]
pub struct Stats {
    pub files: u64,
    pub dirs: u64,
    pub logical_bytes: u64,
    pub live_bytes: u64,
    pub stored_bytes: u64,
    /// D-node bytes of the committed metadata, every copy.
    pub metadata_bytes: u64,
    /// The usable capacity its stripes take from data: a stripe takes its
    /// slot on every D-node, the ones it is not on included (volume.rs),
    /// so a mirrored metadata stripe costs a whole data stripe's room.
    pub metadata_capacity_bytes: u64,
    pub capacity_bytes: u64,
    pub free_bytes: u64,
    /// Per D-node: strips it holds.
    pub per_node_strips: Vec<u64>,
    pub strip_size: usize,
    pub commit_seq: u64,
    pub reduce: Reduce,
    /// The recorded totals (chunks, bytes after each reduction stage).
    pub counts: Counts,
    /// Bytes the chunk and similarity indexes take on the D-nodes (all
    /// copies of their committed pages).
    pub chunk_index_bytes: u64,
    pub similar_index_bytes: u64,
    /// Index entries journalled in the metadata log but not yet merged
    /// into the bucket pages.
    pub index_buffered: u64,
    /// How far recompression passes have read ([`meta::RecordTail`]),
    /// and the number the next segment will get.
    pub recompressed: meta::RecordTail,
    pub next_segment: u64,
}

impl FileSystem {
    /// Writes an empty file system's metadata (a root directory) after
    /// `superblock::format`.
    pub async fn format_metadata(
        cluster: &Arc<Cluster>,
        sb: &Superblock,
        reduce: Reduce,
    ) -> Result<(), MountError> {
        let geo = sb
            .geometry()
            .map_err(|e| MountError::Config(e.to_string()))?;
        let meta = Volume::new(
            cluster.clone(),
            meta_geometry(&geo, cluster.len()).map_err(|e| MountError::Config(e.to_string()))?,
        )
        .map_err(|e| MountError::Config(e.to_string()))?;
        let t = now_ns();
        let root = Inode {
            ino: ROOT_INO,
            kind: Kind::Dir,
            perm: 0o755,
            uid: 0,
            gid: 0,
            nlink: 2,
            size: 0,
            atime: t,
            mtime: t,
            ctime: t,
            content: Content::Dir {
                parent: ROOT_INO,
                entries: BTreeMap::new(),
            },
        };
        let blob = PageBlob {
            fs_uuid: sb.fs_uuid,
            page: page_of(ROOT_INO),
            inodes: vec![root],
            chunks: vec![],
            similar: vec![],
        };
        let cfg = |e: FsError| MountError::Recovery(e.to_string());
        let page = write_parts(
            &meta,
            sb.fs_uuid,
            1,
            false,
            None,
            &meta::encode(&blob),
            &[1],
        )
        .await
        .map_err(cfg)?;
        let image = MetaRecord::Image(Image {
            reduce,
            next_ino: ROOT_INO + 1,
            next_seg: 0,
            pages: vec![(page_of(ROOT_INO), page)],
            segments: vec![],
            counts: Counts {
                inodes: 1,
                dirs: 1,
                chunk_buckets: 1,
                similar_buckets: 1,
                ..Default::default()
            },
            orphans: vec![],
            ref_changes: vec![],
            index: IndexDelta::default(),
        });
        let head = write_parts(
            &meta,
            sb.fs_uuid,
            1,
            true,
            None,
            &meta::encode_record(&image, &meta::RecordTail::default()),
            &[0],
        )
        .await
        .map_err(cfg)?
        .pop()
        .expect("one part");
        let commit = CommitRecord {
            fs_uuid: sb.fs_uuid,
            seq: 1,
            epoch: 0,
            head,
        };
        let block = meta::frame(COMMIT_MAGIC, &commit, COMMIT_SLOT)
            .map_err(|e| MountError::Config(e.to_string()))?;
        let empty = vec![0u8; COMMIT_SLOT];
        let commit = &commit;
        for r in join_all((0..cluster.len()).map(|i| {
            let (block, empty) = (block.clone(), empty.clone());
            async move {
                // Both slots: the other may hold a commit of a file system
                // this one replaced (a different UUID, ignored anyway).
                cluster
                    .write(i, commit.offset(), bytes::Bytes::from(block))
                    .await?;
                let other = meta::COMMIT_OFFSET + ((commit.seq + 1) % 2) * COMMIT_SLOT as u64;
                cluster.write(i, other, bytes::Bytes::from(empty)).await?;
                cluster.flush(i).await
            }
        }))
        .await
        {
            r.map_err(|e| MountError::Recovery(format!("writing the first commit: {e}")))?;
        }
        Ok(())
    }

    /// Connects to the cluster, checks it against the superblocks, takes
    /// the lease (unless read-only) and recovers the newest commit.
    pub async fn open(file: &ClusterFile, opts: Options) -> Result<Arc<Self>, MountError> {
        file.validate()
            .map_err(|e| MountError::Config(e.to_string()))?;
        let cluster = Arc::new(
            Cluster::connect(
                file,
                ControllerOptions {
                    io_queues: 2,
                    ..Default::default()
                },
            )
            .await,
        );
        let n = cluster.len();
        let up = cluster.up_count();
        let down = cluster.unreachable();
        // The newest commit is on a majority: fewer reachable could miss it.
        if up < n / 2 + 1 {
            return Err(MountError::Config(format!(
                "only {up} of {n} D-nodes reachable, a majority ({}) is needed; unreachable: {}",
                n / 2 + 1,
                down.join("; ")
            )));
        }
        if !down.is_empty() {
            tracing::warn!(unreachable = %down.join("; "), "mounting with D-nodes down: their strips are reconstructed from parity");
        }
        let sb = superblock::verify(&cluster, file).await?;
        let geo = sb
            .geometry()
            .map_err(|e| MountError::Config(format!("superblock geometry: {e}")))?;
        if up < geo.m() + 1 {
            return Err(MountError::Config(format!(
                "only {up} D-nodes reachable; {geo} needs at least {}",
                geo.m() + 1
            )));
        }
        if opts.recompress_idle.is_some() {
            check_region_bytes(opts.recompress_region, sb.avg_chunk())
                .map_err(|e| MountError::Config(format!("--recompress-region: {e}")))?;
        }
        let mut data =
            Volume::new(cluster.clone(), geo).map_err(|e| MountError::Config(e.to_string()))?;
        let mgeo = meta_geometry(&geo, n).map_err(|e| MountError::Config(e.to_string()))?;
        let mut meta =
            Volume::new(cluster.clone(), mgeo).map_err(|e| MountError::Config(e.to_string()))?;
        if opts.read_only {
            data = data.without_repair();
            meta = meta.without_repair();
        }
        let mut lease = None;
        if !opts.read_only {
            let mut l = Lease::new(sb.fs_uuid, &opts.description, opts.lease_ttl);
            l.acquire(&cluster).await?;
            lease = Some(l);
        }
        let epoch = now_ns() as u64;
        let references = Mutex::new(crate::reduce::ReferenceCache::new(opts.reference_cache));
        let fs = Self {
            seg_bytes: geo.data_bytes(),
            data,
            meta,
            cluster: cluster.clone(),
            sb,
            state: Mutex::new(State::default()),
            quiesce: Arc::new(tokio::sync::RwLock::new(())),
            log: tokio::sync::Mutex::new(LogState {
                seq: 0,
                head: None,
                chain: vec![],
                journal_bytes: 0,
                image_bytes: 0,
                committed_changes: 0,
                force_image: false,
            }),
            lease: tokio::sync::Mutex::new(lease),
            epoch,
            opts,
            stopped: Mutex::new(None),
            shutdown: tokio::sync::Notify::new(),
            closing: AtomicBool::new(false),
            rebuilding: tokio::sync::Mutex::new(()),
            idle_pass: tokio::sync::Mutex::new(()),
            idle_retry_at: Mutex::new(None),
            merge_all: AtomicBool::new(false),
            writers: Mutex::new(HashMap::new()),
            ingest: Ingest::default(),
            regions: Mutex::default(),
            references,
            damage_fetched: Default::default(),
            me: std::sync::OnceLock::new(),
        };
        if let Err(e) = fs.recover().await {
            if let Some(mut l) = fs.lease.lock().await.take() {
                l.release(&cluster).await;
            }
            return Err(e);
        }
        let fs = Arc::new(fs);
        let _ = fs.me.set(Arc::downgrade(&fs));
        if !fs.opts.read_only {
            tokio::spawn(Self::keep_lease(Arc::downgrade(&fs)));
        }
        Ok(fs)
    }

    /// Renews the lease every third of its time until the file system
    /// closes, in a task of its own: whoever holds the file system open
    /// (a mount, or `dase clean --recompress` offline for hours) keeps it
    /// however long any of its work takes — a lease that runs out while
    /// its holder still writes lets a second holder in.
    async fn keep_lease(fs: std::sync::Weak<FileSystem>) {
        let Some(every) = fs.upgrade().map(|f| f.opts.lease_ttl / 3) else {
            return;
        };
        loop {
            tokio::time::sleep(every).await;
            let Some(fs) = fs.upgrade() else { return };
            if fs.closing.load(Ordering::Acquire) {
                return;
            }
            let mut l = fs.lease.lock().await;
            let Some(lease) = l.as_mut() else { return };
            if let Err(e) = lease.renew(&fs.cluster).await {
                fs.stop(format!("the lease was lost: {e}"));
                return;
            }
        }
    }

    /// Finds the newest commit and replays the log from its image.
    async fn recover(&self) -> Result<(), MountError> {
        let uuid = self.sb.fs_uuid;
        let c = &self.cluster;
        let reads =
            join_all((0..c.len()).filter(|&i| c.is_up(i)).map(|i| async move {
                c.read(i, meta::COMMIT_OFFSET, 2 * COMMIT_SLOT).await.ok()
            }))
            .await;
        let slots = || {
            reads
                .iter()
                .flatten()
                .flat_map(|b| [0, COMMIT_SLOT].map(|o| &b[o..o + COMMIT_SLOT]))
        };
        if let Some(v) = slots().find_map(|s| meta::newer_version(COMMIT_MAGIC, s)) {
            return Err(MountError::Recovery(format!(
                "this file system was committed by a newer dase (metadata version {v}; this dase \
                 reads versions {} to {}): use that dase or a newer one",
                meta::OLDEST_READ,
                meta::VERSION
            )));
        }
        let best = reads
            .into_iter()
            .flatten()
            .flat_map(|b| {
                [0, COMMIT_SLOT].map(|o| {
                    meta::unframe::<CommitRecord>(COMMIT_MAGIC, &b[o..o + COMMIT_SLOT]).ok()
                })
            })
            .flatten()
            .filter(|r| r.fs_uuid == uuid)
            .max_by_key(|r| r.order())
            .ok_or_else(|| {
                MountError::Recovery(
                    "no commit record on any reachable D-node (was this file system made by an older dase mkfs? run dase mkfs --force)".into(),
                )
            })?;
        // Walk back from the head to the newest image.
        let strip = self.meta.geometry().strip_size();
        let mut parts: Vec<MetaPart> = Vec::new();
        let mut chain = Vec::new();
        let mut cur = Some(best.head.clone());
        while let Some(rec) = cur {
            if chain.len() > 50_000_000 {
                return Err(MountError::Recovery("metadata chain does not end".into()));
            }
            let b = self.meta.read(&rec, 0, strip).await.map_err(|e| {
                MountError::Recovery(format!("metadata stripe {}: {e}", rec.stripe))
            })?;
            let p: MetaPart = meta::unframe(META_MAGIC, &b).map_err(|e| {
                MountError::Recovery(format!("metadata stripe {}: {e}", rec.stripe))
            })?;
            if p.fs_uuid != uuid {
                return Err(MountError::Recovery(format!(
                    "metadata stripe {} belongs to another file system",
                    rec.stripe
                )));
            }
            chain.push(rec.stripe);
            cur = p.prev.clone();
            let end = p.image && p.part == 0;
            parts.push(p);
            if end {
                break;
            }
            if cur.is_none() {
                return Err(MountError::Recovery(
                    "metadata chain ends without an image".into(),
                ));
            }
        }
        parts.reverse();
        let mut st = State {
            track_filled: self.opts.recompress_idle.is_some(),
            ..State::default()
        };
        let mut buf = Vec::new();
        let mut image_bytes = 0;
        let mut journal_bytes = 0;
        let mut first = true;
        for p in parts {
            buf.extend_from_slice(&p.payload);
            if !p.last {
                continue;
            }
            let (rec, tail) =
                meta::decode_record(&buf).map_err(|e| MountError::Recovery(e.to_string()))?;
            st.tail = tail;
            match rec {
                MetaRecord::Image(img) if first => {
                    image_bytes = buf.len();
                    st.reduce = img.reduce;
                    st.ref_changes = img.ref_changes;
                    st.next_ino = img.next_ino;
                    st.next_seg = img.next_seg;
                    st.inodes.map = img.pages.into_iter().collect();
                    st.segs = img.segments.into_iter().collect();
                    st.counts = img.counts;
                    st.orphans = img.orphans.into_iter().collect();
                    st.index.replay(img.index, &st.counts);
                }
                MetaRecord::Batch(b) if !first => {
                    journal_bytes += buf.len();
                    st.ref_changes = b.ref_changes;
                    st.next_ino = b.next_ino;
                    st.next_seg = b.next_seg;
                    st.counts = b.counts;
                    st.orphans = b.orphans.into_iter().collect();
                    st.index.replay(b.index, &st.counts);
                    for (p, loc) in b.pages {
                        match loc {
                            Some(l) => st.inodes.map.insert(p, l),
                            None => st.inodes.map.remove(&p),
                        };
                    }
                    for (id, s) in b.segments {
                        match s {
                            Some(s) => st.segs.insert(id, s),
                            None => st.segs.remove(&id),
                        };
                    }
                }
                _ => {
                    return Err(MountError::Recovery(
                        "metadata log out of order (an image must start it)".into(),
                    ))
                }
            }
            first = false;
            buf.clear();
        }
        if !buf.is_empty() || first {
            return Err(MountError::Recovery("metadata log ends mid-record".into()));
        }
        if !st.inodes.map.contains_key(&page_of(ROOT_INO)) {
            return Err(MountError::Recovery("no root directory".into()));
        }
        // Free space is whatever no segment, page or log stripe uses.
        st.capacity = self.data.capacity_stripes();
        let mut used: BTreeSet<u64> = chain.iter().copied().collect();
        for loc in st.inodes.map.values() {
            used.extend(loc.iter().map(|r| r.stripe));
        }
        for s in st.segs.values() {
            for r in &s.records {
                used.insert(r.stripe);
            }
        }
        st.high = used.last().map(|s| s + 1).unwrap_or(0);
        st.free = (0..st.high).filter(|s| !used.contains(s)).collect();
        st.segs.retain(|_, s| !s.records.is_empty());
        let mut log = self.log.lock().await;
        log.seq = best.seq;
        log.head = Some(best.head);
        log.chain = chain;
        log.image_bytes = image_bytes;
        log.journal_bytes = journal_bytes;
        drop(log);
        let orphans: Vec<u64> = st.orphans.iter().copied().collect();
        st.inodes.limit = self.opts.cache_pages;
        st.inodes.filters.set_budget(self.opts.index_filters);
        *self.state.lock().unwrap() = st;
        // Orphans: unlinked while open when the previous C-node stopped.
        for ino in orphans {
            tracing::info!(ino, "freeing an orphan inode");
            self.with_state(|st| {
                st.require(&[ino])?;
                st.delete_inode(ino);
                Ok(())
            })
            .await
            .map_err(|e| MountError::Recovery(format!("freeing orphan {ino}: {e}")))?;
        }
        // The root must be readable: load its page now.
        self.getattr(ROOT_INO)
            .await
            .map_err(|e| MountError::Recovery(format!("the root directory: {e}")))?;
        tracing::info!(
            seq = best.seq,
            inodes = self.state.lock().unwrap().counts.inodes,
            "file system recovered"
        );
        Ok(())
    }

    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }

    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    pub fn geometry(&self) -> &Geometry {
        self.data.geometry()
    }

    pub fn meta_geometry(&self) -> &Geometry {
        self.meta.geometry()
    }

    fn check_writable(&self) -> Result<(), FsError> {
        if self.opts.read_only {
            return Err(FsError::ReadOnly("opened read-only".into()));
        }
        if let Some(why) = self.stopped.lock().unwrap().as_ref() {
            return Err(FsError::ReadOnly(why.clone()));
        }
        Ok(())
    }

    fn stop(&self, why: String) {
        tracing::error!(reason = %why, "the file system stops writing");
        self.stopped.lock().unwrap().get_or_insert(why);
    }

    // ---- namespace operations -------------------------------------------

    /// Runs `f` on the state, loading whatever page it reports missing and
    /// running it again (it changes nothing before all its inodes are in).
    async fn with_state<T>(
        &self,
        mut f: impl FnMut(&mut State) -> Result<T, FsError>,
    ) -> Result<T, FsError> {
        // Pages this operation loaded stay until it is done, so an operation
        // that needs more pages than the cache holds still finishes.
        let mut loaded = Vec::new();
        loop {
            let r = f(&mut self.state.lock().unwrap());
            match r {
                Err(FsError::NotLoaded(p)) => {
                    loaded.push(p);
                    self.load_page(p, &loaded).await?
                }
                r => return r,
            }
        }
    }

    /// Loads the missing pages among `pages` concurrently (a batch of
    /// chunks looks up random buckets: one round trip instead of one each).
    /// Best effort: whoever then `require`s them loads what this did not.
    async fn prefetch_pages(&self, mut pages: Vec<u64>) {
        pages.sort_unstable();
        pages.dedup();
        {
            let st = self.state.lock().unwrap();
            pages.retain(|&p| st.inodes.missing_page(p).is_some());
        }
        for group in pages.chunks(32) {
            join_all(group.iter().map(|&p| self.load_page(p, group))).await;
        }
    }

    /// Reads page `p` from the D-nodes into the cache.
    async fn load_page(&self, p: u64, pinned: &[u64]) -> Result<(), FsError> {
        let loc = {
            let st = self.state.lock().unwrap();
            if st.inodes.pages.contains_key(&p) {
                return Ok(());
            }
            match st.inodes.map.get(&p) {
                Some(l) => l.clone(),
                None => return Ok(()),
            }
        };
        let blob = self.read_page(&loc).await?;
        if blob.page != p || blob.fs_uuid != self.sb.fs_uuid {
            return Err(FsError::Io(format!(
                "metadata page {p}: found page {} of another file system or place",
                blob.page
            )));
        }
        let mut inodes: HashMap<u64, Inode> = blob.inodes.into_iter().map(|i| (i.ino, i)).collect();
        let ranges = self.load_extents(&mut inodes).await?;
        let mut st = self.state.lock().unwrap();
        // Unless it was loaded (or rewritten) meanwhile.
        if !st.inodes.pages.contains_key(&p) && st.inodes.map.get(&p) == Some(&loc) {
            let used = st.inodes.clock;
            st.inodes.pages.insert(
                p,
                Page {
                    inodes,
                    chunks: blob.chunks.into_iter().map(|c| (c.fp, c)).collect(),
                    similar: blob.similar.into_iter().collect(),
                    ranges,
                    used,
                },
            );
            if p >= meta::CHUNK_PAGES {
                self.ingest.index_loads.fetch_add(1, Ordering::Relaxed);
            }
            // Reading alone must not grow the cache either.
            st.inodes.evict(pinned);
            self.ingest.note_resident(&st);
        }
        Ok(())
    }

    /// Makes the filters of the index buckets that are neither in memory
    /// nor filtered yet, reading each once (32 at a time) and keeping its
    /// filter rather than its page, until the filters' budget is full.
    /// Without this a fresh C-node, after a failover say, would load
    /// every bucket its new chunks' lookups meet once, in its write path,
    /// before evictions gave it filters. Runs beside the mount's work,
    /// whose lookups load pages as before until their filters exist; a
    /// bucket that fails to read is left to them. Returns the filters made.
    pub async fn warm_filters(&self) -> u64 {
        if self.opts.index_filters == 0 {
            return 0;
        }
        let clock = std::time::Instant::now();
        // Page numbers only: a large index's locations are not copied
        // whole; each group takes its own when it is read.
        let mut todo: Vec<u64> = {
            let st = self.state.lock().unwrap();
            let i = &st.inodes;
            i.map
                .keys()
                .filter(|&&p| filters::is_bucket(p) && i.missing_page(p).is_some())
                .filter(|&&p| !i.filters.contains(p))
                .copied()
                .collect()
        };
        todo.sort_unstable();
        let (mut made, mut full) = (0u64, false);
        for group in todo.chunks(32) {
            if full || self.closing.load(Ordering::Acquire) {
                break;
            }
            let located: Vec<(u64, PageLocation)> = {
                let st = self.state.lock().unwrap();
                let i = &st.inodes;
                group
                    .iter()
                    .filter(|&&p| i.missing_page(p).is_some())
                    .map(|&p| (p, i.map[&p].clone()))
                    .collect()
            };
            let read = join_all(
                located
                    .iter()
                    .map(|(p, loc)| async move { (*p, loc, self.read_page(loc).await) }),
            )
            .await;
            if self.closing.load(Ordering::Acquire) {
                // Reads cut short by the unmount are not worth a warning.
                break;
            }
            let mut st = self.state.lock().unwrap();
            for (p, loc, blob) in read {
                let blob = match blob {
                    Ok(b) if b.page == p && b.fs_uuid == self.sb.fs_uuid => b,
                    Ok(b) => {
                        tracing::warn!(
                            page = p,
                            found = b.page,
                            "index bucket of another place: no filter warmed"
                        );
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(page = p, error = %e, "index bucket unread: no filter warmed");
                        continue;
                    }
                };
                let i = &mut st.inodes;
                // Loaded, rewritten or evicted meanwhile: what it holds now
                // may not be what was read (or its filter exists already).
                if i.pages.contains_key(&p) || i.map.get(&p) != Some(loc) || i.filters.contains(p) {
                    continue;
                }
                let f = filters::Filter::of_bucket(
                    p,
                    blob.chunks.iter().map(|c| &c.fp),
                    blob.similar.iter().map(|(sf, _)| sf),
                );
                if !i.filters.has_room_for(&f) {
                    full = true;
                    break;
                }
                i.filters.insert(p, f);
                made += 1;
            }
        }
        self.ingest.warmed_filters.store(made, Ordering::Relaxed);
        let bytes = self.state.lock().unwrap().inodes.filters.bytes();
        tracing::info!(
            buckets = todo.len(),
            filters = made,
            filter_bytes = bytes,
            budget_full = full,
            ms = clock.elapsed().as_millis() as u64,
            "index filters warmed"
        );
        made
    }

    /// Reads the extent pages of the files among `inodes` (an inode page
    /// just read) into their maps, and returns what each range holds
    /// ([`Page::ranges`]). A version 7 page's maps are whole already and
    /// have no extent pages; they are written to extent pages when their
    /// page is next committed (their digests here are 0).
    async fn load_extents(
        &self,
        inodes: &mut HashMap<u64, Inode>,
    ) -> Result<HashMap<u64, BTreeMap<u64, u128>>, FsError> {
        // The page map is ordered: a file's extent pages are one run of it,
        // found without a lookup per range (a sparse file may have 2^28).
        let wanted: Vec<(u64, u64, PageLocation)> = {
            let st = self.state.lock().unwrap();
            inodes
                .values()
                .filter(|i| matches!(i.content, Content::File(_)))
                .flat_map(|i| {
                    st.inodes
                        .map
                        .range(meta::extent_pages(i.ino))
                        .map(|(&p, l)| (p, l.clone()))
                })
                .filter_map(|(p, l)| meta::extent_page_of(p).map(|(ino, r)| (ino, r, l)))
                .collect()
        };
        let mut ranges: HashMap<u64, BTreeMap<u64, u128>> = HashMap::new();
        for group in wanted.chunks(16) {
            let read = join_all(group.iter().map(|(_, _, l)| self.read_page(l))).await;
            for (&(ino, r, _), blob) in group.iter().zip(read) {
                let blob = blob?;
                let found = blob.page;
                let ours = found == meta::extent_page(ino, r) && blob.fs_uuid == self.sb.fs_uuid;
                let Some(extents) = meta::extents_of_blob(blob, ino).filter(|_| ours) else {
                    return Err(FsError::Io(format!(
                        "extent page {r} of file {ino}: found page {found} of another file, file system or place"
                    )));
                };
                if let Some(&digest) = meta::range_digests(&extents).get(&r) {
                    ranges.entry(ino).or_default().insert(r, digest);
                }
                if let Some(Inode {
                    content: Content::File(map),
                    ..
                }) = inodes.get_mut(&ino)
                {
                    map.extend(extents);
                }
            }
        }
        Ok(ranges)
    }

    async fn read_page(&self, loc: &[StripeRecord]) -> Result<PageBlob, FsError> {
        let strip = self.meta.geometry().strip_size();
        let mut bytes = Vec::new();
        for rec in loc {
            let b = self.meta.read(rec, 0, strip).await?;
            let part: MetaPart =
                meta::unframe(META_MAGIC, &b).map_err(|e| FsError::Io(e.to_string()))?;
            bytes.extend_from_slice(&part.payload);
        }
        meta::decode(&bytes, "metadata page").map_err(|e| FsError::Io(e.to_string()))
    }

    pub async fn getattr(&self, ino: u64) -> Result<Attr, FsError> {
        self.with_state(|st| {
            st.require(&[ino])?;
            st.inodes.get(&ino).map(attr).ok_or(FsError::NotFound)
        })
        .await
    }

    pub async fn lookup(&self, parent: u64, name: &[u8]) -> Result<Attr, FsError> {
        self.with_state(|st| {
            st.require(&[parent])?;
            let ino = st.child(parent, name)?;
            st.require(&[ino])?;
            st.inodes.get(&ino).map(attr).ok_or(FsError::NotFound)
        })
        .await
    }

    /// Creates a file, directory or symlink `name` in `parent`.
    pub async fn create(
        &self,
        parent: u64,
        name: &[u8],
        new: NewKind<'_>,
        perm: u16,
        uid: u32,
        gid: u32,
    ) -> Result<Attr, FsError> {
        self.check_writable()?;
        check_name(name)?;
        self.with_state(|st| {
            let ino = st.next_ino;
            if ino >= meta::MAX_INO {
                return Err(FsError::NoSpace);
            }
            st.require(&[parent, ino])?;
            if st.child(parent, name).is_ok() {
                return Err(FsError::Exists);
            }
            st.dir_mut(parent)?;
            st.next_ino += 1;
            let t = now_ns();
            let (kind, content, nlink, size) = match new {
                NewKind::File => (Kind::File, Content::File(BTreeMap::new()), 1, 0),
                NewKind::Dir => (
                    Kind::Dir,
                    Content::Dir {
                        parent,
                        entries: BTreeMap::new(),
                    },
                    2,
                    0,
                ),
                NewKind::Symlink(target) => (
                    Kind::Symlink,
                    Content::Symlink(target.to_vec()),
                    1,
                    target.len() as u64,
                ),
            };
            let inode = Inode {
                ino,
                kind,
                perm: perm & 0o7777,
                uid,
                gid,
                nlink,
                size,
                atime: t,
                mtime: t,
                ctime: t,
                content,
            };
            let a = attr(&inode);
            st.inodes.insert(ino, inode);
            st.counts.inodes += 1;
            match kind {
                Kind::File => st.counts.files += 1,
                Kind::Dir => st.counts.dirs += 1,
                Kind::Symlink => {}
            }
            st.touch(ino);
            st.dir_mut(parent)?.1.insert(name.to_vec(), (ino, kind));
            let pi = st.inodes.get_mut(&parent).unwrap();
            if kind == Kind::Dir {
                pi.nlink += 1;
            }
            pi.mtime = t;
            pi.ctime = t;
            st.touch(parent);
            Ok(a)
        })
        .await
    }

    pub async fn readlink(&self, ino: u64) -> Result<Vec<u8>, FsError> {
        self.with_state(|st| {
            st.require(&[ino])?;
            match &st.inodes.get(&ino).ok_or(FsError::NotFound)?.content {
                Content::Symlink(t) => Ok(t.clone()),
                _ => Err(FsError::Invalid("not a symlink".into())),
            }
        })
        .await
    }

    pub async fn link(&self, ino: u64, newparent: u64, newname: &[u8]) -> Result<Attr, FsError> {
        self.check_writable()?;
        check_name(newname)?;
        self.with_state(|st| {
            st.require(&[ino, newparent])?;
            let kind = st.inodes.get(&ino).ok_or(FsError::NotFound)?.kind;
            if kind == Kind::Dir {
                return Err(FsError::NotPermitted);
            }
            if st.child(newparent, newname).is_ok() {
                return Err(FsError::Exists);
            }
            st.dir_mut(newparent)?
                .1
                .insert(newname.to_vec(), (ino, kind));
            let t = now_ns();
            let i = st.inodes.get_mut(&ino).unwrap();
            i.nlink += 1;
            i.ctime = t;
            let a = attr(i);
            let p = st.inodes.get_mut(&newparent).unwrap();
            p.mtime = t;
            p.ctime = t;
            st.touch(ino);
            st.touch(newparent);
            Ok(a)
        })
        .await
    }

    /// Removes `name` (a non-directory) from `parent`; committed before it returns.
    pub async fn unlink(&self, parent: u64, name: &[u8]) -> Result<(), FsError> {
        self.check_writable()?;
        self.with_state(|st| {
            st.require(&[parent])?;
            let ino = st.child(parent, name)?;
            st.require(&[ino])?;
            if st.inodes[&ino].kind == Kind::Dir {
                return Err(FsError::IsDir);
            }
            st.remove_entry(parent, name);
            st.drop_link(ino);
            Ok(())
        })
        .await?;
        self.sync().await
    }

    pub async fn rmdir(&self, parent: u64, name: &[u8]) -> Result<(), FsError> {
        self.check_writable()?;
        self.with_state(|st| {
            st.require(&[parent])?;
            let ino = st.child(parent, name)?;
            st.require(&[ino])?;
            match &st.inodes[&ino].content {
                Content::Dir { entries, .. } if !entries.is_empty() => {
                    return Err(FsError::NotEmpty)
                }
                Content::Dir { .. } => {}
                _ => return Err(FsError::NotDir),
            }
            st.remove_entry(parent, name);
            st.inodes.get_mut(&parent).unwrap().nlink -= 1;
            st.delete_inode(ino);
            Ok(())
        })
        .await?;
        self.sync().await
    }

    /// Renames, replacing an existing target (a file by a file, an empty
    /// directory by a directory) unless `noreplace`; committed before it returns.
    pub async fn rename(
        &self,
        parent: u64,
        name: &[u8],
        newparent: u64,
        newname: &[u8],
        noreplace: bool,
    ) -> Result<(), FsError> {
        self.check_writable()?;
        check_name(newname)?;
        let changed = self
            .with_state(|st| {
                st.require(&[parent, newparent])?;
                let ino = st.child(parent, name)?;
                st.dir_mut(newparent)?;
                let target = st.child(newparent, newname).ok();
                st.require(&[ino])?;
                if let Some(t) = target {
                    st.require(&[t])?;
                }
                let kind = st.inodes[&ino].kind;
                if kind == Kind::Dir {
                    // Not into itself or below itself.
                    let mut p = newparent;
                    loop {
                        if p == ino {
                            return Err(FsError::Invalid(
                                "cannot move a directory into itself".into(),
                            ));
                        }
                        if p == ROOT_INO {
                            break;
                        }
                        st.require(&[p])?;
                        p = match &st.inodes[&p].content {
                            Content::Dir { parent, .. } => *parent,
                            _ => break,
                        };
                    }
                }
                if let Some(target) = target {
                    if target == ino {
                        return Ok(false);
                    }
                    if noreplace {
                        return Err(FsError::Exists);
                    }
                    match (&st.inodes[&target].content, kind) {
                        (Content::Dir { entries, .. }, Kind::Dir) => {
                            if !entries.is_empty() {
                                return Err(FsError::NotEmpty);
                            }
                            st.remove_entry(newparent, newname);
                            st.inodes.get_mut(&newparent).unwrap().nlink -= 1;
                            st.delete_inode(target);
                        }
                        (Content::Dir { .. }, _) => return Err(FsError::IsDir),
                        (_, Kind::Dir) => return Err(FsError::NotDir),
                        _ => {
                            st.remove_entry(newparent, newname);
                            st.drop_link(target);
                        }
                    }
                }
                st.remove_entry(parent, name);
                st.dir_mut(newparent)?
                    .1
                    .insert(newname.to_vec(), (ino, kind));
                let t = now_ns();
                if kind == Kind::Dir && parent != newparent {
                    st.inodes.get_mut(&parent).unwrap().nlink -= 1;
                    st.inodes.get_mut(&newparent).unwrap().nlink += 1;
                    if let Content::Dir { parent: p, .. } =
                        &mut st.inodes.get_mut(&ino).unwrap().content
                    {
                        *p = newparent;
                    }
                }
                for i in [parent, newparent, ino] {
                    let n = st.inodes.get_mut(&i).unwrap();
                    n.ctime = t;
                    if i != ino {
                        n.mtime = t;
                    }
                    st.touch(i);
                }
                Ok(true)
            })
            .await?;
        if changed {
            self.sync().await?;
        }
        Ok(())
    }

    /// Entries of directory `ino` from position `offset` (0 is `.`, 1 is
    /// `..`), at most `max` of them, each with the position after it.
    pub async fn readdir(
        &self,
        ino: u64,
        offset: u64,
        max: usize,
    ) -> Result<Vec<(u64, DirEntry)>, FsError> {
        self.with_state(|st| {
            st.require(&[ino])?;
            let d = st.inodes.get(&ino).ok_or(FsError::NotFound)?;
            let Content::Dir { parent, entries } = &d.content else {
                return Err(FsError::NotDir);
            };
            let dots = [
                (ino, Kind::Dir, b".".to_vec()),
                (*parent, Kind::Dir, b"..".to_vec()),
            ];
            let all = dots
                .into_iter()
                .chain(entries.iter().map(|(n, (i, k))| (*i, *k, n.clone())));
            Ok(all
                .enumerate()
                .skip(offset as usize)
                .take(max)
                .map(|(pos, (i, kind, name))| (pos as u64 + 1, DirEntry { ino: i, kind, name }))
                .collect())
        })
        .await
    }

    pub async fn setattr(&self, ino: u64, set: &SetAttr) -> Result<Attr, FsError> {
        self.check_writable()?;
        if set.size.is_some_and(|s| s > meta::MAX_FILE_BYTES) {
            return Err(FsError::FileTooBig);
        }
        if set.size.is_some() {
            self.flush_file(ino).await?;
        }
        self.with_state(|st| {
            st.require(&[ino])?;
            let t = now_ns();
            let i = st.inodes.get(&ino).ok_or(FsError::NotFound)?;
            if set.size.is_some() {
                match i.kind {
                    Kind::Dir => return Err(FsError::IsDir),
                    Kind::Symlink => return Err(FsError::Invalid("truncating a symlink".into())),
                    Kind::File => {}
                }
            }
            let i = st.inodes.get_mut(&ino).unwrap();
            if let Some(p) = set.perm {
                i.perm = p & 0o7777;
            }
            if let Some(u) = set.uid {
                i.uid = u;
            }
            if let Some(g) = set.gid {
                i.gid = g;
            }
            if let Some(a) = set.atime {
                i.atime = from_time(a);
            }
            if let Some(m) = set.mtime {
                i.mtime = from_time(m);
            }
            i.ctime = t;
            let mut dead = Vec::new();
            let mut grew = 0i128;
            if let Some(size) = set.size {
                if set.mtime.is_none() {
                    i.mtime = t;
                }
                let old = i.size;
                i.size = size;
                grew = size as i128 - old as i128;
                if size < old {
                    if let Content::File(ext) = &mut i.content {
                        punch(ext, size, u64::MAX, &mut dead);
                    }
                }
            }
            st.counts.logical_bytes = (st.counts.logical_bytes as i128 + grew) as u64;
            for u in dead {
                st.unref(u);
            }
            st.touch(ino);
            Ok(attr(&st.inodes[&ino]))
        })
        .await
    }

    pub async fn open_file(&self, ino: u64) -> Result<Attr, FsError> {
        self.with_state(|st| {
            st.require(&[ino])?;
            let a = st.inodes.get(&ino).map(attr).ok_or(FsError::NotFound)?;
            *st.open_handles.entry(ino).or_default() += 1;
            Ok(a)
        })
        .await
    }

    /// The last handle of an unlinked file frees it.
    pub async fn release_file(&self, ino: u64) {
        let last = self
            .with_state(|st| {
                st.require(&[ino])?;
                let gone = match st.open_handles.get_mut(&ino) {
                    Some(n) if *n > 1 => {
                        *n -= 1;
                        false
                    }
                    Some(_) => {
                        st.open_handles.remove(&ino);
                        true
                    }
                    None => false,
                };
                if gone && st.inodes.get(&ino).is_some_and(|i| i.nlink == 0) {
                    st.delete_inode(ino);
                }
                Ok(gone)
            })
            .await;
        if last.unwrap_or(false) {
            if let Err(e) = self.forget_writer(ino).await {
                // Not lost: the bytes stay pending and the next commit retries.
                tracing::warn!(ino, error = %e, "storing a closed file's bytes failed");
            }
        }
    }

    /// What the write path did since mount.
    pub fn ingest(&self) -> &Ingest {
        &self.ingest
    }

    // ---- data -------------------------------------------------------------

    /// Held for the duration of a write (see `quiesce`).
    pub async fn write_guard(&self) -> tokio::sync::OwnedRwLockReadGuard<()> {
        self.quiesce.clone().read_owned().await
    }

    /// Copies `data` into the data log at `offset` of file `ino`. Returns
    /// the segments it filled: the caller passes them to
    /// [`FileSystem::write_segments`] (holding its write guard throughout).
    pub async fn write(&self, ino: u64, offset: u64, data: &[u8]) -> Result<Vec<u64>, FsError> {
        self.check_writable()?;
        file_end(offset, data.len())?;
        self.with_state(|st| self.write_locked(st, ino, offset, data))
            .await
    }

    fn write_locked(
        &self,
        st: &mut State,
        ino: u64,
        offset: u64,
        data: &[u8],
    ) -> Result<Vec<u64>, FsError> {
        st.require(&[ino])?;
        match st.inodes.get(&ino).map(|i| i.kind) {
            None => return Err(FsError::NotFound),
            Some(Kind::Dir) => return Err(FsError::IsDir),
            Some(Kind::Symlink) => return Err(FsError::Invalid("writing a symlink".into())),
            Some(Kind::File) => {}
        }
        let mut sealed = Vec::new();
        let mut pos = 0usize;
        let mut dead = Vec::new();
        while pos < data.len() {
            let open = st.open_segment(self.seg_bytes);
            let n = (self.seg_bytes - open.buf.len()).min(data.len() - pos);
            let ext = Extent {
                at: Place::Seg(open.id),
                offset: open.buf.len() as u32,
                len: n as u32,
            };
            open.buf.extend_from_slice(&data[pos..pos + n]);
            let full = open.buf.len() == self.seg_bytes;
            let id = open.id;
            st.segs.get_mut(&id).unwrap().live += n as u64;
            let i = st.inodes.get_mut(&ino).unwrap();
            if let Content::File(map) = &mut i.content {
                insert_extent(map, offset + pos as u64, ext, &mut dead);
            }
            if full {
                sealed.extend(st.seal());
            }
            pos += n;
        }
        for u in dead {
            st.unref(u);
        }
        let t = now_ns();
        let i = st.inodes.get_mut(&ino).unwrap();
        let old = i.size;
        i.size = i.size.max(offset + data.len() as u64);
        i.mtime = t;
        i.ctime = t;
        let grew = i.size - old;
        st.counts.logical_bytes += grew;
        st.touch(ino);
        Ok(sealed)
    }

    /// Writes sealed segments out as stripes.
    pub async fn write_segments(&self, segs: &[u64]) -> Result<(), FsError> {
        for &id in segs {
            self.write_segment(id).await?;
        }
        Ok(())
    }

    async fn write_segment(&self, id: u64) -> Result<(), FsError> {
        let Some(buf) = self.state.lock().unwrap().unwritten.get(&id).cloned() else {
            return Ok(());
        };
        let r = self.write_as_stripes(&buf).await;
        let mut st = self.state.lock().unwrap();
        let records = match r {
            Ok(r) => r,
            Err(e) => {
                // Not lost: it stays in memory and the next commit retries it.
                tracing::warn!(segment = id, error = %e, "segment write failed; kept for retry");
                return Err(e);
            }
        };
        st.unwritten.remove(&id);
        let s = st.segs.get_mut(&id).expect("unwritten segments exist");
        s.records = records;
        s.len = buf.len() as u32;
        st.dirty_segs.insert(id);
        if st.segs[&id].live == 0 {
            st.free_segment(id);
        }
        Ok(())
    }

    /// Writes `bytes` as one or more data stripes (narrower ones when
    /// D-nodes are down), in order. On failure nothing stays allocated.
    async fn write_as_stripes(&self, bytes: &Bytes) -> Result<Vec<StripeRecord>, FsError> {
        let mut records: Vec<StripeRecord> = Vec::new();
        let mut off = 0;
        while off < bytes.len() {
            let allocated = self.state.lock().unwrap().alloc_stripe();
            let r = match allocated {
                Ok(stripe) => self
                    .data
                    .write_prefix(stripe, bytes.slice(off..))
                    .await
                    .map_err(|e| (Some(stripe), e.into())),
                Err(e) => Err((None, e)),
            };
            match r {
                Ok((rec, n)) => {
                    records.push(rec);
                    off += n;
                }
                Err((stripe, e)) => {
                    let mut st = self.state.lock().unwrap();
                    st.free.extend(stripe);
                    st.free.extend(records.iter().map(|r| r.stripe));
                    return Err(e);
                }
            }
        }
        Ok(records)
    }

    /// Reads up to `len` bytes at `offset` (fewer at the end of the file).
    pub async fn read(&self, ino: u64, offset: u64, len: usize) -> Result<Vec<u8>, FsError> {
        struct Job {
            at: usize,
            records: Vec<StripeRecord>,
            offset: usize,
            len: usize,
        }
        // Bytes still pending in the file's buffer are the newest: hold it
        // (so they are not being stored meanwhile) and lay them over.
        let pending = self.pending_guard(ino).await;
        let (mut out, jobs, chunk_jobs) = self
            .with_state(|st| {
                st.require(&[ino])?;
                let i = st.inodes.get(&ino).ok_or(FsError::NotFound)?;
                let Content::File(map) = &i.content else {
                    return Err(if i.kind == Kind::Dir {
                        FsError::IsDir
                    } else {
                        FsError::Invalid("reading a symlink".into())
                    });
                };
                if offset >= i.size {
                    return Ok((Vec::new(), Vec::new(), Vec::new()));
                }
                let len = (len as u64).min(i.size - offset) as usize;
                let end = offset + len as u64;
                let mut out = vec![0u8; len];
                let mut jobs = Vec::new();
                let mut chunk_jobs = Vec::new();
                let first = map
                    .range(..=offset)
                    .next_back()
                    .filter(|(k, e)| *k + e.len as u64 > offset)
                    .map(|(k, _)| *k)
                    .unwrap_or(offset);
                let hits: Vec<(u64, Extent)> =
                    map.range(first..end).map(|(k, e)| (*k, *e)).collect();
                for (k, e) in hits {
                    let lo = k.max(offset);
                    let hi = (k + e.len as u64).min(end);
                    let at = (lo - offset) as usize;
                    let n = (hi - lo) as usize;
                    let seg_off = e.offset as usize + (lo - k) as usize;
                    let dst = &mut out[at..at + n];
                    let seg = match e.at {
                        Place::Seg(seg) => seg,
                        Place::Chunk(fp) => {
                            chunk_jobs.push((at, seg_off, n, st.locate_chunk(&fp)?));
                            continue;
                        }
                    };
                    if let Some(o) = st.open.as_ref().filter(|o| o.id == seg) {
                        dst.copy_from_slice(&o.buf[seg_off..seg_off + n]);
                    } else if let Some(b) = st.unwritten.get(&seg) {
                        dst.copy_from_slice(&b[seg_off..seg_off + n]);
                    } else {
                        let s = st
                            .segs
                            .get(&seg)
                            .ok_or_else(|| FsError::Io(format!("segment {seg} is missing")))?;
                        jobs.push(Job {
                            at,
                            records: s.records.clone(),
                            offset: seg_off,
                            len: n,
                        });
                    }
                }
                Ok((out, jobs, chunk_jobs))
            })
            .await?;
        if !chunk_jobs.is_empty() {
            self.read_chunks(&mut out, chunk_jobs).await?;
        }
        let results = join_all(jobs.iter().map(|j| async move {
            (
                j.at,
                self.read_segment_range(&j.records, j.offset, j.len).await,
            )
        }))
        .await;
        for (at, r) in results {
            let b = r?;
            out[at..at + b.len()].copy_from_slice(&b);
        }
        if let Some(p) = &pending {
            Self::overlay_pending(p, offset, &mut out);
        }
        Ok(out)
    }

    // ---- commit -------------------------------------------------------------

    /// Makes every change so far durable: writes the open segment, then the
    /// changed pages of inodes and the log record naming them, then the
    /// commit record on a majority of D-nodes.
    pub async fn sync(&self) -> Result<(), FsError> {
        self.commit(true).await
    }

    /// Commits; `flush` also stores files' pending bytes first. The timer's
    /// commits do not: cutting a file being written where the timer fell
    /// would make chunk boundaries depend on timing, not content (its bytes
    /// are stored when it is closed, synced, or has gathered enough).
    async fn commit(&self, flush: bool) -> Result<(), FsError> {
        if self.opts.read_only {
            return Ok(());
        }
        // Pending file bytes become chunks, dropped references are applied
        // (what cannot be applied now is committed as the queue).
        if flush {
            self.flush_all_pending().await?;
        }
        self.commit_changes().await
    }

    /// Commits what is already chunked (pending file bytes stay pending).
    ///
    /// A commit, once begun, runs to its end in a task of its own even if
    /// its caller stops waiting (a task aborted at unmount, a timeout): it
    /// takes the changes out of the dirty sets and index journal before it
    /// writes them, so one dropped half-way would leave the next commit
    /// without them, and one dropped while writing commit records would
    /// leave its sequence number to be used twice.
    async fn commit_changes(&self) -> Result<(), FsError> {
        if self.opts.read_only {
            return Ok(());
        }
        match self.me.get().and_then(std::sync::Weak::upgrade) {
            Some(fs) => tokio::spawn(async move { fs.commit_changes_to_end().await })
                .await
                .map_err(|e| FsError::Io(format!("commit task: {e}")))?,
            // Not yet shared (recovery): nothing can drop it half-way.
            None => self.commit_changes_to_end().await,
        }
    }

    async fn commit_changes_to_end(&self) -> Result<(), FsError> {
        if let Err(e) = self.apply_ref_changes().await {
            tracing::warn!(error = %e, "chunk reference changes kept queued");
        }
        let target = self.state.lock().unwrap().changes;
        let mut log = self.log.lock().await;
        let merge_due = {
            let st = self.state.lock().unwrap();
            let n = st.index.len();
            n > self.opts.index_buffer || (n > 0 && self.merge_all.load(Ordering::Relaxed))
        };
        if !merge_due
            && log.committed_changes >= target
            && self.state.lock().unwrap().unwritten.is_empty()
        {
            return Ok(());
        }
        if let Some(why) = self.stopped.lock().unwrap().as_ref() {
            return Err(FsError::ReadOnly(why.clone()));
        }
        let image_due = log.force_image || log.journal_bytes > (8 << 20) + log.image_bytes;
        let seq = log.seq + 1;
        // Hold writers off while the snapshot is made consistent: every
        // segment it references is on the D-nodes first.
        // The buckets to merge are loaded before writers are held off: the
        // merge itself, in the snapshot's critical section, takes those
        // still resident by then, so no split or index change falls
        // between merge and record.
        let to_merge = if merge_due {
            self.load_merge_pages().await?
        } else {
            Vec::new()
        };
        let snap = {
            let _x = self.quiesce.write().await;
            let _held = Held(std::time::Instant::now(), &self.ingest.commit_hold_us);
            let sealed = self.state.lock().unwrap().seal();
            let all: Vec<u64> = {
                let st = self.state.lock().unwrap();
                sealed
                    .into_iter()
                    .chain(st.unwritten.keys().copied())
                    .collect()
            };
            for id in all {
                self.write_segment(id).await?;
            }
            let mut st = self.state.lock().unwrap();
            // The most pages are resident just before a commit lets the
            // changed ones go.
            self.ingest.note_resident(&st);
            st.merge_into(&to_merge, &self.ingest);
            let dirty = std::mem::take(&mut st.inodes.dirty);
            st.inodes.committing = dirty.clone();
            let mut pages: Vec<(u64, Option<Vec<u8>>)> = Vec::with_capacity(dirty.len());
            let touched = std::mem::take(&mut st.inodes.touched);
            for p in dirty {
                let fs_uuid = self.sb.fs_uuid;
                let Some(pg) = st.inodes.pages.get_mut(&p) else {
                    pages.push((p, None));
                    continue;
                };
                // Files' extents go to their extent pages, the ranges that
                // changed only; the inode page holds the inodes without.
                let Page { inodes, ranges, .. } = &mut *pg;
                // A 0 is a range whose page an earlier commit removed (a
                // failed one would have made it unknown since).
                ranges.retain(|ino, d| {
                    d.retain(|_, v| *v != 0);
                    inodes.contains_key(ino) || !d.is_empty()
                });
                // Every file of the page, and every one freed whose pages
                // are still to remove.
                let files: BTreeSet<u64> = inodes
                    .values()
                    .filter(|i| matches!(i.content, Content::File(_)))
                    .map(|i| i.ino)
                    .chain(ranges.keys().copied())
                    .collect();
                for ino in files {
                    // New to this C-node's copy of the page (created, or
                    // read from a version 7 page whose extents were inline),
                    // changed since the last commit, or after a failed one.
                    let new = !ranges.contains_key(&ino);
                    let stored = ranges.entry(ino).or_default();
                    if !new
                        && !touched.contains(&ino)
                        && !stored.values().any(|&v| v == UNKNOWN_RANGE)
                    {
                        continue;
                    }
                    let file = inodes.get(&ino).and_then(|i| match &i.content {
                        Content::File(map) => Some((i, map)),
                        _ => None,
                    });
                    let now = file
                        .map(|(_, map)| meta::range_digests(map))
                        .unwrap_or_default();
                    let all: BTreeSet<u64> = stored.keys().chain(now.keys()).copied().collect();
                    for r in all {
                        let want = now.get(&r).copied().unwrap_or(0);
                        let d = stored.entry(r).or_insert(0);
                        if *d == want {
                            continue;
                        }
                        let blob = file
                            .filter(|_| want != 0)
                            .map(|(i, map)| meta::encode(&meta::extent_blob(fs_uuid, i, map, r)));
                        pages.push((meta::extent_page(ino, r), blob));
                        *d = want;
                    }
                }
                let blob = (!pg.is_empty()).then(|| {
                    meta::encode(&PageBlob {
                        fs_uuid,
                        page: p,
                        inodes: pg
                            .inodes
                            .values()
                            .map(|i| match i.content {
                                Content::File(_) => i.with_content(Content::File(BTreeMap::new())),
                                _ => i.clone(),
                            })
                            .collect(),
                        chunks: pg.chunks.values().cloned().collect(),
                        similar: pg.similar.iter().map(|(k, v)| (*k, *v)).collect(),
                    })
                });
                pages.push((p, blob));
            }
            let segs = std::mem::take(&mut st.dirty_segs);
            Snapshot {
                pages,
                segments: if image_due {
                    st.segs
                        .iter()
                        .filter(|(_, s)| !s.records.is_empty())
                        .map(|(id, s)| (*id, Some(s.clone())))
                        .collect()
                } else {
                    segs.into_iter()
                        .map(|id| {
                            (
                                id,
                                st.segs.get(&id).filter(|s| !s.records.is_empty()).cloned(),
                            )
                        })
                        .collect()
                },
                next_ino: st.next_ino,
                next_seg: st.next_seg,
                counts: st.counts,
                orphans: st.orphans.iter().copied().collect(),
                ref_changes: st.ref_changes.clone(),
                index: if image_due {
                    st.index.take_delta();
                    st.index.whole()
                } else {
                    st.index.take_delta()
                },
                tail: st.tail,
                to_free: std::mem::take(&mut st.pending_free),
                changes: st.changes,
            }
        };
        let Snapshot {
            pages,
            segments,
            next_ino,
            next_seg,
            counts,
            orphans,
            ref_changes,
            index,
            tail,
            mut to_free,
            changes,
        } = snap;
        let r = async {
            // The changed pages, each to fresh stripes (copy-on-write).
            let strip = self.meta.geometry().strip_size();
            let mut located: Vec<(u64, Option<PageLocation>)> = Vec::with_capacity(pages.len());
            for batch in pages.chunks(16) {
                let writes = batch.iter().map(|(p, blob)| async move {
                    let Some(b) = blob else {
                        return Ok((*p, None));
                    };
                    let stripes = self.alloc_stripes(parts_for(b.len(), strip))?;
                    match write_parts(&self.meta, self.sb.fs_uuid, seq, false, None, b, &stripes)
                        .await
                    {
                        Ok(loc) => Ok((*p, Some(loc))),
                        Err(e) => {
                            self.state.lock().unwrap().free.extend(stripes);
                            Err(e)
                        }
                    }
                });
                for r in join_all(writes).await {
                    located.push(r?);
                }
            }
            // New locations in force now (the pages' content is newest), old
            // ones free once this commit is durable.
            let record = {
                let mut st = self.state.lock().unwrap();
                for (p, loc) in &located {
                    let old = match loc {
                        Some(l) => st.inodes.map.insert(*p, l.clone()),
                        None => {
                            if st.inodes.pages.get(p).is_some_and(|pg| pg.is_empty()) {
                                st.inodes.pages.remove(p);
                            }
                            st.inodes.map.remove(p)
                        }
                    };
                    to_free.extend(old.into_iter().flatten().map(|r| r.stripe));
                }
                st.inodes.committing.clear();
                if image_due {
                    MetaRecord::Image(Image {
                        reduce: st.reduce,
                        next_ino,
                        next_seg,
                        pages: st.inodes.map.iter().map(|(p, l)| (*p, l.clone())).collect(),
                        segments: segments
                            .into_iter()
                            .filter_map(|(id, s)| s.map(|s| (id, s)))
                            .collect(),
                        counts,
                        orphans,
                        ref_changes,
                        index,
                    })
                } else {
                    MetaRecord::Batch(Batch {
                        next_ino,
                        next_seg,
                        pages: located,
                        segments,
                        counts,
                        orphans,
                        ref_changes,
                        index,
                    })
                }
            };
            self.commit_record(&mut log, record, tail).await
        }
        .await;
        match r {
            Ok(old_chain) => {
                let mut st = self.state.lock().unwrap();
                st.free.extend(to_free);
                st.free.extend(old_chain);
                st.inodes.evict(&[]);
                drop(st);
                // Evicted pages are many small allocations spread over
                // glibc's per-thread arenas, which keep freed memory: give
                // it back, or the cache bound holds for pages but not RSS.
                #[cfg(all(target_os = "linux", target_env = "gnu"))]
                // SAFETY: malloc_trim only releases free heap memory.
                unsafe {
                    libc::malloc_trim(0);
                }
                log.committed_changes = changes;
                log.force_image = false;
                Ok(())
            }
            Err(e) => {
                let mut st = self.state.lock().unwrap();
                st.pending_free.extend(to_free);
                // Pages whose new copies may not have been written are
                // changed again: the next commit writes them.
                let pending = std::mem::take(&mut st.inodes.committing);
                // What their extent pages hold is unknown now: all of them
                // are written (or removed) again.
                for p in &pending {
                    if let Some(pg) = st.inodes.pages.get_mut(p) {
                        pg.ranges
                            .values_mut()
                            .flat_map(|d| d.values_mut())
                            .for_each(|v| *v = UNKNOWN_RANGE);
                    }
                }
                st.inodes.dirty.extend(pending);
                log.force_image = true;
                Err(e)
            }
        }
    }

    fn alloc_stripes(&self, n: usize) -> Result<Vec<u64>, FsError> {
        let mut st = self.state.lock().unwrap();
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            match st.alloc_stripe() {
                Ok(s) => out.push(s),
                Err(e) => {
                    st.free.extend(out);
                    return Err(e);
                }
            }
        }
        Ok(out)
    }

    /// Writes one record to the metadata log and commits it. Returns the
    /// stripes of the log it made obsolete (when it wrote an image).
    async fn commit_record(
        &self,
        log: &mut LogState,
        record: MetaRecord,
        tail: meta::RecordTail,
    ) -> Result<Vec<u64>, FsError> {
        let image = matches!(record, MetaRecord::Image(_));
        let bytes = meta::encode_record(&record, &tail);
        drop(record);
        let seq = log.seq + 1;
        let prev = if image { None } else { log.head.clone() };
        let strip = self.meta.geometry().strip_size();
        let written = self.alloc_stripes(parts_for(bytes.len(), strip))?;
        let head = match write_parts(
            &self.meta,
            self.sb.fs_uuid,
            seq,
            image,
            prev,
            &bytes,
            &written,
        )
        .await
        {
            Ok(mut recs) => recs.pop().expect("at least one part"),
            Err(e) => {
                // Nothing references these stripes: free them at once.
                self.state.lock().unwrap().free.extend(written);
                return Err(e);
            }
        };
        let c = &self.cluster;
        let n = c.len();
        // Data and metadata stripes durable before the commit record that
        // references them, the commit record durable before we say so.
        join_all((0..n).filter(|&i| c.is_up(i)).map(|i| c.flush(i))).await;
        let rec = CommitRecord {
            fs_uuid: self.sb.fs_uuid,
            seq,
            epoch: self.epoch,
            head: head.clone(),
        };
        let block = bytes::Bytes::from(
            meta::frame(COMMIT_MAGIC, &rec, COMMIT_SLOT).map_err(|e| FsError::Io(e.to_string()))?,
        );
        let rec = &rec;
        let acks = join_all((0..n).filter(|&i| c.is_up(i)).map(|i| {
            let block = block.clone();
            async move {
                c.write(i, rec.offset(), block).await?;
                c.flush(i).await
            }
        }))
        .await
        .into_iter()
        .filter(|r| r.is_ok())
        .count();
        if acks < n / 2 + 1 {
            // The record may be on a minority: recovery could still pick it,
            // so its stripes must never be reused. Stop writing.
            let why = format!("a commit reached only {acks} of {n} D-nodes (a majority is needed)");
            self.stop(why.clone());
            return Err(FsError::Io(why));
        }
        log.seq = seq;
        log.head = Some(head);
        let old = if image {
            log.image_bytes = bytes.len();
            log.journal_bytes = 0;
            std::mem::replace(&mut log.chain, written)
        } else {
            log.journal_bytes += bytes.len();
            log.chain.extend(written);
            Vec::new()
        };
        Ok(old)
    }

    /// Background work of a mounted file system: committing periodically,
    /// reconnecting D-nodes that come back, cleaning, idle recompression,
    /// re-striping after a D-node stays down (the lease is renewed by a
    /// task of its own, [`FileSystem::keep_lease`]). Ends at
    /// [`FileSystem::close`].
    pub async fn run_background(self: Arc<Self>) {
        if self.opts.read_only {
            return;
        }
        if self.opts.warm_filters && self.reduce() != Reduce::None {
            let fs = self.clone();
            tokio::spawn(async move { fs.warm_filters().await });
        }
        let mut down_since: Vec<Option<tokio::time::Instant>> = vec![None; self.cluster.len()];
        let mut evacuated = vec![false; self.cluster.len()];
        // Writes seen, and since when no more came (idle recompression).
        let mut writes = u64::MAX;
        let mut quiet_since = tokio::time::Instant::now();
        let tick = self.opts.commit_interval.max(Duration::from_millis(50));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(tick) => {}
                _ = self.shutdown.notified() => return,
            }
            if self.closing.load(Ordering::Acquire) {
                return;
            }
            self.cluster.revive().await;
            if let Err(e) = self.commit(false).await {
                tracing::warn!(error = %e, "periodic commit failed");
            }
            if self.reduce() != Reduce::None {
                match self.clean_if_free(reduce::CLEAN_BELOW).await {
                    None => {} // a rebuild or recompression pass is running
                    Some(Ok(r)) if r.segments > 0 => tracing::info!(
                        segments = r.segments,
                        chunks = r.chunks_moved,
                        bytes = r.bytes_moved,
                        "cleaned mostly dead segments"
                    ),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => tracing::warn!(error = %e, "cleaning failed"),
                }
            }
            if let Some(idle) = self
                .opts
                .recompress_idle
                .filter(|_| self.reduce() == Reduce::Full)
            {
                let w = self.ingest.writes.load(Ordering::Acquire);
                if w != writes {
                    (writes, quiet_since) = (w, tokio::time::Instant::now());
                }
                let retry = *self.idle_retry_at.lock().unwrap();
                if quiet_since.elapsed() >= idle
                    && retry.is_none_or(|t| std::time::Instant::now() >= t)
                    && self.check_writable().is_ok()
                    && self.recompress_due(RECOMPRESS_LEVEL)
                {
                    // One pass at a time: a tick during a pass spawns a
                    // task that finds the pass's lock taken and ends.
                    let fs = self.clone();
                    tokio::spawn(async move {
                        let Ok(_running) = fs.idle_pass.try_lock() else {
                            return;
                        };
                        fs.idle_recompress().await;
                    });
                }
            }
            if let Some(after) = self.opts.rebuild_after {
                for i in 0..self.cluster.len() {
                    if self.cluster.is_up(i) {
                        down_since[i] = None;
                        evacuated[i] = false;
                        continue;
                    }
                    let since = *down_since[i].get_or_insert_with(tokio::time::Instant::now);
                    if !evacuated[i] && since.elapsed() >= after {
                        evacuated[i] = true;
                        let (addr, _) = self.cluster.endpoint(i);
                        tracing::warn!(dnode = %addr, "D-node down too long: re-striping its data over the others");
                        let fs = self.clone();
                        tokio::spawn(async move {
                            let r = fs
                                .evacuate(i, |d, t| {
                                    tracing::info!(
                                        done = d,
                                        total = t,
                                        "background rebuild progress"
                                    );
                                })
                                .await;
                            match r {
                                Ok(n) => {
                                    tracing::info!(dnode = %addr, segments = n, "background rebuild finished")
                                }
                                Err(e) => {
                                    tracing::error!(dnode = %addr, error = %e, "background rebuild failed")
                                }
                            }
                        });
                    }
                }
            }
        }
    }

    /// Commits everything and gives the lease back.
    pub async fn close(&self) -> Result<(), FsError> {
        self.closing.store(true, Ordering::Release);
        self.shutdown.notify_waiters();
        drop(self.idle_pass.lock().await);
        let r = self.sync().await;
        let i = &self.ingest;
        let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        if n(&i.chunks) > 0
            || n(&i.index_loads) > 0
            || n(&i.references_fetched) > 0
            || n(&i.idle_passes) > 0
        {
            let (filters, filter_bytes) = {
                let st = self.state.lock().unwrap();
                (st.inodes.filters.len(), st.inodes.filters.bytes())
            };
            tracing::info!(
                chunks = n(&i.chunks),
                bytes = n(&i.bytes),
                duplicates = n(&i.duplicates),
                deltas = n(&i.deltas),
                compressed = n(&i.compressed),
                raw = n(&i.raw),
                index_lookups = n(&i.lookups),
                index_page_loads = n(&i.index_loads),
                filtered_lookups = n(&i.filtered),
                warmed_filters = n(&i.warmed_filters),
                index_filters = filters,
                index_filter_bytes = filter_bytes,
                cleaned_segments = n(&i.cleaned_segments),
                peak_resident_pages = n(&i.peak_pages),
                merged_buckets = n(&i.merged_buckets),
                peak_buffered_entries = n(&i.peak_buffered),
                merge_wait_ms = n(&i.merge_wait_us) / 1000,
                commit_hold_ms = n(&i.commit_hold_us) / 1000,
                references_fetched = n(&i.references_fetched),
                reference_cache_hits = n(&i.reference_hits),
                references_rejected = n(&i.references_rejected),
                idle_passes = n(&i.idle_passes),
                idle_segments = n(&i.idle_segments),
                idle_saved = n(&i.idle_saved),
                "reduction since mount"
            );
        }
        if let Some(mut l) = self.lease.lock().await.take() {
            if r.is_ok() {
                l.release(&self.cluster).await;
            }
        }
        r
    }

    // ---- reporting ------------------------------------------------------------

    pub fn statfs(&self) -> (u64, u64, u64) {
        let st = self.state.lock().unwrap();
        let free_stripes = st.free_stripes();
        let per = self.seg_bytes as u64;
        (st.capacity * per, free_stripes * per, st.counts.inodes)
    }

    pub async fn stats(&self) -> Stats {
        let log = self.log.lock().await;
        let st = self.state.lock().unwrap();
        let s = self.data.geometry().strip_size();
        let mut out = Stats {
            strip_size: s,
            per_node_strips: vec![0; self.cluster.len()],
            commit_seq: log.seq,
            ..Default::default()
        };
        out.files = st.counts.files;
        out.dirs = st.counts.dirs;
        out.logical_bytes = st.counts.logical_bytes;
        out.reduce = st.reduce;
        out.counts = st.counts;
        let page_bytes = |lo: u64, hi: u64| -> u64 {
            st.inodes
                .map
                .iter()
                .filter(|(p, _)| (lo..hi).contains(*p))
                .map(|(_, l)| (l.len() * self.meta.geometry().width() * s) as u64)
                .sum()
        };
        out.chunk_index_bytes = page_bytes(meta::CHUNK_PAGES, meta::SIMILAR_PAGES);
        out.similar_index_bytes = page_bytes(meta::SIMILAR_PAGES, u64::MAX);
        out.index_buffered = st.index.len() as u64;
        out.recompressed = st.tail;
        out.next_segment = st.next_seg;
        for seg in st.segs.values() {
            out.live_bytes += seg.live;
            for r in &seg.records {
                out.stored_bytes += (r.nodes.len() * s) as u64;
                for &n in &r.nodes {
                    out.per_node_strips[n as usize] += 1;
                }
            }
        }
        let page_stripes: usize = st.inodes.map.values().map(Vec::len).sum();
        let meta_stripes = (log.chain.len() + page_stripes) as u64;
        out.metadata_bytes = meta_stripes * (self.meta.geometry().width() * s) as u64;
        out.metadata_capacity_bytes = meta_stripes * self.seg_bytes as u64;
        let free = st.free_stripes();
        out.capacity_bytes = st.capacity * self.seg_bytes as u64;
        out.free_bytes = free * self.seg_bytes as u64;
        out
    }

    /// Checks every invariant of the committed metadata and reads every
    /// stripe whole, checking each strip's checksum (corrupt strips are
    /// rewritten from parity as they are found).
    pub async fn fsck(&self) -> FsckReport {
        let mut rep = FsckReport::default();
        let chain = self.log.lock().await.chain.clone();
        let (map, mut inodes, mut chunks, segs, orphans, counts, ref_changes, buffered) = {
            let st = self.state.lock().unwrap();
            let resident: HashMap<u64, Inode> = st
                .inodes
                .pages
                .values()
                .flat_map(|pg| pg.inodes.iter().map(|(k, v)| (*k, v.clone())))
                .collect();
            let chunks: HashMap<Fp, ChunkEntry> = st
                .inodes
                .pages
                .values()
                .flat_map(|pg| pg.chunks.iter().map(|(k, v)| (*k, v.clone())))
                .collect();
            (
                st.inodes.map.clone(),
                resident,
                chunks,
                st.segs.clone(),
                st.orphans.clone(),
                st.counts,
                st.ref_changes.clone(),
                st.index.whole(),
            )
        };
        // Pages not in memory are read from the D-nodes, one at a time; the
        // extents of files whose inode page is resident are there already.
        let mut extent_pages: Vec<(u64, u64, BTreeMap<u64, meta::Extent>)> = Vec::new();
        for (p, loc) in &map {
            let resident = {
                let st = self.state.lock().unwrap();
                let of = meta::extent_page_of(*p).map_or(*p, |(ino, _)| page_of(ino));
                st.inodes.pages.contains_key(&of)
            };
            if resident {
                continue;
            }
            match self.read_page(loc).await {
                Ok(b) if b.page == *p => match meta::extent_page_of(*p) {
                    Some((ino, r)) => match meta::extents_of_blob(b, ino) {
                        Some(m) => extent_pages.push((ino, r, m)),
                        None => rep
                            .problems
                            .push(format!("extent page {p} holds no extents of file {ino}")),
                    },
                    None => {
                        inodes.extend(b.inodes.into_iter().map(|i| (i.ino, i)));
                        chunks.extend(b.chunks.into_iter().map(|c| (c.fp, c)));
                    }
                },
                Ok(b) => rep
                    .problems
                    .push(format!("page {p} holds page {} instead", b.page)),
                Err(e) => rep.problems.push(format!("page {p}: {e}")),
            }
        }
        for (ino, r, m) in extent_pages {
            let outside = m.keys().any(|&o| o / meta::EXTENT_RANGE != r);
            match inodes.get_mut(&ino).map(|i| &mut i.content) {
                Some(Content::File(map)) if !outside => map.extend(m),
                Some(Content::File(_)) => rep.problems.push(format!(
                    "extent page {r} of file {ino} holds extents of other ranges"
                )),
                _ => rep
                    .problems
                    .push(format!("extent page {r} of {ino}, which is not a file")),
            }
        }
        // Buffered entries are newer than the pages'.
        for (fp, e) in buffered.chunks {
            match e {
                Some(e) => chunks.insert(fp, e),
                None => chunks.remove(&fp),
            };
        }
        rep.inodes = inodes.len();
        rep.chunks = chunks.len();
        let chunk_state = ChunkState {
            chunks: &chunks,
            ref_changes: &ref_changes,
        };
        check_metadata(
            &inodes,
            &chunk_state,
            &segs,
            &orphans,
            &counts,
            &mut rep,
            self.seg_bytes,
        );
        // No stripe in two places.
        let mut seen: HashMap<u64, String> = HashMap::new();
        for s in &chain {
            seen.insert(*s, "the metadata log".into());
        }
        for (p, loc) in &map {
            for r in loc {
                if let Some(prev) = seen.insert(r.stripe, format!("page {p}")) {
                    rep.problems.push(format!(
                        "stripe {} is used by both {prev} and page {p}",
                        r.stripe
                    ));
                }
            }
        }
        for (id, seg) in &segs {
            for r in &seg.records {
                if let Some(prev) = seen.insert(r.stripe, format!("segment {id}")) {
                    rep.problems.push(format!(
                        "stripe {} is used by both {prev} and segment {id}",
                        r.stripe
                    ));
                }
            }
        }
        rep.segments = segs.len();
        let records: Vec<StripeRecord> = segs.values().flat_map(|s| s.records.clone()).collect();
        for chunk in records.chunks(16) {
            let results = join_all(
                chunk
                    .iter()
                    .map(|r| async move { (r, self.data.read_stripe(r).await) }),
            )
            .await;
            for (r, res) in results {
                rep.stripes_checked += 1;
                if r.nodes.iter().any(|&n| !self.cluster.is_up(n as usize)) {
                    rep.degraded_stripes += 1;
                }
                if let Err(e) = res {
                    rep.problems.push(format!("stripe {}: {e}", r.stripe));
                }
            }
        }
        rep
    }

    /// Every stripe (data and metadata) with a strip on slot `slot`.
    async fn stripes_on(&self, slot: usize) -> (Vec<StripeRecord>, Vec<StripeRecord>) {
        let chain = self.log.lock().await.chain.clone();
        let data: Vec<StripeRecord> = {
            let st = self.state.lock().unwrap();
            st.segs
                .values()
                .flat_map(|s| s.records.iter())
                .filter(|r| r.nodes.contains(&(slot as u16)))
                .cloned()
                .collect()
        };
        // Metadata stripes are found by walking the log from its head.
        let mut meta = Vec::new();
        let head = self.log.lock().await.head.clone();
        let mut cur = head;
        let strip = self.meta.geometry().strip_size();
        while let Some(rec) = cur {
            if meta.len() > chain.len() {
                break;
            }
            cur = match self.meta.read(&rec, 0, strip).await {
                Ok(b) => meta::unframe::<MetaPart>(META_MAGIC, &b)
                    .ok()
                    .and_then(|p| p.prev),
                Err(_) => None,
            };
            if rec.nodes.contains(&(slot as u16)) {
                meta.push(rec);
            }
        }
        let st = self.state.lock().unwrap();
        meta.extend(
            st.inodes
                .map
                .values()
                .flatten()
                .filter(|r| r.nodes.contains(&(slot as u16)))
                .cloned(),
        );
        (data, meta)
    }

    /// Restores every strip of slot `slot` on the D-node now serving it (a
    /// replacement, after [`Cluster::retarget`]): each stripe touching the
    /// slot is read whole, the slot's strip fails its checksum (or is
    /// unreadable) and is rebuilt from the others and written back.
    /// Reports progress as (stripes done, total); returns bytes restored.
    pub async fn repair_node(
        &self,
        slot: usize,
        progress: impl Fn(u64, u64),
    ) -> Result<u64, FsError> {
        self.check_writable()?;
        if slot >= self.cluster.len() || !self.cluster.is_up(slot) {
            return Err(FsError::Invalid(format!("D-node slot {slot} is not up")));
        }
        let _one = self.rebuilding.lock().await;
        let (data, meta) = self.stripes_on(slot).await;
        let total = (data.len() + meta.len()) as u64;
        let s = self.data.geometry().strip_size() as u64;
        let mut done = 0;
        progress(0, total);
        let all: Vec<(bool, StripeRecord)> = data
            .into_iter()
            .map(|r| (true, r))
            .chain(meta.into_iter().map(|r| (false, r)))
            .collect();
        for batch in all.chunks(16) {
            let results = join_all(batch.iter().map(|(is_data, r)| async move {
                if *is_data {
                    self.data.read_stripe(r).await.map(|_| ())
                } else {
                    self.meta.read_stripe(r).await.map(|_| ())
                }
            }))
            .await;
            for r in results {
                r?;
            }
            done += batch.len() as u64;
            progress(done, total);
        }
        Ok(total * s)
    }

    /// Re-stripes everything with a strip on slot `slot` (a D-node that
    /// stays down) over the D-nodes that are up, so every stripe has full
    /// redundancy again without it, and commits. Returns stripes rewritten.
    pub async fn evacuate(&self, slot: usize, progress: impl Fn(u64, u64)) -> Result<u64, FsError> {
        self.check_writable()?;
        let _one = self.rebuilding.lock().await;
        let segs: Vec<u64> = {
            let st = self.state.lock().unwrap();
            st.segs
                .iter()
                .filter(|(_, s)| s.records.iter().any(|r| r.nodes.contains(&(slot as u16))))
                .map(|(id, _)| *id)
                .collect()
        };
        let total = segs.len() as u64;
        progress(0, total);
        let mut done = 0;
        for id in segs {
            // Writers may change liveness meanwhile, never records: only
            // rebuild replaces records, one at a time.
            let Some(old) = self
                .state
                .lock()
                .unwrap()
                .segs
                .get(&id)
                .map(|s| s.records.clone())
            else {
                continue;
            };
            let mut new = Vec::with_capacity(old.len());
            let mut freed = Vec::new();
            for r in &old {
                if !r.nodes.contains(&(slot as u16)) {
                    new.push(r.clone());
                    continue;
                }
                let copied = async {
                    let strips = self.data.read_stripe(r).await?;
                    self.write_as_stripes(&Bytes::from(strips[..r.k as usize].concat()))
                        .await
                }
                .await;
                match copied {
                    Ok(recs) => new.extend(recs),
                    Err(e) => {
                        // The copies made so far for this segment are garbage.
                        let mut st = self.state.lock().unwrap();
                        st.free
                            .extend(new.iter().filter(|n| !old.contains(n)).map(|n| n.stripe));
                        return Err(e);
                    }
                }
                freed.push(r.stripe);
            }
            let mut st = self.state.lock().unwrap();
            if let Some(s) = st.segs.get_mut(&id) {
                s.records = new;
                st.pending_free.extend(freed);
                st.dirty_segs.insert(id);
                st.changes += 1;
            } else {
                // Freed while we copied it: the copies are garbage.
                st.pending_free.extend(new.iter().map(|r| r.stripe));
            }
            drop(st);
            done += 1;
            progress(done, total);
        }
        // Pages with a copy on the slot are rewritten elsewhere, and a
        // fresh image moves the log off it too.
        let pages: Vec<u64> = {
            let st = self.state.lock().unwrap();
            st.inodes
                .map
                .iter()
                .filter(|(_, l)| l.iter().any(|r| r.nodes.contains(&(slot as u16))))
                .map(|(p, _)| *p)
                .collect()
        };
        for p in pages {
            self.with_state(|st| {
                st.require_pages([p])?;
                st.inodes.dirty.insert(p);
                Ok(())
            })
            .await?;
        }
        self.log.lock().await.force_image = true;
        self.state.lock().unwrap().changes += 1;
        self.sync().await?;
        Ok(total)
    }
}

/// Bytes of payload one metadata part carries.
fn part_room(strip: usize) -> usize {
    strip - meta::PART_HEADER_ROOM - meta::FRAME_OVERHEAD
}

/// Metadata parts `bytes` needs.
fn parts_for(bytes: usize, strip: usize) -> usize {
    bytes.div_ceil(part_room(strip)).max(1)
}

/// Writes `bytes` as metadata parts into `stripes` (one each, as many as
/// [`parts_for`]). Log records (`image` or batch, `prev` given for a batch)
/// chain each part to the one before; a page's parts stand alone
/// (`prev: None`, `image: false`). Returns where the parts went, in order.
async fn write_parts(
    meta: &Volume,
    fs_uuid: [u8; 16],
    seq: u64,
    image: bool,
    mut prev: Option<StripeRecord>,
    bytes: &[u8],
    stripes: &[u64],
) -> Result<Vec<StripeRecord>, FsError> {
    let strip = meta.geometry().strip_size();
    let room = part_room(strip);
    let n = parts_for(bytes.len(), strip);
    assert_eq!(n, stripes.len(), "one stripe per part");
    let chained = image || prev.is_some();
    let mut out = Vec::with_capacity(n);
    for (p, &stripe) in stripes.iter().enumerate() {
        let chunk = &bytes[(p * room).min(bytes.len())..((p + 1) * room).min(bytes.len())];
        let part = MetaPart {
            fs_uuid,
            seq,
            image,
            part: p as u32,
            last: p + 1 == n,
            prev: if chained { prev.take() } else { None },
            payload: chunk.to_vec(),
        };
        let block =
            meta::frame(META_MAGIC, &part, strip).map_err(|e| FsError::Io(e.to_string()))?;
        let rec = meta.write_stripe(stripe, &block).await?;
        if chained {
            prev = Some(rec.clone());
        }
        out.push(rec);
    }
    Ok(out)
}

fn check_name(name: &[u8]) -> Result<(), FsError> {
    if name.len() > NAME_MAX {
        return Err(FsError::NameTooLong);
    }
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0)
    {
        return Err(FsError::Invalid("bad file name".into()));
    }
    Ok(())
}

fn attr(i: &Inode) -> Attr {
    Attr {
        ino: i.ino,
        kind: i.kind,
        perm: i.perm,
        uid: i.uid,
        gid: i.gid,
        nlink: i.nlink,
        size: i.size,
        atime: to_time(i.atime),
        mtime: to_time(i.mtime),
        ctime: to_time(i.ctime),
    }
}

/// Removes `[start, end)` from an extent map, keeping the parts of
/// extents outside it; the removed bytes are reported per segment.
/// What dropping (part of) an extent does to what it names: `len` bytes
/// of it unreferenced, and `refs` more (or fewer) extents naming it.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Unref {
    at: Place,
    len: u64,
    refs: i32,
}

fn punch(map: &mut BTreeMap<u64, Extent>, start: u64, end: u64, dead: &mut Vec<Unref>) {
    let hit: Vec<u64> = map
        .range(..end)
        .rev()
        .take_while(|(k, e)| *k + e.len as u64 > start)
        .map(|(k, _)| *k)
        .collect();
    for k in hit {
        let e = map.remove(&k).unwrap();
        let e_end = k + e.len as u64;
        if k < start {
            map.insert(
                k,
                Extent {
                    len: (start - k) as u32,
                    ..e
                },
            );
        }
        if e_end > end {
            map.insert(
                end,
                Extent {
                    at: e.at,
                    offset: e.offset + (end - k) as u32,
                    len: (e_end - end) as u32,
                },
            );
        }
        let kept = (k < start) as i32 + (e_end > end) as i32;
        dead.push(Unref {
            at: e.at,
            len: e_end.min(end) - k.max(start),
            refs: kept - 1,
        });
    }
}

/// Points `[at, at + e.len)` at `e`, merging with the extent before it
/// when the two are contiguous in one segment (sequential writes).
fn insert_extent(map: &mut BTreeMap<u64, Extent>, at: u64, e: Extent, dead: &mut Vec<Unref>) {
    punch(map, at, at + e.len as u64, dead);
    if let Some((&k, p)) = map.range_mut(..at).next_back() {
        // Only raw segment bytes merge: two extents of one chunk are two
        // references to it.
        if k + p.len as u64 == at
            && matches!(p.at, Place::Seg(_))
            && p.at == e.at
            && p.offset + p.len == e.offset
            && (p.len as u64 + e.len as u64) <= u32::MAX as u64
        {
            p.len += e.len;
            return;
        }
    }
    map.insert(at, e);
}

impl State {
    fn touch(&mut self, ino: u64) {
        self.inodes.dirty.insert(page_of(ino));
        self.changes += 1;
    }

    /// Makes sure the pages of `inos` are in memory (or that they do not
    /// exist), or says which page to load first. Operations call it before
    /// they change anything, so a retry after loading is always safe.
    fn require(&mut self, inos: &[u64]) -> Result<(), FsError> {
        self.inodes.clock += 1;
        for &ino in inos {
            if let Some(p) = self.inodes.missing(ino) {
                return Err(FsError::NotLoaded(p));
            }
            let now = self.inodes.clock;
            if let Some(pg) = self.inodes.pages.get_mut(&page_of(ino)) {
                pg.used = now;
            }
        }
        Ok(())
    }

    fn child(&self, parent: u64, name: &[u8]) -> Result<u64, FsError> {
        match &self.inodes.get(&parent).ok_or(FsError::NotFound)?.content {
            Content::Dir { entries, .. } => entries.get(name).map(|e| e.0).ok_or(FsError::NotFound),
            _ => Err(FsError::NotDir),
        }
    }

    #[allow(clippy::type_complexity)]
    fn dir_mut(&mut self, ino: u64) -> Result<(u64, &mut BTreeMap<Vec<u8>, (u64, Kind)>), FsError> {
        match &mut self.inodes.get_mut(&ino).ok_or(FsError::NotFound)?.content {
            Content::Dir { parent, entries } => Ok((*parent, entries)),
            _ => Err(FsError::NotDir),
        }
    }

    fn remove_entry(&mut self, parent: u64, name: &[u8]) {
        if let Ok((_, e)) = self.dir_mut(parent) {
            e.remove(name);
        }
        let t = now_ns();
        if let Some(p) = self.inodes.get_mut(&parent) {
            p.mtime = t;
            p.ctime = t;
        }
        self.touch(parent);
    }

    /// One fewer name for `ino`; at none it is freed, or (while open) kept
    /// as an orphan until its last close.
    fn drop_link(&mut self, ino: u64) {
        let Some(i) = self.inodes.get_mut(&ino) else {
            return;
        };
        i.nlink = i.nlink.saturating_sub(1);
        i.ctime = now_ns();
        if i.nlink == 0 && !self.open_handles.contains_key(&ino) {
            self.delete_inode(ino);
        } else {
            if i.nlink == 0 {
                self.orphans.insert(ino);
            }
            self.touch(ino);
        }
    }

    fn delete_inode(&mut self, ino: u64) {
        let Some(i) = self.inodes.remove(&ino) else {
            return;
        };
        self.counts.inodes -= 1;
        match i.content {
            Content::File(map) => {
                self.counts.files -= 1;
                self.counts.logical_bytes -= i.size;
                for e in map.values() {
                    self.unref(Unref {
                        at: e.at,
                        len: e.len as u64,
                        refs: -1,
                    });
                }
            }
            Content::Dir { .. } => self.counts.dirs -= 1,
            Content::Symlink(_) => {}
        }
        self.orphans.remove(&ino);
        self.changes += 1;
    }

    fn unref(&mut self, u: Unref) {
        match u.at {
            Place::Seg(seg) => self.release(seg, u.len),
            Place::Chunk(fp) if u.refs != 0 => {
                self.ref_changes.push((fp, u.refs));
                self.changes += 1;
            }
            Place::Chunk(_) => {}
        }
    }

    /// `len` bytes of segment `seg` are no longer referenced.
    fn release(&mut self, seg: u64, len: u64) {
        let Some(s) = self.segs.get_mut(&seg) else {
            return;
        };
        s.live = s.live.saturating_sub(len);
        let written = !s.records.is_empty();
        // The live count is part of the segment's record.
        self.dirty_segs.insert(seg);
        if s.live == 0 && written {
            self.free_segment(seg);
        } else if s.live == 0 && self.open.as_ref().is_none_or(|o| o.id != seg) {
            // Sealed but unwritten and already dead: never write it.
            if self.unwritten.remove(&seg).is_some() {
                self.segs.remove(&seg);
                self.filled.remove(&seg);
            }
        }
    }

    fn free_segment(&mut self, seg: u64) {
        self.filled.remove(&seg);
        if let Some(s) = self.segs.remove(&seg) {
            self.pending_free.extend(s.records.iter().map(|r| r.stripe));
            self.dirty_segs.insert(seg);
            self.changes += 1;
        }
    }

    /// The open segment, started if there is none.
    fn open_segment(&mut self, seg_bytes: usize) -> &mut OpenSegment {
        if self.open.is_none() {
            let id = self.next_seg;
            self.next_seg += 1;
            self.segs.insert(
                id,
                Segment {
                    records: vec![],
                    len: 0,
                    live: 0,
                },
            );
            self.open = Some(OpenSegment {
                id,
                buf: Vec::with_capacity(seg_bytes),
            });
        }
        self.open.as_mut().unwrap()
    }

    /// Moves the open segment (if it has data) to the unwritten ones.
    fn seal(&mut self) -> Option<u64> {
        let o = self.open.take()?;
        if o.buf.is_empty() {
            self.segs.remove(&o.id);
            return None;
        }
        if self.segs.get(&o.id).is_some_and(|s| s.live == 0) {
            self.segs.remove(&o.id);
            return None;
        }
        self.unwritten.insert(o.id, Bytes::from(o.buf));
        Some(o.id)
    }

    /// Stripes free now: below `high` in the free set, and all above it.
    fn free_stripes(&self) -> u64 {
        self.free.len() as u64 + self.capacity.saturating_sub(self.high)
    }

    fn alloc_stripe(&mut self) -> Result<u64, FsError> {
        if let Some(s) = self.free.pop_first() {
            return Ok(s);
        }
        if self.high < self.capacity {
            self.high += 1;
            return Ok(self.high - 1);
        }
        Err(FsError::NoSpace)
    }
}

/// The invariants fsck checks on the metadata itself, over every inode.
/// The chunk index as fsck read it.
struct ChunkState<'a> {
    chunks: &'a HashMap<Fp, ChunkEntry>,
    ref_changes: &'a [(Fp, i32)],
}

fn check_metadata(
    inodes: &HashMap<u64, Inode>,
    cs: &ChunkState<'_>,
    segs: &HashMap<u64, Segment>,
    orphans: &BTreeSet<u64>,
    counts: &Counts,
    rep: &mut FsckReport,
    seg_bytes: usize,
) {
    let mut links: HashMap<u64, u32> = HashMap::new();
    let mut subdirs: HashMap<u64, u32> = HashMap::new();
    let mut live: HashMap<u64, u64> = HashMap::new();
    let mut refs: HashMap<Fp, i64> = HashMap::new();
    for i in inodes.values() {
        match &i.content {
            Content::Dir { parent, entries } => {
                rep.dirs += 1;
                if !inodes.contains_key(parent) {
                    rep.problems
                        .push(format!("directory {} has a missing parent {parent}", i.ino));
                }
                for (name, (c, kind)) in entries {
                    let n = String::from_utf8_lossy(name);
                    if inodes.get(c).is_some_and(|ci| ci.kind != *kind) {
                        rep.problems.push(format!(
                            "directory {} entry '{n}' records the wrong kind",
                            i.ino
                        ));
                    }
                    match inodes.get(c) {
                        None => rep.problems.push(format!(
                            "directory {} entry '{n}' points to missing inode {c}",
                            i.ino
                        )),
                        Some(ci) if ci.kind == Kind::Dir => {
                            *subdirs.entry(i.ino).or_default() += 1;
                            if !matches!(&ci.content, Content::Dir { parent, .. } if *parent == i.ino)
                            {
                                rep.problems.push(format!(
                                    "directory {c} ('{n}') does not name {} as its parent",
                                    i.ino
                                ));
                            }
                        }
                        Some(_) => *links.entry(*c).or_default() += 1,
                    }
                }
            }
            Content::File(map) => {
                rep.files += 1;
                let mut end = 0;
                for (&k, e) in map {
                    if k < end {
                        rep.problems
                            .push(format!("file {} has overlapping extents at {k}", i.ino));
                    }
                    end = k + e.len as u64;
                    if end > i.size {
                        rep.problems.push(format!(
                            "file {} has an extent beyond its size {} (ends at {end})",
                            i.ino, i.size
                        ));
                    }
                    let seg = match e.at {
                        Place::Seg(seg) => seg,
                        Place::Chunk(fp) => {
                            match cs.chunks.get(&fp) {
                                None => rep.problems.push(format!(
                                    "file {} extent at {k} names missing chunk {}",
                                    i.ino,
                                    reduce::hex(&fp)
                                )),
                                Some(c) if e.offset as u64 + e.len as u64 > c.len as u64 => {
                                    rep.problems.push(format!(
                                        "file {} extent at {k} is beyond its chunk's length",
                                        i.ino
                                    ))
                                }
                                Some(_) => {}
                            }
                            *refs.entry(fp).or_default() += 1;
                            continue;
                        }
                    };
                    match segs.get(&seg) {
                        None => rep.problems.push(format!(
                            "file {} extent at {k} points to missing segment {seg}",
                            i.ino
                        )),
                        Some(s) => {
                            if e.offset as u64 + e.len as u64 > s.len as u64
                                || s.len as usize > seg_bytes
                            {
                                rep.problems.push(format!(
                                    "file {} extent at {k} is outside segment {seg}",
                                    i.ino
                                ));
                            }
                            *live.entry(seg).or_default() += e.len as u64;
                        }
                    }
                }
            }
            Content::Symlink(_) => {}
        }
    }
    for i in inodes.values() {
        let expect = match i.kind {
            Kind::Dir => 2 + subdirs.get(&i.ino).copied().unwrap_or(0),
            _ => links.get(&i.ino).copied().unwrap_or(0),
        };
        if i.nlink != expect && !(i.nlink == 0 && orphans.contains(&i.ino)) {
            rep.problems.push(format!(
                "inode {} has link count {} but {} names",
                i.ino, i.nlink, expect
            ));
        }
    }
    let mut actual = Counts::default();
    for c in cs.chunks.values() {
        actual.count_chunk(c, 1);
        let name = reduce::hex(&c.fp);
        if let Some(b) = c.base {
            *refs.entry(b).or_default() += 1;
            let be = cs.chunks.get(&b);
            if c.enc == Encoding::Slice {
                match be.filter(|be| be.enc == Encoding::Region) {
                    None => rep.problems.push(format!(
                        "chunk {name} is in region {}, which is missing or not a region",
                        reduce::hex(&b)
                    )),
                    Some(be) if c.offset as u64 + c.len as u64 > be.len as u64 => rep
                        .problems
                        .push(format!("chunk {name} lies outside its region")),
                    Some(_) => {}
                }
            } else if be.is_none_or(|be| !be.enc.can_be_reference()) {
                rep.problems.push(format!(
                    "chunk {name} is a delta of {}, which is missing, a delta or a region",
                    reduce::hex(&b)
                ));
            }
        }
        if (c.enc.is_delta() || c.enc == Encoding::Slice) != c.base.is_some() {
            rep.problems
                .push(format!("chunk {name}: encoding and reference disagree"));
        }
        if c.enc == Encoding::Slice {
            continue; // no frame of its own
        }
        match segs.get(&c.seg) {
            None => rep
                .problems
                .push(format!("chunk {name} is in missing segment {}", c.seg)),
            Some(s) => {
                if !s.records.is_empty() && c.offset as u64 + c.frame_len() > s.len as u64 {
                    rep.problems
                        .push(format!("chunk {name} is outside segment {}", c.seg));
                }
                *live.entry(c.seg).or_default() += c.frame_len();
            }
        }
    }
    let mut pending: HashMap<Fp, i64> = HashMap::new();
    for (fp, d) in cs.ref_changes {
        *pending.entry(*fp).or_default() += *d as i64;
    }
    for c in cs.chunks.values() {
        let want = refs.get(&c.fp).copied().unwrap_or(0);
        let have = c.refs as i64 + pending.get(&c.fp).copied().unwrap_or(0);
        if want != have {
            rep.problems.push(format!(
                "chunk {} counts {have} references (queued changes included) but {want} exist",
                reduce::hex(&c.fp)
            ));
        }
    }
    for (id, s) in segs {
        if s.records.is_empty() {
            continue;
        }
        let counted = live.get(id).copied().unwrap_or(0);
        if counted != s.live {
            rep.problems.push(format!(
                "segment {id} records {} live bytes but files reference {counted}",
                s.live
            ));
        }
    }
    actual.chunk_buckets = counts.chunk_buckets;
    actual.similar_buckets = counts.similar_buckets;
    actual.similar = counts.similar;
    for i in inodes.values() {
        actual.inodes += 1;
        match i.kind {
            Kind::File => {
                actual.files += 1;
                actual.logical_bytes += i.size;
            }
            Kind::Dir => actual.dirs += 1,
            Kind::Symlink => {}
        }
    }
    if actual != *counts {
        rep.problems.push(format!(
            "recorded totals {counts:?} differ from the inodes' {actual:?}"
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(seg: u64, offset: u32, len: u32) -> Extent {
        Extent {
            at: Place::Seg(seg),
            offset,
            len,
        }
    }

    #[test]
    fn punch_and_insert_keep_extents_disjoint() {
        let mut m = BTreeMap::new();
        let mut dead = Vec::new();
        insert_extent(&mut m, 0, ext(1, 0, 100), &mut dead);
        insert_extent(&mut m, 100, ext(1, 100, 50), &mut dead);
        assert_eq!(m.len(), 1, "contiguous writes merge");
        assert_eq!(m[&0].len, 150);
        insert_extent(&mut m, 40, ext(2, 0, 20), &mut dead);
        assert_eq!(
            dead,
            vec![unref(1, 20, 1)],
            "a hole splits an extent in two"
        );
        assert_eq!(m[&0], ext(1, 0, 40));
        assert_eq!(m[&40], ext(2, 0, 20));
        assert_eq!(m[&60], ext(1, 60, 90));
        dead.clear();
        punch(&mut m, 50, u64::MAX, &mut dead);
        assert_eq!(m.len(), 2);
        assert_eq!(m[&40], ext(2, 0, 10));
        let mut d: Vec<_> = dead
            .iter()
            .map(|u| (u.at, u.len, u.refs))
            .map(|(a, l, r)| (format!("{a:?}"), l, r))
            .collect();
        d.sort();
        assert_eq!(
            d,
            vec![
                ("Seg(1)".to_string(), 90, -1),
                ("Seg(2)".to_string(), 10, 0)
            ]
        );
    }

    fn unref(seg: u64, len: u64, refs: i32) -> Unref {
        Unref {
            at: Place::Seg(seg),
            len,
            refs,
        }
    }

    /// Chunk extents never merge, and splitting one counts a reference.
    #[test]
    fn chunk_extents_count_their_pieces() {
        let c = |offset, len| Extent {
            at: Place::Chunk([1; 32]),
            offset,
            len,
        };
        let mut m = BTreeMap::new();
        let mut dead = Vec::new();
        insert_extent(&mut m, 0, c(0, 100), &mut dead);
        insert_extent(&mut m, 100, c(0, 100), &mut dead);
        assert_eq!(m.len(), 2);
        punch(&mut m, 10, 20, &mut dead);
        assert_eq!(dead.iter().map(|u| u.refs).collect::<Vec<_>>(), vec![1]);
        assert_eq!(m[&20], c(20, 80));
    }
}
