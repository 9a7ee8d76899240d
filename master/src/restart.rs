//! When to restart a crashed child: exponential backoff and an Erlang/OTP
//! style restart-intensity limit, per slot.
//!
//! Pure: the caller passes the clock in, so every rule is unit-tested without
//! waiting.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// What to do when a slot passes its restart-intensity limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnLimit {
    /// Stop the whole cluster; the master exits with code 3.
    Stop,
    /// Keep the cluster running with the slot marked failed.
    KeepRunning,
}

/// The restart rules for one kind of child.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Delay before the first restart after a crash.
    pub backoff_initial: Duration,
    /// The most the delay grows to.
    pub backoff_max: Duration,
    /// A process that lived this long resets the backoff.
    pub stable_after: Duration,
    /// More restarts than this within `window` hit the limit.
    pub max_restarts: u32,
    /// The sliding window of the intensity limit.
    pub window: Duration,
    /// What the limit does.
    pub on_limit: OnLimit,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            backoff_initial: Duration::from_millis(10),
            backoff_max: Duration::from_secs(5),
            stable_after: Duration::from_secs(10),
            max_restarts: 10,
            window: Duration::from_secs(60),
            on_limit: OnLimit::Stop,
        }
    }
}

/// The decision after a crash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Restart after this delay.
    RestartIn(Duration),
    /// The limit is reached: `restarts` restarts happened within the window.
    Limit {
        /// Restarts counted in the window, this one included.
        restarts: u32,
    },
}

/// One slot's restart history.
#[derive(Debug, Default)]
pub struct Backoff {
    /// Crashes since the last stable run.
    consecutive: u32,
    /// When the current process started.
    started: Option<Instant>,
    /// Restart times within the window, oldest first.
    recent: VecDeque<Instant>,
}

impl Backoff {
    /// A process started for the slot.
    pub fn started(&mut self, now: Instant) {
        self.started = Some(now);
    }

    /// The slot's process ended: decide whether and when to restart.
    pub fn crashed(&mut self, policy: &Policy, now: Instant) -> Decision {
        let lived = self
            .started
            .map_or(Duration::ZERO, |s| now.saturating_duration_since(s));
        if lived >= policy.stable_after {
            self.consecutive = 0;
        }
        while self
            .recent
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) > policy.window)
        {
            self.recent.pop_front();
        }
        self.recent.push_back(now);
        let restarts = self.recent.len() as u32;
        if restarts > policy.max_restarts {
            return Decision::Limit { restarts };
        }
        let factor = 1u32
            .checked_shl(self.consecutive.min(31))
            .unwrap_or(u32::MAX);
        let delay = policy
            .backoff_initial
            .saturating_mul(factor)
            .min(policy.backoff_max);
        self.consecutive += 1;
        Decision::RestartIn(delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn policy() -> Policy {
        Policy {
            backoff_initial: ms(10),
            backoff_max: ms(50),
            stable_after: ms(1000),
            max_restarts: 100,
            window: ms(60_000),
            on_limit: OnLimit::Stop,
        }
    }

    #[test]
    fn backoff_doubles_to_its_cap() {
        let p = policy();
        let mut b = Backoff::default();
        let t = Instant::now();
        let delays: Vec<Decision> = (0..5)
            .map(|i| {
                b.started(t + ms(i));
                b.crashed(&p, t + ms(i))
            })
            .collect();
        let want = [10, 20, 40, 50, 50].map(|d| Decision::RestartIn(ms(d)));
        assert_eq!(delays, want);
    }

    #[test]
    fn a_stable_run_resets_the_backoff() {
        let p = policy();
        let mut b = Backoff::default();
        let t = Instant::now();
        b.started(t);
        b.crashed(&p, t);
        b.started(t);
        assert_eq!(b.crashed(&p, t), Decision::RestartIn(ms(20)));
        b.started(t);
        assert_eq!(b.crashed(&p, t + ms(1000)), Decision::RestartIn(ms(10)));
    }

    #[test]
    fn more_restarts_than_the_limit_within_the_window_is_the_limit() {
        let p = Policy {
            max_restarts: 3,
            window: ms(1000),
            ..policy()
        };
        let mut b = Backoff::default();
        let t = Instant::now();
        for i in 0..3 {
            assert!(matches!(b.crashed(&p, t + ms(i)), Decision::RestartIn(_)));
        }
        assert_eq!(b.crashed(&p, t + ms(3)), Decision::Limit { restarts: 4 });
        // Restarts older than the window no longer count.
        let mut b = Backoff::default();
        for i in 0..3 {
            b.crashed(&p, t + ms(i));
        }
        assert!(matches!(
            b.crashed(&p, t + ms(1500)),
            Decision::RestartIn(_)
        ));
    }
}
