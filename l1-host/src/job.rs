//! What one L1 boot runs: a list of steps (argument vectors, normally
//! `milk-vmm ...`) and the host files they need inside the L1.
//!
//! The L1 `/init` runs `/job/steps.sh`, which calls `milk_step ID ARGV...`
//! once per step; `milk_step` prints the step's begin and end markers (see
//! [`milk_harness::nested`]) with the exit status. Files are copied into the
//! job archive under `/job/files/` and the arguments that name them are
//! rewritten to those paths; every other argument reaches the L1 unchanged
//! (shell-quoted), so a step runs exactly what the caller typed.

use std::path::{Path, PathBuf};

use crate::Error;

/// Where job files live inside the L1.
pub const FILES_DIR: &str = "/job/files";

/// The script the L1 `/init` sources.
pub const STEPS_SCRIPT: &str = "job/steps.sh";

/// milk-vmm options whose value is an input file on the host.
pub const FILE_OPTIONS: &[&str] = &["--kernel", "--initrd"];

/// milk-vmm options that name an output file, which would stay inside the
/// L1 (its console is streamed instead).
pub const OUTPUT_OPTIONS: &[&str] = &["--serial-log"];

/// One file the job carries: host path and path inside the L1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobFile {
    /// The file on the host.
    pub host: PathBuf,
    /// Its absolute path inside the L1.
    pub l1: String,
}

/// The steps one L1 boot runs and the files they need.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Job {
    /// Argument vectors, run in order; step ids are 1-based indices.
    pub steps: Vec<Vec<String>>,
    /// Files copied into the L1, in the order they were added.
    pub files: Vec<JobFile>,
}

/// Quotes `s` for a POSIX shell: the word stays exactly `s`.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', "'\\''"))
}

impl Job {
    /// An empty job.
    pub fn new() -> Self {
        Job::default()
    }

