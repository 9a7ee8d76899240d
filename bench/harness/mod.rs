//! The side-by-side benchmark of Clutch and Egg (issue: "Benchmarks side by
//! side with Egg").
//!
//! For every scenario and run the harness starts a fresh cluster of each
//! system on this machine — the real `master` with `clutch-bench-child`
//! children, and real Egg (`egg@3` from npm, `bench/egg`) — drives it over a
//! side channel, measures, and stops it before the next one starts, so no
//! two clusters ever compete for the CPU. Clutch and Egg runs alternate, so
//! slow drift of the machine affects both columns alike.
//!
//! Durations are measured on the harness's clock, from the command that
//! starts a flood to the receipt of the report of the **last delivery**;
//! memory and CPU come from `/proc`. Used by `bench/compare.rs`
//! (`cargo bench -p master --bench compare`) and `bench/smoke.rs` (the test
//! suite's smoke run).

#![allow(dead_code)]

pub mod cluster;
pub mod procfs;
pub mod report;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde_json::{json, Value};

use cluster::{Cluster, Programs, System};
use report::{row, Better, EggStatus, Recorder, Report, Unit};

/// The master binary under test.
pub const MASTER: &str = env!("CARGO_BIN_EXE_master");
/// The Rust SDK bench child.
pub const CHILD: &str = env!("CARGO_BIN_EXE_clutch-bench-child");

/// `bench/` in the source tree.
pub fn bench_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("bench")
}

/// What to do about the Egg column.
#[derive(Clone, Debug)]
pub enum EggPolicy {
    /// Run Egg; install `egg@3` with `npm ci` first if it is missing and
    /// `install` is set.
    Run { install: bool },
    /// Do not run Egg, for this reason.
    Skip(String),
}

/// What to measure, and how much.
#[derive(Clone, Debug)]
pub struct Options {
    /// "full" or "smoke" (only a label in the report).
    pub mode: String,
    /// The command line, for the report.
    pub command: String,
    /// Runs of every scenario.
    pub runs: usize,
    /// App workers in the main scenarios.
    pub workers: u32,
    /// Messages the agent sends to all apps in the fan-out flood.
    pub fanout_messages: u64,
    /// Messages each app sends to the agent in the fan-in flood.
    pub fanin_messages: u64,
    /// Also run the fan-in flood this many times larger (Clutch only, once),
    /// to show whether peak memory depends on the flood size. 0: off.
    pub large_fanin_factor: u64,
    /// Round trips measured per run, after `rtt_warmup` unmeasured ones.
    pub rtt_count: u64,
    pub rtt_warmup: u64,
    /// App workers for the start-time scenario.
    pub start_workers: u32,
    /// Worker counts for master CPU per delivery (fan-out), per system.
    pub scale_workers: Vec<u32>,
    pub egg_scale_workers: Vec<u32>,
    /// Deliveries per scaling run (messages = this / workers).
    pub scale_deliveries: u64,
    /// Pause after egg-ready before idle memory is read.
    pub settle: Duration,
    /// Pause between clusters, so the machine is idle when the next starts.
    pub pause: Duration,
    /// Which systems to run (Egg also needs `egg` to allow it).
    pub systems: Vec<System>,
    pub egg: EggPolicy,
    /// Where to write `results-<date>.json`, `latest.json`, `latest.md`.
    pub results_dir: Option<PathBuf>,
    /// Progress lines on stderr.
    pub verbose: bool,
    /// Before every scenario run, wait until less than this share of one
    /// core was busy for a second (None: do not wait).
    pub quiet_share: Option<f64>,
    /// How long to wait for quiet before going on anyway.
    pub quiet_wait: Duration,
    /// Also time Clutch's start with the Python example worker as the app
    /// workers (needs the packages the conformance suite installs into
    /// `.deps/python`).
    pub python_start: bool,
    /// Record the Clutch master with `perf record` during every flood, into
    /// this directory (`BENCH_PERF_ARGS` overrides the sampling options).
    /// Figures taken this way are perturbed by the profiler.
    pub perf_dir: Option<PathBuf>,
    /// Run only these scenarios (`fanout`, `fanin`, `rtt`, `start`, `scale`,
    /// `python`, `large`); `None`: all of them.
    pub scenarios: Option<Vec<String>>,
}

impl Options {
    /// The full benchmark (the sizes).
    pub fn full() -> Options {
        Options {
            mode: "full".into(),
            command: "cargo bench -p master --bench compare".into(),
            runs: 5,
            workers: 2,
            fanout_messages: 1_000_000,
            fanin_messages: 1_000_000,
            large_fanin_factor: 4,
            rtt_count: 20_000,
            rtt_warmup: 2_000,
            start_workers: 4,
            scale_workers: vec![2, 8, 32, 128],
            egg_scale_workers: vec![2, 8],
            scale_deliveries: 2_000_000,
            settle: Duration::from_millis(500),
            pause: Duration::from_millis(300),
            systems: vec![System::Clutch, System::Egg],
            egg: EggPolicy::Run { install: true },
            results_dir: Some(bench_dir().join("results")),
            verbose: true,
            quiet_share: Some(0.15),
            quiet_wait: Duration::from_secs(1800),
            python_start: true,
            perf_dir: None,
            scenarios: None,
        }
    }

    /// A few thousand messages: checks that the harness works, in seconds.
    pub fn smoke() -> Options {
        Options {
            mode: "smoke".into(),
            command: "cargo bench -p master --bench compare -- --smoke".into(),
            runs: 1,
            workers: 2,
            fanout_messages: 2_000,
            fanin_messages: 2_000,
            large_fanin_factor: 2,
            rtt_count: 300,
            rtt_warmup: 50,
            start_workers: 4,
            scale_workers: vec![2, 8],
            egg_scale_workers: vec![2],
            scale_deliveries: 8_000,
            settle: Duration::from_millis(50),
            pause: Duration::from_millis(20),
            systems: vec![System::Clutch, System::Egg],
            egg: EggPolicy::Run { install: false },
            results_dir: None,
            verbose: false,
            quiet_share: None,
            quiet_wait: Duration::from_secs(0),
            python_start: false,
            perf_dir: None,
            scenarios: None,
        }
    }

    fn summary(&self) -> String {
        format!(
            "{} run(s) per scenario; {} app workers; fan-out {} msgs; fan-in {} msgs per app; {} round trips (+{} warm-up); start with {} workers; master CPU at {:?} workers (Egg {:?}), {} deliveries each; payload 64 B JSON",
            self.runs,
            self.workers,
            self.fanout_messages,
            self.fanin_messages,
            self.rtt_count,
            self.rtt_warmup,
            self.start_workers,
            self.scale_workers,
            self.egg_scale_workers,
            self.scale_deliveries
        )
    }
}

