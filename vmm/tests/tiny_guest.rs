//! Runs tiny hand-written real-mode guests on the host's KVM: port writes reach COM1, the
//! i8042 reset and the ACPI sleep register stop the VM with the right reason, and the
//! `vmm` binary stops cleanly on SIGTERM and SIGINT (a spinning guest). (These
//! machines' KVM cannot boot Linux; Linux boots are tested in the nested test host by
//! `ci/vmm-boot-test`.) A host may have no KVM, so the tests are `#[ignore]`d and
//! `ci/host-tests` runs them where `/dev/kvm` exists; run without it they fail.
#![expect(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress};
use vmm::exit::ExitReason;
use vmm::vm::Vm;

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);
impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

const CODE_ADDR: u64 = 0x1000;

/// Real-mode code that prints `text` on COM1, then runs `tail`.
fn program(text: &[u8], tail: &[u8]) -> Vec<u8> {
    let mut code = vec![0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    for &c in text {
        code.extend_from_slice(&[0xb0, c, 0xee]); // mov al, c; out dx, al
    }
    code.extend_from_slice(tail);
    code.push(0xf4); // hlt
    code
}

/// Fails the test, saying what to do, when `/dev/kvm` cannot be opened; `Vm::new`'s own
/// error would not say why the test needs it.
fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!(
            "cannot open /dev/kvm ({e}): these tests need KVM; run them with ci/host-tests \
             on a host where /dev/kvm exists and is accessible"
        );
    }
}

fn run(code: &[u8]) -> (ExitReason, Vec<u8>) {
    require_kvm();
    let sink = Sink::default();
    let vm = Vm::new(1, 64 << 20, Box::new(sink.clone())).unwrap();
    vm.memory()
        .write_slice(code, GuestAddress(CODE_ADDR))
        .unwrap();
    let vcpu = vm.vcpu(0).unwrap();
    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).unwrap();
    let regs = kvm_bindings::kvm_regs {
        rip: CODE_ADDR,
        rflags: 2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).unwrap();
    let reason = vm.run().unwrap();
    let out = sink.0.lock().unwrap().clone();
    (reason, out)
}

#[test]
#[ignore = "needs /dev/kvm: run by ci/host-tests where it exists"]
fn i8042_reset_is_a_reboot() {
    // mov al, 0xfe; out 0x64, al
    let (reason, out) = run(&program(b"hi\n", &[0xb0, 0xfe, 0xe6, 0x64]));
    assert_eq!(out, b"hi\n");
    assert_eq!(reason, ExitReason::Reboot);
}

#[test]
#[ignore = "needs /dev/kvm: run by ci/host-tests where it exists"]
fn acpi_s5_is_a_poweroff() {
    // mov dx, 0x600; mov al, (5 << 2) | 0x20; out dx, al
    let tail = [0xba, 0x00, 0x06, 0xb0, 0x34, 0xee];
    let (reason, out) = run(&program(b"bye", &tail));
    assert_eq!(out, b"bye");
    assert_eq!(reason, ExitReason::Poweroff);
}

#[test]
#[ignore = "needs /dev/kvm: run by ci/host-tests where it exists"]
fn acpi_reset_register_is_a_reboot() {
    // mov dx, 0x602; mov al, 1; out dx, al
    let tail = [0xba, 0x02, 0x06, 0xb0, 0x01, 0xee];
    let (reason, _) = run(&program(b"", &tail));
    assert_eq!(reason, ExitReason::Reboot);
}

#[test]
#[ignore = "needs /dev/kvm: run by ci/host-tests where it exists"]
fn unclaimed_ports_read_all_ones() {
    // in al, 0x80 (no device); out dx(0x3f8), al: prints 0xff.
    let (reason, out) = run(&program(b"", &[0xe4, 0x80, 0xee, 0xb0, 0xfe, 0xe6, 0x64]));
    assert_eq!(out, [0xff]);
    assert_eq!(reason, ExitReason::Reboot);
}

#[test]
#[ignore = "needs /dev/kvm: run by ci/host-tests where it exists"]
fn reset_vector_stub_reboots() {
    // Jump to the reset stub the way a BIOS reboot does: far jump to 0xf000:0xfff0.
    require_kvm();
    let sink = Sink::default();
    let vm = Vm::new(1, 64 << 20, Box::new(sink.clone())).unwrap();
    vmm::boot::write_reset_stub(vm.memory()).unwrap();
    vm.memory()
        .write_slice(&[0xea, 0xf0, 0xff, 0x00, 0xf0], GuestAddress(CODE_ADDR))
        .unwrap();
    let vcpu = vm.vcpu(0).unwrap();
    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).unwrap();
    let regs = kvm_bindings::kvm_regs {
        rip: CODE_ADDR,
        rflags: 2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).unwrap();
    assert_eq!(vm.run().unwrap(), ExitReason::Reboot);
}

