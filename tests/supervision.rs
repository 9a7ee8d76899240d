//! End-to-end supervision (egg-model.md §4–§6, issue "Supervision"): restarts
//! in the same slot, the restart-intensity limit, failures while booting
//! after a restart, zero loss across an agent restart, start timeouts, the
//! ordered shutdown, and no orphans when the master is SIGKILLed.
//!
//! Every cluster here runs with restart delays of a few milliseconds and
//! small limits, so a whole crash loop takes well under a second. Waits
//! have deadlines (see `support`); "nothing else happened" is proven with a
//! causal barrier (`support::Cluster::barrier`), not a sleep. The only
//! deliberate wall-clock checks are where the property itself is about time
//! (children gone within 1 s of the master's death).
//!
//! A process is identified by its pid: a restarted slot keeps its worker id,
//! so events are told apart by the pid of the probe that reported them.

mod support;

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;
use support::{Cluster, Event, Options, Route, SendCmd, TickCmd, DEADLINE};

/// The agent's worker id in the harness.
const AGENT: u32 = 0;

/// A `[restart]` table with fast restarts, plus `extra` keys.
fn restart(extra: &str) -> String {
    format!("[restart]\nbackoff_initial_ms = 5\nbackoff_max_ms = 20\n{extra}\n")
}

/// The pids of an `egg-pids` event, sorted.
fn pids(e: &Event) -> Vec<u32> {
    let mut pids: Vec<u32> = e.body["pids"]
        .as_array()
        .unwrap_or_else(|| panic!("egg-pids without a list: {e}"))
        .iter()
        .map(|p| {
            p.as_u64()
                .and_then(|p| u32::try_from(p).ok())
                .expect("a pid")
        })
        .collect();
    pids.sort_unstable();
    pids
}

fn sorted(mut v: Vec<u32>) -> Vec<u32> {
    v.sort_unstable();
    v
}

/// The events the process `pid` reported, in its order.
fn events_by(c: &Cluster, pid: u32) -> Vec<Event> {
    c.history()
        .iter()
        .filter(|e| e.pid == pid)
        .cloned()
        .collect()
}

/// The master's stderr lines that contain every needle.
fn log_lines<'a>(stderr: &'a str, needles: &[&str]) -> Vec<&'a str> {
    stderr
        .lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .collect()
}

/// How many children failed on purpose (their last words, relayed into the
/// master's log).
fn failures_logged(stderr: &str) -> usize {
    log_lines(stderr, &["is failing on purpose"]).len()
}

/// Asserts that every process reported `egg-ready` exactly `n` times,
/// given as (pid, n) pairs.
fn assert_egg_ready(c: &mut Cluster, want: &[(u32, usize)]) {
    for &(pid, n) in want {
        let got = c.events_of_pid(pid, "egg-ready").len();
        if got != n {
            c.fail(&format!(
                "pid {pid} got egg-ready {got} times, expected {n}"
            ));
        }
    }
}

// ---- app workers ------------------------------------------------------------------

