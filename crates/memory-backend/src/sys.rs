//! Thin wrappers over the Linux system calls this crate uses.
//!
//! Each wrapper turns the C return convention into `io::Result`. Calls that change what
//! memory at an address means (protection, contents, mappings) are `unsafe fn`s: the
//! caller must own the address range and guarantee that no Rust reference points into it.
//! Calls on file descriptors only are safe.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::OnceLock;

/// The base page size of the host (`sysconf(_SC_PAGESIZE)`), 4 KiB when unknown.
pub(crate) fn base_page_size() -> u64 {
    static PAGE: OnceLock<u64> = OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf has no memory-safety preconditions.
        let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        u64::try_from(v)
            .ok()
            .filter(|v| v.is_power_of_two())
            .unwrap_or(4096)
    })
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Reserves `len` bytes of address space aligned to `align` (a power of two), with
/// `PROT_NONE` and `MAP_NORESERVE`, so nothing is committed. Over-reserves by `align`
/// and unmaps the unaligned head and tail.
pub(crate) fn reserve_aligned(len: usize, align: usize) -> io::Result<NonNull<u8>> {
    let page = usize::try_from(base_page_size()).unwrap_or(4096);
    let extra = if align > page { align } else { 0 };
    let total = len
        .checked_add(extra)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
    // SAFETY: a fresh anonymous mapping at an address chosen by the kernel cannot alias
    // anything we or anyone else owns; we check the result below.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            total,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let start = raw as usize;
    if extra == 0 {
        return NonNull::new(raw.cast()).ok_or_else(|| io::Error::from_raw_os_error(libc::EFAULT));
    }
    // `align` is a power of two, so this rounds up without overflow: start + total fits.
    let aligned = (start + align - 1) & !(align - 1);
    let head = aligned - start;
    let tail = total - head - len;
    if head > 0 {
        // SAFETY: [start, start+head) is part of the mapping we just created and nothing
        // else refers to it.
        unsafe { libc::munmap(raw, head) };
    }
    if tail > 0 {
        // SAFETY: [aligned+len, aligned+len+tail) is the end of our fresh mapping.
        unsafe { libc::munmap((aligned + len) as *mut libc::c_void, tail) };
    }
    NonNull::new(aligned as *mut u8).ok_or_else(|| io::Error::from_raw_os_error(libc::EFAULT))
}

/// Maps `fd` at file offset `off` over `[addr, addr+len)` with `MAP_SHARED | MAP_FIXED |
/// MAP_NORESERVE` and the given protection.
///
/// # Safety
///
/// The caller owns `[addr, addr+len)` (it is part of a reservation of its own) and no Rust
/// reference points into it: whatever was mapped there is replaced.
pub(crate) unsafe fn map_fd_fixed(
    addr: NonNull<u8>,
    len: usize,
    prot: libc::c_int,
    fd: BorrowedFd<'_>,
    off: u64,
) -> io::Result<()> {
    let off = libc::off_t::try_from(off).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: the caller guarantees exclusive ownership of the range (see # Safety).
    let raw = unsafe {
        libc::mmap(
            addr.as_ptr().cast(),
            len,
            prot,
            libc::MAP_SHARED | libc::MAP_FIXED | libc::MAP_NORESERVE,
            fd.as_raw_fd(),
            off,
        )
    };
    if raw == libc::MAP_FAILED {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Replaces `[addr, addr+len)` with fresh anonymous `PROT_NONE | MAP_NORESERVE` memory,
/// dropping whatever was mapped (and, for private anonymous memory, committed) there.
///
/// # Safety
///
/// As for [`map_fd_fixed`].
pub(crate) unsafe fn map_none_fixed(addr: NonNull<u8>, len: usize) -> io::Result<()> {
    // SAFETY: the caller guarantees exclusive ownership of the range (see # Safety).
    let raw = unsafe {
        libc::mmap(
            addr.as_ptr().cast(),
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Unmaps `[addr, addr+len)`.
///
/// # Safety
///
/// The caller owns the range and nothing uses it afterwards.
pub(crate) unsafe fn unmap(addr: NonNull<u8>, len: usize) -> io::Result<()> {
    // SAFETY: see # Safety.
    check(unsafe { libc::munmap(addr.as_ptr().cast(), len) })
}

/// `mprotect(addr, len, prot)`.
///
/// # Safety
///
/// The caller owns the range and no Rust reference points into it (removing access under
/// a live reference would turn a later safe access into a fault).
pub(crate) unsafe fn protect(addr: NonNull<u8>, len: usize, prot: libc::c_int) -> io::Result<()> {
    // SAFETY: see # Safety.
    check(unsafe { libc::mprotect(addr.as_ptr().cast(), len, prot) })
}

/// `madvise(addr, len, advice)`.
///
/// # Safety
///
/// The caller owns the range and no Rust reference points into it: advice such as
/// `MADV_DONTNEED` or `MADV_REMOVE` destroys the contents.
pub(crate) unsafe fn advise(addr: NonNull<u8>, len: usize, advice: libc::c_int) -> io::Result<()> {
    // SAFETY: see # Safety.
    check(unsafe { libc::madvise(addr.as_ptr().cast(), len, advice) })
}

/// `fallocate(fd, mode, off, len)`.
pub(crate) fn fallocate(
    fd: BorrowedFd<'_>,
    mode: libc::c_int,
    off: u64,
    len: u64,
) -> io::Result<()> {
    let einval = || io::Error::from_raw_os_error(libc::EINVAL);
    let off = libc::off_t::try_from(off).map_err(|_| einval())?;
    let len = libc::off_t::try_from(len).map_err(|_| einval())?;
    // SAFETY: fallocate only acts on the file behind a valid, borrowed descriptor.
    check(unsafe { libc::fallocate(fd.as_raw_fd(), mode, off, len) })
}

/// `memfd_create(name, flags)`.
pub(crate) fn memfd_create(name: &CStr, flags: libc::c_uint) -> io::Result<OwnedFd> {
    // SAFETY: `name` is a valid NUL-terminated string; the call creates a new descriptor.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `fstat(fd)`.
pub(crate) fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `st` is a valid out-pointer for one `struct stat`.
    check(unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: fstat succeeded, so it initialized `st`.
    Ok(unsafe { st.assume_init() })
}

/// `fstatfs(fd)`.
pub(crate) fn fstatfs(fd: BorrowedFd<'_>) -> io::Result<libc::statfs> {
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: `st` is a valid out-pointer for one `struct statfs`.
    check(unsafe { libc::fstatfs(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: fstatfs succeeded, so it initialized `st`.
    Ok(unsafe { st.assume_init() })
}

/// Whether the running kernel knows `MADV_POPULATE_WRITE` (Linux 5.14+). Probed once on a
/// private one-page mapping: an unknown advice gives `EINVAL`.
pub(crate) fn populate_write_supported() -> bool {
    static SUPPORTED: OnceLock<bool> = OnceLock::new();
    *SUPPORTED.get_or_init(|| {
        let page = usize::try_from(base_page_size()).unwrap_or(4096);
        // SAFETY: fresh private anonymous mapping chosen by the kernel; checked below.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return false;
        }
        // SAFETY: `raw` is our own one-page mapping, not referenced by anything.
        let ok = unsafe { libc::madvise(raw, page, libc::MADV_POPULATE_WRITE) } == 0;
        // SAFETY: unmapping our own probe mapping.
        unsafe { libc::munmap(raw, page) };
        ok
    })
}
