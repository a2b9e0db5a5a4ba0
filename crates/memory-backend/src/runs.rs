//! A set of byte ranges kept as disjoint, non-adjacent runs: the region's staged memory.

use std::collections::BTreeMap;

/// Disjoint runs `[start, end)`, merged when they touch.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Runs {
    /// start -> end.
    runs: BTreeMap<u64, u64>,
    bytes: u64,
}

impl Runs {
    /// Bytes in the set.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The runs, lowest first.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.runs.iter().map(|(&s, &e)| (s, e))
    }

    /// The parts of `[start, end)` in the set, lowest first.
    pub(crate) fn within(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let first = self
            .runs
            .range(..=start)
            .next_back()
            .map_or(start, |(&s, _)| s);
        self.runs
            .range(first..end)
            .map(|(&s, &e)| (s.max(start), e.min(end)))
            .filter(|(s, e)| s < e)
            .collect()
    }

    /// The parts of `[start, end)` not in the set, lowest first.
    pub(crate) fn gaps(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut at = start;
        for (s, e) in self.within(start, end) {
            if at < s {
                out.push((at, s));
            }
            at = e;
        }
        if at < end {
            out.push((at, end));
        }
        out
    }

    /// Adds `[start, end)`.
    pub(crate) fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        self.remove(start, end);
        let (mut s, mut e) = (start, end);
        if let Some((&ps, &pe)) = self.runs.range(..s).next_back() {
            if pe == s {
                self.runs.remove(&ps);
                s = ps;
            }
        }
        if let Some(ne) = self.runs.remove(&e) {
            e = ne;
        }
        self.runs.insert(s, e);
        self.bytes += end - start;
    }

    /// Removes `[start, end)`.
    pub(crate) fn remove(&mut self, start: u64, end: u64) {
        for (s, e) in self.within(start, end) {
            // The run holding [s, e): it starts at or before s.
            let Some((&rs, &re)) = self.runs.range(..=s).next_back() else {
                continue;
            };
            self.runs.remove(&rs);
            if rs < s {
                self.runs.insert(rs, s);
            }
            if e < re {
                self.runs.insert(e, re);
            }
            self.bytes -= e - s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const N: usize = 64;

    fn check(runs: &Runs, model: &[bool]) {
        let mut bytes = 0;
        let mut prev_end = None;
        for (s, e) in runs.iter() {
            assert!(s < e, "empty run {s}..{e}");
            assert!(
                prev_end.is_none_or(|p| p < s),
                "runs touch or overlap at {s}"
            );
            prev_end = Some(e);
            bytes += e - s;
        }
        assert_eq!(runs.bytes(), bytes);
        for (i, &m) in model.iter().enumerate() {
            let i = i as u64;
            assert_eq!(!runs.within(i, i + 1).is_empty(), m, "unit {i}");
            assert_eq!(runs.gaps(i, i + 1).is_empty(), m, "unit {i}");
        }
        assert_eq!(bytes, model.iter().filter(|&&m| m).count() as u64);
    }

    proptest! {
        #[test]
        fn runs_follow_a_unit_model(ops in proptest::collection::vec((any::<bool>(), 0..N, 0..N), 1..40)) {
            let mut runs = Runs::default();
            let mut model = vec![false; N];
            for (add, a, b) in ops {
                let (s, e) = (a.min(b), a.max(b) + 1);
                for m in &mut model[s..e] { *m = add; }
                let (s, e) = (s as u64, e as u64);
                if add { runs.insert(s, e) } else { runs.remove(s, e) }
                check(&runs, &model);
                // within and gaps partition any range.
                let (ws, gs) = (runs.within(s, e), runs.gaps(s, e));
                let covered: u64 = ws.iter().chain(gs.iter()).map(|(x, y)| y - x).sum();
                prop_assert_eq!(covered, e - s);
            }
        }
    }

    #[test]
    fn touching_runs_merge_and_a_hole_splits() {
        let mut r = Runs::default();
        r.insert(0, 4);
        r.insert(4, 8);
        assert_eq!(r.iter().collect::<Vec<_>>(), vec![(0, 8)]);
        r.remove(2, 3);
        assert_eq!(r.iter().collect::<Vec<_>>(), vec![(0, 2), (3, 8)]);
        assert_eq!(r.bytes(), 7);
        assert_eq!(r.gaps(0, 10), vec![(2, 3), (8, 10)]);
    }
}
