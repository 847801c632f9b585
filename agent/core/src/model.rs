//! The repository a user writes: `sluice.yaml` and the resource manifests.
//!
//! Every struct here refuses unknown fields: a typo in a field name is an
//! error that names the file, the field and the line, never a setting that is
//! silently ignored.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The name of the topology file at the root of the watched path.
pub const TOPOLOGY_FILE: &str = "sluice.yaml";
/// The `apiVersion` of sluice's own documents.
pub const API_VERSION: &str = "sluice.dev/v1";

/// `sluice.yaml`: targets, services and defaults.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Topology {
    pub api_version: String,
    pub kind: TopologyKind,
    #[serde(default)]
    pub defaults: Defaults,
    pub targets: Vec<TargetDef>,
    pub services: BTreeMap<String, ServiceDef>,
    /// Sync windows: when rollouts may run (reverts always may).
    #[serde(default)]
    pub windows: Vec<crate::window::Window>,
    /// Share of a ring's targets per wave (from the policy; filled in by
    /// render).
    #[serde(skip)]
    pub wave_limit: Option<crate::policy::Share>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub enum TopologyKind {
    Topology,
}

/// Settings every service inherits unless it says otherwise; unset ones
/// come from the rollout policy by the service's criticality.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Defaults {
    #[serde(default)]
    pub strategy: Option<Strategy>,
    #[serde(default)]
    pub criticality: Option<Criticality>,
    /// How long a wave must stay healthy after it became healthy.
    #[serde(default, with = "duration::option")]
    pub soak: Option<Duration>,
    /// How long a wave may take to become healthy before its gate fails.
    #[serde(default, with = "duration::option")]
    pub gate_timeout: Option<Duration>,
}

/// One place things are deployed to.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TargetDef {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: TargetKind,
    /// Ring 0 rolls first (a staging cluster, a canary host group).
    #[serde(default)]
    pub ring: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetKind {
    /// The machine the agent runs on.
    Host,
    /// A Kubernetes cluster.
    Kubernetes,
}

impl fmt::Display for TargetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TargetKind::Host => "host",
            TargetKind::Kubernetes => "kubernetes",
        })
    }
}

/// One service: a folder of manifests deployed to some targets.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceDef {
    /// Folder of manifests, relative to the watched path.
    pub path: String,
    #[serde(default)]
    pub depends_on: Vec<String>,
    #[serde(default)]
    pub strategy: Option<Strategy>,
    #[serde(default)]
    pub criticality: Option<Criticality>,
    /// Target names; every target when empty.
    #[serde(default)]
    pub targets: Vec<String>,
    /// What a drift scan does when live differs from the applied commit.
    #[serde(default)]
    pub drift: DriftPolicy,
    #[serde(default, with = "duration::option")]
    pub soak: Option<Duration>,
    #[serde(default, with = "duration::option")]
    pub gate_timeout: Option<Duration>,
    /// Canary steps and interval, over the policy's.
    #[serde(default)]
    pub canary: Option<CanaryOverride>,
    /// Analysis criteria, over the policy's.
    #[serde(default)]
    pub analysis: Option<AnalysisOverride>,
    /// Rolling: replicas replaced per batch (`1`, `25%`).
    #[serde(default)]
    pub max_unavailable: Option<crate::policy::Share>,
    /// Blue-green: how long the old version stays warm after the switch.
    #[serde(default, with = "duration::option")]
    pub keep_warm: Option<Duration>,
    /// The rollout as decided by these fields, `defaults:` and the policy
    /// (filled in by render; never read from the file).
    #[serde(skip)]
    pub rollout: crate::policy::Rollout,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CanaryOverride {
    #[serde(default)]
    pub steps: Option<Vec<u8>>,
    #[serde(default, with = "duration::option")]
    pub interval: Option<Duration>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AnalysisOverride {
    #[serde(default)]
    pub max_error_ratio: Option<f64>,
    #[serde(default)]
    pub error_rate_floor: Option<f64>,
    #[serde(default)]
    pub min_requests: Option<u64>,
    #[serde(default, with = "duration::option")]
    pub max_p95_increase: Option<Duration>,
    #[serde(default, with = "duration::option")]
    pub max_p99_increase: Option<Duration>,
    #[serde(default)]
    pub inconclusive: Option<crate::policy::Inconclusive>,
    #[serde(default, with = "duration::option")]
    pub hold_timeout: Option<Duration>,
}

/// What to do about drift (live changed by hand).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DriftPolicy {
    /// Show it in status, `sluice drift` and metrics.
    #[default]
    Report,
    /// Re-apply the applied commit's desired state (recorded as a heal).
    Heal,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Replace replicas a batch at a time, new ones ready before old stop.
    #[default]
    Rolling,
    /// Stop the old version, then start the new one.
    Recreate,
    /// Start the new version beside the old, switch all traffic at once.
    Bluegreen,
    /// Shift traffic to the new version in steps, gated by analysis.
    Canary,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Criticality {
    Low,
    #[default]
    Standard,
    Critical,
}

/// The envelope every manifest has. For host resources (`apiVersion:
/// sluice.dev/v1`) the spec is then read by kind into [`HostResource`];
/// Kubernetes objects are kept whole as JSON.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HostEnvelope {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: serde_yaml::Value,
}

