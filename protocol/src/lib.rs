//! Sans-IO NVMe/TCP.
//!
//! This crate parses and builds bytes and holds per-connection protocol state;
//! it never touches a socket. The target (`dase-target`) and the host
//! (`dase-initiator`) are thin drivers around it, and most of its tests need
//! no network.
//!
//! - [`pdu`]: PDU headers as `zerocopy` types.
//! - [`decode`]: the bounded streaming decoder.
//! - [`encode`]: PDU builders that append to a batch buffer.
//! - [`transfer`]: data-phase offset/length tracking.
//! - [`nvme`]: SQE, CQE, SGL, opcodes, status codes.
//! - [`admin`]: Connect data, Identify, log pages, discovery.

pub mod admin;
pub mod decode;
pub mod digest;
pub mod encode;
pub mod nvme;
pub mod pdu;
pub mod transfer;

pub use decode::{DecodeError, FatalError, Limits, Pdu, PduDecoder, Role};
pub use encode::PduEncoder;
pub use nvme::{Cqe, Sqe, Status};
pub use transfer::Transfer;
