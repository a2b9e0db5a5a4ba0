//! Host memory path benchmark: populate on plug, discard on unplug, and the memset limit.
//!
//! Run through `ci/bench` (or `cargo bench -p memory-backend --bench host_memory`).
//! Options: `--json PATH` (default `$BENCH_OUT_DIR/memory-backend.json`, else
//! `target/bench/memory-backend.json`), `--size-mib N` (default 1024), `--reps N`
//! (default 5, the median is reported), `--warmup-mib N` (default 4096), `--long-mib N`
//! (default 4096, 0 to skip), `--kinds a,b` (only these populate/unplug kinds).
//!
//! One run measures, side by side:
//! - plugging `size` with populate: parallel `MADV_POPULATE_WRITE` at 1..nproc threads,
//!   single-threaded `MADV_POPULATE_WRITE` (what QEMU does per request) and a
//!   touch-every-page loop (the naive baseline), for each backing kind;
//! - unplugging `size`: each discard method per backing kind (and whether it freed the
//!   memory);
//! - `memset` over an already-populated buffer: the bandwidth limit populate is up
//!   against (the kernel zeroes every page it faults in).
//!
//! These machines are VMs: the first touch of fresh host memory is slow because the outer
//! hypervisor faults it in. The first populate is reported separately as "cold", then the
//! benchmark warms up before measuring.

#![expect(
    clippy::unwrap_used,
    reason = "a benchmark fails loudly on unexpected errors"
)]

use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Instant;

use memory_backend::hugetlb::PoolGuard;
use memory_backend::{
    accounting, Backing, HugePageSize, MemoryRegion, PopulateMethod, PopulateOptions, RegionConfig,
};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
const GIB_F: f64 = (1u64 << 30) as f64;

struct Args {
    json: PathBuf,
    size: u64,
    reps: usize,
    warmup: u64,
    long: u64,
    kinds: Option<Vec<String>>,
}

fn parse_args() -> Args {
    let out_dir = std::env::var_os("BENCH_OUT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/bench"));
    let mut args = Args {
        json: out_dir.join("memory-backend.json"),
        size: 1024 * MIB,
        reps: 5,
        warmup: 4096 * MIB,
        long: 4096 * MIB,
        kinds: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--json" => args.json = it.next().unwrap().into(),
            "--size-mib" => args.size = it.next().unwrap().parse::<u64>().unwrap() * MIB,
            "--reps" => args.reps = it.next().unwrap().parse().unwrap(),
            "--long-mib" => args.long = it.next().unwrap().parse::<u64>().unwrap() * MIB,
            "--warmup-mib" => args.warmup = it.next().unwrap().parse::<u64>().unwrap() * MIB,
            "--kinds" => args.kinds = Some(it.next().unwrap().split(',').map(String::from).collect()),
            "--bench" => {} // passed by `cargo bench`
            other => panic!("unknown argument {other:?} (use --json PATH, --size-mib N, --reps N, --warmup-mib N, --kinds a,b)"),
        }
    }
    args
}

fn gibps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / GIB_F / secs
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A backing kind the benchmark runs on, with what it needs kept alive.
struct Kind {
    name: &'static str,
    backing: Backing,
    thp: bool,
    _pool: Option<PoolGuard>,
}

fn kinds(size: u64) -> Vec<Kind> {
    let mut v = vec![
        Kind {
            name: "anon-thp",
            backing: Backing::PrivateAnonymous,
            thp: true,
            _pool: None,
        },
        Kind {
            name: "anon-4k",
            backing: Backing::PrivateAnonymous,
            thp: false,
            _pool: None,
        },
        Kind {
            name: "memfd-shmem",
            backing: Backing::SharedMemfd,
            thp: false,
            _pool: None,
        },
    ];
    let hp = HugePageSize::Size2M;
    match PoolGuard::ensure_available(hp, size / hp.bytes()) {
        Ok(pool) => v.push(Kind {
            name: "hugetlb-2M",
            backing: Backing::HugetlbMemfd(hp),
            thp: false,
            _pool: Some(pool),
        }),
        Err(e) => println!("note: hugetlb-2M rows skipped: {e}"),
    }
    v
}

fn region(kind: &Kind, size: u64) -> MemoryRegion {
    let mut cfg = RegionConfig::sized(size, 2 * MIB)
        .unwrap()
        .with_backing(kind.backing.clone());
    cfg.transparent_hugepages = kind.thp;
    MemoryRegion::new(cfg).unwrap()
}

