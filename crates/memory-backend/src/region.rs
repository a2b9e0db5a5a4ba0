//! The hotplug region: one reservation, plugged and unplugged in block-aligned ranges.
//!
//! At creation the whole region is reserved with `PROT_NONE | MAP_NORESERVE` (for file
//! backings the file is mapped `MAP_SHARED` over the reservation, still `PROT_NONE`), so
//! the host commits nothing. The start address is aligned to the block size, which is at
//! least the backing's page size.
//!
//! - [`MemoryRegion::plug`] makes a range readable and writable (`mprotect`) and, when
//!   populate is on, faults it in over several threads. If populating fails (out of
//!   memory, empty hugetlb pool, poisoned page) the range is discarded and protected
//!   again before the typed error is returned: nothing is left half-plugged.
//! - [`MemoryRegion::unplug`] first removes access (`mprotect(PROT_NONE)`), then discards
//!   the memory the right way for the backing. Protecting first closes the window in
//!   which another thread (a vCPU through KVM) could fault a page back in after the
//!   discard and leave it committed in an inaccessible range. If the discard fails, the
//!   range is made accessible again, so a block the device still counts as plugged is
//!   never inaccessible.
//! - [`MemoryRegion::stage`] faults an unplugged range in ahead of its plug and leaves it
//!   inaccessible (`PROT_NONE` keeps the pages): a later plug of it only changes its
//!   protection. [`MemoryRegion::discard_staged`] gives back what was staged and never
//!   plugged. The guest sees no difference: a staged range faults like any unplugged one.
//!
//! Offsets are region-relative and equal to file offsets for file backings (which is
//! what a vhost-user peer needs).

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::ptr::NonNull;
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::accounting::{self, AccountingError, MemoryUsage};
use crate::backing::{Backing, BackingKind, DiscardMethod, Store};
use crate::error::MemoryBackendError;
use crate::populate::{self, PopulateOptions, PopulateReport, Target};
use crate::runs::Runs;
use crate::sys;
use block_layout::{BlockLayout, LayoutError};

const RW: libc::c_int = libc::PROT_READ | libc::PROT_WRITE;

/// How to build a [`MemoryRegion`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionConfig {
    /// Size and block size (the guest address is the caller's; the region only keeps
    /// it). The block size is the granularity of plug and unplug and the alignment of
    /// the host address, and must be at least the backing's page size.
    pub layout: BlockLayout,
    /// Where the memory comes from.
    pub backing: Backing,
    /// Populate on plug with these options (`None`: plug only changes protection and the
    /// guest faults pages in on first touch).
    pub populate: Option<PopulateOptions>,
    /// Advise transparent huge pages (`MADV_HUGEPAGE`) on private anonymous backing.
    pub transparent_hugepages: bool,
}

impl RegionConfig {
    /// Private anonymous backing with THP advice and without populate.
    pub fn new(layout: BlockLayout) -> Self {
        Self {
            layout,
            backing: Backing::default(),
            populate: None,
            transparent_hugepages: true,
        }
    }

    /// Sets the backing.
    #[must_use]
    pub fn with_backing(mut self, backing: Backing) -> Self {
        self.backing = backing;
        self
    }

    /// [`RegionConfig::new`] for a region that no guest address goes with (tools and
    /// tests): `size` bytes in blocks of `block_size`, laid out from 0.
    ///
    /// # Errors
    ///
    /// The [`LayoutError`] of `size` and `block_size`.
    pub fn sized(size: u64, block_size: u64) -> Result<Self, LayoutError> {
        Ok(Self::new(BlockLayout::new(0, size, block_size)?))
    }

    /// Turns populate on plug on with `opts`.
    #[must_use]
    pub fn with_populate(mut self, opts: PopulateOptions) -> Self {
        self.populate = Some(opts);
        self
    }
}

/// A reserved hotplug region whose blocks are plugged and unplugged in host memory.
///
/// ```
/// use memory_backend::{MemoryRegion, PopulateOptions, RegionConfig};
///
/// let cfg = RegionConfig::sized(64 << 20, 2 << 20).unwrap().with_populate(PopulateOptions::default());
/// let region = MemoryRegion::new(cfg)?;
/// region.plug(4 << 20, 8 << 20)?; // accessible and faulted in
/// assert!(region.usage().unwrap().committed() >= 8 << 20);
/// region.unplug(4 << 20, 8 << 20)?; // discarded and inaccessible again
/// # Ok::<(), memory_backend::MemoryBackendError>(())
/// ```
///
/// # Thread safety
///
/// `MemoryRegion` is `Send + Sync`: the VMM may plug from a worker thread while vCPU
/// threads run. Plug and unplug take `&self` and are serialized by an internal lock, so a
/// populate that touches pages never races with an unplug that protects them; the
/// region never creates Rust references into its memory.
#[derive(Debug)]
pub struct MemoryRegion {
    base: NonNull<u8>,
    layout: BlockLayout,
    len: usize,
    store: Store,
    populate: Option<PopulateOptions>,
    transparent_hugepages: bool,
    /// Serializes plug, unplug and staging (a populate that touches pages must never run
    /// while another call removes access to them), and guards the staged runs: unplugged
    /// ranges faulted in ahead of their plug, region offsets.
    op_lock: Mutex<Runs>,
}

