//! Firecracker as a peer in the resize bench (`ci/resize-bench --firecracker PATH`).
//!
//! Firecracker is not built or shipped by this project: the operator builds it from its
//! public sources (a release with virtio-mem, 1.14 or later) and passes the binary. It
//! boots the ELF `vmlinux` (its only x86-64 kernel format) from a configuration file
//! with a `memory-hotplug` section (its virtio-mem device over virtio-mmio), resizes with
//! `PATCH /hotplug/memory {"requested_size_mib": N}` and reports with `GET
//! /hotplug/memory` on its API socket. The guest console is its stdin/stdout; its own log
//! goes to a file (it would otherwise share stdout with the console).

use std::fs::File;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::ours::ApiClient;
use crate::vmm::{
    exit_with_log_tail, ConsolePipes, DeviceSizes, VmSpec, Vmm, VmmError, VmmProcess,
};

const MIB: u64 = 1 << 20;

/// Firecracker's smallest (and default) slot size: the granularity at which it maps the
/// hotplug region into KVM.
pub const SLOT_MIB: u64 = 128;

/// Firecracker as a VMM under test.
#[derive(Debug, Clone)]
pub struct Firecracker {
    /// The `firecracker` binary.
    pub binary: PathBuf,
}

/// Firecracker's configuration file for `spec`: boot source (ELF vmlinux, initramfs,
/// the harness's command line), vCPUs and boot RAM, and the virtio-mem region.
///
/// # Errors
///
/// Text naming the size that Firecracker cannot express (it counts in whole MiB).
pub fn config(spec: &VmSpec) -> Result<Value, String> {
    let mib = |what: &str, b: u64| {
        if b % MIB == 0 {
            Ok(b / MIB)
        } else {
            Err(format!("{what} of {b} bytes is not a whole number of MiB"))
        }
    };
    Ok(json!({
        "boot-source": {
            "kernel_image_path": spec.vmlinux().display().to_string(),
            "initrd_path": spec.initrd.display().to_string(),
            "boot_args": spec.cmdline,
        },
        "drives": [],
        "machine-config": {
            "vcpu_count": spec.cpus,
            "mem_size_mib": mib("boot RAM", spec.boot_mem)?,
        },
        "memory-hotplug": {
            "total_size_mib": mib("hotplug region", spec.hotplug_size)?,
            "slot_size_mib": SLOT_MIB,
            "block_size_mib": mib("block size", spec.block_size)?,
        },
    }))
}

/// Firecracker's `--id` for a spec name: it takes 1 to 64 characters, letters, digits and
/// `-` only (and aborts on anything else), so the rest become `-`.
pub fn instance_id(name: &str) -> String {
    let id: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(64)
        .collect();
    if id.is_empty() {
        "guest".into()
    } else {
        id
    }
}

/// Parses `GET /hotplug/memory` (sizes in MiB).
///
/// # Errors
///
/// [`VmmError::Control`] when it is not JSON or lacks the plugged or requested size.
pub fn parse_status(body: &str) -> Result<DeviceSizes, VmmError> {
    let v: Value = serde_json::from_str(body).map_err(|e| {
        VmmError::Control(format!("GET /hotplug/memory: invalid JSON ({e}): {body}"))
    })?;
    let mib = |k: &str| {
        v.get(k)
            .and_then(Value::as_u64)
            .map(|m| m.saturating_mul(MIB))
    };
    let need = |k: &str| {
        mib(k).ok_or_else(|| VmmError::Control(format!("GET /hotplug/memory: no '{k}' in {body}")))
    };
    Ok(DeviceSizes {
        addr: None,
        region_size: mib("total_size_mib").unwrap_or(0),
        block_size: mib("block_size_mib").unwrap_or(0),
        plugged: need("plugged_size_mib")?,
        requested: need("requested_size_mib")?,
    })
}

impl Vmm for Firecracker {
    fn name(&self) -> &str {
        "firecracker"
    }

