//! Leader election with a `coordination.k8s.io/v1` Lease, as client-go's
//! leaderelection does it, so that of several agent replicas exactly one
//! applies at a time.
//!
//! - The leader renews the Lease every `duration / 3`. If it cannot renew
//!   within `renew_deadline` (`2/3 × duration`) it stops leading: the
//!   caller exits, before any follower may take over.
//! - A follower takes the Lease over only after the record has stayed
//!   unchanged for a whole `duration` *as measured by its own clock* (it
//!   never compares its clock with the leader's timestamps, so clock skew
//!   between nodes cannot make two leaders).
//! - Every write carries the `resourceVersion` read just before it: of two
//!   followers racing for an expired Lease, the API server lets one win
//!   and answers the other 409.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::Mutex;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::client::{Cluster, KubeError};

pub struct Lease {
    cluster: Arc<Cluster>,
    namespace: String,
    name: String,
    identity: String,
    duration: Duration,
    /// The last record seen (holder, renewTime, resourceVersion) and when
    /// this process first saw it.
    observed: Mutex<Option<(String, Instant)>>,
}

fn now_rfc3339() -> String {
    chrono::Utc::now()
        .format("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string()
}

impl Lease {
    pub fn new(
        cluster: Arc<Cluster>,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> Self {
        Lease {
            cluster,
            namespace: namespace.to_string(),
            name: name.to_string(),
            identity: identity.to_string(),
            duration,
            observed: Mutex::new(None),
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// One round: takes or renews the Lease if this process may. True when
    /// this process holds it afterwards.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, KubeError> {
        let kind = self
            .cluster
            .resolve("coordination.k8s.io/v1", "Lease")
            .await?
            .ok_or_else(|| {
                KubeError::Transport(
                    "the cluster does not serve coordination.k8s.io/v1 Lease".into(),
                )
            })?;
        let live = self
            .cluster
            .get(&kind, Some(&self.namespace), &self.name)
            .await?;
        let now = now_rfc3339();
        let seconds = self.duration.as_secs().max(1);
        let body = |rv: Option<&str>, acquire: &str, transitions: i64| {
            let mut b = json!({
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": {
                    "holderIdentity": self.identity, "leaseDurationSeconds": seconds,
                    "acquireTime": acquire, "renewTime": now, "leaseTransitions": transitions,
                },
            });
            if let Some(rv) = rv {
                b["metadata"]["resourceVersion"] = json!(rv);
            }
            b
        };
        let write = |b: Value| async move {
            match self
                .cluster
                .apply(&kind, Some(&self.namespace), &self.name, &b, true, false)
                .await
            {
                Ok(_) => Ok(true),
                // Another replica wrote first.
                Err(KubeError::Api { code: 409, .. }) => Ok(false),
                Err(e) => Err(e),
            }
        };
        let Some(live) = live else {
            let won = write(body(None, &now, 0)).await?;
            if won {
                info!(lease = %self.name, identity = %self.identity, "acquired the leader lease (new)");
            }
            return Ok(won);
        };
        let spec = &live["spec"];
        let holder = spec["holderIdentity"].as_str().unwrap_or_default();
        let rv = live["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or_default();
        let transitions = spec["leaseTransitions"].as_i64().unwrap_or(0);
        let record = format!(
            "{holder}|{}|{rv}",
            spec["renewTime"].as_str().unwrap_or_default()
        );
        if holder == self.identity {
            let acquire = spec["acquireTime"].as_str().unwrap_or(&now).to_string();
            return write(body(Some(rv), &acquire, transitions)).await;
        }
        // Someone else's (or nobody's) record: expired only once it has
        // not changed for a whole lease duration on this clock.
        let their = Duration::from_secs(spec["leaseDurationSeconds"].as_u64().unwrap_or(seconds));
        let expired = {
            let mut seen = self.observed.lock().await;
            match &*seen {
                Some((r, at)) if *r == record => at.elapsed() >= their,
                _ => {
                    *seen = Some((record, Instant::now()));
                    false
                }
            }
        };
        if holder.is_empty() || expired {
            let won = write(body(Some(rv), &now, transitions + 1)).await?;
            if won {
                info!(lease = %self.name, identity = %self.identity, previous = holder, "took over the leader lease");
            }
            return Ok(won);
        }
        Ok(false)
    }

    /// Waits until this process leads.
    pub async fn acquire(&self) {
        let retry = self.duration / 3;
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => warn!(lease = %self.name, error = %e, "leader election failed; retrying"),
            }
            tokio::time::sleep(retry).await;
        }
    }

    /// Renews until it fails for `2/3 × duration`, then returns: the
    /// caller must stop applying at once (the agent exits).
    pub async fn keep(&self) {
        let retry = self.duration / 3;
        let deadline = self.duration * 2 / 3;
        let mut last = Instant::now();
        loop {
            tokio::time::sleep(retry).await;
            match self.try_acquire_or_renew().await {
                Ok(true) => last = Instant::now(),
                Ok(false) => {
                    warn!(lease = %self.name, "another replica holds the leader lease");
                    return;
                }
                Err(e) => warn!(lease = %self.name, error = %e, "renewing the leader lease failed"),
            }
            if last.elapsed() >= deadline {
                return;
            }
        }
    }

    /// Gives the Lease up (on shutdown), so a follower takes over at once.
    pub async fn release(&self) {
        let Ok(Some(kind)) = self
            .cluster
            .resolve("coordination.k8s.io/v1", "Lease")
            .await
        else {
            return;
        };
        let Ok(Some(live)) = self
            .cluster
            .get(&kind, Some(&self.namespace), &self.name)
            .await
        else {
            return;
        };
        if live["spec"]["holderIdentity"] != self.identity.as_str() {
            return;
        }
        let mut b = json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": self.name, "namespace": self.namespace, "resourceVersion": live["metadata"]["resourceVersion"]},
            "spec": {"holderIdentity": "", "leaseDurationSeconds": 1, "renewTime": now_rfc3339(), "acquireTime": live["spec"]["acquireTime"], "leaseTransitions": live["spec"]["leaseTransitions"]},
        });
        if b["spec"]["acquireTime"].is_null() {
            b["spec"].as_object_mut().map(|s| s.remove("acquireTime"));
        }
        let _ = self
            .cluster
            .apply(&kind, Some(&self.namespace), &self.name, &b, true, false)
            .await;
        info!(lease = %self.name, identity = %self.identity, "released the leader lease");
    }
}
