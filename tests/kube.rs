//! The Kubernetes target end to end: the real `sluice` binary, a real git
//! repository, and — since no Kubernetes API server can run on the
//! machines the suite runs on — the in-process fake API server of
//! `sluice-kube-fake`, at the HTTP level. Its doc comment lists which real
//! behaviours it models (server-side apply with field managers and
//! conflicts, defaults, validation, discovery of CRDs, status written by
//! stand-in controllers) and which it does not. The same engine scenarios
//! as on the host target: waves in dependency order, a failed health gate
//! reverting to the previous commit, pruning only what sluice created,
//! drift found per field.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::{git, run_with_timeout, Output, SLUICE};
use serde_json::{json, Value};
use sluice_kube_fake::Fake;

const TOPOLOGY: &str = r#"apiVersion: sluice.dev/v1
kind: Topology
defaults:
  strategy: rolling
  soak: 0s
  gateTimeout: 4s
targets:
  - name: cluster
    type: kubernetes
services:
  platform:
    path: platform
  api:
    path: api
    dependsOn: [platform]
  web:
    path: web
    dependsOn: [api]
"#;

const PLATFORM: &str = r#"apiVersion: v1
kind: Namespace
metadata:
  name: shop
---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.example.com
spec:
  group: example.com
  names: {plural: widgets, singular: widget, kind: Widget, listKind: WidgetList}
  scope: Namespaced
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec: {type: object, properties: {size: {type: integer}}}
"#;

fn api(version: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: ConfigMap
metadata:
  name: api-config
  namespace: shop
data:
  LOG_LEVEL: info
---
apiVersion: v1
kind: Secret
metadata:
  name: api-db
  namespace: shop
stringData:
  password: CANARY-s3cr3t-value
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: api
  namespace: shop
spec:
  replicas: 2
  selector:
    matchLabels: {{app: api}}
  template:
    metadata:
      labels: {{app: api}}
    spec:
      containers:
      - name: api
        image: registry.example.com/shop/api:{version}
        ports: [{{containerPort: 8080}}]
        resources:
          requests: {{cpu: 100m, memory: 64Mi}}
          limits: {{cpu: "1", memory: 128Mi}}
---
apiVersion: v1
kind: Service
metadata:
  name: api
  namespace: shop
spec:
  selector: {{app: api}}
  ports: [{{port: 80, targetPort: 8080}}]
"#
    )
}

fn web(version: &str) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
spec:
  replicas: 3
  selector:
    matchLabels: {{app: web}}
  template:
    metadata:
      labels: {{app: web}}
    spec:
      containers:
      - name: web
        image: registry.example.com/shop/web:{version}
        resources:
          limits: {{cpu: 500m, memory: 256Mi}}
---
apiVersion: example.com/v1
kind: Widget
metadata:
  name: hero
  namespace: shop
spec:
  size: 3
"#
    )
}

/// A GitOps repository for a cluster, a state dir and a kubeconfig
/// pointing at a fresh fake API server.
struct Cluster {
    dir: tempfile::TempDir,
    fake: Fake,
}

