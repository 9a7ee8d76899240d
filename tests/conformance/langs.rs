//! The languages under test: finding each toolchain, installing its
//! packages into `<repo>/.deps/`, generating its gRPC code and building its
//! conformance worker — once per test process, cached across runs.
//!
//! Everything lands in ignored folders under `<repo>/.deps/`, keyed by a hash
//! of what it was made from (the proto, the lock files, the sources, the
//! toolchain's version), and appears there by an atomic rename, so a second
//! run skips straight to the tests and two runs at once cannot see each
//! other's half-made folders. A missing toolchain is a skip (see
//! [`Prepared::Skipped`]); a failing install or build is a failure.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

/// Pinned code generators for Go (`go install`).
const PROTOC_GEN_GO: &str = "google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.11";
const PROTOC_GEN_GO_GRPC: &str = "google.golang.org/grpc/cmd/protoc-gen-go-grpc@v1.6.2";

/// How long one install or build step may take (downloads on a cold machine).
const STEP_TIMEOUT: Duration = Duration::from_secs(900);

/// A language with a conformance worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Lang {
    /// The Rust SDK (`worker-sdk`): this test binary, re-executed.
    Rust,
    /// `examples/python/`: grpcio.
    Python,
    /// `examples/node/`: @grpc/grpc-js.
    Node,
    /// `examples/go/`: google.golang.org/grpc.
    Go,
}

impl Lang {
    /// Every language, in the order mixed clusters use for slots 1..=4.
    pub const ALL: [Lang; 4] = [Lang::Rust, Lang::Python, Lang::Node, Lang::Go];

    /// The name workers report in their `hello` (`lang`).
    pub fn name(self) -> &'static str {
        match self {
            Lang::Rust => "rust",
            Lang::Python => "python",
            Lang::Node => "node",
            Lang::Go => "go",
        }
    }
}

/// How to start one language's conformance worker.
#[derive(Clone, Debug)]
pub struct Launch {
    /// The program and its arguments.
    pub argv: Vec<String>,
    /// Environment it needs (merged into the cluster's `[app].env`).
    pub env: Vec<(String, String)>,
}

/// The outcome of preparing a language.
#[derive(Clone, Debug)]
pub enum Prepared {
    /// Ready to launch.
    Ready(Launch),
    /// The toolchain (named) is not installed on this machine.
    Skipped(String),
    /// Installing or building failed; the text says how.
    Failed(String),
}

/// The environment variable that turns a skipped language into a failure.
pub const REQUIRE_ALL: &str = "CLUTCH_REQUIRE_ALL_LANGUAGES";

/// Prepares `lang` once per test process; later calls return the same result.
pub fn prepare(lang: Lang) -> Prepared {
    static CELLS: [OnceLock<Prepared>; 4] = [
        OnceLock::new(),
        OnceLock::new(),
        OnceLock::new(),
        OnceLock::new(),
    ];
    let i = Lang::ALL
        .iter()
        .position(|&l| l == lang)
        .expect("a known language");
    CELLS[i]
        .get_or_init(|| {
            let started = std::time::Instant::now();
            let prepared = match lang {
                Lang::Rust => rust(),
                Lang::Python => python(),
                Lang::Node => node(),
                Lang::Go => go(),
            };
            let prepared = match prepared {
                Ok(p) => p,
                Err(e) => Prepared::Failed(e),
            };
            if started.elapsed() > Duration::from_secs(2) {
                say(&format!(
                    "{} prepared in {:.1} s",
                    lang.name(),
                    started.elapsed().as_secs_f64()
                ));
            }
            prepared
        })
        .clone()
}

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("master/ has a parent")
        .to_owned()
}

fn deps() -> PathBuf {
    repo().join(".deps")
}

/// Prints to the real stderr, past the test harness's output capture, so
/// progress and skips show in a plain `cargo test`.
pub fn say(line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "conformance: {line}");
}

/// Like [`say`], with the line starting with the text itself (for SKIPPED).
pub fn shout(line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{line}");
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

// ---- Rust ---------------------------------------------------------------------

/// The name of the test function that turns this test binary into the Rust
/// conformance worker (see `main.rs`).
pub const RUST_WORKER_TEST: &str = "rust_conformance_worker_process";
/// Set in the re-executed test binary's environment.
pub const RUST_WORKER_ENV: &str = "CLUTCH_CONFORMANCE_RUST_WORKER";

fn rust() -> Result<Prepared, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this test binary: {e}"))?;
    Ok(Prepared::Ready(Launch {
        argv: vec![
            path_str(&exe),
            "--exact".into(),
            RUST_WORKER_TEST.into(),
            "--nocapture".into(),
            "--test-threads=1".into(),
            "--quiet".into(),
        ],
        env: vec![(RUST_WORKER_ENV.into(), "1".into())],
    }))
}

// ---- Python -------------------------------------------------------------------

