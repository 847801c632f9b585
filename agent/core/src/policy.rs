//! Policies: the rollout defaults every service inherits and the Rego
//! guardrails every rendered resource must pass. Pure.
//!
//! The default pack (`policies/` at the top of this repository) is compiled
//! into the agent. A watched repository's own `policies/` folder overrides
//! it: its `rollout.yaml` merges over the default field by field, a `.rego`
//! file with the same path as a default one replaces it, and any other
//! `.rego` file is added. `*_test.rego` files are OPA unit tests and are not
//! evaluated as guardrails.
//!
//! # Guardrails (conftest's conventions)
//! Every package's `deny`, `violation` and `warn` rules (and `deny_*`,
//! `violation_*`, `warn_*`) are evaluated, each yielding messages (strings,
//! or objects with a `msg`). `input` is one rendered resource exactly as a
//! conftest run over the manifest would see it (the `flags.yaml` document
//! counts as one too), so existing conftest policies work unchanged. The
//! change context is extra data, as `conftest --data` would give it, at
//! `data.sluice.context`: `commit`, `service`, `target`, `targetKind`,
//! `ring`, `file`, `action`, `dependents` (services whose `dependsOn` names
//! this one) and `wave` (`index`, `level`, `ring`, `services`; null for an
//! unchanged resource). The whole plan is at `data.sluice.plan.waves[i]`,
//! each wave with its `resources` (target, service, kind, name, action,
//! labels).
//! Sensitive values (Secret data, `secret: true` files) reach policies as
//! `"(redacted)"`, so no message can print them.
//!
//! A `deny` blocks the commit: nothing is applied. A `warn` is reported.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{json, Value};

use crate::analysis::Criteria;
use crate::model::{duration, Criticality, Strategy, Topology, API_VERSION};
use crate::plan::Plan;
use crate::render::{find_line, RenderError, Rendered};
use crate::source::{PathError, Snapshot};

/// The policy folder of the watched path.
pub const POLICY_DIR: &str = "policies";
/// The rollout policy inside it.
pub const ROLLOUT_FILE: &str = "policies/rollout.yaml";

/// The default pack, as shipped: (path, content).
pub const DEFAULT_PACK: &[(&str, &str)] = &[
    (
        "policies/rollout.yaml",
        include_str!("../../../policies/rollout.yaml"),
    ),
    (
        "policies/guardrails/lib.rego",
        include_str!("../../../policies/guardrails/lib.rego"),
    ),
    (
        "policies/guardrails/images.rego",
        include_str!("../../../policies/guardrails/images.rego"),
    ),
    (
        "policies/guardrails/artifacts.rego",
        include_str!("../../../policies/guardrails/artifacts.rego"),
    ),
    (
        "policies/guardrails/resources.rego",
        include_str!("../../../policies/guardrails/resources.rego"),
    ),
    (
        "policies/guardrails/privileged.rego",
        include_str!("../../../policies/guardrails/privileged.rego"),
    ),
    (
        "policies/guardrails/flags.rego",
        include_str!("../../../policies/guardrails/flags.rego"),
    ),
    (
        "policies/guardrails/migrations.rego",
        include_str!("../../../policies/guardrails/migrations.rego"),
    ),
];

/// Largest policy file read from a repository.
const MAX_POLICY_BYTES: usize = 256 * 1024;
/// Most guardrail findings kept (the rest are counted).
const MAX_FINDINGS: usize = 1000;

/// A count or a percentage (`3`, `"25%"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Share {
    Count(u32),
    Percent(u32),
}

impl Share {
    /// How many of `total`: a percentage rounds down but never below one.
    pub fn of(self, total: usize) -> usize {
        let n = match self {
            Share::Count(n) => n as usize,
            Share::Percent(p) => total * p as usize / 100,
        };
        n.clamp(1, total.max(1))
    }
}

impl fmt::Display for Share {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Share::Count(n) => write!(f, "{n}"),
            Share::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl Serialize for Share {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Share::Count(n) => s.serialize_u32(*n),
            Share::Percent(_) => s.serialize_str(&self.to_string()),
        }
    }
}

