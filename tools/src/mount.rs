//! `dase mount`: the FUSE adapter over the C-node file system.
//!
//! FUSE requests arrive on several threads (one `/dev/fuse` clone each);
//! namespace operations run inline against the in-memory state, and
//! anything that waits on D-nodes (reads, full segments, commits) runs as a
//! task on the tokio runtime and replies from there, so one slow request
//! never holds a FUSE thread.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use dase_initiator::cnode::fs::{
    Attr, FileSystem, FsError, NewKind, Options, PassScope, SetAttr, SetTime,
};
use dase_initiator::cnode::meta::Kind;
use dase_initiator::cnode::ClusterFile;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request,
    TimeOrNow, WriteFlags,
};

/// How long the kernel may cache attributes and names: this mount is the
/// only writer (the lease), so caching is safe.
const TTL: Duration = Duration::from_secs(1);
const BLOCK: u32 = 4096;

#[derive(clap::Args)]
#[command(
    about = "Mount a dase file system through FUSE (runs in the foreground)",
    long_about = "Mount the dase file system on the D-nodes of a cluster file at MOUNTPOINT through FUSE. \
The mount takes the file system's lease (one mount at a time) and renews it; it runs in the \
foreground until `umount MOUNTPOINT`, SIGINT or SIGTERM, then commits and releases the lease. \
A stale mount left by a killed dase mount at MOUNTPOINT is cleaned up first.\n\n\
Durability: fsync/fdatasync, unlink, rename and rmdir are committed to the D-nodes before they \
return; other changes are committed within --commit-interval, except that with data reduction \
(dase mkfs --reduce dedup|full) up to 8 MiB per open file gather for content-defined chunking and \
are stored when the file is closed, synced or written elsewhere.",
    after_help = "Examples:\n  dase mount --cluster /tmp/dase/cluster.toml /mnt/dase\n  dase mount --cluster cluster.toml --threads 8 /mnt/dase &\n  umount /mnt/dase"
)]
pub struct MountArgs {
    #[arg(long)]
    pub cluster: PathBuf,
    pub mountpoint: PathBuf,
    /// FUSE request threads.
    #[arg(long, default_value_t = 4)]
    pub threads: usize,
    /// How long the mount lease lasts without renewal (seconds).
    #[arg(long, default_value_t = 10.0)]
    pub lease_ttl: f64,
    /// Uncommitted changes are committed at least this often (seconds).
    #[arg(long, default_value_t = 2.0)]
    pub commit_interval: f64,
    /// Re-stripe a D-node's data over the others once it has been down
    /// this long (seconds); 0 disables.
    #[arg(long, default_value_t = 600.0)]
    pub rebuild_after: f64,
    /// Metadata pages (256 inodes, or one index bucket, each) kept in
    /// memory once committed: bounds the mount's memory whatever the number
    /// of files and of stored chunks. Pages changed since the last commit
    /// stay until it (index changes go to the journal instead, and a commit
    /// merges at most a quarter of this many buckets).
    #[arg(long, default_value_t = 512)]
    pub cache_pages: usize,
    /// Index entries (new chunks, reference and similarity changes) kept
    /// journalled in the metadata log before commits merge them into the
    /// index buckets on the D-nodes; ingest waits beyond four times this
    /// many. Larger: fewer bucket rewrites per byte ingested; smaller: less
    /// memory (about 150 bytes an entry).
    #[arg(long, default_value_t = Options::default().index_buffer)]
    pub index_buffer: usize,
    /// MiB of decoded reference chunks kept: the chunks deltas are built
    /// on, so that the deltas of later versions (of a checkpoint, a source
    /// tree) which name the same references read and write without
    /// fetching and decoding them again. 0 disables.
    #[arg(long, default_value_t = (Options::default().reference_cache >> 20) as u64)]
    pub reference_cache: u64,
    /// MiB of filters of the index buckets the page cache evicted (~2 bytes
    /// a key, ~8 a stored chunk): a new chunk's lookups then learn it is new
    /// without loading its buckets from the D-nodes, for the first ~8 M
    /// chunks (~150 GiB of unique data) per 64 MiB. 0 disables.
    #[arg(long, default_value_t = (Options::default().index_filters >> 20) as u64)]
    pub index_filters: u64,
    /// At mount, read the index buckets once (in the background, until
    /// --index-filters is full) to make their filters, so that a fresh
    /// C-node's lookups of new chunks load no pages from the start. Costs
    /// one read of each bucket (~64 KiB per ~170 stored chunks).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub warm_filters: bool,
    /// With --reduce full: once nothing has been written for this many
    /// seconds, store what was written since the last pass again at zstd
    /// level 19 in compression regions, as `dase clean --recompress` does
    /// (text such as logs and source trees then stores 15-40 % less),
    /// stopping as soon as anything is written. Raw chunks and arrays of
    /// numbers are left as they are. Costs one core while it runs (1-6
    /// MB/s of text) and makes random reads of such data decode a whole
    /// region (~1 ms per MiB). 0 disables.
    #[arg(long, default_value_t = 0.0, value_name = "SECS")]
    pub recompress_idle: f64,
    /// Content per compression region of --recompress-idle's passes (128K
    /// to 16M; 0: every chunk compressed alone, no regions). Smaller
    /// regions cost random reads less and save about as much down to 1M
    /// (the corpus logs: 9.4 MB chunk by chunk, 8.7 MB at 4M, ~8.7 at 1M,
    /// 8.75 at 768K; BENCHMARKS.md).
    #[arg(long, default_value = "4M", value_name = "SIZE")]
    pub recompress_region: String,
}

