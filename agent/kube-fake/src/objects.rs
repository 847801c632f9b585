//! What the API server does to objects by itself: defaults, type checks,
//! validation and the canonical forms it stores values in.

use axum::response::Response;
use serde_json::{json, Value};

use crate::status;

/// Fields the API server fills in on status writes.
pub(crate) fn status_defaults(kind: &str, obj: &mut Value) {
    if kind == "Deployment" {
        for c in obj["status"]["conditions"]
            .as_array_mut()
            .into_iter()
            .flatten()
        {
            if let Some(c) = c.as_object_mut() {
                c.entry("lastUpdateTime").or_insert(Value::Null);
                c.entry("lastTransitionTime").or_insert(Value::Null);
            }
        }
    }
}

pub(crate) fn strip_meta(o: &Value) -> Value {
    let mut o = o.clone();
    if let Some(m) = o.get_mut("metadata").and_then(Value::as_object_mut) {
        for k in [
            "managedFields",
            "resourceVersion",
            "generation",
            "uid",
            "creationTimestamp",
        ] {
            m.remove(k);
        }
    }
    o
}

/// A Deployment's values the real server refuses with 422 `Invalid`, one
/// cause per field (fixture 17).
pub(crate) fn validate_deployment(body: &Value, name: &str) -> Option<Response> {
    let mut causes = Vec::new();
    if let Some(r) = body["spec"]["replicas"].as_i64().filter(|r| *r < 0) {
        causes.push((
            "FieldValueInvalid",
            format!("Invalid value: {r}: must be greater than or equal to 0"),
            "spec.replicas",
        ));
    }
    let selector = body["spec"]["selector"]["matchLabels"].as_object();
    let labels = &body["spec"]["template"]["metadata"]["labels"];
    if let Some(sel) = selector {
        if !sel.iter().all(|(k, v)| labels.get(k) == Some(v)) {
            causes.push((
                "FieldValueInvalid",
                format!(
                    "Invalid value: map[string]string{{{}}}: `selector` does not match template `labels`",
                    labels
                        .as_object()
                        .map(|m| m
                            .iter()
                            .map(|(k, v)| format!("{:?}:{}", k, v))
                            .collect::<Vec<_>>()
                            .join(", "))
                        .unwrap_or_default()
                ),
                "spec.template.metadata.labels",
            ));
        }
    }
    if body["spec"]["template"]["spec"]["containers"]
        .as_array()
        .is_some_and(|c| c.is_empty())
    {
        causes.push((
            "FieldValueRequired",
            "Required value".to_string(),
            "spec.template.spec.containers",
        ));
    }
    if causes.is_empty() {
        return None;
    }
    let summary: Vec<String> = causes.iter().map(|(_, m, f)| format!("{f}: {m}")).collect();
    let causes: Vec<Value> = causes
        .iter()
        .map(|(r, m, f)| json!({"reason": r, "message": m, "field": f}))
        .collect();
    Some(status(
        422,
        "Invalid",
        format!(
            "Deployment.apps \"{name}\" is invalid: [{}]",
            summary.join(", ")
        ),
        json!({"name": name, "group": "apps", "kind": "Deployment", "causes": causes}),
    ))
}

