//! The host target on its own, with real processes, files and HTTP: the
//! supervisor's restarts and stops, files and their root, artifacts and
//! their digests, and routes that keep serving through a version change.

#[path = "common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{free_port, http_get, procs, SLUICE};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sluice_core::model::Strategy;
use sluice_core::resource::{DesiredResource, Health, ResourceId};
use sluice_core::target::{Target, TargetError};
use sluice_host::{HostConfig, HostTarget};

struct Fixture {
    tmp: tempfile::TempDir,
    target: HostTarget,
    rt: tokio::runtime::Runtime,
}

impl Fixture {
    fn new() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let target = HostTarget::new(HostConfig {
            name: "local".into(),
            state_dir: tmp.path().join("state"),
            file_root: tmp.path().join("files"),
            exe: SLUICE.into(),
            port_range: 20000..=29999,
            extra_path: vec![],
            router_admin: None,
        })
        .unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        Fixture { tmp, target, rt }
    }

    /// Another HostTarget on the same folders: what a restarted agent builds.
    fn restarted(&self) -> HostTarget {
        HostTarget::new(HostConfig {
            name: "local".into(),
            state_dir: self.tmp.path().join("state"),
            file_root: self.tmp.path().join("files"),
            exe: SLUICE.into(),
            port_range: 20000..=29999,
            extra_path: vec![],
            router_admin: None,
        })
        .unwrap()
    }

    fn apply(&self, r: &DesiredResource) -> Result<(), TargetError> {
        self.rt.block_on(self.target.apply(r))
    }

    fn health(&self, id: &ResourceId) -> Option<Health> {
        self.rt
            .block_on(self.target.observe(std::slice::from_ref(id)))
            .unwrap()
            .get(id)
            .map(|l| l.health)
    }

    /// Pids of the children (not the shims) of this fixture's instances.
    fn children(&self) -> Vec<u32> {
        self.target
            .instances()
            .iter()
            .filter_map(|i| i.state.as_ref()?.child_pid)
            .collect()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let me = std::process::id();
        for p in procs() {
            let mine = p
                .args
                .iter()
                .any(|a| a.contains(&self.tmp.path().display().to_string()))
                || p.cwd.starts_with(self.tmp.path());
            if mine && p.pid != me && p.pgid > 1 {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", "--", &format!("-{}", p.pgid)])
                    .status();
            }
        }
    }
}

fn resource(kind: &str, name: &str, spec: Value, strategy: Strategy) -> DesiredResource {
    DesiredResource {
        id: ResourceId::new("local", kind, name),
        service: "svc".into(),
        file: "svc/x.yaml".into(),
        body: json!({"apiVersion": "sluice.dev/v1", "kind": kind, "metadata": {"name": name}, "spec": spec}),
        redact: vec![],
        strategy,
        max_unavailable: None,
        crash_restarts: None,
        start_timeout: None,
        impersonate: None,
        blobs: BTreeMap::new(),
    }
}

/// A demo process spec, completed with the defaults render fills in.
fn demo(version: &str, extra: &[&str], replicas: u32) -> Value {
    let mut args = vec![
        "demo".to_string(),
        "--name".into(),
        "api".into(),
        "--version".into(),
        version.into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    json!({
        "command": SLUICE, "args": args, "env": {}, "workingDir": null, "version": version,
        "replicas": replicas, "port": null,
        "readiness": {"http": "/healthz", "tcp": false, "period": "50ms", "timeout": "5s"},
        "restart": {"policy": "always", "initialBackoff": "100ms", "maxBackoff": "1s"},
        "artifacts": [], "stopTimeout": "2s"
    })
}

fn shell(script: &str, readiness: Value, stop: &str) -> Value {
    json!({
        "command": "/bin/sh", "args": ["-c", script], "env": {}, "workingDir": null, "version": "1",
        "replicas": 1, "port": null, "readiness": readiness,
        "restart": {"policy": "always", "initialBackoff": "100ms", "maxBackoff": "400ms"},
        "artifacts": [], "stopTimeout": stop
    })
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, a)| !a.trim_start().starts_with('Z'))
    })
}

