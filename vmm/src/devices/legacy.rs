//! Small platform devices on the I/O bus that let the guest stop the VM:
//! - [`I8042`]: the keyboard controller's reset line (`0x64` write `0xfe`), which Linux uses
//!   for `reboot=k` and as a fallback.
//! - [`AcpiPm`]: the hardware-reduced ACPI sleep control/status and reset registers named
//!   in the FADT: S5 (poweroff) and reset (reboot).

use log::{debug, info};

use crate::bus::BusDevice;
use crate::exit::{ExitHandle, ExitReason};

/// I/O port base of the i8042 (data port 0x60, command/status port 0x64).
pub const I8042_BASE: u64 = 0x60;
/// Ports covered by the i8042.
pub const I8042_PORTS: u64 = 5;
const I8042_COMMAND: u64 = 4;
const I8042_CMD_RESET: u8 = 0xfe;

/// A minimal i8042: no keyboard, only the CPU reset command.
#[derive(Debug)]
pub struct I8042 {
    exit: ExitHandle,
}

impl I8042 {
    /// An i8042 that requests a reboot through `exit`.
    pub fn new(exit: ExitHandle) -> Self {
        Self { exit }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty, so a driver never waits.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == I8042_COMMAND && data.first() == Some(&I8042_CMD_RESET) {
            info!("guest reset through the i8042");
            self.exit.request(ExitReason::Reboot);
        }
    }
}

/// I/O port base of the ACPI power-management registers.
pub const ACPI_PM_BASE: u64 = 0x600;
/// Ports covered.
pub const ACPI_PM_PORTS: u64 = 3;
/// Offset of the FADT sleep control register (one byte).
pub const SLEEP_CONTROL: u64 = 0;
/// Offset of the FADT sleep status register (one byte).
pub const SLEEP_STATUS: u64 = 1;
/// Offset of the FADT reset register (one byte).
pub const RESET_REG: u64 = 2;
/// The value the guest writes to [`RESET_REG`] (FADT `reset_value`).
pub const RESET_VALUE: u8 = 1;
/// The S5 sleep type, as the DSDT's `\_S5` package says.
pub const S5_SLEEP_TYPE: u8 = 5;
/// SLP_EN in the sleep control register (ACPI 6.5, 4.8.3.7).
const SLP_EN: u8 = 1 << 5;

/// The hardware-reduced ACPI sleep and reset registers.
#[derive(Debug)]
pub struct AcpiPm {
    exit: ExitHandle,
}

impl AcpiPm {
    /// Power-management registers that stop the VM through `exit`.
    pub fn new(exit: ExitHandle) -> Self {
        Self { exit }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Sleep status: WAK_STS clear; nothing else readable.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            SLEEP_CONTROL if v & SLP_EN != 0 => {
                let sleep_type = (v >> 2) & 0x7;
                if sleep_type == S5_SLEEP_TYPE {
                    info!("guest entered ACPI S5 (poweroff)");
                    self.exit.request(ExitReason::Poweroff);
                } else {
                    debug!("ACPI: ignoring sleep type {sleep_type}: only S5 is offered");
                }
            }
            RESET_REG if v == RESET_VALUE => {
                info!("guest reset through the ACPI reset register");
                self.exit.request(ExitReason::Reboot);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]
mod tests {
    use super::*;
    use crate::exit::exit_channel;

    #[test]
    fn i8042_reset_requests_reboot() {
        let (h, w) = exit_channel().unwrap();
        let mut d = I8042::new(h);
        d.write(0, &[0xfe]);
        d.write(I8042_COMMAND, &[0xaa]);
        assert_eq!(w.try_reason(), None);
        d.write(I8042_COMMAND, &[0xfe]);
        assert_eq!(w.try_reason(), Some(ExitReason::Reboot));
    }

    #[test]
    fn s5_powers_off_other_states_do_not() {
        let (h, w) = exit_channel().unwrap();
        let mut d = AcpiPm::new(h);
        d.write(SLEEP_CONTROL, &[(3 << 2) | SLP_EN]);
        d.write(SLEEP_CONTROL, &[5 << 2]);
        assert_eq!(w.try_reason(), None);
        d.write(SLEEP_CONTROL, &[(5 << 2) | SLP_EN]);
        assert_eq!(w.try_reason(), Some(ExitReason::Poweroff));
    }

    #[test]
    fn reset_register_reboots() {
        let (h, w) = exit_channel().unwrap();
        let mut d = AcpiPm::new(h);
        d.write(RESET_REG, &[0]);
        assert_eq!(w.try_reason(), None);
        d.write(RESET_REG, &[RESET_VALUE]);
        assert_eq!(w.try_reason(), Some(ExitReason::Reboot));
    }
}
