//! The virtio-mem device in the VMM: the device model of `crates/virtio-mem` behind the
//! virtio-mmio transport, with its host memory ([`crate::hotplug::HotplugMemory`]) and the
//! memory API.
//!
//! Requests are served on a thread of their own, not on the VMM's event loop: plugging
//! with populate faults in host memory and may take a while, and the guest waits for the
//! answer anyway, while the serial console and other devices must go on. That thread
//! holds the device only to take a request and to commit its answer; the host work in
//! between (populate, KVM slots, discard) runs under the hotplug memory's own lock, so the
//! memory API and the vCPUs' config reads never wait for it.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{error, info, warn};
use virtio_mem::HOST_TIME_BUCKETS_S;
use virtio_mem::{VirtioMem, VirtioMemError};
use virtio_mmio::{ActivateError, Activation, InterruptKind, VirtioDevice, VirtioInterrupt};
use vmm_api::{
    AutosizeError, AutosizePolicy, AutosizeRequest, EventBus, EventKind, MemoryControl,
    MemoryStatus, MetricsText, Progress, ResizeError, ResizeState,
};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::capacity::{Capacity, CapacityError};
use crate::devices::balloon::{PluggedBlocks, SharedBalloon};
use crate::hotplug::HotplugMemory;
use crate::memory::GuestMemoryHandle;

/// The hotplug memory, shared by the device model (for its own resets) and the request
/// thread (which does the host work without holding the device).
pub type SharedHotplug = Arc<Mutex<HotplugMemory>>;

/// The transport's interrupt line, once the transport hands it over at activation.
#[derive(Default)]
pub struct InterruptLine(Mutex<Option<Arc<dyn VirtioInterrupt>>>);

impl std::fmt::Debug for InterruptLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InterruptLine")
    }
}

impl InterruptLine {
    fn trigger(&self, kind: InterruptKind) -> std::io::Result<()> {
        let irq = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        match irq {
            Some(irq) => irq.trigger(kind).map_err(std::io::Error::other),
            // No transport yet: nobody to tell; the driver reads the config at probe.
            None => Ok(()),
        }
    }
}

impl virtio_mem::Interrupt for InterruptLine {
    fn signal_used_queue(&self) -> std::io::Result<()> {
        self.trigger(InterruptKind::UsedBuffer)
    }

    fn signal_config_change(&self) -> std::io::Result<()> {
        self.trigger(InterruptKind::ConfigChange)
    }
}

/// The device model, with the VMM's hotplug memory as its backend, shared by the
/// transport face ([`VirtioMemMmio`]), its request thread and the memory API.
pub type SharedVirtioMem = Arc<Mutex<VirtioMem<SharedHotplug, Arc<InterruptLine>>>>;

fn lock(dev: &SharedVirtioMem) -> MutexGuard<'_, VirtioMem<SharedHotplug, Arc<InterruptLine>>> {
    // A panic while holding the lock cannot leave the model half-updated (it commits
    // after the host work), so the state is still the best truth available.
    dev.lock().unwrap_or_else(PoisonError::into_inner)
}

struct Worker {
    stop: EventFd,
    thread: JoinHandle<()>,
}

fn lock_hotplug(hotplug: &SharedHotplug) -> MutexGuard<'_, HotplugMemory> {
    // HotplugMemory's operations publish the devices' map last and undo on failure; a
    // panic inside one is a VMM bug whose state is still the best truth available for
    // releasing slots. Plug and unplug go through the BlockBackend impl of the Arc,
    // which refuses a poisoned backend.
    hotplug.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The virtio-mmio face of the device.
pub struct VirtioMemMmio {
    device: SharedVirtioMem,
    hotplug: SharedHotplug,
    irq: Arc<InterruptLine>,
    worker: Option<Worker>,
}

impl std::fmt::Debug for VirtioMemMmio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioMemMmio")
            .field("active", &self.worker.is_some())
            .finish_non_exhaustive()
    }
}

impl VirtioMemMmio {
    /// Wraps a device model whose interrupt is `irq` and whose backend is `hotplug`.
    pub fn new(device: SharedVirtioMem, hotplug: SharedHotplug, irq: Arc<InterruptLine>) -> Self {
        VirtioMemMmio {
            device,
            hotplug,
            irq,
            worker: None,
        }
    }

