//! The device with its request queue: pop a chain, parse, act, write the response, add
//! used, signal.
//!
//! A chain is a request when it has device-readable descriptors holding at least 24 bytes
//! followed by device-writable descriptors holding at least 10 bytes, all inside guest
//! memory, none empty, at most [`MAX_CHAIN_DESCRIPTORS`] long. Framing is free (the spec
//! forbids devices to assume it), so a request split over several buffers is fine. A
//! malformed chain never panics: it is answered ERROR when its writable buffers, up to the
//! first one outside guest memory, hold at least 10 bytes, and otherwise completed with
//! used length 0. Either way it is returned to the driver, counted, and logged
//! rate-limited. Guest memory is viewed afresh for each step (see
//! [`VirtioMem::process_queue`]): after an unplug, neither the answer nor a later chain
//! reaches the unplugged blocks; writes there fail and are handled by these same rules.

use std::time::Duration;

use log::{debug, error, trace, warn};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestAddressSpace, GuestMemory, Permissions};

use crate::backend::{BlockBackend, Interrupt};
use crate::device::{DeviceConfig, HostWork, PlugState, Prepared, ResizeOutcome, VirtioMemError};
use crate::metrics::RateLimit;
use crate::wire::{RawRequest, RawResponse, Request, Response, REQUEST_SIZE, RESPONSE_SIZE};

/// Longest descriptor chain accepted. Linux sends two descriptors per request; anything
/// far longer is a broken or hostile driver.
pub const MAX_CHAIN_DESCRIPTORS: usize = 16;

/// Used length of an answered request: the response size.
const RESPONSE_LEN: u32 = 10;
const _: () = assert!(RESPONSE_LEN as usize == RESPONSE_SIZE);

/// Size of the request queue the device offers.
pub const QUEUE_MAX_SIZE: u16 = 128;

/// Why a chain is not a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MalformedChain {
    /// More than [`MAX_CHAIN_DESCRIPTORS`] descriptors.
    TooManyDescriptors,
    /// A device-readable descriptor after a device-writable one.
    WrongDirection,
    /// A descriptor of length 0.
    ZeroLength,
    /// A buffer outside guest memory.
    OutsideGuestMemory,
    /// Fewer than 24 readable bytes.
    RequestTooShort,
    /// Fewer than 10 writable bytes.
    NoResponseBuffer,
}

/// The outcome of handling one chain, for tests and tracing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// Head index of the chain.
    pub head: u16,
    /// The parsed request, or why the chain was malformed.
    pub request: Result<Request, MalformedChain>,
    /// The response written, if any.
    pub response: Option<Response>,
    /// The used length reported to the driver.
    pub used_len: u32,
}

/// A chain split into its request bytes and its response buffers.
struct ParsedChain {
    readable: Vec<(GuestAddress, u32)>,
    writable: Vec<(GuestAddress, u32)>,
    error: Option<MalformedChain>,
}

fn parse_chain<M: GuestMemory>(mem: &M, chain: DescriptorChain<&M>) -> ParsedChain {
    let mut parsed = ParsedChain {
        readable: Vec::with_capacity(1),
        writable: Vec::with_capacity(1),
        error: None,
    };
    let set_error = |p: &mut ParsedChain, e| {
        p.error.get_or_insert(e);
    };
    let mut writable_broken = false;
    // The chain iterator itself stops after queue-size descriptors (loops included); the
    // extra `take` makes the bound ours.
    for (i, desc) in chain.take(MAX_CHAIN_DESCRIPTORS + 1).enumerate() {
        if i == MAX_CHAIN_DESCRIPTORS {
            set_error(&mut parsed, MalformedChain::TooManyDescriptors);
            break;
        }
        let len = desc.len();
        let in_memory = usize::try_from(len)
            .map(|l| mem.check_range(desc.addr(), l, Permissions::ReadWrite))
            .unwrap_or(false);
        if len == 0 {
            set_error(&mut parsed, MalformedChain::ZeroLength);
            continue;
        }
        if !in_memory {
            set_error(&mut parsed, MalformedChain::OutsideGuestMemory);
            // The response must start at the first writable byte and stay contiguous in
            // the chain: buffers past a bad one cannot hold it.
            writable_broken |= desc.is_write_only();
            continue;
        }
        if desc.is_write_only() {
            if !writable_broken {
                parsed.writable.push((desc.addr(), len));
            }
        } else if parsed.writable.is_empty() {
            parsed.readable.push((desc.addr(), len));
        } else {
            set_error(&mut parsed, MalformedChain::WrongDirection);
        }
    }
    let total = |bufs: &[(GuestAddress, u32)]| bufs.iter().map(|&(_, l)| u64::from(l)).sum::<u64>();
    if total(&parsed.readable) < REQUEST_SIZE as u64 {
        set_error(&mut parsed, MalformedChain::RequestTooShort);
    }
    if total(&parsed.writable) < RESPONSE_SIZE as u64 {
        set_error(&mut parsed, MalformedChain::NoResponseBuffer);
    }
    parsed
}

