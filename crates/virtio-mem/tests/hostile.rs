//! Hostile input: 100,000 random descriptor chains and request bytes. Nothing panics,
//! every chain is completed, every answer is a well-formed response, and the backend is
//! never asked to touch anything outside the usable region.
//!
//! While the chains run, the test keeps its own model of the device ([`Model`]): which
//! blocks are plugged, the requested and usable sizes, and pending injected backend
//! failures. It never reads the device; it predicts every answer from the spec's rules and
//! changes blocks only when the device ACKs. After every chain the device must agree with
//! it: the answer, `plugged_size` and the other sizes in config space, the state of the
//! touched blocks (bitmap and STATE requests), and the blocks handed to the backend.

#![expect(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]
#![expect(
    clippy::cast_possible_truncation,
    reason = "truncating random numbers is how the generator picks values; block indices \
              of a 256-block region fit every integer type"
)]

use std::collections::BTreeMap;
use std::ops::Range;

use virtio_mem::test_utils::{
    BackendCall, TestDevice, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, GUEST_MEM_SIZE,
};
use virtio_mem::wire::{ConfigSpace, RawRequest, RawResponse};
use virtio_mem::{BlockState, DeviceConfig, Request, Response};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

const ADDR: u64 = 1 << 32;
const BS: u64 = 2 << 20;
const REGION: u64 = 256 * BS;
const NR_BLOCKS: u64 = REGION / BS;
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

/// The reference: the device as the virtio spec describes it, in blocks, written without
/// looking at the device. Blocks change only through [`Model::apply`], from the answer the
/// device gave; [`Model::predict`] says what that answer must be.
struct Model {
    /// One entry per block of the region.
    plugged: Vec<bool>,
    /// `requested_size`, in blocks.
    requested: u64,
    /// `usable_region_size`, in blocks.
    usable: u64,
    /// The configured headroom of the usable region above `requested_size`, in blocks.
    margin: u64,
    /// Injected plug failures the backend has not consumed yet.
    fail_plugs: u32,
}

/// The answer the spec demands, and why (for the tally and for failure messages).
#[derive(Clone, Copy, Debug)]
struct Prediction {
    resp: Response,
    why: &'static str,
}

impl Model {
    fn new(margin: u64) -> Self {
        let mut m = Model {
            plugged: vec![false; NR_BLOCKS as usize],
            requested: 0,
            usable: 0,
            margin,
            fail_plugs: 0,
        };
        m.usable = m.usable_target();
        m
    }

    fn count(&self) -> u64 {
        self.plugged.iter().filter(|&&p| p).count() as u64
    }

    /// What the usable region must cover: the requested size plus the margin, at most the
    /// region.
    fn usable_target(&self) -> u64 {
        (self.requested + self.margin).min(NR_BLOCKS)
    }

    /// The host changes the requested size; the usable region may grow, never shrink.
    fn resize(&mut self, blocks: u64) {
        self.requested = blocks;
        self.usable = self.usable.max(self.usable_target());
    }

    /// The block range of a PLUG, UNPLUG or STATE if the spec makes it valid: `addr`
    /// block-aligned inside the region, at least one block, all of it inside the usable
    /// region.
    fn range(&self, addr: u64, nb_blocks: u16) -> Option<Range<usize>> {
        let offset = addr.checked_sub(ADDR)?;
        if nb_blocks == 0 || offset % BS != 0 {
            return None;
        }
        let first = offset / BS;
        let end = first.checked_add(u64::from(nb_blocks))?;
        (end <= self.usable).then_some(first as usize..end as usize)
    }

    fn state_of(&self, blocks: Range<usize>) -> BlockState {
        let len = blocks.len();
        match self.plugged[blocks].iter().filter(|&&p| p).count() {
            0 => BlockState::Unplugged,
            n if n == len => BlockState::Plugged,
            _ => BlockState::Mixed,
        }
    }