impl<'de> Deserialize<'de> for Share {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u32),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(0) => Err(D::Error::custom("must be at least 1")),
            Raw::N(n) => Ok(Share::Count(n)),
            Raw::S(s) => {
                let p = s
                    .trim()
                    .strip_suffix('%')
                    .and_then(|p| p.trim().parse::<u32>().ok())
                    .filter(|p| (1..=100).contains(p))
                    .ok_or_else(|| {
                        D::Error::custom(format!(
                            "{s:?}: expected a count (3) or a percentage from 1% to 100%"
                        ))
                    })?;
                Ok(Share::Percent(p))
            }
        }
    }
}

/// What an analysis still inconclusive at the end of a step does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Inconclusive {
    /// Abort: traffic back on the baseline, then revert.
    #[default]
    Fail,
    /// Stay at the step (the canary keeps its share) until enough traffic
    /// decides, for at most the hold timeout; then fail.
    Hold,
}

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

/// Canary steps.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CanarySettings {
    /// The canary's share of traffic at each step, in percent, rising to 100.
    pub steps: Vec<u8>,
    /// How long each step is held and judged.
    #[serde(with = "duration")]
    pub interval: Duration,
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

/// How one service rolls out, fully resolved before the rollout starts:
/// the service's own fields, then `sluice.yaml` defaults, then the policy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rollout {
    pub strategy: Strategy,
    pub criticality: Criticality,
    #[serde(with = "duration")]
    pub soak: Duration,
    #[serde(with = "duration")]
    pub gate_timeout: Duration,
    pub canary: CanarySettings,
    pub analysis: Criteria,
    pub inconclusive: Inconclusive,
    #[serde(with = "duration")]
    pub hold_timeout: Duration,
    pub max_unavailable: Share,
    #[serde(with = "duration")]
    pub keep_warm: Duration,
}

impl Default for Rollout {
    fn default() -> Self {
        // The shipped policy for a standard service; only reached when a
        // topology was built by hand without `apply_defaults`.
        shipped().rollout.resolve(None, None, Criticality::Standard)
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
        }
    }

    fn validate(&self) -> Result<(), (String, String)> {
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
pub fn check_steps(steps: &[u8]) -> Result<(), String> {
    if steps.is_empty() {
        return Err("at least one step is needed (e.g. [5, 25, 50, 100])".into());
    }
    if steps.windows(2).any(|w| w[0] >= w[1]) || steps[0] == 0 {
        return Err(format!("{steps:?}: steps must rise strictly from above 0"));
    }
    if steps.last() != Some(&100) {
        return Err(format!("{steps:?}: the last step must be 100"));
    }
    Ok(())
}

/// Where a policy module came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    Default,
    Repository,
}

/// One Rego module.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Module {
    pub path: String,
    pub origin: Origin,
    #[serde(skip)]
    pub source: String,
}

/// The effective policy of one commit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicyPack {
    pub rollout: RolloutPolicy,
    /// Whether `rollout` includes the repository's `policies/rollout.yaml`.
    pub rollout_from_repository: bool,
    pub modules: Vec<Module>,
}

/// The shipped pack, parsed once.
pub fn shipped() -> &'static PolicyPack {
    static PACK: std::sync::OnceLock<PolicyPack> = std::sync::OnceLock::new();
    PACK.get_or_init(default_pack)
}

/// The shipped pack, with no repository overrides.
pub fn default_pack() -> PolicyPack {
    let rollout_text = DEFAULT_PACK[0].1;
    let rollout = serde_yaml::from_str(rollout_text)
        .unwrap_or_else(|e| panic!("the shipped policies/rollout.yaml is invalid: {e}"));
    PolicyPack {
        rollout,
        rollout_from_repository: false,
        modules: DEFAULT_PACK[1..]
            .iter()
            .map(|(path, source)| Module {
                path: path.to_string(),
                origin: Origin::Default,
                source: source.to_string(),
            })
            .collect(),
    }
}

