//! VM fleets over SSH, with real parts: every host is its own network
//! namespace with its own address on a veth pair and its own sshd
//! (Debian's openssh-server with its own config and host key); the agent
//! reaches them with the system OpenSSH client, installs its own binary on
//! each, and runs the host target there. Hosts are cut off with `ip link
//! set … down`. Runs as root (CI does); `tests/run` installs sshd and
//! iproute2.

mod common;
#[path = "common/netns.rs"]
mod netns;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{git, run_with_timeout, Output, SLUICE};
use netns::Hosts;

/// Each service's route, the same on every host (each host has its own
/// loopback).
const SERVICES: [(&str, u16); 3] = [("catalog", 18081), ("orders", 18082), ("web", 18083)];

/// A repository rolling the three services to a group of the hosts.
struct Fleet {
    tmp: tempfile::TempDir,
    hosts: Hosts,
}

impl Fleet {
    /// `rings` as `sluice.yaml` writes them, e.g. `[1, 2, 100%]`.
    fn new(n: usize, rings: &str, soak: &str) -> Fleet {
        let hosts = Hosts::new(n);
        let tmp = tempfile::tempdir().unwrap();
        let fleet = Fleet { tmp, hosts };
        std::fs::create_dir_all(fleet.repo()).unwrap();
        git(&fleet.repo(), &["init", "-q", "-b", "main"]);
        let list: Vec<String> = fleet
            .hosts
            .hosts
            .iter()
            .enumerate()
            .map(|(i, h)| format!("{{ssh: \"root@{}\", name: h{}}}", h.addr, i + 1))
            .collect();
        fleet.write(
            "sluice.yaml",
            &format!(
                "apiVersion: sluice.dev/v1\nkind: Topology\ndefaults:\n  strategy: rolling\n  soak: {soak}\n  gateTimeout: 20s\nhostGroups:\n  - name: vm\n    hosts: [{}]\n    rings: {rings}\nservices:\n  catalog:\n    path: services/catalog\n    targets: [vm]\n    drift: heal\n  orders:\n    path: services/orders\n    targets: [vm]\n    drift: heal\n  web:\n    path: services/web\n    targets: [vm]\n    drift: heal\n",
                list.join(", ")
            ),
        );
        fleet.release("1.0.0", None);
        fleet
    }

    fn repo(&self) -> PathBuf {
        self.tmp.path().join("repo")
    }

    fn state(&self) -> PathBuf {
        self.tmp.path().join("state")
    }

    fn write(&self, rel: &str, content: &str) {
        let p = self.repo().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }

    /// Every service at `version`; `bad` fails at start.
    fn release(&self, version: &str, bad: Option<&str>) -> String {
        for (s, port) in SERVICES {
            let fail = if bad == Some(s) {
                ", \"--fail-start\""
            } else {
                ""
            };
            let file = if s == "orders" {
                format!("---\napiVersion: sluice.dev/v1\nkind: File\nmetadata:\n  name: orders-config\nspec:\n  path: orders/config.json\n  content: '{{\"release\": \"{version}\"}}'\n")
            } else {
                String::new()
            };
            self.write(
                &format!("services/{s}/{s}.yaml"),
                &format!(
                    "apiVersion: sluice.dev/v1\nkind: Process\nmetadata:\n  name: {s}\nspec:\n  command: sluice\n  args: [\"demo\", \"--name\", \"{s}\"{fail}]\n  version: \"{version}\"\n  env:\n    SERVICE_VERSION: \"${{VERSION}}\"\n  readiness:\n    http: /healthz\n    timeout: 5s\n  stopTimeout: 3s\n---\napiVersion: sluice.dev/v1\nkind: Route\nmetadata:\n  name: {s}\nspec:\n  listen: 127.0.0.1:{port}\n  process: {s}\n{file}"
                ),
            );
        }
        git(&self.repo(), &["add", "-A"]);
        git(
            &self.repo(),
            &["commit", "-q", "-m", &format!("release {version}")],
        );
        git(&self.repo(), &["rev-parse", "HEAD"])
    }