/// Copies `out.len()` bytes from the buffers, in order. `false` if guest memory failed.
fn gather<M: GuestMemory>(mem: &M, bufs: &[(GuestAddress, u32)], out: &mut [u8]) -> bool {
    let mut done = 0;
    for &(addr, len) in bufs {
        if done == out.len() {
            break;
        }
        let n = (out.len() - done).min(usize::try_from(len).unwrap_or(usize::MAX));
        if mem.read_slice(&mut out[done..done + n], addr).is_err() {
            return false;
        }
        done += n;
    }
    done == out.len()
}

/// Writes `data` across the buffers, in order. `false` if they are too small or guest
/// memory failed.
fn scatter<M: GuestMemory>(mem: &M, bufs: &[(GuestAddress, u32)], data: &[u8]) -> bool {
    let mut done = 0;
    for &(addr, len) in bufs {
        if done == data.len() {
            break;
        }
        let n = (data.len() - done).min(usize::try_from(len).unwrap_or(usize::MAX));
        if mem.write_slice(&data[done..done + n], addr).is_err() {
            return false;
        }
        done += n;
    }
    done == data.len()
}

/// A virtio-mem device: the state machine, its request queue and its interrupt line.
///
/// # Example
///
/// ```
/// use virtio_mem::{DeviceConfig, VirtioMem};
/// use virtio_mem::test_utils::{RecordingBackend, CountingInterrupt};
///
/// let cfg = DeviceConfig::with_layout(4 << 30, 1 << 30, 2 << 20).unwrap();
/// let mut dev = VirtioMem::new(cfg, RecordingBackend::default(), CountingInterrupt::default())
///     .unwrap();
/// dev.set_requested_size(256 << 20).unwrap();
/// assert_eq!(dev.state().requested_size(), 256 << 20);
/// assert_eq!(dev.interrupt().config_changes(), 1);
/// ```
#[derive(Debug)]
pub struct VirtioMem<B, I> {
    state: PlugState<B>,
    queue: Option<Queue>,
    interrupt: I,
    malformed_log: RateLimit,
    queue_error_log: RateLimit,
}

impl<B: BlockBackend, I: Interrupt> VirtioMem<B, I> {
    /// Builds the device. It has no queue until [`VirtioMem::activate`].
    ///
    /// # Errors
    ///
    /// A [`VirtioMemError`] naming the invalid configuration parameter.
    pub fn new(cfg: DeviceConfig, backend: B, interrupt: I) -> Result<Self, VirtioMemError> {
        Ok(VirtioMem {
            state: PlugState::new(cfg, backend)?,
            queue: None,
            interrupt,
            malformed_log: RateLimit::new(Duration::from_secs(5), 10),
            queue_error_log: RateLimit::new(Duration::from_secs(5), 10),
        })
    }

    /// The device state (sizes, bitmap, features, metrics).
    pub fn state(&self) -> &PlugState<B> {
        &self.state
    }

    /// The device state, mutable: feature negotiation and backend bookkeeping.
    pub fn state_mut(&mut self) -> &mut PlugState<B> {
        &mut self.state
    }

    /// The interrupt line.
    pub fn interrupt(&self) -> &I {
        &self.interrupt
    }

    /// Whether the driver activated the queue.
    pub fn is_activated(&self) -> bool {
        self.queue.is_some()
    }

