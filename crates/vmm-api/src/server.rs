//! The API server: one accept thread on a Unix socket (mode 0600) and up to
//! [`MAX_CONNECTIONS`] connection threads, read and write timeouts so a client that stalls
//! or vanishes costs nothing but one connection thread for a few seconds.
//!
//! Connection threads are kept, parked, between connections, and a new one is started only
//! when all are busy. Starting a thread maps its stack, which needs the process's memory
//! map lock for writing: while the VMM populates or discards guest memory that lock is
//! contended, and a GET then waited tens of milliseconds for its thread.

use std::collections::VecDeque;
use std::io::{self, ErrorKind, Read};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use log::{debug, info, warn};

use crate::http::{read_request, write_response, ReadError, Request, JSON};
use crate::{AutosizeError, AutosizeRequest, EventBus, MemoryControl, ResizeError, ResizeRequest};

/// Connections served at once; more get 503 at once.
pub const MAX_CONNECTIONS: usize = 16;
/// Event streams served at once (each on a thread of its own, not a connection thread);
/// more get 503.
pub const MAX_STREAMS: usize = 64;
/// Content type of the event stream.
pub const NDJSON: &str = "application/x-ndjson";
/// How long a client may take to send its request or read the answer.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors starting the API server.
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    /// Another process is serving on the socket path.
    #[error("API socket {0} is in use by another process: pick another --api-socket path")]
    InUse(PathBuf),
    /// A file that is not a socket sits at the path.
    #[error("{0} exists and is not a socket: remove it or pick another --api-socket path")]
    NotASocket(PathBuf),
    /// Binding, chmod or thread creation failed.
    #[error("cannot serve the API on {path}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

/// A running API server. Dropping it stops accepting and removes the socket file.
#[derive(Debug)]
pub struct ApiServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ApiServerError + '_ {
    move |source| ApiServerError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Removes a stale socket left by a process that died; refuses to touch a live one or a
/// file that is not a socket.
fn clear_stale_socket(path: &Path) -> Result<(), ApiServerError> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(path)(e)),
        Ok(meta) if !meta.file_type().is_socket() => Err(ApiServerError::NotASocket(path.into())),
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => Err(ApiServerError::InUse(path.into())),
            Err(_) => std::fs::remove_file(path).map_err(io_err(path)),
        },
    }
}

