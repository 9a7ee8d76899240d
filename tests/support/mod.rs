//! The end-to-end harness: runs a real `master` with `clutch-probe` children
//! and lets a test script them.
//!
//! Each [`Cluster`] is fully private to its test (own temp dir, own ports),
//! because cargo runs tests in parallel:
//!
//! - a TCP listener on 127.0.0.1:0 is the *controller*: every probe connects
//!   to it, says `hello`, then reports events and takes commands as
//!   newline-delimited JSON (see `tests/probe/main.rs`);
//! - the master runs with a generated `cluster.toml` whose agent and app
//!   commands are the probe binary;
//! - the master's stdout/stderr are drained on threads into a buffer, so the
//!   pipes never fill and a failing test can show the master's log.
//!
//! All events from all probes are merged into one history in arrival order
//! (each probe's own events keep their order). Waits scan that history, so a
//! test can wait for something that already happened, and counts are taken
//! over everything seen. Every wait has a deadline; a timeout panics with
//! what was seen and the master's log.
//!
//! To assert that something did *not* happen, tests use [`Cluster::barrier`]:
//! a marker broadcast by one probe. The master delivers in order per
//! (sender, receiver) pair and puts its own frames (egg-ready, egg-pids) on
//! the same per-receiver queue, so once every probe has seen the marker,
//! everything the sender sent before it, and every frame the master queued
//! before routing it, has been delivered too.

// Each test crate uses a different subset of the harness.
#![allow(dead_code)]

#[path = "../common/master.rs"]
mod master_process;

use master_process::MasterProcess;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// How long any single wait may take. Generous because the whole suite runs
/// in parallel on a small machine.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// How long Drop gives the master to stop after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(8);

/// The action every probe subscribes to for [`Cluster::barrier`].
pub const BARRIER: &str = "probe-barrier";

/// The master binary under test.
pub const MASTER: &str = env!("CARGO_BIN_EXE_master");
/// The scriptable child.
pub const PROBE: &str = env!("CARGO_BIN_EXE_clutch-probe");

/// How to start a cluster.
#[derive(Clone, Debug)]
pub struct Options {
    /// Number of app workers.
    pub workers: u32,
    /// Probes call `ready()` only when told to ([`Cluster::ready`]).
    pub manual_ready: bool,
    /// Actions every probe subscribes to (besides the synthetic ones).
    pub actions: Vec<String>,
    /// Extra environment for every child (agent and apps).
    pub env: Vec<(String, String)>,
    /// Raw TOML appended to `cluster.toml` (e.g. a `[timeouts]` table).
    pub extra_toml: String,
}

impl Options {
    /// `workers` app workers, probes ready at once, no actions.
    pub fn new(workers: u32) -> Options {
        Options {
            workers,
            manual_ready: false,
            actions: Vec::new(),
            env: Vec::new(),
            extra_toml: String::new(),
        }
    }

    /// Probes wait for the `ready` command.
    pub fn manual_ready(mut self) -> Options {
        self.manual_ready = true;
        self
    }

    /// Subscribe every probe to these actions.
    pub fn actions(mut self, actions: &[&str]) -> Options {
        self.actions.extend(actions.iter().map(|a| a.to_string()));
        self
    }

    /// Set an environment variable in every child.
    pub fn env(mut self, key: &str, value: &str) -> Options {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Append raw TOML to the configuration.
    pub fn toml(mut self, toml: &str) -> Options {
        self.extra_toml.push_str(toml);
        self.extra_toml.push('\n');
        self
    }

    /// Probes write each event to the controller before their handler
    /// returns (`PROBE_SYNC_REPORTS=1`), so a message the SDK acknowledged
    /// was reported even if the probe is killed right after.
    pub fn sync_reports(self) -> Options {
        self.env("PROBE_SYNC_REPORTS", "1")
    }
}

/// One line a probe sent, tagged with the probe's `hello`.
#[derive(Clone, Debug)]
pub struct Event {
    /// "agent" or "app".
    pub role: String,
    /// 0 for the agent, 1..=N for apps.
    pub worker_id: u32,
    /// The probe's pid.
    pub pid: u32,
    /// The JSON the probe sent (`{"event": ..., ...}`).
    pub body: Value,
}

impl Event {
    /// The event kind: "hello", "message", "egg-ready", "egg-pids", "sent", ...
    pub fn kind(&self) -> &str {
        self.body["event"].as_str().unwrap_or("")
    }

