//! Loopback benchmark of the virtio-milk channel with the FIFO policy.
//!
//! `cargo run --release -p milk-policies --example loopback -- --help`
//!
//! For every (mode, batch) it runs the loopback `--repeat` times and prints the median and
//! the min..max spread over runs of: p50 and p99 event -> decision-applied latency, and
//! messages per second (both directions).

use std::time::Duration;

use clap::{Parser, ValueEnum};
use virtio_milk::loopback::{run_loopback, LoopbackConfig, NotifyMode};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Mode {
    Notify,
    Poll,
    Hybrid,
    /// Notify and poll.
    Both,
    /// Notify, poll and hybrid.
    All,
}

/// virtio-milk loopback benchmark (FIFO policy, simulated guest on shared memory).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Notification mode, polling mode, hybrid (spin then sleep), or several.
    #[arg(long, value_enum, default_value = "both")]
    mode: Mode,
    /// Spin budget of hybrid mode, in microseconds.
    #[arg(long, default_value_t = 50)]
    spin_us: u64,
    /// Batch sizes (records per buffer), comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    batch: Vec<usize>,
    /// Simulated guest CPUs.
    #[arg(long, default_value_t = 4)]
    cpus: u16,
    /// Simulated tasks.
    #[arg(long, default_value_t = 4)]
    tasks: u32,
    /// Applied RUN decisions per run.
    #[arg(long, default_value_t = 50_000)]
    runs: u64,
    /// Runs per configuration.
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// Policy name (see milk_policies::names()).
    #[arg(long, default_value = "fifo")]
    policy: String,
    /// Print the host runtime's summary of the last run of each configuration.
    #[arg(long)]
    summary: bool,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let args = Args::parse();
    let hybrid = NotifyMode::Hybrid(Duration::from_micros(args.spin_us));
    let modes: Vec<NotifyMode> = match args.mode {
        Mode::Notify => vec![NotifyMode::Notification],
        Mode::Poll => vec![NotifyMode::Polling],
        Mode::Hybrid => vec![hybrid],
        Mode::Both => vec![NotifyMode::Notification, NotifyMode::Polling],
        Mode::All => vec![NotifyMode::Notification, NotifyMode::Polling, hybrid],
    };
    println!(
        "cpus={} tasks={} runs={} repeat={} policy={}",
        args.cpus, args.tasks, args.runs, args.repeat, args.policy
    );
    println!(
        "{:<13} {:>5} {:>22} {:>22} {:>26} {:>8} {:>7}",
        "mode",
        "batch",
        "p50 us (min..max)",
        "p99 us (min..max)",
        "msgs/s (min..max)",
        "rec/buf",
        "errors"
    );
    for &mode in &modes {
        for &batch in &args.batch {
            let (mut p50, mut p99, mut tput) = (Vec::new(), Vec::new(), Vec::new());
            let mut per_buf = 0.0;
            let mut errors = 0;
            let mut last_summary = None;
            for _ in 0..args.repeat {
                let policy = match milk_policies::by_name(&args.policy) {
                    Ok(p) => p,
                    Err(e) => {
                        eprintln!("{e}");
                        std::process::exit(2);
                    }
                };
                let cfg = LoopbackConfig {
                    num_cpus: args.cpus,
                    tasks: args.tasks,
                    batch,
                    mode,
                    runs: args.runs,
                    timeout: Duration::from_secs(300),
                    ..Default::default()
                };
                let s = match run_loopback(cfg, policy) {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("loopback failed: {e}");
                        std::process::exit(1);
                    }
                };
                p50.push(s.percentile_ns(50.0) as f64 / 1e3);
                p99.push(s.percentile_ns(99.0) as f64 / 1e3);
                tput.push(s.msgs_per_sec());
                per_buf = s.records_sent as f64 / s.event_buffers.max(1) as f64;
                errors += s.guest_protocol_errors
                    + s.host.engine.malformed_total()
                    + s.rejected.iter().sum::<u64>();
                last_summary = Some(s.host);
            }
            let range = |v: &[f64]| {
                let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = v.iter().copied().fold(0.0, f64::max);
                (lo, hi)
            };
            let (p50lo, p50hi) = range(&p50);
            let (p99lo, p99hi) = range(&p99);
            let (tlo, thi) = range(&tput);
            println!(
                "{:<13} {:>5} {:>22} {:>22} {:>26} {:>8.2} {:>7}",
                match mode {
                    NotifyMode::Hybrid(d) => format!("Hybrid{}us", d.as_micros()),
                    m => format!("{m:?}"),
                },
                batch,
                format!("{:.2} ({:.2}..{:.2})", median(&mut p50), p50lo, p50hi),
                format!("{:.2} ({:.2}..{:.2})", median(&mut p99), p99lo, p99hi),
                format!("{:.0} ({:.0}..{:.0})", median(&mut tput), tlo, thi),
                per_buf,
                errors
            );
            if let (true, Some(s)) = (args.summary, last_summary) {
                println!("{s}");
            }
        }
    }
}
