//! The resize soak (`ci/soak`): one guest through many resizes between random sizes, with
//! data written before and checked after every shrink, and the VMM's RSS sampled. Not a
//! scenario of `ci/test`: a tool that says whether long runs stay correct and bounded.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::guest::{Guest, ScenarioError};
use crate::vmm::{VmSpec, Vmm};

/// MiB of checksummed data the guest writes before each shrink, by default. In the test
/// host, 64 MiB cost 4.6 s to write and sum and 2 s to verify per shrink, which made 1000
/// cycles take 2.3 hours; 16 MiB still lands in plugged (movable) memory and is migrated
/// by the unplugs it survives.
pub const DEFAULT_DATA_MIB: u64 = 16;
/// Longest wait for one resize to reach its size.
const RESIZE_TIMEOUT: Duration = Duration::from_secs(120);

/// What a soak did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Resize cycles run.
    pub cycles: usize,
    /// Shrinks after which the data checksum held.
    pub verified: usize,
    /// Cycles that failed (the size not reached, or the data changed).
    pub failed: usize,
    /// VMM RSS with nothing plugged after the soak minus before it, in KiB (the same
    /// guest state, so guest memory does not count).
    pub vmm_rss_growth_kib: i64,
    /// The first failure, if any.
    pub first_failure: Option<String>,
}

impl Outcome {
    /// The final line of `ci/soak`.
    pub fn line(&self) -> String {
        format!(
            "soak: cycles={} verified={} failed={} vmm_rss_growth_kib={}",
            self.cycles, self.verified, self.failed, self.vmm_rss_growth_kib
        )
    }
}

/// A small deterministic generator (xorshift64*), so a soak can be replayed by seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// One cycle: a random block-aligned size in [0, region]; data written first and
/// verified after when it shrinks. Returns whether the data was checked.
fn cycle(g: &mut Guest, rng: &mut Rng, data_mib: u64) -> Result<bool, ScenarioError> {
    let s = g.sizes()?;
    let blocks = s.region_size / s.block_size.max(1);
    let target = (rng.next() % (blocks + 1)) * s.block_size;
    let shrink = target < s.plugged;
    if shrink {
        g.fill(data_mib, true)?;
    }
    let r = g.resize_wait(target, g.memtotal_with(target), RESIZE_TIMEOUT)?;
    if !r.reached {
        let now = g.sizes()?;
        return Err(ScenarioError::Check(format!(
            "resize {} -> {target} not reached in {RESIZE_TIMEOUT:?}: MemTotal {} kB, \
             plugged {}, requested {}",
            s.plugged, r.memtotal_kb, now.plugged, now.requested
        )));
    }
    if shrink {
        g.verify(&format!("after shrinking {} -> {target}", s.plugged))?;
        g.free()?;
    }
    Ok(shrink)
}

/// Boots one guest from `spec` and runs `cycles` resize cycles; one `RESIZE-SOAK` line per
/// cycle. A failed cycle is counted and the soak goes on from wherever the guest is.
///
/// # Errors
///
/// [`ScenarioError`] when the guest does not boot or the VMM cannot be reached.
pub fn run(
    vmm: &dyn Vmm,
    spec: &VmSpec,
    logs: &Path,
    cycles: usize,
    seed: u64,
    data_mib: u64,
    echo: bool,
) -> Result<Outcome, ScenarioError> {
    let log = logs.join(format!("{}-{}-resize-soak.log", vmm.name(), spec.name));
    let mut g = Guest::boot(vmm, spec, &log, echo)?;
    let mut rng = Rng(seed.max(1));
    let mut out = Outcome::default();
    g.ensure_plugged(0)?;
    let rss_before = g.vmm_rss()?;
    for n in 1..=cycles {
        let t = Instant::now();
        let result = cycle(&mut g, &mut rng, data_mib);
        out.cycles = n;
        let plugged = g.sizes().map(|s| s.plugged).unwrap_or(0);
        match result {
            Ok(checked) => {
                out.verified += usize::from(checked);
                println!(
                    "RESIZE-SOAK {n} ok plugged={plugged} checked={checked} {:.1} s",
                    t.elapsed().as_secs_f64()
                );
            }
            Err(e) => {
                out.failed += 1;
                println!("RESIZE-SOAK {n} FAILED plugged={plugged}: {e}");
                out.first_failure.get_or_insert(e.to_string());
                if g.vmm.exited().is_some() {
                    println!("RESIZE-SOAK: the VMM exited; stopping");
                    break;
                }
                // Data left from a failed shrink goes, so the next cycle starts clean.
                let _ = g.free();
            }
        }
        if n % 100 == 0 {
            println!(
                "RESIZE-SOAK rss={} kib after {n} cycles",
                g.vmm_rss()? / 1024
            );
        }
    }
    g.ensure_plugged(0)?;
    let rss_after = g.vmm_rss()?;
    out.vmm_rss_growth_kib = (i64::try_from(rss_after).unwrap_or(i64::MAX)
        - i64::try_from(rss_before).unwrap_or(i64::MAX))
        / 1024;
    g.shutdown();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_replay_by_seed_and_cover_the_region() {
        let draw = |seed| {
            let mut r = Rng(seed);
            (0..200).map(|_| r.next() % 33).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        let d = draw(7);
        assert!(
            d.contains(&0) && d.contains(&32),
            "both ends of the region come up"
        );
    }

    #[test]
    fn the_final_line_is_what_ci_soak_greps() {
        let o = Outcome {
            cycles: 3,
            verified: 2,
            failed: 0,
            vmm_rss_growth_kib: -4,
            first_failure: None,
        };
        assert_eq!(
            o.line(),
            "soak: cycles=3 verified=2 failed=0 vmm_rss_growth_kib=-4"
        );
    }
}
