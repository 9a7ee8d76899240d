'use strict';

// The benchmark side of an Egg agent or app worker: the same side-channel
// protocol as Clutch's Rust bench child (bench/child.rs), so the harness
// drives both systems with the same commands.
//
// The process connects to the harness at BENCH_CONTROL (host:port) and speaks
// newline-delimited JSON:
//
//   child -> harness
//     {"event":"hello","role":"agent"|"app","worker_id":N,"pid":P}
//     {"event":"egg-ready"}
//     {"event":"armed","id":K}                    an `expect` is in place
//     {"event":"done","id":K,"received":N,"lost":0,"out_of_order":0,"gaps":0}
//     {"event":"status","id":K,...same fields}   answer to `status`
//     {"event":"sent","id":K,"count":N,"elapsed_us":T}   a flood's send loop ended
//     {"event":"rtt","id":K,"count":N,"p50_us":..,"p90_us":..,"p99_us":..,"p999_us":..,"max_us":..,"mean_us":..}
//     {"event":"error","message":"..."}
//
//   harness -> child
//     {"cmd":"expect","id":K,"action":A,"count":N}   count N messages of action A
//     {"cmd":"flood","id":K,"route":"apps"|"agent","action":A,"count":N}
//     {"cmd":"rtt","id":K,"count":N,"warmup":W,"peer":PID}
//     {"cmd":"status","id":K}
//
// Payloads are about 64 bytes of JSON: {"seq":123456,"w":1,"pad":"xxx…"}.
// Receivers check the sequence per sender: `out_of_order` counts messages
// that went backwards (reordered or duplicated), `gaps` counts skipped
// numbers, `lost` is what never arrived.

const net = require('net');

// Pads {"seq":123456,"w":1,"pad":"…"} to 64 bytes of JSON (the Rust child
// uses the same string).
const PAD = 'x'.repeat(35);

