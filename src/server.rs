//! The master side of the `Messenger` service.
//!
//! This adapter speaks the wire protocol and nothing else: it reads the
//! register frame, asks a [`Hub`] (the master's routing core) to attach the
//! child, then pumps frames in both directions in domain terms. It owns the
//! protocol rules (the first frame registers, only the first) so that the hub
//! never sees a malformed stream.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use tokio::sync::oneshot;
use tonic::{Request, Response, Status, Streaming};

use crate::convert;
use crate::pb;
use crate::pb::messenger_server::{Messenger, MessengerServer};
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
    /// The frames for this child, in order. It ends when the child is
    /// detached or the master closes the stream.
    fn outbound(&self) -> Pin<Box<dyn Stream<Item = Outbound> + Send>>;
    /// The child declared itself ready.
    fn ready(&self);
    /// The child asks to route a message. The returned future completes when
    /// the adapter may read the child's next frame: this is where the hub
    /// applies flow control to a flooding sender.
    fn send(&self, request: SendRequest) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
    /// The child has handled every message up to `seq`.
    fn ack(&self, seq: u64);
    /// The child's inbound stream ended (cleanly or not).
    fn detach(&self);
}

/// Limits on streams that have not registered yet: a client that opens
/// streams and never registers must not tie up the master.
#[derive(Clone, Copy, Debug)]
pub struct PendingLimits {
    /// How long a new stream may take to send its register frame.
    pub register_timeout: Duration,
    /// How many streams may wait for their register frame at once; past it
    /// the one that has waited longest is ended with RESOURCE_EXHAUSTED.
    pub max_pending: usize,
}

/// The tonic service for [`Hub`]; add it to a `tonic::transport::Server`.
pub fn service<H: Hub>(hub: H, limits: PendingLimits) -> MessengerServer<Adapter<H>> {
    MessengerServer::new(Adapter {
        hub: Arc::new(hub),
        limits,
        pending: Arc::new(PendingStreams::default()),
    })
    // The hub enforces its own payload limit with a precise error; tonic's
    // default of 4 MiB would otherwise cut the stream with a vaguer one.
    .max_decoding_message_size(usize::MAX)
}

/// Implements the generated `Messenger` trait over a [`Hub`].
pub struct Adapter<H> {
    /// The master's routing core.
    hub: Arc<H>,
    /// Limits on unregistered streams.
    limits: PendingLimits,
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

#[tonic::async_trait]
impl<H: Hub> Messenger for Adapter<H> {
    type AttachStream = AttachStream;

    async fn attach(
        &self,
        request: Request<Streaming<pb::ClientFrame>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let mut inbound = request.into_inner();
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
        let registration = match first.kind {
            Some(pb::client_frame::Kind::Register(r)) => convert::registration_from_pb(r),
            other => {
                return Err(Status::invalid_argument(format!(
                    "the first frame must be `register`, got {}",
                    kind_name(other.as_ref())
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
        Ok(Response::new(AttachStream {
            welcome: Some(convert::welcome_to_pb(&identity)),
            outbound: session.outbound(),
            violation: Some(violation_rx),
        }))
    }
}

fn kind_name(kind: Option<&pb::client_frame::Kind>) -> &'static str {
    match kind {
        None => "an empty frame",
        Some(pb::client_frame::Kind::Register(_)) => "`register`",
        Some(pb::client_frame::Kind::Ready(_)) => "`ready`",
        Some(pb::client_frame::Kind::Send(_)) => "`send`",
        Some(pb::client_frame::Kind::Ack(_)) => "`ack`",
    }
}

/// Reads a child's frames after registration until its stream ends. A
/// protocol violation ends the child's response stream with a status.
async fn pump_inbound<S: Session>(
    session: Arc<S>,
    mut inbound: Streaming<pb::ClientFrame>,
    violation: oneshot::Sender<Status>,
) {
    loop {
        let frame = match inbound.message().await {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(status) => {
                tracing::debug!(%status, "child stream failed");
                break;
            }
        };
        match frame.kind {
            Some(pb::client_frame::Kind::Send(s)) => session.send(convert::send_from_pb(s)).await,
            Some(pb::client_frame::Kind::Ready(_)) => session.ready(),
            Some(pb::client_frame::Kind::Ack(a)) => session.ack(a.seq),
            Some(pb::client_frame::Kind::Register(_)) => {
                let _ = violation.send(Status::failed_precondition(
                    "this stream is already registered: `register` is only valid as the first frame",
                ));
                break;
            }
            None => {
                let _ = violation.send(Status::invalid_argument(
                    "empty frame: set one of register, ready, send or ack",
                ));
                break;
            }
        }
    }
    session.detach();
}

/// The response stream of `Attach`: the welcome, then the hub's frames,
/// cut short by a status if the child breaks the protocol.
pub struct AttachStream {
    /// Sent first, exactly once.
    welcome: Option<pb::ServerFrame>,
    /// The hub's frames for this child.
    outbound: Pin<Box<dyn Stream<Item = Outbound> + Send>>,
    /// Fires when the child broke the protocol; `None` once it has fired
    /// or once the inbound side ended without a violation.
    violation: Option<oneshot::Receiver<Status>>,
}

impl Stream for AttachStream {
    type Item = Result<pb::ServerFrame, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(welcome) = self.welcome.take() {
            return Poll::Ready(Some(Ok(welcome)));
        }
        if let Some(rx) = self.violation.as_mut() {
            match Pin::new(rx).poll(cx) {
                Poll::Ready(Ok(status)) => {
                    self.violation = None;
                    self.outbound = Box::pin(futures_util::stream::empty());
                    return Poll::Ready(Some(Err(status)));
                }
                Poll::Ready(Err(_)) => self.violation = None,
                Poll::Pending => {}
            }
        }
        self.outbound
            .poll_next_unpin(cx)
            .map(|o| o.map(|out| Ok(convert::outbound_to_pb(out))))
    }
}
