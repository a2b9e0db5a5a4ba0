//! This project's VMM (`vmm/`) as the VMM under test.
//!
//! Its control API is HTTP/JSON over a Unix socket: `PUT /v1/memory
//! {"requested_size": N}` resizes, `GET /v1/memory` answers JSON with `plugged_size`,
//! `requested_size`, `region_addr`, `region_size`, `block_size` (`crates/vmm-api`'s
//! `MemoryStatus`). The guest console is the VMM's stdin/stdout. The onlining policy
//! the harness puts on the command line is handed to the VMM as `--guest-online` (so
//! its own default path is what runs), and a guest reboot restarts the VM in place
//! (`--on-reboot restart`), as QEMU does.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::vmm::{
    exit_with_log_tail, ConsolePipes, DeviceSizes, VmSpec, Vmm, VmmError, VmmProcess,
};

/// Our VMM as the VMM under test.
#[derive(Debug, Clone)]
pub struct Ours {
    /// The `vmm` binary.
    pub binary: PathBuf,
    /// Which form of the guest kernel it boots.
    pub kernel: KernelForm,
}

/// The form of the guest kernel our VMM boots (it takes both).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KernelForm {
    /// The distribution's bzImage (`VmSpec::kernel`), as QEMU boots it.
    #[default]
    BzImage,
    /// The uncompressed ELF `vmlinux` (`VmSpec::vmlinux`), as Firecracker boots it.
    Elf,
}

impl KernelForm {
    /// From `bzimage` or `elf`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "bzimage" => Some(Self::BzImage),
            "elf" => Some(Self::Elf),
            _ => None,
        }
    }
}

impl Ours {
    /// The command line for `spec` with the API on `socket`.
    pub fn args(&self, spec: &VmSpec, socket: &Path) -> Vec<String> {
        let (online, cmdline) = split_online_policy(&spec.cmdline);
        let kernel = match self.kernel {
            KernelForm::BzImage => spec.kernel.clone(),
            KernelForm::Elf => spec.vmlinux(),
        };
        let mut a = vec![
            "run".into(),
            "--kernel".into(),
            kernel.display().to_string(),
            "--initrd".into(),
            spec.initrd.display().to_string(),
            "--cmdline".into(),
            cmdline,
            "--cpus".into(),
            spec.cpus.to_string(),
            "--memory".into(),
            format!("{}M", spec.boot_mem >> 20),
            "--hotplug-size".into(),
            format!("{}M", spec.hotplug_size >> 20),
            "--block-size".into(),
            format!("{}M", spec.block_size >> 20),
            "--guest-online".into(),
            online.into(),
            "--on-reboot".into(),
            "restart".into(),
            "--api-socket".into(),
            socket.display().to_string(),
        ];
        if !spec.kvm_pv_off.is_empty() {
            a.push(format!("--kvm-pv-off={}", spec.kvm_pv_off.join(",")));
        }
        if spec.balloon {
            a.push("--balloon".into());
        }
        if let Some(policy) = &spec.autosize {
            a.push(format!("--autosize={policy}"));
        }
        if spec.populate {
            a.push("--populate=on".into());
        }
        a
    }
}

/// Maps the onlining parameters of a harness command line to the VMM's `--guest-online`
/// value and returns the command line without them.
pub fn split_online_policy(cmdline: &str) -> (&'static str, String) {
    let words: Vec<&str> = cmdline.split_whitespace().collect();
    let has = |w: &str| words.contains(&w);
    let online = if has("memory_hotplug.online_policy=auto-movable") {
        "auto-movable"
    } else if has("memhp_default_state=online_movable") {
        "movable"
    } else if has("memhp_default_state=offline") {
        "none"
    } else {
        "kernel"
    };
    // `online_kernel` has no `--guest-online` value (the VMM does not offer ZONE_NORMAL
    // onlining, where unplug is unreliable): it stays on the command line, as an operator
    // would pass it.
    let rest: Vec<&str> = words
        .into_iter()
        .filter(|w| {
            (!w.starts_with("memhp_default_state=") || *w == "memhp_default_state=online_kernel")
                && !w.starts_with("memory_hotplug.online_policy=")
        })
        .collect();
    (online, rest.join(" "))
}

