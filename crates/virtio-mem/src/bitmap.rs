//! The plugged-block bitmap.
//!
//! One bit per device block. Range operations touch whole 64-bit words where they can, so
//! they cost O(range / 64) word operations, not O(blocks): a 65,535-block request is about a
//! thousand word operations. The plugged count is kept exactly, so `plugged_size` never
//! needs a scan.

use std::ops::Range;

use crate::wire::BlockState;

const WORD_BITS: u64 = 64;

/// A fixed-size bitmap of plugged blocks with an exact count of set bits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockBitmap {
    words: Vec<u64>,
    nr_blocks: u64,
    plugged: u64,
}

/// Splits a block range into the word-level pieces it covers: `(word index, mask)`.
fn word_masks(range: Range<u64>) -> impl Iterator<Item = (usize, u64)> {
    let mut start = range.start;
    let end = range.end;
    std::iter::from_fn(move || {
        if start >= end {
            return None;
        }
        let word = start / WORD_BITS;
        let first_bit = start % WORD_BITS;
        let word_end = (word + 1) * WORD_BITS;
        let last = end.min(word_end);
        let nbits = last - start;
        let mask = if nbits == WORD_BITS {
            u64::MAX
        } else {
            ((1u64 << nbits) - 1) << first_bit
        };
        start = last;
        // The index fits in usize: the bitmap holds `word + 1` words in a Vec.
        let idx = usize::try_from(word).unwrap_or(usize::MAX);
        Some((idx, mask))
    })
}

impl BlockBitmap {
    /// A bitmap of `nr_blocks` unplugged blocks.
    ///
    /// # Panics
    ///
    /// Panics if the bitmap cannot be allocated on this host (more than `usize::MAX` words).
    pub fn new(nr_blocks: u64) -> Self {
        let nr_words = nr_blocks.div_ceil(WORD_BITS);
        let nr_words = usize::try_from(nr_words).expect("bitmap word count fits in usize");
        BlockBitmap {
            words: vec![0; nr_words],
            nr_blocks,
            plugged: 0,
        }
    }

    /// Number of blocks the bitmap covers.
    pub fn len(&self) -> u64 {
        self.nr_blocks
    }

    /// Whether the bitmap covers no block at all.
    pub fn is_empty(&self) -> bool {
        self.nr_blocks == 0
    }

    /// Number of plugged blocks.
    pub fn plugged(&self) -> u64 {
        self.plugged
    }

    fn in_bounds(&self, range: &Range<u64>) -> bool {
        range.start <= range.end && range.end <= self.nr_blocks
    }

    /// Number of plugged blocks in `range`; 0 for an out-of-bounds range.
    pub fn count_plugged(&self, range: Range<u64>) -> u64 {
        if !self.in_bounds(&range) {
            return 0;
        }
        word_masks(range)
            .map(|(i, mask)| u64::from((self.words[i] & mask).count_ones()))
            .sum()
    }

    /// The state of a non-empty, in-bounds range; `None` otherwise.
    pub fn state(&self, range: Range<u64>) -> Option<BlockState> {
        if range.is_empty() || !self.in_bounds(&range) {
            return None;
        }
        let len = range.end - range.start;
        Some(match self.count_plugged(range) {
            0 => BlockState::Unplugged,
            n if n == len => BlockState::Plugged,
            _ => BlockState::Mixed,
        })
    }

    /// Marks every block in `range` plugged (`true`) or unplugged (`false`).
    /// Returns `false` and changes nothing if the range is out of bounds.
    pub fn set_range(&mut self, range: Range<u64>, plugged: bool) -> bool {
        if !self.in_bounds(&range) {
            return false;
        }
        for (i, mask) in word_masks(range) {
            let word = &mut self.words[i];
            let before = u64::from((*word & mask).count_ones());
            if plugged {
                *word |= mask;
                self.plugged += u64::from(mask.count_ones()) - before;
            } else {
                *word &= !mask;
                self.plugged -= before;
            }
        }
        true
    }

    /// Unplugs every block.
    pub fn clear(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
        self.plugged = 0;
    }

