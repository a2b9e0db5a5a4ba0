//! Property tests: random sequences of resize, plug, unplug, unplug-all, state, device
//! reset and system reset, checked against a small reference model of the spec.

#![expect(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]
#![expect(
    clippy::cast_possible_truncation,
    reason = "block indices of a 64-block test region fit every integer type"
)]

use proptest::prelude::*;
use virtio_mem::test_utils::{BackendCall, TestDevice};
use virtio_mem::{BlockState, DeviceConfig, Request, Response};

const ADDR: u64 = 1 << 32;
const BS: u64 = 2 << 20;
const NR_BLOCKS: u64 = 64;
const MARGIN_BLOCKS: u64 = 8;

#[derive(Clone, Debug)]
enum Op {
    Resize(u64),
    Plug { block: u64, nb: u16, misalign: bool },
    Unplug { block: u64, nb: u16, misalign: bool },
    UnplugAll,
    State { block: u64, nb: u16 },
    DeviceReset,
    SystemReset,
    FailNextBackendCall,
}

fn op() -> impl Strategy<Value = Op> {
    let block = 0..NR_BLOCKS + 4;
    let nb = prop_oneof![4 => 0u16..12, 1 => Just(u16::MAX)];
    prop_oneof![
        3 => (0..=NR_BLOCKS).prop_map(Op::Resize),
        6 => (block.clone(), nb.clone(), prop::bool::weighted(0.05))
            .prop_map(|(block, nb, misalign)| Op::Plug { block, nb, misalign }),
        4 => (block.clone(), nb.clone(), prop::bool::weighted(0.05))
            .prop_map(|(block, nb, misalign)| Op::Unplug { block, nb, misalign }),
        1 => Just(Op::UnplugAll),
        2 => (block, nb).prop_map(|(block, nb)| Op::State { block, nb }),
        1 => Just(Op::DeviceReset),
        1 => Just(Op::SystemReset),
        1 => Just(Op::FailNextBackendCall),
    ]
}

/// The reference: the spec's rules written as plainly as possible.
struct Model {
    plugged: Vec<bool>,
    requested: u64,
    usable: u64,
    fail_next: bool,
}

impl Model {
    fn usable_target(&self) -> u64 {
        (self.requested + MARGIN_BLOCKS).min(NR_BLOCKS)
    }

    fn count(&self) -> u64 {
        self.plugged.iter().filter(|&&p| p).count() as u64
    }

    /// The block range, if the request is valid by the spec.
    fn range(&self, block: u64, nb: u16, misalign: bool) -> Option<std::ops::Range<usize>> {
        if misalign || nb == 0 || block + u64::from(nb) > self.usable {
            return None;
        }
        Some(block as usize..(block + u64::from(nb)) as usize)
    }

    fn take_failure(&mut self) -> bool {
        std::mem::take(&mut self.fail_next)
    }

    fn apply(&mut self, op: &Op) -> Option<Response> {
        match *op {
            Op::Resize(blocks) => {
                self.requested = blocks;
                self.usable = self.usable.max(self.usable_target());
                None
            }
            Op::Plug {
                block,
                nb,
                misalign,
            } => Some(match self.range(block, nb, misalign) {
                Some(r) if self.plugged[r.clone()].iter().all(|p| !p) => {
                    if self.count() + r.len() as u64 > self.requested {
                        Response::Nack
                    } else if self.take_failure() {
                        Response::Busy
                    } else {
                        self.plugged[r].iter_mut().for_each(|p| *p = true);
                        Response::Ack(None)
                    }
                }
                _ => Response::Error,
            }),
            Op::Unplug {
                block,
                nb,
                misalign,
            } => Some(match self.range(block, nb, misalign) {
                Some(r) if self.plugged[r.clone()].iter().all(|&p| p) => {
                    if self.take_failure() {
                        Response::Busy
                    } else {
                        self.plugged[r].iter_mut().for_each(|p| *p = false);
                        Response::Ack(None)
                    }
                }
                _ => Response::Error,
            }),
            Op::UnplugAll => Some(if self.count() > 0 && self.take_failure() {
                // The first run failed: nothing released.
                Response::Busy
            } else {
                self.plugged.iter_mut().for_each(|p| *p = false);
                self.usable = self.usable_target();
                Response::Ack(None)
            }),
            Op::State { block, nb } => Some(match self.range(block, nb, false) {
                Some(r) => {
                    let n = self.plugged[r.clone()].iter().filter(|&&p| p).count();
                    Response::Ack(Some(if n == 0 {
                        BlockState::Unplugged
                    } else if n == r.len() {
                        BlockState::Plugged
                    } else {
                        BlockState::Mixed
                    }))
                }
                None => Response::Error,
            }),
            Op::DeviceReset => None,
            Op::SystemReset => {
                self.plugged.iter_mut().for_each(|p| *p = false);
                self.usable = self.usable_target();
                self.fail_next = false;
                None
            }
            Op::FailNextBackendCall => {
                self.fail_next = true;
                None
            }
        }
    }
}

