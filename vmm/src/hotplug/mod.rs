//! The virtio-mem region's host side: its options, checked before the VM starts
//! ([`HotplugConfig`]), the memory-backend region, the KVM memslots that follow plugged
//! memory, and the guest memory map devices see.
//!
//! The region is split into fixed-size slots (at least one guest memory block, so a slot
//! never splits one). A slot is registered with KVM when it gets its first plugged block
//! and removed once its last block is unplugged and the guest has gone quiet (see
//! [`HotplugMemory::release_idle_slots`]; the quiet period is a timer the hotplug memory
//! owns, [`HotplugMemory::release_timer`]), so KVM's bookkeeping follows plugged memory,
//! not the region, and the guest cannot reach a slot with nothing plugged. Within a
//! registered slot, unplugged blocks are `PROT_NONE` in the host: a guest touching them
//! gets no host memory (KVM fails the access instead).
//!
//! With populate on, the blocks the guest will most likely plug next (the lowest unplugged
//! ones, which is the order Linux's driver plugs in) are faulted in ahead while the guest
//! is busy adding and onlining what it plugged last ([`HotplugMemory::stage_ahead`]):
//! they stay `PROT_NONE` until plugged, and what the guest does not plug is given back
//! when the resize is over or the guest goes quiet.
//!
//! The guest memory map that devices use (a [`GuestMemoryHandle`]) holds boot RAM plus
//! exactly the plugged runs, and an unplug takes host memory away only once no device
//! holds a view of an older map, so a device never dereferences an unplugged
//! (`PROT_NONE`) host page, whatever address a guest puts in a descriptor.

use std::collections::BTreeMap;
use std::ops::Deref;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use log::{debug, info};
use memory_backend::{BlockLayout, MemoryBackendError, MemoryRegion};
use virtio_mem::{BackendError, BlockBackend};
use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MmapRegion,
};
use vmm_sys_util::timerfd::TimerFd;

use crate::memory::GuestMemoryHandle;

mod config;

pub use config::{
    guest_cmdline, BackingArg, GuestOnline, HotplugConfig, HotplugConfigError, Populate,
};

/// Registers and removes KVM memslots; a trait so the slot logic is testable without KVM.
pub trait Memslots: Send + Sync {
    /// Maps guest `[gpa, gpa + size)` to host `[host_addr, host_addr + size)` as `slot`.
    ///
    /// # Errors
    ///
    /// The KVM error.
    fn add(&self, slot: u32, gpa: u64, size: u64, host_addr: u64) -> Result<(), std::io::Error>;

    /// Removes `slot` (which maps `gpa`).
    ///
    /// # Errors
    ///
    /// The KVM error.
    fn remove(&self, slot: u32, gpa: u64) -> Result<(), std::io::Error>;
}

impl Memslots for kvm_ioctls::VmFd {
    fn add(&self, slot: u32, gpa: u64, size: u64, host_addr: u64) -> Result<(), std::io::Error> {
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: host_addr,
        };
        // SAFETY: `host_addr..host_addr + size` lies inside the hotplug region's reservation
        // (HotplugMemory computes it from the region base and checks the bounds), which
        // stays mapped for the whole life of the VMM process; no other slot maps this
        // guest range (slots partition the region, boot RAM lies below it).
        unsafe { self.set_user_memory_region(region) }
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }

    fn remove(&self, slot: u32, gpa: u64) -> Result<(), std::io::Error> {
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: 0,
            userspace_addr: 0,
        };
        // SAFETY: a zero-sized region deletes the slot; KVM then no longer accesses the
        // host memory it mapped.
        unsafe { self.set_user_memory_region(region) }
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}

/// Errors while setting the hotplug memory up.
#[derive(Debug, thiserror::Error)]
pub enum HotplugError {
    /// The KVM slot size is not a whole number of the region's blocks.
    #[error("KVM slot size {slot_size:#x} is not a multiple of the block size {block_size:#x}")]
    SlotSize {
        /// The slot size asked for.
        slot_size: u64,
        /// The region's block size.
        block_size: u64,
    },
    /// The region needs more KVM slot numbers than there are after `first_slot`.
    #[error("the virtio-mem region needs {0} KVM slots: too many for the slot numbers left")]
    TooManySlots(u64),
    /// Boot RAM's map could not be taken apart into its regions.
    #[error("boot RAM region at {addr:#x} cannot be shared: {source}")]
    BootRam {
        /// Start of the boot RAM region.
        addr: u64,
        /// What vm-memory said.
        #[source]
        source: vm_memory::GuestRegionCollectionError,
    },
    /// The host gave no timer for the slot release (out of file descriptors?).
    #[error("cannot create the KVM slot release timer: {0} (check the open file limit)")]
    Timer(std::io::Error),
}

/// How long the guest must change no plugged memory before idle KVM slots are removed
/// ([`HotplugMemory::release_idle_slots`] says why this waits) and memory staged ahead of
/// a plug is given back.
pub const SLOT_RELEASE_QUIET: Duration = Duration::from_secs(2);

/// Most memory staged ahead of the guest's plugs: two of Linux's 128 MiB memory blocks,
/// enough to keep one ready while the guest onlines the last, and a bound on the host
/// work that a guest which plugs and never uses what was staged can cause.
pub const STAGE_AHEAD_MAX: u64 = 256 << 20;

