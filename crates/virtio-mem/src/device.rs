//! The virtio-mem state machine: block state, sizes, and the answer to every request.
//!
//! Requests are handled in layers, as the style guide asks: validate (alignment, non-zero,
//! checked range inside the usable region, current block state) -> act (the backend does
//! the host work, which may fail) -> commit (bitmap and `plugged_size`) -> respond. Nothing
//! is committed before the host work succeeded, so a failed request changes nothing. The
//! act step needs nothing of the device ([`PlugState::prepare`], [`HostWork::run`],
//! [`PlugState::commit`]), so a VMM can do it without holding the device: reads of the
//! configuration and resizes are then never held up by populate or memslot work.
//!
//! Response choice follows the spec (and `tests/conformance.rs` checks it): ERROR only
//! for requests that are invalid by the spec, NACK only for a PLUG beyond
//! `requested_size`, BUSY only for transient host failure.

use std::ops::Range;

use std::time::{Duration, Instant};

use log::{debug, error, info, warn};

use block_layout::{BlockLayout, LayoutError};

use crate::backend::{BackendError, BlockBackend};
use crate::bitmap::BlockBitmap;
use crate::metrics::{Metrics, RateLimit};
use crate::progress::{ResizeProgress, ResizeTracker};
use crate::wire::{
    BlockState, ConfigSpace, Request, Response, VIRTIO_F_VERSION_1, VIRTIO_MEM_F_ACPI_PXM,
    VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE,
};

/// Default headroom of the usable region above `requested_size`. Linux plugs in units of
/// its memory block (128 MiB on x86-64) and may skip a memory block that it cannot fully
/// use, so two memory blocks of slack let it make progress (QEMU uses the same extent).
pub const DEFAULT_USABLE_MARGIN: u64 = 256 << 20;

/// Errors of device configuration, resize and feature negotiation.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VirtioMemError {
    /// The region's start, size or block size breaks a layout rule.
    #[error("virtio-mem region: {0}")]
    Layout(#[from] LayoutError),
    /// A requested size is not a multiple of the block size.
    #[error("requested size {size:#x} is not a multiple of the block size {block_size:#x}")]
    UnalignedRequestedSize {
        /// The size asked for.
        size: u64,
        /// Block size.
        block_size: u64,
    },
    /// A requested size is larger than the region.
    #[error("requested size {size:#x} is larger than the region size {region_size:#x}")]
    RequestedSizeTooBig {
        /// The size asked for.
        size: u64,
        /// Region size.
        region_size: u64,
    },
    /// The usable-region margin is not a multiple of the block size.
    #[error(
        "usable region margin {margin:#x} is not a multiple of the block size {block_size:#x}"
    )]
    UnalignedMargin {
        /// The margin asked for.
        margin: u64,
        /// Block size.
        block_size: u64,
    },
    /// The driver accepted features the device never offered.
    #[error("driver accepted features {unknown:#x} that the device did not offer")]
    FeatureNotOffered {
        /// The offending bits.
        unknown: u64,
    },
    /// The driver did not accept `VIRTIO_F_VERSION_1`; legacy drivers are not supported.
    #[error("driver did not accept VIRTIO_F_VERSION_1: a legacy driver cannot use this device")]
    Version1Required,
    /// The driver did not accept `UNPLUGGED_INACCESSIBLE` although the device requires it.
    #[error(
        "driver did not accept VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE: the guest kernel is too old \
         (Linux < 5.16); turn the unplugged-inaccessible requirement off to run it"
    )]
    UnpluggedInaccessibleRequired,
    /// The device was used before a queue was activated.
    #[error("the device has no active queue: the driver has not finished initialisation")]
    NotActivated,
    /// The backend failed while unplugging everything at system reset.
    #[error("system reset could not unplug all memory: {0}")]
    ResetUnplug(String),
}

/// The static description of a virtio-mem device, chosen by the operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Where the region is and its blocks.
    pub layout: BlockLayout,
    /// ACPI proximity domain of the region; offers `VIRTIO_MEM_F_ACPI_PXM` when set.
    pub node_id: Option<u16>,
    /// Requested size at start. The live value is the device's
    /// ([`PlugState::requested_size`]); this one is never updated.
    pub initial_requested_size: u64,
    /// Offer and require `VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE` (default on).
    pub unplugged_inaccessible: bool,
    /// Headroom of the usable region above `requested_size`.
    pub usable_margin: u64,
}

