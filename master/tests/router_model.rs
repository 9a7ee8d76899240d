//! Model-based property tests of the router (egg-model.md §6).
//!
//! Random sequences of lifecycle and traffic events are driven through the
//! pure `Router`, and what comes out of its mailboxes is checked against a
//! small reference model of the contract:
//!
//! - routing: each send accounts for every target of its route exactly once
//!   (delivered, held or reported), and reaches the slots Egg's table names;
//! - ordering: per sender process → receiver process, messages arrive in
//!   send order, without duplicates;
//! - the barrier: no egg-ready before every slot was ready at once, and at
//!   most one per process incarnation;
//! - no loss: with room in every mailbox, every accepted message is handled
//!   by its slot (acknowledged, or written to a process that does not
//!   acknowledge) through crashes, restarts and reloads, or its sender is
//!   told why not;
//! - bounds: a mailbox never holds more frames than its bounds (messages
//!   plus control room), a slot in a reload's handover at most twice that;
//! - reloads: a standby launched beside an app worker's ready process
//!   (exactly when `standby_refused` says so) takes the slot over when
//!   ready; the outgoing process may still drain, acknowledge, send and get
//!   `sendTo` its pid. The new process is written none of a sender's slot
//!   messages while the outgoing one holds an earlier one unacknowledged;
//!   per sender → receiving SLOT, the slot's messages arrive in send order
//!   across the switch, once each, except those a process left
//!   unacknowledged when it crashed or hung up (written again, once, to
//!   the slot's next process). With processes that acknowledge what they
//!   handle before they leave, nothing is written twice;
//! - ended streams: told to end, given nothing, and their late events
//!   change nothing.
//!
//! Router issues these tests found are kept at the end of the file as
//! regression cases.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};

use bytes::Bytes;
use clutch::types::SendRequest;
use clutch::{Code, Outbound, Registration, Role, Target};
use master::mailbox::{Bounds, CONTROL_CAPACITY};
use master::router::{Action, Conn, Limits, Router, SlotId, AGENT};
use proptest::prelude::*;

const WORKERS: usize = 3;
const SLOTS: usize = WORKERS + 1;

#[derive(Clone, Copy, Debug)]
enum To {
    Broadcast,
    Apps,
    Agent,
    Random,
    /// The current pid of this slot.
    PidOf(usize),
    /// The pid of this slot's standby or outgoing process, if it has one.
    PidOfExtra(usize),
    /// A pid no process ever had.
    Bogus,
}

/// One of a slot's processes: its current one, or a reload's extra one
/// (the standby before its promotion, the outgoing one after).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Who {
    Cur(usize),
    Extra(usize),
}

impl Who {
    fn slot(self) -> SlotId {
        match self {
            Who::Cur(s) | Who::Extra(s) => s,
        }
    }
}

#[derive(Clone, Debug)]
enum Op {
    Register(Who, bool),
    Ready(Who),
    Send(Who, To),
    Drain(Who, usize),
    /// Acknowledge all but the last `n` messages written.
    Ack(Who, usize),
    Detach(Who),
    Exit(Who),
    Respawn(usize),
    /// Launch a reload's standby for the slot (when the router takes one).
    Reload(usize),
    /// A whole reload step at once: launch a standby, which registers
    /// (acknowledging or not) and says it is ready.
    Replace(usize, bool),
    /// An event from a stream whose process is gone or cut off: one of the
    /// ended streams (by index), and which event.
    Stale(usize, u8),
}

/// Which slots from `from` on ops pick: evenly, or (`focus`) mostly app
/// worker 1 and slot `from` (the agent, when it may be picked), so that one
/// slot goes through many reloads while one sender keeps writing to it.
fn slots(focus: bool, from: usize) -> BoxedStrategy<usize> {
    if focus {
        prop_oneof![4 => Just(1), 2 => Just(from), 1 => from..SLOTS].boxed()
    } else {
        (from..SLOTS).boxed()
    }
}

fn who(focus: bool) -> impl Strategy<Value = Who> {
    prop_oneof![
        3 => slots(focus, 0).prop_map(Who::Cur),
        2 => slots(focus, 1).prop_map(Who::Extra),
    ]
}

