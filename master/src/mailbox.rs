//! A slot's bounded queue of outbound frames.
//!
//! One mechanism serves every case the contract names: frames for a child
//! that is attached wait here until its stream writes them; frames for a slot
//! whose process has not registered yet (starting, or restarting) are held
//! here and delivered, in order, once it does; and messages written to a
//! child that acknowledges stay here, as *unacked*, until it does, so that a
//! crash hands them to the slot's next process instead of losing them.
//!
//! Bounds, and what overflow does:
//! - messages (queued and unacked alike) are bounded by count and by bytes
//!   (action + payload). A message that would pass either bound is refused:
//!   the router reports it to the sender as RESOURCE_EXHAUSTED, counts it and
//!   logs it. Nothing already queued is displaced.
//! - during a reload's handover a slot has two mailboxes for a moment: the
//!   outgoing process's (what it has not acknowledged, and what is sent to
//!   its pid) and the new one's. Each refuses past the bounds above, so the
//!   slot holds at most twice them; when the old process leaves, what it
//!   gave back joins the new one's (which then refuses new messages until
//!   it is back under its bound). The new one's is not written to until the
//!   old one's unacked are done.
//! - control frames (egg-ready, egg-pids, send results…) have their own small
//!   bound, so a child that floods bad sends and never reads cannot grow the
//!   master either. Past it a control frame is dropped and counted.

use std::collections::VecDeque;
use std::sync::Arc;

use clutch::Outbound;

/// Where a drained frame goes: the child's stream encoder in the master
/// ([`clutch::server::FrameWriter`]), a plain queue in tests.
///
/// The sink only reads the frame: a message that stays in the mailbox as
/// unacked is not copied for the writing.
pub trait FrameSink {
    /// Takes `frame` (encodes it, or keeps a copy).
    fn put(&mut self, frame: &Outbound);
    /// Whether it takes more now.
    fn has_room(&self) -> bool;
}

impl FrameSink for clutch::server::FrameWriter {
    fn put(&mut self, frame: &Outbound) {
        clutch::server::FrameWriter::put(self, frame);
    }
    fn has_room(&self) -> bool {
        clutch::server::FrameWriter::has_room(self)
    }
}

impl FrameSink for VecDeque<Outbound> {
    fn put(&mut self, frame: &Outbound) {
        self.push_back(frame.clone());
    }
    fn has_room(&self) -> bool {
        true
    }
}

/// Control frames a mailbox accepts beyond its message bounds.
pub const CONTROL_CAPACITY: usize = 1024;

/// Why a frame was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Full {
    /// The message count bound.
    Messages(usize),
    /// The byte bound.
    Bytes(usize),
    /// The control-frame bound.
    Control(usize),
}

/// A frame a mailbox refused, given back with the reason so the caller can
/// name it without having paid for a copy up front.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused {
    /// Which bound refused it.
    pub full: Full,
    /// The frame.
    pub frame: Outbound,
}

/// The bounds of one mailbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    /// Most messages held at once (queued plus unacked).
    pub messages: usize,
    /// Most bytes (actions and payloads) held at once.
    pub bytes: usize,
}

/// Where [`Mailbox::hand_over`] puts the messages it moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// Behind what the receiving mailbox holds.
    Back,
    /// Ahead of it.
    Front,
}

/// Who to tell if a message never reaches its receiver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplyTo {
    /// The sender's slot.
    pub sender: usize,
    /// The sender's incarnation when it sent.
    pub sender_incarnation: u32,
    /// The sender's id for the send.
    pub send_id: u64,
}

/// A message that will not be delivered, and whom to tell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Undeliverable {
    /// The sender (absent for injected messages: the operator already
    /// has the reply).
    pub reply: ReplyTo,
    /// The message's action.
    pub action: Arc<str>,
    /// The pid it was addressed to, for `sendTo(pid)` messages.
    pub pid: Option<u32>,
}

#[derive(Debug)]
struct Entry {
    frame: Outbound,
    /// The sender to tell if this message is never handled.
    reply: Option<ReplyTo>,
    /// Set for `sendTo(pid)` messages: they belong to that process only,
    /// and must not go to the slot's next process.
    pinned: Option<u32>,
}