impl DeviceConfig {
    /// A configuration with the defaults: no node, nothing requested, unplugged memory
    /// inaccessible, default usable margin.
    pub fn new(layout: BlockLayout) -> Self {
        DeviceConfig {
            layout,
            node_id: None,
            initial_requested_size: 0,
            unplugged_inaccessible: true,
            usable_margin: DEFAULT_USABLE_MARGIN,
        }
    }

    /// Shorthand for tests and tools: [`BlockLayout::new`], then [`DeviceConfig::new`].
    ///
    /// # Errors
    ///
    /// [`VirtioMemError::Layout`] when the three values are not a layout.
    pub fn with_layout(addr: u64, size: u64, block_size: u64) -> Result<Self, VirtioMemError> {
        Ok(DeviceConfig::new(BlockLayout::new(addr, size, block_size)?))
    }

    fn validate(&self) -> Result<(), VirtioMemError> {
        // The layout is valid by construction; what remains is the device's own.
        let bs = self.layout.block_size();
        if self.usable_margin % bs != 0 {
            return Err(VirtioMemError::UnalignedMargin {
                margin: self.usable_margin,
                block_size: bs,
            });
        }
        check_size(self.initial_requested_size, bs, self.layout.size())
    }
}

fn check_size(size: u64, block_size: u64, region_size: u64) -> Result<(), VirtioMemError> {
    if size % block_size != 0 {
        return Err(VirtioMemError::UnalignedRequestedSize { size, block_size });
    }
    if size > region_size {
        return Err(VirtioMemError::RequestedSizeTooBig { size, region_size });
    }
    Ok(())
}

/// What a resize changed, so the caller knows which notifications are due.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResizeOutcome {
    /// `requested_size` before the call.
    pub old_requested: u64,
    /// `usable_region_size` after the call.
    pub usable_region_size: u64,
}

/// The device state proper, without queue or interrupt: sizes, block bitmap, features.
///
/// Drive it through [`crate::VirtioMem`] (which adds the queue and notifications); the
/// state is public so tests and the VMM can read it.
#[derive(Debug)]
pub struct PlugState<B> {
    cfg: DeviceConfig,
    usable_region_size: u64,
    requested_size: u64,
    bitmap: BlockBitmap,
    backend: B,
    acked_features: u64,
    config_generation: u32,
    metrics: Metrics,
    /// A [`HostWork`] was prepared and is not committed yet.
    work_in_flight: bool,
    /// The last host failure, until host work succeeds again.
    host_error: Option<String>,
    /// BUSY answers can come once per guest retry: their log lines are rate-limited.
    busy_log: RateLimit,
    /// Where the current resize stands.
    resize: ResizeTracker,
}

/// The result of [`PlugState::prepare`].
#[derive(Debug)]
pub enum Prepared {
    /// Answered without host work.
    Answered(Response),
    /// Host work to run, then commit.
    Work(HostWork),
}

/// A block range with its guest-physical span.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Run {
    blocks: Range<u64>,
    gpa: u64,
    len: u64,
}

/// The host work of one request (plug or unplug of one or more runs of blocks), decided by
/// [`PlugState::prepare`], done by [`HostWork::run`] without the device, committed by
/// [`PlugState::commit`].
#[derive(Debug)]
#[must_use = "prepared host work must be committed, or the device answers BUSY forever"]
pub struct HostWork {
    request: Request,
    unplug: bool,
    runs: Vec<Run>,
    /// How many runs (a prefix) the backend completed.
    done: usize,
    /// What stopped the rest.
    error: Option<BackendError>,
    /// Time the backend took.
    host_time: Duration,
}

impl HostWork {
    fn new(request: Request, unplug: bool, runs: Vec<Run>) -> Self {
        HostWork {
            request,
            unplug,
            runs,
            done: 0,
            error: None,
            host_time: Duration::ZERO,
        }
    }

    /// The request this work answers.
    pub fn request(&self) -> Request {
        self.request
    }

    /// Bytes of guest memory this work plugs or unplugs.
    pub fn bytes(&self) -> u64 {
        self.runs.iter().map(|r| r.len).sum()
    }