/// Random events; with `focus`, reloads are more frequent and mostly of
/// one slot (see [`slots`]).
fn op(focus: bool) -> impl Strategy<Value = Op> {
    let to = prop_oneof![
        Just(To::Broadcast),
        Just(To::Apps),
        Just(To::Agent),
        Just(To::Random),
        slots(focus, 0).prop_map(To::PidOf),
        slots(focus, 1).prop_map(To::PidOfExtra),
        Just(To::Bogus),
    ];
    // With focus, processes also leave more often, so that outgoing ones
    // leave with messages unacknowledged.
    let (reload, replace, detach, exit) = if focus { (4, 3, 2, 3) } else { (2, 1, 1, 2) };
    prop_oneof![
        3 => (who(focus), any::<bool>()).prop_map(|(w, a)| Op::Register(w, a)),
        3 => who(focus).prop_map(Op::Ready),
        8 => (who(focus), to).prop_map(|(w, t)| Op::Send(w, t)),
        6 => (who(focus), 1..6usize).prop_map(|(w, n)| Op::Drain(w, n)),
        3 => (who(focus), prop_oneof![2 => Just(0), 1 => 1..3usize])
            .prop_map(|(w, n)| Op::Ack(w, n)),
        detach => who(focus).prop_map(Op::Detach),
        exit => who(focus).prop_map(Op::Exit),
        2 => slots(focus, 0).prop_map(Op::Respawn),
        reload => slots(focus, 0).prop_map(Op::Reload),
        replace => (slots(focus, 0), any::<bool>()).prop_map(|(s, a)| Op::Replace(s, a)),
        1 => (any::<usize>(), 0..5u8).prop_map(|(i, e)| Op::Stale(i, e)),
    ]
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Kind {
    /// The slot's current process.
    #[default]
    Current,
    /// A reload's new process, not promoted yet.
    Standby,
    /// The process a promoted standby replaced.
    Outgoing,
}

/// The harness's view of one process.
#[derive(Default)]
struct Proc {
    pid: u32,
    kind: Kind,
    alive: bool,
    conn: Option<Conn>,
    /// Registered and not detached.
    attached: bool,
    /// It registered as acknowledging what it handles.
    acks: bool,
    ready: bool,
    egg_ready: u32,
    highest_seq: u64,
    /// (seq, message id) written to it and not acknowledged yet.
    unacked: Vec<(u64, u64)>,
    /// Last message id received from each sender pid (ordering check).
    last_from: HashMap<u32, u64>,
}

/// What the contract says about one send.
struct Sent {
    sender_pid: u32,
    /// Slots it must reach (for random: candidates, exactly one must).
    targets: BTreeSet<SlotId>,
    random: bool,
    pinned: bool,
    /// For a pinned send, the pid it names.
    to_pid: u32,
}

struct World {
    router: Router,
    procs: Vec<Proc>,
    /// Each slot's reload process: its standby, or its outgoing process.
    extra: Vec<Option<Proc>>,
    /// Processes the router let go of that still run: (slot, pid).
    zombies: Vec<(SlotId, u32)>,
    /// Streams that ended (their process detached or exited).
    ended: Vec<Conn>,
    /// (slot, incarnation) of every stream that registered.
    incarnations: HashSet<(SlotId, u32)>,
    next_pid: u32,
    next_id: u64,
    sent: HashMap<u64, Sent>,
    /// (message id, receiving slot) pairs seen.
    received: HashSet<(u64, SlotId)>,
    /// (message id, slot) pairs a process of the slot handled: acknowledged,
    /// or was written without acknowledging.
    handled: HashSet<(u64, SlotId)>,
    /// Per (receiving slot, sender pid): the last slot message received.
    slot_last: HashMap<(SlotId, u32), u64>,
    /// (message id, slot) pairs a process of the slot left unacknowledged
    /// when it crashed or hung up: they may be written again, once.
    rewritten: HashSet<(u64, SlotId)>,
    /// Message ids whose sender was told NOT_FOUND for a pinned target.
    reported: HashSet<u64>,
    /// Slots that were ready at the same moment: the barrier has passed.
    cluster_ready: bool,
    /// Processes acknowledge everything they drained before they exit or
    /// hang up, and always register as acknowledging.
    graceful: bool,
    bound: usize,
    out: Vec<Action>,
}

fn role(slot: SlotId) -> Role {
    if slot == AGENT {
        Role::Agent
    } else {
        Role::App
    }
}

impl World {
    fn new(mailbox_messages: usize, graceful: bool) -> World {
        let limits = Limits {
            mailbox: Bounds {
                messages: mailbox_messages,
                bytes: 1 << 20,
            },
            ..Limits::default()
        };
        let mut w = World {
            router: Router::new(1, WORKERS, limits, 99),
            procs: (0..SLOTS).map(|_| Proc::default()).collect(),
            extra: (0..SLOTS).map(|_| None).collect(),
            zombies: Vec::new(),
            ended: Vec::new(),
            incarnations: HashSet::new(),
            next_pid: 100,
            next_id: 1,
            sent: HashMap::new(),
            received: HashSet::new(),
            handled: HashSet::new(),
            slot_last: HashMap::new(),
            rewritten: HashSet::new(),
            reported: HashSet::new(),
            cluster_ready: false,
            graceful,
            bound: mailbox_messages,
            out: Vec::new(),
        };
        for slot in 0..SLOTS {
            w.respawn(slot);
        }
        w
    }

    fn proc(&self, who: Who) -> Option<&Proc> {
        match who {
            Who::Cur(s) => Some(&self.procs[s]),
            Who::Extra(s) => self.extra[s].as_ref(),
        }
    }

    fn proc_mut(&mut self, who: Who) -> Option<&mut Proc> {
        match who {
            Who::Cur(s) => Some(&mut self.procs[s]),
            Who::Extra(s) => self.extra[s].as_mut(),
        }
    }

    /// The stream of an attached process.
    fn conn(&self, who: Who) -> Option<Conn> {
        self.proc(who)
            .filter(|p| p.alive && p.attached)
            .and_then(|p| p.conn)
    }

    fn has_standby(&self, slot: SlotId) -> bool {
        self.extra[slot]
            .as_ref()
            .is_some_and(|p| p.kind == Kind::Standby)
    }

    fn respawn(&mut self, slot: SlotId) {
        // The cluster does not restart a slot whose reload's standby is
        // about to take it over.
        if self.procs[slot].alive || self.has_standby(slot) {
            return;
        }
        self.next_pid += 1;
        let pid = self.next_pid;
        self.router
            .spawned(slot, pid, format!("secret-{pid}"), &mut self.out);
        self.procs[slot] = Proc {
            pid,
            alive: true,
            ..Proc::default()
        };
    }

    /// Launches a reload's standby, if the router takes one; checks that it
    /// takes one exactly when the slot is an app with a ready process and
    /// no reload in progress.
    fn reload(&mut self, slot: SlotId) {
        // The cluster reloads only after egg-ready.
        if !self.cluster_ready {
            return;
        }
        let p = &self.procs[slot];
        let expected =
            slot != AGENT && self.extra[slot].is_none() && p.alive && p.attached && p.ready;
        let refused = self.router.standby_refused(slot);
        assert_eq!(
            refused.is_none(),
            expected,
            "slot {slot}: standby_refused said {refused:?}"
        );
        if refused.is_some() {
            return;
        }
        self.next_pid += 1;
        let pid = self.next_pid;
        self.router
            .spawned_standby(slot, pid, format!("secret-{pid}"), 1000);
        assert!(self.router.standby_refused(slot).is_some(), "one at a time");
        self.extra[slot] = Some(Proc {
            pid,
            kind: Kind::Standby,
            alive: true,
            ..Proc::default()
        });
    }

    fn register(&mut self, who: Who, acks: bool) {
        let acks = acks || self.graceful;
        let slot = who.slot();
        let Some(p) = self.proc(who) else { return };
        if !p.alive || p.conn.is_some() {
            return;
        }
        let pid = p.pid;
        let reg = Registration {
            secret: format!("secret-{}", p.pid),
            role: Some(role(slot)),
            acks,
        };
        let (id, conn) = self
            .router
            .register(&reg, &mut self.out)
            .expect("a fresh secret registers");
        assert_eq!((id.pid, id.worker_id), (pid, slot as u32));
        assert_eq!((conn.slot, conn.incarnation), (slot, id.incarnation));
        assert!(
            self.incarnations.insert((slot, conn.incarnation)),
            "slot {slot}: incarnation {} registered twice",
            conn.incarnation
        );
        let p = self.proc_mut(who).expect("checked above");
        p.conn = Some(conn);
        p.attached = true;
        p.acks = acks;
    }

    fn ready(&mut self, who: Who) {
        let Some(conn) = self.conn(who) else { return };
        let slot = who.slot();
        let kind = self.proc(who).map(|p| p.kind);
        self.router.ready(conn, &mut self.out);
        match kind {
            Some(Kind::Current) => {
                self.procs[slot].ready = true;
                if self.procs.iter().all(|p| p.alive && p.attached && p.ready) {
                    self.cluster_ready = true;
                }
            }
            Some(Kind::Standby) => self.promoted(slot),
            // An outgoing process's `ready` changes nothing.
            _ => assert!(
                !self
                    .out
                    .iter()
                    .any(|a| matches!(a, Action::Ready { .. } | Action::Promoted { .. })),
                "an outgoing process's ready did something: {:?}",
                self.out
            ),
        }
    }

    /// The slot's standby said it is ready: it takes the slot over, and the
    /// old process, if its stream is up, becomes the outgoing one.
    fn promoted(&mut self, slot: SlotId) {
        let mut new = self.extra[slot].take().expect("a standby");
        let old_pid = self.procs[slot].pid;
        assert!(
            self.out.contains(&Action::Promoted {
                slot,
                old_pid: Some(old_pid),
                new_pid: new.pid,
                incarnation: new.conn.expect("registered").incarnation,
            }),
            "slot {slot}: the ready standby {} was not promoted over {old_pid}: {:?}",
            new.pid,
            self.out
        );
        new.kind = Kind::Current;
        new.ready = true;
        let mut old = std::mem::replace(&mut self.procs[slot], new);
        if old.alive && old.attached {
            old.kind = Kind::Outgoing;
            self.extra[slot] = Some(old);
        } else if old.alive {
            self.zombies.push((slot, old.pid));
        }
    }

    fn send(&mut self, who: Who, to: To) {
        let Some(conn) = self.conn(who) else { return };
        let slot = who.slot();
        let sender_pid = self.proc(who).map_or(0, |p| p.pid);
        let from_app = slot != AGENT;
        let pinned_to = |p: Option<&Proc>, s: SlotId| match p {
            Some(p) => {
                let live = p.alive && p.pid != 0;
                Some((p.pid, if live { [s].into() } else { BTreeSet::new() }))
            }
            None => None,
        };
        let (target, targets, random, pinned): (Target, BTreeSet<SlotId>, bool, bool) = match to {
            To::Broadcast => (Target::Broadcast, (0..SLOTS).collect(), false, false),
            To::Apps => (Target::Apps, (1..SLOTS).collect(), false, false),
            To::Agent => (Target::Agent, [AGENT].into(), false, false),
            To::Random if from_app => (Target::Random, [AGENT].into(), false, false),
            To::Random => {
                let ready: BTreeSet<SlotId> = (1..SLOTS)
                    .filter(|&s| {
                        self.procs[s].alive && self.procs[s].attached && self.procs[s].ready
                    })
                    .collect();
                (Target::Random, ready, true, false)
            }
            To::PidOf(s) => {
                let (pid, t) = pinned_to(Some(&self.procs[s]), s).expect("a process");
                (Target::Pid(pid), t, false, true)
            }
            // A standby is not addressable until it takes over: refused
            // (UNAVAILABLE), so it never gets a message ahead of the slot's.
            To::PidOfExtra(s) => {
                match (pinned_to(self.extra[s].as_ref(), s), self.extra[s].as_ref()) {
                    (Some((pid, _)), Some(p)) if p.kind == Kind::Standby => {
                        (Target::Pid(pid), BTreeSet::new(), false, true)
                    }
                    (Some((pid, t)), _) => (Target::Pid(pid), t, false, true),
                    (None, _) => return,
                }
            }
            To::Bogus => (Target::Pid(7), BTreeSet::new(), false, true),
        };
        let id = self.next_id;
        self.next_id += 1;
        let req = SendRequest {
            id,
            target: Some(target),
            action: "m".into(),
            data: Bytes::copy_from_slice(&id.to_be_bytes()),
            want_result: true,
        };
        self.router.send(conn, req, &mut self.out);
        self.sent.insert(
            id,
            Sent {
                sender_pid,
                targets,
                random,
                pinned,
                to_pid: match target {
                    Target::Pid(pid) => pid,
                    _ => 0,
                },
            },
        );
    }

    fn drain(&mut self, who: Who, max: usize) {
        let Some(conn) = self.conn(who) else { return };
        let mut buf = VecDeque::new();
        self.router.drain(conn, &mut buf, max, &mut self.out);
        for frame in buf {
            self.observe(who, frame);
        }
    }

    fn observe(&mut self, who: Who, frame: Outbound) {
        let slot = who.slot();
        match frame {
            Outbound::Message { seq, delivery } => {
                let id = u64::from_be_bytes(delivery.data[..8].try_into().expect("8-byte id"));
                let from = delivery.from.pid;
                let sent = self.sent.get(&id).expect("a message somebody sent");
                let (pinned, sender_pid, to_pid) = (sent.pinned, sent.sender_pid, sent.to_pid);
                assert_eq!(from, sender_pid, "message {id} names the wrong sender");
                if !pinned {
                    self.check_handed_over(who, id, from);
                }
                let p = self.proc_mut(who).expect("drained by a process");
                assert!(
                    !pinned || p.pid == to_pid,
                    "{who:?}: pid {} got message {id} sent to pid {to_pid}",
                    p.pid
                );
                assert!(
                    seq > p.highest_seq,
                    "{who:?}: seq {seq} after {}",
                    p.highest_seq
                );
                p.highest_seq = seq;
                let last = p.last_from.insert(from, id);
                assert!(
                    last.is_none_or(|l| l < id),
                    "{who:?}: message {id} from pid {from} after {last:?}: out of order or duplicated"
                );
                if p.acks {
                    p.unacked.push((seq, id));
                } else {
                    self.handled.insert((id, slot));
                }
                // Per receiving slot: a message written again after its
                // process crashed with it unacknowledged is exempt (it may
                // repeat, ahead of later ones); every other one arrives once
                // and in send order across processes.
                let first = self.received.insert((id, slot));
                if !pinned && self.rewritten.contains(&(id, slot)) {
                    return;
                }
                assert!(
                    first,
                    "slot {slot}: message {id} from pid {from} written twice"
                );
                if !pinned {
                    let last = self.slot_last.insert((slot, from), id);
                    assert!(
                        last.is_none_or(|l| l < id),
                        "slot {slot} ({who:?}): message {id} from pid {from} after {last:?}: out of order across the slot's processes"
                    );
                }
            }
            Outbound::EggReady => {
                assert!(
                    self.cluster_ready,
                    "egg-ready at slot {slot} before every slot was ready at once"
                );
                let p = self.proc_mut(who).expect("drained by a process");
                p.egg_ready += 1;
                assert_eq!(
                    p.egg_ready, 1,
                    "{who:?}: a second egg-ready for one incarnation"
                );
            }
            Outbound::SendResult(r) => {
                let sent = &self.sent[&r.id];
                let sender = self.proc(who).map_or(0, |p| p.pid);
                assert_eq!(
                    sent.sender_pid, sender,
                    "the result of send {} went to another process",
                    r.id
                );
                let accounted = r.delivered as usize + r.held as usize + r.undelivered.len();
                let expected = match (sent.random, sent.pinned) {
                    (true, _) | (_, true) => 1,
                    _ => sent.targets.len(),
                };
                // A pinned message can also be reported again later, when its
                // process dies before handling it: that report has no counts.
                let late_report = r.delivered == 0
                    && r.held == 0
                    && r.undelivered
                        .iter()
                        .all(|u| u.message.contains("before handling"));
                if late_report && sent.pinned {
                    self.reported.insert(r.id);
                } else {
                    assert_eq!(
                        accounted, expected,
                        "send {} accounted for {accounted} targets: {r:?}",
                        r.id
                    );
                }
                for u in &r.undelivered {
                    if sent.pinned && u.code == Code::NotFound {
                        self.reported.insert(r.id);
                    }
                    if sent.pinned && sent.targets.is_empty() && u.code == Code::Unavailable {
                        assert!(
                            u.message.contains("takes messages once it has taken over"),
                            "a sendTo a standby was refused for another reason: {u:?}"
                        );
                        self.reported.insert(r.id);
                    }
                    if sent.random && sent.targets.is_empty() {
                        assert_eq!(u.code, Code::Unavailable);
                    }
                }
            }
            _ => {}
        }
    }

    /// A slot message from `from` is written to one of the slot's
    /// processes: the slot's other process (outgoing or current) must have
    /// handled (acknowledged) every earlier slot message from that sender
    /// it was written, so that the two never work on one sender's messages
    /// out of order.
    fn check_handed_over(&self, who: Who, id: u64, from: u32) {
        let other = match who {
            Who::Cur(s) => Who::Extra(s),
            Who::Extra(s) => Who::Cur(s),
        };
        let Some(o) = self.proc(other) else { return };
        let pending = o.unacked.iter().find(|&&(_, m)| {
            let sent = &self.sent[&m];
            m < id && !sent.pinned && sent.sender_pid == from
        });
        assert!(
            pending.is_none(),
            "{who:?} was written message {id} from pid {from} while {other:?} (pid {}) \
             still had {pending:?} unacknowledged",
            o.pid
        );
    }

    /// The process acknowledges every message written to it but the last
    /// `keep` (a process that does not acknowledge just says it is done).
    fn ack(&mut self, who: Who, keep: usize) {
        let Some(conn) = self.conn(who) else { return };
        let p = self.proc_mut(who).expect("attached");
        let seq = match p.unacked.len().checked_sub(keep + 1) {
            Some(i) => p.unacked[i].0,
            None if keep == 0 => p.highest_seq,
            None => return,
        };
        let (done, rest) = p.unacked.iter().partition(|&&(s, _)| s <= seq);
        p.unacked = rest;
        let done: Vec<(u64, u64)> = done;
        self.handled
            .extend(done.into_iter().map(|(_, id)| (id, who.slot())));
        self.router.ack(conn, seq, &mut self.out);
    }

    /// A process is gone or cut off: what it left unacknowledged may be
    /// written again to the slot's next process.
    fn left(&mut self, who: Who) {
        if self.graceful {
            self.ack(who, 0);
        }
        let slot = who.slot();
        let Some(p) = self.proc_mut(who) else { return };
        let unacked = std::mem::take(&mut p.unacked);
        assert!(
            !self.graceful || unacked.is_empty(),
            "a graceful process left messages unacknowledged"
        );
        self.rewritten
            .extend(unacked.into_iter().map(|(_, id)| (id, slot)));
    }

    fn detach(&mut self, who: Who) {
        let Some(conn) = self.conn(who) else { return };
        self.left(who);
        self.router.detach(conn, &mut self.out);
        self.ended(conn);
        match who {
            Who::Cur(slot) => {
                self.procs[slot].attached = false;
                self.procs[slot].ready = false;
            }
            Who::Extra(slot) => {
                // The router lets go of a reload's process whose stream ends.
                let p = self.extra[slot].take().expect("attached");
                if p.kind == Kind::Standby {
                    assert!(
                        self.out.contains(&Action::Detached { slot, pid: p.pid }),
                        "a standby that hangs up is reported"
                    );
                }
                self.zombies.push((slot, p.pid));
            }
        }
    }

    fn exit(&mut self, who: Who) {
        if !self.proc(who).is_some_and(|p| p.alive) {
            return;
        }
        let conn = self.conn(who);
        if conn.is_some() {
            self.left(who);
        }
        let slot = who.slot();
        let p = self.proc_mut(who).expect("alive");
        p.alive = false;
        p.attached = false;
        p.ready = false;
        let pid = p.pid;
        self.router.exited(slot, pid, &mut self.out);
        if let Some(conn) = conn {
            self.ended(conn);
        }
        if let Who::Extra(slot) = who {
            self.extra[slot] = None;
        }
    }

    /// A stream whose process detached or exited is told to end, and is
    /// given nothing more.
    fn ended(&mut self, conn: Conn) {
        let mut buf = VecDeque::new();
        let mut out = Vec::new();
        assert!(
            !self.router.drain(conn, &mut buf, usize::MAX, &mut out),
            "an ended stream {conn:?} is not told to end"
        );
        assert!(buf.is_empty(), "an ended stream {conn:?} got {buf:?}");
        self.ended.push(conn);
    }

    /// An event from an ended stream changes nothing.
    fn stale(&mut self, index: usize, event: u8) {
        if self.ended.is_empty() {
            return;
        }
        let conn = self.ended[index % self.ended.len()];
        let before = self.router.view();
        let mut out = Vec::new();
        match event {
            0 => {
                let req = SendRequest {
                    id: 0,
                    target: Some(Target::Broadcast),
                    action: "stale".into(),
                    data: Bytes::from_static(b"stale"),
                    want_result: true,
                };
                let congested = self.router.send(conn, req, &mut out);
                assert!(congested.is_empty());
            }
            1 => self.router.ack(conn, u64::MAX, &mut out),
            2 => self.router.ready(conn, &mut out),
            3 => self.router.detach(conn, &mut out),
            _ => {
                let mut buf = VecDeque::new();
                assert!(!self.router.drain(conn, &mut buf, usize::MAX, &mut out));
                assert!(buf.is_empty());
            }
        }
        assert!(
            out.is_empty(),
            "a stale {conn:?} (event {event}) did {out:?}"
        );
        assert_eq!(
            self.router.view(),
            before,
            "a stale {conn:?} changed the router"
        );
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Register(w, acks) => self.register(w, acks),
            Op::Ready(w) => self.ready(w),
            Op::Send(w, to) => self.send(w, to),
            Op::Drain(w, n) => self.drain(w, n),
            Op::Ack(w, n) => self.ack(w, n),
            Op::Detach(w) => self.detach(w),
            Op::Exit(w) => self.exit(w),
            Op::Respawn(s) => self.respawn(s),
            Op::Reload(s) => self.reload(s),
            Op::Replace(s, acks) => {
                if self.cluster_ready && self.router.standby_refused(s).is_none() {
                    self.reload(s);
                    self.register(Who::Extra(s), acks);
                    self.ready(Who::Extra(s));
                }
            }
            Op::Stale(i, e) => self.stale(i, e),
        }
        self.check_view();
        self.out.clear();
    }

    /// The router's listing matches the model's processes, and no mailbox
    /// passes its bounds.
    fn check_view(&self) {
        let view = self.router.view();
        let expected: Vec<(SlotId, Option<u32>, &str)> = (0..SLOTS)
            .flat_map(|s| {
                let cur = (s, Some(self.procs[s].pid), "");
                let extra = self.extra[s].as_ref().map(|p| {
                    let state = match p.kind {
                        Kind::Standby => "standby",
                        _ => "retiring",
                    };
                    (s, Some(p.pid), state)
                });
                std::iter::once(cur).chain(extra)
            })
            .collect();
        let got: Vec<(SlotId, Option<u32>, &str)> = view
            .iter()
            .map(|v| {
                let state = match v.state {
                    "standby" | "retiring" => v.state,
                    _ => "",
                };
                (v.slot, v.pid, state)
            })
            .collect();
        assert_eq!(got, expected, "the router's processes are not the model's");
        for (slot, p) in self.procs.iter().enumerate() {
            if let Some(conn) = p.conn.filter(|_| p.alive) {
                assert_eq!(
                    self.router.is_ready(slot, conn.incarnation),
                    p.attached && p.ready,
                    "slot {slot}: is_ready disagrees"
                );
            }
        }
        for slot in 0..SLOTS {
            let procs = std::iter::once(&self.procs[slot]).chain(self.extra[slot].as_ref());
            for p in procs.filter(|p| p.alive && (p.attached || p.conn.is_none())) {
                assert_eq!(
                    self.router.slot_of_pid(p.pid),
                    Some(slot),
                    "pid {} ({:?}) has no slot",
                    p.pid,
                    p.kind
                );
            }
        }
        for &(slot, pid) in &self.zombies {
            if self.procs[slot].pid != pid {
                assert_eq!(
                    self.router.slot_of_pid(pid),
                    None,
                    "a let-go pid {pid} has a slot"
                );
            }
        }
        for v in &view {
            assert!(
                v.pending <= self.bound + CONTROL_CAPACITY,
                "a mailbox holds {} frames, past its bounds: {v:?}",
                v.pending
            );
        }
        for slot in 0..SLOTS {
            let held: usize = view
                .iter()
                .filter(|v| v.slot == slot)
                .map(|v| v.pending)
                .sum();
            assert!(
                held <= 2 * (self.bound + CONTROL_CAPACITY),
                "slot {slot} holds {held} frames, past twice its bounds"
            );
        }
    }

    /// Registers every slot's process and readies it: the cluster is up.
    fn boot(&mut self, acks: [bool; SLOTS]) {
        for (slot, acks) in acks.into_iter().enumerate() {
            self.register(Who::Cur(slot), acks);
            self.ready(Who::Cur(slot));
        }
        assert!(self.cluster_ready);
        self.check_view();
        self.out.clear();
    }

    /// Brings every slot up and drains everything, acknowledging as it goes:
    /// standbys are promoted, outgoing processes finish and exit.
    fn settle(&mut self) {
        for slot in 1..SLOTS {
            if self.has_standby(slot) {
                self.register(Who::Extra(slot), true);
                self.ready(Who::Extra(slot));
            }
        }
        for (slot, pid) in std::mem::take(&mut self.zombies) {
            self.router.exited(slot, pid, &mut self.out);
        }
        for slot in 0..SLOTS {
            if self.procs[slot].alive && !self.procs[slot].attached {
                self.exit(Who::Cur(slot));
            }
            self.respawn(slot);
            self.register(Who::Cur(slot), true);
            self.ready(Who::Cur(slot));
        }
        self.drain_all();
        for slot in 1..SLOTS {
            if self.extra[slot].is_some() {
                self.ack(Who::Extra(slot), 0);
                self.exit(Who::Extra(slot));
            }
        }
        self.drain_all();
        self.check_view();
        self.out.clear();
        for v in self.router.view() {
            assert_eq!(
                (v.state, v.pending),
                ("ready", 0),
                "not quiet after settling: {v:?}"
            );
        }
    }

    fn drain_all(&mut self) {
        for _ in 0..4 {
            for slot in 0..SLOTS {
                for who in [Who::Extra(slot), Who::Cur(slot)] {
                    self.drain(who, usize::MAX);
                    self.ack(who, 0);
                }
            }
        }
    }

    /// Every accepted message was handled by its slot (a message written to
    /// a process that left without acknowledging it does not count), or its
    /// sender was told.
    fn check_nothing_lost(&self) {
        let live_senders: HashSet<u32> = self
            .procs
            .iter()
            .chain(self.extra.iter().flatten())
            .filter(|p| p.alive && p.attached)
            .map(|p| p.pid)
            .collect();
        for (id, sent) in &self.sent {
            let got: BTreeSet<SlotId> = self
                .handled
                .iter()
                .filter(|(m, _)| m == id)
                .map(|(_, s)| *s)
                .collect();
            if sent.random {
                assert!(got.len() <= 1, "random send {id} reached {got:?}");
                if !sent.targets.is_empty() {
                    assert!(
                        got.len() == 1 && got.is_subset(&sent.targets),
                        "random send {id} reached {got:?}, not one of {:?}",
                        sent.targets
                    );
                }
                continue;
            }
            for slot in &sent.targets {
                let told = sent.pinned
                    && (self.reported.contains(id) || !live_senders.contains(&sent.sender_pid));
                assert!(
                    got.contains(slot) || told,
                    "send {id} never reached slot {slot} and its sender was not told"
                );
            }
        }
    }
}

