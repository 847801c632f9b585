//! Traffic: two versions of one resource running side by side, weights
//! between them, and what each served.
//!
//! A target that can split traffic (the host target through its router;
//! Kubernetes through a Gateway API HTTPRoute) implements [`Traffic`]; the
//! engine's progressive runner (canary, blue-green) drives it and judges
//! the versions with [`crate::analysis`] on [`Counters`] read from a
//! [`Metrics`] provider: the router itself or Prometheus.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::analysis::{Histogram, Sample};
use crate::resource::{DesiredResource, ResourceId};
use crate::target::TargetError;

/// A resource split between its live version (the baseline) and the one
/// being rolled out (the canary).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Split {
    pub resource: ResourceId,
    /// The routes carrying the resource's traffic (metrics are per route).
    pub routes: Vec<String>,
    /// Version labels, distinct, as the metrics carry them.
    pub baseline: String,
    pub canary: String,
}

/// Cumulative counters of one version: what a metrics source reports.
/// Two readings give the interval between them ([`Counters::since`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    pub requests: u64,
    /// 5xx answers, connection failures, timeouts.
    pub errors: u64,
    /// Latency histogram: (upper bound in seconds, cumulative count),
    /// ascending; the last bound may be infinite.
    pub buckets: Vec<(f64, u64)>,
}

/// The latency buckets the router keeps per version (upper bounds in
/// seconds): log-spaced by 1.25 from 0.5 ms to past a minute, so a bucket
/// bound is within 12.5% of any latency (as a DDSketch of that accuracy),
/// with an overflow bucket.
pub fn latency_bounds() -> Vec<f64> {
    let mut bounds = Vec::new();
    let mut b: f64 = 0.0005;
    loop {
        // Rounded to 4 significant figures, so exposition labels are short.
        let digits = 3 - b.log10().floor() as i32;
        let scale = 10f64.powi(digits);
        bounds.push((b * scale).round() / scale);
        if b >= 60.0 {
            break;
        }
        b *= 1.25;
    }
    bounds.push(f64::INFINITY);
    bounds
}

impl Counters {
    /// Adds another reading (another route of the same version).
    pub fn add(&mut self, other: &Counters) {
        self.requests += other.requests;
        self.errors += other.errors;
        if self.buckets.is_empty() {
            self.buckets = other.buckets.clone();
            return;
        }
        for (mine, theirs) in self.buckets.iter_mut().zip(&other.buckets) {
            mine.1 += theirs.1;
        }
    }

