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
//! # Caveats
//! libgit2's own network timeouts apply; a server that accepts the
//! connection and then never answers holds one blocking thread until they
//! expire.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use git2::{
    AutotagOption, Cred, Direction, FetchOptions, ObjectType, Oid, RemoteCallbacks, Repository,
};
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

/// How to authenticate to the remote.
#[derive(Clone, Debug, Default)]
pub enum Auth {
    #[default]
    None,
    /// https: the token as password (user `x-access-token` unless the URL
    /// names one).
    Token {
        token: Secret,
    },
    SshKey {
        private_key: PathBuf,
        passphrase: Option<Secret>,
    },
    SshAgent,
}

#[derive(Clone, Debug)]
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
    /// The URL as libgit2 gets it (a local path made absolute).
    url: String,
    /// The URL for people: userinfo replaced by `***`.
    shown: String,
    /// The branch followed, once known (from the config or the remote's
    /// HEAD); behind a mutex because the remote's default may change.
    branch: Mutex<Option<String>>,
    /// One libgit2 user of the mirror at a time.
    repo: Arc<Mutex<()>>,
    fetches: AtomicU64,
}

impl Inner {
    fn new(cfg: GitConfig) -> Result<Self, SourceError> {
        let url = validate_url(&cfg.url, cfg.allow_insecure)?;
        let shown = redact(&cfg.url);
        std::fs::create_dir_all(&cfg.cache_dir).map_err(|e| SourceError::Local {
            path: cfg.cache_dir.display().to_string(),
            reason: e.to_string(),
        })?;
        let source = Inner {
            branch: Mutex::new(cfg.branch.clone()),
            url,
            shown,
            cfg,
            repo: Arc::new(Mutex::new(())),
            fetches: AtomicU64::new(0),
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
        if let Auth::Token { token } = &self.cfg.auth {
            if !token.expose().is_empty() {
                m = m.replace(token.expose(), "***");
            }
        }
        if let Some(userinfo) = userinfo(&self.cfg.url) {
            m = m.replace(userinfo, "***");
        }
        m
    }

    fn callbacks(&self) -> RemoteCallbacks<'_> {
        let mut cb = RemoteCallbacks::new();
        let auth = self.cfg.auth.clone();
        let mut tries = 0;
        cb.credentials(move |_url, user_from_url, allowed| {
            tries += 1;
            // libgit2 asks again after a refusal; stop instead of looping.
            if tries > 3 {
                return Err(git2::Error::from_str("authentication failed"));
            }
            match &auth {
                Auth::Token { token }
                    if allowed.contains(git2::CredentialType::USER_PASS_PLAINTEXT) =>
                {
                    Cred::userpass_plaintext(
                        user_from_url.unwrap_or("x-access-token"),
                        token.expose(),
                    )
                }
                Auth::SshKey {
                    private_key,
                    passphrase,
                } => Cred::ssh_key(
                    user_from_url.unwrap_or("git"),
                    None,
                    private_key,
                    passphrase.as_ref().map(Secret::expose),
                ),
                Auth::SshAgent => Cred::ssh_key_from_agent(user_from_url.unwrap_or("git")),
                _ => Err(git2::Error::from_str(
                    "the remote asks for credentials and none are configured",
                )),
            }
        });
        cb
    }

