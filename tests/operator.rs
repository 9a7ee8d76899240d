//! Operator surface end-to-end tests with the real grpcurl: reflection,
//! injection, the admin API (list, watch, restart, reload, shutdown), health,
//! the admin token, the Unix socket listener and systemd's notify protocol.
//!
//! Every command of the README's operator cookbook is run here verbatim
//! (`operator/cookbook.rs` reads them out of README.md), with only the
//! cookbook's own variables set (`$CLUTCH_ADDR`, `$CLUTCH_TOKEN_FILE`,
//! `$CLUTCH_SOCKET`, `$WORKER_PID`), so the cookbook cannot go stale;
//! [`every_cookbook_command_is_run_by_a_test`] makes sure none is left out.
//! grpcurl is installed by the tests themselves (`operator/grpcurl.rs`).
//!
//! Most tests use the shared harness (`support/`: a real master with
//! `clutch-probe` children). What the harness cannot set — the master's own
//! command line and environment (a Unix socket, `NOTIFY_SOCKET`) — runs on a
//! master the test starts itself with the built-in demo children
//! (`operator/standalone.rs`). As elsewhere, nothing waits on a fixed sleep:
//! events are awaited with deadlines, absences are proven with the harness's
//! causal barrier, and a `Watch` is known to be subscribed once grpcurl has
//! received its response headers.

mod support;

#[path = "operator/cookbook.rs"]
mod cookbook;
#[path = "operator/grpcurl.rs"]
mod grpcurl;
#[path = "operator/standalone.rs"]
mod standalone;

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::sys::signal::Signal;
use serde_json::{json, Value};

use cookbook::Cookbook;
use grpcurl::{Grpcurl, Item, Run, Stream};
use standalone::Standalone;
use support::{Cluster, Options, Route, TickCmd, DEADLINE};

/// The agent's worker id in the harness.
const AGENT: u32 = 0;

/// A pid no process can have: above Linux's hard `pid_max` limit (2^22).
const UNKNOWN_PID: u32 = 4_000_000_000;

// gRPC status codes, as grpcurl names them and by number (grpcurl exits with
// 64 + the number).
const INVALID_ARGUMENT: (&str, i32) = ("InvalidArgument", 3);
const NOT_FOUND: (&str, i32) = ("NotFound", 5);
const PERMISSION_DENIED: (&str, i32) = ("PermissionDenied", 7);
const RESOURCE_EXHAUSTED: (&str, i32) = ("ResourceExhausted", 8);
const UNAVAILABLE: (&str, i32) = ("Unavailable", 14);
const UNAUTHENTICATED: (&str, i32) = ("Unauthenticated", 16);

// ---- the operator's view of a harness cluster -------------------------------------

/// A harness cluster with what an operator has: grpcurl, the cookbook, the
/// master's address and its token file.
struct Op {
    c: Cluster,
    g: Grpcurl,
    book: Cookbook,
    addr: String,
    token_file: PathBuf,
    /// Holds the token file (the harness's temp dir does not exist before
    /// the cluster starts, so the token file lives in one of our own).
    _token_dir: tempfile::TempDir,
}

impl Op {
    /// Starts a cluster whose token file is in a temp dir of ours; `None`
    /// (the test is skipped) when grpcurl cannot be had.
    async fn start(opts: Options) -> Option<Op> {
        let g = grpcurl::grpcurl()?;
        let token_dir = tempfile::Builder::new()
            .prefix("clutch-op-token-")
            .tempdir()
            .expect("temp dir");
        let token_file = token_dir.path().join("admin.token");
        let opts = opts.toml(&format!(
            "[admin]\ntoken_file = {}",
            json!(token_file.display().to_string())
        ));
        let mut c = Cluster::start(opts).await;
        let addr = c.addr().await;
        Some(Op {
            c,
            g,
            book: Cookbook::load(),
            addr,
            token_file,
            _token_dir: token_dir,
        })
    }

