//! `dase mkfs`: format a cluster's D-nodes as one dase file system.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use dase_erasure::Geometry;
use dase_initiator::cnode::superblock;
use dase_initiator::cnode::{Cluster, ClusterFile, Volume};
use dase_initiator::host::ControllerOptions;

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
    /// Destroy an existing dase file system on these D-nodes.
    #[arg(long)]
    force: bool,
}

pub fn mkfs(a: MkfsArgs) -> Result<()> {
    let file = ClusterFile::load(&a.cluster)?;
    let strip = dase_target::parse_size(&a.strip_size).map_err(anyhow::Error::msg)? as usize;
    let geo = Geometry::parse(&a.ec, strip)?;
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
        let down: Vec<String> = (0..cluster.len())
            .filter(|&i| !cluster.is_up(i))
            .map(|i| {
                format!(
                    "{} ({})",
                    cluster.nodes[i].spec.addr,
                    cluster.last_error(i).unwrap_or_default()
                )
            })
            .collect();
        if !down.is_empty() {
            bail!("cannot format: unreachable D-nodes: {}", down.join("; "));
        }
        let volume = Volume::new(cluster.clone(), geo)
            .context("checking the geometry against the D-nodes")?;
        let stripes = volume.capacity_stripes();
        if stripes == 0 {
            bail!("the D-nodes' namespaces are too small for one stripe");
        }
        let sb = superblock::format(&cluster, &file, &geo, a.force).await?;
        let sb = superblock::verify(&cluster, &file).await.map(|_| sb)?;
        dase_initiator::cnode::fs::FileSystem::format_metadata(&cluster, &sb)
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
