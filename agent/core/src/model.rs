//! The repository a user writes: `sluice.yaml` and the resource manifests.
//!
//! Every struct here refuses unknown fields: a typo in a field name is an
//! error that names the file, the field and the line, never a setting that is
//! silently ignored.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

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
    #[serde(default)]
    pub targets: Vec<TargetDef>,
    /// Fleets of hosts declared once; each host becomes a target of its
    /// own (named `<group>-<host>`), in rings (see [`HostGroup`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_groups: Vec<HostGroup>,
    pub services: BTreeMap<String, ServiceDef>,
    /// Sync windows: when rollouts may run (reverts always may).
    #[serde(default)]
    pub windows: Vec<crate::window::Window>,
    /// Guardrail settings (which policy packages run, and how).
    #[serde(default)]
    pub policies: PolicySettings,
    /// Share of a ring's targets per wave (from the policy; filled in by
    /// render).
    #[serde(skip)]
    pub wave_limit: Option<Share>,
    /// Whether the rollout defaults include the repository's
    /// `policies/rollout.yaml` (filled in where the topology is loaded).
    #[serde(skip)]
    pub rollout_from_repository: bool,
}

/// `policies:` in `sluice.yaml`: which packages of the repository's Rego
/// policies run, and on what input, as conftest's `--namespace`,
/// `--all-namespaces` and `--combine` choose them. The shipped guardrails
/// (`sluice.guardrails.*`) always run, once per document.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PolicySettings {
    /// Packages evaluated once per rendered document (conftest's default
    /// namespace is `main`); `"*"` selects every package.
    #[serde(default = "PolicySettings::default_namespaces")]
    pub namespaces: Vec<String>,
    /// Packages evaluated once per target, with every document rendered for
    /// it as one input (conftest `--combine`), for rules across resources.
    #[serde(default)]
    pub combine: Vec<String>,
}

impl PolicySettings {
    fn default_namespaces() -> Vec<String> {
        vec!["main".to_string()]
    }
}

impl Default for PolicySettings {
    fn default() -> Self {
        PolicySettings {
            namespaces: Self::default_namespaces(),
            combine: Vec::new(),
        }
    }
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
    /// Kubernetes: the ServiceAccount sluice impersonates to write this
    /// target's objects (`namespace/name`, or `name` in each object's
    /// namespace), so they are limited by its Roles; a service's own
    /// `serviceAccountName` wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    /// Host: a remote host, reached over SSH: `[user@]host[:port]` or an
    /// alias of the ssh config. None: the machine the agent runs on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh: Option<String>,
}

/// A group of hosts declared once, rolled out ring by ring:
///
/// ```yaml
/// hostGroups:
///   - name: web
///     hosts: [deploy@10.0.0.11, deploy@10.0.0.12, web-3, web-4, web-5]
///     rings: [1, 25%, 100%]   # one host, then a quarter, then the rest
/// ```
///
/// Each host is a target `<group>-<host>`; a service naming the group in
/// its `targets` runs on all of them.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HostGroup {
    pub name: String,
    pub hosts: Vec<GroupHost>,
    /// How many hosts each ring takes, in order: a count or a share of the
    /// group (rounded up); the last ring takes whatever is left, as
    /// Ansible's `serial: [1, "25%", "100%"]` batches. Empty: one ring.
    #[serde(default)]
    pub rings: Vec<Share>,
    /// The group's first ring, to line it up with other targets.
    #[serde(default)]
    pub ring: u32,
}

/// One host of a group: its SSH destination, or that with a name and a
/// ring of its own.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum GroupHost {
    Ssh(String),
    Host {
        ssh: String,
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        ring: Option<u32>,
    },
}

impl GroupHost {
    pub fn ssh(&self) -> &str {
        match self {
            GroupHost::Ssh(s) | GroupHost::Host { ssh: s, .. } => s,
        }
    }