fn opts(threads: usize, method: PopulateMethod) -> PopulateOptions {
    PopulateOptions {
        threads: NonZeroUsize::new(threads),
        method,
        min_bytes_per_thread: 1,
    }
}

/// CPU seconds used by the whole process so far (all threads).
fn process_cpu_secs() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer for one timespec.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    assert_eq!(r, 0);
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// (wall seconds, process CPU seconds) to plug `size` with `o`; unplugs (untimed)
/// afterwards. CPU seconds show whether threads contend (CPU per GiB grows) or only wait
/// for a CPU (CPU per GiB stays, wall time suffers from other load).
fn time_populate(r: &MemoryRegion, size: u64, o: &PopulateOptions) -> (f64, f64) {
    let cpu = process_cpu_secs();
    let t = Instant::now();
    let report = r.plug_with(0, size, Some(o)).unwrap().unwrap();
    let secs = t.elapsed().as_secs_f64();
    let cpu = process_cpu_secs() - cpu;
    assert!(report.threads >= 1);
    r.unplug_all().unwrap();
    (secs, cpu)
}

fn table_row(section: &str, case: &str, kind: &str, threads: usize, gib: f64, ratio: &str) {
    println!("{section:<9} {case:<34} {kind:<12} {threads:>7} {gib:>8.2} {ratio:>9}");
}

fn table_row_cpu(case: &str, kind: &str, threads: usize, gib: f64, ratio: &str, gib_per_cpu: f64) {
    println!(
        "{:<9} {case:<34} {kind:<12} {threads:>7} {gib:>8.2} {ratio:>9} {gib_per_cpu:>10.2}",
        "populate"
    );
}

