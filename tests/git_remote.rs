//! The git source against real repositories: local paths, file://, and a
//! real `git daemon` on 127.0.0.1 that is force-pushed, stopped and
//! started again; an HTTP server that answers HTML error pages; and the
//! whole agent following a remote that goes down and comes back.

#[path = "common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::{git, GitDaemon, Shop};
use sluice_core::source::{FileEntry, Limits, Source, SourceError};
use sluice_git::{Auth, GitConfig, GitSource, Secret};

fn repo_with(files: &[(&str, &str)]) -> (tempfile::TempDir, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("served").join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    for (p, c) in files {
        let f = repo.join(p);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(f, c).unwrap();
    }
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-qm", "first"]);
    (tmp, repo)
}

fn commit(repo: &std::path::Path, file: &str, content: &str, msg: &str) -> String {
    std::fs::write(repo.join(file), content).unwrap();
    git(repo, &["add", "-A"]);
    git(repo, &["commit", "-qm", msg]);
    git(repo, &["rev-parse", "HEAD"])
}

fn source(
    url: &str,
    cache: &std::path::Path,
    path: &str,
    insecure: bool,
) -> Result<GitSource, SourceError> {
    GitSource::new(GitConfig {
        url: url.to_string(),
        branch: None,
        path: path.to_string(),
        cache_dir: cache.to_path_buf(),
        auth: Auth::None,
        allow_insecure: insecure,
        helper: Some(common::SLUICE.into()),
        ..GitConfig::default()
    })
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn local_path_and_file_url_are_read_from_objects_not_the_work_tree() {
    let (tmp, repo) = repo_with(&[("app/a.yaml", "one"), ("app/link", "")]);
    std::fs::remove_file(repo.join("app/link")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", repo.join("app/link")).unwrap();
    let head = commit(&repo, "app/a.yaml", "two", "second");
    // An uncommitted edit must never be seen.
    std::fs::write(repo.join("app/a.yaml"), "half-written").unwrap();
    let rt = rt();
    for url in [
        repo.display().to_string(),
        format!("file://{}", repo.display()),
    ] {
        let cache = tmp.path().join(format!("cache-{}", url.len()));
        let s = source(&url, &cache, "app", false).unwrap();
        let rev = rt.block_on(s.poll()).unwrap();
        assert_eq!(rev.commit.as_str(), head);
        assert_eq!(rev.summary, "second");
        let snap = rt
            .block_on(s.snapshot(&rev.commit, &Limits::default()))
            .unwrap();
        assert_eq!(
            snap.files["a.yaml"],
            FileEntry::Blob {
                data: b"two".to_vec(),
                executable: false
            }
        );
        assert_eq!(
            snap.files["link"],
            FileEntry::Symlink {
                target: "/etc/passwd".into()
            }
        );
        // Polling again without a change fetches nothing.
        let n = s.fetch_count();
        rt.block_on(s.poll()).unwrap();
        assert_eq!(s.fetch_count(), n);
    }
}

#[test]
fn a_git_daemon_remote_is_followed_through_force_pushes_and_outages() {
    let (tmp, repo) = repo_with(&[("app/a.yaml", "v1")]);
    let mut daemon = GitDaemon::start(&tmp.path().join("served"));
    let rt = rt();
    let s = source(&daemon.url("repo"), &tmp.path().join("cache"), "app", true).unwrap();
    let first = rt.block_on(s.poll()).unwrap();
    assert_eq!(s.fetch_count(), 1);
    rt.block_on(s.poll()).unwrap();
    assert_eq!(s.fetch_count(), 1, "an unchanged remote is not fetched");

    let second = commit(&repo, "app/a.yaml", "v2", "second");
    let rev = rt.block_on(s.poll()).unwrap();
    assert_eq!(rev.commit.as_str(), second);
    assert_eq!(s.fetch_count(), 2);
    rt.block_on(s.keep(&rev.commit)).unwrap();

    // History rewritten: `second` is gone from the branch.
    git(&repo, &["reset", "-q", "--hard", first.commit.as_str()]);
    let third = commit(&repo, "app/a.yaml", "v3", "rewritten");
    let rev3 = rt.block_on(s.poll()).unwrap();
    assert_eq!(rev3.commit.as_str(), third);
    git(&repo, &["reflog", "expire", "--expire=now", "--all"]);
    git(&repo, &["gc", "-q", "--prune=now"]);

    // The remote goes down: polls fail fast with a clear error, the kept
    // commits still read and resolve from the local copy.
    daemon.stop();
    let started = Instant::now();
    let err = rt.block_on(s.poll()).unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(matches!(err, SourceError::ListRefs { .. }), "{err}");
    assert!(err.is_transient());
    let old = rt.block_on(s.resolve(&second[..10])).unwrap();
    let snap = rt
        .block_on(s.snapshot(&old.commit, &Limits::default()))
        .unwrap();
    assert_eq!(
        snap.files["a.yaml"],
        FileEntry::Blob {
            data: b"v2".to_vec(),
            executable: false
        }
    );

    // Back on the same port: the next poll proceeds.
    daemon.restart();
    let fourth = commit(&repo, "app/a.yaml", "v4", "fourth");
    assert_eq!(rt.block_on(s.poll()).unwrap().commit.as_str(), fourth);
}

#[test]
fn revisions_resolve_by_gits_rules_past_the_shallow_edge() {
    // HEAD~N, branch~N, short ids and tags, as `git rev-parse` reads them;
    // the first fetch is shallow, so ancestors are fetched on demand.
    let (tmp, repo) = repo_with(&[("app/a.yaml", "v1")]);
    let first = git(&repo, &["rev-parse", "HEAD"]);
    let second = commit(&repo, "app/a.yaml", "v2", "second");
    git(&repo, &["tag", "v2"]);
    let third = commit(&repo, "app/a.yaml", "v3", "third");
    let daemon = GitDaemon::start(&tmp.path().join("served"));
    let rt = rt();
    let s = source(&daemon.url("repo"), &tmp.path().join("cache"), "app", true).unwrap();
    assert_eq!(rt.block_on(s.poll()).unwrap().commit.as_str(), third);
    let at = |rev: &str| rt.block_on(s.resolve(rev)).map(|r| r.commit.to_string());
    assert_eq!(at("HEAD").unwrap(), third);
    assert_eq!(at("HEAD~2").unwrap(), first);
    assert_eq!(at("main^").unwrap(), second);
    assert_eq!(at(&third[..7]).unwrap(), third);
    assert_eq!(at(&format!("{}~1", &third[..8])).unwrap(), second);
    let err = at("HEAD~9").unwrap_err().to_string();
    assert!(err.contains("HEAD~9"), "{err}");
    assert!(at("HEAD~x").is_err());
    // Through fetch_ref, as `plan --base/--head` ask: a tag and an ancestor.
    let fetched = |rev: &str| rt.block_on(s.fetch_ref(rev)).map(|r| r.commit.to_string());
    assert_eq!(fetched("main~1").unwrap(), second);
    assert_eq!(fetched("HEAD~2").unwrap(), first);
    drop(daemon);
}

#[test]
fn limits_missing_paths_and_bad_urls_are_clear_errors() {
    let (tmp, repo) = repo_with(&[("app/a.yaml", "x"), ("app/big.bin", &"x".repeat(5000))]);
    let rt = rt();
    let s = source(
        &repo.display().to_string(),
        &tmp.path().join("c1"),
        "app",
        false,
    )
    .unwrap();
    let rev = rt.block_on(s.poll()).unwrap();
    let limits = Limits {
        max_file_bytes: 1000,
        ..Limits::default()
    };
    let e = rt
        .block_on(s.snapshot(&rev.commit, &limits))
        .unwrap_err()
        .to_string();
    assert!(e.contains("big.bin"), "{e}");
    let s2 = source(
        &repo.display().to_string(),
        &tmp.path().join("c2"),
        "nowhere",
        false,
    )
    .unwrap();
    let rev = rt.block_on(s2.poll()).unwrap();
    let e = rt
        .block_on(s2.snapshot(&rev.commit, &Limits::default()))
        .unwrap_err();
    assert!(matches!(e, SourceError::PathNotFound { .. }), "{e}");

    let cache = tmp.path().join("c3");
    let refused = |url: &str, insecure: bool| {
        source(url, &cache, "", insecure)
            .err()
            .map(|e| e.to_string())
    };
    assert!(refused("git://127.0.0.1:9/x", false).is_some_and(|e| e.contains("--allow-insecure")));
    assert!(refused("ext::sh -c touch% /tmp/pwned", true).is_some());
    assert!(refused("-uhelp", true).is_some());
    assert!(refused("/no/such/repository", false).is_some());
}

#[test]
fn a_token_never_appears_in_errors_or_descriptions() {
    let tmp = tempfile::tempdir().unwrap();
    // Nothing listens on port 1.
    let s = GitSource::new(GitConfig {
        url: "https://user:s3cr3t-token@127.0.0.1:1/x.git".into(),
        branch: None,
        path: String::new(),
        cache_dir: tmp.path().to_path_buf(),
        auth: Auth::Token {
            token: Secret::new("an0ther-s3cret"),
            file: None,
        },
        allow_insecure: false,
        helper: Some(common::SLUICE.into()),
        ..GitConfig::default()
    })
    .unwrap();
    let e = rt().block_on(s.poll()).unwrap_err();
    let text = format!("{e} {e:?} {}", s.describe());
    assert!(
        !text.contains("s3cr3t-token") && !text.contains("an0ther-s3cret"),
        "{text}"
    );
    assert!(text.contains("***@127.0.0.1"), "{text}");
}

#[test]
fn an_html_error_page_is_a_clear_error_not_a_panic() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        listener.set_nonblocking(false).unwrap();
        for stream in listener.incoming().take(4) {
            let Ok(mut s) = stream else { continue };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let body = "<html><body><h1>502 Bad Gateway</h1></body></html>";
            let _ = write!(s, "HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
        }
    });
    let tmp = tempfile::tempdir().unwrap();
    let s = source(
        &format!("http://127.0.0.1:{port}/repo.git"),
        tmp.path(),
        "",
        true,
    )
    .unwrap();
    let e = rt().block_on(s.poll()).unwrap_err();
    assert!(matches!(e, SourceError::ListRefs { .. }), "{e}");
    drop(server);
}

