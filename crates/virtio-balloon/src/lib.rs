//! A virtio-balloon device (virtio device type 5) that is never inflated: it exists for
//! the guest's memory statistics (`VIRTIO_BALLOON_F_STATS_VQ`) and for free page
//! reporting (`VIRTIO_BALLOON_F_FREE_PAGE_REPORTING`), which stock Linux drivers provide
//! without any agent in the guest.
//!
//! - Statistics: the driver hands the device one buffer of `(le16 tag, le64 value)`
//!   entries and waits. [`Balloon::request_stats`] gives it back (used ring + interrupt),
//!   the driver refills it with fresh figures and hands it over again, and
//!   [`Balloon::process_stats`] reads them into [`GuestStats`] with the time they came.
//! - Free page reporting: the driver adds chains whose descriptors are free guest-physical
//!   ranges (device-writable in Linux, `virtqueue_add_inbuf`; either direction is taken)
//!   and waits for each to be returned. [`Balloon::process_reporting`] gives every range
//!   to a [`FreePageSink`] (the VMM discards the host memory behind it) and returns the
//!   chain; [`Balloon::take_reports`], [`Balloon::discard_reports`] and
//!   [`Balloon::finish_reports`] do the same in steps, so that the VMM can discard without
//!   holding its view of guest memory.
//!
//! The crate knows nothing of KVM or mmap. A guest's buffers are checked, not trusted: a
//! malformed statistics buffer is counted and ignored, at most [`MAX_STATS`] entries are
//! read, and a reported range is only passed on when it is page-aligned and the sink
//! accepts it (the VMM accepts only boot RAM and plugged blocks); anything else is
//! counted and left alone.

use std::time::Instant;

use log::warn;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BALLOON;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

/// Device type of the balloon.
pub const DEVICE_TYPE: u32 = VIRTIO_ID_BALLOON;
/// Feature bit: statistics queue.
pub const VIRTIO_BALLOON_F_STATS_VQ: u32 = 1;
/// Feature bit: free page reporting queue (Linux: `VIRTIO_BALLOON_F_REPORTING`).
pub const VIRTIO_BALLOON_F_FREE_PAGE_REPORTING: u32 = 5;
/// Statistics entries read from one buffer; the rest are ignored (and counted).
pub const MAX_STATS: usize = 64;
/// Size of one statistics entry on the wire (packed le16 + le64).
pub const STAT_SIZE: usize = 10;
/// Page size of reported ranges' alignment.
pub const PAGE_SIZE: u64 = 4096;
/// Descriptors read from one reporting chain (Linux sends at most 32).
pub const MAX_REPORT_DESCRIPTORS: usize = 256;
/// Queue size the device offers for each of its queues.
pub const QUEUE_SIZE: u16 = 128;

/// The guest's memory statistics, as its driver last reported them. Fields the guest's
/// kernel does not report are `None`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuestStats {
    /// Bytes swapped in.
    pub swap_in: Option<u64>,
    /// Bytes swapped out.
    pub swap_out: Option<u64>,
    /// Major page faults.
    pub major_faults: Option<u64>,
    /// Minor page faults.
    pub minor_faults: Option<u64>,
    /// Free memory in bytes (MemFree).
    pub free: Option<u64>,
    /// Total memory in bytes (MemTotal).
    pub total: Option<u64>,
    /// Available memory in bytes (MemAvailable).
    pub available: Option<u64>,
    /// Disk caches in bytes.
    pub caches: Option<u64>,
    /// Successful hugetlb page allocations.
    pub hugetlb_allocations: Option<u64>,
    /// Failed hugetlb page allocations.
    pub hugetlb_failures: Option<u64>,
    /// OOM kills (newer kernels).
    pub oom_kills: Option<u64>,
    /// Allocation stalls (newer kernels).
    pub alloc_stalls: Option<u64>,
    /// Pages scanned by kswapd (newer kernels).
    pub async_scan: Option<u64>,
    /// Pages scanned in direct reclaim (newer kernels).
    pub direct_scan: Option<u64>,
    /// Pages reclaimed by kswapd (newer kernels).
    pub async_reclaim: Option<u64>,
    /// Pages reclaimed directly (newer kernels).
    pub direct_reclaim: Option<u64>,
}

