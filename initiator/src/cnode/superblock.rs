//! The superblock: what file system a D-node namespace belongs to, which slot
//! it is in, and the stripe geometry. Every namespace holds two copies (at
//! 0 and 4 KiB, so a torn write of one leaves the other), each versioned and
//! checksummed; with N D-nodes the file system has 2N copies.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

use bytes::Bytes;
use dase_erasure::{Geometry, Layout};

use super::cluster::{Cluster, ClusterFile};
use crate::host::controller::{fnv1a, FNV_OFFSET};
use crate::host::join_all;

pub const MAGIC: [u8; 8] = *b"DASEFS\0\x01";
pub const VERSION: u32 = 1;
/// Byte offsets of the two copies in every namespace.
pub const COPIES: [u64; 2] = [0, 4096];
pub const SIZE: usize = 4096;

/// On-media superblock, format version 1 (4096 bytes, little-endian).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy)]
#[repr(C)]
pub struct Superblock {
    pub magic: [u8; 8],
    pub version: U32,
    pub flags: U32,
    /// Identifies the file system; every D-node of it carries the same one.
    pub fs_uuid: [u8; 16],
    /// Bumped on every superblock update; the highest valid copy wins.
    pub generation: U64,
    pub created_unix: U64,
    /// Number of D-nodes and which of them this namespace is.
    pub nodes: U32,
    pub node_index: U32,
    /// Fingerprint of the ordered D-node identities (placement ids), so a
    /// cluster file that lists other or reordered D-nodes is caught.
    pub cluster_fingerprint: U64,
    pub k: U16,
    pub m: U16,
    /// 0 = Reed-Solomon, 1 = LRC with `lrc_groups` local groups.
    pub layout: u8,
    pub lrc_groups: u8,
    /// The average content-defined chunk size in KiB, chosen at mkfs; 0
    /// (file systems formatted before it was a choice) is 16 KiB. Only how
    /// new data is cut depends on it: chunks of any size read back.
    pub chunk_kib: U16,
    pub strip_size: U32,
    pub rsvd1: [u8; 4016],
    /// CRC32C of everything before it.
    pub crc: U32,
}

const _: () = assert!(size_of::<Superblock>() == SIZE);
// The offsets ARCHITECTURE.md documents.
const _: () = assert!(core::mem::offset_of!(Superblock, nodes) == 48);
const _: () = assert!(core::mem::offset_of!(Superblock, k) == 64);
const _: () = assert!(core::mem::offset_of!(Superblock, chunk_kib) == 70);
const _: () = assert!(core::mem::offset_of!(Superblock, strip_size) == 72);
const _: () = assert!(core::mem::offset_of!(Superblock, crc) == 4092);

impl std::fmt::Debug for Superblock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Superblock")
            .field("fs", &self.uuid_string())
            .field("version", &self.version.get())
            .field("generation", &self.generation.get())
            .field("slot", &(self.node_index.get(), self.nodes.get()))
            .field("geometry", &self.geometry().map(|g| g.to_string()))
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SuperblockError {
    #[error("D-node {addr}: {why}")]
    Node { addr: String, why: String },
    #[error("{0}")]
    Mismatch(String),
    #[error("{0}")]
    Exists(String),
}

/// The ordered D-node identities of a cluster file, hashed.
pub fn cluster_fingerprint(file: &ClusterFile) -> u64 {
    fnv1a(
        file.dnodes
            .iter()
            .flat_map(|d| d.placement_id().to_le_bytes()),
        FNV_OFFSET,
    )
}