    /// What was served between `earlier` and this reading, latencies as
    /// the histogram's per-bucket counts. A counter that went backwards (a
    /// restarted source) counts from zero.
    pub fn since(&self, earlier: &Counters) -> Sample {
        let reset = self.requests < earlier.requests;
        let base = |v: u64, e: u64| if reset { v } else { v.saturating_sub(e) };
        let mut bounds = Vec::with_capacity(self.buckets.len());
        let mut counts = Vec::with_capacity(self.buckets.len());
        let mut prev_now = 0;
        let mut prev_then = 0;
        for (i, (bound, cum)) in self.buckets.iter().enumerate() {
            let then = earlier.buckets.get(i).map(|b| b.1).unwrap_or(0);
            counts.push(base(
                cum.saturating_sub(prev_now),
                then.saturating_sub(prev_then),
            ));
            bounds.push(*bound);
            prev_now = *cum;
            prev_then = then;
        }
        Sample {
            requests: base(self.requests, earlier.requests),
            errors: base(self.errors, earlier.errors),
            latency: Histogram { bounds, counts },
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics from {source_name}: {reason}")]
    Unavailable { source_name: String, reason: String },
    #[error("metrics from {source_name}: query {query:?}: {reason}")]
    Query {
        source_name: String,
        query: String,
        reason: String,
    },
}

/// Where the analysis reads what each version served.
#[async_trait::async_trait]
pub trait Metrics: Send + Sync {
    /// For logs and decision records ("router", "prometheus at ...").
    fn describe(&self) -> String;

    /// Cumulative counters of the split's baseline and canary, in that
    /// order. A version that served nothing yet reads as zero.
    async fn counters(&self, split: &Split) -> Result<(Counters, Counters), MetricsError>;
}

/// A target that can run two versions of a resource at once and weight
/// traffic between them. Every call is idempotent, so a restarted agent
/// can repeat any of them.
#[async_trait::async_trait]
pub trait Traffic: Send + Sync {
    /// Whether `r` can be split: a different version of it is live and a
    /// route sends it traffic. If not, the engine applies it directly.
    async fn splittable(&self, r: &DesiredResource) -> bool;

    /// Starts `r`'s replicas beside the live ones and waits until they are
    /// ready; they get no traffic yet (weight 0).
    async fn stage(&self, r: &DesiredResource) -> Result<Split, TargetError>;

    /// Sends `percent` of the traffic to the canary, the rest to the
    /// baseline. Takes effect for the next request; none is dropped.
    async fn set_weight(&self, split: &Split, percent: u8) -> Result<(), TargetError>;

    /// Makes the canary the live version: all traffic to it, the baseline
    /// stopped.
    async fn promote(&self, split: &Split, r: &DesiredResource) -> Result<(), TargetError>;

    /// All traffic back on the baseline first, then the canary stopped.
    async fn abort(&self, split: &Split) -> Result<(), TargetError>;

    /// Whether the canary has crashed since it was staged (an instance
    /// exited, a pod restarted or cannot pull its image): what happened,
    /// with its exit status and last log lines. Checked at every look.
    async fn crashed(&self, _split: &Split) -> Option<String> {
        None
    }

    /// The built-in metrics source (the router's own counters).
    fn metrics(&self) -> std::sync::Arc<dyn Metrics>;
}

/// Sums per-route readings of each version, for providers that read
/// routes one at a time.
pub fn sum_routes<'a>(
    readings: impl IntoIterator<Item = &'a BTreeMap<String, Counters>>,
    split: &Split,
) -> (Counters, Counters) {
    let mut baseline = Counters::default();
    let mut canary = Counters::default();
    for r in readings {
        if let Some(c) = r.get(&split.baseline) {
            baseline.add(c);
        }
        if let Some(c) = r.get(&split.canary) {
            canary.add(c);
        }
    }
    (baseline, canary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters(requests: u64, errors: u64, per_bucket: &[u64]) -> Counters {
        let bounds = [0.005, 0.1, 0.25, f64::INFINITY];
        let mut cum = 0;
        Counters {
            requests,
            errors,
            buckets: bounds
                .iter()
                .zip(per_bucket)
                .map(|(b, n)| {
                    cum += n;
                    (*b, cum)
                })
                .collect(),
        }
    }

    #[test]
    fn an_interval_is_the_difference_of_two_readings() {
        let a = counters(10, 1, &[8, 2, 0, 0]);
        let b = counters(110, 6, &[88, 2, 18, 2]);
        let s = b.since(&a);
        assert_eq!((s.requests, s.errors), (100, 5));
        assert_eq!(s.latency.counts, vec![80, 0, 18, 2]);
        assert_eq!(s.latency.total(), 100);
        // A restarted source counts from zero rather than going negative.
        let r = counters(5, 0, &[5, 0, 0, 0]).since(&b);
        assert_eq!(r.requests, 5);
        assert_eq!(r.latency.total(), 5);
    }

    #[test]
    fn the_router_buckets_are_log_spaced_within_an_eighth() {
        let b = latency_bounds();
        assert_eq!(b[0], 0.0005);
        assert!(b.last().unwrap().is_infinite());
        assert!(b[b.len() - 2] >= 60.0);
        for w in b[..b.len() - 1].windows(2) {
            let ratio = w[1] / w[0];
            assert!((1.2..1.3).contains(&ratio), "{w:?}");
        }
    }
}
