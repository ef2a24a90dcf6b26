use dase_protocol::pdu::Fes;
use dase_protocol::{FatalError, Status};

/// Everything a host operation can fail with. Cloneable so one queue failure
/// can be reported to every command that was waiting on that queue.
#[derive(Clone, Debug, thiserror::Error)]
pub enum HostError {
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("{what} timed out after {ms} ms")]
    Timeout { what: &'static str, ms: u64 },
    #[error("connection lost: {0}")]
    Disconnected(String),
    #[error("target sent a malformed PDU ({0})")]
    Protocol(FatalError),
    #[error("target terminated the connection: {fes:?} (info {fei})")]
    Terminated { fes: Option<Fes>, fei: u32 },
    #[error("NVMe status {0}")]
    Status(Status),
    #[error("connect to {subnqn} refused: {status}{detail}")]
    ConnectRejected {
        subnqn: String,
        status: Status,
        detail: String,
    },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("data digest mismatch")]
    DataDigest,
}

impl HostError {
    /// Whether the queue this happened on can no longer be used.
    pub fn is_transport(&self) -> bool {
        matches!(
            self,
            Self::Connect { .. }
                | Self::Timeout { .. }
                | Self::Disconnected(_)
                | Self::Protocol(_)
                | Self::Terminated { .. }
        )
    }

    /// The NVMe status, when the target completed the command with an error.
    pub fn status(&self) -> Option<Status> {
        match self {
            Self::Status(s) => Some(*s),
            Self::ConnectRejected { status, .. } => Some(*status),
            _ => None,
        }
    }
}
