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
    /// Bytes the host plugged for the guest's requests.
    pub bytes_plugged: u64,
    /// Bytes the host unplugged (UNPLUG and UNPLUG_ALL).
    pub bytes_unplugged: u64,
    /// Host time of each plug request's work (populate, KVM slots).
    pub plug_host_time: Histogram,
    /// Host time of each unplug request's work (discard, protection, KVM slots).
    pub unplug_host_time: Histogram,
}

/// Upper bounds, in seconds, of [`Histogram`]'s buckets (a last one holds the rest).
pub const HOST_TIME_BUCKETS_S: [f64; 9] = [0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0];

/// A histogram of durations over [`HOST_TIME_BUCKETS_S`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last counts those above every bound.
    pub buckets: [u64; HOST_TIME_BUCKETS_S.len() + 1],
    /// Sum of all observations, in nanoseconds.
    pub sum_ns: u64,
    /// Number of observations.
    pub count: u64,
}

impl Histogram {
    /// Adds one observation.
    pub fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        let i = HOST_TIME_BUCKETS_S
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(HOST_TIME_BUCKETS_S.len());
        self.buckets[i] = self.buckets[i].saturating_add(1);
        self.sum_ns = self
            .sum_ns
            .saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        self.count = self.count.saturating_add(1);
    }
}

impl Metrics {
    /// One request's host work, which moved `bytes` in `time`.
    pub(crate) fn host_work(&mut self, unplug: bool, bytes: u64, time: Duration) {
        if unplug {
            self.bytes_unplugged = self.bytes_unplugged.saturating_add(bytes);
            self.unplug_host_time.observe(time);
        } else {
            self.bytes_plugged = self.bytes_plugged.saturating_add(bytes);
            self.plug_host_time.observe(time);
        }
    }

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
    fn host_work_lands_in_its_bucket_and_its_byte_count() {
        let mut m = Metrics::default();
        m.host_work(false, 128 << 20, Duration::from_micros(700));
        m.host_work(false, 2 << 20, Duration::from_secs(60));
        m.host_work(true, 64 << 20, Duration::from_millis(5));
        assert_eq!((m.bytes_plugged, m.bytes_unplugged), (130 << 20, 64 << 20));
        // 0.7 ms is in the 1 ms bucket; 60 s above every bound; 5 ms in the 5 ms bucket.
        assert_eq!(m.plug_host_time.buckets[1], 1);
        assert_eq!(m.plug_host_time.buckets[HOST_TIME_BUCKETS_S.len()], 1);
        assert_eq!(m.unplug_host_time.buckets[2], 1);
        assert_eq!(m.plug_host_time.count, 2);
        assert_eq!(m.plug_host_time.sum_ns, 60_000_700_000);
    }

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