    /// Makes `host` available inside the L1 and returns its L1 path. The
    /// same host path added twice is carried once.
    pub fn add_file(&mut self, host: &Path) -> String {
        if let Some(f) = self.files.iter().find(|f| f.host == host) {
            return f.l1.clone();
        }
        let name: String = host
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "file".into())
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let l1 = format!("{FILES_DIR}/{}-{name}", self.files.len());
        self.files.push(JobFile {
            host: host.to_path_buf(),
            l1: l1.clone(),
        });
        l1
    }

    /// Adds a step that runs `argv` as given; returns its id.
    pub fn add_step(&mut self, argv: Vec<String>) -> usize {
        self.steps.push(argv);
        self.steps.len()
    }

    /// Adds `milk-vmm ARGS`: the values of `--kernel`/`--initrd` (as
    /// `--opt V` or `--opt=V`) become job files; `--serial-log` is refused
    /// (its file would stay in the L1; the console is streamed). Returns the
    /// step id.
    pub fn add_vmm_step(&mut self, args: &[String]) -> Result<usize, Error> {
        let mut argv = vec!["milk-vmm".to_string()];
        let mut i = 0;
        while i < args.len() {
            let a = &args[i];
            if a == "--" {
                argv.extend(args[i..].iter().cloned());
                break;
            }
            let (opt, inline) = match a.split_once('=') {
                Some((o, v)) if o.starts_with("--") => (o, Some(v.to_string())),
                _ => (a.as_str(), None),
            };
            if OUTPUT_OPTIONS.contains(&opt) {
                return Err(Error::Job(format!(
                    "{opt} is not supported in nested mode (the file would stay inside the L1 host; \
                     the console is streamed to stdout)"
                )));
            }
            if FILE_OPTIONS.contains(&opt) {
                let value = match inline {
                    Some(v) => v,
                    None => {
                        i += 1;
                        match args.get(i) {
                            Some(v) => v.clone(),
                            // Let milk-vmm report the missing value itself.
                            None => {
                                argv.push(a.clone());
                                break;
                            }
                        }
                    }
                };
                let p = Path::new(&value);
                // A missing file stays as given: milk-vmm reports it (66).
                let mapped = if p.is_file() { self.add_file(p) } else { value };
                argv.push(opt.to_string());
                argv.push(mapped);
            } else {
                argv.push(a.clone());
            }
            i += 1;
        }
        Ok(self.add_step(argv))
    }

    /// `/job/steps.sh`: one `milk_step ID ARGV...` line per step.
    pub fn steps_script(&self) -> String {
        let mut s = String::from("# generated by milk-l1-host: one milk_step per step\n");
        for (i, argv) in self.steps.iter().enumerate() {
            let words: Vec<String> = argv.iter().map(|w| shell_quote(w)).collect();
            s.push_str(&format!("milk_step {} {}\n", i + 1, words.join(" ")));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strs(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn quoting_keeps_every_word_exact() {
        assert_eq!(shell_quote("--cpus"), "--cpus");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(
            shell_quote("milk.run=\"milk-work -t 16\""),
            "'milk.run=\"milk-work -t 16\"'"
        );
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        // Round trip through a real shell.
        for w in [
            "a b",
            "it's",
            "$HOME",
            "\"q\"",
            "x;y",
            "*",
            "back\\slash",
            "",
        ] {
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!("printf %s {}", shell_quote(w)))
                .output()
                .unwrap();
            assert_eq!(String::from_utf8_lossy(&out.stdout), w);
        }
    }

    #[test]
    fn vmm_steps_map_input_files_and_keep_the_rest() {
        let d = tempfile::tempdir().unwrap();
        let k = d.path().join("bzImage");
        let i = d.path().join("init ramfs.gz");
        std::fs::write(&k, b"k").unwrap();
        std::fs::write(&i, b"i").unwrap();
        let mut job = Job::new();
        let id = job
            .add_vmm_step(&strs(&[
                "--kernel",
                k.to_str().unwrap(),
                &format!("--initrd={}", i.display()),
                "--cpus",
                "2",
                "--cmdline",
                "milk.run=\"milk-work -t 16\"",
            ]))
            .unwrap();
        assert_eq!(id, 1);
        assert_eq!(
            job.steps[0],
            strs(&[
                "milk-vmm",
                "--kernel",
                "/job/files/0-bzImage",
                "--initrd",
                "/job/files/1-init_ramfs.gz",
                "--cpus",
                "2",
                "--cmdline",
                "milk.run=\"milk-work -t 16\""
            ])
        );
        assert_eq!(job.files.len(), 2);
        // The same kernel again is carried once.
        job.add_vmm_step(&strs(&["--kernel", k.to_str().unwrap()]))
            .unwrap();
        assert_eq!(job.files.len(), 2);
        assert_eq!(job.steps[1][2], "/job/files/0-bzImage");
        let script = job.steps_script();
        assert!(script.contains(
            "milk_step 1 milk-vmm --kernel /job/files/0-bzImage --initrd /job/files/1-init_ramfs.gz \
             --cpus 2 --cmdline 'milk.run=\"milk-work -t 16\"'\n"
        ), "{script}");
        assert!(script.contains("milk_step 2 milk-vmm --kernel /job/files/0-bzImage\n"));
    }

    #[test]
    fn bad_input_reaches_milk_vmm_unchanged() {
        let mut job = Job::new();
        job.add_vmm_step(&strs(&["--kernel", "/no/such/kernel", "--cpus", "0"]))
            .unwrap();
        assert_eq!(
            job.steps[0],
            strs(&["milk-vmm", "--kernel", "/no/such/kernel", "--cpus", "0"])
        );
        assert!(job.files.is_empty());
        job.add_vmm_step(&strs(&["--kernel"])).unwrap();
        assert_eq!(job.steps[1], strs(&["milk-vmm", "--kernel"]));
    }

    #[test]
    fn output_files_are_refused_with_a_reason() {
        let e = Job::new()
            .add_vmm_step(&strs(&["--serial-log", "/tmp/x"]))
            .unwrap_err();
        assert!(
            e.to_string().contains("--serial-log is not supported"),
            "{e}"
        );
        assert!(Job::new()
            .add_vmm_step(&strs(&["--serial-log=/tmp/x"]))
            .is_err());
    }
}