    /// For messages: the action.
    pub fn action(&self) -> &str {
        self.body["action"].as_str().unwrap_or("")
    }

    /// For messages: the data as the probe decoded it.
    pub fn data(&self) -> &Value {
        &self.body["data"]
    }

    /// True for a message with this action.
    pub fn is_message(&self, action: &str) -> bool {
        self.kind() == "message" && self.action() == action
    }

    /// For messages sent with `seq`: the sequence number.
    pub fn seq(&self) -> Option<u64> {
        self.body["data"]["seq"].as_u64()
    }
}

impl std::fmt::Display for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut body = self.body.to_string();
        if body.len() > 300 {
            let mut cut = 300;
            while !body.is_char_boundary(cut) {
                cut -= 1;
            }
            body.truncate(cut);
            body.push_str("...");
        }
        write!(
            f,
            "{} {} (pid {}): {}",
            self.role, self.worker_id, self.pid, body
        )
    }
}

/// A probe that said hello.
#[derive(Clone, Debug)]
pub struct Probe {
    /// "agent" or "app".
    pub role: String,
    /// 0 for the agent, 1..=N for apps.
    pub worker_id: u32,
    /// The pid the master gave in its welcome.
    pub pid: u32,
    /// The secret the master issued to it (already used by the probe).
    pub secret: String,
    /// Which incarnation of its slot it is.
    pub incarnation: u32,
    /// Command lines for its controller connection.
    commands: mpsc::UnboundedSender<String>,
}

/// Where a probe's send goes (the `route` of the `send` command).
#[derive(Clone, Copy, Debug)]
pub enum Route {
    /// Egg `broadcast`.
    Broadcast,
    /// Egg `sendToApp`.
    Apps,
    /// Egg `sendToAgent`.
    Agent,
    /// Egg `sendRandom`.
    Random,
    /// Egg `sendTo(pid)`.
    Pid(u32),
}

/// A `send` command for a probe.
#[derive(Clone, Debug)]
pub struct SendCmd {
    route: Route,
    action: String,
    data: Value,
    count: u64,
    confirm: bool,
    seq: bool,
}

impl SendCmd {
    /// One confirmed send of `null`.
    pub fn new(route: Route, action: &str) -> SendCmd {
        SendCmd {
            route,
            action: action.to_owned(),
            data: Value::Null,
            count: 1,
            confirm: true,
            seq: false,
        }
    }

    /// The payload.
    pub fn data(mut self, data: Value) -> SendCmd {
        self.data = data;
        self
    }

    /// Send it `count` times.
    pub fn count(mut self, count: u64) -> SendCmd {
        self.count = count;
        self
    }

    /// Fire and forget (`emit`): one `sent` event after all sends.
    pub fn emit(mut self) -> SendCmd {
        self.confirm = false;
        self
    }

    /// Wrap the i-th payload as `{"seq": i, "data": data}`.
    pub fn seq(mut self) -> SendCmd {
        self.seq = true;
        self
    }

    /// How many `sent` events the probe reports for it.
    fn reports(&self) -> usize {
        if self.confirm {
            usize::try_from(self.count).expect("count fits usize")
        } else {
            1
        }
    }

    fn to_json(&self, id: u64) -> Value {
        let (route, pid) = route_json(self.route);
        json!({
            "cmd": "send",
            "id": id,
            "route": route,
            "pid": pid,
            "action": self.action,
            "data": self.data,
            "count": self.count,
            "confirm": self.confirm,
            "seq": self.seq,
        })
    }
}

/// A running master with its probes, and the test's view of them.
pub struct Cluster {
    dir: tempfile::TempDir,
    workers: u32,
    /// The master process (its output, its exit, its cluster's children).
    master: MasterProcess,
    events: mpsc::UnboundedReceiver<Event>,
    history: Vec<Event>,
    probes: Arc<Mutex<HashMap<u32, Probe>>>,
    /// Every probe that said hello, by pid (all incarnations).
    by_pid: Arc<Mutex<HashMap<u32, Probe>>>,
    accept: JoinHandle<()>,
    next_id: u64,
    /// A wait already panicked with the full report; Drop need not repeat it.
    reported: bool,
}

impl Cluster {
    /// Starts a master whose agent and apps are probes.
    pub async fn start(opts: Options) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("clutch-e2e-")
            .tempdir()
            .expect("create a temp dir for the cluster");
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the controller listener");
        let control = listener
            .local_addr()
            .expect("controller address")
            .to_string();
        let tag = dir.path().display().to_string();