/// Runs a sequence, settles and checks what the contract promises at rest.
/// With `boot`, every slot first registers (acknowledging or not, by slot)
/// and gets ready, so that the cluster is up and reloads can begin at once.
fn run(boot: Option<[bool; SLOTS]>, ops: &[Op], graceful: bool) {
    let mut w = World::new(100_000, graceful);
    if let Some(acks) = boot {
        w.boot(acks);
    }
    for op in ops {
        w.apply(op);
    }
    w.settle();
    w.check_nothing_lost();
    for (slot, p) in w.procs.iter().enumerate() {
        if w.cluster_ready {
            assert_eq!(p.egg_ready, 1, "slot {slot} did not get its egg-ready");
        }
    }
    if graceful {
        assert!(w.rewritten.is_empty(), "graceful processes left messages");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, .. ProptestConfig::default() })]

    /// With room in every mailbox: routing, ordering, the barrier, and no loss
    /// through crashes, restarts and reloads.
    #[test]
    fn the_router_keeps_the_contract(
        (boot, ops) in any::<bool>().prop_flat_map(|focus| {
            // With focus: mostly reloads of one slot, of a cluster that is up.
            let boot = if focus {
                any::<[bool; SLOTS]>().prop_map(Some).boxed()
            } else {
                prop::option::of(any::<[bool; SLOTS]>()).boxed()
            };
            (boot, prop::collection::vec(op(focus), 1..120))
        }),
    ) {
        run(boot, &ops, false);
    }

    /// Reloads with processes that acknowledge what they drain before they
    /// leave: each sender's messages to a slot arrive once each and in
    /// order across the old → new switch, and none is lost.
    #[test]
    fn a_reload_hands_a_slot_over_in_order_without_loss(
        ops in prop::collection::vec(op(true), 1..160),
    ) {
        run(Some([true; SLOTS]), &ops, true);
    }

    /// A reload of app worker 1 whose old process (acknowledging) has
    /// messages in hand when the standby takes over, then exits or hangs up
    /// at some point while traffic goes on: what it had not acknowledged is
    /// handed to the new process ahead of the rest, and nothing is lost.
    #[test]
    fn an_outgoing_process_that_leaves_hands_its_messages_over(
        before in prop::collection::vec(op(true), 0..40),
        after in prop::collection::vec(op(true), 0..60),
        at in any::<prop::sample::Index>(),
        exits in any::<bool>(),
    ) {
        let mut ops = before;
        ops.extend([
            Op::Send(Who::Cur(AGENT), To::Apps),
            Op::Send(Who::Cur(2), To::Broadcast),
            Op::Drain(Who::Cur(1), 4),
            Op::Replace(1, true),
            Op::Send(Who::Cur(AGENT), To::Apps),
            Op::Send(Who::Cur(2), To::Broadcast),
        ]);
        let leave = if exits { Op::Exit(Who::Extra(1)) } else { Op::Detach(Who::Extra(1)) };
        let mut after = after;
        after.insert(at.index(after.len() + 1), leave);
        ops.extend(after);
        run(Some([true; SLOTS]), &ops, false);
    }

    /// With tiny mailboxes: overflow is refused and reported, never exceeding
    /// the bound, and ordering still holds for what is delivered.
    #[test]
    fn full_mailboxes_refuse_without_breaking_order(
        boot in prop::option::of(any::<[bool; SLOTS]>()),
        ops in prop::collection::vec(op(false), 1..150),
    ) {
        let mut w = World::new(3, false);
        if let Some(acks) = boot {
            w.boot(acks);
        }
        for op in &ops {
            w.apply(op);
        }
    }
}

