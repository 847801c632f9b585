//! The git source: a local bare mirror of the watched branch, kept in step
//! by listing the remote's refs first and fetching only when the branch
//! moved; commits are read straight from the object database.
//!
//! # Guarantees
//! - Nothing is checked out: a snapshot is read from git objects, so a
//!   half-written working tree can never be applied.
//! - Credentials never reach a log line, an error or `describe()`: URLs are
//!   shown with their userinfo replaced, and the token text is scrubbed from
//!   every libgit2 message that is passed on.
//! - All libgit2 work runs on the blocking thread pool.
//!
//! - Everything that crosses the network runs the git command line with
//!   deadlines (see [`crate::transport`]); libgit2 only reads and writes
//!   the mirror, on the blocking thread pool.
//!
//! # The mirror
//! The first fetch is shallow (depth 1): the agent needs the watched
//! commit, not the history. Later fetches add the commits since; a commit
//! that is missing when it is needed (the parent of a commit to revert, an
//! old commit named by hand) is fetched then. Packs are consolidated once
//! there are more than [`MAX_PACKS`], and only the newest [`KEEP_REFS`]
//! pins of applied commits are kept.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use git2::{ObjectType, Oid, Repository};
use sluice_core::source::{CommitId, FileEntry, Limits, Revision, Snapshot, Source, SourceError};
use tracing::{debug, info, warn};

/// A secret string: Debug and Display print `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

use crate::transport::{Failure, SshOptions, Timeouts, Transport};

/// Packs in the mirror before they are consolidated into one.
pub const MAX_PACKS: usize = 16;
/// Pins of applied commits kept (`refs/sluice/keep/*`), newest first.
pub const KEEP_REFS: usize = 32;
/// Refs fetched for pull requests kept (`refs/sluice/fetched/*`).
pub const FETCHED_REFS: usize = 64;

/// How to authenticate to the remote. Which one applies is decided once,
/// by the URL's scheme (see the CLI's `auth`).
#[derive(Clone, Debug, Default)]
pub enum Auth {
    #[default]
    None,
    /// https: the token as password (user `x-access-token` unless the URL
    /// names one), for the repository's origin only.
    Token {
        token: Secret,
        /// The file it was read from (handed to git as is); None when it
        /// came from an environment variable.
        file: Option<PathBuf>,
    },
    SshKey {
        private_key: PathBuf,
        passphrase: Option<Secret>,
        /// The file the passphrase was read from, if any.
        passphrase_file: Option<PathBuf>,
    },
    SshAgent,
}

#[derive(Clone, Debug, Default)]
pub struct GitConfig {
    /// Local path, file://, https://, ssh:// or scp-like `user@host:path`;
    /// http:// and git:// only with `allow_insecure`.
    pub url: String,
    /// None: the remote's default branch.
    pub branch: Option<String>,
    /// Folder inside the repository to read ("" = root).
    pub path: String,
    /// Where the local bare mirror lives.
    pub cache_dir: PathBuf,
    pub auth: Auth,
    pub allow_insecure: bool,
    pub timeouts: Timeouts,
    pub ssh: SshOptions,
    /// Extra CA certificates (PEM) trusted for https.
    pub ca_file: Option<PathBuf>,
    /// The sluice binary (git's credential helper, ssh's passphrase
    /// prompt); default: this executable.
    pub helper: Option<PathBuf>,
}

/// The git source; cheap to clone (clones share one mirror).
#[derive(Clone)]
pub struct GitSource(Arc<Inner>);

impl GitSource {
    pub fn new(cfg: GitConfig) -> Result<Self, SourceError> {
        Ok(GitSource(Arc::new(Inner::new(cfg)?)))
    }

    /// How many fetches ran (tests and benchmarks check that an unchanged
    /// remote is not fetched).
    pub fn fetch_count(&self) -> u64 {
        self.0.fetches.load(Ordering::Relaxed)
    }
}

struct Inner {
    cfg: GitConfig,
    /// The URL for people: userinfo replaced by `***`.
    shown: String,
    /// The branch followed, once known (from the config or the remote's
    /// HEAD); behind a mutex because the remote's default may change.
    branch: Mutex<Option<String>>,
    /// One user of the mirror at a time (libgit2 or git).
    repo: Arc<tokio::sync::Mutex<()>>,
    fetches: AtomicU64,
    transport: Transport,
}

