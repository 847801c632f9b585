//! Canary analysis, simulated: thousands of rollouts through the analysis
//! code itself (no processes), with the traffic of issue 15: 100 requests
//! a second, the baseline failing 0.5% of requests at random with latency
//! 20 ms plus exponential jitter of mean 10 ms, steps 10/50/100% of 10 s,
//! `criticality: critical` (1.2x), `minRequests: 60`, looked at every
//! second. For a good release and five regressions it prints the share of
//! rollouts stopped (false aborts for the good one), the share stopped at
//! the first step, and the median time to the decision; the analysis
//! sluice had before (pooled z-test and Mann-Whitney on each step's
//! running totals, failing at the first look that crosses) beside it.
//!
//! `cargo bench -p sluice-core --bench canary`. Prints figures only.

use std::time::Duration;

use sluice_core::analysis::{
    binomial_tail, hypergeometric_tail, Analysis, Criteria, Histogram, Judgement, Sample,
};
use sluice_core::traffic::latency_bounds;

const RUNS: usize = 2000;

/// SplitMix64: a seeded stream of uniform numbers.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
    fn exp(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.next()).ln()
    }
}

/// How the canary behaves, `t` seconds into the rollout.
#[derive(Clone, Copy)]
enum Canary {
    Good,
    Errors(f64),
    Slower(f64),
    Tail { share: f64, extra: f64 },
    LateErrors { after: f64, rate: f64 },
}

impl Canary {
    fn error_rate(self, t: f64) -> f64 {
        match self {
            Canary::Errors(r) => r,
            Canary::LateErrors { after, rate } if t >= after => rate,
            _ => 0.005,
        }
    }
    fn latency(self, rng: &mut Rng) -> f64 {
        let base = 0.020 + rng.exp(0.010);
        match self {
            Canary::Slower(d) => base + d,
            Canary::Tail { share, extra } if rng.next() < share => base + extra,
            _ => base,
        }
    }
}

/// One second of one version: `n` requests.
fn serve(
    rng: &mut Rng,
    n: u64,
    error_rate: f64,
    latency: impl Fn(&mut Rng) -> f64,
    bounds: &[f64],
) -> Sample {
    let mut s = Sample {
        requests: n,
        errors: 0,
        latency: Histogram {
            bounds: bounds.to_vec(),
            counts: vec![0; bounds.len()],
        },
    };
    for _ in 0..n {
        if rng.next() < error_rate {
            s.errors += 1;
        }
        let v = latency(rng);
        let i = bounds
            .iter()
            .position(|b| v <= *b)
            .unwrap_or(bounds.len() - 1);
        s.latency.counts[i] += 1;
    }
    s
}

/// When and why a rollout was stopped: (seconds, step 1-based, metric).
type Stopped = Option<(u64, usize, String)>;

fn criteria() -> Criteria {
    Criteria {
        max_error_ratio: 1.2,
        error_rate_floor: 0.01,
        min_requests: 60,
        max_p95_increase: 0.1,
        max_p99_increase: 0.15,
        alpha: 0.01,
    }
}

/// Traffic and the analysed steps: (weight %, seconds).
struct Config {
    name: &'static str,
    rps: u64,
    steps: &'static [(u64, u64)],
}

/// How the rollout is judged.
#[derive(Clone, Copy, PartialEq)]
enum Method {
    /// The analysis of before: each step's running totals, every second.
    Before,
    /// `Analysis`, every second.
    Now,
    /// A reference, not a method: one exact test of the first step's
    /// totals at its end, looked at once, at the alpha the sequential
    /// method gives each check (errors: the conditional binomial test,
    /// the uniformly most powerful unbiased test of two Poisson rates;
    /// tails: the exact pooled-quantile test of the step ends). No valid method that looks every second can
    /// do better at the first step than a test that looks once at its end.
    OneLook,
}

