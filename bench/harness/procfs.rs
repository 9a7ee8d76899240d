//! What the harness reads from `/proc`: memory and CPU of the measured
//! processes, the process tree, and the machine's overall CPU use (to tell
//! whether something else was running during a measurement).

// The benchmarks use only the /proc scan of the shared helpers.
#[allow(dead_code)]
#[path = "../../tests/common/procs.rs"]
mod procs;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// `VmRSS` and `VmHWM` (peak RSS) of a process, in bytes.
#[derive(Clone, Copy, Debug, Default)]
pub struct Memory {
    pub rss: u64,
    pub hwm: u64,
}

/// Reads `VmRSS` and `VmHWM` from `/proc/<pid>/status`.
pub fn memory(pid: u32) -> Option<Memory> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse::<u64>().ok())
            .map(|kib| kib * 1024)
    };
    Some(Memory {
        rss: field("VmRSS:")?,
        hwm: field("VmHWM:")?,
    })
}

/// Resident bytes from `/proc/<pid>/statm` (cheaper than `status`, for sampling).
pub fn rss_fast(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = text.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page_size())
}

fn page_size() -> u64 {
    static PAGE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *PAGE.get_or_init(|| getconf("PAGESIZE").unwrap_or(4096))
}

/// Clock ticks per second of `/proc/*/stat` and `/proc/stat`.
pub fn clk_tck() -> u64 {
    static TCK: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TCK.get_or_init(|| getconf("CLK_TCK").unwrap_or(100))
}

fn getconf(name: &str) -> Option<u64> {
    let out = std::process::Command::new("getconf")
        .arg(name)
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// The fields of `/proc/<pid>/stat` after the command name (which may hold
/// spaces and parentheses): index 0 is the state (field 3).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// A process's CPU time so far, per thread, in nanoseconds.
#[derive(Clone, Debug, Default)]
pub struct Cpu {
    /// Per thread id, from the scheduler's nanosecond accounting
    /// (`/proc/<pid>/task/<tid>/schedstat`), when the kernel has it.
    threads: HashMap<u32, u64>,
    /// `utime + stime` of the whole process from `/proc/<pid>/stat`
    /// (clock-tick resolution; includes threads that already exited).
    ticks_ns: u64,
}

/// Reads a process's CPU time (user + system, all threads).
pub fn cpu(pid: u32) -> Cpu {
    let ticks_ns = stat_fields(pid)
        .and_then(|f| {
            // utime and stime are fields 14 and 15; index 0 here is field 3.
            let utime: u64 = f.get(11)?.parse().ok()?;
            let stime: u64 = f.get(12)?.parse().ok()?;
            Some((utime + stime) * 1_000_000_000 / clk_tck())
        })
        .unwrap_or(0);
    let mut threads = HashMap::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            let Some(tid) = task
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(ns) = std::fs::read_to_string(task.path().join("schedstat"))
                .ok()
                .and_then(|t| t.split_whitespace().next()?.parse::<u64>().ok())
            {
                threads.insert(tid, ns);
            }
        }
    }
    Cpu { threads, ticks_ns }
}

impl Cpu {
    /// CPU time spent between `before` and `self`, in nanoseconds. Per
    /// thread when schedstat is there (threads that exited in between are
    /// not counted; the measured processes keep their threads), else from
    /// clock ticks (10 ms resolution at 100 Hz).
    pub fn since(&self, before: &Cpu) -> u64 {
        if self.threads.is_empty() {
            return self.ticks_ns.saturating_sub(before.ticks_ns);
        }
        self.threads
            .iter()
            .map(|(tid, ns)| ns.saturating_sub(before.threads.get(tid).copied().unwrap_or(0)))
            .sum()
    }
}

/// Whether a process is gone (or a zombie).
pub fn is_gone(pid: u32) -> bool {
    match stat_fields(pid) {
        None => true,
        Some(f) => f.first().is_some_and(|s| s == "Z" || s == "X"),
    }
}

/// `root` and all its descendants.
pub fn tree(root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(ppid) = stat_fields(pid).and_then(|f| f.get(1)?.parse::<u32>().ok()) {
                children.entry(ppid).or_default().push(pid);
            }
        }
    }
    let mut out = vec![root];
    let mut seen: HashSet<u32> = HashSet::from([root]);
    let mut i = 0;
    while i < out.len() {
        if let Some(kids) = children.get(&out[i]) {
            for &k in kids {
                if seen.insert(k) {
                    out.push(k);
                }
            }
        }
        i += 1;
    }
    out
}

/// Live processes whose environment holds `BENCH_TAG=<tag>`: everything a
/// cluster launched, even if it escaped its parent.
pub fn tagged(tag: &str) -> Vec<u32> {
    procs::with_env("BENCH_TAG", tag)
        .into_iter()
        .filter(|&pid| !is_gone(pid))
        .collect()
}

/// Busy CPU time of the whole machine (all cores), in nanoseconds.
pub fn machine_busy_ns() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().next()?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal guest guest_nice;
    // guest time is already counted in user.
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4).unwrap_or(&0);
    Some((total - idle) * 1_000_000_000 / clk_tck())
}

/// The 1, 5 and 15 minute load averages.
pub fn loadavg() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut it = text
        .split_whitespace()
        .filter_map(|x| x.parse::<f64>().ok());
    [
        it.next().unwrap_or(f64::NAN),
        it.next().unwrap_or(f64::NAN),
        it.next().unwrap_or(f64::NAN),
    ]
}

/// Samples the summed RSS of a fixed set of processes on a thread until
/// stopped; keeps the peak.
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<(u64, usize)>>,
}

impl RssSampler {
    pub fn start(pids: Vec<u32>, every: Duration) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = 0u64;
            let mut samples = 0usize;
            loop {
                let sum: u64 = pids.iter().filter_map(|&p| rss_fast(p)).sum();
                peak = peak.max(sum);
                samples += 1;
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(every);
            }
            (peak, samples)
        });
        RssSampler {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops sampling; returns the peak summed RSS in bytes and the number of samples.
    pub fn finish(mut self) -> (u64, usize) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or((0, 0))
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
