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
//!   of every send it was told to make (`sent`), fire-and-forget failures
//!   the master reported (`undelivered`), the end of a tick series
//!   (`ticked`), the master's shutdown notice (`shutdown-notice`, from an
//!   `on_shutdown` hook; with `PROBE_TALLY_ACTIONS` it carries the `tally`
//!   as of the notice), `hanging` / `failing` when told to misbehave, and
//!   `error` for a command it could not run;
//! - test → probe: commands, one JSON object per line:
//!   - `{"cmd":"ready"}`: call `ready()` (with `PROBE_MANUAL_READY`);
//!   - `{"cmd":"send","id","route","pid","action","data","count","confirm","seq"}`:
//!     `count` sends, each confirmed (one `sent` per send) or emitted (one
//!     `sent` after all); `seq` wraps the i-th payload as `{"seq":i,"data":…}`;
//!   - `{"cmd":"tick","id","route","pid","action","every_ms","count"}`: emits
//!     `{"seq":i}` (i = 0, 1, …) every `every_ms` on its own task, so other
//!     commands keep running meanwhile, until `count` ticks (no `count`: until
//!     stopped); then reports `{"event":"ticked","id","count":<ticks emitted>}`;
//!   - `{"cmd":"tick-stop","id"}`: stops that tick series (it reports `ticked`);
//!   - `{"cmd":"exit","code"}`: exits at once, bypassing the command queue.
//!   - `{"cmd":"tally","id"}`: reports `{"event":"tally","id","messages":[…],"undelivered":[…]}`:
//!     per (action, sender pid) of a `PROBE_TALLY_ACTIONS` action the `count`
//!     of messages, the `first` and `last` `seq` (payloads `{"seq":i,…}`),
//!     `decreases` (a seq not above the previous: order broken or a
//!     duplicate) and `jumps` (a seq more than one above the previous); per
//!     (action, code, worker id) the `count` of undelivered reports and the
//!     first reason;
//!   - `{"cmd":"register"}`: only for a probe selected by
//!     `PROBE_DEFER_REGISTER_WORKER`, before it registered: register now.
//!
//! Environment (besides the `CLUTCH_*` variables set by the master):
//!
//! | variable | meaning |
//! | --- | --- |
//! | `PROBE_CONTROL` | `host:port` of the test's controller (required) |
//! | `PROBE_ACTIONS` | comma-separated actions to subscribe to |
//! | `PROBE_MANUAL_READY` | `1`: call `ready()` only on the `ready` command |
//! | `PROBE_FAIL_WORKER` / `PROBE_FAIL_CODE` | the worker id (0 = agent) that exits with this code before connecting |
//! | `PROBE_FAIL_INCARNATIONS` | which incarnations of `PROBE_FAIL_WORKER` fail (see below); unset: every one |
//! | `PROBE_FAIL_STAGE` | `start` (default): fail before connecting to the master; `registered`: register, say hello, report `failing`, then exit |
//! | `PROBE_HANG_WORKER` | the worker id that registers and says hello but never calls `ready()` (reports `hanging`) |
//! | `PROBE_HANG_INCARNATIONS` | which incarnations of `PROBE_HANG_WORKER` hang; unset: every one |
//! | `PROBE_SYNC_REPORTS` | `1`: write every event to the control socket synchronously, inside the message handler (see below) |
//! | `PROBE_SHUTDOWN_DELAY_MS` | how long the `on_shutdown` hook takes: `200` for every process, or `1=200,2=200` per worker id |
//! | `PROBE_APP_GATE` | a file path: app workers wait for it to exist before they connect to the master (lets a test keep slots unregistered for as long as it needs) |
//! | `PROBE_STAY_ON_DISCONNECT` | `1`: do not exit when the stream to the master breaks (a stuck child; only the kernel's parent-death signal or the controller ends it) |
//! | `PROBE_STUCK_WORKER` | the worker id whose message handler blocks forever (the whole probe stops reading its stream: a stuck consumer); it reports the message, then `stuck`, then blocks |
//! | `PROBE_STUCK_INCARNATIONS` | which incarnations of `PROBE_STUCK_WORKER` get stuck; unset: every one |
//! | `PROBE_STUCK_ACTION` | the action whose first message makes it stuck; unset: the first message of any subscribed action |
//! | `PROBE_SLOW_WORKER` / `PROBE_SLOW_US` | the worker id whose message handler takes this many microseconds per message (blocking: a slow consumer that keeps reading) |
//! | `PROBE_DEFER_REGISTER_WORKER` | the worker id that says `hello` (with `"registered": false`, its pid, incarnation and secret from the environment) *before* it registers, then waits for the `register` command; once registered it reports `registered` and goes on as usual. Lets a test use the secret of a slot that is spawned but not registered |
//! | `PROBE_TALLY_ACTIONS` | comma-separated actions whose messages (and `undelivered` reports) are counted instead of reported one by one, for floods of hundreds of thousands; the `tally` command reports the counts |
//! | `PROBE_DEFER_REGISTER_INCARNATIONS` | which incarnations of `PROBE_DEFER_REGISTER_WORKER` defer; unset: every one |
//!
//! Incarnation sets (`*_INCARNATIONS`) are comma-separated items, each `N`
//! (that one), `N-` (N and later) or `N-M` (N to M): e.g. `2`, `2-`, `1,3-4`.
//!
//! **Reporting.** By default events are queued to a writer thread that
//! batches them, which is fast for floods of messages. The SDK acknowledges a
//! message once its handler returns, so with queued reports a `kill -9` can
//! lose the report of a message the master already counts as handled. With
//! `PROBE_SYNC_REPORTS=1` the handler writes its event line to the socket
//! (a blocking loopback write) before it returns: "acknowledged" then
//! implies "reported to the test", which a zero-loss test needs.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

