//! Runs selected scenarios: one guest boot per run of consecutive scenarios that share a
//! boot configuration (a failed scenario costs a fresh boot for the next one), results
//! as a summary table and JSON.

use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::agent::{bad_lines, Report};
use crate::console::ConsoleError;
use crate::guest::{Guest, ScenarioError, QUICK};
use crate::scenarios::{Boot, Kernel, Metrics, Scenario, HOTPLUG_SIZE};
use crate::soak::FailureClass;
use crate::vmm::{VmSpec, Vmm};

/// Where things are.
#[derive(Debug, Clone)]
pub struct Paths {
    /// `target/guest/images`.
    pub images: PathBuf,
    /// Console logs of this run.
    pub logs: PathBuf,
    /// Sockets (must be a local filesystem, not 9p).
    pub work: PathBuf,
}

/// Options of one run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Print every console line as it comes.
    pub echo: bool,
    /// Guest vCPUs.
    pub cpus: u32,
    /// KVM paravirtual features hidden from the guest.
    pub kvm_pv_off: Vec<String>,
}

/// One scenario's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioResult {
    /// Scenario name.
    pub scenario: String,
    /// Guest kernel label.
    pub kernel: String,
    /// Guest `uname -r`.
    pub kernel_release: String,
    /// VMM under test.
    pub vmm: String,
    /// Boot configuration label.
    pub boot: String,
    /// Passed?
    pub passed: bool,
    /// Failure message (empty when passed).
    pub message: String,
    /// Wall time of the scenario itself (seconds, boot excluded).
    pub wall_s: f64,
    /// Wall time of the guest boot this scenario started (0 when it reused one).
    pub boot_wall_s: f64,
    /// Figures it recorded.
    pub metrics: Metrics,
    /// Console log of its guest.
    pub console_log: String,
}

/// The guest kernel command line for a boot configuration.
pub fn cmdline(boot: Boot) -> String {
    let mut c = String::from("console=ttyS0 quiet loglevel=1 panic=-1");
    let extra = boot.cmdline();
    if !extra.is_empty() {
        c.push(' ');
        c.push_str(extra);
    }
    // For diagnosis runs (ci/testhost-soak --cmdline-extra), e.g. a louder console.
    if let Ok(more) = std::env::var("GUEST_TESTS_CMDLINE_EXTRA") {
        if !more.trim().is_empty() {
            c.push(' ');
            c.push_str(more.trim());
        }
    }
    c
}

/// The guest to boot for `kernel` and `boot`; `seq` makes its name unique in a run.
pub fn spec_for(
    kernel: Kernel,
    boot: Boot,
    paths: &Paths,
    opts: &RunOptions,
    seq: usize,
) -> VmSpec {
    let img = paths.images.join(kernel.image());
    let mut spec = VmSpec {
        name: format!("{}-{}-{seq}", kernel.label(), boot.label()),
        kernel: img.join("vmlinuz"),
        initrd: img.join("initrd.img"),
        cmdline: cmdline(boot),
        boot_mem: boot.boot_mem(),
        hotplug_size: HOTPLUG_SIZE,
        block_size: boot.block_size(),
        cpus: opts.cpus,
        balloon: boot.balloon(),
        autosize: boot.autosize().map(str::to_string),
        kvm_pv_off: opts.kvm_pv_off.clone(),
        trace: false,
        populate: false,
        work_dir: paths.work.clone(),
        log_dir: paths.logs.clone(),
    };
    if boot.elf_kernel() {
        spec.kernel = spec.vmlinux();
    }
    spec
}

/// After a scenario: any bad kernel line since it started (its `guest-agent: start`
/// mark in the kernel log; the driver's probe when the guest rebooted) fails it.
fn post_check(g: &mut Guest, name: &str, allow_oom: bool) -> Result<(), ScenarioError> {
    let r = Report::from_lines(&g.agent("dmesg", QUICK)?);
    let mark = format!("guest-agent: start {name}");
    let since = r
        .dmesg
        .iter()
        .rev()
        .find(|d| d.text == mark)
        .or_else(|| r.dmesg.iter().find(|d| d.text.contains("virtio_mem")))
        .and_then(|d| d.time)
        .unwrap_or(0.0);
    let bad = bad_lines(&r.dmesg, since, allow_oom);
    if bad.is_empty() {
        Ok(())
    } else {
        Err(ScenarioError::Check(format!(
            "bad kernel log lines: {:?}",
            bad.iter().map(|d| &d.text).collect::<Vec<_>>()
        )))
    }
}