impl Superblock {
    pub fn new(
        fs_uuid: [u8; 16],
        file: &ClusterFile,
        index: usize,
        geo: &Geometry,
        avg_chunk: u32,
    ) -> Self {
        let mut sb = Superblock::new_zeroed();
        sb.magic = MAGIC;
        sb.version = U32::new(VERSION);
        sb.fs_uuid = fs_uuid;
        sb.generation = U64::new(1);
        sb.created_unix = U64::new(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        );
        sb.nodes = U32::new(file.dnodes.len() as u32);
        sb.node_index = U32::new(index as u32);
        sb.cluster_fingerprint = U64::new(cluster_fingerprint(file));
        sb.k = U16::new(geo.k() as u16);
        sb.m = U16::new(geo.m() as u16);
        if let Layout::Lrc { groups } = geo.layout() {
            sb.layout = 1;
            sb.lrc_groups = groups as u8;
        }
        sb.strip_size = U32::new(geo.strip_size() as u32);
        sb.chunk_kib = U16::new((avg_chunk >> 10) as u16);
        sb.seal();
        sb
    }

    /// The average chunk size new data is cut to ([`Self::chunk_kib`]).
    pub fn avg_chunk(&self) -> u32 {
        match self.chunk_kib.get() {
            0 => crate::reduce::AVG_CHUNK,
            kib => u32::from(kib) << 10,
        }
    }

    /// The on-media bytes, checksum recomputed (after fields were changed).
    pub fn sealed_bytes(&self) -> Vec<u8> {
        let mut c = *self;
        c.seal();
        c.as_bytes().to_vec()
    }

    fn seal(&mut self) {
        let c = crc32c::crc32c(&self.as_bytes()[..SIZE - 4]);
        self.crc = U32::new(c);
    }

    /// Parses one copy: None when it is not a valid dase superblock.
    pub fn parse(b: &[u8]) -> Option<Self> {
        let sb = Superblock::read_from_bytes(b.get(..SIZE)?).ok()?;
        (sb.magic == MAGIC && crc32c::crc32c(&b[..SIZE - 4]) == sb.crc.get()).then_some(sb)
    }

    pub fn geometry(&self) -> Result<Geometry, dase_erasure::Error> {
        let layout = if self.layout == 1 {
            Layout::Lrc {
                groups: self.lrc_groups as usize,
            }
        } else {
            Layout::ReedSolomon
        };
        Geometry::new(
            self.k.get() as usize,
            self.m.get() as usize,
            self.strip_size.get() as usize,
            layout,
        )
    }

    pub fn uuid_string(&self) -> String {
        let h = |r: std::ops::Range<usize>| {
            self.fs_uuid[r]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        };
        format!(
            "{}-{}-{}-{}-{}",
            h(0..4),
            h(4..6),
            h(6..8),
            h(8..10),
            h(10..16)
        )
    }
}

/// Reads both copies on node `i`; returns the newest valid one.
pub async fn read_node(cluster: &Cluster, i: usize) -> Result<Option<Superblock>, SuperblockError> {
    let addr = cluster.nodes[i].spec.addr.clone();
    let b = cluster
        .read(i, 0, 2 * SIZE)
        .await
        .map_err(|e| SuperblockError::Node {
            addr,
            why: e.to_string(),
        })?;
    Ok(COPIES
        .iter()
        .filter_map(|&o| Superblock::parse(&b[o as usize..o as usize + SIZE]))
        .max_by_key(|s| s.generation.get()))
}