/// Runs the benchmark; writes the results if `results_dir` is set.
pub fn run(opts: &Options) -> anyhow::Result<(Report, Option<PathBuf>)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(run_async(opts))?;
    let written = match &opts.results_dir {
        Some(dir) => Some(write_results(&report, dir)?),
        None => None,
    };
    Ok((report, written))
}

/// Writes `results-<date>.json`, `latest.json` and `latest.md`.
pub fn write_results(report: &Report, dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let stamp = report.date_utc.replace([' ', ':'], "-");
    let json = serde_json::to_string_pretty(report)?;
    let path = dir.join(format!("results-{}-{stamp}.json", report.mode));
    std::fs::write(&path, &json)?;
    std::fs::write(dir.join(format!("latest-{}.json", report.mode)), &json)?;
    std::fs::write(
        dir.join(format!("latest-{}.md", report.mode)),
        report.markdown(),
    )?;
    Ok(path)
}

macro_rules! progress {
    ($opts:expr, $($arg:tt)*) => {
        if $opts.verbose {
            eprintln!($($arg)*);
        }
    };
}

struct Bench<'a> {
    opts: &'a Options,
    programs: Programs,
    rec: Recorder,
    /// Per flood run: CPU per delivery by role, for the "where it went" table.
    cpu: Vec<(System, &'static str, [f64; 4])>,
    /// Share of a core used outside the measured processes during floods.
    other_share: Vec<f64>,
    counted: [(u64, u64, u64, u64, u64); 2],
    /// The Python example worker, or why it cannot run.
    python: Result<cluster::Launch, String>,
}

fn sys_index(s: System) -> usize {
    match s {
        System::Clutch => 0,
        System::Egg => 1,
    }
}

async fn run_async(opts: &Options) -> anyhow::Result<Report> {
    let began = Instant::now();
    let load_before = procfs::loadavg();
    let busy_before = procfs::machine_busy_ns();
    let date_utc = report::utc_now();

    let (egg_status, node) = prepare_egg(opts);
    let mut systems: Vec<System> = opts
        .systems
        .iter()
        .copied()
        .filter(|s| *s == System::Clutch || egg_status.ran)
        .collect();
    systems.dedup();
    if let Some(reason) = &egg_status.reason {
        progress!(opts, "bench: Egg column not run: {reason}");
    }
    if load_before[0] > 0.5 {
        progress!(
            opts,
            "bench: warning: 1-minute load average is {:.2}: other work on this machine will skew the figures",
            load_before[0]
        );
    }

    let mut b = Bench {
        opts,
        programs: Programs {
            // `BENCH_MASTER` / `BENCH_CHILD` run other builds with this
            // harness, so an A/B comparison can alternate two versions.
            master: std::env::var_os("BENCH_MASTER")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(MASTER)),
            child: std::env::var_os("BENCH_CHILD")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(CHILD)),
            egg_dir: bench_dir().join("egg"),
            node: node.unwrap_or_else(|| PathBuf::from("node")),
        },
        rec: Recorder::default(),
        cpu: Vec::new(),
        other_share: Vec::new(),
        counted: [(0, 0, 0, 0, 0); 2],
        python: if opts.python_start {
            python_workers()
        } else {
            Err("not selected".into())
        },
    };

    for run in 0..opts.runs {
        for &sys in &systems {
            b.scenario(Scenario::FanOut, sys, run).await;
            b.scenario(Scenario::FanIn(1), sys, run).await;
            b.scenario(Scenario::RoundTrip, sys, run).await;
            b.scenario(Scenario::Start, sys, run).await;
        }
    }
    let mut counts: Vec<u32> = opts
        .scale_workers
        .iter()
        .chain(&opts.egg_scale_workers)
        .copied()
        .collect();
    counts.sort_unstable();
    counts.dedup();
    for &w in &counts {
        for run in 0..opts.runs {
            for &sys in &systems {
                let wanted = match sys {
                    System::Clutch => &opts.scale_workers,
                    System::Egg => &opts.egg_scale_workers,
                };
                if wanted.contains(&w) {
                    b.scenario(Scenario::Scale(w), sys, run).await;
                }
            }
        }
    }
    if b.python.is_ok() && systems.contains(&System::Clutch) {
        for run in 0..opts.runs {
            b.scenario(Scenario::StartPython, System::Clutch, run).await;
        }
    }
    if opts.large_fanin_factor > 1 && systems.contains(&System::Clutch) {
        b.scenario(Scenario::FanIn(opts.large_fanin_factor), System::Clutch, 0)
            .await;
    }

    // Per-run ratios of master CPU per delivery against 2 workers.
    for &sys in &systems {
        let base = b
            .rec
            .get(sys, "master_cpu_ns_w2")
            .cloned()
            .unwrap_or_default();
        for &w in &counts {
            if w == 2 {
                continue;
            }
            let at = b
                .rec
                .get(sys, &format!("master_cpu_ns_w{w}"))
                .cloned()
                .unwrap_or_default();
            for (x, y) in at.iter().zip(&base) {
                if *y > 0.0 {
                    b.rec.add(sys, &format!("master_cpu_scaling_w{w}"), x / y);
                }
            }
        }
    }

    let load_after = procfs::loadavg();
    let busy_total = procfs::machine_busy_ns()
        .zip(busy_before)
        .map(|(a, b)| a.saturating_sub(b));
    let rows = b.rows(&egg_status);
    let other = report::Stat::of(&b.other_share);
    let gate = match opts.quiet_share {
        Some(share) => format!(
            "every run started after a second with < {:.0}% of a core busy ({} of {} runs had to wait, {} started busy anyway); ",
            share * 100.0,
            b.rec.quiet_waits.iter().filter(|w| **w > 1.5).count(),
            b.rec.quiet_waits.len() + b.rec.not_quiet.len(),
            b.rec.not_quiet.len()
        ),
        None => String::new(),
    };
    let quiet_summary = format!(
        "{gate}load average {:.2} before, {:.2} after; CPU used outside the measured processes during floods: median {} of one core (max {})",
        load_before[0],
        load_after[0],
        other.as_ref().map(|s| format!("{:.0}%", s.median * 100.0)).unwrap_or_else(|| "?".into()),
        other.as_ref().map(|s| format!("{:.0}%", s.max * 100.0)).unwrap_or_else(|| "?".into()),
    );
    let cpu_by_role = b.cpu_table();
    let correctness = b.correctness(&systems);
    let machine = machine_info();
    let versions = versions(&b.programs, egg_status.ran);
    Ok(Report {
        schema: 1,
        date_utc,
        mode: opts.mode.clone(),
        command: opts.command.clone(),
        machine,
        versions,
        options: json!({
            "summary": opts.summary(),
            "runs": opts.runs,
            "workers": opts.workers,
            "fanout_messages": opts.fanout_messages,
            "fanin_messages_per_app": opts.fanin_messages,
            "large_fanin_factor": opts.large_fanin_factor,
            "rtt_count": opts.rtt_count,
            "rtt_warmup": opts.rtt_warmup,
            "start_workers": opts.start_workers,
            "scale_workers": opts.scale_workers,
            "egg_scale_workers": opts.egg_scale_workers,
            "scale_deliveries": opts.scale_deliveries,
            "settle_ms": opts.settle.as_millis() as u64,
            "bench_acks": std::env::var("BENCH_ACKS").ok(),
        }),
        egg: egg_status,
        quiet: json!({
            "summary": quiet_summary,
            "loadavg_before": load_before,
            "loadavg_after": load_after,
            "other_cpu_share_during_floods": other,
            "quiet_share_gate": opts.quiet_share,
            "quiet_wait_s": b.rec.quiet_waits,
            "started_busy": b.rec.not_quiet,
            "machine_busy_s": busy_total.map(|ns| ns as f64 / 1e9),
        }),
        rows,
        cpu_by_role,
        correctness,
        failures: b.rec.failures.clone(),
        runs: std::mem::take(&mut b.rec.runs),
        elapsed_s: began.elapsed().as_secs_f64(),
    })
}

