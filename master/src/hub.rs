//! The edge between the gRPC streams and the [`Router`].
//!
//! The router is a plain value behind a mutex; this module turns its
//! [`Action`]s into effects: waking a child's outbound stream, releasing
//! senders held by flow control, and handing lifecycle decisions to the
//! cluster loop. It implements the protocol layer's `Hub` and `Session`.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use clutch::server::{FrameWriter, Frames, Hub as ProtocolHub, Session as ProtocolSession};
use clutch::types::{RegisterError, SendRequest};
use clutch::{Identity, Registration};
use futures_util::Stream;
use tokio::sync::{mpsc, Notify};

use crate::router::{Action, Conn, Router, SlotId};

/// Frames written from a mailbox per lock, at most: a whole response body
/// chunk (32 KiB) is written under one lock, which amortises it over a
/// batch; this bounds the lock's hold when frames are tiny.
const DRAIN_BATCH: usize = 1024;

/// Lifecycle decisions for the cluster loop.
///
/// The channel that carries them is unbounded by type but bounded by
/// construction: the router emits at most a few of these per lifecycle
/// event of a child (register, ready, exit), never per message, so its
/// length is bounded by the number of slots times a small constant.
pub type LifecycleTx = mpsc::UnboundedSender<Action>;

/// What the lock guards.
struct Core {
    /// The routing state machine.
    router: Router,
    /// Reused for every event, so routing a message allocates no vector
    /// for its wake-ups.
    actions: Vec<Action>,
}

/// State shared by every stream and the cluster loop.
pub struct Shared {
    /// The routing state machine, and the vector its actions go to.
    core: Mutex<Core>,
    /// Per slot: its outbound streams have frames to write or must end.
    wake: Box<[Notify]>,
    /// Per slot: its mailbox drained below the low watermark.
    room: Box<[Notify]>,
    /// Where lifecycle actions go.
    lifecycle: LifecycleTx,
    /// How long a sender waits on one congested receiver before giving up
    /// on it (overflow is then reported to senders instead).
    flow_wait: Duration,
}

