//! Leader election and the client's retries against the in-process fake
//! API server (no real one can run here; see `sluice-kube-fake` for what it
//! models). Leases are written with server-side apply carrying the
//! resourceVersion read just before, so the fake's optimistic concurrency
//! decides races as the real API server does.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use sluice_kube::{Cluster, Lease};
use sluice_kube_fake::Fake;

async fn cluster(fake: &Fake) -> Arc<Cluster> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    std::fs::write(&path, fake.kubeconfig(&["test"])).unwrap();
    Arc::new(Cluster::connect(Some(&path), Some("test")).await.unwrap())
}

async fn fake_with_namespace() -> Fake {
    let fake = Fake::start().await;
    fake.create(
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "sluice-system"}}),
        "kubectl",
    );
    fake
}

fn holder(fake: &Fake) -> (String, i64) {
    let l = fake
        .get(
            "coordination.k8s.io",
            "leases",
            "sluice-system",
            "sluice-leader",
        )
        .unwrap();
    (
        l["spec"]["holderIdentity"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        l["spec"]["leaseTransitions"].as_i64().unwrap_or(0),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_takes_over_only_after_the_lease_expires() {
    let fake = fake_with_namespace().await;
    let c = cluster(&fake).await;
    // Wide margins around the expiry, so a loaded machine cannot flip
    // the outcome.
    let d = Duration::from_secs(3);
    let a = Lease::new(c.clone(), "sluice-system", "sluice-leader", "a", d);
    let b = Lease::new(c.clone(), "sluice-system", "sluice-leader", "b", d);
    assert!(a.try_acquire_or_renew().await.unwrap());
    assert!(!b.try_acquire_or_renew().await.unwrap());
    // While a renews, b never leads.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(a.try_acquire_or_renew().await.unwrap());
        assert!(!b.try_acquire_or_renew().await.unwrap());
    }
    assert_eq!(holder(&fake), ("a".into(), 0));
    // a stops renewing (crashed): b takes over once the record has not
    // changed for a whole lease duration on b's clock.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        !b.try_acquire_or_renew().await.unwrap(),
        "taken over before expiry"
    );
    tokio::time::sleep(d).await;
    assert!(b.try_acquire_or_renew().await.unwrap());
    assert_eq!(holder(&fake), ("b".into(), 1));
    // a comes back and does not lead.
    assert!(!a.try_acquire_or_renew().await.unwrap());
    // b releases on shutdown: a leads at once.
    b.release().await;
    assert!(a.try_acquire_or_renew().await.unwrap());
    assert_eq!(holder(&fake).0, "a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_followers_racing_for_an_expired_lease_exactly_one_wins() {
    let fake = fake_with_namespace().await;
    let c = cluster(&fake).await;
    // Leases count in whole seconds.
    let d = Duration::from_secs(1);
    let old = Lease::new(c.clone(), "sluice-system", "sluice-leader", "old", d);
    assert!(old.try_acquire_or_renew().await.unwrap());
    let followers: Vec<Arc<Lease>> = (0..4)
        .map(|i| {
            Arc::new(Lease::new(
                c.clone(),
                "sluice-system",
                "sluice-leader",
                &format!("f{i}"),
                d,
            ))
        })
        .collect();
    for f in &followers {
        assert!(!f.try_acquire_or_renew().await.unwrap());
    }
    tokio::time::sleep(d + Duration::from_millis(200)).await;
    let tasks: Vec<_> = followers
        .iter()
        .map(|f| {
            let f = f.clone();
            tokio::spawn(async move { f.try_acquire_or_renew().await.unwrap() })
        })
        .collect();
    let mut winners = 0;
    for t in tasks {
        winners += usize::from(t.await.unwrap());
    }
    assert_eq!(winners, 1, "two replicas led at once");
    assert!(holder(&fake).0.starts_with('f'));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_returns_when_the_lease_is_lost() {
    let fake = fake_with_namespace().await;
    let c = cluster(&fake).await;
    let a = Lease::new(
        c.clone(),
        "sluice-system",
        "sluice-leader",
        "a",
        Duration::from_secs(1),
    );
    a.acquire().await;
    // Someone else overwrites the Lease (an operator, a split brain).
    fake.edit(
        "coordination.k8s.io",
        "leases",
        "sluice-system",
        "sluice-leader",
        "kubectl",
        json!({"spec": {"holderIdentity": "intruder"}}),
    );
    tokio::time::timeout(Duration::from_secs(5), a.keep())
        .await
        .expect("keep() noticed the loss");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttled_calls_are_retried_with_backoff() {
    let fake = fake_with_namespace().await;
    let c = cluster(&fake).await;
    let kind = c.resolve("v1", "Namespace").await.unwrap().unwrap();
    fake.throttle(3);
    let ns = c.get(&kind, None, "sluice-system").await.unwrap();
    assert!(ns.is_some());
    let throttled = fake.log().iter().filter(|l| l.status == 429).count();
    assert_eq!(throttled, 3);
    // Past the attempts, the error names the reason.
    fake.throttle(10);
    let e = c.get(&kind, None, "sluice-system").await.unwrap_err();
    assert!(e.to_string().contains("too many requests"), "{e}");
}