    /// Reads the configuration space at `offset` into `data`. Bytes past the end read as
    /// zero, as the transport must never fault on a config read.
    pub fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let space = self.state.config_space();
        let bytes = space.as_slice();
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if start >= bytes.len() {
            return;
        }
        let n = data.len().min(bytes.len() - start);
        data[..n].copy_from_slice(&bytes[start..start + n]);
    }

    /// Starts processing requests on `queue` (the driver set DRIVER_OK).
    pub fn activate(&mut self, queue: Queue) {
        self.queue = Some(queue);
    }

    /// Changes the requested size, grows the usable region if needed, bumps the config
    /// generation and raises the config-change interrupt. The interrupt is sent even when
    /// the size is unchanged: that makes the Linux driver retry a stalled unplug now
    /// instead of after its retry timer.
    ///
    /// # Errors
    ///
    /// [`VirtioMemError::UnalignedRequestedSize`] or [`VirtioMemError::RequestedSizeTooBig`];
    /// nothing changes then.
    pub fn set_requested_size(&mut self, size: u64) -> Result<ResizeOutcome, VirtioMemError> {
        let outcome = self.state.set_requested_size(size)?;
        self.notify_config_change();
        Ok(outcome)
    }

    fn notify_config_change(&mut self) {
        debug!(
            "virtio-mem: config change interrupt, requested size {:#x}",
            self.state.requested_size()
        );
        if let Err(e) = self.interrupt.signal_config_change() {
            self.state.metrics_mut().queue_errors += 1;
            error!("virtio-mem: cannot signal config change to the guest: {e}");
        }
    }

    /// Device reset: drops the queue and negotiated features, keeps blocks plugged.
    pub fn reset(&mut self) {
        self.queue = None;
        self.state.device_reset();
    }

    /// System reset (VM reboot): device reset plus unplug of everything.
    ///
    /// # Errors
    ///
    /// [`VirtioMemError::ResetUnplug`] if the backend failed to release memory.
    pub fn system_reset(&mut self) -> Result<(), VirtioMemError> {
        self.queue = None;
        self.state.system_reset()
    }

    /// Handles available requests (at most one ring's worth), with their host work on
    /// the device's own backend, then signals the driver if it wants to be told. Returns
    /// what happened to each chain, in order.
    ///
    /// It is [`VirtioMem::take_request`], [`HostWork::run`] and
    /// [`VirtioMem::finish_request`] in a loop, then [`VirtioMem::signal_used`]; a caller
    /// that must not hold the device during host work calls those itself.
    ///
    /// # Errors
    ///
    /// [`VirtioMemError::NotActivated`] when there is no queue. Queue-level failures
    /// (a corrupt ring, a ring outside guest memory) are logged rate-limited and counted,
    /// and stop this round.
    pub fn process_queue<A: GuestAddressSpace>(
        &mut self,
        space: A,
    ) -> Result<Vec<Completion>, VirtioMemError> {
        let budget = self.round_budget();
        if budget == 0 {
            return Err(VirtioMemError::NotActivated);
        }
        let mut completions = Vec::new();
        while completions.len() < budget {
            let Some(mut taken) = self.take_request(&space) else {
                break;
            };
            if let Some(work) = taken.host_work() {
                work.run(self.state.backend_mut());
            }
            let Some(completion) = self.finish_request(&space, taken) else {
                break;
            };
            completions.push(completion);
        }
        if !completions.is_empty() {
            self.signal_used(&space);
        }
        Ok(completions)
    }

    /// How many requests one round may handle: one ring's worth, so that a driver that
    /// refills as fast as the device consumes cannot keep a round going forever (it
    /// notifies again and gets the next round). 0 when not activated.
    pub fn round_budget(&self) -> usize {
        self.queue
            .as_ref()
            .map_or(0, |q| usize::from(q.size().max(1)))
    }

    /// Takes the next available chain, reads its request and validates it
    /// ([`PlugState::prepare`]). `None` when there is none (or no queue, or the ring is
    /// unreadable). The view of guest memory it used is dropped before it returns, so
    /// the request's host work never runs while this device holds one.
    pub fn take_request<A: GuestAddressSpace>(&mut self, space: &A) -> Option<TakenRequest> {
        let queue = self.queue.as_mut()?;
        let (head, request, writable) = {
            let mem = space.memory();
            let chain = queue.pop_descriptor_chain(&*mem)?;
            let head = chain.head_index();
            let (request, writable) = read_chain(&*mem, chain);
            (head, request, writable)
        };
        // Trace level: one line per request the guest sends (off unless asked for).
        trace!("virtio-mem: request {head}: {request:?}");
        let answer = match request {
            Ok(req) => self.state.prepare(req),
            Err(why) => {
                self.state.metrics_mut().malformed_chains += 1;
                if let Some(dropped) = self.malformed_log.allow() {
                    warn!(
                        "virtio-mem: malformed request chain {head}: {why:?} \
                         ({dropped} similar messages suppressed)"
                    );
                }
                Prepared::Answered(Response::Error)
            }
        };
        Some(TakenRequest {
            head,
            request,
            writable,
            answer,
        })
    }

    /// Commits the request's host work ([`PlugState::commit`]), then writes the response
    /// and returns the chain to the driver through a view of guest memory taken now (after
    /// any unplug of this request). `None` when the used element could not be added
    /// (counted and logged): the round should stop.
    pub fn finish_request<A: GuestAddressSpace>(
        &mut self,
        space: &A,
        taken: TakenRequest,
    ) -> Option<Completion> {
        let TakenRequest {
            head,
            request,
            writable,
            answer,
        } = taken;
        let response = match answer {
            Prepared::Answered(r) => r,
            Prepared::Work(work) => self.state.commit(work),
        };
        trace!("virtio-mem: response {head}: {response:?}");
        let mem = space.memory();
        let written = write_response(&*mem, response, &writable);
        let completion = Completion {
            head,
            request,
            response: written.then_some(response),
            used_len: if written { RESPONSE_LEN } else { 0 },
        };
        // No queue: the device was reset meanwhile; the driver forgot the chain.
        let queue = self.queue.as_mut()?;
        if let Err(e) = queue.add_used(&*mem, head, completion.used_len) {
            self.queue_error(format_args!(
                "cannot add used element for chain {head}: {e}"
            ));
            return None;
        }
        Some(completion)
    }

    /// Interrupts the driver after a round that returned chains, if it wants to be told.
    pub fn signal_used<A: GuestAddressSpace>(&mut self, space: &A) {
        let Some(queue) = self.queue.as_mut() else {
            return;
        };
        let wanted = queue.needs_notification(&*space.memory());
        match wanted {
            Ok(true) => {
                if let Err(e) = self.interrupt.signal_used_queue() {
                    self.state.metrics_mut().queue_errors += 1;
                    error!("virtio-mem: cannot signal used buffers to the guest: {e}");
                }
            }
            Ok(false) => {}
            Err(e) => self.queue_error(format_args!("cannot read the used event index: {e}")),
        }
    }

    /// Counts a queue-level failure and logs it, rate-limited: a guest can cause one per
    /// notification.
    fn queue_error(&mut self, what: std::fmt::Arguments<'_>) {
        self.state.metrics_mut().queue_errors += 1;
        if let Some(dropped) = self.queue_error_log.allow() {
            error!("virtio-mem: {what} ({dropped} similar messages suppressed)");
        }
    }
}

