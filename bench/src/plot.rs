//! SVG plots (plotters): latency CDFs and throughput bars, written from the
//! same report the table prints, and [`spread_bars`], generic median and
//! min–max bars on a log axis (also drawn by `cargo xtask compare`).

use crate::report::{ChannelReport, Outcome, Report};
use plotters::prelude::*;
use std::path::Path;

/// Plot errors.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("create {0}: {1}")]
    Dir(String, std::io::Error),
    #[error("draw {0}: {1}")]
    Draw(String, String),
}

fn draw_err<E: std::fmt::Display>(file: &Path) -> impl Fn(E) -> PlotError + '_ {
    move |e| PlotError::Draw(file.display().to_string(), e.to_string())
}

/// (latency µs, cumulative fraction) points, at most ~400 per channel.
pub fn cdf_points(c: &ChannelReport) -> Vec<(f64, f64)> {
    let mut v: Vec<u64> = c
        .runs
        .iter()
        .flat_map(|r| r.latency_ns.iter().copied())
        .collect();
    if v.is_empty() {
        return Vec::new();
    }
    v.sort_unstable();
    let n = v.len();
    let step = (n / 400).max(1);
    let mut pts: Vec<(f64, f64)> = (0..n)
        .step_by(step)
        .map(|i| ((v[i].max(1)) as f64 / 1000.0, (i + 1) as f64 / n as f64))
        .collect();
    pts.push((v[n - 1].max(1) as f64 / 1000.0, 1.0));
    pts
}

fn measured(r: &Report) -> impl Iterator<Item = &ChannelReport> {
    r.channels
        .iter()
        .filter(|c| matches!(c.outcome, Outcome::Measured { .. }) && !c.runs.is_empty())
}

