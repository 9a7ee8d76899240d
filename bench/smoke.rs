//! The benchmark harness in smoke mode, as part of the test suite, so it
//! cannot rot: a few thousand messages per scenario, checked for sane and
//! complete results (every figure there and positive, every delivery
//! counted exactly), never for performance.
//!
//! The Egg column runs only when `bench/egg/node_modules` is installed (the
//! test never installs it) and `CLUTCH_BENCH_SMOKE_EGG=1`; otherwise the
//! report must say why it is missing.

#[path = "harness/mod.rs"]
mod harness;

use harness::cluster::System;
use harness::{EggPolicy, Options};

#[test]
fn smoke_run_produces_complete_results() {
    let mut opts = Options::smoke();
    opts.command = "cargo test -p master --test bench_smoke".into();
    let with_egg = std::env::var("CLUTCH_BENCH_SMOKE_EGG").is_ok_and(|v| v == "1");
    if !with_egg {
        opts.egg =
            EggPolicy::Skip("the smoke test runs Egg only with CLUTCH_BENCH_SMOKE_EGG=1".into());
    }
    let dir = tempfile::tempdir().expect("temp dir for results");
    opts.results_dir = Some(dir.path().to_owned());

    let (report, written) = harness::run(&opts).expect("the harness runs");
    let markdown = report.markdown();
    assert!(
        report.failures.is_empty(),
        "the smoke run had failures:\n{}\n{markdown}",
        report.failures.join("\n")
    );

    // The JSON is there and reads back with every row.
    let path = written.expect("results were written");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read results"))
            .expect("results are JSON");
    assert_eq!(
        json["rows"].as_array().map(Vec::len),
        Some(report.rows.len())
    );

    // Every Clutch figure is there and positive. The Python worker rows are
    // the exception: the smoke run does not prepare a Python environment
    // (the conformance suite owns that), so those rows say "not run".
    for row in &report.rows {
        if row.clutch.is_none() && row.key.contains("python") {
            assert!(
                row.clutch_note.is_some(),
                "the Python row {:?} must say why it has no figure",
                row.key
            );
            continue;
        }
        let stat = row
            .clutch
            .as_ref()
            .unwrap_or_else(|| panic!("no Clutch figure for {:?}\n{markdown}", row.key));
        assert!(
            stat.n >= 1 && stat.min > 0.0 && stat.max.is_finite(),
            "Clutch figure for {:?} is not sane: {stat:?}\n{markdown}",
            row.key
        );
    }

    // Every delivery was counted, none lost or out of order.
    let systems: Vec<System> = if report.egg.ran {
        vec![System::Clutch, System::Egg]
    } else {
        vec![System::Clutch]
    };
    for s in systems {
        let c = &report.correctness["systems"][match s {
            System::Clutch => "clutch",
            System::Egg => "egg",
        }];
        let expected = c["expected"].as_u64().unwrap();
        // Fan-out + fan-in + the larger fan-in (Clutch) + the scaling runs.
        assert!(expected > 0, "{s:?}: no deliveries expected?\n{markdown}");
        assert_eq!(c["counted"], c["expected"], "{s:?}: deliveries\n{markdown}");
        assert_eq!(c["lost"], 0, "{s:?}: lost\n{markdown}");
        assert_eq!(c["out_of_order"], 0, "{s:?}: out of order\n{markdown}");
        assert_eq!(c["gaps"], 0, "{s:?}: gaps\n{markdown}");
    }
    let clutch_expected = report.correctness["systems"]["clutch"]["expected"]
        .as_u64()
        .unwrap();
    let w = u64::from(opts.workers);
    let scale: u64 = opts
        .scale_workers
        .iter()
        .map(|&n| (opts.scale_deliveries / u64::from(n)).max(1) * u64::from(n))
        .sum();
    assert_eq!(
        clutch_expected,
        opts.runs as u64 * (opts.fanout_messages * w + opts.fanin_messages * w)
            + opts.fanin_messages * opts.large_fanin_factor * w
            + opts.runs as u64 * scale,
        "every flood was counted\n{markdown}"
    );

    // The Egg column is either there or says why not.
    if report.egg.ran {
        for key in ["fanout_rate", "fanin_rate", "rtt_p50", "peak_rss_fanin"] {
            let row = report.rows.iter().find(|r| r.key == key).unwrap();
            assert!(
                row.egg.as_ref().is_some_and(|s| s.median > 0.0),
                "no Egg figure for {key}\n{markdown}"
            );
        }
    } else {
        let reason = report.egg.reason.as_deref().unwrap_or("");
        assert!(
            !reason.is_empty(),
            "the Egg column must say why it is missing"
        );
        assert!(markdown.contains(reason), "{markdown}");
    }
    eprintln!("{markdown}");
}
