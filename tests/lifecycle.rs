//! End-to-end lifecycle: the readiness barrier (`egg-ready`), `egg-pids`,
//! messages sent before the cluster is up, startup failures and shutdown
//! (egg-model.md §2, §5, §6).
//!
//! Tests that depend on timing start the probes with `manual_ready`, so the
//! test decides when each process declares itself ready. "Nothing happened"
//! is proven with a causal barrier rather than a sleep: see
//! `support::Cluster::barrier`.

mod support;

use nix::sys::signal::Signal;
use support::{Cluster, Options, Route, SendCmd};

/// The agent's worker id in the harness.
const AGENT: u32 = 0;

#[tokio::test]
async fn egg_ready_comes_once_per_process_and_only_when_all_are_ready() {
    let mut c = Cluster::start(Options::new(2).manual_ready()).await;

    // The apps are launched only once the agent is ready.
    c.ready(AGENT).await;
    c.probe(1).await;
    c.probe(2).await;
    c.ready(1).await;

    // App 1's marker is routed after the master handled app 1's `ready`, and
    // the agent was ready before the apps existed: had either `ready` wrongly
    // completed the barrier, an egg-ready would be queued ahead of the
    // marker at every process.
    c.barrier(1).await;
    for w in c.all() {
        let early = c.events_of(w, "egg-ready");
        assert!(
            early.is_empty(),
            "worker {w} got egg-ready while app 2 was not ready: {early:?}"
        );
    }

    c.ready(2).await;
    c.wait_all_egg_ready().await;
    // A marker from the last process to become ready: a duplicate egg-ready
    // queued when the barrier completed would arrive before it.
    c.barrier(2).await;
    for w in c.all() {
        let n = c.events_of(w, "egg-ready").len();
        assert_eq!(n, 1, "worker {w} got egg-ready {n} times");
    }
}

/// Every child is told the master's polling window (`[latency]
/// idle_spin_us`) in `CLUTCH_IDLE_SPIN_US`, and a role's own `env` can
/// override it.
#[tokio::test]
async fn children_get_the_polling_window_and_a_role_env_overrides_it() {
    let configured = Options::new(1).toml("[latency]\nidle_spin_us = 300");
    let overridden = Options::new(1)
        .toml("[latency]\nidle_spin_us = 300")
        .env("CLUTCH_IDLE_SPIN_US", "0");
    for (opts, expected) in [(configured, "300"), (overridden, "0")] {
        let mut c = Cluster::start_ready(opts).await;
        for worker in [0, 1] {
            let probe = c.probe_incarnation(worker, 1).await;
            let hello = c.events_of_pid(probe.pid, "hello")[0].body.clone();
            assert_eq!(
                hello["env_idle_spin_us"], expected,
                "worker {worker}'s CLUTCH_IDLE_SPIN_US: {hello}"
            );
        }
    }
}

#[tokio::test]
async fn egg_pids_tells_the_agent_the_app_pids_and_the_apps_the_agent_pid() {
    let mut c = Cluster::start_ready(Options::new(2)).await;
    let agent = c.pid_of(AGENT).await;
    let mut apps = [c.pid_of(1).await, c.pid_of(2).await];
    apps.sort_unstable();

    // Each probe's events keep their order in the history, so "before
    // egg-ready" is the order in which the probe saw them.
    let pids_before_ready = |c: &Cluster, w: u32| -> Vec<Vec<u64>> {
        c.history()
            .iter()
            .filter(|e| e.worker_id == w)
            .take_while(|e| e.kind() != "egg-ready")
            .filter(|e| e.kind() == "egg-pids")
            .map(|e| {
                let mut pids: Vec<u64> = e.body["pids"]
                    .as_array()
                    .unwrap_or_else(|| panic!("egg-pids without a list: {e}"))
                    .iter()
                    .map(|p| p.as_u64().expect("a pid is a number"))
                    .collect();
                pids.sort_unstable();
                pids
            })
            .collect()
    };

    let agent_view = pids_before_ready(&c, AGENT);
    let want: Vec<u64> = apps.iter().map(|&p| u64::from(p)).collect();
    assert_eq!(
        agent_view.last(),
        Some(&want),
        "the agent's last egg-pids before egg-ready should list both apps: {agent_view:?}"
    );
    for w in [1, 2] {
        let app_view = pids_before_ready(&c, w);
        assert!(
            !app_view.is_empty(),
            "app {w} got no egg-pids before egg-ready"
        );
        for pids in &app_view {
            assert_eq!(
                pids,
                &vec![u64::from(agent)],
                "app {w}'s egg-pids should be [agent pid]: {app_view:?}"
            );
        }
    }
}