    /// The maximal runs of plugged blocks, lowest first. Costs O(words + runs).
    pub fn plugged_runs(&self) -> Vec<Range<u64>> {
        let mut runs = Vec::new();
        let mut current: Option<u64> = None;
        for (i, &word) in self.words.iter().enumerate() {
            let base = (i as u64) * WORD_BITS;
            // Fast paths for whole words keep this linear in words, not blocks.
            if word == 0 {
                if let Some(start) = current.take() {
                    runs.push(start..base);
                }
                continue;
            }
            if word == u64::MAX {
                current.get_or_insert(base);
                continue;
            }
            let mut bit = 0;
            while bit < WORD_BITS {
                let rest = word >> bit;
                if current.is_some() {
                    // Count the ones that continue the current run.
                    let ones = u64::from((!rest).trailing_zeros()).min(WORD_BITS - bit);
                    bit += ones;
                    if bit < WORD_BITS {
                        if let Some(start) = current.take() {
                            runs.push(start..base + bit);
                        }
                    }
                } else {
                    if rest == 0 {
                        break;
                    }
                    bit += u64::from(rest.trailing_zeros());
                    current = Some(base + bit);
                }
            }
        }
        if let Some(start) = current {
            runs.push(start..self.nr_blocks);
        }
        runs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn counts_across_word_boundaries() {
        let mut b = BlockBitmap::new(200);
        assert!(b.set_range(60..130, true));
        assert_eq!(b.plugged(), 70);
        assert_eq!(b.count_plugged(0..200), 70);
        assert_eq!(b.count_plugged(64..128), 64);
        assert_eq!(b.state(60..130), Some(BlockState::Plugged));
        assert_eq!(b.state(59..61), Some(BlockState::Mixed));
        assert_eq!(b.state(130..200), Some(BlockState::Unplugged));
        assert!(b.set_range(100..101, false));
        assert_eq!(b.plugged(), 69);
        assert_eq!(b.plugged_runs(), vec![60..100, 101..130]);
    }

    #[test]
    fn setting_an_already_set_range_keeps_the_count_exact() {
        let mut b = BlockBitmap::new(128);
        b.set_range(0..10, true);
        b.set_range(5..20, true);
        assert_eq!(b.plugged(), 20);
        b.set_range(15..40, false);
        assert_eq!(b.plugged(), 15);
    }

    #[test]
    fn out_of_bounds_changes_nothing() {
        let mut b = BlockBitmap::new(10);
        assert!(!b.set_range(5..11, true));
        assert_eq!(b.plugged(), 0);
        assert_eq!(b.state(0..0), None);
        assert_eq!(b.state(9..11), None);
        assert_eq!(b.count_plugged(0..11), 0);
    }

    #[test]
    fn runs_reach_the_last_block() {
        let mut b = BlockBitmap::new(130);
        b.set_range(0..64, true);
        b.set_range(64..130, true);
        assert_eq!(b.plugged_runs(), vec![0..130]);
        b.clear();
        assert_eq!(b.plugged(), 0);
        assert!(b.plugged_runs().is_empty());
    }

    proptest! {
        #[test]
        fn matches_a_bool_vector(ops in prop::collection::vec((0usize..300, 0usize..300, any::<bool>()), 1..60)) {
            let n = 300;
            let mut b = BlockBitmap::new(n);
            let mut model = vec![false; 300];
            for (a, c, v) in ops {
                let (s, e) = (a.min(c), a.max(c));
                b.set_range(s as u64..e as u64, v);
                for m in &mut model[s..e] { *m = v; }
                prop_assert_eq!(b.plugged(), model.iter().filter(|&&x| x).count() as u64);
            }
            let mut runs = Vec::new();
            let mut i = 0;
            while i < model.len() {
                if model[i] {
                    let s = i;
                    while i < model.len() && model[i] { i += 1; }
                    runs.push(s as u64..i as u64);
                } else { i += 1; }
            }
            prop_assert_eq!(b.plugged_runs(), runs);
        }
    }
}
