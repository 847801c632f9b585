//! A cold apply of 1,000 ConfigMaps against the fake API server (no real
//! one can run here; the fake answers as the recorded kube-apiserver
//! does), through the real `sluice` binary at `--kube-qps 50` and 1000:
//! requests per object, objects/s and requests/s against the budget; beside
//! it, in the same run, `kubectl apply --server-side` of the same objects
//! against a fresh fake (kubectl does not dry-run first, and does not
//! throttle itself against this server). Then the API requests of a
//! rollout with a 10 s soak of one Deployment.
//!
//! `cargo bench -p sluice --bench kube_apply`. Prints figures only.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use sluice_kube_fake::Fake;

const OBJECTS: usize = 1000;

fn git(dir: &Path, args: &[&str]) {
    let ok = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", dir)
        .env("GIT_AUTHOR_NAME", "b")
        .env("GIT_AUTHOR_EMAIL", "b@example.com")
        .env("GIT_COMMITTER_NAME", "b")
        .env("GIT_COMMITTER_EMAIL", "b@example.com")
        .status()
        .expect("git")
        .success();
    assert!(ok, "git {args:?}");
}

fn config_maps() -> String {
    let mut s = String::from("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: bench\n");
    for i in 0..OBJECTS {
        s.push_str(&format!(
            "---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cm-{i:04}\n  namespace: bench\ndata:\n  key: value-{i}\n"
        ));
    }
    s
}

/// (seconds, requests) of a cold `sluice apply` at `qps` (burst 2x).
fn sluice(dir: &Path, topology: &str, files: &[(&str, String)], qps: u32) -> (Fake, f64, usize) {
    let fake = Fake::start_in_thread();
    let repo = dir.join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    std::fs::write(repo.join("sluice.yaml"), topology).unwrap();
    for (path, text) in files {
        let p = repo.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-qm", "bench"]);
    std::fs::write(dir.join("kubeconfig"), fake.kubeconfig(&["cluster"])).unwrap();
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("apply")
        .arg("--repo")
        .arg(&repo)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--kubeconfig")
        .arg(dir.join("kubeconfig"))
        .arg("--kube-qps")
        .arg(qps.to_string())
        .arg("--kube-burst")
        .arg((2 * qps).to_string())
        .env("HOME", dir)
        .output()
        .unwrap();
    let secs = started.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let n = fake.log().len();
    (fake, secs, n)
}

fn main() {
    const TOPOLOGY: &str = "apiVersion: sluice.dev/v1\nkind: Topology\ndefaults:\n  soak: 0s\ntargets:\n  - name: cluster\n    type: kubernetes\nservices:\n  config:\n    path: config\n";
    for qps in [50, 1000] {
        let dir = tempfile::tempdir().unwrap();
        let (_fake, secs, requests) = sluice(
            dir.path(),
            TOPOLOGY,
            &[("config/cms.yaml", config_maps())],
            qps,
        );
        println!(
            "sluice apply, {OBJECTS} ConfigMaps cold, --kube-qps {qps} --kube-burst {}: {secs:.1} s, {requests} requests ({:.2} per object: a dry run and an apply), {:.0} objects/s, {:.0} requests/s against a budget of {qps}/s",
            2 * qps,
            requests as f64 / OBJECTS as f64,
            OBJECTS as f64 / secs,
            requests as f64 / secs
        );
    }
    // kubectl, same objects, a fresh fake.
    let fake = Fake::start_in_thread();
    let kdir = tempfile::tempdir().unwrap();
    std::fs::write(
        kdir.path().join("kubeconfig"),
        fake.kubeconfig(&["cluster"]),
    )
    .unwrap();
    std::fs::write(kdir.path().join("cms.yaml"), config_maps()).unwrap();
    let started = Instant::now();
    let out = Command::new("kubectl")
        .args(["apply", "--server-side", "--validate=false", "-f"])
        .arg(kdir.path().join("cms.yaml"))
        .env("KUBECONFIG", kdir.path().join("kubeconfig"))
        .env("HOME", kdir.path())
        .output();
    match out {
        Ok(o) if o.status.success() => {
            let secs = started.elapsed().as_secs_f64();
            let n = fake.log().len();
            println!(
                "kubectl apply --server-side, same objects, same fake: {secs:.1} s, {n} requests ({:.2} per object), {:.0} objects/s",
                n as f64 / OBJECTS as f64,
                OBJECTS as f64 / secs
            );
        }
        Ok(o) => println!(
            "kubectl apply --server-side against the fake failed: {}",
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .next()
                .unwrap_or("")
        ),
        Err(e) => println!("kubectl not found: {e}"),
    }
    // A 10 s soak of one Deployment: how many requests while it soaks.
    let deployment = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n  namespace: bench\nspec:\n  replicas: 1\n  selector:\n    matchLabels: {app: web}\n  template:\n    metadata:\n      labels: {app: web}\n    spec:\n      containers:\n        - name: web\n          image: registry.example.com/web:1\n          resources:\n            requests: {cpu: 10m, memory: 16Mi}\n            limits: {memory: 64Mi}\n";
    let soak = TOPOLOGY.replace("soak: 0s", "soak: 10s");
    let sdir = tempfile::tempdir().unwrap();
    let ns = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: bench\n".to_string();
    let (fake, secs, requests) = sluice(
        sdir.path(),
        &soak,
        &[
            ("config/ns.yaml", ns),
            ("config/web.yaml", deployment.into()),
        ],
        50,
    );
    let log = fake.log();
    let applied = log
        .iter()
        .rposition(|l| l.method == "PATCH" && l.path.ends_with("/deployments/web"))
        .unwrap_or(0);
    let gate = &log[applied + 1..];
    let watches = gate.iter().filter(|l| l.watch).count();
    let reads = gate
        .iter()
        .filter(|l| l.method == "GET" && !l.watch)
        .count();
    println!(
        "one Deployment and its Namespace, soak 10s: {secs:.1} s, {requests} requests in all (discovery, dry runs, applies, gates); during the Deployment's gate and soak: {} requests ({reads} reads, {watches} watches)",
        gate.len()
    );
}
