//! The virtio-mem wire format: config space, request and response layouts, and their
//! conversion to and from typed values.
//!
//! Everything here is little-endian and fixed-size (virtio spec, "Memory Device",
//! sections "Device configuration layout" and "Device Operation"). Parsing never fails on
//! unknown values: an unknown request type is data ([`Request::Unsupported`]) that the
//! state machine answers with ERROR.

use vm_memory::{ByteValued, Le16, Le64};

/// Virtio device type of a memory device.
pub const VIRTIO_ID_MEM: u32 = 24;

/// Feature bit: `node_id` is an ACPI proximity domain.
pub const VIRTIO_MEM_F_ACPI_PXM: u32 = 0;
/// Feature bit: the driver must never access unplugged memory.
pub const VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE: u32 = 1;
/// Feature bit: the device supports persistent suspend (newer spec; never offered here).
pub const VIRTIO_MEM_F_PERSISTENT_SUSPEND: u32 = 2;
/// Transport feature bit: a modern (virtio 1.x) device. Required.
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// Request type: plug blocks.
pub const VIRTIO_MEM_REQ_PLUG: u16 = 0;
/// Request type: unplug blocks.
pub const VIRTIO_MEM_REQ_UNPLUG: u16 = 1;
/// Request type: unplug every block.
pub const VIRTIO_MEM_REQ_UNPLUG_ALL: u16 = 2;
/// Request type: report the state of a range of blocks.
pub const VIRTIO_MEM_REQ_STATE: u16 = 3;

/// Response type: the request succeeded.
pub const VIRTIO_MEM_RESP_ACK: u16 = 0;
/// Response type: the request was refused (plug beyond the requested size).
pub const VIRTIO_MEM_RESP_NACK: u16 = 1;
/// Response type: the request could not be processed right now; retry later.
pub const VIRTIO_MEM_RESP_BUSY: u16 = 2;
/// Response type: the request was invalid.
pub const VIRTIO_MEM_RESP_ERROR: u16 = 3;

/// STATE answer: every block in the range is plugged.
pub const VIRTIO_MEM_STATE_PLUGGED: u16 = 0;
/// STATE answer: every block in the range is unplugged.
pub const VIRTIO_MEM_STATE_UNPLUGGED: u16 = 1;
/// STATE answer: the range holds plugged and unplugged blocks.
pub const VIRTIO_MEM_STATE_MIXED: u16 = 2;

/// Size in bytes of the device configuration space.
pub const CONFIG_SPACE_SIZE: usize = 56;
/// Size in bytes of a request.
pub const REQUEST_SIZE: usize = 24;
/// Size in bytes of a response.
pub const RESPONSE_SIZE: usize = 10;

/// The device configuration space, exactly as the driver reads it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConfigSpace {
    /// Size and alignment of a block, a power of two.
    pub block_size: Le64,
    /// Proximity domain of the region; valid with `VIRTIO_MEM_F_ACPI_PXM`.
    pub node_id: Le16,
    /// Reserved.
    pub padding: [u8; 6],
    /// Guest-physical start of the region.
    pub addr: Le64,
    /// Size of the whole region.
    pub region_size: Le64,
    /// Size of the part of the region the driver may plug into.
    pub usable_region_size: Le64,
    /// Sum of the sizes of all plugged blocks.
    pub plugged_size: Le64,
    /// Size the host asks the driver to plug.
    pub requested_size: Le64,
}

// SAFETY: `ConfigSpace` is `repr(C)`, contains only integer types (and byte arrays) for
// which every bit pattern is valid, and has no implicit padding (asserted below).
unsafe impl ByteValued for ConfigSpace {}

/// A request exactly as it sits in the driver's buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawRequest {
    /// Request type (`VIRTIO_MEM_REQ_*`).
    pub req_type: Le16,
    /// Reserved.
    pub padding: [u8; 6],
    /// Guest-physical address of the first block (PLUG, UNPLUG, STATE).
    pub addr: Le64,
    /// Number of blocks (PLUG, UNPLUG, STATE).
    pub nb_blocks: Le16,
    /// Reserved.
    pub padding_1: [u8; 6],
}

// SAFETY: `RawRequest` is `repr(C)` with integer fields only, every bit pattern is valid,
// and it has no implicit padding (size asserted below).
unsafe impl ByteValued for RawRequest {}