impl ApiServer {
    /// Binds `path` (mode 0600) and serves `control` on a background thread.
    ///
    /// # Errors
    ///
    /// [`ApiServerError`] when the path is in use, is not a socket, or cannot be bound.
    pub fn start(path: &Path, control: Arc<dyn MemoryControl>) -> Result<Self, ApiServerError> {
        clear_stale_socket(path)?;
        let listener = UnixListener::bind(path).map_err(io_err(path))?;
        // Only the owner may resize the guest. There is a short window between bind and
        // chmod in which the umask applies; the socket is not served before the chmod.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(io_err(path))?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || accept_loop(listener, control, thread_stop))
            .map_err(io_err(path))?;
        info!("API listening on {}", path.display());
        Ok(ApiServer {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag. If the socket file is already gone,
        // the loop cannot be woken: leave the thread blocked in accept rather than hang
        // here; it holds nothing but the listener.
        let woken = UnixStream::connect(&self.path).is_ok();
        if let Some(t) = self.thread.take() {
            if woken {
                let _ = t.join();
            }
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Connection threads and the connections waiting for one.
struct Workers {
    control: Arc<dyn MemoryControl>,
    /// Event streams running.
    streams: Arc<AtomicUsize>,
    queue: Mutex<WorkerQueue>,
    ready: Condvar,
}

struct WorkerQueue {
    waiting: VecDeque<UnixStream>,
    /// Threads started (alive until the server stops).
    threads: usize,
    /// Threads parked, waiting for a connection.
    idle: usize,
    stop: bool,
}

impl Workers {
    /// Hands `stream` to a parked thread, or to a new one while fewer than
    /// [`MAX_CONNECTIONS`] exist; gives it back when all are busy.
    fn dispatch(self: &Arc<Self>, stream: UnixStream) -> Result<(), UnixStream> {
        let mut q = self.lock();
        if q.idle > q.waiting.len() {
            q.waiting.push_back(stream);
            drop(q);
            self.ready.notify_one();
            return Ok(());
        }
        if q.threads >= MAX_CONNECTIONS {
            return Err(stream);
        }
        let workers = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("api-conn".into())
            .spawn(move || workers.run());
        match spawned {
            Ok(_) => {
                q.threads += 1;
                q.waiting.push_back(stream);
                Ok(())
            }
            Err(e) => {
                warn!("API: cannot start a connection thread: {e}");
                Err(stream)
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, WorkerQueue> {
        // The queue is only pushed to and popped from: a panic elsewhere cannot leave it
        // half-updated.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn run(&self) {
        let mut q = self.lock();
        loop {
            if let Some(mut stream) = q.waiting.pop_front() {
                drop(q);
                serve(&mut stream, self.control.as_ref(), &self.streams);
                drop(stream);
                q = self.lock();
                continue;
            }
            if q.stop {
                return;
            }
            q.idle += 1;
            q = self.ready.wait(q).unwrap_or_else(PoisonError::into_inner);
            q.idle -= 1;
        }
    }

    fn stop(&self) {
        self.lock().stop = true;
        self.ready.notify_all();
    }
}

fn accept_loop(listener: UnixListener, control: Arc<dyn MemoryControl>, stop: Arc<AtomicBool>) {
    let workers = Arc::new(Workers {
        control,
        streams: Arc::new(AtomicUsize::new(0)),
        queue: Mutex::new(WorkerQueue {
            waiting: VecDeque::new(),
            threads: 0,
            idle: 0,
            stop: false,
        }),
        ready: Condvar::new(),
    });
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                warn!("API: accept failed: {e}");
                continue;
            }
        };
        let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
        let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
        if let Err(mut stream) = workers.dispatch(stream) {
            let _ = write_response(
                &mut stream,
                503,
                JSON,
                "",
                &error_json("too many API connections"),
            );
        }
    }
    workers.stop();
}

fn error_json(message: &str) -> String {
    serde_json::json!({ "error": message }).to_string()
}

/// Reads one request from `stream` and acts on it: the status and JSON body to answer,
/// or `None` when the client went away first. Never panics on client input (the fuzz
/// target `crates/vmm-api/fuzz` feeds it arbitrary bytes).
pub fn answer<S: Read + io::Write>(stream: &mut S, control: &dyn MemoryControl) -> Option<Reply> {
    match read_request(stream) {
        Ok(req) => Some(route(&req, control)),
        Err(ReadError::Refuse(r)) => Some(Reply::json(r.status, error_json(&r.message))),
        Err(ReadError::Io(e)) => {
            debug!("API: client went away: {e}");
            None
        }
    }
}

/// Serves one connection: read, route, answer (or hand an event stream to its thread).
fn serve(stream: &mut UnixStream, control: &dyn MemoryControl, streams: &Arc<AtomicUsize>) {
    let Some(reply) = answer(stream, control) else {
        return;
    };
    if reply.status == 200 && reply.content_type == NDJSON {
        if let Some(bus) = control.events() {
            start_stream(stream, bus, streams);
            return;
        }
    }
    if let Err(e) = write_response(
        stream,
        reply.status,
        reply.content_type,
        reply.allow,
        &reply.body,
    ) {
        debug!("API: cannot answer: {e}");
        return;
    }
    // A refused request may leave unread bytes (e.g. an oversized body); closing with
    // them unread would reset the connection and destroy the answer in flight. Drain a
    // bounded amount first.
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let _ = io::copy(&mut (&*stream).take(DRAIN_LIMIT), &mut io::sink());
}

/// Streams the events of `bus` to `stream` on a thread of its own, until the client goes
/// away. A client that stops reading fills its socket: the write times out
/// ([`IO_TIMEOUT`]) and the stream ends; the bus meanwhile drops only that client's
/// oldest events.
fn start_stream(stream: &mut UnixStream, bus: &EventBus, streams: &Arc<AtomicUsize>) {
    if streams.fetch_add(1, Ordering::SeqCst) >= MAX_STREAMS {
        streams.fetch_sub(1, Ordering::SeqCst);
        let _ = write_response(stream, 503, JSON, "", &error_json("too many event streams"));
        return;
    }
    let head = format!("HTTP/1.1 200 OK\r\nContent-Type: {NDJSON}\r\nConnection: close\r\n\r\n");
    let (Ok(mut out), Ok(())) = (
        stream.try_clone(),
        io::Write::write_all(stream, head.as_bytes()),
    ) else {
        streams.fetch_sub(1, Ordering::SeqCst);
        return;
    };
    let sub = bus.subscribe();
    let count = Arc::clone(streams);
    let spawned = std::thread::Builder::new()
        .name("api-events".into())
        .spawn(move || {
            let mut probe = [0u8; 64];
            let _ = out.set_read_timeout(Some(Duration::from_millis(1)));
            loop {
                let Some(event) = sub.next(Duration::from_secs(1)) else {
                    // Quiet: find out whether the client is still there (end of file
                    // when it closed; what it sends after its request is ignored).
                    match io::Read::read(&mut out, &mut probe) {
                        Ok(0) => break,
                        Err(e)
                            if !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                        {
                            break
                        }
                        _ => continue,
                    }
                };
                let line = event.to_line() + "\n";
                if io::Write::write_all(&mut out, line.as_bytes()).is_err() {
                    break;
                }
            }
            count.fetch_sub(1, Ordering::SeqCst);
        });
    if let Err(e) = spawned {
        warn!("API: cannot start an event stream thread: {e}");
        streams.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Most bytes read and thrown away after answering.
const DRAIN_LIMIT: u64 = 1 << 20;

/// What the server answers one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// The body's content type: JSON, or the Prometheus text format for `/metrics`.
    pub content_type: &'static str,
    /// The body.
    pub body: String,
    /// The path's methods, for a 405 answer's `Allow` header.
    pub allow: &'static str,
}

impl Reply {
    fn json(status: u16, body: String) -> Self {
        Reply {
            status,
            content_type: JSON,
            body,
            allow: "",
        }
    }
}

fn route(req: &Request, control: &dyn MemoryControl) -> Reply {
    let path = req.path.split('?').next().unwrap_or_default();
    if path == "/v1/events" {
        return match (req.method.as_str(), control.events()) {
            // The head of a stream: the caller subscribes and writes the events.
            ("GET", Some(_)) => Reply {
                status: 200,
                content_type: NDJSON,
                body: String::new(),
                allow: "",
            },
            ("GET", None) => Reply::json(404, error_json("this VMM publishes no events")),
            (m, _) => Reply {
                allow: "GET",
                ..Reply::json(
                    405,
                    error_json(&format!("method {m} not allowed on /v1/events: use GET")),
                )
            },
        };
    }
    if path == "/metrics" {
        return if req.method == "GET" {
            Reply {
                status: 200,
                content_type: crate::metrics::CONTENT_TYPE,
                body: control.metrics(),
                allow: "",
            }
        } else {
            Reply {
                allow: "GET",
                ..Reply::json(
                    405,
                    error_json(&format!(
                        "method {} not allowed on /metrics: use GET",
                        req.method
                    )),
                )
            }
        };
    }
    if path == "/v1/memory/autosize" {
        if req.method != "PUT" {
            return Reply {
                allow: "PUT",
                ..Reply::json(
                    405,
                    error_json(&format!(
                        "method {} not allowed on /v1/memory/autosize: use PUT",
                        req.method
                    )),
                )
            };
        }
        let (status, body) = route_autosize(req, control);
        return Reply::json(status, body);
    }
    let (status, body) = route_memory(path, req, control);
    Reply {
        allow: "GET, PUT",
        ..Reply::json(status, body)
    }
}

fn route_autosize(req: &Request, control: &dyn MemoryControl) -> (u16, String) {
    let result = AutosizeRequest::from_json(&req.body).and_then(|r| {
        let what = match &r {
            AutosizeRequest::Off => "off".to_string(),
            AutosizeRequest::On(p) => {
                format!("min {} max {} target {}%", p.min, p.max, p.target_percent)
            }
        };
        control
            .set_autosize(r)
            .inspect(|_| info!("API: autosize {what}"))
    });
    match result {
        Ok(status) => match serde_json::to_string(&status) {
            Ok(json) => (200, json),
            Err(e) => (503, error_json(&e.to_string())),
        },
        Err(e @ AutosizeError::Invalid(_)) => (400, error_json(&e.to_string())),
        Err(e @ AutosizeError::Unsupported(_)) => (409, error_json(&e.to_string())),
    }
}

fn route_memory(path: &str, req: &Request, control: &dyn MemoryControl) -> (u16, String) {
    if path != "/v1/memory" {
        return (
            404,
            error_json(&format!(
                "no such path {path}: use /v1/memory, /v1/memory/autosize, /v1/events or /metrics"
            )),
        );
    }
    match req.method.as_str() {
        "GET" => match serde_json::to_string(&control.status()) {
            Ok(json) => (200, json),
            Err(e) => (503, error_json(&e.to_string())),
        },
        "PUT" => {
            // Through `Value` first: serde would also accept `[N]` for the struct.
            let parsed = serde_json::from_slice::<serde_json::Value>(&req.body).and_then(|v| {
                if v.is_object() {
                    serde_json::from_value::<ResizeRequest>(v)
                } else {
                    Err(serde::de::Error::custom("the body is not a JSON object"))
                }
            });
            let resize = match parsed {
                Ok(r) => r,
                Err(e) => {
                    return (
                        400,
                        error_json(&format!(
                        "body must be {{\"requested_size\": <bytes, non-negative integer>}}: {e}"
                    )),
                    )
                }
            };
            match control.resize(resize.requested_size) {
                Ok(status) => {
                    info!("API: resize to {} bytes accepted", resize.requested_size);
                    match serde_json::to_string(&status) {
                        Ok(json) => (202, json),
                        Err(e) => (503, error_json(&e.to_string())),
                    }
                }
                Err(e @ (ResizeError::Unaligned { .. } | ResizeError::TooBig { .. })) => {
                    (422, error_json(&e.to_string()))
                }
                Err(e @ ResizeError::Unavailable(_)) => (503, error_json(&e.to_string())),
                Err(e @ ResizeError::AutosizeOn) => (409, error_json(&e.to_string())),
            }
        }
        other => (
            405,
            error_json(&format!("method {other} not allowed: use GET or PUT")),
        ),
    }
}
