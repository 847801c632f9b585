//! Canary analysis: is the canary worse than the baseline? Decided while
//! traffic flows and looked at as often as the runner likes, with the
//! probability of aborting a good release over the whole rollout bounded
//! by `alpha`. Pure: metric providers fill [`Sample`]s, the progressive
//! runner feeds them to an [`Analysis`] and acts on what it says.
//!
//! # Method
//! Every check counts *events* and asks whether too many of them are the
//! canary's:
//! - `error-rate`: failed requests. Given how many requests each version
//!   served in an interval, an error is the canary's with probability
//!   θ0 = r·nc / (r·nc + nb) if the canary's error rate is `r` (the
//!   tolerated ratio, `maxErrorRatio`) times the baseline's. The test is on
//!   the origins of the errors, conditional on their number: exact at any
//!   count (the conditional binomial test, the small-count analogue of
//!   Fisher's), with no normal approximation and no estimate of the
//!   baseline's rate.
//! - `latency-p95`, `latency-p99`: requests slower than the baseline's
//!   quantile, and slower than that plus the allowed increase (thresholds
//!   from the baseline's traffic before the interval); the same test of
//!   origins with r = 1, "no slower" as the null. A slow tail is judged on
//!   its own, not through a test of the whole distribution. Blue-green has
//!   no concurrent baseline: its canary's share above a 99% upper bound of
//!   the reference's quantile is tested against 1 - q instead.
//!
//! Two tests per check, sharing its alpha:
//! - Every look: a mixture likelihood ratio over a grid of alternatives
//!   (Robbins' mixture sequential test) and over change points, the times
//!   a regression may have started (one per [`BLOCK`] of the planned
//!   analysis, half the prior on the start). Each component is a product
//!   of per-interval likelihood ratios with expectation at most one under
//!   the null, so the mixture is a nonnegative supermartingale starting at
//!   one, and by Ville's inequality it ever reaches 2/α_check with
//!   probability at most α_check/2, however often it is looked at. A
//!   regression that starts mid-rollout is weighed from where it starts.
//! - Each step's end ([`Analysis::end_step`]): an exact test of the step's
//!   totals (errors: conditional binomial; tails: Mood's quantile test,
//!   hypergeometric, on the pooled requests at two pool-chosen
//!   thresholds), at α_check / (2 · planned steps) each.
//!
//! The checks share `alpha`: half to errors, a quarter to each tail. A
//! failure also needs the effect to matter: an error rate above the floor
//! and above `r` times the baseline's, a quantile more than its allowed
//! increase above the baseline's.
//!
//! # Assumptions
//! The router splits requests between the versions at random, so both see
//! the same mix; each version's events are independent given its traffic.
//! Sampling a fixed number of requests spreads the origin counts less than
//! the binomial, which only makes the tests conservative (Hoeffding, 1963).
//!
//! # References
//! Wald (1945), sequential probability ratio tests; Ville (1939), the
//! maximal inequality; Robbins (1970), mixture sequential tests; Lorden and
//! Pollak (2005), mixtures over change points; Johari, Pekelis, Walsh
//! (2017), always-valid p-values for continuously monitored A/B tests; Mood
//! (1950), the quantile test.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Latencies as a histogram: per-bucket counts (not cumulative) under
/// ascending upper bounds in seconds; the last bound may be infinite.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    pub bounds: Vec<f64>,
    pub counts: Vec<u64>,
}

impl Histogram {
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Adds `other` (same bounds; empty takes its bounds).
    pub fn add(&mut self, other: &Histogram) {
        if self.bounds.is_empty() {
            *self = other.clone();
            return;
        }
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
    }

