//! The git source against real servers on 127.0.0.1, started here: nginx
//! with `git http-backend` over TLS (a private CA) and basic auth, OpenSSH's
//! sshd with its own host key, a TCP server that accepts and never answers,
//! and the real `sluice` binary. What a new user hits in the first week:
//! a stalled server, a redirect to another host, a private CA, a refused
//! token, known_hosts and ssh config files, encrypted keys, and tokens in
//! the environment of the processes sluice starts.

#[path = "common/mod.rs"]
mod common;
#[path = "common/servers.rs"]
mod servers;
use common::ports;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{git, run_with_timeout, Output, SLUICE};
use servers::{GitHttp, Sshd};

const TOKEN: &str = "tok-3f9a2c7e51";

/// A repository with one File service, and a folder that serves it.
fn repository(tmp: &Path) -> (PathBuf, PathBuf) {
    let repo = tmp.join("work");
    std::fs::create_dir_all(repo.join("app")).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    std::fs::write(
        repo.join("sluice.yaml"),
        "apiVersion: sluice.dev/v1\nkind: Topology\ntargets:\n  - name: local\n    type: host\nservices:\n  app:\n    path: app\n",
    )
    .unwrap();
    std::fs::write(
        repo.join("app/f.yaml"),
        "apiVersion: sluice.dev/v1\nkind: File\nmetadata:\n  name: f\nspec:\n  path: f.conf\n  content: \"one\\n\"\n",
    )
    .unwrap();
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-qm", "first"]);
    let root = tmp.join("served");
    std::fs::create_dir_all(&root).unwrap();
    servers::serve(&repo, &root, "repo.git");
    (repo, root)
}

/// `sluice <args>` with a state dir of its own and a clean HOME.
fn sluice(tmp: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(SLUICE);
    cmd.args(args)
        .arg("--state-dir")
        .arg(tmp.join(format!("state-{}", args.len())))
        .arg("--file-root")
        .arg(tmp.join("files"))
        .env("HOME", tmp)
        .env_remove("SLUICE_GIT_TOKEN")
        .envs(env.iter().copied());
    run_with_timeout(cmd, Duration::from_secs(120))
}

/// The requests of one server's log that carried an Authorization header.
fn authorized(lines: &[String]) -> usize {
    lines.iter().filter(|l| !l.ends_with("\"-\"")).count()
}

