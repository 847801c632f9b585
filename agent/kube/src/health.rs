//! Health per kind, from a live object. Pure. Feeds the wave gates, which
//! own the timeouts: a Deployment that never becomes available stays
//! `Progressing` until the gate gives up (or `Degraded` once Kubernetes
//! itself reports the progress deadline exceeded).

use serde_json::Value;
use sluice_core::resource::Health;

/// The health of `obj` and why, for people.
pub fn health(obj: &Value) -> (Health, String) {
    let kind = obj["kind"].as_str().unwrap_or_default();
    let group = obj["apiVersion"]
        .as_str()
        .and_then(|a| a.rsplit_once('/'))
        .map(|(g, _)| g)
        .unwrap_or("");
    match (group, kind) {
        ("apps", "Deployment") => deployment(obj),
        ("apps", "StatefulSet") => statefulset(obj),
        ("apps", "DaemonSet") => daemonset(obj),
        ("batch", "Job") => job(obj),
        ("", "PersistentVolumeClaim") => match obj["status"]["phase"].as_str() {
            Some("Bound") => (Health::Healthy, "bound".into()),
            Some("Lost") => (Health::Degraded, "lost its volume".into()),
            other => (
                Health::Progressing,
                format!("{} (waiting to be bound)", other.unwrap_or("no phase yet")),
            ),
        },
        ("apiextensions.k8s.io", "CustomResourceDefinition") => {
            if condition(obj, "Established") == Some("True") {
                (Health::Healthy, "established".into())
            } else if condition(obj, "NamesAccepted") == Some("False") {
                (Health::Degraded, reason(obj, "NamesAccepted"))
            } else {
                (Health::Progressing, "not established yet".into())
            }
        }
        _ => generic(obj),
    }
}

/// Any other kind, by the conventions most controllers follow (as Flux's
/// kstatus reads them): `Stalled` is degraded; `Reconciling`, a `Ready`
/// that is not True yet, or an unobserved generation is progressing;
/// otherwise, present is healthy.
fn generic(obj: &Value) -> (Health, String) {
    if condition(obj, "Stalled") == Some("True") {
        return (Health::Degraded, reason(obj, "Stalled"));
    }
    if obj["status"]["observedGeneration"].is_i64() {
        if let Some(h) = unobserved(obj) {
            return h;
        }
    }
    if condition(obj, "Reconciling") == Some("True") {
        return (Health::Progressing, reason(obj, "Reconciling"));
    }
    match condition(obj, "Ready") {
        Some("True") => (Health::Healthy, "ready".into()),
        Some(_) => (Health::Progressing, reason(obj, "Ready")),
        None => (Health::Healthy, "present".into()),
    }
}

fn condition<'a>(obj: &'a Value, kind: &str) -> Option<&'a str> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)?["status"]
        .as_str()
}

fn reason(obj: &Value, kind: &str) -> String {
    obj["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == kind))
        .map(|c| {
            format!(
                "{}: {}",
                c["reason"].as_str().unwrap_or(kind),
                c["message"].as_str().unwrap_or_default()
            )
        })
        .unwrap_or_else(|| kind.to_string())
}

fn int(v: &Value) -> i64 {
    v.as_i64().unwrap_or(0)
}

/// The controller has not seen the latest spec yet.
fn unobserved(obj: &Value) -> Option<(Health, String)> {
    let generation = int(&obj["metadata"]["generation"]);
    let observed = int(&obj["status"]["observedGeneration"]);
    (observed < generation).then(|| {
        (
            Health::Progressing,
            format!("waiting for the controller to observe generation {generation}"),
        )
    })
}

/// As `kubectl rollout status` judges a Deployment.
fn deployment(obj: &Value) -> (Health, String) {
    if let Some(h) = unobserved(obj) {
        return h;
    }
    let s = &obj["status"];
    if let Some(c) = s["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Progressing"))
    {
        if c["reason"] == "ProgressDeadlineExceeded" {
            return (Health::Degraded, reason(obj, "Progressing"));
        }
    }
    let want = obj["spec"]["replicas"].as_i64().unwrap_or(1);
    let updated = int(&s["updatedReplicas"]);
    let total = int(&s["replicas"]);
    let available = int(&s["availableReplicas"]);
    if updated < want {
        (
            Health::Progressing,
            format!("{updated} of {want} replicas updated"),
        )
    } else if total > updated {
        (
            Health::Progressing,
            format!("{} old replicas pending termination", total - updated),
        )
    } else if available < updated {
        (
            Health::Progressing,
            format!("{available} of {updated} updated replicas available"),
        )
    } else {
        (
            Health::Healthy,
            format!("{available}/{want} replicas available"),
        )
    }
}

fn statefulset(obj: &Value) -> (Health, String) {
    if let Some(h) = unobserved(obj) {
        return h;
    }
    let s = &obj["status"];
    let want = obj["spec"]["replicas"].as_i64().unwrap_or(1);
    let ready = int(&s["readyReplicas"]);
    if obj["spec"]["updateStrategy"]["type"] == "OnDelete" {
        return (
            Health::Healthy,
            "OnDelete: updated as pods are deleted".into(),
        );
    }
    let partitioned = obj["spec"]["updateStrategy"]["rollingUpdate"]["partition"]
        .as_i64()
        .unwrap_or(0);
    if ready < want {
        (
            Health::Progressing,
            format!("{ready} of {want} replicas ready"),
        )
    } else if partitioned == 0 && s["updateRevision"] != s["currentRevision"] {
        (
            Health::Progressing,
            format!("{} of {want} replicas updated", int(&s["updatedReplicas"])),
        )
    } else {
        (Health::Healthy, format!("{ready}/{want} replicas ready"))
    }
}

