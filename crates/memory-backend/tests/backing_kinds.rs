//! Plug/unplug against the real host figures for the base-page backing kinds: private
//! anonymous, shared memfd, a tmpfs file and a regular file. (Hugetlb kinds are in
//! `hugetlb.rs`, which serializes on the host's hugetlb pool.)

#![expect(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]

mod common;

use std::path::PathBuf;

use common::{plug_write_unplug, random_cycles, MIB};
use memory_backend::{
    Backing, BackingKind, MemoryRegion, PopulateMethod, PopulateOptions, RegionConfig,
};

/// A file path removed when dropped.
struct TempPath(PathBuf);

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn tmpfs_path(name: &str) -> TempPath {
    TempPath(PathBuf::from(format!(
        "/dev/shm/memory-backend-test-{}-{name}",
        std::process::id()
    )))
}

/// A region on a file of a regular (disk) file system: in the build's target directory,
/// which holds the build and so is a disk almost everywhere, else in `/var/tmp`, which
/// outlives reboots and so is not tmpfs (`/tmp` may be). Fails, saying what to change,
/// when neither is: the test must not pass without checking a regular file.
fn disk_region(name: &str, size: u64, populate: bool) -> (TempPath, MemoryRegion) {
    let mut seen = Vec::new();
    for dir in [env!("CARGO_TARGET_TMPDIR"), "/var/tmp"] {
        let path = TempPath(
            PathBuf::from(dir).join(format!("memory-backend-{}-{name}", std::process::id())),
        );
        let r = region(Backing::File(path.0.clone()), size, populate);
        if r.backing_kind() == BackingKind::RegularFile {
            return (path, r);
        }
        seen.push(format!("{dir} is {}", r.backing_kind()));
    }
    panic!(
        "no regular file system to test on ({}): point CARGO_TARGET_DIR at a disk",
        seen.join(", ")
    )
}

fn region(backing: Backing, size: u64, populate: bool) -> MemoryRegion {
    let mut cfg = RegionConfig::sized(size, 2 * MIB)
        .unwrap()
        .with_backing(backing);
    if populate {
        cfg = cfg.with_populate(PopulateOptions::default());
    }
    MemoryRegion::new(cfg).unwrap()
}

#[test]
fn private_anonymous_plug_write_unplug() {
    let r = region(Backing::PrivateAnonymous, 256 * MIB, false);
    assert_eq!(r.backing_kind(), BackingKind::PrivateAnonymous);
    plug_write_unplug(&r, 64 * MIB, 64 * MIB);
}

#[test]
fn private_anonymous_populate_commits_without_writes() {
    let r = region(Backing::PrivateAnonymous, 256 * MIB, true);
    let before = r.usage().unwrap().mapping.anonymous;
    r.plug(0, 64 * MIB).unwrap();
    let after = r.usage().unwrap().mapping.anonymous;
    assert!(
        after >= before + 64 * MIB,
        "populate left Anonymous at {after} (from {before})"
    );
    r.unplug(0, 64 * MIB).unwrap();
    assert!(r.usage().unwrap().mapping.anonymous <= before + MIB);
}

#[test]
fn shared_memfd_plug_write_unplug() {
    let r = region(Backing::SharedMemfd, 256 * MIB, false);
    assert_eq!(r.backing_kind(), BackingKind::Shmem);
    plug_write_unplug(&r, 128 * MIB, 64 * MIB);
}

#[test]
fn tmpfs_file_plug_write_unplug() {
    let path = tmpfs_path("plug");
    let r = region(Backing::File(path.0.clone()), 256 * MIB, false);
    assert_eq!(r.backing_kind(), BackingKind::Shmem);
    plug_write_unplug(&r, 0, 64 * MIB);
}

#[test]
fn regular_file_plug_write_unplug() {
    let (_path, r) = disk_region("plug", 256 * MIB, false);
    plug_write_unplug(&r, 192 * MIB, 64 * MIB);
}

#[test]
fn existing_file_contents_are_discarded_at_creation() {
    let path = tmpfs_path("existing");
    std::fs::write(&path.0, vec![0x77u8; 4 << 20]).unwrap();
    let r = region(Backing::File(path.0.clone()), 16 * MIB, false);
    assert_eq!(r.usage().unwrap().file_allocated, Some(0));
    assert_eq!(std::fs::metadata(&path.0).unwrap().len(), 16 * MIB);
}

#[test]
fn populate_touch_fallback_commits_for_each_kind() {
    let path = tmpfs_path("touch");
    for backing in [
        Backing::PrivateAnonymous,
        Backing::SharedMemfd,
        Backing::File(path.0.clone()),
    ] {
        let r = region(backing, 64 * MIB, false);
        let opts = PopulateOptions {
            method: PopulateMethod::Touch,
            ..PopulateOptions::default()
        };
        let report = r.plug_with(0, 32 * MIB, Some(&opts)).unwrap().unwrap();
        assert_eq!(report.method, PopulateMethod::Touch);
        let u = r.usage().unwrap();
        assert!(u.committed() >= 32 * MIB, "{}: {u:?}", r.backing_kind());
        r.unplug(0, 32 * MIB).unwrap();
        assert!(r.usage().unwrap().committed() <= MIB);
    }
}

#[test]
fn parallel_populate_uses_several_threads() {
    let r = region(Backing::PrivateAnonymous, 256 * MIB, false);
    let opts = PopulateOptions::with_threads(2.try_into().unwrap());
    let report = r.plug_with(0, 128 * MIB, Some(&opts)).unwrap().unwrap();
    assert_eq!(report.threads, 2);
    assert_eq!(report.method, PopulateMethod::MadvisePopulateWrite);
    assert!(r.usage().unwrap().committed() >= 128 * MIB);
    // A 2 MiB plug is not worth a thread.
    let small = r
        .plug_with(200 * MIB, 2 * MIB, Some(&opts))
        .unwrap()
        .unwrap();
    assert_eq!(small.threads, 1);
}

#[test]
fn every_discard_method_frees_memory() {
    let path = tmpfs_path("discard");
    for backing in [
        Backing::PrivateAnonymous,
        Backing::SharedMemfd,
        Backing::File(path.0.clone()),
    ] {
        let r = region(backing, 64 * MIB, true);
        for &method in r.backing_kind().discard_methods() {
            r.plug(0, 32 * MIB).unwrap();
            common::fill(&r, 0, 32 * MIB, 1);
            r.unplug_with(0, 32 * MIB, method).unwrap();
            let u = r.usage().unwrap();
            assert!(
                u.committed() <= MIB,
                "{} {method:?}: {u:?}",
                r.backing_kind()
            );
            common::assert_inaccessible(&r, 0, 32 * MIB);
        }
    }
}

#[test]
fn private_anonymous_random_cycles() {
    let r = region(Backing::PrivateAnonymous, 256 * MIB, true);
    random_cycles(&r, 0x5eed_0001, 1000, 8);
}

#[test]
fn shared_memfd_random_cycles() {
    let r = region(Backing::SharedMemfd, 256 * MIB, true);
    random_cycles(&r, 0x5eed_0002, 1000, 8);
}

#[test]
fn tmpfs_file_random_cycles() {
    let path = tmpfs_path("cycles");
    let r = region(Backing::File(path.0.clone()), 128 * MIB, true);
    random_cycles(&r, 0x5eed_0003, 1000, 4);
}

#[test]
fn regular_file_random_cycles() {
    let (_path, r) = disk_region("cycles", 64 * MIB, true);
    random_cycles(&r, 0x5eed_0004, 1000, 4);
}
