//! The host target: Processes (supervised replicas), Files (atomic writes
//! under a file root), Routes (through the router process) and artifacts
//! (verified by sha256, cached by digest) on the machine the agent runs on.
//!
//! # On-disk layout (under the target's state dir)
//! - `instances/<key>.json`, `<key>.state.json`: one per replica (agent and
//!   shim records); `logs/<key>.log`: its output.
//! - `resources.json`: the body last applied per resource (Files and Routes
//!   are observed against it; Processes record it per instance).
//! - `router.json`: the router's persisted routes; `artifacts/<sha256>`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sluice_core::model::{
    FileSpec, ProcessSpec, RestartPolicy as Policy, RouteSpec, Strategy, TargetKind,
};
use sluice_core::resource::{digest_of, DesiredResource, Health, LiveResource, ResourceId};
use sluice_core::target::{Target, TargetError};
use sluice_router::{AdminClient, Backend, RouteConfig, RouterConfig};
use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::instance::{
    write_json, Instance, LaunchSpec, Probe, Restart, RestartPolicy, Supervisor,
};

/// A Process split between its recorded release and a new one
/// (`splits.json`): the router weights traffic by it. Kept on disk so a
/// restarted agent, and the router, see the same split.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SplitRecord {
    pub canary_digest: String,
    /// Version labels the router reports each release under.
    pub baseline: String,
    pub canary: String,
    /// The canary's percent; none while rolling (every replica equal).
    pub weight: Option<u8>,
    /// The canary instances' restarts when it was staged: any more since
    /// is a crash after it was ready.
    #[serde(default)]
    pub restarts_at_stage: u32,
}

/// The canary's version label: its version, or, when the baseline runs the
/// same version (a config-only change), the version and a digest prefix.
pub(crate) fn distinct_label(baseline: &str, version: &str, digest: &str) -> String {
    if baseline != version {
        return version.to_string();
    }
    let short: String = digest
        .trim_start_matches("sha256:")
        .chars()
        .take(8)
        .collect();
    format!("{version}+{short}")
}

#[derive(Clone, Debug)]
pub struct HostConfig {
    /// Target name from sluice.yaml.
    pub name: String,
    /// This target's private folder.
    pub state_dir: PathBuf,
    /// File resources live under here, and nothing outside.
    pub file_root: PathBuf,
    /// The sluice binary (for `sluice supervise` and `sluice router`).
    pub exe: PathBuf,
    pub port_range: RangeInclusive<u16>,
    /// Searched before PATH for a command without a slash.
    pub extra_path: Vec<PathBuf>,
    /// Where the router's admin API (and its /metrics) listens; None: the
    /// address its last run had, else a free port chosen once.
    pub router_admin: Option<SocketAddr>,
}

pub struct HostTarget {
    pub(crate) cfg: HostConfig,
    pub(crate) sup: Supervisor,
    /// One change at a time on this target (the engine applies serially;
    /// this guards against a concurrent status probe racing a stop).
    pub(crate) lock: Mutex<()>,
    /// Replicas taken out of the routes before they are stopped, so no new
    /// request reaches one that is shutting down.
    draining: std::sync::Mutex<std::collections::BTreeSet<String>>,
    http: reqwest::Client,
}

const ROUTER_KEY: &str = "router";

