//! vCPU setup for a 64-bit Linux boot (CPUID, MSRs, registers, segments, page tables, local
//! APIC) and the vCPU run loop that dispatches exits to the buses.

use std::sync::Arc;

use kvm_bindings::{
    kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
    KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use log::{debug, error, info, trace, warn};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::bus::Bus;
use crate::diag::VcpuDumpSlot;
use crate::exit::{ExitHandle, ExitReason};
use crate::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
    ZERO_PAGE_START,
};

/// Errors while setting up a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    /// A KVM ioctl failed.
    #[error("KVM {what} failed for vCPU {cpu}: {source}")]
    Kvm {
        /// Which operation.
        what: &'static str,
        /// vCPU index.
        cpu: u8,
        /// The KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Writing the boot GDT or page tables into guest memory failed.
    #[error("cannot write the boot {what} into guest memory: {source}")]
    GuestMemory {
        /// What was written.
        what: &'static str,
        /// The error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// Building the MSR list failed.
    #[error("cannot build the MSR list: {0}")]
    Msrs(String),
    /// KVM accepted fewer MSRs than given.
    #[error("KVM set {set} of {wanted} boot MSRs on vCPU {cpu}")]
    MsrsPartial {
        /// How many KVM took.
        set: usize,
        /// How many were given.
        wanted: usize,
        /// vCPU index.
        cpu: u8,
    },
}

fn kvm_err(what: &'static str, cpu: u8) -> impl FnOnce(kvm_ioctls::Error) -> CpuError {
    move |source| CpuError::Kvm { what, cpu, source }
}

// CPUID bits.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
const LEAF1_EDX_HTT: u32 = 1 << 28;

/// KVM's paravirtual features leaf (`KVM_CPUID_FEATURES`): EAX holds the feature bits.
const KVM_CPUID_FEATURES: u32 = 0x4000_0001;

/// KVM paravirtual features a guest can be denied (`vmm run --kvm-pv-off`), by name, with
/// their bit in `KVM_CPUID_FEATURES.EAX` (Linux `arch/x86/include/uapi/asm/kvm_para.h`).
pub const KVM_PV_FEATURES: &[(&str, u32)] = &[
    ("async-pf", 4),
    ("steal-time", 5),
    ("pv-eoi", 6),
    ("pv-unhalt", 7),
    ("pv-tlb-flush", 9),
    ("async-pf-vmexit", 10),
    ("pv-send-ipi", 11),
    ("poll-control", 12),
    ("pv-sched-yield", 13),
    ("async-pf-int", 14),
];

/// The `KVM_CPUID_FEATURES.EAX` mask of the named paravirtual features (see
/// [`KVM_PV_FEATURES`]); `all` names every one of them.
///
/// # Errors
///
/// The first unknown name.
pub fn kvm_pv_mask(names: &[String]) -> Result<u32, String> {
    let mut mask = 0;
    for n in names {
        if n == "all" {
            mask |= KVM_PV_FEATURES
                .iter()
                .fold(0, |m, (_, bit)| m | (1u32 << bit));
            continue;
        }
        let (_, bit) = KVM_PV_FEATURES
            .iter()
            .find(|(name, _)| name == n)
            .ok_or_else(|| n.clone())?;
        mask |= 1u32 << bit;
    }
    Ok(mask)
}

/// Number of bits needed to number `n` items (ceil(log2(n))).
fn bits_for(n: u32) -> u32 {
    n.max(1).next_power_of_two().trailing_zeros()
}

/// Adjusts KVM's supported CPUID for vCPU `cpu` of `count`: APIC ids, the topology leaves
/// (0x1, 0x4, 0xb/0x1f, AMD 0x8000_0008/0x8000_001e: one socket, `count` cores, one thread
/// each), the hypervisor bit, and KVM's paravirtual features less `pv_off` (a
/// [`kvm_pv_mask`]).
pub fn filter_cpuid(cpuid: &mut CpuId, cpu: u8, count: u8, pv_off: u32) {
    let apic_id = u32::from(cpu);
    let count32 = u32::from(count);
    let core_bits = bits_for(count32);
    for e in cpuid.as_mut_slice() {
        match e.function {
            0x1 => {
                // EBX: [31:24] initial APIC id, [23:16] logical processors per package,
                // [15:8] CLFLUSH line size in qwords.
                e.ebx = (apic_id << 24) | (count32 << 16) | (8 << 8);
                e.ecx |= LEAF1_ECX_HYPERVISOR | LEAF1_ECX_TSC_DEADLINE;
                if count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            0x4 => {
                // EAX: [31:26] cores per package - 1, [25:14] threads sharing this cache - 1.
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count32 - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((count32 - 1) << 26) | (sharing << 14);
            }
            0xb | 0x1f => {
                match e.index {
                    0 => {
                        // SMT level: one thread per core.
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        // Core level: `count` cores.
                        e.eax = core_bits;
                        e.ebx = count32;
                        e.ecx = (2 << 8) | 1;
                    }
                    i => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = i;
                    }
                }
                e.edx = apic_id;
            }
            0xd if e.index == 0 => {
                // EBX is the XSAVE area size for the features enabled in XCR0. KVM only
                // recomputes it when XCR0 changes in bits beyond x87/SSE/AVX, so a guest
                // that enables AVX would read the size for x87/SSE only and warn ("XSAVE
                // consistency problem"). Linux enables everything EAX offers: the size
                // for all of it is ECX.
                e.ebx = e.ecx;
            }
            0x8000_0008 => {
                // ECX: [15:12] APIC id bits for cores, [7:0] cores - 1.
                e.ecx = (core_bits << 12) | (count32 - 1);
            }
            KVM_CPUID_FEATURES => e.eax &= !pv_off,
            0x8000_001e => {
                e.eax = apic_id;
                e.ebx = apic_id & 0xff; // compute unit id, one thread per unit
                e.ecx = 0; // node 0, one node
            }
            _ => {}
        }
    }
}

// MSR indices.
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default memory type write-back: without it all RAM is uncached.
const MTRR_DEF_WB: u64 = (1 << 11) | 6;

fn boot_msrs() -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_DEF_WB),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// A GDT entry from flags, base and limit (the Intel SDM layout).
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = u64::from(base);
    let limit = u64::from(limit);
    let flags = u64::from(flags);
    ((base & 0xff00_0000) << (56 - 24))
        | ((flags & 0x0000_f0ff) << 40)
        | ((limit & 0x000f_0000) << (48 - 16))
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

