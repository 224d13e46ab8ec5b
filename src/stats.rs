//! Small statistics shared by the canary's gates and the held-out evaluation.

/// Standard normal CDF (Abramowitz–Stegun 7.1.26 erf, |error| < 1.5e-7).
pub fn normal_cdf(z: f64) -> f64 {
    let x = z.abs() / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.3275911 * x);
    let poly = t
        * (0.254829592
            + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
    let erf = 1.0 - poly * (-x * x).exp();
    if z >= 0.0 {
        0.5 * (1.0 + erf)
    } else {
        0.5 * (1.0 - erf)
    }
}

/// The `p` quantile of the standard normal (`p` in (0, 1)), by bisection on [`normal_cdf`].
pub fn normal_quantile(p: f64) -> f64 {
    let p = p.clamp(1e-12, 1.0 - 1e-12);
    let (mut low, mut high) = (-10.0f64, 10.0f64);
    for _ in 0..100 {
        let mid = (low + high) / 2.0;
        if normal_cdf(mid) < p {
            low = mid;
        } else {
            high = mid;
        }
    }
    (low + high) / 2.0
}

/// The Wilson score lower bound of a pass rate of `passed` out of `total`, one-sided at
/// `significance` (0.01: the true rate is above the bound with 99% confidence). On few cases
/// the bound is far below the raw ratio: ten passes out of ten bound the rate only at 0.65.
pub fn wilson_lower_bound(passed: usize, total: usize, significance: f64) -> f64 {
    if total == 0 {
        return 0.0;
    }
    let n = total as f64;
    let p = passed as f64 / n;
    let z = normal_quantile(1.0 - significance);
    let z2 = z * z;
    let centre = p + z2 / (2.0 * n);
    let spread = z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    ((centre - spread) / (1.0 + z2 / n)).clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_cdf_matches_known_values() {
        assert!((normal_cdf(0.0) - 0.5).abs() < 1e-7);
        assert!((normal_cdf(1.96) - 0.975).abs() < 1e-3);
        assert!((normal_cdf(-2.326) - 0.01).abs() < 1e-3);
    }

    #[test]
    fn quantiles_invert_the_cdf() {
        assert!((normal_quantile(0.975) - 1.96).abs() < 1e-3);
        assert!((normal_quantile(0.99) - 2.326).abs() < 1e-3);
        assert!(normal_quantile(0.5).abs() < 1e-9);
    }

    #[test]
    fn the_wilson_bound_needs_cases_to_be_high() {
        // 10 of 10 at 99%: 10 / (10 + z^2) = 0.649.
        assert!((wilson_lower_bound(10, 10, 0.01) - 0.649).abs() < 1e-3);
        // 200 of 200 clear 0.97; 180 of 200 (90%) bound the rate at 0.84 only.
        assert!(wilson_lower_bound(200, 200, 0.01) > 0.97);
        let ninety = wilson_lower_bound(180, 200, 0.01);
        assert!((ninety - 0.8396).abs() < 1e-3, "{ninety}");
        assert_eq!(wilson_lower_bound(0, 0, 0.01), 0.0);
        assert_eq!(wilson_lower_bound(0, 10, 0.01), 0.0);
    }
}
