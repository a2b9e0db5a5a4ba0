//! Requests handled per second through the queue, one request in flight at a time as the
//! Linux driver sends them: 1-block and 512-block PLUG+UNPLUG pairs next to a parse-only
//! baseline (a request of unknown type: popped, parsed, answered, no state change), all in
//! the same run. The backend does no host work, so this measures the device model alone.
//!
//! Run: `ci/bench virtio_mem` (or `cargo bench -p virtio-mem --bench queue -- [--json F]`).

use std::time::{Duration, Instant};

use virtio_mem::test_utils::{CountingInterrupt, DriverQueue};
use virtio_mem::{BackendError, BlockBackend, DeviceConfig, Request, VirtioMem};

const ADDR: u64 = 1 << 32;
const BS: u64 = 2 << 20;
const REGION: u64 = 64 << 30;
const MEASURE: Duration = Duration::from_secs(2);

struct NullBackend;

impl BlockBackend for NullBackend {
    fn plug(&mut self, _addr: u64, _len: u64) -> Result<(), BackendError> {
        Ok(())
    }
    fn unplug(&mut self, _addr: u64, _len: u64) -> Result<(), BackendError> {
        Ok(())
    }
}

struct Bench {
    dev: VirtioMem<NullBackend, CountingInterrupt>,
    driver: DriverQueue,
}

impl Bench {
    fn new() -> Self {
        let mut dev = VirtioMem::new(
            DeviceConfig::with_layout(ADDR, REGION, BS).expect("bench layout"),
            NullBackend,
            CountingInterrupt::default(),
        )
        .expect("config");
        let f = dev.state().device_features();
        dev.state_mut().ack_features(f).expect("features");
        dev.set_requested_size(REGION).expect("size");
        let driver = DriverQueue::new(128);
        dev.activate(driver.device_queue());
        Bench { dev, driver }
    }

    fn request(&mut self, req: Request) {
        self.driver.submit(req);
        let done = self.dev.process_queue(&self.driver.mem).expect("activated");
        assert_eq!(done.len(), 1);
        self.driver.take_used();
    }
}

/// Runs `round` (which sends `per_round` requests) for MEASURE after a warm-up;
/// returns requests per second.
fn measure(mut round: impl FnMut(u64), per_round: u64) -> f64 {
    let warm = Instant::now();
    let mut i = 0;
    while warm.elapsed() < Duration::from_millis(300) {
        round(i);
        i += 1;
    }
    let start = Instant::now();
    let mut rounds = 0u64;
    while start.elapsed() < MEASURE {
        for _ in 0..64 {
            round(i);
            i += 1;
            rounds += 1;
        }
    }
    (rounds * per_round) as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let json = std::env::args().skip_while(|a| a != "--json").nth(1);

    let mut b = Bench::new();
    let parse_only = measure(|_| b.request(Request::Unsupported(0x7777)), 1);

    let mut b = Bench::new();
    // Walk the region so the bitmap words differ from round to round.
    let slots = REGION / BS;
    let one_block = measure(
        |i| {
            let addr = ADDR + (i % slots) * BS;
            b.request(Request::Plug { addr, nb_blocks: 1 });
            b.request(Request::Unplug { addr, nb_blocks: 1 });
        },
        2,
    );

    let mut b = Bench::new();
    let slots = REGION / (512 * BS);
    let big = measure(
        |i| {
            let addr = ADDR + (i % slots) * 512 * BS;
            b.request(Request::Plug {
                addr,
                nb_blocks: 512,
            });
            b.request(Request::Unplug {
                addr,
                nb_blocks: 512,
            });
        },
        2,
    );

    println!("virtio-mem queue throughput (one request in flight, no host work)");
    println!(
        "{:<28} {:>14} {:>12} {:>10}",
        "workload", "requests/s", "ns/request", "vs parse"
    );
    let rows = [
        ("parse-only (unknown type)", parse_only),
        ("PLUG+UNPLUG 1 block", one_block),
        ("PLUG+UNPLUG 512 blocks", big),
    ];
    for (name, rps) in rows {
        println!(
            "{:<28} {:>14.0} {:>12.0} {:>9.2}x",
            name,
            rps,
            1e9 / rps,
            rps / parse_only
        );
    }
    if let Some(path) = json {
        let body = format!(
            "{{\n  \"unit\": \"requests_per_second\",\n  \"parse_only\": {parse_only:.0},\n  \"plug_unplug_1_block\": {one_block:.0},\n  \"plug_unplug_512_blocks\": {big:.0}\n}}\n"
        );
        if let Err(e) = std::fs::write(&path, body) {
            eprintln!("cannot write {path}: {e}");
            std::process::exit(1);
        }
        println!("figures written to {path}");
    }
}