/// Where a mount of file system `uuid` takes requests (`dase rebuild`).
pub fn control_path(uuid: &str) -> PathBuf {
    PathBuf::from(format!("/run/dase/{uuid}.sock"))
}

/// Sends one request to a mount and relays its progress lines; returns
/// the bytes it reports done.
pub fn control_request(s: std::os::unix::net::UnixStream, request: &str) -> Result<u64> {
    use std::io::{BufRead, Write};
    let mut w = s.try_clone()?;
    writeln!(w, "{request}")?;
    for line in std::io::BufReader::new(s).lines() {
        let line = line?;
        if let Some(rest) = line.strip_prefix("ok ") {
            return rest.trim().parse().context("mount's answer");
        }
        if let Some(rest) = line.strip_prefix("error ") {
            bail!("the mount failed: {rest}");
        }
        eprintln!("{line}");
    }
    bail!("the mount closed the connection without an answer")
}

/// Serves `dase rebuild` requests: `replace SLOT ADDR NQN` (retarget the
/// slot at a new D-node and restore its strips) or `evacuate SLOT`.
async fn serve_control(fs: Arc<FileSystem>, path: PathBuf) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    if let Some(d) = path.parent() {
        let _ = std::fs::create_dir_all(d);
    }
    let _ = std::fs::remove_file(&path);
    let l = match tokio::net::UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "no control socket: dase rebuild will not reach this mount");
            return;
        }
    };
    while let Ok((sock, _)) = l.accept().await {
        let fs = fs.clone();
        tokio::spawn(async move {
            let (r, mut w) = sock.into_split();
            let Ok(Some(line)) = tokio::io::BufReader::new(r).lines().next_line().await else {
                return;
            };
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
            let work = async {
                let f: Vec<&str> = line.split_whitespace().collect();
                let slot = |s: &str| -> Result<usize> {
                    let i: usize = s.parse().context("slot")?;
                    if i >= fs.cluster().len() {
                        bail!("no D-node slot {i}");
                    }
                    Ok(i)
                };
                let say = |what: &'static str, unit: &'static str| {
                    let tx = tx.clone();
                    crate::fs::progress_steps(what, unit, move |m| {
                        let _ = tx.send(m);
                    })
                };
                match f.as_slice() {
                    ["replace", s, addr, nqn] => {
                        let i = slot(s)?;
                        fs.cluster()
                            .retarget(i, addr, nqn)
                            .await
                            .with_context(|| format!("connecting to {addr}"))?;
                        tracing::info!(slot = i, dnode = %addr, "rebuilding onto a replacement D-node");
                        Ok(fs.repair_node(i, say("rebuild", "stripes")).await?)
                    }
                    ["clean"] => {
                        let r = fs.clean(0.99).await?;
                        fs.merge_index().await?;
                        fs.sync().await?;
                        let _ = tx.send(format!(
                            "cleaned {} segments, moved {} chunks ({} bytes)",
                            r.segments, r.chunks_moved, r.bytes_moved
                        ));
                        Ok(r.segments)
                    }
                    ["recompress", level, region] => {
                        let level: i32 = level.parse().context("level")?;
                        let region: usize = region.parse().context("region bytes")?;
                        let r = fs
                            .recompress(
                                level,
                                region,
                                PassScope::All,
                                say("recompress", "segments"),
                            )
                            .await?;
                        let _ = tx.send(format!(
                            "recompressed {} chunks ({} compression regions) at zstd level {level}: {} -> {} bytes",
                            r.chunks, r.regions, r.before, r.after
                        ));
                        Ok(r.before.saturating_sub(r.after))
                    }
                    ["evacuate", s] => {
                        let i = slot(s)?;
                        let n = fs.evacuate(i, say("evacuate", "stripes")).await?;
                        Ok(n * fs.geometry().data_bytes() as u64)
                    }
                    _ => Err(anyhow::anyhow!("unknown request '{line}'")),
                }
            };
            tokio::pin!(work);
            let result = loop {
                tokio::select! {
                    r = &mut work => break r,
                    Some(m) = rx.recv() => { let _ = w.write_all(format!("{m}\n").as_bytes()).await; }
                }
            };
            while let Ok(m) = rx.try_recv() {
                let _ = w.write_all(format!("{m}\n").as_bytes()).await;
            }
            let last = match result {
                Ok(n) => format!("ok {n}\n"),
                Err(e) => format!("error {e:#}\n"),
            };
            let _ = w.write_all(last.as_bytes()).await;
        });
    }
}

