//! The trait a virtio device implements to be driven by the transport.
//!
//! The transport owns everything the virtio-mmio register interface defines (feature
//! negotiation, queue configuration, status, interrupt status); the device only supplies
//! what is specific to it (its type, features, configuration space, number and sizes of
//! queues) and is handed ready-to-use queues when the driver sets DRIVER_OK.

use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::eventfd::EventFd;

use crate::interrupt::VirtioInterrupt;

/// One activated virtqueue: the queue, configured by the driver, and the eventfd that is
/// signalled when the driver notifies it (an ioeventfd registered with KVM, or written by the
/// transport itself when the notify write reaches it).
#[derive(Debug)]
pub struct ActiveQueue {
    /// Index of the queue in the device (its position in `queue_max_sizes`).
    pub index: u16,
    /// The queue, with the size and ring addresses the driver chose.
    pub queue: Queue,
    /// Signalled on each driver notification for this queue.
    pub notify: EventFd,
}

/// What a device receives when the driver sets DRIVER_OK.
pub struct Activation<M: GuestAddressSpace> {
    /// Guest memory, where the queues' rings and buffers are.
    pub mem: M,
    /// The queues the driver marked ready, in index order. Queues the driver left unready
    /// are absent (a driver may use fewer queues than the device offers).
    pub queues: Vec<ActiveQueue>,
    /// The interrupt to notify the driver of used buffers.
    pub interrupt: Arc<dyn VirtioInterrupt>,
    /// The negotiated feature bits.
    pub features: u64,
}

impl<M: GuestAddressSpace> std::fmt::Debug for Activation<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Activation")
            .field("queues", &self.queues)
            .field("features", &format_args!("{:#x}", self.features))
            .finish_non_exhaustive()
    }
}

/// Why a device refused activation.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver did not make a queue ready that the device needs.
    #[error("queue {index} is required by the device but the driver did not make it ready")]
    MissingQueue {
        /// Index of the missing queue.
        index: u16,
    },
    /// The device could not set up its host-side resources.
    #[error("device setup failed: {0}")]
    Setup(String),
}

/// A virtio device that the transport drives.
///
/// `M` is the guest memory handle the device gets on activation (for example
/// `GuestMemoryAtomic<GuestMemoryMmap>`). The transport holds the device behind
/// `Arc<Mutex<_>>` so that the VMM can also run the device's queue handling in its event
/// loop; the methods here are short and never block on guest-controlled events.
pub trait VirtioDevice<M: GuestAddressSpace>: Send {
    /// The virtio device id (virtio 1.2, section 5; e.g. 24 for virtio-mem). Must not be 0:
    /// Linux ignores a virtio-mmio device with id 0.
    fn device_type(&self) -> u32;

    /// Maximum size of each of the device's queues (powers of two, at most 32768).
    fn queue_max_sizes(&self) -> &[u16];

    /// The feature bits the device offers. The transport adds `VIRTIO_F_VERSION_1`, which
    /// version 2 of virtio-mmio requires.
    fn device_features(&self) -> u64;

    /// Called once the driver sets FEATURES_OK with the features it accepted (a subset of
    /// what was offered; the transport has checked that).
    fn ack_features(&mut self, _features: u64) {}

    /// Whether the device can work with the features the driver accepted (a subset of
    /// what was offered). `false` makes the transport refuse FEATURES_OK, e.g. for a
    /// device that needs a feature bit the driver does not know. The default accepts.
    fn features_acceptable(&self, _features: u64) -> bool {
        true
    }

    /// A counter the device bumps whenever its configuration space changes without a
    /// configuration change notification (e.g. a size field the driver only polls). The
    /// transport adds it to its own generation, so drivers re-read until they see a
    /// consistent snapshot. The default never changes.
    fn config_generation(&self) -> u32 {
        0
    }

    /// Reads the device configuration space at `offset` into `data`. Bytes past the end of
    /// the configuration space must read as zero; `data` is at most 8 bytes.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes the device configuration space (most devices' config is read-only: the
    /// default ignores the write).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    /// Hands the device the transport's interrupt right after the transport is created, so
    /// that the device can send configuration change notifications at any time (for
    /// example on a resize request from the operator). The transport bumps the
    /// configuration generation on each one.
    fn set_interrupt(&mut self, _interrupt: Arc<dyn VirtioInterrupt>) {}

    /// Starts the device: the driver has set DRIVER_OK.
    ///
    /// # Errors
    ///
    /// An [`ActivateError`] when the device cannot run with this setup; the transport then
    /// sets DEVICE_NEEDS_RESET and notifies the driver.
    fn activate(&mut self, activation: Activation<M>) -> Result<(), ActivateError>;

    /// Resets the device: the driver wrote 0 to the status register. The device drops the
    /// queues it got on activation; what else it keeps is device-specific.
    fn reset(&mut self);
}
