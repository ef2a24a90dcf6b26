//! `dase mkfs`: format a cluster's D-nodes as one dase file system.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use dase_erasure::Geometry;
use dase_initiator::cnode::fs::{FileSystem, MountError, Options, PassScope};
use dase_initiator::cnode::lease::LeaseError;
use dase_initiator::cnode::meta;
use dase_initiator::cnode::superblock;
use dase_initiator::cnode::{Cluster, ClusterFile, DNodeSpec, Volume};
use dase_initiator::host::ControllerOptions;
use dase_initiator::reduce::{self, Reduce};

#[derive(clap::Args)]
#[command(
    about = "Format the D-nodes of a cluster file as one dase file system",
    long_about = "Format the D-nodes of a cluster file as one dase file system: a versioned, \
checksummed superblock (two copies) on every D-node namespace recording the file system's identity, \
each D-node's slot and the stripe geometry. Every D-node must be reachable. Refuses to overwrite an \
existing dase file system unless --force.",
    after_help = "Examples:\n  dase mkfs --cluster /tmp/dase/cluster.toml\n  dase mkfs --cluster cluster.toml --ec 20+2+4 --strip-size 128k --force"
)]
pub struct MkfsArgs {
    #[arg(long)]
    cluster: PathBuf,
    /// Erasure code: k+m (Reed-Solomon) or k+l+g (LRC).
    #[arg(long, default_value = dase_erasure::DEFAULT_GEOMETRY)]
    ec: String,
    /// Bytes per strip (a multiple of 64 and of the D-nodes' block size).
    #[arg(long, default_value = "64k")]
    strip_size: String,
    /// Data reduction: none (bytes as written), dedup (content-defined
    /// chunks stored once) or full (dedup, then deltas against similar
    /// chunks, then compression).
    #[arg(long, default_value = "full")]
    reduce: Reduce,
    /// Average content-defined chunk size: a power of two from 4k to 64k
    /// (chunks are cut from a quarter to four times it). Smaller finds
    /// more duplicates in archives whose members move between versions
    /// (wheels, zips) and costs more index entries; 16k was within 1.5 % of
    /// the best on the evaluation corpus (BENCHMARKS.md). 64k needs stripes
    /// holding 512 KiB of data.
    #[arg(long, default_value = "16k")]
    chunk_size: String,
    /// Destroy an existing dase file system on these D-nodes.
    #[arg(long)]
    force: bool,
}

pub fn mkfs(a: MkfsArgs) -> Result<()> {
    let file = ClusterFile::load(&a.cluster)?;
    let strip = dase_target::parse_size(&a.strip_size).map_err(anyhow::Error::msg)? as usize;
    let geo = Geometry::parse(&a.ec, strip)?;
    let avg_chunk = dase_target::parse_size(&a.chunk_size)
        .map_err(anyhow::Error::msg)
        .and_then(|n| u32::try_from(n).map_err(anyhow::Error::msg))
        .and_then(|n| {
            reduce::check_avg_chunk(n)
                .map(|()| n)
                .map_err(anyhow::Error::msg)
        })
        .with_context(|| format!("--chunk-size {}", a.chunk_size))?;
    let frame = (reduce::max_chunk(avg_chunk) as usize + meta::CHUNK_HEADER) * 2;
    if a.reduce != Reduce::None && geo.data_bytes() < frame {
        bail!(
            "a stripe holds {} bytes of data; reduction needs at least {frame} (two of the largest \
             chunks, {} KiB for --chunk-size {}): use a larger --strip-size, a smaller \
             --chunk-size or --reduce none",
            geo.data_bytes(),
            reduce::max_chunk(avg_chunk) >> 10,
            a.chunk_size
        );
    }
    if file.dnodes.len() < geo.width() {
        eprintln!(
            "dase mkfs: warning: {} D-nodes for {} strips per stripe: stripes will be {} wide",
            file.dnodes.len(),
            geo.width(),
            file.dnodes.len()
        );
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let cluster = Arc::new(
            Cluster::connect(
                &file,
                ControllerOptions {
                    io_queues: 1,
                    ..Default::default()
                },
            )
            .await,
        );
        let down = cluster.unreachable();
        if !down.is_empty() {
            bail!("cannot format: unreachable D-nodes: {}", down.join("; "));
        }
        let volume = Volume::new(cluster.clone(), geo)
            .context("checking the geometry against the D-nodes")?;
        let stripes = volume.capacity_stripes();
        if stripes == 0 {
            bail!("the D-nodes' namespaces are too small for one stripe");
        }
        let sb = superblock::format(&cluster, &file, &geo, avg_chunk, a.force).await?;
        let sb = superblock::verify(&cluster, &file).await.map(|_| sb)?;
        dase_initiator::cnode::fs::FileSystem::format_metadata(&cluster, &sb, a.reduce)
            .await
            .context("writing the empty file system's metadata")?;
        println!("formatted dase file system {}", sb.uuid_string());
        println!("  D-nodes        : {}", file.dnodes.len());
        println!(
            "  erasure code   : {geo} ({:.3} raw-to-usable, survives {} lost D-nodes)",
            geo.overhead(),
            geo.guaranteed_losses()
        );
        println!("  strip size     : {} bytes", geo.strip_size());
        println!("  reduction      : {}", a.reduce);
        if a.reduce != Reduce::None {
            println!("  chunk size     : {} KiB average", avg_chunk >> 10);
        }
        // Fewer D-nodes than strips per stripe: placement narrows every stripe.
        let k = geo.k().min(file.dnodes.len() - geo.m());
        let data = stripes * (k * geo.strip_size()) as u64;
        println!(
            "  capacity       : {} stripes, {:.2} GiB of data",
            stripes,
            data as f64 / (1u64 << 30) as f64
        );
        Ok(())
    })
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

