//! End-to-end routing: every row of Egg's messenger table (egg-model.md §3)
//! against a real master, with exact receipt counts.
//!
//! Each test starts its own cluster (an agent and two app workers, all
//! `clutch-probe`), waits for `egg-ready`, makes one probe send, and then
//! counts what every process received. Counts are taken after a causal
//! barrier (see `support::Cluster::barrier`): the sender broadcasts a marker
//! after its sends, and since delivery is ordered per (sender, receiver)
//! pair, once every process has the marker it also has every message the
//! sender sent before it — so "exactly N" really means no extra copy is
//! still on its way, without sleeping.

mod support;

use clutch::{Code, ConnectError, ConnectOptions, Role};
use serde_json::{json, Value};
use support::{Cluster, Options, Route, SendCmd};

/// The agent's worker id in the harness.
const AGENT: u32 = 0;

/// A pid no process can have: above Linux's hard `pid_max` limit (2^22).
const UNKNOWN_PID: u32 = 4_000_000_000;

async fn cluster(actions: &[&str]) -> Cluster {
    Cluster::start_ready(Options::new(2).actions(actions)).await
}

/// Asserts a confirmed send's report: handed to `delivered` processes, held
/// for none (every process is registered after egg-ready).
fn assert_delivered(reports: &[Value], delivered: u64) {
    for r in reports {
        assert_eq!(r["ok"], true, "send failed: {r}");
        assert_eq!(r["delivered"], delivered, "wrong delivered count: {r}");
        assert_eq!(r["held"], 0, "nothing should be held after egg-ready: {r}");
    }
}

// ---- broadcast ------------------------------------------------------------------

#[tokio::test]
async fn broadcast_from_the_agent_reaches_the_agent_and_every_app() {
    let mut c = cluster(&["news"]).await;
    let reports = c
        .send_ok(
            AGENT,
            SendCmd::new(Route::Broadcast, "news").data(json!("hi")),
        )
        .await;
    assert_delivered(&reports, 3);
    c.barrier(AGENT).await;
    // Egg: broadcast reaches every app and the agent, the sender included.
    assert_eq!(c.receipts("news"), vec![1, 1, 1]);
}

#[tokio::test]
async fn broadcast_from_an_app_includes_the_sender() {
    let mut c = cluster(&["news"]).await;
    let reports = c
        .send_ok(1, SendCmd::new(Route::Broadcast, "news").data(json!("hi")))
        .await;
    assert_delivered(&reports, 3);
    c.barrier(1).await;
    assert_eq!(c.receipts("news"), vec![1, 1, 1]);
}

// ---- sendToApp --------------------------------------------------------------------

#[tokio::test]
async fn send_to_app_from_the_agent_reaches_only_the_apps() {
    let mut c = cluster(&["config"]).await;
    let reports = c.send_ok(AGENT, SendCmd::new(Route::Apps, "config")).await;
    assert_delivered(&reports, 2);
    // The barrier comes from the agent, so a copy wrongly routed to the
    // agent itself would have arrived before it.
    c.barrier(AGENT).await;
    assert_eq!(c.receipts("config"), vec![0, 1, 1]);
}

#[tokio::test]
async fn send_to_app_from_an_app_includes_the_sender() {
    let mut c = cluster(&["config"]).await;
    let reports = c.send_ok(1, SendCmd::new(Route::Apps, "config")).await;
    assert_delivered(&reports, 2);
    c.barrier(1).await;
    assert_eq!(c.receipts("config"), vec![0, 1, 1]);
}

// ---- sendToAgent ------------------------------------------------------------------

#[tokio::test]
async fn send_to_agent_from_an_app_reaches_the_agent() {
    let mut c = cluster(&["report"]).await;
    let reports = c.send_ok(2, SendCmd::new(Route::Agent, "report")).await;
    assert_delivered(&reports, 1);
    c.barrier(2).await;
    assert_eq!(c.receipts("report"), vec![1, 0, 0]);
}

#[tokio::test]
async fn send_to_agent_from_the_agent_reaches_itself() {
    let mut c = cluster(&["report"]).await;
    let reports = c.send_ok(AGENT, SendCmd::new(Route::Agent, "report")).await;
    assert_delivered(&reports, 1);
    c.barrier(AGENT).await;
    assert_eq!(c.receipts("report"), vec![1, 0, 0]);
}

