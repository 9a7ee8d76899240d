//! `clutch-probe`: a scriptable agent / app worker for the end-to-end tests.
//!
//! The master launches this binary as its agent and as every app worker. It
//! is a real child built on the Rust SDKs (`agent-sdk` / `worker-sdk`), so
//! the tests exercise the same code paths a user's program would. Besides
//! its gRPC stream to the master, it opens a side channel to the test that
//! started the cluster (`PROBE_CONTROL`, a TCP `host:port`) and speaks
//! newline-delimited JSON on it:
//!
//! - probe → test: a `hello` first, then one event per line: every message it
//!   receives (`message`, `egg-ready`, `egg-pids`, `agent-start`), the outcome
//!   of every send it was told to make (`sent`), and fire-and-forget failures
//!   the master reported (`undelivered`);
//! - test → probe: commands (`send`, `ready`, `exit`).
//!
//! Environment (besides the `CLUTCH_*` variables set by the master):
//!
//! | variable | meaning |
//! | --- | --- |
//! | `PROBE_CONTROL` | `host:port` of the test's controller (required) |
//! | `PROBE_ACTIONS` | comma-separated actions to subscribe to |
//! | `PROBE_MANUAL_READY` | `1`: call `ready()` only on the `ready` command |
//! | `PROBE_FAIL_WORKER` / `PROBE_FAIL_CODE` | the worker id (0 = agent) that exits with this code before connecting |

#![forbid(unsafe_code)]

use anyhow::{bail, Context as _};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use clutch::{Client, Message, SendError, SendResult, Target};

/// Events for the controller. Unbounded on purpose, and only because this is
/// a test-only program: the SDK calls message handlers synchronously on its
/// dispatcher task, where we may neither block (`blocking_send` would panic
/// inside the runtime) nor drop events (a test counts every one of them).
/// The controller reads continuously, so the queue stays short in practice.
type Events = mpsc::UnboundedSender<Value>;

/// The SDK face this process was launched as. Both dereference to the shared
/// [`Client`]; the agent keeps its own face for `send_random`.
enum Face {
    Agent(agent_sdk::Agent),
    App(worker_sdk::Worker),
}

impl Face {
    fn client(&self) -> &Client {
        match self {
            Face::Agent(agent) => agent,
            Face::App(worker) => worker,
        }
    }
}

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .without_time()
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();

    // Fail before anything else, as a child that crashes during boot would.
    if let Err(e) = fail_on_purpose() {
        eprintln!("probe: {e:#}");
        std::process::exit(2);
    }

    // One thread is plenty: the probe only relays, and the machine running
    // the suite hosts many clusters at once.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("probe: cannot start the tokio runtime: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = runtime.block_on(run()) {
        eprintln!("probe: {e:#}");
        std::process::exit(1);
    }
}

/// `PROBE_FAIL_WORKER` / `PROBE_FAIL_CODE`: exit with the given code when this
/// process holds that slot. The stderr lines let a test check that the
/// master's report includes the child's last words.
fn fail_on_purpose() -> anyhow::Result<()> {
    let Ok(fail_worker) = std::env::var("PROBE_FAIL_WORKER") else {
        return Ok(());
    };
    let fail_worker: u32 = fail_worker
        .trim()
        .parse()
        .with_context(|| format!("PROBE_FAIL_WORKER={fail_worker:?} is not a worker id"))?;
    let me: u32 = std::env::var(clutch::env::WORKER_ID)
        .context("CLUTCH_WORKER_ID is not set")?
        .trim()
        .parse()
        .context("CLUTCH_WORKER_ID is not a number")?;
    if me != fail_worker {
        return Ok(());
    }
    let code: i32 = std::env::var("PROBE_FAIL_CODE")
        .context("PROBE_FAIL_WORKER is set but PROBE_FAIL_CODE is not")?
        .trim()
        .parse()
        .context("PROBE_FAIL_CODE is not an exit code")?;
    eprintln!("probe: worker {me} was told to fail during startup");
    eprintln!("probe: failing on purpose with code {code}");
    std::process::exit(code);
}