    /// Blocking body of `poll`.
    fn poll_blocking(&self) -> Result<Revision, SourceError> {
        let _guard = self.repo.lock().unwrap_or_else(|e| e.into_inner());
        let repo = self.open()?;
        let mut remote = repo
            .remote_anonymous(&self.url)
            .map_err(|e| self.list_err(&e))?;
        let (branch, remote_oid) = {
            let conn = remote
                .connect_auth(Direction::Fetch, Some(self.callbacks()), None)
                .map_err(|e| self.list_err(&e))?;
            let heads = conn.list().map_err(|e| self.list_err(&e))?;
            let branch = match self.cfg.branch.clone() {
                Some(b) => b,
                None => {
                    let head = heads.iter().find(|h| h.name() == "HEAD");
                    let target = head.and_then(|h| h.symref_target()).map(str::to_string);
                    let target = target.or_else(|| {
                        conn.default_branch()
                            .ok()
                            .and_then(|b| b.as_str().ok().map(str::to_string))
                    });
                    match target.and_then(|t| t.strip_prefix("refs/heads/").map(str::to_string)) {
                        Some(b) => b,
                        None => {
                            return Err(SourceError::RefNotFound {
                                url: self.shown.clone(),
                                reference: "HEAD (the remote's default branch)".into(),
                            })
                        }
                    }
                }
            };
            let full = format!("refs/heads/{branch}");
            let oid = heads
                .iter()
                .find(|h| h.name() == full)
                .map(|h| h.oid())
                .ok_or_else(|| SourceError::RefNotFound {
                    url: self.shown.clone(),
                    reference: full.clone(),
                })?;
            (branch, oid)
        };
        *self.branch.lock().unwrap_or_else(|e| e.into_inner()) = Some(branch.clone());
        let tracking = tracking_ref(&branch);
        let local = repo.refname_to_id(&tracking).ok();
        let have = repo.find_commit(remote_oid).is_ok();
        if local != Some(remote_oid) || !have {
            self.fetch(&mut remote, &format!("+refs/heads/{branch}:{tracking}"))?;
            info!(url = %self.shown, branch = %branch, commit = %remote_oid, "fetched");
        } else {
            debug!(url = %self.shown, branch = %branch, "remote unchanged; no fetch");
        }
        // A remote can advertise one id and send another only if it is
        // broken or hostile: trust what the mirror holds now.
        let oid = repo
            .refname_to_id(&tracking)
            .map_err(|e| self.local_err(&e))?;
        if oid != remote_oid {
            warn!(url = %self.shown, advertised = %remote_oid, fetched = %oid, "remote moved during the fetch");
        }
        revision(&repo, oid).map_err(|e| self.local_err(&e))
    }

    fn resolve_blocking(&self, rev: &str) -> Result<Revision, SourceError> {
        let _guard = self.repo.lock().unwrap_or_else(|e| e.into_inner());
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
        let candidates = [
            tracking_ref(rev),
            format!("refs/tags/{rev}"),
            format!("refs/sluice/keep/{rev}"),
        ];
        for name in &candidates {
            if let Ok(oid) = repo.refname_to_id(name) {
                if let Ok(c) = repo.find_object(oid, None).and_then(|o| o.peel_to_commit()) {
                    return revision(&repo, c.id()).map_err(|e| self.local_err(&e));
                }
            }
        }
        if rev.len() >= 4 && rev.chars().all(|c| c.is_ascii_hexdigit()) {
            if let Ok(obj) = repo.revparse_single(rev) {
                if let Ok(c) = obj.peel_to_commit() {
                    return revision(&repo, c.id()).map_err(|e| self.local_err(&e));
                }
            }
        }
        Err(not_found())
    }

