//! The source stage: where desired state comes from.
//!
//! A [`Source`] turns "the watched branch of a repository" into immutable
//! [`Snapshot`]s, each identified by a commit id. Everything downstream works
//! from a snapshot's bytes only, never from a working tree, so a half-written
//! checkout can never be applied.
//!
//! # Guarantees an implementation gives
//! - [`Source::poll`] never changes live infrastructure; on failure it returns
//!   an error and the engine keeps the live system as it is.
//! - A [`Snapshot`] holds only entries under the watched path, with paths
//!   relative to it, and respects the [`Limits`] it was read with.
//! - Errors and logs carry no credentials: URLs are shown redacted.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// A full 40-hex git object id of a commit.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CommitId(String);

impl CommitId {
    /// Accepts a full hex object id (sha1 40 or sha256 64 hex digits).
    pub fn parse(s: &str) -> Option<Self> {
        let ok = (s.len() == 40 || s.len() == 64) && s.bytes().all(|b| b.is_ascii_hexdigit());
        ok.then(|| CommitId(s.to_ascii_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first 10 hex digits, for people.
    pub fn short(&self) -> &str {
        &self.0[..10.min(self.0.len())]
    }
}

impl fmt::Display for CommitId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for CommitId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CommitId({})", self.short())
    }
}

/// One commit as the source saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revision {
    pub commit: CommitId,
    /// Committer time, seconds since the Unix epoch; the start of lead time.
    pub time: i64,
    /// First line of the commit message, for history and reports.
    pub summary: String,
}

/// One entry of a commit's tree under the watched path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileEntry {
    /// A regular (or executable) file's bytes.
    Blob { data: Vec<u8>, executable: bool },
    /// A symbolic link, with its target exactly as stored in git. It is never
    /// followed on the filesystem: [`Snapshot::read`] resolves it inside the
    /// snapshot or refuses it.
    Symlink { target: String },
}

impl FileEntry {
    /// A regular, non-executable file holding `text`.
    pub fn text(text: &str) -> FileEntry {
        FileEntry::Blob {
            data: text.as_bytes().to_vec(),
            executable: false,
        }
    }
}

/// Caps that keep a hostile or broken commit from exhausting the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Bytes of one file.
    pub max_file_bytes: u64,
    /// Bytes of all files read for one commit.
    pub max_total_bytes: u64,
    /// Number of entries (files and symlinks) read for one commit.
    pub max_files: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_file_bytes: 4 << 20,
            max_total_bytes: 64 << 20,
            max_files: 20_000,
        }
    }
}

/// The files of one commit under the watched path, read from git objects.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub revision: Revision,
    /// Paths relative to the watched path, `/`-separated, no `.` or `..`
    /// components (the source normalises; a tree can't hold those anyway).
    pub files: BTreeMap<String, FileEntry>,
}

/// Why the engine may not use a path of a snapshot.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    #[error("{path}: no such file in the commit")]
    NotFound { path: String },
    #[error("{path}: path leaves {root:?} (absolute paths and `..` are refused)")]
    Escapes { path: String, root: String },
    #[error("{path}: symbolic link points outside {root:?}; refused")]
    SymlinkEscapes { path: String, root: String },
    #[error("{path}: too many levels of symbolic links")]
    SymlinkLoop { path: String },
    #[error("{path}: is a directory")]
    IsDirectory { path: String },
}

impl Snapshot {
    /// The text files `files` (path, content) at `revision`: a snapshot
    /// built in memory, for tests and tools that have no git history.
    pub fn from_texts(revision: Revision, files: &[(&str, &str)]) -> Snapshot {
        Snapshot {
            revision,
            files: files
                .iter()
                .map(|(p, c)| (p.to_string(), FileEntry::text(c)))
                .collect(),
        }
    }

    /// Reads `path` (relative to the watched path), resolving symbolic links
    /// inside the snapshot only. Every step of the resolution, and the final
    /// file, must stay under `root` (itself relative to the watched path, ""
    /// for the whole snapshot): that is how a service folder is kept from
    /// reading another service's files or anything outside the repository.
    /// The target of a refused link is never read, so none of its bytes can
    /// reach an error or a report.
    pub fn read(&self, root: &str, path: &str) -> Result<&[u8], PathError> {
        let root = normalise(root, "").map_err(|_| PathError::Escapes {
            path: root.to_string(),
            root: String::new(),
        })?;
        let mut current = normalise(path, "").map_err(|_| PathError::Escapes {
            path: path.to_string(),
            root: root.clone(),
        })?;
        for _ in 0..16 {
            if !within(&current, &root) {
                return Err(PathError::Escapes {
                    path: path.to_string(),
                    root,
                });
            }
            match self.files.get(&current) {
                Some(FileEntry::Blob { data, .. }) => return Ok(data),
                Some(FileEntry::Symlink { target }) => {
                    let dir = current.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
                    let next = if target.starts_with('/') {
                        Err(OutsideRoot)
                    } else {
                        normalise(target, dir)
                    };
                    match next {
                        Ok(next) if within(&next, &root) => current = next,
                        _ => {
                            return Err(PathError::SymlinkEscapes {
                                path: path.to_string(),
                                root,
                            })
                        }
                    }
                }
                None if self.is_dir(&current) => {
                    return Err(PathError::IsDirectory {
                        path: path.to_string(),
                    })
                }
                None => {
                    return Err(PathError::NotFound {
                        path: path.to_string(),
                    })
                }
            }
        }
        Err(PathError::SymlinkLoop {
            path: path.to_string(),
        })
    }

