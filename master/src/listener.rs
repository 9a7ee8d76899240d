//! The master's listening socket: TCP (with TCP_NODELAY on every accepted
//! connection) or a Unix domain socket, and serving the gRPC routes on it.

use std::future::Future;
use std::path::PathBuf;

use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::service::Routes;
use tonic::transport::server::TcpIncoming;

use crate::config::Listen;

/// Concurrent streams one HTTP/2 connection may open.
const MAX_STREAMS_PER_CONNECTION: u32 = 256;
/// The largest metadata (header list) a request may carry.
const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;

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
        stop: impl Future<Output = ()>,
    ) -> Result<(), tonic::transport::Error> {
        let server = tonic::transport::Server::builder()
            // A child needs one stream and an operator a few: this bounds
            // what one misbehaving connection can open.
            .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
            // Oversized metadata is refused by HTTP/2 itself.
            .http2_max_header_list_size(Some(MAX_HEADER_LIST_BYTES))
            .add_routes(routes);
        match self {
            // tonic ignores the builder's TCP_NODELAY with a custom incoming,
            // so it is set here; without it small frames wait for Nagle.
            Listener::Tcp(l) => {
                server
                    .serve_with_incoming_shutdown(
                        TcpIncoming::from(l).with_nodelay(Some(true)),
                        stop,
                    )
                    .await
            }
            Listener::Unix(l, path) => {
                let served = server
                    .serve_with_incoming_shutdown(UnixListenerStream::new(l), stop)
                    .await;
                let _ = std::fs::remove_file(path);
                served
            }
        }
    }
}
