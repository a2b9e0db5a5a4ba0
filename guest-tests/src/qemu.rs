//! The reference VMM: QEMU with `virtio-mem-pci` backed by `memory-backend-ram`
//! (private anonymous memory, so unplug discards with `MADV_DONTNEED` and RSS falls),
//! resized through QMP (`qom-set /machine/peripheral/<id> requested-size`), sizes read
//! with `query-memory-devices`.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::vmm::{ConsolePipes, DeviceSizes, VmSpec, Vmm, VmmError, VmmProcess};

/// The QOM id of the virtio-mem device.
pub const DEVICE_ID: &str = "vmem0";

/// QEMU as the VMM under test.
#[derive(Debug, Clone)]
pub struct Qemu {
    /// The `qemu-system-x86_64` binary.
    pub binary: PathBuf,
    /// `-accel` value (`kvm`; `tcg` for a software-only reference run).
    pub accel: String,
}

impl Default for Qemu {
    fn default() -> Self {
        Self {
            binary: PathBuf::from("qemu-system-x86_64"),
            accel: "kvm".to_string(),
        }
    }
}

/// QEMU's `-cpu` property for one of our VMM's `--kvm-pv-off` feature names.
pub fn qemu_pv_property(name: &str) -> Option<&'static str> {
    Some(match name {
        "async-pf" => "kvm-asyncpf",
        "steal-time" => "kvm-steal-time",
        "pv-eoi" => "kvm-pv-eoi",
        "pv-unhalt" => "kvm-pv-unhalt",
        "pv-tlb-flush" => "kvm-pv-tlb-flush",
        "async-pf-vmexit" => "kvm-asyncpf-vmexit",
        "pv-send-ipi" => "kvm-pv-ipi",
        "poll-control" => "kvm-poll-control",
        "pv-sched-yield" => "kvm-pv-sched-yield",
        "async-pf-int" => "kvm-asyncpf-int",
        _ => return None,
    })
}

impl Qemu {
    /// The QEMU command line for `spec`, with QMP on `qmp`.
    pub fn args(&self, spec: &VmSpec, qmp: &Path) -> Vec<String> {
        let mib = |b: u64| b / (1024 * 1024);
        let mut a: Vec<String> = vec!["-accel".into(), self.accel.clone()];
        if self.accel == "kvm" {
            let mut cpu = String::from("host");
            for f in &spec.kvm_pv_off {
                if let Some(prop) = qemu_pv_property(f) {
                    cpu.push_str(&format!(",{prop}=off"));
                }
            }
            a.extend(["-cpu".into(), cpu]);
        }
        a.extend([
            "-machine".into(),
            "pc".into(),
            "-m".into(),
            format!(
                "{}M,maxmem={}M",
                mib(spec.boot_mem),
                mib(spec.boot_mem.saturating_add(spec.hotplug_size))
            ),
            "-smp".into(),
            spec.cpus.to_string(),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-serial".into(),
            "stdio".into(),
            "-monitor".into(),
            "none".into(),
            "-kernel".into(),
            spec.kernel.display().to_string(),
            "-initrd".into(),
            spec.initrd.display().to_string(),
            "-append".into(),
            spec.cmdline.clone(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", qmp.display()),
            "-object".into(),
            format!(
                "memory-backend-ram,id=vmem0-mem,size={}M,reserve=off",
                mib(spec.hotplug_size)
            ),
            "-device".into(),
            format!(
                "virtio-mem-pci,id={DEVICE_ID},memdev=vmem0-mem,block-size={}M,requested-size=0{}",
                mib(spec.block_size),
                if spec.populate { ",prealloc=on" } else { "" }
            ),
        ]);
        if spec.balloon {
            a.extend([
                "-device".into(),
                "virtio-balloon-pci,id=balloon0,free-page-reporting=on".into(),
            ]);
        }
        if spec.trace {
            // Trace lines on stderr as `PID@SECONDS.MICROS:virtio_mem_... args`.
            a.extend([
                "-trace".into(),
                "virtio_mem_*".into(),
                "-msg".into(),
                "timestamp=on".into(),
            ]);
        }
        a
    }
}

impl Vmm for Qemu {
    fn name(&self) -> &str {
        "qemu"
    }

