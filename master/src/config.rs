//! The master's configuration: a TOML file, overridden by command-line flags.
//!
//! Every key is documented in the README's config reference. Unknown keys are
//! an error that names the key, so a typo never silently falls back to a
//! default.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde::Deserialize;

use crate::mailbox::Bounds;
use crate::restart::{OnLimit, Policy};
use crate::router::Limits;

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The reason.
        source: std::io::Error,
    },
    /// The config file is not valid TOML or has unknown or mistyped keys.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// toml's explanation, which names the key and the line.
        message: String,
    },
    /// A value is out of range.
    #[error("{key}: {message}")]
    Invalid {
        /// The key, as written in the file (or the flag).
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// Command line of the `master` binary.
#[derive(Debug, Parser)]
#[command(
    name = "master",
    version,
    about = "Clutch master: launches an agent and N app workers, supervises them and routes their messages",
    long_about = "Clutch master: launches an agent and N app workers, supervises them and routes their \
                  messages with Egg.js's messenger semantics over gRPC.\n\n\
                  With no agent or app command configured, it runs a built-in demo cluster."
)]
pub struct Cli {
    /// A hidden child mode (the built-in demo's agent and workers).
    #[command(subcommand)]
    pub child: Option<ChildMode>,
    /// Settings shared with the config file.
    #[command(flatten)]
    pub flags: Flags,
}

/// The built-in demo children: the master's own binary in a hidden mode.
#[derive(Debug, Subcommand)]
pub enum ChildMode {
    /// Run as the demo agent.
    #[command(name = "__demo-agent", hide = true)]
    DemoAgent,
    /// Run as a demo app worker.
    #[command(name = "__demo-app", hide = true)]
    DemoApp,
}

