//! Polling on for a moment after traffic, before a task sleeps.
//!
//! A message between two processes costs a wake-up of the receiver, and
//! where an idle CPU halts (virtual machines without guest halt-polling),
//! that wake-up is most of a hop's latency. A stream task that has just
//! handled a frame therefore keeps polling — yielding to the runtime, which
//! checks its sockets without blocking — for a short window before it
//! sleeps, so the next frame of a conversation is picked up by a running
//! CPU. The window restarts with every frame; a quiet stream sleeps after
//! one window, so an idle process costs nothing. While polling, the thread
//! also yields its CPU to any other runnable process, so polling never
//! delays the work it waits for — but it does show as CPU time: a process
//! that gets a frame more often than once per window polls all the time.

use std::time::{Duration, Instant};

/// One stream task's polling window.
#[derive(Debug)]
pub(crate) struct Spin {
    /// How long to poll after the last frame; zero turns polling off.
    window: Duration,
    /// When the stream was first found empty since its last frame.
    idle_since: Option<Instant>,
}

impl Spin {
    pub(crate) fn new(window: Duration) -> Self {
        Spin {
            window,
            idle_since: None,
        }
    }

    /// A frame arrived: the next empty moment starts a new window.
    pub(crate) fn active(&mut self) {
        self.idle_since = None;
    }

    /// The stream has nothing now: whether to yield and look again
    /// instead of sleeping.
    pub(crate) fn keep_polling(&mut self) -> bool {
        if self.window.is_zero() {
            return false;
        }
        let now = Instant::now();
        let since = *self.idle_since.get_or_insert(now);
        if now.duration_since(since) >= self.window {
            return false;
        }
        // Give the CPU to any process waiting for it (the one this
        // process is talking to, on a busy machine): polling must never
        // delay the work it waits for.
        std::thread::yield_now();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zero_window_never_polls() {
        let mut spin = Spin::new(Duration::ZERO);
        assert!(!spin.keep_polling());
    }

    #[test]
    fn polling_lasts_one_window_from_the_first_empty_look_and_restarts_with_a_frame() {
        let window = Duration::from_millis(20);
        let mut spin = Spin::new(window);
        let start = Instant::now();
        assert!(
            spin.keep_polling(),
            "the first empty look starts the window"
        );
        // It keeps polling for the whole window, and stops once it has passed.
        while spin.keep_polling() {
            assert!(start.elapsed() < window * 50, "polling never stops");
        }
        assert!(
            start.elapsed() >= window,
            "stopped before the window passed"
        );
        assert!(!spin.keep_polling(), "stays off until a frame");
        spin.active();
        assert!(spin.keep_polling(), "a frame starts a new window");
    }
}