    /// Whether any entry lives under `dir`.
    pub fn is_dir(&self, dir: &str) -> bool {
        let prefix = format!("{}/", dir.trim_end_matches('/'));
        dir.is_empty()
            || self
                .files
                .range(prefix.clone()..)
                .next()
                .is_some_and(|(k, _)| k.starts_with(&prefix))
    }

    /// Entries directly or indirectly under `dir`, in path order.
    pub fn list(&self, dir: &str) -> impl Iterator<Item = (&String, &FileEntry)> {
        let prefix = if dir.is_empty() {
            String::new()
        } else {
            format!("{}/", dir.trim_end_matches('/'))
        };
        self.files
            .range(prefix.clone()..)
            .take_while(move |(k, _)| k.starts_with(&prefix))
    }

    /// Total bytes of blob content; used by limits and benchmarks.
    pub fn total_bytes(&self) -> u64 {
        self.files
            .values()
            .map(|e| match e {
                FileEntry::Blob { data, .. } => data.len() as u64,
                FileEntry::Symlink { target } => target.len() as u64,
            })
            .sum()
    }
}

/// A path that climbs above the snapshot's root or is absolute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutsideRoot;

/// Joins `path` onto `base` and folds `.` and `..`; fails when `..` would
/// climb above the snapshot's root or the path is absolute.
pub fn normalise(path: &str, base: &str) -> Result<String, OutsideRoot> {
    if path.starts_with('/') || path.contains('\0') || path.contains('\\') {
        return Err(OutsideRoot);
    }
    let mut parts: Vec<&str> = base.split('/').filter(|p| !p.is_empty()).collect();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop().ok_or(OutsideRoot)?;
            }
            p => parts.push(p),
        }
    }
    Ok(parts.join("/"))
}

fn within(path: &str, root: &str) -> bool {
    root.is_empty() || path == root || path.starts_with(&format!("{root}/"))
}

/// What failed while reading the source. Messages never contain
/// credentials: implementations put redacted URLs in them.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The repository address itself is not acceptable (scheme not allowed,
    /// option smuggling such as a leading `-` or `ext::`).
    #[error("repository {url}: {reason}")]
    InvalidUrl { url: String, reason: String },
    /// Credentials could not be loaded (missing env var or file).
    #[error("credentials for {url}: {reason}")]
    Credentials { url: String, reason: String },
    /// Listing the remote's refs failed: remote down, DNS, auth, not a git
    /// server (an HTML error page).
    #[error("listing refs of {url}: {reason}")]
    ListRefs { url: String, reason: String },
    /// Fetching objects failed.
    #[error("fetching {url}: {reason}")]
    Fetch { url: String, reason: String },
    /// The remote did not answer in time, or a transfer stopped moving.
    #[error("{url}: timed out: {reason}")]
    Timeout { url: String, reason: String },
    /// The server refused the credential (not retried until the next poll).
    #[error("{url}: authentication failed (user {user}): {reason}")]
    Rejected {
        url: String,
        user: String,
        reason: String,
    },
    /// The server could not be trusted: an unknown or changed ssh host
    /// key, a TLS certificate that does not verify.
    #[error("{url}: {reason}")]
    Untrusted { url: String, reason: String },
    /// The branch (or the remote's default branch) does not exist.
    #[error("ref {reference:?} not found in {url}")]
    RefNotFound { url: String, reference: String },
    /// A commit asked for is not in the local object database (history
    /// rewritten and the commit garbage-collected, or never fetched).
    #[error("commit {commit} not found in the local copy of {url}")]
    CommitNotFound { url: String, commit: String },
    /// The watched path does not exist in the commit, or is not a folder.
    #[error("commit {commit}: path {path:?} not found or not a folder")]
    PathNotFound { commit: String, path: String },
    /// A cap in [`Limits`] was exceeded.
    #[error("commit {commit}: {what} exceeds the limit of {limit}")]
    TooLarge {
        commit: String,
        what: String,
        limit: u64,
    },
    /// Any other libgit2 or I/O failure on the local copy.
    #[error("local repository {path}: {reason}")]
    Local { path: String, reason: String },
}

impl SourceError {
    /// Whether retrying later can help (network trouble), as opposed to a
    /// configuration problem that needs a person.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            SourceError::ListRefs { .. } | SourceError::Fetch { .. } | SourceError::Timeout { .. }
        )
    }
}

