//! Driver-side tests of the virtio-mmio transport: feature negotiation, queue setup,
//! activation, reset, config space, and a hostile driver writing garbage everywhere.
#![expect(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE as ACK, VIRTIO_CONFIG_S_DRIVER as DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK as DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK as FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET as NEEDS_RESET, VIRTIO_F_VERSION_1,
};
use virtio_mmio::regs::*;
use virtio_mmio::{
    ActivateError, Activation, InterruptKind, MmioError, MmioTransport, VirtioDevice,
    VirtioInterrupt,
};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryMmap};

type Mem = Arc<GuestMemoryMmap>;

const FEATURE_A: u64 = 1 << 3;
const FEATURE_HIGH: u64 = 1 << 35;

#[derive(Default)]
struct Record {
    activations: AtomicUsize,
    resets: AtomicUsize,
    acked_features: Mutex<Option<u64>>,
    queues: Mutex<Vec<(u16, u16, u64)>>,
    config_writes: Mutex<Vec<(u64, Vec<u8>)>>,
}

struct TestDevice {
    sizes: Vec<u16>,
    config: Vec<u8>,
    rec: Arc<Record>,
    interrupt: Option<Arc<dyn VirtioInterrupt>>,
    fail_activate: bool,
    active: Option<Activation<Mem>>,
}

impl TestDevice {
    fn new(rec: Arc<Record>) -> Self {
        Self {
            sizes: vec![256, 16],
            config: (0u8..24).collect(),
            rec,
            interrupt: None,
            fail_activate: false,
            active: None,
        }
    }
}

impl VirtioDevice<Mem> for TestDevice {
    fn device_type(&self) -> u32 {
        24
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }
    fn device_features(&self) -> u64 {
        FEATURE_A | FEATURE_HIGH
    }
    fn ack_features(&mut self, features: u64) {
        *self.rec.acked_features.lock().unwrap() = Some(features);
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| self.config.get(o))
                .copied()
                .unwrap_or(0);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.rec
            .config_writes
            .lock()
            .unwrap()
            .push((offset, data.to_vec()));
    }
    fn set_interrupt(&mut self, interrupt: Arc<dyn VirtioInterrupt>) {
        self.interrupt = Some(interrupt);
    }
    fn activate(&mut self, a: Activation<Mem>) -> Result<(), ActivateError> {
        if self.fail_activate {
            return Err(ActivateError::Setup("test refuses".into()));
        }
        self.rec.activations.fetch_add(1, Ordering::SeqCst);
        *self.rec.queues.lock().unwrap() = a
            .queues
            .iter()
            .map(|q| (q.index, q.queue.size(), q.queue.desc_table()))
            .collect();
        self.active = Some(a);
        Ok(())
    }
    fn reset(&mut self) {
        self.rec.resets.fetch_add(1, Ordering::SeqCst);
        self.active = None;
    }
}

fn mem() -> Mem {
    Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap())
}

struct Driver {
    t: MmioTransport<Mem>,
    rec: Arc<Record>,
    dev: Arc<Mutex<TestDevice>>,
}

