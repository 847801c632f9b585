//! The `kubernetes` target: desired objects applied with server-side apply,
//! live objects observed with their health, and pruning limited to what
//! sluice created.
//!
//! # Inventory
//! Every object sluice applies carries the label
//! `app.kubernetes.io/managed-by: sluice`, the label `sluice.dev/target`
//! (the target's name) and the annotation `sluice.dev/service`; the state
//! store records the same inventory per target. A prune deletes an object
//! only if both say sluice created it, so an object someone else made (or
//! re-made) under the same name is left alone. A failed delete stays in the
//! inventory and is retried by the next reconcile.
//!
//! Namespaces, CustomResourceDefinitions and PersistentVolumeClaims hold
//! data that a delete destroys for good: they are pruned only when the
//! object carries `sluice.dev/prune: "true"`. Any object annotated
//! `sluice.dev/prune: "false"` is never pruned (it is released from the
//! inventory and left running).
//!
//! # Conflicts
//! A field another manager owns (`kubectl scale`, an HPA) is not taken
//! over unless the object is annotated `sluice.dev/force-conflicts:
//! "true"`: the apply fails naming the field and the manager, and the wave
//! reverts.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{json, Value};
use sluice_core::model::TargetKind;
use sluice_core::resource::{DesiredResource, Health, LiveResource, ResourceId};
use sluice_core::target::{Target, TargetError};
use tracing::{debug, info, warn};

use crate::client::{Cluster, Kind, KubeError, Watched, FIELD_MANAGER};
use crate::health::health;

pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const TARGET_LABEL: &str = "sluice.dev/target";
pub const SERVICE_ANNOTATION: &str = "sluice.dev/service";
pub use sluice_core::plan::{PRUNE_ANNOTATION, PRUNE_PROTECTED};
pub const FORCE_ANNOTATION: &str = "sluice.dev/force-conflicts";

/// From this many objects of one kind in one namespace, observe LISTs
/// instead of GETting each.
const LIST_AT: usize = 3;

/// Dry runs in flight at once (each still takes its token from the rate
/// budget): with a budget to spare, a large commit is checked in a
/// fraction of the time.
const DRY_RUNS: usize = 8;

pub struct KubeTarget {
    applier: Applier,
    traffic: crate::canary::HttpRouteTraffic,
    /// What the last observe saw, so a gate can watch from there: each
    /// object's resourceVersion, and per (kind, namespace) read with a
    /// LIST the list's version (a point no older than the observe).
    seen: std::sync::Mutex<Seen>,
}

#[derive(Default)]
struct Seen {
    objects: BTreeMap<ResourceId, String>,
    lists: BTreeMap<(String, Option<String>), String>,
}

/// Writes manifests to one cluster as one target. The target and its
/// traffic splitter both apply through it, so every object gets the same
/// inventory marks, scope and conflict rule.
#[derive(Clone)]
pub(crate) struct Applier {
    pub(crate) target: String,
    pub(crate) cluster: Arc<Cluster>,
    /// Clients that impersonate a service's ServiceAccount, by user.
    impersonated: Arc<std::sync::Mutex<BTreeMap<String, Arc<Cluster>>>>,
    /// Who each object is read, written and deleted as (the user a
    /// `serviceAccountName` stands for), as the engine last said.
    users: Arc<std::sync::Mutex<BTreeMap<ResourceId, String>>>,
    /// The target's own `serviceAccountName`, for objects no render named.
    service_account: Option<String>,
    /// Per object, the digest of the body and identity the API server
    /// last accepted from this agent (a dry run or an apply): the same
    /// content need not be dry-run again.
    accepted: Arc<std::sync::Mutex<BTreeMap<ResourceId, String>>>,
}

impl Applier {
    pub(crate) fn unavailable(&self, e: impl std::fmt::Display) -> TargetError {
        TargetError::Unavailable {
            target: self.target.clone(),
            reason: e.to_string(),
        }
    }

    /// Where an object of `kind` lives: its namespace, else the context's
    /// default; None for cluster-scoped kinds.
    pub(crate) fn namespace(&self, kind: &Kind, namespace: Option<&str>) -> Option<String> {
        kind.namespaced.then(|| {
            namespace
                .unwrap_or_else(|| self.cluster.default_namespace())
                .to_string()
        })
    }

