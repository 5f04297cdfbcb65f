//! `cargo xtask fuzz`: builds the libFuzzer targets of `fuzz/` with sanitizer-coverage
//! instrumentation on the stable toolchain and runs them (docs/reliability.md).
//!
//! libfuzzer-sys compiles libFuzzer itself with the C++ compiler (`g++`, installed from
//! Debian on first use like the kernel's build tools); rustc instruments the Rust code with the same
//! sanitizer-coverage passes `cargo fuzz` uses, passed here as RUSTFLAGS for the target
//! triple only (build scripts and proc macros stay uninstrumented).

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;

use crate::{cargo, workspace_root, Res};

/// Every fuzz target (`fuzz/fuzz_targets/NAME.rs`, `fuzz/src/NAME.rs`).
pub const TARGETS: [&str; 8] = [
    "records",
    "queue_engine",
    "runtime",
    "mmio",
    "ivshmem_regs",
    "loaders",
    "config",
    "control_proto",
];

/// Longest input per target (libFuzzer `-max_len`): the operation-sequence targets stay
/// short enough for many executions; the file and text targets keep libFuzzer's default.
fn max_len(target: &str) -> Option<usize> {
    match target {
        "queue_engine" => Some(512),
        "runtime" | "mmio" => Some(256),
        "ivshmem_regs" => Some(192),
        _ => None,
    }
}

/// Seconds each target fuzzes in `cargo xtask test` (override: `MILK_FUZZ_SECONDS`).
const CI_SECONDS: u64 = 15;

/// Codegen flags for coverage-guided fuzzing (what `cargo fuzz` passes), with debug
/// assertions and overflow checks on so arithmetic on guest values is checked too.
const RUSTFLAGS: &[&str] = &[
    "-Cpasses=sancov-module",
    "-Cllvm-args=-sanitizer-coverage-level=4",
    "-Cllvm-args=-sanitizer-coverage-inline-8bit-counters",
    "-Cllvm-args=-sanitizer-coverage-pc-table",
    "-Cllvm-args=-sanitizer-coverage-trace-compares",
    "-Cdebug-assertions",
    "-Coverflow-checks",
    "--cfg=fuzzing",
];

/// `cargo xtask fuzz TARGET [--time S]`.
#[derive(Args)]
pub struct FuzzArgs {
    /// Target to run (`--list` shows them).
    #[arg(required_unless_present = "list")]
    pub target: Option<String>,
    /// Seconds to fuzz.
    #[arg(long, default_value_t = 300)]
    pub time: u64,
    /// Only replay the committed corpus (every input once), no fuzzing.
    #[arg(long)]
    pub replay: bool,
    /// Afterwards, minimise the committed corpus together with the new inputs into
    /// `fuzz/corpus/TARGET` (libFuzzer `-merge=1`).
    #[arg(long)]
    pub merge: bool,
    /// List the targets and exit.
    #[arg(long)]
    pub list: bool,
    /// Print the run's figures as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// What one libFuzzer run reported.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct RunStats {
    /// Target name.
    pub target: String,
    /// Inputs executed.
    pub execs: u64,
    /// Executions per second.
    pub exec_per_sec: u64,
    /// Coverage: edges (libFuzzer `cov`).
    pub cov: u64,
    /// Coverage: features (libFuzzer `ft`).
    pub ft: u64,
    /// Inputs in the corpus at the end.
    pub corpus: u64,
    /// Peak RSS in MB.
    pub peak_rss_mb: u64,
    /// Seconds the run took.
    pub seconds: f64,
}

fn host_triple() -> Res<String> {
    let out = Command::new("rustc").arg("-vV").output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_owned)
        .ok_or_else(|| "cannot tell the host triple from `rustc -vV`".into())
}

fn fuzz_dir() -> PathBuf {
    workspace_root().join("fuzz")
}

fn target_dir() -> PathBuf {
    workspace_root().join("target").join("fuzz")
}

