//! Canary analysis statistics: canary against baseline, judged by criteria
//! fixed before the rollout. Pure: the metric providers (router, Prometheus)
//! fill [`Sample`]s; a gate turns the [`Judgement`] into its verdict.
//!
//! - Error rates: the canary fails when its rate exceeds `max_error_ratio`
//!   times the baseline's AND the excess is statistically significant (a
//!   one-sided two-proportion z-test) AND above an absolute floor, so 0 vs
//!   1 error is never a failure.
//! - Latency: a one-sided Mann–Whitney U test (as Kayenta does) that the
//!   canary is slower, plus limits on the p95 and p99 the canary may add.
//! - Below `min_requests` per version nothing is judged: inconclusive.

use serde::{Deserialize, Serialize};

/// What one version served during an interval.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub requests: u64,
    /// 5xx answers, connection failures, timeouts.
    pub errors: u64,
    /// Latencies in seconds (a sample of them is enough).
    pub latencies: Vec<f64>,
}

impl Sample {
    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors as f64 / self.requests as f64
        }
    }
}

/// Criteria fixed before the rollout (policy, overridable per service).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Criteria {
    /// Canary error rate may be at most this times the baseline's.
    pub max_error_ratio: f64,
    /// Error rates below this are never a failure (0 vs 1 error).
    pub error_rate_floor: f64,
    /// Requests each version needs before anything is judged.
    pub min_requests: u64,
    /// Most the canary's p95 / p99 may exceed the baseline's, in seconds.
    pub max_p95_increase: f64,
    pub max_p99_increase: f64,
    /// Significance level of the statistical tests.
    pub alpha: f64,
}

impl Criteria {
    /// The shipped defaults with this error ratio (critical services use
    /// 1.2, others 1.5).
    pub fn with_ratio(max_error_ratio: f64) -> Self {
        Criteria {
            max_error_ratio,
            error_rate_floor: 0.01,
            min_requests: 50,
            max_p95_increase: 0.1,
            max_p99_increase: 0.15,
            alpha: 0.05,
        }
    }
}

/// The verdict of one interval, with the numbers behind it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "verdict")]
pub enum Judgement {
    Pass {
        measurements: Vec<String>,
    },
    Fail {
        metric: String,
        measurement: String,
        threshold: String,
    },
    Inconclusive {
        reason: String,
    },
}

/// Judges `canary` against `baseline` by `criteria`.
pub fn judge(criteria: &Criteria, baseline: &Sample, canary: &Sample) -> Judgement {
    if baseline.requests < criteria.min_requests || canary.requests < criteria.min_requests {
        return Judgement::Inconclusive {
            reason: format!(
                "{} baseline and {} canary requests; {} each needed",
                baseline.requests, canary.requests, criteria.min_requests
            ),
        };
    }
    let (rb, rc) = (baseline.error_rate(), canary.error_rate());
    let p_errors = proportion_p_value(
        canary.errors,
        canary.requests,
        baseline.errors,
        baseline.requests,
    );
    let limit = (rb * criteria.max_error_ratio).max(criteria.error_rate_floor);
    let errors = format!(
        "error rate {:.2}% vs baseline {:.2}% (p = {p_errors:.4})",
        rc * 100.0,
        rb * 100.0
    );
    if rc > limit && p_errors < criteria.alpha {
        return Judgement::Fail {
            metric: "error-rate".into(),
            measurement: errors,
            threshold: format!(
                "at most {}x the baseline (floor {:.2}%), significant at {}",
                criteria.max_error_ratio,
                criteria.error_rate_floor * 100.0,
                criteria.alpha
            ),
        };
    }
    let mut measurements = vec![errors];
    if !baseline.latencies.is_empty() && !canary.latencies.is_empty() {
        let p_latency = mann_whitney_greater(&canary.latencies, &baseline.latencies);
        for (q, max) in [
            (0.95, criteria.max_p95_increase),
            (0.99, criteria.max_p99_increase),
        ] {
            let (b, c) = (
                quantile(&baseline.latencies, q),
                quantile(&canary.latencies, q),
            );
            let m = format!(
                "p{} {:.0} ms vs baseline {:.0} ms (Mann-Whitney p = {p_latency:.4})",
                (q * 100.0) as u32,
                c * 1000.0,
                b * 1000.0
            );
            if c - b > max && p_latency < criteria.alpha {
                return Judgement::Fail {
                    metric: format!("latency-p{}", (q * 100.0) as u32),
                    measurement: m,
                    threshold: format!(
                        "at most {:.0} ms above the baseline, significant at {}",
                        max * 1000.0,
                        criteria.alpha
                    ),
                };
            }
            measurements.push(m);
        }
    }
    Judgement::Pass { measurements }
}

/// One-sided p-value that proportion a (x1/n1) exceeds b (x2/n2): a pooled
/// two-proportion z-test.
pub fn proportion_p_value(x1: u64, n1: u64, x2: u64, n2: u64) -> f64 {
    if n1 == 0 || n2 == 0 {
        return 1.0;
    }
    let (p1, p2) = (x1 as f64 / n1 as f64, x2 as f64 / n2 as f64);
    let pooled = (x1 + x2) as f64 / (n1 + n2) as f64;
    let se = (pooled * (1.0 - pooled) * (1.0 / n1 as f64 + 1.0 / n2 as f64)).sqrt();
    if se == 0.0 {
        return if p1 > p2 { 0.0 } else { 1.0 };
    }
    1.0 - normal_cdf((p1 - p2) / se)
}

