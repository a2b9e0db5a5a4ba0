//! The VMM's state on request, for diagnosing a guest that stalls: `kill -USR1 <vmm pid>`
//! prints, on stderr, one `vmm-dump:` line per item: each vCPU's registers and interrupt
//! state (RIP, RFLAGS.IF, pending and injected events, run state, the local APIC's IRR,
//! ISR, TPR and PPR), COM1's registers and interrupt history, the IOAPIC redirection
//! entries and the PIC's of COM1's and the virtio devices' GSIs, and each virtio-mmio
//! device's interrupt status.
//!
//! A vCPU's registers can only be read by its own thread (KVM holds the vCPU while it
//! runs), so the dumper sets a request flag per vCPU and kicks its thread out of `KVM_RUN`
//! with a signal; the thread answers with its state after the exit. A halted vCPU is
//! kicked too (KVM returns `EINTR`).

use std::fmt::Write as _;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventOps, Events, MutEventSubscriber};
use kvm_bindings::{kvm_irqchip, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER};
use kvm_ioctls::{VcpuFd, VmFd};
use log::warn;
use virtio_mmio::MmioInterrupt;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::devices::serial::SerialDevice;
use crate::layout::COM1_IRQ;

/// The signal that asks for a dump.
pub const DUMP_SIGNAL: libc::c_int = libc::SIGUSR1;
/// Offset from `SIGRTMIN` of the signal that kicks a vCPU thread out of `KVM_RUN`.
const KICK_SIGNAL_OFFSET: libc::c_int = 0;
/// How long the dumper waits for every vCPU to answer.
const VCPU_ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

extern "C" fn on_kick_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing: its only job is to make KVM_RUN return EINTR.
}

/// The kick signal's number.
fn kick_signal() -> libc::c_int {
    SIGRTMIN() + KICK_SIGNAL_OFFSET
}

/// Installs the no-op handler of the kick signal (once per process; the vCPU threads
/// inherit it). Without a handler the default action of a real-time signal would kill
/// the process.
///
/// # Errors
///
/// The handler cannot be registered.
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    register_signal_handler(kick_signal(), on_kick_signal)
}

/// One vCPU's side of a dump: a request flag its thread polls after every exit, and the
/// channel it answers on.
#[derive(Debug)]
pub struct VcpuDumpSlot {
    index: u8,
    requested: AtomicBool,
    answer: Mutex<Sender<(u8, String)>>,
}

impl VcpuDumpSlot {
    /// Called by the vCPU thread after each exit from `KVM_RUN`: answers a pending request.
    pub fn answer_if_requested(&self, vcpu: &VcpuFd) {
        if self.requested.swap(false, Ordering::SeqCst) {
            let text = describe_vcpu(vcpu, self.index);
            let tx = self.answer.lock().unwrap_or_else(|p| p.into_inner());
            // The dumper may have given up waiting; then nobody reads it.
            let _ = tx.send((self.index, text));
        }
    }
}

/// Everything a dump reads, shared by the VM with the dumper.
pub struct DumpSources {
    /// The VM (irqchip state).
    pub vm: Arc<VmFd>,
    /// COM1.
    pub serial: Arc<Mutex<SerialDevice>>,
    /// The virtio-mmio devices: (name, GSI, interrupt).
    pub virtio: Vec<(String, u32, Arc<MmioInterrupt>)>,
}

/// The dumper: per-vCPU slots, the vCPU threads to kick, and what else to read.
pub struct Dumper {
    slots: Vec<Arc<VcpuDumpSlot>>,
    answers: Mutex<Receiver<(u8, String)>>,
    /// The vCPU threads, kept joinable (never detached) so that their pthread ids stay
    /// valid for pthread_kill even after a thread has ended.
    threads: Mutex<Vec<JoinHandle<()>>>,
    sources: DumpSources,
}

impl std::fmt::Debug for Dumper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dumper")
            .field("vcpus", &self.slots.len())
            .finish_non_exhaustive()
    }
}

impl Dumper {
    /// A dumper for `vcpus` vCPUs reading `sources`.
    pub fn new(vcpus: u8, sources: DumpSources) -> Self {
        let (tx, rx) = channel();
        let slots = (0..vcpus)
            .map(|index| {
                Arc::new(VcpuDumpSlot {
                    index,
                    requested: AtomicBool::new(false),
                    answer: Mutex::new(tx.clone()),
                })
            })
            .collect();
        Self {
            slots,
            answers: Mutex::new(rx),
            threads: Mutex::new(Vec::new()),
            sources,
        }
    }

    /// The slot of vCPU `index`, for its thread.
    pub fn slot(&self, index: u8) -> Option<Arc<VcpuDumpSlot>> {
        self.slots.get(usize::from(index)).cloned()
    }