/// Writes a superblock (both copies, then flush) to every D-node. Every
/// D-node must be up: a format needs all of them. Refuses to overwrite an
/// existing dase file system unless `force`.
pub async fn format(
    cluster: &Cluster,
    file: &ClusterFile,
    geo: &Geometry,
    avg_chunk: u32,
    force: bool,
) -> Result<Superblock, SuperblockError> {
    let down: Vec<String> = (0..cluster.len())
        .filter(|&i| !cluster.is_up(i))
        .map(|i| cluster.nodes[i].spec.addr.clone())
        .collect();
    if !down.is_empty() {
        return Err(SuperblockError::Mismatch(format!(
            "cannot format: D-nodes unreachable: {}",
            down.join(", ")
        )));
    }
    if !force {
        for r in join_all((0..cluster.len()).map(|i| read_node(cluster, i)))
            .await
            .into_iter()
            .enumerate()
        {
            if let (i, Ok(Some(sb))) = r {
                return Err(SuperblockError::Exists(format!(
                    "D-node {} already holds dase file system {} (slot {} of {}); use --force to destroy it",
                    cluster.nodes[i].spec.addr,
                    sb.uuid_string(),
                    sb.node_index.get(),
                    sb.nodes.get()
                )));
            }
        }
    }
    let mut uuid = super::random_id();
    uuid[6] = (uuid[6] & 0x0f) | 0x40;
    uuid[8] = (uuid[8] & 0x3f) | 0x80;
    let writes = (0..cluster.len()).map(|i| {
        let sb = Superblock::new(uuid, file, i, geo, avg_chunk);
        async move {
            let mut both = Vec::with_capacity(2 * SIZE);
            both.extend_from_slice(sb.as_bytes());
            both.extend_from_slice(sb.as_bytes());
            let r = async {
                cluster.write(i, 0, Bytes::from(both)).await?;
                cluster.flush(i).await
            }
            .await;
            r.map_err(|e| SuperblockError::Node {
                addr: cluster.nodes[i].spec.addr.clone(),
                why: e.to_string(),
            })
        }
    });
    for r in join_all(writes).await {
        r?;
    }
    Ok(Superblock::new(uuid, file, 0, geo, avg_chunk))
}

/// Checks that the reachable D-nodes form one file system matching the
/// cluster file: same file system, each in the slot the file lists it in,
/// same D-node list. Returns the file system's superblock (slot 0's view).
pub async fn verify(cluster: &Cluster, file: &ClusterFile) -> Result<Superblock, SuperblockError> {
    let fp = cluster_fingerprint(file);
    let mut first: Option<(usize, Superblock)> = None;
    let reads = join_all(
        (0..cluster.len())
            .filter(|&i| cluster.is_up(i))
            .map(|i| async move { (i, read_node(cluster, i).await) }),
    )
    .await;
    for (i, r) in reads {
        let addr = &cluster.nodes[i].spec.addr;
        let sb = r?.ok_or_else(|| {
            SuperblockError::Mismatch(format!(
                "D-node {addr} holds no dase file system (run dase mkfs)"
            ))
        })?;
        if sb.version.get() != VERSION {
            return Err(SuperblockError::Mismatch(format!(
                "D-node {addr}: superblock version {} is not supported",
                sb.version.get()
            )));
        }
        if let Some((j, f)) = &first {
            if f.fs_uuid != sb.fs_uuid {
                return Err(SuperblockError::Mismatch(format!(
                    "D-nodes from two file systems: {} belongs to {}, {} to {}",
                    cluster.nodes[*j].spec.addr,
                    f.uuid_string(),
                    addr,
                    sb.uuid_string()
                )));
            }
        }
        if sb.node_index.get() as usize != i
            || sb.nodes.get() as usize != file.dnodes.len()
            || sb.cluster_fingerprint.get() != fp
        {
            return Err(SuperblockError::Mismatch(format!(
                "the cluster file does not match the superblocks: D-node {addr} is slot {} of {} in file system {}, but the file lists it as {} of {}",
                sb.node_index.get(),
                sb.nodes.get(),
                sb.uuid_string(),
                i,
                file.dnodes.len()
            )));
        }
        if first.is_none() {
            first = Some((i, sb));
        }
    }
    first
        .map(|(_, s)| s)
        .ok_or_else(|| SuperblockError::Mismatch("no D-node reachable".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chunk_size_reads_back_and_zero_is_the_old_default() {
        let mut sb = Superblock::new_zeroed();
        sb.magic = MAGIC;
        sb.version = U32::new(VERSION);
        // Formatted before the field: its reserved bytes were zero.
        assert_eq!(sb.avg_chunk(), crate::reduce::AVG_CHUNK);
        sb.chunk_kib = U16::new(64);
        let parsed = Superblock::parse(&sb.sealed_bytes()).expect("a valid copy");
        assert_eq!(parsed.avg_chunk(), 64 << 10);
    }
}
