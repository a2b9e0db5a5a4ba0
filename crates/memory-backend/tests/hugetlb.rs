//! Hugetlb backings (memfd with 2 MiB and 1 GiB pages, a hugetlbfs file) against the
//! real host figures and the host's hugetlb pool. The tests resize the pool (we run as
//! root) and put it back afterwards; the pool is global, so they run one at a time.
//! Because they change the host for everyone, they are `#[ignore]`d and run only by
//! `ci/host-tests` on a machine it owns; there, a pool or mount they cannot get fails
//! the test (a test that checked nothing must not pass).

#![expect(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, MutexGuard, PoisonError};

use common::{assert_inaccessible, plug_write_unplug, random_cycles, MIB};
use memory_backend::hugetlb::{pool_status, PoolGuard};
use memory_backend::{
    Backing, BackingKind, HugePageSize, MemoryBackendError, MemoryRegion, PopulateMethod,
    PopulateOptions, RegionConfig,
};

const GIB: u64 = 1 << 30;

/// The hugetlb pools are host-wide: one test at a time.
static POOL: Mutex<()> = Mutex::new(());

fn serialize() -> MutexGuard<'static, ()> {
    POOL.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Grows the pool, or fails the test saying what the host lacks.
fn pool(size: HugePageSize, pages: u64) -> PoolGuard {
    PoolGuard::ensure_available(size, pages).unwrap_or_else(|e| {
        panic!(
            "cannot get {pages} free {size} hugetlb pages ({e}): run as root on a host \
             with enough free memory to grow {}",
            size.nr_hugepages_path()
        )
    })
}

fn region(backing: Backing, size: u64, block: u64, populate: bool) -> MemoryRegion {
    let mut cfg = RegionConfig::sized(size, block)
        .unwrap()
        .with_backing(backing);
    if populate {
        cfg = cfg.with_populate(PopulateOptions::default());
    }
    MemoryRegion::new(cfg).unwrap()
}

/// Asserts that the pool has `pages` available, as before the test's region used it.
fn assert_pool_available(size: HugePageSize, pages: u64) {
    let st = pool_status(size).unwrap();
    assert_eq!(st.available(), pages, "{size} pool: {st:?}");
}

#[test]
#[ignore = "changes the host's hugetlb pool: run by ci/host-tests on a machine it owns"]
fn hugetlb_2m_plug_write_unplug() {
    let _s = serialize();
    let _pool = pool(HugePageSize::Size2M, 64);
    let avail = pool_status(HugePageSize::Size2M).unwrap().available();
    let r = region(
        Backing::HugetlbMemfd(HugePageSize::Size2M),
        256 * MIB,
        2 * MIB,
        false,
    );
    assert_eq!(r.backing_kind(), BackingKind::Hugetlb(HugePageSize::Size2M));
    plug_write_unplug(&r, 64 * MIB, 64 * MIB);
    assert_pool_available(HugePageSize::Size2M, avail);
}

#[test]
#[ignore = "changes the host's hugetlb pool: run by ci/host-tests on a machine it owns"]
fn hugetlb_2m_random_cycles() {
    let _s = serialize();
    let _pool = pool(HugePageSize::Size2M, 64);
    let avail = pool_status(HugePageSize::Size2M).unwrap().available();
    let r = region(
        Backing::HugetlbMemfd(HugePageSize::Size2M),
        128 * MIB,
        2 * MIB,
        true,
    );
    random_cycles(&r, 0x5eed_0010, 1000, 8);
    assert_pool_available(HugePageSize::Size2M, avail);
}

#[test]
#[ignore = "changes the host's hugetlb pool: run by ci/host-tests on a machine it owns"]
fn hugetlb_1g_plug_write_unplug() {
    let _s = serialize();
    let _pool = pool(HugePageSize::Size1G, 1);
    let avail = pool_status(HugePageSize::Size1G).unwrap().available();
    let r = region(
        Backing::HugetlbMemfd(HugePageSize::Size1G),
        2 * GIB,
        GIB,
        false,
    );
    assert_eq!(r.page_size(), GIB);
    plug_write_unplug(&r, GIB, GIB);
    assert_pool_available(HugePageSize::Size1G, avail);
}

#[test]
#[ignore = "changes the host's hugetlb pool: run by ci/host-tests on a machine it owns"]
fn hugetlb_1g_random_cycles() {
    let _s = serialize();
    let _pool = pool(HugePageSize::Size1G, 2);
    let avail = pool_status(HugePageSize::Size1G).unwrap().available();
    let r = region(
        Backing::HugetlbMemfd(HugePageSize::Size1G),
        2 * GIB,
        GIB,
        true,
    );
    // Each plug zeroes a whole 1 GiB page: 1,000 cycles would take minutes, and 20
    // exercise the same paths.
    random_cycles(&r, 0x5eed_0011, 20, 2);
    assert_pool_available(HugePageSize::Size1G, avail);
}