impl Driver {
    fn new() -> Self {
        Self::with(|_| {})
    }
    fn with(f: impl FnOnce(&mut TestDevice)) -> Self {
        let rec = Arc::new(Record::default());
        let mut d = TestDevice::new(rec.clone());
        f(&mut d);
        let dev = Arc::new(Mutex::new(d));
        let t = MmioTransport::new(dev.clone(), mem()).unwrap();
        Self { t, rec, dev }
    }
    fn r(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(off, &mut b);
        u32::from_le_bytes(b)
    }
    fn w(&mut self, off: u64, v: u32) {
        self.t.write(off, &v.to_le_bytes());
    }
    fn device_features(&mut self) -> u64 {
        self.w(DEVICE_FEATURES_SEL, 0);
        let lo = u64::from(self.r(DEVICE_FEATURES));
        self.w(DEVICE_FEATURES_SEL, 1);
        let hi = u64::from(self.r(DEVICE_FEATURES));
        lo | hi << 32
    }
    fn write_features(&mut self, f: u64) {
        self.w(DRIVER_FEATURES_SEL, 0);
        self.w(DRIVER_FEATURES, u32::try_from(f & 0xffff_ffff).unwrap());
        self.w(DRIVER_FEATURES_SEL, 1);
        self.w(DRIVER_FEATURES, u32::try_from(f >> 32).unwrap());
    }
    /// Linux's probe order up to FEATURES_OK; returns whether the device accepted.
    fn negotiate(&mut self, f: u64) -> bool {
        self.w(STATUS, ACK);
        self.w(STATUS, ACK | DRIVER);
        self.write_features(f);
        self.w(STATUS, ACK | DRIVER | FEATURES_OK);
        self.r(STATUS) & FEATURES_OK != 0
    }
    fn setup_queue(&mut self, idx: u32, size: u32, base: u64) {
        self.w(QUEUE_SEL, idx);
        assert_eq!(self.r(QUEUE_READY), 0);
        self.w(QUEUE_NUM, size);
        let (desc, drv, dev) = (base, base + 0x1000, base + 0x2000);
        self.w(QUEUE_DESC_LOW, lo(desc));
        self.w(QUEUE_DESC_HIGH, hi(desc));
        self.w(QUEUE_DRIVER_LOW, lo(drv));
        self.w(QUEUE_DRIVER_HIGH, hi(drv));
        self.w(QUEUE_DEVICE_LOW, lo(dev));
        self.w(QUEUE_DEVICE_HIGH, hi(dev));
        self.w(QUEUE_READY, 1);
    }
}

fn lo(v: u64) -> u32 {
    u32::try_from(v & 0xffff_ffff).unwrap()
}
fn hi(v: u64) -> u32 {
    u32::try_from(v >> 32).unwrap()
}

const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;

#[test]
fn identification_registers() {
    let mut d = Driver::new();
    assert_eq!(d.r(MAGIC_VALUE), 0x7472_6976);
    assert_eq!(d.r(VERSION_REG), 2);
    assert_eq!(d.r(DEVICE_ID), 24);
    assert_eq!(d.r(VENDOR_ID), VENDOR);
    assert_eq!(d.r(STATUS), 0);
    assert_eq!(d.r(CONFIG_GENERATION), 0);
    assert_eq!(d.r(SHM_LEN_LOW), u32::MAX, "no shared memory region");
}

#[test]
fn device_features_include_version_1() {
    let mut d = Driver::new();
    assert_eq!(d.device_features(), FEATURE_A | FEATURE_HIGH | VERSION_1);
    d.w(DEVICE_FEATURES_SEL, 2);
    assert_eq!(d.r(DEVICE_FEATURES), 0);
}

#[test]
fn negotiation_accepts_subset_with_version_1() {
    let mut d = Driver::new();
    assert!(d.negotiate(VERSION_1 | FEATURE_HIGH));
    assert_eq!(
        *d.rec.acked_features.lock().unwrap(),
        Some(VERSION_1 | FEATURE_HIGH)
    );
    assert_eq!(d.t.driver_features(), VERSION_1 | FEATURE_HIGH);
}

#[test]
fn negotiation_refuses_unoffered_feature() {
    let mut d = Driver::new();
    assert!(!d.negotiate(VERSION_1 | 1 << 5));
    assert_eq!(*d.rec.acked_features.lock().unwrap(), None);
}

#[test]
fn negotiation_refuses_missing_version_1() {
    let mut d = Driver::new();
    assert!(!d.negotiate(FEATURE_A));
}

