//! The Rust conformance worker, built on `worker-sdk` like any Rust app
//! worker. It speaks the same command protocol as the Python, Node and Go
//! conformance workers (see README.md in this folder).
//!
//! It lives in the test binary: the harness launches this very executable
//! with `--exact rust_conformance_worker_process` and
//! `CLUTCH_CONFORMANCE_RUST_WORKER=1`, and that test function hands control
//! to [`main`], which never returns (the SDK ends the process).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use tokio::sync::mpsc;
use worker_sdk::{Message, Receipt, SendError, Target, Worker};

const COMMAND: &str = "conformance.command";
const EVENT: &str = "conformance.event";

type Reports = mpsc::UnboundedSender<Value>;

/// Counts of a high-volume action's messages, checked in the worker so that
/// a flood needs no report per message: count, in order, first out of order.
type Tallies = Arc<Mutex<HashMap<String, (u64, bool, Value)>>>;

fn tally(w: &Worker, tallies: &Tallies, action: &str) {
    tallies
        .lock()
        .expect("tallies")
        .insert(action.to_owned(), (0, true, Value::Null));
    let tallies = tallies.clone();
    let name = action.to_owned();
    w.on(action, move |m| {
        let data = m.json::<Value>().unwrap_or(Value::Null);
        let mut all = tallies.lock().expect("tallies");
        let t = all.get_mut(&name).expect("registered");
        if data["seq"].as_u64() != Some(t.0) && t.1 {
            t.1 = false;
            t.2 = json!({ "index": t.0, "data": data });
        }
        t.0 += 1;
    });
}

/// Runs the worker and exits the process.
pub fn main() -> ! {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .without_time()
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    match runtime.block_on(run()) {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("rust conformance worker: {e:#}");
            std::process::exit(1)
        }
    }
}

fn message_event(m: &Message, handler: &str) -> Value {
    let data = m.json::<Value>().unwrap_or_else(
        |e| json!({ "decode_error": e.to_string(), "raw": String::from_utf8_lossy(&m.data) }),
    );
    json!({
        "event": "message",
        "handler": handler,
        "action": &*m.action,
        "data": data,
        "from_role": m.from.role.as_str(),
        "from_pid": m.from.pid,
        "from_worker_id": m.from.worker_id,
    })
}

fn sent_event(id: &Value, result: Result<Receipt, SendError>) -> Value {
    match result {
        Ok(r) => {
            json!({ "event": "sent", "id": id, "ok": true, "delivered": r.delivered, "held": r.held })
        }
        // The canonical gRPC number, from the SDK's own error.
        Err(e) => json!({
            "event": "sent",
            "id": id,
            "ok": false,
            "code": e.code().map(|c| c as i32),
            "code_name": e.code().map(|c| format!("{c:?}")),
            "message": e.to_string(),
        }),
    }
}

fn watch(worker: &Worker, reports: &Reports, action: &str, handler: &'static str) {
    let reports = reports.clone();
    if handler == "once" {
        worker.once(action, move |m| {
            let _ = reports.send(message_event(&m, handler));
        });
    } else {
        worker.on(action, move |m| {
            let _ = reports.send(message_event(&m, handler));
        });
    }
}

