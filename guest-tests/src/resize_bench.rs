//! `ci/resize-bench`: plug and unplug speed and the VMM's own footprint, QEMU and ours side
//! by side in one run, as medians of several pairs.
//!
//! Each pair boots both VMMs twice with the same guest, alternating which goes first so
//! that a drift of the test host over the run does not favour either:
//!
//! - a **resize boot**: the VMM's RSS and threads with the guest booted and nothing
//!   plugged; plug `size` (guest latency from the driver's `requested size` line to MemTotal
//!   at target, and host wall from the call); write and free `data_mib` in the guest;
//!   unplug it all; the RSS left above the nothing-plugged figure;
//! - a **populate boot** (ours `--populate`, QEMU `virtio-mem-pci,prealloc=on`): plug
//!   `populate` bytes, the same latencies, and how much of it the host holds resident at
//!   the moment MemTotal reaches the target.
//!
//! A tool, not a test: timings never fail it; a guest that does not boot or reach its
//! size does.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use crate::guest::{Guest, ScenarioError};
use crate::vmm::{VmSpec, Vmm};

const MIB: u64 = 1 << 20;

/// Mappings at least this large are guest RAM (boot RAM, the virtio-mem region); the rest
/// of a VMM's RSS is its own (binary, heap, stacks, device buffers).
pub const GUEST_RAM_MAPPING: u64 = 256 * MIB;

/// What one resize boot measured.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct ResizeFigures {
    /// Guest seconds of the plug (driver's `requested size` line to MemTotal at target).
    pub plug_s: Option<f64>,
    /// Host seconds from the call to the agent reporting MemTotal at target.
    pub plug_wall_s: f64,
    /// Guest seconds of the unplug after the data was written and freed.
    pub unplug_s: Option<f64>,
    /// Host seconds of the unplug.
    pub unplug_wall_s: f64,
    /// VMM RSS (KiB) with the guest booted and nothing plugged.
    pub rss_idle_kib: u64,
    /// Of which in guest RAM mappings.
    pub rss_idle_guest_ram_kib: u64,
    /// VMM threads with the guest booted.
    pub threads: u64,
    /// VMM RSS (KiB) after the full unplug, minus `rss_idle_kib`.
    pub rss_left_after_unplug_kib: i64,
}

/// What one populate boot measured.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct PopulateFigures {
    /// Guest seconds of the plug.
    pub plug_s: Option<f64>,
    /// Host seconds from the call to MemTotal at target.
    pub plug_wall_s: f64,
    /// The VMM's RSS growth (KiB) over the plug, read as soon as MemTotal was at target.
    pub resident_growth_kib: u64,
}

/// The figures of one VMM in one pair.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Run {
    /// `qemu`, `ours`, or the name of a compared build of ours.
    pub vmm: String,
    /// Pair number, from 0.
    pub pair: usize,
    /// The resize boot.
    pub resize: ResizeFigures,
    /// The populate boot (not run for compared builds).
    pub populate: Option<PopulateFigures>,
    /// VMM RSS (KiB), nothing plugged, of a boot with a virtio-balloon doing free page
    /// reporting, [`FPR_SETTLE`] after the agent came up (not run for compared builds).
    pub rss_idle_fpr_kib: Option<u64>,
}

/// A VMM in the bench, and whether it runs the populate and free page reporting boots
/// too (compared builds of ours and Firecracker, which has no populate option, run only
/// the resize boot).
#[derive(Clone, Copy)]
pub struct Entry<'a> {
    /// The VMM.
    pub vmm: &'a dyn Vmm,
    /// Its column name.
    pub name: &'a str,
    /// Whether it runs every boot.
    pub full: bool,
}

/// How long a booted guest with free page reporting is left before its RSS is read: the
/// driver reports after 2 s and in rounds; 20 s is several times what the free page
/// reporting scenario measures for 1 GiB.
pub const FPR_SETTLE: Duration = Duration::from_secs(20);

/// RSS (KiB) of a `/proc/PID/smaps` text: all of it, and the part in mappings of at least
/// [`GUEST_RAM_MAPPING`] bytes.
pub fn rss_split_kib(smaps: &str) -> (u64, u64) {
    let (mut total, mut guest) = (0, 0);
    let mut size = 0;
    for l in smaps.lines() {
        let first = l.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                size = b.saturating_sub(a);
                continue;
            }
        }
        if let Some(v) = l.strip_prefix("Rss:") {
            let kib: u64 = v
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            total += kib;
            if size >= GUEST_RAM_MAPPING {
                guest += kib;
            }
        }
    }
    (total, guest)
}

