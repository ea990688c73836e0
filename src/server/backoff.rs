//! Exponential back-off with jitter for server calls: a small per-thread generator seeded
//! from the system's random source (`getrandom`).
//!
//! Delays use "equal jitter": the n-th consecutive failure waits between half and all of
//! `min(cap, base · 2ⁿ⁻¹)`, so agents that lost the server at the same moment do not come
//! back in lockstep, and no delay ever collapses to zero.

use std::cell::Cell;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long to wait after consecutive failures: exponential from `base`, capped at `cap`,
/// jittered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// The (un-jittered) wait after the first failure.
    pub base: Duration,
    /// No wait is longer than this.
    pub cap: Duration,
}

impl Backoff {
    /// The jittered wait after the `failures`-th consecutive failure (1 for the first).
    pub fn delay(&self, failures: u32) -> Duration {
        let ceiling = self.ceiling(failures);
        let half = ceiling / 2;
        let spread = (ceiling - half).as_nanos().min(u128::from(u64::MAX)) as u64;
        let extra = if spread == 0 {
            0
        } else {
            next_random() % (spread + 1)
        };
        half + Duration::from_nanos(extra)
    }

    /// The un-jittered wait after the `failures`-th failure: `min(cap, base · 2^(failures-1))`.
    pub fn ceiling(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(31);
        self.base
            .checked_mul(1u32 << doublings)
            .unwrap_or(self.cap)
            .min(self.cap)
    }
}

/// How often a request that is safe to repeat is tried, and how long to wait in between.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in total, the first included (at least one is always made).
    pub max_attempts: u32,
    /// The wait after the first failure.
    pub base: Duration,
    /// The longest wait.
    pub cap: Duration,
}

impl Default for RetryPolicy {
    /// Five attempts, 300 ms doubling up to 30 s (PROTOCOL §1.2 uses 0.3 s as its factor).
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            base: Duration::from_millis(300),
            cap: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// The back-off between attempts.
    pub fn backoff(&self) -> Backoff {
        Backoff {
            base: self.base,
            cap: self.cap,
        }
    }

    /// `max_attempts`, but never zero.
    pub fn attempts(&self) -> u32 {
        self.max_attempts.max(1)
    }
}

thread_local! {
    static STATE: Cell<u64> = Cell::new(seed());
}

/// A seed that differs between processes and threads: 8 bytes from the system's random
/// source, or, should that ever fail, the clock mixed with the process id.
fn seed() -> u64 {
    let mut bytes = [0u8; 8];
    let seed = match getrandom::getrandom(&mut bytes) {
        Ok(()) => u64::from_ne_bytes(bytes),
        Err(_) => {
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0x9e37_79b9_7f4a_7c15);
            nanos ^ u64::from(std::process::id()).rotate_left(32)
        }
    };
    // xorshift must never start at zero.
    if seed == 0 {
        0x2545_f491_4f6c_dd1d
    } else {
        seed
    }
}

/// The next value of this thread's xorshift64* generator.
fn next_random() -> u64 {
    STATE.with(|state| {
        let mut x = state.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        state.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    })
}

/// A random 64-bit value, for multipart boundaries and the like (not for secrets).
pub(crate) fn random_u64() -> u64 {
    next_random()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_are_random_and_never_zero() {
        // Two draws of 64 random bits agree with probability 2^-64.
        let (a, b) = (seed(), seed());
        assert_ne!(a, b);
        assert_ne!(a, 0);
        let other = std::thread::spawn(seed)
            .join()
            .expect("the seed thread does not panic");
        assert_ne!(other, a);
    }

    #[test]
    fn ceiling_doubles_up_to_the_cap() {
        let b = Backoff {
            base: Duration::from_millis(300),
            cap: Duration::from_secs(30),
        };
        assert_eq!(b.ceiling(0), Duration::from_millis(300));
        assert_eq!(b.ceiling(1), Duration::from_millis(300));
        assert_eq!(b.ceiling(2), Duration::from_millis(600));
        assert_eq!(b.ceiling(5), Duration::from_millis(4800));
        assert_eq!(b.ceiling(8), Duration::from_secs(30));
        assert_eq!(b.ceiling(40), Duration::from_secs(30));
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(30));
    }

    #[test]
    fn delay_stays_between_half_and_all_of_the_ceiling_and_varies() {
        let b = Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(10),
        };
        let mut seen = std::collections::HashSet::new();
        for failures in 1..12 {
            for _ in 0..50 {
                let d = b.delay(failures);
                let c = b.ceiling(failures);
                assert!(d >= c / 2 && d <= c, "{d:?} outside [{:?}, {c:?}]", c / 2);
                seen.insert(d);
            }
        }
        assert!(
            seen.len() > 100,
            "jitter produced only {} values",
            seen.len()
        );
    }

    #[test]
    fn zero_base_gives_zero_delay() {
        let b = Backoff {
            base: Duration::ZERO,
            cap: Duration::from_secs(1),
        };
        assert_eq!(b.delay(3), Duration::ZERO);
    }

    #[test]
    fn attempts_are_at_least_one() {
        let p = RetryPolicy {
            max_attempts: 0,
            ..RetryPolicy::default()
        };
        assert_eq!(p.attempts(), 1);
    }
}