    /// The upper bound of the bucket holding rank `rank` (1-based), the
    /// last finite bound for the overflow bucket, None past the total.
    fn at_rank(&self, rank: u64) -> Option<(usize, f64)> {
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank && rank > 0 {
                let b = self.bounds.get(i).copied().unwrap_or(f64::INFINITY);
                let b = if b.is_finite() {
                    b
                } else {
                    self.bounds
                        .iter()
                        .rev()
                        .copied()
                        .find(|b| b.is_finite())
                        .unwrap_or(0.0)
                };
                return Some((i, b));
            }
        }
        None
    }

    /// The `q` quantile (nearest rank), as its bucket's upper bound.
    pub fn quantile(&self, q: f64) -> f64 {
        let n = self.total();
        if n == 0 {
            return 0.0;
        }
        let rank = (q * n as f64).ceil().max(1.0) as u64;
        self.at_rank(rank.min(n)).map_or(0.0, |(_, b)| b)
    }

    /// A one-sided 99% upper confidence bound of the `q` quantile (its
    /// bucket index), from the order statistics; None with too few
    /// observations to bound it.
    fn quantile_upper(&self, q: f64) -> Option<usize> {
        let n = self.total() as f64;
        // Normal approximation of the binomial rank, z = 2.33.
        let rank = (q * n + 2.33 * (n * q * (1.0 - q)).sqrt() + 1.0).ceil();
        if rank > n {
            return None;
        }
        self.at_rank(rank as u64).map(|(i, _)| i)
    }

    /// The two tail thresholds of a quantile, as buckets: the `q`
    /// quantile's, and the first whose upper bound is `delta` or more
    /// above it. None when empty.
    pub fn thresholds(&self, q: f64, delta: f64) -> Option<[usize; 2]> {
        let n = self.total();
        let (i, b) = self.at_rank(((q * n as f64).ceil() as u64).max(1))?;
        Some([i, self.bucket_at(b + delta)])
    }

    /// The first bucket whose upper bound is at least `v`.
    fn bucket_at(&self, v: f64) -> usize {
        self.bounds
            .iter()
            .position(|b| *b >= v)
            .unwrap_or(self.bounds.len().saturating_sub(1))
    }

    /// The bucket boundary for a tail test at `q`: the upper bound of the
    /// bucket below the `q` quantile's, unless more than three times a
    /// share `1 - q` is slower than it; then the quantile's own. (Buckets
    /// are coarse: a slowdown can put every slow request into the
    /// quantile's bucket, leaving none above its upper bound.)
    pub fn tail_boundary(&self, q: f64) -> Option<usize> {
        let n = self.total();
        let (i, _) = self.at_rank(((q * n as f64).ceil() as u64).max(1))?;
        let want = (1.0 - q) * n as f64;
        match i.checked_sub(1) {
            Some(j) if self.above(j) as f64 <= 3.0 * want + 1.0 || self.above(i) == 0 => Some(j),
            _ if self.above(i) > 0 => Some(i),
            _ => None,
        }
    }

    /// Observations in the buckets after bucket `i`: all slower than its
    /// upper bound.
    pub fn above(&self, i: usize) -> u64 {
        self.counts.iter().skip(i + 1).sum()
    }
}

/// What one version served during an interval.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub requests: u64,
    /// 5xx answers, connection failures, timeouts.
    pub errors: u64,
    pub latency: Histogram,
}

impl Sample {
    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors as f64 / self.requests as f64
        }
    }

    pub fn add(&mut self, other: &Sample) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.latency.add(&other.latency);
    }
}

/// Criteria fixed before the rollout (policy, overridable per service).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Criteria {
    /// Canary error rate may be at most this times the baseline's.
    pub max_error_ratio: f64,
    /// Error rates below this are never a failure, however significant.
    pub error_rate_floor: f64,
    /// Requests the canary needs in a step before the step can pass.
    pub min_requests: u64,
    /// Most the canary's p95 / p99 may exceed the baseline's, in seconds.
    pub max_p95_increase: f64,
    pub max_p99_increase: f64,
    /// Probability of aborting a good release, over the whole rollout.
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
            alpha: 0.01,
        }
    }
}

/// The verdict of one look, with the numbers behind it.
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

/// The alternatives a check's mixture weighs, equally: how many times the
/// tolerated rate (errors) or share (tails) the canary may really have.
const ERROR_RATIOS: [f64; 9] = [1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 8.0, 15.0, 30.0];
const TAIL_RATIOS: [f64; 8] = [1.5, 2.0, 3.0, 5.0, 8.0, 15.0, 30.0, 100.0];

/// Change points are weighed no finer than this (see the module docs).
pub const BLOCK: Duration = Duration::from_secs(5);
/// At most this many change points per rollout: longer rollouts get
/// longer blocks, so a look costs the same however long the rollout.
const MAX_STARTS: usize = 32;

/// What one martingale of a check has seen since it started.
#[derive(Clone, Debug, Default)]
struct Window {
    /// Prior weight of this start (the starts' weights sum to one).
    weight: f64,
    /// When it started, into the analysis.
    since: Duration,
    /// log likelihood ratio per alternative.
    log_lr: Vec<f64>,
    baseline: Sample,
    canary: Sample,
}

impl Window {
    /// This martingale's share of the statistic: weight × mean ratio.
    fn value(&self) -> f64 {
        let w = self.weight / self.log_lr.len() as f64;
        self.log_lr.iter().map(|l| w * l.exp()).sum()
    }
}

/// One check: a mixture martingale over alternatives and over the time
/// the regression started (see the module docs).
#[derive(Clone, Debug)]
struct Check {
    metric: &'static str,
    alpha: f64,
    alternatives: usize,
    /// Started windows, oldest first; the first starts with the analysis.
    windows: Vec<Window>,
    /// Weight of each start still to come, and how many remain.
    later_weight: f64,
    later: usize,
}

impl Check {
    fn new(metric: &'static str, alpha: f64, alternatives: usize, starts: usize) -> Check {
        // Half the prior on a regression present from the start (the
        // usual case: a bad release is bad at once), half spread over the
        // later change points.
        let (first, later_weight) = if starts > 1 {
            (0.5, 0.5 / (starts - 1) as f64)
        } else {
            (1.0, 0.0)
        };
        let mut check = Check {
            metric,
            alpha,
            alternatives,
            windows: Vec::new(),
            later_weight,
            later: starts,
        };
        check.start(Duration::ZERO, first);
        check
    }

    fn start(&mut self, since: Duration, weight: f64) {
        self.later = self.later.saturating_sub(1);
        self.windows.push(Window {
            weight,
            since,
            log_lr: vec![0.0; self.alternatives],
            ..Window::default()
        });
    }