impl Inner {
    fn new(cfg: GitConfig) -> Result<Self, SourceError> {
        let url = validate_url(&cfg.url, cfg.allow_insecure)?;
        let shown = redact(&cfg.url);
        std::fs::create_dir_all(&cfg.cache_dir).map_err(|e| SourceError::Local {
            path: cfg.cache_dir.display().to_string(),
            reason: e.to_string(),
        })?;
        let scratch = cfg.cache_dir.join("private");
        std::fs::create_dir_all(&scratch)
            .and_then(|_| {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&scratch, std::fs::Permissions::from_mode(0o700))
            })
            .map_err(|e| SourceError::Local {
                path: scratch.display().to_string(),
                reason: e.to_string(),
            })?;
        let helper = match &cfg.helper {
            Some(h) => h.clone(),
            None => std::env::current_exe().map_err(|e| SourceError::Local {
                path: "the sluice binary".into(),
                reason: e.to_string(),
            })?,
        };
        let transport = Transport {
            url: url.clone(),
            auth: cfg.auth.clone(),
            ssh: cfg.ssh.clone(),
            ca_file: cfg.ca_file.clone(),
            timeouts: cfg.timeouts,
            helper,
            scratch,
        };
        let source = Inner {
            branch: Mutex::new(cfg.branch.clone()),
            shown,
            cfg,
            repo: Arc::new(tokio::sync::Mutex::new(())),
            fetches: AtomicU64::new(0),
            transport,
        };
        source.open()?;
        Ok(source)
    }

    fn mirror(&self) -> PathBuf {
        self.cfg.cache_dir.join("mirror.git")
    }

    fn open(&self) -> Result<Repository, SourceError> {
        let path = self.mirror();
        let repo = if path.join("HEAD").exists() {
            Repository::open_bare(&path)
        } else {
            Repository::init_bare(&path)
        };
        repo.map_err(|e| SourceError::Local {
            path: path.display().to_string(),
            reason: self.scrub(e.message()),
        })
    }

    /// libgit2 messages may echo the URL: remove the token and userinfo.
    fn scrub(&self, message: &str) -> String {
        let mut m = message.replace(&self.cfg.url, &self.shown);
        if let Auth::Token { token, .. } = &self.cfg.auth {
            if !token.expose().is_empty() {
                m = m.replace(token.expose(), "***");
            }
        }
        if let Some(userinfo) = userinfo(&self.cfg.url) {
            m = m.replace(userinfo, "***");
        }
        m
    }

    /// The user a credential is sent as (for "authentication failed").
    fn user(&self) -> String {
        let from_url =
            userinfo(&self.cfg.url).map(|u| u.split(':').next().unwrap_or(u).to_string());
        match &self.cfg.auth {
            Auth::Token { .. } => from_url.unwrap_or_else(|| "x-access-token".into()),
            Auth::SshKey { .. } | Auth::SshAgent => from_url
                .or_else(|| {
                    self.cfg
                        .url
                        .split_once('@')
                        .filter(|(u, _)| !u.contains('/'))
                        .map(|(u, _)| u.to_string())
                })
                .unwrap_or_else(|| "git".into()),
            Auth::None => "(none)".into(),
        }
    }

    /// A git failure as the source's error, `step` saying what was done.
    fn failed(&self, step: Step, f: Failure) -> SourceError {
        let url = self.shown.clone();
        let reason = self.scrub(f.message());
        match f {
            Failure::Timeout(_) => SourceError::Timeout { url, reason },
            Failure::Rejected(_) => SourceError::Rejected {
                url,
                user: self.user(),
                reason,
            },
            Failure::UnknownHostKey(_) | Failure::ChangedHostKey(_) | Failure::Tls(_) => {
                SourceError::Untrusted { url, reason }
            }
            Failure::NoSuchRef(_) => SourceError::RefNotFound {
                url,
                reference: reason,
            },
            Failure::Unreachable(_) => SourceError::ListRefs { url, reason },
            Failure::Other(_) => match step {
                Step::List => SourceError::ListRefs { url, reason },
                Step::Fetch => SourceError::Fetch { url, reason },
            },
        }
    }

    /// Checks the watched branch and fetches it if it moved: one protocol
    /// v2 listing of that branch when it did not.
    async fn poll(&self) -> Result<Revision, SourceError> {
        let _guard = self.repo.lock().await;
        let known = self
            .branch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let branch = match known {
            Some(b) => b,
            None => self.discover_branch().await?,
        };
        let tracking = tracking_ref(&branch);
        let mirror = self.mirror();
        let before = self.local(move |repo| Ok(repo.refname_to_id(&tracking).ok()))?;
        // Shallow the first time: the watched commit is all a reconcile needs.
        let depth = before.is_none().then_some(1);
        let refspec = format!("+refs/heads/{branch}:{}", tracking_ref(&branch));
        match self.transport.fetch(&mirror, &refspec, depth).await {
            Ok(()) => {}
            Err(Failure::NoSuchRef(_)) if self.cfg.branch.is_none() => {
                // The remote's default branch may have changed: ask again.
                *self.branch.lock().unwrap_or_else(|e| e.into_inner()) = None;
                return Err(SourceError::RefNotFound {
                    url: self.shown.clone(),
                    reference: format!(
                        "refs/heads/{branch} (the remote's default branch until now)"
                    ),
                });
            }
            Err(Failure::NoSuchRef(_)) => {
                return Err(SourceError::RefNotFound {
                    url: self.shown.clone(),
                    reference: format!("refs/heads/{branch}"),
                })
            }
            Err(f) => return Err(self.failed(Step::Fetch, f)),
        }
        let tracking = tracking_ref(&branch);
        let (oid, rev) = self.local(move |repo| {
            let oid = repo.refname_to_id(&tracking)?;
            Ok((oid, revision(repo, oid)?))
        })?;
        if before != Some(oid) {
            self.fetches.fetch_add(1, Ordering::Relaxed);
            info!(url = %self.shown, branch = %branch, commit = %oid, "fetched");
            self.maintain().await;
        } else {
            debug!(url = %self.shown, branch = %branch, "remote unchanged");
        }
        Ok(rev)
    }

    /// The remote's default branch (its HEAD), asked once and remembered.
    async fn discover_branch(&self) -> Result<String, SourceError> {
        let branch = self
            .transport
            .default_branch()
            .await
            .map_err(|f| self.failed(Step::List, f))?
            .ok_or_else(|| SourceError::RefNotFound {
                url: self.shown.clone(),
                reference: "HEAD (the remote's default branch)".into(),
            })?;
        *self.branch.lock().unwrap_or_else(|e| e.into_inner()) = Some(branch.clone());
        Ok(branch)
    }

    /// Runs `f` on the mirror with libgit2, its errors as local errors.
    fn local<T>(
        &self,
        f: impl FnOnce(&Repository) -> Result<T, git2::Error>,
    ) -> Result<T, SourceError> {
        let repo = self.open()?;
        f(&repo).map_err(|e| self.local_err(&e))
    }

    /// Keeps the mirror small: consolidates packs past [`MAX_PACKS`], and
    /// drops pins and pull-request refs beyond those kept. Best effort.
    async fn maintain(&self) {
        let packs = std::fs::read_dir(self.mirror().join("objects/pack"))
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".pack"))
                    .count()
            })
            .unwrap_or(0);
        if packs > MAX_PACKS {
            match self.transport.repack(&self.mirror()).await {
                Ok(()) => info!(packs, "mirror repacked"),
                Err(f) => warn!(error = %self.scrub(f.message()), "repacking the mirror failed"),
            }
        }
        let pruned = self.local(|repo| {
            let mut n = prune_refs(repo, "refs/sluice/keep/", KEEP_REFS)?;
            n += prune_refs(repo, "refs/sluice/fetched/", FETCHED_REFS)?;
            Ok(n)
        });
        if let Ok(n @ 1..) = pruned {
            debug!(refs = n, "old pins dropped from the mirror");
        }
    }

    /// Fetches the commit `rev` (a full or abbreviated id) names: by id when
    /// it is full, else by deepening the watched branch until it is there.
    async fn deepen_to(&self, rev: &str) -> Result<(), SourceError> {
        if rev.len() == 40 {
            if let Ok(oid) = Oid::from_str(rev) {
                return self.ensure_commit(oid).await;
            }
        }
        let found = |s: &Self| s.resolve_local(rev).is_ok();
        let branch = self
            .branch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(branch) = branch {
            let refspec = format!("+refs/heads/{branch}:{}", tracking_ref(&branch));
            for by in [16, 256, 4096] {
                self.transport
                    .deepen(&self.mirror(), &refspec, by)
                    .await
                    .map_err(|f| self.failed(Step::Fetch, f))?;
                if found(self) {
                    return Ok(());
                }
            }
        }
        Err(SourceError::CommitNotFound {
            url: self.shown.clone(),
            commit: rev.to_string(),
        })
    }

    /// Fetches `oid` if the mirror lacks it (a commit named by hand, the
    /// parent of a commit to revert): by id, then by deepening the watched
    /// branch.
    async fn ensure_commit(&self, oid: Oid) -> Result<(), SourceError> {
        let have = |s: &Self| s.local(|repo| Ok(repo.find_commit(oid).is_ok()));
        if have(self)? {
            return Ok(());
        }
        let mirror = self.mirror();
        let by_id = format!("+{oid}:refs/sluice/wanted/{oid}");
        if self.transport.fetch(&mirror, &by_id, Some(1)).await.is_ok() && have(self)? {
            return Ok(());
        }
        let branch = self
            .branch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(branch) = branch {
            let refspec = format!("+refs/heads/{branch}:{}", tracking_ref(&branch));
            for by in [16, 256, 4096] {
                self.transport
                    .deepen(&mirror, &refspec, by)
                    .await
                    .map_err(|f| self.failed(Step::Fetch, f))?;
                if have(self)? {
                    return Ok(());
                }
            }
        }
        Err(SourceError::CommitNotFound {
            url: self.shown.clone(),
            commit: oid.to_string(),
        })
    }

    /// A revision by git's rules, from the mirror: `HEAD` (the watched
    /// branch), a branch, a tag, a full or abbreviated commit id, each
    /// with ancestry suffixes (`HEAD~2`, `main^`, `v1.2^2~1`).
    fn resolve_local(&self, rev: &str) -> Result<Revision, SourceError> {
        let repo = self.open()?;
        let not_found = || SourceError::CommitNotFound {
            url: self.shown.clone(),
            commit: rev.chars().take(80).collect(),
        };
        if rev.starts_with('-')
            || rev.contains("..")
            || rev.chars().any(|c| c.is_control() || c == ':')
        {
            return Err(not_found());
        }
        let (base, suffix) = split_ancestry(rev).ok_or_else(not_found)?;
        let base_oid = if base == "HEAD" || base == "@" {
            let branch = self
                .branch
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
                .ok_or_else(not_found)?;
            repo.refname_to_id(&tracking_ref(&branch)).ok()
        } else {
            [
                tracking_ref(base),
                format!("refs/tags/{base}"),
                format!("refs/sluice/keep/{base}"),
                format!("refs/sluice/fetched/{}", base.trim_start_matches("refs/")),
            ]
            .iter()
            .find_map(|name| repo.refname_to_id(name).ok())
            .or_else(|| {
                (base.len() >= 4 && base.chars().all(|c| c.is_ascii_hexdigit()))
                    .then(|| repo.revparse_single(base).ok().map(|o| o.id()))
                    .flatten()
            })
        };
        let oid = base_oid.ok_or_else(not_found)?;
        let commit = repo
            .find_object(oid, None)
            .and_then(|o| o.peel_to_commit())
            .map_err(|_| not_found())?;
        let target = if suffix.is_empty() {
            commit
        } else {
            // An ancestor past a shallow mirror's edge is not found here;
            // the caller deepens and asks again.
            repo.revparse_single(&format!("{}{suffix}", commit.id()))
                .and_then(|o| o.peel_to_commit())
                .map_err(|_| not_found())?
        };
        revision(&repo, target.id()).map_err(|e| self.local_err(&e))
    }

    fn snapshot_local(&self, commit: &CommitId, limits: &Limits) -> Result<Snapshot, SourceError> {
        let repo = self.open()?;
        let oid = Oid::from_str(commit.as_str()).map_err(|e| self.local_err(&e))?;
        let c = repo
            .find_commit(oid)
            .map_err(|_| SourceError::CommitNotFound {
                url: self.shown.clone(),
                commit: commit.to_string(),
            })?;
        let rev = revision(&repo, oid).map_err(|e| self.local_err(&e))?;
        let root = c.tree().map_err(|e| self.local_err(&e))?;
        let path = self.cfg.path.trim_matches('/');
        let tree = if path.is_empty() {
            root
        } else {
            let entry = root
                .get_path(Path::new(path))
                .map_err(|_| SourceError::PathNotFound {
                    commit: commit.to_string(),
                    path: path.to_string(),
                })?;
            if entry.kind() != Some(ObjectType::Tree) {
                return Err(SourceError::PathNotFound {
                    commit: commit.to_string(),
                    path: path.to_string(),
                });
            }
            repo.find_tree(entry.id()).map_err(|e| self.local_err(&e))?
        };
        let mut files = std::collections::BTreeMap::new();
        let mut total = 0u64;
        let too_large = |what: String, limit: u64| SourceError::TooLarge {
            commit: commit.to_string(),
            what,
            limit,
        };
        let mut stack = vec![(String::new(), tree)];
        while let Some((prefix, tree)) = stack.pop() {
            for entry in tree.iter() {
                let Ok(name) = entry.name() else {
                    warn!(commit = %commit, "skipping an entry whose name is not UTF-8");
                    continue;
                };
                let rel = if prefix.is_empty() {
                    name.to_string()
                } else {
                    format!("{prefix}/{name}")
                };
                match entry.kind() {
                    Some(ObjectType::Tree) => {
                        let sub = repo.find_tree(entry.id()).map_err(|e| self.local_err(&e))?;
                        stack.push((rel, sub));
                    }
                    Some(ObjectType::Blob) => {
                        if files.len() >= limits.max_files {
                            return Err(too_large(
                                "the number of files".into(),
                                limits.max_files as u64,
                            ));
                        }
                        let odb = repo.odb().map_err(|e| self.local_err(&e))?;
                        let (size, _) = odb
                            .read_header(entry.id())
                            .map_err(|e| self.local_err(&e))?;
                        if size as u64 > limits.max_file_bytes {
                            return Err(too_large(
                                format!("file {rel} ({size} bytes)"),
                                limits.max_file_bytes,
                            ));
                        }
                        total += size as u64;
                        if total > limits.max_total_bytes {
                            return Err(too_large(
                                "the total size of the files".into(),
                                limits.max_total_bytes,
                            ));
                        }
                        let blob = repo.find_blob(entry.id()).map_err(|e| self.local_err(&e))?;
                        let mode = entry.filemode();
                        let e = if mode == 0o120000 {
                            FileEntry::Symlink {
                                target: String::from_utf8_lossy(blob.content()).to_string(),
                            }
                        } else {
                            FileEntry::Blob {
                                data: blob.content().to_vec(),
                                executable: mode == 0o100755,
                            }
                        };
                        files.insert(rel, e);
                    }
                    Some(ObjectType::Commit) => {
                        warn!(commit = %commit, path = %rel, "skipping a submodule");
                    }
                    _ => {}
                }
            }
        }
        Ok(Snapshot {
            revision: rev,
            files,
        })
    }

    /// Fetches one ref (a pull request's base or head) shallowly.
    async fn fetch_ref(&self, name: &str) -> Result<Revision, SourceError> {
        let bad = name.is_empty()
            || name.starts_with('-')
            || name.contains("..")
            || name.chars().any(|c| {
                c.is_control()
                    || c.is_whitespace()
                    || matches!(c, ':' | '~' | '^' | '?' | '*' | '[' | '\\')
            });
        if bad {
            return Err(SourceError::RefNotFound {
                url: self.shown.clone(),
                reference: name.chars().take(80).collect(),
            });
        }
        let _guard = self.repo.lock().await;
        let (source, dest) = if name.starts_with("refs/") {
            (
                name.to_string(),
                format!("refs/sluice/fetched/{}", name.trim_start_matches("refs/")),
            )
        } else {
            (format!("refs/heads/{name}"), tracking_ref(name))
        };
        let fetched = self
            .transport
            .fetch(&self.mirror(), &format!("+{source}:{dest}"), Some(1))
            .await;
        match fetched {
            Ok(()) => {
                let rev = self.local(|repo| {
                    let oid = repo.refname_to_id(&dest)?;
                    revision(repo, oid)
                })?;
                self.maintain().await;
                Ok(rev)
            }
            // Not a branch on the remote: maybe a tag or commit known here.
            Err(Failure::NoSuchRef(_)) => self.resolve_local(name),
            Err(f) => Err(self.failed(Step::Fetch, f)),
        }
    }

    /// Commits the revert of `failed` on top of the watched branch and
    /// pushes it to a branch of its own.
    async fn push_revert(&self, failed: &CommitId, message: &str) -> Result<String, SourceError> {
        let _guard = self.repo.lock().await;
        let bad = Oid::from_str(failed.as_str()).map_err(|e| self.local_err(&e))?;
        // Reverting needs the failed commit's parent.
        let parent = self.local(|repo| {
            let c = repo.find_commit(bad)?;
            Ok(c.parent_id(0).ok())
        })?;
        if let Some(p) = parent {
            self.ensure_commit(p).await?;
        }
        let branch = self
            .branch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| SourceError::Local {
                path: self.mirror().display().to_string(),
                reason: "the watched branch is not known yet (no successful poll)".into(),
            })?;
        let short = failed.short().to_string();
        let local = format!("refs/sluice/revert/{short}");
        let conflict = || SourceError::Local {
            path: self.mirror().display().to_string(),
            reason: format!(
                "reverting {} conflicts with later commits; revert it by hand",
                failed.short()
            ),
        };
        let made = self.local(|repo| {
            let head_id = repo.refname_to_id(&tracking_ref(&branch))?;
            let head = repo.find_commit(head_id)?;
            let bad = repo.find_commit(bad)?;
            let mut index = repo.revert_commit(&bad, &head, 0, None)?;
            if index.has_conflicts() {
                return Ok(None);
            }
            let tree_id = index.write_tree_to(repo)?;
            let tree = repo.find_tree(tree_id)?;
            let sig = git2::Signature::now("sluice", "sluice@localhost")?;
            let commit = repo.commit(None, &sig, &sig, message, &tree, &[&head])?;
            repo.reference(&local, commit, true, "sluice: revert")?;
            Ok(Some(commit))
        })?;
        if made.is_none() {
            return Err(conflict());
        }
        let name = format!("sluice/revert-{short}");
        self.transport
            .push(&self.mirror(), &format!("+{local}:refs/heads/{name}"))
            .await
            .map_err(|f| match self.failed(Step::Fetch, f) {
                SourceError::Fetch { url, reason } => SourceError::Fetch {
                    url,
                    reason: format!("pushing {name}: {reason}"),
                },
                other => other,
            })?;
        info!(url = %self.shown, branch = %name, "revert pushed");
        Ok(name)
    }

    fn keep_local(&self, commit: &CommitId) -> Result<(), SourceError> {
        let repo = self.open()?;
        let oid = Oid::from_str(commit.as_str()).map_err(|e| self.local_err(&e))?;
        repo.reference(
            &format!("refs/sluice/keep/{commit}"),
            oid,
            true,
            "sluice: keep applied commit",
        )
        .map_err(|e| self.local_err(&e))?;
        Ok(())
    }

    fn local_err(&self, e: &git2::Error) -> SourceError {
        SourceError::Local {
            path: self.mirror().display().to_string(),
            reason: self.scrub(e.message()),
        }
    }
}