impl Cluster {
    fn new() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("repo");
        std::fs::create_dir_all(&repo).unwrap();
        git(&repo, &["init", "-q", "-b", "main"]);
        let fake = Fake::start_in_thread();
        std::fs::write(dir.path().join("kubeconfig"), fake.kubeconfig(&["cluster"])).unwrap();
        let c = Cluster { dir, fake };
        c.write("sluice.yaml", TOPOLOGY);
        c.write("platform/platform.yaml", PLATFORM);
        c.write("api/api.yaml", &api("1.0.0"));
        c.write("web/web.yaml", &web("1.0.0"));
        c
    }

    fn repo(&self) -> PathBuf {
        self.dir.path().join("repo")
    }

    fn write(&self, rel: &str, content: &str) {
        let p = self.repo().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }

    fn commit(&self, msg: &str) -> String {
        git(&self.repo(), &["add", "-A"]);
        git(&self.repo(), &["commit", "-q", "-m", msg]);
        git(&self.repo(), &["rev-parse", "HEAD"])
    }

    fn sluice(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(SLUICE);
        cmd.arg(args[0])
            .arg("--repo")
            .arg(self.repo())
            .arg("--state-dir")
            .arg(self.dir.path().join("state"))
            .arg("--kubeconfig")
            .arg(self.dir.path().join("kubeconfig"))
            .args(&args[1..])
            .env("HOME", self.dir.path());
        run_with_timeout(cmd, Duration::from_secs(120))
    }

    fn object(&self, group: &str, plural: &str, ns: &str, name: &str) -> Option<Value> {
        self.fake.get(group, plural, ns, name)
    }

    fn image(&self, name: &str) -> String {
        let d = self
            .object("apps", "deployments", "shop", name)
            .expect("deployment");
        d["spec"]["template"]["spec"]["containers"][0]["image"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// The apply PATCHes (path, field manager) in order, dry runs aside.
    fn applies(&self) -> Vec<(String, Option<String>)> {
        self.fake
            .log()
            .into_iter()
            .filter(|l| l.method == "PATCH")
            .map(|l| (l.path, l.field_manager))
            .collect()
    }
}

#[test]
fn waves_apply_in_dependency_order_with_server_side_apply() {
    let c = Cluster::new();
    c.commit("shop 1.0.0");
    let out = c.sluice(&["apply"]);
    assert_eq!(out.code, 0, "{}", out.all());

    // Every write is a server-side apply by field manager `sluice`.
    let applies = c.applies();
    assert!(!applies.is_empty());
    assert!(
        applies.iter().all(|(_, m)| m.as_deref() == Some("sluice")),
        "{applies:?}"
    );
    // Waves by dependsOn: the namespace and the CRD, then api, then web
    // (whose custom resource needs the CRD).
    let first = |needle: &str| {
        c.fake
            .log()
            .iter()
            .position(|l| l.method == "PATCH" && l.path.ends_with(needle) && l.status < 300)
            .unwrap_or_else(|| panic!("no apply of {needle}: {applies:?}"))
    };
    let ns = first("/namespaces/shop");
    let crd = first("/customresourcedefinitions/widgets.example.com");
    let api = first("/deployments/api");
    let web = first("/deployments/web");
    let widget = first("/widgets/hero");
    assert!(
        ns < api && crd < api && api < web && crd < widget,
        "{applies:?}"
    );

    // Inventory marks on every object; the Secret stored base64, as the
    // API server does.
    let d = c.object("apps", "deployments", "shop", "web").unwrap();
    assert_eq!(
        d["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "sluice"
    );
    assert_eq!(d["metadata"]["labels"]["sluice.dev/target"], "cluster");
    assert_eq!(d["metadata"]["annotations"]["sluice.dev/service"], "web");
    let widget = c.object("example.com", "widgets", "shop", "hero").unwrap();
    assert_eq!(widget["spec"]["size"], 3);
    let secret = c.object("", "secrets", "shop", "api-db").unwrap();
    assert!(secret["data"]["password"].is_string());

    // Applied again: server defaults, status and managedFields are not
    // differences, so nothing is written.
    let writes = c.applies().len();
    let out = c.sluice(&["plan"]);
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(out.stdout.contains("No changes"), "{}", out.all());
    let out = c.sluice(&["apply"]);
    assert_eq!(out.code, 0, "{}", out.all());
    let dry_runs_and_writes: Vec<_> = c.applies().into_iter().skip(writes).collect();
    assert!(
        dry_runs_and_writes.is_empty(),
        "unchanged objects were re-applied: {dry_runs_and_writes:?}"
    );

    // Status lists every service healthy, with the commit.
    let out = c.sluice(&["status", "-o", "json"]);
    assert_eq!(out.code, 0, "{}", out.all());
    let status: Value = serde_json::from_str(&out.stdout).unwrap();
    let text = status.to_string();
    assert!(
        !text.contains("CANARY-s3cr3t"),
        "a secret value reached status"
    );
    assert!(text.contains("healthy"), "{status:#}");
}

#[test]
fn a_failed_health_gate_reverts_to_the_previous_commit() {
    let c = Cluster::new();
    c.commit("shop 1.0.0");
    assert_eq!(c.sluice(&["apply"]).code, 0);
    // 1.1.0 of web never becomes available.
    c.fake.fail_images("web:1.1.0");
    c.write("api/api.yaml", &api("1.1.0"));
    c.write("web/web.yaml", &web("1.1.0"));
    let bad = c.commit("shop 1.1.0");
    let out = c.sluice(&["apply"]);
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(out.all().contains("revert"), "{}", out.all());
    // Both touched waves are back on the last good commit.
    assert_eq!(c.image("web"), "registry.example.com/shop/web:1.0.0");
    assert_eq!(c.image("api"), "registry.example.com/shop/api:1.0.0");
    // The failed commit is not retried.
    let writes = c.applies().len();
    let out = c.sluice(&["apply"]);
    assert_ne!(out.code, 0, "{}", out.all());
    assert!(out.all().contains(&bad[..10]), "{}", out.all());
    assert_eq!(
        c.applies().len(),
        writes,
        "the failed commit was applied again"
    );
}

#[test]
fn prune_deletes_only_what_sluice_created_in_reverse_order() {
    let c = Cluster::new();
    c.write(
        "platform/extra.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: scratch\n---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: temp\n  annotations:\n    sluice.dev/prune: \"true\"\n",
    );
    c.commit("shop 1.0.0");
    assert_eq!(c.sluice(&["apply"]).code, 0);
    // Someone makes a ConfigMap by hand in the same namespace.
    c.fake.create(
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "hand-made", "namespace": "shop"}, "data": {"a": "b"}}),
        "kubectl-client-side-apply",
    );
    // The api service drops its ConfigMap and Service; the namespaces go.
    let api_yaml = api("1.0.0");
    let kept: Vec<&str> = api_yaml
        .split("---\n")
        .filter(|d| !d.contains("kind: ConfigMap") && !d.contains("kind: Service"))
        .collect();
    c.write("api/api.yaml", &kept.join("---\n"));
    std::fs::remove_file(c.repo().join("platform/extra.yaml")).unwrap();
    c.commit("drop api-config, the api Service and two namespaces");
    let out = c.sluice(&["apply"]);
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(c.object("", "configmaps", "shop", "api-config").is_none());
    assert!(c.object("", "services", "shop", "api").is_none());
    assert!(
        c.object("", "configmaps", "shop", "hand-made").is_some(),
        "pruned what sluice did not create"
    );
    // Namespaces are pruned only when annotated sluice.dev/prune: "true".
    assert!(c.object("", "namespaces", "", "scratch").is_some());
    assert!(c.object("", "namespaces", "", "temp").is_none());
    // Reverse kind order: the Service before the ConfigMap.
    let log = c.fake.log();
    let deleted = |suffix: &str| {
        log.iter()
            .position(|l| l.method == "DELETE" && l.path.ends_with(suffix))
            .unwrap()
    };
    assert!(deleted("/services/api") < deleted("/configmaps/api-config"));
    // An empty render prunes nothing.
    for f in ["platform/platform.yaml", "api/api.yaml", "web/web.yaml"] {
        c.write(f, "# nothing\n");
    }
    c.commit("empty everything");
    let out = c.sluice(&["apply"]);
    assert_eq!(out.code, 2, "{}", out.all());
    assert!(c.object("apps", "deployments", "shop", "web").is_some());
}

