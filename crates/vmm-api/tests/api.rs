//! The API over a real Unix socket: good requests, malformed ones, and clients that
//! vanish. Every bad request gets a 4xx (or nothing) and changes nothing.

#![expect(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use std::io::BufRead;
use std::time::{Duration, Instant};

use vmm_api::{
    client, ApiServer, ApiServerError, AutosizeError, AutosizePolicy, AutosizeRequest,
    AutosizeStatus, Event, EventBus, EventKind, MemoryControl, MemoryStatus, ResizeError,
};

const BS: u64 = 2 << 20;
const REGION: u64 = 4 << 30;

struct Fake {
    status: Mutex<MemoryStatus>,
    resizes: Mutex<Vec<u64>>,
    bus: EventBus,
}

impl MemoryControl for Fake {
    fn status(&self) -> MemoryStatus {
        self.status.lock().unwrap().clone()
    }

    fn set_autosize(&self, req: AutosizeRequest) -> Result<MemoryStatus, AutosizeError> {
        let mut s = self.status.lock().unwrap();
        s.autosize = match req {
            AutosizeRequest::Off => None,
            AutosizeRequest::On(p) if p.max > REGION => {
                return Err(AutosizeError::Invalid("max beyond the region".into()))
            }
            AutosizeRequest::On(policy) => Some(AutosizeStatus {
                cap: policy.max,
                policy,
                state: "watching".into(),
                reason: String::new(),
                stats: None,
                decisions: Vec::new(),
            }),
        };
        Ok(s.clone())
    }

    fn resize(&self, size: u64) -> Result<MemoryStatus, ResizeError> {
        if self.status.lock().unwrap().autosize.is_some() {
            return Err(ResizeError::AutosizeOn);
        }
        if size % BS != 0 {
            return Err(ResizeError::Unaligned {
                size,
                block_size: BS,
            });
        }
        if size > REGION {
            return Err(ResizeError::TooBig {
                size,
                region_size: REGION,
            });
        }
        self.resizes.lock().unwrap().push(size);
        let mut s = self.status.lock().unwrap();
        s.requested_size = size;
        self.bus.publish(EventKind::ResizeRequested {
            requested_size: size,
            plugged_size: s.plugged_size,
        });
        Ok(s.clone())
    }

    fn events(&self) -> Option<&EventBus> {
        Some(&self.bus)
    }
}