    fn stop_worker(&mut self) {
        if let Some(w) = self.worker.take() {
            if let Err(e) = w.stop.write(1) {
                error!("virtio-mem: cannot stop the request thread: {e}");
                return;
            }
            if w.thread.join().is_err() {
                error!("virtio-mem: the request thread panicked");
            }
        }
    }
}

impl Drop for VirtioMemMmio {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

/// What ended a wait of the request thread, most urgent first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Wake {
    Stop = 0,
    Notify = 1,
    ReleaseTimer = 2,
}

impl Wake {
    fn from_token(token: u64) -> Wake {
        match token {
            1 => Wake::Notify,
            2 => Wake::ReleaseTimer,
            _ => Wake::Stop,
        }
    }
}

/// What the request thread waits on: the stop eventfd, the queue notification and the
/// slot release timer.
struct Waiter {
    epoll: Epoll,
}

impl Waiter {
    fn new(notify: &EventFd, stop: &EventFd, release_timer: RawFd) -> std::io::Result<Self> {
        let epoll = Epoll::new()?;
        for (fd, wake) in [
            (stop.as_raw_fd(), Wake::Stop),
            (notify.as_raw_fd(), Wake::Notify),
            (release_timer, Wake::ReleaseTimer),
        ] {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, wake as u64),
            )?;
        }
        Ok(Waiter { epoll })
    }

    /// Blocks until one is readable; a stop wins over the others.
    fn wait(&self) -> Wake {
        self.wait_for(-1).unwrap_or(Wake::Stop)
    }

    /// Whether one is readable now (a failure to look counts as readable: the next wait
    /// reports it).
    fn pending(&self) -> bool {
        self.wait_for(0).is_some()
    }

    /// [`Waiter::wait`] for at most `timeout_ms` (-1: no limit); `None` when nothing came.
    fn wait_for(&self, timeout_ms: i32) -> Option<Wake> {
        let mut events = [EpollEvent::default(); 3];
        loop {
            match self.epoll.wait(timeout_ms, &mut events) {
                Ok(0) if timeout_ms >= 0 => return None,
                Ok(n) => {
                    let ready = events.iter().take(n).map(EpollEvent::data);
                    if let Some(w) = ready.map(Wake::from_token).min() {
                        return Some(w);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    error!("virtio-mem: waiting for requests failed, stopping: {e}");
                    return Some(Wake::Stop);
                }
            }
        }
    }
}

/// Step of staging between two looks at the queue: a request that comes meanwhile waits
/// at most this long (a few milliseconds per 16 MiB on a host core).
const STAGE_STEP: u64 = 16 << 20;

/// After a round that plugged memory, and until the next request or wake-up, faults in
/// the blocks the guest will most likely plug next, while it adds and onlines what it
/// got ([`HotplugMemory::stage_ahead`]). Only after plugs: a guest that sends other
/// requests causes no host work here.
fn stage_ahead(device: &SharedVirtioMem, hotplug: &SharedHotplug, waiter: &Waiter) {
    while !waiter.pending() {
        let requested = lock(device).state().requested_size();
        if lock_hotplug(hotplug).stage_ahead(requested, STAGE_STEP) == 0 {
            break;
        }
    }
}

/// One round of requests: each taken and committed under the device lock, its host work
/// done under the hotplug lock only.
fn serve_round(device: &SharedVirtioMem, hotplug: &SharedHotplug, mem: &GuestMemoryHandle) {
    let budget = lock(device).round_budget();
    let mut answered = 0;
    while answered < budget {
        let Some(mut taken) = lock(device).take_request(mem) else {
            break;
        };
        if let Some(work) = taken.host_work() {
            // The Arc's BlockBackend impl takes the hotplug lock for each call.
            work.run(&mut Arc::clone(hotplug));
        }
        if lock(device).finish_request(mem, taken).is_none() {
            break;
        }
        answered += 1;
    }
    if answered > 0 {
        lock(device).signal_used(mem);
    }
}

