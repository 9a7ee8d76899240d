//! The master's routing core on its own: what one message costs the router
//! and its edge, without gRPC, sockets or other processes.
//!
//! `cargo bench -p master --bench router [-- --messages N --runs R]`
//!
//! Each scenario drives the real `Router` through the hub's `Shared` (the
//! lock, the actions, the wake-ups) the way the streams do: a sender routes
//! a batch, every receiver drains it in batches of 256 and acknowledges it,
//! and so on. It prints nanoseconds per delivery (median and min–max of the
//! runs). The figures isolate the master's own share of the message path
//! from the loopback and the children's, and are steady enough to compare
//! builds; run it under `valgrind --tool=callgrind` for instruction counts.

#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clutch::types::SendRequest;
use clutch::{Outbound, Registration, Role, Target};
use master::hub::Shared;
use master::router::{Conn, Limits, Router, AGENT};

/// Messages per burst before the receivers drain: about what a flooding
/// sender gets in before the master's streams run.
const BURST: usize = 256;

struct Cluster {
    shared: std::sync::Arc<Shared>,
    conns: Vec<Conn>,
    /// Keeps the lifecycle channel open.
    _lifecycle: tokio::sync::mpsc::UnboundedReceiver<master::router::Action>,
}

fn cluster(workers: usize, acks: bool) -> Cluster {
    let mut router = Router::new(1, workers, Limits::default(), 7);
    let mut out = Vec::new();
    for slot in 0..=workers {
        router.spawned(slot, 100 + slot as u32, format!("s{slot}"), &mut out);
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let shared = Shared::new(router, tx, Duration::from_millis(500));
    let mut conns = Vec::new();
    for slot in 0..=workers {
        let reg = Registration {
            secret: format!("s{slot}"),
            role: Some(if slot == AGENT {
                Role::Agent
            } else {
                Role::App
            }),
            acks,
        };
        let (_, conn) = shared
            .with_router(|r, out| r.register(&reg, out))
            .expect("registers");
        shared.with_router(|r, out| r.ready(conn, out));
        conns.push(conn);
    }
    let c = Cluster {
        shared,
        conns,
        _lifecycle: rx,
    };
    for slot in 0..=workers {
        c.drain(slot, acks);
    }
    c
}

impl Cluster {
    fn send(&self, from: usize, target: Target, data: &Bytes) {
        let req = SendRequest {
            id: 0,
            target: Some(target),
            action: "bench".into(),
            data: data.clone(),
            want_result: false,
        };
        let conn = self.conns[from];
        self.shared.with_router(|r, out| r.send(conn, req, out));
    }

    /// Drains everything queued for `slot`, as its stream would; returns the
    /// messages written.
    fn drain(&self, slot: usize, acks: bool) -> usize {
        let conn = self.conns[slot];
        let mut buf = VecDeque::with_capacity(BURST);
        let mut messages = 0;
        let mut last = 0;
        loop {
            self.shared
                .with_router(|r, out| r.drain(conn, &mut buf, BURST, out));
            if buf.is_empty() {
                break;
            }
            for frame in buf.drain(..) {
                if let Outbound::Message { seq, .. } = frame {
                    messages += 1;
                    last = seq;
                }
            }
        }
        if acks && last > 0 {
            self.shared.with_router(|r, out| r.ack(conn, last, out));
        }
        messages
    }
}

/// One run: nanoseconds per delivery.
fn run(workers: usize, fan_in: bool, acks: bool, messages: usize) -> f64 {
    let c = cluster(workers, acks);
    let data = Bytes::from(format!(
        "{{\"seq\":123456,\"w\":1,\"pad\":\"{}\"}}",
        "x".repeat(30)
    ));
    let mut deliveries = 0;
    let started = Instant::now();
    let mut sent = 0;
    while sent < messages {
        if fan_in {
            for _ in 0..BURST / workers {
                for app in 1..=workers {
                    c.send(app, Target::Agent, &data);
                    sent += 1;
                }
            }
            deliveries += c.drain(AGENT, acks);
        } else {
            for _ in 0..BURST {
                c.send(AGENT, Target::Apps, &data);
            }
            sent += BURST;
            for app in 1..=workers {
                deliveries += c.drain(app, acks);
            }
        }
    }
    started.elapsed().as_nanos() as f64 / deliveries as f64
}

fn main() {
    let mut messages = 200_000;
    let mut runs = 7;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut number = |name: &str| -> usize {
            args.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} takes a number"))
        };
        match arg.as_str() {
            "--messages" => messages = number("--messages"),
            "--runs" => runs = number("--runs"),
            // `cargo bench` passes --bench; nothing else is expected.
            "--bench" => {}
            other => {
                eprintln!("unknown option {other:?}; usage: router [--messages N] [--runs R]");
                std::process::exit(2);
            }
        }
    }
    println!("| scenario | ns per delivery, median | min–max |");
    println!("| --- | --- | --- |");
    let scenarios = [
        ("agent → 2 apps, acks", 2, false, true),
        ("agent → 2 apps, no acks", 2, false, false),
        ("2 apps → agent, acks", 2, true, true),
        ("agent → 32 apps, acks", 32, false, true),
    ];
    for (name, workers, fan_in, acks) in scenarios {
        let mut figures: Vec<f64> = (0..runs)
            .map(|_| run(workers, fan_in, acks, messages))
            .collect();
        figures.sort_by(f64::total_cmp);
        println!(
            "| {name} | {:.0} | {:.0}–{:.0} |",
            figures[figures.len() / 2],
            figures[0],
            figures[figures.len() - 1]
        );
    }
}
