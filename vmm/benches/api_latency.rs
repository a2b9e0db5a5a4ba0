//! Latency of `GET /v1/memory` (over the real API socket) and of config-space reads (as a
//! vCPU does them, through the transport face's `VirtioDevice::read_config`) while a guest-side
//! model plugs a large size with populate, 128 MiB per request as Linux sends them.
//!
//! Two request paths in the same run, over the same real `memory-backend` region (KVM
//! slots recorded, not made: no KVM needed):
//!
//! - `device-lock-held`: the request path before the two-phase change, the whole round
//!   (populate included) under the device lock (`process_queue` on the shared device);
//! - `two-phase`: the VMM's request thread (`VirtioMemMmio::activate`), which holds the
//!   device only to take and to commit each request.
//!
//! Run: `ci/bench api_latency` (or `cargo bench -p vmm --bench api_latency -- [--size-gib N]
//! [--json F]`). Prints one table; figures never gate anything.

#![expect(
    clippy::unwrap_used,
    reason = "a benchmark fails loudly on unexpected errors"
)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use memory_backend::{BlockLayout, MemoryRegion, PopulateOptions, RegionConfig};
use virtio_mem::wire::{Request, Response};
use virtio_mem::{DeviceConfig, VirtioMem};
use virtio_mmio::{Activation, ActiveQueue, MmioInterrupt, VirtioDevice};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm::devices::virtio_mem::{
    InterruptLine, MemoryApi, SharedHotplug, SharedVirtioMem, VirtioMemMmio,
};
use vmm::hotplug::HotplugMemory;
use vmm::memory::GuestMemoryHandle;
use vmm_api::ApiServer;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use support::{Driver, Slots, BOOT_RINGS, RESP};

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 2 * MIB;
const BASE: u64 = 4 << 30;
/// Blocks per PLUG request: one Linux memory block (128 MiB).
const BLOCKS_PER_REQUEST: u16 = 64;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Path {
    DeviceLockHeld,
    TwoPhase,
}

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::DeviceLockHeld => "device-lock-held",
            Path::TwoPhase => "two-phase",
        }
    }
}

/// p50, p99 and max of `samples`, in milliseconds.
fn percentiles(samples: &mut [Duration]) -> (f64, f64, f64, usize) {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let at = |q: f64| {
        let i = ((samples.len() as f64 - 1.0) * q).round();
        // i is within 0..len: q is in [0, 1].
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "see above"
        )]
        ms(samples[i as usize])
    };
    if samples.is_empty() {
        return (0.0, 0.0, 0.0, 0);
    }
    (at(0.5), at(0.99), at(1.0), samples.len())
}

struct Figures {
    path: Path,
    plug_s: f64,
    get: (f64, f64, f64, usize),
    get_idle: (f64, f64, f64, usize),
    config: (f64, f64, f64, usize),
}

