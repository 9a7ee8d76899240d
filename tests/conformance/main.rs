//! One conformance suite for every SDK: Rust, Python, Node and Go.
//!
//! The behaviours of the contract are scenarios written as data
//! (`tests/conformance/scenarios/`, documented in `README.md` beside this
//! file). Each scenario runs once per language, against a real master, with
//! that language's conformance worker in every app slot and `clutch-probe`
//! (the Rust SDK) as the controller agent that drives the workers through
//! the messenger itself. Mixed scenarios run once, with one worker per
//! language in the same cluster.
//!
//! A language whose toolchain is missing is skipped with a loud
//! `SKIPPED: <toolchain> not found` line; with
//! `CLUTCH_REQUIRE_ALL_LANGUAGES=1` (set by `.ci/run`) a skip fails instead.
//! The first run installs each language's packages into `<repo>/.deps/`.

mod harness;
mod langs;
mod rust_worker;
mod scenario;

use std::path::PathBuf;

use langs::{Lang, Prepared};
use scenario::Workers;

/// Not a test: the entry point of the Rust conformance worker. The harness
/// runs this test binary with `--exact rust_conformance_worker_process` and
/// `CLUTCH_CONFORMANCE_RUST_WORKER=1`; in a normal test run it does nothing.
#[test]
fn rust_conformance_worker_process() {
    if std::env::var_os(langs::RUST_WORKER_ENV).is_some() {
        rust_worker::main();
    }
}

fn scenarios_dir() -> PathBuf {
    langs::repo().join("tests/conformance/scenarios")
}

/// Reports a language that cannot run here; fails under CLUTCH_REQUIRE_ALL_LANGUAGES=1.
fn skip(lang: Lang, toolchain: &str, scenario: &str) {
    langs::shout(&format!(
        "SKIPPED: {toolchain} not found — the {} part of the conformance suite did not run ({scenario})",
        lang.name()
    ));
    if std::env::var(langs::REQUIRE_ALL).is_ok_and(|v| v.trim() == "1") {
        panic!(
            "{toolchain} not found, and {}=1 requires every language",
            langs::REQUIRE_ALL
        );
    }
}

fn launch(lang: Lang, scenario: &str) -> Option<langs::Launch> {
    match langs::prepare(lang) {
        Prepared::Ready(launch) => Some(launch),
        Prepared::Skipped(toolchain) => {
            skip(lang, &toolchain, scenario);
            None
        }
        Prepared::Failed(why) => panic!("cannot prepare the {} worker: {why}", lang.name()),
    }
}

/// Runs one scenario file with every worker in `lang`.
async fn run(lang: Lang, file: &str) {
    let scenario = scenario::load(&scenarios_dir().join(file));
    assert!(
        !scenario.mixed,
        "{file} is a mixed scenario: list it in mixed!"
    );
    if let Some(launch) = launch(lang, file) {
        scenario::play(&scenario, Workers::One(lang, launch)).await;
    }
}

/// Runs one scenario file with one worker per language.
async fn run_mixed(file: &str) {
    let scenario = scenario::load(&scenarios_dir().join(file));
    assert!(
        scenario.mixed,
        "{file} is not a mixed scenario: list it in scenarios!"
    );
    let mut workers = Vec::new();
    for lang in Lang::ALL {
        match launch(lang, file) {
            Some(l) => workers.push((lang, l)),
            None => return,
        }
    }
    scenario::play(&scenario, Workers::Mixed(workers)).await;
}

macro_rules! language {
    ($module:ident, $lang:expr, $($name:ident => $file:literal),*) => {
        /// Every per-language scenario with this language's workers.
        mod $module {
            $(
                #[tokio::test]
                async fn $name() {
                    super::run($lang, $file).await;
                }
            )*
        }
    };
}

/// Lists the per-language scenarios: one test per (language, scenario).
macro_rules! scenarios {
    ($($name:ident => $file:literal,)*) => {
        const SCENARIOS: &[&str] = &[$($file),*];
        language!(rust, crate::Lang::Rust, $($name => $file),*);
        language!(python, crate::Lang::Python, $($name => $file),*);
        language!(node, crate::Lang::Node, $($name => $file),*);
        language!(go, crate::Lang::Go, $($name => $file),*);
    };
}

