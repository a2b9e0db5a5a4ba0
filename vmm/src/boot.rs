//! The Linux x86 boot protocol: load the kernel (a bzImage, or an uncompressed ELF
//! `vmlinux`) and the initrd, write the command line and the zero page (`boot_params`) with
//! an e820 map of boot RAM only.

use std::fs::File;
use std::io::{Read, Seek};
use std::path::Path;

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{load_cmdline, BzImage, Cmdline, Elf, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, ReadVolatile};

use crate::layout::{
    self, ACPI_START, CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIMEM_START, INITRD_ADDR_MAX,
    RESET_VECTOR, ZERO_PAGE_START,
};

/// Errors of the boot protocol.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file cannot be opened.
    #[error("cannot open kernel {path}: {source}")]
    KernelOpen {
        /// The path.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel is neither a bzImage nor an x86-64 ELF `vmlinux`, or does not fit.
    #[error("cannot load kernel {path} (is it an x86 bzImage or an x86-64 ELF vmlinux that fits in guest RAM?): {reason}")]
    KernelLoad {
        /// The path.
        path: String,
        /// Why.
        reason: String,
    },
    /// The initrd cannot be opened or read.
    #[error("cannot read initrd {path}: {source}")]
    InitrdRead {
        /// The path.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The initrd does not fit in low boot RAM above the kernel.
    #[error("initrd {path} ({size} bytes) does not fit in guest RAM between the kernel end {kernel_end:#x} and {limit:#x}: give the guest more memory")]
    InitrdTooLarge {
        /// The path.
        path: String,
        /// Its size.
        size: u64,
        /// End of the loaded kernel.
        kernel_end: u64,
        /// Highest address it may end at.
        limit: u64,
    },
    /// The command line is invalid or too long.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// Writing boot data into guest memory failed.
    #[error("cannot write {what} into guest memory: {reason}")]
    Write {
        /// What.
        what: &'static str,
        /// Why.
        reason: String,
    },
}

/// The kernel image formats `--kernel` takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// A bzImage (`/boot/vmlinuz-*`): the kernel decompresses itself in guest memory.
    BzImage,
    /// An uncompressed x86-64 ELF `vmlinux`: its segments go straight to their physical
    /// addresses, so the guest neither decompresses nor touches a compressed copy.
    Elf,
}

/// What the vCPU setup needs from the loaded kernel.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// The 64-bit entry point.
    pub entry: u64,
    /// End of the loaded image.
    pub end: u64,
    /// The setup header, the base of the zero page: the bzImage's own, or for an ELF
    /// kernel (which has none) the fields the 64-bit boot protocol reads.
    pub header: setup_header,
    /// What was loaded.
    pub format: KernelFormat,
}

/// e820 entry types.
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
/// Offset of the 64-bit entry point from the protected-mode kernel start.
const STARTUP_64_OFFSET: u64 = 0x200;

/// `"HdrS"`, the setup header's magic.
const HDR_MAGIC: u32 = 0x5372_6448;
/// The alignment an x86-64 kernel is built for (`CONFIG_PHYSICAL_ALIGN` of distro kernels).
const KERNEL_ALIGNMENT: u32 = 0x0100_0000;
/// `e_machine` of x86-64.
const EM_X86_64: u16 = 62;

/// The format of a kernel image from its first 20 bytes (`ident`): ELF files must be
/// 64-bit x86 (the reason is returned otherwise); anything else is taken for a bzImage,
/// which its loader checks.
fn kernel_format(ident: &[u8]) -> Result<KernelFormat, &'static str> {
    if ident.get(..4) != Some(b"\x7fELF".as_slice()) {
        return Ok(KernelFormat::BzImage);
    }
    match (ident.get(4), ident.get(18..20)) {
        (Some(2), Some(&[lo, hi])) if u16::from_le_bytes([lo, hi]) == EM_X86_64 => {
            Ok(KernelFormat::Elf)
        }
        (Some(2), Some(_)) => Err("an ELF file for another architecture than x86-64"),
        (Some(_), Some(_)) => Err("a 32-bit ELF file"),
        _ => Err("a truncated ELF file"),
    }
}

