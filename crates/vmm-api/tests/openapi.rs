//! The API contract: `openapi.json` and the server agree. Every documented status of
//! every operation is reached by a request here (and nothing undocumented is listed
//! here), every answer has a documented content type and matches its schema, and a
//! property-based client finds no undocumented status, no 5xx, no crash and no state
//! change from a refused request.

#![expect(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::prelude::*;
use serde_json::Value;
use vmm_api::{
    ApiServer, AutosizeDecision, AutosizeError, AutosizeRequest, AutosizeStatus, EventBus,
    EventKind, GuestStatsView, MemoryControl, MemoryStatus, ResizeError,
};

const BS: u64 = 2 << 20;
const REGION: u64 = 1 << 30;
/// The fake VMM answers a resize to this size with "cannot act now".
const UNAVAILABLE: u64 = 6 << 20;
/// A size the fake refuses because automatic sizing is on.
const AUTOSIZE_ON: u64 = 8 << 20;
/// An autosize max the fake answers with "no automatic sizing here".
const UNSUPPORTED: u64 = 10 << 20;

fn doc() -> Value {
    serde_json::from_str(include_str!("../openapi.json")).unwrap()
}

struct Fake {
    status: Mutex<MemoryStatus>,
    bus: EventBus,
}

impl MemoryControl for Fake {
    fn status(&self) -> MemoryStatus {
        self.status.lock().unwrap().clone()
    }

    fn set_autosize(&self, req: AutosizeRequest) -> Result<MemoryStatus, AutosizeError> {
        let mut s = self.status.lock().unwrap().clone();
        match req {
            AutosizeRequest::Off => {}
            AutosizeRequest::On(p) if p.max == UNSUPPORTED => {
                return Err(AutosizeError::Unsupported("no balloon".into()))
            }
            AutosizeRequest::On(policy) => {
                s.autosize = Some(AutosizeStatus {
                    cap: policy.max,
                    policy,
                    state: "stale".into(),
                    reason: "no statistics yet".into(),
                    stats: Some(GuestStatsView {
                        total: Some(1 << 30),
                        async_scan: Some(5),
                        direct_reclaim: Some(3),
                        age_ms: 7,
                        ..GuestStatsView::default()
                    }),
                    decisions: vec![AutosizeDecision {
                        at_ms: 1,
                        from: 0,
                        to: BS,
                        reason: "grow".into(),
                    }],
                })
            }
        }
        Ok(s)
    }

