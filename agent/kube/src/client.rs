//! The thin layer over the `kube` crate: discovery, GET, LIST, server-side
//! apply and DELETE of dynamic objects as JSON, with client-side rate
//! limiting and retries. Everything Kubernetes-specific that is not an API
//! call (health, inventory, canaries) lives above it and is tested against
//! the fake API server.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kube::api::{
    Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, WatchEvent, WatchParams,
};
use kube::core::ApiResource;
use kube::Client;
use serde_json::Value;
use tokio::sync::Mutex;
use tracing::{debug, warn};

/// The field manager sluice applies with.
pub const FIELD_MANAGER: &str = "sluice";

/// Attempts per call on 429, 5xx, optimistic-concurrency conflicts and
/// transport errors, with exponential backoff from [`BACKOFF`].
const ATTEMPTS: u32 = 5;
const BACKOFF: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// The API server answered with a `Status`.
    #[error("{message}")]
    Api {
        code: u16,
        reason: String,
        message: String,
        /// (field, message) per cause: conflicts name the field and the
        /// other manager, validation errors the field.
        causes: Vec<(String, String)>,
    },
    #[error("{0}")]
    Transport(String),
    #[error("kubeconfig: {0}")]
    Config(String),
}

impl KubeError {
    pub fn code(&self) -> Option<u16> {
        match self {
            KubeError::Api { code, .. } => Some(*code),
            _ => None,
        }
    }

    fn transient(&self) -> bool {
        match self {
            KubeError::Transport(_) => true,
            KubeError::Api {
                code,
                reason,
                message,
                causes,
            } => {
                // Optimistic-concurrency conflicts (409 without field
                // causes) need a fresh read: the caller retries those.
                let _ = (reason, causes);
                *code == 429
                    || (*code >= 500 && !message.contains("failed to create typed patch object"))
            }
            KubeError::Config(_) => false,
        }
    }
}

impl From<kube::Error> for KubeError {
    fn from(e: kube::Error) -> Self {
        match e {
            kube::Error::Api(s) => KubeError::Api {
                code: s.code,
                reason: s.reason.clone(),
                message: s.message.clone(),
                causes: s
                    .details
                    .as_ref()
                    .map(|d| {
                        d.causes
                            .iter()
                            .map(|c| (c.field.clone(), c.message.clone()))
                            .collect()
                    })
                    .unwrap_or_default(),
            },
            other => KubeError::Transport(other.to_string()),
        }
    }
}

/// Objects per LIST page (client-go's pager uses 500 too).
const PAGE: u32 = 500;

/// How a watch ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Watched {
    /// A watched object was added, changed or deleted.
    Changed,
    /// Nothing happened to the watched objects until the time was up.
    Quiet,
    /// The starting version was too old (410 inside the stream).
    Expired,
}

/// A kind as the API server serves it.
#[derive(Clone, Debug)]
pub struct Kind {
    pub resource: ApiResource,
    pub namespaced: bool,
}

/// Requests a second to each cluster, on average and at once, unless set
/// (`--kube-qps`, `--kube-burst`).
pub const DEFAULT_QPS: f64 = 50.0;
pub const DEFAULT_BURST: u32 = 100;

/// A token bucket: at most `qps` calls a second on average, `burst` at once.
struct Limiter {
    qps: f64,
    burst: f64,
    state: Mutex<(f64, tokio::time::Instant)>,
}

impl Limiter {
    fn new(qps: f64, burst: f64) -> Self {
        Limiter {
            qps,
            burst,
            state: Mutex::new((burst, tokio::time::Instant::now())),
        }
    }

    async fn take(&self) {
        let wait = {
            let mut s = self.state.lock().await;
            let now = tokio::time::Instant::now();
            let refill = now.duration_since(s.1).as_secs_f64() * self.qps;
            s.0 = (s.0 + refill).min(self.burst);
            s.1 = now;
            s.0 -= 1.0;
            (s.0 < 0.0).then(|| Duration::from_secs_f64(-s.0 / self.qps))
        };
        if let Some(w) = wait {
            tokio::time::sleep(w).await;
        }
    }
}

/// One cluster's API.
pub struct Cluster {
    client: Client,
    /// For logs: the server URL.
    pub server: String,
    /// `group/version` → kinds served there; filled on demand.
    kinds: Mutex<HashMap<String, Vec<Kind>>>,
    /// group → preferred version; refreshed when a kind is not found.
    preferred: Mutex<Option<HashMap<String, String>>>,
    /// Shared with the clients that impersonate: one budget per cluster.
    limiter: Arc<Limiter>,
    /// How the client was made, for clients that impersonate.
    config: kube::Config,
}

