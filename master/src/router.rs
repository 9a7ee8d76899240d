//! The master's routing core: a pure state machine.
//!
//! Events go in as method calls (a child was spawned, registered, became
//! ready, sent a message, detached, exited) and the decisions come out as
//! [`Action`]s pushed onto a caller-supplied vector, plus frames queued in the
//! slots' [`Mailbox`]es. The router touches no socket, process or clock, so
//! every rule here (routing, the egg-ready barrier, egg-pids, mailboxes) is
//! tested by driving events in `#[cfg(test)]` below. The I/O lives in
//! `hub.rs` (streams) and `cluster.rs` (processes and signals).
//!
//! Slots: slot 0 is the agent, slots 1..=N are the app workers, and an app's
//! worker id is its slot number. A slot outlives its processes; each process
//! that holds it is one *incarnation*.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use clutch::types::{RegisterError, SendRequest};
use clutch::{
    Code, Delivery, Identity, Origin, Outbound, Registration, Role, SendResult, Target, Undelivered,
};

use crate::mailbox::{Bounds, Full, Mailbox, ReplyTo, Undeliverable, CONTROL_CAPACITY};

/// A slot's index: 0 is the agent, `n` is app worker `n`.
pub type SlotId = usize;

/// The agent's slot.
pub const AGENT: SlotId = 0;

/// One attached stream: a slot and the incarnation that attached it. Events
/// from a stream whose incarnation is no longer current are ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Conn {
    /// The slot.
    pub slot: SlotId,
    /// The incarnation that registered the stream.
    pub incarnation: u32,
}

/// Limits on what a child may send, and on each mailbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Longest action name, in bytes.
    pub max_action_bytes: usize,
    /// Largest payload, in bytes.
    pub max_payload_bytes: usize,
    /// Each slot's mailbox bounds.
    pub mailbox: Bounds,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_action_bytes: 256,
            max_payload_bytes: 1 << 20,
            mailbox: Bounds {
                messages: 16 * 1024,
                bytes: 16 << 20,
            },
        }
    }
}

/// A decision for the edges to carry out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// The slot's stream has frames to write, or must end.
    Wake(SlotId),
    /// The slot's mailbox fell below the low watermark: senders waiting on
    /// it for flow control may go on.
    Relieved(SlotId),
    /// A process registered its stream.
    Registered {
        /// Its slot.
        slot: SlotId,
        /// Its pid.
        pid: u32,
        /// Its incarnation.
        incarnation: u32,
    },
    /// A process declared itself ready.
    Ready {
        /// Its slot.
        slot: SlotId,
        /// Its pid.
        pid: u32,
        /// Its incarnation.
        incarnation: u32,
    },
    /// The agent is ready for the first time: launch the app workers.
    LaunchApps,
    /// The barrier passed: egg-ready went to every process.
    ClusterReady,
    /// A child ended before the cluster was ready: the start failed.
    StartupFailed(SlotId),
    /// A child ended after the cluster was ready.
    Lost(SlotId),
    /// A receiver stopped reading: a sender waited for it in vain.
    Stalled(SlotId),
    /// A process's stream ended while the process may still run; it can
    /// never register again, so it is of no use to the cluster any more.
    Detached {
        /// Its slot.
        slot: SlotId,
        /// Its pid.
        pid: u32,
    },
    /// A frame was refused by a full mailbox (it is counted there too).
    Dropped {
        /// Whose mailbox.
        slot: SlotId,
        /// Which bound refused it.
        full: Full,
        /// The action of the refused message, or the kind of control frame.
        what: Arc<str>,
    },
}

/// Where a slot's current process is in its life.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Phase {
    /// No process was launched for the slot yet.
    Idle,
    /// A process runs with this secret but has not registered.
    Spawned { pid: u32, secret: String },
    /// The process registered; `ready` once it said so; `acks` when it
    /// acknowledges handled messages.
    Attached {
        pid: u32,
        secret: String,
        ready: bool,
        acks: bool,
    },
    /// The process's stream ended; the process may still be running.
    Detached { pid: u32, secret: String },
    /// The process exited.
    Exited { pid: u32 },
    /// The slot passed its restart limit and stays empty; `pid` was its
    /// last process.
    Failed { pid: u32 },
}

impl Phase {
    fn pid(&self) -> Option<u32> {
        match self {
            Phase::Idle => None,
            Phase::Spawned { pid, .. }
            | Phase::Attached { pid, .. }
            | Phase::Detached { pid, .. }
            | Phase::Exited { pid }
            | Phase::Failed { pid } => Some(*pid),
        }
    }

    fn is_ready(&self) -> bool {
        matches!(self, Phase::Attached { ready: true, .. })
    }
}

/// One agent or app worker position in the cluster.
#[derive(Debug)]
struct Slot {
    /// Agent or app.
    role: Role,
    /// 0 for the agent, 1..=N for apps.
    worker_id: u32,
    /// Processes launched for this slot so far.
    incarnation: u32,
    /// The current incarnation's state.
    phase: Phase,
    /// Whether the current incarnation got egg-ready (exactly once each).
    egg_ready_sent: bool,
    /// Frames waiting for this slot's stream.
    mailbox: Mailbox,
    /// A flow-control wait on this mailbox timed out: senders stop waiting
    /// for it (its overflow is reported instead) until it drains.
    stalled: bool,
    /// It passed the high watermark: senders may be waiting for it to drain.
    congested: bool,
    /// Messages handed to this slot's mailbox.
    delivered: u64,
    /// Frames refused by this slot's mailbox.
    dropped: u64,
    /// Frames written to the slot's streams so far: flow control tells a
    /// slow receiver (this moves) from a stuck one (it does not).
    drained: u64,
}

impl Slot {
    fn name(&self) -> String {
        match self.role {
            Role::App => format!("app worker {}", self.worker_id),
            _ => self.role.to_string(),
        }
    }
}

/// A read-only view of one slot, for logs and listings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotView {
    /// Agent or app.
    pub role: Role,
    /// 0 for the agent, 1..=N for apps.
    pub worker_id: u32,
    /// The current process's pid, if one was launched.
    pub pid: Option<u32>,
    /// Processes launched for this slot so far.
    pub incarnation: u32,
    /// Frames waiting in its mailbox.
    pub pending: usize,
    /// Messages handed to its mailbox.
    pub delivered: u64,
    /// Frames its mailbox refused.
    pub dropped: u64,
    /// idle, spawned, registered, ready, detached, exited or failed.
    pub state: &'static str,
}

/// The state machine.
#[derive(Debug)]
pub struct Router {
    /// Sender of injected messages and of `egg-*` frames.
    master_pid: u32,
    /// The agent at 0, then the apps.
    slots: Vec<Slot>,
    /// The current pid of every slot with a live or unreaped process.
    pids: HashMap<u32, SlotId>,
    /// Recently replaced pids and their slots, newest last, so that a
    /// `sendTo` an old pid can say the process exited. Bounded.
    retired: VecDeque<(u32, SlotId)>,
    /// Payload, action and mailbox limits.
    limits: Limits,
    /// The barrier passed once; later incarnations get their own egg-ready.
    cluster_ready: bool,
    /// The apps were launched (after the agent's first ready).
    apps_launched: bool,
    /// No new registrations; children were told to stop.
    shutting_down: bool,
    /// xorshift state for `sendRandom`; seeded by the edge.
    rng: u64,
}

