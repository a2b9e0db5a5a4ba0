//! Fuzzes the queue processor: random descriptor chains, request bytes, resizes and
//! resets. Panics (= findings) on any crash or broken invariant.
//!
//! Run: `ci/fuzz queue [SECONDS]` (new inputs go to `corpus/queue`, which git ignores;
//! `seeds` is only read).

#![no_main]

use libfuzzer_sys::fuzz_target;
use virtio_mem::test_utils::{TestDevice, GUEST_MEM_SIZE};
use virtio_mem::wire::RawRequest;
use virtio_mem::DeviceConfig;
use vm_memory::ByteValued;

const ADDR: u64 = 1 << 32;
const BS: u64 = 2 << 20;
const NR_BLOCKS: u64 = 128;
const REQ: u64 = 0x80000;
const BUFS: u64 = 0x40000;

/// Reads from the input, yielding zeros once it is exhausted.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    fn u8(&mut self) -> u8 {
        self.bytes::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.bytes())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes())
    }
}

fn reactivate(t: &mut TestDevice) {
    let f = t.dev.state().device_features();
    t.dev.state_mut().ack_features(f).expect("own features");
    t.driver.reset();
    let q = t.driver.device_queue();
    t.dev.activate(q);
}

fuzz_target!(|data: &[u8]| {
    let mut t = TestDevice::new(DeviceConfig::with_layout(ADDR, NR_BLOCKS * BS, BS).expect("layout")).expect("config");
    let mut input = Input(data);
    for _ in 0..64 {
        if input.0.is_empty() {
            break;
        }
        match input.u8() % 6 {
            0 => {
                let blocks = u64::from(input.u16()) % (NR_BLOCKS + 1);
                t.dev.set_requested_size(blocks * BS).expect("valid size");
            }
            1 | 2 => {
                // A chain of 1..=20 descriptors with fuzzer-chosen fields.
                let mut raw = RawRequest::default();
                raw.as_mut_slice().copy_from_slice(&input.bytes::<24>());
                t.driver.write_request(REQ, raw);
                let n = 1 + u16::from(input.u8() % 20);
                for d in 0..n {
                    let sel = input.u8();
                    let addr = match sel % 4 {
                        0 => REQ,
                        1 => BUFS + u64::from(input.u16()),
                        2 => GUEST_MEM_SIZE as u64 - u64::from(input.u8()),
                        _ => input.u64(),
                    };
                    let len = match sel / 4 % 4 {
                        0 => 24,
                        1 => 10,
                        _ => input.u32(),
                    };
                    let flags = input.u16();
                    let next = input.u16() % 64;
                    t.driver.write_descriptor(d, addr, len, flags, next);
                }
                t.driver.make_available(0);
                let done = t.dev.process_queue(&t.driver.mem).expect("activated");
                let used = t.driver.take_used();
                assert_eq!(done.len(), used.len());
                for (c, (id, len)) in done.iter().zip(used) {
                    assert_eq!(u32::from(c.head), id);
                    assert!(len == 0 || len == 10);
                    assert_eq!(len == 10, c.response.is_some());
                }
            }
            3 => {
                t.dev.reset();
                reactivate(&mut t);
            }
            4 => {
                let b = t.dev.state_mut().backend_mut();
                b.fail_plugs = 0;
                b.fail_unplugs = 0;
                t.dev.system_reset().expect("backend healthy");
                reactivate(&mut t);
            }
            _ => {
                let b = t.dev.state_mut().backend_mut();
                b.fail_plugs = u32::from(input.u8() % 2);
                b.fail_unplugs = u32::from(input.u8() % 2);
            }
        }
        let s = t.dev.state();
        assert_eq!(s.plugged_size(), s.bitmap().plugged() * BS);
        assert!(s.usable_region_size() >= s.requested_size());
        assert!(s.usable_region_size() <= NR_BLOCKS * BS);
        for r in s.backend().ranges() {
            assert!(r.start >= ADDR && r.end <= ADDR + NR_BLOCKS * BS);
        }
    }
});