/// A hugetlbfs mount in a temporary directory, unmounted when dropped.
struct HugetlbfsMount(PathBuf);

impl HugetlbfsMount {
    /// Mounts one, or fails the test saying why not.
    fn new() -> Self {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("hugetlbfs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "hugetlbfs", "-o", "pagesize=2M", "none"])
            .arg(&dir)
            .output();
        match out {
            Ok(o) if o.status.success() => Self(dir),
            Ok(o) => {
                let _ = std::fs::remove_dir(&dir);
                panic!(
                    "cannot mount hugetlbfs on {}: {}: run as root on a kernel with \
                     CONFIG_HUGETLBFS",
                    dir.display(),
                    String::from_utf8_lossy(&o.stderr).trim()
                )
            }
            Err(e) => panic!("cannot run mount ({e}): install util-linux's mount"),
        }
    }
}

impl Drop for HugetlbfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
#[ignore = "changes the host's hugetlb pool: run by ci/host-tests on a machine it owns"]
fn hugetlbfs_file_plug_write_unplug_and_cycles() {
    let _s = serialize();
    let _pool = pool(HugePageSize::Size2M, 64);
    let mount = HugetlbfsMount::new();
    let avail = pool_status(HugePageSize::Size2M).unwrap().available();
    {
        let r = region(
            Backing::File(mount.0.join("guest-mem")),
            128 * MIB,
            2 * MIB,
            false,
        );
        assert_eq!(r.backing_kind(), BackingKind::Hugetlb(HugePageSize::Size2M));
        plug_write_unplug(&r, 0, 64 * MIB);
    }
    {
        let r = region(
            Backing::File(mount.0.join("guest-mem-2")),
            64 * MIB,
            2 * MIB,
            true,
        );
        random_cycles(&r, 0x5eed_0012, 1000, 8);
    }
    assert_pool_available(HugePageSize::Size2M, avail);
}

/// Needs no pool (the memfd only gets a size, no pages), so it runs everywhere: on a
/// kernel with 1 GiB hugetlb pages the block size is refused, on one without them the
/// memfd itself is; which one is right is read from sysfs, so either way it checks.
#[test]
fn block_smaller_than_huge_page_is_refused() {
    let size = HugePageSize::Size1G;
    let has_1g = std::path::Path::new(&size.sysfs_dir()).exists();
    let e = MemoryRegion::new(
        RegionConfig::sized(2 * GIB, 2 * MIB)
            .unwrap()
            .with_backing(Backing::HugetlbMemfd(size)),
    );
    match (has_1g, e) {
        (true, Err(MemoryBackendError::InvalidConfig(m))) => {
            assert!(m.contains("page size"), "{m}")
        }
        (false, Err(MemoryBackendError::Os { op, .. })) => {
            assert_eq!(op, "memfd_create(MFD_HUGETLB)")
        }
        (has_1g, other) => panic!(
            "{} {}: expected InvalidConfig with 1 GiB pages, memfd_create failing \
             without them; got {other:?}",
            size.sysfs_dir(),
            if has_1g { "exists" } else { "is missing" }
        ),
    }
}

/// Exhausts a pool of exactly 2 free pages with each populate method: the typed error,
/// no SIGBUS, and the rollback leaves the pool as it was and the range inaccessible.
#[test]
#[ignore = "changes the host's hugetlb pool: run by ci/host-tests on a machine it owns"]
fn exhausted_pool_gives_typed_error() {
    let _s = serialize();
    let size = HugePageSize::Size2M;
    let _pool = PoolGuard::exactly_available(size, 2).unwrap_or_else(|e| {
        panic!(
            "cannot size the {size} pool to exactly 2 free pages ({e}): run as root \
             with {} writable and no other user of the pool",
            size.nr_hugepages_path()
        )
    });
    let r = region(Backing::HugetlbMemfd(size), 16 * MIB, 2 * MIB, true);
    for method in [PopulateMethod::MadvisePopulateWrite, PopulateMethod::Touch] {
        let opts = PopulateOptions {
            method,
            ..PopulateOptions::default()
        };
        let e = r.plug_with(0, 8 * MIB, Some(&opts)).unwrap_err();
        assert!(
            matches!(
                e,
                MemoryBackendError::HugetlbPoolExhausted {
                    page_size: HugePageSize::Size2M,
                    ..
                }
            ),
            "{method:?}: {e:?}"
        );
        assert!(e.is_transient());
        println!("{method:?}: {e}");
        assert_pool_available(size, 2);
        assert_inaccessible(&r, 0, 8 * MIB);
        assert_eq!(r.usage().unwrap().committed(), 0);
        // What fits still plugs.
        r.plug_with(0, 4 * MIB, Some(&opts)).unwrap();
        assert_pool_available(size, 0);
        r.unplug(0, 4 * MIB).unwrap();
        assert_pool_available(size, 2);
    }
}
