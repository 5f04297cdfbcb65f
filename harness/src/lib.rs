//! Boots a MiLK guest under QEMU (TCG), streams its serial console to a log
//! file and to the caller, enforces a timeout and returns the guest's result.
//!
//! The guest's `/init` (see `images/init`) prints `MILK-RESULT status=<n>`
//! when the command it ran finishes, then reboots; the kernel is booted with
//! `reboot=t` and QEMU with `-no-reboot`, so a reboot ends QEMU.

pub mod nested;
pub mod result_line;

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub use result_line::{parse_result_line, GuestResult, RESULT_PREFIX};

/// The QEMU binary the engine runs.
pub const QEMU: &str = "qemu-system-x86_64";

/// Kernel command-line options every MiLK guest gets, before the caller's:
/// serial console, reboot by triple fault (ends the VM), no reboot loop on
/// panic, and quiet enough to boot fast while keeping the banner and the
/// e820 map.
pub const BASE_CMDLINE: &str = "console=ttyS0 earlyprintk=ttyS0 reboot=t panic=-1 loglevel=7";

/// How many console lines an outcome or error keeps.
pub const TAIL_LINES: usize = 40;

/// Errors from running a guest.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// QEMU is not installed.
    #[error("{QEMU} not found; install it with: apt-get install -y qemu-system-x86")]
    QemuMissing,
    /// A path given in the spec is missing or unreadable.
    #[error("{0}: {1}")]
    BadInput(PathBuf, String),
    /// The spec itself is invalid.
    #[error("invalid guest spec: {0}")]
    BadSpec(String),
    /// Starting or talking to QEMU failed.
    #[error("qemu: {0}")]
    Qemu(String),
    /// The guest did not finish in time; it was killed.
    #[error("guest timed out after {secs} s; last console lines:\n{tail}")]
    Timeout {
        /// The timeout.
        secs: u64,
        /// The last console lines, newline separated.
        tail: String,
    },
    /// Writing the serial log failed.
    #[error("serial log {0}: {1}")]
    SerialLog(PathBuf, std::io::Error),
}

/// What to boot and how.
#[derive(Debug, Clone)]
pub struct GuestSpec {
    /// `vmlinux` (ELF with a PVH note; fastest) or `bzImage`.
    pub kernel: PathBuf,
    /// Initramfs.
    pub initrd: Option<PathBuf>,
    /// Extra kernel command line, appended to [`BASE_CMDLINE`].
    pub cmdline: String,
    /// vCPUs.
    pub cpus: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// Wall-clock limit for the whole run.
    pub timeout: Duration,
    /// Copy of the serial console.
    pub serial_log: Option<PathBuf>,
    /// QEMU machine type and options.
    pub machine: String,
    /// Extra QEMU arguments (devices, memory backends, ...).
    pub extra_args: Vec<String>,
}

impl GuestSpec {
    /// A spec with defaults: 2 vCPUs, 256 MiB, 60 s, the `pc` machine.
    ///
    /// `pc` rather than `microvm`: with the guest's ACPI (needed for SMP on
    /// `pc`, where SeaBIOS's MP table lists one CPU), `microvm` under TCG
    /// hung in about one boot in three after failing to calibrate the TSC
    /// (no PIT reference), while `pc` booted every time in about 3 s.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        GuestSpec {
            kernel: kernel.into(),
            initrd: None,
            cmdline: String::new(),
            cpus: 2,
            memory_mib: 256,
            timeout: Duration::from_secs(60),
            serial_log: None,
            machine: "pc".into(),
            extra_args: Vec::new(),
        }
    }

    /// The full kernel command line.
    pub fn full_cmdline(&self) -> String {
        if self.cmdline.trim().is_empty() {
            BASE_CMDLINE.to_string()
        } else {
            format!("{BASE_CMDLINE} {}", self.cmdline.trim())
        }
    }

    /// Checks the spec before anything is started.
    pub fn validate(&self) -> Result<(), HarnessError> {
        check_readable(&self.kernel)?;
        if let Some(i) = &self.initrd {
            check_readable(i)?;
        }
        if self.cpus == 0 || self.cpus > 64 {
            return Err(HarnessError::BadSpec(format!(
                "cpus must be 1..=64, got {}",
                self.cpus
            )));
        }
        if !(32..=65536).contains(&self.memory_mib) {
            return Err(HarnessError::BadSpec(format!(
                "memory must be 32..=65536 MiB, got {}",
                self.memory_mib
            )));
        }
        if self.timeout.is_zero() {
            return Err(HarnessError::BadSpec("timeout must be positive".into()));
        }
        Ok(())
    }

    /// The QEMU argument vector (without the program name).
    pub fn qemu_args(&self) -> Vec<String> {
        let mut a: Vec<String> = [
            "-M",
            &self.machine,
            "-accel",
            "tcg,thread=multi",
            "-cpu",
            "max",
            "-nodefaults",
            "-no-user-config",
            "-no-reboot",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-monitor",
            "none",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend([
            "-smp".into(),
            self.cpus.to_string(),
            "-m".into(),
            self.memory_mib.to_string(),
        ]);
        a.extend(["-kernel".into(), self.kernel.display().to_string()]);
        if let Some(i) = &self.initrd {
            a.extend(["-initrd".into(), i.display().to_string()]);
        }
        a.extend(["-append".into(), self.full_cmdline()]);
        a.extend(self.extra_args.iter().cloned());
        a
    }
}

