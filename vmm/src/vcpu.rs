//! vCPU threads: one per vCPU, each running `KVM_RUN` and dispatching exits to
//! the buses. A thread stops when the VM's stop flag is set; the main thread
//! kicks it out of `KVM_RUN` with a signal whose handler sets the vCPU's
//! `immediate_exit`, so no race between the flag check and the ioctl loses it.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};
use std::time::Instant;

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::devices::Bus;
use crate::exit::{ExitHandle, ExitReason};

thread_local! {
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// Signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only touches this thread's own kvm_run mapping, which is async-signal safe.
    let _ = KVM_RUN_PTR.try_with(|p| {
        let run = p.get();
        if !run.is_null() {
            // SAFETY: the pointer was set by this thread to its VcpuFd's mmap'ed
            // kvm_run, which stays mapped while the thread runs its loop (it is
            // cleared before the VcpuFd is dropped).
            unsafe { std::ptr::write_volatile(&mut (*run).immediate_exit, 1) };
        }
    });
    std::sync::atomic::fence(Ordering::Release);
}

/// Installs the kick signal handler (idempotent).
pub fn register_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    static ONCE: Once = Once::new();
    let mut res = Ok(());
    ONCE.call_once(|| {
        res = vmm_sys_util::signal::register_signal_handler(kick_signal(), handle_kick);
    });
    res
}

/// Timing facts a vCPU thread reports.
#[derive(Clone, Debug, Default)]
pub struct VcpuTiming {
    /// When the boot vCPU first entered the guest (`KVM_RUN`).
    pub first_entry: Option<Instant>,
    /// When the boot vCPU got its first exit caused by the guest (I/O or MMIO).
    pub first_io_exit: Option<Instant>,
}

/// What a vCPU thread needs.
pub struct Vcpu {
    /// vCPU index (= APIC ID).
    pub id: u32,
    /// KVM vCPU.
    pub fd: VcpuFd,
    /// Port-I/O bus.
    pub pio: Bus,
    /// MMIO bus.
    pub mmio: Bus,
    /// Where to report the end of the VM.
    pub exit: ExitHandle,
    /// Set by the main thread to stop all vCPUs.
    pub stop: Arc<AtomicBool>,
    /// Timing record (boot vCPU only).
    pub timing: Option<Arc<std::sync::Mutex<VcpuTiming>>>,
}

impl Vcpu {
    /// Runs until the VM stops; every ending is reported through `exit`.
    pub fn run(mut self) {
        let run_ptr: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN_PTR.with(|p| p.set(run_ptr));
        let mut logged_hlt = false;
        let mut first = true;
        loop {
            if self.stop.load(Ordering::Acquire) {
                break;
            }
            if first {
                first = false;
                if let Some(t) = &self.timing {
                    t.lock().unwrap_or_else(|e| e.into_inner()).first_entry = Some(Instant::now());
                }
            }
            let io = VcpuIo {
                id: self.id,
                pio: &self.pio,
                mmio: &self.mmio,
                timing: self.timing.as_deref(),
            };
            match self.fd.run() {
                Ok(exit) => match io.handle_exit(exit, &mut logged_hlt) {
                    Action::Continue => {}
                    Action::Stop(reason) => {
                        self.exit.request(reason);
                        break;
                    }
                    Action::Fault(what) => {
                        let detail = self.fault_detail(&what);
                        self.exit.request(ExitReason::GuestFault(detail));
                        break;
                    }
                },
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                }
                Err(e) => {
                    self.exit.request(ExitReason::VmmError(format!(
                        "vCPU {}: KVM_RUN failed: {e}",
                        self.id
                    )));
                    break;
                }
            }
        }
        KVM_RUN_PTR.with(|p| p.set(std::ptr::null_mut()));
        log::debug!("vCPU {} stopped", self.id);
    }

    fn fault_detail(&mut self, what: &str) -> String {
        let mut detail = format!("{what} on vCPU {}", self.id);
        if what == INTERNAL_ERROR {
            let run = self.fd.get_kvm_run();
            // SAFETY: KVM filled the `internal` member of the union for
            // KVM_EXIT_INTERNAL_ERROR, which is the exit being reported.
            let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
            detail = format!("{what} (suberror {suberror}) on vCPU {}", self.id);
        }
        if let Ok(r) = self.fd.get_regs() {
            detail.push_str(&format!(" at rip {:#x}", r.rip));
        }
        detail
    }
}

const INTERNAL_ERROR: &str = "KVM internal error";

enum Action {
    Continue,
    Stop(ExitReason),
    Fault(String),
}

struct VcpuIo<'a> {
    id: u32,
    pio: &'a Bus,
    mmio: &'a Bus,
    timing: Option<&'a std::sync::Mutex<VcpuTiming>>,
}