    fn predict(&self, req: &Request) -> Prediction {
        let p = |resp, why| Prediction { resp, why };
        match *req {
            Request::Plug { addr, nb_blocks } => match self.range(addr, nb_blocks) {
                None => p(Response::Error, "PLUG -> ERROR (invalid range)"),
                Some(r) if self.plugged[r.clone()].iter().any(|&b| b) => p(
                    Response::Error,
                    "PLUG -> ERROR (a block is already plugged)",
                ),
                Some(r) if self.count() + r.len() as u64 > self.requested => {
                    p(Response::Nack, "PLUG -> NACK (beyond requested_size)")
                }
                Some(_) if self.fail_plugs > 0 => p(Response::Busy, "PLUG -> BUSY (host failure)"),
                Some(_) => p(Response::Ack(None), "PLUG -> ACK"),
            },
            Request::Unplug { addr, nb_blocks } => match self.range(addr, nb_blocks) {
                None => p(Response::Error, "UNPLUG -> ERROR (invalid range)"),
                Some(r) if self.plugged[r.clone()].iter().any(|&b| !b) => {
                    p(Response::Error, "UNPLUG -> ERROR (a block is not plugged)")
                }
                Some(_) => p(Response::Ack(None), "UNPLUG -> ACK"),
            },
            // No unplug failures are injected, so UNPLUG_ALL always succeeds.
            Request::UnplugAll => p(Response::Ack(None), "UNPLUG_ALL -> ACK"),
            Request::State { addr, nb_blocks } => match self.range(addr, nb_blocks) {
                None => p(Response::Error, "STATE -> ERROR (invalid range)"),
                Some(r) => {
                    let state = self.state_of(r);
                    let why = match state {
                        BlockState::Plugged => "STATE -> ACK plugged",
                        BlockState::Unplugged => "STATE -> ACK unplugged",
                        BlockState::Mixed => "STATE -> ACK mixed",
                    };
                    p(Response::Ack(Some(state)), why)
                }
            },
            Request::Unsupported(_) => p(Response::Error, "unknown type -> ERROR"),
        }
    }

    /// The blocks the backend must have been asked to plug and to unplug for `resp`,
    /// computed before [`Model::apply`].
    fn backend_effect(&self, req: &Request, resp: Response) -> (Vec<bool>, Vec<bool>) {
        let mut plug = vec![false; self.plugged.len()];
        let mut unplug = vec![false; self.plugged.len()];
        match (*req, resp) {
            // A BUSY plug did ask the backend; the backend refused.
            (Request::Plug { addr, nb_blocks }, Response::Ack(None) | Response::Busy) => {
                plug[self.range(addr, nb_blocks).unwrap()].fill(true);
            }
            (Request::Unplug { addr, nb_blocks }, Response::Ack(None)) => {
                unplug[self.range(addr, nb_blocks).unwrap()].fill(true);
            }
            (Request::UnplugAll, Response::Ack(None)) => unplug.clone_from(&self.plugged),
            _ => {}
        }
        (plug, unplug)
    }

    /// Takes in the device's answer to `req`. Only an ACK changes blocks: PLUG plugs the
    /// range, UNPLUG unplugs it, UNPLUG_ALL unplugs everything and lets the usable region
    /// shrink back to what the requested size needs. A BUSY plug used up one injected
    /// failure. ERROR and NACK change nothing.
    fn apply(&mut self, req: &Request, resp: Response) {
        match (*req, resp) {
            (Request::Plug { addr, nb_blocks }, Response::Ack(None)) => {
                let r = self.range(addr, nb_blocks).unwrap();
                self.plugged[r].fill(true);
            }
            (Request::Plug { .. }, Response::Busy) => {
                self.fail_plugs = self.fail_plugs.saturating_sub(1);
            }
            (Request::Unplug { addr, nb_blocks }, Response::Ack(None)) => {
                let r = self.range(addr, nb_blocks).unwrap();
                self.plugged[r].fill(false);
            }
            (Request::UnplugAll, Response::Ack(None)) => {
                self.plugged.fill(false);
                self.usable = self.usable_target();
            }
            _ => {}
        }
    }
}