    /// Plugs or unplugs the runs on `backend`, in order, stopping at the first failure.
    /// Runs once; a second call does nothing.
    pub fn run<B: BlockBackend>(&mut self, backend: &mut B) {
        let start = Instant::now();
        while self.error.is_none() && self.done < self.runs.len() {
            let run = &self.runs[self.done];
            let result = if self.unplug {
                backend.unplug(run.gpa, run.len)
            } else {
                backend.plug(run.gpa, run.len)
            };
            match result {
                Ok(()) => self.done += 1,
                Err(e) => self.error = Some(e),
            }
        }
        self.host_time += start.elapsed();
    }
}

impl<B: BlockBackend> PlugState<B> {
    /// Validates `cfg` and builds a device with every block unplugged.
    ///
    /// # Errors
    ///
    /// A [`VirtioMemError`] naming the invalid parameter.
    pub fn new(cfg: DeviceConfig, backend: B) -> Result<Self, VirtioMemError> {
        cfg.validate()?;
        let nr_blocks = cfg.layout.nr_blocks();
        let mut state = PlugState {
            usable_region_size: 0,
            requested_size: cfg.initial_requested_size,
            bitmap: BlockBitmap::new(nr_blocks),
            backend,
            acked_features: 0,
            config_generation: 0,
            metrics: Metrics::default(),
            work_in_flight: false,
            host_error: None,
            busy_log: RateLimit::new(Duration::from_secs(10), 5),
            resize: ResizeTracker::new(Instant::now(), 0),
            cfg,
        };
        state.usable_region_size = state.usable_target();
        Ok(state)
    }

    /// The usable region size that covers `requested_size` plus the margin.
    fn usable_target(&self) -> u64 {
        // Both terms are at most region_size + margin, and the sum saturates rather than
        // wraps; the result is a multiple of block_size because both terms are.
        self.requested_size
            .saturating_add(self.cfg.usable_margin)
            .min(self.cfg.layout.size())
    }

    /// The static configuration.
    pub fn config(&self) -> &DeviceConfig {
        &self.cfg
    }

    /// Block size in bytes.
    pub fn block_size(&self) -> u64 {
        self.cfg.layout.block_size()
    }

    /// Size of the part of the region the driver may plug into.
    pub fn usable_region_size(&self) -> u64 {
        self.usable_region_size
    }

    /// Bytes currently plugged.
    pub fn plugged_size(&self) -> u64 {
        // Cannot overflow: plugged blocks * block_size <= region_size, a u64.
        self.bitmap.plugged() * self.cfg.layout.block_size()
    }

    /// The size the host asks the driver to plug.
    pub fn requested_size(&self) -> u64 {
        self.requested_size
    }

    /// The block bitmap (read-only).
    pub fn bitmap(&self) -> &BlockBitmap {
        &self.bitmap
    }

