//! Memory hotplug configuration: the virtio-mem region's placement, backing and guest-side
//! onlining policy, checked before the VM starts.

use std::path::PathBuf;

use block_layout::{BlockLayout, LayoutError};
use log::warn;
use memory_backend::{Backing, HugePageSize};

use crate::layout;

/// How the guest should online hotplugged memory (added to its command line).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GuestOnline {
    /// `memhp_default_state=online_movable`: every block in ZONE_MOVABLE, so unplug works.
    Movable,
    /// `memory_hotplug.online_policy=auto-movable`: ZONE_MOVABLE up to the kernel's
    /// MOVABLE:KERNEL ratio (301% by default), Normal beyond.
    AutoMovable,
    /// Add nothing: the guest kernel's built-in default decides (Debian 12: offline;
    /// Debian 13: online into ZONE_NORMAL, where unplug is not reliable).
    Kernel,
    /// `memhp_default_state=offline`: something in the guest onlines blocks itself.
    None,
}

impl GuestOnline {
    /// The most hotplugged memory automatic sizing plugs for a guest with `boot_ram` and a
    /// `region`-byte region: with everything onlined into ZONE_MOVABLE, 3x the boot RAM
    /// (the ratio past which [`HotplugConfig::warnings`] warns); the other policies put
    /// memory beyond the kernel's ratio in ZONE_NORMAL themselves, so the whole region.
    pub fn movable_cap(self, boot_ram: u64, region: u64) -> u64 {
        match self {
            GuestOnline::Movable => boot_ram.saturating_mul(3).min(region),
            GuestOnline::AutoMovable | GuestOnline::Kernel | GuestOnline::None => region,
        }
    }

    /// The command-line parameters this policy adds.
    pub fn cmdline(self) -> &'static str {
        match self {
            GuestOnline::Movable => "memhp_default_state=online_movable",
            GuestOnline::AutoMovable => {
                "memhp_default_state=online memory_hotplug.online_policy=auto-movable"
            }
            GuestOnline::Kernel => "",
            GuestOnline::None => "memhp_default_state=offline",
        }
    }
}

/// Where hotplugged memory comes from, as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackingArg {
    /// Private anonymous memory (default).
    Anon,
    /// A shared memfd.
    Memfd,
    /// A hugetlb memfd with 2 MiB pages.
    Hugetlb2M,
    /// A hugetlb memfd with 1 GiB pages.
    Hugetlb1G,
    /// A file (tmpfs, hugetlbfs or a regular file system).
    File(PathBuf),
}

impl BackingArg {
    /// Parses `anon`, `memfd`, `hugetlb` (2 MiB), `hugetlb-1g` or `file:PATH`.
    ///
    /// # Errors
    ///
    /// A message listing the accepted values.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "anon" => Ok(BackingArg::Anon),
            "memfd" => Ok(BackingArg::Memfd),
            "hugetlb" | "hugetlb-2m" => Ok(BackingArg::Hugetlb2M),
            "hugetlb-1g" => Ok(BackingArg::Hugetlb1G),
            _ => match s.strip_prefix("file:") {
                Some(p) if !p.is_empty() => Ok(BackingArg::File(PathBuf::from(p))),
                _ => Err(format!(
                    "invalid backing '{s}': use anon, memfd, hugetlb, hugetlb-1g or file:PATH"
                )),
            },
        }
    }

    /// The memory-backend backing.
    pub fn backing(&self) -> Backing {
        match self {
            BackingArg::Anon => Backing::PrivateAnonymous,
            BackingArg::Memfd => Backing::SharedMemfd,
            BackingArg::Hugetlb2M => Backing::HugetlbMemfd(HugePageSize::Size2M),
            BackingArg::Hugetlb1G => Backing::HugetlbMemfd(HugePageSize::Size1G),
            BackingArg::File(p) => Backing::File(p.clone()),
        }
    }

    /// The page size the backing needs blocks to be a multiple of, when known up front.
    pub fn page_size(&self) -> Option<u64> {
        match self {
            BackingArg::Hugetlb2M => Some(2 << 20),
            BackingArg::Hugetlb1G => Some(1 << 30),
            _ => None,
        }
    }
}