// SAFETY: `MemoryRegion` owns its mapping; the only non-Send/Sync field is `base`, a raw
// pointer to that mapping. The type never hands out references into the mapping (only
// the address as a raw pointer, whose users take on the obligations of dereferencing it),
// and touches the memory itself only in populate under `op_lock`. Every other operation
// is a system call on an address range, which the kernel serializes per process
// (mmap lock), so moving the region to another thread or calling `plug`/`unplug` from
// several threads at once is sound; `op_lock` orders those calls so that a touching
// populate never runs concurrently with an unplug of the same pages.
unsafe impl Send for MemoryRegion {}
// SAFETY: see the `Send` impl: all `&self` methods are syscalls on owned ranges or run
// under `op_lock`.
unsafe impl Sync for MemoryRegion {}

impl MemoryRegion {
    /// Reserves the region and opens its backing.
    ///
    /// # Errors
    ///
    /// [`MemoryBackendError::InvalidConfig`] for a bad size or block size,
    /// [`MemoryBackendError::Os`] when opening the backing or mapping fails.
    pub fn new(cfg: RegionConfig) -> Result<Self, MemoryBackendError> {
        let invalid = |m: String| Err(MemoryBackendError::InvalidConfig(m));
        // Power of two, non-zero multiple: the layout holds them.
        let (size, block_size) = (cfg.layout.size(), cfg.layout.block_size());
        let (Ok(len), Ok(align)) = (usize::try_from(size), usize::try_from(block_size)) else {
            return invalid(format!(
                "region size {:#x} does not fit the address space",
                size
            ));
        };
        let store = Store::open(&cfg.backing, size)?;
        let kind = store.kind();
        if block_size < kind.page_size() {
            return invalid(format!(
                "block size {:#x} is smaller than the page size {:#x} of the {kind} backing",
                block_size,
                kind.page_size()
            ));
        }
        let os = |op| move |source| MemoryBackendError::Os { op, source };
        // Align to the block size (>= page size); for THP-advised anonymous memory at
        // least to the THP size too, so every huge-page-sized block can be one THP.
        let align = if kind == BackingKind::PrivateAnonymous && cfg.transparent_hugepages {
            let thp = accounting::thp_size()
                .ok()
                .and_then(|t| usize::try_from(t).ok());
            align.max(thp.unwrap_or(align))
        } else {
            align
        };
        let base = sys::reserve_aligned(len, align)
            .map_err(os("mmap(PROT_NONE, MAP_NORESERVE) reservation"))?;
        let region = Self {
            base,
            layout: cfg.layout,
            len,
            store,
            populate: cfg.populate,
            transparent_hugepages: cfg.transparent_hugepages,
            op_lock: Mutex::new(Runs::default()),
        };
        // From here on, dropping `region` unmaps the reservation.
        if let Some(file) = region.store.file() {
            // SAFETY: [base, base+len) is the reservation we just made; nothing refers
            // to it. The file is at least `size` long (Store::open).
            unsafe { sys::map_fd_fixed(base, len, libc::PROT_NONE, file.as_fd(), 0) }
                .map_err(os("mmap(MAP_SHARED|MAP_FIXED) of the backing file"))?;
            if matches!(cfg.backing, Backing::File(_)) {
                // A region starts fully unplugged: drop what an existing file held.
                sys::fallocate(file.as_fd(), punch_hole_mode(), 0, size)
                    .map_err(os("fallocate(PUNCH_HOLE) of the backing file at creation"))?;
            }
        } else {
            region.advise_thp(base, len);
        }
        log::info!(
            "memory-backend: reserved {:#x} bytes at {:p}, block size {:#x}, backing {kind}",
            size,
            base,
            block_size
        );
        Ok(region)
    }

    /// The region's layout, as it was given (its guest address is the caller's).
    pub fn layout(&self) -> BlockLayout {
        self.layout
    }

    /// Host virtual address of region offset 0 (for KVM memslots: `userspace_addr`).
    ///
    /// Dereferencing it is only valid for plugged ranges, and is the caller's
    /// responsibility (the region never creates references into its memory).
    pub fn host_addr(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    /// Region size in bytes (`memory_size` of a memslot covering it all).
    pub fn size(&self) -> u64 {
        self.layout.size()
    }

    /// Block size in bytes: the plug/unplug granularity.
    pub fn block_size(&self) -> u64 {
        self.layout.block_size()
    }

    /// The backing's page size.
    pub fn page_size(&self) -> u64 {
        self.store.kind().page_size()
    }

    /// The resolved backing kind.
    pub fn backing_kind(&self) -> BackingKind {
        self.store.kind()
    }

    /// The backing file (memfd or path), whose offsets equal region offsets; `None` for
    /// private anonymous memory.
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.store.file().map(File::as_fd)
    }

    /// Whether plug populates.
    pub fn populate_options(&self) -> Option<&PopulateOptions> {
        self.populate.as_ref()
    }

