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

pub mod acpi;
pub mod boot;
pub mod bus;
pub mod cli;
pub mod cpu;
pub mod devices;
pub mod diag;
pub mod exit;
pub mod hotplug;
pub mod layout;
pub mod memhp;
pub mod memory;
pub mod signals;
pub mod terminal;
pub mod vm;
