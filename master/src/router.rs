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
//!
//! A reload overlaps two processes in one slot: a *standby* is launched
//! beside the current process, registers and gets ready while the current
//! one keeps serving; once it is ready it is *promoted*: it becomes the
//! slot's current process and receives the slot's messages from then on,
//! and the old one becomes *outgoing*: it gets the shutdown notice, may
//! still send, acknowledge and receive what is addressed to its pid, and
//! whatever it leaves unacknowledged goes to the new process. The new
//! process receives no message until the outgoing one has acknowledged
//! (or given back) everything it was written, so each sender's messages
//! still arrive in order across the switch.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use clutch::types::{RegisterError, SendRequest};
use clutch::{
    Code, Delivery, Identity, Origin, Outbound, Registration, Role, SendResult, Target, Undelivered,
};

use crate::mailbox::{
    Bounds, FrameSink, Full, Mailbox, Place, Refused, ReplyTo, Undeliverable, CONTROL_CAPACITY,
};

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
                // Large enough to cover what is in flight to an
                // acknowledging child (it counts until acked) with room to
                // spare: 64 Ki measured +13% fan-out and fan-in over 16 Ki.
                // Memory is bounded by `bytes` either way.
                messages: 64 * 1024,
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
    /// A reload's standby was ready and took over its slot; the old
    /// process (if it was still attached) got the shutdown notice.
    Promoted {
        /// The slot.
        slot: SlotId,
        /// The process replaced, if one was still running the slot.
        old_pid: Option<u32>,
        /// The standby, now the slot's current process.
        new_pid: u32,
        /// The new process's incarnation.
        incarnation: u32,
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

/// Which of a slot's processes a stream belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lane {
    /// The slot's current process: it gets the slot's messages.
    Current,
    /// A reload's new process, not promoted yet.
    Standby,
    /// The process a reload replaced, on its way out.
    Outgoing,
}

/// A slot's second process during a reload: the standby that will replace
/// the current process, or the outgoing one it replaced.
#[derive(Debug)]
struct Overlap {
    /// Its pid.
    pid: u32,
    /// Its incarnation (unique in the slot).
    incarnation: u32,
    /// Its registration secret.
    secret: String,
    /// `Some(acks)` once its stream registered.
    attached: Option<bool>,
    /// It said it is ready.
    ready: bool,
    /// The grace the outgoing process is told in its shutdown notice.
    grace_ms: u32,
    /// Its own frames: control frames, `sendTo(pid)` messages and, for the
    /// outgoing process, the slot's messages it has not acknowledged yet.
    mailbox: Mailbox,
}

/// One agent or app worker position in the cluster.
#[derive(Debug)]
struct Slot {
    /// Agent or app.
    role: Role,
    /// 0 for the agent, 1..=N for apps.
    worker_id: u32,
    /// The current process's incarnation.
    incarnation: u32,
    /// Processes launched for this slot so far: incarnations stay unique
    /// even when a standby fails before it is promoted.
    launched: u32,
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
    /// The slot's progress: frames written to its streams plus messages its
    /// processes acknowledged. Flow control tells a slow receiver (this
    /// moves) from a stuck one (it does not); acknowledgements count because
    /// a slow reader's backlog can sit in transport buffers, where writing
    /// stops while the reader still works through it.
    progress: u64,
    /// A reload's new process, until it is ready.
    standby: Option<Overlap>,
    /// The process a reload replaced, until its stream ends.
    outgoing: Option<Overlap>,
}

impl Slot {
    fn name(&self) -> String {
        match self.role {
            Role::App => format!("app worker {}", self.worker_id),
            _ => self.role.to_string(),
        }
    }

    fn overlap(&mut self, lane: Lane) -> Option<&mut Overlap> {
        match lane {
            Lane::Current => None,
            Lane::Standby => self.standby.as_mut(),
            Lane::Outgoing => self.outgoing.as_mut(),
        }
    }

    /// The mailbox of one of the slot's processes, and whether that process
    /// has a stream to write it to.
    fn lane(&mut self, lane: Lane) -> Option<(&mut Mailbox, bool)> {
        match lane {
            Lane::Current => Some((
                &mut self.mailbox,
                matches!(self.phase, Phase::Attached { .. }),
            )),
            _ => self
                .overlap(lane)
                .map(|o| (&mut o.mailbox, o.attached.is_some())),
        }
    }

    /// The new process may not be written messages yet: the outgoing one
    /// still has some it has neither acknowledged nor given back.
    fn handing_over(&self) -> bool {
        self.outgoing
            .as_ref()
            .is_some_and(|o| o.mailbox.unacked() > 0)
    }
}