/// Loads the effective policy of a commit: the default pack with the
/// repository's `policies/` over it. Every Rego module is parsed here, so a
/// broken policy is an error naming its file before anything is planned.
pub fn load(snapshot: &Snapshot) -> Result<PolicyPack, RenderError> {
    let mut pack = shipped().clone();
    let read = |path: &str| -> Result<String, RenderError> {
        let bytes = snapshot
            .read("", path)
            .map_err(|source| RenderError::Path {
                file: path.to_string(),
                source,
            })?;
        if bytes.len() > MAX_POLICY_BYTES {
            return Err(RenderError::invalid(
                path,
                None,
                None,
                format!("larger than {MAX_POLICY_BYTES} bytes"),
            ));
        }
        String::from_utf8(bytes.to_vec())
            .map_err(|_| RenderError::invalid(path, None, None, "not UTF-8 text"))
    };
    match read(ROLLOUT_FILE) {
        Ok(text) => {
            pack.rollout = merge_rollout(DEFAULT_PACK[0].1, &text)?;
            pack.rollout_from_repository = true;
        }
        Err(RenderError::Path {
            source: PathError::NotFound { .. },
            ..
        }) => {}
        Err(e) => return Err(e),
    }
    let repo_modules: Vec<String> = snapshot
        .list(POLICY_DIR)
        .map(|(p, _)| p.clone())
        .filter(|p| p.ends_with(".rego") && !p.ends_with("_test.rego"))
        .collect();
    for path in repo_modules {
        let source = read(&path)?;
        let module = Module {
            path: path.clone(),
            origin: Origin::Repository,
            source,
        };
        match pack.modules.iter_mut().find(|m| m.path == path) {
            Some(m) => *m = module,
            None => pack.modules.push(module),
        }
    }
    compile(&pack.modules)?;
    Ok(pack)
}

fn merge_rollout(default: &str, repo: &str) -> Result<RolloutPolicy, RenderError> {
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

fn compile(modules: &[Module]) -> Result<regorus::Engine, RenderError> {
    let mut engine = regorus::Engine::new();
    for m in modules {
        // Rego v1 first (conftest's default since OPA 1.0); policies written
        // for v0 (`deny[msg] { ... }`) are accepted as they were.
        let v1 = engine.add_policy(m.path.clone(), m.source.clone());
        if let Err(e1) = v1 {
            engine.set_rego_v0(true);
            let v0 = engine.add_policy(m.path.clone(), m.source.clone());
            engine.set_rego_v0(false);
            if v0.is_err() {
                return Err(RenderError::invalid(
                    &m.path,
                    None,
                    None,
                    format!("not valid Rego: {}", first_lines(&e1.to_string())),
                ));
            }
        }
    }
    Ok(engine)
}

/// The reason line of a regorus evaluation error (the rest echoes the query).
fn last_line(s: &str) -> String {
    let line = s
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty() && *l != "|")
        .unwrap_or_default();
    first_lines(line)
}

/// A regorus error (source excerpt with a caret line) on one line.
fn first_lines(s: &str) -> String {
    let one: Vec<&str> = s
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && *l != "|")
        .collect();
    let mut out = one.join(" ");
    if out.len() > 600 {
        let mut cut = 600;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push('…');
    }
    out
}

/// How serious a finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Deny,
    Warn,
}

/// One message of one guardrail about one resource.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Finding {
    pub level: Level,
    /// The resource (`target/kind/name`), or the document (`flags.yaml`).
    pub resource: String,
    /// The manifest file it came from.
    pub file: String,
    /// `data.<package>.<rule>`.
    pub rule: String,
    pub message: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} ({}, {}): {}",
            match self.level {
                Level::Deny => "deny",
                Level::Warn => "warn",
            },
            self.resource,
            self.file,
            self.rule,
            self.message
        )
    }
}

/// The guardrails' verdict on one commit.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PolicyReport {
    pub findings: Vec<Finding>,
    /// Inputs evaluated (resources plus documents).
    pub evaluated: usize,
    /// Modules evaluated, with where each came from.
    pub modules: Vec<Module>,
    /// Findings beyond the cap, counted only.
    #[serde(default)]
    pub dropped: usize,
}

impl PolicyReport {
    pub fn denies(&self) -> impl Iterator<Item = &Finding> {
        self.findings.iter().filter(|f| f.level == Level::Deny)
    }

