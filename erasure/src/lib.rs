//! Erasure coding for dase stripes: geometry, the codec, per-strip checksums
//! and placement. No I/O: the C-node moves the bytes.
//!
//! ```
//! use dase_erasure::{Codec, Geometry};
//! let geo = Geometry::parse("10+3", 4096).unwrap();
//! let codec = Codec::new(geo).unwrap();
//! let data: Vec<Vec<u8>> = (0..10).map(|i| vec![i as u8; 4096]).collect();
//! let mut parity = vec![vec![0u8; 4096]; 3];
//! let d: Vec<&[u8]> = data.iter().map(|v| &v[..]).collect();
//! let mut p: Vec<&mut [u8]> = parity.iter_mut().map(|v| &mut v[..]).collect();
//! codec.encode(&d, &mut p).unwrap();
//! ```

mod checksum;
mod codec;
mod geometry;
mod placement;

pub use checksum::{corrupt_strips, strip_checksum};
pub use codec::Codec;
pub use geometry::{Geometry, Layout, DEFAULT_GEOMETRY, MAX_STRIPS, PRESETS, STRIP_ALIGN};
pub use placement::{place, score, NodeSlot, Placement};

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("invalid geometry: {0}")]
    Geometry(String),
    #[error("expected {} data and {} parity strips, got {} and {}", expected.0, expected.1, got.0, got.1)]
    StripCount {
        expected: (usize, usize),
        got: (usize, usize),
    },
    #[error("a stripe of this geometry has {expected} strips, not {got}")]
    StripeWidth { expected: usize, got: usize },
    #[error("strip size: {0}")]
    StripSize(String),
    #[error("{0}")]
    BadIndex(String),
    #[error("{lost} strips lost; this stripe survives {tolerable} for certain")]
    TooManyLosses { lost: usize, tolerable: usize },
    #[error("only {up} D-nodes are up; a stripe needs at least {needed}")]
    NotEnoughNodes { up: usize, needed: usize },
    #[error("codec: {0}")]
    Codec(String),
}