    /// The cookbook's variables for this cluster.
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("CLUTCH_ADDR", self.addr.clone()),
            ("CLUTCH_TOKEN_FILE", self.token_file.display().to_string()),
        ]
    }

    /// Runs a cookbook command.
    async fn cook(&self, name: &str) -> Run {
        self.cook_with(name, &[]).await
    }

    /// Runs a cookbook command with more (or other) variables.
    async fn cook_with(&self, name: &str, extra: &[(&'static str, String)]) -> Run {
        let mut env = self.env();
        env.retain(|(k, _)| !extra.iter().any(|(e, _)| e == k));
        env.extend(extra.iter().cloned());
        self.g.sh(self.book.command(name), &env).await
    }

    /// The admin token.
    fn token(&self) -> String {
        std::fs::read_to_string(&self.token_file)
            .expect("read the token file")
            .trim()
            .to_owned()
    }

    /// An admin RPC with a JSON body through grpcurl (not a cookbook
    /// command: for the cases the cookbook does not show).
    async fn admin(&self, method: &str, body: Value) -> Run {
        let auth = format!("authorization: Bearer {}", self.token());
        let body = body.to_string();
        let method = format!("clutch.v1.Admin/{method}");
        self.g
            .run(&["-plaintext", "-H", &auth, "-d", &body, &self.addr, &method])
            .await
    }

    /// The cookbook's `watch`, once the master has subscribed it.
    async fn watch(&self) -> Stream {
        watch_subscribed(&self.g, &self.book, &self.env()).await
    }

    /// The cookbook's `health`: the overall status.
    async fn health(&self) -> String {
        status_of(&self.cook("health").await)
    }
}

/// Starts the cookbook's `watch` and waits until the call is established.
///
/// The one change to the cookbook's command: `-v`, so that grpcurl says when
/// the response headers arrive. The master subscribes the watcher before it
/// answers with headers, so every event after that point is in the stream;
/// without it a test could not tell "not subscribed yet" from "no event".
async fn watch_subscribed(g: &Grpcurl, book: &Cookbook, env: &[(&'static str, String)]) -> Stream {
    let command = book.command("watch");
    assert!(
        command.starts_with("grpcurl "),
        "the cookbook's watch is one grpcurl call: {command}"
    );
    let mut stream = g.stream(&command.replacen("grpcurl ", "grpcurl -v ", 1), env);
    stream
        .wait_for("the Watch call's response headers", |i| {
            matches!(i, Item::Headers)
        })
        .await;
    stream
}

/// The `status` of a health reply.
#[track_caller]
fn status_of(run: &Run) -> String {
    run.json()["status"]
        .as_str()
        .unwrap_or_else(|| panic!("no status in the health reply: {run}"))
        .to_owned()
}

/// A number field of grpcurl's JSON: absent means 0 (grpcurl leaves zeros
/// out), 64-bit integers come as strings.
#[track_caller]
fn num(v: &Value, key: &str) -> i64 {
    match v.get(key) {
        None => 0,
        Some(Value::Number(n)) => n.as_i64().expect("an integer"),
        Some(Value::String(s)) => s.parse().unwrap_or_else(|e| panic!("{key}: {s:?}: {e}")),
        Some(other) => panic!("{key} is not a number: {other}"),
    }
}

fn text<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

/// An event of a kind about one pid.
fn is_event(v: &Value, kind: &str, pid: u32) -> bool {
    text(v, "kind") == kind && num(v, "pid") == i64::from(pid)
}

/// Writes a line to the real stderr, past the test harness's capture.
fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

// ---- reflection ----------------------------------------------------------------------

#[tokio::test]
async fn reflection_lists_and_describes_every_service_without_a_token() {
    let Some(op) = Op::start(Options::new(1)).await else {
        return;
    };

    let list = op.cook("list-services").await;
    assert_eq!(list.code, Some(0), "{list}");
    let services: BTreeSet<&str> = list.stdout.lines().map(str::trim).collect();
    for service in [
        "clutch.v1.Admin",
        "clutch.v1.Messenger",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(services.contains(service), "{service} not listed: {list}");
    }

    let describe = op.cook("describe").await;
    assert_eq!(describe.code, Some(0), "{describe}");
    for rpc in [
        "rpc Inject ( .clutch.v1.InjectRequest ) returns ( .clutch.v1.InjectReply );",
        "rpc List ( .clutch.v1.ListRequest ) returns ( .clutch.v1.ListReply );",
        "rpc Watch ( .clutch.v1.WatchRequest ) returns ( stream .clutch.v1.Event );",
        "rpc Restart ( .clutch.v1.RestartRequest ) returns ( .clutch.v1.RestartReply );",
        "rpc Reload ( .clutch.v1.ReloadRequest ) returns ( .clutch.v1.ReloadReply );",
        "rpc Shutdown ( .clutch.v1.ShutdownRequest ) returns ( .clutch.v1.ShutdownReply );",
    ] {
        assert!(describe.stdout.contains(rpc), "{rpc} missing: {describe}");
    }
    // The proto's comments travel with the descriptors.
    assert!(
        describe
            .stdout
            .contains("// Route one message as if the master had sent it."),
        "comments missing: {describe}"
    );

    let message = op.cook("describe-message").await;
    assert_eq!(message.code, Some(0), "{message}");
    for field in [
        "string action = 1;",
        ".google.protobuf.Value data = 2;",
        "string to = 3;",
        "uint32 pid = 4;",
    ] {
        assert!(message.stdout.contains(field), "{field} missing: {message}");
    }

    // grpcurl 1.8.6 speaks only v1alpha; v1 (what newer grpcurl and other
    // tools use first) is checked with a raw call.
    let v1 = reflection_list_services(&op.addr, "grpc.reflection.v1.ServerReflection").await;
    for service in [
        "clutch.v1.Admin",
        "clutch.v1.Messenger",
        "grpc.health.v1.Health",
    ] {
        assert!(
            v1.contains(service),
            "v1 reflection lacks {service}: {v1:?}"
        );
    }
}

/// `list_services` over one reflection service, as raw protobuf: the
/// request is `{list_services: ""}` (field 7, empty string); the reply's
/// bytes are returned as text (service names appear verbatim in them).
async fn reflection_list_services(addr: &str, service: &str) -> String {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect for reflection");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("channel ready");
    let path: tonic::codegen::http::uri::PathAndQuery = format!("/{service}/ServerReflectionInfo")
        .parse()
        .expect("path");
    let request = tonic::Request::new(futures_util::stream::iter(vec![vec![0x3a_u8, 0x00]]));
    let reply = tokio::time::timeout(DEADLINE, async {
        let mut stream = grpc
            .streaming(request, path, RawCodec)
            .await
            .expect("reflection call")
            .into_inner();
        stream
            .message()
            .await
            .expect("reflection reply")
            .expect("one reply")
    })
    .await
    .expect("reflection answered in time");
    String::from_utf8_lossy(&reply).into_owned()
}

/// A codec that passes message bytes through as they are.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        let n = bytes::Buf::remaining(src);
        Ok(Some(bytes::Buf::copy_to_bytes(src, n).to_vec()))
    }
}

// ---- injection --------------------------------------------------------------------

#[tokio::test]
async fn injected_messages_reach_their_targets_with_the_data_as_written() {
    let actions = [
        "config-update",
        "maintenance",
        "flush-cache",
        "job",
        "dump-state",
    ];
    let Some(mut op) = Op::start(Options::new(2).actions(&actions)).await else {
        return;
    };
    op.c.wait_all_egg_ready().await;
    let master_pid = op.c.master_pid();

    // apps: every app worker, not the agent, with the data as written. The
    // cookbook's example is the test's data; it must keep showing what
    // survives the trip: nesting, unicode, integers, a fraction, null.
    let body = op.book.request_body("inject-apps");
    let data = body["data"].clone();
    assert!(
        data.to_string().contains('☕')
            && data["level"].is_u64()
            && data["limits"]["burst"].is_null()
            && data["limits"].is_object()
            && data["ratio"].is_f64(),
        "the inject-apps example lost a feature the test relies on: {data}"
    );
    let reply = op.cook("inject-apps").await.json();
    assert_eq!(
        reply,
        json!({ "delivered": 2 }),
        "held and undelivered are 0 / empty"
    );

    let broadcast = op.cook("inject-broadcast").await.json();
    assert_eq!(num(&broadcast, "delivered"), 3, "{broadcast}");
    let agent = op.cook("inject-agent").await.json();
    assert_eq!(num(&agent, "delivered"), 1, "{agent}");
    let random = op.cook("inject-random").await.json();
    assert_eq!(num(&random, "delivered"), 1, "{random}");
    let target = op.c.pid_of(2).await;
    let pid_env = [("WORKER_PID", target.to_string())];
    let to_pid = op.cook_with("inject-pid", &pid_env).await.json();
    assert_eq!(num(&to_pid, "delivered"), 1, "{to_pid}");

    // Everything injected before the agent's marker is delivered once every
    // process has the marker: the master queued it first in each mailbox.
    op.c.barrier(AGENT).await;
    let expect = |action: &str, counts: Vec<usize>, op: &Op| {
        assert_eq!(op.c.receipts(action), counts, "receipts of {action}");
        for w in op.c.all() {
            for m in op.c.messages(w, action) {
                assert_eq!(m.body["from_role"], "master", "{m}");
                assert_eq!(m.body["from_pid"], master_pid, "{m}");
            }
        }
    };
    expect("config-update", vec![0, 1, 1], &op);
    for w in [1, 2] {
        assert_eq!(op.c.messages(w, "config-update")[0].data(), &data);
    }
    expect("maintenance", vec![1, 1, 1], &op);
    let maintenance = op.book.request_body("inject-broadcast")["data"].clone();
    for w in op.c.all() {
        assert_eq!(op.c.messages(w, "maintenance")[0].data(), &maintenance);
    }
    // No data: JSON null.
    expect("flush-cache", vec![1, 0, 0], &op);
    assert_eq!(op.c.messages(AGENT, "flush-cache")[0].data(), &Value::Null);
    let jobs = op.c.receipts("job");
    assert_eq!(jobs[0], 0, "random picks an app worker: {jobs:?}");
    assert_eq!(
        jobs[1] + jobs[2],
        1,
        "random picks one app worker: {jobs:?}"
    );
    expect("dump-state", vec![0, 0, 1], &op);
    let dump = op.book.request_body_with("inject-pid", &pid_env);
    assert_eq!(dump["pid"], target);
    assert_eq!(op.c.messages(2, "dump-state")[0].data(), &dump["data"]);

    // List counts what each slot was handed.
    let list = op.cook("list").await.json();
    let processes = list["processes"].as_array().expect("processes");
    assert_eq!(processes.len(), 3, "{list}");
    for (w, p) in processes.iter().enumerate() {
        let w = w as u32;
        let received: usize = actions.iter().map(|a| op.c.messages(w, a).len()).sum();
        assert!(
            num(p, "delivered") >= received as i64,
            "worker {w} was handed {} messages but received {received}: {p}",
            num(p, "delivered")
        );
    }
}

#[tokio::test]
async fn injected_json_keeps_every_kind_of_value() {
    let Some(mut op) = Op::start(Options::new(1).actions(&["data"])).await else {
        return;
    };
    op.c.wait_all_egg_ready().await;
    // (what is sent, what the worker reads back). Numbers travel as a
    // protobuf double: integral ones up to 2^53 come back as integers.
    let cases: Vec<(Option<Value>, Value)> = vec![
        (None, Value::Null),
        (Some(Value::Null), Value::Null),
        (Some(json!(0)), json!(0)),
        (Some(json!(-17)), json!(-17)),
        (
            Some(json!(9_007_199_254_740_992_u64)),
            json!(9_007_199_254_740_992_u64),
        ),
        (Some(json!(2.0)), json!(2)),
        (Some(json!(1.5)), json!(1.5)),
        (Some(json!(-0.001)), json!(-0.001)),
        (Some(json!(1e21)), json!(1e21)),
        (Some(json!(true)), json!(true)),
        (Some(json!("")), json!("")),
        (
            Some(json!(
                "quote \" backslash \\ newline \n tab \t nul \u{0} emoji 🎉 שלום 東京"
            )),
            json!("quote \" backslash \\ newline \n tab \t nul \u{0} emoji 🎉 שלום 東京"),
        ),
        (Some(json!([])), json!([])),
        (Some(json!({})), json!({})),
        (
            Some(json!([1, [2, [3, { "deep": [null, false, "x"] }]]])),
            json!([1, [2, [3, { "deep": [null, false, "x"] }]]]),
        ),
        (
            Some(json!({ "ключ": { "k": { "k": -1, "f": 0.5 } }, "": "empty key" })),
            json!({ "ключ": { "k": { "k": -1, "f": 0.5 } }, "": "empty key" }),
        ),
    ];
    for (sent, _) in &cases {
        let mut body = json!({ "action": "data", "to": "apps" });
        if let Some(v) = sent {
            body["data"] = v.clone();
        }
        let reply = op.admin("Inject", body).await.json();
        assert_eq!(num(&reply, "delivered"), 1, "{reply}");
    }
    op.c.barrier(AGENT).await;
    let got: Vec<Value> =
        op.c.messages(1, "data")
            .iter()
            .map(|m| m.data().clone())
            .collect();
    let want: Vec<Value> = cases.into_iter().map(|(_, w)| w).collect();
    assert_eq!(got, want, "in the order sent (master → worker is ordered)");
}

#[tokio::test]
async fn inject_and_restart_errors_are_precise_and_deliver_nothing() {
    let opts = Options::new(1)
        .actions(&["x", "edge"])
        .toml("[limits]\nmax_payload_bytes = 64");
    let Some(mut op) = Op::start(opts).await else {
        return;
    };
    op.c.wait_all_egg_ready().await;

    let run = op
        .admin(
            "Inject",
            json!({ "action": "x", "to": "pid", "pid": UNKNOWN_PID }),
        )
        .await;
    let message = run.expect_status(NOT_FOUND.0, NOT_FOUND.1);
    assert!(message.contains(&UNKNOWN_PID.to_string()), "{run}");

    let run = op
        .admin("Inject", json!({ "action": "", "to": "apps" }))
        .await;
    let message = run.expect_status(INVALID_ARGUMENT.0, INVALID_ARGUMENT.1);
    assert!(message.contains("empty"), "{run}");

    let long = "a".repeat(257);
    let run = op
        .admin("Inject", json!({ "action": long, "to": "apps" }))
        .await;
    let message = run.expect_status(INVALID_ARGUMENT.0, INVALID_ARGUMENT.1);
    assert!(message.contains("256"), "the limit is named: {run}");

    // The payload limit applies to the JSON text: 64 bytes pass, 65 do not,
    // and the refusal names the limit.
    let at_limit = "y".repeat(62); // 62 + 2 quotes = 64 bytes of JSON
    let reply = op
        .admin(
            "Inject",
            json!({ "action": "edge", "to": "apps", "data": at_limit }),
        )
        .await
        .json();
    assert_eq!(num(&reply, "delivered"), 1, "{reply}");
    let over = "y".repeat(63);
    let run = op
        .admin(
            "Inject",
            json!({ "action": "x", "to": "apps", "data": over }),
        )
        .await;
    let message = run.expect_status(RESOURCE_EXHAUSTED.0, RESOURCE_EXHAUSTED.1);
    assert!(
        message.contains("64") && message.contains("65"),
        "the size and the limit are stated: {run}"
    );

    for (body, needle) in [
        (json!({ "action": "x", "to": "everyone" }), "everyone"),
        (json!({ "action": "x" }), "required"),
        (json!({ "action": "x", "to": "pid" }), "pid"),
        (json!({ "action": "x", "to": "apps", "pid": 1 }), "pid"),
    ] {
        let run = op.admin("Inject", body.clone()).await;
        let message = run.expect_status(INVALID_ARGUMENT.0, INVALID_ARGUMENT.1);
        assert!(message.contains(needle), "{body}: {run}");
    }

    for (body, status, needle) in [
        (json!({ "worker_id": 99 }), NOT_FOUND, "99"),
        (json!({ "pid": UNKNOWN_PID }), NOT_FOUND, "4000000000"),
        (json!({}), INVALID_ARGUMENT, "worker_id"),
        (
            json!({ "worker_id": 1, "agent": true }),
            INVALID_ARGUMENT,
            "only one",
        ),
    ] {
        let run = op.admin("Restart", body.clone()).await;
        let message = run.expect_status(status.0, status.1);
        assert!(message.contains(needle), "{body}: {run}");
    }

    op.c.barrier(AGENT).await;
    assert_eq!(
        op.c.receipts("x"),
        vec![0, 0],
        "a refused inject reaches no one"
    );
    assert_eq!(op.c.receipts("edge"), vec![0, 1]);
    assert_eq!(
        op.c.events_of(1, "shutdown-notice").len(),
        0,
        "a refused restart stops no one"
    );
    assert_eq!(op.c.probe(1).await.incarnation, 1);
}

// ---- health and shutdown -------------------------------------------------------------

#[tokio::test]
async fn health_is_not_serving_before_egg_ready_serving_after_and_not_serving_in_shutdown() {
    // App 1's shutdown hook takes a minute (and the master waits that long
    // before SIGTERM), so the master is provably inside its shutdown while
    // the test looks; the test then lets app 1 go.
    let opts = Options::new(2)
        .manual_ready()
        .actions(&["job"])
        .env("PROBE_SHUTDOWN_DELAY_MS", "1=60000")
        .toml("[timeouts]\nshutdown_ms = 60000");
    let Some(mut op) = Op::start(opts).await else {
        return;
    };
    let mut watch = op.watch().await;

    // Before egg-ready: nobody is ready.
    assert_eq!(op.health().await, "NOT_SERVING");
    let service = status_of(&op.cook("health-service").await);
    assert_eq!(service, "NOT_SERVING");
    let run = op.cook("inject-random").await;
    let message = run.expect_status(UNAVAILABLE.0, UNAVAILABLE.1);
    assert!(message.contains("ready"), "{run}");
    let run = op.cook("reload").await;
    run.expect_status(UNAVAILABLE.0, UNAVAILABLE.1);

    op.c.ready(AGENT).await;
    op.c.probe(1).await;
    op.c.probe(2).await;
    op.c.ready(1).await;
    // Every process but app 2 is ready: still not serving.
    watch
        .wait_message("app 1 ready", |v| {
            text(v, "kind") == "ready" && num(v, "workerId") == 1
        })
        .await;
    assert_eq!(op.health().await, "NOT_SERVING");
    op.c.ready(2).await;

    // The cluster-wide egg-ready event (no role) is emitted after the health
    // status changed.
    watch
        .wait_message("the cluster's egg-ready", |v| {
            text(v, "kind") == "egg-ready" && text(v, "role").is_empty()
        })
        .await;
    assert_eq!(op.health().await, "SERVING");
    assert_eq!(status_of(&op.cook("health-service").await), "SERVING");
    op.c.wait_all_egg_ready().await;

    // Shutdown: answered at once, then the apps get their notice.
    assert_eq!(op.cook("shutdown").await.json(), json!({}));
    let app1 = op.c.pid_of(1).await;
    op.c.wait_for("app 1's shutdown notice", |e| {
        e.pid == app1 && e.kind() == "shutdown-notice"
    })
    .await;
    watch
        .wait_message("the shutdown event", |v| text(v, "kind") == "shutdown")
        .await;
    // Health was turned off before the notices went out, and the master
    // still answers while app 1 finishes.
    assert_eq!(op.health().await, "NOT_SERVING");
    assert_eq!(status_of(&op.cook("health-service").await), "NOT_SERVING");
    // App 2 (no delay) is gone already; the agent waits for the apps.
    let app2 = op.c.pid_of(2).await;
    op.c.wait_closed(app2).await;
    assert!(
        op.c.events_of(AGENT, "shutdown-notice").is_empty(),
        "the agent is stopped after the apps"
    );

    // (An open Watch delays the master's exit: see
    // `watch_ends_cleanly_when_the_master_stops`.)
    drop(watch);
    op.c.command_pid(app1, json!({ "cmd": "exit", "code": 0 }))
        .await;
    let status = op.c.master_exit().await;
    assert_eq!(status.code(), Some(0), "a requested stop exits 0");
    let agent = op.c.pid_of(AGENT).await;
    op.c.wait_closed(agent).await;
    assert_eq!(
        op.c.events_of(AGENT, "shutdown-notice").len(),
        1,
        "the agent got its notice in the second phase"
    );
    let log = op.c.master_stderr();
    assert!(log.contains("operator's request"), "{log}");
}

// ---- who may do what ------------------------------------------------------------------

#[tokio::test]
async fn admin_rpcs_refuse_missing_and_wrong_tokens_and_child_secrets() {
    let Some(mut op) = Op::start(Options::new(1).actions(&["config-update"])).await else {
        return;
    };
    op.c.wait_all_egg_ready().await;

    // The token file: only the master's user can read it; the log names it
    // and never shows the token.
    let token = op.token();
    assert!(token.len() >= 32, "a generated token is long: {token:?}");
    let mode = std::fs::metadata(&op.token_file)
        .expect("token file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "token file mode {mode:o}");
    let log = op.c.master_stderr();
    assert!(
        log.contains(&op.token_file.display().to_string()),
        "the log names the token file: {log}"
    );
    assert!(!log.contains(&token), "the token is in the log: {log}");

    // The right token works.
    let list = op.cook("list").await.json();
    assert_eq!(
        list["processes"].as_array().map(Vec::len),
        Some(2),
        "{list}"
    );

    let creds = tempfile::tempdir().expect("temp dir");
    let write = |name: &str, content: &str| {
        let path = creds.path().join(name);
        std::fs::write(&path, content).expect("write a credentials file");
        path.display().to_string()
    };

    // No authorization metadata at all.
    let method = "clutch.v1.Admin/List";
    let run = op.g.run(&["-plaintext", &op.addr, method]).await;
    let message = run.expect_status(UNAUTHENTICATED.0, UNAUTHENTICATED.1);
    assert!(message.contains("missing"), "{run}");
    // Not a bearer credential.
    let run =
        op.g.run(&[
            "-plaintext",
            "-H",
            &format!("authorization: Basic {token}"),
            &op.addr,
            method,
        ])
        .await;
    run.expect_status(UNAUTHENTICATED.0, UNAUTHENTICATED.1);

    // A wrong token, an empty token file and no token file, through the
    // cookbook's own command.
    let wrong = write("wrong", "0123456789abcdef0123456789abcdef\n");
    let empty = write("empty", "");
    let missing = creds.path().join("missing").display().to_string();
    for file in [wrong, empty, missing] {
        let run = op
            .cook_with("list", &[("CLUTCH_TOKEN_FILE", file.clone())])
            .await;
        run.expect_status(UNAUTHENTICATED.0, UNAUTHENTICATED.1);
    }

    // A child's secret (the probes report theirs): permission denied, on
    // reads and on injection alike, and nothing is delivered.
    let agent_secret = op.c.probe(AGENT).await.secret;
    let app_secret = op.c.probe(1).await.secret;
    assert!(!agent_secret.is_empty() && !app_secret.is_empty());
    for (name, secret) in [("list", &agent_secret), ("inject-apps", &app_secret)] {
        let file = write("secret", &format!("{secret}\n"));
        let run = op.cook_with(name, &[("CLUTCH_TOKEN_FILE", file)]).await;
        let message = run.expect_status(PERMISSION_DENIED.0, PERMISSION_DENIED.1);
        assert!(message.contains("admin token"), "{run}");
    }
    op.c.barrier(AGENT).await;
    assert_eq!(op.c.receipts("config-update"), vec![0, 0]);

    // Health and reflection need no token at all.
    assert_eq!(op.health().await, "SERVING");
    let list = op
        .cook_with("list-services", &[("CLUTCH_TOKEN_FILE", String::new())])
        .await;
    assert_eq!(list.code, Some(0), "{list}");
}

#[tokio::test]
async fn a_configured_token_goes_to_the_default_token_file() {
    let Some(g) = grpcurl::grpcurl() else {
        return;
    };
    let token = "operator-token-0123456789";
    let opts = Options::new(1).toml(&format!("[admin]\ntoken = {}", json!(token)));
    let mut c = Cluster::start(opts).await;
    let addr = c.addr().await;
    c.wait_all_egg_ready().await;

    // The default place: $XDG_RUNTIME_DIR (or the temp dir)/clutch-PID/.
    let base = std::env::var_os("XDG_RUNTIME_DIR").map_or_else(std::env::temp_dir, PathBuf::from);
    let dir = base.join(format!("clutch-{}", c.master_pid()));
    let file = dir.join("admin.token");
    let log = c.master_stderr();
    assert!(
        log.contains(&format!("token_file={}", file.display())),
        "the log names {}: {log}",
        file.display()
    );
    assert!(!log.contains(token), "the token is in the log: {log}");
    assert_eq!(
        std::fs::read_to_string(&file).expect("the token file"),
        format!("{token}\n")
    );
    let mode = |p: &Path| std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777;
    assert_eq!(mode(&file), 0o600);
    assert_eq!(mode(&dir), 0o700);

    let book = Cookbook::load();
    let env = [
        ("CLUTCH_ADDR", addr),
        ("CLUTCH_TOKEN_FILE", file.display().to_string()),
    ];
    let list = g.sh(book.command("list"), &env).await.json();
    assert_eq!(
        list["processes"].as_array().map(Vec::len),
        Some(2),
        "{list}"
    );

    c.signal_master(Signal::SIGTERM);
    c.master_exit().await;
    // The master leaves its token folder behind; do not litter the temp dir.
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- watch, restart, reload -------------------------------------------------------------

#[tokio::test]
async fn watch_shows_a_killed_worker_and_its_restart() {
    let Some(mut op) = Op::start(Options::new(2)).await else {
        return;
    };
    op.c.wait_all_egg_ready().await;
    let mut watch = op.watch().await;

    let old = op.c.pid_of(1).await;
    op.c.kill_pid(old, Signal::SIGKILL);

    let (exited_at, exited) = watch
        .wait_message("the exit of the killed worker", |v| {
            is_event(v, "exited", old)
        })
        .await;
    assert_eq!(text(&exited, "role"), "app", "{exited}");
    assert_eq!(num(&exited, "workerId"), 1, "{exited}");
    assert_eq!(num(&exited, "signal"), 9, "{exited}");
    assert_eq!(num(&exited, "exitCode"), -1, "{exited}");
    assert!(text(&exited, "message").contains("SIGKILL"), "{exited}");
    assert!(num(&exited, "atMs") > 0, "{exited}");

    let (restarting_at, restarting) = watch
        .wait_message("the restart decision", |v| is_event(v, "restarting", old))
        .await;
    assert_eq!(num(&restarting, "workerId"), 1, "{restarting}");
    assert!(
        num(&restarting, "delayMs") > 0,
        "a crash restarts after a backoff: {restarting}"
    );

    let new = op.c.probe_incarnation(1, 2).await.pid;
    let mut at = restarting_at;
    for kind in ["spawned", "registered", "ready", "egg-ready"] {
        let (i, event) = watch
            .wait_message(&format!("{kind} of the new process"), |v| {
                is_event(v, kind, new)
            })
            .await;
        assert!(
            i > at,
            "{kind} comes after the previous step: {:#?}",
            watch.seen
        );
        assert_eq!(num(&event, "workerId"), 1, "{event}");
        assert_eq!(num(&event, "incarnation"), 2, "{event}");
        at = i;
    }
    assert!(exited_at < restarting_at);
    // The other slots were not touched. (Events without a role, such as
    // the opening `watching`, are about the cluster, not a slot.)
    let others: Vec<&Value> = watch
        .messages()
        .into_iter()
        .filter(|v| v.get("role").is_some() && num(v, "workerId") != 1)
        .collect();
    assert!(others.is_empty(), "events of other slots: {others:#?}");
}

#[tokio::test]
async fn restart_by_worker_id_pid_and_the_agent_replaces_each_process_gracefully() {
    let Some(mut op) = Op::start(Options::new(2)).await else {
        return;
    };
    op.c.wait_all_egg_ready().await;
    let mut watch = op.watch().await;
    let app1 = op.c.pid_of(1).await;
    let app2 = op.c.pid_of(2).await;
    let agent = op.c.pid_of(AGENT).await;

    // (cookbook command, extra variables, slot, its pid)
    let cases = [
        ("restart-worker", vec![], 1, app1, "app"),
        (
            "restart-pid",
            vec![("WORKER_PID", app2.to_string())],
            2,
            app2,
            "app",
        ),
        ("restart-agent", vec![], AGENT, agent, "agent"),
    ];
    for (name, env, worker, old, role) in cases {
        let reply = op.cook_with(name, &env).await.json();
        assert_eq!(text(&reply, "role"), role, "{name}: {reply}");
        assert_eq!(
            num(&reply, "workerId"),
            i64::from(worker),
            "{name}: {reply}"
        );
        assert_eq!(num(&reply, "oldPid"), i64::from(old), "{name}: {reply}");
        // Gracefully: the notice, then a clean exit, then at once (no
        // backoff for an operator's restart) a new process in the slot.
        op.c.wait_for(&format!("{name}: the old process's notice"), |e| {
            e.pid == old && e.kind() == "shutdown-notice"
        })
        .await;
        let (_, exited) = watch
            .wait_message(&format!("{name}: the old process's exit"), |v| {
                is_event(v, "exited", old)
            })
            .await;
        assert_eq!(num(&exited, "exitCode"), 0, "{name}: {exited}");
        assert_eq!(num(&exited, "signal"), 0, "{name}: {exited}");
        let (_, restarting) = watch
            .wait_message(&format!("{name}: restarting"), |v| {
                is_event(v, "restarting", old)
            })
            .await;
        assert_eq!(num(&restarting, "delayMs"), 0, "{name}: {restarting}");
        let new = op.c.probe_incarnation(worker, 2).await.pid;
        op.c.wait_for(&format!("{name}: egg-ready of the new process"), |e| {
            e.pid == new && e.kind() == "egg-ready"
        })
        .await;
    }

    let list = op.cook("list").await.json();
    let processes = list["processes"].as_array().expect("processes").clone();
    assert_eq!(processes.len(), 3, "{list}");
    for (i, p) in processes.iter().enumerate() {
        let w = i as u32;
        let current = op.c.probe_incarnation(w, 2).await.pid;
        assert_eq!(
            text(p, "role"),
            if w == AGENT { "agent" } else { "app" },
            "{p}"
        );
        assert_eq!(num(p, "workerId"), i64::from(w), "{p}");
        assert_eq!(num(p, "pid"), i64::from(current), "{p}");
        assert_eq!(text(p, "state"), "ready", "{p}");
        assert_eq!(num(p, "incarnation"), 2, "{p}");
        assert_eq!(num(p, "restarts"), 1, "{p}");
        assert!(num(p, "uptimeMs") >= 0, "{p}");
    }
}

#[tokio::test]
async fn reload_replaces_every_worker_while_numbered_messages_lose_nothing() {
    const WORKERS: u32 = 3;
    let opts = Options::new(WORKERS).actions(&["seq"]).sync_reports();
    let Some(mut op) = Op::start(opts).await else {
        return;
    };
    op.c.wait_all_egg_ready().await;
    let mut watch = op.watch().await;
    let before: Vec<u32> = {
        let mut pids = Vec::new();
        for w in 1..=WORKERS {
            pids.push(op.c.pid_of(w).await);
        }
        pids
    };

    // The agent sends sendToApp {"seq": i}, i = 0, 1, …, every 2 ms, from
    // before the reload until after it.
    let ticks =
        op.c.tick(AGENT, &TickCmd::new(Route::Apps, "seq").every_ms(2))
            .await;
    let apps: Vec<u32> = (1..=WORKERS).collect();
    op.c.wait_until("20 numbered messages at every app", |h| {
        apps.iter().all(|&w| {
            h.iter()
                .filter(|e| e.worker_id == w && e.is_message("seq"))
                .count()
                >= 20
        })
    })
    .await;

    let reply = op.cook("reload").await.json();
    let replaced = reply["replaced"].as_array().expect("replaced").clone();
    assert_eq!(replaced.len(), WORKERS as usize, "{reply}");
    let mut new_pids = Vec::new();
    for (i, r) in replaced.iter().enumerate() {
        let w = i as u32 + 1;
        assert_eq!(
            num(r, "workerId"),
            i64::from(w),
            "one slot at a time, in order: {reply}"
        );
        assert_eq!(num(r, "oldPid"), i64::from(before[i]), "{reply}");
        let new = u32::try_from(num(r, "newPid")).expect("a pid");
        assert!(new != before[i] && new != 0, "{reply}");
        assert_eq!(op.c.probe_incarnation(w, 2).await.pid, new, "{reply}");
        new_pids.push(new);
    }

    // Keep sending a little after the reload, then stop and let everything
    // in flight arrive: the marker comes after the last tick (same sender).
    let fresh = new_pids.clone();
    op.c.wait_until("10 numbered messages at every new process", |h| {
        fresh.iter().all(|&pid| {
            h.iter()
                .filter(|e| e.pid == pid && e.is_message("seq"))
                .count()
                >= 10
        })
    })
    .await;
    let ticked = op.c.tick_stop(AGENT, ticks).await;
    let count = ticked["count"].as_u64().expect("tick count");
    op.c.barrier(AGENT).await;
    let undelivered = op.c.events_of(AGENT, "undelivered");
    assert!(
        undelivered.is_empty(),
        "sends were refused: {undelivered:?}"
    );

    // Every slot got every number: the old process's, then the new one's,
    // each in order; the new process may start with a few the old one had
    // received but not acknowledged (at-least-once per slot), nothing else.
    let mut summary = Vec::new();
    for (i, w) in (1..=WORKERS).enumerate() {
        let (old, new) = (before[i], new_pids[i]);
        let seqs = |pid: u32| -> Vec<u64> {
            op.c.messages_of_pid(pid, "seq")
                .iter()
                .map(|e| e.data()["seq"].as_u64().expect("seq"))
                .collect()
        };
        let (by_old, by_new) = (seqs(old), seqs(new));
        for (pid, list) in [(old, &by_old), (new, &by_new)] {
            assert!(
                list.windows(2).all(|p| p[0] < p[1]),
                "worker {w}: pid {pid} got numbers out of order or twice: {list:?}"
            );
        }
        let mut next = 0u64;
        let mut duplicates = 0;
        for &s in by_old.iter().chain(&by_new) {
            if s == next {
                next += 1;
            } else if s < next {
                duplicates += 1;
            } else {
                panic!("worker {w}: numbers {next}..{s} were lost (old pid {old}: {by_old:?}, new pid {new}: {by_new:?})");
            }
        }
        assert_eq!(
            next, count,
            "worker {w}: the last numbers never arrived (sent 0..{count})"
        );
        summary.push(format!(
            "worker {w}: pid {old} got {} then pid {new} got {} ({duplicates} duplicates across the switch)",
            by_old.len(),
            by_new.len()
        ));
    }

    // Each new process was ready before its old one was stopped (so
    // capacity never dropped below N), and one slot at a time: the next
    // slot's new process was launched only after the previous old one left.
    let last = before[before.len() - 1];
    watch
        .wait_message("the last old process's exit", |v| {
            is_event(v, "exited", last)
        })
        .await;
    let index = |kind: &str, pid: u32| {
        watch
            .messages()
            .iter()
            .position(|v| is_event(v, kind, pid))
            .unwrap_or_else(|| panic!("no {kind} event for pid {pid}: {:#?}", watch.messages()))
    };
    for i in 0..WORKERS as usize {
        let (spawned, ready) = (index("spawned", new_pids[i]), index("ready", new_pids[i]));
        let (promoted, exited) = (index("promoted", new_pids[i]), index("exited", before[i]));
        let messages = watch.messages();
        assert_eq!(
            num(messages[exited], "incarnation"),
            1,
            "the old process's exit names its own incarnation: {:#?}",
            messages[exited]
        );
        assert!(
            spawned < ready && ready <= promoted && promoted < exited,
            "worker {}: the old process must stop only after the new one is ready: {:#?}",
            i + 1,
            watch.messages()
        );
        if i + 1 < WORKERS as usize {
            let next = index("spawned", new_pids[i + 1]);
            assert!(
                exited < next,
                "worker {} was replaced before worker {}'s old process had left: {:#?}",
                i + 2,
                i + 1,
                watch.messages()
            );
        }
    }
    for pid in &before {
        op.c.wait_closed(*pid).await;
        assert!(
            !op.c.live_children().contains(pid),
            "old pid {pid} is still alive"
        );
    }
    say(&format!(
        "reload: {count} numbered messages to {WORKERS} app workers, none lost; {}",
        summary.join("; ")
    ));
}

#[tokio::test]
async fn a_reload_whose_new_process_fails_keeps_the_old_one_serving_and_can_be_retried() {
    // Worker 2's second incarnation (the reload's new process) exits with
    // code 7 before it connects; later ones are fine.
    let opts = Options::new(2)
        .actions(&["config-update"])
        .env("PROBE_FAIL_WORKER", "2")
        .env("PROBE_FAIL_INCARNATIONS", "2")
        .env("PROBE_FAIL_CODE", "7");
    let Some(mut op) = Op::start(opts).await else {
        return;
    };
    op.c.wait_all_egg_ready().await;
    let (app1, app2) = (op.c.pid_of(1).await, op.c.pid_of(2).await);

    let run = op.cook("reload").await;
    let message = run.expect_status("Aborted", 10);
    for part in [
        "new process for app worker 2",
        "exited with exit code 7 before it was ready",
        &format!("the old one (pid {app2}) keeps serving"),
        &format!("app worker 1 ({app1} -> "),
    ] {
        assert!(message.contains(part), "{part:?} is missing: {run}");
    }
    // The old worker 2 still serves, next to worker 1's new process.
    let new_app1 = op.c.probe_incarnation(1, 2).await.pid;
    assert_eq!(
        op.cook("inject-apps").await.json(),
        json!({ "delivered": 2 })
    );
    for pid in [new_app1, app2] {
        op.c.wait_for("the injected message", |e| {
            e.pid == pid && e.is_message("config-update")
        })
        .await;
    }
    let list = op.cook("list").await.json();
    let pids: Vec<i64> = list["processes"]
        .as_array()
        .expect("processes")
        .iter()
        .map(|p| num(p, "pid"))
        .collect();
    assert_eq!(pids[1..], [i64::from(new_app1), i64::from(app2)], "{list}");

    // A second reload goes through (incarnation 3 of each slot is fine).
    let reply = op.cook("reload").await.json();
    let replaced = reply["replaced"].as_array().expect("replaced").clone();
    assert_eq!(replaced.len(), 2, "{reply}");
    assert_eq!(num(&replaced[1], "oldPid"), i64::from(app2), "{reply}");
    assert_eq!(
        num(&replaced[1], "newPid"),
        i64::from(op.c.probe_incarnation(2, 3).await.pid),
        "{reply}"
    );
}

#[tokio::test]
async fn a_reload_in_progress_refuses_another_and_a_restart_of_its_slot_and_a_stop_aborts_it() {
    // App 1's shutdown hook takes a minute and the master gives it that
    // long, so the reload is provably stuck on slot 1 while the test looks.
    let opts = Options::new(2)
        .env("PROBE_SHUTDOWN_DELAY_MS", "1=60000")
        .toml("[timeouts]\nshutdown_ms = 60000");
    let Some(mut op) = Op::start(opts).await else {
        return;
    };
    op.c.wait_all_egg_ready().await;
    let app1 = op.c.pid_of(1).await;
    let reload = {
        let (g, command, env) = (op.g.clone(), op.book.command("reload").to_owned(), op.env());
        tokio::spawn(async move { g.sh(&command, &env).await })
    };
    op.c.wait_for("app 1's notice from the reload", |e| {
        e.pid == app1 && e.kind() == "shutdown-notice"
    })
    .await;

    // Slot 1 runs two processes now: the new one, serving, and the old
    // one, told to stop and still finishing.
    let new_app1 = op.c.probe_incarnation(1, 2).await.pid;
    let list = op.cook("list").await.json();
    let processes = list["processes"].as_array().expect("processes").clone();
    let state_of = |pid: u32| {
        processes
            .iter()
            .find(|p| num(p, "pid") == i64::from(pid))
            .map(|p| (num(p, "workerId"), text(p, "state").to_owned()))
    };
    assert_eq!(state_of(new_app1), Some((1, "ready".into())), "{list}");
    assert_eq!(state_of(app1), Some((1, "retiring".into())), "{list}");

    let run = op.cook("reload").await;
    let message = run.expect_status("FailedPrecondition", 9);
    assert!(message.contains("already running"), "{run}");
    let run = op.cook("restart-worker").await;
    let message = run.expect_status("FailedPrecondition", 9);
    assert!(message.contains("reload"), "{run}");

    assert_eq!(op.cook("shutdown").await.json(), json!({}));
    let first = reload.await.expect("the reload task");
    let message = first.expect_status("Aborted", 10);
    assert!(message.contains("stopping"), "{first}");
    // Whatever is left of app 1 (both processes have the slow hook) goes now.
    for pid in [app1, new_app1] {
        if op.c.live_children().contains(&pid) {
            op.c.command_pid(pid, json!({ "cmd": "exit", "code": 0 }))
                .await;
        }
    }
    assert_eq!(op.c.master_exit().await.code(), Some(0));
}

// ---- a master started by the test -----------------------------------------------------

/// Reads the address file the master writes once listening.
async fn addr_file(m: &mut Standalone) -> String {
    m.wait_log("master listening").await;
    std::fs::read_to_string(m.path("addr"))
        .expect("the address file exists once the master logged its address")
        .trim()
        .to_owned()
}

#[tokio::test]
async fn a_unix_socket_listener_is_reached_with_grpcurl_unix() {
    let Some(g) = grpcurl::grpcurl() else {
        return;
    };
    let book = Cookbook::load();
    let dir = Standalone::dir();
    let socket = dir.path().join("clutch.sock");
    let mut m = Standalone::start(
        dir,
        &[
            "--listen",
            "unix:{dir}/clutch.sock",
            "--workers",
            "2",
            "--addr-file",
            "{dir}/addr",
            "--token-file",
            "{dir}/admin.token",
        ],
        &[],
    );
    let addr = addr_file(&mut m).await;
    assert_eq!(addr, format!("unix:{}", socket.display()));
    // The demo children connect over the socket too.
    m.wait_log("egg-ready: the agent and all 2 app workers are ready")
        .await;
    let env = [
        ("CLUTCH_SOCKET", socket.display().to_string()),
        (
            "CLUTCH_TOKEN_FILE",
            m.path("admin.token").display().to_string(),
        ),
    ];
    let health = g.sh(book.command("unix-health"), &env).await;
    assert_eq!(status_of(&health), "SERVING");
    let list = g.sh(book.command("unix-list"), &env).await.json();
    let processes = list["processes"].as_array().expect("processes");
    assert_eq!(processes.len(), 3, "{list}");
    for p in processes {
        assert_eq!(text(p, "state"), "ready", "{list}");
    }
    m.signal(Signal::SIGTERM);
    assert_eq!(m.exit().await, Some(0));
    assert!(!socket.exists(), "the socket file is removed at exit");
}

#[tokio::test]
async fn the_listener_is_loopback_only_unless_remote_is_allowed() {
    let Some(g) = grpcurl::grpcurl() else {
        return;
    };
    let book = Cookbook::load();
    let args = [
        "--workers",
        "1",
        "--listen",
        "0.0.0.0:0",
        "--token-file",
        "{dir}/admin.token",
    ];

    let mut refused = Standalone::start(Standalone::dir(), &args, &[]);
    assert_eq!(refused.exit().await, Some(1), "{}", refused.log());
    let log = refused.log();
    assert!(
        log.contains("allow_remote") && log.contains("0.0.0.0"),
        "{log}"
    );

    let mut short = Standalone::start(
        Standalone::dir(),
        &args[..2],
        &[("CLUTCH_ADMIN_TOKEN", "too-short")],
    );
    assert_eq!(short.exit().await, Some(1), "{}", short.log());
    assert!(short.log().contains("16"), "{}", short.log());

    let mut allowed = Standalone::start(
        Standalone::dir(),
        &[&args[..], &["--allow-remote", "--addr-file", "{dir}/addr"]].concat(),
        &[],
    );
    let addr = addr_file(&mut allowed).await;
    let port = addr
        .strip_prefix("0.0.0.0:")
        .unwrap_or_else(|| panic!("listening on {addr}"));
    allowed
        .wait_log("egg-ready: the agent and all 1 app workers are ready")
        .await;
    let env = [("CLUTCH_ADDR", format!("127.0.0.1:{port}"))];
    assert_eq!(
        status_of(&g.sh(book.command("health"), &env).await),
        "SERVING"
    );
    allowed.signal(Signal::SIGTERM);
    assert_eq!(allowed.exit().await, Some(0));
}

/// Datagrams the master sent to the notify socket, in order.
struct Notify {
    socket: tokio::net::UnixDatagram,
    seen: Vec<String>,
}

impl Notify {
    fn bind(path: &Path) -> Notify {
        Notify {
            socket: tokio::net::UnixDatagram::bind(path).expect("bind the notify socket"),
            seen: Vec::new(),
        }
    }

    /// Waits until `n` datagrams equal to `state` have come; returns the
    /// index of the n-th.
    async fn wait(&mut self, state: &str, n: usize) -> usize {
        let until = tokio::time::Instant::now() + DEADLINE;
        loop {
            let found: Vec<usize> = (0..self.seen.len())
                .filter(|&i| self.seen[i] == state)
                .collect();
            if found.len() >= n {
                return found[n - 1];
            }
            let mut buf = [0u8; 256];
            match tokio::time::timeout_at(until, self.socket.recv(&mut buf)).await {
                Ok(Ok(len)) => self
                    .seen
                    .push(String::from_utf8_lossy(&buf[..len]).into_owned()),
                Ok(Err(e)) => panic!("reading the notify socket: {e}"),
                Err(_) => panic!(
                    "no {n} x {state:?} on the notify socket after {DEADLINE:?}; got {:?}",
                    self.seen
                ),
            }
        }
    }

    /// Takes whatever else has arrived, without waiting.
    fn drain(&mut self) {
        let mut buf = [0u8; 256];
        while let Ok(len) = self.socket.try_recv(&mut buf) {
            self.seen
                .push(String::from_utf8_lossy(&buf[..len]).into_owned());
        }
    }
}

#[tokio::test]
async fn systemd_hears_ready_at_egg_ready_watchdog_pings_and_stopping() {
    let Some(g) = grpcurl::grpcurl() else {
        return;
    };
    let book = Cookbook::load();
    let dir = Standalone::dir();
    let mut notify = Notify::bind(&dir.path().join("notify"));
    let mut m = Standalone::start(
        dir,
        &[
            "--workers",
            "2",
            "--addr-file",
            "{dir}/addr",
            "--token-file",
            "{dir}/admin.token",
        ],
        // Pings every 50 ms.
        &[
            ("NOTIFY_SOCKET", "{dir}/notify"),
            ("WATCHDOG_USEC", "100000"),
        ],
    );
    let addr = addr_file(&mut m).await;
    let env = [("CLUTCH_ADDR", addr)];

    let ready = notify.wait("READY=1", 1).await;
    // READY=1 goes out after the health status changed.
    assert_eq!(
        status_of(&g.sh(book.command("health"), &env).await),
        "SERVING"
    );
    assert!(
        m.log()
            .contains("egg-ready: the agent and all 2 app workers are ready"),
        "{}",
        m.log()
    );
    let before_ready = &notify.seen[..ready];
    assert!(
        before_ready.iter().all(|s| s == "WATCHDOG=1"),
        "only watchdog pings before READY=1: {:?}",
        notify.seen
    );
    // Pings keep coming after READY=1.
    let pings_before = before_ready.len();
    let third = notify.wait("WATCHDOG=1", pings_before + 3).await;
    assert!(third > ready);

    m.signal(Signal::SIGTERM);
    let stopping = notify.wait("STOPPING=1", 1).await;
    assert!(stopping > ready);
    assert_eq!(m.exit().await, Some(0));
    notify.drain();
    let after: Vec<&String> = notify.seen[stopping..]
        .iter()
        .filter(|s| *s == "READY=1")
        .collect();
    assert!(
        after.is_empty(),
        "READY=1 after STOPPING=1: {:?}",
        notify.seen
    );
    assert_eq!(
        notify.seen.iter().filter(|s| *s == "READY=1").count(),
        1,
        "{:?}",
        notify.seen
    );
}

#[tokio::test]
async fn systemd_watchdog_pings_only_for_the_pid_it_names() {
    let Some(g) = grpcurl::grpcurl() else {
        return;
    };
    let book = Cookbook::load();
    let dir = Standalone::dir();
    let mut notify = Notify::bind(&dir.path().join("notify"));
    // WATCHDOG_PID names another process (init): the watchdog is not ours.
    // A 10 ms interval would have pinged at once and many times since.
    let mut m = Standalone::start(
        dir,
        &[
            "--workers",
            "1",
            "--addr-file",
            "{dir}/addr",
            "--token-file",
            "{dir}/admin.token",
        ],
        &[
            ("NOTIFY_SOCKET", "{dir}/notify"),
            ("WATCHDOG_USEC", "20000"),
            ("WATCHDOG_PID", "1"),
        ],
    );
    let addr = addr_file(&mut m).await;
    notify.wait("READY=1", 1).await;
    let env = [("CLUTCH_ADDR", addr)];
    assert_eq!(
        status_of(&g.sh(book.command("health"), &env).await),
        "SERVING"
    );
    m.signal(Signal::SIGTERM);
    notify.wait("STOPPING=1", 1).await;
    assert_eq!(m.exit().await, Some(0));
    notify.drain();
    assert_eq!(notify.seen, vec!["READY=1", "STOPPING=1"]);
}

// ---- master bugs, reproduced (ignored until fixed) ------------------------------------

#[tokio::test]
async fn watch_ends_cleanly_when_the_master_stops() {
    let Some(mut op) = Op::start(Options::new(1)).await else {
        return;
    };
    op.c.wait_all_egg_ready().await;
    let mut watch = op.watch().await;
    assert_eq!(op.cook("shutdown").await.json(), json!({}));
    watch
        .wait_message("the shutdown event", |v| text(v, "kind") == "shutdown")
        .await;
    let (code, stderr) = watch.wait_end().await;
    op.c.master_exit().await;
    let log = op.c.master_stderr();
    assert!(
        code == Some(0) && !log.contains("did not stop within"),
        "the Watch should end with OK as the master stops, and not hold up its exit; \
         grpcurl exited with {code:?}: {stderr}\n--- master log ---\n{log}"
    );
}

#[tokio::test]
async fn children_inherit_neither_the_admin_token_nor_the_notify_socket() {
    let Some(g) = grpcurl::grpcurl() else {
        return;
    };
    let book = Cookbook::load();
    let dir = Standalone::dir();
    let _notify = Notify::bind(&dir.path().join("notify"));
    let token = "env-token-0123456789abcdef";
    let mut m = Standalone::start(
        dir,
        &[
            "--workers",
            "1",
            "--addr-file",
            "{dir}/addr",
            "--token-file",
            "{dir}/admin.token",
        ],
        &[
            ("CLUTCH_ADMIN_TOKEN", token),
            ("NOTIFY_SOCKET", "{dir}/notify"),
            ("WATCHDOG_USEC", "60000000"),
        ],
    );
    let addr = addr_file(&mut m).await;
    m.wait_log("egg-ready: the agent and all 1 app workers are ready")
        .await;
    let token_file = m.path("admin.token");
    assert_eq!(
        std::fs::read_to_string(&token_file).expect("token file"),
        format!("{token}\n")
    );
    let env = [
        ("CLUTCH_ADDR", addr),
        ("CLUTCH_TOKEN_FILE", token_file.display().to_string()),
    ];
    let list = g.sh(book.command("list"), &env).await.json();
    let mut leaks = Vec::new();
    for p in list["processes"].as_array().expect("processes") {
        let pid = num(p, "pid");
        let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("a child's environ");
        for var in environ.split(|&b| b == 0) {
            let var = String::from_utf8_lossy(var);
            for name in [
                "CLUTCH_ADMIN_TOKEN=",
                "NOTIFY_SOCKET=",
                "WATCHDOG_USEC=",
                "WATCHDOG_PID=",
            ] {
                if var.starts_with(name) {
                    leaks.push(format!("{} {pid}: {var}", text(p, "role")));
                }
            }
        }
    }
    assert!(leaks.is_empty(), "children inherited: {leaks:#?}");
}

#[tokio::test]
async fn a_restart_before_egg_ready_does_not_stop_the_cluster() {
    let Some(mut op) = Op::start(Options::new(1).manual_ready()).await else {
        return;
    };
    op.c.ready(AGENT).await;
    op.c.probe(1).await;
    let run = op.cook("restart-worker").await;
    // Either refused (as Reload is before egg-ready) or carried out.
    if run.code == Some(0) {
        // Carried out: a second incarnation comes, or the master gives up.
        op.c.wait_master_log("the restart's outcome", |log| {
            log.contains("launched app worker 1 pid=") && log.contains("incarnation=2")
                || log.contains("before the cluster was ready")
        })
        .await;
        let log = op.c.master_stderr();
        assert!(
            !log.contains("before the cluster was ready"),
            "the restarted worker's exit was taken for a failed start:\n{log}"
        );
        let new = op.c.probe_incarnation(1, 2).await;
        op.c.ready(1).await;
        op.c.wait_for("egg-ready of the new process", |e| {
            e.pid == new.pid && e.kind() == "egg-ready"
        })
        .await;
    } else {
        run.expect_status(UNAVAILABLE.0, UNAVAILABLE.1);
        op.c.ready(1).await;
        op.c.wait_all_egg_ready().await;
    }
    assert_eq!(op.c.exit_status(), None, "the master stopped");
    assert_eq!(op.health().await, "SERVING");
}

#[tokio::test]
async fn admin_calls_answer_while_the_master_is_stopping() {
    let opts = Options::new(2)
        .env("PROBE_SHUTDOWN_DELAY_MS", "1=60000")
        .toml("[timeouts]\nshutdown_ms = 60000");
    let Some(mut op) = Op::start(opts).await else {
        return;
    };
    op.c.wait_all_egg_ready().await;
    let app1 = op.c.pid_of(1).await;
    assert_eq!(op.cook("shutdown").await.json(), json!({}));
    op.c.wait_for("app 1's notice", |e| {
        e.pid == app1 && e.kind() == "shutdown-notice"
    })
    .await;
    let auth = format!("authorization: Bearer {}", op.token());
    let mut outcomes = Vec::new();
    for (method, body) in [
        ("List", "{}"),
        ("Restart", r#"{"worker_id": 2}"#),
        ("Reload", "{}"),
        ("Shutdown", "{}"),
    ] {
        let method = format!("clutch.v1.Admin/{method}");
        // 3 s is far more than an answer takes, far less than the stop.
        let run =
            op.g.run(&[
                "-plaintext",
                "-max-time",
                "3",
                "-H",
                &auth,
                "-d",
                body,
                &op.addr,
                &method,
            ])
            .await;
        outcomes.push((method, run));
    }
    op.c.command_pid(app1, json!({ "cmd": "exit", "code": 0 }))
        .await;
    for (method, run) in &outcomes {
        let status = run.status().map(|(code, _)| code);
        let fine = if method.ends_with("List") {
            run.code == Some(0)
        } else {
            status.as_deref() == Some(UNAVAILABLE.0)
        };
        assert!(
            fine,
            "{method} while stopping: expected an answer (List) or UNAVAILABLE; got {run}"
        );
    }
}

// ---- the cookbook and the unit file ----------------------------------------------------

#[test]
fn every_cookbook_command_is_run_by_a_test() {
    let book = Cookbook::load();
    let source = include_str!("operator.rs");
    let untested: Vec<&str> = book
        .names()
        .into_iter()
        .filter(|name| !source.contains(&format!("\"{name}\"")))
        .collect();
    assert!(
        untested.is_empty(),
        "cookbook commands no test runs: {untested:?}"
    );
    assert!(book.names().len() >= 19, "{:?}", book.names());
}

#[test]
fn the_sample_unit_file_is_a_notify_service_that_lets_the_master_stop_its_children() {
    // Continuation lines joined, as systemd does.
    let unit = include_str!("../docs/clutch.service").replace("\\\n", " ");
    let settings: Vec<(&str, &str)> = unit
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .collect();
    let get = |key: &str| {
        settings
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| *v)
            .unwrap_or_else(|| panic!("docs/clutch.service has no {key}="))
    };
    assert_eq!(get("Type"), "notify");
    assert_eq!(get("NotifyAccess"), "main");
    assert_eq!(get("KillMode"), "mixed");
    assert!(get("ExecStart").contains("master"));
    // systemd expands $NAME in Exec lines itself: a `$` meant for the shell
    // must be written `$$`.
    for (key, value) in settings.iter().filter(|(k, _)| k.starts_with("Exec")) {
        let single = value.replace("$$", "").contains('$');
        assert!(
            !single,
            "{key}: a lone $ would be expanded by systemd: {value}"
        );
    }
    let seconds = |key: &str| -> u64 {
        let v = get(key);
        v.strip_suffix('s')
            .unwrap_or(v)
            .parse()
            .unwrap_or_else(|e| panic!("{key}={v}: {e}"))
    };
    assert!(seconds("WatchdogSec") >= 2);
    // The master's worst-case stop with the default shutdown_ms (5 s): two
    // phases of 2 x shutdown_ms + 2 s, then 2 s for the gRPC server.
    let shutdown_ms = 5_000;
    assert!(
        seconds("TimeoutStopSec") * 1000 > 4 * shutdown_ms + 6_000,
        "TimeoutStopSec must outlast the master's own stop"
    );
    // Startup ends at egg-ready: room for both default start timeouts.
    assert!(seconds("TimeoutStartSec") * 1000 > 30_000 + 30_000);
    // The flags it passes exist.
    let help = std::process::Command::new(support::MASTER)
        .arg("--help")
        .output()
        .expect("master --help");
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in get("ExecStart")
        .split_whitespace()
        .filter(|w| w.starts_with("--"))
    {
        assert!(help.contains(flag), "master has no {flag}: {help}");
    }
}