fn rollout(config: &Config, seed: u64, canary: Canary, method: Method) -> Stopped {
    let mut rng = Rng(seed);
    let bounds = if method == Method::Before {
        legacy::bounds()
    } else {
        latency_bounds()
    };
    let c = criteria();
    let planned = Duration::from_secs(config.steps.iter().map(|s| s.1).sum());
    let mut analysis = Analysis::new(&c, planned, config.steps.len());
    let mut t = 0;
    for (i, (weight, secs)) in config.steps.iter().enumerate() {
        let mut step_b = Sample::default();
        let mut step_c = Sample::default();
        for _ in 0..*secs {
            t += 1;
            let nc = (config.rps * weight) / 100;
            let b = serve(
                &mut rng,
                config.rps - nc,
                0.005,
                |r| 0.020 + r.exp(0.010),
                &bounds,
            );
            let k = serve(
                &mut rng,
                nc,
                canary.error_rate(t as f64),
                |r| canary.latency(r),
                &bounds,
            );
            step_b.add(&b);
            step_c.add(&k);
            let j = match method {
                Method::Before => legacy::judge(
                    &legacy::criteria(),
                    &legacy::sample(&step_b),
                    &legacy::sample(&step_c),
                ),
                Method::Now => analysis.observe(&b, &k, Duration::from_secs(1)),
                Method::OneLook => Judgement::Inconclusive {
                    reason: String::new(),
                },
            };
            if let Judgement::Fail { metric, .. } = j {
                return Some((t, i + 1, metric));
            }
        }
        if method == Method::OneLook {
            return one_look(&c, &step_b, &step_c).map(|m| (t, 1, m));
        }
        if method == Method::Now {
            if let Judgement::Fail { metric, .. } = analysis.end_step() {
                return Some((t, i + 1, metric));
            }
        }
        // The end of the step: too little canary traffic fails (policy
        // default `inconclusive: fail`).
        if step_c.requests < c.min_requests {
            return Some((t, i + 1, "inconclusive".into()));
        }
    }
    None
}

/// The one-look reference (see [`Method::OneLook`]).
fn one_look(c: &Criteria, b: &Sample, k: &Sample) -> Option<String> {
    let r = c.max_error_ratio;
    let theta = r * k.requests as f64 / (r * k.requests as f64 + b.requests as f64);
    if binomial_tail(k.errors, k.errors + b.errors, theta) <= c.alpha / 2.0
        && k.error_rate() > c.error_rate_floor
    {
        return Some("error-rate".into());
    }
    // Tails: the same exact pooled-quantile test the step ends use.
    let mut pool = b.latency.clone();
    pool.add(&k.latency);
    for (q, name, max) in [
        (0.95, "latency-p95", c.max_p95_increase),
        (0.99, "latency-p99", c.max_p99_increase),
    ] {
        let (qb, qc) = (b.latency.quantile(q), k.latency.quantile(q));
        let n = pool.total();
        let Some(near) = pool.tail_boundary(q) else {
            continue;
        };
        let far = pool.thresholds(q, max).map_or(near, |[_, far]| far);
        let test =
            |t: usize| hypergeometric_tail(k.latency.above(t), pool.above(t), k.latency.total(), n);
        let p = (2.0 * test(near).min(test(far))).min(1.0);
        if p <= c.alpha / 4.0 && qc - qb > max {
            return Some(name.into());
        }
    }
    None
}