impl Vmm for Ours {
    fn name(&self) -> &str {
        "ours"
    }

    fn start(&self, spec: &VmSpec) -> Result<Box<dyn VmmProcess>, VmmError> {
        let socket = spec.work_dir.join(format!("{}.api", spec.name));
        let _ = std::fs::remove_file(&socket);
        let stderr_path = spec.stderr_log("vmm");
        let stderr = File::create(&stderr_path).map_err(|source| VmmError::Spawn {
            binary: format!("(stderr log {})", stderr_path.display()),
            source,
        })?;
        let args = self.args(spec, &socket);
        log::info!("{} {}", self.binary.display(), args.join(" "));
        let mut child = Command::new(&self.binary)
            .args(&args)
            .env(
                "RUST_LOG",
                if spec.trace {
                    "info,vmm=debug,virtio_mem=trace,vmm::devices::virtio_mem=trace".into()
                } else {
                    std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into())
                },
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .map_err(|source| VmmError::Spawn {
                binary: self.binary.display().to_string(),
                source,
            })?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if UnixStream::connect(&socket).is_ok() {
                break;
            }
            let exited = child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                let err = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                return Err(VmmError::Connect {
                    path: socket.display().to_string(),
                    reason: match exited {
                        Some(st) => format!("vmm exited ({st}); stderr: {}", err.trim()),
                        None => format!("no API socket after 60 s; stderr: {}", err.trim()),
                    },
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Box::new(OursProcess {
            child,
            api: ApiClient { socket },
            stderr_path,
            binary: self.binary.clone(),
        }))
    }
}

/// Client of the VMM's HTTP/JSON API on a Unix socket (one request per connection).
#[derive(Debug, Clone)]
pub struct ApiClient {
    /// The socket path.
    pub socket: PathBuf,
}

impl ApiClient {
    /// Sends one request; returns (status code, body).
    ///
    /// # Errors
    ///
    /// [`VmmError::Connect`] or [`VmmError::Control`] on I/O or HTTP syntax trouble.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<(u16, String), VmmError> {
        let mut s = UnixStream::connect(&self.socket).map_err(|e| VmmError::Connect {
            path: self.socket.display().to_string(),
            reason: e.to_string(),
        })?;
        let ctl = |e: std::io::Error| VmmError::Control(format!("{method} {path}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(ctl)?;
        let body = body.unwrap_or("");
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(request.as_bytes()).map_err(ctl)?;
        let mut reader = BufReader::new(s);
        let mut status_line = String::new();
        reader.read_line(&mut status_line).map_err(ctl)?;
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| VmmError::Control(format!("bad HTTP status line: {status_line:?}")))?;
        let mut length = None;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).map_err(ctl)? == 0 || h.trim().is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.trim().eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse::<usize>().ok();
                }
            }
        }
        let mut out = Vec::new();
        // A 204 or 304 answer has no body whatever its headers say, and a server that keeps
        // the connection open after it (Firecracker's) would otherwise hold the read until
        // its timeout.
        let bodiless = status == 204 || status == 304;
        match length {
            _ if bodiless => {}
            Some(n) => {
                out.resize(n, 0);
                reader.read_exact(&mut out).map_err(ctl)?;
            }
            None => {
                reader.read_to_end(&mut out).map_err(ctl)?;
            }
        }
        Ok((status, String::from_utf8_lossy(&out).into_owned()))
    }

    /// [`ApiClient::request`] that wants a 2xx answer and returns its body.
    ///
    /// # Errors
    ///
    /// [`VmmError::Refused`] (naming the request and the answer) on any other status, else
    /// as [`ApiClient::request`].
    pub fn request_ok(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<String, VmmError> {
        let (status, answer) = self.request(method, path, body)?;
        if (200..300).contains(&status) {
            Ok(answer)
        } else {
            Err(VmmError::Refused {
                command: format!(
                    "{method} {path}{}",
                    body.map(|b| format!(" {b}")).unwrap_or_default()
                ),
                answer: format!("HTTP {status}: {answer}"),
            })
        }
    }

    /// `PUT /v1/memory {"requested_size": N}`.
    ///
    /// # Errors
    ///
    /// [`VmmError::Refused`] on a non-2xx answer, else as [`ApiClient::request`].
    pub fn resize(&self, requested: u64) -> Result<(), VmmError> {
        let body = format!("{{\"requested_size\": {requested}}}");
        self.request_ok("PUT", "/v1/memory", Some(&body))
            .map(|_| ())
    }

    /// `GET /v1/memory`.
    ///
    /// # Errors
    ///
    /// [`VmmError::Refused`] on a non-2xx answer, [`VmmError::Control`] on bad JSON.
    pub fn sizes(&self) -> Result<DeviceSizes, VmmError> {
        parse_memory(&self.request_ok("GET", "/v1/memory", None)?)
    }

    /// `GET /v1/memory` as JSON.
    ///
    /// # Errors
    ///
    /// [`VmmError::Refused`] on a non-2xx answer, [`VmmError::Control`] on bad JSON.
    pub fn status_json(&self) -> Result<Value, VmmError> {
        let answer = self.request_ok("GET", "/v1/memory", None)?;
        serde_json::from_str(&answer)
            .map_err(|e| VmmError::Control(format!("GET /v1/memory: invalid JSON ({e}): {answer}")))
    }
}

