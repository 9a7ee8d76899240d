//! The cluster's lifecycle events, for `Admin.Watch` (the counterpart of
//! PM2's bus).
//!
//! A broadcast channel: bounded, and a watcher that falls behind is not
//! allowed to slow the cluster. It skips ahead and is told how many events
//! it missed (a `lagged` event), so a gap is never silent.

use std::time::{SystemTime, UNIX_EPOCH};

use clutch::admin::{EventStream, LifecycleEvent};
use clutch::Role;
use futures_util::StreamExt;
use std::sync::Arc;

use tokio::sync::{broadcast, watch};
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;

/// Events kept for watchers that are behind.
const CAPACITY: usize = 1024;

/// The sender side, shared by everything that emits events.
#[derive(Clone)]
pub struct EventBus {
    /// The channel; sending with no watcher is a no-op.
    tx: broadcast::Sender<LifecycleEvent>,
    /// Becomes true when the master is done: every watch stream ends.
    closed: Arc<watch::Sender<bool>>,
}

impl Default for EventBus {
    fn default() -> Self {
        EventBus {
            tx: broadcast::channel(CAPACITY).0,
            closed: Arc::new(watch::Sender::new(false)),
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl EventBus {
    /// Emits an event about one process (or cluster-wide, with `role: None`).
    pub fn emit(
        &self,
        kind: &'static str,
        role: Option<Role>,
        worker_id: u32,
        pid: u32,
        message: String,
        fill: impl FnOnce(&mut LifecycleEvent),
    ) {
        let mut event = LifecycleEvent {
            at_ms: now_ms(),
            kind,
            role,
            worker_id,
            pid,
            message,
            ..LifecycleEvent::default()
        };
        fill(&mut event);
        // No watcher is not an error.
        let _ = self.tx.send(event);
    }

    /// Ends every watch stream (the master is about to exit).
    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    /// A stream of events from now on. Its first event, `watching`, says the
    /// subscription is in place, so a client knows nothing after it is missed.
    pub fn watch(&self) -> EventStream {
        let mut closed = self.closed.subscribe();
        let end = async move {
            let _ = closed.wait_for(|c| *c).await;
        };
        let hello = LifecycleEvent {
            at_ms: now_ms(),
            kind: "watching",
            message: "watching the cluster's lifecycle events".into(),
            ..LifecycleEvent::default()
        };
        let events = BroadcastStream::new(self.tx.subscribe()).map(|item| match item {
            Ok(event) => event,
            Err(BroadcastStreamRecvError::Lagged(count)) => LifecycleEvent {
                at_ms: now_ms(),
                kind: "lagged",
                count,
                message: format!("this watcher fell behind and missed {count} events"),
                ..LifecycleEvent::default()
            },
        });
        Box::pin(
            futures_util::stream::once(async { hello })
                .chain(events)
                .take_until(end),
        )
    }
}