/// Loads the kernel at `path`: a bzImage, or an x86-64 ELF `vmlinux` (what Firecracker
/// and Cloud Hypervisor boot), told apart by the file's first bytes.
///
/// # Errors
///
/// [`BootError::KernelOpen`], [`BootError::KernelLoad`].
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BootError> {
    let p = path.display().to_string();
    let mut f = File::open(path).map_err(|source| BootError::KernelOpen {
        path: p.clone(),
        source,
    })?;
    let mut ident = Vec::with_capacity(20);
    (&mut f)
        .take(20)
        .read_to_end(&mut ident)
        .and_then(|_| f.rewind())
        .map_err(|source| BootError::KernelOpen {
            path: p.clone(),
            source,
        })?;
    let format = kernel_format(&ident).map_err(|reason| BootError::KernelLoad {
        path: p.clone(),
        reason: reason.into(),
    })?;
    if format == KernelFormat::Elf {
        return load_elf(mem, &mut f, p);
    }
    let r = BzImage::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START))).map_err(|e| {
        BootError::KernelLoad {
            path: p.clone(),
            reason: e.to_string(),
        }
    })?;
    let header = r.setup_header.ok_or(BootError::KernelLoad {
        path: p,
        reason: "no setup header".into(),
    })?;
    Ok(LoadedKernel {
        entry: r.kernel_load.raw_value() + STARTUP_64_OFFSET,
        end: r.kernel_end,
        header,
        format: KernelFormat::BzImage,
    })
}

/// Loads an ELF `vmlinux` at its segments' physical addresses. Its entry (`e_entry`,
/// `phys_startup_64`) is the 64-bit boot protocol's entry of the kernel proper, so the
/// vCPU setup is the bzImage's. The kernel runs where it was linked (16 MiB for distro
/// kernels): the physical KASLR of a bzImage is the decompressor's work and does not
/// happen (the kernel still randomizes its virtual memory regions).
fn load_elf(mem: &GuestMemoryMmap, f: &mut File, p: String) -> Result<LoadedKernel, BootError> {
    let r = Elf::load(mem, None, f, Some(GuestAddress(HIMEM_START))).map_err(|e| {
        BootError::KernelLoad {
            path: p,
            reason: e.to_string(),
        }
    })?;
    Ok(LoadedKernel {
        entry: r.kernel_load.raw_value(),
        end: r.kernel_end,
        header: setup_header {
            header: HDR_MAGIC,
            kernel_alignment: KERNEL_ALIGNMENT,
            ..Default::default()
        },
        format: KernelFormat::Elf,
    })
}

/// Where the initrd went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedInitrd {
    /// Guest address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// Loads the initrd at `path` at the top of low boot RAM (below 2 GiB and below what the
