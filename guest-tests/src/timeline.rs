//! `ci/resize-timeline`: one plug and one unplug, each as a table of its steps on one
//! clock (milliseconds from the API or QMP call): what the VMM logged (our VMM's debug and
//! trace lines, QEMU's `virtio_mem_*` trace events: config change, requests and answers,
//! host work, KVM slots) and what the guest logged (the virtio_mem driver with dynamic
//! debug on, and the agent's mark when MemTotal reached the target). Guest printk times
//! are put on the host's clock by an offset measured over the console (the best of
//! several round trips; its uncertainty, half that round trip, is printed).
//!
//! A tool, not a test: it fails only when the guest does not boot or answer.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::agent::Report;
use crate::guest::{Guest, ScenarioError, QUICK};
use crate::vmm::{VmSpec, Vmm};

const MIB: u64 = 1 << 20;

/// One step of a resize.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// Host wall-clock seconds (UNIX time).
    pub at: f64,
    /// `host` or `guest`.
    pub side: &'static str,
    /// What happened.
    pub what: String,
}

fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// UNIX seconds of an RFC 3339 UTC timestamp such as `2026-12-02T14:05:57.123456Z`.
fn parse_rfc3339(ts: &str) -> Option<f64> {
    let ts = ts.strip_suffix('Z')?;
    let (date, time) = ts.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, mo, da) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':');
    let h: f64 = t.next()?.parse().ok()?;
    let mi: f64 = t.next()?.parse().ok()?;
    let s: f64 = t.next()?.parse().ok()?;
    let days = days_from_civil(y, mo, da) as f64;
    Some(days * 86_400.0 + h * 3600.0 + mi * 60.0 + s)
}

/// A host row from one line of our VMM's log (`[TIMESTAMP LEVEL target] message`), for
/// the lines on the resize path.
pub fn parse_ours_line(line: &str) -> Option<Row> {
    let rest = line.strip_prefix('[')?;
    let (head, msg) = rest.split_once("] ")?;
    let ts = head.split_whitespace().next()?;
    let at = parse_rfc3339(ts)?;
    let keep = msg.starts_with("virtio-mem:") || msg.starts_with("API");
    keep.then(|| Row {
        at,
        side: "host",
        what: msg.trim().to_string(),
    })
}

/// A host row from one line of QEMU's trace (`PID@SECONDS.MICROS:event args`).
pub fn parse_qemu_line(line: &str) -> Option<Row> {
    let (_, rest) = line.split_once('@')?;
    let (ts, event) = rest.split_once(':')?;
    let at: f64 = ts.parse().ok()?;
    event.starts_with("virtio_mem").then(|| Row {
        at,
        side: "host",
        what: event.trim().to_string(),
    })
}

/// Host seconds minus guest printk seconds, and its uncertainty (half the best round
/// trip): the agent writes a mark into the kernel log between our send and its answer.
fn clock_offset(g: &mut Guest) -> Result<(f64, f64), ScenarioError> {
    let mut sent = Vec::new();
    for i in 0..5 {
        let t1 = now_s();
        g.agent(&format!("mark clock-sync {i}"), QUICK)?;
        let t2 = now_s();
        sent.push((i, t1, t2));
    }
    let r = Report::from_lines(&g.agent("dmesg_tail 5 guest-agent: clock-sync", QUICK)?);
    let mut best: Option<(f64, f64)> = None;
    for (i, t1, t2) in sent {
        let mark = format!("guest-agent: clock-sync {i}");
        let Some(at) = r
            .dmesg
            .iter()
            .find(|d| d.text.trim_end() == mark)
            .and_then(|d| d.time)
        else {
            continue;
        };
        let half = (t2 - t1) / 2.0;
        if best.is_none_or(|(_, h)| half < h) {
            best = Some((t1 + half - at, half));
        }
    }
    best.ok_or_else(|| ScenarioError::Check("no clock-sync mark in the guest's log".into()))
}

/// The rows of one resize as a table, milliseconds from `t0`.
pub fn table(title: &str, t0: f64, rows: &[Row]) -> String {
    let mut out = format!("{title}\n      ms  side   step\n");
    for r in rows {
        let _ = writeln!(
            out,
            "{:>8.1}  {:<5}  {}",
            (r.at - t0) * 1000.0,
            r.side,
            r.what
        );
    }
    out
}

fn log_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

fn host_rows(path: &Path, from: u64, qemu: bool) -> Vec<Row> {
    let text = std::fs::read(path).unwrap_or_default();
    let from = usize::try_from(from).unwrap_or(usize::MAX).min(text.len());
    String::from_utf8_lossy(&text[from..])
        .lines()
        .filter_map(|l| {
            if qemu {
                parse_qemu_line(l)
            } else {
                parse_ours_line(l)
            }
        })
        .collect()
}

