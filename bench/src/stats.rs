//! Percentiles and run-to-run spread.

/// Nearest-rank percentile of an ascending slice (`q` in 0..=100).
pub fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    // The epsilon keeps float error (99.9% of 1000 = 999.0000001) off the next rank.
    let rank = ((q / 100.0) * sorted.len() as f64 - 1e-9).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Latency summary of pooled samples, ns.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct LatencySummary {
    pub samples: usize,
    pub p50: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl LatencySummary {
    pub fn of(samples: &[u64]) -> Self {
        let mut v = samples.to_vec();
        v.sort_unstable();
        LatencySummary {
            samples: v.len(),
            p50: percentile(&v, 50.0),
            p99: percentile(&v, 99.0),
            p999: percentile(&v, 99.9),
            max: v.last().copied().unwrap_or(0),
        }
    }
}

/// Run-to-run spread of one per-run metric.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// Coefficient of variation (stddev / mean), 0 for a single run.
    pub cv: f64,
}

impl Spread {
    pub fn of(values: &[f64]) -> Self {
        if values.is_empty() {
            return Spread::default();
        }
        let mut v = values.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        let median = if v.len() % 2 == 1 {
            v[v.len() / 2]
        } else {
            (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
        };
        Spread {
            median,
            min: v[0],
            max: v[v.len() - 1],
            cv: if mean > 0.0 { var.sqrt() / mean } else { 0.0 },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile(&v, 50.0), 500);
        assert_eq!(percentile(&v, 99.0), 990);
        assert_eq!(percentile(&v, 99.9), 999);
        assert_eq!(percentile(&v, 100.0), 1000);
        assert_eq!(percentile(&[], 50.0), 0);
    }

    #[test]
    fn summary_sorts_input() {
        let s = LatencySummary::of(&[5, 1, 9, 3]);
        assert_eq!((s.p50, s.max, s.samples), (3, 9, 4));
    }

    #[test]
    fn spread_of_runs() {
        let s = Spread::of(&[1.0, 3.0, 2.0, 10.0]);
        assert_eq!((s.median, s.min, s.max), (2.5, 1.0, 10.0));
        assert!(s.cv > 0.5);
        assert_eq!(Spread::of(&[4.0]).cv, 0.0);
    }
}
