//! A master process launched by a test harness (tests/support and the
//! conformance suite), included with `#[path]`: it is spawned with a
//! config file, its output is drained into buffers (so its pipes never fill
//! and a failing test can print its log), its exit is watched on a thread,
//! and on drop it is stopped the way an operator would (SIGTERM), then for
//! sure (SIGKILL), together with any process of its cluster left behind.
//!
//! Errors come back as values: each harness reports them with its own
//! failure report.

// Each harness uses the part it needs.
#![allow(dead_code)]

use std::io::Read;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::sync::watch;

#[path = "procs.rs"]
pub mod procs;

/// How long the master gets to stop on SIGTERM before SIGKILL, on drop.
const STOP_GRACE: Duration = Duration::from_secs(8);

/// The master's output, drained by two threads.
#[derive(Default)]
struct Output {
    stdout: Mutex<String>,
    stderr: Mutex<String>,
    /// Both pipes, interleaved line by line as they were read.
    both: Mutex<String>,
    /// How many of the two pipes reached end of file.
    closed: watch::Sender<u32>,
    /// How many lines were read from both pipes (to wait for a log line).
    lines: watch::Sender<u64>,
}

/// The master's exit status, set by the thread that waits for it.
struct ExitCell {
    /// For `Drop`, which cannot await.
    status: Mutex<Option<ExitStatus>>,
    changed: Condvar,
    /// For async waits.
    watch: watch::Sender<Option<ExitStatus>>,
}

/// A running (or exited) master.
pub struct MasterProcess {
    pid: u32,
    output: Arc<Output>,
    exit: Arc<ExitCell>,
    /// `var=value` in the environment of every process of its cluster.
    tag: (String, String),
}

impl MasterProcess {
    /// Spawns `binary --config <config>`; `tag` names the environment
    /// variable and value that mark the cluster's children.
    pub fn spawn(binary: &str, config: &Path, tag: (&str, &str)) -> MasterProcess {
        let mut child = Command::new(binary)
            // Plain text in the log a failing test prints (tracing's
            // formatter honours NO_COLOR).
            .env("NO_COLOR", "1")
            .arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the master");
        let pid = child.id();
        let output = Arc::new(Output::default());
        drain(child.stdout.take().expect("piped"), output.clone(), false);
        drain(child.stderr.take().expect("piped"), output.clone(), true);
        let exit = Arc::new(ExitCell {
            status: Mutex::new(None),
            changed: Condvar::new(),
            watch: watch::Sender::new(None),
        });
        {
            let exit = exit.clone();
            std::thread::spawn(move || {
                let status = child.wait().expect("wait for the master");
                *exit.status.lock().unwrap_or_else(|p| p.into_inner()) = Some(status);
                exit.changed.notify_all();
                exit.watch.send_replace(Some(status));
            });
        }
        MasterProcess {
            pid,
            output,
            exit,
            tag: (tag.0.to_owned(), tag.1.to_owned()),
        }
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Its exit status, once it has exited.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        *self.exit.watch.borrow()
    }

    /// Sends it a signal, unless it has exited.
    pub fn signal(&self, signal: Signal) {
        if self.exit_status().is_none() {
            let _ = kill(pid(self.pid), signal);
        }
    }

    /// Waits up to `limit` for it to exit and for its output pipes to close
    /// (so its log is complete).
    pub async fn wait_exit(&self, limit: Duration) -> Result<ExitStatus, String> {
        let mut rx = self.exit.watch.subscribe();
        let status = match tokio::time::timeout(limit, rx.wait_for(Option::is_some)).await {
            Ok(Ok(status)) => *status,
            _ => None,
        };
        let Some(status) = status else {
            return Err(format!("the master did not exit within {limit:?}"));
        };
        let mut closed = self.output.closed.subscribe();
        if tokio::time::timeout(limit, closed.wait_for(|n| *n == 2))
            .await
            .is_err()
        {
            return Err("the master exited but its stdout/stderr stayed open: \
                 did a child inherit them?"
                .into());
        }
        Ok(status)
    }