fn tracking_ref(branch: &str) -> String {
    format!("refs/sluice/remote/{branch}")
}

fn revision(repo: &Repository, oid: Oid) -> Result<Revision, git2::Error> {
    let c = repo.find_commit(oid)?;
    let time = c.committer().when().seconds();
    Ok(Revision {
        commit: CommitId::parse(&oid.to_string())
            .ok_or_else(|| git2::Error::from_str("not a commit id"))?,
        time,
        summary: c
            .summary()
            .ok()
            .flatten()
            .unwrap_or("")
            .chars()
            .take(200)
            .collect(),
    })
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SourceError> + Send + 'static,
) -> Result<T, SourceError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| SourceError::Local {
            path: String::new(),
            reason: format!("git worker failed: {e}"),
        })?
}

/// A full or abbreviated commit id (at least 7 hex digits).
fn is_commit_id(s: &str) -> bool {
    (7..=40).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `HEAD~2` as ("HEAD", "~2"): a name and its ancestry suffix (a chain of
/// `~N`, `^N`, `~`, `^`); None if what follows the name is not one.
fn split_ancestry(rev: &str) -> Option<(&str, &str)> {
    let at = rev.find(['~', '^']).unwrap_or(rev.len());
    let (base, suffix) = rev.split_at(at);
    let valid = suffix
        .split(['~', '^'])
        .skip(1)
        .all(|n| n.bytes().all(|b| b.is_ascii_digit()) && n.len() <= 6);
    (!base.is_empty() && valid).then_some((base, suffix))
}

/// A revision that may need history the shallow mirror lacks: a commit id
/// or an ancestor.
fn may_need_history(rev: &str) -> bool {
    is_commit_id(rev) || rev.contains(['~', '^'])
}

/// What a git run was doing, for errors that name no cause.
#[derive(Clone, Copy)]
enum Step {
    List,
    Fetch,
}

/// Deletes all but the `keep` refs under `prefix` whose commits are the
/// newest; returns how many went.
fn prune_refs(repo: &Repository, prefix: &str, keep: usize) -> Result<usize, git2::Error> {
    let mut refs: Vec<(i64, String)> = Vec::new();
    for r in repo.references_glob(&format!("{prefix}*"))? {
        let r = r?;
        let (Some(name), Ok(c)) = (r.name().ok().map(str::to_string), r.peel_to_commit()) else {
            continue;
        };
        refs.push((c.committer().when().seconds(), name));
    }
    if refs.len() <= keep {
        return Ok(0);
    }
    refs.sort_by(|a, b| b.cmp(a));
    let mut n = 0;
    for (_, name) in refs.into_iter().skip(keep) {
        repo.find_reference(&name)?.delete()?;
        n += 1;
    }
    Ok(n)
}

/// Runs a local (libgit2) step on the blocking pool, one user of the
/// mirror at a time.
async fn local<T: Send + 'static>(
    s: Arc<Inner>,
    f: impl FnOnce(&Inner) -> Result<T, SourceError> + Send + 'static,
) -> Result<T, SourceError> {
    let guard = s.repo.clone().lock_owned().await;
    blocking(move || {
        let _guard = guard;
        f(&s)
    })
    .await
}

#[async_trait::async_trait]
impl Source for GitSource {
    async fn poll(&self) -> Result<Revision, SourceError> {
        self.0.poll().await
    }

    async fn resolve(&self, rev: &str) -> Result<Revision, SourceError> {
        let name = rev.to_string();
        let found = local(self.0.clone(), move |s| s.resolve_local(&name)).await;
        match found {
            // A commit older than the shallow mirror: fetch it, if the
            // remote answers; offline, the local answer stands.
            Err(SourceError::CommitNotFound { .. }) if may_need_history(rev) => {
                let _guard = self.0.repo.lock().await;
                if self.0.deepen_to(rev).await.is_ok() {
                    drop(_guard);
                    let name = rev.to_string();
                    return local(self.0.clone(), move |s| s.resolve_local(&name)).await;
                }
                found
            }
            other => other,
        }
    }

    async fn snapshot(&self, commit: &CommitId, limits: &Limits) -> Result<Snapshot, SourceError> {
        let (commit, limits) = (commit.clone(), *limits);
        local(self.0.clone(), move |s| s.snapshot_local(&commit, &limits)).await
    }

    async fn fetch_ref(&self, name: &str) -> Result<Revision, SourceError> {
        if is_commit_id(name) || name == "HEAD" || name == "@" {
            return self.resolve(name).await;
        }
        // An ancestor of a ref (`feature~1`): fetch the ref, then walk.
        if let Some((base, suffix)) = split_ancestry(name) {
            if !suffix.is_empty() {
                if base != "HEAD" && base != "@" && !is_commit_id(base) {
                    self.0.fetch_ref(base).await?;
                }
                return self.resolve(name).await;
            }
        }
        self.0.fetch_ref(name).await
    }

    async fn push_revert(&self, failed: &CommitId, message: &str) -> Result<String, SourceError> {
        self.0.push_revert(failed, message).await
    }

    async fn keep(&self, commit: &CommitId) -> Result<(), SourceError> {
        let commit = commit.clone();
        local(self.0.clone(), move |s| {
            s.keep_local(&commit)?;
            s.local(|repo| prune_refs(repo, "refs/sluice/keep/", KEEP_REFS))?;
            Ok(())
        })
        .await
    }

    fn watched_branch(&self) -> Option<String> {
        self.0
            .branch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn describe(&self) -> String {
        let s = &self.0;
        let branch = s.branch.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let path = if s.cfg.path.is_empty() {
            String::new()
        } else {
            format!(" path {}", s.cfg.path)
        };
        format!(
            "{} branch {}{}",
            s.shown,
            branch.as_deref().unwrap_or("(default)"),
            path
        )
    }
}

/// Checks a repository address and returns it as libgit2 gets it.
pub fn validate_url(url: &str, allow_insecure: bool) -> Result<String, SourceError> {
    let invalid = |reason: &str| SourceError::InvalidUrl {
        url: redact(url),
        reason: reason.to_string(),
    };
    if url.is_empty() {
        return Err(invalid("empty"));
    }
    if url.starts_with('-') {
        return Err(invalid("must not start with `-` (option smuggling)"));
    }
    if url.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(invalid("contains control characters or spaces"));
    }
    if let Some((scheme, _)) = url.split_once("::") {
        if !scheme.contains('/') {
            return Err(invalid("transport prefixes such as `ext::` are refused"));
        }
    }
    if let Some((scheme, rest)) = url.split_once("://") {
        let host_ok = !rest.is_empty() && !rest.starts_with('-');
        return match scheme {
            "https" | "ssh" if host_ok => Ok(url.to_string()),
            "file" => {
                let path = &url["file://".len()..];
                if Path::new(path).exists() {
                    Ok(url.to_string())
                } else {
                    Err(invalid("no repository at that file:// path"))
                }
            }
            "http" | "git" if host_ok => {
                if allow_insecure {
                    Ok(url.to_string())
                } else {
                    Err(invalid("plain http:// and git:// are refused; pass --allow-insecure to allow them (e.g. for a loopback test server)"))
                }
            }
            _ => Err(invalid(
                "unsupported scheme: use https://, ssh://, file:// or a local path",
            )),
        };
    }
    // scp-like: [user@]host:path (no slash before the colon), as git reads
    // it when no such local path exists.
    if let Some((host, path)) = url.split_once(':') {
        let scp = !host.contains('/')
            && !path.is_empty()
            && (host.contains('@') || !Path::new(url).exists());
        if scp {
            let host_part = host.rsplit('@').next().unwrap_or("");
            if host_part.is_empty() || host_part.starts_with('-') {
                return Err(invalid("bad host"));
            }
            return Ok(url.to_string());
        }
    }
    let path = Path::new(url);
    match std::fs::canonicalize(path) {
        Ok(p) => Ok(p.display().to_string()),
        Err(_) => Err(invalid("no repository at that path")),
    }
}

/// The `user:password@` part of a URL, if any.
fn userinfo(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split('/').next()?;
    authority.rsplit_once('@').map(|(u, _)| u)
}

/// The URL with its userinfo replaced by `***`.
pub fn redact(url: &str) -> String {
    match userinfo(url) {
        Some(u) => url.replacen(&format!("{u}@"), "***@", 1),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ancestry_suffixes_split_as_git_reads_them() {
        assert_eq!(split_ancestry("HEAD~2"), Some(("HEAD", "~2")));
        assert_eq!(split_ancestry("main^^"), Some(("main", "^^")));
        assert_eq!(split_ancestry("v1.2^2~1"), Some(("v1.2", "^2~1")));
        assert_eq!(split_ancestry("abc1234"), Some(("abc1234", "")));
        assert_eq!(split_ancestry("HEAD~x"), None);
        assert_eq!(split_ancestry("~2"), None);
        assert!(may_need_history("HEAD~3") && may_need_history("abc1234"));
        assert!(!may_need_history("main"));
    }

    #[test]
    fn urls_are_validated() {
        assert!(validate_url("https://example.com/a.git", false).is_ok());
        assert!(validate_url("ssh://git@example.com/a.git", false).is_ok());
        assert!(validate_url("git@example.com:org/a.git", false).is_ok());
        for bad in [
            "-uhelp",
            "ext::sh -c touch% /tmp/pwned",
            "fd::3",
            "ftp://x/y",
            "https://x/a\nb",
            "git@-oProxyCommand=x:y",
        ] {
            assert!(validate_url(bad, true).is_err(), "{bad}");
        }
        let e = validate_url("git://127.0.0.1/x", false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--allow-insecure"), "{e}");
        assert!(validate_url("git://127.0.0.1/x", true).is_ok());
        assert!(validate_url("http://127.0.0.1/x", true).is_ok());
        assert!(validate_url("/definitely/not/here", false).is_err());
    }

    #[test]
    fn credentials_are_redacted() {
        assert_eq!(
            redact("https://user:s3cr3t@host/x.git"),
            "https://***@host/x.git"
        );
        assert_eq!(redact("https://host/x.git"), "https://host/x.git");
        let e = validate_url("ftp://user:s3cr3t@host/x", false)
            .unwrap_err()
            .to_string();
        assert!(!e.contains("s3cr3t"), "{e}");
        assert_eq!(format!("{:?}", Secret::new("tok")), "***");
    }
}
