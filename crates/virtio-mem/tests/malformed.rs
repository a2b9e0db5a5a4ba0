//! Malformed descriptor chains: each is completed, never panics, and is answered ERROR
//! exactly when a writable response buffer exists.

#![expect(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]

use virtio_mem::test_utils::{
    TestDevice, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, GUEST_MEM_SIZE,
};
use virtio_mem::wire::RawResponse;
use virtio_mem::{DeviceConfig, MalformedChain, Request, Response};
use vm_memory::{ByteValued, Bytes, GuestAddress};

const REQ: u64 = 0x20000;
const RESP: u64 = 0x20100;
const OUTSIDE: u64 = GUEST_MEM_SIZE as u64 + 0x1000;

fn device() -> TestDevice {
    let mut t =
        TestDevice::new(DeviceConfig::with_layout(4 << 30, 1 << 30, 2 << 20).unwrap()).unwrap();
    t.dev.set_requested_size(64 << 20).unwrap();
    t.driver.write_request(
        REQ,
        Request::Plug {
            addr: 4 << 30,
            nb_blocks: 1,
        }
        .into(),
    );
    t
}

/// Submits the chain, processes it and returns (why, used_len, response bytes).
fn run(t: &mut TestDevice, bufs: &[(u64, u32, u16)]) -> (Option<MalformedChain>, u32, RawResponse) {
    poison(t, RESP);
    let head = t.driver.add_chain(bufs);
    let done = t.process();
    assert_eq!(done.len(), 1, "the chain is completed");
    let used = t.driver.take_used();
    assert_eq!(used.len(), 1);
    assert_eq!(used[0].0, u32::from(head));
    assert_eq!(used[0].1, done[0].used_len);
    (
        done[0].request.err(),
        done[0].used_len,
        t.driver.read_response(RESP),
    )
}

fn assert_error_answered(t: &mut TestDevice, bufs: &[(u64, u32, u16)], why: MalformedChain) {
    let (got, len, resp) = run(t, bufs);
    assert_eq!(got, Some(why));
    assert_eq!(len, 10);
    assert_eq!(resp.decode(false), Some(Response::Error));
    assert_eq!(t.dev.state().plugged_size(), 0, "nothing acted on");
}

fn assert_consumed_silently(t: &mut TestDevice, bufs: &[(u64, u32, u16)], why: MalformedChain) {
    let (got, len, resp) = run(t, bufs);
    assert_eq!(got, Some(why));
    assert_eq!(len, 0);
    assert_eq!(resp.as_slice(), &[0xee; 10], "response buffer untouched");
    assert_eq!(t.dev.state().plugged_size(), 0);
}

fn poison(t: &TestDevice, addr: u64) {
    t.driver
        .mem
        .write_slice(&[0xee; 10], GuestAddress(addr))
        .unwrap();
}

#[test]
fn request_too_short_is_answered_error() {
    let mut t = device();
    assert_error_answered(
        &mut t,
        &[(REQ, 23, 0), (RESP, 10, DESC_F_WRITE)],
        MalformedChain::RequestTooShort,
    );
}

#[test]
fn missing_request_is_answered_error() {
    let mut t = device();
    assert_error_answered(
        &mut t,
        &[(RESP, 10, DESC_F_WRITE)],
        MalformedChain::RequestTooShort,
    );
}

#[test]
fn response_buffer_too_short_is_consumed_with_length_zero() {
    let mut t = device();
    assert_consumed_silently(
        &mut t,
        &[(REQ, 24, 0), (RESP, 9, DESC_F_WRITE)],
        MalformedChain::NoResponseBuffer,
    );
}

#[test]
fn readable_response_buffer_is_consumed_with_length_zero() {
    let mut t = device();
    assert_consumed_silently(
        &mut t,
        &[(REQ, 24, 0), (RESP, 10, 0)],
        MalformedChain::NoResponseBuffer,
    );
}

#[test]
fn wrong_direction_is_answered_error() {
    let mut t = device();
    assert_error_answered(
        &mut t,
        &[(RESP, 10, DESC_F_WRITE), (REQ, 24, 0)],
        MalformedChain::WrongDirection,
    );
    assert_error_answered(
        &mut t,
        &[(REQ, 24, 0), (RESP, 10, DESC_F_WRITE), (REQ, 24, 0)],
        MalformedChain::WrongDirection,
    );
}