#[test]
fn drift_is_found_per_field_and_a_conflict_names_the_manager() {
    let c = Cluster::new();
    c.commit("shop 1.0.0");
    assert_eq!(c.sluice(&["apply"]).code, 0);
    // Someone scales web and changes the database password by hand.
    c.fake.edit(
        "apps",
        "deployments",
        "shop",
        "web",
        "kubectl",
        json!({"spec": {"replicas": 7}}),
    );
    c.fake.edit(
        "",
        "secrets",
        "shop",
        "api-db",
        "kubectl",
        json!({"data": {"password": "aGFuZC1tYWRl"}}),
    );
    let out = c.sluice(&["drift"]);
    let all = out.all();
    assert!(all.contains("spec.replicas"), "{all}");
    assert!(all.contains("data.password"), "{all}");
    assert!(
        !all.contains("CANARY") && !all.contains("aGFuZC1tYWRl") && !all.contains("hand-made"),
        "{all}"
    );
    // Server defaults are not drift.
    assert!(
        !all.contains("imagePullPolicy") && !all.contains("progressDeadlineSeconds"),
        "{all}"
    );

    // Re-applying would take spec.replicas from kubectl: refused, naming
    // the field and the manager, and the live system stays as it was.
    c.write("web/web.yaml", &web("1.0.1"));
    c.commit("web 1.0.1");
    let out = c.sluice(&["apply"]);
    assert_ne!(out.code, 0, "{}", out.all());
    assert!(
        out.all().contains(".spec.replicas") && out.all().contains("kubectl"),
        "{}",
        out.all()
    );
    assert_eq!(c.image("web"), "registry.example.com/shop/web:1.0.0");
    // With the opt-in annotation, sluice takes the field back.
    c.write(
        "web/web.yaml",
        &web("1.0.2").replacen(
            "  namespace: shop\n",
            "  namespace: shop\n  annotations:\n    sluice.dev/force-conflicts: \"true\"\n",
            1,
        ),
    );
    c.commit("web 1.0.2, force");
    let out = c.sluice(&["apply"]);
    assert_eq!(out.code, 0, "{}", out.all());
    let d = c.object("apps", "deployments", "shop", "web").unwrap();
    assert_eq!(d["spec"]["replicas"], 3);
    assert_eq!(c.image("web"), "registry.example.com/shop/web:1.0.2");
}

#[test]
fn bad_manifests_are_refused_by_the_api_server_before_anything_changes() {
    let c = Cluster::new();
    c.commit("shop 1.0.0");
    assert_eq!(c.sluice(&["apply"]).code, 0);
    // An unknown field (strict validation) and an invalid selector.
    c.write(
        "web/web.yaml",
        &web("2.0.0").replace("  replicas: 3\n", "  replicas: 3\n  surprise: true\n"),
    );
    c.write("api/api.yaml", &api("2.0.0"));
    c.commit("web with an unknown field");
    let out = c.sluice(&["apply"]);
    assert_ne!(out.code, 0, "{}", out.all());
    assert!(
        out.all()
            .contains(".spec.surprise: field not declared in schema"),
        "{}",
        out.all()
    );
    assert!(
        out.all().contains("web/web.yaml") || out.all().contains("apps/Deployment/shop/web"),
        "{}",
        out.all()
    );
    // Dry runs caught it: nothing was applied, not even api's wave.
    assert_eq!(c.image("api"), "registry.example.com/shop/api:1.0.0");
}
