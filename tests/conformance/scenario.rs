//! Scenarios as data, and the controller that plays them.
//!
//! A scenario file (`scenarios/*.toml` or `*.json`) describes a cluster and
//! a list of steps; `README.md` in this folder documents every field. The
//! controller starts the cluster with the conformance workers of the
//! language under test (or one per language), carries out each step through
//! the agent, and checks each expectation against the events the processes
//! reported. Processes are named `agent`, `app1` … `appN`.

use std::collections::BTreeMap;
use std::path::Path;

use nix::sys::signal::Signal;
use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};

use crate::harness::{name, Cluster, Event, Spec};
use crate::langs::{Lang, Launch};

/// A pid no process can have: above Linux's hard `pid_max` (2^22).
const UNKNOWN_PID: u32 = 4_000_000_000;

/// Deserializes a present field as `Some(value)`, so that an explicit JSON
/// `null` is `Some(Value::Null)` and only a missing field is `None`.
fn some_value<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

/// One scenario file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// What it checks, in a sentence.
    pub name: String,
    /// The contract it checks (a routing row, a README rule, ...).
    #[serde(default)]
    pub contract: String,
    /// App workers in the cluster (ignored for mixed scenarios: one per language).
    #[serde(default = "two")]
    pub workers: u32,
    /// `true`: one worker per language (rust, python, node, go in slots
    /// 1..=4) instead of every worker in the language under test.
    #[serde(default)]
    pub mixed: bool,
    /// Actions every process reports.
    #[serde(default)]
    pub actions: Vec<String>,
    /// The agent says `ready` only at a `ready` step.
    #[serde(default)]
    pub agent_manual_ready: bool,
    /// The workers say `ready` only at a `ready` step.
    #[serde(default)]
    pub workers_manual_ready: bool,
    /// The workers reach the master through a proxy that `cut_connections` cuts.
    #[serde(default)]
    pub proxy: bool,
    /// Raw TOML appended to the cluster's configuration (e.g. `[limits]`).
    #[serde(default)]
    pub cluster_toml: String,
    /// Named lists of payloads, for `payloads_from` in steps.
    #[serde(default)]
    pub data_sets: BTreeMap<String, Vec<Value>>,
    /// The steps, in order. Unless a manual-ready flag is set, they start
    /// once every process has had `egg-ready`.
    pub step: Vec<Step>,
}

fn two() -> u32 {
    2
}

fn app() -> String {
    "app".to_owned()
}

/// One step of a scenario.
#[derive(Debug, Deserialize)]
#[serde(tag = "do", rename_all = "snake_case", deny_unknown_fields)]
pub enum Step {
    /// The process says `ready`.
    Ready { who: String },
    /// Waits until these processes (default: all) have registered.
    WaitHello {
        #[serde(default)]
        who: Vec<String>,
    },
    /// Waits until every process has had `egg-ready`.
    WaitEggReady {},
    /// A send (or several: `count`, `payloads`) by one process.
    Send(Box<SendStep>),
    /// `from` broadcasts a marker; waits until every process has it.
    Barrier { from: String },
    /// Checks the messages each process received with an action.
    ExpectReceived(Box<ExpectReceived>),
    /// Checks how many events of a kind each process reported; waits until
    /// the listed counts are reached, then checks they are exact (processes
    /// not listed: 0).
    ExpectEvents {
        kind: String,
        counts: BTreeMap<String, usize>,
        /// Fields every such event must carry (not null).
        #[serde(default)]
        has: Vec<String>,
    },
    /// Checks the `egg-pids` a process got before its `egg-ready`: the last
    /// one (or, with `every`, each one) lists exactly these processes' pids.
    ExpectEggPids {
        who: String,
        pids: Vec<String>,
        #[serde(default)]
        every: bool,
    },
    /// Asks a worker for its library's view of itself and checks it.
    ExpectState(Box<ExpectState>),
    /// A worker subscribes to an action (`handler`: "on" or "once").
    Subscribe {
        who: String,
        action: String,
        handler: String,
    },
    /// Workers count the messages of a (high-volume) action themselves,
    /// checking their `seq`, instead of reporting each one.
    Tally { who: Vec<String>, action: String },
    /// Asks each listed worker for its tally of an action: this many
    /// messages, in order. The request travels behind the messages from the
    /// agent, so it is answered after they are handled.
    ExpectTally {
        action: String,
        counts: BTreeMap<String, u64>,
    },
    /// A worker registers a second time with this secret ("own": its own,
    /// already used) and role; the library must refuse with `code`.
    ExpectConnectRefused {
        who: String,
        secret: String,
        #[serde(default = "app")]
        role: String,
        code: String,
    },
    /// Waits for a fire-and-forget failure report at a worker.
    ExpectUndelivered {
        who: String,
        action: String,
        code: String,
    },
    /// A process exits with this code; its pid becomes `dead:<who>`. For
    /// the agent, the probe exits (and the master restarts it).
    Exit { who: String, code: i32 },
    /// Waits until the latest `egg-pids` at a process lists exactly these
    /// processes' pids (resolved when the step starts).
    WaitLatestEggPids { who: String, pids: Vec<String> },
    /// Waits until the agent's `egg-pids` no longer lists this pid.
    WaitEggPidsWithout { pid: String },
    /// Waits until the master has restarted a worker that exited: its
    /// slot's next process has registered.
    WaitRestarted { who: String },
    /// Cuts the workers' connections (needs `proxy = true`).
    CutConnections {},
    /// Sends a signal to the master: "SIGTERM", "SIGINT" or "SIGKILL".
    SignalMaster { signal: String },
    /// Waits for the master to exit with this code.
    ExpectMasterExit { code: i32 },
    /// Waits for the master's log to say each process exited with its code.
    ExpectExitCodes { codes: BTreeMap<String, i32> },
    /// Waits until no process of the cluster is left.
    ExpectNoChildren {},
}

