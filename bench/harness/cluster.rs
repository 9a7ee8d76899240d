//! One running cluster of either system, and the side channel to its
//! children.
//!
//! The harness listens on 127.0.0.1:0; every child (Clutch's
//! `clutch-bench-child`, or the Egg app's `lib/bench.js`) connects to it,
//! says `hello`, then reports events and takes commands as newline-delimited
//! JSON. Events are stamped with the harness's clock when they are read, so
//! every duration the harness reports is measured on one clock.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::procfs;

/// The two systems compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum System {
    Clutch,
    Egg,
}

impl System {
    pub fn key(self) -> &'static str {
        match self {
            System::Clutch => "clutch",
            System::Egg => "egg",
        }
    }
}

/// Where the programs are.
#[derive(Clone, Debug)]
pub struct Programs {
    /// The `master` binary.
    pub master: PathBuf,
    /// The `clutch-bench-child` binary.
    pub child: PathBuf,
    /// `bench/egg` (with `node_modules` installed).
    pub egg_dir: PathBuf,
    /// The `node` executable.
    pub node: PathBuf,
}

/// A child that said hello.
#[derive(Clone, Debug)]
pub struct Proc {
    pub role: String,
    pub worker_id: u32,
    pub pid: u32,
    commands: mpsc::UnboundedSender<String>,
}

/// An event from a child, stamped when the harness read it.
#[derive(Clone, Debug)]
pub struct Event {
    pub worker_id: u32,
    pub body: Value,
    pub at: Instant,
}

impl Event {
    pub fn kind(&self) -> &str {
        self.body["event"].as_str().unwrap_or("")
    }
    pub fn id(&self) -> u64 {
        self.body["id"].as_u64().unwrap_or(0)
    }
}

/// A running cluster.
pub struct Cluster {
    pub system: System,
    pub workers: u32,
    /// The master: Clutch's `master`, or the Node process running Egg's master.
    pub master_pid: u32,
    /// When the harness spawned the master.
    pub spawned: Instant,
    /// From spawn to the last `egg-ready` report, in milliseconds.
    pub start_ms: f64,
    /// The master's own account of its start, when it logs one (Clutch).
    pub master_reported_start_ms: Option<f64>,
    child: Child,
    tag: String,
    _dir: tempfile::TempDir,
    procs: Arc<Mutex<HashMap<u32, Proc>>>,
    events: mpsc::UnboundedReceiver<Event>,
    pending: VecDeque<Event>,
    accept: JoinHandle<()>,
    log: Arc<Mutex<VecDeque<String>>>,
    next_id: u64,
    stopped: bool,
}

/// Lines of the master's output kept for error reports.
const LOG_LINES: usize = 200;

impl Cluster {
    /// Starts a cluster and waits until every process has reported `egg-ready`.
    pub async fn start(
        system: System,
        workers: u32,
        programs: &Programs,
        timeout: Duration,
    ) -> anyhow::Result<Cluster> {
        Cluster::start_with(system, workers, programs, timeout, None).await
    }

