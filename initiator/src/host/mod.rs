//! The NVMe/TCP host: queue pairs, controllers, discovery.

pub(crate) mod controller;
mod discovery;
mod error;
mod queue;
mod uri;

pub use controller::{join_all, read_on, write_on, Controller, ControllerOptions, NamespaceInfo};
pub use discovery::{discover, DiscoveryEntry};
pub use error::HostError;
pub use queue::{Completion, QueuePair};
pub use uri::NvmeUri;
