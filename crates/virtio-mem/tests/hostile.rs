//! Hostile input: 100,000 random descriptor chains and request bytes. Nothing panics,
//! every chain is completed, every answer is a well-formed response, and the backend is
//! never asked to touch anything outside the usable region.

#![expect(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]
#![expect(
    clippy::cast_possible_truncation,
    reason = "truncating random numbers is how the generator picks values"
)]

use virtio_mem::test_utils::{
    BackendCall, TestDevice, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, GUEST_MEM_SIZE,
};
use virtio_mem::wire::{RawRequest, RawResponse};
use virtio_mem::{DeviceConfig, Request};
use vm_memory::{ByteValued, Bytes, GuestAddress};

const ADDR: u64 = 1 << 32;
const BS: u64 = 2 << 20;
const REGION: u64 = 256 * BS;
const ITERATIONS: usize = 100_000;
const BUF_AREA: u64 = 0x40000;
const REQ_AREA: u64 = 0x80000;

/// xorshift64*: small, seeded, reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

fn random_request(rng: &mut Rng) -> RawRequest {
    let req_type = if rng.chance(90) {
        rng.below(4)
    } else {
        rng.next() & 0xffff
    } as u16;
    let addr = match rng.below(4) {
        0 => rng.next(),
        1 => ADDR + rng.below(REGION / BS + 8) * BS,
        2 => ADDR + rng.below(REGION),
        _ => ADDR.wrapping_sub(rng.below(4) * BS),
    };
    let nb = match rng.below(3) {
        0 => rng.next() & 0xffff,
        1 => rng.below(4),
        _ => rng.below(80),
    } as u16;
    let mut raw = RawRequest::from(Request::Plug {
        addr,
        nb_blocks: nb,
    });
    raw.req_type = req_type.into();
    for b in raw.padding.iter_mut().chain(raw.padding_1.iter_mut()) {
        *b = rng.next() as u8;
    }
    raw
}

/// A buffer address; in-memory ones get their own 256-byte slot per descriptor, so the
/// buffers of one chain never overlap and the response can be read back.
fn random_addr(rng: &mut Rng, slot: u16) -> u64 {
    let mem = GUEST_MEM_SIZE as u64;
    match rng.below(10) {
        0 => rng.next(),
        1 => mem - rng.below(64),
        2 => mem + rng.below(1 << 20),
        _ => BUF_AREA + u64::from(slot) * 0x100 + rng.below(0xc0),
    }
}

fn random_len(rng: &mut Rng) -> u32 {
    match rng.below(8) {
        0 => 0,
        1 => rng.next() as u32,
        2 => 10,
        3 => 24,
        _ => rng.below(64) as u32,
    }
}

#[test]
fn hundred_thousand_random_chains() {
    let mut t = TestDevice::new(DeviceConfig::new(ADDR, REGION, BS)).unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut answered = 0u64;
    let mut silent = 0u64;
    for i in 0..ITERATIONS {
        if rng.chance(2) {
            let size = rng.below(REGION / BS + 1) * BS;
            t.dev.set_requested_size(size).unwrap();
        }
        if rng.chance(1) {
            t.dev.state_mut().backend_mut().fail_plugs = 1;
        }
        // Random request bytes where requests usually live.
        let req_at = REQ_AREA + rng.below(0x10000);
        t.driver.write_request(req_at, random_request(&mut rng));
        // A third of the chains are shaped like Linux's, so random request bytes get past
        // parsing and exercise the state machine.
        let wellformed = rng.chance(35);
        let max_len = if rng.chance(5) { 20 } else { 3 };
        let n = if wellformed {
            2
        } else {
            1 + rng.below(max_len) as u16
        };
        let linear = wellformed || rng.chance(80);
        let mut writable = Vec::new();
        let mut writable_broken = false;
        for d in 0..n {
            let (addr, len) = if d == 0 && (wellformed || rng.chance(70)) {
                (req_at, 24)
            } else if wellformed {
                (BUF_AREA + 0x100, 10)
            } else {
                (random_addr(&mut rng, d), random_len(&mut rng))
            };
            let mut flags = if d > 0 && (wellformed || rng.chance(60)) {
                DESC_F_WRITE
            } else {
                0
            };
            if !linear {
                flags |= (rng.next() as u16) & (DESC_F_WRITE | DESC_F_INDIRECT | DESC_F_NEXT);
            } else if d + 1 < n {
                flags |= DESC_F_NEXT;
            }
            let next = if linear { d + 1 } else { rng.below(70) as u16 };
            t.driver.write_descriptor(d, addr, len, flags, next);
            let in_memory = addr
                .checked_add(u64::from(len))
                .is_some_and(|end| end <= GUEST_MEM_SIZE as u64);
            // Empty buffers carry nothing, wherever they point.
            if flags & DESC_F_WRITE != 0 && len > 0 && !writable_broken {
                if in_memory {
                    writable.push((addr, len));
                } else {
                    writable_broken = true;
                }
            }
        }
        t.driver.make_available(0);
        let done = t.process();
        assert_eq!(done.len(), 1, "iteration {i}: chain not completed");
        let used = t.driver.take_used();
        assert_eq!(used, vec![(0, done[0].used_len)], "iteration {i}");
        match done[0].used_len {
            0 => silent += 1,
            10 => {
                answered += 1;
                let resp = done[0].response.expect("answered means a response");
                // Buffers near the end of memory may overlap; then the last write wins and
                // the bytes cannot be read back in order.
                let overlap = writable.iter().enumerate().any(|(a, &(x, xl))| {
                    writable[a + 1..]
                        .iter()
                        .any(|&(y, yl)| x < y + u64::from(yl) && y < x + u64::from(xl))
                });
                if linear && !overlap {
                    // Read back the 10 bytes from the chain's writable buffers, in order.
                    let mut bytes = RawResponse::default();
                    let mut off = 0usize;
                    for &(addr, len) in &writable {
                        if off == 10 {
                            break;
                        }
                        let n = (10 - off).min(len as usize);
                        t.driver
                            .mem
                            .read_slice(&mut bytes.as_mut_slice()[off..off + n], GuestAddress(addr))
                            .unwrap();
                        off += n;
                    }
                    let is_state = matches!(done[0].request, Ok(Request::State { .. }));
                    assert_eq!(
                        bytes.decode(is_state),
                        Some(resp),
                        "iteration {i}: bytes in memory"
                    );
                }
            }
            other => panic!("iteration {i}: used length {other}"),
        }
        let s = t.dev.state();
        assert_eq!(s.plugged_size(), s.bitmap().plugged() * BS);
        assert!(s.usable_region_size() >= s.requested_size());
    }
    let usable_max = ADDR + REGION;
    for call in &t.dev.state().backend().calls {
        let (BackendCall::Plug { addr, len } | BackendCall::Unplug { addr, len }) = *call;
        assert!(
            addr >= ADDR && addr + len <= usable_max,
            "backend call outside the region"
        );
    }
    // The generator must exercise all three outcomes, or it tests nothing.
    let m = t.dev.state().metrics();
    println!(
        "answered {answered}, silent {silent}, malformed {}, plug acks {}, errors {}",
        m.malformed_chains,
        m.plug.ack,
        m.plug.error + m.unplug.error + m.state.error
    );
    assert!(answered > 10_000 && silent > 10_000);
    assert!(m.plug.ack > 100 && m.unplug.ack + m.unplug_all.ack > 100);
}
