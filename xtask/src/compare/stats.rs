//! Per-boot records and their statistics: spreads, ratios to CFS, fidelity.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use virtio_milk::metrics::Summary;
use virtio_milk::protocol::AckStatus;

use super::workload::Workload;

/// A fidelity column: its key and how to compute it (None: not known).
type FidelityColumn = (&'static str, fn(&Fidelity) -> Option<f64>);

/// Fidelity counters of a milk run.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
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
    /// Host: decision -> applied p50, µs (when the engine reports it).
    pub apply_p50_us: Option<f64>,
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

/// The host runtime's counters the fidelity columns need.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct HostCounts {
    /// Decisions sent (RUN + PREEMPT).
    pub decisions: u64,
    /// STALE + NOT_RUNNABLE + NO_TASK acks.
    pub rejected: u64,
    /// Acks of the runtime's own decisions (injected ones left out).
    pub acks: u64,
    /// Acks that matched no decision in flight.
    pub unmatched: u64,
    /// Decision -> applied p50, µs (None when the source does not say).
    pub apply_p50_us: Option<f64>,
}

impl HostCounts {
    /// From the runtime summaries of one guest run (None if there are none).
    pub fn from_summaries(host: &[Summary]) -> Option<HostCounts> {
        if host.is_empty() {
            return None;
        }
        let mut h = HostCounts::default();
        let mut apply = virtio_milk::metrics::Histogram::default();
        for s in host {
            let m = &s.metrics;
            let ack = |st: AckStatus| m.acks[st as usize];
            h.decisions += m.decisions_run + m.decisions_preempt;
            h.rejected +=
                ack(AckStatus::Stale) + ack(AckStatus::NotRunnable) + ack(AckStatus::NoTask);
            h.acks += m.acks_total() - m.injected_acks.iter().sum::<u64>();
            h.unmatched += m.unmatched_acks;
            apply.merge(&m.apply_latency);
        }
        h.apply_p50_us = (apply.count() > 0).then(|| apply.percentile(50.0) as f64 / 1e3);
        Some(h)
    }

    /// From the summary text milk-vmm prints at exit (`virtio-milk
    /// summary: ...`, then `decisions: N (...)`, `acks: OK n STALE n ...`,
    /// `protocol errors: ..., n unmatched acks, ...`); None if absent or in
    /// a form this does not know. Several summaries add up.
    pub fn parse(lines: &[String]) -> Option<HostCounts> {
        let mut h = HostCounts::default();
        let mut seen = false;
        for l in lines.iter().map(|l| l.trim()) {
            if let Some(rest) = l.strip_prefix("decisions: ") {
                h.decisions += rest.split_whitespace().next()?.parse::<u64>().ok()?;
                seen = true;
            } else if let Some(rest) = l.strip_prefix("acks:") {
                let w: Vec<&str> = rest.split_whitespace().collect();
                for pair in w.chunks(2) {
                    let [name, n] = pair else { return None };
                    let n: u64 = n.parse().ok()?;
                    h.acks += n;
                    if ["STALE", "NOT_RUNNABLE", "NO_TASK"].contains(name) {
                        h.rejected += n;
                    }
                }
            } else if l.starts_with("protocol errors:") {
                let at = l.find(" unmatched acks")?;
                h.unmatched += l[..at].rsplit(' ').next()?.parse::<u64>().ok()?;
            }
        }
        seen.then_some(h)
    }
}

/// Fidelity from the guest's counters and the host's.
pub fn fidelity(guest: &BTreeMap<String, String>, host: Option<&HostCounts>) -> Fidelity {
    let g = |k: &str| guest.get(k).and_then(|v| v.parse().ok()).unwrap_or(0u64);
    let mut f = Fidelity {
        applied: g("decisions_applied"),
        fallbacks: g("local_fallbacks"),
        disables: g("disables"),
        ..Fidelity::default()
    };
    if let Some(h) = host {
        f.decisions = h.decisions;
        f.rejected = h.rejected;
        // Each matched ack resolves one decision; the rest hold a CPU.
        f.unacked = h
            .decisions
            .saturating_sub(h.acks.saturating_sub(h.unmatched));
        f.apply_p50_us = h.apply_p50_us;
    }
    f
}

/// One boot's record.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
    /// Earlier boots of this measurement that never reached /init.
    #[serde(default)]
    pub retries: u32,
}

/// Median and range.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
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
#[derive(Debug, Clone, Serialize, Deserialize)]
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
                ("fallback_pct", |f| Some(f.fallback_pct())),
                ("rejected_pct", |f| Some(f.rejected_pct())),
                ("unacked", |f| Some(f.unacked as f64)),
                ("disables", |f| Some(f.disables as f64)),
                ("apply_p50_us", |f| f.apply_p50_us),
            ];
            for (k, get) in cols {
                let v: Vec<f64> = fs.iter().filter_map(|f| get(f)).collect();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::workload::workloads;

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
            retries: 0,
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
        let h = fidelity(&counters, None);
        assert_eq!(
            (h.applied, h.fallbacks, h.decisions, h.unacked),
            (10, 1, 0, 0)
        );
    }

    #[test]
    fn host_counts_parse_from_the_printed_summary() {
        let text: Vec<String> = [
            "virtio-milk summary: policy fifo, 3.2 s",
            "  messages: 100 (TASK_NEW 10)",
            "  decisions: 40 (RUN 40, PREEMPT 0)",
            "  acks: OK 30 STALE 3 NO_TASK 1 BAD_CPU 2 NOT_RUNNABLE 2",
            "  rejections: 8  guest fallbacks: 4",
            "  protocol errors: 0 malformed, 0 stale events, 0 unknown-task events, 1 unmatched acks, 0 policy rejects",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let h = HostCounts::parse(&text).unwrap();
        assert_eq!(
            (h.decisions, h.rejected, h.acks, h.unmatched),
            (40, 6, 38, 1)
        );
        let f = fidelity(&BTreeMap::new(), Some(&h));
        assert_eq!(f.unacked, 3);
        assert_eq!(HostCounts::parse(&text[..1]), None);
        let mut bad = text.clone();
        bad[3] = "  acks: OK many".into();
        assert_eq!(HostCounts::parse(&bad), None);
    }
}
