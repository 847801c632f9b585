//! The record stage: what is applied where, and the history of every
//! deployment, in a store that survives kill -9.
//!
//! # Guarantees (of [`FileStore`])
//! - `state.json` is replaced atomically (temp file, fsync, rename, fsync of
//!   the folder): after a crash it holds either the old or the new state,
//!   never a torn one.
//! - `history.jsonl` is append-only, one fsynced line per entry; a line torn
//!   by a crash mid-write is skipped on read, earlier entries are intact.
//! - One process at a time applies: [`FileStore::lock`] takes an exclusive
//!   OS file lock that the kernel releases if the holder dies.
//! - A transition's state and its history entry are never seen apart:
//!   [`StateStore::transition`] writes the entry ahead inside the state
//!   (`pendingHistory`), appends it, then clears it; on restart
//!   [`StateStore::recover`] appends a pending entry the history lacks
//!   (and never twice).
//!
//! # Transitions and how a restart finishes each
//! - rollout starts: `inProgress` (deploy) is written before any change; a
//!   restart re-runs the same commit, gating first what it had applied.
//! - rollout succeeds: applied and last good commit, `inProgress` cleared,
//!   the deploy entry: one transition.
//! - rollout fails: the failed commit, its error and the deploy entry in
//!   one transition, `inProgress` still the deploy; the revert then marks
//!   itself. A restart that finds a deploy in progress of a commit recorded
//!   as failed runs that revert.
//! - commit rejected before any write (prepare, dry run): the failed
//!   commit and its entry, `inProgress` cleared: one transition.
//! - revert starts: `inProgress` (revert) with the commit reverted to; a
//!   restart finishes it.
//! - revert ends: applied commit, `inProgress` cleared, the revert entry:
//!   one transition.
//! - revert fails (a write refused: a full disk, a target down): the
//!   failed revert entry (first attempt only), `inProgress` kept with its
//!   attempts counted: one transition; every reconcile tries it again.
//!
//! # A lost or damaged store
//! - An unreadable `state.json` is moved aside to
//!   `state.json.unreadable-<time>` ([`StateStore::salvage`]), never
//!   deleted, and replaced by an empty state marked `lost`; so is a state
//!   found empty while the history records deployments.
//! - While `lost`, nothing is pruned. The next reconcile rebuilds each
//!   target's inventory from the marks on its live resources
//!   ([`crate::target::Target::marked`]: Kubernetes labels, the host's
//!   records) and its applied and last good commits from the history, then
//!   clears it; status, logs and `/metrics` say so meanwhile.
//! - An unreadable history line is skipped with a warning naming it.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::model::TargetKind;
use crate::plan::Inventory;
use crate::source::{CommitId, Revision};

/// A commit applied to a target.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Deployed {
    pub commit: CommitId,
    /// Digest of this target's share of the desired state.
    pub digest: String,
    /// Committer time of the commit (seconds since the epoch): lead time
    /// is `at - commit_time`.
    pub commit_time: i64,
    pub summary: String,
    pub at: DateTime<Utc>,
}

/// A commit that failed and is not retried until a newer one arrives.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Failed {
    pub commit: CommitId,
    pub reason: String,
    pub at: DateTime<Utc>,
    /// The pull request sluice opened to revert it in git, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revert_pr: Option<String>,
}

/// Everything the agent remembers about one target.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TargetRecord {
    /// The kind of target, so status can reach it without a commit.
    #[serde(default)]
    pub kind: Option<TargetKind>,
    /// A remote host's SSH destination, for the same reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh: Option<String>,
    /// What is live now, as far as sluice applied it.
    pub applied: Option<Deployed>,
    /// The newest commit that was applied completely and passed its gates.
    pub last_good: Option<Deployed>,
    /// Resources sluice created here (id → service): the only things it
    /// ever prunes.
    #[serde(with = "inventory_list")]
    pub inventory: Inventory,
    pub failed: Option<Failed>,
    pub last_error: Option<String>,
}