impl Cluster {
    /// Connects with `kubeconfig` (else `$KUBECONFIG`, `~/.kube/config`,
    /// or the in-cluster service account) and `context` (else the current
    /// one).
    pub async fn connect(
        kubeconfig: Option<&Path>,
        context: Option<&str>,
    ) -> Result<Cluster, KubeError> {
        let options = kube::config::KubeConfigOptions {
            context: context.map(str::to_string),
            ..Default::default()
        };
        let config = match kubeconfig {
            Some(path) => {
                let kc = kube::config::Kubeconfig::read_from(path)
                    .map_err(|e| KubeError::Config(format!("{}: {e}", path.display())))?;
                kube::Config::from_custom_kubeconfig(kc, &options)
                    .await
                    .map_err(|e| KubeError::Config(format!("{}: {e}", path.display())))?
            }
            None if context.is_some() => kube::Config::from_kubeconfig(&options)
                .await
                .map_err(|e| KubeError::Config(e.to_string()))?,
            None => kube::Config::infer()
                .await
                .map_err(|e| KubeError::Config(e.to_string()))?,
        };
        // One retry policy, ours (429, 5xx, transport errors; see
        // ATTEMPTS), rather than two stacked.
        let mut config = config;
        config.default_retry = false;
        Cluster::from_config(config)
    }

    fn from_config(config: kube::Config) -> Result<Cluster, KubeError> {
        let server = config.cluster_url.to_string();
        let client =
            Client::try_from(config.clone()).map_err(|e| KubeError::Config(e.to_string()))?;
        Ok(Cluster {
            client,
            server,
            kinds: Mutex::new(HashMap::new()),
            preferred: Mutex::new(None),
            limiter: Arc::new(Limiter::new(DEFAULT_QPS, f64::from(DEFAULT_BURST))),
            config,
        })
    }

    /// The same cluster, every request made as `user` (the
    /// `Impersonate-User` header): allowed only what `user` is allowed,
    /// if sluice's own identity may impersonate it. Shares the rate budget.
    pub fn impersonating(&self, user: &str) -> Result<Cluster, KubeError> {
        let mut config = self.config.clone();
        config.auth_info.impersonate = Some(user.to_string());
        config.auth_info.impersonate_groups = None;
        let mut c = Cluster::from_config(config)?;
        c.limiter = self.limiter.clone();
        Ok(c)
    }

    /// The cluster the agent runs in, from its pod's service account.
    pub fn in_cluster() -> Result<Cluster, KubeError> {
        let mut config = kube::Config::incluster()
            .map_err(|e| KubeError::Config(format!("in-cluster config: {e}")))?;
        config.default_retry = false;
        Cluster::from_config(config)
    }

    /// At most `qps` requests a second on average, `burst` at once (as
    /// client-go's QPS and Burst); non-positive values are refused.
    pub fn with_rate(mut self, qps: f64, burst: u32) -> Result<Cluster, KubeError> {
        if !(qps.is_finite() && qps > 0.0) || burst == 0 {
            return Err(KubeError::Config(format!(
                "a request rate of {qps}/s with a burst of {burst}: both must be above zero"
            )));
        }
        self.limiter = Arc::new(Limiter::new(qps, f64::from(burst)));
        Ok(self)
    }

    /// The namespace for namespaced objects that name none.
    pub fn default_namespace(&self) -> &str {
        self.client.default_namespace()
    }