    /// Like [`Cluster::start`]; with `apps`, Clutch's app workers are that
    /// program instead of the bench child (e.g. the Python example worker).
    /// Such workers do not report to the harness, so the start ends at the
    /// agent's `egg-ready`, which the master sends to every process at once
    /// when the barrier passes.
    pub async fn start_with(
        system: System,
        workers: u32,
        programs: &Programs,
        timeout: Duration,
        apps: Option<&Launch>,
    ) -> anyhow::Result<Cluster> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("clutch-bench-{}-", system.key()))
            .tempdir()
            .context("create a temp dir for the cluster")?;
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("bind the side-channel listener")?;
        let control = listener.local_addr()?.to_string();
        let tag = dir.path().display().to_string();

        let mut cmd = match system {
            System::Clutch => {
                let config = dir.path().join("cluster.toml");
                std::fs::write(
                    &config,
                    clutch_toml(workers, &dir.path().join("addr"), &programs.child, apps),
                )
                .context("write cluster.toml")?;
                // BENCH_MASTER_WRAPPER (e.g. "valgrind --tool=callgrind") runs
                // the master under a tool; its pid stays the master's.
                let wrapper = master_wrapper();
                let mut cmd = match wrapper.split_first() {
                    Some((tool, args)) => {
                        let mut cmd = Command::new(tool);
                        cmd.args(args).arg(&programs.master);
                        cmd
                    }
                    None => Command::new(&programs.master),
                };
                cmd.arg("--config").arg(&config).env("NO_COLOR", "1");
                cmd
            }
            System::Egg => {
                let port = free_port()?;
                let mut cmd = Command::new(&programs.node);
                cmd.arg("launcher.js")
                    .current_dir(&programs.egg_dir)
                    .env("BENCH_WORKERS", workers.to_string())
                    .env("BENCH_PORT", port.to_string())
                    .env("BENCH_EGG_DIR", dir.path())
                    .env("EGG_SERVER_ENV", "prod")
                    .env("NODE_ENV", "production");
                cmd
            }
        };
        // A benchmark under someone's RUST_LOG=debug would measure logging.
        cmd.env_remove("RUST_LOG");
        if let Ok(filter) = std::env::var("BENCH_RUST_LOG") {
            cmd.env("RUST_LOG", filter);
        }
        cmd.env("BENCH_CONTROL", &control)
            .env("BENCH_TAG", &tag)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so a stuck cluster can be killed whole.
            .process_group(0);
        // If the harness is killed (Ctrl-C, a timeout), the master goes too,
        // and with it every child (they die with the master): no cluster
        // is left running to disturb the next measurement.
        master::supervisor::die_with_parent(&mut cmd);

        let (events_tx, events) = mpsc::unbounded_channel();
        let procs = Arc::new(Mutex::new(HashMap::new()));
        let accept = tokio::spawn(accept_children(listener, events_tx, procs.clone()));

        let spawned = Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawn the {} master", system.key()))?;
        let master_pid = child.id();
        let log = Arc::new(Mutex::new(VecDeque::new()));
        drain(child.stdout.take().expect("piped"), log.clone());
        drain(child.stderr.take().expect("piped"), log.clone());

        let mut cluster = Cluster {
            system,
            workers,
            master_pid,
            spawned,
            start_ms: 0.0,
            master_reported_start_ms: None,
            child,
            tag,
            _dir: dir,
            procs,
            events,
            pending: VecDeque::new(),
            accept,
            log,
            next_id: 1,
            stopped: false,
        };
        let mut last = spawned;
        let reporting = if apps.is_some() { 0 } else { workers };
        for w in 0..=reporting {
            let e = cluster
                .take(&format!("egg-ready from worker {w}"), timeout, |e| {
                    e.worker_id == w && e.kind() == "egg-ready"
                })
                .await?;
            last = last.max(e.at);
        }
        cluster.start_ms = last.duration_since(spawned).as_secs_f64() * 1e3;
        cluster.master_reported_start_ms = cluster.logged_start_ms();
        let missing: Vec<u32> = (0..=reporting)
            .filter(|w| !cluster.procs.lock().unwrap().contains_key(w))
            .collect();
        if !missing.is_empty() {
            bail!("no hello from worker(s) {missing:?}");
        }
        Ok(cluster)
    }

    /// The process in slot `worker_id` (0 = the agent).
    pub fn proc(&self, worker_id: u32) -> anyhow::Result<Proc> {
        self.procs
            .lock()
            .unwrap()
            .get(&worker_id)
            .cloned()
            .ok_or_else(|| anyhow!("no process for worker {worker_id}"))
    }

    /// The pids of master, agent and apps (in that order).
    pub fn pids(&self) -> Vec<u32> {
        let mut pids = vec![self.master_pid];
        let procs = self.procs.lock().unwrap();
        for w in 0..=self.workers {
            if let Some(p) = procs.get(&w) {
                pids.push(p.pid);
            }
        }
        pids
    }

    /// A fresh command id.
    pub fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Sends a command to a child.
    pub fn command(&self, worker_id: u32, command: Value) -> anyhow::Result<()> {
        let p = self.proc(worker_id)?;
        p.commands
            .send(command.to_string())
            .map_err(|_| anyhow!("the side channel of worker {worker_id} is closed"))
    }

    /// Waits for the first event matching `pred` (one seen earlier counts).
    /// A child's `error` event, or the master's exit, fails the wait.
    pub async fn take(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Event) -> bool,
    ) -> anyhow::Result<Event> {
        if let Some(i) = self.pending.iter().position(&pred) {
            return Ok(self.pending.remove(i).expect("index is in range"));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "timed out after {timeout:?} waiting for {what} ({} cluster)\n{}",
                    self.system.key(),
                    self.report()
                );
            }
            let slice = left.min(Duration::from_millis(250));
            match tokio::time::timeout(slice, self.events.recv()).await {
                Ok(Some(e)) => {
                    if e.kind() == "error" {
                        bail!(
                            "worker {} reported an error while waiting for {what}: {}\n{}",
                            e.worker_id,
                            e.body["message"],
                            self.report()
                        );
                    }
                    if e.kind() == "undelivered" {
                        bail!(
                            "worker {}: the master reported a message of {} undelivered while waiting for {what}: {}\n{}",
                            e.worker_id,
                            e.body["action"],
                            e.body["first"],
                            self.report()
                        );
                    }
                    if pred(&e) {
                        return Ok(e);
                    }
                    self.pending.push_back(e);
                }
                Ok(None) => bail!("the side-channel listener stopped"),
                Err(_) => {
                    if let Ok(Some(status)) = self.child.try_wait() {
                        bail!(
                            "the {} master exited ({status}) while waiting for {what}\n{}",
                            self.system.key(),
                            self.report()
                        );
                    }
                }
            }
        }
    }

    /// Waits for one event of `kind` about command `id` from each of `workers`.
    pub async fn take_each(
        &mut self,
        kind: &str,
        id: u64,
        workers: &[u32],
        timeout: Duration,
    ) -> anyhow::Result<Vec<Event>> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        for &w in workers {
            let left = deadline.saturating_duration_since(Instant::now());
            out.push(
                self.take(&format!("{kind} #{id} from worker {w}"), left, |e| {
                    e.worker_id == w && e.kind() == kind && e.id() == id
                })
                .await?,
            );
        }
        Ok(out)
    }

    /// Drops events nobody waits for any more (e.g. after a timeout).
    pub fn forget_pending(&mut self) {
        self.pending.clear();
        while self.events.try_recv().is_ok() {}
    }

    /// The last lines of the master's output.
    pub fn report(&self) -> String {
        let log = self.log.lock().unwrap();
        let mut out = format!(
            "--- {} master (pid {}) output, last {} lines ---\n",
            self.system.key(),
            self.master_pid,
            log.len()
        );
        for line in log.iter() {
            out.push_str(line);
            out.push('\n');
        }
        out
    }

    /// The master's own account of its start: `elapsed_ms=…` in Clutch's
    /// "egg-ready" log line, `(…ms)` in Egg's "egg started on …" line (Egg's
    /// counts from the master's constructor, after Node and the framework
    /// have loaded in the master).
    fn logged_start_ms(&self) -> Option<f64> {
        let log = self.log.lock().unwrap();
        let number = |s: &str| -> Option<f64> {
            let num: String = s
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.')
                .collect();
            num.parse().ok()
        };
        log.iter().find_map(|l| match self.system {
            System::Clutch if l.contains("egg-ready") => {
                number(&l[l.find("elapsed_ms=")? + "elapsed_ms=".len()..])
            }
            System::Egg if l.contains("started on") => {
                let end = l.rfind("ms)")?;
                let start = l[..end].rfind('(')? + 1;
                number(&l[start..end])
            }
            _ => None,
        })
    }

    /// Stops the cluster the way an operator would (SIGTERM to the master)
    /// and waits until every process it launched is gone. Returns how long
    /// that took, in milliseconds.
    pub async fn stop(mut self) -> anyhow::Result<f64> {
        let t0 = Instant::now();
        let _ = kill(Pid::from_raw(self.master_pid as i32), Signal::SIGTERM);
        let deadline = t0 + Duration::from_secs(20);
        let mut clean = true;
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            if Instant::now() >= deadline {
                clean = false;
                self.kill_all();
                let _ = self.child.wait();
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Children outliving the master would steal CPU from the next run.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = procfs::tagged(&self.tag);
            if left.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                clean = false;
                for pid in left {
                    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        self.stopped = true;
        self.accept.abort();
        if !clean {
            bail!(
                "the {} cluster did not stop within 20 s of SIGTERM; killed it\n{}",
                self.system.key(),
                self.report()
            );
        }
        Ok(ms)
    }

    fn kill_all(&mut self) {
        let _ = killpg(Pid::from_raw(self.master_pid as i32), Signal::SIGKILL);
        let _ = self.child.kill();
        for pid in procfs::tagged(&self.tag) {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.stopped {
            self.accept.abort();
            self.kill_all();
            let _ = self.child.wait();
            std::thread::sleep(Duration::from_millis(50));
            for pid in procfs::tagged(&self.tag) {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        }
    }
}

/// `BENCH_MASTER_WRAPPER`, split on whitespace: a tool to run Clutch's
/// master under (profiling only).
pub fn master_wrapper() -> Vec<String> {
    std::env::var("BENCH_MASTER_WRAPPER")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// A port that was free a moment ago (for Egg's HTTP listener).
fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("find a free port")?;
    Ok(l.local_addr()?.port())
}

/// The cluster's configuration: Egg's defaults (limits, timeouts) stay the
/// master's defaults; only the children are ours.
fn clutch_toml(workers: u32, addr_file: &Path, child: &Path, apps: Option<&Launch>) -> String {
    let q = |s: &str| serde_json::to_string(s).expect("a string encodes as JSON");
    let child = q(&child.display().to_string());
    let app = match apps {
        None => format!("[app]\ncommand = {child}\n"),
        Some(l) => {
            let args: Vec<String> = l.argv.iter().skip(1).map(|a| q(a)).collect();
            let env: Vec<String> = l
                .env
                .iter()
                .map(|(k, v)| format!("{} = {}", q(k), q(v)))
                .collect();
            format!(
                "[app]\ncommand = {}\nargs = [{}]\nenv = {{ {} }}\n",
                q(l.argv.first().map(String::as_str).unwrap_or("")),
                args.join(", "),
                env.join(", ")
            )
        }
    };
    // BENCH_CLUTCH_TOML: extra tables for experiments (e.g. "[timeouts]\nflow_ms = 5000").
    let extra = std::env::var("BENCH_CLUTCH_TOML").unwrap_or_default();
    format!(
        "listen = \"127.0.0.1:0\"\nworkers = {workers}\naddr_file = {addr}\n\n[agent]\ncommand = {child}\n\n{app}\n{extra}\n",
        addr = q(&addr_file.display().to_string()),
    )
}

/// A program to run as Clutch's app workers instead of the bench child.
#[derive(Clone, Debug)]
pub struct Launch {
    /// Command and arguments.
    pub argv: Vec<String>,
    /// Extra environment.
    pub env: Vec<(String, String)>,
    /// What it is, for the report.
    pub label: String,
}

/// Keeps the last lines of one of the master's pipes.
fn drain(pipe: impl Read + Send + 'static, log: Arc<Mutex<VecDeque<String>>>) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&line).trim_end().to_owned();
                    let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
                    if log.len() == LOG_LINES {
                        log.pop_front();
                    }
                    log.push_back(text);
                }
            }
        }
    });
}