/// The git side of the pipeline, behind a trait so the engine can be driven
/// by a real repository or a fake.
#[async_trait::async_trait]
pub trait Source: Send + Sync {
    /// Checks the watched ref on the remote and fetches only if it moved
    /// (or is not in the local copy yet). Returns the commit it points at.
    /// Idempotent; survives force-pushes (the local ref follows the remote).
    async fn poll(&self) -> Result<Revision, SourceError>;

    /// Resolves a commit id, a branch or tag name, or a unique abbreviated
    /// id against the local copy, without network. Used by `revert --to` and
    /// `plan --base/--head`, which must work while the remote is down.
    async fn resolve(&self, rev: &str) -> Result<Revision, SourceError>;

    /// Reads the tree of `commit` under the watched path from the local
    /// object database. Never touches the network.
    async fn snapshot(&self, commit: &CommitId, limits: &Limits) -> Result<Snapshot, SourceError>;

    /// Fetches another ref of the same remote (a pull request's branch,
    /// `refs/pull/7/head`, a tag) and resolves it, for reports. Only
    /// `resolve` by default, for sources that hold everything locally.
    async fn fetch_ref(&self, name: &str) -> Result<Revision, SourceError> {
        self.resolve(name).await
    }

    /// Writes a commit reverting `failed` on top of the watched branch's
    /// head and pushes it as a new branch, so a pull request can make git
    /// say again what is live. Returns the branch name.
    async fn push_revert(&self, failed: &CommitId, message: &str) -> Result<String, SourceError> {
        let _ = message;
        Err(SourceError::Local {
            path: String::new(),
            reason: format!("this source cannot push a revert of {failed}"),
        })
    }

    /// Pins a commit (the applied or last good one) with a local ref so it
    /// stays in the local object database after a force-push removed it from
    /// the remote; `snapshot` and `resolve` keep working on it with the
    /// remote down. Idempotent.
    async fn keep(&self, commit: &CommitId) -> Result<(), SourceError>;

    /// The branch followed (known after a successful poll).
    fn watched_branch(&self) -> Option<String> {
        None
    }

    /// A description of the source for status and logs, credentials removed.
    fn describe(&self) -> String;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(entries: &[(&str, FileEntry)]) -> Snapshot {
        Snapshot {
            revision: Revision {
                commit: CommitId::parse(&"a".repeat(40)).unwrap(),
                time: 0,
                summary: String::new(),
            },
            files: entries
                .iter()
                .map(|(p, e)| (p.to_string(), e.clone()))
                .collect(),
        }
    }

    fn blob(s: &str) -> FileEntry {
        FileEntry::Blob {
            data: s.as_bytes().to_vec(),
            executable: false,
        }
    }

    fn link(s: &str) -> FileEntry {
        FileEntry::Symlink {
            target: s.to_string(),
        }
    }

    #[test]
    fn symlinks_resolve_inside_their_root_only() {
        let s = snap(&[
            ("svc/a/app.yaml", blob("a")),
            ("svc/a/alias.yaml", link("app.yaml")),
            ("svc/a/passwd", link("/etc/passwd")),
            ("svc/a/up", link("../../../etc/passwd")),
            ("svc/a/other", link("../b/secret.yaml")),
            ("svc/b/secret.yaml", blob("b-secret")),
            ("svc/a/loop", link("loop")),
        ]);
        assert_eq!(s.read("svc/a", "svc/a/alias.yaml").unwrap(), b"a");
        assert!(matches!(
            s.read("svc/a", "svc/a/passwd"),
            Err(PathError::SymlinkEscapes { .. })
        ));
        assert!(matches!(
            s.read("svc/a", "svc/a/up"),
            Err(PathError::SymlinkEscapes { .. })
        ));
        let err = s.read("svc/a", "svc/a/other").unwrap_err();
        assert!(matches!(err, PathError::SymlinkEscapes { .. }));
        assert!(!err.to_string().contains("b-secret"));
        assert!(matches!(
            s.read("svc/a", "svc/a/loop"),
            Err(PathError::SymlinkLoop { .. })
        ));
        assert!(matches!(
            s.read("svc/a", "svc/a/../b/secret.yaml"),
            Err(PathError::Escapes { .. })
        ));
        assert!(matches!(s.read("", "../x"), Err(PathError::Escapes { .. })));
        assert!(matches!(
            s.read("svc", "svc/a"),
            Err(PathError::IsDirectory { .. })
        ));
    }

    #[test]
    fn normalise_folds_dots_and_refuses_climbing_out() {
        assert_eq!(normalise("./a//b/../c", "x").unwrap(), "x/a/c");
        assert!(normalise("../../a", "x").is_err());
        assert!(normalise("/etc", "").is_err());
    }

    #[test]
    fn list_is_scoped_to_the_folder() {
        let s = snap(&[("a/x", blob("")), ("ab/y", blob("")), ("a/b/z", blob(""))]);
        let names: Vec<_> = s.list("a").map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, vec!["a/b/z", "a/x"]);
    }
}