impl Router {
    /// A router for one agent and `workers` app workers.
    pub fn new(master_pid: u32, workers: usize, limits: Limits, seed: u64) -> Router {
        let slot = |role, worker_id| Slot {
            role,
            worker_id,
            incarnation: 0,
            phase: Phase::Idle,
            egg_ready_sent: false,
            mailbox: Mailbox::default(),
            stalled: false,
            congested: false,
            delivered: 0,
            dropped: 0,
            drained: 0,
        };
        let mut slots = vec![slot(Role::Agent, 0)];
        slots.extend((1..=workers).map(|id| slot(Role::App, id as u32)));
        Router {
            master_pid,
            slots,
            pids: HashMap::new(),
            retired: VecDeque::new(),
            limits,
            cluster_ready: false,
            apps_launched: false,
            shutting_down: false,
            rng: seed | 1,
        }
    }

    /// The number of app workers.
    pub fn workers(&self) -> usize {
        self.slots.len() - 1
    }

    /// A human name for the slot ("agent", "app worker 2").
    pub fn slot_name(&self, slot: SlotId) -> String {
        self.slots[slot].name()
    }

    /// Snapshot of every slot.
    pub fn view(&self) -> Vec<SlotView> {
        self.slots
            .iter()
            .map(|s| SlotView {
                role: s.role,
                worker_id: s.worker_id,
                pid: s.phase.pid(),
                incarnation: s.incarnation,
                pending: s.mailbox.len(),
                delivered: s.delivered,
                dropped: s.dropped,
                state: match s.phase {
                    Phase::Idle => "idle",
                    Phase::Spawned { .. } => "spawned",
                    Phase::Attached { ready: false, .. } => "registered",
                    Phase::Attached { ready: true, .. } => "ready",
                    Phase::Detached { .. } => "detached",
                    Phase::Exited { .. } => "exited",
                    Phase::Failed { .. } => "failed",
                },
            })
            .collect()
    }

    /// The incarnation of `slot`'s current (or last) process.
    pub fn incarnation(&self, slot: SlotId) -> u32 {
        self.slots[slot].incarnation
    }

    /// The incarnation number the next process of `slot` will have.
    pub fn next_incarnation(&self, slot: SlotId) -> u32 {
        self.slots[slot].incarnation + 1
    }

    /// A process was launched for `slot` with this pid and secret.
    pub fn spawned(&mut self, slot: SlotId, pid: u32, secret: String, out: &mut Vec<Action>) {
        self.end_incarnation(slot, out);
        if let Some(old) = self.slots[slot].phase.pid() {
            self.pids.remove(&old);
            if self.retired.len() == RETIRED_PIDS {
                self.retired.pop_front();
            }
            self.retired.push_back((old, slot));
        }
        let s = &mut self.slots[slot];
        s.incarnation += 1;
        s.phase = Phase::Spawned { pid, secret };
        s.egg_ready_sent = false;
        self.pids.insert(pid, slot);
    }

    /// True when `slot`'s process of this incarnation said it is ready.
    pub fn is_ready(&self, slot: SlotId, incarnation: u32) -> bool {
        let s = &self.slots[slot];
        s.incarnation == incarnation && s.phase.is_ready()
    }

    /// The slot's current process is gone or cut off: hand its unacked
    /// messages to the next one, and tell the senders of `sendTo(pid)`
    /// messages it never got.
    fn end_incarnation(&mut self, slot: SlotId, out: &mut Vec<Action>) {
        let lost = self.slots[slot].mailbox.end_incarnation();
        let name = self.slots[slot].name();
        for u in lost {
            let why = format!(
                "pid {} ({name}) exited before handling the message",
                u.pid.unwrap_or(0)
            );
            self.report(slot, u, Code::NotFound, why, out);
        }
    }

    /// Tells the sender of a message that it will not be delivered.
    fn report(
        &mut self,
        slot: SlotId,
        u: Undeliverable,
        code: Code,
        message: String,
        out: &mut Vec<Action>,
    ) {
        let s = &self.slots[slot];
        let undelivered = Undelivered {
            code,
            message,
            pid: u.pid.or(s.phase.pid()).unwrap_or(0),
            worker_id: s.worker_id,
            role: Some(s.role),
        };
        let sender = Conn {
            slot: u.reply.sender,
            incarnation: u.reply.sender_incarnation,
        };
        // A sender that is gone has no one left to tell.
        if self.current(sender).is_some() {
            let result = SendResult {
                id: u.reply.send_id,
                action: u.action,
                delivered: 0,
                held: 0,
                undelivered: vec![undelivered],
            };
            let _ = self.push(sender.slot, Outbound::SendResult(result), None, None, out);
        }
    }

    /// A stream presents a registration. On success the slot is attached and
    /// frames held for it are ready to be written after the welcome.
    pub fn register(
        &mut self,
        reg: &Registration,
        out: &mut Vec<Action>,
    ) -> Result<(Identity, Conn), RegisterError> {
        if self.shutting_down {
            return Err(RegisterError::ShuttingDown);
        }
        if reg.secret.is_empty() {
            return Err(RegisterError::MissingSecret);
        }
        let claimed = reg.role.ok_or(RegisterError::MissingRole)?;
        let found = self.slots.iter().position(|s| match &s.phase {
            Phase::Spawned { secret, .. }
            | Phase::Attached { secret, .. }
            | Phase::Detached { secret, .. } => {
                constant_time_eq(secret.as_bytes(), reg.secret.as_bytes())
            }
            _ => false,
        });
        let slot = found.ok_or(RegisterError::UnknownSecret)?;
        let workers = self.workers() as u32;
        let s = &mut self.slots[slot];
        let Phase::Spawned { pid, secret } = &s.phase else {
            return Err(RegisterError::SecretUsed {
                role: s.role,
                slot: s.name(),
            });
        };
        if claimed != s.role {
            return Err(RegisterError::RoleMismatch {
                expected: s.role,
                claimed,
            });
        }
        let pid = *pid;
        s.phase = Phase::Attached {
            pid,
            secret: secret.clone(),
            ready: false,
            acks: reg.acks,
        };
        let identity = Identity {
            role: s.role,
            worker_id: s.worker_id,
            pid,
            master_pid: self.master_pid,
            workers,
            incarnation: s.incarnation,
        };
        let conn = Conn {
            slot,
            incarnation: s.incarnation,
        };
        out.push(Action::Registered {
            slot,
            pid,
            incarnation: identity.incarnation,
        });
        if s.role == Role::App {
            let agent = self.agent_pids();
            let _ = self.push(slot, Outbound::EggPids(agent), None, None, out);
        }
        if !self.slots[slot].mailbox.is_empty() {
            out.push(Action::Wake(slot));
        }
        Ok((identity, conn))
    }

