//! The master side of the `Messenger` service.
//!
//! This adapter speaks the wire protocol and nothing else: it reads the
//! register frame, asks a [`Hub`] (the master's routing core) to attach the
//! child, then pumps frames in both directions in domain terms. It owns the
//! protocol rules (the first frame registers, only the first) so that the hub
//! never sees a malformed stream.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{FutureExt, Stream, StreamExt};
use tokio::sync::oneshot;
use tonic::codegen::{http, Body as HttpBody, BoxFuture, StdError};
use tonic::server::NamedService;
use tonic::Status;

use crate::convert::{FromChild, ServerDecoder, ServerFrames};
use crate::grpc_body::Messages;
use crate::types::{Identity, Outbound, RegisterError, Registration, SendRequest};

/// The routing core the adapter hands attached children to.
pub trait Hub: Send + Sync + 'static {
    /// The per-stream handle for an attached child.
    type Session: Session;
    /// Checks a registration and attaches the child.
    fn attach(
        &self,
        registration: Registration,
    ) -> Result<(Identity, Self::Session), RegisterError>;
}

/// One attached child, as seen by the adapter.
pub trait Session: Send + Sync + 'static {
    /// The frames for this child, in order, encoded by a [`FrameWriter`]
    /// in chunks of many frames when many are waiting. It ends when the
    /// child is detached or the master closes the stream.
    fn outbound(&self) -> Pin<Box<dyn Stream<Item = Frames> + Send>>;
    /// The child declared itself ready.
    fn ready(&self);
    /// The child asks to route a message. A returned future must complete
    /// before the adapter reads the child's next frame: this is where the
    /// hub applies flow control to a flooding sender. `None` (the usual
    /// case) reads on at once, with nothing allocated for the message.
    fn send(&self, request: SendRequest) -> Option<Pin<Box<dyn Future<Output = ()> + Send + '_>>>;
    /// The child has handled every message up to `seq`.
    fn ack(&self, seq: u64);
    /// The child's inbound stream ended (cleanly or not).
    fn detach(&self);
}

/// How the master treats its streams: limits on streams that have not
/// registered yet (a client that opens streams and never registers must
/// not tie up the master), and how long a stream keeps polling after a
/// frame.
#[derive(Clone, Copy, Debug)]
pub struct StreamOptions {
    /// How long a new stream may take to send its register frame.
    pub register_timeout: Duration,
    /// How many streams may wait for their register frame at once; past it
    /// the one that has waited longest is ended with RESOURCE_EXHAUSTED.
    pub max_pending: usize,
    /// After a frame from a child, how long its stream task keeps polling
    /// for the next one before it sleeps (zero: at once). See `spin.rs`.
    pub idle_spin: Duration,
    /// The longest gRPC message a child may send. A longer one ends its
    /// stream with RESOURCE_EXHAUSTED as soon as its length is read, so no
    /// child can make the master buffer an unbounded message. Set it well
    /// above the hub's own payload limit, so that a send just over that
    /// limit still gets the hub's precise per-send refusal.
    pub max_message_bytes: usize,
}

/// Encoded frames for one child: a chunk of its `Attach` response body.
/// Only a [`FrameWriter`] makes them, so whatever a hub sends is well formed.
#[derive(Debug)]
pub struct Frames(Bytes);

/// Encodes a child's frames into chunks of its response body. The hub
/// writes frames into it straight from its mailboxes (no per-frame copy of
/// the message, no per-frame stream item) until it has no room, then takes
/// the chunk.
#[derive(Debug)]
pub struct FrameWriter(ServerFrames);

impl Default for FrameWriter {
    fn default() -> Self {
        FrameWriter(ServerFrames::new())
    }
}

impl FrameWriter {
    /// Encodes `frame` at the end of the chunk.
    pub fn put(&mut self, frame: &Outbound) {
        self.0.outbound(frame);
    }

    /// Whether the chunk has room for more (it holds less than 32 KiB).
    pub fn has_room(&self) -> bool {
        self.0.has_room()
    }

    /// Whether nothing has been written since the last [`FrameWriter::take`].
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The chunk written so far; the writer starts a new one.
    pub fn take(&mut self) -> Frames {
        Frames(self.0.take())
    }
}

/// The tonic service for [`Hub`]; add it to a `tonic::transport::Server`.
pub fn service<H: Hub>(hub: H, limits: StreamOptions) -> MessengerService<H> {
    MessengerService {
        adapter: Arc::new(Adapter {
            hub: Arc::new(hub),
            limits,
            pending: Arc::new(PendingStreams::default()),
        }),
    }
}

/// The `clutch.v1.Messenger` service. It is the generated server's code
/// with the protocol layer's own codec (see `convert.rs`): frames are
/// decoded straight into domain values and written straight from them.
pub struct MessengerService<H> {
    adapter: Arc<Adapter<H>>,
}

