//! Test doubles shared by this crate's tests, the fuzz target and the benchmark: a
//! recording block backend, an interrupt counter, and a driver-side split virtqueue
//! writer over real guest memory.
//!
//! Available with the `test-utils` feature (as `virtio-queue` does with its mock module).

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::backend::{BackendError, BlockBackend, Interrupt};
use crate::device::{DeviceConfig, VirtioMemError};
use crate::queue::{Completion, VirtioMem};
use crate::wire::{RawRequest, RawResponse, Request, Response};

/// One call the device made to its backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendCall {
    /// `plug(addr, len)`.
    Plug {
        /// Guest-physical start.
        addr: u64,
        /// Length in bytes.
        len: u64,
    },
    /// `unplug(addr, len)`.
    Unplug {
        /// Guest-physical start.
        addr: u64,
        /// Length in bytes.
        len: u64,
    },
}

/// A block backend that records every call and fails on demand.
#[derive(Clone, Debug, Default)]
pub struct RecordingBackend {
    /// Every call, in order (failed ones included).
    pub calls: Vec<BackendCall>,
    /// The next this-many `plug` calls fail.
    pub fail_plugs: u32,
    /// The next this-many `unplug` calls fail.
    pub fail_unplugs: u32,
}

impl RecordingBackend {
    /// The ranges of all calls, for bounds checks.
    pub fn ranges(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        self.calls.iter().map(|c| match *c {
            BackendCall::Plug { addr, len } | BackendCall::Unplug { addr, len } => {
                addr..addr.saturating_add(len)
            }
        })
    }

    fn fail(counter: &mut u32, op: &'static str, addr: u64, len: u64) -> Result<(), BackendError> {
        if *counter > 0 {
            *counter -= 1;
            return Err(BackendError {
                op,
                addr,
                len,
                reason: "injected failure".into(),
                transient: true,
            });
        }
        Ok(())
    }
}

impl BlockBackend for RecordingBackend {
    fn plug(&mut self, addr: u64, len: u64) -> Result<(), BackendError> {
        self.calls.push(BackendCall::Plug { addr, len });
        Self::fail(&mut self.fail_plugs, "plug", addr, len)
    }

    fn unplug(&mut self, addr: u64, len: u64) -> Result<(), BackendError> {
        self.calls.push(BackendCall::Unplug { addr, len });
        Self::fail(&mut self.fail_unplugs, "unplug", addr, len)
    }
}

/// An interrupt line that counts what it was asked to signal.
#[derive(Debug, Default)]
pub struct CountingInterrupt {
    used: AtomicU64,
    config: AtomicU64,
}

impl CountingInterrupt {
    /// Used-buffer notifications so far.
    pub fn used_notifications(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Config-change notifications so far.
    pub fn config_changes(&self) -> u64 {
        self.config.load(Ordering::Relaxed)
    }
}

impl Interrupt for CountingInterrupt {
    fn signal_used_queue(&self) -> std::io::Result<()> {
        self.used.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn signal_config_change(&self) -> std::io::Result<()> {
        self.config.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Virtqueue descriptor flag: the buffer continues in `next`.
pub const DESC_F_NEXT: u16 = 1;
/// Virtqueue descriptor flag: the buffer is device-writable.
pub const DESC_F_WRITE: u16 = 2;
/// Virtqueue descriptor flag: the buffer is an indirect table.
pub const DESC_F_INDIRECT: u16 = 4;

/// Size of the test guest's memory.
pub const GUEST_MEM_SIZE: usize = 16 << 20;
const DESC_TABLE: u64 = 0x0;
const AVAIL_RING: u64 = 0x1000;
const USED_RING: u64 = 0x2000;
/// Guest address where request buffers start.
pub const BUFFERS: u64 = 0x10000;
const REQ_BUF: u64 = BUFFERS;
const RESP_BUF: u64 = BUFFERS + 0x100;

/// The driver's side of a split virtqueue in a small guest memory, as the Linux driver
/// lays it out: descriptor table, available ring, used ring, plus request and response
/// buffers.
#[derive(Debug)]
pub struct DriverQueue {
    /// Guest memory holding the rings and buffers.
    pub mem: GuestMemoryMmap,
    size: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl DriverQueue {
    /// A queue of `size` entries (a power of two, at most 128) in fresh guest memory.
    ///
    /// # Panics
    ///
    /// Panics if the guest memory cannot be mapped.
    pub fn new(size: u16) -> Self {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), GUEST_MEM_SIZE)])
            .expect("test guest memory");
        DriverQueue {
            mem,
            size,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    /// Re-initialises the rings, as a driver does after a device reset.
    ///
    /// # Panics
    ///
    /// Panics if guest memory writes fail (they cannot for the fixed layout).
    pub fn reset(&mut self) {
        self.mem
            .write_slice(&[0u8; 0x2000], GuestAddress(AVAIL_RING))
            .expect("ring reset");
        self.avail_idx = 0;
        self.used_seen = 0;
    }

    /// The device-side queue, ready, pointing at this driver's rings.
    ///
    /// # Panics
    ///
    /// Panics if `size` is not a valid queue size.
    pub fn device_queue(&self) -> Queue {
        let mut q = Queue::new(self.size).expect("queue size");
        q.set_size(self.size);
        q.try_set_desc_table_address(GuestAddress(DESC_TABLE))
            .expect("desc table");
        q.try_set_avail_ring_address(GuestAddress(AVAIL_RING))
            .expect("avail ring");
        q.try_set_used_ring_address(GuestAddress(USED_RING))
            .expect("used ring");
        q.set_ready(true);
        q
    }

    /// Writes descriptor `index` as given (no flag fix-ups).
    ///
    /// # Panics
    ///
    /// Panics if the index is outside the table.
    pub fn write_descriptor(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        assert!(index < self.size);
        let desc = RawDescriptor::from(Descriptor::new(addr, len, flags, next));
        self.mem
            .write_obj(desc, GuestAddress(DESC_TABLE + u64::from(index) * 16))
            .expect("descriptor write");
    }

    /// Makes descriptor `head` available to the device.
    ///
    /// # Panics
    ///
    /// Panics if guest memory writes fail (they cannot for the fixed layout).
    pub fn make_available(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        self.mem
            .write_obj(head, GuestAddress(AVAIL_RING + 4 + slot * 2))
            .expect("avail ring write");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL_RING + 2))
            .expect("avail idx write");
    }