/// Runs `selected` (kernel, scenario) pairs in order and prints one line per result.
pub fn run(
    vmm: &dyn Vmm,
    selected: &[(Kernel, &'static Scenario)],
    paths: &Paths,
    opts: &RunOptions,
) -> Vec<ScenarioResult> {
    let mut results = Vec::new();
    let mut guest: Option<(Kernel, Boot, Guest)> = None;
    let mut seq = 0;
    // (kernel, scenario, retry): a scenario whose guest reset under it runs once more.
    let mut queue: std::collections::VecDeque<(Kernel, &'static Scenario, bool)> =
        selected.iter().map(|&(k, s)| (k, s, false)).collect();
    while let Some((kernel, sc, retry)) = queue.pop_front() {
        // Reuse the running guest only for the same kernel and boot configuration.
        if let Some((k, b, _)) = &guest {
            if *k != kernel || *b != sc.boot {
                if let Some((_, _, g)) = guest.take() {
                    g.shutdown();
                }
            }
        }
        let mut boot_wall_s = 0.0;
        if guest.is_none() {
            seq += 1;
            let spec = spec_for(kernel, sc.boot, paths, opts, seq);
            let log = paths.logs.join(format!(
                "{}-{}-{}-{seq}.log",
                vmm.name(),
                kernel.label(),
                sc.boot.label()
            ));
            println!(
                "guest-tests: booting {} guest ({}; {})",
                kernel.label(),
                sc.boot.label(),
                spec.cmdline
            );
            let t = Instant::now();
            match Guest::boot(vmm, &spec, &log, opts.echo) {
                Ok(g) => {
                    boot_wall_s = t.elapsed().as_secs_f64();
                    println!(
                        "guest-tests:   up: {} in {:.1} s wall ({:.1} s guest uptime), MemTotal {} kB",
                        g.kernel_release, boot_wall_s, g.ready_uptime, g.boot_memtotal_kb
                    );
                    guest = Some((kernel, sc.boot, g));
                }
                Err(e) => {
                    let r = ScenarioResult {
                        scenario: sc.name.into(),
                        kernel: kernel.label().into(),
                        kernel_release: String::new(),
                        vmm: vmm.name().into(),
                        boot: sc.boot.label().into(),
                        passed: false,
                        message: format!(
                            "[{}] guest boot failed: {e}",
                            FailureClass::of(&e, true, false).label()
                        ),
                        wall_s: t.elapsed().as_secs_f64(),
                        boot_wall_s: 0.0,
                        metrics: Metrics::new(),
                        console_log: log.display().to_string(),
                    };
                    print_result(&r);
                    results.push(r);
                    continue;
                }
            }
        }
        let Some((_, _, g)) = guest.as_mut() else {
            continue;
        };
        let mut metrics = Metrics::new();
        if retry {
            metrics.insert("retried_after_guest_reset".into(), 1.0);
        }
        let t = Instant::now();
        let outcome = g
            .agent(&format!("mark start {}", sc.name), QUICK)
            .and_then(|_| (sc.run)(g, kernel, &mut metrics))
            .and_then(|()| post_check(g, sc.name, sc.name.starts_with("pressure")));
        let wall_s = t.elapsed().as_secs_f64();
        if let Err(ScenarioError::Console(e @ ConsoleError::UnexpectedReboot { .. })) = &outcome {
            // Under QEMU, the reference, a reset of the guest is the nested test host's
            // (seen under QEMU in CI): it gets one more try on a fresh guest, said here and
            // in the figures. Under our VMM it is ours until proven otherwise: it fails.
            if vmm.name() == "qemu" && !retry && g.vmm.exited().is_none() {
                println!(
                    "RETRY {} {}: {e}; QEMU (the reference) reset its guest: running it once more on a fresh guest",
                    sc.name,
                    kernel.label()
                );
                if let Some((_, _, g)) = guest.take() {
                    g.shutdown();
                }
                queue.push_front((kernel, sc, true));
                continue;
            }
        }
        let (passed, message) = match outcome {
            Ok(()) => (true, String::new()),
            Err(e) => {
                let exited = g.vmm.exited();
                let class = FailureClass::of(&e, false, exited.is_some());
                let mut msg = format!("[{}] {e}", class.label());
                if let Some(why) = exited {
                    msg.push_str(&format!(" [{why}]"));
                } else if class.wants_dump() {
                    msg.push_str(&format!(" [state dump: {}]", g.save_dump()));
                }
                (false, msg)
            }
        };
        let r = ScenarioResult {
            scenario: sc.name.into(),
            kernel: kernel.label().into(),
            kernel_release: g.kernel_release.clone(),
            vmm: vmm.name().into(),
            boot: sc.boot.label().into(),
            passed,
            message,
            wall_s,
            boot_wall_s,
            metrics,
            console_log: g.console.log_path().to_string(),
        };
        print_result(&r);
        if passed {
            record_passed(&run_key(&r.scenario, &r.kernel));
        }
        results.push(r);
        if !passed {
            // Unknown state: the next scenario gets a fresh guest.
            if let Some((_, _, g)) = guest.take() {
                g.shutdown();
            }
        }
    }
    if let Some((_, _, g)) = guest.take() {
        g.shutdown();
    }
    results
}

/// The environment variable naming the file of scenario runs (`NAME@KERNEL` per line) that
/// already passed in an earlier test host of the same run.
pub const PASSED_FILE_ENV: &str = "GUEST_TESTS_PASSED_FILE";

/// The scenario runs listed in the file named by [`PASSED_FILE_ENV`] (none without it).
pub fn already_passed() -> Vec<String> {
    std::env::var_os(PASSED_FILE_ENV)
        .and_then(|p| std::fs::read_to_string(p).ok())
        .map(|t| t.lines().map(str::to_string).collect())
        .unwrap_or_default()
}

/// Appends a passed scenario run to the file named by [`PASSED_FILE_ENV`], if any.
pub fn record_passed(key: &str) {
    use std::io::Write;
    let Some(p) = std::env::var_os(PASSED_FILE_ENV) else {
        return;
    };
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&p);
    if let Ok(mut f) = f {
        let _ = writeln!(f, "{key}");
    }
}

fn print_result(r: &ScenarioResult) {
    let figures: Vec<String> = r
        .metrics
        .iter()
        .map(|(k, v)| format!("{k}={v:.2}"))
        .collect();
    if r.passed {
        println!(
            "PASS {:<15} {:<5} {:>6.1} s  {}",
            r.scenario,
            r.kernel,
            r.wall_s,
            figures.join(" ")
        );
    } else {
        println!(
            "FAIL {:<15} {:<5} {:>6.1} s  {}\n     console log: {}",
            r.scenario, r.kernel, r.wall_s, r.message, r.console_log
        );
    }
}

/// `NAME@KERNEL`: one scenario run, as `--skip` and the passed-runs file take it.
pub fn run_key(name: &str, kernel: &str) -> String {
    format!("{name}@{kernel}")
}

/// The Debian package versions this run used: the images' (`images/versions.txt` of
/// `ci/guest-image`) and the machine's (`target/setup-versions.txt` of `ci/setup`), each
/// as "pinned NAME=V used NAME=W" or "NAME=W (pinned V)".
pub fn package_versions(guest_dir: &Path) -> Vec<String> {
    let mut v = Vec::new();
    let setup = guest_dir.join("../setup-versions.txt");
    for f in [guest_dir.join("images/versions.txt"), setup] {
        if let Ok(t) = std::fs::read_to_string(&f) {
            v.extend(
                t.lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(str::to_string),
            );
        }
    }
    v
}

/// The host's transparent huge page mode as sysfs shows it (`always [madvise] never`), or
/// `unknown`.
pub fn host_thp() -> String {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .map(|t| t.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// Prints the summary table.
pub fn print_summary(results: &[ScenarioResult], total_s: f64, where_ran: &str) {
    println!();
    let thp = host_thp();
    let backing = match results.first().map(|r| r.vmm.as_str()) {
        Some("qemu") => "QEMU memory-backend-ram: private anonymous, THP-advised",
        _ => "the VMM's default backing",
    };
    println!("guest-tests summary ({where_ran}; guest RAM: {backing}; host THP: {thp})");
    println!(
        "{:<15} {:<5} {:<6} {:>7} {:>7} {:>9} {:>9}  notes",
        "scenario", "kern", "result", "wall s", "boot s", "plug lat", "unpl lat"
    );
    for r in results {
        let lat = |k: &str| {
            r.metrics
                .get(k)
                .map(|v| format!("{v:.2}"))
                .unwrap_or_else(|| "-".into())
        };
        println!(
            "{:<15} {:<5} {:<6} {:>7.1} {:>7.1} {:>9} {:>9}  {}",
            r.scenario,
            r.kernel,
            if r.passed { "pass" } else { "FAIL" },
            r.wall_s,
            r.boot_wall_s,
            lat("plug_latency_guest_s"),
            lat("unplug_latency_guest_s"),
            if r.passed { "" } else { r.message.as_str() }
        );
    }
    let failed = results.iter().filter(|r| !r.passed).count();
    println!(
        "{} scenarios, {} passed, {failed} failed, {total_s:.0} s total (latencies: guest seconds from the driver's 'requested size:' log line to MemTotal at target)",
        results.len(),
        results.len() - failed
    );
}

/// Writes the results as JSON to `dir/<vmm>-<unix time>.json` and `dir/<vmm>-latest.json`.
///
/// # Errors
///
/// Text of the I/O failure.
pub fn write_json(
    dir: &Path,
    vmm: &str,
    where_ran: &str,
    total_s: f64,
    results: &[ScenarioResult],
    versions: &[String],
) -> Result<PathBuf, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let doc = serde_json::json!({
        "vmm": vmm,
        "where": where_ran,
        "unix_time": now,
        "total_s": total_s,
        "package_versions": versions,
        "results": results,
    });
    let text = serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?;
    let path = dir.join(format!("{vmm}-{now}.json"));
    std::fs::write(&path, &text).map_err(|e| format!("{}: {e}", path.display()))?;
    let latest = dir.join(format!("{vmm}-latest.json"));
    std::fs::write(&latest, &text).map_err(|e| format!("{}: {e}", latest.display()))?;
    Ok(path)
}

#[cfg(test)]
#[expect(
    clippy::unwrap_used,
    reason = "a test fails loudly on any unexpected error"
)]
mod tests {
    use super::*;

    #[test]
    fn cmdlines() {
        assert!(cmdline(Boot::Movable).ends_with("memhp_default_state=online_movable"));
        assert!(!cmdline(Boot::KernelDefault).contains("memhp"));
        assert!(cmdline(Boot::AutoMovable).contains("online_policy=auto-movable"));
    }

    #[test]
    fn json_written() {
        let dir = std::env::temp_dir().join(format!("guest-tests-json-{}", std::process::id()));
        let r = ScenarioResult {
            scenario: "probe".into(),
            kernel: "6.1".into(),
            kernel_release: "x".into(),
            vmm: "qemu".into(),
            boot: "movable".into(),
            passed: true,
            message: String::new(),
            wall_s: 1.0,
            boot_wall_s: 2.0,
            metrics: Metrics::new(),
            console_log: "l".into(),
        };
        let versions = vec!["pinned a=1 used a=2".to_string()];
        let p = write_json(&dir, "qemu", "direct", 3.0, &[r], &versions).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
        assert_eq!(v["results"][0]["scenario"], "probe");
        assert_eq!(v["where"], "direct");
        assert_eq!(v["package_versions"][0], "pinned a=1 used a=2");
    }
}
