//! ACPI tables for a hardware-reduced platform (ACPI 6.5): RSDP, XSDT, FADT, MADT, DSDT.
//!
//! The DSDT announces COM1 (`PNP0501`) and one `LNRO0005` (virtio-mmio) device per window
//! with its `Memory32Fixed` and `Interrupt` resources, so an unmodified distro kernel finds
//! its virtio devices without `virtio_mmio.device=`. Poweroff and reset go through the FADT
//! sleep control and reset registers (see `devices::legacy::AcpiPm`).
//!
//! Interrupts: every device interrupt (COM1's IRQ 4 and the virtio GSIs) is declared edge
//! triggered, active high. With identity GSI routing (KVM's default) and no legacy PIC on a
//! hardware-reduced platform, Linux programs the IOAPIC pins from these `_CRS` entries, so
//! the MADT needs no interrupt source overrides.

use acpi_tables::aml::{
    Device, EISAName, Interrupt, Memory32Fixed, Name, Package, ResourceTemplate, Scope, IO,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::devices::legacy::{
    ACPI_PM_BASE, RESET_REG, RESET_VALUE, S5_SLEEP_TYPE, SLEEP_CONTROL, SLEEP_STATUS,
};
use crate::devices::serial::{COM1_BASE, COM_PORTS};
use crate::layout::{ACPI_END, ACPI_START, APIC_START, COM1_IRQ, IOAPIC_START};

const OEM_ID: [u8; 6] = *b"RVMM  ";
const OEM_TABLE_ID: [u8; 8] = *b"VIRTMEM ";
const OEM_REVISION: u32 = 1;

/// IAPC_BOOT_ARCH flags: no VGA, no MSI, no CMOS RTC (ACPI 6.5, 5.2.9.3).
const IAPC_NO_VGA: u16 = 1 << 2;
const IAPC_NO_MSI: u16 = 1 << 3;
const IAPC_NO_CMOS_RTC: u16 = 1 << 5;

/// A virtio-mmio window to announce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioMmioWindow {
    /// Guest physical base.
    pub base: u64,
    /// Size.
    pub size: u64,
    /// GSI.
    pub gsi: u32,
}

/// Errors while building the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// A window is not addressable by a `Memory32Fixed` resource.
    #[error("virtio-mmio window {base:#x}+{size:#x} is not below 4 GiB")]
    WindowAbove4G {
        /// Base.
        base: u64,
        /// Size.
        size: u64,
    },
    /// Too many vCPUs or devices for the table area.
    #[error("ACPI tables ({0} bytes) do not fit the ACPI area")]
    TooLarge(u64),
    /// Writing guest memory failed.
    #[error("cannot write ACPI tables into guest memory: {0}")]
    Write(String),
}

/// The DSDT's AML body.
pub fn dsdt_aml(windows: &[VirtioMmioWindow]) -> Result<Vec<u8>, AcpiError> {
    let com1_irq = Interrupt::new(true, true, false, false, COM1_IRQ);
    let com1_port = u16::try_from(COM1_BASE).unwrap_or(0x3f8);
    let com1_io = IO::new(
        com1_port,
        com1_port,
        1,
        u8::try_from(COM_PORTS).unwrap_or(8),
    );
    let com1_crs = ResourceTemplate::new(vec![&com1_irq, &com1_io]);
    let com1_hid = Name::new("_HID".into(), &EISAName::new("PNP0501"));
    let com1_uid = Name::new("_UID".into(), &0u8);
    let com1_crs_name = Name::new("_CRS".into(), &com1_crs);
    let com1 = Device::new("COM1".into(), vec![&com1_hid, &com1_uid, &com1_crs_name]);

    struct Res {
        mem: Memory32Fixed,
        irq: Interrupt,
        uid: u8,
        name: String,
    }
    let mut res = Vec::with_capacity(windows.len());
    for (i, w) in windows.iter().enumerate() {
        let base = u32::try_from(w.base)
            .ok()
            .zip(u32::try_from(w.size).ok())
            .filter(|(b, s)| b.checked_add(*s).is_some());
        let Some((base, size)) = base else {
            return Err(AcpiError::WindowAbove4G {
                base: w.base,
                size: w.size,
            });
        };
        res.push(Res {
            mem: Memory32Fixed::new(true, base, size),
            irq: Interrupt::new(true, true, false, false, w.gsi),
            uid: u8::try_from(i).map_err(|_| AcpiError::TooLarge(0))?,
            name: format!("VR{i:02X}"),
        });
    }
    let hid: String = "LNRO0005".into();
    let parts: Vec<(Name, Name, ResourceTemplate)> = res
        .iter()
        .map(|r| {
            (
                Name::new("_HID".into(), &hid),
                Name::new("_UID".into(), &r.uid),
                ResourceTemplate::new(vec![&r.mem, &r.irq]),
            )
        })
        .collect();
    let crs_names: Vec<Name> = parts
        .iter()
        .map(|(_, _, crs)| Name::new("_CRS".into(), crs))
        .collect();
    let devices: Vec<Device> = parts
        .iter()
        .zip(&crs_names)
        .zip(&res)
        .map(|(((h, u, _), c), r)| Device::new(r.name.as_str().into(), vec![h, u, c]))
        .collect();
    let mut children: Vec<&dyn Aml> = vec![&com1];
    for d in &devices {
        children.push(d);
    }
    let sb = Scope::new("_SB_".into(), children);
    let s5 = Name::new("_S5_".into(), &Package::new(vec![&S5_SLEEP_TYPE]));
    let mut aml = Vec::new();
    sb.to_aml_bytes(&mut aml);
    s5.to_aml_bytes(&mut aml);
    Ok(aml)
}

