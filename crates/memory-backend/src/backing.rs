//! Backing kinds: where the memory of a region comes from and how it is given back.
//!
//! | kind | page size | discard on unplug |
//! |---|---|---|
//! | private anonymous (default) | base page, THP advised | `MADV_DONTNEED` |
//! | shared memfd / tmpfs file | base page | `fallocate(PUNCH_HOLE\|KEEP_SIZE)` |
//! | hugetlb memfd / hugetlbfs file | 2 MiB or 1 GiB | `fallocate(PUNCH_HOLE\|KEEP_SIZE)` |
//! | regular file | base page | `fallocate(PUNCH_HOLE\|KEEP_SIZE)` |
//!
//! `MADV_DONTNEED` alone does not free pages of a shared file (they stay in the page
//! cache), and `MADV_REMOVE` fails on private anonymous memory, so the method follows the
//! kind.

use std::ffi::CStr;
use std::fmt;
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use crate::error::MemoryBackendError;
use crate::sys;

/// A hugetlb page size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HugePageSize {
    /// 2 MiB pages (x86-64 PMD size).
    Size2M,
    /// 1 GiB pages (x86-64 PUD size).
    Size1G,
}

impl HugePageSize {
    /// The page size in bytes.
    pub const fn bytes(self) -> u64 {
        match self {
            Self::Size2M => 2 << 20,
            Self::Size1G => 1 << 30,
        }
    }

    /// The page size for `bytes`, if it is 2 MiB or 1 GiB.
    pub const fn from_bytes(bytes: u64) -> Option<Self> {
        match bytes {
            0x20_0000 => Some(Self::Size2M),
            0x4000_0000 => Some(Self::Size1G),
            _ => None,
        }
    }

    /// The sysfs directory of this size's pool, e.g.
    /// `/sys/kernel/mm/hugepages/hugepages-2048kB`.
    pub fn sysfs_dir(self) -> String {
        format!(
            "/sys/kernel/mm/hugepages/hugepages-{}kB",
            self.bytes() >> 10
        )
    }

    /// The file that sets the pool size for this page size.
    pub fn nr_hugepages_path(self) -> String {
        format!("{}/nr_hugepages", self.sysfs_dir())
    }

    /// The `memfd_create` flags selecting this size.
    pub(crate) const fn memfd_flags(self) -> libc::c_uint {
        libc::MFD_HUGETLB
            | match self {
                Self::Size2M => libc::MFD_HUGE_2MB,
                Self::Size1G => libc::MFD_HUGE_1GB,
            }
    }
}

impl fmt::Display for HugePageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Size2M => f.write_str("2 MiB"),
            Self::Size1G => f.write_str("1 GiB"),
        }
    }
}

/// Where a region's memory comes from (what the operator asks for).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Backing {
    /// Private anonymous memory, with `MADV_HUGEPAGE` advice (the default).
    #[default]
    PrivateAnonymous,
    /// A shared memfd (shmem), e.g. to share guest memory with a vhost-user process.
    SharedMemfd,
    /// A hugetlb memfd (`MFD_HUGETLB`) of the given page size. Pages come from the host's
    /// preallocated pool (`nr_hugepages`).
    HugetlbMemfd(HugePageSize),
    /// A file, opened read-write and created if missing: on tmpfs, hugetlbfs (page size
    /// from the mount) or a regular file system. Its first `size` bytes back the region;
    /// they are discarded when the region is created (a region starts fully unplugged).
    File(PathBuf),
}

/// The resolved kind of a region's backing, which decides page size, discard method and
/// which accounting figure shows the memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackingKind {
    /// Private anonymous memory: shows as `Anonymous` in smaps.
    PrivateAnonymous,
    /// Shared memory (memfd or a tmpfs file): shows as the file's allocated blocks and as
    /// mapped `Rss` (`Pss_Shmem` in smaps_rollup).
    Shmem,
    /// Hugetlb (memfd or a hugetlbfs file): shows as the file's allocated blocks, as
    /// `Private_Hugetlb` in smaps (`Shared_Hugetlb` once another process maps the page
    /// too) and in the pool's free count.
    Hugetlb(HugePageSize),
    /// A regular file: shows as the file's allocated blocks and as mapped `Rss`.
    RegularFile,
}

impl BackingKind {
    /// Whether the backing is a file descriptor (everything but private anonymous).
    pub fn is_fd_backed(self) -> bool {
        !matches!(self, Self::PrivateAnonymous)
    }

    /// The huge page size, for hugetlb backings.
    pub fn hugetlb(self) -> Option<HugePageSize> {
        match self {
            Self::Hugetlb(size) => Some(size),
            _ => None,
        }
    }

    /// The page size of the backing: the hugetlb size or the base page size.
    pub fn page_size(self) -> u64 {
        self.hugetlb()
            .map_or_else(sys::base_page_size, HugePageSize::bytes)
    }