/// Whether plugged memory is faulted in when it is plugged (`--populate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Populate {
    /// Always.
    On,
    /// Never: memory is faulted in when the guest first touches it.
    Off,
    /// For backings that can run short when the guest touches the memory: hugetlb (an
    /// empty or small pool is a SIGBUS at fault time, which stops the guest) and files (a
    /// full file system, the same). Anonymous memory and memfds are left to first touch.
    Auto,
}

impl Populate {
    /// On or off for `backing`.
    pub fn resolve(self, backing: &BackingArg) -> bool {
        match self {
            Populate::On => true,
            Populate::Off => false,
            Populate::Auto => matches!(
                backing,
                BackingArg::Hugetlb2M | BackingArg::Hugetlb1G | BackingArg::File(_)
            ),
        }
    }
}

/// The virtio-mem part of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HotplugConfig {
    /// Region size in bytes.
    pub region_size: u64,
    /// Block size in bytes.
    pub block_size: u64,
    /// Requested size at boot.
    pub requested_size: u64,
    /// Host backing.
    pub backing: BackingArg,
    /// Fault memory in when it is plugged.
    pub populate: bool,
}

/// Errors in the hotplug options.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HotplugConfigError {
    /// `--hotplug-size` and `--block-size` do not lay out a region.
    #[error("--hotplug-size and --block-size do not make a virtio-mem region: {0}")]
    Layout(#[from] LayoutError),
    /// Block size smaller than the backing's page size.
    #[error("--block-size {block} is smaller than the backing's page size {page}: use --block-size {page} or more")]
    BlockBelowPage {
        /// Block size.
        block: u64,
        /// Page size.
        page: u64,
    },
    /// Requested size not a multiple of the block size, or larger than the region.
    #[error("--requested-size {size} must be a multiple of --block-size {block} and at most --hotplug-size {region}")]
    Requested {
        /// Requested size.
        size: u64,
        /// Block size.
        block: u64,
        /// Region size.
        region: u64,
    },
    /// The region would not fit in the guest's physical address space.
    #[error("--hotplug-size {0} does not fit in the guest physical address space")]
    TooLarge(u64),
    /// The region ends above what the guest CPU can address.
    #[error(
        "--hotplug-size {size} places the virtio-mem region at [{addr:#x}, {end:#x}), above \
         what the guest CPU can address ({bits} physical address bits, up to {limit:#x}): the \
         guest driver could not use it; give --hotplug-size {fit} or less"
    )]
    AboveAddressWidth {
        /// Region size.
        size: u64,
        /// Region start.
        addr: u64,
        /// Region end (exclusive).
        end: u64,
        /// The guest's physical address bits.
        bits: u8,
        /// 1 << bits.
        limit: u64,
        /// The largest block-aligned region size that fits.
        fit: u64,
    },
}

/// Guest memory block size under 64 GiB of boot RAM on x86-64; 2 GiB above (Linux
/// picks its memory block size from the boot memory size).
fn memory_block_align(boot_ram: u64) -> u64 {
    if boot_ram >= 64 << 30 {
        2 << 30
    } else {
        layout::HOTPLUG_ALIGN
    }
}

/// Largest guest-physical address we place memory below (the guest's 46-bit limit on
/// common hosts is larger; 1 << 46 keeps every current x86-64 guest happy).
const MAX_GPA: u64 = 1 << 46;

impl HotplugConfig {
    /// Checks that the region at `addr` ends within the guest's `phys_bits`-bit physical
    /// address space (Linux refuses a device region above it: "could not reserve device
    /// region").
    ///
    /// # Errors
    ///
    /// [`HotplugConfigError::AboveAddressWidth`], saying which size would fit.
    pub fn check_address_width(&self, addr: u64, phys_bits: u8) -> Result<(), HotplugConfigError> {
        let limit = 1u64.checked_shl(u32::from(phys_bits)).unwrap_or(u64::MAX);
        let end = addr.saturating_add(self.region_size);
        if end <= limit {
            return Ok(());
        }
        let room = limit.saturating_sub(addr);
        Err(HotplugConfigError::AboveAddressWidth {
            size: self.region_size,
            addr,
            end,
            bits: phys_bits,
            limit,
            fit: room - room % self.block_size.max(1),
        })
    }

