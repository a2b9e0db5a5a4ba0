//! The operator's view over the real request path: `GET /metrics` and the resize state of
//! `GET /v1/memory`, served by the real API server over the VMM's `MemoryApi`, while the
//! device model answers requests over the real `HotplugMemory` of a `memory-backend`
//! region (KVM slots recorded, not made).

#![expect(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use memory_backend::MemoryRegion;
use prometheus_parse::{Scrape, Value};
use virtio_mem::wire::{Request, Response};
use virtio_mem::{DeviceConfig, VirtioMem};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm::devices::virtio_mem::{InterruptLine, MemoryApi, SharedHotplug, SharedVirtioMem};
use vmm::hotplug::HotplugMemory;
use vmm::memory::GuestMemoryHandle;
use vmm_api::{ApiServer, Event, EventKind, ResizeState};

mod support;

use support::{region_at, Slots};

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 2 * MIB;
const BASE: u64 = 4 << 30;

fn subscribe(socket: &std::path::Path) -> BufReader<UnixStream> {
    let mut s = UnixStream::connect(socket).unwrap();
    write!(s, "GET /v1/events HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    while line != "\r\n" {
        line.clear();
        r.read_line(&mut line).unwrap();
    }
    r
}

fn next_event(r: &mut BufReader<UnixStream>) -> Event {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"))
}

fn get(socket: &std::path::Path, path: &str) -> (String, String) {
    let mut s = UnixStream::connect(socket).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    (head.to_string(), body.to_string())
}

fn sample<'a>(scrape: &'a Scrape, name: &str, labels: &[(&str, &str)]) -> &'a Value {
    &scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .unwrap_or_else(|| panic!("no sample {name} {labels:?}"))
        .value
}

fn number(v: &Value) -> f64 {
    match v {
        Value::Counter(x) | Value::Gauge(x) | Value::Untyped(x) => *x,
        other => panic!("not a number: {other:?}"),
    }
}

