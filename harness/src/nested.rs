//! The nested engine: boots an L1 Linux host under QEMU TCG with an emulated
//! AMD SVM CPU (nested paging included), so milk-vmm gets a real `/dev/kvm`
//! inside it, and runs the L1's job (a list of steps, normally milk-vmm
//! invocations) with their output streamed back.
//!
//! The L1 `/init` (`l1-host/init`) frames each step with markers:
//!
//! ```text
//! ttyS0 (QEMU stdout):  MILK-L1-BOOT kernel=... cpus=2 svm=yes kvm=yes
//!                       MILK-STEP-BEGIN id=1
//!                       ...the step's stdout (milk-vmm: guest console, summary)...
//!                       MILK-STEP-END id=1 status=0
//!                       MILK-L1-DONE
//! ttyS1 (a pipe):       ...the step's stderr...
//!                       MILK-STEP-END id=1
//! ```
//!
//! A step is complete when both streams carried its end marker, so no
//! stderr line is attributed to the wrong step. Without SVM or `/dev/kvm`
//! the L1 prints `MILK-L1-NOKVM ...` and [`NestedError::NoKvm`] says why in
//! one line; a QEMU that cannot emulate SVM/NPT refuses to start (the CPU
//! model is `enforce`d) and gives [`NestedError::NoSvm`].

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::{KillOnDrop, QEMU, TAIL_LINES};

/// The L1 `/init`'s first line.
pub const L1_BOOT: &str = "MILK-L1-BOOT ";
/// The L1 has no `/dev/kvm` (the rest of the line says why).
pub const L1_NOKVM: &str = "MILK-L1-NOKVM ";
/// The L1 ran every step.
pub const L1_DONE: &str = "MILK-L1-DONE";
/// `MILK-STEP-BEGIN id=N`.
pub const STEP_BEGIN: &str = "MILK-STEP-BEGIN ";
/// `MILK-STEP-END id=N status=S` (ttyS0) and `MILK-STEP-END id=N` (ttyS1).
pub const STEP_END: &str = "MILK-STEP-END ";

/// The L1 CPU: AMD (kvm_amd checks the vendor) with SVM and nested paging,
/// minus the EPYC features QEMU 7.2's TCG lacks, so that `enforce` fails
/// exactly when SVM or NPT cannot be emulated.
pub const L1_CPU: &str = "EPYC,+svm,+npt,-rdseed,-sha-ni,-fxsr-opt,-misalignsse,\
-3dnowprefetch,-osvw,-topoext,-nrip-save,-xsavec,enforce";

/// The L1 kernel command line: console on ttyS0, warnings only (the
/// console carries the steps' output), reboot by triple fault, and no
/// IO-APIC timer check (under a loaded TCG host it can miss its deadline
/// and panic with "IO-APIC + timer doesn't work!").
pub const L1_CMDLINE: &str = "console=ttyS0 loglevel=4 reboot=t panic=-1 no_timer_check";

/// The file descriptor QEMU gets the ttyS1 pipe as.
const TTYS1_FD: i32 = 3;

/// Errors from running the L1.
#[derive(Debug, thiserror::Error)]
pub enum NestedError {
    /// QEMU is not installed.
    #[error("{QEMU} not found; install it with: apt-get install -y qemu-system-x86")]
    QemuMissing,
    /// The spec is invalid.
    #[error("invalid L1 spec: {0}")]
    BadSpec(String),
    /// QEMU cannot emulate AMD SVM with nested paging.
    #[error("nested KVM unavailable: QEMU cannot emulate AMD SVM with nested paging (-cpu {L1_CPU}): {0}")]
    NoSvm(String),
    /// The L1 booted without `/dev/kvm` (kvm_amd did not initialise).
    #[error("nested KVM unavailable: the L1 host has no /dev/kvm (kvm_amd did not load): {0}")]
    NoKvm(String),
    /// Starting or talking to QEMU failed.
    #[error("qemu: {0}")]
    Qemu(String),
    /// The L1 did not finish in time; QEMU was killed.
    #[error("L1 host timed out after {secs} s; last console lines:\n{tail}")]
    Timeout {
        /// The timeout.
        secs: u64,
        /// The last console lines.
        tail: String,
    },
    /// Writing the console log failed.
    #[error("console log {0}: {1}")]
    ConsoleLog(PathBuf, std::io::Error),
}