        let mut actions = opts.actions.clone();
        actions.push(BARRIER.to_owned());
        let mut env = vec![
            ("PROBE_CONTROL".to_owned(), control),
            ("PROBE_CLUSTER".to_owned(), tag.clone()),
            ("PROBE_ACTIONS".to_owned(), actions.join(",")),
        ];
        if opts.manual_ready {
            env.push(("PROBE_MANUAL_READY".to_owned(), "1".to_owned()));
        }
        env.extend(opts.env.iter().cloned());

        let config = dir.path().join("cluster.toml");
        std::fs::write(&config, cluster_toml(&opts, &dir.path().join("addr"), &env))
            .expect("write cluster.toml");

        let master = MasterProcess::spawn(MASTER, &config, ("PROBE_CLUSTER", &tag));

        let (events_tx, events) = mpsc::unbounded_channel();
        let probes = Arc::new(Mutex::new(HashMap::new()));
        let by_pid = Arc::new(Mutex::new(HashMap::new()));
        let accept = tokio::spawn(accept_probes(
            listener,
            events_tx,
            probes.clone(),
            by_pid.clone(),
        ));

        Cluster {
            dir,
            workers: opts.workers,
            master,
            events,
            history: Vec::new(),
            probes,
            by_pid,
            accept,
            next_id: 1,
            reported: false,
        }
    }

    /// Starts a cluster and waits until every process got `egg-ready`.
    pub async fn start_ready(opts: Options) -> Cluster {
        let mut cluster = Cluster::start(opts).await;
        cluster.wait_all_egg_ready().await;
        cluster
    }

    /// The number of app workers.
    pub fn workers(&self) -> u32 {
        self.workers
    }

    /// Worker ids of every process: 0 (the agent), then 1..=N.
    pub fn all(&self) -> Vec<u32> {
        (0..=self.workers).collect()
    }

    /// The master's pid.
    pub fn master_pid(&self) -> u32 {
        self.master.pid()
    }

    /// The cluster's temp dir.
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_owned()
    }

    // ---- the master process -------------------------------------------------

    /// The master's gRPC address from its address file.
    pub async fn addr(&mut self) -> String {
        let path = self.dir.path().join("addr");
        let until = Instant::now() + DEADLINE;
        // There is no portable file-appeared event; a short poll with a hard
        // deadline is enough. The master writes the file by rename, so a
        // non-empty file is complete.
        loop {
            if let Ok(text) = std::fs::read_to_string(&path) {
                if text.ends_with('\n') {
                    return text.trim().to_owned();
                }
            }
            if let Some(status) = self.exit_status() {
                self.fail(&format!(
                    "the master exited ({status}) before writing its address file"
                ));
            }
            if Instant::now() >= until {
                self.fail(&format!(
                    "no address file at {} after {DEADLINE:?}",
                    path.display()
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The master's exit status, if it has exited.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.master.exit_status()
    }

    /// Sends a signal to the master.
    pub fn signal_master(&self, signal: Signal) {
        self.master.signal(signal);
    }

    /// Waits for the master to exit and for its output pipes to close, so
    /// that [`Cluster::master_stderr`] is complete.
    pub async fn master_exit(&mut self) -> ExitStatus {
        match self.master.wait_exit(DEADLINE).await {
            Ok(status) => status,
            Err(e) => self.fail(&e),
        }
    }

    /// Everything the master wrote to stderr so far.
    pub fn master_stderr(&self) -> String {
        self.master.stderr()
    }

    /// Pids of live processes launched for this cluster (found by the tag in
    /// their environment, so children the test never heard from count too).
    pub fn live_children(&self) -> Vec<u32> {
        self.master.live_children()
    }

    /// Waits until no process of this cluster is left.
    pub async fn wait_children_gone(&mut self) {
        if let Err(live) = self.master.wait_children_gone(DEADLINE).await {
            self.fail(&format!(
                "cluster processes still running {DEADLINE:?} later: {live:?}"
            ));
        }
    }

    // ---- events ------------------------------------------------------------

    /// Everything the probes reported so far, in arrival order.
    pub fn history(&self) -> &[Event] {
        &self.history
    }

    /// Waits for new events until the deadline; false on timeout.
    async fn pump(&mut self, until: tokio::time::Instant) -> bool {
        match tokio::time::timeout_at(until, self.events.recv()).await {
            Ok(Some(event)) => {
                self.history.push(event);
                // Take the whole batch, so that predicates over the history
                // run once per batch rather than once per event.
                while let Ok(event) = self.events.try_recv() {
                    self.history.push(event);
                }
                true
            }
            Ok(None) | Err(_) => false,
        }
    }

    /// Waits for the first event (already seen or new) that matches.
    pub async fn wait_for(&mut self, what: &str, pred: impl Fn(&Event) -> bool) -> Event {
        let until = tokio::time::Instant::now() + DEADLINE;
        let mut scanned = 0;
        loop {
            if let Some(e) = self.history[scanned..].iter().find(|e| pred(e)) {
                return e.clone();
            }
            scanned = self.history.len();
            if !self.pump(until).await {
                self.fail(&format!("timed out after {DEADLINE:?} waiting for {what}"));
            }
        }
    }

    /// Waits until `pred` holds over the whole history.
    pub async fn wait_until(&mut self, what: &str, mut pred: impl FnMut(&[Event]) -> bool) {
        let until = tokio::time::Instant::now() + DEADLINE;
        loop {
            if pred(&self.history) {
                return;
            }
            if !self.pump(until).await {
                self.fail(&format!("timed out after {DEADLINE:?} waiting for {what}"));
            }
        }
    }

    /// Events of this kind received by this probe.
    pub fn events_of(&self, worker: u32, kind: &str) -> Vec<&Event> {
        self.history
            .iter()
            .filter(|e| e.worker_id == worker && e.kind() == kind)
            .collect()
    }

    /// Messages with this action received by this probe, in order.
    pub fn messages(&self, worker: u32, action: &str) -> Vec<&Event> {
        self.history
            .iter()
            .filter(|e| e.worker_id == worker && e.is_message(action))
            .collect()
    }

    /// How many messages with this action each process received, indexed by
    /// worker id (0 = the agent).
    pub fn receipts(&self, action: &str) -> Vec<usize> {
        self.all()
            .into_iter()
            .map(|w| self.messages(w, action).len())
            .collect()
    }

    /// Waits until every process has had `egg-ready`.
    pub async fn wait_all_egg_ready(&mut self) {
        let all = self.all();
        self.wait_until("egg-ready at every process", |h| {
            all.iter().all(|&w| {
                h.iter()
                    .any(|e| e.worker_id == w && e.kind() == "egg-ready")
            })
        })
        .await;
    }

    // ---- probes and commands -------------------------------------------------

    /// The probe in this slot, once it said hello.
    pub async fn probe(&mut self, worker: u32) -> Probe {
        self.wait_for(&format!("hello from worker {worker}"), |e| {
            e.worker_id == worker && e.kind() == "hello"
        })
        .await;
        self.probes
            .lock()
            .expect("probes lock")
            .get(&worker)
            .cloned()
            .expect("a probe that said hello is registered")
    }

    /// The pid of the probe in this slot.
    pub async fn pid_of(&mut self, worker: u32) -> u32 {
        self.probe(worker).await.pid
    }

    /// Sends a raw command line to a probe.
    pub async fn command(&mut self, worker: u32, command: Value) {
        let probe = self.probe(worker).await;
        if probe.commands.send(command.to_string()).is_err() {
            self.fail(&format!(
                "the controller connection of worker {worker} is closed"
            ));
        }
    }

    /// Tells a probe (started with `manual_ready`) to call `ready()`.
    pub async fn ready(&mut self, worker: u32) {
        self.command(worker, json!({ "cmd": "ready" })).await;
    }

    /// Tells a probe to send; returns the send's id (see [`Cluster::sent`]).
    pub async fn send(&mut self, from: u32, cmd: &SendCmd) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.command(from, cmd.to_json(id)).await;
        id
    }

    /// Waits for the `n` `sent` reports of send `id` by `from`.
    pub async fn sent(&mut self, from: u32, id: u64, n: usize) -> Vec<Value> {
        let is_report =
            move |e: &Event| e.worker_id == from && e.kind() == "sent" && e.body["id"] == id;
        self.wait_until(
            &format!("{n} result(s) of send #{id} by worker {from}"),
            |h| h.iter().filter(|e| is_report(e)).count() >= n,
        )
        .await;
        self.history
            .iter()
            .filter(|e| is_report(e))
            .map(|e| e.body.clone())
            .collect()
    }

    /// Sends and waits for its reports, which must all be successes.
    pub async fn send_ok(&mut self, from: u32, cmd: SendCmd) -> Vec<Value> {
        let id = self.send(from, &cmd).await;
        let reports = self.sent(from, id, cmd.reports()).await;
        if let Some(bad) = reports.iter().find(|r| r["ok"] != true) {
            self.fail(&format!(
                "send #{id} ({cmd:?}) by worker {from} failed: {bad}"
            ));
        }
        reports
    }

    /// Sends once, expecting a failure; returns the failed report.
    pub async fn send_err(&mut self, from: u32, cmd: SendCmd) -> Value {
        let id = self.send(from, &cmd).await;
        let report = self.sent(from, id, 1).await.remove(0);
        if report["ok"] != false {
            self.fail(&format!(
                "send #{id} ({cmd:?}) by worker {from} succeeded: {report}"
            ));
        }
        report
    }

    /// A causal barrier: `from` broadcasts a unique marker, and this waits
    /// until every process received it. Delivery is ordered per (sender,
    /// receiver) pair and the master's own frames share each receiver's
    /// queue, so afterwards every probe has received everything `from` sent
    /// before, and everything the master queued for it before routing the
    /// marker (which it routed after handling all of `from`'s earlier frames,
    /// including `ready`).
    pub async fn barrier(&mut self, from: u32) {
        let token = format!("barrier-{}-{}", from, self.next_id);
        let reports = self
            .send_ok(
                from,
                SendCmd::new(Route::Broadcast, BARRIER).data(json!(token)),
            )
            .await;
        let all = self.all();
        let reached = |h: &[Event]| {
            all.iter().all(|&w| {
                h.iter()
                    .any(|e| e.worker_id == w && e.is_message(BARRIER) && e.data() == &json!(token))
            })
        };
        self.wait_until(
            &format!(
                "barrier {token} (send report {}) at every process",
                reports[0]
            ),
            reached,
        )
        .await;
    }

    // ---- failure reports -------------------------------------------------------

    /// What a failing test should print: a summary of the events, the last
    /// ones in full, and the master's log.
    pub fn report(&self) -> String {
        let mut counts: BTreeMap<(u32, String), usize> = BTreeMap::new();
        for e in &self.history {
            let key = if e.kind() == "message" {
                format!("message {}", e.action())
            } else {
                e.kind().to_owned()
            };
            *counts.entry((e.worker_id, key)).or_default() += 1;
        }
        let mut out = String::from("--- events seen, counted per worker id ---\n");
        for ((worker, key), n) in &counts {
            out.push_str(&format!("  worker {worker}: {key} x{n}\n"));
        }
        let skip = self.history.len().saturating_sub(60);
        out.push_str(&format!(
            "--- last {} of {} events ---\n",
            self.history.len() - skip,
            self.history.len()
        ));
        for e in &self.history[skip..] {
            out.push_str(&format!("  {e}\n"));
        }
        out.push_str(&format!(
            "--- master (pid {}) exit: {:?} ---\n",
            self.master.pid(),
            self.exit_status()
        ));
        out.push_str("--- master stderr (last 200 lines) ---\n");
        out.push_str(&tail(&self.master_stderr(), 200));
        out.push_str("--- master stdout (last 50 lines) ---\n");
        out.push_str(&tail(&self.master.stdout(), 50));
        out
    }

    /// Panics with `what` and the full report.
    pub fn fail(&mut self, what: &str) -> ! {
        self.reported = true;
        panic!("{what}\n{}", self.report());
    }
}

/// A `tick` command: a numbered series of emits (`{"seq": i}`), one every
/// `every_ms`, running on its own task in the probe until `count` ticks or
/// [`Cluster::tick_stop`]; the probe reports `ticked` with the count at the end.
#[derive(Clone, Debug)]
pub struct TickCmd {
    route: Route,
    action: String,
    every_ms: u64,
    count: Option<u64>,
}

impl TickCmd {
    /// Ticks along `route` with `action` every 5 ms until stopped.
    pub fn new(route: Route, action: &str) -> TickCmd {
        TickCmd {
            route,
            action: action.to_owned(),
            every_ms: 5,
            count: None,
        }
    }

    /// The period.
    pub fn every_ms(mut self, every_ms: u64) -> TickCmd {
        self.every_ms = every_ms;
        self
    }

    /// Stop by itself after `count` ticks.
    pub fn count(mut self, count: u64) -> TickCmd {
        self.count = Some(count);
        self
    }

    fn to_json(&self, id: u64) -> Value {
        let (route, pid) = route_json(self.route);
        json!({
            "cmd": "tick",
            "id": id,
            "route": route,
            "pid": pid,
            "action": self.action,
            "every_ms": self.every_ms,
            "count": self.count,
        })
    }
}

fn route_json(route: Route) -> (&'static str, u32) {
    match route {
        Route::Broadcast => ("broadcast", 0),
        Route::Apps => ("apps", 0),
        Route::Agent => ("agent", 0),
        Route::Random => ("random", 0),
        Route::Pid(pid) => ("pid", pid),
    }
}

/// Helpers for restarts, process deaths, ticks and the master's log.
///
/// Slots keep their worker id across restarts, so a process is told apart
/// by its pid: events carry the pid from their probe's `hello`, and
/// [`Cluster::probe`] / [`Cluster::command`] address the newest process of
/// a slot, while the `_pid` variants address one process.
impl Cluster {
    /// The probe of this slot's `incarnation`, once it said hello.
    pub async fn probe_incarnation(&mut self, worker: u32, incarnation: u32) -> Probe {
        let hello = self
            .wait_for(
                &format!("hello from incarnation {incarnation} of worker {worker}"),
                |e| {
                    e.worker_id == worker
                        && e.kind() == "hello"
                        && e.body["incarnation"] == incarnation
                },
            )
            .await;
        self.probe_by_pid(hello.pid).await
    }

    /// The probe with this pid, once it said hello.
    pub async fn probe_by_pid(&mut self, pid: u32) -> Probe {
        self.wait_for(&format!("hello from pid {pid}"), |e| {
            e.pid == pid && e.kind() == "hello"
        })
        .await;
        self.by_pid
            .lock()
            .expect("probes lock")
            .get(&pid)
            .cloned()
            .expect("a probe that said hello is registered")
    }

    /// Sends a raw command line to the probe with this pid.
    pub async fn command_pid(&mut self, pid: u32, command: Value) {
        let probe = self.probe_by_pid(pid).await;
        if probe.commands.send(command.to_string()).is_err() {
            self.fail(&format!("the controller connection of pid {pid} is closed"));
        }
    }

    /// Sends a signal to a process of this cluster (e.g. SIGKILL a child).
    pub fn kill_pid(&mut self, target: u32, signal: Signal) {
        if let Err(e) = kill(pid(target), signal) {
            self.fail(&format!("cannot send {signal} to pid {target}: {e}"));
        }
    }

    /// Events of this kind reported by the process with this pid.
    pub fn events_of_pid(&self, pid: u32, kind: &str) -> Vec<&Event> {
        self.history
            .iter()
            .filter(|e| e.pid == pid && e.kind() == kind)
            .collect()
    }

    /// Messages with this action received by the process with this pid.
    pub fn messages_of_pid(&self, pid: u32, action: &str) -> Vec<&Event> {
        self.history
            .iter()
            .filter(|e| e.pid == pid && e.is_message(action))
            .collect()
    }

    /// Waits until the control connection of this process closed: it has
    /// exited (or stopped talking), and every event it wrote is in the
    /// history.
    pub async fn wait_closed(&mut self, pid: u32) {
        self.wait_for(
            &format!("the control connection of pid {pid} to close"),
            |e| e.pid == pid && e.kind() == "control-closed",
        )
        .await;
    }

    /// Like [`Cluster::barrier`], but waits only at `at` (e.g. when a slot is
    /// known to be empty) and accepts a send report with failures. Returns
    /// the marker's send report.
    pub async fn barrier_among(&mut self, from: u32, at: &[u32]) -> Value {
        let token = format!("barrier-{}-{}", from, self.next_id);
        let cmd = SendCmd::new(Route::Broadcast, BARRIER).data(json!(token));
        let id = self.send(from, &cmd).await;
        let report = self.sent(from, id, 1).await.remove(0);
        let at = at.to_vec();
        let reached = |h: &[Event]| {
            at.iter().all(|&w| {
                h.iter()
                    .any(|e| e.worker_id == w && e.is_message(BARRIER) && e.data() == &json!(token))
            })
        };
        self.wait_until(
            &format!("barrier {token} (send report {report}) at workers {at:?}"),
            reached,
        )
        .await;
        report
    }

    /// Starts a tick series in a probe; returns its id.
    pub async fn tick(&mut self, from: u32, cmd: &TickCmd) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.command(from, cmd.to_json(id)).await;
        id
    }

    /// Stops a tick series started with [`Cluster::tick`] and returns its
    /// `ticked` report (how many ticks were emitted: seqs `0..count`).
    pub async fn tick_stop(&mut self, from: u32, id: u64) -> Value {
        self.command(from, json!({ "cmd": "tick-stop", "id": id }))
            .await;
        self.ticked(from, id).await
    }

    /// Waits for the `ticked` report of a tick series.
    pub async fn ticked(&mut self, from: u32, id: u64) -> Value {
        let report = self
            .wait_for(
                &format!("the end of tick series #{id} at worker {from}"),
                |e| e.worker_id == from && e.kind() == "ticked" && e.body["id"] == id,
            )
            .await;
        if report.body["ok"] != true {
            self.fail(&format!("tick series #{id} failed: {report}"));
        }
        report.body
    }

    /// Waits until the master's stderr satisfies `pred` (e.g. a log line
    /// appeared).
    pub async fn wait_master_log(&mut self, what: &str, pred: impl Fn(&str) -> bool) {
        if let Err(e) = self.master.wait_stderr(DEADLINE, pred).await {
            self.fail(&format!("waiting for {what} in the master's log: {e}"));
        }
    }
}

/// Additions for the reliability suite: taking events without a deadline
/// failure, and the master's memory.
impl Cluster {
    /// Takes the events that arrive until `until` (those already queued at
    /// once) into the history, without failing when none come. Returns how
    /// many were taken. For loops that must do other things meanwhile (e.g.
    /// kill processes at chosen moments) and scan the history themselves.
    pub async fn poll_events(&mut self, until: tokio::time::Instant) -> usize {
        let before = self.history.len();
        while let Ok(event) = self.events.try_recv() {
            self.history.push(event);
        }
        if self.history.len() == before {
            self.pump(until).await;
        }
        self.history.len() - before
    }

    /// Asks the process with this pid for its `tally` (see the probe's
    /// `PROBE_TALLY_ACTIONS`) and returns it. The tally covers everything
    /// the probe handled before it read the command.
    pub async fn tally_pid(&mut self, pid: u32) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        self.command_pid(pid, json!({ "cmd": "tally", "id": id }))
            .await;
        self.wait_for(&format!("tally #{id} from pid {pid}"), |e| {
            e.pid == pid && e.kind() == "tally" && e.body["id"] == id
        })
        .await
        .body
    }

    /// Starts a tick series in the process with this pid (not the newest
    /// of its slot, as [`Cluster::tick`] does); returns its id.
    pub async fn tick_pid(&mut self, pid: u32, cmd: &TickCmd) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.command_pid(pid, cmd.to_json(id)).await;
        id
    }

    /// Stops a tick series of the process with this pid and returns its
    /// `ticked` report (how many ticks were emitted: seqs `0..count`).
    pub async fn tick_stop_pid(&mut self, pid: u32, id: u64) -> Value {
        self.command_pid(pid, json!({ "cmd": "tick-stop", "id": id }))
            .await;
        let report = self
            .wait_for(&format!("the end of tick series #{id} at pid {pid}"), |e| {
                e.pid == pid && e.kind() == "ticked" && e.body["id"] == id
            })
            .await;
        if report.body["ok"] != true {
            self.fail(&format!("tick series #{id} failed: {report}"));
        }
        report.body
    }

    /// The master's resident memory now and at its peak, in KiB (`VmRSS`
    /// and `VmHWM` of /proc/PID/status).
    pub fn master_memory(&mut self) -> MemoryKib {
        let path = format!("/proc/{}/status", self.master.pid());
        let status = match std::fs::read_to_string(&path) {
            Ok(status) => status,
            Err(e) => self.fail(&format!("cannot read {path}: {e}")),
        };
        let field = |name: &str| -> Option<u64> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        };
        match (field("VmRSS:"), field("VmHWM:")) {
            (Some(rss), Some(hwm)) => MemoryKib { rss, hwm },
            _ => self.fail(&format!("no VmRSS / VmHWM in {path}:\n{status}")),
        }
    }
}