/// Parses the `GET /v1/memory` body.
///
/// # Errors
///
/// [`VmmError::Control`] when it is not JSON or lacks `plugged_size`/`requested_size`.
pub fn parse_memory(body: &str) -> Result<DeviceSizes, VmmError> {
    let v: Value = serde_json::from_str(body)
        .map_err(|e| VmmError::Control(format!("GET /v1/memory: invalid JSON ({e}): {body}")))?;
    let num = |k: &str| v.get(k).and_then(Value::as_u64);
    let need = |k: &str| {
        num(k).ok_or_else(|| VmmError::Control(format!("GET /v1/memory: no '{k}' in {body}")))
    };
    Ok(DeviceSizes {
        addr: num("region_addr").or_else(|| num("addr")),
        region_size: num("region_size").unwrap_or(0),
        block_size: num("block_size").unwrap_or(0),
        plugged: need("plugged_size")?,
        requested: need("requested_size")?,
    })
}

/// A running instance of our VMM.
pub struct OursProcess {
    /// The VMM process (console on its stdin/stdout).
    pub child: Child,
    /// Its API.
    pub api: ApiClient,
    /// Where its stderr (log) goes.
    pub stderr_path: PathBuf,
    /// The `vmm` binary, for its client commands.
    pub binary: PathBuf,
}

/// How long our VMM gets to print its state dump.
const DUMP_TIMEOUT: Duration = Duration::from_secs(5);

/// The last complete `vmm-dump:` block (begin to end) of `log` after byte `from`.
pub fn last_dump(log: &str, from: usize) -> Option<String> {
    let tail = log.get(from..)?;
    let begin = tail.rfind("vmm-dump: begin")?;
    let block = &tail[begin..];
    let end = block.find("vmm-dump: end")?;
    Some(block[..end + "vmm-dump: end".len()].to_string())
}

