//! Spec conformance: every device rule of the virtio-mem spec (and of what the Linux
//! driver relies on) is one named test here, driven through a real split virtqueue laid out in guest memory.

#![expect(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]

use virtio_mem::test_utils::{BackendCall, TestDevice, DESC_F_WRITE};
use virtio_mem::wire::VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE;
use virtio_mem::wire::{RawRequest, VIRTIO_F_VERSION_1, VIRTIO_MEM_F_ACPI_PXM};
use virtio_mem::{BlockState, DeviceConfig, Request, Response, VirtioMemError};

const MIB: u64 = 1 << 20;
const ADDR: u64 = 4 << 30;
const REGION: u64 = 1 << 30;
const BS: u64 = 2 * MIB;

fn cfg() -> DeviceConfig {
    DeviceConfig::with_layout(ADDR, REGION, BS).unwrap()
}

fn device() -> TestDevice {
    TestDevice::new(cfg()).unwrap()
}

fn device_requesting(size: u64) -> TestDevice {
    let mut t = device();
    t.dev.set_requested_size(size).unwrap();
    t
}

fn plug(addr: u64, nb_blocks: u16) -> Request {
    Request::Plug { addr, nb_blocks }
}

fn unplug(addr: u64, nb_blocks: u16) -> Request {
    Request::Unplug { addr, nb_blocks }
}

fn state(addr: u64, nb_blocks: u16) -> Request {
    Request::State { addr, nb_blocks }
}

const ACK: Response = Response::Ack(None);

fn assert_sizes_aligned(t: &TestDevice) {
    let c = t.dev.state().config_space();
    let bs = c.block_size.to_native();
    for (name, v) in [
        ("addr", c.addr.to_native()),
        ("region_size", c.region_size.to_native()),
        ("usable_region_size", c.usable_region_size.to_native()),
        ("plugged_size", c.plugged_size.to_native()),
        ("requested_size", c.requested_size.to_native()),
    ] {
        assert_eq!(
            v % bs,
            0,
            "{name} = {v:#x} is not a multiple of block size {bs:#x}"
        );
    }
    assert!(
        c.usable_region_size.to_native() >= c.requested_size.to_native(),
        "usable_region_size below requested_size"
    );
}

// ---- Sizes and static fields ----

#[test]
fn rule_sizes_are_block_multiples_and_usable_covers_requested() {
    let mut t = device();
    assert_sizes_aligned(&t);
    for size in [0, 64 * MIB, REGION, 128 * MIB, 0] {
        t.dev.set_requested_size(size).unwrap();
        assert_sizes_aligned(&t);
        let plugged = t.dev.state().plugged_size();
        if plugged < size {
            let blocks = u16::try_from((size - plugged) / BS).unwrap();
            assert_eq!(t.request(plug(ADDR + plugged, blocks)), ACK);
        } else if plugged > size {
            let blocks = u16::try_from((plugged - size) / BS).unwrap();
            assert_eq!(t.request(unplug(ADDR + size, blocks)), ACK);
        }
        assert_sizes_aligned(&t);
        assert_eq!(t.dev.state().plugged_size(), size);
    }
}

#[test]
fn rule_set_requested_size_rejects_unaligned_and_too_big_and_changes_nothing() {
    let mut t = device();
    let before = t.dev.state().config_space();
    assert_eq!(
        t.dev.set_requested_size(BS + 4096),
        Err(VirtioMemError::UnalignedRequestedSize {
            size: BS + 4096,
            block_size: BS
        })
    );
    assert_eq!(
        t.dev.set_requested_size(REGION + BS),
        Err(VirtioMemError::RequestedSizeTooBig {
            size: REGION + BS,
            region_size: REGION
        })
    );
    assert_eq!(t.dev.state().config_space(), before);
    assert_eq!(t.irq.config_changes(), 0);
}

#[test]
fn rule_static_fields_never_change() {
    let mut c = cfg();
    c.node_id = Some(3);
    let mut t = TestDevice::new(c).unwrap();
    let fixed = |t: &TestDevice| {
        let s = t.dev.state().config_space();
        (s.block_size, s.node_id, s.addr, s.region_size)
    };
    let before = fixed(&t);
    t.dev.set_requested_size(256 * MIB).unwrap();
    assert_eq!(t.request(plug(ADDR, 128)), ACK);
    assert_eq!(t.request(unplug(ADDR, 64)), ACK);
    assert_eq!(t.request(Request::UnplugAll), ACK);
    t.dev.reset();
    t.dev.system_reset().unwrap();
    assert_eq!(fixed(&t), before);
    assert_eq!(t.dev.state().config_space().node_id.to_native(), 3);
}

