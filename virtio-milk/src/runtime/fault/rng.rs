//! The seeded random source of chaos and hostile-host runs: SplitMix64, so a failing run
//! is reproduced by its seed alone (the runs print it).

use crate::metrics::monotonic_ns;

/// SplitMix64 (Steele, Lea, Flood 2014): 64-bit state, full period, good enough to pick
/// faults; not for cryptography.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator that repeats its sequence for the same `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// A seed nobody chose: the clock mixed with the pid (printed by the caller).
    pub fn fresh_seed() -> u64 {
        let mut r = Rng(monotonic_ns() ^ (u64::from(std::process::id()) << 40));
        r.next_u64()
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.unit() < p
    }

    /// Uniform in `[lo, hi]`.
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.below(hi - lo + 1)
    }

    /// Exponentially distributed with mean `mean` (the gap between events of a Poisson
    /// process), capped at 20 means.
    pub fn exp(&mut self, mean: u64) -> u64 {
        let u = 1.0 - self.unit(); // (0, 1]
        let x = -u.ln() * mean as f64;
        x.min(20.0 * mean as f64) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_sequence() {
        let a: Vec<u64> = (0..8)
            .scan(Rng::new(7), |r, _| Some(r.next_u64()))
            .collect();
        let b: Vec<u64> = (0..8)
            .scan(Rng::new(7), |r, _| Some(r.next_u64()))
            .collect();
        let c: Vec<u64> = (0..8)
            .scan(Rng::new(8), |r, _| Some(r.next_u64()))
            .collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn ranges_hold() {
        let mut r = Rng::new(1);
        let mut hits = 0;
        for _ in 0..10_000 {
            assert!(r.below(10) < 10);
            let v = r.between(5, 9);
            assert!((5..=9).contains(&v));
            let u = r.unit();
            assert!((0.0..1.0).contains(&u));
            if r.chance(0.25) {
                hits += 1;
            }
            assert!(r.exp(100) <= 2000);
        }
        assert!((2000..3000).contains(&hits), "{hits}");
        assert!(!r.chance(0.0));
        assert_eq!(r.below(0), 0);
        assert_eq!(r.between(3, 3), 3);
    }
}