fn io_gas(port: u64) -> GAS {
    GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, port)
}

fn align16(v: u64) -> u64 {
    v.next_multiple_of(16)
}

/// Builds the tables and writes them at [`ACPI_START`]; returns the RSDP address.
///
/// # Errors
///
/// [`AcpiError`] when a window is not 32-bit addressable or the tables do not fit.
pub fn write_acpi_tables(
    mem: &GuestMemoryMmap,
    cpus: u8,
    windows: &[VirtioMmioWindow],
) -> Result<u64, AcpiError> {
    let rsdp_addr = ACPI_START;
    let mut next = align16(ACPI_START + 36);
    let mut blobs: Vec<(u64, Vec<u8>)> = Vec::new();

    // DSDT
    let body = dsdt_aml(windows)?;
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    dsdt.append_slice(&body);
    let dsdt_addr = next;
    next = align16(next + len64(dsdt.len()));
    blobs.push((dsdt_addr, dsdt.as_slice().to_vec()));

    // FADT
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .dsdt_64(dsdt_addr);
    fadt.reset_reg = io_gas(ACPI_PM_BASE + RESET_REG);
    fadt.reset_value = RESET_VALUE;
    fadt.sleep_control_reg = io_gas(ACPI_PM_BASE + SLEEP_CONTROL);
    fadt.sleep_status_reg = io_gas(ACPI_PM_BASE + SLEEP_STATUS);
    fadt.iapc_boot_arch = (IAPC_NO_VGA | IAPC_NO_MSI | IAPC_NO_CMOS_RTC).into();
    let fadt = fadt.finalize();
    let mut fadt_bytes = Vec::new();
    fadt.to_aml_bytes(&mut fadt_bytes);
    let fadt_addr = next;
    next = align16(next + len64(fadt_bytes.len()));
    blobs.push((fadt_addr, fadt_bytes));

    // MADT
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(u32::try_from(APIC_START).unwrap_or(0xfee0_0000)),
    );
    for cpu in 0..cpus {
        madt.add_structure(ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(
        0,
        u32::try_from(IOAPIC_START).unwrap_or(0xfec0_0000),
        0,
    ));
    let mut madt_bytes = Vec::new();
    madt.to_aml_bytes(&mut madt_bytes);
    let madt_addr = next;
    next = align16(next + len64(madt_bytes.len()));
    blobs.push((madt_addr, madt_bytes));

    // XSDT
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let mut xsdt_bytes = Vec::new();
    xsdt.to_aml_bytes(&mut xsdt_bytes);
    let xsdt_addr = next;
    next += len64(xsdt_bytes.len());
    blobs.push((xsdt_addr, xsdt_bytes));

    // RSDP
    let rsdp = Rsdp::new(OEM_ID, xsdt_addr);
    let mut rsdp_bytes = Vec::new();
    rsdp.to_aml_bytes(&mut rsdp_bytes);
    blobs.push((rsdp_addr, rsdp_bytes));

    if next > ACPI_END {
        return Err(AcpiError::TooLarge(next - ACPI_START));
    }
    for (addr, data) in blobs {
        mem.write_slice(&data, GuestAddress(addr))
            .map_err(|e| AcpiError::Write(e.to_string()))?;
    }
    Ok(rsdp_addr)
}