    fn flags(&self) -> Vec<String> {
        let mut f = vec![
            "--repo".to_string(),
            self.repo().display().to_string(),
            "--state-dir".into(),
            self.state().display().to_string(),
            "--fleet-timeout".into(),
            "5s".into(),
            "--fleet-alive-interval".into(),
            "1s".into(),
            "--fleet-connect-timeout".into(),
            "3s".into(),
            // Fewer slots than hosts: the limit is in the way of every
            // test, as it is of a large fleet.
            "--fleet-parallel".into(),
            "2".into(),
        ];
        f.extend(self.hosts.flags());
        f
    }

    fn sluice(&self, args: &[&str]) -> Output {
        self.sluice_env(args, &[])
    }

    fn sluice_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new(SLUICE);
        cmd.arg(args[0])
            .args(self.flags())
            .args(&args[1..])
            .envs(env.iter().copied());
        run_with_timeout(cmd, Duration::from_secs(180))
    }

    fn agent(&self) -> Agent {
        let port = common::free_port();
        let log = self.tmp.path().join(format!("agent-{port}.log"));
        let child = Command::new(SLUICE)
            .arg("run")
            .args(self.flags())
            .args(["--interval", "1s", "--backoff-max", "1s"])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("sluice run");
        Agent { child, port, log }
    }

    /// The version each service answers with on host `i`.
    fn versions(&self, i: usize) -> BTreeMap<&'static str, Option<String>> {
        SERVICES
            .iter()
            .map(|(s, port)| (*s, self.hosts.version(i, *port)))
            .collect()
    }

    fn all_on(&self, i: usize, version: &str) -> bool {
        self.versions(i)
            .values()
            .all(|v| v.as_deref() == Some(version))
    }

    fn wait_all_on(&self, i: usize, version: &str, timeout: Duration, log: &dyn Fn() -> String) {
        let deadline = Instant::now() + timeout;
        while !self.all_on(i, version) {
            assert!(
                Instant::now() < deadline,
                "host {i} never served {version}: {:?}\n{}",
                self.versions(i),
                log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// No service runs twice on any host.
    fn one_process_each(&self) {
        for i in 0..self.hosts.hosts.len() {
            let pids = self.hosts.service_pids(i);
            let names: Vec<&str> = pids.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(names, ["catalog", "orders", "web"], "host {i}: {pids:?}");
        }
    }
}

struct Agent {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Agent {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn status(&self) -> serde_json::Value {
        match common::http_get(self.port, "/status") {
            Ok((200, body)) => serde_json::from_str(&body).unwrap_or_default(),
            _ => serde_json::Value::Null,
        }
    }

    fn wait(&self, what: &str, timeout: Duration, ok: impl Fn(&serde_json::Value) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status();
            if ok(&s) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: never\nstatus: {s}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_five_host_group_in_three_rings_rolls_a_release_ring_by_ring() {
    let fleet = Fleet::new(5, "[1, 2, 100%]", "2s");
    // The agent holds a token; nothing it starts may.
    let out = fleet.sluice_env(&["apply"], &[("SLUICE_GIT_TOKEN", "s3cr3t-token")]);
    assert_eq!(out.code, 0, "{}", out.all());
    let state = fleet.state().display().to_string();
    let masters: Vec<u32> = common::procs()
        .into_iter()
        .filter(|p| {
            p.args.first().is_some_and(|a| a == "ssh")
                && p.args.iter().any(|a| a.starts_with(&state))
        })
        .map(|p| p.pid)
        .collect();
    assert_eq!(masters.len(), 5, "one ssh master per host");
    for pid in masters
        .iter()
        .copied()
        .chain((0..5).flat_map(|i| fleet.hosts.service_pids(i).into_iter().map(|(_, p)| p)))
    {
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&env).contains("s3cr3t-token"),
            "pid {pid} holds the agent's token"
        );
    }
    for i in 0..5 {
        assert!(
            fleet.all_on(i, "1.0.0"),
            "host {i}: {:?}",
            fleet.versions(i)
        );
    }
    // The binary went to every host once, checked by sha256.
    for h in &fleet.hosts.hosts {
        let bins: Vec<_> = std::fs::read_dir(h.home.join("bin")).unwrap().collect();
        assert_eq!(bins.len(), 1, "{}", h.home.display());
    }
    fleet.one_process_each();

    // The next release: its plan names each wave's hosts...
    fleet.release("2.0.0", None);
    let out = fleet.sluice(&["plan"]);
    assert_eq!(out.code, 0, "{}", out.all());
    for wave in [
        "ring 0: catalog, orders, web — on vm-h1\n",
        "ring 1: catalog, orders, web — on vm-h2, vm-h3\n",
        "ring 2: catalog, orders, web — on vm-h4, vm-h5\n",
    ] {
        assert!(out.stdout.contains(wave), "{wave}\n{}", out.all());
    }
    // ...and it rolls out so, watched from inside every host.
    let watching = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let seen = std::thread::scope(|s| {
        let w = watching.clone();
        let fleet = &fleet;
        let watcher = s.spawn(move || {
            let start = Instant::now();
            let mut first: BTreeMap<usize, Duration> = BTreeMap::new();
            while w.load(std::sync::atomic::Ordering::Relaxed) {
                for i in 0..5 {
                    if !first.contains_key(&i)
                        && fleet.hosts.version(i, 18081).as_deref() == Some("2.0.0")
                    {
                        first.insert(i, start.elapsed());
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            first
        });
        let out = fleet.sluice(&["apply"]);
        watching.store(false, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(out.code, 0, "{}", out.all());
        watcher.join().unwrap()
    });
    assert_eq!(seen.len(), 5, "{seen:?}");
    // Ring 0 (h1), then ring 1 (h2, h3), then ring 2 (h4, h5): each after
    // the previous ring's soak of 2s.
    let ring = |hosts: &[usize]| -> (Duration, Duration) {
        let t: Vec<Duration> = hosts.iter().map(|i| seen[i]).collect();
        (*t.iter().min().unwrap(), *t.iter().max().unwrap())
    };
    let (r0, r1, r2) = (ring(&[0]), ring(&[1, 2]), ring(&[3, 4]));
    assert!(r0.1 + Duration::from_secs(1) < r1.0, "{seen:?}");
    assert!(r1.1 + Duration::from_secs(1) < r2.0, "{seen:?}");
    for i in 0..5 {
        assert!(
            fleet.all_on(i, "2.0.0"),
            "host {i}: {:?}",
            fleet.versions(i)
        );
    }
    fleet.one_process_each();
    // The file went too.
    let config = std::fs::read_to_string(
        fleet.hosts.hosts[4]
            .home
            .join("files/vm-h5/orders/config.json"),
    )
    .unwrap();
    assert!(config.contains("2.0.0"), "{config}");

    // Status per host.
    let out = fleet.sluice(&["status", "--output", "json"]);
    assert_eq!(out.code, 0, "{}", out.all());
    let status: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let head = git(&fleet.repo(), &["rev-parse", "HEAD"]);
    for i in 1..=5 {
        let t = &status["targets"][format!("vm-h{i}")];
        assert_eq!(t["applied"]["commit"], head.as_str(), "{status}");
        assert_eq!(t["ssh"], format!("root@{}", fleet.hosts.hosts[i - 1].addr));
    }

    // A host that rebooted is seen as it is: its processes are missing.
    fleet.hosts.reboot(3);
    let out = fleet.sluice(&["drift"]);
    assert!(
        out.stdout.contains("vm-h4") && out.stdout.contains("missing"),
        "{}",
        out.all()
    );
    // ...and a heal (or the next rollout) puts them back.
    let out = fleet.sluice(&["drift", "--heal"]);
    assert_eq!(out.code, 0, "{}", out.all());
    fleet.wait_all_on(3, "2.0.0", Duration::from_secs(30), &|| out.all());
}

#[test]
fn a_bad_release_is_stopped_on_ring_0_and_rings_1_and_2_never_change() {
    let fleet = Fleet::new(5, "[1, 2, 100%]", "1s");
    let out = fleet.sluice(&["apply"]);
    assert_eq!(out.code, 0, "{}", out.all());
    let before: Vec<_> = (1..5).map(|i| fleet.hosts.service_pids(i)).collect();
    let files: Vec<_> = (1..5)
        .map(|i| {
            std::fs::metadata(
                fleet.hosts.hosts[i]
                    .home
                    .join(format!("files/vm-h{}/orders/config.json", i + 1)),
            )
            .unwrap()
            .modified()
            .unwrap()
        })
        .collect();

    fleet.release("2.0.0", Some("orders"));
    let out = fleet.sluice(&["apply"]);
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(
        out.all().contains("vm-h1") && out.all().contains("orders"),
        "{}",
        out.all()
    );
    // Ring 0 is back on the good release; the others were never touched:
    // the same processes, the same files.
    assert!(fleet.all_on(0, "1.0.0"), "{:?}", fleet.versions(0));
    let after: Vec<_> = (1..5).map(|i| fleet.hosts.service_pids(i)).collect();
    assert_eq!(before, after);
    for (k, i) in (1..5).enumerate() {
        let m = std::fs::metadata(
            fleet.hosts.hosts[i]
                .home
                .join(format!("files/vm-h{}/orders/config.json", i + 1)),
        )
        .unwrap()
        .modified()
        .unwrap();
        assert_eq!(m, files[k], "host {i}'s file changed");
        assert!(fleet.all_on(i, "1.0.0"));
    }
    fleet.one_process_each();
    let out = fleet.sluice(&["status", "--output", "json"]);
    let status: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let last = status["history"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(last["kind"], "revert", "{last}");
    assert_eq!(last["targets"], serde_json::json!(["vm-h1"]), "{last}");
}

#[test]
fn a_host_cut_off_mid_wave_fails_the_gate_and_is_reverted_once_it_is_back() {
    let fleet = Fleet::new(3, "[1, 100%]", "6s");
    let out = fleet.sluice(&["apply"]);
    assert_eq!(out.code, 0, "{}", out.all());
    let good = git(&fleet.repo(), &["rev-parse", "HEAD"]);
    fleet.release("2.0.0", None);
    let agent = fleet.agent();
    // Ring 1 (h2, h3) applied and soaking: h3 goes off the network.
    fleet.wait_all_on(2, "2.0.0", Duration::from_secs(60), &|| agent.log());
    fleet.hosts.cut(2);
    // The gate fails; h1 and h2 go back at once; h3 waits, pending.
    agent.wait("a pending revert of vm-h3", Duration::from_secs(60), |s| {
        s["inProgress"]["kind"] == "revert"
            && s["inProgress"]["targets"] == serde_json::json!(["vm-h3"])
    });
    assert!(fleet.all_on(0, "1.0.0"), "{:?}", fleet.versions(0));
    assert!(fleet.all_on(1, "1.0.0"), "{:?}", fleet.versions(1));
    let out = fleet.sluice(&["status"]);
    assert!(
        out.stdout.contains(&format!(
            "Target vm-h3 (host root@{}, over SSH)\n  PENDING REVERT to {}",
            fleet.hosts.hosts[2].addr,
            &good[..10]
        )),
        "{}",
        out.all()
    );
    let status = agent.status();
    assert!(
        status["targets"]["vm-h3"]["lastError"]
            .as_str()
            .is_some_and(|e| e.contains("revert")),
        "{status}"
    );
    // Cut off, h3 still runs what it had.
    assert!(fleet.all_on(2, "2.0.0"), "{:?}", fleet.versions(2));
    // Back on the network: reverted by the agent's next tries.
    fleet.hosts.restore(2);
    agent.wait(
        "the revert of vm-h3 finished",
        Duration::from_secs(60),
        |s| {
            s.get("inProgress").is_some_and(|p| p.is_null())
                && s["targets"]["vm-h3"]["applied"]["commit"] == good.as_str()
        },
    );
    fleet.wait_all_on(2, "1.0.0", Duration::from_secs(30), &|| agent.log());
    fleet.one_process_each();
    let log = agent.log();
    assert!(log.contains("rollout failed"), "{log}");
}

#[test]
fn an_unknown_host_key_is_refused_and_trusted_only_when_asked() {
    let fleet = Fleet::new(1, "[100%]", "1s");
    // known_hosts without this host's key.
    std::fs::write(&fleet.hosts.known_hosts, "").unwrap();
    let out = fleet.sluice(&["apply"]);
    assert_ne!(out.code, 0, "{}", out.all());
    assert!(
        out.all().contains("Host key verification failed"),
        "{}",
        out.all()
    );
    assert!(
        !fleet.hosts.hosts[0].home.join("bin").exists(),
        "nothing may reach a host whose key is unknown"
    );
    // A wrong key is refused the same way.
    std::fs::write(
        &fleet.hosts.known_hosts,
        format!(
            "{} ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n",
            fleet.hosts.hosts[0].addr
        ),
    )
    .unwrap();
    let out = fleet.sluice(&["apply"]);
    assert_ne!(out.code, 0, "{}", out.all());
    assert!(
        out.all().contains("REMOTE HOST IDENTIFICATION HAS CHANGED")
            || out.all().contains("Host key verification failed"),
        "{}",
        out.all()
    );
    // Trust on first use, when asked: the key is recorded.
    std::fs::write(&fleet.hosts.known_hosts, "").unwrap();
    let out = fleet.sluice(&["apply", "--fleet-accept-new-host-keys"]);
    assert_eq!(out.code, 0, "{}", out.all());
    let known = std::fs::read_to_string(&fleet.hosts.known_hosts).unwrap();
    assert!(known.contains(&fleet.hosts.hosts[0].addr), "{known}");
    assert!(fleet.all_on(0, "1.0.0"));
}

#[test]
fn an_agent_killed_mid_wave_converges_on_every_host() {
    let fleet = Fleet::new(3, "[1, 100%]", "3s");
    let out = fleet.sluice(&["apply"]);
    assert_eq!(out.code, 0, "{}", out.all());
    let head = fleet.release("2.0.0", None);
    // Killed while ring 0 soaks, then again while ring 1 applies.
    let agent = fleet.agent();
    fleet.wait_all_on(0, "2.0.0", Duration::from_secs(60), &|| agent.log());
    agent.kill9();
    let agent = fleet.agent();
    let deadline = Instant::now() + Duration::from_secs(60);
    while fleet.hosts.version(1, 18081).as_deref() != Some("2.0.0")
        && fleet.hosts.version(2, 18081).as_deref() != Some("2.0.0")
    {
        assert!(Instant::now() < deadline, "{}", agent.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    agent.kill9();
    let agent = fleet.agent();
    agent.wait("idle on the new head", Duration::from_secs(90), |s| {
        s.get("inProgress").is_some_and(|p| p.is_null())
            && (1..=3)
                .all(|i| s["targets"][format!("vm-h{i}")]["applied"]["commit"] == head.as_str())
    });
    for i in 0..3 {
        assert!(
            fleet.all_on(i, "2.0.0"),
            "host {i}: {:?}",
            fleet.versions(i)
        );
    }
    fleet.one_process_each();
}
