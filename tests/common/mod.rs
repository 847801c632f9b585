//! Shared parts of the integration tests: a shop repository made with the
//! real `git`, the real `sluice` binary, and process bookkeeping through
//! /proc so every test can count, time and clean up what it started.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const SLUICE: &str = env!("CARGO_BIN_EXE_sluice");

/// Runs `git` in `dir` with a clean, deterministic configuration.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", dir)
        .env("GIT_AUTHOR_NAME", "test")
        .env("GIT_AUTHOR_EMAIL", "test@example.com")
        .env("GIT_COMMITTER_NAME", "test")
        .env("GIT_COMMITTER_EMAIL", "test@example.com")
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[path = "ports.rs"]
pub mod ports;
pub use ports::free_port;

pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn all(&self) -> String {
        format!(
            "exit {}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// The three-service shop (catalog ← orders ← web) as a git repository,
/// each service the demo app behind a route on its own free port.
pub struct Shop {
    pub tmp: tempfile::TempDir,
    pub ports: BTreeMap<&'static str, u16>,
}

pub const SERVICES: [&str; 3] = ["catalog", "orders", "web"];

impl Shop {
    pub fn new(versions: &[&str; 3]) -> Shop {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ports: BTreeMap<&'static str, u16> =
            SERVICES.iter().map(|s| (*s, free_port())).collect();
        let shop = Shop { tmp, ports };
        std::fs::create_dir_all(shop.repo()).unwrap();
        git(&shop.repo(), &["init", "-q", "-b", "main"]);
        shop.write(
            "sluice.yaml",
            "apiVersion: sluice.dev/v1\nkind: Topology\ndefaults:\n  gateTimeout: 20s\ntargets:\n  - name: local\n    type: host\nservices:\n  catalog:\n    path: services/catalog\n  orders:\n    path: services/orders\n    dependsOn: [catalog]\n  web:\n    path: services/web\n    dependsOn: [orders]\n",
        );
        for (i, s) in SERVICES.iter().enumerate() {
            let upstream = match *s {
                "orders" => format!(
                    ", \"--upstream\", \"http://127.0.0.1:{}\"",
                    shop.ports["catalog"]
                ),
                "web" => format!(
                    ", \"--upstream\", \"http://127.0.0.1:{}\"",
                    shop.ports["orders"]
                ),
                _ => String::new(),
            };
            shop.write(
                &format!("services/{s}/{s}.yaml"),
                &format!(
                    "apiVersion: sluice.dev/v1\nkind: Process\nmetadata:\n  name: {s}\nspec:\n  command: {SLUICE}\n  args: [\"demo\", \"--name\", \"{s}\"{upstream}]\n  version: \"{}\"\n  env:\n    SERVICE_VERSION: \"${{VERSION}}\"\n  readiness:\n    http: /healthz\n    timeout: 5s\n  stopTimeout: 3s\n---\napiVersion: sluice.dev/v1\nkind: Route\nmetadata:\n  name: {s}\nspec:\n  listen: 127.0.0.1:{}\n  process: {s}\n",
                    versions[i], shop.ports[s]
                ),
            );
        }
        shop.commit("shop");
        shop
    }

    pub fn repo(&self) -> PathBuf {
        self.tmp.path().join("repo")
    }

    pub fn state(&self) -> PathBuf {
        self.tmp.path().join("state")
    }

    pub fn file_root(&self) -> PathBuf {
        self.tmp.path().join("files")
    }

    pub fn write(&self, rel: &str, content: &str) {
        let p = self.repo().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }

    pub fn edit(&self, rel: &str, from: &str, to: &str) {
        let p = self.repo().join(rel);
        let s = std::fs::read_to_string(&p).unwrap();
        assert!(s.contains(from), "{rel} has no {from:?}");
        std::fs::write(p, s.replacen(from, to, 1)).unwrap();
    }

    pub fn remove(&self, rel: &str) {
        std::fs::remove_file(self.repo().join(rel)).unwrap();
    }

    pub fn symlink(&self, rel: &str, target: &str) {
        std::os::unix::fs::symlink(target, self.repo().join(rel)).unwrap();
    }

    pub fn set_versions(&self, versions: &[&str; 3]) {
        for (s, v) in SERVICES.iter().zip(versions) {
            let rel = format!("services/{s}/{s}.yaml");
            let p = self.repo().join(&rel);
            let text = std::fs::read_to_string(&p).unwrap();
            let out: Vec<String> = text
                .lines()
                .map(|l| {
                    if l.starts_with("  version:") {
                        format!("  version: \"{v}\"")
                    } else {
                        l.to_string()
                    }
                })
                .collect();
            std::fs::write(p, out.join("\n") + "\n").unwrap();
        }
    }

    pub fn file_manifest(&self, name: &str, path: &str, content: &str) -> String {
        format!("apiVersion: sluice.dev/v1\nkind: File\nmetadata:\n  name: {name}\nspec:\n  path: {path}\n  content: {content:?}\n")
    }

    /// Commits everything and returns the new head.
    pub fn commit(&self, msg: &str) -> String {
        git(&self.repo(), &["add", "-A"]);
        git(&self.repo(), &["commit", "-q", "--allow-empty", "-m", msg]);
        self.head()
    }

    pub fn head(&self) -> String {
        git(&self.repo(), &["rev-parse", "HEAD"])
    }

    /// Back to `commit` as a new commit on top (history moves forward, as
    /// in a real revert pull request).
    pub fn reset_to(&self, commit: &str) {
        git(&self.repo(), &["rm", "-rq", "--ignore-unmatch", "."]);
        git(&self.repo(), &["checkout", commit, "--", "."]);
        git(&self.repo(), &["clean", "-fdq"]);
        self.commit(&format!("back to {}", &commit[..8]));
    }

    /// The flags every command gets.
    pub fn flags(&self) -> Vec<String> {
        vec![
            "--repo".into(),
            self.repo().display().to_string(),
            "--state-dir".into(),
            self.state().display().to_string(),
            "--file-root".into(),
            self.file_root().display().to_string(),
        ]
    }

    /// Runs one `sluice` command to completion (at most two minutes).
    pub fn sluice(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(SLUICE);
        // Flags go after the (sub)command words.
        let words = if args[0] == "policy" { 2 } else { 1 };
        cmd.args(&args[..words])
            .args(self.flags())
            .args(&args[words..]);
        run_with_timeout(cmd, Duration::from_secs(120))
    }

    pub fn get(&self, service: &str, path: &str) -> Result<(u16, String), String> {
        http_get(self.ports[service], path)
    }

    pub fn get_json(&self, service: &str, path: &str) -> serde_json::Value {
        let (code, body) = self
            .get(service, path)
            .unwrap_or_else(|e| panic!("GET {service}{path}: {e}"));
        assert_eq!(code, 200, "GET {service}{path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {service}{path}: {e}: {body}"))
    }

    pub fn wait_version(&self, service: &str, version: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            match self.get(service, "/") {
                Ok((200, body))
                    if serde_json::from_str::<serde_json::Value>(&body)
                        .is_ok_and(|v| v["version"] == version) =>
                {
                    return
                }
                Ok((code, body)) => last = format!("{code} {body}"),
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "{service} never served {version}; last answer: {last}\nagent state: {}",
            std::fs::read_to_string(self.state().join("state.json")).unwrap_or_default()
        );
    }

    /// The demo processes of this shop, by service name; panics on a
    /// duplicate (two processes of one service).
    pub fn service_pids(&self) -> BTreeMap<String, u32> {
        let mut out = BTreeMap::new();
        for p in procs() {
            if !p.cwd.starts_with(self.tmp.path()) || !p.args.iter().any(|a| a == "demo") {
                continue;
            }
            let Some(i) = p.args.iter().position(|a| a == "--name") else {
                continue;
            };
            let name = p.args[i + 1].clone();
            if let Some(other) = out.insert(name.clone(), p.pid) {
                panic!("two processes of {name}: {other} and {}", p.pid);
            }
        }
        out
    }

    /// Kills a service by hand, supervisor and all (its process group), as
    /// an operator would; waits until it is gone.
    pub fn kill_service(&self, name: &str) {
        let pid = self.service_pids()[name];
        let group = procs()
            .into_iter()
            .find(|p| p.pid == pid)
            .map(|p| p.pgid)
            .unwrap_or(pid);
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{group}")])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.service_pids().contains_key(name) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn service_start_times(&self) -> BTreeMap<String, u64> {
        self.service_pids()
            .into_iter()
            .map(|(n, pid)| (n, start_time(pid)))
            .collect()
    }

    pub fn router_pids(&self) -> Vec<u32> {
        let state = self.state().display().to_string();
        procs()
            .into_iter()
            .filter(|p| {
                p.args.iter().any(|a| a == "router") && p.args.iter().any(|a| a.starts_with(&state))
            })
            .map(|p| p.pid)
            .collect()
    }
}

impl Drop for Shop {
    /// Kills every process group this shop started, even when a test failed.
    fn drop(&mut self) {
        let root = self.tmp.path().display().to_string();
        let me = std::process::id();
        let my_group = stat_field(me, 5).unwrap_or(0) as u32;
        for p in procs() {
            let mine =
                p.cwd.starts_with(self.tmp.path()) || p.args.iter().any(|a| a.contains(&root));
            if !mine || p.pid == me {
                continue;
            }
            // Supervised instances lead their own groups: kill those whole.
            // Helpers the test spawned itself share our group: only them.
            if p.pgid != my_group && p.pgid > 1 {
                let _ = Command::new("kill")
                    .args(["-KILL", "--", &format!("-{}", p.pgid)])
                    .status();
            }
            let _ = Command::new("kill")
                .args(["-KILL", &p.pid.to_string()])
                .status();
        }
    }
}

/// `sluice run` in the background.
pub struct Agent {
    child: Child,
    pub port: u16,
    head: String,
    log: PathBuf,
}

impl Agent {
    pub fn start(shop: &Shop, interval: &str) -> Agent {
        Agent::start_with(shop, &["--interval", interval], &[])
    }

    /// `sluice run` with extra flags and environment.
    pub fn start_with(shop: &Shop, args: &[&str], env: &[(&str, &str)]) -> Agent {
        let port = free_port();
        let log = shop.tmp.path().join(format!("agent-{port}.log"));
        let child = Command::new(SLUICE)
            .arg("run")
            .args(shop.flags())
            .args(args)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("sluice run");
        Agent {
            child,
            port,
            head: shop.head(),
            log,
        }
    }

    pub fn status(&self) -> serde_json::Value {
        let (code, body) = http_get(self.port, "/status")
            .unwrap_or_else(|e| panic!("GET /status: {e}\n{}", self.log()));
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    /// The status, or None while the agent is not answering yet.
    pub fn try_status(&self) -> Option<serde_json::Value> {
        match http_get(self.port, "/status") {
            Ok((200, body)) => serde_json::from_str(&body).ok(),
            _ => None,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the agent has applied the head it was started with and
    /// nothing is in progress.
    pub fn wait_idle(&self) {
        self.wait_idle_on(&self.head.clone());
    }

    /// Waits until the agent has applied `head` and nothing is in progress.
    pub fn wait_idle_on(&self, head: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = String::new();
        while Instant::now() < deadline {
            match http_get(self.port, "/status") {
                Ok((200, body)) => {
                    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                    if v["inProgress"].is_null()
                        && v["targets"]["local"]["applied"]["commit"] == head
                    {
                        return;
                    }
                    last = body;
                }
                other => last = format!("{other:?}"),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "agent never became idle on {head}\nlast status: {last}\n{}",
            self.log()
        );
    }

    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP/1.1 GET on 127.0.0.1 with a short timeout (one client per
/// thread: building one per request costs more than the request).
pub fn http_get(port: u16, path: &str) -> Result<(u16, String), String> {
    thread_local! {
        static CLIENT: reqwest::blocking::Client = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(5))
            .no_proxy()
            .build()
            .expect("http client");
    }
    CLIENT.with(|client| {
        let resp = client
            .get(format!("http://127.0.0.1:{port}{path}"))
            .send()
            .map_err(|e| e.to_string())?;
        let code = resp.status().as_u16();
        Ok((code, resp.text().map_err(|e| e.to_string())?))
    })
}

/// A POST without a body on 127.0.0.1: the status code.
pub fn http_post(port: u16, path: &str) -> Result<u16, String> {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(5))
        .no_proxy()
        .build()
        .map_err(|e| e.to_string())?
        .post(format!("http://127.0.0.1:{port}{path}"))
        .send()
        .map(|r| r.status().as_u16())
        .map_err(|e| e.to_string())
}

pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let (o, e) = (dir.path().join("out"), dir.path().join("err"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&o).unwrap())
        .stderr(std::fs::File::create(&e).unwrap())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + timeout;
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code().unwrap_or(-1);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break -2;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        code,
        stdout: std::fs::read_to_string(o).unwrap_or_default(),
        stderr: std::fs::read_to_string(e).unwrap_or_default(),
    }
}

pub struct Proc {
    pub pid: u32,
    pub pgid: u32,
    pub args: Vec<String>,
    pub cwd: PathBuf,
}

/// Every process this user can see.
pub fn procs() -> Vec<Proc> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).to_string())
            .collect();
        let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap_or_default();
        let pgid = stat_field(pid, 5).unwrap_or(0) as u32;
        out.push(Proc {
            pid,
            pgid,
            args,
            cwd,
        });
    }
    out
}

