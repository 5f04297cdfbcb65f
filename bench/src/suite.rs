//! Runs every selected channel `runs` times, interleaved (run 1 of every
//! channel, then run 2, ...) so slow drifts of the machine hit all rows alike.

use crate::channel::ChanError;
use crate::report::{ChannelReport, Outcome};
use crate::row::Row;
use crate::runner::{RunConfig, RunResult};

enum State {
    Running(Vec<RunResult>),
    Unavailable(String),
    Failed(String),
}

/// Measures `channels`; never panics on a broken or missing channel.
pub fn run_suite(channels: &[Box<dyn Row>], cfg: &RunConfig, runs: usize) -> Vec<ChannelReport> {
    let mut states: Vec<State> = channels
        .iter()
        .map(|_| State::Running(Vec::new()))
        .collect();
    for run in 0..runs.max(1) {
        for (ch, st) in channels.iter().zip(states.iter_mut()) {
            let State::Running(done) = st else { continue };
            let t0 = std::time::Instant::now();
            match ch.run(cfg) {
                Ok(r) => {
                    log::info!(
                        "run {} {:<28} {:>8.0} msgs/s  {:?}",
                        run + 1,
                        ch.name(),
                        r.msgs_per_sec(),
                        t0.elapsed()
                    );
                    done.push(r);
                }
                Err(ChanError::Unavailable(why)) => {
                    log::info!("{}: unavailable: {why}", ch.name());
                    *st = State::Unavailable(why);
                }
                Err(e) => {
                    log::error!("{}: run {} failed: {e}", ch.name(), run + 1);
                    *st = State::Failed(e.to_string());
                }
            }
        }
    }
    channels
        .iter()
        .zip(states)
        .map(|(ch, st)| match st {
            State::Running(runs) => ChannelReport::measured(ch.name(), ch.describe(), runs),
            State::Unavailable(reason) => ChannelReport {
                name: ch.name(),
                method: ch.describe(),
                outcome: Outcome::Unavailable { reason },
                runs: Vec::new(),
            },
            State::Failed(error) => ChannelReport {
                name: ch.name(),
                method: ch.describe(),
                outcome: Outcome::Failed { error },
                runs: Vec::new(),
            },
        })
        .collect()
}