async fn run() -> anyhow::Result<()> {
    let control_addr = std::env::var("PROBE_CONTROL").context("PROBE_CONTROL is not set")?;
    let role = std::env::var(clutch::env::ROLE).context("CLUTCH_ROLE is not set")?;
    let face = match role.as_str() {
        "agent" => Face::Agent(
            agent_sdk::Agent::connect()
                .await
                .context("the agent could not register with the master")?,
        ),
        "app" => Face::App(
            worker_sdk::Worker::connect()
                .await
                .context("the app worker could not register with the master")?,
        ),
        other => bail!("CLUTCH_ROLE={other:?}: expected \"agent\" or \"app\""),
    };
    let client = face.client().clone();
    let identity = client.identity();

    // Subscribe before `ready()`: the SDK keeps messages that arrive before
    // ready() until a handler for their action is registered, and handler
    // registrations are applied before the next frame is read, so nothing
    // the master sends (egg-pids at registration, held messages) is missed.
    let (events, events_rx) = mpsc::unbounded_channel::<Value>();
    let actions = std::env::var("PROBE_ACTIONS").unwrap_or_default();
    for action in actions.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        let events = events.clone();
        client.on(action, move |m| report(&events, message_event(&m)));
    }
    {
        let events = events.clone();
        client.on(agent_sdk::EGG_READY, move |_| {
            report(&events, json!({ "event": "egg-ready" }))
        });
    }
    {
        let events = events.clone();
        client.on(agent_sdk::EGG_PIDS, move |m| {
            let pids = m.json::<Value>().unwrap_or_else(|e| json!(e.to_string()));
            report(&events, json!({ "event": "egg-pids", "pids": pids }));
        });
    }
    {
        let events = events.clone();
        client.on(agent_sdk::AGENT_START, move |_| {
            report(&events, json!({ "event": "agent-start" }))
        });
    }
    {
        let events = events.clone();
        client.on_undelivered(move |r| report(&events, undelivered_event(&r)));
    }

    // The side channel to the test. The writer sends `hello` before any
    // queued event, so the controller can tag everything that follows.
    let control = TcpStream::connect(&control_addr)
        .await
        .with_context(|| format!("cannot reach the test controller at {control_addr}"))?;
    control.set_nodelay(true).ok();
    let (control_read, control_write) = control.into_split();
    let hello = json!({
        "event": "hello",
        "role": identity.role.as_str(),
        "worker_id": identity.worker_id,
        "pid": identity.pid,
        "incarnation": identity.incarnation,
        // Included so that a test can try to register with a used secret.
        "secret": std::env::var(clutch::env::SECRET).unwrap_or_default(),
    });
    let writer = tokio::spawn(write_events(control_write, hello, events_rx));

    let manual_ready = std::env::var("PROBE_MANUAL_READY").is_ok_and(|v| v.trim() == "1");
    if !manual_ready {
        client.ready().await.context("could not send ready")?;
    }

    // Commands run one after another on their own task, in the order the
    // test sent them; only `exit` bypasses the queue so that it takes effect
    // at once even while a long send is in progress.
    let (commands, commands_rx) = mpsc::unbounded_channel::<Value>();
    let executor = tokio::spawn(execute(face, commands_rx, events.clone()));

    let mut lines = BufReader::new(control_read).lines();
    loop {
        let line = match lines.next_line().await {
            Ok(Some(line)) => line,
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(error = %e, "reading from the test controller failed");
                break;
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        let command: Value = match serde_json::from_str(&line) {
            Ok(c) => c,
            Err(e) => {
                report(
                    &events,
                    json!({ "event": "error", "message": format!("bad command {line:?}: {e}") }),
                );
                continue;
            }
        };
        if command["cmd"] == "exit" {
            let code = command["code"].as_i64().unwrap_or(0);
            tracing::info!(code, "exiting on the test's command");
            std::process::exit(i32::try_from(code).unwrap_or(1));
        }
        if commands.send(command).is_err() {
            bail!("the command executor stopped");
        }
    }

    // The controller is gone, which means the test that launched this
    // cluster has ended (or crashed). A probe without a controller has no
    // purpose; exiting keeps a crashed test run from leaving it behind.
    tracing::info!("the test controller closed the connection; exiting");
    executor.abort();
    writer.abort();
    std::process::exit(0);
}

/// Queues an event for the controller. A failure means the writer stopped
/// because the controller is gone; the reader notices that too and exits.
fn report(events: &Events, event: Value) {
    let _ = events.send(event);
}

fn message_event(m: &Message) -> Value {
    let data = match m.json::<Value>() {
        Ok(data) => data,
        // Not JSON: report the raw text so the test can say what came.
        Err(e) => json!({
            "probe_decode_error": e.to_string(),
            "raw": String::from_utf8_lossy(&m.data),
        }),
    };
    json!({
        "event": "message",
        "action": &*m.action,
        "data": data,
        "from_role": m.from.role.as_str(),
        "from_pid": m.from.pid,
        "from_worker_id": m.from.worker_id,
    })
}

fn undelivered_event(r: &SendResult) -> Value {
    let codes: Vec<String> = r
        .undelivered
        .iter()
        .map(|u| format!("{:?}", u.code))
        .collect();
    let messages: Vec<&str> = r.undelivered.iter().map(|u| u.message.as_str()).collect();
    json!({
        "event": "undelivered",
        "id": r.id,
        "action": &*r.action,
        "codes": codes,
        "messages": messages,
        "delivered": r.delivered,
        "held": r.held,
    })
}

