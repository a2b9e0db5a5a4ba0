//! Where a resize stands, as an operator asks it: moving (and how fast), done, or stalled
//! and why.
//!
//! The device sees only the guest's requests and its own answers, so the reasons are
//! what those show. Linux's driver plugs or unplugs in steps as soon as the requested size
//! changes, answers BUSY with a retry after a growing timer (tens of seconds), and sends
//! no unplug request at all for memory it cannot offline. So a resize with no progress
//! for [`STALL_AFTER`] is stalled, and the reason is told apart by what came in:
//!
//! - no driver (features never acknowledged): the module is not loaded or not bound;
//! - no request at all since the resize started: the driver is not acting (for a shrink,
//!   most often memory it cannot offline);
//! - BUSY answers since the last progress: the host is short (the host error says what);
//! - a shrink that made progress and then fell silent: the guest cannot offline more.
//!
//! Memory plugged but left offline inside the guest is invisible from here (plugged
//! reaches requested); it needs the guest's own figures.

use std::time::{Duration, Instant};

use crate::wire::{Request, Response};

/// No progress for this long makes a moving resize stalled.
pub const STALL_AFTER: Duration = Duration::from_secs(10);

/// What the resize is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResizeState {
    /// Plugged size equals the requested size.
    Idle,
    /// The guest is plugging toward the requested size.
    Plugging,
    /// The guest is unplugging toward the requested size.
    Unplugging,
    /// Plugged differs from requested and nothing moved for [`STALL_AFTER`].
    Stalled,
}

/// Why a resize is stalled, with what the operator can do about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StallReason {
    /// The driver never acknowledged the device's features.
    NoDriver,
    /// The driver acknowledged but sent nothing since the resize started.
    NoRequests {
        /// The resize shrinks.
        shrinking: bool,
    },
    /// The guest asks, the host answers BUSY.
    HostBusy {
        /// The host failure behind it, if the device knows it.
        host_error: Option<String>,
    },
    /// A shrink went part of the way and the guest stopped sending unplug requests.
    CannotOffline,
}

impl StallReason {
    /// One sentence for the operator.
    pub fn message(&self) -> String {
        match self {
            StallReason::NoDriver => "the guest's virtio_mem driver is not bound: load the \
                                      module (modprobe virtio_mem) or check that the guest \
                                      booted"
                .into(),
            StallReason::NoRequests { shrinking: false } => {
                "the guest sends no plug requests: the memory it plugged is still offline \
                 (onlining policy none or manual: online it in the guest, or boot it with \
                 memhp_default_state=online_movable), or its virtio_mem driver is not acting \
                 (guest hung or busy?)"
                    .into()
            }
            StallReason::NoRequests { shrinking: true } => {
                "the guest sends no unplug requests: it cannot offline its memory (in use or \
                 not in ZONE_MOVABLE: online hotplugged memory movable, or ask for a larger \
                 size), or its driver is not acting"
                    .into()
            }
            StallReason::HostBusy { host_error } => match host_error {
                Some(e) => format!("the host answers the guest BUSY: {e}"),
                None => "the host answers the guest BUSY (a KVM slot or host memory is \
                         refused for now)"
                    .into(),
            },
            StallReason::CannotOffline => {
                "the guest stopped unplugging part of the way: it cannot offline more memory \
                 (under memory pressure or unmovable pages): free memory in the guest, online \
                 hotplugged memory movable, or ask for a larger size"
                    .into()
            }
        }
    }
}

/// Where a resize stands.
#[derive(Clone, Debug, PartialEq)]
pub struct ResizeProgress {
    /// What it is doing.
    pub state: ResizeState,
    /// Bytes moved toward the requested size since it was last set.
    pub moved_bytes: u64,
    /// Bytes still to move.
    pub remaining_bytes: u64,
    /// Average rate since the resize started, while moving.
    pub rate_bytes_per_s: Option<u64>,
    /// Seconds left at that rate, while moving.
    pub eta_s: Option<f64>,
    /// Seconds since the last progress, when stalled.
    pub stalled_for_s: Option<f64>,
    /// Why, when stalled.
    pub reason: Option<StallReason>,
}

/// Follows one resize at a time from the device's requests and answers. Time is given by
/// the caller so that recorded sequences replay exactly.
#[derive(Clone, Debug)]
pub struct ResizeTracker {
    started: Instant,
    start_plugged: u64,
    last_progress: Instant,
    requests_since_start: u64,
    busy_since_progress: u64,
    moved_since_start: bool,
}

