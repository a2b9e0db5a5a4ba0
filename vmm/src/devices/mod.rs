//! Devices of the VM: COM1, the reset/poweroff ports, and virtio devices.

pub mod balloon;
pub mod legacy;
pub mod rng;
pub mod serial;
pub mod virtio_mem;
