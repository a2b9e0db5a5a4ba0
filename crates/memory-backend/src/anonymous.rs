//! Host memory the VMM maps as plain private anonymous memory (boot RAM, which vm-memory
//! then views), rather than through a [`MemoryRegion`](crate::MemoryRegion): mapping it
//! so that the guest's huge pages can be the host's ([`map_guest_ram`]), and giving back
//! what the guest reported free ([`discard`]).

use std::ptr::NonNull;

use crate::error::MemoryBackendError;
use crate::sys;

/// Page size free ranges of private anonymous memory must be aligned to.
pub const PAGE_SIZE: u64 = 4096;

/// Discards `len` bytes at `addr` of a private anonymous mapping (`MADV_DONTNEED`): the
/// host frees the pages and the range reads as zeros until the guest touches it again.
///
/// # Errors
///
/// [`MemoryBackendError::Os`] when `madvise` refuses (the range is left as it was), or
/// [`MemoryBackendError::UnalignedRange`] when `addr` or `len` is not page-aligned.
///
/// # Safety
///
/// `[addr, addr + len)` lies inside one private anonymous mapping the caller owns for at
/// least the duration of the call, no Rust reference points into it (only volatile
/// accesses, as vm-memory's are), and nobody needs its contents any more.
pub unsafe fn discard(addr: NonNull<u8>, len: usize) -> Result<(), MemoryBackendError> {
    let a = addr.as_ptr() as u64;
    let l = u64::try_from(len).unwrap_or(u64::MAX);
    if a % PAGE_SIZE != 0 || l % PAGE_SIZE != 0 || l == 0 {
        return Err(MemoryBackendError::UnalignedRange {
            offset: a,
            len: l,
            unit: PAGE_SIZE,
        });
    }
    // SAFETY: the caller guarantees the range is its own unreferenced private anonymous
    // memory whose contents are no longer needed (see # Safety).
    unsafe { sys::advise(addr, len, libc::MADV_DONTNEED) }.map_err(|source| {
        MemoryBackendError::Os {
            op: "madvise(MADV_DONTNEED) of guest RAM",
            source,
        }
    })
}

