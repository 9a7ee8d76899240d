'use strict';

/**
 * A Node.js client for the Clutch master: Egg.js's messenger over gRPC.
 *
 * A child process that the master launched (the agent or an app worker)
 * calls `connect()`, which reads the CLUTCH_* environment, opens the
 * `Messenger.Attach` stream and registers:
 *
 *   const clutch = require('clutch-messenger');
 *   const m = await clutch.connect();
 *   m.on('ping', (data, msg) => console.log('ping', data, 'from', msg.from.pid));
 *   await m.ready();
 *   await m.eggReady();                       // every process is up
 *   await m.sendToAgent('pong', { worker: m.identity.workerId });
 *
 * Behaviour (the same in every Clutch SDK):
 *
 * - Listeners run one at a time in arrival order, as `listener(data, message)`
 *   (Egg's messenger passes `data`). `egg-ready`, `egg-pids` (data: a list of
 *   pids) and `agent-start` reach `on` listeners under those names, as in Egg.
 * - Messages that arrive before `ready()` with no listener yet are kept until
 *   a listener for their action is added.
 * - `broadcast`, `sendToApp`, `sendToAgent`, `sendRandom` and `sendTo` return
 *   a promise of the master's receipt; it rejects with an `UndeliveredError`
 *   whose `code` is the gRPC status number (`grpc.status.NOT_FOUND` for a pid
 *   nobody has) and `codeName` its name. `post()` is the fire-and-forget
 *   variant (named so because `emit` means a local event in Node); its
 *   failures go to `onUndelivered()`.
 * - Data is JSON. Integers beyond Number.MAX_SAFE_INTEGER are read as BigInt
 *   and BigInt is sent as a JSON integer, so 64-bit values are not rounded.
 * - On the master's shutdown notice the shutdown hooks run, then the process
 *   exits with code 0; if the stream to the master breaks without a notice,
 *   it exits with code 1 (both unless `exitOnDisconnect: false`).
 * - Handled messages are acknowledged (`Register.acks`), so the master can
 *   re-deliver what a crashed process had not handled to its successor.
 */

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const json = require('./json');

const EGG_READY = 'egg-ready';
const EGG_PIDS = 'egg-pids';
const AGENT_START = 'agent-start';

/** Handled messages after which an ack goes out even if more are waiting. */
const ACK_EVERY = 64n;
/** Messages without a listener kept before ready(); past this the oldest go. */
const EARLY_BUFFER = 4096;

const DEFAULT_PROTO = path.resolve(__dirname, '..', '..', '..', 'proto', 'clutch', 'v1', 'messenger.proto');

const ROLE_NAMES = { ROLE_AGENT: 'agent', ROLE_APP: 'app', ROLE_MASTER: 'master' };
const ROLES = { agent: 'ROLE_AGENT', app: 'ROLE_APP' };
const ROUTES = { broadcast: 'ROUTE_BROADCAST', apps: 'ROUTE_APPS', agent: 'ROUTE_AGENT', random: 'ROUTE_RANDOM' };
const STATUS_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([name, n]) => [n, name]));

// ---- errors ---------------------------------------------------------------

class ClutchError extends Error {
  constructor(message, options) {
    super(message, options);
    this.name = this.constructor.name;
  }
}

/** Connecting or registering failed. `code` is the gRPC status number when
 * the master refused the registration or could not be reached. */
class ConnectError extends ClutchError {
  constructor(message, code) {
    super(message);
    this.code = code;
    this.codeName = code === undefined ? undefined : STATUS_NAMES[code];
  }
}

/** A send failed. */
class SendError extends ClutchError {}

/** The data cannot be encoded as JSON. */
class EncodeError extends SendError {}

/** The stream to the master is closed. */
class DisconnectedError extends SendError {}

/** At least one target did not get the message (see `failures`). */
class UndeliveredError extends SendError {
  constructor(action, delivered, held, failures) {
    const reasons = failures.map((f) => `${f.codeName}: ${f.message}`).join('; ');
    super(`${JSON.stringify(action)} did not reach ${failures.length} target(s): ${reasons}`);
    this.action = action;
    this.delivered = delivered;
    this.held = held;
    this.failures = failures;
    this.code = failures.length ? failures[0].code : undefined;
    this.codeName = failures.length ? failures[0].codeName : undefined;
  }
}

/** A message's data is not valid UTF-8 JSON. */
class DecodeError extends ClutchError {}

// ---- values -----------------------------------------------------------------

