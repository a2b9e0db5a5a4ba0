//! The virtio-balloon device on virtio-mmio, never inflated: the guest's memory
//! statistics (asked for every `interval`) and free page reporting, whose ranges
//! [`GuestFreePages`] gives back to the host in boot RAM and in plugged virtio-mem blocks.
//!
//! Queues are served on the VMM's event loop: statistics are a few hundred bytes, and a
//! report is at most a ring's worth of chains whose ranges are discarded without holding a
//! view of guest memory (an unplug waiting for such views is never held up by a discard).

use std::ptr::NonNull;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use event_manager::{EventOps, Events, MutEventSubscriber};
use log::{debug, warn};
use memory_backend::MemoryRegion;
use virtio_balloon::{Balloon, Counters, FreePageSink, GuestStats, Refused, QUEUE_SIZE};
use virtio_mem::BlockState;
use virtio_mmio::{ActivateError, Activation, InterruptKind, VirtioDevice, VirtioInterrupt};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::devices::virtio_mem::SharedVirtioMem;
use crate::memory::GuestMemoryHandle;

/// How often the device asks the guest for statistics unless told otherwise.
pub const DEFAULT_STATS_INTERVAL: Duration = Duration::from_secs(1);

/// The balloon device as the VMM shares it: the transport, its queue handler, and the
/// readers of its statistics.
pub type SharedBalloon = Arc<Mutex<VirtioBalloon>>;

/// Locks the device; a panic under the lock leaves the model consistent (every update is
/// a counter step or a whole replacement), so a poisoned lock is taken as it is.
pub fn lock(b: &SharedBalloon) -> MutexGuard<'_, VirtioBalloon> {
    b.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One range of boot RAM: guest-physical start, length, host address.
#[derive(Clone, Copy, Debug)]
struct BootRange {
    gpa: u64,
    len: u64,
    host: NonNull<u8>,
}

/// The virtio-mem side of [`GuestFreePages`]: the device (whose bitmap says what is
/// plugged) and the host memory behind its region.
#[derive(Clone)]
pub struct PluggedBlocks {
    device: SharedVirtioMem,
    region: Arc<MemoryRegion>,
}

impl PluggedBlocks {
    /// Plugged blocks of `device`, whose host memory is `region`.
    pub fn new(device: SharedVirtioMem, region: Arc<MemoryRegion>) -> Self {
        PluggedBlocks { device, region }
    }
}

/// Where free page reports are discarded: boot RAM (vm-memory's private anonymous
/// mappings, `MADV_DONTNEED`) and plugged virtio-mem blocks (the region's own discard for
/// its backing). Anything else is refused.
pub struct GuestFreePages {
    boot: Vec<BootRange>,
    /// Keeps the boot RAM mappings alive for as long as `boot` points into them.
    _boot_mem: GuestMemoryMmap,
    plugged: Option<PluggedBlocks>,
}

// SAFETY: the raw host addresses in `boot` point into `_boot_mem`'s mappings, which live
// as long as this value and are only used for `madvise` (no references are made).
unsafe impl Send for GuestFreePages {}

impl std::fmt::Debug for GuestFreePages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestFreePages")
            .field("boot_ranges", &self.boot.len())
            .field("plugged", &self.plugged.is_some())
            .finish()
    }
}

impl GuestFreePages {
    /// Discards into `boot_mem` (the boot RAM map, before any hotplug) and, with
    /// `plugged`, into plugged blocks. Boot RAM regions backed by a file are left out
    /// (reports there are refused): `MADV_DONTNEED` would not free their memory.
    pub fn new(boot_mem: &GuestMemoryMmap, plugged: Option<PluggedBlocks>) -> Self {
        let boot = boot_mem
            .iter()
            .filter(|r| r.file_offset().is_none())
            .filter_map(|r| {
                let host = NonNull::new(r.as_ptr())?;
                Some(BootRange {
                    gpa: r.start_addr().0,
                    len: r.len(),
                    host,
                })
            })
            .collect();
        GuestFreePages {
            boot,
            _boot_mem: boot_mem.clone(),
            plugged,
        }
    }

    fn refuse(gpa: u64, len: u64, why: &str) -> Refused {
        Refused {
            gpa,
            len,
            why: why.to_string(),
        }
    }

    fn discard_plugged(p: &PluggedBlocks, gpa: u64, len: u64) -> Result<(), Refused> {
        let dev = p.device.lock().unwrap_or_else(PoisonError::into_inner);
        let layout = dev.state().config().layout;
        let end = gpa
            .checked_add(len)
            .ok_or_else(|| Self::refuse(gpa, len, "overflows"))?;
        if gpa < layout.addr() || end > layout.addr().saturating_add(layout.size()) {
            return Err(Self::refuse(
                gpa,
                len,
                "not in boot RAM or the virtio-mem region",
            ));
        }
        let bs = layout.block_size();
        let first = (gpa - layout.addr()) / bs;
        let last = (end - layout.addr()).div_ceil(bs);
        if dev.state().bitmap().state(first..last) != Some(BlockState::Plugged) {
            return Err(Self::refuse(gpa, len, "not wholly in plugged blocks"));
        }
        // The device lock is held across the discard: the bitmap changes only under it,
        // so these blocks stay plugged (or are being unplugged, which discards anyway).
        p.region
            .discard_free(gpa - layout.addr(), len)
            .map_err(|e| Self::refuse(gpa, len, &e.to_string()))
    }
}