impl<H> Clone for MessengerService<H> {
    fn clone(&self) -> Self {
        MessengerService {
            adapter: self.adapter.clone(),
        }
    }
}

impl<H> NamedService for MessengerService<H> {
    const NAME: &'static str = "clutch.v1.Messenger";
}

impl<H, B> tower::Service<http::Request<B>> for MessengerService<H>
where
    H: Hub,
    B: HttpBody + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != "/clutch.v1.Messenger/Attach" {
            return Box::pin(async move {
                let mut response = http::Response::new(tonic::body::Body::default());
                let headers = response.headers_mut();
                headers.insert(
                    Status::GRPC_STATUS,
                    (tonic::Code::Unimplemented as i32).into(),
                );
                headers.insert(
                    http::header::CONTENT_TYPE,
                    tonic::metadata::GRPC_CONTENT_TYPE,
                );
                Ok(response)
            });
        }
        let adapter = self.adapter.clone();
        Box::pin(async move {
            // No compression is offered, so none is accepted.
            let inbound = Inbound::new(
                req.into_body(),
                ServerDecoder::default(),
                adapter.limits.max_message_bytes,
                adapter.limits.idle_spin,
            );
            Ok(match adapter.attach(inbound).await {
                Ok(body) => {
                    let mut response = http::Response::new(tonic::body::Body::new(body));
                    response.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        tonic::metadata::GRPC_CONTENT_TYPE,
                    );
                    response
                }
                // A refusal is a trailers-only response, as tonic makes it.
                Err(status) => status.into_http(),
            })
        })
    }
}

/// Serves `Attach` over a [`Hub`].
pub struct Adapter<H> {
    /// The master's routing core.
    hub: Arc<H>,
    /// Limits on unregistered streams, and the polling window.
    limits: StreamOptions,
    /// Streams waiting for their register frame now.
    pending: Arc<PendingStreams>,
}

/// The streams waiting for their register frame, oldest first.
#[derive(Default)]
struct PendingStreams {
    /// Each waiting stream's ticket and the means to evict it.
    waiting: Mutex<VecDeque<(u64, oneshot::Sender<()>)>>,
    /// The next ticket number.
    next: AtomicU64,
}

impl PendingStreams {
    /// Enters a stream, evicting the oldest one at the cap. Returns the
    /// stream's ticket (leaving when dropped) and the signal of its own
    /// eviction.
    fn enter(self: &Arc<Self>, cap: usize) -> (Ticket, oneshot::Receiver<()>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        while waiting.len() >= cap.max(1) {
            if let Some((_, evict)) = waiting.pop_front() {
                let _ = evict.send(());
            }
        }
        waiting.push_back((id, tx));
        (
            Ticket {
                id,
                streams: self.clone(),
            },
            rx,
        )
    }
}

/// A stream's place among the pending ones, given up when dropped.
struct Ticket {
    id: u64,
    streams: Arc<PendingStreams>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut waiting = self
            .streams
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        waiting.retain(|(id, _)| *id != self.id);
    }
}

impl<H: Hub> Adapter<H> {
    async fn attach<B>(&self, mut inbound: Inbound<B>) -> Result<AttachBody, Status>
    where
        B: HttpBody + Send + 'static,
        B::Error: Into<StdError>,
    {
        // At the cap, the stream that has waited longest makes room: a real
        // child registers within milliseconds, so only silent streams are
        // evicted, and silent streams can never lock children out.
        let (ticket, evicted) = self.pending.enter(self.limits.max_pending);
        let first = tokio::select! {
            first = tokio::time::timeout(self.limits.register_timeout, inbound.message()) => first,
            _ = evicted => {
                return Err(Status::resource_exhausted(format!(
                    "too many streams waiting to register (the limit is {}); this one waited longest: register as soon as the stream opens",
                    self.limits.max_pending
                )))
            }
        };
        drop(ticket);
        let first = match first {
            Err(_) => {
                return Err(Status::deadline_exceeded(format!(
                    "no register frame within {} ms of opening the stream",
                    self.limits.register_timeout.as_millis()
                )))
            }
            Ok(Err(status)) => return Err(status),
            Ok(Ok(None)) => {
                return Err(Status::invalid_argument(
                    "the stream closed before its register frame",
                ))
            }
            Ok(Ok(Some(frame))) => frame,
        };
        let registration = match first {
            FromChild::Register(r) => r,
            other => {
                return Err(Status::invalid_argument(format!(
                    "the first frame must be `register`, got {}",
                    kind_name(&other)
                )))
            }
        };
        let (identity, session) = self
            .hub
            .attach(registration)
            .map_err(|e| Status::new(e.code(), e.to_string()))?;
        let session = Arc::new(session);
        let (violation_tx, violation_rx) = oneshot::channel();
        tokio::spawn(pump_inbound(session.clone(), inbound, violation_tx));
        Ok(AttachBody {
            welcome: Some(identity),
            outbound: session.outbound(),
            violation: Some(violation_rx),
            done: false,
        })
    }
}

