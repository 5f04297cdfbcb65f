//! `milkctl`: talk to a running milk-vmm through its control socket (docs/control.md).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use milk_control::{Client, Request};
use serde_json::Value;

const EXAMPLES: &str = "\
Examples:
  milk-vmm --kernel vmlinux --initrd initramfs.cpio.gz --policy fifo --api-sock /tmp/milk.sock &
  milkctl --api-sock /tmp/milk.sock status
  milkctl --api-sock /tmp/milk.sock swap rr
  milkctl --api-sock /tmp/milk.sock swap fifo:slice_us=2000
  milkctl --api-sock /tmp/milk.sock metrics --json
  milkctl --api-sock /tmp/milk.sock pause     # the guest falls back to CFS
  milkctl --api-sock /tmp/milk.sock resume    # and re-enables the host policy
  milkctl --api-sock /tmp/milk.sock stop

Exit status: 0 done, 1 the VMM refused the request (its error is printed),
2 no connection or no reply, 64 usage.";

/// Controls a running milk-vmm (policy swap, pause/resume, status, metrics, stop).
#[derive(Debug, Parser)]
#[command(name = "milkctl", version, after_help = EXAMPLES)]
struct Cli {
    /// The VMM's control socket (what milk-vmm printed at start).
    #[arg(long, value_name = "PATH", env = "MILK_API_SOCK")]
    api_sock: PathBuf,
    /// Print the VMM's JSON reply instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Seconds to wait for the reply.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    timeout: u64,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Engine, guest uptime, boot id, policy, session, counters.
    Status,
    /// The policies `swap` accepts.
    Policies,
    /// Replace the running policy without rebooting the guest.
    Swap {
        /// NAME[:PARAMS], e.g. rr or fifo:slice_us=2000.
        #[arg(value_name = "NAME[:PARAMS]", required_unless_present = "socket")]
        policy: Option<String>,
        /// Hand the queues to the policy daemon at this vhost-user socket instead.
        #[arg(long, value_name = "PATH", conflicts_with = "policy")]
        socket: Option<String>,
    },
    /// Counters and latency histograms.
    Metrics,
    /// Stop the host policy; the guest falls back to its own scheduler (CFS).
    Pause,
    /// Start the host policy again; the guest re-enables it.
    Resume,
    /// Stop the VM.
    Stop,
}

fn request(cmd: &Cmd) -> Request {
    match cmd {
        Cmd::Status => Request::Status,
        Cmd::Policies => Request::Policies,
        Cmd::Swap { policy, socket } => Request::Swap {
            policy: policy.clone(),
            socket: socket.clone(),
        },
        Cmd::Metrics => Request::Metrics,
        Cmd::Pause => Request::Pause,
        Cmd::Resume => Request::Resume,
        Cmd::Stop => Request::Stop,
    }
}

fn s(v: &Value, k: &str) -> String {
    match v.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(x) => x.to_string(),
    }
}

fn ms(v: &Value) -> String {
    let ns = v.as_u64().unwrap_or(0);
    if ns >= 1_000_000 {
        format!("{:.2} ms", ns as f64 / 1e6)
    } else {
        format!("{:.1} us", ns as f64 / 1e3)
    }
}

fn print_counters(c: &Value) {
    let acks = &c["acks"];
    println!(
        "decisions:  RUN {} PREEMPT {}; acks OK {} STALE {} NO_TASK {} BAD_CPU {} NOT_RUNNABLE {}",
        s(c, "decisions_run"),
        s(c, "decisions_preempt"),
        s(acks, "ok"),
        s(acks, "stale"),
        s(acks, "no_task"),
        s(acks, "bad_cpu"),
        s(acks, "not_runnable")
    );
    println!(
        "messages:   {}; swaps {}; guest fallbacks {}; malformed {}",
        s(c, "messages"),
        s(c, "policy_swaps"),
        s(c, "guest_fallbacks"),
        s(c, "malformed")
    );
}