function attach({ role, workerId, messenger }) {
  const control = process.env.BENCH_CONTROL;
  if (!control) {
    // Not under the harness (e.g. someone ran the app by hand): do nothing.
    return;
  }
  const [ host, port ] = splitHostPort(control);
  const socket = net.connect({ host, port });
  socket.setNoDelay(true);
  const emit = obj => socket.write(JSON.stringify(obj) + '\n');
  emit({ event: 'hello', role, worker_id: workerId, pid: process.pid });

  // ---- receiving: one expectation at a time ------------------------------
  let expect = null;
  const count = (action, d) => {
    const e = expect;
    if (e === null || e.action !== action) return;
    const from = d.w;
    const next = e.next.get(from) || 0;
    if (d.seq < next) {
      e.outOfOrder++;
    } else {
      if (d.seq > next) e.gaps += d.seq - next;
      e.next.set(from, d.seq + 1);
    }
    e.received++;
    if (e.received === e.count && !e.done) {
      e.done = true;
      emit(Object.assign({ event: 'done' }, summary(e)));
    }
  };
  messenger.on('bench-fanout', d => count('bench-fanout', d));
  messenger.on('bench-fanin', d => count('bench-fanin', d));

  // ---- round trips ----------------------------------------------------------
  // The agent answers every ping to the pid in it; an app waits for its pong.
  let pongWaiter = null;
  messenger.on('bench-ping', d => messenger.sendTo(d.pid, 'bench-pong', d));
  messenger.on('bench-pong', d => {
    const waiter = pongWaiter;
    pongWaiter = null;
    if (waiter) waiter(d);
  });

  messenger.on('egg-ready', () => emit({ event: 'egg-ready' }));

  // ---- commands -------------------------------------------------------------
  const handle = async cmd => {
    switch (cmd.cmd) {
      case 'expect':
        expect = {
          id: cmd.id, action: cmd.action, count: cmd.count,
          received: 0, outOfOrder: 0, gaps: 0, next: new Map(), done: false,
        };
        emit({ event: 'armed', id: cmd.id });
        if (cmd.count === 0) {
          expect.done = true;
          emit(Object.assign({ event: 'done' }, summary(expect)));
        }
        break;
      case 'status':
        if (expect !== null && expect.id === cmd.id) {
          emit(Object.assign({ event: 'status' }, summary(expect)));
        } else {
          emit({ event: 'status', id: cmd.id, received: 0, lost: null, out_of_order: 0, gaps: 0 });
        }
        break;
      case 'flood': {
        // Egg has no backpressure: this loop finishes long before the last
        // delivery, and the backlog waits in memory (this process's IPC
        // write queue, then the master's). That is the behaviour measured.
        const send = cmd.route === 'apps'
          ? (a, d) => messenger.sendToApp(a, d)
          : (a, d) => messenger.sendToAgent(a, d);
        const t0 = process.hrtime.bigint();
        for (let seq = 0; seq < cmd.count; seq++) {
          send(cmd.action, { seq, w: workerId, pad: PAD });
        }
        const elapsed = Number(process.hrtime.bigint() - t0) / 1000;
        emit({ event: 'sent', id: cmd.id, count: cmd.count, elapsed_us: elapsed });
        break;
      }
      case 'rtt': {
        const total = cmd.warmup + cmd.count;
        const samples = new Float64Array(cmd.count);
        for (let seq = 0; seq < total; seq++) {
          const pong = new Promise(resolve => { pongWaiter = resolve; });
          const t0 = process.hrtime.bigint();
          messenger.sendTo(cmd.peer, 'bench-ping', { seq, w: workerId, pid: process.pid, pad: PAD });
          await pong;
          const us = Number(process.hrtime.bigint() - t0) / 1000;
          if (seq >= cmd.warmup) samples[seq - cmd.warmup] = us;
        }
        emit(Object.assign({ event: 'rtt', id: cmd.id }, percentiles(samples)));
        break;
      }
      default:
        emit({ event: 'error', message: `unknown command ${JSON.stringify(cmd)}` });
    }
  };

  let buffered = '';
  let queue = Promise.resolve();
  socket.setEncoding('utf8');
  socket.on('data', chunk => {
    buffered += chunk;
    let nl;
    while ((nl = buffered.indexOf('\n')) >= 0) {
      const line = buffered.slice(0, nl);
      buffered = buffered.slice(nl + 1);
      if (!line.trim()) continue;
      let cmd;
      try {
        cmd = JSON.parse(line);
      } catch (e) {
        emit({ event: 'error', message: `bad command line ${line}: ${e.message}` });
        continue;
      }
      // One command at a time, in order, as the Rust child does.
      queue = queue.then(() => handle(cmd)).catch(e => emit({ event: 'error', message: String(e && e.stack || e) }));
    }
  });
  socket.on('error', err => {
    console.error('[bench] side channel error: %s', err.message);
  });
}

function summary(e) {
  return {
    id: e.id,
    received: e.received,
    lost: Math.max(0, e.count - e.received),
    out_of_order: e.outOfOrder,
    gaps: e.gaps,
  };
}

function percentiles(samples) {
  const sorted = Float64Array.from(samples).sort();
  const n = sorted.length;
  const at = p => (n === 0 ? 0 : sorted[Math.min(n - 1, Math.max(0, Math.ceil(p * n) - 1))]);
  let sum = 0;
  for (const s of sorted) sum += s;
  return {
    count: n,
    p50_us: at(0.5),
    p90_us: at(0.9),
    p99_us: at(0.99),
    p999_us: at(0.999),
    max_us: n ? sorted[n - 1] : 0,
    mean_us: n ? sum / n : 0,
  };
}

function splitHostPort(addr) {
  const i = addr.lastIndexOf(':');
  return [ addr.slice(0, i), Number(addr.slice(i + 1)) ];
}

module.exports = { attach, PAD };
