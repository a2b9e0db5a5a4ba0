//! The command line: `vmm run --kernel --initrd --cmdline --cpus --memory`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::hotplug::{guest_cmdline, BackingArg, GuestOnline, HotplugConfig, Populate};
use crate::vm::VmConfig;
use vmm_api::{AutosizePolicy, AutosizeRequest};

/// A KVM VMM that boots Linux with virtio-mmio devices announced through ACPI.
#[derive(Debug, Parser)]
#[command(name = "vmm", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a Linux guest and run it until it powers off or reboots. Exit status: 0 guest
    /// powered off, 2 guest rebooted (with --on-reboot exit), 1 error.
    Run(RunArgs),
    /// Ask a running VMM to resize its guest's hotplugged memory, e.g. `resize --api-socket
    /// S 2G`. Prints the status right after, one key=value per line.
    Resize(ResizeArgs),
    /// Print a running VMM's memory figures, one key=value per line.
    Status(StatusArgs),
    /// Turn a running VMM's automatic sizing on (`min=512M,max=8G[,target=75]
    /// [,headroom=256M][,beyond_cap=yes]`) or `off`. Prints the status right after.
    Autosize(AutosizeArgs),
}

/// `vmm autosize` options.
#[derive(Debug, Args)]
pub struct AutosizeArgs {
    /// The VMM's API socket.
    #[arg(long)]
    pub api_socket: PathBuf,
    /// `off`, or the policy: `min=SIZE,max=SIZE[,target=PERCENT][,headroom=SIZE][,beyond_cap=yes]`.
    #[arg(value_parser = parse_autosize_request)]
    pub policy: AutosizeRequest,
    /// Seconds to wait for the connection and the VMM's answer.
    #[arg(long, default_value_t = 10)]
    pub timeout: u64,
}

/// Parses `off` or a policy for `vmm autosize`.
///
/// # Errors
///
/// A message naming what is wrong.
pub fn parse_autosize_request(s: &str) -> Result<AutosizeRequest, String> {
    if s.trim() == "off" {
        return Ok(AutosizeRequest::Off);
    }
    parse_autosize(s).map(AutosizeRequest::On)
}

/// Parses a policy `min=SIZE,max=SIZE[,target=PERCENT][,headroom=SIZE][,beyond_cap=yes]`.
///
/// # Errors
///
/// A message naming what is wrong.
pub fn parse_autosize(s: &str) -> Result<AutosizePolicy, String> {
    let p = AutosizePolicy::parse_spec(s).map_err(|e| e.to_string())?;
    p.check().map_err(|e| e.to_string())?;
    Ok(p)
}

/// `vmm resize` options.
#[derive(Debug, Args)]
pub struct ResizeArgs {
    /// The VMM's API socket.
    #[arg(long)]
    pub api_socket: PathBuf,
    /// The new requested size, e.g. 2G or 0.
    #[arg(value_parser = parse_size)]
    pub size: u64,
    /// Follow the resize with a progress line until plugged equals requested (exit 0),
    /// the timeout passes (exit 3), or it is stalled at the timeout (exit 4, with why).
    #[arg(long)]
    pub wait: bool,
    /// Seconds to wait: for the VMM's answer (default 10), or with --wait for the whole
    /// resize (default 600).
    #[arg(long)]
    pub timeout: Option<u64>,
}

impl ResizeArgs {
    /// The timeout that applies, with its default.
    pub fn timeout(&self) -> std::time::Duration {
        let default = if self.wait { 600 } else { 10 };
        std::time::Duration::from_secs(self.timeout.unwrap_or(default))
    }
}

/// `vmm status` options.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The VMM's API socket.
    #[arg(long)]
    pub api_socket: PathBuf,
    /// Seconds to wait for the connection and the VMM's answer.
    #[arg(long, default_value_t = 10)]
    pub timeout: u64,
}

/// What a guest reboot does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnReboot {
    /// The VMM exits with status 2.
    Exit,
    /// The VMM restarts in place (same process, console and API socket): a system reset
    /// that unplugs all hotplugged memory; the guest boots again with the requested size
    /// it had.
    Restart,
}