    fn start(&self, spec: &VmSpec) -> Result<Box<dyn VmmProcess>, VmmError> {
        let qmp_path = spec.work_dir.join(format!("{}.qmp", spec.name));
        let _ = std::fs::remove_file(&qmp_path);
        let stderr_path = spec.stderr_log("qemu");
        let stderr = File::create(&stderr_path).map_err(|source| VmmError::Spawn {
            binary: format!("(stderr log {})", stderr_path.display()),
            source,
        })?;
        let args = self.args(spec, &qmp_path);
        log::info!("qemu {}", args.join(" "));
        let mut child = Command::new(&self.binary)
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .map_err(|source| VmmError::Spawn {
                binary: self.binary.display().to_string(),
                source,
            })?;
        match Qmp::connect(&qmp_path, Duration::from_secs(60), &mut child) {
            Ok(qmp) => Ok(Box::new(QemuProcess {
                child,
                qmp,
                stderr_path,
            })),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                let tail = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                Err(VmmError::Connect {
                    path: qmp_path.display().to_string(),
                    reason: format!("{e}; qemu stderr: {}", tail.trim()),
                })
            }
        }
    }
}

/// A QMP client (one command at a time, events skipped).
pub struct Qmp {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Qmp {
    /// Connects (retrying while QEMU starts) and leaves capabilities negotiation mode.
    ///
    /// # Errors
    ///
    /// [`VmmError::Connect`] when the socket does not come up in `timeout` or QEMU exits.
    pub fn connect(path: &Path, timeout: Duration, child: &mut Child) -> Result<Self, VmmError> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    if let Ok(Some(status)) = child.try_wait() {
                        return Err(VmmError::Connect {
                            path: path.display().to_string(),
                            reason: format!("qemu exited ({status})"),
                        });
                    }
                    if Instant::now() > deadline {
                        return Err(VmmError::Connect {
                            path: path.display().to_string(),
                            reason: e.to_string(),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        let io = |e: std::io::Error| VmmError::Connect {
            path: path.display().to_string(),
            reason: e.to_string(),
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(io)?;
        let reader = BufReader::new(stream.try_clone().map_err(io)?);
        let mut qmp = Self { stream, reader };
        qmp.read_value()?; // greeting
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn read_value(&mut self) -> Result<Value, VmmError> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|e| VmmError::Control(format!("QMP read: {e}")))?;
        if n == 0 {
            return Err(VmmError::Control("QMP socket closed".into()));
        }
        serde_json::from_str(&line)
            .map_err(|e| VmmError::Control(format!("QMP sent invalid JSON ({e}): {line}")))
    }

    /// Runs one command and returns its `return` value.
    ///
    /// # Errors
    ///
    /// [`VmmError::Refused`] on a QMP `error`, [`VmmError::Control`] on I/O trouble.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, VmmError> {
        let req = json!({"execute": command, "arguments": arguments});
        writeln!(self.stream, "{req}").map_err(|e| VmmError::Control(format!("QMP write: {e}")))?;
        loop {
            let v = self.read_value()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(VmmError::Refused {
                    command: req.to_string(),
                    answer: e.to_string(),
                });
            }
            // An asynchronous event (e.g. MEMORY_DEVICE_SIZE_CHANGE): skip.
            log::debug!("QMP event: {v}");
        }
    }
}

/// A running QEMU.
pub struct QemuProcess {
    child: Child,
    qmp: Qmp,
    stderr_path: PathBuf,
}

/// Parses `query-memory-devices` output for the virtio-mem device `id`.
pub fn parse_memory_devices(v: &Value, id: &str) -> Option<DeviceSizes> {
    let dev = v.as_array()?.iter().find(|d| {
        d.get("type").and_then(Value::as_str) == Some("virtio-mem")
            && d.pointer("/data/id").and_then(Value::as_str) == Some(id)
    })?;
    let num = |k: &str| dev.pointer(&format!("/data/{k}")).and_then(Value::as_u64);
    Some(DeviceSizes {
        addr: num("memaddr"),
        region_size: num("max-size")?,
        block_size: num("block-size")?,
        plugged: num("size")?,
        requested: num("requested-size")?,
    })
}

impl VmmProcess for QemuProcess {
    fn dump_state(&mut self) -> Result<String, VmmError> {
        let mut out = String::new();
        let cpus = self
            .qmp
            .execute("query-cpus-fast", json!({}))
            .ok()
            .and_then(|v| v.as_array().map(Vec::len))
            .unwrap_or(1);
        let mut commands = vec!["info registers -a".to_string(), "info pic".to_string()];
        commands.extend((0..cpus).map(|i| format!("info lapic {i}")));
        commands.push("info irq".into());
        for c in commands {
            let v = self
                .qmp
                .execute("human-monitor-command", json!({"command-line": c}))?;
            out.push_str(&format!("== {c}\n{}\n", v.as_str().unwrap_or("")));
        }
        Ok(out)
    }