impl VcpuIo<'_> {
    fn note_io(&self) {
        if let Some(t) = self.timing {
            let mut t = t.lock().unwrap_or_else(|e| e.into_inner());
            if t.first_io_exit.is_none() {
                t.first_io_exit = Some(Instant::now());
            }
        }
    }

    fn handle_exit(&self, exit: VcpuExit<'_>, logged_hlt: &mut bool) -> Action {
        match exit {
            VcpuExit::IoIn(port, data) => {
                if !self.pio.read(u64::from(port), data) {
                    // Nothing there: floating bus.
                    data.fill(0xff);
                }
                Action::Continue
            }
            VcpuExit::IoOut(port, data) => {
                if self.timing.is_some() {
                    self.note_io();
                }
                if !self.pio.write(u64::from(port), data) && port != 0x80 {
                    log::trace!("unhandled port write {port:#x} {data:?}");
                }
                Action::Continue
            }
            VcpuExit::MmioRead(addr, data) => {
                if !self.mmio.read(addr, data) {
                    log::debug!("unhandled MMIO read at {addr:#x}");
                    data.fill(0);
                }
                Action::Continue
            }
            VcpuExit::MmioWrite(addr, data) => {
                if self.timing.is_some() {
                    self.note_io();
                }
                if !self.mmio.write(addr, data) {
                    log::debug!("unhandled MMIO write at {addr:#x}");
                }
                Action::Continue
            }
            VcpuExit::Hlt => {
                // With the in-kernel LAPIC KVM handles HLT itself; an exit here
                // means the CPU halted for good.
                if !*logged_hlt {
                    *logged_hlt = true;
                    log::info!("vCPU {} halted", self.id);
                }
                Action::Stop(ExitReason::Shutdown)
            }
            VcpuExit::Shutdown => {
                log::info!("vCPU {}: guest shut down (triple fault / reboot)", self.id);
                Action::Stop(ExitReason::Shutdown)
            }
            VcpuExit::SystemEvent(kind, _) => {
                log::info!("vCPU {}: system event {kind}", self.id);
                Action::Stop(ExitReason::SystemEvent(kind))
            }
            VcpuExit::InternalError => Action::Fault(INTERNAL_ERROR.to_string()),
            VcpuExit::FailEntry(reason, cpu) => Action::Fault(format!(
                "VM entry failed (hardware reason {reason:#x}, host cpu {cpu})"
            )),
            VcpuExit::Intr => Action::Continue,
            other => Action::Fault(format!("unexpected exit {other:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::i8042::I8042;
    use std::sync::Mutex;

    fn io<'a>(pio: &'a Bus, mmio: &'a Bus, timing: &'a Mutex<VcpuTiming>) -> VcpuIo<'a> {
        VcpuIo {
            id: 0,
            pio,
            mmio,
            timing: Some(timing),
        }
    }

    #[test]
    fn exits_are_dispatched() {
        let exit = ExitHandle::new().unwrap();
        let mut pio = Bus::new();
        pio.insert(Arc::new(Mutex::new(I8042::new(exit.clone()))), 0x60, 5)
            .unwrap();
        let mmio = Bus::new();
        let timing = Mutex::new(VcpuTiming::default());
        let v = io(&pio, &mmio, &timing);
        let mut hlt = false;

        // Unmapped port reads float high, unmapped MMIO reads are zero.
        let mut d = [0u8; 2];
        assert!(matches!(
            v.handle_exit(VcpuExit::IoIn(0x2f8, &mut d), &mut hlt),
            Action::Continue
        ));
        assert_eq!(d, [0xff, 0xff]);
        let mut m = [0xaau8; 4];
        assert!(matches!(
            v.handle_exit(VcpuExit::MmioRead(0xd000_0000, &mut m), &mut hlt),
            Action::Continue
        ));
        assert_eq!(m, [0; 4]);
        assert!(
            timing.lock().unwrap().first_io_exit.is_none(),
            "reads do not count"
        );

        // A write reaches the device; the first one is timed.
        assert!(matches!(
            v.handle_exit(VcpuExit::IoOut(0x64, &[0xfe]), &mut hlt),
            Action::Continue
        ));
        assert_eq!(exit.reason(), Some(ExitReason::Reset));
        assert!(timing.lock().unwrap().first_io_exit.is_some());

        assert!(matches!(
            v.handle_exit(VcpuExit::Shutdown, &mut hlt),
            Action::Stop(ExitReason::Shutdown)
        ));
        assert!(matches!(
            v.handle_exit(VcpuExit::SystemEvent(1, &[]), &mut hlt),
            Action::Stop(ExitReason::SystemEvent(1))
        ));
        assert!(matches!(
            v.handle_exit(VcpuExit::InternalError, &mut hlt),
            Action::Fault(_)
        ));
        assert!(matches!(
            v.handle_exit(VcpuExit::Intr, &mut hlt),
            Action::Continue
        ));
        assert!(matches!(
            v.handle_exit(VcpuExit::Hlt, &mut hlt),
            Action::Stop(_)
        ));
        assert!(hlt);
    }
}
