//! Running the kernel's make: reproducible environment, a log file, and
//! progress on stderr while it runs.

use std::fs::File;
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::Error;

/// Fixed build identity, so two clean builds give the same bytes.
pub const BUILD_TIMESTAMP: &str = "Thu Jan  1 00:00:00 UTC 2026";
/// `KBUILD_BUILD_USER` and `KBUILD_BUILD_HOST`.
pub const BUILD_IDENTITY: &str = "milk";

/// Environment for every make invocation.
pub fn reproducible_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("KBUILD_BUILD_TIMESTAMP", BUILD_TIMESTAMP),
        ("KBUILD_BUILD_USER", BUILD_IDENTITY),
        ("KBUILD_BUILD_HOST", BUILD_IDENTITY),
        ("KBUILD_BUILD_VERSION", "1"),
        ("LC_ALL", "C"),
        ("TZ", "UTC"),
        ("SOURCE_DATE_EPOCH", "1767225600"),
    ]
}

/// Compiler flags that replace the source and object directories in
/// everything the compiler records (debug info, `__FILE__`). The linker's
/// build ID hashes the debug sections too, so without them the bzImage
/// would depend on where the cache lives.
pub fn prefix_maps(src: &Path, out: &Path) -> String {
    format!(
        "-ffile-prefix-map={}=/usr/src/linux -ffile-prefix-map={}=/usr/src/linux-obj",
        src.display(),
        out.display()
    )
}

/// Counts the kernel's "  CC  file" style lines and shows them as progress.
struct Progress {
    start: Instant,
    steps: u64,
    tty: bool,
    label: String,
}

impl Progress {
    fn line(&mut self, line: &str) {
        let t = line.trim_start();
        let is_step = line.starts_with("  ")
            && t.split_whitespace().next().is_some_and(|w| {
                w.len() <= 8
                    && w.chars()
                        .all(|c| c.is_ascii_uppercase() || c == '-' || c.is_ascii_digit())
            });
        let secs = self.start.elapsed().as_secs();
        if is_step {
            self.steps += 1;
            if self.tty {
                let mut shown: String = t.chars().take(60).collect();
                shown.retain(|c| c != '\r');
                eprint!(
                    "\r[{}] {:>5} steps {:>3}m{:02}s  {:<60}",
                    self.label,
                    self.steps,
                    secs / 60,
                    secs % 60,
                    shown
                );
            } else if self.steps.is_multiple_of(500) {
                eprintln!(
                    "[{}] {} steps, {}m{:02}s: {}",
                    self.label,
                    self.steps,
                    secs / 60,
                    secs % 60,
                    t
                );
            }
        } else if line.contains("error") || line.contains("warning:") {
            if self.tty {
                eprintln!();
            }
            eprintln!("[{}] {}", self.label, line);
        }
    }

    fn done(&self) {
        let secs = self.start.elapsed().as_secs();
        if self.tty {
            eprintln!();
        }
        eprintln!(
            "[{}] {} steps in {}m{:02}s",
            self.label,
            self.steps,
            secs / 60,
            secs % 60
        );
    }
}

/// Runs `make -C src O=out <args>` with the reproducible environment,
/// appending all output to `log`. On failure the error carries the log's tail.
pub fn run(src: &Path, out: &Path, args: &[String], log: &Path, label: &str) -> Result<(), Error> {
    let mut logf = File::options()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| Error::io(log, e))?;
    writeln!(logf, "$ make O={} {}", out.display(), args.join(" "))
        .map_err(|e| Error::io(log, e))?;
    let mut cmd = Command::new("make");
    cmd.arg("-C")
        .arg(src)
        .arg(format!("O={}", out.display()))
        .args(args);
    for (k, v) in reproducible_env() {
        cmd.env(k, v);
    }
    let maps = prefix_maps(src, out);
    cmd.env("KCFLAGS", &maps).env("KAFLAGS", &maps);
    // Merge stderr into stdout so the log keeps their order.
    let (reader, writer) =
        std::io::pipe().map_err(|e| Error::Tool("make".into(), e.to_string()))?;
    let writer2 = writer
        .try_clone()
        .map_err(|e| Error::Tool("make".into(), e.to_string()))?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(writer2)
        .spawn()
        .map_err(|e| Error::Tool("make".into(), e.to_string()))?;
    // Drop our copies of the write end (moved into the Command) so EOF arrives.
    drop(cmd);
    let mut progress = Progress {
        start: Instant::now(),
        steps: 0,
        tty: std::io::stderr().is_terminal(),
        label: label.to_string(),
    };
    let mut tail: std::collections::VecDeque<String> = std::collections::VecDeque::new();
    for line in BufReader::new(reader).lines() {
        let Ok(line) = line else { break };
        let _ = writeln!(logf, "{line}");
        progress.line(&line);
        tail.push_back(line);
        if tail.len() > 40 {
            tail.pop_front();
        }
    }
    let status = child
        .wait()
        .map_err(|e| Error::Tool("make".into(), e.to_string()))?;
    progress.done();
    if !status.success() {
        let tail: Vec<String> = tail.into_iter().collect();
        return Err(Error::Build(format!(
            "make {} failed ({status}); full log: {}\n{}",
            args.join(" "),
            log.display(),
            tail.join("\n")
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_counts_kbuild_steps_only() {
        let mut p = Progress {
            start: Instant::now(),
            steps: 0,
            tty: false,
            label: "t".into(),
        };
        for l in [
            "  CC      kernel/sched/core.o",
            "  LD      vmlinux",
            "  BTF     .btf.vmlinux.bin.o",
            "make[1]: Entering directory '/x'",
            "  GEN     Makefile",
            "some random text",
        ] {
            p.line(l);
        }
        assert_eq!(p.steps, 4);
    }

    #[test]
    fn prefix_maps_hide_both_directories() {
        let m = prefix_maps(Path::new("/c/src/linux-1"), Path::new("/c/build/x"));
        assert_eq!(
            m,
            "-ffile-prefix-map=/c/src/linux-1=/usr/src/linux -ffile-prefix-map=/c/build/x=/usr/src/linux-obj"
        );
    }

    #[test]
    fn environment_pins_the_build_identity() {
        let env = reproducible_env();
        for key in [
            "KBUILD_BUILD_TIMESTAMP",
            "KBUILD_BUILD_USER",
            "KBUILD_BUILD_HOST",
            "KBUILD_BUILD_VERSION",
        ] {
            assert!(env.iter().any(|(k, _)| *k == key), "{key}");
        }
    }
}