/// What one cluster is started for.
#[derive(Clone, Copy, Debug)]
enum Scenario {
    FanOut,
    /// Fan-in with the flood this many times the configured size.
    FanIn(u64),
    RoundTrip,
    Start,
    /// Clutch's start with Python app workers.
    StartPython,
    /// Fan-out at this many workers, for master CPU per delivery.
    Scale(u32),
}

/// Flood outcome.
struct Flood {
    expected: u64,
    counted: u64,
    lost: u64,
    out_of_order: u64,
    gaps: u64,
    complete: bool,
    elapsed_s: f64,
    /// When each sender's loop ended, as a fraction of the run.
    send_loop_fraction: Vec<f64>,
    cpu_master_ns: u64,
    cpu_agent_ns: u64,
    cpu_apps_ns: u64,
    other_share: Option<f64>,
    peak_tree_rss: Option<u64>,
    rss_samples: usize,
    hwm_sum: u64,
}

impl Flood {
    fn rate(&self) -> f64 {
        if self.complete && self.elapsed_s > 0.0 {
            self.expected as f64 / self.elapsed_s
        } else {
            f64::NAN
        }
    }

    fn json(&self) -> Value {
        json!({
            "expected": self.expected,
            "counted": self.counted,
            "lost": self.lost,
            "out_of_order": self.out_of_order,
            "gaps": self.gaps,
            "complete": self.complete,
            "elapsed_s": self.elapsed_s,
            "rate": if self.complete { Some(self.rate()) } else { None },
            "send_loop_end_fraction": self.send_loop_fraction,
            "cpu_ns": { "master": self.cpu_master_ns, "agent": self.cpu_agent_ns, "apps": self.cpu_apps_ns },
            "other_cpu_share": self.other_share,
            "peak_tree_rss_bytes": self.peak_tree_rss,
            "rss_samples": self.rss_samples,
            "vmhwm_sum_bytes": self.hwm_sum,
        })
    }
}

const MIB: f64 = 1024.0 * 1024.0;

impl<'a> Bench<'a> {
    /// Whether `--scenarios` selected this scenario.
    fn wants(&self, scenario: Scenario) -> bool {
        let name = match scenario {
            Scenario::FanOut => "fanout",
            Scenario::FanIn(1) => "fanin",
            Scenario::FanIn(_) => "large",
            Scenario::RoundTrip => "rtt",
            Scenario::Start => "start",
            Scenario::StartPython => "python",
            Scenario::Scale(_) => "scale",
        };
        self.opts
            .scenarios
            .as_ref()
            .is_none_or(|only| only.iter().any(|s| s == name))
    }

    /// Runs one scenario; a failure is recorded and the benchmark goes on.
    async fn scenario(&mut self, scenario: Scenario, sys: System, run: usize) {
        if !self.wants(scenario) {
            return;
        }
        self.wait_quiet(&format!("{} {scenario:?} run {}", sys.key(), run + 1))
            .await;
        let result = match scenario {
            Scenario::FanOut => self.fanout(sys, run).await,
            Scenario::FanIn(factor) => self.fanin(sys, run, factor).await,
            Scenario::RoundTrip => self.rtt(sys, run).await,
            Scenario::Start => self.start_only(sys, run).await,
            Scenario::StartPython => self.start_python(run).await,
            Scenario::Scale(w) => self.scale(sys, run, w).await,
        };
        if let Err(e) = result {
            let msg = format!("{} {scenario:?} run {}: {e:#}", sys.key(), run + 1);
            progress!(self.opts, "bench: FAILED {msg}");
            self.rec.failures.push(msg);
        }
        tokio::time::sleep(self.opts.pause).await;
    }

    /// Waits until the rest of the machine has been quiet for a second
    /// (less than `quiet_share` of one core busy), so a run does not start
    /// in the middle of someone else's build. Gives up after `quiet_wait`.
    async fn wait_quiet(&mut self, what: &str) {
        let Some(max) = self.opts.quiet_share else {
            return;
        };
        let began = Instant::now();
        let mut told = false;
        loop {
            let b0 = procfs::machine_busy_ns();
            tokio::time::sleep(Duration::from_secs(1)).await;
            let share = procfs::machine_busy_ns()
                .zip(b0)
                .map(|(b1, b0)| b1.saturating_sub(b0) as f64 / 1e9)
                .unwrap_or(0.0);
            if share <= max {
                if told {
                    progress!(
                        self.opts,
                        "bench: quiet again after {:.0} s",
                        began.elapsed().as_secs_f64()
                    );
                }
                self.rec.quiet_waits.push(began.elapsed().as_secs_f64());
                return;
            }
            if !told {
                progress!(
                    self.opts,
                    "bench: the machine is busy ({:.0}% of a core outside the benchmark); waiting before {what}",
                    share * 100.0
                );
                told = true;
            }
            if began.elapsed() >= self.opts.quiet_wait {
                progress!(
                    self.opts,
                    "bench: still busy after {:?}; going on",
                    self.opts.quiet_wait
                );
                self.rec.not_quiet.push(what.to_owned());
                return;
            }
        }
    }

    fn start_timeout(&self, workers: u32) -> Duration {
        Duration::from_secs(60 + u64::from(workers))
    }