/// Server defaults, as in fixture 13.
pub(crate) fn defaults(kind: &str, obj: &mut Value, rv: u64) {
    let set = |v: &mut Value, k: &str, d: Value| {
        if let Some(o) = v.as_object_mut() {
            o.entry(k.to_string()).or_insert(d);
        }
    };
    match kind {
        "Deployment" | "StatefulSet" | "DaemonSet" => {
            let spec = &mut obj["spec"];
            if kind != "DaemonSet" {
                set(spec, "replicas", json!(1));
            }
            if kind == "Deployment" {
                set(
                    spec,
                    "strategy",
                    json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"}}),
                );
                set(spec, "progressDeadlineSeconds", json!(600));
            }
            set(spec, "revisionHistoryLimit", json!(10));
            let tpl = &mut spec["template"];
            set(&mut tpl["metadata"], "creationTimestamp", Value::Null);
            let pod = &mut tpl["spec"];
            for (k, v) in [
                ("restartPolicy", json!("Always")),
                ("terminationGracePeriodSeconds", json!(30)),
                ("dnsPolicy", json!("ClusterFirst")),
                ("securityContext", json!({})),
                ("schedulerName", json!("default-scheduler")),
            ] {
                set(pod, k, v);
            }
            if let Some(cs) = pod["containers"].as_array_mut() {
                for c in cs {
                    let latest = c["image"].as_str().is_some_and(|i| {
                        i.ends_with(":latest") || !i.rsplit('/').next().unwrap_or("").contains(':')
                    });
                    set(c, "terminationMessagePath", json!("/dev/termination-log"));
                    set(c, "terminationMessagePolicy", json!("File"));
                    set(
                        c,
                        "imagePullPolicy",
                        json!(if latest { "Always" } else { "IfNotPresent" }),
                    );
                    for p in c
                        .get_mut("ports")
                        .and_then(Value::as_array_mut)
                        .into_iter()
                        .flatten()
                    {
                        set(p, "protocol", json!("TCP"));
                    }
                    set(c, "resources", json!({}));
                    for part in ["limits", "requests"] {
                        if let Some(q) = c["resources"].get_mut(part).and_then(Value::as_object_mut)
                        {
                            for v in q.values_mut() {
                                *v = json!(canonical_quantity(v));
                            }
                        }
                    }
                }
            }
            set(obj, "status", json!({}));
        }
        // What the API server itself fills in when it creates a Service
        // (fixture 63a), controllers or not.
        "Service" => {
            let spec = &mut obj["spec"];
            set(spec, "type", json!("ClusterIP"));
            set(spec, "sessionAffinity", json!("None"));
            if spec["type"] != "ExternalName" {
                if spec["clusterIP"].is_null() {
                    let ip = format!("10.96.{}.{}", (rv / 250) % 250, rv % 250 + 2);
                    spec["clusterIP"] = json!(ip);
                }
                let ip = spec["clusterIP"].clone();
                set(spec, "clusterIPs", json!([ip]));
                set(spec, "ipFamilies", json!(["IPv4"]));
                set(spec, "ipFamilyPolicy", json!("SingleStack"));
                set(spec, "internalTrafficPolicy", json!("Cluster"));
            }
            if let Some(ps) = spec["ports"].as_array_mut() {
                for p in ps {
                    set(p, "protocol", json!("TCP"));
                    let port = p["port"].clone();
                    set(p, "targetPort", port);
                }
            }
            set(obj, "status", json!({"loadBalancer": {}}));
        }
        "Secret" => set(obj, "type", json!("Opaque")),
        "CustomResourceDefinition" => {
            set(&mut obj["spec"], "conversion", json!({"strategy": "None"}));
            let list_kind = format!(
                "{}List",
                obj["spec"]["names"]["kind"].as_str().unwrap_or_default()
            );
            set(&mut obj["spec"]["names"], "listKind", json!(list_kind));
            let stored: Vec<Value> = obj["spec"]["versions"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|v| v["storage"] == true)
                .map(|v| v["name"].clone())
                .collect();
            set(
                obj,
                "status",
                json!({"acceptedNames": {"kind": "", "plural": ""}, "conditions": null, "storedVersions": stored}),
            );
        }
        "Namespace" => {
            let name = obj["metadata"]["name"].clone();
            obj["metadata"]["labels"]["kubernetes.io/metadata.name"] = name;
            set(obj, "spec", json!({"finalizers": ["kubernetes"]}));
            set(obj, "status", json!({"phase": "Active"}));
        }
        // The defaults in the Gateway API v1.4.0 CRD schema (fixture 40).
        "HTTPRoute" => {
            for p in obj["spec"]["parentRefs"]
                .as_array_mut()
                .into_iter()
                .flatten()
            {
                set(p, "group", json!("gateway.networking.k8s.io"));
                set(p, "kind", json!("Gateway"));
            }
            if obj["spec"].is_object() {
                set(&mut obj["spec"], "rules", json!([{}]));
            }
            for rule in obj["spec"]["rules"].as_array_mut().into_iter().flatten() {
                set(
                    rule,
                    "matches",
                    json!([{"path": {"type": "PathPrefix", "value": "/"}}]),
                );
                for b in rule["backendRefs"].as_array_mut().into_iter().flatten() {
                    set(b, "group", json!(""));
                    set(b, "kind", json!("Service"));
                    set(b, "weight", json!(1));
                }
            }
        }
        _ => {}
    }
}

