//! The VMM under test, as a parameter: what the scenarios need from any VMM.
//!
//! A [`Vmm`] starts a guest from a [`VmSpec`] and hands back a [`VmmProcess`]: the guest's
//! serial console (the VMM's stdin/stdout), the virtio-mem resize control and size query,
//! and the host process id for RSS. Implementations: [`crate::qemu`] (the reference
//! device, QEMU's `virtio-mem-pci`) and [`crate::ours`] (this project's VMM).

use std::io::{Read, Write};
use std::path::PathBuf;

/// What to boot.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// A name for logs and sockets (unique within a run).
    pub name: String,
    /// Guest kernel (bzImage); [`VmSpec::vmlinux`] is the same kernel uncompressed.
    pub kernel: PathBuf,
    /// Guest initramfs.
    pub initrd: PathBuf,
    /// Full kernel command line (the harness includes the onlining policy it wants).
    pub cmdline: String,
    /// Boot RAM in bytes.
    pub boot_mem: u64,
    /// virtio-mem region size in bytes.
    pub hotplug_size: u64,
    /// virtio-mem device block size in bytes.
    pub block_size: u64,
    /// vCPUs.
    pub cpus: u32,
    /// A virtio-balloon for the guest's statistics and free page reporting (our VMM's
    /// `--balloon`; QEMU's `virtio-balloon-pci,free-page-reporting=on`).
    pub balloon: bool,
    /// Our VMM's `--autosize` policy (QEMU has no equivalent).
    pub autosize: Option<String>,
    /// KVM paravirtual features to hide from the guest (our VMM's `--kvm-pv-off` names:
    /// pv-tlb-flush, async-pf-int, ...; QEMU gets the matching `-cpu host,kvm-...=off`).
    pub kvm_pv_off: Vec<String>,
    /// Have the VMM log each virtio-mem step with a host timestamp (our VMM: debug and
    /// trace logs; QEMU: its `virtio_mem_*` trace events), for `ci/resize-timeline`.
    pub trace: bool,
    /// Fault host memory in when the guest plugs it, before the answer (our VMM's
    /// `--populate=on`; QEMU's `virtio-mem-pci,prealloc=on`).
    pub populate: bool,
    /// Directory for sockets (a local file system: not a 9p share).
    pub work_dir: PathBuf,
    /// Directory for the VMM's own logs (kept after the run).
    pub log_dir: PathBuf,
}

#[cfg(test)]
impl VmSpec {
    /// A spec for unit tests: 512 MiB boot RAM, a 4 GiB region of 2 MiB blocks, 1 vCPU,
    /// nothing else; paths that need not exist.
    pub(crate) fn for_tests() -> Self {
        VmSpec {
            name: "t".into(),
            kernel: "k".into(),
            initrd: "i".into(),
            cmdline: "console=ttyS0".into(),
            boot_mem: 512 << 20,
            hotplug_size: 4 << 30,
            block_size: 2 << 20,
            cpus: 1,
            balloon: false,
            autosize: None,
            kvm_pv_off: Vec::new(),
            trace: false,
            populate: false,
            work_dir: std::env::temp_dir(),
            log_dir: std::env::temp_dir(),
        }
    }
}

impl VmSpec {
    /// The guest kernel as an uncompressed ELF `vmlinux`: `ci/guest-image` extracts it
    /// from the bzImage into the same image directory.
    pub fn vmlinux(&self) -> PathBuf {
        self.kernel.with_file_name("vmlinux")
    }

    /// Where the VMM `vmm` (`qemu`, `vmm`) writes its stderr. With `trace` that is the
    /// work directory, a local tmpfs: in the test host the log directory is a 9p share,
    /// and a write there per traced step would slow down the very path being traced.
    pub fn stderr_log(&self, vmm: &str) -> PathBuf {
        let dir = if self.trace {
            &self.work_dir
        } else {
            &self.log_dir
        };
        dir.join(format!("{}.{vmm}-stderr.log", self.name))
    }
}

/// The virtio-mem device's sizes as the VMM reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeviceSizes {
    /// Guest-physical start of the region, when the VMM reports it.
    pub addr: Option<u64>,
    /// Region size.
    pub region_size: u64,
    /// Device block size.
    pub block_size: u64,
    /// Plugged size.
    pub plugged: u64,
    /// Requested size.
    pub requested: u64,
}

/// Errors of the VMM adapters.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The VMM binary could not be started.
    #[error("cannot start {binary}: {source}")]
    Spawn {
        /// The binary.
        binary: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The control socket did not appear or refused the connection.
    #[error("cannot connect to the VMM control socket {path}: {reason}")]
    Connect {
        /// The socket path.
        path: String,
        /// Why.
        reason: String,
    },
    /// A control-channel exchange failed (I/O or protocol).
    #[error("VMM control channel: {0}")]
    Control(String),
    /// The VMM answered a command with an error.
    #[error("the VMM refused '{command}': {answer}")]
    Refused {
        /// The command.
        command: String,
        /// Its answer.
        answer: String,
    },
}

/// The guest console's two ends, as the VMM exposes them.
pub type ConsolePipes = (Box<dyn Read + Send>, Box<dyn Write + Send>);

/// A VMM under test.
pub trait Vmm {
    /// Short name (`qemu`, `ours`).
    fn name(&self) -> &str;
    /// Starts a guest.
    ///
    /// # Errors
    ///
    /// [`VmmError`] when the VMM cannot be started or its control channel not reached.
    fn start(&self, spec: &VmSpec) -> Result<Box<dyn VmmProcess>, VmmError>;
}