    pub fn warnings(&self) -> impl Iterator<Item = &Finding> {
        self.findings.iter().filter(|f| f.level == Level::Warn)
    }

    pub fn is_denied(&self) -> bool {
        self.denies().next().is_some()
    }
}

/// Evaluates the guardrails of `pack` over every rendered resource (with
/// its change context from `plan`) and the flags document.
pub fn evaluate(
    pack: &PolicyPack,
    rendered: &Rendered,
    plan: &Plan,
) -> Result<PolicyReport, RenderError> {
    let mut engine = compile(&pack.modules)?;
    let rules = verdict_rules(&pack.modules);
    // An array of every verdict rule; an undefined rule (no messages) is
    // an empty set, so positions line up with `rules`.
    let verdicts = format!(
        "[{}]",
        rules
            .iter()
            .map(|r| format!("object.get({{\"v\": {r}}}, \"v\", set())"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let topo = &rendered.topology;
    let mut dependents: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (name, def) in &topo.services {
        for d in &def.depends_on {
            dependents.entry(d.as_str()).or_default().push(name);
        }
    }
    // The wave of each changed resource, and each wave's resources.
    let mut wave_of = BTreeMap::new();
    let mut wave_ctx = Vec::new();
    for w in &plan.waves {
        let resources: Vec<Value> = w
            .changes
            .iter()
            .map(|c| {
                wave_of.insert(c.id.clone(), (w.index, c.action));
                let labels = rendered
                    .desired
                    .resources
                    .get(&c.id)
                    .map(|r| r.body["metadata"]["labels"].clone())
                    .unwrap_or(Value::Null);
                json!({
                    "target": c.id.target, "service": c.service, "kind": c.id.kind,
                    "namespace": c.id.namespace, "name": c.id.name,
                    "action": c.action, "labels": labels,
                })
            })
            .collect();
        wave_ctx.push(json!({
            "index": w.index, "level": w.level, "ring": w.ring,
            "services": w.services, "resources": resources,
        }));
    }
    let rings: BTreeMap<&str, (u32, String)> = topo
        .targets
        .iter()
        .map(|t| (t.name.as_str(), (t.ring, t.kind.to_string())))
        .collect();
    let commit = rendered.desired.revision.commit.to_string();
    let mut report = PolicyReport {
        modules: pack.modules.clone(),
        ..Default::default()
    };
    // The plan (every wave with its resources) is data, set once; each
    // resource's own context is small and goes in with `with`.
    engine
        .add_data(regorus::Value::from(
            json!({ "sluice": { "plan": { "waves": wave_ctx } } }),
        ))
        .map_err(|e| RenderError::invalid(POLICY_DIR, None, None, e.to_string()))?;
    let wave_summary: Vec<Value> = wave_ctx
        .iter()
        .map(|w| {
            json!({ "index": w["index"], "level": w["level"], "ring": w["ring"], "services": w["services"] })
        })
        .collect();
    let mut run = |engine: &mut regorus::Engine,
                   input: Value,
                   context: Value,
                   resource: String,
                   file: &str|
     -> Result<(), RenderError> {
        engine.set_input(regorus::Value::from(input));
        // The context goes in with a `with` modifier: changing the data
        // document itself would make regorus re-analyse every module.
        let context = context.to_string();
        report.evaluated += 1;
        // One query per input: every verdict rule at once.
        let query = format!("{verdicts} with data.sluice.context as {context}");
        let value = engine
            .eval_query(query, false)
            .map(|r| {
                r.result
                    .into_iter()
                    .next()
                    .and_then(|r| r.expressions.into_iter().next())
                    .map(|e| e.value)
                    .unwrap_or(regorus::Value::Undefined)
            })
            .map_err(|e| {
                RenderError::invalid(
                    POLICY_DIR,
                    None,
                    None,
                    format!("evaluating for {resource}: {}", last_line(&e.to_string())),
                )
            })?;
        let value: Value =
            serde_json::from_str(&value.to_json_str().unwrap_or_default()).unwrap_or(Value::Null);
        for (rule, value) in rules.iter().zip(value.as_array().into_iter().flatten()) {
            let name = rule.rsplit('.').next().unwrap_or_default();
            let Some(level) = rule_level(name) else {
                continue;
            };
            for message in messages(value) {
                if report.findings.len() >= MAX_FINDINGS {
                    report.dropped += 1;
                    continue;
                }
                report.findings.push(Finding {
                    level,
                    resource: resource.clone(),
                    file: file.to_string(),
                    rule: rule.clone(),
                    message,
                });
            }
        }
        Ok(())
    };
    for r in rendered.desired.resources.values() {
        let (ring, target_kind) = rings
            .get(r.id.target.as_str())
            .cloned()
            .unwrap_or((0, String::new()));
        let (wave, action) = match wave_of.get(&r.id) {
            Some((i, a)) => (wave_summary[*i].clone(), json!(a)),
            None => (Value::Null, json!("unchanged")),
        };
        let context = json!({
            "commit": commit, "service": r.service, "target": r.id.target,
            "targetKind": target_kind, "ring": ring, "file": r.file,
            "action": action, "wave": wave,
            "dependents": dependents.get(r.service.as_str()).cloned().unwrap_or_default(),
        });
        run(
            &mut engine,
            redacted(&r.body, &r.redact),
            context,
            r.id.to_string(),
            &r.file,
        )?;
    }
    if let Some(flags) = &rendered.flags {
        let doc = serde_json::to_value(flags).unwrap_or(Value::Null);
        let context = json!({ "commit": commit, "file": crate::flags::FLAGS_FILE });
        run(
            &mut engine,
            doc,
            context,
            crate::flags::FLAGS_FILE.to_string(),
            crate::flags::FLAGS_FILE,
        )?;
    }
    // One finding per message and resource, in a stable order.
    let unique: BTreeSet<Finding> = report.findings.drain(..).collect();
    report.findings = unique.into_iter().collect();
    Ok(report)
}

/// The verdict rules (`data.<package>.deny`, ...) the modules define, read
/// from their rule heads: evaluating only those (not whole packages with
/// their helpers) keeps a 5,000-resource commit fast.
fn verdict_rules(modules: &[Module]) -> Vec<String> {
    let mut rules = BTreeSet::new();
    for m in modules {
        let mut package = None;
        for line in m.source.lines() {
            if let Some(p) = line.trim().strip_prefix("package ") {
                package = Some(p.trim().to_string());
                continue;
            }
            // Rule heads start at column 0: `deny contains msg if`, `deny[msg]`,
            // `warn_x contains`, `violation[{"msg": m}]`.
            let head: String = line
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if head.is_empty() || rule_level(&head).is_none() {
                continue;
            }
            let rest = line[head.len()..].trim_start();
            let is_head = rest.starts_with('[')
                || rest.starts_with('{')
                || rest.starts_with("contains")
                || rest.starts_with("if")
                || rest.starts_with(":=")
                || rest.starts_with('=');
            if let (true, Some(p)) = (is_head, &package) {
                rules.insert(format!("data.{p}.{head}"));
            }
        }
    }
    rules.into_iter().collect()
}

/// conftest's rule names: `deny`, `violation`, `warn`, optionally `_suffix`.
fn rule_level(rule: &str) -> Option<Level> {
    let is = |prefix: &str| rule == prefix || rule.starts_with(&format!("{prefix}_"));
    if is("deny") || is("violation") {
        Some(Level::Deny)
    } else if is("warn") {
        Some(Level::Warn)
    } else {
        None
    }
}

/// A rule's messages: a set of strings or `{msg: ...}` objects, or `true`.
fn messages(value: &Value) -> Vec<String> {
    let one = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o
            .get("msg")
            .and_then(|m| m.as_str())
            .map(str::to_string)
            .or_else(|| Some(v.to_string())),
        Value::Bool(false) | Value::Null => None,
        Value::Bool(true) => Some("denied".to_string()),
        other => Some(other.to_string()),
    };
    match value {
        Value::Array(items) => items.iter().filter_map(one).collect(),
        other => one(other).into_iter().collect(),
    }
}

/// `body` with the values at `paths` (dotted) replaced by "(redacted)".
fn redacted(body: &Value, paths: &[String]) -> Value {
    let mut body = body.clone();
    for path in paths {
        let pointer = format!("/{}", path.replace('~', "~0").replace('.', "/"));
        if let Some(v) = body.pointer_mut(&pointer) {
            *v = Value::String("(redacted)".into());
        }
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::source::{CommitId, Revision};

    /// Renders, plans against an empty live system, and evaluates.
    fn check(files: &[(&str, &str)]) -> Result<PolicyReport, RenderError> {
        let revision = Revision {
            commit: CommitId::parse(&"c".repeat(40)).unwrap(),
            time: 0,
            summary: "t".into(),
        };
        let snapshot = Snapshot::from_texts(revision, files);
        let rendered = crate::render::render(&snapshot)?;
        let plan = crate::plan::plan(
            &rendered.topology,
            &rendered.desired,
            &BTreeMap::new(),
            &BTreeMap::new(),
        )?;
        evaluate(&rendered.policy, &rendered, &plan)
    }

    const TOPO: &str = "apiVersion: sluice.dev/v1\nkind: Topology\ntargets:\n  - name: prod\n    type: kubernetes\n  - name: vm\n    type: host\nservices:\n  api:\n    path: api\n";

    fn deployment(image: &str, container_extra: &str, labels: &str) -> String {
        format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: api\n  namespace: shop\n{labels}spec:\n  template:\n    spec:\n      containers:\n        - name: app\n          image: {image}\n          resources:\n            limits: {{memory: 256Mi, cpu: 500m}}\n{container_extra}"
        )
    }

    fn process(version: &str, extra: &str) -> String {
        format!("apiVersion: sluice.dev/v1\nkind: Process\nmetadata:\n  name: worker\n{extra}spec:\n  command: sluice\n  version: \"{version}\"\n")
    }

    fn denies(r: &PolicyReport) -> Vec<String> {
        r.denies().map(|f| f.message.clone()).collect()
    }

    fn one_deny(files: &[(&str, &str)], needle: &str) {
        let r = check(files).unwrap();
        let d = denies(&r);
        assert!(
            d.len() == 1 && d[0].contains(needle),
            "expected one deny containing {needle:?}, got {d:?}"
        );
    }

    fn clean(files: &[(&str, &str)]) {
        let r = check(files).unwrap();
        assert_eq!(denies(&r), Vec::<String>::new());
    }

    #[test]
    fn mutable_image_tags_are_denied_unless_allowed() {
        for bad in ["nginx:latest", "nginx", "registry.local:5000/team/nginx"] {
            one_deny(
                &[
                    ("sluice.yaml", TOPO),
                    ("api/d.yaml", &deployment(bad, "", "")),
                ],
                "mutable image",
            );
        }
        for good in [
            "nginx:1.27.2",
            "registry.local:5000/nginx:1.27",
            "nginx@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            clean(&[
                ("sluice.yaml", TOPO),
                ("api/d.yaml", &deployment(good, "", "")),
            ]);
        }
        let allowed = deployment(
            "nginx:latest",
            "",
            "  labels:\n    sluice.dev/allow-mutable-tag: \"true\"\n",
        );
        clean(&[("sluice.yaml", TOPO), ("api/d.yaml", &allowed)]);
        one_deny(
            &[
                ("sluice.yaml", TOPO),
                ("api/p.yaml", &process("latest", "")),
            ],
            "version \"latest\" is mutable",
        );
        clean(&[("sluice.yaml", TOPO), ("api/p.yaml", &process("1.4.2", ""))]);
    }

    #[test]
    fn downloaded_artifacts_need_a_digest() {
        let with = |sha: &str| {
            format!(
                "{}  artifacts:\n    - name: bin\n      url: https://example.com/bin\n{sha}",
                process("1", "")
            )
        };
        one_deny(
            &[("sluice.yaml", TOPO), ("api/p.yaml", &with(""))],
            "without a sha256 digest",
        );
        let pinned = with(&format!("      sha256: {}\n", "a".repeat(64)));
        clean(&[("sluice.yaml", TOPO), ("api/p.yaml", &pinned)]);
    }

    #[test]
    fn containers_need_limits_and_may_not_be_privileged() {
        let no_limits = deployment("nginx:1.27", "", "").replace(
            "          resources:\n            limits: {memory: 256Mi, cpu: 500m}\n",
            "",
        );
        let r = check(&[("sluice.yaml", TOPO), ("api/d.yaml", &no_limits)]).unwrap();
        assert_eq!(denies(&r).len(), 1, "{r:?}");
        assert!(denies(&r)[0].contains("no memory limit"));
        assert_eq!(r.warnings().count(), 1, "no CPU request/limit warns");
        let privileged = deployment(
            "nginx:1.27",
            "          securityContext:\n            privileged: true\n",
            "",
        );
        one_deny(
            &[("sluice.yaml", TOPO), ("api/d.yaml", &privileged)],
            "is privileged",
        );
        let cap = deployment(
            "nginx:1.27",
            "          securityContext:\n            capabilities: {add: [SYS_ADMIN]}\n",
            "",
        );
        one_deny(
            &[("sluice.yaml", TOPO), ("api/d.yaml", &cap)],
            "adds the capability SYS_ADMIN",
        );
        let fine = deployment(
            "nginx:1.27",
            "          securityContext:\n            privileged: false\n",
            "",
        );
        clean(&[("sluice.yaml", TOPO), ("api/d.yaml", &fine)]);
    }

    #[test]
    fn flags_need_an_owner_and_an_expiry_date() {
        let flags = |extra: &str| {
            format!("apiVersion: sluice.dev/v1\nkind: Flags\nflags:\n  dark-mode:\n    kind: release\n    state: enabled\n    default: on\n{extra}")
        };
        let p1 = process("1", "");
        let base = [("sluice.yaml", TOPO), ("api/p.yaml", p1.as_str())];
        let both = flags("    owner: ui-team\n    expires: 2030-01-01\n");
        let no_owner = flags("    expires: 2030-01-01\n");
        let no_expiry = flags("    owner: ui-team\n");
        clean(&[base[0], base[1], ("flags.yaml", &both)]);
        one_deny(
            &[base[0], base[1], ("flags.yaml", &no_owner)],
            "has no owner",
        );
        one_deny(
            &[base[0], base[1], ("flags.yaml", &no_expiry)],
            "no expiry date",
        );
    }

    #[test]
    fn a_migration_never_shares_a_wave_with_code_that_depends_on_it() {
        let migration = process("7", "  labels:\n    sluice.dev/migration: \"true\"\n")
            .replace("name: worker", "name: migrate");
        // Same service: the migration and the code land in one wave.
        one_deny(
            &[
                ("sluice.yaml", TOPO),
                ("api/p.yaml", &process("2", "")),
                ("api/m.yaml", &migration),
            ],
            "schema migration rolls in wave 1 together with Process/worker",
        );
        // Its own service that the code depends on: separate waves.
        let topo = format!("{TOPO}    dependsOn: [schema]\n  schema:\n    path: schema\n");
        clean(&[
            ("sluice.yaml", &topo),
            ("api/p.yaml", &process("2", "")),
            ("schema/m.yaml", &migration),
        ]);
    }

    #[test]
    fn a_repository_brings_conftest_policies_and_overrides_shipped_ones() {
        // Written for conftest in Rego v0, as many existing packs are.
        let team = "package main\n\ndeny[msg] {\n  input.kind == \"Process\"\n  not input.metadata.labels.team\n  msg := sprintf(\"%s needs a team label\", [input.metadata.name])\n}\n\nwarn_replicas[msg] {\n  input.spec.replicas < 2\n  msg := \"single replica\"\n}\n";
        let p1 = process("1", "");
        let files = [
            ("sluice.yaml", TOPO),
            ("api/p.yaml", p1.as_str()),
            ("policies/team.rego", team),
        ];
        let r = check(&files).unwrap();
        assert_eq!(denies(&r), vec!["worker needs a team label".to_string()]);
        assert_eq!(r.findings[0].rule, "data.main.deny");
        assert_eq!(r.warnings().count(), 1);
        let labelled = process("1", "  labels:\n    team: core\n");
        let r = check(&[files[0], ("api/p.yaml", &labelled), files[2]]).unwrap();
        assert!(!r.is_denied());
        // A file with a shipped path replaces the shipped guardrail.
        let off = "package sluice.guardrails.images\n";
        clean(&[
            ("sluice.yaml", TOPO),
            ("api/p.yaml", &process("latest", "")),
            ("policies/guardrails/images.rego", off),
        ]);
    }

    #[test]
    fn a_broken_policy_is_an_error_naming_its_file() {
        let e = check(&[
            ("sluice.yaml", TOPO),
            ("api/p.yaml", &process("1", "")),
            ("policies/bad.rego", "package x\ndeny contains msg if {\n"),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("policies/bad.rego") && e.contains("not valid Rego"),
            "{e}"
        );
    }

    #[test]
    fn criticality_picks_the_rollout_and_the_service_overrides_it() {
        let topo = "apiVersion: sluice.dev/v1\nkind: Topology\ntargets:\n  - name: vm\n    type: host\nservices:\n  pay:\n    path: api\n    criticality: critical\n  ui:\n    path: ui\n    canary: {steps: [10, 100]}\n    strategy: canary\n    analysis: {maxErrorRatio: 2.0}\n";
        let p1 = process("1", "");
        let p2 = p1.replace("worker", "ui");
        let snapshot_files = [
            ("sluice.yaml", topo),
            ("api/p.yaml", p1.as_str()),
            ("ui/p.yaml", p2.as_str()),
            (
                "policies/rollout.yaml",
                "criticality:\n  critical:\n    soak: 5s\n",
            ),
        ];
        let revision = Revision {
            commit: CommitId::parse(&"c".repeat(40)).unwrap(),
            time: 0,
            summary: "t".into(),
        };
        let snapshot = Snapshot::from_texts(revision, &snapshot_files);
        let t = crate::render::load_topology(&snapshot).unwrap();
        let pay = &t.services["pay"].rollout;
        assert_eq!(pay.strategy, Strategy::Canary);
        assert_eq!(pay.analysis.max_error_ratio, 1.2);
        assert_eq!(pay.soak, Duration::from_secs(5));
        assert_eq!(pay.canary.steps, vec![5, 25, 50, 100]);
        let ui = &t.services["ui"].rollout;
        assert_eq!(ui.criticality, Criticality::Standard);
        assert_eq!(ui.analysis.max_error_ratio, 2.0);
        assert_eq!(ui.canary.steps, vec![10, 100]);
    }

    #[test]
    fn the_shipped_pack_parses_and_compiles() {
        let pack = default_pack();
        assert_eq!(pack.rollout.criticality.critical.max_error_ratio, 1.2);
        assert_eq!(pack.rollout.criticality.standard.max_error_ratio, 1.5);
        compile(&pack.modules).expect("default guardrails compile");
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
            DEFAULT_PACK[0].1,
            "criticality:\n  standard:\n    strategy: canary\ncanary:\n  steps: [10, 100]\n",
        )
        .unwrap();
        assert_eq!(p.criticality.standard.strategy, Strategy::Canary);
        assert_eq!(p.criticality.standard.max_error_ratio, 1.5);
        assert_eq!(p.canary.steps, vec![10, 100]);
        let e = merge_rollout(DEFAULT_PACK[0].1, "canary:\n  stpes: [10, 100]\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("policies/rollout.yaml") && e.contains("stpes"),
            "{e}"
        );
        let e = merge_rollout(DEFAULT_PACK[0].1, "canary:\n  steps: [50, 20]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("canary.steps") && e.contains(":2"), "{e}");
    }

    #[test]
    fn conftest_rule_names_and_message_shapes() {
        assert_eq!(rule_level("deny"), Some(Level::Deny));
        assert_eq!(rule_level("deny_latest"), Some(Level::Deny));
        assert_eq!(rule_level("violation"), Some(Level::Deny));
        assert_eq!(rule_level("warn_x"), Some(Level::Warn));
        assert_eq!(rule_level("denylist"), None);
        assert_eq!(
            messages(&json!(["a", {"msg": "b"}])),
            vec!["a".to_string(), "b".to_string()]
        );
    }
}