/// Decodes request bytes by the spec's layout (le16 type, 6 padding bytes, le64 addr,
/// le16 nb_blocks, 6 padding bytes) and type values (PLUG 0, UNPLUG 1, UNPLUG_ALL 2,
/// STATE 3).
fn decode_request(bytes: &[u8; 24]) -> Request {
    let req_type = u16::from_le_bytes([bytes[0], bytes[1]]);
    let addr = u64::from_le_bytes(bytes[8..16].try_into().unwrap());
    let nb_blocks = u16::from_le_bytes([bytes[16], bytes[17]]);
    match req_type {
        0 => Request::Plug { addr, nb_blocks },
        1 => Request::Unplug { addr, nb_blocks },
        2 => Request::UnplugAll,
        3 => Request::State { addr, nb_blocks },
        other => Request::Unsupported(other),
    }
}

/// What the device must make of a chain.
#[derive(Debug)]
enum Framing {
    /// A request holding these bytes.
    Request(Request),
    /// Not a request: answered ERROR if it has room for that, and nothing changes.
    Malformed,
    /// A chain with random links and flags: the test takes the device's word on whether
    /// it is a request (framing of such chains is `malformed.rs`'s business).
    Unpredicted,
}

/// The framing of a linear chain (links in order, no INDIRECT), by the rules in
/// `queue.rs`: at most 16 descriptors, none empty or outside guest memory, readable ones
/// first holding at least 24 bytes, then writable ones holding at least 10. Like every
/// virtio-queue chain, it ends early where its total length would pass `u32::MAX`
/// (virtio 1.2, 2.7.5.2). The request bytes are read from guest memory here, before the
/// device runs.
fn frame_linear(mem: &GuestMemoryMmap, descs: &[(u64, u32, u16)]) -> Framing {
    let mut total = 0u32;
    let mut readable = Vec::new();
    let mut writable_bytes = 0u64;
    for (d, &(addr, len, flags)) in descs.iter().enumerate() {
        let Some(sum) = total.checked_add(len) else {
            break;
        };
        total = sum;
        let in_memory = addr
            .checked_add(u64::from(len))
            .is_some_and(|end| end <= GUEST_MEM_SIZE as u64);
        if d == 16 || len == 0 || !in_memory {
            return Framing::Malformed;
        }
        if flags & DESC_F_WRITE != 0 {
            writable_bytes += u64::from(len);
        } else if writable_bytes > 0 {
            return Framing::Malformed;
        } else {
            readable.push((addr, len));
        }
    }
    let readable_bytes: u64 = readable.iter().map(|&(_, len)| u64::from(len)).sum();
    if readable_bytes < 24 || writable_bytes < 10 {
        return Framing::Malformed;
    }
    let mut bytes = [0u8; 24];
    let mut off = 0usize;
    for &(addr, len) in &readable {
        let n = (24 - off).min(len as usize);
        mem.read_slice(&mut bytes[off..off + n], GuestAddress(addr))
            .unwrap();
        off += n;
        if off == 24 {
            break;
        }
    }
    Framing::Request(decode_request(&bytes))
}

/// The region's blocks a request names, valid or not, clamped to the region: where a
/// device bug would show first. UNPLUG_ALL names every block; a zero-block request the
/// block at its address.
fn touched(req: &Request) -> Option<Range<u64>> {
    match *req {
        Request::Plug { addr, nb_blocks }
        | Request::Unplug { addr, nb_blocks }
        | Request::State { addr, nb_blocks } => {
            let (bs, base) = (u128::from(BS), u128::from(ADDR));
            let start = u128::from(addr).max(base);
            let end = (u128::from(addr) + u128::from(nb_blocks.max(1)) * bs)
                .min(base + u128::from(REGION));
            (start < end).then(|| {
                let first = u64::try_from((start - base) / bs).unwrap();
                let last = u64::try_from((end - base).div_ceil(bs)).unwrap();
                first..last
            })
        }
        Request::UnplugAll => Some(0..NR_BLOCKS),
        Request::Unsupported(_) => None,
    }
}

