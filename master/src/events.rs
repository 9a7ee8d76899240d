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
use tokio::sync::broadcast;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;

/// Events kept for watchers that are behind.
const CAPACITY: usize = 1024;

/// The sender side, shared by everything that emits events.
#[derive(Clone)]
pub struct EventBus {
    /// The channel; sending with no watcher is a no-op.
    tx: broadcast::Sender<LifecycleEvent>,
}

impl Default for EventBus {
    fn default() -> Self {
        EventBus {
            tx: broadcast::channel(CAPACITY).0,
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

    /// A stream of events from now on.
    pub fn watch(&self) -> EventStream {
        Box::pin(
            BroadcastStream::new(self.tx.subscribe()).map(|item| match item {
                Ok(event) => event,
                Err(BroadcastStreamRecvError::Lagged(count)) => LifecycleEvent {
                    at_ms: now_ms(),
                    kind: "lagged",
                    count,
                    message: format!("this watcher fell behind and missed {count} events"),
                    ..LifecycleEvent::default()
                },
            }),
        )
    }
}