// ---- Notifications and config generation ----

#[test]
fn rule_config_change_notification_when_requested_size_changes() {
    let mut t = device();
    t.dev.set_requested_size(64 * MIB).unwrap();
    assert_eq!(t.irq.config_changes(), 1);
    t.dev.set_requested_size(0).unwrap();
    assert_eq!(t.irq.config_changes(), 2);
}

#[test]
fn rule_config_change_notification_when_usable_region_grows() {
    let mut t = device();
    let usable0 = t.dev.state().usable_region_size();
    t.dev.set_requested_size(REGION).unwrap();
    assert!(t.dev.state().usable_region_size() > usable0);
    assert_eq!(t.dev.state().usable_region_size(), REGION);
    assert_eq!(t.irq.config_changes(), 1);
}

#[test]
fn rule_no_config_change_notification_for_unplug_all() {
    let mut t = device_requesting(REGION);
    assert_eq!(t.request(plug(ADDR, 64)), ACK);
    t.dev.set_requested_size(0).unwrap();
    let notified = t.irq.config_changes();
    let usable_before = t.dev.state().usable_region_size();
    assert_eq!(t.request(Request::UnplugAll), ACK);
    assert!(
        t.dev.state().usable_region_size() < usable_before,
        "usable shrank"
    );
    assert_eq!(t.irq.config_changes(), notified);
}

#[test]
fn rule_no_config_change_notification_for_plugged_size_alone() {
    let mut t = device_requesting(64 * MIB);
    let notified = t.irq.config_changes();
    assert_eq!(t.request(plug(ADDR, 32)), ACK);
    assert_eq!(t.request(unplug(ADDR, 32)), ACK);
    assert_eq!(t.irq.config_changes(), notified);
}

#[test]
fn rule_config_generation_bumps_when_a_64bit_field_changes() {
    let mut t = device();
    let g0 = t.dev.state().config_generation();
    t.dev.set_requested_size(64 * MIB).unwrap();
    let g1 = t.dev.state().config_generation();
    assert_ne!(g0, g1, "requested_size change");
    assert_eq!(t.request(plug(ADDR, 1)), ACK);
    let g2 = t.dev.state().config_generation();
    assert_ne!(g1, g2, "plugged_size change");
    assert_eq!(
        t.request(state(ADDR, 1)),
        Response::Ack(Some(BlockState::Plugged))
    );
    assert_eq!(
        t.dev.state().config_generation(),
        g2,
        "STATE changes nothing"
    );
}

// ---- PLUG / UNPLUG validation ----

#[test]
fn rule_plug_unplug_unaligned_address_is_error() {
    let mut t = device_requesting(64 * MIB);
    assert_eq!(t.request(plug(ADDR + 4096, 1)), Response::Error);
    assert_eq!(t.request(plug(ADDR, 1)), ACK);
    assert_eq!(t.request(unplug(ADDR + 1, 1)), Response::Error);
    assert_eq!(t.dev.state().plugged_size(), BS);
}

#[test]
fn rule_plug_unplug_zero_blocks_is_error() {
    let mut t = device_requesting(64 * MIB);
    assert_eq!(t.request(plug(ADDR, 0)), Response::Error);
    assert_eq!(t.request(unplug(ADDR, 0)), Response::Error);
    assert_eq!(t.request(state(ADDR, 0)), Response::Error);
}

#[test]
fn rule_range_leaving_the_usable_region_is_error() {
    let mut t = device_requesting(64 * MIB);
    let usable = t.dev.state().usable_region_size();
    assert!(
        usable < REGION,
        "test needs a usable region smaller than the region"
    );
    // Below the region.
    assert_eq!(t.request(plug(ADDR - BS, 1)), Response::Error);
    // Starts inside, ends past the usable region (but inside the region).
    let last = ADDR + usable - BS;
    assert_eq!(t.request(plug(last, 2)), Response::Error);
    assert_eq!(t.request(unplug(last, 2)), Response::Error);
    // Wholly past the usable region.
    assert_eq!(t.request(plug(ADDR + usable, 1)), Response::Error);
    // The last usable block itself is fine.
    assert_eq!(t.request(plug(last, 1)), ACK);
}

#[test]
fn rule_overflowing_range_is_error() {
    let mut t = device_requesting(64 * MIB);
    let near_top = u64::MAX - (u64::MAX % BS);
    assert_eq!(t.request(plug(near_top, u16::MAX)), Response::Error);
    assert_eq!(t.request(unplug(near_top, u16::MAX)), Response::Error);
    assert_eq!(t.request(state(near_top, u16::MAX)), Response::Error);
    assert!(
        t.dev.state().backend().calls.is_empty(),
        "backend never asked"
    );
}

