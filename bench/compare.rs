//! `cargo bench -p master --bench compare [-- OPTIONS]`: Clutch and Egg side
//! by side on this machine, in one run (see `bench/README.md`).
//!
//! Prints the comparison table (Markdown) on stdout, progress on stderr, and
//! writes JSON and Markdown to `bench/results/`.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

#[path = "harness/mod.rs"]
mod harness;

use harness::cluster::System;
use harness::{EggPolicy, Options};

/// Clutch vs Egg: throughput, latency, memory, start time, CPU per delivery.
#[derive(Parser, Debug)]
#[command(name = "compare")]
struct Cli {
    /// A quick run with a few thousand messages (what the test suite runs).
    #[arg(long)]
    smoke: bool,
    /// Runs per scenario (default: 5; smoke: 1).
    #[arg(long)]
    runs: Option<usize>,
    /// App workers in the main scenarios (default 2, as in the issue).
    #[arg(long)]
    workers: Option<u32>,
    /// Messages in the agent → apps flood (default 1,000,000).
    #[arg(long)]
    fanout_messages: Option<u64>,
    /// Messages per app in the apps → agent flood (default 1,000,000).
    #[arg(long)]
    fanin_messages: Option<u64>,
    /// Measured round trips per run (default 20,000).
    #[arg(long)]
    rtt: Option<u64>,
    /// Worker counts for Clutch's master CPU per delivery (default 2,8,32,128).
    #[arg(long, value_delimiter = ',')]
    scale_workers: Option<Vec<u32>>,
    /// Worker counts for Egg's (default 2,8; empty to skip).
    #[arg(long, value_delimiter = ',')]
    egg_scale_workers: Option<Vec<u32>>,
    /// Deliveries per scaling run (default 2,000,000).
    #[arg(long)]
    scale_deliveries: Option<u64>,
    /// Run the apps → agent flood this many times larger once more, Clutch
    /// only, to check that memory does not grow with the flood (0: off).
    #[arg(long)]
    large_fanin_factor: Option<u64>,
    /// Milliseconds to let a cluster settle before idle memory is read.
    #[arg(long)]
    settle_ms: Option<u64>,
    /// Only this system.
    #[arg(long, value_parser = ["clutch", "egg"])]
    only: Option<String>,
    /// Do not run Egg.
    #[arg(long)]
    no_egg: bool,
    /// Before every run, wait (up to 30 min) until less than this percentage
    /// of one core was busy for a second; 0 disables (default 15, smoke 0).
    #[arg(long)]
    quiet_percent: Option<f64>,
    /// Skip the start with Python app workers.
    #[arg(long)]
    no_python: bool,
    /// Do not install egg with npm if bench/egg/node_modules is missing.
    #[arg(long)]
    no_install: bool,
    /// Where to write results (default: bench/results).
    #[arg(long)]
    results: Option<PathBuf>,
    /// Profile the Clutch master with `perf record` during every flood,
    /// writing perf.data files into DIR (figures are perturbed).
    #[arg(long, value_name = "DIR")]
    perf: Option<PathBuf>,
    /// Only these scenarios, comma-separated: fanout, fanin, rtt, start,
    /// scale, python, large (default: all).
    #[arg(long, value_delimiter = ',', value_parser = ["fanout", "fanin", "rtt", "start", "scale", "python", "large"])]
    scenarios: Option<Vec<String>>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
    /// Filters passed by `cargo bench NAME`; ignored.
    #[arg(hide = true)]
    filter: Vec<String>,
}

fn main() {
    let cli = Cli::parse();
    let mut opts = if cli.smoke {
        let mut o = Options::smoke();
        o.results_dir = Some(harness::bench_dir().join("results"));
        o.verbose = true;
        o.egg = EggPolicy::Run { install: true };
        o
    } else {
        Options::full()
    };
    let mut command = vec!["cargo bench -p master --bench compare --".to_string()];
    command.extend(std::env::args().skip(1).filter(|a| a != "--bench"));
    opts.command = command.join(" ");
    if let Some(r) = cli.runs {
        opts.runs = r.max(1);
    }
    if let Some(w) = cli.workers {
        opts.workers = w.max(1);
    }
    if let Some(n) = cli.fanout_messages {
        opts.fanout_messages = n;
    }
    if let Some(n) = cli.fanin_messages {
        opts.fanin_messages = n;
    }
    if let Some(n) = cli.rtt {
        opts.rtt_count = n;
        opts.rtt_warmup = (n / 10).max(10);
    }
    if let Some(w) = cli.scale_workers {
        opts.scale_workers = w;
    }
    if let Some(w) = cli.egg_scale_workers {
        opts.egg_scale_workers = w;
    }
    if let Some(n) = cli.scale_deliveries {
        opts.scale_deliveries = n;
    }
    if let Some(f) = cli.large_fanin_factor {
        opts.large_fanin_factor = f;
    }
    if let Some(ms) = cli.settle_ms {
        opts.settle = Duration::from_millis(ms);
    }
    if let Some(p) = cli.quiet_percent {
        opts.quiet_share = (p > 0.0).then_some(p / 100.0);
        if opts.quiet_wait.is_zero() {
            opts.quiet_wait = Duration::from_secs(1800);
        }
    }
    if cli.no_python {
        opts.python_start = false;
    }
    if let Some(dir) = cli.perf {
        opts.perf_dir = Some(dir);
    }
    if let Some(s) = cli.scenarios {
        opts.scenarios = Some(s);
    }
    if let Some(dir) = cli.results {
        opts.results_dir = Some(dir);
    }
    match cli.only.as_deref() {
        Some("clutch") => opts.systems = vec![System::Clutch],
        Some("egg") => opts.systems = vec![System::Egg],
        _ => {}
    }
    if cli.no_egg {
        opts.egg = EggPolicy::Skip("--no-egg".into());
    } else if cli.no_install {
        if let EggPolicy::Run { install } = &mut opts.egg {
            *install = false;
        }
    }
    if cfg!(debug_assertions) {
        eprintln!("compare: warning: this is a debug build; `cargo bench` builds release");
    }
    match harness::run(&opts) {
        Ok((report, written)) => {
            println!("{}", report.markdown());
            if let Some(path) = written {
                eprintln!("compare: results written to {}", path.display());
            }
            if !report.failures.is_empty() {
                std::process::exit(1);
            }
        }
        Err(e) => {
            eprintln!("compare: {e:#}");
            std::process::exit(1);
        }
    }
}