fn gib(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    }
}

/// Opens the file system with its lease, or (when a mount holds it) read-only.
async fn open_for_check(file: &ClusterFile) -> Result<(Arc<FileSystem>, bool)> {
    let opts = Options {
        description: format!("dase fsck pid {}", std::process::id()),
        ..Default::default()
    };
    match FileSystem::open(file, opts.clone()).await {
        Ok(fs) => Ok((fs, true)),
        Err(MountError::Lease(LeaseError::Held { holder, .. })) => {
            eprintln!("note: mounted by {holder}: checking without repairing");
            let fs = FileSystem::open(
                file,
                Options {
                    read_only: true,
                    ..opts
                },
            )
            .await?;
            Ok((fs, false))
        }
        Err(e) => Err(e.into()),
    }
}

#[derive(clap::Args)]
#[command(
    about = "Check a dase file system's metadata and every strip's checksum",
    long_about = "Check every invariant of a dase file system: directory entries point at inodes, \
link counts match names, extents lie inside their segments and files, segments' live-byte counts \
match the extents that reference them, no stripe is used twice; then read every stripe whole and \
check each strip's CRC32C. Corrupt strips are rebuilt from parity and rewritten (unless the file \
system is mounted elsewhere: then it only reports). Exit status 1 when problems are found.",
    after_help = "Example:\n  dase fsck --cluster /tmp/dase/cluster.toml"
)]
pub struct FsckArgs {
    #[arg(long)]
    cluster: PathBuf,
}

pub fn fsck(a: FsckArgs) -> Result<bool> {
    let file = ClusterFile::load(&a.cluster)?;
    runtime()?.block_on(async {
        let (fs, writable) = open_for_check(&file).await?;
        let r = fs.fsck().await;
        println!("file system {}", fs.superblock().uuid_string());
        println!(
            "  inodes {} ({} files, {} directories), {} segments",
            r.inodes, r.files, r.dirs, r.segments
        );
        println!(
            "  stripes read and checked: {} ({} with strips on D-nodes that are down)",
            r.stripes_checked, r.degraded_stripes
        );
        for p in &r.problems {
            println!("  PROBLEM: {p}");
        }
        if writable {
            fs.close().await?;
        }
        if r.problems.is_empty() {
            println!("clean");
        }
        Ok(r.problems.is_empty())
    })
}

#[derive(clap::Args)]
#[command(
    about = "Report a dase file system's usage, reduction and D-node health",
    long_about = "Report logical bytes (file sizes), live bytes (data the files reference), \
stored bytes (strips on the D-nodes, parity included), the raw-to-usable ratio, capacity, and \
each D-node's strips and state. Reads the committed metadata without taking the lease, so it \
works while the file system is mounted (showing the last commit).",
    after_help = "Example:\n  dase stats --cluster /tmp/dase/cluster.toml"
)]
pub struct StatsArgs {
    #[arg(long)]
    cluster: PathBuf,
    /// Print one JSON object (bytes as numbers) instead of the report.
    #[arg(long)]
    json: bool,
}

