//! The git source beside git itself, on a GitHub-shaped repository: 10,000
//! commits on the branch and 20,000 refs (most of them `refs/pull/*`),
//! served by `git http-backend` behind nginx (TLS, basic auth) on
//! 127.0.0.1, in the same run:
//!
//! - first poll (sluice, fresh mirror) beside `git clone --depth 1`: time,
//!   peak RSS of the processes, disk;
//! - unchanged poll beside `git fetch origin main` in that clone: time and
//!   bytes on the wire (nginx's `$request_length` + `$bytes_sent`).
//!
//! `cargo bench -p sluice-git --bench poll_unchanged`. Installs nginx-light
//! and fcgiwrap with apt-get when missing (as root). Prints figures only.

#[path = "../../../tests/common/ports.rs"]
mod ports;
#[path = "../../../tests/common/servers.rs"]
mod servers;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use sluice_core::source::Source;
use sluice_git::{Auth, GitConfig, GitSource, Secret};

const COMMITS: usize = 10_000;
const PULLS: usize = 19_000;
const BRANCHES: usize = 999;
const POLLS: usize = 20;
const TOKEN: &str = "bench-token";

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// 10,000 commits, each touching a few of 2,000 files, then 19,000
/// refs/pull/*/head and 999 branches pointing along the history.
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
    let data = |w: &mut dyn Write, s: &str| write!(w, "data {}\n{s}\n", s.len()).unwrap();
    let file = |f: usize, c: usize| {
        format!("apiVersion: sluice.dev/v1\nkind: File\nmetadata:\n  name: f{f}\nspec:\n  path: f{f}.conf\n  content: \"{c}\"\n")
    };
    writeln!(
        w,
        "commit refs/heads/main\ncommitter Bench <b@example.com> 1700000000 +0000"
    )
    .unwrap();
    data(&mut w, "first");
    writeln!(w, "M 100644 inline sluice.yaml").unwrap();
    data(&mut w, "apiVersion: sluice.dev/v1\nkind: Topology\ntargets: [{name: local, type: host}]\nservices: {app: {path: app}}\n");
    for f in 0..2000 {
        writeln!(w, "M 100644 inline app/f{f}.yaml").unwrap();
        data(&mut w, &file(f, 0));
    }
    for c in 1..COMMITS {
        writeln!(
            w,
            "commit refs/heads/main\ncommitter Bench <b@example.com> {} +0000",
            1_700_000_000 + c
        )
        .unwrap();
        data(&mut w, &format!("change {c}"));
        for k in 0..3 {
            let f = (c * 3 + k) % 2000;
            writeln!(w, "M 100644 inline app/f{f}.yaml").unwrap();
            data(&mut w, &file(f, c));
        }
    }
    drop(w);
    assert!(fi.wait().unwrap().success());
    let revs = git(dir, &["rev-list", "main"]);
    let revs: Vec<&str> = revs.lines().collect();
    let mut up = Command::new("git")
        .args(["update-ref", "--stdin"])
        .current_dir(dir)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let mut w = std::io::BufWriter::new(up.stdin.take().unwrap());
    for p in 0..PULLS {
        writeln!(w, "create refs/pull/{p}/head {}", revs[p % revs.len()]).unwrap();
    }
    for b in 0..BRANCHES {
        writeln!(
            w,
            "create refs/heads/feature-{b} {}",
            revs[(b * 7) % revs.len()]
        )
        .unwrap();
    }
    drop(w);
    assert!(up.wait().unwrap().success());
    git(dir, &["gc", "-q", "--aggressive"]);
    git(
        dir,
        &["config", "uploadpack.allowReachableSHA1InWant", "true"],
    );
}

/// Peak RSS of the largest child process waited for so far, in MiB.
fn children_peak_mib() -> f64 {
    nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)
        .map(|u| u.max_rss() as f64 / 1024.0)
        .unwrap_or(0.0)
}

fn own_peak_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|n| n.parse::<f64>().ok())
            })
        })
        .unwrap_or(0.0)
        / 1024.0
}

