//! Automatic sizing in the VMM: the `autosize` controller fed with the balloon's guest
//! statistics, applied to the virtio-mem device's requested size, and explained.
//!
//! [`Capacity`] is the one owner of the controller's state. The device watcher calls
//! [`Capacity::tick`] every 250 ms with the device locked; the memory API reads
//! [`Capacity::status`] and sets the policy through [`Capacity::set_policy`].
//!
//! What it does when an input goes bad:
//! - statistics missing or older than the policy's `max_stats_age` (driver not loaded,
//!   guest hung): holds the size, state `stale`;
//! - an unplug stalls (the guest cannot offline the memory): sets the requested size back
//!   to what is plugged, state `backing-off`, and does not shrink for [`BACKOFF`];
//! - a plug stalls (no driver, host memory short): holds, state `stalled`, with the
//!   device's reason.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use autosize::{Controller, Decision, Keep, Policy, Sample};
use log::{debug, info};
use virtio_mem::{BlockBackend, Interrupt, ResizeState, VirtioMem};
use vmm_api::{AutosizeDecision, AutosizePolicy, AutosizeStatus, GuestStatsView};

use crate::devices::balloon::{self, SharedBalloon};

/// How long the controller does not shrink after an unplug stalled.
pub const BACKOFF: Duration = Duration::from_secs(60);
/// Decisions kept for the API.
const HISTORY: usize = 16;
/// Largest shrink step (rounded to the block size).
const SHRINK_STEP: u64 = 512 << 20;

/// The controller's state.
pub struct Capacity {
    balloon: Option<SharedBalloon>,
    controller: Option<(AutosizePolicy, Controller)>,
    block: u64,
    region: u64,
    /// Most the guest's onlining policy can take (see `GuestOnline::movable_cap`).
    cap: u64,
    started: Instant,
    history: VecDeque<AutosizeDecision>,
    state: &'static str,
    reason: String,
    backoff_until: Option<Instant>,
}

impl std::fmt::Debug for Capacity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capacity")
            .field("on", &self.controller.is_some())
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// Why a policy cannot be set.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CapacityError {
    /// The VMM has no balloon device, so no guest statistics.
    #[error(
        "automatic sizing needs the guest's statistics: start the VMM with --autosize or \
         --balloon"
    )]
    NoBalloon,
    /// The policy does not fit the device.
    #[error("{0}")]
    Policy(#[from] autosize::PolicyError),
}

impl Capacity {
    /// Off, for a device of `block`-sized blocks in a `region`-byte region.
    pub fn new(block: u64, region: u64) -> Self {
        Capacity {
            balloon: None,
            controller: None,
            block,
            region,
            cap: region,
            started: Instant::now(),
            history: VecDeque::new(),
            state: "off",
            reason: String::new(),
            backoff_until: None,
        }
    }

    /// Where the guest's statistics come from, and the most the controller plugs.
    pub fn attach_balloon(&mut self, balloon: SharedBalloon, cap: u64) {
        self.balloon = Some(balloon);
        self.cap = cap;
    }

    /// The most the controller plugs under `p`: `max`, or less where the guest's onlining
    /// policy limits it, unless the operator lifted that with `beyond_cap`.
    fn cap_for(&self, p: &AutosizePolicy) -> u64 {
        let cap = if p.beyond_cap { self.region } else { self.cap };
        cap.min(p.max)
    }

    /// The balloon's counters, when there is a balloon.
    pub fn balloon_counters(&self) -> Option<virtio_balloon::Counters> {
        self.balloon.as_ref().map(|b| balloon::lock(b).counters())
    }

    /// Whether the controller sets the size.
    pub fn is_on(&self) -> bool {
        self.controller.is_some()
    }

