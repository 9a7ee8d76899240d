//! The Egg idiom, agent side: wait for egg-ready, then `send_to_app`.
//!
//! Run it under the master with the matching worker example:
//!
//! ```text
//! cargo build --examples
//! cargo run -p master -- --agent-command target/debug/examples/agent \
//!                        --app-command target/debug/examples/worker
//! ```

use std::time::Duration;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .without_time()
        .with_ansi(false)
        .with_target(false)
        .init();
    let agent = agent_sdk::Agent::connect().await?;
    agent.on("pong", |msg| {
        tracing::info!(from = msg.from.worker_id, data = %String::from_utf8_lossy(&msg.data), "pong");
    });
    agent.ready().await?;
    agent.egg_ready().await?;
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    for round in 0u64.. {
        tick.tick().await;
        let receipt = agent
            .send_to_app("ping", &serde_json::json!({ "round": round }))
            .await?;
        tracing::info!(
            round,
            delivered = receipt.delivered,
            "ping sent to every app worker"
        );
    }
    Ok(())
}