/// A `send` step.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendStep {
    /// The sender.
    pub from: String,
    /// Egg's name: broadcast, sendToApp, sendToAgent, sendRandom, sendTo.
    pub call: String,
    /// For sendTo: a process name, `dead:<process>`, `master` or `unknown`.
    #[serde(default)]
    pub to: Option<String>,
    /// The action.
    pub action: String,
    /// The payload (a TOML or JSON value; JSON `null` allowed).
    #[serde(default, deserialize_with = "some_value")]
    pub data: Option<Value>,
    /// The payload as JSON text (TOML has no null and no u64).
    #[serde(default)]
    pub data_json: Option<String>,
    /// Exact payload bytes (as UTF-8 text), sent without JSON encoding.
    #[serde(default)]
    pub raw: Option<String>,
    /// Several payloads, one send each, in order.
    #[serde(default)]
    pub payloads: Option<Vec<Value>>,
    /// Like `payloads`, from the scenario's `data_sets`.
    #[serde(default)]
    pub payloads_from: Option<String>,
    /// Send it this many times.
    #[serde(default)]
    pub count: Option<u64>,
    /// Wrap the i-th payload as `{"seq": i, "data": payload}`.
    #[serde(default)]
    pub seq: bool,
    /// `false`: fire-and-forget (`emit` / `post`); one report after all.
    #[serde(default)]
    pub confirm: Option<bool>,
    /// Checked against every report.
    #[serde(default)]
    pub expect: Option<Expect>,
    /// Checked against the first report only.
    #[serde(default)]
    pub expect_first: Option<Expect>,
}

/// Expectations about a send's report.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// Whether the send succeeded.
    pub ok: Option<bool>,
    /// Processes it was handed to.
    pub delivered: Option<u64>,
    /// Processes it is held for.
    pub held: Option<u64>,
    /// `delivered + held`.
    pub reached: Option<u64>,
    /// At least this many held.
    pub held_min: Option<u64>,
    /// The gRPC code of a failed send, e.g. "NOT_FOUND".
    pub code: Option<String>,
}

/// An `expect_received` step.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectReceived {
    /// The action.
    pub action: String,
    /// Messages per process; processes not listed must have none. Waits
    /// until the listed counts are reached, then checks they are exact.
    #[serde(default)]
    pub counts: BTreeMap<String, usize>,
    /// Instead of per-process counts: this many messages in all among the
    /// processes in `among` (which may split them in any way), none elsewhere.
    #[serde(default)]
    pub total: Option<usize>,
    /// See `total`.
    #[serde(default)]
    pub among: Vec<String>,
    /// Instead of `counts`, with `payloads`: each of these processes got
    /// every payload (and no other process any).
    #[serde(default)]
    pub receivers: Vec<String>,
    /// Only messages from this kind of handler ("on" or "once").
    #[serde(default)]
    pub handler: Option<String>,
    /// Every message carries this payload.
    #[serde(default, deserialize_with = "some_value")]
    pub data: Option<Value>,
    /// Every message carries this payload (JSON text).
    #[serde(default)]
    pub data_json: Option<String>,
    /// Each receiver got exactly these payloads, in this order.
    #[serde(default)]
    pub payloads: Option<Vec<Value>>,
    /// Like `payloads`, from the scenario's `data_sets`.
    #[serde(default)]
    pub payloads_from: Option<String>,
    /// Every message names this sender (role, pid and worker id).
    #[serde(default)]
    pub from: Option<String>,
    /// The messages carry `seq` 0, 1, 2, … in order (see `SendStep::seq`).
    #[serde(default)]
    pub in_order: bool,
}