async fn accept_children(
    listener: TcpListener,
    events: mpsc::UnboundedSender<Event>,
    procs: Arc<Mutex<HashMap<u32, Proc>>>,
) {
    while let Ok((socket, _)) = listener.accept().await {
        tokio::spawn(serve_child(socket, events.clone(), procs.clone()));
    }
}

async fn serve_child(
    socket: TcpStream,
    events: mpsc::UnboundedSender<Event>,
    procs: Arc<Mutex<HashMap<u32, Proc>>>,
) {
    let _ = socket.set_nodelay(true);
    let (read, write) = socket.into_split();
    let mut lines = tokio::io::BufReader::new(read).lines();
    let Ok(Some(first)) = lines.next_line().await else {
        return;
    };
    let Ok(hello) = serde_json::from_str::<Value>(&first) else {
        return;
    };
    if hello["event"] != "hello" {
        return;
    }
    let worker_id = hello["worker_id"].as_u64().unwrap_or(u64::MAX) as u32;
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
    let proc = Proc {
        role: hello["role"].as_str().unwrap_or("").to_owned(),
        worker_id,
        pid: hello["pid"].as_u64().unwrap_or(0) as u32,
        commands,
    };
    procs.lock().unwrap().insert(worker_id, proc);
    let _ = events.send(Event {
        worker_id,
        body: hello,
        at: Instant::now(),
    });
    while let Ok(Some(line)) = lines.next_line().await {
        let at = Instant::now();
        let body = serde_json::from_str(&line).unwrap_or_else(
            |e| json!({ "event": "error", "message": format!("bad line {line:?}: {e}") }),
        );
        let _ = events.send(Event {
            worker_id,
            body,
            at,
        });
    }
}