/// One resize to `target`, with its rows sorted by time; returns the table.
fn one(
    g: &mut Guest,
    stderr: &Path,
    qemu: bool,
    label: &str,
    target: u64,
) -> Result<String, ScenarioError> {
    let (offset, uncertainty) = clock_offset(g)?;
    let mark = format!("guest-agent: timeline {label}");
    g.agent(&format!("mark timeline {label}"), QUICK)?;
    let from = log_len(stderr);
    let t0 = now_s();
    let outcome = g.resize_wait(target, g.memtotal_with(target), Duration::from_secs(120))?;
    // The VMM may log its last lines (slot release, an answer) a little after.
    std::thread::sleep(Duration::from_millis(500));
    let mut rows = host_rows(stderr, from, qemu);
    let r = Report::from_lines(&g.agent(
        "dmesg_tail 400 virtio_mem|guest-agent: (timeline|mem_reached)",
        QUICK,
    )?);
    let start = r
        .dmesg
        .iter()
        .rposition(|d| d.text.trim_end() == mark)
        .unwrap_or(0);
    rows.extend(r.dmesg[start + 1..].iter().filter_map(|d| {
        Some(Row {
            at: d.time? + offset,
            side: "guest",
            what: d.text.trim().to_string(),
        })
    }));
    rows.insert(
        0,
        Row {
            at: t0,
            side: "host",
            what: format!(
                "{} call: requested size {} MiB",
                if qemu { "QMP" } else { "API" },
                target / MIB
            ),
        },
    );
    rows.sort_by(|a, b| a.at.total_cmp(&b.at));
    let title = format!(
        "resize-timeline: {label} to {} MiB: reached={} guest latency {} s, host wall {:.3} s \
         (guest rows +/- {:.1} ms)",
        target / MIB,
        outcome.reached,
        outcome
            .guest_latency_s
            .map_or_else(|| "-".into(), |l| format!("{l:.3}")),
        outcome.host_wall_s,
        uncertainty * 1000.0
    );
    Ok(table(&title, t0, &rows))
}

/// Boots `spec` with tracing, plugs `size`, writes and frees `data_mib` of data, unplugs
/// it all, and prints both timelines.
///
/// # Errors
///
/// [`ScenarioError`] when the guest does not boot or answer.
pub fn run(
    vmm: &dyn Vmm,
    spec: &VmSpec,
    logs: &Path,
    size: u64,
    data_mib: u64,
    echo: bool,
) -> Result<(), ScenarioError> {
    let mut spec = spec.clone();
    spec.trace = true;
    let qemu = vmm.name() == "qemu";
    let stderr: PathBuf = spec.stderr_log(if qemu { "qemu" } else { "vmm" });
    let log = logs.join(format!("{}-{}-timeline.log", vmm.name(), spec.name));
    let mut g = Guest::boot(vmm, &spec, &log, echo)?;
    let out: Vec<String> = g
        .agent(
            "sh mount -t debugfs none /sys/kernel/debug 2>/dev/null; \
             echo 'module virtio_mem +p' >/sys/kernel/debug/dynamic_debug/control \
             && echo ok=1 || echo ok=0",
            QUICK,
        )?
        .into_iter()
        .filter(|l| l.kind == "out")
        .filter_map(|l| l.msg)
        .collect();
    if !out.iter().any(|l| l.trim() == "ok=1") {
        println!(
            "resize-timeline: the guest's dynamic debug could not be turned on ({out:?}): \
             only the driver's own info lines appear"
        );
    }
    print!("{}", one(&mut g, &stderr, qemu, "plug", size)?);
    if data_mib > 0 {
        g.fill(data_mib, false)?;
        g.free()?;
    }
    print!("{}", one(&mut g, &stderr, qemu, "unplug", 0)?);
    g.shutdown();
    // Keep the trace with the other logs (it was written to the local work directory).
    let kept = spec.log_dir.join(stderr.file_name().unwrap_or_default());
    if let Err(e) = std::fs::copy(&stderr, &kept) {
        println!("resize-timeline: cannot keep {}: {e}", stderr.display());
    }
    Ok(())
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]
mod tests {
    use super::*;

    #[test]
    fn our_log_lines_give_unix_times() {
        let r = parse_ours_line(
            "[2026-12-02T14:05:57.250000Z DEBUG vmm::hotplug] virtio-mem: KVM slot 3 added in 1ms",
        )
        .unwrap();
        // 2026-12-02 is day 20789 since 1970-01-01.
        let want = 20_789.0 * 86_400.0 + 14.0 * 3600.0 + 5.0 * 60.0 + 57.25;
        assert!((r.at - want).abs() < 1e-6, "{}", r.at);
        assert_eq!(r.what, "virtio-mem: KVM slot 3 added in 1ms");
        assert!(parse_ours_line("[2026-12-02T14:05:57Z INFO vmm] autosize: on").is_none());
        assert!(parse_ours_line("garbage").is_none());
    }

    #[test]
    fn qemu_trace_lines_give_unix_times() {
        let r =
            parse_qemu_line("4242@1764684357.500001:virtio_mem_plug_request addr=0x1 nb_blocks=2")
                .unwrap();
        assert!((r.at - 1_764_684_357.500_001).abs() < 1e-6);
        assert_eq!(r.what, "virtio_mem_plug_request addr=0x1 nb_blocks=2");
        assert!(parse_qemu_line("qemu-system-x86_64: warning: x").is_none());
    }

    #[test]
    fn the_table_counts_from_the_call() {
        let t = table(
            "t",
            100.0,
            &[Row {
                at: 100.0125,
                side: "guest",
                what: "x".into(),
            }],
        );
        assert!(
            t.lines().nth(2).unwrap().starts_with("    12.5  guest  x"),
            "{t}"
        );
    }

    #[test]
    fn civil_days() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
    }
}
