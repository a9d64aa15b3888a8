//! Exponential backoff with full jitter: the n-th wait is uniform in `[0, min(cap, base·2ⁿ)]`,
//! so hundreds of nodes booting at the same moment spread their retries instead of hitting the
//! server in waves.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub const BASE: Duration = Duration::from_millis(500);
pub const CAP: Duration = Duration::from_secs(30);

#[derive(Clone, Debug)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
    state: u64,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration, seed: u64) -> Self {
        // xorshift must not start at zero.
        Self { base, cap, attempt: 0, state: seed | 1 }
    }

    /// Base 0.5 s, cap 30 s, seeded from the clock and the process id (and so different on
    /// every node even when their clocks agree, through the pid and the sub-second nanos).
    pub fn standard() -> Self {
        Self::new(BASE, CAP, entropy_seed())
    }

    /// The ceiling of the next wait, before jitter.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.base.checked_mul(factor).unwrap_or(self.cap).min(self.cap)
    }

    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let nanos = ceiling.as_nanos() as u64;
        if nanos == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(self.next_u64() % (nanos + 1))
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    fn next_u64(&mut self) -> u64 {
        // xorshift64*: plenty for jitter, no dependency.
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

pub fn entropy_seed() -> u64 {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    nanos ^ (u64::from(std::process::id()) << 32) ^ 0x9e37_79b9_7f4a_7c15
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_doubles_then_caps() {
        let mut b = Backoff::new(BASE, CAP, 42);
        let mut ceilings = Vec::new();
        for _ in 0..10 {
            ceilings.push(b.ceiling());
            b.next_delay();
        }
        assert_eq!(ceilings[0], Duration::from_millis(500));
        assert_eq!(ceilings[1], Duration::from_secs(1));
        assert_eq!(ceilings[5], Duration::from_secs(16));
        assert_eq!(ceilings[6], CAP);
        assert_eq!(ceilings[9], CAP);
        for _ in 0..100 {
            b.next_delay();
        }
        assert_eq!(b.ceiling(), CAP);
    }

    #[test]
    fn delays_are_jittered_within_the_ceiling() {
        let mut b = Backoff::new(BASE, CAP, 7);
        for _ in 0..8 {
            b.next_delay();
        }
        let delays: Vec<Duration> = (0..200).map(|_| b.next_delay()).collect();
        assert!(delays.iter().all(|d| *d <= CAP));
        let min = delays.iter().min().unwrap();
        let max = delays.iter().max().unwrap();
        // Full jitter spreads over the whole range, not around the ceiling.
        assert!(*min < Duration::from_secs(3), "{min:?}");
        assert!(*max > Duration::from_secs(27), "{max:?}");
    }

    #[test]
    fn different_seeds_differ_and_reset_restarts() {
        let mut a = Backoff::new(BASE, CAP, 1);
        let mut b = Backoff::new(BASE, CAP, 2);
        let da: Vec<_> = (0..5).map(|_| a.next_delay()).collect();
        let db: Vec<_> = (0..5).map(|_| b.next_delay()).collect();
        assert_ne!(da, db);
        a.reset();
        assert_eq!(a.ceiling(), BASE);
        assert_eq!(a.attempts(), 0);
    }
}
