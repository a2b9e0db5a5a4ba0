//! The virtual machine: KVM VM with in-kernel irqchip and PIT, guest RAM, buses and
//! devices, vCPU threads, and the event loop that runs until the guest stops.

use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, Kvm, VcpuFd, VmFd};
use log::{debug, info, warn};
use virtio_mmio::{MmioInterrupt, MmioTransport, VirtioDevice};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::acpi::{self, AcpiError, VirtioMmioWindow};
use crate::boot::{self, BootError};
use crate::bus::{Bus, BusDevice, BusError};
use crate::cpu::{self, CpuError};
use crate::devices::balloon::{
    BalloonHandler, GuestFreePages, PluggedBlocks, SharedBalloon, VirtioBalloon,
};
use crate::devices::legacy::{AcpiPm, ACPI_PM_BASE, ACPI_PM_PORTS, I8042, I8042_BASE, I8042_PORTS};
use crate::devices::rng::{RngHandler, VirtioRng};
use crate::devices::serial::{SerialDevice, SerialOut, StdinInput, COM1_BASE, COM_PORTS};
use crate::devices::virtio_mem::{
    InterruptLine, MemoryApi, SharedHotplug, SharedVirtioMem, VirtioMemMmio,
};
use crate::diag::{self, DumpRequests, DumpSources, Dumper};
use crate::exit::{exit_channel, ExitHandle, ExitReason, ExitWatch};
use crate::hotplug::{HotplugConfig, HotplugConfigError, HotplugMemory, Memslots};
use crate::layout::{COM1_IRQ, IRQ_MAX, VIRTIO_IRQ_BASE, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START};
use crate::memory::{self, GuestMemoryHandle, MemoryError, MemorySlots};
use memory_backend::{MemoryRegion, PopulateOptions, RegionConfig};
use vmm_api::ApiServer;

/// What to boot.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// bzImage.
    pub kernel: PathBuf,
    /// Initrd.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// vCPUs.
    pub cpus: u8,
    /// Boot RAM in bytes.
    pub mem_size: u64,
    /// Console output file (stdout if `None`).
    pub serial_output: Option<PathBuf>,
    /// Add the virtio entropy device.
    pub rng: bool,
    /// The virtio-mem device, if any.
    pub hotplug: Option<HotplugConfig>,
    /// Serve the memory API on this Unix socket.
    pub api_socket: Option<PathBuf>,
    /// KVM paravirtual features hidden from the guest (a [`cpu::kvm_pv_mask`]).
    pub kvm_pv_off: u32,
    /// Add the balloon (statistics and free page reporting), asking for statistics at
    /// this interval.
    pub balloon: Option<std::time::Duration>,
    /// Automatic sizing from the start.
    pub autosize: Option<vmm_api::AutosizePolicy>,
    /// The most automatic sizing plugs: what the guest's onlining policy can take.
    pub autosize_cap: u64,
}

/// How a run ended, and what the VMM needs to restart the guest the same way.
#[derive(Debug)]
pub struct RunOutcome {
    /// Why the guest stopped.
    pub reason: ExitReason,
    /// The virtio-mem requested size at the end (the guest's next boot starts with it).
    pub requested_size: Option<u64>,
}