    /// Runs `f` under the rate limit, retrying transient failures.
    async fn call<T, F, Fut>(&self, what: &str, f: F) -> Result<T, KubeError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, kube::Error>>,
    {
        let mut delay = BACKOFF;
        for attempt in 1..=ATTEMPTS {
            self.limiter.take().await;
            match f().await.map_err(KubeError::from) {
                Ok(v) => return Ok(v),
                Err(e) if e.transient() && attempt < ATTEMPTS => {
                    warn!(call = what, attempt, error = %e, "kubernetes API call failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(e),
            }
        }
        unreachable!("the last attempt returns")
    }

    async fn gv_kinds(
        &self,
        group: &str,
        version: &str,
        refresh: bool,
    ) -> Result<Vec<Kind>, KubeError> {
        let gv = if group.is_empty() {
            version.to_string()
        } else {
            format!("{group}/{version}")
        };
        if !refresh {
            if let Some(k) = self.kinds.lock().await.get(&gv) {
                return Ok(k.clone());
            }
        }
        let list = if group.is_empty() {
            self.call("discovery", || self.client.list_core_api_resources(version))
                .await
        } else {
            self.call("discovery", || self.client.list_api_group_resources(&gv))
                .await
        };
        let kinds: Vec<Kind> = match list {
            Ok(list) => list
                .resources
                .iter()
                .filter(|r| !r.name.contains('/'))
                .map(|r| Kind {
                    resource: ApiResource {
                        group: group.to_string(),
                        version: version.to_string(),
                        api_version: gv.clone(),
                        kind: r.kind.clone(),
                        plural: r.name.clone(),
                    },
                    namespaced: r.namespaced,
                })
                .collect(),
            Err(e) if e.code() == Some(404) => Vec::new(),
            Err(e) => return Err(e),
        };
        self.kinds.lock().await.insert(gv, kinds.clone());
        Ok(kinds)
    }

    /// The kind `kind` of `api_version`; None if the server does not serve
    /// it (yet: a CRD applied a moment ago is looked up again).
    pub async fn resolve(&self, api_version: &str, kind: &str) -> Result<Option<Kind>, KubeError> {
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        for refresh in [false, true] {
            let kinds = self.gv_kinds(group, version, refresh).await?;
            if let Some(k) = kinds.into_iter().find(|k| k.resource.kind == kind) {
                return Ok(Some(k));
            }
        }
        Ok(None)
    }

    /// The kind named by a resource id (`group/Kind` or `Kind`), at the
    /// group's preferred version.
    pub async fn resolve_id(&self, group_kind: &str) -> Result<Option<Kind>, KubeError> {
        let (group, kind) = group_kind.rsplit_once('/').unwrap_or(("", group_kind));
        if group.is_empty() {
            return self.resolve("v1", kind).await;
        }
        for refresh in [false, true] {
            let version = self.preferred_version(group, refresh).await?;
            if let Some(v) = version {
                if let Some(k) = self.resolve(&format!("{group}/{v}"), kind).await? {
                    return Ok(Some(k));
                }
            }
        }
        Ok(None)
    }

    /// Every kind the cluster serves, at its group's preferred version
    /// (the core group's v1 included).
    pub async fn all_kinds(&self) -> Result<Vec<Kind>, KubeError> {
        let mut kinds = self.gv_kinds("", "v1", false).await?;
        self.preferred_version("", true).await?;
        let groups: Vec<(String, String)> = self
            .preferred
            .lock()
            .await
            .as_ref()
            .map(|m| m.iter().map(|(g, v)| (g.clone(), v.clone())).collect())
            .unwrap_or_default();
        for (group, version) in groups {
            kinds.extend(self.gv_kinds(&group, &version, false).await?);
        }
        Ok(kinds)
    }

    async fn preferred_version(
        &self,
        group: &str,
        refresh: bool,
    ) -> Result<Option<String>, KubeError> {
        let mut cache = self.preferred.lock().await;
        if refresh || cache.is_none() {
            let groups = self
                .call("discovery", || self.client.list_api_groups())
                .await?;
            let map = groups
                .groups
                .into_iter()
                .filter_map(|g| {
                    let v = g
                        .preferred_version
                        .map(|p| p.version)
                        .or_else(|| g.versions.first().map(|v| v.version.clone()))?;
                    Some((g.name, v))
                })
                .collect();
            *cache = Some(map);
        }
        Ok(cache.as_ref().and_then(|m| m.get(group).cloned()))
    }

    fn api(&self, kind: &Kind, namespace: Option<&str>) -> Api<DynamicObject> {
        match (kind.namespaced, namespace) {
            (true, Some(ns)) => Api::namespaced_with(self.client.clone(), ns, &kind.resource),
            (true, None) => Api::namespaced_with(
                self.client.clone(),
                self.default_namespace(),
                &kind.resource,
            ),
            (false, _) => Api::all_with(self.client.clone(), &kind.resource),
        }
    }

    pub async fn get(
        &self,
        kind: &Kind,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Option<Value>, KubeError> {
        let api = self.api(kind, namespace);
        let obj = self.call("get", || api.get_opt(name)).await?;
        Ok(obj.map(to_json))
    }

    /// Every object of `kind` in `namespace` (all namespaces: None)
    /// matching `selector`, read in pages of [`PAGE`] so a namespace with
    /// thousands of objects never comes back as one huge answer.
    pub async fn list(
        &self,
        kind: &Kind,
        namespace: Option<&str>,
        selector: &str,
    ) -> Result<Vec<Value>, KubeError> {
        Ok(self.list_at(kind, namespace, selector, "").await?.0)
    }

    /// Every object of `kind` in every namespace matching `selector`.
    pub async fn list_everywhere(
        &self,
        kind: &Kind,
        selector: &str,
    ) -> Result<Vec<Value>, KubeError> {
        let api = Api::all_with(self.client.clone(), &kind.resource);
        Ok(self.pages(&api, kind, selector, "").await?.0)
    }

    /// As [`Cluster::list`] with a field selector too (`metadata.name=x`),
    /// and the list's resourceVersion: the point a watch starts from.
    pub async fn list_at(
        &self,
        kind: &Kind,
        namespace: Option<&str>,
        selector: &str,
        fields: &str,
    ) -> Result<(Vec<Value>, String), KubeError> {
        let api = self.api(kind, namespace);
        self.pages(&api, kind, selector, fields).await
    }

    async fn pages(
        &self,
        api: &Api<DynamicObject>,
        kind: &Kind,
        selector: &str,
        fields: &str,
    ) -> Result<(Vec<Value>, String), KubeError> {
        let mut items = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut lp = ListParams::default().labels(selector).limit(PAGE);
            if !fields.is_empty() {
                lp = lp.fields(fields);
            }
            if let Some(t) = &token {
                lp = lp.continue_token(t);
            }
            let page = self.call("list", || api.list(&lp)).await?;
            let version = page.metadata.resource_version.clone().unwrap_or_default();
            // List items come without apiVersion and kind: put them back,
            // so an item reads like a GET of the same object.
            items.extend(page.items.into_iter().map(|o| {
                let mut v = to_json(o);
                v["apiVersion"] = Value::String(kind.resource.api_version.clone());
                v["kind"] = Value::String(kind.resource.kind.clone());
                v
            }));
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(next) => token = Some(next),
                None => return Ok((items, version)),
            }
        }
    }

    /// Watches `kind` in `namespace` from `version` for at most `max`:
    /// returns as soon as an object named in `names` (all, if empty) is
    /// added, changed or deleted. Bookmarks move the watch on quietly; a
    /// 410 inside the stream (the version is older than the server keeps)
    /// is [`Watched::Expired`]: the caller lists again and watches from
    /// the new version, as client-go's reflector does.
    pub async fn watch(
        &self,
        kind: &Kind,
        namespace: Option<&str>,
        names: &[String],
        version: &str,
        max: Duration,
    ) -> Result<Watched, KubeError> {
        use futures_util::StreamExt;
        let api = self.api(kind, namespace);
        // The server ends the stream a little after `max`; the deadline
        // here is `max` itself, to the millisecond.
        let secs = (max.as_secs() + 2).min(3600) as u32;
        let mut wp = WatchParams::default().timeout(secs);
        if let [one] = names {
            wp = wp.fields(&format!("metadata.name={one}"));
        }
        self.limiter.take().await;
        let stream = api.watch(&wp, version).await.map_err(KubeError::from)?;
        let mut stream = std::pin::pin!(stream);
        let deadline = tokio::time::Instant::now() + max;
        loop {
            let next = match tokio::time::timeout_at(deadline, stream.next()).await {
                Err(_) | Ok(None) => return Ok(Watched::Quiet),
                Ok(Some(e)) => e.map_err(KubeError::from)?,
            };
            let obj = match next {
                WatchEvent::Added(o) | WatchEvent::Modified(o) | WatchEvent::Deleted(o) => o,
                WatchEvent::Bookmark(_) => continue,
                WatchEvent::Error(s) if s.code == 410 => return Ok(Watched::Expired),
                WatchEvent::Error(s) => {
                    return Err(KubeError::Api {
                        code: s.code,
                        reason: s.reason.clone(),
                        message: s.message.clone(),
                        causes: Vec::new(),
                    })
                }
            };
            let name = obj.metadata.name.clone().unwrap_or_default();
            if names.is_empty() || names.contains(&name) {
                debug!(kind = %kind.resource.kind, name, "watch: changed");
                return Ok(Watched::Changed);
            }
        }
    }

    /// Server-side apply of `body` with sluice's field manager; unknown
    /// fields are refused (`fieldValidation=Strict`), not dropped.
    pub async fn apply(
        &self,
        kind: &Kind,
        namespace: Option<&str>,
        name: &str,
        body: &Value,
        force: bool,
        dry_run: bool,
    ) -> Result<Value, KubeError> {
        let api = self.api(kind, namespace);
        let mut pp = PatchParams::apply(FIELD_MANAGER).validation_strict();
        if force {
            pp = pp.force();
        }
        if dry_run {
            pp = pp.dry_run();
        }
        debug!(kind = %kind.resource.kind, name, force, dry_run, "server-side apply");
        let patch = Patch::Apply(body);
        let obj = self.call("apply", || api.patch(name, &pp, &patch)).await?;
        Ok(to_json(obj))
    }

    /// Deletes with background propagation; false if it was already gone.
    pub async fn delete(
        &self,
        kind: &Kind,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<bool, KubeError> {
        let api = self.api(kind, namespace);
        let dp = DeleteParams::background();
        match self.call("delete", || api.delete(name, &dp)).await {
            Ok(_) => Ok(true),
            Err(e) if e.code() == Some(404) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

fn to_json(obj: DynamicObject) -> Value {
    serde_json::to_value(obj).unwrap_or(Value::Null)
}
