//! Runs inside the nested test host (L1), started by its init before the command, for as
//! long as L1 lives: holds one KVM VM whose only vCPU never runs, with its local APIC
//! disabled in hardware (APIC base) and in software (as at reset).
//!
//! Why: L1's KVM keeps two static keys, `apic_hw_disabled` and `apic_sw_disabled`, that
//! are on while any vCPU's APIC is disabled. Every guest boot turns `apic_sw_disabled` on
//! (its vCPUs start with the APIC disabled) and, a second after the guest enables its
//! APICs, off again; each change rewrites L1's kernel code (`text_poke_bp`, an `int3`
//! placed over the site while the rest is written). Under QEMU's multi-threaded TCG the
//! other L1 vCPU sometimes still executes the `int3` after the rewrite is complete, and
//! L1 dies (`Oops: int3` at `__apic_accept_irq` or `kvm_arch_vcpu_ioctl_run`, "Fatal
//! exception in interrupt"). With this VM alive both keys stay on, so guests coming and
//! going only move their counts and L1's code is never rewritten. See
//! guest-tests/README.md, "Why L1 died".
//!
//! `--toggle SECONDS` is the reproducer: it makes L1 rewrite that code every 1.5 s.

use std::process::ExitCode;

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

/// The local APIC's base address MSR.
const MSR_IA32_APICBASE: u32 = 0x1b;
/// Its reset value without the enable bit (bit 11): the APIC disabled in hardware.
const APIC_BASE_DISABLED: u64 = 0xfee0_0000;

/// What stopped the pin; each is L1's KVM refusing, so the test host is not usable as
/// configured.
#[derive(Debug, thiserror::Error)]
enum PinError {
    #[error("cannot open /dev/kvm ({0}): was kvm_amd loaded in the test host?")]
    Kvm(#[source] kvm_ioctls::Error),
    #[error("cannot create the pinning VM ({0})")]
    Vm(#[source] kvm_ioctls::Error),
    #[error("cannot create its in-kernel interrupt controller ({0})")]
    Irqchip(#[source] kvm_ioctls::Error),
    #[error("cannot create its vCPU ({0})")]
    Vcpu(#[source] kvm_ioctls::Error),
    #[error("cannot build the APIC base MSR list ({0:?})")]
    MsrList(vmm_sys_util::fam::Error),
    #[error("cannot disable its APIC ({0})")]
    ApicBase(#[source] kvm_ioctls::Error),
    #[error("KVM set {0} of 1 MSR (the APIC base): the APIC stays enabled")]
    ApicBaseRefused(usize),
}

/// A VM with an in-kernel interrupt controller and one vCPU that has not run. Creating
/// the vCPU turns apic_sw_disabled on: its APIC is software-disabled at reset.
fn vm_with_one_vcpu(kvm: &Kvm) -> Result<(VmFd, VcpuFd), PinError> {
    let vm = kvm.create_vm().map_err(PinError::Vm)?;
    vm.create_irq_chip().map_err(PinError::Irqchip)?;
    let vcpu = vm.create_vcpu(0).map_err(PinError::Vcpu)?;
    Ok((vm, vcpu))
}

fn pin() -> Result<std::convert::Infallible, PinError> {
    let kvm = Kvm::new().map_err(PinError::Kvm)?;
    // The vCPU never runs, so its APIC stays software-disabled.
    let (vm, vcpu) = vm_with_one_vcpu(&kvm)?;
    let msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_IA32_APICBASE,
        data: APIC_BASE_DISABLED,
        ..Default::default()
    }])
    .map_err(PinError::MsrList)?;
    // Clearing the enable bit turns apic_hw_disabled on.
    let set = vcpu.set_msrs(&msrs).map_err(PinError::ApicBase)?;
    if set != 1 {
        return Err(PinError::ApicBaseRefused(set));
    }
    println!("TESTHOST-INFO kvm static keys pinned: a VM with a disabled APIC is held");
    // The VM, its vCPU and /dev/kvm stay open until L1 powers off.
    let _held = (kvm, vm, vcpu);
    loop {
        std::thread::park();
    }
}

/// The reproducer (`--toggle SECONDS`): creates and destroys a VM with one vCPU every
/// 1.5 s, which without the pin turns `apic_sw_disabled` on and off each time, so L1's
/// code is rewritten while guests run. Without the pin L1 died within 30 s in each of
/// four runs beside a guest soak; with it, none did.
fn toggle(seconds: u64) -> Result<u64, PinError> {
    let kvm = Kvm::new().map_err(PinError::Kvm)?;
    let end = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
    let mut cycles = 0;
    while std::time::Instant::now() < end {
        {
            let _vm = vm_with_one_vcpu(&kvm)?;
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        cycles += 1;
        // Past the key's one-second rate limit, so that each destroy rewrites the code.
        std::thread::sleep(std::time::Duration::from_millis(1300));
    }
    Ok(cycles)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.as_slice() {
        [] => pin().map(|never| match never {}),
        [flag, seconds] if flag == "--toggle" => match seconds.parse() {
            Ok(s) => {
                toggle(s).map(|n| println!("testhost-pin-kvm-keys: {n} VMs created and destroyed"))
            }
            Err(_) => {
                eprintln!("testhost-pin-kvm-keys: --toggle takes a number of seconds");
                return ExitCode::from(2);
            }
        },
        _ => {
            eprintln!("usage: testhost-pin-kvm-keys [--toggle SECONDS]");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("testhost-pin-kvm-keys: {e}");
            ExitCode::FAILURE
        }
    }
}