    /// Checks a region-relative range and returns its host address and length.
    ///
    /// # Errors
    ///
    /// [`MemoryBackendError::EmptyRange`], [`MemoryBackendError::RangeOverflow`],
    /// [`MemoryBackendError::UnalignedRange`] or [`MemoryBackendError::RangeOutsideRegion`].
    pub fn check_range(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<(NonNull<u8>, usize), MemoryBackendError> {
        if len == 0 {
            return Err(MemoryBackendError::EmptyRange { offset });
        }
        let end = offset
            .checked_add(len)
            .ok_or(MemoryBackendError::RangeOverflow { offset, len })?;
        if offset % self.layout.block_size() != 0 || len % self.layout.block_size() != 0 {
            return Err(MemoryBackendError::UnalignedRange {
                offset,
                len,
                unit: self.layout.block_size(),
            });
        }
        if end > self.layout.size() {
            return Err(MemoryBackendError::RangeOutsideRegion {
                offset,
                len,
                size: self.layout.size(),
            });
        }
        // Both fit usize because end <= size, which fits usize (checked in new()).
        let (off, l) = (to_usize(offset), to_usize(len));
        // base + off stays inside our mapping, so it is non-null and does not wrap.
        let ptr = NonNull::new(self.base.as_ptr().wrapping_add(off))
            .ok_or(MemoryBackendError::RangeOverflow { offset, len })?;
        Ok((ptr, l))
    }

    fn lock(&self) -> MutexGuard<'_, Runs> {
        // The guarded state is the mapping itself, which every operation leaves
        // consistent or rolls back; a panic elsewhere does not invalidate it.
        self.op_lock.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Plugs `[offset, offset+len)`: makes it accessible and, if the region was configured
    /// to populate, faults it in.
    ///
    /// # Errors
    ///
    /// Range errors (see [`MemoryRegion::check_range`]); [`MemoryBackendError::OutOfMemory`],
    /// [`MemoryBackendError::HugetlbPoolExhausted`] or [`MemoryBackendError::HardwarePoison`]
    /// when populating fails (the range is then unplugged again); `OsRange` otherwise.
    pub fn plug(&self, offset: u64, len: u64) -> Result<(), MemoryBackendError> {
        let opts = self.populate.clone();
        self.plug_with(offset, len, opts.as_ref()).map(|_| ())
    }

    /// Plugs a range with explicit populate options (`None`: no populate), overriding the
    /// region's configuration; returns what populate did.
    ///
    /// # Errors
    ///
    /// As for [`MemoryRegion::plug`].
    pub fn plug_with(
        &self,
        offset: u64,
        len: u64,
        populate: Option<&PopulateOptions>,
    ) -> Result<Option<PopulateReport>, MemoryBackendError> {
        let (ptr, l) = self.check_range(offset, len)?;
        let mut staged = self.lock();
        // SAFETY: the range is inside our mapping (check_range) and the region never
        // creates references into it; making it accessible cannot invalidate anything.
        unsafe { sys::protect(ptr, l, RW) }.map_err(|source| MemoryBackendError::OsRange {
            op: "mprotect(PROT_READ|PROT_WRITE)",
            offset,
            len,
            source,
        })?;
        // Plugged now: what was staged in it is the guest's.
        let end = offset + len;
        let unstaged = staged.gaps(offset, end);
        staged.remove(offset, end);
        let Some(opts) = populate else {
            return Ok(None);
        };
        let mut report = None;
        for (s, e) in unstaged {
            // SAFETY: [s, e) is inside the range, which is inside the region, was just
            // made RW, and stays so until populate returns because we hold `op_lock`; no
            // references point into it.
            match unsafe { populate::populate(&self.target(), s, e - s, opts) } {
                Ok(r) => report = Some(r),
                Err(e) => {
                    log::warn!("memory-backend: populate failed, unplugging the range again: {e}");
                    let method = self.store.kind().default_discard();
                    if let Err(rollback) =
                        self.unplug_locked(offset, len, ptr, l, method, Restore::Unplugged)
                    {
                        log::error!("memory-backend: rollback of a failed plug failed: {rollback}");
                    }
                    return Err(e);
                }
            }
        }
        // All of it staged: populated before, by the same options' method.
        Ok(Some(report.unwrap_or(PopulateReport {
            threads: 0,
            method: populate::resolve(opts.method),
        })))
    }

    fn target(&self) -> Target<'_> {
        Target {
            base: self.base.as_ptr() as usize,
            page_size: self.page_size(),
            hugetlb: self.store.kind().hugetlb(),
            file: self.store.file(),
        }
    }