#[test]
fn https_with_a_private_ca_basic_auth_and_the_token_kept_to_its_origin() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, root) = repository(tmp.path());
    let http = GitHttp::start(&tmp.path().join("nginx"), &root, "x-access-token", TOKEN);
    let token_file = tmp.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let ca = http.ca.display().to_string();
    let url = http.url("repo.git");
    let tf = token_file.display().to_string();

    // The private CA through --ca-file, the token from a file: it plans.
    let ok = sluice(
        tmp.path(),
        &[
            "plan",
            "--repo",
            &url,
            "--ca-file",
            &ca,
            "--git-token-file",
            &tf,
        ],
        &[],
    );
    assert_eq!(ok.code, 0, "{}", ok.all());
    assert!(ok.stdout.contains("1 to create"), "{}", ok.stdout);
    // ...and from an environment variable of the user's choosing.
    let ok = sluice(
        tmp.path(),
        &[
            "plan",
            "--repo",
            &url,
            "--ca-file",
            &ca,
            "--git-token-env",
            "GITHUB_TOKEN",
        ],
        &[("GITHUB_TOKEN", TOKEN)],
    );
    assert_eq!(ok.code, 0, "{}", ok.all());

    // Without the CA: refused, saying why.
    let untrusted = sluice(
        tmp.path(),
        &["plan", "--repo", &url, "--git-token-file", &tf],
        &[],
    );
    assert_eq!(untrusted.code, 2, "{}", untrusted.all());
    assert!(
        untrusted.stderr.contains("not a trusted authority")
            && untrusted.stderr.contains("--ca-file"),
        "{}",
        untrusted.stderr
    );

    // A redirect to another port (another origin): the credential stays.
    let before = http.log(true).len();
    let moved = http.url("moved/repo.git");
    let out = sluice(
        tmp.path(),
        &[
            "plan",
            "--repo",
            &moved,
            "--ca-file",
            &ca,
            "--git-token-file",
            &tf,
        ],
        &[],
    );
    assert_ne!(out.code, 0, "{}", out.all());
    let other = http.log(true);
    assert!(
        other.len() > before,
        "the redirect was not followed: {other:?}"
    );
    assert_eq!(
        authorized(&other[before..]),
        0,
        "credential sent after a redirect: {other:?}"
    );

    // A rejected token: one request carries it, then it is an error that
    // names the user, exit 2, no retry.
    let wrong = tmp.path().join("wrong");
    std::fs::write(&wrong, "not-the-token").unwrap();
    let before = http.log(false).len();
    let out = sluice(
        tmp.path(),
        &[
            "plan",
            "--repo",
            &url,
            "--ca-file",
            &ca,
            "--git-token-file",
            &wrong.display().to_string(),
        ],
        &[],
    );
    assert_eq!(out.code, 2, "{}", out.all());
    assert!(
        out.stderr
            .contains("authentication failed (user x-access-token)"),
        "{}",
        out.stderr
    );
    let lines = http.log(false);
    assert_eq!(authorized(&lines[before..]), 1, "{:?}", &lines[before..]);
    // Nothing printed the token, right or wrong.
    for o in [&ok, &untrusted, &out] {
        assert!(!o.all().contains(TOKEN) && !o.all().contains("not-the-token"));
    }
}

/// A TCP server that accepts every connection and never says a word.
fn silent_server() -> (u16, std::thread::JoinHandle<()>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let h = std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in l.incoming().take(200) {
            held.push(s);
        }
    });
    (port, h)
}