#[test]
fn rule_plug_of_an_already_plugged_block_is_error() {
    let mut t = device_requesting(64 * MIB);
    assert_eq!(t.request(plug(ADDR + BS, 1)), ACK);
    // Overlapping on one block only.
    assert_eq!(t.request(plug(ADDR, 2)), Response::Error);
    assert_eq!(t.dev.state().plugged_size(), BS);
}

#[test]
fn rule_unplug_of_an_unplugged_block_is_error() {
    let mut t = device_requesting(64 * MIB);
    assert_eq!(t.request(unplug(ADDR, 1)), Response::Error);
    assert_eq!(t.request(plug(ADDR, 1)), ACK);
    assert_eq!(t.request(unplug(ADDR, 2)), Response::Error);
    assert_eq!(t.dev.state().plugged_size(), BS);
}

#[test]
fn rule_plug_beyond_requested_size_is_nack() {
    let mut t = device_requesting(4 * BS);
    assert_eq!(t.request(plug(ADDR, 5)), Response::Nack);
    assert_eq!(t.request(plug(ADDR, 4)), ACK);
    assert_eq!(t.request(plug(ADDR + 4 * BS, 1)), Response::Nack);
    assert_eq!(t.dev.state().plugged_size(), 4 * BS);
    // Lowering the request does not make existing blocks invalid to unplug.
    t.dev.set_requested_size(0).unwrap();
    assert_eq!(t.request(unplug(ADDR, 4)), ACK);
}

#[test]
fn rule_busy_on_transient_host_failure_changes_nothing() {
    let mut t = device_requesting(64 * MIB);
    t.dev.state_mut().backend_mut().fail_plugs = 1;
    assert_eq!(t.request(plug(ADDR, 4)), Response::Busy);
    assert_eq!(t.dev.state().plugged_size(), 0);
    assert_eq!(
        t.request(state(ADDR, 4)),
        Response::Ack(Some(BlockState::Unplugged))
    );
    assert_eq!(t.request(plug(ADDR, 4)), ACK);
    t.dev.state_mut().backend_mut().fail_unplugs = 1;
    assert_eq!(t.request(unplug(ADDR, 4)), Response::Busy);
    assert_eq!(t.dev.state().plugged_size(), 4 * BS);
    assert_eq!(t.request(unplug(ADDR, 4)), ACK);
    assert_eq!(t.dev.state().metrics().backend_failures, 2);
}

#[test]
fn rule_ack_means_every_block_changed_and_plugged_size_reflects_it() {
    let mut t = device_requesting(64 * MIB);
    assert_eq!(t.request(plug(ADDR + 2 * BS, 8)), ACK);
    assert_eq!(t.dev.state().plugged_size(), 8 * BS);
    assert_eq!(
        t.request(state(ADDR + 2 * BS, 8)),
        Response::Ack(Some(BlockState::Plugged))
    );
    assert_eq!(
        t.dev.state().backend().calls,
        vec![BackendCall::Plug {
            addr: ADDR + 2 * BS,
            len: 8 * BS
        }]
    );
    assert_eq!(t.request(unplug(ADDR + 4 * BS, 2)), ACK);
    assert_eq!(t.dev.state().plugged_size(), 6 * BS);
    assert_eq!(
        t.request(state(ADDR + 4 * BS, 2)),
        Response::Ack(Some(BlockState::Unplugged))
    );
    let c = t.dev.state().config_space();
    assert_eq!(
        c.plugged_size.to_native(),
        6 * BS,
        "config space shows it too"
    );
}

// ---- UNPLUG_ALL ----

#[test]
fn rule_unplug_all_ack_means_everything_unplugged() {
    let mut t = device_requesting(64 * MIB);
    assert_eq!(t.request(plug(ADDR, 3)), ACK);
    assert_eq!(t.request(plug(ADDR + 10 * BS, 5)), ACK);
    assert_eq!(t.request(Request::UnplugAll), ACK);
    assert_eq!(t.dev.state().plugged_size(), 0);
    assert_eq!(
        t.request(state(ADDR, 32)),
        Response::Ack(Some(BlockState::Unplugged))
    );
    let unplugs: Vec<_> = t
        .dev
        .state()
        .backend()
        .calls
        .iter()
        .filter(|c| matches!(c, BackendCall::Unplug { .. }))
        .copied()
        .collect();
    assert_eq!(
        unplugs,
        vec![
            BackendCall::Unplug {
                addr: ADDR,
                len: 3 * BS
            },
            BackendCall::Unplug {
                addr: ADDR + 10 * BS,
                len: 5 * BS
            },
        ]
    );
}