fn check_readable(p: &Path) -> Result<(), HarnessError> {
    match File::open(p) {
        Ok(f) => match f.metadata() {
            Ok(m) if m.is_file() && m.len() > 0 => Ok(()),
            Ok(m) if m.is_file() => Err(HarnessError::BadInput(p.into(), "file is empty".into())),
            Ok(_) => Err(HarnessError::BadInput(
                p.into(),
                "not a regular file".into(),
            )),
            Err(e) => Err(HarnessError::BadInput(p.into(), e.to_string())),
        },
        Err(e) => Err(HarnessError::BadInput(p.into(), e.to_string())),
    }
}

/// What happened to a guest that ran to its end.
#[derive(Debug, Clone)]
pub struct GuestOutcome {
    /// The guest's result line, if it printed one.
    pub result: Option<GuestResult>,
    /// The last [`TAIL_LINES`] console lines.
    pub console_tail: Vec<String>,
    /// Every console line (guests here print a few hundred).
    pub console: Vec<String>,
    /// Wall time from starting QEMU to its exit.
    pub elapsed: Duration,
    /// Wall time from starting QEMU to the first `MILK-BOOT` line from /init.
    pub to_init: Option<Duration>,
    /// QEMU's exit status.
    pub qemu_status: Option<i32>,
}

impl GuestOutcome {
    /// True if some console line contains `needle`.
    pub fn console_has(&self, needle: &str) -> bool {
        self.console.iter().any(|l| l.contains(needle))
    }
}

