//! The VMM's memory API: HTTP/1.1 with JSON bodies over a Unix socket, usable with
//! `curl --unix-socket`, as operators know it from Firecracker and Cloud Hypervisor.
//!
//! | request | answer |
//! |---|---|
//! | `GET /v1/memory` | 200, [`MemoryStatus`] as JSON (sizes, host memory, resize state and progress) |
//! | `PUT /v1/memory` `{"requested_size": N}` | 202 and the new status: the resize started |
//! | `GET /metrics` | 200, Prometheus text format: sizes, host memory, the device's counters |
//! | `GET /v1/events` | 200 and a stream of newline-delimited JSON [`Event`]s until the client closes |
//! | `PUT /v1/memory/autosize` `{"min": N, "max": N[, "target_percent": P][, "headroom": N][, "beyond_cap": B]}` or `{"enabled": false}` | 200 and the status: automatic sizing on (or off) |
//!
//! Errors are JSON `{"error": "..."}` with a 4xx status: 400 malformed request or JSON,
//! 404 unknown path, 405 wrong method, 411 no length, 413 body too large, 422 a size the
//! device cannot take (unaligned, beyond the region), 409 a resize while automatic sizing
//! is on or automatic sizing on a VMM without it, 503 the VMM cannot act now. A bad
//! request changes nothing. One request per connection (`Connection: close`).
//!
//! The server knows nothing of the VMM: it calls a [`MemoryControl`] implementation.

pub mod autosize;
pub mod events;
mod http;
pub mod metrics;
mod server;

pub mod client;

pub use autosize::{
    parse_size, AutosizeDecision, AutosizeError, AutosizePolicy, AutosizeRequest, AutosizeStatus,
    GuestStatsView,
};
pub use events::{Event, EventBus, EventKind, Subscription};
pub use metrics::MetricsText;
pub use server::{answer, ApiServer, ApiServerError, Reply};

use serde::{Deserialize, Serialize};

/// The memory figures `GET /v1/memory` reports, in bytes unless named otherwise.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryStatus {
    /// Guest-physical start of the virtio-mem region.
    pub region_addr: u64,
    /// Size of the virtio-mem region.
    pub region_size: u64,
    /// Device block size.
    pub block_size: u64,
    /// Part of the region the guest may plug into.
    pub usable_region_size: u64,
    /// Memory the guest has plugged.
    pub plugged_size: u64,
    /// Memory the host asked the guest to plug.
    pub requested_size: u64,
    /// Host memory the region really holds (resident pages of the backing), as last
    /// sampled: measuring it walks the region's page tables, so it is not done while the
    /// API answers.
    pub host_resident_bytes: u64,
    /// Age of `host_resident_bytes` in milliseconds (a new sample is taken when a GET
    /// finds it older than a second).
    #[serde(default)]
    pub host_resident_age_ms: u64,
    /// The last host failure (e.g. an empty hugetlb pool, a refused KVM memslot) while the
    /// guest's requests are answered BUSY; `null` once host memory works again.
    #[serde(default)]
    pub host_error: Option<String>,
    /// What the resize is doing: `idle` (plugged equals requested), `plugging`,
    /// `unplugging`, or `stalled` (nothing moved for 10 s; see `reason`).
    #[serde(default)]
    pub state: ResizeState,
    /// How far the resize has come since the requested size was last set.
    #[serde(default)]
    pub progress: Progress,
    /// Seconds since the last progress, when `stalled`.
    #[serde(default)]
    pub stalled_for_s: Option<u64>,
    /// What stops the resize and what to do about it, when `stalled`.
    #[serde(default)]
    pub reason: Option<String>,
    /// Automatic sizing, when it is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autosize: Option<AutosizeStatus>,
}

/// What a resize is doing, as the API names it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResizeState {
    /// Plugged equals requested.
    #[default]
    Idle,
    /// The guest plugs toward the requested size.
    Plugging,
    /// The guest unplugs toward the requested size.
    Unplugging,
    /// Nothing moved for a while; `reason` says why.
    Stalled,
}

impl std::fmt::Display for ResizeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ResizeState::Idle => "idle",
            ResizeState::Plugging => "plugging",
            ResizeState::Unplugging => "unplugging",
            ResizeState::Stalled => "stalled",
        })
    }
}

/// How far a resize has come.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Bytes plugged or unplugged toward the requested size since it was set.
    pub moved_bytes: u64,
    /// Bytes still to plug or unplug.
    pub remaining_bytes: u64,
    /// Average rate since the resize started, while it moves.
    pub rate_bytes_per_s: Option<u64>,
    /// Seconds left at that rate (rounded up), while it moves.
    pub eta_s: Option<u64>,
}

/// The body of `PUT /v1/memory`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResizeRequest {
    /// The new requested size in bytes.
    pub requested_size: u64,
}

/// Why a resize was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResizeError {
    /// The size is not a multiple of the block size.
    #[error("requested_size {size} is not a multiple of the block size {block_size}")]
    Unaligned {
        /// The size asked for.
        size: u64,
        /// The device block size.
        block_size: u64,
    },
    /// The size is larger than the region.
    #[error("requested_size {size} is larger than the hotplug region ({region_size} bytes)")]
    TooBig {
        /// The size asked for.
        size: u64,
        /// The region size.
        region_size: u64,
    },
    /// The VMM cannot act on the request now (e.g. the device is not set up).
    #[error("the VMM cannot resize now: {0}")]
    Unavailable(String),
    /// Automatic sizing sets the size.
    #[error(
        "automatic sizing is on: turn it off first (PUT /v1/memory/autosize \
         {{\"enabled\": false}}, or vmm autosize --api-socket S off)"
    )]
    AutosizeOn,
}

/// What the API server asks of the VMM.
pub trait MemoryControl: Send + Sync {
    /// Current figures.
    fn status(&self) -> MemoryStatus;

    /// Starts a resize to `requested_size` bytes; returns the status right after.
    ///
    /// # Errors
    ///
    /// A [`ResizeError`] when the size is invalid or the VMM cannot act; nothing changes.
    fn resize(&self, requested_size: u64) -> Result<MemoryStatus, ResizeError>;

    /// The `GET /metrics` page (Prometheus text format). By default the sizes and host
    /// memory of [`MemoryControl::status`]; a VMM adds its device's counters.
    fn metrics(&self) -> String {
        let mut m = MetricsText::new();
        m.status(&self.status());
        m.finish()
    }

    /// Turns automatic sizing on or off (`PUT /v1/memory/autosize`); the request has been
    /// parsed and [`AutosizePolicy::check`]ed. Returns the status right after.
    ///
    /// # Errors
    ///
    /// [`AutosizeError::Invalid`] when the policy does not fit the device,
    /// [`AutosizeError::Unsupported`] (the default) when the VMM cannot size itself.
    fn set_autosize(&self, _req: AutosizeRequest) -> Result<MemoryStatus, AutosizeError> {
        Err(AutosizeError::Unsupported(
            "this VMM has no automatic sizing: start it with --autosize (or --balloon)".into(),
        ))
    }

    /// The events `GET /v1/events` streams; `None` (the default) answers 404 there.
    fn events(&self) -> Option<&EventBus> {
        None
    }
}
