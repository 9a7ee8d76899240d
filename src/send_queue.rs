//! The bounded queue between a client's handles and its request stream.
//!
//! Every frame a child writes to the master — sends, acks, `ready` — goes
//! through here, so its cost is paid once per message of every flood. A
//! general-purpose channel pays for a semaphore permit, a lock-free list
//! node and a waker per item; this queue is a `VecDeque` behind a mutex
//! that the one reader empties **a whole batch at a time**: a writer's push
//! is an uncontended lock and a `push_back`, and the reader takes the lock
//! once per batch, not once per frame.
//!
//! **Bound.** At most `capacity` frames wait in the queue; a writer that
//! finds it full waits (`send`) or is told so (`try_send`). The reader's
//! current batch (taken from a queue of at most `capacity`) is on its way
//! into the encoder, so at most `2 × capacity` frames are held in all.
//! Writers blocked on a full queue are woken when the reader takes it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use tokio::sync::Notify;

/// Why [`Sender::try_send`] did not queue a frame; the frame comes back.
#[derive(Debug)]
pub(crate) enum TrySendError<T> {
    /// The queue holds `capacity` frames.
    Full(T),
    /// The reader is gone: the request stream has ended.
    Closed(T),
}

/// What both ends share.
struct Shared<T> {
    state: Mutex<State<T>>,
    /// Writers waiting for room; notified when the reader takes a full queue.
    room: Notify,
    /// The most frames the queue holds.
    capacity: usize,
}

struct State<T> {
    queue: VecDeque<T>,
    /// The reader's waker while it waits for a frame.
    reader: Option<Waker>,
    /// The sender was dropped: once the queue is empty, the stream ends.
    sender_gone: bool,
    /// The receiver was dropped: frames can no longer be written.
    receiver_gone: bool,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // Every critical section is a push, a swap or a flag; none can
        // panic half-way, so a poisoned lock still guards consistent data.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A queue of at most `capacity` frames (at least 1).
pub(crate) fn channel<T>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            queue: VecDeque::new(),
            reader: None,
            sender_gone: false,
            receiver_gone: false,
        }),
        room: Notify::new(),
        capacity: capacity.max(1),
    });
    (
        Sender {
            shared: shared.clone(),
        },
        Receiver {
            shared,
            batch: VecDeque::new(),
        },
    )
}

/// The writing end. It is not `Clone`: the client owns one, and dropping it
/// ends the stream once what is queued has been read.
pub(crate) struct Sender<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Sender<T> {
    /// Queues `item` if there is room.
    pub(crate) fn try_send(&self, item: T) -> Result<(), TrySendError<T>> {
        let mut state = self.shared.lock();
        if state.receiver_gone {
            return Err(TrySendError::Closed(item));
        }
        if state.queue.len() >= self.shared.capacity {
            return Err(TrySendError::Full(item));
        }
        state.queue.push_back(item);
        let reader = state.reader.take();
        drop(state);
        if let Some(reader) = reader {
            reader.wake();
        }
        Ok(())
    }

    /// Queues `item`, waiting for room; `Err(item)` when the reader is gone.
    pub(crate) async fn send(&self, mut item: T) -> Result<(), T> {
        loop {
            let room = self.shared.room.notified();
            tokio::pin!(room);
            // Interest first, then the check: the reader's notification
            // between the two is not missed.
            room.as_mut().enable();
            match self.try_send(item) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Closed(back)) => return Err(back),
                Err(TrySendError::Full(back)) => item = back,
            }
            room.await;
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.sender_gone = true;
        let reader = state.reader.take();
        drop(state);
        if let Some(reader) = reader {
            reader.wake();
        }
    }
}

/// The reading end: the request stream polls it.
pub(crate) struct Receiver<T> {
    shared: Arc<Shared<T>>,
    /// Frames taken from the queue and not yet handed out.
    batch: VecDeque<T>,
}

