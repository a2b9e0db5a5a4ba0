//! Address buses that dispatch vCPU exits to devices: one for MMIO (virtio-mmio windows) and
//! one for x86 I/O ports (serial, i8042, ACPI power management).
//!
//! A bus maps non-overlapping `[base, base + len)` ranges to devices. Devices see offsets
//! relative to their base. An access that hits no device reads as all ones (like an
//! unclaimed bus) and writes are dropped; both are counted, not logged per access.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// A device on a bus.
pub trait BusDevice: Send {
    /// Reads `data.len()` bytes at `offset` from the device's base.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Writes `data` at `offset` from the device's base.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors when inserting a device.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The range is empty or wraps around the address space.
    #[error("invalid bus range {base:#x}+{len:#x}")]
    InvalidRange {
        /// Base address.
        base: u64,
        /// Length.
        len: u64,
    },
    /// The range overlaps a device already on the bus.
    #[error("bus range {base:#x}+{len:#x} overlaps the device at {other:#x}")]
    Overlap {
        /// Base address.
        base: u64,
        /// Length.
        len: u64,
        /// Base of the device already there.
        other: u64,
    },
}

/// A shared device handle.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Clone)]
struct Entry {
    len: u64,
    device: SharedDevice,
}

/// A bus: a map from address ranges to devices. Cheap to share between vCPU threads
/// (`Arc<Bus>`); devices can be added at run time.
#[derive(Default)]
pub struct Bus {
    devices: RwLock<BTreeMap<u64, Entry>>,
    unclaimed: AtomicU64,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges: Vec<(u64, u64)> = self
            .devices
            .read()
            .map(|d| d.iter().map(|(b, e)| (*b, e.len)).collect())
            .unwrap_or_default();
        f.debug_struct("Bus").field("ranges", &ranges).finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at `[base, base + len)`.
    ///
    /// # Errors
    ///
    /// [`BusError`] when the range is invalid or overlaps another device.
    pub fn insert(&self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        let mut devices = self.devices.write().unwrap_or_else(|p| p.into_inner());
        // The device starting at or before `end - 1` is the only one that can overlap.
        if let Some((&other, e)) = devices.range(..end).next_back() {
            if other.saturating_add(e.len) > base {
                return Err(BusError::Overlap { base, len, other });
            }
        }
        devices.insert(base, Entry { len, device });
        Ok(())
    }

    fn find(&self, addr: u64, len: usize) -> Option<(u64, SharedDevice)> {
        let devices = self.devices.read().unwrap_or_else(|p| p.into_inner());
        let (&base, e) = devices.range(..=addr).next_back()?;
        let offset = addr - base;
        let end = offset.checked_add(u64::try_from(len).ok()?)?;
        (end <= e.len).then(|| (offset, e.device.clone()))
    }

    /// Dispatches a read; returns false when no device claims the whole access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, dev)) => {
                dev.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                self.unclaimed.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Dispatches a write; returns false when no device claims the whole access.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, dev)) => {
                dev.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .write(offset, data);
                true
            }
            None => {
                self.unclaimed.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// How many accesses hit no device.
    pub fn unclaimed_accesses(&self) -> u64 {
        self.unclaimed.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Rec(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Rec {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(u8::try_from(offset).unwrap_or(0xee));
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatch_with_offsets() {
        let bus = Bus::new();
        let d = Arc::new(Mutex::new(Rec::default()));
        bus.insert(d.clone(), 0x3f8, 8).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fd, &mut b));
        assert_eq!(b, [5]);
        assert!(bus.write(0x3f8, &[7]));
        assert_eq!(d.lock().unwrap().0, vec![(0, vec![7])]);
    }

    #[test]
    fn unclaimed_reads_all_ones() {
        let bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Rec::default())), 0x100, 0x10)
            .unwrap();
        let mut b = [0u8; 4];
        assert!(!bus.read(0x80, &mut b));
        assert_eq!(b, [0xff; 4]);
        // Straddling the end of a device is not claimed either.
        assert!(!bus.read(0x10e, &mut b));
        assert!(!bus.write(0x110, &[1]));
        assert_eq!(bus.unclaimed_accesses(), 3);
    }

    #[test]
    fn overlaps_are_refused() {
        let bus = Bus::new();
        let d = || Arc::new(Mutex::new(Rec::default())) as SharedDevice;
        bus.insert(d(), 0x1000, 0x1000).unwrap();
        assert!(matches!(
            bus.insert(d(), 0x1fff, 1),
            Err(BusError::Overlap { other: 0x1000, .. })
        ));
        assert!(matches!(
            bus.insert(d(), 0x800, 0x801),
            Err(BusError::Overlap { .. })
        ));
        bus.insert(d(), 0x2000, 0x1000).unwrap();
        bus.insert(d(), 0x800, 0x800).unwrap();
        assert_eq!(
            bus.insert(d(), u64::MAX, 2),
            Err(BusError::InvalidRange {
                base: u64::MAX,
                len: 2
            })
        );
        assert!(matches!(
            bus.insert(d(), 0, 0),
            Err(BusError::InvalidRange { .. })
        ));
    }
}