fn run(path: Path, size: u64, socket: &std::path::Path) -> Figures {
    let boot = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
    let mem = GuestMemoryHandle::new(boot);
    let layout = BlockLayout::new(BASE, size, BLOCK).unwrap();
    let region = Arc::new(
        MemoryRegion::new(RegionConfig::new(layout).with_populate(PopulateOptions::default()))
            .unwrap(),
    );
    let hotplug: SharedHotplug = Arc::new(Mutex::new(
        HotplugMemory::new(
            Arc::clone(&region),
            1 << 30,
            1,
            Arc::new(Slots::default()),
            mem.clone(),
        )
        .unwrap(),
    ));
    let irq = Arc::new(InterruptLine::default());
    let mut model = VirtioMem::new(
        DeviceConfig::new(layout),
        Arc::clone(&hotplug),
        Arc::clone(&irq),
    )
    .unwrap();
    let features = model.state().device_features();
    model.state_mut().ack_features(features).unwrap();
    model.set_requested_size(size).unwrap();
    let device: SharedVirtioMem = Arc::new(Mutex::new(model));
    let mut driver = Driver::new(&mem, BOOT_RINGS);
    let notify = EventFd::new(EFD_NONBLOCK).unwrap();
    let mmio = Arc::new(Mutex::new(VirtioMemMmio::new(
        Arc::clone(&device),
        Arc::clone(&hotplug),
        irq,
    )));
    let stop = Arc::new(AtomicBool::new(false));
    let old_path = match path {
        Path::TwoPhase => {
            mmio.lock()
                .unwrap()
                .activate(Activation {
                    mem: mem.clone(),
                    queues: vec![ActiveQueue {
                        index: 0,
                        queue: driver.queue(),
                        notify: notify.try_clone().unwrap(),
                    }],
                    interrupt: Arc::new(MmioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap())),
                    features,
                })
                .unwrap();
            None
        }
        Path::DeviceLockHeld => {
            device.lock().unwrap().activate(driver.queue());
            let (device, mem, notify, stop) = (
                Arc::clone(&device),
                mem.clone(),
                notify.try_clone().unwrap(),
                Arc::clone(&stop),
            );
            Some(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if notify.read().is_ok() {
                        device.lock().unwrap().process_queue(mem.clone()).unwrap();
                    } else {
                        std::thread::sleep(Duration::from_micros(50));
                    }
                }
            }))
        }
    };
    let slots = hotplug.lock().unwrap().registered_slots_gauge();
    let api = Arc::new(MemoryApi::new(
        Arc::clone(&device),
        Arc::clone(&region),
        slots,
    ));
    let server = ApiServer::start(socket, api).unwrap();

    let done = Arc::new(AtomicBool::new(false));
    let get_sampler = {
        let (done, socket) = (Arc::clone(&done), socket.to_path_buf());
        std::thread::spawn(move || {
            let mut v = Vec::new();
            while !done.load(Ordering::Relaxed) {
                let t = Instant::now();
                vmm_api::client::status(&socket).unwrap();
                v.push(t.elapsed());
                std::thread::sleep(Duration::from_millis(2));
            }
            v
        })
    };
    let config_sampler = {
        let (done, mmio) = (Arc::clone(&done), Arc::clone(&mmio));
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let mut buf = [0u8; 8];
            while !done.load(Ordering::Relaxed) {
                let t = Instant::now();
                // plugged_size, as the driver reads it after each request.
                mmio.lock().unwrap().read_config(0x28, &mut buf);
                v.push(t.elapsed());
                std::thread::sleep(Duration::from_micros(500));
            }
            v
        })
    };

    std::thread::sleep(Duration::from_millis(100));
    let start = Instant::now();
    let mut addr = BASE;
    while addr < BASE + size {
        let head = driver.submit(Request::Plug {
            addr,
            nb_blocks: BLOCKS_PER_REQUEST,
        });
        notify.write(1).unwrap();
        loop {
            let used = driver.used();
            if let Some(&(id, _)) = used.first() {
                assert_eq!(id, u32::from(head));
                break;
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        assert_eq!(
            driver.response(RESP),
            Response::Ack(None),
            "plug at {addr:#x}"
        );
        addr += u64::from(BLOCKS_PER_REQUEST) * BLOCK;
    }
    let plug_s = start.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(100));
    done.store(true, Ordering::Relaxed);
    let mut get = get_sampler.join().unwrap();
    let mut config = config_sampler.join().unwrap();
    // The same GET with nothing running: its own cost.
    let mut idle = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        vmm_api::client::status(socket).unwrap();
        idle.push(t.elapsed());
    }

    // Give the memory back before the next run.
    device.lock().unwrap().set_requested_size(0).unwrap();
    driver.submit(Request::UnplugAll);
    notify.write(1).unwrap();
    while driver.used().is_empty() {
        std::thread::sleep(Duration::from_millis(1));
    }
    stop.store(true, Ordering::Relaxed);
    if let Some(t) = old_path {
        t.join().unwrap();
    }
    drop(server);
    drop(mmio);
    Figures {
        path,
        plug_s,
        get: percentiles(&mut get),
        get_idle: percentiles(&mut idle),
        config: percentiles(&mut config),
    }
}

fn main() {
    let mut size_gib = 8u64;
    let mut json: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--size-gib" => size_gib = args.next().and_then(|v| v.parse().ok()).unwrap(),
            "--json" => json = args.next().map(PathBuf::from),
            // cargo bench passes --bench.
            _ => {}
        }
    }
    let size = size_gib << 30;
    let dir = std::env::temp_dir().join(format!("api-latency-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut rows = Vec::new();
    // A first plug of fresh host memory is much slower on these VMs than later ones: warm
    // the host up once, unmeasured, so both paths see the same.
    run(Path::TwoPhase, size, &dir.join("warm-up.sock"));
    // Twice each, alternating: on these VMs a run is often slower than the one before.
    for path in [
        Path::DeviceLockHeld,
        Path::TwoPhase,
        Path::DeviceLockHeld,
        Path::TwoPhase,
    ] {
        let socket = dir.join(format!("{}.sock", path.name()));
        rows.push(run(path, size, &socket));
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "api_latency: plug {size_gib} GiB with populate, {} MiB per request, 2 MiB blocks, anon",
        u64::from(BLOCKS_PER_REQUEST) * BLOCK / MIB
    );
    println!(
        "{:<18} {:>8} | {:>38} | {:>38} | {:>20}",
        "request path",
        "plug s",
        "GET /v1/memory ms p50/p99/max",
        "config read ms p50/p99/max",
        "GET idle ms p50/p99"
    );
    let mut out = Vec::new();
    for f in &rows {
        println!(
            "{:<18} {:>8.2} | {:>7.3} {:>8.3} {:>8.3} (n={:>5}) | {:>7.3} {:>8.3} {:>8.3} (n={:>5}) | {:>8.3} {:>8.3}",
            f.path.name(),
            f.plug_s,
            f.get.0,
            f.get.1,
            f.get.2,
            f.get.3,
            f.config.0,
            f.config.1,
            f.config.2,
            f.config.3,
            f.get_idle.0,
            f.get_idle.1
        );
        out.push(serde_json::json!({
            "path": f.path.name(),
            "size_gib": size_gib,
            "plug_s": f.plug_s,
            "get_ms": {"p50": f.get.0, "p99": f.get.1, "max": f.get.2, "n": f.get.3},
            "get_idle_ms": {"p50": f.get_idle.0, "p99": f.get_idle.1, "max": f.get_idle.2},
            "config_read_ms": {"p50": f.config.0, "p99": f.config.1, "max": f.config.2, "n": f.config.3},
        }));
    }
    if let Some(p) = json {
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(&p, serde_json::to_string_pretty(&out).unwrap()).unwrap();
    }
}
