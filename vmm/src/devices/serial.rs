//! COM1: the 8250 UART from vm-superio on the I/O bus, its output on stdout or a file, and
//! the host's stdin forwarded to the guest's serial input.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use event_manager::{EventOps, Events, MutEventSubscriber};
use log::{debug, warn};
use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// COM1's I/O port base.
pub const COM1_BASE: u64 = 0x3f8;
/// Number of ports of a 8250.
pub const COM_PORTS: u64 = 8;
/// Line status register offset and its data-ready bit (reading it has no side effect).
const LSR_OFFSET: u8 = 5;
const LSR_DATA_READY: u8 = 1;
/// Bytes of host input held while the guest's receive FIFO is full.
const MAX_PENDING_INPUT: usize = 64 * 1024;

/// Raises the UART's interrupt through an irqfd, and counts how often and when (for the
/// state dump: a guest waiting on a serial interrupt shows whether one was raised).
#[derive(Debug)]
pub struct IrqTrigger {
    evt: EventFd,
    raised: AtomicU64,
    last: Mutex<Option<Instant>>,
}

impl IrqTrigger {
    /// A trigger that signals `evt` (an irqfd).
    pub fn new(evt: EventFd) -> Self {
        Self {
            evt,
            raised: AtomicU64::new(0),
            last: Mutex::new(None),
        }
    }
}

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.raised.fetch_add(1, Ordering::Relaxed);
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        self.evt.write(1)
    }
}

/// Where the guest's console output goes.
pub type SerialOut = Box<dyn Write + Send>;

/// The UART plus host input waiting for room in its receive FIFO.
pub struct SerialDevice {
    uart: Serial<IrqTrigger, NoEvents, SerialOut>,
    pending: VecDeque<u8>,
    dropped_input: u64,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice")
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl SerialDevice {
    /// A UART that signals `irq` and writes to `out`.
    pub fn new(irq: EventFd, out: SerialOut) -> Self {
        Self {
            uart: Serial::new(IrqTrigger::new(irq), out),
            pending: VecDeque::new(),
            dropped_input: 0,
        }
    }

    /// Queues host input for the guest: into the receive FIFO as far as it has room, the
    /// rest held until the guest reads (bounded; beyond it, input is dropped and counted).
    pub fn enqueue_input(&mut self, input: &[u8]) {
        let room = MAX_PENDING_INPUT.saturating_sub(self.pending.len());
        let take = input.len().min(room);
        self.pending.extend(input.iter().take(take));
        if take < input.len() {
            self.dropped_input = self
                .dropped_input
                .saturating_add(u64::try_from(input.len() - take).unwrap_or(u64::MAX));
            warn!(
                "serial: guest is not reading its console; dropped {} input bytes so far",
                self.dropped_input
            );
        }
        self.flush_input();
    }

    /// Moves host input into the UART: one byte, and only into an empty FIFO.
    ///
    /// vm-superio drops the received-data interrupt on every RBR read, even when bytes
    /// remain, while Linux's 8250 driver reads at most 256 bytes per pass and relies on
    /// the interrupt to call it back for the rest: bytes left in a fuller FIFO sat there
    /// until more input came (a 270-byte command line lost its newline). With one byte
    /// at a time, every byte raises its own interrupt.
    fn flush_input(&mut self) {
        if self.uart.read(LSR_OFFSET) & LSR_DATA_READY != 0 {
            return;
        }
        let Some(byte) = self.pending.pop_front() else {
            return;
        };
        if let Err(e) = self.uart.enqueue_raw_bytes(&[byte]) {
            self.pending.push_front(byte);
            debug!("serial: cannot queue input: {e:?}");
        }
    }

    /// Bytes of host input not yet in the guest's FIFO.
    pub fn pending_input(&self) -> usize {
        self.pending.len()
    }

    /// One line with the UART's registers (read without their side effects), its receive
    /// FIFO fill, the host input waiting, and its interrupt history.
    pub fn describe(&self) -> String {
        let st = self.uart.state();
        let trigger = self.uart.interrupt_evt();
        let last = trigger
            .last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|t| format!("{:.3}", t.elapsed().as_secs_f64()))
            .unwrap_or_else(|| "never".into());
        format!(
            "serial com1 ier={:#04x} iir={:#04x} lcr={:#04x} mcr={:#04x} lsr={:#04x} msr={:#04x} \
             rx_fifo={} host_input_waiting={} dropped_input={} irq_raised={} last_irq_s_ago={last}",
            st.interrupt_enable,
            st.interrupt_identification,
            st.line_control,
            st.modem_control,
            st.line_status,
            st.modem_status,
            st.in_buffer.len(),
            self.pending.len(),
            self.dropped_input,
            trigger.raised.load(Ordering::Relaxed),
        )
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Ok(off), [first, ..]) = (u8::try_from(offset), data) {
            *first = self.uart.read(off);
        }
        // The guest may just have drained the FIFO.
        self.flush_input();
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), [first, ..]) = (u8::try_from(offset), data) {
            if let Err(e) = self.uart.write(off, *first) {
                debug!("serial: write failed: {e:?}");
            }
        }
    }
}