/// Runs `ops` on a cluster that is up (every process registered without
/// acknowledgements, and ready).
fn strict(mailbox_messages: usize, ops: &[Op]) -> World {
    let mut w = World::new(mailbox_messages, false);
    w.boot([false; SLOTS]);
    for op in ops {
        w.apply(op);
    }
    w
}

/// Found by these tests: a `sendTo(standby pid)` queued for the standby
/// went ahead of the same sender's earlier message to the slot, which was
/// handed to the standby only at its promotion (2 before 1 from the agent).
/// A standby is not addressable now: the send is refused (UNAVAILABLE, which
/// the model checks), and the slot's messages come first, in order.
#[test]
fn a_send_to_a_standby_is_refused_so_it_cannot_overtake_the_slots_messages() {
    strict(
        100_000,
        &[
            Op::Send(Who::Cur(AGENT), To::Broadcast), // 1, queued for app 3's old process
            Op::Reload(3),
            Op::Send(Who::Cur(AGENT), To::PidOfExtra(3)), // 2, to the standby: refused
            Op::Register(Who::Extra(3), false),
            Op::Drain(Who::Extra(3), 10),
            Op::Ready(Who::Extra(3)),   // promoted
            Op::Drain(Who::Cur(3), 10), // gets 1
        ],
    );
}

