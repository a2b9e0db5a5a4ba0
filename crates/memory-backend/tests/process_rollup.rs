//! The whole-process figures of `/proc/self/smaps_rollup` follow plug and unplug. These
//! figures move with every allocation in the process, so the tests of this binary hold
//! one lock (no other test thread measures beside them) and each measures one backing
//! kind after the other. The hugetlb test changes the host's hugetlb pool and is
//! `#[ignore]`d: `ci/host-tests` runs it on a machine it owns.

#![expect(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]

use std::sync::{Mutex, MutexGuard, PoisonError};

use memory_backend::accounting::{process_usage, MemoryUsage};
use memory_backend::hugetlb::PoolGuard;
use memory_backend::{Backing, HugePageSize, MemoryRegion, PopulateOptions, RegionConfig};

const MIB: u64 = 1 << 20;

/// Held by every test here: a second test's allocations would move the figures.
static ROLLUP: Mutex<()> = Mutex::new(());

fn serialize() -> MutexGuard<'static, ()> {
    ROLLUP.lock().unwrap_or_else(PoisonError::into_inner)
}

fn check(backing: Backing, figure: fn(&MemoryUsage) -> u64, name: &str) {
    let cfg = RegionConfig::sized(128 * MIB, 2 * MIB)
        .unwrap()
        .with_backing(backing)
        .with_populate(PopulateOptions::default());
    let region = MemoryRegion::new(cfg).unwrap();
    let before = figure(&process_usage().unwrap());
    region.plug(0, 64 * MIB).unwrap();
    let plugged = figure(&process_usage().unwrap());
    region.unplug(0, 64 * MIB).unwrap();
    let after = figure(&process_usage().unwrap());
    println!("{name}: before {before}, plugged {plugged}, unplugged {after}");
    assert!(
        plugged >= before + 64 * MIB,
        "{name} rose from {before} to {plugged}"
    );
    assert!(
        after <= before + MIB,
        "{name} is {after} after unplug, started at {before}"
    );
}

#[test]
fn smaps_rollup_follows_plug_and_unplug() {
    let _s = serialize();
    check(Backing::PrivateAnonymous, |u| u.anonymous, "Anonymous");
    check(Backing::PrivateAnonymous, |u| u.rss, "Rss");
    check(Backing::SharedMemfd, |u| u.shmem, "Pss_Shmem");
}

#[test]
#[ignore = "changes the host's hugetlb pool: run by ci/host-tests on a machine it owns"]
fn smaps_rollup_follows_hugetlb_plug_and_unplug() {
    let _s = serialize();
    let size = HugePageSize::Size2M;
    let _pool = PoolGuard::ensure_available(size, 32).unwrap_or_else(|e| {
        panic!(
            "cannot get 32 free {size} hugetlb pages ({e}): run as root on a host with \
             enough free memory to grow {}",
            size.nr_hugepages_path()
        )
    });
    check(
        Backing::HugetlbMemfd(size),
        MemoryUsage::hugetlb,
        "Private+Shared_Hugetlb",
    );
}