pub fn stats(a: StatsArgs) -> Result<()> {
    let file = ClusterFile::load(&a.cluster)?;
    runtime()?.block_on(async {
        let fs = FileSystem::open(
            &file,
            Options {
                read_only: true,
                ..Default::default()
            },
        )
        .await?;
        let s = fs.stats().await;
        let geo = fs.geometry();
        if a.json {
            let c = &s.counts;
            let v = serde_json::json!({
                "fs_uuid": fs.superblock().uuid_string(),
                "commit": s.commit_seq,
                "reduce": s.reduce.to_string(),
                "avg_chunk_bytes": fs.superblock().avg_chunk(),
                "files": s.files,
                "dirs": s.dirs,
                "logical_bytes": s.logical_bytes,
                "after_dedup_bytes": c.unique_bytes,
                "after_similarity_bytes": c.after_similarity(),
                "after_compression_bytes": c.stored_bytes,
                "live_bytes": s.live_bytes,
                "stored_bytes": s.stored_bytes,
                "metadata_bytes": s.metadata_bytes,
                "metadata_capacity_bytes": s.metadata_capacity_bytes,
                "chunks": c.chunks,
                "delta_chunk_bytes": c.delta_in,
                "chunk_index_bytes": s.chunk_index_bytes,
                "similar_index_bytes": s.similar_index_bytes,
                "index_buffered": s.index_buffered,
                "recompressed_below_segment": s.recompressed.recompressed_below,
                "recompressed_level": s.recompressed.recompressed_level,
                "segments_made": s.next_segment,
                "chunk_buckets": c.chunk_buckets,
                "similar_buckets": c.similar_buckets,
                "similar_entries": c.similar,
                "capacity_bytes": s.capacity_bytes,
                "free_bytes": s.free_bytes,
            });
            println!("{v}");
            return Ok(());
        }
        println!("file system     {}", fs.superblock().uuid_string());
        println!(
            "geometry        {geo} data, strip {} KiB; metadata {} (mirrored)",
            geo.strip_size() / 1024,
            fs.meta_geometry()
        );
        println!("commit          {}", s.commit_seq);
        println!("files           {} ({} directories)", s.files, s.dirs);
        println!("logical bytes   {}", gib(s.logical_bytes));
        println!("live data       {}", gib(s.live_bytes));
        println!("stored (data)   {}", gib(s.stored_bytes));
        println!(
            "stored (meta)   {}  ({} copies; its stripes take {} of the capacity)",
            gib(s.metadata_bytes),
            fs.meta_geometry().width(),
            gib(s.metadata_capacity_bytes)
        );
        let c = &s.counts;
        if s.reduce != Reduce::None {
            let after_sim = c.after_similarity();
            let ratio = |b: u64| {
                if b == 0 {
                    String::new()
                } else {
                    format!("  ({:.2} : 1)", s.logical_bytes as f64 / b as f64)
                }
            };
            println!(
                "reduction       {} ({} chunks, {} KiB average cut)",
                s.reduce,
                c.chunks,
                fs.superblock().avg_chunk() >> 10
            );
            println!("  logical             {}", gib(s.logical_bytes));
            println!("  after dedup         {}{}", gib(c.unique_bytes), ratio(c.unique_bytes));
            println!("  after similarity    {}{}", gib(after_sim), ratio(after_sim));
            println!("  after compression   {}{}", gib(c.stored_bytes), ratio(c.stored_bytes));
            println!("  stored with parity  {}{}", gib(s.stored_bytes), ratio(s.stored_bytes));
            if s.logical_bytes > 0 {
                println!(
                    "  raw-to-logical      {:.3} (D-node bytes per logical byte, parity included)",
                    s.stored_bytes as f64 / s.logical_bytes as f64
                );
            }
            println!(
                "  indexes             {} chunk ({} buckets), {} similarity ({} buckets, {} entries)",
                gib(s.chunk_index_bytes),
                c.chunk_buckets,
                gib(s.similar_index_bytes),
                c.similar_buckets,
                c.similar
            );
            println!(
                "  index journal       {} entries not yet merged into buckets",
                s.index_buffered
            );
            let t = s.recompressed;
            if t.recompressed_level > 0 {
                println!(
                    "  recompressed        segments below {} of {} made, at zstd level {}+",
                    t.recompressed_below, s.next_segment, t.recompressed_level
                );
            }
        }
        if s.live_bytes > 0 {
            println!(
                "raw-to-usable   {:.3} (data stripes incl. parity / live data; the geometry's floor is {:.3})",
                s.stored_bytes as f64 / s.live_bytes as f64,
                geo.overhead()
            );
        }
        println!(
            "capacity        {} usable, {} free",
            gib(s.capacity_bytes),
            gib(s.free_bytes)
        );
        println!("\n  {:<3} {:<22} {:<6} {:>10} {:>12}", "#", "D-node", "state", "strips", "bytes");
        let c = fs.cluster();
        for i in 0..c.len() {
            let (addr, _) = c.endpoint(i);
            println!(
                "  {:<3} {:<22} {:<6} {:>10} {:>12}",
                i,
                addr,
                if c.is_up(i) { "up" } else { "DOWN" },
                s.per_node_strips[i],
                gib(s.per_node_strips[i] * s.strip_size as u64)
            );
        }
        Ok(())
    })
}