    /// Faults the parts of `[offset, offset+len)` that are not staged yet in with `opts`
    /// and leaves them inaccessible, so that a later [`MemoryRegion::plug`] of them only
    /// changes their protection; returns how many bytes it staged. Staged memory counts
    /// as the host's until it is plugged or [`MemoryRegion::discard_staged`] gives it
    /// back (an unplug of a range also drops what was staged in it).
    ///
    /// The range must be unplugged: staging a plugged range takes it away from the guest.
    ///
    /// # Errors
    ///
    /// As for [`MemoryRegion::plug`]; a range that failed to populate is discarded again,
    /// what was staged before the failure stays staged.
    pub fn stage(
        &self,
        offset: u64,
        len: u64,
        opts: &PopulateOptions,
    ) -> Result<u64, MemoryBackendError> {
        self.check_range(offset, len)?;
        let mut staged = self.lock();
        let mut done = 0;
        for (s, e) in staged.gaps(offset, offset + len) {
            let (ptr, l) = self.check_range(s, e - s)?;
            let fail = |op| {
                move |source| MemoryBackendError::OsRange {
                    op,
                    offset: s,
                    len: e - s,
                    source,
                }
            };
            // SAFETY: the range is inside our mapping (check_range) and the region never
            // creates references into it; making it accessible cannot invalidate anything.
            unsafe { sys::protect(ptr, l, RW) }.map_err(fail("mprotect(PROT_READ|PROT_WRITE)"))?;
            // SAFETY: [s, e) is inside the region, was just made RW and stays so until
            // populate returns because we hold `op_lock`; no references point into it.
            let populated = unsafe { populate::populate(&self.target(), s, e - s, opts) };
            // SAFETY: the range is unplugged (the caller's promise), so it was
            // inaccessible when this call began and nobody can have used it since: no
            // reference, and no device view of guest memory (which holds plugged ranges
            // only), points into it.
            let protected = unsafe { sys::protect(ptr, l, libc::PROT_NONE) }
                .map_err(fail("mprotect(PROT_NONE)"));
            if let Err(err) = populated.and(protected) {
                let method = self.store.kind().default_discard();
                if let Err(discard) =
                    self.unplug_locked(s, e - s, ptr, l, method, Restore::Unplugged)
                {
                    log::error!(
                        "memory-backend: cannot discard a range that failed to stage: {discard}"
                    );
                }
                return Err(err);
            }
            staged.insert(s, e);
            done += e - s;
        }
        Ok(done)
    }

    /// Bytes staged by [`MemoryRegion::stage`] and neither plugged nor discarded since.
    pub fn staged_bytes(&self) -> u64 {
        self.lock().bytes()
    }

    /// Gives back all staged memory (it stays inaccessible); returns how many bytes.
    ///
    /// # Errors
    ///
    /// `OsRange` when a discard fails; the runs not discarded stay staged.
    pub fn discard_staged(&self) -> Result<u64, MemoryBackendError> {
        let mut staged = self.lock();
        let mut done = 0;
        let runs: Vec<(u64, u64)> = staged.iter().collect();
        for (s, e) in runs {
            let (ptr, l) = self.check_range(s, e - s)?;
            let method = self.store.kind().default_discard();
            self.unplug_locked(s, e - s, ptr, l, method, Restore::Unplugged)?;
            staged.remove(s, e);
            done += e - s;
        }
        Ok(done)
    }

    /// Unplugs `[offset, offset+len)`: removes access, then gives the memory back with
    /// the backing's discard method (see [`BackingKind::default_discard`]).
    ///
    /// # Errors
    ///
    /// Range errors (see [`MemoryRegion::check_range`]); `OsRange` when a system call
    /// fails (the range is then accessible again, as before the call).
    pub fn unplug(&self, offset: u64, len: u64) -> Result<(), MemoryBackendError> {
        self.unplug_with(offset, len, self.store.kind().default_discard())
    }

    /// Unplugs a range with an explicit discard method (for benchmarks and experiments).
    ///
    /// # Errors
    ///
    /// As for [`MemoryRegion::unplug`], plus [`MemoryBackendError::UnsupportedDiscard`]
    /// when the method does not free memory of this backing kind.
    pub fn unplug_with(
        &self,
        offset: u64,
        len: u64,
        method: DiscardMethod,
    ) -> Result<(), MemoryBackendError> {
        let kind = self.store.kind();
        if !kind.discard_methods().contains(&method) {
            return Err(MemoryBackendError::UnsupportedDiscard {
                method,
                backing: kind.to_string(),
            });
        }
        let (ptr, l) = self.check_range(offset, len)?;
        let mut staged = self.lock();
        self.unplug_locked(offset, len, ptr, l, method, Restore::Plugged)?;
        staged.remove(offset, offset + len);
        Ok(())
    }