#[test]
fn negotiation_refuses_bits_in_unknown_feature_word() {
    let mut d = Driver::new();
    d.w(STATUS, ACK);
    d.w(STATUS, ACK | DRIVER);
    d.write_features(VERSION_1);
    d.w(DRIVER_FEATURES_SEL, 2);
    d.w(DRIVER_FEATURES, 1);
    d.w(STATUS, ACK | DRIVER | FEATURES_OK);
    assert_eq!(d.r(STATUS) & FEATURES_OK, 0);
}

#[test]
fn features_cannot_change_after_features_ok() {
    let mut d = Driver::new();
    assert!(d.negotiate(VERSION_1));
    d.write_features(VERSION_1 | FEATURE_A);
    assert_eq!(d.t.driver_features(), VERSION_1);
    assert!(d.t.bad_accesses() > 0);
}

#[test]
fn status_out_of_order_is_ignored() {
    let mut d = Driver::new();
    d.w(STATUS, DRIVER | FEATURES_OK | DRIVER_OK);
    assert_eq!(d.r(STATUS), 0, "DRIVER_OK needs ACK and DRIVER first");
    // All at once, but without VERSION_1 accepted: FEATURES_OK and DRIVER_OK refused.
    d.w(STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_eq!(d.r(STATUS), ACK | DRIVER);
    d.w(STATUS, 0);
    d.w(STATUS, ACK);
    d.w(STATUS, DRIVER);
    assert_eq!(d.r(STATUS), ACK, "clearing ACK without a reset is ignored");
    assert_eq!(d.rec.activations.load(Ordering::SeqCst), 0);
}

#[test]
fn queue_setup_and_activation() {
    let mut d = Driver::new();
    assert!(d.negotiate(VERSION_1));
    d.w(QUEUE_SEL, 0);
    assert_eq!(d.r(QUEUE_NUM_MAX), 256);
    d.w(QUEUE_SEL, 1);
    assert_eq!(d.r(QUEUE_NUM_MAX), 16);
    d.w(QUEUE_SEL, 2);
    assert_eq!(d.r(QUEUE_NUM_MAX), 0, "queue 2 does not exist");
    d.setup_queue(0, 128, 0x1_0000);
    assert_eq!(d.r(QUEUE_READY), 1);
    assert_eq!(d.r(QUEUE_NUM), 128);
    assert_eq!(d.r(QUEUE_DESC_LOW), 0x1_0000);
    assert_eq!(d.r(QUEUE_DRIVER_LOW), 0x1_1000);
    assert_eq!(d.r(QUEUE_DEVICE_LOW), 0x1_2000);
    // Queue 1 left unready: the device gets only queue 0.
    d.w(STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_eq!(d.r(STATUS), ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert!(d.t.is_activated());
    assert_eq!(d.rec.activations.load(Ordering::SeqCst), 1);
    assert_eq!(*d.rec.queues.lock().unwrap(), vec![(0, 128, 0x1_0000)]);
}

#[test]
fn queue_regs_locked_outside_setup() {
    let mut d = Driver::new();
    d.w(QUEUE_SEL, 0);
    d.w(QUEUE_NUM, 64);
    assert_eq!(
        d.r(QUEUE_NUM),
        256,
        "before FEATURES_OK the queue is not configurable"
    );
    assert!(d.negotiate(VERSION_1));
    d.setup_queue(0, 64, 0x1_0000);
    d.w(QUEUE_NUM, 32);
    assert_eq!(d.r(QUEUE_NUM), 64, "a ready queue is not reconfigured");
    d.w(QUEUE_READY, 0);
    assert_eq!(d.r(QUEUE_READY), 0, "the ready bit can always be cleared");
}

#[test]
fn invalid_queue_fails_activation_with_needs_reset() {
    let mut d = Driver::new();
    assert!(d.negotiate(VERSION_1));
    // Size 100 is not a power of two.
    d.setup_queue(0, 100, 0x1_0000);
    d.w(STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_ne!(d.r(STATUS) & NEEDS_RESET, 0);
    assert!(!d.t.is_activated());
    assert_eq!(d.rec.activations.load(Ordering::SeqCst), 0);
    assert_eq!(d.r(CONFIG_GENERATION), 1);
    assert_eq!(d.r(INTERRUPT_STATUS), INT_CONFIG);
}

#[test]
fn queue_outside_guest_memory_fails_activation() {
    let mut d = Driver::new();
    assert!(d.negotiate(VERSION_1));
    d.setup_queue(0, 256, 0x7_0000_0000);
    d.w(STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_ne!(d.r(STATUS) & NEEDS_RESET, 0);
    assert_eq!(d.rec.activations.load(Ordering::SeqCst), 0);
}

#[test]
fn device_refusal_sets_needs_reset() {
    let mut d = Driver::with(|dev| dev.fail_activate = true);
    assert!(d.negotiate(VERSION_1));
    d.setup_queue(0, 16, 0x1_0000);
    d.w(STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_ne!(d.r(STATUS) & NEEDS_RESET, 0);
    // Reset clears it and the driver may try again.
    d.w(STATUS, 0);
    assert_eq!(d.r(STATUS), 0);
}

#[test]
fn reset_on_status_zero() {
    let mut d = Driver::new();
    assert!(d.negotiate(VERSION_1));
    d.setup_queue(0, 16, 0x1_0000);
    d.w(STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert!(d.t.is_activated());
    d.w(STATUS, 0);
    assert_eq!(d.r(STATUS), 0);
    assert!(!d.t.is_activated());
    assert_eq!(d.rec.resets.load(Ordering::SeqCst), 1);
    assert!(d.dev.lock().unwrap().active.is_none());
    d.w(QUEUE_SEL, 0);
    assert_eq!(d.r(QUEUE_READY), 0);
    assert_eq!(d.r(QUEUE_NUM), 256);
    assert_eq!(d.t.driver_features(), 0);
    // And the device can be brought up again.
    assert!(d.negotiate(VERSION_1));
    d.setup_queue(0, 16, 0x2_0000);
    d.w(STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_eq!(d.rec.activations.load(Ordering::SeqCst), 2);
}

#[test]
fn notify_signals_queue_eventfd() {
    let mut d = Driver::new();
    d.w(QUEUE_NOTIFY, 1);
    assert_eq!(d.t.queue_notify_eventfds()[1].read().unwrap(), 1);
    d.w(QUEUE_NOTIFY, 7);
    assert_eq!(
        d.t.bad_accesses(),
        1,
        "notify of a missing queue is counted"
    );
}

#[test]
fn activated_queue_eventfd_is_the_notify_eventfd() {
    let mut d = Driver::new();
    assert!(d.negotiate(VERSION_1));
    d.setup_queue(0, 16, 0x1_0000);
    d.w(STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    d.w(QUEUE_NOTIFY, 0);
    let dev = d.dev.lock().unwrap();
    let q = &dev.active.as_ref().unwrap().queues[0];
    assert_eq!(q.notify.read().unwrap(), 1);
}

#[test]
fn used_buffer_interrupt_and_ack() {
    let mut d = Driver::new();
    assert!(d.negotiate(VERSION_1));
    d.setup_queue(0, 16, 0x1_0000);
    d.w(STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    let irq = d
        .dev
        .lock()
        .unwrap()
        .active
        .as_ref()
        .unwrap()
        .interrupt
        .clone();
    irq.trigger(InterruptKind::UsedBuffer).unwrap();
    assert_eq!(d.r(INTERRUPT_STATUS), INT_VRING);
    assert_eq!(d.t.irqfd().read().unwrap(), 1);
    d.w(INTERRUPT_ACK, INT_VRING);
    assert_eq!(d.r(INTERRUPT_STATUS), 0);
}

#[test]
fn config_change_hook_bumps_generation() {
    let mut d = Driver::new();
    let irq = d.dev.lock().unwrap().interrupt.clone().unwrap();
    irq.trigger(InterruptKind::ConfigChange).unwrap();
    assert_eq!(d.r(CONFIG_GENERATION), 1);
    assert_eq!(d.r(INTERRUPT_STATUS), 0, "no notification before DRIVER_OK");
    assert!(d.negotiate(VERSION_1));
    d.setup_queue(0, 16, 0x1_0000);
    d.w(STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    irq.trigger(InterruptKind::ConfigChange).unwrap();
    assert_eq!(d.r(CONFIG_GENERATION), 2);
    assert_eq!(d.r(INTERRUPT_STATUS), INT_CONFIG);
}

#[test]
fn config_space_any_width() {
    let mut d = Driver::new();
    let mut b = [0u8; 1];
    d.t.read(CONFIG + 5, &mut b);
    assert_eq!(b, [5]);
    let mut b = [0u8; 8];
    d.t.read(CONFIG + 8, &mut b);
    assert_eq!(b, [8, 9, 10, 11, 12, 13, 14, 15]);
    let mut b = [0xffu8; 4];
    d.t.read(CONFIG + 22, &mut b);
    assert_eq!(b, [22, 23, 0, 0], "past the end reads zero");
    d.t.write(CONFIG + 2, &[1, 2]);
    assert_eq!(
        *d.rec.config_writes.lock().unwrap(),
        vec![(2, vec![1u8, 2])]
    );
}

#[test]
fn bad_widths_are_ignored() {
    let mut d = Driver::new();
    let mut b = [0xffu8; 2];
    d.t.read(MAGIC_VALUE, &mut b);
    assert_eq!(b, [0, 0]);
    let mut b = [0xffu8; 4];
    d.t.read(MAGIC_VALUE + 1, &mut b);
    assert_eq!(b, [0; 4]);
    d.t.write(STATUS, &[1]);
    assert_eq!(d.r(STATUS), 0);
    let mut b = [0xffu8; 16];
    d.t.read(CONFIG, &mut b);
    assert_eq!(b, [0; 16]);
    assert_eq!(d.t.bad_accesses(), 4);
}

struct BadSizes(Vec<u16>, u32);
impl VirtioDevice<Mem> for BadSizes {
    fn device_type(&self) -> u32 {
        self.1
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.0
    }
    fn device_features(&self) -> u64 {
        0
    }
    fn read_config(&self, _: u64, _: &mut [u8]) {}
    fn activate(&mut self, _: Activation<Mem>) -> Result<(), ActivateError> {
        Ok(())
    }
    fn reset(&mut self) {}
}

#[test]
fn invalid_device_description_is_refused() {
    let e = MmioTransport::new(Arc::new(Mutex::new(BadSizes(vec![16, 3], 1))), mem()).unwrap_err();
    assert!(matches!(
        e,
        MmioError::InvalidQueueMaxSize { index: 1, size: 3 }
    ));
    assert!(e.to_string().contains("power of two"));
    let e = MmioTransport::new(Arc::new(Mutex::new(BadSizes(vec![0], 1))), mem()).unwrap_err();
    assert!(matches!(
        e,
        MmioError::InvalidQueueMaxSize { index: 0, size: 0 }
    ));
    let e = MmioTransport::new(Arc::new(Mutex::new(BadSizes(vec![16], 0))), mem()).unwrap_err();
    assert!(matches!(e, MmioError::InvalidDeviceType));
    let e =
        MmioTransport::new(Arc::new(Mutex::new(BadSizes(vec![1; 70_000], 1))), mem()).unwrap_err();
    assert!(matches!(e, MmioError::TooManyQueues(70_000)));
}

/// xorshift64*: deterministic garbage without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A hostile driver: many thousands of random reads and writes at random offsets (biased to
/// real registers), random widths and random values, including status sequences that reach
/// activation with garbage queues. The transport must never panic and must keep answering
/// the identification registers.
#[test]
fn garbage_driver_never_panics() {
    let regs = [
        DEVICE_FEATURES_SEL,
        DRIVER_FEATURES,
        DRIVER_FEATURES_SEL,
        QUEUE_SEL,
        QUEUE_NUM,
        QUEUE_READY,
        QUEUE_NOTIFY,
        INTERRUPT_ACK,
        STATUS,
        QUEUE_DESC_LOW,
        QUEUE_DESC_HIGH,
        QUEUE_DRIVER_LOW,
        QUEUE_DRIVER_HIGH,
        QUEUE_DEVICE_LOW,
        QUEUE_DEVICE_HIGH,
        CONFIG,
    ];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut d = Driver::new();
    let mut max_activations = 0;
    for round in 0..200_000u32 {
        let offset = match rng.below(4) {
            0 => rng.below(0x2000),
            1 => rng.below(0x200) & !3,
            _ => regs[usize::try_from(rng.below(regs.len() as u64)).unwrap()],
        };
        let len = match rng.below(6) {
            0 => usize::try_from(rng.below(17)).unwrap(),
            _ => 4,
        };
        let value = match rng.below(4) {
            // Plausible status bits.
            0 => rng.next() & 0xff,
            1 => rng.below(4),
            _ => rng.next(),
        };
        let bytes = value.to_le_bytes();
        let mut buf = vec![0u8; len];
        for (i, b) in buf.iter_mut().enumerate() {
            *b = bytes[i % 8];
        }
        if rng.below(2) == 0 {
            d.t.write(offset, &buf);
        } else {
            d.t.read(offset, &mut buf);
        }
        if round % 1000 == 0 {
            // Now and then walk the status machine like a driver, with random queue
            // addresses (sometimes inside guest memory), so activation paths run too.
            if rng.below(2) == 0 {
                d.w(STATUS, 0);
            }
            d.w(STATUS, ACK);
            d.w(STATUS, ACK | DRIVER);
            d.write_features(VERSION_1 | (rng.next() & (FEATURE_A | FEATURE_HIGH)));
            d.w(STATUS, ACK | DRIVER | FEATURES_OK);
            let size = 1u32 << rng.below(10);
            let idx = u32::try_from(rng.below(2)).unwrap();
            d.w(QUEUE_SEL, idx);
            d.w(QUEUE_READY, 0);
            d.setup_queue(idx, size, rng.below(0x10_0000) & !0xf);
            d.w(STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
        }
        max_activations = max_activations.max(d.rec.activations.load(Ordering::SeqCst));
        assert_eq!(d.r(MAGIC_VALUE), MAGIC);
        assert_eq!(d.r(VERSION_REG), VERSION);
    }
    assert!(d.t.bad_accesses() > 0);
    assert!(max_activations > 0, "the activation path never ran");
    println!(
        "garbage driver: {} ignored accesses, {} activations, {} resets",
        d.t.bad_accesses(),
        max_activations,
        d.rec.resets.load(Ordering::SeqCst)
    );
}

mod prop {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Random access sequences never panic, and a reset always brings the transport back
        /// to its initial state.
        #[test]
        fn random_accesses_then_reset(ops in proptest::collection::vec(
            (0u64..0x1100, 0usize..9, any::<u64>(), any::<bool>()), 1..400))
        {
            let mut d = Driver::new();
            for (offset, len, value, write) in ops {
                let bytes = value.to_le_bytes();
                let mut buf = bytes[..len].to_vec();
                if write { d.t.write(offset, &buf) } else { d.t.read(offset, &mut buf) }
            }
            d.w(STATUS, 0);
            prop_assert_eq!(d.r(STATUS), 0);
            prop_assert_eq!(d.r(INTERRUPT_STATUS), 0);
            prop_assert!(!d.t.is_activated());
            prop_assert!(d.negotiate(VERSION_1));
        }
    }
}