fn check_target(name: &str) -> Res<()> {
    if TARGETS.contains(&name) {
        Ok(())
    } else {
        Err(format!(
            "unknown fuzz target {name:?} (targets: {})",
            TARGETS.join(", ")
        )
        .into())
    }
}

/// The C++ compiler libfuzzer-sys builds libFuzzer with.
const CXX: milk_guest_kernel::host_deps::Package = milk_guest_kernel::host_deps::Package {
    name: "g++",
    probe: "/usr/bin/g++",
};

/// Builds every fuzzer binary; returns the directory holding them.
pub fn build() -> Res<PathBuf> {
    milk_guest_kernel::host_deps::ensure_packages(&[CXX])?;
    let triple = host_triple()?;
    eprintln!("building the fuzz targets (release, sanitizer-coverage, {triple})");
    let t0 = Instant::now();
    let status = cargo()
        .current_dir(workspace_root())
        .args([
            "build",
            "--release",
            "-p",
            "milk-fuzz",
            "--features",
            "libfuzzer",
            "--bins",
            "--target",
            &triple,
            "--target-dir",
        ])
        .arg(target_dir())
        .env("RUSTFLAGS", RUSTFLAGS.join(" "))
        // No debug info: the build is part of CI's budget; panics still print their message.
        .env("CARGO_PROFILE_RELEASE_DEBUG", "0")
        .status()?;
    if !status.success() {
        return Err(format!("building the fuzz targets failed ({status})").into());
    }
    eprintln!("fuzz targets built in {:.0} s", t0.elapsed().as_secs_f64());
    Ok(target_dir().join(triple).join("release"))
}

/// Runs `target` for `seconds` (0: replay the corpus only) over the committed corpus, new
/// inputs going to `work` (never into the committed corpus). Progress lines go to stderr.
pub fn run_target(bin_dir: &Path, target: &str, seconds: u64, work: &Path) -> Res<RunStats> {
    check_target(target)?;
    let corpus = fuzz_dir().join("corpus").join(target);
    fs::create_dir_all(&corpus)?;
    fs::create_dir_all(work)?;
    let artifacts = target_dir().join("artifacts").join(target);
    fs::create_dir_all(&artifacts)?;
    let mut cmd = Command::new(bin_dir.join(target));
    cmd.arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg("-timeout=10")
        .arg("-rss_limit_mb=2048")
        .arg("-malloc_limit_mb=1024")
        .arg("-print_final_stats=1");
    let dict = fuzz_dir().join("dict").join(format!("{target}.dict"));
    if dict.is_file() {
        cmd.arg(format!("-dict={}", dict.display()));
    }
    if let Some(n) = max_len(target) {
        cmd.arg(format!("-max_len={n}"));
    }
    if seconds == 0 {
        cmd.arg("-runs=0");
    } else {
        cmd.arg(format!("-max_total_time={seconds}"));
    }
    cmd.arg(work).arg(&corpus);
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    let t0 = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {target}: {e}"))?;
    let stderr = child.stderr.take().expect("piped stderr");
    let mut st = RunStats {
        target: target.to_owned(),
        ..Default::default()
    };
    let mut last_print = Instant::now() - Duration::from_secs(60);
    let mut tail: Vec<String> = Vec::new();
    for line in BufReader::new(stderr).lines() {
        let line = line?;
        parse_line(&line, &mut st);
        // Progress: libFuzzer's status lines, at most one every 10 s; everything else only
        // if the run fails.
        let status_line = line.starts_with('#');
        if status_line && (last_print.elapsed() >= Duration::from_secs(10) || line.contains("DONE"))
        {
            eprintln!("  [{target}] {line}");
            last_print = Instant::now();
        }
        if !status_line {
            tail.push(line);
            if tail.len() > 60 {
                tail.remove(0);
            }
        }
    }
    let status = child.wait()?;
    st.seconds = t0.elapsed().as_secs_f64();
    if !status.success() {
        for l in &tail {
            eprintln!("  [{target}] {l}");
        }
        return Err(format!(
            "fuzz target {target} failed ({status}); the input is in {}",
            artifacts.display()
        )
        .into());
    }
    Ok(st)
}