fn serve(
    device: SharedVirtioMem,
    hotplug: SharedHotplug,
    mem: GuestMemoryHandle,
    notify: EventFd,
    stop: EventFd,
) {
    // Open as long as the HotplugMemory lives, which this thread keeps alive.
    let release_timer = lock_hotplug(&hotplug).release_timer();
    let waiter = match Waiter::new(&notify, &stop, release_timer) {
        Ok(w) => w,
        Err(e) => {
            error!("virtio-mem: cannot wait for requests, the device stays silent: {e}");
            return;
        }
    };
    loop {
        match waiter.wait() {
            Wake::Stop => break,
            Wake::ReleaseTimer => {
                lock_hotplug(&hotplug).on_release_timer();
            }
            Wake::Notify => {
                // Non-blocking: a spurious wake-up just finds the queue empty.
                let _ = notify.read();
                let plugged = lock_hotplug(&hotplug).plugged_bytes();
                serve_round(&device, &hotplug, &mem);
                if lock_hotplug(&hotplug).plugged_bytes() > plugged {
                    stage_ahead(&device, &hotplug, &waiter);
                }
            }
        }
    }
}

impl VirtioDevice<GuestMemoryHandle> for VirtioMemMmio {
    fn device_type(&self) -> u32 {
        virtio_mem::wire::VIRTIO_ID_MEM
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[virtio_mem::queue::QUEUE_MAX_SIZE]
    }

    fn device_features(&self) -> u64 {
        lock(&self.device).state().device_features()
    }

    fn features_acceptable(&self, features: u64) -> bool {
        match lock(&self.device).state().check_features(features) {
            Ok(()) => true,
            Err(e) => {
                warn!("virtio-mem: refusing the driver's features: {e}");
                false
            }
        }
    }

    fn ack_features(&mut self, features: u64) {
        if let Err(e) = lock(&self.device).state_mut().ack_features(features) {
            warn!("virtio-mem: {e}");
        }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // Trace level: a guest can read as often as it likes (off unless asked for).
        log::trace!(
            "virtio-mem: guest reads config at {offset:#x}+{}",
            data.len()
        );
        lock(&self.device).read_config(offset, data);
    }

    fn config_generation(&self) -> u32 {
        lock(&self.device).state().config_generation()
    }

    fn set_interrupt(&mut self, interrupt: Arc<dyn VirtioInterrupt>) {
        *self.irq.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(interrupt);
    }

    fn activate(&mut self, activation: Activation<GuestMemoryHandle>) -> Result<(), ActivateError> {
        self.set_interrupt(activation.interrupt.clone());
        let q = activation
            .queues
            .into_iter()
            .find(|q| q.index == 0)
            .ok_or(ActivateError::MissingQueue { index: 0 })?;
        self.stop_worker();
        lock(&self.device).activate(q.queue);
        let stop = EventFd::new(EFD_NONBLOCK).map_err(|e| ActivateError::Setup(e.to_string()))?;
        let stop_copy = stop
            .try_clone()
            .map_err(|e| ActivateError::Setup(e.to_string()))?;
        let device = Arc::clone(&self.device);
        let hotplug = Arc::clone(&self.hotplug);
        let mem = activation.mem;
        let thread = std::thread::Builder::new()
            .name("virtio-mem".into())
            .spawn(move || serve(device, hotplug, mem, q.notify, stop_copy))
            .map_err(|e| ActivateError::Setup(e.to_string()))?;
        self.worker = Some(Worker { stop, thread });
        info!("virtio-mem: driver ready");
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_worker();
        lock(&self.device).reset();
        // No request thread is left to do it once the guest goes quiet.
        let mut hotplug = lock_hotplug(&self.hotplug);
        hotplug.discard_staged();
        hotplug.release_idle_slots();
    }
}

/// The memory API's view of the device. It never takes the hotplug memory's lock, which
/// the request thread holds during host work, nor measures host memory itself.
pub struct MemoryApi {
    device: SharedVirtioMem,
    region: Arc<memory_backend::MemoryRegion>,
    capacity: Arc<Mutex<Capacity>>,
    bad_accesses: std::sync::OnceLock<crate::vm::BadAccesses>,
    resident: ResidentSampler,
    registered_slots: Arc<AtomicU64>,
    events: Arc<EventBus>,
    /// Stops the event watcher when the API goes (it ends when this is dropped).
    _watcher: mpsc::Sender<()>,
}

/// How often the event watcher looks at the device.
const WATCH_EVERY: Duration = Duration::from_millis(250);
/// Progress events come at most this often.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// What the watcher saw last, to publish only changes.
#[derive(Default)]
struct Seen {
    bound: bool,
    host_error: Option<String>,
    state: Option<virtio_mem::ResizeState>,
    plugged: u64,
    last_progress: Option<Instant>,
}

