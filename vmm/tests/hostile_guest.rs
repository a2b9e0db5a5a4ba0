//! A hostile guest against the real request path: the virtio-mem device model over the
//! VMM's [`HotplugMemory`] and a real `memory-backend` region (unplugged blocks are
//! `PROT_NONE` in this process), with the rings and buffers wherever the guest puts them.
//!
//! Each test ends with this process alive (a write through a stale view of guest memory
//! is a SIGSEGV that kills the whole test binary), the request answered as the device's
//! rules say, and no host memory committed outside plugged blocks.

#![expect(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use memory_backend::MemoryRegion;
use virtio_mem::wire::{RawResponse, Request, Response};
use virtio_mem::VirtioMem;
use virtio_mmio::{Activation, ActiveQueue, MmioInterrupt, VirtioDevice};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryMmap};
use vmm::devices::rng::VirtioRng;
use vmm::hotplug::HotplugMemory;
use vmm::memory::GuestMemoryHandle;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

mod support;

use support::{device_over, region_at, Driver, Irq, Rings, Slots, BOOT_RINGS, F_WRITE, REQ, RESP};

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 2 * MIB;
const BOOT_RAM: usize = 16 << 20;
const BASE: u64 = 4 << 30;
const REGION: u64 = 64 * MIB;

type Dev = VirtioMem<HotplugMemory, Arc<Irq>>;

struct Vm {
    dev: Dev,
    mem: GuestMemoryHandle,
    region: Arc<MemoryRegion>,
}

impl Vm {
    fn new() -> Self {
        let boot = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), BOOT_RAM)]).unwrap();
        let mem = GuestMemoryHandle::new(boot);
        let region = Arc::new(MemoryRegion::new(region_at(BASE, REGION, BLOCK)).unwrap());
        let dev = device_over(&region, &mem);
        Vm { dev, mem, region }
    }

    fn activate(&mut self, driver: &Driver) {
        self.dev.reset();
        let features = self.dev.state().device_features();
        self.dev.state_mut().ack_features(features).unwrap();
        self.dev.activate(driver.queue());
    }

    fn process(&mut self) -> Vec<virtio_mem::queue::Completion> {
        self.dev.process_queue(self.mem.clone()).unwrap()
    }

    /// Plugs `blocks` blocks at the region's start through a queue in boot RAM.
    fn plug_first(&mut self, driver: &mut Driver, blocks: u16) {
        driver.submit(Request::Plug {
            addr: BASE,
            nb_blocks: blocks,
        });
        self.process();
        assert_eq!(driver.response(RESP), Response::Ack(None));
        assert_eq!(self.dev.state().plugged_size(), u64::from(blocks) * BLOCK);
    }

    /// Host memory committed in the region: never more than what is plugged.
    fn assert_no_host_memory_outside_plugged(&self) {
        let committed = self.region.usage().unwrap().committed();
        let plugged = self.dev.state().plugged_size();
        assert!(
            committed <= plugged,
            "{committed:#x} bytes committed with {plugged:#x} plugged"
        );
    }
}

#[test]
fn response_buffer_inside_the_block_being_unplugged() {
    let mut vm = Vm::new();
    let mut driver = Driver::new(&vm.mem, BOOT_RINGS);
    vm.activate(&driver);
    vm.plug_first(&mut driver, 1);
    driver.used();
    // The response of the UNPLUG lies in the block it unplugs.
    let head = driver.submit_at(
        Request::Unplug {
            addr: BASE,
            nb_blocks: 1,
        },
        REQ,
        BASE + 0x100,
    );
    let done = vm.process();
    assert_eq!(done.len(), 1);
    assert_eq!(
        driver.used(),
        vec![(u32::from(head), 0)],
        "the response cannot be written once the block is gone: used length 0"
    );
    assert_eq!(
        vm.dev.state().plugged_size(),
        0,
        "the unplug itself happened"
    );
    assert!(vm.mem.memory().read_obj::<u8>(GuestAddress(BASE)).is_err());
    vm.assert_no_host_memory_outside_plugged();
}