#[test]
fn request_outside_guest_memory_is_answered_error() {
    let mut t = device();
    assert_error_answered(
        &mut t,
        &[(OUTSIDE, 24, 0), (RESP, 10, DESC_F_WRITE)],
        MalformedChain::OutsideGuestMemory,
    );
    // Straddling the end of guest memory.
    let edge = GUEST_MEM_SIZE as u64 - 8;
    assert_error_answered(
        &mut t,
        &[(edge, 24, 0), (RESP, 10, DESC_F_WRITE)],
        MalformedChain::OutsideGuestMemory,
    );
    assert_error_answered(
        &mut t,
        &[(u64::MAX - 4, 24, 0), (RESP, 10, DESC_F_WRITE)],
        MalformedChain::OutsideGuestMemory,
    );
}

#[test]
fn response_outside_guest_memory_is_consumed_with_length_zero() {
    let mut t = device();
    assert_consumed_silently(
        &mut t,
        &[(REQ, 24, 0), (OUTSIDE, 10, DESC_F_WRITE)],
        MalformedChain::OutsideGuestMemory,
    );
}

#[test]
fn zero_length_descriptor_is_answered_error() {
    let mut t = device();
    assert_error_answered(
        &mut t,
        &[(REQ, 0, 0), (REQ, 24, 0), (RESP, 10, DESC_F_WRITE)],
        MalformedChain::ZeroLength,
    );
}

#[test]
fn too_many_descriptors_is_answered_error() {
    let mut t = device();
    let mut bufs = vec![(REQ, 24, 0)];
    bufs.extend(std::iter::repeat_n((RESP, 10, DESC_F_WRITE), 16));
    assert_error_answered(&mut t, &bufs, MalformedChain::TooManyDescriptors);
}

#[test]
fn descriptor_loop_is_bounded() {
    let mut t = device();
    // 0 -> 1 -> 0 -> ... never ends by itself.
    t.driver.write_descriptor(0, REQ, 24, DESC_F_NEXT, 1);
    t.driver
        .write_descriptor(1, RESP, 10, DESC_F_NEXT | DESC_F_WRITE, 0);
    t.driver.make_available(0);
    let done = t.process();
    assert_eq!(done.len(), 1);
    assert_eq!(t.driver.take_used().len(), 1);
}

#[test]
fn split_request_and_response_buffers_are_fine() {
    // Framing is free: 8 + 16 request bytes, 4 + 6 response bytes.
    let mut t = device();
    let (why, len, resp) = run(
        &mut t,
        &[
            (REQ, 8, 0),
            (REQ + 8, 16, 0),
            (RESP, 4, DESC_F_WRITE),
            (RESP + 4, 6, DESC_F_WRITE),
        ],
    );
    assert_eq!(why, None);
    assert_eq!(len, 10);
    assert_eq!(resp.decode(false), Some(Response::Ack(None)));
    assert_eq!(t.dev.state().plugged_size(), 2 << 20);
}

#[test]
fn indirect_table_outside_memory_does_not_panic() {
    let mut t = device();
    t.driver
        .write_descriptor(0, OUTSIDE, 32, DESC_F_INDIRECT, 0);
    t.driver.make_available(0);
    let done = t.process();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].used_len, 0);
    assert_eq!(t.dev.state().metrics().malformed_chains, 1);
}

#[test]
fn one_bad_chain_does_not_stop_the_batch() {
    let mut t = device();
    // Chain A (descriptors 0-1) malformed, chain B (2-3) fine, both available at once.
    t.driver.write_descriptor(0, REQ, 4, DESC_F_NEXT, 1);
    t.driver.write_descriptor(1, RESP, 10, DESC_F_WRITE, 0);
    t.driver.write_descriptor(2, REQ, 24, DESC_F_NEXT, 3);
    t.driver
        .write_descriptor(3, RESP + 0x40, 10, DESC_F_WRITE, 0);
    t.driver.make_available(0);
    t.driver.make_available(2);
    let done = t.process();
    assert_eq!(done.len(), 2);
    assert_eq!(done[0].response, Some(Response::Error));
    assert_eq!(done[1].response, Some(Response::Ack(None)));
    assert_eq!(t.driver.take_used(), vec![(0, 10), (2, 10)]);
    assert!(t.irq.used_notifications() >= 1, "the batch is signalled");
}
