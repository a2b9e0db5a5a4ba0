//! The VMM library: a KVM virtual machine that boots an unmodified Linux bzImage with its
//! virtio devices on virtio-mmio, announced through ACPI.
//!
//! - [`vm::Vm`] owns the KVM VM (in-kernel irqchip and PIT), guest RAM, the I/O-port and
//!   MMIO [`bus::Bus`]es, the devices and the vCPUs, and runs the event loop.
//! - [`boot`] implements the Linux boot protocol (bzImage, initrd, zero page with e820 of
//!   boot RAM only), [`acpi`] the hardware-reduced ACPI tables, [`cpu`] the vCPU setup and
//!   run loop, [`layout`] the guest physical address map.
//! - [`exit::ExitReason`] says how the guest ended: poweroff (ACPI S5), reboot (ACPI reset
//!   register, i8042 reset, triple fault) or error; the binary maps it to its exit status.
//!
//! A resize, in the order it happens (one name per thing on the way):
//!
//! 1. `vmm_api` parses `PUT /v1/memory`; [`devices::virtio_mem::MemoryApi`] sets the
//!    requested size on the device model, `virtio_mem::VirtioMem`, whose plug state
//!    (`virtio_mem::PlugState`) raises the config-change interrupt through the
//!    [`devices::virtio_mem::InterruptLine`].
//! 2. The guest's requests reach the request thread of
//!    [`devices::virtio_mem::VirtioMemMmio`] (the device's virtio-mmio face), which takes
//!    each one under the device lock (`VirtioMem::take_request`), runs its host work
//!    without the lock (`virtio_mem::HostWork::run`) and commits the answer
//!    (`VirtioMem::finish_request`).
//! 3. The host work is [`hotplug::HotplugMemory`], the device's `BlockBackend`: it
//!    populates or discards through `memory_backend::MemoryRegion` (madvise, fallocate,
//!    mprotect), adds or removes the KVM memory slot through its `Memslots`, and publishes
//!    the devices' guest memory map ([`memory::GuestMemoryHandle`]). Its options are
//!    [`hotplug::HotplugConfig`].
//!
//! With `--balloon` (or `--autosize`), [`devices::balloon`] adds a never-inflated
//! virtio-balloon: the guest's statistics, and free page reporting whose ranges are
//! discarded in boot RAM and plugged blocks. With `--autosize`, [`capacity::Capacity`]
//! sets the requested size from those statistics (step 1 without an operator).

pub mod acpi;
pub mod boot;
pub mod bus;
pub mod capacity;
pub mod cli;
pub mod cpu;
pub mod devices;
pub mod diag;
pub mod exit;
pub mod hotplug;
pub mod layout;
pub mod memory;
pub mod resize_wait;
pub mod signals;
pub mod terminal;
pub mod vm;