/// An `expect_state` step.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectState {
    /// The worker.
    pub who: String,
    /// Its library's egg-ready flag.
    #[serde(default)]
    pub egg_ready: Option<bool>,
    /// Its library's last egg-pids, as process names.
    #[serde(default)]
    pub egg_pids: Option<Vec<String>>,
    /// Its identity's role.
    #[serde(default)]
    pub role: Option<String>,
    /// Its identity's worker id.
    #[serde(default)]
    pub worker_id: Option<u32>,
    /// Its identity's worker count.
    #[serde(default)]
    pub workers: Option<u32>,
    /// Its identity's incarnation.
    #[serde(default)]
    pub incarnation: Option<u32>,
}

/// Reads a scenario file (TOML or JSON by extension).
pub fn load(path: &Path) -> Scenario {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let parsed = match path.extension().and_then(|e| e.to_str()) {
        Some("toml") => toml::from_str(&text).map_err(|e| e.to_string()),
        Some("json") => serde_json::from_str(&text).map_err(|e| e.to_string()),
        _ => Err("not a .toml or .json file".to_owned()),
    };
    parsed.unwrap_or_else(|e| panic!("bad scenario {}: {e}", path.display()))
}

/// Canonical gRPC code numbers, by the names scenarios use.
fn code_number(name: &str) -> Option<u64> {
    const CODES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    // The probe reports Rust names ("NotFound"): compare without case and
    // underscores.
    let squash = |s: &str| s.replace('_', "").to_ascii_lowercase();
    CODES
        .iter()
        .position(|c| squash(c) == squash(name))
        .map(|i| i as u64)
}

/// The gRPC code number of a failed send's report (the probe reports the
/// Rust name, the workers the number).
fn report_code(report: &Value) -> Option<u64> {
    match &report["code"] {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => code_number(s),
        _ => None,
    }
}

/// JSON equality as every language can keep it: integers compare exactly,
/// and a number with a fraction or exponent compares as an f64 (a JSON
/// library may write 1.0 as 1).
pub fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let int = |n: &serde_json::Number| {
                n.as_i64()
                    .map(i128::from)
                    .or_else(|| n.as_u64().map(i128::from))
            };
            match (int(x), int(y)) {
                (Some(i), Some(j)) => i == j,
                _ => x.as_f64() == y.as_f64(),
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| json_eq(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w)))
        }
        _ => a == b,
    }
}

/// The language(s) a scenario runs with.
pub enum Workers {
    /// Every worker in one language.
    One(Lang, Launch),
    /// One worker per language, in [`Lang::ALL`] order.
    Mixed(Vec<(Lang, Launch)>),
}

/// Plays a scenario against a fresh cluster.
pub async fn play(scenario: &Scenario, workers: Workers) {
    let workers = match workers {
        Workers::One(lang, launch) => (0..scenario.workers)
            .map(|_| (lang, launch.clone()))
            .collect(),
        Workers::Mixed(all) => all,
    };
    let mut c = Cluster::start(Spec {
        workers,
        actions: scenario.actions.clone(),
        agent_manual_ready: scenario.agent_manual_ready,
        workers_manual_ready: scenario.workers_manual_ready,
        proxy: scenario.proxy,
        extra_toml: scenario.cluster_toml.clone(),
    })
    .await;
    c.set_label(format!(
        "scenario: {} [{}]",
        scenario.name, scenario.contract
    ));
    let mut player = Player {
        dead: BTreeMap::new(),
        data_sets: scenario.data_sets.clone(),
    };
    if !scenario.agent_manual_ready && !scenario.workers_manual_ready {
        c.wait_all_egg_ready().await;
    }
    for (i, step) in scenario.step.iter().enumerate() {
        player.step(&mut c, step, i + 1).await;
    }
}

struct Player {
    /// Pids of processes that exited on a step's command (or lost their
    /// connection), by worker id.
    dead: BTreeMap<u32, u32>,
    /// The scenario's named payload lists.
    data_sets: BTreeMap<String, Vec<Value>>,
}

impl Player {
    fn who(c: &mut Cluster, who: &str) -> u32 {
        let at = if who == "agent" {
            Some(0)
        } else {
            who.strip_prefix("app").and_then(|n| n.parse::<u32>().ok())
        };
        match at {
            Some(at) if at <= c.workers() => at,
            _ => c.fail(&format!(
                "scenario names {who:?}: expected \"agent\" or \"app1\"..\"app{}\"",
                c.workers()
            )),
        }
    }

