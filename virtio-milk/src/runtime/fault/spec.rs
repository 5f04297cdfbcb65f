//! What a chaos run and a hostile-host run do, and their one-line text form (`milk-vmm
//! --chaos SPEC`, `--hostile-host SPEC`): comma-separated `key=value` items.
//!
//! Durations take a unit (`500us`, `20ms`, `1.5s`), ranges are `LO..HI`, probabilities
//! are in `[0, 1]`. Every window starts when the guest first establishes a session (plus
//! `after`) and lasts `for` (chaos: default the whole run).

use std::time::Duration;

/// A bad `--chaos` or `--hostile-host` specification.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// A key the spec does not know.
    #[error("unknown key {key:?} (known: {known})")]
    UnknownKey {
        /// The key given.
        key: String,
        /// The keys accepted.
        known: &'static str,
    },
    /// An item without `=value`.
    #[error("{0:?} needs a value (key=value)")]
    MissingValue(String),
    /// A value that does not parse or is out of range.
    #[error("{key}={value}: {why}")]
    BadValue {
        /// The key.
        key: String,
        /// The value given.
        value: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A key given twice.
    #[error("{0} given twice")]
    Duplicate(String),
}

/// Faults on the channel (a chaos run). See [`ChaosSpec::parse`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ChaosSpec {
    /// Seed of the fault sequence (`None`: one is drawn and printed).
    pub seed: Option<u64>,
    /// Start this long after the first established session.
    pub after: Duration,
    /// Length of the chaos window (`None`: until the runtime stops).
    pub window: Option<Duration>,
    /// Fraction of events and of decisions that are delayed.
    pub delay_p: f64,
    /// Longest delay of a guest record (event, ack) before the runtime sees it.
    pub event_delay: Duration,
    /// Longest delay of a decision before it is written to the guest.
    pub decision_delay: Duration,
    /// Probability that an ack is lost.
    pub ack_loss: f64,
    /// Probability that an ack is seen twice.
    pub ack_dup: f64,
    /// Probability that a decision travels on another CPU's decision queue.
    pub misroute: f64,
    /// How long the runtime thread is descheduled.
    pub stall: (Duration, Duration),
    /// Mean time between stalls (`ZERO`: none).
    pub stall_every: Duration,
    /// Mean time between host stops (`ZERO`: none).
    pub restart_every: Duration,
    /// How long the host stays stopped.
    pub down: (Duration, Duration),
    /// Fraction of stops that are crashes (no GOODBYE).
    pub crash_p: f64,
}

/// The keys of a chaos spec.
pub const CHAOS_KEYS: &str = "seed, after, for, delay_p, event_delay, decision_delay, \
ack_loss, ack_dup, misroute, stall, stall_every, restart_every, down, crash_p";

/// The keys of a hostile-host spec (after the leading duration).
pub const HOSTILE_KEYS: &str = "seed, after, rate";

const MS: fn(u64) -> Duration = Duration::from_millis;

impl ChaosSpec {
    /// No fault at all (every probability 0, no stall, no restart).
    pub fn none() -> Self {
        ChaosSpec {
            seed: None,
            after: Duration::ZERO,
            window: None,
            delay_p: 0.0,
            event_delay: Duration::ZERO,
            decision_delay: Duration::ZERO,
            ack_loss: 0.0,
            ack_dup: 0.0,
            misroute: 0.0,
            stall: (Duration::ZERO, Duration::ZERO),
            stall_every: Duration::ZERO,
            restart_every: Duration::ZERO,
            down: (Duration::ZERO, Duration::ZERO),
            crash_p: 0.0,
        }
    }

    /// The `default` preset: a third of the records delayed up to 2 ms, 2 % of acks lost
    /// and 2 % duplicated, 5 % of decisions on another CPU's queue, a 10-40 ms stall of
    /// the runtime thread every 500 ms on average, a host stop (100-300 ms, one in four a
    /// crash without GOODBYE) every 8 s on average.
    pub fn preset() -> Self {
        ChaosSpec {
            delay_p: 0.33,
            event_delay: MS(2),
            decision_delay: MS(2),
            ack_loss: 0.02,
            ack_dup: 0.02,
            misroute: 0.05,
            stall: (MS(10), MS(40)),
            stall_every: MS(500),
            restart_every: MS(8000),
            down: (MS(100), MS(300)),
            crash_p: 0.25,
            ..Self::none()
        }
    }

