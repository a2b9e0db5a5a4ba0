//! A booted guest under a VMM: the agent commands and VMM controls the scenarios use,
//! with latencies measured on the guest's clock (kernel log timestamps), not the client's.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::agent::{AgentLine, DmesgLine, Report};
use crate::console::{Console, ConsoleError};
use crate::vmm::{rss_bytes, DeviceSizes, VmSpec, Vmm, VmmError, VmmProcess};

/// One MiB.
pub const MIB: u64 = 1 << 20;
/// One GiB.
pub const GIB: u64 = 1 << 30;

/// Why a scenario failed.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// An assertion about guest or VMM state did not hold.
    #[error("{0}")]
    Check(String),
    /// The guest agent did not answer as expected.
    #[error("guest agent: {0}")]
    Console(#[from] ConsoleError),
    /// The VMM failed or refused.
    #[error("VMM: {0}")]
    Vmm(#[from] VmmError),
}

/// Fails the scenario with a formatted message unless the condition holds.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err($crate::guest::ScenarioError::Check(format!($($fmt)+)));
        }
    };
}

/// Outcome of a resize that waited for the guest's MemTotal.
#[derive(Debug, Clone, Copy)]
pub struct ResizeOutcome {
    /// MemTotal reached the target before the timeout.
    pub reached: bool,
    /// MemTotal (kB) at the end of the wait.
    pub memtotal_kb: u64,
    /// Guest time from the driver's `requested size:` log line to MemTotal at target.
    pub guest_latency_s: Option<f64>,
    /// Host wall time from the resize call to the agent's report.
    pub host_wall_s: f64,
}

/// Guest time from the driver's last `requested size: <target>` line to the agent's
/// following `guest-agent: mem_reached` mark, both on the kernel log's clock.
pub fn latency_from_dmesg(dmesg: &[DmesgLine], target: u64) -> Option<f64> {
    let reached = dmesg
        .iter()
        .rev()
        .find(|d| d.text.starts_with("guest-agent: mem_reached"))?;
    let t_done = reached.time?;
    let wanted = format!("requested size: {target:#x}");
    let t_req = dmesg
        .iter()
        .rev()
        .filter(|d| d.time.is_some_and(|t| t <= t_done))
        .find(|d| d.text.contains("virtio_mem") && d.text.ends_with(&wanted))?
        .time?;
    Some(t_done - t_req)
}

/// A running guest with its agent.
pub struct Guest {
    /// The VMM process.
    pub vmm: Box<dyn VmmProcess>,
    /// The agent console.
    pub console: Console,
    /// What was booted.
    pub spec: VmSpec,
    /// MemTotal (kB) when the agent came up (boot memory only).
    pub boot_memtotal_kb: u64,
    /// `uname -r` of the guest.
    pub kernel_release: String,
    /// Agent `module` lines of the last boot.
    pub modules: Vec<AgentLine>,
    /// Guest uptime when the agent was ready.
    pub ready_uptime: f64,
    /// Host wall time from VMM start to agent ready.
    pub boot_wall_s: f64,
    /// MiB of data the agent holds in /data (0 = none).
    pub filled_mib: u64,
    /// Whether that data has a checksum to verify.
    pub filled_checked: bool,
}

/// Timeout for agent commands that only read state.
pub const QUICK: Duration = Duration::from_secs(120);

