//! The schedulers compared and the engines that boot the guest under them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use milk_harness::GuestSpec;
use milk_ivshmem::session::{run_milk_guest, MilkGuestConfig};
use virtio_milk::metrics::Summary;

use super::workload::{fields, last_line};

/// A guest scheduler configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scheduler {
    /// No sched_ext scheduler: the kernel's fair class.
    Cfs,
    /// The built-in global FIFO sched_ext scheduler (`scx_test_fifo` on the command line).
    TestFifo,
    /// The milk bridge with a host policy of `milk-policies`, by name.
    Milk(String),
}

impl Scheduler {
    /// Every scheduler: CFS, scx_test_fifo, then milk with each host policy.
    pub fn all() -> Vec<Scheduler> {
        let mut v = vec![Scheduler::Cfs, Scheduler::TestFifo];
        v.extend(
            milk_policies::names()
                .iter()
                .map(|p| Scheduler::Milk((*p).to_string())),
        );
        v
    }

    /// The name used in tables, JSON and `--schedulers`.
    pub fn name(&self) -> String {
        match self {
            Scheduler::Cfs => "cfs".into(),
            Scheduler::TestFifo => "scx_test_fifo".into(),
            Scheduler::Milk(p) => format!("milk:{p}"),
        }
    }

    /// The sched_ext ops that must be enabled while the workload runs (None: none).
    pub fn expected_ops(&self) -> Option<&'static str> {
        match self {
            Scheduler::Cfs => None,
            Scheduler::TestFifo => Some("milk_test_fifo"),
            Scheduler::Milk(_) => Some("milk"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Guest {
    /// The PVH vmlinux.
    pub vmlinux: PathBuf,
    /// The test initramfs (rt-tests included).
    pub initrd: PathBuf,
}

/// What one boot produced.
#[derive(Debug)]
pub struct Boot {
    /// Every console line.
    pub console: Vec<String>,
    /// The guest command's exit status (`MILK-RESULT`).
    pub status: Option<i32>,
    /// Host runtime summaries (milk runs).
    pub summaries: Vec<Summary>,
    /// Wall time of the boot.
    pub wall: Duration,
}

/// One way to boot the guest.
pub trait Engine {
    /// Name in tables and `--engines`.
    fn name(&self) -> &'static str;
    /// Why this engine cannot run here (None: it can).
    fn unavailable(&self) -> Option<String>;
    /// Boots `guest` under `sched` with `cmdline` (which carries `milk.run=`),
    /// writing the console to `log`.
    fn boot(
        &self,
        guest: &Guest,
        sched: &Scheduler,
        cmdline: &str,
        timeout: Duration,
        log: &Path,
    ) -> Result<Boot, String>;
}

/// QEMU TCG; milk runs get virtio-milk over ivshmem with the host policy in
/// this process (`milk_ivshmem::session`).
pub struct QemuEngine;

impl Engine for QemuEngine {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn unavailable(&self) -> Option<String> {
        (!milk_harness::qemu_available()).then(|| format!("{} not found", milk_harness::QEMU))
    }

    fn boot(
        &self,
        guest: &Guest,
        sched: &Scheduler,
        cmdline: &str,
        timeout: Duration,
        log: &Path,
    ) -> Result<Boot, String> {
        let mut spec = GuestSpec::new(&guest.vmlinux);
        spec.initrd = Some(guest.initrd.clone());
        spec.cpus = 2;
        spec.memory_mib = 256;
        spec.timeout = timeout;
        spec.serial_log = Some(log.to_path_buf());
        spec.cmdline = match sched {
            Scheduler::TestFifo => format!("scx_test_fifo {cmdline}"),
            _ => cmdline.to_string(),
        };
        let start = Instant::now();
        match sched {
            Scheduler::Cfs | Scheduler::TestFifo => {
                let out = milk_harness::run_qemu(&spec, &mut |_| {}).map_err(|e| e.to_string())?;
                Ok(Boot {
                    status: out.result.map(|r| r.status),
                    console: out.console,
                    summaries: Vec::new(),
                    wall: start.elapsed(),
                })
            }
            Scheduler::Milk(policy) => {
                let run = run_milk_guest(&MilkGuestConfig::new(spec, policy), &mut |_, _| {})
                    .map_err(|e| e.to_string())?;
                Ok(Boot {
                    status: run.status(),
                    console: run.outcome.console,
                    summaries: run.summaries,
                    wall: start.elapsed(),
                })
            }
        }
    }
}

/// Every engine, in table order. A new engine (nested KVM) is added here.
pub fn engines() -> Vec<Box<dyn Engine>> {
    vec![Box::new(QemuEngine)]
}

/// The guest script around a workload command: wait for the bridge (milk),
/// report the sched_ext state before and after, print the bridge counters.
pub fn guest_script(sched: &Scheduler, command: &str) -> String {
    let wait = match sched {
        Scheduler::Milk(_) => {
            "i=0;while [ $(cat /sys/kernel/milk/state) != enabled ]&&[ $i -lt 200 ];\
             do usleep 50000;i=$((i+1));done;"
        }
        _ => "",
    };
    let state = "scx=$(cat /sys/kernel/sched_ext/state) ops=$(cat /sys/kernel/sched_ext/root/ops 2>/dev/null)";
    format!(
        "{wait}echo CMP-BEGIN {state};{command};r=$?;echo CMP-END {state};\
         [ -d /sys/kernel/milk ]&&for f in /sys/kernel/milk/*;do echo MILKC ${{f##*/}}=$(cat $f);done;\
         exit $r"
    )
}

/// The guest's bridge counters (`MILKC name=value` lines).
pub fn bridge_counters(console: &[String]) -> BTreeMap<String, String> {
    console
        .iter()
        .filter_map(|l| l.find("MILKC ").map(|at| &l[at + 6..]))
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

/// Checks the scheduler was the one asked for, at the start and at the end.
pub fn check_scheduler(sched: &Scheduler, console: &[String]) -> Result<(), String> {
    for mark in ["CMP-BEGIN ", "CMP-END "] {
        let line = last_line(console, mark)?;
        let f = fields(line);
        let scx = f.get("scx").copied().unwrap_or("");
        let ops = f.get("ops").copied().unwrap_or("");
        let ok = match sched.expected_ops() {
            None => scx != "enabled",
            Some(want) => scx == "enabled" && ops == want,
        };
        if !ok {
            return Err(format!(
                "{} ran under scx={scx:?} ops={ops:?}, not {}",
                mark.trim().to_lowercase(),
                sched.name()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::workload::workloads;

    fn lines(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_scheduler_must_be_the_one_asked_for_at_both_ends() {
        let c = |b: &str, e: &str| lines(&[&format!("CMP-BEGIN {b}"), &format!("CMP-END {e}")]);
        let milk = Scheduler::Milk("fifo".into());
        assert!(check_scheduler(&milk, &c("scx=enabled ops=milk", "scx=enabled ops=milk")).is_ok());
        // Fell back to CFS during the workload.
        assert!(check_scheduler(&milk, &c("scx=enabled ops=milk", "scx=disabled ops=")).is_err());
        assert!(check_scheduler(
            &Scheduler::Cfs,
            &c("scx=disabled ops=", "scx=disabled ops=")
        )
        .is_ok());
        assert!(check_scheduler(
            &Scheduler::Cfs,
            &c("scx=enabled ops=milk", "scx=enabled ops=milk")
        )
        .is_err());
        assert!(check_scheduler(
            &Scheduler::TestFifo,
            &c(
                "scx=enabled ops=milk_test_fifo",
                "scx=enabled ops=milk_test_fifo"
            )
        )
        .is_ok());
        assert!(check_scheduler(&Scheduler::TestFifo, &[]).is_err());
    }

    #[test]
    fn every_host_policy_is_a_scheduler() {
        let all: Vec<String> = Scheduler::all().iter().map(Scheduler::name).collect();
        assert_eq!(&all[..2], ["cfs", "scx_test_fifo"]);
        for p in milk_policies::names() {
            assert!(all.contains(&format!("milk:{p}")), "{all:?}");
        }
    }

    #[test]
    fn guest_scripts_fit_the_kernel_command_line() {
        for quick in [false, true] {
            for w in workloads(quick) {
                for s in Scheduler::all() {
                    let script = guest_script(&s, &w.command);
                    // /init ends milk.run="..." at the first double quote.
                    assert!(!script.contains('"'), "{script}");
                    // x86 COMMAND_LINE_SIZE is 2048, with the harness's options in front.
                    assert!(
                        script.len() < 1500,
                        "{} {}: {}",
                        w.name,
                        s.name(),
                        script.len()
                    );
                }
            }
        }
    }
}