use clutch::{Client, ConnectOptions, Message, Role, SendError, SendResult, Target};

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
    match fail_code(Stage::Start) {
        Ok(None) => {}
        Ok(Some(code)) => fail_now(Stage::Start, code),
        Err(e) => {
            eprintln!("probe: {e:#}");
            std::process::exit(2);
        }
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

// ---- misbehaving on purpose ------------------------------------------------------

/// When a failing probe fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Before connecting to the master.
    Start,
    /// After registering and saying hello, before `ready()`.
    Registered,
}

/// A set of incarnations: `N`, `N-`, `N-M` items, comma-separated.
fn in_incarnations(spec: &str, incarnation: u32) -> anyhow::Result<bool> {
    for item in spec.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let number = |s: &str| -> anyhow::Result<u32> {
            s.trim()
                .parse()
                .with_context(|| format!("{item:?} is not N, N- or N-M"))
        };
        let hit = match item.split_once('-') {
            None => incarnation == number(item)?,
            Some((from, "")) => incarnation >= number(from)?,
            Some((from, to)) => (number(from)?..=number(to)?).contains(&incarnation),
        };
        if hit {
            return Ok(true);
        }
    }
    Ok(false)
}

fn env_u32(name: &str) -> anyhow::Result<u32> {
    std::env::var(name)
        .with_context(|| format!("{name} is not set"))?
        .trim()
        .parse()
        .with_context(|| format!("{name} is not a number"))
}

/// True when `PROBE_<what>_WORKER` names this slot and
/// `PROBE_<what>_INCARNATIONS` (unset: all) includes this incarnation.
fn selected(what: &str) -> anyhow::Result<bool> {
    let worker_var = format!("PROBE_{what}_WORKER");
    let Ok(worker) = std::env::var(&worker_var) else {
        return Ok(false);
    };
    let worker: u32 = worker
        .trim()
        .parse()
        .with_context(|| format!("{worker_var}={worker:?} is not a worker id"))?;
    if env_u32(clutch::env::WORKER_ID)? != worker {
        return Ok(false);
    }
    let incarnations_var = format!("PROBE_{what}_INCARNATIONS");
    match std::env::var(&incarnations_var) {
        Err(_) => Ok(true),
        Ok(spec) => in_incarnations(&spec, env_u32(clutch::env::INCARNATION)?)
            .with_context(|| format!("{incarnations_var}={spec:?}")),
    }
}

/// `PROBE_FAIL_*`: the exit code, when this process is the one selected
/// and `stage` is its stage.
fn fail_code(stage: Stage) -> anyhow::Result<Option<i32>> {
    let configured = match std::env::var("PROBE_FAIL_STAGE").as_deref().map(str::trim) {
        Err(_) | Ok("") | Ok("start") => Stage::Start,
        Ok("registered") => Stage::Registered,
        Ok(other) => bail!("PROBE_FAIL_STAGE={other:?}: expected \"start\" or \"registered\""),
    };
    if configured != stage || !selected("FAIL")? {
        return Ok(None);
    }
    let code: i32 = std::env::var("PROBE_FAIL_CODE")
        .context("PROBE_FAIL_WORKER is set but PROBE_FAIL_CODE is not")?
        .trim()
        .parse()
        .context("PROBE_FAIL_CODE is not an exit code")?;
    Ok(Some(code))
}