    /// Gives back the host memory behind `[offset, offset+len)` of a range that stays
    /// plugged, because the guest reported it free (free page reporting): the range keeps
    /// its access and reads as zeros (private anonymous) or as a hole (memfd, shmem,
    /// hugetlb, file) afterwards, and faults fresh memory in on the next touch.
    ///
    /// The range needs only page alignment (the backing's page: whole huge pages for
    /// hugetlb), not block alignment. The caller makes sure it is plugged and that the
    /// guest no longer needs its contents.
    ///
    /// # Errors
    ///
    /// [`MemoryBackendError::EmptyRange`], [`MemoryBackendError::RangeOverflow`],
    /// [`MemoryBackendError::UnalignedRange`] (naming the page size),
    /// [`MemoryBackendError::RangeOutsideRegion`], or `OsRange` when the system call fails
    /// (nothing is discarded then).
    pub fn discard_free(&self, offset: u64, len: u64) -> Result<(), MemoryBackendError> {
        let page = self.page_size();
        if len == 0 {
            return Err(MemoryBackendError::EmptyRange { offset });
        }
        let end = offset
            .checked_add(len)
            .ok_or(MemoryBackendError::RangeOverflow { offset, len })?;
        if offset % page != 0 || len % page != 0 {
            return Err(MemoryBackendError::UnalignedRange {
                offset,
                len,
                unit: page,
            });
        }
        if end > self.layout.size() {
            return Err(MemoryBackendError::RangeOutsideRegion {
                offset,
                len,
                size: self.layout.size(),
            });
        }
        let (off, l) = (to_usize(offset), to_usize(len));
        let ptr = NonNull::new(self.base.as_ptr().wrapping_add(off))
            .ok_or(MemoryBackendError::RangeOverflow { offset, len })?;
        let fail = |op| {
            move |source| MemoryBackendError::OsRange {
                op,
                offset,
                len,
                source,
            }
        };
        // Serialised with plug and unplug, so a discard never lands between an unplug's
        // protection change and its own discard, or inside a populate.
        let _guard = self.lock();
        match self.store.file() {
            // SAFETY: the range is inside our private anonymous mapping (checked above)
            // and the region holds no references into it; the caller vouches that the
            // guest reported it free, so zeroing it loses nothing anyone needs.
            None => unsafe { sys::advise(ptr, l, libc::MADV_DONTNEED) }
                .map_err(fail("madvise(MADV_DONTNEED)")),
            Some(file) => sys::fallocate(file.as_fd(), punch_hole_mode(), offset, len)
                .map_err(fail("fallocate(PUNCH_HOLE|KEEP_SIZE)")),
        }
    }

    /// Unplugs the whole region (VM reset).
    ///
    /// # Errors
    ///
    /// As for [`MemoryRegion::unplug`].
    pub fn unplug_all(&self) -> Result<(), MemoryBackendError> {
        self.unplug(0, self.layout.size())
    }

    /// Unplug with `op_lock` held and the range checked; `restore` is the access the
    /// range gets back when the discard fails.
    fn unplug_locked(
        &self,
        offset: u64,
        len: u64,
        ptr: NonNull<u8>,
        l: usize,
        method: DiscardMethod,
        restore: Restore,
    ) -> Result<(), MemoryBackendError> {
        let fail = |op| {
            move |source| MemoryBackendError::OsRange {
                op,
                offset,
                len,
                source,
            }
        };
        if method == DiscardMethod::MapFixedNone {
            // SAFETY: the range is inside our private anonymous mapping (check_range,
            // method checked against the kind) and unreferenced; replacing it with a
            // fresh PROT_NONE mapping discards and protects in one step.
            unsafe { sys::map_none_fixed(ptr, l) }.map_err(fail("mmap(MAP_FIXED, PROT_NONE)"))?;
            self.advise_thp(ptr, l);
            return Ok(());
        }
        // SAFETY: the range is inside our mapping and the region holds no references
        // into it; the caller (the device) has stopped using the range.
        unsafe { sys::protect(ptr, l, libc::PROT_NONE) }.map_err(fail("mprotect(PROT_NONE)"))?;
        let discarded = match (method, self.store.file()) {
            // SAFETY: as above; discarding the contents of an unplugged range is the point.
            (DiscardMethod::MadvDontneed, _) => unsafe { sys::advise(ptr, l, libc::MADV_DONTNEED) }
                .map_err(fail("madvise(MADV_DONTNEED)")),
            (DiscardMethod::MadvRemove, Some(_)) => {
                // SAFETY: as above; MADV_REMOVE punches the hole through the shared mapping.
                let r = unsafe { sys::advise(ptr, l, libc::MADV_REMOVE) };
                r.map_err(fail("madvise(MADV_REMOVE)"))
            }
            (DiscardMethod::PunchHole, Some(file)) => {
                sys::fallocate(file.as_fd(), punch_hole_mode(), offset, len)
                    .map_err(fail("fallocate(PUNCH_HOLE|KEEP_SIZE)"))
            }
            (m, _) => Err(MemoryBackendError::UnsupportedDiscard {
                method: m,
                backing: self.store.kind().to_string(),
            }),
        };
        if let Err(e) = discarded {
            if restore == Restore::Plugged {
                // Still plugged as far as the device knows: make it usable again.
                // SAFETY: as above; restoring the access the range had before this call.
                if let Err(restore) = unsafe { sys::protect(ptr, l, RW) } {
                    log::error!(
                        "memory-backend: could not restore access after a failed discard: {restore}"
                    );
                }
            }
            return Err(e);
        }
        Ok(())
    }

