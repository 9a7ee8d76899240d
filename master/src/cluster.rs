//! The master's main loop: binds the listener, serves the messenger, launches
//! children when the router says so, restarts them under the backoff rules,
//! enforces start timeouts, and stops everything in order on a signal.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clutch::Role;
use nix::sys::signal::Signal;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal as unix_signal, SignalKind};
use tokio::sync::{mpsc, oneshot};
use tonic::transport::server::TcpIncoming;

use crate::config::Config;
use crate::hub::{Hub, Shared};
use crate::restart::{Backoff, Decision, OnLimit};
use crate::router::{Action, Router, SlotId, AGENT};
use crate::supervisor::{self, Ending, Exit, Launch, SpawnError};

/// Why the master stopped with an error. [`MasterError::exit_code`] maps
/// each to the documented exit code.
#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    /// The listener could not bind.
    #[error("cannot listen on {addr}: {reason}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS's reason.
        reason: std::io::Error,
    },
    /// The address file could not be written.
    #[error("cannot write the address file {path}: {reason}")]
    AddrFile {
        /// The file.
        path: PathBuf,
        /// The OS's reason.
        reason: std::io::Error,
    },
    /// A child could not be started.
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    /// A child ended before the cluster was ready.
    #[error(
        "{what} (pid {pid}) exited with {ending} before the cluster was ready{}",
        tail(stderr_tail)
    )]
    StartupFailed {
        /// "agent" or "app worker N".
        what: String,
        /// Its pid.
        pid: u32,
        /// How it ended.
        ending: Ending,
        /// The last lines it wrote to stderr.
        stderr_tail: Vec<String>,
    },
    /// A child did not become ready in time during the cluster's start.
    #[error("{what} (pid {pid}) did not become ready within {} ms; it was killed{}", timeout.as_millis(), tail(stderr_tail))]
    StartTimeout {
        /// "agent" or "app worker N".
        what: String,
        /// Its pid.
        pid: u32,
        /// The start timeout it missed.
        timeout: Duration,
        /// The last lines it wrote to stderr.
        stderr_tail: Vec<String>,
    },
    /// A slot crashed more often than its restart-intensity limit allows.
    #[error("{what} needed {restarts} restarts within {} ms (the limit is {max}): stopping the cluster", window.as_millis())]
    RestartLimit {
        /// "agent" or "app worker N".
        what: String,
        /// Restarts within the window.
        restarts: u32,
        /// The limit.
        max: u32,
        /// The window.
        window: Duration,
    },
    /// A signal handler could not be installed, or the OS gave no randomness.
    #[error("cannot set up the master: {0}")]
    Setup(String),
}

impl MasterError {
    /// The master's exit code for this error (see the README): 3 for the
    /// restart limit, 1 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            MasterError::RestartLimit { .. } => 3,
            _ => 1,
        }
    }
}

fn tail(lines: &[String]) -> String {
    if lines.is_empty() {
        return "; it wrote nothing to stderr".into();
    }
    let mut s = String::from("; the last lines it wrote to stderr:");
    for line in lines {
        s.push_str("\n    ");
        s.push_str(line);
    }
    s
}

/// Events that the loop schedules for itself.
#[derive(Debug)]
enum Timer {
    /// The start timeout of this process of the slot ran out.
    StartDeadline {
        slot: SlotId,
        incarnation: u32,
        pid: u32,
    },
    /// The backoff delay before restarting the slot is over.
    Relaunch(SlotId),
}