/// Field `n` (1-based, as in proc(5)) of /proc/<pid>/stat.
fn stat_field(pid: u32, n: usize) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    after.split_whitespace().nth(n - 3)?.parse().ok()
}

/// Start time in clock ticks since boot.
pub fn start_time(pid: u32) -> u64 {
    stat_field(pid, 22).unwrap_or(0)
}

/// `git daemon` serving the repositories under `base` on 127.0.0.1.
pub struct GitDaemon {
    child: Option<Child>,
    pub port: u16,
    base: PathBuf,
}

impl GitDaemon {
    pub fn start(base: &Path) -> GitDaemon {
        let mut d = GitDaemon {
            child: None,
            port: free_port(),
            base: base.to_path_buf(),
        };
        d.restart();
        d
    }

    pub fn url(&self, repo: &str) -> String {
        format!("git://127.0.0.1:{}/{repo}", self.port)
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        // Its own process group: `git` forks `git-daemon`, which forks per
        // connection; stopping kills them all.
        let child = Command::new("git")
            .process_group(0)
            .args([
                "daemon",
                "--reuseaddr",
                "--export-all",
                "--enable=receive-pack",
                "--listen=127.0.0.1",
            ])
            .arg(format!("--port={}", self.port))
            .arg(format!("--base-path={}", self.base.display()))
            .arg(&self.base)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("git daemon");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "git daemon did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", c.id())])
                .status();
            let _ = c.wait();
        }
        // Its forked connection handlers go with the listener.
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for GitDaemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// "kind:outcome" of every history entry of a status document, oldest first.
pub fn history_kinds(status: &serde_json::Value) -> Vec<String> {
    status["history"]
        .as_array()
        .map(|h| {
            h.iter()
                .map(|e| {
                    format!(
                        "{}:{}",
                        e["kind"].as_str().unwrap_or("?"),
                        e["outcome"].as_str().unwrap_or("?")
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A real Prometheus server (Debian package `prometheus`, installed by the
/// test command) scrapes one target's /metrics every second.
pub struct Prometheus {
    child: std::process::Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Scrapes `target` (host:port, path /metrics) every second.
    pub fn start(router_admin: &str) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: sluice-router\n    static_configs:\n      - targets: [\"{router_admin}\"]\n"
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        let child = std::process::Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("prometheus (tests/run installs the Debian package)");
        let p = Prometheus {
            child,
            port,
            _dir: dir,
        };
        // Ready, and the router scraped at least once.
        let deadline = Instant::now() + Duration::from_secs(60);
        let q = format!("http://127.0.0.1:{port}/api/v1/query?query=up");
        loop {
            let up = reqwest::blocking::get(&q)
                .ok()
                .and_then(|r| r.json::<serde_json::Value>().ok())
                .is_some_and(|v| v["data"]["result"][0]["value"][1] == "1");
            if up {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus never scraped {router_admin}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
        p
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
