//! Linux end-to-end tests of virtio-mem.
//!
//! A stock Debian guest (kernel 6.1 or 6.12, busybox initramfs with a test agent built by
//! `ci/guest-image`) boots under the VMM under test ([`vmm::Vmm`]: QEMU's
//! `virtio-mem-pci` as the reference, or this project's VMM); the harness drives resizes
//! through the VMM's control channel, reads the agent's lines on the serial console
//! ([`agent`], [`console`]) and asserts what the guest and the host see
//! ([`scenarios`]). On machines whose KVM cannot run Linux, everything runs inside the
//! nested test host (`ci/testhost-run`, see [`host`]).

pub mod agent;
pub mod autosize_bench;
pub mod console;
pub mod firecracker;
pub mod guest;
pub mod host;
pub mod ours;
pub mod qemu;
pub mod resize_bench;
pub mod resize_soak;
pub mod runner;
pub mod scenarios;
pub mod soak;
pub mod timeline;
pub mod vmm;
