//! The host's hugetlb pools: reading and (as root) resizing them.
//!
//! A hugetlb backing takes its pages from the pool of its size
//! (`/sys/kernel/mm/hugepages/hugepages-<size>kB/nr_hugepages`; for the default 2 MiB
//! size this is the same knob as `/proc/sys/vm/nr_hugepages`). Regions map with
//! `MAP_NORESERVE`, so the pool is only drawn on when blocks are populated; an empty pool
//! then shows as [`MemoryBackendError::HugetlbPoolExhausted`](crate::MemoryBackendError).
//!
//! [`PoolGuard`] resizes a pool for a test or benchmark and puts the old size back on drop.

use std::io;

use crate::backing::HugePageSize;

/// The counters of one hugetlb pool, in pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStatus {
    /// `nr_hugepages`: persistent pool size.
    pub total: u64,
    /// `free_hugepages`: pages not in use (some may be reserved).
    pub free: u64,
    /// `resv_hugepages`: free pages promised to mappings without `MAP_NORESERVE`.
    pub reserved: u64,
    /// `surplus_hugepages`: pages above the persistent size.
    pub surplus: u64,
}

impl PoolStatus {
    /// Free pages that nobody has reserved.
    pub fn available(&self) -> u64 {
        self.free.saturating_sub(self.reserved)
    }
}

fn read_counter(size: HugePageSize, name: &str) -> io::Result<u64> {
    let path = format!("{}/{name}", size.sysfs_dir());
    let text = std::fs::read_to_string(&path)?;
    text.trim().parse().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{path}: not a number: {text:?}"),
        )
    })
}

/// Reads the pool of `size`.
///
/// # Errors
///
/// The I/O error when the sysfs files are missing (kernel or CPU without that size).
pub fn pool_status(size: HugePageSize) -> io::Result<PoolStatus> {
    Ok(PoolStatus {
        total: read_counter(size, "nr_hugepages")?,
        free: read_counter(size, "free_hugepages")?,
        reserved: read_counter(size, "resv_hugepages")?,
        surplus: read_counter(size, "surplus_hugepages")?,
    })
}

/// Sets the persistent pool size of `size` to `pages` (root only) and returns the size
/// the kernel reached (it may allocate fewer pages when memory is fragmented).
///
/// # Errors
///
/// The I/O error when writing is refused.
pub fn set_pool_size(size: HugePageSize, pages: u64) -> io::Result<u64> {
    std::fs::write(size.nr_hugepages_path(), format!("{pages}\n"))?;
    read_counter(size, "nr_hugepages")
}

/// A resized hugetlb pool that gets its old size back when dropped.
#[derive(Debug)]
pub struct PoolGuard {
    size: HugePageSize,
    original: u64,
}

impl PoolGuard {
    /// Grows the pool of `size` so that at least `pages` pages are available.
    ///
    /// # Errors
    ///
    /// The I/O error when the pool cannot be read or written, or `OutOfMemory` when the
    /// kernel could not allocate enough pages (the old size is restored first).
    pub fn ensure_available(size: HugePageSize, pages: u64) -> io::Result<Self> {
        let st = pool_status(size)?;
        let guard = Self {
            size,
            original: st.total,
        };
        let missing = pages.saturating_sub(st.available());
        if missing > 0 {
            set_pool_size(size, st.total + missing)?;
        }
        let now = pool_status(size)?;
        if now.available() < pages {
            return Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                format!(
                    "asked for {pages} free {size} hugetlb pages, the kernel could only provide {}",
                    now.available()
                ),
            ));
        }
        Ok(guard)
    }

    /// Resizes the pool of `size` so that exactly `pages` pages are available (for
    /// exhaustion tests).
    ///
    /// # Errors
    ///
    /// As for [`PoolGuard::ensure_available`].
    pub fn exactly_available(size: HugePageSize, pages: u64) -> io::Result<Self> {
        let st = pool_status(size)?;
        let guard = Self {
            size,
            original: st.total,
        };
        let in_use_or_reserved = st.total.saturating_sub(st.available());
        set_pool_size(size, in_use_or_reserved + pages)?;
        let now = pool_status(size)?;
        if now.available() != pages {
            return Err(io::Error::other(format!(
                "asked for exactly {pages} free {size} hugetlb pages, the pool has {}",
                now.available()
            )));
        }
        Ok(guard)
    }

    /// The page size of the pool.
    pub fn size(&self) -> HugePageSize {
        self.size
    }
}

impl Drop for PoolGuard {
    fn drop(&mut self) {
        if let Err(e) = set_pool_size(self.size, self.original) {
            log::warn!(
                "could not restore the {} hugetlb pool to {} pages: {e}",
                self.size,
                self.original
            );
        }
    }
}