impl GuestStats {
    fn set(&mut self, tag: u16, value: u64) -> bool {
        let slot = match tag {
            0 => &mut self.swap_in,
            1 => &mut self.swap_out,
            2 => &mut self.major_faults,
            3 => &mut self.minor_faults,
            4 => &mut self.free,
            5 => &mut self.total,
            6 => &mut self.available,
            7 => &mut self.caches,
            8 => &mut self.hugetlb_allocations,
            9 => &mut self.hugetlb_failures,
            10 => &mut self.oom_kills,
            11 => &mut self.alloc_stalls,
            12 => &mut self.async_scan,
            13 => &mut self.direct_scan,
            14 => &mut self.async_reclaim,
            15 => &mut self.direct_reclaim,
            _ => return false,
        };
        *slot = Some(value);
        true
    }

    /// Parses a statistics buffer: whole entries only, at most [`MAX_STATS`], unknown tags
    /// skipped. Returns the figures and how many entries were ignored (unknown, extra or
    /// cut short).
    pub fn parse(buf: &[u8]) -> (GuestStats, u64) {
        let mut stats = GuestStats::default();
        let mut ignored = 0u64;
        let whole = buf.len() / STAT_SIZE;
        for (i, entry) in buf.chunks_exact(STAT_SIZE).enumerate() {
            if i >= MAX_STATS {
                ignored += u64::try_from(whole - MAX_STATS).unwrap_or(u64::MAX);
                break;
            }
            let tag = u16::from_le_bytes([entry[0], entry[1]]);
            let mut v = [0u8; 8];
            v.copy_from_slice(&entry[2..]);
            if !stats.set(tag, u64::from_le_bytes(v)) {
                ignored += 1;
            }
        }
        if buf.len() % STAT_SIZE != 0 {
            ignored += 1;
        }
        (stats, ignored)
    }

    /// Memory in use as the guest sees it: total - available (`None` unless both came).
    pub fn used(&self) -> Option<u64> {
        Some(self.total?.saturating_sub(self.available?))
    }
}

/// Where reported free ranges go.
pub trait FreePageSink {
    /// Discards the host memory behind `len` bytes at guest-physical `gpa` (page-aligned).
    ///
    /// # Errors
    ///
    /// [`Refused`] when the range is not wholly in memory the guest was given (boot RAM
    /// or plugged blocks) or the host cannot discard it; the range is left alone.
    fn discard(&mut self, gpa: u64, len: u64) -> Result<(), Refused>;
}

/// A reported range the sink did not discard.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("free page report of {len:#x} bytes at {gpa:#x} refused: {why}")]
pub struct Refused {
    /// Start of the range.
    pub gpa: u64,
    /// Length of the range.
    pub len: u64,
    /// Why.
    pub why: String,
}

/// One free page report taken from the queue: the chain to give back and its ranges
/// (guest-physical start, length), page-aligned and inside guest memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// Head of the chain.
    pub head: u16,
    /// The ranges to discard.
    pub ranges: Vec<(u64, u64)>,
}

/// What the device counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Statistics buffers read.
    pub stats_updates: u64,
    /// Statistics entries ignored (unknown tags, beyond [`MAX_STATS`], cut short).
    pub stats_ignored: u64,
    /// Statistics chains that could not be read at all.
    pub stats_malformed: u64,
    /// Bytes of reported free ranges discarded.
    pub reported_bytes: u64,
    /// Reported ranges refused (unaligned, outside guest memory, or by the sink).
    pub reports_refused: u64,
    /// Inflate or deflate buffers returned unread (the device never asks to inflate).
    pub balloon_buffers: u64,
}

/// Which queue is which, once the features are known (absent queues take no index).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueLayout {
    /// The statistics queue, if negotiated.
    pub stats: Option<usize>,
    /// The free page reporting queue, if negotiated.
    pub reporting: Option<usize>,
}