    /// The controller's policy for `p`, checked against the device.
    ///
    /// # Errors
    ///
    /// [`CapacityError::Policy`] naming what is wrong.
    pub fn policy_for(&self, p: &AutosizePolicy) -> Result<Policy, CapacityError> {
        let mut policy = Policy::new(p.min, p.max, self.block);
        policy.target_permille = u64::from(p.target_percent) * 10;
        if let Some(h) = p.headroom {
            policy.headroom = h;
        }
        policy.shrink_step = SHRINK_STEP.div_ceil(self.block.max(1)) * self.block;
        policy.validate(self.region)?;
        Ok(policy)
    }

    /// Turns the controller on with `p`, or off with `None`.
    ///
    /// # Errors
    ///
    /// [`CapacityError`]; nothing changes then.
    pub fn set_policy(&mut self, p: Option<AutosizePolicy>) -> Result<(), CapacityError> {
        match p {
            None => {
                if self.controller.take().is_some() {
                    info!("autosize: off; the requested size stays where it is");
                }
                self.state = "off";
                self.reason.clear();
            }
            Some(p) => {
                if self.balloon.is_none() {
                    return Err(CapacityError::NoBalloon);
                }
                let policy = self.policy_for(&p)?;
                info!(
                    "autosize: on, min {} max {} target {}% headroom {} cap {}",
                    policy.min,
                    policy.max,
                    p.target_percent,
                    policy.headroom,
                    self.cap_for(&p)
                );
                self.controller = Some((p, Controller::new(policy)));
                self.backoff_until = None;
                self.state = "watching";
                self.reason = "waiting for the first decision".into();
            }
        }
        Ok(())
    }

    /// The latest guest figures the controller can use. Take them before locking the
    /// device: the balloon's handler locks the device while it holds the balloon.
    pub fn sample(&self) -> Option<Sample> {
        let (at, s) = balloon::lock(self.balloon.as_ref()?).stats()?;
        Some(Sample {
            at,
            total: s.total?,
            available: s.available?,
        })
    }

    fn record(&mut self, now: Instant, from: u64, to: u64, reason: String) {
        info!("autosize: requested {from} -> {to}: {reason}");
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(AutosizeDecision {
            at_ms: u64::try_from(now.saturating_duration_since(self.started).as_millis())
                .unwrap_or(u64::MAX),
            from,
            to,
            reason,
        });
    }

    fn set_state(&mut self, state: &'static str, reason: String) {
        if state != self.state {
            // What an operator must act on is logged at info; the ordinary coming and
            // going between growing, holding and watching (each second while a workload
            // grows) at debug: the decisions themselves are logged at info.
            if matches!(state, "stale" | "stalled" | "backing-off" | "at-limit") {
                info!("autosize: {state}: {reason}");
            } else {
                debug!("autosize: {state}: {reason}");
            }
        }
        self.state = state;
        self.reason = reason;
    }