#[test]
fn rule_unplug_all_may_shrink_usable_region_but_not_below_requested() {
    let mut t = device_requesting(REGION);
    assert_eq!(t.dev.state().usable_region_size(), REGION);
    t.dev.set_requested_size(64 * MIB).unwrap();
    assert_eq!(
        t.dev.state().usable_region_size(),
        REGION,
        "no shrink on resize"
    );
    assert_eq!(t.request(Request::UnplugAll), ACK);
    let usable = t.dev.state().usable_region_size();
    assert!(usable < REGION);
    assert!(usable >= 64 * MIB);
}

#[test]
fn rule_unplug_all_busy_on_host_failure() {
    let mut t = device_requesting(64 * MIB);
    assert_eq!(t.request(plug(ADDR, 2)), ACK);
    t.dev.state_mut().backend_mut().fail_unplugs = 1;
    assert_eq!(t.request(Request::UnplugAll), Response::Busy);
    assert_eq!(t.dev.state().plugged_size(), 2 * BS);
    assert_eq!(t.request(Request::UnplugAll), ACK);
    assert_eq!(t.dev.state().plugged_size(), 0);
}

// ---- STATE ----

#[test]
fn rule_state_bad_range_is_error() {
    let mut t = device_requesting(64 * MIB);
    let usable = t.dev.state().usable_region_size();
    assert_eq!(t.request(state(ADDR + 1, 1)), Response::Error);
    assert_eq!(t.request(state(ADDR + usable, 1)), Response::Error);
    assert_eq!(t.request(state(ADDR - BS, 2)), Response::Error);
}

#[test]
fn rule_state_reports_plugged_unplugged_mixed() {
    let mut t = device_requesting(64 * MIB);
    assert_eq!(t.request(plug(ADDR, 2)), ACK);
    assert_eq!(
        t.request(state(ADDR, 2)),
        Response::Ack(Some(BlockState::Plugged))
    );
    assert_eq!(
        t.request(state(ADDR + 2 * BS, 2)),
        Response::Ack(Some(BlockState::Unplugged))
    );
    assert_eq!(
        t.request(state(ADDR + BS, 2)),
        Response::Ack(Some(BlockState::Mixed))
    );
}

// ---- Padding and unknown requests ----

#[test]
fn rule_padding_and_unused_fields_are_ignored() {
    let mut t = device_requesting(64 * MIB);
    let mut raw = RawRequest::from(plug(ADDR, 1));
    raw.padding = [0xff; 6];
    raw.padding_1 = [0xaa; 6];
    t.driver.write_request(0x20000, raw);
    t.driver
        .add_chain(&[(0x20000, 24, 0), (0x20100, 10, DESC_F_WRITE)]);
    t.process();
    assert_eq!(t.driver.read_response(0x20100).decode(false), Some(ACK));
    // UNPLUG_ALL ignores addr and nb_blocks.
    let mut raw = RawRequest::from(Request::UnplugAll);
    raw.addr = 12345.into();
    raw.nb_blocks = 0.into();
    t.driver.write_request(0x20000, raw);
    t.driver
        .add_chain(&[(0x20000, 24, 0), (0x20100, 10, DESC_F_WRITE)]);
    t.process();
    assert_eq!(t.driver.read_response(0x20100).decode(false), Some(ACK));
    assert_eq!(t.dev.state().plugged_size(), 0);
}

#[test]
fn rule_unknown_request_type_is_error() {
    let mut t = device();
    assert_eq!(t.request(Request::Unsupported(4)), Response::Error);
    assert_eq!(t.request(Request::Unsupported(0xffff)), Response::Error);
    assert_eq!(t.dev.state().metrics().unsupported, 2);
}

// ---- Memory contents ----

#[test]
fn rule_device_never_touches_plugged_memory() {
    // The device only asks the backend to release blocks the guest unplugs; plugging
    // neighbours, STATE and failed requests never touch a plugged block.
    let mut t = device_requesting(64 * MIB);
    assert_eq!(t.request(plug(ADDR + 4 * BS, 4)), ACK);
    let plugged = (ADDR + 4 * BS)..(ADDR + 8 * BS);
    assert_eq!(t.request(plug(ADDR, 4)), ACK);
    assert_eq!(t.request(plug(ADDR + 8 * BS, 4)), ACK);
    assert_eq!(t.request(plug(ADDR + 6 * BS, 4)), Response::Error);
    assert_eq!(
        t.request(state(ADDR, 12)),
        Response::Ack(Some(BlockState::Plugged))
    );
    assert_eq!(t.request(unplug(ADDR, 4)), ACK);
    for (i, r) in t.dev.state().backend().ranges().enumerate().skip(1) {
        assert!(
            r.end <= plugged.start || r.start >= plugged.end,
            "call {i} touched plugged range: {r:x?}"
        );
    }
}