/// A bzImage as the Linux boot protocol describes it (setup header with `HdrS`, version
/// 2.15, loaded high), whose 64-bit entry point (0x200 into the protected-mode part) is
/// `jmp $`: a guest that runs until the VMM stops it.
fn spinning_bzimage() -> Vec<u8> {
    let mut img = vec![0u8; 1024 + 0x400];
    img[0x1f1] = 1; // setup_sects: the setup part is 2 * 512 bytes
    img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    img[0x202..0x206].copy_from_slice(b"HdrS");
    img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    img[0x211] = 1; // loadflags: LOADED_HIGH
    img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
    img[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
    img[0x238..0x23c].copy_from_slice(&2048u32.to_le_bytes()); // cmdline_size
    img[1024 + 0x200..1024 + 0x202].copy_from_slice(&[0xeb, 0xfe]); // jmp $
    img
}

/// The terminal attributes of `fd`.
fn termios_of(fd: std::os::fd::RawFd) -> libc::termios {
    // SAFETY: termios is plain data, valid when zeroed; tcgetattr fills it for an open fd.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `t` is a valid, writable termios.
    assert_eq!(unsafe { libc::tcgetattr(fd, &mut t) }, 0, "tcgetattr");
    t
}

fn same_mode(a: &libc::termios, b: &libc::termios) -> bool {
    (a.c_iflag, a.c_oflag, a.c_cflag, a.c_lflag) == (b.c_iflag, b.c_oflag, b.c_cflag, b.c_lflag)
}

/// Runs the `vmm` binary on a spinning guest with a pseudo-terminal as its console and an
/// API socket, sends `signal` once it is up, and checks the clean stop: exit status 0,
/// vCPUs out of the guest, the API socket removed, the terminal mode restored.
fn stops_cleanly_on(signal: libc::c_int, name: &str) {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::time::{Duration, Instant};
    require_kvm();
    let dir = std::env::temp_dir().join(format!("vmm-stop-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kernel = dir.join("bzImage");
    std::fs::write(&kernel, spinning_bzimage()).unwrap();
    let socket = dir.join("api.sock");
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two descriptors to the given ints; the other pointers may be
    // null (no name, default attributes and size).
    let r = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0, "openpty: {}", io::Error::last_os_error());
    // SAFETY: openpty succeeded: both are fresh descriptors owned by nobody else.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let before = termios_of(slave.as_raw_fd());
    let stdin = slave.try_clone().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args([
            "run",
            "--memory",
            "128M",
            "--hotplug-size",
            "256M",
            "--cpus",
            "2",
        ])
        .arg("--kernel")
        .arg(&kernel)
        .arg("--api-socket")
        .arg(&socket)
        .stdin(std::process::Stdio::from(stdin))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let up = Instant::now() + Duration::from_secs(20);
    while !socket.exists() || same_mode(&termios_of(slave.as_raw_fd()), &before) {
        assert!(
            Instant::now() < up,
            "the VMM did not come up (API socket and raw terminal) within 20 s"
        );
        assert!(child.try_wait().unwrap().is_none(), "the VMM exited early");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The guest spins in its vCPUs; let them be in KVM_RUN.
    std::thread::sleep(Duration::from_millis(300));
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    let sent = Instant::now();
    // SAFETY: kill only sends a signal to the child we started and still own.
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            sent.elapsed() < Duration::from_secs(10),
            "the VMM did not exit within 10 s of {name}"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    let took = sent.elapsed();
    let mut err = String::new();
    io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    eprintln!("{name}: the VMM exited {took:?} after the signal");
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after {name}; stderr:\n{err}"
    );
    assert!(
        err.contains(&format!("stopped by {name}")),
        "stderr:\n{err}"
    );
    assert!(
        !err.contains("did not leave the guest"),
        "vCPUs stayed in: {err}"
    );
    assert!(!socket.exists(), "the API socket is left behind");
    assert!(
        same_mode(&termios_of(slave.as_raw_fd()), &before),
        "the terminal is left in raw mode"
    );
    drop(master);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
#[ignore = "needs /dev/kvm: run by ci/host-tests where it exists"]
fn sigterm_stops_the_vmm_cleanly() {
    stops_cleanly_on(libc::SIGTERM, "SIGTERM");
}

#[test]
#[ignore = "needs /dev/kvm: run by ci/host-tests where it exists"]
fn sigint_stops_the_vmm_cleanly() {
    stops_cleanly_on(libc::SIGINT, "SIGINT");
}

#[test]
#[ignore = "needs /dev/kvm: run by ci/host-tests where it exists"]
fn a_region_needing_more_kvm_slots_than_kvm_has_is_refused_before_reserving_it() {
    require_kvm();
    let mut vm = Vm::new(1, 64 << 20, Box::new(Sink::default())).unwrap();
    // 128 MiB slots (the memory block size for this boot RAM): one more than KVM has.
    let kvm_slots = u64::try_from(kvm_ioctls::Kvm::new().unwrap().get_nr_memslots()).unwrap();
    let hp = vmm::hotplug::HotplugConfig {
        region_size: (kvm_slots + 1) * (128 << 20),
        block_size: 2 << 20,
        requested_size: 0,
        backing: vmm::hotplug::BackingArg::Anon,
        populate: false,
    };
    let e = vm.add_virtio_mem(&hp).err().unwrap().to_string();
    assert!(
        e.contains("KVM memory slots") && e.contains("at most"),
        "{e}"
    );
    let fits = vmm::hotplug::HotplugConfig {
        region_size: 1 << 30,
        ..hp
    };
    vm.add_virtio_mem(&fits).unwrap();
}