/// Longest wait in an unplug for devices to drop their views of guest memory. Devices hold
/// one for a round of bounded work (milliseconds); past this the unplug fails (the guest
/// is answered BUSY and retries) rather than leave a device a view of PROT_NONE memory.
const SNAPSHOT_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The host side of the virtio-mem region: implements the device's [`BlockBackend`].
pub struct HotplugMemory {
    region: Arc<MemoryRegion>,
    region_addr: u64,
    slot_size: u64,
    first_slot: u32,
    slot_plugged: Vec<u64>,
    /// Whether each slot is registered with KVM now. A slot whose last block was
    /// unplugged stays registered (over inaccessible memory) until
    /// [`HotplugMemory::release_idle_slots`]: see there why.
    slot_registered: Vec<bool>,
    /// How many of `slot_registered` are true, readable without this struct's lock (for
    /// `GET /metrics`, which must not wait on host work).
    registered_gauge: Arc<AtomicU64>,
    memslots: Arc<dyn Memslots>,
    mem: GuestMemoryHandle,
    /// Boot RAM's regions, first in every published map.
    boot: Vec<Arc<GuestRegionMmap>>,
    /// Most plugged runs allowed: see [`HotplugMemory::max_runs`].
    max_runs: usize,
    /// Plugged runs: guest start -> length, merged when adjacent.
    plugged: BTreeMap<u64, u64>,
    /// Expires [`SLOT_RELEASE_QUIET`] after the last plug or unplug that left idle slots.
    release_timer: TimerFd,
}

impl std::fmt::Debug for HotplugMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HotplugMemory")
            .field("region_addr", &format_args!("{:#x}", self.region_addr))
            .field("slot_size", &self.slot_size)
            .field("registered_slots", &self.registered_slots())
            .field("plugged_runs", &self.plugged.len())
            .finish_non_exhaustive()
    }
}

/// KVM refused to add or remove one of the region's memory slots.
#[derive(Debug, thiserror::Error)]
#[error("KVM memslot {slot} at {gpa:#x}: {op} refused: {source}")]
pub struct MemslotError {
    /// "add" or "remove".
    pub op: &'static str,
    /// Slot number.
    pub slot: u32,
    /// Guest-physical start of the slot.
    pub gpa: u64,
    /// KVM's error.
    #[source]
    pub source: std::io::Error,
}

