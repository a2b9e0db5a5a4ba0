//! Runs tiny hand-written real-mode guests on the host's KVM: port writes reach COM1, the
//! i8042 reset and the ACPI sleep register stop the VM with the right reason. (These
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