#[test]
fn a_server_that_never_answers_times_out_and_the_agent_keeps_answering() {
    let tmp = tempfile::tempdir().unwrap();
    let (port, _server) = silent_server();
    let url = format!("http://127.0.0.1:{port}/repo.git");
    let started = Instant::now();
    let out = sluice(
        tmp.path(),
        &[
            "plan",
            "--repo",
            &url,
            "--allow-insecure",
            "--git-connect-timeout",
            "2s",
        ],
        &[],
    );
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(out.stderr.contains("timed out"), "{}", out.stderr);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );

    // The agent: polls time out, back off, and say so in status, /readyz
    // and /metrics, while every endpoint answers at once.
    let listen = common::free_port();
    let mut agent = Command::new(SLUICE)
        .args([
            "run",
            "--repo",
            &url,
            "--allow-insecure",
            "--interval",
            "1s",
            "--backoff-max",
            "2s",
        ])
        .args([
            "--git-connect-timeout",
            "1s",
            "--listen",
            &format!("127.0.0.1:{listen}"),
        ])
        .arg("--state-dir")
        .arg(tmp.path().join("agent"))
        .env("HOME", tmp.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut seen = false;
    while Instant::now() < deadline {
        let t = Instant::now();
        if let Ok((200, _)) = common::http_get(listen, "/healthz") {
            assert!(
                t.elapsed() < Duration::from_secs(1),
                "healthz took {:?}",
                t.elapsed()
            );
        }
        if let Ok((code, body)) = common::http_get(listen, "/readyz") {
            if code == 503 && body.contains("source failing") && body.contains("timed out") {
                seen = true;
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let status = common::http_get(listen, "/status")
        .map(|(_, b)| b)
        .unwrap_or_default();
    let metrics = common::http_get(listen, "/metrics")
        .map(|(_, b)| b)
        .unwrap_or_default();
    let reconcile = post(listen, "/reconcile");
    let _ = agent.kill();
    let _ = agent.wait();
    assert!(
        seen,
        "readyz never reported the stalled source; status: {status}"
    );
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert!(
        v["source"]["lastError"]
            .as_str()
            .unwrap_or("")
            .contains("timed out"),
        "{v}"
    );
    assert!(
        v["source"]["consecutiveFailures"].as_u64().unwrap_or(0) >= 3,
        "{v}"
    );
    let errors = metrics
        .lines()
        .find(|l| l.starts_with("sluice_poll_errors_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(errors >= 3, "{metrics}");
    assert_eq!(reconcile, 202);
}

fn post(port: u16, path: &str) -> u16 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[test]
fn ssh_as_users_configure_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, root) = repository(tmp.path());
    let sshd = Sshd::start(&tmp.path().join("sshd"));
    let known = tmp.path().join("known_hosts");
    std::fs::write(&known, sshd.known_hosts_line(None)).unwrap();
    let kh = known.display().to_string();
    let key = sshd.key.display().to_string();
    let url = format!(
        "ssh://root@127.0.0.1:{}{}",
        sshd.port,
        root.join("repo.git").display()
    );

    let ok = sluice(
        tmp.path(),
        &[
            "plan",
            "--repo",
            &url,
            "--known-hosts",
            &kh,
            "--ssh-key",
            &key,
        ],
        &[],
    );
    assert_eq!(ok.code, 0, "{}", ok.all());

    // A host alias with its port, from an ssh config file, in scp form.
    let config = tmp.path().join("ssh_config");
    std::fs::write(
        &config,
        format!(
            "Host shop-git\n  HostName 127.0.0.1\n  Port {}\n  User root\n",
            sshd.port
        ),
    )
    .unwrap();
    let scp = format!("shop-git:{}", root.join("repo.git").display());
    let out = sluice(
        tmp.path(),
        &[
            "plan",
            "--repo",
            &scp,
            "--ssh-config",
            &config.display().to_string(),
            "--known-hosts",
            &kh,
            "--ssh-key",
            &key,
        ],
        &[],
    );
    assert_eq!(out.code, 0, "{}", out.all());

    // An unknown host key and a changed one say different things.
    let empty = tmp.path().join("empty_known_hosts");
    std::fs::write(&empty, "").unwrap();
    let out = sluice(
        tmp.path(),
        &[
            "plan",
            "--repo",
            &url,
            "--known-hosts",
            &empty.display().to_string(),
            "--ssh-key",
            &key,
        ],
        &[],
    );
    assert_eq!(out.code, 2, "{}", out.all());
    assert!(
        out.stderr.contains("is not in")
            && out.stderr.contains("empty_known_hosts")
            && out.stderr.contains("it offers ssh-ed25519 SHA256:"),
        "{}",
        out.stderr
    );
    let other_key = {
        let p = tmp.path().join("other_host_key");
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&p)
            .output()
            .unwrap();
        std::fs::read_to_string(p.with_extension("pub"))
            .unwrap()
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    };
    let changed = tmp.path().join("changed_known_hosts");
    std::fs::write(&changed, sshd.known_hosts_line(Some(&other_key))).unwrap();
    let out = sluice(
        tmp.path(),
        &[
            "plan",
            "--repo",
            &url,
            "--known-hosts",
            &changed.display().to_string(),
            "--ssh-key",
            &key,
        ],
        &[],
    );
    assert_eq!(out.code, 2, "{}", out.all());
    assert!(
        out.stderr.contains("CHANGED") && out.stderr.contains("SHA256:"),
        "{}",
        out.stderr
    );

    // An encrypted key: named as such without its passphrase, used with it.
    let enc = sshd.encrypted_key.display().to_string();
    let out = sluice(
        tmp.path(),
        &[
            "plan",
            "--repo",
            &url,
            "--known-hosts",
            &kh,
            "--ssh-key",
            &enc,
        ],
        &[],
    );
    assert_eq!(out.code, 2, "{}", out.all());
    assert!(out.stderr.contains("is encrypted"), "{}", out.stderr);
    let pass = tmp.path().join("passphrase");
    std::fs::write(&pass, format!("{}\n", servers::PASSPHRASE)).unwrap();
    let out = sluice(
        tmp.path(),
        &[
            "plan",
            "--repo",
            &url,
            "--known-hosts",
            &kh,
            "--ssh-key",
            &enc,
            "--ssh-key-passphrase-file",
            &pass.display().to_string(),
        ],
        &[],
    );
    assert_eq!(out.code, 0, "{}", out.all());

    // A missing key file is a configuration error, found before connecting.
    let out = sluice(
        tmp.path(),
        &[
            "plan",
            "--repo",
            &url,
            "--known-hosts",
            &kh,
            "--ssh-key",
            "/nonexistent/key",
        ],
        &[],
    );
    assert_eq!(out.code, 2, "{}", out.all());
    assert!(out.stderr.contains("/nonexistent/key"), "{}", out.stderr);
}

/// Every process sluice starts (git, its helpers, supervisors, services,
/// the router), and the ones still running after the agent exits, have no
/// credential in their environment. git's is seen through a wrapper first
/// on PATH that records it.
#[test]
fn no_credential_reaches_a_process_sluice_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let shop = common::Shop::new(&["1.0.0"; 3]);
    let root = tmp.path().join("served");
    std::fs::create_dir_all(&root).unwrap();
    servers::serve(&shop.repo(), &root, "shop.git");
    let http = GitHttp::start(&tmp.path().join("nginx"), &root, "x-access-token", TOKEN);
    let bin = tmp.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let real_git = String::from_utf8(
        Command::new("sh")
            .args(["-c", "command -v git"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let record = tmp.path().join("git-environ");
    std::fs::write(
        bin.join("git"),
        format!(
            "#!/bin/sh\nenv >> {}\necho --- >> {}\nexec {} \"$@\"\n",
            record.display(),
            record.display(),
            real_git.trim()
        ),
    )
    .unwrap();
    Command::new("chmod")
        .arg("755")
        .arg(bin.join("git"))
        .status()
        .unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = Command::new(SLUICE);
    cmd.arg("apply")
        .arg("--state-dir")
        .arg(shop.state())
        .arg("--file-root")
        .arg(shop.file_root())
        .args([
            "--repo",
            &http.url("shop.git"),
            "--ca-file",
            &http.ca.display().to_string(),
        ])
        .args(["--git-token-env", "GITHUB_TOKEN"])
        .env("PATH", &path)
        .env("GITHUB_TOKEN", TOKEN)
        .env("SLUICE_FORGE_TOKEN", "forge-6d1e0b")
        .env("SLUICE_GITHUB_WEBHOOK_SECRET", "hook-7a2c94");
    let out = run_with_timeout(cmd, Duration::from_secs(120));
    assert_eq!(out.code, 0, "{}", out.all());
    let secrets = [TOKEN, "forge-6d1e0b", "hook-7a2c94"];
    let recorded = std::fs::read_to_string(&record).unwrap();
    assert!(
        recorded.contains("GIT_TERMINAL_PROMPT=0"),
        "the wrapper never ran: {recorded}"
    );
    for s in secrets {
        assert!(!recorded.contains(s), "git's environment held {s}");
    }
    let me = std::process::id();
    let mut checked = 0;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        let environ = String::from_utf8_lossy(&environ);
        let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if cmdline.contains(SLUICE) || environ.contains("SERVICE_VERSION") {
            checked += 1;
        }
        for s in secrets {
            assert!(
                !environ.contains(s),
                "process {pid} ({}) has {s} in its environment",
                cmdline.replace('\0', " ")
            );
        }
    }
    assert!(
        checked >= 7,
        "only {checked} of the processes sluice started were found"
    );
}