/// A failure that retrying will not mend (a refused memslot, a range outside the region,
/// a device map that cannot be built).
fn backend_error(
    op: &'static str,
    addr: u64,
    len: u64,
    e: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> BackendError {
    BackendError {
        op,
        addr,
        len,
        reason: e.into(),
        transient: false,
    }
}

/// A failure of the region itself: transient when memory-backend says so (out of memory,
/// an empty hugetlb pool, a poisoned page).
fn region_error(op: &'static str, addr: u64, len: u64, e: MemoryBackendError) -> BackendError {
    BackendError {
        transient: e.is_transient(),
        ..backend_error(op, addr, len, e)
    }
}

impl HotplugMemory {
    /// Wraps `region`, placed at the guest address of its layout, with KVM slots numbered from
    /// `first_slot`, each `slot_size` bytes. `mem` is the devices' guest memory handle; its
    /// current regions are taken as boot RAM.
    ///
    /// # Errors
    ///
    /// [`HotplugError::SlotSize`] when `slot_size` is not a multiple of the region's block
    /// size, [`HotplugError::TooManySlots`] when the slot numbers would overflow; [`HotplugError::Timer`] without a timer.
    pub fn new(
        region: Arc<MemoryRegion>,
        slot_size: u64,
        first_slot: u32,
        memslots: Arc<dyn Memslots>,
        mem: GuestMemoryHandle,
    ) -> Result<Self, HotplugError> {
        if slot_size == 0 || slot_size % region.block_size() != 0 {
            return Err(HotplugError::SlotSize {
                slot_size,
                block_size: region.block_size(),
            });
        }
        let nr_slots = region.size().div_ceil(slot_size);
        let nr = u32::try_from(nr_slots)
            .ok()
            .filter(|n| first_slot.checked_add(*n).is_some())
            .ok_or(HotplugError::TooManySlots(nr_slots))?;
        let boot = boot_regions(mem.memory().deref())?;
        let region_addr = region.layout().addr();
        Ok(HotplugMemory {
            region,
            region_addr,
            slot_size,
            first_slot,
            slot_plugged: vec![0; nr as usize],
            slot_registered: vec![false; nr as usize],
            registered_gauge: Arc::new(AtomicU64::new(0)),
            memslots,
            mem,
            boot,
            max_runs: default_max_runs(),
            plugged: BTreeMap::new(),
            release_timer: TimerFd::new().map_err(|e| HotplugError::Timer(e.into()))?,
        })
    }

    /// Readable once idle KVM slots are due for release: the owner of the request thread
    /// polls it and then calls [`HotplugMemory::on_release_timer`]. The descriptor is
    /// open as long as this `HotplugMemory` lives.
    pub fn release_timer(&self) -> RawFd {
        self.release_timer.as_raw_fd()
    }

    /// Handles an expired [`HotplugMemory::release_timer`]: disarms it (which also makes
    /// it unreadable), gives back memory staged ahead and removes the idle slots; returns
    /// how many slots.
    pub fn on_release_timer(&mut self) -> usize {
        if let Err(e) = self.release_timer.clear() {
            log::error!("virtio-mem: cannot disarm the KVM slot release timer: {e}");
        }
        self.discard_staged();
        self.release_idle_slots()
    }

    /// Starts the quiet period again after a plug, an unplug or staging: armed while idle
    /// slots or staged memory are left, disarmed otherwise.
    fn restart_release_timer(&mut self) {
        let result = if self.has_idle_slots() || self.region.staged_bytes() > 0 {
            self.release_timer.reset(SLOT_RELEASE_QUIET, None)
        } else {
            self.release_timer.clear()
        };
        if let Err(e) = result {
            // Slots then stay registered over inaccessible memory until the next change.
            log::error!("virtio-mem: cannot set the KVM slot release timer: {e}");
        }
    }

    /// The memory-backend region.
    pub fn region(&self) -> &Arc<MemoryRegion> {
        &self.region
    }

    /// Number of KVM slots registered now.
    pub fn registered_slots(&self) -> usize {
        self.slot_registered.iter().filter(|&&r| r).count()
    }

    /// The number of registered KVM slots, kept current for readers that must not take
    /// the hotplug memory's lock.
    pub fn registered_slots_gauge(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.registered_gauge)
    }

    fn set_registered(&mut self, idx: usize, registered: bool) {
        self.slot_registered[idx] = registered;
        let n = self.registered_slots() as u64;
        self.registered_gauge.store(n, Ordering::Relaxed);
    }

    /// True when some registered slot has no plugged block left.
    pub fn has_idle_slots(&self) -> bool {
        self.idle_slots().next().is_some()
    }

    fn idle_slots(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.slot_registered.len())
            .filter(|&i| self.slot_registered[i] && self.slot_plugged[i] == 0)
    }

    /// Removes the KVM slots that have no plugged block left; returns how many. A slot KVM
    /// refuses to remove stays registered (and idle: the next call tries again).
    ///
    /// Unplug does not do this itself: deleting a memslot makes x86 KVM drop every
    /// stage-2 mapping of the VM (not just the slot's), so the guest faults its whole
    /// working set back in. Done once per 128 MiB memory block while the guest offlines
    /// block after block, that doubled unplug latency in the nested test host. The caller
    /// runs this once the guest has gone quiet; until then the slot maps only
    /// inaccessible (PROT_NONE, discarded) memory, so the guest still gets no host memory
    /// through it, and a block plugged again meanwhile reuses the slot.
    pub fn release_idle_slots(&mut self) -> usize {
        let idle: Vec<usize> = self.idle_slots().collect();
        let t = std::time::Instant::now();
        let mut removed = 0;
        for &idx in &idle {
            if self.remove_slot(idx, idx as u64 * self.slot_size) {
                self.set_registered(idx, false);
                removed += 1;
            }
        }
        if !idle.is_empty() {
            debug!(
                "virtio-mem: {removed} of {} idle KVM slots removed in {:?}",
                idle.len(),
                t.elapsed()
            );
        }
        removed
    }

    /// Bytes plugged now.
    pub fn plugged_bytes(&self) -> u64 {
        self.plugged.values().sum()
    }

    /// Faults in ahead, and leaves inaccessible, up to `max` bytes of the lowest unplugged
    /// blocks, so that the guest's next plugs only change protection; at most
    /// [`STAGE_AHEAD_MAX`] is staged at a time, and never more than `requested` minus
    /// what is plugged. Gives staged memory back once `requested` is plugged. Does
    /// nothing without populate. Returns the bytes staged by this call: 0 when nothing is
    /// left to stage (or staging failed, which is logged: the plugs then populate as
    /// usual).
    pub fn stage_ahead(&mut self, requested: u64, max: u64) -> u64 {
        let Some(opts) = self.region.populate_options() else {
            return 0;
        };
        // The guest's vCPUs go on adding the memory meanwhile: leave them cores.
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        let opts = memory_backend::PopulateOptions {
            threads: std::num::NonZeroUsize::new((cores / 2).max(1)),
            ..opts.clone()
        };
        let plugged = self.plugged_bytes();
        if requested <= plugged {
            self.discard_staged();
            return 0;
        }
        let staged = self.region.staged_bytes();
        let mut left = (requested - plugged)
            .min(STAGE_AHEAD_MAX)
            .saturating_sub(staged)
            .min(max);
        let mut done = 0;
        // The unplugged ranges, region offsets, lowest first.
        let mut at = 0;
        let mut gaps = Vec::new();
        for (&gpa, &len) in &self.plugged {
            let start = gpa - self.region_addr;
            if at < start {
                gaps.push((at, start));
            }
            at = start + len;
        }
        gaps.push((at, self.region.size()));
        'gaps: for (mut s, e) in gaps {
            while s < e && left > 0 {
                let len = left.min(e - s);
                match self.region.stage(s, len, &opts) {
                    Ok(n) => {
                        done += n;
                        left -= n;
                    }
                    Err(err) => {
                        log::warn!("virtio-mem: cannot fault memory in ahead of the guest's plug, it will be at the plug: {err}");
                        break 'gaps;
                    }
                }
                s += len;
            }
        }
        if done > 0 {
            debug!("virtio-mem: staged {done:#x} bytes ahead of the guest's plugs");
            self.restart_release_timer();
        }
        done
    }

    /// Gives back the memory staged ahead of plugs that did not come.
    pub fn discard_staged(&mut self) {
        match self.region.discard_staged() {
            Ok(0) => {}
            Ok(n) => debug!("virtio-mem: gave back {n:#x} bytes staged and not plugged"),
            Err(e) => log::error!("virtio-mem: cannot give back memory staged ahead: {e}"),
        }
    }

    /// Slot index range and per-slot overlap of a region-relative range.
    fn slot_overlaps(&self, offset: u64, len: u64) -> Vec<(usize, u64, u64)> {
        let mut out = Vec::new();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let idx = pos / self.slot_size;
            let slot_end = ((idx + 1) * self.slot_size).min(self.region.size());
            let chunk = slot_end.min(end) - pos;
            // idx < nr_slots, which fits in u32 (checked in new).
            out.push((to_usize(idx), idx * self.slot_size, chunk));
            pos += chunk;
        }
        out
    }

    fn slot_number(&self, idx: usize) -> u32 {
        // idx < nr_slots, and first_slot + nr_slots fits in u32 (checked in new).
        self.first_slot + u32::try_from(idx).unwrap_or(u32::MAX - self.first_slot)
    }

    fn add_slot(&self, idx: usize, slot_offset: u64) -> Result<(), MemslotError> {
        let size = self.slot_size.min(self.region.size() - slot_offset);
        let host = self.region.host_addr() as u64 + slot_offset;
        let (slot, gpa) = (self.slot_number(idx), self.region_addr + slot_offset);
        self.memslots
            .add(slot, gpa, size, host)
            .map_err(|source| MemslotError {
                op: "add",
                slot,
                gpa,
                source,
            })
    }

    /// Removes slot `idx` from KVM; `false` (logged) when KVM refuses, and the slot is
    /// then still registered.
    fn remove_slot(&self, idx: usize, slot_offset: u64) -> bool {
        let (slot, gpa) = (self.slot_number(idx), self.region_addr + slot_offset);
        match self.memslots.remove(slot, gpa) {
            Ok(()) => true,
            Err(source) => {
                // The slot stays registered over PROT_NONE memory: the guest still cannot
                // get host memory through it, so this costs KVM bookkeeping only.
                let e = MemslotError {
                    op: "remove",
                    slot,
                    gpa,
                    source,
                };
                log::error!("virtio-mem: {e}");
                false
            }
        }
    }

    fn insert_run(&mut self, gpa: u64, len: u64) {
        let mut start = gpa;
        let mut end = gpa + len;
        if let Some((&s, &l)) = self.plugged.range(..=gpa).next_back() {
            if s + l == gpa {
                start = s;
                self.plugged.remove(&s);
            }
        }
        if let Some(&l) = self.plugged.get(&end) {
            self.plugged.remove(&end);
            end += l;
        }
        self.plugged.insert(start, end - start);
    }

    fn remove_run(&mut self, gpa: u64, len: u64) {
        let end = gpa + len;
        let Some((&s, &l)) = self.plugged.range(..=gpa).next_back() else {
            return;
        };
        if s + l < end {
            return;
        }
        self.plugged.remove(&s);
        if s < gpa {
            self.plugged.insert(s, gpa - s);
        }
        if end < s + l {
            self.plugged.insert(end, s + l - end);
        }
    }

    /// Publishes boot RAM plus the plugged runs as the devices' guest memory; returns the
    /// map's generation.
    fn publish(&self) -> Result<u64, String> {
        let mut regions = self.boot.clone();
        regions.reserve(self.plugged.len());
        for (&gpa, &len) in &self.plugged {
            let offset = gpa - self.region_addr;
            let host = self.region.host_addr().wrapping_add(to_usize(offset));
            let size = usize::try_from(len).map_err(|e| e.to_string())?;
            // SAFETY: [host, host + size) is a plugged part of the region's reservation
            // (read-write now, populated on demand), which stays mapped as long as the
            // process lives; the MmapRegion does not own it (raw pointer: never unmapped on
            // drop). `unplug` makes a run inaccessible only after it has published a map
            // without it and waited until no snapshot of this or any older map is alive
            // (`GuestMemoryHandle::wait_for_older_snapshots`), so no device dereferences
            // it through this map once it is PROT_NONE.
            let mapping = unsafe {
                MmapRegion::build_raw(
                    host,
                    size,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                )
            }
            .map_err(|e| e.to_string())?;
            let region = GuestRegionMmap::new(mapping, GuestAddress(gpa))
                .ok_or_else(|| format!("run at {gpa:#x} overflows the address space"))?;
            regions.push(Arc::new(region));
        }
        // Boot RAM lies below the region and the runs come in address order: one sorted
        // vector, built in one pass (inserting run by run was quadratic in the runs).
        let map = GuestMemoryMmap::from_arc_regions(regions).map_err(|e| e.to_string())?;
        Ok(self.mem.publish(map))
    }

    /// Most runs of plugged memory allowed. Every run boundary inside a registered slot is
    /// a protection change, so a memory mapping of the process: a guest that plugged
    /// every other block of a large region would otherwise exhaust `vm.max_map_count`,
    /// after which every mmap of the VMM fails. A plug or unplug that would split plugged
    /// memory into more runs is answered BUSY (and shown as the host error) instead.
    pub fn max_runs(&self) -> usize {
        self.max_runs
    }

    /// Sets [`HotplugMemory::max_runs`] (default: a quarter of `vm.max_map_count`).
    pub fn set_max_runs(&mut self, max_runs: usize) {
        self.max_runs = max_runs.max(1);
    }

    /// Plugged runs now.
    pub fn runs(&self) -> usize {
        self.plugged.len()
    }

    fn runs_after_plug(&self, gpa: u64, len: u64) -> usize {
        let joins_prev = self
            .plugged
            .range(..gpa)
            .next_back()
            .is_some_and(|(&s, &l)| s + l == gpa);
        let joins_next = self.plugged.contains_key(&(gpa + len));
        (self.plugged.len() + 1) - usize::from(joins_prev) - usize::from(joins_next)
    }

    fn runs_after_unplug(&self, gpa: u64, len: u64) -> usize {
        let Some((&s, &l)) = self.plugged.range(..=gpa).next_back() else {
            return self.plugged.len();
        };
        let (left, right) = (s < gpa, gpa + len < s + l);
        (self.plugged.len() + usize::from(left && right)) - usize::from(!left && !right)
    }

    fn check_runs(
        &self,
        op: &'static str,
        gpa: u64,
        len: u64,
        after: usize,
    ) -> Result<(), BackendError> {
        if after > self.max_runs && after > self.plugged.len() {
            return Err(BackendError {
                transient: true,
                ..backend_error(
                    op,
                    gpa,
                    len,
                    format!(
                        "plugged memory would be split into {after} runs, more than the {} \
                         the VMM allows (each costs a host memory mapping; see \
                         vm.max_map_count): the guest's plugged memory is too fragmented",
                        self.max_runs
                    ),
                )
            });
        }
        Ok(())
    }

    fn offset_of(&self, op: &'static str, gpa: u64, len: u64) -> Result<u64, BackendError> {
        gpa.checked_sub(self.region_addr)
            .filter(|o| o.checked_add(len).is_some_and(|e| e <= self.region.size()))
            .ok_or_else(|| backend_error(op, gpa, len, "range outside the hotplug region"))
    }
}

