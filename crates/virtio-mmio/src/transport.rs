//! The virtio-mmio version 2 transport: the register state machine between a guest driver
//! and a [`VirtioDevice`].
//!
//! The VMM routes every guest access inside the device's MMIO window to
//! [`MmioTransport::read`] / [`MmioTransport::write`] with the offset inside the window. The
//! transport never panics on guest input: unknown offsets, wrong access widths, writes in
//! the wrong device state and out-of-range selectors are ignored (reads return zero) and
//! counted in [`MmioTransport::bad_accesses`].

use std::sync::{Arc, Mutex, MutexGuard};

use log::{debug, warn};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::{Activation, ActiveQueue, VirtioDevice};
use crate::interrupt::{MmioInterrupt, VirtioInterrupt};
use crate::regs::*;

/// Largest queue size virtio allows for split queues (virtio 1.2, 2.7).
const MAX_QUEUE_SIZE: u16 = 32768;

/// Errors when creating a transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// The device reported a queue maximum size that is not a power of two in 1..=32768.
    #[error("queue {index} has invalid maximum size {size}: must be a power of two in 1..=32768")]
    InvalidQueueMaxSize {
        /// Queue index.
        index: usize,
        /// The reported size.
        size: u16,
    },
    /// The device reported device type 0, which drivers ignore.
    #[error("device type 0 is reserved: drivers ignore such a device")]
    InvalidDeviceType,
    /// The device has more queues than a 16-bit queue index can address.
    #[error("device has {0} queues, more than a 16-bit queue index can address")]
    TooManyQueues(usize),
    /// An eventfd (irqfd or queue notification) could not be created.
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
}

/// Queue registers as the driver wrote them; turned into a [`Queue`] on activation.
#[derive(Debug, Clone, Copy)]
struct QueueRegs {
    max_size: u16,
    size: u16,
    ready: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

impl QueueRegs {
    fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            ready: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }
}

fn set_low(value: &mut u64, low: u32) {
    *value = (*value & 0xffff_ffff_0000_0000) | u64::from(low);
}

fn set_high(value: &mut u64, high: u32) {
    *value = (*value & 0xffff_ffff) | (u64::from(high) << 32);
}

/// Splits `v` into its low or high 32-bit half.
fn half(v: u64, high: bool) -> u32 {
    let bytes = v.to_le_bytes();
    let (lo, hi) = bytes.split_at(4);
    let src = if high { hi } else { lo };
    let mut out = [0u8; 4];
    out.copy_from_slice(src);
    u32::from_le_bytes(out)
}

/// The virtio-mmio transport of one device.
pub struct MmioTransport<M: GuestAddressSpace> {
    device: Arc<Mutex<dyn VirtioDevice<M>>>,
    mem: M,
    device_type: u32,
    device_features: u64,
    device_features_sel: u32,
    driver_features: u64,
    driver_features_sel: u32,
    driver_features_invalid: bool,
    queue_sel: u32,
    queues: Vec<QueueRegs>,
    queue_evts: Vec<EventFd>,
    status: u32,
    interrupt: Arc<MmioInterrupt>,
    activated: bool,
    bad_accesses: u64,
}

impl<M: GuestAddressSpace> std::fmt::Debug for MmioTransport<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device_type)
            .field("status", &self.status)
            .field("activated", &self.activated)
            .finish_non_exhaustive()
    }
}

