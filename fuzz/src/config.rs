//! `config`: the configuration a user (or a test script) hands the host: milk-vmm's kernel
//! command-line building (`cmdline::build_cmdline`, with virtio-mmio device entries) and the
//! policy spec parser (`milk_policies::by_name`, `NAME[:key=value,...]`, what `--policy` and
//! `milkctl swap` take).
//!
//! Properties: no panic; errors are one line; an accepted command line is printable ASCII,
//! starts with the base arguments and names every device; an accepted spec yields a policy
//! whose name is the spec's name.

use milk_vmm::cmdline::{build_cmdline, cmdline_string, MmioDeviceInfo, BASE_CMDLINE};

use crate::input::Input;

/// One input: a selector byte, then the string (lossily UTF-8).
pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let sel = inp.u8();
    let ndev = usize::from(sel >> 5);
    let devices: Vec<MmioDeviceInfo> = (0..ndev)
        .map(|_| MmioDeviceInfo {
            addr: inp.u64(),
            size: u64::from(inp.u32()),
            irq: inp.u32() % 64,
        })
        .collect();
    let text = String::from_utf8_lossy(inp.rest());
    if sel & 1 == 0 {
        match build_cmdline(&text, &devices) {
            Ok(c) => {
                let s = cmdline_string(&c).expect("built command line converts");
                assert!(s.starts_with(BASE_CMDLINE), "{s:?}");
                assert!(s.chars().all(|c| c.is_ascii() && !c.is_ascii_control()));
                assert!(s.matches("virtio_mmio.device=").count() >= ndev);
            }
            Err(e) => assert!(!e.to_string().contains('\n'), "multi-line error: {e}"),
        }
    } else {
        match milk_policies::by_name(&text) {
            Ok(p) => {
                let name = text.trim().split(':').next().unwrap_or("").trim();
                assert!(
                    p.name() == name || p.name().starts_with(name),
                    "spec {text:?} made policy {}",
                    p.name()
                );
            }
            Err(e) => assert!(!e.to_string().contains('\n'), "multi-line error: {e}"),
        }
    }
}