#[derive(clap::Args)]
#[command(
    about = "Restore full redundancy after losing a D-node",
    long_about = "--replace OLD=NEW: a fresh D-node NEW (host:port, already running `dase dnode`) takes \
OLD's place in the cluster: it gets OLD's superblock slot and placement identity, the cluster file \
is rewritten to name it (the old one is kept as cluster.toml.bak), and every strip OLD held is \
reconstructed from the other strips of its stripe and written to NEW. If the file system is \
mounted, the mount does the work (it stays usable throughout); otherwise this command mounts it \
privately. Rerunning after an interruption resumes.\n\n\
--evacuate ADDR: re-stripe everything that has a strip on ADDR over the other D-nodes (for a \
D-node that will not come back and has no replacement); a mount started with --rebuild-after \
does this on its own.",
    after_help = "Examples:\n  dase dnode --listen 127.0.0.1:4500 --nqn nqn.2026-11.io.dase:d3 --namespace /tmp/new.img --size 2G &\n  dase rebuild --cluster /tmp/dase/cluster.toml --replace 127.0.0.1:4423=127.0.0.1:4500\n  dase rebuild --cluster /tmp/dase/cluster.toml --evacuate 127.0.0.1:4423"
)]
pub struct RebuildArgs {
    #[arg(long)]
    cluster: PathBuf,
    /// OLD=NEW, each host:port.
    #[arg(long, conflicts_with = "evacuate")]
    replace: Option<String>,
    /// The NQN the new D-node serves (default: the old one's).
    #[arg(long, requires = "replace")]
    nqn: Option<String>,
    /// Re-stripe the data on this D-node (host:port) over the others.
    #[arg(long)]
    evacuate: Option<String>,
    /// Overwrite a new D-node that holds another dase file system.
    #[arg(long)]
    force: bool,
}

fn slot_of(file: &ClusterFile, addr: &str) -> Result<usize> {
    file.dnodes
        .iter()
        .position(|d| d.addr == addr)
        .with_context(|| format!("{addr} is not a D-node of the cluster file"))
}

/// A progress callback that reports every 5 % (and the end) through `sink`.
pub(crate) fn progress_steps(
    what: &'static str,
    unit: &'static str,
    sink: impl Fn(String) + Send + Sync,
) -> impl Fn(u64, u64) + Send + Sync {
    let last = std::sync::Mutex::new(None::<u64>);
    move |done, total| {
        let pct = (done * 100).checked_div(total).unwrap_or(100);
        let mut l = last.lock().unwrap();
        if l.is_none_or(|p| pct / 5 != p / 5) || done == total {
            *l = Some(pct);
            sink(format!("{what}: {done}/{total} {unit} ({pct}%)"));
        }
    }
}

fn progress_printer(what: &'static str, unit: &'static str) -> impl Fn(u64, u64) {
    progress_steps(what, unit, |m| eprintln!("{m}"))
}