    /// The backend (read-only), e.g. to read its host memory figures.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend, for the owner's bookkeeping.
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// Request and response counters.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub(crate) fn metrics_mut(&mut self) -> &mut Metrics {
        &mut self.metrics
    }

    /// A counter that changes whenever any configuration field changes; the transport
    /// exposes it as its config generation so the driver can read 64-bit fields safely.
    pub fn config_generation(&self) -> u32 {
        self.config_generation
    }

    fn bump_generation(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
    }

    /// The configuration space as the driver sees it now.
    pub fn config_space(&self) -> ConfigSpace {
        ConfigSpace {
            block_size: self.cfg.layout.block_size().into(),
            node_id: self.cfg.node_id.unwrap_or(0).into(),
            padding: [0; 6],
            addr: self.cfg.layout.addr().into(),
            region_size: self.cfg.layout.size().into(),
            usable_region_size: self.usable_region_size.into(),
            plugged_size: self.plugged_size().into(),
            requested_size: self.requested_size.into(),
        }
    }

    /// Features the device offers: `VIRTIO_F_VERSION_1`, `ACPI_PXM` when a node is set,
    /// `UNPLUGGED_INACCESSIBLE` unless turned off.
    pub fn device_features(&self) -> u64 {
        let mut f = 1u64 << VIRTIO_F_VERSION_1;
        if self.cfg.node_id.is_some() {
            f |= 1 << VIRTIO_MEM_F_ACPI_PXM;
        }
        if self.cfg.unplugged_inaccessible {
            f |= 1 << VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE;
        }
        f
    }

    /// Features the driver accepted (valid after [`PlugState::ack_features`]).
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Checks and records the driver's features (the transport calls this when the driver
    /// sets FEATURES_OK; an error means FEATURES_OK must not be set).
    ///
    /// # Errors
    ///
    /// [`VirtioMemError::FeatureNotOffered`], [`VirtioMemError::Version1Required`] or
    /// [`VirtioMemError::UnpluggedInaccessibleRequired`].
    pub fn ack_features(&mut self, driver: u64) -> Result<(), VirtioMemError> {
        self.check_features(driver)?;
        self.acked_features = driver;
        Ok(())
    }

    /// Checks the driver's features without recording them (for a transport that decides
    /// on FEATURES_OK before it acknowledges).
    ///
    /// # Errors
    ///
    /// As [`PlugState::ack_features`].
    pub fn check_features(&self, driver: u64) -> Result<(), VirtioMemError> {
        let unknown = driver & !self.device_features();
        if unknown != 0 {
            return Err(VirtioMemError::FeatureNotOffered { unknown });
        }
        if driver & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(VirtioMemError::Version1Required);
        }
        // With the flag offered, unplugged memory really is unreachable (no memslot, no
        // mapping): a driver that might read it (e.g. for a dump) must not run.
        if self.cfg.unplugged_inaccessible
            && driver & (1 << VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE) == 0
        {
            return Err(VirtioMemError::UnpluggedInaccessibleRequired);
        }
        Ok(())
    }

    /// Sets the size the driver should plug. Grows the usable region if needed (never
    /// shrinks it) and bumps the config generation. The caller must send the
    /// config-change notification ([`crate::VirtioMem::set_requested_size`] does).
    ///
    /// # Errors
    ///
    /// [`VirtioMemError::UnalignedRequestedSize`] or [`VirtioMemError::RequestedSizeTooBig`];
    /// nothing changes then.
    pub fn set_requested_size(&mut self, size: u64) -> Result<ResizeOutcome, VirtioMemError> {
        check_size(size, self.cfg.layout.block_size(), self.cfg.layout.size())?;
        let old_requested = self.requested_size;
        self.requested_size = size;
        self.resize
            .resize_started(Instant::now(), self.plugged_size());
        self.usable_region_size = self.usable_region_size.max(self.usable_target());
        self.bump_generation();
        info!(
            "virtio-mem: requested size {:#x} -> {:#x} (plugged {:#x}, usable {:#x})",
            old_requested,
            size,
            self.plugged_size(),
            self.usable_region_size
        );
        Ok(ResizeOutcome {
            old_requested,
            usable_region_size: self.usable_region_size,
        })
    }

    /// The block range of a request, or `None` if the spec makes it invalid: unaligned
    /// address, zero blocks, or any part outside `[addr, addr + usable_region_size)`.
    fn block_range(&self, addr: u64, nb_blocks: u16) -> Option<Range<u64>> {
        let bs = self.cfg.layout.block_size();
        if nb_blocks == 0 {
            return None;
        }
        let offset = addr.checked_sub(self.cfg.layout.addr())?;
        if offset % bs != 0 {
            return None;
        }
        let len = u64::from(nb_blocks).checked_mul(bs)?;
        let end = offset.checked_add(len)?;
        if end > self.usable_region_size {
            return None;
        }
        let first = offset / bs;
        Some(first..first + u64::from(nb_blocks))
    }

    fn range_addr(&self, blocks: &Range<u64>) -> (u64, u64) {
        // Cannot overflow: blocks lie inside the region, whose end fits in u64 (validated).
        let bs = self.cfg.layout.block_size();
        (
            self.cfg.layout.addr() + blocks.start * bs,
            (blocks.end - blocks.start) * bs,
        )
    }

    /// Answers one request, doing its host work on the device's own backend. Counts it in
    /// the metrics. [`PlugState::prepare`] and [`PlugState::commit`] are the same in two
    /// halves, for a caller that does the host work without holding the device.
    pub fn handle(&mut self, req: Request) -> Response {
        match self.prepare(req) {
            Prepared::Answered(resp) => resp,
            Prepared::Work(mut work) => {
                work.run(&mut self.backend);
                self.commit(work)
            }
        }
    }

    /// Validates a request. Requests that need no host work (STATE, invalid ones, a PLUG
    /// beyond the requested size) are answered and counted here; the others come back as
    /// [`HostWork`], to be run on the backend ([`HostWork::run`], which needs nothing of
    /// the device) and then given to [`PlugState::commit`]. Nothing changes until then.
    ///
    /// One request's host work at a time: while one is outstanding, further requests are
    /// answered BUSY (the driver retries), as a second could act on blocks the first is
    /// still changing.
    pub fn prepare(&mut self, req: Request) -> Prepared {
        let planned = match req {
            Request::Plug { addr, nb_blocks } => self.plan_plug(addr, nb_blocks),
            Request::Unplug { addr, nb_blocks } => self.plan_unplug(addr, nb_blocks),
            Request::UnplugAll => Ok(HostWork::new(
                req,
                true,
                self.bitmap
                    .plugged_runs()
                    .into_iter()
                    .map(|r| self.run_of(r))
                    .collect(),
            )),
            Request::State { addr, nb_blocks } => Err(match self.block_range(addr, nb_blocks) {
                Some(r) => Response::Ack(self.bitmap.state(r)),
                None => Response::Error,
            }),
            Request::Unsupported(_) => Err(Response::Error),
        };
        let planned = planned.and_then(|work| {
            if self.work_in_flight {
                warn!("virtio-mem: answering BUSY: a request's host work is still running");
                Err(Response::Busy)
            } else {
                Ok(work)
            }
        });
        match planned {
            Ok(work) => {
                self.work_in_flight = true;
                Prepared::Work(work)
            }
            Err(resp) => {
                self.metrics.count(&req, resp);
                self.resize.answered(Instant::now(), &req, resp, false);
                Prepared::Answered(resp)
            }
        }
    }

    /// Commits what the host work did (the runs it completed, even when a later one
    /// failed, so `plugged_size` always matches the host) and answers the request.
    pub fn commit(&mut self, work: HostWork) -> Response {
        self.work_in_flight = false;
        if work.done > 0 && self.host_error.take().is_some() {
            info!("virtio-mem: host memory works again");
        }
        for run in &work.runs[..work.done] {
            self.bitmap.set_range(run.blocks.clone(), !work.unplug);
            self.bump_generation();
        }
        let moved: u64 = work.runs[..work.done].iter().map(|r| r.len).sum();
        self.metrics.host_work(work.unplug, moved, work.host_time);
        let resp = match work.error {
            Some(e) => self.backend_failed(e),
            None => {
                if work.request == Request::UnplugAll {
                    // The spec lets the usable region shrink here, without a
                    // notification; it never goes below what requested_size needs.
                    let target = self.usable_target();
                    if target != self.usable_region_size {
                        self.usable_region_size = target;
                        self.bump_generation();
                    }
                }
                Response::Ack(None)
            }
        };
        self.metrics.count(&work.request, resp);
        self.resize
            .answered(Instant::now(), &work.request, resp, work.done > 0);
        resp
    }

    /// Where the current resize stands at `now`: moving, done or stalled, and why.
    pub fn progress(&self, now: Instant) -> ResizeProgress {
        self.resize.progress(
            now,
            self.plugged_size(),
            self.requested_size,
            self.acked_features != 0,
            self.host_error.as_deref(),
        )
    }

    fn run_of(&self, blocks: Range<u64>) -> Run {
        let (gpa, len) = self.range_addr(&blocks);
        Run { blocks, gpa, len }
    }

    fn plan_plug(&self, addr: u64, nb_blocks: u16) -> Result<HostWork, Response> {
        let blocks = self.block_range(addr, nb_blocks).ok_or(Response::Error)?;
        if self.bitmap.state(blocks.clone()) != Some(BlockState::Unplugged) {
            return Err(Response::Error);
        }
        let run = self.run_of(blocks);
        // plugged_size + len cannot overflow (both <= region_size), but stay checked.
        match self.plugged_size().checked_add(run.len) {
            Some(total) if total <= self.requested_size => {}
            _ => return Err(Response::Nack),
        }
        Ok(HostWork::new(
            Request::Plug { addr, nb_blocks },
            false,
            vec![run],
        ))
    }

    fn plan_unplug(&self, addr: u64, nb_blocks: u16) -> Result<HostWork, Response> {
        let blocks = self.block_range(addr, nb_blocks).ok_or(Response::Error)?;
        if self.bitmap.state(blocks.clone()) != Some(BlockState::Plugged) {
            return Err(Response::Error);
        }
        Ok(HostWork::new(
            Request::Unplug { addr, nb_blocks },
            true,
            vec![self.run_of(blocks)],
        ))
    }

    fn backend_failed(&mut self, e: BackendError) -> Response {
        self.metrics.backend_failures += 1;
        let text = e.to_string();
        if e.transient {
            if let Some(dropped) = self.busy_log.allow() {
                warn!("virtio-mem: answering BUSY: {text} ({dropped} similar messages suppressed)");
            }
        } else if self.host_error.as_deref() != Some(text.as_str()) {
            error!(
                "virtio-mem: answering BUSY to a host failure that retrying will not mend: \
                 {text}; the guest keeps retrying until it is fixed (shown as host_error by \
                 GET /v1/memory)"
            );
        }
        self.host_error = Some(text);
        Response::Busy
    }

    /// The last host failure, until host work succeeds again: why the guest is answered
    /// BUSY (a short hugetlb pool, a refused memslot), for the operator.
    pub fn host_error(&self) -> Option<&str> {
        self.host_error.as_deref()
    }

    /// Device reset (driver re-probe, kdump kernel): forgets the negotiated features but
    /// keeps block state and contents, as the spec requires.
    pub fn device_reset(&mut self) {
        debug!(
            "virtio-mem: device reset, keeping {:#x} plugged",
            self.plugged_size()
        );
        self.acked_features = 0;
    }

    /// System reset (VM reboot): unplugs everything so the rebooted guest starts at 0
    /// plugged, keeps `requested_size`, and shrinks the usable region to fit it.
    ///
    /// # Errors
    ///
    /// [`VirtioMemError::ResetUnplug`] if the backend could not release some memory; the
    /// bitmap then still shows what stayed plugged.
    pub fn system_reset(&mut self) -> Result<(), VirtioMemError> {
        if self.work_in_flight {
            return Err(VirtioMemError::ResetUnplug(
                "a request's host work is still running; reset once it is committed".into(),
            ));
        }
        self.device_reset();
        for run in self.bitmap.plugged_runs() {
            let run = self.run_of(run);
            self.backend
                .unplug(run.gpa, run.len)
                .map_err(|e| VirtioMemError::ResetUnplug(e.to_string()))?;
            self.bitmap.set_range(run.blocks, false);
            self.bump_generation();
        }
        self.usable_region_size = self.usable_target();
        self.bump_generation();
        // The guest plugs the requested size again from nothing.
        self.resize.resize_started(Instant::now(), 0);
        Ok(())
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]
mod tests {
    use super::*;
    use crate::test_utils::{BackendCall, RecordingBackend};