/// Exits with `code`, saying why on stderr: the lines let a test check that
/// the master's report includes the child's last words.
fn fail_now(stage: Stage, code: i32) -> ! {
    let me = std::env::var(clutch::env::WORKER_ID).unwrap_or_default();
    let incarnation = std::env::var(clutch::env::INCARNATION).unwrap_or_default();
    match stage {
        Stage::Start => eprintln!("probe: worker {me} was told to fail during startup"),
        Stage::Registered => eprintln!("probe: worker {me} was told to fail after registering"),
    }
    eprintln!("probe: worker {me} incarnation {incarnation} is failing on purpose");
    eprintln!("probe: failing on purpose with code {code}");
    std::process::exit(code);
}

/// `PROBE_SHUTDOWN_DELAY_MS` for this worker: `ms`, or `id=ms,id=ms`.
fn shutdown_delay(worker_id: u32) -> anyhow::Result<Duration> {
    let Ok(spec) = std::env::var("PROBE_SHUTDOWN_DELAY_MS") else {
        return Ok(Duration::ZERO);
    };
    let ms = |s: &str| -> anyhow::Result<u64> {
        s.trim()
            .parse()
            .with_context(|| format!("PROBE_SHUTDOWN_DELAY_MS={spec:?}: {s:?} is not a number"))
    };
    if !spec.contains('=') {
        return Ok(Duration::from_millis(ms(&spec)?));
    }
    for item in spec.split(',').filter(|i| !i.trim().is_empty()) {
        let (id, value) = item
            .split_once('=')
            .with_context(|| format!("PROBE_SHUTDOWN_DELAY_MS={spec:?}: {item:?} is not id=ms"))?;
        if ms(id)? == u64::from(worker_id) {
            return Ok(Duration::from_millis(ms(value)?));
        }
    }
    Ok(Duration::ZERO)
}

fn flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v.trim() == "1")
}

// ---- reporting to the test --------------------------------------------------------

/// Where events go. Cheap to clone; see the module docs for the two modes.
#[derive(Clone)]
struct Reporter(Arc<Mode>);

enum Mode {
    /// Events are queued to a writer thread that batches them.
    Queued {
        tx: std::sync::mpsc::Sender<Out>,
        /// Taken by `attach`, which starts the writer thread.
        rx: Mutex<Option<std::sync::mpsc::Receiver<Out>>>,
    },
    /// Events are written by the caller, under the lock.
    Sync(Mutex<SyncState>),
}

enum Out {
    Event(Value),
    /// Answered once everything queued before it is written.
    Flush(oneshot::Sender<()>),
}

struct SyncState {
    /// `None` until the control connection is up (and after a write error).
    socket: Option<std::net::TcpStream>,
    /// Events from before the control connection was up.
    pending: Vec<Value>,
}

fn line(event: &Value) -> Vec<u8> {
    let mut line = serde_json::to_vec(event).unwrap_or_else(|e| {
        format!("{{\"event\":\"error\",\"message\":\"cannot encode an event: {e}\"}}").into_bytes()
    });
    line.push(b'\n');
    line
}

impl Reporter {
    fn new(sync: bool) -> Reporter {
        let mode = if sync {
            Mode::Sync(Mutex::new(SyncState {
                socket: None,
                pending: Vec::new(),
            }))
        } else {
            let (tx, rx) = std::sync::mpsc::channel();
            Mode::Queued {
                tx,
                rx: Mutex::new(Some(rx)),
            }
        };
        Reporter(Arc::new(mode))
    }

    /// Reports an event. A failure means the controller is gone; the
    /// control reader notices that too and exits.
    fn report(&self, event: Value) {
        match &*self.0 {
            Mode::Queued { tx, .. } => {
                let _ = tx.send(Out::Event(event));
            }
            Mode::Sync(state) => {
                let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
                match &mut state.socket {
                    Some(socket) => {
                        if socket.write_all(&line(&event)).is_err() {
                            state.socket = None;
                        }
                    }
                    None => state.pending.push(event),
                }
            }
        }
    }