impl ResizeTracker {
    /// A tracker with nothing to follow yet (plugged equals requested at `now`).
    pub fn new(now: Instant, plugged: u64) -> Self {
        ResizeTracker {
            started: now,
            start_plugged: plugged,
            last_progress: now,
            requests_since_start: 0,
            busy_since_progress: 0,
            moved_since_start: false,
        }
    }

    /// The requested size was set at `now`, with `plugged` bytes plugged.
    pub fn resize_started(&mut self, now: Instant, plugged: u64) {
        *self = ResizeTracker::new(now, plugged);
    }

    /// The device answered `req` with `resp` at `now`; `plugged_changed` when the answer
    /// moved the plugged size.
    pub fn answered(&mut self, now: Instant, req: &Request, resp: Response, plugged_changed: bool) {
        if matches!(req, Request::State { .. }) {
            // The driver's bookkeeping, not a step of the resize.
            return;
        }
        self.requests_since_start = self.requests_since_start.saturating_add(1);
        if plugged_changed {
            self.last_progress = now;
            self.busy_since_progress = 0;
            self.moved_since_start = true;
        } else if resp == Response::Busy {
            self.busy_since_progress = self.busy_since_progress.saturating_add(1);
        }
    }

    /// Where the resize stands at `now`. `driver_bound` is whether the driver acknowledged
    /// the features; `host_error` the device's last host failure.
    pub fn progress(
        &self,
        now: Instant,
        plugged: u64,
        requested: u64,
        driver_bound: bool,
        host_error: Option<&str>,
    ) -> ResizeProgress {
        let moved_bytes = plugged.abs_diff(self.start_plugged);
        let remaining_bytes = plugged.abs_diff(requested);
        if remaining_bytes == 0 {
            return ResizeProgress {
                state: ResizeState::Idle,
                moved_bytes,
                remaining_bytes,
                rate_bytes_per_s: None,
                eta_s: None,
                stalled_for_s: None,
                reason: None,
            };
        }
        let shrinking = requested < plugged;
        let quiet = now.saturating_duration_since(self.last_progress);
        if quiet >= STALL_AFTER {
            let reason = if self.busy_since_progress > 0 {
                StallReason::HostBusy {
                    host_error: host_error.map(str::to_string),
                }
            } else if self.requests_since_start == 0 && !driver_bound {
                StallReason::NoDriver
            } else if self.requests_since_start == 0 {
                StallReason::NoRequests { shrinking }
            } else if shrinking && self.moved_since_start {
                StallReason::CannotOffline
            } else {
                StallReason::NoRequests { shrinking }
            };
            return ResizeProgress {
                state: ResizeState::Stalled,
                moved_bytes,
                remaining_bytes,
                rate_bytes_per_s: None,
                eta_s: None,
                stalled_for_s: Some(quiet.as_secs_f64()),
                reason: Some(reason),
            };
        }
        let elapsed_ms = now.saturating_duration_since(self.started).as_millis();
        let rate = (moved_bytes > 0 && elapsed_ms > 0).then(|| {
            u64::try_from(u128::from(moved_bytes) * 1000 / elapsed_ms).unwrap_or(u64::MAX)
        });
        ResizeProgress {
            state: if shrinking {
                ResizeState::Unplugging
            } else {
                ResizeState::Plugging
            },
            moved_bytes,
            remaining_bytes,
            rate_bytes_per_s: rate,
            eta_s: rate
                .filter(|r| *r > 0)
                .map(|r| remaining_bytes as f64 / r as f64),
            stalled_for_s: None,
            reason: None,
        }
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const ADDR: u64 = 4 << 30;

    fn plug() -> Request {
        Request::Plug {
            addr: ADDR,
            nb_blocks: 64,
        }
    }

    fn unplug() -> Request {
        Request::Unplug {
            addr: ADDR,
            nb_blocks: 64,
        }
    }

    /// Replays `(seconds after start, request, response, plugged after)` and asks at `at`.
    fn replay(
        start_plugged: u64,
        requested: u64,
        steps: &[(u64, Request, Response, u64)],
        at: u64,
        driver_bound: bool,
    ) -> ResizeProgress {
        let t0 = Instant::now();
        let mut t = ResizeTracker::new(t0, start_plugged);
        t.resize_started(t0, start_plugged);
        let mut plugged = start_plugged;
        for (s, req, resp, after) in steps {
            t.answered(t0 + Duration::from_secs(*s), req, *resp, *after != plugged);
            plugged = *after;
        }
        t.progress(
            t0 + Duration::from_secs(at),
            plugged,
            requested,
            driver_bound,
            Some("hugetlb pool empty"),
        )
    }

    #[test]
    fn a_moving_plug_has_a_rate_and_an_eta() {
        let p = replay(
            0,
            512 * MIB,
            &[
                (1, plug(), Response::Ack(None), 128 * MIB),
                (2, plug(), Response::Ack(None), 256 * MIB),
            ],
            2,
            true,
        );
        assert_eq!(p.state, ResizeState::Plugging);
        assert_eq!((p.moved_bytes, p.remaining_bytes), (256 * MIB, 256 * MIB));
        assert_eq!(p.rate_bytes_per_s, Some(128 * MIB));
        assert_eq!(p.eta_s, Some(2.0));
        assert_eq!(p.reason, None);
    }

    #[test]
    fn done_is_idle() {
        let p = replay(
            0,
            128 * MIB,
            &[(1, plug(), Response::Ack(None), 128 * MIB)],
            60,
            true,
        );
        assert_eq!(p.state, ResizeState::Idle);
        assert_eq!(p.moved_bytes, 128 * MIB);
    }

    #[test]
    fn an_unbound_driver_is_named() {
        let p = replay(0, 128 * MIB, &[], 11, false);
        assert_eq!(p.state, ResizeState::Stalled);
        assert_eq!(p.reason, Some(StallReason::NoDriver));
        assert!(p.reason.unwrap().message().contains("modprobe virtio_mem"));
    }

    #[test]
    fn silence_is_not_a_stall_before_the_bound() {
        let p = replay(0, 128 * MIB, &[], 9, true);
        assert_eq!(p.state, ResizeState::Plugging);
        assert_eq!((p.rate_bytes_per_s, p.eta_s), (None, None));
    }

    #[test]
    fn a_guest_that_never_asks_is_named() {
        let p = replay(0, 128 * MIB, &[], 30, true);
        assert_eq!(p.reason, Some(StallReason::NoRequests { shrinking: false }));
        assert_eq!(p.stalled_for_s, Some(30.0));
    }

    #[test]
    fn busy_answers_name_the_host_error() {
        let p = replay(
            0,
            512 * MIB,
            &[
                (1, plug(), Response::Ack(None), 128 * MIB),
                (2, plug(), Response::Busy, 128 * MIB),
            ],
            20,
            true,
        );
        assert_eq!(
            p.reason,
            Some(StallReason::HostBusy {
                host_error: Some("hugetlb pool empty".into())
            })
        );
        assert_eq!(p.stalled_for_s, Some(19.0));
        assert!(p.reason.unwrap().message().contains("hugetlb pool empty"));
    }

    #[test]
    fn a_shrink_that_stops_part_way_cannot_offline() {
        let p = replay(
            1024 * MIB,
            0,
            &[(1, unplug(), Response::Ack(None), 896 * MIB)],
            15,
            true,
        );
        assert_eq!(p.state, ResizeState::Stalled);
        assert_eq!(p.reason, Some(StallReason::CannotOffline));
        assert!(p
            .reason
            .unwrap()
            .message()
            .contains("cannot offline more memory"));
    }

    #[test]
    fn a_shrink_with_no_request_at_all_says_both_causes() {
        let p = replay(1024 * MIB, 0, &[], 15, true);
        let r = p.reason.unwrap();
        assert_eq!(r, StallReason::NoRequests { shrinking: true });
        assert!(r.message().contains("cannot offline"), "{}", r.message());
    }

    #[test]
    fn state_requests_are_not_progress_nor_requests() {
        let p = replay(
            0,
            128 * MIB,
            &[(
                5,
                Request::State {
                    addr: ADDR,
                    nb_blocks: 1,
                },
                Response::Ack(None),
                0,
            )],
            12,
            true,
        );
        assert_eq!(p.reason, Some(StallReason::NoRequests { shrinking: false }));
    }

    #[test]
    fn progress_after_busy_clears_the_busy_reason() {
        let p = replay(
            0,
            512 * MIB,
            &[
                (1, plug(), Response::Busy, 0),
                (2, plug(), Response::Ack(None), 128 * MIB),
            ],
            13,
            true,
        );
        assert_eq!(p.reason, Some(StallReason::NoRequests { shrinking: false }));
    }
}
