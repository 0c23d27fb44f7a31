//! The agent layer's error type, mapped to a gRPC status exactly once, at
//! the RPC boundary (`rpc::call`).

use pmem_allocator::Error as AllocError;
use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    OutOfRange(String),
    /// A conflicting operation is in flight, or a pagination token is stale.
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    Unimplemented(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
    #[error(transparent)]
    Alloc(#[from] AllocError),
}

impl AgentError {
    pub fn code(&self) -> Code {
        match self {
            AgentError::InvalidArgument(_) => Code::InvalidArgument,
            AgentError::NotFound(_) => Code::NotFound,
            AgentError::AlreadyExists(_) => Code::AlreadyExists,
            AgentError::FailedPrecondition(_) => Code::FailedPrecondition,
            AgentError::ResourceExhausted(_) => Code::ResourceExhausted,
            AgentError::OutOfRange(_) => Code::OutOfRange,
            AgentError::Aborted(_) => Code::Aborted,
            AgentError::Unimplemented(_) => Code::Unimplemented,
            AgentError::Unavailable(_) => Code::Unavailable,
            AgentError::Internal(_) => Code::Internal,
            AgentError::Alloc(e) => match e {
                AllocError::InvalidArgument(_) => Code::InvalidArgument,
                AllocError::NotFound(_) => Code::NotFound,
                AllocError::Conflict(_) => Code::AlreadyExists,
                AllocError::Exhausted { .. } => Code::ResourceExhausted,
                AllocError::OutOfRange(_) => Code::OutOfRange,
                AllocError::FailedPrecondition(_) => Code::FailedPrecondition,
                AllocError::Busy(_) => Code::Aborted,
                AllocError::LedgerLocked { .. } | AllocError::Unavailable(_) => Code::Unavailable,
                AllocError::Ledger { .. }
                | AllocError::LedgerCorrupt { .. }
                | AllocError::Io { .. }
                | AllocError::Device(_) => Code::Internal,
            },
        }
    }
}

impl From<AgentError> for Status {
    fn from(e: AgentError) -> Status {
        Status::new(e.code(), e.to_string())
    }
}

pub type AgentResult<T> = Result<T, AgentError>;

/// Shorthand for an InvalidArgument naming a field.
pub fn invalid(msg: impl Into<String>) -> AgentError {
    AgentError::InvalidArgument(msg.into())
}
