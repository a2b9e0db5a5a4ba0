//! Guest RAM: the boot RAM mappings (vm-memory), their KVM memslots, and the guest memory
//! map devices see ([`GuestMemoryHandle`]).
//!
//! Slots 0..n are boot RAM; later slots (the virtio-mem region) are allocated from
//! [`MemorySlots::next_free`] at run time.

use std::collections::BTreeMap;
use std::ops::Deref;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{
    GuestAddressSpace, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
    MmapRegion,
};

use crate::layout;

/// The guest memory map devices see, replaced as memory is plugged and unplugged, with a
/// grace period for the views still in use.
///
/// Devices read guest memory through a [`MemorySnapshot`] ([`GuestAddressSpace::memory`]).
/// A snapshot keeps the map it was taken from, so after [`GuestMemoryHandle::publish`]
/// a device may still reach host memory the new map left out. Before host memory is taken
/// away (made `PROT_NONE`, discarded), its owner therefore publishes a map without it and
/// then waits in [`GuestMemoryHandle::wait_for_older_snapshots`] until no snapshot of an
/// earlier map is alive: from then on no device can reach it. `vm_memory`'s
/// `GuestMemoryAtomic` has no such wait, which is why this type exists.
#[derive(Clone)]
pub struct GuestMemoryHandle(Arc<Shared>);

struct Shared {
    state: Mutex<MapState>,
    /// Signalled whenever the last snapshot of some map is dropped.
    released: Condvar,
}

struct MapState {
    map: Arc<GuestMemoryMmap>,
    /// Number of the current map; every publish adds one.
    generation: u64,
    /// Live snapshots, by the generation of the map they hold.
    live: BTreeMap<u64, usize>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, MapState> {
        // Every update of the state is a single assignment or counter step: a panic
        // elsewhere cannot leave it half-done.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl std::fmt::Debug for GuestMemoryHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.lock();
        f.debug_struct("GuestMemoryHandle")
            .field("generation", &s.generation)
            .field("live_snapshots", &s.live)
            .finish_non_exhaustive()
    }
}

/// Snapshots of an older map were still alive when the wait ended.
#[derive(Debug, thiserror::Error)]
#[error(
    "{count} views of guest memory older than map {generation} are still in use after \
     {waited:?}; the memory stays with the guest (this is a VMM bug: please report it)"
)]
pub struct StaleSnapshots {
    /// How many old snapshots are alive.
    pub count: usize,
    /// The generation waited for.
    pub generation: u64,
    /// How long the wait lasted.
    pub waited: Duration,
}