/// Looks at the device every [`WATCH_EVERY`] and publishes what changed: driver ready or
/// reset, host errors, progress (at most once a second), done, stalled.
fn watch(
    device: SharedVirtioMem,
    capacity: Arc<Mutex<Capacity>>,
    events: Arc<EventBus>,
    stop: mpsc::Receiver<()>,
) {
    let mut seen = Seen::default();
    while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(WATCH_EVERY) {
        // Lock order: capacity, then balloon (the sample), then device.
        let change = {
            let mut c = lock_capacity(&capacity);
            if c.is_on() {
                let sample = c.sample();
                c.tick(Instant::now(), sample, &mut lock(&device))
            } else {
                None
            }
        };
        if let Some((from, to, reason)) = change {
            events.publish(EventKind::Autosize { from, to, reason });
        }
        let (bound, host_error, p, plugged, requested) = {
            let dev = lock(&device);
            let s = dev.state();
            (
                s.acked_features() != 0,
                s.host_error().map(str::to_string),
                s.progress(Instant::now()),
                s.plugged_size(),
                s.requested_size(),
            )
        };
        if bound != seen.bound {
            events.publish(if bound {
                EventKind::DriverReady
            } else {
                EventKind::Reset
            });
            seen.bound = bound;
        }
        if host_error != seen.host_error {
            events.publish(EventKind::HostError {
                error: host_error.clone(),
            });
            seen.host_error = host_error;
        }
        let state = p.state;
        let changed = seen.state != Some(state);
        match state {
            virtio_mem::ResizeState::Idle => {
                if changed && seen.state.is_some() {
                    events.publish(EventKind::Done {
                        plugged_size: plugged,
                    });
                }
            }
            virtio_mem::ResizeState::Stalled => {
                if changed {
                    events.publish(EventKind::Stalled {
                        plugged_size: plugged,
                        requested_size: requested,
                        reason: p.reason.map(|r| r.message()).unwrap_or_default(),
                    });
                }
            }
            virtio_mem::ResizeState::Plugging | virtio_mem::ResizeState::Unplugging => {
                let due = seen
                    .last_progress
                    .is_none_or(|t| t.elapsed() >= PROGRESS_EVERY);
                if changed || (due && plugged != seen.plugged) {
                    events.publish(EventKind::Progress {
                        state: api_state(state),
                        plugged_size: plugged,
                        requested_size: requested,
                        rate_bytes_per_s: p.rate_bytes_per_s,
                        eta_s: p.eta_s.map(|s| whole_secs(s).saturating_add(1)),
                    });
                    seen.last_progress = Some(Instant::now());
                    seen.plugged = plugged;
                }
            }
        }
        seen.state = Some(state);
    }
}

fn api_state(s: virtio_mem::ResizeState) -> ResizeState {
    match s {
        virtio_mem::ResizeState::Idle => ResizeState::Idle,
        virtio_mem::ResizeState::Plugging => ResizeState::Plugging,
        virtio_mem::ResizeState::Unplugging => ResizeState::Unplugging,
        virtio_mem::ResizeState::Stalled => ResizeState::Stalled,
    }
}

/// Samples of the region's host-resident bytes are refreshed when a GET finds the last
/// one older than this.
const RESIDENT_MAX_AGE: Duration = Duration::from_secs(1);

/// Measures the region's host-resident bytes on a thread of its own, when asked. The
/// measure walks the page tables of the whole region (milliseconds per populated GiB, and
/// longer while populate or discard holds the process's mmap lock), so an API answer
/// gives the latest sample and its age instead of waiting for a new one.
struct ResidentSampler {
    latest: Arc<Mutex<Option<(Instant, u64)>>>,
    /// Asks for a sample; the thread ends when this is dropped.
    refresh: mpsc::SyncSender<()>,
}

impl ResidentSampler {
    fn start(region: Arc<memory_backend::MemoryRegion>) -> Self {
        let latest = Arc::new(Mutex::new(None));
        // One pending request is enough: a sample taken after it covers them all.
        let (refresh, requests) = mpsc::sync_channel::<()>(1);
        let out = Arc::clone(&latest);
        let sample = move || match region.usage() {
            Ok(u) => {
                *out.lock().unwrap_or_else(PoisonError::into_inner) =
                    Some((Instant::now(), u.committed()));
            }
            Err(e) => warn!("virtio-mem: cannot read the region's host memory: {e}"),
        };
        let spawned = std::thread::Builder::new()
            .name("vmm-resident".into())
            .spawn(move || {
                sample();
                while requests.recv().is_ok() {
                    sample();
                }
            });
        if let Err(e) = spawned {
            warn!("virtio-mem: no thread to measure host memory, GET reports 0: {e}");
        }
        ResidentSampler { latest, refresh }
    }

