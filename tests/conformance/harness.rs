//! A real cluster for one scenario: the master, `clutch-probe` as the
//! controller agent, and conformance workers in any languages as the apps.
//!
//! The test drives the agent over the probe's side channel (a TCP listener
//! here; newline-delimited JSON, see `tests/probe/main.rs`), and the agent
//! drives the workers through the messenger itself: a command for a worker
//! is a `sendTo(worker pid, "conformance.command", {op, id, ...})`, and the
//! worker reports everything it observes back to the agent as
//! `conformance.event` messages. The probe reports those messages to us like
//! any other, so every event of the cluster lands in one history:
//! [`Event::at`] says which process observed it (0 = the agent).
//!
//! Each cluster is private to its test (own temp dir, port 0 everywhere), so
//! tests run in parallel. Every wait has a deadline and fails with what was
//! seen and the master's log; nothing sleeps to wait for an event.

#[path = "../common/master.rs"]
mod master_process;

use master_process::MasterProcess;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::langs::{Lang, Launch};

/// How long any single wait may take. Generous: the suite runs clusters of
/// four runtimes in parallel on a small machine.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// The master binary under test.
pub const MASTER: &str = env!("CARGO_BIN_EXE_master");
/// The controller agent: the Rust SDK's scriptable probe.
pub const PROBE: &str = env!("CARGO_BIN_EXE_clutch-probe");

/// Commands for conformance workers travel as messages with this action.
pub const COMMAND: &str = "conformance.command";
/// Conformance workers report to the agent with this action.
pub const EVENT: &str = "conformance.event";
/// Every process watches this action, for [`Cluster::barrier`].
pub const BARRIER: &str = "conformance.barrier";
/// The environment variable that tags every process of one cluster.
const TAG: &str = "CONFORMANCE_CLUSTER";

/// How to start a cluster.
pub struct Spec {
    /// The app workers: slot `i + 1` runs `workers[i]`.
    pub workers: Vec<(Lang, Launch)>,
    /// Actions every process reports (besides the barrier and the synthetic ones).
    pub actions: Vec<String>,
    /// The agent calls `ready()` only when told to.
    pub agent_manual_ready: bool,
    /// The workers call `ready()` only when told to.
    pub workers_manual_ready: bool,
    /// The workers reach the master through a TCP proxy that the test can cut.
    pub proxy: bool,
    /// Raw TOML appended to `cluster.toml` (e.g. a `[limits]` table).
    pub extra_toml: String,
}

/// One thing a process observed or did.
#[derive(Clone, Debug)]
pub struct Event {
    /// The worker id of the process it happened at (0 = the agent).
    pub at: u32,
    /// `{"event": kind, ...}` as the probe or the worker reported it.
    pub body: Value,
}

impl Event {
    /// "hello", "message", "egg-ready", "egg-pids", "sent", "undelivered", ...
    pub fn kind(&self) -> &str {
        self.body["event"].as_str().unwrap_or("")
    }

    /// True for a message with this action.
    pub fn is_message(&self, action: &str) -> bool {
        self.kind() == "message" && self.body["action"] == action
    }
}

impl std::fmt::Display for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut body = self.body.to_string();
        if body.len() > 400 {
            let mut cut = 400;
            while !body.is_char_boundary(cut) {
                cut -= 1;
            }
            body.truncate(cut);
            body.push_str("...");
        }
        let who = if self.at == 0 {
            "agent".to_owned()
        } else {
            format!("app{}", self.at)
        };
        write!(f, "{who}: {body}")
    }
}

/// A running cluster and the test's view of it.
pub struct Cluster {
    dir: tempfile::TempDir,
    langs: Vec<Lang>,
    /// The master process (its output, its exit, its cluster's children).
    master: MasterProcess,
    events: mpsc::UnboundedReceiver<Event>,
    history: Vec<Event>,
    /// (pid, number) of every worker report recorded.
    reports_seen: HashSet<(u64, u64)>,
    agent: Arc<Mutex<Option<mpsc::UnboundedSender<String>>>>,
    tasks: Vec<JoinHandle<()>>,
    cut: watch::Sender<u64>,
    next_id: u64,
    reported: bool,
    /// What the test is about, for the failure report.
    label: String,
}

impl Cluster {
    /// Starts the master with the probe as agent and the given workers.
    pub async fn start(spec: Spec) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("clutch-conformance-")
            .tempdir()
            .expect("create a temp dir for the cluster");
        let tag = dir.path().display().to_string();
        let control = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the controller listener");
        let control_addr = control
            .local_addr()
            .expect("controller address")
            .to_string();
        let addr_file = dir.path().join("addr");

