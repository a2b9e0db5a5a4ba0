//! The capacity controller: decides the virtio-mem requested size from the guest's own
//! memory figures (MemTotal and MemAvailable, as the balloon's statistics give them), so
//! that memory follows demand without an agent in the guest.
//!
//! Used memory is `total - available`. The controller keeps it at or below the target
//! utilisation of the guest's memory:
//!
//! - **Grow fast**: as soon as a fresh sample shows used above target, one step straight to
//!   the size that brings it back under target (at most once per `grow_every`).
//! - **Shrink slowly**: only after used has stayed below what a smaller size needs for
//!   `shrink_hold`, at most `shrink_step` at a time and once per `shrink_every`, and never
//!   below used + `headroom`.
//! - Always block-aligned, within `[min, max]`, and never above `cap` (what the guest's
//!   onlining policy can take as movable memory).
//! - No decision on stale figures (older than `max_stats_age`) or while a resize is still
//!   moving.
//!
//! Time is given by the caller, so every decision replays exactly in tests.

use std::time::{Duration, Instant};

/// The operator's policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Smallest plugged size.
    pub min: u64,
    /// Largest plugged size.
    pub max: u64,
    /// Device block size (sizes are multiples of it).
    pub block: u64,
    /// Target utilisation in per mille of guest memory (default 750: 75%).
    pub target_permille: u64,
    /// Memory kept free above used when shrinking.
    pub headroom: u64,
    /// Shortest time between two growth steps.
    pub grow_every: Duration,
    /// How long used must stay low before a shrink.
    pub shrink_hold: Duration,
    /// Shortest time between two shrink steps.
    pub shrink_every: Duration,
    /// Largest shrink step.
    pub shrink_step: u64,
    /// Figures older than this are not acted on.
    pub max_stats_age: Duration,
}

/// Why a policy cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// A size is not a multiple of the block size.
    #[error("autosize policy: {what} {value:#x} is not a multiple of the block size {block:#x}")]
    Unaligned {
        /// Which option.
        what: &'static str,
        /// Its value.
        value: u64,
        /// Block size.
        block: u64,
    },
    /// min above max, or max beyond the region.
    #[error(
        "autosize policy: min {min:#x} and max {max:#x} must satisfy min <= max <= the region \
         ({region:#x})"
    )]
    Range {
        /// min.
        min: u64,
        /// max.
        max: u64,
        /// Region size.
        region: u64,
    },
    /// The target is not between 1% and 99%.
    #[error("autosize policy: target {0} per mille must be between 10 and 990")]
    Target(u64),
    /// The block size is zero.
    #[error("block size 0")]
    NoBlock,
}

impl Policy {
    /// The defaults for `[min, max]` with `block`-sized steps: 75% target, 256 MiB headroom,
    /// growth once a second, shrink after 20 s below target in steps of 512 MiB every
    /// 5 s (about 2.5 GiB back within a minute of the guest freeing it), figures up to
    /// 5 s old.
    pub fn new(min: u64, max: u64, block: u64) -> Self {
        Policy {
            min,
            max,
            block,
            target_permille: 750,
            headroom: 256 << 20,
            grow_every: Duration::from_secs(1),
            shrink_hold: Duration::from_secs(20),
            shrink_every: Duration::from_secs(5),
            shrink_step: 512 << 20,
            max_stats_age: Duration::from_secs(5),
        }
    }

    /// Checks the policy against a region of `region` bytes.
    ///
    /// # Errors
    ///
    /// [`PolicyError`] naming the option that is wrong.
    pub fn validate(&self, region: u64) -> Result<(), PolicyError> {
        if self.block == 0 {
            return Err(PolicyError::NoBlock);
        }
        for (what, value) in [
            ("min", self.min),
            ("max", self.max),
            ("step", self.shrink_step),
        ] {
            if value % self.block != 0 {
                return Err(PolicyError::Unaligned {
                    what,
                    value,
                    block: self.block,
                });
            }
        }
        if self.min > self.max || self.max > region {
            return Err(PolicyError::Range {
                min: self.min,
                max: self.max,
                region,
            });
        }
        if !(10..=990).contains(&self.target_permille) {
            return Err(PolicyError::Target(self.target_permille));
        }
        Ok(())
    }