    async fn pid(&self, c: &mut Cluster, reference: &str) -> u32 {
        match reference {
            "unknown" => UNKNOWN_PID,
            "master" => c.master_pid(),
            _ => {
                if let Some(who) = reference.strip_prefix("dead:") {
                    let at = Self::who(c, who);
                    match self.dead.get(&at) {
                        Some(&pid) => pid,
                        None => c.fail(&format!("{reference:?}: {who} has not exited")),
                    }
                } else {
                    let at = Self::who(c, reference);
                    c.pid_of(at).await
                }
            }
        }
    }

    async fn step(&mut self, c: &mut Cluster, step: &Step, n: usize) {
        match step {
            Step::Ready { who } => {
                let at = Self::who(c, who);
                if at == 0 {
                    c.agent_command(json!({ "cmd": "ready" })).await;
                    c.wait_for("the agent's ready-sent", |e| {
                        e.at == 0 && e.kind() == "ready-sent"
                    })
                    .await;
                } else {
                    let id = c.worker_command(at, json!({ "op": "ready" })).await;
                    c.wait_for(&format!("{who}'s ready-sent"), |e| {
                        e.at == at && e.kind() == "ready-sent" && e.body["id"] == id
                    })
                    .await;
                }
            }
            Step::WaitHello { who } => {
                let all: Vec<u32> = if who.is_empty() {
                    c.all()
                } else {
                    who.iter().map(|w| Self::who(c, w)).collect()
                };
                for at in all {
                    c.hello(at).await;
                }
            }
            Step::WaitEggReady {} => c.wait_all_egg_ready().await,
            Step::Send(send) => self.send(c, send, n).await,
            Step::Barrier { from } => {
                let at = Self::who(c, from);
                c.barrier(at).await;
            }
            Step::ExpectReceived(expect) => self.expect_received(c, expect, n).await,
            Step::ExpectEvents { kind, counts, has } => {
                let want = Self::counts(c, counts);
                let kind = kind.clone();
                c.wait_until(&format!("step {n}: {kind} counts {want:?}"), |h| {
                    want.iter().enumerate().all(|(at, &w)| {
                        h.iter()
                            .filter(|e| e.at == at as u32 && e.kind() == kind)
                            .count()
                            >= w
                    })
                })
                .await;
                let got: Vec<usize> = c
                    .all()
                    .iter()
                    .map(|&at| c.events_at(at, &kind).len())
                    .collect();
                if got != want {
                    c.fail(&format!(
                        "step {n}: {kind} per process (agent, app1, …): want {want:?}, got {got:?}"
                    ));
                }
                let missing: Vec<String> = c
                    .history()
                    .iter()
                    .filter(|e| e.kind() == kind)
                    .filter(|e| has.iter().any(|f| e.body[f.as_str()].is_null()))
                    .map(ToString::to_string)
                    .collect();
                if !missing.is_empty() {
                    c.fail(&format!(
                        "step {n}: {kind} events without {has:?}: {missing:?}"
                    ));
                }
            }
            Step::ExpectEggPids { who, pids, every } => {
                let at = Self::who(c, who);
                let mut want = Vec::new();
                for p in pids {
                    want.push(u64::from(self.pid(c, p).await));
                }
                want.sort_unstable();
                c.wait_for(&format!("egg-ready at {who}"), |e| {
                    e.at == at && e.kind() == "egg-ready"
                })
                .await;
                let seen: Vec<Vec<u64>> = c
                    .history()
                    .iter()
                    .filter(|e| e.at == at)
                    .take_while(|e| e.kind() != "egg-ready")
                    .filter(|e| e.kind() == "egg-pids")
                    .map(|e| {
                        let mut pids: Vec<u64> = e.body["pids"]
                            .as_array()
                            .map(|a| a.iter().filter_map(Value::as_u64).collect())
                            .unwrap_or_default();
                        pids.sort_unstable();
                        pids
                    })
                    .collect();
                let ok = if *every {
                    !seen.is_empty() && seen.iter().all(|p| *p == want)
                } else {
                    seen.last() == Some(&want)
                };
                if !ok {
                    c.fail(&format!(
                        "step {n}: {who}'s egg-pids before egg-ready: want {} {want:?} ({pids:?}), saw {seen:?}",
                        if *every { "every one" } else { "the last one" }
                    ));
                }
            }
            Step::ExpectState(expect) => {
                let at = Self::who(c, &expect.who);
                let id = c.worker_command(at, json!({ "op": "state" })).await;
                let state = c
                    .wait_for(&format!("{}'s state", expect.who), |e| {
                        e.at == at && e.kind() == "state" && e.body["id"] == id
                    })
                    .await;
                let mut problems = Vec::new();
                let mut check = |field: &str, want: Value| {
                    if !json_eq(&state.body[field], &want) {
                        problems.push(format!("{field}: want {want}, got {}", state.body[field]));
                    }
                };
                if let Some(v) = expect.egg_ready {
                    check("egg_ready", json!(v));
                }
                if let Some(v) = &expect.role {
                    check("role", json!(v));
                }
                if let Some(v) = expect.worker_id {
                    check("worker_id", json!(v));
                }
                if let Some(v) = expect.workers {
                    check("workers", json!(v));
                }
                if let Some(v) = expect.incarnation {
                    check("incarnation", json!(v));
                }
                let pid = c.pid_of(at).await;
                if state.body["pid"] != json!(pid) || state.body["reported_by_pid"] != json!(pid) {
                    problems.push(format!("pid: the master says {pid}, got {state}"));
                }
                if state.body["master_pid"] != json!(c.master_pid()) {
                    problems.push(format!("master_pid: want {}, got {state}", c.master_pid()));
                }
                if let Some(names) = &expect.egg_pids {
                    let mut want = Vec::new();
                    for p in names {
                        want.push(u64::from(self.pid(c, p).await));
                    }
                    want.sort_unstable();
                    let mut got: Vec<u64> = state.body["egg_pids"]
                        .as_array()
                        .map(|a| a.iter().filter_map(Value::as_u64).collect())
                        .unwrap_or_default();
                    got.sort_unstable();
                    if got != want {
                        problems.push(format!("egg_pids: want {want:?} ({names:?}), got {got:?}"));
                    }
                }
                if !problems.is_empty() {
                    c.fail(&format!(
                        "step {n}: {}'s state: {}",
                        expect.who,
                        problems.join("; ")
                    ));
                }
            }
            Step::Subscribe {
                who,
                action,
                handler,
            } => {
                let at = Self::who(c, who);
                let id = c
                    .worker_command(at, json!({ "op": handler, "action": action }))
                    .await;
                c.wait_for(&format!("{who} subscribed to {action}"), |e| {
                    e.at == at && e.kind() == "subscribed" && e.body["id"] == id
                })
                .await;
            }
            Step::Tally { who, action } => {
                for w in who {
                    let at = Self::who(c, w);
                    let id = c
                        .worker_command(at, json!({ "op": "tally", "action": action }))
                        .await;
                    c.wait_for(&format!("{w} tallying {action}"), |e| {
                        e.at == at && e.kind() == "subscribed" && e.body["id"] == id
                    })
                    .await;
                }
            }
            Step::ExpectTally { action, counts } => {
                for (w, &want) in counts {
                    let at = Self::who(c, w);
                    let id = c
                        .worker_command(at, json!({ "op": "tally-report", "action": action }))
                        .await;
                    let tally = c
                        .wait_for(&format!("{w}'s tally of {action}"), |e| {
                            e.at == at && e.kind() == "tally" && e.body["id"] == id
                        })
                        .await;
                    if tally.body["count"] != json!(want) || tally.body["in_order"] != true {
                        c.fail(&format!(
                            "step {n}: {w} should have {want} {action:?} messages in order: {tally}"
                        ));
                    }
                }
            }
            Step::ExpectConnectRefused {
                who,
                secret,
                role,
                code,
            } => {
                let at = Self::who(c, who);
                let want = code_number(code)
                    .unwrap_or_else(|| c.fail(&format!("step {n}: unknown code {code:?}")));
                let op = json!({ "op": "connect", "secret": secret, "role": role });
                let id = c.worker_command(at, op).await;
                let answer = c
                    .wait_for(&format!("{who}'s second registration"), |e| {
                        e.at == at && e.kind() == "connect" && e.body["id"] == id
                    })
                    .await;
                if answer.body["ok"] != false || report_code(&answer.body) != Some(want) {
                    c.fail(&format!(
                        "step {n}: {who} registering with secret {secret:?} as {role} should be refused with {code}: {answer}"
                    ));
                }
            }
            Step::ExpectUndelivered { who, action, code } => {
                let at = Self::who(c, who);
                let want = code_number(code)
                    .unwrap_or_else(|| c.fail(&format!("step {n}: unknown code {code:?}")));
                let event = c
                    .wait_for(
                        &format!("an undelivered report of {action} at {who}"),
                        |e| e.at == at && e.kind() == "undelivered" && e.body["action"] == *action,
                    )
                    .await;
                if event.body["codes"] != json!([want]) {
                    c.fail(&format!(
                        "step {n}: want codes [{want}] ({code}), got {event}"
                    ));
                }
            }
            Step::Exit { who, code } => {
                let at = Self::who(c, who);
                let pid = c.pid_of(at).await;
                self.dead.insert(at, pid);
                if at == 0 {
                    c.agent_command(json!({ "cmd": "exit", "code": code }))
                        .await;
                } else {
                    let op = json!({ "op": "exit", "code": code });
                    c.worker_command(at, op).await;
                }
            }
            Step::WaitEggPidsWithout { pid } => {
                let gone = u64::from(self.pid(c, pid).await);
                c.wait_for(
                    &format!("the agent's egg-pids without {pid} ({gone})"),
                    |e| {
                        e.at == 0
                            && e.kind() == "egg-pids"
                            && e.body["pids"]
                                .as_array()
                                .is_some_and(|a| !a.iter().any(|p| p.as_u64() == Some(gone)))
                    },
                )
                .await;
            }
            Step::WaitLatestEggPids { who, pids } => {
                let at = Self::who(c, who);
                let mut want = Vec::new();
                for p in pids {
                    want.push(u64::from(self.pid(c, p).await));
                }
                want.sort_unstable();
                c.wait_until(
                    &format!("{who}'s latest egg-pids = {pids:?} {want:?}"),
                    |h| {
                        h.iter()
                            .rev()
                            .find(|e| e.at == at && e.kind() == "egg-pids")
                            .is_some_and(|e| {
                                let mut got: Vec<u64> = e.body["pids"]
                                    .as_array()
                                    .map(|a| a.iter().filter_map(Value::as_u64).collect())
                                    .unwrap_or_default();
                                got.sort_unstable();
                                got == want
                            })
                    },
                )
                .await;
            }
            Step::WaitRestarted { who } => {
                let at = Self::who(c, who);
                let Some(&dead) = self.dead.get(&at) else {
                    c.fail(&format!("step {n}: {who} has not exited"));
                };
                c.wait_for(&format!("{who} restarted (a new pid, not {dead})"), |e| {
                    e.at == at && e.kind() == "hello" && e.body["pid"] != json!(dead)
                })
                .await;
            }
            Step::CutConnections {} => {
                // Their pids, for `expect_exit_codes`: the master restarts them.
                for at in 1..=c.workers() {
                    let pid = c.pid_of(at).await;
                    self.dead.insert(at, pid);
                }
                c.cut_connections();
            }
            Step::SignalMaster { signal } => {
                let signal = match signal.as_str() {
                    "SIGTERM" => Signal::SIGTERM,
                    "SIGINT" => Signal::SIGINT,
                    "SIGKILL" => Signal::SIGKILL,
                    other => c.fail(&format!("step {n}: unknown signal {other:?}")),
                };
                c.signal_master(signal);
            }
            Step::ExpectMasterExit { code } => {
                let status = c.master_exit().await;
                if status.code() != Some(*code) {
                    c.fail(&format!(
                        "step {n}: the master should exit with {code}, not {status}"
                    ));
                }
            }
            Step::ExpectExitCodes { codes } => {
                for (who, code) in codes {
                    let at = Self::who(c, who);
                    let pid = match self.dead.get(&at) {
                        Some(&pid) => pid,
                        None => c.pid_of(at).await,
                    };
                    // The master logs each child's end under its span:
                    // `app{worker=1 pid=123}: exited with exit code 0`.
                    let span = format!("pid={pid}}}");
                    let ending = format!("exited with exit code {code}");
                    c.wait_log(&format!("{who} (pid {pid}) {ending}"), |line| {
                        line.contains(&span) && line.contains(&ending)
                    })
                    .await;
                }
            }
            Step::ExpectNoChildren {} => c.wait_children_gone().await,
        }
    }