#[tokio::test]
async fn a_killed_app_worker_comes_back_in_its_slot_with_one_egg_ready() {
    let mut c =
        Cluster::start_ready(Options::new(2).actions(&["while-down"]).toml(&restart(""))).await;
    let agent = c.pid_of(AGENT).await;
    let app1 = c.pid_of(1).await;
    let old = c.probe_incarnation(2, 1).await;

    c.kill_pid(old.pid, Signal::SIGKILL);
    c.wait_closed(old.pid).await;
    // Sent while slot 2 is down or restarting (or before the master even
    // noticed): held for the slot, or re-delivered from the dead process's
    // unacknowledged messages. Either way the new incarnation gets it.
    c.send_ok(AGENT, SendCmd::new(Route::Apps, "while-down"))
        .await;

    let new = c.probe_incarnation(2, 2).await;
    assert_eq!(new.worker_id, 2);
    assert_eq!(new.role, "app");
    assert_ne!(new.pid, old.pid, "a restart is a new process");
    let hello = c.events_of_pid(new.pid, "hello")[0].body.clone();
    assert_eq!(
        hello["env_incarnation"], 2,
        "CLUTCH_INCARNATION of the new process: {hello}"
    );
    c.wait_for("egg-ready at the new incarnation", |e| {
        e.pid == new.pid && e.kind() == "egg-ready"
    })
    .await;

    // The marker leaves the new process after its `ready`: a duplicate
    // egg-ready the master queued for anyone because of that `ready` would
    // arrive before it.
    c.barrier(2).await;
    c.barrier(AGENT).await;
    assert_egg_ready(&mut c, &[(agent, 1), (app1, 1), (old.pid, 1), (new.pid, 1)]);
    let held = c.messages_of_pid(new.pid, "while-down").len();
    assert_eq!(held, 1, "the new incarnation gets the held message once");
    assert_eq!(c.messages_of_pid(app1, "while-down").len(), 1);

    // The agent saw the old pid go and then the new one come.
    let want_after = sorted(vec![app1, new.pid]);
    c.wait_until("egg-pids at the agent listing the new pid", |h| {
        h.iter()
            .any(|e| e.pid == agent && e.kind() == "egg-pids" && pids(e) == want_after)
    })
    .await;
    let views: Vec<Vec<u32>> = c
        .events_of_pid(agent, "egg-pids")
        .into_iter()
        .map(pids)
        .collect();
    let before = sorted(vec![app1, old.pid]);
    let had_both = views.iter().position(|v| *v == before);
    let gone = had_both.and_then(|i| {
        views[i..]
            .iter()
            .position(|v| *v == vec![app1])
            .map(|j| i + j)
    });
    let back = gone.and_then(|i| {
        views[i..]
            .iter()
            .position(|v| *v == want_after)
            .map(|j| i + j)
    });
    if had_both.is_none() || gone.is_none() || back.is_none() {
        c.fail(&format!(
            "the agent's egg-pids should go {before:?} -> [{app1}] -> {want_after:?}, got {views:?}"
        ));
    }

    // The dead incarnation's pid is not silently accepted.
    let report = c
        .send_err(1, SendCmd::new(Route::Pid(old.pid), "while-down"))
        .await;
    assert_eq!(report["code"], "NotFound", "{report}");
    let message = report["message"].as_str().unwrap_or("");
    assert!(
        message.contains("exited"),
        "a send to an exited pid should say so: {message}"
    );
}

/// A cluster whose app worker 2 fails at once in every incarnation from the
/// second on; its first incarnation is then killed to start the loop.
async fn crash_loop(on_limit: &str, max_restarts: u32) -> (Cluster, u32) {
    let mut c = Cluster::start_ready(
        Options::new(2)
            .env("PROBE_FAIL_WORKER", "2")
            .env("PROBE_FAIL_INCARNATIONS", "2-")
            .env("PROBE_FAIL_CODE", "7")
            .toml(&restart(&format!(
                "max_restarts = {max_restarts}\nwindow_ms = 60000\non_limit = \"{on_limit}\""
            ))),
    )
    .await;
    let victim = c.pid_of(2).await;
    c.kill_pid(victim, Signal::SIGKILL);
    (c, victim)
}

#[tokio::test]
async fn a_crash_loop_hits_the_limit_and_on_limit_stop_exits_3() {
    const MAX: u32 = 3;
    let (mut c, _) = crash_loop("stop", MAX).await;
    let status = c.master_exit().await;
    if status.code() != Some(3) {
        c.fail(&format!(
            "a slot past its restart limit with on_limit = \"stop\" should make the master exit 3, not {status}"
        ));
    }
    c.wait_children_gone().await;
    let stderr = c.master_stderr();
    // Not just the "restarting app worker 2" lines: the decision itself.
    let decision = log_lines(&stderr, &["app worker 2", "restart"])
        .into_iter()
        .filter(|l| !l.contains("restarting app worker 2"))
        .count();
    if decision == 0 {
        c.fail("the master should log its decision, naming app worker 2 and its restarts");
    }
    // "More than max_restarts restarts within the window" is the limit: the
    // master ran exactly MAX restarts (incarnations 2..=MAX+1), all failing.
    let failed = failures_logged(&stderr);
    if failed != MAX as usize {
        c.fail(&format!(
            "expected exactly {MAX} restarts of app worker 2 before the limit, saw {failed} failing incarnations"
        ));
    }
}