#[test]
fn rule_unplugged_inaccessible_is_offered_and_required_by_default() {
    let t = device();
    let f = t.dev.state().device_features();
    assert_ne!(f & (1 << VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE), 0);
    let mut t = device();
    let without = f & !(1 << VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE);
    assert_eq!(
        t.dev.state_mut().ack_features(without),
        Err(VirtioMemError::UnpluggedInaccessibleRequired)
    );
    // Turned off, it is neither offered nor required.
    let mut c = cfg();
    c.unplugged_inaccessible = false;
    let mut t = TestDevice::new(c).unwrap();
    let f = t.dev.state().device_features();
    assert_eq!(f & (1 << VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE), 0);
    assert_eq!(
        t.dev.state_mut().ack_features(1 << VIRTIO_F_VERSION_1),
        Ok(())
    );
}

#[test]
fn rule_version_1_required_and_acpi_pxm_only_with_a_node() {
    let mut t = device();
    let f = t.dev.state().device_features();
    assert_ne!(f & (1 << VIRTIO_F_VERSION_1), 0);
    assert_eq!(f & (1 << VIRTIO_MEM_F_ACPI_PXM), 0);
    assert_eq!(
        t.dev
            .state_mut()
            .ack_features(f & !(1 << VIRTIO_F_VERSION_1)),
        Err(VirtioMemError::Version1Required)
    );
    assert_eq!(
        t.dev
            .state_mut()
            .ack_features(f | (1 << VIRTIO_MEM_F_ACPI_PXM)),
        Err(VirtioMemError::FeatureNotOffered {
            unknown: 1 << VIRTIO_MEM_F_ACPI_PXM
        })
    );
    let mut c = cfg();
    c.node_id = Some(1);
    let t = TestDevice::new(c).unwrap();
    assert_ne!(
        t.dev.state().device_features() & (1 << VIRTIO_MEM_F_ACPI_PXM),
        0
    );
}

// ---- Resets ----

#[test]
fn rule_device_reset_keeps_block_state() {
    let mut t = device_requesting(64 * MIB);
    assert_eq!(t.request(plug(ADDR, 8)), ACK);
    let calls = t.dev.state().backend().calls.len();
    t.dev.reset();
    assert!(!t.dev.is_activated());
    assert_eq!(t.dev.state().plugged_size(), 8 * BS);
    assert_eq!(
        t.dev.state().backend().calls.len(),
        calls,
        "no host work on reset"
    );
    // The driver re-probes: features and queue again, blocks still plugged.
    let f = t.dev.state().device_features();
    t.dev.state_mut().ack_features(f).unwrap();
    t.driver.reset();
    let q = t.driver.device_queue();
    t.dev.activate(q);
    assert_eq!(
        t.request(state(ADDR, 8)),
        Response::Ack(Some(BlockState::Plugged))
    );
}

#[test]
fn rule_system_reset_unplugs_everything() {
    let mut t = device_requesting(REGION);
    assert_eq!(t.request(plug(ADDR, 100)), ACK);
    t.dev.system_reset().unwrap();
    assert_eq!(t.dev.state().plugged_size(), 0);
    assert_eq!(
        t.dev.state().requested_size(),
        REGION,
        "requested size survives"
    );
    assert_eq!(t.dev.state().bitmap().plugged(), 0);
    assert_eq!(
        t.dev.state().backend().calls.last(),
        Some(&BackendCall::Unplug {
            addr: ADDR,
            len: 100 * BS
        })
    );
}

#[test]
fn rule_every_request_is_answered() {
    let mut t = device_requesting(64 * MIB);
    for req in [
        plug(ADDR, 1),
        plug(ADDR + 3, 1),
        Request::UnplugAll,
        Request::Unsupported(99),
    ] {
        t.driver.submit(req);
    }
    // Four chains overwrite descriptor 0 each time; the device sees four heads.
    let done = t.process();
    assert_eq!(done.len(), 4);
    assert!(done
        .iter()
        .all(|c| c.used_len == 10 && c.response.is_some()));
    assert_eq!(t.driver.take_used().len(), 4);
    assert!(t.irq.used_notifications() >= 1);
}
