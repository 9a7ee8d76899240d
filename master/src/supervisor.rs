//! Child processes: launching them, relaying their output, noticing their
//! exit, and signalling them.
//!
//! Each child gets its own process group, so that a signal for it reaches
//! whatever it started too, and so that Ctrl-C in a terminal reaches only the
//! master, which then stops the children in order.

use std::collections::VecDeque;
use std::fmt;
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::config::ChildSpec;
use crate::router::SlotId;

/// Lines of a child's stderr kept to explain its death.
const STDERR_TAIL: usize = 20;
/// How long to wait for a dead child's stderr to reach its end: a
/// grandchild may hold the pipe open, and the report must not wait for it.
const STDERR_DRAIN: Duration = Duration::from_millis(500);

/// What the master tells one child in its environment.
#[derive(Clone, Debug)]
pub struct Launch {
    /// The slot it fills.
    pub slot: SlotId,
    /// "agent" or "app".
    pub role: clutch::Role,
    /// 0 for the agent, 1..=N for apps.
    pub worker_id: u32,
    /// The incarnation it will be.
    pub incarnation: u32,
    /// The number of app workers.
    pub workers: usize,
    /// The polling window the child's SDK is told to use.
    pub idle_spin: Duration,
    /// The master's listen address.
    pub addr: String,
    /// Its single-use secret.
    pub secret: String,
}

/// How a child ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// It exited with this code.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
}

impl From<ExitStatus> for Ending {
    fn from(s: ExitStatus) -> Self {
        match (s.code(), s.signal()) {
            (Some(code), _) => Ending::Code(code),
            (None, Some(sig)) => Ending::Signal(sig),
            (None, None) => Ending::Code(-1),
        }
    }
}

impl fmt::Display for Ending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ending::Code(code) => write!(f, "exit code {code}"),
            Ending::Signal(sig) => match Signal::try_from(*sig) {
                Ok(s) => write!(f, "signal {sig} ({s})"),
                Err(_) => write!(f, "signal {sig}"),
            },
        }
    }
}

/// A child that ended.
#[derive(Clone, Debug)]
pub struct Exit {
    /// Its slot.
    pub slot: SlotId,
    /// Its pid.
    pub pid: u32,
    /// How it ended.
    pub ending: Ending,
    /// The last lines it wrote to stderr.
    pub stderr_tail: Vec<String>,
}

/// Why a child could not be started.
#[derive(Debug, thiserror::Error)]
#[error("cannot start {what} ({command}): {source}")]
pub struct SpawnError {
    /// "agent" or "app worker N".
    pub what: String,
    /// The program.
    pub command: String,
    /// The OS's reason.
    pub source: std::io::Error,
}

