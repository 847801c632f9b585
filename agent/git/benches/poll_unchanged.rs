//! Polling an unchanged remote: sluice's poll (ls-remote, no fetch) against
//! `git fetch` of the same remote, both over `git daemon` on 127.0.0.1, in
//! the same run. The repository has 1,000 commits touching 5,000 files.
//!
//! `cargo bench -p sluice-git --bench poll_unchanged`. Prints figures only.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sluice_core::source::Source;
use sluice_git::{Auth, GitConfig, GitSource};

const COMMITS: usize = 1000;
const FILES: usize = 5000;
const POLLS: usize = 50;

fn git(dir: &Path, args: &[&str]) {
    let ok = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", dir)
        .status()
        .unwrap()
        .success();
    assert!(ok, "git {args:?}");
}

/// 1,000 commits, each touching 5 of the 5,000 files, via fast-import.
fn make_repo(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    git(dir, &["init", "-q", "--bare", "-b", "main"]);
    let mut fi = Command::new("git")
        .args(["fast-import", "--quiet"])
        .current_dir(dir)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let mut w = std::io::BufWriter::new(fi.stdin.take().unwrap());
    for c in 0..COMMITS {
        writeln!(
            w,
            "commit refs/heads/main\ncommitter Bench <b@example.com> {} +0000\ndata 8\ncommit{:02}",
            1_700_000_000 + c,
            c % 100
        )
        .unwrap();
        let files: Vec<usize> = if c == 0 {
            (0..FILES).collect()
        } else {
            (0..5).map(|k| (c * 5 + k) % FILES).collect()
        };
        for f in files {
            let content = format!("service: s{}\nfile: {f}\nrevision: {c}\n", f % 50);
            writeln!(
                w,
                "M 100644 inline svc-{}/f{f}.yaml\ndata {}\n{content}",
                f % 50,
                content.len()
            )
            .unwrap();
        }
    }
    drop(w);
    assert!(fi.wait().unwrap().success());
}

fn stats(mut v: Vec<Duration>) -> (f64, f64, f64) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mean = v.iter().map(|d| ms(*d)).sum::<f64>() / v.len() as f64;
    (
        mean,
        ms(v[v.len() / 2]),
        ms(v[(v.len() * 95 / 100).min(v.len() - 1)]),
    )
}

fn main() {
    let tmp = tempfile::tempdir().unwrap();
    let served = tmp.path().join("served");
    let t = Instant::now();
    make_repo(&served.join("big.git"));
    let built = t.elapsed();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // Its own process group: `git` forks `git-daemon`; both must go at the end.
    let mut daemon = Command::new("git")
        .process_group(0)
        .args([
            "daemon",
            "--reuseaddr",
            "--export-all",
            "--listen=127.0.0.1",
        ])
        .arg(format!("--port={port}"))
        .arg(format!("--base-path={}", served.display()))
        .arg(&served)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let url = format!("git://127.0.0.1:{port}/big.git");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    let source = GitSource::new(GitConfig {
        url: url.clone(),
        branch: None,
        path: String::new(),
        cache_dir: tmp.path().join("cache"),
        auth: Auth::None,
        allow_insecure: true,
    })
    .unwrap();
    let t = Instant::now();
    rt.block_on(source.poll()).unwrap();
    let first = t.elapsed();
    let fetches = source.fetch_count();
    let mut ours = Vec::new();
    for _ in 0..POLLS {
        let t = Instant::now();
        rt.block_on(source.poll()).unwrap();
        ours.push(t.elapsed());
    }
    assert_eq!(
        source.fetch_count(),
        fetches,
        "an unchanged remote was fetched"
    );

    let clone = tmp.path().join("clone");
    let t = Instant::now();
    let ok = Command::new("git")
        .args(["clone", "-q", "--bare", &url])
        .arg(&clone)
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let clone_time = t.elapsed();
    let mut theirs = Vec::new();
    for _ in 0..POLLS {
        let t = Instant::now();
        let ok = Command::new("git")
            .args(["fetch", "-q", "origin"])
            .current_dir(&clone)
            .status()
            .unwrap()
            .success();
        assert!(ok);
        theirs.push(t.elapsed());
    }
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", daemon.id())])
        .status();
    let _ = daemon.wait();

    let (m1, p501, p951) = stats(ours);
    let (m2, p502, p952) = stats(theirs);
    println!("poll of an unchanged remote: {COMMITS} commits, {FILES} files, git daemon on 127.0.0.1 ({POLLS} polls each)");
    println!("  repository built in {:.1}s; first sluice poll (full fetch) {:.0} ms; git clone --bare {:.0} ms", built.as_secs_f64(), first.as_secs_f64() * 1000.0, clone_time.as_secs_f64() * 1000.0);
    println!(
        "  {:<34} {:>9} {:>9} {:>9}",
        "", "mean ms", "p50 ms", "p95 ms"
    );
    println!(
        "  {:<34} {m1:>9.2} {p501:>9.2} {p951:>9.2}",
        "sluice poll (ls-remote, no fetch)"
    );
    println!(
        "  {:<34} {m2:>9.2} {p502:>9.2} {p952:>9.2}",
        "git fetch (unchanged)"
    );
}
