//! The virtio-mem device model (virtio device type 24, "Memory Device").
//!
//! A virtio-mem device owns a region of guest-physical memory split into blocks. The
//! host sets a requested size; the guest driver plugs and unplugs blocks with requests on
//! one virtqueue until its plugged size matches. This crate is the device side: the wire
//! format ([`wire`]), the block bitmap ([`bitmap`]), the state machine ([`device`]) and the
//! queue processing ([`queue`]). It knows nothing of KVM or mmap: host memory and
//! interrupts come through the [`BlockBackend`] and [`Interrupt`] traits.
//!
//! The rules implemented are those of the virtio spec and of how the Linux driver behaves;
//! `tests/conformance.rs` tests each by name.

pub mod backend;
pub mod bitmap;
pub mod device;
pub mod metrics;
pub mod progress;
pub mod queue;
#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;
pub mod wire;

pub use backend::{BackendError, BlockBackend, Interrupt};
pub use bitmap::BlockBitmap;
pub use block_layout::{BlockLayout, LayoutError};
pub use device::{DeviceConfig, HostWork, PlugState, Prepared, ResizeOutcome, VirtioMemError};
pub use metrics::{Histogram, Metrics, RateLimit, HOST_TIME_BUCKETS_S};
pub use progress::{ResizeProgress, ResizeState, StallReason};
pub use queue::{Completion, MalformedChain, TakenRequest, VirtioMem};
pub use wire::{BlockState, Request, Response};