    /// Parses `default[,KEY=VALUE...]` (the preset, then changes) or `KEY=VALUE,...`
    /// (nothing but what is given). Keys: [`CHAOS_KEYS`]; `stall` and `down` take a range.
    pub fn parse(s: &str) -> Result<Self, SpecError> {
        let mut items = s
            .split(',')
            .map(str::trim)
            .filter(|i| !i.is_empty())
            .peekable();
        let mut spec = if items.peek() == Some(&"default") {
            items.next();
            Self::preset()
        } else {
            Self::none()
        };
        let mut seen = Vec::new();
        for item in items {
            let (k, v) = split_item(item, &mut seen)?;
            match k {
                "seed" => spec.seed = Some(parse_u64(k, v)?),
                "after" => spec.after = parse_duration(k, v)?,
                "for" => spec.window = Some(parse_duration(k, v)?),
                "delay_p" => spec.delay_p = parse_p(k, v)?,
                "event_delay" => spec.event_delay = parse_duration(k, v)?,
                "decision_delay" => spec.decision_delay = parse_duration(k, v)?,
                "ack_loss" => spec.ack_loss = parse_p(k, v)?,
                "ack_dup" => spec.ack_dup = parse_p(k, v)?,
                "misroute" => spec.misroute = parse_p(k, v)?,
                "stall" => spec.stall = parse_range(k, v)?,
                "stall_every" => spec.stall_every = parse_duration(k, v)?,
                "restart_every" => spec.restart_every = parse_duration(k, v)?,
                "down" => spec.down = parse_range(k, v)?,
                "crash_p" => spec.crash_p = parse_p(k, v)?,
                _ => {
                    return Err(SpecError::UnknownKey {
                        key: k.into(),
                        known: CHAOS_KEYS,
                    })
                }
            }
        }
        let too_long = |d: Duration| d > Duration::from_secs(10);
        if too_long(spec.event_delay) || too_long(spec.decision_delay) {
            return Err(bad("event_delay/decision_delay", "", "at most 10 s"));
        }
        if too_long(spec.stall.1) || too_long(spec.down.1) {
            return Err(bad("stall/down", "", "at most 10 s"));
        }
        Ok(spec)
    }
}

impl std::fmt::Display for ChaosSpec {
    /// The spec in the form [`ChaosSpec::parse`] reads (all keys; the seed if chosen).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let d = |d: Duration| format!("{}us", d.as_micros());
        if let Some(s) = self.seed {
            write!(f, "seed={s},")?;
        }
        write!(f, "after={}", d(self.after))?;
        if let Some(w) = self.window {
            write!(f, ",for={}", d(w))?;
        }
        write!(
            f,
            ",delay_p={},event_delay={},decision_delay={},ack_loss={},ack_dup={},misroute={},\
             stall={}..{},stall_every={},restart_every={},down={}..{},crash_p={}",
            self.delay_p,
            d(self.event_delay),
            d(self.decision_delay),
            self.ack_loss,
            self.ack_dup,
            self.misroute,
            d(self.stall.0),
            d(self.stall.1),
            d(self.stall_every),
            d(self.restart_every),
            d(self.down.0),
            d(self.down.1),
            self.crash_p
        )
    }
}

/// A hostile host: random but well-framed decisions, acks, HELLOs, HEARTBEATs, GOODBYEs
/// and garbage records sent to the guest at `rate` per second for `duration`, on top of
/// the policy's own traffic. See [`HostileSpec::parse`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HostileSpec {
    /// Seed (`None`: one is drawn and printed).
    pub seed: Option<u64>,
    /// Start this long after the first established session.
    pub after: Duration,
    /// How long the host is hostile.
    pub duration: Duration,
    /// Hostile records per second.
    pub rate: u32,
}

impl HostileSpec {
    /// Default rate, records per second.
    pub const DEFAULT_RATE: u32 = 2000;

    /// Parses `SECS[,rate=N][,seed=N][,after=DURATION]` (`SECS` may be fractional, or a
    /// duration with its unit).
    pub fn parse(s: &str) -> Result<Self, SpecError> {
        let mut items = s.split(',').map(str::trim);
        let first = items.next().unwrap_or("");
        let duration = match first.parse::<f64>() {
            Ok(secs) if secs.is_finite() && secs > 0.0 && secs <= 3600.0 => {
                Duration::from_secs_f64(secs)
            }
            Ok(_) => return Err(bad("duration", first, "must be in (0, 3600] seconds")),
            Err(_) => parse_duration("duration", first)?,
        };
        if duration.is_zero() {
            return Err(bad("duration", first, "must be more than 0"));
        }
        let mut spec = HostileSpec {
            seed: None,
            after: Duration::ZERO,
            duration,
            rate: Self::DEFAULT_RATE,
        };
        let mut seen = Vec::new();
        for item in items.filter(|i| !i.is_empty()) {
            let (k, v) = split_item(item, &mut seen)?;
            match k {
                "seed" => spec.seed = Some(parse_u64(k, v)?),
                "after" => spec.after = parse_duration(k, v)?,
                "rate" => {
                    spec.rate = match parse_u64(k, v)? {
                        n @ 1..=100_000 => n as u32,
                        _ => return Err(bad(k, v, "must be 1..=100000 records per second")),
                    }
                }
                _ => {
                    return Err(SpecError::UnknownKey {
                        key: k.into(),
                        known: HOSTILE_KEYS,
                    })
                }
            }
        }
        Ok(spec)
    }
}

fn bad(key: &str, value: &str, why: &'static str) -> SpecError {
    SpecError::BadValue {
        key: key.into(),
        value: value.into(),
        why,
    }
}