/** A message delivered to this process. */
class Message {
  constructor(action, raw, from) {
    /** The action name. */
    this.action = action;
    /** The payload exactly as sent (a Buffer of UTF-8 JSON by convention). */
    this.raw = raw;
    /** The sender: `{ role, pid, workerId }`, role 'agent' | 'app' | 'master'. */
    this.from = from;
  }

  /** The payload decoded from JSON (empty bytes read as null). Throws DecodeError. */
  get data() {
    if (!('_data' in this)) {
      if (this.raw.length === 0) {
        this._data = null;
      } else {
        try {
          this._data = json.parse(new TextDecoder('utf-8', { fatal: true }).decode(this.raw));
        } catch (e) {
          throw new DecodeError(`cannot decode the data of ${JSON.stringify(this.action)}: ${e.message}`, { cause: e });
        }
      }
    }
    return this._data;
  }
}

function undelivered(u) {
  return {
    code: u.code,
    codeName: STATUS_NAMES[u.code] || `CODE_${u.code}`,
    message: u.message,
    pid: u.pid,
    workerId: u.worker_id,
    role: ROLE_NAMES[u.role],
  };
}

function encode(action, data) {
  try {
    return Buffer.from(json.stringify(data), 'utf8');
  } catch (e) {
    throw new EncodeError(`cannot encode the data of ${JSON.stringify(action)} as JSON: ${e.message}`, { cause: e });
  }
}

function sendFrame(id, target, action, data, wantResult) {
  let route;
  let pid = 0;
  if (typeof target === 'number') {
    if (!Number.isInteger(target) || target < 0 || target > 0xffffffff) throw new TypeError(`not a pid: ${target}`);
    route = 'ROUTE_PID';
    pid = target;
  } else if (Object.prototype.hasOwnProperty.call(ROUTES, target)) {
    route = ROUTES[target];
  } else {
    throw new TypeError(`unknown target ${JSON.stringify(target)}: expected one of ${Object.keys(ROUTES).join(', ')} or a pid`);
  }
  return { send: { id, route, pid, action, data, want_result: wantResult } };
}

function log(level, text, error) {
  // One line on stderr, which the master relays into its log under this
  // child's span.
  const suffix = error ? `: ${error && error.stack ? error.stack : error}` : '';
  process.stderr.write(`${level} clutch-messenger: ${text}${suffix}\n`);
}

// ---- the messenger --------------------------------------------------------

/** One child's attachment to the master. Create it with `connect()`. */
class Messenger {
  /** @private */
  constructor(call, channelClient, identity, exitOnDisconnect) {
    this._call = call;
    this._client = channelClient;
    /** Who this process is: `{ role, workerId, pid, masterPid, workers, incarnation }`. */
    this.identity = identity;
    this._exitOnDisconnect = exitOnDisconnect;
    this._nextId = 1;
    this._pending = new Map();
    this._listeners = new Map();
    this._early = [];
    this._buffering = true;
    this._changes = [];
    this._readySent = false;
    this._eggReady = false;
    this._eggReadyWaiters = [];
    this._eggPids = [];
    this._closed = false;
    this._closedWaiters = [];
    this._graceMs = undefined;
    this._shutdownHooks = [];
    this._onUndelivered = null;
    this._handled = 0n;
    this._acked = 0n;
    this._ackScheduled = false;
    this._drainWaiters = [];
  }

  // -- listeners -------------------------------------------------------------

  /** Calls `listener(data, message)` for every message with this action. */
  on(action, listener) {
    return this._subscribe(action, listener, false);
  }

  /** Calls `listener(data, message)` for the next message with this action only. */
  once(action, listener) {
    return this._subscribe(action, listener, true);
  }

  /** Removes a listener added with `on` or `once`. */
  off(action, listener) {
    const list = this._listeners.get(action);
    if (list) {
      const i = list.findIndex((l) => l.fn === listener);
      if (i >= 0) list.splice(i, 1);
    }
    return this;
  }

  /** Replaces the default handling (a warning on stderr) of `post()`s that
   * missed a target: `handler({ id, action, delivered, held, undelivered })`. */
  onUndelivered(handler) {
    this._onUndelivered = handler;
    return this;
  }

  /** Runs `hook()` (it may return a promise) at the master's shutdown notice,
   * before the process exits with code 0. Messages are still dispatched
   * meanwhile; `shutdownGraceMs` tells how long the hooks have before the
   * master sends SIGTERM. */
  onShutdown(hook) {
    this._shutdownHooks.push(hook);
    return this;
  }

  _subscribe(action, fn, once) {
    if (typeof fn !== 'function') throw new TypeError('listener must be a function');
    if (!this._listeners.has(action)) this._listeners.set(action, []);
    this._listeners.get(action).push({ fn, once });
    // Messages kept for this action are replayed before the next frame is
    // dispatched (or at the next microtask), so their order is kept.
    this._change({ replay: action });
    return this;
  }

