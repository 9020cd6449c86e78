//! The statistics behind correlated events: Pearson correlation and z-scores.
//!
//! Both functions are total: any input (empty, mismatched lengths, `NaN`, infinities, huge or
//! constant values) yields `None` or a finite number, never a panic and never a `NaN`.

/// Pearson's correlation coefficient of two equally long samples, in `[-1, 1]`.
///
/// `None` when there are fewer than three pairs, the lengths differ, a value is not finite, or
/// either sample has no variance (a constant series never correlates with anything, even when
/// floating-point rounding would make its deviations tiny but non-zero).
///
/// ```
/// use common::events::stats::pearson;
/// let r = pearson(&[1.0, 2.0, 3.0, 4.0], &[2.0, 4.1, 5.9, 8.0]).unwrap();
/// assert!(r > 0.99);
/// assert_eq!(pearson(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0]), None);
/// ```
pub fn pearson(x: &[f64], y: &[f64]) -> Option<f64> {
    if x.len() != y.len() || x.len() < 3 {
        return None;
    }
    let (mx, sx) = centre(x)?;
    let (my, sy) = centre(y)?;
    let (mut sxx, mut syy, mut sxy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        let dx = a / sx - mx;
        let dy = b / sy - my;
        sxx += dx * dx;
        syy += dy * dy;
        sxy += dx * dy;
    }
    let n = x.len() as f64;
    if negligible(sxx, n, mx) || negligible(syy, n, my) {
        return None;
    }
    let r = sxy / (sxx.sqrt() * syy.sqrt());
    r.is_finite().then(|| r.clamp(-1.0, 1.0))
}

/// How many (sample) standard deviations `x` lies from the mean of `baseline`, as an absolute
/// value.
///
/// `None` when the baseline has fewer than two values, or `x` or a baseline value is not finite.
/// A constant baseline (up to rounding noise) gives `0` when `x` equals it and `f64::INFINITY`
/// otherwise: a series that never moved and now moves is as anomalous as it gets.
///
/// ```
/// use common::events::stats::z_score;
/// let base = [10.0, 11.0, 9.0, 10.0, 10.0];
/// assert!(z_score(&base, 10.0).unwrap() < 0.1);
/// assert!(z_score(&base, 20.0).unwrap() > 10.0);
/// assert_eq!(z_score(&[5.0, 5.0, 5.0], 6.0), Some(f64::INFINITY));
/// ```
pub fn z_score(baseline: &[f64], x: f64) -> Option<f64> {
    if baseline.len() < 2 || !x.is_finite() {
        return None;
    }
    let (m, s) = centre(baseline)?;
    let mut ss = 0.0;
    for v in baseline {
        let d = v / s - m;
        ss += d * d;
    }
    let n = baseline.len() as f64;
    let d = (x / s - m).abs();
    if negligible(ss, n, m) {
        // A constant baseline: x either sits on it (up to the same rounding noise) or moved.
        return Some(if negligible(d * d, 1.0, m) {
            0.0
        } else {
            f64::INFINITY
        });
    }
    let sd = (ss / (n - 1.0)).sqrt();
    let z = d / sd;
    if z.is_nan() { None } else { Some(z) }
}

/// The scale (largest magnitude, so squares cannot overflow) and the mean of the scaled values.
/// `None` on a non-finite value.
fn centre(v: &[f64]) -> Option<(f64, f64)> {
    let mut scale = 0.0f64;
    for x in v {
        if !x.is_finite() {
            return None;
        }
        scale = scale.max(x.abs());
    }
    if scale == 0.0 {
        scale = 1.0;
    }
    let mean = v.iter().map(|x| x / scale).sum::<f64>() / v.len() as f64;
    mean.is_finite().then_some((mean, scale))
}