    /// The stream's process declared itself ready.
    pub fn ready(&mut self, conn: Conn, out: &mut Vec<Action>) {
        let Some(s) = self.current(conn) else { return };
        let Phase::Attached { ready, .. } = &mut s.phase else {
            return;
        };
        if *ready {
            return; // a repeated `ready` changes nothing
        }
        *ready = true;
        let role = s.role;
        out.push(Action::Ready {
            slot: conn.slot,
            pid: s.phase.pid().unwrap_or(0),
            incarnation: conn.incarnation,
        });
        match role {
            Role::Agent if !self.apps_launched => {
                self.apps_launched = true;
                out.push(Action::LaunchApps);
            }
            Role::Agent => {
                // The agent came back: tell it who is up, and tell the apps,
                // as Egg does.
                self.tell_agent_app_pids(out);
                let pid = self.slots[AGENT].phase.pid().unwrap_or(0);
                let pids = self.agent_pids();
                for app in 1..self.slots.len() {
                    if self.is_attached(app) {
                        let _ = self.push(app, Outbound::AgentStart { pid }, None, None, out);
                        let _ = self.push(app, Outbound::EggPids(pids.clone()), None, None, out);
                    }
                }
            }
            _ => self.tell_agent_app_pids(out),
        }
        if self.cluster_ready {
            self.send_egg_ready(conn.slot, out);
        } else if self.slots.iter().all(|s| s.phase.is_ready()) {
            self.cluster_ready = true;
            for slot in 0..self.slots.len() {
                self.send_egg_ready(slot, out);
            }
            out.push(Action::ClusterReady);
        }
    }

    /// Routes one send from an attached stream. Returns the attached slots
    /// whose mailboxes are past the high watermark, which the sender should
    /// wait on before sending more (flow control).
    pub fn send(&mut self, conn: Conn, req: SendRequest, out: &mut Vec<Action>) -> Vec<SlotId> {
        let mut congested = Vec::new();
        let Some(sender) = self.current(conn) else {
            return congested;
        };
        if !matches!(sender.phase, Phase::Attached { .. }) {
            return congested;
        }
        let from = Origin {
            role: sender.role,
            pid: sender.phase.pid().unwrap_or(0),
            worker_id: sender.worker_id,
        };
        let want_result = req.want_result;
        let result = self.route(from, Some(conn), req, &mut congested, out);
        if want_result || !result.undelivered.is_empty() {
            let _ = self.push(conn.slot, Outbound::SendResult(result), None, None, out);
            // A sender that is sent results faster than it reads them is
            // slowed like any receiver, so that no result (above all no
            // report of a refusal) is ever dropped for lack of room.
            let s = &mut self.slots[conn.slot];
            if !s.stalled && s.mailbox.controls() >= CONTROL_HIGH && !congested.contains(&conn.slot)
            {
                s.congested = true;
                congested.push(conn.slot);
            }
        }
        congested
    }

    /// Routes a message an operator injected, as sent by the master itself.
    pub fn inject(
        &mut self,
        target: Target,
        action: String,
        data: Bytes,
        out: &mut Vec<Action>,
    ) -> SendResult {
        let from = Origin {
            role: Role::Master,
            pid: self.master_pid,
            worker_id: 0,
        };
        let req = SendRequest {
            id: 0,
            target: Some(target),
            action: action.into(),
            data,
            want_result: true,
        };
        // An operator is not slowed by flow control; a full mailbox is
        // reported in the result instead.
        self.route(from, None, req, &mut Vec::new(), out)
    }

    /// Checks a send, queues it for every target and accounts for it.
    /// `sender` is the stream to tell if a `sendTo` message later misses its
    /// process; `congested` collects receivers past the high watermark.
    fn route(
        &mut self,
        from: Origin,
        sender: Option<Conn>,
        req: SendRequest,
        congested: &mut Vec<SlotId>,
        out: &mut Vec<Action>,
    ) -> SendResult {
        let action: Arc<str> = req.action;
        let mut result = SendResult {
            id: req.id,
            action: action.clone(),
            delivered: 0,
            held: 0,
            undelivered: Vec::new(),
        };
        match self.check(&action, &req.data, req.target, from.role) {
            Err(u) => result.undelivered.push(u),
            Ok(targets) => {
                let delivery = Delivery {
                    action: action.clone(),
                    data: req.data,
                    from,
                };
                let reply = sender.map(|conn| ReplyTo {
                    sender: conn.slot,
                    sender_incarnation: conn.incarnation,
                    send_id: req.id,
                });
                let pinned = match req.target {
                    Some(Target::Pid(pid)) => Some(pid),
                    _ => None,
                };
                for slot in targets {
                    if let Phase::Failed { .. } = self.slots[slot].phase {
                        let s = &self.slots[slot];
                        result.undelivered.push(Undelivered {
                            code: Code::Unavailable,
                            message: format!(
                                "{} has failed: it passed its restart limit and stays empty",
                                s.name()
                            ),
                            pid: 0,
                            worker_id: s.worker_id,
                            role: Some(s.role),
                        });
                        continue;
                    }
                    let attached = self.is_attached(slot);
                    let frame = Outbound::Message {
                        seq: 0,
                        delivery: delivery.clone(),
                    };
                    match self.push(slot, frame, reply, pinned, out) {
                        Ok(()) => {
                            self.slots[slot].delivered += 1;
                            if attached {
                                result.delivered += 1;
                                let high = self.high_watermark();
                                let s = &mut self.slots[slot];
                                if !s.stalled && s.mailbox.messages() >= high {
                                    s.congested = true;
                                    congested.push(slot);
                                }
                            } else {
                                result.held += 1;
                            }
                        }
                        Err(full) => result.undelivered.push(self.undelivered_full(slot, full)),
                    }
                }
            }
        }
        result
    }