    /// Starts the next change point's martingale, if one is planned.
    fn next_start(&mut self, since: Duration) {
        if self.later > 0 {
            self.start(since, self.later_weight);
        }
    }

    /// Adds one interval: its log likelihood ratio per alternative and
    /// the traffic it came from, to every started window.
    fn add(&mut self, log_lr: &[f64], baseline: &Sample, canary: &Sample) {
        for w in &mut self.windows {
            for (l, x) in w.log_lr.iter_mut().zip(log_lr) {
                *l += x;
            }
            w.baseline.add(baseline);
            w.canary.add(canary);
        }
    }

    /// The statistic: the mixture's value, windows not started yet
    /// counting at their prior weight. Starts at one; under no
    /// regression its expectation stays at most one.
    fn statistic(&self) -> f64 {
        let started: f64 = self.windows.iter().map(Window::value).sum();
        started + self.later as f64 * self.later_weight
    }

    /// The window with the most evidence: the one a failure is about.
    fn strongest(&self) -> &Window {
        self.windows
            .iter()
            .max_by(|a, b| a.value().total_cmp(&b.value()))
            .expect("a check has its first window from the start")
    }

    /// The threshold the statistic must reach: 1/α for the half of the
    /// check's alpha it has (Ville's inequality).
    fn threshold(&self) -> f64 {
        2.0 / self.alpha
    }
}

/// log likelihood ratios of `x` events in `n` trials, event probability
/// `p0 · ρ` against `p0`, for each ρ.
fn binomial_log_lr(x: f64, n: f64, p0: f64, ratios: &[f64]) -> Vec<f64> {
    ratios
        .iter()
        .map(|rho| {
            let p1 = (p0 * rho).min(0.999);
            x * (p1 / p0).ln() + (n - x) * ((1.0 - p1) / (1.0 - p0)).ln()
        })
        .collect()
}

/// log likelihood ratios of where `xc + xb` events came from: `xc` from
/// the canary (`nc` requests), `xb` from the baseline (`nb`). An event is
/// the canary's with probability θ = λ·nc / (λ·nc + nb) when the canary's
/// rate of them is λ times the baseline's: λ = `r`·ρ against λ = `r`, for
/// each ρ. Conditional on the number of events, so the baseline's own rate
/// needs no estimate; under sampling without replacement (a fixed number
/// of requests) the count is less spread than binomial, which only makes
/// the test more conservative (Hoeffding, 1963).
fn origin_log_lr(xc: f64, xb: f64, nc: f64, nb: f64, r: f64, ratios: &[f64]) -> Vec<f64> {
    let theta = |ratio: f64| ratio * nc / (ratio * nc + nb);
    let t0 = theta(r);
    ratios
        .iter()
        .map(|rho| {
            let t1 = theta(rho * r);
            xc * (t1 / t0).ln() + xb * ((1.0 - t1) / (1.0 - t0)).ln()
        })
        .collect()
}

/// One rollout's analysis: fed each interval's traffic, it says whether a
/// check has failed. Everything it decides holds for the whole rollout, so
/// one `Analysis` lives from the first step to the promotion.
#[derive(Clone, Debug)]
pub struct Analysis {
    criteria: Criteria,
    block: Duration,
    elapsed: Duration,
    next_start: Duration,
    errors: Check,
    p95: Check,
    p99: Check,
    /// Canary latency not yet judged by a tail check, because the
    /// baseline had too little traffic to bound its quantile: judged in
    /// one piece once it can be.
    pending: [Option<Sample>; 2],
    /// Totals over the rollout so far, and over the current step.
    baseline: Sample,
    canary: Sample,
    step: (Sample, Sample),
    /// Steps planned, and ended so far: each step's end has an exact test
    /// of the step's totals (see the module docs).
    steps: usize,
    ended: usize,
    /// Blue-green: the baseline gets no traffic during the analysis; the
    /// new release is judged against this record of it instead.
    reference: bool,
}

impl Analysis {
    /// For a rollout planned to analyse for at most `planned`, in `steps`
    /// steps.
    pub fn new(criteria: &Criteria, planned: Duration, steps: usize) -> Analysis {
        let block = BLOCK.max(planned / MAX_STARTS as u32);
        let starts = (planned.as_secs_f64() / block.as_secs_f64())
            .ceil()
            .max(1.0) as usize;
        let a = criteria.alpha;
        Analysis {
            criteria: criteria.clone(),
            block,
            elapsed: Duration::ZERO,
            next_start: block,
            errors: Check::new("error-rate", a / 2.0, ERROR_RATIOS.len(), starts),
            p95: Check::new("latency-p95", a / 4.0, 2 * TAIL_RATIOS.len(), starts),
            p99: Check::new("latency-p99", a / 4.0, 2 * TAIL_RATIOS.len(), starts),
            pending: [Some(Sample::default()), Some(Sample::default())],
            baseline: Sample::default(),
            canary: Sample::default(),
            step: (Sample::default(), Sample::default()),
            steps: steps.max(1),
            ended: 0,
            reference: false,
        }
    }