impl GuestMemoryHandle {
    /// A handle whose first map is `map`.
    pub fn new(map: GuestMemoryMmap) -> Self {
        GuestMemoryHandle(Arc::new(Shared {
            state: Mutex::new(MapState {
                map: Arc::new(map),
                generation: 0,
                live: BTreeMap::new(),
            }),
            released: Condvar::new(),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, MapState> {
        self.0.lock()
    }

    /// Makes `map` the map new snapshots see; returns its generation, for
    /// [`GuestMemoryHandle::wait_for_older_snapshots`].
    pub fn publish(&self, map: GuestMemoryMmap) -> u64 {
        let mut s = self.lock();
        s.map = Arc::new(map);
        s.generation += 1;
        s.generation
    }

    /// Waits until no snapshot of a map older than `generation` is alive, at most
    /// `timeout`.
    ///
    /// The caller must not hold such a snapshot itself (it would wait for itself).
    ///
    /// # Errors
    ///
    /// [`StaleSnapshots`] when old snapshots are still alive after `timeout`.
    pub fn wait_for_older_snapshots(
        &self,
        generation: u64,
        timeout: Duration,
    ) -> Result<(), StaleSnapshots> {
        let start = Instant::now();
        let mut s = self.lock();
        loop {
            let count: usize = s.live.range(..generation).map(|(_, &n)| n).sum();
            if count == 0 {
                return Ok(());
            }
            let waited = start.elapsed();
            let Some(left) = timeout.checked_sub(waited).filter(|d| !d.is_zero()) else {
                return Err(StaleSnapshots {
                    count,
                    generation,
                    waited,
                });
            };
            s = self
                .0
                .released
                .wait_timeout(s, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

impl GuestAddressSpace for GuestMemoryHandle {
    type M = GuestMemoryMmap;
    type T = MemorySnapshot;

    fn memory(&self) -> MemorySnapshot {
        let mut s = self.lock();
        let generation = s.generation;
        *s.live.entry(generation).or_insert(0) += 1;
        MemorySnapshot {
            map: Arc::clone(&s.map),
            generation,
            owner: Arc::clone(&self.0),
        }
    }
}

/// A consistent view of guest memory. While it is alive, the host memory it maps stays
/// mapped: see [`GuestMemoryHandle`]. Keep it only for one round of work.
pub struct MemorySnapshot {
    map: Arc<GuestMemoryMmap>,
    generation: u64,
    owner: Arc<Shared>,
}

impl std::fmt::Debug for MemorySnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemorySnapshot")
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl Clone for MemorySnapshot {
    fn clone(&self) -> Self {
        *self.owner.lock().live.entry(self.generation).or_insert(0) += 1;
        MemorySnapshot {
            map: Arc::clone(&self.map),
            generation: self.generation,
            owner: Arc::clone(&self.owner),
        }
    }
}

impl Drop for MemorySnapshot {
    fn drop(&mut self) {
        let mut s = self.owner.lock();
        let emptied = match s.live.get_mut(&self.generation) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            _ => {
                s.live.remove(&self.generation);
                true
            }
        };
        drop(s);
        if emptied {
            self.owner.released.notify_all();
        }
    }
}

impl Deref for MemorySnapshot {
    type Target = GuestMemoryMmap;

    fn deref(&self) -> &GuestMemoryMmap {
        &self.map
    }
}

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

/// Allocates `mem_size` bytes of boot RAM laid out by [`layout::ram_ranges`], each range
/// aligned to the host's huge page size and advised for transparent huge pages
/// ([`memory_backend::anonymous::map_guest_ram`]; vm-memory's own mapping is neither).
///
/// # Errors
///
/// [`MemoryError::Allocate`] when the host cannot map it.
pub fn create_guest_memory(mem_size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let fail = |reason: String| MemoryError::Allocate {
        size: mem_size,
        reason,
    };
    let mut regions = Vec::new();
    for (gpa, size) in layout::ram_ranges(mem_size) {
        let len = usize::try_from(size).map_err(|e| fail(e.to_string()))?;
        let host =
            memory_backend::anonymous::map_guest_ram(len).map_err(|e| fail(e.to_string()))?;
        // SAFETY: `[host, host + len)` is a private anonymous read-write mapping made just
        // now for this range alone and never unmapped (map_guest_ram's contract), so it
        // stays valid for every view vm-memory builds over it, for the life of the process.
        let mapping = unsafe {
            MmapRegion::build_raw(
                host.as_ptr(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            )
        }
        .map_err(|e| fail(e.to_string()))?;
        let region = GuestRegionMmap::new(mapping, gpa)
            .ok_or_else(|| fail(format!("range at {:#x} overflows the address space", gpa.0)))?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| fail(e.to_string()))
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
        // which the VMM keeps alive (every map the GuestMemoryHandle publishes shares it) for as
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
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn memory_matches_layout() {
        let m = create_guest_memory(64 << 20).unwrap();
        assert_eq!(m.num_regions(), 1);
        assert_eq!(m.last_addr(), GuestAddress((64 << 20) - 1));
    }

    #[test]
    fn every_huge_page_of_guest_ram_is_a_huge_page_of_host_memory() {
        // Large enough to split around the 32-bit hole: two ranges.
        let size = 5 << 30;
        let m = create_guest_memory(size).unwrap();
        let ranges = layout::ram_ranges(size);
        assert_eq!(m.num_regions(), ranges.len());
        assert!(ranges.len() > 1, "{ranges:?}");
        for r in m.iter() {
            let host = r.as_ptr() as u64;
            let gpa = r.start_addr().0;
            assert_eq!(
                host.wrapping_sub(gpa) % (2 << 20),
                0,
                "{host:#x} for {gpa:#x}"
            );
            let last = r.last_addr();
            m.write_obj(0xabu8, last).unwrap();
            assert_eq!(m.read_obj::<u8>(last).unwrap(), 0xab);
        }
    }

    fn tiny() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap()
    }

    #[test]
    fn the_wait_ends_when_the_last_older_snapshot_is_dropped() {
        let h = GuestMemoryHandle::new(tiny());
        let old = h.memory();
        let old_copy = old.clone();
        let generation = h.publish(tiny());
        let new = h.memory();
        let short = Duration::from_millis(20);
        let e = h.wait_for_older_snapshots(generation, short).unwrap_err();
        assert_eq!((e.count, e.generation), (2, generation));
        drop(old);
        assert!(h.wait_for_older_snapshots(generation, short).is_err());
        let waiter = {
            let h = h.clone();
            std::thread::spawn(move || {
                h.wait_for_older_snapshots(generation, Duration::from_secs(10))
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        drop(old_copy);
        waiter.join().unwrap().unwrap();
        // Snapshots of the new map never hold the wait up.
        h.wait_for_older_snapshots(generation, Duration::ZERO)
            .unwrap();
        drop(new);
        assert!(h.lock().live.is_empty());
    }

    #[test]
    fn snapshots_keep_the_map_they_were_taken_from() {
        let h = GuestMemoryHandle::new(tiny());
        let old = h.memory();
        h.publish(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x2000)]).unwrap());
        assert_eq!(old.last_addr(), GuestAddress(0xfff));
        assert_eq!(h.memory().last_addr(), GuestAddress(0x1fff));
    }

    #[test]
    fn slots_count_up() {
        let mut s = MemorySlots::default();
        assert_eq!((s.next_free(), s.next_free()), (0, 1));
    }
}
