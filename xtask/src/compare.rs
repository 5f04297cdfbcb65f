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

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use milk_bench::plot::{spread_bars, SpreadBar};
use milk_harness::GuestSpec;
use milk_ivshmem::session::{run_milk_guest, MilkGuestConfig};
use serde::Serialize;
use virtio_milk::metrics::Summary;
use virtio_milk::protocol::AckStatus;

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
    /// Schedulers, comma separated: cfs, scx_test_fifo, milk:<policy> (default: all).
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
}

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

/// A number a workload reports.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct MetricSpec {
    /// Key in the results.
    pub key: &'static str,
    /// Unit, for the table.
    pub unit: &'static str,
    /// Whether a smaller value is better (wall times, latencies).
    pub lower_is_better: bool,
}

/// Metric values by key.
pub type Values = BTreeMap<String, f64>;

/// Reads a workload's metrics from the guest console.
pub type ParseFn = fn(&[String]) -> Result<Values, String>;

/// A fidelity column: its key and how to compute it.
type FidelityColumn = (&'static str, fn(&Fidelity) -> f64);

/// A workload: the guest command and how to read its result.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Short name (`--workloads`).
    pub name: &'static str,
    /// The guest shell command.
    pub command: String,
    /// What it reports; the first is the one plotted.
    pub metrics: &'static [MetricSpec],
    /// Reads the metrics from the console, or says why the run is invalid.
    pub parse: ParseFn,
}

const WALL_MS: &[MetricSpec] = &[MetricSpec {
    key: "wall_ms",
    unit: "ms",
    lower_is_better: true,
}];

/// Every workload, full length or `quick` (short smoke variants).
pub fn workloads(quick: bool) -> Vec<Workload> {
    let pick = |full: &str, short: &str| if quick { short } else { full }.to_string();
    vec![
        Workload {
            name: "milk-work",
            command: pick("milk-work -t 64 -r 20", "milk-work -t 16 -r 4"),
            metrics: WALL_MS,
            parse: parse_milk_work,
        },
        Workload {
            name: "hackbench",
            command: pick("hackbench -p -g 2 -l 200", "hackbench -p -g 2 -l 20"),
            metrics: &[MetricSpec {
                key: "time_s",
                unit: "s",
                lower_is_better: true,
            }],
            parse: parse_hackbench,
        },
        Workload {
            name: "cyclictest",
            command: {
                let (load, ct) = if quick {
                    (
                        "hackbench -p -g 1 -l 300",
                        "cyclictest -t1 -i 2000 -l 100 -q",
                    )
                } else {
                    (
                        "hackbench -p -g 1 -l 3000",
                        "cyclictest -t1 -i 2000 -l 500 -q",
                    )
                };
                // The load runs for the whole measurement (it is checked).
                format!(
                    "{load} >/dev/null 2>&1 & h=$!;{ct};c=$?;\
                     kill $h 2>/dev/null&&echo ct-load=running||echo ct-load=ended;[ $c = 0 ]"
                )
            },
            metrics: &[
                MetricSpec {
                    key: "avg_us",
                    unit: "us",
                    lower_is_better: true,
                },
                MetricSpec {
                    key: "max_us",
                    unit: "us",
                    lower_is_better: true,
                },
            ],
            parse: parse_cyclictest,
        },
        Workload {
            name: "e2e",
            command: pick(
                "milk-work -t 64 -r 20 -w 20000 -s 2000",
                "milk-work -t 16 -r 4 -w 20000 -s 2000",
            ),
            metrics: WALL_MS,
            parse: parse_milk_work,
        },
        Workload {
            name: "mix",
            command: pick("milk-mix -s 4", "milk-mix -s 1"),
            metrics: &[
                MetricSpec {
                    key: "forks_per_s",
                    unit: "/s",
                    lower_is_better: false,
                },
                MetricSpec {
                    key: "rtts_per_s",
                    unit: "/s",
                    lower_is_better: false,
                },
                MetricSpec {
                    key: "yields_per_s",
                    unit: "/s",
                    lower_is_better: false,
                },
            ],
            parse: parse_mix,
        },
    ]
}

