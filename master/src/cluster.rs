//! The master's main loop: binds the listener, serves the messenger, launches
//! children when the router says so, restarts them under the backoff rules,
//! enforces start timeouts, and stops everything in order on a signal.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clutch::admin::{Health, ProcessInfo, Replaced, RestartTarget, Restarting};
use clutch::Role;
use nix::sys::signal::Signal;
use tokio::signal::unix::{signal as unix_signal, SignalKind};
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use crate::admin::{self, Command, Ops};
use crate::auth::{self, AdminGate};
use crate::config::{Config, SlowConsumer};
use crate::events::EventBus;
use crate::hub::{Hub, Shared};
use crate::listener::{BindError, Listener};
use crate::restart::{Backoff, Decision, OnLimit};
use crate::router::{Action, Router, SlotId, AGENT};
use crate::supervisor::{self, Ending, Exit, Launch, SpawnError};
use crate::systemd::Notifier;

/// Why the master stopped with an error. [`MasterError::exit_code`] maps
/// each to the documented exit code.
#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    /// The listener could not bind.
    #[error(transparent)]
    Bind(#[from] BindError),
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
    /// An operator's restart: the process had `shutdown_ms` to exit after
    /// the notice; now send it `signal`.
    Escalate {
        slot: SlotId,
        pid: u32,
        signal: Signal,
    },
    /// The backoff delay before restarting the slot is over.
    Relaunch(SlotId),
}

/// Runs the cluster until a signal or an operator stops it (Ok) or it
/// fails (Err).
pub async fn run(config: Config) -> Result<(), MasterError> {
    let listener = Listener::bind(&config.listen).await?;
    let addr = listener.address().map_err(|reason| {
        MasterError::Setup(format!("cannot read the listen address: {reason}"))
    })?;
    let (lifecycle_tx, mut lifecycle) = mpsc::unbounded_channel();
    let router = Router::new(
        std::process::id(),
        config.workers,
        config.limits,
        random_u64()?,
    );
    let shared = Shared::new(router, lifecycle_tx, config.flow_wait);
    let events = EventBus::default();

    let token = match &config.admin_token {
        Some(token) => token.clone(),
        None => hex(&random_bytes::<32>()?),
    };
    auth::write_token_file(&config.token_file, &token)
        .map_err(|e| MasterError::Setup(e.to_string()))?;
    let (command_tx, commands) = mpsc::channel(admin::COMMAND_QUEUE);
    let mut routes = tonic::service::RoutesBuilder::default();
    routes.add_service(clutch::server::service(
        Hub {
            shared: shared.clone(),
        },
        clutch::server::StreamOptions {
            register_timeout: config.register_timeout,
            max_pending: config.max_pending_streams,
            idle_spin: config.idle_spin,
            // Twice what a valid send can hold, and room for its fields: a
            // send over the payload limit is refused precisely by the
            // router; only a frame far past it ends the stream.
            max_message_bytes: 2
                * (config.limits.max_payload_bytes + config.limits.max_action_bytes)
                + 64 * 1024,
        },
    ));
    let ops = Ops {
        shared: shared.clone(),
        commands: command_tx,
        events: events.clone(),
    };
    // An injected payload may be up to the payload limit, and its JSON form
    // in a protobuf Value takes more room than the text.
    let admin_max = (config.limits.max_payload_bytes * 2 + (64 << 10)).max(4 << 20);
    routes.add_service(clutch::admin::service(
        ops,
        Arc::new(AdminGate::new(token, shared.clone())),
        admin_max,
    ));
    let health = clutch::admin::add_public_services(&mut routes)
        .await
        .map_err(|e| MasterError::Setup(format!("cannot set up reflection: {e}")))?;
    let (stop_server, server_stopped) = oneshot::channel::<()>();
    let admission = crate::listener::Admission {
        max_connections: config.max_connections,
        handshake_timeout: config.handshake_timeout,
    };
    let server = tokio::spawn(listener.serve(routes.routes(), admission, async {
        let _ = server_stopped.await;
    }));
    if let Some(path) = &config.addr_file {
        write_addr_file(path, &addr)?;
    }
    tracing::info!(%addr, workers = config.workers, "master listening");
    tracing::info!(
        token_file = %config.token_file.display(),
        "admin API: send the token in this file as `authorization: Bearer <token>` (see the README's operator cookbook)"
    );
    match (config.agent.builtin, config.app.builtin) {
        (true, true) => tracing::info!("no agent or app command configured: running the built-in demo cluster (Ctrl-C stops it)"),
        (true, false) => tracing::info!("no agent command configured: the agent is the built-in demo agent"),
        (false, true) => tracing::info!("no app command configured: the app workers are the built-in demo workers"),
        (false, false) => {}
    }

    let mut signals = Signals::new()?;
    let notifier = Notifier::from_env();
    let mut watchdog = notifier.watchdog_interval().map(tokio::time::interval);
    let (timer_tx, mut timers) = mpsc::unbounded_channel();
    let mut cluster = Cluster {
        config: &config,
        shared: &shared,
        events,
        health,
        notifier,
        addr,
        live: HashMap::new(),
        overlap: HashMap::new(),
        spawned_at: HashMap::new(),
        last_exit: HashMap::new(),
        timed_out: HashMap::new(),
        intentional: HashMap::new(),
        reload: None,
        commands,
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
                Some(action) = lifecycle.recv() => cluster.on_action(action, started).await,
                Some(exit) = cluster.exits.1.recv() => {
                    cluster.on_exit(exit);
                    Ok(())
                }
                Some(timer) = timers.recv() => cluster.on_timer(timer),
                Some(command) = cluster.commands.recv() => match cluster.on_command(command) {
                    Flow::Continue => Ok(()),
                    Flow::Stop => {
                        tracing::info!("stopping the cluster at an operator's request: apps first, then the agent");
                        break Ok(());
                    }
                },
                _ = tick(&mut watchdog) => {
                    cluster.notifier.notify("WATCHDOG=1");
                    Ok(())
                }
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
    // Watchers' streams end here, or the server's graceful stop would wait
    // for them.
    cluster.events.close();
    let _ = stop_server.send(());
    match tokio::time::timeout(Duration::from_secs(2), server).await {
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "the gRPC server ended with an error"),
        Err(_) => tracing::warn!("the gRPC server did not stop within 2 s"),
        _ => {}
    }
    if config.admin_token.is_none() {
        // A generated token is worthless once the master is gone.
        auth::remove_token_file(&config.token_file);
    }
    if outcome.is_ok() {
        tracing::info!("cluster stopped");
    }
    outcome
}