    /// The discard method [`MemoryRegion::unplug`](crate::MemoryRegion::unplug) uses.
    pub fn default_discard(self) -> DiscardMethod {
        match self {
            Self::PrivateAnonymous => DiscardMethod::MadvDontneed,
            _ => DiscardMethod::PunchHole,
        }
    }

    /// The discard methods that free memory for this kind, default first.
    pub fn discard_methods(self) -> &'static [DiscardMethod] {
        match self {
            Self::PrivateAnonymous => &[DiscardMethod::MadvDontneed, DiscardMethod::MapFixedNone],
            _ => &[DiscardMethod::PunchHole, DiscardMethod::MadvRemove],
        }
    }
}

impl fmt::Display for BackingKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::PrivateAnonymous => f.write_str("private-anonymous"),
            Self::Shmem => f.write_str("shmem"),
            Self::Hugetlb(HugePageSize::Size2M) => f.write_str("hugetlb-2M"),
            Self::Hugetlb(HugePageSize::Size1G) => f.write_str("hugetlb-1G"),
            Self::RegularFile => f.write_str("regular-file"),
        }
    }
}

/// How to give the memory of a range back to the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DiscardMethod {
    /// `madvise(MADV_DONTNEED)`: frees private anonymous pages; only unmaps shared pages.
    MadvDontneed,
    /// `madvise(MADV_REMOVE)`: punches a hole through the mapping (shared mappings only).
    MadvRemove,
    /// `fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)` on the backing file.
    PunchHole,
    /// `mmap(MAP_FIXED)` of fresh anonymous `PROT_NONE` memory over the range (private
    /// anonymous only: for a file it would only unmap).
    MapFixedNone,
}

impl DiscardMethod {
    /// A short name for tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Self::MadvDontneed => "MADV_DONTNEED",
            Self::MadvRemove => "MADV_REMOVE",
            Self::PunchHole => "fallocate(PUNCH_HOLE)",
            Self::MapFixedNone => "mmap(MAP_FIXED,PROT_NONE)",
        }
    }
}

/// The opened backing of a region.
#[derive(Debug)]
pub(crate) enum Store {
    /// Private anonymous memory: no file.
    Anonymous,
    /// A shared file (memfd or path) of at least the region's size.
    File {
        /// The open file.
        file: File,
        /// What kind of file it is.
        kind: BackingKind,
    },
}

impl Store {
    pub(crate) fn kind(&self) -> BackingKind {
        match self {
            Self::Anonymous => BackingKind::PrivateAnonymous,
            Self::File { kind, .. } => *kind,
        }
    }

    pub(crate) fn file(&self) -> Option<&File> {
        match self {
            Self::Anonymous => None,
            Self::File { file, .. } => Some(file),
        }
    }

    /// Opens (creates) the backing for a region of `size` bytes.
    pub(crate) fn open(backing: &Backing, size: u64) -> Result<Self, MemoryBackendError> {
        const NAME: &CStr = c"virtio-mem";
        let os = |op| move |source| MemoryBackendError::Os { op, source };
        let (file, kind) = match backing {
            Backing::PrivateAnonymous => return Ok(Self::Anonymous),
            Backing::SharedMemfd => {
                let fd = sys::memfd_create(NAME, libc::MFD_CLOEXEC).map_err(os("memfd_create"))?;
                (File::from(fd), BackingKind::Shmem)
            }
            Backing::HugetlbMemfd(hp) => {
                let fd = sys::memfd_create(NAME, libc::MFD_CLOEXEC | hp.memfd_flags())
                    .map_err(os("memfd_create(MFD_HUGETLB)"))?;
                (File::from(fd), BackingKind::Hugetlb(*hp))
            }
            Backing::File(path) => {
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .mode(0o600)
                    .open(path)
                    .map_err(os("open backing file"))?;
                let fs = sys::fstatfs(file.as_fd()).map_err(os("fstatfs backing file"))?;
                let kind = file_kind(&fs, path)?;
                (file, kind)
            }
        };
        let len = file.metadata().map_err(os("fstat backing file"))?.len();
        if len < size {
            file.set_len(size).map_err(os("ftruncate backing file"))?;
        }
        Ok(Self::File { file, kind })
    }
}

fn file_kind(fs: &libc::statfs, path: &std::path::Path) -> Result<BackingKind, MemoryBackendError> {
    // On the gnu targets `f_type` and the magic constants share one type (c_long).
    let (magic, huge, tmp) = (fs.f_type, libc::HUGETLBFS_MAGIC, libc::TMPFS_MAGIC);
    if magic == huge {
        let bsize = u64::try_from(fs.f_bsize).unwrap_or(0);
        let hp = HugePageSize::from_bytes(bsize).ok_or_else(|| {
            MemoryBackendError::InvalidConfig(format!(
                "hugetlbfs page size {bsize:#x} of {} is not 2 MiB or 1 GiB",
                path.display()
            ))
        })?;
        Ok(BackingKind::Hugetlb(hp))
    } else if magic == tmp {
        Ok(BackingKind::Shmem)
    } else {
        Ok(BackingKind::RegularFile)
    }
}