/// `key=value` words of a line.
pub fn fields(line: &str) -> BTreeMap<&str, &str> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .collect()
}

fn field_num(f: &BTreeMap<&str, &str>, k: &str, line: &str) -> Result<f64, String> {
    f.get(k)
        .and_then(|v| v.parse::<f64>().ok())
        .ok_or_else(|| format!("no number {k}= in {line:?}"))
}

fn last_line<'a>(console: &'a [String], prefix: &str) -> Result<&'a str, String> {
    console
        .iter()
        .rev()
        .find_map(|l| l.find(prefix).map(|at| &l[at..]))
        .ok_or_else(|| format!("no {prefix:?} line on the console"))
}

/// `milk-work: threads=64 rounds=20 ok=64 bad=0 wakeups=... elapsed_ms=...`.
pub fn parse_milk_work(console: &[String]) -> Result<Values, String> {
    let line = last_line(console, "milk-work: threads=")?;
    let f = fields(line);
    let (threads, ok, bad) = (
        field_num(&f, "threads", line)?,
        field_num(&f, "ok", line)?,
        field_num(&f, "bad", line)?,
    );
    if bad != 0.0 || ok != threads {
        return Err(format!("milk-work failed its own check: {line}"));
    }
    Ok(BTreeMap::from([(
        "wall_ms".into(),
        field_num(&f, "elapsed_ms", line)?,
    )]))
}

/// hackbench's `Time: 0.512`.
pub fn parse_hackbench(console: &[String]) -> Result<Values, String> {
    let line = last_line(console, "Time: ")?;
    let t = line["Time: ".len()..]
        .split_whitespace()
        .next()
        .and_then(|v| v.parse::<f64>().ok())
        .ok_or_else(|| format!("bad hackbench time: {line:?}"))?;
    Ok(BTreeMap::from([("time_s".into(), t)]))
}

/// cyclictest's final `T: 0 (  123) P: 0 I:2000 C:    500 Min: .. Act: .. Avg: .. Max: ..`
/// (values in µs), and the load still running at its end.
pub fn parse_cyclictest(console: &[String]) -> Result<Values, String> {
    let line = last_line(console, "T: 0 ")?;
    let after = |key: &str| -> Result<f64, String> {
        let at = line
            .find(key)
            .ok_or_else(|| format!("no {key} in {line:?}"))?;
        line[at + key.len()..]
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .ok_or_else(|| format!("bad {key} in {line:?}"))
    };
    let count = after("C:")?;
    if count < 1.0 {
        return Err(format!("cyclictest measured nothing: {line}"));
    }
    if !console.iter().any(|l| l.contains("ct-load=running")) {
        return Err("the hackbench load ended before cyclictest did".into());
    }
    Ok(BTreeMap::from([
        ("avg_us".into(), after("Avg:")?),
        ("max_us".into(), after("Max:")?),
    ]))
}

/// `milk-mix: seconds=4 elapsed_ms=... yields=... forks=... pipe_rtts=... errors=0`.
pub fn parse_mix(console: &[String]) -> Result<Values, String> {
    let line = last_line(console, "milk-mix: seconds=")?;
    let f = fields(line);
    if field_num(&f, "errors", line)? != 0.0 {
        return Err(format!("milk-mix failed its own check: {line}"));
    }
    let secs = field_num(&f, "elapsed_ms", line)?.max(1.0) / 1000.0;
    Ok(BTreeMap::from([
        ("forks_per_s".into(), field_num(&f, "forks", line)? / secs),
        (
            "rtts_per_s".into(),
            field_num(&f, "pipe_rtts", line)? / secs,
        ),
        ("yields_per_s".into(), field_num(&f, "yields", line)? / secs),
    ]))
}

/// The guest the engines boot.
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

/// Fidelity counters of a milk run.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Fidelity {
    /// Guest: RUNs applied (`decisions_applied`).
    pub applied: u64,
    /// Guest: tasks the guest dispatched itself (`local_fallbacks`).
    pub fallbacks: u64,
    /// Host: decisions sent (RUN + PREEMPT).
    pub decisions: u64,
    /// Host: STALE + NOT_RUNNABLE + NO_TASK acks.
    pub rejected: u64,
    /// Host: decisions still without an ack when the run ended (each holds
    /// its CPU committed on the host).
    pub unacked: u64,
    /// Guest: times the bridge disabled itself (fallback to CFS).
    pub disables: u64,
    /// Host: decision -> applied p50, µs.
    pub apply_p50_us: f64,
}