    fn align_up(&self, v: u64) -> u64 {
        v.div_ceil(self.block).saturating_mul(self.block)
    }
}

/// One reading of the guest's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    /// When it came.
    pub at: Instant,
    /// MemTotal: boot RAM plus online plugged memory, in bytes.
    pub total: u64,
    /// MemAvailable, in bytes.
    pub available: u64,
}

/// What the device stands at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Device {
    /// Plugged now.
    pub plugged: u64,
    /// Requested now.
    pub requested: u64,
    /// The most the guest can take (its onlining policy's limit), at most the region.
    pub cap: u64,
}

/// Why the controller keeps the size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keep {
    /// No figures, or too old.
    StaleStats,
    /// The last resize is still moving.
    InFlight,
    /// Utilisation is where it should be.
    OnTarget,
    /// Used is low, but not for long enough yet.
    Holding,
    /// A step is due but rate-limited.
    RateLimited,
    /// Growth is wanted but the size is at max or cap.
    AtLimit,
}

/// A decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Keep the requested size.
    Keep(Keep),
    /// Set the requested size to this.
    Grow(u64),
    /// Set the requested size to this.
    Shrink(u64),
}

/// The controller's memory between decisions.
#[derive(Clone, Debug)]
pub struct Controller {
    policy: Policy,
    low_since: Option<Instant>,
    last_grow: Option<Instant>,
    last_shrink: Option<Instant>,
}

