//! `ci/autosize-bench`: one workload trace (grow, hold, free, grow again) replayed in the
//! same test host against three ways of giving a guest memory, with the host memory each
//! holds over time. A benchmark, not a test: it prints figures and writes samples, and
//! fails only when a configuration could not run.
//!
//! - `autosize`: our VMM with `--autosize` and free page reporting (the balloon's
//!   statistics drive virtio-mem; nothing is plugged at start).
//! - `qemu-balloon`: QEMU with a static size (virtio-mem plugged to the same maximum at
//!   start) and `virtio-balloon,free-page-reporting=on`: the balloon way.
//! - `static`: our VMM with the same static size and no balloon: no controller.
//!
//! All three boot 1 GiB of RAM with a 4 GiB virtio-mem region; the static ones plug
//! [`MAX_PLUG`], which is also the controller's `max`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::agent::{Report, OOM_SIGNS};
use crate::guest::{Guest, ScenarioError, QUICK};
use crate::vmm::{VmSpec, Vmm};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// The static configurations' plugged size and the controller's `max`.
pub const MAX_PLUG: u64 = 2 * GIB;
/// The controller's policy in the `autosize` configuration.
pub const POLICY: &str = "min=0,max=2G,target=60";
/// Free guest memory (MemAvailable) that counts as "the memory is there" after a demand
/// step: room for the next 256 MiB step.
pub const READY_AVAILABLE: u64 = 256 * MIB;
/// How long a step's memory may take to be there before the bench stops waiting.
pub const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// One step of the trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The workload writes this many more MiB (a new tmpfs file).
    Write(u64),
    /// Nothing happens for this many seconds (samples are taken).
    Hold(u64),
    /// The workload deletes everything it wrote.
    Free,
}

/// The trace every configuration replays: grow to about 1.5 GiB in 256 MiB steps, hold,
/// free, idle, grow again to 1 GiB, hold, free, idle.
pub const TRACE: &[Step] = &[
    Step::Write(200),
    Step::Write(256),
    Step::Write(256),
    Step::Write(256),
    Step::Write(256),
    Step::Write(256),
    Step::Hold(20),
    Step::Free,
    Step::Hold(60),
    Step::Write(256),
    Step::Write(256),
    Step::Write(256),
    Step::Write(256),
    Step::Hold(15),
    Step::Free,
    Step::Hold(40),
];

/// A way of giving the guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Config {
    /// Ours, `--autosize` and free page reporting.
    Autosize,
    /// QEMU, static size, balloon with free page reporting.
    QemuBalloon,
    /// Ours, static size, no balloon.
    Static,
}

impl Config {
    /// Every configuration, in run order.
    pub const ALL: [Config; 3] = [Config::Autosize, Config::QemuBalloon, Config::Static];

    /// Name in output lines and file names.
    pub fn name(self) -> &'static str {
        match self {
            Config::Autosize => "autosize",
            Config::QemuBalloon => "qemu-balloon",
            Config::Static => "static",
        }
    }

    /// Whether it runs under QEMU.
    pub fn is_qemu(self) -> bool {
        self == Config::QemuBalloon
    }

    /// `base` (the probe scenario's spec) adjusted for this configuration.
    pub fn spec(self, base: &VmSpec) -> VmSpec {
        let mut s = base.clone();
        s.name = format!("{}-bench-{}", base.name, self.name());
        s.boot_mem = GIB;
        s.balloon = self != Config::Static;
        s.autosize = (self == Config::Autosize).then(|| POLICY.to_string());
        s
    }
}

/// One sample of a run.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Seconds since the trace started.
    pub t: f64,
    /// Requested size.
    pub requested: u64,
    /// Plugged size.
    pub plugged: u64,
    /// The guest's MemAvailable when it was last read (the agent is busy while the
    /// workload writes).
    pub available: Option<u64>,
    /// The VMM process's RSS.
    pub rss: u64,
}

/// What one configuration did over the trace.
#[derive(Clone, Debug, Default)]
pub struct Figures {
    /// Samples, oldest first.
    pub samples: Vec<Sample>,
    /// Trace steps as (seconds since start, label), for the timeline's marks.
    pub marks: Vec<(f64, String)>,
    /// Per write step: seconds from the end of the write until MemAvailable was at least
    /// [`READY_AVAILABLE`] (`None`: not within [`READY_TIMEOUT`]).
    pub ready_s: Vec<Option<f64>>,
    /// Write steps the guest could not complete.
    pub write_failures: usize,
    /// OOM kills and allocation failures in the guest's log during the trace.
    pub oom_lines: usize,
}

