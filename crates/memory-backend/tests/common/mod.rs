//! Shared scenarios of the host memory tests: each plugs, writes, measures and unplugs a
//! region and asserts on the figures that show the memory for its backing kind, read over
//! the region's own address range (so tests running in parallel threads do not disturb
//! each other).

#![allow(dead_code, reason = "each test binary uses a different subset")]

use memory_backend::probe::{read_in_child, ProbeOutcome};
use memory_backend::{BackingKind, MemoryRegion, RegionUsage};

pub const MIB: u64 = 1 << 20;

/// A small xorshift64* generator: deterministic, seeded, no dependency.
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform-ish in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

pub fn usage(region: &MemoryRegion) -> RegionUsage {
    region.usage().unwrap()
}

/// The kind-specific figures that must all show the plugged memory.
pub fn figures(u: &RegionUsage) -> Vec<(&'static str, u64)> {
    let mut v = vec![("committed", u.committed())];
    match u.kind {
        BackingKind::PrivateAnonymous => v.push(("smaps Anonymous", u.mapping.anonymous)),
        BackingKind::Hugetlb(_) => {
            v.push(("smaps Shared+Private_Hugetlb", u.mapping.hugetlb()));
            v.push(("file allocated", u.file_allocated.unwrap()));
        }
        BackingKind::Shmem | BackingKind::RegularFile => {
            v.push(("smaps Rss", u.mapping.rss));
            v.push(("file allocated", u.file_allocated.unwrap()));
        }
    }
    v
}

/// Host address of a region offset, as a number.
pub fn addr(region: &MemoryRegion, offset: u64) -> usize {
    region.host_addr() as usize + usize::try_from(offset).unwrap()
}

/// Writes `byte` to every byte of a plugged range.
pub fn fill(region: &MemoryRegion, offset: u64, len: u64, byte: u8) {
    let p = addr(region, offset) as *mut u8;
    // SAFETY: the range was plugged (mapped RW) by the caller and nothing else refers to it.
    unsafe { std::ptr::write_bytes(p, byte, usize::try_from(len).unwrap()) };
}

/// Reads the first byte of every page of a plugged range and checks it.
pub fn check_pages(region: &MemoryRegion, offset: u64, len: u64, byte: u8) {
    let page = region.page_size();
    let mut at = 0;
    while at < len {
        let p = addr(region, offset + at) as *const u8;
        // SAFETY: the range is plugged (mapped RW) and nothing writes to it concurrently.
        let v = unsafe { p.read_volatile() };
        assert_eq!(v, byte, "byte at region offset {:#x}", offset + at);
        at += page;
    }
}

/// Asserts that the range is inaccessible: maps says so, and a child reading its first
/// and last page dies of SIGSEGV.
pub fn assert_inaccessible(region: &MemoryRegion, offset: u64, len: u64) {
    assert!(
        region.is_inaccessible(offset, len).unwrap(),
        "range {offset:#x}+{len:#x} still accessible"
    );
    for at in [offset, offset + len - region.page_size()] {
        let outcome = read_in_child(addr(region, at)).unwrap();
        assert_eq!(
            outcome,
            ProbeOutcome::Signal(libc::SIGSEGV),
            "read at region offset {at:#x}"
        );
    }
}

/// The per-kind scenario: plug `len` bytes at `offset`, write them (unless the region
/// populates), check every figure rose by at least `len`; unplug, check every figure is
/// back within 1 MiB and the range is inaccessible; replug and check the old contents
/// are gone (the memory really was discarded).
pub fn plug_write_unplug(region: &MemoryRegion, offset: u64, len: u64) {
    let kind = region.backing_kind();
    let before = usage(region);
    region.plug(offset, len).unwrap();
    assert!(!region.is_inaccessible(offset, len).unwrap());
    fill(region, offset, len, 0xa5);
    let plugged = usage(region);
    println!("{kind}: before {before:?}\n{kind}: plugged {plugged:?}");
    for ((name, b), (_, p)) in figures(&before).into_iter().zip(figures(&plugged)) {
        assert!(
            p >= b + len,
            "{kind}: {name} rose from {b} to {p}, less than {len}"
        );
    }
    check_pages(region, offset, len, 0xa5);
    region.unplug(offset, len).unwrap();
    let after = usage(region);
    println!("{kind}: unplugged {after:?}");
    for ((name, b), (_, a)) in figures(&before).into_iter().zip(figures(&after)) {
        assert!(
            a <= b + MIB,
            "{kind}: {name} is {a} after unplug, started at {b}"
        );
    }
    assert_inaccessible(region, offset, len);
    // Replug: the contents must be gone, which proves the discard happened.
    region.plug(offset, len).unwrap();
    check_pages(region, offset, len, 0);
    region.unplug(offset, len).unwrap();
    let end = usage(region);
    for ((name, b), (_, a)) in figures(&before).into_iter().zip(figures(&end)) {
        assert!(
            a <= b + MIB,
            "{kind}: {name} is {a} after the second unplug, started at {b}"
        );
    }
}

/// 1,000 (or `cycles`) plug/unplug operations over random block ranges, checked against
/// a model of which blocks are plugged; at the end everything is unplugged and the
/// figures must be back where they started.
pub fn random_cycles(region: &MemoryRegion, seed: u64, cycles: u32, max_blocks: u64) {
    let kind = region.backing_kind();
    let bs = region.block_size();
    let nblocks = region.size() / bs;
    let mut plugged = vec![false; usize::try_from(nblocks).unwrap()];
    let mut rng = XorShift::new(seed);
    let start = usage(region);
    let (mut plugs, mut unplugs) = (0u32, 0u32);
    for i in 0..cycles {
        let n = 1 + rng.below(max_blocks.min(nblocks));
        let first = rng.below(nblocks - n + 1);
        let range = usize::try_from(first).unwrap()..usize::try_from(first + n).unwrap();
        let all_unplugged = plugged[range.clone()].iter().all(|p| !p);
        if all_unplugged && rng.below(4) != 0 {
            region.plug(first * bs, n * bs).unwrap();
            // Write the first byte of every block so the memory is used either way.
            for b in 0..n {
                fill(region, (first + b) * bs, 1, 0x5a);
            }
            plugged[range].iter_mut().for_each(|p| *p = true);
            plugs += 1;
        } else {
            region.unplug(first * bs, n * bs).unwrap();
            plugged[range].iter_mut().for_each(|p| *p = false);
            unplugs += 1;
        }
        if i % 100 == 99 {
            let model = plugged.iter().filter(|p| **p).count() as u64 * bs;
            let now = usage(region).committed();
            assert!(
                now + MIB >= start.committed() + model && now <= start.committed() + model + MIB,
                "{kind}: cycle {i}: committed {now}, model says {model} above {}",
                start.committed()
            );
        }
    }
    region.unplug_all().unwrap();
    let end = usage(region);
    println!("{kind}: {plugs} plugs, {unplugs} unplugs; start {start:?}\n{kind}: end {end:?}");
    for ((name, b), (_, a)) in figures(&start).into_iter().zip(figures(&end)) {
        assert!(
            a <= b + MIB,
            "{kind}: {name} grew from {b} to {a} over {cycles} cycles"
        );
    }
    assert!(region.is_inaccessible(0, region.size()).unwrap());
}