/// The whole agent on a `git daemon` remote: down → status shows the error
/// and the live state stays; back up → the next commit rolls out.
#[test]
fn the_agent_rides_out_a_remote_outage() {
    let shop = Shop::new(&["1.0.0"; 3]);
    let served = shop.tmp.path();
    let mut daemon = GitDaemon::start(served);
    let url = daemon.url("repo");
    let port = common::free_port();
    let log = served.join("agent.log");
    let mut agent = std::process::Command::new(common::SLUICE)
        .args([
            "run",
            "--repo",
            &url,
            "--allow-insecure",
            "--interval",
            "1s",
            "--backoff-max",
            "1s",
        ])
        .args([
            "--state-dir",
            &shop.state().display().to_string(),
            "--file-root",
            &shop.file_root().display().to_string(),
        ])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let _guard = KillOnDrop(&mut agent);
    shop.wait_version("web", "1.0.0", Duration::from_secs(60));
    let pids = shop.service_pids();
    daemon.stop();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, body) = common::http_get(port, "/status").unwrap();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        if v["source"]["lastError"]
            .as_str()
            .is_some_and(|e| e.contains("listing refs"))
        {
            break;
        }
        assert!(Instant::now() < deadline, "no source error in status: {v}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        shop.service_pids(),
        pids,
        "live state changed while the remote was down"
    );
    shop.set_versions(&["1.0.0", "1.0.0", "1.2.0"]);
    shop.commit("web 1.2.0");
    daemon.restart();
    shop.wait_version("web", "1.2.0", Duration::from_secs(30));

    // 3 a.m., git hosting down, the agent running: a revert by hand works
    // from the local copy.
    daemon.stop();
    let first = common::git(&shop.repo(), &["rev-list", "--max-parents=0", "HEAD"]);
    let mut cmd = std::process::Command::new(common::SLUICE);
    cmd.args(["revert", "--repo", &url, "--allow-insecure", "--to", &first])
        .args([
            "--state-dir",
            &shop.state().display().to_string(),
            "--file-root",
            &shop.file_root().display().to_string(),
        ]);
    let out = common::run_with_timeout(cmd, Duration::from_secs(60));
    assert_eq!(out.code, 0, "{}", out.all());
    assert_eq!(shop.get_json("web", "/")["version"], "1.0.0");
    // The running loop does not roll the reverted commit out again.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(shop.get_json("web", "/")["version"], "1.0.0");
}

