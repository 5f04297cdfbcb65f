//! The schedulers compared and the engines that boot the guest under them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use milk_harness::GuestSpec;
use milk_ivshmem::session::{run_milk_guest, MilkGuestConfig};
use milk_l1_host::image::Binaries;
use milk_l1_host::runner::{mode_for_host, Mode, RunOptions, Runner};

use super::stats::HostCounts;
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

/// The guest the engines boot.
#[derive(Debug, Clone)]
pub struct Guest {
    /// The PVH vmlinux (QEMU).
    pub vmlinux: PathBuf,
    /// The bzImage (milk-vmm on KVM).
    pub bzimage: PathBuf,
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
    /// The host runtime's counters (milk runs, when the engine has them).
    pub host: Option<HostCounts>,
    /// Wall time of the boot.
    pub wall: Duration,
}

/// One boot to make.
#[derive(Debug, Clone)]
pub struct BootRequest {
    /// The scheduler.
    pub sched: Scheduler,
    /// The kernel command line (carries `milk.run=`).
    pub cmdline: String,
    /// Where the console goes.
    pub log: PathBuf,
}

/// One way to boot the guest.
pub trait Engine {
    /// Name in tables and `--engines`.
    fn name(&self) -> &'static str;
    /// Why this engine cannot run here (None: it can).
    fn unavailable(&self) -> Option<String>;
    /// Boots `guest` as `req` says.
    fn boot(&self, guest: &Guest, req: &BootRequest, timeout: Duration) -> Result<Boot, String>;
    /// Boots every request in order, calling `done` with each result as it
    /// is known. An engine with a per-batch cost (the nested L1) overrides
    /// this to pay it once.
    fn boot_all(
        &self,
        guest: &Guest,
        reqs: &[BootRequest],
        timeout: Duration,
        done: &mut dyn FnMut(usize, Result<Boot, String>),
    ) {
        for (i, r) in reqs.iter().enumerate() {
            done(i, self.boot(guest, r, timeout));
        }
    }
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

    fn boot(&self, guest: &Guest, req: &BootRequest, timeout: Duration) -> Result<Boot, String> {
        let (sched, cmdline) = (&req.sched, req.cmdline.as_str());
        let mut spec = GuestSpec::new(&guest.vmlinux);
        spec.initrd = Some(guest.initrd.clone());
        spec.cpus = 2;
        spec.memory_mib = 256;
        spec.timeout = timeout;
        spec.serial_log = Some(req.log.clone());
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
                    host: None,
                    wall: start.elapsed(),
                })
            }
            Scheduler::Milk(policy) => {
                let run = run_milk_guest(&MilkGuestConfig::new(spec, policy), &mut |_, _| {})
                    .map_err(|e| e.to_string())?;
                Ok(Boot {
                    status: run.status(),
                    console: run.outcome.console,
                    host: HostCounts::from_summaries(&run.summaries),
                    wall: start.elapsed(),
                })
            }
        }
    }
}

/// milk-vmm's KVM engine on real KVM: inside the nested L1 host (QEMU TCG
/// with emulated AMD SVM) here, directly where `/dev/kvm` has VMX/SVM
/// (`milk_l1_host::runner`). milk runs use virtio-milk over virtio-mmio
/// with `--policy`; one L1 boot serves a whole batch of guest boots.
pub struct NestedEngine {
    /// The workspace (to build milk-vmm).
    pub root: PathBuf,
}

impl NestedEngine {
    fn args(
        guest: &Guest,
        runner: &mut Runner,
        req: &BootRequest,
        timeout: Duration,
    ) -> Vec<String> {
        let mut a = vec![
            "--kernel".to_string(),
            runner.file(&guest.bzimage),
            "--initrd".into(),
            runner.file(&guest.initrd),
            "--engine".into(),
            "kvm".into(),
            "--cpus".into(),
            "2".into(),
            "--memory".into(),
            "256".into(),
            "--timeout".into(),
            timeout.as_secs().to_string(),
        ];
        let cmdline = match &req.sched {
            Scheduler::TestFifo => format!("scx_test_fifo {}", req.cmdline),
            _ => req.cmdline.clone(),
        };
        a.extend(["--cmdline".into(), cmdline]);
        if let Scheduler::Milk(p) = &req.sched {
            a.extend(["--policy".into(), p.clone()]);
        }
        a
    }
}