impl FreePageSink for GuestFreePages {
    fn discard(&mut self, gpa: u64, len: u64) -> Result<(), Refused> {
        let end = gpa
            .checked_add(len)
            .ok_or_else(|| Self::refuse(gpa, len, "overflows"))?;
        if let Some(r) = self
            .boot
            .iter()
            .find(|r| gpa >= r.gpa && end <= r.gpa + r.len)
        {
            let offset =
                usize::try_from(gpa - r.gpa).map_err(|_| Self::refuse(gpa, len, "too far"))?;
            let l = usize::try_from(len).map_err(|_| Self::refuse(gpa, len, "too long"))?;
            let host = NonNull::new(r.host.as_ptr().wrapping_add(offset))
                .ok_or_else(|| Self::refuse(gpa, len, "no host address"))?;
            // SAFETY: `[host, host + l)` lies inside one of vm-memory's private anonymous
            // boot RAM mappings (the range is within the region, file-backed regions were
            // left out at construction), which `_boot_mem` keeps mapped; vm-memory makes
            // no references into guest memory (only volatile accesses); and the guest
            // reported the range free, so its contents are not needed.
            return unsafe { memory_backend::anonymous::discard(host, l) }
                .map_err(|e| Self::refuse(gpa, len, &e.to_string()));
        }
        match &self.plugged {
            Some(p) => Self::discard_plugged(p, gpa, len),
            None => Err(Self::refuse(gpa, len, "not in boot RAM")),
        }
    }
}

struct Active {
    /// Queues by index; `None` where the driver set none up.
    queues: Vec<Option<Queue>>,
    mem: GuestMemoryHandle,
    interrupt: Arc<dyn VirtioInterrupt>,
}

/// The transport face of the balloon.
pub struct VirtioBalloon {
    model: Balloon,
    active: Option<Active>,
    sink: GuestFreePages,
    error_log: virtio_mem::RateLimit,
}

impl std::fmt::Debug for VirtioBalloon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioBalloon")
            .field("active", &self.active.is_some())
            .field("counters", &self.model.counters())
            .finish_non_exhaustive()
    }
}

/// Queue sizes offered: inflate, deflate, statistics, free page reporting.
const QUEUE_SIZES: [u16; 4] = [QUEUE_SIZE; 4];

impl VirtioBalloon {
    /// A balloon whose free page reports go to `sink`.
    pub fn new(sink: GuestFreePages) -> Self {
        VirtioBalloon {
            model: Balloon::new(),
            active: None,
            sink,
            error_log: virtio_mem::RateLimit::new(Duration::from_secs(10), 5),
        }
    }

    /// The latest statistics and when they came.
    pub fn stats(&self) -> Option<(Instant, GuestStats)> {
        self.model.stats().cloned()
    }

    /// What the device counted.
    pub fn counters(&self) -> Counters {
        self.model.counters()
    }

    /// Whether the driver has set the device up.
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    fn notify_driver(&mut self, index: usize) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let Some(Some(q)) = a.queues.get_mut(index) else {
            return;
        };
        let mem = a.mem.memory();
        match q.needs_notification(&*mem) {
            Ok(false) => {}
            _ => {
                if let Err(e) = a.interrupt.trigger(InterruptKind::UsedBuffer) {
                    if let Some(dropped) = self.error_log.allow() {
                        warn!("virtio-balloon: {e} ({dropped} similar messages suppressed)");
                    }
                }
            }
        }
    }

    /// Serves queue `index` after the driver notified it.
    pub fn process_queue(&mut self, index: usize) {
        let layout = self.model.queues();
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let Some(Some(queue)) = a.queues.get_mut(index) else {
            return;
        };
        let used = if Some(index) == layout.reporting {
            // Discard with no view of guest memory held (see the module doc).
            let reports = {
                let mem = a.mem.memory();
                self.model.take_reports(&*mem, queue)
            };
            self.model.discard_reports(&reports, &mut self.sink);
            let mem = a.mem.memory();
            self.model.finish_reports(&*mem, queue, &reports)
        } else if Some(index) == layout.stats {
            let mem = a.mem.memory();
            self.model.process_stats(&*mem, queue)
        } else {
            let mem = a.mem.memory();
            self.model.process_balloon(&*mem, queue)
        };
        if used {
            self.notify_driver(index);
        }
    }

    /// Asks the guest for fresh statistics (gives back the buffer the device holds).
    pub fn request_stats(&mut self) {
        let Some(index) = self.model.queues().stats else {
            return;
        };
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let Some(Some(queue)) = a.queues.get_mut(index) else {
            return;
        };
        let mem = a.mem.memory();
        let used = self.model.request_stats(&*mem, queue);
        drop(mem);
        if used {
            self.notify_driver(index);
        }
    }
}

