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
//! - no loss: with room in every mailbox, every accepted message reaches its
//!   slot (through crashes and restarts) or its sender is told why not;
//! - bounds: a mailbox never holds more messages than its bound.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};

use bytes::Bytes;
use clutch::types::SendRequest;
use clutch::{Code, Outbound, Registration, Role, Target};
use master::mailbox::Bounds;
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
    /// A pid no process ever had.
    Bogus,
}

#[derive(Clone, Debug)]
enum Op {
    Register(usize, bool),
    Ready(usize),
    Send(usize, To),
    Drain(usize, usize),
    Ack(usize),
    Detach(usize),
    Exit(usize),
    Respawn(usize),
}

fn op() -> impl Strategy<Value = Op> {
    let slot = 0..SLOTS;
    let to = prop_oneof![
        Just(To::Broadcast),
        Just(To::Apps),
        Just(To::Agent),
        Just(To::Random),
        (0..SLOTS).prop_map(To::PidOf),
        Just(To::Bogus),
    ];
    prop_oneof![
        3 => (slot.clone(), any::<bool>()).prop_map(|(s, a)| Op::Register(s, a)),
        3 => slot.clone().prop_map(Op::Ready),
        8 => (slot.clone(), to).prop_map(|(s, t)| Op::Send(s, t)),
        6 => (slot.clone(), 1..6usize).prop_map(|(s, n)| Op::Drain(s, n)),
        3 => slot.clone().prop_map(Op::Ack),
        1 => slot.clone().prop_map(Op::Detach),
        2 => slot.clone().prop_map(Op::Exit),
        2 => slot.prop_map(Op::Respawn),
    ]
}

/// The harness's view of one slot's current process.
#[derive(Default)]
struct Proc {
    pid: u32,
    alive: bool,
    conn: Option<Conn>,
    /// Registered and not detached.
    attached: bool,
    ready: bool,
    egg_ready: u32,
    highest_seq: u64,
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
}