/// Starts a child and returns its pid. Its output is relayed into the
/// master's log under its span; its exit is reported on `exits`.
pub fn spawn(
    spec: &ChildSpec,
    launch: &Launch,
    what: &str,
    exits: mpsc::Sender<Exit>,
) -> Result<u32, SpawnError> {
    let mut cmd = Command::new(&spec.command);
    // What the master's own environment grants it is not the children's:
    // the admin token (a child holding it could drive the admin API), and
    // systemd's notify socket and watchdog (only the master talks to them).
    for private in [
        "CLUTCH_ADMIN_TOKEN",
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
    ] {
        cmd.env_remove(private);
    }
    // The polling window comes before the spec's own environment, so one
    // role can be given another (`[app] env`); the rest cannot be overridden.
    cmd.args(&spec.args)
        .env(
            clutch::env::IDLE_SPIN_US,
            launch.idle_spin.as_micros().to_string(),
        )
        .envs(&spec.env)
        .env(clutch::env::ADDR, &launch.addr)
        .env(clutch::env::SECRET, &launch.secret)
        .env(clutch::env::ROLE, launch.role.as_str())
        .env(clutch::env::WORKER_ID, launch.worker_id.to_string())
        .env(clutch::env::INCARNATION, launch.incarnation.to_string())
        .env(clutch::env::WORKERS, launch.workers.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        // If the master unwinds without reaping a child, do not leave it.
        .kill_on_drop(true);
    if let Some(cwd) = &spec.cwd {
        cmd.current_dir(cwd);
    }
    die_with_parent(cmd.as_std_mut());
    let mut child = cmd.spawn().map_err(|source| SpawnError {
        what: what.to_owned(),
        command: spec.command.display().to_string(),
        source,
    })?;
    let pid = child.id().unwrap_or(0);
    let span = child_span(launch.role, launch.worker_id, pid);
    let tail = Arc::new(Mutex::new(VecDeque::with_capacity(STDERR_TAIL)));
    let stdout = child
        .stdout
        .take()
        .map(|out| tokio::spawn(relay(out, None).instrument(span.clone())));
    let stderr = child
        .stderr
        .take()
        .map(|err| tokio::spawn(relay(err, Some(tail.clone())).instrument(span.clone())));
    let slot = launch.slot;
    tokio::spawn(
        async move {
            let ending = match child.wait().await {
                Ok(status) => Ending::from(status),
                Err(e) => {
                    tracing::error!(error = %e, "cannot wait for the child");
                    Ending::Code(-1)
                }
            };
            for relay in [stdout, stderr].into_iter().flatten() {
                let _ = tokio::time::timeout(STDERR_DRAIN, relay).await;
            }
            let stderr_tail = tail
                .lock()
                .map(|t| t.iter().cloned().collect())
                .unwrap_or_default();
            let _ = exits
                .send(Exit {
                    slot,
                    pid,
                    ending,
                    stderr_tail,
                })
                .await;
        }
        .instrument(span),
    );
    Ok(pid)
}

/// Asks the kernel to SIGKILL the child when its parent dies, so that a
/// child that does not use an SDK, or is stuck, still goes away when the
/// master is killed with SIGKILL. (Grandchildren are not covered by this;
/// they go with their process group when the master stops in order.) The
/// benchmark harness uses it for the masters it starts. The signal comes
/// when the spawning *thread* ends, so spawn from a thread that lives as
/// long as the parent means to.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub fn die_with_parent(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    let master = nix::unistd::getpid();
    // SAFETY: `pre_exec` runs in the forked child before exec, where only
    // async-signal-safe calls are allowed. The closure makes exactly two
    // syscalls, prctl(PR_SET_PDEATHSIG) and getppid, both async-signal-safe,
    // and allocates nothing (the error path builds an io::Error from a raw
    // errno code, which does not allocate).
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)
                .map_err(|e| std::io::Error::from_raw_os_error(e as i32))?;
            // The master may have died between fork and prctl, in which case
            // the signal will never come: refuse to start instead.
            if nix::unistd::getppid() != master {
                return Err(std::io::Error::from_raw_os_error(nix::libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// Elsewhere there is no parent-death signal; children stop when the
/// master stops in order.
#[cfg(not(target_os = "linux"))]
pub fn die_with_parent(_cmd: &mut std::process::Command) {}

/// The one span per child process: its output, its stream and its exit
/// all log under it.
pub fn child_span(role: clutch::Role, worker_id: u32, pid: u32) -> tracing::Span {
    match role {
        clutch::Role::App => tracing::info_span!("app", worker = worker_id, pid),
        _ => tracing::info_span!("agent", pid),
    }
}

/// Copies a child's output into the log, one event per line. A line that
/// starts with a level word (as `tracing`'s compact output does) keeps that
/// level; anything else is logged at info.
async fn relay(stream: impl AsyncRead + Unpin, tail: Option<Arc<Mutex<VecDeque<String>>>>) {
    let mut lines = BufReader::new(stream).lines();
    let mut budget = LineBudget::new(Instant::now());
    while let Ok(Some(line)) = lines.next_line().await {
        match budget.take(Instant::now()) {
            Take::Log => {}
            Take::Resume { suppressed } => tracing::warn!(
                suppressed,
                "output flood: lines were dropped from the log (the stderr tail kept them)"
            ),
            Take::Suppress => {
                remember(&tail, line);
                // A flood must not starve the routing on this thread.
                tokio::task::yield_now().await;
                continue;
            }
        }
        let (level, text) = split_level(&line);
        match level {
            Level::Error => tracing::error!("{text}"),
            Level::Warn => tracing::warn!("{text}"),
            Level::Info => tracing::info!("{text}"),
            Level::Debug => tracing::debug!("{text}"),
            Level::Trace => tracing::trace!("{text}"),
        }
        remember(&tail, line);
    }
}

fn remember(tail: &Option<Arc<Mutex<VecDeque<String>>>>, line: String) {
    if let Some(tail) = tail {
        if let Ok(mut t) = tail.lock() {
            if t.len() == STDERR_TAIL {
                t.pop_front();
            }
            t.push_back(line);
        }
    }
}

/// A child may log this many lines in a burst…
const LINE_BURST: f64 = 2000.0;
/// …and this many a second after that; the rest are counted and dropped
/// from the log, so that one child's flood neither blocks nor slows the
/// master's routing or the others' logs.
const LINES_PER_SEC: f64 = 1000.0;

/// A token bucket over log lines.
struct LineBudget {
    tokens: f64,
    at: Instant,
    suppressed: u64,
}

#[derive(Debug, PartialEq, Eq)]
enum Take {
    Log,
    /// Log, after saying how many lines were dropped.
    Resume {
        suppressed: u64,
    },
    Suppress,
}

impl LineBudget {
    fn new(now: Instant) -> LineBudget {
        LineBudget {
            tokens: LINE_BURST,
            at: now,
            suppressed: 0,
        }
    }

    fn take(&mut self, now: Instant) -> Take {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * LINES_PER_SEC).min(LINE_BURST);
        self.at = now;
        if self.tokens < 1.0 {
            self.suppressed += 1;
            return Take::Suppress;
        }
        self.tokens -= 1.0;
        match std::mem::take(&mut self.suppressed) {
            0 => Take::Log,
            suppressed => Take::Resume { suppressed },
        }
    }
}

enum Level {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

fn split_level(line: &str) -> (Level, &str) {
    let trimmed = line.trim_start();
    for (word, level) in [
        ("ERROR", Level::Error),
        ("WARN", Level::Warn),
        ("INFO", Level::Info),
        ("DEBUG", Level::Debug),
        ("TRACE", Level::Trace),
    ] {
        if let Some(rest) = trimmed.strip_prefix(word) {
            if rest.starts_with(' ') {
                return (level, rest.trim_start());
            }
        }
    }
    (Level::Info, line)
}

/// Sends a signal to a child's process group. A group that is already gone
/// is not an error.
pub fn signal(pid: u32, signal: Signal) {
    let Ok(raw) = i32::try_from(pid) else { return };
    if raw <= 0 {
        return;
    }
    if let Err(e) = killpg(Pid::from_raw(raw), signal) {
        if e != nix::errno::Errno::ESRCH {
            tracing::warn!(pid, %signal, error = %e, "cannot signal the child's process group");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endings_read_like_a_person_would_say_them() {
        assert_eq!(Ending::Code(3).to_string(), "exit code 3");
        assert_eq!(Ending::Signal(9).to_string(), "signal 9 (SIGKILL)");
    }

    #[test]
    fn a_flood_is_cut_to_the_budget_and_the_cut_is_reported() {
        let t = Instant::now();
        let mut b = LineBudget::new(t);
        let logged = (0..5000).filter(|_| b.take(t) == Take::Log).count();
        assert_eq!(logged, LINE_BURST as usize);
        assert_eq!(
            b.take(t + Duration::from_millis(10)),
            Take::Resume { suppressed: 3000 }
        );
    }

    #[test]
    fn level_words_are_kept() {
        assert!(matches!(split_level("WARN slow"), (Level::Warn, "slow")));
        assert!(matches!(
            split_level("INFORMATION"),
            (Level::Info, "INFORMATION")
        ));
        assert!(matches!(split_level("plain"), (Level::Info, "plain")));
    }
}