fn latency_cdf(file: &Path, title: &str, chans: &[&ChannelReport]) -> Result<(), PlotError> {
    let root = SVGBackend::new(file, (1100, 700)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err(file))?;
    let all: Vec<Vec<(f64, f64)>> = chans.iter().map(|c| cdf_points(c)).collect();
    let lo = all
        .iter()
        .flatten()
        .map(|p| p.0)
        .fold(f64::INFINITY, f64::min)
        .max(0.01);
    let hi = all.iter().flatten().map(|p| p.0).fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(55)
        .build_cartesian_2d((lo * 0.8..hi * 1.2).log_scale(), 0f64..1.0)
        .map_err(draw_err(file))?;
    chart
        .configure_mesh()
        .x_desc("one-way latency, µs (log scale)")
        .y_desc("fraction of messages")
        .draw()
        .map_err(draw_err(file))?;
    for (i, (c, pts)) in chans.iter().zip(all).enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(draw_err(file))?
            .label(c.name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()
        .map_err(draw_err(file))?;
    root.present().map_err(draw_err(file))
}

fn throughput_bars(file: &Path, r: &Report) -> Result<(), PlotError> {
    let rows: Vec<SpreadBar> = measured(r)
        .filter_map(|c| match &c.outcome {
            Outcome::Measured { tput_spread, .. } => Some((c, tput_spread)),
            _ => None,
        })
        .enumerate()
        .map(|(i, (c, t))| SpreadBar {
            label: c.name.clone(),
            median: t.median,
            min: t.min,
            max: t.max,
            color: i,
        })
        .collect();
    let hi = rows.iter().map(|r| r.max).fold(1e6, f64::max) * 1.5;
    let floor = rows.iter().map(|r| r.min).fold(1e4, f64::min).max(100.0);
    let lo = 10f64.powf(floor.log10().floor());
    spread_bars(
        file,
        "Streaming throughput, 64-byte messages (median of runs, whiskers min–max)",
        "messages per second (log scale)",
        &rows,
        Some((lo, hi)),
        None,
    )
}

/// One bar of [`spread_bars`]: a label and the median, min and max of its runs.
#[derive(Debug, Clone, PartialEq)]
pub struct SpreadBar {
    /// Row label.
    pub label: String,
    /// Bar length.
    pub median: f64,
    /// Whisker start.
    pub min: f64,
    /// Whisker end.
    pub max: f64,
    /// Palette index of the bar's colour (bars of one series share one).
    pub color: usize,
}

/// Horizontal bars on a log axis, row 0 on top: each bar the median, its
/// whisker min–max. `x_range` defaults to the data's, widened to whole
/// decades; `reference` draws a vertical line (e.g. 1.0 on a ratio axis).
pub fn spread_bars(
    file: &Path,
    title: &str,
    x_desc: &str,
    rows: &[SpreadBar],
    x_range: Option<(f64, f64)>,
    reference: Option<f64>,
) -> Result<(), PlotError> {
    let n = rows.len().max(1);
    let positive = |v: f64| if v > 0.0 { v } else { f64::INFINITY };
    let (lo, hi) = x_range.unwrap_or_else(|| {
        let min = rows
            .iter()
            .map(|r| positive(r.min.min(r.median)))
            .chain(reference)
            .fold(f64::INFINITY, f64::min);
        let max = rows
            .iter()
            .map(|r| r.max.max(r.median))
            .chain(reference)
            .fold(0.0, f64::max);
        let min = if min.is_finite() { min } else { 1.0 };
        let max = if max > min { max } else { min * 10.0 };
        (
            10f64.powf(min.log10().floor()),
            10f64.powf(max.log10().ceil()),
        )
    });
    let label_px = rows.iter().map(|r| r.label.len()).max().unwrap_or(8) as u32 * 8 + 20;
    let root = SVGBackend::new(file, (1100, 120 + 28 * n as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err(file))?;
    let names: Vec<String> = rows.iter().map(|r| r.label.clone()).collect();
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(label_px)
        .build_cartesian_2d((lo..hi).log_scale(), (0..n).into_segmented())
        .map_err(draw_err(file))?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_labels(n)
        .y_label_formatter(&|v| match v {
            // Row 0 at the top.
            SegmentValue::CenterOf(i) => (n - 1)
                .checked_sub(*i)
                .and_then(|k| names.get(k))
                .cloned()
                .unwrap_or_default(),
            _ => String::new(),
        })
        .y_label_style(("sans-serif", 13))
        .disable_y_mesh()
        .draw()
        .map_err(draw_err(file))?;
    for (i, r) in rows.iter().enumerate() {
        let slot = n - 1 - i;
        let color = Palette99::pick(r.color).to_rgba();
        let mut bar = Rectangle::new(
            [
                (lo, SegmentValue::Exact(slot)),
                (r.median.max(lo), SegmentValue::Exact(slot + 1)),
            ],
            color.filled(),
        );
        bar.set_margin(3, 3, 0, 0);
        chart
            .draw_series(std::iter::once(bar))
            .map_err(draw_err(file))?;
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![
                    (r.min.max(lo), SegmentValue::CenterOf(slot)),
                    (r.max.max(lo), SegmentValue::CenterOf(slot)),
                ],
                BLACK.stroke_width(2),
            )))
            .map_err(draw_err(file))?;
    }
    if let Some(x) = reference {
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(x, SegmentValue::Exact(0)), (x, SegmentValue::Exact(n))],
                RED.stroke_width(2),
            )))
            .map_err(draw_err(file))?;
    }
    root.present().map_err(draw_err(file))
}

/// Writes bench-latency-cdf.svg, bench-latency-cdf-virtio.svg and
/// bench-throughput.svg into `dir`.
pub fn write_plots(report: &Report, dir: &Path) -> Result<(), PlotError> {
    std::fs::create_dir_all(dir).map_err(|e| PlotError::Dir(dir.display().to_string(), e))?;
    let (virtio, kernel): (Vec<&ChannelReport>, Vec<&ChannelReport>) =
        measured(report).partition(|c| c.name.starts_with("virtio-milk"));
    latency_cdf(
        &dir.join("bench-latency-cdf.svg"),
        "One-way latency CDF, existing kernel <-> user channels (64 B, idle receiver)",
        &kernel,
    )?;
    let reference: Vec<&ChannelReport> = kernel
        .iter()
        .copied()
        .filter(|c| {
            [
                "pipe",
                "futex + shm ring",
                "shm ring (busy-poll)",
                "BPF ringbuf k->u (epoll)",
            ]
            .contains(&c.name.as_str())
        })
        .chain(virtio.iter().copied())
        .collect();
    if !virtio.is_empty() {
        latency_cdf(
            &dir.join("bench-latency-cdf-virtio.svg"),
            "virtio-milk loopback (RTT/2) against reference channels",
            &reference,
        )?;
    }
    throughput_bars(&dir.join("bench-throughput.svg"), report)
}
