//! A slot's bounded queue of outbound frames.
//!
//! One mechanism serves both cases the contract names: frames for a child
//! that is attached wait here until its stream writes them, and frames for a
//! slot whose process has not registered yet (starting, or restarting) are
//! held here and delivered, in order, once it does.
//!
//! Bounds, and what overflow does:
//! - messages are bounded by count and by bytes (action + payload). A message
//!   that would pass either bound is refused: the router reports it to the
//!   sender as RESOURCE_EXHAUSTED, counts it and logs it. The queue never
//!   grows past its bounds and nothing already queued is displaced.
//! - control frames (egg-ready, egg-pids, send results…) have their own small
//!   bound, so a child that floods bad sends and never reads cannot grow
//!   the master either. Past it a control frame is dropped and counted; the
//!   only frames that can be refused this way are send results for a child
//!   that is not reading them.

use std::collections::VecDeque;

use clutch::Outbound;

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

/// The bounds of one mailbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    /// Most messages queued at once.
    pub messages: usize,
    /// Most bytes (actions and payloads) queued at once.
    pub bytes: usize,
}

/// The queue itself.
#[derive(Debug, Default)]
pub struct Mailbox {
    /// Frames in delivery order.
    queue: VecDeque<Outbound>,
    /// Routed messages in `queue`; control frames are the rest.
    messages: usize,
    /// Action and payload bytes of the messages in `queue`.
    bytes: usize,
}

fn size(frame: &Outbound) -> Option<usize> {
    match frame {
        Outbound::Message(d) => Some(d.action.len() + d.data.len()),
        _ => None,
    }
}

impl Mailbox {
    /// Queues a frame unless a bound refuses it.
    pub fn push(&mut self, frame: Outbound, bounds: Bounds) -> Result<(), Full> {
        match size(&frame) {
            Some(bytes) => {
                if self.messages >= bounds.messages {
                    return Err(Full::Messages(bounds.messages));
                }
                // A single message larger than the whole byte bound still
                // fits an empty mailbox: the payload limit, not this bound,
                // decides what size is acceptable.
                if self.messages > 0 && self.bytes + bytes > bounds.bytes {
                    return Err(Full::Bytes(bounds.bytes));
                }
                self.messages += 1;
                self.bytes += bytes;
            }
            None => {
                if self.queue.len() - self.messages >= CONTROL_CAPACITY {
                    return Err(Full::Control(CONTROL_CAPACITY));
                }
            }
        }
        self.queue.push_back(frame);
        Ok(())
    }

    /// Moves up to `max` frames, oldest first, into `out`.
    pub fn drain_into(&mut self, out: &mut VecDeque<Outbound>, max: usize) {
        for _ in 0..max {
            let Some(frame) = self.queue.pop_front() else {
                break;
            };
            if let Some(bytes) = size(&frame) {
                self.messages -= 1;
                self.bytes -= bytes;
            }
            out.push_back(frame);
        }
    }

    /// Drops the frames meant for one incarnation only (egg-ready, send
    /// results…) when that incarnation is gone; routed messages stay for the
    /// slot's next process.
    pub fn forget_control(&mut self) {
        self.queue.retain(|f| matches!(f, Outbound::Message(_)));
    }

    /// Frames queued.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Messages queued (control frames excluded).
    pub fn messages(&self) -> usize {
        self.messages
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use clutch::{Delivery, Origin, Role};

    use super::*;

    fn msg(n: usize, len: usize) -> Outbound {
        Outbound::Message(Delivery {
            action: Arc::from(format!("a{n}")),
            data: Bytes::from(vec![b'x'; len]),
            from: Origin {
                role: Role::Agent,
                pid: 1,
                worker_id: 0,
            },
        })
    }

    #[test]
    fn count_bound_refuses_without_displacing() {
        let bounds = Bounds {
            messages: 2,
            bytes: 1 << 20,
        };
        let mut m = Mailbox::default();
        assert_eq!(m.push(msg(0, 1), bounds), Ok(()));
        assert_eq!(m.push(msg(1, 1), bounds), Ok(()));
        assert_eq!(m.push(msg(2, 1), bounds), Err(Full::Messages(2)));
        let mut out = VecDeque::new();
        m.drain_into(&mut out, 10);
        assert_eq!(out, VecDeque::from(vec![msg(0, 1), msg(1, 1)]));
        assert!(m.is_empty());
    }

    #[test]
    fn byte_bound_counts_action_and_payload_but_admits_one_big_message() {
        let bounds = Bounds {
            messages: 100,
            bytes: 10,
        };
        let mut m = Mailbox::default();
        assert_eq!(m.push(msg(0, 50), bounds), Ok(()));
        assert_eq!(m.push(msg(1, 1), bounds), Err(Full::Bytes(10)));
        let mut out = VecDeque::new();
        m.drain_into(&mut out, 1);
        assert_eq!(m.push(msg(1, 5), bounds), Ok(()));
        assert_eq!(m.push(msg(2, 5), bounds), Err(Full::Bytes(10)));
    }

    #[test]
    fn control_frames_have_their_own_bound_and_are_forgotten_with_the_incarnation() {
        let bounds = Bounds {
            messages: 1,
            bytes: 10,
        };
        let mut m = Mailbox::default();
        assert_eq!(m.push(msg(0, 1), bounds), Ok(()));
        for _ in 0..CONTROL_CAPACITY {
            assert_eq!(m.push(Outbound::EggReady, bounds), Ok(()));
        }
        assert_eq!(
            m.push(Outbound::EggReady, bounds),
            Err(Full::Control(CONTROL_CAPACITY))
        );
        m.forget_control();
        assert_eq!(m.len(), 1);
        assert_eq!(m.messages(), 1);
    }
}
