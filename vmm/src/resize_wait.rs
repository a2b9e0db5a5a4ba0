//! `vmm resize --wait`: ask for a size, then follow the resize until the guest gets there,
//! the time is up, or it is stalled, with a progress line on the way.
//!
//! Exit status: 0 when plugged equals requested, 3 on timeout while the resize still
//! moves, 4 when it is stalled at the timeout (the reason is printed), 1 when the API
//! cannot be reached.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use vmm_api::client::{self, ClientError};
use vmm_api::{MemoryStatus, ResizeState};

/// How often the API is asked while waiting.
const POLL: Duration = Duration::from_millis(200);
/// Plain (non-terminal) output prints at most one line per this, unless the state changes.
const PLAIN_EVERY: Duration = Duration::from_secs(1);

/// How a wait ended.
#[derive(Debug, PartialEq, Eq)]
pub enum WaitEnd {
    /// Plugged equals requested.
    Done(MemoryStatus),
    /// The time ran out while the resize still moved.
    TimedOut(MemoryStatus),
    /// The time ran out with the resize stalled.
    Stalled(MemoryStatus),
}

impl WaitEnd {
    /// The process exit status for this end.
    pub fn exit_code(&self) -> i32 {
        match self {
            WaitEnd::Done(_) => 0,
            WaitEnd::TimedOut(_) => 3,
            WaitEnd::Stalled(_) => 4,
        }
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1}MiB", bytes as f64 / f64::from(1u32 << 20))
}

/// One progress line (without a newline), e.g.
/// `resize: state=plugging plugged=512.0MiB requested=2048.0MiB rate=300.0MiB/s eta=6s`.
pub fn progress_line(s: &MemoryStatus) -> String {
    let mut line = format!(
        "resize: state={} plugged={} requested={}",
        s.state,
        mib(s.plugged_size),
        mib(s.requested_size)
    );
    if let Some(r) = s.progress.rate_bytes_per_s {
        line.push_str(&format!(" rate={}/s", mib(r)));
    }
    if let Some(e) = s.progress.eta_s {
        line.push_str(&format!(" eta={e}s"));
    }
    if let Some(f) = s.stalled_for_s {
        line.push_str(&format!(" stalled_for={f}s"));
    }
    line
}

/// Asks for `size` and follows the resize for at most `timeout`, calling `show` with every
/// status read (the first right after the request).
///
/// # Errors
///
/// A [`ClientError`] when the VMM cannot be reached or refuses the size.
pub fn resize_and_wait(
    socket: &Path,
    size: u64,
    timeout: Duration,
    show: &mut dyn FnMut(&MemoryStatus),
) -> Result<WaitEnd, ClientError> {
    let deadline = Instant::now() + timeout;
    let bounded = |deadline: Instant| {
        deadline
            .saturating_duration_since(Instant::now())
            .clamp(Duration::from_millis(100), client::DEFAULT_TIMEOUT)
    };
    let mut status = client::resize_within(socket, size, bounded(deadline))?;
    loop {
        show(&status);
        if status.plugged_size == status.requested_size {
            return Ok(WaitEnd::Done(status));
        }
        if Instant::now() >= deadline {
            return Ok(if status.state == ResizeState::Stalled {
                WaitEnd::Stalled(status)
            } else {
                WaitEnd::TimedOut(status)
            });
        }
        std::thread::sleep(POLL.min(deadline.saturating_duration_since(Instant::now())));
        status = client::status_within(socket, bounded(deadline))?;
    }
}