fn field(entry: u64, shift: u32, mask: u64) -> u8 {
    u8::try_from((entry >> shift) & mask).unwrap_or(0)
}

/// The KVM segment for GDT entry `index`.
fn segment(entry: u64, index: u16) -> kvm_segment {
    let base = u64::from(field(entry, 56, 0xff)) << 24 | ((entry >> 16) & 0x00ff_ffff);
    let limit_raw = ((entry >> 32) & 0x000f_0000) | (entry & 0xffff);
    let g = field(entry, 55, 1);
    let limit = if g == 1 {
        (limit_raw << 12) | 0xfff
    } else {
        limit_raw
    };
    let present = field(entry, 47, 1);
    kvm_segment {
        base,
        limit: u32::try_from(limit).unwrap_or(u32::MAX),
        selector: index * 8,
        type_: field(entry, 40, 0xf),
        present,
        dpl: field(entry, 45, 0x3),
        db: field(entry, 54, 1),
        s: field(entry, 44, 1),
        l: field(entry, 53, 1),
        g,
        avl: field(entry, 52, 1),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// Writes the boot GDT, IDT and identity-mapping page tables (first 4 GiB, 2 MiB pages)
/// into guest memory. Shared by all vCPUs.
///
/// # Errors
///
/// [`CpuError::GuestMemory`] when the low memory areas are not in guest RAM.
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), CpuError> {
    let gdt = boot_gdt();
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT_START + 8 * i as u64))
            .map_err(|source| CpuError::GuestMemory {
                what: "GDT",
                source,
            })?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|source| CpuError::GuestMemory {
            what: "IDT",
            source,
        })?;
    let pt = |source| CpuError::GuestMemory {
        what: "page tables",
        source,
    };
    mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))
        .map_err(pt)?;
    for pd in 0..4u64 {
        let pd_addr = PDE_START + pd * 0x1000;
        mem.write_obj(pd_addr | 0x03, GuestAddress(PDPTE_START + pd * 8))
            .map_err(pt)?;
        for i in 0..512u64 {
            let phys = ((pd << 9) + i) << 21;
            // Present, writable, 2 MiB page.
            mem.write_obj(phys | 0x83, GuestAddress(pd_addr + i * 8))
                .map_err(pt)?;
        }
    }
    Ok(())
}