pub fn rebuild(a: RebuildArgs) -> Result<()> {
    let mut file = ClusterFile::load(&a.cluster)?;
    let rt = runtime()?;
    let started = std::time::Instant::now();
    let (slot, request) = match (&a.replace, &a.evacuate) {
        (Some(r), None) => {
            let (old, new) = r
                .split_once('=')
                .context("--replace wants OLD=NEW (host:port of each)")?;
            let slot = slot_of(&file, old)?;
            let mut spec = file.dnodes[slot].clone();
            spec.id = Some(spec.placement_id());
            spec.addr = new.to_string();
            if let Some(n) = &a.nqn {
                spec.nqn = n.clone();
            }
            rt.block_on(prepare_replacement(&file, slot, &spec, a.force))?;
            file.dnodes[slot] = spec.clone();
            let bak = a.cluster.with_extension("toml.bak");
            std::fs::copy(&a.cluster, &bak)
                .with_context(|| format!("keeping {}", bak.display()))?;
            std::fs::write(&a.cluster, file.to_toml())
                .with_context(|| format!("writing {}", a.cluster.display()))?;
            println!(
                "D-node slot {slot}: {old} replaced by {new} in {} (previous file: {})",
                a.cluster.display(),
                bak.display()
            );
            (slot, format!("replace {slot} {} {}", spec.addr, spec.nqn))
        }
        (None, Some(addr)) => {
            let slot = slot_of(&file, addr)?;
            (slot, format!("evacuate {slot}"))
        }
        _ => bail!("give --replace OLD=NEW or --evacuate ADDR"),
    };
    let bytes = if let Some(s) = mount_control(&rt, &file)? {
        println!("the file system is mounted: the mount rebuilds (it stays usable)");
        crate::mount::control_request(s, &request)?
    } else {
        rt.block_on(async {
            let fs = FileSystem::open(
                &file,
                Options {
                    description: format!("dase rebuild pid {}", std::process::id()),
                    ..Default::default()
                },
            )
            .await?;
            let r = if request.starts_with("replace") {
                fs.repair_node(slot, progress_printer("rebuild", "stripes"))
                    .await
            } else {
                fs.evacuate(slot, progress_printer("evacuate", "stripes"))
                    .await
                    .map(|n| n * fs.geometry().data_bytes() as u64)
            };
            let closed = fs.close().await;
            let n = r?;
            closed?;
            Ok::<_, anyhow::Error>(n)
        })?
    };
    let secs = started.elapsed().as_secs_f64();
    println!(
        "rebuild done: {} restored in {secs:.1} s ({:.2} GB/s)",
        gib(bytes),
        bytes as f64 / secs / 1e9
    );
    Ok(())
}

/// Gives the new D-node the old slot's superblock (after checking it holds
/// nothing it should not lose).
async fn prepare_replacement(
    file: &ClusterFile,
    slot: usize,
    spec: &DNodeSpec,
    force: bool,
) -> Result<()> {
    let cluster = Cluster::connect(file, ControllerOptions::default()).await;
    let sb = superblock::verify(&cluster, file)
        .await
        .context("reading the file system's superblock from the other D-nodes")?;
    let single = ClusterFile {
        dnodes: vec![spec.clone()],
    };
    let new = Cluster::connect(&single, ControllerOptions::default()).await;
    if !new.is_up(0) {
        bail!(
            "cannot reach the new D-node {} ({}): {}",
            spec.addr,
            spec.nqn,
            new.last_error(0).unwrap_or_default()
        );
    }
    if let Some(have) = superblock::read_node(&new, 0).await? {
        let ours = have.fs_uuid == sb.fs_uuid && have.node_index.get() as usize == slot;
        if !ours && !force {
            bail!(
                "the new D-node {} already holds dase file system {} (slot {}); use --force to overwrite it",
                spec.addr,
                have.uuid_string(),
                have.node_index.get()
            );
        }
    }
    let geo = sb.geometry()?;
    let mut next = file.clone();
    next.dnodes[slot] = spec.clone();
    let mut copy = superblock::Superblock::new(sb.fs_uuid, &next, slot, &geo, sb.avg_chunk());
    copy.created_unix = sb.created_unix;
    let block = copy.sealed_bytes();
    let mut both = block.clone();
    both.extend_from_slice(&block);
    new.write(0, 0, bytes::Bytes::from(both)).await?;
    new.flush(0).await?;
    Ok(())
}