impl BlockBackend for HotplugMemory {
    fn plug(&mut self, gpa: u64, len: u64) -> Result<(), BackendError> {
        let offset = self.offset_of("plug", gpa, len)?;
        self.check_runs("plug", gpa, len, self.runs_after_plug(gpa, len))?;
        let t = std::time::Instant::now();
        self.region
            .plug(offset, len)
            .map_err(|e| region_error("plug", gpa, len, e))?;
        debug!(
            "virtio-mem: plugged {len:#x} at {gpa:#x}, host memory ready in {:?}",
            t.elapsed()
        );
        let overlaps = self.slot_overlaps(offset, len);
        let mut added = Vec::new();
        for &(idx, slot_offset, _) in &overlaps {
            if !self.slot_registered[idx] {
                let t = std::time::Instant::now();
                if let Err(e) = self.add_slot(idx, slot_offset) {
                    for &(i, so) in &added {
                        // One KVM refuses to remove stays registered, idle, for
                        // release_idle_slots to retry.
                        if self.remove_slot(i, so) {
                            self.set_registered(i, false);
                        }
                    }
                    if let Err(undo) = self.region.unplug(offset, len) {
                        log::error!(
                            "virtio-mem: cannot release memory after a failed plug: {undo}"
                        );
                    }
                    self.restart_release_timer();
                    return Err(backend_error("plug", gpa, len, e));
                }
                debug!(
                    "virtio-mem: KVM slot {} added in {:?}",
                    self.slot_number(idx),
                    t.elapsed()
                );
                self.set_registered(idx, true);
                added.push((idx, slot_offset));
            }
        }
        for &(idx, _, chunk) in &overlaps {
            self.slot_plugged[idx] += chunk;
        }
        self.insert_run(gpa, len);
        if let Err(e) = self.publish() {
            // The guest can use the memory through KVM; only devices cannot see it.
            log::error!("virtio-mem: cannot update the devices' guest memory map: {e}");
        }
        self.restart_release_timer();
        Ok(())
    }