    /// Starts writing to the controller: `hello` first, then what was
    /// reported before, then everything else in order.
    fn attach(&self, socket: std::net::TcpStream, hello: Value) {
        match &*self.0 {
            Mode::Queued { rx, .. } => {
                let Some(rx) = rx.lock().unwrap_or_else(|p| p.into_inner()).take() else {
                    return;
                };
                std::thread::spawn(move || write_events(socket, hello, rx));
            }
            Mode::Sync(state) => {
                let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
                let mut out = line(&hello);
                for event in std::mem::take(&mut state.pending) {
                    out.extend_from_slice(&line(&event));
                }
                let mut socket = socket;
                if socket.write_all(&out).is_ok() {
                    state.socket = Some(socket);
                }
            }
        }
    }

    /// Waits until everything reported so far has been written (before the
    /// process exits on its own).
    async fn flush(&self) {
        if let Mode::Queued { tx, .. } = &*self.0 {
            let (done, wait) = oneshot::channel();
            if tx.send(Out::Flush(done)).is_ok() {
                let _ = tokio::time::timeout(Duration::from_secs(5), wait).await;
            }
        }
    }
}

/// The writer thread of the queued mode: events leave in the order they
/// were queued. Flushes only when the queue is momentarily empty, so a burst
/// of ten thousand messages becomes a few large writes.
fn write_events(socket: std::net::TcpStream, hello: Value, events: std::sync::mpsc::Receiver<Out>) {
    let mut out = BufWriter::new(socket);
    if out.write_all(&line(&hello)).is_err() || out.flush().is_err() {
        return;
    }
    let mut flushed = Vec::new();
    while let Ok(first) = events.recv() {
        let mut next = Some(first);
        while let Some(item) = next {
            match item {
                Out::Event(event) => {
                    if out.write_all(&line(&event)).is_err() {
                        return;
                    }
                }
                Out::Flush(done) => flushed.push(done),
            }
            next = events.try_recv().ok();
        }
        if out.flush().is_err() {
            return;
        }
        for done in flushed.drain(..) {
            let _ = done.send(());
        }
    }
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

fn failures_json(undelivered: &[clutch::Undelivered]) -> Value {
    undelivered
        .iter()
        .map(|u| {
            json!({
                "code": format!("{:?}", u.code),
                "message": u.message,
                "pid": u.pid,
                "worker_id": u.worker_id,
                "role": u.role.map(Role::as_str),
            })
        })
        .collect()
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
        "failures": failures_json(&r.undelivered),
        "delivered": r.delivered,
        "held": r.held,
    })
}

// ---- the probe ------------------------------------------------------------------