impl VmmProcess for OursProcess {
    fn dump_state(&mut self) -> Result<String, VmmError> {
        let before = std::fs::metadata(&self.stderr_path)
            .map(|m| usize::try_from(m.len()).unwrap_or(0))
            .unwrap_or(0);
        let pid = libc::pid_t::try_from(self.child.id())
            .map_err(|_| VmmError::Control("VMM pid out of range".into()))?;
        // SAFETY: kill(2) with the pid of our own child, which is not reaped yet (so the
        // pid cannot have been reused), and a signal the VMM handles (SIGUSR1: dump).
        if unsafe { libc::kill(pid, libc::SIGUSR1) } != 0 {
            return Err(VmmError::Control(format!(
                "cannot signal the VMM for its state dump: {}",
                std::io::Error::last_os_error()
            )));
        }
        let deadline = Instant::now() + DUMP_TIMEOUT;
        while Instant::now() < deadline {
            let log = std::fs::read_to_string(&self.stderr_path).unwrap_or_default();
            if let Some(d) = last_dump(&log, before.min(log.len())) {
                return Ok(d);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(VmmError::Control(format!(
            "the VMM printed no complete state dump within {} s of SIGUSR1 (stderr: {})",
            DUMP_TIMEOUT.as_secs(),
            self.stderr_path.display()
        )))
    }

    fn take_console(&mut self) -> Option<ConsolePipes> {
        let out = self.child.stdout.take()?;
        let inp = self.child.stdin.take()?;
        Some((Box::new(out), Box::new(inp)))
    }

    fn resize(&mut self, requested: u64) -> Result<(), VmmError> {
        self.api.resize(requested)
    }

    fn sizes(&mut self) -> Result<DeviceSizes, VmmError> {
        self.api.sizes()
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn status_json(&mut self) -> Result<Option<Value>, VmmError> {
        self.api.status_json().map(Some)
    }

    fn resize_wait_cli(
        &mut self,
        size: u64,
        timeout_s: u64,
    ) -> Result<Option<(i32, String)>, VmmError> {
        let out = Command::new(&self.binary)
            .args(["resize", "--api-socket"])
            .arg(&self.api.socket)
            .args([
                "--wait",
                "--timeout",
                &timeout_s.to_string(),
                &size.to_string(),
            ])
            .output()
            .map_err(|source| VmmError::Spawn {
                binary: self.binary.display().to_string(),
                source,
            })?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        Ok(Some((out.status.code().unwrap_or(-1), text)))
    }

    fn exited(&mut self) -> Option<String> {
        exit_with_log_tail(&mut self.child, "vmm", "stderr", &self.stderr_path)
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OursProcess {
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
    use std::os::unix::net::UnixListener;

    #[test]
    fn memory_json() {
        let s = parse_memory(
            r#"{"region_addr": 4294967296, "plugged_size": 1073741824, "requested_size": 2147483648, "region_size": 4294967296, "block_size": 2097152}"#,
        )
        .unwrap();
        assert_eq!(s.plugged, 1 << 30);
        assert_eq!(s.requested, 2 << 30);
        assert_eq!(s.addr, Some(1 << 32));
        assert!(parse_memory(r#"{"requested_size": 1}"#).is_err());
        assert!(parse_memory("not json").is_err());
    }

    #[test]
    fn http_round_trip_against_a_fake_vmm() {
        let dir = std::env::temp_dir().join(format!("guest-tests-api-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("api.sock");
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket).unwrap();
        let server = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for answer in [
                "HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n".to_string(),
                {
                    let body = r#"{"plugged_size": 0, "requested_size": 1024}"#;
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    )
                },
                "HTTP/1.1 400 Bad Request\r\nContent-Length: 5\r\n\r\nnope!".to_string(),
            ] {
                let (mut c, _) = listener.accept().unwrap();
                // Read the whole request (headers, then Content-Length bytes of body).
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let n = c.read(&mut buf).unwrap();
                    req.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&req).into_owned();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("Content-Length: "))
                            .map_or(0, |v| v.trim().parse().unwrap());
                        if body.len() >= len {
                            break;
                        }
                    }
                    assert!(n > 0, "client closed early");
                }
                seen.push(String::from_utf8_lossy(&req).into_owned());
                c.write_all(answer.as_bytes()).unwrap();
            }
            seen
        });
        let api = ApiClient { socket };
        api.resize(1024).unwrap();
        assert_eq!(api.sizes().unwrap().requested, 1024);
        let err = api.resize(3).unwrap_err();
        assert!(err.to_string().contains("HTTP 400"), "{err}");
        let seen = server.join().unwrap();
        assert!(
            seen[0].starts_with("PUT /v1/memory HTTP/1.1"),
            "{}",
            seen[0]
        );
        assert!(
            seen[0].ends_with(r#"{"requested_size": 1024}"#),
            "{}",
            seen[0]
        );
        assert!(seen[1].starts_with("GET /v1/memory"), "{}", seen[1]);
    }

    #[test]
    fn a_204_without_length_on_a_kept_connection_does_not_wait_for_the_close() {
        let dir = std::env::temp_dir().join(format!("guest-tests-204-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("api.sock");
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket).unwrap();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let server = std::thread::spawn(move || {
            let (mut c, _) = listener.accept().unwrap();
            let mut buf = [0u8; 4096];
            let _ = c.read(&mut buf).unwrap();
            c.write_all(b"HTTP/1.1 204 No Content\r\nServer: Firecracker API\r\n\r\n")
                .unwrap();
            // Keep the connection open, as a keep-alive server does, until the client is
            // done (or long past the point where waiting for the close would show).
            let _ = done_rx.recv_timeout(Duration::from_secs(60));
        });
        let api = ApiClient { socket };
        let t = Instant::now();
        let (status, body) = api.request("PATCH", "/hotplug/memory", Some("{}")).unwrap();
        let _ = done_tx.send(());
        server.join().unwrap();
        assert_eq!((status, body.as_str()), (204, ""));
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    }

    #[test]
    fn online_policy_goes_to_the_vmm_flag() {
        let (o, c) = split_online_policy("console=ttyS0 quiet memhp_default_state=online_movable");
        assert_eq!((o, c.as_str()), ("movable", "console=ttyS0 quiet"));
        let (o, c) = split_online_policy(
            "console=ttyS0 memhp_default_state=online memory_hotplug.online_policy=auto-movable",
        );
        assert_eq!((o, c.as_str()), ("auto-movable", "console=ttyS0"));
        assert_eq!(
            split_online_policy("a memhp_default_state=offline").0,
            "none"
        );
        assert_eq!(split_online_policy("a b").0, "kernel");
        let (o, c) = split_online_policy("a memhp_default_state=online_kernel");
        assert_eq!(
            (o, c.as_str()),
            ("kernel", "a memhp_default_state=online_kernel")
        );
    }

    #[test]
    fn populate_asks_for_it() {
        let ours = Ours {
            binary: "vmm".into(),
            kernel: KernelForm::BzImage,
        };
        let sock = Path::new("/tmp/s");
        assert!(!ours
            .args(&VmSpec::for_tests(), sock)
            .iter()
            .any(|a| a.starts_with("--populate")));
        let spec = VmSpec {
            populate: true,
            ..VmSpec::for_tests()
        };
        assert!(ours
            .args(&spec, sock)
            .contains(&"--populate=on".to_string()));
    }

    #[test]
    fn elf_form_boots_the_vmlinux_beside_the_bzimage() {
        let spec = VmSpec {
            kernel: "/img/guest-6.1/vmlinuz".into(),
            ..VmSpec::for_tests()
        };
        let kernel_arg = |form| {
            let a = Ours {
                binary: "vmm".into(),
                kernel: form,
            }
            .args(&spec, Path::new("/tmp/s"));
            let i = a.iter().position(|x| x == "--kernel").unwrap();
            a[i + 1].clone()
        };
        assert_eq!(kernel_arg(KernelForm::BzImage), "/img/guest-6.1/vmlinuz");
        assert_eq!(kernel_arg(KernelForm::Elf), "/img/guest-6.1/vmlinux");
        assert_eq!(KernelForm::parse("elf"), Some(KernelForm::Elf));
        assert_eq!(KernelForm::parse("bzImage"), None);
    }

    #[test]
    fn missing_binary_is_a_spawn_error() {
        let spec = VmSpec {
            hotplug_size: 1 << 30,
            ..VmSpec::for_tests()
        };
        let err = Ours {
            binary: "/nonexistent/vmm".into(),
            kernel: KernelForm::BzImage,
        }
        .start(&spec)
        .err()
        .unwrap();
        assert!(matches!(err, VmmError::Spawn { .. }), "{err}");
    }
}