fn boot_gdt() -> [u64; 4] {
    [
        gdt_entry(0, 0, 0),            // null
        gdt_entry(0xa09b, 0, 0xfffff), // code, 64-bit
        gdt_entry(0xc093, 0, 0xfffff), // data
        gdt_entry(0x808b, 0, 0xfffff), // TSS
    ]
}

/// The guest's physical address width as the VMM's CPUID reports it (leaf 0x8000_0008,
/// `EAX[7:0]`; the VMM passes it through from KVM), or `None` when KVM gives no such leaf.
///
/// # Errors
///
/// [`CpuError`] when KVM refuses GET_SUPPORTED_CPUID.
pub fn guest_phys_bits(kvm: &Kvm) -> Result<Option<u8>, CpuError> {
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("GET_SUPPORTED_CPUID", 0))?;
    Ok(phys_bits_of(cpuid.as_slice()))
}

fn phys_bits_of(entries: &[kvm_bindings::kvm_cpuid_entry2]) -> Option<u8> {
    entries
        .iter()
        .find(|e| e.function == 0x8000_0008)
        .and_then(|e| u8::try_from(e.eax & 0xff).ok())
        .filter(|&b| b > 0)
}

/// Configures vCPU `cpu` of `count` to start the kernel's 64-bit entry point at `entry`,
/// without the KVM paravirtual features in `pv_off`.
///
/// # Errors
///
/// [`CpuError`] when KVM refuses a setting.
pub fn configure_vcpu(
    kvm: &Kvm,
    vcpu: &VcpuFd,
    cpu: u8,
    count: u8,
    entry: u64,
    pv_off: u32,
) -> Result<(), CpuError> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("GET_SUPPORTED_CPUID", cpu))?;
    filter_cpuid(&mut cpuid, cpu, count, pv_off);
    vcpu.set_cpuid2(&cpuid)
        .map_err(kvm_err("SET_CPUID2", cpu))?;

    let entries = boot_msrs();
    let msrs = Msrs::from_entries(&entries).map_err(|e| CpuError::Msrs(format!("{e:?}")))?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm_err("SET_MSRS", cpu))?;
    if set != entries.len() {
        return Err(CpuError::MsrsPartial {
            set,
            wanted: entries.len(),
            cpu,
        });
    }

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm_err("SET_FPU", cpu))?;

    // Application processors wait for INIT/SIPI from the boot CPU; their registers are set
    // by the guest. Only the BSP starts at the kernel entry.
    if cpu == 0 {
        let regs = kvm_regs {
            rflags: 0x2,
            rip: entry,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: ZERO_PAGE_START,
            ..Default::default()
        };
        vcpu.set_regs(&regs).map_err(kvm_err("SET_REGS", cpu))?;

        let mut sregs = vcpu.get_sregs().map_err(kvm_err("GET_SREGS", cpu))?;
        let gdt = boot_gdt();
        let code = segment(gdt[1], 1);
        let data = segment(gdt[2], 2);
        let tss = segment(gdt[3], 3);
        sregs.gdt.base = BOOT_GDT_START;
        sregs.gdt.limit = u16::try_from(std::mem::size_of_val(&gdt) - 1).unwrap_or(u16::MAX);
        sregs.idt.base = BOOT_IDT_START;
        sregs.idt.limit = 7;
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.tr = tss;
        // Protected mode, paging, PAE, long mode.
        sregs.cr0 |= 0x1 | 0x8000_0000;
        sregs.cr3 = PML4_START;
        sregs.cr4 |= 0x20;
        sregs.efer |= 0x100 | 0x400;
        vcpu.set_sregs(&sregs).map_err(kvm_err("SET_SREGS", cpu))?;
    }

    // LINT0 as ExtINT (the PIC), LINT1 as NMI, as a BIOS leaves them.
    let mut lapic = vcpu.get_lapic().map_err(kvm_err("GET_LAPIC", cpu))?;
    set_lvt_delivery(&mut lapic.regs, 0x350, 0x7);
    set_lvt_delivery(&mut lapic.regs, 0x360, 0x4);
    vcpu.set_lapic(&lapic).map_err(kvm_err("SET_LAPIC", cpu))?;
    Ok(())
}