#[test]
fn metrics_and_resize_state_follow_the_guests_requests() {
    let boot = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
    let mem = GuestMemoryHandle::new(boot);
    let region = Arc::new(MemoryRegion::new(region_at(BASE, 256 * MIB, BLOCK)).unwrap());
    let hotplug = HotplugMemory::new(
        Arc::clone(&region),
        128 * MIB,
        1,
        Arc::new(Slots::default()),
        mem,
    )
    .unwrap();
    let slots = hotplug.registered_slots_gauge();
    let hotplug: SharedHotplug = Arc::new(Mutex::new(hotplug));
    let mut model = VirtioMem::new(
        DeviceConfig::new(region.layout()),
        Arc::clone(&hotplug),
        Arc::new(InterruptLine::default()),
    )
    .unwrap();
    let features = model.state().device_features();
    model.state_mut().ack_features(features).unwrap();
    let device: SharedVirtioMem = Arc::new(Mutex::new(model));
    let api = Arc::new(MemoryApi::new(
        Arc::clone(&device),
        Arc::clone(&region),
        slots,
    ));
    // A guest poking where no device is: two accesses counted on the MMIO bus.
    let bus = Arc::new(vmm::bus::Bus::new());
    let mut junk = [0u8; 4];
    assert!(!bus.read(0xdead_0000, &mut junk));
    assert!(!bus.write(0xdead_0004, &junk));
    let b = Arc::clone(&bus);
    api.set_bad_accesses(
        vmm::vm::BadAccesses::default()
            .with("mmio-bus", move || b.unclaimed_accesses())
            .with("virtio-mem", || 0),
    );
    let dir = std::env::temp_dir().join(format!("vmm-api-metrics-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("api.sock");
    let _server = ApiServer::start(&socket, api).unwrap();
    let mut events = subscribe(&socket);
    // The watcher looks every 250 ms: give it time to see each step.
    let settle = || std::thread::sleep(Duration::from_millis(600));

    // The operator asks for 8 MiB; the guest plugs 4 of it, and sends one bad request.
    vmm_api::client::resize(&socket, 8 * MIB).unwrap();
    settle();
    {
        let mut d = device.lock().unwrap();
        let s = d.state_mut();
        let plug = Request::Plug {
            addr: BASE,
            nb_blocks: 2,
        };
        assert_eq!(s.handle(plug), Response::Ack(None));
        let unplug_unplugged = Request::Unplug {
            addr: BASE + 64 * MIB,
            nb_blocks: 1,
        };
        assert_eq!(s.handle(unplug_unplugged), Response::Error);
    }
    // Progress events come at most once a second.
    std::thread::sleep(Duration::from_millis(1500));

    let status = vmm_api::client::status(&socket).unwrap();
    assert_eq!(status.state, ResizeState::Plugging);
    assert_eq!(status.progress.moved_bytes, 4 * MIB);
    assert_eq!(status.progress.remaining_bytes, 4 * MIB);
    assert_eq!((status.stalled_for_s, status.reason), (None, None));

    let (head, body) = get(&socket, "/metrics");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    let scrape = Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap();
    let plug_ack = [("type", "plug"), ("response", "ack")];
    let unplug_error = [("type", "unplug"), ("response", "error")];
    assert_eq!(
        number(sample(&scrape, "vmm_virtio_mem_requests_total", &plug_ack)),
        1.0
    );
    assert_eq!(
        number(sample(
            &scrape,
            "vmm_virtio_mem_requests_total",
            &unplug_error
        )),
        1.0
    );
    assert_eq!(
        number(sample(&scrape, "vmm_virtio_mem_plugged_bytes_total", &[])),
        (4 * MIB) as f64
    );
    assert_eq!(
        number(sample(&scrape, "vmm_plugged_bytes", &[])),
        (4 * MIB) as f64
    );
    assert_eq!(
        number(sample(&scrape, "vmm_requested_bytes", &[])),
        (8 * MIB) as f64
    );
    assert_eq!(
        number(sample(&scrape, "vmm_kvm_slots_registered", &[])),
        1.0
    );
    assert_eq!(
        number(sample(
            &scrape,
            "vmm_bad_guest_accesses_total",
            &[("where", "mmio-bus")]
        )),
        2.0
    );
    assert_eq!(
        number(sample(
            &scrape,
            "vmm_bad_guest_accesses_total",
            &[("where", "virtio-mem")]
        )),
        0.0
    );
    let Value::Histogram(h) = sample(&scrape, "vmm_virtio_mem_plug_host_seconds", &[]) else {
        panic!("no plug histogram in:\n{body}");
    };
    assert_eq!(
        h.last().map(|b| b.count),
        Some(1.0),
        "one plug observed:\n{body}"
    );
    for family in [
        "vmm_virtio_mem_requests_total",
        "vmm_virtio_mem_unplug_host_seconds",
        "vmm_virtio_mem_malformed_chains_total",
        "vmm_region_host_resident_bytes",
    ] {
        assert!(
            scrape.docs.contains_key(family),
            "no HELP for {family}:\n{body}"
        );
    }

    // Done: the guest plugs the rest.
    device.lock().unwrap().state_mut().handle(Request::Plug {
        addr: BASE + 4 * MIB,
        nb_blocks: 2,
    });
    let status = vmm_api::client::status(&socket).unwrap();
    assert_eq!(status.state, ResizeState::Idle);
    // The events told the same story, in order.
    let mut kinds = Vec::new();
    loop {
        let kind = next_event(&mut events).kind;
        let done = matches!(kind, EventKind::Done { .. });
        kinds.push(kind);
        if done {
            break;
        }
    }
    let at = |want: &dyn Fn(&EventKind) -> bool| kinds.iter().position(want);
    let requested = at(
        &|k| matches!(k, EventKind::ResizeRequested { requested_size, plugged_size: 0 } if *requested_size == 8 * MIB),
    );
    let progress = at(
        &|k| matches!(k, EventKind::Progress { plugged_size, state: ResizeState::Plugging, .. } if *plugged_size == 4 * MIB),
    );
    let done = at(&|k| matches!(k, EventKind::Done { plugged_size } if *plugged_size == 8 * MIB));
    assert!(
        requested < progress && progress < done && requested.is_some(),
        "{kinds:?}"
    );
    let (head, _) = get(&socket, "/nope");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    let _ = std::fs::remove_dir_all(&dir);
}