    fn unplug(&mut self, gpa: u64, len: u64) -> Result<(), BackendError> {
        let offset = self.offset_of("unplug", gpa, len)?;
        self.check_runs("unplug", gpa, len, self.runs_after_unplug(gpa, len))?;
        // Devices stop seeing the range, and the views that still show it end, before
        // the host takes it away.
        self.remove_run(gpa, len);
        let unseen = match self.publish() {
            Ok(generation) => self
                .mem
                .wait_for_older_snapshots(generation, SNAPSHOT_WAIT)
                .map_err(|e| BackendError {
                    // The views end with their round of work: the next try may pass.
                    transient: true,
                    ..backend_error("unplug", gpa, len, e)
                }),
            Err(e) => Err(backend_error("unplug", gpa, len, e)),
        };
        if let Err(e) = unseen {
            self.insert_run(gpa, len);
            if let Err(e) = self.publish() {
                log::error!("virtio-mem: cannot restore the devices' guest memory map: {e}");
            }
            return Err(e);
        }
        let t = std::time::Instant::now();
        if let Err(e) = self.region.unplug(offset, len) {
            self.insert_run(gpa, len);
            if let Err(e) = self.publish() {
                log::error!("virtio-mem: cannot restore the devices' guest memory map: {e}");
            }
            return Err(region_error("unplug", gpa, len, e));
        }
        for (idx, _, chunk) in self.slot_overlaps(offset, len) {
            self.slot_plugged[idx] = self.slot_plugged[idx].saturating_sub(chunk);
        }
        self.restart_release_timer();
        debug!(
            "virtio-mem: unplugged {len:#x} at {gpa:#x}, host memory released in {:?}",
            t.elapsed()
        );
        Ok(())
    }
}