// ---- sendRandom -------------------------------------------------------------------

#[tokio::test]
async fn send_random_from_the_agent_reaches_exactly_one_app_each_time() {
    let mut c = cluster(&["job"]).await;
    const SENDS: u64 = 200;
    let reports = c
        .send_ok(AGENT, SendCmd::new(Route::Random, "job").count(SENDS).seq())
        .await;
    assert_eq!(reports.len(), 200);
    assert_delivered(&reports, 1);
    c.barrier(AGENT).await;
    let r = c.receipts("job");
    assert_eq!(
        r[0], 0,
        "sendRandom from the agent must not reach the agent"
    );
    assert_eq!(r[1] + r[2], 200, "every job reaches exactly one app: {r:?}");
    // The master picks uniformly among the ready apps, so one app missing
    // out on all 200 jobs has probability 2 * 2^-200: a failure here means
    // the pick is not random (or ignores an app), not bad luck.
    assert!(r[1] > 0 && r[2] > 0, "both apps should get jobs: {r:?}");
    // Each sequence number went to exactly one app.
    let mut seqs: Vec<u64> = [1, 2]
        .iter()
        .flat_map(|&w| c.messages(w, "job"))
        .map(|e| e.seq().expect("job has a seq"))
        .collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (0..SENDS).collect::<Vec<_>>());
}

#[tokio::test]
async fn send_random_from_an_app_goes_to_the_agent() {
    let mut c = cluster(&["job"]).await;
    let reports = c
        .send_ok(1, SendCmd::new(Route::Random, "job").count(5))
        .await;
    assert_delivered(&reports, 1);
    c.barrier(1).await;
    assert_eq!(c.receipts("job"), vec![5, 0, 0]);
}

#[tokio::test]
async fn send_random_with_no_ready_app_is_unavailable() {
    // Manual readiness: only the agent becomes ready, the apps register but
    // never declare themselves ready, so there is no candidate.
    let mut c = Cluster::start(Options::new(2).actions(&["job"]).manual_ready()).await;
    c.ready(AGENT).await;
    // The probe runs commands in order and `ready` goes out on the agent's
    // stream before the send, so the master knows the agent is ready.
    let report = c.send_err(AGENT, SendCmd::new(Route::Random, "job")).await;
    assert_eq!(report["code"], "Unavailable", "{report}");
}

// ---- sendTo(pid) ----------------------------------------------------------------

#[tokio::test]
async fn send_to_pid_reaches_only_that_process() {
    let mut c = cluster(&["agent-to-2", "app1-to-2", "app-to-agent"]).await;
    let agent = c.pid_of(AGENT).await;
    let app2 = c.pid_of(2).await;

    let reports = c
        .send_ok(AGENT, SendCmd::new(Route::Pid(app2), "agent-to-2"))
        .await;
    assert_delivered(&reports, 1);
    c.barrier(AGENT).await;
    assert_eq!(c.receipts("agent-to-2"), vec![0, 0, 1]);

    let reports = c
        .send_ok(1, SendCmd::new(Route::Pid(app2), "app1-to-2"))
        .await;
    assert_delivered(&reports, 1);
    c.barrier(1).await;
    assert_eq!(c.receipts("app1-to-2"), vec![0, 0, 1]);

    let reports = c
        .send_ok(2, SendCmd::new(Route::Pid(agent), "app-to-agent"))
        .await;
    assert_delivered(&reports, 1);
    c.barrier(2).await;
    assert_eq!(c.receipts("app-to-agent"), vec![1, 0, 0]);
}

