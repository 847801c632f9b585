//! Rollout defaults: how each service rolls out unless `sluice.yaml` says
//! otherwise, by criticality. Pure.
//!
//! The shipped defaults (`policies/rollout.yaml` at the top of this
//! repository) are compiled into the agent; a watched repository's own
//! `policies/rollout.yaml` merges over them field by field. They resolve
//! into the topology where it is loaded ([`crate::topology::load`]), so the
//! plan and the engine read one fully decided [`Rollout`] per service.
//! These are settings, not guardrails: guardrails live in [`crate::guard`].

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::analysis::Criteria;
use crate::error::RenderError;
use crate::model::{
    duration, CanarySettings, Criticality, Inconclusive, Rollout, Share, Strategy, Topology,
    API_VERSION,
};
use crate::source::{PathError, Snapshot};
use crate::yaml::find_line;

/// The repository's rollout defaults, in its policy folder.
pub const ROLLOUT_FILE: &str = "policies/rollout.yaml";
/// The shipped defaults.
pub const SHIPPED: &str = include_str!("../../../policies/rollout.yaml");
/// Largest rollout file read from a repository.
const MAX_ROLLOUT_BYTES: usize = 256 * 1024;

/// Settings by criticality.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ByCriticality {
    pub strategy: Strategy,
    #[serde(with = "duration")]
    pub soak: Duration,
    #[serde(with = "duration")]
    pub gate_timeout: Duration,
    pub max_error_ratio: f64,
}