    /// Judges against `history` (what the baseline served before) rather
    /// than concurrent baseline traffic: for blue-green, where the old
    /// release serves nothing once switched. Errors are then a one-sample
    /// test against `r` times the upper 99.9% bound of the history's rate.
    pub fn set_reference(&mut self, history: Sample) {
        self.baseline = history;
        self.reference = true;
    }

    /// Blue-green: a 99.9% upper bound of the reference's error rate.
    fn reference_rate_bound(&self) -> f64 {
        let (e, n) = (self.baseline.errors as f64, self.baseline.requests as f64);
        if n > 0.0 {
            (e + 3.09 * e.sqrt() + 3.0) / n
        } else {
            1.0
        }
    }

    /// Totals over the rollout so far: (baseline, canary).
    pub fn totals(&self) -> (&Sample, &Sample) {
        (&self.baseline, &self.canary)
    }

    /// Takes one interval of `elapsed` in which the versions served
    /// `baseline` and `canary`; Fail if a check failed, else Pass with the
    /// evidence so far.
    pub fn observe(&mut self, baseline: &Sample, canary: &Sample, elapsed: Duration) -> Judgement {
        let r = self.criteria.max_error_ratio;
        let (nc, nb) = (canary.requests as f64, baseline.requests as f64);
        let (ec, eb) = (canary.errors as f64, baseline.errors as f64);
        // Errors.
        let errors = if self.reference {
            // One sample: the canary's rate against r times what the
            // baseline's rate can have been (a 99.9% upper bound).
            let upper = self.reference_rate_bound();
            let p0 = (r * upper).clamp(1e-6, 0.5);
            binomial_log_lr(ec, nc, p0, &ERROR_RATIOS)
        } else if nc > 0.0 && nb > 0.0 {
            // Which version each error came from: from the canary with
            // probability θ = λ·nc / (λ·nc + nb) when its rate is λ times
            // the baseline's.
            origin_log_lr(ec, eb, nc, nb, r, &ERROR_RATIOS)
        } else {
            vec![0.0; ERROR_RATIOS.len()]
        };
        self.errors.add(&errors, baseline, canary);
        // Tails.
        let c = &self.criteria;
        for (which, q, delta) in [(0, 0.95, c.max_p95_increase), (1, 0.99, c.max_p99_increase)] {
            let check = if which == 0 {
                &mut self.p95
            } else {
                &mut self.p99
            };
            let lr = if self.reference {
                // Blue-green: canary requests slower than the reference's
                // quantile (a 99% upper bound of it), at most a share
                // 1 - q if the new release is no slower. Canary traffic
                // before the reference can bound it is judged in one piece
                // once it can be.
                let bound = self.baseline.latency.quantile_upper(q);
                let judged = match (&mut self.pending[which], bound) {
                    (Some(pending), None) => {
                        pending.add(canary);
                        None
                    }
                    (pending, Some(bucket)) => {
                        let mut held = pending.take().unwrap_or_default();
                        held.add(canary);
                        Some((held, bucket))
                    }
                    (None, None) => None,
                };
                let one = match &judged {
                    Some((held, bucket)) if held.latency.total() > 0 => {
                        let n = held.latency.total() as f64;
                        let x = held.latency.above(*bucket) as f64;
                        binomial_log_lr(x, n, 1.0 - q, &TAIL_RATIOS)
                    }
                    _ => vec![0.0; TAIL_RATIOS.len()],
                };
                [one.clone(), one].concat()
            } else {
                // Two thresholds from the baseline's traffic before this
                // interval: its q quantile, and that plus the allowed
                // increase. Of this interval's requests slower than one,
                // each is the canary's with probability θ0 = nc/(nc + nb)
                // if the versions' latencies are alike.
                let (nc, nb) = (
                    canary.latency.total() as f64,
                    baseline.latency.total() as f64,
                );
                match self.baseline.latency.thresholds(q, delta) {
                    Some(ts) if nc > 0.0 && nb > 0.0 => ts
                        .iter()
                        .flat_map(|t| {
                            origin_log_lr(
                                canary.latency.above(*t) as f64,
                                baseline.latency.above(*t) as f64,
                                nc,
                                nb,
                                1.0,
                                &TAIL_RATIOS,
                            )
                        })
                        .collect(),
                    _ => vec![0.0; 2 * TAIL_RATIOS.len()],
                }
            };
            check.add(&lr, baseline, canary);
        }
        if !self.reference {
            self.baseline.add(baseline);
        }
        self.canary.add(canary);
        self.step.0.add(baseline);
        self.step.1.add(canary);
        let verdict = self.verdicts();
        // Change points: the martingales that start from now on.
        self.elapsed += elapsed;
        while self.elapsed >= self.next_start {
            for check in [&mut self.errors, &mut self.p95, &mut self.p99] {
                check.next_start(self.next_start);
            }
            self.next_start += self.block;
        }
        verdict
    }