/// The `daemon` object of a VM whose policy runs in milk-policy (`--policy-socket`).
fn print_daemon(r: &Value) {
    let d = &r["daemon"];
    if d.is_object() {
        println!(
            "daemon:     {} (pid {}, connected {}); swaps {}, hang-ups {}, reconnects {}",
            s(d, "socket"),
            s(d, "pid"),
            s(d, "connected"),
            s(d, "swaps"),
            s(d, "hangups"),
            s(d, "reconnects")
        );
    }
}

fn human(cmd: &Cmd, r: &Value) {
    match cmd {
        Cmd::Status => {
            println!("engine:     {} (pid {})", s(r, "engine"), s(r, "pid"));
            println!("boot id:    {}", s(r, "boot_id"));
            let up = r["guest_uptime_ms"].as_u64().unwrap_or(0);
            println!("uptime:     {:.1} s", up as f64 / 1e3);
            println!("state:      {}", s(r, "state"));
            println!(
                "policy:     {} (milk-policies {})",
                s(r, "policy"),
                s(r, "policy_version")
            );
            println!(
                "session:    {} (established: {})",
                s(r, "session_id"),
                s(r, "session_established")
            );
            print_daemon(r);
            if let Some(c) = r.get("counters") {
                print_counters(c);
            }
        }
        Cmd::Policies => {
            for p in r["policies"].as_array().into_iter().flatten() {
                println!("{:<8} {}", s(p, "name"), s(p, "about"));
            }
            println!("current: {}", s(r, "current"));
        }
        Cmd::Swap { .. } => {
            if r.get("to").is_some() {
                let how = if r["swapped_live"].as_bool() == Some(true) {
                    "swapped in the running runtime"
                } else {
                    "set; it starts with the runtime"
                };
                println!("policy {} -> {}: {how}", s(r, "from"), s(r, "to"));
            } else {
                println!("{r}");
            }
        }
        Cmd::Metrics => {
            println!(
                "state {}, policy {}, run {} ms",
                s(r, "state"),
                s(r, "policy"),
                s(r, "run_elapsed_ms")
            );
            print_daemon(r);
            if let Some(c) = r.get("counters") {
                print_counters(c);
            }
            if let Some(l) = r.get("latency").and_then(Value::as_object) {
                for (name, h) in l {
                    println!(
                        "{name}: n {} p50 {} p90 {} p99 {} max {}",
                        s(h, "count"),
                        ms(&h["p50_ns"]),
                        ms(&h["p90_ns"]),
                        ms(&h["p99_ns"]),
                        ms(&h["max_ns"])
                    );
                }
            }
        }
        Cmd::Pause => println!(
            "{}",
            if r["paused"].as_bool() == Some(true) {
                "paused: the guest falls back to its own scheduler"
            } else {
                "already paused"
            }
        ),
        Cmd::Resume => println!(
            "{}",
            if r["resumed"].as_bool() == Some(true) {
                format!("resumed with policy {}", s(r, "policy"))
            } else {
                "already running".to_string()
            }
        ),
        Cmd::Stop => println!("stopping the VM"),
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 64 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let req = request(&cli.cmd);
    let reply = Client::connect(&cli.api_sock, Duration::from_secs(cli.timeout.max(1)))
        .and_then(|mut c| c.request(&req));
    let reply = match reply {
        Ok(r) => r,
        Err(e) => {
            eprintln!("milkctl: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&reply).unwrap_or_default()
        );
    } else if reply.ok {
        human(&cli.cmd, reply.result.as_ref().unwrap_or(&Value::Null));
    }
    if reply.ok {
        ExitCode::SUCCESS
    } else {
        if !cli.json {
            eprintln!(
                "milkctl: {}",
                reply.error.as_deref().unwrap_or("request refused")
            );
        }
        ExitCode::from(1)
    }
}