fn main() {
    let configs = [
        Config {
            name: "issue 15's traffic: 100 req/s, steps 10% and 50% of 10 s each, then 100%",
            rps: 100,
            steps: &[(10, 10), (50, 10)],
        },
        Config {
            name:
                "the same service, first step {weight: 10, for: 60s}, then {weight: 50, for: 30s}",
            rps: 100,
            steps: &[(10, 60), (50, 30)],
        },
        Config {
            name: "a busier service: 1000 req/s, steps 10% and 50% of 10 s each",
            rps: 1000,
            steps: &[(10, 10), (50, 10)],
        },
    ];
    println!("critical (1.2x), minRequests 60, alpha 1% per rollout, a look every second; baseline 0.5% errors, 20 ms + exp(10 ms)");
    for (ci, config) in configs.iter().enumerate() {
        let first = config.steps[0].1 as f64;
        let scenarios = [
            ("good release", Canary::Good),
            ("2% errors", Canary::Errors(0.02)),
            ("5% errors", Canary::Errors(0.05)),
            ("+200 ms", Canary::Slower(0.2)),
            (
                "2% of requests +400 ms",
                Canary::Tail {
                    share: 0.02,
                    extra: 0.4,
                },
            ),
            (
                "late onset: 10% errors for the last 20% of step 1",
                Canary::LateErrors {
                    after: 0.8 * first,
                    rate: 0.1,
                },
            ),
        ];
        let methods: &[Method] = if ci == 0 {
            &[Method::Before, Method::Now, Method::OneLook]
        } else {
            &[Method::Now, Method::OneLook]
        };
        println!("\n{RUNS} rollouts each, {}", config.name);
        println!(
            "{:<58} {:>8} {:>10} {:>9} {:>12}",
            "", "stopped", "at step 1", "median s", "by"
        );
        for (name, canary) in scenarios {
            for method in methods {
                let mut stopped = 0;
                let mut first = 0;
                let mut times = Vec::new();
                let mut by = std::collections::BTreeMap::<String, usize>::new();
                for run in 0..RUNS {
                    if let Some((t, step, metric)) =
                        rollout(config, run as u64 * 7919 + 17, canary, *method)
                    {
                        stopped += 1;
                        if step == 1 {
                            first += 1;
                        }
                        times.push(t);
                        *by.entry(metric).or_default() += 1;
                    }
                }
                times.sort();
                let median = times
                    .get(times.len() / 2)
                    .map_or("-".to_string(), |t| t.to_string());
                let top = by
                    .iter()
                    .max_by_key(|(_, n)| **n)
                    .map_or("-".to_string(), |(m, _)| m.clone());
                let label = match method {
                    Method::Before => "before",
                    Method::Now => "now",
                    Method::OneLook => "one look at step 1's end",
                };
                let (stopped, median) = if *method == Method::OneLook {
                    ("-".to_string(), "-".to_string())
                } else {
                    (
                        format!("{:.1}%", 100.0 * stopped as f64 / RUNS as f64),
                        median,
                    )
                };
                println!(
                    "{:<58} {:>8} {:>9.1}% {:>9} {:>12}",
                    format!("{name} ({label})"),
                    stopped,
                    100.0 * first as f64 / RUNS as f64,
                    median,
                    top
                );
            }
        }
    }
}

/// The analysis sluice had before this change, for the comparison.
mod legacy {
    use sluice_core::analysis::{Criteria, Judgement};

    pub struct Sample {
        pub requests: u64,
        pub errors: u64,
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

    /// The criteria of before: the same, significance at 5% per look.
    pub fn criteria() -> Criteria {
        Criteria {
            alpha: 0.05,
            ..super::criteria()
        }
    }

    /// The router's 21 buckets of before.
    pub fn bounds() -> Vec<f64> {
        let mut b = vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4,
            0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0,
        ];
        b.push(f64::INFINITY);
        b
    }

    /// Latencies reconstructed from the buckets, as before: each request
    /// at its bucket's upper bound.
    pub fn sample(s: &sluice_core::analysis::Sample) -> Sample {
        let mut latencies = Vec::new();
        let mut last = 0.0;
        for (b, n) in s.latency.bounds.iter().zip(&s.latency.counts) {
            let v = if b.is_finite() {
                last = *b;
                *b
            } else {
                last
            };
            latencies.extend(std::iter::repeat_n(v, *n as usize));
        }
        Sample {
            requests: s.requests,
            errors: s.errors,
            latencies,
        }
    }

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
}
