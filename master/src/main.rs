//! The `master` binary: parses the command line and runs the cluster, or,
//! in a hidden mode, one of the built-in demo children.

#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use master::config::{ChildMode, Cli, Config};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let child = cli.child.is_some();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    if child {
        // The master relays each line into its own log under the child's
        // span, with the time; a leading level word keeps the level.
        subscriber.without_time().with_ansi(false).init();
    } else {
        // Colour only for a person at a terminal, not in captured logs.
        subscriber.with_ansi(std::io::stderr().is_terminal()).init();
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if !child {
                eprintln!("master: {e}");
            } else {
                tracing::error!("{e}");
            }
            // The documented exit codes: 3 for the restart limit, else 1.
            let code = e
                .downcast_ref::<master::cluster::MasterError>()
                .map_or(1, |m| m.exit_code());
            ExitCode::from(code)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    // One thread: on small machines the router is faster and steadier
    // without cross-thread wake-ups (see ARCHITECTURE.md).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match cli.child {
        Some(ChildMode::DemoAgent) => runtime.block_on(master::demo::agent()),
        Some(ChildMode::DemoApp) => runtime.block_on(master::demo::app()),
        None => {
            let config = Config::load(cli.flags)?;
            runtime.block_on(master::cluster::run(config))?;
            Ok(())
        }
    }
}