    /// Decides at `now` from `sample` ([`Capacity::sample`]) and applies the decision to
    /// `dev`. Returns the change made (from, to, reason), if any.
    pub fn tick<B: BlockBackend, I: Interrupt>(
        &mut self,
        now: Instant,
        sample: Option<Sample>,
        dev: &mut VirtioMem<B, I>,
    ) -> Option<(u64, u64, String)> {
        self.controller.as_ref()?;
        let (plugged, requested) = (dev.state().plugged_size(), dev.state().requested_size());
        let p = dev.state().progress(now);
        if p.state == ResizeState::Stalled {
            let why = p.reason.map(|r| r.message()).unwrap_or_default();
            if requested < plugged {
                let to = plugged.div_ceil(self.block) * self.block;
                if dev.set_requested_size(to).is_ok() {
                    self.backoff_until = Some(now + BACKOFF);
                    let reason = format!(
                        "unplug stalled ({why}); requested set back to plugged, no shrink \
                         for {} s",
                        BACKOFF.as_secs()
                    );
                    self.record(now, requested, to, reason.clone());
                    self.set_state("backing-off", reason.clone());
                    return Some((requested, to, reason));
                }
            }
            self.set_state("stalled", format!("the resize does not move: {why}"));
            return None;
        }
        let cap = self.cap_for(&self.controller.as_ref()?.0);
        let (_, controller) = self.controller.as_mut()?;
        let max_age = controller.policy().max_stats_age;
        let max = controller.policy().max;
        let device = autosize::Device {
            plugged,
            requested,
            cap,
        };
        let decision = controller.decide(now, sample.as_ref(), device);
        let backoff_left = self
            .backoff_until
            .map_or(Duration::ZERO, |t| t.saturating_duration_since(now));
        let backing_off = !backoff_left.is_zero();
        let (to, reason, state) = match decision {
            Decision::Grow(to) => {
                let s = sample?;
                (
                    to,
                    format!(
                        "guest uses {} of {} bytes, above target",
                        s.total.saturating_sub(s.available),
                        s.total
                    ),
                    "growing",
                )
            }
            Decision::Shrink(_) if backing_off => {
                self.set_state("backing-off", backed_off_for(backoff_left));
                return None;
            }
            Decision::Shrink(to) => {
                let s = sample?;
                (
                    to,
                    format!(
                        "guest uses {} of {} bytes, below target for the hold time",
                        s.total.saturating_sub(s.available),
                        s.total
                    ),
                    "shrinking",
                )
            }
            Decision::Keep(k) => {
                let (state, reason) = match k {
                    // Nothing more pressing to say: the operator keeps seeing why no
                    // shrink comes for a while.
                    Keep::OnTarget | Keep::Holding | Keep::RateLimited if backing_off => {
                        ("backing-off", backed_off_for(backoff_left))
                    }
                    Keep::StaleStats => (
                        "stale",
                        format!(
                            "no guest statistics newer than {} s (balloon driver not loaded, \
                             or the guest is hung): holding the size",
                            max_age.as_secs()
                        ),
                    ),
                    Keep::InFlight => ("moving", "the last resize is still moving".into()),
                    Keep::OnTarget => ("watching", "utilisation is on target".into()),
                    Keep::Holding => (
                        "holding",
                        "below target, waiting for the hold time before shrinking".into(),
                    ),
                    Keep::RateLimited => ("holding", "a step is due but rate-limited".into()),
                    Keep::AtLimit if cap < max => (
                        "at-limit",
                        format!(
                            "more memory is wanted but the size is at {cap} bytes, what the \
                             guest's onlining policy can take (3x boot RAM in ZONE_MOVABLE); \
                             beyond_cap=yes lifts this, at the risk of the guest kernel \
                             running short of its own memory"
                        ),
                    ),
                    Keep::AtLimit => (
                        "at-limit",
                        format!("more memory is wanted but the size is at max, {max} bytes"),
                    ),
                };
                self.set_state(state, reason);
                return None;
            }
        };
        match dev.set_requested_size(to) {
            Ok(_) => {
                self.record(now, requested, to, reason.clone());
                self.set_state(state, reason.clone());
                Some((requested, to, reason))
            }
            Err(e) => {
                self.set_state("stalled", format!("the device refused {to}: {e}"));
                None
            }
        }
    }

    /// The API's view, `None` when off.
    pub fn status(&self, now: Instant) -> Option<AutosizeStatus> {
        let (policy, _) = self.controller.as_ref()?;
        let stats = self
            .balloon
            .as_ref()
            .and_then(|b| balloon::lock(b).stats())
            .map(|(at, s)| GuestStatsView {
                total: s.total,
                available: s.available,
                free: s.free,
                caches: s.caches,
                major_faults: s.major_faults,
                swap_in: s.swap_in,
                swap_out: s.swap_out,
                oom_kills: s.oom_kills,
                alloc_stalls: s.alloc_stalls,
                async_scan: s.async_scan,
                direct_scan: s.direct_scan,
                async_reclaim: s.async_reclaim,
                direct_reclaim: s.direct_reclaim,
                age_ms: u64::try_from(now.saturating_duration_since(at).as_millis())
                    .unwrap_or(u64::MAX),
            });
        Some(AutosizeStatus {
            cap: self.cap_for(policy),
            policy: policy.clone(),
            state: self.state.to_string(),
            reason: self.reason.clone(),
            stats,
            decisions: self.history.iter().cloned().collect(),
        })
    }
}