fn len64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]
mod tests {
    use super::*;

    fn checksum_ok(b: &[u8]) -> bool {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x)) == 0
    }

    fn find(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn dsdt_names_devices_and_s5() {
        let w = [
            VirtioMmioWindow {
                base: 0xd000_0000,
                size: 0x1000,
                gsi: 5,
            },
            VirtioMmioWindow {
                base: 0xd000_1000,
                size: 0x1000,
                gsi: 6,
            },
        ];
        let aml = dsdt_aml(&w).unwrap();
        assert!(find(&aml, b"LNRO0005"));
        assert!(find(&aml, b"VR00") && find(&aml, b"VR01"));
        assert!(find(&aml, b"COM1") && find(&aml, b"_S5_"));
        // Memory32Fixed descriptor of window 1: tag 0x86, len 9, RW, base, size.
        let mut desc = vec![0x86, 9, 0, 1];
        desc.extend_from_slice(&0xd000_1000u32.to_le_bytes());
        desc.extend_from_slice(&0x1000u32.to_le_bytes());
        assert!(find(&aml, &desc));
        // Extended interrupt descriptor for GSI 6: consumer, edge, active high, exclusive.
        let mut irq = vec![0x89, 6, 0, 0b0011, 1];
        irq.extend_from_slice(&6u32.to_le_bytes());
        assert!(find(&aml, &irq));
    }

    #[test]
    fn window_above_4g_is_refused() {
        let w = [VirtioMmioWindow {
            base: 0x1_0000_0000,
            size: 0x1000,
            gsi: 5,
        }];
        assert!(matches!(dsdt_aml(&w), Err(AcpiError::WindowAbove4G { .. })));
    }

    #[test]
    fn tables_are_linked_and_checksummed() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let w = [VirtioMmioWindow {
            base: 0xd000_0000,
            size: 0x1000,
            gsi: 5,
        }];
        let rsdp = write_acpi_tables(&mem, 2, &w).unwrap();
        let mut r = [0u8; 36];
        mem.read_slice(&mut r, GuestAddress(rsdp)).unwrap();
        assert_eq!(&r[..8], b"RSD PTR ");
        assert!(checksum_ok(&r[..20]) && checksum_ok(&r));
        let xsdt_addr = u64::from_le_bytes(r[24..32].try_into().unwrap());
        let read_table = |addr: u64| {
            let mut h = [0u8; 8];
            mem.read_slice(&mut h, GuestAddress(addr)).unwrap();
            let len = u32::from_le_bytes(h[4..8].try_into().unwrap());
            let mut t = vec![0u8; usize::try_from(len).unwrap()];
            mem.read_slice(&mut t, GuestAddress(addr)).unwrap();
            t
        };
        let xsdt = read_table(xsdt_addr);
        assert_eq!(&xsdt[..4], b"XSDT");
        assert!(checksum_ok(&xsdt));
        let fadt_addr = u64::from_le_bytes(xsdt[36..44].try_into().unwrap());
        let madt_addr = u64::from_le_bytes(xsdt[44..52].try_into().unwrap());
        let fadt = read_table(fadt_addr);
        assert_eq!(&fadt[..4], b"FACP");
        assert!(checksum_ok(&fadt));
        let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
        assert_ne!(flags & (1 << 20), 0, "hardware reduced");
        let dsdt_addr = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        let dsdt = read_table(dsdt_addr);
        assert_eq!(&dsdt[..4], b"DSDT");
        assert!(checksum_ok(&dsdt));
        let madt = read_table(madt_addr);
        assert_eq!(&madt[..4], b"APIC");
        assert!(checksum_ok(&madt));
        // Two local APICs (type 0) and one IOAPIC (type 1) after the 44-byte header.
        let types: Vec<u8> = {
            let mut v = Vec::new();
            let mut off = 44;
            while off < madt.len() {
                v.push(madt[off]);
                off += usize::from(madt[off + 1]);
            }
            v
        };
        assert_eq!(types, vec![0, 0, 1]);
    }
}