/// `vmm run` options.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Linux kernel: an x86 bzImage (e.g. /boot/vmlinuz-*) or an uncompressed x86-64 ELF
    /// vmlinux (the guest then does not decompress itself).
    #[arg(long)]
    pub kernel: PathBuf,
    /// Initial ramdisk.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line (e.g. "console=ttyS0 panic=-1").
    #[arg(long, default_value = "console=ttyS0")]
    pub cmdline: String,
    /// Number of vCPUs (1-254).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=254))]
    pub cpus: u8,
    /// Boot RAM, e.g. 512M or 4G (K, M, G, T suffixes, powers of 1024).
    #[arg(long, default_value = "512M", value_parser = parse_size)]
    pub memory: u64,
    /// Write the guest console to this file instead of stdout.
    #[arg(long)]
    pub serial_output: Option<PathBuf>,
    /// Do not add the virtio entropy device (by default one virtio-mmio device, an entropy
    /// source, is present).
    #[arg(long)]
    pub no_rng: bool,
    /// Size of the virtio-mem hotplug region above boot RAM, e.g. 4G (0: no virtio-mem).
    #[arg(long, default_value = "0", value_parser = parse_size)]
    pub hotplug_size: u64,
    /// virtio-mem block size, e.g. 2M (default: the host's transparent huge page size).
    #[arg(long, value_parser = parse_size)]
    pub block_size: Option<u64>,
    /// Memory the guest should plug at boot, e.g. 1G.
    #[arg(long, default_value = "0", value_parser = parse_size)]
    pub requested_size: u64,
    /// Host memory behind hotplugged blocks: anon, memfd, hugetlb, hugetlb-1g or file:PATH.
    #[arg(long, default_value = "anon", value_parser = BackingArg::parse)]
    pub backing: BackingArg,
    /// Fault hotplugged memory in (in parallel) when the guest plugs it, instead of on
    /// first touch: on, off, or auto (on for backings that can run short at fault time,
    /// hugetlb and files, so a shortage answers the plug BUSY instead of stopping the
    /// guest later). While the guest adds what it plugged, the next blocks it will plug
    /// are faulted in ahead (up to 256 MiB, inaccessible until plugged, given back if
    /// not). `--populate` alone means on.
    #[arg(long, value_enum, default_value = "auto", num_args = 0..=1, default_missing_value = "on")]
    pub populate: Populate,
    /// Add a virtio-balloon device that is never inflated: the guest's memory statistics
    /// (for --autosize and the API) and free page reporting, so host memory follows what
    /// the guest really uses between resizes too. The guest needs its virtio_balloon
    /// driver.
    #[arg(long)]
    pub balloon: bool,
    /// Milliseconds between two statistics requests to the balloon.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..=60_000))]
    pub balloon_stats_ms: u64,
    /// Size the guest's hotplugged memory automatically from its own statistics:
    /// `min=SIZE,max=SIZE[,target=PERCENT][,headroom=SIZE][,beyond_cap=yes]`, e.g.
    /// min=512M,max=8G,target=75. With `--guest-online movable` it plugs at most 3x the
    /// boot RAM unless `beyond_cap=yes`.
    /// Implies --balloon; needs --hotplug-size. Turn it off at run time with `vmm autosize
    /// --api-socket S off`.
    #[arg(long, value_parser = parse_autosize)]
    pub autosize: Option<AutosizePolicy>,
    /// Serve the memory API (HTTP/JSON) on this Unix socket.
    #[arg(long)]
    pub api_socket: Option<PathBuf>,
    /// How the guest onlines hotplugged memory (added to the kernel command line).
    #[arg(long, value_enum, default_value = "movable")]
    pub guest_online: GuestOnline,
    /// What a guest reboot does.
    #[arg(long, value_enum, default_value = "exit")]
    pub on_reboot: OnReboot,
    /// KVM paravirtual features to hide from the guest, comma separated: async-pf,
    /// steal-time, pv-eoi, pv-unhalt, pv-tlb-flush, async-pf-vmexit, pv-send-ipi,
    /// poll-control, pv-sched-yield, async-pf-int, or all (the KVM clock stays). For hosts
    /// whose KVM mishandles one, such as a nested test host.
    #[arg(long, value_delimiter = ',')]
    pub kvm_pv_off: Vec<String>,
}

/// Smallest boot RAM accepted: a distro kernel with an initramfs needs this much to boot.
pub const MIN_MEMORY: u64 = 64 << 20;
/// Largest boot RAM accepted (1 TiB).
pub const MAX_MEMORY: u64 = 1 << 40;

pub use vmm_api::parse_size;

/// The default virtio-mem block size: the host's THP size, so unplug never splits a huge
/// page (2 MiB when it cannot be read).
pub fn default_block_size() -> u64 {
    memory_backend::accounting::thp_size().unwrap_or(2 << 20)
}