/// The blocks a run of backend calls plugged and unplugged. Every call must be non-empty,
/// block-aligned and inside the region, and no block may be asked twice.
fn backend_blocks(calls: &[BackendCall], i: usize) -> (Vec<bool>, Vec<bool>) {
    let mut plug = vec![false; NR_BLOCKS as usize];
    let mut unplug = vec![false; NR_BLOCKS as usize];
    for call in calls {
        let (BackendCall::Plug { addr, len } | BackendCall::Unplug { addr, len }) = *call;
        assert!(
            len > 0
                && addr >= ADDR
                && (addr - ADDR) % BS == 0
                && len % BS == 0
                && addr - ADDR + len <= REGION,
            "iteration {i}: backend call {call:?} is not a block range of the region"
        );
        let blocks = if matches!(call, BackendCall::Plug { .. }) {
            &mut plug
        } else {
            &mut unplug
        };
        let first = ((addr - ADDR) / BS) as usize;
        for b in &mut blocks[first..first + (len / BS) as usize] {
            assert!(
                !*b,
                "iteration {i}: backend asked twice for a block: {calls:?}"
            );
            *b = true;
        }
    }
    (plug, unplug)
}

/// The device's view of `blocks` must be the model's: block by block in the bitmap, and as
/// the driver sees it through STATE requests over the usable part (whole range, first and
/// last block).
fn check_blocks(t: &mut TestDevice, m: &Model, blocks: Range<u64>, i: usize) {
    let bitmap = t.dev.state().bitmap();
    for b in blocks.clone() {
        let want = if m.plugged[b as usize] {
            BlockState::Plugged
        } else {
            BlockState::Unplugged
        };
        assert_eq!(
            bitmap.state(b..b + 1),
            Some(want),
            "iteration {i}: block {b}"
        );
    }
    let end = blocks.end.min(m.usable);
    if blocks.start >= end {
        return;
    }
    let mut queries = vec![
        blocks.start..end,
        blocks.start..blocks.start + 1,
        end - 1..end,
    ];
    queries.dedup();
    for q in queries {
        let req = Request::State {
            addr: ADDR + q.start * BS,
            nb_blocks: u16::try_from(q.end - q.start).unwrap(),
        };
        let want = m.predict(&req).resp;
        assert!(matches!(want, Response::Ack(Some(_))), "{req:?} is valid");
        assert_eq!(
            t.request(req),
            want,
            "iteration {i}: {req:?} (blocks {q:?})"
        );
    }
}

/// Config space as the driver reads it must hold the model's sizes.
fn check_config(t: &TestDevice, m: &Model, i: usize) {
    let mut c = ConfigSpace::default();
    t.dev.read_config(0, c.as_mut_slice());
    assert_eq!(
        c.plugged_size.to_native(),
        m.count() * BS,
        "iteration {i}: plugged_size"
    );
    assert_eq!(
        c.usable_region_size.to_native(),
        m.usable * BS,
        "iteration {i}: usable_region_size"
    );
    assert_eq!(
        c.requested_size.to_native(),
        m.requested * BS,
        "iteration {i}: requested_size"
    );
    assert_eq!(
        t.dev.state().plugged_size(),
        m.count() * BS,
        "iteration {i}"
    );
}

