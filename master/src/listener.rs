//! The master's listening socket: TCP (with TCP_NODELAY on every accepted
//! connection) or a Unix domain socket, and serving the gRPC routes on it.
//!
//! Admission, before HTTP/2 sees a connection: at most `max_connections`
//! are open at once (one past it is closed at once, with a warning at most
//! once a second), and a connection must send the 24 bytes of the HTTP/2
//! client preface within `handshake_timeout` or it is closed, so idle or
//! half-open sockets cannot pile up. (After the preface, HTTP/2 and the
//! messenger's own registration timeout take over.)

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::UnixListenerStream;
use tokio_stream::{Stream, StreamExt};
use tonic::service::Routes;
use tonic::transport::server::{Connected, TcpIncoming};

use crate::config::Listen;
use crate::metadata_limit::MetadataLimitLayer;

/// Concurrent streams one HTTP/2 connection may open.
const MAX_STREAMS_PER_CONNECTION: u32 = 256;
/// The largest metadata (header list) a request may carry; past it the
/// request is refused with RESOURCE_EXHAUSTED naming the limit.
const MAX_METADATA_BYTES: usize = 16 * 1024;
/// HTTP/2's own limit, above ours: a header list past it is refused by
/// HTTP/2 itself (431, which clients report as UNKNOWN), without the
/// master buffering it.
const MAX_HEADER_LIST_BYTES: u32 = 64 * 1024;

/// Who may connect, and for how long a silent connection is kept.
#[derive(Clone, Copy, Debug)]
pub struct Admission {
    /// Connections open at once; past it a new one is closed at once.
    pub max_connections: usize,
    /// How long a new connection may take to send the HTTP/2 preface.
    pub handshake_timeout: Duration,
}

/// The HTTP/2 client connection preface: `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`.
const PREFACE_BYTES: usize = 24;

/// A bound listener.
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// A Unix socket, with its path (removed again when serving ends).
    Unix(UnixListener, PathBuf),
}

/// Why the listener could not bind.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {listen}: {reason}")]
pub struct BindError {
    /// The address.
    pub listen: Listen,
    /// The OS's reason.
    pub reason: std::io::Error,
}

impl Listener {
    /// Binds `listen`. A stale Unix socket file left by a dead master is
    /// replaced; one a live master still answers on is an error.
    pub async fn bind(listen: &Listen) -> Result<Listener, BindError> {
        let fail = |reason| BindError {
            listen: listen.clone(),
            reason,
        };
        match listen {
            Listen::Tcp(addr) => TcpListener::bind(addr)
                .await
                .map(Listener::Tcp)
                .map_err(fail),
            Listen::Unix(path) => {
                if tokio::net::UnixStream::connect(path).await.is_ok() {
                    return Err(fail(std::io::Error::new(
                        std::io::ErrorKind::AddrInUse,
                        "another process is listening on this socket",
                    )));
                }
                match std::fs::remove_file(path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(fail(e)),
                    _ => {}
                }
                UnixListener::bind(path)
                    .map(|l| Listener::Unix(l, path.clone()))
                    .map_err(fail)
            }
        }
    }

    /// The address children and operators dial: `IP:PORT` or `unix:/path`.
    pub fn address(&self) -> std::io::Result<String> {
        Ok(match self {
            Listener::Tcp(l) => l.local_addr()?.to_string(),
            Listener::Unix(_, path) => format!("unix:{}", path.display()),
        })
    }

    /// Serves `routes` until `stop` completes.
    pub async fn serve(
        self,
        routes: Routes,
        admission: Admission,
        stop: impl Future<Output = ()>,
    ) -> Result<(), tonic::transport::Error> {
        let server = tonic::transport::Server::builder()
            // A child needs one stream and an operator a few: this bounds
            // what one misbehaving connection can open.
            .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
            .http2_max_header_list_size(Some(MAX_HEADER_LIST_BYTES))
            .max_frame_size(Some(clutch::MAX_FRAME_BYTES))
            .layer(MetadataLimitLayer {
                limit: MAX_METADATA_BYTES,
            })
            .add_routes(routes);
        match self {
            // tonic ignores the builder's TCP_NODELAY with a custom incoming,
            // so it is set here; without it small frames wait for Nagle.
            Listener::Tcp(l) => {
                let incoming = TcpIncoming::from(l).with_nodelay(Some(true));
                server
                    .serve_with_incoming_shutdown(admit(incoming, admission), stop)
                    .await
            }
            Listener::Unix(l, path) => {
                let incoming = UnixListenerStream::new(l);
                let served = server
                    .serve_with_incoming_shutdown(admit(incoming, admission), stop)
                    .await;
                let _ = std::fs::remove_file(path);
                served
            }
        }
    }
}

/// Applies [`Admission`] to a stream of accepted connections: connections
/// past the limit are dropped (closed) here, the rest are wrapped.
fn admit<IO, E>(
    incoming: impl Stream<Item = Result<IO, E>>,
    admission: Admission,
) -> impl Stream<Item = Result<Admitted<IO>, E>> {
    let slots = Arc::new(Semaphore::new(admission.max_connections));
    let mut last_warning: Option<Instant> = None;
    let mut refused = 0u64;
    incoming.filter_map(move |accepted| {
        let io = match accepted {
            Ok(io) => io,
            Err(e) => return Some(Err(e)),
        };
        match slots.clone().try_acquire_owned() {
            Ok(permit) => Some(Ok(Admitted {
                io,
                _permit: permit,
                handshake: Some(Box::pin(tokio::time::sleep(admission.handshake_timeout))),
                received: 0,
            })),
            Err(_) => {
                refused += 1;
                if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                    tracing::warn!(
                        limit = admission.max_connections,
                        refused,
                        "too many open connections: closing new ones (limits.max_connections)"
                    );
                    last_warning = Some(Instant::now());
                    refused = 0;
                }
                None
            }
        }
    })
}

/// An admitted connection: it holds one of the connection slots until it
/// closes, and is closed if its preface is not in before its deadline.
pub struct Admitted<IO> {
    /// The socket.
    io: IO,
    /// Its connection slot, given back when the connection is dropped.
    _permit: OwnedSemaphorePermit,
    /// Runs until the preface is in; `None` after that.
    handshake: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Bytes read so far, until the preface is in.
    received: usize,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Admitted<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        let Some(deadline) = self.handshake.as_mut() else {
            return polled;
        };
        match polled {
            Poll::Ready(Ok(())) => {
                self.received += buf.filled().len() - before;
                if self.received >= PREFACE_BYTES {
                    self.handshake = None;
                }
            }
            // Still short of the preface: the deadline's timer wakes this
            // read when it passes, and the connection is closed.
            Poll::Pending if deadline.as_mut().poll(cx).is_ready() => {
                tracing::debug!(
                    received = self.received,
                    "a connection did not send the HTTP/2 preface before its handshake deadline; closing it"
                );
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no HTTP/2 preface before the handshake deadline",
                )));
            }
            _ => {}
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Admitted<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<IO: Connected> Connected for Admitted<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}
