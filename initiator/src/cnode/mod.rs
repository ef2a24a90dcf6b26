//! The C-node engine, floor by floor (each depends only on the ones below):
//! `volume` (stripes over D-nodes) → `cluster` (the D-nodes and their
//! health) → `crate::host` (NVMe/TCP).
//!
//! A C-node holds no durable state: everything it needs to find data again
//! is in the D-nodes or in records the layers above store there.

pub mod cluster;
pub mod superblock;
pub mod volume;

pub use cluster::{Cluster, ClusterFile, DNodeSpec};
pub use volume::{StripeRecord, Volume, VolumeError};
