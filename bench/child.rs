//! `clutch-bench-child`: the minimal Rust SDK agent / app worker that the
//! benchmark harness (`bench/harness`) runs under the real master.
//!
//! It speaks the same side-channel protocol as the Egg app in
//! `bench/egg/lib/bench.js`, so the harness drives both systems with the
//! same commands: a TCP connection to `BENCH_CONTROL` carrying
//! newline-delimited JSON (see that file for the list of events and
//! commands). Measurement stays out of the hot path: a receiver does one
//! uncontended lock, a sequence check and a counter per message, and only
//! talks to the harness when a count is complete.
//!
//! Environment, besides the `CLUTCH_*` set from the master:
//!
//! | variable | meaning |
//! | --- | --- |
//! | `BENCH_CONTROL` | `host:port` of the harness (required) |
//! | `BENCH_ACKS` | `0`/`1`: override the SDK's acknowledgement default |
//! | `BENCH_SEND_BUFFER` | override the SDK's send queue length |

#![forbid(unsafe_code)]

use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, Context as _};
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use clutch::{Client, ConnectOptions, Message, Role, Target};

/// Pads `{"seq":123456,"w":1,"pad":"…"}` to 64 bytes (the Egg app uses the
/// same string).
const PAD: &str = "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx";

type Events = mpsc::UnboundedSender<Value>;

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .without_time()
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    // One thread, as a small worker would run: the dispatcher, the control
    // loop and the ping responder share it.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("bench-child: cannot start the tokio runtime: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = runtime.block_on(run()) {
        eprintln!("bench-child: {e:#}");
        std::process::exit(1);
    }
}

/// What a receiver is counting: one expectation at a time.
#[derive(Default)]
struct Expect {
    id: u64,
    action: String,
    count: u64,
    received: u64,
    out_of_order: u64,
    gaps: u64,
    /// Next expected sequence number per sender pid: a few senders, so a
    /// short list searched in order beats hashing each message's pid.
    next: Vec<(u32, u64)>,
    done: bool,
}

impl Expect {
    fn summary(&self, event: &str) -> Value {
        json!({
            "event": event,
            "id": self.id,
            "received": self.received,
            "lost": self.count.saturating_sub(self.received),
            "out_of_order": self.out_of_order,
            "gaps": self.gaps,
        })
    }
}

type Counter = Arc<Mutex<Option<Expect>>>;

/// Counts one message; reports `done` when the expected count is reached.
fn count(counter: &Counter, events: &Events, action: &str, m: &Message) {
    let mut guard = counter.lock().unwrap_or_else(|p| p.into_inner());
    let Some(e) = guard.as_mut() else { return };
    if e.action != action {
        return;
    }
    let seq = parse_seq(&m.data).unwrap_or(u64::MAX);
    let at = match e.next.iter().position(|(pid, _)| *pid == m.from.pid) {
        Some(at) => at,
        None => {
            e.next.push((m.from.pid, 0));
            e.next.len() - 1
        }
    };
    let next = &mut e.next[at].1;
    if seq < *next {
        e.out_of_order += 1;
    } else {
        e.gaps += seq - *next;
        *next = seq + 1;
    }
    e.received += 1;
    if e.received == e.count && !e.done {
        e.done = true;
        let _ = events.send(e.summary("done"));
    }
}

/// Reads `seq` from `{"seq":N,...}` without a JSON parser (the layout is
/// ours); anything else goes through serde_json.
fn parse_seq(data: &[u8]) -> Option<u64> {
    const PREFIX: &[u8] = b"{\"seq\":";
    if let Some(rest) = data.strip_prefix(PREFIX) {
        let mut n: u64 = 0;
        let mut digits = 0;
        for &b in rest {
            if b.is_ascii_digit() {
                n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
                digits += 1;
            } else {
                break;
            }
        }
        if digits > 0 {
            return Some(n);
        }
    }
    serde_json::from_slice::<Value>(data).ok()?["seq"].as_u64()
}

/// Builds the ~64-byte JSON payloads of a flood. A sender's own cost is
/// part of every throughput figure, so payloads are written into one shared
/// slab (one allocation per few hundred messages instead of a `String` and
/// its reallocations each) with hand-written digits instead of `format!`.
#[derive(Default)]
struct Payloads {
    /// Carved into payloads; each keeps its part alive by reference count.
    slab: BytesMut,
}

