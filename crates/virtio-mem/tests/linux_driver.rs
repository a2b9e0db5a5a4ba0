//! Replays how the Linux driver (`drivers/virtio/virtio_mem.c`, sub-block mode) talks to
//! the device, and checks that it always converges on `plugged_size == requested_size`.

#![expect(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]

use virtio_mem::test_utils::TestDevice;
use virtio_mem::wire::ConfigSpace;
use virtio_mem::{DeviceConfig, Request, Response};
use vm_memory::ByteValued;

const MIB: u64 = 1 << 20;
const ADDR: u64 = 4 << 30;
const REGION: u64 = 4 << 30;
const BS: u64 = 2 * MIB;
/// Linux's memory block size on x86-64 guests under 64 GiB.
const MEMORY_BLOCK: u64 = 128 * MIB;

/// What the driver model saw, for assertions.
#[derive(Debug, Default)]
struct Trace {
    requests: u64,
    nacks: u64,
    busy_retries: u64,
    unplug_all_at_probe: bool,
}

struct LinuxDriver {
    t: TestDevice,
    trace: Trace,
}

impl LinuxDriver {
    /// Reads the config as Linux does: field by field, re-reading while the generation
    /// changes (here the generation cannot change under us, but read it anyway).
    fn config(&self) -> ConfigSpace {
        let mut c = ConfigSpace::default();
        loop {
            let g = self.t.dev.state().config_generation();
            self.t.dev.read_config(0, c.as_mut_slice());
            if g == self.t.dev.state().config_generation() {
                return c;
            }
        }
    }

    fn send(&mut self, req: Request) -> Response {
        self.trace.requests += 1;
        let resp = self.t.request(req);
        assert_ne!(
            resp,
            Response::Error,
            "driver would mark the device broken on {req:?}"
        );
        resp
    }

    /// virtio_mem_probe: if anything is plugged (e.g. after kexec), unplug all first.
    fn probe(&mut self) {
        if self.config().plugged_size.to_native() != 0 {
            self.trace.unplug_all_at_probe = true;
            while self.send(Request::UnplugAll) == Response::Busy {
                self.trace.busy_retries += 1;
            }
            assert_eq!(self.config().plugged_size.to_native(), 0);
        }
    }

    fn plugged(&mut self, addr: u64) -> bool {
        matches!(
            self.t.request(Request::State { addr, nb_blocks: 1 }),
            Response::Ack(Some(virtio_mem::BlockState::Plugged))
        )
    }

    /// One pass of virtio_mem_run_wq: plug or unplug towards requested_size.
    /// Returns false once there is nothing left to do.
    fn step(&mut self) -> bool {
        let c = self.config();
        let (plugged, requested, usable) = (
            c.plugged_size.to_native(),
            c.requested_size.to_native(),
            c.usable_region_size.to_native(),
        );
        if plugged < requested {
            // Plug up to a memory block's worth at the lowest unplugged address, one memory
            // block at a time, never across a memory block boundary.
            let want = (requested - plugged).min(MEMORY_BLOCK);
            let mut addr = ADDR;
            while addr < ADDR + usable && self.plugged(addr) {
                addr += BS;
            }
            assert!(
                addr < ADDR + usable,
                "no room to plug although requested > plugged"
            );
            let mb_end = (addr - ADDR) / MEMORY_BLOCK * MEMORY_BLOCK + MEMORY_BLOCK + ADDR;
            let mut nb = 0u64;
            while nb * BS < want
                && addr + nb * BS < mb_end.min(ADDR + usable)
                && !self.plugged(addr + nb * BS)
            {
                nb += 1;
            }
            let nb_blocks = u16::try_from(nb).unwrap();
            match self.send(Request::Plug { addr, nb_blocks }) {
                Response::Ack(_) => {}
                // Retried at once, after re-reading the config.
                Response::Nack => self.trace.nacks += 1,
                Response::Busy => self.trace.busy_retries += 1,
                Response::Error => unreachable!(),
            }
            true
        } else if plugged > requested {
            // Unplug from the highest plugged block downwards, within one memory block.
            let want = plugged - requested;
            let mut top = ADDR + usable;
            while top > ADDR && !self.plugged(top - BS) {
                top -= BS;
            }
            let mb_start = (top - BS - ADDR) / MEMORY_BLOCK * MEMORY_BLOCK + ADDR;
            let mut nb = 0u64;
            while nb * BS < want
                && top - (nb + 1) * BS >= mb_start
                && self.plugged(top - (nb + 1) * BS)
            {
                nb += 1;
            }
            let addr = top - nb * BS;
            match self.send(Request::Unplug {
                addr,
                nb_blocks: u16::try_from(nb).unwrap(),
            }) {
                Response::Ack(_) => {}
                Response::Busy => self.trace.busy_retries += 1,
                other => panic!("unexpected {other:?} to unplug"),
            }
            true
        } else {
            false
        }
    }