// Fields drop in order: the server (and its socket) before the directory.
struct Env {
    _server: ApiServer,
    path: PathBuf,
    fake: Arc<Fake>,
    _dir: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir(name: &str) -> TempDir {
    let p = std::env::temp_dir().join(format!("vmm-api-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    TempDir(p)
}

fn env(name: &str) -> Env {
    let dir = temp_dir(name);
    let path = dir.0.join("api.sock");
    let fake = Arc::new(Fake {
        status: Mutex::new(MemoryStatus {
            region_addr: 1 << 32,
            region_size: REGION,
            block_size: BS,
            usable_region_size: 256 << 20,
            ..Default::default()
        }),
        resizes: Mutex::new(Vec::new()),
        bus: EventBus::new(),
    });
    let server = ApiServer::start(&path, fake.clone()).unwrap();
    Env {
        _server: server,
        path,
        fake,
        _dir: dir,
    }
}

/// Sends raw bytes, returns (status, body).
fn raw(e: &Env, bytes: &[u8]) -> (u16, String) {
    let mut s = UnixStream::connect(&e.path).unwrap();
    s.write_all(bytes).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split(' ').nth(1).unwrap().parse().unwrap();
    let body = out.split_once("\r\n\r\n").unwrap().1.to_string();
    (status, body)
}

fn put(e: &Env, body: &str) -> (u16, String) {
    raw(
        e,
        format!(
            "PUT /v1/memory HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
}

fn assert_unchanged(e: &Env) {
    assert!(
        e.fake.resizes.lock().unwrap().is_empty(),
        "a bad request changed something"
    );
}

#[test]
fn get_reports_every_figure() {
    let e = env("get");
    let (status, body) = raw(&e, b"GET /v1/memory HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    for key in [
        "region_addr",
        "region_size",
        "block_size",
        "usable_region_size",
        "plugged_size",
        "requested_size",
        "host_resident_bytes",
        "host_resident_age_ms",
        "host_error",
    ] {
        assert!(v.get(key).is_some(), "missing {key} in {body}");
    }
    assert_eq!(v["region_size"], REGION);
}

#[test]
fn put_starts_a_resize() {
    let e = env("put");
    let (status, body) = put(&e, "{\"requested_size\": 2147483648}");
    assert_eq!(status, 202, "{body}");
    assert_eq!(*e.fake.resizes.lock().unwrap(), vec![2 << 30]);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["requested_size"], 2u64 << 30);
}

#[test]
fn malformed_json_is_400() {
    let e = env("badjson");
    for body in [
        "",
        "{",
        "not json",
        "{\"requested_size\": -1}",
        "{\"requested_size\": 1.5}",
        "{\"requested_size\": \"2G\"}",
        "{\"requested_size\": 18446744073709551616}",
        "{\"requested_size\": 2097152, \"extra\": 1}",
        "{\"size\": 2097152}",
        "[2097152]",
    ] {
        let (status, resp) = put(&e, body);
        assert_eq!(status, 400, "body {body:?} -> {resp}");
        assert!(resp.contains("error"));
    }
    assert_unchanged(&e);
}

#[test]
fn unaligned_and_too_big_sizes_are_422() {
    let e = env("sizes");
    assert_eq!(put(&e, "{\"requested_size\": 4097}").0, 422);
    assert_eq!(
        put(&e, &format!("{{\"requested_size\": {}}}", REGION + BS)).0,
        422
    );
    assert_unchanged(&e);
}

#[test]
fn unknown_paths_and_methods_are_refused() {
    let e = env("paths");
    assert_eq!(raw(&e, b"GET /v2/memory HTTP/1.1\r\n\r\n").0, 404);
    assert_eq!(raw(&e, b"GET / HTTP/1.1\r\n\r\n").0, 404);
    assert_eq!(raw(&e, b"DELETE /v1/memory HTTP/1.1\r\n\r\n").0, 405);
    assert_eq!(
        raw(
            &e,
            b"POST /v1/memory HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"
        )
        .0,
        405
    );
    assert_eq!(raw(&e, b"\x00\x01\x02garbage\r\n\r\n").0, 400);
    assert_unchanged(&e);
}

#[test]
fn oversized_bodies_are_413() {
    let e = env("big");
    let body = format!("{{\"requested_size\": 0{}}}", " ".repeat(10_000));
    assert_eq!(put(&e, &body).0, 413);
    assert_unchanged(&e);
}

#[test]
fn vanished_clients_change_nothing_and_the_server_keeps_going() {
    let e = env("vanish");
    for partial in [
        &b"PUT /v1/memory HTTP/1.1\r\nContent-Len"[..],
        b"PUT /v1/memory HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"requested_size\": 2097152",
        b"",
    ] {
        let mut s = UnixStream::connect(&e.path).unwrap();
        s.write_all(partial).unwrap();
        drop(s);
    }
    assert_unchanged(&e);
    assert_eq!(raw(&e, b"GET /v1/memory HTTP/1.1\r\n\r\n").0, 200);
}

#[test]
fn socket_is_private_to_its_owner() {
    let e = env("mode");
    let mode = std::fs::metadata(&e.path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn a_live_socket_is_not_stolen_and_a_stale_one_is_replaced() {
    let e = env("inuse");
    let fake = e.fake.clone();
    match ApiServer::start(&e.path, fake.clone()) {
        Err(ApiServerError::InUse(_)) => {}
        other => panic!("expected InUse, got {other:?}"),
    }
    // A stale socket file (no listener) is cleaned up.
    let dir = temp_dir("stale");
    let stale = dir.0.join("api.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let server = ApiServer::start(&stale, fake).unwrap();
    assert_eq!(client::status(&stale).unwrap().region_size, REGION);
    drop(server);
    assert!(!stale.exists(), "socket removed on shutdown");
    // A regular file is never removed.
    let file = dir.0.join("file");
    std::fs::write(&file, b"x").unwrap();
    assert!(matches!(
        ApiServer::start(&file, e.fake.clone()),
        Err(ApiServerError::NotASocket(_))
    ));
    assert!(file.exists());
}

#[test]
fn client_round_trip() {
    let e = env("client");
    let s = client::resize(&e.path, 512 << 20).unwrap();
    assert_eq!(s.requested_size, 512 << 20);
    assert!(s.to_lines().contains("requested_size=536870912\n"));
    match client::resize(&e.path, 3) {
        Err(client::ClientError::Refused {
            status: 422,
            message,
        }) => {
            assert!(message.contains("not a multiple"), "{message}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let missing = e.path.with_file_name("nobody.sock");
    assert!(matches!(
        client::status(&missing),
        Err(client::ClientError::Connect { .. })
    ));
}

#[test]
fn a_client_never_hangs_on_a_vmm_that_does_not_answer() {
    use std::time::{Duration, Instant};
    let dir = std::env::temp_dir().join(format!("api-silent-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("silent.sock");
    // Bound but never accepted: the connection lands in the backlog, no answer comes.
    let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let t = Instant::now();
    let e = client::status_within(&path, Duration::from_millis(300)).unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "waited {:?}",
        t.elapsed()
    );
    assert!(matches!(e, client::ClientError::Timeout { .. }), "{e}");
    assert!(e.to_string().contains("GET /v1/memory"), "{e}");
    let e = client::resize_within(&path, 0, Duration::from_millis(300)).unwrap_err();
    assert!(e.to_string().contains("PUT /v1/memory"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Opens `GET /v1/events` and returns the reader past the answer's head.
fn subscribe(path: &std::path::Path) -> std::io::BufReader<UnixStream> {
    let mut s = UnixStream::connect(path).unwrap();
    s.write_all(b"GET /v1/events HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut r = std::io::BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status).unwrap();
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    loop {
        let mut h = String::new();
        r.read_line(&mut h).unwrap();
        if h == "\r\n" {
            return r;
        }
        if h.starts_with("Content-Type") {
            assert!(h.contains("application/x-ndjson"), "{h}");
        }
    }
}

fn next_event(r: &mut std::io::BufReader<UnixStream>) -> Event {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"))
}

#[test]
fn events_reach_every_client_and_a_stuck_one_holds_nobody_up() {
    let e = env("events");
    let mut a = subscribe(&e.path);
    let mut b = subscribe(&e.path);
    // Subscribes, then never reads: its socket fills, and nothing waits for it.
    let stuck = subscribe(&e.path);
    // The subscriptions are made by the server's threads: wait until all three exist.
    let deadline = Instant::now() + Duration::from_secs(10);
    while e.fake.bus.subscribers() < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(e.fake.bus.subscribers(), 3);
    client::resize(&e.path, 2 * BS).unwrap();
    for r in [&mut a, &mut b] {
        assert_eq!(
            next_event(r).kind,
            EventKind::ResizeRequested {
                requested_size: 2 * BS,
                plugged_size: 0
            }
        );
    }
    // Flood far past what the stuck client's socket and queue hold; the API still answers
    // at once and the reading clients get the latest.
    let t = Instant::now();
    for i in 0..5000 {
        e.fake.bus.publish(EventKind::Done { plugged_size: i });
    }
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "publishing waited: {:?}",
        t.elapsed()
    );
    client::status(&e.path).unwrap();
    let mut last = None;
    while last != Some(4999) {
        match next_event(&mut a).kind {
            EventKind::Done { plugged_size } => last = Some(plugged_size),
            EventKind::Dropped { count } => assert!(count > 0),
            other => panic!("unexpected {other:?}"),
        }
    }
    // A client that goes away is forgotten.
    drop(stuck);
    drop(b);
    let deadline = Instant::now() + Duration::from_secs(20);
    while e.fake.bus.subscribers() > 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(e.fake.bus.subscribers(), 1, "closed clients unsubscribed");
}

#[test]
fn events_refuse_other_methods() {
    let e = env("events-put");
    let (status, _) = raw(&e, b"PUT /v1/events HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(status, 405);
}

fn put_autosize(e: &Env, body: &str) -> (u16, String) {
    raw(
        e,
        format!(
            "PUT /v1/memory/autosize HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
}

#[test]
fn autosize_turns_on_and_off_and_a_manual_resize_meanwhile_is_409() {
    let e = env("autosize");
    let (code, body) = put_autosize(&e, r#"{"min": 0, "max": 1073741824, "target_percent": 60}"#);
    assert_eq!(code, 200, "{body}");
    let s: MemoryStatus = serde_json::from_str(&body).unwrap();
    let a = s.autosize.unwrap();
    assert_eq!((a.policy.max, a.policy.target_percent), (1 << 30, 60));
    let (code, body) = put(&e, r#"{"requested_size": 2097152}"#);
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("vmm autosize --api-socket S off"), "{body}");
    assert_unchanged(&e);
    let got = client::status_within(&e.path, Duration::from_secs(5)).unwrap();
    assert!(got.to_lines().contains("autosize_target_percent=60\n"));
    let off = client::autosize_within(&e.path, &AutosizeRequest::Off, Duration::from_secs(5));
    assert!(off.unwrap().autosize.is_none());
    assert_eq!(put(&e, r#"{"requested_size": 2097152}"#).0, 202);
    let on = AutosizeRequest::On(AutosizePolicy::parse_spec("min=0,max=1G").unwrap());
    let s = client::autosize_within(&e.path, &on, Duration::from_secs(5)).unwrap();
    assert!(s.to_lines().contains("autosize=on\n"));
}

#[test]
fn bad_autosize_requests_are_400_and_change_nothing() {
    let e = env("autosize-bad");
    for body in [
        "",
        "[]",
        r#"{"enabled": true}"#,
        r#"{"min": 4, "max": 2}"#,
        r#"{"min": 0, "max": 2, "target_percent": 0}"#,
        r#"{"min": 0, "max": 2, "extra": 1}"#,
        r#"{"min": 0, "max": 9999999999999}"#,
    ] {
        let (code, out) = put_autosize(&e, body);
        assert_eq!(code, 400, "{body}: {out}");
        assert!(out.contains("\"error\""), "{body}: {out}");
    }
    assert!(e.fake.status.lock().unwrap().autosize.is_none());
    let (code, out) = raw(&e, b"GET /v1/memory/autosize HTTP/1.1\r\n\r\n");
    assert_eq!(code, 405, "{out}");
}

struct NoAutosize;

impl MemoryControl for NoAutosize {
    fn status(&self) -> MemoryStatus {
        MemoryStatus::default()
    }

    fn resize(&self, _size: u64) -> Result<MemoryStatus, ResizeError> {
        Err(ResizeError::Unavailable("test".into()))
    }
}

#[test]
fn a_vmm_without_automatic_sizing_answers_409() {
    let dir = temp_dir("no-autosize");
    let path = dir.0.join("api.sock");
    let _server = ApiServer::start(&path, Arc::new(NoAutosize)).unwrap();
    let on = AutosizeRequest::On(AutosizePolicy::parse_spec("min=0,max=1G").unwrap());
    match client::autosize_within(&path, &on, Duration::from_secs(5)) {
        Err(client::ClientError::Refused { status, message }) => {
            assert_eq!(status, 409);
            assert!(message.contains("--autosize"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}
