//! Fuzzes the API's request handling: arbitrary bytes as one connection's input, through
//! the HTTP parser, the router and the JSON body, against a model of the memory control.
//! Findings: any panic, an answer outside 2xx/4xx/503/505, a body that is not JSON, or a
//! refused request that changed the state.
//!
//! Run: `ci/fuzz http_request [SECONDS]` (new inputs go to `corpus/http_request`, which
//! git ignores; `seeds` is only read).

#![no_main]

use std::io::{Read, Write};
use std::sync::Mutex;

use libfuzzer_sys::fuzz_target;
use vmm_api::{MemoryControl, MemoryStatus, ResizeError};

const BS: u64 = 2 << 20;
const REGION: u64 = 4 << 30;

struct Model(Mutex<MemoryStatus>);

impl MemoryControl for Model {
    fn status(&self) -> MemoryStatus {
        self.0.lock().expect("model lock").clone()
    }

    fn resize(&self, size: u64) -> Result<MemoryStatus, ResizeError> {
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
        let mut s = self.0.lock().expect("model lock");
        s.requested_size = size;
        Ok(s.clone())
    }
}

/// One connection: reads come from the input, writes are kept.
struct Conn<'a> {
    input: &'a [u8],
    written: Vec<u8>,
}

impl Read for Conn<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Conn<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.written.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let before = MemoryStatus {
        region_size: REGION,
        block_size: BS,
        usable_region_size: REGION,
        ..MemoryStatus::default()
    };
    let model = Model(Mutex::new(before.clone()));
    let mut conn = Conn {
        input: data,
        written: Vec::new(),
    };
    let Some(reply) = vmm_api::answer(&mut conn, &model) else {
        return;
    };
    let (status, body) = (reply.status, reply.body);
    assert!(
        (200..300).contains(&status)
            || (400..500).contains(&status)
            // 503: busy; 505: the client's HTTP version is not 1.x (a refusal, not a fault).
            || status == 503
            || status == 505,
        "status {status}"
    );
    if reply.content_type == vmm_api::metrics::CONTENT_TYPE {
        // Only a GET of /metrics answers in the Prometheus format.
        assert_eq!(status, 200, "a metrics page with status {status}");
        assert!(body.contains("# TYPE vmm_"), "metrics page without families: {body:?}");
    } else {
        assert!(
            serde_json_is_object(&body),
            "answer body is not a JSON object: {body:?}"
        );
    }
    if !(200..300).contains(&status) {
        assert_eq!(
            *model.0.lock().expect("model lock"),
            before,
            "a refused request ({status}) changed the state"
        );
    }
});

/// A cheap check that the body is one JSON object (the crate's own serde_json is not a
/// dependency of this target: braces balanced outside strings, starting with `{`).
fn serde_json_is_object(body: &str) -> bool {
    let b = body.trim();
    if !b.starts_with('{') || !b.ends_with('}') {
        return false;
    }
    let (mut depth, mut in_str, mut esc) = (0i32, false, false);
    for c in b.chars() {
        match (in_str, esc, c) {
            (true, true, _) => esc = false,
            (true, false, '\\') => esc = true,
            (true, false, '"') => in_str = false,
            (false, _, '"') => in_str = true,
            (false, _, '{') => depth += 1,
            (false, _, '}') => depth -= 1,
            _ => {}
        }
        if depth < 0 {
            return false;
        }
    }
    depth == 0 && !in_str
}