impl Fidelity {
    /// fallbacks / applied, percent.
    pub fn fallback_pct(&self) -> f64 {
        pct(self.fallbacks, self.applied)
    }

    /// rejected / decisions, percent.
    pub fn rejected_pct(&self) -> f64 {
        pct(self.rejected, self.decisions)
    }
}

fn pct(a: u64, b: u64) -> f64 {
    if b == 0 {
        if a == 0 {
            0.0
        } else {
            100.0
        }
    } else {
        a as f64 * 100.0 / b as f64
    }
}

/// Fidelity from the guest's counters and the host summaries.
pub fn fidelity(guest: &BTreeMap<String, String>, host: &[Summary]) -> Fidelity {
    let g = |k: &str| guest.get(k).and_then(|v| v.parse().ok()).unwrap_or(0u64);
    let mut f = Fidelity {
        applied: g("decisions_applied"),
        fallbacks: g("local_fallbacks"),
        disables: g("disables"),
        ..Fidelity::default()
    };
    let mut apply = virtio_milk::metrics::Histogram::default();
    for s in host {
        let m = &s.metrics;
        let ack = |st: AckStatus| m.acks[st as usize];
        let decisions = m.decisions_run + m.decisions_preempt;
        f.decisions += decisions;
        f.rejected += ack(AckStatus::Stale) + ack(AckStatus::NotRunnable) + ack(AckStatus::NoTask);
        // Acks of the runtime's own decisions that resolved one.
        let own: u64 = m.acks_total() - m.injected_acks.iter().sum::<u64>();
        let resolved = own.saturating_sub(m.unmatched_acks);
        f.unacked += decisions.saturating_sub(resolved);
        apply.merge(&m.apply_latency);
    }
    f.apply_p50_us = apply.percentile(50.0) as f64 / 1e3;
    f
}

/// One boot's record.
#[derive(Debug, Clone, Serialize)]
pub struct RunRecord {
    /// Engine name.
    pub engine: String,
    /// Scheduler name.
    pub scheduler: String,
    /// Workload name.
    pub workload: String,
    /// Round (0-based).
    pub round: usize,
    /// Why the run does not count (None: it does).
    pub error: Option<String>,
    /// Workload metrics.
    pub metrics: BTreeMap<String, f64>,
    /// Fidelity counters (milk runs).
    pub fidelity: Option<Fidelity>,
    /// The guest's bridge counters as printed.
    pub bridge: BTreeMap<String, String>,
    /// Boot wall time, s.
    pub boot_s: f64,
}

/// Median and range.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Spread {
    /// Median.
    pub median: f64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
    /// Values.
    pub n: usize,
}

/// The spread of `v`, None if empty.
pub fn spread(v: &[f64]) -> Option<Spread> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let median = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    Some(Spread {
        median,
        min: s[0],
        max: s[n - 1],
        n,
    })
}

/// One configuration's statistics.
#[derive(Debug, Clone, Serialize)]
pub struct ConfigSummary {
    /// Engine.
    pub engine: String,
    /// Workload.
    pub workload: String,
    /// Scheduler.
    pub scheduler: String,
    /// Runs that counted / boots.
    pub ok_runs: usize,
    /// Boots.
    pub runs: usize,
    /// Per metric: the values' spread.
    pub metrics: BTreeMap<String, Spread>,
    /// Per metric: the spread of value / CFS's value in the same round.
    pub ratio_vs_cfs: BTreeMap<String, Spread>,
    /// Fidelity percentages and counts (milk runs): spread over runs.
    pub fidelity: BTreeMap<String, Spread>,
}