/// A running guest under a VMM.
pub trait VmmProcess {
    /// The guest console (VMM stdout, VMM stdin); `None` after the first call.
    fn take_console(&mut self) -> Option<ConsolePipes>;
    /// Sets the virtio-mem requested size.
    ///
    /// # Errors
    ///
    /// [`VmmError`] when the VMM refuses or cannot be reached.
    fn resize(&mut self, requested: u64) -> Result<(), VmmError>;
    /// Queries the device's sizes (plugged, requested, ...).
    ///
    /// # Errors
    ///
    /// [`VmmError`] when the VMM cannot be reached or answers nonsense.
    fn sizes(&mut self) -> Result<DeviceSizes, VmmError>;
    /// Host process id (for RSS).
    fn pid(&self) -> u32;
    /// The VMM's whole memory status as JSON, when it has one (our VMM's `GET
    /// /v1/memory`); `None` for VMMs without.
    ///
    /// # Errors
    ///
    /// [`VmmError`] when the VMM does not answer.
    fn status_json(&mut self) -> Result<Option<serde_json::Value>, VmmError> {
        Ok(None)
    }
    /// Runs the VMM's own `resize --wait --timeout S SIZE` client and returns its exit
    /// status and output; `None` for VMMs without one.
    ///
    /// # Errors
    ///
    /// [`VmmError::Spawn`] when the client cannot be started.
    fn resize_wait_cli(
        &mut self,
        _size: u64,
        _timeout_s: u64,
    ) -> Result<Option<(i32, String)>, VmmError> {
        Ok(None)
    }
    /// `Some(description)` once the VMM process has exited.
    fn exited(&mut self) -> Option<String>;
    /// Stops the VMM (kill if needed) and reaps it.
    fn stop(&mut self);
    /// The VMM's view of the vCPUs' and devices' interrupt state (registers, pending
    /// events, local APIC, serial, interrupt controllers), as text for a failure report.
    ///
    /// # Errors
    ///
    /// Why the state could not be had.
    fn dump_state(&mut self) -> Result<String, VmmError>;
}

/// `Some("<name> exited (<status>); <what> tail: <last 5 lines of log>")` once `child` has
/// exited, `None` while it runs: the [`VmmProcess::exited`] of VMMs that log to a file.
pub fn exit_with_log_tail(
    child: &mut std::process::Child,
    name: &str,
    what: &str,
    log: &std::path::Path,
) -> Option<String> {
    match child.try_wait() {
        Ok(Some(status)) => {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(5).collect();
            Some(format!(
                "{name} exited ({status}); {what} tail: {}",
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            ))
        }
        _ => None,
    }
}

/// Resident set size of a host process in bytes, from `/proc/PID/smaps_rollup`.
///
/// # Errors
///
/// Text of the I/O or parse failure.
pub fn rss_bytes(pid: u32) -> Result<u64, String> {
    let path = format!("/proc/{pid}/smaps_rollup");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    parse_rss_kb(&text)
        .map(|kb| kb.saturating_mul(1024))
        .ok_or_else(|| format!("{path}: no Rss: line"))
}

/// The `Rss:` value (kB) of a smaps_rollup text.
pub fn parse_rss_kb(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("Rss:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
#[expect(
    clippy::unwrap_used,
    reason = "a test fails loudly on any unexpected error"
)]
mod tests {
    use super::*;

    #[test]
    fn rss_parse() {
        let t = "55d0-7ff [rollup]\nRss:              123456 kB\nPss:  1 kB\n";
        assert_eq!(parse_rss_kb(t), Some(123456));
        assert_eq!(parse_rss_kb("Pss: 1 kB"), None);
    }

    #[test]
    fn a_traced_vmm_logs_to_the_local_work_directory() {
        let mut spec = VmSpec {
            work_dir: "/tmp/w".into(),
            log_dir: "/share/logs".into(),
            ..VmSpec::for_tests()
        };
        assert_eq!(
            spec.stderr_log("vmm"),
            PathBuf::from("/share/logs/t.vmm-stderr.log")
        );
        spec.trace = true;
        assert_eq!(
            spec.stderr_log("qemu"),
            PathBuf::from("/tmp/w/t.qemu-stderr.log")
        );
    }

    #[test]
    fn an_exited_vmm_is_described_with_the_tail_of_its_log() {
        let log = std::env::temp_dir().join(format!("guest-tests-exit-{}.log", std::process::id()));
        std::fs::write(&log, "l1\nl2\nl3\nl4\nl5\nl6\nl7\n").unwrap();
        let mut running = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        assert_eq!(
            exit_with_log_tail(&mut running, "vmm", "stderr", &log),
            None
        );
        running.kill().unwrap();
        let mut done = std::process::Command::new("true").spawn().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let text = loop {
            if let Some(t) = exit_with_log_tail(&mut done, "vmm", "stderr", &log) {
                break t;
            }
            assert!(std::time::Instant::now() < deadline, "true did not exit");
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        let _ = running.wait();
        let _ = std::fs::remove_file(&log);
        assert!(
            text.starts_with("vmm exited (exit status: 0); stderr tail: "),
            "{text}"
        );
        assert!(text.ends_with("l3 | l4 | l5 | l6 | l7"), "{text}");
    }

    #[test]
    fn own_rss_is_readable() {
        let rss = rss_bytes(std::process::id()).unwrap();
        assert!(rss > 0);
    }
}