async fn run() -> anyhow::Result<()> {
    let control_addr = std::env::var("PROBE_CONTROL").context("PROBE_CONTROL is not set")?;
    let role = std::env::var(clutch::env::ROLE).context("CLUTCH_ROLE is not set")?;
    let stay = flag("PROBE_STAY_ON_DISCONNECT");
    let options = |role: Role| -> anyhow::Result<ConnectOptions> {
        let mut options = ConnectOptions::from_env(role)?;
        if stay {
            options.exit_on_disconnect = false;
        }
        Ok(options)
    };
    if let (Ok(gate), "app") = (std::env::var("PROBE_APP_GATE"), role.as_str()) {
        // A test-only gate: the test creates the file when the app workers
        // may register. Polling a file is fine here; the test itself waits
        // on events.
        while !std::path::Path::new(&gate).exists() {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
    let reporter = Reporter::new(flag("PROBE_SYNC_REPORTS"));
    // `PROBE_DEFER_REGISTER_*`: the control channel comes up first, with a
    // hello built from the environment, and the probe registers only on the
    // test's `register` command.
    let deferred = if selected("DEFER_REGISTER")? {
        let control = std::net::TcpStream::connect(&control_addr)
            .with_context(|| format!("cannot reach the test controller at {control_addr}"))?;
        control.set_nodelay(true).ok();
        let writer = control
            .try_clone()
            .context("cannot clone the control socket")?;
        let incarnation = env_u32(clutch::env::INCARNATION)?;
        let hello = json!({
            "event": "hello",
            "role": role,
            "worker_id": env_u32(clutch::env::WORKER_ID)?,
            "pid": std::process::id(),
            "incarnation": incarnation,
            "env_incarnation": incarnation,
            "secret": std::env::var(clutch::env::SECRET).unwrap_or_default(),
            "registered": false,
        });
        reporter.attach(writer, hello);
        // Nothing else runs on this runtime yet: a blocking read is fine.
        wait_for_register(&control, &reporter)?;
        Some(control)
    } else {
        None
    };
    let face = match role.as_str() {
        "agent" => Face::Agent(
            agent_sdk::Agent::connect_with(options(Role::Agent)?)
                .await
                .context("the agent could not register with the master")?,
        ),
        "app" => Face::App(
            worker_sdk::Worker::connect_with(options(Role::App)?)
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
    let actions = std::env::var("PROBE_ACTIONS").unwrap_or_default();
    let misbehaviour = Arc::new(Misbehaviour::from_env()?);
    let tally = Arc::new(Mutex::new(Tally::from_env()));
    for action in actions.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        let reporter = reporter.clone();
        let misbehaviour = misbehaviour.clone();
        let tally = tally.clone();
        let tallied = lock(&tally).actions.contains(action);
        client.on(action, move |m| {
            if tallied {
                lock(&tally).message(&m);
            } else {
                reporter.report(message_event(&m));
            }
            misbehaviour.after_message(&m, &reporter);
        });
    }
    {
        let reporter = reporter.clone();
        client.on(agent_sdk::EGG_READY, move |_| {
            reporter.report(json!({ "event": "egg-ready" }))
        });
    }
    {
        let reporter = reporter.clone();
        client.on(agent_sdk::EGG_PIDS, move |m| {
            let pids = m.json::<Value>().unwrap_or_else(|e| json!(e.to_string()));
            reporter.report(json!({ "event": "egg-pids", "pids": pids }));
        });
    }
    {
        let reporter = reporter.clone();
        client.on(agent_sdk::AGENT_START, move |_| {
            reporter.report(json!({ "event": "agent-start" }))
        });
    }
    {
        let reporter = reporter.clone();
        let tally = tally.clone();
        client.on_undelivered(move |r| {
            let mut tally = lock(&tally);
            if tally.actions.contains(&*r.action) {
                tally.undelivered(&r);
            } else {
                drop(tally);
                reporter.report(undelivered_event(&r));
            }
        });
    }
    {
        // The SDK runs this hook on the master's shutdown notice and exits
        // 0 after it; `shutdown_notice()` resolves at once by then.
        let reporter = reporter.clone();
        let notice = client.clone();
        let delay = shutdown_delay(identity.worker_id)?;
        let tally = tally.clone();
        client.on_shutdown(move || async move {
            let grace = notice.shutdown_notice().await;
            let mut event = json!({
                "event": "shutdown-notice",
                "grace_ms": grace.map(|g| u64::try_from(g.as_millis()).unwrap_or(u64::MAX)),
                "delay_ms": u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            });
            // Every message written before the notice has been handled by
            // now (the SDK dispatches in order): the tally is final for them.
            let counts = {
                let tally = lock(&tally);
                (!tally.actions.is_empty()).then(|| tally.to_json())
            };
            if let Some(counts) = counts {
                event["tally"] = counts;
            }
            reporter.report(event);
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            reporter.flush().await;
        });
    }

    // The side channel to the test: `hello` goes out before any event, so
    // the controller can tag everything that follows. A blocking socket:
    // written under a lock or by the writer thread, read by its own thread.
    let control_read = match deferred {
        Some(control) => {
            // The hello went out before registering; say who the master
            // says we are now.
            reporter.report(json!({
                "event": "registered",
                "role": identity.role.as_str(),
                "worker_id": identity.worker_id,
                "pid": identity.pid,
                "incarnation": identity.incarnation,
            }));
            control
        }
        None => connect_control(&control_addr, &identity, &reporter)?,
    };

    // Commands run one after another on their own task, in the order the
    // test sent them; only `exit` bypasses the queue (the reader thread
    // handles it) so that it takes effect at once even during a long send.
    let (commands, commands_rx) = mpsc::unbounded_channel::<Value>();
    {
        let reporter = reporter.clone();
        std::thread::spawn(move || read_commands(control_read, commands, reporter));
    }

    if let Some(code) = fail_code(Stage::Registered)? {
        reporter.report(json!({ "event": "failing", "code": code }));
        reporter.flush().await;
        fail_now(Stage::Registered, code);
    }

    let manual_ready = flag("PROBE_MANUAL_READY");
    if selected("HANG")? {
        tracing::info!("told to hang: never calling ready()");
        reporter.report(json!({ "event": "hanging" }));
    } else if !manual_ready {
        client.ready().await.context("could not send ready")?;
    }

    execute(face, commands_rx, reporter, tally).await;
    // The reader thread exits the process when the controller goes away;
    // until then there is nothing else to do.
    std::future::pending::<()>().await;
    Ok(())
}

/// Opens the side channel to the test and says `hello` on it; returns the
/// socket to read commands from.
fn connect_control(
    control_addr: &str,
    identity: &clutch::Identity,
    reporter: &Reporter,
) -> anyhow::Result<std::net::TcpStream> {
    let control = std::net::TcpStream::connect(control_addr)
        .with_context(|| format!("cannot reach the test controller at {control_addr}"))?;
    control.set_nodelay(true).ok();
    let control_read = control
        .try_clone()
        .context("cannot clone the control socket")?;
    let hello = json!({
        "event": "hello",
        "role": identity.role.as_str(),
        "worker_id": identity.worker_id,
        "pid": identity.pid,
        "incarnation": identity.incarnation,
        // CLUTCH_INCARNATION as the master set it, to compare with the welcome.
        "env_incarnation": std::env::var(clutch::env::INCARNATION).ok().and_then(|v| v.trim().parse::<u32>().ok()),
        // CLUTCH_IDLE_SPIN_US as this process got it.
        "env_idle_spin_us": std::env::var(clutch::env::IDLE_SPIN_US).ok(),
        // Included so that a test can try to register with a used secret.
        "secret": std::env::var(clutch::env::SECRET).unwrap_or_default(),
    });
    reporter.attach(control, hello);
    Ok(control_read)
}

/// `PROBE_DEFER_REGISTER_*`: reads command lines (byte by byte, so nothing
/// after the line is consumed) until `register`; `exit` exits.
fn wait_for_register(control: &std::net::TcpStream, reporter: &Reporter) -> anyhow::Result<()> {
    use std::io::Read as _;
    let mut reader = control;
    loop {
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        loop {
            match reader.read(&mut byte) {
                Ok(0) | Err(_) => {
                    // The controller is gone: the test has ended.
                    std::process::exit(0);
                }
                Ok(_) if byte[0] == b'\n' => break,
                Ok(_) => line.push(byte[0]),
            }
        }
        let command: Value = match serde_json::from_slice(&line) {
            Ok(c) => c,
            Err(e) => {
                reporter
                    .report(json!({ "event": "error", "message": format!("bad command: {e}") }));
                continue;
            }
        };
        match command["cmd"].as_str() {
            Some("register") => return Ok(()),
            Some("exit") => {
                let code = command["code"].as_i64().unwrap_or(0);
                std::process::exit(i32::try_from(code).unwrap_or(1));
            }
            _ => reporter.report(json!({
                "event": "error",
                "command": command,
                "message": "not registered yet: only `register` and `exit` are accepted",
            })),
        }
    }
}

/// `PROBE_STUCK_*` and `PROBE_SLOW_*`: what this probe's message handler
/// does after reporting a message.
struct Misbehaviour {
    /// Get stuck on the first message of this action (`Some(None)`: any).
    stuck: Option<Option<String>>,
    /// Block this long per message.
    slow: Option<Duration>,
}

impl Misbehaviour {
    fn from_env() -> anyhow::Result<Misbehaviour> {
        let stuck = if selected("STUCK")? {
            Some(
                std::env::var("PROBE_STUCK_ACTION")
                    .ok()
                    .filter(|a| !a.trim().is_empty()),
            )
        } else {
            None
        };
        let slow = if selected("SLOW")? {
            Some(Duration::from_micros(u64::from(env_u32("PROBE_SLOW_US")?)))
        } else {
            None
        };
        Ok(Misbehaviour { stuck, slow })
    }

    fn after_message(&self, m: &Message, reporter: &Reporter) {
        if let Some(action) = &self.stuck {
            if action.as_deref().is_none_or(|a| a == &*m.action) {
                tracing::info!(action = %m.action, "told to get stuck: blocking the message handler forever");
                reporter.report(json!({ "event": "stuck", "action": &*m.action }));
                // The probe runs on one thread: blocking it here stops the
                // whole process from reading its stream, as a stuck
                // handler in a real worker would. Only a signal ends it.
                loop {
                    std::thread::park();
                }
            }
        }
        if let Some(delay) = self.slow {
            std::thread::sleep(delay);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `PROBE_TALLY_ACTIONS`: counts instead of one event per message.
#[derive(Default)]
struct Tally {
    /// The tallied actions.
    actions: std::collections::HashSet<String>,
    /// Per (action, sender pid).
    messages: std::collections::BTreeMap<(String, u32), Series>,
    /// Per (action, code, worker id): how many, and the first reason.
    undelivered: std::collections::BTreeMap<(String, String, u32), (u64, String)>,
}

/// The messages of one (action, sender pid).
#[derive(Default)]
struct Series {
    count: u64,
    first: Option<u64>,
    last: Option<u64>,
    decreases: u64,
    jumps: u64,
    /// Messages without a `seq`.
    unnumbered: u64,
}

impl Tally {
    fn from_env() -> Tally {
        let actions = std::env::var("PROBE_TALLY_ACTIONS").unwrap_or_default();
        Tally {
            actions: actions
                .split(',')
                .map(str::trim)
                .filter(|a| !a.is_empty())
                .map(str::to_owned)
                .collect(),
            ..Tally::default()
        }
    }

    fn message(&mut self, m: &Message) {
        let series = self
            .messages
            .entry((m.action.to_string(), m.from.pid))
            .or_default();
        series.count += 1;
        let seq = m.json::<Value>().ok().and_then(|v| v["seq"].as_u64());
        let Some(seq) = seq else {
            series.unnumbered += 1;
            return;
        };
        match series.last {
            Some(last) if seq <= last => series.decreases += 1,
            Some(last) if seq > last + 1 => series.jumps += 1,
            _ => {}
        }
        series.first.get_or_insert(seq);
        series.last = Some(seq);
    }

    fn undelivered(&mut self, r: &SendResult) {
        for u in &r.undelivered {
            let entry = self
                .undelivered
                .entry((r.action.to_string(), format!("{:?}", u.code), u.worker_id))
                .or_insert_with(|| (0, u.message.clone()));
            entry.0 += 1;
        }
    }

    fn to_json(&self) -> Value {
        let messages: Vec<Value> = self
            .messages
            .iter()
            .map(|((action, from_pid), s)| {
                json!({
                    "action": action,
                    "from_pid": from_pid,
                    "count": s.count,
                    "first": s.first,
                    "last": s.last,
                    "decreases": s.decreases,
                    "jumps": s.jumps,
                    "unnumbered": s.unnumbered,
                })
            })
            .collect();
        let undelivered: Vec<Value> = self
            .undelivered
            .iter()
            .map(|((action, code, worker_id), (count, message))| {
                json!({
                    "action": action,
                    "code": code,
                    "worker_id": worker_id,
                    "count": count,
                    "message": message,
                })
            })
            .collect();
        json!({ "event": "tally", "messages": messages, "undelivered": undelivered })
    }
}

/// The control reader thread: commands to the executor, `exit` at once.
fn read_commands(
    control: std::net::TcpStream,
    commands: mpsc::UnboundedSender<Value>,
    reporter: Reporter,
) {
    for line in BufReader::new(control).lines() {
        let line = match line {
            Ok(line) => line,
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
                reporter.report(
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
            break;
        }
    }
    // The controller is gone, which means the test that launched this
    // cluster has ended (or crashed). A probe without a controller has no
    // purpose; exiting keeps a crashed test run from leaving it behind.
    tracing::info!("the test controller closed the connection; exiting");
    std::process::exit(0);
}

/// Runs the test's commands in order.
async fn execute(
    face: Face,
    mut commands: mpsc::UnboundedReceiver<Value>,
    reporter: Reporter,
    tally: Arc<Mutex<Tally>>,
) {
    let face = Arc::new(face);
    let mut ticks: HashMap<String, Arc<AtomicBool>> = HashMap::new();
    while let Some(command) = commands.recv().await {
        let outcome = match command["cmd"].as_str() {
            Some("ready") => face
                .client()
                .ready()
                .await
                .map(|()| reporter.report(json!({ "event": "ready-sent" })))
                .map_err(anyhow::Error::from),
            Some("send") => send(&face, &command, &reporter).await,
            Some("tick") => start_ticks(&face, &command, &reporter, &mut ticks),
            Some("tally") => {
                let mut event = lock(&tally).to_json();
                event["id"] = command["id"].clone();
                reporter.report(event);
                Ok(())
            }
            Some("tick-stop") => match ticks.get(&command["id"].to_string()) {
                Some(stop) => {
                    stop.store(true, Ordering::SeqCst);
                    Ok(())
                }
                None => Err(anyhow::anyhow!(
                    "tick-stop: no tick series {}",
                    command["id"]
                )),
            },
            other => Err(anyhow::anyhow!("unknown command {other:?}")),
        };
        if let Err(e) = outcome {
            reporter.report(
                json!({ "event": "error", "command": command, "message": format!("{e:#}") }),
            );
        }
    }
}

fn target(command: &Value) -> anyhow::Result<Target> {
    let route = command["route"]
        .as_str()
        .context("\"route\" must be a string")?;
    Ok(match route {
        "broadcast" => Target::Broadcast,
        "apps" => Target::Apps,
        "agent" => Target::Agent,
        "random" => Target::Random,
        "pid" => {
            let pid = command["pid"]
                .as_u64()
                .and_then(|p| u32::try_from(p).ok())
                .context("route \"pid\" needs a u32 \"pid\"")?;
            Target::Pid(pid)
        }
        other => bail!("unknown route {other:?}"),
    })
}

/// The `send` command: `count` sends of `action` along `route`, each either
/// confirmed by the master (`confirm`, one `sent` event per send) or emitted
/// (one `sent` event after all of them).
async fn send(face: &Face, command: &Value, reporter: &Reporter) -> anyhow::Result<()> {
    let id = command["id"].clone();
    let action = command["action"]
        .as_str()
        .context("send: \"action\" must be a string")?;
    let target = target(command).context("send")?;
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
                Err(e) => {
                    let mut event = json!({
                        "event": "sent",
                        "id": id,
                        "ok": false,
                        "code": error_code(&e),
                        "message": e.to_string(),
                    });
                    if let SendError::Undelivered {
                        delivered,
                        held,
                        failures,
                        ..
                    } = &e
                    {
                        event["delivered"] = json!(delivered);
                        event["held"] = json!(held);
                        event["failures"] = failures_json(failures);
                    }
                    event
                }
            };
            reporter.report(event);
        } else if let Err(e) = client.emit(target, action, &payload).await {
            reporter.report(json!({
                "event": "sent",
                "id": id,
                "ok": false,
                "code": error_code(&e),
                "message": e.to_string(),
                "count": i,
            }));
            return Ok(());
        }
    }
    if !confirm {
        reporter.report(json!({ "event": "sent", "id": id, "ok": true, "count": count }));
    }
    Ok(())
}

/// The `tick` command: a series of emits on its own task.
fn start_ticks(
    face: &Arc<Face>,
    command: &Value,
    reporter: &Reporter,
    ticks: &mut HashMap<String, Arc<AtomicBool>>,
) -> anyhow::Result<()> {
    let id = command["id"].clone();
    let action = command["action"]
        .as_str()
        .context("tick: \"action\" must be a string")?
        .to_owned();
    let target = target(command).context("tick")?;
    let every = Duration::from_millis(command["every_ms"].as_u64().unwrap_or(5).max(1));
    let count = command["count"].as_u64();
    let stop = Arc::new(AtomicBool::new(false));
    if ticks.insert(id.to_string(), stop.clone()).is_some() {
        bail!("tick: a tick series {id} already exists");
    }
    let face = face.clone();
    let reporter = reporter.clone();
    tokio::spawn(async move {
        let client = face.client();
        let mut interval = tokio::time::interval(every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sent: u64 = 0;
        let mut error = None;
        while count.is_none_or(|c| sent < c) {
            interval.tick().await;
            if stop.load(Ordering::SeqCst) {
                break;
            }
            if let Err(e) = client.emit(target, &action, &json!({ "seq": sent })).await {
                error = Some(e);
                break;
            }
            sent += 1;
        }
        let mut event =
            json!({ "event": "ticked", "id": id, "ok": error.is_none(), "count": sent });
        if let Some(e) = error {
            event["code"] = json!(error_code(&e));
            event["message"] = json!(e.to_string());
        }
        reporter.report(event);
    });
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