impl Engine for NestedEngine {
    fn name(&self) -> &'static str {
        "nested-kvm"
    }

    fn unavailable(&self) -> Option<String> {
        match mode_for_host() {
            Mode::Direct => None,
            Mode::Nested => (!milk_harness::qemu_available()).then(|| {
                format!(
                    "{} not found (the L1 host runs under it)",
                    milk_harness::QEMU
                )
            }),
        }
    }

    fn boot(&self, guest: &Guest, req: &BootRequest, timeout: Duration) -> Result<Boot, String> {
        let mut out = Err("no result".to_string());
        self.boot_all(guest, std::slice::from_ref(req), timeout, &mut |_, r| {
            out = r
        });
        out
    }

    fn boot_all(
        &self,
        guest: &Guest,
        reqs: &[BootRequest],
        timeout: Duration,
        done: &mut dyn FnMut(usize, Result<Boot, String>),
    ) {
        let fail_all = |done: &mut dyn FnMut(usize, Result<Boot, String>), why: String| {
            for i in 0..reqs.len() {
                done(i, Err(why.clone()));
            }
        };
        let vmm = match crate::nested::build_vmm(&self.root, false) {
            Ok(v) => v,
            Err(e) => return fail_all(done, e),
        };
        let mut runner = Runner::new(mode_for_host(), Binaries::beside(&vmm));
        for r in reqs {
            let args = Self::args(guest, &mut runner, r, timeout);
            if let Err(e) = runner.vmm_step(&args) {
                return fail_all(done, e.to_string());
            }
        }
        let work = milk_guest_kernel::cache_dir()
            .join("nested")
            .join(format!("compare-{}", std::process::id()));
        let mut opts = RunOptions::new(&work);
        // The L1's own boot plus every guest's limit.
        opts.timeout = Duration::from_secs(120) + timeout * reqs.len() as u32;
        let started = Instant::now();
        let result = runner.run(&opts, &mut |_| {});
        let _ = std::fs::remove_file(work.join("l1-initramfs.cpio"));
        let out = match result {
            Ok(o) => o,
            Err(e) => {
                let why = e.to_string();
                return fail_all(done, why.lines().next().unwrap_or("L1 failed").to_string());
            }
        };
        log::info!(
            "nested batch of {} in {:.0} s",
            reqs.len(),
            started.elapsed().as_secs_f64()
        );
        for (i, r) in reqs.iter().enumerate() {
            let res = match out.step(i + 1) {
                None => Err("the L1 host ended before this guest ran".to_string()),
                Some(s) => {
                    let mut text = s.stdout.join("\n");
                    text.push('\n');
                    if let Err(e) = std::fs::write(&r.log, &text) {
                        log::warn!("{}: {e}", r.log.display());
                    }
                    match s.status {
                        None => Err("the L1 host ended before milk-vmm did".to_string()),
                        Some(_) => Ok(Boot {
                            // The guest's own result line, as for QEMU
                            // (milk-vmm's exit status mirrors it).
                            status: s
                                .stdout
                                .iter()
                                .find_map(|l| milk_harness::parse_result_line(l))
                                .map(|g| g.status),
                            host: HostCounts::parse(&s.stdout),
                            console: s.stdout.clone(),
                            wall: s.elapsed,
                        }),
                    }
                }
            };
            done(i, res);
        }
    }
}

/// Every engine, in table order.
pub fn engines(root: &Path) -> Vec<Box<dyn Engine>> {
    vec![
        Box::new(QemuEngine),
        Box::new(NestedEngine {
            root: root.to_path_buf(),
        }),
    ]
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
