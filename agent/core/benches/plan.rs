//! Render + guardrails + plan of 4,000 host resources and of 4,000
//! Kubernetes objects (about 4 MB of YAML) against an empty live state,
//! with the shipped policy pack: wall time per stage and peak RSS, with
//! and without `RUST_BACKTRACE=1`; then the same policies over the same
//! inputs in a real OPA (the PyPI package `opa-golib-python-bindings`,
//! OPA's Go engine behind ctypes), microseconds per resource for both, and
//! whether every finding agrees.
//!
//! `cargo bench -p sluice-core --bench plan`. Prints figures; asserts
//! nothing about speed (machines differ). Each configuration runs in its
//! own process, so its peak RSS is its own.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::{Duration, Instant};

use sluice_core::guard::{self, Input};
use sluice_core::plan::{plan, Inventory};
use sluice_core::render::render;
use sluice_core::source::{CommitId, FileEntry, Revision, Snapshot};

const RESOURCES: usize = 4000;
const RUNS: usize = 7;

fn blob(s: String) -> FileEntry {
    FileEntry::Blob {
        data: s.into_bytes(),
        executable: false,
    }
}

fn snapshot(files: BTreeMap<String, FileEntry>) -> Snapshot {
    Snapshot {
        revision: Revision {
            commit: CommitId::parse(&"e".repeat(40)).unwrap(),
            time: 0,
            summary: "bench".into(),
        },
        files,
    }
}

/// 40 services in a dependency chain, 100 host resources each: Processes
/// and Files, one multi-document file per service.
fn host_repository() -> Snapshot {
    let services = RESOURCES / 100;
    let mut files = BTreeMap::new();
    let mut topo = String::from("apiVersion: sluice.dev/v1\nkind: Topology\ntargets:\n  - name: local\n    type: host\nservices:\n");
    for s in 0..services {
        topo.push_str(&format!("  svc-{s}:\n    path: svc-{s}\n"));
        if s > 0 {
            topo.push_str(&format!("    dependsOn: [svc-{}]\n", s - 1));
        }
        let docs: Vec<String> = (0..100)
            .map(|r| {
                if r % 2 == 0 {
                    format!("apiVersion: sluice.dev/v1\nkind: Process\nmetadata:\n  name: p-{s}-{r}\nspec:\n  command: /bin/sleep\n  args: [\"1000\"]\n  version: \"1.{r}\"\n  env:\n    A: \"1\"\n    B: \"2\"\n  readiness:\n    tcp: true\n")
                } else {
                    format!("apiVersion: sluice.dev/v1\nkind: File\nmetadata:\n  name: f-{s}-{r}\nspec:\n  path: s{s}/f{r}.conf\n  content: |\n    key = value-{r}\n    version = 1\n")
                }
            })
            .collect();
        files.insert(format!("svc-{s}/all.yaml"), blob(docs.join("---\n")));
    }
    files.insert("sluice.yaml".into(), blob(topo));
    snapshot(files)
}