/// kernel says it can reach), page aligned.
///
/// # Errors
///
/// [`BootError::InitrdRead`], [`BootError::InitrdTooLarge`].
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel: &LoadedKernel,
    mem_size: u64,
) -> Result<LoadedInitrd, BootError> {
    let p = path.display().to_string();
    let read_err = |source| BootError::InitrdRead {
        path: p.clone(),
        source,
    };
    let mut f = File::open(path).map_err(read_err)?;
    let size = f.metadata().map_err(read_err)?.len();
    let low_end = layout::ram_ranges(mem_size)
        .first()
        .map_or(0, |(s, l)| s.0 + l);
    let kernel_max = match u64::from(kernel.header.initrd_addr_max) {
        0 => INITRD_ADDR_MAX,
        m => m,
    };
    let limit = low_end.min(INITRD_ADDR_MAX.min(kernel_max).saturating_add(1));
    let too_large = || BootError::InitrdTooLarge {
        path: p.clone(),
        size,
        kernel_end: kernel.end,
        limit,
    };
    let addr = limit.checked_sub(size).ok_or_else(too_large)? & !0xfff;
    if addr < kernel.end {
        return Err(too_large());
    }
    let len = usize::try_from(size).map_err(|_| too_large())?;
    let mut slice_holder =
        mem.get_slice(GuestAddress(addr), len)
            .map_err(|e| BootError::Write {
                what: "initrd",
                reason: e.to_string(),
            })?;
    f.read_exact_volatile(&mut slice_holder)
        .map_err(|e| BootError::InitrdRead {
            path: p.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
    Ok(LoadedInitrd { addr, size })
}

/// Builds the kernel command line.
///
/// # Errors
///
/// [`BootError::Cmdline`] when it is too long or malformed.
pub fn build_cmdline(cmdline: &str) -> Result<Cmdline, BootError> {
    let mut c = Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))?;
    if !cmdline.trim().is_empty() {
        c.insert_str(cmdline.trim()).map_err(|e| {
            BootError::Cmdline(format!("{e} (at most {} bytes)", CMDLINE_MAX_SIZE - 1))
        })?;
    }
    Ok(c)
}

/// The e820 map: boot RAM only (the hotplug region is never in it), with the legacy BIOS
/// area and the ACPI tables reserved.
pub fn e820_map(mem_size: u64) -> Vec<boot_e820_entry> {
    let entry = |addr, size, r#type| boot_e820_entry { addr, size, r#type };
    let mut map = vec![
        entry(0, EBDA_START, E820_RAM),
        entry(ACPI_START, HIMEM_START - ACPI_START, E820_RESERVED),
    ];
    for (start, size) in layout::ram_ranges(mem_size) {
        let (s, e) = (start.0.max(HIMEM_START), start.0 + size);
        if e > s {
            map.push(entry(s, e - s, E820_RAM));
        }
    }
    map
}

/// Real-mode code at the reset vector: `mov al, 0xfe; out 0x64, al; hlt; jmp $-1`.
///
/// Linux may reboot by jumping back to the BIOS reset vector (`reboot=b`, and its last
/// resort); there is no BIOS, so this stub asks the i8042 for a reset, which the VMM sees
/// as a reboot, instead of running zeros forever.
pub const RESET_STUB: [u8; 7] = [0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd];

/// Writes [`RESET_STUB`] at the reset vector.
///
/// # Errors
///
/// [`BootError::Write`] when the address is not guest RAM.
pub fn write_reset_stub(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    mem.write_slice(&RESET_STUB, GuestAddress(RESET_VECTOR))
        .map_err(|e| BootError::Write {
            what: "reset vector stub",
            reason: e.to_string(),
        })
}

/// Writes the command line and the zero page.
///
/// # Errors
///
/// [`BootError::Write`], [`BootError::Cmdline`].
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    cmdline: &Cmdline,
    initrd: Option<LoadedInitrd>,
    mem_size: u64,
    rsdp_addr: u64,
) -> Result<(), BootError> {
    load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline).map_err(|e| BootError::Write {
        what: "command line",
        reason: e.to_string(),
    })?;
    let cmdline_len = cmdline
        .as_cstring()
        .map_err(|e| BootError::Cmdline(e.to_string()))?
        .as_bytes()
        .len();

    let mut params = boot_params {
        hdr: kernel.header,
        ..Default::default()
    };
    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.cmd_line_ptr = u32::try_from(CMDLINE_START).unwrap_or(0);
    params.hdr.cmdline_size = u32::try_from(cmdline_len).unwrap_or(0);
    params.hdr.vid_mode = 0xffff; // "normal", no video mode change
    if let Some(i) = initrd {
        params.hdr.ramdisk_image = u32::try_from(i.addr).map_err(|_| BootError::Write {
            what: "initrd address",
            reason: format!("{:#x} is above 4 GiB", i.addr),
        })?;
        params.hdr.ramdisk_size = u32::try_from(i.size).map_err(|_| BootError::Write {
            what: "initrd size",
            reason: format!("{} bytes is 4 GiB or more", i.size),
        })?;
    }
    params.acpi_rsdp_addr = rsdp_addr;
    let map = e820_map(mem_size);
    params.e820_entries = u8::try_from(map.len()).unwrap_or(0);
    for (slot, e) in params.e820_table.iter_mut().zip(map) {
        *slot = e;
    }
    let bp = BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(&bp, mem).map_err(|e| {
        BootError::Write {
            what: "zero page",
            reason: e.to_string(),
        }
    })
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]
mod tests {
    use super::*;