fn disk_mib(dir: &Path) -> f64 {
    let out = Command::new("du").arg("-sk").arg(dir).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// Bytes both ways of the log lines after `from`.
fn bytes(http: &servers::GitHttp, from: usize) -> (usize, u64) {
    let lines = http.log(false);
    let total = lines[from..]
        .iter()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let req: u64 = it.next()?.parse().ok()?;
            let sent: u64 = it.next()?.parse().ok()?;
            Some(req + sent)
        })
        .sum();
    (lines.len(), total)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn ensure_servers() {
    let missing: Vec<&str> = [
        ("nginx-light", "/usr/sbin/nginx"),
        ("fcgiwrap", "/usr/sbin/fcgiwrap"),
    ]
    .iter()
    .filter(|(_, p)| !Path::new(p).exists())
    .map(|(n, _)| *n)
    .collect();
    if !missing.is_empty() {
        println!("installing {missing:?}");
        let ok = Command::new("sh")
            .args(["-c", &format!("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends {}", missing.join(" "))])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(
            ok,
            "could not install {missing:?} (run as root, or install them)"
        );
    }
}

/// One measured step in a process of its own, so that its peak RSS (and
/// its children's) is its own: `--child clone <url> <dir> <ca> <askpass>`
/// or `--child poll <url> <cache> <ca> <token file> <sluice>`. Prints
/// `seconds peak-MiB`.
fn child(args: &[String]) {
    let t = Instant::now();
    match args[0].as_str() {
        "clone" => {
            let ok = Command::new("git")
                .args([
                    "clone", "-q", "--depth", "1", "--branch", "main", &args[1], &args[2],
                ])
                .env("GIT_SSL_CAINFO", &args[3])
                .env("GIT_ASKPASS", &args[4])
                .env("GIT_CONFIG_NOSYSTEM", "1")
                .env("GIT_CONFIG_GLOBAL", "/dev/null")
                .env("GIT_TERMINAL_PROMPT", "0")
                .status()
                .unwrap()
                .success();
            assert!(ok);
        }
        _ => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let source = GitSource::new(GitConfig {
                url: args[1].clone(),
                branch: Some("main".into()),
                cache_dir: args[2].clone().into(),
                auth: Auth::Token {
                    token: Secret::new(TOKEN),
                    file: Some(args[4].clone().into()),
                },
                ca_file: Some(args[3].clone().into()),
                helper: Some(args[5].clone().into()),
                ..GitConfig::default()
            })
            .unwrap();
            rt.block_on(source.poll()).unwrap();
        }
    }
    // git clone is all git; a poll is this process (its git2 reads) and git.
    let peak = if args[0] == "clone" {
        children_peak_mib()
    } else {
        children_peak_mib().max(own_peak_mib())
    };
    eprintln!(
        "own {:.1} MiB, children {:.1} MiB",
        own_peak_mib(),
        children_peak_mib()
    );
    println!("{} {peak}", t.elapsed().as_secs_f64());
}

