//! gRPC client connections over unix sockets (pmemctl, tests).

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// Connects to `unix:///path` or a bare path.
pub async fn connect(endpoint: &str) -> Result<Channel, String> {
    let path: PathBuf = Path::new(endpoint.strip_prefix("unix://").unwrap_or(endpoint)).to_owned();
    if !path.exists() {
        return Err(format!(
            "socket {} does not exist: is pmem-agent running with this endpoint?",
            path.display()
        ));
    }
    let shown = path.display().to_string();
    // The URI is required by tonic but unused: the connector dials the socket.
    Endpoint::from_static("http://pmem-agent.local")
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let p = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(p).await?)) }
        }))
        .await
        .map_err(|e| format!("connect to {shown}: {e}"))
}
