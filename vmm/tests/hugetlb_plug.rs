//! A guest plugging more hugetlb memory than the host pool holds: with the VMM's default
//! `--populate auto`, the device over the real `HotplugMemory` answers BUSY for what the
//! pool cannot back (never ACK), shows why as `host_error`, and everything it did
//! acknowledge can be written by the guest without a fault. The tests resize the host's
//! hugetlb pool, so they are `#[ignore]`d and run by `ci/host-tests` (hugetlb group) on a
//! machine it owns; there, a pool they cannot set fails them.

#![expect(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]

mod support;

use std::sync::{Arc, Mutex, PoisonError};

use memory_backend::hugetlb::PoolGuard;
use memory_backend::{HugePageSize, MemoryRegion, PopulateOptions};
use virtio_mem::wire::{Request, Response};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryMmap};
use vmm::hotplug::{BackingArg, Populate};
use vmm::memory::GuestMemoryHandle;

use support::{device_over, region_at, Driver, BOOT_RINGS, RESP};

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 2 * MIB;
const BASE: u64 = 4 << 30;
const REGION: u64 = 64 * MIB;

/// The pool is host-wide: one test at a time.
static POOL: Mutex<()> = Mutex::new(());

/// Plugs block after block up to the whole region with a pool of exactly `pages` free
/// 2 MiB pages; returns the answers.
fn plug_all_with_pool(pages: u64) -> Vec<Response> {
    let _one = POOL.lock().unwrap_or_else(PoisonError::into_inner);
    let _pool = PoolGuard::exactly_available(HugePageSize::Size2M, pages).unwrap_or_else(|e| {
        panic!("cannot set the 2 MiB hugetlb pool to {pages} free pages ({e}): run as root")
    });
    let backing = BackingArg::Hugetlb2M;
    assert!(
        Populate::Auto.resolve(&backing),
        "the default populates hugetlb"
    );
    let mem = GuestMemoryHandle::new(
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap(),
    );
    let region = Arc::new(
        MemoryRegion::new(
            region_at(BASE, REGION, BLOCK)
                .with_backing(backing.backing())
                .with_populate(PopulateOptions::default()),
        )
        .unwrap(),
    );
    let mut dev = device_over(&region, &mem);
    let mut driver = Driver::new(&mem, BOOT_RINGS);
    dev.activate(driver.queue());
    let mut answers = Vec::new();
    for i in 0..REGION / BLOCK {
        driver.submit(Request::Plug {
            addr: BASE + i * BLOCK,
            nb_blocks: 1,
        });
        dev.process_queue(mem.clone()).unwrap();
        driver.used();
        answers.push(driver.response(RESP));
    }
    let acked = answers
        .iter()
        .filter(|a| **a == Response::Ack(None))
        .count() as u64;
    assert_eq!(dev.state().plugged_size(), acked * BLOCK);
    if acked < REGION / BLOCK {
        let why = dev.state().host_error().unwrap_or_default().to_string();
        assert!(why.contains("hugetlb"), "host_error says why: {why:?}");
    }
    // The guest writes to everything it was given: no fault, no SIGBUS.
    let m = mem.memory();
    for i in 0..acked {
        let page = vec![0xa5u8; 2 << 20];
        m.write_slice(&page, GuestAddress(BASE + i * BLOCK))
            .unwrap();
    }
    answers
}

#[test]
#[ignore = "changes the host's hugetlb pool: run by ci/host-tests on a machine it owns"]
fn an_empty_pool_answers_busy_and_never_acks() {
    let answers = plug_all_with_pool(0);
    assert!(answers.iter().all(|a| *a == Response::Busy), "{answers:?}");
}

#[test]
#[ignore = "changes the host's hugetlb pool: run by ci/host-tests on a machine it owns"]
fn a_small_pool_acks_what_it_holds_and_busy_beyond() {
    let answers = plug_all_with_pool(8);
    let acked = answers
        .iter()
        .filter(|a| **a == Response::Ack(None))
        .count();
    assert_eq!(acked, 8, "{answers:?}");
    assert!(
        answers[8..].iter().all(|a| *a == Response::Busy),
        "{answers:?}"
    );
}
