//! What the host really holds: memory figures from `/proc/self/smaps_rollup` (whole
//! process) and `/proc/self/smaps` (an address range), a file's allocated size, the
//! protection of an address range, and the host's THP size.
//!
//! Process-wide figures move with every allocation of every thread, so tests and the VMM's
//! metrics prefer [`range_usage`] over the region's own address range, plus
//! [`file_allocated_bytes`] for file backings (a shared file keeps pages that no mapping
//! shows once they are unmapped).

use std::io;
use std::os::fd::BorrowedFd;

use crate::sys;

/// Errors reading memory figures.
#[derive(Debug, thiserror::Error)]
pub enum AccountingError {
    /// A procfs or sysfs file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A line of such a file was not in the expected format.
    #[error("parsing {path}: unexpected line {line:?}")]
    Parse {
        /// The file.
        path: &'static str,
        /// The offending line.
        line: String,
    },
    /// `fstat` on a backing file failed.
    #[error("fstat of the backing file: {0}")]
    Fstat(#[source] io::Error),
}

/// Memory figures in bytes, from smaps or smaps_rollup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryUsage {
    /// `Rss`: resident pages mapped (hugetlb pages are not included).
    pub rss: u64,
    /// `Anonymous`: private anonymous pages.
    pub anonymous: u64,
    /// `AnonHugePages`: the part of `anonymous` in transparent huge pages.
    pub anon_huge_pages: u64,
    /// `Pss_Shmem` (smaps_rollup only; 0 for ranges): shared memory, proportionally.
    pub shmem: u64,
    /// `Shared_Hugetlb`: hugetlb pages in shared mappings.
    pub shared_hugetlb: u64,
    /// `Private_Hugetlb`: hugetlb pages in private mappings.
    pub private_hugetlb: u64,
}

impl MemoryUsage {
    /// Shared plus private hugetlb.
    pub fn hugetlb(&self) -> u64 {
        self.shared_hugetlb + self.private_hugetlb
    }

    fn add_field(&mut self, name: &str, bytes: u64) {
        let slot = match name {
            "Rss" => &mut self.rss,
            "Anonymous" => &mut self.anonymous,
            "AnonHugePages" => &mut self.anon_huge_pages,
            "Pss_Shmem" | "Rss_Shmem" | "Shmem" => &mut self.shmem,
            "Shared_Hugetlb" => &mut self.shared_hugetlb,
            "Private_Hugetlb" => &mut self.private_hugetlb,
            _ => return,
        };
        *slot += bytes;
    }
}

const SMAPS_ROLLUP: &str = "/proc/self/smaps_rollup";
const SMAPS: &str = "/proc/self/smaps";
const MAPS: &str = "/proc/self/maps";
const THP_SIZE: &str = "/sys/kernel/mm/transparent_hugepage/hpage_pmd_size";

fn read(path: &'static str) -> Result<String, AccountingError> {
    std::fs::read_to_string(path).map_err(|source| AccountingError::Read { path, source })
}

/// Parses `Name:   123 kB`; `None` for lines of another shape.
fn parse_kb_field(line: &str) -> Option<(&str, u64)> {
    let (name, rest) = line.split_once(':')?;
    let mut it = rest.split_whitespace();
    let value = it.next()?.parse::<u64>().ok()?;
    (it.next()? == "kB").then_some((name, value.checked_mul(1024)?))
}

/// Parses a maps/smaps header line `start-end perms ...` into (start, end, perms).
fn parse_header(line: &str) -> Option<(u64, u64, &str)> {
    let mut it = line.split_whitespace();
    let (start, end) = it.next()?.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    let perms = it.next()?;
    (perms.len() == 4 && start <= end).then_some((start, end, perms))
}

/// Whole-process figures from `/proc/self/smaps_rollup`.
///
/// # Errors
///
/// [`AccountingError`] when the file cannot be read or has no `Rss` line.
pub fn process_usage() -> Result<MemoryUsage, AccountingError> {
    let text = read(SMAPS_ROLLUP)?;
    let mut usage = MemoryUsage::default();
    let mut seen_rss = false;
    for line in text.lines() {
        if let Some((name, bytes)) = parse_kb_field(line) {
            seen_rss |= name == "Rss";
            usage.add_field(name, bytes);
        }
    }
    if !seen_rss {
        return Err(AccountingError::Parse {
            path: SMAPS_ROLLUP,
            line: text.lines().next().unwrap_or("").into(),
        });
    }
    Ok(usage)
}

/// Figures summed over the mappings that overlap `[addr, addr+len)`, from
/// `/proc/self/smaps`. A mapping that only partly overlaps counts whole; the region's
/// own mappings never extend past it, except that the kernel may merge an adjacent
/// `PROT_NONE` mapping with the same flags into one VMA (which holds no pages).
///
/// # Errors
///
/// [`AccountingError`] when the file cannot be read.
pub fn range_usage(addr: u64, len: u64) -> Result<MemoryUsage, AccountingError> {
    let text = read(SMAPS)?;
    let end = addr.saturating_add(len);
    let mut usage = MemoryUsage::default();
    let mut inside = false;
    for line in text.lines() {
        if let Some((s, e, _)) = parse_header(line) {
            inside = s < end && addr < e;
        } else if inside {
            if let Some((name, bytes)) = parse_kb_field(line) {
                usage.add_field(name, bytes);
            }
        }
    }
    Ok(usage)
}

/// One mapping's overlap with a queried range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappingProtection {
    /// Start address of the overlap.
    pub start: u64,
    /// End address (exclusive) of the overlap.
    pub end: u64,
    /// The `rwxp`/`rwxs` permission string from `/proc/self/maps`.
    pub perms: String,
}

