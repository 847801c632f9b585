//! Render and plan of 5,000 host resources: wall time and peak RSS.
//!
//! `cargo bench -p sluice-core --bench plan`. Prints figures; asserts
//! nothing about speed (machines differ).

use std::collections::BTreeMap;
use std::time::Instant;

use sluice_core::plan::{plan, Inventory};
use sluice_core::render::render;
use sluice_core::resource::{Health, LiveResource};
use sluice_core::source::{CommitId, FileEntry, Revision, Snapshot};

const SERVICES: usize = 50;
const PER_SERVICE: usize = 100;

fn snapshot(version: &str) -> Snapshot {
    let mut files = BTreeMap::new();
    let mut topo = String::from("apiVersion: sluice.dev/v1\nkind: Topology\ntargets:\n  - name: local\n    type: host\nservices:\n");
    for s in 0..SERVICES {
        topo.push_str(&format!("  svc-{s}:\n    path: svc-{s}\n"));
        if s > 0 {
            topo.push_str(&format!("    dependsOn: [svc-{}]\n", s - 1));
        }
        let mut docs = Vec::new();
        for r in 0..PER_SERVICE {
            docs.push(if r % 2 == 0 {
                format!("apiVersion: sluice.dev/v1\nkind: Process\nmetadata:\n  name: p-{s}-{r}\nspec:\n  command: /bin/sleep\n  args: [\"1000\"]\n  version: \"{version}\"\n  env:\n    A: \"1\"\n    B: \"2\"\n  readiness:\n    tcp: true\n")
            } else {
                format!("apiVersion: sluice.dev/v1\nkind: File\nmetadata:\n  name: f-{s}-{r}\nspec:\n  path: s{s}/f{r}.conf\n  content: |\n    key = value-{r}\n    version = {version}\n")
            });
        }
        files.insert(
            format!("svc-{s}/all.yaml"),
            FileEntry::Blob {
                data: docs.join("---\n").into_bytes(),
                executable: false,
            },
        );
    }
    files.insert(
        "sluice.yaml".into(),
        FileEntry::Blob {
            data: topo.into_bytes(),
            executable: false,
        },
    );
    Snapshot {
        revision: Revision {
            commit: CommitId::parse(&"e".repeat(40)).unwrap(),
            time: 0,
            summary: "bench".into(),
        },
        files,
    }
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

fn main() {
    let rss0 = peak_rss_kib();
    let snap_v1 = snapshot("1");
    let snap_v2 = snapshot("2");
    let t = Instant::now();
    let v1 = render(&snap_v1).expect("render");
    let render_ms = t.elapsed().as_secs_f64() * 1000.0;
    let n = v1.desired.resources.len();
    let live: BTreeMap<_, _> = v1
        .desired
        .resources
        .iter()
        .map(|(id, r)| {
            (
                id.clone(),
                LiveResource {
                    id: id.clone(),
                    body: r.body.clone(),
                    health: Health::Healthy,
                    managed: None,
                    message: None,
                },
            )
        })
        .collect();
    let inventory: Inventory = v1
        .desired
        .resources
        .iter()
        .map(|(id, r)| (id.clone(), r.service.clone()))
        .collect();

    let t = Instant::now();
    let p = plan(
        &v1.topology,
        &v1.desired,
        &BTreeMap::new(),
        &Inventory::new(),
    )
    .unwrap();
    let create_ms = t.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(p.changes().count(), n);

    let t = Instant::now();
    let p = plan(&v1.topology, &v1.desired, &live, &inventory).unwrap();
    let noop_ms = t.elapsed().as_secs_f64() * 1000.0;
    assert!(p.is_empty());

    let v2 = render(&snap_v2).expect("render");
    let t = Instant::now();
    let p = plan(&v2.topology, &v2.desired, &live, &inventory).unwrap();
    let update_ms = t.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(p.changes().count(), n);
    assert_eq!(p.waves.len(), SERVICES);

    // Guardrails over every resource, with the plan as context.
    let t = Instant::now();
    let report = sluice_core::policy::evaluate(&v2.policy, &v2, &p).expect("policy");
    let policy_ms = t.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(report.evaluated, n);

    println!(
        "plan benchmark: {n} host resources, {SERVICES} services in {SERVICES} dependency waves"
    );
    println!("  render (parse + validate + digest)   {render_ms:8.1} ms");
    println!("  plan, all new (create)               {create_ms:8.1} ms");
    println!("  plan, nothing changed                {noop_ms:8.1} ms");
    println!("  plan, every resource changed         {update_ms:8.1} ms");
    println!(
        "  guardrails (7 shipped Rego modules)  {policy_ms:8.1} ms ({:.0} µs per resource)",
        policy_ms * 1000.0 / n as f64
    );
    println!(
        "  peak RSS {:.1} MiB (at start {:.1} MiB)",
        peak_rss_kib() as f64 / 1024.0,
        rss0 as f64 / 1024.0
    );
}