/// Flags that override the config file.
#[derive(Debug, Default, Args)]
pub struct Flags {
    /// TOML config file (see the README for every key).
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address of the gRPC listener: IP:PORT or unix:/path [default: 127.0.0.1:0, a free port].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Allow a listen address that is not loopback (the cluster's API is then
    /// reachable from other machines; only the admin token protects it).
    #[arg(long)]
    pub allow_remote: bool,
    /// Where to write the admin token (mode 0600) [default: $XDG_RUNTIME_DIR/clutch-PID/admin.token].
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Number of app workers [default: the CPU count, cgroup quota honoured].
    #[arg(long, short = 'w', value_name = "N")]
    pub workers: Option<usize>,
    /// Write the bound listen address to this file once listening.
    #[arg(long, value_name = "FILE")]
    pub addr_file: Option<PathBuf>,
    /// Command for the agent [default: the built-in demo agent].
    #[arg(long, value_name = "PROGRAM")]
    pub agent_command: Option<String>,
    /// An argument for the agent command (repeat for more).
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    pub agent_arg: Vec<String>,
    /// An environment variable for the agent, KEY=VALUE (repeat for more).
    #[arg(long, value_name = "KEY=VALUE", value_parser = parse_env_pair)]
    pub agent_env: Vec<(String, String)>,
    /// Working directory of the agent.
    #[arg(long, value_name = "DIR")]
    pub agent_cwd: Option<PathBuf>,
    /// Command for the app workers [default: the built-in demo worker].
    #[arg(long, value_name = "PROGRAM")]
    pub app_command: Option<String>,
    /// An argument for the app command (repeat for more).
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    pub app_arg: Vec<String>,
    /// An environment variable for the app workers, KEY=VALUE (repeat for more).
    #[arg(long, value_name = "KEY=VALUE", value_parser = parse_env_pair)]
    pub app_env: Vec<(String, String)>,
    /// Working directory of the app workers.
    #[arg(long, value_name = "DIR")]
    pub app_cwd: Option<PathBuf>,
}

fn parse_env_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// The config file, as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    listen: Option<String>,
    allow_remote: Option<bool>,
    workers: Option<usize>,
    addr_file: Option<PathBuf>,
    agent: Option<ChildFile>,
    app: Option<ChildFile>,
    limits: Option<LimitsFile>,
    timeouts: Option<TimeoutsFile>,
    restart: Option<RestartFile>,
    admin: Option<AdminFile>,
    latency: Option<LatencyFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LatencyFile {
    idle_spin_us: Option<u64>,
}

/// The default polling window after a frame: longer than a round trip
/// between two children through the master on a small VM (~90 µs), so a
/// conversation's next frame finds its receiver awake.
pub const DEFAULT_IDLE_SPIN: Duration = Duration::from_micros(200);
/// The longest polling window accepted: past this, polling only burns CPU.
pub const MAX_IDLE_SPIN_US: u64 = 10_000;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminFile {
    token: Option<String>,
    token_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChildFile {
    command: Option<String>,
    args: Option<Vec<String>>,
    env: Option<BTreeMap<String, String>>,
    cwd: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsFile {
    slow_consumer: Option<SlowConsumerFile>,
    max_pending_streams: Option<usize>,
    max_connections: Option<usize>,
    max_action_bytes: Option<usize>,
    max_payload_bytes: Option<usize>,
    mailbox_messages: Option<usize>,
    mailbox_bytes: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TimeoutsFile {
    register_ms: Option<u64>,
    handshake_ms: Option<u64>,
    shutdown_ms: Option<u64>,
    flow_ms: Option<u64>,
    agent_start_ms: Option<u64>,
    app_start_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RestartFile {
    backoff_initial_ms: Option<u64>,
    backoff_max_ms: Option<u64>,
    stable_ms: Option<u64>,
    max_restarts: Option<u32>,
    window_ms: Option<u64>,
    on_limit: Option<OnLimitFile>,
    agent_backoff_initial_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum SlowConsumerFile {
    Drop,
    Restart,
}

/// What to do with a receiver that stops reading its messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlowConsumer {
    /// Refuse what overflows its mailbox and report it to the senders.
    Drop,
    /// The same, and restart the process (shutdown notice, SIGTERM, SIGKILL).
    Restart,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum OnLimitFile {
    Stop,
    KeepRunning,
}

/// How to launch one kind of child.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChildSpec {
    /// The program.
    pub command: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// Extra environment, on top of the master's own and the `CLUTCH_*` set.
    pub env: BTreeMap<String, String>,
    /// Working directory; the master's when `None`.
    pub cwd: Option<PathBuf>,
    /// True for the built-in demo child (for logs only).
    pub builtin: bool,
}

/// Where the master listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A Unix domain socket (grpcurl reaches it with `-unix`).
    Unix(PathBuf),
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Tcp(a) => write!(f, "{a}"),
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// The resolved configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where the gRPC listener binds.
    pub listen: Listen,
    /// Number of app workers (N).
    pub workers: usize,
    /// Where to write the bound address, if anywhere.
    pub addr_file: Option<PathBuf>,
    /// How to launch the agent.
    pub agent: ChildSpec,
    /// How to launch each app worker.
    pub app: ChildSpec,
    /// Send and mailbox limits.
    pub limits: Limits,
    /// How long a new stream may take to register.
    pub register_timeout: Duration,
    /// How many streams may wait to register at once.
    pub max_pending_streams: usize,
    /// How many connections may be open at once.
    pub max_connections: usize,
    /// How long a new connection may take to send its first bytes.
    pub handshake_timeout: Duration,
    /// What to do with a receiver that stops reading.
    pub slow_consumer: SlowConsumer,
    /// How long each shutdown phase waits before SIGKILL.
    pub shutdown_timeout: Duration,
    /// How long a sender waits on a congested receiver.
    pub flow_wait: Duration,
    /// How long stream tasks (the master's and the Rust SDK's) keep polling
    /// after a frame before they sleep.
    pub idle_spin: Duration,
    /// Spawn-to-ready deadline of the agent.
    pub agent_start_timeout: Duration,
    /// Spawn-to-ready deadline of each app worker.
    pub app_start_timeout: Duration,
    /// Restart rules for the agent.
    pub agent_restart: Policy,
    /// Restart rules for the app workers.
    pub app_restart: Policy,
    /// The admin token, when configured (else one is generated at start).
    pub admin_token: Option<String>,
    /// Where the admin token is written.
    pub token_file: PathBuf,
}

/// The CPU count, honouring cgroup quotas (Egg over-forks in containers).
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

impl Config {
    /// Reads the config file named by the flags (if any) and applies the flags.
    pub fn load(flags: Flags) -> Result<Config, ConfigError> {
        let file = match &flags.config {
            Some(path) => read_file(path)?,
            None => File::default(),
        };
        Self::resolve(file, flags)
    }

    fn resolve(file: File, flags: Flags) -> Result<Config, ConfigError> {
        let listen_text = flags
            .listen
            .or(file.listen)
            .unwrap_or_else(|| "127.0.0.1:0".into());
        let allow_remote = flags.allow_remote || file.allow_remote.unwrap_or(false);
        let listen = parse_listen(&listen_text, allow_remote)?;
        let admin = file.admin.unwrap_or_default();
        let admin_token = std::env::var("CLUTCH_ADMIN_TOKEN")
            .ok()
            .or(admin.token)
            .filter(|t| !t.trim().is_empty());
        if admin_token.as_ref().is_some_and(|t| t.len() < 16) {
            return Err(ConfigError::Invalid {
                key: "admin.token",
                message: "must be at least 16 characters".into(),
            });
        }
        let token_file = flags
            .token_file
            .or(admin.token_file)
            .unwrap_or_else(crate::auth::default_token_file);
        let workers = flags
            .workers
            .or(file.workers)
            .unwrap_or_else(default_workers);
        if workers == 0 {
            return Err(ConfigError::Invalid {
                key: "workers",
                message: "must be at least 1".into(),
            });
        }
        let agent = child_spec(
            file.agent.unwrap_or_default(),
            ChildFlags {
                command: flags.agent_command,
                args: flags.agent_arg,
                env: flags.agent_env,
                cwd: flags.agent_cwd,
            },
            "__demo-agent",
        )?;
        let app = child_spec(
            file.app.unwrap_or_default(),
            ChildFlags {
                command: flags.app_command,
                args: flags.app_arg,
                env: flags.app_env,
                cwd: flags.app_cwd,
            },
            "__demo-app",
        )?;
        let defaults = Limits::default();
        let l = file.limits.unwrap_or_default();
        let limits = Limits {
            max_action_bytes: positive(
                "limits.max_action_bytes",
                l.max_action_bytes,
                defaults.max_action_bytes,
            )?,
            max_payload_bytes: positive(
                "limits.max_payload_bytes",
                l.max_payload_bytes,
                defaults.max_payload_bytes,
            )?,
            mailbox: Bounds {
                messages: positive(
                    "limits.mailbox_messages",
                    l.mailbox_messages,
                    defaults.mailbox.messages,
                )?,
                bytes: positive(
                    "limits.mailbox_bytes",
                    l.mailbox_bytes,
                    defaults.mailbox.bytes,
                )?,
            },
        };
        let t = file.timeouts.unwrap_or_default();
        let r = file.restart.unwrap_or_default();
        let d = Policy::default();
        let dur = |key, v: Option<u64>, default: Duration| -> Result<Duration, ConfigError> {
            positive(key, v.map(|v| v as usize), default.as_millis() as usize)
                .map(|v| Duration::from_millis(v as u64))
        };
        let app_restart = Policy {
            backoff_initial: dur(
                "restart.backoff_initial_ms",
                r.backoff_initial_ms,
                d.backoff_initial,
            )?,
            backoff_max: dur("restart.backoff_max_ms", r.backoff_max_ms, d.backoff_max)?,
            stable_after: dur("restart.stable_ms", r.stable_ms, d.stable_after)?,
            max_restarts: r.max_restarts.unwrap_or(d.max_restarts),
            window: dur("restart.window_ms", r.window_ms, d.window)?,
            on_limit: match r.on_limit {
                None | Some(OnLimitFile::Stop) => OnLimit::Stop,
                Some(OnLimitFile::KeepRunning) => OnLimit::KeepRunning,
            },
        };
        let agent_restart = Policy {
            backoff_initial: dur(
                "restart.agent_backoff_initial_ms",
                r.agent_backoff_initial_ms,
                app_restart.backoff_initial,
            )?,
            ..app_restart
        };
        let ms = |key, v: Option<u64>, default: u64| {
            positive(key, v.map(|v| v as usize), default as usize)
                .map(|v| Duration::from_millis(v as u64))
        };
        Ok(Config {
            listen,
            workers,
            addr_file: flags.addr_file.or(file.addr_file),
            agent,
            app,
            limits,
            register_timeout: ms("timeouts.register_ms", t.register_ms, 10_000)?,
            max_pending_streams: positive("limits.max_pending_streams", l.max_pending_streams, 64)?,
            max_connections: match l.max_connections {
                // One connection per child, and room for an operator.
                Some(n) if n < workers + 2 => {
                    return Err(ConfigError::Invalid {
                        key: "limits.max_connections",
                        message: format!(
                            "is {n}, but this cluster needs at least {} (one per child: the agent and {workers} app workers, and one for an operator)",
                            workers + 2
                        ),
                    })
                }
                Some(n) => n,
                None => 1024,
            },
            handshake_timeout: ms("timeouts.handshake_ms", t.handshake_ms, 10_000)?,
            slow_consumer: match l.slow_consumer {
                None | Some(SlowConsumerFile::Drop) => SlowConsumer::Drop,
                Some(SlowConsumerFile::Restart) => SlowConsumer::Restart,
            },
            shutdown_timeout: ms("timeouts.shutdown_ms", t.shutdown_ms, 5_000)?,
            flow_wait: ms("timeouts.flow_ms", t.flow_ms, 500)?,
            idle_spin: match file.latency.unwrap_or_default().idle_spin_us {
                None => DEFAULT_IDLE_SPIN,
                Some(us) if us > MAX_IDLE_SPIN_US => {
                    return Err(ConfigError::Invalid {
                        key: "latency.idle_spin_us",
                        message: format!(
                            "is {us}; the limit is {MAX_IDLE_SPIN_US} (polling longer only burns CPU; 0 turns it off)"
                        ),
                    })
                }
                Some(us) => Duration::from_micros(us),
            },
            agent_start_timeout: ms("timeouts.agent_start_ms", t.agent_start_ms, 30_000)?,
            app_start_timeout: ms("timeouts.app_start_ms", t.app_start_ms, 30_000)?,
            agent_restart,
            app_restart,
            admin_token,
            token_file,
        })
    }
}

/// `IP:PORT` (loopback unless `allow_remote`) or `unix:/path`.
fn parse_listen(text: &str, allow_remote: bool) -> Result<Listen, ConfigError> {
    if let Some(path) = text.strip_prefix("unix:") {
        if path.is_empty() {
            return Err(ConfigError::Invalid {
                key: "listen",
                message: "unix: needs a path, as in unix:/run/clutch.sock".into(),
            });
        }
        return Ok(Listen::Unix(PathBuf::from(path)));
    }
    let addr: SocketAddr = text.parse().map_err(|e| ConfigError::Invalid {
        key: "listen",
        message: format!("{text:?} is not IP:PORT or unix:/path ({e})"),
    })?;
    if !addr.ip().is_loopback() && !allow_remote {
        return Err(ConfigError::Invalid {
            key: "listen",
            message: format!("{addr} is not a loopback address; set allow_remote = true (or --allow-remote) to listen there"),
        });
    }
    Ok(Listen::Tcp(addr))
}

fn read_file(path: &Path) -> Result<File, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

fn positive(key: &'static str, value: Option<usize>, default: usize) -> Result<usize, ConfigError> {
    match value {
        Some(0) => Err(ConfigError::Invalid {
            key,
            message: "must be greater than 0".into(),
        }),
        Some(v) => Ok(v),
        None => Ok(default),
    }
}

struct ChildFlags {
    command: Option<String>,
    args: Vec<String>,
    env: Vec<(String, String)>,
    cwd: Option<PathBuf>,
}

/// Flags win over the file; env pairs from flags are added to the file's.
fn child_spec(
    file: ChildFile,
    flags: ChildFlags,
    demo_mode: &str,
) -> Result<ChildSpec, ConfigError> {
    let command = flags.command.or(file.command);
    let mut env = file.env.unwrap_or_default();
    env.extend(flags.env);
    let cwd = flags.cwd.or(file.cwd);
    Ok(match command {
        Some(command) => ChildSpec {
            command: PathBuf::from(command),
            args: if flags.args.is_empty() {
                file.args.unwrap_or_default()
            } else {
                flags.args
            },
            env,
            cwd,
            builtin: false,
        },
        None => {
            let exe = std::env::current_exe().map_err(|e| ConfigError::Invalid {
                key: "command",
                message: format!("no command configured and the master's own path (for the demo) is unknown: {e}"),
            })?;
            ChildSpec {
                command: exe,
                args: vec![demo_mode.to_owned()],
                env,
                cwd,
                builtin: true,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let file: File = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: "test.toml".into(),
            message: e.to_string(),
        })?;
        Config::resolve(file, Flags::default())
    }

    proptest::proptest! {
        /// Config text is untrusted input: any string parses or fails with
        /// an error, never a panic.
        #[test]
        fn arbitrary_config_text_never_panics(text in "\\PC{0,300}") {
            let _ = parse(&text);
        }

        /// Including text shaped like the real thing.
        #[test]
        fn config_like_text_never_panics(
            key in "(listen|workers|addr_file|agent|app|limits|timeouts|restart|admin)",
            value in "(\"[ -~]{0,20}\"|-?[0-9]{1,25}|true|\\[\\]|\\{\\})",
        ) {
            let _ = parse(&format!("{key} = {value}"));
        }
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = parse("workerz = 3")
            .expect_err("unknown key accepted")
            .to_string();
        assert!(err.contains("workerz"), "{err}");
        let err = parse("[agent]\ncomand = \"x\"")
            .expect_err("unknown nested key accepted")
            .to_string();
        assert!(err.contains("comand"), "{err}");
    }

    #[test]
    fn flags_override_the_file() {
        let file: File = toml::from_str(
            "workers = 3\nlisten = \"127.0.0.1:7000\"\n[app]\ncommand = \"py\"\nargs = [\"a\"]",
        )
        .expect("valid toml");
        let flags = Flags {
            workers: Some(5),
            app_arg: vec!["b".into()],
            app_env: vec![("K".into(), "V".into())],
            ..Flags::default()
        };
        let c = Config::resolve(file, flags).expect("valid config");
        assert_eq!(c.workers, 5);
        assert_eq!(
            c.listen,
            Listen::Tcp("127.0.0.1:7000".parse().expect("addr"))
        );
        assert_eq!(c.app.command, PathBuf::from("py"));
        assert_eq!(c.app.args, vec!["b".to_string()]);
        assert_eq!(c.app.env.get("K").map(String::as_str), Some("V"));
        assert!(c.agent.builtin);
    }

    /// The README's configuration reference is a real config: every key it
    /// documents exists and its example values are valid.
    #[test]
    fn the_readme_config_reference_parses() {
        let readme = include_str!("../../README.md");
        let section = readme
            .split("## Configuration")
            .nth(1)
            .expect("the README has a Configuration section");
        let block = section
            .split("```toml\n")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .expect("a toml block in the Configuration section");
        let c = parse(block).unwrap_or_else(|e| panic!("the README's config: {e}"));
        assert_eq!(c.workers, 4);
        assert_eq!(c.max_connections, 1024);
        assert_eq!(c.idle_spin, DEFAULT_IDLE_SPIN);
    }

    #[test]
    fn the_idle_spin_window_is_microseconds_zero_turns_it_off_and_it_is_bounded() {
        assert_eq!(parse("").expect("empty").idle_spin, DEFAULT_IDLE_SPIN);
        let c = parse("[latency]\nidle_spin_us = 0").expect("off");
        assert_eq!(c.idle_spin, Duration::ZERO);
        let c = parse("[latency]\nidle_spin_us = 50").expect("50 µs");
        assert_eq!(c.idle_spin, Duration::from_micros(50));
        let err = parse("[latency]\nidle_spin_us = 10001")
            .expect_err("a window past the bound accepted")
            .to_string();
        assert!(err.starts_with("latency.idle_spin_us:"), "{err}");
        assert!(err.contains("10000"), "{err}");
        let err = parse("[latency]\nspin = 5")
            .expect_err("unknown key accepted")
            .to_string();
        assert!(err.contains("spin"), "{err}");
    }

    #[test]
    fn bad_values_are_refused_with_the_key() {
        let err = parse("workers = 0")
            .expect_err("0 workers accepted")
            .to_string();
        assert!(err.starts_with("workers:"), "{err}");
        let err = parse("listen = \"localhost\"")
            .expect_err("bad listen accepted")
            .to_string();
        assert!(err.starts_with("listen:"), "{err}");
        let err = parse("listen = \"0.0.0.0:7000\"")
            .expect_err("remote listen accepted")
            .to_string();
        assert!(err.contains("allow_remote"), "{err}");
        assert!(parse("listen = \"0.0.0.0:7000\"\nallow_remote = true").is_ok());
        assert_eq!(
            parse("listen = \"unix:/tmp/c.sock\"").expect("unix").listen,
            Listen::Unix("/tmp/c.sock".into())
        );
        let err = parse("[admin]\ntoken = \"short\"")
            .expect_err("short token accepted")
            .to_string();
        assert!(err.contains("16"), "{err}");
        let err = parse("[limits]\nmailbox_messages = 0")
            .expect_err("0 mailbox accepted")
            .to_string();
        assert!(err.contains("limits.mailbox_messages"), "{err}");
        let err = parse("workers = 4\n[limits]\nmax_connections = 5")
            .expect_err("too few connections accepted")
            .to_string();
        assert!(
            err.starts_with("limits.max_connections:") && err.contains("at least 6"),
            "{err}"
        );
        let c = parse("workers = 4\n[limits]\nmax_connections = 6\n[timeouts]\nhandshake_ms = 250")
            .expect("valid limits");
        assert_eq!(c.max_connections, 6);
        assert_eq!(c.handshake_timeout, Duration::from_millis(250));
        assert!(parse("[timeouts]\nhandshake_ms = 0").is_err());
    }

    #[test]
    fn restart_rules_are_read_and_the_agent_inherits_them() {
        let c = parse("[restart]\nbackoff_initial_ms = 5\nmax_restarts = 2\non_limit = \"keep-running\"\n[timeouts]\napp_start_ms = 700")
            .expect("valid config");
        assert_eq!(c.app_restart.backoff_initial, Duration::from_millis(5));
        assert_eq!(c.app_restart.max_restarts, 2);
        assert_eq!(c.app_restart.on_limit, OnLimit::KeepRunning);
        assert_eq!(c.agent_restart.backoff_initial, Duration::from_millis(5));
        assert_eq!(c.app_start_timeout, Duration::from_millis(700));
        let err = parse("[restart]\non_limit = \"explode\"")
            .expect_err("bad policy accepted")
            .to_string();
        assert!(err.contains("explode") || err.contains("on_limit"), "{err}");
    }

    #[test]
    fn default_worker_count_is_the_cpu_count() {
        let c = parse("").expect("empty config is valid");
        assert_eq!(c.workers, default_workers());
        assert!(c.workers >= 1);
    }
}
