//! The whole-process figures of `/proc/self/smaps_rollup` follow plug and unplug. These
//! figures move with every allocation in the process, so this binary holds a single test
//! (no other test threads run beside it) and measures one backing kind after the other.

#![expect(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]

use memory_backend::accounting::{process_usage, MemoryUsage};
use memory_backend::hugetlb::PoolGuard;
use memory_backend::{Backing, HugePageSize, MemoryRegion, PopulateOptions, RegionConfig};

const MIB: u64 = 1 << 20;

fn check(backing: Backing, figure: fn(&MemoryUsage) -> u64, name: &str) {
    let cfg = RegionConfig::new(128 * MIB, 2 * MIB)
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
    check(Backing::PrivateAnonymous, |u| u.anonymous, "Anonymous");
    check(Backing::PrivateAnonymous, |u| u.rss, "Rss");
    check(Backing::SharedMemfd, |u| u.shmem, "Pss_Shmem");
    match PoolGuard::ensure_available(HugePageSize::Size2M, 32) {
        Ok(_pool) => check(
            Backing::HugetlbMemfd(HugePageSize::Size2M),
            MemoryUsage::hugetlb,
            "Private+Shared_Hugetlb",
        ),
        Err(e) => println!("SKIP: hugetlb part: cannot get 32 free 2 MiB pages: {e}"),
    }
}
