//! Runs milk-vmm invocations on real KVM: directly where the host's
//! `/dev/kvm` has VMX/SVM, inside the nested L1 everywhere else (this
//! machine: `/dev/kvm` is kvm_pvm, which cannot run a standard kernel).
//!
//! Steps are added with [`Runner::vmm_step`] (milk-vmm arguments, exactly
//! as a user types them) or [`Runner::step`] (any argument vector, e.g. a
//! `sh -c` script that runs milk-vmm and milkctl, both on `PATH`); file
//! paths for scripts come from [`Runner::file`]. [`Runner::run`] runs them
//! all in one go (one L1 boot) and returns each step's status and output.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use milk_harness::nested::{self, NestedLine, NestedOutcome, NestedSpec, StepResult};

use crate::image::Binaries;
use crate::job::Job;
use crate::Error;

/// Where the steps run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// On this host's `/dev/kvm` (VMX/SVM).
    Direct,
    /// Inside the L1 under QEMU TCG with emulated SVM.
    Nested,
}

/// True when this host's `/dev/kvm` is hardware KVM (kvm_intel/kvm_amd)
/// that can run a standard kernel.
pub fn host_has_standard_kvm() -> bool {
    let open = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let sys = Path::new("/sys/module");
    open && !sys.join("kvm_pvm").exists()
        && (sys.join("kvm_intel").exists() || sys.join("kvm_amd").exists())
}

/// The mode for this host.
pub fn mode_for_host() -> Mode {
    if host_has_standard_kvm() {
        Mode::Direct
    } else {
        Mode::Nested
    }
}

/// How to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Limit for the whole run (L1 boot and every step).
    pub timeout: Duration,
    /// L1 vCPUs and RAM (nested mode).
    pub l1_cpus: u32,
    /// L1 RAM in MiB.
    pub l1_memory_mib: u32,
    /// Directory for the L1 initramfs and console log (nested mode).
    pub work_dir: PathBuf,
}

impl RunOptions {
    /// 600 s, a 2-vCPU 2048 MiB L1, files in `work_dir`.
    pub fn new(work_dir: impl Into<PathBuf>) -> Self {
        RunOptions {
            timeout: Duration::from_secs(600),
            l1_cpus: 2,
            l1_memory_mib: 2048,
            work_dir: work_dir.into(),
        }
    }
}

/// A job and where it runs.
#[derive(Debug, Clone)]
pub struct Runner {
    /// Direct or nested.
    pub mode: Mode,
    /// milk-vmm (and milkctl).
    pub bins: Binaries,
    /// The steps so far (direct mode uses the same list with host paths).
    pub job: Job,
}

impl Runner {
    /// A runner for `bins` in `mode`.
    pub fn new(mode: Mode, bins: Binaries) -> Self {
        Runner {
            mode,
            bins,
            job: Job::new(),
        }
    }

    /// The path a step uses for the host file `p`.
    pub fn file(&mut self, p: &Path) -> String {
        match self.mode {
            Mode::Direct => p.display().to_string(),
            Mode::Nested => self.job.add_file(p),
        }
    }

    /// Adds `milk-vmm ARGS`; returns the step id.
    pub fn vmm_step(&mut self, args: &[String]) -> Result<usize, Error> {
        match self.mode {
            Mode::Direct => {
                let mut argv = vec!["milk-vmm".to_string()];
                argv.extend(args.iter().cloned());
                Ok(self.job.add_step(argv))
            }
            Mode::Nested => self.job.add_vmm_step(args),
        }
    }

    /// Adds a step running `argv` (milk-vmm and milkctl are on `PATH`).
    pub fn step(&mut self, argv: &[&str]) -> usize {
        self.job
            .add_step(argv.iter().map(|s| s.to_string()).collect())
    }

    /// Runs every step; `on_line` sees each line as it arrives.
    pub fn run(
        &self,
        opts: &RunOptions,
        on_line: &mut dyn FnMut(NestedLine),
    ) -> Result<NestedOutcome, Error> {
        match self.mode {
            Mode::Nested => {
                let kernel = crate::kernel::ensure_kernel()?;
                std::fs::create_dir_all(&opts.work_dir)
                    .map_err(|e| Error::io(&opts.work_dir, e))?;
                let initrd = opts.work_dir.join("l1-initramfs.cpio");
                let sha = crate::image::write(&self.bins, &self.job, &initrd)?;
                log::info!(
                    "L1: kernel {} ({}), initramfs {} (sha256 {})",
                    kernel.version,
                    kernel.bzimage.display(),
                    initrd.display(),
                    &sha[..16]
                );
                let mut spec = NestedSpec::new(&kernel.bzimage, &initrd);
                spec.cpus = opts.l1_cpus;
                spec.memory_mib = opts.l1_memory_mib;
                spec.timeout = opts.timeout;
                spec.console_log = Some(opts.work_dir.join("l1-console.log"));
                Ok(nested::run_nested(&spec, on_line)?)
            }
            Mode::Direct => self.run_direct(opts, on_line),
        }
    }

