//! Shared by the VMM's integration tests and benchmarks: a driver-side split virtqueue
//! written through the devices' guest memory handle, KVM slots without KVM, an interrupt
//! counter.

#![allow(dead_code, reason = "each test or benchmark uses a part")]
#![expect(
    clippy::unwrap_used,
    reason = "test code fails loudly on unexpected errors"
)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use memory_backend::{BlockLayout, MemoryRegion, RegionConfig};
use virtio_mem::wire::{RawRequest, RawResponse, Request, Response};
use virtio_mem::{DeviceConfig, VirtioMem};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vmm::hotplug::{HotplugMemory, Memslots};
use vmm::memory::GuestMemoryHandle;

/// Queue size of the test driver.
pub const QSIZE: u16 = 16;
/// Descriptor flag: the buffer continues in `next`.
pub const F_NEXT: u16 = 1;
/// Descriptor flag: device-writable.
pub const F_WRITE: u16 = 2;

/// KVM slots that only record (no KVM here).
#[derive(Default)]
pub struct Slots(Mutex<BTreeMap<u32, u64>>);

impl Memslots for Slots {
    fn add(&self, slot: u32, gpa: u64, _size: u64, _host: u64) -> Result<(), std::io::Error> {
        self.0.lock().unwrap().insert(slot, gpa);
        Ok(())
    }
    fn remove(&self, slot: u32, _gpa: u64) -> Result<(), std::io::Error> {
        self.0.lock().unwrap().remove(&slot);
        Ok(())
    }
}

#[derive(Default)]
pub struct Irq(pub AtomicU64);

impl virtio_mem::Interrupt for Irq {
    fn signal_used_queue(&self) -> std::io::Result<()> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    fn signal_config_change(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Where a driver put its split virtqueue.
#[derive(Clone, Copy)]
pub struct Rings {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

/// In boot RAM, as Linux lays them out.
pub const BOOT_RINGS: Rings = Rings {
    desc: 0x10_0000,
    avail: 0x10_1000,
    used: 0x10_2000,
};
/// Request and response buffers in boot RAM.
pub const REQ: u64 = 0x20_0000;
pub const RESP: u64 = 0x20_1000;

/// The driver's side of one queue, written through the devices' guest memory handle.
pub struct Driver {
    mem: GuestMemoryHandle,
    pub rings: Rings,
    pub avail_idx: u16,
    used_seen: u16,
    next_desc: u16,
}

impl Driver {
    pub fn new(mem: &GuestMemoryHandle, rings: Rings) -> Self {
        let m = mem.memory();
        m.write_obj(0u16, GuestAddress(rings.avail)).unwrap();
        m.write_obj(0u16, GuestAddress(rings.avail + 2)).unwrap();
        m.write_obj(0u16, GuestAddress(rings.used + 2)).unwrap();
        Driver {
            mem: mem.clone(),
            rings,
            avail_idx: 0,
            used_seen: 0,
            next_desc: 0,
        }
    }

    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(QSIZE).unwrap();
        q.set_size(QSIZE);
        q.try_set_desc_table_address(GuestAddress(self.rings.desc))
            .unwrap();
        q.try_set_avail_ring_address(GuestAddress(self.rings.avail))
            .unwrap();
        q.try_set_used_ring_address(GuestAddress(self.rings.used))
            .unwrap();
        q.set_ready(true);
        q
    }

    /// Writes a chain of `(addr, len, flags)` buffers and makes it available; its head.
    pub fn add_chain(&mut self, bufs: &[(u64, u32, u16)]) -> u16 {
        let m = self.mem.memory();
        let head = self.next_desc;
        let n = u16::try_from(bufs.len()).unwrap();
        for (i, &(addr, len, flags)) in (0u16..).zip(bufs) {
            let idx = (head + i) % QSIZE;
            let last = i + 1 == n;
            let flags = if last { flags } else { flags | F_NEXT };
            let next = if last { 0 } else { (idx + 1) % QSIZE };
            let d = RawDescriptor::from(Descriptor::new(addr, len, flags, next));
            m.write_obj(d, GuestAddress(self.rings.desc + u64::from(idx) * 16))
                .unwrap();
        }
        self.next_desc = (head + n) % QSIZE;
        let slot = u64::from(self.avail_idx % QSIZE);
        m.write_obj(head, GuestAddress(self.rings.avail + 4 + slot * 2))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        m.write_obj(self.avail_idx, GuestAddress(self.rings.avail + 2))
            .unwrap();
        head
    }

    /// A request at `req` with its response buffer at `resp`.
    pub fn submit_at(&mut self, req: Request, req_addr: u64, resp: u64) -> u16 {
        let raw: RawRequest = req.into();
        self.mem
            .memory()
            .write_obj(raw, GuestAddress(req_addr))
            .unwrap();
        self.add_chain(&[(req_addr, 24, 0), (resp, 10, F_WRITE)])
    }

    pub fn submit(&mut self, req: Request) -> u16 {
        self.submit_at(req, REQ, RESP)
    }

    pub fn used(&mut self) -> Vec<(u32, u32)> {
        let m = self.mem.memory();
        let idx: u16 = m.read_obj(GuestAddress(self.rings.used + 2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let base = self.rings.used + 4 + u64::from(self.used_seen % QSIZE) * 8;
            out.push((
                m.read_obj(GuestAddress(base)).unwrap(),
                m.read_obj(GuestAddress(base + 4)).unwrap(),
            ));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    pub fn response(&self, at: u64) -> Response {
        let raw: RawResponse = self.mem.memory().read_obj(GuestAddress(at)).unwrap();
        raw.decode(false).unwrap()
    }
}

/// A region configuration at guest address `base` (anonymous, no populate).
pub fn region_at(base: u64, size: u64, block: u64) -> RegionConfig {
    RegionConfig::new(BlockLayout::new(base, size, block).unwrap())
}

/// The device model over the real `HotplugMemory` of `region` at its layout's address
/// (32 MiB KVM slots, recorded only), features acknowledged, the whole region requested.
pub fn device_over(
    region: &Arc<MemoryRegion>,
    mem: &GuestMemoryHandle,
) -> VirtioMem<HotplugMemory, Arc<Irq>> {
    let hotplug = HotplugMemory::new(
        Arc::clone(region),
        32 << 20,
        1,
        Arc::new(Slots::default()),
        mem.clone(),
    )
    .unwrap();
    let mut dev = VirtioMem::new(
        DeviceConfig::new(region.layout()),
        hotplug,
        Arc::new(Irq::default()),
    )
    .unwrap();
    let features = dev.state().device_features();
    dev.state_mut().ack_features(features).unwrap();
    dev.set_requested_size(region.size()).unwrap();
    dev
}
