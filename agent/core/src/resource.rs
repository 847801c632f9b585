//! Desired and live resources, identified the same way on every target.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::model::Strategy;
use crate::source::Revision;

/// Identity of one resource on one target. Ordering is the documented
/// deterministic order of plans: target, kind, namespace, name.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ResourceId {
    pub target: String,
    /// `Process`, `File`, `Route` on hosts; `group/Kind` (or `Kind` for the
    /// core group) on Kubernetes.
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
}

impl ResourceId {
    pub fn new(target: &str, kind: &str, name: &str) -> Self {
        ResourceId {
            target: target.to_string(),
            kind: kind.to_string(),
            namespace: None,
            name: name.to_string(),
        }
    }
}

impl fmt::Display for ResourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{}/{}/{}/{}", self.target, self.kind, ns, self.name),
            None => write!(f, "{}/{}/{}", self.target, self.kind, self.name),
        }
    }
}

impl fmt::Debug for ResourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// One rendered resource as a commit wants it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DesiredResource {
    pub id: ResourceId,
    /// The service whose folder declared it.
    pub service: String,
    /// The file it came from, relative to the watched path (for errors).
    pub file: String,
    /// The manifest as JSON. Host resources: `{apiVersion, kind, metadata,
    /// spec}` with the spec typed and defaults filled in; Kubernetes: the
    /// object as written.
    pub body: Value,
    /// Dotted field paths (e.g. `spec.content`) whose values are sensitive:
    /// diffs, reports and logs show that they changed, never the values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub redact: Vec<String>,
    /// How the service rolls this resource out (from `sluice.yaml`).
    #[serde(default)]
    pub strategy: Strategy,
    /// Rolling: how many replicas may be replaced at once (policy,
    /// overridable per service). None: all at once.
    #[serde(skip)]
    pub max_unavailable: Option<crate::model::Share>,
    /// Exits while starting after which the new release fails at once
    /// (the rollout policy's `crashLoop.restarts`).
    #[serde(skip)]
    pub crash_restarts: Option<u32>,
    /// How long a new release may take to become ready before its gate
    /// fails (the service's `gateTimeout`). None: the target's own limit.
    #[serde(skip)]
    pub start_timeout: Option<std::time::Duration>,
    /// Kubernetes: the user sluice impersonates to write this object
    /// (`system:serviceaccount:<namespace>:<name>`), from
    /// `serviceAccountName`. None: sluice's own identity.
    #[serde(skip)]
    pub impersonate: Option<String>,
    /// Repository files the resource needs, keyed by sha256 hex digest
    /// (already verified by render). Not serialised: content lives in git,
    /// the digest in `body`.
    #[serde(skip)]
    pub blobs: BTreeMap<String, Arc<Vec<u8>>>,
}

/// Everything one commit wants, on every target, with its content digest.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DesiredState {
    pub revision: Revision,
    /// `sha256:<hex>` of the canonical JSON of `resources`.
    pub digest: String,
    pub resources: BTreeMap<ResourceId, DesiredResource>,
}

impl DesiredState {
    pub fn new(revision: Revision, resources: BTreeMap<ResourceId, DesiredResource>) -> Self {
        let digest = digest_of(&resources.values().collect::<Vec<_>>());
        DesiredState {
            revision,
            digest,
            resources,
        }
    }

    /// The resources bound for one target.
    pub fn for_target<'a>(&'a self, target: &'a str) -> impl Iterator<Item = &'a DesiredResource> {
        self.resources
            .values()
            .filter(move |r| r.id.target == target)
    }

    /// The digest of one target's share, recorded per target.
    pub fn target_digest(&self, target: &str) -> String {
        let part: Vec<&DesiredResource> = self.for_target(target).collect();
        digest_of(&part)
    }
}

/// `sha256:<hex>` of the canonical JSON (maps sorted by key) of `value`.
/// `value` must serialise to JSON (string map keys): a value that cannot is
/// a programming error, caught by the tests.
pub fn digest_of<T: Serialize + ?Sized>(value: &T) -> String {
    /// Feeds serialised bytes straight into the hash: no copy of the
    /// whole desired state is ever held.
    struct Hashing(Sha256);
    impl std::io::Write for Hashing {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.update(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut h = Hashing(Sha256::new());
    // serde_json keeps object keys sorted (no preserve_order feature), and
    // BTreeMaps serialise in key order: the bytes are canonical.
    serde_json::to_writer(std::io::BufWriter::with_capacity(64 * 1024, &mut h), value)
        .expect("digest input serialises to JSON");
    format!("sha256:{}", hex::encode(h.0.finalize()))
}

/// How a resource is doing. Ordered from best to worst, so the health of a
/// group is the maximum of its members'.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Healthy,
    /// Still converging (starting, waiting for readiness).
    Progressing,
    /// Running but failing (readiness failing, restarting).
    Degraded,
    /// Not there at all.
    Missing,
    /// Could not be determined.
    Unknown,
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Health::Healthy => "healthy",
            Health::Progressing => "progressing",
            Health::Degraded => "degraded",
            Health::Missing => "missing",
            Health::Unknown => "unknown",
        })
    }
}

/// One resource as it is live.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LiveResource {
    pub id: ResourceId,
    /// Comparable with [`DesiredResource::body`]: the same shape, holding
    /// what the target observed (or recorded when it applied, where it
    /// can't be observed).
    pub body: Value,
    pub health: Health,
    /// Kubernetes: the fields sluice's field manager owns (FieldsV1), so
    /// that the plan compares only what sluice manages
    /// ([`crate::managed::project`]). None: `body` compares whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed: Option<Value>,
    /// Why it has that health, for people ("2/3 replicas ready").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::CommitId;

    #[test]
    fn digests_change_with_content_and_are_stable() {
        let rev = Revision {
            commit: CommitId::parse(&"f".repeat(40)).unwrap(),
            time: 0,
            summary: String::new(),
        };
        let mk = |v: &str| {
            let id = ResourceId::new("local", "File", "a");
            let r = DesiredResource {
                id: id.clone(),
                service: "s".into(),
                file: "f".into(),
                body: serde_json::json!({"spec": {"content": v}}),
                redact: vec![],
                strategy: Strategy::Rolling,
                max_unavailable: None,
                crash_restarts: None,
                start_timeout: None,
                impersonate: None,
                blobs: Default::default(),
            };
            DesiredState::new(rev.clone(), [(id, r)].into())
        };
        let empty = format!("sha256:{}", hex::encode(Sha256::digest(b"")));
        let (a, a2, b) = (mk("1"), mk("1"), mk("2"));
        assert_ne!(a.digest, empty);
        assert_eq!(a.digest, a2.digest);
        assert_ne!(a.digest, b.digest);
        assert_ne!(a.target_digest("local"), b.target_digest("local"));
    }
}
