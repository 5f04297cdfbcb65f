//! The i8042 keyboard controller's reset line, nothing else: the CPU-reset
//! command (0xFE on port 0x64) ends the VM cleanly.
//!
//! Reads return 0xff, like ports with no controller behind them. Linux's
//! i8042 driver then finds the output buffer never drains and reports "No
//! controller found" at once; a controller that looked present but did not
//! answer would cost a self-test timeout (about 0.5 s) on every boot.

use crate::devices::BusDevice;
use crate::exit::{ExitHandle, ExitReason};

/// Command-port offset (0x64) relative to the data port (0x60).
const COMMAND_OFFSET: u64 = 4;
/// Pulse the CPU reset line.
const CMD_RESET_CPU: u8 = 0xfe;

/// The i8042 device, mapped at 0x60..=0x64.
pub struct I8042 {
    exit: ExitHandle,
}

impl I8042 {
    /// New controller that asks `exit` to stop the VM on reset.
    pub fn new(exit: ExitHandle) -> Self {
        I8042 { exit }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            log::info!("guest requested a reset through the i8042 controller");
            self.exit.request(ExitReason::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_requests_exit() {
        let h = ExitHandle::new().unwrap();
        let mut d = I8042::new(h.clone());
        d.write(0, &[0xfe]);
        d.write(4, &[0xd1]);
        assert!(h.reason().is_none(), "only 0xFE on 0x64 resets");
        let mut b = [0u8];
        d.read(4, &mut b);
        assert_eq!(b, [0xff], "reads as an absent controller");
        d.write(4, &[0xfe]);
        assert_eq!(h.reason(), Some(ExitReason::Reset));
    }
}