/// Errors while building or running the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm cannot be opened or used.
    #[error("cannot use KVM (/dev/kvm): {0}")]
    Kvm(#[source] kvm_ioctls::Error),
    /// A VM-level KVM ioctl failed.
    #[error("KVM {what} failed: {source}")]
    KvmSetup {
        /// Which.
        what: &'static str,
        /// Error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest RAM.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// vCPU setup.
    #[error(transparent)]
    Cpu(#[from] CpuError),
    /// Kernel/initrd/command line.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// ACPI tables.
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    /// Bus layout.
    #[error("device placement: {0}")]
    Bus(#[from] BusError),
    /// An eventfd, file, or thread could not be created.
    #[error("{what}: {source}")]
    Io {
        /// What was attempted.
        what: &'static str,
        /// Error.
        #[source]
        source: io::Error,
    },
    /// The virtio-mmio transport refused the device.
    #[error("virtio-mmio: {0}")]
    Mmio(#[from] virtio_mmio::MmioError),
    /// No GSI left for another device.
    #[error("no interrupt line left for another virtio-mmio device (GSIs {VIRTIO_IRQ_BASE}-{IRQ_MAX} in use)")]
    NoIrq,
    /// The event loop failed.
    #[error("event loop: {0:?}")]
    EventLoop(event_manager::Error),
    /// The memory hotplug options do not make a region this guest can use.
    #[error("memory hotplug options: {0}")]
    HotplugOptions(#[from] HotplugConfigError),
    /// The region needs more KVM memory slots than KVM offers.
    #[error(
        "--hotplug-size {region_size:#x} needs {needed} KVM memory slots of {slot_size:#x} \
         bytes (plus {boot} for boot RAM), but KVM offers {offered}: give a --hotplug-size \
         of at most {fit:#x}"
    )]
    TooManySlots {
        /// The region size asked for.
        region_size: u64,
        /// Slots the region needs.
        needed: u64,
        /// Slot size.
        slot_size: u64,
        /// Slots boot RAM holds.
        boot: u64,
        /// KVM_CAP_NR_MEMSLOTS.
        offered: u64,
        /// The largest region that fits.
        fit: u64,
    },
    /// The host memory of the virtio-mem region could not be reserved.
    #[error("virtio-mem host memory: {0}")]
    HotplugRegion(#[from] memory_backend::MemoryBackendError),
    /// The hotplug memory (slots, timer, guest memory map) could not be set up.
    #[error("virtio-mem: {0}")]
    HotplugMemory(#[from] crate::hotplug::HotplugError),
    /// The virtio-mem device model refused its configuration.
    #[error("virtio-mem device: {0}")]
    VirtioMem(#[from] virtio_mem::VirtioMemError),
    /// The API socket could not be served.
    #[error("API socket: {0}")]
    Api(#[from] vmm_api::ApiServerError),
    /// The automatic sizing policy does not fit the device.
    #[error("--autosize: {0}")]
    Autosize(#[source] crate::capacity::CapacityError),
    /// `--api-socket` was given without a virtio-mem device to control.
    #[error("--api-socket needs a virtio-mem device: give --hotplug-size")]
    ApiWithoutHotplug,
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> VmError {
    move |source| VmError::Io { what, source }
}

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Adapts a virtio-mmio transport to the MMIO bus.
struct MmioDevice(MmioTransport<GuestMemoryHandle>);

impl BusDevice for MmioDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.0.read(offset, data);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.0.write(offset, data);
    }
}

/// Wakes the event loop when a stop is requested.
struct ExitWake(EventFd);

impl MutEventSubscriber for ExitWake {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.read();
    }
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.0, EventSet::IN)) {
            warn!("cannot watch the exit eventfd: {e:?}");
        }
    }
}

/// A VM ready to boot or run.
pub struct Vm {
    kvm: Kvm,
    vm: Arc<VmFd>,
    vcpus: Vec<VcpuFd>,
    mem: GuestMemoryMmap,
    mem_handle: GuestMemoryHandle,
    slots: MemorySlots,
    mem_size: u64,
    io_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    exit: ExitHandle,
    exit_watch: ExitWatch,
    event_manager: EventManager<Subscriber>,
    serial: Arc<Mutex<SerialDevice>>,
    virtio_windows: Vec<VirtioMmioWindow>,
    /// Each virtio-mmio device's name, GSI and interrupt, for the state dump.
    virtio_irqs: Vec<(String, u32, Arc<MmioInterrupt>)>,
    /// Each virtio-mmio transport by device name, for its count of bad accesses.
    virtio_transports: Vec<(&'static str, Arc<Mutex<MmioDevice>>)>,
    entry: Option<u64>,
}

/// The name of a virtio device type in metrics.
fn device_name(device_type: u32) -> &'static str {
    match device_type {
        virtio_balloon::DEVICE_TYPE => "virtio-balloon",
        crate::devices::rng::VIRTIO_ID_RNG => "virtio-rng",
        virtio_mem::wire::VIRTIO_ID_MEM => "virtio-mem",
        _ => "virtio",
    }
}

/// A live count, read when asked.
type Count = Arc<dyn Fn() -> u64 + Send + Sync>;

/// Guest accesses nothing could answer: each virtio-mmio transport's count (wrong width,
/// unknown or read-only register, out-of-order setup) and the buses' (no device at the
/// address). A working guest makes none.
#[derive(Clone, Default)]
pub struct BadAccesses {
    sources: Vec<(&'static str, Count)>,
}

impl std::fmt::Debug for BadAccesses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BadAccesses")
            .field("counts", &self.counts())
            .finish()
    }
}

impl BadAccesses {
    /// Adds a source named `name` (the metric's `where` label) whose count `count` reads.
    pub fn with(
        mut self,
        name: &'static str,
        count: impl Fn() -> u64 + Send + Sync + 'static,
    ) -> Self {
        self.sources.push((name, Arc::new(count)));
        self
    }

    /// `(where, count)` for each source, in the order added.
    pub fn counts(&self) -> Vec<(&'static str, u64)> {
        self.sources.iter().map(|(n, c)| (*n, c())).collect()
    }
}

/// Asks KVM (where it offers `KVM_X86_QUIRK_SLOT_ZAP_ALL`, recent Linux) to drop only a
/// deleted memslot's mappings instead of every mapping of the VM. The all-zap default is a quirk kept for an old bug seen with
/// device passthrough, which this VMM does not do; with it every virtio-mem slot removal
/// makes the guest fault its whole working set back in.
fn narrow_memslot_zaps(vm: &VmFd) {
    let supported =
        vm.check_extension_raw(libc::c_ulong::from(kvm_bindings::KVM_CAP_DISABLE_QUIRKS2));
    let quirk = kvm_bindings::KVM_X86_QUIRK_SLOT_ZAP_ALL;
    let supported = u32::try_from(supported).unwrap_or(0);
    if supported & quirk == 0 {
        debug!("KVM cannot narrow memslot deletion to the slot: every slot removal zaps all");
        return;
    }
    let mut cap = kvm_bindings::kvm_enable_cap {
        cap: kvm_bindings::KVM_CAP_DISABLE_QUIRKS2,
        ..Default::default()
    };
    cap.args[0] = u64::from(quirk);
    match vm.enable_cap(&cap) {
        Ok(()) => debug!("KVM zaps only a deleted memslot's mappings"),
        Err(e) => warn!("cannot disable KVM's zap-all-on-slot-deletion quirk: {e}"),
    }
}

impl Vm {
    /// Creates the VM: KVM, irqchip, PIT, boot RAM, COM1 (to `serial_out`), the i8042 and
    /// ACPI power-management ports, and `cpus` vCPUs (not configured yet).
    ///
    /// # Errors
    ///
    /// [`VmError`] naming the step that failed.
    pub fn new(cpus: u8, mem_size: u64, serial_out: SerialOut) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::Kvm)?;
        let vm = Arc::new(kvm.create_vm().map_err(VmError::Kvm)?);
        let setup = |what| move |source| VmError::KvmSetup { what, source };
        vm.set_tss_address(0xfffb_d000)
            .map_err(setup("SET_TSS_ADDR"))?;
        vm.create_irq_chip().map_err(setup("CREATE_IRQCHIP"))?;
        narrow_memslot_zaps(&vm);
        vm.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(setup("CREATE_PIT2"))?;

        let mem = memory::create_guest_memory(mem_size)?;
        let mut slots = MemorySlots::default();
        memory::register_memslots(&vm, &mem, &mut slots)?;
        let mem_handle = GuestMemoryHandle::new(mem.clone());

        let (exit, exit_watch) = exit_channel().map_err(io_err("exit eventfd"))?;
        let mut event_manager = EventManager::<Subscriber>::new().map_err(VmError::EventLoop)?;
        let wake = EventFd::new(EFD_NONBLOCK).map_err(io_err("exit eventfd"))?;
        // The watch's eventfd is what handles signal; the loop needs its own copy.
        let wake_copy = exit_watch
            .eventfd()
            .try_clone()
            .map_err(io_err("exit eventfd"))?;
        drop(wake);
        event_manager.add_subscriber(Arc::new(Mutex::new(ExitWake(wake_copy))));

        let io_bus = Arc::new(Bus::new());
        let mmio_bus = Arc::new(Bus::new());

        let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(io_err("serial irqfd"))?;
        vm.register_irqfd(&serial_irq, COM1_IRQ)
            .map_err(setup("IRQFD (COM1)"))?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(serial_irq, serial_out)));
        io_bus.insert(serial.clone(), COM1_BASE, COM_PORTS)?;
        io_bus.insert(
            Arc::new(Mutex::new(I8042::new(exit.clone()))),
            I8042_BASE,
            I8042_PORTS,
        )?;
        io_bus.insert(
            Arc::new(Mutex::new(AcpiPm::new(exit.clone()))),
            ACPI_PM_BASE,
            ACPI_PM_PORTS,
        )?;

        let vcpus = (0..cpus)
            .map(|i| vm.create_vcpu(u64::from(i)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(setup("CREATE_VCPU"))?;

        Ok(Self {
            kvm,
            vm,
            vcpus,
            mem,
            mem_handle,
            slots,
            mem_size,
            io_bus,
            mmio_bus,
            exit,
            exit_watch,
            event_manager,
            serial,
            virtio_windows: Vec::new(),
            virtio_irqs: Vec::new(),
            virtio_transports: Vec::new(),
            entry: None,
        })
    }

    /// Guest RAM.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The guest memory handle for devices.
    pub fn memory_handle(&self) -> &GuestMemoryHandle {
        &self.mem_handle
    }

    /// The KVM VM (for memslots added at run time).
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm
    }

    /// Memslot allocation.
    pub fn memory_slots(&mut self) -> &mut MemorySlots {
        &mut self.slots
    }

    /// The I/O port bus.
    pub fn io_bus(&self) -> &Arc<Bus> {
        &self.io_bus
    }

    /// The MMIO bus.
    pub fn mmio_bus(&self) -> &Arc<Bus> {
        &self.mmio_bus
    }

    /// A handle to stop the VM.
    pub fn exit_handle(&self) -> ExitHandle {
        self.exit.clone()
    }

    /// COM1, e.g. to inject console input.
    pub fn serial(&self) -> &Arc<Mutex<SerialDevice>> {
        &self.serial
    }

    /// Adds an event-loop subscriber (a device's queue handler, an API socket...).
    pub fn add_subscriber(&mut self, s: Subscriber) {
        self.event_manager.add_subscriber(s);
    }

    /// Forwards the host's stdin to the guest console.
    pub fn forward_stdin(&mut self) {
        let input = StdinInput::new(self.serial.clone());
        self.add_subscriber(Arc::new(Mutex::new(input)));
    }

    /// Puts `device` behind a new virtio-mmio window with its own GSI: registers the irqfd
    /// and one ioeventfd per queue with KVM and the window on the MMIO bus. Returns the
    /// window and, per queue, a clone of its notification eventfd for the device's event
    /// handler.
    ///
    /// # Errors
    ///
    /// [`VmError`] when no GSI is left or KVM refuses an eventfd.
    pub fn add_virtio_device(
        &mut self,
        device: Arc<Mutex<dyn VirtioDevice<GuestMemoryHandle>>>,
    ) -> Result<(VirtioMmioWindow, Vec<EventFd>), VmError> {
        let index = u32::try_from(self.virtio_windows.len()).map_err(|_| VmError::NoIrq)?;
        let gsi = VIRTIO_IRQ_BASE
            .checked_add(index)
            .filter(|g| *g <= IRQ_MAX)
            .ok_or(VmError::NoIrq)?;
        let base = VIRTIO_MMIO_START + u64::from(index) * VIRTIO_MMIO_SIZE;
        let device_type = device
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .device_type();
        let transport = MmioTransport::new(device, self.mem_handle.clone())?;
        let setup = |what| move |source| VmError::KvmSetup { what, source };
        self.vm
            .register_irqfd(transport.irqfd(), gsi)
            .map_err(setup("IRQFD (virtio-mmio)"))?;
        let transport_irq = transport.interrupt();
        let mut notify = Vec::new();
        for (q, evt) in transport.queue_notify_eventfds().iter().enumerate() {
            let q = u32::try_from(q).map_err(|_| VmError::NoIrq)?;
            self.vm
                .register_ioevent(
                    evt,
                    &IoEventAddress::Mmio(base + virtio_mmio::regs::QUEUE_NOTIFY),
                    q,
                )
                .map_err(setup("IOEVENTFD (virtio-mmio queue notify)"))?;
            notify.push(evt.try_clone().map_err(io_err("queue eventfd"))?);
        }
        let window = Arc::new(Mutex::new(MmioDevice(transport)));
        self.mmio_bus
            .insert(window.clone(), base, VIRTIO_MMIO_SIZE)?;
        self.virtio_transports
            .push((device_name(device_type), window));
        let w = VirtioMmioWindow {
            base,
            size: VIRTIO_MMIO_SIZE,
            gsi,
        };
        info!("virtio-mmio device at {base:#x}, GSI {gsi}");
        self.virtio_irqs.push((
            format!("virtio{index} type={device_type}"),
            gsi,
            transport_irq,
        ));
        self.virtio_windows.push(w);
        Ok((w, notify))
    }

    /// Adds the virtio-mem device for `hp` above boot RAM: reserves the host region,
    /// reserves KVM slot numbers for it, and puts the device behind a virtio-mmio window.
    /// Returns the memory API's view of it.
    ///
    /// # Errors
    ///
    /// [`VmError::HotplugOptions`], [`VmError::TooManySlots`], [`VmError::HotplugRegion`],
    /// [`VmError::HotplugMemory`] or [`VmError::VirtioMem`], naming what failed.
    pub fn add_virtio_mem(&mut self, hp: &HotplugConfig) -> Result<MemoryApi, VmError> {
        // Validated once: the device, the host region and the hotplug memory all take
        // this layout.
        let layout = hp.validate(self.mem_size)?;
        match cpu::guest_phys_bits(&self.kvm)? {
            Some(bits) => hp.check_address_width(layout.addr(), bits)?,
            None => warn!(
                "KVM reports no guest physical address width: cannot check that the guest \
                 can address the virtio-mem region"
            ),
        }
        for w in hp.warnings(self.mem_size) {
            warn!("{w}");
        }
        let slot_size = hp.slot_size(self.mem_size);
        let nr_slots = layout.size().div_ceil(slot_size);
        let first_slot = self.slots.next_free();
        // Slots below the first are boot RAM's.
        let boot_slots = u64::from(first_slot);
        let kvm_slots = u64::try_from(self.kvm.get_nr_memslots()).unwrap_or(0);
        if boot_slots.saturating_add(nr_slots) > kvm_slots {
            return Err(VmError::TooManySlots {
                region_size: layout.size(),
                needed: nr_slots,
                slot_size,
                boot: boot_slots,
                offered: kvm_slots,
                fit: kvm_slots
                    .saturating_sub(boot_slots)
                    .saturating_mul(slot_size),
            });
        }
        for _ in 1..nr_slots {
            self.slots.next_free();
        }
        let mut rcfg = RegionConfig::new(layout).with_backing(hp.backing.backing());
        if hp.populate {
            rcfg = rcfg.with_populate(PopulateOptions::default());
        }
        let region = Arc::new(MemoryRegion::new(rcfg)?);
        crate::hotplug::log_layout(&layout, slot_size);
        let memslots: Arc<dyn Memslots> = self.vm.clone();
        let backend = HotplugMemory::new(
            Arc::clone(&region),
            slot_size,
            first_slot,
            memslots,
            self.mem_handle.clone(),
        )?;
        let registered_slots = backend.registered_slots_gauge();
        let backend: SharedHotplug = Arc::new(Mutex::new(backend));
        let mut dcfg = virtio_mem::DeviceConfig::new(layout);
        dcfg.initial_requested_size = hp.requested_size;
        let irq = Arc::new(InterruptLine::default());
        let device: SharedVirtioMem = Arc::new(Mutex::new(virtio_mem::VirtioMem::new(
            dcfg,
            Arc::clone(&backend),
            irq.clone(),
        )?));
        let mmio = Arc::new(Mutex::new(VirtioMemMmio::new(device.clone(), backend, irq)));
        self.add_virtio_device(mmio)?;
        Ok(MemoryApi::new(device, region, registered_slots))
    }

    /// Adds the virtio entropy device and its queue handler.
    ///
    /// # Errors
    ///
    /// As [`Self::add_virtio_device`], or `/dev/urandom` cannot be opened.
    pub fn add_rng(&mut self) -> Result<(), VmError> {
        let rng = Arc::new(Mutex::new(
            VirtioRng::new().map_err(io_err("open /dev/urandom"))?,
        ));
        let (_, mut notify) = self.add_virtio_device(rng.clone())?;
        let evt = notify.pop().ok_or(VmError::NoIrq)?;
        self.add_subscriber(Arc::new(Mutex::new(RngHandler::new(rng, evt))));
        Ok(())
    }

    /// The counts of guest accesses nothing could answer, as they grow: each virtio
    /// device by name, then `mmio-bus` and `io-bus`.
    pub fn bad_accesses(&self) -> BadAccesses {
        let mut b = BadAccesses::default();
        for (name, t) in &self.virtio_transports {
            let t = Arc::clone(t);
            b = b.with(name, move || {
                t.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .0
                    .bad_accesses()
            });
        }
        let (mmio, io) = (self.mmio_bus.clone(), self.io_bus.clone());
        b.with("mmio-bus", move || mmio.unclaimed_accesses())
            .with("io-bus", move || io.unclaimed_accesses())
    }

    /// Adds the never-inflated balloon, asking for the guest's statistics every
    /// `interval`; its free page reports are discarded in boot RAM and in `plugged`
    /// blocks.
    ///
    /// # Errors
    ///
    /// As [`Self::add_virtio_device`], or the statistics timer cannot be set up.
    pub fn add_balloon(
        &mut self,
        interval: std::time::Duration,
        plugged: Option<PluggedBlocks>,
    ) -> Result<SharedBalloon, VmError> {
        let sink = GuestFreePages::new(&self.mem, plugged);
        let balloon: SharedBalloon = Arc::new(Mutex::new(VirtioBalloon::new(sink)));
        let (_, notify) = self.add_virtio_device(balloon.clone())?;
        let handler = BalloonHandler::new(balloon.clone(), notify, interval)
            .map_err(io_err("balloon statistics timer"))?;
        self.add_subscriber(Arc::new(Mutex::new(handler)));
        Ok(balloon)
    }

    /// Loads the kernel, initrd and command line, writes the ACPI tables and the zero page,
    /// and configures the vCPUs for the 64-bit entry. Add devices before calling this: the
    /// ACPI tables list the virtio-mmio windows present now.
    ///
    /// # Errors
    ///
    /// [`VmError`] naming what could not be loaded or set up.
    pub fn boot_linux(&mut self, cfg: &VmConfig) -> Result<(), VmError> {
        let kernel = boot::load_kernel(&self.mem, &cfg.kernel)?;
        info!(
            "kernel {}: {:?}, entry {:#x}, end {:#x}",
            cfg.kernel.display(),
            kernel.format,
            kernel.entry,
            kernel.end
        );
        let initrd = cfg
            .initrd
            .as_deref()
            .map(|p| boot::load_initrd(&self.mem, p, &kernel, self.mem_size))
            .transpose()?;
        let cmdline = boot::build_cmdline(&cfg.cmdline)?;
        let cpus = u8::try_from(self.vcpus.len()).unwrap_or(u8::MAX);
        let rsdp = acpi::write_acpi_tables(&self.mem, cpus, &self.virtio_windows)?;
        boot::write_boot_params(&self.mem, &kernel, &cmdline, initrd, self.mem_size, rsdp)?;
        cpu::write_boot_tables(&self.mem)?;
        boot::write_reset_stub(&self.mem)?;
        for (i, vcpu) in self.vcpus.iter().enumerate() {
            let i = u8::try_from(i).unwrap_or(u8::MAX);
            cpu::configure_vcpu(&self.kvm, vcpu, i, cpus, kernel.entry, cfg.kvm_pv_off)?;
        }
        self.entry = Some(kernel.entry);
        Ok(())
    }

    /// vCPU `index`, to set up a custom guest (tests run tiny real-mode programs).
    pub fn vcpu(&self, index: usize) -> Option<&VcpuFd> {
        self.vcpus.get(index)
    }

    /// Starts the vCPU threads and runs the event loop until the guest powers off, reboots
    /// or fails.
    ///
    /// # Errors
    ///
    /// [`VmError`] when a vCPU thread cannot be started; guest-side failures are an
    /// [`ExitReason::Error`].
    pub fn run(mut self) -> Result<ExitReason, VmError> {
        let nr_vcpus = u8::try_from(self.vcpus.len()).unwrap_or(u8::MAX);
        let dumper = Arc::new(Dumper::new(
            nr_vcpus,
            DumpSources {
                vm: self.vm.clone(),
                serial: self.serial.clone(),
                virtio: std::mem::take(&mut self.virtio_irqs),
            },
        ));
        // A VMM without its state dump still runs the guest: say so and go on.
        let dump_ready = match diag::install_kick_handler() {
            Ok(()) => match DumpRequests::install(dumper.clone()) {
                Ok(sub) => {
                    self.add_subscriber(Arc::new(Mutex::new(sub)));
                    true
                }
                Err(e) => {
                    warn!("state dump on SIGUSR1 disabled: {e}");
                    false
                }
            },
            Err(e) => {
                warn!("state dump on SIGUSR1 disabled: cannot install the vCPU kick signal: {e}");
                false
            }
        };
        match crate::signals::StopRequests::install(self.exit.clone()) {
            Ok(sub) => self.add_subscriber(Arc::new(Mutex::new(sub))),
            Err(e) => warn!("SIGTERM and SIGINT keep their default action (no clean stop): {e}"),
        }
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        for (i, vcpu) in std::mem::take(&mut self.vcpus).into_iter().enumerate() {
            let (io, mmio, exit) = (
                self.io_bus.clone(),
                self.mmio_bus.clone(),
                self.exit.clone(),
            );
            let id = u8::try_from(i).unwrap_or(u8::MAX);
            let slot = if dump_ready { dumper.slot(id) } else { None };
            let t = std::thread::Builder::new()
                .name(format!("vcpu{i}"))
                .spawn(move || cpu::run_vcpu(vcpu, id, io, mmio, exit, slot))
                .map_err(io_err("spawn vCPU thread"))?;
            threads.push(t);
        }
        // The dumper keeps the vCPU threads (joinable) for as long as a dump may kick them.
        dumper.set_threads(threads);
        let reason = loop {
            if let Some(r) = self.exit_watch.try_reason() {
                break r;
            }
            if let Err(e) = self.event_manager.run() {
                break ExitReason::Error(format!("event loop: {e:?}"));
            }
        };
        if !self.exit.requested() {
            self.exit.request(reason.clone());
        }
        // The exit is requested (now for sure): vCPUs still in the guest are
        // kicked out so that they touch no device while the VM is torn down. Without the
        // kick handler they cannot be, and are left to the process exit.
        if dump_ready {
            let left = dumper.stop_vcpus(VCPU_STOP_TIMEOUT);
            if left > 0 {
                warn!("{left} vCPUs did not leave the guest within {VCPU_STOP_TIMEOUT:?}");
            }
        }
        Ok(reason)
    }
}

