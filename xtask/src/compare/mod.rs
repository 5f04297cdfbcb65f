//! `cargo xtask compare`: CFS, the in-kernel `scx_test_fifo` and milk with
//! every host policy of `milk-policies`, side by side on the same workloads.
//!
//! Every measurement is one fresh guest boot (2 vCPUs, 256 MiB, the test
//! initramfs with rt-tests). Boots are interleaved: round 1 of every
//! (workload, engine, scheduler), then round 2, ..., with the scheduler
//! order rotated each round, so a change in the machine's load spreads over
//! all configurations instead of landing on one. The report gives, per
//! configuration, the median and min–max of each metric, the ratio to CFS
//! of the same round and workload (median and min–max of the per-round
//! ratios), and the fidelity counters of the milk runs: guest fallbacks
//! against applied RUNs, STALE + NOT_RUNNABLE + NO_TASK acks against
//! decisions, and decisions still unacknowledged when the run ended (a CPU
//! the host holds committed).
//!
//! Engines are listed by [`engines`]; one that cannot run here is reported
//! and skipped.

mod engine;
mod report;
mod stats;
mod workload;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use engine::{bridge_counters, check_scheduler, guest_script};
use engine::{engines, Boot, BootRequest, Engine, Guest, Scheduler};
use report::{render_table, write_plots};
use stats::{fidelity, summarize, ConfigSummary, RunRecord};
use workload::fields;
use workload::{workloads, Workload};

/// Errors that stop the benchmark (a failed boot does not: it is recorded).
#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    /// `--workloads` named an unknown workload.
    #[error("unknown workload {0:?} (known: {1})")]
    UnknownWorkload(String, String),
    /// `--schedulers` named an unknown scheduler.
    #[error("unknown scheduler {0:?} (known: {1})")]
    UnknownScheduler(String, String),
    /// `--engines` named an unknown engine.
    #[error("unknown engine {0:?} (known: {1})")]
    UnknownEngine(String, String),
    /// No selected engine can run on this machine.
    #[error("no engine can run here: {0}")]
    NoEngine(String),
    /// `--runs 0`.
    #[error("--runs must be at least 1")]
    NoRuns,
    /// CFS is the baseline of every ratio.
    #[error("--schedulers must include cfs (the baseline of the ratios)")]
    NoBaseline,
    /// Building the guest kernel or the test initramfs failed.
    #[error("building the guest: {0}")]
    Guest(String),
    /// A results file could not be written.
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    /// Serialising the results failed.
    #[error("results JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// Drawing a plot failed.
    #[error(transparent)]
    Plot(#[from] milk_bench::plot::PlotError),
}

/// `cargo xtask compare` options.
#[derive(clap::Args, Debug, Clone)]
pub struct CompareArgs {
    /// Boots per (engine, scheduler, workload).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Smoke run: one boot each, shortened workloads.
    #[arg(long)]
    pub quick: bool,
    /// Workloads to run, comma separated (default: all).
    #[arg(long, value_delimiter = ',')]
    pub workloads: Vec<String>,
    /// Schedulers, comma separated: cfs, scx_test_fifo, milk:<policy> (default:
    /// all), or milk:<policy>:<key>=<value> for a policy with one parameter set.
    #[arg(long, value_delimiter = ',')]
    pub schedulers: Vec<String>,
    /// Engines, comma separated (default: every engine available here).
    #[arg(long, value_delimiter = ',')]
    pub engines: Vec<String>,
    /// Per-boot timeout in seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// Directory for results.json, the per-boot console logs and the plots.
    #[arg(long, default_value = "target/compare")]
    pub out: PathBuf,
    /// Directory for the SVG plots (default: --out).
    #[arg(long)]
    pub plots: Option<PathBuf>,
    /// Print the results as JSON on stdout (the table then goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Boot nothing: rebuild the table and plots from a results.json of an
    /// earlier run (its statistics are recomputed from its records).
    #[arg(long, value_name = "RESULTS_JSON")]
    pub from: Option<PathBuf>,
}