/// Found by these tests: the standby's own messages plus the queue handed
/// over at its promotion could hold twice the bound in one mailbox, and
/// the slot three times. With a standby unaddressable, each mailbox stays
/// within its bound and the slot within twice it.
#[test]
fn a_promotion_keeps_each_mailbox_within_its_bound() {
    const BOUND: usize = 3;
    let mut ops = vec![Op::Reload(1)];
    ops.extend((0..BOUND).map(|_| Op::Send(Who::Cur(AGENT), To::PidOfExtra(1))));
    ops.extend((0..BOUND).map(|_| Op::Send(Who::Cur(AGENT), To::Apps)));
    ops.extend([Op::Register(Who::Extra(1), false), Op::Ready(Who::Extra(1))]);
    // Now the outgoing process: sendTo its (old) pid.
    ops.extend((0..BOUND).map(|_| Op::Send(Who::Cur(AGENT), To::PidOfExtra(1))));
    let mut w = strict(BOUND, &ops);
    let held = |w: &mut World, who: Who| {
        let conn = w.conn(who).expect("attached");
        let mut buf = VecDeque::new();
        let mut out = Vec::new();
        w.router.drain(conn, &mut buf, usize::MAX, &mut out);
        buf.iter()
            .filter(|f| matches!(f, Outbound::Message { .. }))
            .count()
    };
    let new = held(&mut w, Who::Cur(1));
    let old = held(&mut w, Who::Extra(1));
    assert!(
        new <= BOUND && new + old <= 2 * BOUND,
        "app worker 1 held {new} messages for its new process and {old} for its old one \
         (bound {BOUND})"
    );
}