/// Boot RAM's regions of `boot`, as shared handles (vm-memory gives them out only through
/// `remove_region`).
fn boot_regions(boot: &GuestMemoryMmap) -> Result<Vec<Arc<GuestRegionMmap>>, HotplugError> {
    let spans: Vec<(GuestAddress, u64)> = boot.iter().map(|r| (r.start_addr(), r.len())).collect();
    let mut rest = boot.clone();
    let mut out = Vec::with_capacity(spans.len());
    for (start, len) in spans {
        let (left, region) =
            rest.remove_region(start, len)
                .map_err(|source| HotplugError::BootRam {
                    addr: start.0,
                    source,
                })?;
        out.push(region);
        rest = left;
    }
    Ok(out)
}

/// The default bound on plugged runs: a quarter of the host's `vm.max_map_count` (each
/// run costs up to two memory mappings of the process, and the rest of the VMM needs
/// mappings too).
fn default_max_runs() -> usize {
    let max_map_count = std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .unwrap_or(65530);
    (max_map_count / 4).max(1)
}

const _: () = assert!(usize::BITS == 64, "the VMM runs on 64-bit hosts only");

/// Converts a host size or index; lossless on the 64-bit hosts the VMM runs on.
#[expect(
    clippy::cast_possible_truncation,
    reason = "usize is 64 bits (asserted above)"
)]
fn to_usize(v: u64) -> usize {
    v as usize
}

/// Logs the layout once, for operators.
pub fn log_layout(region: &BlockLayout, slot_size: u64) {
    info!(
        "virtio-mem region at {:#x}, size {:#x}, block {:#x}, KVM slots of {slot_size:#x}",
        region.addr(),
        region.size(),
        region.block_size()
    );
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]
mod tests {
    use super::*;
    use memory_backend::RegionConfig;
    use std::sync::Mutex;
    use vm_memory::{Bytes, GuestMemoryBackend};

    const MIB: u64 = 1 << 20;
    const BASE: u64 = 4 << 30;

    #[derive(Default)]
    struct FakeSlots {
        live: Mutex<BTreeMap<u32, (u64, u64)>>,
        fail_next_add: Mutex<bool>,
        fail_next_remove: Mutex<bool>,
    }

    impl Memslots for FakeSlots {
        fn add(&self, slot: u32, gpa: u64, size: u64, _host: u64) -> Result<(), std::io::Error> {
            if std::mem::take(&mut *self.fail_next_add.lock().unwrap()) {
                return Err(std::io::Error::other("injected"));
            }
            assert!(self
                .live
                .lock()
                .unwrap()
                .insert(slot, (gpa, size))
                .is_none());
            Ok(())
        }
        fn remove(&self, slot: u32, gpa: u64) -> Result<(), std::io::Error> {
            if std::mem::take(&mut *self.fail_next_remove.lock().unwrap()) {
                return Err(std::io::Error::other("injected"));
            }
            let (g, _) = self.live.lock().unwrap().remove(&slot).unwrap();
            assert_eq!(g, gpa);
            Ok(())
        }
    }

    fn setup() -> (HotplugMemory, Arc<FakeSlots>, GuestMemoryHandle) {
        let layout = BlockLayout::new(BASE, 512 * MIB, 2 * MIB).unwrap();
        let region = Arc::new(MemoryRegion::new(RegionConfig::new(layout)).unwrap());
        let boot = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let mem = GuestMemoryHandle::new(boot);
        let slots = Arc::new(FakeSlots::default());
        let h = HotplugMemory::new(region, 128 * MIB, 10, slots.clone(), mem.clone()).unwrap();
        (h, slots, mem)
    }

    #[test]
    fn slots_follow_plugged_memory() {
        let (mut h, slots, _) = setup();
        h.plug(BASE + 126 * MIB, 4 * MIB).unwrap();
        assert_eq!(
            *slots.live.lock().unwrap(),
            BTreeMap::from([(10, (BASE, 128 * MIB)), (11, (BASE + 128 * MIB, 128 * MIB))])
        );
        h.unplug(BASE + 126 * MIB, 2 * MIB).unwrap();
        assert!(h.has_idle_slots(), "slot 10 has nothing left");
        assert_eq!(h.release_idle_slots(), 1);
        assert_eq!(h.registered_slots(), 1);
        assert!(slots.live.lock().unwrap().contains_key(&11));
        h.unplug(BASE + 128 * MIB, 2 * MIB).unwrap();
        assert_eq!(h.release_idle_slots(), 1);
        assert!(slots.live.lock().unwrap().is_empty());
        assert!(!h.has_idle_slots());
        assert_eq!(h.release_idle_slots(), 0);
    }

    fn setup_populating() -> (HotplugMemory, Arc<FakeSlots>) {
        let layout = BlockLayout::new(BASE, 512 * MIB, 2 * MIB).unwrap();
        let cfg =
            RegionConfig::new(layout).with_populate(memory_backend::PopulateOptions::default());
        let region = Arc::new(MemoryRegion::new(cfg).unwrap());
        let boot = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let slots = Arc::new(FakeSlots::default());
        let h = HotplugMemory::new(
            region,
            128 * MIB,
            10,
            slots.clone(),
            GuestMemoryHandle::new(boot),
        )
        .unwrap();
        (h, slots)
    }