#[tokio::test]
async fn a_crash_loop_hits_the_limit_and_on_limit_keep_running_leaves_the_slot_failed() {
    const MAX: u32 = 3;
    let (mut c, _) = crash_loop("keep-running", MAX).await;
    let agent = c.pid_of(AGENT).await;
    let app1 = c.pid_of(1).await;

    // Until the limit is reached, a broadcast is held for the restarting
    // slot; afterwards it reports the failed slot. No event announces the
    // decision to the probes, so poll with a deadline.
    let until = Instant::now() + DEADLINE;
    let report = loop {
        let id = c.send(1, &SendCmd::new(Route::Broadcast, "poll")).await;
        let report = c.sent(1, id, 1).await.remove(0);
        if report["ok"] == false {
            break report;
        }
        if Instant::now() >= until {
            c.fail(&format!(
                "app worker 2 never became unavailable within {DEADLINE:?}: {report}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    if c.exit_status().is_some() {
        c.fail("with on_limit = \"keep-running\" the master must keep running");
    }
    let failures = report["failures"].as_array().cloned().unwrap_or_default();
    let unavailable_2 = |f: &Value| f["worker_id"] == 2 && f["code"] == "Unavailable";
    if failures.len() != 1 || !unavailable_2(&failures[0]) || report["delivered"] != 2 {
        c.fail(&format!(
            "a broadcast should reach the agent and app 1 and report app worker 2 as Unavailable: {report}"
        ));
    }

    // Everyone else keeps working.
    c.send_ok(AGENT, SendCmd::new(Route::Random, "poll").count(5))
        .await;
    c.send_ok(1, SendCmd::new(Route::Agent, "poll")).await;
    let marker = c.barrier_among(AGENT, &[AGENT, 1]).await;
    assert_eq!(marker["code"], "Unavailable", "{marker}");
    let mut live = c.live_children();
    live.sort_unstable();
    assert_eq!(
        live,
        sorted(vec![agent, app1]),
        "the failed slot stays empty"
    );

    let stderr = c.master_stderr();
    let decision = log_lines(&stderr, &["app worker 2", "restart"])
        .into_iter()
        .filter(|l| !l.contains("restarting app worker 2"))
        .count();
    if decision == 0 {
        c.fail("the master should log its decision, naming app worker 2");
    }
    let failed = failures_logged(&stderr);
    if failed != MAX as usize {
        c.fail(&format!(
            "expected exactly {MAX} restarts of app worker 2 and none after the limit, saw {failed} failing incarnations"
        ));
    }
}

#[tokio::test]
async fn messages_held_for_a_slot_that_then_fails_are_reported_to_their_senders() {
    // Slot 2 is down for 300 ms after the kill, then its second incarnation
    // fails at once and the slot passes its limit (2 restarts > 1).
    let mut c = Cluster::start_ready(
        Options::new(2)
            .env("PROBE_FAIL_WORKER", "2")
            .env("PROBE_FAIL_INCARNATIONS", "2-")
            .env("PROBE_FAIL_CODE", "7")
            .toml(
                "[restart]\nbackoff_initial_ms = 300\nbackoff_max_ms = 300\n\
                 max_restarts = 1\nwindow_ms = 60000\non_limit = \"keep-running\"",
            ),
    )
    .await;
    let victim = c.pid_of(2).await;
    c.kill_pid(victim, Signal::SIGKILL);
    c.wait_closed(victim).await;
    // For app 2 this is held (or, if the master has not noticed the death
    // yet, written to the dead stream and never acknowledged): it can only
    // reach app 2's next incarnation, which never comes.
    let id = c.send(1, &SendCmd::new(Route::Apps, "held")).await;
    let receipt = c.sent(1, id, 1).await.remove(0);
    assert_eq!(receipt["ok"], true, "{receipt}");

    // Wait for the decision (as in the keep-running test).
    let until = Instant::now() + DEADLINE;
    loop {
        let poll = c.send(1, &SendCmd::new(Route::Broadcast, "poll")).await;
        let report = c.sent(1, poll, 1).await.remove(0);
        if report["ok"] == false {
            break;
        }
        if Instant::now() >= until {
            c.fail(&format!(
                "app worker 2 never became unavailable within {DEADLINE:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The master marked the slot failed before it routed the last poll, and
    // a report about the held message would be queued for app 1 then, ahead
    // of the poll's result: if it is not here now, it was never sent.
    let late = c
        .events_of(1, "undelivered")
        .into_iter()
        .find(|e| e.body["action"] == "held")
        .map(|e| e.body.clone());
    let Some(late) = late else {
        c.fail(&format!(
            "send #{id} (\"held\", receipt {receipt}) was held for app worker 2, which was then \
             marked failed: its sender was never told that it will not be delivered \
             (README: nothing is silently lost)"
        ));
    };
    assert!(
        late["failures"]
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f["worker_id"] == 2)),
        "the report should name app worker 2: {late}"
    );
}

/// Slot 1 fails in its second incarnation only (at `stage`); the third
/// must come up. Egg's #4538: there, such a slot is lost for good.
async fn fails_while_booting_after_a_restart(stage: &str) {
    let mut c = Cluster::start_ready(
        Options::new(2)
            .env("PROBE_FAIL_WORKER", "1")
            .env("PROBE_FAIL_INCARNATIONS", "2")
            .env("PROBE_FAIL_STAGE", stage)
            .env("PROBE_FAIL_CODE", "9")
            .toml(&restart("")),
    )
    .await;
    let agent = c.pid_of(AGENT).await;
    let app2 = c.pid_of(2).await;
    let first = c.probe_incarnation(1, 1).await;
    c.kill_pid(first.pid, Signal::SIGKILL);

    let third = c.probe_incarnation(1, 3).await;
    c.wait_for("egg-ready at incarnation 3 of app worker 1", |e| {
        e.pid == third.pid && e.kind() == "egg-ready"
    })
    .await;
    c.barrier(1).await;
    c.barrier(AGENT).await;
    assert_egg_ready(
        &mut c,
        &[(agent, 1), (app2, 1), (first.pid, 1), (third.pid, 1)],
    );
    let stderr = c.master_stderr();
    let failed = log_lines(&stderr, &["worker 1 incarnation 2 is failing on purpose"]);
    if failed.len() != 1 {
        c.fail("incarnation 2 of app worker 1 should have failed once");
    }
    if stage == "registered" {
        // It registered, so it said hello, but it never became ready.
        let second = c.probe_incarnation(1, 2).await;
        c.wait_closed(second.pid).await;
        assert_egg_ready(&mut c, &[(second.pid, 0)]);
    }
}

#[tokio::test]
async fn a_worker_failing_at_start_after_a_restart_is_restarted_again() {
    fails_while_booting_after_a_restart("start").await;
}

#[tokio::test]
async fn a_worker_failing_after_registering_after_a_restart_is_restarted_again() {
    fails_while_booting_after_a_restart("registered").await;
}

// ---- the agent ---------------------------------------------------------------------

/// The numbers `from` sent on `tick` as `pid` received them, in order.
fn tick_seqs(c: &Cluster, pid: u32, from: u32) -> Vec<u64> {
    c.messages_of_pid(pid, "tick")
        .into_iter()
        .filter(|e| e.body["from_worker_id"] == from)
        .map(|e| e.seq().expect("a tick has a seq"))
        .collect()
}

#[tokio::test]
async fn a_killed_agent_loses_none_of_the_ticks_sent_while_it_was_down() {
    // A restart delay long enough that a few dozen ticks are sent while no
    // agent exists at all.
    let mut c = Cluster::start_ready(
        Options::new(2)
            .actions(&["tick"])
            .sync_reports()
            .toml(&restart("agent_backoff_initial_ms = 100")),
    )
    .await;
    let old = c.probe_incarnation(AGENT, 1).await;
    let apps = [c.pid_of(1).await, c.pid_of(2).await];

    let mut series = Vec::new();
    for w in [1, 2] {
        series.push(
            c.tick(w, &TickCmd::new(Route::Agent, "tick").every_ms(5))
                .await,
        );
    }
    c.wait_until("20 ticks from each app at the old agent", |h| {
        [1, 2].iter().all(|&w| {
            h.iter()
                .filter(|e| e.pid == old.pid && e.is_message("tick"))
                .filter(|e| e.body["from_worker_id"] == w)
                .count()
                >= 20
        })
    })
    .await;

    c.kill_pid(old.pid, Signal::SIGKILL);
    // Its control connection closed: every tick it handled is reported
    // (the probe reports synchronously, before the SDK acknowledges).
    c.wait_closed(old.pid).await;
    let last_old: Vec<u64> = [1, 2]
        .iter()
        .map(|&w| {
            *tick_seqs(&c, old.pid, w)
                .last()
                .expect("old agent had ticks")
        })
        .collect();

    let new = c.probe_incarnation(AGENT, 2).await;
    // 60 ticks (~300 ms) past the old agent's last: the ones sent while no
    // agent existed (the 100 ms restart delay and the new agent's start),
    // and live ones after it registered.
    c.wait_until("60 more ticks from each app at the new agent", |h| {
        [1, 2].iter().zip(&last_old).all(|(&w, &last)| {
            h.iter().any(|e| {
                e.pid == new.pid
                    && e.is_message("tick")
                    && e.body["from_worker_id"] == w
                    && e.seq().is_some_and(|s| s >= last + 60)
            })
        })
    })
    .await;
    let mut sent = Vec::new();
    for (w, id) in [1, 2].into_iter().zip(&series) {
        let report = c.tick_stop(w, *id).await;
        sent.push(report["count"].as_u64().expect("ticked has a count"));
    }
    // Each app's marker follows its last tick on its stream: once every
    // process has it, every tick has arrived. The agent's marker flushes
    // anything the master queued because of the new agent's `ready`.
    c.barrier(1).await;
    c.barrier(2).await;
    c.barrier(AGENT).await;

    let mut summary = Vec::new();
    let (mut by_old, mut by_new, mut duplicates, mut lost) = (0, 0, 0, 0);
    for (i, w) in [1u32, 2].into_iter().enumerate() {
        let old_seqs = tick_seqs(&c, old.pid, w);
        let new_seqs = tick_seqs(&c, new.pid, w);
        let n = sent[i];
        // Before the kill nothing may be missing or out of order.
        if old_seqs != (0..old_seqs.len() as u64).collect::<Vec<_>>() {
            c.fail(&format!(
                "the old agent got app {w}'s ticks with gaps or out of order: {old_seqs:?}"
            ));
        }
        let after = last_old[i] + 1;
        let missing: Vec<u64> = (after..n).filter(|s| !new_seqs.contains(s)).collect();
        // Acknowledged delivery is at-least-once across incarnations: the
        // SDK acknowledges cumulatively after its handler returns, so the
        // old agent may have handled (and reported) ticks it had not yet
        // acknowledged when it was killed. The master re-delivers every
        // unacknowledged message to the new agent, so those few arrive
        // twice (once per incarnation). Within one incarnation delivery is
        // at most once, so the new agent's sequence must still be gap-free
        // and strictly increasing, ending at the last tick sent.
        let first = new_seqs.first().copied().unwrap_or(n);
        let dup = after.saturating_sub(first);
        if !missing.is_empty() || first > after || new_seqs != (first..n).collect::<Vec<_>>() {
            c.fail(&format!(
                "app {w} sent ticks 0..{n}; the old agent's last was {}; the new agent got {new_seqs:?}; missing {missing:?}",
                last_old[i]
            ));
        }
        summary.push(format!(
            "app {w}: sent {n}, old agent {} (last {}), new agent {} (first {first})",
            old_seqs.len(),
            last_old[i],
            new_seqs.len()
        ));
        by_old += old_seqs.len();
        by_new += new_seqs.len();
        duplicates += dup;
        lost += missing.len();
    }
    println!(
        "agent kill -9 under 2 x 200 ticks/s: ticks sent {}, received by old agent {by_old}, by new agent {by_new}, duplicates {duplicates}, lost={lost} ({})",
        sent.iter().sum::<u64>(),
        summary.join("; ")
    );

    // The fire-and-forget ticks were never refused.
    for w in [1, 2] {
        let undelivered = c.events_of(w, "undelivered").len();
        assert_eq!(undelivered, 0, "app {w} had ticks reported undelivered");
    }

    // The apps saw the agent go ([]), then come back (agent-start and
    // [new pid]), in their own event order.
    for (w, pid) in [1, 2].into_iter().zip(apps) {
        let events = events_by(&c, pid);
        let down = events
            .iter()
            .position(|e| e.kind() == "egg-pids" && pids(e).is_empty());
        let Some(down) = down else {
            c.fail(&format!(
                "app {w} never got egg-pids [] while the agent was down"
            ));
        };
        let rest = &events[down..];
        let started = rest.iter().any(|e| e.kind() == "agent-start");
        let listed = rest
            .iter()
            .any(|e| e.kind() == "egg-pids" && pids(e) == vec![new.pid]);
        if !started || !listed {
            c.fail(&format!(
                "after egg-pids [], app {w} should get agent-start ({started}) and egg-pids [{}] ({listed})",
                new.pid
            ));
        }
    }
    assert_egg_ready(
        &mut c,
        &[(old.pid, 1), (new.pid, 1), (apps[0], 1), (apps[1], 1)],
    );
}

// ---- start timeouts -----------------------------------------------------------------

/// Starts a cluster in which `worker` never calls `ready()`; the master must
/// give up after `key` ms and exit 1, naming the child.
async fn start_timeout_at_startup(worker: u32, key: &str, name: &str) {
    let mut c = Cluster::start(
        Options::new(2)
            .env("PROBE_HANG_WORKER", &worker.to_string())
            .toml(&format!("[timeouts]\n{key} = 500")),
    )
    .await;
    let hung = c.probe(worker).await;
    let status = c.master_exit().await;
    if status.code() != Some(1) {
        c.fail(&format!(
            "a start timeout during startup should make the master exit 1, not {status}"
        ));
    }
    c.wait_children_gone().await;
    let needle = format!(
        "{name} (pid {}) did not become ready within 500 ms",
        hung.pid
    );
    if !c.master_stderr().contains(&needle) {
        c.fail(&format!("the master's stderr should contain {needle:?}"));
    }
}

#[tokio::test]
async fn an_app_start_timeout_at_startup_stops_the_master_and_names_it() {
    start_timeout_at_startup(1, "app_start_ms", "app worker 1").await;
}

#[tokio::test]
async fn the_agent_start_timeout_at_startup_stops_the_master_and_names_it() {
    start_timeout_at_startup(AGENT, "agent_start_ms", "agent").await;
}

#[tokio::test]
async fn a_restarted_worker_that_never_becomes_ready_is_killed_and_restarted() {
    let mut c = Cluster::start_ready(
        Options::new(2)
            .env("PROBE_HANG_WORKER", "2")
            .env("PROBE_HANG_INCARNATIONS", "2")
            .toml(&restart(""))
            .toml("[timeouts]\napp_start_ms = 500"),
    )
    .await;
    let agent = c.pid_of(AGENT).await;
    let app1 = c.pid_of(1).await;
    let first = c.probe_incarnation(2, 1).await;
    c.kill_pid(first.pid, Signal::SIGKILL);

    let hung = c.probe_incarnation(2, 2).await;
    c.wait_for("the hanging incarnation", |e| {
        e.pid == hung.pid && e.kind() == "hanging"
    })
    .await;
    let since = Instant::now();
    c.wait_closed(hung.pid).await;
    let waited = since.elapsed();
    let needles = [
        "app worker 2".to_owned(),
        hung.pid.to_string(),
        "did not become ready within 500 ms".to_owned(),
    ];
    let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
    c.wait_master_log("the start timeout of app worker 2", |log| {
        !log_lines(log, &needles).is_empty()
    })
    .await;
    if c.live_children().contains(&hung.pid) {
        c.fail(&format!(
            "the hung incarnation (pid {}) is still running",
            hung.pid
        ));
    }

    let third = c.probe_incarnation(2, 3).await;
    c.wait_for("egg-ready at incarnation 3 of app worker 2", |e| {
        e.pid == third.pid && e.kind() == "egg-ready"
    })
    .await;
    c.barrier(2).await;
    c.barrier(AGENT).await;
    assert_egg_ready(
        &mut c,
        &[
            (agent, 1),
            (app1, 1),
            (first.pid, 1),
            (hung.pid, 0),
            (third.pid, 1),
        ],
    );
    println!("the hung incarnation was killed {waited:?} after it said hello");
}

// ---- shutdown ------------------------------------------------------------------------

/// The index and timestamp of the master's log line that reports the exit
/// of the child in `span` (e.g. `app{worker=1 pid=42}`).
fn exit_line(stderr: &str, span: &str) -> Option<(usize, String, String)> {
    stderr.lines().enumerate().find_map(|(i, l)| {
        (l.contains(span) && l.contains("exited with")).then(|| {
            let stamp = l.split_whitespace().next().unwrap_or("").to_owned();
            (i, stamp, l.to_owned())
        })
    })
}

#[tokio::test]
async fn sigterm_stops_the_apps_then_the_agent_then_the_master() {
    // The apps take a while to finish in their shutdown hooks while the
    // agent has nothing to do: if the master stopped them all at once, the
    // agent would be gone first.
    let mut c =
        Cluster::start_ready(Options::new(2).env("PROBE_SHUTDOWN_DELAY_MS", "1=300,2=300")).await;
    let agent = c.pid_of(AGENT).await;
    let apps = [c.pid_of(1).await, c.pid_of(2).await];
    c.signal_master(Signal::SIGTERM);
    let status = c.master_exit().await;
    if status.code() != Some(0) {
        c.fail(&format!(
            "the master should exit 0 on SIGTERM, not {status}"
        ));
    }
    c.wait_children_gone().await;

    for (pid, who) in [(apps[0], "app 1"), (apps[1], "app 2"), (agent, "the agent")] {
        let notice = c
            .wait_for(&format!("the shutdown notice at {who}"), |e| {
                e.pid == pid && e.kind() == "shutdown-notice"
            })
            .await;
        assert!(
            notice.body["grace_ms"].as_u64().is_some_and(|g| g > 0),
            "the notice announces the grace period: {notice}"
        );
    }

    let stderr = c.master_stderr();
    let mut app_exits = Vec::new();
    for (w, pid) in [1, 2].into_iter().zip(apps) {
        let span = format!("app{{worker={w} pid={pid}}}");
        let Some(exit) = exit_line(&stderr, &span) else {
            c.fail(&format!("no exit line for {span} in the master's log"));
        };
        app_exits.push(exit);
    }
    let span = format!("agent{{pid={agent}}}");
    let Some(agent_exit) = exit_line(&stderr, &span) else {
        c.fail(&format!("no exit line for {span} in the master's log"));
    };
    let Some((stopped, stopped_line)) = stderr
        .lines()
        .enumerate()
        .find(|(_, l)| l.contains("cluster stopped"))
    else {
        c.fail("the master should log \"cluster stopped\"");
    };
    let stopped_stamp = stopped_line
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_owned();
    for (i, stamp, line) in &app_exits {
        if !line.contains("exit code 0") {
            c.fail(&format!("an app should exit 0 after its hook: {line}"));
        }
        if *i >= agent_exit.0 || *stamp > agent_exit.1 {
            c.fail(&format!(
                "an app must exit before the agent:\n  {line}\n  {}",
                agent_exit.2
            ));
        }
    }
    if !agent_exit.2.contains("exit code 0") {
        c.fail(&format!("the agent should exit 0: {}", agent_exit.2));
    }
    if agent_exit.0 >= stopped || agent_exit.1 > stopped_stamp {
        c.fail(&format!(
            "the agent must exit before the master stops:\n  {}\n  {stopped_line}",
            agent_exit.2
        ));
    }
}

#[tokio::test]
async fn a_shutdown_hook_that_overruns_gets_sigterm_after_shutdown_ms() {
    let mut c = Cluster::start_ready(
        Options::new(2)
            .env("PROBE_SHUTDOWN_DELAY_MS", "1=60000,2=60000")
            .toml("[timeouts]\nshutdown_ms = 300"),
    )
    .await;
    let apps = [c.pid_of(1).await, c.pid_of(2).await];
    let since = Instant::now();
    c.signal_master(Signal::SIGTERM);
    let status = c.master_exit().await;
    let took = since.elapsed();
    if status.code() != Some(0) {
        c.fail(&format!(
            "the master should exit 0 on SIGTERM, not {status}"
        ));
    }
    c.wait_children_gone().await;
    // The hooks would take a minute: only SIGTERM after the grace ended them.
    if took >= Duration::from_secs(10) {
        c.fail(&format!("stopping took {took:?} with shutdown_ms = 300"));
    }
    let stderr = c.master_stderr();
    for (w, pid) in [1, 2].into_iter().zip(apps) {
        let span = format!("app{{worker={w} pid={pid}}}");
        match exit_line(&stderr, &span) {
            Some((_, _, line)) if !line.contains("exit code 0") => {}
            other => c.fail(&format!(
                "app {w} should have been ended by a signal, not by its hook: {other:?}"
            )),
        }
    }
    println!("stop with overrunning hooks took {took:?}");
}

#[tokio::test]
async fn a_second_signal_kills_everything_at_once() {
    let mut c = Cluster::start_ready(
        Options::new(2)
            .env("PROBE_SHUTDOWN_DELAY_MS", "60000")
            .toml("[timeouts]\nshutdown_ms = 20000"),
    )
    .await;
    let apps = [c.pid_of(1).await, c.pid_of(2).await];
    c.signal_master(Signal::SIGTERM);
    for pid in apps {
        c.wait_for("the shutdown notice at an app", |e| {
            e.pid == pid && e.kind() == "shutdown-notice"
        })
        .await;
    }
    let since = Instant::now();
    c.signal_master(Signal::SIGINT);
    let status = c.master_exit().await;
    c.wait_children_gone().await;
    let took = since.elapsed();
    // The hooks take a minute and the grace is 20 s: only an immediate kill
    // is this quick.
    if took >= Duration::from_secs(5) {
        c.fail(&format!("a second signal took {took:?} to stop everything"));
    }
    println!("second signal: master {status}, everything gone after {took:?}");
}

// ---- the master's death ---------------------------------------------------------------

/// SIGKILLs the master and checks /proc until no child of the cluster is
/// left; the property is about time, so the wait is measured.
async fn children_die_with_the_master(opts: Options) {
    let mut c = Cluster::start_ready(opts).await;
    let children = c.live_children();
    assert_eq!(children.len(), 3, "an agent and two apps: {children:?}");
    // Each child leads its own process group (so that signalling the group
    // reaches its descendants and nothing else).
    for pid in &children {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // pid (comm) state ppid pgrp ...: comm may contain spaces, so split
        // after its closing parenthesis.
        let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
        let pgrp: Option<u32> = after.split_whitespace().nth(2).and_then(|p| p.parse().ok());
        if pgrp != Some(*pid) {
            c.fail(&format!(
                "child {pid} should lead its own process group, its pgrp is {pgrp:?}"
            ));
        }
    }
    let since = Instant::now();
    c.signal_master(Signal::SIGKILL);
    let limit = Duration::from_secs(1);
    loop {
        let live = c.live_children();
        if live.is_empty() {
            break;
        }
        if since.elapsed() >= limit {
            c.fail(&format!(
                "{live:?} still running {limit:?} after the master was SIGKILLed"
            ));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    println!(
        "every child gone {:?} after SIGKILL of the master",
        since.elapsed()
    );
}

#[tokio::test]
async fn sigkill_of_the_master_leaves_no_child_behind() {
    children_die_with_the_master(Options::new(2)).await;
}

#[tokio::test]
async fn sigkill_of_the_master_also_ends_children_that_ignore_the_broken_stream() {
    // These probes do not exit when their stream breaks (a stuck child, or
    // one not using an SDK): only the parent-death signal ends them.
    children_die_with_the_master(Options::new(2).env("PROBE_STAY_ON_DISCONNECT", "1")).await;
}