    /// Validates a send and resolves its target slots.
    fn check(
        &mut self,
        action: &str,
        data: &Bytes,
        target: Option<Target>,
        from: Role,
    ) -> Result<Vec<SlotId>, Undelivered> {
        let invalid = |code, message: String| Undelivered {
            code,
            message,
            pid: 0,
            worker_id: 0,
            role: None,
        };
        if action.is_empty() {
            return Err(invalid(Code::InvalidArgument, "the action is empty".into()));
        }
        if action.len() > self.limits.max_action_bytes {
            return Err(invalid(
                Code::InvalidArgument,
                format!(
                    "the action is {} bytes long; the limit is {} bytes",
                    action.len(),
                    self.limits.max_action_bytes
                ),
            ));
        }
        if data.len() > self.limits.max_payload_bytes {
            return Err(invalid(
                Code::ResourceExhausted,
                format!(
                    "the payload is {} bytes; the limit is {} bytes",
                    data.len(),
                    self.limits.max_payload_bytes
                ),
            ));
        }
        let Some(target) = target else {
            return Err(invalid(
                Code::InvalidArgument,
                "the send has no route: set one of broadcast, apps, agent, random or pid".into(),
            ));
        };
        let apps = 1..self.slots.len();
        Ok(match target {
            Target::Broadcast => (0..self.slots.len()).collect(),
            Target::Apps => apps.collect(),
            Target::Agent => vec![AGENT],
            Target::Random if from == Role::App => vec![AGENT],
            Target::Random => {
                let ready: Vec<SlotId> = apps.filter(|&s| self.slots[s].phase.is_ready()).collect();
                if ready.is_empty() {
                    return Err(invalid(
                        Code::Unavailable,
                        "sendRandom found no ready app worker to pick".into(),
                    ));
                }
                vec![ready[self.next_random() as usize % ready.len()]]
            }
            Target::Pid(pid) => match self
                .pids
                .get(&pid)
                .copied()
                .or_else(|| self.retired_slot(pid))
            {
                // A detached process can never read again (its secret is
                // spent): it is as gone as an exited one.
                Some(slot)
                    if self.slots[slot].phase.pid() == Some(pid)
                        && !matches!(
                            self.slots[slot].phase,
                            Phase::Exited { .. } | Phase::Failed { .. } | Phase::Detached { .. }
                        ) =>
                {
                    vec![slot]
                }
                Some(slot) => {
                    let gone = match self.slots[slot].phase {
                        Phase::Detached { pid: current, .. } if current == pid => {
                            "has disconnected"
                        }
                        _ => "has exited",
                    };
                    return Err(Undelivered {
                        code: Code::NotFound,
                        message: format!("pid {pid} ({}) {gone}", self.slots[slot].name()),
                        pid,
                        worker_id: self.slots[slot].worker_id,
                        role: Some(self.slots[slot].role),
                    });
                }
                None => {
                    return Err(Undelivered {
                        code: Code::NotFound,
                        message: format!("no process with pid {pid} in this cluster"),
                        pid,
                        worker_id: 0,
                        role: None,
                    })
                }
            },
        })
    }

    fn retired_slot(&self, pid: u32) -> Option<SlotId> {
        self.retired
            .iter()
            .rev()
            .find(|(p, _)| *p == pid)
            .map(|(_, s)| *s)
    }

    fn undelivered_full(&mut self, slot: SlotId, full: Full) -> Undelivered {
        let s = &self.slots[slot];
        let bound = match full {
            Full::Messages(n) => format!("{n} messages"),
            Full::Bytes(n) => format!("{n} bytes"),
            Full::Control(n) => format!("{n} control frames"),
        };
        Undelivered {
            code: Code::ResourceExhausted,
            message: format!("the mailbox of {} is full ({bound})", s.name()),
            pid: s.phase.pid().unwrap_or(0),
            worker_id: s.worker_id,
            role: Some(s.role),
        }
    }

    /// The stream of `conn` ended.
    pub fn detach(&mut self, conn: Conn, out: &mut Vec<Action>) {
        let Some(s) = self.current(conn) else { return };
        let Phase::Attached { pid, secret, .. } = &s.phase else {
            return;
        };
        s.phase = Phase::Detached {
            pid: *pid,
            secret: secret.clone(),
        };
        let role = s.role;
        let pid = s.phase.pid().unwrap_or(0);
        out.push(Action::Wake(conn.slot));
        out.push(Action::Detached {
            slot: conn.slot,
            pid,
        });
        self.end_incarnation(conn.slot, out);
        self.lost_liveness(role, out);
    }

    /// The process `pid` of `slot` exited.
    pub fn exited(&mut self, slot: SlotId, pid: u32, out: &mut Vec<Action>) {
        let s = &mut self.slots[slot];
        if s.phase.pid() != Some(pid) {
            return; // an older incarnation, already replaced
        }
        let was_live = s.phase.is_ready();
        let was_attached = matches!(s.phase, Phase::Attached { .. });
        s.phase = Phase::Exited { pid };
        let role = s.role;
        self.end_incarnation(slot, out);
        if was_attached {
            out.push(Action::Wake(slot));
        }
        if was_live || was_attached {
            self.lost_liveness(role, out);
        }
        out.push(if self.cluster_ready || self.shutting_down {
            Action::Lost(slot)
        } else {
            Action::StartupFailed(slot)
        });
    }

    /// The slot passed its restart limit and stays empty: what it held is
    /// dropped, counted and reported to its senders as UNAVAILABLE, and so
    /// are later sends to it.
    /// Returns how many held messages were dropped.
    pub fn fail(&mut self, slot: SlotId, out: &mut Vec<Action>) -> usize {
        self.end_incarnation(slot, out);
        let s = &mut self.slots[slot];
        let pid = s.phase.pid().unwrap_or(0);
        s.phase = Phase::Failed { pid };
        let (dropped, lost) = s.mailbox.clear();
        s.dropped += dropped as u64;
        let why = format!(
            "{} failed (it passed its restart limit) before handling the message",
            s.name()
        );
        for u in lost {
            self.report(slot, u, Code::Unavailable, why.clone(), out);
        }
        dropped
    }

    /// Asks one process to stop (an operator's restart): queues the
    /// shutdown notice for it alone. Returns its pid if it is running.
    pub fn stop_one(&mut self, slot: SlotId, grace_ms: u32, out: &mut Vec<Action>) -> Option<u32> {
        let pid = match self.slots[slot].phase {
            Phase::Spawned { pid, .. }
            | Phase::Attached { pid, .. }
            | Phase::Detached { pid, .. } => pid,
            _ => return None,
        };
        if self.is_attached(slot) {
            let _ = self.push(slot, Outbound::Shutdown { grace_ms }, None, None, out);
        }
        Some(pid)
    }

    /// The slot of the process with this current pid.
    pub fn slot_of_pid(&self, pid: u32) -> Option<SlotId> {
        self.pids
            .get(&pid)
            .copied()
            .filter(|&s| self.slots[s].phase.pid() == Some(pid))
    }

    /// True while a secret belongs to one of the cluster's processes (used
    /// to refuse child secrets on admin RPCs with a precise reason).
    pub fn is_child_secret(&self, candidate: &str) -> bool {
        self.slots.iter().any(|s| match &s.phase {
            Phase::Spawned { secret, .. }
            | Phase::Attached { secret, .. }
            | Phase::Detached { secret, .. } => {
                constant_time_eq(secret.as_bytes(), candidate.as_bytes())
            }
            _ => false,
        })
    }

    /// Begins shutdown for every child of `role`: refuse new registrations
    /// and queue the shutdown notice. Streams stay open, so in-flight work
    /// can still report; they end when the processes exit. Returns the pids
    /// of that role's processes.
    pub fn shutdown(
        &mut self,
        role: Role,
        grace_ms: u32,
        out: &mut Vec<Action>,
    ) -> Vec<(SlotId, u32)> {
        self.shutting_down = true;
        let mut pids = Vec::new();
        for slot in 0..self.slots.len() {
            if self.slots[slot].role != role {
                continue;
            }
            if self.is_attached(slot) {
                let _ = self.push(slot, Outbound::Shutdown { grace_ms }, None, None, out);
            }
            match self.slots[slot].phase {
                Phase::Exited { .. } | Phase::Failed { .. } | Phase::Idle => {}
                ref p => pids.extend(p.pid().map(|pid| (slot, pid))),
            }
        }
        pids
    }