fn daemonset(obj: &Value) -> (Health, String) {
    if let Some(h) = unobserved(obj) {
        return h;
    }
    let s = &obj["status"];
    let want = int(&s["desiredNumberScheduled"]);
    let updated = int(&s["updatedNumberScheduled"]);
    let available = int(&s["numberAvailable"]);
    if updated < want {
        (
            Health::Progressing,
            format!("{updated} of {want} pods updated"),
        )
    } else if available < want {
        (
            Health::Progressing,
            format!("{available} of {want} pods available"),
        )
    } else {
        (
            Health::Healthy,
            format!("{available}/{want} pods available"),
        )
    }
}

fn job(obj: &Value) -> (Health, String) {
    if condition(obj, "Failed") == Some("True") {
        (
            Health::Degraded,
            format!("failed: {}", reason(obj, "Failed")),
        )
    } else if condition(obj, "Complete") == Some("True") {
        (Health::Healthy, "complete".into())
    } else {
        let active = int(&obj["status"]["active"]);
        (Health::Progressing, format!("running ({active} active)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn response(name: &str) -> Value {
        let path = format!(
            "{}/../../tests/fixtures/kube-apiserver-1.32/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        let f: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        f["response"]["body"].clone()
    }

    #[test]
    fn recorded_objects_have_the_health_kubernetes_gives_them() {
        // Just created, no controller has looked yet (status {}).
        let created = response("13-ssa-deployment-create.json");
        assert_eq!(
            health(&created).0,
            Health::Progressing,
            "{:?}",
            health(&created)
        );
        // After the status subresource says 2/2 available.
        let (h, why) = health(&response("19-get-deployment-healthy.json"));
        assert_eq!(
            (h, why.as_str()),
            (Health::Healthy, "2/2 replicas available")
        );
        assert_eq!(
            health(&response("31-get-crd-established.json")).0,
            Health::Healthy
        );
        assert_eq!(health(&response("30-ssa-crd.json")).0, Health::Progressing);
        assert_eq!(health(&response("21-ssa-secret.json")).0, Health::Healthy);
        assert_eq!(
            health(&response("33-ssa-custom-resource.json")).0,
            Health::Healthy
        );
    }

    #[test]
    fn rollouts_in_progress_stuck_or_failed_are_told_apart() {
        let mut d = response("19-get-deployment-healthy.json");
        d["metadata"]["generation"] = json!(2);
        assert!(health(&d).1.contains("observe generation 2"));
        d["status"]["observedGeneration"] = json!(2);
        d["status"]["availableReplicas"] = json!(1);
        assert_eq!(
            health(&d),
            (
                Health::Progressing,
                "1 of 2 updated replicas available".into()
            )
        );
        d["status"]["conditions"][1]["reason"] = json!("ProgressDeadlineExceeded");
        assert_eq!(health(&d).0, Health::Degraded);
        let job = |conds: Value| json!({"apiVersion": "batch/v1", "kind": "Job", "status": {"conditions": conds}});
        assert_eq!(
            health(&job(json!([{"type": "Complete", "status": "True"}]))).0,
            Health::Healthy
        );
        assert_eq!(
            health(&job(
                json!([{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}])
            ))
            .0,
            Health::Degraded
        );
        assert_eq!(health(&job(json!([]))).0, Health::Progressing);
        let pvc = |phase: &str| json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "status": {"phase": phase}});
        assert_eq!(health(&pvc("Bound")).0, Health::Healthy);
        assert_eq!(health(&pvc("Pending")).0, Health::Progressing);
        let ds = json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"generation": 1}, "status": {"observedGeneration": 1, "desiredNumberScheduled": 3, "updatedNumberScheduled": 3, "numberAvailable": 2}});
        assert_eq!(health(&ds).0, Health::Progressing);
        let cr = |conds: Value| json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"generation": 2}, "status": {"observedGeneration": 2, "conditions": conds}});
        assert_eq!(
            health(&cr(json!([{"type": "Ready", "status": "True"}]))).0,
            Health::Healthy
        );
        assert_eq!(
            health(&cr(
                json!([{"type": "Ready", "status": "False", "reason": "Waiting"}])
            ))
            .0,
            Health::Progressing
        );
        assert_eq!(
            health(&cr(
                json!([{"type": "Stalled", "status": "True", "reason": "BadSpec"}])
            ))
            .0,
            Health::Degraded
        );
        let mut lagging = cr(json!([]));
        lagging["status"]["observedGeneration"] = json!(1);
        assert_eq!(health(&lagging).0, Health::Progressing);
        let sts = json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"generation": 1}, "spec": {"replicas": 2}, "status": {"observedGeneration": 1, "readyReplicas": 2, "currentRevision": "a", "updateRevision": "b", "updatedReplicas": 1}});
        assert_eq!(health(&sts).0, Health::Progressing);
    }
}