impl Guest {
    /// Starts the VMM and waits for the agent's `ready` line.
    ///
    /// # Errors
    ///
    /// [`ScenarioError`] when the VMM does not start or the agent does not come up.
    pub fn boot(
        vmm: &dyn Vmm,
        spec: &VmSpec,
        log: &Path,
        echo: bool,
    ) -> Result<Self, ScenarioError> {
        let start = Instant::now();
        let mut proc = vmm.start(spec)?;
        let (out, inp) = proc
            .take_console()
            .ok_or_else(|| ScenarioError::Check("the VMM gave no console".into()))?;
        let console = Console::new(out, inp, log, echo)?;
        let mut g = Self {
            vmm: proc,
            console,
            spec: spec.clone(),
            boot_memtotal_kb: 0,
            kernel_release: String::new(),
            modules: Vec::new(),
            ready_uptime: 0.0,
            boot_wall_s: 0.0,
            filled_mib: 0,
            filled_checked: false,
        };
        if let Err(e) = g.wait_ready(start) {
            // The VMM is stopped when `g` drops: take its view of the stuck guest first.
            let timed_out = matches!(e, ScenarioError::Console(ConsoleError::Timeout { .. }));
            if timed_out && g.vmm.exited().is_none() {
                return Err(ScenarioError::Check(format!(
                    "{e} [state dump: {}]",
                    g.save_dump()
                )));
            }
            return Err(e);
        }
        Ok(g)
    }

    /// Writes the VMM's state dump (vCPUs, serial, interrupt controllers) next to the
    /// console log and returns its path, or why there is none.
    pub fn save_dump(&mut self) -> String {
        let path = format!("{}.dump", self.console.log_path());
        match self.vmm.dump_state() {
            Ok(text) => match std::fs::write(&path, text) {
                Ok(()) => path,
                Err(e) => format!("(cannot write {path}: {e})"),
            },
            Err(e) => format!("(no state dump: {e})"),
        }
    }

    /// Waits for `AGENT ready` (after boot or reboot) and records the boot state.
    ///
    /// # Errors
    ///
    /// [`ScenarioError::Console`] on timeout, with the VMM's exit status if it died.
    pub fn wait_ready(&mut self, start: Instant) -> Result<(), ScenarioError> {
        let res = self.console.wait_for(
            "the guest agent's ready line",
            Duration::from_secs(300),
            |l| l.kind == "ready",
        );
        let (lines, _) = match res {
            Ok(v) => v,
            Err(e) => {
                if let Some(why) = self.vmm.exited() {
                    return Err(ScenarioError::Check(format!("guest did not boot: {why}")));
                }
                return Err(e.into());
            }
        };
        let ready = lines
            .last()
            .cloned()
            .ok_or_else(|| ScenarioError::Check("no ready line".into()))?;
        self.modules = lines.into_iter().filter(|l| l.kind == "module").collect();
        self.boot_memtotal_kb = ready
            .get_u64("boot_memtotal_kb")
            .or_else(|| ready.get_u64("memtotal_kb"))
            .unwrap_or(0);
        self.kernel_release = ready.get("kernel").unwrap_or("").to_string();
        self.ready_uptime = ready.uptime().unwrap_or(0.0);
        self.boot_wall_s = start.elapsed().as_secs_f64();
        self.filled_mib = 0;
        self.filled_checked = false;
        if let Some(bad) = self
            .modules
            .iter()
            .find(|m| m.get("status") == Some("failed"))
        {
            return Err(ScenarioError::Check(format!(
                "module {} failed to load: {}",
                bad.get("name").unwrap_or("?"),
                bad.msg.as_deref().unwrap_or("")
            )));
        }
        Ok(())
    }

    /// Runs the agent's `report`.
    ///
    /// # Errors
    ///
    /// [`ScenarioError::Console`].
    pub fn report(&mut self) -> Result<Report, ScenarioError> {
        Ok(Report::from_lines(&self.console.command("report", QUICK)?))
    }

    /// Runs an agent command and returns its lines.
    ///
    /// # Errors
    ///
    /// [`ScenarioError::Console`].
    pub fn agent(
        &mut self,
        command: &str,
        timeout: Duration,
    ) -> Result<Vec<AgentLine>, ScenarioError> {
        Ok(self.console.command(command, timeout)?)
    }

    /// The VMM's view of the device.
    ///
    /// # Errors
    ///
    /// [`ScenarioError::Vmm`].
    pub fn sizes(&mut self) -> Result<DeviceSizes, ScenarioError> {
        Ok(self.vmm.sizes()?)
    }

    /// The VMM process's RSS in bytes.
    ///
    /// # Errors
    ///
    /// [`ScenarioError::Check`] when /proc cannot be read.
    pub fn vmm_rss(&self) -> Result<u64, ScenarioError> {
        rss_bytes(self.vmm.pid()).map_err(ScenarioError::Check)
    }