  _change(change) {
    this._changes.push(change);
    if (this._changes.length === 1) queueMicrotask(() => this._apply());
  }

  _apply() {
    while (this._changes.length) {
      const change = this._changes.shift();
      if (change.stopBuffering) {
        this._buffering = false;
        this._early = [];
      } else {
        const matching = this._early.filter((m) => m.action === change.replay);
        if (matching.length) {
          this._early = this._early.filter((m) => m.action !== change.replay);
          for (const m of matching) this._deliver(m);
        }
      }
    }
  }

  // -- lifecycle --------------------------------------------------------------

  /** Tells the master this process is ready (Egg's app-start / agent-start). Idempotent. */
  async ready() {
    if (this._readySent) return;
    this._readySent = true;
    this._change({ stopBuffering: true });
    await this._write({ ready: {} });
  }

  /** Resolves at `egg-ready` (every process of the cluster is ready); rejects
   * with DisconnectedError if the stream ends first. */
  eggReady() {
    if (this._eggReady) return Promise.resolve();
    if (this._closed) return Promise.reject(new DisconnectedError('the connection to the master closed before egg-ready'));
    return new Promise((resolve, reject) => this._eggReadyWaiters.push({ resolve, reject }));
  }

  /** True once `egg-ready` has arrived. */
  get isEggReady() {
    return this._eggReady;
  }

  /** The pids from the last `egg-pids`. */
  get eggPids() {
    return [...this._eggPids];
  }

  /** Milliseconds announced by the master's shutdown notice, once it came. */
  get shutdownGraceMs() {
    return this._graceMs;
  }

  /** Resolves when the stream to the master has ended. By default the
   * library ends the process itself then (code 1, or code 0 once the shutdown
   * hooks have run), so this resolves only with `exitOnDisconnect: false`. */
  closed() {
    if (this._closed && !this._exitOnDisconnect) return Promise.resolve();
    return new Promise((resolve) => this._closedWaiters.push(resolve));
  }

  /** Ends the stream from this side (only useful with `exitOnDisconnect: false`). */
  async close() {
    this._exitOnDisconnect = false;
    if (!this._closed) this._call.cancel();
    await this.closed();
    this._client.close();
  }

  // -- sends -------------------------------------------------------------------

  /** Egg's `broadcast`: the agent and every app worker, this process included. */
  broadcast(action, data) {
    return this.send('broadcast', action, data);
  }

  /** Egg's `sendToApp`: every app worker (this one too, if it is an app). */
  sendToApp(action, data) {
    return this.send('apps', action, data);
  }

  /** Egg's `sendToAgent`: the agent. */
  sendToAgent(action, data) {
    return this.send('agent', action, data);
  }

  /** Egg's `sendRandom`: from the agent, one ready app worker that the master
   * picks (UNAVAILABLE if none is ready); from an app, the agent. */
  sendRandom(action, data) {
    return this.send('random', action, data);
  }

  /** Egg's `sendTo(pid)`: the one process with this pid; an unknown pid
   * rejects with code NOT_FOUND. */
  sendTo(pid, action, data) {
    return this.send(pid, action, data);
  }

  /**
   * Sends `data` as JSON (a Buffer is sent as it is) to `target` ('broadcast',
   * 'apps', 'agent', 'random' or a pid) and resolves with the master's
   * receipt `{ delivered, held }`. Rejects with UndeliveredError if a target
   * was missed, DisconnectedError if the stream is gone.
   */
  async send(target, action, data) {
    const payload = Buffer.isBuffer(data) ? data : encode(action, data);
    const id = this._nextId++;
    const frame = sendFrame(id, target, action, payload, true);
    const result = new Promise((resolve, reject) => this._pending.set(id, { resolve, reject }));
    try {
      await this._write(frame);
    } catch (e) {
      this._pending.delete(id);
      throw e;
    }
    const r = await result;
    if (r.undelivered.length) {
      throw new UndeliveredError(action, r.delivered, r.held, r.undelivered.map(undelivered));
    }
    return { delivered: r.delivered, held: r.held };
  }

  /** Sends without waiting for the master's account: the fast path for
   * streams of messages. Resolves once the frame is queued (waiting while the
   * stream is congested). A missed target goes to `onUndelivered()`. */
  async post(target, action, data) {
    const payload = Buffer.isBuffer(data) ? data : encode(action, data);
    await this._write(sendFrame(this._nextId++, target, action, payload, false));
  }