impl QueueLayout {
    /// The layout for the `acked` features: inflate 0, deflate 1, then stats and
    /// reporting in that order when present (this device never offers free page hints).
    pub fn for_features(acked: u64) -> Self {
        let mut next = 2;
        let mut take = |bit: u32| {
            (acked & (1 << bit) != 0).then(|| {
                next += 1;
                next - 1
            })
        };
        let stats = take(VIRTIO_BALLOON_F_STATS_VQ);
        let reporting = take(VIRTIO_BALLOON_F_FREE_PAGE_REPORTING);
        QueueLayout { stats, reporting }
    }

    /// Number of queues.
    pub fn count(&self) -> usize {
        2 + usize::from(self.stats.is_some()) + usize::from(self.reporting.is_some())
    }
}

/// The balloon device model.
#[derive(Debug)]
pub struct Balloon {
    acked_features: u64,
    /// The driver's `actual` (it never inflates, so this stays 0 with a sane driver).
    actual: u32,
    stats: Option<(Instant, GuestStats)>,
    /// The statistics buffer the device holds: (head index, length written back 0).
    held_stats: Option<u16>,
    counters: Counters,
}

impl Default for Balloon {
    fn default() -> Self {
        Self::new()
    }
}

impl Balloon {
    /// A device with nothing negotiated.
    pub fn new() -> Self {
        Balloon {
            acked_features: 0,
            actual: 0,
            stats: None,
            held_stats: None,
            counters: Counters::default(),
        }
    }