    /// The end of a step: the exact test of the step's totals, each
    /// planned step's end at its share of the other half of each check's
    /// alpha. Fail if one fails; the next step starts afresh.
    pub fn end_step(&mut self) -> Judgement {
        let (b, k) = std::mem::take(&mut self.step);
        self.ended += 1;
        if self.ended > self.steps {
            // More steps than planned (a held step): no alpha left for them.
            return Judgement::Pass {
                measurements: Vec::new(),
            };
        }
        let c = &self.criteria;
        let share = 2.0 * self.steps as f64;
        let r = c.max_error_ratio;
        // Errors: the conditional binomial test (blue-green: one sample
        // against the reference's upper bound).
        let (p, b) = if self.reference {
            let upper = self.reference_rate_bound();
            let p0 = (r * upper).min(1.0);
            (binomial_tail(k.errors, k.requests, p0), &self.baseline)
        } else {
            let (nc, nb) = (k.requests as f64, b.requests as f64);
            let theta = if nc + nb > 0.0 {
                r * nc / (r * nc + nb)
            } else {
                1.0
            };
            (binomial_tail(k.errors, k.errors + b.errors, theta), &b)
        };
        let need = self.errors.alpha / share;
        let (rb, rc) = (b.error_rate(), k.error_rate());
        let m = format!(
            "error rate {:.2}% ({} of {}) vs baseline {:.2}% ({} of {}) in step {}; exact p = {} at the step's end",
            rc * 100.0,
            k.errors,
            k.requests,
            rb * 100.0,
            b.errors,
            b.requests,
            self.ended,
            round_p(p)
        );
        if p <= need && rc > c.error_rate_floor && rc > rb * r {
            return Judgement::Fail {
                metric: self.errors.metric.into(),
                measurement: m,
                threshold: format!(
                    "at most {}x the baseline's error rate (and above {:.2}%); p at most {} to fail; false aborts over the rollout at most {}",
                    r,
                    c.error_rate_floor * 100.0,
                    round_p(need),
                    c.alpha
                ),
            };
        }
        let mut measurements = vec![m];
        // Tails: of the step's requests slower than the pooled quantile,
        // how many were the canary's? If both versions' latencies are
        // alike, the canary's requests are a random subset of the pool and
        // that count is hypergeometric, whatever the distribution, at any
        // count: an exact test (Mood's quantile test), with no estimate of
        // the baseline's quantile to bound.
        if self.reference {
            // Blue-green: no concurrent baseline to pool with; the
            // martingale against the reference judges tails.
            return Judgement::Pass { measurements };
        }
        let mut pool = b.latency.clone();
        pool.add(&k.latency);
        for (check, q, max) in [
            (&self.p95, 0.95f64, c.max_p95_increase),
            (&self.p99, 0.99, c.max_p99_increase),
        ] {
            // Two boundaries, from the pool alone so the test stays exact:
            // the pooled quantile's bucket's upper bound or the one below
            // (whichever has nearer a share 1 - q slower than it; the one
            // below when the quantile's bucket holds all the slow
            // requests), and the first at least the allowed increase above
            // the pooled quantile. The smaller p, doubled (Bonferroni).
            let Some(near) = pool.tail_boundary(q) else {
                continue;
            };
            let far = pool.thresholds(q, max).map_or(near, |[_, far]| far);
            let name = format!("p{}", (q * 100.0).round() as u32);
            let (qb, qc) = (b.latency.quantile(q), k.latency.quantile(q));
            let test = |t: usize| {
                let p = hypergeometric_tail(
                    k.latency.above(t),
                    pool.above(t),
                    k.latency.total(),
                    pool.total(),
                );
                (p, t)
            };
            let (p, bucket) = [test(near), test(far)]
                .into_iter()
                .min_by(|x, y| x.0.total_cmp(&y.0))
                .unwrap_or((1.0, near));
            let p = (2.0 * p).min(1.0);
            let n = pool.total();
            let slower = k.latency.above(bucket);
            let need = check.alpha / share;
            let t = pool.bounds.get(bucket).copied().unwrap_or(f64::INFINITY);
            let m = format!(
                "{name} {:.0} ms vs baseline {:.0} ms in step {}; {} of the {} requests slower than {:.0} ms were the canary's ({} of {} requests); exact p = {} at the step's end",
                qc * 1000.0,
                qb * 1000.0,
                self.ended,
                slower,
                pool.above(bucket),
                t * 1000.0,
                k.latency.total(),
                n,
                round_p(p)
            );
            if p <= need && qc - qb > max {
                return Judgement::Fail {
                    metric: check.metric.into(),
                    measurement: m,
                    threshold: format!(
                        "{name} at most {:.0} ms above the baseline's; p at most {} to fail; false aborts over the rollout at most {}",
                        max * 1000.0,
                        round_p(need),
                        c.alpha
                    ),
                };
            }
            measurements.push(m);
        }
        Judgement::Pass { measurements }
    }