    /// Moves up to `max` frames for `conn` into `buf`. Returns false when the
    /// stream must end (the incarnation is gone or detached).
    pub fn drain(
        &mut self,
        conn: Conn,
        buf: &mut VecDeque<Outbound>,
        max: usize,
        out: &mut Vec<Action>,
    ) -> bool {
        let low = self.low_watermark();
        let Some(s) = self.current(conn) else {
            return false;
        };
        let Phase::Attached { acks, .. } = s.phase else {
            return false;
        };
        let before = buf.len();
        s.mailbox.drain_into(buf, max, acks);
        s.drained += (buf.len() - before) as u64;
        self.relieve(conn.slot, low, out);
        true
    }

    /// The child of `conn` handled every message up to `seq`.
    pub fn ack(&mut self, conn: Conn, seq: u64, out: &mut Vec<Action>) {
        let low = self.low_watermark();
        let Some(s) = self.current(conn) else { return };
        if matches!(s.phase, Phase::Attached { acks: true, .. }) {
            s.mailbox.ack(seq);
            self.relieve(conn.slot, low, out);
        }
    }

    /// Releases senders waiting on `slot` once its mailbox is below `low`.
    fn relieve(&mut self, slot: SlotId, low: usize, out: &mut Vec<Action>) {
        let s = &mut self.slots[slot];
        if below(&s.mailbox, low) && (s.stalled || s.congested) {
            s.stalled = false;
            s.congested = false;
            out.push(Action::Relieved(slot));
        }
    }

    /// Frames written to `slot`'s streams so far.
    pub fn drained(&self, slot: SlotId) -> u64 {
        self.slots[slot].drained
    }

    /// Whether a sender waiting on `slot` for flow control may go on.
    pub fn has_room(&mut self, slot: SlotId) -> bool {
        let low = self.low_watermark();
        let s = &mut self.slots[slot];
        let room =
            s.stalled || !matches!(s.phase, Phase::Attached { .. }) || below(&s.mailbox, low);
        // A waiter must be woken when the mailbox drains, whoever made it
        // congested: mark it so, or a second sender that finds no room after
        // the first relief would wait for a wake-up that never comes.
        if !room {
            s.congested = true;
        }
        room
    }

    /// A flow-control wait on `slot` timed out: senders stop waiting for it
    /// until it drains, and the slow-consumer policy is told (once).
    pub fn stall(&mut self, slot: SlotId, out: &mut Vec<Action>) {
        let s = &mut self.slots[slot];
        if !s.stalled {
            s.stalled = true;
            out.push(Action::Stalled(slot));
        }
    }

    fn high_watermark(&self) -> usize {
        (self.limits.mailbox.messages / 2).max(1)
    }

    fn low_watermark(&self) -> usize {
        (self.limits.mailbox.messages / 4).max(1)
    }

    fn current(&mut self, conn: Conn) -> Option<&mut Slot> {
        self.slots
            .get_mut(conn.slot)
            .filter(|s| s.incarnation == conn.incarnation)
    }

    fn is_attached(&self, slot: SlotId) -> bool {
        matches!(self.slots[slot].phase, Phase::Attached { .. })
    }

    fn send_egg_ready(&mut self, slot: SlotId, out: &mut Vec<Action>) {
        if !self.slots[slot].egg_ready_sent && self.slots[slot].phase.is_ready() {
            self.slots[slot].egg_ready_sent = true;
            let _ = self.push(slot, Outbound::EggReady, None, None, out);
        }
    }

    /// `[agentPid]` while the agent is ready, else `[]`.
    fn agent_pids(&self) -> Arc<[u32]> {
        match &self.slots[AGENT].phase {
            Phase::Attached {
                pid, ready: true, ..
            } => Arc::from([*pid]),
            _ => Arc::from([]),
        }
    }

    fn tell_agent_app_pids(&mut self, out: &mut Vec<Action>) {
        if self.is_attached(AGENT) {
            let pids: Arc<[u32]> = self.slots[1..]
                .iter()
                .filter(|s| s.phase.is_ready())
                .filter_map(|s| s.phase.pid())
                .collect();
            let _ = self.push(AGENT, Outbound::EggPids(pids), None, None, out);
        }
    }

    /// A process stopped being live: update the other side's egg-pids.
    fn lost_liveness(&mut self, role: Role, out: &mut Vec<Action>) {
        match role {
            Role::App => self.tell_agent_app_pids(out),
            _ => {
                for app in 1..self.slots.len() {
                    if self.is_attached(app) {
                        let _ = self.push(app, Outbound::EggPids(Arc::from([])), None, None, out);
                    }
                }
            }
        }
    }

    /// Queues a frame for a slot, waking its stream if it was idle. A refused
    /// frame is counted and reported as an action; the caller decides whether
    /// the sender hears of it too.
    fn push(
        &mut self,
        slot: SlotId,
        frame: Outbound,
        reply: Option<ReplyTo>,
        pinned: Option<u32>,
        out: &mut Vec<Action>,
    ) -> Result<(), Full> {
        let bounds = self.limits.mailbox;
        let attached = self.is_attached(slot);
        let s = &mut self.slots[slot];
        let was_empty = s.mailbox.is_empty();
        let what: Option<Arc<str>> = match &frame {
            Outbound::Message { delivery, .. } => Some(delivery.action.clone()),
            _ => None,
        };
        let kind = frame_kind(&frame);
        match s.mailbox.push(frame, reply, pinned, bounds) {
            Ok(()) => {
                if attached && was_empty {
                    out.push(Action::Wake(slot));
                }
                Ok(())
            }
            Err(full) => {
                s.dropped += 1;
                out.push(Action::Dropped {
                    slot,
                    full,
                    what: what.unwrap_or_else(|| Arc::from(kind)),
                });
                Err(full)
            }
        }
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64*: plenty for spreading jobs evenly; not for secrets.
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

fn frame_kind(frame: &Outbound) -> &'static str {
    match frame {
        Outbound::Message { .. } => "message",
        Outbound::EggReady => "egg-ready",
        Outbound::EggPids(_) => "egg-pids",
        Outbound::AgentStart { .. } => "agent-start",
        Outbound::SendResult(_) => "send result",
        Outbound::Shutdown { .. } => "shutdown",
    }
}

/// Control frames past which a sender waits for its own results to be read.
const CONTROL_HIGH: usize = CONTROL_CAPACITY / 2;
/// …and below which it may go on.
const CONTROL_LOW: usize = CONTROL_CAPACITY / 4;

/// Below the low watermark in messages and in control frames.
fn below(mailbox: &Mailbox, low: usize) -> bool {
    mailbox.messages() < low && mailbox.controls() < CONTROL_LOW
}

/// Replaced pids remembered for `sendTo` error messages.
const RETIRED_PIDS: usize = 256;

/// Compares secrets in time that does not depend on where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    const MASTER: u32 = 1;