    /// Starts a cluster and records its start time and idle memory.
    async fn start(&mut self, sys: System, workers: u32, run: usize) -> anyhow::Result<Cluster> {
        let c = Cluster::start(sys, workers, &self.programs, self.start_timeout(workers)).await?;
        self.rec
            .add(sys, &format!("start_ms_w{workers}"), c.start_ms);
        tokio::time::sleep(self.opts.settle).await;
        let pids = c.pids();
        let mem = |pid: u32| procfs::memory(pid).map(|m| m.rss as f64 / MIB);
        let master = mem(pids[0]);
        let agent = pids.get(1).and_then(|&p| mem(p));
        let apps: Vec<f64> = pids.iter().skip(2).filter_map(|&p| mem(p)).collect();
        let app = (!apps.is_empty()).then(|| apps.iter().sum::<f64>() / apps.len() as f64);
        let tree: f64 = procfs::tree(c.master_pid)
            .iter()
            .filter_map(|&p| mem(p))
            .sum();
        for (key, v) in [
            ("master", master),
            ("agent", agent),
            ("app", app),
            ("tree", Some(tree)),
        ] {
            if let Some(v) = v {
                self.rec.add(sys, &format!("idle_rss_{key}_w{workers}"), v);
            }
        }
        self.rec.runs.push(json!({
            "system": sys.key(), "scenario": "cluster start", "run": run + 1, "workers": workers,
            "start_ms": c.start_ms, "master_logged_start_ms": c.master_reported_start_ms,
            "idle_rss_mib": { "master": master, "agent": agent, "app_mean": app, "tree": tree },
        }));
        Ok(c)
    }

    async fn stop(&mut self, c: Cluster) -> anyhow::Result<()> {
        let sys = c.system;
        let ms = c.stop().await?;
        self.rec.add(sys, "stop_ms", ms);
        Ok(())
    }

    fn flood_timeout(&self, deliveries: u64) -> Duration {
        // Generous: 20k deliveries/s is 5-10× below Egg's worst figure here.
        Duration::from_secs(60 + deliveries / 20_000)
    }

    #[allow(clippy::too_many_arguments)]
    async fn flood(
        &mut self,
        c: &mut Cluster,
        senders: &[u32],
        receivers: &[u32],
        route: &str,
        action: &str,
        per_sender: u64,
        per_receiver: u64,
        sample_rss: bool,
    ) -> anyhow::Result<Flood> {
        let id = c.next_id();
        for &r in receivers {
            c.command(
                r,
                json!({ "cmd": "expect", "id": id, "action": action, "count": per_receiver }),
            )?;
        }
        c.take_each("armed", id, receivers, Duration::from_secs(30))
            .await?;
        let pids = c.pids();
        let tree = procfs::tree(c.master_pid);
        let sampler =
            sample_rss.then(|| procfs::RssSampler::start(tree.clone(), Duration::from_millis(10)));
        let cpu0: Vec<procfs::Cpu> = tree.iter().map(|&p| procfs::cpu(p)).collect();
        let busy0 = procfs::machine_busy_ns();
        let expected = per_receiver * receivers.len() as u64;
        let perf = match (&self.opts.perf_dir, c.system) {
            (Some(dir), System::Clutch) => Some(start_perf(dir, c, action)?),
            _ => None,
        };
        // Under callgrind (BENCH_MASTER_WRAPPER), count only the flood.
        let callgrind = c.system == System::Clutch
            && cluster::master_wrapper()
                .iter()
                .any(|a| a.contains("callgrind"));
        // With `BENCH_CHILD` pointing at a script that runs the child under
        // callgrind too, the children's counters are zeroed and dumped with
        // the master's (callgrind_control ignores processes without it).
        let children_too = std::env::var("BENCH_CALLGRIND_ALL").is_ok_and(|v| v == "1");
        let counted: Vec<u32> = if children_too {
            pids.clone()
        } else {
            vec![c.master_pid]
        };
        if callgrind {
            for &pid in &counted {
                callgrind_control("-z", pid);
            }
        }
        let t0 = std::time::Instant::now();
        for &s in senders {
            c.command(s, json!({ "cmd": "flood", "id": id, "route": route, "action": action, "count": per_sender }))?;
        }
        let dones = c
            .take_each("done", id, receivers, self.flood_timeout(expected))
            .await;
        let end = std::time::Instant::now();
        let cpu1: Vec<procfs::Cpu> = tree.iter().map(|&p| procfs::cpu(p)).collect();
        let busy1 = procfs::machine_busy_ns();
        if let Some(perf) = perf {
            stop_perf(perf);
        }
        if callgrind {
            for &pid in &counted {
                callgrind_control("-d", pid);
            }
        }
        let (peak, rss_samples) = match sampler {
            Some(s) => {
                let (p, n) = s.finish();
                (Some(p), n)
            }
            None => (None, 0),
        };
        let (bodies, complete, elapsed_s) = match dones {
            Ok(events) => {
                let last = events.iter().map(|e| e.at).max().unwrap_or(end);
                let elapsed = last.duration_since(t0).as_secs_f64();
                (
                    events.into_iter().map(|e| e.body).collect::<Vec<_>>(),
                    true,
                    elapsed,
                )
            }
            Err(e) => {
                // Ask each receiver what it got, so the loss is counted.
                let msg = format!("{e:#}");
                for &r in receivers {
                    let _ = c.command(r, json!({ "cmd": "status", "id": id }));
                }
                let statuses = c
                    .take_each("status", id, receivers, Duration::from_secs(20))
                    .await;
                let bodies = statuses
                    .map(|v| v.into_iter().map(|e| e.body).collect())
                    .unwrap_or_default();
                // The whole message (with the master's last log lines) goes
                // to the JSON; the table shows its first line.
                self.rec.failures.push(format!(
                    "{} flood {action} incomplete: {msg}",
                    c.system.key(),
                ));
                (bodies, false, end.duration_since(t0).as_secs_f64())
            }
        };
        let sum = |k: &str| {
            bodies
                .iter()
                .map(|b| b[k].as_u64().unwrap_or(0))
                .sum::<u64>()
        };
        let counted = sum("received");
        let out_of_order = sum("out_of_order");
        let gaps = sum("gaps");
        let lost = expected.saturating_sub(counted);
        // When did each sender's loop end? (Egg's senders finish long before
        // the last delivery; Clutch's are slowed by flow control.)
        let mut send_loop_fraction = Vec::new();
        if complete {
            if let Ok(sent) = c
                .take_each("sent", id, senders, Duration::from_secs(120))
                .await
            {
                for e in sent {
                    send_loop_fraction.push(e.at.duration_since(t0).as_secs_f64() / elapsed_s);
                }
            }
        }
        c.forget_pending();
        let delta = |i: usize| cpu1[i].since(&cpu0[i]);
        let index_of = |pid: u32| tree.iter().position(|&p| p == pid);
        let cpu_of = |pid: u32| index_of(pid).map(delta).unwrap_or(0);
        let cpu_master_ns = cpu_of(pids[0]);
        let cpu_agent_ns = pids.get(1).map(|&p| cpu_of(p)).unwrap_or(0);
        let cpu_apps_ns: u64 = pids.iter().skip(2).map(|&p| cpu_of(p)).sum();
        let tree_ns: u64 = (0..tree.len()).map(delta).sum();
        let window_ns = (end.duration_since(t0).as_secs_f64() * 1e9).max(1.0);
        let other_share = busy0
            .zip(busy1)
            .map(|(a, b)| b.saturating_sub(a).saturating_sub(tree_ns) as f64 / window_ns);
        let hwm_sum = tree
            .iter()
            .filter_map(|&p| procfs::memory(p))
            .map(|m| m.hwm)
            .sum();
        let s = c.system;
        let idx = sys_index(s);
        self.counted[idx].0 += expected;
        self.counted[idx].1 += counted;
        self.counted[idx].2 += lost;
        self.counted[idx].3 += out_of_order;
        self.counted[idx].4 += gaps;
        if let Some(o) = other_share {
            self.other_share.push(o);
        }
        Ok(Flood {
            expected,
            counted,
            lost,
            out_of_order,
            gaps,
            complete,
            elapsed_s,
            send_loop_fraction,
            cpu_master_ns,
            cpu_agent_ns,
            cpu_apps_ns,
            other_share,
            peak_tree_rss: peak,
            rss_samples,
            hwm_sum,
        })
    }

