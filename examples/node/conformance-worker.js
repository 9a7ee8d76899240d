'use strict';

// The Node.js conformance worker: carries out any conformance scenario.
//
// The conformance suite (tests/conformance/) launches this program as an app
// worker. A controller agent drives it through the messenger itself:
// commands arrive as messages with action `conformance.command`; everything
// this worker observes goes back to the agent as `conformance.event`
// messages, in the order it happened. The protocol is described in
// tests/conformance/README.md; the Rust, Python and Go workers speak it too.
//
// Environment, besides the master's CLUTCH_*:
//   CONFORMANCE_ACTIONS       comma-separated actions to report (`on`)
//   CONFORMANCE_MANUAL_READY  1: call ready() only on the `ready` command

const clutch = require('./lib/clutch');

const COMMAND = 'conformance.command';
const EVENT = 'conformance.event';

function messageEvent(data, msg, handler, decodeError) {
  return {
    event: 'message',
    handler,
    action: msg.action,
    data: decodeError ? { decode_error: decodeError.message, raw: msg.raw.toString('utf8') } : data,
    from_role: msg.from.role,
    from_pid: msg.from.pid,
    from_worker_id: msg.from.workerId,
  };
}

function errorEvent(id, e) {
  return {
    event: 'sent',
    id,
    ok: false,
    // The canonical gRPC number, from the library's own error.
    code: typeof e.code === 'number' ? e.code : null,
    code_name: e.codeName || e.name,
    error_type: e.name,
    message: e.message,
  };
}

/** A FIFO of async jobs, run one at a time. */
function serial() {
  let tail = Promise.resolve();
  return (job) => {
    tail = tail.then(job).catch((e) => console.error('conformance worker:', e));
    return tail;
  };
}

