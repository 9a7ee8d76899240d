//! The operator API over the router and the main loop.
//!
//! `Inject` goes straight to the router, like any send. The rest are
//! commands to the main loop (`cluster.rs`), which owns the processes: a
//! bounded channel of requests, each with a one-shot reply.

use std::sync::Arc;

use clutch::admin::{
    EventStream, Inject, Injected, Operator, ProcessInfo, Replaced, RestartTarget, Restarting,
};
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use crate::events::EventBus;
use crate::hub::Shared;

/// A request for the main loop.
pub enum Command {
    /// List every slot.
    List(oneshot::Sender<Vec<ProcessInfo>>),
    /// Restart one process.
    Restart(RestartTarget, oneshot::Sender<Result<Restarting, Status>>),
    /// Rolling restart of the app workers; answered when done.
    Reload(oneshot::Sender<Result<Vec<Replaced>, Status>>),
    /// Stop the cluster, as SIGTERM does.
    Shutdown(oneshot::Sender<Result<(), Status>>),
}

/// Requests waiting for the main loop. Operators are few; a full queue makes
/// the RPC wait.
pub const COMMAND_QUEUE: usize = 16;

/// The master's [`Operator`].
pub struct Ops {
    /// The router, for injection.
    pub shared: Arc<Shared>,
    /// Requests for the main loop.
    pub commands: mpsc::Sender<Command>,
    /// Lifecycle events for `Watch`.
    pub events: EventBus,
}

fn stopping() -> Status {
    Status::unavailable("the master is stopping")
}

impl Ops {
    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, Status> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(make(tx)).await.map_err(|_| stopping())?;
        rx.await.map_err(|_| stopping())
    }
}

#[tonic::async_trait]
impl Operator for Ops {
    async fn inject(&self, inject: Inject) -> Result<Injected, Status> {
        let result = self
            .shared
            .with_router(|r, out| r.inject(inject.target, inject.action, inject.data, out));
        // A send that reached no one is an error of the RPC itself, with
        // the router's reason; a partial miss is reported in the reply.
        if result.delivered + result.held == 0 {
            if let Some(first) = result.undelivered.first() {
                return Err(Status::new(first.code, first.message.clone()));
            }
        }
        Ok(Injected {
            delivered: result.delivered,
            held: result.held,
            undelivered: result.undelivered,
        })
    }

    async fn list(&self) -> Result<Vec<ProcessInfo>, Status> {
        self.ask(Command::List).await
    }

    fn watch(&self) -> EventStream {
        self.events.watch()
    }

    async fn restart(&self, target: RestartTarget) -> Result<Restarting, Status> {
        self.ask(|tx| Command::Restart(target, tx)).await?
    }

    async fn reload(&self) -> Result<Vec<Replaced>, Status> {
        self.ask(Command::Reload).await?
    }

    async fn shutdown(&self) -> Result<(), Status> {
        self.ask(Command::Shutdown).await?
    }
}
