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
            AgentError::Alloc(e) => alloc_code(e),
        }
    }
}

/// The gRPC code of an allocator error: the one mapping both the agent's
/// boundary and pmem-allocd's (`wire::error_to_status`) use.
pub fn alloc_code(e: &AllocError) -> Code {
    match e {
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
    }
}

impl From<AgentError> for Status {
    fn from(e: AgentError) -> Status {
        Status::new(e.code(), bound(&e.to_string()).into_owned())
    }
}

/// Bytes of a client-supplied value that a message or log line quotes.
pub const ECHO_MAX: usize = 128;
/// Longest message a status or log line carries. Messages quote values
/// through [`quote`]; this cut is the safety net for those that do not, so
/// a huge field never becomes a huge log line or a status header the
/// client's metadata limit rejects (ResourceExhausted on its side).
pub const MESSAGE_MAX: usize = 2048;

/// A client-supplied value for a message: Debug-quoted, at most
/// [`ECHO_MAX`] bytes of it (escapes included), and its length when cut.
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(ECHO_MAX.min(s.len()) + 24);
    out.push('"');
    let mut cut = false;
    for c in s.chars() {
        let piece: String = c.escape_debug().collect();
        if out.len() + piece.len() > ECHO_MAX {
            cut = true;
            break;
        }
        out.push_str(&piece);
    }
    out.push('"');
    if cut {
        out.push_str(&format!("… ({} bytes)", s.len()));
    }
    out
}

/// `s` cut to at most [`MESSAGE_MAX`] bytes (at a character boundary).
pub fn bound(s: &str) -> std::borrow::Cow<'_, str> {
    if s.len() <= MESSAGE_MAX {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut end = MESSAGE_MAX - 32;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    std::borrow::Cow::Owned(format!("{}… ({} bytes in all)", &s[..end], s.len()))
}

pub type AgentResult<T> = Result<T, AgentError>;

/// Shorthand for an InvalidArgument naming a field.
pub fn invalid(msg: impl Into<String>) -> AgentError {
    AgentError::InvalidArgument(msg.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quote_bounds_what_it_echoes() {
        assert_eq!(quote("pvc-1"), "\"pvc-1\"");
        let big = "a".repeat(3 << 20);
        let q = quote(&big);
        assert!(q.len() <= ECHO_MAX + 24, "{} bytes", q.len());
        assert!(q.ends_with(&format!("({} bytes)", 3 << 20)), "{q}");
        // Escapes count towards the bound; characters are never split.
        let q = quote(&"\u{7}é".repeat(200));
        assert!(q.len() <= ECHO_MAX + 24, "{q}");
        assert!(q.is_char_boundary(q.len()));
    }

    #[test]
    fn statuses_carry_bounded_messages() {
        let e = AgentError::InvalidArgument(format!("name {} is bad", "é".repeat(1 << 20)));
        let st = Status::from(e);
        assert_eq!(st.code(), Code::InvalidArgument);
        assert!(st.message().len() <= MESSAGE_MAX, "{}", st.message().len());
        assert!(st.message().starts_with("name "));
        assert_eq!(bound("short"), "short");
    }
}
