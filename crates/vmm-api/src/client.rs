//! A small client for the API, used by `vmm status` and `vmm resize`.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::{MemoryStatus, ResizeRequest};

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
    /// The VMM refused the request.
    #[error("the VMM refused (HTTP {status}): {message}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The VMM's explanation.
        message: String,
    },
}

fn exchange(socket: &Path, method: &str, body: Option<&str>) -> Result<MemoryStatus, ClientError> {
    let mut s = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        path: socket.to_path_buf(),
        source,
    })?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} /v1/memory HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
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

/// `GET /v1/memory`.
///
/// # Errors
///
/// A [`ClientError`] when the VMM cannot be reached or answers with an error.
pub fn status(socket: &Path) -> Result<MemoryStatus, ClientError> {
    exchange(socket, "GET", None)
}

/// `PUT /v1/memory {"requested_size": bytes}`.
///
/// # Errors
///
/// A [`ClientError`] when the VMM cannot be reached or refuses the size.
pub fn resize(socket: &Path, bytes: u64) -> Result<MemoryStatus, ClientError> {
    let body = serde_json::to_string(&ResizeRequest {
        requested_size: bytes,
    })
    .map_err(|e| ClientError::BadAnswer(e.to_string()))?;
    exchange(socket, "PUT", Some(&body))
}

impl MemoryStatus {
    /// One `key=value` line per figure, for scripts and grep.
    pub fn to_lines(&self) -> String {
        format!(
            "region_addr={:#x}\nregion_size={}\nblock_size={}\nusable_region_size={}\nplugged_size={}\nrequested_size={}\nhost_resident_bytes={}\nhost_resident_age_ms={}\nhost_error={}\n",
            self.region_addr,
            self.region_size,
            self.block_size,
            self.usable_region_size,
            self.plugged_size,
            self.requested_size,
            self.host_resident_bytes,
            self.host_resident_age_ms,
            self.host_error.as_deref().unwrap_or("none")
        )
    }
}