/// Runs the cluster until a signal stops it (Ok) or it fails (Err).
pub async fn run(config: Config) -> Result<(), MasterError> {
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|reason| MasterError::Bind {
            addr: config.listen,
            reason,
        })?;
    let addr = listener.local_addr().map_err(|reason| MasterError::Bind {
        addr: config.listen,
        reason,
    })?;
    let (lifecycle_tx, mut lifecycle) = mpsc::unbounded_channel();
    let router = Router::new(
        std::process::id(),
        config.workers,
        config.limits,
        random_u64()?,
    );
    let shared = Shared::new(router, lifecycle_tx, config.flow_wait);
    let (stop_server, server_stopped) = oneshot::channel::<()>();
    // tonic ignores the builder's TCP_NODELAY with a custom incoming, so it
    // is set here; without it small frames wait for Nagle's timer.
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(clutch::server::service(
                Hub {
                    shared: shared.clone(),
                },
                config.register_timeout,
            ))
            .serve_with_incoming_shutdown(incoming, async {
                let _ = server_stopped.await;
            }),
    );
    if let Some(path) = &config.addr_file {
        write_addr_file(path, addr)?;
    }
    tracing::info!(%addr, workers = config.workers, "master listening");
    match (config.agent.builtin, config.app.builtin) {
        (true, true) => tracing::info!("no agent or app command configured: running the built-in demo cluster (Ctrl-C stops it)"),
        (true, false) => tracing::info!("no agent command configured: the agent is the built-in demo agent"),
        (false, true) => tracing::info!("no app command configured: the app workers are the built-in demo workers"),
        (false, false) => {}
    }

    let mut signals = Signals::new()?;
    let (timer_tx, mut timers) = mpsc::unbounded_channel();
    let mut cluster = Cluster {
        config: &config,
        shared: &shared,
        addr: addr.to_string(),
        live: HashMap::new(),
        last_exit: HashMap::new(),
        timed_out: HashMap::new(),
        backoff: (0..=config.workers).map(|_| Backoff::default()).collect(),
        cluster_ready: false,
        drops: DropLog::default(),
        exits: mpsc::channel(64),
        timers: timer_tx,
    };
    let started = Instant::now();
    let outcome = match cluster.launch(AGENT) {
        Err(e) => Err(e),
        Ok(()) => loop {
            let step = tokio::select! {
                Some(action) = lifecycle.recv() => cluster.on_action(action, started),
                Some(exit) = cluster.exits.1.recv() => {
                    cluster.on_exit(exit);
                    Ok(())
                }
                Some(timer) = timers.recv() => cluster.on_timer(timer),
                name = signals.next() => {
                    tracing::info!(signal = name, "stopping the cluster: apps first, then the agent");
                    break Ok(());
                }
            };
            if let Err(e) = step {
                break Err(e);
            }
        },
    };
    cluster.stop(&mut signals).await;
    let _ = stop_server.send(());
    match tokio::time::timeout(Duration::from_secs(2), server).await {
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "the gRPC server ended with an error"),
        Err(_) => tracing::warn!("the gRPC server did not stop within 2 s"),
        _ => {}
    }
    if outcome.is_ok() {
        tracing::info!("cluster stopped");
    }
    outcome
}

/// The loop's state.
struct Cluster<'a> {
    /// The configuration.
    config: &'a Config,
    /// The router and its wake-ups.
    shared: &'a Shared,
    /// The address children are told to dial.
    addr: String,
    /// The pid of each slot's running process.
    live: HashMap<SlotId, u32>,
    /// The last exit of each slot, to explain a failed start.
    last_exit: HashMap<SlotId, Exit>,
    /// Processes killed for missing their start timeout, by slot.
    timed_out: HashMap<SlotId, (u32, Duration)>,
    /// Per slot: restart history for backoff and the intensity limit.
    backoff: Vec<Backoff>,
    /// The barrier passed: exits are crashes to restart, not a failed start.
    cluster_ready: bool,
    /// Rate limit for mailbox-overflow warnings.
    drops: DropLog,
    /// Child exits, from the supervisor's watchers. Bounded: a watcher
    /// waits for room, and there is one watcher per child.
    exits: (mpsc::Sender<Exit>, mpsc::Receiver<Exit>),
    /// Where scheduled events go. Unbounded by type, bounded by
    /// construction: at most one start deadline and one pending relaunch
    /// per slot at a time.
    timers: mpsc::UnboundedSender<Timer>,
}