fn main() {
    let args = parse_args();
    let size = args.size;
    let nproc = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
    let thp = accounting::thp_size().ok();
    println!(
        "memory-backend bench: {} MiB, {} reps (median), nproc {nproc}, THP size {thp:?}",
        size / MIB,
        args.reps
    );

    // Cold: the first populate of this run, before any warm-up.
    let anon_thp = Kind {
        name: "anon-thp",
        backing: Backing::PrivateAnonymous,
        thp: true,
        _pool: None,
    };
    let cold = {
        let r = region(&anon_thp, size);
        let t = Instant::now();
        r.plug_with(
            0,
            size,
            Some(&opts(1, PopulateMethod::MadvisePopulateWrite)),
        )
        .unwrap();
        gibps(size, t.elapsed().as_secs_f64())
    };
    // Warm up: fault `warmup` bytes of host memory in (outer hypervisor) at once, so the
    // pages the measured runs get back from the guest allocator are warm ones.
    let mut warmups = Vec::new();
    {
        let r = region(&anon_thp, args.warmup.max(size));
        for _ in 0..3 {
            let t = Instant::now();
            r.plug_with(
                0,
                r.size(),
                Some(&opts(nproc, PopulateMethod::MadvisePopulateWrite)),
            )
            .unwrap();
            warmups.push(gibps(r.size(), t.elapsed().as_secs_f64()));
            r.unplug_all().unwrap();
        }
    }

    println!(
        "\n{:<9} {:<34} {:<12} {:>7} {:>8} {:>9} {:>10}",
        "section", "case", "kind", "threads", "GiB/s", "ratio", "GiB/cpu-s"
    );
    table_row("cold", "first populate (1 thread)", "anon-thp", 1, cold, "");
    for (i, g) in warmups.iter().enumerate() {
        let case = format!(
            "warm-up pass {} ({} MiB)",
            i + 1,
            args.warmup.max(size) / MIB
        );
        table_row("warm-up", &case, "anon-thp", nproc, *g, "");
    }

    let mut populate_rows: Vec<Value> = Vec::new();
    let mut ratios = serde_json::Map::new();
    let kinds: Vec<Kind> = kinds(size)
        .into_iter()
        .filter(|k| {
            args.kinds
                .as_ref()
                .is_none_or(|only| only.iter().any(|o| o == k.name))
        })
        .collect();
    for kind in &kinds {
        let r = region(kind, size);
        // (label, case, threads, method); the single-threaded case is what QEMU does per
        // request, and the same code as parallel at 1 thread.
        let mut cases: Vec<(&str, &str, usize, PopulateMethod)> = (1..=nproc)
            .map(|t| {
                (
                    "parallel MADV_POPULATE_WRITE",
                    "parallel",
                    t,
                    PopulateMethod::MadvisePopulateWrite,
                )
            })
            .collect();
        cases.push((
            "single MADV_POPULATE_WRITE (QEMU)",
            "single",
            1,
            PopulateMethod::MadvisePopulateWrite,
        ));
        cases.push((
            "touch every page (naive)",
            "touch",
            1,
            PopulateMethod::Touch,
        ));
        // Interleave the cases rep by rep, so drift (other load, page allocator state)
        // spreads over all of them instead of biasing the one measured first.
        let mut samples: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
        let mut cpu_samples: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
        for _ in 0..args.reps {
            for (i, &(_, _, t, method)) in cases.iter().enumerate() {
                let (wall, cpu) = time_populate(&r, size, &opts(t, method));
                samples[i].push(wall);
                cpu_samples[i].push(cpu);
            }
        }
        let secs: Vec<f64> = samples.iter().map(|v| median(&mut v.clone())).collect();
        let cpu_secs: Vec<f64> = cpu_samples.iter().map(|v| median(&mut v.clone())).collect();
        let single_idx = nproc;
        let single_gib = gibps(size, secs[single_idx]);
        for (i, &(label, case, t, method)) in cases.iter().enumerate() {
            let g = gibps(size, secs[i]);
            let per_cpu = gibps(size, cpu_secs[i]);
            table_row_cpu(
                label,
                kind.name,
                t,
                g,
                &format!("{:.2}x", g / single_gib),
                per_cpu,
            );
            let method = if method == PopulateMethod::Touch {
                "touch"
            } else {
                "MADV_POPULATE_WRITE"
            };
            populate_rows.push(
                json!({"kind": kind.name, "case": case, "method": method, "threads": t,
                "gib_per_s": g, "median_s": secs[i], "samples_s": samples[i],
                "gib_per_cpu_s": per_cpu, "cpu_s_samples": cpu_samples[i]}),
            );
        }
        let full_parallel = gibps(size, secs[nproc - 1]);
        let touch_gib = gibps(size, secs[nproc + 1]);
        ratios.insert(
            format!("{}_parallel{nproc}_vs_single", kind.name),
            json!(full_parallel / single_gib),
        );
        ratios.insert(
            format!("{}_parallel{nproc}_gib_per_s", kind.name),
            json!(full_parallel),
        );
        ratios.insert(format!("{}_single_gib_per_s", kind.name), json!(single_gib));
        ratios.insert(
            format!("{}_single_vs_touch", kind.name),
            json!(single_gib / touch_gib),
        );
    }

    // The same comparison over a longer populate: a 1 GiB populate takes ~0.1 s, so a
    // worker thread that waits a few milliseconds for a busy core weighs a lot there.
    let mut long_rows: Vec<Value> = Vec::new();
    if args.long > 0 && nproc > 1 {
        let r = region(&anon_thp, args.long);
        let cases = [1, nproc];
        let mut samples: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
        for _ in 0..args.reps.min(3) {
            for (i, &t) in cases.iter().enumerate() {
                samples[i].push(
                    time_populate(
                        &r,
                        args.long,
                        &opts(t, PopulateMethod::MadvisePopulateWrite),
                    )
                    .0,
                );
            }
        }
        let g: Vec<f64> = samples
            .iter()
            .map(|v| gibps(args.long, median(&mut v.clone())))
            .collect();
        for (i, &t) in cases.iter().enumerate() {
            let case = format!("{} MiB MADV_POPULATE_WRITE", args.long / MIB);
            table_row(
                "long",
                &case,
                "anon-thp",
                t,
                g[i],
                &format!("{:.2}x", g[i] / g[0]),
            );
            long_rows.push(
                json!({"kind": "anon-thp", "bytes": args.long, "threads": t, "gib_per_s": g[i],
                "samples_s": samples[i]}),
            );
        }
        ratios.insert(
            format!("anon-thp_long_parallel{nproc}_vs_single"),
            json!(g[1] / g[0]),
        );
    }

    let mut unplug_rows: Vec<Value> = Vec::new();
    for kind in &kinds {
        let r = region(kind, size);
        let bk = r.backing_kind();
        for &method in bk.discard_methods() {
            let mut samples = Vec::new();
            let mut left = 0;
            for _ in 0..args.reps {
                r.plug_with(
                    0,
                    size,
                    Some(&opts(nproc, PopulateMethod::MadvisePopulateWrite)),
                )
                .unwrap();
                let t = Instant::now();
                r.unplug_with(0, size, method).unwrap();
                samples.push(t.elapsed().as_secs_f64());
                left = left.max(r.usage().unwrap().committed());
            }
            let secs = median(&mut samples.clone());
            let g = gibps(size, secs);
            let default = if method == bk.default_discard() {
                " (default)"
            } else {
                ""
            };
            table_row(
                "unplug",
                &format!("{}{default}", method.name()),
                kind.name,
                1,
                g,
                "",
            );
            unplug_rows.push(json!({"kind": kind.name, "method": method.name(), "default": !default.is_empty(),
                "gib_per_s": g, "median_s": secs, "samples_s": samples, "committed_after_bytes": left}));
            assert!(
                left <= MIB,
                "{} {}: {left} bytes still committed after unplug",
                kind.name,
                method.name()
            );
        }
    }

    // memset over an already-populated buffer: the bandwidth limit of zeroing pages.
    let mut memset_rows: Vec<Value> = Vec::new();
    {
        let r = region(&anon_thp, size);
        r.plug_with(
            0,
            size,
            Some(&opts(nproc, PopulateMethod::MadvisePopulateWrite)),
        )
        .unwrap();
        let base = r.host_addr() as usize;
        for t in [1, nproc] {
            let mut samples = Vec::new();
            for _ in 0..args.reps {
                let per = usize::try_from(size).unwrap() / t;
                // Helpers are started first and parked on a barrier, so the timed part
                // measures writing, not how long a new thread waits for a busy core.
                let barrier = std::sync::Barrier::new(t);
                let memset = move |i: usize| {
                    let p = (base + i * per) as *mut u8;
                    // SAFETY: [p, p+per) is inside the plugged (RW, populated) range of
                    // `r`, which outlives the scope; the threads write disjoint slices
                    // and nothing else accesses the region.
                    unsafe { std::ptr::write_bytes(p, 0x5a, per) };
                };
                let mut start = Instant::now();
                std::thread::scope(|s| {
                    for i in 1..t {
                        let barrier = &barrier;
                        s.spawn(move || {
                            barrier.wait();
                            memset(i);
                        });
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    start = Instant::now();
                    barrier.wait();
                    memset(0);
                });
                samples.push(start.elapsed().as_secs_f64());
            }
            let secs = median(&mut samples.clone());
            let g = gibps(size, secs);
            table_row(
                "memset",
                "memset populated buffer (limit)",
                "anon-thp",
                t,
                g,
                "",
            );
            memset_rows.push(
                json!({"threads": t, "gib_per_s": g, "median_s": secs, "samples_s": samples}),
            );
            if t == nproc {
                ratios.insert(format!("memset{nproc}_gib_per_s"), json!(g));
            }
            if t == 1 {
                ratios.insert("memset1_gib_per_s".into(), json!(g));
            }
            if t == nproc && nproc == 1 {
                break;
            }
        }
    }

    let parallel = ratios
        .get(&format!("anon-thp_parallel{nproc}_gib_per_s"))
        .and_then(Value::as_f64);
    let memset = ratios
        .get(&format!("memset{nproc}_gib_per_s"))
        .and_then(Value::as_f64);
    if let (Some(p), Some(m)) = (parallel, memset) {
        ratios.insert(
            format!("anon-thp_parallel{nproc}_vs_memset{nproc}"),
            json!(p / m),
        );
    }
    println!("\nratios:");
    for (k, v) in &ratios {
        println!("  {k:<40} {:.2}", v.as_f64().unwrap_or(0.0));
    }
    let key = format!("anon-thp_parallel{nproc}_vs_single");
    if let Some(r) = ratios.get(&key).and_then(Value::as_f64) {
        let verdict = if r >= 1.6 { "meets" } else { "BELOW" };
        println!("parallel populate at {nproc} threads vs single-threaded: {r:.2}x ({verdict} the 1.6x goal)");
    }

    let doc = json!({
        "bench": "memory-backend",
        "size_bytes": size,
        "reps": args.reps,
        "nproc": nproc,
        "thp_size": thp,
        "cold": {"case": "first populate of the run, anon-thp, 1 thread", "gib_per_s": cold},
        "warmup": {"bytes": args.warmup.max(size), "threads": nproc, "gib_per_s": warmups},
        "populate": populate_rows,
        "unplug": unplug_rows,
        "memset": memset_rows,
        "populate_long": long_rows,
        "ratios": ratios,
    });
    if let Some(dir) = args.json.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(&args.json, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
    println!("figures written to {}", args.json.display());
}