impl Entry {
    fn undeliverable(&self) -> Option<Undeliverable> {
        match (&self.frame, self.reply) {
            (Outbound::Message { delivery, .. }, Some(reply)) => Some(Undeliverable {
                reply,
                action: delivery.action.clone(),
                pid: self.pinned,
            }),
            _ => None,
        }
    }
}

/// The queue itself.
#[derive(Debug, Default)]
pub struct Mailbox {
    /// Frames not yet written, in delivery order.
    queue: VecDeque<Entry>,
    /// Messages written to a child that acknowledges, not yet acknowledged;
    /// in sequence order.
    unacked: VecDeque<Entry>,
    /// Messages in `queue` and `unacked`; control frames are the rest.
    messages: usize,
    /// Action and payload bytes of those messages.
    bytes: usize,
    /// The last sequence number given to a message.
    seq: u64,
}

fn size(frame: &Outbound) -> Option<usize> {
    match frame {
        Outbound::Message { delivery, .. } => Some(delivery.action.len() + delivery.data.len()),
        _ => None,
    }
}

fn seq_of(entry: &Entry) -> u64 {
    match entry.frame {
        Outbound::Message { seq, .. } => seq,
        _ => 0,
    }
}

impl Mailbox {
    /// Queues a frame unless a bound refuses it.
    pub fn push(
        &mut self,
        frame: Outbound,
        reply: Option<ReplyTo>,
        pinned: Option<u32>,
        bounds: Bounds,
    ) -> Result<(), Refused> {
        let refuse = |full, frame| Err(Refused { full, frame });
        match size(&frame) {
            Some(bytes) => {
                if self.messages >= bounds.messages {
                    return refuse(Full::Messages(bounds.messages), frame);
                }
                // A single message larger than the whole byte bound still
                // fits an empty mailbox: the payload limit, not this bound,
                // decides what size is acceptable.
                if self.messages > 0 && self.bytes + bytes > bounds.bytes {
                    return refuse(Full::Bytes(bounds.bytes), frame);
                }
                self.messages += 1;
                self.bytes += bytes;
            }
            None => {
                if self.queue.len() + self.unacked.len() - self.messages >= CONTROL_CAPACITY {
                    return refuse(Full::Control(CONTROL_CAPACITY), frame);
                }
            }
        }
        self.queue.push_back(Entry {
            frame,
            reply,
            pinned,
        });
        Ok(())
    }

    /// Writes up to `max` frames, oldest first, into `out` while it has
    /// room; returns how many. Each message gets the next sequence number
    /// as it is written (so a message handed over from another mailbox, or
    /// written again to a slot's next process, still arrives in ascending
    /// order). With `keep`, messages are also kept as unacked until
    /// [`Mailbox::ack`].
    pub fn drain_into(&mut self, out: &mut impl FrameSink, max: usize, keep: bool) -> usize {
        let mut written = 0;
        while written < max && out.has_room() {
            let Some(mut entry) = self.queue.pop_front() else {
                break;
            };
            if let Outbound::Message { seq, .. } = &mut entry.frame {
                self.seq += 1;
                *seq = self.seq;
            }
            out.put(&entry.frame);
            written += 1;
            match size(&entry.frame) {
                Some(_) if keep => self.unacked.push_back(entry),
                Some(bytes) => {
                    self.messages -= 1;
                    self.bytes -= bytes;
                }
                None => {}
            }
        }
        written
    }

    /// Writes up to `max` control frames from the head of the queue, up to
    /// the first message, into `out`: what may be written while messages
    /// must wait.
    pub fn drain_controls_into(&mut self, out: &mut impl FrameSink, max: usize) {
        let mut written = 0;
        while written < max && out.has_room() {
            match self.queue.front() {
                Some(entry) if size(&entry.frame).is_none() => {}
                _ => break,
            }
            if let Some(entry) = self.queue.pop_front() {
                out.put(&entry.frame);
                written += 1;
            }
        }
    }

    /// The child handled every message up to `seq`. Returns how many
    /// messages that released.
    pub fn ack(&mut self, seq: u64) -> usize {
        let mut released = 0;
        while self.unacked.front().is_some_and(|e| seq_of(e) <= seq) {
            if let Some(entry) = self.unacked.pop_front() {
                if let Some(bytes) = size(&entry.frame) {
                    self.messages -= 1;
                    self.bytes -= bytes;
                    released += 1;
                }
            }
        }
        released
    }