impl Cluster<'_> {
    fn slot_name(&self, slot: SlotId) -> String {
        self.shared.with_router(|r, _| r.slot_name(slot))
    }

    fn launch(&mut self, slot: SlotId) -> Result<(), MasterError> {
        let secret = secret()?;
        let (spec, role, start_timeout) = if slot == AGENT {
            (
                &self.config.agent,
                Role::Agent,
                self.config.agent_start_timeout,
            )
        } else {
            (&self.config.app, Role::App, self.config.app_start_timeout)
        };
        let what = self.slot_name(slot);
        let exits = self.exits.0.clone();
        // Spawning under the router's lock makes the secret known to the
        // router before the child can possibly present it.
        let (pid, incarnation) = self.shared.with_router(|r, out| {
            let launch = Launch {
                slot,
                role,
                worker_id: slot as u32,
                incarnation: r.next_incarnation(slot),
                workers: self.config.workers,
                addr: self.addr.clone(),
                secret: secret.clone(),
            };
            let pid = supervisor::spawn(spec, &launch, &what, exits)?;
            r.spawned(slot, pid, secret, out);
            Ok::<_, SpawnError>((pid, launch.incarnation))
        })?;
        tracing::info!(pid, incarnation, command = %spec.command.display(), "launched {what}");
        self.live.insert(slot, pid);
        self.backoff[slot].started(Instant::now());
        self.after(
            start_timeout,
            Timer::StartDeadline {
                slot,
                incarnation,
                pid,
            },
        );
        Ok(())
    }

    /// Schedules `timer` after `delay`.
    fn after(&self, delay: Duration, timer: Timer) {
        let timers = self.timers.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            // The loop has ended when this fails; the timer no longer matters.
            let _ = timers.send(timer);
        });
    }

    fn on_timer(&mut self, timer: Timer) -> Result<(), MasterError> {
        match timer {
            Timer::StartDeadline {
                slot,
                incarnation,
                pid,
            } => {
                let ready = self
                    .shared
                    .with_router(|r, _| r.is_ready(slot, incarnation));
                if !ready && self.live.get(&slot) == Some(&pid) {
                    let timeout = if slot == AGENT {
                        self.config.agent_start_timeout
                    } else {
                        self.config.app_start_timeout
                    };
                    tracing::error!(
                        pid,
                        "{} did not become ready within {} ms; killing it",
                        self.slot_name(slot),
                        timeout.as_millis()
                    );
                    self.timed_out.insert(slot, (pid, timeout));
                    supervisor::signal(pid, Signal::SIGKILL);
                }
                Ok(())
            }
            Timer::Relaunch(slot) => {
                if let Err(e) = self.launch(slot) {
                    tracing::error!("{e}");
                    return self.restart_later(slot);
                }
                Ok(())
            }
        }
    }

    fn on_action(&mut self, action: Action, started: Instant) -> Result<(), MasterError> {
        match action {
            Action::LaunchApps => {
                for slot in 1..=self.config.workers {
                    self.launch(slot)?;
                }
            }
            Action::ClusterReady => {
                self.cluster_ready = true;
                tracing::info!(
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "egg-ready: the agent and all {} app workers are ready",
                    self.config.workers
                );
            }
            Action::StartupFailed(slot) => {
                let what = self.slot_name(slot);
                let exit = self.last_exit.get(&slot);
                let stderr_tail = exit.map(|e| e.stderr_tail.clone()).unwrap_or_default();
                let pid = exit.map_or(0, |e| e.pid);
                if let Some(&(killed, timeout)) = self.timed_out.get(&slot) {
                    if killed == pid {
                        return Err(MasterError::StartTimeout {
                            what,
                            pid,
                            timeout,
                            stderr_tail,
                        });
                    }
                }
                return Err(MasterError::StartupFailed {
                    what,
                    pid,
                    ending: exit.map_or(Ending::Code(-1), |e| e.ending),
                    stderr_tail,
                });
            }
            Action::Lost(_) if !self.cluster_ready => {}
            Action::Lost(slot) => return self.restart_later(slot),
            Action::Dropped { slot, full, what } => {
                self.drops.record(self.shared, slot, full, &what)
            }
            // Wake and Relieved are carried out by the hub itself.
            Action::Wake(_) | Action::Relieved(_) => {}
        }
        Ok(())
    }

    /// The slot's process is gone after the cluster was ready: restart it
    /// after its backoff delay, or apply the limit policy.
    fn restart_later(&mut self, slot: SlotId) -> Result<(), MasterError> {
        let policy = if slot == AGENT {
            self.config.agent_restart
        } else {
            self.config.app_restart
        };
        let what = self.slot_name(slot);
        match self.backoff[slot].crashed(&policy, Instant::now()) {
            Decision::RestartIn(delay) => {
                tracing::warn!(delay_ms = delay.as_millis() as u64, "restarting {what}");
                self.after(delay, Timer::Relaunch(slot));
                Ok(())
            }
            Decision::Limit { restarts } => match policy.on_limit {
                OnLimit::Stop => Err(MasterError::RestartLimit {
                    what,
                    restarts,
                    max: policy.max_restarts,
                    window: policy.window,
                }),
                OnLimit::KeepRunning => {
                    let dropped = self.shared.with_router(|r, out| r.fail(slot, out));
                    tracing::error!(
                        restarts,
                        window_ms = policy.window.as_millis() as u64,
                        dropped_messages = dropped,
                        "{what} passed its restart limit of {}: its slot is marked failed and stays empty; sends to it are reported UNAVAILABLE",
                        policy.max_restarts
                    );
                    Ok(())
                }
            },
        }
    }

    fn on_exit(&mut self, exit: Exit) {
        if self.live.get(&exit.slot) == Some(&exit.pid) {
            self.live.remove(&exit.slot);
        }
        let role = if exit.slot == AGENT {
            Role::Agent
        } else {
            Role::App
        };
        supervisor::child_span(role, exit.slot as u32, exit.pid)
            .in_scope(|| tracing::info!("exited with {}", exit.ending));
        let (slot, pid) = (exit.slot, exit.pid);
        self.last_exit.insert(slot, exit);
        self.shared.with_router(|r, out| r.exited(slot, pid, out));
    }

    /// Stops the apps, then the agent. Each phase: a shutdown notice on every
    /// stream (the SDKs run their shutdown hooks and exit), then SIGTERM to
    /// whoever is left after the shutdown timeout, then SIGKILL after
    /// another. A second signal kills whatever is left at once.
    async fn stop(&mut self, signals: &mut Signals) {
        let grace = self.config.shutdown_timeout;
        let grace_ms = u32::try_from(grace.as_millis()).unwrap_or(u32::MAX);
        for role in [Role::App, Role::Agent] {
            self.shared
                .with_router(|r, out| r.shutdown(role, grace_ms, out));
            let phase: Vec<SlotId> = self
                .live
                .keys()
                .copied()
                .filter(|&s| (s == AGENT) == (role == Role::Agent))
                .collect();
            for (step, sig) in [
                (grace, None),
                (grace, Some(Signal::SIGTERM)),
                (Duration::from_secs(2), Some(Signal::SIGKILL)),
            ] {
                let left: Vec<u32> = phase
                    .iter()
                    .filter_map(|s| self.live.get(s).copied())
                    .collect();
                if left.is_empty() {
                    break;
                }
                if let Some(sig) = sig {
                    tracing::info!(count = left.len(), %sig, "signalling the remaining {role} processes");
                    for pid in &left {
                        supervisor::signal(*pid, sig);
                    }
                }
                if !self.wait_for_exits(&phase, step, signals).await {
                    self.kill_all().await;
                    return;
                }
            }
        }
    }

    /// Waits until none of `slots` has a live process, or `limit` passes.
    /// Returns false when a second signal asked to kill everything.
    async fn wait_for_exits(
        &mut self,
        slots: &[SlotId],
        limit: Duration,
        signals: &mut Signals,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while slots.iter().any(|s| self.live.contains_key(s)) {
            tokio::select! {
                Some(exit) = self.exits.1.recv() => self.on_exit(exit),
                _ = tokio::time::sleep_until(deadline) => return true,
                name = signals.next() => {
                    tracing::warn!(signal = name, "second signal: killing every child now");
                    return false;
                }
            }
        }
        true
    }

    async fn kill_all(&mut self) {
        for pid in self.live.values() {
            supervisor::signal(*pid, Signal::SIGKILL);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while !self.live.is_empty() {
            tokio::select! {
                Some(exit) = self.exits.1.recv() => self.on_exit(exit),
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
    }
}

/// Warns about mailbox overflow at most once a second per slot, with counts.
#[derive(Default)]
struct DropLog {
    /// Per slot: when the last warning went out and drops since.
    last: HashMap<SlotId, (Instant, u64)>,
}

impl DropLog {
    fn record(&mut self, shared: &Shared, slot: SlotId, full: crate::mailbox::Full, what: &str) {
        let now = Instant::now();
        let entry = self
            .last
            .entry(slot)
            .or_insert((now - Duration::from_secs(2), 0));
        entry.1 += 1;
        if now.duration_since(entry.0) >= Duration::from_secs(1) {
            let name = shared.with_router(|r, _| r.slot_name(slot));
            tracing::warn!(receiver = %name, dropped = entry.1, last_action = what, bound = ?full, "mailbox full: messages refused and reported to their senders");
            *entry = (now, 0);
        }
    }
}

/// SIGINT, SIGTERM and SIGQUIT, as one stream of names.
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    quit: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Signals, MasterError> {
        let install = |kind| {
            unix_signal(kind)
                .map_err(|e| MasterError::Setup(format!("cannot install a signal handler: {e}")))
        };
        Ok(Signals {
            int: install(SignalKind::interrupt())?,
            term: install(SignalKind::terminate())?,
            quit: install(SignalKind::quit())?,
        })
    }

    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
            _ = self.quit.recv() => "SIGQUIT",
        }
    }
}

fn write_addr_file(path: &PathBuf, addr: SocketAddr) -> Result<(), MasterError> {
    // Write then rename, so a reader never sees half an address.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{addr}\n"))
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|reason| MasterError::AddrFile {
            path: path.clone(),
            reason,
        })
}

fn random_bytes<const N: usize>() -> Result<[u8; N], MasterError> {
    let mut buf = [0u8; N];
    getrandom::fill(&mut buf)
        .map_err(|e| MasterError::Setup(format!("the OS gave no randomness: {e}")))?;
    Ok(buf)
}

fn random_u64() -> Result<u64, MasterError> {
    random_bytes::<8>().map(u64::from_le_bytes)
}

/// A fresh single-use secret: 128 random bits, hex.
fn secret() -> Result<String, MasterError> {
    Ok(random_bytes::<16>()?
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}