/// Maps `len` bytes of private anonymous memory for guest RAM the way a guest's memory
/// is best served: aligned to the host's transparent huge page size, so that every
/// aligned 2 MiB of guest-physical memory is an aligned 2 MiB of host memory, and advised
/// `MADV_HUGEPAGE`. KVM maps guest memory with huge pages only where both hold; without
/// them every first touch by the guest (its page tables, the memmap it writes for
/// hotplugged memory) is a fault of its own, each an exit in a nested host.
///
/// Nothing is committed up front (`MAP_NORESERVE`); if the host refuses the advice the
/// memory still works, with base pages.
///
/// The mapping is never unmapped: guest RAM lives as long as the VMM process, and the
/// views of it that vm-memory builds from a raw pointer cannot tell when the last one is
/// gone. Call it once per boot RAM range.
///
/// # Errors
///
/// [`MemoryBackendError::Os`] when the host cannot map or protect the range (out of
/// address space or the mapping limit, `vm.max_map_count`).
pub fn map_guest_ram(len: usize) -> Result<NonNull<u8>, MemoryBackendError> {
    let align = crate::accounting::thp_size()
        .ok()
        .and_then(|t| usize::try_from(t).ok())
        .filter(|t| t.is_power_of_two())
        .unwrap_or(2 << 20);
    let base = sys::reserve_aligned(len, align).map_err(|source| MemoryBackendError::Os {
        op: "mmap(PROT_NONE, MAP_NORESERVE) of guest RAM",
        source,
    })?;
    // SAFETY: `[base, base + len)` is the fresh reservation above, which nothing else knows
    // about; making it readable and writable changes no memory anyone refers to.
    unsafe { sys::protect(base, len, libc::PROT_READ | libc::PROT_WRITE) }.map_err(|source| {
        MemoryBackendError::Os {
            op: "mprotect(PROT_READ|PROT_WRITE) of guest RAM",
            source,
        }
    })?;
    // SAFETY: our own fresh private anonymous mapping; MADV_HUGEPAGE only changes how
    // future faults are served, never contents or access.
    if let Err(e) = unsafe { sys::advise(base, len, libc::MADV_HUGEPAGE) } {
        log::debug!("memory-backend: MADV_HUGEPAGE on guest RAM refused ({e}); base pages");
    }
    Ok(base)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discarded_memory_reads_zero_and_is_freed() {
        let len = 64 * 4096usize;
        // smaps accounts whole mappings, and the kernel merges a fresh anonymous mapping
        // with any compatible neighbour (other tests' threads map memory too). A
        // PROT_NONE page on each side keeps ours a mapping of its own.
        // SAFETY: a fresh private anonymous mapping nothing else knows about.
        let outer = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len + 2 * 4096,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(outer, libc::MAP_FAILED);
        // SAFETY: one page into the mapping above, `len` bytes, still inside it.
        let p = unsafe { outer.cast::<u8>().add(4096) }.cast::<libc::c_void>();
        // SAFETY: `[p, p+len)` lies inside our own mapping.
        let rc = unsafe { libc::mprotect(p, len, libc::PROT_READ | libc::PROT_WRITE) };
        assert_eq!(rc, 0);
        let base = NonNull::new(p.cast::<u8>()).unwrap();
        // SAFETY: inside the mapping above.
        unsafe { base.as_ptr().write_bytes(0xa5, len) };
        let len64 = u64::try_from(len).unwrap();
        let before = crate::accounting::range_usage(p as u64, len64).unwrap();
        assert!(before.rss >= len64, "{before:?}");
        // SAFETY: our own mapping, unreferenced, contents unneeded.
        unsafe { discard(base, len) }.unwrap();
        let after = crate::accounting::range_usage(p as u64, len64).unwrap();
        assert_eq!(after.rss, 0, "{after:?}");
        // SAFETY: inside the mapping, which is still readable.
        assert_eq!(unsafe { base.as_ptr().add(len / 2).read_volatile() }, 0);
        // Unaligned ranges are refused and leave the memory alone.
        // SAFETY: inside the mapping; refused before any system call.
        unsafe { base.as_ptr().write_bytes(1, 8) };
        // SAFETY: as above.
        let e = unsafe { discard(NonNull::new(base.as_ptr().add(1)).unwrap(), 4096) };
        assert!(matches!(e, Err(MemoryBackendError::UnalignedRange { .. })));
        // SAFETY: inside the mapping.
        assert_eq!(unsafe { base.as_ptr().read_volatile() }, 1);
        // SAFETY: unmapping what we mapped; nothing refers to it.
        assert_eq!(unsafe { libc::munmap(outer, len + 2 * 4096) }, 0);
    }

    #[test]
    fn guest_ram_is_aligned_writable_and_advised_for_huge_pages() {
        let len = 8 << 20;
        let base = map_guest_ram(len).unwrap();
        let align = crate::accounting::thp_size().unwrap_or(2 << 20);
        assert_eq!(
            base.as_ptr() as u64 % align,
            0,
            "{base:p} not {align:#x}-aligned"
        );
        // SAFETY: inside the mapping just made, which is never unmapped.
        unsafe {
            base.as_ptr().write_volatile(7);
            base.as_ptr().add(len - 1).write_volatile(9);
            assert_eq!(base.as_ptr().read_volatile(), 7);
            assert_eq!(base.as_ptr().add(len - 1).read_volatile(), 9);
        }
        // The advice shows as the `hg` flag of the mapping that holds it in smaps (the
        // kernel may have merged ours with a like neighbour).
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let addr = base.as_ptr() as u64;
        let holds = |l: &str| {
            let range = l.split_whitespace().next().unwrap_or("");
            let Some((a, b)) = range.split_once('-') else {
                return false;
            };
            match (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                (Ok(a), Ok(b)) => a <= addr && addr < b,
                _ => false,
            }
        };
        let flags = smaps
            .lines()
            .skip_while(|l| !holds(l))
            .find_map(|l| l.strip_prefix("VmFlags:"))
            .unwrap_or_else(|| panic!("no smaps entry holds {base:p}"));
        assert!(flags.split_whitespace().any(|f| f == "hg"), "{flags}");
    }
}
