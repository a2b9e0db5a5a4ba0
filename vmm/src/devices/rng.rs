//! A minimal virtio entropy device (virtio 1.2, 5.4): one queue, every device-writable
//! buffer filled from the host's `/dev/urandom`.
//!
//! Besides giving the guest entropy early in boot, it is a second, simple user of the
//! virtio-mmio path (ACPI discovery, feature negotiation, queue setup, ioeventfd
//! notifications, irqfd interrupts) beside virtio-mem, and a second device that writes
//! into guest memory while virtio-mem unplugs it (`vmm/tests/hostile_guest.rs`).

use std::fs::File;
use std::io::Read;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use log::{debug, warn};
use virtio_mmio::{ActivateError, Activation, InterruptKind, VirtioDevice, VirtioInterrupt};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddressSpace};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestMemoryHandle;

/// virtio device id of an entropy source.
pub const VIRTIO_ID_RNG: u32 = 4;
const QUEUE_SIZE: u16 = 256;
/// Upper bound of bytes served per buffer, so one request cannot make the VMM read
/// unbounded entropy.
const MAX_BYTES_PER_BUFFER: u32 = 64 * 1024;

struct Active {
    queue: Queue,
    mem: GuestMemoryHandle,
    interrupt: Arc<dyn VirtioInterrupt>,
}

/// The entropy device.
pub struct VirtioRng {
    active: Option<Active>,
    urandom: File,
    served: u64,
    /// A guest can cause one queue error per notification.
    error_log: virtio_mem::RateLimit,
}

impl std::fmt::Debug for VirtioRng {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioRng")
            .field("active", &self.active.is_some())
            .field("served", &self.served)
            .finish()
    }
}

impl VirtioRng {
    /// A device reading host entropy from `/dev/urandom`.
    ///
    /// # Errors
    ///
    /// `/dev/urandom` cannot be opened.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            active: None,
            urandom: File::open("/dev/urandom")?,
            served: 0,
            error_log: virtio_mem::RateLimit::new(std::time::Duration::from_secs(10), 5),
        })
    }

    /// Bytes of entropy handed to the guest so far.
    pub fn served_bytes(&self) -> u64 {
        self.served
    }

    /// Serves the available buffers (at most one ring's worth: a driver refilling meanwhile
    /// notifies again); interrupts the driver if it wants it.
    pub fn process_queue(&mut self) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        // The view of guest memory lives for this round only, and a round is bounded (one
        // ring's worth of buffers, each capped): an unplug waits for it to end.
        let mem = a.mem.memory();
        let mut buf = Vec::new();
        let mut used_any = false;
        let mut budget = a.queue.size();
        while budget > 0 {
            budget -= 1;
            let Some(chain) = a.queue.pop_descriptor_chain(&*mem) else {
                break;
            };
            let head = chain.head_index();
            let mut len: u32 = 0;
            for desc in chain {
                if !desc.is_write_only() {
                    continue;
                }
                let n = desc.len().min(MAX_BYTES_PER_BUFFER.saturating_sub(len));
                let Ok(n_usize) = usize::try_from(n) else {
                    break;
                };
                buf.resize(n_usize, 0);
                if self.urandom.read_exact(&mut buf).is_err()
                    || mem.write_slice(&buf, desc.addr()).is_err()
                {
                    debug!("virtio-rng: cannot fill buffer at {:#x}", desc.addr().0);
                    break;
                }
                len = len.saturating_add(n);
            }
            if let Err(e) = a.queue.add_used(&*mem, head, len) {
                if let Some(dropped) = self.error_log.allow() {
                    warn!(
                        "virtio-rng: cannot return buffer {head}: {e} \
                         ({dropped} similar messages suppressed)"
                    );
                }
                break;
            }
            self.served = self.served.saturating_add(u64::from(len));
            used_any = true;
        }
        if used_any {
            match a.queue.needs_notification(&*mem) {
                Ok(false) => {}
                _ => {
                    if let Err(e) = a.interrupt.trigger(InterruptKind::UsedBuffer) {
                        warn!("virtio-rng: {e}");
                    }
                }
            }
        }
    }
}

impl VirtioDevice<GuestMemoryHandle> for VirtioRng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        0
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // No configuration space.
        data.fill(0);
    }

    fn activate(&mut self, a: Activation<GuestMemoryHandle>) -> Result<(), ActivateError> {
        let q = a
            .queues
            .into_iter()
            .find(|q| q.index == 0)
            .ok_or(ActivateError::MissingQueue { index: 0 })?;
        self.active = Some(Active {
            queue: q.queue,
            mem: a.mem,
            interrupt: a.interrupt,
        });
        // Buffers may already be waiting.
        self.process_queue();
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
    }
}

/// Event-loop side of the device: serves the queue when the driver notifies it.
pub struct RngHandler {
    dev: Arc<Mutex<VirtioRng>>,
    notify: EventFd,
}

impl std::fmt::Debug for RngHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RngHandler").finish_non_exhaustive()
    }
}

impl RngHandler {
    /// Serves `dev` when `notify` (the transport's queue 0 eventfd, or a clone of it) fires.
    pub fn new(dev: Arc<Mutex<VirtioRng>>, notify: EventFd) -> Self {
        Self { dev, notify }
    }
}

impl MutEventSubscriber for RngHandler {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.notify.read();
        self.dev
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .process_queue();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.notify, EventSet::IN)) {
            warn!("virtio-rng: cannot watch the queue notification: {e:?}");
        }
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_mmio::MmioInterrupt;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, GuestAddress, GuestMemoryMmap};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn fills_writable_buffers_and_interrupts() {
        let gm = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let mock = MockSplitQueue::new(&gm, 16);
        let desc = RawDescriptor::from(SplitDescriptor::new(
            0x8000,
            32,
            u16::try_from(VRING_DESC_F_WRITE).unwrap(),
            0,
        ));
        mock.build_desc_chain(&[desc]).unwrap();
        let queue: Queue = mock.create_queue().unwrap();
        let irq = Arc::new(MmioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        let mut rng = VirtioRng::new().unwrap();
        rng.activate(Activation {
            mem: GuestMemoryHandle::new(gm.clone()),
            queues: vec![virtio_mmio::ActiveQueue {
                index: 0,
                queue,
                notify: EventFd::new(EFD_NONBLOCK).unwrap(),
            }],
            interrupt: irq.clone(),
            features: 0,
        })
        .unwrap();
        assert_eq!(rng.served_bytes(), 32);
        assert_eq!(irq.irqfd().read().unwrap(), 1);
        let used_len: u32 = gm
            .read_obj(mock.used_addr().checked_add(4 + 4).unwrap())
            .unwrap();
        assert_eq!(used_len, 32);
    }

    #[test]
    fn activation_without_queue_fails() {
        let gm = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let mut rng = VirtioRng::new().unwrap();
        let e = rng
            .activate(Activation {
                mem: GuestMemoryHandle::new(gm),
                queues: vec![],
                interrupt: Arc::new(MmioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap())),
                features: 0,
            })
            .unwrap_err();
        assert!(matches!(e, ActivateError::MissingQueue { index: 0 }));
    }
}