impl<M: GuestAddressSpace + Send + 'static> MmioTransport<M> {
    /// Creates the transport for `device`, whose queues live in `mem`.
    ///
    /// The transport creates the irqfd and one notification eventfd per queue; the VMM
    /// registers them with KVM ([`Self::irqfd`], [`Self::queue_notify_eventfds`]).
    ///
    /// # Errors
    ///
    /// [`MmioError`] when the device reports invalid queue sizes or type, or eventfds cannot
    /// be created.
    pub fn new(device: Arc<Mutex<dyn VirtioDevice<M>>>, mem: M) -> Result<Self, MmioError> {
        let interrupt = Arc::new(MmioInterrupt::new(
            EventFd::new(EFD_NONBLOCK).map_err(MmioError::EventFd)?,
        ));
        let (device_type, device_features, queues) = {
            let mut dev = lock(&device);
            let sizes = dev.queue_max_sizes().to_vec();
            if sizes.len() > usize::from(u16::MAX) {
                return Err(MmioError::TooManyQueues(sizes.len()));
            }
            let mut queues = Vec::with_capacity(sizes.len());
            for (index, &size) in sizes.iter().enumerate() {
                if size == 0 || size > MAX_QUEUE_SIZE || !size.is_power_of_two() {
                    return Err(MmioError::InvalidQueueMaxSize { index, size });
                }
                queues.push(QueueRegs::new(size));
            }
            let device_type = dev.device_type();
            if device_type == 0 {
                return Err(MmioError::InvalidDeviceType);
            }
            dev.set_interrupt(interrupt.clone() as Arc<dyn VirtioInterrupt>);
            (
                device_type,
                dev.device_features() | (1u64 << VIRTIO_F_VERSION_1),
                queues,
            )
        };
        let queue_evts = queues
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(MmioError::EventFd)?;
        Ok(Self {
            device,
            mem,
            device_type,
            device_features,
            device_features_sel: 0,
            driver_features: 0,
            driver_features_sel: 0,
            driver_features_invalid: false,
            queue_sel: 0,
            queues,
            queue_evts,
            status: 0,
            interrupt,
            activated: false,
            bad_accesses: 0,
        })
    }

    /// The irqfd to register with KVM for this device's interrupt line.
    pub fn irqfd(&self) -> &EventFd {
        self.interrupt.irqfd()
    }

    /// The interrupt shared with the device.
    pub fn interrupt(&self) -> Arc<MmioInterrupt> {
        self.interrupt.clone()
    }

    /// One eventfd per queue, in queue order. Register each with KVM as an ioeventfd at
    /// window base + [`QUEUE_NOTIFY`], 4 bytes, with the queue index as datamatch.
    pub fn queue_notify_eventfds(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The device this transport drives.
    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice<M>>> {
        &self.device
    }

    /// The current device status register value.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Whether the device has been activated (DRIVER_OK accepted) since the last reset.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// The feature bits the driver accepted.
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// How many guest accesses were ignored as invalid (wrong width, unknown register, wrong
    /// state). A driver that works never causes one; a count is a hint of a driver bug or a
    /// hostile guest.
    pub fn bad_accesses(&self) -> u64 {
        self.bad_accesses
    }

    fn bad_access(&mut self, what: &str, offset: u64) {
        self.bad_accesses = self.bad_accesses.saturating_add(1);
        // Rate-limited: a guest must not be able to flood the host log.
        if self.bad_accesses <= 10 || self.bad_accesses.is_power_of_two() {
            warn!(
                "virtio-mmio (device type {}): ignored {what} at offset {offset:#x} ({} so far)",
                self.device_type, self.bad_accesses
            );
        }
    }

    fn selected_queue(&mut self) -> Option<&mut QueueRegs> {
        let idx = usize::try_from(self.queue_sel).ok()?;
        self.queues.get_mut(idx)
    }

    /// Handles a guest read of `data.len()` bytes at `offset` inside the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= CONFIG {
            if data.len() > 8 {
                self.bad_access("config read wider than 8 bytes", offset);
                return;
            }
            // offset >= CONFIG, so this cannot underflow.
            lock(&self.device).read_config(offset - CONFIG, data);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            self.bad_access("register read not 32-bit aligned", offset);
            return;
        }
        let value = match offset {
            MAGIC_VALUE => MAGIC,
            VERSION_REG => VERSION,
            DEVICE_ID => self.device_type,
            VENDOR_ID => VENDOR,
            DEVICE_FEATURES => match self.device_features_sel {
                0 => half(self.device_features, false),
                1 => half(self.device_features, true),
                _ => 0,
            },
            QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size)),
            QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready)),
            QUEUE_NUM => self.selected_queue().map_or(0, |q| u32::from(q.size)),
            QUEUE_DESC_LOW => self.selected_queue().map_or(0, |q| half(q.desc, false)),
            QUEUE_DESC_HIGH => self.selected_queue().map_or(0, |q| half(q.desc, true)),
            QUEUE_DRIVER_LOW => self.selected_queue().map_or(0, |q| half(q.driver, false)),
            QUEUE_DRIVER_HIGH => self.selected_queue().map_or(0, |q| half(q.driver, true)),
            QUEUE_DEVICE_LOW => self.selected_queue().map_or(0, |q| half(q.device, false)),
            QUEUE_DEVICE_HIGH => self.selected_queue().map_or(0, |q| half(q.device, true)),
            INTERRUPT_STATUS => self.interrupt.status(),
            STATUS => self.status,
            // No shared memory regions: length all ones means "no such region".
            SHM_LEN_LOW | SHM_LEN_HIGH | SHM_BASE_LOW | SHM_BASE_HIGH => u32::MAX,
            CONFIG_GENERATION => self
                .interrupt
                .config_generation()
                .wrapping_add(lock(&self.device).config_generation()),
            _ => {
                self.bad_access("read of a write-only or unknown register", offset);
                0
            }
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    /// Handles a guest write of `data` at `offset` inside the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG {
            if data.len() > 8 {
                self.bad_access("config write wider than 8 bytes", offset);
                return;
            }
            // offset >= CONFIG, so this cannot underflow.
            lock(&self.device).write_config(offset - CONFIG, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.bad_access("register write not 32 bits wide", offset);
            return;
        };
        if offset % 4 != 0 {
            self.bad_access("register write not aligned", offset);
            return;
        }
        let value = u32::from_le_bytes(bytes);
        match offset {
            DEVICE_FEATURES_SEL => self.device_features_sel = value,
            DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            DRIVER_FEATURES => self.write_driver_features(value),
            QUEUE_SEL => self.queue_sel = value,
            QUEUE_NUM | QUEUE_DESC_LOW | QUEUE_DESC_HIGH | QUEUE_DRIVER_LOW | QUEUE_DRIVER_HIGH
            | QUEUE_DEVICE_LOW | QUEUE_DEVICE_HIGH | QUEUE_READY => {
                self.write_queue_reg(offset, value)
            }
            QUEUE_NOTIFY => self.notify(value),
            INTERRUPT_ACK => self.interrupt.ack(value),
            STATUS => self.write_status(value),
            SHM_SEL => {}
            _ => self.bad_access("write to a read-only or unknown register", offset),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        // virtio 1.2, 3.1.1: features are written after DRIVER and before FEATURES_OK.
        let s = self.status;
        if s & VIRTIO_CONFIG_S_DRIVER == 0 || s & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            self.bad_access("driver features write outside negotiation", DRIVER_FEATURES);
            return;
        }
        match self.driver_features_sel {
            0 => set_low(&mut self.driver_features, value),
            1 => set_high(&mut self.driver_features, value),
            // Feature words the device does not have: accepting bits there is invalid; the
            // FEATURES_OK check refuses it.
            _ if value != 0 => self.driver_features_invalid = true,
            _ => {}
        }
    }

    fn write_queue_reg(&mut self, offset: u64, value: u32) {
        // Queues are configured after FEATURES_OK and before DRIVER_OK (virtio 1.2, 3.1.1);
        // the ready bit may also be cleared when the driver tears a queue down.
        let s = self.status;
        let configuring =
            s & VIRTIO_CONFIG_S_FEATURES_OK != 0 && s & VIRTIO_CONFIG_S_DRIVER_OK == 0;
        let Some(q) = self.selected_queue() else {
            self.bad_access(
                "queue register write with an invalid queue selected",
                offset,
            );
            return;
        };
        if offset == QUEUE_READY && value == 0 {
            q.ready = false;
            return;
        }
        if !configuring || q.ready {
            self.bad_access("queue register write outside queue setup", offset);
            return;
        }
        match offset {
            QUEUE_NUM => {
                // Checked at activation (power of two, <= max), where a bad value fails the
                // device instead of being silently replaced.
                q.size = u16::try_from(value).unwrap_or(0);
            }
            QUEUE_DESC_LOW => set_low(&mut q.desc, value),
            QUEUE_DESC_HIGH => set_high(&mut q.desc, value),
            QUEUE_DRIVER_LOW => set_low(&mut q.driver, value),
            QUEUE_DRIVER_HIGH => set_high(&mut q.driver, value),
            QUEUE_DEVICE_LOW => set_low(&mut q.device, value),
            QUEUE_DEVICE_HIGH => set_high(&mut q.device, value),
            QUEUE_READY => q.ready = value == 1,
            _ => {}
        }
    }

    fn notify(&mut self, value: u32) {
        // Normally an ioeventfd registered with KVM catches this write before it reaches us;
        // without one (tests, or a VMM that does not register them) signal the eventfd here.
        let evt = usize::try_from(value)
            .ok()
            .and_then(|i| self.queue_evts.get(i));
        match evt {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    warn!("virtio-mmio: cannot signal queue {value} notification: {e}");
                }
            }
            None => self.bad_access("notification of a queue that does not exist", QUEUE_NOTIFY),
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        // The driver only ever adds bits (virtio 1.2, 2.1.2 and 3.1.1); clearing any needs a
        // reset. NEEDS_RESET is the device's bit, not the driver's.
        let value = value | (old & VIRTIO_CONFIG_S_NEEDS_RESET);
        if value & old != old {
            self.bad_access("status write that clears bits without a reset", STATUS);
            return;
        }
        let added = value & !old;
        let in_order = |bit: u32, needs: u32| added & bit == 0 || value & needs == needs;
        if !in_order(VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_ACKNOWLEDGE)
            || !in_order(
                VIRTIO_CONFIG_S_FEATURES_OK,
                VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
            )
            || !in_order(
                VIRTIO_CONFIG_S_DRIVER_OK,
                VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
            )
        {
            self.bad_access("status write out of the initialization order", STATUS);
            return;
        }
        let mut new = value;
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 && !self.features_acceptable() {
            // The driver reads the status back and gives up (virtio 1.2, 3.1.1 step 6).
            debug!(
                "virtio-mmio: refusing features {:#x} (offered {:#x})",
                self.driver_features, self.device_features
            );
            new &= !VIRTIO_CONFIG_S_FEATURES_OK;
        }
        if new & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            // No DRIVER_OK without accepted features.
            new &= !VIRTIO_CONFIG_S_DRIVER_OK;
        }
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 && new & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            lock(&self.device).ack_features(self.driver_features);
        }
        self.set_status(new);
        if added & new & VIRTIO_CONFIG_S_DRIVER_OK != 0
            && new & VIRTIO_CONFIG_S_FAILED == 0
            && !self.activated
        {
            self.activate();
        }
    }

    fn set_status(&mut self, status: u32) {
        self.status = status;
        self.interrupt.set_device_status(status);
    }

    fn features_acceptable(&self) -> bool {
        !self.driver_features_invalid
            && self.driver_features & !self.device_features == 0
            && self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0
            && lock(&self.device).features_acceptable(self.driver_features)
    }

    fn build_queues(&self) -> Result<Vec<ActiveQueue>, String> {
        let mut active = Vec::new();
        let event_idx = self.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mem = self.mem.memory();
        for (i, (regs, evt)) in self.queues.iter().zip(&self.queue_evts).enumerate() {
            if !regs.ready {
                continue;
            }
            let index = u16::try_from(i).map_err(|_| format!("queue index {i} too large"))?;
            let mut q =
                Queue::new(regs.max_size).map_err(|e| format!("queue {i}: max size: {e}"))?;
            q.try_set_size(regs.size)
                .map_err(|e| format!("queue {i}: size {}: {e}", regs.size))?;
            q.try_set_desc_table_address(GuestAddress(regs.desc))
                .map_err(|e| format!("queue {i}: descriptor table {:#x}: {e}", regs.desc))?;
            q.try_set_avail_ring_address(GuestAddress(regs.driver))
                .map_err(|e| format!("queue {i}: driver ring {:#x}: {e}", regs.driver))?;
            q.try_set_used_ring_address(GuestAddress(regs.device))
                .map_err(|e| format!("queue {i}: device ring {:#x}: {e}", regs.device))?;
            q.set_event_idx(event_idx);
            q.set_ready(true);
            if !q.is_valid(&*mem) {
                return Err(format!("queue {i}: rings are not inside guest memory"));
            }
            let notify = evt
                .try_clone()
                .map_err(|e| format!("queue {i}: cannot clone notification eventfd: {e}"))?;
            active.push(ActiveQueue {
                index,
                queue: q,
                notify,
            });
        }
        Ok(active)
    }

    fn activate(&mut self) {
        let result = self.build_queues().and_then(|queues| {
            let activation = Activation {
                mem: self.mem.clone(),
                queues,
                interrupt: self.interrupt.clone() as Arc<dyn VirtioInterrupt>,
                features: self.driver_features,
            };
            lock(&self.device)
                .activate(activation)
                .map_err(|e| e.to_string())
        });
        match result {
            Ok(()) => self.activated = true,
            Err(e) => {
                self.bad_access("activation with an invalid setup", STATUS);
                warn!(
                    "virtio-mmio (device type {}): activation failed, device needs reset: {e}",
                    self.device_type
                );
                self.set_status(self.status | VIRTIO_CONFIG_S_NEEDS_RESET);
                if let Err(e) = self.interrupt.signal_needs_reset() {
                    warn!("virtio-mmio: {e}");
                }
            }
        }
    }

    /// Resets the transport and the device, as the driver's write of 0 to the status
    /// register does (virtio 1.2, 4.2.2.1). The VMM also calls this on a system reset.
    pub fn reset(&mut self) {
        if self.status != 0 || self.activated {
            lock(&self.device).reset();
        }
        self.activated = false;
        self.device_features_sel = 0;
        self.driver_features = 0;
        self.driver_features_sel = 0;
        self.driver_features_invalid = false;
        self.queue_sel = 0;
        for q in &mut self.queues {
            *q = QueueRegs::new(q.max_size);
        }
        // Drain notifications that arrived for the old queues.
        for evt in &self.queue_evts {
            let _ = evt.read();
        }
        self.set_status(0);
        self.interrupt.clear();
    }
}

/// Locks the device, recovering from a poisoned lock: a panic in another thread that held
/// it must not take the transport (and the vCPU that runs it) down too.
fn lock<M: GuestAddressSpace>(
    device: &Arc<Mutex<dyn VirtioDevice<M>>>,
) -> MutexGuard<'_, dyn VirtioDevice<M> + 'static> {
    device.lock().unwrap_or_else(|p| p.into_inner())
}