/// The state reason while shrinking is held back after a stalled unplug.
fn backed_off_for(left: Duration) -> String {
    format!(
        "an unplug stalled lately: no shrink for {} s more",
        left.as_secs().max(1)
    )
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use virtio_mem::test_utils::{CountingInterrupt, RecordingBackend};
    use virtio_mem::{DeviceConfig, Request};
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use crate::devices::balloon::{GuestFreePages, VirtioBalloon};

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;
    const ADDR: u64 = 4 * GIB;

    fn device() -> VirtioMem<RecordingBackend, CountingInterrupt> {
        let cfg = DeviceConfig::with_layout(ADDR, 4 * GIB, 2 * MIB).unwrap();
        VirtioMem::new(
            cfg,
            RecordingBackend::default(),
            CountingInterrupt::default(),
        )
        .unwrap()
    }

    fn on(min: u64, max: u64) -> Capacity {
        on_capped(min, max, 4 * GIB, false)
    }

    /// On, with the onlining policy's cap at `cap` and `beyond_cap` as given.
    fn on_capped(min: u64, max: u64, cap: u64, beyond_cap: bool) -> Capacity {
        let mut c = Capacity::new(2 * MIB, 4 * GIB);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let balloon = Arc::new(Mutex::new(VirtioBalloon::new(GuestFreePages::new(
            &mem, None,
        ))));
        c.attach_balloon(balloon, cap);
        c.set_policy(Some(AutosizePolicy {
            min,
            max,
            target_percent: 75,
            headroom: None,
            beyond_cap,
        }))
        .unwrap();
        c
    }

    fn sample(at: Instant, total: u64, used: u64) -> Option<Sample> {
        Some(Sample {
            at,
            total,
            available: total - used,
        })
    }

    #[test]
    fn a_policy_needs_statistics_and_must_fit_the_device() {
        let mut c = Capacity::new(2 * MIB, 4 * GIB);
        let p = AutosizePolicy {
            min: 0,
            max: GIB,
            target_percent: 75,
            headroom: None,
            beyond_cap: false,
        };
        assert_eq!(c.set_policy(Some(p.clone())), Err(CapacityError::NoBalloon));
        let mut c = on(0, GIB);
        for bad in [
            AutosizePolicy {
                max: 8 * GIB,
                ..p.clone()
            },
            AutosizePolicy {
                min: MIB,
                ..p.clone()
            },
        ] {
            assert!(matches!(
                c.set_policy(Some(bad)),
                Err(CapacityError::Policy(_))
            ));
        }
        assert!(c.is_on(), "a refused policy leaves the old one");
        c.set_policy(None).unwrap();
        assert!(!c.is_on());
        assert!(c.status(Instant::now()).is_none());
    }

    #[test]
    fn stale_figures_hold_the_size_and_say_why() {
        let mut c = on(0, 2 * GIB);
        let mut dev = device();
        let now = Instant::now();
        assert_eq!(c.tick(now, None, &mut dev), None);
        assert_eq!(c.status(now).unwrap().state, "stale");
        let old = sample(now, 512 * MIB, 500 * MIB);
        assert_eq!(c.tick(now + Duration::from_secs(6), old, &mut dev), None);
        assert_eq!(dev.state().requested_size(), 0);
        assert!(c.status(now).unwrap().reason.contains("balloon driver"));
    }

    #[test]
    fn high_use_grows_at_once_and_is_recorded() {
        let mut c = on(0, 2 * GIB);
        let mut dev = device();
        let now = Instant::now();
        let (from, to, reason) = c
            .tick(now, sample(now, 512 * MIB, 480 * MIB), &mut dev)
            .unwrap();
        assert_eq!(from, 0);
        assert_eq!(dev.state().requested_size(), to);
        // 480 MiB at 75% needs 640 MiB, 128 MiB above the 512 MiB boot RAM.
        assert_eq!(to, 128 * MIB);
        assert!(reason.contains("above target"), "{reason}");
        let s = c.status(now).unwrap();
        assert_eq!((s.state.as_str(), s.decisions.len()), ("growing", 1));
        assert_eq!(s.decisions[0].to, to);
    }

    #[test]
    fn growth_stops_at_the_onlining_cap_unless_the_operator_lifts_it() {
        // 500 of 512 MiB in use wants 667 MiB at 75%: 156 MiB more than the boot RAM,
        // above a 64 MiB cap.
        let now = Instant::now();
        let want = sample(now, 512 * MIB, 500 * MIB);
        let mut capped = on_capped(0, 3 * GIB, 64 * MIB, false);
        let mut dev = device();
        let (_, to, _) = capped.tick(now, want, &mut dev).unwrap();
        assert_eq!(to, 64 * MIB);
        assert_eq!(capped.status(now).unwrap().cap, 64 * MIB);
        dev.state_mut().handle(Request::Plug {
            addr: ADDR,
            nb_blocks: 32,
        });
        let later = now + Duration::from_secs(5);
        let still = sample(later, 576 * MIB, 560 * MIB);
        assert_eq!(capped.tick(later, still, &mut dev), None);
        let s = capped.status(later).unwrap();
        assert_eq!(s.state, "at-limit");
        assert!(s.reason.contains("beyond_cap=yes"), "{}", s.reason);

        let mut lifted = on_capped(0, 3 * GIB, 64 * MIB, true);
        let mut dev = device();
        let (_, to, _) = lifted.tick(now, want, &mut dev).unwrap();
        assert_eq!(to, 156 * MIB);
        assert_eq!(lifted.status(now).unwrap().cap, 3 * GIB);
    }

    #[test]
    fn a_stalled_unplug_is_set_back_to_plugged_and_shrinking_waits() {
        let mut c = on(0, 2 * GIB);
        let mut dev = device();
        dev.state_mut().set_requested_size(256 * MIB).unwrap();
        dev.state_mut().handle(Request::Plug {
            addr: ADDR,
            nb_blocks: 128,
        });
        assert_eq!(dev.state().plugged_size(), 256 * MIB);
        // An unplug the guest never carries out.
        dev.state_mut().set_requested_size(0).unwrap();
        let later = Instant::now() + Duration::from_secs(15);
        let (from, to, reason) = c
            .tick(later, sample(later, 768 * MIB, 100 * MIB), &mut dev)
            .unwrap();
        assert_eq!((from, to), (0, 256 * MIB));
        assert_eq!(dev.state().requested_size(), 256 * MIB);
        assert!(reason.contains("stalled"), "{reason}");
        assert_eq!(c.status(later).unwrap().state, "backing-off");
        // Low use for long after that: still no shrink within the back-off, and the state
        // says so all along (not the hold or rate limit the controller sees meanwhile).
        for s in 1..60 {
            let t = later + Duration::from_secs(s);
            assert_eq!(
                c.tick(t, sample(t, 768 * MIB, 100 * MIB), &mut dev),
                None,
                "{s} s"
            );
            let st = c.status(t).unwrap();
            assert_eq!(st.state, "backing-off", "{s} s: {}", st.reason);
            assert!(st.reason.contains("stalled"), "{s} s: {}", st.reason);
        }
        assert_eq!(dev.state().requested_size(), 256 * MIB);
        // After it, the shrink comes.
        let t = later + BACKOFF + Duration::from_secs(1);
        let (_, to, _) = c
            .tick(t, sample(t, 768 * MIB, 100 * MIB), &mut dev)
            .unwrap();
        assert!(to < 256 * MIB, "{to}");
    }
}