    fn record_cpu(&mut self, sys: System, flood: &'static str, f: &Flood) {
        if !f.complete || f.expected == 0 {
            return;
        }
        let per = |ns: u64| ns as f64 / f.expected as f64;
        let other = f
            .other_share
            .map(|s| s * f.elapsed_s * 1e9 / f.expected as f64)
            .unwrap_or(f64::NAN);
        self.cpu.push((
            sys,
            flood,
            [
                per(f.cpu_master_ns),
                per(f.cpu_agent_ns),
                per(f.cpu_apps_ns),
                other,
            ],
        ));
    }

    fn apps(&self, workers: u32) -> Vec<u32> {
        (1..=workers).collect()
    }

    async fn fanout(&mut self, sys: System, run: usize) -> anyhow::Result<()> {
        let w = self.opts.workers;
        let mut c = self.start(sys, w, run).await?;
        let n = self.opts.fanout_messages;
        let f = self
            .flood(
                &mut c,
                &[0],
                &self.apps(w),
                "apps",
                "bench-fanout",
                n,
                n,
                false,
            )
            .await;
        self.stop(c).await?;
        let f = f?;
        progress!(
            self.opts,
            "bench: {} fan-out run {}: {:.0} deliveries/s ({} of {} counted, lost {}, out of order {})",
            sys.key(), run + 1, f.rate(), f.counted, f.expected, f.lost, f.out_of_order
        );
        self.rec.add(sys, "fanout_rate", f.rate());
        if f.complete {
            self.rec.add(
                sys,
                "fanout_master_cpu_ns",
                f.cpu_master_ns as f64 / f.expected as f64,
            );
        }
        self.record_cpu(sys, "fan-out", &f);
        self.rec.runs.push(json!({
            "system": sys.key(), "scenario": "fan-out", "run": run + 1, "workers": w,
            "messages": n, "flood": f.json(),
        }));
        Ok(())
    }

    async fn fanin(&mut self, sys: System, run: usize, factor: u64) -> anyhow::Result<()> {
        let w = self.opts.workers;
        let mut c = self.start(sys, w, run).await?;
        let n = self.opts.fanin_messages * factor;
        let f = self
            .flood(
                &mut c,
                &self.apps(w),
                &[0],
                "agent",
                "bench-fanin",
                n,
                n * u64::from(w),
                true,
            )
            .await;
        self.stop(c).await?;
        let f = f?;
        let peak = f.peak_tree_rss.unwrap_or(0) as f64 / MIB;
        progress!(
            self.opts,
            "bench: {} fan-in{} run {}: {:.0} deliveries/s, peak tree RSS {:.1} MiB ({} of {} counted, lost {}, out of order {})",
            sys.key(), if factor > 1 { format!(" ×{factor}") } else { String::new() }, run + 1,
            f.rate(), peak, f.counted, f.expected, f.lost, f.out_of_order
        );
        if factor == 1 {
            self.rec.add(sys, "fanin_rate", f.rate());
            self.rec.add(sys, "peak_rss_fanin", peak);
            self.rec.add(sys, "hwm_sum_fanin", f.hwm_sum as f64 / MIB);
            self.record_cpu(sys, "fan-in", &f);
        } else {
            self.rec.add(sys, "peak_rss_fanin_large", peak);
            self.rec.add(sys, "fanin_rate_large", f.rate());
        }
        self.rec.runs.push(json!({
            "system": sys.key(), "scenario": if factor == 1 { "fan-in".to_string() } else { format!("fan-in x{factor}") },
            "run": run + 1, "workers": w, "messages_per_app": n, "flood": f.json(),
        }));
        Ok(())
    }

    async fn rtt(&mut self, sys: System, run: usize) -> anyhow::Result<()> {
        let w = self.opts.workers;
        let mut c = self.start(sys, w, run).await?;
        let result = self.rtt_on(&mut c, sys, run, false).await;
        let result = match (result, sys) {
            (Ok(()), System::Clutch) => self.rtt_on(&mut c, sys, run, true).await,
            (r, _) => r,
        };
        self.stop(c).await?;
        result
    }

    async fn rtt_on(
        &mut self,
        c: &mut Cluster,
        sys: System,
        run: usize,
        confirm: bool,
    ) -> anyhow::Result<()> {
        let id = c.next_id();
        let agent = c.proc(0)?.pid;
        let (n, warmup) = (self.opts.rtt_count, self.opts.rtt_warmup);
        c.command(1, json!({ "cmd": "rtt", "id": id, "count": n, "warmup": warmup, "peer": agent, "confirm": confirm }))?;
        let timeout = Duration::from_secs(60 + (n + warmup) / 1000);
        let e = c
            .take("round trips", timeout, |e| {
                e.kind() == "rtt" && e.id() == id
            })
            .await?;
        let b = &e.body;
        if b["count"].as_u64() != Some(n) {
            bail!("round trips: expected {n} samples, got {}", b["count"]);
        }
        let prefix = if confirm { "rtt_confirmed" } else { "rtt" };
        for (k, field) in [
            ("p50", "p50_us"),
            ("p99", "p99_us"),
            ("p999", "p999_us"),
            ("max", "max_us"),
            ("mean", "mean_us"),
        ] {
            if let Some(v) = b[field].as_f64() {
                self.rec.add(sys, &format!("{prefix}_{k}"), v);
            }
        }
        progress!(
            self.opts,
            "bench: {} round trip{} run {}: p50 {:.1} µs, p99 {:.1} µs, p99.9 {:.1} µs",
            sys.key(),
            if confirm { " (confirmed sends)" } else { "" },
            run + 1,
            b["p50_us"].as_f64().unwrap_or(f64::NAN),
            b["p99_us"].as_f64().unwrap_or(f64::NAN),
            b["p999_us"].as_f64().unwrap_or(f64::NAN)
        );
        self.rec.runs.push(json!({
            "system": sys.key(), "scenario": if confirm { "round trip, confirmed sends" } else { "round trip" },
            "run": run + 1, "workers": self.opts.workers, "result": b,
        }));
        Ok(())
    }

