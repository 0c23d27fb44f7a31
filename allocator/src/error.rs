//! The allocator layer's one error type. The agent maps it to a gRPC status
//! once, at the RPC boundary.

use std::path::PathBuf;

use crate::units::Bytes;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is malformed.
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    /// The name exists with incompatible size or parameters.
    #[error("{0}")]
    Conflict(String),
    /// Not enough space or namespace slots anywhere.
    #[error("{message}")]
    Exhausted {
        message: String,
        available: Bytes,
        largest: Bytes,
    },
    /// The request can never be satisfied as asked (e.g. aligned size above limit).
    #[error("{0}")]
    OutOfRange(String),
    /// The volume or device is in a state that forbids the operation.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Another operation on the same volume is still running; retry later.
    #[error("{0}")]
    Busy(String),
    #[error("ledger {path}: {source}")]
    Ledger {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "ledger {path} is locked by another process (is another pmem-agent running on this state directory?)"
    )]
    LedgerLocked { path: PathBuf },
    #[error("ledger {path}: {message}")]
    LedgerCorrupt { path: PathBuf, message: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The allocator cannot be reached (a remote allocator daemon is down).
    #[error("{0}")]
    Unavailable(String),
    /// A device operation failed; the message names device, region and volume.
    #[error("{0}")]
    Device(String),
}

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}