impl Figures {
    /// Host memory held over the trace, GiB x s (trapezoids between samples).
    pub fn gib_s(&self) -> f64 {
        self.samples
            .windows(2)
            .map(|w| (w[1].t - w[0].t) * (w[0].rss + w[1].rss) as f64 / 2.0)
            .sum::<f64>()
            / GIB as f64
    }

    /// How long the trace took, s (the workload's writes are slower where memory comes
    /// late).
    pub fn trace_s(&self) -> f64 {
        self.samples.last().map_or(0.0, |s| s.t)
    }

    /// The most host memory held, MiB.
    pub fn peak_mib(&self) -> u64 {
        self.samples.iter().map(|s| s.rss).max().unwrap_or(0) / MIB
    }

    /// The longest wait for a step's memory; infinite when one never came.
    pub fn worst_ready_s(&self) -> f64 {
        self.ready_s
            .iter()
            .map(|r| r.unwrap_or(f64::INFINITY))
            .fold(0.0, f64::max)
    }

    /// Steps whose memory took more than 2 s (or never came).
    pub fn short_steps(&self) -> usize {
        self.ready_s
            .iter()
            .filter(|r| r.is_none_or(|s| s > 2.0))
            .count()
    }

    /// The summary line of one configuration.
    pub fn line(&self, config: Config) -> String {
        format!(
            "autosize-bench: config={} host_gib_s={:.1} trace_s={:.0} peak_mib={} \
             write_failures={} oom_lines={} worst_ready_s={:.2} steps_short_over_2s={}",
            config.name(),
            self.gib_s(),
            self.trace_s(),
            self.peak_mib(),
            self.write_failures,
            self.oom_lines,
            self.worst_ready_s(),
            self.short_steps()
        )
    }

    /// The samples as `plot-timeline` CSV (bytes), with the steps as marks.
    pub fn csv(&self) -> String {
        let mut out = String::from("t_s,requested,plugged,guest MemAvailable,host RSS\n");
        let mut marks = self.marks.iter().peekable();
        for s in &self.samples {
            while let Some((t, label)) = marks.next_if(|(t, _)| *t <= s.t) {
                let _ = writeln!(out, "# mark {t:.2} {label}");
            }
            let avail = s.available.map(|a| a.to_string()).unwrap_or_default();
            let _ = writeln!(
                out,
                "{:.2},{},{},{avail},{}",
                s.t, s.requested, s.plugged, s.rss
            );
        }
        out
    }
}

/// The host RSS of every configuration in one `plot-timeline` CSV (one column each).
pub fn rss_csv(runs: &[(Config, Figures)]) -> String {
    let mut out = String::from("t_s");
    for (c, _) in runs {
        let _ = write!(out, ",host RSS: {}", c.name());
    }
    out.push('\n');
    for (i, (_, f)) in runs.iter().enumerate() {
        for s in &f.samples {
            let _ = write!(out, "{:.2}", s.t);
            for j in 0..runs.len() {
                out.push(',');
                if j == i {
                    let _ = write!(out, "{}", s.rss);
                }
            }
            out.push('\n');
        }
    }
    out
}

struct Run<'a> {
    g: &'a mut Guest,
    t0: Instant,
    available: Option<u64>,
    figures: Figures,
}