/// Where and how the run was made.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    /// Host `uname -srm`.
    pub host: String,
    /// CPU model.
    pub cpu: String,
    /// Online CPUs.
    pub cpus: usize,
    /// QEMU version line.
    pub qemu: String,
    /// Guest kernel as it reported itself.
    pub guest_kernel: String,
    /// This checkout's commit.
    pub commit: String,
    /// UTC start time.
    pub started: String,
    /// `/proc/loadavg` (1, 5, 15 min) at the start.
    #[serde(default)]
    pub load_start: String,
    /// `/proc/loadavg` at the end.
    #[serde(default)]
    pub load_end: String,
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|t| t.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn cmd_line(prog: &str, args: &[&str]) -> String {
    Command::new(prog)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

fn machine() -> Machine {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default();
    Machine {
        host: cmd_line("uname", &["-srm"]),
        cpu,
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        qemu: cmd_line(milk_harness::QEMU, &["--version"]),
        guest_kernel: String::new(),
        commit: cmd_line("git", &["rev-parse", "--short=12", "HEAD"]),
        started: cmd_line("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        load_start: loadavg(),
        load_end: String::new(),
    }
}

/// Everything `--json` prints and results.json holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    /// The machine.
    pub machine: Machine,
    /// Boots per configuration.
    pub runs: usize,
    /// Smoke run (shortened workloads).
    pub quick: bool,
    /// Workload commands by name.
    pub workloads: BTreeMap<String, String>,
    /// Engines skipped, with the reason.
    pub skipped_engines: BTreeMap<String, String>,
    /// Statistics per configuration.
    pub summary: Vec<ConfigSummary>,
    /// Every boot.
    pub records: Vec<RunRecord>,
}

fn select<T: Clone>(
    all: Vec<T>,
    want: &[String],
    name: impl Fn(&T) -> String,
    err: fn(String, String) -> CompareError,
) -> Result<Vec<T>, CompareError> {
    if want.is_empty() {
        return Ok(all);
    }
    want.iter()
        .map(|w| {
            all.iter().find(|x| name(x) == *w).cloned().ok_or_else(|| {
                err(
                    w.clone(),
                    all.iter().map(&name).collect::<Vec<_>>().join(", "),
                )
            })
        })
        .collect()
}

/// `--from`: the table and plots of a saved run.
fn replot(args: &CompareArgs, file: &Path) -> Result<Results, CompareError> {
    let text =
        std::fs::read_to_string(file).map_err(|e| CompareError::Io(file.to_path_buf(), e))?;
    let mut r: Results = serde_json::from_str(&text)?;
    let wls: Vec<Workload> = workloads(r.quick)
        .into_iter()
        .filter(|w| r.workloads.contains_key(w.name))
        .collect();
    r.summary = summarize(&r.records, &wls);
    let plots = args.plots.clone().unwrap_or_else(|| args.out.clone());
    write_plots(&r, &wls, &plots)?;
    let table = render_table(&r, &wls);
    if args.json {
        eprint!("{table}");
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print!("{table}");
    }
    Ok(r)
}

/// The schedulers of `--schedulers`: listed names, or `milk:SPEC` with any
/// policy spec `milk_policies::by_name` accepts (e.g. a parameter variant).
fn select_schedulers(want: &[String]) -> Result<Vec<Scheduler>, CompareError> {
    let all = Scheduler::all();
    if want.is_empty() {
        return Ok(all);
    }
    want.iter()
        .map(|w| {
            if let Some(s) = all.iter().find(|s| s.name() == *w) {
                return Ok(s.clone());
            }
            match w.strip_prefix("milk:") {
                // `into_iter` reads an Option and a Result alike.
                Some(spec) if milk_policies::by_name(spec).into_iter().next().is_some() => {
                    Ok(Scheduler::Milk(spec.to_string()))
                }
                _ => Err(CompareError::UnknownScheduler(
                    w.clone(),
                    all.iter()
                        .map(Scheduler::name)
                        .collect::<Vec<_>>()
                        .join(", "),
                )),
            }
        })
        .collect()
}

/// Runs the benchmark: boots, table, results.json, plots.
pub fn run(args: &CompareArgs) -> Result<Results, CompareError> {
    if let Some(file) = &args.from {
        return replot(args, file);
    }
    let runs = if args.quick { 1 } else { args.runs };
    if runs == 0 {
        return Err(CompareError::NoRuns);
    }
    let wls = select(
        workloads(args.quick),
        &args.workloads,
        |w| w.name.to_string(),
        CompareError::UnknownWorkload,
    )?;
    let scheds = select_schedulers(&args.schedulers)?;
    if !scheds.contains(&Scheduler::Cfs) {
        return Err(CompareError::NoBaseline);
    }
    let all_engines = engines(&crate::workspace_root());
    let names: Vec<&str> = all_engines.iter().map(|e| e.name()).collect();
    for e in &args.engines {
        if !names.contains(&e.as_str()) {
            return Err(CompareError::UnknownEngine(e.clone(), names.join(", ")));
        }
    }
    let mut skipped = BTreeMap::new();
    let mut engs: Vec<Box<dyn Engine>> = Vec::new();
    for e in all_engines {
        if !args.engines.is_empty() && !args.engines.iter().any(|n| n == e.name()) {
            continue;
        }
        match e.unavailable() {
            Some(why) => {
                eprintln!("[compare] engine {} skipped: {why}", e.name());
                skipped.insert(e.name().to_string(), why);
            }
            None => engs.push(e),
        }
    }
    if engs.is_empty() {
        let why: Vec<String> = skipped.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        return Err(CompareError::NoEngine(why.join("; ")));
    }

    let kernel =
        milk_guest_kernel::ensure_built().map_err(|e| CompareError::Guest(e.to_string()))?;
    let initrd =
        milk_images::ensure_test_initramfs().map_err(|e| CompareError::Guest(e.to_string()))?;
    let guest = Guest {
        vmlinux: kernel.vmlinux.clone(),
        bzimage: kernel.bzimage.clone(),
        initrd,
    };
    let logs = args.out.join("logs");
    std::fs::create_dir_all(&logs).map_err(|e| CompareError::Io(logs.clone(), e))?;
    let mut mach = machine();

    let total = runs * wls.len() * engs.len() * scheds.len();
    eprintln!(
        "[compare] {total} boots: {runs} round(s) x {} workload(s) x {} engine(s) x {} scheduler(s) ({}); logs in {}",
        wls.len(),
        engs.len(),
        scheds.len(),
        scheds.iter().map(Scheduler::name).collect::<Vec<_>>().join(", "),
        logs.display()
    );
    let t0 = Instant::now();
    let timeout = Duration::from_secs(args.timeout);
    let mut records = Vec::new();
    let mut n = 0;
    for round in 0..runs {
        // Rotate the order each round: no scheduler always runs first.
        let mut order = scheds.clone();
        order.rotate_left(round % scheds.len());
        for e in &engs {
            // One batch per engine and round: every workload under every scheduler.
            let jobs: Vec<(&Workload, &Scheduler)> = wls
                .iter()
                .flat_map(|w| order.iter().map(move |s| (w, s)))
                .collect();
            let reqs: Vec<BootRequest> = jobs
                .iter()
                .map(|(w, s)| BootRequest {
                    sched: (*s).clone(),
                    cmdline: format!("milk.run=\"{}\"", guest_script(s, &w.command)),
                    log: logs.join(format!(
                        "{}-{}-{}-{round}.log",
                        e.name(),
                        w.name,
                        s.name().replace([':', '=', ','], "-")
                    )),
                })
                .collect();
            // Boots that never reached /init (under TCG on a loaded host the
            // guest kernel's IO-APIC timer check fails now and then) are
            // boot failures, not measurements: they are made again.
            let mut todo: Vec<usize> = (0..reqs.len()).collect();
            let mut tries = vec![0u32; reqs.len()];
            while !todo.is_empty() {
                let batch: Vec<BootRequest> = todo.iter().map(|&i| reqs[i].clone()).collect();
                let mut again = Vec::new();
                e.boot_all(&guest, &batch, timeout, &mut |k, res| {
                    let i = todo[k];
                    let (w, s) = jobs[i];
                    if let Ok(b) = &res {
                        if !reached_init(b) && tries[i] < BOOT_RETRIES {
                            tries[i] += 1;
                            eprintln!(
                                "[compare] {} {} {} round {}: the guest did not reach /init ({}); booting again",
                                e.name(),
                                w.name,
                                s.name(),
                                round + 1,
                                first_panic(b).unwrap_or("no panic line")
                            );
                            again.push(i);
                            return;
                        }
                    }
                    let mut rec = record(e.name(), s, w, round, &reqs[i].log, res, &mut mach);
                    rec.retries = tries[i];
                    n += 1;
                    let eta = t0.elapsed().as_secs_f64() / n as f64 * (total - n) as f64;
                    let what = match &rec.error {
                        None => rec
                            .metrics
                            .iter()
                            .map(|(k, v)| format!("{k}={v:.3}"))
                            .collect::<Vec<_>>()
                            .join(" "),
                        Some(err) => format!("FAILED: {err}"),
                    };
                    eprintln!(
                        "[compare {n}/{total}] {} {} {} round {}/{runs}: {what} (boot {:.1} s, ~{:.0} s left)",
                        e.name(),
                        w.name,
                        s.name(),
                        round + 1,
                        rec.boot_s,
                        eta
                    );
                    records.push(rec);
                });
                todo = again;
            }
        }
    }
    mach.load_end = loadavg();
    let summary = summarize(&records, &wls);
    let results = Results {
        machine: mach,
        runs,
        quick: args.quick,
        workloads: wls
            .iter()
            .map(|w| (w.name.to_string(), w.command.clone()))
            .collect(),
        skipped_engines: skipped,
        summary,
        records,
    };
    let json = serde_json::to_string_pretty(&results)?;
    let file = args.out.join("results.json");
    std::fs::write(&file, &json).map_err(|e| CompareError::Io(file.clone(), e))?;
    let plots = args.plots.clone().unwrap_or_else(|| args.out.clone());
    write_plots(&results, &wls, &plots)?;
    let table = render_table(&results, &wls);
    if args.json {
        eprint!("{table}");
        println!("{json}");
    } else {
        print!("{table}");
    }
    eprintln!(
        "[compare] {} in {:.0} s; results {}, plots in {}",
        if results.records.iter().all(|r| r.error.is_none()) {
            "all boots counted"
        } else {
            "some boots failed (see the table's ok column and results.json)"
        },
        t0.elapsed().as_secs_f64(),
        file.display(),
        plots.display()
    );
    Ok(results)
}

/// Boots of one measurement that never reached /init, made again before
/// the measurement counts as failed.
const BOOT_RETRIES: u32 = 2;

/// True if the guest's /init ran (it prints `MILK-BOOT ...` first).
fn reached_init(b: &Boot) -> bool {
    b.console.iter().any(|l| l.contains("MILK-BOOT "))
}

/// The guest kernel's panic message, if it printed one.
fn first_panic(b: &Boot) -> Option<&str> {
    b.console.iter().find_map(|l| {
        l.find("Kernel panic - not syncing: ")
            .map(|at| &l[at + 28..])
    })
}

/// The record of one boot's result.
fn record(
    engine: &str,
    sched: &Scheduler,
    w: &Workload,
    round: usize,
    log: &Path,
    res: Result<Boot, String>,
    mach: &mut Machine,
) -> RunRecord {
    let mut rec = RunRecord {
        engine: engine.into(),
        scheduler: sched.name(),
        workload: w.name.into(),
        round,
        error: None,
        metrics: BTreeMap::new(),
        fidelity: None,
        bridge: BTreeMap::new(),
        boot_s: 0.0,
        retries: 0,
    };
    let boot = match res {
        Ok(b) => b,
        Err(e) => {
            rec.error = Some(e.lines().next().unwrap_or("boot failed").to_string());
            return rec;
        }
    };
    rec.boot_s = boot.wall.as_secs_f64();
    if mach.guest_kernel.is_empty() {
        if let Some(l) = boot.console.iter().find(|l| l.contains("MILK-BOOT ")) {
            mach.guest_kernel = fields(l).get("kernel").unwrap_or(&"").to_string();
        }
    }
    rec.bridge = bridge_counters(&boot.console);
    if matches!(sched, Scheduler::Milk(_)) {
        rec.fidelity = Some(fidelity(&rec.bridge, boot.host.as_ref()));
    }
    let checked = match boot.status {
        Some(0) => check_scheduler(sched, &boot.console).and_then(|_| (w.parse)(&boot.console)),
        Some(s) => Err(format!("guest command exited {s} (log {})", log.display())),
        None => Err(format!("no result line (log {})", log.display())),
    };
    match checked {
        Ok(m) => rec.metrics = m,
        Err(e) => rec.error = Some(e),
    }
    rec
}