impl Payloads {
    /// The payload of message `seq` from worker `w` (and `pid`, for round trips).
    fn next(&mut self, seq: u64, w: u32, pid: Option<u32>) -> Bytes {
        if self.slab.capacity() < 256 {
            self.slab = BytesMut::with_capacity(64 * 1024);
        }
        let b = &mut self.slab;
        b.put_slice(b"{\"seq\":");
        put_decimal(b, seq);
        b.put_slice(b",\"w\":");
        put_decimal(b, u64::from(w));
        if let Some(pid) = pid {
            b.put_slice(b",\"pid\":");
            put_decimal(b, u64::from(pid));
        }
        b.put_slice(b",\"pad\":\"");
        b.put_slice(PAD.as_bytes());
        b.put_slice(b"\"}");
        b.split().freeze()
    }
}

fn put_decimal(b: &mut BytesMut, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    b.put_slice(&digits[i..]);
}

async fn run() -> anyhow::Result<()> {
    let control = std::env::var("BENCH_CONTROL").context("BENCH_CONTROL is not set")?;
    let role: Role = std::env::var(clutch::env::ROLE)
        .context("CLUTCH_ROLE is not set")?
        .parse()
        .map_err(|e| anyhow::anyhow!("CLUTCH_ROLE: {e}"))?;
    let mut options = ConnectOptions::from_env(role)?;
    if let Ok(v) = std::env::var("BENCH_ACKS") {
        options.acks = v.trim() == "1";
    }
    if let Ok(v) = std::env::var("BENCH_SEND_BUFFER") {
        options.send_buffer = v.trim().parse().context("BENCH_SEND_BUFFER")?;
    }
    let client: Client = match role {
        Role::Agent => agent_sdk::Agent::connect_with(options)
            .await
            .context("the agent could not register")?
            .client()
            .clone(),
        Role::App => worker_sdk::Worker::connect_with(options)
            .await
            .context("the app worker could not register")?
            .client()
            .clone(),
        other => bail!("CLUTCH_ROLE={other}: expected agent or app"),
    };
    let me = client.identity();

    let socket = TcpStream::connect(&control)
        .await
        .with_context(|| format!("cannot reach the harness at {control}"))?;
    socket.set_nodelay(true)?;
    let (read, write) = socket.into_split();
    let (events, mut events_rx) = mpsc::unbounded_channel::<Value>();
    tokio::spawn(async move {
        let mut out = BufWriter::new(write);
        while let Some(event) = events_rx.recv().await {
            let mut line = event.to_string();
            line.push('\n');
            if out.write_all(line.as_bytes()).await.is_err() {
                break;
            }
            // Flush once the queue is empty, so a burst is one write.
            if events_rx.is_empty() && out.flush().await.is_err() {
                break;
            }
        }
    });
    let _ = events.send(json!({
        "event": "hello",
        "role": me.role.as_str(),
        "worker_id": me.worker_id,
        "pid": me.pid,
    }));

    // A fire-and-forget send that missed a target is a lost message for the
    // benchmark: say so at once (the harness stops waiting), and count them.
    let undelivered = Arc::new(std::sync::atomic::AtomicU64::new(0));
    {
        let (undelivered, events) = (undelivered.clone(), events.clone());
        client.on_undelivered(move |result| {
            let missed = result.undelivered.len() as u64;
            if undelivered.fetch_add(missed, std::sync::atomic::Ordering::Relaxed) == 0 {
                let first = result
                    .undelivered
                    .first()
                    .map(|u| format!("{:?}: {}", u.code, u.message));
                let _ = events.send(
                    json!({ "event": "undelivered", "action": &*result.action, "first": first }),
                );
            }
        });
    }

    // Handlers before ready(), so nothing is missed.
    let counter: Counter = Arc::new(Mutex::new(None));
    for action in ["bench-fanout", "bench-fanin"] {
        let (counter, events) = (counter.clone(), events.clone());
        client.on(action, move |m| count(&counter, &events, action, &m));
    }
    {
        let events = events.clone();
        client.on(clutch::client::EGG_READY, move |_| {
            let _ = events.send(json!({ "event": "egg-ready" }));
        });
    }
    // Every process answers pings to the sender's pid (only the agent gets
    // them): `bench-ping` with a fire-and-forget emit, `bench-ping-confirm`
    // with a send that waits for the master's SendResult.
    for (action, confirm) in [("bench-ping", false), ("bench-ping-confirm", true)] {
        let mut pings = client.subscribe(action);
        let client = client.clone();
        tokio::spawn(async move {
            while let Some(ping) = pings.next().await {
                let target = Target::Pid(ping.from.pid);
                let sent = if confirm {
                    client
                        .send_bytes(target, "bench-pong", ping.data)
                        .await
                        .map(|_| ())
                } else {
                    client.emit_bytes(target, "bench-pong", ping.data).await
                };
                if sent.is_err() {
                    break;
                }
            }
        });
    }
    let mut pongs = client.subscribe("bench-pong");
    client.ready().await?;
    let mut payloads = Payloads::default();

    let mut lines = BufReader::new(read).lines();
    while let Some(line) = lines.next_line().await? {
        if line.trim().is_empty() {
            continue;
        }
        let cmd: Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => {
                let _ = events.send(
                    json!({ "event": "error", "message": format!("bad command {line:?}: {e}") }),
                );
                continue;
            }
        };
        let id = cmd["id"].as_u64().unwrap_or(0);
        let n = cmd["count"].as_u64().unwrap_or(0);
        match cmd["cmd"].as_str().unwrap_or("") {
            "expect" => {
                let e = Expect {
                    id,
                    action: cmd["action"].as_str().unwrap_or("").to_owned(),
                    count: n,
                    done: n == 0,
                    ..Expect::default()
                };
                let finished = (n == 0).then(|| e.summary("done"));
                *counter.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                let _ = events.send(json!({ "event": "armed", "id": id }));
                if let Some(done) = finished {
                    let _ = events.send(done);
                }
            }
            "status" => {
                let guard = counter.lock().unwrap_or_else(|p| p.into_inner());
                let status = match guard.as_ref() {
                    Some(e) if e.id == id => e.summary("status"),
                    _ => {
                        json!({ "event": "status", "id": id, "received": 0, "lost": null, "out_of_order": 0, "gaps": 0 })
                    }
                };
                let _ = events.send(status);
            }
            "flood" => {
                let target = match cmd["route"].as_str() {
                    Some("apps") => Target::Apps,
                    Some("agent") => Target::Agent,
                    other => bail!("flood route {other:?}"),
                };
                let action = cmd["action"].as_str().unwrap_or("bench-flood").to_owned();
                let start = Instant::now();
                for seq in 0..n {
                    client
                        .emit_bytes(target, &action, payloads.next(seq, me.worker_id, None))
                        .await?;
                }
                let _ = events.send(json!({
                    "event": "sent", "id": id, "count": n,
                    "elapsed_us": start.elapsed().as_secs_f64() * 1e6,
                    "undelivered_so_far": undelivered.load(std::sync::atomic::Ordering::Relaxed),
                }));
            }
            "rtt" => {
                let warmup = cmd["warmup"].as_u64().unwrap_or(0);
                let peer = u32::try_from(cmd["peer"].as_u64().unwrap_or(0))?;
                let confirm = cmd["confirm"].as_bool().unwrap_or(false);
                let mut samples = Vec::with_capacity(usize::try_from(n)?);
                for seq in 0..warmup + n {
                    let data = payloads.next(seq, me.worker_id, Some(me.pid));
                    let start = Instant::now();
                    if confirm {
                        let (sent, pong) = tokio::join!(
                            client.send_bytes(Target::Pid(peer), "bench-ping-confirm", data),
                            pongs.next()
                        );
                        sent?;
                        pong.context("pong stream ended")?;
                    } else {
                        client
                            .emit_bytes(Target::Pid(peer), "bench-ping", data)
                            .await?;
                        pongs.next().await.context("pong stream ended")?;
                    }
                    if seq >= warmup {
                        samples.push(start.elapsed().as_secs_f64() * 1e6);
                    }
                }
                let mut event = percentiles(&mut samples);
                event["event"] = json!("rtt");
                event["id"] = json!(id);
                let _ = events.send(event);
            }
            other => {
                let _ = events.send(
                    json!({ "event": "error", "message": format!("unknown command {other:?}") }),
                );
            }
        }
    }
    // The harness closed the side channel; the master will stop us.
    client.closed().await;
    Ok(())
}

fn percentiles(samples: &mut [f64]) -> Value {
    samples.sort_by(f64::total_cmp);
    let n = samples.len();
    let at = |p: f64| {
        if n == 0 {
            0.0
        } else {
            let rank = (p * n as f64).ceil() as usize;
            samples[rank.clamp(1, n) - 1]
        }
    };
    let mean = if n == 0 {
        0.0
    } else {
        samples.iter().sum::<f64>() / n as f64
    };
    json!({
        "count": n,
        "p50_us": at(0.5),
        "p90_us": at(0.9),
        "p99_us": at(0.99),
        "p999_us": at(0.999),
        "max_us": samples.last().copied().unwrap_or(0.0),
        "mean_us": mean,
    })
}