fn rss_kib(pid: u32) -> Result<(u64, u64), ScenarioError> {
    let path = format!("/proc/{pid}/smaps");
    std::fs::read_to_string(&path)
        .map(|t| rss_split_kib(&t))
        .map_err(|e| ScenarioError::Check(format!("{path}: {e}")))
}

fn threads(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

const RESIZE_TIMEOUT: Duration = Duration::from_secs(120);

fn resize_boot(
    vmm: &dyn Vmm,
    spec: &VmSpec,
    log: &Path,
    size: u64,
    data_mib: u64,
    echo: bool,
) -> Result<ResizeFigures, ScenarioError> {
    let mut g = Guest::boot(vmm, spec, log, echo)?;
    let pid = g.vmm.pid();
    let (idle, idle_guest) = rss_kib(pid)?;
    let mut f = ResizeFigures {
        rss_idle_kib: idle,
        rss_idle_guest_ram_kib: idle_guest,
        threads: threads(pid),
        ..ResizeFigures::default()
    };
    let plug = g.resize_wait(size, g.memtotal_with(size), RESIZE_TIMEOUT)?;
    if !plug.reached {
        return Err(ScenarioError::Check(format!(
            "plug of {} MiB did not reach MemTotal (at {} kB)",
            size / MIB,
            plug.memtotal_kb
        )));
    }
    f.plug_s = plug.guest_latency_s;
    f.plug_wall_s = plug.host_wall_s;
    if data_mib > 0 {
        g.fill(data_mib, false)?;
        g.free()?;
    }
    let unplug = g.resize_wait(0, g.memtotal_with(0), RESIZE_TIMEOUT)?;
    if !unplug.reached {
        return Err(ScenarioError::Check(format!(
            "unplug did not reach MemTotal (at {} kB)",
            unplug.memtotal_kb
        )));
    }
    f.unplug_s = unplug.guest_latency_s;
    f.unplug_wall_s = unplug.host_wall_s;
    // Let the VMM finish what follows an unplug (slot release after its quiet period).
    std::thread::sleep(Duration::from_secs(3));
    let (after, _) = rss_kib(pid)?;
    f.rss_left_after_unplug_kib =
        i64::try_from(after).unwrap_or(i64::MAX) - i64::try_from(idle).unwrap_or(i64::MAX);
    g.shutdown();
    Ok(f)
}

fn populate_boot(
    vmm: &dyn Vmm,
    spec: &VmSpec,
    log: &Path,
    size: u64,
    echo: bool,
) -> Result<PopulateFigures, ScenarioError> {
    let mut spec = spec.clone();
    spec.populate = true;
    let mut g = Guest::boot(vmm, &spec, log, echo)?;
    let pid = g.vmm.pid();
    let (before, _) = rss_kib(pid)?;
    let plug = g.resize_wait(size, g.memtotal_with(size), RESIZE_TIMEOUT)?;
    let (after, _) = rss_kib(pid)?;
    if !plug.reached {
        return Err(ScenarioError::Check(format!(
            "populated plug of {} MiB did not reach MemTotal (at {} kB)",
            size / MIB,
            plug.memtotal_kb
        )));
    }
    g.shutdown();
    Ok(PopulateFigures {
        plug_s: plug.guest_latency_s,
        plug_wall_s: plug.host_wall_s,
        resident_growth_kib: after.saturating_sub(before),
    })
}

fn fpr_boot(vmm: &dyn Vmm, spec: &VmSpec, log: &Path, echo: bool) -> Result<u64, ScenarioError> {
    let mut spec = spec.clone();
    spec.balloon = true;
    let g = Guest::boot(vmm, &spec, log, echo)?;
    std::thread::sleep(FPR_SETTLE);
    let (rss, _) = rss_kib(g.vmm.pid())?;
    g.shutdown();
    Ok(rss)
}

/// The median of the values present, `None` when none is.
pub fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// The VMMs of `runs`, in the order they first appear.
fn columns(runs: &[Run]) -> Vec<&str> {
    let mut cols: Vec<&str> = Vec::new();
    for r in runs {
        if !cols.contains(&r.vmm.as_str()) {
            cols.push(&r.vmm);
        }
    }
    cols
}

/// One row of the summary: a figure's median per VMM.
fn row(out: &mut String, name: &str, runs: &[Run], f: impl Fn(&Run) -> Option<f64>, unit: &str) {
    let _ = write!(out, "| {name} |");
    for vmm in columns(runs) {
        let m = median(
            runs.iter()
                .filter(|r| r.vmm == vmm)
                .filter_map(&f)
                .collect(),
        );
        let _ = write!(
            out,
            " {} |",
            m.map_or_else(|| "-".to_string(), |m| format!("{m:.3}"))
        );
    }
    let _ = writeln!(out, " {unit} |");
}

/// The medians as a markdown table, a column per VMM.
pub fn summary(runs: &[Run], size: u64, populate: u64) -> String {
    let pairs = runs.iter().map(|r| r.pair + 1).max().unwrap_or(0);
    let cols = columns(runs);
    let mut out = format!("| median of {pairs} |");
    for c in &cols {
        let _ = write!(out, " {c} |");
    }
    out.push_str(" unit |\n|---|");
    for _ in &cols {
        out.push_str("---|");
    }
    out.push_str("---|\n");
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let kib_mib = |k: u64| Some(k as f64 / 1024.0);
    row(
        &mut out,
        &format!("plug 0 -> {:.0} GiB, guest", gib(size)),
        runs,
        |r| r.resize.plug_s,
        "s",
    );
    row(
        &mut out,
        "plug, host wall (call -> MemTotal seen)",
        runs,
        |r| Some(r.resize.plug_wall_s),
        "s",
    );
    row(
        &mut out,
        "unplug after data, guest",
        runs,
        |r| r.resize.unplug_s,
        "s",
    );
    row(
        &mut out,
        "unplug, host wall",
        runs,
        |r| Some(r.resize.unplug_wall_s),
        "s",
    );
    row(
        &mut out,
        &format!("populate plug 0 -> {:.0} GiB, guest", gib(populate)),
        runs,
        |r| r.populate.as_ref().and_then(|p| p.plug_s),
        "s",
    );
    row(
        &mut out,
        "populate plug, host wall",
        runs,
        |r| r.populate.as_ref().map(|p| p.plug_wall_s),
        "s",
    );
    row(
        &mut out,
        "populate: host resident growth at MemTotal",
        runs,
        |r| {
            r.populate
                .as_ref()
                .and_then(|p| kib_mib(p.resident_growth_kib))
        },
        "MiB",
    );
    row(
        &mut out,
        "VMM RSS, guest booted, nothing plugged",
        runs,
        |r| kib_mib(r.resize.rss_idle_kib),
        "MiB",
    );
    row(
        &mut out,
        "VMM RSS, nothing plugged, free page reporting settled",
        runs,
        |r| r.rss_idle_fpr_kib.and_then(kib_mib),
        "MiB",
    );
    row(
        &mut out,
        "  of which guest RAM",
        runs,
        |r| kib_mib(r.resize.rss_idle_guest_ram_kib),
        "MiB",
    );
    row(
        &mut out,
        "  of which the VMM's own",
        runs,
        |r| {
            kib_mib(
                r.resize
                    .rss_idle_kib
                    .saturating_sub(r.resize.rss_idle_guest_ram_kib),
            )
        },
        "MiB",
    );
    row(
        &mut out,
        "threads",
        runs,
        |r| Some(r.resize.threads as f64),
        "",
    );
    row(
        &mut out,
        "RSS left after the full unplug",
        runs,
        |r| Some(r.resize.rss_left_after_unplug_kib as f64 / 1024.0),
        "MiB",
    );
    out
}

/// What the bench is asked to do.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Pairs to run.
    pub pairs: usize,
    /// Plug size of the resize boots.
    pub size: u64,
    /// Data written and freed before the unplug (MiB).
    pub data_mib: u64,
    /// Plug size of the populate boots.
    pub populate: u64,
    /// Whether to run the free page reporting boots.
    pub fpr: bool,
}

