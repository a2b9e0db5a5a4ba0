//! A small client for the API, used by `vmm status`, `vmm resize` and `vmm autosize`.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{AutosizeRequest, MemoryStatus, ResizeRequest};

/// Errors talking to the API.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket cannot be reached.
    #[error("cannot connect to the VMM API at {path}: {source} (is the VMM running with --api-socket {path}?)")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The exchange failed midway.
    #[error("API exchange failed: {0}")]
    Io(#[from] io::Error),
    /// The answer is not HTTP or not the expected JSON.
    #[error("unexpected answer from the VMM API: {0}")]
    BadAnswer(String),
    /// The VMM did not connect or answer in time.
    #[error("no answer from the VMM API at {path} within {timeout:?} ({waiting_for}): the VMM may be hung or overloaded; its state dump: kill -USR1 <vmm pid>")]
    Timeout {
        /// The socket path.
        path: PathBuf,
        /// The bound.
        timeout: Duration,
        /// What did not happen: the connection, or the answer to which request.
        waiting_for: String,
    },
    /// The VMM refused the request.
    #[error("the VMM refused (HTTP {status}): {message}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The VMM's explanation.
        message: String,
    },
}

/// How long a client waits for the connection and for the whole answer by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects within `timeout`. A Unix socket whose listen backlog is full blocks
/// `connect`, so the connection is made on a helper thread (left to finish on its own if
/// the bound passes).
fn connect(socket: &Path, timeout: Duration) -> Result<UnixStream, ClientError> {
    let (tx, rx) = std::sync::mpsc::channel();
    let path = socket.to_path_buf();
    std::thread::Builder::new()
        .name("api-connect".into())
        .spawn(move || {
            let _ = tx.send(UnixStream::connect(path));
        })?;
    match rx.recv_timeout(timeout) {
        Ok(r) => r.map_err(|source| ClientError::Connect {
            path: socket.to_path_buf(),
            source,
        }),
        Err(_) => Err(ClientError::Timeout {
            path: socket.to_path_buf(),
            timeout,
            waiting_for: "the connection".into(),
        }),
    }
}

fn exchange(
    socket: &Path,
    method: &str,
    body: Option<&str>,
    timeout: Duration,
) -> Result<MemoryStatus, ClientError> {
    exchange_at(socket, method, "/v1/memory", body, timeout)
}

fn exchange_at(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> Result<MemoryStatus, ClientError> {
    let deadline = Instant::now() + timeout;
    let timed_out = || ClientError::Timeout {
        path: socket.to_path_buf(),
        timeout,
        waiting_for: format!("the answer to {method} {path}"),
    };
    let mut s = connect(socket, timeout)?;
    s.set_write_timeout(Some(timeout))?;
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    // The bound is for the whole answer: a VMM that trickles bytes must not extend it.
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(timed_out)?;
        s.set_read_timeout(Some(left))?;
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(timed_out());
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let answer = String::from_utf8_lossy(&raw).into_owned();
    let (head, json) = answer
        .split_once("\r\n\r\n")
        .ok_or_else(|| ClientError::BadAnswer(answer.clone()))?;
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ClientError::BadAnswer(head.to_string()))?;
    if !(200..300).contains(&status) {
        let message = serde_json::from_str::<serde_json::Value>(json)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or_else(|| json.trim().to_string());
        return Err(ClientError::Refused { status, message });
    }
    serde_json::from_str(json).map_err(|e| ClientError::BadAnswer(format!("{e}: {json}")))
}

/// `GET /v1/memory`, within [`DEFAULT_TIMEOUT`].
///
/// # Errors
///
/// A [`ClientError`] when the VMM cannot be reached, does not answer in time or answers
/// with an error.
pub fn status(socket: &Path) -> Result<MemoryStatus, ClientError> {
    status_within(socket, DEFAULT_TIMEOUT)
}