    /// A router with an agent (pid 100) and `n` apps (pids 101..), every
    /// process spawned with secret "s<slot>".
    struct Fixture {
        router: Router,
        actions: Vec<Action>,
        conns: Vec<Option<Conn>>,
    }

    fn pid(slot: SlotId) -> u32 {
        100 + slot as u32
    }

    impl Fixture {
        fn new(n: usize) -> Fixture {
            Self::with_limits(n, Limits::default())
        }

        fn with_limits(n: usize, limits: Limits) -> Fixture {
            let mut router = Router::new(MASTER, n, limits, 7);
            for slot in 0..=n {
                router.spawned(slot, pid(slot), format!("s{slot}"), &mut Vec::new());
            }
            Fixture {
                router,
                actions: Vec::new(),
                conns: vec![None; n + 1],
            }
        }

        fn register(&mut self, slot: SlotId) -> Identity {
            self.register_with(slot, format!("s{slot}"), false)
        }

        fn register_with(&mut self, slot: SlotId, secret: String, acks: bool) -> Identity {
            let role = if slot == AGENT {
                Role::Agent
            } else {
                Role::App
            };
            let reg = Registration {
                secret,
                role: Some(role),
                acks,
            };
            let (id, conn) = self
                .router
                .register(&reg, &mut self.actions)
                .expect("registers");
            self.conns[slot] = Some(conn);
            id
        }

        fn conn(&self, slot: SlotId) -> Conn {
            self.conns[slot].expect("registered")
        }

        fn ready(&mut self, slot: SlotId) {
            let conn = self.conn(slot);
            self.router.ready(conn, &mut self.actions);
        }

        /// Every process registered and ready, and all frames so far drained.
        fn up(n: usize) -> Fixture {
            let mut f = Fixture::new(n);
            for slot in 0..=n {
                f.register(slot);
                f.ready(slot);
            }
            for slot in 0..=n {
                f.frames(slot);
            }
            f.actions.clear();
            f
        }

        fn send(
            &mut self,
            slot: SlotId,
            target: Option<Target>,
            action: &str,
            data: &'static [u8],
        ) -> Vec<SlotId> {
            let conn = self.conn(slot);
            let req = SendRequest {
                id: 9,
                target,
                action: action.into(),
                data: Bytes::from_static(data),
                want_result: true,
            };
            self.router.send(conn, req, &mut self.actions)
        }

        fn frames(&mut self, slot: SlotId) -> Vec<Outbound> {
            let mut buf = VecDeque::new();
            let conn = self.conn(slot);
            self.router
                .drain(conn, &mut buf, usize::MAX, &mut self.actions);
            buf.into_iter().collect()
        }

        fn messages(&mut self, slot: SlotId) -> Vec<Delivery> {
            self.frames(slot)
                .into_iter()
                .filter_map(|f| match f {
                    Outbound::Message { delivery, .. } => Some(delivery),
                    _ => None,
                })
                .collect()
        }

        fn result(&mut self, slot: SlotId) -> SendResult {
            self.frames(slot)
                .into_iter()
                .find_map(|f| match f {
                    Outbound::SendResult(r) => Some(r),
                    _ => None,
                })
                .expect("a send result")
        }
    }

    fn reg(secret: &str, role: Option<Role>) -> Registration {
        Registration {
            secret: secret.into(),
            role,
            acks: false,
        }
    }

    #[test]
    fn registration_is_checked() {
        let mut f = Fixture::new(2);
        let mut out = Vec::new();
        let r = &mut f.router;
        assert_eq!(
            r.register(&reg("", Some(Role::App)), &mut out),
            Err(RegisterError::MissingSecret)
        );
        assert_eq!(
            r.register(&reg("s1", None), &mut out),
            Err(RegisterError::MissingRole)
        );
        assert_eq!(
            r.register(&reg("nope", Some(Role::App)), &mut out),
            Err(RegisterError::UnknownSecret)
        );
        assert_eq!(
            r.register(&reg("s0", Some(Role::App)), &mut out),
            Err(RegisterError::RoleMismatch {
                expected: Role::Agent,
                claimed: Role::App
            })
        );
        let (id, _) = r
            .register(&reg("s1", Some(Role::App)), &mut out)
            .expect("valid secret");
        assert_eq!(
            (
                id.role,
                id.worker_id,
                id.pid,
                id.master_pid,
                id.workers,
                id.incarnation
            ),
            (Role::App, 1, 101, MASTER, 2, 1)
        );
        assert!(matches!(
            r.register(&reg("s1", Some(Role::App)), &mut out),
            Err(RegisterError::SecretUsed { .. })
        ));
        r.shutdown(Role::App, 0, &mut out);
        assert_eq!(
            r.register(&reg("s2", Some(Role::App)), &mut out),
            Err(RegisterError::ShuttingDown)
        );
    }

    #[test]
    fn apps_launch_once_after_the_agents_first_ready() {
        let mut f = Fixture::new(2);
        f.register(AGENT);
        assert!(!f.actions.contains(&Action::LaunchApps));
        f.ready(AGENT);
        f.ready(AGENT);
        assert_eq!(
            f.actions
                .iter()
                .filter(|a| **a == Action::LaunchApps)
                .count(),
            1
        );
    }

    #[test]
    fn egg_ready_waits_for_everyone_and_comes_once_per_process() {
        let mut f = Fixture::new(3);
        for slot in 0..=3 {
            f.register(slot);
        }
        for slot in 0..3 {
            f.ready(slot);
            for s in 0..=3 {
                assert!(
                    !f.frames(s).contains(&Outbound::EggReady),
                    "egg-ready before everyone was ready"
                );
            }
        }
        f.ready(3);
        f.ready(3);
        for s in 0..=3 {
            assert_eq!(
                f.frames(s)
                    .iter()
                    .filter(|o| **o == Outbound::EggReady)
                    .count(),
                1,
                "slot {s}"
            );
        }
        assert_eq!(
            f.actions
                .iter()
                .filter(|a| **a == Action::ClusterReady)
                .count(),
            1
        );
    }