    /// Checks the options against each other and the boot RAM; returns the region's
    /// layout, placed in guest physical memory above boot RAM.
    ///
    /// # Errors
    ///
    /// [`HotplugConfigError`] saying which option is wrong.
    pub fn validate(&self, boot_ram: u64) -> Result<BlockLayout, HotplugConfigError> {
        let bs = self.block_size;
        // The start is aligned to the guest's memory block and to the device block, so
        // only the options themselves can break the layout's rules.
        let align = memory_block_align(boot_ram).max(bs);
        let addr = layout::hotplug_region_start(boot_ram)
            .checked_next_multiple_of(align)
            .ok_or(HotplugConfigError::TooLarge(self.region_size))?;
        let region = BlockLayout::new(addr, self.region_size, bs)?;
        if let Some(page) = self.backing.page_size() {
            if bs < page {
                return Err(HotplugConfigError::BlockBelowPage { block: bs, page });
            }
        }
        if self.requested_size % bs != 0 || self.requested_size > self.region_size {
            return Err(HotplugConfigError::Requested {
                size: self.requested_size,
                block: bs,
                region: self.region_size,
            });
        }
        if region.end() > MAX_GPA {
            return Err(HotplugConfigError::TooLarge(self.region_size));
        }
        Ok(region)
    }

    /// KVM slot size: a whole number of guest memory blocks and of device blocks.
    pub fn slot_size(&self, boot_ram: u64) -> u64 {
        memory_block_align(boot_ram).max(self.block_size)
    }

    /// Warnings about configurations the guest cannot manage well.
    pub fn warnings(&self, boot_ram: u64) -> Vec<String> {
        let mut w = Vec::new();
        // ZONE_MOVABLE needs kernel memory for its metadata and for everything unmovable;
        // past about 3:1 the guest runs out of kernel memory under load.
        if self.region_size > 3 * boot_ram {
            w.push(format!(
                "--hotplug-size {} is more than 3x the boot RAM ({}): a guest onlining it all \
                 into ZONE_MOVABLE may run short of kernel memory; give the guest more boot RAM \
                 or use --guest-online auto-movable",
                self.region_size, boot_ram
            ));
        }
        // The memmap (struct page array) of hotplugged memory, 1/64 of it, lives in boot RAM.
        let memmap = self.region_size / 64;
        if memmap > boot_ram / 4 {
            w.push(format!(
                "the memmap of --hotplug-size {} needs {} bytes of the guest's boot RAM ({}): \
                 plugging it all may fail; give the guest more boot RAM",
                self.region_size, memmap, boot_ram
            ));
        }
        w
    }
}

/// Adds the onlining policy to `cmdline` unless the operator already set one.
pub fn guest_cmdline(cmdline: &str, online: GuestOnline) -> String {
    let extra = online.cmdline();
    if extra.is_empty() {
        return cmdline.to_string();
    }
    if cmdline.split_whitespace().any(|p| {
        p.starts_with("memhp_default_state=") || p.starts_with("memory_hotplug.online_policy=")
    }) {
        warn!("the command line sets memory onlining itself; not adding '{extra}'");
        return cmdline.to_string();
    }
    format!("{cmdline} {extra}")
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]
mod tests {
    use super::*;

    fn cfg(region: u64, block: u64) -> HotplugConfig {
        HotplugConfig {
            region_size: region,
            block_size: block,
            requested_size: 0,
            backing: BackingArg::Anon,
            populate: false,
        }
    }

    #[test]
    fn region_sits_above_boot_ram_aligned_to_the_memory_block() {
        let a = cfg(4 << 30, 2 << 20).validate(512 << 20).unwrap().addr();
        assert_eq!(a, 4 << 30, "above the 32-bit hole");
        let a = cfg(4 << 30, 2 << 20).validate(6 << 30).unwrap().addr();
        assert!(a >= (4 << 30) + (3 << 30));
        assert_eq!(a % (128 << 20), 0);
        let a = cfg(4 << 30, 2 << 20).validate(64 << 30).unwrap().addr();
        assert_eq!(
            a % (2 << 30),
            0,
            "2 GiB memory blocks from 64 GiB of boot RAM"
        );
        let a = cfg(4 << 30, 1 << 30).validate(512 << 20).unwrap().addr();
        assert_eq!(a % (1 << 30), 0);
    }