/// `GET /v1/memory`, connection and whole answer within `timeout`.
///
/// # Errors
///
/// As [`status`].
pub fn status_within(socket: &Path, timeout: Duration) -> Result<MemoryStatus, ClientError> {
    exchange(socket, "GET", None, timeout)
}

/// `PUT /v1/memory {"requested_size": bytes}`, within [`DEFAULT_TIMEOUT`].
///
/// # Errors
///
/// A [`ClientError`] when the VMM cannot be reached, does not answer in time or refuses
/// the size.
pub fn resize(socket: &Path, bytes: u64) -> Result<MemoryStatus, ClientError> {
    resize_within(socket, bytes, DEFAULT_TIMEOUT)
}

/// `PUT /v1/memory`, connection and whole answer within `timeout`.
///
/// # Errors
///
/// As [`resize`].
pub fn resize_within(
    socket: &Path,
    bytes: u64,
    timeout: Duration,
) -> Result<MemoryStatus, ClientError> {
    let body = serde_json::to_string(&ResizeRequest {
        requested_size: bytes,
    })
    .map_err(|e| ClientError::BadAnswer(e.to_string()))?;
    exchange(socket, "PUT", Some(&body), timeout)
}

/// `PUT /v1/memory/autosize`: turns automatic sizing on or off; connection and whole
/// answer within `timeout`.
///
/// # Errors
///
/// As [`resize`]; [`ClientError::Refused`] with 400 for a policy that does not fit the
/// device, 409 for a VMM without automatic sizing.
pub fn autosize_within(
    socket: &Path,
    req: &AutosizeRequest,
    timeout: Duration,
) -> Result<MemoryStatus, ClientError> {
    exchange_at(
        socket,
        "PUT",
        "/v1/memory/autosize",
        Some(&req.to_json()),
        timeout,
    )
}

fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "none".into(), |v| v.to_string())
}

impl MemoryStatus {
    /// One `key=value` line per figure, for scripts and grep.
    pub fn to_lines(&self) -> String {
        format!(
            "region_addr={:#x}\nregion_size={}\nblock_size={}\nusable_region_size={}\nplugged_size={}\nrequested_size={}\nhost_resident_bytes={}\nhost_resident_age_ms={}\nhost_error={}\nstate={}\nmoved_bytes={}\nremaining_bytes={}\nrate_bytes_per_s={}\neta_s={}\nstalled_for_s={}\nreason={}\n",
            self.region_addr,
            self.region_size,
            self.block_size,
            self.usable_region_size,
            self.plugged_size,
            self.requested_size,
            self.host_resident_bytes,
            self.host_resident_age_ms,
            self.host_error.as_deref().unwrap_or("none"),
            self.state,
            self.progress.moved_bytes,
            self.progress.remaining_bytes,
            opt(self.progress.rate_bytes_per_s),
            opt(self.progress.eta_s),
            opt(self.stalled_for_s),
            self.reason.as_deref().unwrap_or("none")
        ) + &self.autosize_lines()
    }

    fn autosize_lines(&self) -> String {
        let Some(a) = &self.autosize else {
            return "autosize=off\n".into();
        };
        let s = a.stats.clone().unwrap_or_default();
        let last = a.decisions.last().map_or_else(
            || "none".to_string(),
            |d| format!("{}->{} ({})", d.from, d.to, d.reason),
        );
        format!(
            "autosize=on\nautosize_min={}\nautosize_max={}\nautosize_cap={}\nautosize_target_percent={}\nautosize_state={}\nautosize_reason={}\nguest_total={}\nguest_available={}\nguest_stats_age_ms={}\nautosize_last_decision={}\n",
            a.policy.min,
            a.policy.max,
            a.cap,
            a.policy.target_percent,
            a.state,
            a.reason,
            opt(s.total),
            opt(s.available),
            a.stats.as_ref().map_or_else(|| "none".into(), |s| s.age_ms.to_string()),
            last
        )
    }
}