impl MappingProtection {
    /// Whether the mapping can be read, written or executed.
    pub fn accessible(&self) -> bool {
        self.perms.bytes().take(3).any(|b| b != b'-')
    }
}

/// The mappings overlapping `[addr, addr+len)` and their permissions, from
/// `/proc/self/maps`, clipped to the range. Gaps (unmapped addresses) are not listed.
///
/// # Errors
///
/// [`AccountingError`] when the file cannot be read.
pub fn range_protections(addr: u64, len: u64) -> Result<Vec<MappingProtection>, AccountingError> {
    let text = read(MAPS)?;
    let end = addr.saturating_add(len);
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((s, e, perms)) = parse_header(line) else {
            return Err(AccountingError::Parse {
                path: MAPS,
                line: line.into(),
            });
        };
        if s < end && addr < e {
            out.push(MappingProtection {
                start: s.max(addr),
                end: e.min(end),
                perms: perms.into(),
            });
        }
    }
    Ok(out)
}

/// The host's transparent huge page size (PMD size), from
/// `/sys/kernel/mm/transparent_hugepage/hpage_pmd_size`: the default virtio-mem block
/// size, so that unplugging a block never splits a huge page.
///
/// # Errors
///
/// [`AccountingError`] when the file is missing (kernel without THP) or malformed.
pub fn thp_size() -> Result<u64, AccountingError> {
    let text = read(THP_SIZE)?;
    text.trim()
        .parse::<u64>()
        .ok()
        .filter(|v| v.is_power_of_two())
        .ok_or_else(|| AccountingError::Parse {
            path: THP_SIZE,
            line: text.trim().into(),
        })
}

/// The host's base page size in bytes.
pub fn base_page_size() -> u64 {
    sys::base_page_size()
}

/// The bytes a file really holds (`st_blocks * 512`), e.g. a memfd's allocated pages.
///
/// # Errors
///
/// [`AccountingError::Fstat`] when `fstat` fails.
pub fn file_allocated_bytes(fd: BorrowedFd<'_>) -> Result<u64, AccountingError> {
    let st = sys::fstat(fd).map_err(AccountingError::Fstat)?;
    Ok(u64::try_from(st.st_blocks).unwrap_or(0).saturating_mul(512))
}

/// Figures for the free memory of the host, from `/proc/meminfo`, in bytes:
/// (`MemAvailable`, `HugePages_Free` times `Hugepagesize`).
///
/// # Errors
///
/// [`AccountingError`] when the file cannot be read or lacks the fields.
pub fn host_available() -> Result<(u64, u64), AccountingError> {
    const MEMINFO: &str = "/proc/meminfo";
    let text = read(MEMINFO)?;
    let mut avail = None;
    let mut free_huge = None;
    let mut huge_size = None;
    for line in text.lines() {
        if let Some((name, bytes)) = parse_kb_field(line) {
            match name {
                "MemAvailable" => avail = Some(bytes),
                "Hugepagesize" => huge_size = Some(bytes),
                _ => {}
            }
        } else if let Some(v) = line.strip_prefix("HugePages_Free:") {
            free_huge = v.trim().parse::<u64>().ok();
        }
    }
    match (avail, free_huge, huge_size) {
        (Some(a), Some(f), Some(h)) => Ok((a, f.saturating_mul(h))),
        _ => Err(AccountingError::Parse {
            path: MEMINFO,
            line: "MemAvailable/HugePages_Free/Hugepagesize".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kb_fields() {
        assert_eq!(
            parse_kb_field("Rss:                1712 kB"),
            Some(("Rss", 1712 * 1024))
        );
        assert_eq!(parse_kb_field("THPeligible:    0"), None);
        assert_eq!(parse_kb_field("VmFlags: rd wr mr"), None);
    }

    #[test]
    fn parses_headers() {
        let h = "7f0000000000-7f0000200000 rw-p 00000000 00:00 0 ";
        assert_eq!(
            parse_header(h),
            Some((0x7f00_0000_0000, 0x7f00_0020_0000, "rw-p"))
        );
        assert_eq!(parse_header("Rss: 4 kB"), None);
    }

    #[test]
    fn process_usage_sees_this_process() {
        let u = process_usage().unwrap();
        assert!(u.rss > 0);
    }

    #[test]
    fn range_usage_counts_a_touched_buffer() {
        let buf = vec![1u8; 8 << 20];
        let addr = buf.as_ptr() as u64;
        let u = range_usage(addr, 8 << 20).unwrap();
        assert!(u.anonymous >= 8 << 20, "{u:?}");
        drop(buf);
    }

    /// Runs on every host: whether the kernel has THP (its sysfs file exists, whatever
    /// the `enabled` mode) decides which answer is right, and both are checked.
    #[test]
    fn thp_size_matches_the_host() {
        let present = std::path::Path::new(THP_SIZE).exists();
        match (present, thp_size()) {
            (true, Ok(v)) => assert!(
                v.is_power_of_two() && v >= base_page_size(),
                "THP size {v:#x} from {THP_SIZE}"
            ),
            (false, Err(AccountingError::Read { path, .. })) => assert_eq!(path, THP_SIZE),
            (present, r) => panic!(
                "{THP_SIZE} {}, but thp_size() gave {r:?}",
                if present { "exists" } else { "is missing" }
            ),
        }
    }

    #[test]
    fn host_available_reads_meminfo() {
        let (avail, _) = host_available().unwrap();
        assert!(avail > 0);
    }
}