    fn snapshot_blocking(
        &self,
        commit: &CommitId,
        limits: &Limits,
    ) -> Result<Snapshot, SourceError> {
        let _guard = self.repo.lock().unwrap_or_else(|e| e.into_inner());
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

    fn fetch_ref_blocking(&self, name: &str) -> Result<Revision, SourceError> {
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
        {
            let _guard = self.repo.lock().unwrap_or_else(|e| e.into_inner());
            let repo = self.open()?;
            let mut remote = repo
                .remote_anonymous(&self.url)
                .map_err(|e| self.list_err(&e))?;
            let (source, dest) = if name.starts_with("refs/") {
                (
                    name.to_string(),
                    format!("refs/sluice/fetched/{}", name.trim_start_matches("refs/")),
                )
            } else {
                (format!("refs/heads/{name}"), tracking_ref(name))
            };
            self.fetch(&mut remote, &format!("+{source}:{dest}"))?;
            if let Ok(oid) = repo.refname_to_id(&dest) {
                return revision(&repo, oid).map_err(|e| self.local_err(&e));
            }
        }
        self.resolve_blocking(name)
    }

    fn push_revert_blocking(
        &self,
        failed: &CommitId,
        message: &str,
    ) -> Result<String, SourceError> {
        let _guard = self.repo.lock().unwrap_or_else(|e| e.into_inner());
        let repo = self.open()?;
        let branch = self
            .branch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| SourceError::Local {
                path: self.mirror().display().to_string(),
                reason: "the watched branch is not known yet (no successful poll)".into(),
            })?;
        let head_id = repo
            .refname_to_id(&tracking_ref(&branch))
            .map_err(|e| self.local_err(&e))?;
        let head = repo.find_commit(head_id).map_err(|e| self.local_err(&e))?;
        let bad = repo
            .find_commit(Oid::from_str(failed.as_str()).map_err(|e| self.local_err(&e))?)
            .map_err(|e| self.local_err(&e))?;
        let mut index = repo
            .revert_commit(&bad, &head, 0, None)
            .map_err(|e| self.local_err(&e))?;
        if index.has_conflicts() {
            return Err(SourceError::Local {
                path: self.mirror().display().to_string(),
                reason: format!(
                    "reverting {} conflicts with later commits; revert it by hand",
                    failed.short()
                ),
            });
        }
        let tree_id = index.write_tree_to(&repo).map_err(|e| self.local_err(&e))?;
        let tree = repo.find_tree(tree_id).map_err(|e| self.local_err(&e))?;
        let sig =
            git2::Signature::now("sluice", "sluice@localhost").map_err(|e| self.local_err(&e))?;
        let commit = repo
            .commit(None, &sig, &sig, message, &tree, &[&head])
            .map_err(|e| self.local_err(&e))?;
        let name = format!("sluice/revert-{}", failed.short());
        let local = format!("refs/sluice/revert/{}", failed.short());
        repo.reference(&local, commit, true, "sluice: revert")
            .map_err(|e| self.local_err(&e))?;
        let mut remote = repo
            .remote_anonymous(&self.url)
            .map_err(|e| self.list_err(&e))?;
        let mut po = git2::PushOptions::new();
        po.remote_callbacks(self.callbacks());
        remote
            .push(
                &[format!("+{local}:refs/heads/{name}").as_str()],
                Some(&mut po),
            )
            .map_err(|e| SourceError::Fetch {
                url: self.shown.clone(),
                reason: format!("pushing {name}: {}", self.scrub(e.message())),
            })?;
        info!(url = %self.shown, branch = %name, "revert pushed");
        Ok(name)
    }

    fn keep_blocking(&self, commit: &CommitId) -> Result<(), SourceError> {
        let _guard = self.repo.lock().unwrap_or_else(|e| e.into_inner());
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

    /// One fetch of `refspec`, no tags, counted for tests and benchmarks.
    fn fetch(&self, remote: &mut git2::Remote<'_>, refspec: &str) -> Result<(), SourceError> {
        let mut fo = FetchOptions::new();
        fo.remote_callbacks(self.callbacks())
            .download_tags(AutotagOption::None);
        remote
            .fetch(&[refspec], Some(&mut fo), None)
            .map_err(|e| SourceError::Fetch {
                url: self.shown.clone(),
                reason: self.scrub(e.message()),
            })?;
        self.fetches.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn list_err(&self, e: &git2::Error) -> SourceError {
        SourceError::ListRefs {
            url: self.shown.clone(),
            reason: self.scrub(e.message()),
        }
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

#[async_trait::async_trait]
impl Source for GitSource {
    async fn poll(&self) -> Result<Revision, SourceError> {
        let s = self.0.clone();
        blocking(move || s.poll_blocking()).await
    }

    async fn resolve(&self, rev: &str) -> Result<Revision, SourceError> {
        let s = self.0.clone();
        let rev = rev.to_string();
        blocking(move || s.resolve_blocking(&rev)).await
    }

    async fn snapshot(&self, commit: &CommitId, limits: &Limits) -> Result<Snapshot, SourceError> {
        let s = self.0.clone();
        let (commit, limits) = (commit.clone(), *limits);
        blocking(move || s.snapshot_blocking(&commit, &limits)).await
    }

    async fn fetch_ref(&self, name: &str) -> Result<Revision, SourceError> {
        let s = self.0.clone();
        let name = name.to_string();
        blocking(move || s.fetch_ref_blocking(&name)).await
    }

    async fn push_revert(&self, failed: &CommitId, message: &str) -> Result<String, SourceError> {
        let s = self.0.clone();
        let (failed, message) = (failed.clone(), message.to_string());
        blocking(move || s.push_revert_blocking(&failed, &message)).await
    }

    async fn keep(&self, commit: &CommitId) -> Result<(), SourceError> {
        let s = self.0.clone();
        let commit = commit.clone();
        blocking(move || s.keep_blocking(&commit)).await
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
    // scp-like: user@host:path (no slash before the colon).
    if let Some((host, path)) = url.split_once(':') {
        if !host.contains('/') && host.contains('@') && !path.is_empty() {
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