struct KillOnDrop<'a>(&'a mut std::process::Child);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_dns_failure_is_a_clear_transient_error() {
    let tmp = tempfile::tempdir().unwrap();
    // `.invalid` never resolves (RFC 2606).
    let s = source(
        "https://git.sluice-test.invalid/x.git",
        tmp.path(),
        "",
        false,
    )
    .unwrap();
    let started = Instant::now();
    let e = rt().block_on(s.poll()).unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    assert!(
        matches!(e, SourceError::ListRefs { .. }) && e.is_transient(),
        "{e}"
    );
    assert!(e.to_string().contains("git.sluice-test.invalid"), "{e}");
}

/// The mirror stays small over many fetches: its first fetch is shallow,
/// packs are consolidated past a count, and pins of applied commits beyond
/// the newest are dropped.
#[test]
fn the_mirror_is_shallow_repacked_and_pruned() {
    let (tmp, repo) = repo_with(&[("app/a.yaml", "v0")]);
    for i in 1..5 {
        commit(&repo, "app/a.yaml", &format!("v{i}"), &format!("c{i}"));
    }
    let daemon = GitDaemon::start(&tmp.path().join("served"));
    let rt = rt();
    let cache = tmp.path().join("cache");
    let s = source(&daemon.url("repo"), &cache, "app", true).unwrap();
    rt.block_on(s.poll()).unwrap();
    let mirror = cache.join("mirror.git");
    assert!(
        mirror.join("shallow").exists(),
        "the first fetch is shallow"
    );
    let count = String::from_utf8(
        std::process::Command::new("git")
            .arg("-C")
            .arg(&mirror)
            .args(["rev-list", "--count", "refs/sluice/remote/main"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert_eq!(count.trim(), "1", "one commit of five fetched");
    let packs = || {
        std::fs::read_dir(mirror.join("objects/pack"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".pack")
            })
            .count()
    };
    for i in 0..40 {
        commit(&repo, "app/a.yaml", &format!("w{i}"), &format!("w{i}"));
        let rev = rt.block_on(s.poll()).unwrap();
        rt.block_on(s.keep(&rev.commit)).unwrap();
        assert!(packs() <= sluice_git::MAX_PACKS + 1, "{} packs", packs());
    }
    let keeps = String::from_utf8(
        std::process::Command::new("git")
            .arg("-C")
            .arg(&mirror)
            .args(["for-each-ref", "refs/sluice/keep/"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert_eq!(keeps.lines().count(), sluice_git::KEEP_REFS, "{keeps}");
    assert_eq!(s.fetch_count(), 41);
}