    /// The latest sample (bytes, age in ms); asks for a new one when it is old.
    fn get(&self) -> (u64, u64) {
        let latest = *self.latest.lock().unwrap_or_else(PoisonError::into_inner);
        let age = latest.map(|(at, _)| at.elapsed());
        if age.is_none_or(|a| a > RESIDENT_MAX_AGE) {
            // Full: a sample is coming anyway. Disconnected: reported at start.
            let _ = self.refresh.try_send(());
        }
        let age_ms = age.map_or(0, |a| u64::try_from(a.as_millis()).unwrap_or(u64::MAX));
        (latest.map_or(0, |(_, bytes)| bytes), age_ms)
    }
}

impl MemoryApi {
    /// Serves `device`, whose host memory is `region`; `registered_slots` is the hotplug
    /// memory's count of KVM slots ([`HotplugMemory::registered_slots_gauge`]).
    pub fn new(
        device: SharedVirtioMem,
        region: Arc<memory_backend::MemoryRegion>,
        registered_slots: Arc<AtomicU64>,
    ) -> Self {
        let events = Arc::new(EventBus::new());
        let (stop, stopped) = mpsc::channel();
        let capacity = {
            let s = lock(&device);
            let layout = s.state().config().layout;
            Arc::new(Mutex::new(Capacity::new(
                layout.block_size(),
                layout.size(),
            )))
        };
        let (d, c, e) = (
            Arc::clone(&device),
            Arc::clone(&capacity),
            Arc::clone(&events),
        );
        if let Err(err) = std::thread::Builder::new()
            .name("vmm-events".into())
            .spawn(move || watch(d, c, e, stopped))
        {
            warn!("virtio-mem: no thread to watch the device, GET /v1/events stays quiet: {err}");
        }
        MemoryApi {
            device,
            resident: ResidentSampler::start(Arc::clone(&region)),
            region,
            capacity,
            bad_accesses: std::sync::OnceLock::new(),
            registered_slots,
            events,
            _watcher: stop,
        }
    }

    /// The size the guest is asked to plug now.
    pub fn requested_size(&self) -> u64 {
        lock(&self.device).state().requested_size()
    }

    /// Where `GET /metrics` finds the counts of guest accesses nothing could answer
    /// (set once, when every device is in place).
    pub fn set_bad_accesses(&self, counts: crate::vm::BadAccesses) {
        if self.bad_accesses.set(counts).is_err() {
            warn!("virtio-mem: bad access counts given twice; keeping the first");
        }
    }

    /// The plugged blocks, where the balloon may discard what the guest reports free.
    pub fn plugged_blocks(&self) -> PluggedBlocks {
        PluggedBlocks::new(Arc::clone(&self.device), Arc::clone(&self.region))
    }

    /// Feeds automatic sizing from `balloon`'s statistics, plugging at most `cap` bytes,
    /// and turns it on with `policy` if given.
    ///
    /// # Errors
    ///
    /// [`CapacityError`] when the policy does not fit the device (nothing is on then).
    pub fn attach_balloon(
        &self,
        balloon: SharedBalloon,
        cap: u64,
        policy: Option<AutosizePolicy>,
    ) -> Result<(), CapacityError> {
        let mut c = lock_capacity(&self.capacity);
        c.attach_balloon(balloon, cap);
        c.set_policy(policy)
    }
}

fn lock_capacity(c: &Mutex<Capacity>) -> MutexGuard<'_, Capacity> {
    // Every update of the controller's state is a whole assignment: a panic elsewhere
    // cannot leave it half-done.
    c.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Whole seconds of `s` (saturating; never panics on odd floats).
fn whole_secs(s: f64) -> u64 {
    Duration::try_from_secs_f64(s).map_or(u64::MAX, |d| d.as_secs())
}