impl<T> Receiver<T> {
    /// The next frame; `None` once the sender is gone and all is read.
    pub(crate) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        self.next(Some(cx))
    }

    /// The next frame if one is queued now.
    pub(crate) fn try_recv(&mut self) -> Option<T> {
        match self.next(None) {
            Poll::Ready(item) => item,
            Poll::Pending => None,
        }
    }

    fn next(&mut self, cx: Option<&mut Context<'_>>) -> Poll<Option<T>> {
        if let Some(item) = self.batch.pop_front() {
            return Poll::Ready(Some(item));
        }
        let mut state = self.shared.lock();
        if state.queue.is_empty() {
            if state.sender_gone {
                return Poll::Ready(None);
            }
            if let Some(cx) = cx {
                match &mut state.reader {
                    Some(w) => w.clone_from(cx.waker()),
                    none => *none = Some(cx.waker().clone()),
                }
            }
            return Poll::Pending;
        }
        // Only a full queue can have writers waiting: it stays full until
        // this swap, so they are all woken here.
        let was_full = state.queue.len() >= self.shared.capacity;
        std::mem::swap(&mut self.batch, &mut state.queue);
        drop(state);
        if was_full {
            self.shared.room.notify_waiters();
        }
        Poll::Ready(self.batch.pop_front())
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.receiver_gone = true;
        // Nothing will read these; free them now rather than with the
        // last handle.
        state.queue.clear();
        drop(state);
        self.shared.room.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use std::future::Future;
    use std::pin::Pin;
    use std::time::Duration;

    /// Polls `f` once with the test task's waker.
    async fn poll_once<F: Future>(mut f: Pin<&mut F>) -> Poll<F::Output> {
        poll_fn(|cx| Poll::Ready(f.as_mut().poll(cx))).await
    }

    #[tokio::test]
    async fn frames_come_out_in_order_across_batches() {
        let (tx, mut rx) = channel(4);
        let mut got = Vec::new();
        for round in 0..5 {
            for i in 0..4 {
                tx.try_send(round * 4 + i).expect("room");
            }
            for _ in 0..4 {
                got.push(poll_fn(|cx| rx.poll_recv(cx)).await.expect("a frame"));
            }
        }
        assert_eq!(got, (0..20).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_full_queue_refuses_then_makes_the_writer_wait_until_read() {
        let (tx, mut rx) = channel(2);
        tx.try_send(1).expect("room");
        tx.try_send(2).expect("room");
        assert!(matches!(tx.try_send(3), Err(TrySendError::Full(3))));
        let mut writer = Box::pin(tx.send(3));
        assert!(poll_once(writer.as_mut()).await.is_pending());
        assert_eq!(rx.try_recv(), Some(1));
        tokio::time::timeout(Duration::from_secs(5), writer)
            .await
            .expect("the writer is woken by the read")
            .expect("queued");
        assert_eq!(rx.try_recv(), Some(2));
        assert_eq!(rx.try_recv(), Some(3));
        assert_eq!(rx.try_recv(), None);
    }

    #[tokio::test]
    async fn a_waiting_reader_is_woken_by_a_push() {
        let (tx, mut rx) = channel(8);
        let reader = tokio::spawn(async move { poll_fn(|cx| rx.poll_recv(cx)).await });
        tokio::task::yield_now().await;
        tx.try_send(7).expect("room");
        let got = tokio::time::timeout(Duration::from_secs(5), reader)
            .await
            .expect("woken")
            .expect("no panic");
        assert_eq!(got, Some(7));
    }

    #[tokio::test]
    async fn the_stream_ends_after_the_queued_frames_once_the_sender_is_gone() {
        let (tx, mut rx) = channel(8);
        tx.try_send(1).expect("room");
        drop(tx);
        assert_eq!(poll_fn(|cx| rx.poll_recv(cx)).await, Some(1));
        assert_eq!(poll_fn(|cx| rx.poll_recv(cx)).await, None);
    }

    #[tokio::test]
    async fn writers_are_told_when_the_reader_is_gone_even_while_waiting() {
        let (tx, rx) = channel(1);
        tx.try_send(1).expect("room");
        let mut writer = Box::pin(tx.send(2));
        assert!(poll_once(writer.as_mut()).await.is_pending());
        drop(rx);
        let back = tokio::time::timeout(Duration::from_secs(5), writer)
            .await
            .expect("woken");
        assert_eq!(back, Err(2));
        assert!(matches!(tx.try_send(3), Err(TrySendError::Closed(3))));
    }
}