#[derive(clap::Args)]
#[command(
    about = "Reclaim space in segments whose chunks mostly died; optionally recompress cold data",
    long_about = "Applies queued chunk reference changes, then rewrites the live chunks of every \
segment that is partly dead into new segments, so the old ones free at the next commit (the \
mount's background cleaner does the same for segments at most half live), and folds the index \
journal into its buckets. With --recompress it first stores cold data again at a high zstd \
level (--level, default 19): the write path compresses each chunk alone at level 1 to keep up \
with ingest, and cold data can afford more (1–6 MB/s a core at level 19 on text). Plain \
compressed chunks are gathered in write order into compression regions of --region bytes of \
content, compressed as one, so each chunk gets its neighbours' history (logs store 8 % less than \
chunk by chunk); reading one chunk of a region then decodes the whole region (about 1 ms per MiB; \
a few recently read regions are kept decoded). Regions at most half alive are rewritten into new \
ones, which frees their dead members' bytes. Deltas are recompressed one by one. Work is kept \
only where it saves at least 1/32, and a pass's frames are marked and passed by next time. If \
the file system is mounted, the mount does the work; otherwise this command opens it with the \
lease. A mount started with --recompress-idle SECS runs such a pass by itself, once idle, over \
what was written since its last pass.",
    after_help = "Examples:\n  dase clean --cluster /tmp/dase/cluster.toml\n  \
dase clean --cluster /tmp/dase/cluster.toml --recompress\n  \
dase clean --cluster /tmp/dase/cluster.toml --recompress --level 22 --region 0   (chunk by chunk)"
)]
pub struct CleanArgs {
    #[arg(long)]
    cluster: PathBuf,
    /// Store cold data again at --level first, in compression regions
    /// (slow: for cold data).
    #[arg(long)]
    recompress: bool,
    /// zstd level of --recompress (1 to 22).
    #[arg(long, default_value_t = dase_initiator::cnode::fs::RECOMPRESS_LEVEL,
          value_parser = clap::value_parser!(i32).range(1..=22), requires = "recompress")]
    level: i32,
    /// Content per compression region of --recompress (128K to 16M; 0:
    /// none, every chunk compressed alone).
    #[arg(long, default_value = "4M", requires = "recompress")]
    region: String,
}

/// A compression region size given to option `flag` (`4M`, `0`...),
/// checked against what regions may hold.
pub fn region_bytes(flag: &str, value: &str) -> Result<usize> {
    let r = dase_target::parse_size(value).map_err(anyhow::Error::msg)? as usize;
    // The smallest chunks any file system may have: the file system
    // checks its own when it is opened.
    let smallest = *dase_initiator::reduce::AVG_CHUNK_RANGE.start();
    dase_initiator::cnode::fs::check_region_bytes(r, smallest)
        .map_err(|e| anyhow::anyhow!("{flag} {value}: {e}"))?;
    Ok(r)
}

pub fn clean(a: CleanArgs) -> Result<()> {
    let region = region_bytes("--region", &a.region)?;
    let file = ClusterFile::load(&a.cluster)?;
    let rt = runtime()?;
    if let Some(mut s) = mount_control(&rt, &file)? {
        println!("the file system is mounted: the mount cleans");
        if a.recompress {
            let saved =
                crate::mount::control_request(s, &format!("recompress {} {region}", a.level))?;
            println!("recompression saved {}", gib(saved));
            // One request per connection.
            s = mount_control(&rt, &file)?.context("the mount went away")?;
        }
        let n = crate::mount::control_request(s, "clean")?;
        println!("cleaned {n} segments");
        return Ok(());
    }
    rt.block_on(async {
        let fs = FileSystem::open(
            &file,
            Options {
                description: format!("dase clean pid {}", std::process::id()),
                ..Default::default()
            },
        )
        .await?;
        if a.recompress {
            let r = fs
                .recompress(
                    a.level,
                    region,
                    PassScope::All,
                    progress_printer("recompress", "segments"),
                )
                .await;
            let r = match r {
                Ok(r) => r,
                Err(e) => {
                    let _ = fs.close().await;
                    return Err(e.into());
                }
            };
            println!(
                "recompressed {} chunks ({} compression regions) at zstd level {}: {} -> {}",
                r.chunks,
                r.regions,
                a.level,
                gib(r.before),
                gib(r.after)
            );
        }
        // Then fold the index journal into the buckets (moves included).
        let r = match fs.clean(0.99).await {
            Ok(r) => fs.merge_index().await.map(|()| r),
            Err(e) => Err(e),
        };
        let closed = fs.close().await;
        let r = r?;
        closed?;
        println!(
            "cleaned {} segments: moved {} live chunks ({})",
            r.segments,
            r.chunks_moved,
            gib(r.bytes_moved)
        );
        Ok(())
    })
}

/// The control socket of the mount of this cluster's file system, if one runs.
fn mount_control(
    rt: &tokio::runtime::Runtime,
    file: &ClusterFile,
) -> Result<Option<std::os::unix::net::UnixStream>> {
    let uuid = rt.block_on(async {
        let c = Cluster::connect(file, ControllerOptions::default()).await;
        superblock::verify(&c, file)
            .await
            .map(|sb| sb.uuid_string())
    })?;
    Ok(std::os::unix::net::UnixStream::connect(crate::mount::control_path(&uuid)).ok())
}