#[test]
fn a_process_is_adopted_updated_side_by_side_and_a_bad_version_never_replaces_it() {
    let f = Fixture::new();
    let v1 = resource("Process", "api", demo("1.0.0", &[], 1), Strategy::Rolling);
    f.apply(&v1).unwrap();
    assert_eq!(f.health(&v1.id), Some(Health::Healthy));
    let port = f.target.instances()[0].spec.port;
    let pids = f.children();
    // Idempotent, and a restarted agent adopts: same pids, no second instance.
    f.apply(&v1).unwrap();
    let again = f.restarted();
    f.rt.block_on(again.apply(&v1)).unwrap();
    assert_eq!(f.children(), pids);
    assert_eq!(again.instances().len(), 1);

    // A version that never becomes ready: an error naming it, the old one serves on.
    let bad = resource(
        "Process",
        "api",
        demo("2.0.0", &["--never-ready"], 1),
        Strategy::Rolling,
    );
    let e = f.apply(&bad).unwrap_err().to_string();
    assert!(e.contains("not ready") && e.contains("/healthz"), "{e}");
    assert_eq!(f.children(), pids);
    let (_, body) = http_get(port, "/").unwrap();
    assert!(body.contains("\"version\":\"1.0.0\""), "{body}");

    // A good version starts beside the old one, then the old one stops.
    let v2 = resource("Process", "api", demo("2.0.0", &[], 2), Strategy::Rolling);
    f.apply(&v2).unwrap();
    assert!(!alive(pids[0]));
    assert_eq!(f.children().len(), 2);
    for i in f.target.instances() {
        let (_, body) = http_get(i.spec.port, "/").unwrap();
        assert!(body.contains("\"version\":\"2.0.0\""), "{body}");
    }
    // Recreate stops first.
    let v3 = resource("Process", "api", demo("3.0.0", &[], 1), Strategy::Recreate);
    f.apply(&v3).unwrap();
    assert_eq!(f.children().len(), 1);

    f.rt.block_on(f.target.delete(&v3.id)).unwrap();
    assert!(f.target.instances().is_empty());
    assert_eq!(f.health(&v3.id), None);
}

#[test]
fn stop_is_sigterm_then_sigkill_of_the_whole_group() {
    let f = Fixture::new();
    let marker = f.tmp.path().join("got-term");
    // Traps TERM, records it, exits.
    let polite = resource(
        "Process",
        "polite",
        shell(
            &format!(
                "trap 'touch {}; exit 0' TERM; while true; do sleep 0.05; done",
                marker.display()
            ),
            Value::Null,
            "3s",
        ),
        Strategy::Rolling,
    );
    // Ignores TERM and has a grandchild in its group.
    let stubborn = resource(
        "Process",
        "stubborn",
        shell(
            "trap '' TERM; sleep 300 & while true; do sleep 0.05; done",
            Value::Null,
            "500ms",
        ),
        Strategy::Rolling,
    );
    f.apply(&polite).unwrap();
    f.apply(&stubborn).unwrap();
    let groups: Vec<u32> = f
        .target
        .instances()
        .iter()
        .filter_map(|i| i.state.as_ref().map(|s| s.shim_pid))
        .collect();
    let started = Instant::now();
    f.rt.block_on(f.target.delete(&polite.id)).unwrap();
    assert!(marker.exists(), "the child never saw SIGTERM");
    f.rt.block_on(f.target.delete(&stubborn.id)).unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    for g in groups {
        let left: Vec<_> = procs()
            .into_iter()
            .filter(|p| p.pgid == g && alive(p.pid))
            .map(|p| (p.pid, p.args))
            .collect();
        assert!(left.is_empty(), "group {g} left {left:?}");
    }
}

#[test]
fn a_crashing_process_is_restarted_with_backoff_and_reported_degraded() {
    let f = Fixture::new();
    let mut crash = resource(
        "Process",
        "crash",
        shell("sleep 0.1; exit 3", Value::Null, "1s"),
        Strategy::Rolling,
    );
    // Not the crash-loop check at start (tests/canary.rs has that): the
    // supervisor's own restarts and the health they give.
    crash.crash_restarts = Some(1000);
    // Without readiness it only has to be up one period; it is, briefly.
    let _ = f.apply(&crash);
    wait_for("restarts", Duration::from_secs(10), || {
        f.target
            .instances()
            .first()
            .and_then(|i| i.state.clone())
            .is_some_and(|s| s.restarts >= 3)
    });
    let s = f.target.instances()[0].state.clone().unwrap();
    assert!(s.last_exit.unwrap_or_default().contains('3'));
    wait_for("degraded", Duration::from_secs(5), || {
        f.health(&crash.id) == Some(Health::Degraded)
    });
}