    #[test]
    fn the_routing_table_has_egg_semantics() {
        // (sender, target, expected receivers)
        let rows: [(SlotId, Target, &[SlotId]); 10] = [
            (AGENT, Target::Broadcast, &[0, 1, 2]),
            (1, Target::Broadcast, &[0, 1, 2]),
            (AGENT, Target::Apps, &[1, 2]),
            (1, Target::Apps, &[1, 2]),
            (1, Target::Agent, &[0]),
            (AGENT, Target::Agent, &[0]),
            (1, Target::Random, &[0]),
            (AGENT, Target::Pid(pid(2)), &[2]),
            (1, Target::Pid(pid(2)), &[2]),
            (2, Target::Pid(pid(AGENT)), &[0]),
        ];
        for (sender, target, expected) in rows {
            let mut f = Fixture::up(2);
            f.send(sender, Some(target), "x", b"1");
            let result = f.result(sender);
            assert_eq!(
                result.delivered as usize,
                expected.len(),
                "{target} from slot {sender}"
            );
            assert!(result.undelivered.is_empty());
            // The sender's own frames were drained for the result; count its
            // copy from the result's view instead.
            for slot in 0..=2 {
                if slot == sender {
                    continue;
                }
                let got = f.messages(slot);
                let want = usize::from(expected.contains(&slot));
                assert_eq!(
                    got.len(),
                    want,
                    "{target} from slot {sender} at slot {slot}"
                );
                if let Some(d) = got.first() {
                    assert_eq!(d.from.pid, pid(sender));
                    assert_eq!(d.from.worker_id, sender as u32);
                    assert_eq!(&*d.data, b"1");
                }
            }
        }
    }

    #[test]
    fn send_random_picks_only_ready_apps_and_reaches_each() {
        let mut f = Fixture::new(3);
        for slot in 0..=3 {
            f.register(slot);
        }
        f.ready(AGENT);
        f.send(AGENT, Some(Target::Random), "job", b"");
        let r = f.result(AGENT);
        assert_eq!(r.undelivered[0].code, Code::Unavailable);
        f.ready(1);
        f.ready(2);
        for _ in 0..200 {
            f.send(AGENT, Some(Target::Random), "job", b"");
        }
        let counts: Vec<usize> = (1..=3).map(|s| f.messages(s).len()).collect();
        assert_eq!(counts[2], 0, "app 3 is not ready");
        assert_eq!(counts[0] + counts[1], 200);
        // Uniform over two: missing one in 200 tries has probability 2^-199.
        assert!(counts[0] > 0 && counts[1] > 0, "{counts:?}");
    }