fn set_lvt_delivery(regs: &mut [std::os::raw::c_char; 1024], offset: usize, mode: u32) {
    let Some(bytes) = regs.get_mut(offset..offset + 4) else {
        return;
    };
    let mut raw = [0u8; 4];
    for (r, b) in raw.iter_mut().zip(bytes.iter()) {
        *r = b.to_ne_bytes()[0];
    }
    let v = (u32::from_le_bytes(raw) & !0x700) | (mode << 8);
    for (b, r) in bytes.iter_mut().zip(v.to_le_bytes()) {
        *b = std::os::raw::c_char::from_ne_bytes([r]);
    }
}

/// Runs vCPU `cpu` until the guest stops or fails, dispatching I/O and MMIO exits to the
/// buses, and reports why it stopped through `exit`. Between two runs it answers a state
/// dump request of `dump` (see [`crate::diag`]).
pub fn run_vcpu(
    mut vcpu: VcpuFd,
    cpu: u8,
    io_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    exit: ExitHandle,
    dump: Option<Arc<VcpuDumpSlot>>,
) {
    let reason = loop {
        if exit.requested() {
            return;
        }
        if let Some(d) = &dump {
            d.answer_if_requested(&vcpu);
        }
        match vcpu.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                if !io_bus.read(u64::from(port), data) {
                    trace!("vCPU {cpu}: unclaimed read of port {port:#x}");
                }
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                if !io_bus.write(u64::from(port), data) {
                    trace!("vCPU {cpu}: unclaimed write of {data:x?} to port {port:#x}");
                }
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                mmio_bus.read(addr, data);
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                mmio_bus.write(addr, data);
            }
            Ok(VcpuExit::Hlt) => break ExitReason::Poweroff,
            // A triple fault: the last resort of Linux' reboot, and what a crash looks like.
            // Its state is the only evidence of which, so it goes to the log.
            Ok(VcpuExit::Shutdown) => {
                warn!(
                    "vCPU {cpu}: triple fault (KVM_EXIT_SHUTDOWN), treated as a reset: {}",
                    crate::diag::describe_vcpu(&vcpu, cpu)
                );
                break ExitReason::Reboot;
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => break ExitReason::Poweroff,
                KVM_SYSTEM_EVENT_RESET => {
                    info!("vCPU {cpu}: KVM system event: reset");
                    break ExitReason::Reboot;
                }
                other => {
                    break ExitReason::Error(format!("vCPU {cpu}: unknown system event {other}"))
                }
            },
            Ok(VcpuExit::FailEntry(reason, hw_cpu)) => {
                break ExitReason::Error(format!(
                    "vCPU {cpu}: KVM entry failed, hardware reason {reason:#x} on host CPU {hw_cpu}"
                ))
            }
            Ok(VcpuExit::InternalError) => {
                let run = vcpu.get_kvm_run();
                // SAFETY: KVM filled the `internal` member of the exit union for
                // KVM_EXIT_INTERNAL_ERROR, which is what this arm handles.
                let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
                break ExitReason::Error(format!(
                    "vCPU {cpu}: KVM internal error (suberror {suberror}; 1 = instruction emulation failure)"
                ));
            }
            Ok(VcpuExit::IoapicEoi(_)) | Ok(VcpuExit::IrqWindowOpen) | Ok(VcpuExit::Intr) => {}
            Ok(other) => {
                warn!("vCPU {cpu}: unexpected exit {other:?}");
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            // What a guest gets for touching unplugged virtio-mem memory inside a slot that
            // is still registered (it is PROT_NONE): the VM stops, the host gives nothing.
            Err(e) if e.errno() == libc::EFAULT => {
                break ExitReason::Error(format!(
                    "vCPU {cpu}: the guest accessed memory the host does not back (KVM_RUN: \
                     {e}), such as unplugged virtio-mem memory; stopping the VM"
                ))
            }
            Err(e) => break ExitReason::Error(format!("vCPU {cpu}: KVM_RUN failed: {e}")),
        }
    };
    match &reason {
        ExitReason::Error(e) => error!("{e}"),
        r => debug!("vCPU {cpu}: {r:?}"),
    }
    exit.request(reason);
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn gdt_segments_decode() {
        let gdt = boot_gdt();
        let cs = segment(gdt[1], 1);
        assert_eq!(
            (cs.selector, cs.type_, cs.l, cs.db, cs.g, cs.present),
            (8, 0xb, 1, 0, 1, 1)
        );
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment(gdt[2], 2);
        assert_eq!(
            (ds.selector, ds.type_, ds.l, ds.db, ds.s),
            (16, 0x3, 0, 1, 1)
        );
        let tss = segment(gdt[3], 3);
        assert_eq!((tss.selector, tss.type_, tss.s), (24, 0xb, 0));
        assert_eq!(segment(gdt[0], 0).unusable, 1);
    }

    #[test]
    fn phys_bits_come_from_leaf_0x8000_0008() {
        let leaf = |function, eax| kvm_cpuid_entry2 {
            function,
            eax,
            ..Default::default()
        };
        assert_eq!(
            phys_bits_of(&[leaf(0, 0x10), leaf(0x8000_0008, 0x3028)]),
            Some(40)
        );
        assert_eq!(phys_bits_of(&[leaf(0, 0x10)]), None);
    }

    #[test]
    fn cpuid_topology() {
        let entry = |function, index| kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        };
        let mut cpuid = CpuId::from_entries(&[
            entry(1, 0),
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0xb, 2),
            entry(4, 0),
            entry(0x8000_0008, 0),
            kvm_cpuid_entry2 {
                function: 0xd,
                index: 0,
                ebx: 0x240,
                ecx: 0x340,
                ..Default::default()
            },
        ])
        .unwrap();
        filter_cpuid(&mut cpuid, 2, 3, 0);
        let e = cpuid.as_slice();
        assert_eq!(e[0].ebx >> 24, 2, "initial APIC id");
        assert_eq!((e[0].ebx >> 16) & 0xff, 3);
        assert_ne!(e[0].edx & LEAF1_EDX_HTT, 0);
        assert_ne!(e[0].ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_eq!((e[1].ebx, e[1].ecx, e[1].edx), (1, 0x100, 2));
        assert_eq!((e[2].eax, e[2].ebx, e[2].ecx, e[2].edx), (2, 3, 0x201, 2));
        assert_eq!((e[3].ebx, e[3].ecx), (0, 2));
        assert_eq!(e[4].eax >> 26, 2);
        assert_eq!(e[5].ecx & 0xff, 2);
        assert_eq!(e[6].ebx, 0x340, "XSAVE size covers every offered feature");
    }

    #[test]
    fn pv_features_can_be_hidden() {
        let mask = kvm_pv_mask(&["pv-tlb-flush".into(), "async-pf-int".into()]).unwrap();
        assert_eq!(mask, (1 << 9) | (1 << 14));
        assert_eq!(kvm_pv_mask(&["nope".into()]), Err("nope".into()));
        let all = kvm_pv_mask(&["all".into()]).unwrap();
        assert_eq!(all.count_ones(), 10);
        assert_eq!(all & 1, 0, "the clock source stays");
        let mut cpuid = CpuId::from_entries(&[kvm_cpuid_entry2 {
            function: KVM_CPUID_FEATURES,
            eax: 0x0100_7eff,
            ..Default::default()
        }])
        .unwrap();
        filter_cpuid(&mut cpuid, 0, 1, mask);
        assert_eq!(cpuid.as_slice()[0].eax, 0x0100_7eff & !mask);
    }

    #[test]
    fn bits_for_counts() {
        assert_eq!(bits_for(1), 0);
        assert_eq!(bits_for(2), 1);
        assert_eq!(bits_for(3), 2);
        assert_eq!(bits_for(8), 3);
    }
}
