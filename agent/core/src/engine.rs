//! The engine: drives source → render → plan → rollout → record over the
//! traits of this crate.
//!
//! # Guarantees
//! - Nothing is applied from a commit that failed to fetch, read, render or
//!   prepare (safety invariant 1): every target call that changes anything
//!   comes after [`Engine::prepare`] succeeded for the whole commit.
//! - Only the inventory is pruned, and a failed render prunes nothing
//!   (invariant 2): pruning is part of a plan, and a plan needs a render.
//! - Progress is persisted before each wave ([`InProgress`]); a restarted
//!   agent finishes an interrupted revert, and re-runs an interrupted
//!   rollout (applies are idempotent, so finished waves are no-ops) so the
//!   live state converges to one whole commit.
//! - A commit whose rollout failed is recorded and not retried until a newer
//!   commit arrives, unless asked explicitly (`retry`).
//!
//! # Caveats
//! Gates wait inside a rollout (polling health through the [`Clock`]); the
//! loop in `sluice run` calls [`Engine::reconcile`] and decides when to run
//! the next one from the returned value or error.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::clock::Clock;
use crate::gate::{Gate, GateContext, GateFactory, HealthGate, Verdict};
use crate::guard::{self, GuardError};
use crate::model::{TargetDef, TargetKind, Topology};
use crate::plan::{plan, Action, Inventory, Plan};
use crate::render::{render_with, RenderError, Rendered};
use crate::resource::{DesiredResource, Health, LiveResource, ResourceId};
use crate::source::{CommitId, Limits, Revision, Source, SourceError};
use crate::store::{
    AgentState, Decision, Deployed, DriftScan, Failed, HistoryEntry, HistoryKind, InProgress,
    Outcome, StateStore, StoreError, TargetRecord, Waiting,
};
use crate::target::{PullRequests, Target, TargetError, TargetProvider};
use crate::window;

/// What went wrong in one reconcile, by the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("commit {commit}: {source}")]
    Render {
        commit: String,
        #[source]
        source: RenderError,
    },
    #[error("target {target} (type {kind}) is not supported by this agent")]
    Unsupported { target: String, kind: TargetKind },
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error("gate after wave {wave} failed: {reason}")]
    Gate { wave: usize, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The commit's policies cannot be compiled or evaluated.
    #[error("commit {commit}: policies: {source}")]
    Guard {
        commit: String,
        #[source]
        source: Box<GuardError>,
    },
    #[error("commit {commit} is denied by policy; nothing applied:\n  {}", .denies.join("\n  "))]
    Denied { commit: String, denies: Vec<String> },
    /// Some targets could not be brought back (a revert goes on past
    /// them); target → why.
    #[error("{} target(s) not done: {}", .failed.len(), .failed.iter().map(|(t, e)| format!("{t}: {e}")).collect::<Vec<_>>().join("; "))]
    Partial { failed: BTreeMap<String, String> },
}

impl EngineError {
    /// Errors a person must fix in the repository or the configuration
    /// (exit code 2), as opposed to a failed or reverted rollout (1).
    pub fn is_bad_input(&self) -> bool {
        match self {
            EngineError::Render { .. }
            | EngineError::Guard { .. }
            | EngineError::Unsupported { .. }
            | EngineError::Denied { .. } => true,
            EngineError::Source(e) => matches!(
                e,
                SourceError::InvalidUrl { .. }
                    | SourceError::Credentials { .. }
                    | SourceError::Rejected { .. }
                    | SourceError::Untrusted { .. }
                    | SourceError::PathNotFound { .. }
                    | SourceError::TooLarge { .. }
                    | SourceError::RefNotFound { .. }
            ),
            EngineError::Target(TargetError::Invalid { .. } | TargetError::Prepare { .. }) => true,
            _ => false,
        }
    }
}

/// What a reconcile did.
#[derive(Debug)]
pub enum Reconciled {
    /// Live already matches the commit.
    UpToDate { revision: Revision },
    /// The commit rolled out through every wave and gate.
    Applied { plan: Plan, duration: Duration },
    /// The commit failed before and is not retried until a newer one.
    SkippedFailed { revision: Revision, reason: String },
    /// Outside its sync windows: nothing applied; retried later.
    Waiting {
        revision: Revision,
        until: Option<chrono::DateTime<chrono::Utc>>,
        reason: String,
    },
    /// Refused before anything was written: a target's prepare (download,
    /// verify, dry run) failed. Nothing changed, so nothing is reverted;
    /// the commit is recorded as failed and not retried until a newer one.
    Rejected { plan: Plan, error: String },
    /// The rollout failed and the touched targets were put back.
    Reverted {
        plan: Plan,
        error: String,
        reverted_to: Option<CommitId>,
    },
}

/// Options of one apply.
#[derive(Clone, Copy, Debug, Default)]
pub struct ApplyOptions {
    /// Apply a commit that failed before (recorded in the history).
    pub retry: bool,
    /// Roll out outside the sync windows (recorded in the history).
    pub window_override: bool,
}

/// A commit rendered, observed and planned: everything needed to apply it,
/// computed before anything changes.
pub struct Prepared {
    pub rendered: Rendered,
    pub targets: BTreeMap<String, Arc<dyn Target>>,
    pub live: BTreeMap<ResourceId, LiveResource>,
    pub inventory: Inventory,
    pub plan: Plan,
    /// The guardrails' findings (not evaluated for reverts).
    pub guard: guard::Report,
    /// A lost inventory rebuilt from the live resources' marks, for the
    /// write paths to save (read-only ones, `plan` and reports, do not).
    pub rebuilt: Option<AgentState>,
    /// Targets that could not be observed, left out of the plan (reverts
    /// and drift scans go on without them; target → why).
    pub unreachable: BTreeMap<String, String>,
}

/// Per target and resource, what `sluice status` shows.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Status {
    pub state: AgentState,
    pub resources: BTreeMap<String, Vec<ResourceStatus>>,
    pub history: Vec<HistoryEntry>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ResourceStatus {
    pub id: ResourceId,
    pub service: String,
    pub health: Health,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// What merging a pull request would do; rendered as its comment.
#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PrReport {
    pub base: Revision,
    pub head: Revision,
    /// Head against what runs now: what the merge will really change.
    pub against_live: Plan,
    /// Head against base: the change the pull request's diff describes.
    pub against_base: Plan,
    /// Changes made by hand that the merge would overwrite.
    pub drift_overwritten: Vec<DriftItem>,
    /// Feature flags of head past their expiry date.
    pub expired_flags: Vec<String>,
    /// Head's guardrail findings: a deny blocks the merge's rollout.
    pub guard: guard::Report,
    /// Per resource the merge changes (by its id as text): its content in
    /// head, live and base, secrets redacted (on Kubernetes, live as far
    /// as sluice manages it).
    pub contents: BTreeMap<String, Contents>,
    /// How each service of the rollout rolls out ("canary: 10% for 30s →
    /// 100%").
    pub rollouts: BTreeMap<String, String>,
    /// The branch or ref names of base and head, where the caller knows them.
    pub base_name: Option<String>,
    pub head_name: Option<String>,
}

/// One resource on each side of a report, secrets redacted.
#[derive(Clone, Debug, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Contents {
    pub head: Option<serde_json::Value>,
    pub live: Option<serde_json::Value>,
    pub base: Option<serde_json::Value>,
    /// Fields whose values are secret: changed or not, never shown.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub redacted: Vec<String>,
}

/// Drift of one target against the commit applied to it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DriftReport {
    pub target: String,
    pub commit: CommitId,
    pub items: Vec<DriftItem>,
    /// Resources re-applied by this scan (services with `drift: heal`).
    pub healed: Vec<ResourceId>,
    /// Resources a heal could not re-apply, and why (a field another
    /// manager owns needs `sluice.dev/force-conflicts: "true"`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub heal_failed: Vec<(ResourceId, String)>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct DriftItem {
    pub id: ResourceId,
    pub service: String,
    pub kind: DriftKind,
    /// Field paths, live → desired; secret values redacted.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<crate::diff::FieldChange>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DriftKind {
    /// Present but different from the applied commit.
    Modified,
    /// Deleted (or stopped) by hand.
    Missing,
}

/// A commit checked offline: rendered, planned against an empty system
/// (every resource a create, waves as the dependency order gives them) and
/// judged by its guardrails. No target, no state.
pub struct Checked {
    pub rendered: Rendered,
    pub plan: Plan,
    pub guard: guard::Report,
}

/// What `sluice policy test` does: the guard stage of one commit, with
/// nothing but the commit's files. Errors are bad input.
pub fn check(
    snapshot: &crate::source::Snapshot,
    kustomize: &dyn crate::render::Kustomize,
) -> Result<Checked, EngineError> {
    let commit = snapshot.revision.commit.to_string();
    let render_err = |source| EngineError::Render {
        commit: commit.clone(),
        source,
    };
    let guard_err = |source| EngineError::Guard {
        commit: commit.clone(),
        source: Box::new(source),
    };
    let rendered = render_with(snapshot, kustomize).map_err(render_err)?;
    let plan = plan(
        &rendered.topology,
        &rendered.desired,
        &BTreeMap::new(),
        &Inventory::new(),
    )
    .map_err(render_err)?;
    let pack = guard::Pack::load(snapshot, &rendered.topology.policies).map_err(guard_err)?;
    let report = pack
        .compile()
        .and_then(|c| guard::evaluate(&c, &guard::Input::new(&rendered, &plan)))
        .map_err(guard_err)?;
    Ok(Checked {
        rendered,
        plan,
        guard: report,
    })
}

pub struct Engine {
    pub source: Arc<dyn Source>,
    pub targets: Arc<dyn TargetProvider>,
    pub store: Arc<dyn StateStore>,
    pub clock: Arc<dyn Clock>,
    pub limits: Limits,
    /// How often gates look at health.
    pub gate_poll: Duration,
    /// Gates beyond health and soak (canary analysis plugs in here).
    pub gate_factories: Vec<Arc<dyn GateFactory>>,
    /// Where revert pull requests go after an automatic revert.
    pub forge: Option<Arc<dyn PullRequests>>,
    /// Where canary analysis reads its counters (Prometheus); None: each
    /// target's own (the router's).
    pub metrics: Option<Arc<dyn crate::traffic::Metrics>>,
    /// Builds kustomize folders (the real one runs `kubectl kustomize`).
    pub kustomize: Arc<dyn crate::render::Kustomize>,
}

impl Engine {
    /// Polls the source and brings every target to the head commit.
    pub async fn reconcile(&self, opts: ApplyOptions) -> Result<Reconciled, EngineError> {
        self.finish_interrupted().await?;
        let revision = self.poll().await?;
        self.apply(revision, opts).await
    }

    /// Polls the source, recording the outcome for status and backoff.
    pub async fn poll(&self) -> Result<Revision, EngineError> {
        let result = self.source.poll().await;
        let mut state = self.store.load()?;
        state.source.describe = self.source.describe();
        state.source.last_poll = Some(self.clock.now());
        match &result {
            Ok(rev) => {
                state.source.last_success = state.source.last_poll;
                state.source.last_seen = Some(rev.clone());
                state.source.last_error = None;
                state.source.consecutive_failures = 0;
            }
            Err(e) => {
                state.source.last_error = Some(e.to_string());
                state.source.consecutive_failures += 1;
            }
        }
        self.store.save(&state)?;
        Ok(result?)
    }

    /// A commit's snapshot and its render.
    async fn render_commit(
        &self,
        commit: &CommitId,
    ) -> Result<(crate::source::Snapshot, Rendered), EngineError> {
        let snapshot = self.source.snapshot(commit, &self.limits).await?;
        let rendered = render_with(&snapshot, self.kustomize.as_ref()).map_err(|source| {
            EngineError::Render {
                commit: commit.to_string(),
                source,
            }
        })?;
        Ok((snapshot, rendered))
    }

