//! The virtio-mem device model (virtio device type 24).