    /// Messages written and not yet acknowledged.
    pub fn unacked(&self) -> usize {
        self.unacked.len()
    }

    /// Moves every queued message that is not pinned to a process into
    /// `to`, in order, behind what `to` holds (`Place::Back`) or ahead of it
    /// (`Place::Front`). What stays here: unacked messages, control frames
    /// and `sendTo(pid)` messages — what belongs to this mailbox's process.
    /// This is a reload's handover: the messages for the slot follow the
    /// slot to its new process; the counts move with them.
    pub fn hand_over(&mut self, to: &mut Mailbox, place: Place) {
        let mut moved = VecDeque::new();
        let mut kept = VecDeque::with_capacity(self.queue.len());
        for entry in self.queue.drain(..) {
            match (&entry.frame, entry.pinned) {
                (Outbound::Message { delivery, .. }, None) => {
                    let bytes = delivery.action.len() + delivery.data.len();
                    self.messages -= 1;
                    self.bytes -= bytes;
                    to.messages += 1;
                    to.bytes += bytes;
                    moved.push_back(entry);
                }
                _ => kept.push_back(entry),
            }
        }
        self.queue = kept;
        match place {
            Place::Back => to.queue.extend(moved),
            Place::Front => {
                while let Some(entry) = moved.pop_back() {
                    to.queue.push_front(entry);
                }
            }
        }
    }

    /// The current process of the slot is gone. Messages it had not
    /// acknowledged go back to the front of the queue, in order, for the
    /// next process; frames meant for this process only (control frames and
    /// `sendTo(pid)` messages) are removed, and the pinned ones returned so
    /// their senders can be told.
    pub fn end_incarnation(&mut self) -> Vec<Undeliverable> {
        while let Some(entry) = self.unacked.pop_back() {
            self.queue.push_front(entry);
        }
        let mut lost = Vec::new();
        let (mut messages, mut bytes) = (self.messages, self.bytes);
        self.queue.retain(|e| match (&e.frame, e.pinned) {
            (Outbound::Message { delivery, .. }, Some(_)) => {
                lost.extend(e.undeliverable());
                messages -= 1;
                bytes -= delivery.action.len() + delivery.data.len();
                false
            }
            (Outbound::Message { .. }, None) => true,
            _ => false,
        });
        self.messages = messages;
        self.bytes = bytes;
        lost
    }

    /// Drops everything; returns how many messages were held, and those
    /// whose senders should be told.
    pub fn clear(&mut self) -> (usize, Vec<Undeliverable>) {
        let messages = self.messages;
        let lost = self
            .unacked
            .iter()
            .chain(&self.queue)
            .filter_map(Entry::undeliverable)
            .collect();
        self.queue.clear();
        self.unacked.clear();
        self.messages = 0;
        self.bytes = 0;
        (messages, lost)
    }

    /// Frames held (queued and unacked).
    pub fn len(&self) -> usize {
        self.queue.len() + self.unacked.len()
    }

    /// Control frames waiting (send results, egg-pids…).
    pub fn controls(&self) -> usize {
        self.queue.len() + self.unacked.len() - self.messages
    }

    /// Messages held (control frames excluded).
    pub fn messages(&self) -> usize {
        self.messages
    }

    /// True when no frame waits to be written.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use clutch::{Delivery, Origin, Role};

    use super::*;

    fn msg(n: usize, len: usize) -> Outbound {
        Outbound::Message {
            seq: 0,
            delivery: Delivery {
                action: Arc::from(format!("a{n}")),
                data: Bytes::from(vec![b'x'; len]),
                from: Origin {
                    role: Role::Agent,
                    pid: 1,
                    worker_id: 0,
                },
            },
        }
    }

    fn actions(out: &VecDeque<Outbound>) -> Vec<(u64, String)> {
        out.iter()
            .filter_map(|o| match o {
                Outbound::Message { seq, delivery } => Some((*seq, delivery.action.to_string())),
                _ => None,
            })
            .collect()
    }

    const ROOMY: Bounds = Bounds {
        messages: 100,
        bytes: 1 << 20,
    };