/// How to boot the L1.
#[derive(Debug, Clone)]
pub struct NestedSpec {
    /// The L1 kernel (bzImage with KVM and kvm_amd).
    pub kernel: PathBuf,
    /// The L1 initramfs (base + job archive).
    pub initrd: PathBuf,
    /// L1 vCPUs.
    pub cpus: u32,
    /// L1 RAM in MiB.
    pub memory_mib: u32,
    /// Wall-clock limit for the whole L1 run.
    pub timeout: Duration,
    /// Copy of everything the L1 printed (both serial ports, prefixed).
    pub console_log: Option<PathBuf>,
}

impl NestedSpec {
    /// Defaults: 2 vCPUs (one TCG thread per host core here), 2048 MiB, 600 s.
    pub fn new(kernel: impl Into<PathBuf>, initrd: impl Into<PathBuf>) -> Self {
        NestedSpec {
            kernel: kernel.into(),
            initrd: initrd.into(),
            cpus: 2,
            memory_mib: 2048,
            timeout: Duration::from_secs(600),
            console_log: None,
        }
    }

    /// The QEMU argument vector (without the program name).
    pub fn qemu_args(&self) -> Vec<String> {
        let mut a: Vec<String> = [
            "-M",
            "pc",
            "-accel",
            "tcg,thread=multi",
            "-cpu",
            L1_CPU,
            "-nodefaults",
            "-no-user-config",
            "-no-reboot",
            "-display",
            "none",
            "-monitor",
            "none",
            "-serial",
            "stdio",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend([
            "-serial".into(),
            format!("file:/dev/fd/{TTYS1_FD}"),
            "-smp".into(),
            self.cpus.to_string(),
            "-m".into(),
            self.memory_mib.to_string(),
            "-kernel".into(),
            self.kernel.display().to_string(),
            "-initrd".into(),
            self.initrd.display().to_string(),
            "-append".into(),
            L1_CMDLINE.into(),
        ]);
        a
    }

    fn validate(&self) -> Result<(), NestedError> {
        for p in [&self.kernel, &self.initrd] {
            if !p.is_file() {
                return Err(NestedError::BadSpec(format!("{}: not a file", p.display())));
            }
        }
        if !(1..=16).contains(&self.cpus) {
            return Err(NestedError::BadSpec(format!(
                "cpus must be 1..=16, got {}",
                self.cpus
            )));
        }
        if !(512..=16384).contains(&self.memory_mib) {
            return Err(NestedError::BadSpec(format!(
                "memory must be 512..=16384 MiB, got {}",
                self.memory_mib
            )));
        }
        if self.timeout.is_zero() {
            return Err(NestedError::BadSpec("timeout must be positive".into()));
        }
        Ok(())
    }
}

/// One line of the L1's output, as it arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NestedLine<'a> {
    /// The L1's own console (kernel, `/init`), outside any step.
    L1(&'a str),
    /// A step's stdout (milk-vmm: the guest console and its summary).
    Stdout(usize, &'a str),
    /// A step's stderr (milk-vmm's logs and errors).
    Stderr(usize, &'a str),
}

/// What `/init` reported on its first line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct L1Boot {
    /// The L1 kernel release.
    pub kernel: String,
    /// The L1's online CPUs.
    pub cpus: u32,
    /// `svm` in the L1's /proc/cpuinfo.
    pub svm: bool,
    /// `/dev/kvm` present.
    pub kvm: bool,
}

/// One step's result.
#[derive(Debug, Clone, Default)]
pub struct StepResult {
    /// The step id (1-based).
    pub id: usize,
    /// Its exit status; `None` if the L1 ended before the step did.
    pub status: Option<i32>,
    /// Its stdout lines.
    pub stdout: Vec<String>,
    /// Its stderr lines.
    pub stderr: Vec<String>,
    /// Host time from the L1 start to the step's begin marker.
    pub started: Duration,
    /// Host time from the step's begin marker to its end marker.
    pub elapsed: Duration,
    /// Host time from the begin marker to the guest's `MILK-BOOT` line.
    pub to_guest_init: Option<Duration>,
}

impl StepResult {
    /// The stdout lines joined with newlines.
    pub fn stdout_text(&self) -> String {
        self.stdout.join("\n")
    }
    /// The stderr lines joined with newlines.
    pub fn stderr_text(&self) -> String {
        self.stderr.join("\n")
    }
}

/// What happened to an L1 that ran to its end.
#[derive(Debug, Clone, Default)]
pub struct NestedOutcome {
    /// `/init`'s report.
    pub boot: Option<L1Boot>,
    /// Host time from starting QEMU to the L1's `/init` report.
    pub to_l1_init: Option<Duration>,
    /// The steps that began, in order.
    pub steps: Vec<StepResult>,
    /// True if `/init` reported that it ran every step.
    pub done: bool,
    /// The L1's own console lines (outside steps).
    pub l1_console: Vec<String>,
    /// Wall time of the whole run.
    pub elapsed: Duration,
}

impl NestedOutcome {
    /// The step with id `id`.
    pub fn step(&self, id: usize) -> Option<&StepResult> {
        self.steps.iter().find(|s| s.id == id)
    }
}

/// Parses `MILK-L1-BOOT kernel=K cpus=N svm=yes kvm=yes`.
pub fn parse_boot(line: &str) -> Option<L1Boot> {
    let rest = &line[line.find(L1_BOOT)? + L1_BOOT.len()..];
    let field = |k: &str| {
        rest.split_whitespace()
            .find_map(|w| w.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
    };
    Some(L1Boot {
        kernel: field("kernel")?.to_string(),
        cpus: field("cpus")?.parse().ok()?,
        svm: field("svm")? == "yes",
        kvm: field("kvm")? == "yes",
    })
}

/// Parses a begin (`Some((id, None))`) or ttyS0 end marker
/// (`Some((id, Some(status)))`); the marker may follow other text (a kernel
/// message sharing the console line).
pub fn parse_step_marker(line: &str) -> Option<(usize, Option<i32>)> {
    if let Some(at) = line.find(STEP_BEGIN) {
        let id = line[at + STEP_BEGIN.len()..]
            .trim_end()
            .strip_prefix("id=")?;
        return Some((id.parse().ok()?, None));
    }
    let at = line.find(STEP_END)?;
    let rest = line[at + STEP_END.len()..].trim_end();
    let (id, status) = rest.split_once(' ')?;
    let id = id.strip_prefix("id=")?.parse().ok()?;
    let status: i32 = status.strip_prefix("status=")?.parse().ok()?;
    (0..=255).contains(&status).then_some((id, Some(status)))
}

/// Parses the ttyS1 end marker `MILK-STEP-END id=N`.
fn parse_stderr_end(line: &str) -> Option<usize> {
    let at = line.find(STEP_END)?;
    line[at + STEP_END.len()..]
        .trim_end()
        .strip_prefix("id=")?
        .parse()
        .ok()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    Console,
    Stderr,
    Qemu,
}

/// Boots the L1 and runs its job; every line goes to `on_line` as it arrives.
///
/// QEMU is killed when this returns (timeout, error or not), so no process
/// outlives the call.
pub fn run_nested(
    spec: &NestedSpec,
    on_line: &mut dyn FnMut(NestedLine),
) -> Result<NestedOutcome, NestedError> {
    spec.validate()?;
    if !crate::qemu_available() {
        return Err(NestedError::QemuMissing);
    }
    let mut log = match &spec.console_log {
        Some(p) => Some(File::create(p).map_err(|e| NestedError::ConsoleLog(p.clone(), e))?),
        None => None,
    };
    let (ttys1_r, ttys1_w) =
        std::io::pipe().map_err(|e| NestedError::Qemu(format!("pipe: {e}")))?;
    let args = spec.qemu_args();
    log::debug!("{QEMU} {}", args.join(" "));
    let start = Instant::now();
    let mut cmd = Command::new(QEMU);
    cmd.args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let wfd = ttys1_w.as_raw_fd();
    // SAFETY: dup2 is async-signal-safe; it runs in the forked child before
    // exec and only duplicates a descriptor we own onto TTYS1_FD (clearing
    // its close-on-exec flag so QEMU inherits it).
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(wfd, TTYS1_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| NestedError::Qemu(format!("cannot start {QEMU}: {e}")))?;
    drop(cmd);
    drop(ttys1_w);
    let mut child = KillOnDrop(child);
    let stdout = child.0.stdout.take().expect("stdout is piped");
    let stderr = child.0.stderr.take().expect("stderr is piped");

    let (tx, rx) = mpsc::channel::<(Source, String)>();
    let spawn_reader = |stream: Box<dyn std::io::Read + Send>, src: Source| {
        let tx = tx.clone();
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
                        if tx.send((src, line)).is_err() {
                            break;
                        }
                    }
                }
            }
        })
    };
    let readers = [
        spawn_reader(Box::new(stdout), Source::Console),
        spawn_reader(Box::new(ttys1_r), Source::Stderr),
        spawn_reader(Box::new(stderr), Source::Qemu),
    ];
    drop(tx);

    let mut out = NestedOutcome::default();
    let mut tail: VecDeque<String> = VecDeque::new();
    let mut qemu_errors = Vec::new();
    let mut nokvm: Option<String> = None;
    // The step whose stdout is open, and the steps whose stderr is open.
    let mut current: Option<usize> = None;
    let mut stderr_open: VecDeque<usize> = VecDeque::new();
    let deadline = start + spec.timeout;
    loop {
        let now = Instant::now();
        if now >= deadline {
            drop(child);
            return Err(NestedError::Timeout {
                secs: spec.timeout.as_secs(),
                tail: tail.into_iter().collect::<Vec<_>>().join("\n"),
            });
        }
        let (src, line) = match rx.recv_timeout(deadline - now) {
            Ok(x) => x,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        if let Some(f) = log.as_mut() {
            let tag = match src {
                Source::Console => "ttyS0",
                Source::Stderr => "ttyS1",
                Source::Qemu => "qemu",
            };
            writeln!(f, "{tag}| {line}").map_err(|e| {
                NestedError::ConsoleLog(spec.console_log.clone().unwrap_or_default(), e)
            })?;
        }
        if src != Source::Qemu {
            tail.push_back(line.clone());
            if tail.len() > TAIL_LINES {
                tail.pop_front();
            }
        }
        match src {
            Source::Qemu => {
                log::warn!("qemu: {line}");
                qemu_errors.push(line);
            }
            Source::Console => {
                if let Some((id, status)) = parse_step_marker(&line) {
                    match status {
                        None => {
                            out.steps.push(StepResult {
                                id,
                                started: start.elapsed(),
                                ..Default::default()
                            });
                            current = Some(id);
                            stderr_open.push_back(id);
                        }
                        Some(st) => {
                            if let Some(s) = out.steps.iter_mut().find(|s| s.id == id) {
                                s.status = Some(st);
                                s.elapsed = start.elapsed().saturating_sub(s.started);
                            }
                            current = None;
                        }
                    }
                    continue;
                }
                match current.and_then(|id| out.steps.iter_mut().find(|s| s.id == id)) {
                    Some(s) => {
                        if s.to_guest_init.is_none() && line.contains("MILK-BOOT ") {
                            s.to_guest_init = Some(start.elapsed().saturating_sub(s.started));
                        }
                        on_line(NestedLine::Stdout(s.id, &line));
                        s.stdout.push(line);
                    }
                    None => {
                        if let Some(b) = parse_boot(&line) {
                            out.to_l1_init = Some(start.elapsed());
                            out.boot = Some(b);
                        } else if let Some(at) = line.find(L1_NOKVM) {
                            nokvm = Some(line[at + L1_NOKVM.len()..].trim().to_string());
                        } else if line.contains(L1_DONE) {
                            out.done = true;
                        }
                        on_line(NestedLine::L1(&line));
                        out.l1_console.push(line);
                    }
                }
            }
            Source::Stderr => {
                if let Some(id) = parse_stderr_end(&line) {
                    stderr_open.retain(|&x| x != id);
                    continue;
                }
                if line.contains(L1_DONE) {
                    continue;
                }
                match stderr_open
                    .front()
                    .copied()
                    .and_then(|id| out.steps.iter_mut().find(|s| s.id == id))
                {
                    Some(s) => {
                        on_line(NestedLine::Stderr(s.id, &line));
                        s.stderr.push(line);
                    }
                    None => {
                        on_line(NestedLine::L1(&line));
                        out.l1_console.push(line);
                    }
                }
            }
        }
        if nokvm.is_some() {
            break;
        }
    }
    drop(child);
    for r in readers {
        let _ = r.join();
    }
    out.elapsed = start.elapsed();
    if let Some(why) = nokvm {
        return Err(NestedError::NoKvm(why));
    }
    if out.boot.is_none() {
        let msg = qemu_errors.join("; ");
        if qemu_errors
            .iter()
            .any(|l| l.contains("doesn't support requested feature"))
        {
            return Err(NestedError::NoSvm(msg));
        }
        if !qemu_errors.is_empty() && out.l1_console.is_empty() {
            return Err(NestedError::Qemu(msg));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_parse_with_and_without_a_prefix() {
        assert_eq!(parse_step_marker("MILK-STEP-BEGIN id=3"), Some((3, None)));
        assert_eq!(
            parse_step_marker("MILK-STEP-END id=3 status=71\r"),
            Some((3, Some(71)))
        );
        assert_eq!(
            parse_step_marker("[    9.1] kvm: x MILK-STEP-END id=12 status=0"),
            Some((12, Some(0)))
        );
        for bad in [
            "MILK-STEP-END id=3",
            "MILK-STEP-END id=x status=0",
            "MILK-STEP-END id=3 status=256",
            "MILK-STEP-BEGIN id=",
            "echo \"MILK-STEP-BEGIN id=$id\"",
            "milk-vmm: MILK-RESULT status=0",
        ] {
            assert_eq!(parse_step_marker(bad), None, "{bad}");
        }
        assert_eq!(parse_stderr_end("MILK-STEP-END id=4"), Some(4));
        assert_eq!(parse_stderr_end("MILK-STEP-END id=4 status=1"), None);
    }

    #[test]
    fn boot_line_reports_svm_and_kvm() {
        let b = parse_boot("MILK-L1-BOOT kernel=6.12.117-milk-l1 cpus=2 svm=yes kvm=no").unwrap();
        assert_eq!(
            b,
            L1Boot {
                kernel: "6.12.117-milk-l1".into(),
                cpus: 2,
                svm: true,
                kvm: false
            }
        );
        assert_eq!(parse_boot("MILK-L1-BOOT kernel=x"), None);
    }

    #[test]
    fn qemu_gets_an_enforced_svm_cpu_and_two_serial_ports() {
        let s = NestedSpec::new("/l1/bzImage", "/l1/initrd");
        let a = s.qemu_args();
        let after = |flag: &str| a[a.iter().position(|x| x == flag).unwrap() + 1].clone();
        assert_eq!(after("-cpu"), L1_CPU);
        assert!(L1_CPU.starts_with("EPYC,+svm,+npt,") && L1_CPU.ends_with(",enforce"));
        assert_eq!(after("-accel"), "tcg,thread=multi");
        assert_eq!(after("-kernel"), "/l1/bzImage");
        assert_eq!(after("-initrd"), "/l1/initrd");
        assert_eq!(after("-append"), L1_CMDLINE);
        let serials: Vec<&String> = a
            .iter()
            .enumerate()
            .filter(|(i, _)| *i > 0 && a[i - 1] == "-serial")
            .map(|(_, v)| v)
            .collect();
        assert_eq!(serials, ["stdio", "file:/dev/fd/3"]);
        assert!(a.contains(&"-no-reboot".to_string()));
    }

    #[test]
    fn bad_specs_are_refused_before_qemu_starts() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        std::fs::write(&f, "x").unwrap();
        assert!(NestedSpec::new(&f, &f).validate().is_ok());
        assert!(matches!(
            NestedSpec::new(d.path().join("none"), &f).validate(),
            Err(NestedError::BadSpec(_))
        ));
        let mut s = NestedSpec::new(&f, &f);
        s.memory_mib = 64;
        assert!(matches!(s.validate(), Err(NestedError::BadSpec(_))));
        let mut s = NestedSpec::new(&f, &f);
        s.cpus = 0;
        assert!(matches!(s.validate(), Err(NestedError::BadSpec(_))));
    }
}