impl VirtioDevice<GuestMemoryHandle> for VirtioBalloon {
    fn device_type(&self) -> u32 {
        virtio_balloon::DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn device_features(&self) -> u64 {
        self.model.device_features()
    }

    fn ack_features(&mut self, features: u64) {
        self.model.ack_features(features);
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.model.read_config(offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.model.write_config(offset, data);
    }

    fn activate(&mut self, a: Activation<GuestMemoryHandle>) -> Result<(), ActivateError> {
        let layout = self.model.queues();
        let mut queues: Vec<Option<Queue>> = (0..layout.count()).map(|_| None).collect();
        for q in a.queues {
            if let Some(slot) = queues.get_mut(usize::from(q.index)) {
                *slot = Some(q.queue);
            }
        }
        for index in [Some(0), Some(1), layout.stats, layout.reporting]
            .into_iter()
            .flatten()
        {
            if queues.get(index).is_none_or(Option::is_none) {
                return Err(ActivateError::MissingQueue {
                    index: u16::try_from(index).unwrap_or(u16::MAX),
                });
            }
        }
        debug!("virtio-balloon: active, queues {layout:?}");
        self.active = Some(Active {
            queues,
            mem: a.mem,
            interrupt: a.interrupt,
        });
        // The driver hands its statistics buffer over at probe, and may have reports
        // waiting.
        for index in 0..layout.count() {
            self.process_queue(index);
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.model.reset();
    }
}

/// Event-loop side of the balloon: serves a queue when its eventfd fires and asks for
/// statistics when the timer does.
pub struct BalloonHandler {
    dev: SharedBalloon,
    notify: Vec<EventFd>,
    timer: TimerFd,
}

impl std::fmt::Debug for BalloonHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BalloonHandler").finish_non_exhaustive()
    }
}

/// Event data of the statistics timer (queue eventfds carry their index).
const TIMER: u32 = u32::MAX;

impl BalloonHandler {
    /// Serves `dev` on `notify` (the transport's queue eventfds, in queue order) and asks
    /// for statistics every `interval`.
    ///
    /// # Errors
    ///
    /// The timer cannot be created or armed.
    pub fn new(
        dev: SharedBalloon,
        notify: Vec<EventFd>,
        interval: Duration,
    ) -> std::io::Result<Self> {
        let mut timer = TimerFd::new()?;
        timer.reset(interval, Some(interval))?;
        Ok(Self { dev, notify, timer })
    }
}

impl MutEventSubscriber for BalloonHandler {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let which = events.data();
        if which == TIMER {
            // Expirations missed meanwhile are one request: the guest answers when it can.
            let _ = self.timer.wait();
            lock(&self.dev).request_stats();
            return;
        }
        let Ok(index) = usize::try_from(which) else {
            return;
        };
        if let Some(evt) = self.notify.get(index) {
            let _ = evt.read();
        }
        lock(&self.dev).process_queue(index);
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (i, evt) in self.notify.iter().enumerate() {
            let Ok(data) = u32::try_from(i) else { break };
            if let Err(e) = ops.add(Events::with_data(evt, data, EventSet::IN)) {
                warn!("virtio-balloon: cannot watch queue {i}'s notification: {e:?}");
            }
        }
        if let Err(e) = ops.add(Events::with_data(&self.timer, TIMER, EventSet::IN)) {
            warn!("virtio-balloon: cannot watch the statistics timer, no statistics: {e:?}");
        }
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    const MIB: u64 = 1 << 20;

    #[test]
    fn reports_in_boot_ram_are_discarded_and_the_rest_refused() {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 8 << 20),
            (GuestAddress(16 * MIB), 4 << 20),
        ])
        .unwrap();
        mem.write_slice(&[0xa5; 4096], GuestAddress(2 * MIB))
            .unwrap();
        mem.write_slice(&[0x5a; 4096], GuestAddress(4 * MIB))
            .unwrap();
        let mut sink = GuestFreePages::new(&mem, None);
        sink.discard(2 * MIB, 2 * MIB).unwrap();
        let mut b = [0u8; 1];
        mem.read_slice(&mut b, GuestAddress(2 * MIB)).unwrap();
        assert_eq!(b[0], 0, "discarded memory reads as zero");
        mem.read_slice(&mut b, GuestAddress(4 * MIB)).unwrap();
        assert_eq!(b[0], 0x5a, "memory outside the report is kept");
        sink.discard(16 * MIB, 4 * MIB).unwrap();
        for (gpa, len) in [
            (7 * MIB, 2 * MIB),  // crosses the end of a boot RAM range
            (8 * MIB, 4096),     // a hole
            (32 * MIB, 2 * MIB), // beyond RAM, no virtio-mem region
            (u64::MAX - 4095, 4096),
        ] {
            let e = sink.discard(gpa, len).unwrap_err();
            assert_eq!((e.gpa, e.len), (gpa, len));
        }
    }
}
