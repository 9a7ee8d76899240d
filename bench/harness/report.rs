//! Figures, the comparison table and the JSON written for every run.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use super::cluster::System;

/// Median and range of one figure over the runs.
#[derive(Clone, Debug, Serialize)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
    pub samples: Vec<f64>,
}

impl Stat {
    pub fn of(samples: &[f64]) -> Option<Stat> {
        let mut s: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
        if s.is_empty() {
            return None;
        }
        s.sort_by(f64::total_cmp);
        let n = s.len();
        let median = if n % 2 == 1 {
            s[n / 2]
        } else {
            (s[n / 2 - 1] + s[n / 2]) / 2.0
        };
        Some(Stat {
            median,
            min: s[0],
            max: s[n - 1],
            n,
            samples: samples.to_vec(),
        })
    }
}

/// Which direction is better.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Better {
    Higher,
    Lower,
}

/// How a figure is printed.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    /// Deliveries per second.
    Rate,
    Micros,
    Millis,
    Nanos,
    MiB,
    /// A dimensionless ratio.
    Times,
}

impl Unit {
    pub fn name(self) -> &'static str {
        match self {
            Unit::Rate => "deliveries/s",
            Unit::Micros => "µs",
            Unit::Millis => "ms",
            Unit::Nanos => "ns",
            Unit::MiB => "MiB",
            Unit::Times => "×",
        }
    }

    pub fn format(self, v: f64) -> String {
        match self {
            Unit::Rate => {
                if v >= 1e6 {
                    format!("{:.2}M/s", v / 1e6)
                } else if v >= 1e3 {
                    format!("{:.0}k/s", v / 1e3)
                } else {
                    format!("{v:.0}/s")
                }
            }
            Unit::Micros => {
                if v >= 10_000.0 {
                    format!("{:.1} ms", v / 1e3)
                } else if v >= 100.0 {
                    format!("{v:.0} µs")
                } else {
                    format!("{v:.1} µs")
                }
            }
            Unit::Millis => {
                if v >= 100.0 {
                    format!("{v:.0} ms")
                } else {
                    format!("{v:.1} ms")
                }
            }
            Unit::Nanos => {
                if v >= 10_000.0 {
                    format!("{:.1} µs", v / 1e3)
                } else {
                    format!("{v:.0} ns")
                }
            }
            Unit::MiB => format!("{v:.1} MiB"),
            Unit::Times => format!("{v:.2}×"),
        }
    }

    /// A range "min–max" in this unit, compact.
    pub fn range(self, min: f64, max: f64) -> String {
        format!("{}–{}", self.format(min), self.format(max))
    }
}

/// A goal from the issue, checked against Clutch's median.
#[derive(Clone, Debug, Serialize)]
pub struct Goal {
    pub better: Better,
    pub value: f64,
    pub met: Option<bool>,
}

/// One row of the comparison.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub key: String,
    pub label: String,
    pub unit: Unit,
    pub better: Better,
    pub clutch: Option<Stat>,
    pub egg: Option<Stat>,
    /// Why the Egg cell is empty, or what it includes.
    pub egg_note: Option<String>,
    /// Why the Clutch cell is empty.
    pub clutch_note: Option<String>,
    /// How many times better Clutch's median is than Egg's (>1: Clutch is better).
    pub clutch_advantage: Option<f64>,
    pub goal: Option<Goal>,
    /// The figure from the issue's Egg column, for reference.
    pub issue_egg: Option<f64>,
}

/// What the harness collected.
#[derive(Default)]
pub struct Recorder {
    pub samples: BTreeMap<(System, String), Vec<f64>>,
    pub runs: Vec<Value>,
    pub failures: Vec<String>,
    /// Seconds each run waited for a quiet machine.
    pub quiet_waits: Vec<f64>,
    /// Runs that started although the machine was still busy.
    pub not_quiet: Vec<String>,
}

impl Recorder {
    pub fn add(&mut self, system: System, key: &str, value: f64) {
        self.samples
            .entry((system, key.to_owned()))
            .or_default()
            .push(value);
    }

    pub fn get(&self, system: System, key: &str) -> Option<&Vec<f64>> {
        self.samples.get(&(system, key.to_owned()))
    }

    pub fn stat(&self, system: System, key: &str) -> Option<Stat> {
        self.get(system, key).and_then(|s| Stat::of(s))
    }
}

/// Builds a row from what was recorded.
#[allow(clippy::too_many_arguments)]
pub fn row(
    rec: &Recorder,
    key: &str,
    label: String,
    unit: Unit,
    better: Better,
    goal: Option<f64>,
    issue_egg: Option<f64>,
    egg_note: Option<String>,
) -> Row {
    let clutch = rec.stat(System::Clutch, key);
    let egg = rec.stat(System::Egg, key);
    let clutch_advantage = match (&clutch, &egg) {
        (Some(c), Some(e)) if c.median > 0.0 && e.median > 0.0 => Some(match better {
            Better::Higher => c.median / e.median,
            Better::Lower => e.median / c.median,
        }),
        _ => None,
    };
    let goal = goal.map(|value| Goal {
        better,
        value,
        met: clutch.as_ref().map(|c| match better {
            Better::Higher => c.median >= value,
            Better::Lower => c.median <= value,
        }),
    });
    Row {
        key: key.to_owned(),
        label,
        unit,
        better,
        clutch,
        egg,
        egg_note,
        clutch_note: None,
        clutch_advantage,
        goal,
        issue_egg,
    }
}