fn kind_name(kind: &FromChild) -> &'static str {
    match kind {
        FromChild::Empty => "an empty frame",
        FromChild::Register(_) => "`register`",
        FromChild::Ready => "`ready`",
        FromChild::Send(_) => "`send`",
        FromChild::Ack(_) => "`ack`",
    }
}

/// A child's frames: its request body split into messages, decoded.
type Inbound<B> = Messages<B, ServerDecoder>;

/// Reads a child's frames after registration until its stream ends. A
/// protocol violation ends the child's response stream with a status.
async fn pump_inbound<S: Session, B>(
    session: Arc<S>,
    mut inbound: Inbound<B>,
    violation: oneshot::Sender<Status>,
) where
    B: HttpBody + Send + 'static,
    B::Error: Into<StdError>,
{
    loop {
        let next = match inbound.message().now_or_never() {
            Some(next) => next,
            None if inbound.keep_polling() => {
                tokio::task::yield_now().await;
                continue;
            }
            None => inbound.message().await,
        };
        let frame = match next {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(status) => {
                // A frame over the limit or a malformed one: the child is
                // told why (if it has gone, nobody reads this).
                tracing::debug!(%status, "child stream failed");
                let _ = violation.send(status);
                break;
            }
        };
        match frame {
            FromChild::Send(s) => {
                if let Some(paced) = session.send(s) {
                    paced.await;
                }
            }
            FromChild::Ready => session.ready(),
            FromChild::Ack(seq) => session.ack(seq),
            FromChild::Register(_) => {
                let _ = violation.send(Status::failed_precondition(
                    "this stream is already registered: `register` is only valid as the first frame",
                ));
                break;
            }
            FromChild::Empty => {
                let _ = violation.send(Status::invalid_argument(
                    "empty frame: set one of register, ready, send or ack",
                ));
                break;
            }
        }
    }
    session.detach();
}

/// The response body of `Attach`: the welcome, then the hub's frames, then
/// the trailers — `OK` when the hub ends the stream, or the status of the
/// child's protocol violation.
pub(crate) struct AttachBody {
    /// Sent first, exactly once.
    welcome: Option<Identity>,
    /// The hub's frames for this child.
    outbound: Pin<Box<dyn Stream<Item = Frames> + Send>>,
    /// Fires when the child broke the protocol; `None` once it has fired
    /// or once the inbound side ended without a violation.
    violation: Option<oneshot::Receiver<Status>>,
    /// The trailers have been sent.
    done: bool,
}

impl AttachBody {
    fn end(&mut self, status: Option<Status>) -> http_body::Frame<Bytes> {
        self.done = true;
        let trailers = match status {
            // A status's headers as tonic writes them, without the content
            // type (that belongs to the response head).
            Some(status) => {
                let mut headers = status.into_http::<()>().into_parts().0.headers;
                headers.remove(http::header::CONTENT_TYPE);
                headers
            }
            None => {
                let mut headers = http::HeaderMap::with_capacity(1);
                headers.insert(Status::GRPC_STATUS, http::HeaderValue::from_static("0"));
                headers
            }
        };
        http_body::Frame::trailers(trailers)
    }
}

impl http_body::Body for AttachBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        if self.done {
            return Poll::Ready(None);
        }
        if let Some(welcome) = self.welcome.take() {
            let mut first = ServerFrames::new();
            first.welcome(&welcome);
            return Poll::Ready(Some(Ok(http_body::Frame::data(first.take()))));
        }
        // Frames first: the violation signal is only looked at when the
        // hub has nothing to write, which is also when a violation shows
        // (the inbound pump detaches right after reporting one, so the
        // hub's stream ends).
        match self.outbound.poll_next_unpin(cx) {
            Poll::Ready(Some(Frames(chunk))) => {
                return Poll::Ready(Some(Ok(http_body::Frame::data(chunk))))
            }
            Poll::Ready(None) => {
                let violation = self.violation.take().and_then(|mut rx| rx.try_recv().ok());
                return Poll::Ready(Some(Ok(self.end(violation))));
            }
            Poll::Pending => {}
        }
        if let Some(rx) = self.violation.as_mut() {
            match Pin::new(rx).poll(cx) {
                Poll::Ready(Ok(status)) => {
                    self.violation = None;
                    return Poll::Ready(Some(Ok(self.end(Some(status)))));
                }
                Poll::Ready(Err(_)) => self.violation = None,
                Poll::Pending => {}
            }
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}