/// The single writer of the control socket: events leave in the order they
/// were queued. Flushes only when the queue is momentarily empty, so a burst
/// of ten thousand messages becomes a few large writes.
async fn write_events(
    control: OwnedWriteHalf,
    hello: Value,
    mut events: mpsc::UnboundedReceiver<Value>,
) -> anyhow::Result<()> {
    let mut out = BufWriter::new(control);
    write_line(&mut out, &hello).await?;
    out.flush().await?;
    while let Some(event) = events.recv().await {
        write_line(&mut out, &event).await?;
        while let Ok(event) = events.try_recv() {
            write_line(&mut out, &event).await?;
        }
        out.flush().await?;
    }
    Ok(())
}

async fn write_line(out: &mut BufWriter<OwnedWriteHalf>, event: &Value) -> anyhow::Result<()> {
    let mut line = serde_json::to_vec(event).context("cannot encode an event")?;
    line.push(b'\n');
    out.write_all(&line)
        .await
        .context("cannot write to the test controller")
}

/// Runs the test's commands in order.
async fn execute(face: Face, mut commands: mpsc::UnboundedReceiver<Value>, events: Events) {
    while let Some(command) = commands.recv().await {
        let outcome = match command["cmd"].as_str() {
            Some("ready") => face
                .client()
                .ready()
                .await
                .map(|()| report(&events, json!({ "event": "ready-sent" })))
                .map_err(anyhow::Error::from),
            Some("send") => send(&face, &command, &events).await,
            other => Err(anyhow::anyhow!("unknown command {other:?}")),
        };
        if let Err(e) = outcome {
            report(
                &events,
                json!({ "event": "error", "command": command, "message": format!("{e:#}") }),
            );
        }
    }
}

/// The `send` command: `count` sends of `action` along `route`, each either
/// confirmed by the master (`confirm`, one `sent` event per send) or emitted
/// (one `sent` event after all of them).
async fn send(face: &Face, command: &Value, events: &Events) -> anyhow::Result<()> {
    let id = command["id"].clone();
    let action = command["action"]
        .as_str()
        .context("send: \"action\" must be a string")?;
    let route = command["route"]
        .as_str()
        .context("send: \"route\" must be a string")?;
    let target = match route {
        "broadcast" => Target::Broadcast,
        "apps" => Target::Apps,
        "agent" => Target::Agent,
        "random" => Target::Random,
        "pid" => {
            let pid = command["pid"]
                .as_u64()
                .and_then(|p| u32::try_from(p).ok())
                .context("send: route \"pid\" needs a u32 \"pid\"")?;
            Target::Pid(pid)
        }
        other => bail!("send: unknown route {other:?}"),
    };
    let count = command["count"].as_u64().unwrap_or(1);
    let confirm = command["confirm"].as_bool().unwrap_or(true);
    let seq = command["seq"].as_bool().unwrap_or(false);
    let data = &command["data"];
    let client = face.client();

    for i in 0..count {
        let payload = if seq {
            json!({ "seq": i, "data": data })
        } else {
            data.clone()
        };
        if confirm {
            let result = match (face, target) {
                // Egg's sendRandom on the agent is the agent face's call.
                (Face::Agent(agent), Target::Random) => agent.send_random(action, &payload).await,
                _ => client.send(target, action, &payload).await,
            };
            let event = match result {
                Ok(receipt) => json!({
                    "event": "sent",
                    "id": id,
                    "ok": true,
                    "delivered": receipt.delivered,
                    "held": receipt.held,
                }),
                Err(e) => json!({
                    "event": "sent",
                    "id": id,
                    "ok": false,
                    "code": error_code(&e),
                    "message": e.to_string(),
                }),
            };
            report(events, event);
        } else if let Err(e) = client.emit(target, action, &payload).await {
            report(
                events,
                json!({
                    "event": "sent",
                    "id": id,
                    "ok": false,
                    "code": error_code(&e),
                    "message": e.to_string(),
                    "count": i,
                }),
            );
            return Ok(());
        }
    }
    if !confirm {
        report(
            events,
            json!({ "event": "sent", "id": id, "ok": true, "count": count }),
        );
    }
    Ok(())
}

/// The gRPC code of a failed send as its Rust name ("NotFound"), or the kind
/// of local failure when the master reported none.
fn error_code(e: &SendError) -> String {
    match e.code() {
        Some(code) => format!("{code:?}"),
        None => match e {
            SendError::Encode { .. } => "Encode".to_owned(),
            SendError::Disconnected => "Disconnected".to_owned(),
            SendError::Undelivered { .. } => "Unknown".to_owned(),
        },
    }
}