        let (cut, _) = watch::channel(0u64);
        let mut tasks = Vec::new();
        let proxy_addr = if spec.proxy {
            let listener = TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind the proxy");
            let addr = listener.local_addr().expect("proxy address").to_string();
            tasks.push(tokio::spawn(proxy(
                listener,
                addr_file.clone(),
                cut.clone(),
            )));
            Some(addr)
        } else {
            None
        };

        let mut actions: Vec<String> = spec.actions.clone();
        actions.push(BARRIER.to_owned());
        let mut agent_actions = actions.clone();
        agent_actions.push(EVENT.to_owned());
        let mut agent_env = vec![
            ("PROBE_CONTROL".to_owned(), control_addr),
            ("PROBE_ACTIONS".to_owned(), agent_actions.join(",")),
            (TAG.to_owned(), tag.clone()),
        ];
        if spec.agent_manual_ready {
            agent_env.push(("PROBE_MANUAL_READY".to_owned(), "1".to_owned()));
        }
        let mut app_env = vec![
            ("CONFORMANCE_ACTIONS".to_owned(), actions.join(",")),
            (TAG.to_owned(), tag.clone()),
        ];
        if spec.workers_manual_ready {
            app_env.push(("CONFORMANCE_MANUAL_READY".to_owned(), "1".to_owned()));
        }
        for (_, launch) in &spec.workers {
            for (k, v) in &launch.env {
                if !app_env.iter().any(|(key, _)| key == k) {
                    app_env.push((k.clone(), v.clone()));
                }
            }
        }
        let script = dispatch_script(&spec.workers, proxy_addr.as_deref());
        let config = dir.path().join("cluster.toml");
        std::fs::write(
            &config,
            cluster_toml(
                spec.workers.len(),
                &addr_file,
                &agent_env,
                &script,
                &app_env,
            ) + "\n"
                + &spec.extra_toml,
        )
        .expect("write cluster.toml");

        let master = MasterProcess::spawn(MASTER, &config, (TAG, &tag));

        let (events_tx, events) = mpsc::unbounded_channel();
        let agent = Arc::new(Mutex::new(None));
        tasks.push(tokio::spawn(accept_agent(
            control,
            events_tx,
            agent.clone(),
        )));

