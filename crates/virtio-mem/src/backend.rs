//! The two seams between the device and the VMM: the host memory behind the blocks, and
//! the interrupt line to the driver.
//!
//! The device model decides *which* blocks are plugged; a [`BlockBackend`] makes that true
//! in host memory (register a memslot, unprotect, populate; or discard and protect). An
//! [`Interrupt`] tells the driver about used buffers and configuration changes.

use std::io;

/// A failure of the host to change the state of blocks.
///
/// The device answers BUSY to either kind and leaves the block bitmap unchanged for the
/// failed range; the driver retries later (or sooner, on a configuration change). A
/// transient failure (out of memory, an empty hugetlb pool) may pass; a permanent one (a
/// refused KVM memslot, a broken backing) will not, so the device logs it at error level
/// once. Either way it is kept for the operator ([`crate::PlugState::host_error`]) until
/// host work succeeds again: the guest never retries unseen.
#[derive(Debug, thiserror::Error)]
#[error("host could not {op} guest range [{addr:#x}, {addr:#x} + {len:#x}): {reason}")]
pub struct BackendError {
    /// What was attempted: "plug" or "unplug".
    pub op: &'static str,
    /// Guest-physical start of the range.
    pub addr: u64,
    /// Length of the range in bytes.
    pub len: u64,
    /// Why it failed: the backend's own error (e.g. out of memory, an empty hugetlb pool,
    /// a refused KVM memslot), kept as the source for the operator's message.
    #[source]
    pub reason: Box<dyn std::error::Error + Send + Sync>,
    /// Whether retrying later may succeed.
    pub transient: bool,
}

/// Host memory behind the device's blocks.
///
/// Ranges are guest-physical, block-aligned, non-empty and always inside
/// `[addr, addr + usable_region_size)` of the device: the device validates every request
/// before it calls the backend.
pub trait BlockBackend {
    /// Makes `[addr, addr + len)` usable as guest RAM: after `Ok`, the guest can read and
    /// write it and it behaves like RAM.
    ///
    /// # Errors
    ///
    /// A [`BackendError`] when the host cannot provide the memory now (out of memory, empty
    /// hugetlb pool, poisoned page). The backend should leave the range released, so a
    /// failed plug does not leak host memory; the device keeps the blocks unplugged.
    fn plug(&mut self, addr: u64, len: u64) -> Result<(), BackendError>;

    /// Releases `[addr, addr + len)` to the host and makes it inaccessible to the guest.
    ///
    /// # Errors
    ///
    /// A [`BackendError`] when the host could not release the range. The device then
    /// keeps the blocks plugged; their contents may have been discarded, which is fine
    /// because the guest had already given the memory up when it asked to unplug it.
    fn unplug(&mut self, addr: u64, len: u64) -> Result<(), BackendError>;
}

/// A backend shared with others that do host work without holding the device (see
/// [`crate::HostWork`]): each call takes the lock. A backend that panicked while locked may
/// be half-updated, so it is not used again: every later call fails.
impl<B: BlockBackend> BlockBackend for std::sync::Arc<std::sync::Mutex<B>> {
    fn plug(&mut self, addr: u64, len: u64) -> Result<(), BackendError> {
        locked(self, "plug", addr, len)?.plug(addr, len)
    }

    fn unplug(&mut self, addr: u64, len: u64) -> Result<(), BackendError> {
        locked(self, "unplug", addr, len)?.unplug(addr, len)
    }
}

fn locked<'a, B>(
    backend: &'a std::sync::Mutex<B>,
    op: &'static str,
    addr: u64,
    len: u64,
) -> Result<std::sync::MutexGuard<'a, B>, BackendError> {
    backend.lock().map_err(|_| BackendError {
        op,
        addr,
        len,
        reason: "the memory backend failed earlier (a VMM bug, see the log); restart the VM".into(),
        transient: false,
    })
}

impl<T: BlockBackend + ?Sized> BlockBackend for Box<T> {
    fn plug(&mut self, addr: u64, len: u64) -> Result<(), BackendError> {
        (**self).plug(addr, len)
    }

    fn unplug(&mut self, addr: u64, len: u64) -> Result<(), BackendError> {
        (**self).unplug(addr, len)
    }
}

/// The interrupt line from the device to the driver.
///
/// The transport implements it: for virtio-mmio, set the interrupt status bit and trigger
/// the irqfd.
pub trait Interrupt {
    /// Tells the driver that the request queue has used buffers.
    ///
    /// # Errors
    ///
    /// The I/O error of the underlying notification mechanism (e.g. an eventfd write).
    fn signal_used_queue(&self) -> io::Result<()>;

    /// Tells the driver that the configuration space changed.
    ///
    /// # Errors
    ///
    /// The I/O error of the underlying notification mechanism (e.g. an eventfd write).
    fn signal_config_change(&self) -> io::Result<()>;
}

impl<T: Interrupt + ?Sized> Interrupt for std::sync::Arc<T> {
    fn signal_used_queue(&self) -> io::Result<()> {
        (**self).signal_used_queue()
    }

    fn signal_config_change(&self) -> io::Result<()> {
        (**self).signal_config_change()
    }
}