fn split_item<'a>(item: &'a str, seen: &mut Vec<&'a str>) -> Result<(&'a str, &'a str), SpecError> {
    let (k, v) = item
        .split_once('=')
        .ok_or_else(|| SpecError::MissingValue(item.into()))?;
    let (k, v) = (k.trim(), v.trim());
    if seen.contains(&k) {
        return Err(SpecError::Duplicate(k.into()));
    }
    seen.push(k);
    Ok((k, v))
}

fn parse_u64(key: &str, v: &str) -> Result<u64, SpecError> {
    let r = match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse(),
    };
    r.map_err(|_| bad(key, v, "not an unsigned integer"))
}

fn parse_p(key: &str, v: &str) -> Result<f64, SpecError> {
    match v.parse::<f64>() {
        Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
        _ => Err(bad(key, v, "a probability in [0, 1]")),
    }
}

/// `500us`, `20ms`, `1.5s`, `0`.
pub fn parse_duration(key: &str, v: &str) -> Result<Duration, SpecError> {
    if v == "0" {
        return Ok(Duration::ZERO);
    }
    let (num, scale) = if let Some(n) = v.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1.0)
    } else {
        return Err(bad(key, v, "a duration needs a unit: us, ms or s"));
    };
    match num.parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 && x * scale <= 86_400.0 => {
            Ok(Duration::from_secs_f64(x * scale))
        }
        _ => Err(bad(key, v, "not a duration (e.g. 20ms)")),
    }
}

fn parse_range(key: &str, v: &str) -> Result<(Duration, Duration), SpecError> {
    let (lo, hi) = v
        .split_once("..")
        .ok_or_else(|| bad(key, v, "a range LO..HI, e.g. 10ms..40ms"))?;
    let (lo, hi) = (parse_duration(key, lo)?, parse_duration(key, hi)?);
    if lo > hi {
        return Err(bad(key, v, "LO is above HI"));
    }
    Ok((lo, hi))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chaos_specs_parse_and_print_back() {
        let p = ChaosSpec::parse("default").unwrap();
        assert_eq!(p, ChaosSpec::preset());
        let s =
            ChaosSpec::parse("default, seed=0x2a ,for=30s,ack_loss=0.5,stall=1ms..2ms").unwrap();
        assert_eq!(s.seed, Some(42));
        assert_eq!(s.window, Some(Duration::from_secs(30)));
        assert_eq!(s.ack_loss, 0.5);
        assert_eq!(s.stall, (MS(1), MS(2)));
        assert_eq!(s.misroute, ChaosSpec::preset().misroute, "preset kept");
        assert_eq!(ChaosSpec::parse(&s.to_string()).unwrap(), s, "{s}");
        let only = ChaosSpec::parse("ack_dup=1").unwrap();
        assert_eq!(
            only,
            ChaosSpec {
                ack_dup: 1.0,
                ..ChaosSpec::none()
            }
        );
        assert_eq!(ChaosSpec::parse("").unwrap(), ChaosSpec::none());
        assert_eq!(
            parse_duration("k", "1.5s").unwrap(),
            Duration::from_millis(1500)
        );
        assert_eq!(
            parse_duration("k", "250us").unwrap(),
            Duration::from_micros(250)
        );
    }

    #[test]
    fn bad_chaos_specs_say_why() {
        let e = |s: &str| ChaosSpec::parse(s).unwrap_err().to_string();
        assert!(
            e("nope=1").contains("unknown key \"nope\""),
            "{}",
            e("nope=1")
        );
        assert!(e("nope=1").contains("ack_loss"));
        assert!(e("ack_loss").contains("needs a value"));
        assert!(e("ack_loss=2").contains("probability"));
        assert!(e("ack_loss=x").contains("probability"));
        assert!(e("stall=5ms").contains("range"));
        assert!(e("stall=5ms..1ms").contains("LO is above HI"));
        assert!(e("event_delay=5").contains("unit"));
        assert!(e("event_delay=-5ms").contains("not a duration"));
        assert!(e("event_delay=11s").contains("at most 10 s"));
        assert!(e("seed=1,seed=2").contains("twice"));
        assert!(e("seed=-1").contains("unsigned"));
        assert!(e("default,default").contains("needs a value"));
    }

    #[test]
    fn hostile_specs() {
        let h = HostileSpec::parse("5").unwrap();
        assert_eq!(h.duration, Duration::from_secs(5));
        assert_eq!(h.rate, HostileSpec::DEFAULT_RATE);
        assert_eq!(h.seed, None);
        let h = HostileSpec::parse("1.5,rate=500,seed=9,after=200ms").unwrap();
        assert_eq!(
            (h.duration, h.rate, h.seed, h.after),
            (MS(1500), 500, Some(9), MS(200))
        );
        assert_eq!(HostileSpec::parse("800ms").unwrap().duration, MS(800));
        let e = |s: &str| HostileSpec::parse(s).unwrap_err().to_string();
        assert!(e("0").contains("(0, 3600]"), "{}", e("0"));
        assert!(e("-1").contains("(0, 3600]"));
        assert!(e("abc").contains("unit"));
        assert!(e("").contains("unit"));
        assert!(e("5,rate=0").contains("1..=100000"));
        assert!(e("5,burst=3").contains("unknown key"));
        assert!(e("5,rate=1,rate=2").contains("twice"));
    }
}