    /// Server-side applies `body` as `id` of `service`, its kind resolved:
    /// with the inventory marks, the namespace its kind's scope calls for,
    /// and force only where the object opts in.
    pub(crate) async fn apply_as(
        &self,
        kind: &Kind,
        id: &ResourceId,
        service: &str,
        body: &Value,
        dry_run: bool,
        user: Option<&str>,
    ) -> Result<Value, KubeError> {
        let mut body = with_inventory(body, &self.target, service);
        let namespace = self.namespace(kind, id.namespace.as_deref());
        match &namespace {
            Some(ns) => body["metadata"]["namespace"] = json!(ns),
            None => {
                if let Some(m) = body["metadata"].as_object_mut() {
                    m.remove("namespace");
                }
            }
        }
        let force = body["metadata"]["annotations"][FORCE_ANNOTATION] == "true";
        self.cluster_for(user)?
            .apply(kind, namespace.as_deref(), &id.name, &body, force, dry_run)
            .await
    }

    /// Who `id` is read and deleted as; None: sluice itself.
    pub(crate) fn user(&self, id: &ResourceId) -> Option<String> {
        if let Some(u) = self.users.lock().unwrap_or_else(|e| e.into_inner()).get(id) {
            return Some(u.clone());
        }
        let sa = self.service_account.as_deref()?;
        sluice_core::render::impersonated(sa, id.namespace.as_deref()).ok()
    }

    /// The client that reads and deletes as `user`.
    pub(crate) fn reader(&self, user: Option<&str>) -> Result<Arc<Cluster>, TargetError> {
        self.cluster_for(user).map_err(|e| self.unavailable(e))
    }

    fn digest(r: &DesiredResource) -> String {
        sluice_core::resource::digest_of(&(&r.body, &r.service, &r.impersonate))
    }

    /// Whether the server accepted exactly this content before.
    fn accepted(&self, r: &DesiredResource) -> bool {
        self.accepted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&r.id)
            .is_some_and(|d| *d == Self::digest(r))
    }

    fn accept(&self, r: &DesiredResource) {
        self.accepted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(r.id.clone(), Self::digest(r));
    }

    /// The client that writes as `user` (sluice itself when None).
    fn cluster_for(&self, user: Option<&str>) -> Result<Arc<Cluster>, KubeError> {
        let Some(user) = user else {
            return Ok(self.cluster.clone());
        };
        let mut cache = self.impersonated.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = cache.get(user) {
            return Ok(c.clone());
        }
        let c = Arc::new(self.cluster.impersonating(user)?);
        cache.insert(user.to_string(), c.clone());
        Ok(c)
    }
}

impl KubeTarget {
    /// The target `name` on `cluster`, acting as `service_account` (the
    /// target's `serviceAccountName`) where no service names its own.
    pub fn new(name: &str, cluster: Arc<Cluster>, service_account: Option<String>) -> Self {
        let applier = Applier {
            target: name.to_string(),
            cluster,
            impersonated: Default::default(),
            users: Default::default(),
            service_account,
            accepted: Default::default(),
        };
        KubeTarget {
            traffic: crate::canary::HttpRouteTraffic::new(applier.clone()),
            applier,
            seen: Default::default(),
        }
    }

    /// The kind of `id`, or None if the cluster does not serve it.
    async fn kind_of(&self, id: &ResourceId) -> Result<Option<Kind>, TargetError> {
        self.applier
            .cluster
            .resolve_id(&id.kind)
            .await
            .map_err(|e| {
                self.applier
                    .unavailable(format!("discovery of {}: {e}", id.kind))
            })
    }
}