    /// Features offered: version 1, statistics, free page reporting.
    pub fn device_features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_BALLOON_F_STATS_VQ)
            | (1 << VIRTIO_BALLOON_F_FREE_PAGE_REPORTING)
    }

    /// Takes the driver's features (unknown bits are dropped).
    pub fn ack_features(&mut self, driver: u64) {
        self.acked_features = driver & self.device_features();
    }

    /// The queue layout of the negotiated features.
    pub fn queues(&self) -> QueueLayout {
        QueueLayout::for_features(self.acked_features)
    }

    /// Reads the config space: `num_pages` (always 0: never inflate), `actual`,
    /// `free_page_hint_cmd_id` (0), `poison_val` (0). Out-of-range bytes read as 0.
    pub fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut cfg = [0u8; 16];
        cfg[4..8].copy_from_slice(&self.actual.to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| cfg.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    /// Writes the config space: only `actual` (bytes 4..8) is the driver's to write.
    pub fn write_config(&mut self, offset: u64, data: &[u8]) {
        let mut actual = self.actual.to_le_bytes();
        for (i, b) in data.iter().enumerate() {
            let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
            if let Some(j) = at.filter(|o| (4..8).contains(o)) {
                actual[j - 4] = *b;
            }
        }
        self.actual = u32::from_le_bytes(actual);
    }

    /// The latest statistics and when they came.
    pub fn stats(&self) -> Option<&(Instant, GuestStats)> {
        self.stats.as_ref()
    }

    /// What the device counted.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Forgets queue state (the driver reset the device); the last statistics stay.
    pub fn reset(&mut self) {
        self.acked_features = 0;
        self.held_stats = None;
        self.actual = 0;
    }

    /// Reads the statistics buffers the driver made available, keeps the newest figures
    /// and holds the last buffer (a newer one replaces an older, which is returned).
    /// Returns whether the used ring changed (the driver should be notified).
    pub fn process_stats<M: GuestMemory>(&mut self, mem: &M, queue: &mut Queue) -> bool {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let mut buf = Vec::new();
            let mut ok = true;
            for desc in chain.take(4) {
                if desc.is_write_only() {
                    ok = false;
                    break;
                }
                let room = (MAX_STATS + 1) * STAT_SIZE - buf.len().min((MAX_STATS + 1) * STAT_SIZE);
                let len = usize::try_from(desc.len()).unwrap_or(usize::MAX).min(room);
                let mut part = vec![0u8; len];
                if mem.read_slice(&mut part, desc.addr()).is_err() {
                    ok = false;
                    break;
                }
                buf.extend_from_slice(&part);
            }
            if ok {
                let (stats, ignored) = GuestStats::parse(&buf);
                self.stats = Some((Instant::now(), stats));
                self.counters.stats_updates += 1;
                self.counters.stats_ignored += ignored;
            } else {
                self.counters.stats_malformed += 1;
                if self.counters.stats_malformed.is_power_of_two() {
                    warn!(
                        "virtio-balloon: unreadable statistics buffer ({} so far), ignored",
                        self.counters.stats_malformed
                    );
                }
            }
            // Hold the newest buffer to ask for the next figures; give older ones back.
            if let Some(old) = self.held_stats.replace(head) {
                used |= queue.add_used(mem, old, 0).is_ok();
            }
        }
        used
    }

    /// Asks the driver for fresh statistics by returning the held buffer. Returns whether
    /// the used ring changed (the driver must be notified); `false` when no buffer is held
    /// (the driver has not answered the previous request yet).
    pub fn request_stats<M: GuestMemory>(&mut self, mem: &M, queue: &mut Queue) -> bool {
        match self.held_stats.take() {
            Some(head) => queue.add_used(mem, head, 0).is_ok(),
            None => false,
        }
    }

    /// Discards every range of every available reporting chain through `sink` and
    /// returns the chains: [`Balloon::take_reports`], [`Balloon::discard_reports`] and
    /// [`Balloon::finish_reports`] in one go. Returns whether the used ring changed.
    pub fn process_reporting<M: GuestMemory>(
        &mut self,
        mem: &M,
        queue: &mut Queue,
        sink: &mut dyn FreePageSink,
    ) -> bool {
        let reports = self.take_reports(mem, queue);
        self.discard_reports(&reports, sink);
        self.finish_reports(mem, queue, &reports)
    }

    /// Takes the available reporting chains (at most one ring's worth) with their ranges.
    /// Ranges that are not page-aligned guest memory are refused and counted here, so a
    /// [`Report`] holds only ranges worth giving to a sink. The chains stay the device's
    /// until [`Balloon::finish_reports`]: the guest reuses the pages once they come back,
    /// so they must be discarded first.
    ///
    /// The split lets a VMM drop its view of guest memory while it discards (discarding
    /// may wait for locks that code waiting on such views holds).
    pub fn take_reports<M: GuestMemory>(&mut self, mem: &M, queue: &mut Queue) -> Vec<Report> {
        let mut reports = Vec::new();
        for _ in 0..queue.size() {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let mut ranges = Vec::new();
            for desc in chain.take(MAX_REPORT_DESCRIPTORS) {
                let (gpa, len) = (desc.addr().0, u64::from(desc.len()));
                let aligned = gpa % PAGE_SIZE == 0 && len % PAGE_SIZE == 0 && len > 0;
                let in_memory = usize::try_from(len)
                    .is_ok_and(|l| mem.check_range(GuestAddress(gpa), l, Permissions::Read));
                if aligned && in_memory {
                    ranges.push((gpa, len));
                } else {
                    self.refused(&Refused {
                        gpa,
                        len,
                        why: "not page-aligned guest memory".into(),
                    });
                }
            }
            reports.push(Report { head, ranges });
        }
        reports
    }

    /// Gives every range of `reports` to `sink`, counting what it discarded and refused.
    pub fn discard_reports(&mut self, reports: &[Report], sink: &mut dyn FreePageSink) {
        for &(gpa, len) in reports.iter().flat_map(|r| r.ranges.iter()) {
            match sink.discard(gpa, len) {
                Ok(()) => self.counters.reported_bytes += len,
                Err(e) => self.refused(&e),
            }
        }
    }

    /// Returns the chains of `reports` to the driver. Returns whether the used ring changed.
    pub fn finish_reports<M: GuestMemory>(
        &mut self,
        mem: &M,
        queue: &mut Queue,
        reports: &[Report],
    ) -> bool {
        let mut used = false;
        for r in reports {
            used |= queue.add_used(mem, r.head, 0).is_ok();
        }
        used
    }

    fn refused(&mut self, e: &Refused) {
        self.counters.reports_refused += 1;
        if self.counters.reports_refused.is_power_of_two() {
            warn!(
                "virtio-balloon: {e} ({} so far)",
                self.counters.reports_refused
            );
        }
    }

    /// Returns inflate or deflate buffers unread (this device never asks to inflate; a
    /// driver that sends some anyway gets them back). Returns whether the used ring changed.
    pub fn process_balloon<M: GuestMemory>(&mut self, mem: &M, queue: &mut Queue) -> bool {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            self.counters.balloon_buffers += 1;
            used |= queue.add_used(mem, chain.head_index(), 0).is_ok();
        }
        used
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]
mod tests {
    use super::*;
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    const MIB: u64 = 1 << 20;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap()
    }

    fn entry(tag: u16, v: u64) -> Vec<u8> {
        let mut e = tag.to_le_bytes().to_vec();
        e.extend_from_slice(&v.to_le_bytes());
        e
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, next))
    }

    fn used(mock: &MockSplitQueue<GuestMemoryMmap>) -> u16 {
        mock.used().idx().load()
    }

    #[test]
    fn queues_are_numbered_by_the_features_present() {
        let stats = 1 << VIRTIO_BALLOON_F_STATS_VQ;
        let rep = 1 << VIRTIO_BALLOON_F_FREE_PAGE_REPORTING;
        assert_eq!(
            QueueLayout::for_features(stats | rep),
            QueueLayout {
                stats: Some(2),
                reporting: Some(3)
            }
        );
        assert_eq!(
            QueueLayout::for_features(rep),
            QueueLayout {
                stats: None,
                reporting: Some(2)
            }
        );
        assert_eq!(QueueLayout::for_features(0).count(), 2);
    }

    #[test]
    fn stats_parse_known_tags_and_ignore_the_rest() {
        let mut buf = Vec::new();
        buf.extend(entry(5, 4 << 30));
        buf.extend(entry(6, 3 << 30));
        buf.extend(entry(10, 2));
        buf.extend(entry(99, 7));
        buf.extend([1, 2, 3]);
        let (s, ignored) = GuestStats::parse(&buf);
        assert_eq!(
            (s.total, s.available, s.oom_kills),
            (Some(4 << 30), Some(3 << 30), Some(2))
        );
        assert_eq!(s.used(), Some(1 << 30));
        assert_eq!(ignored, 2, "unknown tag and a cut entry");
        let many: Vec<u8> = (0..100).flat_map(|_| entry(4, 1)).collect();
        assert_eq!(GuestStats::parse(&many).1, 100 - MAX_STATS as u64);
    }

    #[test]
    fn the_stats_buffer_is_held_then_returned_to_ask_again() {
        let m = mem();
        let mock = MockSplitQueue::new(&m, 16);
        let mut buf = entry(4, 100 * MIB);
        buf.extend(entry(5, 512 * MIB));
        m.write_slice(&buf, GuestAddress(MIB)).unwrap();
        mock.add_desc_chains(&[desc(MIB, 20, 0, 0)], 0).unwrap();
        let mut q: Queue = mock.create_queue().unwrap();
        let mut b = Balloon::new();
        assert!(
            !b.process_stats(&m, &mut q),
            "the first buffer is held, not returned"
        );
        assert_eq!(used(&mock), 0);
        let (_, s) = b.stats().unwrap();
        assert_eq!((s.free, s.total), (Some(100 * MIB), Some(512 * MIB)));
        assert!(b.request_stats(&m, &mut q));
        assert_eq!(used(&mock), 1);
        assert!(
            !b.request_stats(&m, &mut q),
            "nothing held until the driver answers"
        );
    }

    #[test]
    fn a_writable_stats_buffer_is_counted_and_ignored() {
        let m = mem();
        let mock = MockSplitQueue::new(&m, 16);
        mock.add_desc_chains(&[desc(MIB, 20, F_WRITE, 0)], 0)
            .unwrap();
        let mut q: Queue = mock.create_queue().unwrap();
        let mut b = Balloon::new();
        b.process_stats(&m, &mut q);
        assert_eq!(b.counters().stats_malformed, 1);
        assert!(b.stats().is_none());
    }

    #[derive(Default)]
    struct Sink {
        allowed: Vec<(u64, u64)>,
        discarded: Vec<(u64, u64)>,
    }

    impl FreePageSink for Sink {
        fn discard(&mut self, gpa: u64, len: u64) -> Result<(), Refused> {
            if self
                .allowed
                .iter()
                .any(|&(a, l)| gpa >= a && gpa + len <= a + l)
            {
                self.discarded.push((gpa, len));
                Ok(())
            } else {
                Err(Refused {
                    gpa,
                    len,
                    why: "outside".into(),
                })
            }
        }
    }

    #[test]
    fn reported_ranges_are_discarded_only_where_allowed_and_aligned() {
        let m = mem();
        let mock = MockSplitQueue::new(&m, 16);
        let two = 2u32 << 20;
        mock.add_desc_chains(
            &[
                desc(4 * MIB, two, F_WRITE | F_NEXT, 1),
                desc(8 * MIB + 512, two, F_WRITE | F_NEXT, 2),
                desc(40 * MIB, two, F_WRITE | F_NEXT, 3),
                desc(62 * MIB, 4 << 20, F_WRITE, 0),
            ],
            0,
        )
        .unwrap();
        let mut q: Queue = mock.create_queue().unwrap();
        let mut sink = Sink {
            allowed: vec![(0, 32 * MIB)],
            ..Sink::default()
        };
        let mut b = Balloon::new();
        assert!(b.process_reporting(&m, &mut q, &mut sink));
        assert_eq!(sink.discarded, vec![(4 * MIB, 2 * MIB)]);
        let c = b.counters();
        assert_eq!((c.reported_bytes, c.reports_refused), (2 * MIB, 3));
        assert_eq!(used(&mock), 1, "the chain is returned either way");
    }

    #[test]
    fn a_report_goes_back_to_the_driver_only_after_its_discard() {
        let m = mem();
        let mock = MockSplitQueue::new(&m, 16);
        mock.add_desc_chains(&[desc(4 * MIB, 2 << 20, F_WRITE, 0)], 0)
            .unwrap();
        let mut q: Queue = mock.create_queue().unwrap();
        let mut sink = Sink {
            allowed: vec![(0, 32 * MIB)],
            ..Sink::default()
        };
        let mut b = Balloon::new();
        let reports = b.take_reports(&m, &mut q);
        assert_eq!(
            reports,
            vec![Report {
                head: 0,
                ranges: vec![(4 * MIB, 2 * MIB)]
            }]
        );
        assert_eq!(used(&mock), 0, "taken, not returned");
        b.discard_reports(&reports, &mut sink);
        assert_eq!(used(&mock), 0, "discarded, not returned");
        assert_eq!(sink.discarded, vec![(4 * MIB, 2 * MIB)]);
        assert!(b.finish_reports(&m, &mut q, &reports));
        assert_eq!(used(&mock), 1);
        assert_eq!(b.counters().reported_bytes, 2 * MIB);
    }

    #[test]
    fn config_space_never_asks_to_inflate_and_keeps_actual() {
        let mut b = Balloon::new();
        b.write_config(0, &[0xff; 4]);
        b.write_config(4, &7u32.to_le_bytes());
        let mut cfg = [0xaau8; 20];
        b.read_config(0, &mut cfg);
        assert_eq!(&cfg[..4], &[0; 4], "num_pages stays 0");
        assert_eq!(&cfg[4..8], &7u32.to_le_bytes());
        assert_eq!(&cfg[16..], &[0; 4], "past the config space reads 0");
        b.read_config(u64::MAX, &mut cfg);
        assert_eq!(cfg, [0; 20]);
    }

    proptest::proptest! {
        /// Whatever bytes a guest sends as statistics, parsing neither panics nor takes
        /// more than MAX_STATS figures.
        #[test]
        fn any_stats_bytes_parse(buf in proptest::collection::vec(proptest::num::u8::ANY, 0..2000)) {
            let (_, ignored) = GuestStats::parse(&buf);
            let whole = (buf.len() / STAT_SIZE) as u64;
            proptest::prop_assert!(ignored <= whole + 1);
        }
    }
}