/// How long `Vm::run` waits for the vCPUs to leave the guest once the VM stops.
const VCPU_STOP_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);

/// Boots `cfg` and runs it to the end.
///
/// # Errors
///
/// [`VmError`] for setup failures; how the guest ended is the [`ExitReason`].
pub fn run(cfg: &VmConfig) -> Result<ExitReason, VmError> {
    run_outcome(cfg).map(|o| o.reason)
}

/// As [`run`], and also reports the virtio-mem requested size at the end.
///
/// # Errors
///
/// [`VmError`] for setup failures.
pub fn run_outcome(cfg: &VmConfig) -> Result<RunOutcome, VmError> {
    let out: SerialOut = match &cfg.serial_output {
        Some(p) => Box::new(File::create(p).map_err(io_err("create the --serial-output file"))?),
        None => Box::new(io::stdout()),
    };
    let mut vm = Vm::new(cfg.cpus, cfg.mem_size, out)?;
    if cfg.rng {
        vm.add_rng()?;
    }
    let memory = cfg
        .hotplug
        .as_ref()
        .map(|hp| vm.add_virtio_mem(hp).map(Arc::new))
        .transpose()?;
    if let Some(interval) = cfg.balloon {
        let balloon = vm.add_balloon(interval, memory.as_ref().map(|m| m.plugged_blocks()))?;
        if let Some(m) = &memory {
            m.attach_balloon(balloon, cfg.autosize_cap, cfg.autosize.clone())
                .map_err(VmError::Autosize)?;
        }
    }
    if let Some(m) = &memory {
        // Every device is in place now: all of them are counted.
        m.set_bad_accesses(vm.bad_accesses());
    }
    let _api = match (&cfg.api_socket, &memory) {
        (Some(path), Some(memory)) => Some(ApiServer::start(
            path,
            Arc::clone(memory) as Arc<dyn vmm_api::MemoryControl>,
        )?),
        (Some(_), None) => return Err(VmError::ApiWithoutHotplug),
        (None, _) => None,
    };
    vm.forward_stdin();
    vm.boot_linux(cfg)?;
    let reason = vm.run()?;
    let requested_size = memory.map(|m| m.requested_size());
    Ok(RunOutcome {
        reason,
        requested_size,
    })
}
