//! Guest RAM: the boot RAM mappings (vm-memory) and their KVM memslots.
//!
//! Slots 0..n are boot RAM; later slots (the virtio-mem region) are allocated from
//! [`MemorySlots::next_free`] at run time.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{
    GuestAddress, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use crate::layout;

/// The guest memory handle devices get: swappable when regions are added at run time.
pub type GuestMemoryHandle = GuestMemoryAtomic<GuestMemoryMmap>;

/// Errors while setting up guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The host could not map the guest RAM.
    #[error("cannot allocate {size} bytes of guest RAM: {reason}")]
    Allocate {
        /// Requested size.
        size: u64,
        /// Why.
        reason: String,
    },
    /// KVM refused a memslot.
    #[error("KVM refused memslot {slot} ({start:#x}+{size:#x}): {source}")]
    Memslot {
        /// Slot number.
        slot: u32,
        /// Guest physical start.
        start: u64,
        /// Size.
        size: u64,
        /// The KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Allocates `mem_size` bytes of boot RAM laid out by [`layout::ram_ranges`].
///
/// # Errors
///
/// [`MemoryError::Allocate`] when the host cannot map it.
pub fn create_guest_memory(mem_size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let ranges = layout::ram_ranges(mem_size)
        .into_iter()
        .map(|(a, s)| usize::try_from(s).map(|s| (a, s)))
        .collect::<Result<Vec<(GuestAddress, usize)>, _>>()
        .map_err(|e| MemoryError::Allocate {
            size: mem_size,
            reason: e.to_string(),
        })?;
    GuestMemoryMmap::from_ranges(&ranges).map_err(|e| MemoryError::Allocate {
        size: mem_size,
        reason: e.to_string(),
    })
}

/// Tracks KVM memslot numbers.
#[derive(Debug, Default)]
pub struct MemorySlots {
    next: u32,
}

impl MemorySlots {
    /// The next unused slot number.
    pub fn next_free(&mut self) -> u32 {
        let s = self.next;
        self.next = self.next.saturating_add(1);
        s
    }
}

/// Registers every region of `mem` with KVM.
///
/// # Errors
///
/// [`MemoryError::Memslot`] when KVM refuses one.
pub fn register_memslots(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    slots: &mut MemorySlots,
) -> Result<(), MemoryError> {
    for region in mem.iter() {
        let slot = slots.next_free();
        let start = region.start_addr().0;
        let size = region.len();
        let region_desc = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: start,
            memory_size: size,
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the host range [as_ptr, as_ptr + size) is a live mapping owned by `mem`,
        // which the VMM keeps alive (in the GuestMemoryAtomic shared with devices) for as
        // long as the VM exists, and no other slot maps the same guest range.
        unsafe { vm.set_user_memory_region(region_desc) }.map_err(|source| {
            MemoryError::Memslot {
                slot,
                start,
                size,
                source,
            }
        })?;
    }
    Ok(())
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]
mod tests {
    use super::*;

    #[test]
    fn memory_matches_layout() {
        let m = create_guest_memory(64 << 20).unwrap();
        assert_eq!(m.num_regions(), 1);
        assert_eq!(m.last_addr(), GuestAddress((64 << 20) - 1));
    }

    #[test]
    fn slots_count_up() {
        let mut s = MemorySlots::default();
        assert_eq!((s.next_free(), s.next_free()), (0, 1));
    }
}
