//! Canary and blue-green on Kubernetes: traffic weights through Gateway API
//! HTTPRoutes.
//!
//! A Deployment `web` can be split when a Service of the same name exists
//! in its namespace and an HTTPRoute there sends traffic to that Service
//! (a `backendRef` named `web`). To stage a new version, sluice creates a
//! Deployment and a Service `web-canary` beside them: the new pod template,
//! with every selector label's value suffixed `-canary` so that neither
//! Service selects the other's pods. Once the canary is available, the
//! route gets a second backendRef, `web-canary`, and the steps move its
//! weight. Promotion applies the new version to `web` itself, waits for it,
//! puts all traffic back on `web` and removes the canary; an abort puts all
//! traffic back on `web` first, then removes the canary.
//!
//! Routes are changed with server-side apply as sluice, from the fields
//! sluice owns on them: what the repository says, weights aside.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use sluice_core::managed::project;
use sluice_core::resource::{DesiredResource, Health, ResourceId};
use sluice_core::target::TargetError;
use sluice_core::traffic::{Counters, Metrics, MetricsError, Split, Traffic};
use tracing::info;

use crate::client::{Cluster, Kind};
use crate::health::health;
use crate::target::{apply_error, sluice_fields, Applier};

pub const CANARY_SUFFIX: &str = "-canary";
const ROUTE_API: &str = "gateway.networking.k8s.io/v1";
const POLL: Duration = Duration::from_millis(500);

pub struct HttpRouteTraffic {
    applier: Applier,
    cluster: Arc<Cluster>,
}

impl HttpRouteTraffic {
    pub(crate) fn new(applier: Applier) -> Self {
        HttpRouteTraffic {
            cluster: applier.cluster.clone(),
            applier,
        }
    }

    fn fail(&self, id: &ResourceId, reason: impl std::fmt::Display) -> TargetError {
        TargetError::Apply {
            id: id.to_string(),
            reason: reason.to_string(),
        }
    }

    fn namespace(&self, id: &ResourceId) -> String {
        id.namespace
            .clone()
            .unwrap_or_else(|| self.cluster.default_namespace().to_string())
    }

    /// The client that reads and deletes the objects of the split of `id`:
    /// as the identity `id` is written as (its `serviceAccountName`).
    fn client(&self, id: &ResourceId) -> Result<Arc<Cluster>, TargetError> {
        self.applier.reader(self.applier.user(id).as_deref())
    }

    async fn kinds(&self) -> Option<(Kind, Kind, Kind)> {
        let d = self.cluster.resolve("apps/v1", "Deployment").await.ok()??;
        let s = self.cluster.resolve("v1", "Service").await.ok()??;
        let r = self.cluster.resolve(ROUTE_API, "HTTPRoute").await.ok()??;
        Some((d, s, r))
    }

    /// The routes in `ns` with a backendRef to Service `service` (of the
    /// resource `id`).
    async fn routes(
        &self,
        id: &ResourceId,
        route: &Kind,
        ns: &str,
        service: &str,
    ) -> Result<Vec<Value>, String> {
        let all = self
            .client(id)
            .map_err(|e| e.to_string())?
            .list(route, Some(ns), "")
            .await
            .map_err(|e| e.to_string())?;
        Ok(all
            .into_iter()
            .filter(|r| {
                backend_refs(r).iter().any(|b| {
                    b["name"] == service && b["kind"].as_str().is_none_or(|k| k == "Service")
                })
            })
            .collect())
    }

    /// Sets the canary's weight on every route of the split (None: the
    /// canary backendRef is removed and the baseline gets it all).
    async fn weigh(&self, split: &Split, canary_percent: Option<u8>) -> Result<(), TargetError> {
        let id = &split.resource;
        let ns = self.namespace(id);
        let route_kind = self
            .cluster
            .resolve(ROUTE_API, "HTTPRoute")
            .await
            .map_err(|e| self.fail(id, e))?
            .ok_or_else(|| self.fail(id, "the cluster no longer serves HTTPRoute"))?;
        let client = self.client(id)?;
        for name in &split.routes {
            let live = client
                .get(&route_kind, Some(&ns), name)
                .await
                .map_err(|e| self.fail(id, e))?
                .ok_or_else(|| self.fail(id, format!("HTTPRoute {ns}/{name} is gone")))?;
            // What sluice applied to the route before, so that this apply
            // keeps every field sluice owns and changes only the weights.
            let mut body = project(&live, &json!({}), &sluice_fields(&live));
            body["apiVersion"] = live["apiVersion"].clone();
            body["kind"] = live["kind"].clone();
            body["metadata"]["name"] = json!(name);
            body["metadata"]["namespace"] = json!(ns);
            for rule in body["spec"]["rules"].as_array_mut().into_iter().flatten() {
                let Some(refs) = rule["backendRefs"].as_array_mut() else {
                    continue;
                };
                let Some(base) = refs
                    .iter()
                    .position(|b| b["name"] == split.baseline.as_str())
                else {
                    continue;
                };
                refs.retain(|b| b["name"] != split.canary.as_str());
                match canary_percent {
                    Some(p) => {
                        let mut canary = refs[base].clone();
                        canary["name"] = json!(split.canary);
                        canary["weight"] = json!(p);
                        refs[base]["weight"] = json!(100 - p.min(100));
                        refs.push(canary);
                    }
                    None => refs[base]["weight"] = json!(100),
                }
            }
            let service = live["metadata"]["annotations"][crate::target::SERVICE_ANNOTATION]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let rid = ResourceId {
                target: self.applier.target.clone(),
                kind: "gateway.networking.k8s.io/HTTPRoute".into(),
                namespace: Some(ns.clone()),
                name: name.clone(),
            };
            self.applier.apply(&rid, &service, &body, None).await?;
        }
        info!(resource = %id, canary = %split.canary, weight = ?canary_percent, "route weights set");
        Ok(())
    }

