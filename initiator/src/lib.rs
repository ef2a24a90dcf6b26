//! dase C-node side.
//!
//! [`host`] is an async NVMe/TCP host: it connects to any NVMe/TCP target
//! (dase D-nodes, the Linux kernel target, SPDK) and moves data with one copy
//! at most. The C-node engine (cluster map, stripes, reduction, file system)
//! will live beside it in `cnode` and depend on it downward only.

pub mod cnode;
pub mod host;
pub mod reduce;

pub use host::{Controller, ControllerOptions, HostError, NvmeUri, QueuePair};