        Cluster {
            dir,
            langs: spec.workers.iter().map(|(l, _)| *l).collect(),
            master,
            events,
            history: Vec::new(),
            reports_seen: HashSet::new(),
            agent,
            tasks,
            cut,
            next_id: 1,
            reported: false,
            label: String::new(),
        }
    }

    /// The number of app workers.
    pub fn workers(&self) -> u32 {
        self.langs.len() as u32
    }

    /// Worker ids of every process: 0 (the agent), then 1..=N.
    pub fn all(&self) -> Vec<u32> {
        (0..=self.workers()).collect()
    }

    /// The master's pid.
    pub fn master_pid(&self) -> u32 {
        self.master.pid()
    }

    /// A unique id for a command.
    pub fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    // ---- events ----------------------------------------------------------------

    /// Everything seen so far, in arrival order (each process's own events
    /// keep their order).
    pub fn history(&self) -> &[Event] {
        &self.history
    }

    async fn pump(&mut self, until: tokio::time::Instant) -> bool {
        match tokio::time::timeout_at(until, self.events.recv()).await {
            Ok(Some(event)) => {
                self.record(event);
                while let Ok(event) = self.events.try_recv() {
                    self.record(event);
                }
                true
            }
            Ok(None) | Err(_) => false,
        }
    }

    /// Adds an event to the history, once: a worker's report is a message
    /// to the agent's slot, which the master re-delivers to a restarted
    /// agent if the old one had not acknowledged it. Workers number their
    /// reports, so a second copy is recognised by (pid, number).
    fn record(&mut self, event: Event) {
        if event.at != 0 {
            let key = (
                event.body["reported_by_pid"].as_u64(),
                event.body["n"].as_u64(),
            );
            if let (Some(pid), Some(n)) = key {
                if !self.reports_seen.insert((pid, n)) {
                    return;
                }
            }
        }
        self.history.push(event);
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

    /// Waits for the first event (already seen or new) that matches.
    pub async fn wait_for(&mut self, what: &str, pred: impl Fn(&Event) -> bool) -> Event {
        let mut found = None;
        self.wait_until(what, |h| {
            found = h.iter().find(|e| pred(e)).cloned();
            found.is_some()
        })
        .await;
        found.expect("wait_until returned")
    }

    /// Events of this kind at this process, in order.
    pub fn events_at(&self, at: u32, kind: &str) -> Vec<&Event> {
        self.history
            .iter()
            .filter(|e| e.at == at && e.kind() == kind)
            .collect()
    }

    /// The latest `hello` of the process in this slot, once it said one.
    pub async fn hello(&mut self, at: u32) -> Event {
        self.wait_for(&format!("hello from {}", name(at)), |e| {
            e.at == at && e.kind() == "hello"
        })
        .await;
        self.history
            .iter()
            .rev()
            .find(|e| e.at == at && e.kind() == "hello")
            .cloned()
            .expect("seen")
    }

    /// The pid of the (latest) process in this slot.
    pub async fn pid_of(&mut self, at: u32) -> u32 {
        let hello = self.hello(at).await;
        hello.body["pid"]
            .as_u64()
            .and_then(|p| u32::try_from(p).ok())
            .unwrap_or_else(|| panic!("hello without a pid: {hello}"))
    }

    /// Waits until every process has had `egg-ready`.
    pub async fn wait_all_egg_ready(&mut self) {
        let all = self.all();
        self.wait_until("egg-ready at every process", |h| {
            all.iter()
                .all(|&w| h.iter().any(|e| e.at == w && e.kind() == "egg-ready"))
        })
        .await;
    }

    // ---- commands --------------------------------------------------------------

    /// Sends a raw command line to the agent (the probe).
    pub async fn agent_command(&mut self, command: Value) {
        self.hello(0).await;
        let sender = self.agent.lock().expect("agent lock").clone();
        let sent = sender.is_some_and(|s| s.send(command.to_string()).is_ok());
        if !sent {
            self.fail("the agent's controller connection is closed");
        }
    }

    /// Waits for `n` reports `{"event": "sent", "id": id}` at `at`.
    pub async fn sent(&mut self, at: u32, id: u64, n: usize) -> Vec<Value> {
        let is_report = move |e: &Event| e.at == at && e.kind() == "sent" && e.body["id"] == id;
        self.wait_until(
            &format!("{n} result(s) of send #{id} at {}", name(at)),
            |h| h.iter().filter(|e| is_report(e)).count() >= n,
        )
        .await;
        self.history
            .iter()
            .filter(|e| is_report(e))
            .map(|e| e.body.clone())
            .collect()
    }

    /// Tells the agent to send: `route` is the probe's route name.
    pub async fn agent_send(&mut self, mut command: Value) -> u64 {
        let id = self.next_id();
        command["cmd"] = json!("send");
        command["id"] = json!(id);
        self.agent_command(command).await;
        id
    }

    /// Gives a command to the worker in slot `at`, through the agent's
    /// `sendTo(pid)`. Returns the command's id, which the worker's reports
    /// about it carry.
    pub async fn worker_command(&mut self, at: u32, mut op: Value) -> u64 {
        let pid = self.pid_of(at).await;
        let id = self.next_id();
        op["id"] = json!(id);
        let probe_id = self
            .agent_send(json!({ "route": "pid", "pid": pid, "action": COMMAND, "data": op }))
            .await;
        let report = self.sent(0, probe_id, 1).await.remove(0);
        if report["ok"] != true {
            self.fail(&format!(
                "the command for {} did not reach it: {report}",
                name(at)
            ));
        }
        id
    }

    /// A causal barrier: `from` broadcasts a unique marker, and this waits
    /// until every process has it. The master delivers in order per (sender,
    /// receiver) pair and queues its own frames (egg-ready, egg-pids) on the
    /// same per-receiver queue, and a worker reports what it sees in order;
    /// so afterwards every process has reported everything `from` sent
    /// before the marker, and everything the master queued for it earlier.
    pub async fn barrier(&mut self, from: u32) {
        let token = format!("barrier-{}-{}", from, self.next_id());
        let op = json!({ "route": "broadcast", "action": BARRIER, "data": token });
        let report = if from == 0 {
            let id = self.agent_send(op).await;
            self.sent(0, id, 1).await.remove(0)
        } else {
            let mut op = op;
            op["op"] = json!("send");
            let id = self.worker_command(from, op).await;
            self.sent(from, id, 1).await.remove(0)
        };
        if report["ok"] != true {
            self.fail(&format!(
                "the barrier broadcast from {} failed: {report}",
                name(from)
            ));
        }
        let all = self.all();
        self.wait_until(&format!("barrier {token} at every process"), |h| {
            all.iter().all(|&w| {
                h.iter()
                    .any(|e| e.at == w && e.is_message(BARRIER) && e.body["data"] == token)
            })
        })
        .await;
    }

    /// Cuts every connection through the proxy: the workers' streams break
    /// while the master lives on.
    pub fn cut_connections(&self) {
        self.cut.send_modify(|n| *n += 1);
    }

    // ---- the master --------------------------------------------------------------

    /// Sends a signal to the master.
    pub fn signal_master(&self, signal: Signal) {
        self.master.signal(signal);
    }

    /// Waits for the master to exit (and its output to end).
    pub async fn master_exit(&mut self) -> ExitStatus {
        match self.master.wait_exit(DEADLINE).await {
            Ok(status) => status,
            Err(e) => self.fail(&e),
        }
    }

    /// Everything the master wrote so far (stdout and stderr, interleaved).
    pub fn master_log(&self) -> String {
        self.master.log()
    }

    /// Waits until some line of the master's log satisfies `pred`.
    pub async fn wait_log(&mut self, what: &str, pred: impl Fn(&str) -> bool) {
        let found = self
            .master
            .wait_stderr(DEADLINE, |text| text.lines().any(&pred))
            .await;
        if let Err(e) = found {
            self.fail(&format!("waiting for {what} in the master's log: {e}"));
        }
    }

    /// Waits until no process of this cluster is left.
    pub async fn wait_children_gone(&mut self) {
        if let Err(live) = self.master.wait_children_gone(DEADLINE).await {
            self.fail(&format!(
                "cluster processes still running {DEADLINE:?} later: {live:?}"
            ));
        }
    }

    // ---- failure reports -----------------------------------------------------------

    /// What a failing test prints: the languages, a count of events per
    /// process, the last events in full, and the master's log.
    pub fn report(&self) -> String {
        let langs: Vec<String> = self
            .langs
            .iter()
            .enumerate()
            .map(|(i, l)| format!("app{}={}", i + 1, l.name()))
            .collect();
        let mut out = format!(
            "--- {} ---\n--- cluster in {}: agent=rust probe, {} ---\n",
            self.label,
            self.dir.path().display(),
            langs.join(", ")
        );
        let mut counts: BTreeMap<(u32, String), usize> = BTreeMap::new();
        for e in &self.history {
            let key = if e.kind() == "message" {
                format!("message {}", e.body["action"].as_str().unwrap_or(""))
            } else {
                e.kind().to_owned()
            };
            *counts.entry((e.at, key)).or_default() += 1;
        }
        out.push_str("--- events seen, counted per process ---\n");
        for ((at, key), n) in &counts {
            out.push_str(&format!("  {}: {key} x{n}\n", name(*at)));
        }
        let skip = self.history.len().saturating_sub(80);
        out.push_str(&format!(
            "--- last {} of {} events ---\n",
            self.history.len() - skip,
            self.history.len()
        ));
        for e in &self.history[skip..] {
            out.push_str(&format!("  {e}\n"));
        }
        out.push_str(&format!(
            "--- master (pid {}) exit: {:?} ---\n--- master log (last 150 lines) ---\n",
            self.master.pid(),
            self.master.exit_status()
        ));
        let log = self.master_log();
        let lines: Vec<&str> = log.lines().collect();
        out.push_str(&lines[lines.len().saturating_sub(150)..].join("\n"));
        out.push('\n');
        out
    }

    /// Panics with `what` and the full report.
    pub fn fail(&mut self, what: &str) -> ! {
        self.reported = true;
        panic!("{what}\n{}", self.report());
    }

    /// Names what the test checks in its failure report.
    pub fn set_label(&mut self, label: String) {
        self.label = label;
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() && !self.reported {
            eprintln!("{}", self.report());
        }
        if std::env::var("CLUTCH_CONFORMANCE_DUMP").is_ok_and(|v| v == "1") {
            eprintln!("{}", self.report());
        }
        for t in &self.tasks {
            t.abort();
        }
        // Dropping `master` stops it and whatever its cluster left behind.
    }
}

