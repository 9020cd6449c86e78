//! A log-linear latency histogram in the style of HdrHistogram.
//!
//! Values (nanoseconds, or any `u64`) below 128 get a bucket each; above, every power-of-two
//! range is split into 128 equal buckets, so a bucket is never wider than 1/128 of its lower
//! bound: percentiles are exact to within 0.8 %. Recording is an index computation and an
//! increment; histograms of different workers are merged at the end.

/// Bits of the sub-bucket index: 2^7 = 128 buckets per power of two.
const SUB_BITS: u32 = 7;
const SUB: u64 = 1 << SUB_BITS;
/// Buckets needed to cover every `u64`.
const BUCKETS: usize = ((64 - SUB_BITS + 1) as usize) * SUB as usize;

/// A latency histogram with about 0.8 % resolution over the whole `u64` range.
#[derive(Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    sum: u128,
    min: u64,
    max: u64,
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram")
            .field("count", &self.total)
            .field("min", &self.min())
            .field("max", &self.max)
            .finish_non_exhaustive()
    }
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

/// The bucket holding `v`.
fn index(v: u64) -> usize {
    if v < SUB {
        return v as usize;
    }
    let msb = 63 - v.leading_zeros();
    let shift = msb - SUB_BITS;
    let sub = (v >> shift) - SUB;
    (shift as usize + 1) * SUB as usize + sub as usize
}

/// The smallest and largest value of bucket `i`.
fn bounds(i: usize) -> (u64, u64) {
    let i = i as u64;
    if i < SUB {
        return (i, i);
    }
    let group = i / SUB;
    let shift = group - 1;
    let low = (SUB + i % SUB) << shift;
    (low, low + ((1u64 << shift) - 1))
}

impl Histogram {
    /// An empty histogram.
    pub fn new() -> Self {
        Self {
            counts: vec![0; BUCKETS],
            total: 0,
            sum: 0,
            min: u64::MAX,
            max: 0,
        }
    }

    /// Records one value.
    pub fn record(&mut self, v: u64) {
        self.counts[index(v)] += 1;
        self.total += 1;
        self.sum += u128::from(v);
        self.min = self.min.min(v);
        self.max = self.max.max(v);
    }

    /// Adds every value recorded in `other`.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// Values recorded.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// Smallest value recorded (0 when empty).
    pub fn min(&self) -> u64 {
        if self.total == 0 { 0 } else { self.min }
    }

    /// Largest value recorded (exact).
    pub fn max(&self) -> u64 {
        self.max
    }

    /// Mean of the recorded values (exact; 0 when empty).
    pub fn mean(&self) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        self.sum as f64 / self.total as f64
    }

    /// The value at percentile `p` (0–100): the largest value of the bucket holding the
    /// `ceil(p% × count)`-th smallest recorded value, capped at the exact maximum, so the answer
    /// is never below the true percentile and at most 0.8 % above it. 0 when empty.
    pub fn percentile(&self, p: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let p = p.clamp(0.0, 100.0);
        let rank = ((p / 100.0) * self.total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return bounds(i).1.min(self.max);
            }
        }
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn small_values_are_exact() {
        for v in 0..1000 {
            let (lo, hi) = bounds(index(v));
            if v < 256 {
                assert_eq!((lo, hi), (v, v));
            }
            assert!(lo <= v && v <= hi);
        }
    }

    #[test]
    fn buckets_tile_the_range() {
        let mut next = 0u64;
        for i in 0..BUCKETS {
            let (lo, hi) = bounds(i);
            assert_eq!(lo, next, "bucket {i} starts where the previous ended");
            assert!(hi >= lo);
            if hi == u64::MAX {
                assert_eq!(i, BUCKETS - 1);
                return;
            }
            next = hi + 1;
        }
        panic!("the last bucket does not reach u64::MAX");
    }

    #[test]
    fn percentiles_of_a_uniform_distribution() {
        let mut h = Histogram::new();
        for v in 1..=100_000u64 {
            h.record(v * 1000);
        }
        for (p, want) in [
            (50.0, 50_000_000u64),
            (99.0, 99_000_000),
            (99.9, 99_900_000),
        ] {
            let got = h.percentile(p);
            assert!(got >= want, "p{p}: {got} < {want}");
            assert!(
                (got - want) as f64 <= want as f64 / 128.0,
                "p{p}: {got} too far above {want}"
            );
        }
        assert_eq!(h.percentile(100.0), 100_000_000);
        assert_eq!(h.min(), 1000);
        assert_eq!(h.count(), 100_000);
        assert!((h.mean() - 50_000_500.0).abs() < 1e-6);
    }

    #[test]
    fn empty_and_merged() {
        let mut a = Histogram::new();
        assert_eq!(
            (a.percentile(50.0), a.min(), a.max(), a.mean()),
            (0, 0, 0, 0.0)
        );
        let mut b = Histogram::new();
        a.record(10);
        b.record(1_000_000);
        b.record(2_000_000);
        a.merge(&b);
        assert_eq!(a.count(), 3);
        assert_eq!(a.min(), 10);
        assert_eq!(a.max(), 2_000_000);
        assert_eq!(a.percentile(1.0), 10);
        assert_eq!(a.percentile(100.0), 2_000_000);
    }

    proptest! {
        #[test]
        fn every_value_lands_in_a_bucket_that_holds_it(v in any::<u64>()) {
            let i = index(v);
            prop_assert!(i < BUCKETS);
            let (lo, hi) = bounds(i);
            prop_assert!(lo <= v && v <= hi);
            // Resolution: a bucket is at most 1/128 of its lower bound wide.
            prop_assert!(hi - lo <= lo / SUB);
        }

        #[test]
        fn percentile_is_never_below_the_exact_one(
            mut vs in proptest::collection::vec(0u64..10_000_000_000, 1..400),
            p in 0.0f64..=100.0,
        ) {
            let mut h = Histogram::new();
            for &v in &vs {
                h.record(v);
            }
            vs.sort_unstable();
            let rank = ((p / 100.0) * vs.len() as f64).ceil().max(1.0) as usize;
            let exact = vs[rank - 1];
            let got = h.percentile(p);
            prop_assert!(got >= exact);
            prop_assert!(got - exact <= exact / SUB);
        }
    }
}
