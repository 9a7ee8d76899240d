//! `cargo bench -p master --bench restart`: how fast a killed child is back.
//!
//! Runs the real master with its built-in demo children (SDK children),
//! SIGKILLs an app worker and then the agent several times, and reads from
//! the master's log when the new process was launched and when it had
//! egg-ready. Times are from the kill, on the machine's wall clock (the log's
//! timestamps and the kill share it). Zero loss across an agent restart is
//! checked by `tests/supervision.rs::a_killed_agent_loses_none_of_the_ticks_sent_while_it_was_down`,
//! which prints its own tally.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const RUNS: usize = 7;
/// Egg's figures on this machine kind, from the supervision issue (egg@3.34,
/// egg-cluster 2.5); Egg is not run by this bench.
const EGG: [(&str, f64); 4] = [
    ("app worker: kill → new process", 9.0),
    ("app worker: kill → egg-ready", 303.0),
    ("agent: kill → new process", 1014.0),
    ("agent: kill → egg-ready", 1313.0),
];

/// Seconds since the epoch of a log line's leading RFC 3339 timestamp.
fn stamp(line: &str) -> Option<f64> {
    let t = line.split_whitespace().next()?;
    let (date, time) = t.trim_end_matches('Z').split_once('T')?;
    let days = {
        let mut parts = date.split('-').map(|p| p.parse::<i64>().ok());
        let (y, m, d) = (parts.next()??, parts.next()??, parts.next()??);
        // Days from civil (Howard Hinnant's algorithm).
        let y = if m <= 2 { y - 1 } else { y };
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        era * 146_097 + doe - 719_468
    };
    let mut hms = time.split(':');
    let (h, m, s) = (
        hms.next()?.parse::<f64>().ok()?,
        hms.next()?.parse::<f64>().ok()?,
        hms.next()?.parse::<f64>().ok()?,
    );
    Some(days as f64 * 86_400.0 + h * 3600.0 + m * 60.0 + s)
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn pid_after(line: &str, key: &str) -> Option<u32> {
    let rest = &line[line.find(key)? + key.len()..];
    rest.chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .ok()
}

/// Waits for a line containing every one of `needles`.
fn wait(lines: &mpsc::Receiver<String>, needles: &[&str]) -> anyhow::Result<String> {
    loop {
        let line = lines
            .recv_timeout(Duration::from_secs(20))
            .map_err(|_| anyhow::anyhow!("no log line with {needles:?} within 20 s"))?;
        if needles.iter().all(|n| line.contains(n)) {
            return Ok(line);
        }
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    // Each kill is measured as a first crash: a process that lived 1 ms is
    // "stable", so the backoff starts again from its first delay (10 ms,
    // the default) instead of doubling from kill to kill.
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("cluster.toml");
    std::fs::write(
        &config,
        "workers = 2\n[restart]\nstable_ms = 1\nmax_restarts = 1000\n",
    )?;
    let mut master = Command::new(env!("CARGO_BIN_EXE_master"))
        .arg("--config")
        .arg(&config)
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = master
        .stderr
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stderr"))?;
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let result = measure(&lines);
    let _ = kill(Pid::from_raw(master.id() as i32), Signal::SIGTERM);
    let _ = master.wait();
    let rows = result?;
    println!("| restart (ms from SIGKILL) | Clutch median (min–max), {RUNS} runs | Egg (from the issue) | Egg ÷ Clutch |");
    println!("| --- | --- | --- | --- |");
    for ((name, egg), mut v) in EGG.into_iter().zip(rows) {
        let (min, max) = (
            v.iter().copied().fold(f64::INFINITY, f64::min),
            v.iter().copied().fold(0.0, f64::max),
        );
        let m = median(&mut v);
        println!(
            "| {name} | {m:.1} ({min:.1}–{max:.1}) | {egg:.0} | {:.1}× |",
            egg / m
        );
    }
    Ok(())
}

fn measure(lines: &mpsc::Receiver<String>) -> anyhow::Result<Vec<Vec<f64>>> {
    wait(lines, &["egg-ready: the agent and all"])?;
    let mut rows = vec![Vec::new(), Vec::new(), Vec::new(), Vec::new()];
    // Learn the current pids from the demo children's own log lines.
    let mut app = 0;
    let mut agent = 0;
    let mut incarnation = (1u32, 1u32);
    while app == 0 || agent == 0 {
        let line = lines.recv_timeout(Duration::from_secs(20))?;
        if line.contains("app{worker=1 pid=") && app == 0 {
            app = pid_after(&line, "app{worker=1 pid=").unwrap_or(0);
        }
        if line.contains("agent{pid=") && agent == 0 {
            agent = pid_after(&line, "agent{pid=").unwrap_or(0);
        }
    }
    for _ in 0..RUNS {
        // An app worker.
        std::thread::sleep(Duration::from_millis(50)); // let it count as stable
        incarnation.1 += 1;
        let t0 = now();
        kill(Pid::from_raw(app as i32), Signal::SIGKILL)?;
        let launched = wait(
            lines,
            &[
                "launched app worker 1",
                &format!("incarnation={}", incarnation.1),
            ],
        )?;
        app = pid_after(&launched, "pid=").unwrap_or(0);
        let ready = wait(lines, &[&format!("app{{worker=1 pid={app}}}"), "egg-ready"])?;
        rows[0].push((stamp(&launched).unwrap_or(t0) - t0) * 1000.0);
        rows[1].push((stamp(&ready).unwrap_or(t0) - t0) * 1000.0);
        // The agent.
        incarnation.0 += 1;
        std::thread::sleep(Duration::from_millis(50)); // let it count as stable
        let t0 = now();
        kill(Pid::from_raw(agent as i32), Signal::SIGKILL)?;
        let launched = wait(
            lines,
            &["launched agent", &format!("incarnation={}", incarnation.0)],
        )?;
        agent = pid_after(&launched, "pid=").unwrap_or(0);
        let ready = wait(lines, &[&format!("agent{{pid={agent}}}"), "egg-ready"])?;
        rows[2].push((stamp(&launched).unwrap_or(t0) - t0) * 1000.0);
        rows[3].push((stamp(&ready).unwrap_or(t0) - t0) * 1000.0);
    }
    Ok(rows)
}