    fn advise_thp(&self, ptr: NonNull<u8>, l: usize) {
        if !self.transparent_hugepages || self.store.kind() != BackingKind::PrivateAnonymous {
            return;
        }
        // SAFETY: the range is inside our private anonymous mapping; MADV_HUGEPAGE only
        // changes how future faults are served, never contents or access.
        if let Err(e) = unsafe { sys::advise(ptr, l, libc::MADV_HUGEPAGE) } {
            log::debug!("memory-backend: MADV_HUGEPAGE refused ({e}); continuing with base pages");
        }
    }

    /// What the host holds for this region now: smaps figures over the region's address
    /// range, and the backing file's allocated bytes.
    ///
    /// # Errors
    ///
    /// [`AccountingError`] when procfs or fstat fail.
    pub fn usage(&self) -> Result<RegionUsage, AccountingError> {
        let mapping = accounting::range_usage(self.base.as_ptr() as u64, self.layout.size())?;
        let file_allocated = match self.fd() {
            Some(fd) => Some(accounting::file_allocated_bytes(fd)?),
            None => None,
        };
        Ok(RegionUsage {
            kind: self.store.kind(),
            mapping,
            file_allocated,
        })
    }

    /// Whether no byte of `[offset, offset+len)` is readable, writable or executable
    /// (from `/proc/self/maps`).
    ///
    /// # Errors
    ///
    /// [`RangeAccessError::Range`] for an invalid range, [`RangeAccessError::Accounting`]
    /// when `/proc/self/maps` cannot be read.
    pub fn is_inaccessible(&self, offset: u64, len: u64) -> Result<bool, RangeAccessError> {
        self.check_range(offset, len)
            .map_err(RangeAccessError::Range)?;
        let start = (self.base.as_ptr() as u64).saturating_add(offset);
        let maps =
            accounting::range_protections(start, len).map_err(RangeAccessError::Accounting)?;
        Ok(maps.iter().all(|m| !m.accessible()))
    }
}

/// What a range is to the device when its discard fails, and so the access it keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Restore {
    /// Plugged (an unplug the device asked for): accessible again.
    Plugged,
    /// Unplugged (a failed plug or stage, staged memory): inaccessible.
    Unplugged,
}

/// Errors of [`MemoryRegion::is_inaccessible`].
#[derive(Debug, thiserror::Error)]
pub enum RangeAccessError {
    /// The range is invalid.
    #[error(transparent)]
    Range(MemoryBackendError),
    /// `/proc/self/maps` could not be read.
    #[error(transparent)]
    Accounting(AccountingError),
}

impl Drop for MemoryRegion {
    fn drop(&mut self) {
        // SAFETY: we own [base, base+len) and `&mut self` proves no other user of the
        // region is left; the region never handed out references into it.
        if let Err(e) = unsafe { sys::unmap(self.base, self.len) } {
            log::error!("memory-backend: munmap of the region failed: {e}");
        }
    }
}

/// A region's memory figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionUsage {
    /// The backing kind, which decides what [`RegionUsage::committed`] reads.
    pub kind: BackingKind,
    /// smaps figures summed over the region's mappings.
    pub mapping: MemoryUsage,
    /// The backing file's allocated bytes (`st_blocks * 512`), for file backings.
    pub file_allocated: Option<u64>,
}

impl RegionUsage {
    /// The bytes the host holds for the region: `Anonymous` for private anonymous
    /// memory; for file backings the larger of the file's allocated bytes (pages that
    /// stay in a shared file even when unmapped) and what is mapped (`Rss`, or the
    /// hugetlb figures).
    pub fn committed(&self) -> u64 {
        match self.kind {
            BackingKind::PrivateAnonymous => self.mapping.anonymous,
            BackingKind::Hugetlb(_) => self.file_allocated.unwrap_or(0).max(self.mapping.hugetlb()),
            BackingKind::Shmem | BackingKind::RegularFile => {
                self.file_allocated.unwrap_or(0).max(self.mapping.rss)
            }
        }
    }
}

fn punch_hole_mode() -> libc::c_int {
    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
}