fn answers(c: &virtio_mem::metrics::AnswerCounts) -> [(&'static str, u64); 4] {
    [
        ("ack", c.ack),
        ("nack", c.nack),
        ("busy", c.busy),
        ("error", c.error),
    ]
}

fn histogram(m: &mut MetricsText, name: &str, help: &str, h: &virtio_mem::Histogram) {
    // Nanoseconds to seconds for the format; precision loss is far below a bucket.
    let sum_s = h.sum_ns as f64 / 1e9;
    m.histogram(name, help, &HOST_TIME_BUCKETS_S, &h.buckets, sum_s, h.count);
}

impl MemoryControl for MemoryApi {
    fn metrics(&self) -> String {
        let counters = *lock(&self.device).state().metrics();
        let mut m = MetricsText::new();
        m.status(&self.status());
        let mut samples: Vec<([(&str, &str); 2], u64)> = Vec::new();
        for (kind, c) in [
            ("plug", &counters.plug),
            ("unplug", &counters.unplug),
            ("unplug_all", &counters.unplug_all),
            ("state", &counters.state),
        ] {
            for (resp, v) in answers(c) {
                samples.push(([("type", kind), ("response", resp)], v));
            }
        }
        samples.push((
            [("type", "unsupported"), ("response", "error")],
            counters.unsupported,
        ));
        let requests: Vec<(&[(&str, &str)], u64)> =
            samples.iter().map(|(l, v)| (l.as_slice(), *v)).collect();
        m.counter(
            "virtio_mem_requests_total",
            "Guest requests by type and the device's answer.",
            &requests,
        );
        m.counter(
            "virtio_mem_plugged_bytes_total",
            "Bytes the host plugged for the guest.",
            &[(&[], counters.bytes_plugged)],
        );
        m.counter(
            "virtio_mem_unplugged_bytes_total",
            "Bytes the host unplugged for the guest.",
            &[(&[], counters.bytes_unplugged)],
        );
        m.counter(
            "virtio_mem_malformed_chains_total",
            "Descriptor chains that were not a valid request (counted, answered, ignored).",
            &[(&[], counters.malformed_chains)],
        );
        m.counter(
            "virtio_mem_host_failures_total",
            "Host work that failed (answered BUSY or ERROR; see host_error).",
            &[(&[], counters.backend_failures)],
        );
        m.counter(
            "virtio_mem_queue_errors_total",
            "Used-ring writes or interrupts that failed.",
            &[(&[], counters.queue_errors)],
        );
        histogram(
            &mut m,
            "virtio_mem_plug_host_seconds",
            "Host time of each plug request (populate, KVM slots).",
            &counters.plug_host_time,
        );
        histogram(
            &mut m,
            "virtio_mem_unplug_host_seconds",
            "Host time of each unplug request (discard, protection, KVM slots).",
            &counters.unplug_host_time,
        );
        m.gauge(
            "kvm_slots_registered",
            "KVM memory slots the virtio-mem region has registered.",
            self.registered_slots.load(Ordering::Relaxed),
        );
        if let Some(bad) = self.bad_accesses.get() {
            let counts = bad.counts();
            let labels: Vec<[(&str, &str); 1]> =
                counts.iter().map(|(w, _)| [("where", *w)]).collect();
            let samples: Vec<(&[(&str, &str)], u64)> = labels
                .iter()
                .zip(&counts)
                .map(|(l, (_, n))| (l.as_slice(), *n))
                .collect();
            m.counter(
                "bad_guest_accesses_total",
                "Guest MMIO and port accesses nothing could answer (wrong width, unknown or \
                 read-only register, no device there): a working guest makes none.",
                &samples,
            );
        }
        if let Some(b) = lock_capacity(&self.capacity).balloon_counters() {
            for (name, help, v) in [
                (
                    "virtio_balloon_stats_updates_total",
                    "Statistics buffers the guest's balloon driver sent.",
                    b.stats_updates,
                ),
                (
                    "virtio_balloon_stats_malformed_total",
                    "Statistics buffers that could not be read (counted, ignored).",
                    b.stats_malformed,
                ),
                (
                    "virtio_balloon_reported_bytes_total",
                    "Bytes the guest reported free that the host discarded.",
                    b.reported_bytes,
                ),
                (
                    "virtio_balloon_reports_refused_total",
                    "Reported ranges refused: unaligned, or not in boot RAM or plugged blocks.",
                    b.reports_refused,
                ),
            ] {
                m.counter(name, help, &[(&[], v)]);
            }
        }
        m.finish()
    }

    fn status(&self) -> MemoryStatus {
        let dev = lock(&self.device);
        let s = dev.state();
        let mut status = MemoryStatus {
            region_addr: s.config().layout.addr(),
            region_size: s.config().layout.size(),
            block_size: s.block_size(),
            usable_region_size: s.usable_region_size(),
            plugged_size: s.plugged_size(),
            requested_size: s.requested_size(),
            host_resident_bytes: 0,
            host_resident_age_ms: 0,
            host_error: s.host_error().map(str::to_string),
            ..MemoryStatus::default()
        };
        let p = s.progress(Instant::now());
        status.state = api_state(p.state);
        status.progress = Progress {
            moved_bytes: p.moved_bytes,
            remaining_bytes: p.remaining_bytes,
            rate_bytes_per_s: p.rate_bytes_per_s,
            eta_s: p.eta_s.map(|s| whole_secs(s).saturating_add(1)),
        };
        status.stalled_for_s = p.stalled_for_s.map(whole_secs);
        status.reason = p.reason.map(|r| r.message());
        drop(dev);
        (status.host_resident_bytes, status.host_resident_age_ms) = self.resident.get();
        status.autosize = lock_capacity(&self.capacity).status(Instant::now());
        status
    }

    fn set_autosize(&self, req: AutosizeRequest) -> Result<MemoryStatus, AutosizeError> {
        let policy = match req {
            AutosizeRequest::Off => None,
            AutosizeRequest::On(p) => Some(p),
        };
        lock_capacity(&self.capacity)
            .set_policy(policy)
            .map_err(|e| match e {
                CapacityError::NoBalloon => AutosizeError::Unsupported(e.to_string()),
                CapacityError::Policy(_) => AutosizeError::Invalid(e.to_string()),
            })?;
        Ok(self.status())
    }

    fn events(&self) -> Option<&EventBus> {
        Some(&self.events)
    }

    fn resize(&self, requested_size: u64) -> Result<MemoryStatus, ResizeError> {
        if lock_capacity(&self.capacity).is_on() {
            return Err(ResizeError::AutosizeOn);
        }
        let mut dev = lock(&self.device);
        let plugged_size = dev.state().plugged_size();
        dev.set_requested_size(requested_size)
            .map_err(|e| match e {
                VirtioMemError::UnalignedRequestedSize { size, block_size } => {
                    ResizeError::Unaligned { size, block_size }
                }
                VirtioMemError::RequestedSizeTooBig { size, region_size } => {
                    ResizeError::TooBig { size, region_size }
                }
                other => ResizeError::Unavailable(other.to_string()),
            })?;
        drop(dev);
        self.events.publish(EventKind::ResizeRequested {
            requested_size,
            plugged_size,
        });
        Ok(self.status())
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]
mod tests {
    use super::*;
    use memory_backend::{MemoryRegion, RegionConfig};

    const MIB: u64 = 1 << 20;

    /// Polls `sampler` until its figure satisfies `want` (at most 10 s).
    fn wait_for(sampler: &ResidentSampler, want: impl Fn(u64) -> bool) -> (u64, u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = sampler.get();
            if want(got.0) || Instant::now() > deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn host_memory_is_sampled_off_the_answer_and_refreshed_when_old() {
        let region =
            Arc::new(MemoryRegion::new(RegionConfig::sized(8 * MIB, 2 * MIB).unwrap()).unwrap());
        let sampler = ResidentSampler::start(Arc::clone(&region));
        // The first sample is taken at start.
        let deadline = Instant::now() + Duration::from_secs(10);
        while sampler.latest.lock().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let (bytes, age_ms) = sampler.get();
        assert_eq!(bytes, 0);
        assert!(age_ms < 1000, "fresh sample, {age_ms} ms old");
        region.plug(0, 2 * MIB).unwrap();
        // SAFETY: the first 2 MiB of the region were just plugged (read-write) and the
        // region outlives this write.
        unsafe { region.host_addr().write_bytes(1, 2 << 20) };
        // A GET within the second still answers from the old sample ...
        assert_eq!(sampler.get().0, 0);
        // ... and once it is older than that, GETs bring a new one.
        std::thread::sleep(RESIDENT_MAX_AGE + Duration::from_millis(100));
        let (bytes, _) = wait_for(&sampler, |b| b >= 2 * MIB);
        assert_eq!(bytes, 2 * MIB);
    }
}