#[test]
fn rings_in_plugged_memory_then_unplug_all() {
    let mut vm = Vm::new();
    let mut boot_driver = Driver::new(&vm.mem, BOOT_RINGS);
    vm.activate(&boot_driver);
    vm.plug_first(&mut boot_driver, 2);
    // The driver re-initialises the device with its descriptor table and used ring in
    // plugged memory (the available ring stays in boot RAM).
    let rings = Rings {
        desc: BASE,
        avail: BOOT_RINGS.avail + 0x800,
        used: BASE + BLOCK + 0x1000,
    };
    let mut driver = Driver::new(&vm.mem, rings);
    vm.activate(&driver);
    driver.submit(Request::State {
        addr: BASE,
        nb_blocks: 2,
    });
    assert_eq!(vm.process().len(), 1, "the queue works from plugged memory");
    assert_eq!(driver.used().len(), 1);
    vm.dev.set_requested_size(0).unwrap();
    driver.submit(Request::UnplugAll);
    // The used ring vanished with the unplug: the element cannot be added, the round ends.
    let errors_before = vm.dev.state().metrics().queue_errors;
    vm.process();
    assert_eq!(vm.dev.state().plugged_size(), 0);
    assert_eq!(driver.response(RESP), Response::Ack(None));
    assert_eq!(vm.dev.state().metrics().queue_errors, errors_before + 1);
    // The guest notifies again: the rings are gone, nothing to do, nothing crashes.
    driver.avail_idx = driver.avail_idx.wrapping_add(1);
    vm.mem
        .memory()
        .write_obj(driver.avail_idx, GuestAddress(rings.avail + 2))
        .unwrap();
    vm.process();
    assert_eq!(vm.dev.state().plugged_size(), 0);
    vm.assert_no_host_memory_outside_plugged();
}

#[test]
fn an_early_unplug_removes_the_memory_of_a_later_chain() {
    let mut vm = Vm::new();
    let mut driver = Driver::new(&vm.mem, BOOT_RINGS);
    vm.activate(&driver);
    vm.plug_first(&mut driver, 2);
    driver.used();
    // Chain 1 unplugs block 0; chain 2's request bytes lie in block 0; chain 3's
    // response buffer lies in block 0; chain 4 is an ordinary request after them.
    let h1 = driver.submit(Request::Unplug {
        addr: BASE,
        nb_blocks: 1,
    });
    let h2 = driver.submit_at(
        Request::Unplug {
            addr: BASE + BLOCK,
            nb_blocks: 1,
        },
        BASE + 0x40,
        RESP + 0x100,
    );
    let h3 = driver.submit_at(
        Request::State {
            addr: BASE,
            nb_blocks: 2,
        },
        REQ + 0x100,
        BASE + 0x200,
    );
    let h4 = driver.submit_at(
        Request::State {
            addr: BASE,
            nb_blocks: 2,
        },
        REQ + 0x200,
        RESP + 0x200,
    );
    let done = vm.process();
    assert_eq!(done.len(), 4);
    assert_eq!(
        driver.used(),
        vec![
            (u32::from(h1), 10),
            (u32::from(h2), 10),
            (u32::from(h3), 0),
            (u32::from(h4), 10)
        ]
    );
    assert_eq!(driver.response(RESP), Response::Ack(None));
    assert_eq!(
        driver.response(RESP + 0x100),
        Response::Error,
        "a request read from unplugged memory is malformed"
    );
    let state: RawResponse = vm
        .mem
        .memory()
        .read_obj(GuestAddress(RESP + 0x200))
        .unwrap();
    assert_eq!(
        state.decode(true),
        Some(Response::Ack(Some(virtio_mem::wire::BlockState::Mixed)))
    );
    assert_eq!(
        vm.dev.state().plugged_size(),
        BLOCK,
        "block 1 stays plugged"
    );
    vm.assert_no_host_memory_outside_plugged();
}