/// Adds `reboot=acpi` unless the command line picks a reboot method. The platform resets
/// through the FADT reset register; Linux's default sequence (seen with Debian's 6.1 kernel)
/// never reached it nor the i8042 here and spun after "reboot: Restarting system".
pub fn with_reboot_method(cmdline: &str) -> String {
    if cmdline.split_whitespace().any(|p| p.starts_with("reboot=")) {
        cmdline.to_string()
    } else {
        format!("{cmdline} reboot=acpi")
    }
}

/// Errors in the arguments that clap cannot check alone.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CliError {
    /// Memory below [`MIN_MEMORY`].
    #[error("--memory {0} bytes is too small: a Linux guest needs at least 64M")]
    MemoryTooSmall(u64),
    /// Memory above [`MAX_MEMORY`].
    #[error("--memory {0} bytes is too large: at most 1T")]
    MemoryTooLarge(u64),
    /// Memory not a whole number of 4 KiB pages.
    #[error("--memory {0} bytes is not a multiple of 4K pages")]
    MemoryUnaligned(u64),
    /// A requested size without a region to plug it from.
    #[error("--requested-size needs --hotplug-size")]
    NoHotplugRegion,
    /// Automatic sizing without a region to size.
    #[error("--autosize needs --hotplug-size (the region it plugs memory from)")]
    AutosizeWithoutHotplug,
    /// `--kvm-pv-off` names a feature this VMM does not know.
    #[error(
        "--kvm-pv-off: unknown KVM paravirtual feature '{0}' (async-pf, steal-time, pv-eoi, \
         pv-unhalt, pv-tlb-flush, async-pf-vmexit, pv-send-ipi, poll-control, pv-sched-yield, \
         async-pf-int, all)"
    )]
    UnknownPvFeature(String),
    /// A file does not exist or is not a regular file.
    #[error("{what} file {path} does not exist or is not a file")]
    MissingFile {
        /// Which option.
        what: &'static str,
        /// The path.
        path: String,
    },
}

impl RunArgs {
    /// Checks the arguments and turns them into a VM configuration.
    ///
    /// # Errors
    ///
    /// [`CliError`] saying which argument is wrong.
    pub fn to_config(&self) -> Result<VmConfig, CliError> {
        if self.memory < MIN_MEMORY {
            return Err(CliError::MemoryTooSmall(self.memory));
        }
        if self.memory > MAX_MEMORY {
            return Err(CliError::MemoryTooLarge(self.memory));
        }
        if self.memory % 4096 != 0 {
            return Err(CliError::MemoryUnaligned(self.memory));
        }
        let check = |what, p: &PathBuf| {
            if p.is_file() {
                Ok(())
            } else {
                Err(CliError::MissingFile {
                    what,
                    path: p.display().to_string(),
                })
            }
        };
        check("--kernel", &self.kernel)?;
        if let Some(i) = &self.initrd {
            check("--initrd", i)?;
        }
        let hotplug = (self.hotplug_size > 0).then(|| HotplugConfig {
            region_size: self.hotplug_size,
            block_size: self.block_size.unwrap_or_else(default_block_size),
            requested_size: self.requested_size,
            backing: self.backing.clone(),
            populate: self.populate.resolve(&self.backing),
        });
        if hotplug.is_none() && self.requested_size > 0 {
            return Err(CliError::NoHotplugRegion);
        }
        if hotplug.is_none() && self.autosize.is_some() {
            return Err(CliError::AutosizeWithoutHotplug);
        }
        let balloon = (self.balloon || self.autosize.is_some())
            .then(|| std::time::Duration::from_millis(self.balloon_stats_ms));
        let cmdline = match hotplug {
            Some(_) => guest_cmdline(&self.cmdline, self.guest_online),
            None => self.cmdline.clone(),
        };
        let cmdline = with_reboot_method(&cmdline);
        let kvm_pv_off =
            crate::cpu::kvm_pv_mask(&self.kvm_pv_off).map_err(CliError::UnknownPvFeature)?;
        Ok(VmConfig {
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            cmdline,
            cpus: self.cpus,
            mem_size: self.memory,
            serial_output: self.serial_output.clone(),
            rng: !self.no_rng,
            hotplug,
            api_socket: self.api_socket.clone(),
            kvm_pv_off,
            balloon,
            autosize: self.autosize.clone(),
            autosize_cap: self
                .guest_online
                .movable_cap(self.memory, self.hotplug_size),
        })
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]
mod tests {
    use super::*;