    fn verdicts(&self) -> Judgement {
        let c = &self.criteria;
        let mut measurements = Vec::new();
        // Errors.
        let stat = self.errors.statistic();
        let need = self.errors.threshold();
        let w = self.errors.strongest();
        let b = if self.reference {
            &self.baseline
        } else {
            &w.baseline
        };
        let (rb, rc) = (b.error_rate(), w.canary.error_rate());
        let m = format!(
            "error rate {:.2}% ({} of {}) vs baseline {:.2}% ({} of {}){}; evidence {} of {} to fail",
            rc * 100.0,
            w.canary.errors,
            w.canary.requests,
            rb * 100.0,
            b.errors,
            b.requests,
            since(w.since),
            round(stat),
            round(need)
        );
        if stat >= need && rc > c.error_rate_floor && rc > rb * c.max_error_ratio {
            return Judgement::Fail {
                metric: self.errors.metric.into(),
                measurement: m,
                threshold: format!(
                    "at most {}x the baseline's error rate (and above {:.2}%); false aborts over the rollout at most {}",
                    c.max_error_ratio,
                    c.error_rate_floor * 100.0,
                    c.alpha
                ),
            };
        }
        measurements.push(m);
        // Tails.
        let base = &self.baseline.latency;
        for (check, q, max) in [
            (&self.p95, 0.95f64, c.max_p95_increase),
            (&self.p99, 0.99, c.max_p99_increase),
        ] {
            let name = format!("p{}", (q * 100.0).round() as u32);
            let qb = base.quantile(q);
            let w = check.strongest();
            let qc = w.canary.latency.quantile(q);
            let stat = check.statistic();
            let need = check.threshold();
            let ms =
                |bucket: usize| base.bounds.get(bucket).copied().unwrap_or(f64::INFINITY) * 1000.0;
            let counts = if self.reference {
                match base.quantile_upper(q) {
                    Some(t) => format!(
                        "{} of {} requests slower than {:.0} ms (at most {:.0}% if no slower)",
                        w.canary.latency.above(t),
                        w.canary.latency.total(),
                        ms(t),
                        (1.0 - q) * 100.0
                    ),
                    None => "too little reference traffic to bound its quantile yet".into(),
                }
            } else {
                match base.thresholds(q, max) {
                    Some(ts) => ts
                        .iter()
                        .map(|t| {
                            format!(
                                "slower than {:.0} ms: {} of {} canary vs {} of {} baseline requests",
                                ms(*t),
                                w.canary.latency.above(*t),
                                w.canary.latency.total(),
                                w.baseline.latency.above(*t),
                                w.baseline.latency.total()
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(", "),
                    None => "no baseline traffic yet".into(),
                }
            };
            let m = format!(
                "{name} {:.0} ms vs baseline {:.0} ms{}; {counts}; evidence {} of {} to fail",
                qc * 1000.0,
                qb * 1000.0,
                since(w.since),
                round(stat),
                round(need)
            );
            if stat >= need && qc - qb > max {
                return Judgement::Fail {
                    metric: check.metric.into(),
                    measurement: m,
                    threshold: format!(
                        "{name} at most {:.0} ms above the baseline's; false aborts over the rollout at most {}",
                        max * 1000.0,
                        c.alpha
                    ),
                };
            }
            measurements.push(m);
        }
        Judgement::Pass { measurements }
    }
}

/// " since 15 s into the analysis" for a window that started late.
fn since(t: Duration) -> String {
    if t.is_zero() {
        String::new()
    } else {
        format!(" since {} s into the analysis", t.as_secs())
    }
}

/// P(X ≥ x) for X ~ Binomial(n, p): the exact one-sided p-value.
pub fn binomial_tail(x: u64, n: u64, p: f64) -> f64 {
    if x == 0 {
        return 1.0;
    }
    if x > n || p <= 0.0 {
        return 0.0;
    }
    if p >= 1.0 {
        return 1.0;
    }
    // Sum P(X = i) for i ≥ x by the recurrence of consecutive terms,
    // starting from the log of the first.
    let mut log_term = ln_choose(n, x) + x as f64 * p.ln() + (n - x) as f64 * (1.0 - p).ln();
    let odds = (p / (1.0 - p)).ln();
    let mut sum = 0.0;
    for i in x..=n {
        let term = log_term.exp();
        sum += term;
        if term < sum * 1e-17 {
            break;
        }
        log_term += ((n - i) as f64 / (i + 1) as f64).ln() + odds;
    }
    sum.min(1.0)
}

/// P(X ≥ x) for X ~ Hypergeometric: `x` or more of `drawn` marked items
/// when `marked` of `total` items are drawn at random... here: of the
/// `slower` requests of a pool of `total`, `x` or more from the `marked`
/// canary ones.
pub fn hypergeometric_tail(x: u64, slower: u64, marked: u64, total: u64) -> f64 {
    if x == 0 {
        return 1.0;
    }
    let top = slower.min(marked);
    if x > top || total == 0 {
        return 0.0;
    }
    let all = ln_choose(total, slower);
    let mut sum = 0.0;
    for i in x..=top {
        if slower - i > total - marked {
            continue;
        }
        sum += (ln_choose(marked, i) + ln_choose(total - marked, slower - i) - all).exp();
    }
    sum.min(1.0)
}

/// ln C(n, k).
fn ln_choose(n: u64, k: u64) -> f64 {
    ln_gamma(n as f64 + 1.0) - ln_gamma(k as f64 + 1.0) - ln_gamma((n - k) as f64 + 1.0)
}

/// ln Γ(x) for x > 0 (Lanczos, g = 7, 9 terms: about 15 digits).
fn ln_gamma(x: f64) -> f64 {
    const G: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection.
        return (std::f64::consts::PI / (std::f64::consts::PI * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let t = x + 7.5;
    let sum: f64 = G[0]
        + G[1..]
            .iter()
            .enumerate()
            .map(|(i, g)| g / (x + i as f64 + 1.0))
            .sum::<f64>();
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + sum.ln()
}

/// A p-value for people.
fn round_p(p: f64) -> String {
    if p >= 0.001 {
        format!("{p:.4}")
    } else {
        format!("{p:.1e}")
    }
}

/// Evidence for people: 3 significant figures.
fn round(x: f64) -> String {
    if !x.is_finite() {
        return "∞".into();
    }
    if x >= 100.0 {
        format!("{:.0}", x)
    } else if x >= 1.0 {
        format!("{:.1}", x)
    } else {
        format!("{:.2}", x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The router's log-spaced buckets, with `n` requests spread as
    /// `latency(i)` says.
    fn histogram(n: u64, latency: impl Fn(u64) -> f64) -> Histogram {
        let bounds = crate::traffic::latency_bounds();
        let mut counts = vec![0; bounds.len()];
        for i in 0..n {
            let v = latency(i);
            let b = bounds
                .iter()
                .position(|b| v <= *b)
                .unwrap_or(bounds.len() - 1);
            counts[b] += 1;
        }
        Histogram { bounds, counts }
    }

    fn sample(n: u64, errors: u64, latency: impl Fn(u64) -> f64) -> Sample {
        Sample {
            requests: n,
            errors,
            latency: histogram(n, latency),
        }
    }

    /// 20 ms plus a deterministic spread, like the demo's jitter.
    fn normal(i: u64) -> f64 {
        0.020 + ((i * 37) % 50) as f64 / 1000.0
    }

    fn run(c: &Criteria, looks: &[(Sample, Sample)]) -> Judgement {
        let mut a = Analysis::new(c, Duration::from_secs(60), 1);
        let mut last = Judgement::Inconclusive {
            reason: "no look".into(),
        };
        for (b, k) in looks {
            last = a.observe(b, k, Duration::from_secs(1));
            if matches!(last, Judgement::Fail { .. }) {
                return last;
            }
        }
        last
    }

    #[test]
    fn a_canary_returning_5_percent_errors_fails() {
        let c = Criteria::with_ratio(1.5);
        let looks: Vec<_> = (0..10)
            .map(|_| (sample(900, 4, normal), sample(100, 5, normal)))
            .collect();
        let j = run(&c, &looks);
        assert!(
            matches!(&j, Judgement::Fail { metric, .. } if metric == "error-rate"),
            "{j:?}"
        );
    }

    #[test]
    fn one_error_of_sixty_is_no_failure() {
        // The abort the issue reported: 1 of 60 vs 0 of 542.
        let c = Criteria::with_ratio(1.2);
        let j = run(&c, &[(sample(542, 0, normal), sample(60, 1, normal))]);
        assert!(matches!(j, Judgement::Pass { .. }), "{j:?}");
    }

    #[test]
    fn a_critical_service_fails_at_a_lower_ratio() {
        // 1.35x the baseline: fails for critical (1.2x), passes for standard (1.5x).
        let looks: Vec<_> = (0..30)
            .map(|_| (sample(20_000, 400, normal), sample(20_000, 540, normal)))
            .collect();
        assert!(matches!(
            run(&Criteria::with_ratio(1.2), &looks),
            Judgement::Fail { .. }
        ));
        assert!(matches!(
            run(&Criteria::with_ratio(1.5), &looks),
            Judgement::Pass { .. }
        ));
    }

    #[test]
    fn a_release_200ms_slower_fails_on_latency() {
        let c = Criteria::with_ratio(1.5);
        let looks: Vec<_> = (0..5)
            .map(|_| (sample(300, 0, normal), sample(100, 0, |i| normal(i) + 0.2)))
            .collect();
        let j = run(&c, &looks);
        assert!(
            matches!(&j, Judgement::Fail { metric, .. } if metric.starts_with("latency")),
            "{j:?}"
        );
        let same: Vec<_> = (0..30)
            .map(|_| (sample(300, 0, normal), sample(100, 0, normal)))
            .collect();
        assert!(matches!(run(&c, &same), Judgement::Pass { .. }));
    }

    #[test]
    fn a_slow_tail_fails_on_p99_alone() {
        // 2% of the canary's requests 400 ms slower; the rest as the baseline.
        let c = Criteria::with_ratio(1.5);
        let looks: Vec<_> = (0..20)
            .map(|_| {
                (
                    sample(900, 0, normal),
                    sample(300, 0, |i| {
                        if i % 50 == 0 {
                            normal(i) + 0.4
                        } else {
                            normal(i)
                        }
                    }),
                )
            })
            .collect();
        let j = run(&c, &looks);
        assert!(
            matches!(&j, Judgement::Fail { metric, .. } if metric == "latency-p99"),
            "{j:?}"
        );
    }

    #[test]
    fn errors_that_start_late_are_weighed_from_their_start() {
        // Clean for 40 s, then 10% errors: the clean part does not bury it.
        let c = Criteria::with_ratio(1.2);
        let mut looks: Vec<_> = (0..40)
            .map(|i| {
                (
                    sample(90, u64::from(i % 20 == 0), normal),
                    sample(10, 0, normal),
                )
            })
            .collect();
        looks.extend((0..15).map(|_| (sample(90, 0, normal), sample(10, 1, normal))));
        let mut a = Analysis::new(&c, Duration::from_secs(60), 1);
        let mut failed_at = None;
        for (i, (b, k)) in looks.iter().enumerate() {
            if let Judgement::Fail { .. } = a.observe(b, k, Duration::from_secs(1)) {
                failed_at = Some(i);
                break;
            }
        }
        let at = failed_at.expect("late errors fail");
        assert!((40..55).contains(&at), "{at}");
    }

    #[test]
    fn the_statistic_is_a_mixture_over_alternatives_and_starts() {
        // Three planned starts: half the prior on the first, a quarter on
        // each later one; no evidence yet, so the statistic is one.
        let mut c = Check::new("x", 0.01, 2, 3);
        assert!((c.statistic() - 1.0).abs() < 1e-12);
        let none = Sample::default();
        // Likelihood ratios e and 1 for the two alternatives.
        c.add(&[1.0, 0.0], &none, &none);
        let e = 1f64.exp();
        assert!((c.statistic() - (0.5 * (e + 1.0) / 2.0 + 0.5)).abs() < 1e-12);
        // The second start weighs only what comes after it.
        c.next_start(BLOCK);
        c.add(&[2f64.ln(), 2f64.ln()], &none, &none);
        let want = 0.5 * (2.0 * e + 2.0) / 2.0 + 0.25 * 2.0 + 0.25;
        assert!((c.statistic() - want).abs() < 1e-12, "{}", c.statistic());
        assert_eq!(c.strongest().since, Duration::ZERO);
        // Failing takes 1/alpha for the half of alpha the martingale has.
        assert_eq!(c.threshold(), 200.0);
    }

    #[test]
    fn one_error_of_sixty_weighs_what_the_binomial_says() {
        // 1 of 60 canary vs 0 of 542 baseline, at most 1.2x: the one
        // error is the canary's with probability θ0 = 72/614 if nothing is
        // wrong, θ1 = 72ρ/(72ρ + 542) if it is ρ times worse; the evidence
        // is the mean of θ1/θ0 over the alternatives, half-weighted for a
        // rollout with later change points, plus their half.
        let c = Criteria::with_ratio(1.2);
        let mut a = Analysis::new(&c, Duration::from_secs(60), 1);
        a.observe(
            &sample(542, 0, normal),
            &sample(60, 1, normal),
            Duration::from_secs(1),
        );
        let t0 = 72.0 / 614.0;
        let mean: f64 = ERROR_RATIOS
            .iter()
            .map(|rho| 72.0 * rho / (72.0 * rho + 542.0) / t0)
            .sum::<f64>()
            / ERROR_RATIOS.len() as f64;
        let want = 0.5 * mean + 0.5;
        assert!((a.errors.statistic() - want).abs() < 1e-9);
        // About 2.5: far from the 200 (1/0.005) a failure needs.
        assert!((2.0..3.0).contains(&want), "{want}");
    }

    #[test]
    fn false_aborts_stay_under_alpha_when_looked_at_every_second() {
        // Ville's inequality: a good release, looked at 60 times, 400
        // seeded rollouts; alpha 5% here so the rate is measurable. The
        // expected count is at most 20; 35 is beyond chance.
        let mut c = Criteria::with_ratio(1.0);
        c.alpha = 0.05;
        c.error_rate_floor = 0.0;
        c.max_p95_increase = 0.0;
        c.max_p99_increase = 0.0;
        let mut seed = 7u64;
        let mut uniform = move || {
            seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = seed;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
        };
        let mut aborted = 0;
        for _ in 0..400 {
            let mut a = Analysis::new(&c, Duration::from_secs(60), 1);
            for _ in 0..60 {
                let mut draw = |n: u64| {
                    let mut errors = 0;
                    let lat: Vec<f64> = (0..n)
                        .map(|_| {
                            if uniform() < 0.01 {
                                errors += 1;
                            }
                            0.02 - 0.01 * (1.0 - uniform()).ln()
                        })
                        .collect();
                    sample(n, errors, |i| lat[i as usize])
                };
                let (b, k) = (draw(50), draw(50));
                if let Judgement::Fail { .. } = a.observe(&b, &k, Duration::from_secs(1)) {
                    aborted += 1;
                    break;
                }
            }
        }
        assert!(
            aborted <= 35,
            "{aborted} of 400 good rollouts aborted at alpha 5%"
        );
    }

    #[test]
    fn histogram_quantiles_and_counts_above() {
        let h = histogram(100, |i| if i < 90 { 0.01 } else { 0.5 });
        assert!((h.quantile(0.5) - 0.01).abs() < 0.003);
        assert!(h.quantile(0.99) >= 0.5);
        let i = h.counts.iter().position(|c| *c == 90).unwrap();
        assert_eq!(h.above(i), 10);
    }
}