fn python() -> Result<Prepared, String> {
    let Some(version) = probe("python3", &["--version"]) else {
        return Ok(Prepared::Skipped("python3".into()));
    };
    if probe("python3", &["-m", "pip", "--version"]).is_none() {
        return Ok(Prepared::Skipped("pip (python3 -m pip)".into()));
    }
    let dir = repo().join("examples/python");
    let requirements = dir.join("requirements.txt");
    let key = hash(&[
        read(&requirements)?.as_slice(),
        version.as_bytes(),
        read(&repo().join("proto/clutch/v1/messenger.proto"))?.as_slice(),
    ]);
    let root = deps().join("python");
    let target = cached(&root.join(format!("packages-{key}")), |tmp| {
        say("installing the Python packages (grpcio, grpcio-tools) into .deps/python (first run only)");
        run(Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--no-input",
                "--quiet",
            ])
            .arg("--target")
            .arg(tmp)
            .arg("-r")
            .arg(&requirements))
    })?;
    let gen = cached(&root.join(format!("gen-{key}")), |tmp| {
        run(Command::new("python3")
            .env("PYTHONPATH", &target)
            .args(["-m", "grpc_tools.protoc"])
            .arg(format!("-I{}", repo().join("proto").display()))
            .arg(format!("--python_out={}", tmp.display()))
            .arg(format!("--grpc_python_out={}", tmp.display()))
            .arg(repo().join("proto/clutch/v1/messenger.proto")))
    })?;
    let pythonpath = [target, gen, dir.clone()]
        .iter()
        .map(|p| path_str(p))
        .collect::<Vec<_>>()
        .join(":");
    Ok(Prepared::Ready(Launch {
        argv: vec![
            "python3".into(),
            path_str(&dir.join("conformance_worker.py")),
        ],
        env: vec![
            ("PYTHONPATH".into(), pythonpath),
            ("PYTHONDONTWRITEBYTECODE".into(), "1".into()),
            ("PYTHONUNBUFFERED".into(), "1".into()),
        ],
    }))
}

// ---- Node -----------------------------------------------------------------------

fn node() -> Result<Prepared, String> {
    let Some(version) = probe("node", &["--version"]) else {
        return Ok(Prepared::Skipped("node".into()));
    };
    if probe("npm", &["--version"]).is_none() {
        return Ok(Prepared::Skipped("npm".into()));
    }
    let dir = repo().join("examples/node");
    let manifest = read(&dir.join("package.json"))?;
    let lock = read(&dir.join("package-lock.json"))?;
    let key = hash(&[manifest.as_slice(), lock.as_slice(), version.as_bytes()]);
    let packages = cached(
        &deps().join("node").join(format!("packages-{key}")),
        |tmp| {
            say("installing the Node packages (@grpc/grpc-js, @grpc/proto-loader) into .deps/node (first run only)");
            std::fs::write(tmp.join("package.json"), &manifest).map_err(|e| e.to_string())?;
            std::fs::write(tmp.join("package-lock.json"), &lock).map_err(|e| e.to_string())?;
            run(Command::new("npm").current_dir(tmp).args([
                "ci",
                "--no-audit",
                "--no-fund",
                "--ignore-scripts",
                "--loglevel=error",
            ]))
        },
    )?;
    Ok(Prepared::Ready(Launch {
        argv: vec!["node".into(), path_str(&dir.join("conformance-worker.js"))],
        env: vec![("NODE_PATH".into(), path_str(&packages.join("node_modules")))],
    }))
}

// ---- Go ---------------------------------------------------------------------------

/// Environment for every `go` command: modules in `.deps`, no toolchain
/// downloads, nothing written to the source tree.
fn go_env(cmd: &mut Command) -> &mut Command {
    let mut flags = std::env::var("GOFLAGS").unwrap_or_default();
    flags.push_str(" -modcacherw -buildvcs=false");
    cmd.env("GOTOOLCHAIN", "local")
        .env("GOMODCACHE", deps().join("go/mod"))
        .env("GOFLAGS", flags.trim())
}