    const BASE: u64 = 4 << 30;
    const BLOCK: u64 = 2 << 20;

    fn state() -> PlugState<RecordingBackend> {
        let mut s = PlugState::new(
            DeviceConfig::with_layout(BASE, 64 * BLOCK, BLOCK).unwrap(),
            RecordingBackend::default(),
        )
        .unwrap();
        s.set_requested_size(8 * BLOCK).unwrap();
        s
    }

    fn plug(addr: u64, nb_blocks: u16) -> Request {
        Request::Plug { addr, nb_blocks }
    }

    #[test]
    fn host_work_changes_nothing_until_committed() {
        let mut s = state();
        let Prepared::Work(mut work) = s.prepare(plug(BASE, 2)) else {
            panic!("a valid plug needs host work");
        };
        assert_eq!(work.bytes(), 2 * BLOCK);
        let mut other = RecordingBackend::default();
        work.run(&mut other);
        assert_eq!(
            other.calls,
            vec![BackendCall::Plug {
                addr: BASE,
                len: 2 * BLOCK
            }]
        );
        assert!(
            s.backend().calls.is_empty(),
            "the device's backend is not used"
        );
        assert_eq!(s.plugged_size(), 0, "not committed yet");
        // The operator resizes while the host work runs: nothing waits, nothing is lost.
        s.set_requested_size(0).unwrap();
        assert_eq!(s.commit(work), Response::Ack(None));
        assert_eq!(s.plugged_size(), 2 * BLOCK);
        assert_eq!(s.metrics().plug.ack, 1);
    }

