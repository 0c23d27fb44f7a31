//! The RPC boundary: every call is logged once (method, volume, duration,
//! code), blocking allocator work runs off the async threads, and errors
//! become gRPC statuses here and nowhere else.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use pmem_allocator::Allocator;
use tonic::{Code, Response, Status};

use crate::error::{AgentError, AgentResult};
use crate::metrics::Metrics;

/// Runs one RPC handler and logs its outcome.
pub async fn call<T>(
    metrics: &Metrics,
    method: &'static str,
    subject: &str,
    fut: impl Future<Output = AgentResult<T>>,
) -> Result<Response<T>, Status> {
    let start = Instant::now();
    let res = fut.await;
    let elapsed = start.elapsed();
    let code = match &res {
        Ok(_) => Code::Ok,
        Err(e) => e.code(),
    };
    metrics.observe_call(method, code, elapsed);
    let ms = (elapsed.as_secs_f64() * 1e6).round() / 1e3;
    match &res {
        Ok(_) => {
            tracing::info!(method, volume = subject, duration_ms = ms, code = ?code, "csi call")
        }
        Err(e) if matches!(code, Code::Internal | Code::Unavailable) => {
            tracing::error!(method, volume = subject, duration_ms = ms, code = ?code, error = %e, "csi call")
        }
        Err(e) => {
            tracing::warn!(method, volume = subject, duration_ms = ms, code = ?code, error = %e, "csi call")
        }
    }
    res.map(Response::new).map_err(Status::from)
}

/// Runs synchronous allocator work on the blocking pool.
pub async fn blocking<T, F>(alloc: &Arc<Allocator>, f: F) -> AgentResult<T>
where
    T: Send + 'static,
    F: FnOnce(&Allocator) -> Result<T, pmem_allocator::Error> + Send + 'static,
{
    let a = Arc::clone(alloc);
    tokio::task::spawn_blocking(move || f(&a))
        .await
        .map_err(|e| AgentError::Internal(format!("allocator task failed: {e}")))?
        .map_err(AgentError::from)
}