/// Waits for the next watchdog tick, or forever without a watchdog.
async fn tick(watchdog: &mut Option<tokio::time::Interval>) {
    match watchdog {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// Whether the loop goes on after an operator's command.
enum Flow {
    Continue,
    Stop,
}

/// A rolling restart in progress.
struct Reload {
    /// App slots still to replace, in order.
    queue: VecDeque<SlotId>,
    /// The slot being replaced.
    current: Option<ReloadStep>,
    /// Slots replaced so far.
    replaced: Vec<Replaced>,
    /// Where the answer goes when it is done.
    reply: oneshot::Sender<Result<Vec<Replaced>, Status>>,
}

/// One slot of a reload: a standby is launched beside the slot's process;
/// once it is ready it takes over and the old process is stopped; the step
/// ends when the old process has exited.
struct ReloadStep {
    /// The slot.
    slot: SlotId,
    /// The process being replaced.
    old_pid: u32,
    /// The standby replacing it.
    new_pid: u32,
    /// The standby took over.
    promoted: bool,
    /// The old process crashed before the standby was ready: the standby
    /// takes over when it is, and if it fails the slot is restarted as
    /// after any crash.
    old_crashed: bool,
}

/// The loop's state.
struct Cluster<'a> {
    /// The configuration.
    config: &'a Config,
    /// The router and its wake-ups.
    shared: &'a Shared,
    /// Lifecycle events for watchers.
    events: EventBus,
    /// The gRPC health status.
    health: Health,
    /// systemd's notify socket, if any.
    notifier: Notifier,
    /// When each running process was spawned, and its incarnation, by pid
    /// (a slot may run two during a reload).
    spawned_at: HashMap<u32, (Instant, u32)>,
    /// Slots an operator asked to restart, with the pid being replaced: their
    /// exit is not a crash, so it restarts at once and counts no backoff.
    intentional: HashMap<SlotId, u32>,
    /// The rolling restart in progress, if any.
    reload: Option<Reload>,
    /// Operators' requests (answered during shutdown too, so none hangs).
    commands: mpsc::Receiver<Command>,
    /// The address children are told to dial.
    addr: String,
    /// The pid of each slot's running process.
    live: HashMap<SlotId, u32>,
    /// A reload's extra processes (standbys and outgoing ones), by pid:
    /// they run beside their slot's process in `live`.
    overlap: HashMap<u32, SlotId>,
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
    /// Emits a lifecycle event about one process.
    fn slot_event(
        &self,
        kind: &'static str,
        slot: SlotId,
        pid: u32,
        incarnation: u32,
        message: String,
    ) {
        self.events
            .emit(kind, Some(role_of(slot)), slot as u32, pid, message, |e| {
                e.incarnation = incarnation
            });
    }

    fn slot_name(&self, slot: SlotId) -> String {
        self.shared.with_router(|r, _| r.slot_name(slot))
    }

    /// Launches the slot's next process.
    fn launch(&mut self, slot: SlotId) -> Result<(), MasterError> {
        let Some((pid, incarnation)) = self.spawn(slot, false)? else {
            return Ok(());
        };
        self.live.insert(slot, pid);
        self.backoff[slot].started(Instant::now());
        let what = self.slot_name(slot);
        self.slot_event(
            "spawned",
            slot,
            pid,
            incarnation,
            format!("launched {what}"),
        );
        Ok(())
    }

    /// Launches a reload's standby beside the slot's process. None when the
    /// slot cannot take one now (see [`Router::standby_refused`]).
    fn launch_standby(&mut self, slot: SlotId, old_pid: u32) -> Result<Option<u32>, MasterError> {
        let Some((pid, incarnation)) = self.spawn(slot, true)? else {
            return Ok(None);
        };
        self.overlap.insert(pid, slot);
        let what = self.slot_name(slot);
        self.slot_event(
            "spawned",
            slot,
            pid,
            incarnation,
            format!("launched {what} for a reload: it replaces pid {old_pid} once it is ready"),
        );
        Ok(Some(pid))
    }

    /// Spawns a process for `slot` and arms its start timeout: the slot's
    /// next process, or (`standby`) a reload's new one, which the router
    /// may refuse (None).
    fn spawn(&mut self, slot: SlotId, standby: bool) -> Result<Option<(u32, u32)>, MasterError> {
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
        let grace_ms = u32::try_from(self.config.shutdown_timeout.as_millis()).unwrap_or(u32::MAX);
        // Spawning under the router's lock makes the secret known to the
        // router before the child can possibly present it.
        let spawned = self.shared.with_router(|r, out| {
            if standby {
                if let Some(why) = r.standby_refused(slot) {
                    tracing::info!("not replacing {what} now: {why}");
                    return Ok(None);
                }
            }
            let launch = Launch {
                slot,
                role,
                worker_id: slot as u32,
                incarnation: r.next_incarnation(slot),
                workers: self.config.workers,
                idle_spin: self.config.idle_spin,
                addr: self.addr.clone(),
                secret: secret.clone(),
            };
            let pid = supervisor::spawn(spec, &launch, &what, exits)?;
            if standby {
                r.spawned_standby(slot, pid, secret, grace_ms);
            } else {
                r.spawned(slot, pid, secret, out);
            }
            Ok::<_, SpawnError>(Some((pid, launch.incarnation)))
        })?;
        let Some((pid, incarnation)) = spawned else {
            return Ok(None);
        };
        tracing::info!(pid, incarnation, command = %spec.command.display(), "launched {what}");
        self.spawned_at.insert(pid, (Instant::now(), incarnation));
        self.after(
            start_timeout,
            Timer::StartDeadline {
                slot,
                incarnation,
                pid,
            },
        );
        Ok(Some((pid, incarnation)))
    }

    /// True while `pid` runs in `slot`, as its process or a reload's extra.
    fn runs(&self, slot: SlotId, pid: u32) -> bool {
        self.live.get(&slot) == Some(&pid) || self.overlap.get(&pid) == Some(&slot)
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
                if !ready && self.runs(slot, pid) {
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
            Timer::Escalate { slot, pid, signal } => {
                if self.runs(slot, pid) {
                    tracing::warn!(pid, %signal, "{} did not exit after the shutdown notice", self.slot_name(slot));
                    supervisor::signal(pid, signal);
                    if signal == Signal::SIGTERM {
                        self.after(
                            self.config.shutdown_timeout,
                            Timer::Escalate {
                                slot,
                                pid,
                                signal: Signal::SIGKILL,
                            },
                        );
                    }
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

    async fn on_action(&mut self, action: Action, started: Instant) -> Result<(), MasterError> {
        match action {
            Action::LaunchApps => {
                for slot in 1..=self.config.workers {
                    self.launch(slot)?;
                }
            }
            Action::Registered {
                slot,
                pid,
                incarnation,
            } => {
                self.slot_event("registered", slot, pid, incarnation, "registered".into());
            }
            Action::Ready {
                slot,
                pid,
                incarnation,
            } => {
                self.slot_event("ready", slot, pid, incarnation, "ready".into());
                if self.cluster_ready {
                    // A restarted process gets its own egg-ready from the router.
                    self.slot_event("egg-ready", slot, pid, incarnation, "egg-ready".into());
                }
            }
            Action::Promoted {
                slot,
                old_pid,
                new_pid,
                incarnation,
            } => self.promoted(slot, old_pid, new_pid, incarnation),
            Action::ClusterReady => {
                self.cluster_ready = true;
                self.health.set(true).await;
                self.notifier.notify("READY=1");
                tracing::info!(
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "egg-ready: the agent and all {} app workers are ready",
                    self.config.workers
                );
                for (&slot, &pid) in &self.live {
                    self.events.emit(
                        "egg-ready",
                        Some(role_of(slot)),
                        slot as u32,
                        pid,
                        "egg-ready".into(),
                        |_| {},
                    );
                }
                self.events.emit(
                    "egg-ready",
                    None,
                    0,
                    0,
                    format!(
                        "the agent and all {} app workers are ready",
                        self.config.workers
                    ),
                    |_| {},
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
            Action::Detached { slot, pid } => {
                // Usually the process is on its way out (it closes its
                // stream as it exits); one that lingers past the shutdown
                // timeout is ended, so that its slot is restarted.
                if self.runs(slot, pid) {
                    self.after(
                        self.config.shutdown_timeout,
                        Timer::Escalate {
                            slot,
                            pid,
                            signal: Signal::SIGTERM,
                        },
                    );
                }
            }
            Action::Stalled(slot) => {
                let what = self.slot_name(slot);
                let waited_ms = self.config.flow_wait.as_millis() as u64;
                match self.config.slow_consumer {
                    SlowConsumer::Drop => tracing::warn!(
                        waited_ms,
                        "{what} is not reading its messages: senders no longer wait for it, and what overflows its mailbox is refused and reported to them"
                    ),
                    SlowConsumer::Restart => {
                        tracing::warn!(waited_ms, "{what} is not reading its messages: restarting it (slow_consumer = \"restart\")");
                        if self.cluster_ready && !self.intentional.contains_key(&slot) {
                            self.begin_restart(slot);
                        }
                    }
                }
            }
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
        let old_pid = self.last_exit.get(&slot).map_or(0, |e| e.pid);
        let incarnation = self.shared.with_router(|r, _| r.incarnation(slot));
        if let Some(step) = self.reload.as_mut().and_then(|r| r.current.as_mut()) {
            if step.slot == slot && !step.promoted {
                // The reload's standby is about to take the slot over.
                step.old_crashed = true;
                tracing::warn!(
                    pid = old_pid,
                    "{what} crashed during its reload: its standby (pid {}) takes over once ready",
                    step.new_pid
                );
                return Ok(());
            }
        }
        if self.intentional.get(&slot) == Some(&old_pid) {
            // An operator's restart: no crash, so no backoff and no count.
            self.intentional.remove(&slot);
            tracing::info!("restarting {what} at an operator's request");
            self.events.emit(
                "restarting",
                Some(role_of(slot)),
                slot as u32,
                old_pid,
                format!("restarting {what} at an operator's request"),
                |e| e.incarnation = incarnation,
            );
            return self.launch(slot).or_else(|e| {
                tracing::error!("{e}");
                self.restart_later(slot)
            });
        }
        match self.backoff[slot].crashed(&policy, Instant::now()) {
            Decision::RestartIn(delay) => {
                tracing::warn!(delay_ms = delay.as_millis() as u64, "restarting {what}");
                self.events.emit(
                    "restarting",
                    Some(role_of(slot)),
                    slot as u32,
                    old_pid,
                    format!("restarting {what} in {} ms", delay.as_millis()),
                    |e| {
                        e.delay_ms = delay.as_millis() as u64;
                        e.incarnation = incarnation;
                    },
                );
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
                    self.events.emit(
                        "failed",
                        Some(role_of(slot)),
                        slot as u32,
                        old_pid,
                        format!("{what} passed its restart limit; its slot stays empty"),
                        |_| {},
                    );
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

    fn on_command(&mut self, command: Command) -> Flow {
        match command {
            Command::List(reply) => {
                let now = Instant::now();
                let list = self
                    .shared
                    .with_router(|r, _| r.view())
                    .into_iter()
                    .map(|v| ProcessInfo {
                        role: v.role,
                        worker_id: v.worker_id,
                        pid: v.pid.unwrap_or(0),
                        state: v.state,
                        incarnation: v.incarnation,
                        uptime_ms: v
                            .pid
                            .and_then(|pid| self.spawned_at.get(&pid))
                            .map_or(0, |(t, _)| now.duration_since(*t).as_millis() as u64),
                        pending: v.pending as u64,
                        delivered: v.delivered,
                        dropped: v.dropped,
                    })
                    .collect();
                let _ = reply.send(list);
            }
            Command::Restart(target, reply) => {
                let _ = reply.send(self.restart_by(target));
            }
            Command::Reload(reply) => {
                if self.reload.is_some() {
                    let _ = reply.send(Err(Status::failed_precondition(
                        "a reload is already running",
                    )));
                } else if !self.cluster_ready {
                    let _ = reply.send(Err(Status::unavailable(
                        "the cluster is not ready yet: reload after egg-ready",
                    )));
                } else {
                    let failed: Vec<bool> = self
                        .shared
                        .with_router(|r, _| r.view())
                        .iter()
                        .map(|v| v.state == "failed")
                        .collect();
                    tracing::info!("reload: replacing the app workers one at a time, each new process ready before the old one stops");
                    self.reload = Some(Reload {
                        queue: (1..=self.config.workers).filter(|&s| !failed[s]).collect(),
                        current: None,
                        replaced: Vec::new(),
                        reply,
                    });
                    self.reload_next();
                }
            }
            Command::Shutdown(reply) => {
                let _ = reply.send(Ok(()));
                return Flow::Stop;
            }
        }
        Flow::Continue
    }

    /// Answers an operator while the cluster stops: List still works; the
    /// rest would change a cluster that is going away.
    fn refuse_while_stopping(&mut self, command: Command) {
        let stopping = || Status::unavailable("the master is stopping the cluster");
        match command {
            Command::List(_) => {
                let _ = self.on_command(command);
            }
            Command::Restart(_, reply) => {
                let _ = reply.send(Err(stopping()));
            }
            Command::Reload(reply) => {
                let _ = reply.send(Err(stopping()));
            }
            Command::Shutdown(reply) => {
                let _ = reply.send(Err(stopping()));
            }
        }
    }

    /// Resolves an operator's restart target and begins the restart.
    fn restart_by(&mut self, target: RestartTarget) -> Result<Restarting, Status> {
        if !self.cluster_ready {
            return Err(Status::unavailable(
                "the cluster is not ready yet: restart after egg-ready",
            ));
        }
        let slot = match target {
            RestartTarget::Agent => AGENT,
            RestartTarget::Worker(id) if (1..=self.config.workers).contains(&(id as usize)) => {
                id as usize
            }
            RestartTarget::Worker(id) => {
                return Err(Status::not_found(format!(
                    "no app worker {id}: this cluster has workers 1 to {}",
                    self.config.workers
                )))
            }
            RestartTarget::Pid(pid) => self
                .shared
                .with_router(|r, _| r.slot_of_pid(pid))
                .ok_or_else(|| {
                    Status::not_found(format!("no process with pid {pid} in this cluster"))
                })?,
        };
        if self
            .reload
            .as_ref()
            .and_then(|r| r.current.as_ref())
            .is_some_and(|step| step.slot == slot)
        {
            return Err(Status::failed_precondition(format!(
                "{} is being replaced by a reload",
                self.slot_name(slot)
            )));
        }
        let old_pid = self.begin_restart(slot).ok_or_else(|| {
            Status::failed_precondition(format!(
                "{} has no running process to restart",
                self.slot_name(slot)
            ))
        })?;
        Ok(Restarting {
            role: role_of(slot),
            worker_id: slot as u32,
            old_pid,
        })
    }

    /// Gracefully stops the slot's process so that it comes back at once:
    /// the shutdown notice, then SIGTERM and SIGKILL if it lingers.
    fn begin_restart(&mut self, slot: SlotId) -> Option<u32> {
        let grace = self.config.shutdown_timeout;
        let grace_ms = u32::try_from(grace.as_millis()).unwrap_or(u32::MAX);
        let pid = self
            .shared
            .with_router(|r, out| r.stop_one(slot, grace_ms, out))?;
        if self.live.get(&slot) != Some(&pid) {
            return None;
        }
        tracing::info!(
            pid,
            "restarting {} at an operator's request: shutdown notice sent",
            self.slot_name(slot)
        );
        self.intentional.insert(slot, pid);
        self.after(
            grace,
            Timer::Escalate {
                slot,
                pid,
                signal: Signal::SIGTERM,
            },
        );
        Some(pid)
    }

    /// Starts replacing the next slot of the reload, or answers when done.
    fn reload_next(&mut self) {
        loop {
            let Some(reload) = self.reload.as_mut() else {
                return;
            };
            let Some(slot) = reload.queue.pop_front() else {
                if let Some(done) = self.reload.take() {
                    tracing::info!(replaced = done.replaced.len(), "reload done");
                    let _ = done.reply.send(Ok(done.replaced));
                }
                return;
            };
            // A slot with no running process is restarting on its own: it is
            // fresh already.
            let Some(&old_pid) = self.live.get(&slot) else {
                continue;
            };
            match self.launch_standby(slot, old_pid) {
                Ok(Some(new_pid)) => {
                    if let Some(reload) = self.reload.as_mut() {
                        reload.current = Some(ReloadStep {
                            slot,
                            old_pid,
                            new_pid,
                            promoted: false,
                            old_crashed: false,
                        });
                    }
                    return;
                }
                Ok(None) => continue,
                Err(e) => {
                    let what = self.slot_name(slot);
                    tracing::error!("reload stopped: cannot launch a new {what}: {e}");
                    let why = format!("reload stopped: cannot launch a new {what}: {e}");
                    self.end_reload(Status::internal(why), "");
                    return;
                }
            }
        }
    }

    /// Ends the reload with an error; says which slots it replaced already,
    /// then `trailer` (a failed process's last stderr lines).
    fn end_reload(&mut self, status: Status, trailer: &str) {
        let Some(reload) = self.reload.take() else {
            return;
        };
        let done: Vec<String> = reload
            .replaced
            .iter()
            .map(|r| {
                format!(
                    "app worker {} ({} -> {})",
                    r.worker_id, r.old_pid, r.new_pid
                )
            })
            .collect();
        let message = if done.is_empty() {
            format!("{}; no app worker was replaced{trailer}", status.message())
        } else {
            format!(
                "{}; replaced before that: {}{trailer}",
                status.message(),
                done.join(", ")
            )
        };
        let _ = reload.reply.send(Err(Status::new(status.code(), message)));
    }

    /// A reload's standby took over its slot: it is the slot's process now,
    /// and the old one has `shutdown_ms` to leave before the signals.
    fn promoted(&mut self, slot: SlotId, old_pid: Option<u32>, new_pid: u32, incarnation: u32) {
        self.overlap.remove(&new_pid);
        let previous = self.live.insert(slot, new_pid);
        self.backoff[slot].started(Instant::now());
        let what = self.slot_name(slot);
        let retiring = previous.filter(|p| Some(*p) == old_pid);
        if let Some(old) = retiring {
            self.overlap.insert(old, slot);
            self.after(
                self.config.shutdown_timeout,
                Timer::Escalate {
                    slot,
                    pid: old,
                    signal: Signal::SIGTERM,
                },
            );
        }
        let message = match old_pid {
            Some(old) => {
                format!("pid {new_pid} took over {what} from pid {old}, which was told to stop")
            }
            None => format!("pid {new_pid} took over {what}"),
        };
        tracing::info!(pid = new_pid, incarnation, "{message}");
        self.slot_event("promoted", slot, new_pid, incarnation, message);
        let Some(reload) = self.reload.as_mut() else {
            return;
        };
        let Some(step) = reload.current.as_mut().filter(|s| s.new_pid == new_pid) else {
            return;
        };
        step.promoted = true;
        reload.replaced.push(Replaced {
            worker_id: slot as u32,
            old_pid: step.old_pid,
            new_pid,
        });
        if retiring.is_none() {
            // The old process is gone already: nothing to wait for.
            reload.current = None;
            self.reload_next();
        }
    }

    /// A reload's extra process exited: the end of its slot's step (the
    /// old one is gone), or the failure of the reload (the standby died
    /// before it was ready; the old process keeps serving).
    fn reload_exit(&mut self, exit: &Exit) {
        let Some(step) = self.reload.as_ref().and_then(|r| r.current.as_ref()) else {
            return;
        };
        let (slot, old_pid, old_crashed) = (step.slot, step.old_pid, step.old_crashed);
        if step.promoted && exit.pid == old_pid {
            if let Some(reload) = self.reload.as_mut() {
                reload.current = None;
            }
            return self.reload_next();
        }
        if step.promoted || exit.pid != step.new_pid {
            return;
        }
        let what = self.slot_name(slot);
        let why = match self.timed_out.get(&slot) {
            Some(&(pid, timeout)) if pid == exit.pid => {
                format!("did not become ready within {} ms", timeout.as_millis())
            }
            _ => format!("exited with {} before it was ready", exit.ending),
        };
        let serving = if old_crashed {
            format!(
                "the old one (pid {old_pid}) had crashed, so {what} restarts as after any crash"
            )
        } else {
            format!("the old one (pid {old_pid}) keeps serving")
        };
        let message = format!(
            "reload stopped: the new process for {what} (pid {}) {why}; {serving}",
            exit.pid
        );
        let trailer = tail(&exit.stderr_tail);
        tracing::error!("{message}{trailer}");
        self.end_reload(Status::aborted(message), &trailer);
        if old_crashed {
            if let Err(e) = self.restart_later(slot) {
                tracing::error!("{e}");
            }
        }
    }

    fn on_exit(&mut self, exit: Exit) {
        let extra = self.overlap.remove(&exit.pid).is_some();
        if self.live.get(&exit.slot) == Some(&exit.pid) {
            self.live.remove(&exit.slot);
        }
        let role = role_of(exit.slot);
        supervisor::child_span(role, exit.slot as u32, exit.pid)
            .in_scope(|| tracing::info!("exited with {}", exit.ending));
        let spawned = self.spawned_at.remove(&exit.pid);
        let (code, signal) = match exit.ending {
            Ending::Code(c) => (c, 0),
            Ending::Signal(s) => (-1, s),
        };
        let incarnation = match spawned {
            Some((_, incarnation)) => incarnation,
            None => self.shared.with_router(|r, _| r.incarnation(exit.slot)),
        };
        self.events.emit(
            "exited",
            Some(role),
            exit.slot as u32,
            exit.pid,
            format!("exited with {}", exit.ending),
            |e| {
                e.exit_code = code;
                e.signal = signal;
                e.incarnation = incarnation;
            },
        );
        let (slot, pid) = (exit.slot, exit.pid);
        if extra {
            // Not the slot's process: its exit explains no crash of the
            // slot, and the router hands back what it left.
            self.shared.with_router(|r, out| r.exited(slot, pid, out));
            return self.reload_exit(&exit);
        }
        self.last_exit.insert(slot, exit);
        self.shared.with_router(|r, out| r.exited(slot, pid, out));
    }

    /// Stops the apps, then the agent. Each phase: a shutdown notice on every
    /// stream (the SDKs run their shutdown hooks and exit), then SIGTERM to
    /// whoever is left after the shutdown timeout, then SIGKILL after
    /// another. A second signal kills whatever is left at once.
    async fn stop(&mut self, signals: &mut Signals) {
        self.health.set(false).await;
        self.notifier.notify("STOPPING=1");
        self.events.emit(
            "shutdown",
            None,
            0,
            0,
            "the cluster is stopping".into(),
            |_| {},
        );
        self.end_reload(Status::aborted("the cluster is stopping"), "");
        let grace = self.config.shutdown_timeout;
        let grace_ms = u32::try_from(grace.as_millis()).unwrap_or(u32::MAX);
        for role in [Role::App, Role::Agent] {
            self.shared
                .with_router(|r, out| r.shutdown(role, grace_ms, out));
            for (step, sig) in [
                (grace, None),
                (grace, Some(Signal::SIGTERM)),
                (Duration::from_secs(2), Some(Signal::SIGKILL)),
            ] {
                let left = self.running(role);
                if left.is_empty() {
                    break;
                }
                if let Some(sig) = sig {
                    tracing::info!(count = left.len(), %sig, "signalling the remaining {role} processes");
                    for pid in &left {
                        supervisor::signal(*pid, sig);
                    }
                }
                if !self.wait_for_exits(role, step, signals).await {
                    self.kill_all().await;
                    return;
                }
            }
        }
    }

    /// The pids of every running process of `role`, a reload's extra
    /// processes included.
    fn running(&self, role: Role) -> Vec<u32> {
        let of_role = |slot: &SlotId| role_of(*slot) == role;
        let live = self
            .live
            .iter()
            .filter(|(s, _)| of_role(s))
            .map(|(_, p)| *p);
        let extra = self
            .overlap
            .iter()
            .filter(|(_, s)| of_role(s))
            .map(|(p, _)| *p);
        live.chain(extra).collect()
    }

    /// Waits until no process of `role` runs, or `limit` passes. Returns
    /// false when a second signal asked to kill everything.
    async fn wait_for_exits(&mut self, role: Role, limit: Duration, signals: &mut Signals) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while !self.running(role).is_empty() {
            tokio::select! {
                Some(exit) = self.exits.1.recv() => self.on_exit(exit),
                Some(command) = self.commands.recv() => self.refuse_while_stopping(command),
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
        for pid in self.live.values().chain(self.overlap.keys()) {
            supervisor::signal(*pid, Signal::SIGKILL);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while !self.live.is_empty() || !self.overlap.is_empty() {
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

fn write_addr_file(path: &PathBuf, addr: &str) -> Result<(), MasterError> {
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
    Ok(hex(&random_bytes::<16>()?))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn role_of(slot: SlotId) -> Role {
    if slot == AGENT {
        Role::Agent
    } else {
        Role::App
    }
}