    /// Waits until the Deployment `name` is healthy, for at most its
    /// `progressDeadlineSeconds` (600 by default, as Kubernetes) or
    /// `within` (the service's gate timeout), whichever is shorter.
    async fn wait_healthy(
        &self,
        id: &ResourceId,
        kind: &Kind,
        ns: &str,
        name: &str,
        within: Option<Duration>,
    ) -> Result<(), TargetError> {
        let mut deadline = None;
        let client = self.client(id)?;
        loop {
            let obj = client
                .get(kind, Some(ns), name)
                .await
                .map_err(|e| self.fail(id, e))?
                .ok_or_else(|| self.fail(id, format!("Deployment {ns}/{name} vanished")))?;
            let limit = obj["spec"]["progressDeadlineSeconds"]
                .as_u64()
                .unwrap_or(600)
                .min(within.map_or(u64::MAX, |w| w.as_secs().max(1)));
            let deadline = *deadline
                .get_or_insert_with(|| tokio::time::Instant::now() + Duration::from_secs(limit));
            match health(&obj) {
                (Health::Healthy, _) => return Ok(()),
                (Health::Degraded, why) => return Err(self.fail(id, format!("{name}: {why}"))),
                (_, why) if tokio::time::Instant::now() >= deadline => {
                    return Err(self.fail(id, format!("{name} not ready after {limit}s: {why}")))
                }
                _ => tokio::time::sleep(POLL).await,
            }
        }
    }

    async fn remove_canary(&self, split: &Split) -> Result<(), TargetError> {
        let id = &split.resource;
        let ns = self.namespace(id);
        if let Some((d, s, _)) = self.kinds().await {
            let client = self.client(id)?;
            for kind in [&d, &s] {
                client
                    .delete(kind, Some(&ns), &split.canary)
                    .await
                    .map_err(|e| TargetError::Delete {
                        id: format!("{ns}/{}", split.canary),
                        reason: e.to_string(),
                    })?;
            }
        }
        Ok(())
    }
}