/// A quantity as the API server stores it (fixture 54a: `cpu: "0.5"` comes
/// back `500m`): decimal values in whole units when they are whole, else
/// in milli-units; binary and other SI suffixes kept as written.
pub(crate) fn canonical_quantity(v: &Value) -> String {
    let text = match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let (number, milli) = match text.strip_suffix('m') {
        Some(n) => (n, true),
        None => (text.as_str(), false),
    };
    let Ok(x) = number.parse::<f64>() else {
        return text;
    };
    let m = if milli { x } else { x * 1000.0 };
    if m.fract() != 0.0 || !m.is_finite() {
        return text;
    }
    let m = m as i64;
    if m % 1000 == 0 {
        (m / 1000).to_string()
    } else {
        format!("{m}m")
    }
}

/// Container fields of the core/v1 schema: any other is "not declared"
/// under `fieldValidation=Strict` (fixture 56b).
const CONTAINER_FIELDS: [&str; 24] = [
    "name",
    "image",
    "command",
    "args",
    "workingDir",
    "ports",
    "envFrom",
    "env",
    "resources",
    "resizePolicy",
    "restartPolicy",
    "volumeMounts",
    "volumeDevices",
    "livenessProbe",
    "readinessProbe",
    "startupProbe",
    "lifecycle",
    "terminationMessagePath",
    "terminationMessagePolicy",
    "imagePullPolicy",
    "securityContext",
    "stdin",
    "stdinOnce",
    "tty",
];

const DEPLOYMENT_SPEC: [&str; 8] = [
    "replicas",
    "selector",
    "template",
    "strategy",
    "minReadySeconds",
    "revisionHistoryLimit",
    "paused",
    "progressDeadlineSeconds",
];

/// How Go prints an untyped value in the real server's type errors.
fn go_value(v: &Value) -> String {
    format!("&value.valueUnstructured{{Value:{v}}}")
}

/// Why the real server cannot make a typed object of `body` (a 500 with
/// no reason, also under dry run: fixtures 52a/b, 56a/b): a value of the
/// wrong type, or under `fieldValidation=Strict` a field the schema does
/// not declare. Checked for the fields the fake's kinds are known to
/// type: ConfigMap and Secret values, replica counts, Deployment spec and
/// container fields.
pub(crate) fn typed_error(
    kind: &str,
    api_version: &str,
    namespace: &str,
    name: &str,
    body: &Value,
    strict: bool,
) -> Option<String> {
    let gv = if api_version.contains('/') {
        api_version.to_string()
    } else {
        format!("/{api_version}")
    };
    let wrap = |path: String, why: String| {
        format!(
            "failed to create typed patch object ({namespace}/{name}; {gv}, Kind={kind}): {path}: {why}"
        )
    };
    let maps: &[&str] = match kind {
        "ConfigMap" => &["data", "binaryData"],
        "Secret" => &["data", "stringData"],
        _ => &[],
    };
    for field in maps {
        for (k, v) in body[*field].as_object().into_iter().flatten() {
            if !v.is_string() && !v.is_null() {
                return Some(wrap(
                    format!(".{field}.{k}"),
                    format!("expected string, got {}", go_value(v)),
                ));
            }
        }
    }
    if matches!(kind, "Deployment" | "StatefulSet" | "ReplicaSet") {
        let r = &body["spec"]["replicas"];
        if !r.is_null() && !r.is_number() {
            let got = match r {
                Value::String(_) => "string".to_string(),
                Value::Bool(_) => "bool".to_string(),
                other => go_value(other),
            };
            return Some(wrap(
                ".spec.replicas".into(),
                format!("expected numeric (int or float), got {got}"),
            ));
        }
    }
    if !strict {
        return None;
    }
    if kind == "Deployment" {
        if let Some(unknown) = body["spec"]
            .as_object()
            .and_then(|s| s.keys().find(|k| !DEPLOYMENT_SPEC.contains(&k.as_str())))
        {
            return Some(wrap(
                format!(".spec.{unknown}"),
                "field not declared in schema".into(),
            ));
        }
    }
    if matches!(kind, "Deployment" | "StatefulSet" | "DaemonSet" | "Job") {
        for list in ["containers", "initContainers"] {
            for c in body["spec"]["template"]["spec"][list]
                .as_array()
                .into_iter()
                .flatten()
            {
                if let Some(unknown) = c
                    .as_object()
                    .and_then(|c| c.keys().find(|k| !CONTAINER_FIELDS.contains(&k.as_str())))
                {
                    let who = c["name"].as_str().unwrap_or_default();
                    return Some(wrap(
                        format!(".spec.template.spec.{list}[name=\"{who}\"].{unknown}"),
                        "field not declared in schema".into(),
                    ));
                }
            }
        }
    }
    None
}