    #[test]
    fn messages_for_unregistered_slots_are_held_in_order() {
        let mut f = Fixture::new(2);
        f.register(AGENT);
        f.ready(AGENT);
        for i in 0..5u8 {
            let conn = f.conn(AGENT);
            let req = SendRequest {
                id: u64::from(i),
                target: Some(Target::Apps),
                action: "a".into(),
                data: Bytes::from(vec![i]),
                want_result: true,
            };
            f.router.send(conn, req, &mut f.actions);
        }
        let results: Vec<SendResult> = f
            .frames(AGENT)
            .into_iter()
            .filter_map(|o| match o {
                Outbound::SendResult(r) => Some(r),
                _ => None,
            })
            .collect();
        assert!(results.iter().all(|r| r.held == 2 && r.delivered == 0));
        f.register(1);
        assert!(f.actions.contains(&Action::Wake(1)));
        let got: Vec<u8> = f.messages(1).iter().map(|d| d.data[0]).collect();
        assert_eq!(got, vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn unknown_and_exited_pids_are_not_found() {
        let mut f = Fixture::up(2);
        f.send(AGENT, Some(Target::Pid(4242)), "x", b"");
        let r = f.result(AGENT);
        assert_eq!(r.undelivered[0].code, Code::NotFound);
        assert!(r.undelivered[0].message.contains("4242"));
        f.router.exited(2, pid(2), &mut f.actions);
        f.send(AGENT, Some(Target::Pid(pid(2))), "x", b"");
        let r = f.result(AGENT);
        assert_eq!(r.undelivered[0].code, Code::NotFound);
        assert!(
            r.undelivered[0].message.contains("exited"),
            "{}",
            r.undelivered[0].message
        );
    }

    #[test]
    fn bad_sends_are_refused_with_the_reason() {
        let limits = Limits {
            max_action_bytes: 4,
            max_payload_bytes: 3,
            ..Limits::default()
        };
        let mut f = Fixture::with_limits(1, limits);
        f.register(AGENT);
        // (route, action, payload, expected code, words in the message)
        type Case = (
            Option<Target>,
            &'static str,
            &'static [u8],
            Code,
            &'static str,
        );
        let cases: [Case; 4] = [
            (Some(Target::Agent), "", b"", Code::InvalidArgument, "empty"),
            (
                Some(Target::Agent),
                "toolong",
                b"",
                Code::InvalidArgument,
                "limit is 4 bytes",
            ),
            (
                Some(Target::Agent),
                "a",
                b"1234",
                Code::ResourceExhausted,
                "limit is 3 bytes",
            ),
            (None, "a", b"", Code::InvalidArgument, "no route"),
        ];
        for (target, action, data, code, words) in cases {
            f.send(AGENT, target, action, data);
            let r = f.result(AGENT);
            assert_eq!((r.delivered, r.held), (0, 0));
            assert_eq!(r.undelivered[0].code, code);
            assert!(
                r.undelivered[0].message.contains(words),
                "{}",
                r.undelivered[0].message
            );
        }
    }

    #[test]
    fn a_full_mailbox_refuses_and_reports_without_displacing() {
        let limits = Limits {
            mailbox: Bounds {
                messages: 2,
                bytes: 1 << 20,
            },
            ..Limits::default()
        };
        let mut f = Fixture::with_limits(1, limits);
        f.register(AGENT);
        // App 1 is spawned but not registered: messages are held for it.
        for _ in 0..3 {
            f.send(AGENT, Some(Target::Apps), "a", b"x");
        }
        let results: Vec<SendResult> = f
            .frames(AGENT)
            .into_iter()
            .filter_map(|o| match o {
                Outbound::SendResult(r) => Some(r),
                _ => None,
            })
            .collect();
        assert_eq!(results.iter().map(|r| r.held).sum::<u32>(), 2);
        let refused = &results[2].undelivered[0];
        assert_eq!(refused.code, Code::ResourceExhausted);
        assert_eq!((refused.worker_id, refused.pid), (1, pid(1)));
        assert!(
            refused.message.contains("app worker 1") && refused.message.contains("2 messages"),
            "{}",
            refused.message
        );
        assert!(f
            .actions
            .iter()
            .any(|a| matches!(a, Action::Dropped { slot: 1, .. })));
        f.register(1);
        assert_eq!(f.messages(1).len(), 2);
        assert_eq!(f.router.view()[1].dropped, 1);
    }

    #[test]
    fn egg_pids_keep_eggs_meaning() {
        let mut f = Fixture::new(2);
        f.register(AGENT);
        f.ready(AGENT);
        f.register(1);
        assert_eq!(
            f.frames(1),
            vec![Outbound::EggPids(Arc::from([pid(AGENT)]))]
        );
        f.ready(1);
        f.register(2);
        f.ready(2);
        let pids: Vec<Outbound> = f
            .frames(AGENT)
            .into_iter()
            .filter(|o| matches!(o, Outbound::EggPids(_)))
            .collect();
        assert_eq!(
            pids,
            vec![
                Outbound::EggPids(Arc::from([pid(1)])),
                Outbound::EggPids(Arc::from([pid(1), pid(2)]))
            ]
        );
        f.router.exited(1, pid(1), &mut f.actions);
        assert!(f
            .frames(AGENT)
            .contains(&Outbound::EggPids(Arc::from([pid(2)]))));
        f.router.exited(AGENT, pid(AGENT), &mut f.actions);
        assert!(f.frames(2).contains(&Outbound::EggPids(Arc::from([]))));
    }

    #[test]
    fn a_restarted_agent_hears_the_app_pids_and_the_apps_hear_of_it() {
        let mut f = Fixture::up(2);
        f.router.exited(AGENT, pid(AGENT), &mut f.actions);
        assert_eq!(f.frames(1), vec![Outbound::EggPids(Arc::from([]))]);
        f.router.spawned(AGENT, 900, "again".into(), &mut f.actions);
        f.register_with(AGENT, "again".into(), false);
        f.ready(AGENT);
        let agent = f.frames(AGENT);
        assert!(
            agent.contains(&Outbound::EggPids(Arc::from([pid(1), pid(2)]))),
            "{agent:?}"
        );
        assert_eq!(
            agent.iter().filter(|o| **o == Outbound::EggReady).count(),
            1
        );
        assert_eq!(
            f.frames(1),
            vec![
                Outbound::AgentStart { pid: 900 },
                Outbound::EggPids(Arc::from([900]))
            ]
        );
        assert!(
            !f.actions.contains(&Action::LaunchApps),
            "apps are launched once"
        );
    }

    #[test]
    fn exits_fail_the_start_before_the_barrier_and_are_losses_after() {
        let mut f = Fixture::new(1);
        f.register(AGENT);
        f.router.exited(1, pid(1), &mut f.actions);
        assert!(f.actions.contains(&Action::StartupFailed(1)));
        let mut f = Fixture::up(1);
        f.router.exited(1, 999, &mut f.actions); // not the current pid
        assert!(f.actions.is_empty());
        f.router.exited(1, pid(1), &mut f.actions);
        assert!(f.actions.contains(&Action::Lost(1)));
    }

    #[test]
    fn events_from_a_replaced_incarnation_are_ignored() {
        let mut f = Fixture::up(1);
        let old = f.conn(1);
        f.router.exited(1, pid(1), &mut f.actions);
        f.router.spawned(1, 555, "new".into(), &mut Vec::new());
        f.actions.clear();
        f.router.ready(old, &mut f.actions);
        f.router.detach(old, &mut f.actions);
        let req = SendRequest {
            id: 1,
            target: Some(Target::Agent),
            action: "a".into(),
            data: Bytes::new(),
            want_result: true,
        };
        f.router.send(old, req, &mut f.actions);
        assert!(f.actions.is_empty(), "{:?}", f.actions);
        assert!(!f
            .router
            .drain(old, &mut VecDeque::new(), 10, &mut f.actions));
    }

    #[test]
    fn shutdown_notifies_one_role_and_keeps_routing_for_in_flight_work() {
        let mut f = Fixture::up(2);
        let pids = f.router.shutdown(Role::App, 250, &mut f.actions);
        assert_eq!(pids, vec![(1, pid(1)), (2, pid(2))]);
        assert_eq!(f.frames(1), vec![Outbound::Shutdown { grace_ms: 250 }]);
        f.send(1, Some(Target::Agent), "result", b"1");
        assert_eq!(
            f.messages(AGENT).len(),
            1,
            "an app can still report to the agent"
        );
        let pids = f.router.shutdown(Role::Agent, 250, &mut f.actions);
        assert_eq!(
            pids,
            vec![(AGENT, pid(AGENT))],
            "the agent is stopped in a later phase"
        );
        assert_eq!(f.frames(AGENT), vec![Outbound::Shutdown { grace_ms: 250 }]);
    }

    #[test]
    fn unacked_messages_go_to_the_slots_next_process() {
        let mut f = Fixture::new(1);
        f.register_with(AGENT, "s0".into(), true);
        f.ready(AGENT);
        f.register(1);
        f.ready(1);
        f.frames(AGENT);
        for _ in 0..3 {
            f.send(1, Some(Target::Agent), "tick", b"t");
        }
        let seqs: Vec<u64> = f
            .frames(AGENT)
            .into_iter()
            .filter_map(|o| match o {
                Outbound::Message { seq, .. } => Some(seq),
                _ => None,
            })
            .collect();
        assert_eq!(seqs.len(), 3);
        // The agent handled the first tick, then died.
        let conn = f.conn(AGENT);
        f.router.ack(conn, seqs[0], &mut f.actions);
        f.router.exited(AGENT, pid(AGENT), &mut f.actions);
        f.router.spawned(AGENT, 900, "again".into(), &mut f.actions);
        // A tick sent while the agent is down is held behind the unacked ones.
        f.send(1, Some(Target::Agent), "tick", b"u");
        f.register_with(AGENT, "again".into(), true);
        let got: Vec<(u64, Vec<u8>)> = f
            .frames(AGENT)
            .into_iter()
            .filter_map(|o| match o {
                Outbound::Message { seq, delivery } => Some((seq, delivery.data.to_vec())),
                _ => None,
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (seqs[1], b"t".to_vec()),
                (seqs[2], b"t".to_vec()),
                (seqs[2] + 1, b"u".to_vec())
            ]
        );
    }

    #[test]
    fn send_to_a_process_that_dies_first_is_reported_not_found() {
        let mut f = Fixture::up(2);
        f.send(AGENT, Some(Target::Pid(pid(2))), "job", b"1");
        let r = f.result(AGENT);
        assert_eq!(r.delivered, 1);
        f.router.exited(2, pid(2), &mut f.actions);
        let r = f.result(AGENT);
        assert_eq!(r.undelivered[0].code, Code::NotFound);
        assert!(
            r.undelivered[0].message.contains("exited before handling"),
            "{}",
            r.undelivered[0].message
        );
        // After the slot has a new process, the old pid is still known as exited.
        f.router.spawned(2, 777, "n".into(), &mut f.actions);
        f.send(AGENT, Some(Target::Pid(pid(2))), "job", b"1");
        let r = f.result(AGENT);
        assert!(
            r.undelivered[0].message.contains("has exited"),
            "{}",
            r.undelivered[0].message
        );
    }

    #[test]
    fn flow_control_flags_congested_receivers_until_they_drain() {
        let limits = Limits {
            mailbox: Bounds {
                messages: 8,
                bytes: 1 << 20,
            },
            ..Limits::default()
        };
        let mut f = Fixture::with_limits(1, limits);
        f.register(AGENT);
        f.register(1);
        f.frames(1);
        let mut congested = Vec::new();
        for _ in 0..4 {
            congested = f.send(AGENT, Some(Target::Apps), "a", b"x");
        }
        assert_eq!(congested, vec![1], "4 of 8 is the high watermark");
        assert!(!f.router.has_room(1));
        f.frames(1);
        assert!(f.router.has_room(1));
        assert!(f.actions.contains(&Action::Relieved(1)));
    }
}