/// A rollout or revert under way, persisted before its first change so a
/// restarted agent knows it must finish or undo it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InProgress {
    pub kind: HistoryKind,
    pub commit: CommitId,
    pub targets: Vec<String>,
    /// Index of the wave being applied or gated.
    pub wave: usize,
    pub waves: usize,
    /// What the rollout is waiting for, for status ("gate: health").
    pub step: String,
    pub started: DateTime<Utc>,
    pub step_started: DateTime<Utc>,
    /// A canary or blue-green under way: weights and running verdicts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic: Option<TrafficStatus>,
    /// Every analysis verdict of this rollout so far (all resources).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub analysis: Vec<IntervalVerdict>,
    /// A revert: how many attempts failed so far. A failed revert stays in
    /// progress, so every reconcile tries it again until live is back on
    /// one whole commit.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attempts: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// A progressive rollout of one resource, as `sluice status` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficStatus {
    pub resource: String,
    pub strategy: crate::model::Strategy,
    pub baseline: String,
    pub canary: String,
    /// The canary's share of traffic now, in percent.
    pub weight: u8,
    /// Step (1-based) of `steps`.
    pub step: usize,
    pub steps: Vec<u8>,
    /// Where the counters come from (and their latency resolution).
    pub metrics: String,
    /// This rollout's verdicts so far, newest last.
    pub verdicts: Vec<IntervalVerdict>,
    /// When the canary first got traffic (for `minAge`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_since: Option<DateTime<Utc>>,
}

/// The verdict of one analysis interval, with its numbers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IntervalVerdict {
    pub at: DateTime<Utc>,
    pub resource: String,
    pub step: usize,
    pub weight: u8,
    pub baseline: Measured,
    pub canary: Measured,
    pub judgement: crate::analysis::Judgement,
}

/// What one version served in an interval.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Measured {
    pub requests: u64,
    pub errors: u64,
    pub p95_ms: f64,
    pub p99_ms: f64,
}

impl Measured {
    pub fn of(s: &crate::analysis::Sample) -> Self {
        let ms = |q| (s.latency.quantile(q) * 1000.0 * 10.0).round() / 10.0;
        Measured {
            requests: s.requests,
            errors: s.errors,
            p95_ms: ms(0.95),
            p99_ms: ms(0.99),
        }
    }
}

/// Source health, for status and backoff.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceStatus {
    pub describe: String,
    pub last_poll: Option<DateTime<Utc>>,
    pub last_success: Option<DateTime<Utc>>,
    pub last_seen: Option<Revision>,
    pub last_error: Option<String>,
    pub consecutive_failures: u32,
}

/// The agent's whole state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentState {
    pub source: SourceStatus,
    pub targets: BTreeMap<String, TargetRecord>,
    /// The last error of a reconcile that failed before reaching any target
    /// (fetch, render, plan), with the commit it was about.
    pub last_error: Option<String>,
    #[serde(default)]
    pub in_progress: Option<InProgress>,
    /// The newest drift scan, for status and metrics.
    #[serde(default)]
    pub drift: Option<DriftScan>,
    /// A commit waiting for a sync window to open.
    #[serde(default)]
    pub waiting: Option<Waiting>,
    /// The history entry of the transition this state ends, until it is
    /// in the history (see [`StateStore::transition`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_history: Option<HistoryEntry>,
    /// Why the inventory cannot be trusted (state.json was lost or could
    /// not be read), until it is rebuilt from the marks on the live
    /// resources; nothing is pruned meanwhile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost: Option<String>,
}

/// Why a commit is not rolling out yet, and until when.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Waiting {
    pub commit: CommitId,
    pub until: Option<DateTime<Utc>>,
    pub reason: String,
}

/// What the newest drift scan found (secret values already redacted).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DriftScan {
    pub at: DateTime<Utc>,
    /// Per target: "modified local/File/x (spec.content)", "missing ...".
    pub items: BTreeMap<String, Vec<String>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HistoryKind {
    Deploy,
    Revert,
    Heal,
    /// Everything sluice created on the targets removed (`sluice down`).
    Down,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Succeeded,
    Failed,
}