    fn run_direct(
        &self,
        opts: &RunOptions,
        on_line: &mut dyn FnMut(NestedLine),
    ) -> Result<NestedOutcome, Error> {
        let start = Instant::now();
        let deadline = start + opts.timeout;
        let bin_dir = self
            .bins
            .milk_vmm
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let path = format!(
            "{}:{}",
            bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut out = NestedOutcome::default();
        for (i, argv) in self.job.steps.iter().enumerate() {
            let id = i + 1;
            let mut s = StepResult {
                id,
                started: start.elapsed(),
                ..Default::default()
            };
            let child = Command::new(&argv[0])
                .args(&argv[1..])
                .env("PATH", &path)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| Error::Job(format!("{}: {e}", argv[0])))?;
            let mut child = Killed(child);
            let (tx, rx) = mpsc::channel::<(bool, String)>();
            let readers: Vec<_> = [
                (
                    Box::new(child.0.stdout.take().expect("piped"))
                        as Box<dyn std::io::Read + Send>,
                    true,
                ),
                (Box::new(child.0.stderr.take().expect("piped")), false),
            ]
            .into_iter()
            .map(|(r, is_out)| {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    for line in BufReader::new(r).lines().map_while(Result::ok) {
                        if tx.send((is_out, line)).is_err() {
                            break;
                        }
                    }
                })
            })
            .collect();
            drop(tx);
            loop {
                let now = Instant::now();
                if now >= deadline {
                    return Err(Error::Nested(nested::NestedError::Timeout {
                        secs: opts.timeout.as_secs(),
                        tail: s
                            .stdout
                            .iter()
                            .rev()
                            .take(20)
                            .rev()
                            .cloned()
                            .collect::<Vec<_>>()
                            .join("\n"),
                    }));
                }
                match rx.recv_timeout(deadline - now) {
                    Ok((true, l)) => {
                        if s.to_guest_init.is_none() && l.contains("MILK-BOOT ") {
                            s.to_guest_init = Some(start.elapsed().saturating_sub(s.started));
                        }
                        on_line(NestedLine::Stdout(id, &l));
                        s.stdout.push(l);
                    }
                    Ok((false, l)) => {
                        on_line(NestedLine::Stderr(id, &l));
                        s.stderr.push(l);
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => continue,
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
            for r in readers {
                let _ = r.join();
            }
            let st = child
                .0
                .wait()
                .map_err(|e| Error::Job(format!("{}: {e}", argv[0])))?;
            s.status = st.code();
            s.elapsed = start.elapsed().saturating_sub(s.started);
            out.steps.push(s);
        }
        out.done = true;
        out.elapsed = start.elapsed();
        Ok(out)
    }
}

/// Kills a direct step left running on an early return.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_mode_runs_each_step_and_reports_status_and_streams() {
        let d = tempfile::tempdir().unwrap();
        let mut r = Runner::new(Mode::Direct, Binaries::beside(d.path().join("milk-vmm")));
        r.step(&["sh", "-c", "echo out1; echo err1 >&2; exit 3"]);
        r.step(&["sh", "-c", "echo MILK-BOOT x; exit 0"]);
        let mut seen = Vec::new();
        let out = r
            .run(&RunOptions::new(d.path()), &mut |l| {
                seen.push(format!("{l:?}"))
            })
            .unwrap();
        assert_eq!(out.steps.len(), 2);
        assert_eq!(out.steps[0].status, Some(3));
        assert_eq!(out.steps[0].stdout, ["out1"]);
        assert_eq!(out.steps[0].stderr, ["err1"]);
        assert_eq!(out.steps[1].status, Some(0));
        assert!(out.steps[1].to_guest_init.is_some());
        assert!(
            seen.iter().any(|l| l.contains("Stderr(1, \"err1\")")),
            "{seen:?}"
        );
    }

    #[test]
    fn direct_mode_kills_a_step_at_the_timeout() {
        let d = tempfile::tempdir().unwrap();
        let mut r = Runner::new(Mode::Direct, Binaries::beside(d.path().join("milk-vmm")));
        r.step(&["sleep", "30"]);
        let mut o = RunOptions::new(d.path());
        o.timeout = Duration::from_millis(300);
        let t = Instant::now();
        let e = r.run(&o, &mut |_| {}).unwrap_err();
        assert!(e.to_string().contains("timed out"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn file_paths_depend_on_the_mode() {
        let p = Path::new("/k/bzImage");
        let mut direct = Runner::new(Mode::Direct, Binaries::beside("/b/milk-vmm"));
        assert_eq!(direct.file(p), "/k/bzImage");
        let mut nested = Runner::new(Mode::Nested, Binaries::beside("/b/milk-vmm"));
        assert_eq!(nested.file(p), "/job/files/0-bzImage");
    }
}
