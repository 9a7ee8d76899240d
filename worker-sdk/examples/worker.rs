//! The Egg idiom, app side: `on` the action the agent sends, and answer it.
//!
//! Run it under the master with the matching agent example:
//!
//! ```text
//! cargo build --examples
//! cargo run -p master -- --agent-command target/debug/examples/agent \
//!                        --app-command target/debug/examples/worker
//! ```

use serde::Deserialize;

#[derive(Deserialize)]
struct Ping {
    round: u64,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .without_time()
        .with_ansi(false)
        .with_target(false)
        .init();
    let worker = worker_sdk::Worker::connect().await?;
    let replier = worker.clone();
    worker.on("ping", move |msg| {
        let Ok(ping) = msg.json::<Ping>() else { return };
        tracing::info!(round = ping.round, "ping");
        let replier = replier.clone();
        tokio::spawn(async move {
            let pong = serde_json::json!({ "round": ping.round, "worker": replier.worker_id() });
            if let Err(e) = replier.send_to_agent("pong", &pong).await {
                tracing::warn!("pong not sent: {e}");
            }
        });
    });
    worker.ready().await?;
    worker.egg_ready().await?;
    // The SDK exits the process when the master closes the stream.
    worker.closed().await;
    Ok(())
}
