//! The error type of region operations.
//!
//! Variants are split by what the caller does about them: invalid ranges are caller bugs
//! (the device answers ERROR only if the guest asked for them, and it validates first),
//! resource exhaustion is transient (the device answers BUSY and the guest retries), and
//! anything else carries the failing operation and the OS error.

use std::io;

use crate::backing::HugePageSize;

/// Errors from creating a [`MemoryRegion`](crate::MemoryRegion) or plugging and
/// unplugging ranges of it.
#[derive(Debug, thiserror::Error)]
pub enum MemoryBackendError {
    /// The range is empty.
    #[error("empty range at region offset {offset:#x}: length must be a non-zero multiple of the block size")]
    EmptyRange {
        /// Region-relative start of the range.
        offset: u64,
    },
    /// The range does not start or end on a multiple of its unit: the block size for plug
    /// and unplug, the backing's page size for a discard of free pages.
    #[error("range at offset {offset:#x} length {len:#x} is not aligned to {unit:#x} bytes (the block size for plug and unplug, the page size for a discard of free pages)")]
    UnalignedRange {
        /// Start of the range (region-relative, or the address for boot RAM).
        offset: u64,
        /// Length of the range.
        len: u64,
        /// The alignment it needs.
        unit: u64,
    },
    /// `offset + len` overflows a 64-bit number.
    #[error("range at region offset {offset:#x} length {len:#x} overflows")]
    RangeOverflow {
        /// Region-relative start of the range.
        offset: u64,
        /// Length of the range.
        len: u64,
    },
    /// The range ends past the end of the region.
    #[error(
        "range at region offset {offset:#x} length {len:#x} leaves the region of size {size:#x}"
    )]
    RangeOutsideRegion {
        /// Region-relative start of the range.
        offset: u64,
        /// Length of the range.
        len: u64,
        /// Size of the region.
        size: u64,
    },
    /// The host ran out of memory while populating (transient: retry later).
    #[error("host out of memory populating region offset {offset:#x} length {len:#x}")]
    OutOfMemory {
        /// Region-relative start of the chunk that failed.
        offset: u64,
        /// Length of the chunk that failed.
        len: u64,
    },
    /// The hugetlb pool has no free page of the backing's size (transient: the operator
    /// can raise the pool size).
    #[error(
        "hugetlb pool of {page_size} pages exhausted populating region offset {offset:#x} length {len:#x}; \
         raise {}", page_size.nr_hugepages_path()
    )]
    HugetlbPoolExhausted {
        /// The huge page size of the backing.
        page_size: HugePageSize,
        /// Region-relative start of the chunk that failed.
        offset: u64,
        /// Length of the chunk that failed.
        len: u64,
    },
    /// A page in the range is hardware-poisoned (`EHWPOISON`).
    #[error("hardware-poisoned memory in region offset {offset:#x} length {len:#x}")]
    HardwarePoison {
        /// Region-relative start of the chunk that failed.
        offset: u64,
        /// Length of the chunk that failed.
        len: u64,
    },
    /// The region configuration is invalid.
    #[error("invalid region configuration: {0}")]
    InvalidConfig(String),
    /// The discard method does not apply to this backing kind.
    #[error("discard method {method:?} does not apply to backing {backing}")]
    UnsupportedDiscard {
        /// The method asked for.
        method: crate::DiscardMethod,
        /// The backing kind.
        backing: String,
    },
    /// A system call failed during region setup.
    #[error("{op} failed: {source}")]
    Os {
        /// The operation that failed, e.g. "memfd_create".
        op: &'static str,
        /// The OS error (use `raw_os_error()` for the errno).
        #[source]
        source: io::Error,
    },
    /// A system call on a range of the region failed.
    #[error("{op} on region offset {offset:#x} length {len:#x} failed: {source}")]
    OsRange {
        /// The operation that failed, e.g. "mprotect(PROT_READ|PROT_WRITE)".
        op: &'static str,
        /// Region-relative start of the range.
        offset: u64,
        /// Length of the range.
        len: u64,
        /// The OS error (use `raw_os_error()` for the errno).
        #[source]
        source: io::Error,
    },
}

impl MemoryBackendError {
    /// The errno behind this error, if it came from the OS.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Os { source, .. } | Self::OsRange { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    /// Whether the failure is transient host trouble (memory exhaustion or poison), for
    /// which the device answers BUSY rather than ERROR.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::OutOfMemory { .. }
                | Self::HugetlbPoolExhausted { .. }
                | Self::HardwarePoison { .. }
        )
    }
}

/// Classifies an error from populating (`MADV_POPULATE_WRITE` or `fallocate`) a chunk.
///
/// `hugetlb` is the backing's huge page size if it is hugetlb-backed. On hugetlb,
/// `MADV_POPULATE_WRITE` reports an empty pool as `EFAULT` (the fault would have been a
/// SIGBUS) and `fallocate` reports it as `ENOSPC`; elsewhere `ENOMEM` is out of memory
/// and `EHWPOISON` a poisoned page.
pub(crate) fn classify_populate_error(
    op: &'static str,
    source: io::Error,
    hugetlb: Option<HugePageSize>,
    offset: u64,
    len: u64,
) -> MemoryBackendError {
    match (source.raw_os_error(), hugetlb) {
        (Some(libc::EHWPOISON), _) => MemoryBackendError::HardwarePoison { offset, len },
        (Some(libc::EFAULT | libc::ENOSPC | libc::ENOMEM), Some(page_size)) => {
            MemoryBackendError::HugetlbPoolExhausted {
                page_size,
                offset,
                len,
            }
        }
        (Some(libc::ENOMEM), None) => MemoryBackendError::OutOfMemory { offset, len },
        _ => MemoryBackendError::OsRange {
            op,
            offset,
            len,
            source,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(errno: i32) -> io::Error {
        io::Error::from_raw_os_error(errno)
    }

    #[test]
    fn enomem_is_out_of_memory() {
        let e = classify_populate_error("populate", err(libc::ENOMEM), None, 0, 4096);
        assert!(matches!(
            e,
            MemoryBackendError::OutOfMemory {
                offset: 0,
                len: 4096
            }
        ));
        assert!(e.is_transient());
    }

    #[test]
    fn ehwpoison_is_hardware_poison() {
        for huge in [None, Some(HugePageSize::Size2M)] {
            let e = classify_populate_error("populate", err(libc::EHWPOISON), huge, 8192, 4096);
            assert!(matches!(
                e,
                MemoryBackendError::HardwarePoison {
                    offset: 8192,
                    len: 4096
                }
            ));
        }
    }

    #[test]
    fn hugetlb_fault_or_nospace_is_pool_exhausted() {
        for errno in [libc::EFAULT, libc::ENOSPC, libc::ENOMEM] {
            let e = classify_populate_error(
                "populate",
                err(errno),
                Some(HugePageSize::Size1G),
                0,
                1 << 30,
            );
            assert!(matches!(
                e,
                MemoryBackendError::HugetlbPoolExhausted {
                    page_size: HugePageSize::Size1G,
                    ..
                }
            ));
            assert!(
                e.to_string().contains("hugepages-1048576kB/nr_hugepages"),
                "{e}"
            );
        }
    }

    #[test]
    fn other_errors_keep_op_and_errno() {
        let e = classify_populate_error(
            "madvise(MADV_POPULATE_WRITE)",
            err(libc::EFAULT),
            None,
            0,
            4096,
        );
        assert_eq!(e.errno(), Some(libc::EFAULT));
        assert!(!e.is_transient());
        assert!(e.to_string().contains("MADV_POPULATE_WRITE"), "{e}");
    }
}