impl Controller {
    /// A controller for a validated `policy`.
    pub fn new(policy: Policy) -> Self {
        Controller {
            policy,
            low_since: None,
            last_grow: None,
            last_shrink: None,
        }
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The plugged size that keeps `used` at target, given `base` bytes that are not
    /// hotplugged: the smallest block-aligned `s` with `used <= target * (base + s)`.
    fn size_for(&self, used: u64, base: u64) -> u64 {
        let p = &self.policy;
        // used * 1000 / target, in u128 so nothing overflows.
        let total = (u128::from(used) * 1000).div_ceil(u128::from(p.target_permille));
        let total = u64::try_from(total).unwrap_or(u64::MAX);
        p.align_up(total.saturating_sub(base))
    }

    /// Decides at `now` from the latest `sample` and the `device`'s sizes.
    pub fn decide(&mut self, now: Instant, sample: Option<&Sample>, device: Device) -> Decision {
        let p = self.policy.clone();
        let Some(s) = sample.filter(|s| now.saturating_duration_since(s.at) <= p.max_stats_age)
        else {
            return Decision::Keep(Keep::StaleStats);
        };
        if device.plugged != device.requested {
            return Decision::Keep(Keep::InFlight);
        }
        let used = s.total.saturating_sub(s.available);
        // What is not hotplugged (boot RAM, as the guest counts it).
        let base = s.total.saturating_sub(device.plugged);
        let limit = p.max.min(device.cap) / p.block * p.block;
        let raw = self.size_for(used, base);
        let want = raw.clamp(p.min, limit.max(p.min));
        let since = |t: Option<Instant>, every: Duration| {
            t.is_none_or(|t| now.saturating_duration_since(t) >= every)
        };
        if raw > device.requested || want > device.requested {
            self.low_since = None;
            if device.requested >= limit {
                return Decision::Keep(Keep::AtLimit);
            }
            if !since(self.last_grow, p.grow_every) {
                return Decision::Keep(Keep::RateLimited);
            }
            self.last_grow = Some(now);
            return Decision::Grow(want.min(limit));
        }
        // Never below used + headroom, nor below min.
        let floor = p
            .align_up((used.saturating_add(p.headroom)).saturating_sub(base))
            .max(p.min);
        let target = want.max(floor);
        if target >= device.requested {
            self.low_since = None;
            return Decision::Keep(Keep::OnTarget);
        }
        let low_since = *self.low_since.get_or_insert(now);
        if now.saturating_duration_since(low_since) < p.shrink_hold {
            return Decision::Keep(Keep::Holding);
        }
        if !since(self.last_shrink, p.shrink_every) {
            return Decision::Keep(Keep::RateLimited);
        }
        self.last_shrink = Some(now);
        let to = target.max(device.requested.saturating_sub(p.shrink_step));
        Decision::Shrink(to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;
    const BOOT: u64 = 1024 * MIB;

    fn policy() -> Policy {
        Policy::new(0, 8 * GIB, 128 * MIB)
    }

    /// A guest with `used` bytes in use (at most all of it) and `plugged` bytes plugged
    /// (all online).
    fn sample(at: Instant, used: u64, plugged: u64) -> Sample {
        let total = BOOT + plugged;
        Sample {
            at,
            total,
            available: total.saturating_sub(used),
        }
    }

    fn dev(size: u64) -> Device {
        Device {
            plugged: size,
            requested: size,
            cap: 16 * GIB,
        }
    }

    #[test]
    fn the_policy_is_checked() {
        assert!(policy().validate(8 * GIB).is_ok());
        assert!(matches!(
            Policy::new(0, 9 * GIB, 128 * MIB).validate(8 * GIB),
            Err(PolicyError::Range { .. })
        ));
        assert!(matches!(
            Policy::new(MIB, 8 * GIB, 128 * MIB).validate(8 * GIB),
            Err(PolicyError::Unaligned { what: "min", .. })
        ));
        let mut p = policy();
        p.target_permille = 1000;
        assert_eq!(p.validate(8 * GIB), Err(PolicyError::Target(1000)));
    }

    #[test]
    fn growth_is_one_step_straight_to_target() {
        let t0 = Instant::now();
        let mut c = Controller::new(policy());
        // 1 GiB boot, nothing plugged, 950 MiB used: needs 950/0.75 = 1267 MiB of memory.
        let used = 950 * MIB;
        let d = c.decide(t0, Some(&sample(t0, used, 0)), dev(0));
        let Decision::Grow(to) = d else {
            panic!("{d:?}")
        };
        assert_eq!(to % (128 * MIB), 0);
        let util = |plugged: u64| used as f64 / (BOOT + plugged) as f64;
        assert!(util(to) <= 0.75, "{to:#x}: {}", util(to));
        assert!(
            util(to - 128 * MIB) > 0.75,
            "the smallest size that does it"
        );
    }

    #[test]
    fn growth_is_rate_limited_capped_and_waits_for_the_last_resize() {
        let t0 = Instant::now();
        let mut c = Controller::new(policy());
        assert!(matches!(
            c.decide(t0, Some(&sample(t0, 2 * GIB, 0)), dev(0)),
            Decision::Grow(_)
        ));
        let t1 = t0 + Duration::from_millis(500);
        let mut moving = dev(0);
        moving.requested = GIB;
        assert_eq!(
            c.decide(t1, Some(&sample(t1, 3 * GIB, 0)), moving),
            Decision::Keep(Keep::InFlight)
        );
        assert_eq!(
            c.decide(t1, Some(&sample(t1, 3 * GIB, GIB)), dev(GIB)),
            Decision::Keep(Keep::RateLimited)
        );
        let t2 = t0 + Duration::from_secs(2);
        let mut capped = dev(GIB);
        // Full (2 GiB used of 2 GiB) wants 2.67 GiB of memory, but the guest can take 1.5.
        capped.cap = 1536 * MIB;
        assert_eq!(
            c.decide(t2, Some(&sample(t2, 2 * GIB, GIB)), capped),
            Decision::Grow(1536 * MIB)
        );
        let t3 = t2 + Duration::from_secs(2);
        capped.plugged = 1536 * MIB;
        capped.requested = 1536 * MIB;
        assert_eq!(
            c.decide(t3, Some(&sample(t3, 2560 * MIB, 1536 * MIB)), capped),
            Decision::Keep(Keep::AtLimit)
        );
    }

    #[test]
    fn stale_figures_change_nothing() {
        let t0 = Instant::now();
        let mut c = Controller::new(policy());
        let later = t0 + Duration::from_secs(6);
        assert_eq!(
            c.decide(later, Some(&sample(t0, 2 * GIB, 0)), dev(0)),
            Decision::Keep(Keep::StaleStats)
        );
        assert_eq!(
            c.decide(later, None, dev(0)),
            Decision::Keep(Keep::StaleStats)
        );
    }

    #[test]
    fn shrink_waits_for_the_hold_then_steps_down_and_stops_at_headroom() {
        let t0 = Instant::now();
        let mut c = Controller::new(policy());
        let used = 1536 * MIB;
        let mut size = 4 * GIB;
        let mut t = t0;
        let mut steps = Vec::new();
        for _ in 0..400 {
            let d = c.decide(t, Some(&sample(t, used, size)), dev(size));
            match d {
                Decision::Shrink(to) => {
                    assert!(to < size && size - to <= 512 * MIB, "{size:#x} -> {to:#x}");
                    steps.push((t.duration_since(t0).as_secs(), to));
                    size = to;
                }
                Decision::Grow(to) => panic!("grew to {to:#x} with used low"),
                Decision::Keep(_) => {}
            }
            t += Duration::from_secs(1);
        }
        assert!(
            steps.first().is_some_and(|(s, _)| *s >= 20),
            "held first: {steps:?}"
        );
        assert!(
            steps.windows(2).all(|w| w[1].0 - w[0].0 >= 5),
            "rate-limited: {steps:?}"
        );
        // Ends where 75% holds and used + headroom fits.
        let total = BOOT + size;
        assert!(
            used * 1000 <= 750 * total && used + 256 * MIB <= total,
            "{size:#x}"
        );
        assert!(
            (BOOT + size - 128 * MIB) * 750 < used * 1000
                || BOOT + size - 128 * MIB < used + 256 * MIB,
            "not one block more than needed: {size:#x}"
        );
    }

    #[test]
    fn a_rise_during_the_hold_restarts_it() {
        let t0 = Instant::now();
        let mut c = Controller::new(policy());
        let size = 4 * GIB;
        for s in 0..20 {
            let t = t0 + Duration::from_secs(s);
            assert_eq!(
                c.decide(t, Some(&sample(t, GIB, size)), dev(size)),
                Decision::Keep(Keep::Holding)
            );
        }
        // Load comes back to target for a moment: the hold starts over.
        let t = t0 + Duration::from_secs(20);
        assert_eq!(
            c.decide(t, Some(&sample(t, 3800 * MIB, size)), dev(size)),
            Decision::Keep(Keep::OnTarget)
        );
        let t = t0 + Duration::from_secs(40);
        assert_eq!(
            c.decide(t, Some(&sample(t, GIB, size)), dev(size)),
            Decision::Keep(Keep::Holding)
        );
    }

    proptest::proptest! {
        /// Whatever the guest reports, a decision is block-aligned, within [min, cap], and
        /// a shrink never goes below used + headroom.
        #[test]
        fn decisions_stay_in_bounds(
            used_mib in 0u64..20_000,
            plugged_blocks in 0u64..64,
            cap_blocks in 0u64..128,
            min_blocks in 0u64..8,
        ) {
            let t = Instant::now();
            let block = 128 * MIB;
            let mut p = Policy::new(min_blocks * block, 64 * block, block);
            p.shrink_hold = Duration::ZERO;
            let mut c = Controller::new(p);
            let plugged = plugged_blocks * block;
            let device = Device { plugged, requested: plugged, cap: cap_blocks * block };
            let s = sample(t, used_mib * MIB, plugged);
            match c.decide(t, Some(&s), device) {
                Decision::Grow(to) => {
                    proptest::prop_assert_eq!(to % block, 0);
                    proptest::prop_assert!(to > plugged);
                    proptest::prop_assert!(to <= (64 * block).min(cap_blocks * block).max(min_blocks * block));
                }
                Decision::Shrink(to) => {
                    proptest::prop_assert_eq!(to % block, 0);
                    proptest::prop_assert!(to < plugged && to >= min_blocks * block);
                    proptest::prop_assert!(BOOT + to >= used_mib * MIB + 256 * MIB);
                }
                Decision::Keep(_) => {}
            }
        }
    }
}
