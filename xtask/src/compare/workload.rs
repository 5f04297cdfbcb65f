//! The workloads: guest commands, what they report, and how their output is read.

use std::collections::BTreeMap;

use serde::Serialize;

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

/// The last console line containing `prefix`, from `prefix` on.
pub fn last_line<'a>(console: &'a [String], prefix: &str) -> Result<&'a str, String> {
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

/// `milk-mix: ms=4000 ... elapsed_ms=... yields=... forks=... pipe_rtts=... errors=0`.
pub fn parse_mix(console: &[String]) -> Result<Values, String> {
    let line = last_line(console, "milk-mix: ms=")?;
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

        let mix = "milk-mix: ms=4000 seconds=4 elapsed_ms=4000 yields=8000 forks=800 \
                   roundtrips=40000 pipe_rtts=40000 yielders=2 forkers=2 pairs=2 min_yield=1 \
                   min_fork=2 min_pipe=3 errors=0";
        let x = parse_mix(&lines(&[mix])).unwrap();
        assert_eq!(x["forks_per_s"], 200.0);
        assert_eq!(x["rtts_per_s"], 10000.0);
        assert_eq!(x["yields_per_s"], 2000.0);
        assert!(parse_mix(&lines(&[&mix.replace("errors=0", "errors=1")])).is_err());
    }
}