/// A request taken from the queue ([`VirtioMem::take_request`]) whose answer is pending:
/// run its [`HostWork`], if any, then give it to [`VirtioMem::finish_request`].
#[derive(Debug)]
#[must_use = "a taken request must be finished, or the driver waits for it forever"]
pub struct TakenRequest {
    head: u16,
    request: Result<Request, MalformedChain>,
    writable: Vec<(GuestAddress, u32)>,
    answer: Prepared,
}

impl TakenRequest {
    /// The host work the request needs, if any.
    pub fn host_work(&mut self) -> Option<&mut HostWork> {
        match &mut self.answer {
            Prepared::Work(w) => Some(w),
            Prepared::Answered(_) => None,
        }
    }
}

/// Parses a chain and reads its request; returns the request (or why the chain is
/// malformed) and the buffers for the response.
fn read_chain<M: GuestMemory>(
    mem: &M,
    chain: DescriptorChain<&M>,
) -> (Result<Request, MalformedChain>, Vec<(GuestAddress, u32)>) {
    let parsed = parse_chain(mem, chain);
    let mut raw = RawRequest::default();
    let request = match parsed.error {
        Some(e) => Err(e),
        None if !gather(mem, &parsed.readable, raw.as_mut_slice()) => {
            Err(MalformedChain::OutsideGuestMemory)
        }
        None => Ok(Request::from(raw)),
    };
    (request, parsed.writable)
}

/// Writes `response` across the chain's writable buffers; `false` if they are too small or
/// no longer in guest memory.
fn write_response<M: GuestMemory>(
    mem: &M,
    response: Response,
    writable: &[(GuestAddress, u32)],
) -> bool {
    let bytes = RawResponse::from(response);
    writable.iter().map(|&(_, l)| u64::from(l)).sum::<u64>() >= RESPONSE_SIZE as u64
        && scatter(mem, writable, bytes.as_slice())
}