    #[test]
    fn kvm_pv_off_names_features() {
        let exe = std::env::current_exe().unwrap();
        let exe = exe.to_str().unwrap();
        let Command::Run(a) = Cli::try_parse_from([
            "vmm",
            "run",
            "--kernel",
            exe,
            "--kvm-pv-off",
            "pv-tlb-flush,async-pf-int",
        ])
        .unwrap()
        .command
        else {
            panic!("not a run command");
        };
        assert_eq!(a.to_config().unwrap().kvm_pv_off, (1 << 9) | (1 << 14));
        let Command::Run(a) =
            Cli::try_parse_from(["vmm", "run", "--kernel", exe, "--kvm-pv-off", "bogus"])
                .unwrap()
                .command
        else {
            panic!("not a run command");
        };
        let e = a.to_config().unwrap_err().to_string();
        assert!(e.contains("unknown KVM paravirtual feature 'bogus'"), "{e}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("4G").unwrap(), 4 << 30);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("1024k").unwrap(), 1 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("").unwrap_err().contains("expected a number"));
        assert!(parse_size("G").unwrap_err().contains("expected a number"));
        assert!(parse_size("5X").unwrap_err().contains("unknown suffix"));
        assert!(parse_size("99999999999T")
            .unwrap_err()
            .contains("too large"));
    }

    fn args(mem: &str, kernel: &str) -> Result<RunArgs, clap::Error> {
        Cli::try_parse_from(["vmm", "run", "--kernel", kernel, "--memory", mem]).map(|c| {
            match c.command {
                Command::Run(a) => a,
                other => panic!("parsed {other:?}, not run"),
            }
        })
    }

    #[test]
    fn config_errors_say_what_is_wrong() {
        let exe = std::env::current_exe().unwrap();
        let exe = exe.to_str().unwrap();
        assert_eq!(
            args("16M", exe).unwrap().to_config().unwrap_err(),
            CliError::MemoryTooSmall(16 << 20)
        );
        assert_eq!(
            args("2T", exe).unwrap().to_config().unwrap_err(),
            CliError::MemoryTooLarge(2 << 40)
        );
        assert_eq!(
            args("67108865", exe).unwrap().to_config().unwrap_err(),
            CliError::MemoryUnaligned(67_108_865)
        );
        let e = args("512M", "/no/such/vmlinuz")
            .unwrap()
            .to_config()
            .unwrap_err();
        assert!(e.to_string().contains("/no/such/vmlinuz"));
        let c = args("1G", exe).unwrap().to_config().unwrap();
        assert_eq!((c.mem_size, c.cpus, c.rng), (1 << 30, 1, true));
        let e = args("lots", exe).unwrap_err().to_string();
        assert!(e.contains("invalid size 'lots'"), "{e}");
        let e = Cli::try_parse_from(["vmm", "run", "--kernel", exe, "--cpus", "0"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--cpus"), "{e}");
    }

    #[test]
    fn hotplug_options_shape_the_config_and_command_line() {
        let exe = std::env::current_exe().unwrap();
        let exe = exe.to_str().unwrap();
        let parse = |extra: &[&str]| {
            let mut argv = vec!["vmm", "run", "--kernel", exe];
            argv.extend_from_slice(extra);
            match Cli::try_parse_from(argv).unwrap().command {
                Command::Run(a) => a.to_config(),
                other => panic!("parsed {other:?}, not run"),
            }
        };
        let c = parse(&[
            "--hotplug-size",
            "4G",
            "--requested-size",
            "1G",
            "--block-size",
            "2M",
        ])
        .unwrap();
        let hp = c.hotplug.unwrap();
        assert_eq!(
            (hp.region_size, hp.requested_size, hp.block_size),
            (4 << 30, 1 << 30, 2 << 20)
        );
        assert!(c.cmdline.contains("memhp_default_state=online_movable"));
        assert!(c.cmdline.ends_with("reboot=acpi"));
        let c = parse(&["--hotplug-size", "1G", "--guest-online", "kernel"]).unwrap();
        assert!(!c.cmdline.contains("memhp_default_state"));
        let c = parse(&[]).unwrap();
        assert!(c.hotplug.is_none());
        assert_eq!(
            parse(&["--requested-size", "1G"]).unwrap_err(),
            CliError::NoHotplugRegion
        );
        assert_eq!(with_reboot_method("a reboot=k"), "a reboot=k");
    }
}