    async fn start_only(&mut self, sys: System, run: usize) -> anyhow::Result<()> {
        let w = self.opts.start_workers;
        let c = self.start(sys, w, run).await?;
        progress!(
            self.opts,
            "bench: {} start to egg-ready with {w} workers, run {}: {:.1} ms",
            sys.key(),
            run + 1,
            c.start_ms
        );
        self.stop(c).await
    }

    async fn start_python(&mut self, run: usize) -> anyhow::Result<()> {
        let Ok(launch) = self.python.clone() else {
            return Ok(());
        };
        let w = self.opts.start_workers;
        let c = Cluster::start_with(
            System::Clutch,
            w,
            &self.programs,
            self.start_timeout(w),
            Some(&launch),
        )
        .await?;
        progress!(
            self.opts,
            "bench: clutch start to egg-ready with {w} Python app workers, run {}: {:.1} ms",
            run + 1,
            c.start_ms
        );
        self.rec
            .add(System::Clutch, &format!("start_ms_python_w{w}"), c.start_ms);
        tokio::time::sleep(self.opts.settle).await;
        let agent = c.proc(0).ok().map(|a| a.pid);
        let apps: Vec<f64> = procfs::tree(c.master_pid)
            .into_iter()
            .filter(|&p| p != c.master_pid && Some(p) != agent)
            .filter_map(|p| procfs::memory(p).map(|m| m.rss as f64 / MIB))
            .collect();
        if !apps.is_empty() {
            self.rec.add(
                System::Clutch,
                "idle_rss_python_app",
                apps.iter().sum::<f64>() / apps.len() as f64,
            );
        }
        self.rec.runs.push(json!({
            "system": "clutch", "scenario": "start, Python app workers", "run": run + 1,
            "workers": w, "start_ms": c.start_ms, "master_logged_start_ms": c.master_reported_start_ms,
            "apps": launch.label,
        }));
        self.stop(c).await
    }

    async fn scale(&mut self, sys: System, run: usize, w: u32) -> anyhow::Result<()> {
        let mut c = self.start(sys, w, run).await?;
        let n = (self.opts.scale_deliveries / u64::from(w)).max(1);
        let f = self
            .flood(
                &mut c,
                &[0],
                &self.apps(w),
                "apps",
                "bench-fanout",
                n,
                n,
                false,
            )
            .await;
        self.stop(c).await?;
        let f = f?;
        if !f.complete {
            bail!("fan-out at {w} workers did not complete");
        }
        let per = f.cpu_master_ns as f64 / f.expected as f64;
        progress!(
            self.opts,
            "bench: {} master CPU per delivery at {w} workers, run {}: {per:.0} ns ({:.0} deliveries/s)",
            sys.key(), run + 1, f.rate()
        );
        self.rec.add(sys, &format!("master_cpu_ns_w{w}"), per);
        self.rec.add(sys, &format!("fanout_rate_w{w}"), f.rate());
        self.rec.runs.push(json!({
            "system": sys.key(), "scenario": "scaling fan-out", "run": run + 1, "workers": w,
            "messages": n, "master_cpu_ns_per_delivery": per, "flood": f.json(),
        }));
        Ok(())
    }

