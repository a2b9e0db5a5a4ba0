//! Counters of what the guest asked and what the device answered.
//!
//! Guest-triggered failures are counted here and logged rate-limited, so a guest cannot
//! flood the host log, but an operator can still see them.

use std::time::{Duration, Instant};

use crate::wire::{Request, Response};

/// Answers per response type for one request type.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AnswerCounts {
    /// ACK answers.
    pub ack: u64,
    /// NACK answers.
    pub nack: u64,
    /// BUSY answers.
    pub busy: u64,
    /// ERROR answers.
    pub error: u64,
}

impl AnswerCounts {
    fn add(&mut self, resp: Response) {
        let slot = match resp {
            Response::Ack(_) => &mut self.ack,
            Response::Nack => &mut self.nack,
            Response::Busy => &mut self.busy,
            Response::Error => &mut self.error,
        };
        *slot = slot.saturating_add(1);
    }

    /// All answers.
    pub fn total(&self) -> u64 {
        self.ack + self.nack + self.busy + self.error
    }
}

/// Device counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Metrics {
    /// PLUG requests by answer.
    pub plug: AnswerCounts,
    /// UNPLUG requests by answer.
    pub unplug: AnswerCounts,
    /// UNPLUG_ALL requests by answer.
    pub unplug_all: AnswerCounts,
    /// STATE requests by answer.
    pub state: AnswerCounts,
    /// Requests of an unknown type (always ERROR).
    pub unsupported: u64,
    /// Descriptor chains that could not be parsed as a request.
    pub malformed_chains: u64,
    /// Backend failures (each answered BUSY).
    pub backend_failures: u64,
    /// Failures to write the used ring or signal the driver.
    pub queue_errors: u64,
}

impl Metrics {
    pub(crate) fn count(&mut self, req: &Request, resp: Response) {
        match req {
            Request::Plug { .. } => self.plug.add(resp),
            Request::Unplug { .. } => self.unplug.add(resp),
            Request::UnplugAll => self.unplug_all.add(resp),
            Request::State { .. } => self.state.add(resp),
            Request::Unsupported(_) => self.unsupported = self.unsupported.saturating_add(1),
        }
    }
}

/// Allows at most `burst` log lines per `period`, and reports how many were dropped.
#[derive(Debug)]
pub struct RateLimit {
    period: Duration,
    burst: u32,
    window_start: Option<Instant>,
    used: u32,
    dropped: u64,
}

impl RateLimit {
    /// At most `burst` lines per `period`.
    pub const fn new(period: Duration, burst: u32) -> Self {
        RateLimit {
            period,
            burst,
            window_start: None,
            used: 0,
            dropped: 0,
        }
    }

    /// `Some(dropped since the last allowed line)` if a line may be logged now.
    pub fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        let fresh = self
            .window_start
            .is_none_or(|start| now.duration_since(start) >= self.period);
        if fresh {
            self.window_start = Some(now);
            self.used = 0;
        }
        if self.used < self.burst {
            self.used += 1;
            Some(std::mem::take(&mut self.dropped))
        } else {
            self.dropped = self.dropped.saturating_add(1);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_drops_past_the_burst_and_counts() {
        let mut rl = RateLimit::new(Duration::from_secs(3600), 3);
        assert_eq!(rl.allow(), Some(0));
        assert_eq!(rl.allow(), Some(0));
        assert_eq!(rl.allow(), Some(0));
        assert_eq!(rl.allow(), None);
        assert_eq!(rl.allow(), None);
        assert_eq!(rl.dropped, 2);
    }

    #[test]
    fn rate_limit_opens_a_new_window() {
        let mut rl = RateLimit::new(Duration::ZERO, 1);
        assert_eq!(rl.allow(), Some(0));
        assert_eq!(rl.allow(), Some(0));
    }

    #[test]
    fn counts_by_request_and_answer() {
        let mut m = Metrics::default();
        m.count(
            &Request::Plug {
                addr: 0,
                nb_blocks: 1,
            },
            Response::Nack,
        );
        m.count(&Request::UnplugAll, Response::Busy);
        m.count(&Request::Unsupported(7), Response::Error);
        assert_eq!(m.plug.nack, 1);
        assert_eq!(m.unplug_all.busy, 1);
        assert_eq!(m.unsupported, 1);
        assert_eq!(m.plug.total(), 1);
    }
}