/// The whole result of one harness run.
#[derive(Debug, Serialize)]
pub struct Report {
    pub schema: u32,
    pub date_utc: String,
    pub mode: String,
    pub command: String,
    pub machine: Value,
    pub versions: Value,
    pub options: Value,
    pub egg: EggStatus,
    pub quiet: Value,
    pub rows: Vec<Row>,
    pub cpu_by_role: Vec<Value>,
    pub correctness: Value,
    pub failures: Vec<String>,
    pub runs: Vec<Value>,
    pub elapsed_s: f64,
}

/// Whether the Egg column could run, and why not.
#[derive(Clone, Debug, Serialize)]
pub struct EggStatus {
    pub ran: bool,
    pub reason: Option<String>,
}

fn cell(stat: &Option<Stat>, unit: Unit, note: Option<&str>) -> String {
    match stat {
        Some(s) if s.n > 1 => format!("{} ({})", unit.format(s.median), unit.range(s.min, s.max)),
        Some(s) => unit.format(s.median),
        None => note
            .map(|n| format!("— ({n})"))
            .unwrap_or_else(|| "—".into()),
    }
}

impl Report {
    /// The comparison as a Markdown table plus the context a reader needs.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "Clutch vs Egg, {} mode, {} (UTC)\n\n",
            self.mode, self.date_utc
        ));
        out.push_str(&format!("- command: `{}`\n", self.command));
        out.push_str(&format!(
            "- machine: {} cores, {} MiB RAM, {}; kernel {}\n",
            self.machine["cores"],
            self.machine["mem_mib"],
            self.machine["cpu"].as_str().unwrap_or("?"),
            self.machine["kernel"].as_str().unwrap_or("?")
        ));
        out.push_str(&format!(
            "- versions: {}\n",
            self.versions
                .as_object()
                .map(|o| o
                    .iter()
                    .map(|(k, v)| format!("{k} {}", v.as_str().unwrap_or("?")))
                    .collect::<Vec<_>>()
                    .join(", "))
                .unwrap_or_default()
        ));
        out.push_str(&format!(
            "- sizes: {}\n",
            self.options["summary"].as_str().unwrap_or("")
        ));
        out.push_str(&format!(
            "- quiet machine: {}\n",
            self.quiet["summary"].as_str().unwrap_or("")
        ));
        if !self.egg.ran {
            out.push_str(&format!(
                "- Egg column: not run: {}\n",
                self.egg.reason.as_deref().unwrap_or("unknown reason")
            ));
        }
        out.push_str(
            "\nCells: median (min–max) over the runs. \"Clutch vs Egg\": how many times better Clutch's median is (above 1: Clutch is better). Goal: the issue's goal for Clutch, checked against the median.\n\n",
        );
        out.push_str("| scenario | Clutch | Egg | Clutch vs Egg | goal |\n");
        out.push_str("| --- | --- | --- | --- | --- |\n");
        for r in &self.rows {
            let goal = match &r.goal {
                None => String::new(),
                Some(g) => format!(
                    "{} {} {}",
                    if g.better == Better::Higher {
                        "≥"
                    } else {
                        "≤"
                    },
                    r.unit.format(g.value),
                    match g.met {
                        Some(true) => "met",
                        Some(false) => "**missed**",
                        None => "(no figure)",
                    }
                ),
            };
            let adv = r
                .clutch_advantage
                .map(|a| format!("{a:.1}×"))
                .unwrap_or_default();
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} |\n",
                r.label,
                cell(&r.clutch, r.unit, r.clutch_note.as_deref()),
                cell(&r.egg, r.unit, r.egg_note.as_deref()),
                adv,
                goal
            ));
        }
        if !self.cpu_by_role.is_empty() {
            out.push_str("\nWhere the CPU went during the floods (median CPU time per delivery, ns; \"other\" = the rest of the machine, harness included):\n\n");
            out.push_str("| system | flood | master | agent | apps (sum) | other |\n| --- | --- | --- | --- | --- | --- |\n");
            for c in &self.cpu_by_role {
                let f = |k: &str| {
                    c[k].as_f64()
                        .map(|v| format!("{v:.0}"))
                        .unwrap_or_else(|| "—".into())
                };
                out.push_str(&format!(
                    "| {} | {} | {} | {} | {} | {} |\n",
                    c["system"].as_str().unwrap_or(""),
                    c["flood"].as_str().unwrap_or(""),
                    f("master"),
                    f("agent"),
                    f("apps"),
                    f("other")
                ));
            }
        }
        out.push_str(&format!(
            "\nCorrectness (every throughput run): {}\n",
            self.correctness["summary"].as_str().unwrap_or("")
        ));
        if !self.failures.is_empty() {
            out.push_str("\nFailures:\n");
            for f in &self.failures {
                let first = f.lines().next().unwrap_or("");
                out.push_str(&format!("- {first}\n"));
            }
        }
        out
    }
}

/// Today's date and time in UTC, from the system clock (no date crate).
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