    fn rows(&self, egg: &EggStatus) -> Vec<report::Row> {
        let o = self.opts;
        let not_run = egg.reason.clone();
        let egg_note = |extra: Option<&str>| -> Option<String> {
            match (&not_run, extra) {
                (Some(r), _) => Some(format!("not run: {r}")),
                (None, Some(e)) => Some(e.to_owned()),
                (None, None) => None,
            }
        };
        let mut rows = vec![
            row(
                &self.rec,
                "fanout_rate",
                format!(
                    "agent → all apps (sendToApp), {} msgs × {} apps: deliveries/s",
                    o.fanout_messages, o.workers
                ),
                Unit::Rate,
                Better::Higher,
                Some(2.1e6),
                Some(211e3),
                egg_note(None),
            ),
            row(
                &self.rec,
                "fanin_rate",
                format!(
                    "apps → agent (sendToAgent), {} msgs per app: deliveries/s",
                    o.fanin_messages
                ),
                Unit::Rate,
                Better::Higher,
                Some(2.4e6),
                Some(135e3),
                egg_note(None),
            ),
            row(
                &self.rec,
                "rtt_p50",
                "round trip app → agent → app (sendTo pid): p50".into(),
                Unit::Micros,
                Better::Lower,
                Some(80.0),
                Some(88.0),
                egg_note(None),
            ),
            row(
                &self.rec,
                "rtt_p99",
                "round trip: p99".into(),
                Unit::Micros,
                Better::Lower,
                Some(130.0),
                Some(169.0),
                egg_note(None),
            ),
            row(
                &self.rec,
                "rtt_p999",
                "round trip: p99.9".into(),
                Unit::Micros,
                Better::Lower,
                Some(250.0),
                Some(2400.0),
                egg_note(None),
            ),
            row(
                &self.rec,
                &format!("idle_rss_master_w{}", o.workers),
                "idle RSS: master".into(),
                Unit::MiB,
                Better::Lower,
                Some(12.0),
                Some(75.0),
                egg_note(None),
            ),
            row(
                &self.rec,
                &format!("idle_rss_agent_w{}", o.workers),
                "idle RSS: agent".into(),
                Unit::MiB,
                Better::Lower,
                Some(8.0),
                Some(87.0),
                egg_note(None),
            ),
            row(
                &self.rec,
                &format!("idle_rss_app_w{}", o.workers),
                "idle RSS: one app worker (mean of the apps)".into(),
                Unit::MiB,
                Better::Lower,
                Some(8.0),
                Some(86.0),
                egg_note(None),
            ),
            row(
                &self.rec,
                "peak_rss_fanin",
                "peak RSS of the whole tree during the apps → agent flood".into(),
                Unit::MiB,
                Better::Lower,
                Some(64.0),
                Some(836.0),
                egg_note(None),
            ),
        ];
        if o.large_fanin_factor > 1 {
            rows.push(row(
                &self.rec,
                "peak_rss_fanin_large",
                format!(
                    "same, flood {}× larger (bounded whatever the flood size?)",
                    o.large_fanin_factor
                ),
                Unit::MiB,
                Better::Lower,
                Some(64.0),
                None,
                egg_note(Some("not run: Egg's backlog grows with the flood")),
            ));
        }
        rows.push(row(
            &self.rec,
            &format!("start_ms_w{}", o.start_workers),
            format!("start to egg-ready everywhere, {} workers", o.start_workers),
            Unit::Millis,
            Better::Lower,
            Some(100.0),
            Some(1188.0),
            egg_note(Some("includes loading the Egg framework")),
        ));
        let mut counts: Vec<u32> = o.scale_workers.clone();
        counts.sort_unstable();
        for &w in &counts {
            let note = if o.egg_scale_workers.contains(&w) {
                None
            } else {
                Some("not run at this size")
            };
            rows.push(row(
                &self.rec,
                &format!("master_cpu_ns_w{w}"),
                format!("master CPU per delivery, agent → all apps, {w} workers"),
                Unit::Nanos,
                Better::Lower,
                None,
                None,
                egg_note(note),
            ));
        }
        for &w in &counts {
            if w == 2 {
                continue;
            }
            let note = if o.egg_scale_workers.contains(&w) && o.egg_scale_workers.contains(&2) {
                None
            } else {
                Some("not run at this size")
            };
            let goal = (w == 32).then_some(2.5);
            rows.push(row(
                &self.rec,
                &format!("master_cpu_scaling_w{w}"),
                format!("master CPU per delivery at {w} workers ÷ at 2"),
                Unit::Times,
                Better::Lower,
                goal,
                None,
                egg_note(note),
            ));
        }
        for &w in &counts {
            let note = if o.egg_scale_workers.contains(&w) {
                None
            } else {
                Some("not run at this size")
            };
            rows.push(row(
                &self.rec,
                &format!("fanout_rate_w{w}"),
                format!("agent → all apps, {w} workers: deliveries/s"),
                Unit::Rate,
                Better::Higher,
                None,
                None,
                egg_note(note),
            ));
        }
        let no_confirm = Some("Egg has no confirmed send");
        rows.push(row(
            &self.rec,
            "rtt_confirmed_p50",
            "round trip, sends confirmed by the master (send_to): p50".into(),
            Unit::Micros,
            Better::Lower,
            None,
            None,
            egg_note(no_confirm),
        ));
        rows.push(row(
            &self.rec,
            "rtt_confirmed_p99",
            "round trip, confirmed sends: p99".into(),
            Unit::Micros,
            Better::Lower,
            None,
            None,
            egg_note(no_confirm),
        ));
        rows.push(row(
            &self.rec,
            "rtt_confirmed_p999",
            "round trip, confirmed sends: p99.9".into(),
            Unit::Micros,
            Better::Lower,
            None,
            None,
            egg_note(no_confirm),
        ));
        rows.push(row(
            &self.rec,
            &format!("start_ms_w{}", o.workers),
            format!("start to egg-ready everywhere, {} workers", o.workers),
            Unit::Millis,
            Better::Lower,
            None,
            None,
            egg_note(Some("includes loading the Egg framework")),
        ));
        let python_note = self.python.as_ref().err().map(|e| format!("not run: {e}"));
        let mut r = row(
            &self.rec,
            &format!("start_ms_python_w{}", o.start_workers),
            format!(
                "start to egg-ready, {} Python app workers (examples/python) + Rust agent",
                o.start_workers
            ),
            Unit::Millis,
            Better::Lower,
            None,
            None,
            egg_note(Some("Egg has no Python workers")),
        );
        r.clutch_note = python_note.clone();
        rows.push(r);
        let mut r = row(
            &self.rec,
            "idle_rss_python_app",
            "idle RSS: one Python app worker".into(),
            Unit::MiB,
            Better::Lower,
            None,
            None,
            egg_note(Some("Egg has no Python workers")),
        );
        r.clutch_note = python_note;
        rows.push(r);
        rows.push(row(
            &self.rec,
            "stop_ms",
            "stop after SIGTERM until every process is gone".into(),
            Unit::Millis,
            Better::Lower,
            None,
            None,
            egg_note(None),
        ));
        rows
    }

    fn cpu_table(&self) -> Vec<Value> {
        let mut out = Vec::new();
        for sys in [System::Clutch, System::Egg] {
            for flood in ["fan-out", "fan-in"] {
                let runs: Vec<&[f64; 4]> = self
                    .cpu
                    .iter()
                    .filter(|(s, f, _)| *s == sys && *f == flood)
                    .map(|(_, _, v)| v)
                    .collect();
                if runs.is_empty() {
                    continue;
                }
                let med = |i: usize| {
                    report::Stat::of(&runs.iter().map(|v| v[i]).collect::<Vec<_>>())
                        .map(|s| s.median)
                };
                out.push(json!({
                    "system": sys.key(), "flood": flood, "runs": runs.len(),
                    "master": med(0), "agent": med(1), "apps": med(2), "other": med(3),
                }));
            }
        }
        out
    }

    fn correctness(&self, systems: &[System]) -> Value {
        let mut parts = Vec::new();
        let mut per = serde_json::Map::new();
        for &s in systems {
            let (expected, counted, lost, ooo, gaps) = self.counted[sys_index(s)];
            parts.push(format!(
                "{}: {counted} of {expected} deliveries counted, {lost} lost, {ooo} out of order, {gaps} sequence gaps",
                s.key()
            ));
            per.insert(
                s.key().into(),
                json!({ "expected": expected, "counted": counted, "lost": lost, "out_of_order": ooo, "gaps": gaps }),
            );
        }
        json!({ "summary": parts.join("; "), "systems": per })
    }
}

/// `callgrind_control -z` (zero the counters) or `-d` (dump them) on a
/// process running under callgrind.
fn callgrind_control(op: &str, pid: u32) {
    let _ = Command::new("callgrind_control")
        .arg(op)
        .arg(pid.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
}

/// Starts `perf record` on the master (with `BENCH_PERF_WHO=all`: on the
/// master, the agent and the apps); returns once it is attached.
fn start_perf(dir: &Path, c: &Cluster, action: &str) -> anyhow::Result<std::process::Child> {
    std::fs::create_dir_all(dir)?;
    let out = dir.join(format!(
        "perf-{}-{action}-w{}-{}.data",
        c.system.key(),
        c.workers,
        report::utc_now().replace([' ', ':'], "-")
    ));
    let args = std::env::var("BENCH_PERF_ARGS")
        .unwrap_or_else(|_| "-F 999 --call-graph dwarf,32768".into());
    let who = match std::env::var("BENCH_PERF_WHO").as_deref() {
        Ok("all") => c
            .pids()
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(","),
        _ => c.master_pid.to_string(),
    };
    let child = Command::new("perf")
        .arg("record")
        .args(args.split_whitespace())
        .arg("-p")
        .arg(who)
        .arg("-o")
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("start perf record (is perf installed?)")?;
    // perf needs a moment to attach to the process.
    std::thread::sleep(Duration::from_millis(500));
    Ok(child)
}

fn stop_perf(mut perf: std::process::Child) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(perf.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    );
    let _ = perf.wait();
}