/// The live object as comparable with a manifest: no `status`, no
/// server-written metadata, no inventory marks.
pub fn comparable(obj: &Value) -> Value {
    let mut o = obj.clone();
    if let Some(m) = o.as_object_mut() {
        m.remove("status");
    }
    if let Some(meta) = o.get_mut("metadata").and_then(Value::as_object_mut) {
        for k in [
            "managedFields",
            "resourceVersion",
            "uid",
            "creationTimestamp",
            "generation",
            "selfLink",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
        ] {
            meta.remove(k);
        }
        for (field, keys) in [
            ("labels", &[MANAGED_BY, TARGET_LABEL][..]),
            ("annotations", &[SERVICE_ANNOTATION][..]),
        ] {
            let empty = match meta.get_mut(field).and_then(Value::as_object_mut) {
                Some(map) => {
                    for k in keys {
                        map.remove(*k);
                    }
                    map.is_empty()
                }
                None => false,
            };
            if empty {
                meta.remove(field);
            }
        }
    }
    o
}

/// What sluice's field manager owns on `obj` (FieldsV1), `{}` if nothing,
/// less the inventory marks: like [`comparable`], it describes the fields
/// the manifest is responsible for.
pub fn sluice_fields(obj: &Value) -> Value {
    let mut fields = obj["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| {
            e["manager"] == FIELD_MANAGER
                && e["operation"] == "Apply"
                && e.get("subresource").is_none()
        })
        .map(|e| e["fieldsV1"].clone())
        .unwrap_or_else(|| json!({}));
    let Some(meta) = fields.get_mut("f:metadata").and_then(Value::as_object_mut) else {
        return fields;
    };
    for (field, keys) in [
        ("f:labels", &[MANAGED_BY, TARGET_LABEL][..]),
        ("f:annotations", &[SERVICE_ANNOTATION][..]),
    ] {
        if let Some(map) = meta.get_mut(field).and_then(Value::as_object_mut) {
            for k in keys {
                map.remove(&format!("f:{k}"));
            }
            // An empty entry would read as "owned whole": drop it.
            if map.is_empty() {
                meta.remove(field);
            }
        }
    }
    if meta.is_empty() {
        if let Some(f) = fields.as_object_mut() {
            f.remove("f:metadata");
        }
    }
    fields
}