    fn start(&self, spec: &VmSpec) -> Result<Box<dyn VmmProcess>, VmmError> {
        let socket = spec.work_dir.join(format!("{}.fc.sock", spec.name));
        let _ = std::fs::remove_file(&socket);
        let spawn_err = |what: &Path, source| VmmError::Spawn {
            binary: format!("(firecracker {})", what.display()),
            source,
        };
        let config_path = spec.work_dir.join(format!("{}.fc.json", spec.name));
        let text = config(spec).map_err(|e| VmmError::Control(format!("firecracker: {e}")))?;
        std::fs::write(&config_path, text.to_string()).map_err(|e| spawn_err(&config_path, e))?;
        let stderr_path = spec.stderr_log("firecracker");
        let stderr = File::create(&stderr_path).map_err(|e| spawn_err(&stderr_path, e))?;
        let log_path = spec.log_dir.join(format!("{}.firecracker.log", spec.name));
        let _ = std::fs::remove_file(&log_path);
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--api-sock")
            .arg(&socket)
            .arg("--config-file")
            .arg(&config_path)
            .arg("--log-path")
            .arg(&log_path)
            .args(["--level", "Info", "--id", &instance_id(&spec.name)])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr);
        log::info!("{cmd:?}");
        let mut child = cmd.spawn().map_err(|source| VmmError::Spawn {
            binary: self.binary.display().to_string(),
            source,
        })?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while UnixStream::connect(&socket).is_err() {
            let exited = child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                // Before its logger is set up Firecracker writes to stdout (a panic
                // there included); the process is gone, so this read ends.
                let mut out = String::new();
                if let Some(mut o) = child.stdout.take() {
                    let _ = o.read_to_string(&mut out);
                }
                return Err(VmmError::Connect {
                    path: socket.display().to_string(),
                    reason: format!(
                        "{}; its log ({}): {}; its stdout: {}",
                        exited.map_or("no API socket after 60 s".into(), |s| format!(
                            "firecracker exited ({s})"
                        )),
                        log_path.display(),
                        log.trim(),
                        out.trim()
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Box::new(FirecrackerProcess {
            child,
            api: ApiClient { socket },
            log_path,
        }))
    }
}

/// A running Firecracker.
pub struct FirecrackerProcess {
    child: Child,
    api: ApiClient,
    log_path: PathBuf,
}

impl VmmProcess for FirecrackerProcess {
    fn take_console(&mut self) -> Option<ConsolePipes> {
        let out = self.child.stdout.take()?;
        let inp = self.child.stdin.take()?;
        Some((Box::new(out), Box::new(inp)))
    }

    fn resize(&mut self, requested: u64) -> Result<(), VmmError> {
        if requested % MIB != 0 {
            return Err(VmmError::Control(format!(
                "firecracker takes whole MiB; {requested} bytes is not"
            )));
        }
        let body = format!("{{\"requested_size_mib\": {}}}", requested / MIB);
        self.api
            .request_ok("PATCH", "/hotplug/memory", Some(&body))
            .map(|_| ())
    }

    fn sizes(&mut self) -> Result<DeviceSizes, VmmError> {
        parse_status(&self.api.request_ok("GET", "/hotplug/memory", None)?)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn exited(&mut self) -> Option<String> {
        exit_with_log_tail(&mut self.child, "firecracker", "log", &self.log_path)
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn dump_state(&mut self) -> Result<String, VmmError> {
        Err(VmmError::Control(
            "firecracker has no state dump; its log is in the log directory".into(),
        ))
    }
}

impl Drop for FirecrackerProcess {
    fn drop(&mut self) {
        self.stop();
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
    fn the_config_boots_the_elf_kernel_with_the_region_in_mib() {
        let spec = VmSpec {
            kernel: "/img/bzImage".into(),
            ..VmSpec::for_tests()
        };
        let c = config(&spec).unwrap();
        assert_eq!(c["boot-source"]["kernel_image_path"], "/img/vmlinux");
        assert_eq!(c["boot-source"]["boot_args"], "console=ttyS0");
        assert_eq!(c["machine-config"]["mem_size_mib"], 512);
        assert_eq!(c["machine-config"]["vcpu_count"], 1);
        assert_eq!(c["memory-hotplug"]["total_size_mib"], 4096);
        assert_eq!(c["memory-hotplug"]["block_size_mib"], 2);
    }

    #[test]
    fn sizes_it_cannot_express_are_refused() {
        let spec = VmSpec {
            block_size: 3 << 19,
            ..VmSpec::for_tests()
        };
        let e = config(&spec).unwrap_err();
        assert!(e.contains("block size"), "{e}");
    }

    #[test]
    fn instance_ids_are_what_firecracker_accepts() {
        assert_eq!(instance_id("6.1-movable-0-bench0"), "6-1-movable-0-bench0");
        assert_eq!(instance_id(""), "guest");
        assert_eq!(instance_id(&"x".repeat(100)).len(), 64);
    }

    #[test]
    fn status_is_read_in_mib() {
        let s = parse_status(
            r#"{"total_size_mib": 4096, "slot_size_mib": 128, "block_size_mib": 2,
                "plugged_size_mib": 1024, "requested_size_mib": 2048}"#,
        )
        .unwrap();
        assert_eq!(s.plugged, 1 << 30);
        assert_eq!(s.requested, 2 << 30);
        assert_eq!(s.region_size, 4 << 30);
        assert_eq!(s.block_size, 2 << 20);
        assert!(parse_status(r#"{"total_size_mib": 4096}"#).is_err());
        assert!(parse_status("not json").is_err());
    }
}
