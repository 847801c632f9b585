//! The fake answers as the real kube-apiserver 1.32 did: every recorded
//! request (`tests/fixtures/kube-apiserver-1.32/1*.json` to `4*.json`) is
//! replayed, in the order it was recorded, against a fresh fake, and the
//! answers are compared: status code; for a `Status`, its reason, message
//! and causes; for an object, everything but server-generated identifiers
//! and timestamps (uid, resourceVersion values, creationTimestamp, the
//! `time` of managedFields entries), including each manager's FieldsV1.
//! A no-op apply must keep the resourceVersion, as the real one did.

use std::path::PathBuf;

use serde_json::{json, Value};
use sluice_kube_fake::Fake;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// An object without what only the real server could know.
fn comparable(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        for k in ["uid", "resourceVersion", "creationTimestamp"] {
            m.remove(k);
        }
        if let Some(Value::Array(entries)) = m.get_mut("managedFields") {
            for e in entries.iter_mut() {
                if let Some(e) = e.as_object_mut() {
                    e.remove("time");
                }
            }
            entries.sort_by_key(|e| e["manager"].to_string());
        }
    }
    // Condition timestamps are the server's clock.
    for c in v["status"]["conditions"]
        .as_array_mut()
        .into_iter()
        .flatten()
    {
        if c["lastTransitionTime"].is_string() {
            c["lastTransitionTime"] = json!("(time)");
        }
    }
    v
}