    /// Writes a chain of `(addr, len, flags)` buffers at descriptors `0..n` (NEXT flags and
    /// links filled in) and makes it available. Returns the head index.
    pub fn add_chain(&mut self, bufs: &[(u64, u32, u16)]) -> u16 {
        let n = u16::try_from(bufs.len()).expect("chain length");
        for (i, &(addr, len, flags)) in (0u16..).zip(bufs) {
            let last = i + 1 == n;
            let flags = if last {
                flags & !DESC_F_NEXT
            } else {
                flags | DESC_F_NEXT
            };
            self.write_descriptor(i, addr, len, flags, if last { 0 } else { i + 1 });
        }
        self.make_available(0);
        0
    }

    /// Used elements the device added since the last call: `(id, len)`.
    ///
    /// # Panics
    ///
    /// Panics if guest memory reads fail (they cannot for the fixed layout).
    pub fn take_used(&mut self) -> Vec<(u32, u32)> {
        let idx: u16 = self
            .mem
            .read_obj(GuestAddress(USED_RING + 2))
            .expect("used idx read");
        let mut out = Vec::new();
        while self.used_seen != idx {
            let slot = u64::from(self.used_seen % self.size);
            let base = USED_RING + 4 + slot * 8;
            let id: u32 = self.mem.read_obj(GuestAddress(base)).expect("used id");
            let len: u32 = self.mem.read_obj(GuestAddress(base + 4)).expect("used len");
            out.push((id, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    /// Reads the response the device wrote at `addr`.
    ///
    /// # Panics
    ///
    /// Panics if `addr` is outside guest memory.
    pub fn read_response(&self, addr: u64) -> RawResponse {
        self.mem
            .read_obj(GuestAddress(addr))
            .expect("response read")
    }

    /// Writes request bytes at `addr`.
    ///
    /// # Panics
    ///
    /// Panics if `addr` is outside guest memory.
    pub fn write_request(&self, addr: u64, raw: RawRequest) {
        self.mem
            .write_obj(raw, GuestAddress(addr))
            .expect("request write");
    }

    /// Submits a well-formed request (one readable, one writable descriptor).
    pub fn submit(&mut self, req: Request) -> u16 {
        self.write_request(REQ_BUF, req.into());
        // Poison the response buffer, so a test sees whether the device wrote it.
        self.mem
            .write_slice(&[0xee; 10], GuestAddress(RESP_BUF))
            .expect("response poison");
        self.add_chain(&[(REQ_BUF, 24, 0), (RESP_BUF, 10, DESC_F_WRITE)])
    }

    /// The response of the last [`DriverQueue::submit`].
    pub fn last_response(&self) -> RawResponse {
        self.read_response(RESP_BUF)
    }
}

/// A device wired to a [`DriverQueue`]: what a conformance test drives.
#[derive(Debug)]
pub struct TestDevice {
    /// The device under test.
    pub dev: VirtioMem<RecordingBackend, Arc<CountingInterrupt>>,
    /// The driver side.
    pub driver: DriverQueue,
    /// The interrupt counter the device signals.
    pub irq: Arc<CountingInterrupt>,
}

impl TestDevice {
    /// A device for `cfg` with negotiated features (all offered) and an active queue.
    ///
    /// # Errors
    ///
    /// The device's configuration error, if `cfg` is invalid.
    pub fn new(cfg: DeviceConfig) -> Result<Self, VirtioMemError> {
        let irq = Arc::new(CountingInterrupt::default());
        let mut dev = VirtioMem::new(cfg, RecordingBackend::default(), Arc::clone(&irq))?;
        let features = dev.state().device_features();
        dev.state_mut().ack_features(features)?;
        let driver = DriverQueue::new(64);
        dev.activate(driver.device_queue());
        Ok(TestDevice { dev, driver, irq })
    }

    /// Sends one request through the queue and returns the decoded response.
    ///
    /// # Panics
    ///
    /// Panics if the device did not complete the chain with a 10-byte response of a known
    /// type: that is a conformance failure in its own right.
    pub fn request(&mut self, req: Request) -> Response {
        let head = self.driver.submit(req);
        let done = self.dev.process_queue(&self.driver.mem).expect("activated");
        assert_eq!(done.len(), 1, "one chain in, one completion out");
        let used = self.driver.take_used();
        assert_eq!(used, vec![(u32::from(head), 10)], "used ring entry");
        let is_state = matches!(req, Request::State { .. });
        self.driver
            .last_response()
            .decode(is_state)
            .expect("well-formed response")
    }

    /// Processes whatever the driver made available.
    ///
    /// # Panics
    ///
    /// Panics if the device is not activated.
    pub fn process(&mut self) -> Vec<Completion> {
        self.dev.process_queue(&self.driver.mem).expect("activated")
    }
}