    fn run(&mut self) {
        let mut steps = 0;
        while self.step() {
            steps += 1;
            assert!(steps < 10_000, "driver does not converge");
        }
        let c = self.config();
        assert_eq!(c.plugged_size.to_native(), c.requested_size.to_native());
    }
}

fn driver() -> LinuxDriver {
    let t = TestDevice::new(DeviceConfig::with_layout(ADDR, REGION, BS).unwrap()).unwrap();
    LinuxDriver {
        t,
        trace: Trace::default(),
    }
}

#[test]
fn linux_sub_block_mode_converges_through_resizes() {
    let mut d = driver();
    d.probe();
    assert!(!d.trace.unplug_all_at_probe);
    for size in [1 << 30, 300 * MIB, 3 << 30, 0, 2 << 30] {
        d.t.dev.set_requested_size(size).unwrap();
        d.run();
        assert_eq!(d.t.dev.state().plugged_size(), size);
    }
    // Plugging went lowest-first: with 2 GiB plugged, exactly the first 2 GiB are.
    assert_eq!(d.t.dev.state().bitmap().plugged_runs(), vec![0..1024]);
}

#[test]
fn linux_unplugs_all_at_probe_when_something_is_plugged() {
    let mut d = driver();
    d.t.dev.set_requested_size(512 * MIB).unwrap();
    d.run();
    // A new driver instance (kexec, module reload): device reset keeps the blocks.
    d.t.dev.reset();
    let features = d.t.dev.state().device_features();
    d.t.dev.state_mut().ack_features(features).unwrap();
    d.t.driver.reset();
    let q = d.t.driver.device_queue();
    d.t.dev.activate(q);
    d.probe();
    assert!(d.trace.unplug_all_at_probe);
    assert_eq!(d.t.dev.state().plugged_size(), 0);
    d.run();
    assert_eq!(d.t.dev.state().plugged_size(), 512 * MIB);
}

#[test]
fn linux_handles_nack_after_a_lowered_request() {
    let mut d = driver();
    d.t.dev.set_requested_size(1 << 30).unwrap();
    // The driver plugs two memory blocks, then the host lowers the request mid-way.
    assert!(d.step());
    assert!(d.step());
    d.t.dev.set_requested_size(192 * MIB).unwrap();
    // The driver's view is stale: it asks for another memory block and gets NACK.
    let plugged = d.t.dev.state().plugged_size();
    assert_eq!(
        d.send(Request::Plug {
            addr: ADDR + plugged,
            nb_blocks: 64
        }),
        Response::Nack
    );
    d.run();
    assert_eq!(d.t.dev.state().plugged_size(), 192 * MIB);
}

#[test]
fn linux_retries_after_busy() {
    let mut d = driver();
    d.t.dev.set_requested_size(256 * MIB).unwrap();
    d.t.dev.state_mut().backend_mut().fail_plugs = 3;
    d.run();
    assert_eq!(d.trace.busy_retries, 3);
    assert_eq!(d.t.dev.state().plugged_size(), 256 * MIB);
    d.t.dev.set_requested_size(0).unwrap();
    d.t.dev.state_mut().backend_mut().fail_unplugs = 2;
    d.run();
    assert_eq!(d.t.dev.state().plugged_size(), 0);
}