    #[test]
    fn one_request_in_flight_at_a_time() {
        let mut s = state();
        let Prepared::Work(work) = s.prepare(plug(BASE, 1)) else {
            panic!("a valid plug needs host work");
        };
        assert!(matches!(
            s.prepare(plug(BASE + BLOCK, 1)),
            Prepared::Answered(Response::Busy)
        ));
        assert!(s.system_reset().is_err(), "reset waits for the commit");
        // Requests without host work are still answered.
        assert!(matches!(
            s.prepare(Request::State {
                addr: BASE,
                nb_blocks: 1
            }),
            Prepared::Answered(Response::Ack(Some(BlockState::Unplugged)))
        ));
        let mut w = work;
        w.run(s.backend_mut());
        s.commit(w);
        assert!(matches!(
            s.prepare(plug(BASE + BLOCK, 1)),
            Prepared::Work(_)
        ));
    }

    #[test]
    fn unplug_all_commits_the_runs_done_before_a_failure() {
        let mut s = state();
        assert_eq!(s.handle(plug(BASE, 1)), Response::Ack(None));
        assert_eq!(s.handle(plug(BASE + 4 * BLOCK, 2)), Response::Ack(None));
        let Prepared::Work(mut work) = s.prepare(Request::UnplugAll) else {
            panic!("unplug all needs host work");
        };
        let mut failing = RecordingBackend {
            fail_unplugs: 0,
            ..RecordingBackend::default()
        };
        // First run succeeds, the second fails.
        work.run(&mut FailSecond(&mut failing, 0));
        assert_eq!(s.commit(work), Response::Busy);
        assert_eq!(s.plugged_size(), 2 * BLOCK, "the first run is committed");
        assert_eq!(
            s.bitmap().state(4..6),
            Some(BlockState::Plugged),
            "the failed run stays plugged"
        );
    }

