//! The human-readable table and the SVG plots.

use std::fmt::Write as _;
use std::path::Path;

use milk_bench::plot::{spread_bars, SpreadBar};

use super::stats::{ConfigSummary, RunRecord, Spread};
use super::workload::Workload;
use super::{CompareError, Results};

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
         (median [min-max] of the per-round ratios)\nhost {}, {} CPUs ({}), {}; guest {}; commit {}; \
         started {}, load average {} at the start, {} at the end\n",
        r.runs,
        r.machine.host,
        r.machine.cpus,
        r.machine.cpu,
        r.machine.qemu,
        r.machine.guest_kernel,
        r.machine.commit,
        r.machine.started,
        r.machine.load_start,
        r.machine.load_end
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
    let retried: u32 = r.records.iter().map(|x| x.retries).sum();
    if retried > 0 {
        let _ = writeln!(
            t,
            "{retried} boot(s) did not reach /init (guest kernel panic at boot) and were made again.\n"
        );
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
    // One colour per scheduler, in every plot.
    let mut scheds: Vec<&str> = Vec::new();
    for s in &r.summary {
        if !scheds.contains(&s.scheduler.as_str()) {
            scheds.push(&s.scheduler);
        }
    }
    let bar = |label: String, sched: &str, s: &Spread| SpreadBar {
        label,
        median: s.median,
        min: s.min,
        max: s.max,
        color: scheds.iter().position(|x| *x == sched).unwrap_or(0),
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
                .filter_map(|s| {
                    Some(bar(
                        s.scheduler.clone(),
                        &s.scheduler,
                        s.metrics.get(m.key)?,
                    ))
                })
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
                        ratios.push(bar(
                            format!("{} {} {}", w.name, m.key, s.scheduler),
                            &s.scheduler,
                            x,
                        ));
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
    use crate::compare::machine;
    use crate::compare::stats::summarize;
    use crate::compare::workload::workloads;
    use std::collections::BTreeMap;

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