/// 100 services in 10 namespaces, each 10 Deployments with their Service,
/// ConfigMap and PodDisruptionBudget: 4,000 objects, about 4 MB of YAML.
/// Every tenth Deployment breaks a shipped guardrail, so there are
/// findings to compare.
fn kube_repository() -> (Snapshot, usize) {
    let services = RESOURCES / 40;
    let mut files = BTreeMap::new();
    let mut bytes = 0;
    let mut topo = String::from("apiVersion: sluice.dev/v1\nkind: Topology\ntargets:\n  - name: prod\n    type: kubernetes\nservices:\n");
    for s in 0..services {
        topo.push_str(&format!("  svc-{s:03}:\n    path: svc-{s:03}\n"));
        let ns = format!("team-{}", s % 10);
        let mut docs = Vec::new();
        for d in 0..10 {
            let name = format!("service-number-{s:03}-{d}");
            let (image, limits) = if d == 9 {
                ("nginx".to_string(), "{cpu: 500m}".to_string())
            } else {
                (
                    format!("registry.example.com/shop/{name}:1.4.{d}"),
                    "{cpu: 500m, memory: 256Mi}".to_string(),
                )
            };
            docs.push(format!(
                r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: {name}
  namespace: {ns}
  labels:
    app.kubernetes.io/name: {name}
    app.kubernetes.io/part-of: shop
    team: payments
spec:
  replicas: 3
  revisionHistoryLimit: 5
  selector:
    matchLabels:
      app.kubernetes.io/name: {name}
  template:
    metadata:
      labels:
        app.kubernetes.io/name: {name}
        app.kubernetes.io/part-of: shop
    spec:
      serviceAccountName: {name}
      containers:
        - name: app
          image: {image}
          args: ["--port=8080", "--log-level=info"]
          ports:
            - name: http
              containerPort: 8080
          env:
            - name: LOG_FORMAT
              value: json
            - name: REGION
              value: eu-west-1
          resources:
            requests: {{cpu: 100m, memory: 128Mi}}
            limits: {limits}
          readinessProbe:
            httpGet: {{path: /healthz, port: http}}
            periodSeconds: 5
          securityContext:
            runAsNonRoot: true
            readOnlyRootFilesystem: true
            allowPrivilegeEscalation: false
"#
            ));
            docs.push(format!("apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels:\n    app.kubernetes.io/name: {name}\nspec:\n  selector:\n    app.kubernetes.io/name: {name}\n  ports:\n    - name: http\n      port: 80\n      targetPort: http\n"));
            let settings: String = (0..40)
                .map(|k| format!("    setting.{k}: \"value-{k}-for-{name}\"\n"))
                .collect();
            docs.push(format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}-config\n  namespace: {ns}\ndata:\n  LOG_LEVEL: info\n  FEATURES: \"search,checkout,recommendations\"\n  config.properties: |\n{settings}"));
            docs.push(format!("apiVersion: policy/v1\nkind: PodDisruptionBudget\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  minAvailable: 2\n  selector:\n    matchLabels:\n      app.kubernetes.io/name: {name}\n"));
        }
        let text = docs.join("---\n");
        bytes += text.len();
        files.insert(format!("svc-{s:03}/all.yaml"), blob(text));
    }
    files.insert("sluice.yaml".into(), blob(topo));
    (snapshot(files), bytes)
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .unwrap_or("0")
                    .parse()
                    .unwrap_or(0)
            })
        })
        .unwrap_or(0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The plan against an empty live system.
fn plan_all_new(rendered: &sluice_core::render::Rendered) -> sluice_core::plan::Plan {
    plan(
        &rendered.topology,
        &rendered.desired,
        &BTreeMap::new(),
        &Inventory::new(),
    )
    .expect("plan")
}

/// One configuration, in this process: RUNS reconciles of the same commit
/// (the compiled pack cached after the first, as across reconciles).
fn child(kind: &str) {
    let (snap, yaml_bytes) = match kind {
        "host" => (host_repository(), 0),
        _ => kube_repository(),
    };
    let (mut render_ms, mut plan_ms, mut guard_ms, mut total_ms) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut compile_ms = 0.0;
    let mut n = 0;
    let mut findings = 0;
    for run in 0..RUNS {
        let t0 = Instant::now();
        let rendered = render(&snap).expect("render");
        let t1 = Instant::now();
        let p = plan_all_new(&rendered);
        let t2 = Instant::now();
        let pack = guard::Pack::load(&snap, &rendered.topology.policies).expect("pack");
        let compiled = pack.compile().expect("compile");
        if run == 0 {
            compile_ms = ms(t2.elapsed());
        }
        let report = guard::evaluate(&compiled, &Input::new(&rendered, &p)).expect("guard");
        let t3 = Instant::now();
        n = rendered.desired.resources.len();
        findings = report.findings.len();
        render_ms.push(ms(t1 - t0));
        plan_ms.push(ms(t2 - t1));
        guard_ms.push(ms(t3 - t2));
        total_ms.push(ms(t3 - t0));
    }
    let min_total = total_ms.iter().copied().fold(f64::MAX, f64::min);
    println!(
        "{{\"resources\": {n}, \"yaml\": {yaml_bytes}, \"findings\": {findings}, \"render\": {:.1}, \"plan\": {:.1}, \"guard\": {:.1}, \"total\": {:.1}, \"min\": {min_total:.1}, \"compile\": {compile_ms:.1}, \"rss\": {:.1}}}",
        median(render_ms),
        median(plan_ms),
        median(guard_ms),
        median(total_ms),
        peak_rss_kib() as f64 / 1024.0
    );
}

/// The inputs of one repository as OPA will see them, and sluice's
/// findings as (input index, rule, message) triples.
fn sluice_findings(snap: &Snapshot) -> (serde_json::Value, BTreeSet<(usize, String, String)>, f64) {
    let rendered = render(snap).expect("render");
    let p = plan_all_new(&rendered);
    let pack = guard::Pack::shipped();
    let compiled = pack.compile().expect("compile");
    let input = Input::new(&rendered, &p);
    // One thread, so microseconds per resource compare with OPA's one.
    let t = Instant::now();
    let report = guard::evaluate_with(&compiled, &input, 1).expect("guard");
    let us = t.elapsed().as_secs_f64() * 1e6 / input.documents.len() as f64;
    let index: BTreeMap<&str, usize> = input
        .documents
        .iter()
        .enumerate()
        .map(|(i, d)| (d.resource.as_str(), i))
        .collect();
    let all: BTreeSet<(usize, String, String)> = report
        .findings
        .into_iter()
        .map(|f| (index[f.resource.as_str()], f.rule, f.message))
        .collect();
    let docs: Vec<serde_json::Value> = input
        .documents
        .iter()
        .map(|d| serde_json::json!({ "doc": d.body.as_ref(), "ctx": input.context_json(d) }))
        .collect();
    let modules: Vec<serde_json::Value> = pack
        .modules
        .iter()
        .map(|m| serde_json::json!({ "path": m.path, "source": m.source }))
        .collect();
    (
        serde_json::json!({ "modules": modules, "plan": input.plan_json(), "inputs": docs }),
        all,
        us,
    )
}

fn compare_with_opa(name: &str, snap: &Snapshot) {
    let (job, ours, our_us) = sluice_findings(snap);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("job.json");
    std::fs::write(&path, serde_json::to_vec(&job).unwrap()).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/opa_compare.py");
    let out = Command::new("python3").arg(script).arg(&path).output();
    let out = match out {
        Ok(o) if o.status.success() => o,
        Ok(o) => {
            println!(
                "  {name}: OPA comparison skipped: {}",
                String::from_utf8_lossy(&o.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            );
            return;
        }
        Err(e) => {
            println!("  {name}: OPA comparison skipped: python3: {e}");
            return;
        }
    };
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("opa_compare output");
    let theirs: BTreeSet<(usize, String, String)> = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f[0].as_u64().unwrap() as usize,
                f[1].as_str().unwrap().to_string(),
                f[2].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let inputs = job["inputs"].as_array().map_or(0, Vec::len);
    let differ: BTreeSet<usize> = ours
        .symmetric_difference(&theirs)
        .map(|(i, _, _)| *i)
        .collect();
    let call = v["us_per_input"].as_f64().unwrap_or(0.0);
    let binding = v["binding_us_per_input"].as_f64().unwrap_or(0.0);
    println!(
        "  {name}: {inputs} inputs; sluice {our_us:.1} µs/resource (one thread); OPA {:.1} µs/resource ({call:.1} per call less {binding:.1} the binding costs with no query; {}); findings: sluice {}, OPA {}; inputs whose findings differ: {}",
        call - binding,
        v["opa"].as_str().unwrap_or("OPA"),
        ours.len(),
        theirs.len(),
        differ.len()
    );
    for i in differ.iter().take(3) {
        let a: Vec<_> = ours.iter().filter(|f| f.0 == *i).collect();
        let b: Vec<_> = theirs.iter().filter(|f| f.0 == *i).collect();
        println!("    input {i}: sluice {a:?}\n             OPA {b:?}");
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--child") {
        child(&args[i + 1]);
        return;
    }
    let exe = std::env::current_exe().expect("own path");
    println!(
        "render + guardrails + plan against an empty live state, shipped policy pack, median of {RUNS} reconciles ({} cores)",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    for kind in ["host", "kube"] {
        for backtrace in [false, true] {
            let mut cmd = Command::new(&exe);
            cmd.args(["--child", kind]).env_remove("RUST_LIB_BACKTRACE");
            if backtrace {
                cmd.env("RUST_BACKTRACE", "1");
            } else {
                cmd.env_remove("RUST_BACKTRACE");
            }
            let out = cmd.output().expect("child run");
            let line = String::from_utf8_lossy(&out.stdout);
            let v: serde_json::Value = match serde_json::from_str(line.trim()) {
                Ok(v) => v,
                Err(_) => {
                    println!(
                        "  {kind}: child failed: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                    continue;
                }
            };
            let f = |k: &str| v[k].as_f64().unwrap_or(0.0);
            let what = if kind == "host" {
                format!("{} host resources", v["resources"])
            } else {
                format!(
                    "{} Kubernetes objects ({:.1} MB YAML)",
                    v["resources"],
                    f("yaml") / 1e6
                )
            };
            println!(
                "  {what}, RUST_BACKTRACE={}: total {:.1} ms (min {:.1}) = render {:.1} + plan {:.1} + guardrails {:.1} ({:.0}% of it; pack compile {:.1} ms, first reconcile only); {} findings; peak RSS {:.1} MiB",
                if backtrace { "1" } else { "unset" },
                f("total"),
                f("min"),
                f("render"),
                f("plan"),
                f("guard"),
                100.0 * f("guard") / f("total").max(0.001),
                f("compile"),
                v["findings"],
                f("rss"),
            );
        }
    }
    println!("the same policies and inputs in OPA:");
    compare_with_opa("host", &host_repository());
    compare_with_opa("kube", &kube_repository().0);
}
