//! # agent-sdk — write a Clutch agent in Rust
//!
//! The agent is the one process of a Clutch cluster that does the work that
//! must happen once: hold a long-lived connection, own a log file, schedule
//! jobs for the app workers. This crate is the agent's face of Egg's
//! messenger over the master's gRPC stream.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let agent = agent_sdk::Agent::connect().await?;
//! agent.on("job-done", |msg| println!("done: {:?}", msg.json::<serde_json::Value>()));
//! agent.ready().await?;
//! agent.egg_ready().await?; // every app worker is up
//! agent.send_to_app("config", &serde_json::json!({ "level": 2 })).await?;
//! agent.send_random("job", &serde_json::json!({ "id": 1 })).await?;
//! # Ok(()) }
//! ```
//!
//! [`Agent`] dereferences to the shared [`Client`], which carries the calls
//! every role has: `on`, `once`, `subscribe`, `ready`, `egg_ready`,
//! `broadcast`, `send_to_app`, `send_to_agent`, `send_to`, `emit`.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::ops::Deref;

use serde::Serialize;

pub use clutch::client::{AGENT_START, EGG_PIDS, EGG_READY};
pub use clutch::{
    Client, Code, ConnectError, ConnectOptions, DecodeError, Identity, Message, Origin, Receipt,
    Role, SendError, SendResult, Target, Undelivered,
};

/// The agent's connection to the master.
#[derive(Clone, Debug)]
pub struct Agent {
    /// The shared client core; `Deref` exposes its calls.
    client: Client,
}

impl Agent {
    /// Connects with the environment the master provides (`CLUTCH_*`) and
    /// registers. Fails if this process was not launched as the agent.
    pub async fn connect() -> Result<Agent, ConnectError> {
        Self::connect_with(ConnectOptions::from_env(Role::Agent)?).await
    }

    /// Connects with explicit options.
    pub async fn connect_with(options: ConnectOptions) -> Result<Agent, ConnectError> {
        Ok(Agent {
            client: Client::connect(options).await?,
        })
    }

    /// Egg's `sendRandom`: one ready app worker, picked by the master.
    /// Fails with code UNAVAILABLE when no app worker is ready.
    pub async fn send_random<T: Serialize + ?Sized>(
        &self,
        action: &str,
        data: &T,
    ) -> Result<Receipt, SendError> {
        self.client.send(Target::Random, action, data).await
    }

    /// This agent's pid as the master sees it.
    pub fn pid(&self) -> u32 {
        self.client.identity().pid
    }

    /// The shared client core.
    pub fn client(&self) -> &Client {
        &self.client
    }
}

impl Deref for Agent {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}