impl Shared {
    /// Wraps a router for sharing.
    pub fn new(router: Router, lifecycle: LifecycleTx, flow_wait: Duration) -> Arc<Shared> {
        let slots = router.workers() + 1;
        Arc::new(Shared {
            core: Mutex::new(Core {
                router,
                actions: Vec::new(),
            }),
            wake: (0..slots).map(|_| Notify::new()).collect(),
            room: (0..slots).map(|_| Notify::new()).collect(),
            lifecycle,
            flow_wait,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Core> {
        // Router methods do not panic on any input (they are tested so); a
        // poisoned lock would mean a bug, and the state is still the best
        // account of the cluster there is.
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs one router event and carries out its actions. The actions are
    /// carried out under the lock: they only notify and enqueue, and the
    /// tasks they wake run after it is released.
    pub fn with_router<R>(&self, event: impl FnOnce(&mut Router, &mut Vec<Action>) -> R) -> R {
        let mut core = self.lock();
        let Core { router, actions } = &mut *core;
        actions.clear();
        let result = event(router, actions);
        self.apply(actions);
        result
    }

    fn apply(&self, actions: &mut Vec<Action>) {
        for action in actions.drain(..) {
            match action {
                // Every stream of the slot: during a reload's handover a
                // slot has two processes, and each checks its own frames.
                Action::Wake(slot) => self.wake[slot].notify_waiters(),
                Action::Relieved(slot) => self.room[slot].notify_waiters(),
                other => {
                    // The cluster loop outlives every stream; if it is gone
                    // the master is exiting and the action no longer matters.
                    let _ = self.lifecycle.send(other);
                }
            }
        }
    }

    /// Waits until `slot` has room, or gives up on it after `flow_wait`.
    async fn wait_for_room(&self, slot: SlotId) {
        // A receiver that keeps making progress (reading or acknowledging),
        // however slowly, slows its senders to its pace (backpressure); one
        // that makes none for a whole `flow_wait` is stuck, and senders stop
        // waiting for it.
        let mut deadline = tokio::time::Instant::now() + self.flow_wait;
        let mut progress = self.lock().router.progress(slot);
        loop {
            let room = self.room[slot].notified();
            tokio::pin!(room);
            // Register interest before checking, so a drain between the check
            // and the await is not missed.
            room.as_mut().enable();
            if self.lock().router.has_room(slot) {
                return;
            }
            if tokio::time::timeout_at(deadline, room).await.is_err() {
                let now = self.lock().router.progress(slot);
                if now != progress {
                    progress = now;
                    deadline = tokio::time::Instant::now() + self.flow_wait;
                    continue;
                }
                self.with_router(|r, out| r.stall(slot, out));
                return;
            }
        }
    }
}

/// The master's implementation of the protocol layer's `Hub`.
#[derive(Clone)]
pub struct Hub {
    /// The shared routing state.
    pub shared: Arc<Shared>,
}

impl ProtocolHub for Hub {
    type Session = Session;

    fn attach(&self, registration: Registration) -> Result<(Identity, Session), RegisterError> {
        let attached = self
            .shared
            .with_router(|r, out| r.register(&registration, out));
        match attached {
            Ok((identity, conn)) => {
                let span =
                    crate::supervisor::child_span(identity.role, identity.worker_id, identity.pid);
                span.in_scope(|| tracing::info!(incarnation = identity.incarnation, "registered"));
                Ok((
                    identity,
                    Session {
                        shared: self.shared.clone(),
                        conn,
                        span,
                    },
                ))
            }
            Err(e) => {
                tracing::warn!(error = %e, "refused a registration");
                Err(e)
            }
        }
    }
}

/// One attached child's stream.
pub struct Session {
    /// The shared routing state.
    shared: Arc<Shared>,
    /// Which slot and incarnation this stream belongs to.
    conn: Conn,
    /// The child's span, so stream events log under it.
    span: tracing::Span,
}

impl ProtocolSession for Session {
    fn outbound(&self) -> Pin<Box<dyn Stream<Item = Frames> + Send>> {
        // Frames are encoded straight from the mailbox under the router's
        // lock (uncontended: the master runs on one thread) into a chunk
        // of the response body, which is handed out whole.
        let state = (self.shared.clone(), self.conn, FrameWriter::default());
        Box::pin(futures_util::stream::unfold(
            state,
            |(shared, conn, mut chunk)| async move {
                let drain = |chunk: &mut FrameWriter| {
                    shared.with_router(|r, out| r.drain(conn, chunk, DRAIN_BATCH, out))
                };
                let mut open = drain(&mut chunk);
                if chunk.is_empty() && open {
                    // Nothing now: register interest, then look once more,
                    // so a frame queued in between is not missed
                    // (`notify_waiters` keeps no permit).
                    loop {
                        let woken = shared.wake[conn.slot].notified();
                        tokio::pin!(woken);
                        woken.as_mut().enable();
                        open = drain(&mut chunk);
                        if !chunk.is_empty() || !open {
                            break;
                        }
                        woken.await;
                    }
                }
                // What was written before the stream was told to end still
                // goes out; the next round ends it.
                if chunk.is_empty() {
                    return None;
                }
                let frames = chunk.take();
                Some((frames, (shared, conn, chunk)))
            },
        ))
    }

    fn ready(&self) {
        self.span.in_scope(|| tracing::info!("ready"));
        self.shared.with_router(|r, out| r.ready(self.conn, out));
    }

    fn send(&self, request: SendRequest) -> Option<Pin<Box<dyn Future<Output = ()> + Send + '_>>> {
        let congested = self
            .shared
            .with_router(|r, out| r.send(self.conn, request, out));
        if congested.is_empty() {
            return None;
        }
        Some(Box::pin(async move {
            for slot in congested {
                self.shared.wait_for_room(slot).await;
            }
        }))
    }

    fn ack(&self, seq: u64) {
        self.shared.with_router(|r, out| r.ack(self.conn, seq, out));
    }

    fn detach(&self) {
        self.span.in_scope(|| tracing::info!("stream closed"));
        self.shared.with_router(|r, out| r.detach(self.conn, out));
    }
}
