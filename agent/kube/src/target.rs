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
use tracing::{info, warn};

use crate::client::{Cluster, Kind, KubeError, FIELD_MANAGER};
use crate::health::health;

pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const TARGET_LABEL: &str = "sluice.dev/target";
pub const SERVICE_ANNOTATION: &str = "sluice.dev/service";
pub use sluice_core::plan::{PRUNE_ANNOTATION, PRUNE_PROTECTED};
pub const FORCE_ANNOTATION: &str = "sluice.dev/force-conflicts";

/// From this many objects of one kind in one namespace, observe LISTs
/// instead of GETting each.
const LIST_AT: usize = 3;

pub struct KubeTarget {
    applier: Applier,
    traffic: crate::canary::HttpRouteTraffic,
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
}

impl Applier {
    fn unavailable(&self, e: impl std::fmt::Display) -> TargetError {
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
    pub fn new(name: &str, cluster: Arc<Cluster>) -> Self {
        let applier = Applier {
            target: name.to_string(),
            cluster,
            impersonated: Default::default(),
        };
        KubeTarget {
            traffic: crate::canary::HttpRouteTraffic::new(applier.clone()),
            applier,
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
pub(crate) fn apply_error(id: &ResourceId, kind: &Kind, e: KubeError) -> TargetError {
    match e {
        // RBAC: name the rule that would allow it (the real server's
        // message for a create through apply names no verb at all).
        KubeError::Api { code: 403, message, .. } => TargetError::Apply {
            id: id.to_string(),
            reason: format!("{message} {}", rbac_hint(kind, "write")),
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

/// What to add to sluice's role when the API server refused it `kind`.
fn rbac_hint(kind: &Kind, what: &str) -> String {
    let r = &kind.resource;
    format!(
        "(sluice's identity may not {what} {}: add to its ClusterRole, manifests/rbac.yaml, the rule {{apiGroups: [\"{}\"], resources: [\"{}\"], verbs: [get, list, create, patch, update, delete]}})",
        r.kind, r.group, r.plural
    )
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
            .map_err(|e| apply_error(id, &kind, e))
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
        let observe_err = |id: &str, kind: &Kind, e: KubeError| TargetError::Observe {
            target: self.applier.target.clone(),
            reason: match e.code() {
                Some(403) => format!("{id}: {e} {}", rbac_hint(kind, "read")),
                _ => format!("{id}: {e}"),
            },
        };
        let mut groups: BTreeMap<(String, Option<String>), Vec<&ResourceId>> = BTreeMap::new();
        for id in ids.iter().filter(|id| id.target == self.applier.target) {
            groups
                .entry((id.kind.clone(), id.namespace.clone()))
                .or_default()
                .push(id);
        }
        let mut out = BTreeMap::new();
        for ((kind_name, namespace), members) in groups {
            let Some(kind) = self.kind_of(members[0]).await? else {
                continue;
            };
            let ns = self.applier.namespace(&kind, namespace.as_deref());
            let mut found: BTreeMap<String, Value> = BTreeMap::new();
            if members.len() >= LIST_AT {
                let items = self
                    .applier
                    .cluster
                    .list(&kind, ns.as_deref(), "")
                    .await
                    .map_err(|e| observe_err(&kind_name, &kind, e))?;
                for obj in items {
                    if let Some(name) = obj["metadata"]["name"].as_str() {
                        found.insert(name.to_string(), obj);
                    }
                }
            } else {
                for id in &members {
                    let obj = self
                        .applier
                        .cluster
                        .get(&kind, ns.as_deref(), &id.name)
                        .await
                        .map_err(|e| observe_err(&id.to_string(), &kind, e))?;
                    if let Some(obj) = obj {
                        found.insert(id.name.clone(), obj);
                    }
                }
            }
            for id in members {
                let Some(obj) = found.remove(&id.name) else {
                    continue;
                };
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
    /// unknown fields, conflicts) before anything is changed. Objects whose
    /// namespace or CRD the same commit creates are checked at apply time.
    async fn prepare(&self, resources: &[&DesiredResource]) -> Result<(), TargetError> {
        for r in resources {
            let api_version = r.body["apiVersion"].as_str().unwrap_or_default();
            let kind_name = r.body["kind"].as_str().unwrap_or_default();
            let Some(kind) = self
                .applier
                .cluster
                .resolve(api_version, kind_name)
                .await
                .map_err(|e| self.applier.unavailable(e))?
            else {
                continue;
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
                Ok(_) => {}
                // The namespace comes with this commit.
                Err(KubeError::Api { code: 404, .. }) => {}
                Err(e) => {
                    return Err(match apply_error(&r.id, &kind, e) {
                        TargetError::Apply { id, reason } => TargetError::Prepare { id, reason },
                        other => other,
                    })
                }
            }
        }
        Ok(())
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
        info!(target = %self.applier.target, resource = %resource.id, "applied");
        Ok(())
    }

    async fn delete(&self, id: &ResourceId) -> Result<(), TargetError> {
        let Some(kind) = self.kind_of(id).await? else {
            return Ok(());
        };
        let ns = self.applier.namespace(&kind, id.namespace.as_deref());
        let cluster = &self.applier.cluster;
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
}
