//! dase C-node side.
//!
//! [`host`] is an async NVMe/TCP host: it connects to any NVMe/TCP target
//! (dase D-nodes, the Linux kernel target, SPDK) and moves data with one copy
//! at most. The C-node engine (cluster map, stripes, metadata, file system)
//! lives beside it in [`cnode`] and depends on it downward only; [`reduce`]
//! is the sans-IO data reduction (chunking, fingerprints, sketches, codecs)
//! the file system drives.

pub mod cnode;
pub mod host;
pub mod reduce;

pub use host::{Controller, ControllerOptions, HostError, NvmeUri, QueuePair};
