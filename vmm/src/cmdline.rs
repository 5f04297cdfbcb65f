//! Kernel command line building.
//!
//! The command line always starts with the same base as the QEMU harness uses
//! ([`milk_harness::BASE_CMDLINE`]: serial console, reboot by triple fault, which
//! the VMM treats as a clean exit, no reboot loop on panic), so a guest behaves
//! the same under both engines, followed by the user's arguments and one `virtio_mmio.device=` entry
//! per virtio-mmio device. Init arguments (after ` -- `) stay last.

use linux_loader::cmdline::Cmdline;
use vm_memory::GuestAddress;

use crate::layout::CMDLINE_MAX_SIZE;

/// Arguments every guest gets (shared with the QEMU engine).
pub const BASE_CMDLINE: &str = milk_harness::BASE_CMDLINE;

/// Errors building the command line.
#[derive(Debug, thiserror::Error)]
pub enum CmdlineError {
    /// linux-loader rejected the string (bad characters, too long, ...).
    #[error("invalid kernel command line: {0}")]
    Invalid(#[from] linux_loader::cmdline::Error),
    /// Control or non-ASCII characters.
    #[error("kernel command line may only contain printable ASCII")]
    NotPrintable,
}

/// A virtio-mmio device as announced on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioDeviceInfo {
    /// Guest physical base address of the register window.
    pub addr: u64,
    /// Size of the register window.
    pub size: u64,
    /// Interrupt line.
    pub irq: u32,
}

/// Builds the full command line from the user's part and the device list.
pub fn build_cmdline(user: &str, devices: &[MmioDeviceInfo]) -> Result<Cmdline, CmdlineError> {
    let user = user.trim();
    if user.chars().any(|c| !c.is_ascii() || c.is_ascii_control()) {
        return Err(CmdlineError::NotPrintable);
    }
    let joined = if user.is_empty() {
        BASE_CMDLINE.to_string()
    } else {
        format!("{BASE_CMDLINE} {user}")
    };
    let mut cmdline = Cmdline::try_from(&joined, CMDLINE_MAX_SIZE)?;
    for dev in devices {
        cmdline.add_virtio_mmio_device(dev.size, GuestAddress(dev.addr), dev.irq, None)?;
    }
    Ok(cmdline)
}

/// The command line as the guest will see it (without the NUL terminator).
pub fn cmdline_string(cmdline: &Cmdline) -> Result<String, CmdlineError> {
    let c = cmdline.as_cstring()?;
    Ok(c.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(i: u64) -> MmioDeviceInfo {
        MmioDeviceInfo {
            addr: 0xd000_0000 + i * 0x1000,
            size: 0x1000,
            irq: 5 + i as u32,
        }
    }

    #[test]
    fn base_matches_qemu_engine() {
        assert!(BASE_CMDLINE.contains("console=ttyS0"));
        assert!(BASE_CMDLINE.contains("reboot=t"));
    }

    #[test]
    fn base_only() {
        let c = build_cmdline("", &[]).unwrap();
        assert_eq!(cmdline_string(&c).unwrap(), BASE_CMDLINE);
    }

    #[test]
    fn user_args_and_devices_in_order() {
        let c = build_cmdline("  quiet milk.x=1 ", &[dev(0), dev(1)]).unwrap();
        assert_eq!(
            cmdline_string(&c).unwrap(),
            format!(
                "{BASE_CMDLINE} quiet milk.x=1 \
                 virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"
            )
        );
    }

    #[test]
    fn init_args_stay_last() {
        let c = build_cmdline("quiet -- --verbose", &[dev(0)]).unwrap();
        let s = cmdline_string(&c).unwrap();
        assert!(s.ends_with(" -- --verbose"), "{s}");
        assert!(
            s.contains("quiet virtio_mmio.device=4K@0xd0000000:5 --"),
            "{s}"
        );
    }

    #[test]
    fn quoted_values_survive() {
        let c = build_cmdline("milk.run=\"exit 7\"", &[dev(0)]).unwrap();
        let s = cmdline_string(&c).unwrap();
        assert!(
            s.contains(" milk.run=\"exit 7\" virtio_mmio.device="),
            "{s}"
        );
    }

    #[test]
    fn too_long_is_an_error() {
        let long = "a".repeat(CMDLINE_MAX_SIZE);
        assert!(build_cmdline(&long, &[]).is_err());
    }

    #[test]
    fn non_printable_is_an_error() {
        assert!(build_cmdline("foo\u{7}bar", &[]).is_err());
        assert!(build_cmdline("foo\nbar", &[]).is_err());
        assert!(build_cmdline("caf\u{e9}", &[]).is_err());
    }
}