fn errno(e: &FsError) -> Errno {
    Errno::from_i32(e.errno())
}

fn file_type(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
    }
}

fn fattr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.ctime,
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        blksize: BLOCK,
        flags: 0,
    }
}

fn set_time(t: Option<TimeOrNow>) -> Option<SetTime> {
    t.map(|t| match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(s) => SetTime::At(s),
    })
}

struct Fuse {
    fs: Arc<FileSystem>,
    rt: tokio::runtime::Handle,
    /// Writes go through the reduction pipeline.
    reduces: bool,
}

impl Fuse {
    fn entry(&self, r: Result<Attr, FsError>, reply: ReplyEntry) {
        match r {
            Ok(a) => reply.entry(&TTL, &fattr(&a), Generation(0)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn empty_async<F>(&self, reply: ReplyEmpty, f: F)
    where
        F: std::future::Future<Output = Result<(), FsError>> + Send + 'static,
    {
        self.rt.spawn(async move {
            match f.await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }
}

impl Fuse {
    /// What both dase mounts ask of the kernel.
    fn configure(config: &mut KernelConfig) {
        // Without ASYNC_DIO the kernel sends one O_DIRECT request at a time.
        let want = InitFlags::FUSE_ASYNC_DIO
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_BIG_WRITES
            | InitFlags::FUSE_ASYNC_READ;
        if let Err(missing) = config.add_capabilities(want) {
            tracing::warn!(?missing, "kernel lacks FUSE capabilities");
        }
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
    }
}

impl Filesystem for Fuse {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        Fuse::configure(config);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.entry(
            self.rt.block_on(self.fs.lookup(parent.0, name.as_bytes())),
            reply,
        )
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.rt.block_on(self.fs.getattr(ino.0)) {
            Ok(a) => reply.attr(&TTL, &fattr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let set = SetAttr {
            perm: mode.map(|m| (m & 0o7777) as u16),
            uid,
            gid,
            size,
            atime: set_time(atime),
            mtime: set_time(mtime),
        };
        match self.rt.block_on(self.fs.setattr(ino.0, &set)) {
            Ok(a) => reply.attr(&TTL, &fattr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.rt.block_on(self.fs.readlink(ino.0)) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & libc::S_IFMT != libc::S_IFREG {
            // Devices, FIFOs and sockets are not stored.
            return reply.error(Errno::EPERM);
        }
        let perm = (mode & !umask & 0o7777) as u16;
        let r = self.rt.block_on(self.fs.create(
            parent.0,
            name.as_bytes(),
            NewKind::File,
            perm,
            req.uid(),
            req.gid(),
        ));
        self.entry(r, reply)
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let perm = (mode & !umask & 0o7777) as u16;
        let r = self.rt.block_on(self.fs.create(
            parent.0,
            name.as_bytes(),
            NewKind::Dir,
            perm,
            req.uid(),
            req.gid(),
        ));
        self.entry(r, reply)
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let (fs, name) = (self.fs.clone(), name.as_bytes().to_vec());
        self.empty_async(reply, async move { fs.unlink(parent.0, &name).await })
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let (fs, name) = (self.fs.clone(), name.as_bytes().to_vec());
        self.empty_async(reply, async move { fs.rmdir(parent.0, &name).await })
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let r = self.rt.block_on(self.fs.create(
            parent.0,
            link_name.as_bytes(),
            NewKind::Symlink(target.as_os_str().as_bytes()),
            0o777,
            req.uid(),
            req.gid(),
        ));
        self.entry(r, reply)
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.intersects(RenameFlags::RENAME_EXCHANGE | RenameFlags::RENAME_WHITEOUT) {
            return reply.error(Errno::EINVAL);
        }
        let noreplace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        let fs = self.fs.clone();
        let (name, newname) = (name.as_bytes().to_vec(), newname.as_bytes().to_vec());
        self.empty_async(reply, async move {
            fs.rename(parent.0, &name, newparent.0, &newname, noreplace)
                .await
        })
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.entry(
            self.rt
                .block_on(self.fs.link(ino.0, newparent.0, newname.as_bytes())),
            reply,
        )
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.rt.block_on(self.fs.open_file(ino.0)) {
            // This mount is the only writer: the page cache stays valid
            // across opens. Direct writes to one file may run in parallel.
            Ok(_) => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
            ),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let fs = self.fs.clone();
        self.rt.spawn(async move {
            match fs.read(ino.0, offset, size as usize).await {
                Ok(b) => reply.data(&b),
                Err(e) => {
                    tracing::warn!(ino = ino.0, offset, error = %e, "read failed");
                    reply.error(errno(&e))
                }
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let n = data.len() as u32;
        if self.reduces {
            // Chunking and reduction run here, on this FUSE thread.
            match self.rt.block_on(self.fs.write_reduced(ino.0, offset, data)) {
                Ok(()) => reply.written(n),
                Err(e) => reply.error(errno(&e)),
            }
            return;
        }
        let guard = self.rt.block_on(self.fs.write_guard());
        match self.rt.block_on(self.fs.write(ino.0, offset, data)) {
            Err(e) => reply.error(errno(&e)),
            Ok(sealed) if sealed.is_empty() => reply.written(n),
            Ok(sealed) => {
                let fs = self.fs.clone();
                self.rt.spawn(async move {
                    let r = fs.write_segments(&sealed).await;
                    drop(guard);
                    match r {
                        Ok(()) => reply.written(n),
                        Err(e) => {
                            tracing::warn!(ino = ino.0, offset, error = %e, "write failed");
                            reply.error(errno(&e))
                        }
                    }
                });
            }
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok()
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.rt.block_on(self.fs.release_file(ino.0));
        reply.ok()
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let fs = self.fs.clone();
        self.empty_async(reply, async move { fs.sync().await })
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let mut at = offset;
        loop {
            let batch = match self.rt.block_on(self.fs.readdir(ino.0, at, 128)) {
                Ok(b) => b,
                Err(e) => return reply.error(errno(&e)),
            };
            if batch.is_empty() {
                break;
            }
            for (next, e) in batch {
                if reply.add(
                    INodeNo(e.ino),
                    next,
                    file_type(e.kind),
                    OsStr::from_bytes(&e.name),
                ) {
                    return reply.ok();
                }
                at = next;
            }
        }
        reply.ok()
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let fs = self.fs.clone();
        self.empty_async(reply, async move { fs.sync().await })
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let (cap, free, files) = self.fs.statfs();
        let b = BLOCK as u64;
        reply.statfs(
            cap / b,
            free / b,
            free / b,
            files,
            u32::MAX as u64,
            BLOCK,
            255,
            BLOCK,
        );
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        // default_permissions: the kernel checks mode bits itself.
        reply.ok()
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let perm = (mode & !umask & 0o7777) as u16;
        let r = self.rt.block_on(async {
            let a = self
                .fs
                .create(
                    parent.0,
                    name.as_bytes(),
                    NewKind::File,
                    perm,
                    req.uid(),
                    req.gid(),
                )
                .await?;
            self.fs.open_file(a.ino).await
        });
        match r {
            Ok(a) => reply.created(
                &TTL,
                &fattr(&a),
                Generation(0),
                FileHandle(0),
                FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
            ),
            Err(e) => reply.error(errno(&e)),
        }
    }
}

/// A mount at `path` in this mount namespace, from /proc/self/mountinfo:
/// (major:minor of its device, file system type).
pub fn find_mount(path: &Path) -> Option<(String, String)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = path.as_os_str().as_bytes();
    info.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        let sep = f.iter().position(|x| *x == "-")?;
        let fstype = f.get(sep + 1)?.to_string();
        (unescape(f.get(4)?) == want).then(|| (f[2].to_string(), fstype))
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// The absolute path of a mount point without touching the mount itself
/// (a stale FUSE mount fails or hangs every access).
pub fn absolute_mountpoint(p: &Path) -> Result<PathBuf> {
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()?.join(p)
    };
    let name = abs
        .file_name()
        .with_context(|| format!("{} is not a directory path", p.display()))?
        .to_owned();
    let parent = abs.parent().unwrap_or(Path::new("/"));
    let parent = std::fs::canonicalize(parent)
        .with_context(|| format!("mount point parent {}", parent.display()))?;
    Ok(parent.join(name))
}

/// Clears a dead dase mount left at `mp` (a killed mount process): aborts
/// its FUSE connection if it hangs, then detaches it. A live mount is an error.
pub fn clean_stale_mount(mp: &Path) -> Result<()> {
    let Some((dev, fstype)) = find_mount(mp) else {
        return Ok(());
    };
    if !fstype.starts_with("fuse") {
        bail!("{} is already a mount point ({fstype})", mp.display());
    }
    // Stat it on a thread: a hung file system would block us forever.
    let (tx, rx) = std::sync::mpsc::channel();
    let p = mp.to_path_buf();
    std::thread::spawn(move || {
        let _ = tx.send(std::fs::metadata(&p).map_err(|e| e.raw_os_error()));
    });
    match rx.recv_timeout(Duration::from_secs(2)) {
        Ok(Ok(_)) => bail!(
            "{} is mounted by a running file system; unmount it first (umount {})",
            mp.display(),
            mp.display()
        ),
        Ok(Err(Some(libc::ENOTCONN))) | Ok(Err(Some(libc::ECONNABORTED))) => {}
        Ok(Err(e)) => tracing::warn!(?e, "stale mount check"),
        Err(_) => {
            // Hung: abort the connection through fusectl.
            let minor = dev.split(':').nth(1).unwrap_or("");
            let ctl = Path::new("/sys/fs/fuse/connections");
            if !ctl.join(minor).exists() {
                let _ = std::process::Command::new("mount")
                    .args(["-t", "fusectl", "none", "/sys/fs/fuse/connections"])
                    .status();
            }
            let _ = std::fs::write(ctl.join(minor).join("abort"), "1");
        }
    }
    eprintln!("dase mount: clearing a stale mount at {}", mp.display());
    detach(mp)?;
    Ok(())
}

/// Lazy unmount: detaches now, finishes when the last user lets go.
pub fn detach(mp: &Path) -> Result<()> {
    let c = std::ffi::CString::new(mp.as_os_str().as_bytes())?;
    // SAFETY: a valid NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINVAL) {
            return Err(e).with_context(|| format!("unmounting {}", mp.display()));
        }
    }
    Ok(())
}

pub fn mount(a: MountArgs) -> Result<()> {
    let file = ClusterFile::load(&a.cluster)?;
    let mp = absolute_mountpoint(&a.mountpoint)?;
    clean_stale_mount(&mp)?;
    if !mp.is_dir() {
        bail!("mount point {} is not a directory", mp.display());
    }
    if a.threads == 0 || a.threads > 64 {
        bail!("--threads must be 1 to 64");
    }
    let ttl = Duration::try_from_secs_f64(a.lease_ttl)
        .ok()
        .filter(|d| *d >= Duration::from_millis(500))
        .context("--lease-ttl must be at least 0.5 seconds")?;
    let commit_interval = Duration::try_from_secs_f64(a.commit_interval)
        .ok()
        .filter(|d| !d.is_zero())
        .context("--commit-interval must be positive")?;
    // Before the runtime's threads exist, so that they all inherit the mask.
    // SIGINT/SIGTERM then detach the mount; the session ends and we commit
    // and release the lease below.
    unmount_on_signal(&mp)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let opts = Options {
        lease_ttl: ttl,
        commit_interval,
        description: format!(
            "dase mount {} on {} pid {}",
            mp.display(),
            host.trim(),
            std::process::id()
        ),
        read_only: false,
        rebuild_after: (a.rebuild_after > 0.0)
            .then(|| Duration::try_from_secs_f64(a.rebuild_after).ok())
            .flatten(),
        cache_pages: a.cache_pages,
        index_buffer: a.index_buffer.max(1),
        reference_cache: usize::try_from(a.reference_cache.saturating_mul(1 << 20))
            .unwrap_or(usize::MAX),
        index_filters: usize::try_from(a.index_filters.saturating_mul(1 << 20))
            .unwrap_or(usize::MAX),
        warm_filters: a.warm_filters,
        recompress_region: crate::fs::region_bytes("--recompress-region", &a.recompress_region)?,
        recompress_idle: if a.recompress_idle == 0.0 {
            None
        } else {
            Some(
                Duration::try_from_secs_f64(a.recompress_idle)
                    .ok()
                    .filter(|d| !d.is_zero())
                    .context("--recompress-idle must be 0 or a positive number of seconds")?,
            )
        },
    };
    let fs = rt
        .block_on(FileSystem::open(&file, opts))
        .context("cannot mount")?;
    let uuid = fs.superblock().uuid_string();
    let bg = rt.spawn(fs.clone().run_background());
    let sock = control_path(&uuid);
    let ctl = rt.spawn(serve_control(fs.clone(), sock.clone()));
    let config = {
        let mut c = fuser::Config::default();
        c.mount_options = vec![
            MountOption::FSName(format!("dase:{uuid}")),
            MountOption::Subtype("dase".into()),
            MountOption::DefaultPermissions,
            MountOption::RW,
            MountOption::NoAtime,
        ];
        c.acl = fuser::SessionACL::All;
        c.n_threads = Some(a.threads);
        c.clone_fd = true;
        c
    };
    let fuse = Fuse {
        fs: fs.clone(),
        rt: rt.handle().clone(),
        reduces: fs.reduce() != dase_initiator::reduce::Reduce::None,
    };
    let session = match fuser::Session::new(fuse, &mp, &config) {
        Ok(s) => s,
        Err(e) => {
            let _ = rt.block_on(fs.close());
            return Err(e).with_context(|| format!("mounting FUSE at {}", mp.display()));
        }
    };
    println!(
        "mounted dase file system {uuid} at {} ({} geometry, {} D-nodes)",
        mp.display(),
        fs.geometry(),
        fs.cluster().len()
    );
    use std::io::Write;
    std::io::stdout().flush()?;
    let run = session.run();
    // Safe at any point: a commit the task had begun finishes in a task of
    // its own, and the final commit below waits for it.
    bg.abort();
    ctl.abort();
    let _ = std::fs::remove_file(&sock);
    let closed = rt.block_on(fs.close());
    run.context("FUSE session")?;
    closed.context("final commit at unmount")?;
    println!("unmounted {}", mp.display());
    Ok(())
}

/// The ceiling a FUSE file system can reach here: one file, `data`, that
/// discards writes and reads as zeros, served with the same threads and
/// kernel options as `dase mount` (`dase noop-mount`, for benchmarks).
struct Noop;

const NOOP_FILE: u64 = 2;
const NOOP_SIZE: u64 = 1 << 40;

fn noop_attr(ino: u64) -> FileAttr {
    let dir = ino == 1;
    FileAttr {
        ino: INodeNo(ino),
        size: if dir { 0 } else { NOOP_SIZE },
        blocks: 0,
        atime: SystemTime::UNIX_EPOCH,
        mtime: SystemTime::UNIX_EPOCH,
        ctime: SystemTime::UNIX_EPOCH,
        crtime: SystemTime::UNIX_EPOCH,
        kind: if dir {
            FileType::Directory
        } else {
            FileType::RegularFile
        },
        perm: if dir { 0o755 } else { 0o644 },
        nlink: if dir { 2 } else { 1 },
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: BLOCK,
        flags: 0,
    }
}

impl Filesystem for Noop {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        Fuse::configure(config);
        Ok(())
    }
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent.0 == 1 && name == "data" {
            reply.entry(&TTL, &noop_attr(NOOP_FILE), Generation(0))
        } else {
            reply.error(Errno::ENOENT)
        }
    }
    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match ino.0 {
            1 | NOOP_FILE => reply.attr(&TTL, &noop_attr(ino.0)),
            _ => reply.error(Errno::ENOENT),
        }
    }
    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(
            FileHandle(0),
            FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
        )
    }
    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        thread_local! {
            static ZEROS: Vec<u8> = vec![0u8; 1 << 20];
        }
        let n = (size as u64).min(NOOP_SIZE.saturating_sub(offset)) as usize;
        ZEROS.with(|z| reply.data(&z[..n.min(z.len())]))
    }
    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.written(data.len() as u32)
    }
    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.attr(&TTL, &noop_attr(ino.0))
    }
    fn fsync(&self, _: &Request, _: INodeNo, _: FileHandle, _: bool, reply: ReplyEmpty) {
        reply.ok()
    }
    fn flush(&self, _: &Request, _: INodeNo, _: FileHandle, _: LockOwner, reply: ReplyEmpty) {
        reply.ok()
    }
}

#[derive(clap::Args)]
pub struct NoopArgs {
    pub mountpoint: PathBuf,
    #[arg(long, default_value_t = 4)]
    pub threads: usize,
}

/// `dase noop-mount`: serves [`Noop`] until unmounted or signalled.
pub fn noop_mount(a: NoopArgs) -> Result<()> {
    let mp = absolute_mountpoint(&a.mountpoint)?;
    clean_stale_mount(&mp)?;
    let mut c = fuser::Config::default();
    c.mount_options = vec![
        MountOption::FSName("dase-noop".into()),
        MountOption::DefaultPermissions,
        MountOption::RW,
    ];
    c.acl = fuser::SessionACL::All;
    c.n_threads = Some(a.threads.clamp(1, 64));
    c.clone_fd = true;
    unmount_on_signal(&mp)?;
    let session = fuser::Session::new(Noop, &mp, &c)
        .with_context(|| format!("mounting at {}", mp.display()))?;
    println!("mounted no-op file system at {} (file: data)", mp.display());
    use std::io::Write;
    std::io::stdout().flush()?;
    session.run().context("FUSE session")?;
    Ok(())
}

/// SIGINT/SIGTERM detach the mount at `mp` (a thread waits for them); one
/// that arrives before anything is mounted there ends the process. Call it
/// before any other thread starts: they inherit the blocked signals.
fn unmount_on_signal(mp: &Path) -> Result<()> {
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: plain signal-mask calls on a local set; blocking the signals
    // here (before any other thread exists) makes every thread inherit it.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    let mp = mp.to_path_buf();
    std::thread::spawn(move || {
        let mut sig = 0;
        // SAFETY: waits on the set blocked above.
        unsafe { libc::sigwait(&set, &mut sig) };
        if find_mount(&mp).is_none() {
            eprintln!("dase: interrupted before mounting");
            std::process::exit(130);
        }
        tracing::info!("signal: unmounting");
        if let Err(e) = detach(&mp) {
            tracing::error!(error = %e, "unmount failed");
        }
    });
    Ok(())
}