    /// Everything it wrote to stdout so far.
    pub fn stdout(&self) -> String {
        lock(&self.output.stdout).clone()
    }

    /// Everything it wrote to stderr so far.
    pub fn stderr(&self) -> String {
        lock(&self.output.stderr).clone()
    }

    /// Both, interleaved as read.
    pub fn log(&self) -> String {
        lock(&self.output.both).clone()
    }

    /// Waits up to `limit` until `pred` holds for its stderr. Fails when
    /// the time runs out or its output ended without it.
    pub async fn wait_stderr(
        &self,
        limit: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<(), String> {
        let mut lines = self.output.lines.subscribe();
        let mut closed = self.output.closed.subscribe();
        let until = tokio::time::Instant::now() + limit;
        loop {
            lines.borrow_and_update();
            // Both pipes closed: every line is in the buffer, none will come.
            let ended = *closed.borrow_and_update() == 2;
            if pred(&self.stderr()) {
                return Ok(());
            }
            if ended {
                return Err(format!(
                    "the master's output ended (exit: {:?})",
                    self.exit_status()
                ));
            }
            let more = async {
                tokio::select! {
                    _ = lines.changed() => {}
                    _ = closed.changed() => {}
                }
            };
            if tokio::time::timeout_at(until, more).await.is_err() {
                return Err(format!("timed out after {limit:?}"));
            }
        }
    }

    /// Live processes of its cluster (found by the tag in their
    /// environment, so children that never reported count too).
    pub fn live_children(&self) -> Vec<u32> {
        procs::with_env(&self.tag.0, &self.tag.1)
    }

    /// Waits up to `limit` until no process of its cluster is left; returns
    /// those still running otherwise.
    pub async fn wait_children_gone(&self, limit: Duration) -> Result<(), Vec<u32>> {
        let until = tokio::time::Instant::now() + limit;
        // These are not our children, so no exit notification reaches us:
        // poll /proc with a deadline.
        loop {
            let live = self.live_children();
            if live.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= until {
                return Err(live);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits (blocking) up to `limit` for the exit; true if it exited.
    fn exited_within(&self, limit: Duration) -> bool {
        let guard = lock(&self.exit.status);
        let (guard, _) = self
            .exit
            .changed
            .wait_timeout_while(guard, limit, |s| s.is_none())
            .unwrap_or_else(|p| p.into_inner());
        guard.is_some()
    }
}

impl Drop for MasterProcess {
    fn drop(&mut self) {
        // Stop the master the way an operator would, then for sure.
        if !self.exited_within(Duration::ZERO) {
            let _ = kill(pid(self.pid), Signal::SIGTERM);
            if !self.exited_within(STOP_GRACE) {
                eprintln!(
                    "warning: master {} ignored SIGTERM for {STOP_GRACE:?}; sending SIGKILL",
                    self.pid
                );
                let _ = kill(pid(self.pid), Signal::SIGKILL);
                self.exited_within(STOP_GRACE);
            }
        }
        // Never leave processes behind, even if the master did.
        let leftovers = self.live_children();
        if !leftovers.is_empty() {
            eprintln!("warning: cluster children outlived the master; killing {leftovers:?}");
            for child in leftovers {
                let _ = kill(pid(child), Signal::SIGKILL);
            }
        }
    }
}

/// Drains one of the master's pipes on a thread.
fn drain(pipe: impl Read + Send + 'static, output: Arc<Output>, is_stderr: bool) {
    let at_eof = output.clone();
    procs::pump_lines(
        pipe,
        move |text| {
            let own = if is_stderr {
                &output.stderr
            } else {
                &output.stdout
            };
            lock(own).push_str(text);
            lock(&output.both).push_str(text);
            output.lines.send_modify(|n| *n += 1);
        },
        move || at_eof.closed.send_modify(|n| *n += 1),
    );
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn pid(pid: u32) -> Pid {
    Pid::from_raw(i32::try_from(pid).expect("pid fits i32"))
}
