//! The built-in demo cluster that `cargo run -p master` runs when no agent
//! or app command is configured: the master's own binary in a hidden child
//! mode, written with the SDKs exactly as a user would.
//!
//! The agent waits for egg-ready, sends the workers a configuration with
//! `send_to_app`, then hands out a job every second with `send_random`. Each
//! worker listens with `on`, does the job and reports back with
//! `send_to_agent`.

use std::time::Duration;

use agent_sdk::Agent;
use serde::{Deserialize, Serialize};
use worker_sdk::Worker;

/// A job the agent hands out.
#[derive(Debug, Serialize, Deserialize)]
struct Job {
    id: u64,
    numbers: Vec<u64>,
}

/// A worker's answer.
#[derive(Debug, Serialize, Deserialize)]
struct Done {
    id: u64,
    sum: u64,
    worker: u32,
}

/// The demo agent.
pub async fn agent() -> anyhow::Result<()> {
    let agent = Agent::connect().await?;
    agent.on("job-done", |msg| match msg.json::<Done>() {
        Ok(done) => tracing::info!(
            job = done.id,
            sum = done.sum,
            worker = done.worker,
            "job done"
        ),
        Err(e) => tracing::warn!("{e}"),
    });
    agent.on(
        agent_sdk::EGG_PIDS,
        |msg| tracing::info!(pids = %String::from_utf8_lossy(&msg.data), "egg-pids: app workers"),
    );
    agent.ready().await?;
    agent.egg_ready().await?;
    tracing::info!("egg-ready: sending the config to every app worker");
    let receipt = agent
        .send_to_app(
            "config",
            &serde_json::json!({ "greeting": "hello from the agent" }),
        )
        .await?;
    tracing::info!(delivered = receipt.delivered, "config sent");
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    for id in 1.. {
        tick.tick().await;
        let job = Job {
            id,
            numbers: (id..id + 5).collect(),
        };
        if let Err(e) = agent.send_random("job", &job).await {
            tracing::warn!("job {id} not sent: {e}");
        }
    }
    Ok(())
}

/// A demo app worker.
pub async fn app() -> anyhow::Result<()> {
    let worker = Worker::connect().await?;
    let id = worker.worker_id();
    worker.on("config", |msg| {
        let greeting = msg
            .json::<serde_json::Value>()
            .ok()
            .and_then(|v| v["greeting"].as_str().map(str::to_owned));
        tracing::info!(
            greeting = greeting.as_deref().unwrap_or("?"),
            "config received"
        );
    });
    let reply = worker.clone();
    worker.on("job", move |msg| {
        let reply = reply.clone();
        match msg.json::<Job>() {
            Ok(job) => {
                tracing::info!(job = job.id, "working");
                tokio::spawn(async move {
                    let done = Done {
                        id: job.id,
                        sum: job.numbers.iter().sum(),
                        worker: id,
                    };
                    if let Err(e) = reply.send_to_agent("job-done", &done).await {
                        tracing::warn!("cannot report job {}: {e}", done.id);
                    }
                });
            }
            Err(e) => tracing::warn!("{e}"),
        }
    });
    worker.ready().await?;
    worker.egg_ready().await?;
    tracing::info!("egg-ready");
    // Run until the master ends the stream; the SDK then exits the process.
    worker.closed().await;
    Ok(())
}