fn backend_refs(route: &Value) -> Vec<&Value> {
    route["spec"]["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|r| r["backendRefs"].as_array().into_iter().flatten())
        .collect()
}

/// `labels` with the values of `keys` suffixed, so the canary's pods are
/// selected by the canary's Service and Deployment only.
fn suffixed(labels: &Value, keys: &[String]) -> Value {
    let mut out = labels.clone();
    for k in keys {
        if let Some(v) = out[k.as_str()].as_str() {
            out[k.as_str()] = json!(format!("{v}{CANARY_SUFFIX}"));
        }
    }
    out
}

#[async_trait::async_trait]
impl Traffic for HttpRouteTraffic {
    async fn splittable(&self, r: &DesiredResource) -> bool {
        if r.id.kind != "apps/Deployment" {
            return false;
        }
        let Some((d, s, route)) = self.kinds().await else {
            return false;
        };
        let ns = self.namespace(&r.id);
        let Ok(client) = self.client(&r.id) else {
            return false;
        };
        let Ok(Some(live)) = client.get(&d, Some(&ns), &r.id.name).await else {
            return false;
        };
        // Only a new pod template is a new version worth a canary.
        let template = project(
            &live["spec"]["template"],
            &r.body["spec"]["template"],
            &json!({}),
        );
        if template == r.body["spec"]["template"] {
            return false;
        }
        if !matches!(client.get(&s, Some(&ns), &r.id.name).await, Ok(Some(_))) {
            return false;
        }
        matches!(self.routes(&r.id, &route, &ns, &r.id.name).await, Ok(routes) if !routes.is_empty())
    }

    async fn stage(&self, r: &DesiredResource) -> Result<Split, TargetError> {
        let id = &r.id;
        let (d, s, route) = self.kinds().await.ok_or_else(|| {
            self.fail(
                id,
                "the cluster does not serve Deployments, Services and HTTPRoutes",
            )
        })?;
        let ns = self.namespace(id);
        let canary = format!("{}{CANARY_SUFFIX}", id.name);
        let service = self
            .client(id)?
            .get(&s, Some(&ns), &id.name)
            .await
            .map_err(|e| self.fail(id, e))?
            .ok_or_else(|| self.fail(id, format!("Service {ns}/{} is gone", id.name)))?;
        // Every key either selector uses gets the suffix.
        let mut keys: Vec<String> = r.body["spec"]["selector"]["matchLabels"]
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        keys.extend(
            service["spec"]["selector"]
                .as_object()
                .into_iter()
                .flat_map(|m| m.keys().cloned()),
        );
        keys.sort();
        keys.dedup();
        let mut dep = r.body.clone();
        dep["metadata"]["name"] = json!(canary);
        dep["metadata"]["namespace"] = json!(ns);
        dep["spec"]["selector"]["matchLabels"] =
            suffixed(&r.body["spec"]["selector"]["matchLabels"], &keys);
        dep["spec"]["template"]["metadata"]["labels"] =
            suffixed(&r.body["spec"]["template"]["metadata"]["labels"], &keys);
        dep["metadata"]["labels"]["sluice.dev/canary-of"] = json!(id.name);
        let ports: Vec<Value> = service["spec"]["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                let mut q =
                    json!({"port": p["port"], "protocol": p["protocol"].as_str().unwrap_or("TCP")});
                for k in ["name", "targetPort", "appProtocol"] {
                    if !p[k].is_null() {
                        q[k] = p[k].clone();
                    }
                }
                q
            })
            .collect();
        let svc = json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": canary, "namespace": ns, "labels": {"sluice.dev/canary-of": id.name}},
            "spec": {"selector": suffixed(&service["spec"]["selector"], &keys), "ports": ports},
        });
        for (body, kind, kind_id) in [(&svc, &s, "Service"), (&dep, &d, id.kind.as_str())] {
            let canary_id = ResourceId {
                target: self.applier.target.clone(),
                kind: kind_id.to_string(),
                namespace: Some(ns.clone()),
                name: canary.clone(),
            };
            self.applier
                .apply_as(
                    kind,
                    &canary_id,
                    &r.service,
                    body,
                    false,
                    r.impersonate.as_deref(),
                )
                .await
                .map_err(|e| apply_error(id, kind, r.impersonate.as_deref(), e))?;
        }
        self.wait_healthy(id, &d, &ns, &canary, r.start_timeout)
            .await?;
        let routes: Vec<String> = self
            .routes(id, &route, &ns, &id.name)
            .await
            .map_err(|e| self.fail(id, e))?
            .iter()
            .filter_map(|r| r["metadata"]["name"].as_str().map(str::to_string))
            .collect();
        let split = Split {
            resource: id.clone(),
            routes,
            baseline: id.name.clone(),
            canary,
        };
        self.weigh(&split, Some(0)).await?;
        info!(resource = %id, canary = %split.canary, "canary staged");
        Ok(split)
    }

    async fn set_weight(&self, split: &Split, percent: u8) -> Result<(), TargetError> {
        self.weigh(split, Some(percent)).await
    }

    async fn promote(&self, split: &Split, r: &DesiredResource) -> Result<(), TargetError> {
        self.applier
            .apply(&r.id, &r.service, &r.body, r.impersonate.as_deref())
            .await?;
        let (d, _, _) = self
            .kinds()
            .await
            .ok_or_else(|| self.fail(&r.id, "the cluster does not serve Deployments"))?;
        self.wait_healthy(
            &r.id,
            &d,
            &self.namespace(&r.id),
            &r.id.name,
            r.start_timeout,
        )
        .await?;
        self.weigh(split, None).await?;
        self.remove_canary(split).await
    }

    async fn abort(&self, split: &Split) -> Result<(), TargetError> {
        self.weigh(split, None).await?;
        self.remove_canary(split).await
    }

    fn metrics(&self) -> Arc<dyn Metrics> {
        Arc::new(NoMetrics)
    }
}

/// Kubernetes has no built-in per-version metrics: analysis needs
/// Prometheus (`--prometheus-url`).
struct NoMetrics;

#[async_trait::async_trait]
impl Metrics for NoMetrics {
    fn describe(&self) -> String {
        "none (set --prometheus-url for canary analysis on Kubernetes)".into()
    }

    async fn counters(&self, _split: &Split) -> Result<(Counters, Counters), MetricsError> {
        Err(MetricsError::Unavailable {
            source_name: self.describe(),
            reason: "no metrics source is configured".into(),
        })
    }
}
