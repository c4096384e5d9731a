//! Capped exponential backoff with jitter for retrying failed syncs.
//!
//! The delay doubles per consecutive failure from `initial` up to `cap`; the actual wait is
//! drawn from the upper half of that (`[d/2, d]`), so many nodes failing together (an API
//! server restart) spread their retries without ever retrying faster than half the schedule.
//! A success resets the schedule. Randomness comes from the caller, which keeps this pure.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// Retry schedule state.
#[derive(Clone, Debug)]
pub(crate) struct Backoff {
    initial: Duration,
    cap: Duration,
    failures: u32,
}

impl Backoff {
    pub(crate) fn new(initial: Duration, cap: Duration) -> Self {
        Self {
            initial,
            cap,
            failures: 0,
        }
    }

    /// The delay before the next retry; `random` picks the point within the jitter range.
    pub(crate) fn next_delay(&mut self, random: u64) -> Duration {
        let factor = 1u32.checked_shl(self.failures.min(31)).unwrap_or(u32::MAX);
        let full = self.initial.saturating_mul(factor).min(self.cap);
        self.failures = self.failures.saturating_add(1);
        let half = full / 2;
        let spread = u64::try_from((full - half).as_nanos()).unwrap_or(u64::MAX);
        half + Duration::from_nanos(random % spread.saturating_add(1))
    }

    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }
}

/// A random number for jitter. `RandomState` is seeded randomly per process and each instance
/// gets fresh keys, which is plenty for spreading retries and avoids a dependency.
pub(crate) fn jitter_seed() -> u64 {
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_within_jitter_bounds() {
        let mut low = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
        let mut high = low.clone();
        let lows: Vec<u128> = (0..10).map(|_| low.next_delay(0).as_millis()).collect();
        let highs: Vec<u128> = (0..10)
            .map(|_| high.next_delay(u64::MAX).as_millis())
            .collect();
        assert_eq!(
            lows,
            [125, 250, 500, 1000, 2000, 4000, 8000, 15000, 15000, 15000]
        );
        // u64::MAX modulo the spread lands somewhere in the upper half; bounds are what matter.
        for (attempt, (lo, hi)) in lows.iter().zip(&highs).enumerate() {
            assert!(hi >= lo && *hi <= lo * 2, "attempt {attempt}: {lo} {hi}");
        }
    }

    #[test]
    fn reset_starts_over_and_many_failures_do_not_overflow() {
        let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
        for _ in 0..100 {
            backoff.next_delay(0);
        }
        assert_eq!(backoff.next_delay(0), Duration::from_secs(15));
        backoff.reset();
        assert_eq!(backoff.next_delay(0), Duration::from_millis(125));
    }

    #[test]
    fn seeds_vary() {
        let seeds: std::collections::HashSet<u64> = (0..8).map(|_| jitter_seed()).collect();
        assert!(seeds.len() > 1);
    }
}
