//! Signals as event-loop events: a handler that only writes to an eventfd, and the
//! subscriber that stops the VM cleanly on SIGTERM or SIGINT.

use std::os::fd::{AsRawFd, IntoRawFd};
use std::sync::atomic::{AtomicI32, Ordering};

use event_manager::{EventOps, Events, MutEventSubscriber};
use log::warn;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::signal::register_signal_handler;

use crate::exit::{ExitHandle, ExitReason};

/// Signal numbers handled here are below this (Linux' `_NSIG` is 65).
const MAX_SIGNAL: usize = 65;

/// Per signal, the descriptor its handler writes to (-1: none).
static SIGNAL_EVENTFDS: [AtomicI32; MAX_SIGNAL] = [const { AtomicI32::new(-1) }; MAX_SIGNAL];

extern "C" fn on_signal(signal: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let Some(slot) = usize::try_from(signal)
        .ok()
        .and_then(|s| SIGNAL_EVENTFDS.get(s))
    else {
        return;
    };
    let fd = slot.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; `one` is a valid 8-byte buffer, and `fd`
        // is a descriptor that `signal_eventfd` made for this handler alone with
        // `into_raw_fd` and that nothing ever closes, so it always names that eventfd. A
        // failed write only loses this one notification.
        unsafe { libc::write(fd, std::ptr::addr_of!(one).cast(), 8) };
    }
}

/// Handles `signal` from now on by making the returned eventfd readable, for an
/// event-loop subscriber to act on outside the handler.
///
/// # Errors
///
/// The eventfd cannot be made, `signal` is out of range, or the handler cannot be
/// registered.
pub fn signal_eventfd(signal: libc::c_int) -> std::io::Result<EventFd> {
    let slot = usize::try_from(signal)
        .ok()
        .and_then(|s| SIGNAL_EVENTFDS.get(s))
        .ok_or_else(|| std::io::Error::other(format!("signal {signal} out of range")))?;
    let evt = EventFd::new(EFD_NONBLOCK)?;
    // The handler gets a descriptor of its own that is never closed: it may run at any
    // time, also after the returned eventfd is dropped. A second call for the same signal
    // (a VMM that restarted in the same process) leaves the earlier one open for the
    // same reason.
    let for_handler = evt.try_clone()?.into_raw_fd();
    slot.store(for_handler, Ordering::SeqCst);
    register_signal_handler(signal, on_signal)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    Ok(evt)
}

/// The signals that stop the VMM cleanly.
pub const STOP_SIGNALS: [libc::c_int; 2] = [libc::SIGTERM, libc::SIGINT];

/// Stops the VM on SIGTERM or SIGINT (an event-loop subscriber): the exit is requested
/// with [`ExitReason::Signal`], and `Vm::run` then takes the vCPUs out of the guest and
/// returns, so that devices stop, the API socket goes and the terminal is restored.
pub struct StopRequests {
    watched: Vec<(libc::c_int, EventFd)>,
    exit: ExitHandle,
}

impl std::fmt::Debug for StopRequests {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StopRequests").finish_non_exhaustive()
    }
}

impl StopRequests {
    /// Registers the handlers of [`STOP_SIGNALS`].
    ///
    /// # Errors
    ///
    /// As [`signal_eventfd`].
    pub fn install(exit: ExitHandle) -> std::io::Result<Self> {
        let watched = STOP_SIGNALS
            .iter()
            .map(|&s| signal_eventfd(s).map(|e| (s, e)))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(StopRequests { watched, exit })
    }
}

impl MutEventSubscriber for StopRequests {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        for (signal, evt) in &self.watched {
            if evt.as_raw_fd() == events.fd() && evt.read().is_ok() {
                self.exit.request(ExitReason::Signal(*signal));
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (signal, evt) in &self.watched {
            if let Err(e) = ops.add(Events::new(evt, EventSet::IN)) {
                warn!("cannot watch for signal {signal}: {e:?}");
            }
        }
    }
}