/// "agent" or "appN".
pub fn name(at: u32) -> String {
    if at == 0 {
        "agent".to_owned()
    } else {
        format!("app{at}")
    }
}

/// Single-quotes a word for `sh`.
fn sh_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// The app command: one `sh` script that execs each slot's worker, the
/// pattern README documents for mixed-language clusters. `exec` keeps the
/// pid the master launched, which is the pid the worker registers with.
fn dispatch_script(workers: &[(Lang, Launch)], proxy: Option<&str>) -> String {
    let mut script = String::new();
    if let Some(addr) = proxy {
        script.push_str(&format!(
            "CLUTCH_ADDR={}; export CLUTCH_ADDR\n",
            sh_quote(addr)
        ));
    }
    script.push_str("case \"$CLUTCH_WORKER_ID\" in\n");
    for (i, (_, launch)) in workers.iter().enumerate() {
        let argv: Vec<String> = launch.argv.iter().map(|a| sh_quote(a)).collect();
        script.push_str(&format!("  {}) exec {} ;;\n", i + 1, argv.join(" ")));
    }
    script.push_str(
        "  *) echo \"conformance: no worker for slot $CLUTCH_WORKER_ID\" >&2; exit 3 ;;\nesac\n",
    );
    script
}

/// TOML for the cluster. Strings are written as JSON strings, which are
/// valid TOML basic strings (same escapes).
fn cluster_toml(
    workers: usize,
    addr_file: &Path,
    agent_env: &[(String, String)],
    script: &str,
    app_env: &[(String, String)],
) -> String {
    let q = |s: &str| serde_json::to_string(s).expect("a string encodes as JSON");
    let table = |name: &str, env: &[(String, String)]| {
        let mut t = format!("[{name}.env]\n");
        for (k, v) in env {
            t.push_str(&format!("{} = {}\n", q(k), q(v)));
        }
        t
    };
    format!(
        "listen = \"127.0.0.1:0\"\n\
         workers = {workers}\n\
         addr_file = {addr}\n\
         \n\
         [agent]\n\
         command = {probe}\n\
         \n\
         {agent_env}\n\
         [app]\n\
         command = \"/bin/sh\"\n\
         args = [\"-c\", {script}]\n\
         \n\
         {app_env}",
        addr = q(&addr_file.display().to_string()),
        probe = q(PROBE),
        agent_env = table("agent", agent_env),
        script = q(script),
        app_env = table("app", app_env),
    )
}