    /// Per-process counts (index = worker id), unlisted processes 0.
    fn counts(c: &mut Cluster, counts: &BTreeMap<String, usize>) -> Vec<usize> {
        let mut want = vec![0; c.all().len()];
        for (who, &n) in counts {
            let at = Self::who(c, who);
            want[at as usize] = n;
        }
        want
    }

    async fn send(&mut self, c: &mut Cluster, s: &SendStep, n: usize) {
        let from = Self::who(c, &s.from);
        let (route, pid) = match s.call.as_str() {
            "broadcast" => ("broadcast", 0),
            "sendToApp" => ("apps", 0),
            "sendToAgent" => ("agent", 0),
            "sendRandom" => ("random", 0),
            "sendTo" => {
                let Some(to) = &s.to else {
                    c.fail(&format!("step {n}: sendTo needs `to`"));
                };
                ("pid", self.pid(c, to).await)
            }
            other => c.fail(&format!("step {n}: unknown call {other:?}")),
        };
        let data = match (&s.data, &s.data_json) {
            (Some(v), None) => v.clone(),
            (None, Some(text)) => serde_json::from_str(text)
                .unwrap_or_else(|e| c.fail(&format!("step {n}: bad data_json: {e}"))),
            (None, None) => Value::Null,
            (Some(_), Some(_)) => c.fail(&format!("step {n}: data and data_json both given")),
        };
        let confirm = s.confirm.unwrap_or(true);
        let payloads = match (&s.payloads, &s.payloads_from) {
            (Some(p), None) => p.clone(),
            (None, Some(set)) => self.data_set(c, set, n),
            (None, None) => vec![data],
            (Some(_), Some(_)) => {
                c.fail(&format!("step {n}: payloads and payloads_from both given"))
            }
        };
        let mut reports = Vec::new();
        for payload in payloads {
            let mut op = json!({
                "route": route,
                "pid": pid,
                "action": s.action,
                "data": payload,
                "count": s.count.unwrap_or(1),
                "seq": s.seq,
                "confirm": confirm,
            });
            if let Some(raw) = &s.raw {
                if from == 0 {
                    c.fail(&format!(
                        "step {n}: the agent (the probe) cannot send raw bytes"
                    ));
                }
                op["raw"] = json!(raw);
            }
            let expected = if confirm {
                usize::try_from(s.count.unwrap_or(1)).expect("count fits usize")
            } else {
                1
            };
            let id = if from == 0 {
                c.agent_send(op).await
            } else {
                op["op"] = json!("send");
                c.worker_command(from, op).await
            };
            reports.extend(c.sent(from, id, expected).await);
        }
        let check = |c: &mut Cluster, expect: &Expect, report: &Value| {
            let num = |k: &str| report[k].as_u64().unwrap_or(0);
            let mut problems = Vec::new();
            if let Some(ok) = expect.ok {
                if report["ok"] != ok {
                    problems.push(format!("ok: want {ok}"));
                }
            }
            for (field, want) in [("delivered", expect.delivered), ("held", expect.held)] {
                if let Some(want) = want {
                    if num(field) != want {
                        problems.push(format!("{field}: want {want}"));
                    }
                }
            }
            if let Some(want) = expect.reached {
                if num("delivered") + num("held") != want {
                    problems.push(format!("delivered + held: want {want}"));
                }
            }
            if let Some(want) = expect.held_min {
                if num("held") < want {
                    problems.push(format!("held: want at least {want}"));
                }
            }
            if let Some(code) = &expect.code {
                let want = code_number(code);
                if want.is_none() || report_code(report) != want {
                    problems.push(format!("code: want {code} ({want:?})"));
                }
            }
            if !problems.is_empty() {
                c.fail(&format!(
                    "step {n}: {} {} {:?}: {} in report {report}",
                    s.from,
                    s.call,
                    s.action,
                    problems.join("; ")
                ));
            }
        };
        if let Some(expect) = &s.expect_first {
            check(c, expect, &reports[0]);
        }
        let default = Expect {
            ok: Some(true),
            ..Expect::default()
        };
        let expect = s.expect.as_ref().unwrap_or(&default);
        for report in &reports {
            check(c, expect, report);
        }
    }

