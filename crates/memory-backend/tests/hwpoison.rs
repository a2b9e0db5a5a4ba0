//! A hardware-poisoned page inside a range being plugged gives
//! `MemoryBackendError::HardwarePoison`, not a SIGBUS. Poison is injected with
//! `MADV_HWPOISON` (root, `CONFIG_MEMORY_FAILURE`); it permanently retires one 4 KiB
//! page of this machine's memory, which is why this is its own test binary and runs
//! once, and why it is `#[ignore]`d: only `VMM_TESTS_HWPOISON=1 ci/host-tests` runs it.
//! Where the kernel cannot inject poison, running it fails and says why.

#![expect(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]

use memory_backend::{
    MemoryBackendError, MemoryRegion, PopulateMethod, PopulateOptions, RegionConfig,
};

const MIB: u64 = 1 << 20;

#[test]
#[ignore = "retires a page of host memory for good: opt in with VMM_TESTS_HWPOISON=1 ci/host-tests"]
fn poisoned_page_gives_typed_error() {
    // Late kill: a poisoned page we do not access must not kill the test process.
    // SAFETY: prctl with integer arguments only changes this process's MCE policy.
    let r = unsafe {
        libc::prctl(
            libc::PR_MCE_KILL,
            libc::PR_MCE_KILL_SET,
            libc::PR_MCE_KILL_LATE,
            0,
            0,
        )
    };
    assert_eq!(
        r,
        0,
        "prctl(PR_MCE_KILL, LATE) failed ({}): needs a kernel with CONFIG_MEMORY_FAILURE",
        std::io::Error::last_os_error()
    );
    let mut cfg = RegionConfig::sized(4 * MIB, 2 * MIB).unwrap();
    cfg.transparent_hugepages = false;
    let region = MemoryRegion::new(cfg).unwrap();
    let opts = PopulateOptions {
        method: PopulateMethod::MadvisePopulateWrite,
        ..PopulateOptions::default()
    };
    region.plug_with(0, 2 * MIB, Some(&opts)).unwrap();
    let page = region.host_addr().wrapping_add(4096);
    // SAFETY: the page is inside the plugged range of our own region and nothing refers
    // to it; poisoning unmaps it (late kill) and we never touch it from this process.
    let r = unsafe { libc::madvise(page.cast(), 4096, libc::MADV_HWPOISON) };
    assert_eq!(
        r,
        0,
        "madvise(MADV_HWPOISON) failed ({}): run as root (CAP_SYS_ADMIN) on a kernel with \
         CONFIG_MEMORY_FAILURE",
        std::io::Error::last_os_error()
    );
    // Populating over the poisoned page again must report it.
    let e = region.plug_with(0, 2 * MIB, Some(&opts)).unwrap_err();
    assert!(
        matches!(e, MemoryBackendError::HardwarePoison { .. }),
        "{e:?}"
    );
    assert!(e.is_transient());
    // The failed plug unplugged the range; a fresh plug gets a healthy page.
    assert!(region.is_inaccessible(0, 2 * MIB).unwrap());
    region.plug_with(0, 2 * MIB, Some(&opts)).unwrap();
    region.unplug_all().unwrap();
}