/// The entropy device fills buffers in plugged memory on its own thread while
/// virtio-mem unplugs and replugs that memory under it.
#[test]
fn entropy_device_writes_while_virtio_mem_unplugs() {
    let mut vm = Vm::new();
    let mut mem_driver = Driver::new(&vm.mem, BOOT_RINGS);
    vm.activate(&mem_driver);
    vm.plug_first(&mut mem_driver, 1);
    mem_driver.used();

    let rng_rings = Rings {
        desc: 0x30_0000,
        avail: 0x30_1000,
        used: 0x30_2000,
    };
    let mut rng_driver = Driver::new(&vm.mem, rng_rings);
    let mut rng = VirtioRng::new().unwrap();
    rng.activate(Activation {
        mem: vm.mem.clone(),
        queues: vec![ActiveQueue {
            index: 0,
            queue: rng_driver.queue(),
            notify: EventFd::new(EFD_NONBLOCK).unwrap(),
        }],
        interrupt: Arc::new(MmioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap())),
        features: 0,
    })
    .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let filler = {
        let stop = Arc::clone(&stop);
        let rounds = Arc::clone(&rounds);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                // Eight 64 KiB buffers spread over the block, then serve them.
                for i in 0..8 {
                    rng_driver.add_chain(&[(BASE + i * 0x4_0000, 0x1_0000, F_WRITE)]);
                }
                rng.process_queue();
                rng_driver.used();
                rounds.fetch_add(1, Ordering::Relaxed);
            }
            rng.served_bytes()
        })
    };
    // At least 200 unplug/plug cycles and 100 rounds of the entropy device beside them.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut cycles = 0;
    while (cycles < 200 || rounds.load(Ordering::Relaxed) < 100)
        && std::time::Instant::now() < deadline
    {
        cycles += 1;
        vm.dev.set_requested_size(0).unwrap();
        mem_driver.submit(Request::Unplug {
            addr: BASE,
            nb_blocks: 1,
        });
        vm.process();
        assert_eq!(mem_driver.response(RESP), Response::Ack(None));
        vm.dev.set_requested_size(BLOCK).unwrap();
        mem_driver.submit(Request::Plug {
            addr: BASE,
            nb_blocks: 1,
        });
        vm.process();
        assert_eq!(mem_driver.response(RESP), Response::Ack(None));
        mem_driver.used();
    }
    // The block is plugged now: two more whole rounds must fill buffers there, whatever the
    // thread's timing beside the cycles was (a run of this 2-core machine once had every
    // round meet the block unplugged).
    let plugged_from = rounds.load(Ordering::Relaxed);
    while rounds.load(Ordering::Relaxed) < plugged_from + 2
        && std::time::Instant::now() < deadline + std::time::Duration::from_secs(10)
    {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    stop.store(true, Ordering::Relaxed);
    let served = filler.join().unwrap();
    let rounds = rounds.load(Ordering::Relaxed);
    assert!(
        rounds >= 100 && served > 0,
        "the entropy device ran alongside the unplugs: {rounds} rounds, {served} bytes"
    );
    vm.assert_no_host_memory_outside_plugged();
}

fn process_mappings() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .count()
}

/// A guest plugging every other block of a 64 GiB region: each run of plugged memory is
/// a protection change, so a mapping of the process; past the bound the host answers
/// BUSY, the process's mappings stay bounded and everything else keeps working.
#[test]
fn alternating_plugs_cannot_exhaust_the_hosts_memory_mappings() {
    use virtio_mem::BlockBackend;
    let mem = GuestMemoryHandle::new(
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), BOOT_RAM)]).unwrap(),
    );
    let region = Arc::new(MemoryRegion::new(region_at(BASE, 64 << 30, BLOCK)).unwrap());
    let mut h = HotplugMemory::new(
        Arc::clone(&region),
        128 * MIB,
        1,
        Arc::new(Slots::default()),
        mem.clone(),
    )
    .unwrap();
    let limit = 2048;
    h.set_max_runs(limit);
    let before = process_mappings();
    let mut refused = 0;
    for i in 0..4 * limit as u64 {
        match h.plug(BASE + 2 * i * BLOCK, BLOCK) {
            Ok(()) => {}
            Err(e) => {
                assert!(e.transient && e.to_string().contains("fragmented"), "{e}");
                refused += 1;
            }
        }
    }
    assert_eq!(h.runs(), limit);
    assert_eq!(refused, 3 * limit);
    let grown = process_mappings().saturating_sub(before);
    assert!(
        grown <= 2 * limit + 64,
        "{grown} new mappings for {limit} runs"
    );
    // Plugs that join runs, and unplugs that do not split one, still work at the bound.
    h.plug(BASE + BLOCK, BLOCK).unwrap();
    assert_eq!(h.runs(), limit - 1);
    h.unplug(BASE, 3 * BLOCK).unwrap();
    h.unplug(BASE + 4 * BLOCK, BLOCK).unwrap();
    // An unplug that would split a run at the bound is refused.
    h.plug(BASE, 3 * BLOCK).unwrap();
    h.plug(BASE + 3 * BLOCK, BLOCK).unwrap();
    h.set_max_runs(h.runs());
    assert!(h.unplug(BASE + BLOCK, BLOCK).is_err());
    // The rest of the process still maps memory, and devices see the plugged runs.
    let extra: GuestMemoryMmap =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    drop(extra);
    mem.memory()
        .write_obj(1u8, GuestAddress(BASE + 2 * BLOCK))
        .unwrap();
}