fn addr_of(block: u64, misalign: bool) -> u64 {
    ADDR + block * BS + if misalign { 4096 } else { 0 }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn device_matches_the_reference_model(ops in prop::collection::vec(op(), 1..120)) {
        let mut cfg = DeviceConfig::with_layout(ADDR, NR_BLOCKS * BS, BS).unwrap();
        cfg.usable_margin = MARGIN_BLOCKS * BS;
        let mut t = TestDevice::new(cfg).unwrap();
        let mut m = Model { plugged: vec![false; NR_BLOCKS as usize], requested: 0, usable: MARGIN_BLOCKS, fail_next: false };
        for op in &ops {
            let usable_before = t.dev.state().usable_region_size();
            let calls_before = t.dev.state().backend().calls.len();
            // Valid from the guest's point of view: it read the config just before.
            let guest_valid = match *op {
                Op::Plug { block, nb, misalign } => m.range(block, nb, misalign)
                    .is_some_and(|r| m.plugged[r].iter().all(|p| !p)),
                Op::Unplug { block, nb, misalign } => m.range(block, nb, misalign)
                    .is_some_and(|r| m.plugged[r].iter().all(|&p| p)),
                Op::State { block, nb } => m.range(block, nb, false).is_some(),
                Op::UnplugAll => true,
                _ => false,
            };
            let expected = m.apply(op);
            let got = match *op {
                Op::Resize(blocks) => { t.dev.set_requested_size(blocks * BS).unwrap(); None }
                Op::Plug { block, nb, misalign } =>
                    Some(t.request(Request::Plug { addr: addr_of(block, misalign), nb_blocks: nb })),
                Op::Unplug { block, nb, misalign } =>
                    Some(t.request(Request::Unplug { addr: addr_of(block, misalign), nb_blocks: nb })),
                Op::UnplugAll => Some(t.request(Request::UnplugAll)),
                Op::State { block, nb } =>
                    Some(t.request(Request::State { addr: addr_of(block, false), nb_blocks: nb })),
                Op::DeviceReset => {
                    t.dev.reset();
                    let f = t.dev.state().device_features();
                    t.dev.state_mut().ack_features(f).unwrap();
                    t.driver.reset();
                    let q = t.driver.device_queue();
                    t.dev.activate(q);
                    None
                }
                Op::SystemReset => {
                    t.dev.state_mut().backend_mut().fail_unplugs = 0;
                    t.dev.state_mut().backend_mut().fail_plugs = 0;
                    t.dev.system_reset().unwrap();
                    let f = t.dev.state().device_features();
                    t.dev.state_mut().ack_features(f).unwrap();
                    t.driver.reset();
                    let q = t.driver.device_queue();
                    t.dev.activate(q);
                    None
                }
                Op::FailNextBackendCall => {
                    let b = t.dev.state_mut().backend_mut();
                    // Exactly one of the two will be consumed by the next backend call
                    // the model predicts; clear both when that happens (below).
                    b.fail_plugs = 1;
                    b.fail_unplugs = 1;
                    None
                }
            };
            prop_assert_eq!(got, expected, "op {:?}", op);
            if guest_valid {
                prop_assert_ne!(got, Some(Response::Error), "valid request answered ERROR: {:?}", op);
            }
            if matches!(got, Some(Response::Busy)) {
                let b = t.dev.state_mut().backend_mut();
                b.fail_plugs = 0;
                b.fail_unplugs = 0;
            }
            // Invariants.
            let s = t.dev.state();
            prop_assert_eq!(s.plugged_size(), m.count() * BS);
            prop_assert_eq!(s.bitmap().plugged(), m.count());
            prop_assert!(s.usable_region_size() >= s.requested_size());
            prop_assert_eq!(s.usable_region_size(), m.usable * BS);
            let limit = ADDR + usable_before.max(s.usable_region_size());
            for call in &s.backend().calls[calls_before..] {
                let (BackendCall::Plug { addr, len } | BackendCall::Unplug { addr, len }) = *call;
                prop_assert!(addr >= ADDR && addr + len <= limit,
                    "backend asked for [{:#x}, +{:#x}) outside the usable region", addr, len);
                prop_assert!(len > 0 && addr % BS == 0 && len % BS == 0);
            }
        }
    }
}