#[test]
fn files_are_written_atomically_inside_the_root_only() {
    let f = Fixture::new();
    let file = |name: &str, path: &str, content: &str| {
        resource(
            "File",
            name,
            json!({"path": path, "content": content, "source": null, "mode": "0640", "secret": false}),
            Strategy::Rolling,
        )
    };
    let a = file("a", "conf/app.conf", "x=1\n");
    f.apply(&a).unwrap();
    let path = f.tmp.path().join("files/conf/app.conf");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "x=1\n");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o640
    );
    let inode = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
    let before = inode(&path);
    f.apply(&a).unwrap();
    assert_eq!(inode(&path), before, "an unchanged file is not rewritten");
    // Drift is visible through observe.
    std::fs::write(&path, "x=2\n").unwrap();
    let live =
        f.rt.block_on(f.target.observe(std::slice::from_ref(&a.id)))
            .unwrap();
    assert_eq!(live[&a.id].body["spec"]["content"], "x=2\n");

    let e = f
        .apply(&file("b", "../escape", "x"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("inside the file root"), "{e}");
    std::os::unix::fs::symlink("/tmp", f.tmp.path().join("files/out")).unwrap();
    let e = f
        .apply(&file("c", "out/evil", "x"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("symbolic link"), "{e}");
    assert!(!Path::new("/tmp/evil").exists());

    f.rt.block_on(f.target.delete(&a.id)).unwrap();
    assert!(!path.exists());
}

#[test]
fn artifacts_are_verified_before_anything_runs_and_cached_by_digest() {
    let f = Fixture::new();
    let tool = f.tmp.path().join("tool.sh");
    std::fs::write(&tool, "#!/bin/sh\nexec sleep 300\n").unwrap();
    let sha = hex::encode(Sha256::digest(std::fs::read(&tool).unwrap()));
    let with_artifact = |sha: &str| {
        let mut spec = shell("exec \"$TOOL\"", Value::Null, "1s");
        spec["env"] = json!({"TOOL": "${artifact.tool}"});
        spec["artifacts"] = json!([{"name": "tool", "url": format!("file://{}", tool.display()), "path": null, "sha256": sha, "executable": true}]);
        resource("Process", "tool", spec, Strategy::Rolling)
    };
    let bad = with_artifact(&"0".repeat(64));
    let e =
        f.rt.block_on(f.target.prepare(&[&bad]))
            .unwrap_err()
            .to_string();
    assert!(
        e.contains("sha256 mismatch") && e.contains("nothing applied"),
        "{e}"
    );
    assert!(f.target.instances().is_empty());

    let good = with_artifact(&sha);
    f.rt.block_on(f.target.prepare(&[&good])).unwrap();
    let cached = f.tmp.path().join("state/artifacts").join(&sha);
    assert!(cached.exists());
    // Cached by digest: the source can go away.
    std::fs::remove_file(&tool).unwrap();
    f.rt.block_on(f.target.prepare(&[&good])).unwrap();
    f.apply(&good).unwrap();
    wait_for("the artifact running", Duration::from_secs(5), || {
        procs().iter().any(|p| {
            p.args
                .first()
                .is_some_and(|a| a == "sleep" || a.ends_with("/sleep"))
                && p.args.iter().any(|a| a == "300")
                && p.cwd.starts_with(f.tmp.path())
        })
    });
}

#[test]
fn a_route_keeps_serving_through_a_version_change_and_an_agent_restart() {
    let f = Fixture::new();
    let listen = free_port();
    let v1 = resource("Process", "api", demo("1.0.0", &[], 2), Strategy::Rolling);
    let route = resource(
        "Route",
        "api",
        json!({"listen": format!("127.0.0.1:{listen}"), "process": "api"}),
        Strategy::Rolling,
    );
    f.apply(&v1).unwrap();
    f.apply(&route).unwrap();
    assert_eq!(f.health(&route.id), Some(Health::Healthy));

    // A client loop through the route while the version changes.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let client = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        std::thread::spawn(move || {
            let mut versions = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match http_get(listen, "/") {
                    Ok((200, body)) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                        let v: Value = serde_json::from_str(&body).unwrap_or_default();
                        versions.push(v["version"].as_str().unwrap_or("").to_string());
                    }
                    _ => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            versions
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let v2 = resource("Process", "api", demo("2.0.0", &[], 2), Strategy::Rolling);
    f.apply(&v2).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // The agent goes away and comes back: the router never stopped.
    let again = f.restarted();
    f.rt.block_on(again.apply(&route)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let versions = client.join().unwrap();
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed during the switch"
    );
    assert!(ok.load(Ordering::Relaxed) > 20);
    assert_eq!(versions.first().map(String::as_str), Some("1.0.0"));
    assert_eq!(versions.last().map(String::as_str), Some("2.0.0"));
    // Once switched, never back.
    let first_v2 = versions.iter().position(|v| v == "2.0.0").unwrap();
    assert!(versions[first_v2..].iter().all(|v| v == "2.0.0"));
    let routers: Vec<_> = f
        .target
        .instances()
        .into_iter()
        .filter(|i| i.spec.key == "router")
        .collect();
    assert_eq!(routers.len(), 1);
}

#[test]
fn http_artifacts_are_streamed_verified_and_never_left_half_written() {
    use std::io::{Read, Write};
    let f = Fixture::new();
    let payload = vec![7u8; 300_000];
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let body = payload.clone();
    std::thread::spawn(move || {
        for s in listener.incoming().take(2) {
            let Ok(mut s) = s else { continue };
            let mut buf = [0u8; 2048];
            let _ = s.read(&mut buf);
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(&body);
        }
    });
    let good = hex::encode(Sha256::digest(&payload));
    let with = |sha: &str| {
        let mut spec = shell("sleep 300", Value::Null, "1s");
        spec["artifacts"] = json!([{"name": "blob", "url": format!("http://127.0.0.1:{port}/blob"), "path": null, "sha256": sha, "executable": false}]);
        resource("Process", "blob", spec, Strategy::Rolling)
    };
    let e =
        f.rt.block_on(f.target.prepare(&[&with(&"1".repeat(64))]))
            .unwrap_err()
            .to_string();
    assert!(e.contains("sha256 mismatch") && e.contains(&good), "{e}");
    let cache = f.tmp.path().join("state/artifacts");
    assert_eq!(
        std::fs::read_dir(&cache).unwrap().count(),
        0,
        "a failed download left a file"
    );
    f.rt.block_on(f.target.prepare(&[&with(&good)])).unwrap();
    assert_eq!(std::fs::read(cache.join(&good)).unwrap(), payload);
}

/// The router keeps its admin address (a Prometheus scrape target) and its
/// counters across a restart: killed with SIGKILL, it is restarted by its
/// supervisor on the same address, counting on from its persisted
/// counters, with a new start time.
#[test]
fn the_router_keeps_its_address_and_counters_across_a_restart() {
    let shop = common::Shop::new(&["1.0.0"; 3]);
    assert_eq!(shop.sluice(&["apply"]).code, 0);
    let addr = std::fs::read_to_string(shop.state().join("host/local/router.addr"))
        .unwrap()
        .trim()
        .to_string();
    let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
    for _ in 0..20 {
        assert_eq!(shop.get("catalog", "/").unwrap().0, 200);
    }
    let count = |metrics: &str| -> u64 {
        metrics
            .lines()
            .filter(|l| l.starts_with("sluice_router_requests_total{route=\"catalog\""))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    };
    let started = |metrics: &str| -> String {
        metrics
            .lines()
            .find(|l| l.starts_with("sluice_router_start_time_seconds "))
            .unwrap()
            .to_string()
    };
    // Persisted every 2 s.
    std::thread::sleep(Duration::from_millis(2500));
    let (_, before) = http_get(port, "/metrics").unwrap();
    assert!(count(&before) >= 20, "{before}");
    let router = common::procs()
        .into_iter()
        .find(|p| p.cwd.starts_with(shop.tmp.path()) && p.args.iter().any(|a| a == "router"))
        .expect("the router process");
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &router.pid.to_string()])
        .status();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let after = loop {
        if let Ok((200, m)) = http_get(port, "/metrics") {
            if started(&m) != started(&before) {
                break m;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the router did not come back on {addr}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(count(&after) >= count(&before), "{before}\n---\n{after}");
    assert_eq!(shop.get("catalog", "/").unwrap().0, 200);
    let status = shop.sluice(&["status"]);
    assert!(
        status
            .stdout
            .contains(&format!("router metrics at http://{addr}/metrics")),
        "{}",
        status.all()
    );
}
