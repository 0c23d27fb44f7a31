//! The RPC boundary: every call is logged once (method, volume, duration,
//! code), blocking allocator work runs off the async threads, and errors
//! become gRPC statuses here and nowhere else.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use tonic::{Code, Response, Status};

use crate::error::{AgentError, AgentResult, ECHO_MAX, bound, quote};
use crate::metrics::Metrics;
use crate::store::{Store, VolumeStore};

/// Runs one RPC handler and logs its outcome.
pub async fn call<T>(
    metrics: &Metrics,
    method: &'static str,
    subject: &str,
    fut: impl Future<Output = AgentResult<T>>,
) -> Result<Response<T>, Status> {
    let start = Instant::now();
    let res = {
        let _in_flight = metrics.start_call();
        fut.await
    };
    let elapsed = start.elapsed();
    let code = match &res {
        Ok(_) => Code::Ok,
        Err(e) => e.code(),
    };
    metrics.observe_call(method, code, elapsed);
    let ms = (elapsed.as_secs_f64() * 1e6).round() / 1e3;
    // The subject comes from the request: log a bounded echo of it.
    let subject = if subject.len() > ECHO_MAX {
        quote(subject)
    } else {
        subject.to_owned()
    };
    let subject = subject.as_str();
    match &res {
        Ok(_) => {
            tracing::info!(method, volume = subject, duration_ms = ms, code = ?code, "csi call")
        }
        Err(e) if matches!(code, Code::Internal | Code::Unavailable) => {
            tracing::error!(method, volume = subject, duration_ms = ms, code = ?code, error = %bound(&e.to_string()), "csi call")
        }
        Err(e) => {
            tracing::warn!(method, volume = subject, duration_ms = ms, code = ?code, error = %bound(&e.to_string()), "csi call")
        }
    }
    res.map(Response::new).map_err(Status::from)
}

/// Runs synchronous volume-store work on the blocking pool (the store may be
/// the embedded allocator or a remote pmem-allocd client; both block).
pub async fn blocking<T, F>(store: &Store, f: F) -> AgentResult<T>
where
    T: Send + 'static,
    F: FnOnce(&dyn VolumeStore) -> Result<T, pmem_allocator::Error> + Send + 'static,
{
    let a = Arc::clone(store);
    tokio::task::spawn_blocking(move || f(a.as_ref()))
        .await
        .map_err(|e| AgentError::Internal(format!("allocator task failed: {e}")))?
        .map_err(AgentError::from)
}