/// A read-only view of one process (or empty slot), for logs and listings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotView {
    /// The slot.
    pub slot: SlotId,
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
    /// idle, spawned, registered, ready, detached, exited or failed; for a
    /// reload's extra process, standby or retiring.
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
            launched: 0,
            phase: Phase::Idle,
            egg_ready_sent: false,
            mailbox: Mailbox::default(),
            stalled: false,
            congested: false,
            delivered: 0,
            dropped: 0,
            progress: 0,
            standby: None,
            outgoing: None,
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

    /// Snapshot of every slot, and after a slot its reload's extra
    /// processes.
    pub fn view(&self) -> Vec<SlotView> {
        let mut views = Vec::with_capacity(self.slots.len());
        for (slot, s) in self.slots.iter().enumerate() {
            views.push(SlotView {
                slot,
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
            });
            for (o, state) in [(&s.standby, "standby"), (&s.outgoing, "retiring")] {
                if let Some(o) = o {
                    views.push(SlotView {
                        slot,
                        role: s.role,
                        worker_id: s.worker_id,
                        pid: Some(o.pid),
                        incarnation: o.incarnation,
                        pending: o.mailbox.len(),
                        delivered: 0,
                        dropped: 0,
                        state,
                    });
                }
            }
        }
        views
    }

    /// The incarnation of `slot`'s current (or last) process.
    pub fn incarnation(&self, slot: SlotId) -> u32 {
        self.slots[slot].incarnation
    }

    /// The incarnation number the next process of `slot` will have.
    pub fn next_incarnation(&self, slot: SlotId) -> u32 {
        self.slots[slot].launched + 1
    }

    /// A process was launched for `slot` with this pid and secret.
    pub fn spawned(&mut self, slot: SlotId, pid: u32, secret: String, out: &mut Vec<Action>) {
        self.end_incarnation(slot, out);
        if let Some(old) = self.slots[slot].phase.pid() {
            self.retire(old, slot);
        }
        let s = &mut self.slots[slot];
        s.launched += 1;
        s.incarnation = s.launched;
        s.phase = Phase::Spawned { pid, secret };
        s.egg_ready_sent = false;
        self.pids.insert(pid, slot);
    }

    /// Why `slot` cannot take a reload's standby now, if it cannot: only a
    /// ready app worker with no other reload in progress is replaced so.
    pub fn standby_refused(&self, slot: SlotId) -> Option<String> {
        let s = self.slots.get(slot)?;
        if s.role != Role::App {
            Some(format!("{} is not an app worker", s.name()))
        } else if !self.cluster_ready {
            Some("the cluster is not ready yet".into())
        } else if self.shutting_down {
            Some("the cluster is stopping".into())
        } else if s.standby.is_some() || s.outgoing.is_some() {
            Some(format!("{} is already being replaced", s.name()))
        } else if !s.phase.is_ready() {
            Some(format!("{} has no ready process to replace", s.name()))
        } else {
            None
        }
    }

    /// A reload's new process was launched for `slot`, beside its current
    /// one (check [`Router::standby_refused`] first). Once it registers and
    /// says it is ready, it is promoted; the old process is then told to
    /// stop with `grace_ms`.
    pub fn spawned_standby(&mut self, slot: SlotId, pid: u32, secret: String, grace_ms: u32) {
        let s = &mut self.slots[slot];
        s.launched += 1;
        s.standby = Some(Overlap {
            pid,
            incarnation: s.launched,
            secret,
            attached: None,
            ready: false,
            grace_ms,
            mailbox: Mailbox::default(),
        });
        self.pids.insert(pid, slot);
    }

    /// Forgets a pid that no longer runs the slot, remembering it for a
    /// while so that a `sendTo` it can say the process exited.
    fn retire(&mut self, pid: u32, slot: SlotId) {
        self.pids.remove(&pid);
        if self.retired.len() == RETIRED_PIDS {
            self.retired.pop_front();
        }
        self.retired.push_back((pid, slot));
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
        if let Some(lane) = self.lane_of(sender) {
            let result = SendResult {
                id: u.reply.send_id,
                action: u.action,
                delivered: 0,
                held: 0,
                undelivered: vec![undelivered],
            };
            let frame = Outbound::SendResult(result);
            let _ = self.push_to(sender.slot, lane, frame, None, None, out);
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
        let (slot, lane) = self
            .secret_owner(&reg.secret)
            .ok_or(RegisterError::UnknownSecret)?;
        if lane != Lane::Current {
            return self.register_standby(slot, lane, claimed, reg.acks, out);
        }
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

    /// Attaches a reload's standby. It hears of the agent as any app does;
    /// it gets no message for the slot until it is promoted.
    fn register_standby(
        &mut self,
        slot: SlotId,
        lane: Lane,
        claimed: Role,
        acks: bool,
        out: &mut Vec<Action>,
    ) -> Result<(Identity, Conn), RegisterError> {
        let workers = self.workers() as u32;
        let master_pid = self.master_pid;
        let s = &mut self.slots[slot];
        let (role, worker_id, name) = (s.role, s.worker_id, s.name());
        let o = match s.overlap(lane) {
            Some(o) if lane == Lane::Standby && o.attached.is_none() => o,
            _ => return Err(RegisterError::SecretUsed { role, slot: name }),
        };
        if claimed != role {
            return Err(RegisterError::RoleMismatch {
                expected: role,
                claimed,
            });
        }
        o.attached = Some(acks);
        let identity = Identity {
            role,
            worker_id,
            pid: o.pid,
            master_pid,
            workers,
            incarnation: o.incarnation,
        };
        let conn = Conn {
            slot,
            incarnation: o.incarnation,
        };
        out.push(Action::Registered {
            slot,
            pid: identity.pid,
            incarnation: identity.incarnation,
        });
        let agent = self.agent_pids();
        let _ = self.push_to(slot, lane, Outbound::EggPids(agent), None, None, out);
        Ok((identity, conn))
    }

    /// The slot and process a registration secret belongs to.
    fn secret_owner(&self, candidate: &str) -> Option<(SlotId, Lane)> {
        let matches = |secret: &str| constant_time_eq(secret.as_bytes(), candidate.as_bytes());
        self.slots.iter().enumerate().find_map(|(slot, s)| {
            let current = match &s.phase {
                Phase::Spawned { secret, .. }
                | Phase::Attached { secret, .. }
                | Phase::Detached { secret, .. } => matches(secret),
                _ => false,
            };
            if current {
                return Some((slot, Lane::Current));
            }
            [(&s.standby, Lane::Standby), (&s.outgoing, Lane::Outgoing)]
                .into_iter()
                .find_map(|(o, lane)| {
                    o.as_ref()
                        .filter(|o| matches(&o.secret))
                        .map(|_| (slot, lane))
                })
        })
    }

    /// The stream's process declared itself ready.
    pub fn ready(&mut self, conn: Conn, out: &mut Vec<Action>) {
        match self.lane_of(conn) {
            Some(Lane::Current) => {}
            Some(Lane::Standby) => return self.standby_ready(conn, out),
            _ => return,
        }
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

    /// A reload's standby is ready: it gets its egg-ready and takes over.
    fn standby_ready(&mut self, conn: Conn, out: &mut Vec<Action>) {
        let Some(o) = self.slots[conn.slot].standby.as_mut() else {
            return;
        };
        if o.ready || o.attached.is_none() {
            return;
        }
        o.ready = true;
        let pid = o.pid;
        out.push(Action::Ready {
            slot: conn.slot,
            pid,
            incarnation: conn.incarnation,
        });
        // A standby exists only after the barrier passed: it is told at once.
        let _ = self.push_to(
            conn.slot,
            Lane::Standby,
            Outbound::EggReady,
            None,
            None,
            out,
        );
        self.promote(conn.slot, out);
    }

    /// The standby becomes the slot's current process; the old one, if its
    /// stream is still up, becomes outgoing and gets the shutdown notice.
    /// Messages queued for the slot and not yet written follow the slot.
    fn promote(&mut self, slot: SlotId, out: &mut Vec<Action>) {
        let s = &mut self.slots[slot];
        let Some(new) = s.standby.take() else { return };
        let incoming = Phase::Attached {
            pid: new.pid,
            secret: new.secret,
            ready: true,
            acks: new.attached.unwrap_or(false),
        };
        let old = std::mem::replace(&mut s.phase, incoming);
        let old_incarnation = std::mem::replace(&mut s.incarnation, new.incarnation);
        let mut old_box = std::mem::replace(&mut s.mailbox, new.mailbox);
        s.egg_ready_sent = true;
        old_box.hand_over(&mut s.mailbox, Place::Back);
        let old_pid = old.pid();
        match old {
            Phase::Attached {
                pid,
                secret,
                ready,
                acks,
            } => {
                let mut o = Overlap {
                    pid,
                    incarnation: old_incarnation,
                    secret,
                    attached: Some(acks),
                    ready,
                    grace_ms: new.grace_ms,
                    mailbox: old_box,
                };
                let notice = Outbound::Shutdown {
                    grace_ms: new.grace_ms,
                };
                // Control frames have their own room; if even that is full
                // the process is not reading, and the signals end it.
                let _ = o.mailbox.push(notice, None, None, self.limits.mailbox);
                s.outgoing = Some(o);
            }
            // The old process is gone already (or cut off); what it left
            // was handed over at its end, and its pid is retired.
            _ => {
                if let Some(pid) = old_pid {
                    self.retire(pid, slot);
                }
            }
        }
        // Both streams have something new: the old its notice, the new the
        // slot's messages (once the handover allows).
        out.push(Action::Wake(slot));
        out.push(Action::Promoted {
            slot,
            old_pid,
            new_pid: new.pid,
            incarnation: new.incarnation,
        });
        self.tell_agent_app_pids(out);
    }

    /// Routes one send from an attached stream. Returns the attached slots
    /// whose mailboxes are past the high watermark, which the sender should
    /// wait on before sending more (flow control).
    pub fn send(&mut self, conn: Conn, req: SendRequest, out: &mut Vec<Action>) -> Vec<SlotId> {
        let mut congested = Vec::new();
        let Some(lane) = self.lane_of(conn) else {
            return congested;
        };
        let s = &mut self.slots[conn.slot];
        let (role, worker_id) = (s.role, s.worker_id);
        let pid = match lane {
            Lane::Current => match s.phase {
                Phase::Attached { pid, .. } => pid,
                _ => return congested,
            },
            _ => match s.overlap(lane) {
                Some(o) if o.attached.is_some() => o.pid,
                _ => return congested,
            },
        };
        let from = Origin {
            role,
            pid,
            worker_id,
        };
        let want_result = req.want_result;
        let result = self.route(from, Some(conn), req, &mut congested, out);
        if want_result || !result.undelivered.is_empty() {
            let frame = Outbound::SendResult(result);
            let _ = self.push_to(conn.slot, lane, frame, None, None, out);
            if lane != Lane::Current {
                // A reload's extra process is short-lived: its results
                // are bounded by its mailbox's control room alone.
                return congested;
            }
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
        // The action goes into the result at the end (no extra reference
        // count per message), and the delivery is moved, not copied, into
        // the last of its targets.
        let action: Arc<str> = req.action;
        let (mut delivered, mut held, mut undelivered) = (0, 0, Vec::new());
        match self.check(&action, &req.data, req.target, from.role) {
            Err(u) => undelivered.push(u),
            Ok(targets) => {
                // Taken by the last target, copied for the others.
                let mut delivery = Some(Delivery {
                    action: action.clone(),
                    data: req.data,
                    from,
                });
                let reply = sender.map(|conn| ReplyTo {
                    sender: conn.slot,
                    sender_incarnation: conn.incarnation,
                    send_id: req.id,
                });
                let pinned = match req.target {
                    Some(Target::Pid(pid)) => Some(pid),
                    _ => None,
                };
                let mut targets = targets.peekable();
                while let Some((slot, lane)) = targets.next() {
                    let copy = if targets.peek().is_none() {
                        delivery.take()
                    } else {
                        delivery.clone()
                    };
                    let Some(delivery) = copy else { break };
                    if lane != Lane::Current {
                        // A `sendTo` the pid of a reload's extra process:
                        // it is that process's alone, outside flow control
                        // (bounded by its mailbox).
                        let frame = Outbound::Message { seq: 0, delivery };
                        let attached = self.slots[slot].lane(lane).is_some_and(|(_, a)| a);
                        match self.push_to(slot, lane, frame, reply, pinned, out) {
                            Ok(()) if attached => delivered += 1,
                            Ok(()) => held += 1,
                            Err(full) => undelivered.push(self.undelivered_full(slot, full)),
                        }
                        continue;
                    }
                    if let Phase::Failed { .. } = self.slots[slot].phase {
                        let s = &self.slots[slot];
                        undelivered.push(Undelivered {
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
                    let frame = Outbound::Message { seq: 0, delivery };
                    match self.push(slot, frame, reply, pinned, out) {
                        Ok(()) => {
                            self.slots[slot].delivered += 1;
                            if attached {
                                delivered += 1;
                                let high = self.high_watermark();
                                let s = &mut self.slots[slot];
                                if !s.stalled && s.mailbox.messages() >= high {
                                    s.congested = true;
                                    congested.push(slot);
                                }
                            } else {
                                held += 1;
                            }
                        }
                        Err(full) => undelivered.push(self.undelivered_full(slot, full)),
                    }
                }
            }
        }
        SendResult {
            id: req.id,
            action,
            delivered,
            held,
            undelivered,
        }
    }

    /// Validates a send and resolves its target slots.
    fn check(
        &mut self,
        action: &str,
        data: &Bytes,
        target: Option<Target>,
        from: Role,
    ) -> Result<Targets, Undelivered> {
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
        let current = |slot| Targets::One(slot, Lane::Current);
        Ok(match target {
            Target::Broadcast => Targets::Slots(0..self.slots.len()),
            Target::Apps => Targets::Slots(apps),
            Target::Agent => current(AGENT),
            Target::Random if from == Role::App => current(AGENT),
            Target::Random => {
                let is_ready = |s: &SlotId| self.slots[*s].phase.is_ready();
                let count = apps.clone().filter(is_ready).count();
                if count == 0 {
                    return Err(invalid(
                        Code::Unavailable,
                        "sendRandom found no ready app worker to pick".into(),
                    ));
                }
                let pick = self.next_random() as usize % count;
                let is_ready = |s: &SlotId| self.slots[*s].phase.is_ready();
                match apps.filter(is_ready).nth(pick) {
                    Some(slot) => current(slot),
                    None => Targets::Slots(0..0),
                }
            }
            Target::Pid(pid) => match self
                .pids
                .get(&pid)
                .copied()
                .or_else(|| self.retired_slot(pid))
                .map(|slot| (slot, self.overlap_lane(slot, pid)))
            {
                // A standby is not addressable until it takes over: what is
                // sent to the slot before must reach it first, and nobody
                // has heard its pid yet (it is in no egg-pids).
                Some((slot, Some(Lane::Standby))) => {
                    let s = &self.slots[slot];
                    return Err(Undelivered {
                        code: Code::Unavailable,
                        message: format!(
                            "pid {pid} is starting to replace {} in a reload and takes messages once it has taken over",
                            s.name()
                        ),
                        pid,
                        worker_id: s.worker_id,
                        role: Some(s.role),
                    });
                }
                Some((slot, Some(lane))) => Targets::One(slot, lane),
                // A detached process can never read again (its secret is
                // spent): it is as gone as an exited one.
                Some((slot, None))
                    if self.slots[slot].phase.pid() == Some(pid)
                        && !matches!(
                            self.slots[slot].phase,
                            Phase::Exited { .. } | Phase::Failed { .. } | Phase::Detached { .. }
                        ) =>
                {
                    current(slot)
                }
                Some((slot, None)) => {
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

    /// Which of `slot`'s reload processes has this pid, if one has.
    fn overlap_lane(&self, slot: SlotId, pid: u32) -> Option<Lane> {
        let s = &self.slots[slot];
        [(&s.standby, Lane::Standby), (&s.outgoing, Lane::Outgoing)]
            .into_iter()
            .find_map(|(o, lane)| o.as_ref().filter(|o| o.pid == pid).map(|_| lane))
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
        match self.lane_of(conn) {
            Some(Lane::Current) => {}
            Some(lane) => {
                let pid = self.slots[conn.slot].overlap(lane).map_or(0, |o| o.pid);
                self.end_overlap(conn.slot, lane, out);
                // An outgoing process is on its way out already; a standby
                // that hangs up is of no use and is ended.
                if lane == Lane::Standby {
                    out.push(Action::Detached {
                        slot: conn.slot,
                        pid,
                    });
                }
                return;
            }
            None => return,
        }
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

    /// A reload's extra process is gone (its stream ended or it exited).
    /// A standby takes with it only what was its own; an outgoing process
    /// gives back what it had not acknowledged, ahead of everything queued
    /// for the new process, which may then be written to.
    fn end_overlap(&mut self, slot: SlotId, lane: Lane, out: &mut Vec<Action>) {
        let s = &mut self.slots[slot];
        let gone = match lane {
            Lane::Current => return,
            Lane::Standby => s.standby.take(),
            Lane::Outgoing => s.outgoing.take(),
        };
        let Some(mut o) = gone else { return };
        let lost = o.mailbox.end_incarnation();
        o.mailbox.hand_over(&mut s.mailbox, Place::Front);
        let name = s.name();
        if !s.mailbox.is_empty() {
            out.push(Action::Wake(slot));
        }
        self.retire(o.pid, slot);
        for u in lost {
            let why = format!("pid {} ({name}) exited before handling the message", o.pid);
            self.report(slot, u, Code::NotFound, why, out);
        }
    }

    /// The process `pid` of `slot` exited.
    pub fn exited(&mut self, slot: SlotId, pid: u32, out: &mut Vec<Action>) {
        if let Some(lane) = self.overlap_lane(slot, pid) {
            return self.end_overlap(slot, lane, out);
        }
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
        self.pids.get(&pid).copied().filter(|&s| {
            self.slots[s].phase.pid() == Some(pid) || self.overlap_lane(s, pid).is_some()
        })
    }

    /// True while a secret belongs to one of the cluster's processes (used
    /// to refuse child secrets on admin RPCs with a precise reason).
    pub fn is_child_secret(&self, candidate: &str) -> bool {
        self.secret_owner(candidate).is_some()
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
            // A reload's standby is stopped like the rest; the outgoing
            // process has had its notice.
            if let Some(o) = &self.slots[slot].standby {
                pids.push((slot, o.pid));
                if o.attached.is_some() {
                    let notice = Outbound::Shutdown { grace_ms };
                    let _ = self.push_to(slot, Lane::Standby, notice, None, None, out);
                }
            }
            pids.extend(self.slots[slot].outgoing.as_ref().map(|o| (slot, o.pid)));
        }
        pids
    }

    /// Writes up to `max` frames for `conn` into `buf`, while it has room.
    /// Returns false when the stream must end (the incarnation is gone or
    /// detached).
    pub fn drain(
        &mut self,
        conn: Conn,
        buf: &mut impl FrameSink,
        max: usize,
        out: &mut Vec<Action>,
    ) -> bool {
        let low = self.low_watermark();
        let lane = match self.lane_of(conn) {
            Some(Lane::Current) => Lane::Current,
            Some(lane) => {
                let Some(o) = self.slots[conn.slot].overlap(lane) else {
                    return false;
                };
                let Some(acks) = o.attached else { return false };
                o.mailbox.drain_into(buf, max, acks);
                return true;
            }
            None => return false,
        };
        debug_assert_eq!(lane, Lane::Current);
        let Some(s) = self.current(conn) else {
            return false;
        };
        let Phase::Attached { acks, .. } = s.phase else {
            return false;
        };
        if s.handing_over() {
            // Messages are written once the outgoing process is done with
            // its share; the control frames ahead of them need not wait.
            s.mailbox.drain_controls_into(buf, max);
            return true;
        }
        let written = s.mailbox.drain_into(buf, max, acks);
        s.progress += written as u64;
        self.relieve(conn.slot, low, out);
        true
    }

    /// The child of `conn` handled every message up to `seq`.
    pub fn ack(&mut self, conn: Conn, seq: u64, out: &mut Vec<Action>) {
        let low = self.low_watermark();
        if let Some(lane @ (Lane::Standby | Lane::Outgoing)) = self.lane_of(conn) {
            let s = &mut self.slots[conn.slot];
            let Some(o) = s.overlap(lane) else { return };
            let released = o.mailbox.ack(seq);
            if lane == Lane::Outgoing && released > 0 {
                // The outgoing process's progress is the slot's progress:
                // senders waiting on the slot keep waiting, and once it is
                // done the new process is written to.
                s.progress += released as u64;
                if !s.handing_over() {
                    out.push(Action::Wake(conn.slot));
                }
            }
            return;
        }
        let Some(s) = self.current(conn) else { return };
        if matches!(s.phase, Phase::Attached { acks: true, .. }) {
            s.progress += s.mailbox.ack(seq) as u64;
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

    /// The slot's progress so far (frames written, messages acknowledged).
    pub fn progress(&self, slot: SlotId) -> u64 {
        self.slots[slot].progress
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

    /// Which of its slot's processes a stream belongs to, if it still
    /// belongs to one.
    fn lane_of(&self, conn: Conn) -> Option<Lane> {
        let s = self.slots.get(conn.slot)?;
        let is = |o: &Option<Overlap>| {
            o.as_ref()
                .is_some_and(|o| o.incarnation == conn.incarnation)
        };
        if s.incarnation == conn.incarnation {
            Some(Lane::Current)
        } else if is(&s.standby) {
            Some(Lane::Standby)
        } else if is(&s.outgoing) {
            Some(Lane::Outgoing)
        } else {
            None
        }
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
        self.push_to(slot, Lane::Current, frame, reply, pinned, out)
    }

    /// [`Router::push`] for one of the slot's processes. A process that is
    /// gone refuses as a full mailbox would not: the frame is simply moot.
    fn push_to(
        &mut self,
        slot: SlotId,
        lane: Lane,
        frame: Outbound,
        reply: Option<ReplyTo>,
        pinned: Option<u32>,
        out: &mut Vec<Action>,
    ) -> Result<(), Full> {
        let bounds = self.limits.mailbox;
        let s = &mut self.slots[slot];
        let Some((mailbox, attached)) = s.lane(lane) else {
            return Ok(());
        };
        let was_empty = mailbox.is_empty();
        match mailbox.push(frame, reply, pinned, bounds) {
            Ok(()) => {
                if attached && was_empty {
                    out.push(Action::Wake(slot));
                }
                Ok(())
            }
            Err(Refused { full, frame }) => {
                s.dropped += 1;
                let what = match frame {
                    Outbound::Message { delivery, .. } => delivery.action,
                    other => Arc::from(frame_kind(&other)),
                };
                out.push(Action::Dropped { slot, full, what });
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

/// The processes a send goes to, without allocating: the route's slots'
/// current processes, or one process.
enum Targets {
    /// These slots' current processes.
    Slots(std::ops::Range<SlotId>),
    /// One process.
    One(SlotId, Lane),
}

impl Iterator for Targets {
    type Item = (SlotId, Lane);

    fn next(&mut self) -> Option<(SlotId, Lane)> {
        match self {
            Targets::Slots(slots) => slots.next().map(|s| (s, Lane::Current)),
            Targets::One(slot, lane) => {
                let one = (*slot, *lane);
                *self = Targets::Slots(0..0);
                Some(one)
            }
        }
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
        // Written again, they get fresh numbers, still ascending.
        let last = seqs[2];
        assert_eq!(
            got,
            vec![
                (last + 1, b"t".to_vec()),
                (last + 2, b"t".to_vec()),
                (last + 3, b"u".to_vec())
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

    /// Sends `action` with `n` as its payload from the agent to the apps.
    fn tick(f: &mut Fixture, action: &str, n: u8) {
        let conn = f.conn(AGENT);
        let req = SendRequest {
            id: 0,
            target: Some(Target::Apps),
            action: action.into(),
            data: Bytes::from(vec![n]),
            want_result: false,
        };
        f.router.send(conn, req, &mut f.actions);
    }

    /// Drains a stream by its conn: (seq, payload) of its messages, and
    /// the kinds of the other frames.
    fn drain_conn(f: &mut Fixture, conn: Conn) -> (Vec<(u64, u8)>, Vec<&'static str>) {
        let mut buf = VecDeque::new();
        f.router.drain(conn, &mut buf, usize::MAX, &mut f.actions);
        let mut messages = Vec::new();
        let mut others = Vec::new();
        for frame in buf {
            match frame {
                Outbound::Message { seq, delivery } => messages.push((seq, delivery.data[0])),
                other => others.push(frame_kind(&other)),
            }
        }
        (messages, others)
    }

    /// An agent and two apps, up; app 1 acknowledges what it handles.
    fn reload_fixture() -> Fixture {
        let mut f = Fixture::new(2);
        f.register(AGENT);
        f.register_with(1, "s1".into(), true);
        f.register(2);
        for slot in 0..=2 {
            f.ready(slot);
        }
        for slot in 0..=2 {
            f.frames(slot);
        }
        f.actions.clear();
        f
    }

    /// Launches, registers and (optionally) readies a standby for slot 1.
    fn standby(f: &mut Fixture, pid: u32, secret: &str, ready: bool) -> Conn {
        assert_eq!(f.router.standby_refused(1), None);
        f.router.spawned_standby(1, pid, secret.into(), 5000);
        assert!(f.router.standby_refused(1).is_some(), "one at a time");
        let reg = Registration {
            secret: secret.into(),
            role: Some(Role::App),
            acks: true,
        };
        let (id, conn) = f.router.register(&reg, &mut f.actions).expect("registers");
        assert_eq!((id.pid, id.worker_id), (pid, 1));
        if ready {
            f.router.ready(conn, &mut f.actions);
        }
        conn
    }

    #[test]
    fn a_reload_standby_takes_over_when_ready_and_the_old_process_hands_over_in_order() {
        let mut f = reload_fixture();
        let old = f.conn(1);
        for n in 1..=3 {
            tick(&mut f, "m", n);
        }
        let (written, _) = drain_conn(&mut f, old);
        assert_eq!(written.iter().map(|m| m.1).collect::<Vec<_>>(), [1, 2, 3]);
        f.router.ack(old, written[0].0, &mut f.actions);

        // The standby starts while the old process keeps the slot's traffic.
        let new = standby(&mut f, 201, "n1", false);
        assert_eq!(new.incarnation, 2);
        tick(&mut f, "m", 4);
        let (before, kinds) = drain_conn(&mut f, new);
        assert!(before.is_empty(), "no message before the promotion");
        assert_eq!(kinds, ["egg-pids"]);
        let states: Vec<&str> = f.router.view().iter().map(|v| v.state).collect();
        assert_eq!(states, ["ready", "ready", "standby", "ready"]);
        tick(&mut f, "m", 5);

        // Ready: promoted. The old process gets only its notice; the agent
        // hears the new pid set.
        f.actions.clear();
        f.router.ready(new, &mut f.actions);
        assert!(f.actions.contains(&Action::Promoted {
            slot: 1,
            old_pid: Some(pid(1)),
            new_pid: 201,
            incarnation: 2,
        }));
        let pids = f.frames(AGENT).into_iter().find_map(|o| match o {
            Outbound::EggPids(p) => Some(p.to_vec()),
            _ => None,
        });
        assert_eq!(pids, Some(vec![201, pid(2)]));
        assert_eq!(drain_conn(&mut f, old), (vec![], vec!["shutdown"]));
        let states: Vec<&str> = f.router.view().iter().map(|v| v.state).collect();
        assert_eq!(states, ["ready", "ready", "retiring", "ready"]);

        // The new process waits while the old one has unacked messages;
        // a sendTo the old pid still reaches the old process.
        tick(&mut f, "m", 6);
        let (held, kinds) = drain_conn(&mut f, new);
        assert!(
            held.is_empty(),
            "handover: nothing before the old one is done"
        );
        assert_eq!(kinds, ["egg-ready"]);
        let agent = f.conn(AGENT);
        let req = SendRequest {
            id: 77,
            target: Some(Target::Pid(pid(1))),
            action: "direct".into(),
            data: Bytes::from_static(&[9]),
            want_result: false,
        };
        f.router.send(agent, req, &mut f.actions);
        let (direct, _) = drain_conn(&mut f, old);
        assert_eq!(direct.iter().map(|m| m.1).collect::<Vec<_>>(), [9]);
        f.router.ack(old, written[1].0, &mut f.actions);
        assert!(
            drain_conn(&mut f, new).0.is_empty(),
            "message 3 is still out"
        );

        // The old process exits without acknowledging 3 or the direct
        // message: 3 goes to the new process ahead of the rest, in order;
        // the direct one is reported to its sender.
        f.router.exited(1, pid(1), &mut f.actions);
        let (handed, _) = drain_conn(&mut f, new);
        assert_eq!(handed.iter().map(|m| m.1).collect::<Vec<_>>(), [3, 4, 5, 6]);
        assert!(handed.windows(2).all(|w| w[0].0 < w[1].0), "{handed:?}");
        let report = f.result(AGENT);
        assert_eq!(report.id, 77);
        assert_eq!(report.undelivered[0].code, Code::NotFound);
        assert!(report.undelivered[0].message.contains("exited"));
        assert_eq!(f.router.view().len(), 3, "no extra process left");
        assert_eq!(f.router.slot_of_pid(201), Some(1));
        assert_eq!(f.router.slot_of_pid(pid(1)), None);
        f.send(AGENT, Some(Target::Pid(pid(1))), "late", b"x");
        let late = f.result(AGENT);
        assert!(
            late.undelivered[0].message.contains("has exited"),
            "{late:?}"
        );
    }

    #[test]
    fn an_outgoing_process_that_acknowledges_everything_opens_the_way_at_once() {
        let mut f = reload_fixture();
        let old = f.conn(1);
        tick(&mut f, "m", 1);
        let (written, _) = drain_conn(&mut f, old);
        let new = standby(&mut f, 201, "n1", true);
        tick(&mut f, "m", 2);
        assert!(drain_conn(&mut f, new).0.is_empty());
        f.actions.clear();
        f.router.ack(old, written[0].0, &mut f.actions);
        assert!(f.actions.contains(&Action::Wake(1)), "{:?}", f.actions);
        assert_eq!(
            drain_conn(&mut f, new)
                .0
                .iter()
                .map(|m| m.1)
                .collect::<Vec<_>>(),
            [2]
        );
        // The old process can still send while it leaves; its results
        // come back to it, not to the new process.
        let req = SendRequest {
            id: 5,
            target: Some(Target::Agent),
            action: "bye".into(),
            data: Bytes::from_static(b"b"),
            want_result: true,
        };
        f.router.send(old, req, &mut f.actions);
        let (_, kinds) = drain_conn(&mut f, old);
        assert_eq!(kinds, ["shutdown", "send result"]);
        let bye = f.messages(AGENT);
        assert_eq!(bye[0].from.pid, pid(1));
        // Its stream ends: it is forgotten, and its stream is told to end.
        f.router.detach(old, &mut f.actions);
        let mut buf = VecDeque::new();
        assert!(!f.router.drain(old, &mut buf, 10, &mut f.actions));
    }

    #[test]
    fn a_standby_that_fails_leaves_the_old_process_serving() {
        let mut f = reload_fixture();
        let old = f.conn(1);
        let new = standby(&mut f, 201, "n1", false);
        f.router.exited(1, 201, &mut f.actions);
        assert_eq!(f.router.view().len(), 3);
        assert_eq!(f.router.standby_refused(1), None);
        assert_eq!(f.router.next_incarnation(1), 3, "incarnations stay unique");
        let mut buf = VecDeque::new();
        assert!(!f.router.drain(new, &mut buf, 10, &mut f.actions));
        tick(&mut f, "m", 1);
        assert_eq!(drain_conn(&mut f, old).0.len(), 1);
        // A standby that hangs up is reported so it can be ended.
        let again = standby(&mut f, 202, "n2", false);
        f.actions.clear();
        f.router.detach(again, &mut f.actions);
        assert!(f.actions.contains(&Action::Detached { slot: 1, pid: 202 }));
        assert_eq!(f.router.standby_refused(1), None);
        // Its secret is spent.
        let reg = Registration {
            secret: "n2".into(),
            role: Some(Role::App),
            acks: false,
        };
        assert!(f.router.register(&reg, &mut f.actions).is_err());
    }

    #[test]
    fn a_standby_takes_over_a_slot_whose_old_process_crashed_meanwhile() {
        let mut f = reload_fixture();
        let old = f.conn(1);
        tick(&mut f, "m", 1);
        drain_conn(&mut f, old);
        let new = standby(&mut f, 201, "n1", false);
        f.router.exited(1, pid(1), &mut f.actions);
        tick(&mut f, "m", 2);
        f.actions.clear();
        f.router.ready(new, &mut f.actions);
        assert!(f.actions.iter().any(|a| matches!(
            a,
            Action::Promoted {
                slot: 1,
                new_pid: 201,
                ..
            }
        )));
        let (got, _) = drain_conn(&mut f, new);
        assert_eq!(got.iter().map(|m| m.1).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(f.router.view().len(), 3);
        f.send(AGENT, Some(Target::Pid(pid(1))), "late", b"x");
        assert_eq!(f.result(AGENT).undelivered[0].code, Code::NotFound);
    }

    #[test]
    fn shutdown_reaches_a_reloads_extra_processes() {
        let mut f = reload_fixture();
        let new = standby(&mut f, 201, "n1", false);
        let pids = f.router.shutdown(Role::App, 100, &mut f.actions);
        assert!(
            pids.contains(&(1, 201)) && pids.contains(&(1, pid(1))),
            "{pids:?}"
        );
        assert!(drain_conn(&mut f, new).1.contains(&"shutdown"));
    }
}