#[tokio::test]
async fn messages_to_apps_that_are_not_up_yet_are_held_and_delivered_in_order() {
    const N: u64 = 100;
    // The app probes wait for this file before they register, so the test
    // decides when the slots stop being empty.
    let gate_dir = tempfile::tempdir().expect("a temp dir for the gate");
    let gate = gate_dir.path().join("apps-may-register");
    let gate_text = gate.display().to_string();
    let mut c = Cluster::start(
        Options::new(2)
            .actions(&["early"])
            .manual_ready()
            .env("PROBE_APP_GATE", &gate_text),
    )
    .await;

    // The agent becomes ready and sends to the apps while no app has
    // registered: every send must be held for both.
    c.ready(AGENT).await;
    let reports = c
        .send_ok(AGENT, SendCmd::new(Route::Apps, "early").count(N).seq())
        .await;
    for r in &reports {
        assert_eq!(
            (
                r["delivered"].as_u64().unwrap_or(0),
                r["held"].as_u64().unwrap_or(0)
            ),
            (0, 2),
            "no app has registered yet, so each send is held for both: {r}"
        );
    }
    std::fs::write(&gate, b"go").expect("open the gate");

    c.ready(1).await;
    c.ready(2).await;
    for w in [1, 2] {
        c.wait_until(&format!("{N} early messages at app {w}"), |h| {
            h.iter()
                .filter(|e| e.worker_id == w && e.is_message("early"))
                .count()
                >= N as usize
        })
        .await;
    }
    c.wait_all_egg_ready().await;
    c.barrier(AGENT).await;
    for w in [1, 2] {
        let seqs: Vec<u64> = c
            .messages(w, "early")
            .iter()
            .map(|e| e.seq().expect("early message has a seq"))
            .collect();
        assert_eq!(
            seqs,
            (0..N).collect::<Vec<_>>(),
            "app {w} must get every held message once, in order"
        );
    }
    assert!(c.messages(AGENT, "early").is_empty());
}

/// Starts a cluster in which the child in slot `worker` exits with `code`
/// before registering; returns the master's stderr once it has exited.
async fn startup_failure(worker: u32, code: i32) -> (Cluster, String) {
    let mut c = Cluster::start(
        Options::new(2)
            .env("PROBE_FAIL_WORKER", &worker.to_string())
            .env("PROBE_FAIL_CODE", &code.to_string()),
    )
    .await;
    let status = c.master_exit().await;
    if status.success() {
        c.fail(&format!(
            "the master exited with {status} although a child failed during startup"
        ));
    }
    // The master must not leave the other children running.
    c.wait_children_gone().await;
    let stderr = c.master_stderr();
    (c, stderr)
}

#[tokio::test]
async fn an_app_failing_at_startup_stops_the_master_and_is_named() {
    let (mut c, stderr) = startup_failure(2, 3).await;
    for needle in [
        // Names the slot and the pid...
        "app worker 2 (pid",
        // ...and how it ended.
        "exit code 3",
        // The child's own last words, relayed by the master.
        "probe: failing on purpose with code 3",
    ] {
        if !stderr.contains(needle) {
            c.fail(&format!("the master's stderr should contain {needle:?}"));
        }
    }
}

#[tokio::test]
async fn the_agent_failing_at_startup_stops_the_master_and_is_named() {
    let (mut c, stderr) = startup_failure(AGENT, 4).await;
    for needle in [
        // "agent" alone would also match the launch line; the report names
        // the child with its pid.
        "agent (pid",
        "exit code 4",
        "probe: failing on purpose with code 4",
    ] {
        if !stderr.contains(needle) {
            c.fail(&format!("the master's stderr should contain {needle:?}"));
        }
    }
}

#[tokio::test]
async fn sigterm_stops_the_master_cleanly_with_no_child_left() {
    let mut c = Cluster::start_ready(Options::new(2)).await;
    let children = c.live_children();
    assert_eq!(
        children.len(),
        3,
        "an agent and two apps should be running: {children:?}"
    );
    c.signal_master(Signal::SIGTERM);
    let status = c.master_exit().await;
    if status.code() != Some(0) {
        c.fail(&format!(
            "the master should exit 0 on SIGTERM, not {status}"
        ));
    }
    c.wait_children_gone().await;
}