/// A typed host resource.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(tag = "kind", content = "spec")]
pub enum HostResource {
    Process(ProcessSpec),
    File(FileSpec),
    Route(RouteSpec),
}

impl HostResource {
    pub const KINDS: [&'static str; 3] = ["Process", "File", "Route"];

    pub fn kind(&self) -> &'static str {
        match self {
            HostResource::Process(_) => "Process",
            HostResource::File(_) => "File",
            HostResource::Route(_) => "Route",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// A supervised process. `${PORT}`, `${VERSION}`, `${REPLICA}` and
/// `${artifact.NAME}` are substituted in `command`, `args` and `env` values.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ProcessSpec {
    pub command: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Relative to the target's file root; the file root itself when unset.
    #[serde(default)]
    pub working_dir: Option<String>,
    pub version: String,
    #[serde(default = "one")]
    pub replicas: u32,
    /// Fixed port (only with one replica); assigned by the agent when unset.
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub readiness: Option<Readiness>,
    #[serde(default)]
    pub restart: RestartSpec,
    #[serde(default)]
    pub artifacts: Vec<ArtifactSpec>,
    /// Grace period between SIGTERM and SIGKILL.
    #[serde(default = "ProcessSpec::default_stop_timeout", with = "duration")]
    pub stop_timeout: Duration,
}

impl ProcessSpec {
    fn default_stop_timeout() -> Duration {
        Duration::from_secs(10)
    }
}

fn one() -> u32 {
    1
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Readiness {
    /// `http: /healthz` — ready when GET returns 2xx.
    #[serde(default)]
    pub http: Option<String>,
    /// `tcp: true` — ready when the port accepts connections.
    #[serde(default)]
    pub tcp: bool,
    #[serde(default = "Readiness::default_period", with = "duration")]
    pub period: Duration,
    /// How long a new instance may take to become ready before the apply
    /// gives up on it (and keeps the old instances serving).
    #[serde(default = "Readiness::default_timeout", with = "duration")]
    pub timeout: Duration,
}

impl Readiness {
    fn default_period() -> Duration {
        Duration::from_millis(200)
    }
    fn default_timeout() -> Duration {
        Duration::from_secs(30)
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RestartSpec {
    #[serde(default)]
    pub policy: RestartPolicy,
    #[serde(default = "RestartSpec::default_initial", with = "duration")]
    pub initial_backoff: Duration,
    #[serde(default = "RestartSpec::default_max", with = "duration")]
    pub max_backoff: Duration,
}

impl RestartSpec {
    fn default_initial() -> Duration {
        Duration::from_millis(100)
    }
    fn default_max() -> Duration {
        Duration::from_secs(30)
    }
}

impl Default for RestartSpec {
    fn default() -> Self {
        RestartSpec {
            policy: RestartPolicy::default(),
            initial_backoff: Self::default_initial(),
            max_backoff: Self::default_max(),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum RestartPolicy {
    #[default]
    Always,
    OnFailure,
    Never,
}

/// A downloaded or repository-provided file pinned by its sha256 digest.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ArtifactSpec {
    pub name: String,
    /// `https://…` (or `file://…`) to download.
    #[serde(default)]
    pub url: Option<String>,
    /// A file of the service's folder, relative to it.
    #[serde(default)]
    pub path: Option<String>,
    /// Hex sha256 of the content; a mismatch is an error and nothing is
    /// applied. Computed for `path` artifacts when unset; required for
    /// downloads (by the default guardrail and by the host target).
    #[serde(default)]
    pub sha256: Option<String>,
    #[serde(default)]
    pub executable: bool,
}

/// A file the agent writes (atomically) under the target's file root.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FileSpec {
    /// Relative to the target's file root; `..` and absolute paths refused.
    pub path: String,
    /// Inline content; or `source`, a file of the service folder.
    #[serde(default)]
    pub content: Option<String>,
    #[serde(default)]
    pub source: Option<String>,
    /// Octal permission bits, e.g. "0644".
    #[serde(default = "FileSpec::default_mode")]
    pub mode: String,
    /// The content is sensitive: plans, reports and logs never show it,
    /// only that it changed.
    #[serde(default)]
    pub secret: bool,
}

impl FileSpec {
    fn default_mode() -> String {
        "0644".to_string()
    }
}

/// A listen address routed by the router to the replicas of a Process.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteSpec {
    pub listen: String,
    /// Name of a Process of the same service and target.
    pub process: String,
}

/// Durations as `100ms`, `5s`, `2m`, `1h` (or a bare number of seconds).
pub mod duration {
    use std::time::Duration;

    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn parse(s: &str) -> Result<Duration, String> {
        let s = s.trim();
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: f64 = num
            .parse()
            .map_err(|_| format!("invalid duration {s:?}: expected e.g. 500ms, 30s, 5m, 1h"))?;
        let secs = match unit {
            "ms" => n / 1000.0,
            "" | "s" => n,
            "m" => n * 60.0,
            "h" => n * 3600.0,
            _ => return Err(format!("invalid duration unit in {s:?}: use ms, s, m or h")),
        };
        if !secs.is_finite() || !(0.0..=365.0 * 86400.0).contains(&secs) {
            return Err(format!("duration {s:?} out of range"));
        }
        Ok(Duration::from_secs_f64(secs))
    }

    pub fn format(d: Duration) -> String {
        let ms = d.as_millis();
        if !ms.is_multiple_of(1000) {
            format!("{ms}ms")
        } else if !ms.is_multiple_of(60_000) || ms == 0 {
            format!("{}s", ms / 1000)
        } else {
            format!("{}m", ms / 60_000)
        }
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Num(f64),
        Str(String),
    }

    fn from_raw(raw: Raw) -> Result<Duration, String> {
        match raw {
            Raw::Num(n) => parse(&n.to_string()),
            Raw::Str(s) => parse(&s),
        }
    }

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        from_raw(Raw::deserialize(d)?).map_err(D::Error::custom)
    }

    pub mod option {
        use super::*;

        pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => super::serialize(d, s),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            Option::<Raw>::deserialize(d)?
                .map(from_raw)
                .transpose()
                .map_err(D::Error::custom)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_round_trip() {
        assert_eq!(
            duration::parse("100ms").unwrap(),
            Duration::from_millis(100)
        );
        assert_eq!(duration::parse("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(duration::parse("3").unwrap(), Duration::from_secs(3));
        assert!(duration::parse("3 days").is_err());
        assert!(duration::parse("-1s").is_err());
        for s in ["100ms", "5s", "2m", "0s"] {
            assert_eq!(duration::format(duration::parse(s).unwrap()), s);
        }
    }
}