    #[test]
    fn count_bound_refuses_without_displacing() {
        let bounds = Bounds {
            messages: 2,
            bytes: 1 << 20,
        };
        let mut m = Mailbox::default();
        assert_eq!(m.push(msg(0, 1), None, None, bounds), Ok(()));
        assert_eq!(m.push(msg(1, 1), None, None, bounds), Ok(()));
        assert_eq!(
            m.push(msg(2, 1), None, None, bounds).map_err(|r| r.full),
            Err(Full::Messages(2))
        );
        let mut out = VecDeque::new();
        m.drain_into(&mut out, 10, false);
        assert_eq!(actions(&out), vec![(1, "a0".into()), (2, "a1".into())]);
        assert!(m.is_empty());
        assert_eq!(m.messages(), 0);
    }

    #[test]
    fn byte_bound_counts_action_and_payload_but_admits_one_big_message() {
        let bounds = Bounds {
            messages: 100,
            bytes: 10,
        };
        let mut m = Mailbox::default();
        assert_eq!(m.push(msg(0, 50), None, None, bounds), Ok(()));
        assert_eq!(
            m.push(msg(1, 1), None, None, bounds).map_err(|r| r.full),
            Err(Full::Bytes(10))
        );
        let mut out = VecDeque::new();
        m.drain_into(&mut out, 1, false);
        assert_eq!(m.push(msg(1, 5), None, None, bounds), Ok(()));
        assert_eq!(
            m.push(msg(2, 5), None, None, bounds).map_err(|r| r.full),
            Err(Full::Bytes(10))
        );
    }

    #[test]
    fn control_frames_have_their_own_bound_and_leave_with_the_incarnation() {
        let bounds = Bounds {
            messages: 1,
            bytes: 10,
        };
        let mut m = Mailbox::default();
        assert_eq!(m.push(msg(0, 1), None, None, bounds), Ok(()));
        for _ in 0..CONTROL_CAPACITY {
            assert_eq!(m.push(Outbound::EggReady, None, None, bounds), Ok(()));
        }
        assert_eq!(
            m.push(Outbound::EggReady, None, None, bounds)
                .map_err(|r| r.full),
            Err(Full::Control(CONTROL_CAPACITY))
        );
        assert!(m.end_incarnation().is_empty());
        assert_eq!(m.len(), 1);
        assert_eq!(m.messages(), 1);
    }

    #[test]
    fn unacked_messages_count_and_go_to_the_next_process_in_order() {
        let mut m = Mailbox::default();
        for n in 0..5 {
            m.push(msg(n, 1), None, None, ROOMY).expect("room");
        }
        let mut out = VecDeque::new();
        m.drain_into(&mut out, 3, true);
        assert_eq!(m.messages(), 5, "unacked messages still count");
        m.ack(1);
        assert_eq!(m.messages(), 4);
        // The process dies having handled only message 1.
        assert!(m.end_incarnation().is_empty());
        let mut next = VecDeque::new();
        m.drain_into(&mut next, 10, true);
        // Messages 2 and 3 are written again, with fresh numbers, ahead of
        // 4 and 5, which were never written.
        assert_eq!(
            actions(&next),
            vec![
                (4, "a1".into()),
                (5, "a2".into()),
                (6, "a3".into()),
                (7, "a4".into())
            ]
        );
        m.ack(7);
        assert_eq!(m.messages(), 0);
        assert_eq!(m.len(), 0);
    }

    #[test]
    fn pinned_messages_do_not_outlive_their_process() {
        let mut m = Mailbox::default();
        let reply = ReplyTo {
            sender: 0,
            sender_incarnation: 1,
            send_id: 7,
        };
        m.push(msg(0, 3), Some(reply), Some(42), ROOMY)
            .expect("room");
        m.push(msg(1, 3), Some(reply), None, ROOMY).expect("room");
        m.push(msg(2, 3), Some(reply), Some(42), ROOMY)
            .expect("room");
        let mut out = VecDeque::new();
        m.drain_into(&mut out, 1, true);
        let lost: Vec<(Arc<str>, Option<u32>)> = m
            .end_incarnation()
            .into_iter()
            .map(|u| (u.action, u.pid))
            .collect();
        assert_eq!(
            lost,
            vec![(Arc::from("a0"), Some(42)), (Arc::from("a2"), Some(42))]
        );
        assert_eq!(m.messages(), 1);
        let mut next = VecDeque::new();
        m.drain_into(&mut next, 10, false);
        assert_eq!(actions(&next), vec![(2, "a1".into())]);
        assert_eq!(m.messages(), 0);
    }
}
