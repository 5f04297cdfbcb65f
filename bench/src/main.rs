//! `milk-bench`: prints a side-by-side table of kernel <-> user-space
//! channels (one-way latency percentiles, streaming throughput, CPU per
//! message, run-to-run spread); optionally writes raw JSON and SVG plots.

use clap::Parser;
use milk_bench::channels::{self, ChannelOpts};
use milk_bench::report::{self, Environment, Report};
use milk_bench::runner::{smoke_config, RunConfig};
use milk_bench::{clock, plot, suite, sys};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Args {
    /// Runs per channel (run-to-run spread needs at least 5).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Recorded latency messages per run.
    #[arg(long, default_value_t = 3000)]
    lat_msgs: u64,
    /// Warm-up messages per run (not recorded).
    #[arg(long, default_value_t = 200)]
    warmup: u64,
    /// Duration bound of each throughput phase, ms.
    #[arg(long, default_value_t = 150)]
    tput_ms: u64,
    /// Message bound of each throughput phase.
    #[arg(long, default_value_t = 2_000_000)]
    tput_max: u64,
    /// Only channels whose name contains one of these (comma separated).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// CPU of the sending thread.
    #[arg(long, default_value_t = 0)]
    sender_cpu: usize,
    /// CPU of the receiving thread (and of kernel polling threads).
    #[arg(long, default_value_t = 1)]
    receiver_cpu: usize,
    /// Write raw results (all samples) as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write SVG plots (latency CDFs, throughput bars) into this directory.
    #[arg(long)]
    plots: Option<PathBuf>,
    /// Idle gap before each latency message, µs, as MIN,MAX (0,0 = ping-pong).
    #[arg(long, value_delimiter = ',', default_values_t = [20u64, 60])]
    gap_us: Vec<u64>,
    /// Run the sender/receiver threads SCHED_FIFO at this priority.
    #[arg(long)]
    fifo: Option<i32>,
    /// Tiny N, one run: a quick check for CI.
    #[arg(long)]
    smoke: bool,
    /// List the channels and exit.
    #[arg(long)]
    list: bool,
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = Args::parse();
    if args.gap_us.len() != 2 || args.gap_us[0] > args.gap_us[1] {
        eprintln!("milk-bench: --gap-us takes MIN,MAX with MIN <= MAX (e.g. 20,60)");
        std::process::exit(2);
    }
    let ncpu = sys::online_cpus();
    let pin = ncpu >= 2;
    let (sender_cpu, receiver_cpu) = if pin {
        (Some(args.sender_cpu), Some(args.receiver_cpu))
    } else {
        (None, None)
    };
    let (cfg, runs) = if args.smoke {
        (smoke_config(), 1)
    } else {
        (
            RunConfig {
                warmup: args.warmup,
                lat_msgs: args.lat_msgs.max(1),
                tput_max_msgs: args.tput_max.max(1),
                tput_ms: args.tput_ms,
                timeout: Duration::from_secs(10),
                gap_ns: (
                    args.gap_us.first().copied().unwrap_or(0) * 1000,
                    args.gap_us.get(1).copied().unwrap_or(0) * 1000,
                ),
                ..RunConfig::default()
            },
            args.runs.max(1),
        )
    };
    let cfg = RunConfig {
        sender_cpu,
        receiver_cpu,
        fifo_priority: args.fifo,
        ..cfg
    };
    let opts = ChannelOpts {
        poll_cpu: receiver_cpu.map(|c| c as u32),
    };
    let mut chans = channels::all(&opts);
    if !args.only.is_empty() {
        chans.retain(|c| {
            let n = c.name().to_lowercase();
            args.only.iter().any(|f| n.contains(&f.to_lowercase()))
        });
    }
    if args.list {
        for c in &chans {
            println!("{:<30} {}", c.name(), c.describe());
        }
        return;
    }
    let env = Environment {
        kernel: kernel(),
        cpus: ncpu,
        cpu_model: cpu_model(),
        clock: "CLOCK_MONOTONIC_RAW (vDSO)".into(),
        clocksource: clock::clocksource(),
        clock_read_ns: clock::clock_overhead_ns(),
        sender_cpu,
        receiver_cpu,
        runs,
        warmup: cfg.warmup,
        lat_msgs: cfg.lat_msgs,
        tput_ms: cfg.tput_ms,
        tput_max_msgs: cfg.tput_max_msgs,
        gap_ns: cfg.gap_ns,
        fifo_priority: cfg.fifo_priority,
        loadavg_before: loadavg(),
        loadavg_after: String::new(),
    };
    let t0 = std::time::Instant::now();
    let results = suite::run_suite(&chans, &cfg, runs);
    let mut env = env;
    env.loadavg_after = loadavg();
    let report = Report {
        environment: env,
        channels: results,
    };
    let e = &report.environment;
    println!(
        "milk-bench: kernel {}, {} CPUs ({}), clock {} over {} (read {} ns), sender CPU {:?}, receiver CPU {:?}",
        e.kernel, e.cpus, e.cpu_model, e.clock, e.clocksource, e.clock_read_ns, e.sender_cpu, e.receiver_cpu
    );
    println!(
        "{} runs x ({} warm-up + {} latency msgs, idle gap {}-{} µs, throughput {} ms / <= {} msgs), 64-byte messages; one-way latency = receiver stamp - sender stamp",
        e.runs, e.warmup, e.lat_msgs, e.gap_ns.0 / 1000, e.gap_ns.1 / 1000, e.tput_ms, e.tput_max_msgs
    );
    println!(
        "scheduling: {}; load average before {} / after {}",
        e.fifo_priority
            .map(|p| format!("SCHED_FIFO {p}"))
            .unwrap_or_else(|| "SCHED_OTHER".into()),
        e.loadavg_before,
        e.loadavg_after
    );
    println!();
    print!("{}", report::table(&report));
    println!();
    for c in &report.channels {
        println!("- {}: {}", c.name, c.method);
    }
    println!("\ntotal time {:.1} s", t0.elapsed().as_secs_f64());
    let mut failed = false;
    if let Some(p) = &args.json {
        if let Err(e) = report::write_json(&report, p) {
            eprintln!("milk-bench: cannot write {}: {e}", p.display());
            failed = true;
        }
    }
    if let Some(dir) = &args.plots {
        if let Err(e) = plot::write_plots(&report, dir) {
            eprintln!("milk-bench: cannot write plots to {}: {e}", dir.display());
            failed = true;
        }
    }
    let broken = report
        .channels
        .iter()
        .any(|c| matches!(c.outcome, report::Outcome::Failed { .. }));
    if failed || (args.smoke && broken) {
        std::process::exit(1);
    }
}
