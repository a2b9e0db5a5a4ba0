//! `GET /v1/events`: newline-delimited JSON events to any number of clients, without a
//! slow or vanished client ever holding up the VMM or the other clients.
//!
//! Each subscriber has a bounded queue of its own. Publishing never blocks: when a queue
//! is full its oldest event is dropped and counted, and the subscriber is told how many it
//! missed (a `dropped` event) before the next one it gets.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::ResizeState;

/// Events a subscriber's queue holds before the oldest are dropped.
pub const QUEUE_LEN: usize = 256;

/// What happened, as one JSON object per line (`{"event": "done", ...}`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum EventKind {
    /// The operator set a new requested size.
    ResizeRequested {
        /// The new requested size.
        requested_size: u64,
        /// What was plugged then.
        plugged_size: u64,
    },
    /// A resize moved (at most one a second).
    Progress {
        /// What it is doing.
        state: ResizeState,
        /// Plugged now.
        plugged_size: u64,
        /// Requested now.
        requested_size: u64,
        /// Average rate since it started.
        rate_bytes_per_s: Option<u64>,
        /// Seconds left at that rate.
        eta_s: Option<u64>,
    },
    /// Plugged reached requested.
    Done {
        /// Plugged (and requested) now.
        plugged_size: u64,
    },
    /// A resize stopped moving.
    Stalled {
        /// Plugged now.
        plugged_size: u64,
        /// Requested now.
        requested_size: u64,
        /// Why, and what to do.
        reason: String,
    },
    /// Host memory failed (or works again: `error` is `null`).
    HostError {
        /// The failure, or `null` once host memory works again.
        error: Option<String>,
    },
    /// Automatic sizing set a new requested size.
    Autosize {
        /// Requested size before.
        from: u64,
        /// Requested size now.
        to: u64,
        /// Why.
        reason: String,
    },
    /// The guest's driver acknowledged the device.
    DriverReady,
    /// The guest reset the device or the system (everything plugged was unplugged).
    Reset,
    /// This subscriber missed this many events (its queue was full).
    Dropped {
        /// Events missed since the last one delivered.
        count: u64,
    },
}

/// One event with its wall-clock time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Milliseconds since the Unix epoch.
    pub t_ms: u64,
    /// What happened.
    #[serde(flatten)]
    pub kind: EventKind,
}

impl Event {
    /// `kind`, stamped now.
    pub fn now(kind: EventKind) -> Self {
        let t_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Event { t_ms, kind }
    }

    /// The event as one line of JSON, without the newline.
    pub fn to_line(&self) -> String {
        // A struct of strings and integers always serializes.
        serde_json::to_string(self).unwrap_or_else(|_| "{}".into())
    }
}

#[derive(Debug, Default)]
struct Queue {
    events: VecDeque<Event>,
    dropped: u64,
}

#[derive(Debug, Default)]
struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // Pushes and pops only: a panic elsewhere leaves the queue consistent.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The publishers' side: hands every event to every live subscriber.
#[derive(Debug, Default)]
pub struct EventBus {
    subscribers: Mutex<Vec<Weak<Shared>>>,
}

impl EventBus {
    /// A bus with no subscribers.
    pub fn new() -> Self {
        Self::default()
    }

    /// A new subscriber; it gets the events published from now on.
    pub fn subscribe(&self) -> Subscription {
        let shared = Arc::new(Shared::default());
        self.subs().push(Arc::downgrade(&shared));
        Subscription { shared }
    }

    fn subs(&self) -> MutexGuard<'_, Vec<Weak<Shared>>> {
        self.subscribers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Gives `kind` (stamped now) to every subscriber; never blocks on one.
    pub fn publish(&self, kind: EventKind) {
        let event = Event::now(kind);
        let mut subs = self.subs();
        subs.retain(|w| w.strong_count() > 0);
        for s in subs.iter().filter_map(Weak::upgrade) {
            let mut q = s.lock();
            if q.events.len() >= QUEUE_LEN {
                q.events.pop_front();
                q.dropped = q.dropped.saturating_add(1);
            }
            q.events.push_back(event.clone());
            drop(q);
            s.ready.notify_one();
        }
    }

    /// Live subscribers.
    pub fn subscribers(&self) -> usize {
        self.subs().iter().filter(|w| w.strong_count() > 0).count()
    }
}

/// A subscriber's side. Dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    shared: Arc<Shared>,
}

impl Subscription {
    /// The next event, waiting at most `timeout`; a `dropped` event first when some
    /// were missed.
    pub fn next(&self, timeout: Duration) -> Option<Event> {
        let mut q = self.shared.lock();
        if q.events.is_empty() {
            q = self
                .shared
                .ready
                .wait_timeout_while(q, timeout, |q| q.events.is_empty())
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        if q.dropped > 0 {
            let count = std::mem::take(&mut q.dropped);
            return Some(Event::now(EventKind::Dropped { count }));
        }
        q.events.pop_front()
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]
mod tests {
    use super::*;

    const NOW: Duration = Duration::from_millis(1);

    #[test]
    fn every_subscriber_gets_every_event_in_order() {
        let bus = EventBus::new();
        let (a, b) = (bus.subscribe(), bus.subscribe());
        bus.publish(EventKind::DriverReady);
        bus.publish(EventKind::Done { plugged_size: 4 });
        for s in [&a, &b] {
            assert_eq!(s.next(NOW).unwrap().kind, EventKind::DriverReady);
            assert_eq!(
                s.next(NOW).unwrap().kind,
                EventKind::Done { plugged_size: 4 }
            );
            assert_eq!(s.next(NOW), None);
        }
    }

    #[test]
    fn a_subscriber_that_does_not_read_loses_the_oldest_and_is_told() {
        let bus = EventBus::new();
        let slow = bus.subscribe();
        let fast = bus.subscribe();
        for i in 0..(QUEUE_LEN as u64 + 10) {
            bus.publish(EventKind::Done { plugged_size: i });
            // The fast one keeps up; publishing never waited for the slow one.
            assert_eq!(
                fast.next(NOW).unwrap().kind,
                EventKind::Done { plugged_size: i }
            );
        }
        assert_eq!(
            slow.next(NOW).unwrap().kind,
            EventKind::Dropped { count: 10 }
        );
        assert_eq!(
            slow.next(NOW).unwrap().kind,
            EventKind::Done { plugged_size: 10 }
        );
    }

    #[test]
    fn a_vanished_subscriber_is_forgotten() {
        let bus = EventBus::new();
        let s = bus.subscribe();
        assert_eq!(bus.subscribers(), 1);
        drop(s);
        bus.publish(EventKind::Reset);
        assert_eq!(bus.subscribers(), 0);
    }

    #[test]
    fn a_wait_ends_when_an_event_comes() {
        let bus = Arc::new(EventBus::new());
        let s = bus.subscribe();
        let publisher = {
            let bus = Arc::clone(&bus);
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                bus.publish(EventKind::Reset);
            })
        };
        let got = s.next(Duration::from_secs(10)).unwrap();
        assert_eq!(got.kind, EventKind::Reset);
        publisher.join().unwrap();
    }

    #[test]
    fn events_are_one_json_object_per_line() {
        let line = Event {
            t_ms: 5,
            kind: EventKind::Stalled {
                plugged_size: 1,
                requested_size: 2,
                reason: "x".into(),
            },
        }
        .to_line();
        assert_eq!(
            line,
            r#"{"t_ms":5,"event":"stalled","plugged_size":1,"requested_size":2,"reason":"x"}"#
        );
        let back: Event = serde_json::from_str(&line).unwrap();
        assert_eq!(back.t_ms, 5);
    }
}