#[test]
fn hundred_thousand_random_chains() {
    let cfg = DeviceConfig::with_layout(ADDR, REGION, BS).unwrap();
    let mut m = Model::new(cfg.usable_margin / BS);
    let mut t = TestDevice::new(cfg).unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut answered = 0u64;
    let mut silent = 0u64;
    let mut malformed = 0u64;
    let mut tally: BTreeMap<&'static str, u64> = BTreeMap::new();
    check_config(&t, &m, 0);
    for i in 0..ITERATIONS {
        if rng.chance(2) {
            let size = rng.below(REGION / BS + 1) * BS;
            t.dev.set_requested_size(size).unwrap();
            m.resize(size / BS);
        }
        if rng.chance(1) {
            t.dev.state_mut().backend_mut().fail_plugs = 1;
            m.fail_plugs = 1;
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
        let mut descs = Vec::new();
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
            descs.push((addr, len, flags));
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
        let framing = if linear {
            frame_linear(&t.driver.mem, &descs)
        } else {
            Framing::Unpredicted
        };
        let calls_before = t.dev.state().backend().calls.len();
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

        // Which request, if any, reached the state machine.
        let request = match (framing, done[0].request) {
            (Framing::Request(want), Ok(got)) => {
                assert_eq!(got, want, "iteration {i}: request parsed from the chain");
                Some(got)
            }
            (Framing::Malformed, Err(_)) => None,
            (Framing::Unpredicted, got) => got.ok(),
            (want, got) => panic!("iteration {i}: chain should be {want:?}, device saw {got:?}"),
        };
        let calls = &t.dev.state().backend().calls[calls_before..];
        let touched_blocks = if let Some(req) = request {
            // A request always has room for its answer, and the answer is the spec's.
            assert_eq!(done[0].used_len, 10, "iteration {i}: {req:?} not answered");
            let got = done[0].response.unwrap();
            let want = m.predict(&req);
            assert_eq!(got, want.resp, "iteration {i}: {req:?} ({})", want.why);
            *tally.entry(want.why).or_default() += 1;
            let (want_plug, want_unplug) = m.backend_effect(&req, got);
            let (plug, unplug) = backend_blocks(calls, i);
            assert!(
                plug == want_plug && unplug == want_unplug,
                "iteration {i}: {req:?} -> {got:?} made backend calls {calls:?}"
            );
            m.apply(&req, got);
            touched(&req)
        } else {
            // Not a request: ERROR or no answer at all, and nothing changes.
            malformed += 1;
            assert!(
                matches!(done[0].response, None | Some(Response::Error)),
                "iteration {i}: malformed chain answered {:?}",
                done[0].response
            );
            assert!(
                calls.is_empty(),
                "iteration {i}: malformed chain reached the backend"
            );
            None
        };
        check_config(&t, &m, i);
        assert!(m.usable >= m.requested);
        if let Some(blocks) = touched_blocks {
            check_blocks(&mut t, &m, blocks, i);
        }
    }
    // Every block, once more, as the driver sees it.
    for b in 0..NR_BLOCKS {
        check_blocks(&mut t, &m, b..b + 1, ITERATIONS);
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
    let metrics = t.dev.state().metrics();
    println!(
        "answered {answered}, silent {silent}, malformed {}, plug acks {}, errors {}",
        metrics.malformed_chains,
        metrics.plug.ack,
        metrics.plug.error + metrics.unplug.error + metrics.state.error
    );
    println!("model: {malformed} chains not requests, answers {tally:#?}");
    assert!(answered > 10_000 && silent > 10_000);
    assert!(metrics.plug.ack > 100 && metrics.unplug.ack + metrics.unplug_all.ack > 100);
    // And every rule of the model must have been put to the test. The sequence is seeded;
    // the minimums sit below what it reaches (UNPLUG_ALL is a quarter of the valid request
    // types, so few blocks are plugged at a time and the plugged-side rules are rare).
    for (why, min) in [
        ("PLUG -> ACK", 100),
        ("PLUG -> ERROR (invalid range)", 100),
        ("PLUG -> ERROR (a block is already plugged)", 5),
        ("PLUG -> NACK (beyond requested_size)", 50),
        ("PLUG -> BUSY (host failure)", 100),
        ("UNPLUG -> ACK", 5),
        ("UNPLUG -> ERROR (invalid range)", 100),
        ("UNPLUG -> ERROR (a block is not plugged)", 100),
        ("UNPLUG_ALL -> ACK", 100),
        ("STATE -> ACK plugged", 5),
        ("STATE -> ACK unplugged", 100),
        ("STATE -> ACK mixed", 5),
        ("STATE -> ERROR (invalid range)", 100),
        ("unknown type -> ERROR", 100),
    ] {
        let seen = tally.get(why).copied().unwrap_or(0);
        assert!(seen >= min, "only {seen} answers \"{why}\" (want {min})");
    }
}