/// A response exactly as the device writes it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawResponse {
    /// Response type (`VIRTIO_MEM_RESP_*`).
    pub resp_type: Le16,
    /// Reserved.
    pub padding: [u8; 6],
    /// Block state (`VIRTIO_MEM_STATE_*`), meaningful for STATE only.
    pub state: Le16,
}

// SAFETY: `RawResponse` is `repr(C)` with integer fields only, every bit pattern is valid,
// and it has no implicit padding (size asserted below).
unsafe impl ByteValued for RawResponse {}

const _: () = assert!(std::mem::size_of::<ConfigSpace>() == CONFIG_SPACE_SIZE);
const _: () = assert!(std::mem::size_of::<RawRequest>() == REQUEST_SIZE);
const _: () = assert!(std::mem::size_of::<RawResponse>() == RESPONSE_SIZE);

/// A parsed request. Padding and fields the type does not use are ignored, as the spec
/// requires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// Plug `nb_blocks` blocks starting at `addr`.
    Plug {
        /// Guest-physical address of the first block.
        addr: u64,
        /// Number of blocks.
        nb_blocks: u16,
    },
    /// Unplug `nb_blocks` blocks starting at `addr`.
    Unplug {
        /// Guest-physical address of the first block.
        addr: u64,
        /// Number of blocks.
        nb_blocks: u16,
    },
    /// Unplug every block and let the usable region shrink.
    UnplugAll,
    /// Report whether the range is plugged, unplugged or mixed.
    State {
        /// Guest-physical address of the first block.
        addr: u64,
        /// Number of blocks.
        nb_blocks: u16,
    },
    /// A request type this device does not know.
    Unsupported(u16),
}

impl From<RawRequest> for Request {
    fn from(raw: RawRequest) -> Self {
        let addr = raw.addr.to_native();
        let nb_blocks = raw.nb_blocks.to_native();
        match raw.req_type.to_native() {
            VIRTIO_MEM_REQ_PLUG => Request::Plug { addr, nb_blocks },
            VIRTIO_MEM_REQ_UNPLUG => Request::Unplug { addr, nb_blocks },
            VIRTIO_MEM_REQ_UNPLUG_ALL => Request::UnplugAll,
            VIRTIO_MEM_REQ_STATE => Request::State { addr, nb_blocks },
            other => Request::Unsupported(other),
        }
    }
}

impl From<Request> for RawRequest {
    fn from(req: Request) -> Self {
        let (req_type, addr, nb_blocks) = match req {
            Request::Plug { addr, nb_blocks } => (VIRTIO_MEM_REQ_PLUG, addr, nb_blocks),
            Request::Unplug { addr, nb_blocks } => (VIRTIO_MEM_REQ_UNPLUG, addr, nb_blocks),
            Request::UnplugAll => (VIRTIO_MEM_REQ_UNPLUG_ALL, 0, 0),
            Request::State { addr, nb_blocks } => (VIRTIO_MEM_REQ_STATE, addr, nb_blocks),
            Request::Unsupported(t) => (t, 0, 0),
        };
        RawRequest {
            req_type: req_type.into(),
            addr: addr.into(),
            nb_blocks: nb_blocks.into(),
            ..Default::default()
        }
    }
}

/// The state of a range of blocks, as STATE reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockState {
    /// Every block is plugged.
    Plugged,
    /// Every block is unplugged.
    Unplugged,
    /// Some blocks are plugged, some are not.
    Mixed,
}

impl BlockState {
    fn to_wire(self) -> u16 {
        match self {
            BlockState::Plugged => VIRTIO_MEM_STATE_PLUGGED,
            BlockState::Unplugged => VIRTIO_MEM_STATE_UNPLUGGED,
            BlockState::Mixed => VIRTIO_MEM_STATE_MIXED,
        }
    }
}

/// A typed response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Response {
    /// Success; `Some(state)` for STATE requests.
    Ack(Option<BlockState>),
    /// Refused: a PLUG beyond the requested size.
    Nack,
    /// Transient host trouble: the driver retries later.
    Busy,
    /// The request is invalid.
    Error,
}

impl Response {
    /// The `VIRTIO_MEM_RESP_*` value of this response.
    pub fn wire_type(self) -> u16 {
        match self {
            Response::Ack(_) => VIRTIO_MEM_RESP_ACK,
            Response::Nack => VIRTIO_MEM_RESP_NACK,
            Response::Busy => VIRTIO_MEM_RESP_BUSY,
            Response::Error => VIRTIO_MEM_RESP_ERROR,
        }
    }
}