/// Runs `plan` against `entries` on `base`, prints a `RESIZE-BENCH` line per VMM and pair
/// and the median table, and writes every figure to `json`. Returns whether every boot
/// worked.
pub fn run_all(
    entries: &[Entry<'_>],
    base: &VmSpec,
    logs: &Path,
    json: &Path,
    plan: &Plan,
    echo: bool,
) -> bool {
    let mut runs = Vec::new();
    let mut ok = true;
    let fmt = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.3}"));
    for pair in 0..plan.pairs {
        // Each pair starts with the next VMM: no VMM always boots first.
        let n = entries.len().max(1);
        for k in 0..entries.len() {
            let e = entries[(pair + k) % n];
            let mut spec = base.clone();
            let boot = |spec: &mut VmSpec, what: &str| {
                spec.name = format!("{}-bench{pair}{what}", base.name);
                logs.join(format!("{}-{}.log", e.name, spec.name))
            };
            let log = boot(&mut spec, "");
            let resize = match resize_boot(e.vmm, &spec, &log, plan.size, plan.data_mib, echo) {
                Ok(f) => f,
                Err(err) => {
                    println!("RESIZE-BENCH {} pair={pair} resize FAILED: {err}", e.name);
                    ok = false;
                    continue;
                }
            };
            let mut r = Run {
                vmm: e.name.to_string(),
                pair,
                resize,
                populate: None,
                rss_idle_fpr_kib: None,
            };
            if e.full {
                let log = boot(&mut spec, "-populate");
                match populate_boot(e.vmm, &spec, &log, plan.populate, echo) {
                    Ok(f) => r.populate = Some(f),
                    Err(err) => {
                        println!("RESIZE-BENCH {} pair={pair} populate FAILED: {err}", e.name);
                        ok = false;
                    }
                }
            }
            if e.full && plan.fpr {
                let log = boot(&mut spec, "-fpr");
                match fpr_boot(e.vmm, &spec, &log, echo) {
                    Ok(kib) => r.rss_idle_fpr_kib = Some(kib),
                    Err(err) => {
                        println!("RESIZE-BENCH {} pair={pair} fpr FAILED: {err}", e.name);
                        ok = false;
                    }
                }
            }
            println!(
                "RESIZE-BENCH {} pair={pair} plug_s={} unplug_s={} populate_s={} \
                 populate_resident_mib={} rss_idle_mib={} rss_idle_fpr_mib={} threads={} \
                 rss_left_mib={}",
                r.vmm,
                fmt(r.resize.plug_s),
                fmt(r.resize.unplug_s),
                fmt(r.populate.as_ref().and_then(|p| p.plug_s)),
                r.populate
                    .as_ref()
                    .map_or("-".into(), |p| (p.resident_growth_kib / 1024).to_string()),
                r.resize.rss_idle_kib / 1024,
                r.rss_idle_fpr_kib
                    .map_or("-".into(), |k| (k / 1024).to_string()),
                r.resize.threads,
                r.resize.rss_left_after_unplug_kib / 1024
            );
            runs.push(r);
        }
    }
    print!("{}", summary(&runs, plan.size, plan.populate));
    let doc = serde_json::json!({
        "size_bytes": plan.size,
        "data_mib": plan.data_mib,
        "populate_bytes": plan.populate,
        "boot_mem_bytes": base.boot_mem,
        "block_size_bytes": base.block_size,
        "cpus": base.cpus,
        "host_thp": crate::runner::host_thp(),
        "runs": runs,
    });
    match serde_json::to_string_pretty(&doc) {
        Ok(text) => {
            if let Err(e) = std::fs::write(json, text) {
                println!("resize-bench: cannot write {}: {e}", json.display());
                ok = false;
            } else {
                println!("resize-bench: json={}", json.display());
            }
        }
        Err(e) => {
            println!("resize-bench: cannot encode the figures: {e}");
            ok = false;
        }
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_is_split_by_mapping_size() {
        let smaps = "\
7f0000000000-7f0020000000 rw-p 00000000 00:00 0
Size:             524288 kB
Rss:              100000 kB
VmFlags: rd wr mr mw me ac hg
55d000000000-55d000100000 r-xp 00000000 08:01 1234 /usr/bin/vmm
Size:               1024 kB
Rss:                 900 kB
VmFlags: rd ex
";
        assert_eq!(rss_split_kib(smaps), (100_900, 100_000));
        assert_eq!(rss_split_kib(""), (0, 0));
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(vec![f64::NAN]), None);
        assert_eq!(median(Vec::new()), None);
    }

    #[test]
    fn the_summary_has_a_median_per_vmm() {
        let run = |vmm: &str, pair, plug| Run {
            vmm: vmm.into(),
            pair,
            resize: ResizeFigures {
                plug_s: Some(plug),
                rss_idle_kib: 2048,
                ..ResizeFigures::default()
            },
            populate: None,
            rss_idle_fpr_kib: None,
        };
        let runs = [
            run("qemu", 0, 0.2),
            run("ours", 0, 0.1),
            run("qemu", 1, 0.4),
            run("ours", 1, 0.3),
        ];
        let s = summary(&runs, 1 << 30, 2 << 30);
        assert!(
            s.starts_with("| median of 2 | qemu | ours | unit |\n|---|---|---|---|\n"),
            "{s}"
        );
        assert!(
            s.contains("| plug 0 -> 1 GiB, guest | 0.300 | 0.200 | s |"),
            "{s}"
        );
        assert!(
            s.contains("| VMM RSS, guest booted, nothing plugged | 2.000 | 2.000 | MiB |"),
            "{s}"
        );
    }
}
