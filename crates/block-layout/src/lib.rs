//! The layout of a memory region handed out in blocks: where it starts in guest physical
//! memory, how big it is, and the block size that is the unit of plug and unplug.
//!
//! One type, validated once, for everyone that needs the layout: the operator's options
//! in the VMM, the virtio-mem device model and the host memory backend. Holding a
//! [`BlockLayout`] means the checks below hold, so none of them repeats them.

use std::fmt;

/// The smallest block size: one 4 KiB page.
pub const MIN_BLOCK_SIZE: u64 = 4096;

/// Why a region cannot be laid out in blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// The block size is not a power of two of at least 4 KiB.
    #[error("block size {0:#x} is invalid: use a power of two of at least 4 KiB (e.g. 2M)")]
    BlockSize(u64),
    /// The region is empty.
    #[error("the region is empty: give a size of at least one block")]
    Empty,
    /// The start or the size is not a multiple of the block size.
    #[error(
        "region [{addr:#x}, +{size:#x}) is not aligned to the block size {block_size:#x}: \
         give a start and a size that are multiples of it"
    )]
    Unaligned {
        /// Start of the region.
        addr: u64,
        /// Size of the region.
        size: u64,
        /// Block size.
        block_size: u64,
    },
    /// The region wraps around the 64-bit address space.
    #[error("region [{addr:#x}, +{size:#x}) overflows the 64-bit address space")]
    Overflow {
        /// Start of the region.
        addr: u64,
        /// Size of the region.
        size: u64,
    },
}

/// A region of `size` bytes at guest physical `addr`, in blocks of `block_size`: the block
/// size is a power of two of at least [`MIN_BLOCK_SIZE`], the start and the size are
/// non-zero multiples of it (the start may be zero), and the end does not wrap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockLayout {
    addr: u64,
    size: u64,
    block_size: u64,
}

impl BlockLayout {
    /// Checks and builds a layout.
    ///
    /// # Errors
    ///
    /// The [`LayoutError`] of the first rule broken, in the order the type's doc gives.
    pub fn new(addr: u64, size: u64, block_size: u64) -> Result<Self, LayoutError> {
        if !block_size.is_power_of_two() || block_size < MIN_BLOCK_SIZE {
            return Err(LayoutError::BlockSize(block_size));
        }
        if size == 0 {
            return Err(LayoutError::Empty);
        }
        if addr % block_size != 0 || size % block_size != 0 {
            return Err(LayoutError::Unaligned {
                addr,
                size,
                block_size,
            });
        }
        if addr.checked_add(size).is_none() {
            return Err(LayoutError::Overflow { addr, size });
        }
        Ok(BlockLayout {
            addr,
            size,
            block_size,
        })
    }

    /// Guest physical start.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Size in bytes: a non-zero multiple of the block size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Block size in bytes: a power of two, at least 4 KiB.
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// Number of blocks (at least one).
    pub fn nr_blocks(&self) -> u64 {
        self.size / self.block_size
    }

    /// First address past the region (it cannot overflow: construction checked it).
    pub fn end(&self) -> u64 {
        self.addr + self.size
    }

    /// Whether `len` bytes at `addr` lie wholly inside the region.
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        addr >= self.addr && addr.checked_add(len).is_some_and(|end| end <= self.end())
    }

    /// The same region at another start (the backend's own view of it starts at 0).
    ///
    /// # Errors
    ///
    /// As [`BlockLayout::new`] for the new start.
    pub fn at(&self, addr: u64) -> Result<Self, LayoutError> {
        BlockLayout::new(addr, self.size, self.block_size)
    }
}

impl fmt::Display for BlockLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[{:#x}, {:#x}) in {} blocks of {:#x}",
            self.addr,
            self.end(),
            self.nr_blocks(),
            self.block_size
        )
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn each_rule_has_its_error() {
        assert_eq!(
            BlockLayout::new(0, 4 * MIB, 3 * MIB),
            Err(LayoutError::BlockSize(3 * MIB))
        );
        assert_eq!(
            BlockLayout::new(0, 4 * MIB, 2048),
            Err(LayoutError::BlockSize(2048))
        );
        assert_eq!(BlockLayout::new(0, 0, 2 * MIB), Err(LayoutError::Empty));
        assert!(matches!(
            BlockLayout::new(MIB, 4 * MIB, 2 * MIB),
            Err(LayoutError::Unaligned { .. })
        ));
        assert!(matches!(
            BlockLayout::new(0, 5 * MIB, 2 * MIB),
            Err(LayoutError::Unaligned { .. })
        ));
        let top = (u64::MAX / (2 * MIB)) * (2 * MIB);
        assert_eq!(
            BlockLayout::new(top, 4 * MIB, 2 * MIB),
            Err(LayoutError::Overflow {
                addr: top,
                size: 4 * MIB
            })
        );
    }

    #[test]
    fn accessors_describe_the_region() {
        let l = BlockLayout::new(4 << 30, 64 * MIB, 2 * MIB).unwrap();
        assert_eq!(
            (l.addr(), l.size(), l.block_size(), l.nr_blocks(), l.end()),
            (4 << 30, 64 * MIB, 2 * MIB, 32, (4 << 30) + 64 * MIB)
        );
        assert!(l.contains(4 << 30, 64 * MIB));
        assert!(!l.contains((4 << 30) - 1, 2));
        assert!(!l.contains((4 << 30) + 63 * MIB, 2 * MIB));
        assert!(!l.contains(u64::MAX, 2));
        assert_eq!(l.at(0).unwrap().end(), 64 * MIB);
        assert_eq!(
            l.to_string(),
            "[0x100000000, 0x104000000) in 32 blocks of 0x200000"
        );
    }

    proptest! {
        /// Whatever the inputs, a layout that builds satisfies every rule, and one that
        /// does not build breaks at least one.
        #[test]
        fn built_layouts_keep_the_rules(addr: u64, size: u64, shift in 0u32..64) {
            let bs = 1u64 << shift;
            let rules = bs >= MIN_BLOCK_SIZE
                && size != 0
                && addr % bs == 0
                && size % bs == 0
                && addr.checked_add(size).is_some();
            prop_assert_eq!(BlockLayout::new(addr, size, bs).is_ok(), rules);
        }
    }
}