    #[test]
    fn populate_auto_is_on_where_a_fault_could_find_no_memory() {
        let file = BackingArg::File(PathBuf::from("/dev/shm/x"));
        for (backing, auto) in [
            (BackingArg::Anon, false),
            (BackingArg::Memfd, false),
            (BackingArg::Hugetlb2M, true),
            (BackingArg::Hugetlb1G, true),
            (file, true),
        ] {
            assert_eq!(Populate::Auto.resolve(&backing), auto, "{backing:?}");
            assert!(Populate::On.resolve(&backing));
            assert!(!Populate::Off.resolve(&backing));
        }
    }

    #[test]
    fn a_region_above_the_guest_address_width_is_refused_with_a_size_that_fits() {
        let tb = 1u64 << 40;
        let hp = cfg(tb, 2 << 20);
        let addr = hp.validate(512 << 20).unwrap().addr();
        // 40 bits, as the nested test host gives its guests: 1 TiB from 4 GiB ends above.
        let e = hp.check_address_width(addr, 40).unwrap_err();
        let HotplugConfigError::AboveAddressWidth {
            end, limit, fit, ..
        } = e
        else {
            panic!("{e}");
        };
        assert_eq!((end, limit, fit), (addr + tb, tb, tb - addr));
        assert!(e.to_string().contains("40 physical address bits"), "{e}");
        cfg(fit, 2 << 20).check_address_width(addr, 40).unwrap();
        hp.check_address_width(addr, 41).unwrap();
        // Small widths: nothing fits above 4 GiB in 32 bits.
        let e = cfg(2 << 20, 2 << 20)
            .check_address_width(addr, 32)
            .unwrap_err();
        assert!(matches!(
            e,
            HotplugConfigError::AboveAddressWidth { fit: 0, .. }
        ));
        cfg(2 << 20, 2 << 20).check_address_width(addr, 64).unwrap();
    }

    #[test]
    fn bad_options_say_what_is_wrong() {
        assert_eq!(
            cfg(1 << 30, 3 << 20).validate(1 << 30),
            Err(HotplugConfigError::Layout(LayoutError::BlockSize(3 << 20)))
        );
        assert!(matches!(
            cfg(5 << 20, 2 << 20).validate(1 << 30),
            Err(HotplugConfigError::Layout(LayoutError::Unaligned { .. }))
        ));
        let mut c = cfg(1 << 30, 2 << 20);
        c.requested_size = 2 << 30;
        assert!(matches!(
            c.validate(1 << 30),
            Err(HotplugConfigError::Requested { .. })
        ));
        c.requested_size = 0;
        c.backing = BackingArg::Hugetlb1G;
        assert!(matches!(
            c.validate(1 << 30),
            Err(HotplugConfigError::BlockBelowPage { .. })
        ));
        assert!(matches!(
            cfg(1 << 50, 2 << 20).validate(1 << 30),
            Err(HotplugConfigError::TooLarge(_))
        ));
        assert!(BackingArg::parse("swap")
            .unwrap_err()
            .contains("anon, memfd"));
        assert_eq!(
            BackingArg::parse("file:/dev/shm/x").unwrap(),
            BackingArg::File("/dev/shm/x".into())
        );
    }

    #[test]
    fn warns_beyond_what_boot_memory_can_manage() {
        assert!(cfg(1 << 30, 2 << 20).warnings(512 << 20).is_empty());
        let w = cfg(4 << 30, 2 << 20).warnings(512 << 20);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("3x"));
        let w = cfg(64 << 30, 2 << 20).warnings(512 << 20);
        assert_eq!(w.len(), 2, "{w:?}");
    }

    #[test]
    fn onlining_policy_goes_on_the_command_line_once() {
        assert_eq!(
            guest_cmdline("console=ttyS0", GuestOnline::Movable),
            "console=ttyS0 memhp_default_state=online_movable"
        );
        assert_eq!(
            guest_cmdline("a memhp_default_state=offline", GuestOnline::Movable),
            "a memhp_default_state=offline"
        );
        assert_eq!(guest_cmdline("a", GuestOnline::Kernel), "a");
        assert!(guest_cmdline("a", GuestOnline::AutoMovable).contains("online_policy=auto-movable"));
    }
}