impl From<Response> for RawResponse {
    fn from(resp: Response) -> Self {
        let state = match resp {
            Response::Ack(Some(state)) => state.to_wire(),
            _ => 0,
        };
        RawResponse {
            resp_type: resp.wire_type().into(),
            padding: [0; 6],
            state: state.into(),
        }
    }
}

impl RawResponse {
    /// Decodes a response as a driver would; `None` for an unknown type or state.
    pub fn decode(&self, is_state_request: bool) -> Option<Response> {
        let state = match self.state.to_native() {
            VIRTIO_MEM_STATE_PLUGGED => Some(BlockState::Plugged),
            VIRTIO_MEM_STATE_UNPLUGGED => Some(BlockState::Unplugged),
            VIRTIO_MEM_STATE_MIXED => Some(BlockState::Mixed),
            _ => None,
        };
        match self.resp_type.to_native() {
            VIRTIO_MEM_RESP_ACK if is_state_request => state.map(|s| Response::Ack(Some(s))),
            VIRTIO_MEM_RESP_ACK => Some(Response::Ack(None)),
            VIRTIO_MEM_RESP_NACK => Some(Response::Nack),
            VIRTIO_MEM_RESP_BUSY => Some(Response::Busy),
            VIRTIO_MEM_RESP_ERROR => Some(Response::Error),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_the_spec() {
        assert_eq!(std::mem::size_of::<ConfigSpace>(), 56);
        assert_eq!(std::mem::size_of::<RawRequest>(), 24);
        assert_eq!(std::mem::size_of::<RawResponse>(), 10);
        assert_eq!(std::mem::offset_of!(ConfigSpace, node_id), 8);
        assert_eq!(std::mem::offset_of!(ConfigSpace, addr), 16);
        assert_eq!(std::mem::offset_of!(ConfigSpace, region_size), 24);
        assert_eq!(std::mem::offset_of!(ConfigSpace, usable_region_size), 32);
        assert_eq!(std::mem::offset_of!(ConfigSpace, plugged_size), 40);
        assert_eq!(std::mem::offset_of!(ConfigSpace, requested_size), 48);
        assert_eq!(std::mem::offset_of!(RawRequest, addr), 8);
        assert_eq!(std::mem::offset_of!(RawRequest, nb_blocks), 16);
        assert_eq!(std::mem::offset_of!(RawResponse, state), 8);
    }

    #[test]
    fn request_bytes_are_little_endian_and_padding_is_ignored() {
        let mut bytes = [0xffu8; REQUEST_SIZE];
        bytes[0..2].copy_from_slice(&1u16.to_le_bytes());
        bytes[8..16].copy_from_slice(&0x1_2345_6000u64.to_le_bytes());
        bytes[16..18].copy_from_slice(&0x0203u16.to_le_bytes());
        let mut raw = RawRequest::default();
        raw.as_mut_slice().copy_from_slice(&bytes);
        assert_eq!(
            Request::from(raw),
            Request::Unplug {
                addr: 0x1_2345_6000,
                nb_blocks: 0x0203
            }
        );
    }

    #[test]
    fn unknown_request_type_is_data() {
        let raw = RawRequest {
            req_type: 0x1234.into(),
            ..Default::default()
        };
        assert_eq!(Request::from(raw), Request::Unsupported(0x1234));
    }

    #[test]
    fn requests_round_trip() {
        for req in [
            Request::Plug {
                addr: 1 << 30,
                nb_blocks: 7,
            },
            Request::Unplug {
                addr: 2 << 30,
                nb_blocks: 1,
            },
            Request::UnplugAll,
            Request::State {
                addr: 3 << 30,
                nb_blocks: 65535,
            },
            Request::Unsupported(9),
        ] {
            assert_eq!(Request::from(RawRequest::from(req)), req);
        }
    }

    #[test]
    fn response_bytes() {
        let raw = RawResponse::from(Response::Ack(Some(BlockState::Mixed)));
        assert_eq!(raw.as_slice(), &[0, 0, 0, 0, 0, 0, 0, 0, 2, 0]);
        let raw = RawResponse::from(Response::Error);
        assert_eq!(raw.as_slice(), &[3, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(raw.decode(false), Some(Response::Error));
        let raw = RawResponse::from(Response::Ack(Some(BlockState::Unplugged)));
        assert_eq!(
            raw.decode(true),
            Some(Response::Ack(Some(BlockState::Unplugged)))
        );
    }
}