    /// The host's part of its target name: its own name, else the host of
    /// its destination (`deploy@web-3.example:2222` → `web-3-example`).
    pub fn short_name(&self) -> String {
        if let GroupHost::Host { name: Some(n), .. } = self {
            return n.clone();
        }
        let s = self.ssh();
        let host = s.rsplit_once('@').map_or(s, |(_, h)| h);
        let host = match host.rsplit_once(':') {
            Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h,
            _ => host,
        };
        host.trim_matches(['[', ']'])
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect()
    }
}

impl Topology {
    /// Each host group's targets, by group name.
    pub fn group_members(&self) -> BTreeMap<String, Vec<String>> {
        self.host_groups
            .iter()
            .map(|g| {
                (
                    g.name.clone(),
                    g.targets().into_iter().map(|t| t.name).collect(),
                )
            })
            .collect()
    }
}

impl HostGroup {
    /// The targets the group stands for, rings assigned.
    pub fn targets(&self) -> Vec<TargetDef> {
        let n = self.hosts.len();
        let mut rings = Vec::with_capacity(n);
        let mut taken = 0;
        for (i, share) in self.rings.iter().enumerate() {
            let size = if i + 1 == self.rings.len() {
                n - taken
            } else {
                let want = match share {
                    Share::Count(c) => *c as usize,
                    Share::Percent(p) => (n * *p as usize).div_ceil(100),
                };
                want.clamp(1, n - taken)
            };
            rings.extend(std::iter::repeat_n(self.ring + i as u32, size));
            taken += size;
            if taken == n {
                break;
            }
        }
        rings.resize(n, self.ring + self.rings.len().saturating_sub(1) as u32);
        self.hosts
            .iter()
            .zip(rings)
            .map(|(h, ring)| TargetDef {
                name: format!("{}-{}", self.name, h.short_name()),
                kind: TargetKind::Host,
                ring: match h {
                    GroupHost::Host { ring: Some(r), .. } => *r,
                    _ => ring,
                },
                service_account_name: None,
                ssh: Some(h.ssh().to_string()),
            })
            .collect()
    }
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
    /// Kubernetes: the ServiceAccount sluice impersonates to write this
    /// service's objects (`namespace/name`, or `name` in each object's
    /// namespace): a team's service can write only where its Roles allow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
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
    pub max_unavailable: Option<Share>,
    /// Blue-green: how long the old version stays warm after the switch.
    #[serde(default, with = "duration::option")]
    pub keep_warm: Option<Duration>,
    /// The rollout as decided by these fields, `defaults:` and the policy
    /// (filled in by render; never read from the file).
    #[serde(skip)]
    pub rollout: Rollout,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CanaryOverride {
    #[serde(default)]
    pub steps: Option<Vec<CanaryStep>>,
    #[serde(default, with = "duration::option")]
    pub interval: Option<Duration>,
    #[serde(default, with = "duration::option")]
    pub min_age: Option<Duration>,
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
    pub inconclusive: Option<Inconclusive>,
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

/// One canary step: the canary's share of traffic, and how long the step
/// is held and judged (`for`; the canary interval when unset). Written as
/// a number (`10`) or `{weight: 10, for: 30s}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CanaryStep {
    pub weight: u8,
    pub duration: Option<Duration>,
}

impl From<u8> for CanaryStep {
    fn from(weight: u8) -> Self {
        CanaryStep {
            weight,
            duration: None,
        }
    }
}

impl Serialize for CanaryStep {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match self.duration {
            None => s.serialize_u8(self.weight),
            Some(d) => {
                let mut m = s.serialize_map(Some(2))?;
                m.serialize_entry("weight", &self.weight)?;
                m.serialize_entry("for", &duration::format(d))?;
                m.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for CanaryStep {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Long {
            weight: u8,
            #[serde(default, rename = "for", with = "duration::option")]
            duration: Option<Duration>,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Weight(u8),
            Long(Long),
        }
        match Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom("a step is a weight (10) or {weight: 10, for: 30s}")
        })? {
            Raw::Weight(weight) => Ok(weight.into()),
            Raw::Long(l) => Ok(CanaryStep {
                weight: l.weight,
                duration: l.duration,
            }),
        }
    }
}

/// Canary steps.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CanarySettings {
    /// The canary's share of traffic at each step, in percent, rising to 100.
    pub steps: Vec<CanaryStep>,
    /// How long each step without its own `for` is held and judged.
    #[serde(with = "duration")]
    pub interval: Duration,
    /// No step passes before the canary has run this long (failures that
    /// show only after a while: caches filling, a leak, a timer).
    #[serde(default, with = "duration")]
    pub min_age: Duration,
}

