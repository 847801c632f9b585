//! A fleet of 20 hosts (network namespaces on this machine, each with its
//! own sshd) in 3 rings (1 host, 25%, the rest), the three-service example
//! rolled out by one agent over SSH. Prints:
//!
//! - the first release (the binary installed on every host) and the next
//!   one: time per wave, from the agent's log;
//! - SSH round trips and bytes per host for that rollout, and for one
//!   no-change reconcile, from the agent's own /metrics;
//! - a drift scan (one observe of the whole fleet), wall time;
//! - the agent's peak RSS and its ssh masters' RSS;
//! - the peer: a bare OpenSSH round trip (`ssh host true` over the same
//!   master) against one host-target observe.
//!
//! `cargo bench -p sluice --bench fleet` (root: it makes network
//! namespaces). Prints figures only.

#[path = "../../../tests/common/mod.rs"]
mod common;
#[path = "../../../tests/common/netns.rs"]
mod netns;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{git, http_get, SLUICE};

const HOSTS: usize = 20;

fn metric_sum(metrics: &str, name: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in metrics.lines() {
        if let Some(rest) = line.strip_prefix(name) {
            if let Some((labels, v)) = rest.split_once(' ') {
                out.insert(labels.to_string(), v.trim().parse().unwrap_or(0.0));
            }
        }
    }
    out
}

fn per_host(before: &str, after: &str, name: &str) -> (f64, f64, f64) {
    let (b, a) = (metric_sum(before, name), metric_sum(after, name));
    let deltas: Vec<f64> = a
        .iter()
        .filter(|(k, _)| k.contains("target="))
        .map(|(k, v)| v - b.get(k).copied().unwrap_or(0.0))
        .collect();
    let n = deltas.len().max(1) as f64;
    let min = deltas.iter().copied().fold(f64::MAX, f64::min);
    let max = deltas.iter().copied().fold(0.0, f64::max);
    (deltas.iter().sum::<f64>() / n, min, max)
}

