//! The C-node engine, floor by floor (each depends only on the ones below):
//! `fs` (the file system, its metadata in `meta`) → `volume` (stripes over D-nodes) → `cluster` (the D-nodes and their
//! health) → `crate::host` (NVMe/TCP).
//!
//! A C-node holds no durable state: everything it needs to find data again
//! is in the D-nodes or in records the layers above store there.

pub mod cluster;
pub mod fs;
pub mod lease;
pub mod meta;
pub mod superblock;
pub mod volume;

pub use cluster::{Cluster, ClusterFile, DNodeSpec};
pub use volume::{StripeRecord, Volume, VolumeError};

/// 16 random bytes no other identity shares (file systems, mounts): std's
/// per-instance randomly keyed hasher over a process-wide counter and the time.
pub(crate) fn random_id() -> [u8; 16] {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut out = [0u8; 16];
    for (i, half) in out.chunks_mut(8).enumerate() {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(n);
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        );
        h.write_u32(std::process::id());
        h.write_usize(i);
        half.copy_from_slice(&h.finish().to_le_bytes());
    }
    out
}
