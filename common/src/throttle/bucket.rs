//! Exact token amounts and the refilling bucket every dimension is made of.

use serde::{Deserialize, Serialize};
use std::fmt;

use super::HORIZON;

/// Billionths of a unit in one unit (an op or a byte).
pub(crate) const NANO: i128 = 1_000_000_000;

/// The bucket horizon in nanoseconds.
const HORIZON_NS: i128 = HORIZON.as_nanos() as i128;

/// An exact amount of tokens, in billionths of a unit (an op for the work, peak and global
/// buckets and the burst credits; a byte for the bytes bucket). Negative amounts are debt.
///
/// ```
/// use common::throttle::Tokens;
/// let t = Tokens::from_units(3);
/// assert_eq!(t.as_nanos(), 3_000_000_000);
/// assert_eq!(Tokens::from_nanos(1_500_000_000).to_string(), "1.5");
/// assert_eq!(Tokens::from_nanos(-2_500_000_000).whole_units(), -3);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Tokens(i128);

impl Tokens {
    /// No tokens.
    pub const ZERO: Tokens = Tokens(0);

    /// From billionths of a unit.
    pub const fn from_nanos(nanos: i128) -> Self {
        Tokens(nanos)
    }

    /// From whole units (ops or bytes).
    pub const fn from_units(units: u64) -> Self {
        Tokens(units as i128 * NANO)
    }

    /// In billionths of a unit.
    pub const fn as_nanos(self) -> i128 {
        self.0
    }

    /// Whole units, rounded down (towards minus infinity for debt).
    pub const fn whole_units(self) -> i128 {
        self.0.div_euclid(NANO)
    }

    /// In units, as a float for metrics (not exact).
    pub fn as_f64(self) -> f64 {
        self.0 as f64 / NANO as f64
    }
}

impl fmt::Display for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        let (int, frac) = (abs / NANO as u128, abs % NANO as u128);
        if frac == 0 {
            write!(f, "{sign}{int}")
        } else {
            let digits = format!("{frac:09}");
            write!(f, "{sign}{int}.{}", digits.trim_end_matches('0'))
        }
    }
}

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tokens({self})")
    }
}

/// A token bucket: `level` refills at `rate` billionths per nanosecond (that is, `rate` units
/// per second) up to `capacity`; it may be negative (debt) after an oversized charge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Bucket {
    rate: u64,
    capacity: i128,
    level: i128,
}

impl Bucket {
    /// A full bucket refilling at `rate` units per second and holding one horizon of it.
    pub(crate) fn full(rate: u64) -> Self {
        Self::full_with_capacity(rate, horizon_capacity(rate))
    }

    /// A full bucket with an explicit capacity (in billionths).
    pub(crate) fn full_with_capacity(rate: u64, capacity: i128) -> Self {
        let capacity = capacity.max(0);
        Bucket {
            rate,
            capacity,
            level: capacity,
        }
    }

    pub(crate) fn level(&self) -> i128 {
        self.level
    }

    pub(crate) fn capacity(&self) -> i128 {
        self.capacity
    }

    /// Adds `dt_ns` of refill; returns what did not fit (the overflow), saturated to `i128::MAX`.
    pub(crate) fn refill(&mut self, dt_ns: u64) -> i128 {
        // u64 × u64 < 2^128: exact.
        let gain = u128::from(self.rate) * u128::from(dt_ns);
        let room = self.capacity.saturating_sub(self.level).max(0) as u128;
        if gain <= room {
            // gain ≤ room < 2^127.
            self.level += gain as i128;
            0
        } else {
            self.level = self.level.max(self.capacity);
            i128::try_from(gain - room).unwrap_or(i128::MAX)
        }
    }

    /// Nanoseconds of refill until the level reaches `threshold` (0 if it already has);
    /// `u64::MAX` if it never will (threshold above capacity, or no refill) or that is too far.
    pub(crate) fn ready_in(&self, threshold: i128) -> u64 {
        if self.level >= threshold {
            return 0;
        }
        if threshold > self.capacity || self.rate == 0 {
            return u64::MAX;
        }
        // level < threshold ≤ capacity, both bounded well inside i128: the difference is
        // positive and fits.
        let need = (threshold - self.level) as u128;
        u64::try_from(need.div_ceil(u128::from(self.rate))).unwrap_or(u64::MAX)
    }

