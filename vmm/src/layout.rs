//! The guest physical address map.
//!
//! ```text
//! 0x0000_0000  low RAM: real-mode area, GDT/IDT, zero page, page tables, command line
//! 0x000e_0000  ACPI tables (RSDP first: legacy BIOS search area), up to 0xf_0000
//! 0x000f_fff0  reset vector stub (reboot through the BIOS ends in an i8042 reset)
//! 0x0010_0000  kernel (bzImage protected-mode code), then the rest of low boot RAM
//!   ...        initrd at the top of low boot RAM (below 2 GiB)
//! 0xc000_0000  32-bit MMIO hole (1 GiB): virtio-mmio windows from 0xd000_0000,
//!              IOAPIC 0xfec0_0000, LAPIC 0xfee0_0000
//! 0x1_0000_0000 boot RAM above 4 GiB when memory > 3 GiB
//!   ...        end of boot RAM: the virtio-mem region starts here, 128 MiB aligned
//! ```
//!
//! Everything the VMM places (MMIO windows, ACPI) is below 4 GiB, so the address space above
//! the end of boot RAM is free for a hotplug region.

use vm_memory::GuestAddress;

/// Start of the GDT used for the 64-bit boot.
pub const BOOT_GDT_START: u64 = 0x500;
/// Start of the (empty) IDT used for the 64-bit boot.
pub const BOOT_IDT_START: u64 = 0x520;
/// Zero page (`boot_params`) address, passed to the kernel in RSI.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Level-4 page table.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// First of four page directories (2 MiB pages identity-mapping the first 4 GiB).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Maximum command line length (including the NUL), as Linux x86 allows.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// End of the usable low memory below the EBDA (the e820 RAM entry stops here).
pub const EBDA_START: u64 = 0x9_fc00;
/// ACPI tables area; the RSDP is first, in the legacy BIOS search range.
pub const ACPI_START: u64 = 0xe_0000;
/// End of the ACPI area.
pub const ACPI_END: u64 = 0xf_0000;
/// The x86 reset vector (real mode 0xf000:0xfff0), where a CPU reset or a "BIOS" reboot
/// starts executing; a small stub there turns it into an i8042 reset.
pub const RESET_VECTOR: u64 = 0xf_fff0;
/// Start of high memory, where the kernel is loaded.
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO hole: boot RAM below 4 GiB ends here at most.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// Size of the 32-bit MMIO hole.
pub const MMIO_HOLE_SIZE: u64 = 0x4000_0000;
/// First virtio-mmio window.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = virtio_mmio::regs::WINDOW_SIZE;
/// IOAPIC registers.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC registers.
pub const APIC_START: u64 = 0xfee0_0000;
/// 4 GiB.
pub const FOUR_GIB: u64 = 0x1_0000_0000;

/// GSI of the first virtio-mmio device; ISA IRQ 4 is COM1's, 0-2 the timer and cascade.
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Last usable GSI of the in-kernel IOAPIC (24 pins).
pub const IRQ_MAX: u32 = 23;
/// COM1's IRQ.
pub const COM1_IRQ: u32 = 4;

/// Highest address an initrd may end at (Linux' `initrd_addr_max` is at least this).
pub const INITRD_ADDR_MAX: u64 = 0x7fff_ffff;

/// Alignment of the hotplug (virtio-mem) region: Linux' memory block size on x86.
pub const HOTPLUG_ALIGN: u64 = 128 << 20;

/// The RAM ranges (start, size) for `mem_size` bytes of boot RAM: one range below the MMIO
/// hole, and the rest from 4 GiB on.
pub fn ram_ranges(mem_size: u64) -> Vec<(GuestAddress, u64)> {
    if mem_size <= MMIO_HOLE_START {
        vec![(GuestAddress(0), mem_size)]
    } else {
        vec![
            (GuestAddress(0), MMIO_HOLE_START),
            (GuestAddress(FOUR_GIB), mem_size - MMIO_HOLE_START),
        ]
    }
}

/// End of boot RAM (exclusive): where a hotplug region may start (after alignment).
pub fn boot_ram_end(mem_size: u64) -> u64 {
    ram_ranges(mem_size)
        .last()
        .map_or(0, |(start, size)| start.0.saturating_add(*size))
}

/// The first address above boot RAM usable for a hotplug region ([`HOTPLUG_ALIGN`] aligned).
pub fn hotplug_region_start(mem_size: u64) -> u64 {
    boot_ram_end(mem_size)
        .max(FOUR_GIB)
        .next_multiple_of(HOTPLUG_ALIGN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_range() {
        assert_eq!(ram_ranges(512 << 20), vec![(GuestAddress(0), 512 << 20)]);
        assert_eq!(boot_ram_end(512 << 20), 512 << 20);
        assert_eq!(hotplug_region_start(512 << 20), FOUR_GIB);
    }

    #[test]
    fn large_memory_splits_around_the_hole() {
        let r = ram_ranges(6 << 30);
        assert_eq!(r[0], (GuestAddress(0), MMIO_HOLE_START));
        assert_eq!(r[1], (GuestAddress(FOUR_GIB), (6 << 30) - MMIO_HOLE_START));
        assert_eq!(boot_ram_end(6 << 30), FOUR_GIB + (3 << 30));
        assert_eq!(hotplug_region_start(6 << 30) % HOTPLUG_ALIGN, 0);
    }

    #[test]
    fn fixed_areas_do_not_overlap() {
        let ends = [
            (BOOT_GDT_START, BOOT_IDT_START),
            (ZERO_PAGE_START, ZERO_PAGE_START + 0x1000),
            (PML4_START, PDPTE_START),
            (PDPTE_START, PDE_START),
            (PDE_START, PDE_START + 4 * 0x1000),
            (CMDLINE_START, CMDLINE_START + CMDLINE_MAX_SIZE as u64),
            (ACPI_START, ACPI_END),
            (RESET_VECTOR, HIMEM_START),
        ];
        for (i, a) in ends.iter().enumerate() {
            assert!(a.0 < a.1);
            for b in &ends[i + 1..] {
                assert!(a.1 <= b.0 || b.1 <= a.0, "{a:x?} overlaps {b:x?}");
            }
        }
        const { assert!(PDE_START + 4 * 0x1000 <= CMDLINE_START) };
        const { assert!(VIRTIO_MMIO_START >= MMIO_HOLE_START && IOAPIC_START < FOUR_GIB) };
    }
}