/// One deployment, revert or heal.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HistoryEntry {
    pub at: DateTime<Utc>,
    pub kind: HistoryKind,
    pub outcome: Outcome,
    pub commit: CommitId,
    pub commit_time: i64,
    pub summary: String,
    pub digest: String,
    pub targets: Vec<String>,
    pub created: usize,
    pub updated: usize,
    pub deleted: usize,
    pub duration_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Why a rollout was stopped: which gate, what it measured, against
    /// which threshold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<Decision>,
    /// A deliberate re-apply of a commit that had failed (`apply --retry`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retry: bool,
    /// Rolled out outside its sync windows by hand (`apply --override`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub window_override: bool,
    /// Every canary analysis verdict of the rollout, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub analysis: Vec<IntervalVerdict>,
}

impl HistoryEntry {
    /// An entry of `kind` for `commit` on `targets`, at `at`: nothing
    /// counted, succeeded unless `error` says otherwise.
    pub fn of(
        kind: HistoryKind,
        at: DateTime<Utc>,
        commit: (&CommitId, i64, &str),
        targets: Vec<String>,
        error: Option<String>,
    ) -> HistoryEntry {
        HistoryEntry {
            at,
            kind,
            outcome: if error.is_none() {
                Outcome::Succeeded
            } else {
                Outcome::Failed
            },
            commit: commit.0.clone(),
            commit_time: commit.1,
            summary: commit.2.to_string(),
            digest: String::new(),
            targets,
            created: 0,
            updated: 0,
            deleted: 0,
            duration_ms: 0,
            error,
            decision: None,
            retry: false,
            window_override: false,
            analysis: Vec::new(),
        }
    }
}

/// The record of a gate's verdict that aborted a rollout.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Decision {
    pub at: DateTime<Utc>,
    /// The wave, counted from 1 as status and logs show it.
    pub wave: usize,
    pub gate: String,
    pub resource: Option<String>,
    pub measurement: String,
    pub threshold: String,
    /// A failed canary or blue-green: milliseconds from the failing verdict
    /// until the router sent all traffic to the baseline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_ms: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("state store {path}: corrupt: {reason}")]
    Corrupt { path: String, reason: String },
    #[error("state store {path}: held by another sluice process")]
    Locked { path: String },
}

/// Where state lives; behind a trait so the engine can be tested with an
/// in-memory store and run with files.
pub trait StateStore: Send + Sync {
    fn load(&self) -> Result<AgentState, StoreError>;
    fn save(&self, state: &AgentState) -> Result<(), StoreError>;
    fn append(&self, entry: &HistoryEntry) -> Result<(), StoreError>;
    fn history(&self) -> Result<Vec<HistoryEntry>, StoreError>;

    /// One transition: `state` and the history `entry` that records it,
    /// never seen apart. The entry is written ahead inside the state; a
    /// crash before it reaches the history leaves it there, and
    /// [`StateStore::recover`] appends it.
    fn transition(&self, state: &mut AgentState, entry: &HistoryEntry) -> Result<(), StoreError> {
        state.pending_history = Some(entry.clone());
        self.save(state)?;
        self.append(entry)?;
        state.pending_history = None;
        self.save(state)
    }

    /// A state that cannot be read is moved aside (never deleted) and
    /// replaced by an empty one that says it was lost: the agent goes on,
    /// rebuilds what it can, and prunes nothing until its inventory is
    /// rebuilt. The reason, if it did; None if the state reads fine.
    fn salvage(&self) -> Result<Option<String>, StoreError> {
        Ok(None)
    }

    /// Finishes a transition a crash cut short: its entry goes into the
    /// history unless it already did. True if there was one.
    fn recover(&self) -> Result<bool, StoreError> {
        let mut state = self.load()?;
        let Some(entry) = state.pending_history.take() else {
            return Ok(false);
        };
        let history = self.history()?;
        if !history.iter().rev().take(16).any(|h| h == &entry) {
            self.append(&entry)?;
        }
        self.save(&state)?;
        Ok(true)
    }
}

/// Files under the agent's state dir.
#[derive(Clone, Debug)]
pub struct FileStore {
    dir: PathBuf,
}

/// Held while applying; released on drop or when the process dies.
#[derive(Debug)]
pub struct ApplyLock {
    _file: File,
}