impl Run<'_> {
    fn sample(&mut self) -> Result<(), ScenarioError> {
        let s = self.g.sizes()?;
        let rss = self.g.vmm_rss()?;
        self.figures.samples.push(Sample {
            t: self.t0.elapsed().as_secs_f64(),
            requested: s.requested,
            plugged: s.plugged,
            available: self.available,
            rss,
        });
        Ok(())
    }

    fn read_available(&mut self) -> Result<u64, ScenarioError> {
        let r = Report::from_lines(&self.g.agent("meminfo", QUICK)?);
        let a = r.memavail_kb * 1024;
        self.available = Some(a);
        Ok(a)
    }

    fn mark(&mut self, label: String) {
        let t = self.t0.elapsed().as_secs_f64();
        self.figures.marks.push((t, label));
    }

    fn hold(&mut self, d: Duration) -> Result<(), ScenarioError> {
        let end = Instant::now() + d;
        while Instant::now() < end {
            self.g.console.check_events("the autosize bench")?;
            self.read_available()?;
            self.sample()?;
            std::thread::sleep(Duration::from_millis(300));
        }
        Ok(())
    }

    /// Step `n` of the workload writes `mib` more; `first` marks the start of a growth
    /// phase on the timeline (one mark per phase keeps the labels readable).
    fn write(&mut self, n: usize, mib: u64, first: bool) -> Result<(), ScenarioError> {
        if first {
            self.mark("grow".into());
        }
        self.sample()?;
        let out: Vec<String> = self
            .g
            .agent(
                &format!(
                    "sh dd if=/dev/zero of=/data/bench{n} bs=1M count={mib} 2>/dev/null && echo ok=1 || echo ok=0"
                ),
                Duration::from_secs(300),
            )?
            .into_iter()
            .filter(|l| l.kind == "out")
            .filter_map(|l| l.msg)
            .collect();
        if !out.iter().any(|l| l.trim() == "ok=1") {
            self.figures.write_failures += 1;
            println!("AUTOSIZE-BENCH step {n}: the guest could not write {mib} MiB: {out:?}");
        }
        let written = Instant::now();
        let ready = loop {
            let a = self.read_available()?;
            self.sample()?;
            if a >= READY_AVAILABLE {
                break Some(written.elapsed().as_secs_f64());
            }
            if written.elapsed() > READY_TIMEOUT {
                break None;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        self.figures.ready_s.push(ready);
        Ok(())
    }
}

/// Boots `config` from `base`, replays [`TRACE`] and returns what it held. One
/// `AUTOSIZE-BENCH` line per step.
///
/// # Errors
///
/// [`ScenarioError`] when the guest does not boot or stops answering.
pub fn run(
    vmm: &dyn Vmm,
    config: Config,
    base: &VmSpec,
    logs: &Path,
    echo: bool,
) -> Result<Figures, ScenarioError> {
    let spec = config.spec(base);
    let log = logs.join(format!("{}-{}.log", vmm.name(), spec.name));
    let mut g = Guest::boot(vmm, &spec, &log, echo)?;
    if config != Config::Autosize {
        g.ensure_plugged(MAX_PLUG)?;
    }
    g.agent("mark autosize-bench start", QUICK)?;
    let mut run = Run {
        t0: Instant::now(),
        g: &mut g,
        available: None,
        figures: Figures::default(),
    };
    let mut files = 0;
    for (i, step) in TRACE.iter().enumerate() {
        let t = Instant::now();
        match *step {
            Step::Write(mib) => {
                let first = i == 0 || !matches!(TRACE[i - 1], Step::Write(_));
                run.write(files, mib, first)?;
                files += 1;
            }
            Step::Hold(s) => run.hold(Duration::from_secs(s))?,
            Step::Free => {
                run.mark("free".into());
                run.g.agent("sh rm -f /data/bench*", QUICK)?;
                run.sample()?;
            }
        }
        let last = run.figures.samples.last().cloned();
        println!(
            "AUTOSIZE-BENCH {} step {i} {step:?} {:.1} s plugged={} rss_mib={}",
            config.name(),
            t.elapsed().as_secs_f64(),
            last.as_ref().map_or(0, |s| s.plugged / MIB),
            last.as_ref().map_or(0, |s| s.rss / MIB)
        );
    }
    let mut figures = std::mem::take(&mut run.figures);
    let r = Report::from_lines(&g.agent("dmesg_all", QUICK)?);
    let start = r
        .dmesg
        .iter()
        .rposition(|d| d.text.contains("guest-agent: autosize-bench start"))
        .unwrap_or(0);
    figures.oom_lines = r.dmesg[start..]
        .iter()
        .filter(|d| OOM_SIGNS.iter().any(|s| d.text.contains(s)))
        .count();
    g.shutdown();
    Ok(figures)
}

/// Runs every configuration on `base`, writes `<config>.csv` and `rss.csv` into `out`,
/// and prints a line per configuration and the side-by-side table. Returns whether every
/// configuration ran.
pub fn run_all(
    ours: &dyn Vmm,
    qemu: &dyn Vmm,
    base: &VmSpec,
    logs: &Path,
    out: &Path,
    echo: bool,
) -> bool {
    let mut runs = Vec::new();
    let mut all_ran = true;
    for c in Config::ALL {
        let vmm = if c.is_qemu() { qemu } else { ours };
        println!("autosize-bench: running {} ({})", c.name(), vmm.name());
        match run(vmm, c, base, logs, echo) {
            Ok(f) => {
                let path = out.join(format!("{}.csv", c.name()));
                if let Err(e) = std::fs::write(&path, f.csv()) {
                    println!("autosize-bench: cannot write {}: {e}", path.display());
                    all_ran = false;
                }
                println!("{}", f.line(c));
                runs.push((c, f));
            }
            Err(e) => {
                println!("autosize-bench: config={} FAILED to run: {e}", c.name());
                all_ran = false;
            }
        }
    }
    let rss: PathBuf = out.join("rss.csv");
    if let Err(e) = std::fs::write(&rss, rss_csv(&runs)) {
        println!("autosize-bench: cannot write {}: {e}", rss.display());
        all_ran = false;
    }
    print!("{}", table(&runs));
    all_ran
}

/// The side-by-side table.
pub fn table(runs: &[(Config, Figures)]) -> String {
    let mut t = String::from(
        "config        host GiB*s  trace s  peak MiB  write fails  OOM lines  worst ready s  steps > 2 s\n",
    );
    for (c, f) in runs {
        let _ = writeln!(
            t,
            "{:<13} {:>10.1}  {:>7.0}  {:>8}  {:>11}  {:>9}  {:>13.2}  {:>11}",
            c.name(),
            f.gib_s(),
            f.trace_s(),
            f.peak_mib(),
            f.write_failures,
            f.oom_lines,
            f.worst_ready_s(),
            f.short_steps()
        );
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(t: f64, rss_mib: u64) -> Sample {
        Sample {
            t,
            requested: 0,
            plugged: 0,
            available: None,
            rss: rss_mib * MIB,
        }
    }

    #[test]
    fn held_memory_is_the_area_under_rss() {
        let f = Figures {
            samples: vec![s(0.0, 1024), s(2.0, 1024), s(4.0, 3072)],
            ..Figures::default()
        };
        // 2 s at 1 GiB, then 2 s rising from 1 to 3 GiB: 2 + 4 GiB*s.
        assert!((f.gib_s() - 6.0).abs() < 1e-9, "{}", f.gib_s());
        assert_eq!(f.peak_mib(), 3072);
    }

    #[test]
    fn a_step_whose_memory_never_came_counts_as_short() {
        let f = Figures {
            ready_s: vec![Some(0.1), Some(2.5), None],
            ..Figures::default()
        };
        assert_eq!(f.short_steps(), 2);
        assert!(f.worst_ready_s().is_infinite());
        assert!(f.line(Config::Autosize).contains("steps_short_over_2s=2"));
    }

    #[test]
    fn csv_has_marks_in_time_order_and_an_rss_column_per_config() {
        let f = Figures {
            samples: vec![s(0.0, 1), s(1.0, 2)],
            marks: vec![(0.5, "+256 MiB".into())],
            ..Figures::default()
        };
        let csv = f.csv();
        let lines: Vec<_> = csv.lines().collect();
        assert_eq!(lines[2], "# mark 0.50 +256 MiB");
        assert_eq!(lines[1], format!("0.00,0,0,,{MIB}"));
        let both = rss_csv(&[(Config::Autosize, f.clone()), (Config::Static, f)]);
        let rows: Vec<_> = both.lines().collect();
        assert_eq!(rows[0], "t_s,host RSS: autosize,host RSS: static");
        assert_eq!(rows[1], format!("0.00,{MIB},"));
        assert_eq!(rows[3], format!("0.00,,{MIB}"));
    }

    #[test]
    fn configs_differ_only_where_they_should() {
        let base = VmSpec::for_tests();
        let a = Config::Autosize.spec(&base);
        let q = Config::QemuBalloon.spec(&base);
        let st = Config::Static.spec(&base);
        assert_eq!((a.boot_mem, q.boot_mem, st.boot_mem), (GIB, GIB, GIB));
        assert_eq!(a.autosize.as_deref(), Some(POLICY));
        assert!(q.autosize.is_none() && st.autosize.is_none());
        assert!(a.balloon && q.balloon && !st.balloon);
        assert!(POLICY.contains(&format!("max={}G", MAX_PLUG / GIB)));
    }
}