/// Picks the figures out of one libFuzzer output line.
fn parse_line(line: &str, st: &mut RunStats) {
    let num = |s: &str| s.trim().parse::<u64>().unwrap_or(0);
    if let Some(v) = line.strip_prefix("stat::number_of_executed_units:") {
        st.execs = num(v);
    } else if let Some(v) = line.strip_prefix("stat::average_exec_per_sec:") {
        st.exec_per_sec = num(v);
    } else if let Some(v) = line.strip_prefix("stat::peak_rss_mb:") {
        st.peak_rss_mb = num(v);
    } else if line.starts_with('#') {
        let mut words = line.split_whitespace();
        while let Some(w) = words.next() {
            let next = words.clone().next().unwrap_or("");
            match w {
                "cov:" => st.cov = num(next),
                "ft:" => st.ft = num(next),
                "corp:" => st.corpus = num(next.split('/').next().unwrap_or("")),
                _ => {}
            }
        }
    }
}

/// Minimises the committed corpus of `target` together with `work` into the committed
/// directory.
fn merge(bin_dir: &Path, target: &str, work: &Path) -> Res<()> {
    let corpus = fuzz_dir().join("corpus").join(target);
    let merged = target_dir().join("merged").join(target);
    let _ = fs::remove_dir_all(&merged);
    fs::create_dir_all(&merged)?;
    let status = Command::new(bin_dir.join(target))
        .arg("-merge=1")
        .arg("-timeout=10")
        .arg(&merged)
        .arg(&corpus)
        .arg(work)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    if !status.success() {
        return Err(format!("merging the {target} corpus failed ({status})").into());
    }
    let n = fs::read_dir(&merged)?.count();
    if n == 0 {
        return Err(format!("merging the {target} corpus left nothing").into());
    }
    fs::remove_dir_all(&corpus)?;
    fs::create_dir_all(&corpus)?;
    for e in fs::read_dir(&merged)? {
        let e = e?;
        fs::copy(e.path(), corpus.join(e.file_name()))?;
    }
    eprintln!(
        "[{target}] corpus minimised to {n} inputs in {}",
        corpus.display()
    );
    Ok(())
}

fn print_stats(st: &RunStats) {
    eprintln!(
        "[{}] {} execs ({}/s) in {:.0} s, cov {} ft {}, corpus {}, peak RSS {} MB",
        st.target, st.execs, st.exec_per_sec, st.seconds, st.cov, st.ft, st.corpus, st.peak_rss_mb
    );
}

/// `cargo xtask fuzz ...`.
pub fn run(a: FuzzArgs) -> Res<std::process::ExitCode> {
    if a.list {
        for t in TARGETS {
            println!("{t}");
        }
        return Ok(std::process::ExitCode::SUCCESS);
    }
    let target = a.target.as_deref().unwrap_or_default();
    check_target(target)?;
    let bin_dir = build()?;
    let work = target_dir().join("corpus").join(target);
    let secs = if a.replay { 0 } else { a.time.max(1) };
    let st = run_target(&bin_dir, target, secs, &work)?;
    print_stats(&st);
    if a.merge {
        merge(&bin_dir, target, &work)?;
    }
    if a.json {
        println!("{}", serde_json::to_string(&st)?);
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// The fuzz step of `cargo xtask test`: build, then every target replays its committed
/// corpus and fuzzes for a short bounded time in a scratch directory.
pub fn ci_step() -> Res<()> {
    let secs = std::env::var("MILK_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(CI_SECONDS);
    let bin_dir = build()?;
    let scratch = target_dir().join("ci-corpus");
    let _ = fs::remove_dir_all(&scratch);
    for t in TARGETS {
        let st = run_target(&bin_dir, t, secs, &scratch.join(t))?;
        print_stats(&st);
    }
    let _ = fs::remove_dir_all(&scratch);
    Ok(())
}