    #[test]
    fn e820_has_boot_ram_only() {
        let m = e820_map(512 << 20);
        assert_eq!(m.len(), 3);
        let (addr, size) = (m[2].addr, m[2].size);
        assert_eq!((addr, size), (HIMEM_START, (512 << 20) - HIMEM_START));
        let m = e820_map(8 << 30);
        let ram: u64 = m
            .iter()
            .filter(|e| ({ e.r#type }) == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, (8 << 30) - (HIMEM_START - EBDA_START));
        let last_addr = m.last().unwrap().addr;
        assert_eq!(last_addr, layout::FOUR_GIB);
    }

    #[test]
    fn cmdline_too_long_is_an_error() {
        assert!(build_cmdline("console=ttyS0").is_ok());
        let long = "a".repeat(CMDLINE_MAX_SIZE + 1);
        let e = build_cmdline(&long).unwrap_err();
        assert!(e.to_string().contains("command line"));
    }

    #[test]
    fn missing_kernel_says_which_file() {
        let mem = crate::memory::create_guest_memory(16 << 20).unwrap();
        let e = load_kernel(&mem, Path::new("/nonexistent/vmlinuz")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/vmlinuz"));
    }

    #[test]
    fn non_bzimage_is_refused() {
        let mem = crate::memory::create_guest_memory(16 << 20).unwrap();
        let dir = std::env::temp_dir().join(format!("vmm-boot-test-{}", std::process::id()));
        std::fs::write(&dir, vec![0u8; 4096]).unwrap();
        let e = load_kernel(&mem, &dir).unwrap_err();
        std::fs::remove_file(&dir).unwrap();
        assert!(matches!(e, BootError::KernelLoad { .. }));
    }

    /// A minimal x86-64 ELF executable: one PT_LOAD segment of `payload` at physical
    /// address `paddr` with `bss` more bytes of memory, entry `entry`.
    fn elf_image(paddr: u64, entry: u64, payload: &[u8], bss: u64) -> Vec<u8> {
        let (ehsize, phsize) = (64u16, 56u16);
        let data_off = u64::from(ehsize + phsize);
        let mut f = Vec::new();
        f.extend_from_slice(b"\x7fELF");
        f.extend_from_slice(&[2, 1, 1, 0]); // 64-bit, little endian, version 1, SysV
        f.extend_from_slice(&[0; 8]);
        f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        f.extend_from_slice(&EM_X86_64.to_le_bytes());
        f.extend_from_slice(&1u32.to_le_bytes());
        f.extend_from_slice(&entry.to_le_bytes());
        f.extend_from_slice(&u64::from(ehsize).to_le_bytes()); // e_phoff
        f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
        f.extend_from_slice(&0u32.to_le_bytes()); // e_flags
        for v in [ehsize, phsize, 1, 64, 0, 0] {
            f.extend_from_slice(&v.to_le_bytes());
        }
        assert_eq!(f.len(), usize::from(ehsize));
        let len = payload.len() as u64;
        f.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        f.extend_from_slice(&7u32.to_le_bytes()); // RWX
        for v in [
            data_off,
            paddr | 0xffff_ffff_8000_0000,
            paddr,
            len,
            len + bss,
            4096,
        ] {
            f.extend_from_slice(&v.to_le_bytes());
        }
        f.extend_from_slice(payload);
        f
    }

    fn temp_file(tag: &str, bytes: &[u8]) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("vmm-boot-{tag}-{}", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn kernel_format_tells_elf_from_bzimage_and_refuses_foreign_elf() {
        let elf = elf_image(16 << 20, 16 << 20, &[0x90], 0);
        assert_eq!(kernel_format(&elf[..20]), Ok(KernelFormat::Elf));
        assert_eq!(kernel_format(&[0u8; 20]), Ok(KernelFormat::BzImage));
        assert_eq!(kernel_format(b"MZ"), Ok(KernelFormat::BzImage));
        let mut arm = elf[..20].to_vec();
        arm[18..20].copy_from_slice(&183u16.to_le_bytes()); // EM_AARCH64
        assert!(kernel_format(&arm)
            .unwrap_err()
            .contains("another architecture"));
        let mut elf32 = elf[..20].to_vec();
        elf32[4] = 1;
        assert!(kernel_format(&elf32).unwrap_err().contains("32-bit"));
        assert!(kernel_format(&elf[..10]).unwrap_err().contains("truncated"));
    }

    #[test]
    fn elf_vmlinux_loads_at_its_physical_address_with_a_boot_protocol_header() {
        let mem = crate::memory::create_guest_memory(32 << 20).unwrap();
        let payload: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
        let (paddr, entry) = (16 << 20, (16 << 20) + 0x40);
        let path = temp_file("elf", &elf_image(paddr, entry, &payload, 0x3000));
        let k = load_kernel(&mem, &path);
        std::fs::remove_file(&path).unwrap();
        let k = k.unwrap();
        assert_eq!(k.format, KernelFormat::Elf);
        assert_eq!(k.entry, entry);
        assert_eq!(k.end, paddr + payload.len() as u64 + 0x3000);
        assert_eq!({ k.header.header }, HDR_MAGIC);
        assert_eq!({ k.header.kernel_alignment }, KERNEL_ALIGNMENT);
        let mut back = vec![0u8; payload.len()];
        mem.read_slice(&mut back, GuestAddress(paddr)).unwrap();
        assert_eq!(back, payload);
    }

    #[test]
    fn elf_beyond_guest_ram_or_below_high_memory_is_refused() {
        let mem = crate::memory::create_guest_memory(16 << 20).unwrap();
        let path = temp_file("elf-far", &elf_image(32 << 20, 32 << 20, &[1; 64], 0));
        let far = load_kernel(&mem, &path);
        std::fs::write(&path, elf_image(0x1000, 0x1000, &[1; 64], 0)).unwrap();
        let low = load_kernel(&mem, &path);
        std::fs::remove_file(&path).unwrap();
        for e in [far.unwrap_err(), low.unwrap_err()] {
            assert!(matches!(e, BootError::KernelLoad { .. }), "{e}");
            assert!(e.to_string().contains("vmlinux"), "{e}");
        }
    }

    #[test]
    fn initrd_goes_high_and_too_large_fails() {
        let mem = crate::memory::create_guest_memory(64 << 20).unwrap();
        let kernel = LoadedKernel {
            entry: HIMEM_START + 0x200,
            end: 8 << 20,
            header: setup_header::default(),
            format: KernelFormat::BzImage,
        };
        let path = std::env::temp_dir().join(format!("vmm-initrd-test-{}", std::process::id()));
        std::fs::write(&path, vec![7u8; 10_000]).unwrap();
        let i = load_initrd(&mem, &path, &kernel, 64 << 20).unwrap();
        assert_eq!(i.size, 10_000);
        assert_eq!(i.addr % 4096, 0);
        assert!(i.addr + i.size <= 64 << 20 && i.addr >= 60 << 20);
        std::fs::write(&path, vec![7u8; 60 << 20]).unwrap();
        let e = load_initrd(&mem, &path, &kernel, 64 << 20).unwrap_err();
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(e, BootError::InitrdTooLarge { .. }));
    }
}
