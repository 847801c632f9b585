//! Targets: where desired resources become live.
//!
//! The engine drives every target through this one trait, so waves, gates,
//! reverts and drift work the same on hosts and on Kubernetes.

use std::collections::BTreeMap;

use crate::model::{TargetDef, TargetKind};
use crate::resource::{DesiredResource, LiveResource, ResourceId};

/// What failed on a target, classified by what the loop should do next.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// The resource itself is wrong (bad spec, digest mismatch, a path
    /// outside the file root): retrying the same commit cannot help.
    #[error("{id}: {reason}")]
    Invalid { id: String, reason: String },
    /// Preparing (downloading, verifying) failed; nothing was applied.
    #[error("preparing {id}: {reason}")]
    Prepare { id: String, reason: String },
    /// Applying failed part-way; the engine reverts.
    #[error("applying {id}: {reason}")]
    Apply { id: String, reason: String },
    /// Deleting failed; the resource stays in the inventory.
    #[error("deleting {id}: {reason}")]
    Delete { id: String, reason: String },
    /// Reading live state failed.
    #[error("observing {target}: {reason}")]
    Observe { target: String, reason: String },
    /// The target is unreachable or busy; retry later.
    #[error("target {target} unavailable: {reason}")]
    Unavailable { target: String, reason: String },
}

/// One target. Implementations are idempotent: applying the same resource
/// twice, or deleting an absent one, succeeds and changes nothing.
#[async_trait::async_trait]
pub trait Target: Send + Sync {
    fn name(&self) -> &str;

    fn kind(&self) -> TargetKind;

    /// Live state of `ids` (the desired resources and the inventory). A
    /// resource that is absent is simply missing from the map.
    async fn observe(
        &self,
        ids: &[ResourceId],
    ) -> Result<BTreeMap<ResourceId, LiveResource>, TargetError>;

    /// Fetches and verifies everything `resources` need (artifacts, images)
    /// before any of them is applied. Changes nothing live; an error here
    /// means the commit is not applied at all.
    async fn prepare(&self, resources: &[&DesiredResource]) -> Result<(), TargetError>;

    /// Makes one resource live as desired. May return before the resource is
    /// healthy: gates wait for health through [`Target::observe`].
    async fn apply(&self, resource: &DesiredResource) -> Result<(), TargetError>;

    /// Removes a resource that the inventory says sluice created.
    async fn delete(&self, id: &ResourceId) -> Result<(), TargetError>;

    /// Waits until one of `ids` may have changed, for at most `max`, so a
    /// gate need not poll: Some(true) when something changed (or the
    /// target lost track and the caller must look again), Some(false)
    /// when `max` passed quietly. None: this target cannot tell (the
    /// default), and the caller polls.
    async fn changed(&self, _ids: &[ResourceId], _max: std::time::Duration) -> Option<bool> {
        None
    }

    /// What this target can tell sluice created here, from the marks on
    /// its live resources (Kubernetes: the inventory labels and service
    /// annotation; host: the records of what it applied), each with its
    /// service when marked ("" if not): how a lost inventory is rebuilt.
    /// `scope` is what the current commit wants (where to look when the
    /// target cannot search everywhere). None: this target keeps no marks.
    async fn marked(
        &self,
        _scope: &[ResourceId],
    ) -> Result<Option<Vec<(ResourceId, String)>>, TargetError> {
        Ok(None)
    }

    /// Who each resource is read, written and deleted as, where the target
    /// acts for someone else (Kubernetes: the ServiceAccount named by
    /// `serviceAccountName`, impersonated). Called with everything a
    /// render concerns before it is observed; a resource not named keeps
    /// what the target last heard, else its own default.
    fn act_as(&self, _users: &BTreeMap<ResourceId, String>) {}

    /// Whether the target answers now: checked for every target of a wave
    /// before anything of the wave is applied (a host that is down fails
    /// the wave while it has changed nothing). Default: yes (a target that
    /// is always there, or whose first request tells).
    async fn reachable(&self) -> Result<(), TargetError> {
        Ok(())
    }

    /// Repairs the target's own machinery between reconciles (on the
    /// host: a process whose supervisor died is adopted by a new one). The
    /// instances repaired, for the log.
    async fn maintain(&self) -> Result<Vec<String>, TargetError> {
        Ok(Vec::new())
    }

    /// Traffic splitting, for targets that can run two versions of a
    /// resource at once (canary, blue-green). None: every change is
    /// applied directly.
    fn traffic(&self) -> Option<&dyn crate::traffic::Traffic> {
        None
    }
}

/// Builds the live [`Target`] for a target named in `sluice.yaml`. The agent
/// configures what each kind means on this machine (file roots, kubeconfig
/// contexts); the repository only names targets and their rings.
pub trait TargetProvider: Send + Sync {
    fn target(&self, def: &TargetDef) -> Result<std::sync::Arc<dyn Target>, TargetError>;

    /// Which target kinds this agent can drive (for a clear error).
    fn supports(&self, kind: TargetKind) -> bool;
}

/// A forge that can open pull requests: how sluice writes a revert back to
/// git so that git says again what is live.
#[async_trait::async_trait]
pub trait PullRequests: Send + Sync {
    /// Opens a pull request from `branch` into `base`; returns its URL.
    async fn open(
        &self,
        branch: &str,
        base: &str,
        title: &str,
        body: &str,
    ) -> Result<String, String>;
}
