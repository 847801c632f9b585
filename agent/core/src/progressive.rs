//! Progressive delivery of one resource: canary and blue-green.
//!
//! The new release starts beside the live one with no traffic; the target's
//! [`Traffic`] weights traffic between them; a [`Metrics`] source says what
//! each version served; one [`Analysis`] per rollout weighs every second of
//! it by the criteria fixed in the service's resolved rollout before it
//! started, so a decision at any look keeps its false-abort bound.
//!
//! - Canary: each step's weight is held for its duration (and until the
//!   canary is `minAge` old). A failed check at any look ends the rollout
//!   at once; so does the new release crashing. At the end of the step it
//!   passes if the canary served `minRequests` in it, else it is
//!   inconclusive and fails or holds, as the policy says.
//! - Blue-green: the new release gets all traffic at once and is judged
//!   against the baseline's record while the old one stays warm; a fail
//!   switches everything back at once.
//!
//! On failure traffic goes back to the baseline first (the time that takes
//! is in the decision record), the new release is stopped, and the engine
//! reverts the rest of the rollout as for any failed gate.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::analysis::{Analysis, Judgement, Sample};
use crate::engine::{Engine, EngineError, Prepared};
use crate::model::Strategy;
use crate::model::{Inconclusive, Rollout};
use crate::resource::DesiredResource;
use crate::store::{Decision, IntervalVerdict, Measured, TrafficStatus};
use crate::traffic::{Counters, Metrics, Split, Traffic};

type Failure = (EngineError, Option<Decision>);

/// Why one step did not pass.
struct StepFailure {
    metric: String,
    measurement: String,
    threshold: String,
}

