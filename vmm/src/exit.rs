//! Why the VM stopped, and the handle devices and vCPUs use to stop it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off (ACPI S5 through the FADT sleep control register).
    Poweroff,
    /// The guest asked for a reset (ACPI reset register, i8042 pulse, or triple fault). The
    /// VM stops; the binary then exits with status 2 or, with `--on-reboot restart`, starts
    /// the guest again with nothing plugged and the same requested size.
    Reboot,
    /// Something failed: a vCPU error, a KVM failure, or an event loop failure.
    Error(String),
    /// The operator stopped the VMM with this signal (SIGTERM or SIGINT).
    Signal(libc::c_int),
}

impl ExitReason {
    /// The process exit status: 0 poweroff or stopped by a signal, 2 reboot, 1 error.
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::Poweroff | ExitReason::Signal(_) => 0,
            ExitReason::Reboot => 2,
            ExitReason::Error(_) => 1,
        }
    }
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::Poweroff => write!(f, "guest powered off"),
            ExitReason::Reboot => write!(f, "guest requested a reboot"),
            ExitReason::Error(e) => write!(f, "error: {e}"),
            ExitReason::Signal(s) => {
                let name = match *s {
                    libc::SIGTERM => "SIGTERM",
                    libc::SIGINT => "SIGINT",
                    _ => "a signal",
                };
                write!(f, "stopped by {name} ({s})")
            }
        }
    }
}

/// A cloneable handle to request the VM to stop. The first request wins.
#[derive(Clone, Debug)]
pub struct ExitHandle {
    tx: Sender<ExitReason>,
    evt: Arc<EventFd>,
    requested: Arc<AtomicBool>,
}

/// The receiving side: the event loop waits on [`ExitWatch::eventfd`] and collects the
/// reason.
#[derive(Debug)]
pub struct ExitWatch {
    rx: Receiver<ExitReason>,
    evt: Arc<EventFd>,
}

/// Creates a connected handle and watch.
///
/// # Errors
///
/// The eventfd cannot be created.
pub fn exit_channel() -> std::io::Result<(ExitHandle, ExitWatch)> {
    let (tx, rx) = channel();
    let evt = Arc::new(EventFd::new(EFD_NONBLOCK)?);
    Ok((
        ExitHandle {
            tx,
            evt: evt.clone(),
            requested: Arc::new(AtomicBool::new(false)),
        },
        ExitWatch { rx, evt },
    ))
}

impl ExitHandle {
    /// Asks the VM to stop for `reason`.
    pub fn request(&self, reason: ExitReason) {
        self.requested.store(true, Ordering::SeqCst);
        // The receiver only goes away when the VMM is already exiting.
        let _ = self.tx.send(reason);
        let _ = self.evt.write(1);
    }

    /// Whether a stop was requested.
    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }
}

impl ExitWatch {
    /// The eventfd signalled on each request.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    /// The first reason requested, if any.
    pub fn try_reason(&self) -> Option<ExitReason> {
        let _ = self.evt.read();
        self.rx.try_recv().ok()
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]
mod tests {
    use super::*;

    #[test]
    fn first_request_wins() {
        let (h, w) = exit_channel().unwrap();
        assert!(w.try_reason().is_none());
        assert!(!h.requested());
        h.clone().request(ExitReason::Reboot);
        h.request(ExitReason::Poweroff);
        assert!(h.requested());
        assert_eq!(w.try_reason(), Some(ExitReason::Reboot));
    }

    #[test]
    fn exit_codes_differ() {
        assert_eq!(ExitReason::Poweroff.exit_code(), 0);
        assert_eq!(ExitReason::Reboot.exit_code(), 2);
        assert_eq!(ExitReason::Error("x".into()).exit_code(), 1);
        assert_eq!(ExitReason::Reboot.to_string(), "guest requested a reboot");
    }
}