    fn data_set(&self, c: &mut Cluster, name: &str, n: usize) -> Vec<Value> {
        match self.data_sets.get(name) {
            Some(set) => set.clone(),
            None => c.fail(&format!("step {n}: no data set {name:?} in the scenario")),
        }
    }

    async fn expect_received(&mut self, c: &mut Cluster, x: &ExpectReceived, n: usize) {
        let payloads = match (&x.payloads, &x.payloads_from) {
            (Some(p), None) => Some(p.clone()),
            (None, Some(set)) => Some(self.data_set(c, set, n)),
            (None, None) => None,
            (Some(_), Some(_)) => {
                c.fail(&format!("step {n}: payloads and payloads_from both given"))
            }
        };
        if let Some(total) = x.total {
            if !x.counts.is_empty() {
                c.fail(&format!("step {n}: give counts or total, not both"));
            }
            return self.expect_total(c, x, total, n).await;
        }
        let mut counts = x.counts.clone();
        if !x.receivers.is_empty() {
            let Some(payloads) = &payloads else {
                c.fail(&format!(
                    "step {n}: receivers needs payloads or payloads_from"
                ));
            };
            if !counts.is_empty() {
                c.fail(&format!("step {n}: give counts or receivers, not both"));
            }
            for r in &x.receivers {
                counts.insert(r.clone(), payloads.len());
            }
        }
        let want = Self::counts(c, &counts);
        let action = x.action.clone();
        let handler = x.handler.clone();
        let matches = move |e: &Event| {
            e.is_message(&action)
                && handler
                    .as_ref()
                    .is_none_or(|h| e.body["handler"] == h.as_str())
        };
        {
            let matches = matches.clone();
            c.wait_until(&format!("step {n}: {} messages {want:?}", x.action), |h| {
                want.iter().enumerate().all(|(at, &w)| {
                    h.iter().filter(|e| e.at == at as u32 && matches(e)).count() >= w
                })
            })
            .await;
        }
        let per: Vec<Vec<Event>> = c
            .all()
            .iter()
            .map(|&at| {
                c.history()
                    .iter()
                    .filter(|e| e.at == at && matches(e))
                    .cloned()
                    .collect()
            })
            .collect();
        let got: Vec<usize> = per.iter().map(Vec::len).collect();
        if got != want {
            c.fail(&format!(
                "step {n}: {:?} messages per process (agent, app1, …): want {want:?}, got {got:?}",
                x.action
            ));
        }
        let data = match (&x.data, &x.data_json) {
            (Some(v), None) => Some(v.clone()),
            (None, Some(text)) => Some(
                serde_json::from_str(text)
                    .unwrap_or_else(|e| c.fail(&format!("step {n}: bad data_json: {e}"))),
            ),
            (None, None) => None,
            (Some(_), Some(_)) => c.fail(&format!("step {n}: data and data_json both given")),
        };
        let sender = match &x.from {
            Some(who) => {
                let at = Self::who(c, who);
                let pid = c.pid_of(at).await;
                let role = if at == 0 { "agent" } else { "app" };
                Some((role, pid, at))
            }
            None => None,
        };
        for (at, messages) in per.iter().enumerate() {
            let at = at as u32;
            for (i, m) in messages.iter().enumerate() {
                let payload = &m.body["data"];
                if let Some(want) = &data {
                    if !json_eq(payload, want) {
                        c.fail(&format!(
                            "step {n}: {} got {:?} #{i} with data\n  {payload}\nwant\n  {want}",
                            name(at),
                            x.action
                        ));
                    }
                }
                if let Some(payloads) = &payloads {
                    if !payloads.get(i).is_some_and(|want| json_eq(payload, want)) {
                        c.fail(&format!(
                            "step {n}: {} got {:?} #{i} with data\n  {payload}\nwant\n  {}",
                            name(at),
                            x.action,
                            payloads
                                .get(i)
                                .map_or("(no more)".to_owned(), Value::to_string)
                        ));
                    }
                }
                if x.in_order && payload["seq"] != json!(i) {
                    c.fail(&format!(
                        "step {n}: {} got {:?} #{i} out of order: {payload}",
                        name(at),
                        x.action
                    ));
                }
                if let Some((role, pid, worker)) = sender {
                    let b = &m.body;
                    if b["from_role"] != role
                        || b["from_pid"] != json!(pid)
                        || b["from_worker_id"] != json!(worker)
                    {
                        c.fail(&format!(
                            "step {n}: {} got {:?} #{i} from the wrong sender: want {role} pid {pid} worker {worker}, got {m}",
                            name(at),
                            x.action
                        ));
                    }
                }
            }
            if let Some(payloads) = &payloads {
                if !messages.is_empty() && messages.len() != payloads.len() {
                    c.fail(&format!(
                        "step {n}: {} got {} {:?} messages, want the {} payloads",
                        name(at),
                        messages.len(),
                        x.action,
                        payloads.len()
                    ));
                }
            }
        }
    }

    /// `total` messages in all among `among`, none elsewhere.
    async fn expect_total(&mut self, c: &mut Cluster, x: &ExpectReceived, total: usize, n: usize) {
        let among: Vec<u32> = x.among.iter().map(|w| Self::who(c, w)).collect();
        let action = x.action.clone();
        let inside = among.clone();
        c.wait_until(
            &format!("step {n}: {total} {action:?} messages among {:?}", x.among),
            |h| {
                h.iter()
                    .filter(|e| inside.contains(&e.at) && e.is_message(&action))
                    .count()
                    >= total
            },
        )
        .await;
        let per: Vec<usize> = c
            .all()
            .iter()
            .map(|&at| {
                c.history()
                    .iter()
                    .filter(|e| e.at == at && e.is_message(&x.action))
                    .count()
            })
            .collect();
        let sum: usize = among.iter().map(|&at| per[at as usize]).sum();
        let outside: usize = per.iter().sum::<usize>() - sum;
        if sum != total || outside != 0 {
            c.fail(&format!(
                "step {n}: want {total} {:?} messages among {:?} and none elsewhere; per process (agent, app1, …): {per:?}",
                x.action, x.among
            ));
        }
    }
}