/// Forwards the host's stdin to the guest's serial input (an event-manager subscriber).
/// On end of input it stops watching stdin; the guest keeps running.
pub struct StdinInput {
    serial: Arc<Mutex<SerialDevice>>,
    stdin: io::Stdin,
}

impl std::fmt::Debug for StdinInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StdinInput").finish_non_exhaustive()
    }
}

impl StdinInput {
    /// Forwards stdin to `serial`.
    pub fn new(serial: Arc<Mutex<SerialDevice>>) -> Self {
        Self {
            serial,
            stdin: io::stdin(),
        }
    }
}

impl MutEventSubscriber for StdinInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 1024];
        let fd = self.stdin.as_raw_fd();
        // Raw read(2) of what is available: std's Stdin is buffered and would block.
        let n = {
            let mut f = std::mem::ManuallyDrop::new(
                // SAFETY: fd is this process's stdin, open for its whole life; ManuallyDrop
                // keeps the File from closing it.
                unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) },
            );
            f.read(&mut buf)
        };
        match n {
            Ok(0) => {
                debug!("serial: end of stdin");
                let _ = ops.remove(events);
            }
            Ok(n) => self
                .serial
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .enqueue_input(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => {
                warn!("serial: cannot read stdin, no more console input: {e}");
                let _ = ops.remove(events);
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let stdin = self.stdin.as_raw_fd();
        if let Err(e) = ops.add(Events::new_raw(stdin, EventSet::IN)) {
            // Regular files cannot be watched with epoll: no console input then.
            warn!("serial: console input disabled, cannot watch stdin: {e:?}");
        }
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

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

    #[test]
    fn output_reaches_the_sink() {
        let sink = Sink::default();
        let mut s = SerialDevice::new(EventFd::new(EFD_NONBLOCK).unwrap(), Box::new(sink.clone()));
        for b in b"hi" {
            s.write(0, &[*b]);
        }
        assert_eq!(*sink.0.lock().unwrap(), b"hi");
    }

    #[test]
    fn input_beyond_the_fifo_waits_for_the_guest() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut s = SerialDevice::new(irq.try_clone().unwrap(), Box::new(io::sink()));
        // Enable the received-data interrupt so input raises it.
        s.write(1, &[1]);
        let input: Vec<u8> = (0..200u8).collect();
        s.enqueue_input(&input);
        assert!(
            s.pending_input() > 0,
            "the 64-byte FIFO cannot hold 200 bytes"
        );
        assert!(irq.read().is_ok());
        let mut got = Vec::new();
        read_ready(&mut s, &mut got, 1000);
        assert_eq!(got, input);
        assert_eq!(s.pending_input(), 0);
    }

    /// Reads received bytes while LSR says data is ready, at most `max`.
    fn read_ready(s: &mut SerialDevice, got: &mut Vec<u8>, max: usize) {
        for _ in 0..max {
            let mut lsr = [0u8];
            s.read(5, &mut lsr);
            if lsr[0] & 1 == 0 {
                break;
            }
            let mut b = [0u8];
            s.read(0, &mut b);
            got.push(b[0]);
        }
    }

    /// Linux's 8250 interrupt handler: while IIR shows an interrupt, read up to 256
    /// received bytes.
    fn linux_8250_irq(s: &mut SerialDevice, got: &mut Vec<u8>) {
        loop {
            let mut iir = [0u8];
            s.read(2, &mut iir);
            if iir[0] & 1 != 0 {
                return;
            }
            read_ready(s, got, 256);
        }
    }

    #[test]
    fn a_line_longer_than_one_driver_pass_arrives_whole() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut s = SerialDevice::new(irq.try_clone().unwrap(), Box::new(io::sink()));
        s.write(1, &[1]);
        let mut input: Vec<u8> = (0..300u32).map(|i| b'a' + (i % 26) as u8).collect();
        input.push(b'\n');
        s.enqueue_input(&input);
        let mut got = Vec::new();
        // The guest runs its handler once per interrupt, as long as interrupts come.
        while irq.read().is_ok() {
            linux_8250_irq(&mut s, &mut got);
        }
        assert_eq!(got, input, "input stuck in the FIFO with no interrupt");
    }
}