/// Sends a recorded request to `fake` (with `token` in place of a
/// recorded Authorization header): the answer's status and body.
async fn replay(
    http: &reqwest::Client,
    fake: &Fake,
    recorded: &Value,
    token: Option<&str>,
) -> (u16, Value) {
    let req = &recorded["request"];
    let method = reqwest::Method::from_bytes(req["method"].as_str().unwrap().as_bytes()).unwrap();
    let mut r = http.request(
        method,
        format!("{}{}", fake.url(), req["path"].as_str().unwrap()),
    );
    for (k, v) in req["headers"].as_object().into_iter().flatten() {
        let v = v.as_str().unwrap();
        r = match token {
            Some(t) if k == "Authorization" => r.header(k, t),
            _ => r.header(k, v),
        };
    }
    if let Some(body) = req["body"].as_str() {
        r = r.body(body.to_string());
    }
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_recorded_exchange_gets_the_recorded_answer() {
    let fake = Fake::start().await;
    // The recorded server ran no controller manager.
    fake.controllers(false);
    // Before fixture 40 the recording installed the Gateway API CRDs.
    let crds =
        std::fs::read_to_string(fixtures().join("gateway-api-v1.4.0/httproutes.yaml")).unwrap();
    for doc in crds.split("\n---\n") {
        let v: Value = serde_yaml::from_str(doc).unwrap();
        if v["kind"] == "CustomResourceDefinition" {
            fake.create(v, "kubectl");
        }
    }
    // The recording was made with curl; the server names managers after
    // the User-Agent when a request gives no fieldManager (fixture 18).
    let http = reqwest::Client::builder()
        .user_agent("curl/8.5.0")
        .build()
        .unwrap();
    let mut files: Vec<PathBuf> = std::fs::read_dir(fixtures().join("kube-apiserver-1.32"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            name.ends_with(".json") && name.as_bytes()[0] >= b'1'
        })
        .collect();
    files.sort();
    assert!(files.len() >= 20, "{files:?}");
    let mut versions = std::collections::BTreeMap::new();
    let mut failures = Vec::new();
    for file in &files {
        let name = file.file_name().unwrap().to_string_lossy().to_string();
        let recorded: Value =
            serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
        let (status, got) = replay(&http, &fake, &recorded, None).await;
        let want = &recorded["response"]["body"];
        let want_status = recorded["response"]["status"].as_u64().unwrap() as u16;
        if status != want_status {
            failures.push(format!(
                "{name}: status {status}, recorded {want_status}: {got}"
            ));
            continue;
        }
        if want["kind"] == "Status" {
            for k in ["reason", "message", "code", "status"] {
                if got[k] != want[k] {
                    failures.push(format!("{name}: {k} {:?}, recorded {:?}", got[k], want[k]));
                }
            }
            if got["details"]["causes"] != want["details"]["causes"] {
                failures.push(format!(
                    "{name}: causes {}, recorded {}",
                    got["details"]["causes"], want["details"]["causes"]
                ));
            }
        } else if want["kind"].as_str().is_some_and(|k| !k.ends_with("List")) {
            let (g, w) = (comparable(&got), comparable(want));
            if g != w {
                failures.push(format!(
                    "{name}: object differs\n  got:      {g}\n  recorded: {w}"
                ));
            }
        } else if want["kind"].as_str().is_some_and(|k| k.ends_with("List")) {
            let names = |v: &Value| -> Vec<Value> {
                v["items"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|i| i["metadata"]["name"].clone())
                    .collect()
            };
            if names(&got) != names(want) {
                failures.push(format!(
                    "{name}: list {:?}, recorded {:?}",
                    names(&got),
                    names(want)
                ));
            }
        }
        versions.insert(name, got["metadata"]["resourceVersion"].clone());
    }
    assert!(
        failures.is_empty(),
        "{} differences:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // 13 then 14: the same apply twice writes once.
    assert_eq!(
        versions["13-ssa-deployment-create.json"],
        versions["14-ssa-deployment-noop.json"]
    );
    assert_ne!(versions["13-ssa-deployment-create.json"], json!(null));
}

/// Discovery documents list what the fake serves exactly as the real
/// server lists the same kinds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_matches_the_recorded_documents() {
    let fake = Fake::start().await;
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .unwrap();
    for (file, path) in [
        ("02-discovery-api-v1.json", "/api/v1"),
        ("04-discovery-apps-v1.json", "/apis/apps/v1"),
    ] {
        let recorded: Value = serde_json::from_str(
            &std::fs::read_to_string(fixtures().join("kube-apiserver-1.32").join(file)).unwrap(),
        )
        .unwrap();
        let got: Value = http
            .get(format!("{}{path}", fake.url()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            got["groupVersion"],
            recorded["response"]["body"]["groupVersion"]
        );
        let real = recorded["response"]["body"]["resources"]
            .as_array()
            .unwrap();
        for r in got["resources"].as_array().unwrap() {
            let same = real
                .iter()
                .find(|x| x["name"] == r["name"])
                .unwrap_or_else(|| panic!("{path}: {} not served by the real server", r["name"]));
            assert_eq!(
                (same["kind"].clone(), same["namespaced"].clone()),
                (r["kind"].clone(), r["namespaced"].clone()),
                "{path} {}",
                r["name"]
            );
        }
    }
}

/// The recorded 1.28 exchanges of RBAC with a ServiceAccount token (51a-f)
/// and of impersonation (60a-b), replayed against a fake set up as the
/// recording was (namespace `fx`, ServiceAccount `limited`, Role
/// `configmaps-get-list-patch` bound to it, `create` added before 51f): the
/// same status codes and, for a `Status`, the same reason and message.
/// The recorded token is replaced by the fake's token for that account.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_and_impersonation_answer_as_recorded() {
    let fake = Fake::start().await;
    fake.controllers(false);
    // Copied from the recording's set (../shared/fixtures/kube-apiserver-1.28).
    let dir = fixtures().join("kube-apiserver-1.28");
    let rules =
        |verbs: &[&str]| json!([{"apiGroups": [""], "resources": ["configmaps"], "verbs": verbs}]);
    fake.create(
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "fx"}}),
        "kubectl",
    );
    fake.create(
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "limited", "namespace": "fx"}}),
        "kubectl",
    );
    let role = |verbs: &[&str]| {
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
               "metadata": {"name": "configmaps-get-list-patch", "namespace": "fx"}, "rules": rules(verbs)})
    };
    fake.create(role(&["get", "list", "patch"]), "kubectl");
    fake.create(
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": {"name": "limited", "namespace": "fx"},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "configmaps-get-list-patch"},
               "subjects": [{"kind": "ServiceAccount", "name": "limited", "namespace": "fx"}]}),
        "kubectl",
    );
    fake.create(
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "existing", "namespace": "fx"}, "data": {"owner": "admin"}}),
        "admin-setup",
    );
    let token = format!("Bearer {}", Fake::service_account_token("fx", "limited"));
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .unwrap();
    let mut failures = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy().to_string();
            n.starts_with("51") || n.starts_with("60")
        })
        .collect();
    files.sort();
    assert_eq!(files.len(), 8, "{files:?}");
    for file in &files {
        let name = file.file_name().unwrap().to_string_lossy().to_string();
        if name.starts_with("51f") {
            fake.create(role(&["get", "list", "patch", "create"]), "kubectl");
        }
        let recorded: Value =
            serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
        let (status, got) = replay(&http, &fake, &recorded, Some(&token)).await;
        let want = &recorded["response"]["body"];
        let want_status = recorded["response"]["status"].as_u64().unwrap() as u16;
        if status != want_status {
            failures.push(format!(
                "{name}: status {status}, recorded {want_status}: {got}"
            ));
            continue;
        }
        if want["kind"] == "Status" {
            for k in ["reason", "message", "code"] {
                if got[k] != want[k] {
                    failures.push(format!("{name}: {k} {:?}, recorded {:?}", got[k], want[k]));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} differences:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
