//! Interrupts from a device to the driver: the [`VirtioInterrupt`] trait that devices call
//! and the transport's implementation, which sets the interrupt status register and
//! signals an irqfd (an [`EventFd`] the VMM registers with KVM as a GSI).

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};

use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_DRIVER_OK;
use vmm_sys_util::eventfd::EventFd;

use crate::regs::{INT_CONFIG, INT_VRING};

/// Why a device interrupts the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterruptKind {
    /// The device placed buffers in a used ring ("used buffer notification").
    UsedBuffer,
    /// The device configuration space changed ("configuration change notification"). The
    /// transport also bumps the configuration generation, so the driver re-reads it.
    ConfigChange,
}

/// Errors raised when signalling an interrupt.
#[derive(Debug, thiserror::Error)]
pub enum InterruptError {
    /// Writing the irqfd failed (the eventfd counter overflowed or the fd is broken).
    #[error("cannot signal the interrupt eventfd (irqfd): {0}")]
    Signal(#[source] io::Error),
}

/// What a virtio device calls to notify its driver.
///
/// Implemented by the transport; devices hold it as `Arc<dyn VirtioInterrupt>`.
pub trait VirtioInterrupt: Send + Sync {
    /// Notifies the driver.
    ///
    /// # Errors
    ///
    /// [`InterruptError::Signal`] when the interrupt cannot be delivered.
    fn trigger(&self, kind: InterruptKind) -> Result<(), InterruptError>;
}

/// The virtio-mmio transport's interrupt: the interrupt status register, the configuration
/// generation and the irqfd, shared between the transport (register reads and writes) and
/// the device (which triggers it from its own thread).
#[derive(Debug)]
pub struct MmioInterrupt {
    irqfd: EventFd,
    status: AtomicU32,
    config_generation: AtomicU32,
    device_status: AtomicU32,
}

impl MmioInterrupt {
    /// Creates an interrupt that signals `irqfd`.
    pub fn new(irqfd: EventFd) -> Self {
        Self {
            irqfd,
            status: AtomicU32::new(0),
            config_generation: AtomicU32::new(0),
            device_status: AtomicU32::new(0),
        }
    }

    /// The irqfd that the VMM registers with KVM for this device's GSI.
    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }

    /// The current interrupt status register value.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Clears the bits the driver acknowledged.
    pub(crate) fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Clears the whole interrupt status (device reset).
    pub(crate) fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }

    /// The current configuration generation.
    pub fn config_generation(&self) -> u32 {
        self.config_generation.load(Ordering::SeqCst)
    }

    /// The device status register as the driver last wrote it.
    pub fn device_status(&self) -> u32 {
        self.device_status.load(Ordering::SeqCst)
    }

    /// Mirrors the device status so that notifications are held back until DRIVER_OK.
    pub(crate) fn set_device_status(&self, status: u32) {
        self.device_status.store(status, Ordering::SeqCst);
    }

    fn raise(&self, bit: u32) -> Result<(), InterruptError> {
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.irqfd.write(1).map_err(InterruptError::Signal)
    }

    /// Marks the device as needing a reset (virtio 1.2, 2.1.2) and tells the driver through a
    /// configuration change notification.
    pub(crate) fn signal_needs_reset(&self) -> Result<(), InterruptError> {
        self.config_generation.fetch_add(1, Ordering::SeqCst);
        self.raise(INT_CONFIG)
    }
}

impl VirtioInterrupt for MmioInterrupt {
    fn trigger(&self, kind: InterruptKind) -> Result<(), InterruptError> {
        match kind {
            InterruptKind::UsedBuffer => self.raise(INT_VRING),
            InterruptKind::ConfigChange => {
                // The generation always changes, so a driver reading the configuration (even
                // before DRIVER_OK) sees a consistent snapshot. The notification itself is only
                // sent to a driver that is up: before DRIVER_OK it reads the config anyway.
                self.config_generation.fetch_add(1, Ordering::SeqCst);
                if self.device_status.load(Ordering::SeqCst) & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
                    self.raise(INT_CONFIG)
                } else {
                    Ok(())
                }
            }
        }
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn used_buffer_sets_bit_and_signals() {
        let irq = MmioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap());
        irq.trigger(InterruptKind::UsedBuffer).unwrap();
        assert_eq!(irq.status(), INT_VRING);
        assert_eq!(irq.irqfd().read().unwrap(), 1);
        irq.ack(INT_VRING);
        assert_eq!(irq.status(), 0);
    }

    #[test]
    fn config_change_bumps_generation_and_waits_for_driver_ok() {
        let irq = MmioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap());
        irq.trigger(InterruptKind::ConfigChange).unwrap();
        assert_eq!(irq.config_generation(), 1);
        assert_eq!(irq.status(), 0);
        assert!(irq.irqfd().read().is_err(), "no signal before DRIVER_OK");
        irq.set_device_status(VIRTIO_CONFIG_S_DRIVER_OK);
        irq.trigger(InterruptKind::ConfigChange).unwrap();
        assert_eq!(irq.config_generation(), 2);
        assert_eq!(irq.status(), INT_CONFIG);
        assert_eq!(irq.irqfd().read().unwrap(), 1);
    }

    #[test]
    fn signal_error_is_reported() {
        let irq = MmioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap());
        // An eventfd counter saturates at u64::MAX - 1; a non-blocking write past it fails.
        irq.irqfd().write(u64::MAX - 1).unwrap();
        let err = irq.trigger(InterruptKind::UsedBuffer).unwrap_err();
        assert!(matches!(err, InterruptError::Signal(_)));
        assert!(err.to_string().contains("irqfd"));
    }
}