impl HostTarget {
    pub fn new(cfg: HostConfig) -> Result<Self, TargetError> {
        let unavailable = |e: std::io::Error| TargetError::Unavailable {
            target: cfg.name.clone(),
            reason: e.to_string(),
        };
        std::fs::create_dir_all(&cfg.state_dir).map_err(unavailable)?;
        std::fs::create_dir_all(&cfg.file_root).map_err(unavailable)?;
        std::fs::create_dir_all(cfg.state_dir.join("artifacts")).map_err(unavailable)?;
        let sup = Supervisor::new(&cfg.state_dir, &cfg.exe).map_err(unavailable)?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(800))
            .no_proxy()
            .build()
            .map_err(|e| TargetError::Unavailable {
                target: cfg.name.clone(),
                reason: e.to_string(),
            })?;
        Ok(HostTarget {
            cfg,
            sup,
            lock: Mutex::new(()),
            draining: Default::default(),
            http,
        })
    }

    /// Every replica on record, for `sluice status` and tests.
    pub fn instances(&self) -> Vec<Instance> {
        self.sup.list()
    }

    fn resources_path(&self) -> PathBuf {
        self.cfg.state_dir.join("resources.json")
    }

    /// The body last applied per resource (`Kind/name`).
    ///
    /// An unreadable `resources.json` is never taken for an empty one
    /// (that drops every route and starts duplicates): it is reported,
    /// moved aside, and rebuilt from what runs (see [`Self::rebuild_records`]).
    pub(crate) fn records(&self) -> BTreeMap<String, Value> {
        let path = self.resources_path();
        match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(records) => records,
                Err(e) => {
                    let aside = path.with_extension(format!(
                        "json.unreadable-{}",
                        std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map(|d| d.as_secs())
                            .unwrap_or(0)
                    ));
                    tracing::error!(target = %self.cfg.name, record = %path.display(), reason = %e, moved_to = %aside.display(), "resource records unreadable; rebuilding them from the running processes and the router");
                    let _ = std::fs::rename(&path, &aside);
                    let records = self.rebuild_records();
                    if let Err(e) = write_json(&path, &records) {
                        tracing::error!(target = %self.cfg.name, error = %e, "cannot save the rebuilt resource records");
                    }
                    records
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => {
                tracing::error!(target = %self.cfg.name, record = %path.display(), error = %e, "resource records unreadable; using what runs");
                self.rebuild_records()
            }
        }
    }

    /// Resource records rebuilt from what runs: each Process from its
    /// instances (the release the router serves, not a canary's), each
    /// Route from the router's persisted configuration (its listener and
    /// the Process of its backends). Files cannot be: what is on disk
    /// does not say which resource wrote it; they are recorded again when
    /// next applied, and one removed from the repository meanwhile is not
    /// pruned (its removal fails, visibly, and is retried).
    fn rebuild_records(&self) -> BTreeMap<String, Value> {
        let mut records = BTreeMap::new();
        let instances: Vec<Instance> = self
            .sup
            .list()
            .into_iter()
            .filter(|i| i.spec.key != ROUTER_KEY && (i.alive || i.child_running()))
            .collect();
        let splits = self.splits();
        let mut by_resource: BTreeMap<&str, Vec<&Instance>> = BTreeMap::new();
        for i in &instances {
            by_resource.entry(&i.spec.resource).or_default().push(i);
        }
        for (resource, group) in by_resource {
            let canary = splits.get(resource).map(|s| s.canary_digest.as_str());
            let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
            for i in &group {
                if Some(i.spec.digest.as_str()) != canary {
                    *counts.entry(&i.spec.digest).or_default() += 1;
                }
            }
            let Some((digest, _)) = counts.into_iter().max_by_key(|(_, n)| *n) else {
                continue;
            };
            if let Some(i) = group.iter().find(|i| i.spec.digest == digest) {
                records.insert(format!("Process/{resource}"), i.spec.body.clone());
            }
        }
        let router: Option<RouterConfig> = std::fs::read(self.cfg.state_dir.join("router.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        for (name, route) in router.map(|r| r.routes).unwrap_or_default() {
            let process = route.backends.iter().find_map(|b| {
                instances
                    .iter()
                    .find(|i| i.spec.key == b.id)
                    .map(|i| i.spec.resource.clone())
            });
            if let Some(process) = process {
                records.insert(
                    format!("Route/{name}"),
                    json!({"apiVersion": "sluice.dev/v1", "kind": "Route", "metadata": {"name": name},
                           "spec": {"listen": route.listen.to_string(), "process": process}}),
                );
            }
        }
        tracing::warn!(target = %self.cfg.name, rebuilt = ?records.keys().collect::<Vec<_>>(), "resource records rebuilt from what runs");
        records
    }

    fn save_records(&self, records: &BTreeMap<String, Value>) -> Result<(), TargetError> {
        write_json(&self.resources_path(), records).map_err(|e| TargetError::Apply {
            id: self.cfg.name.clone(),
            reason: format!("recording resources: {e}"),
        })
    }

    pub(crate) fn record_key(id: &ResourceId) -> String {
        format!("{}/{}", id.kind, id.name)
    }

    /// The file a File resource lives at, refusing anything that could
    /// leave the file root (absolute, `..`, a symlinked folder pointing out).
    fn file_path(&self, id: &ResourceId, rel: &str) -> Result<PathBuf, TargetError> {
        let invalid = |reason: String| TargetError::Invalid {
            id: id.to_string(),
            reason,
        };
        let rel_path = Path::new(rel);
        if rel_path
            .components()
            .any(|c| !matches!(c, Component::Normal(_)))
        {
            return Err(invalid(format!(
                "spec.path {rel:?} must stay inside the file root"
            )));
        }
        let full = self.cfg.file_root.join(rel_path);
        let root =
            std::fs::canonicalize(&self.cfg.file_root).map_err(|e| invalid(e.to_string()))?;
        let mut dir = full.parent().map(Path::to_path_buf).unwrap_or_default();
        // Walk up to the deepest existing folder and check it stays inside.
        while !dir.exists() {
            match dir.parent() {
                Some(p) => dir = p.to_path_buf(),
                None => break,
            }
        }
        let real = std::fs::canonicalize(&dir).map_err(|e| invalid(e.to_string()))?;
        if !real.starts_with(&root) {
            return Err(invalid(format!(
                "spec.path {rel:?} leads outside the file root through a symbolic link"
            )));
        }
        if full.is_symlink() {
            return Err(invalid(format!(
                "spec.path {rel:?} is a symbolic link; refused"
            )));
        }
        Ok(full)
    }

    fn resolve_command(&self, id: &ResourceId, command: &str) -> Result<PathBuf, TargetError> {
        if command.contains('/') {
            let p = PathBuf::from(command);
            let p = if p.is_absolute() {
                p
            } else {
                self.cfg.file_root.join(p)
            };
            return Ok(p);
        }
        let path = std::env::var_os("PATH").unwrap_or_default();
        let dirs = self
            .cfg
            .extra_path
            .iter()
            .cloned()
            .chain(std::env::split_paths(&path));
        for d in dirs {
            let c = d.join(command);
            if c.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            {
                return Ok(c);
            }
        }
        Err(TargetError::Invalid {
            id: id.to_string(),
            reason: format!("spec.command {command:?} not found next to sluice or in PATH"),
        })
    }

    fn allocate_port(&self, taken: &mut Vec<u16>) -> Option<u16> {
        let used: Vec<u16> = self
            .sup
            .list()
            .iter()
            .filter(|i| i.alive)
            .map(|i| i.spec.port)
            .collect();
        let span =
            (*self.cfg.port_range.end() as u32 - *self.cfg.port_range.start() as u32 + 1).max(1);
        let seed = std::process::id()
            ^ (std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0));
        for i in 0..span {
            let port = (*self.cfg.port_range.start() as u32 + (seed.wrapping_add(i) % span)) as u16;
            if used.contains(&port) || taken.contains(&port) {
                continue;
            }
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                taken.push(port);
                return Some(port);
            }
        }
        None
    }

    fn artifact_path(&self, sha: &str) -> PathBuf {
        self.cfg
            .state_dir
            .join("artifacts")
            .join(sha.to_ascii_lowercase())
    }

    /// Builds the launch specs of a Process's desired replicas.
    pub(crate) fn launch_specs(
        &self,
        r: &DesiredResource,
        spec: &ProcessSpec,
    ) -> Result<Vec<LaunchSpec>, TargetError> {
        let digest = digest_of(&r.body);
        let short = digest
            .trim_start_matches("sha256:")
            .chars()
            .take(8)
            .collect::<String>();
        let command = self.resolve_command(&r.id, &spec.command)?;
        let cwd = match &spec.working_dir {
            Some(d) => self.file_path(&r.id, d)?,
            None => self.cfg.file_root.clone(),
        };
        std::fs::create_dir_all(&cwd).map_err(|e| TargetError::Apply {
            id: r.id.to_string(),
            reason: format!("working dir: {e}"),
        })?;
        let existing: BTreeMap<String, u16> = self
            .sup
            .list()
            .into_iter()
            .filter(|i| i.alive)
            .map(|i| (i.spec.key, i.spec.port))
            .collect();
        let mut taken = Vec::new();
        let mut out = Vec::new();
        for replica in 0..spec.replicas {
            let key = sanitize(&format!(
                "{}-{}-{}-{}",
                r.id.name, spec.version, short, replica
            ));
            let port = match (spec.port, existing.get(&key)) {
                (_, Some(p)) => *p,
                (Some(p), None) => p,
                (None, None) => {
                    self.allocate_port(&mut taken)
                        .ok_or_else(|| TargetError::Apply {
                            id: r.id.to_string(),
                            reason: "no free port in the configured range".into(),
                        })?
                }
            };
            let subst = |s: &str| {
                let mut s = s
                    .replace("${PORT}", &port.to_string())
                    .replace("${VERSION}", &spec.version)
                    .replace("${REPLICA}", &replica.to_string());
                for a in &spec.artifacts {
                    if let Some(sha) = &a.sha256 {
                        s = s.replace(
                            &format!("${{artifact.{}}}", a.name),
                            &self.artifact_path(sha).display().to_string(),
                        );
                    }
                }
                s
            };
            // Of the agent's environment a service sees only the basics:
            // its tokens and settings never reach services.
            let mut env = crate::inherited_env();
            env.extend(spec.env.iter().map(|(k, v)| (k.clone(), subst(v))));
            env.insert("PORT".into(), port.to_string());
            let command = if spec.command.contains("${") {
                PathBuf::from(subst(&spec.command))
            } else {
                command.clone()
            };
            out.push(LaunchSpec {
                key,
                resource: r.id.name.clone(),
                version: spec.version.clone(),
                replica,
                port,
                command,
                args: spec.args.iter().map(|a| subst(a)).collect(),
                env,
                cwd: cwd.clone(),
                restart: Restart {
                    policy: match spec.restart.policy {
                        Policy::Always => RestartPolicy::Always,
                        Policy::OnFailure => RestartPolicy::OnFailure,
                        Policy::Never => RestartPolicy::Never,
                    },
                    initial_backoff_ms: spec.restart.initial_backoff.as_millis() as u64,
                    max_backoff_ms: spec.restart.max_backoff.as_millis() as u64,
                },
                stop_timeout_ms: spec.stop_timeout.as_millis() as u64,
                body: r.body.clone(),
                digest: digest.clone(),
                readiness: match &spec.readiness {
                    Some(rd) => match &rd.http {
                        Some(p) => Probe::Http(p.clone()),
                        None => Probe::Tcp,
                    },
                    None => Probe::Alive,
                },
            });
        }
        Ok(out)
    }

    async fn ready(&self, i: &Instance) -> bool {
        if !i.alive || !i.child_running() {
            return false;
        }
        match &i.spec.readiness {
            Probe::Alive => true,
            Probe::Tcp => tokio::time::timeout(
                Duration::from_millis(500),
                tokio::net::TcpStream::connect(("127.0.0.1", i.spec.port)),
            )
            .await
            .is_ok_and(|r| r.is_ok()),
            Probe::Http(path) => self
                .http
                .get(format!("http://127.0.0.1:{}{}", i.spec.port, path))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success()),
        }
    }

    async fn apply_process(&self, r: &DesiredResource) -> Result<(), TargetError> {
        let spec: ProcessSpec = spec_of(r)?;
        let wanted = self.launch_specs(r, &spec)?;
        let all = self.sup.list();
        let mine: Vec<Instance> = all
            .into_iter()
            .filter(|i| i.spec.resource == r.id.name)
            .collect();
        let wanted_keys: Vec<&str> = wanted.iter().map(|w| w.key.as_str()).collect();
        let up: Vec<&str> = mine
            .iter()
            .filter(|i| i.alive)
            .map(|i| i.spec.key.as_str())
            .collect();
        let old: Vec<&Instance> = mine
            .iter()
            .filter(|i| !wanted_keys.contains(&i.spec.key.as_str()))
            .collect();
        if wanted_keys.iter().all(|k| up.contains(k)) && old.is_empty() {
            self.clear_split(&r.id.name)?;
            self.record(r)?;
            return Ok(());
        }
        if r.strategy == Strategy::Recreate {
            for i in &old {
                self.sup.stop(i).await;
            }
        }
        let started_at = Instant::now();
        let batch = r
            .max_unavailable
            .map(|s| s.of(spec.replicas as usize))
            .unwrap_or(usize::MAX)
            .max(1);
        let old_live: Vec<&Instance> = old.iter().copied().filter(|i| i.alive).collect();
        if r.strategy == Strategy::Rolling && !old_live.is_empty() && batch < wanted.len() {
            self.roll_in_batches(r, &spec, &wanted, &old_live, batch)
                .await?;
        } else {
            self.start_and_wait(r, &spec, &wanted).await?;
        }
        // A direct apply is a full switch: any traffic split ends here.
        self.clear_split(&r.id.name)?;
        self.record(r)?;
        self.sync_routes().await?;
        for i in &old {
            self.sup.stop(i).await;
        }
        info!(target = %self.cfg.name, resource = %r.id.name, version = %spec.version, ms = started_at.elapsed().as_millis() as u64, "process ready");
        Ok(())
    }

    /// Starts `wanted` (idempotent: running ones stay) and waits until all
    /// are ready. On timeout the new instances that are not the recorded
    /// release are stopped, so the old ones keep serving alone.
    pub(crate) async fn start_and_wait(
        &self,
        r: &DesiredResource,
        spec: &ProcessSpec,
        wanted: &[LaunchSpec],
    ) -> Result<(), TargetError> {
        let wanted_keys: Vec<&str> = wanted.iter().map(|w| w.key.as_str()).collect();
        let started_at = Instant::now();
        for w in wanted {
            self.sup
                .start(w)
                .await
                .map_err(|reason| TargetError::Apply {
                    id: r.id.to_string(),
                    reason,
                })?;
        }
        info!(target = %self.cfg.name, resource = %r.id.name, version = %spec.version, replicas = spec.replicas, "instances started; waiting for readiness");
        let timeout = spec
            .readiness
            .as_ref()
            .map(|r| r.timeout)
            .unwrap_or(Duration::from_secs(5));
        let period = spec
            .readiness
            .as_ref()
            .map(|r| r.period)
            .unwrap_or(Duration::from_millis(200));
        // Without a readiness check, a process must at least stay up a moment.
        if spec.readiness.is_none() {
            tokio::time::sleep(period).await;
        }
        let limit = r.crash_restarts.unwrap_or(3).max(1);
        loop {
            let now: Vec<Instance> = self
                .sup
                .list()
                .into_iter()
                .filter(|i| wanted_keys.contains(&i.spec.key.as_str()))
                .collect();
            // A release that keeps exiting while it starts fails now, not
            // at the readiness timeout.
            let crashing = now.iter().find_map(|i| {
                let s = i.state.as_ref()?;
                (s.restarts >= limit || s.phase == "exited").then(|| {
                    format!(
                        "{} exited {} time(s) while starting (limit {limit}, crashLoop.restarts; last exit: {}); last log lines: {}",
                        i.spec.key,
                        s.restarts.max(1),
                        s.last_exit.as_deref().unwrap_or("unknown"),
                        tail(&self.sup.log_path(&i.spec.key), 3)
                    )
                })
            });
            if let Some(detail) = crashing {
                return Err(self.abandon_start(r, &wanted_keys, detail).await);
            }
            let mut all_ready = now.len() == wanted.len();
            let mut not_ready = None;
            for i in &now {
                if !self.ready(i).await {
                    all_ready = false;
                    not_ready = Some(i.clone());
                    break;
                }
            }
            if all_ready {
                return Ok(());
            }
            if started_at.elapsed() >= timeout {
                let detail = match &not_ready {
                    Some(i) => {
                        let state = i.state.clone().unwrap_or_default();
                        format!(
                            "{} not ready after {}s ({}; restarts {}, last exit {}); last log lines: {}",
                            i.spec.key,
                            timeout.as_secs(),
                            match &i.spec.readiness {
                                Probe::Http(p) => format!("GET {p} on port {} did not answer 2xx", i.spec.port),
                                Probe::Tcp => format!("port {} refused connections", i.spec.port),
                                Probe::Alive => "process not running".into(),
                            },
                            state.restarts,
                            state.last_exit.as_deref().unwrap_or("none"),
                            tail(&self.sup.log_path(&i.spec.key), 3)
                        )
                    }
                    None => "an instance disappeared while starting".into(),
                };
                return Err(self.abandon_start(r, &wanted_keys, detail).await);
            }
            tokio::time::sleep(period).await;
        }
    }

    /// Stops the new instances that did not start (not the recorded
    /// release), so the old ones keep serving alone, and says why.
    async fn abandon_start(
        &self,
        r: &DesiredResource,
        wanted_keys: &[&str],
        detail: String,
    ) -> TargetError {
        let active = self.records().get(&Self::record_key(&r.id)).map(digest_of);
        for i in self
            .sup
            .list()
            .into_iter()
            .filter(|i| wanted_keys.contains(&i.spec.key.as_str()))
        {
            if active.as_ref() != Some(&i.spec.digest) {
                self.sup.stop(&i).await;
            }
        }
        TargetError::Apply {
            id: r.id.to_string(),
            reason: detail,
        }
    }

    /// The canary instances of `split` that exited since they started:
    /// what happened to the first, if any did.
    pub(crate) fn canary_restarts(&self, resource: &str, canary_digest: &str) -> u32 {
        self.sup
            .list()
            .iter()
            .filter(|i| i.spec.resource == resource && i.spec.digest == canary_digest)
            .filter_map(|i| i.state.as_ref().map(|s| s.restarts))
            .sum()
    }

    /// The canary instances of a split that exited since it was staged
    /// (`before` restarts then): what happened to the first, if any did.
    pub(crate) fn canary_crash(
        &self,
        resource: &str,
        canary_digest: &str,
        before: u32,
    ) -> Option<String> {
        if self.canary_restarts(resource, canary_digest) <= before
            && !self.sup.list().iter().any(|i| {
                i.spec.resource == resource
                    && i.spec.digest == canary_digest
                    && i.state.as_ref().is_some_and(|s| s.phase == "exited")
            })
        {
            return None;
        }
        self.sup
            .list()
            .into_iter()
            .filter(|i| i.spec.resource == resource && i.spec.digest == canary_digest)
            .find_map(|i| {
                let s = i.state.as_ref()?;
                (s.restarts > 0 || s.phase == "exited").then(|| {
                    format!(
                        "{} exited after it was ready ({} restart(s); last exit: {}); last log lines: {}",
                        i.spec.key,
                        s.restarts,
                        s.last_exit.as_deref().unwrap_or("unknown"),
                        tail(&self.sup.log_path(&i.spec.key), 3)
                    )
                })
            })
    }

    /// Rolling: `batch` new replicas start and become ready, the routes
    /// send traffic to every ready replica of both releases, then `batch`
    /// old ones stop; so at most `batch` replicas are ever being replaced
    /// and serving capacity never drops. A failure leaves the old release
    /// serving (the engine then reverts, which restarts what was stopped).
    async fn roll_in_batches(
        &self,
        r: &DesiredResource,
        spec: &ProcessSpec,
        wanted: &[LaunchSpec],
        old: &[&Instance],
        batch: usize,
    ) -> Result<(), TargetError> {
        let digest = digest_of(&r.body);
        let baseline = old
            .first()
            .map(|i| i.spec.version.clone())
            .unwrap_or_default();
        let canary = distinct_label(&baseline, &spec.version, &digest);
        self.save_split(
            &r.id.name,
            Some(SplitRecord {
                canary_digest: digest,
                baseline,
                canary,
                weight: None,
                restarts_at_stage: 0,
            }),
        )?;
        let mut old = old.iter();
        for (n, chunk) in wanted.chunks(batch).enumerate() {
            if let Err(e) = self.start_and_wait(r, spec, chunk).await {
                self.clear_split(&r.id.name)?;
                self.sync_routes().await?;
                return Err(e);
            }
            let leaving: Vec<&Instance> = old.by_ref().take(chunk.len()).copied().collect();
            self.drain(&leaving).await?;
            info!(target = %self.cfg.name, resource = %r.id.name, batch = n + 1, replaced = chunk.len(), "rolling batch ready");
        }
        Ok(())
    }

    /// Takes `instances` out of every route, then stops them: requests in
    /// flight finish (graceful stop), new ones go elsewhere.
    pub(crate) async fn drain(&self, instances: &[&Instance]) -> Result<(), TargetError> {
        let keys: Vec<String> = instances.iter().map(|i| i.spec.key.clone()).collect();
        self.draining
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(keys.iter().cloned());
        let routed = self.sync_routes().await;
        for i in instances {
            self.sup.stop(i).await;
        }
        let mut draining = self.draining.lock().unwrap_or_else(|e| e.into_inner());
        for k in &keys {
            draining.remove(k);
        }
        routed
    }

    fn splits_path(&self) -> PathBuf {
        self.cfg.state_dir.join("splits.json")
    }

    pub(crate) fn splits(&self) -> BTreeMap<String, SplitRecord> {
        std::fs::read(self.splits_path())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    pub(crate) fn save_split(
        &self,
        process: &str,
        split: Option<SplitRecord>,
    ) -> Result<(), TargetError> {
        let mut all = self.splits();
        let changed = match split {
            Some(s) => all.insert(process.to_string(), s.clone()) != Some(s),
            None => all.remove(process).is_some(),
        };
        if !changed {
            return Ok(());
        }
        write_json(&self.splits_path(), &all).map_err(|e| TargetError::Apply {
            id: format!("{}/Process/{process}", self.cfg.name),
            reason: format!("recording the traffic split: {e}"),
        })
    }

    pub(crate) fn clear_split(&self, process: &str) -> Result<(), TargetError> {
        self.save_split(process, None)
    }

    pub(crate) fn record(&self, r: &DesiredResource) -> Result<(), TargetError> {
        let mut records = self.records();
        records.insert(Self::record_key(&r.id), r.body.clone());
        self.save_records(&records)
    }

    fn forget(&self, id: &ResourceId) -> Result<(), TargetError> {
        let mut records = self.records();
        if records.remove(&Self::record_key(id)).is_some() {
            self.save_records(&records)?;
        }
        Ok(())
    }

    /// The router's admin address, starting the router if it is not up.
    /// The admin client of this target's router, if it runs. The router
    /// binds an ephemeral port itself and writes it to `router.addr`, so no
    /// other process can take its port between choosing and binding.
    pub(crate) fn router_client(&self) -> Option<AdminClient> {
        self.sup
            .list()
            .into_iter()
            .find(|i| i.spec.key == ROUTER_KEY && i.alive)?;
        let text = std::fs::read_to_string(self.cfg.state_dir.join("router.addr")).ok()?;
        text.trim().parse::<SocketAddr>().ok().map(AdminClient::new)
    }

    /// The router's admin client, starting the router if it is not up.
    async fn router(&self) -> Result<AdminClient, TargetError> {
        let err = |reason: String| TargetError::Apply {
            id: format!("{}/router", self.cfg.name),
            reason,
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        let running = self
            .sup
            .list()
            .into_iter()
            .any(|i| i.spec.key == ROUTER_KEY && i.alive);
        if running {
            while Instant::now() < deadline {
                if let Some(client) = self.router_client() {
                    if client.healthy().await {
                        return Ok(client);
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            return Err(err(
                "the router runs but its admin API does not answer".into()
            ));
        }
        let config = self.cfg.state_dir.join("router.json");
        let addr_file = self.cfg.state_dir.join("router.addr");
        // A stable admin address (Prometheus scrapes it): the configured
        // one, else the one the last router had (its port kept across
        // restarts), else a free port once.
        let admin = self
            .cfg
            .router_admin
            .map(|a| a.to_string())
            .or_else(|| {
                std::fs::read_to_string(&addr_file)
                    .ok()
                    .map(|t| t.trim().to_string())
                    .filter(|t| t.parse::<SocketAddr>().is_ok())
            })
            .unwrap_or_else(|| "127.0.0.1:0".into());
        let _ = std::fs::remove_file(&addr_file);
        let spec = LaunchSpec {
            key: ROUTER_KEY.into(),
            resource: String::new(),
            version: env!("CARGO_PKG_VERSION").into(),
            replica: 0,
            port: 0,
            command: self.cfg.exe.clone(),
            args: vec![
                "router".into(),
                "--admin".into(),
                admin,
                "--addr-file".into(),
                addr_file.display().to_string(),
                "--config".into(),
                config.display().to_string(),
            ],
            env: crate::inherited_env()
                .into_iter()
                .chain(
                    std::env::vars().filter(|(k, _)| k == "SLUICE_LOG" || k == "SLUICE_LOG_FORMAT"),
                )
                .collect(),
            cwd: self.cfg.state_dir.clone(),
            restart: Restart {
                policy: RestartPolicy::Always,
                initial_backoff_ms: 100,
                max_backoff_ms: 5000,
            },
            stop_timeout_ms: 5000,
            body: Value::Null,
            digest: String::new(),
            readiness: Probe::Alive,
        };
        self.sup.start(&spec).await.map_err(err)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(client) = self.router_client() {
                if client.healthy().await {
                    info!(target = %self.cfg.name, "router started");
                    return Ok(client);
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(err("the router did not come up within 10s".into()))
    }

    /// Points every Route at the current replicas of its Process: those
    /// running the body last recorded for that Process.
    pub(crate) async fn sync_routes(&self) -> Result<(), TargetError> {
        let records = self.records();
        let routes: Vec<(String, RouteSpec)> = records
            .iter()
            .filter(|(k, _)| k.starts_with("Route/"))
            .filter_map(|(k, v)| {
                Some((
                    k.trim_start_matches("Route/").to_string(),
                    serde_json::from_value(v.get("spec")?.clone()).ok()?,
                ))
            })
            .collect();
        if routes.is_empty() {
            return Ok(());
        }
        let draining = self
            .draining
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let instances: Vec<Instance> = self
            .sup
            .list()
            .into_iter()
            .filter(|i| !draining.contains(&i.spec.key))
            .collect();
        let splits = self.splits();
        let mut cfg = RouterConfig::default();
        for (name, spec) in routes {
            let active = records
                .get(&format!("Process/{}", spec.process))
                .map(digest_of);
            let split = splits.get(&spec.process);
            let live = |digest: Option<&String>| -> Vec<&Instance> {
                instances
                    .iter()
                    // A process whose supervisor died still serves: it
                    // stays routed (dropping it would be an outage).
                    .filter(|i| {
                        (i.alive || i.child_running())
                            && i.spec.resource == spec.process
                            && Some(&i.spec.digest) == digest
                    })
                    .collect()
            };
            let baseline = live(active.as_ref());
            let canary = split
                .map(|s| live(Some(&s.canary_digest)))
                .unwrap_or_default();
            // Per-backend weights so that each release's share is what the
            // split says whatever its replica count; rolling (no weight)
            // spreads evenly over every ready replica.
            let (wb, wc) = match split.and_then(|s| s.weight) {
                _ if canary.is_empty() => (1, 0),
                _ if baseline.is_empty() => (0, 1),
                Some(w) => (
                    (100 - w.min(100) as u32) * canary.len() as u32,
                    w.min(100) as u32 * baseline.len() as u32,
                ),
                None => (1, 1),
            };
            let backend = |i: &Instance, label: Option<&String>, weight: u32| Backend {
                id: i.spec.key.clone(),
                version: label.cloned().unwrap_or_else(|| i.spec.version.clone()),
                addr: SocketAddr::from(([127, 0, 0, 1], i.spec.port)),
                weight,
            };
            let backends = baseline
                .iter()
                .map(|i| backend(i, split.map(|s| &s.baseline), wb))
                .chain(
                    canary
                        .iter()
                        .map(|i| backend(i, split.map(|s| &s.canary), wc)),
                )
                .collect();
            let listen = spec.listen.parse().map_err(|_| TargetError::Invalid {
                id: format!("{}/Route/{name}", self.cfg.name),
                reason: "spec.listen is not an address".into(),
            })?;
            cfg.routes.insert(name, RouteConfig { listen, backends });
        }
        let router = self.router().await?;
        router.put(&cfg).await.map_err(|e| TargetError::Apply {
            id: format!("{}/router", self.cfg.name),
            reason: e.to_string(),
        })
    }

    async fn observe_one(
        &self,
        id: &ResourceId,
        records: &BTreeMap<String, Value>,
        splits: &BTreeMap<String, SplitRecord>,
        instances: &[Instance],
        routes: &Option<RouterConfig>,
    ) -> Option<LiveResource> {
        match id.kind.as_str() {
            "Process" => {
                let mine: Vec<&Instance> = instances
                    .iter()
                    .filter(|i| (i.alive || i.child_running()) && i.spec.resource == id.name)
                    .collect();
                if mine.is_empty() {
                    return None;
                }
                let active = records.get(&Self::record_key(id)).map(digest_of);
                let current: Vec<&Instance> = match &active {
                    Some(d) if mine.iter().any(|i| &i.spec.digest == d) => mine
                        .iter()
                        .copied()
                        .filter(|i| &i.spec.digest == d)
                        .collect(),
                    _ => mine.clone(),
                };
                let mut body = current[0].spec.body.clone();
                // Replicas of another release (left by a crash mid-rollout)
                // are a difference the plan must show and the apply remove.
                // A release being rolled out beside it (a split) is not stray.
                let splitting = splits.get(&id.name).map(|s| s.canary_digest.clone());
                let stray: Vec<&str> = mine
                    .iter()
                    .filter(|i| !current.iter().any(|c| c.spec.key == i.spec.key))
                    .filter(|i| Some(&i.spec.digest) != splitting.as_ref())
                    .map(|i| i.spec.key.as_str())
                    .collect();
                if !stray.is_empty() {
                    body["status"] = json!({ "strayInstances": stray });
                }
                // What actually runs, from /proc: arguments changed or the
                // executable replaced on disk under a running process are
                // drift in what the Process runs.
                for i in &current {
                    let Some(pid) = i
                        .state
                        .as_ref()
                        .and_then(|s| s.child_pid)
                        .filter(|_| i.child_running())
                    else {
                        continue;
                    };
                    // A process that rewrote its title (nginx, postgres)
                    // no longer shows its arguments: compare only when
                    // argv[0] is still the command started.
                    if let Some((argv0, args)) = running_args(pid) {
                        let name = i
                            .spec
                            .command
                            .file_name()
                            .map(|n| n.to_string_lossy().to_string())
                            .unwrap_or_default();
                        let same_program =
                            argv0 == i.spec.command.to_string_lossy() || argv0 == name;
                        if same_program && args != i.spec.args {
                            body["spec"]["args"] = json!(args);
                        }
                    }
                    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
                    if exe.to_string_lossy().ends_with(" (deleted)")
                        && exe
                            .to_string_lossy()
                            .starts_with(&*i.spec.command.to_string_lossy())
                    {
                        body["spec"]["command"] = json!(format!(
                            "{} (replaced on disk while running)",
                            body["spec"]["command"].as_str().unwrap_or("")
                        ));
                    }
                }
                let want: u32 = body["spec"]["replicas"].as_u64().unwrap_or(1) as u32;
                let mut ready = 0;
                for i in &current {
                    if self.ready(i).await {
                        ready += 1;
                    }
                }
                let restarts: u32 = current
                    .iter()
                    .filter_map(|i| i.state.as_ref())
                    .map(|s| s.restarts)
                    .sum();
                let crashing = current.iter().any(|i| {
                    i.state
                        .as_ref()
                        .is_some_and(|s| s.phase == "backoff" || s.phase == "exited")
                });
                // Running without its supervisor (killed by hand): it serves
                // and stays routed, but nothing restarts it if it exits.
                let unsupervised: Vec<&str> = current
                    .iter()
                    .filter(|i| !i.alive)
                    .map(|i| i.spec.key.as_str())
                    .collect();
                let health = if !unsupervised.is_empty() {
                    Health::Degraded
                } else if ready >= want && current.len() as u32 >= want {
                    Health::Healthy
                } else if crashing || restarts > 0 {
                    Health::Degraded
                } else {
                    Health::Progressing
                };
                // Replicas gone (process and supervisor killed by hand, a
                // reboot) are a difference, not just poor health: drift
                // reports them missing, a plan or a heal starts them again.
                if (current.len() as u32) < want {
                    body["spec"]["replicas"] = json!(current.len());
                }
                Some(LiveResource {
                    id: id.clone(),
                    body,
                    health,
                    managed: None,
                    message: Some(if unsupervised.is_empty() {
                        format!(
                            "{ready}/{want} ready, version {}, restarts {restarts}",
                            current[0].spec.version
                        )
                    } else {
                        format!(
                            "{ready}/{want} ready, version {}; the supervisor of {} is gone (the process still runs and is routed, but would not be restarted)",
                            current[0].spec.version,
                            unsupervised.join(", ")
                        )
                    }),
                })
            }
            "File" => {
                let recorded = records.get(&Self::record_key(id))?;
                let spec: FileSpec = serde_json::from_value(recorded.get("spec")?.clone()).ok()?;
                let path = self.file_path(id, &spec.path).ok()?;
                let meta = std::fs::symlink_metadata(&path).ok()?;
                let content = std::fs::read(&path).ok()?;
                let mut body = recorded.clone();
                body["spec"]["content"] = json!(String::from_utf8_lossy(&content));
                body["spec"]["mode"] = json!(format!("{:04o}", meta.permissions().mode() & 0o7777));
                Some(LiveResource {
                    id: id.clone(),
                    body,
                    health: Health::Healthy,
                    managed: None,
                    message: None,
                })
            }
            "Route" => {
                let recorded = records.get(&Self::record_key(id))?;
                let (health, message) = match routes {
                    None => (Health::Degraded, "router not answering".to_string()),
                    Some(cfg) => match cfg.routes.get(&id.name) {
                        Some(r) if r.backends.iter().any(|b| b.weight > 0) => (
                            Health::Healthy,
                            format!(
                                "{} → {} backend(s); router metrics at http://{}/metrics",
                                r.listen,
                                r.backends.len(),
                                std::fs::read_to_string(self.cfg.state_dir.join("router.addr"))
                                    .unwrap_or_default()
                                    .trim()
                            ),
                        ),
                        Some(_) => (Health::Degraded, "no backend".into()),
                        None => (Health::Missing, "not configured in the router".into()),
                    },
                };
                Some(LiveResource {
                    id: id.clone(),
                    body: recorded.clone(),
                    health,
                    managed: None,
                    message: Some(message),
                })
            }
            _ => None,
        }
    }
}

#[async_trait::async_trait]
impl Target for HostTarget {
    fn name(&self) -> &str {
        &self.cfg.name
    }

    fn kind(&self) -> TargetKind {
        TargetKind::Host
    }

    async fn observe(
        &self,
        ids: &[ResourceId],
    ) -> Result<BTreeMap<ResourceId, LiveResource>, TargetError> {
        let records = self.records();
        let splits = self.splits();
        let instances = self.sup.list();
        let routes = if ids.iter().any(|i| i.kind == "Route") {
            match self.router_client() {
                Some(client) => client.get().await.ok(),
                None => None,
            }
        } else {
            None
        };
        let mut out = BTreeMap::new();
        for id in ids {
            if id.target != self.cfg.name {
                continue;
            }
            if let Some(l) = self
                .observe_one(id, &records, &splits, &instances, &routes)
                .await
            {
                out.insert(id.clone(), l);
            }
        }
        Ok(out)
    }

    async fn prepare(&self, resources: &[&DesiredResource]) -> Result<(), TargetError> {
        for r in resources.iter().filter(|r| r.id.kind == "Process") {
            let spec: ProcessSpec = spec_of(r)?;
            for a in &spec.artifacts {
                let perr = |reason: String| TargetError::Prepare {
                    id: format!("{} artifact {}", r.id, a.name),
                    reason,
                };
                let Some(sha) = a.sha256.as_deref() else {
                    return Err(perr(
                        "a download needs its sha256 digest: the host target never runs unpinned content; nothing applied"
                            .into(),
                    ));
                };
                let dest = self.artifact_path(sha);
                if dest.exists() {
                    continue;
                }
                let mode = if a.executable { 0o755 } else { 0o644 };
                if let Some(b) = r.blobs.get(&sha.to_ascii_lowercase()) {
                    // Repository files were verified by render.
                    sluice_core::store::write_file_atomic(&dest, b, Some(mode))
                        .map_err(|e| perr(e.to_string()))?;
                } else if let Some(url) = &a.url {
                    // Streamed to a temp file while hashing; only a verified
                    // file is renamed into the cache.
                    let part = dest.with_extension(format!("part{}", std::process::id()));
                    let result = download(url, &part).await;
                    let verified = match result {
                        Ok(actual) if actual.eq_ignore_ascii_case(sha) => Ok(()),
                        Ok(actual) => Err(format!(
                            "sha256 mismatch: expected {sha}, downloaded content has {actual}; nothing applied"
                        )),
                        Err(e) => Err(e),
                    };
                    let placed = verified.and_then(|()| {
                        std::fs::set_permissions(&part, std::fs::Permissions::from_mode(mode))
                            .and_then(|()| std::fs::rename(&part, &dest))
                            .map_err(|e| e.to_string())
                    });
                    if let Err(e) = placed {
                        let _ = std::fs::remove_file(&part);
                        return Err(perr(e));
                    }
                } else {
                    return Err(perr("no content (neither url nor repository path)".into()));
                }
                info!(target = %self.cfg.name, artifact = %a.name, sha256 = %sha, "artifact cached");
            }
        }
        Ok(())
    }

    async fn apply(&self, r: &DesiredResource) -> Result<(), TargetError> {
        let _guard = self.lock.lock().await;
        match r.id.kind.as_str() {
            "Process" => self.apply_process(r).await,
            "File" => {
                let spec: FileSpec = spec_of(r)?;
                let path = self.file_path(&r.id, &spec.path)?;
                let content = spec.content.unwrap_or_default();
                let mode =
                    u32::from_str_radix(spec.mode.trim_start_matches("0o"), 8).unwrap_or(0o644);
                let same = std::fs::read(&path).is_ok_and(|c| c == content.as_bytes())
                    && std::fs::metadata(&path)
                        .is_ok_and(|m| m.permissions().mode() & 0o7777 == mode);
                if !same {
                    sluice_core::store::write_file_atomic(&path, content.as_bytes(), Some(mode))
                        .map_err(|e| TargetError::Apply {
                            id: r.id.to_string(),
                            reason: format!("writing {}: {e}", spec.path),
                        })?;
                    info!(target = %self.cfg.name, file = %spec.path, "file written");
                }
                self.record(r)
            }
            "Route" => {
                let _spec: RouteSpec = spec_of(r)?;
                self.record(r)?;
                self.sync_routes().await
            }
            other => Err(TargetError::Invalid {
                id: r.id.to_string(),
                reason: format!("kind {other} is not a host resource"),
            }),
        }
    }

    /// What this target's own records and running instances say sluice
    /// applied here (the records rebuilt from what runs if they were
    /// lost). The service is not recorded on a host: "".
    async fn marked(
        &self,
        _scope: &[ResourceId],
    ) -> Result<Option<Vec<(ResourceId, String)>>, TargetError> {
        let mut out: BTreeMap<ResourceId, String> = BTreeMap::new();
        for key in self.records().keys() {
            if let Some((kind, name)) = key.split_once('/') {
                out.insert(ResourceId::new(&self.cfg.name, kind, name), String::new());
            }
        }
        for i in self
            .sup
            .list()
            .into_iter()
            .filter(|i| i.spec.key != ROUTER_KEY)
        {
            out.insert(
                ResourceId::new(&self.cfg.name, "Process", &i.spec.resource),
                String::new(),
            );
        }
        Ok(Some(out.into_iter().collect()))
    }

    fn traffic(&self) -> Option<&dyn sluice_core::traffic::Traffic> {
        Some(self)
    }

    async fn maintain(&self) -> Result<Vec<String>, TargetError> {
        let _guard = self.lock.lock().await;
        let mut adopted = Vec::new();
        for i in self.sup.list() {
            if !i.alive && i.child_running() {
                self.sup
                    .adopt(&i)
                    .await
                    .map_err(|reason| TargetError::Apply {
                        id: i.spec.key.clone(),
                        reason,
                    })?;
                adopted.push(i.spec.key.clone());
            }
        }
        Ok(adopted)
    }

    async fn delete(&self, id: &ResourceId) -> Result<(), TargetError> {
        let _guard = self.lock.lock().await;
        match id.kind.as_str() {
            "Process" => {
                for i in self
                    .sup
                    .list()
                    .into_iter()
                    .filter(|i| i.spec.resource == id.name)
                {
                    self.sup.stop(&i).await;
                }
                self.clear_split(&id.name)?;
                self.forget(id)?;
                self.sync_routes().await.or_else(|e| {
                    warn!(error = %e, "could not update the router after a delete");
                    Ok(())
                })
            }
            "File" => {
                let records = self.records();
                let Some(body) = records.get(&Self::record_key(id)) else {
                    warn!(target = %self.cfg.name, resource = %id, "no record of where this File was written (the resource records were lost): left on disk and released from the inventory");
                    return Ok(());
                };
                {
                    if let Some(rel) = body["spec"]["path"].as_str() {
                        let path = self.file_path(id, rel)?;
                        match std::fs::remove_file(&path) {
                            Ok(()) => {}
                            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                            Err(e) => {
                                return Err(TargetError::Delete {
                                    id: id.to_string(),
                                    reason: e.to_string(),
                                })
                            }
                        }
                    }
                }
                self.forget(id)
            }
            "Route" => {
                self.forget(id)?;
                let routes_left = self.records().keys().any(|k| k.starts_with("Route/"));
                if routes_left {
                    self.sync_routes().await
                } else {
                    // No routes left: the router stops too (the next Route
                    // starts it again), so nothing of sluice's keeps running.
                    for i in self
                        .sup
                        .list()
                        .into_iter()
                        .filter(|i| i.spec.key == ROUTER_KEY)
                    {
                        self.sup.stop(&i).await;
                    }
                    for f in ["router.addr", "router.json"] {
                        let _ = std::fs::remove_file(self.cfg.state_dir.join(f));
                    }
                    Ok(())
                }
            }
            _ => Ok(()),
        }
    }
}

pub(crate) fn spec_of<T: serde::de::DeserializeOwned>(
    r: &DesiredResource,
) -> Result<T, TargetError> {
    serde_json::from_value(r.body.get("spec").cloned().unwrap_or(Value::Null)).map_err(|e| {
        TargetError::Invalid {
            id: r.id.to_string(),
            reason: format!("spec: {e}"),
        }
    })
}

/// Downloads an artifact (https, file://, or http to loopback) into
/// `part`, fsynced, capped at 1 GiB, and returns its sha256 (hex).
async fn download(url: &str, part: &Path) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const MAX: u64 = 1 << 30;
    let mut hasher = Sha256::new();
    let mut out = tokio::fs::File::create(part)
        .await
        .map_err(|e| format!("creating {}: {e}", part.display()))?;
    let mut total = 0u64;
    let mut add = |chunk: &[u8], total: &mut u64| {
        *total += chunk.len() as u64;
        hasher.update(chunk);
        if *total > MAX {
            Err("artifact larger than 1 GiB".to_string())
        } else {
            Ok(())
        }
    };
    if let Some(path) = url.strip_prefix("file://") {
        let mut f = tokio::fs::File::open(path)
            .await
            .map_err(|e| format!("reading {path}: {e}"))?;
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = f
                .read(&mut buf)
                .await
                .map_err(|e| format!("reading {path}: {e}"))?;
            if n == 0 {
                break;
            }
            add(&buf[..n], &mut total)?;
            out.write_all(&buf[..n]).await.map_err(|e| e.to_string())?;
        }
    } else {
        let loopback = url.starts_with("http://127.0.0.1") || url.starts_with("http://localhost");
        if !url.starts_with("https://") && !loopback {
            return Err("only https:// (or file://) artifact URLs are allowed".into());
        }
        // The probe client's short timeout does not suit downloads.
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(300))
            .build()
            .map_err(|e| e.to_string())?;
        let mut resp = client
            .get(url)
            .send()
            .await
            .map_err(|e| e.without_url().to_string())?;
        if !resp.status().is_success() {
            return Err(format!("download answered {}", resp.status()));
        }
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| e.without_url().to_string())?
        {
            add(&chunk, &mut total)?;
            out.write_all(&chunk).await.map_err(|e| e.to_string())?;
        }
    }
    out.sync_all().await.map_err(|e| e.to_string())?;
    Ok(hex::encode(hasher.finalize()))
}

/// argv[0] and the arguments a process runs with.
fn running_args(pid: u32) -> Option<(String, Vec<String>)> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let mut args: Vec<String> = raw
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).to_string())
        .collect();
    if args.last().is_some_and(String::is_empty) {
        args.pop();
    }
    if args.is_empty() {
        return None;
    }
    let rest = args.split_off(1);
    Some((args.remove(0), rest))
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = text.lines().rev().take(lines).collect();
    v.into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join(" | ")
        .chars()
        .take(400)
        .collect()
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}