    /// Renders, observes and plans `revision` without changing anything.
    pub async fn prepare(&self, revision: &Revision) -> Result<Prepared, EngineError> {
        let (snapshot, rendered) = self.render_commit(&revision.commit).await?;
        let pack = guard::Pack::load(&snapshot, &rendered.topology.policies).map_err(|source| {
            EngineError::Guard {
                commit: revision.commit.to_string(),
                source: Box::new(source),
            }
        })?;
        let state = self.store.load()?;
        self.prepare_rendered(rendered, &state, None, Some(&pack), false)
            .await
    }

    /// Observes and plans a rendered commit; evaluates `pack` over it
    /// (None for reverts: they go back to a commit that ran). `tolerant`:
    /// a target that cannot be observed is left out (see
    /// [`Prepared::unreachable`]) rather than failing the whole.
    async fn prepare_rendered(
        &self,
        mut rendered: Rendered,
        state: &AgentState,
        only: Option<&BTreeSet<String>>,
        pack: Option<&guard::Pack>,
        tolerant: bool,
    ) -> Result<Prepared, EngineError> {
        if let Some(only) = only {
            rendered
                .desired
                .resources
                .retain(|id, _| only.contains(&id.target));
        }
        let mut targets = BTreeMap::new();
        for def in &rendered.topology.targets {
            if only.is_some_and(|o| !o.contains(&def.name)) {
                continue;
            }
            targets.insert(def.name.clone(), self.target(def)?);
        }
        // A target the commit does not name (one a later, failed commit
        // added) is still reached through its record: what sluice created
        // there goes.
        for name in only.into_iter().flatten() {
            if let (false, Some(rec)) = (targets.contains_key(name), state.targets.get(name)) {
                targets.insert(name.clone(), self.target(&recorded_def(name, rec))?);
            }
        }
        let rebuilt = match &state.lost {
            Some(_) => Some(self.rebuild(state, &rendered, &targets).await),
            None => None,
        };
        let state = rebuilt.as_ref().unwrap_or(state);
        let mut inventory = Inventory::new();
        let mut observing = Vec::new();
        for (name, target) in &targets {
            let record = state.targets.get(name);
            let mut ids: BTreeSet<ResourceId> = rendered
                .desired
                .for_target(name)
                .map(|r| r.id.clone())
                .collect();
            if let Some(record) = record {
                ids.extend(record.inventory.keys().cloned());
                inventory.extend(record.inventory.clone());
            }
            let ids: Vec<_> = ids.into_iter().collect();
            target.act_as(&users_of(&rendered, name, &ids, &inventory));
            observing.push(async move { (name.clone(), target.observe(&ids).await) });
        }
        // Every target at once: a fleet is observed in one round trip's time.
        let mut live = BTreeMap::new();
        let mut unreachable = BTreeMap::new();
        for (name, observed) in futures_util::future::join_all(observing).await {
            match observed {
                Ok(l) => live.extend(l),
                Err(e) if tolerant => {
                    warn!(target = %name, error = %e, "target not observed; left out");
                    unreachable.insert(name, e.to_string());
                }
                Err(e) => return Err(e.into()),
            }
        }
        // What cannot be seen is not planned: nothing is applied to it and
        // nothing of it pruned.
        targets.retain(|name, _| !unreachable.contains_key(name));
        rendered
            .desired
            .resources
            .retain(|id, _| !unreachable.contains_key(&id.target));
        inventory.retain(|id, _| !unreachable.contains_key(&id.target));
        // An inventory not yet rebuilt prunes nothing.
        let prunable = if state.lost.is_some() {
            Inventory::new()
        } else {
            inventory.clone()
        };
        let plan =
            plan(&rendered.topology, &rendered.desired, &live, &prunable).map_err(|source| {
                EngineError::Render {
                    commit: rendered.desired.revision.commit.to_string(),
                    source,
                }
            })?;
        let guard = match pack {
            None => guard::Report::default(),
            Some(pack) => pack
                .compile()
                .and_then(|c| guard::evaluate(&c, &guard::Input::new(&rendered, &plan)))
                .map_err(|source| EngineError::Guard {
                    commit: rendered.desired.revision.commit.to_string(),
                    source: Box::new(source),
                })?,
        };
        Ok(Prepared {
            rendered,
            targets,
            live,
            inventory,
            plan,
            guard,
            rebuilt,
            unreachable,
        })
    }