#[tokio::test]
async fn send_to_an_unknown_pid_is_not_found_for_the_sender() {
    let mut c = cluster(&["lost"]).await;
    for from in [AGENT, 1] {
        let report = c
            .send_err(from, SendCmd::new(Route::Pid(UNKNOWN_PID), "lost"))
            .await;
        assert_eq!(report["code"], "NotFound", "{report}");
        let message = report["message"].as_str().expect("failure has a message");
        assert!(
            message.contains(&UNKNOWN_PID.to_string()),
            "the failure should name the pid: {message}"
        );
    }
    // Fire-and-forget: the failure is not silent either; it comes back to
    // the SDK's on_undelivered handler.
    c.send_ok(1, SendCmd::new(Route::Pid(UNKNOWN_PID), "lost").emit())
        .await;
    let undelivered = c
        .wait_for("an undelivered report at app 1", |e| {
            e.worker_id == 1 && e.kind() == "undelivered"
        })
        .await;
    assert_eq!(undelivered.body["action"], "lost");
    assert_eq!(undelivered.body["codes"], json!(["NotFound"]));
    c.barrier(1).await;
    assert_eq!(c.receipts("lost"), vec![0, 0, 0]);
}

// ---- what a receiver learns ----------------------------------------------------

#[tokio::test]
async fn receivers_see_the_true_sender() {
    let mut c = cluster(&["who"]).await;
    let pids = [c.pid_of(AGENT).await, c.pid_of(1).await, c.pid_of(2).await];

    // agent -> app 1, app 2 -> agent, app 1 -> app 2.
    for (from, to) in [(AGENT, 1), (2, AGENT), (1, 2)] {
        c.send_ok(from, SendCmd::new(Route::Pid(pids[to as usize]), "who"))
            .await;
    }
    for from in [AGENT, 1, 2] {
        c.barrier(from).await;
    }
    let check = |c: &Cluster, to: u32, from: u32| {
        let got = c.messages(to, "who");
        assert_eq!(got.len(), 1, "worker {to} should get one message: {got:?}");
        let body = &got[0].body;
        let role = if from == AGENT { "agent" } else { "app" };
        assert_eq!(body["from_role"], role, "{body}");
        assert_eq!(body["from_pid"], pids[from as usize], "{body}");
        assert_eq!(body["from_worker_id"], from, "{body}");
    };
    check(&c, 1, AGENT);
    check(&c, AGENT, 2);
    check(&c, 2, 1);
}

#[tokio::test]
async fn json_data_round_trips_exactly() {
    let mut c = cluster(&["data"]).await;
    let app2 = c.pid_of(2).await;
    let values = [
        json!(null),
        json!(0),
        json!("plain"),
        json!(""),
        json!([]),
        json!({}),
        // Beyond f64's exact integers, and the extremes of i64 / u64: a
        // payload that went through a double would come back changed.
        json!(9_007_199_254_740_993_u64),
        json!(u64::MAX),
        json!(i64::MIN),
        // Exactly representable, so no float-parsing subtlety is involved.
        json!(-0.5),
        json!({
            "unicode": "héllo wörld — 世界 🎉 \u{7f} \t\n \"quoted\" \\ \u{0}",
            "nested": { "a": [1, 2, { "b": null, "c": [true, false] }], "d": { "e": { "f": "g" } } },
            "null": null,
            "empty": { "list": [], "object": {}, "string": "" },
            "big": 123_456_789_012_345_678_u64,
        }),
    ];
    for (i, value) in values.iter().enumerate() {
        c.send_ok(
            1,
            SendCmd::new(Route::Pid(app2), "data").data(json!({ "i": i, "v": value })),
        )
        .await;
    }
    c.barrier(1).await;
    let got: Vec<Value> = c
        .messages(2, "data")
        .iter()
        .map(|e| e.data().clone())
        .collect();
    let want: Vec<Value> = values
        .iter()
        .enumerate()
        .map(|(i, v)| json!({ "i": i, "v": v }))
        .collect();
    assert_eq!(got, want);
}

// ---- ordering ---------------------------------------------------------------------

