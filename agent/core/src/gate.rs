//! Gates: what must hold after a wave before the next one starts.
//!
//! The engine observes the wave's resources, asks every gate for a verdict,
//! and repeats until all pass, one fails, or the gate timeout runs out. The
//! health gate (with its soak time) is built in; canary analysis plugs in
//! as further gates through a [`GateFactory`].

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use crate::model::Topology;
use crate::resource::{Health, LiveResource, ResourceId};

/// What a gate sees at each check.
pub struct GateContext<'a> {
    pub wave: usize,
    pub services: &'a [String],
    /// The resources the wave changed.
    pub resources: &'a [ResourceId],
    /// Their live state, observed just now (absent: missing).
    pub live: &'a BTreeMap<ResourceId, LiveResource>,
    /// Time since the gate started.
    pub elapsed: Duration,
}

/// A gate's answer at one check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// Not decided yet: check again (until the gate timeout).
    Wait {
        reason: String,
    },
    /// Abort the rollout; recorded in the decision record.
    Fail {
        resource: Option<String>,
        measurement: String,
        threshold: String,
    },
}

#[async_trait::async_trait]
pub trait Gate: Send + Sync {
    fn name(&self) -> &str;
    /// Called repeatedly; a gate may keep state between calls.
    async fn check(&self, ctx: &GateContext<'_>) -> Verdict;

    /// After a `Wait` at `elapsed`, how long until this gate must be
    /// checked again even if nothing live changed (a soak or a timeout
    /// ends). None: it must be polled (its verdict depends on more than
    /// the resources' live state, e.g. traffic counters).
    fn recheck_in(&self, _elapsed: Duration) -> Option<Duration> {
        None
    }
}

/// Builds extra gates for a wave (canary analysis, sync windows, ...).
pub trait GateFactory: Send + Sync {
    fn gates(&self, topology: &Topology, services: &[String]) -> Vec<Box<dyn Gate>>;
}

/// Every changed resource healthy within `timeout` (the gate timeout),
/// then still healthy for `soak` after.
pub struct HealthGate {
    timeout: Duration,
    soak: Duration,
    /// When the wave was first seen all healthy (relative to gate start).
    healthy_since: Mutex<Option<Duration>>,
}

impl HealthGate {
    pub fn new(timeout: Duration, soak: Duration) -> Self {
        HealthGate {
            timeout,
            soak,
            healthy_since: Mutex::new(None),
        }
    }
}

#[async_trait::async_trait]
impl Gate for HealthGate {
    fn name(&self) -> &str {
        "health"
    }

    /// Only the live state and the clock decide: nothing to do until the
    /// soak ends (when soaking) or the gate timeout (when waiting).
    fn recheck_in(&self, elapsed: Duration) -> Option<Duration> {
        let since = *self.healthy_since.lock().unwrap_or_else(|e| e.into_inner());
        Some(match since {
            Some(start) => (start + self.soak).saturating_sub(elapsed),
            None => self.timeout.saturating_sub(elapsed),
        })
    }

    async fn check(&self, ctx: &GateContext<'_>) -> Verdict {
        let worst = ctx
            .resources
            .iter()
            .map(|id| match ctx.live.get(id) {
                Some(l) => (id, l.health, l.message.clone()),
                None => (id, Health::Missing, None),
            })
            .filter(|(_, h, _)| *h != Health::Healthy)
            .max_by_key(|(_, h, _)| *h);
        let mut since = self.healthy_since.lock().unwrap_or_else(|e| e.into_inner());
        match worst {
            None => {
                let start = *since.get_or_insert(ctx.elapsed);
                if ctx.elapsed.saturating_sub(start) >= self.soak {
                    Verdict::Pass
                } else {
                    Verdict::Wait {
                        reason: format!("soaking {}s", self.soak.as_secs()),
                    }
                }
            }
            Some((id, health, message)) => {
                let measurement = format!(
                    "{id} is {health}{}",
                    message.map(|m| format!(" ({m})")).unwrap_or_default()
                );
                if since.is_some() {
                    Verdict::Fail {
                        resource: Some(id.to_string()),
                        measurement: format!("{measurement}, turned unhealthy while soaking"),
                        threshold: format!("healthy for {}s", self.soak.as_secs()),
                    }
                } else if ctx.elapsed >= self.timeout {
                    Verdict::Fail {
                        resource: Some(id.to_string()),
                        measurement: format!(
                            "{measurement}, not healthy after {}s",
                            ctx.elapsed.as_secs()
                        ),
                        threshold: format!(
                            "healthy within {}s (gateTimeout)",
                            self.timeout.as_secs()
                        ),
                    }
                } else {
                    Verdict::Wait {
                        reason: measurement,
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(health: Health) -> BTreeMap<ResourceId, LiveResource> {
        let id = ResourceId::new("t", "Process", "a");
        [(
            id.clone(),
            LiveResource {
                id,
                body: serde_json::Value::Null,
                health,
                managed: None,
                message: None,
            },
        )]
        .into()
    }

    async fn check(g: &HealthGate, health: Health, ms: u64) -> Verdict {
        let ids = [ResourceId::new("t", "Process", "a")];
        let live = live(health);
        g.check(&GateContext {
            wave: 0,
            services: &[],
            resources: &ids,
            live: &live,
            elapsed: Duration::from_millis(ms),
        })
        .await
    }

    #[tokio::test]
    async fn health_waits_then_soaks_and_fails_if_it_turns_unhealthy() {
        let g = HealthGate::new(Duration::from_secs(3600), Duration::from_millis(100));
        assert!(matches!(
            check(&g, Health::Progressing, 0).await,
            Verdict::Wait { .. }
        ));
        assert!(matches!(
            check(&g, Health::Healthy, 10).await,
            Verdict::Wait { .. }
        ));
        assert_eq!(check(&g, Health::Healthy, 120).await, Verdict::Pass);
        let g = HealthGate::new(Duration::from_secs(3600), Duration::from_millis(100));
        check(&g, Health::Healthy, 0).await;
        assert!(matches!(
            check(&g, Health::Degraded, 50).await,
            Verdict::Fail { .. }
        ));
    }

    #[tokio::test]
    async fn the_gate_timeout_is_the_time_to_become_healthy_and_soak_comes_after() {
        // gateTimeout 1 s, soak 10 s: not healthy at 1 s fails then, not
        // at 11 s; healthy at 0.9 s soaks on until 10.9 s.
        let g = HealthGate::new(Duration::from_secs(1), Duration::from_secs(10));
        assert!(matches!(
            check(&g, Health::Progressing, 900).await,
            Verdict::Wait { .. }
        ));
        match check(&g, Health::Progressing, 1000).await {
            Verdict::Fail { threshold, .. } => {
                assert_eq!(threshold, "healthy within 1s (gateTimeout)")
            }
            v => panic!("{v:?}"),
        }
        let g = HealthGate::new(Duration::from_secs(1), Duration::from_secs(10));
        assert!(matches!(
            check(&g, Health::Healthy, 900).await,
            Verdict::Wait { .. }
        ));
        assert!(matches!(
            check(&g, Health::Healthy, 5000).await,
            Verdict::Wait { .. }
        ));
        assert_eq!(check(&g, Health::Healthy, 10_900).await, Verdict::Pass);
    }
}
