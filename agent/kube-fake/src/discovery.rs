//! Discovery, as the recorded servers answer it: the legacy documents
//! (`/api`, `/apis`, `/api/v1`, `/apis/{group}/{version}`; fixtures 01-04,
//! 50a/b) and aggregated discovery negotiated by `Accept` as kube-apiserver
//! 1.28 does it (fixtures 50c-g): `v2beta1` is served, `v2` alone is 406,
//! `v2` with a plain JSON fallback silently gets the plain list.

use std::collections::{BTreeMap, BTreeSet};

use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use crate::{ok, status, Inner, TypeDef};

/// The profile of an aggregated discovery document this server serves.
const V2BETA1: &str = "application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList";

/// What `Accept` asks of `/api` or `/apis`.
enum Wanted {
    Plain,
    Aggregated,
    /// Only a format this server does not have (aggregated v2 on 1.28).
    NotAcceptable,
}

fn wanted(headers: &HeaderMap) -> Wanted {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    let mut any_plain = false;
    for choice in accept.split(',').map(|c| c.replace(' ', "")) {
        if choice.contains("as=APIGroupDiscoveryList") {
            if choice.contains("v=v2beta1") {
                return Wanted::Aggregated;
            }
        } else if choice.starts_with("application/json")
            || choice.starts_with("*/*")
            || choice.starts_with("application/yaml")
        {
            any_plain = true;
        }
    }
    if any_plain {
        Wanted::Plain
    } else {
        Wanted::NotAcceptable
    }
}

fn not_acceptable() -> Response {
    status(
        406,
        "NotAcceptable",
        "only the following media types are accepted: application/json, application/yaml, application/vnd.kubernetes.protobuf".into(),
        Value::Null,
    )
}

fn aggregated(body: Value) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, V2BETA1)],
        serde_json::to_string(&body).unwrap_or_default(),
    )
        .into_response()
}

fn has_status(kind: &str) -> bool {
    matches!(
        kind,
        "Deployment"
            | "StatefulSet"
            | "DaemonSet"
            | "Job"
            | "CustomResourceDefinition"
            | "PersistentVolumeClaim"
            | "Namespace"
            | "Service"
    )
}

fn has_scale(kind: &str) -> bool {
    matches!(kind, "Deployment" | "StatefulSet")
}

const VERBS: [&str; 7] = [
    "create", "delete", "get", "list", "patch", "update", "watch",
];

/// `/apis/{group}/{version}` or `/api/{version}`: the legacy list of one
/// group version; None if nothing is served there.
pub(crate) fn resource_list(inner: &Inner, group: &str, version: &str) -> Option<Value> {
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    let resources: Vec<Value> = inner
        .types
        .iter()
        .filter(|t| t.0 == group && t.1 == version)
        .flat_map(|t| {
            let mut v = vec![json!({"name": t.3, "singularName": t.2.to_lowercase(), "namespaced": t.4, "kind": t.2, "verbs": VERBS})];
            if has_status(&t.2) {
                v.push(json!({"name": format!("{}/status", t.3), "singularName": "", "namespaced": t.4, "kind": t.2, "verbs": ["get", "patch", "update"]}));
            }
            if has_scale(&t.2) {
                v.push(json!({"name": format!("{}/scale", t.3), "singularName": "", "namespaced": t.4, "group": "autoscaling", "version": "v1", "kind": "Scale", "verbs": ["get", "patch", "update"]}));
            }
            v
        })
        .collect();
    (!resources.is_empty()).then(|| {
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources})
    })
}

fn aggregated_resource(t: &TypeDef) -> Value {
    let mut subresources = Vec::new();
    if has_scale(&t.2) {
        subresources.push(json!({"subresource": "scale", "responseKind": {"group": "autoscaling", "version": "v1", "kind": "Scale"}, "verbs": ["get", "patch", "update"]}));
    }
    if has_status(&t.2) {
        subresources.push(json!({"subresource": "status", "responseKind": {"group": "", "version": "", "kind": t.2}, "verbs": ["get", "patch", "update"]}));
    }
    let mut r = json!({
        "resource": t.3,
        "responseKind": {"group": "", "version": "", "kind": t.2},
        "scope": if t.4 { "Namespaced" } else { "Cluster" },
        "singularResource": t.2.to_lowercase(),
        "verbs": VERBS,
    });
    if !subresources.is_empty() {
        r["subresources"] = json!(subresources);
    }
    r
}

/// `/api`: the core group's versions, or its aggregated document.
pub(crate) fn core(inner: &Inner, headers: &HeaderMap) -> Response {
    match wanted(headers) {
        Wanted::NotAcceptable => not_acceptable(),
        Wanted::Plain => ok(
            200,
            json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": inner.address}]}),
        ),
        Wanted::Aggregated => {
            let resources: Vec<Value> = inner
                .types
                .iter()
                .filter(|t| t.0.is_empty())
                .map(aggregated_resource)
                .collect();
            aggregated(json!({
                "kind": "APIGroupDiscoveryList",
                "apiVersion": "apidiscovery.k8s.io/v2beta1",
                "metadata": {},
                "items": [{"metadata": {"creationTimestamp": null}, "versions": [{"version": "v1", "resources": resources, "freshness": "Current"}]}],
            }))
        }
    }
}

/// `/apis`: the named groups, or their aggregated document.
pub(crate) fn groups(inner: &Inner, headers: &HeaderMap) -> Response {
    let mut groups: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for t in inner.types.iter().filter(|t| !t.0.is_empty()) {
        groups.entry(&t.0).or_default().insert(&t.1);
    }
    match wanted(headers) {
        Wanted::NotAcceptable => not_acceptable(),
        Wanted::Plain => {
            let groups: Vec<Value> = groups
                .iter()
                .map(|(g, vs)| {
                    let versions: Vec<Value> = vs
                        .iter()
                        .map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
                        .collect();
                    let preferred = versions.last().cloned().unwrap_or(Value::Null);
                    json!({"name": g, "versions": versions, "preferredVersion": preferred})
                })
                .collect();
            ok(
                200,
                json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}),
            )
        }
        Wanted::Aggregated => {
            let items: Vec<Value> = groups
                .iter()
                .map(|(g, vs)| {
                    let versions: Vec<Value> = vs
                        .iter()
                        .rev()
                        .map(|v| {
                            let resources: Vec<Value> = inner
                                .types
                                .iter()
                                .filter(|t| t.0 == *g && t.1 == *v)
                                .map(aggregated_resource)
                                .collect();
                            json!({"version": v, "resources": resources, "freshness": "Current"})
                        })
                        .collect();
                    json!({"metadata": {"name": g, "creationTimestamp": null}, "versions": versions})
                })
                .collect();
            aggregated(json!({
                "kind": "APIGroupDiscoveryList",
                "apiVersion": "apidiscovery.k8s.io/v2beta1",
                "metadata": {},
                "items": items,
            }))
        }
    }
}