/// Emits `n` sequenced messages from `from` to `to` (fire and forget, the
/// fast path) and checks they all arrive, in order, exactly once.
async fn check_order(c: &mut Cluster, from: u32, to: u32, route: Route) {
    const N: u64 = 10_000;
    let reports = c
        .send_ok(from, SendCmd::new(route, "seq").count(N).seq().emit())
        .await;
    assert_eq!(reports[0]["count"], N);
    c.wait_until(&format!("{N} seq messages at worker {to}"), |h| {
        h.iter()
            .filter(|e| e.worker_id == to && e.is_message("seq"))
            .count()
            >= N as usize
    })
    .await;
    // Also proves that no copy beyond the N is still on its way.
    c.barrier(from).await;
    let seqs: Vec<u64> = c
        .messages(to, "seq")
        .iter()
        .map(|e| e.seq().expect("seq message has a seq"))
        .collect();
    let want: Vec<u64> = (0..N).collect();
    if seqs != want {
        let first_bad = seqs
            .iter()
            .zip(&want)
            .position(|(a, b)| a != b)
            .unwrap_or(seqs.len().min(want.len()));
        panic!(
            "worker {to} got {} messages, first out of order at index {first_bad}: {:?}",
            seqs.len(),
            &seqs[first_bad.saturating_sub(3)..(first_bad + 3).min(seqs.len())]
        );
    }
    let undelivered = c.events_of(from, "undelivered");
    assert!(undelivered.is_empty(), "{undelivered:?}");
}

#[tokio::test]
async fn ten_thousand_messages_from_the_agent_to_an_app_arrive_in_order() {
    let mut c = cluster(&["seq"]).await;
    let app1 = c.pid_of(1).await;
    check_order(&mut c, AGENT, 1, Route::Pid(app1)).await;
}

#[tokio::test]
async fn ten_thousand_messages_from_an_app_to_the_agent_arrive_in_order() {
    let mut c = cluster(&["seq"]).await;
    check_order(&mut c, 1, AGENT, Route::Agent).await;
}

// ---- registration -----------------------------------------------------------------

/// Tries to register over a fresh stream, as a rogue or confused process would.
async fn register(addr: &str, secret: &str, role: Role) -> Result<clutch::Client, ConnectError> {
    clutch::Client::connect(ConnectOptions {
        addr: addr.to_owned(),
        secret: secret.to_owned(),
        role,
        // This is the test process: it must never exit on a closed stream.
        exit_on_disconnect: false,
        acks: true,
        send_buffer: 1024,
        idle_spin: std::time::Duration::ZERO,
    })
    .await
}

async fn expect_rejected(addr: &str, secret: &str, role: Role, code: Code) -> String {
    match register(addr, secret, role).await {
        Err(ConnectError::Rejected { code: got, message }) => {
            assert_eq!(
                got, code,
                "registering with secret {secret:?} as {role}: wrong code ({message})"
            );
            message
        }
        Err(other) => panic!("registering with secret {secret:?} as {role}: {other}"),
        Ok(client) => panic!(
            "registering with secret {secret:?} as {role} was accepted: {:?}",
            client.identity()
        ),
    }
}

#[tokio::test]
async fn bad_registrations_are_refused_and_routing_goes_on() {
    let mut c = cluster(&["after"]).await;
    let addr = c.addr().await;
    let agent_secret = c.probe(AGENT).await.secret;
    let app1_secret = c.probe(1).await.secret;
    assert!(!agent_secret.is_empty() && !app1_secret.is_empty());

    expect_rejected(&addr, "", Role::App, Code::Unauthenticated).await;
    expect_rejected(&addr, "not-a-secret", Role::App, Code::Unauthenticated).await;
    // A near miss of a real secret is as unknown as any other string.
    let mut near = app1_secret.clone();
    let last = near.pop().expect("secret is not empty");
    near.push(if last == '0' { '1' } else { '0' });
    expect_rejected(&addr, &near, Role::App, Code::Unauthenticated).await;
    // Secrets are single-use: the probes already registered with theirs.
    let message = expect_rejected(&addr, &app1_secret, Role::App, Code::AlreadyExists).await;
    assert!(!message.is_empty());
    expect_rejected(&addr, &agent_secret, Role::Agent, Code::AlreadyExists).await;
    // The agent's secret claimed as an app: the master checks "already used"
    // before the role, so a used secret never reveals which role it had.
    expect_rejected(&addr, &agent_secret, Role::App, Code::AlreadyExists).await;

    // The refused attempts did not disturb the registered processes.
    let reports = c.send_ok(1, SendCmd::new(Route::Broadcast, "after")).await;
    assert_delivered(&reports, 3);
    c.barrier(1).await;
    assert_eq!(c.receipts("after"), vec![1, 1, 1]);
}