    /// Takes the vCPU threads, in vCPU order, so that a dump can kick them. The dumper
    /// keeps them joinable for as long as it lives.
    pub fn set_threads(&self, threads: Vec<JoinHandle<()>>) {
        let mut t = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        *t = threads;
    }

    /// Takes the vCPU threads out of the guest once the VM's exit is requested (their run
    /// loop then returns): kicks each until it has ended, at most `timeout`, and joins
    /// those that did. Returns how many are still running. A kick that lands just before
    /// a thread enters KVM_RUN is lost, hence the repeated kicks.
    pub fn stop_vcpus(&self, timeout: Duration) -> usize {
        let mut threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        let deadline = Instant::now() + timeout;
        loop {
            let (done, running): (Vec<_>, Vec<_>) =
                threads.drain(..).partition(JoinHandle::is_finished);
            *threads = running;
            for t in done {
                if t.join().is_err() {
                    warn!("a vCPU thread panicked");
                }
            }
            if threads.is_empty() || Instant::now() >= deadline {
                return threads.len();
            }
            for t in threads.iter() {
                // SAFETY: the id comes from a JoinHandle that `threads` (locked here)
                // holds: the thread is neither joined nor detached, so the id is valid
                // even if the thread has just ended (then pthread_kill reports ESRCH). The
                // kick signal has a no-op handler (the caller installed it with
                // install_kick_handler before starting the threads), so it only
                // interrupts KVM_RUN.
                unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Collects the whole dump as lines (without the `vmm-dump:` prefix).
    pub fn collect(&self) -> Vec<String> {
        let mut lines = Vec::new();
        lines.extend(self.vcpu_states());
        lines.push(serial_line(&self.sources.serial));
        lines.extend(irqchip_lines(
            &self.sources.vm,
            std::iter::once(("com1".to_string(), COM1_IRQ)).chain(
                self.sources
                    .virtio
                    .iter()
                    .map(|(name, gsi, _)| (name.clone(), *gsi)),
            ),
        ));
        for (name, gsi, irq) in &self.sources.virtio {
            lines.push(format!(
                "virtio {name} gsi={gsi} interrupt_status={:#x} device_status={:#x} config_generation={}",
                irq.status(),
                irq.device_status(),
                irq.config_generation()
            ));
        }
        lines
    }

    fn vcpu_states(&self) -> Vec<String> {
        let answers = self.answers.lock().unwrap_or_else(|p| p.into_inner());
        // Answers of an earlier dump that came too late.
        while answers.try_recv().is_ok() {}
        for s in &self.slots {
            s.requested.store(true, Ordering::SeqCst);
        }
        let threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        let mut got: Vec<Option<String>> = vec![None; self.slots.len()];
        let deadline = Instant::now() + VCPU_ANSWER_TIMEOUT;
        // A kick that lands just before a thread enters KVM_RUN does not interrupt it:
        // kick again until every vCPU answered.
        while got.iter().any(Option::is_none) && Instant::now() < deadline {
            for (i, t) in threads.iter().enumerate() {
                if got.get(i).is_some_and(Option::is_none) {
                    // SAFETY: the id comes from a JoinHandle that `threads` (locked here)
                    // holds: the thread is neither joined nor detached, so the id is valid
                    // even if the thread has ended (then pthread_kill only reports ESRCH).
                    // The kick signal has a no-op handler (install_kick_handler), so it
                    // only interrupts KVM_RUN.
                    unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
                }
            }
            if let Ok((i, text)) = answers.recv_timeout(Duration::from_millis(20)) {
                if let Some(g) = got.get_mut(usize::from(i)) {
                    *g = Some(text);
                }
            }
        }
        for s in &self.slots {
            s.requested.store(false, Ordering::SeqCst);
        }
        got.into_iter()
            .enumerate()
            .map(|(i, g)| {
                g.unwrap_or_else(|| {
                    format!(
                        "vcpu{i} no answer within {} ms (stuck outside KVM_RUN, or in a device)",
                        VCPU_ANSWER_TIMEOUT.as_millis()
                    )
                })
            })
            .collect()
    }
}

/// Vectors whose bit is set in a local APIC 256-bit register (8 x 32-bit words, 16 bytes
/// apart) at `offset` of the register page.
fn apic_vectors(regs: &[std::os::raw::c_char; 1024], offset: usize) -> Vec<u32> {
    let mut v = Vec::new();
    for word in 0..8u32 {
        let at = offset + usize::try_from(word).unwrap_or(0) * 16;
        let value = apic_reg(regs, at);
        for bit in 0..32 {
            if value & (1 << bit) != 0 {
                v.push(word * 32 + bit);
            }
        }
    }
    v
}

/// One 32-bit local APIC register.
fn apic_reg(regs: &[std::os::raw::c_char; 1024], offset: usize) -> u32 {
    let mut raw = [0u8; 4];
    if let Some(bytes) = regs.get(offset..offset + 4) {
        for (r, b) in raw.iter_mut().zip(bytes) {
            *r = b.to_ne_bytes()[0];
        }
    }
    u32::from_le_bytes(raw)
}

fn hex_list(v: &[u32]) -> String {
    let items: Vec<String> = v.iter().map(|x| format!("{x:#x}")).collect();
    format!("[{}]", items.join(","))
}

fn mp_state_name(s: u32) -> &'static str {
    match s {
        kvm_bindings::KVM_MP_STATE_RUNNABLE => "runnable",
        kvm_bindings::KVM_MP_STATE_UNINITIALIZED => "uninitialized",
        kvm_bindings::KVM_MP_STATE_INIT_RECEIVED => "init_received",
        kvm_bindings::KVM_MP_STATE_HALTED => "halted",
        kvm_bindings::KVM_MP_STATE_SIPI_RECEIVED => "sipi_received",
        _ => "other",
    }
}

/// One line with a vCPU's registers and interrupt state; read by the vCPU's own thread.
pub(crate) fn describe_vcpu(vcpu: &VcpuFd, index: u8) -> String {
    let mut s = format!("vcpu{index}");
    match vcpu.get_mp_state() {
        Ok(m) => {
            let _ = write!(s, " state={}", mp_state_name(m.mp_state));
        }
        Err(e) => {
            let _ = write!(s, " state=? ({e})");
        }
    }
    match vcpu.get_regs() {
        Ok(r) => {
            let _ = write!(
                s,
                " rip={:#x} rsp={:#x} rflags={:#x} if={}",
                r.rip,
                r.rsp,
                r.rflags,
                (r.rflags >> 9) & 1
            );
        }
        Err(e) => {
            let _ = write!(s, " regs=? ({e})");
        }
    }
    if let Ok(sr) = vcpu.get_sregs() {
        let _ = write!(s, " cr8={:#x} apic_base={:#x}", sr.cr8, sr.apic_base);
    }
    match vcpu.get_vcpu_events() {
        Ok(e) => {
            let _ = write!(
                s,
                " irq_injected={} irq_nr={:#x} irq_shadow={} nmi_injected={} nmi_pending={} nmi_masked={} exc_injected={} exc_pending={} exc_nr={}",
                e.interrupt.injected,
                e.interrupt.nr,
                e.interrupt.shadow,
                e.nmi.injected,
                e.nmi.pending,
                e.nmi.masked,
                e.exception.injected,
                e.exception.pending,
                e.exception.nr
            );
        }
        Err(e) => {
            let _ = write!(s, " events=? ({e})");
        }
    }
    match vcpu.get_lapic() {
        Ok(l) => {
            let _ = write!(
                s,
                " apic_id={:#x} tpr={:#x} ppr={:#x} svr={:#x} irr={} isr={} lvt_timer={:#x} lvt_lint0={:#x}",
                apic_reg(&l.regs, 0x20) >> 24,
                apic_reg(&l.regs, 0x80),
                apic_reg(&l.regs, 0xa0),
                apic_reg(&l.regs, 0xf0),
                hex_list(&apic_vectors(&l.regs, 0x200)),
                hex_list(&apic_vectors(&l.regs, 0x100)),
                apic_reg(&l.regs, 0x320),
                apic_reg(&l.regs, 0x350)
            );
        }
        Err(e) => {
            let _ = write!(s, " lapic=? ({e})");
        }
    }
    s
}

fn serial_line(serial: &Arc<Mutex<SerialDevice>>) -> String {
    let s = serial.lock().unwrap_or_else(|p| p.into_inner());
    s.describe()
}

/// The fields of an IOAPIC redirection entry.
fn redirection(bits: u64) -> String {
    let f = |shift: u32, mask: u64| (bits >> shift) & mask;
    format!(
        "vector={:#x} delivery_mode={} dest_mode={} delivery_status={} polarity={} remote_irr={} trigger={} masked={} dest={:#x}",
        f(0, 0xff),
        f(8, 0x7),
        if f(11, 1) == 1 { "logical" } else { "physical" },
        f(12, 1),
        if f(13, 1) == 1 { "low" } else { "high" },
        f(14, 1),
        if f(15, 1) == 1 { "level" } else { "edge" },
        f(16, 1),
        f(56, 0xff)
    )
}

fn irqchip_lines(vm: &VmFd, gsis: impl Iterator<Item = (String, u32)>) -> Vec<String> {
    let mut lines = Vec::new();
    let mut ioapic = kvm_irqchip {
        chip_id: KVM_IRQCHIP_IOAPIC,
        ..Default::default()
    };
    match vm.get_irqchip(&mut ioapic) {
        Ok(()) => {
            // SAFETY: KVM_GET_IRQCHIP with chip_id KVM_IRQCHIP_IOAPIC fills the `ioapic`
            // member of the union, and every bit pattern is a valid kvm_ioapic_state.
            let state = unsafe { ioapic.chip.ioapic };
            lines.push(format!("ioapic irr={:#x}", state.irr));
            for (name, gsi) in gsis {
                let Some(entry) = state
                    .redirtbl
                    .get(usize::try_from(gsi).unwrap_or(usize::MAX))
                else {
                    continue;
                };
                // SAFETY: the union's members are two views of the same 64 bits; `bits`
                // is valid for any value.
                let bits = unsafe { entry.bits };
                let pending = (state.irr >> gsi) & 1;
                lines.push(format!(
                    "ioapic gsi={gsi} ({name}) line_pending={pending} {}",
                    redirection(bits)
                ));
            }
        }
        Err(e) => lines.push(format!("ioapic unreadable: {e}")),
    }
    let mut pic = kvm_irqchip {
        chip_id: KVM_IRQCHIP_PIC_MASTER,
        ..Default::default()
    };
    match vm.get_irqchip(&mut pic) {
        Ok(()) => {
            // SAFETY: KVM_GET_IRQCHIP with a PIC chip_id fills the `pic` member; every bit
            // pattern is a valid kvm_pic_state.
            let p = unsafe { pic.chip.pic };
            lines.push(format!(
                "pic master irr={:#04x} imr={:#04x} isr={:#04x} elcr={:#04x}",
                p.irr, p.imr, p.isr, p.elcr
            ));
        }
        Err(e) => lines.push(format!("pic unreadable: {e}")),
    }
    lines
}

/// Watches for the dump signal and prints a dump on stderr (an event-loop subscriber).
/// The dump itself runs on a short-lived thread: the event loop keeps serving the
/// console and the devices while the vCPUs are asked.
pub struct DumpRequests {
    evt: EventFd,
    dumper: Arc<Dumper>,
}

impl std::fmt::Debug for DumpRequests {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DumpRequests").finish_non_exhaustive()
    }
}

impl DumpRequests {
    /// Registers the handler of [`DUMP_SIGNAL`] and returns the subscriber that serves it.
    ///
    /// # Errors
    ///
    /// The eventfd or the signal handler cannot be set up.
    pub fn install(dumper: Arc<Dumper>) -> std::io::Result<Self> {
        let evt = crate::signals::signal_eventfd(DUMP_SIGNAL)?;
        Ok(Self { evt, dumper })
    }
}

/// Prints `lines` as one dump on stderr, each prefixed `vmm-dump:` and framed by a begin
/// and an end line (so a reader knows it has the whole dump).
pub fn print_dump(lines: &[String]) {
    use std::io::Write;
    let mut out = String::from("vmm-dump: begin\n");
    for l in lines {
        out.push_str("vmm-dump: ");
        out.push_str(l);
        out.push('\n');
    }
    out.push_str("vmm-dump: end\n");
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(out.as_bytes());
    let _ = err.flush();
}

impl MutEventSubscriber for DumpRequests {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        let dumper = self.dumper.clone();
        let spawned = std::thread::Builder::new()
            .name("state-dump".into())
            .spawn(move || print_dump(&dumper.collect()));
        if let Err(e) = spawned {
            warn!("cannot start the state dump: {e}");
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, EventSet::IN)) {
            warn!("state dump on SIGUSR1 disabled: cannot watch its eventfd: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirection_entry_fields() {
        // Vector 0x24, fixed, physical, edge, unmasked, destination 1.
        let bits = 0x24 | (1u64 << 56);
        let r = redirection(bits);
        assert!(r.contains("vector=0x24"), "{r}");
        assert!(r.contains("trigger=edge masked=0 dest=0x1"), "{r}");
        let masked_level = 0x30 | (1 << 15) | (1 << 16) | (1 << 14);
        let r = redirection(masked_level);
        assert!(r.contains("remote_irr=1 trigger=level masked=1"), "{r}");
    }

    #[test]
    fn apic_vector_bits() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        // IRR word 1 (vectors 32-63), bit 4 -> vector 36; word 7 bit 31 -> vector 255.
        regs[0x210] = 0x10;
        regs[0x270 + 3] = std::os::raw::c_char::from_ne_bytes([0x80]);
        assert_eq!(apic_vectors(&regs, 0x200), vec![36, 255]);
        assert_eq!(hex_list(&[36, 255]), "[0x24,0xff]");
        assert_eq!(apic_reg(&regs, 0x210), 0x10);
    }
}