/// A process's resident memory, in KiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryKib {
    /// Resident now (`VmRSS`).
    pub rss: u64,
    /// The peak resident size so far (`VmHWM`).
    pub hwm: u64,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // CLUTCH_E2E_DUMP=1 prints every cluster's report, also on success
        // (with `--nocapture`): handy to see what a passing test saw.
        let dump = std::env::var("CLUTCH_E2E_DUMP").is_ok_and(|v| v == "1");
        if (std::thread::panicking() && !self.reported) || dump {
            eprintln!("{}", self.report());
        }
        self.accept.abort();
        // Dropping `master` stops it and whatever its cluster left behind.
    }
}

// ---- helpers -----------------------------------------------------------------

fn pid(pid: u32) -> Pid {
    Pid::from_raw(i32::try_from(pid).expect("pid fits i32"))
}

/// TOML for the cluster. Strings are written as JSON strings, which are valid
/// TOML basic strings (same escapes), so paths and values need no care.
fn cluster_toml(opts: &Options, addr_file: &std::path::Path, env: &[(String, String)]) -> String {
    let q = |s: &str| serde_json::to_string(s).expect("a string encodes as JSON");
    let env_table = |table: &str| {
        let mut t = format!("[{table}.env]\n");
        for (k, v) in env {
            t.push_str(&format!("{} = {}\n", q(k), q(v)));
        }
        t
    };
    let addr_file = addr_file.display().to_string();
    format!(
        "listen = \"127.0.0.1:0\"\n\
         workers = {workers}\n\
         addr_file = {addr}\n\
         \n\
         [agent]\n\
         command = {probe}\n\
         args = []\n\
         {agent_env}\n\
         [app]\n\
         command = {probe}\n\
         args = []\n\
         {app_env}\n\
         {extra}",
        workers = opts.workers,
        addr = q(&addr_file),
        probe = q(PROBE),
        agent_env = env_table("agent"),
        app_env = env_table("app"),
        extra = opts.extra_toml,
    )
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = lines[lines.len().saturating_sub(n)..].join("\n");
    out.push('\n');
    out
}