    /// Rebuilds a lost inventory from the marks on the live resources of
    /// every target, and the applied and last good commits from the
    /// history; clears `lost` if every target could tell. Returns the state
    /// to plan with (saved by the write paths only).
    async fn rebuild(
        &self,
        state: &AgentState,
        rendered: &Rendered,
        targets: &BTreeMap<String, Arc<dyn Target>>,
    ) -> AgentState {
        let mut state = state.clone();
        let history = self.store.history().unwrap_or_default();
        let mut complete = true;
        let mut found = 0;
        for (name, target) in targets {
            let scope: Vec<ResourceId> = rendered
                .desired
                .for_target(name)
                .map(|r| r.id.clone())
                .collect();
            let rec = state.targets.entry(name.clone()).or_default();
            match target.marked(&scope).await {
                Ok(Some(marks)) => {
                    found += marks.len();
                    for (id, service) in marks {
                        rec.inventory.entry(id).or_insert(service);
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    warn!(target = %name, error = %e, "cannot read the marks of the live resources; nothing is pruned until it can");
                    complete = false;
                }
            }
            // The newest good deployment or revert of this target.
            let good = history.iter().rev().find(|e| {
                matches!(e.kind, HistoryKind::Deploy | HistoryKind::Revert)
                    && e.outcome == Outcome::Succeeded
                    && e.targets.contains(name)
            });
            if let (None, Some(e)) = (&rec.last_good, good) {
                let d = Deployed {
                    commit: e.commit.clone(),
                    digest: e.digest.clone(),
                    commit_time: e.commit_time,
                    summary: e.summary.clone(),
                    at: e.at,
                };
                rec.applied.get_or_insert(d.clone());
                rec.last_good = Some(d);
            }
        }
        if complete {
            info!(
                resources = found,
                "inventory rebuilt from the marks on the live resources"
            );
            state.lost = None;
        }
        state
    }

    /// Saves a rebuilt inventory (the write paths, holding the lock).
    fn keep_rebuilt(&self, prepared: &Prepared) -> Result<(), EngineError> {
        if let Some(rebuilt) = &prepared.rebuilt {
            let mut state = self.store.load()?;
            state.lost = rebuilt.lost.clone();
            for (name, r) in &rebuilt.targets {
                let rec = state.targets.entry(name.clone()).or_default();
                for (id, service) in &r.inventory {
                    rec.inventory.entry(id.clone()).or_insert(service.clone());
                }
                if rec.last_good.is_none() {
                    rec.last_good = r.last_good.clone();
                }
                if rec.applied.is_none() {
                    rec.applied = r.applied.clone();
                }
            }
            self.store.save(&state)?;
        }
        Ok(())
    }

    fn target(&self, def: &TargetDef) -> Result<Arc<dyn Target>, EngineError> {
        if !self.targets.supports(def.kind) {
            return Err(EngineError::Unsupported {
                target: def.name.clone(),
                kind: def.kind,
            });
        }
        Ok(self.targets.target(def)?)
    }

    /// Brings every target to `revision`: plan, waves with gates, record;
    /// on a failed wave or gate, reverts the touched targets to their last
    /// good commit.
    pub async fn apply(
        &self,
        revision: Revision,
        opts: ApplyOptions,
    ) -> Result<Reconciled, EngineError> {
        let state = self.store.load()?;
        if !opts.retry {
            if let Some(failed) = state
                .targets
                .values()
                .filter_map(|t| t.failed.as_ref())
                .find(|f| f.commit == revision.commit)
            {
                return Ok(Reconciled::SkippedFailed {
                    revision,
                    reason: failed.reason.clone(),
                });
            }
        }
        // A rollout of this very commit was cut short by a crash: whatever it
        // applied before must pass its gates again before anything else.
        let resuming = state
            .in_progress
            .as_ref()
            .filter(|p| p.kind == HistoryKind::Deploy && p.commit == revision.commit)
            .map(|p| p.targets.clone());
        let up_to_date = !state.targets.is_empty()
            && state.targets.values().all(|r| {
                r.applied
                    .as_ref()
                    .is_some_and(|a| a.commit == revision.commit)
            });
        if up_to_date && resuming.is_none() && !opts.retry {
            // Nothing new to roll out, and no render needed to know it. Live
            // differing from the applied commit is drift: the drift scan
            // reports or heals it per service policy, not the loop.
            return Ok(Reconciled::UpToDate { revision });
        }
        let prepared = match self.prepare(&revision).await.and_then(|p| {
            if p.guard.is_denied() {
                return Err(EngineError::Denied {
                    commit: revision.commit.to_string(),
                    denies: p.guard.denies().map(|f| f.to_string()).collect(),
                });
            }
            Ok(p)
        }) {
            Ok(p) => p,
            Err(e) => {
                warn!(commit = %revision.commit, error = %e, "commit not applied");
                let mut state = self.store.load()?;
                state.last_error = Some(e.to_string());
                self.store.save(&state)?;
                return Err(e);
            }
        };
        self.keep_rebuilt(&prepared)?;
        for w in prepared.guard.warnings() {
            warn!(commit = %revision.commit, resource = %w.resource, rule = %w.rule, message = %w.message, "policy warning");
        }
        if prepared.plan.is_empty() && resuming.is_none() {
            // Nothing live changes (e.g. only a README changed): remember the
            // commit as applied without calling it a deployment.
            let mut state = self.store.load()?;
            state.last_error = None;
            self.record_good(&mut state, &prepared);
            self.store.save(&state)?;
            self.keep(&revision.commit).await;
            info!(commit = %revision.commit, "commit changes nothing live");
            return Ok(Reconciled::UpToDate { revision });
        }
        // Sync windows gate the start of a rollout (a resumed one finishes:
        // live must end on one whole commit).
        if resuming.is_none() && !opts.window_override {
            let pairs: Vec<(String, String)> = prepared
                .plan
                .changes()
                .map(|c| (c.id.target.clone(), c.service.clone()))
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            if let Err((until, reason)) = window::check(
                &prepared.rendered.topology.windows,
                &pairs,
                self.clock.now(),
            ) {
                info!(commit = %revision.commit, until = ?until, %reason, "waiting for a sync window");
                let waiting = Waiting {
                    commit: revision.commit.clone(),
                    until,
                    reason: reason.clone(),
                };
                self.mark(|s| s.waiting = Some(waiting))?;
                return Ok(Reconciled::Waiting {
                    revision,
                    until,
                    reason,
                });
            }
        }
        let resume: Vec<ResourceId> = match &resuming {
            Some(targets) => prepared
                .plan
                .unchanged
                .iter()
                .filter(|id| targets.contains(&id.target))
                .cloned()
                .collect(),
            None => Vec::new(),
        };
        self.run(prepared, HistoryKind::Deploy, opts, resume).await
    }

    /// Applies a prepared plan wave by wave; on failure reverts.
    async fn run(
        &self,
        prepared: Prepared,
        kind: HistoryKind,
        opts: ApplyOptions,
        resume: Vec<ResourceId>,
    ) -> Result<Reconciled, EngineError> {
        let started = Instant::now();
        let revision = prepared.plan.revision.clone();
        let touched: Vec<String> = prepared
            .plan
            .changes()
            .map(|c| &c.id)
            .chain(&resume)
            .map(|id| id.target.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        info!(commit = %revision.commit, waves = prepared.plan.waves.len(), ?kind, retry = opts.retry, "rollout starting");
        self.mark(|s| {
            s.waiting = None;
            s.in_progress = Some(InProgress {
                kind,
                commit: revision.commit.clone(),
                targets: touched.clone(),
                wave: 0,
                waves: prepared.plan.waves.len(),
                step: "prepare".into(),
                started: self.clock.now(),
                step_started: self.clock.now(),
                traffic: None,
                analysis: Vec::new(),
                attempts: 0,
            })
        })?;
        // Prepare (download, verify, dry-run) everything before the first
        // change; a failure here has written nothing.
        let prepared_ok = self.prepare_targets(&prepared).await;
        let rejected = prepared_ok.is_err();
        let result = match prepared_ok {
            Ok(()) => {
                self.rollout(&prepared, kind == HistoryKind::Deploy, &resume)
                    .await
            }
            Err(e) => Err((e, None)),
        };
        let duration = started.elapsed();
        let (created, updated, deleted) = counts(&prepared.plan);
        let mut entry = HistoryEntry {
            at: self.clock.now(),
            kind,
            outcome: Outcome::Succeeded,
            commit: revision.commit.clone(),
            commit_time: revision.time,
            summary: revision.summary.clone(),
            digest: prepared.plan.digest.clone(),
            targets: touched.clone(),
            created,
            updated,
            deleted,
            duration_ms: duration.as_millis() as u64,
            error: None,
            decision: None,
            retry: opts.retry,
            window_override: opts.window_override,
            analysis: Vec::new(),
        };
        // The analysis verdicts of this run, into its history entry.
        entry.analysis = self
            .store
            .load()?
            .in_progress
            .map(|p| p.analysis)
            .unwrap_or_default();
        match result {
            Ok(()) => {
                let mut state = self.store.load()?;
                self.record_good(&mut state, &prepared);
                forget_overwritten_drift(&mut state, &prepared.plan);
                state.in_progress = None;
                state.last_error = None;
                self.store.transition(&mut state, &entry)?;
                self.keep(&revision.commit).await;
                info!(commit = %revision.commit, ms = duration.as_millis() as u64, "rollout succeeded");
                Ok(Reconciled::Applied {
                    plan: prepared.plan,
                    duration,
                })
            }
            Err((error, decision)) => {
                let reason = error.to_string();
                if rejected {
                    warn!(commit = %revision.commit, error = %reason, "commit rejected before anything was written; nothing to revert");
                } else {
                    warn!(commit = %revision.commit, error = %reason, "rollout failed; reverting");
                }
                entry.outcome = Outcome::Failed;
                entry.error = Some(reason.clone());
                entry.decision = decision;
                let mut state = self.store.load()?;
                for name in &touched {
                    let rec = state.targets.entry(name.clone()).or_default();
                    if kind == HistoryKind::Deploy {
                        rec.failed = Some(Failed {
                            commit: revision.commit.clone(),
                            reason: reason.clone(),
                            at: self.clock.now(),
                            revert_pr: None,
                        });
                    }
                    rec.last_error = Some(reason.clone());
                }
                if rejected {
                    state.in_progress = None;
                    self.store.transition(&mut state, &entry)?;
                    return Ok(Reconciled::Rejected {
                        plan: prepared.plan,
                        error: reason,
                    });
                }
                // The failure and its record in one transition; the revert
                // marks itself next. Killed in between, the restart finds a
                // deploy in progress of a commit recorded as failed and
                // finishes its revert (see `finish_interrupted`).
                // What the rollout reached: the waves up to the failed one
                // (that one too, unless it failed before anything of it was
                // applied, a target being down), and what a resumed run had
                // applied. Only those go back; the others never changed.
                let failed_wave = state.in_progress.as_ref().map_or(0, |p| p.wave);
                let applied_nothing = entry
                    .decision
                    .as_ref()
                    .is_some_and(|d| d.gate == "reachable");
                let reached: Vec<String> = prepared
                    .plan
                    .waves
                    .iter()
                    .filter(|w| {
                        w.index < failed_wave || (w.index == failed_wave && !applied_nothing)
                    })
                    .flat_map(|w| &w.changes)
                    .map(|c| &c.id)
                    .chain(&resume)
                    .map(|id| id.target.clone())
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect();
                if reached.is_empty() {
                    warn!(commit = %revision.commit, error = %reason, "rollout stopped before anything was applied; nothing to revert");
                    state.in_progress = None;
                    self.store.transition(&mut state, &entry)?;
                    return Ok(Reconciled::Rejected {
                        plan: prepared.plan,
                        error: reason,
                    });
                }
                self.store.transition(&mut state, &entry)?;
                let reverted_to = if kind == HistoryKind::Deploy {
                    self.revert_targets(&reached, None).await?
                } else {
                    self.mark(|s| s.in_progress = None)?;
                    None
                };
                if let (Some(good), Some(forge)) = (&reverted_to, &self.forge) {
                    self.write_back(forge.as_ref(), &revision, good, &entry)
                        .await;
                }
                Ok(Reconciled::Reverted {
                    plan: prepared.plan,
                    error: reason,
                    reverted_to,
                })
            }
        }
    }

    /// Prepares (downloads, verifies, dry-runs) every change on its target,
    /// before anything is written.
    async fn prepare_targets(&self, prepared: &Prepared) -> Result<(), EngineError> {
        let preparing = prepared.targets.iter().filter_map(|(name, target)| {
            let wanted: Vec<&DesiredResource> = prepared
                .plan
                .changes()
                .filter(|c| {
                    &c.id.target == name && !matches!(c.action, Action::Delete | Action::Release)
                })
                .filter_map(|c| prepared.rendered.desired.resources.get(&c.id))
                .collect();
            (!wanted.is_empty()).then_some(async move { target.prepare(&wanted).await })
        });
        for prepared in futures_util::future::join_all(preparing).await {
            prepared?;
        }
        Ok(())
    }

    /// Applies every wave in order, each followed by its gate. Inventory is
    /// saved after every wave so a crash never loses what was created.
    ///
    /// `resume` lists resources an interrupted run of the same commit
    /// applied before a crash: they are gated first, so a restart can never
    /// skip the gate of a wave it had applied.
    async fn rollout(
        &self,
        prepared: &Prepared,
        gated: bool,
        resume: &[ResourceId],
    ) -> Result<(), (EngineError, Option<Decision>)> {
        if gated && !resume.is_empty() {
            let services: BTreeSet<String> = resume
                .iter()
                .filter_map(|id| prepared.rendered.desired.resources.get(id))
                .map(|r| r.service.clone())
                .collect();
            let services: Vec<String> = services.into_iter().collect();
            info!(
                resources = resume.len(),
                "re-checking the gates of an interrupted rollout"
            );
            self.gate(prepared, 0, &services, resume).await?;
        }
        // A revert goes on past a target that fails (a host that is down):
        // every other target still goes back; the failed ones stay pending.
        let mut failed: BTreeMap<String, String> = BTreeMap::new();
        for wave in &prepared.plan.waves {
            let step = format!(
                "apply wave {}/{}",
                wave.index + 1,
                prepared.plan.waves.len()
            );
            self.progress(wave.index, &step).map_err(|e| (e, None))?;
            info!(wave = wave.index + 1, services = ?wave.services, ring = wave.ring, "applying wave");
            let apply_failed = |gate: &str, measurement: String, threshold: &str| Decision {
                at: self.clock.now(),
                wave: wave.index + 1,
                gate: gate.into(),
                resource: None,
                measurement,
                threshold: threshold.into(),
                restored_ms: None,
            };
            // Every target of a gated wave must answer before anything of
            // the wave is applied to any of them.
            if gated {
                let names: BTreeSet<&str> =
                    wave.changes.iter().map(|c| c.id.target.as_str()).collect();
                let checks = names.iter().filter_map(|n| {
                    let target = prepared.targets.get(*n)?;
                    Some(async move { (*n, target.reachable().await) })
                });
                let down: Vec<(&str, TargetError)> = futures_util::future::join_all(checks)
                    .await
                    .into_iter()
                    .filter_map(|(n, r)| Some((n, r.err()?)))
                    .collect();
                if let Some((_, e)) = down.into_iter().next() {
                    let decision = apply_failed(
                        "reachable",
                        e.to_string(),
                        "every target of the wave answers before it is applied",
                    );
                    return Err((e.into(), Some(decision)));
                }
            }
            let mut by_target: BTreeMap<&str, Vec<&crate::plan::Change>> = BTreeMap::new();
            for change in &wave.changes {
                if !failed.contains_key(&change.id.target) {
                    by_target.entry(&change.id.target).or_default().push(change);
                }
            }
            // Targets of a wave go at once (a fleet's hosts in parallel; the
            // SSH layer bounds how many); each target's changes in order.
            // One canary at a time: its split is what a restart resumes.
            let one_canary = tokio::sync::Mutex::new(());
            let runs = by_target.into_iter().map(|(name, changes)| {
                let one_canary = &one_canary;
                async move {
                    let mut applied = Vec::new();
                    let Some(target) = prepared.targets.get(name) else {
                        return (name, applied, Ok(()));
                    };
                    for change in changes {
                        let desired = prepared.rendered.desired.resources.get(&change.id);
                        if let (true, Action::Update, Some(r)) = (gated, change.action, desired) {
                            if let Some(traffic) =
                                self.progressive_for(prepared, target.as_ref(), r).await
                            {
                                let _one = one_canary.lock().await;
                                let result =
                                    self.progressive(prepared, wave.index, traffic, r).await;
                                if let Err(e) = self.record_inventory(
                                    prepared,
                                    change.action,
                                    &change.id,
                                    &change.service,
                                    true,
                                ) {
                                    return (name, applied, Err((e, None)));
                                }
                                if let Err(e) = result {
                                    return (name, applied, Err(e));
                                }
                                applied.push(change.id.clone());
                                continue;
                            }
                        }
                        let result = match change.action {
                            Action::Create | Action::Update => match desired {
                                Some(r) => target.apply(r).await.map(|()| {
                                    applied.push(change.id.clone());
                                }),
                                None => Ok(()),
                            },
                            // The target releases what it must not delete.
                            Action::Delete | Action::Release => target.delete(&change.id).await,
                            Action::Unchanged => Ok(()),
                        };
                        // Inventory first: whatever was created is recorded
                        // even if a later change of the wave fails.
                        if let Err(e) = self.record_inventory(
                            prepared,
                            change.action,
                            &change.id,
                            &change.service,
                            result.is_ok(),
                        ) {
                            return (name, applied, Err((e, None)));
                        }
                        if let Err(e) = result {
                            let decision = apply_failed(
                                "apply",
                                e.to_string(),
                                "every change of the wave applies",
                            );
                            return (name, applied, Err((e.into(), Some(decision))));
                        }
                    }
                    (name, applied, Ok(()))
                }
            });
            let mut applied = Vec::new();
            let mut first_error = None;
            for (name, done, result) in futures_util::future::join_all(runs).await {
                applied.extend(done);
                if let Err((e, decision)) = result {
                    if matches!(e, EngineError::Store(_)) {
                        return Err((e, decision));
                    }
                    if gated {
                        first_error.get_or_insert((e, decision));
                    } else {
                        warn!(target = %name, error = %e, "target not reverted; retried by every reconcile");
                        failed.insert(name.to_string(), e.to_string());
                    }
                }
            }
            if let Some(failure) = first_error {
                return Err(failure);
            }
            if gated && !applied.is_empty() {
                self.gate(prepared, wave.index, &wave.services, &applied)
                    .await?;
            }
        }
        if !failed.is_empty() {
            return Err((EngineError::Partial { failed }, None));
        }
        Ok(())
    }

    /// Runs the wave's gates (health with soak, then any from the gate
    /// factories) until all pass, one fails, or the gate timeout runs out.
    /// Every failure writes a decision record: gate, measurement, threshold.
    async fn gate(
        &self,
        prepared: &Prepared,
        wave: usize,
        services: &[String],
        ids: &[ResourceId],
    ) -> Result<(), (EngineError, Option<Decision>)> {
        let topo = &prepared.rendered.topology;
        let (timeout, soak) = gate_times(topo, services);
        let mut gates: Vec<Box<dyn Gate>> = vec![Box::new(HealthGate::new(timeout, soak))];
        for f in &self.gate_factories {
            gates.extend(f.gates(topo, services));
        }
        let names: Vec<&str> = gates.iter().map(|g| g.name()).collect();
        let step = format!(
            "gate wave {}: {} (timeout {}s, soak {}s)",
            wave + 1,
            names.join(", "),
            timeout.as_secs(),
            soak.as_secs()
        );
        self.progress(wave, &step).map_err(|e| (e, None))?;
        let started = Instant::now();
        // Checks back off from `gate_poll` to MAX_GATE_POLL: a wave that is
        // slow to become healthy, or soaking, costs a few requests a
        // second at first and one every two seconds after.
        let mut poll = self.gate_poll;
        let fail =
            |gate: &str, resource: Option<String>, measurement: String, threshold: String| {
                let decision = Decision {
                    at: self.clock.now(),
                    wave: wave + 1,
                    gate: gate.to_string(),
                    resource,
                    measurement: measurement.clone(),
                    threshold: threshold.clone(),
                    restored_ms: None,
                };
                (
                    EngineError::Gate {
                        wave: wave + 1,
                        reason: format!("{gate}: {measurement} (threshold: {threshold})"),
                    },
                    Some(decision),
                )
            };
        loop {
            let live = self.observe_ids(prepared, ids).await;
            let ctx = GateContext {
                wave,
                services,
                resources: ids,
                live: &live,
                elapsed: started.elapsed(),
            };
            let mut waiting = None;
            for g in &gates {
                match g.check(&ctx).await {
                    Verdict::Pass => {}
                    Verdict::Wait { reason } => {
                        waiting.get_or_insert((g.name().to_string(), reason));
                    }
                    Verdict::Fail {
                        resource,
                        measurement,
                        threshold,
                    } => {
                        return Err(fail(g.name(), resource, measurement, threshold));
                    }
                }
            }
            let Some((gate, reason)) = waiting else {
                return Ok(());
            };
            if started.elapsed() >= timeout + soak {
                return Err(fail(
                    &gate,
                    None,
                    format!("{reason}, not decided in time"),
                    format!("passed within {}s", (timeout + soak).as_secs()),
                ));
            }
            // Where every gate says when it must look again and every
            // target can watch, wait for a change instead of polling; at
            // least `poll` apart, so a burst of status updates costs one
            // read, not one each.
            let elapsed = started.elapsed();
            let recheck = gates
                .iter()
                .map(|g| g.recheck_in(elapsed))
                .try_fold((timeout + soak).saturating_sub(elapsed), |m, r| {
                    r.map(|r| m.min(r))
                });
            let looked = Instant::now();
            let watched = match recheck {
                Some(max) if !max.is_zero() => self.changed(prepared, ids, max).await,
                Some(_) => Some(false),
                None => None,
            };
            match watched {
                Some(true) => {
                    let since = looked.elapsed();
                    if since < poll {
                        self.clock.sleep(poll - since).await;
                    }
                }
                Some(false) => {}
                None => self.clock.sleep(poll).await,
            }
            poll = (poll * 2).min(MAX_GATE_POLL.max(self.gate_poll));
        }
    }

    /// Waits until one of `ids` may have changed, at most `max`, on every
    /// target they live on: Some(true) on a change, Some(false) when
    /// `max` passed quietly, None if a target cannot watch.
    async fn changed(
        &self,
        prepared: &Prepared,
        ids: &[ResourceId],
        max: Duration,
    ) -> Option<bool> {
        let mut by_target: BTreeMap<&str, Vec<ResourceId>> = BTreeMap::new();
        for id in ids {
            by_target.entry(&id.target).or_default().push(id.clone());
        }
        let waits: Vec<_> = by_target
            .iter()
            .filter_map(|(name, ids)| {
                let target = prepared.targets.get(*name)?.clone();
                let ids = ids.clone();
                Some(Box::pin(async move { target.changed(&ids, max).await }))
            })
            .collect();
        if waits.is_empty() {
            return None;
        }
        let (first, _, _) = futures_util::future::select_all(waits).await;
        first
    }

    /// Live state of `ids` across targets; a target that cannot be observed
    /// makes its resources Unknown.
    async fn observe_ids(
        &self,
        prepared: &Prepared,
        ids: &[ResourceId],
    ) -> BTreeMap<ResourceId, LiveResource> {
        let mut by_target: BTreeMap<&str, Vec<ResourceId>> = BTreeMap::new();
        for id in ids {
            by_target.entry(&id.target).or_default().push(id.clone());
        }
        let observing = by_target.into_iter().filter_map(|(name, ids)| {
            let target = prepared.targets.get(name)?;
            Some(async move { (target.observe(&ids).await, ids) })
        });
        let mut out = BTreeMap::new();
        for (observed, ids) in futures_util::future::join_all(observing).await {
            match observed {
                Ok(l) => out.extend(l),
                Err(e) => {
                    for id in ids {
                        out.insert(
                            id.clone(),
                            LiveResource {
                                id,
                                body: serde_json::Value::Null,
                                health: Health::Unknown,
                                managed: None,
                                message: Some(e.to_string()),
                            },
                        );
                    }
                }
            }
        }
        out
    }

    /// Puts `targets` back to their last good commit (or `to`), in reverse
    /// wave order, without gates or soak: a revert must be fast. Works with
    /// the remote down: the commit is read from the local object database.
    pub async fn revert_targets(
        &self,
        targets: &[String],
        to: Option<&CommitId>,
    ) -> Result<Option<CommitId>, EngineError> {
        let state = self.store.load()?;
        let commit = match to {
            Some(c) => c.clone(),
            None => {
                let goods: BTreeSet<CommitId> = targets
                    .iter()
                    .filter_map(|t| state.targets.get(t)?.last_good.as_ref())
                    .map(|d| d.commit.clone())
                    .collect();
                match goods.into_iter().next() {
                    Some(c) => c,
                    None => {
                        warn!(
                            ?targets,
                            "no last good commit to revert to; leaving live state as it is"
                        );
                        self.mark(|s| s.in_progress = None)?;
                        return Ok(None);
                    }
                }
            }
        };
        let revision = self.source.resolve(commit.as_str()).await?;
        let (_, rendered) = self.render_commit(&commit).await?;
        let only: BTreeSet<String> = targets.iter().cloned().collect();
        let state = self.store.load()?;
        let mut prepared = self
            .prepare_rendered(rendered, &state, Some(&only), None, true)
            .await?;
        self.keep_rebuilt(&prepared)?;
        prepared.plan.waves.reverse();
        info!(commit = %commit, waves = prepared.plan.waves.len(), "reverting");
        let started = Instant::now();
        let mut attempts = 0;
        self.mark(|s| {
            attempts = s
                .in_progress
                .as_ref()
                .filter(|p| p.kind == HistoryKind::Revert && p.commit == commit)
                .map_or(0, |p| p.attempts);
            s.in_progress = Some(InProgress {
                kind: HistoryKind::Revert,
                commit: commit.clone(),
                targets: targets.to_vec(),
                wave: 0,
                waves: prepared.plan.waves.len(),
                step: "revert".into(),
                started: self.clock.now(),
                step_started: self.clock.now(),
                traffic: None,
                analysis: Vec::new(),
                attempts,
            })
        })?;
        let result = self.rollout(&prepared, false, &[]).await;
        let (created, updated, deleted) = counts(&prepared.plan);
        let mut state = self.store.load()?;
        let error = result.as_ref().err().map(|(e, _)| e.to_string());
        // Which targets are still not back: those the revert went past, or
        // all of them when it stopped as a whole (the store, a render).
        let mut pending: BTreeMap<String, String> = match &result {
            Ok(()) => BTreeMap::new(),
            Err((EngineError::Partial { failed }, _)) => failed.clone(),
            Err((e, _)) => prepared
                .targets
                .keys()
                .map(|t| (t.clone(), e.to_string()))
                .collect(),
        };
        pending.extend(prepared.unreachable.clone());
        for (name, e) in &pending {
            if !prepared.targets.contains_key(name) {
                state.targets.entry(name.clone()).or_default().last_error =
                    Some(format!("revert to {} pending: {e}", commit.short()));
            }
        }
        let error = match (&error, pending.is_empty()) {
            (None, false) => Some(
                EngineError::Partial {
                    failed: pending.clone(),
                }
                .to_string(),
            ),
            _ => error,
        };
        for name in prepared.targets.keys() {
            let rec = state.targets.entry(name.clone()).or_default();
            match pending.get(name) {
                None => {
                    let deployed = self.deployed(&prepared, name);
                    rec.applied = Some(deployed.clone());
                    rec.last_good = Some(deployed);
                }
                Some(e) => {
                    rec.last_error = Some(format!("revert to {} failed: {e}", commit.short()))
                }
            }
        }
        // A failed revert stays in progress for the targets not back yet:
        // the next reconcile tries them again (live is on no whole commit
        // until it succeeds); status lists them as pending.
        state.in_progress = match (&error, state.in_progress.take()) {
            (Some(_), Some(mut p)) => {
                p.attempts = attempts + 1;
                p.targets.retain(|t| pending.contains_key(t));
                if p.targets.is_empty() {
                    p.targets = pending.keys().cloned().collect();
                }
                Some(p)
            }
            _ => None,
        };
        let outcome = match result {
            Err((e, _)) => Err(e),
            Ok(()) if pending.is_empty() => Ok(()),
            Ok(()) => Err(EngineError::Partial { failed: pending }),
        };
        if error.is_some() && attempts > 0 {
            // Recorded once, at the first failure; retries only count.
            self.store.save(&state)?;
            return outcome.map(|()| Some(commit));
        }
        let mut entry = HistoryEntry::of(
            HistoryKind::Revert,
            self.clock.now(),
            (&commit, revision.time, &revision.summary),
            targets.to_vec(),
            error.clone(),
        );
        entry.digest = prepared.plan.digest.clone();
        (entry.created, entry.updated, entry.deleted) = (created, updated, deleted);
        entry.duration_ms = started.elapsed().as_millis() as u64;
        self.store.transition(&mut state, &entry)?;
        match outcome {
            Ok(()) => {
                info!(commit = %commit, ms = started.elapsed().as_millis() as u64, "revert done");
                Ok(Some(commit))
            }
            Err(e) => Err(e),
        }
    }

    /// `sluice revert`: puts every target back to its last good commit (or
    /// `to`), and holds the commit that was live so the loop does not roll
    /// it out again; a newer commit rolls forward as usual.
    pub async fn revert_by_hand(
        &self,
        to: Option<&CommitId>,
    ) -> Result<Option<CommitId>, EngineError> {
        let state = self.store.load()?;
        let targets: Vec<String> = state.targets.keys().cloned().collect();
        let now = self.clock.now();
        self.mark(|s| {
            for rec in s.targets.values_mut() {
                let Some(applied) = &rec.applied else {
                    continue;
                };
                let target_commit = to.or(rec.last_good.as_ref().map(|d| &d.commit));
                if Some(&applied.commit) != target_commit {
                    rec.failed = Some(Failed {
                        revert_pr: None,
                        commit: applied.commit.clone(),
                        reason: format!(
                            "reverted by hand to {}",
                            target_commit
                                .map(|c| c.short().to_string())
                                .unwrap_or_default()
                        ),
                        at: now,
                    });
                }
            }
        })?;
        self.revert_targets(&targets, to).await
    }

    /// Takes down everything sluice created on `targets` (every target with
    /// a record when empty): the inventory's resources are deleted in
    /// reverse wave order (the last wave's services first, routes before
    /// processes), as `argocd app delete --cascade` does. Kinds that are
    /// only pruned on opt-in are released, not deleted. With `dry_run`,
    /// only the plan. Recorded in the history as a `down`; the last good
    /// commit stays, so `sluice revert` brings it back.
    pub async fn down(
        &self,
        targets: &[String],
        dry_run: bool,
    ) -> Result<(Plan, Vec<String>), EngineError> {
        let state = self.store.load()?;
        let names: BTreeSet<String> = if targets.is_empty() {
            state.targets.keys().cloned().collect()
        } else {
            targets.iter().cloned().collect()
        };
        // The topology of what was applied orders the waves; with nothing
        // applied there is nothing to take down.
        let applied = names
            .iter()
            .filter_map(|n| state.targets.get(n)?.applied.as_ref())
            .map(|d| d.commit.clone())
            .next();
        let Some(commit) = applied else {
            let revision = state.source.last_seen.clone().unwrap_or(Revision {
                commit: CommitId::parse(&"0".repeat(40)).expect("40 hex digits"),
                time: 0,
                summary: String::new(),
            });
            return Ok((
                Plan {
                    revision,
                    digest: String::new(),
                    waves: Vec::new(),
                    unchanged: Vec::new(),
                    strategies: BTreeMap::new(),
                },
                Vec::new(),
            ));
        };
        let (snapshot, mut rendered) = self.render_commit(&commit).await?;
        rendered.desired.resources.clear();
        let prepared = self
            .prepare_rendered(rendered, &state, Some(&names), None, false)
            .await?;
        self.keep_rebuilt(&prepared)?;
        let mut plan = prepared.plan.clone();
        plan.waves.reverse();
        for (i, w) in plan.waves.iter_mut().enumerate() {
            w.index = i;
        }
        if dry_run {
            return Ok((plan, Vec::new()));
        }
        let started = Instant::now();
        let mut errors = Vec::new();
        for change in plan.changes() {
            let Some(target) = prepared.targets.get(&change.id.target) else {
                continue;
            };
            let result = target.delete(&change.id).await;
            if let Err(e) = &result {
                warn!(resource = %change.id, error = %e, "not taken down");
                errors.push(format!("{}: {e}", change.id));
            }
            self.record_inventory(
                &prepared,
                change.action,
                &change.id,
                &change.service,
                result.is_ok(),
            )?;
        }
        let mut state = self.store.load()?;
        for name in &names {
            if let Some(rec) = state.targets.get_mut(name) {
                if errors.is_empty() {
                    rec.applied = None;
                }
                rec.last_error = (!errors.is_empty()).then(|| errors.join("; "));
            }
        }
        let mut entry = HistoryEntry::of(
            HistoryKind::Down,
            self.clock.now(),
            (&commit, snapshot.revision.time, &snapshot.revision.summary),
            names.iter().cloned().collect(),
            (!errors.is_empty()).then(|| errors.join("; ")),
        );
        entry.deleted = plan.count(Action::Delete);
        entry.duration_ms = started.elapsed().as_millis() as u64;
        self.store.transition(&mut state, &entry)?;
        info!(targets = ?names, deleted = entry.deleted, failed = errors.len(), "taken down");
        Ok((plan, errors))
    }

    /// After a crash: an interrupted revert is finished; an interrupted
    /// rollout is left to the next apply, which re-runs it idempotently.
    pub async fn finish_interrupted(&self) -> Result<(), EngineError> {
        if let Some(why) = self.store.salvage()? {
            warn!(reason = %why, "state store unreadable; inventory to be rebuilt from the live resources");
        }
        if self.store.recover()? {
            warn!("a transition was cut short by a restart; its history entry is recorded now");
        }
        // The targets' own machinery first (orphaned processes adopted).
        let records = self.store.load()?.targets;
        let maintaining = records.iter().filter_map(|(name, rec)| {
            let target = self.target(&recorded_def(name, rec)).ok()?;
            Some(async move { (name, target.maintain().await) })
        });
        for (name, result) in futures_util::future::join_all(maintaining).await {
            match result {
                Ok(fixed) if !fixed.is_empty() => {
                    warn!(target = %name, instances = ?fixed, "processes whose supervisor died adopted again")
                }
                Ok(_) => {}
                Err(e) => warn!(target = %name, error = %e, "target maintenance failed"),
            }
        }
        let mut state = self.store.load()?;
        // A state that lost its inventory (state.json deleted or emptied)
        // while the history records deployments: nothing it forgot can be
        // pruned (the safe side), and that is said, not silent.
        if state.targets.is_empty() && state.lost.is_none() {
            let deployed = self
                .store
                .history()?
                .iter()
                .filter(|e| e.kind == HistoryKind::Deploy && e.outcome == Outcome::Succeeded)
                .count();
            if deployed > 0 {
                let reason = format!(
                    "the state store has no inventory, yet the history records {deployed} deployment(s): state.json was lost or emptied"
                );
                warn!(%reason, "state store lost; inventory to be rebuilt from the live resources");
                state.lost = Some(reason);
                self.store.save(&state)?;
            }
        }
        if let Some(p) = state.in_progress {
            // A deploy recorded as failed whose revert never marked itself
            // started: killed between the two; the revert is what comes next.
            let failed = p.kind == HistoryKind::Deploy
                && p.targets.iter().any(|t| {
                    state
                        .targets
                        .get(t)
                        .and_then(|r| r.failed.as_ref())
                        .is_some_and(|f| f.commit == p.commit)
                });
            if p.kind == HistoryKind::Revert {
                warn!(commit = %p.commit, "finishing a revert interrupted by a restart");
                self.revert_targets(&p.targets, Some(&p.commit)).await?;
            } else if failed {
                warn!(commit = %p.commit, "a failed rollout's revert was interrupted before it started; reverting now");
                self.revert_targets(&p.targets, None).await?;
            } else {
                warn!(commit = %p.commit, wave = p.wave, "a rollout was interrupted; re-running it");
            }
        }
        Ok(())
    }

    /// Compares each target's live state with the commit applied to it.
    /// Resources sluice does not manage are never drift; secrets are
    /// redacted in the field changes. With `heal`, services whose policy is
    /// `heal` get their drifted resources re-applied (recorded as a heal).
    ///
    /// Saves the scan in the state for status and metrics: callers hold the
    /// apply lock, as for any other write of the state.
    pub async fn drift(&self, heal: bool) -> Result<Vec<DriftReport>, EngineError> {
        let reports = self.drift_scan(heal).await?;
        let scan = DriftScan {
            at: self.clock.now(),
            items: reports
                .iter()
                .map(|r| {
                    let lines = r
                        .items
                        .iter()
                        .filter(|i| !r.healed.contains(&i.id))
                        .map(|i| {
                            let kind = match i.kind {
                                DriftKind::Missing => "missing",
                                DriftKind::Modified => "modified",
                            };
                            let fields: Vec<&str> =
                                i.fields.iter().map(|f| f.path.as_str()).collect();
                            if fields.is_empty() {
                                format!("{kind} {}", i.id)
                            } else {
                                format!("{kind} {} ({})", i.id, fields.join(", "))
                            }
                        })
                        .collect();
                    (r.target.clone(), lines)
                })
                .collect(),
        };
        self.mark(|s| s.drift = Some(scan))?;
        Ok(reports)
    }

    /// The scan itself; saves nothing (reports run it beside a rollout).
    /// `heal` re-applies and records heals, so it needs the apply lock.
    pub async fn drift_scan(&self, heal: bool) -> Result<Vec<DriftReport>, EngineError> {
        let state = self.store.load()?;
        let mut reports = Vec::new();
        // Targets on the same commit are rendered once and observed at once
        // (a fleet: one render, one round trip per host in parallel).
        let mut by_commit: BTreeMap<&CommitId, BTreeSet<String>> = BTreeMap::new();
        for (name, rec) in &state.targets {
            if let Some(applied) = &rec.applied {
                by_commit
                    .entry(&applied.commit)
                    .or_default()
                    .insert(name.clone());
            }
        }
        let mut scanned = BTreeMap::new();
        for (commit, names) in by_commit {
            let (_, rendered) = self.render_commit(commit).await?;
            let prepared = Arc::new(
                self.prepare_rendered(rendered, &state, Some(&names), None, true)
                    .await?,
            );
            // A host that is down is not scanned (it has no drift to tell
            // until it answers); the others are.
            for name in names {
                if !prepared.unreachable.contains_key(&name) {
                    scanned.insert(name, prepared.clone());
                }
            }
        }
        for (name, prepared) in scanned {
            let Some(applied) = state.targets.get(&name).and_then(|r| r.applied.as_ref()) else {
                continue;
            };
            let items: Vec<DriftItem> = prepared
                .plan
                .changes()
                .filter(|c| c.id.target == name)
                .filter(|c| !matches!(c.action, Action::Delete | Action::Release))
                .map(|c| DriftItem {
                    id: c.id.clone(),
                    service: c.service.clone(),
                    kind: if c.action == Action::Create || fewer_replicas(&c.fields) {
                        DriftKind::Missing
                    } else {
                        DriftKind::Modified
                    },
                    fields: c.fields.clone(),
                })
                .collect();
            let healing: BTreeSet<&str> = prepared
                .rendered
                .topology
                .services
                .iter()
                .filter(|(_, s)| s.drift == crate::model::DriftPolicy::Heal)
                .map(|(n, _)| n.as_str())
                .collect();
            let mut healed = Vec::new();
            let mut heal_failed = Vec::new();
            if heal && items.iter().any(|i| healing.contains(i.service.as_str())) {
                let started = Instant::now();
                let mut errors = Vec::new();
                for item in items
                    .iter()
                    .filter(|i| healing.contains(i.service.as_str()))
                {
                    let (Some(target), Some(r)) = (
                        prepared.targets.get(&item.id.target),
                        prepared.rendered.desired.resources.get(&item.id),
                    ) else {
                        continue;
                    };
                    match target.apply(r).await {
                        Ok(()) => healed.push(item.id.clone()),
                        Err(e) => {
                            warn!(resource = %item.id, error = %e, "drift not healed");
                            errors.push(e.to_string());
                            heal_failed.push((item.id.clone(), e.to_string()));
                        }
                    }
                }
                info!(target = %name, healed = healed.len(), failed = heal_failed.len(), "drift healed");
                if !errors.is_empty() {
                    let reason = format!("drift not healed: {}", errors.join("; "));
                    self.mark(|s| {
                        s.targets.entry(name.clone()).or_default().last_error =
                            Some(reason.clone());
                    })?;
                }
                let mut entry = HistoryEntry::of(
                    HistoryKind::Heal,
                    self.clock.now(),
                    (&applied.commit, applied.commit_time, &applied.summary),
                    vec![name.clone()],
                    (!errors.is_empty()).then(|| errors.join("; ")),
                );
                entry.digest = applied.digest.clone();
                entry.updated = healed.len();
                entry.duration_ms = started.elapsed().as_millis() as u64;
                self.store.append(&entry)?;
            }
            reports.push(DriftReport {
                target: name.clone(),
                commit: applied.commit.clone(),
                items,
                healed,
                heal_failed,
            });
        }
        Ok(reports)
    }

    /// What merging `head` would do: its plan against the live system, its
    /// plan against `base` (the branch diff, for reviewers), and the drift
    /// in live that the merge would overwrite. Changes nothing live.
    pub async fn report(&self, base: &Revision, head: &Revision) -> Result<PrReport, EngineError> {
        let live_plan = self.prepare(head).await?;
        let (_, base_r) = self.render_commit(&base.commit).await?;
        let as_live: BTreeMap<ResourceId, LiveResource> = base_r
            .desired
            .resources
            .iter()
            .map(|(id, r)| {
                let l = LiveResource {
                    id: id.clone(),
                    body: r.body.clone(),
                    health: Health::Healthy,
                    managed: None,
                    message: None,
                };
                (id.clone(), l)
            })
            .collect();
        let base_inventory: Inventory = base_r
            .desired
            .resources
            .iter()
            .map(|(id, r)| (id.clone(), r.service.clone()))
            .collect();
        let against_base = plan(
            &live_plan.rendered.topology,
            &live_plan.rendered.desired,
            &as_live,
            &base_inventory,
        )
        .map_err(|source| EngineError::Render {
            commit: head.commit.to_string(),
            source,
        })?;
        let changed: BTreeSet<&ResourceId> = live_plan.plan.changes().map(|c| &c.id).collect();
        let drift = match self.drift_scan(false).await {
            Ok(reports) => reports
                .into_iter()
                .flat_map(|r| r.items)
                .filter(|i| changed.contains(&i.id))
                .collect(),
            Err(e) => {
                warn!(error = %e, "drift scan for the report failed");
                Vec::new()
            }
        };
        let today = self.clock.now().date_naive();
        let expired_flags = live_plan
            .rendered
            .flags
            .as_ref()
            .map(|f| {
                f.expired(today)
                    .into_iter()
                    .map(|(n, f)| {
                        format!(
                            "{n} (owner {}, expired {})",
                            f.owner.as_deref().unwrap_or("none"),
                            f.expires.map(|d| d.to_string()).unwrap_or_default()
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut contents = BTreeMap::new();
        for change in live_plan.plan.changes() {
            let id = &change.id;
            let want = live_plan.rendered.desired.resources.get(id);
            let paths = want.map(|r| r.redact.clone()).unwrap_or_default();
            let show = |v: &serde_json::Value| crate::diff::redact_body(v, &paths).into_owned();
            let live = live_plan.live.get(id).map(|l| match (&l.managed, want) {
                (Some(managed), Some(w)) => crate::managed::project(&l.body, &w.body, managed),
                _ => l.body.clone(),
            });
            let head =
                want.map(
                    |w| match live_plan.live.get(id).and_then(|l| l.managed.as_ref()) {
                        Some(_) => crate::managed::normalise_desired(&w.body),
                        None => w.body.clone(),
                    },
                );
            contents.insert(
                id.to_string(),
                Contents {
                    head: head.as_ref().map(show),
                    live: live.as_ref().map(show),
                    base: base_r.desired.resources.get(id).map(|r| show(&r.body)),
                    redacted: paths.clone(),
                },
            );
        }
        let rollouts = live_plan
            .plan
            .strategies
            .keys()
            .filter_map(|svc| {
                let def = live_plan.rendered.topology.services.get(svc)?;
                Some((svc.clone(), def.rollout.describe()))
            })
            .collect();
        Ok(PrReport {
            base: base.clone(),
            head: head.clone(),
            against_live: live_plan.plan,
            against_base,
            drift_overwritten: drift,
            expired_flags,
            guard: live_plan.guard,
            contents,
            rollouts,
            base_name: None,
            head_name: None,
        })
    }

    /// Live health of everything in the inventory, per target.
    pub async fn status(&self) -> Result<Status, EngineError> {
        let state = self.store.load()?;
        let mut resources = BTreeMap::new();
        let observing = state.targets.iter().map(|(name, rec)| async move {
            let ids: Vec<_> = rec.inventory.keys().cloned().collect();
            let t = self.target(&recorded_def(name, rec)).ok()?;
            // A host that does not answer shows as unknown, at once: status
            // must answer while part of a fleet is down.
            tokio::time::timeout(STATUS_OBSERVE_TIMEOUT, t.observe(&ids))
                .await
                .ok()?
                .ok()
        });
        let observed = futures_util::future::join_all(observing).await;
        for ((name, rec), live) in state.targets.iter().zip(observed) {
            let list = rec
                .inventory
                .iter()
                .map(|(id, service)| {
                    let l = live.as_ref().and_then(|l| l.get(id));
                    ResourceStatus {
                        id: id.clone(),
                        service: service.clone(),
                        health: match (&live, l) {
                            (None, _) => Health::Unknown,
                            (Some(_), None) => Health::Missing,
                            (Some(_), Some(l)) => l.health,
                        },
                        message: l.and_then(|l| l.message.clone()),
                    }
                })
                .collect();
            resources.insert(name.clone(), list);
        }
        Ok(Status {
            state,
            resources,
            history: self.store.history()?,
        })
    }

    /// Opens a pull request reverting the failed commit, so git says again
    /// what is live; records its URL with the failure. Failures here are
    /// logged, never fatal: the live system is already back.
    async fn write_back(
        &self,
        forge: &dyn PullRequests,
        failed: &Revision,
        good: &CommitId,
        entry: &HistoryEntry,
    ) {
        let Some(base) = self.source.watched_branch() else {
            warn!("no watched branch known; not opening a revert pull request");
            return;
        };
        let decision = entry
            .decision
            .as_ref()
            .map(|d| {
                format!(
                    "Decision: wave {}, gate {}: {} (threshold: {}), at {}.",
                    d.wave,
                    d.gate,
                    d.measurement,
                    d.threshold,
                    d.at.to_rfc3339()
                )
            })
            .unwrap_or_default();
        let title = format!("Revert \"{}\"", failed.summary);
        let body = format!(
            "This reverts commit {}: its rollout failed and sluice put the live system back to {}.\n\n{}\n\nMerging this makes git say again what is live.",
            failed.commit, good, decision
        );
        let message = format!("{title}\n\n{body}\n");
        let result = match self.source.push_revert(&failed.commit, &message).await {
            Ok(branch) => forge.open(&branch, &base, &title, &body).await,
            Err(e) => Err(e.to_string()),
        };
        match result {
            Ok(url) => {
                info!(commit = %failed.commit, url = %url, "revert pull request opened");
                let _ = self.mark(|s| {
                    for rec in s.targets.values_mut() {
                        if let Some(f) = rec.failed.as_mut().filter(|f| f.commit == failed.commit) {
                            f.revert_pr = Some(url.clone());
                        }
                    }
                });
            }
            Err(e) => {
                warn!(commit = %failed.commit, error = %e, "could not open the revert pull request")
            }
        }
    }

    /// Records `prepared`'s commit as applied and good on each of its
    /// targets, clearing their failure and error.
    fn record_good(&self, state: &mut AgentState, prepared: &Prepared) {
        for (name, target) in &prepared.targets {
            let rec = state.targets.entry(name.clone()).or_default();
            rec.kind = Some(target.kind());
            rec.ssh = prepared
                .rendered
                .topology
                .targets
                .iter()
                .find(|t| &t.name == name)
                .and_then(|t| t.ssh.clone());
            let deployed = self.deployed(prepared, name);
            rec.applied = Some(deployed.clone());
            rec.last_good = Some(deployed);
            rec.failed = None;
            rec.last_error = None;
        }
    }

    fn deployed(&self, prepared: &Prepared, target: &str) -> Deployed {
        let rev = &prepared.rendered.desired.revision;
        Deployed {
            commit: rev.commit.clone(),
            digest: prepared.rendered.desired.target_digest(target),
            commit_time: rev.time,
            summary: rev.summary.clone(),
            at: self.clock.now(),
        }
    }

    async fn keep(&self, commit: &CommitId) {
        if let Err(e) = self.source.keep(commit).await {
            warn!(commit = %commit, error = %e, "could not pin the commit locally");
        }
    }

    pub(crate) fn mark(&self, f: impl FnOnce(&mut AgentState)) -> Result<(), EngineError> {
        let mut state = self.store.load()?;
        f(&mut state);
        self.store.save(&state)?;
        Ok(())
    }

    pub(crate) fn progress(&self, wave: usize, step: &str) -> Result<(), EngineError> {
        let now = self.clock.now();
        self.mark(|s| {
            if let Some(p) = &mut s.in_progress {
                p.wave = wave;
                p.step = step.to_string();
                p.step_started = now;
            }
        })
    }

    fn record_inventory(
        &self,
        prepared: &Prepared,
        action: Action,
        id: &ResourceId,
        service: &str,
        ok: bool,
    ) -> Result<(), EngineError> {
        let kind = prepared.targets.get(&id.target).map(|t| t.kind());
        let ssh = prepared
            .rendered
            .topology
            .targets
            .iter()
            .find(|t| t.name == id.target)
            .and_then(|t| t.ssh.clone());
        self.mark(|s| {
            let rec: &mut TargetRecord = s.targets.entry(id.target.clone()).or_default();
            rec.kind = rec.kind.or(kind);
            // Where a remote host is, for a revert or status without its
            // commit.
            if ssh.is_some() {
                rec.ssh = ssh;
            }
            match action {
                // Recorded even when the apply failed: it may have created
                // something part-way, and only the inventory is ever pruned.
                Action::Create | Action::Update => {
                    rec.inventory.insert(id.clone(), service.to_string());
                }
                Action::Delete | Action::Release if ok => {
                    rec.inventory.remove(id);
                }
                _ => {}
            }
        })
    }
}

/// How long status waits for one target's live state.
const STATUS_OBSERVE_TIMEOUT: Duration = Duration::from_secs(2);

/// The longest wait between two checks of a wave's gates.
const MAX_GATE_POLL: Duration = Duration::from_secs(2);

/// The target a record is about, as far as the record knows it (for
/// status and maintenance, which run without a commit).
fn recorded_def(name: &str, rec: &crate::store::TargetRecord) -> TargetDef {
    TargetDef {
        name: name.to_string(),
        kind: rec.kind.unwrap_or(TargetKind::Host),
        ring: 0,
        service_account_name: None,
        ssh: rec.ssh.clone(),
    }
}

/// A rollout applies its commit whole, as Argo CD's and Flux's syncs do:
/// drift it re-applied is gone, so the last scan stops listing it.
fn forget_overwritten_drift(state: &mut AgentState, plan: &Plan) {
    let Some(scan) = &mut state.drift else {
        return;
    };
    let applied: BTreeSet<String> = plan.changes().map(|c| c.id.to_string()).collect();
    for items in scan.items.values_mut() {
        items.retain(|line| {
            line.split_whitespace()
                .nth(1)
                .is_none_or(|id| !applied.contains(id))
        });
    }
    scan.items.retain(|_, items| !items.is_empty());
}

/// Whether a resource differs only in having fewer replicas live than
/// desired: replicas gone, reported as missing.
fn fewer_replicas(fields: &[crate::diff::FieldChange]) -> bool {
    matches!(fields, [f] if f.path == "spec.replicas"
        && f.old.as_ref().and_then(|v| v.as_u64()) < f.new.as_ref().and_then(|v| v.as_u64()))
}

/// Who each of `ids` on `target` is read, written and deleted as: a
/// desired resource as render decided, an inventory entry as its service's
/// (or else the target's) `serviceAccountName` says now.
fn users_of(
    rendered: &Rendered,
    target: &str,
    ids: &[ResourceId],
    inventory: &Inventory,
) -> BTreeMap<ResourceId, String> {
    let topo = &rendered.topology;
    let target_sa = topo
        .targets
        .iter()
        .find(|t| t.name == target)
        .and_then(|t| t.service_account_name.clone());
    ids.iter()
        .filter_map(|id| {
            let user = match rendered.desired.resources.get(id) {
                Some(r) => r.impersonate.clone()?,
                None => {
                    let service = inventory.get(id)?;
                    let sa = topo
                        .services
                        .get(service)
                        .and_then(|s| s.service_account_name.clone())
                        .or_else(|| target_sa.clone())?;
                    crate::render::impersonated(&sa, id.namespace.as_deref()).ok()?
                }
            };
            Some((id.clone(), user))
        })
        .collect()
}

fn gate_times(topo: &Topology, services: &[String]) -> (Duration, Duration) {
    let mut timeout = Duration::ZERO;
    let mut soak = Duration::ZERO;
    for def in services.iter().filter_map(|s| topo.services.get(s)) {
        timeout = timeout.max(def.rollout.gate_timeout);
        soak = soak.max(def.rollout.soak);
    }
    (timeout, soak)
}

fn counts(plan: &Plan) -> (usize, usize, usize) {
    (
        plan.count(Action::Create),
        plan.count(Action::Update),
        plan.count(Action::Delete),
    )
}

#[cfg(test)]
mod tests {
    //! The engine against an in-memory source and target. The real git
    //! source and host target are exercised by the integration tests in
    //! `tests/`; here the fakes make failure points exact.
    use super::*;
    use crate::clock::{Clock, SystemClock};
    use crate::source::{FileEntry, Snapshot};
    use crate::store::FileStore;
    use chrono::Utc;
    use std::sync::Mutex;

    #[derive(Default)]
    struct FakeSource {
        commits: Mutex<Vec<(Revision, BTreeMap<String, FileEntry>)>>,
        down: std::sync::atomic::AtomicBool,
    }

    impl FakeSource {
        fn commit(&self, files: &[(&str, &str)]) -> CommitId {
            let mut commits = self.commits.lock().unwrap();
            let id = CommitId::parse(&format!("{:040x}", commits.len() + 1)).unwrap();
            let files = files
                .iter()
                .map(|(p, c)| (p.to_string(), FileEntry::text(c)))
                .collect();
            let summary = format!("c{}", commits.len() + 1);
            commits.push((
                Revision {
                    commit: id.clone(),
                    time: 0,
                    summary,
                },
                files,
            ));
            id
        }
    }

    #[async_trait::async_trait]
    impl Source for FakeSource {
        async fn poll(&self) -> Result<Revision, SourceError> {
            if self.down.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(SourceError::ListRefs {
                    url: "fake".into(),
                    reason: "down".into(),
                });
            }
            Ok(self.commits.lock().unwrap().last().unwrap().0.clone())
        }
        async fn resolve(&self, rev: &str) -> Result<Revision, SourceError> {
            self.commits
                .lock()
                .unwrap()
                .iter()
                .find(|(r, _)| r.commit.as_str() == rev)
                .map(|(r, _)| r.clone())
                .ok_or(SourceError::CommitNotFound {
                    url: "fake".into(),
                    commit: rev.into(),
                })
        }
        async fn snapshot(&self, commit: &CommitId, _: &Limits) -> Result<Snapshot, SourceError> {
            self.commits
                .lock()
                .unwrap()
                .iter()
                .find(|(r, _)| &r.commit == commit)
                .map(|(r, f)| Snapshot {
                    revision: r.clone(),
                    files: f.clone(),
                })
                .ok_or(SourceError::CommitNotFound {
                    url: "fake".into(),
                    commit: commit.to_string(),
                })
        }
        async fn keep(&self, _: &CommitId) -> Result<(), SourceError> {
            Ok(())
        }
        fn describe(&self) -> String {
            "fake".into()
        }
    }

    /// Keeps resources in a map; resources whose spec has `bad: true` never
    /// become healthy. Records the order of calls.
    #[derive(Default)]
    struct FakeTarget {
        live: Mutex<BTreeMap<ResourceId, serde_json::Value>>,
        log: Mutex<Vec<String>>,
    }

    #[async_trait::async_trait]
    impl Target for FakeTarget {
        fn name(&self) -> &str {
            "local"
        }
        fn kind(&self) -> TargetKind {
            TargetKind::Host
        }
        async fn observe(
            &self,
            ids: &[ResourceId],
        ) -> Result<BTreeMap<ResourceId, LiveResource>, TargetError> {
            let live = self.live.lock().unwrap();
            Ok(ids
                .iter()
                .filter_map(|id| {
                    let body = live.get(id)?.clone();
                    let health = if body["spec"]["env"]["BAD"] == "1" {
                        Health::Degraded
                    } else {
                        Health::Healthy
                    };
                    Some((
                        id.clone(),
                        LiveResource {
                            id: id.clone(),
                            body,
                            health,
                            managed: None,
                            message: None,
                        },
                    ))
                })
                .collect())
        }
        async fn prepare(&self, _: &[&DesiredResource]) -> Result<(), TargetError> {
            Ok(())
        }
        async fn apply(&self, r: &DesiredResource) -> Result<(), TargetError> {
            self.log.lock().unwrap().push(format!(
                "apply {} {}",
                r.id.name,
                r.body["spec"]["version"].as_str().unwrap_or("")
            ));
            self.live
                .lock()
                .unwrap()
                .insert(r.id.clone(), r.body.clone());
            Ok(())
        }
        async fn delete(&self, id: &ResourceId) -> Result<(), TargetError> {
            self.log.lock().unwrap().push(format!("delete {}", id.name));
            self.live.lock().unwrap().remove(id);
            Ok(())
        }
    }

    struct Provider(Arc<FakeTarget>);
    impl TargetProvider for Provider {
        fn target(&self, _: &TargetDef) -> Result<Arc<dyn Target>, TargetError> {
            Ok(self.0.clone())
        }
        fn supports(&self, k: TargetKind) -> bool {
            k == TargetKind::Host
        }
    }

    const TOPO: &str = "apiVersion: sluice.dev/v1\nkind: Topology\ndefaults:\n  gateTimeout: 300ms\ntargets:\n  - name: local\n    type: host\nservices:\n  a:\n    path: a\n  b:\n    path: b\n    dependsOn: [a]\n  c:\n    path: c\n    dependsOn: [b]\n";

    fn proc(name: &str, version: &str, bad: bool) -> String {
        format!("apiVersion: sluice.dev/v1\nkind: Process\nmetadata:\n  name: {name}\nspec:\n  command: x\n  version: \"{version}\"\n  env:\n    BAD: \"{}\"\n", if bad { 1 } else { 0 })
    }

    fn setup() -> (Engine, Arc<FakeSource>, Arc<FakeTarget>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let source = Arc::new(FakeSource::default());
        let target = Arc::new(FakeTarget::default());
        let engine = Engine {
            source: source.clone(),
            targets: Arc::new(Provider(target.clone())),
            store: Arc::new(FileStore::open(dir.path()).unwrap()),
            clock: Arc::new(SystemClock),
            limits: Limits::default(),
            gate_poll: Duration::from_millis(10),
            gate_factories: Vec::new(),
            forge: None,
            metrics: None,
            kustomize: Arc::new(crate::render::NoKustomize),
        };
        (engine, source, target, dir)
    }

    /// What a kill leaves in the state: a rollout of `commit` in progress.
    fn interrupted(kind: HistoryKind, commit: &CommitId, wave: usize, step: &str) -> InProgress {
        InProgress {
            kind,
            commit: commit.clone(),
            targets: vec!["local".into()],
            wave,
            waves: 3,
            step: step.into(),
            started: Utc::now(),
            step_started: Utc::now(),
            traffic: None,
            analysis: Vec::new(),
            attempts: 0,
        }
    }

    fn repo(versions: [(&str, bool); 3]) -> Vec<(String, String)> {
        let mut files = vec![("sluice.yaml".to_string(), TOPO.to_string())];
        for (name, (v, bad)) in ["a", "b", "c"].iter().zip(versions) {
            files.push((format!("{name}/p.yaml"), proc(name, v, bad)));
        }
        files
    }

    fn commit(source: &FakeSource, files: &[(String, String)]) -> CommitId {
        let refs: Vec<(&str, &str)> = files
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        source.commit(&refs)
    }

    #[tokio::test]
    async fn waves_roll_in_dependency_order_and_a_failed_gate_reverts_touched_waves_only() {
        let (engine, source, target, _dir) = setup();
        commit(&source, &repo([("1", false), ("1", false), ("1", false)]));
        let r = engine.reconcile(ApplyOptions::default()).await.unwrap();
        assert!(matches!(r, Reconciled::Applied { .. }), "{r:?}");
        assert_eq!(
            *target.log.lock().unwrap(),
            ["apply a 1", "apply b 1", "apply c 1"]
        );
        target.log.lock().unwrap().clear();

        // Version 2 of b never becomes healthy: a and b go back to 1, c is never touched.
        let bad = commit(&source, &repo([("2", false), ("2", true), ("2", false)]));
        let r = engine.reconcile(ApplyOptions::default()).await.unwrap();
        let Reconciled::Reverted { error, .. } = r else {
            panic!("{r:?}")
        };
        assert!(
            error.contains("gate after wave 2") && error.contains("local/Process/b is degraded"),
            "{error}"
        );
        assert_eq!(
            *target.log.lock().unwrap(),
            ["apply a 2", "apply b 2", "apply b 1", "apply a 1"]
        );
        let st = engine.store.load().unwrap();
        assert_eq!(st.targets["local"].failed.as_ref().unwrap().commit, bad);
        let h = engine.store.history().unwrap();
        assert_eq!(
            h.iter().map(|e| (e.kind, e.outcome)).collect::<Vec<_>>(),
            [
                (HistoryKind::Deploy, Outcome::Succeeded),
                (HistoryKind::Deploy, Outcome::Failed),
                (HistoryKind::Revert, Outcome::Succeeded),
            ]
        );
        let d = h[1].decision.as_ref().unwrap();
        // The second wave, counted from 1.
        assert_eq!((d.wave, d.gate.as_str()), (2, "health"));

        // Not retried until a newer commit arrives.
        target.log.lock().unwrap().clear();
        let r = engine.reconcile(ApplyOptions::default()).await.unwrap();
        assert!(matches!(r, Reconciled::SkippedFailed { .. }), "{r:?}");
        assert!(target.log.lock().unwrap().is_empty());
        commit(&source, &repo([("3", false), ("3", false), ("3", false)]));
        let r = engine.reconcile(ApplyOptions::default()).await.unwrap();
        assert!(matches!(r, Reconciled::Applied { .. }), "{r:?}");
        assert!(engine.store.load().unwrap().targets["local"]
            .failed
            .is_none());
    }

    #[tokio::test]
    async fn a_broken_commit_changes_nothing_and_prunes_nothing() {
        let (engine, source, target, _dir) = setup();
        commit(&source, &repo([("1", false), ("1", false), ("1", false)]));
        engine.reconcile(ApplyOptions::default()).await.unwrap();
        let before = target.live.lock().unwrap().clone();
        target.log.lock().unwrap().clear();
        for broken in [
            vec![(
                "sluice.yaml".to_string(),
                TOPO.replace("path: c", "path: nowhere"),
            )],
            vec![("sluice.yaml".to_string(), "apiVersion: [".to_string())],
            vec![("sluice.yaml".to_string(), TOPO.to_string())],
        ] {
            commit(&source, &broken);
            let e = engine.reconcile(ApplyOptions::default()).await.unwrap_err();
            assert!(e.is_bad_input(), "{e}");
            assert!(target.log.lock().unwrap().is_empty());
            assert_eq!(*target.live.lock().unwrap(), before);
            assert!(engine.store.load().unwrap().last_error.is_some());
        }
        // Remote down: nothing changes, the error is visible.
        source
            .down
            .store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(engine.reconcile(ApplyOptions::default()).await.is_err());
        assert_eq!(engine.store.load().unwrap().source.consecutive_failures, 1);
    }

    #[tokio::test]
    async fn removing_a_resource_prunes_it_and_only_it() {
        let (engine, source, target, _dir) = setup();
        let mut files = repo([("1", false), ("1", false), ("1", false)]);
        files.push(("c/extra.yaml".into(), proc("extra", "1", false)));
        commit(&source, &files);
        engine.reconcile(ApplyOptions::default()).await.unwrap();
        // Something sluice did not create lives on the target too.
        target.live.lock().unwrap().insert(
            ResourceId::new("local", "Process", "hand-made"),
            serde_json::json!({}),
        );
        files.pop();
        commit(&source, &files);
        target.log.lock().unwrap().clear();
        engine.reconcile(ApplyOptions::default()).await.unwrap();
        assert_eq!(*target.log.lock().unwrap(), ["delete extra"]);
        assert!(target.live.lock().unwrap().contains_key(&ResourceId::new(
            "local",
            "Process",
            "hand-made"
        )));
    }

    #[tokio::test]
    async fn an_interrupted_revert_is_finished_after_a_restart() {
        let (engine, source, target, _dir) = setup();
        let good = commit(&source, &repo([("1", false), ("1", false), ("1", false)]));
        engine.reconcile(ApplyOptions::default()).await.unwrap();
        // Simulate a crash in the middle of a revert: live is half on v2.
        commit(&source, &repo([("2", false), ("2", false), ("2", false)]));
        engine.reconcile(ApplyOptions::default()).await.unwrap();
        engine
            .mark(|s| s.in_progress = Some(interrupted(HistoryKind::Revert, &good, 1, "revert")))
            .unwrap();
        engine.finish_interrupted().await.unwrap();
        let live = target.live.lock().unwrap();
        assert!(
            live.values().all(|b| b["spec"]["version"] == "1"),
            "{live:?}"
        );
        assert!(engine.store.load().unwrap().in_progress.is_none());
    }

    #[tokio::test]
    async fn killed_between_recording_a_failure_and_starting_its_revert_the_revert_runs_on_restart()
    {
        let (engine, source, target, _dir) = setup();
        commit(&source, &repo([("1", false), ("1", false), ("1", false)]));
        engine.reconcile(ApplyOptions::default()).await.unwrap();
        let bad = commit(&source, &repo([("2", false), ("2", true), ("2", false)]));
        engine.reconcile(ApplyOptions::default()).await.unwrap();
        let before = engine.store.history().unwrap().len();
        // As the kill left it: the failure recorded, the deploy still in
        // progress, live half on the failed commit.
        engine
            .mark(|s| s.in_progress = Some(interrupted(HistoryKind::Deploy, &bad, 1, "gate")))
            .unwrap();
        for (id, body) in target.live.lock().unwrap().iter_mut() {
            if id.name != "c" {
                body["spec"]["version"] = "2".into();
            }
        }
        engine.finish_interrupted().await.unwrap();
        let live = target.live.lock().unwrap().clone();
        assert!(
            live.values().all(|b| b["spec"]["version"] == "1"),
            "{live:?}"
        );
        assert!(engine.store.load().unwrap().in_progress.is_none());
        let history = engine.store.history().unwrap();
        assert_eq!(history.len(), before + 1);
        assert_eq!(history.last().map(|h| h.kind), Some(HistoryKind::Revert));
        // And the next reconcile settles: the failed commit is skipped.
        let r = engine.reconcile(ApplyOptions::default()).await.unwrap();
        assert!(matches!(r, Reconciled::SkippedFailed { .. }), "{r:?}");
    }

    #[tokio::test]
    async fn a_history_entry_written_ahead_is_recorded_once_after_a_crash() {
        let (engine, source, _target, _dir) = setup();
        commit(&source, &repo([("1", false), ("1", false), ("1", false)]));
        engine.reconcile(ApplyOptions::default()).await.unwrap();
        let history = engine.store.history().unwrap();
        let entry = history.last().unwrap().clone();
        // Killed after the state write, before the append: the entry is
        // in the state only.
        let mut state = engine.store.load().unwrap();
        let mut lost = entry.clone();
        lost.commit_time += 1;
        state.pending_history = Some(lost.clone());
        engine.store.save(&state).unwrap();
        assert!(engine.store.recover().unwrap());
        assert!(!engine.store.recover().unwrap());
        let after = engine.store.history().unwrap();
        assert_eq!(after.len(), history.len() + 1);
        assert_eq!(after.last(), Some(&lost));
        // Killed after the append, before the state was cleared: not twice.
        let mut state = engine.store.load().unwrap();
        state.pending_history = Some(lost.clone());
        engine.store.save(&state).unwrap();
        engine.store.recover().unwrap();
        assert_eq!(engine.store.history().unwrap().len(), after.len());
        assert!(engine.store.load().unwrap().pending_history.is_none());
    }

    #[tokio::test]
    async fn a_crash_during_a_gate_cannot_skip_that_gate_after_restart() {
        let (engine, source, target, _dir) = setup();
        commit(&source, &repo([("1", false), ("1", false), ("1", false)]));
        engine.reconcile(ApplyOptions::default()).await.unwrap();
        // The agent applied waves 1 and 2 of a bad release, then died while
        // gating wave 2: live holds a=2, b=2 (unhealthy); the record says 1.
        let bad = commit(&source, &repo([("2", false), ("2", true), ("2", false)]));
        let snap = source.snapshot(&bad, &Limits::default()).await.unwrap();
        let rendered = crate::render::render(&snap).unwrap();
        for r in rendered
            .desired
            .resources
            .values()
            .filter(|r| r.service != "c")
        {
            target.apply(r).await.unwrap();
        }
        engine
            .mark(|s| s.in_progress = Some(interrupted(HistoryKind::Deploy, &bad, 1, "gate")))
            .unwrap();
        target.log.lock().unwrap().clear();
        let r = engine.reconcile(ApplyOptions::default()).await.unwrap();
        assert!(matches!(r, Reconciled::Reverted { .. }), "{r:?}");
        let live = target.live.lock().unwrap();
        assert!(
            live.values().all(|b| b["spec"]["version"] == "1"),
            "{live:?}"
        );
        assert!(!target.log.lock().unwrap().iter().any(|l| l == "apply c 2"));
        let st = engine.store.load().unwrap();
        assert!(st.in_progress.is_none());
        assert_eq!(st.targets["local"].failed.as_ref().unwrap().commit, bad);
    }

    #[tokio::test]
    async fn drift_is_reported_and_healed_where_the_policy_says() {
        let (engine, source, target, _dir) = setup();
        let mut files = repo([("1", false), ("1", false), ("1", false)]);
        files[0].1 = TOPO.replace("path: b\n", "path: b\n    drift: heal\n");
        commit(&source, &files);
        engine.reconcile(ApplyOptions::default()).await.unwrap();
        {
            let mut live = target.live.lock().unwrap();
            let a = ResourceId::new("local", "Process", "a");
            live.get_mut(&a).unwrap()["spec"]["version"] = "hand-edited".into();
            live.remove(&ResourceId::new("local", "Process", "b"));
            // Not sluice's: never drift.
            live.insert(
                ResourceId::new("local", "Process", "other"),
                serde_json::json!({}),
            );
        }
        let report = engine.drift(false).await.unwrap();
        let items: Vec<_> = report[0]
            .items
            .iter()
            .map(|i| (i.id.name.as_str(), i.kind))
            .collect();
        assert_eq!(
            items,
            [("a", DriftKind::Modified), ("b", DriftKind::Missing)]
        );
        assert_eq!(report[0].items[0].fields[0].path, "spec.version");
        assert!(report[0].healed.is_empty());

        let report = engine.drift(true).await.unwrap();
        assert_eq!(report[0].healed, [ResourceId::new("local", "Process", "b")]);
        let live = target.live.lock().unwrap();
        assert!(live.contains_key(&ResourceId::new("local", "Process", "b")));
        assert_eq!(
            live[&ResourceId::new("local", "Process", "a")]["spec"]["version"],
            "hand-edited"
        );
        let h = engine.store.history().unwrap();
        assert_eq!(h.last().unwrap().kind, HistoryKind::Heal);
    }

    /// A stand-in for canary analysis: fails service b's wave.
    struct ErrorRateGate;

    #[async_trait::async_trait]
    impl Gate for ErrorRateGate {
        fn name(&self) -> &str {
            "analysis"
        }
        async fn check(&self, _: &GateContext<'_>) -> Verdict {
            Verdict::Fail {
                resource: Some("local/Process/b".into()),
                measurement: "error rate 3.0% vs baseline 1.0%".into(),
                threshold: "at most 1.5x the baseline".into(),
            }
        }
    }

    struct OnlyB;

    impl GateFactory for OnlyB {
        fn gates(&self, _: &Topology, services: &[String]) -> Vec<Box<dyn Gate>> {
            if services.iter().any(|s| s == "b") {
                vec![Box::new(ErrorRateGate)]
            } else {
                vec![]
            }
        }
    }

    #[tokio::test]
    async fn plugged_in_gates_abort_with_their_own_decision_record() {
        let (mut engine, source, target, _dir) = setup();
        engine.gate_factories.push(Arc::new(OnlyB));
        commit(&source, &repo([("1", false), ("1", false), ("1", false)]));
        // The first rollout fails too: no last good commit, nothing to revert to.
        let r = engine.reconcile(ApplyOptions::default()).await.unwrap();
        assert!(
            matches!(
                r,
                Reconciled::Reverted {
                    reverted_to: None,
                    ..
                }
            ),
            "{r:?}"
        );
        engine.gate_factories.clear();
        commit(&source, &repo([("1", false), ("1", false), ("2", false)]));
        engine.reconcile(ApplyOptions::default()).await.unwrap();
        engine.gate_factories.push(Arc::new(OnlyB));
        commit(&source, &repo([("3", false), ("3", false), ("3", false)]));
        let r = engine.reconcile(ApplyOptions::default()).await.unwrap();
        let Reconciled::Reverted { error, .. } = r else {
            panic!("{r:?}")
        };
        assert!(error.contains("analysis: error rate 3.0%"), "{error}");
        let h = engine.store.history().unwrap();
        let d = h.iter().rev().find_map(|e| e.decision.clone()).unwrap();
        assert_eq!(
            (d.gate.as_str(), d.threshold.as_str()),
            ("analysis", "at most 1.5x the baseline")
        );
        assert!(target
            .live
            .lock()
            .unwrap()
            .values()
            .all(|b| b["spec"]["version"] != "3"));
    }

    /// A clock the test sets; sleeps are real but short.
    struct FixedClock(Mutex<chrono::DateTime<Utc>>);

    #[async_trait::async_trait]
    impl Clock for FixedClock {
        fn now(&self) -> chrono::DateTime<Utc> {
            *self.0.lock().unwrap()
        }
        async fn sleep(&self, d: Duration) {
            tokio::time::sleep(d).await
        }
    }

    #[tokio::test]
    async fn a_closed_window_makes_the_rollout_wait_and_an_opening_lets_it_proceed() {
        let (mut engine, source, target, _dir) = setup();
        let at = |s: &str| {
            chrono::DateTime::parse_from_rfc3339(s)
                .unwrap()
                .with_timezone(&Utc)
        };
        let clock = Arc::new(FixedClock(Mutex::new(at("2026-11-28T12:00:00Z")))); // a Saturday
        engine.clock = clock.clone();
        let windows = "windows:\n  - kind: allow\n    schedule: \"0 0 9 * * Mon-Fri\"\n    duration: 8h\n    timeZone: Europe/Berlin\n";
        let mut files = repo([("1", false), ("1", false), ("1", false)]);
        files[0].1 = format!("{TOPO}{windows}");
        commit(&source, &files);
        let r = engine.reconcile(ApplyOptions::default()).await.unwrap();
        let Reconciled::Waiting { until, reason, .. } = r else {
            panic!("{r:?}")
        };
        assert_eq!(until, Some(at("2026-11-30T08:00:00Z")));
        assert!(reason.contains("outside its allow windows"), "{reason}");
        assert!(target.log.lock().unwrap().is_empty());
        assert!(engine.store.load().unwrap().waiting.is_some());

        // Monday 09:30 in Berlin: the window is open.
        *clock.0.lock().unwrap() = at("2026-11-30T08:30:00Z");
        let r = engine.reconcile(ApplyOptions::default()).await.unwrap();
        assert!(matches!(r, Reconciled::Applied { .. }), "{r:?}");
        assert!(engine.store.load().unwrap().waiting.is_none());

        // Saturday again, by hand with an override: rolls, and says so.
        *clock.0.lock().unwrap() = at("2026-12-05T12:00:00Z");
        let mut files = files.clone();
        files[1].1 = proc("a", "2", false);
        commit(&source, &files);
        let r = engine
            .reconcile(ApplyOptions {
                window_override: true,
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(matches!(r, Reconciled::Applied { .. }), "{r:?}");
        assert!(
            engine
                .store
                .history()
                .unwrap()
                .last()
                .unwrap()
                .window_override
        );
    }

    #[tokio::test]
    async fn revert_by_hand_holds_the_live_commit() {
        let (engine, source, target, _dir) = setup();
        let one = commit(&source, &repo([("1", false), ("1", false), ("1", false)]));
        engine.reconcile(ApplyOptions::default()).await.unwrap();
        commit(&source, &repo([("2", false), ("2", false), ("2", false)]));
        engine.reconcile(ApplyOptions::default()).await.unwrap();
        engine.revert_by_hand(Some(&one)).await.unwrap();
        assert!(target
            .live
            .lock()
            .unwrap()
            .values()
            .all(|b| b["spec"]["version"] == "1"));
        // The loop does not roll the reverted commit out again.
        let r = engine.reconcile(ApplyOptions::default()).await.unwrap();
        assert!(matches!(r, Reconciled::SkippedFailed { .. }), "{r:?}");
    }
}