    /// Plugs fail permanently while `broken`.
    struct Broken(bool);

    impl BlockBackend for Broken {
        fn plug(&mut self, addr: u64, len: u64) -> Result<(), BackendError> {
            if self.0 {
                return Err(BackendError {
                    op: "plug",
                    addr,
                    len,
                    reason: "KVM memslot: invalid argument".into(),
                    transient: false,
                });
            }
            Ok(())
        }
        fn unplug(&mut self, _addr: u64, _len: u64) -> Result<(), BackendError> {
            Ok(())
        }
    }

    #[test]
    fn a_host_failure_is_kept_for_the_operator_until_host_work_succeeds() {
        let mut s = PlugState::new(
            DeviceConfig::with_layout(BASE, 64 * BLOCK, BLOCK).unwrap(),
            Broken(true),
        )
        .unwrap();
        s.set_requested_size(8 * BLOCK).unwrap();
        assert_eq!(s.handle(plug(BASE, 1)), Response::Busy);
        assert_eq!(s.handle(plug(BASE, 1)), Response::Busy);
        assert!(s.host_error().is_some_and(|e| e.contains("KVM memslot")));
        assert_eq!(s.metrics().backend_failures, 2);
        // The operator sees the resize stalled on the host, with the reason.
        let later = Instant::now() + crate::progress::STALL_AFTER + Duration::from_secs(1);
        let p = s.progress(later);
        assert_eq!(p.state, crate::ResizeState::Stalled);
        assert!(
            matches!(&p.reason, Some(crate::StallReason::HostBusy { host_error: Some(e) }) if e.contains("KVM memslot")),
            "{:?}",
            p.reason
        );
        assert_eq!(
            s.progress(Instant::now()).state,
            crate::ResizeState::Plugging
        );
        s.backend_mut().0 = false;
        assert_eq!(s.handle(plug(BASE, 1)), Response::Ack(None));
        assert_eq!(s.host_error(), None);
        assert_eq!(s.progress(Instant::now()).moved_bytes, BLOCK);
        // Transient failures are shown too (a short hugetlb pool), and go the same way.
        let mut t = state();
        t.backend_mut().fail_plugs = 1;
        assert_eq!(t.handle(plug(BASE, 1)), Response::Busy);
        assert!(t.host_error().is_some_and(|e| e.contains("injected")));
        assert_eq!(t.handle(plug(BASE, 1)), Response::Ack(None));
        assert_eq!(t.host_error(), None);
    }

    /// Fails every unplug after the first.
    struct FailSecond<'a>(&'a mut RecordingBackend, u32);

    impl BlockBackend for FailSecond<'_> {
        fn plug(&mut self, addr: u64, len: u64) -> Result<(), BackendError> {
            self.0.plug(addr, len)
        }
        fn unplug(&mut self, addr: u64, len: u64) -> Result<(), BackendError> {
            self.1 += 1;
            if self.1 > 1 {
                self.0.fail_unplugs = 1;
            }
            self.0.unplug(addr, len)
        }
    }
}