async function main() {
  const m = await clutch.connect({ expectRole: 'app' });
  const reports = serial();
  // Numbered, so that the controller can drop a report that the master
  // re-delivered to a restarted agent (at-least-once across an agent's
  // incarnations, with acks).
  let reported = 0;
  const report = (event) => reports(() => m.post('agent', EVENT, { ...event, n: ++reported }));

  const watch = (action, kind) => {
    const listener = (data, msg) => {
      let decodeError;
      try {
        msg.data; // eslint-disable-line no-unused-expressions
      } catch (e) {
        decodeError = e;
      }
      report(messageEvent(data, msg, kind, decodeError));
    };
    if (kind === 'once') m.once(action, listener);
    else m.on(action, listener);
  };

  // Listeners first, before ready(): nothing the master sends is missed.
  for (const action of (process.env.CONFORMANCE_ACTIONS || '').split(',').map((a) => a.trim()).filter(Boolean)) {
    watch(action, 'on');
  }
  m.on(clutch.EGG_READY, () => report({ event: 'egg-ready' }));
  m.on(clutch.EGG_PIDS, (pids) => report({ event: 'egg-pids', pids }));
  m.on(clutch.AGENT_START, () => report({ event: 'agent-start' }));
  m.onUndelivered((r) =>
    report({
      event: 'undelivered',
      action: r.action,
      codes: r.undelivered.map((u) => u.code),
      messages: r.undelivered.map((u) => u.message),
      delivered: r.delivered,
      held: r.held,
    }),
  );
  const commands = serial();
  m.on(COMMAND, (cmd) => commands(() => execute(cmd)));
  // Awaited, so the agent has it before this process exits.
  m.onShutdown(() => m.sendToAgent(EVENT, { event: 'shutdown', grace_ms: m.shutdownGraceMs }));

  const id = m.identity;
  report({
    event: 'hello',
    lang: 'node',
    role: id.role,
    worker_id: id.workerId,
    pid: id.pid,
    master_pid: id.masterPid,
    workers: id.workers,
    incarnation: id.incarnation,
  });

  async function send(cmd) {
    const { id: cmdId, route, action } = cmd;
    const count = cmd.count ?? 1;
    const confirm = cmd.confirm ?? true;
    const raw = cmd.raw != null ? Buffer.from(cmd.raw, 'utf8') : null;
    const target = route === 'pid' ? Number(cmd.pid) : route;
    const named = {
      broadcast: (a, d) => m.broadcast(a, d),
      apps: (a, d) => m.sendToApp(a, d),
      agent: (a, d) => m.sendToAgent(a, d),
      random: (a, d) => m.sendRandom(a, d),
      pid: (a, d) => m.sendTo(target, a, d),
    };
    for (let i = 0; i < count; i++) {
      const data = cmd.seq ? { seq: i, data: cmd.data } : cmd.data;
      if (!confirm) {
        try {
          await m.post(target, action, raw ?? data);
        } catch (e) {
          report(errorEvent(cmdId, e));
          return;
        }
        continue;
      }
      try {
        const receipt = raw ? await m.send(target, action, raw) : await named[route](action, data);
        report({ event: 'sent', id: cmdId, ok: true, delivered: receipt.delivered, held: receipt.held });
      } catch (e) {
        if (!(e instanceof clutch.SendError)) throw e;
        report(errorEvent(cmdId, e));
      }
    }
    if (!confirm) report({ event: 'sent', id: cmdId, ok: true, count });
  }

  // Counts a high-volume action's messages here, checking their `seq`, so
  // that a flood needs no report per message.
  const tallies = new Map();
  function tally(action) {
    const t = { count: 0, in_order: true, first_out_of_order: null };
    tallies.set(action, t);
    m.on(action, (data) => {
      const seq = data !== null && typeof data === 'object' ? data.seq : undefined;
      if (seq !== t.count && t.in_order) {
        t.in_order = false;
        t.first_out_of_order = { index: t.count, data };
      }
      t.count += 1;
    });
  }

  async function execute(cmd) {
    try {
      switch (cmd.op) {
        case 'ready':
          await m.ready();
          report({ event: 'ready-sent', id: cmd.id });
          break;
        case 'send':
          await send(cmd);
          break;
        case 'on':
        case 'once':
          watch(cmd.action, cmd.op);
          report({ event: 'subscribed', id: cmd.id, action: cmd.action, handler: cmd.op });
          break;
        case 'tally':
          tally(cmd.action);
          report({ event: 'subscribed', id: cmd.id, action: cmd.action, handler: 'tally' });
          break;
        case 'tally-report': {
          const t = tallies.get(cmd.action) || { count: 0, in_order: true, first_out_of_order: null };
          report({ event: 'tally', id: cmd.id, action: cmd.action, ...t });
          break;
        }
        case 'connect': {
          // A second registration, expected to be refused: the code comes
          // from the library's ConnectError.
          const secret = cmd.secret === 'own' ? process.env.CLUTCH_SECRET : cmd.secret ?? '';
          try {
            const other = await clutch.connect({ secret, role: cmd.role ?? 'app', exitOnDisconnect: false });
            await other.close();
            report({ event: 'connect', id: cmd.id, ok: true });
          } catch (e) {
            if (!(e instanceof clutch.ConnectError)) throw e;
            report({ event: 'connect', id: cmd.id, ok: false, code: e.code ?? null, code_name: e.codeName ?? null, message: e.message });
          }
          break;
        }
        case 'state': {
          const ident = m.identity;
          report({
            event: 'state',
            id: cmd.id,
            egg_ready: m.isEggReady,
            egg_pids: m.eggPids,
            role: ident.role,
            worker_id: ident.workerId,
            pid: ident.pid,
            master_pid: ident.masterPid,
            workers: ident.workers,
            incarnation: ident.incarnation,
          });
          break;
        }
        case 'exit':
          process.exit(cmd.code ?? 0);
          break;
        default:
          report({ event: 'error', id: cmd.id, message: `unknown op ${JSON.stringify(cmd.op)}` });
      }
    } catch (e) {
      report({ event: 'error', id: cmd && cmd.id, message: String(e && e.stack ? e.stack : e) });
    }
  }

  if ((process.env.CONFORMANCE_MANUAL_READY || '').trim() !== '1') await m.ready();
  // The library exits the process at shutdown or when the master goes.
}

main().catch((e) => {
  console.error('conformance worker:', e);
  process.exit(1);
});