    /// Stages step by step as the request thread does; returns the bytes staged.
    fn stage_all(h: &mut HotplugMemory, requested: u64) -> u64 {
        let mut total = 0;
        loop {
            let n = h.stage_ahead(requested, 16 * MIB);
            assert!(n <= 16 * MIB, "a step stages at most its size: {n:#x}");
            if n == 0 {
                return total;
            }
            total += n;
        }
    }

    #[test]
    fn the_lowest_unplugged_blocks_are_staged_ahead_inaccessible_and_slotless() {
        let (mut h, slots) = setup_populating();
        h.plug(BASE, 4 * MIB).unwrap();
        h.plug(BASE + 8 * MIB, 2 * MIB).unwrap();
        assert_eq!(stage_all(&mut h, 64 * MIB), 58 * MIB);
        assert_eq!(h.region().staged_bytes(), 58 * MIB);
        // The hole at 4 MiB first, then from 10 MiB on; all of it still unplugged.
        assert!(h.region().is_inaccessible(4 * MIB, 4 * MIB).unwrap());
        assert!(h
            .region()
            .is_inaccessible(10 * MIB, 512 * MIB - 10 * MIB)
            .unwrap());
        assert!(h.region().usage().unwrap().committed() >= 64 * MIB);
        assert_eq!(
            slots.live.lock().unwrap().len(),
            1,
            "staging registers no slot"
        );
        assert!(
            h.release_timer.is_armed().unwrap(),
            "staged memory waits for the quiet period"
        );
        // The guest plugs some of it: those blocks leave the staged memory.
        h.plug(BASE + 4 * MIB, 4 * MIB).unwrap();
        h.plug(BASE + 10 * MIB, 22 * MIB).unwrap();
        assert_eq!(h.region().staged_bytes(), 32 * MIB);
        // Nothing more to stage for this target; a target already plugged gives it back.
        assert_eq!(stage_all(&mut h, 64 * MIB), 0);
        assert_eq!(stage_all(&mut h, 32 * MIB), 0);
        assert_eq!(h.region().staged_bytes(), 0);
        let committed = h.region().usage().unwrap().committed();
        assert!(
            (32 * MIB..40 * MIB).contains(&committed),
            "only the plugged 32 MiB stay: {committed}"
        );
    }

    #[test]
    fn staging_is_bounded_and_given_back_by_the_release_timer() {
        let (mut h, _) = setup_populating();
        h.plug(BASE, 2 * MIB).unwrap();
        assert_eq!(stage_all(&mut h, 512 * MIB), STAGE_AHEAD_MAX);
        h.on_release_timer();
        assert_eq!(h.region().staged_bytes(), 0);
        assert!(h.region().usage().unwrap().committed() < 4 * MIB);
        assert!(!h.release_timer.is_armed().unwrap());
    }

    #[test]
    fn nothing_is_staged_without_populate() {
        let (mut h, _, _) = setup();
        h.plug(BASE, 2 * MIB).unwrap();
        assert_eq!(stage_all(&mut h, 64 * MIB), 0);
        assert_eq!(h.region().staged_bytes(), 0);
    }

    #[test]
    fn the_release_timer_runs_while_idle_slots_are_left() {
        let (mut h, slots, _) = setup();
        h.plug(BASE, 2 * MIB).unwrap();
        assert!(!h.release_timer.is_armed().unwrap(), "no idle slot yet");
        h.unplug(BASE, 2 * MIB).unwrap();
        assert!(h.release_timer.is_armed().unwrap(), "slot 10 is idle");
        assert_eq!(h.on_release_timer(), 1);
        assert!(!h.release_timer.is_armed().unwrap());
        assert!(slots.live.lock().unwrap().is_empty());
        // A plug that reuses the idle slot stops the quiet period.
        h.plug(BASE, 2 * MIB).unwrap();
        h.unplug(BASE, 2 * MIB).unwrap();
        h.plug(BASE + 2 * MIB, 2 * MIB).unwrap();
        assert!(!h.release_timer.is_armed().unwrap());
    }

    #[test]
    fn an_idle_slot_is_reused_and_maps_no_host_memory() {
        let (mut h, slots, mem) = setup();
        h.plug(BASE, 2 * MIB).unwrap();
        mem.memory().write_obj(0x5au8, GuestAddress(BASE)).unwrap();
        h.unplug(BASE, 2 * MIB).unwrap();
        assert_eq!(
            h.registered_slots(),
            1,
            "removal waits for release_idle_slots"
        );
        assert_eq!(
            h.region().usage().unwrap().committed(),
            0,
            "memory released at once"
        );
        assert!(mem.memory().read_obj::<u8>(GuestAddress(BASE)).is_err());
        // A plug before the release reuses the registered slot: no second add.
        h.plug(BASE + 2 * MIB, 2 * MIB).unwrap();
        assert_eq!(slots.live.lock().unwrap().len(), 1);
        assert!(!h.has_idle_slots());
        assert_eq!(h.release_idle_slots(), 0);
    }

    #[test]
    fn devices_see_exactly_plugged_memory() {
        let (mut h, _, mem) = setup();
        h.plug(BASE, 4 * MIB).unwrap();
        h.plug(BASE + 4 * MIB, 2 * MIB).unwrap();
        let m = mem.memory();
        assert_eq!(m.num_regions(), 2, "adjacent runs merge");
        m.write_obj(0xabu8, GuestAddress(BASE + 6 * MIB - 1))
            .unwrap();
        assert!(m.write_obj(0u8, GuestAddress(BASE + 6 * MIB)).is_err());
        drop(m);
        h.unplug(BASE + 2 * MIB, 2 * MIB).unwrap();
        let m = mem.memory();
        assert_eq!(m.num_regions(), 3, "the run split in two");
        assert!(m.read_obj::<u8>(GuestAddress(BASE + 3 * MIB)).is_err());
        assert_eq!(
            m.read_obj::<u8>(GuestAddress(BASE + 6 * MIB - 1)).unwrap(),
            0xab
        );
    }