/// The error for a refused apply, naming fields, managers and the way out.
pub(crate) fn apply_error(
    id: &ResourceId,
    kind: &Kind,
    user: Option<&str>,
    e: KubeError,
) -> TargetError {
    match e {
        // RBAC: name the rule that would allow it (the real server's
        // message for a create through apply names no verb at all).
        KubeError::Api { code: 403, message, .. } => TargetError::Apply {
            id: id.to_string(),
            reason: format!("{message} {}", rbac_hint(kind, "write", user)),
        },
        KubeError::Api {
            code: 409, causes, ..
        } if !causes.is_empty() => TargetError::Apply {
            id: id.to_string(),
            reason: format!(
                "server-side apply conflict: {}; another field manager owns these fields (annotate the object {FORCE_ANNOTATION}: \"true\" to take them over)",
                causes
                    .iter()
                    .map(|(f, m)| format!("{f} ({m})"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        },
        KubeError::Api {
            code: 422,
            causes,
            message,
            ..
        } => TargetError::Invalid {
            id: id.to_string(),
            reason: if causes.is_empty() {
                message
            } else {
                format!(
                    "refused by the API server: {}",
                    causes
                        .iter()
                        .map(|(f, m)| format!("{f}: {m}"))
                        .collect::<Vec<_>>()
                        .join("; ")
                )
            },
        },
        KubeError::Api { code, message, .. } if code == 400 || code == 404 || message.contains("not declared in schema") => {
            TargetError::Invalid {
                id: id.to_string(),
                reason: format!("refused by the API server ({code}): {message}"),
            }
        }
        other => TargetError::Apply {
            id: id.to_string(),
            reason: other.to_string(),
        },
    }
}

/// What to add, and where, when the API server refused `kind` to `user`
/// (sluice's own identity when None).
fn rbac_hint(kind: &Kind, what: &str, user: Option<&str>) -> String {
    let r = &kind.resource;
    let rule = format!(
        "{{apiGroups: [\"{}\"], resources: [\"{}\"], verbs: [get, list, watch, create, patch, update, delete]}}",
        r.group, r.plural
    );
    match user.and_then(|u| u.strip_prefix("system:serviceaccount:")) {
        Some(sa) => {
            let (ns, name) = sa.split_once(':').unwrap_or(("", sa));
            format!(
                "(ServiceAccount {ns}/{name}, which sluice acts as here (serviceAccountName), may not {what} {}: add to a Role bound to it the rule {rule})",
                r.kind
            )
        }
        None => format!(
            "(sluice's own identity may not {what} {}: name a serviceAccountName for this service or target (README: RBAC, two modes), or add to the ClusterRole of manifests/optional/cluster-wide.yaml the rule {rule})",
            r.kind
        ),
    }
}

/// `body` marked as sluice's, for `target` and `service`.
pub(crate) fn with_inventory(body: &Value, target: &str, service: &str) -> Value {
    let mut b = body.clone();
    let meta = &mut b["metadata"];
    meta["labels"][MANAGED_BY] = json!("sluice");
    meta["labels"][TARGET_LABEL] = json!(target);
    meta["annotations"][SERVICE_ANNOTATION] = json!(service);
    b
}

impl Applier {
    /// Applies `body` (a whole manifest) as sluice, resolving its kind.
    pub(crate) async fn apply(
        &self,
        id: &ResourceId,
        service: &str,
        body: &Value,
        user: Option<&str>,
    ) -> Result<Value, TargetError> {
        let api_version = body["apiVersion"].as_str().unwrap_or_default();
        let kind_name = body["kind"].as_str().unwrap_or_default();
        // A CRD applied a moment ago takes a little while to be served.
        let mut kind = None;
        for attempt in 0..20 {
            kind = self
                .cluster
                .resolve(api_version, kind_name)
                .await
                .map_err(|e| {
                    self.unavailable(format!("discovery of {api_version} {kind_name}: {e}"))
                })?;
            if kind.is_some() || attempt == 19 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
        let kind = kind.ok_or_else(|| TargetError::Invalid {
            id: id.to_string(),
            reason: format!(
                "the cluster does not serve kind {kind_name} in {api_version} (is its CustomResourceDefinition installed?)"
            ),
        })?;
        self.apply_as(&kind, id, service, body, false, user)
            .await
            .map_err(|e| apply_error(id, &kind, user, e))
    }
}

#[async_trait::async_trait]
impl Target for KubeTarget {
    fn name(&self) -> &str {
        &self.applier.target
    }

    fn kind(&self) -> TargetKind {
        TargetKind::Kubernetes
    }

    /// Reads each (kind, namespace) group with one LIST when it has
    /// [`LIST_AT`] objects or more, else with GETs: a plan of a thousand
    /// objects costs a request per kind and namespace, not per object.
    async fn observe(
        &self,
        ids: &[ResourceId],
    ) -> Result<BTreeMap<ResourceId, LiveResource>, TargetError> {
        let observe_err =
            |id: &str, kind: &Kind, user: Option<&str>, e: KubeError| TargetError::Observe {
                target: self.applier.target.clone(),
                reason: match e.code() {
                    Some(403) => format!("{id}: {e} {}", rbac_hint(kind, "read", user)),
                    _ => format!("{id}: {e}"),
                },
            };
        let mut groups: BTreeMap<(String, Option<String>, Option<String>), Vec<&ResourceId>> =
            BTreeMap::new();
        for id in ids.iter().filter(|id| id.target == self.applier.target) {
            groups
                .entry((id.kind.clone(), id.namespace.clone(), self.user(id)))
                .or_default()
                .push(id);
        }
        let mut out = BTreeMap::new();
        for ((kind_name, namespace, user), members) in groups {
            let Some(kind) = self.kind_of(members[0]).await? else {
                continue;
            };
            let ns = self.applier.namespace(&kind, namespace.as_deref());
            let cluster = self.reader(user.as_deref())?;
            let user = user.as_deref();
            let mut found: BTreeMap<String, Value> = BTreeMap::new();
            if members.len() >= LIST_AT {
                let (items, version) = cluster
                    .list_at(&kind, ns.as_deref(), "", "")
                    .await
                    .map_err(|e| observe_err(&kind_name, &kind, user, e))?;
                self.seen_lock()
                    .lists
                    .insert((kind_name.clone(), namespace.clone()), version);
                for obj in items {
                    if let Some(name) = obj["metadata"]["name"].as_str() {
                        found.insert(name.to_string(), obj);
                    }
                }
            } else {
                for id in &members {
                    let obj = cluster
                        .get(&kind, ns.as_deref(), &id.name)
                        .await
                        .map_err(|e| observe_err(&id.to_string(), &kind, user, e))?;
                    if let Some(obj) = obj {
                        found.insert(id.name.clone(), obj);
                    }
                }
            }
            for id in members {
                let Some(obj) = found.remove(&id.name) else {
                    self.seen_lock().objects.remove(id);
                    continue;
                };
                if let Some(v) = obj["metadata"]["resourceVersion"].as_str() {
                    self.seen_lock().objects.insert(id.clone(), v.to_string());
                }
                let (health, message) = if obj["metadata"]["deletionTimestamp"].is_string() {
                    (Health::Progressing, "being deleted".to_string())
                } else {
                    health(&obj)
                };
                out.insert(
                    id.clone(),
                    LiveResource {
                        id: id.clone(),
                        body: comparable(&obj),
                        health,
                        managed: Some(sluice_fields(&obj)),
                        message: Some(message),
                    },
                );
            }
        }
        Ok(out)
    }

    /// Dry-runs every apply: the API server validates each object (schema,
    /// types, unknown fields, conflicts, RBAC) before anything is changed,
    /// so a bad commit is rejected whole instead of failing mid-wave.
    /// Objects whose namespace or CRD the same commit creates are checked
    /// at apply time.
    ///
    /// # Cost
    /// One request per changed object, [`DRY_RUNS`] at a time within the
    /// rate budget; skipped for content the server accepted before (this
    /// agent dry-ran or applied exactly this body as this identity: a
    /// revert, a retry, a resumed rollout). A cold apply therefore sends
    /// two requests per object where `kubectl apply --server-side` sends
    /// one: the price of "nothing written unless everything is accepted".
    async fn prepare(&self, resources: &[&DesiredResource]) -> Result<(), TargetError> {
        use futures_util::StreamExt;
        let todo: Vec<&DesiredResource> = resources
            .iter()
            .copied()
            .filter(|r| !self.applier.accepted(r))
            .collect();
        type Check<'a> = std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<(), TargetError>> + Send + 'a>,
        >;
        let checks: Vec<Check<'_>> = todo
            .into_iter()
            .map(|r| Box::pin(self.dry_run(r)) as Check<'_>)
            .collect();
        let results: Vec<Result<(), TargetError>> = futures_util::stream::iter(checks)
            .buffered(DRY_RUNS)
            .collect()
            .await;
        results.into_iter().collect()
    }

    async fn apply(&self, resource: &DesiredResource) -> Result<(), TargetError> {
        self.applier
            .apply(
                &resource.id,
                &resource.service,
                &resource.body,
                resource.impersonate.as_deref(),
            )
            .await?;
        self.applier.accept(resource);
        info!(target = %self.applier.target, resource = %resource.id, "applied");
        Ok(())
    }

    async fn delete(&self, id: &ResourceId) -> Result<(), TargetError> {
        let Some(kind) = self.kind_of(id).await? else {
            return Ok(());
        };
        let ns = self.applier.namespace(&kind, id.namespace.as_deref());
        let user = self.user(id);
        let cluster = self.reader(user.as_deref())?;
        let live = cluster
            .get(&kind, ns.as_deref(), &id.name)
            .await
            .map_err(|e| TargetError::Delete {
                id: id.to_string(),
                reason: e.to_string(),
            })?;
        let Some(live) = live else { return Ok(()) };
        let labels = &live["metadata"]["labels"];
        if labels[MANAGED_BY] != "sluice" || labels[TARGET_LABEL] != self.applier.target.as_str() {
            warn!(resource = %id, "not marked as created by sluice on this target; left in place");
            return Ok(());
        }
        let prune = live["metadata"]["annotations"][PRUNE_ANNOTATION].as_str();
        let protected = PRUNE_PROTECTED.contains(&id.kind.as_str());
        if prune == Some("false") || (protected && prune != Some("true")) {
            info!(resource = %id, "not pruned ({PRUNE_ANNOTATION} is not \"true\"); released from the inventory");
            return Ok(());
        }
        cluster
            .delete(&kind, ns.as_deref(), &id.name)
            .await
            .map_err(|e| TargetError::Delete {
                id: id.to_string(),
                reason: e.to_string(),
            })?;
        info!(target = %self.applier.target, resource = %id, "deleted");
        Ok(())
    }

    fn traffic(&self) -> Option<&dyn sluice_core::traffic::Traffic> {
        Some(&self.traffic)
    }

    /// Everything labelled as this target's by sluice, in every kind the
    /// cluster serves: one LIST per kind by label, cluster-wide, or, where
    /// the acting account may not list cluster-wide, in each namespace the
    /// commit uses. The service comes from the `sluice.dev/service`
    /// annotation.
    async fn marked(
        &self,
        scope: &[ResourceId],
    ) -> Result<Option<Vec<(ResourceId, String)>>, TargetError> {
        let target = &self.applier.target;
        let kinds = self
            .applier
            .cluster
            .all_kinds()
            .await
            .map_err(|e| self.applier.unavailable(format!("discovery: {e}")))?;
        let selector = format!("{MANAGED_BY}=sluice,{TARGET_LABEL}={target}");
        let namespaces: std::collections::BTreeSet<&str> = scope
            .iter()
            .filter_map(|id| id.namespace.as_deref())
            .collect();
        let mut out = Vec::new();
        for kind in kinds {
            let r = &kind.resource;
            let kind_id = if r.group.is_empty() {
                r.kind.clone()
            } else {
                format!("{}/{}", r.group, r.kind)
            };
            let probe = |ns: Option<&str>| ResourceId {
                target: target.clone(),
                kind: kind_id.clone(),
                namespace: ns.map(str::to_string),
                name: String::new(),
            };
            let everywhere = self.reader(self.user(&probe(None)).as_deref())?;
            let items = match everywhere.list_everywhere(&kind, &selector).await {
                Ok(items) => items,
                Err(e) if e.code() == Some(403) && kind.namespaced => {
                    let mut items = Vec::new();
                    for ns in &namespaces {
                        let cluster = self.reader(self.user(&probe(Some(ns))).as_deref())?;
                        match cluster.list_at(&kind, Some(ns), &selector, "").await {
                            Ok((found, _)) => items.extend(found),
                            Err(e) if matches!(e.code(), Some(403..=405)) => {}
                            Err(e) => {
                                return Err(self.applier.unavailable(format!("{kind_id}: {e}")))
                            }
                        }
                    }
                    items
                }
                // Not listable (a virtual kind), or not this account's.
                Err(e) if matches!(e.code(), Some(403..=405)) => Vec::new(),
                Err(e) => return Err(self.applier.unavailable(format!("{kind_id}: {e}"))),
            };
            for obj in items {
                let Some(name) = obj["metadata"]["name"].as_str() else {
                    continue;
                };
                let id = ResourceId {
                    target: target.clone(),
                    kind: kind_id.clone(),
                    namespace: obj["metadata"]["namespace"].as_str().map(str::to_string),
                    name: name.to_string(),
                };
                let service = obj["metadata"]["annotations"][SERVICE_ANNOTATION]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                out.push((id, service));
            }
        }
        Ok(Some(out))
    }

    fn act_as(&self, users: &BTreeMap<ResourceId, String>) {
        self.applier
            .users
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(users.iter().map(|(k, v)| (k.clone(), v.clone())));
    }

    /// Watches the objects' kinds from what the last observe saw: one
    /// WATCH per (kind, namespace) that ends at the first change to one
    /// of `ids`, or quietly after `max`. A group read with GETs is listed
    /// once first (by name, or its namespace) for a version to start from,
    /// and if that list already differs from the observe, that is the
    /// change. A version too old (410 in the stream) counts as a change:
    /// the gate observes again, and the next wait lists afresh.
    async fn changed(&self, ids: &[ResourceId], max: std::time::Duration) -> Option<bool> {
        let mut groups: BTreeMap<(String, Option<String>, Option<String>), Vec<ResourceId>> =
            BTreeMap::new();
        for id in ids.iter().filter(|id| id.target == self.applier.target) {
            groups
                .entry((id.kind.clone(), id.namespace.clone(), self.user(id)))
                .or_default()
                .push(id.clone());
        }
        let waits: Vec<_> = groups
            .into_iter()
            .map(|(group, members)| Box::pin(self.watch_group(group, members, max)))
            .collect();
        if waits.is_empty() {
            return None;
        }
        let (first, _, _) = futures_util::future::select_all(waits).await;
        first
    }
}

impl KubeTarget {
    async fn dry_run(&self, r: &DesiredResource) -> Result<(), TargetError> {
        let api_version = r.body["apiVersion"].as_str().unwrap_or_default();
        let kind_name = r.body["kind"].as_str().unwrap_or_default();
        let Some(kind) = self
            .applier
            .cluster
            .resolve(api_version, kind_name)
            .await
            .map_err(|e| self.applier.unavailable(e))?
        else {
            return Ok(());
        };
        match self
            .applier
            .apply_as(
                &kind,
                &r.id,
                &r.service,
                &r.body,
                true,
                r.impersonate.as_deref(),
            )
            .await
        {
            Ok(_) => {
                self.applier.accept(r);
                Ok(())
            }
            // The namespace comes with this commit.
            Err(KubeError::Api { code: 404, .. }) => Ok(()),
            Err(e) => Err(
                match apply_error(&r.id, &kind, r.impersonate.as_deref(), e) {
                    TargetError::Apply { id, reason } => TargetError::Prepare { id, reason },
                    other => other,
                },
            ),
        }
    }

    fn user(&self, id: &ResourceId) -> Option<String> {
        self.applier.user(id)
    }

    fn reader(&self, user: Option<&str>) -> Result<Arc<Cluster>, TargetError> {
        self.applier.reader(user)
    }

    fn seen_lock(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn watch_group(
        &self,
        (kind_name, namespace, user): (String, Option<String>, Option<String>),
        members: Vec<ResourceId>,
        max: std::time::Duration,
    ) -> Option<bool> {
        let kind = self.kind_of(&members[0]).await.ok().flatten()?;
        let ns = self.applier.namespace(&kind, namespace.as_deref());
        let names: Vec<String> = members.iter().map(|id| id.name.clone()).collect();
        let cluster = self.reader(user.as_deref()).ok()?;
        let listed = self
            .seen_lock()
            .lists
            .remove(&(kind_name.clone(), namespace.clone()));
        let version = match listed {
            Some(v) => v,
            None => {
                let fields = match names.as_slice() {
                    [one] => format!("metadata.name={one}"),
                    _ => String::new(),
                };
                let (items, version) = match cluster
                    .list_at(&kind, ns.as_deref(), "", &fields)
                    .await
                {
                    Ok(r) => r,
                    Err(e) => {
                        debug!(target = %self.applier.target, kind = %kind_name, error = %e, "cannot list to watch; polling");
                        return None;
                    }
                };
                let now: BTreeMap<&str, &str> = items
                    .iter()
                    .filter_map(|o| {
                        Some((
                            o["metadata"]["name"].as_str()?,
                            o["metadata"]["resourceVersion"].as_str()?,
                        ))
                    })
                    .collect();
                let seen = self.seen_lock();
                let moved = members.iter().any(|id| {
                    now.get(id.name.as_str()).copied() != seen.objects.get(id).map(String::as_str)
                });
                if moved {
                    return Some(true);
                }
                version
            }
        };
        match cluster
            .watch(&kind, ns.as_deref(), &names, &version, max)
            .await
        {
            Ok(Watched::Changed) | Ok(Watched::Expired) => Some(true),
            Ok(Watched::Quiet) => Some(false),
            Err(e) => {
                debug!(target = %self.applier.target, kind = %kind_name, error = %e, "cannot watch; polling");
                None
            }
        }
    }
}