/// Builds every configuration's statistics from the records.
pub fn summarize(records: &[RunRecord], wls: &[Workload]) -> Vec<ConfigSummary> {
    let mut keys: Vec<(String, String, String)> = Vec::new();
    for r in records {
        let k = (r.engine.clone(), r.workload.clone(), r.scheduler.clone());
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    let mut out = Vec::new();
    for (engine, workload, scheduler) in keys {
        let mine: Vec<&RunRecord> = records
            .iter()
            .filter(|r| r.engine == engine && r.workload == workload && r.scheduler == scheduler)
            .collect();
        let good: Vec<&&RunRecord> = mine.iter().filter(|r| r.error.is_none()).collect();
        let baseline = |round: usize| {
            records.iter().find(|r| {
                r.engine == engine
                    && r.workload == workload
                    && r.scheduler == "cfs"
                    && r.round == round
                    && r.error.is_none()
            })
        };
        let specs = wls
            .iter()
            .find(|w| w.name == workload)
            .map(|w| w.metrics)
            .unwrap_or(&[]);
        let mut metrics = BTreeMap::new();
        let mut ratios = BTreeMap::new();
        for m in specs {
            let vals: Vec<f64> = good
                .iter()
                .filter_map(|r| r.metrics.get(m.key))
                .copied()
                .collect();
            if let Some(s) = spread(&vals) {
                metrics.insert(m.key.to_string(), s);
            }
            let rs: Vec<f64> = good
                .iter()
                .filter_map(|r| {
                    let v = r.metrics.get(m.key)?;
                    let b = baseline(r.round)?.metrics.get(m.key)?;
                    (*b > 0.0).then(|| v / b)
                })
                .collect();
            if let Some(s) = spread(&rs) {
                ratios.insert(m.key.to_string(), s);
            }
        }
        let mut fid = BTreeMap::new();
        let fs: Vec<&Fidelity> = good.iter().filter_map(|r| r.fidelity.as_ref()).collect();
        if !fs.is_empty() {
            let cols: [FidelityColumn; 5] = [
                ("fallback_pct", Fidelity::fallback_pct),
                ("rejected_pct", Fidelity::rejected_pct),
                ("unacked", |f| f.unacked as f64),
                ("disables", |f| f.disables as f64),
                ("apply_p50_us", |f| f.apply_p50_us),
            ];
            for (k, get) in cols {
                let v: Vec<f64> = fs.iter().map(|f| get(f)).collect();
                if let Some(s) = spread(&v) {
                    fid.insert(k.to_string(), s);
                }
            }
        }
        out.push(ConfigSummary {
            engine,
            workload,
            scheduler,
            ok_runs: good.len(),
            runs: mine.len(),
            metrics,
            ratio_vs_cfs: ratios,
            fidelity: fid,
        });
    }
    out
}

/// Where and how the run was made.
#[derive(Debug, Clone, Serialize)]
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
    }
}

/// Everything `--json` prints and results.json holds.
#[derive(Debug, Clone, Serialize)]
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

