//! A master started by the test itself, for what the shared harness cannot
//! set: the master's own command line (`--listen unix:…`) and environment
//! (`NOTIFY_SOCKET`, `WATCHDOG_USEC`, `CLUTCH_ADMIN_TOKEN`). Its children
//! are the built-in demo agent and workers (the master's own binary), which
//! need no test controller.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::AsyncBufReadExt;
use tokio::sync::watch;

use super::support::{DEADLINE, MASTER};

/// A running master with the demo children.
pub struct Standalone {
    /// Its temp dir (token file, address file, sockets).
    pub dir: tempfile::TempDir,
    child: tokio::process::Child,
    pid: u32,
    /// Everything it wrote to stderr, and a line counter to wait on.
    log: Arc<Mutex<String>>,
    lines: watch::Receiver<u64>,
}

impl Standalone {
    /// A temp dir for a master (to prepare, e.g. a notify socket, before
    /// starting it).
    pub fn dir() -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix("clutch-op-")
            .tempdir()
            .expect("temp dir")
    }

    /// Starts `master` in `dir` with these arguments and extra environment
    /// (nothing else of the test's `CLUTCH_ADMIN_TOKEN`, `NOTIFY_SOCKET` or
    /// `WATCHDOG_*`). Arguments and values may use `{dir}` for the dir.
    pub fn start(dir: tempfile::TempDir, args: &[&str], env: &[(&str, &str)]) -> Standalone {
        let at = dir.path().display().to_string();
        let mut command = tokio::process::Command::new(MASTER);
        command
            .args(args.iter().map(|a| a.replace("{dir}", &at)))
            .env("NO_COLOR", "1")
            .env_remove("CLUTCH_ADMIN_TOKEN")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .envs(env.iter().map(|(k, v)| (k, v.replace("{dir}", &at))))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().expect("spawn the master");
        let pid = child.id().expect("a running master has a pid");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, lines) = watch::channel(0u64);
        let stderr = child.stderr.take().expect("stderr is piped");
        {
            let log = log.clone();
            tokio::spawn(async move {
                let mut reader = tokio::io::BufReader::new(stderr).lines();
                while let Ok(Some(line)) = reader.next_line().await {
                    {
                        let mut log = log.lock().expect("log lock");
                        log.push_str(&line);
                        log.push('\n');
                    }
                    tx.send_modify(|n| *n += 1);
                }
                // Closing the sender tells waiters that no line will come.
            });
        }
        Standalone {
            dir,
            child,
            pid,
            log,
            lines,
        }
    }

    /// A path in the temp dir.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The master's log so far.
    pub fn log(&self) -> String {
        self.log.lock().expect("log lock").clone()
    }

    /// Waits until the log contains `needle`.
    pub async fn wait_log(&mut self, needle: &str) {
        let until = tokio::time::Instant::now() + DEADLINE;
        loop {
            self.lines.borrow_and_update();
            if self.log().contains(needle) {
                return;
            }
            match tokio::time::timeout_at(until, self.lines.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => panic!("the master's log ended without {needle:?}:\n{}", self.log()),
                Err(_) => panic!(
                    "no {needle:?} in the master's log after {DEADLINE:?}:\n{}",
                    self.log()
                ),
            }
        }
    }

    /// Sends a signal to the master.
    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.pid as i32), signal).expect("signal the master");
    }

    /// Waits for the master to exit and for its log to be read to the end;
    /// its exit code.
    pub async fn exit(&mut self) -> Option<i32> {
        let code = match tokio::time::timeout(DEADLINE, self.child.wait()).await {
            Ok(Ok(status)) => status.code(),
            _ => panic!(
                "the master did not exit within {DEADLINE:?}:\n{}",
                self.log()
            ),
        };
        // The reader drops its sender at the end of the pipe.
        let drained = async { while self.lines.changed().await.is_ok() {} };
        if tokio::time::timeout(DEADLINE, drained).await.is_err() {
            panic!("the master exited but its stderr stayed open: did a child inherit it?");
        }
        code
    }
}

impl Drop for Standalone {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- master (pid {}) log ---\n{}", self.pid, self.log());
        }
        if let Ok(None) = self.child.try_wait() {
            // Its children die with it (parent-death signal).
            let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGTERM);
            let until = std::time::Instant::now() + Duration::from_secs(8);
            while std::time::Instant::now() < until {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
        }
    }
}