/// The Python example worker with the packages and generated code the
/// conformance suite prepared in `.deps/python` (the newest complete set).
fn python_workers() -> Result<cluster::Launch, String> {
    let repo = bench_dir().join("..");
    let worker = repo.join("examples/python/worker.py");
    if !worker.exists() {
        return Err("examples/python/worker.py is missing".into());
    }
    if command_output("python3", &["--version"]).is_none() {
        return Err("python3 is not installed".into());
    }
    let deps = repo.join(".deps/python");
    let entries = std::fs::read_dir(&deps).map_err(|_| {
        "no .deps/python: run the conformance suite once to install the Python packages".to_string()
    })?;
    let mut sets: Vec<(std::time::SystemTime, PathBuf, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let key = name.strip_prefix("packages-")?.to_owned();
            let gen = deps.join(format!("gen-{key}"));
            let modified = e.metadata().ok()?.modified().ok()?;
            gen.is_dir().then(|| (modified, e.path(), gen))
        })
        .collect();
    sets.sort();
    let Some((_, packages, gen)) = sets.pop() else {
        return Err(
            "no complete package set in .deps/python (run the conformance suite once)".into(),
        );
    };
    let pythonpath = [packages, gen, repo.join("examples/python")]
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    Ok(cluster::Launch {
        argv: vec!["python3".into(), worker.display().to_string()],
        env: vec![
            ("PYTHONPATH".into(), pythonpath),
            ("PYTHONDONTWRITEBYTECODE".into(), "1".into()),
        ],
        label: "python3 examples/python/worker.py".into(),
    })
}

/// Finds node, and installs Egg if allowed; says why not otherwise.
fn prepare_egg(opts: &Options) -> (EggStatus, Option<PathBuf>) {
    let skip = |reason: String| {
        (
            EggStatus {
                ran: false,
                reason: Some(reason),
            },
            None,
        )
    };
    if !opts.systems.contains(&System::Egg) {
        return skip("not selected (--only clutch)".into());
    }
    let install = match &opts.egg {
        EggPolicy::Skip(reason) => return skip(reason.clone()),
        EggPolicy::Run { install } => *install,
    };
    let node = std::env::var_os("BENCH_NODE")
        .map(PathBuf::from)
        .unwrap_or_else(|| "node".into());
    let version = match Command::new(&node).arg("--version").output() {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        Ok(out) => {
            return skip(format!(
                "`{} --version` failed: {}",
                node.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
        Err(e) => {
            return skip(format!(
                "Node.js is not installed (`{}`: {e})",
                node.display()
            ))
        }
    };
    let major: u32 = version
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    if major < 14 {
        return skip(format!(
            "Node.js {version} is too old for egg@3 (needs 14 or later)"
        ));
    }
    let egg_dir = bench_dir().join("egg");
    let installed = egg_dir.join("node_modules/egg/package.json").exists();
    if !installed {
        if !install {
            return skip("egg is not installed in bench/egg/node_modules (smoke mode does not install it; `cargo bench -p master --bench compare` does)".into());
        }
        let npm = std::env::var_os("BENCH_NPM")
            .map(PathBuf::from)
            .unwrap_or_else(|| "npm".into());
        if opts.verbose {
            eprintln!("bench: installing egg@3 into bench/egg/node_modules (npm ci)…");
        }
        match Command::new(&npm)
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&egg_dir)
            .output()
        {
            Ok(out) if out.status.success() => {}
            Ok(out) => {
                let err = String::from_utf8_lossy(&out.stderr);
                let tail: Vec<&str> = err.lines().rev().take(5).collect();
                return skip(format!(
                    "`npm ci` in bench/egg failed: {}",
                    tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
                ));
            }
            Err(e) => return skip(format!("npm is not installed (`{}`: {e})", npm.display())),
        }
    }
    (
        EggStatus {
            ran: true,
            reason: None,
        },
        Some(node),
    )
}

fn read_json(path: &Path) -> Option<Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

fn command_output(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn versions(programs: &Programs, egg: bool) -> Value {
    let mut v = serde_json::Map::new();
    // BENCH_CLUTCH_COMMIT names the source when it is not a git checkout.
    let commit = std::env::var("BENCH_CLUTCH_COMMIT").ok().or_else(|| {
        command_output(
            "git",
            &[
                "-C",
                &bench_dir().display().to_string(),
                "rev-parse",
                "--short",
                "HEAD",
            ],
        )
    });
    let dirty = command_output(
        "git",
        &[
            "-C",
            &bench_dir().display().to_string(),
            "status",
            "--porcelain",
            "--",
            "../src",
            "../master/src",
            "../agent-sdk",
            "../worker-sdk",
            "../proto",
        ],
    )
    .map(|s| !s.is_empty());
    v.insert(
        "clutch".into(),
        json!(format!(
            "{}{} ({} build)",
            commit.unwrap_or_else(|| "?".into()),
            if dirty == Some(true) {
                "+uncommitted changes"
            } else {
                ""
            },
            if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            }
        )),
    );
    if let Some(r) = command_output("rustc", &["--version"]) {
        v.insert(
            "rustc".into(),
            json!(r.trim_start_matches("rustc ").to_owned()),
        );
    }
    if egg {
        if let Some(n) = command_output(&programs.node.display().to_string(), &["--version"]) {
            v.insert("node".into(), json!(n));
        }
        let nm = programs.egg_dir.join("node_modules");
        for pkg in ["egg", "egg-cluster"] {
            if let Some(ver) = read_json(&nm.join(pkg).join("package.json"))
                .and_then(|j| j["version"].as_str().map(str::to_owned))
            {
                v.insert(pkg.into(), json!(ver));
            }
        }
    }
    Value::Object(v)
}

fn machine_info() -> Value {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem_mib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|r| r.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map(|kib| kib / 1024);
    let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|t| {
        t.lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map(|s| s.trim().to_owned())
    });
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .map(|s| s.trim().to_owned());
    json!({ "cores": cores, "mem_mib": mem_mib, "cpu": cpu, "kernel": kernel })
}