    fn resize(&self, size: u64) -> Result<MemoryStatus, ResizeError> {
        if size == AUTOSIZE_ON {
            return Err(ResizeError::AutosizeOn);
        }
        if size == UNAVAILABLE {
            return Err(ResizeError::Unavailable("the device is resetting".into()));
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
        let mut s = self.status.lock().unwrap();
        s.requested_size = size;
        Ok(s.clone())
    }

    fn events(&self) -> Option<&EventBus> {
        Some(&self.bus)
    }
}

struct Env {
    _server: ApiServer,
    socket: PathBuf,
    fake: Arc<Fake>,
    dir: PathBuf,
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn env(name: &str) -> Env {
    let dir = std::env::temp_dir().join(format!("vmm-openapi-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("api.sock");
    let fake = Arc::new(Fake {
        status: Mutex::new(MemoryStatus {
            region_addr: 4 << 30,
            region_size: REGION,
            block_size: BS,
            usable_region_size: 256 << 20,
            host_error: Some("hugetlb pool empty".into()),
            reason: Some("the guest sends no requests".into()),
            ..MemoryStatus::default()
        }),
        bus: EventBus::new(),
    });
    let server = ApiServer::start(&socket, Arc::clone(&fake) as Arc<dyn MemoryControl>).unwrap();
    Env {
        _server: server,
        socket,
        fake,
        dir,
    }
}

/// An answer: status, content type, body (for a stream: its first line).
struct Answer {
    status: u16,
    content_type: String,
    allow: String,
    body: String,
}

fn send(socket: &Path, request: &[u8], stream: bool, bus: Option<&EventBus>) -> Answer {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status = line.split(' ').nth(1).unwrap().parse().unwrap();
    let mut content_type = String::new();
    let mut allow = String::new();
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        if line == "\r\n" {
            break;
        }
        if let Some(v) = line.strip_prefix("Content-Type: ") {
            content_type = v.trim().to_string();
        }
        if let Some(v) = line.strip_prefix("Allow: ") {
            allow = v.trim().to_string();
        }
    }
    let mut body = String::new();
    if stream && status == 200 {
        // The stream is live once its head is written; give it an event to carry.
        if let Some(bus) = bus {
            for _ in 0..100 {
                if bus.subscribers() > 0 {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            bus.publish(EventKind::Done { plugged_size: 0 });
        }
        r.read_line(&mut body).unwrap();
    } else {
        r.read_to_string(&mut body).unwrap();
    }
    Answer {
        status,
        content_type,
        allow,
        body,
    }
}

fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let mut at = doc;
            for part in r.trim_start_matches("#/").split('/') {
                at = &at[part];
            }
            resolve(doc, at)
        }
        None => v,
    }
}

/// Checks `value` against the subset of OpenAPI 3.0 schemas the document uses.
fn check(doc: &Value, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    let schema = resolve(doc, schema);
    if value.is_null() {
        return if schema["nullable"] == Value::Bool(true) {
            Ok(())
        } else {
            Err(format!("{at}: null where the schema does not allow it"))
        };
    }
    let ok = match schema["type"].as_str() {
        Some("object") => value.is_object(),
        Some("integer") => value.is_u64() || value.is_i64(),
        Some("string") => value.is_string(),
        Some("boolean") => value.is_boolean(),
        Some("array") => value.is_array(),
        _ => true,
    };
    if !ok {
        return Err(format!("{at}: {value} is not of type {}", schema["type"]));
    }
    if let Some(min) = schema["minimum"].as_i64() {
        if value.as_i64().is_some_and(|v| v < min) {
            return Err(format!("{at}: {value} below {min}"));
        }
    }
    if let Some(allowed) = schema["enum"].as_array() {
        if !allowed.contains(value) {
            return Err(format!("{at}: {value} not one of {allowed:?}"));
        }
    }
    if let Some(obj) = value.as_object() {
        let props = schema["properties"].as_object();
        for req in schema["required"].as_array().into_iter().flatten() {
            let name = req.as_str().unwrap();
            if !obj.contains_key(name) {
                return Err(format!("{at}: required {name} missing in {value}"));
            }
        }
        for (k, v) in obj {
            match props.and_then(|p| p.get(k)) {
                Some(s) => check(doc, s, v, &format!("{at}.{k}"))?,
                None if schema["additionalProperties"] == Value::Bool(false) => {
                    return Err(format!("{at}: undocumented property {k}"));
                }
                None => {}
            }
        }
    }
    Ok(())
}

/// Checks an answer against what the document says of `method path` with its status.
fn conforms(doc: &Value, method: &str, path: &str, a: &Answer) -> Result<(), String> {
    let op = &doc["paths"][path][method.to_lowercase()];
    let resp = resolve(doc, &op["responses"][a.status.to_string()]);
    let content = resp["content"]
        .as_object()
        .ok_or_else(|| format!("{method} {path}: status {} is not documented", a.status))?;
    let media = content.get(&a.content_type).ok_or_else(|| {
        format!(
            "{method} {path} {}: content type {} is not documented",
            a.status, a.content_type
        )
    })?;
    if a.content_type.starts_with("text/plain") {
        return Ok(());
    }
    let value: Value = serde_json::from_str(a.body.trim()).map_err(|e| {
        format!(
            "{method} {path} {}: body {:?} is not JSON: {e}",
            a.status, a.body
        )
    })?;
    check(
        doc,
        &media["schema"],
        &value,
        &format!("{method} {path} {}", a.status),
    )
}

fn put_autosize(body: &str) -> Vec<u8> {
    format!(
        "PUT /v1/memory/autosize HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn put(size: &str) -> Vec<u8> {
    let body = format!("{{\"requested_size\": {size}}}");
    format!(
        "PUT /v1/memory HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// One request for each documented status of each operation.
fn triggers() -> Vec<(&'static str, &'static str, u16, Vec<u8>)> {
    let bad_head =
        |m: &str, p: &str| format!("{m} {p} HTTP/1.1\r\nno colon here\r\n\r\n").into_bytes();
    vec![
        (
            "GET",
            "/v1/memory",
            200,
            b"GET /v1/memory HTTP/1.1\r\n\r\n".to_vec(),
        ),
        ("GET", "/v1/memory", 400, bad_head("GET", "/v1/memory")),
        ("PUT", "/v1/memory", 202, put(&(4u64 << 20).to_string())),
        ("PUT", "/v1/memory", 400, put("\"four\"")),
        (
            "PUT",
            "/v1/memory",
            411,
            b"PUT /v1/memory HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(),
        ),
        (
            "PUT",
            "/v1/memory",
            413,
            b"PUT /v1/memory HTTP/1.1\r\nContent-Length: 100000000\r\n\r\n".to_vec(),
        ),
        ("PUT", "/v1/memory", 422, put("3")),
        ("PUT", "/v1/memory", 503, put(&UNAVAILABLE.to_string())),
        ("PUT", "/v1/memory", 409, put(&AUTOSIZE_ON.to_string())),
        (
            "PUT",
            "/v1/memory/autosize",
            200,
            put_autosize(r#"{"min": 0, "max": 1073741824, "headroom": 4096, "beyond_cap": true}"#),
        ),
        (
            "PUT",
            "/v1/memory/autosize",
            400,
            put_autosize(r#"{"min": 2, "max": 1}"#),
        ),
        (
            "PUT",
            "/v1/memory/autosize",
            409,
            put_autosize(&format!(r#"{{"min": 0, "max": {UNSUPPORTED}}}"#)),
        ),
        (
            "PUT",
            "/v1/memory/autosize",
            411,
            b"PUT /v1/memory/autosize HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(),
        ),
        (
            "PUT",
            "/v1/memory/autosize",
            413,
            b"PUT /v1/memory/autosize HTTP/1.1\r\nContent-Length: 100000000\r\n\r\n".to_vec(),
        ),
        (
            "GET",
            "/v1/events",
            200,
            b"GET /v1/events HTTP/1.1\r\n\r\n".to_vec(),
        ),
        ("GET", "/v1/events", 400, bad_head("GET", "/v1/events")),
        (
            "GET",
            "/metrics",
            200,
            b"GET /metrics HTTP/1.1\r\n\r\n".to_vec(),
        ),
        ("GET", "/metrics", 400, bad_head("GET", "/metrics")),
    ]
}

#[test]
fn every_documented_answer_is_reached_and_matches_its_schema() {
    let doc = doc();
    let mut documented = BTreeSet::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            for status in op["responses"].as_object().unwrap().keys() {
                documented.insert((method.to_uppercase(), path.clone(), status.clone()));
            }
        }
    }
    let triggered: BTreeSet<_> = triggers()
        .iter()
        .map(|(m, p, s, _)| (m.to_string(), p.to_string(), s.to_string()))
        .collect();
    assert_eq!(
        documented, triggered,
        "documented answers vs answers this test reaches"
    );
    let e = env("reach");
    for (method, path, status, request) in triggers() {
        let stream = path == "/v1/events";
        let a = send(&e.socket, &request, stream, Some(&e.fake.bus));
        assert_eq!(a.status, status, "{method} {path}: {}", a.body);
        if let Err(m) = conforms(&doc, method, path, &a) {
            panic!("{m}");
        }
    }
}

fn method() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["GET", "PUT", "POST", "DELETE", "PATCH"])
}

fn path() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "/v1/memory",
        "/v1/memory/autosize",
        "/metrics",
        "/v1/events",
        "/",
        "/v1/memoryx",
        "/v2/memory",
    ])
}

fn body() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<u64>().prop_map(|n| format!("{{\"requested_size\": {n}}}")),
        (0u64..600).prop_map(|n| format!("{{\"requested_size\": {}}}", n * BS)),
        "\\PC{0,40}",
        Just(String::new()),
        Just("{\"requested_size\": 2097152, \"extra\": 1}".to_string()),
        Just("{\"enabled\": false}".to_string()),
        (0u64..4, 0u64..4, 0u8..120).prop_map(|(a, b, t)| format!(
            "{{\"min\": {}, \"max\": {}, \"target_percent\": {t}}}",
            a * BS,
            b * BS
        )),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn random_requests_get_documented_answers_and_refusals_change_nothing(
        method in method(),
        path in path(),
        body in body(),
    ) {
        // A GET of the stream would stay open: the test above covers it.
        prop_assume!(!(method == "GET" && path == "/v1/events"));
        let e = env("random");
        let before = e.fake.status();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let a = send(&e.socket, request.as_bytes(), false, None);
        let doc = doc();
        let known_path = doc["paths"].get(path).is_some();
        let known_op = known_path && doc["paths"][path].get(method.to_lowercase()).is_some();
        if known_op {
            if let Err(m) = conforms(&doc, method, path, &a) {
                prop_assert!(false, "{}", m);
            }
        } else {
            let expect = if known_path { 405 } else { 404 };
            prop_assert_eq!(a.status, expect, "{} {}: {}", method, path, a.body);
            if known_path {
                // A 405 names exactly the documented methods of the path.
                let mut documented: Vec<String> = doc["paths"][path]
                    .as_object()
                    .unwrap()
                    .keys()
                    .map(|m| m.to_uppercase())
                    .collect();
                let mut allowed: Vec<String> =
                    a.allow.split(", ").map(str::to_string).collect();
                documented.sort();
                allowed.sort();
                prop_assert_eq!(allowed, documented, "Allow of {}", path);
            }
            let value: Value = serde_json::from_str(a.body.trim()).unwrap();
            prop_assert!(check(&doc, &doc["components"]["schemas"]["Error"], &value, "error").is_ok());
        }
        prop_assert!(a.status < 500 || a.status == 503, "{} {}: {}", method, path, a.status);
        if !(200..300).contains(&a.status) {
            prop_assert_eq!(e.fake.status(), before, "a refused request changed the state");
        }
    }
}