/// Accepts probe connections for the lifetime of the cluster.
async fn accept_probes(
    listener: TcpListener,
    events: mpsc::UnboundedSender<Event>,
    probes: Arc<Mutex<HashMap<u32, Probe>>>,
    by_pid: Arc<Mutex<HashMap<u32, Probe>>>,
) {
    while let Ok((socket, _)) = listener.accept().await {
        tokio::spawn(serve_probe(
            socket,
            events.clone(),
            probes.clone(),
            by_pid.clone(),
        ));
    }
}

/// Reads one probe's hello and events; owns its command writer.
async fn serve_probe(
    socket: TcpStream,
    events: mpsc::UnboundedSender<Event>,
    probes: Arc<Mutex<HashMap<u32, Probe>>>,
    by_pid: Arc<Mutex<HashMap<u32, Probe>>>,
) {
    let _ = socket.set_nodelay(true);
    let (read, write) = socket.into_split();
    let mut lines = tokio::io::BufReader::new(read).lines();
    let Ok(Some(first)) = lines.next_line().await else {
        return;
    };
    let hello: Value = match serde_json::from_str(&first) {
        Ok(v) => v,
        Err(e) => panic!("a probe's first line is not JSON ({e}): {first:?}"),
    };
    assert_eq!(
        hello["event"], "hello",
        "a probe's first line must be hello"
    );
    let num = |key: &str| {
        hello[key]
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or_else(|| panic!("hello without a u32 {key:?}: {hello}"))
    };
    let (commands, mut commands_rx) = mpsc::unbounded_channel::<String>();
    let probe = Probe {
        role: hello["role"].as_str().unwrap_or("").to_owned(),
        worker_id: num("worker_id"),
        pid: num("pid"),
        secret: hello["secret"].as_str().unwrap_or("").to_owned(),
        incarnation: num("incarnation"),
        commands,
    };
    tokio::spawn(async move {
        let mut out = BufWriter::new(write);
        while let Some(line) = commands_rx.recv().await {
            if out.write_all(line.as_bytes()).await.is_err()
                || out.write_all(b"\n").await.is_err()
                || out.flush().await.is_err()
            {
                break;
            }
        }
    });
    let tag = |body: Value| Event {
        role: probe.role.clone(),
        worker_id: probe.worker_id,
        pid: probe.pid,
        body,
    };
    // Registered before the hello is visible, so a test that saw the hello
    // can command the probe.
    probes
        .lock()
        .expect("probes lock")
        .insert(probe.worker_id, probe.clone());
    by_pid
        .lock()
        .expect("probes lock")
        .insert(probe.pid, probe.clone());
    let _ = events.send(tag(hello.clone()));
    while let Ok(Some(line)) = lines.next_line().await {
        let body = serde_json::from_str(&line).unwrap_or_else(
            |e| json!({ "event": "bad-line", "line": line, "error": e.to_string() }),
        );
        let _ = events.send(tag(body));
    }
    let _ = events.send(tag(json!({ "event": "control-closed" })));
}
