//! The virtio-mmio transport, version 2 (virtio 1.2, section 4.2), and the device trait it
//! drives.
//!
//! - [`MmioTransport`] implements the register interface a guest driver sees in a device's
//!   MMIO window: feature negotiation, queue setup, status (reset on 0), interrupt status and
//!   acknowledge, configuration generation, and the device configuration space from 0x100.
//! - [`VirtioDevice`] is what a device implements: its type, features, configuration space,
//!   queue sizes, and activation with ready-to-use [`virtio_queue::Queue`]s.
//! - Queue notifications arrive on eventfds (ioeventfds when the VMM registers them with
//!   KVM) and interrupts leave through an irqfd ([`MmioInterrupt`]); this crate does not
//!   depend on KVM: the VMM registers the eventfds.
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use virtio_mmio::{regs, Activation, ActivateError, MmioTransport, VirtioDevice};
//! use vm_memory::{GuestAddress, GuestMemoryMmap};
//!
//! struct Null;
//! impl<M: vm_memory::GuestAddressSpace> VirtioDevice<M> for Null {
//!     fn device_type(&self) -> u32 { 42 }
//!     fn queue_max_sizes(&self) -> &[u16] { &[16] }
//!     fn device_features(&self) -> u64 { 0 }
//!     fn read_config(&self, _offset: u64, data: &mut [u8]) { data.fill(0) }
//!     fn activate(&mut self, _a: Activation<M>) -> Result<(), ActivateError> { Ok(()) }
//!     fn reset(&mut self) {}
//! }
//!
//! let mem = Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap());
//! let mut t = MmioTransport::new(Arc::new(Mutex::new(Null)), mem).unwrap();
//! let mut v = [0u8; 4];
//! t.read(regs::MAGIC_VALUE, &mut v);
//! assert_eq!(u32::from_le_bytes(v), regs::MAGIC);
//! ```

pub mod device;
pub mod interrupt;
pub mod regs;
pub mod transport;

pub use device::{ActivateError, Activation, ActiveQueue, VirtioDevice};
pub use interrupt::{InterruptError, InterruptKind, MmioInterrupt, VirtioInterrupt};
pub use transport::{MmioError, MmioTransport};