struct World {
    router: Router,
    procs: Vec<Proc>,
    next_pid: u32,
    next_id: u64,
    sent: HashMap<u64, Sent>,
    /// (message id, receiving slot) pairs seen.
    received: HashSet<(u64, SlotId)>,
    /// Message ids whose sender was told NOT_FOUND for a pinned target.
    reported: HashSet<u64>,
    /// Slots that were ready at the same moment: the barrier has passed.
    cluster_ready: bool,
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
    fn new(mailbox_messages: usize) -> World {
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
            next_pid: 100,
            next_id: 1,
            sent: HashMap::new(),
            received: HashSet::new(),
            reported: HashSet::new(),
            cluster_ready: false,
            bound: mailbox_messages,
            out: Vec::new(),
        };
        for slot in 0..SLOTS {
            w.respawn(slot);
        }
        w
    }

    fn respawn(&mut self, slot: SlotId) {
        if self.procs[slot].alive {
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

    fn register(&mut self, slot: SlotId, acks: bool) {
        let p = &self.procs[slot];
        if !p.alive || p.conn.is_some() {
            return;
        }
        let reg = Registration {
            secret: format!("secret-{}", p.pid),
            role: Some(role(slot)),
            acks,
        };
        let (id, conn) = self
            .router
            .register(&reg, &mut self.out)
            .expect("a fresh secret registers");
        assert_eq!((id.pid, id.worker_id), (p.pid, slot as u32));
        let p = &mut self.procs[slot];
        p.conn = Some(conn);
        p.attached = true;
    }

    fn ready(&mut self, slot: SlotId) {
        let Some(conn) = self.procs[slot].conn.filter(|_| self.procs[slot].attached) else {
            return;
        };
        self.router.ready(conn, &mut self.out);
        self.procs[slot].ready = true;
        if self.procs.iter().all(|p| p.alive && p.attached && p.ready) {
            self.cluster_ready = true;
        }
    }

    fn send(&mut self, slot: SlotId, to: To) {
        let Some(conn) = self.procs[slot].conn.filter(|_| self.procs[slot].attached) else {
            return;
        };
        let id = self.next_id;
        self.next_id += 1;
        let (target, targets, random, pinned): (Target, BTreeSet<SlotId>, bool, bool) = match to {
            To::Broadcast => (Target::Broadcast, (0..SLOTS).collect(), false, false),
            To::Apps => (Target::Apps, (1..SLOTS).collect(), false, false),
            To::Agent => (Target::Agent, [AGENT].into(), false, false),
            To::Random if slot != AGENT => (Target::Random, [AGENT].into(), false, false),
            To::Random => {
                let ready: BTreeSet<SlotId> = (1..SLOTS)
                    .filter(|&s| {
                        self.procs[s].alive && self.procs[s].attached && self.procs[s].ready
                    })
                    .collect();
                (Target::Random, ready, true, false)
            }
            To::PidOf(s) => {
                let p = &self.procs[s];
                let live = p.alive && p.pid != 0;
                (
                    Target::Pid(p.pid),
                    if live { [s].into() } else { BTreeSet::new() },
                    false,
                    true,
                )
            }
            To::Bogus => (Target::Pid(7), BTreeSet::new(), false, true),
        };
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
                sender_pid: self.procs[slot].pid,
                targets,
                random,
                pinned,
            },
        );
    }

    fn drain(&mut self, slot: SlotId, max: usize) {
        let Some(conn) = self.procs[slot].conn.filter(|_| self.procs[slot].attached) else {
            return;
        };
        let mut buf = VecDeque::new();
        self.router.drain(conn, &mut buf, max, &mut self.out);
        for frame in buf {
            self.observe(slot, frame);
        }
    }

    fn observe(&mut self, slot: SlotId, frame: Outbound) {
        match frame {
            Outbound::Message { seq, delivery } => {
                let id = u64::from_be_bytes(delivery.data[..8].try_into().expect("8-byte id"));
                let p = &mut self.procs[slot];
                p.highest_seq = p.highest_seq.max(seq);
                let last = p.last_from.insert(delivery.from.pid, id);
                assert!(last.is_none_or(|l| l < id), "slot {slot}: message {id} from pid {} after {last:?}: out of order or duplicated", delivery.from.pid);
                assert!(
                    self.sent.contains_key(&id),
                    "slot {slot} got a message nobody sent"
                );
                self.received.insert((id, slot));
            }
            Outbound::EggReady => {
                assert!(
                    self.cluster_ready,
                    "egg-ready at slot {slot} before every slot was ready at once"
                );
                let p = &mut self.procs[slot];
                p.egg_ready += 1;
                assert_eq!(
                    p.egg_ready, 1,
                    "slot {slot}: a second egg-ready for one incarnation"
                );
            }
            Outbound::SendResult(r) => {
                let sent = &self.sent[&r.id];
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
                    if sent.random && sent.targets.is_empty() {
                        assert_eq!(u.code, Code::Unavailable);
                    }
                }
            }
            _ => {}
        }
    }

    fn ack(&mut self, slot: SlotId) {
        let p = &self.procs[slot];
        let Some(conn) = p.conn.filter(|_| p.attached) else {
            return;
        };
        self.router.ack(conn, p.highest_seq, &mut self.out);
    }

    fn detach(&mut self, slot: SlotId) {
        let Some(conn) = self.procs[slot].conn.filter(|_| self.procs[slot].attached) else {
            return;
        };
        self.router.detach(conn, &mut self.out);
        self.procs[slot].attached = false;
        self.procs[slot].ready = false;
    }

    fn exit(&mut self, slot: SlotId) {
        let p = &mut self.procs[slot];
        if !p.alive {
            return;
        }
        p.alive = false;
        p.attached = false;
        p.ready = false;
        let pid = p.pid;
        self.router.exited(slot, pid, &mut self.out);
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Register(s, acks) => self.register(s, acks),
            Op::Ready(s) => self.ready(s),
            Op::Send(s, to) => self.send(s, to),
            Op::Drain(s, n) => self.drain(s, n),
            Op::Ack(s) => self.ack(s),
            Op::Detach(s) => self.detach(s),
            Op::Exit(s) => self.exit(s),
            Op::Respawn(s) => self.respawn(s),
        }
        for v in self.router.view() {
            let control = master::mailbox::CONTROL_CAPACITY;
            assert!(
                v.pending <= self.bound + control,
                "a mailbox holds {} frames, past its bounds",
                v.pending
            );
        }
        self.out.clear();
    }

    /// Brings every slot up and drains everything, acknowledging as it goes.
    fn settle(&mut self) {
        for slot in 0..SLOTS {
            if self.procs[slot].alive && !self.procs[slot].attached {
                self.exit(slot);
            }
            self.respawn(slot);
            self.register(slot, true);
            self.ready(slot);
        }
        for _ in 0..4 {
            for slot in 0..SLOTS {
                self.drain(slot, usize::MAX);
                self.ack(slot);
            }
        }
    }

    /// Every accepted message reached its slot, or its sender was told.
    fn check_nothing_lost(&self) {
        let live_senders: HashSet<u32> = self
            .procs
            .iter()
            .filter(|p| p.alive && p.attached)
            .map(|p| p.pid)
            .collect();
        for (id, sent) in &self.sent {
            let got: BTreeSet<SlotId> = self
                .received
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

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, .. ProptestConfig::default() })]

    /// With room in every mailbox: routing, ordering, the barrier, and no loss
    /// through crashes and restarts.
    #[test]
    fn the_router_keeps_the_contract(ops in prop::collection::vec(op(), 1..120)) {
        let mut w = World::new(100_000);
        for op in &ops {
            w.apply(op);
        }
        w.settle();
        w.check_nothing_lost();
        for (slot, p) in w.procs.iter().enumerate() {
            if w.cluster_ready {
                prop_assert_eq!(p.egg_ready, 1, "slot {} did not get its egg-ready", slot);
            }
        }
    }

    /// With tiny mailboxes: overflow is refused and reported, never exceeding
    /// the bound, and ordering still holds for what is delivered.
    #[test]
    fn full_mailboxes_refuse_without_breaking_order(ops in prop::collection::vec(op(), 1..150)) {
        let mut w = World::new(3);
        for op in &ops {
            w.apply(op);
        }
    }
}