async fn run() -> anyhow::Result<()> {
    let worker = Worker::connect().await?;
    // Unbounded on purpose (a test program): SDK handlers run on its
    // dispatcher and must neither block nor drop a report.
    let (reports, mut reports_rx) = mpsc::unbounded_channel::<Value>();

    // Handlers first, before ready(): nothing the master sends is missed.
    let actions = std::env::var("CONFORMANCE_ACTIONS").unwrap_or_default();
    for action in actions.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        watch(&worker, &reports, action, "on");
    }
    {
        let r = reports.clone();
        worker.on(worker_sdk::EGG_READY, move |_| {
            let _ = r.send(json!({ "event": "egg-ready" }));
        });
    }
    {
        let r = reports.clone();
        worker.on(worker_sdk::EGG_PIDS, move |m| {
            let pids = m.json::<Value>().unwrap_or(Value::Null);
            let _ = r.send(json!({ "event": "egg-pids", "pids": pids }));
        });
    }
    {
        let r = reports.clone();
        worker.on(worker_sdk::AGENT_START, move |_| {
            let _ = r.send(json!({ "event": "agent-start" }));
        });
    }
    {
        let r = reports.clone();
        worker.on_undelivered(move |result| {
            let codes: Vec<i32> = result.undelivered.iter().map(|u| u.code as i32).collect();
            let messages: Vec<&str> = result
                .undelivered
                .iter()
                .map(|u| u.message.as_str())
                .collect();
            let _ = r.send(json!({
                "event": "undelivered",
                "action": &*result.action,
                "codes": codes,
                "messages": messages,
                "delivered": result.delivered,
                "held": result.held,
            }));
        });
    }
    let (commands, mut commands_rx) = mpsc::unbounded_channel::<Value>();
    worker.on(COMMAND, move |m| {
        let _ = commands.send(m.json::<Value>().unwrap_or(Value::Null));
    });
    {
        let w = worker.clone();
        worker.on_shutdown(move || async move {
            let grace = w.shutdown_notice().await.map(|d| d.as_millis() as u64);
            // Awaited, so the agent has it before this process exits.
            if let Err(e) = w
                .send_to_agent(EVENT, &json!({ "event": "shutdown", "grace_ms": grace }))
                .await
            {
                eprintln!("rust conformance worker: shutdown report: {e}");
            }
        });
    }

    let id = worker.identity();
    let _ = reports.send(json!({
        "event": "hello",
        "lang": "rust",
        "role": id.role.as_str(),
        "worker_id": id.worker_id,
        "pid": id.pid,
        "master_pid": id.master_pid,
        "workers": id.workers,
        "incarnation": id.incarnation,
    }));

    {
        let w = worker.clone();
        tokio::spawn(async move {
            // Numbered, so that the controller can drop a report that the
            // master re-delivered to a restarted agent (at-least-once across
            // an agent's incarnations, with acks).
            let mut n = 0u64;
            while let Some(mut event) = reports_rx.recv().await {
                n += 1;
                event["n"] = json!(n);
                if w.emit(Target::Agent, EVENT, &event).await.is_err() {
                    break;
                }
            }
        });
    }
    {
        let w = worker.clone();
        let reports = reports.clone();
        let tallies = Tallies::default();
        tokio::spawn(async move {
            while let Some(command) = commands_rx.recv().await {
                execute(&w, &reports, &tallies, command).await;
            }
        });
    }

    let manual = std::env::var("CONFORMANCE_MANUAL_READY").is_ok_and(|v| v.trim() == "1");
    if !manual {
        worker.ready().await?;
    }
    // The SDK exits the process at shutdown or when the master goes.
    worker.closed().await;
    Ok(())
}