    fn take_console(&mut self) -> Option<ConsolePipes> {
        let out = self.child.stdout.take()?;
        let inp = self.child.stdin.take()?;
        Some((Box::new(out), Box::new(inp)))
    }

    fn resize(&mut self, requested: u64) -> Result<(), VmmError> {
        self.qmp
            .execute(
                "qom-set",
                json!({
                    "path": format!("/machine/peripheral/{DEVICE_ID}"),
                    "property": "requested-size",
                    "value": requested,
                }),
            )
            .map(|_| ())
    }

    fn sizes(&mut self) -> Result<DeviceSizes, VmmError> {
        let v = self.qmp.execute("query-memory-devices", json!({}))?;
        parse_memory_devices(&v, DEVICE_ID).ok_or_else(|| {
            VmmError::Control(format!(
                "query-memory-devices has no virtio-mem '{DEVICE_ID}': {v}"
            ))
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => {
                let err = std::fs::read_to_string(&self.stderr_path).unwrap_or_default();
                Some(format!("qemu exited ({status}); stderr: {}", err.trim()))
            }
            _ => None,
        }
    }

    fn stop(&mut self) {
        let _ = self.qmp.execute("quit", json!({}));
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
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
    fn memory_devices_parse() {
        let v = json!([
            {"type": "dimm", "data": {"id": "d0"}},
            {"type": "virtio-mem", "data": {"id": "vmem0", "memaddr": 4294967296u64,
             "max-size": 4294967296u64, "block-size": 2097152, "size": 1073741824,
             "requested-size": 1073741824, "node": 0, "memdev": "/objects/vmem0-mem"}}
        ]);
        let s = parse_memory_devices(&v, "vmem0").unwrap();
        assert_eq!(s.addr, Some(1 << 32));
        assert_eq!(s.plugged, 1 << 30);
        assert_eq!(s.block_size, 2 << 20);
        assert!(parse_memory_devices(&v, "other").is_none());
    }

    #[test]
    fn command_line_has_device_and_sizes() {
        let spec = VmSpec {
            kvm_pv_off: vec!["pv-tlb-flush".into(), "unknown".into()],
            ..VmSpec::for_tests()
        };
        let a = Qemu::default()
            .args(&spec, Path::new("/tmp/q.qmp"))
            .join(" ");
        assert!(a.contains("-cpu host,kvm-pv-tlb-flush=off "), "{a}");
        assert!(a.contains("-m 512M,maxmem=4608M"), "{a}");
        assert!(a.contains("block-size=2M"), "{a}");
        assert!(
            a.contains("memory-backend-ram,id=vmem0-mem,size=4096M"),
            "{a}"
        );
        assert!(a.contains("-cpu host"), "{a}");
        assert!(!a.contains("prealloc"), "{a}");
        let spec = VmSpec {
            populate: true,
            ..VmSpec::for_tests()
        };
        let a = Qemu::default()
            .args(&spec, Path::new("/tmp/q.qmp"))
            .join(" ");
        assert!(a.contains("requested-size=0,prealloc=on"), "{a}");
    }
}