impl Engine {
    /// Whether `r` rolls out progressively: its service's strategy is canary
    /// or blue-green and the target can split its traffic now.
    pub(crate) async fn progressive_for<'t>(
        &self,
        prepared: &Prepared,
        target: &'t dyn crate::target::Target,
        r: &DesiredResource,
    ) -> Option<&'t dyn Traffic> {
        let def = prepared.rendered.topology.services.get(&r.service)?;
        if !matches!(def.rollout.strategy, Strategy::Canary | Strategy::Bluegreen) {
            return None;
        }
        let traffic = target.traffic()?;
        traffic.splittable(r).await.then_some(traffic)
    }

    /// Rolls `r` out progressively; on failure traffic is back on the
    /// baseline and the new release stopped before this returns.
    pub(crate) async fn progressive(
        &self,
        prepared: &Prepared,
        wave: usize,
        traffic: &dyn Traffic,
        r: &DesiredResource,
    ) -> Result<(), Failure> {
        let rollout = prepared
            .rendered
            .topology
            .services
            .get(&r.service)
            .map(|d| d.rollout.clone())
            .unwrap_or_default();
        let strategy = rollout.strategy;
        let metrics: Arc<dyn Metrics> = self.metrics.clone().unwrap_or_else(|| traffic.metrics());
        let gate = match strategy {
            Strategy::Bluegreen => "bluegreen",
            _ => "canary",
        };
        let fail = |f: StepFailure, restored_ms: Option<u64>| -> Failure {
            let decision = Decision {
                at: self.clock.now(),
                wave: wave + 1,
                gate: format!("{gate} analysis: {}", f.metric),
                resource: Some(r.id.to_string()),
                measurement: f.measurement.clone(),
                threshold: f.threshold.clone(),
                restored_ms,
            };
            (
                EngineError::Gate {
                    wave: wave + 1,
                    reason: format!(
                        "{gate} analysis of {}: {}: {} (threshold: {})",
                        r.id, f.metric, f.measurement, f.threshold
                    ),
                },
                Some(decision),
            )
        };
        self.progress(wave, &format!("{gate} {}: starting the new release", r.id))
            .map_err(|e| (e, None))?;
        let split = traffic.stage(r).await.map_err(|e| {
            fail(
                StepFailure {
                    metric: "start".into(),
                    measurement: e.to_string(),
                    threshold: "the new release starts and becomes ready".into(),
                },
                None,
            )
        })?;
        let steps = match strategy {
            Strategy::Bluegreen => vec![100],
            _ => rollout.canary.weights(),
        };
        // One analysis for the whole rollout: its bound on false aborts is
        // over every look of every step.
        let mut planned = match strategy {
            Strategy::Bluegreen => rollout.keep_warm,
            _ => rollout.canary.planned(),
        };
        if rollout.inconclusive == Inconclusive::Hold {
            planned += rollout.hold_timeout * steps.len() as u32;
        }
        let judged = steps.iter().filter(|w| **w < 100).count().max(1);
        let mut analysis = Analysis::new(&rollout.analysis, planned, judged);
        let mut status = TrafficStatus {
            resource: r.id.to_string(),
            strategy,
            baseline: split.baseline.clone(),
            canary: split.canary.clone(),
            weight: 0,
            step: 0,
            steps: steps.clone(),
            metrics: metrics.describe(),
            verdicts: Vec::new(),
            canary_since: None,
        };
        info!(resource = %r.id, ?strategy, baseline = %split.baseline, canary = %split.canary, steps = ?steps, metrics = %status.metrics, "progressive rollout starting");
        for (i, &weight) in steps.iter().enumerate() {
            status.step = i + 1;
            status.weight = weight;
            if let Err(e) = traffic.set_weight(&split, weight).await {
                let restored = self.restore(traffic, &split).await;
                return Err(fail(
                    StepFailure {
                        metric: "routing".into(),
                        measurement: e.to_string(),
                        threshold: "the router takes the new weights".into(),
                    },
                    restored,
                ));
            }
            self.show(wave, &status, "measuring")
                .map_err(|e| (e, None))?;
            // A canary's last step (100%) is the promotion; blue-green's
            // only step is judged while the old release stays warm.
            if weight >= 100 && strategy != Strategy::Bluegreen {
                break;
            }
            let window = match strategy {
                Strategy::Bluegreen => rollout.keep_warm,
                _ => rollout.canary.duration(i),
            };
            if let Err(f) = self
                .judge_step(
                    wave,
                    &rollout,
                    (metrics.as_ref(), traffic),
                    &split,
                    window,
                    strategy,
                    &mut status,
                    &mut analysis,
                )
                .await
            {
                warn!(resource = %r.id, metric = %f.metric, measurement = %f.measurement, "analysis failed; traffic back to the baseline");
                let restored = self.restore(traffic, &split).await;
                return Err(fail(f, restored));
            }
        }
        traffic.promote(&split, r).await.map_err(|e| {
            fail(
                StepFailure {
                    metric: "promote".into(),
                    measurement: e.to_string(),
                    threshold: "the new release takes over".into(),
                },
                None,
            )
        })?;
        info!(resource = %r.id, version = %split.canary, verdicts = status.verdicts.len(), "progressive rollout promoted");
        self.mark(|s| {
            if let Some(p) = &mut s.in_progress {
                p.traffic = None;
            }
        })
        .map_err(|e| (e, None))
    }

    /// All traffic back to the baseline, then the new release stopped.
    /// Returns how long the traffic shift took (ms), None if it failed.
    async fn restore(&self, traffic: &dyn Traffic, split: &Split) -> Option<u64> {
        let started = Instant::now();
        let shifted = traffic.set_weight(split, 0).await;
        let ms = started.elapsed().as_millis() as u64;
        if let Err(e) = &shifted {
            warn!(error = %e, "could not shift traffic back before aborting");
        }
        if let Err(e) = traffic.abort(split).await {
            warn!(error = %e, "aborting the new release failed; the revert retries it");
        }
        let _ = self.mark(|s| {
            if let Some(p) = &mut s.in_progress {
                p.traffic = None;
            }
        });
        info!(resource = %split.resource, ms, "all traffic back on the baseline");
        shifted.ok().map(|()| ms)
    }

    /// Publishes the traffic status for `sluice status`.
    fn show(&self, wave: usize, status: &TrafficStatus, what: &str) -> Result<(), EngineError> {
        self.publish(wave, status, what, None)
    }

    /// One state write: the step line, the traffic status and, if given, a
    /// new verdict for the rollout's record.
    fn publish(
        &self,
        wave: usize,
        status: &TrafficStatus,
        what: &str,
        verdict: Option<IntervalVerdict>,
    ) -> Result<(), EngineError> {
        let step = format!(
            "{} {}: {}% to {} (step {}/{}), {what}",
            format!("{:?}", status.strategy).to_lowercase(),
            status.resource,
            status.weight,
            status.canary,
            status.step,
            status.steps.len()
        );
        let now = self.clock.now();
        self.mark(|s| {
            if let Some(p) = &mut s.in_progress {
                p.wave = wave;
                p.step = step;
                p.step_started = now;
                p.traffic = Some(status.clone());
                p.analysis.extend(verdict);
            }
        })
    }

    /// Holds one step for `window` (and until the canary is `minAge`
    /// old), feeding every look to the rollout's `analysis`. Ok when the
    /// step passes at its end.
    #[allow(clippy::too_many_arguments)]
    async fn judge_step(
        &self,
        wave: usize,
        rollout: &Rollout,
        (metrics, traffic): (&dyn Metrics, &dyn Traffic),
        split: &Split,
        window: Duration,
        strategy: Strategy,
        status: &mut TrafficStatus,
        analysis: &mut Analysis,
    ) -> Result<(), StepFailure> {
        let criteria = &rollout.analysis;
        let poll = (window / 4).clamp(Duration::from_millis(100), Duration::from_secs(1));
        // The last reading; the first is taken when the metrics source
        // first answers, so an outage at the start never counts older
        // traffic.
        let mut last: Option<(Counters, Counters)> = metrics.counters(split).await.ok();
        let started = self.clock.now();
        let canary_born = status.canary_since.unwrap_or(started);
        status.canary_since = Some(canary_born);
        let mut last_look = started;
        let mut next_record = window;
        let mut step = (Sample::default(), Sample::default());
        // Blue-green sends the baseline nothing once switched: the new
        // release is judged against what the baseline served before.
        if strategy == Strategy::Bluegreen {
            if let Some((b0, _)) = &last {
                analysis.set_reference(b0.since(&Counters::default()));
            }
        }
        loop {
            self.clock.sleep(poll).await;
            let now = self.clock.now();
            let elapsed = (now - started).to_std().unwrap_or_default();
            let since_look = (now - last_look).to_std().unwrap_or_default();
            let age = (now - canary_born).to_std().unwrap_or_default();
            last_look = now;
            if let Some(crash) = traffic.crashed(split).await {
                return Err(StepFailure {
                    metric: "crash".into(),
                    measurement: crash,
                    threshold: "the new release keeps running once ready".into(),
                });
            }
            let j = match (metrics.counters(split).await, &last) {
                (Ok((b, c)), Some((b0, c0))) => {
                    let (db, dc) = (b.since(b0), c.since(c0));
                    step.0.add(&db);
                    step.1.add(&dc);
                    last = Some((b, c));
                    analysis.observe(&db, &dc, since_look)
                }
                (Ok(first), None) => {
                    last = Some(first);
                    Judgement::Inconclusive {
                        reason: "first reading of the metrics".into(),
                    }
                }
                (Err(e), _) => {
                    warn!(error = %e, "reading metrics failed");
                    Judgement::Inconclusive {
                        reason: format!("metrics unavailable from {}", metrics.describe()),
                    }
                }
            };
            let due = elapsed >= window && age >= rollout.canary.min_age;
            // At the end of the step: enough canary traffic in it?
            let j = match j {
                Judgement::Pass { .. } if due && step.1.requests < criteria.min_requests => {
                    Judgement::Inconclusive {
                        reason: format!(
                            "{} canary requests in the step; {} needed",
                            step.1.requests, criteria.min_requests
                        ),
                    }
                }
                // The step's end has its own exact test of its totals.
                Judgement::Pass { measurements } if due => match analysis.end_step() {
                    Judgement::Pass { measurements: end } if !end.is_empty() => {
                        Judgement::Pass { measurements: end }
                    }
                    Judgement::Pass { .. } => Judgement::Pass { measurements },
                    other => other,
                },
                other => other,
            };
            let held_out = elapsed >= window + rollout.hold_timeout;
            let boundary = elapsed >= next_record;
            // Every verdict that decides the step is recorded, and one per
            // step length while it is held.
            let decides = match j {
                Judgement::Fail { .. } => true,
                Judgement::Pass { .. } => due,
                Judgement::Inconclusive { .. } => {
                    due && (rollout.inconclusive == Inconclusive::Fail || held_out)
                }
            };
            if decides || boundary {
                self.record_verdict(wave, status, &j, &step.0, &step.1);
                next_record = elapsed + window;
            }
            match j {
                Judgement::Fail {
                    metric,
                    measurement,
                    threshold,
                } => {
                    return Err(StepFailure {
                        metric,
                        measurement,
                        threshold,
                    })
                }
                _ if !due => {}
                Judgement::Pass { .. } => return Ok(()),
                Judgement::Inconclusive { reason } => {
                    if rollout.inconclusive == Inconclusive::Fail || held_out {
                        return Err(StepFailure {
                            metric: "inconclusive".into(),
                            measurement: reason,
                            threshold: match rollout.inconclusive {
                                Inconclusive::Fail => format!(
                                    "decided within {}s (policy: inconclusive fails)",
                                    window.as_secs_f64()
                                ),
                                Inconclusive::Hold => format!(
                                    "decided within {}s plus a hold of {}s",
                                    window.as_secs_f64(),
                                    rollout.hold_timeout.as_secs()
                                ),
                            },
                        });
                    }
                    if boundary {
                        let _ = self.show(wave, status, "holding: inconclusive");
                    }
                }
            }
        }
    }

    fn record_verdict(
        &self,
        wave: usize,
        status: &mut TrafficStatus,
        j: &Judgement,
        baseline: &Sample,
        canary: &Sample,
    ) {
        let v = IntervalVerdict {
            at: self.clock.now(),
            resource: status.resource.clone(),
            step: status.step,
            weight: status.weight,
            baseline: Measured::of(baseline),
            canary: Measured::of(canary),
            judgement: j.clone(),
        };
        info!(resource = %v.resource, step = v.step, weight = v.weight, verdict = ?v.judgement, baseline_requests = v.baseline.requests, canary_requests = v.canary.requests, "analysis verdict");
        status.verdicts.push(v.clone());
        if let Err(e) = self.publish(wave, status, "measuring", Some(v)) {
            warn!(error = %e, "recording the verdict in the state store failed");
        }
    }
}
