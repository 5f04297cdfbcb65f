//! SVG plots (plotters): latency CDFs per channel and throughput bars.

use crate::report::Report;
use std::path::Path;

/// Plot errors.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("create {0}: {1}")]
    Dir(String, std::io::Error),
    #[error("draw: {0}")]
    Draw(String),
}

/// Writes bench-latency-cdf.svg and bench-throughput.svg into `dir`.
pub fn write_plots(_report: &Report, dir: &Path) -> Result<(), PlotError> {
    std::fs::create_dir_all(dir).map_err(|e| PlotError::Dir(dir.display().to_string(), e))?;
    Err(PlotError::Draw("not yet".into()))
}