impl CanarySettings {
    /// The weights, in order.
    pub fn weights(&self) -> Vec<u8> {
        self.steps.iter().map(|s| s.weight).collect()
    }

    /// How long step `i` is held.
    pub fn duration(&self, i: usize) -> Duration {
        self.steps
            .get(i)
            .and_then(|s| s.duration)
            .unwrap_or(self.interval)
    }

    /// How long the analysis runs at most: every step before the last
    /// (the promotion), each at least until the canary is `min_age` old.
    pub fn planned(&self) -> Duration {
        let mut total = Duration::ZERO;
        for i in 0..self.steps.len().saturating_sub(1) {
            total += self.duration(i);
        }
        total.max(self.min_age)
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
    pub analysis: crate::analysis::Criteria,
    pub inconclusive: Inconclusive,
    #[serde(with = "duration")]
    pub hold_timeout: Duration,
    pub max_unavailable: Share,
    #[serde(with = "duration")]
    pub keep_warm: Duration,
    /// Exits while starting after which a new release fails at once.
    pub crash_restarts: u32,
}

impl Rollout {
    /// How this rollout proceeds, for people: "canary: 10% for 30s → 50%
    /// for 1m → 100%", "rolling, 1 at a time", "blue-green", "recreate".
    pub fn describe(&self) -> String {
        use crate::duration::format;
        match self.strategy {
            Strategy::Rolling => format!("rolling, {} at a time", self.max_unavailable),
            Strategy::Recreate => "recreate: stop, then start".into(),
            Strategy::Bluegreen => "blue-green: start beside, switch all traffic at once".into(),
            Strategy::Canary => {
                let n = self.canary.steps.len();
                let steps: Vec<String> = (0..n)
                    .map(|i| {
                        let w = self.canary.steps[i].weight;
                        if i + 1 == n {
                            format!("{w}%")
                        } else {
                            format!("{w}% for {}", format(self.canary.duration(i)))
                        }
                    })
                    .collect();
                format!("canary: {}", steps.join(" → "))
            }
        }
    }
}

impl Default for Rollout {
    /// The shipped rollout policy's answer for a standard service (the
    /// rollout module's tests keep the two equal); only reached when a
    /// topology is built by hand.
    fn default() -> Self {
        Rollout {
            strategy: Strategy::Rolling,
            criticality: Criticality::Standard,
            soak: Duration::ZERO,
            gate_timeout: Duration::from_secs(300),
            canary: CanarySettings {
                steps: [5, 25, 50, 100].map(CanaryStep::from).to_vec(),
                interval: Duration::from_secs(60),
                min_age: Duration::ZERO,
            },
            analysis: crate::analysis::Criteria {
                max_error_ratio: 1.5,
                error_rate_floor: 0.01,
                min_requests: 50,
                max_p95_increase: 0.1,
                max_p99_increase: 0.15,
                alpha: 0.01,
            },
            inconclusive: Inconclusive::Fail,
            hold_timeout: Duration::from_secs(1800),
            max_unavailable: Share::Percent(25),
            keep_warm: Duration::from_secs(60),
            crash_restarts: 3,
        }
    }
}

pub use crate::duration;

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