/// Analysis criteria (the error ratio comes by criticality).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AnalysisSettings {
    pub error_rate_floor: f64,
    pub min_requests: u64,
    #[serde(with = "duration")]
    pub max_p95_increase: Duration,
    #[serde(with = "duration")]
    pub max_p99_increase: Duration,
    pub alpha: f64,
    pub inconclusive: Inconclusive,
    #[serde(with = "duration")]
    pub hold_timeout: Duration,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RollingSettings {
    pub max_unavailable: Share,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BluegreenSettings {
    #[serde(with = "duration")]
    pub keep_warm: Duration,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WaveLimits {
    /// At most this share of a ring's targets changes per wave.
    pub max_share: Share,
}

/// When a crashing new release fails.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CrashLoop {
    /// Exits while starting that fail the gate.
    pub restarts: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub enum RolloutPolicyKind {
    RolloutPolicy,
}

/// `policies/rollout.yaml`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RolloutPolicy {
    pub api_version: String,
    pub kind: RolloutPolicyKind,
    pub criticality: CriticalityTable,
    pub canary: CanarySettings,
    pub analysis: AnalysisSettings,
    pub rolling: RollingSettings,
    pub bluegreen: BluegreenSettings,
    pub waves: WaveLimits,
    pub crash_loop: CrashLoop,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CriticalityTable {
    pub critical: ByCriticality,
    pub standard: ByCriticality,
    pub low: ByCriticality,
}

impl CriticalityTable {
    pub fn get(&self, c: Criticality) -> &ByCriticality {
        match c {
            Criticality::Critical => &self.critical,
            Criticality::Standard => &self.standard,
            Criticality::Low => &self.low,
        }
    }
}

impl RolloutPolicy {
    /// Resolves a service's rollout from its own settings and the defaults.
    pub fn resolve(
        &self,
        service: Option<&crate::model::ServiceDef>,
        defaults: Option<&crate::model::Defaults>,
        fallback_criticality: Criticality,
    ) -> Rollout {
        let criticality = service
            .and_then(|s| s.criticality)
            .or(defaults.and_then(|d| d.criticality))
            .unwrap_or(fallback_criticality);
        let by = self.criticality.get(criticality);
        let pick_d = |s: Option<Duration>, d: Option<Duration>, p: Duration| s.or(d).unwrap_or(p);
        let a = &self.analysis;
        let over = service.and_then(|s| s.analysis.as_ref());
        let analysis = Criteria {
            max_error_ratio: over
                .and_then(|o| o.max_error_ratio)
                .unwrap_or(by.max_error_ratio),
            error_rate_floor: over
                .and_then(|o| o.error_rate_floor)
                .unwrap_or(a.error_rate_floor),
            min_requests: over.and_then(|o| o.min_requests).unwrap_or(a.min_requests),
            max_p95_increase: over
                .and_then(|o| o.max_p95_increase)
                .unwrap_or(a.max_p95_increase)
                .as_secs_f64(),
            max_p99_increase: over
                .and_then(|o| o.max_p99_increase)
                .unwrap_or(a.max_p99_increase)
                .as_secs_f64(),
            alpha: a.alpha,
        };
        let canary = service.and_then(|s| s.canary.as_ref());
        Rollout {
            strategy: service
                .and_then(|s| s.strategy)
                .or(defaults.and_then(|d| d.strategy))
                .unwrap_or(by.strategy),
            criticality,
            soak: pick_d(
                service.and_then(|s| s.soak),
                defaults.and_then(|d| d.soak),
                by.soak,
            ),
            gate_timeout: pick_d(
                service.and_then(|s| s.gate_timeout),
                defaults.and_then(|d| d.gate_timeout),
                by.gate_timeout,
            ),
            canary: CanarySettings {
                steps: canary
                    .and_then(|c| c.steps.clone())
                    .unwrap_or_else(|| self.canary.steps.clone()),
                interval: canary
                    .and_then(|c| c.interval)
                    .unwrap_or(self.canary.interval),
                min_age: canary
                    .and_then(|c| c.min_age)
                    .unwrap_or(self.canary.min_age),
            },
            analysis,
            inconclusive: over.and_then(|o| o.inconclusive).unwrap_or(a.inconclusive),
            hold_timeout: over.and_then(|o| o.hold_timeout).unwrap_or(a.hold_timeout),
            max_unavailable: service
                .and_then(|s| s.max_unavailable)
                .unwrap_or(self.rolling.max_unavailable),
            keep_warm: service
                .and_then(|s| s.keep_warm)
                .unwrap_or(self.bluegreen.keep_warm),
            crash_restarts: self.crash_loop.restarts.max(1),
        }
    }

    pub(crate) fn validate(&self) -> Result<(), (String, String)> {
        if self.api_version != API_VERSION {
            return Err(("apiVersion".into(), format!("must be {API_VERSION:?}")));
        }
        check_steps(&self.canary.steps).map_err(|r| ("canary.steps".to_string(), r))?;
        for (name, c) in [
            ("critical", &self.criticality.critical),
            ("standard", &self.criticality.standard),
            ("low", &self.criticality.low),
        ] {
            if !(c.max_error_ratio.is_finite() && c.max_error_ratio >= 1.0) {
                return Err((
                    format!("criticality.{name}.maxErrorRatio"),
                    "must be a number of at least 1.0".into(),
                ));
            }
        }
        let a = &self.analysis;
        if !(0.0..1.0).contains(&a.error_rate_floor) {
            return Err((
                "analysis.errorRateFloor".into(),
                "must be a fraction from 0 to below 1 (0.01 is 1%)".into(),
            ));
        }
        if !(a.alpha > 0.0 && a.alpha < 0.5) {
            return Err(("analysis.alpha".into(), "must be between 0 and 0.5".into()));
        }
        Ok(())
    }
}

/// Canary steps must rise strictly and end at 100.
pub fn check_steps(steps: &[crate::model::CanaryStep]) -> Result<(), String> {
    let steps: Vec<u8> = steps.iter().map(|s| s.weight).collect();
    if steps.is_empty() {
        return Err("at least one step is needed (e.g. [5, 25, 50, 100])".into());
    }
    let steps = steps.as_slice();
    if steps.windows(2).any(|w| w[0] >= w[1]) || steps[0] == 0 {
        return Err(format!("{steps:?}: steps must rise strictly from above 0"));
    }
    if steps.last() != Some(&100) {
        return Err(format!("{steps:?}: the last step must be 100"));
    }
    Ok(())
}

pub(crate) fn merge_rollout(default: &str, repo: &str) -> Result<RolloutPolicy, RenderError> {
    let base: serde_yaml::Value = serde_yaml::from_str(default).map_err(|e| {
        RenderError::invalid(
            "(built-in) policies/rollout.yaml",
            None,
            None,
            e.to_string(),
        )
    })?;
    let over: serde_yaml::Value = serde_yaml::from_str(repo).map_err(|e| {
        RenderError::invalid(
            ROLLOUT_FILE,
            None,
            e.location().map(|l| l.line()),
            e.to_string()
                .rsplit_once(" at line ")
                .map(|(h, _)| h.to_string())
                .unwrap_or_else(|| e.to_string()),
        )
    })?;
    if !(over.is_mapping() || over.is_null()) {
        return Err(RenderError::invalid(
            ROLLOUT_FILE,
            None,
            Some(1),
            "must be a mapping of settings",
        ));
    }
    let merged = deep_merge(base, over);
    let policy: RolloutPolicy = serde_path_to_error::deserialize(merged).map_err(|e| {
        let field = e.path().to_string();
        let keys: Vec<&str> = field.split('.').collect();
        let reason = e.inner().to_string();
        RenderError::invalid(
            ROLLOUT_FILE,
            (field != ".").then_some(field.as_str()),
            find_line(repo, &keys),
            reason,
        )
    })?;
    policy.validate().map_err(|(field, reason)| {
        let keys: Vec<&str> = field.split('.').collect();
        RenderError::invalid(ROLLOUT_FILE, Some(&field), find_line(repo, &keys), reason)
    })?;
    Ok(policy)
}

/// `over` wins; mappings merge key by key, anything else is replaced.
fn deep_merge(base: serde_yaml::Value, over: serde_yaml::Value) -> serde_yaml::Value {
    use serde_yaml::Value as Y;
    match (base, over) {
        (Y::Mapping(mut b), Y::Mapping(o)) => {
            for (k, v) in o {
                let merged = match b.remove(&k) {
                    Some(old) => deep_merge(old, v),
                    None => v,
                };
                b.insert(k, merged);
            }
            Y::Mapping(b)
        }
        (b, Y::Null) => b,
        (_, o) => o,
    }
}

/// Resolves every service's rollout into the topology (`ServiceDef::
/// rollout`), so the plan and the engine read one fully decided value.
pub fn apply_defaults(policy: &RolloutPolicy, topology: &mut Topology) {
    let defaults = topology.defaults.clone();
    for def in topology.services.values_mut() {
        def.rollout = policy.resolve(Some(def), Some(&defaults), Criticality::Standard);
    }
    topology.wave_limit = Some(policy.waves.max_share);
}

/// The shipped defaults, parsed once.
pub fn shipped() -> &'static RolloutPolicy {
    static POLICY: std::sync::OnceLock<RolloutPolicy> = std::sync::OnceLock::new();
    POLICY.get_or_init(|| {
        serde_yaml::from_str(SHIPPED)
            .unwrap_or_else(|e| panic!("the shipped policies/rollout.yaml is invalid: {e}"))
    })
}

/// The rollout defaults of a commit: the shipped ones with the repository's
/// `policies/rollout.yaml` over them, and whether it had one.
pub fn load(snapshot: &Snapshot) -> Result<(RolloutPolicy, bool), RenderError> {
    let bytes = match snapshot.read("", ROLLOUT_FILE) {
        Ok(b) => b,
        Err(PathError::NotFound { .. }) => return Ok((shipped().clone(), false)),
        Err(source) => {
            return Err(RenderError::Path {
                file: ROLLOUT_FILE.to_string(),
                source,
            })
        }
    };
    if bytes.len() > MAX_ROLLOUT_BYTES {
        return Err(RenderError::invalid(
            ROLLOUT_FILE,
            None,
            None,
            format!("larger than {MAX_ROLLOUT_BYTES} bytes"),
        ));
    }
    let text = crate::yaml::utf8(ROLLOUT_FILE, bytes)?;
    Ok((merge_rollout(SHIPPED, text)?, true))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{CommitId, Revision};

    #[test]
    fn criticality_picks_the_rollout_and_the_service_overrides_it() {
        let topo = "apiVersion: sluice.dev/v1\nkind: Topology\ntargets:\n  - name: vm\n    type: host\nservices:\n  pay:\n    path: api\n    criticality: critical\n  ui:\n    path: ui\n    canary: {steps: [10, 100]}\n    strategy: canary\n    analysis: {maxErrorRatio: 2.0}\n";
        let p = "apiVersion: sluice.dev/v1\nkind: Process\nmetadata:\n  name: w\nspec:\n  command: sluice\n  version: \"1\"\n";
        let files = [
            ("sluice.yaml", topo),
            ("api/p.yaml", p),
            ("ui/p.yaml", p),
            (ROLLOUT_FILE, "criticality:\n  critical:\n    soak: 5s\n"),
        ];
        let revision = Revision {
            commit: CommitId::parse(&"c".repeat(40)).unwrap(),
            time: 0,
            summary: "t".into(),
        };
        let t = crate::topology::load(&Snapshot::from_texts(revision, &files)).unwrap();
        assert!(t.rollout_from_repository);
        let pay = &t.services["pay"].rollout;
        assert_eq!(pay.strategy, Strategy::Canary);
        assert_eq!(pay.analysis.max_error_ratio, 1.2);
        assert_eq!(pay.soak, Duration::from_secs(5));
        assert_eq!(pay.canary.weights(), vec![5, 25, 50, 100]);
        let ui = &t.services["ui"].rollout;
        assert_eq!(ui.criticality, Criticality::Standard);
        assert_eq!(ui.analysis.max_error_ratio, 2.0);
        assert_eq!(ui.canary.weights(), vec![10, 100]);
    }

    #[test]
    fn the_hand_built_default_is_the_shipped_standard_rollout() {
        assert_eq!(
            Rollout::default(),
            shipped().resolve(None, None, Criticality::Standard)
        );
        assert_eq!(shipped().criticality.critical.max_error_ratio, 1.2);
    }

    #[test]
    fn shares_round_down_but_never_to_zero() {
        assert_eq!(Share::Percent(25).of(10), 2);
        assert_eq!(Share::Percent(25).of(2), 1);
        assert_eq!(Share::Percent(100).of(7), 7);
        assert_eq!(Share::Count(3).of(2), 2);
    }

    #[test]
    fn repository_rollout_merges_field_by_field_and_errors_name_the_field() {
        let p = merge_rollout(
            SHIPPED,
            "criticality:\n  standard:\n    strategy: canary\ncanary:\n  steps: [10, 100]\n",
        )
        .unwrap();
        assert_eq!(p.criticality.standard.strategy, Strategy::Canary);
        assert_eq!(p.criticality.standard.max_error_ratio, 1.5);
        assert_eq!(p.canary.weights(), vec![10, 100]);
        let e = merge_rollout(SHIPPED, "canary:\n  stpes: [10, 100]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains(ROLLOUT_FILE) && e.contains("stpes"), "{e}");
        let e = merge_rollout(SHIPPED, "canary:\n  steps: [50, 20]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("canary.steps") && e.contains(":2"), "{e}");
    }
}