    /// MemTotal (kB) expected with `plugged` bytes online on top of boot memory.
    pub fn memtotal_with(&self, plugged: u64) -> u64 {
        self.boot_memtotal_kb + plugged / 1024
    }

    /// Requests `target` bytes and waits until the guest's MemTotal equals
    /// `expect_kb` (or the timeout), measuring the latency from the guest's own log.
    ///
    /// # Errors
    ///
    /// [`ScenarioError`] when the VMM refuses or the agent does not answer.
    pub fn resize_wait(
        &mut self,
        target: u64,
        expect_kb: u64,
        timeout: Duration,
    ) -> Result<ResizeOutcome, ScenarioError> {
        let secs = timeout.as_secs();
        self.console
            .send(&format!("wait_mem {expect_kb} {secs} eq"))?;
        let t0 = Instant::now();
        self.vmm.resize(target)?;
        let (lines, at) = self.console.wait_for(
            "the agent's wait_mem answer",
            timeout + Duration::from_secs(60),
            |l| l.kind == "mem_reached" || l.kind == "mem_timeout",
        )?;
        let host_wall_s = at.duration_since(t0).as_secs_f64();
        let last = lines
            .last()
            .cloned()
            .ok_or_else(|| ScenarioError::Check("no wait_mem answer".into()))?;
        self.console.wait_for("wait_mem to finish", QUICK, |l| {
            l.kind == "done" && l.get("cmd") == Some("wait_mem")
        })?;
        let reached = last.kind == "mem_reached";
        let memtotal_kb = last.get_u64("memtotal_kb").unwrap_or(0);
        let mut guest_latency_s = None;
        if reached {
            let d = self.agent(
                "dmesg_tail 8 requested size:|guest-agent: mem_reached",
                QUICK,
            )?;
            guest_latency_s = latency_from_dmesg(&Report::from_lines(&d).dmesg, target);
        }
        Ok(ResizeOutcome {
            reached,
            memtotal_kb,
            guest_latency_s,
            host_wall_s,
        })
    }

    /// Makes the device's plugged size `target` with all of it online (from any state),
    /// freeing data first when shrinking.
    ///
    /// # Errors
    ///
    /// [`ScenarioError::Check`] when the guest does not get there.
    pub fn ensure_plugged(&mut self, target: u64) -> Result<(), ScenarioError> {
        let s = self.sizes()?;
        let want_kb = self.memtotal_with(target);
        let now = Report::from_lines(&self.agent("meminfo", QUICK)?);
        if s.plugged == target && s.requested == target && now.memtotal_kb == want_kb {
            return Ok(());
        }
        if target < s.plugged && self.filled_mib > 0 {
            self.free()?;
        }
        let out = self.resize_wait(target, want_kb, Duration::from_secs(120))?;
        ensure!(
            out.reached,
            "setup: could not get to {} MiB plugged: guest MemTotal {} kB, expected {} kB",
            target / MIB,
            out.memtotal_kb,
            want_kb
        );
        self.wait_plugged(target, Duration::from_secs(30))?;
        Ok(())
    }