  _write(frame) {
    if (this._closed) return Promise.reject(new DisconnectedError('the connection to the master is closed'));
    // Frames keep their order whatever write() returns; a false return means
    // the stream is congested, and the caller waits for it to drain.
    if (this._call.write(frame)) return Promise.resolve();
    return new Promise((resolve, reject) => {
      if (this._drainWaiters.length === 0) {
        this._call.once('drain', () => {
          for (const w of this._drainWaiters.splice(0)) w.resolve();
        });
      }
      this._drainWaiters.push({ resolve, reject });
    });
  }

  // -- internals ---------------------------------------------------------------

  _frame(frame) {
    this._apply();
    switch (frame.kind) {
      case 'message': {
        const m = frame.message;
        const from = { role: ROLE_NAMES[m.from_role] || 'unknown', pid: m.from_pid, workerId: m.from_worker_id };
        this._deliver(new Message(m.action, m.data, from));
        const seq = BigInt(m.seq);
        if (seq > this._handled) this._handled = seq;
        this._ackSoon();
        break;
      }
      case 'egg_ready':
        this._eggReady = true;
        for (const w of this._eggReadyWaiters.splice(0)) w.resolve();
        this._deliver(this._synthetic(EGG_READY, 'null'));
        break;
      case 'egg_pids':
        this._eggPids = [...frame.egg_pids.pids];
        this._deliver(this._synthetic(EGG_PIDS, JSON.stringify(this._eggPids)));
        break;
      case 'agent_start':
        this._deliver(this._synthetic(AGENT_START, 'null'));
        break;
      case 'send_result':
        this._sendResult(frame.send_result);
        break;
      case 'shutdown':
        this._shutdown(frame.shutdown.grace_ms);
        break;
      case 'welcome':
        log('WARN', 'ignoring a second welcome from the master');
        break;
      default:
        break;
    }
  }

  _synthetic(action, text) {
    return new Message(action, Buffer.from(text), { role: 'master', pid: this.identity.masterPid, workerId: 0 });
  }

  _deliver(message) {
    const list = this._listeners.get(message.action);
    if (!list || list.length === 0) {
      if (this._buffering) {
        if (this._early.length >= EARLY_BUFFER) {
          log('WARN', `no listener before ready(): early-message buffer full, dropping the oldest (${message.action})`);
          this._early.shift();
        }
        this._early.push(message);
      }
      return;
    }
    let data;
    try {
      data = message.data;
    } catch (e) {
      log('WARN', `${e.message}; listeners get undefined`);
    }
    for (const l of [...list]) {
      if (l.once) {
        const i = list.indexOf(l);
        if (i < 0) continue;
        list.splice(i, 1);
      }
      this._call_listener(l.fn, data, message);
    }
  }

  _call_listener(fn, ...args) {
    try {
      const r = fn(...args);
      if (r && typeof r.then === 'function') {
        r.then(undefined, (e) => log('ERROR', 'an async listener failed', e));
      }
    } catch (e) {
      log('ERROR', 'a listener threw; dispatch goes on', e);
    }
  }

  _sendResult(r) {
    const id = Number(r.id);
    const waiter = this._pending.get(id);
    if (waiter) {
      this._pending.delete(id);
      waiter.resolve(r);
      return;
    }
    if (!r.undelivered.length) return;
    const result = {
      id,
      action: r.action,
      delivered: r.delivered,
      held: r.held,
      undelivered: r.undelivered.map(undelivered),
    };
    if (this._onUndelivered) {
      this._call_listener(this._onUndelivered, result);
    } else {
      const reasons = result.undelivered.map((u) => `${u.codeName}: ${u.message}`).join('; ');
      log('WARN', `${JSON.stringify(result.action)} did not reach every target: ${reasons}`);
    }
  }

  _ackSoon() {
    if (this._handled - this._acked >= ACK_EVERY) {
      this._ack();
    } else if (!this._ackScheduled) {
      // Once the frames that arrived together are handled: caught up.
      this._ackScheduled = true;
      setImmediate(() => {
        this._ackScheduled = false;
        this._ack();
      });
    }
  }

  _ack() {
    if (this._closed || this._handled <= this._acked) return;
    this._acked = this._handled;
    this._call.write({ ack: { seq: this._handled.toString() } });
  }

  async _shutdown(graceMs) {
    this._graceMs = graceMs;
    const hooks = this._shutdownHooks.splice(0);
    for (const hook of hooks) {
      try {
        await hook();
      } catch (e) {
        log('ERROR', 'a shutdown hook failed', e);
      }
    }
    if (this._exitOnDisconnect) {
      log('INFO', 'the master is stopping the cluster; exiting');
      process.exit(0);
    }
  }

