//! What a plan costs in API requests and time on Kubernetes: observing N
//! objects of one kind in one namespace, as sluice does it (one LIST per
//! kind and namespace) and, as the peer, one GET per object, both through
//! the same client (rate limited at 50 requests/s, burst 100) against the
//! in-process fake API server. Run: `cargo bench -p sluice-kube --bench
//! observe`.

use std::sync::Arc;
use std::time::Instant;

use serde_json::json;
use sluice_core::resource::ResourceId;
use sluice_core::target::Target;
use sluice_kube::{Cluster, KubeTarget};
use sluice_kube_fake::Fake;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n = 500;
    let fake = Fake::start().await;
    fake.create(
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}),
        "kubectl",
    );
    for i in 0..n {
        fake.create(
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": format!("cm-{i}"), "namespace": "shop"}, "data": {"k": "v"}}),
            "kubectl",
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    std::fs::write(&path, fake.kubeconfig(&["bench"])).unwrap();
    let cluster = Arc::new(Cluster::connect(Some(&path), Some("bench")).await.unwrap());
    let target = KubeTarget::new("bench", cluster.clone(), None);
    let ids: Vec<ResourceId> = (0..n)
        .map(|i| ResourceId {
            target: "bench".into(),
            kind: "ConfigMap".into(),
            namespace: Some("shop".into()),
            name: format!("cm-{i}"),
        })
        .collect();
    // Warm discovery, then let the rate limiter's bucket refill.
    let kind = cluster.resolve("v1", "ConfigMap").await.unwrap().unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;

    let before = fake.log().len();
    let t = Instant::now();
    let live = target.observe(&ids).await.unwrap();
    let list_ms = t.elapsed().as_secs_f64() * 1e3;
    let list_requests = fake.log().len() - before;
    assert_eq!(live.len(), n);

    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let before = fake.log().len();
    let t = Instant::now();
    for id in &ids {
        assert!(cluster
            .get(&kind, Some("shop"), &id.name)
            .await
            .unwrap()
            .is_some());
    }
    let get_ms = t.elapsed().as_secs_f64() * 1e3;
    let get_requests = fake.log().len() - before;

    println!("observe {n} ConfigMaps in one namespace (fake API server, client limit 50 req/s, burst 100)");
    println!("  sluice (LIST per kind and namespace): {list_requests} request(s), {list_ms:.1} ms");
    println!("  peer (GET per object):                {get_requests} requests, {get_ms:.1} ms");
}
