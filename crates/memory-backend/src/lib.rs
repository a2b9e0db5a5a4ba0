//! The host memory path of a virtio-mem device.
//!
//! A [`MemoryRegion`] reserves the whole hotplug range at once (`PROT_NONE`,
//! `MAP_NORESERVE`: the host commits nothing), and turns the device's decisions into host
//! memory: [`MemoryRegion::plug`] makes a block-aligned range accessible and optionally
//! faults it in over several threads ([`populate`](PopulateOptions)), and
//! [`MemoryRegion::unplug`] protects it again and gives the memory back in the way that
//! works for the [`Backing`] (`MADV_DONTNEED` for private anonymous memory, punching a
//! hole for memfd, shmem, hugetlb and files). [`MemoryRegion::stage`] faults an unplugged
//! range in ahead of its plug and leaves it inaccessible, so the plug that follows only
//! changes protection.
//!
//! Failures that are the host's transient trouble (out of memory, an empty hugetlb pool,
//! a poisoned page) come back as typed [`MemoryBackendError`]s, for which the device
//! answers BUSY; no path raises SIGBUS.
//!
//! [`accounting`] reads what the host really holds (smaps, smaps_rollup, a file's
//! allocated blocks), [`hugetlb`] reads and resizes hugetlb pools, and [`probe`] checks
//! from a child process that an address faults.
//!
//! The crate knows nothing of the device or of KVM: the VMM adapts it to the device's
//! block-backend trait and registers `host_addr()`/`size()` ranges as memslots.

#![cfg_attr(test, expect(clippy::unwrap_used, reason = "tests may unwrap"))]

mod backing;
mod error;
mod populate;
mod region;
mod runs;
mod sys;

pub mod accounting;
pub mod anonymous;
pub mod hugetlb;
pub mod probe;

pub use backing::{Backing, BackingKind, DiscardMethod, HugePageSize};
pub use block_layout::{BlockLayout, LayoutError};
pub use error::MemoryBackendError;
pub use populate::{PopulateMethod, PopulateOptions, PopulateReport};
pub use region::{MemoryRegion, RangeAccessError, RegionConfig, RegionUsage};