/// One-sided p-value that values of `a` tend to be greater than those of
/// `b`: Mann–Whitney U with mid-ranks for ties and the normal
/// approximation with tie correction.
pub fn mann_whitney_greater(a: &[f64], b: &[f64]) -> f64 {
    let (n1, n2) = (a.len() as f64, b.len() as f64);
    if a.is_empty() || b.is_empty() {
        return 1.0;
    }
    let mut all: Vec<(f64, bool)> = a
        .iter()
        .map(|v| (*v, true))
        .chain(b.iter().map(|v| (*v, false)))
        .collect();
    all.sort_by(|x, y| x.0.total_cmp(&y.0));
    let n = all.len();
    let mut rank_sum_a = 0.0;
    let mut tie_term = 0.0;
    let mut i = 0;
    while i < n {
        let mut j = i;
        while j + 1 < n && all[j + 1].0 == all[i].0 {
            j += 1;
        }
        let rank = (i + j) as f64 / 2.0 + 1.0;
        let t = (j - i + 1) as f64;
        tie_term += t * t * t - t;
        rank_sum_a += all[i..=j].iter().filter(|x| x.1).count() as f64 * rank;
        i = j + 1;
    }
    let u = rank_sum_a - n1 * (n1 + 1.0) / 2.0;
    let mean = n1 * n2 / 2.0;
    let total = n1 + n2;
    let var = n1 * n2 / 12.0 * ((total + 1.0) - tie_term / (total * (total - 1.0)));
    if var <= 0.0 {
        return if u > mean { 0.0 } else { 1.0 };
    }
    // Continuity correction toward the mean.
    let z = (u - mean - 0.5) / var.sqrt();
    1.0 - normal_cdf(z)
}

/// The `q` quantile (nearest rank) of `v`.
pub fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

/// Standard normal CDF (Abramowitz–Stegun 7.1.26 erf, error < 1.5e-7).
pub fn normal_cdf(z: f64) -> f64 {
    let x = z / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.327_591_1 * x.abs());
    let poly = t
        * (0.254_829_592
            + t * (-0.284_496_736
                + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let erf = 1.0 - poly * (-x * x).exp();
    let erf = if x >= 0.0 { erf } else { -erf };
    0.5 * (1.0 + erf)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic latencies around `base` seconds with some spread.
    fn latencies(n: usize, base: f64) -> Vec<f64> {
        (0..n)
            .map(|i| base + ((i * 37) % 50) as f64 / 1000.0)
            .collect()
    }

    fn sample(requests: u64, errors: u64, base_latency: f64) -> Sample {
        Sample {
            requests,
            errors,
            latencies: latencies(requests.min(500) as usize, base_latency),
        }
    }

    #[test]
    fn a_canary_returning_5_percent_errors_fails() {
        let c = Criteria::with_ratio(1.5);
        let j = judge(&c, &sample(1000, 2, 0.02), &sample(200, 10, 0.02));
        assert!(
            matches!(&j, Judgement::Fail { metric, .. } if metric == "error-rate"),
            "{j:?}"
        );
    }

    #[test]
    fn a_critical_service_fails_at_a_lower_ratio() {
        // 1.3x the baseline: fails for critical (1.2x), passes for standard (1.5x).
        let (b, canary) = (sample(20_000, 400, 0.02), sample(20_000, 520, 0.02));
        assert!(matches!(
            judge(&Criteria::with_ratio(1.2), &b, &canary),
            Judgement::Fail { .. }
        ));
        assert!(matches!(
            judge(&Criteria::with_ratio(1.5), &b, &canary),
            Judgement::Pass { .. }
        ));
    }

    #[test]
    fn zero_versus_one_error_is_no_failure() {
        let c = Criteria::with_ratio(1.2);
        assert!(matches!(
            judge(&c, &sample(100, 0, 0.02), &sample(100, 1, 0.02)),
            Judgement::Pass { .. }
        ));
    }

    #[test]
    fn a_release_200ms_slower_fails_on_latency() {
        let c = Criteria::with_ratio(1.5);
        let j = judge(&c, &sample(300, 0, 0.020), &sample(300, 0, 0.220));
        assert!(
            matches!(&j, Judgement::Fail { metric, .. } if metric.starts_with("latency")),
            "{j:?}"
        );
        let same = judge(&c, &sample(300, 0, 0.020), &sample(300, 0, 0.020));
        assert!(matches!(same, Judgement::Pass { .. }), "{same:?}");
    }

    #[test]
    fn low_traffic_is_inconclusive() {
        let c = Criteria::with_ratio(1.5);
        assert!(matches!(
            judge(&c, &sample(1000, 0, 0.02), &sample(10, 5, 0.5)),
            Judgement::Inconclusive { .. }
        ));
    }

    #[test]
    fn statistics_match_known_values() {
        assert!((normal_cdf(0.0) - 0.5).abs() < 1e-7);
        assert!((normal_cdf(1.96) - 0.975).abs() < 1e-4);
        // Identical samples: no evidence either way.
        let a = latencies(100, 0.1);
        assert!(mann_whitney_greater(&a, &a) > 0.4);
        // Clearly greater.
        assert!(mann_whitney_greater(&latencies(50, 0.5), &latencies(50, 0.1)) < 1e-6);
        assert!(proportion_p_value(50, 1000, 10, 1000) < 1e-4);
        assert!(proportion_p_value(10, 1000, 10, 1000) > 0.4);
        assert_eq!(quantile(&[1.0, 2.0, 3.0, 4.0], 0.5), 2.0);
    }
}