    /// Polls the VMM until plugged == `target`.
    ///
    /// # Errors
    ///
    /// [`ScenarioError::Check`] on timeout, naming the last plugged size.
    pub fn wait_plugged(
        &mut self,
        target: u64,
        timeout: Duration,
    ) -> Result<DeviceSizes, ScenarioError> {
        let deadline = Instant::now() + timeout;
        loop {
            self.console.check_events("the plugged size to settle")?;
            let s = self.sizes()?;
            if s.plugged == target {
                return Ok(s);
            }
            ensure!(
                Instant::now() < deadline,
                "the VMM reports {} MiB plugged, expected {} MiB after {:.0} s",
                s.plugged / MIB,
                target / MIB,
                timeout.as_secs_f64()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Polls the VMM until the plugged size has not changed for `quiet`; returns it.
    ///
    /// # Errors
    ///
    /// [`ScenarioError::Vmm`].
    pub fn wait_plugged_stable(
        &mut self,
        quiet: Duration,
        timeout: Duration,
    ) -> Result<DeviceSizes, ScenarioError> {
        let deadline = Instant::now() + timeout;
        let mut last = self.sizes()?;
        let mut since = Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(250));
            self.console.check_events("the plugged size to settle")?;
            let s = self.sizes()?;
            if s.plugged != last.plugged {
                since = Instant::now();
                last = s;
            } else if since.elapsed() >= quiet || Instant::now() > deadline {
                return Ok(s);
            }
        }
    }

    /// Writes `mib` MiB of random-looking data to the guest's tmpfs; with `checksum`,
    /// records its checksum for [`Guest::verify`].
    ///
    /// # Errors
    ///
    /// [`ScenarioError::Check`] when the guest cannot write it.
    pub fn fill(&mut self, mib: u64, checksum: bool) -> Result<AgentLine, ScenarioError> {
        let cmd = if checksum {
            format!("fill {mib}")
        } else {
            format!("fill {mib} nosum")
        };
        let lines = self.agent(&cmd, Duration::from_secs(900))?;
        let l = lines
            .into_iter()
            .find(|l| l.kind == "fill")
            .ok_or_else(|| ScenarioError::Check("agent gave no fill line".into()))?;
        ensure!(
            l.get("ok") == Some("1"),
            "guest could not write {mib} MiB: {}",
            l.msg.as_deref().unwrap_or("?")
        );
        self.filled_mib = mib;
        self.filled_checked = checksum;
        Ok(l)
    }

    /// Checks the data written by [`Guest::fill`] against its checksum.
    ///
    /// # Errors
    ///
    /// [`ScenarioError::Check`] on a mismatch (names both sums).
    pub fn verify(&mut self, when: &str) -> Result<(), ScenarioError> {
        let lines = self.agent("verify", Duration::from_secs(900))?;
        let l = lines
            .into_iter()
            .find(|l| l.kind == "verify")
            .ok_or_else(|| ScenarioError::Check("agent gave no verify line".into()))?;
        ensure!(
            l.get("ok") == Some("1"),
            "data checksum changed {when}: got {} expected {} ({})",
            l.get("sum").unwrap_or("?"),
            l.get("want").unwrap_or("?"),
            l.msg.as_deref().unwrap_or("")
        );
        Ok(())
    }

    /// Deletes the guest's data.
    ///
    /// # Errors
    ///
    /// [`ScenarioError::Console`].
    pub fn free(&mut self) -> Result<(), ScenarioError> {
        self.agent("free", QUICK)?;
        self.filled_mib = 0;
        self.filled_checked = false;
        Ok(())
    }

    /// Powers the guest off and stops the VMM.
    pub fn shutdown(mut self) {
        let _ = self.console.send("poweroff");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && self.vmm.exited().is_none() {
            std::thread::sleep(Duration::from_millis(100));
        }
        self.vmm.stop();
    }
}

#[cfg(test)]
#[expect(
    clippy::unwrap_used,
    reason = "a test fails loudly on any unexpected error"
)]
mod tests {
    use super::*;

    #[test]
    fn latency_uses_last_matching_request_before_the_mark() {
        let d: Vec<_> = [
            "[ 4.0] virtio_mem virtio0: requested size: 0x40000000",
            "[ 9.0] virtio_mem virtio0: requested size: 0x0",
            "[10.0] virtio_mem virtio0: requested size: 0x40000000",
            "[10.5] guest-agent: mem_reached memtotal_kb=1",
        ]
        .iter()
        .map(|l| DmesgLine::parse(l))
        .collect();
        let l = latency_from_dmesg(&d, 1 << 30).unwrap();
        assert!((l - 0.5).abs() < 1e-9, "{l}");
        assert_eq!(latency_from_dmesg(&d, 123), None);
        assert_eq!(latency_from_dmesg(&d[..3], 1 << 30), None);
    }
}