fn to_usize(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::HugePageSize;
    use std::num::NonZeroUsize;

    const MIB: u64 = 1 << 20;

    fn region() -> MemoryRegion {
        MemoryRegion::new(RegionConfig::sized(64 * MIB, 2 * MIB).unwrap()).unwrap()
    }

    #[test]
    fn region_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<MemoryRegion>();
    }

    #[test]
    fn reservation_is_aligned_inaccessible_and_uncommitted() {
        let r = MemoryRegion::new(RegionConfig::sized(64 * MIB, 32 * MIB).unwrap()).unwrap();
        assert_eq!(r.host_addr() as u64 % (32 * MIB), 0);
        assert_eq!(r.size(), 64 * MIB);
        assert!(r.is_inaccessible(0, r.size()).unwrap());
        assert_eq!(r.usage().unwrap().committed(), 0);
    }

    #[test]
    fn discard_free_gives_back_pages_of_a_plugged_range_and_keeps_it_plugged() {
        for backing in [Backing::PrivateAnonymous, Backing::SharedMemfd] {
            let r = MemoryRegion::new(
                RegionConfig::sized(8 * MIB, 2 * MIB)
                    .unwrap()
                    .with_backing(backing.clone()),
            )
            .unwrap();
            r.plug(0, 4 * MIB).unwrap();
            // SAFETY: the first 4 MiB were just plugged read-write; the region outlives this.
            unsafe { r.host_addr().write_bytes(7, to_usize(4 * MIB)) };
            let before = r.usage().unwrap().committed();
            assert!(before >= 4 * MIB, "{backing:?}: {before}");
            // Page-aligned, not block-aligned: 1 MiB inside the first block.
            r.discard_free(MIB, MIB).unwrap();
            let after = r.usage().unwrap().committed();
            assert_eq!(before - after, MIB, "{backing:?}");
            assert!(
                !r.is_inaccessible(0, 4 * MIB).unwrap(),
                "{backing:?}: still plugged"
            );
            // SAFETY: inside the plugged range, which stays read-write.
            let (zeroed, kept) = unsafe {
                (
                    r.host_addr().add(to_usize(MIB)).read_volatile(),
                    r.host_addr().add(to_usize(2 * MIB)).read_volatile(),
                )
            };
            assert_eq!((zeroed, kept), (0, 7), "{backing:?}");
            // The read faulted a page of shmem back in: count from here.
            let after = r.usage().unwrap().committed();
            for (off, len) in [
                (100, 4096),
                (0, 100),
                (0, 0),
                (8 * MIB, 4096),
                (u64::MAX, 4096),
            ] {
                assert!(
                    r.discard_free(off, len).is_err(),
                    "{backing:?} {off:#x}+{len:#x}"
                );
            }
            assert_eq!(r.usage().unwrap().committed(), after, "{backing:?}");
        }
    }

    #[test]
    fn empty_range_is_refused() {
        assert!(matches!(
            region().plug(2 * MIB, 0),
            Err(MemoryBackendError::EmptyRange { offset: 0x20_0000 })
        ));
    }

    #[test]
    fn unaligned_ranges_are_refused() {
        let r = region();
        for (off, len) in [(4096, 2 * MIB), (0, 2 * MIB + 4096), (MIB, MIB)] {
            assert!(
                matches!(
                    r.plug(off, len),
                    Err(MemoryBackendError::UnalignedRange {
                        unit: 0x20_0000,
                        ..
                    })
                ),
                "plug {off:#x}+{len:#x}"
            );
            assert!(matches!(
                r.unplug(off, len),
                Err(MemoryBackendError::UnalignedRange { .. })
            ));
        }
    }

    #[test]
    fn ranges_outside_the_region_are_refused() {
        let r = region();
        for (off, len) in [
            (64 * MIB, 2 * MIB),
            (62 * MIB, 4 * MIB),
            (0, 66 * MIB),
            (1 << 40, 2 * MIB),
        ] {
            assert!(
                matches!(
                    r.plug(off, len),
                    Err(MemoryBackendError::RangeOutsideRegion {
                        size: 0x400_0000,
                        ..
                    })
                ),
                "plug {off:#x}+{len:#x}"
            );
            assert!(matches!(
                r.unplug(off, len),
                Err(MemoryBackendError::RangeOutsideRegion { .. })
            ));
        }
    }

    #[test]
    fn overflowing_ranges_are_refused() {
        let r = region();
        let off = u64::MAX - MIB + 1;
        assert!(matches!(
            r.plug(off, 2 * MIB),
            Err(MemoryBackendError::RangeOverflow { .. })
        ));
        assert!(matches!(
            r.unplug(2 * MIB, u64::MAX),
            Err(MemoryBackendError::RangeOverflow { .. })
        ));
    }

    #[test]
    fn refused_ranges_change_nothing() {
        let r = region();
        let _ = r.plug(62 * MIB, 4 * MIB);
        assert!(r.is_inaccessible(0, r.size()).unwrap());
    }

    #[test]
    fn a_block_below_the_page_size_is_refused() {
        // The layout rules are BlockLayout's (and tested there); the page size is the
        // backing's, known only once it is open.
        let cfg = RegionConfig::sized(64 * MIB, 4096)
            .unwrap()
            .with_backing(Backing::HugetlbMemfd(HugePageSize::Size2M));
        match MemoryRegion::new(cfg) {
            Err(MemoryBackendError::InvalidConfig(m)) => assert!(m.contains("page size"), "{m}"),
            // No hugetlbfs at all on this host: memfd_create fails before the check.
            Err(MemoryBackendError::Os { .. }) => {}
            other => panic!("expected the page-size refusal, got {other:?}"),
        }
    }

    #[test]
    fn missing_backing_file_directory_is_an_os_error() {
        let cfg = RegionConfig::sized(4 * MIB, 2 * MIB)
            .unwrap()
            .with_backing(Backing::File("/nonexistent/dir/mem".into()));
        let e = MemoryRegion::new(cfg).unwrap_err();
        assert_eq!(e.errno(), Some(libc::ENOENT), "{e}");
        assert!(e.to_string().contains("open backing file"), "{e}");
    }

    #[test]
    fn discard_method_must_fit_the_backing() {
        let r = region();
        let e = r
            .unplug_with(0, 2 * MIB, DiscardMethod::PunchHole)
            .unwrap_err();
        assert!(matches!(
            e,
            MemoryBackendError::UnsupportedDiscard {
                method: DiscardMethod::PunchHole,
                ..
            }
        ));
        let shm = MemoryRegion::new(
            RegionConfig::sized(4 * MIB, 2 * MIB)
                .unwrap()
                .with_backing(Backing::SharedMemfd),
        )
        .unwrap();
        let e = shm
            .unplug_with(0, 2 * MIB, DiscardMethod::MadvDontneed)
            .unwrap_err();
        assert!(matches!(e, MemoryBackendError::UnsupportedDiscard { .. }));
    }

    #[test]
    fn plug_and_unplug_from_several_threads() {
        let r = MemoryRegion::new(
            RegionConfig::sized(64 * MIB, 2 * MIB)
                .unwrap()
                .with_populate(PopulateOptions::default()),
        )
        .unwrap();
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let r = &r;
                s.spawn(move || {
                    for i in 0..50u64 {
                        let off = (t * 8 + i % 8) * 2 * MIB;
                        r.plug(off, 2 * MIB).unwrap();
                        r.unplug(off, 2 * MIB).unwrap();
                    }
                });
            }
        });
        assert!(r.is_inaccessible(0, r.size()).unwrap());
        assert_eq!(r.usage().unwrap().committed(), 0);
    }

    #[test]
    fn unplug_all_releases_everything() {
        let r = MemoryRegion::new(
            RegionConfig::sized(64 * MIB, 2 * MIB)
                .unwrap()
                .with_populate(PopulateOptions::default()),
        )
        .unwrap();
        r.plug(0, 16 * MIB).unwrap();
        r.plug(32 * MIB, 16 * MIB).unwrap();
        assert!(r.usage().unwrap().committed() >= 32 * MIB);
        r.unplug_all().unwrap();
        assert_eq!(r.usage().unwrap().committed(), 0);
        assert!(r.is_inaccessible(0, r.size()).unwrap());
    }

    fn populating() -> MemoryRegion {
        MemoryRegion::new(
            RegionConfig::sized(64 * MIB, 2 * MIB)
                .unwrap()
                .with_populate(PopulateOptions::default()),
        )
        .unwrap()
    }

    #[test]
    fn a_staged_range_holds_memory_but_stays_inaccessible_until_plugged() {
        let r = populating();
        let opts = PopulateOptions::with_threads(NonZeroUsize::MIN);
        assert_eq!(r.stage(8 * MIB, 8 * MIB, &opts).unwrap(), 8 * MIB);
        assert_eq!(r.staged_bytes(), 8 * MIB);
        assert!(r.usage().unwrap().committed() >= 8 * MIB);
        assert!(r.is_inaccessible(0, r.size()).unwrap());
        // Staging again only adds what was not staged.
        assert_eq!(r.stage(4 * MIB, 8 * MIB, &opts).unwrap(), 4 * MIB);
        assert_eq!(r.staged_bytes(), 12 * MIB);
        // A plug of staged memory populates nothing more and takes it out of the staged.
        let report = r.plug_with(8 * MIB, 8 * MIB, Some(&opts)).unwrap().unwrap();
        assert_eq!(report.threads, 0);
        assert_eq!(r.staged_bytes(), 4 * MIB);
        assert!(!r.is_inaccessible(8 * MIB, 8 * MIB).unwrap());
        assert!(r.is_inaccessible(4 * MIB, 4 * MIB).unwrap());
        // A plug over staged and unstaged memory populates the rest.
        let report = r.plug_with(0, 8 * MIB, Some(&opts)).unwrap().unwrap();
        assert_eq!(report.threads, 1);
        assert_eq!(r.staged_bytes(), 0);
        assert!(r.usage().unwrap().committed() >= 16 * MIB);
    }

    #[test]
    fn discarding_staged_memory_gives_it_back_and_keeps_it_inaccessible() {
        let r = populating();
        let opts = PopulateOptions::default();
        r.plug(0, 4 * MIB).unwrap();
        r.stage(16 * MIB, 8 * MIB, &opts).unwrap();
        r.stage(32 * MIB, 4 * MIB, &opts).unwrap();
        assert_eq!(r.discard_staged().unwrap(), 12 * MIB);
        assert_eq!(r.staged_bytes(), 0);
        let committed = r.usage().unwrap().committed();
        assert!(
            (4 * MIB..8 * MIB).contains(&committed),
            "only the plugged 4 MiB stay: {committed}"
        );
        assert!(r.is_inaccessible(4 * MIB, r.size() - 4 * MIB).unwrap());
        assert!(!r.is_inaccessible(0, 4 * MIB).unwrap());
    }

    #[test]
    fn an_unplug_drops_what_was_staged_in_its_range() {
        let r = populating();
        r.stage(0, 16 * MIB, &PopulateOptions::default()).unwrap();
        r.unplug_all().unwrap();
        assert_eq!(r.staged_bytes(), 0);
        assert_eq!(r.usage().unwrap().committed(), 0);
        assert_eq!(r.discard_staged().unwrap(), 0);
    }
}