async fn execute(w: &Worker, reports: &Reports, tallies: &Tallies, cmd: Value) {
    let id = cmd["id"].clone();
    let report = |v: Value| {
        let _ = reports.send(v);
    };
    match cmd["op"].as_str().unwrap_or("") {
        "ready" => match w.ready().await {
            Ok(()) => report(json!({ "event": "ready-sent", "id": id })),
            Err(e) => report(json!({ "event": "error", "id": id, "message": e.to_string() })),
        },
        "send" => send(w, reports, &cmd).await,
        op @ ("on" | "once") => {
            let action = cmd["action"].as_str().unwrap_or("");
            watch(w, reports, action, if op == "once" { "once" } else { "on" });
            report(json!({ "event": "subscribed", "id": id, "action": action, "handler": op }));
        }
        "connect" => {
            // A second registration, expected to be refused: the code comes
            // from the SDK's ConnectError.
            let secret = match cmd["secret"].as_str() {
                Some("own") => std::env::var(clutch::env::SECRET).unwrap_or_default(),
                other => other.unwrap_or("").to_owned(),
            };
            let role = if cmd["role"] == "agent" {
                clutch::Role::Agent
            } else {
                clutch::Role::App
            };
            let options = clutch::ConnectOptions {
                addr: std::env::var(clutch::env::ADDR).unwrap_or_default(),
                secret,
                role,
                exit_on_disconnect: false,
                acks: true,
                send_buffer: 16,
                idle_spin: std::time::Duration::ZERO,
            };
            match clutch::Client::connect(options).await {
                Ok(_) => report(json!({ "event": "connect", "id": id, "ok": true })),
                Err(e) => {
                    let code = match &e {
                        clutch::ConnectError::Rejected { code, .. } => Some(*code),
                        _ => None,
                    };
                    report(json!({
                        "event": "connect",
                        "id": id,
                        "ok": false,
                        "code": code.map(i32::from),
                        "code_name": code.map(|c| format!("{c:?}")),
                        "message": e.to_string(),
                    }));
                }
            }
        }
        "tally" => {
            let action = cmd["action"].as_str().unwrap_or("");
            tally(w, tallies, action);
            report(
                json!({ "event": "subscribed", "id": id, "action": action, "handler": "tally" }),
            );
        }
        "tally-report" => {
            let action = cmd["action"].as_str().unwrap_or("");
            let (count, in_order, first) = tallies
                .lock()
                .expect("tallies")
                .get(action)
                .cloned()
                .unwrap_or((0, true, Value::Null));
            report(json!({
                "event": "tally",
                "id": id,
                "action": action,
                "count": count,
                "in_order": in_order,
                "first_out_of_order": first,
            }));
        }
        "state" => {
            let ident = w.identity();
            report(json!({
                "event": "state",
                "id": id,
                "egg_ready": w.is_egg_ready(),
                "egg_pids": &*w.egg_pids(),
                "role": ident.role.as_str(),
                "worker_id": ident.worker_id,
                "pid": ident.pid,
                "master_pid": ident.master_pid,
                "workers": ident.workers,
                "incarnation": ident.incarnation,
            }));
        }
        "exit" => std::process::exit(cmd["code"].as_i64().unwrap_or(0) as i32),
        other => report(
            json!({ "event": "error", "id": id, "message": format!("unknown op {other:?}") }),
        ),
    }
}

async fn send(w: &Worker, reports: &Reports, cmd: &Value) {
    let id = &cmd["id"];
    let report = |v: Value| {
        let _ = reports.send(v);
    };
    let action = cmd["action"].as_str().unwrap_or("");
    let count = cmd["count"].as_u64().unwrap_or(1);
    let confirm = cmd["confirm"].as_bool().unwrap_or(true);
    let pid = cmd["pid"].as_u64().unwrap_or(0) as u32;
    let route = cmd["route"].as_str().unwrap_or("");
    let target = match route {
        "broadcast" => Target::Broadcast,
        "apps" => Target::Apps,
        "agent" => Target::Agent,
        "random" => Target::Random,
        "pid" => Target::Pid(pid),
        other => {
            report(
                json!({ "event": "error", "id": id, "message": format!("unknown route {other:?}") }),
            );
            return;
        }
    };
    let raw = cmd["raw"]
        .as_str()
        .map(|s| bytes::Bytes::from(s.to_owned()));
    for i in 0..count {
        let data = if cmd["seq"] == true {
            json!({ "seq": i, "data": cmd["data"] })
        } else {
            cmd["data"].clone()
        };
        if !confirm {
            let sent = match &raw {
                Some(raw) => w.emit_bytes(target, action, raw.clone()).await,
                None => w.emit(target, action, &data).await,
            };
            if let Err(e) = sent {
                report(sent_event(id, Err(e)));
                return;
            }
            continue;
        }
        let result = match (&raw, route) {
            (Some(raw), _) => w.send_bytes(target, action, raw.clone()).await,
            (None, "broadcast") => w.broadcast(action, &data).await,
            (None, "apps") => w.send_to_app(action, &data).await,
            (None, "agent") => w.send_to_agent(action, &data).await,
            // An app worker's sendRandom: Egg's "to the agent".
            (None, "random") => w.send(Target::Random, action, &data).await,
            (None, _) => w.send_to(pid, action, &data).await,
        };
        report(sent_event(id, result));
    }
    if !confirm {
        report(json!({ "event": "sent", "id": id, "ok": true, "count": count }));
    }
}