/// Runs the benchmark: boots, table, results.json, plots.
pub fn run(args: &CompareArgs) -> Result<Results, CompareError> {
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
    let scheds = select(
        Scheduler::all(),
        &args.schedulers,
        Scheduler::name,
        CompareError::UnknownScheduler,
    )?;
    if !scheds.contains(&Scheduler::Cfs) {
        return Err(CompareError::NoBaseline);
    }
    let all_engines = engines();
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
    let mut records = Vec::new();
    let mut n = 0;
    for round in 0..runs {
        for w in &wls {
            for e in &engs {
                // Rotate the order each round: no scheduler always runs first.
                let mut order = scheds.clone();
                order.rotate_left(round % scheds.len());
                for s in &order {
                    n += 1;
                    let rec = one_boot(&guest, e.as_ref(), s, w, round, args, &logs, &mut mach);
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
                }
            }
        }
    }
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

#[allow(clippy::too_many_arguments)]
fn one_boot(
    guest: &Guest,
    engine: &dyn Engine,
    sched: &Scheduler,
    w: &Workload,
    round: usize,
    args: &CompareArgs,
    logs: &Path,
    mach: &mut Machine,
) -> RunRecord {
    let mut rec = RunRecord {
        engine: engine.name().into(),
        scheduler: sched.name(),
        workload: w.name.into(),
        round,
        error: None,
        metrics: BTreeMap::new(),
        fidelity: None,
        bridge: BTreeMap::new(),
        boot_s: 0.0,
    };
    let log = logs.join(format!(
        "{}-{}-{}-{round}.log",
        engine.name(),
        w.name,
        sched.name().replace(':', "-")
    ));
    let cmdline = format!("milk.run=\"{}\"", guest_script(sched, &w.command));
    let boot = match engine.boot(
        guest,
        sched,
        &cmdline,
        Duration::from_secs(args.timeout),
        &log,
    ) {
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
        rec.fidelity = Some(fidelity(&rec.bridge, &boot.summaries));
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

fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a >= 1000.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn fmt_spread(s: Option<&Spread>) -> String {
    match s {
        Some(s) => format!(
            "{} [{}-{}]",
            fmt_num(s.median),
            fmt_num(s.min),
            fmt_num(s.max)
        ),
        None => "-".into(),
    }
}

fn fmt_ratio(s: Option<&Spread>) -> String {
    match s {
        Some(s) => format!("{:.2} [{:.2}-{:.2}]", s.median, s.min, s.max),
        None => "-".into(),
    }
}

/// The human-readable table (markdown, one section per engine and workload).
pub fn render_table(r: &Results, wls: &[Workload]) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "\nScheduler comparison: {} round(s), medians [min-max]; x cfs = value / CFS's in the same round \
         (median [min-max] of the per-round ratios)\n",
        r.runs
    );
    let mut engines: Vec<&str> = Vec::new();
    for s in &r.summary {
        if !engines.contains(&s.engine.as_str()) {
            engines.push(&s.engine);
        }
    }
    for eng in engines {
        for w in wls {
            let rows: Vec<&ConfigSummary> = r
                .summary
                .iter()
                .filter(|s| s.engine == eng && s.workload == w.name)
                .collect();
            if rows.is_empty() {
                continue;
            }
            let _ = writeln!(t, "### {eng}: {} (`{}`)\n", w.name, w.command);
            let mut head = "| scheduler | ok |".to_string();
            let mut rule = "|---|---|".to_string();
            for m in w.metrics {
                let better = if m.lower_is_better { "lower" } else { "higher" };
                let _ = write!(
                    head,
                    " {} ({}, {better} is better) | x cfs |",
                    m.key, m.unit
                );
                rule.push_str("---|---|");
            }
            head.push_str(
                " fallbacks/applied % | STALE+NR+NO_TASK / decisions % | unacked at end |",
            );
            rule.push_str("---|---|---|");
            let _ = writeln!(t, "{head}\n{rule}");
            for s in rows {
                let mut line = format!("| {} | {}/{} |", s.scheduler, s.ok_runs, s.runs);
                for m in w.metrics {
                    let _ = write!(
                        line,
                        " {} | {} |",
                        fmt_spread(s.metrics.get(m.key)),
                        fmt_ratio(s.ratio_vs_cfs.get(m.key))
                    );
                }
                let _ = write!(
                    line,
                    " {} | {} | {} |",
                    fmt_spread(s.fidelity.get("fallback_pct")),
                    fmt_spread(s.fidelity.get("rejected_pct")),
                    fmt_spread(s.fidelity.get("unacked"))
                );
                let _ = writeln!(t, "{line}");
            }
            t.push('\n');
        }
    }
    let failed: Vec<&RunRecord> = r.records.iter().filter(|x| x.error.is_some()).collect();
    if !failed.is_empty() {
        let _ = writeln!(t, "Boots that did not count:");
        for f in failed {
            let _ = writeln!(
                t,
                "- {} {} {} round {}: {}",
                f.engine,
                f.workload,
                f.scheduler,
                f.round + 1,
                f.error.as_deref().unwrap_or("")
            );
        }
    }
    t
}

/// compare-<engine>-<workload>.svg (each workload's first metric, absolute)
/// and compare-ratios-<engine>.svg (every metric against CFS).
pub fn write_plots(r: &Results, wls: &[Workload], dir: &Path) -> Result<(), CompareError> {
    std::fs::create_dir_all(dir).map_err(|e| CompareError::Io(dir.to_path_buf(), e))?;
    let mut engines: Vec<&str> = Vec::new();
    for s in &r.summary {
        if !engines.contains(&s.engine.as_str()) {
            engines.push(&s.engine);
        }
    }
    let bar = |label: String, s: &Spread| SpreadBar {
        label,
        median: s.median,
        min: s.min,
        max: s.max,
    };
    for eng in engines {
        let mut ratios = Vec::new();
        for w in wls {
            let rows: Vec<&ConfigSummary> = r
                .summary
                .iter()
                .filter(|s| s.engine == eng && s.workload == w.name)
                .collect();
            if rows.is_empty() {
                continue;
            }
            let m = &w.metrics[0];
            let bars: Vec<SpreadBar> = rows
                .iter()
                .filter_map(|s| Some(bar(s.scheduler.clone(), s.metrics.get(m.key)?)))
                .collect();
            if !bars.is_empty() {
                let better = if m.lower_is_better { "lower" } else { "higher" };
                spread_bars(
                    &dir.join(format!("compare-{eng}-{}.svg", w.name)),
                    &format!(
                        "{}: {} ({eng}, median of {} runs, whiskers min-max)",
                        w.name, w.command, r.runs
                    ),
                    &format!("{} in {}, log scale ({better} is better)", m.key, m.unit),
                    &bars,
                    None,
                    None,
                )?;
            }
            for m in w.metrics {
                for s in rows.iter().filter(|s| s.scheduler != "cfs") {
                    if let Some(x) = s.ratio_vs_cfs.get(m.key) {
                        ratios.push(bar(format!("{} {} {}", w.name, m.key, s.scheduler), x));
                    }
                }
            }
        }
        if !ratios.is_empty() {
            spread_bars(
                &dir.join(format!("compare-ratios-{eng}.svg")),
                &format!(
                    "Against CFS in the same round ({eng}, median of {} rounds, whiskers min-max; red line: CFS)",
                    r.runs
                ),
                "value / CFS's value, log scale (times and latencies: lower is better; rates: higher is better)",
                &ratios,
                None,
                Some(1.0),
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn workload_outputs_parse_and_failures_are_rejected() {
        let m = parse_milk_work(&lines(&[
            "milk-work: start pid=1 threads=64",
            "milk-work: threads=64 rounds=20 ok=64 bad=0 wakeups=1280 elapsed_ms=321",
        ]))
        .unwrap();
        assert_eq!(m["wall_ms"], 321.0);
        assert!(parse_milk_work(&lines(&[
            "milk-work: threads=64 rounds=20 ok=63 bad=1 wakeups=1280 elapsed_ms=321"
        ]))
        .is_err());
        assert!(parse_milk_work(&[]).is_err());

        let h = parse_hackbench(&lines(&[
            "Running in process mode with 2 groups",
            "Time: 0.512",
        ]))
        .unwrap();
        assert_eq!(h["time_s"], 0.512);

        let ct = "T: 0 (  123) P: 0 I: 2000 C:    500 Min:     12 Act:   50 Avg:   80 Max:     900";
        let c = parse_cyclictest(&lines(&[ct, "ct-load=running"])).unwrap();
        assert_eq!((c["avg_us"], c["max_us"]), (80.0, 900.0));
        // A load that ended early makes the latency an unloaded one.
        assert!(parse_cyclictest(&lines(&[ct, "ct-load=ended"])).is_err());

        let mix = "milk-mix: seconds=4 elapsed_ms=4000 yields=8000 forks=800 pipe_rtts=40000 \
                   yield0=1 yield1=2 fork0=3 fork1=4 pipe0=5 pipe1=6 errors=0";
        let x = parse_mix(&lines(&[mix])).unwrap();
        assert_eq!(x["forks_per_s"], 200.0);
        assert_eq!(x["rtts_per_s"], 10000.0);
        assert_eq!(x["yields_per_s"], 2000.0);
        assert!(parse_mix(&lines(&[&mix.replace("errors=0", "errors=1")])).is_err());
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

    fn rec(sched: &str, round: usize, v: f64, err: bool) -> RunRecord {
        RunRecord {
            engine: "qemu".into(),
            scheduler: sched.into(),
            workload: "hackbench".into(),
            round,
            error: err.then(|| "boom".into()),
            metrics: BTreeMap::from([("time_s".into(), v)]),
            fidelity: None,
            bridge: BTreeMap::new(),
            boot_s: 1.0,
        }
    }

    #[test]
    fn ratios_pair_each_run_with_cfs_of_the_same_round() {
        let records = vec![
            rec("cfs", 0, 1.0, false),
            rec("milk:fifo", 0, 3.0, false),
            rec("cfs", 1, 2.0, false),
            rec("milk:fifo", 1, 2.0, false),
            rec("cfs", 2, 1.0, true),
            rec("milk:fifo", 2, 9.0, false),
        ];
        let s = summarize(&records, &workloads(false));
        let milk = s.iter().find(|c| c.scheduler == "milk:fifo").unwrap();
        assert_eq!((milk.ok_runs, milk.runs), (3, 3));
        assert_eq!(milk.metrics["time_s"].median, 3.0);
        // Round 2's CFS failed: no ratio for that round.
        let r = milk.ratio_vs_cfs["time_s"];
        assert_eq!((r.n, r.min, r.max, r.median), (2, 1.0, 3.0, 2.0));
        let cfs = s.iter().find(|c| c.scheduler == "cfs").unwrap();
        assert_eq!((cfs.ok_runs, cfs.runs), (2, 3));
        assert_eq!(cfs.ratio_vs_cfs["time_s"].median, 1.0);
    }

    #[test]
    fn spread_is_median_and_range() {
        assert_eq!(spread(&[]), None);
        let s = spread(&[3.0, 1.0, 2.0, 10.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.5, 1.0, 10.0, 4));
        assert_eq!(spread(&[5.0]).unwrap().median, 5.0);
    }

    #[test]
    fn fidelity_percentages_handle_zero_denominators() {
        let f = Fidelity {
            applied: 200,
            fallbacks: 2,
            decisions: 0,
            rejected: 0,
            ..Fidelity::default()
        };
        assert_eq!(f.fallback_pct(), 1.0);
        assert_eq!(f.rejected_pct(), 0.0);
        let g = Fidelity {
            applied: 0,
            fallbacks: 5,
            ..Fidelity::default()
        };
        assert_eq!(g.fallback_pct(), 100.0);
        let counters = BTreeMap::from([
            ("decisions_applied".to_string(), "10".to_string()),
            ("local_fallbacks".to_string(), "1".to_string()),
        ]);
        let h = fidelity(&counters, &[]);
        assert_eq!(
            (h.applied, h.fallbacks, h.decisions, h.unacked),
            (10, 1, 0, 0)
        );
    }

    #[test]
    fn table_and_plots_come_from_the_summary() {
        let wls = workloads(false);
        let records = vec![
            rec("cfs", 0, 1.0, false),
            rec("milk:fifo", 0, 3.0, false),
            rec("scx_test_fifo", 0, 1.5, true),
        ];
        let r = Results {
            machine: machine(),
            runs: 1,
            quick: false,
            workloads: BTreeMap::new(),
            skipped_engines: BTreeMap::new(),
            summary: summarize(&records, &wls),
            records,
        };
        let t = render_table(&r, &wls);
        assert!(t.contains("### qemu: hackbench"), "{t}");
        assert!(
            t.contains("| milk:fifo | 1/1 | 3.00 [3.00-3.00] | 3.00 [3.00-3.00] |"),
            "{t}"
        );
        assert!(t.contains("| scx_test_fifo | 0/1 | - | - |"), "{t}");
        assert!(
            t.contains("- qemu hackbench scx_test_fifo round 1: boom"),
            "{t}"
        );
        let dir = std::env::temp_dir().join(format!("milk-compare-test-{}", std::process::id()));
        write_plots(&r, &wls, &dir).unwrap();
        for f in ["compare-qemu-hackbench.svg", "compare-ratios-qemu.svg"] {
            let svg = std::fs::read_to_string(dir.join(f)).unwrap();
            assert!(svg.contains("milk:fifo"), "{f}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["summary"][1]["ratio_vs_cfs"]["time_s"]["median"], 3.0);
    }
}