    /// Whether the bucket can pay a charge of `amount` now: it holds `min(amount, capacity)`
    /// and is not in debt.
    #[cfg(test)]
    pub(crate) fn admits(&self, amount: i128) -> bool {
        self.ready_in(self.threshold(amount)) == 0
    }

    /// Nanoseconds until [`Bucket::admits`] holds for `amount`.
    pub(crate) fn admits_in(&self, amount: i128) -> u64 {
        self.ready_in(self.threshold(amount))
    }

    /// The level needed to pay `amount`: an amount larger than the capacity needs a full bucket.
    fn threshold(&self, amount: i128) -> i128 {
        amount.min(self.capacity).max(0)
    }

    /// Takes `amount` (possibly into debt).
    pub(crate) fn take(&mut self, amount: i128) {
        self.level = self.level.saturating_sub(amount);
    }

    /// Gives back `amount` previously taken.
    pub(crate) fn give(&mut self, amount: i128) {
        self.level = self.level.saturating_add(amount).min(self.capacity);
    }

    /// Sets the level (used for floors), never above the capacity.
    pub(crate) fn set_level(&mut self, level: i128) {
        self.level = level.min(self.capacity);
    }

    /// New rate and capacity; the level is kept, clamped to the new capacity (debt is kept).
    pub(crate) fn reconfigure(&mut self, rate: u64, capacity: i128) {
        self.rate = rate;
        self.capacity = capacity.max(0);
        self.level = self.level.min(self.capacity);
    }
}

/// The capacity of a bucket refilling at `rate` units per second: one horizon of it.
pub(crate) fn horizon_capacity(rate: u64) -> i128 {
    // u64::MAX × 1e9 < 2^94: fits.
    i128::from(rate) * HORIZON_NS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refill_is_exact_and_path_independent() {
        let mut a = Bucket::full(3);
        a.take(a.capacity());
        let mut b = a.clone();
        a.refill(1);
        a.refill(333_333_332);
        b.refill(333_333_333);
        assert_eq!(a, b);
        assert_eq!(a.level(), 999_999_999);
        assert_eq!(a.ready_in(NANO), 1);
    }

    #[test]
    fn overflow_is_what_does_not_fit() {
        let mut b = Bucket::full(10);
        b.take(4 * NANO);
        assert_eq!(b.refill(1_000_000_000), 6 * NANO);
        assert_eq!(b.level(), b.capacity());
        assert_eq!(b.refill(u64::MAX), i128::from(u64::MAX) * 10);
    }

    #[test]
    fn oversize_charges_need_a_full_bucket() {
        let mut b = Bucket::full(10);
        assert!(b.admits(25 * NANO));
        b.take(25 * NANO);
        assert_eq!(b.level(), -15 * NANO);
        assert!(!b.admits(0));
        assert_eq!(b.admits_in(0), 1_500_000_000);
        assert_eq!(b.admits_in(25 * NANO), 2_500_000_000);
    }

    #[test]
    fn extreme_values_saturate() {
        let mut b = Bucket::full(u64::MAX);
        b.take(i128::MAX);
        assert!(b.level() < 0);
        assert!(b.refill(u64::MAX) > 0);
        assert_eq!(b.level(), b.capacity());
        let mut slow = Bucket::full_with_capacity(1, i128::MAX / 2);
        slow.take(i128::MAX / 2);
        assert_eq!(slow.admits_in(i128::MAX), u64::MAX);
    }

    #[test]
    fn tokens_display() {
        assert_eq!(Tokens::from_units(4).to_string(), "4");
        assert_eq!(Tokens::from_nanos(-250_000_000).to_string(), "-0.25");
        assert_eq!(Tokens::from_nanos(1).to_string(), "0.000000001");
        assert_eq!(format!("{:?}", Tokens::ZERO), "Tokens(0)");
        assert_eq!(
            Tokens::from_nanos(i128::MIN).whole_units(),
            i128::MIN.div_euclid(NANO)
        );
    }
}