fn measured(args: &[&str]) -> (f64, f64) {
    let out = Command::new(std::env::current_exe().unwrap())
        .arg("--child")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "  ({} {})",
        args[0],
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let s = String::from_utf8_lossy(&out.stdout);
    let mut it = s.split_whitespace().map(|n| n.parse::<f64>().unwrap());
    (it.next().unwrap(), it.next().unwrap())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--child") {
        child(&args[i + 1..]);
        return;
    }
    ensure_servers();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("served");
    let t = Instant::now();
    make_repo(&root.join("repo.git"));
    println!(
        "repository: {COMMITS} commits on main, {} refs (generated in {:.1} s)",
        PULLS + BRANCHES + 1,
        t.elapsed().as_secs_f64()
    );
    let http = servers::GitHttp::start_with(
        &tmp.path().join("nginx"),
        &root,
        "x-access-token",
        TOKEN,
        "$request_length $bytes_sent $request_uri",
    );
    let url = http.url("repo.git");
    let sluice =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/release/sluice");
    if !sluice.exists() {
        let ok = Command::new("cargo")
            .args(["build", "--release", "-p", "sluice"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "building the sluice binary (the credential helper)");
    }
    let token_file = tmp.path().join("token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    // git clone --depth 1, as a person would.
    let clone = tmp.path().join("clone");
    let askpass = tmp.path().join("askpass.sh");
    std::fs::write(&askpass, format!("#!/bin/sh\necho {TOKEN}\n")).unwrap();
    Command::new("chmod")
        .arg("755")
        .arg(&askpass)
        .status()
        .unwrap();
    let git_env = |c: &mut Command| {
        c.env("GIT_SSL_CAINFO", &http.ca)
            .env("GIT_ASKPASS", &askpass)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_TERMINAL_PROMPT", "0");
    };
    let (l0, _) = bytes(&http, 0);
    let clone_url = format!("https://x-access-token@127.0.0.1:{}/repo.git", http.port);
    let (clone_s, clone_rss) = measured(&[
        "clone",
        &clone_url,
        &clone.display().to_string(),
        &http.ca.display().to_string(),
        &askpass.display().to_string(),
    ]);
    let (l1, clone_bytes) = bytes(&http, l0);

    // sluice's first poll on a fresh mirror.
    let cache = tmp.path().join("cache");
    let (first_s, first_rss) = measured(&[
        "poll",
        &url,
        &cache.display().to_string(),
        &http.ca.display().to_string(),
        &token_file.display().to_string(),
        &sluice.display().to_string(),
    ]);
    let (l2, first_bytes) = bytes(&http, l1);
    let source = GitSource::new(GitConfig {
        url: url.clone(),
        branch: Some("main".into()),
        cache_dir: cache.clone(),
        auth: Auth::Token {
            token: Secret::new(TOKEN),
            file: Some(token_file.clone()),
        },
        ca_file: Some(http.ca.clone()),
        helper: Some(sluice.clone()),
        ..GitConfig::default()
    })
    .unwrap();
    let rev = rt.block_on(source.poll()).unwrap();
    let snapshot = rt
        .block_on(source.snapshot(&rev.commit, &Default::default()))
        .unwrap();
    assert_eq!(snapshot.files.len(), 2001);

    // Unchanged polls, one after the other.
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    let (mut our_bytes, mut their_bytes) = (Vec::new(), Vec::new());
    let mut at = l2;
    for _ in 0..POLLS {
        let t = Instant::now();
        rt.block_on(source.poll()).unwrap();
        ours.push(t.elapsed().as_secs_f64() * 1000.0);
        let (n, b) = bytes(&http, at);
        our_bytes.push(b as f64);
        at = n;
        let t = Instant::now();
        let mut c = Command::new("git");
        c.current_dir(&clone)
            .args(["fetch", "-q", "origin", "main"]);
        git_env(&mut c);
        assert!(c.status().unwrap().success());
        theirs.push(t.elapsed().as_secs_f64() * 1000.0);
        let (n, b) = bytes(&http, at);
        their_bytes.push(b as f64);
        at = n;
    }
    assert_eq!(source.fetch_count(), 0, "an unchanged poll fetched");
    println!("first poll (fresh mirror) vs git clone --depth 1:");
    println!(
        "  sluice {first_s:.2} s, peak RSS {first_rss:.1} MiB (the largest of its processes), disk {:.1} MiB, {:.0} KB on the wire",
        disk_mib(&cache),
        first_bytes as f64 / 1000.0
    );
    println!(
        "  git    {clone_s:.2} s, peak RSS {clone_rss:.1} MiB, disk {:.1} MiB (with its work tree), {:.0} KB on the wire",
        disk_mib(&clone),
        clone_bytes as f64 / 1000.0
    );
    println!("unchanged poll vs git fetch origin main (median of {POLLS}):");
    println!(
        "  sluice {:.1} ms, {:.1} KB on the wire",
        median(ours.clone()),
        median(our_bytes.clone()) / 1000.0
    );
    println!(
        "  git    {:.1} ms, {:.1} KB on the wire",
        median(theirs.clone()),
        median(their_bytes.clone()) / 1000.0
    );
    println!(
        "  ratio  time {:.2}x, bytes {:.2}x",
        median(ours) / median(theirs),
        median(our_bytes) / median(their_bytes)
    );
}
