//! Per-channel results, the printed table and the JSON dump.

use crate::runner::RunResult;
use crate::stats::{LatencySummary, Spread};
use std::fmt::Write as _;

/// Outcome of one row.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    /// Measured; derived statistics over all runs.
    Measured {
        latency: LatencySummary,
        /// Per-run p50 latency, ns.
        p50_spread: Spread,
        /// Per-run throughput, messages/s.
        tput_spread: Spread,
        /// Per-run process CPU per message, ns.
        cpu_spread: Spread,
        /// Per-run receiver CPU per sporadic (latency-phase) message, ns;
        /// absent for rows that cannot measure it.
        rx_idle_cpu: Option<Spread>,
    },
    /// Not runnable here; why.
    Unavailable { reason: String },
    /// Ran but failed (a broken channel must never produce a number).
    Failed { error: String },
}

/// One table row with its raw runs.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ChannelReport {
    pub name: String,
    pub method: String,
    pub outcome: Outcome,
    pub runs: Vec<RunResult>,
}

impl ChannelReport {
    /// Derives the statistics from raw runs.
    pub fn measured(name: String, method: String, runs: Vec<RunResult>) -> Self {
        let pooled: Vec<u64> = runs
            .iter()
            .flat_map(|r| r.latency_ns.iter().copied())
            .collect();
        let p50s: Vec<f64> = runs
            .iter()
            .map(|r| LatencySummary::of(&r.latency_ns).p50 as f64)
            .collect();
        let tputs: Vec<f64> = runs.iter().map(RunResult::msgs_per_sec).collect();
        let cpus: Vec<f64> = runs.iter().map(RunResult::cpu_ns_per_msg).collect();
        let idle: Vec<f64> = runs
            .iter()
            .filter_map(|r| r.rx_idle_cpu_ns_per_msg.map(|v| v as f64))
            .collect();
        let rx_idle_cpu = (!idle.is_empty() && idle.len() == runs.len()).then(|| Spread::of(&idle));
        ChannelReport {
            name,
            method,
            outcome: Outcome::Measured {
                latency: LatencySummary::of(&pooled),
                p50_spread: Spread::of(&p50s),
                tput_spread: Spread::of(&tputs),
                cpu_spread: Spread::of(&cpus),
                rx_idle_cpu,
            },
            runs,
        }
    }
}

/// Machine and method facts printed above the table and stored in JSON.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Environment {
    pub kernel: String,
    pub cpus: usize,
    pub cpu_model: String,
    pub clock: String,
    pub clocksource: String,
    pub clock_read_ns: u64,
    pub sender_cpu: Option<usize>,
    pub receiver_cpu: Option<usize>,
    pub runs: usize,
    pub warmup: u64,
    pub lat_msgs: u64,
    pub tput_ms: u64,
    pub tput_max_msgs: u64,
    pub gap_ns: (u64, u64),
    pub fifo_priority: Option<i32>,
    /// /proc/loadavg before and after the suite (the machine is shared).
    pub loadavg_before: String,
    pub loadavg_after: String,
}

/// Everything one invocation produced.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub environment: Environment,
    pub channels: Vec<ChannelReport>,
}

fn us(ns: f64) -> String {
    if ns >= 100_000.0 {
        format!("{:.0}", ns / 1000.0)
    } else if ns >= 10_000.0 {
        format!("{:.1}", ns / 1000.0)
    } else {
        format!("{:.2}", ns / 1000.0)
    }
}

fn rate(per_s: f64) -> String {
    if per_s >= 1e6 {
        format!("{:.2}M", per_s / 1e6)
    } else {
        format!("{:.0}k", per_s / 1e3)
    }
}

/// Renders the result table as Markdown (also readable on a terminal).
pub fn table(report: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| channel | p50 µs | p99 µs | p99.9 µs | p50 runs min–max µs | msgs/s median (min–max) | CPU ns/msg | rx CPU µs/event |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|");
    for c in &report.channels {
        match &c.outcome {
            Outcome::Measured {
                latency,
                p50_spread,
                tput_spread,
                cpu_spread,
                rx_idle_cpu,
            } => {
                let idle = rx_idle_cpu
                    .map(|v| us(v.median))
                    .unwrap_or_else(|| "–".into());
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {}–{} | {} ({}–{}) | {:.0} | {} |",
                    c.name,
                    us(latency.p50 as f64),
                    us(latency.p99 as f64),
                    us(latency.p999 as f64),
                    us(p50_spread.min),
                    us(p50_spread.max),
                    rate(tput_spread.median),
                    rate(tput_spread.min),
                    rate(tput_spread.max),
                    cpu_spread.median,
                    idle,
                );
            }
            Outcome::Unavailable { reason } => {
                let _ = writeln!(s, "| {} | n/a: {reason} | | | | | | |", c.name);
            }
            Outcome::Failed { error } => {
                let _ = writeln!(s, "| {} | FAILED: {error} | | | | | | |", c.name);
            }
        }
    }
    s
}

/// Writes the full report, raw samples included, as JSON.
pub fn write_json(report: &Report, path: &std::path::Path) -> std::io::Result<()> {
    let f = std::io::BufWriter::new(std::fs::File::create(path)?);
    serde_json::to_writer(f, report).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(lat: Vec<u64>, msgs: u64) -> RunResult {
        RunResult {
            latency_ns: lat,
            tput_msgs: msgs,
            tput_wall_ns: 1_000_000_000,
            tput_cpu_ns: 2 * msgs,
            sender_cpu_ns: 0,
            receiver_cpu_ns: 0,
            rx_idle_cpu_ns_per_msg: Some(3000),
        }
    }

    #[test]
    fn row_statistics_come_from_runs() {
        let c = ChannelReport::measured(
            "x".into(),
            "m".into(),
            vec![
                run(vec![1000, 2000, 3000], 1_000_000),
                run(vec![5000], 3_000_000),
            ],
        );
        let Outcome::Measured {
            latency,
            tput_spread,
            cpu_spread,
            ..
        } = c.outcome
        else {
            panic!("not measured")
        };
        assert_eq!(latency.samples, 4);
        assert_eq!(latency.p50, 2000);
        assert_eq!(tput_spread.min, 1e6);
        assert_eq!(tput_spread.max, 3e6);
        assert_eq!(cpu_spread.median, 2.0);
    }

    #[test]
    fn table_shows_reasons() {
        let r = Report {
            environment: Environment {
                kernel: "k".into(),
                cpus: 2,
                cpu_model: "c".into(),
                clock: "CLOCK_MONOTONIC_RAW".into(),
                clocksource: "tsc".into(),
                clock_read_ns: 20,
                sender_cpu: Some(0),
                receiver_cpu: Some(1),
                runs: 1,
                warmup: 1,
                lat_msgs: 1,
                tput_ms: 1,
                tput_max_msgs: 1,
                gap_ns: (0, 0),
                fifo_priority: None,
                loadavg_before: String::new(),
                loadavg_after: String::new(),
            },
            channels: vec![ChannelReport {
                name: "bpf".into(),
                method: "m".into(),
                outcome: Outcome::Unavailable {
                    reason: "no CAP_BPF".into(),
                },
                runs: vec![],
            }],
        };
        assert!(table(&r).contains("| bpf | n/a: no CAP_BPF |"));
        assert_eq!(
            table(&r).lines().nth(1).map(|l| l.matches('|').count()),
            Some(9)
        );
    }
}