/// Kills the child if we leave early, so no QEMU outlives its caller.
pub(crate) struct KillOnDrop(pub(crate) Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// True if the QEMU engine can run here.
pub fn qemu_available() -> bool {
    Command::new(QEMU)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Boots the guest under QEMU TCG and waits for it to end.
///
/// Every console line goes to `on_line` (without the newline) and, if the
/// spec names one, to the serial log. A guest still running at the timeout
/// is killed and reported as [`HarnessError::Timeout`] with its console tail.
pub fn run_qemu(
    spec: &GuestSpec,
    on_line: &mut dyn FnMut(&str),
) -> Result<GuestOutcome, HarnessError> {
    spec.validate()?;
    if !qemu_available() {
        return Err(HarnessError::QemuMissing);
    }
    let mut log = match &spec.serial_log {
        Some(p) => Some(File::create(p).map_err(|e| HarnessError::SerialLog(p.clone(), e))?),
        None => None,
    };
    let args = spec.qemu_args();
    log::debug!("{QEMU} {}", args.join(" "));
    let start = Instant::now();
    let child = Command::new(QEMU)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| HarnessError::Qemu(format!("cannot start {QEMU}: {e}")))?;
    let mut child = KillOnDrop(child);
    let stdout = child.0.stdout.take().expect("stdout is piped");
    let stderr = child.0.stderr.take().expect("stderr is piped");

    // One reader thread per stream feeds a channel; this thread owns the
    // deadline. Serial output is not always valid UTF-8: decode lossily.
    let (tx, rx) = mpsc::channel::<(bool, String)>();
    let spawn_reader = |stream: Box<dyn std::io::Read + Send>,
                        is_console: bool,
                        tx: mpsc::Sender<(bool, String)>| {
        std::thread::spawn(move || {
            let mut r = BufReader::new(stream);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf);
                        let line = line.trim_end_matches(['\n', '\r']).to_string();
                        if tx.send((is_console, line)).is_err() {
                            break;
                        }
                    }
                }
            }
        })
    };
    let r1 = spawn_reader(Box::new(stdout), true, tx.clone());
    let r2 = spawn_reader(Box::new(stderr), false, tx);

    let mut console = Vec::new();
    let mut tail: VecDeque<String> = VecDeque::new();
    let mut qemu_errors = Vec::new();
    let mut result = None;
    let mut to_init = None;
    let deadline = start + spec.timeout;
    loop {
        let now = Instant::now();
        if now >= deadline {
            drop(child);
            let tail: Vec<String> = tail.into_iter().collect();
            return Err(HarnessError::Timeout {
                secs: spec.timeout.as_secs(),
                tail: tail.join("\n"),
            });
        }
        match rx.recv_timeout(deadline - now) {
            Ok((true, line)) => {
                if let Some(f) = log.as_mut() {
                    writeln!(f, "{line}").map_err(|e| {
                        HarnessError::SerialLog(spec.serial_log.clone().unwrap_or_default(), e)
                    })?;
                }
                if to_init.is_none() && line.contains("MILK-BOOT ") {
                    to_init = Some(start.elapsed());
                }
                if let Some(r) = parse_result_line(&line) {
                    result = Some(r);
                }
                on_line(&line);
                tail.push_back(line.clone());
                if tail.len() > TAIL_LINES {
                    tail.pop_front();
                }
                console.push(line);
            }
            Ok((false, line)) => {
                log::warn!("qemu: {line}");
                qemu_errors.push(line);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let status = child
        .0
        .wait()
        .map_err(|e| HarnessError::Qemu(e.to_string()))?;
    let _ = r1.join();
    let _ = r2.join();
    if !status.success() && console.is_empty() {
        return Err(HarnessError::Qemu(format!(
            "exited with {status}: {}",
            qemu_errors.join("; ")
        )));
    }
    Ok(GuestOutcome {
        result,
        console_tail: tail.into_iter().collect(),
        console,
        elapsed: start.elapsed(),
        to_init,
        qemu_status: status.code(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_starts_with_the_base_options() {
        let mut s = GuestSpec::new("/k");
        assert_eq!(s.full_cmdline(), BASE_CMDLINE);
        s.cmdline = "  milk.run=true ".into();
        assert_eq!(s.full_cmdline(), format!("{BASE_CMDLINE} milk.run=true"));
    }

    #[test]
    fn qemu_args_carry_the_spec() {
        let mut s = GuestSpec::new("/k/vmlinux");
        s.initrd = Some("/k/initrd".into());
        s.cpus = 3;
        s.memory_mib = 300;
        s.extra_args = vec!["-device".into(), "x".into()];
        let a = s.qemu_args();
        let after = |flag: &str| a[a.iter().position(|x| x == flag).unwrap() + 1].clone();
        assert_eq!(after("-smp"), "3");
        assert_eq!(after("-m"), "300");
        assert_eq!(after("-kernel"), "/k/vmlinux");
        assert_eq!(after("-initrd"), "/k/initrd");
        assert_eq!(after("-append"), s.full_cmdline());
        assert!(a.contains(&"-no-reboot".to_string()));
        assert_eq!(&a[a.len() - 2..], &["-device".to_string(), "x".to_string()]);
    }

    #[test]
    fn validation_rejects_bad_specs_before_starting_anything() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("k");
        std::fs::write(&k, b"kernel").unwrap();
        let empty = dir.path().join("empty");
        std::fs::write(&empty, b"").unwrap();

        assert!(GuestSpec::new(&k).validate().is_ok());
        assert!(matches!(
            GuestSpec::new(dir.path().join("nope")).validate(),
            Err(HarnessError::BadInput(..))
        ));
        assert!(matches!(
            GuestSpec::new(&empty).validate(),
            Err(HarnessError::BadInput(..))
        ));
        assert!(matches!(
            GuestSpec::new(dir.path()).validate(),
            Err(HarnessError::BadInput(..))
        ));
        let mut s = GuestSpec::new(&k);
        s.cpus = 0;
        assert!(matches!(s.validate(), Err(HarnessError::BadSpec(_))));
        let mut s = GuestSpec::new(&k);
        s.memory_mib = 1 << 20;
        assert!(matches!(s.validate(), Err(HarnessError::BadSpec(_))));
        let mut s = GuestSpec::new(&k);
        s.initrd = Some(dir.path().join("missing-initrd"));
        assert!(matches!(s.validate(), Err(HarnessError::BadInput(..))));
    }
}