    #[test]
    fn a_refused_memslot_fails_the_plug_and_releases_memory() {
        let (mut h, slots, mem) = setup();
        *slots.fail_next_add.lock().unwrap() = true;
        let e = h.plug(BASE, 2 * MIB).unwrap_err();
        assert!(e.to_string().contains("KVM memslot"), "{e}");
        assert_eq!(h.registered_slots(), 0);
        assert_eq!(h.region().usage().unwrap().committed(), 0);
        assert_eq!(mem.memory().num_regions(), 1);
        h.plug(BASE, 2 * MIB).unwrap();
    }

    #[derive(Debug, Clone)]
    enum Op {
        Plug(u64, u64),
        Unplug(u64, u64),
        Release,
        FailNextAdd,
        FailNextRemove,
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        // 512 MiB region: 256 blocks of 2 MiB in 4 slots of 128 MiB.
        prop_oneof![
            3 => (0u64..256, 1u64..80).prop_map(|(b, n)| Op::Plug(b, n)),
            3 => (0u64..256, 1u64..80).prop_map(|(b, n)| Op::Unplug(b, n)),
            2 => Just(Op::Release),
            1 => Just(Op::FailNextAdd),
            2 => Just(Op::FailNextRemove),
        ]
    }

    /// Every copy of plugged state agrees with a model of plugged blocks: the runs, the
    /// per-slot byte counts, the slots KVM has, and the map devices see.
    fn check(h: &HotplugMemory, slots: &FakeSlots, mem: &GuestMemoryHandle, model: &[bool]) {
        let block = 2 * MIB;
        let mut runs = BTreeMap::new();
        let mut i = 0;
        while i < model.len() {
            if model[i] {
                let start = i;
                while i < model.len() && model[i] {
                    i += 1;
                }
                runs.insert(BASE + start as u64 * block, (i - start) as u64 * block);
            } else {
                i += 1;
            }
        }
        assert_eq!(h.plugged, runs, "plugged runs");
        let live = slots.live.lock().unwrap();
        for (idx, &plugged) in h.slot_plugged.iter().enumerate() {
            let per_slot = to_usize(128 * MIB / block);
            let want = model[idx * per_slot..(idx + 1) * per_slot]
                .iter()
                .filter(|&&p| p)
                .count() as u64
                * block;
            assert_eq!(plugged, want, "bytes plugged in slot {idx}");
            let number = h.slot_number(idx);
            assert_eq!(
                h.slot_registered[idx],
                live.contains_key(&number),
                "slot {idx}"
            );
            assert!(
                plugged == 0 || h.slot_registered[idx],
                "slot {idx} plugged, not in KVM"
            );
        }
        assert_eq!(
            h.registered_slots_gauge().load(Ordering::Relaxed),
            live.len() as u64,
            "the lock-free slot count follows KVM"
        );
        let m = mem.memory();
        let seen: BTreeMap<u64, u64> = m
            .iter()
            .filter(|r| r.start_addr().0 >= BASE)
            .map(|r| (r.start_addr().0, r.len()))
            .collect();
        assert_eq!(seen, runs, "devices' map");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
        #[test]
        fn plugged_state_has_one_truth_under_failures(ops in proptest::collection::vec(op(), 1..60)) {
            let (mut h, slots, mem) = setup();
            let mut model = vec![false; 256];
            for op in ops {
                match op {
                    Op::Plug(b, n) | Op::Unplug(b, n) => {
                        let n = n.min(256 - b);
                        let range = to_usize(b)..to_usize(b + n);
                        let plug = matches!(op, Op::Plug(..));
                        // The device only asks for wholly unplugged (plug) or wholly
                        // plugged (unplug) ranges.
                        if model[range.clone()].contains(&plug) {
                            continue;
                        }
                        let (gpa, len) = (BASE + b * 2 * MIB, n * 2 * MIB);
                        let r = if plug { h.plug(gpa, len) } else { h.unplug(gpa, len) };
                        if r.is_ok() {
                            model[range].fill(plug);
                        }
                    }
                    Op::Release => {
                        h.release_idle_slots();
                    }
                    Op::FailNextAdd => *slots.fail_next_add.lock().unwrap() = true,
                    Op::FailNextRemove => *slots.fail_next_remove.lock().unwrap() = true,
                }
                check(&h, &slots, &mem, &model);
            }
            // Unplugged memory is inaccessible in the host.
            for (b, &p) in model.iter().enumerate() {
                if !p {
                    let offset = b as u64 * 2 * MIB;
                    proptest::prop_assert!(h.region().is_inaccessible(offset, 2 * MIB).unwrap());
                }
            }
        }
    }

    #[test]
    fn ranges_outside_the_region_are_refused() {
        let (mut h, _, _) = setup();
        assert!(h.plug(BASE - 2 * MIB, 2 * MIB).is_err());
        assert!(h.plug(BASE + 512 * MIB, 2 * MIB).is_err());
        assert!(h.unplug(u64::MAX - MIB, 2 * MIB).is_err());
    }
}