fn go() -> Result<Prepared, String> {
    let Some(version) = probe("go", &["version"]) else {
        return Ok(Prepared::Skipped("go".into()));
    };
    let root = deps().join("go");
    let tools_key = hash(&[
        PROTOC_GEN_GO.as_bytes(),
        PROTOC_GEN_GO_GRPC.as_bytes(),
        version.as_bytes(),
    ]);
    let tools = cached(&root.join(format!("tools-{tools_key}")), |tmp| {
        say("installing protoc-gen-go and protoc-gen-go-grpc into .deps/go (first run only)");
        for tool in [PROTOC_GEN_GO, PROTOC_GEN_GO_GRPC] {
            run(go_env(&mut Command::new("go"))
                .env("GOBIN", tmp)
                .args(["install", tool]))?;
        }
        Ok(())
    })?;

    let src = repo().join("examples/go");
    let mut files = Vec::new();
    collect_files(&src, &mut files)?;
    files.retain(|f| {
        let rel = f.strip_prefix(&src).unwrap_or(f);
        !(rel.starts_with("gen") || rel.starts_with("bin"))
    });
    files.sort();
    let mut parts: Vec<Vec<u8>> = vec![
        version.clone().into_bytes(),
        tools_key.clone().into_bytes(),
        read(&repo().join("proto/clutch/v1/messenger.proto"))?,
    ];
    for f in &files {
        parts.push(path_str(f.strip_prefix(&src).unwrap_or(f)).into_bytes());
        parts.push(read(f)?);
    }
    let key = hash(&parts.iter().map(Vec::as_slice).collect::<Vec<_>>());
    let build = cached(&root.join(format!("build-{key}")), |out| {
        say("generating the Go gRPC code and building the Go conformance worker");
        // Build from a copy, so the source tree gets no generated files.
        let work = out.join("src");
        for f in &files {
            let to = work.join(f.strip_prefix(&src).unwrap_or(f));
            std::fs::create_dir_all(to.parent().expect("a file has a parent"))
                .map_err(|e| e.to_string())?;
            std::fs::copy(f, &to).map_err(|e| format!("copy {}: {e}", f.display()))?;
        }
        let path = format!(
            "{}:{}",
            tools.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        run(Command::new(clutch::VENDORED_PROTOC)
            .current_dir(&work)
            .env("PATH", &path)
            .arg(format!("-I{}", repo().join("proto").display()))
            .args([
                "--go_out=.",
                "--go_opt=module=clutch",
                "--go-grpc_out=.",
                "--go-grpc_opt=module=clutch",
            ])
            .arg(repo().join("proto/clutch/v1/messenger.proto")))?;
        run(go_env(&mut Command::new("go"))
            .current_dir(&work)
            .arg("build")
            .arg("-o")
            .arg(out.join("bin").join("conformance-worker"))
            .arg("./cmd/conformance-worker"))?;
        std::fs::remove_dir_all(&work).map_err(|e| e.to_string())
    })?;
    Ok(Prepared::Ready(Launch {
        argv: vec![path_str(&build.join("bin/conformance-worker"))],
        env: Vec::new(),
    }))
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), String> {
    for entry in std::fs::read_dir(dir).map_err(|e| format!("read {}: {e}", dir.display()))? {
        let entry = entry.map_err(|e| e.to_string())?;
        let path = entry.path();
        if entry.file_type().map_err(|e| e.to_string())?.is_dir() {
            collect_files(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

// ---- helpers ----------------------------------------------------------------------

/// Runs `program args` and returns its first output line, or None if it
/// cannot be run or fails: the toolchain is missing.
fn probe(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    Some(text.lines().next().unwrap_or("").trim().to_owned())
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("read {}: {e}", path.display()))
}

/// A cache key: a hash of the parts (lengths included, so no two splits of
/// the same bytes collide).
fn hash(parts: &[&[u8]]) -> String {
    let mut h = DefaultHasher::new();
    for p in parts {
        p.len().hash(&mut h);
        p.hash(&mut h);
    }
    format!("{:016x}", h.finish())
}

/// Returns `dir`, making it first with `make` (into a temp folder beside
/// it, then renamed into place) if it does not exist yet.
fn cached(dir: &Path, make: impl FnOnce(&Path) -> Result<(), String>) -> Result<PathBuf, String> {
    if dir.is_dir() {
        return Ok(dir.to_owned());
    }
    let parent = dir.parent().expect("cache dirs have a parent");
    std::fs::create_dir_all(parent).map_err(|e| format!("create {}: {e}", parent.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempdir_in(parent)
        .map_err(|e| format!("create a temp dir in {}: {e}", parent.display()))?;
    make(tmp.path())?;
    let tmp = tmp.keep();
    if std::fs::rename(&tmp, dir).is_err() {
        // Another run made it first; use theirs.
        let _ = std::fs::remove_dir_all(&tmp);
        if !dir.is_dir() {
            return Err(format!(
                "cannot move {} to {}",
                tmp.display(),
                dir.display()
            ));
        }
    }
    Ok(dir.to_owned())
}

/// Runs a setup command to completion (with a generous timeout) and turns a
/// failure into a message with its output.
fn run(cmd: &mut Command) -> Result<(), String> {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {what}: {e}"))?;
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
    let (tx, rx) = std::sync::mpsc::channel();
    let pid = child.id();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let status = match rx.recv_timeout(STEP_TIMEOUT) {
        Ok(status) => status.map_err(|e| format!("{what}: {e}"))?,
        Err(_) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            return Err(format!("{what} took longer than {STEP_TIMEOUT:?}"));
        }
    };
    let (out, err) = (
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    );
    if status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what} failed ({status})\n--- stdout ---\n{out}\n--- stderr ---\n{err}"
        ))
    }
}
