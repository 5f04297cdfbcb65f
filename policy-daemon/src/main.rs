//! `milk-policy`: a virtio-milk policy in its own process, as a vhost-user backend.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use milk_policy_daemon::backend::{BackendConfig, BackendEvent, MilkBackend};
use milk_policy_daemon::daemon::{self, DaemonError};
use virtio_milk::metrics::Summary;
use virtio_milk::runtime::RuntimeConfig;

const EXAMPLES: &str = "\
Examples:
  # Serve a 2-CPU guest with the fifo policy; milk-vmm connects with --policy-socket.
  milk-policy --socket /run/milk/fifo.sock --policy fifo --cpus 2

  # A planned swap: start a second daemon, then hand the queues over.
  milk-policy --socket /run/milk/next.sock --policy fifo:slice_us=2000 --cpus 2 &
  milkctl --api-sock /tmp/milk.sock swap --socket /run/milk/next.sock

The daemon serves one frontend connection and exits when it hangs up (after a
swap away from it, or when the VM ends), printing the runtime summary.
Exit status: 0 after a connection, 64 invalid arguments (unknown policy, cpu
count), 70 daemon failure.";

/// Runs one virtio-milk policy as a vhost-user backend daemon.
#[derive(Debug, Parser)]
#[command(name = "milk-policy", version, after_help = EXAMPLES)]
struct Cli {
    /// vhost-user socket to listen on (an existing file there is replaced).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// Policy to run (NAME[:PARAMS], as milk-vmm --policy).
    #[arg(long, value_name = "NAME[:PARAMS]")]
    policy: String,
    /// Guest CPUs (queue pairs) to serve; milk-vmm refuses a daemon for another count.
    #[arg(long, value_name = "N")]
    cpus: u32,
    /// Host heartbeat period in ms (0: none; the guest then has no silence watchdog).
    #[arg(long, value_name = "MS", default_value_t = 100)]
    heartbeat_ms: u64,
    /// Print the exit report as one JSON object.
    #[arg(long)]
    json: bool,
}

fn code(e: &DaemonError) -> u8 {
    match e {
        DaemonError::Backend(_) => 64,
        _ => 70,
    }
}

fn report_json(backend: &MilkBackend, policy: &str, socket: &std::path::Path) -> String {
    let runs: Vec<serde_json::Value> = backend.summaries().iter().map(summary_json).collect();
    let events: Vec<serde_json::Value> = backend
        .events()
        .iter()
        .map(|e| match e {
            BackendEvent::Started { resumed, rings } => serde_json::json!({
                "event": "started", "resumed": resumed,
                "rings": rings.iter().map(|r| r.next_avail).collect::<Vec<_>>(),
            }),
            BackendEvent::Stopped { rings } => serde_json::json!({
                "event": "stopped",
                "rings": rings.iter().map(|r| r.next_avail).collect::<Vec<_>>(),
            }),
        })
        .collect();
    serde_json::json!({
        "socket": socket, "policy": policy, "runs": runs, "events": events,
    })
    .to_string()
}

fn summary_json(s: &Summary) -> serde_json::Value {
    let m = &s.metrics;
    serde_json::json!({
        "policy": s.policy,
        "elapsed_ms": s.elapsed.as_millis() as u64,
        "messages": m.messages(),
        "decisions_run": m.decisions_run,
        "acks": m.acks_total(),
        "stale_events": m.stale_events,
        "unknown_task_events": m.unknown_task_events,
        "discarded_on_start": m.discarded_on_start,
        "session_sent": m.session_sent,
        "guest_fallbacks": m.guest_fallbacks,
        "latency_p50_ns": m.latency.percentile(50.0),
        "latency_p99_ns": m.latency.percentile(99.0),
        "malformed": s.engine.malformed_total(),
    })
}

fn run(cli: &Cli) -> Result<(), DaemonError> {
    let runtime = RuntimeConfig {
        heartbeat: (cli.heartbeat_ms > 0).then(|| Duration::from_millis(cli.heartbeat_ms)),
        ..RuntimeConfig::default()
    };
    let listening = daemon::listen(
        &cli.socket,
        BackendConfig {
            num_cpus: cli.cpus,
            policy: cli.policy.clone(),
            runtime,
        },
    )?;
    // The ready line: tests and scripts wait for it.
    println!(
        "milk-policy: listening on {} (policy {}, {} cpus, pid {})",
        cli.socket.display(),
        cli.policy,
        cli.cpus,
        std::process::id()
    );
    let backend = listening.serve_one()?;
    if cli.json {
        println!("{}", report_json(&backend, &cli.policy, &cli.socket));
    } else {
        for s in backend.summaries() {
            println!("{s}");
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("milk-policy: {e}");
            ExitCode::from(code(&e))
        }
    }
}