/// `vmm resize --wait`: runs [`resize_and_wait`] with a live line on a terminal (plain
/// lines otherwise) and returns the exit status.
pub fn run(socket: &Path, size: u64, timeout: Duration) -> i32 {
    let tty = std::io::stdout().is_terminal();
    let mut last: Option<(Instant, ResizeState)> = None;
    let mut show = |s: &MemoryStatus| {
        let line = progress_line(s);
        let mut out = std::io::stdout().lock();
        if tty {
            // Overwrite the line in place: carriage return, then erase to its end.
            let _ = write!(out, "\r{line}\x1b[K");
            let _ = out.flush();
        } else if last.is_none_or(|(at, state)| state != s.state || at.elapsed() >= PLAIN_EVERY) {
            let _ = writeln!(out, "{line}");
            last = Some((Instant::now(), s.state));
        }
    };
    let end = resize_and_wait(socket, size, timeout, &mut show);
    if tty {
        println!();
    }
    match end {
        Ok(end) => {
            match &end {
                WaitEnd::Done(s) => println!("resize: done plugged={}", s.plugged_size),
                WaitEnd::TimedOut(s) => println!(
                    "resize: timeout after {}s: plugged={} requested={} (still {})",
                    timeout.as_secs(),
                    s.plugged_size,
                    s.requested_size,
                    s.state
                ),
                WaitEnd::Stalled(s) => println!(
                    "resize: stalled after {}s: plugged={} requested={}: {}",
                    timeout.as_secs(),
                    s.plugged_size,
                    s.requested_size,
                    s.reason.as_deref().unwrap_or("no reason given")
                ),
            }
            end.exit_code()
        }
        Err(e) => {
            eprintln!("vmm: {e}");
            1
        }
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use vmm_api::{ApiServer, MemoryControl, Progress, ResizeError};

    /// A VMM whose guest plugs `step` bytes per status read, or stalls.
    struct Guest {
        status: Mutex<MemoryStatus>,
        step: u64,
        stall: bool,
    }

    impl MemoryControl for Guest {
        fn status(&self) -> MemoryStatus {
            let mut s = self.status.lock().unwrap();
            if self.stall {
                s.state = ResizeState::Stalled;
                s.stalled_for_s = Some(12);
                s.reason = Some("the guest sends no requests".into());
            } else if s.plugged_size < s.requested_size {
                s.plugged_size = (s.plugged_size + self.step).min(s.requested_size);
                s.state = if s.plugged_size == s.requested_size {
                    ResizeState::Idle
                } else {
                    ResizeState::Plugging
                };
                s.progress = Progress {
                    moved_bytes: s.plugged_size,
                    remaining_bytes: s.requested_size - s.plugged_size,
                    rate_bytes_per_s: Some(self.step * 5),
                    eta_s: Some(1),
                };
            }
            s.clone()
        }

        fn resize(&self, size: u64) -> Result<MemoryStatus, ResizeError> {
            let mut s = self.status.lock().unwrap();
            s.requested_size = size;
            s.state = ResizeState::Plugging;
            Ok(s.clone())
        }
    }

    fn serve(name: &str, step: u64, stall: bool) -> (ApiServer, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("vmm-wait-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let guest = Arc::new(Guest {
            status: Mutex::new(MemoryStatus {
                region_size: 1 << 30,
                block_size: 2 << 20,
                ..MemoryStatus::default()
            }),
            step,
            stall,
        });
        (ApiServer::start(&path, guest).unwrap(), path)
    }

    #[test]
    fn a_resize_that_gets_there_is_done_with_its_progress_shown() {
        let (_server, path) = serve("done", 128 << 20, false);
        let mut seen = Vec::new();
        let end = resize_and_wait(&path, 512 << 20, Duration::from_secs(20), &mut |s| {
            seen.push(s.plugged_size)
        })
        .unwrap();
        assert!(
            matches!(&end, WaitEnd::Done(s) if s.plugged_size == 512 << 20),
            "{end:?}"
        );
        assert_eq!(end.exit_code(), 0);
        assert!(seen.len() >= 4, "one line per step: {seen:?}");
        assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
    }

    #[test]
    fn a_stalled_resize_ends_with_4_and_its_reason() {
        let (_server, path) = serve("stall", 0, true);
        let end =
            resize_and_wait(&path, 512 << 20, Duration::from_millis(600), &mut |_| {}).unwrap();
        let WaitEnd::Stalled(s) = &end else {
            panic!("{end:?}")
        };
        assert_eq!(s.reason.as_deref(), Some("the guest sends no requests"));
        assert_eq!(end.exit_code(), 4);
    }

    #[test]
    fn a_slow_resize_times_out_with_3() {
        let (_server, path) = serve("slow", 2 << 20, false);
        let end = resize_and_wait(&path, 1 << 30, Duration::from_millis(700), &mut |_| {}).unwrap();
        assert!(matches!(end, WaitEnd::TimedOut(_)), "{end:?}");
        assert_eq!(end.exit_code(), 3);
    }

    #[test]
    fn an_unreachable_vmm_is_an_error() {
        let r = resize_and_wait(
            Path::new("/nonexistent/vmm.sock"),
            0,
            Duration::from_secs(1),
            &mut |_| {},
        );
        assert!(r.is_err());
    }

    #[test]
    fn the_progress_line_is_plain_and_greppable() {
        let s = MemoryStatus {
            plugged_size: 512 << 20,
            requested_size: 2 << 30,
            state: ResizeState::Plugging,
            progress: Progress {
                moved_bytes: 512 << 20,
                remaining_bytes: 1536 << 20,
                rate_bytes_per_s: Some(256 << 20),
                eta_s: Some(6),
            },
            ..MemoryStatus::default()
        };
        assert_eq!(
            progress_line(&s),
            "resize: state=plugging plugged=512.0MiB requested=2048.0MiB rate=256.0MiB/s eta=6s"
        );
    }
}
