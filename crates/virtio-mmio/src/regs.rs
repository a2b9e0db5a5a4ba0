//! Register offsets and constant values of the virtio-mmio version 2 register layout
//! (virtio 1.2, section 4.2.2 "MMIO Device Register Layout").
//!
//! All registers below [`CONFIG`] are 32 bits wide and must be accessed with aligned 32-bit
//! reads and writes; the device-specific configuration space from [`CONFIG`] on may be
//! accessed with any width.

/// Magic value register: reads as [`MAGIC`] ("virt" in little endian).
pub const MAGIC_VALUE: u64 = 0x000;
/// Device version register: reads as [`VERSION`].
pub const VERSION_REG: u64 = 0x004;
/// Virtio subsystem device id.
pub const DEVICE_ID: u64 = 0x008;
/// Virtio subsystem vendor id.
pub const VENDOR_ID: u64 = 0x00c;
/// Device features, 32 bits selected by [`DEVICE_FEATURES_SEL`].
pub const DEVICE_FEATURES: u64 = 0x010;
/// Selects which 32-bit word of the device features [`DEVICE_FEATURES`] shows.
pub const DEVICE_FEATURES_SEL: u64 = 0x014;
/// Driver (accepted) features, 32 bits selected by [`DRIVER_FEATURES_SEL`].
pub const DRIVER_FEATURES: u64 = 0x020;
/// Selects which 32-bit word of the driver features [`DRIVER_FEATURES`] writes.
pub const DRIVER_FEATURES_SEL: u64 = 0x024;
/// Selects the queue that the queue registers below refer to.
pub const QUEUE_SEL: u64 = 0x030;
/// Maximum size of the selected queue; 0 if the queue does not exist.
pub const QUEUE_NUM_MAX: u64 = 0x034;
/// Size of the selected queue, chosen by the driver.
pub const QUEUE_NUM: u64 = 0x038;
/// Ready bit of the selected queue.
pub const QUEUE_READY: u64 = 0x044;
/// Queue notifier: the driver writes the index of a queue with new buffers.
pub const QUEUE_NOTIFY: u64 = 0x050;
/// Interrupt status: bit 0 used buffer, bit 1 configuration change.
pub const INTERRUPT_STATUS: u64 = 0x060;
/// Interrupt acknowledge: the driver writes the bits it has handled.
pub const INTERRUPT_ACK: u64 = 0x064;
/// Device status; writing 0 resets the device.
pub const STATUS: u64 = 0x070;
/// Descriptor table address of the selected queue, low 32 bits.
pub const QUEUE_DESC_LOW: u64 = 0x080;
/// Descriptor table address of the selected queue, high 32 bits.
pub const QUEUE_DESC_HIGH: u64 = 0x084;
/// Driver (available) ring address of the selected queue, low 32 bits.
pub const QUEUE_DRIVER_LOW: u64 = 0x090;
/// Driver (available) ring address of the selected queue, high 32 bits.
pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
/// Device (used) ring address of the selected queue, low 32 bits.
pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
/// Device (used) ring address of the selected queue, high 32 bits.
pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
/// Shared memory region select.
pub const SHM_SEL: u64 = 0x0ac;
/// Shared memory region length, low 32 bits (all ones: no such region).
pub const SHM_LEN_LOW: u64 = 0x0b0;
/// Shared memory region length, high 32 bits (all ones: no such region).
pub const SHM_LEN_HIGH: u64 = 0x0b4;
/// Shared memory region base, low 32 bits.
pub const SHM_BASE_LOW: u64 = 0x0b8;
/// Shared memory region base, high 32 bits.
pub const SHM_BASE_HIGH: u64 = 0x0bc;
/// Configuration atomicity value: changes whenever the device configuration changes.
pub const CONFIG_GENERATION: u64 = 0x0fc;
/// Start of the device-specific configuration space.
pub const CONFIG: u64 = 0x100;

/// The value of [`MAGIC_VALUE`]: "virt".
pub const MAGIC: u32 = 0x7472_6976;
/// The value of [`VERSION_REG`]: 2, the non-legacy ("modern") interface.
pub const VERSION: u32 = 2;
/// The vendor id this transport reports.
pub const VENDOR: u32 = 0;

/// Interrupt status bit: the device used a buffer in at least one virtqueue.
pub const INT_VRING: u32 = 0x1;
/// Interrupt status bit: the device configuration changed.
pub const INT_CONFIG: u32 = 0x2;

/// Size of the MMIO window of one device. The register block ends at 0x100; the rest is
/// device configuration space.
pub const WINDOW_SIZE: u64 = 0x1000;