  _ended(error) {
    if (this._closed) return;
    this._closed = true;
    const gone = () => new DisconnectedError('the connection to the master closed');
    for (const w of this._pending.values()) w.reject(gone());
    this._pending.clear();
    for (const w of this._eggReadyWaiters.splice(0)) w.reject(gone());
    for (const w of this._drainWaiters.splice(0)) w.reject(gone());
    if (!this._exitOnDisconnect) {
      for (const resolve of this._closedWaiters.splice(0)) resolve();
      return;
    }
    if (this._graceMs !== undefined) {
      // The hooks are still running; the master's SIGTERM ends them if they overrun.
      log('INFO', 'the master closed the stream during shutdown');
      return;
    }
    log('ERROR', `lost the connection to the master (${error ? error.message : 'stream ended'}); exiting`);
    process.exit(1);
  }
}

function env(name) {
  const value = process.env[name];
  if (value === undefined) {
    throw new ConnectError(`environment variable ${name} is not set: is this process running under the Clutch master?`);
  }
  return value;
}

/**
 * Connects to the master and registers. Options (all optional):
 * - `addr`, `secret`, `role`: default to CLUTCH_ADDR, CLUTCH_SECRET, CLUTCH_ROLE;
 * - `expectRole`: 'agent' or 'app': refuse to run in the other role;
 * - `acks` (true), `exitOnDisconnect` (true), `timeoutMs` (10000);
 * - `protoPath`: the messenger.proto to load (default: the repository's).
 * Rejects with ConnectError.
 */
async function connect(options = {}) {
  const addr = options.addr ?? env('CLUTCH_ADDR');
  const secret = options.secret ?? env('CLUTCH_SECRET');
  const role = options.role ?? env('CLUTCH_ROLE');
  if (!Object.prototype.hasOwnProperty.call(ROLES, role)) {
    throw new ConnectError(`CLUTCH_ROLE=${JSON.stringify(role)}: expected "agent" or "app"`);
  }
  if (options.expectRole && options.expectRole !== role) {
    throw new ConnectError(`this program is a ${options.expectRole}, but the master launched it as ${role}`);
  }
  const definition = protoLoader.loadSync(options.protoPath || DEFAULT_PROTO, {
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  const { Messenger: Service } = grpc.loadPackageDefinition(definition).clutch.v1;
  const client = new Service(addr, grpc.credentials.createInsecure(), {
    'grpc.max_receive_message_length': -1,
  });
  const deadline = Date.now() + (options.timeoutMs ?? 10000);
  const call = client.Attach({ deadline: Infinity });

  const welcome = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      cleanup();
      call.cancel();
      reject(new ConnectError(`no answer from the master at ${addr} in time`, grpc.status.DEADLINE_EXCEEDED));
    }, Math.max(0, deadline - Date.now()));
    const onData = (frame) => {
      cleanup();
      if (frame.kind === 'welcome') resolve(frame.welcome);
      else reject(new ConnectError('protocol error: the first frame from the master was not `welcome`'));
    };
    const onError = (e) => {
      cleanup();
      reject(new ConnectError(`the master refused the registration (${STATUS_NAMES[e.code]}): ${e.details}`, e.code));
    };
    const onEnd = () => {
      cleanup();
      reject(new ConnectError('protocol error: the master closed the stream without a welcome'));
    };
    function cleanup() {
      clearTimeout(timer);
      call.off('data', onData);
      call.off('error', onError);
      call.off('end', onEnd);
    }
    call.on('data', onData);
    call.on('error', onError);
    call.on('end', onEnd);
    // The master answers the call only after it has read this frame.
    call.write({ register: { secret, role: ROLES[role], acks: options.acks ?? true } });
  }).catch((e) => {
    client.close();
    throw e;
  });

  const identity = {
    role: ROLE_NAMES[welcome.role] || role,
    workerId: welcome.worker_id,
    pid: welcome.pid,
    masterPid: welcome.master_pid,
    workers: welcome.workers,
    incarnation: welcome.incarnation,
  };
  const m = new Messenger(call, client, identity, options.exitOnDisconnect ?? true);
  call.on('data', (frame) => m._frame(frame));
  call.on('error', (e) => m._ended(e));
  call.on('end', () => m._ended(null));
  return m;
}

module.exports = {
  connect,
  Messenger,
  Message,
  ClutchError,
  ConnectError,
  SendError,
  EncodeError,
  DisconnectedError,
  UndeliveredError,
  DecodeError,
  EGG_READY,
  EGG_PIDS,
  AGENT_START,
  status: grpc.status,
  json,
};