fn metrics(port: u16) -> String {
    http_get(port, "/metrics")
        .map(|(_, b)| b)
        .unwrap_or_default()
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// `applying wave` and `rollout succeeded` times from the agent's log.
fn wave_times(log: &str, from_line: usize) -> Vec<(String, f64)> {
    let stamp = |l: &str| {
        chrono::DateTime::parse_from_rfc3339(l.split_whitespace().next().unwrap_or(""))
            .ok()
            .map(|t| t.timestamp_micros() as f64 / 1e6)
    };
    let mut marks = Vec::new();
    for l in log.lines().skip(from_line) {
        if l.contains("applying wave") || l.contains("rollout succeeded") {
            if let Some(t) = stamp(l) {
                let ring = l
                    .split("ring=")
                    .nth(1)
                    .map(|r| format!("ring {}", r.trim()))
                    .unwrap_or_else(|| "end".into());
                marks.push((ring, t));
            }
        }
    }
    marks
        .windows(2)
        .map(|w| (w[0].0.clone(), w[1].1 - w[0].1))
        .collect()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}

fn main() {
    let hosts = netns::Hosts::new(HOSTS);
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/host-shop");
    copy_dir(&example.join("services"), &repo.join("services"));
    // The example's flags, set for the whole group.
    let flags = std::fs::read_to_string(example.join("flags.yaml")).unwrap();
    std::fs::write(
        repo.join("flags.yaml"),
        flags.replace("local: on", "web: on"),
    )
    .unwrap();
    let list: Vec<String> = hosts
        .hosts
        .iter()
        .enumerate()
        .map(|(i, h)| format!("{{ssh: \"root@{}\", name: h{:02}}}", h.addr, i + 1))
        .collect();
    // The example's topology over the fleet; every service rolling (there
    // is no traffic here for a canary's analysis).
    let topology = |extra: &str| {
        format!(
            "apiVersion: sluice.dev/v1\nkind: Topology\ndefaults:\n  strategy: rolling\n  soak: 2s\n  gateTimeout: 30s\nhostGroups:\n  - name: web\n    hosts: [{}]\n    rings: [1, 25%, 100%]\nservices:\n  catalog:\n    path: services/catalog\n    targets: [web]\n  orders:\n    path: services/orders\n    dependsOn: [catalog]\n    targets: [web]{extra}\n  web:\n    path: services/web\n    dependsOn: [orders]\n    targets: [web]\n",
            list.join(", ")
        )
    };
    std::fs::write(repo.join("sluice.yaml"), topology("")).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-q", "-m", "fleet"]);

    // Hosts run this binary without its line tables: the size of a
    // release build (`--fleet-sluice`), which is what hosts get.
    let host_binary = tmp.path().join("sluice");
    let stripped = Command::new("objcopy")
        .args(["--strip-debug", SLUICE, host_binary.to_str().unwrap()])
        .status()
        .is_ok_and(|s| s.success());
    if !stripped {
        std::fs::copy(SLUICE, &host_binary).unwrap();
    }
    let port = common::free_port();
    let log_path = tmp.path().join("agent.log");
    let state = tmp.path().join("state");
    let mut agent = Command::new(SLUICE)
        .arg("run")
        .args(["--repo", repo.to_str().unwrap()])
        .args(["--state-dir", state.to_str().unwrap()])
        .args(hosts.flags())
        .args(["--fleet-sluice", host_binary.to_str().unwrap()])
        .args(["--interval", "1h", "--drift-interval", "0s"])
        .env("SLUICE_LOG", "info,sluice=debug")
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .expect("sluice run");
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    // Reconciles counted from the agent's log: scraping /metrics or
    // /status would observe the fleet itself.
    let reconciles = || log().matches("reconcile done").count();
    let wait_reconciles = |n: usize, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(600);
        while reconciles() < n {
            assert!(Instant::now() < deadline, "{what}: never\n{}", log());
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    // Waits for the `n`th reconcile (from the log) and then checks, with
    // one GET /status, that every host runs `head`: polling /status would
    // observe every host each time and count in the figures.
    let wait_idle = |n: usize, head: &str, what: &str| {
        wait_reconciles(n, what);
        let status: serde_json::Value = http_get(port, "/status")
            .ok()
            .and_then(|(_, b)| serde_json::from_str(&b).ok())
            .unwrap_or_default();
        let done = status["inProgress"].is_null()
            && status["targets"].as_object().is_some_and(|t| {
                t.len() == HOSTS && t.values().all(|r| r["applied"]["commit"] == head)
            });
        assert!(done, "{what}: not on {head}\n{status}\n{}", log());
    };
    let started = Instant::now();
    wait_idle(1, &git(&repo, &["rev-parse", "HEAD"]), "the first release");
    let first = started.elapsed();
    let m0 = metrics(port);
    println!("fleet: {HOSTS} hosts (network namespaces, each its own sshd), rings [1, 25%, 100%] = 1 + 5 + 14 hosts, 3 services (catalog ← orders ← web) = 9 waves");
    println!(
        "first release (binary installed on every host): {:.1} s",
        first.as_secs_f64()
    );
    let (sent, min, max) = per_host("", &m0, "sluice_fleet_ssh_sent_bytes_total");
    println!(
        "  per host: {:.1} MB sent (binary {:.1} MB) [min {:.1}, max {:.1}]",
        sent / 1e6,
        std::fs::metadata(&host_binary).unwrap().len() as f64 / 1e6,
        min / 1e6,
        max / 1e6
    );
    for (ring, secs) in wave_times(&log(), 0) {
        println!("  wave at {ring}: {secs:.2} s");
    }

    // The next release: versions bumped.
    for s in ["catalog", "orders", "web"] {
        let p = repo.join(format!("services/{s}/{s}.yaml"));
        let text = std::fs::read_to_string(&p).unwrap();
        std::fs::write(&p, text.replace("version: \"1.0.0\"", "version: \"2.0.0\"")).unwrap();
    }
    git(&repo, &["commit", "-q", "-am", "2.0.0"]);
    let lines = log().lines().count();
    let _ = metrics(port);
    let before = metrics(port);
    let started = Instant::now();
    let done = reconciles();
    let _ = common::http_post(port, "/reconcile");
    wait_reconciles(done + 1, "the second release");
    let took = started.elapsed();
    let after = metrics(port);
    wait_idle(
        done + 1,
        &git(&repo, &["rev-parse", "HEAD"]),
        "the second release",
    );
    println!(
        "\nrelease 2.0.0 to {HOSTS} hosts: {:.1} s",
        took.as_secs_f64()
    );
    for (ring, secs) in wave_times(&log(), lines) {
        println!("  wave at {ring}: {secs:.2} s (soak 2 s included)");
    }
    for (name, label, scale, unit) in [
        ("sluice_fleet_ssh_commands_total", "round trips", 1.0, ""),
        ("sluice_fleet_ssh_sent_bytes_total", "sent", 1e3, " kB"),
        (
            "sluice_fleet_ssh_received_bytes_total",
            "received",
            1e3,
            " kB",
        ),
    ] {
        let (avg, min, max) = per_host(&before, &after, name);
        println!(
            "  per host: {label} {:.1}{unit} [min {:.1}, max {:.1}]",
            avg / scale,
            min / scale,
            max / scale
        );
    }

    // No-change reconciles: the loop's steady cost.
    const QUIET: usize = 10;
    // Scraped twice: the first scrape's own observe is cached for 10 s.
    let _ = metrics(port);
    let before = metrics(port);
    let started = Instant::now();
    let done = reconciles();
    for n in 1..=QUIET {
        let _ = common::http_post(port, "/reconcile");
        wait_reconciles(done + n, "a no-change reconcile");
    }
    let each = started.elapsed() / QUIET as u32;
    let after = metrics(port);
    println!(
        "\nno-change reconcile ({QUIET} in a row): {:.0} ms each",
        each.as_secs_f64() * 1e3
    );
    for (name, label, scale, unit) in [
        ("sluice_fleet_ssh_commands_total", "round trips", 1.0, ""),
        ("sluice_fleet_ssh_sent_bytes_total", "sent", 1.0, " B"),
        (
            "sluice_fleet_ssh_received_bytes_total",
            "received",
            1.0,
            " B",
        ),
    ] {
        let (avg, _, _) = per_host(&before, &after, name);
        println!(
            "  per host per reconcile: {label} {:.1}{unit}",
            avg / scale / QUIET as f64
        );
    }

    // Observing the whole fleet from the running agent: GET /status reads
    // every host's live state (one observe each, --fleet-parallel at once).
    let mut observes = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let (code, _) = http_get(port, "/status").unwrap();
        assert_eq!(code, 200);
        observes.push(started.elapsed().as_secs_f64());
    }
    observes.sort_by(f64::total_cmp);
    println!(
        "observe of all {HOSTS} hosts by the running agent (GET /status): median {:.0} ms, max {:.0} ms",
        observes[2] * 1e3,
        observes[4] * 1e3
    );
    // A drift scan from a new `sluice drift` process: it resumes the
    // agent's ssh masters but checks each host's binary (sha256) first.
    let mut scans = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        let out = Command::new(SLUICE)
            .arg("drift")
            .args(["--repo", repo.to_str().unwrap()])
            .args(["--state-dir", state.to_str().unwrap()])
            .args(hosts.flags())
            .args(["--fleet-sluice", host_binary.to_str().unwrap()])
            .env("SLUICE_LOG", "info,sluice=debug,sluice_fleet=debug")
            .output()
            .unwrap();
        // Where the time went, for whoever reads the figures.
        let _ = std::fs::write(
            std::env::temp_dir().join("sluice-fleet-bench-drift.log"),
            &out.stderr,
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        scans.push(started.elapsed().as_secs_f64());
    }
    scans.sort_by(f64::total_cmp);
    println!(
        "`sluice drift` of {HOSTS} hosts from a new process (binary check + one observe each, 10 at a time): median {:.0} ms",
        scans[1] * 1e3
    );

    // The peer: a bare ssh round trip over the same master, and one observe.
    let ctl_dir = state.join("ssh");
    let ctl = std::fs::read_dir(&ctl_dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_none())
        .expect("a control socket");
    let dest = format!(
        "root@{}",
        hosts
            .hosts
            .iter()
            .find_map(|h| {
                let c = Command::new("ssh")
                    .args([
                        "-S",
                        ctl.to_str().unwrap(),
                        "-O",
                        "check",
                        &format!("root@{}", h.addr),
                    ])
                    .stderr(Stdio::null())
                    .status()
                    .ok()?;
                c.success().then(|| h.addr.clone())
            })
            .unwrap_or_else(|| hosts.hosts[0].addr.clone())
    );
    let started = Instant::now();
    for _ in 0..20 {
        let ok = Command::new("ssh")
            .args([
                "-S",
                ctl.to_str().unwrap(),
                "-o",
                "BatchMode=yes",
                &dest,
                "true",
            ])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }
    println!(
        "peer: bare OpenSSH round trip over the master (ssh -S … true): {:.1} ms",
        started.elapsed().as_secs_f64() * 1e3 / 20.0
    );

    let pid = agent.id();
    let masters: u64 = common::procs()
        .into_iter()
        .filter(|p| {
            p.args.first().is_some_and(|a| a == "ssh")
                && p.args
                    .iter()
                    .any(|a| a.starts_with(state.to_str().unwrap()))
        })
        .map(|p| rss_kib(p.pid, "VmRSS:"))
        .sum();
    println!(
        "\nagent peak RSS: {:.1} MiB; its {HOSTS} ssh masters: {:.1} MiB together",
        rss_kib(pid, "VmHWM:") as f64 / 1024.0,
        masters as f64 / 1024.0
    );
    let _ = agent.kill();
    let _ = agent.wait();
}