/// Accepts the agent's side channel (again after an agent restart).
async fn accept_agent(
    listener: TcpListener,
    events: mpsc::UnboundedSender<Event>,
    agent: Arc<Mutex<Option<mpsc::UnboundedSender<String>>>>,
) {
    while let Ok((socket, _)) = listener.accept().await {
        tokio::spawn(serve_agent(socket, events.clone(), agent.clone()));
    }
}

/// Reads the probe's events; owns its command writer. Worker reports (the
/// agent's `conformance.event` messages) become events at their worker.
async fn serve_agent(
    socket: TcpStream,
    events: mpsc::UnboundedSender<Event>,
    agent: Arc<Mutex<Option<mpsc::UnboundedSender<String>>>>,
) {
    let _ = socket.set_nodelay(true);
    let (read, write) = socket.into_split();
    let (commands, mut commands_rx) = mpsc::unbounded_channel::<String>();
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
    *agent.lock().expect("agent lock") = Some(commands);
    let mut lines = tokio::io::BufReader::new(read).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let body: Value = serde_json::from_str(&line).unwrap_or_else(
            |e| json!({ "event": "bad-line", "line": line, "error": e.to_string() }),
        );
        let event = if body["event"] == "message" && body["action"] == EVENT {
            let at = body["from_worker_id"]
                .as_u64()
                .and_then(|w| u32::try_from(w).ok())
                .unwrap_or(u32::MAX);
            let mut report = body["data"].clone();
            if !report.is_object() {
                report = json!({ "event": "bad-report", "report": report });
            }
            // The pid the master says the report came from.
            report["reported_by_pid"] = body["from_pid"].clone();
            Event { at, body: report }
        } else {
            Event { at: 0, body }
        };
        if events.send(event).is_err() {
            break;
        }
    }
    let _ = events.send(Event {
        at: 0,
        body: json!({ "event": "control-closed" }),
    });
}

/// A TCP proxy to the master (whose address is read from its address file
/// at each connection). Bumping `cut` closes every open connection.
async fn proxy(listener: TcpListener, addr_file: PathBuf, cut: watch::Sender<u64>) {
    while let Ok((inbound, _)) = listener.accept().await {
        let addr = std::fs::read_to_string(&addr_file).unwrap_or_default();
        let mut cut = cut.subscribe();
        cut.mark_unchanged();
        tokio::spawn(async move {
            let Ok(mut outbound) = TcpStream::connect(addr.trim()).await else {
                return;
            };
            let mut inbound = inbound;
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                _ = cut.changed() => {}
            }
            // Dropping both sockets breaks the worker's stream.
        });
    }
}
