//! The optional HTTP endpoint (`--metrics-address`): `/metrics` (Prometheus
//! text format), `/healthz` (the process serves) and `/readyz` (ledger open
//! and reconciled, backend answering).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::driver::Driver;

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

/// Whether the daemon can serve: reconciled, and ledger and backend answer
/// within a short deadline (a wedged ledger or device makes this fail).
pub async fn readiness(driver: &Arc<Driver>) -> Result<(), String> {
    if let Some(why) = driver.refusal() {
        return Err(format!("not ready: the ledger is refused: {why}"));
    }
    if !driver.is_ready() {
        return Err(
            "not ready: start-up reconciliation has not finished (or shutting down)".into(),
        );
    }
    let d = Arc::clone(driver);
    let check = tokio::task::spawn_blocking(move || d.alloc.health());
    match tokio::time::timeout(Duration::from_secs(5), check).await {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(e))) => Err(format!("not ready: {e}")),
        Ok(Err(e)) => Err(format!("not ready: check failed: {e}")),
        Err(_) => Err("not ready: ledger or backend did not answer within 5s".into()),
    }
}

async fn handle(
    driver: Arc<Driver>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() != hyper::Method::GET {
        return Ok(reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET\n".into(),
        ));
    }
    Ok(match req.uri().path() {
        "/metrics" => {
            let d = Arc::clone(&driver);
            let refreshed =
                tokio::task::spawn_blocking(move || d.metrics.refresh(d.alloc.as_ref())).await;
            match refreshed {
                Ok(Ok(())) => reply(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    driver.metrics.encode(),
                ),
                Ok(Err(e)) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    format!("refresh metrics: {e}\n"),
                ),
                Err(e) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    format!("refresh metrics: {e}\n"),
                ),
            }
        }
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => match readiness(&driver).await {
            Ok(()) => reply(StatusCode::OK, "text/plain", "ready\n".into()),
            Err(e) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("{e}\n"),
            ),
        },
        other => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            format!("no such path {other}\n"),
        ),
    })
}

/// Binds the listener (so a bad address fails start-up).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("bind metrics address {addr}: {e}"))
}

/// Serves until `stop` turns true.
pub async fn serve(listener: TcpListener, driver: Arc<Driver>, mut stop: watch::Receiver<bool>) {
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept");
                    continue;
                }
            },
            _ = stop.wait_for(|s| *s) => return,
        };
        let d = Arc::clone(&driver);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(Arc::clone(&d), req));
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                tracing::debug!(error = %e, "metrics connection");
            }
        });
    }
}
