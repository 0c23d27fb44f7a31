//! The connection layer between an accepted unix socket and tonic's HTTP/2
//! server: every socket we serve accepts any `:authority`.
//!
//! grpc C-core (Python grpcio ≥ 1.57), grpc-java and grpc-go dialing a bare
//! path (kubelets < 1.26) send the socket path as `:authority`; h2 resets
//! such a stream with PROTOCOL_ERROR and has no option to accept it. So the
//! bytes from the client go through [`rewrite::Rewriter`], which rewrites
//! header blocks to carry `:authority: localhost` and passes every other
//! byte unchanged. The server→client direction is not touched.

pub mod rewrite;

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::Connected;

use rewrite::Rewriter;

/// How much is read from the client at a time.
const READ_CHUNK: usize = 16 * 1024;

/// A client connection whose incoming bytes are rewritten for h2.
#[derive(Debug)]
pub struct AnyAuthority<S> {
    inner: S,
    rewriter: Rewriter,
    /// Rewritten bytes not yet handed to h2, from `pos`.
    out: Vec<u8>,
    pos: usize,
    chunk: Box<[u8]>,
    failed: bool,
}

impl<S> AnyAuthority<S> {
    pub fn new(inner: S) -> Self {
        AnyAuthority {
            inner,
            rewriter: Rewriter::new(),
            out: Vec::new(),
            pos: 0,
            chunk: vec![0; READ_CHUNK].into_boxed_slice(),
            failed: false,
        }
    }
}

/// The accepted connections of `listener`, each behind the rewrite.
pub fn incoming(
    listener: UnixListener,
) -> impl Stream<Item = io::Result<AnyAuthority<UnixStream>>> + Send + 'static {
    tokio_stream::wrappers::UnixListenerStream::new(listener).map(|c| c.map(AnyAuthority::new))
}

impl<S: AsyncRead + Unpin> AsyncRead for AnyAuthority<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.pos < this.out.len() {
                let n = buf.remaining().min(this.out.len() - this.pos);
                buf.put_slice(&this.out[this.pos..this.pos + n]);
                this.pos += n;
                if this.pos == this.out.len() {
                    this.out.clear();
                    this.pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.failed {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "HTTP/2 stream from the client was refused",
                )));
            }
            // Read only when everything rewritten so far was taken, so the
            // buffer holds at most one chunk plus one header block.
            let mut rb = ReadBuf::new(&mut this.chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            let got = rb.filled();
            if got.is_empty() {
                return Poll::Ready(Ok(()));
            }
            if let Err(e) = this.rewriter.feed(got, &mut this.out) {
                tracing::warn!(error = %e, "closing a client connection: HTTP/2 connection error");
                // What was rewritten before the error still goes to h2.
                this.failed = true;
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AnyAuthority<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: Connected> Connected for AnyAuthority<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::rewrite::{AUTHORITY, PREFACE, encode_never_indexed};
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn headers_frame(stream: u32, block: &[u8]) -> Vec<u8> {
        let mut v = (block.len() as u32).to_be_bytes()[1..].to_vec();
        v.extend_from_slice(&[0x1, 0x4 | 0x1]);
        v.extend_from_slice(&stream.to_be_bytes());
        v.extend_from_slice(block);
        v
    }

    /// Through a real socket pair, written in small pieces with pauses:
    /// what comes out is the rewritten stream; the other direction is
    /// untouched.
    #[tokio::test]
    async fn rewrites_what_the_client_writes_and_passes_replies() {
        let (client, server) = UnixStream::pair().unwrap();
        let mut server = AnyAuthority::new(server);
        let mut block = Vec::new();
        encode_never_indexed(b":authority", b"/run/pmem-agent/csi.sock", &mut block);
        encode_never_indexed(b":path", b"/csi.v1.Identity/Probe", &mut block);
        let mut input = PREFACE.to_vec();
        input.extend_from_slice(&headers_frame(1, &block));
        let mut expected = PREFACE.to_vec();
        let mut want_block = Vec::new();
        encode_never_indexed(b":authority", AUTHORITY, &mut want_block);
        encode_never_indexed(b":path", b"/csi.v1.Identity/Probe", &mut want_block);
        expected.extend_from_slice(&headers_frame(1, &want_block));

        let writer = tokio::spawn(async move {
            let mut client = client;
            for piece in input.chunks(5) {
                client.write_all(piece).await.unwrap();
                tokio::task::yield_now().await;
            }
            let mut reply = vec![0; 4];
            client.read_exact(&mut reply).await.unwrap();
            reply
        });
        let mut got = vec![0; expected.len()];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(got, expected);
        server.write_all(b"pong").await.unwrap();
        assert_eq!(writer.await.unwrap(), b"pong");
    }

    #[tokio::test]
    async fn a_connection_error_ends_the_stream_with_an_error() {
        let (mut client, server) = UnixStream::pair().unwrap();
        let mut server = AnyAuthority::new(server);
        let mut input = PREFACE.to_vec();
        // CONTINUATION without HEADERS.
        input.extend_from_slice(&[0, 0, 1, 0x9, 0x4, 0, 0, 0, 1, 0x82]);
        client.write_all(&input).await.unwrap();
        let mut got = vec![0; PREFACE.len()];
        server.read_exact(&mut got).await.unwrap();
        let mut rest = Vec::new();
        let e = server.read_to_end(&mut rest).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }
}
