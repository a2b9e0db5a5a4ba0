//! The VMM library: KVM virtual machine, boot, devices (work in progress).