impl FileStore {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        fs::create_dir_all(dir).map_err(|source| io(dir, source))?;
        Ok(FileStore {
            dir: dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Takes the exclusive apply lock without waiting.
    pub fn try_lock(&self) -> Result<ApplyLock, StoreError> {
        self.try_lock_named("apply.lock")
    }

    /// Takes an exclusive lock file of the state dir without waiting
    /// (`run.lock` keeps a second `sluice run` away).
    pub fn try_lock_named(&self, name: &str) -> Result<ApplyLock, StoreError> {
        let (file, path) = self.lock_file(name)?;
        match file.try_lock() {
            Ok(()) => Ok(ApplyLock { _file: file }),
            Err(fs::TryLockError::WouldBlock) => Err(StoreError::Locked {
                path: path.display().to_string(),
            }),
            Err(fs::TryLockError::Error(source)) => Err(io(&path, source)),
        }
    }

    /// Takes the exclusive apply lock, waiting for the holder (blocking).
    pub fn lock(&self) -> Result<ApplyLock, StoreError> {
        let (file, path) = self.lock_file("apply.lock")?;
        file.lock().map_err(|source| io(&path, source))?;
        Ok(ApplyLock { _file: file })
    }

    fn lock_file(&self, name: &str) -> Result<(File, PathBuf), StoreError> {
        let path = self.dir.join(name);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| io(&path, source))?;
        Ok((file, path))
    }
}

/// For the crash-point tests: with `SLUICE_CRASH_AFTER_WRITE=N` the
/// process aborts (as kill -9 would stop it: no unwinding, no cleanup,
/// children left running) right after the Nth write of the store, state or
/// history; the writes are counted on stderr as `store write N`. Unset, a
/// single relaxed load per write.
fn crash_point() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static AT: OnceLock<Option<u64>> = OnceLock::new();
    static WRITES: AtomicU64 = AtomicU64::new(0);
    let Some(at) = *AT.get_or_init(|| {
        std::env::var("SLUICE_CRASH_AFTER_WRITE")
            .ok()
            .and_then(|v| v.parse().ok())
    }) else {
        return;
    };
    let n = WRITES.fetch_add(1, Ordering::SeqCst) + 1;
    eprintln!("store write {n}");
    if n == at {
        std::process::abort();
    }
}

impl StateStore for FileStore {
    fn load(&self) -> Result<AgentState, StoreError> {
        let path = self.dir.join("state.json");
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                path: path.display().to_string(),
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(AgentState::default()),
            Err(source) => Err(io(&path, source)),
        }
    }

    fn salvage(&self) -> Result<Option<String>, StoreError> {
        let path = self.dir.join("state.json");
        let reason = match self.load() {
            Err(StoreError::Corrupt { reason, .. }) => reason,
            _ => return Ok(None),
        };
        let aside = self.dir.join(format!(
            "state.json.unreadable-{}",
            Utc::now().format("%Y%m%dT%H%M%S")
        ));
        fs::rename(&path, &aside).map_err(|e| io(&path, e))?;
        let why = format!(
            "state.json could not be read ({reason}); moved to {} and started afresh",
            aside.display()
        );
        let state = AgentState {
            lost: Some(why.clone()),
            ..AgentState::default()
        };
        self.save(&state)?;
        Ok(Some(why))
    }

    fn save(&self, state: &AgentState) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec_pretty(state).map_err(|e| StoreError::Corrupt {
            path: "state.json".into(),
            reason: e.to_string(),
        })?;
        write_atomic(&self.dir.join("state.json"), &bytes)?;
        crash_point();
        Ok(())
    }

    fn append(&self, entry: &HistoryEntry) -> Result<(), StoreError> {
        let path = self.dir.join("history.jsonl");
        let mut line = serde_json::to_vec(entry).map_err(|e| StoreError::Corrupt {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        line.push(b'\n');
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|source| io(&path, source))?;
        // A torn previous line (crash mid-append) must not swallow this one.
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if len > 0 && !ends_with_newline(&path) {
            f.write_all(b"\n").map_err(|source| io(&path, source))?;
        }
        f.write_all(&line).map_err(|source| io(&path, source))?;
        f.sync_all().map_err(|source| io(&path, source))?;
        crash_point();
        Ok(())
    }

    fn history(&self) -> Result<Vec<HistoryEntry>, StoreError> {
        let path = self.dir.join("history.jsonl");
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(io(&path, source)),
        };
        let mut out = Vec::new();
        for (n, line) in BufReader::new(f).lines().enumerate() {
            let line = line.map_err(|source| io(&path, source))?;
            // Torn lines from a crash are skipped, not fatal, and said.
            match serde_json::from_str(&line) {
                Ok(entry) => out.push(entry),
                Err(_) if line.trim().is_empty() => {}
                Err(e) => tracing::warn!(
                    path = %path.display(),
                    line = n + 1,
                    error = %e,
                    "unreadable history line skipped"
                ),
            }
        }
        Ok(out)
    }
}