/// A sum of squared deviations that is only rounding noise: every value equal up to a few ulps
/// of the (scaled) mean.
fn negligible(ss: f64, n: f64, scaled_mean: f64) -> bool {
    let ulp = 8.0 * f64::EPSILON * scaled_mean.abs().max(f64::MIN_POSITIVE);
    ss <= n * ulp * ulp
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn perfect_and_anti_correlation() {
        let x = [1.0, 2.0, 3.0, 4.0, 5.0];
        let y = [10.0, 20.0, 30.0, 40.0, 50.0];
        let z = [5.0, 4.0, 3.0, 2.0, 1.0];
        assert!((pearson(&x, &y).unwrap() - 1.0).abs() < 1e-12);
        assert!((pearson(&x, &z).unwrap() + 1.0).abs() < 1e-12);
    }

    #[test]
    fn known_coefficient() {
        // x and w are orthogonal, zero-mean and of equal norm, so r(x, c·x + s·w) = c/√(c²+s²).
        let x: Vec<f64> = (0..40).map(|i| [1.0, -1.0, 1.0, -1.0][i % 4]).collect();
        let w: Vec<f64> = (0..40).map(|i| [1.0, 1.0, -1.0, -1.0][i % 4]).collect();
        let (c, s) = (0.6, 0.8);
        let y: Vec<f64> = x.iter().zip(&w).map(|(a, b)| c * a + s * b).collect();
        assert!((pearson(&x, &y).unwrap() - 0.6).abs() < 1e-12);
    }

    #[test]
    fn degenerate_inputs() {
        assert_eq!(pearson(&[], &[]), None);
        assert_eq!(pearson(&[1.0, 2.0], &[1.0, 2.0]), None);
        assert_eq!(pearson(&[1.0, 2.0, 3.0], &[1.0, 2.0]), None);
        assert_eq!(pearson(&[1.0, f64::NAN, 3.0], &[1.0, 2.0, 3.0]), None);
        assert_eq!(pearson(&[1.0, f64::INFINITY, 3.0], &[1.0, 2.0, 3.0]), None);
        // Constants, including ones whose mean does not round-trip (0.1 · 3 / 3 ≠ 0.1).
        assert_eq!(
            pearson(&[0.1; 7], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]),
            None
        );
        assert_eq!(pearson(&[0.0; 5], &[0.0; 5]), None);
        // Differences at the level of rounding noise (0.1 + 0.2 vs 0.3) are no variance.
        let wobble = [0.3, 0.1 + 0.2, 0.3, 0.1 + 0.2, 0.3, 0.1 + 0.2];
        assert_ne!(wobble[0], wobble[1]);
        assert_eq!(pearson(&wobble, &[1.0, 2.0, 1.0, 2.0, 1.0, 2.0]), None);
        assert_eq!(z_score(&wobble, 0.3), Some(0.0));
        assert_eq!(z_score(&wobble, 0.31), Some(f64::INFINITY));
        let big = [1e300, -1e300, 1e300, -1e300];
        assert!((pearson(&big, &big).unwrap() - 1.0).abs() < 1e-12);
        assert_eq!(z_score(&[], 1.0), None);
        assert_eq!(z_score(&[1.0], 1.0), None);
        assert_eq!(z_score(&[1.0, 2.0], f64::NAN), None);
        assert_eq!(z_score(&[0.1; 9], 0.1), Some(0.0));
    }

    #[test]
    fn z_score_value() {
        // Mean 2, sample sd 1.
        let z = z_score(&[1.0, 2.0, 3.0], 5.0).unwrap();
        assert!((z - 3.0).abs() < 1e-12);
    }

    proptest! {
        #[test]
        fn pearson_is_total_and_bounded(
            x in proptest::collection::vec(any::<f64>(), 0..20),
            y in proptest::collection::vec(any::<f64>(), 0..20),
        ) {
            if let Some(r) = pearson(&x, &y) {
                prop_assert!((-1.0..=1.0).contains(&r));
            }
            if let Some(z) = z_score(&x, y.first().copied().unwrap_or(0.0)) {
                prop_assert!(z >= 0.0);
            }
        }

        #[test]
        fn pearson_is_symmetric_and_scale_invariant(
            x in proptest::collection::vec(-1e6f64..1e6, 3..30),
            y in proptest::collection::vec(-1e6f64..1e6, 3..30),
            k in 0.001f64..1000.0,
        ) {
            let n = x.len().min(y.len());
            let (x, y) = (&x[..n], &y[..n]);
            let a = pearson(x, y);
            let b = pearson(y, x);
            prop_assert_eq!(a.is_some(), b.is_some());
            if let (Some(a), Some(b)) = (a, b) {
                prop_assert!((a - b).abs() < 1e-9);
                let scaled: Vec<f64> = x.iter().map(|v| v * k).collect();
                if let Some(c) = pearson(&scaled, y) {
                    prop_assert!((a - c).abs() < 1e-6, "{a} vs {c}");
                }
            }
        }
    }
}
