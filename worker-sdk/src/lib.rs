//! # worker-sdk — write a Clutch app worker in Rust
//!
//! App workers are the N processes of a Clutch cluster that serve requests
//! and run jobs. This crate is the app worker's face of Egg's messenger over
//! the master's gRPC stream.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let worker = worker_sdk::Worker::connect().await?;
//! worker.on("config", |msg| println!("config: {:?}", msg.json::<serde_json::Value>()));
//! worker.ready().await?;
//! worker.egg_ready().await?;
//! worker.send_to_agent("hello", &serde_json::json!({ "worker": worker.worker_id() })).await?;
//! # Ok(()) }
//! ```
//!
//! [`Worker`] dereferences to the shared [`Client`], which carries the calls
//! every role has: `on`, `once`, `subscribe`, `ready`, `egg_ready`,
//! `broadcast`, `send_to_app`, `send_to_agent`, `send_to`, `emit`.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::ops::Deref;

pub use clutch::client::{AGENT_START, EGG_PIDS, EGG_READY};
pub use clutch::{
    Client, Code, ConnectError, ConnectOptions, DecodeError, Identity, Message, Origin, Receipt,
    Role, SendError, SendResult, Target, Undelivered,
};

/// An app worker's connection to the master.
#[derive(Clone, Debug)]
pub struct Worker {
    /// The shared client core; `Deref` exposes its calls.
    client: Client,
}

impl Worker {
    /// Connects with the environment the master provides (`CLUTCH_*`) and
    /// registers. Fails if this process was not launched as an app worker.
    pub async fn connect() -> Result<Worker, ConnectError> {
        Self::connect_with(ConnectOptions::from_env(Role::App)?).await
    }

    /// Connects with explicit options.
    pub async fn connect_with(options: ConnectOptions) -> Result<Worker, ConnectError> {
        Ok(Worker {
            client: Client::connect(options).await?,
        })
    }

    /// This worker's slot, 1..=N. It survives restarts; the pid does not.
    pub fn worker_id(&self) -> u32 {
        self.client.identity().worker_id
    }

    /// This worker's pid as the master sees it.
    pub fn pid(&self) -> u32 {
        self.client.identity().pid
    }

    /// The shared client core.
    pub fn client(&self) -> &Client {
        &self.client
    }
}

impl Deref for Worker {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}