fn ends_with_newline(path: &Path) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = File::open(path) else {
        return true;
    };
    let mut b = [0u8; 1];
    f.seek(SeekFrom::End(-1)).is_ok() && f.read_exact(&mut b).is_ok() && b[0] == b'\n'
}

/// Writes `bytes` to `path` so that a crash leaves either the old or the new
/// content: temp file in the same folder, fsync, rename, fsync the folder.
/// Idempotent.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    write_file_atomic(path, bytes, None).map_err(|source| io(path, source))
}

/// [`write_atomic`] for every writer of sluice's own files and of host
/// File resources: the same guarantee, an `io::Error`, and optional
/// permission bits set before the rename (so the file never appears with
/// the wrong mode).
pub fn write_file_atomic(path: &Path, bytes: &[u8], mode: Option<u32>) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("state");
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        if let Some(mode) = mode {
            fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
        }
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn io(path: &Path, source: std::io::Error) -> StoreError {
    StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// JSON maps need string keys: the inventory is stored as a list.
mod inventory_list {
    use super::*;
    use crate::resource::ResourceId;

    #[derive(Serialize, Deserialize)]
    struct Item {
        #[serde(flatten)]
        id: ResourceId,
        service: String,
    }

    pub fn serialize<S: serde::Serializer>(inv: &Inventory, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(inv.iter().map(|(id, service)| Item {
            id: id.clone(),
            service: service.clone(),
        }))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Inventory, D::Error> {
        let items: Vec<Item> = Vec::deserialize(d)?;
        Ok(items.into_iter().map(|i| (i.id, i.service)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::ResourceId;

    fn entry(n: i64) -> HistoryEntry {
        HistoryEntry {
            at: Utc::now(),
            kind: HistoryKind::Deploy,
            outcome: Outcome::Succeeded,
            commit: CommitId::parse(&"c".repeat(40)).unwrap(),
            commit_time: n,
            summary: String::new(),
            digest: String::new(),
            targets: vec![],
            created: 0,
            updated: 0,
            deleted: 0,
            duration_ms: 0,
            error: None,
            decision: None,
            retry: false,
            window_override: false,
            analysis: Vec::new(),
        }
    }

    #[test]
    fn state_round_trips_and_history_survives_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        assert_eq!(store.load().unwrap(), AgentState::default());
        let mut state = AgentState::default();
        let rec = state.targets.entry("local".into()).or_default();
        rec.inventory
            .insert(ResourceId::new("local", "Process", "web"), "web".into());
        store.save(&state).unwrap();
        assert_eq!(store.load().unwrap(), state);

        store.append(&entry(1)).unwrap();
        // A crash mid-append leaves half a line.
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join("history.jsonl"))
            .unwrap();
        f.write_all(b"{\"at\":\"2026").unwrap();
        store.append(&entry(2)).unwrap();
        let h = store.history().unwrap();
        assert_eq!(
            h.iter().map(|e| e.commit_time).collect::<Vec<_>>(),
            vec![1, 2]
        );
    }

    #[test]
    fn only_one_holder_of_the_apply_lock() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let held = store.try_lock().unwrap();
        assert!(matches!(store.try_lock(), Err(StoreError::Locked { .. })));
        drop(held);
        store.try_lock().unwrap();
    }
}