/// Lists the mixed scenarios: one test each.
macro_rules! mixed {
    ($($name:ident => $file:literal,)*) => {
        const MIXED: &[&str] = &[$($file),*];
        /// Scenarios with one worker per language in the same cluster.
        mod mixed {
            $(
                #[tokio::test]
                async fn $name() {
                    super::run_mixed($file).await;
                }
            )*
        }
    };
}

scenarios! {
    broadcast_from_the_agent => "routing-broadcast-from-the-agent.toml",
    broadcast_from_an_app => "routing-broadcast-from-an-app.toml",
    send_to_app_from_the_agent => "routing-send-to-app-from-the-agent.toml",
    send_to_app_from_an_app => "routing-send-to-app-from-an-app.toml",
    send_to_agent_from_an_app => "routing-send-to-agent-from-an-app.toml",
    send_to_agent_from_the_agent => "routing-send-to-agent-from-the-agent.toml",
    send_random_from_the_agent => "routing-send-random-from-the-agent.toml",
    send_random_from_an_app => "routing-send-random-from-an-app.toml",
    send_random_with_no_ready_app => "routing-send-random-with-no-ready-app.toml",
    send_to_pid => "routing-send-to-pid.toml",
    not_found_for_an_unknown_pid => "not-found-unknown-pid.toml",
    not_found_for_a_dead_pid => "not-found-dead-pid.toml",
    egg_ready_exactly_once => "egg-ready-exactly-once.toml",
    egg_pids => "egg-pids.toml",
    identity => "identity.toml",
    messages_held_before_ready => "held-before-ready.toml",
    early_messages_wait_for_a_handler => "early-messages-wait-for-a-handler.toml",
    once_handlers => "once.toml",
    shutdown_notice => "shutdown-notice.toml",
    lost_master_connection => "lost-master-connection.toml",
    json_round_trip => "json-round-trip.json",
    empty_payload_is_null => "empty-payload-is-null.toml",
    many_messages_are_acknowledged => "many-messages-acknowledged.toml",
    registration_refused => "registration-refused.toml",
    agent_restart => "agent-restart.toml",
}

mixed! {
    broadcast_reaches_every_language => "mixed-broadcast.json",
    every_language_talks_to_every_other => "mixed-send-to-pid.toml",
    shutdown_notice_in_every_language => "mixed-shutdown.toml",
    egg_ready_waits_for_every_language => "mixed-egg-ready.toml",
}

/// Every scenario file is listed above (so none is silently not run), and
/// every file parses.
#[test]
fn every_scenario_file_is_listed_and_parses() {
    let mut on_disk: Vec<String> = std::fs::read_dir(scenarios_dir())
        .expect("read tests/conformance/scenarios")
        .map(|e| {
            e.expect("a dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|n| n.ends_with(".toml") || n.ends_with(".json"))
        .collect();
    on_disk.sort();
    let mut listed: Vec<String> = SCENARIOS
        .iter()
        .chain(MIXED)
        .map(|s| s.to_string())
        .collect();
    listed.sort();
    assert_eq!(
        on_disk, listed,
        "scenario files on disk vs listed in main.rs"
    );
    for file in SCENARIOS {
        let s = scenario::load(&scenarios_dir().join(file));
        assert!(!s.mixed, "{file}: a mixed scenario listed in scenarios!");
    }
    for file in MIXED {
        let s = scenario::load(&scenarios_dir().join(file));
        assert!(s.mixed, "{file}: listed in mixed! but not `mixed = true`");
    }
}

/// The equality the suite uses for payloads keeps integers exact.
#[test]
fn json_equality_is_exact_for_integers_and_numeric_for_floats() {
    use serde_json::json;
    assert!(scenario::json_eq(&json!(1.0), &json!(1)));
    assert!(scenario::json_eq(
        &json!(9007199254740993u64),
        &json!(9007199254740993u64)
    ));
    assert!(!scenario::json_eq(
        &json!(9007199254740993u64),
        &json!(9007199254740992u64)
    ));
    assert!(!scenario::json_eq(
        &json!({"a": 1}),
        &json!({"a": 1, "b": 2})
    ));
    assert!(scenario::json_eq(
        &json!([{"a": [null, "é"]}]),
        &json!([{"a": [null, "é"]}])
    ));
}
