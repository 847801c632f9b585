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

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{git, run_with_timeout, Output, Prometheus, SLUICE};
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
kind: ConfigMap
metadata:
  name: api-routes
  namespace: shop
data:
  ROUTES: /orders
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: api-limits
  namespace: shop
data:
  RATE: "100"
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

    /// `sluice <command>` on this repository and cluster, keeping its
    /// state in the folder `state` (one per agent replica).
    fn command(&self, command: &str, state: &str) -> Command {
        let mut cmd = Command::new(SLUICE);
        cmd.arg(command)
            .arg("--repo")
            .arg(self.repo())
            .arg("--state-dir")
            .arg(self.dir.path().join(state))
            .arg("--kubeconfig")
            .arg(self.dir.path().join("kubeconfig"))
            .env("HOME", self.dir.path());
        cmd
    }

    fn sluice(&self, args: &[&str]) -> Output {
        let mut cmd = self.command(args[0], "state");
        cmd.args(&args[1..]);
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
            .filter(|l| l.method == "PATCH" && !l.dry_run)
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
    // Three ConfigMaps in one namespace are read with one LIST.
    assert!(
        c.fake
            .log()
            .iter()
            .any(|l| l.method == "GET" && l.path == "/api/v1/namespaces/shop/configmaps"),
        "observe did not LIST"
    );
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
    // The plan tells deletes from releases: the unannotated Namespace is
    // kept, only dropped from the inventory.
    let plan = c.sluice(&["plan"]);
    assert!(
        plan.stdout
            .contains("5 to delete, 1 to release (kept, no longer managed)"),
        "{}",
        plan.all()
    );
    let plan = c.sluice(&["plan", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&plan.stdout).unwrap();
    let released: Vec<&str> = v["waves"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|w| w["changes"].as_array().unwrap())
        .filter(|ch| ch["action"] == "release")
        .filter_map(|ch| ch["id"]["name"].as_str())
        .collect();
    assert_eq!(released, ["scratch"], "{}", plan.stdout);
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
    // A delete that fails (RBAC here) keeps the object in the inventory:
    // the next apply tries again once it is allowed.
    c.fake.forbid("DELETE", "/deployments/web");
    std::fs::remove_dir_all(c.repo().join("web")).unwrap();
    let topo = TOPOLOGY.replace("  web:\n    path: web\n    dependsOn: [api]\n", "");
    c.write("sluice.yaml", &topo);
    c.commit("retire web");
    let out = c.sluice(&["apply"]);
    assert_ne!(out.code, 0, "{}", out.all());
    assert!(out.all().contains("forbidden"), "{}", out.all());
    assert!(c.object("apps", "deployments", "shop", "web").is_some());
    c.fake.allow_all();
    let out = c.sluice(&["apply", "--retry"]);
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(
        c.object("apps", "deployments", "shop", "web").is_none(),
        "the failed delete was forgotten"
    );
    // An empty render prunes nothing.
    for f in ["platform/platform.yaml", "api/api.yaml"] {
        c.write(f, "# nothing\n");
    }
    c.commit("empty everything");
    let out = c.sluice(&["apply"]);
    assert_eq!(out.code, 2, "{}", out.all());
    assert!(c.object("apps", "deployments", "shop", "api").is_some());
}

/// A kustomize folder on a machine without kubectl or kustomize: the
/// error says so and how to install them; nothing is applied.
#[test]
fn a_kustomize_folder_without_kustomize_says_how_to_install_it() {
    let c = Cluster::new();
    c.write("web/kustomization.yaml", "resources: [web.yaml]\n");
    c.commit("web as a kustomize folder");
    // git is there (every fetch runs it); kubectl and kustomize are not.
    let bin = c.dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let real_git = String::from_utf8(
        Command::new("sh")
            .args(["-c", "command -v git"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    std::os::unix::fs::symlink(real_git.trim(), bin.join("git")).unwrap();
    let mut cmd = c.command("apply", "state");
    cmd.env("PATH", &bin);
    let out = run_with_timeout(cmd, Duration::from_secs(60));
    assert_eq!(out.code, 2, "{}", out.all());
    assert!(
        out.all().contains("web/kustomization.yaml"),
        "{}",
        out.all()
    );
    assert!(out.all().contains("install kubectl"), "{}", out.all());
    assert!(
        c.fake.log().iter().all(|l| l.method != "PATCH"),
        "something was applied"
    );
}

#[test]
fn drift_is_found_per_field_and_a_conflict_names_the_manager() {
    let c = Cluster::new();
    c.write(
        "sluice.yaml",
        &TOPOLOGY.replace(
            "    dependsOn: [api]\n",
            "    dependsOn: [api]\n    drift: heal\n",
        ),
    );
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
    // Healing web would take spec.replicas from kubectl: the heal fails
    // visibly, naming the resource, the field and the other manager; exit 1.
    let out = c.sluice(&["drift", "--heal"]);
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(
        out.stderr.contains("apps/Deployment/shop/web not healed")
            && out.stderr.contains(".spec.replicas")
            && out.stderr.contains("kubectl"),
        "{}",
        out.all()
    );
    assert!(out.stdout.contains("(NOT healed: "), "{}", out.all());
    assert_eq!(
        c.object("apps", "deployments", "shop", "web").unwrap()["spec"]["replicas"],
        7
    );
    let status = c.sluice(&["status"]);
    assert!(
        status.stdout.contains("drift not healed"),
        "{}",
        status.all()
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
    // Caught at the dry run: nothing was written, so the commit is
    // rejected with its plan printed, exit 1, and nothing is reverted.
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(
        out.stdout.contains("Plan for")
            && out.stdout.contains("REJECTED before anything was written"),
        "{}",
        out.all()
    );
    let status = c.sluice(&["status", "-o", "json"]);
    let v: Value = serde_json::from_str(&status.stdout).unwrap();
    let kinds: Vec<(&str, &str)> = v["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["kind"].as_str().unwrap(), e["outcome"].as_str().unwrap()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("deploy", "succeeded"),
            ("heal", "failed"),
            ("deploy", "failed")
        ],
        "no revert: {}",
        status.stdout
    );
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

/// Against the fake (no real API server here), which stores a null
/// ConfigMap value as "" and refuses a boolean with a 500, as the recorded
/// kube-apiserver 1.28 does (fixtures 52a, 53a-53c).
#[test]
fn config_map_values_are_strings_at_render_and_nulls_converge() {
    let c = Cluster::new();
    c.commit("shop 1.0.0");
    assert_eq!(c.sluice(&["apply"]).code, 0);
    // A boolean: refused at render, naming file, line and key; nothing is
    // sent to the cluster.
    c.write(
        "api/api.yaml",
        &api("1.0.0").replace(
            "  LOG_LEVEL: info\n",
            "  LOG_LEVEL: info\n  enabled: true\n",
        ),
    );
    c.commit("a boolean in a ConfigMap");
    let before = c.fake.log().len();
    let out = c.sluice(&["plan"]);
    assert_eq!(out.code, 2, "{}", out.all());
    assert!(
        out.stderr.contains("api/api.yaml:8") && out.stderr.contains("`data.enabled`"),
        "{}",
        out.all()
    );
    assert!(
        out.stderr.contains("must be strings, not a boolean"),
        "{}",
        out.all()
    );
    assert_eq!(c.fake.log().len(), before, "the cluster was asked");
    // A null: applied as the server stores it, then nothing to do.
    c.write(
        "api/api.yaml",
        &api("1.0.0").replace("  LOG_LEVEL: info\n", "  LOG_LEVEL: info\n  EMPTY: ~\n"),
    );
    c.commit("a null in a ConfigMap");
    let out = c.sluice(&["apply"]);
    assert_eq!(out.code, 0, "{}", out.all());
    let cm = c.object("", "configmaps", "shop", "api-config").unwrap();
    assert_eq!(cm["data"]["EMPTY"], "");
    let plan = c.sluice(&["plan"]);
    assert!(plan.stdout.contains("No changes"), "{}", plan.all());
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

const CANARY_TOPOLOGY: &str = r#"apiVersion: sluice.dev/v1
kind: Topology
defaults:
  soak: 0s
  gateTimeout: 10s
targets:
  - name: cluster
    type: kubernetes
services:
  platform:
    path: platform
  orders:
    path: orders
    dependsOn: [platform]
    strategy: canary
    canary:
      steps: [50, 100]
      interval: 3s
    analysis:
      minRequests: 20
"#;

fn orders(version: &str) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: orders
  namespace: shop
spec:
  replicas: 2
  selector:
    matchLabels: {{app: orders}}
  template:
    metadata:
      labels: {{app: orders}}
    spec:
      containers:
      - name: orders
        image: registry.example.com/shop/orders:{version}
        resources:
          limits: {{memory: 64Mi}}
---
apiVersion: v1
kind: Service
metadata:
  name: orders
  namespace: shop
spec:
  selector: {{app: orders}}
  ports: [{{port: 80, targetPort: 8080}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: orders
  namespace: shop
spec:
  parentRefs: [{{name: shop-gateway}}]
  rules:
  - backendRefs:
    - {{name: orders, port: 80, weight: 100}}
"#
    )
}

impl Cluster {
    /// A cluster running only `orders` 1.0.0 behind its HTTPRoute, rolled
    /// out with `topology` (the Gateway API CRDs installed first).
    fn orders_only(topology: &str) -> Cluster {
        let c = Cluster::new();
        std::fs::remove_dir_all(c.repo().join("api")).unwrap();
        std::fs::remove_dir_all(c.repo().join("web")).unwrap();
        c.write("sluice.yaml", topology);
        c.write(
            "platform/platform.yaml",
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n",
        );
        c.write("orders/orders.yaml", &orders("1.0.0"));
        install_gateway_api(&c.fake);
        c.commit("orders 1.0.0");
        let out = c.sluice(&["apply"]);
        assert_eq!(out.code, 0, "{}", out.all());
        assert_eq!(backend_refs(&c), [("orders".to_string(), 100)]);
        c
    }
}

/// Installs the Gateway API v1.4.0 CRDs (the upstream YAML) into the fake,
/// as a cluster admin would before sluice manages routes.
fn install_gateway_api(fake: &Fake) {
    for file in ["gateways.yaml", "httproutes.yaml"] {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/gateway-api-v1.4.0")
            .join(file);
        let text = std::fs::read_to_string(path).unwrap();
        for doc in text.split("\n---\n") {
            let v: Value = serde_yaml::from_str(doc).unwrap();
            if v["kind"] == "CustomResourceDefinition" {
                fake.create(v, "kubectl");
            }
        }
    }
}

/// Stands in for a Gateway's data plane, which no test can run here:
/// every 20 ms it serves 10 requests split by the weights the HTTPRoute
/// `shop/orders` has in the (fake) cluster, fails each version's share
/// given in `error_rates`, and exposes the counters on /metrics under the
/// series sluice's Prometheus queries read (`sluice_router_*{route,
/// version}`, the names a recording rule would give a real gateway's).
struct Gateway {
    port: u16,
    error_rates: Arc<Mutex<BTreeMap<String, f64>>>,
    /// Every canary weight the route carried while traffic flowed.
    seen: Arc<Mutex<BTreeSet<u64>>>,
    stop: Arc<AtomicBool>,
}

impl Gateway {
    fn start(fake: Fake) -> Gateway {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let counters: Arc<Mutex<BTreeMap<String, (f64, f64)>>> = Arc::default();
        let error_rates: Arc<Mutex<BTreeMap<String, f64>>> = Arc::default();
        let seen: Arc<Mutex<BTreeSet<u64>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (counters, rates, seen, stop) = (
                counters.clone(),
                error_rates.clone(),
                seen.clone(),
                stop.clone(),
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(route) =
                        fake.get("gateway.networking.k8s.io", "httproutes", "shop", "orders")
                    {
                        let refs = route["spec"]["rules"][0]["backendRefs"]
                            .as_array()
                            .cloned()
                            .unwrap_or_default();
                        let total: f64 = refs
                            .iter()
                            .map(|r| r["weight"].as_f64().unwrap_or(1.0))
                            .sum();
                        let mut c = counters.lock().unwrap();
                        for r in &refs {
                            let name = r["name"].as_str().unwrap_or_default().to_string();
                            let w = r["weight"].as_f64().unwrap_or(1.0);
                            if name.ends_with("-canary") {
                                seen.lock().unwrap().insert(w as u64);
                            }
                            if total > 0.0 {
                                let n = 10.0 * w / total;
                                let rate =
                                    rates.lock().unwrap().get(&name).copied().unwrap_or(0.01);
                                let e = c.entry(name).or_default();
                                e.0 += n;
                                e.1 += n * rate;
                            }
                        }
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            });
        }
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut buf = [0u8; 2048];
                let _ = stream.read(&mut buf);
                let mut body = String::new();
                for (version, (requests, errors)) in counters.lock().unwrap().iter() {
                    let (r, e) = (requests.floor() as u64, errors.floor() as u64);
                    let l = format!("route=\"orders\",version=\"{version}\"");
                    body.push_str(&format!("sluice_router_requests_total{{{l}}} {r}\nsluice_router_errors_total{{{l}}} {e}\n"));
                    body.push_str(&format!("sluice_router_request_duration_seconds_bucket{{{l},le=\"0.025\"}} {r}\nsluice_router_request_duration_seconds_bucket{{{l},le=\"+Inf\"}} {r}\n"));
                }
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        Gateway {
            port,
            error_rates,
            seen,
            stop,
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn backend_refs(c: &Cluster) -> Vec<(String, u64)> {
    let route = c
        .object("gateway.networking.k8s.io", "httproutes", "shop", "orders")
        .unwrap();
    route["spec"]["rules"][0]["backendRefs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap().to_string(),
                r["weight"].as_u64().unwrap_or(1),
            )
        })
        .collect()
}

/// Canaries on Kubernetes: a Deployment and Service `orders-canary`,
/// HTTPRoute weights stepped 50 → 100, judged on metrics from a real
/// Prometheus; a good release is promoted, a bad one aborted with traffic
/// back on the baseline first.
#[test]
fn canaries_step_httproute_weights_and_are_judged_by_prometheus() {
    let c = Cluster::orders_only(CANARY_TOPOLOGY);
    let gateway = Gateway::start(c.fake.clone());
    let prom = Prometheus::start(&format!("127.0.0.1:{}", gateway.port));
    let url = format!("http://127.0.0.1:{}", prom.port);

    // A good release: promoted through 50% to 100%.
    c.write("orders/orders.yaml", &orders("2.0.0"));
    c.commit("orders 2.0.0");
    let out = c.sluice(&["apply", "--prometheus-url", &url]);
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(
        out.all().contains(&format!("prometheus at {url}")),
        "{}",
        out.all()
    );
    assert!(
        gateway.seen.lock().unwrap().contains(&50),
        "the canary never had 50%: {:?}",
        gateway.seen
    );
    assert_eq!(c.image("orders"), "registry.example.com/shop/orders:2.0.0");
    assert_eq!(backend_refs(&c), [("orders".to_string(), 100)]);
    assert!(c
        .object("apps", "deployments", "shop", "orders-canary")
        .is_none());
    assert!(c.object("", "services", "shop", "orders-canary").is_none());

    // A bad release: the canary fails 30% of its requests.
    gateway
        .error_rates
        .lock()
        .unwrap()
        .insert("orders-canary".into(), 0.3);
    c.write("orders/orders.yaml", &orders("3.0.0"));
    c.commit("orders 3.0.0");
    let out = c.sluice(&["apply", "--prometheus-url", &url]);
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(out.all().contains("error"), "{}", out.all());
    // Traffic back on the baseline, the canary gone, the baseline untouched.
    assert_eq!(backend_refs(&c), [("orders".to_string(), 100)]);
    assert!(c
        .object("apps", "deployments", "shop", "orders-canary")
        .is_none());
    assert_eq!(c.image("orders"), "registry.example.com/shop/orders:2.0.0");
    // The weights went back before the canary was deleted.
    let log = c.fake.log();
    let last_route = log
        .iter()
        .rposition(|l| l.method == "PATCH" && l.path.ends_with("/httproutes/orders"))
        .unwrap();
    let canary_deleted = log
        .iter()
        .rposition(|l| l.method == "DELETE" && l.path.ends_with("/deployments/orders-canary"))
        .unwrap();
    assert!(last_route < canary_deleted);
}

/// A `sluice run` replica with leader election, its log in a file.
struct Replica {
    child: std::process::Child,
    log: PathBuf,
}

impl Replica {
    fn start(c: &Cluster, name: &str) -> Replica {
        let log = c.dir.path().join(format!("{name}.log"));
        let child = c
            .command("run", &format!("state-{name}"))
            .args([
                "--interval",
                "1s",
                "--leader-elect",
                "--lease-namespace",
                "sluice-system",
            ])
            .args(["--lease-duration", "3s", "--listen"])
            .arg(format!("127.0.0.1:{}", common::free_port()))
            .env("POD_NAME", name)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Replica { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Two agent replicas: one leads and applies, the other waits; when the
/// leader dies (SIGKILL, no release), the follower takes over once the
/// Lease expires and applies the next commit.
#[test]
fn two_replicas_never_apply_at_once_and_the_follower_takes_over() {
    let c = Cluster::new();
    c.fake.create(
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "sluice-system"}}),
        "kubectl",
    );
    c.commit("shop 1.0.0");
    let lease = || {
        c.fake
            .get(
                "coordination.k8s.io",
                "leases",
                "sluice-system",
                "sluice-leader",
            )
            .map(|l| {
                (
                    l["spec"]["holderIdentity"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    l["spec"]["leaseTransitions"].as_i64().unwrap_or(0),
                )
            })
    };
    let mut a = Replica::start(&c, "agent-a");
    wait_for("agent-a to lead and apply", Duration::from_secs(30), || {
        c.object("apps", "deployments", "shop", "web").is_some()
    });
    assert_eq!(lease(), Some(("agent-a".to_string(), 0)));
    let b = Replica::start(&c, "agent-b");
    wait_for("agent-b to start waiting", Duration::from_secs(10), || {
        b.log().contains("waiting for the leader lease")
    });
    std::thread::sleep(Duration::from_secs(3));
    assert!(!b.log().contains("leading"), "two leaders:\n{}", b.log());
    assert_eq!(lease().unwrap().0, "agent-a");

    // The leader dies without releasing the Lease.
    let _ = a.child.kill();
    let _ = a.child.wait();
    c.write("web/web.yaml", &web("1.0.1"));
    c.commit("web 1.0.1");
    wait_for(
        "agent-b to take over and apply",
        Duration::from_secs(30),
        || c.image("web") == "registry.example.com/shop/web:1.0.1",
    );
    assert_eq!(lease(), Some(("agent-b".to_string(), 1)), "{}", b.log());
    assert!(
        b.log().contains("took over the leader lease"),
        "{}",
        b.log()
    );
    // b started from a's state, copied in the cluster: its history holds
    // a's deployment too, and its inventory the objects a created.
    assert!(
        b.log()
            .contains("restored the agent's state from the cluster"),
        "{}",
        b.log()
    );
    wait_for(
        "b's deployment in the copy",
        Duration::from_secs(10),
        || {
            c.object("", "configmaps", "sluice-system", "sluice-state")
                .and_then(|cm| {
                    cm["data"]["history.jsonl"]
                        .as_str()
                        .map(|h| h.lines().count())
                })
                .is_some_and(|n| n >= 2)
        },
    );
    let mut cmd = c.command("status", "state-agent-b");
    cmd.args(["-o", "json"]);
    let out = run_with_timeout(cmd, Duration::from_secs(60));
    let status: Value =
        serde_json::from_str(&out.stdout).unwrap_or_else(|_| panic!("{}", out.all()));
    let deploys = common::history_kinds(&status);
    assert!(
        deploys.len() >= 2,
        "b's history lost a's deployment: {deploys:?}"
    );
}

/// The repository becomes the README's Kubernetes example (its soak
/// shortened for the tests), and the cluster gets what its tenant.yaml
/// sets up, as a cluster admin would apply it: the account the example
/// names, its Roles and the Namespace.
fn use_the_example(c: &Cluster) {
    let tenant = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/kubernetes-shop/tenant.yaml");
    for doc in std::fs::read_to_string(tenant).unwrap().split("\n---\n") {
        let v: Value = serde_yaml::from_str(doc).unwrap();
        if v.is_object() {
            c.fake.create(v, "kubectl");
        }
    }
    for dir in ["platform", "api", "web"] {
        std::fs::remove_dir_all(c.repo().join(dir)).unwrap();
    }
    let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/kubernetes-shop");
    let out = Command::new("cp")
        .arg("-r")
        .arg(format!("{}/.", example.display()))
        .arg(c.repo())
        .output()
        .unwrap();
    assert!(out.status.success());
    std::fs::remove_file(c.repo().join("tenant.yaml")).unwrap();
    let topology = std::fs::read_to_string(c.repo().join("sluice.yaml")).unwrap();
    c.write("sluice.yaml", &topology.replace("soak: 10s", "soak: 0s"));
}

/// The example repository of the README rolls out against the fake, in
/// the documented waves (its soak shortened for the test).
#[test]
fn the_kubernetes_example_rolls_out_in_waves() {
    let c = Cluster::new();
    use_the_example(&c);
    install_gateway_api(&c.fake);
    c.commit("the example");
    let out = c.sluice(&["apply"]);
    assert_eq!(out.code, 0, "{}", out.all());
    let log = c.fake.log();
    let applied = |suffix: &str| {
        log.iter()
            .position(|l| {
                l.method == "PATCH" && !l.dry_run && l.path.ends_with(suffix) && l.status < 300
            })
            .unwrap_or_else(|| panic!("{suffix} never applied:\n{}", out.all()))
    };
    let ns = applied("/namespaces/shop");
    let catalog = applied("/deployments/catalog");
    let orders = applied("/deployments/orders");
    let web = applied("/deployments/web");
    let route = applied("/httproutes/orders");
    assert!(ns < catalog && catalog < orders && orders < web && route < web);
    // The kustomize folder's generated ConfigMap is there, hash and all.
    assert!(
        c.fake
            .names()
            .iter()
            .any(|n| n.starts_with("/configmaps/shop/catalog-config-")),
        "{:?}",
        c.fake.names()
    );
    let out = c.sluice(&["status"]);
    assert_eq!(out.code, 0, "{}", out.all());
    for service in ["platform", "gateway", "catalog", "orders", "web"] {
        assert!(out.stdout.contains(service), "{}", out.all());
    }
}

/// Applies manifests/ (rendered by the real `kubectl kustomize`) and the
/// `extra` files under it to the fake as its admin; the kinds applied.
fn install_manifests(c: &Cluster, extra: &[&str]) -> Vec<String> {
    let manifests = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../manifests");
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(&manifests)
        .output()
        .expect("kubectl (tests/run installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut text = String::from_utf8(out.stdout).unwrap();
    for f in extra {
        text.push_str("\n---\n");
        text.push_str(&std::fs::read_to_string(manifests.join(f)).unwrap());
    }
    let mut kinds = Vec::new();
    for doc in text.split("\n---\n") {
        let v: Value = serde_yaml::from_str(doc).unwrap();
        if v.is_object() {
            kinds.push(v["kind"].as_str().unwrap_or_default().to_string());
            c.fake.create(v, "kubectl");
        }
    }
    kinds
}

/// From here on sluice presents the token of the install's ServiceAccount.
fn as_the_agent(c: &Cluster) {
    let token = Fake::service_account_token("sluice-system", "sluice");
    std::fs::write(
        c.dir.path().join("kubeconfig"),
        c.fake.kubeconfig_with_token(&["cluster"], &token),
    )
    .unwrap();
}

/// A team's service written as the team's ServiceAccount: allowed in its
/// namespace, refused outside it with the server's message and nothing
/// written. Against the fake with RBAC and impersonation (no real API
/// server here), answering as the recorded 1.28 server does (fixtures
/// 60a, 60b).
#[test]
fn a_tenant_service_is_written_as_its_service_account_and_kept_to_its_namespace() {
    let c = Cluster::new();
    install_manifests(&c, &[]);
    for ns in ["team-a", "team-b"] {
        c.fake.create(
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
            "kubectl",
        );
    }
    c.fake.create(
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "sluice-deployer", "namespace": "team-a"}}),
        "kubectl",
    );
    c.fake.create(
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
               "metadata": {"name": "sluice-deployer", "namespace": "team-a"},
               "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "create", "patch", "update", "delete"]}]}),
        "kubectl",
    );
    c.fake.create(
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": {"name": "sluice-deployer", "namespace": "team-a"},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "sluice-deployer"},
               "subjects": [{"kind": "ServiceAccount", "name": "sluice-deployer", "namespace": "team-a"}]}),
        "kubectl",
    );
    as_the_agent(&c);
    for dir in ["platform", "api", "web"] {
        std::fs::remove_dir_all(c.repo().join(dir)).unwrap();
    }
    c.write(
        "sluice.yaml",
        "apiVersion: sluice.dev/v1\nkind: Topology\ndefaults:\n  soak: 0s\n  gateTimeout: 4s\ntargets:\n  - name: cluster\n    type: kubernetes\nservices:\n  team-a:\n    path: team-a\n    serviceAccountName: team-a/sluice-deployer\n",
    );
    let cm = |ns: &str| {
        format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\n  namespace: {ns}\ndata:\n  mode: fast\n")
    };
    c.write("team-a/settings.yaml", &cm("team-a"));
    c.commit("team a's settings");
    let out = c.sluice(&["apply"]);
    assert_eq!(out.code, 0, "{}", out.all());
    let live = c
        .object("", "configmaps", "team-a", "settings")
        .expect("applied");
    assert_eq!(live["data"]["mode"], "fast");
    // The same service writing into another team's namespace: refused
    // already when sluice reads it as the account, naming the account;
    // nothing written, no revert.
    c.write("team-a/intruder.yaml", &cm("team-b"));
    c.commit("team a writes into team b");
    let out = c.sluice(&["apply"]);
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(
        out.all().contains(
            "User \"system:serviceaccount:team-a:sluice-deployer\" cannot get resource \"configmaps\" in API group \"\" in the namespace \"team-b\""
        ) && out.all().contains("ServiceAccount team-a/sluice-deployer"),
        "{}",
        out.all()
    );
    assert!(!out.all().contains("revert"), "{}", out.all());
    assert!(c.object("", "configmaps", "team-b", "settings").is_none());
}

/// The default install applies the Kubernetes example: manifests/
/// (rendered by the real `kubectl kustomize`) and the example's
/// tenant.yaml are applied to the fake as its admin, then sluice runs with
/// the token of `sluice-system/sluice`, which may write nothing itself and
/// acts as the account the example names. A kind that account's Role
/// lacks is refused before anything is written, naming the kind, the
/// account and the rule to add. Against the fake with RBAC and
/// impersonation (no real API server here), which authorises as the
/// recorded kube-apiserver 1.28 does (fixtures 51a-51f, 60a-b).
#[test]
fn the_shipped_service_account_applies_the_example_and_a_missing_rule_is_named() {
    let c = Cluster::new();
    let kinds = install_manifests(&c, &[]);
    assert!(kinds.iter().any(|k| k == "ClusterRoleBinding"), "{kinds:?}");
    install_gateway_api(&c.fake);
    as_the_agent(&c);
    use_the_example(&c);
    c.commit("the example");
    let out = c.sluice(&["apply"]);
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(c.object("apps", "deployments", "shop", "web").is_some());
    assert!(c
        .object("gateway.networking.k8s.io", "httproutes", "shop", "orders")
        .is_some());
    // Nothing was refused but LISTs of Namespaces (the account may read
    // only its own, by name: a health watch on it falls back to polling).
    let refused: Vec<String> = c
        .fake
        .log()
        .iter()
        .filter(|l| l.status == 403 && !(l.method == "GET" && l.path == "/api/v1/namespaces"))
        .map(|l| format!("{} {}", l.method, l.path))
        .collect();
    assert!(refused.is_empty(), "{refused:?}\n{}", out.all());
    // sluice itself may not even read what it deployed.
    let own = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
        .get(format!("{}/api/v1/namespaces/shop/secrets", c.fake.url()))
        .bearer_auth(Fake::service_account_token("sluice-system", "sluice"))
        .send()
        .unwrap()
        .status()
        .as_u16();
    assert_eq!(own, 403);
    // A kind the account's Role lacks (a Lease): refused before anything
    // is written, naming the kind, the account and the rule to add.
    c.write(
        "services/platform/lease.yaml",
        "apiVersion: coordination.k8s.io/v1\nkind: Lease\nmetadata:\n  name: team-lock\n  namespace: shop\nspec:\n  holderIdentity: nobody\n",
    );
    c.commit("a lease in shop");
    let out = c.sluice(&["apply"]);
    assert_eq!(out.code, 1, "{}", out.all());
    let all = out.all();
    assert!(
        all.contains("leases.coordination.k8s.io \"team-lock\" is forbidden")
            && all.contains("ServiceAccount shop/sluice-deployer")
            && all.contains("resources: [\"leases\"]")
            && all.contains("apiGroups: [\"coordination.k8s.io\"]"),
        "{all}"
    );
    assert!(c
        .object("coordination.k8s.io", "leases", "shop", "team-lock")
        .is_none());
}

/// The opt-in wide role (manifests/optional/cluster-wide.yaml) lets a
/// repository that names no account deploy as sluice itself: the example
/// without its serviceAccountName applies with the install's token.
#[test]
fn the_opt_in_cluster_wide_role_applies_the_example_as_sluice_itself() {
    let c = Cluster::new();
    install_manifests(&c, &["optional/cluster-wide.yaml"]);
    install_gateway_api(&c.fake);
    as_the_agent(&c);
    use_the_example(&c);
    let topology = std::fs::read_to_string(c.repo().join("sluice.yaml")).unwrap();
    c.write(
        "sluice.yaml",
        &topology.replace("    serviceAccountName: shop/sluice-deployer\n", ""),
    );
    c.commit("the example, as sluice itself");
    let out = c.sluice(&["apply"]);
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(c.object("apps", "deployments", "shop", "web").is_some());
    assert!(
        c.fake.log().iter().all(|l| l.status != 403),
        "{}",
        out.all()
    );
}

/// A crash (SIGKILL) in the middle of a canary on Kubernetes: the next
/// apply converges to a whole commit's state. With no metrics source the
/// canary cannot pass, so that is the last good commit: all traffic on
/// `orders`, the canary Deployment and Service gone, the old image live.
#[test]
fn a_crash_mid_canary_converges_to_a_whole_commit() {
    let c = Cluster::orders_only(&CANARY_TOPOLOGY.replace("interval: 3s", "interval: 4s"));
    c.write("orders/orders.yaml", &orders("2.0.0"));
    c.commit("orders 2.0.0");
    let mut cmd = c.command("apply", "state");
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut child = cmd.spawn().unwrap();
    wait_for("the canary at 50%", Duration::from_secs(30), || {
        backend_refs(&c).contains(&("orders-canary".to_string(), 50))
    });
    child.kill().unwrap();
    let _ = child.wait();
    assert!(c
        .object("apps", "deployments", "shop", "orders-canary")
        .is_some());

    let out = c.sluice(&["apply"]);
    assert_eq!(out.code, 1, "{}", out.all());
    assert_eq!(
        backend_refs(&c),
        [("orders".to_string(), 100)],
        "{}",
        out.all()
    );
    assert!(c
        .object("apps", "deployments", "shop", "orders-canary")
        .is_none());
    assert!(c.object("", "services", "shop", "orders-canary").is_none());
    assert_eq!(c.image("orders"), "registry.example.com/shop/orders:1.0.0");
    let out = c.sluice(&["status", "-o", "json"]);
    let status: Value = serde_json::from_str(&out.stdout).unwrap();
    assert!(
        status.to_string().contains("reverted") || status.to_string().contains("failed"),
        "{status:#}"
    );
}

/// Blue-green on Kubernetes: the route switches all traffic to the new
/// version at once; the new version is judged against what the old one
/// served before the switch. A bad one gets the traffic switched back.
#[test]
fn bluegreen_switches_the_route_at_once_and_back_on_failure() {
    let topology = CANARY_TOPOLOGY
        .replace("strategy: canary", "strategy: bluegreen\n    keepWarm: 1s")
        .replace(
            "    canary:\n      steps: [50, 100]\n      interval: 3s\n",
            "    canary:\n      interval: 3s\n",
        );
    let c = Cluster::orders_only(&topology);
    let gateway = Gateway::start(c.fake.clone());
    let prom = Prometheus::start(&format!("127.0.0.1:{}", gateway.port));
    let url = format!("http://127.0.0.1:{}", prom.port);
    // Let the blue version serve a baseline first.
    std::thread::sleep(Duration::from_secs(3));

    c.write("orders/orders.yaml", &orders("2.0.0"));
    c.commit("orders 2.0.0");
    let out = c.sluice(&["apply", "--prometheus-url", &url]);
    assert_eq!(out.code, 0, "{}", out.all());
    // All at once: the only canary weight the route ever had is 100.
    let seen: Vec<u64> = gateway
        .seen
        .lock()
        .unwrap()
        .iter()
        .copied()
        .filter(|w| *w > 0)
        .collect();
    assert_eq!(seen, [100], "{}", out.all());
    assert_eq!(c.image("orders"), "registry.example.com/shop/orders:2.0.0");
    assert_eq!(backend_refs(&c), [("orders".to_string(), 100)]);
    assert!(c
        .object("apps", "deployments", "shop", "orders-canary")
        .is_none());

    gateway
        .error_rates
        .lock()
        .unwrap()
        .insert("orders-canary".into(), 0.3);
    c.write("orders/orders.yaml", &orders("3.0.0"));
    c.commit("orders 3.0.0");
    let out = c.sluice(&["apply", "--prometheus-url", &url]);
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(out.all().contains("error-rate"), "{}", out.all());
    assert_eq!(backend_refs(&c), [("orders".to_string(), 100)]);
    assert!(c
        .object("apps", "deployments", "shop", "orders-canary")
        .is_none());
    assert_eq!(c.image("orders"), "registry.example.com/shop/orders:2.0.0");
}

/// Writes a Deployment's rolled-out status as the deployment controller
/// would (through the status subresource, fixture 58d).
fn roll_out(c: &Cluster, name: &str) {
    let d = c
        .object("apps", "deployments", "shop", name)
        .expect("deployment");
    let replicas = d["spec"]["replicas"].as_i64().unwrap_or(1);
    c.fake.edit(
        "apps",
        "deployments",
        "shop",
        name,
        "kube-controller-manager",
        json!({"status": {"observedGeneration": d["metadata"]["generation"], "replicas": replicas,
            "updatedReplicas": replicas, "readyReplicas": replicas, "availableReplicas": replicas,
            "conditions": [{"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"},
                           {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"}]}}),
    );
}

/// Requests about one Deployment: (GETs and LISTs, WATCHes).
fn reads_of(c: &Cluster, name: &str, from: usize) -> (usize, usize) {
    let log = c.fake.log();
    let reads = log[from..]
        .iter()
        .filter(|l| {
            l.method == "GET"
                && !l.watch
                && (l.path.ends_with(&format!("/deployments/{name}"))
                    || l.path.ends_with("/deployments"))
        })
        .count();
    let watches = log[from..]
        .iter()
        .filter(|l| l.watch && l.path.ends_with("/deployments"))
        .count();
    (reads, watches)
}

/// Health gates on Kubernetes wait on a WATCH from the version their
/// observe saw, not on a poll: a Deployment that becomes available while
/// its gate waits wakes the gate at once, a soak costs one quiet watch,
/// and a Deployment that never becomes available fails at `gateTimeout`
/// (the time to become healthy; the soak comes after). No controller
/// runs in the fake here: the test writes the rolled-out status itself.
#[test]
fn health_gates_wait_on_watches_and_time_out_at_the_gate_timeout() {
    let c = Cluster::new();
    c.write(
        "sluice.yaml",
        &TOPOLOGY
            .replace("soak: 0s", "soak: 3s")
            .replace("gateTimeout: 4s", "gateTimeout: 60s"),
    );
    c.commit("shop 1.0.0");
    c.fake.controllers(false);
    let agent = c.command("apply", "state");
    let child = std::thread::spawn(move || run_with_timeout(agent, Duration::from_secs(120)));
    for name in ["api", "web"] {
        wait_for(name, Duration::from_secs(30), || {
            c.object("apps", "deployments", "shop", name).is_some()
        });
        // Not available for 3 s: a poll backing off from 100 ms would
        // read it 5 or 6 times by then; the gate reads it, lists it for a
        // version and watches from there.
        std::thread::sleep(Duration::from_secs(3));
        let log = c.fake.log();
        let from = log
            .iter()
            .rposition(|l| l.method == "PATCH" && l.path.ends_with(&format!("/deployments/{name}")))
            .unwrap();
        let (reads, watches) = reads_of(&c, name, from);
        assert!(watches >= 1, "{name}: no watch while waiting");
        assert!(reads <= 3, "{name}: {reads} reads while waiting for it");
        roll_out(&c, name);
    }
    let out = child.join().unwrap();
    assert_eq!(out.code, 0, "{}", out.all());
    // web's gate woke on the status change, then soaked 3 s on one quiet
    // watch: a few reads in 6 s, where a poll would have made about ten.
    let log = c.fake.log();
    let from = log
        .iter()
        .rposition(|l| l.method == "PATCH" && l.path.ends_with("/deployments/web"))
        .unwrap();
    let (reads, watches) = reads_of(&c, "web", from);
    assert!(watches >= 2, "{watches} watches");
    assert!(
        reads <= 6,
        "{reads} reads of web during its gate: {:#?}",
        log[from..]
            .iter()
            .map(|l| format!("{} {} {} {}", l.method, l.path, l.status, l.watch))
            .collect::<Vec<_>>()
    );

    // Never available: the gate fails at gateTimeout (2 s), not later.
    c.write(
        "sluice.yaml",
        &TOPOLOGY
            .replace("soak: 0s", "soak: 30s")
            .replace("gateTimeout: 4s", "gateTimeout: 2s"),
    );
    c.write("web/web.yaml", &web("1.1.0"));
    c.commit("web 1.1.0");
    let from = c.fake.log().len();
    let out = c.sluice(&["apply"]);
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(
        out.all().contains("healthy within 2s (gateTimeout)"),
        "{}",
        out.all()
    );
    assert!(!out.all().contains("not decided in time"), "{}", out.all());
    let (_, watches) = reads_of(&c, "web", from);
    assert!(watches >= 1, "no watch while waiting for web 1.1.0");
    assert_eq!(c.image("web"), "registry.example.com/shop/web:1.0.0");
}

/// The crash-point harness on the Kubernetes target, against the fake API
/// server: a release of api and web (two waves), then for every write N
/// of the store, the same kind of release killed right after write N
/// (`SLUICE_CRASH_AFTER_WRITE`, as kill -9 would leave it) and a plain
/// `apply` to restart. `failing`: web's new image never becomes available,
/// so the gate fails and both waves are reverted. After each kill point:
/// both Deployments run one commit's image, nothing is in progress, and
/// each deploy and revert is in the history exactly once. Returns the
/// number of kill points.
fn kube_kill_after_each_write(failing: bool) -> usize {
    let c = Cluster::new();
    c.write(
        "sluice.yaml",
        &TOPOLOGY.replace("gateTimeout: 4s", "gateTimeout: 1s"),
    );
    c.commit("shop 1.0.0");
    assert_eq!(c.sluice(&["apply"]).code, 0);
    let mut crashed_at = Vec::new();
    for n in 1..200u32 {
        let version = format!("2.0.{n}");
        if failing {
            c.fake.fail_images(&format!("web:{version}"));
        }
        c.write("api/api.yaml", &api(&version));
        c.write("web/web.yaml", &web(&version));
        c.commit(&format!("release {version}"));
        let mut cmd = c.command("apply", "state");
        cmd.env("SLUICE_CRASH_AFTER_WRITE", n.to_string());
        let out = run_with_timeout(cmd, Duration::from_secs(120));
        let crashed = !matches!(out.code, 0..=2);
        if crashed {
            crashed_at.push(n);
            let again = c.sluice(&["apply"]);
            assert!(
                matches!(again.code, 0 | 1),
                "after write {n}: {}",
                again.all()
            );
        } else {
            assert_eq!(
                out.code,
                i32::from(failing),
                "write {n} is past the last: {}",
                out.all()
            );
        }
        let want = if failing { "1.0.0" } else { version.as_str() };
        for name in ["api", "web"] {
            assert_eq!(
                c.image(name),
                format!("registry.example.com/shop/{name}:{want}"),
                "{name} after a kill at write {n}"
            );
        }
        let status = c.sluice(&["status", "-o", "json"]);
        let v: Value = serde_json::from_str(&status.stdout).unwrap();
        assert!(
            v["inProgress"].is_null(),
            "after write {n}: {}",
            status.stdout
        );
        let history = v["history"].as_array().unwrap();
        let count = |kind: &str, outcome: &str| {
            history
                .iter()
                .filter(|e| e["kind"] == kind && e["outcome"] == outcome)
                .count()
        };
        let n = n as usize;
        let want = if failing { (n, n, 1) } else { (0, 0, n + 1) };
        assert_eq!(
            (
                count("deploy", "failed"),
                count("revert", "succeeded"),
                count("deploy", "succeeded")
            ),
            want,
            "after write {n}: {}",
            status.stdout
        );
        if !crashed {
            break;
        }
    }
    assert!(
        crashed_at.len() >= 5,
        "too few store writes: {crashed_at:?}"
    );
    crashed_at.len()
}

#[test]
fn a_kubernetes_rollout_killed_after_each_store_write_converges() {
    let good = kube_kill_after_each_write(false);
    let failing = kube_kill_after_each_write(true);
    eprintln!(
        "kubernetes: good release {good}, failing release {failing} kill points, all converged"
    );
}

/// A lost store on Kubernetes: with state.json deleted, the next apply
/// rebuilds the inventory from the labels sluice put on what it applied
/// (one LIST per kind), so a ConfigMap the new commit removes is still
/// pruned, and an object someone else made is not touched.
#[test]
fn a_lost_store_is_rebuilt_from_the_inventory_labels() {
    let c = Cluster::new();
    c.commit("shop 1.0.0");
    assert_eq!(c.sluice(&["apply"]).code, 0);
    c.fake.create(
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "theirs", "namespace": "shop"}, "data": {"a": "b"}}),
        "kubectl",
    );
    std::fs::remove_file(c.dir.path().join("state/state.json")).unwrap();
    let api = std::fs::read_to_string(c.repo().join("api/api.yaml")).unwrap();
    let without: Vec<&str> = api
        .split("\n---\n")
        .filter(|d| !d.contains("name: api-limits"))
        .collect();
    c.write("api/api.yaml", &without.join("\n---\n"));
    c.commit("no api-limits");
    let out = c.sluice(&["apply"]);
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(
        out.all().contains("inventory rebuilt from the marks"),
        "{}",
        out.all()
    );
    assert!(
        c.object("", "configmaps", "shop", "api-limits").is_none(),
        "not pruned: {}",
        out.all()
    );
    assert!(c.object("", "configmaps", "shop", "theirs").is_some());
    assert!(c.object("", "configmaps", "shop", "api-config").is_some());
}
