//! kill -9 of the agent in the middle of a rollout, then a restart: the
//! live state converges to one whole commit (the new one if its gates pass,
//! else the last good one), with no duplicate processes and no lost history.
//! `kill_after_each_write` places the kill right after every write of the
//! store in turn (a crash point in the store, set by an environment
//! variable), for a good and a failing release.

#[path = "common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{http_get, Agent, Shop};

/// Waits until the agent reports a rollout at wave `wave` (0-based).
fn wait_for_wave(agent: &Agent, wave: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok((200, body)) = http_get(agent.port, "/status") {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            if v["inProgress"]["wave"].as_u64() == Some(wave) && v["inProgress"]["kind"] == "deploy"
            {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!(
        "the rollout never reached wave {}\n{}",
        wave + 1,
        agent.log()
    );
}

#[test]
fn a_crash_during_a_wave_of_a_good_release_finishes_it_after_restart() {
    let shop = Shop::new(&["1.0.0"; 3]);
    assert_eq!(shop.sluice(&["apply"]).code, 0);
    shop.set_versions(&["2.0.0"; 3]);
    // orders takes a while to become ready: time to kill the agent mid-wave.
    shop.edit(
        "services/orders/orders.yaml",
        "\"demo\",",
        "\"demo\", \"--ready-after-ms\", \"2500\",",
    );
    let head = shop.commit("2.0.0");
    let agent = Agent::start(&shop, "1s");
    wait_for_wave(&agent, 1);
    agent.kill9();
    let agent = Agent::start(&shop, "1s");
    agent.wait_idle_on(&head);
    for s in common::SERVICES {
        assert_eq!(shop.get_json(s, "/")["version"], "2.0.0", "{s}");
    }
    assert_eq!(
        shop.service_pids().len(),
        3,
        "duplicate or missing processes"
    );
    let v = agent.status();
    let deploys: Vec<_> = v["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["commit"] == head.as_str())
        .collect();
    assert_eq!(
        deploys.len(),
        1,
        "exactly one history entry for the interrupted deploy: {v}"
    );
    assert_eq!(deploys[0]["outcome"], "succeeded");
}

#[test]
fn a_crash_during_the_gate_of_a_bad_release_reverts_after_restart() {
    let shop = Shop::new(&["1.0.0"; 3]);
    assert_eq!(shop.sluice(&["apply"]).code, 0);
    shop.set_versions(&["2.0.0"; 3]);
    shop.edit(
        "services/web/web.yaml",
        "\"demo\",",
        "\"demo\", \"--never-ready\",",
    );
    let bad = shop.commit("bad web");
    let agent = Agent::start(&shop, "1s");
    wait_for_wave(&agent, 2);
    agent.kill9();
    let agent = Agent::start(&shop, "1s");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = agent.try_status().unwrap_or_default();
        if v["inProgress"].is_null() && v["targets"]["local"]["failed"]["commit"] == bad.as_str() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never reverted: {v}\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for s in common::SERVICES {
        assert_eq!(shop.get_json(s, "/")["version"], "1.0.0", "{s}");
    }
    assert_eq!(
        shop.service_pids().len(),
        3,
        "duplicate or missing processes"
    );
    let v = agent.status();
    let kinds = common::history_kinds(&v);
    assert_eq!(
        kinds,
        ["deploy:succeeded", "deploy:failed", "revert:succeeded"],
        "{v}"
    );
}

/// The releases the crash-point harness rolls out, each killed after every
/// write of the store in turn.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Release {
    /// All three services move on; every gate passes.
    Good,
    /// orders (rolling, no canary) exits at start, after catalog's wave was
    /// applied: caught by the crash-loop check, reverted.
    FailedWave,
    /// catalog is a canary that never becomes ready: the canary step fails
    /// at its gate timeout, traffic stays on the baseline, reverted.
    NeverReadyCanary,
    /// catalog is a canary answering every request with an error while
    /// clients send traffic through its route: the analysis aborts it,
    /// reverted.
    FailingCanary,
}

impl Release {
    fn fails(self) -> bool {
        self != Release::Good
    }
}

/// A client loop through a route until stopped (the failing canary needs
/// traffic to be judged).
struct Traffic {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Traffic {
    fn start(port: u16) -> Traffic {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = http_get(port, "/");
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        Traffic {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Every write of the store during a rollout, one kill point each:
/// `SLUICE_CRASH_AFTER_WRITE=N` aborts `sluice apply` right after its Nth
/// write of the state or the history (no unwinding, children left running,
/// as kill -9 would leave them), then a plain `sluice apply` restarts. A
/// release of all three services in three waves (see [`Release`]), so a
/// kill can land between any two steps of the rollout, a canary's steps,
/// the failure, the revert and their records. After each kill point:
/// every service answers one commit's version through its route, five
/// times out of five (the release's, or the last good one's when it
/// fails), one process and one supervisor per service and one router, the
/// status healthy with nothing in progress, and each deploy and revert in
/// the history exactly once. Returns the number of kill points.
fn kill_after_each_write(release: Release) -> usize {
    let shop = Shop::new(&["1.0.0"; 3]);
    if matches!(release, Release::NeverReadyCanary | Release::FailingCanary) {
        shop.edit(
            "sluice.yaml",
            "  catalog:\n    path: services/catalog\n",
            "  catalog:\n    path: services/catalog\n    strategy: canary\n    gateTimeout: 3s\n    canary:\n      steps: [50, 100]\n      interval: 1s\n    analysis:\n      minRequests: 20\n",
        );
        shop.commit("catalog is a canary");
    }
    assert_eq!(shop.sluice(&["apply"]).code, 0);
    let flag = match release {
        Release::Good => None,
        Release::FailedWave => Some(("orders", "\"--fail-start\",")),
        Release::NeverReadyCanary => Some(("catalog", "\"--never-ready\",")),
        Release::FailingCanary => Some(("catalog", "\"--error-rate\", \"1.0\",")),
    };
    if let Some((service, flag)) = flag {
        shop.edit(
            &format!("services/{service}/{service}.yaml"),
            "\"demo\",",
            &format!("\"demo\", {flag}"),
        );
    }
    let _traffic =
        (release == Release::FailingCanary).then(|| Traffic::start(shop.ports["catalog"]));
    let mine = |what: &str| {
        common::procs()
            .into_iter()
            .filter(|p| p.cwd.starts_with(shop.tmp.path()) && p.args.iter().any(|a| a == what))
            .count()
    };
    let mut crashed_at = Vec::new();
    for n in 1..200u32 {
        let version = format!("2.0.{n}");
        shop.set_versions(&[version.as_str(); 3]);
        shop.commit(&format!("release {version}"));
        let mut cmd = std::process::Command::new(common::SLUICE);
        cmd.arg("apply")
            .args(shop.flags())
            .env("SLUICE_CRASH_AFTER_WRITE", n.to_string());
        let out = common::run_with_timeout(cmd, Duration::from_secs(120));
        let crashed = !matches!(out.code, 0..=2);
        if crashed {
            crashed_at.push(n);
            // The restart finishes what the kill left.
            let again = shop.sluice(&["apply"]);
            assert!(
                matches!(again.code, 0 | 1),
                "{release:?}, after write {n}: {}",
                again.all()
            );
        } else {
            assert_eq!(
                out.code,
                i32::from(release.fails()),
                "{release:?}: write {n} is past the last: {}",
                out.all()
            );
        }
        let want = if release.fails() {
            "1.0.0"
        } else {
            version.as_str()
        };
        for s in common::SERVICES {
            for _ in 0..5 {
                assert_eq!(
                    shop.get_json(s, "/")["version"],
                    want,
                    "{release:?}: {s} after a kill at write {n}"
                );
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while (mine("demo"), mine("supervise")) != (3, 4) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(
            (mine("demo"), mine("supervise")),
            (3, 4),
            "{release:?}: duplicate or missing processes or supervisors after write {n}"
        );
        let status = shop.sluice(&["status", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
        assert!(
            v["inProgress"].is_null(),
            "{release:?}, after write {n}: {}",
            status.stdout
        );
        for r in v["resources"]["local"].as_array().unwrap() {
            assert_eq!(r["health"], "healthy", "{release:?}, after write {n}: {r}");
        }
        let history = v["history"].as_array().unwrap();
        let count = |kind: &str, outcome: &str| {
            history
                .iter()
                .filter(|e| e["kind"] == kind && e["outcome"] == outcome)
                .count()
        };
        let n = n as usize;
        let (failed, reverts, succeeded) = if release.fails() {
            (n, n, 1)
        } else {
            (0, 0, n + 1)
        };
        assert_eq!(
            (
                count("deploy", "failed"),
                count("revert", "succeeded"),
                count("deploy", "succeeded")
            ),
            (failed, reverts, succeeded),
            "{release:?}, after write {n}: {}",
            status.stdout
        );
        if !crashed {
            break;
        }
    }
    assert!(
        crashed_at.len() >= 5,
        "too few store writes to test: {crashed_at:?}"
    );
    crashed_at.len()
}

#[test]
fn a_failed_rollout_killed_after_each_store_write_converges() {
    let points = kill_after_each_write(Release::FailedWave);
    eprintln!("failed wave: {points} kill points tried, all converged");
}

#[test]
fn a_good_rollout_killed_after_each_store_write_converges() {
    let points = kill_after_each_write(Release::Good);
    eprintln!("good rollout: {points} kill points tried, all converged");
}

#[test]
fn a_never_ready_canary_killed_after_each_store_write_converges() {
    let points = kill_after_each_write(Release::NeverReadyCanary);
    eprintln!("never-ready canary: {points} kill points tried, all converged");
}

#[test]
fn a_canary_failing_analysis_killed_after_each_store_write_converges() {
    let points = kill_after_each_write(Release::FailingCanary);
    eprintln!("canary failing analysis: {points} kill points tried, all converged");
}

/// A damaged store is said, not silent: an unreadable history line is
/// skipped with a warning naming it, and a state.json that was deleted
/// while the history records deployments is reported as lost.
#[test]
fn a_damaged_store_is_reported() {
    let shop = Shop::new(&["1.0.0"; 3]);
    assert_eq!(shop.sluice(&["apply"]).code, 0);
    let history = shop.state().join("history.jsonl");
    let mut text = std::fs::read_to_string(&history).unwrap();
    text.push_str("{not json\n");
    std::fs::write(&history, text).unwrap();
    let out = shop.sluice(&["status"]);
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(
        out.stderr.contains("unreadable history line skipped") && out.stderr.contains("line=2"),
        "{}",
        out.all()
    );
    std::fs::remove_file(shop.state().join("state.json")).unwrap();
    let out = shop.sluice(&["apply"]);
    assert!(
        out.stderr.contains("state store lost") && out.stderr.contains("1 deployment(s)"),
        "{}",
        out.all()
    );
}

/// An unreadable state.json is moved aside, not fatal and not silent: the
/// next apply rebuilds the inventory from what the host target recorded
/// applying (its own records, its running instances), so a File the new
/// commit removes is still pruned; the last good commit comes back from
/// the history. Status says so while it lasts; nothing is lost.
#[test]
fn an_unreadable_state_is_moved_aside_and_the_inventory_rebuilt() {
    let shop = Shop::new(&["1.0.0"; 3]);
    shop.write(
        "services/web/banner.yaml",
        &shop.file_manifest("banner", "banner.txt", "hello"),
    );
    shop.commit("banner");
    assert_eq!(shop.sluice(&["apply"]).code, 0);
    let banner = shop.file_root().join("local/banner.txt");
    assert!(banner.exists(), "{}", banner.display());
    std::fs::write(shop.state().join("state.json"), "{\"targets\": [garbage").unwrap();
    // Before the agent runs again, status names the damage.
    let out = shop.sluice(&["status"]);
    assert!(out.all().contains("state.json"), "{}", out.all());
    shop.remove("services/web/banner.yaml");
    shop.commit("no banner");
    let out = shop.sluice(&["apply"]);
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(
        out.stderr.contains("state store unreadable")
            && out.stderr.contains("inventory rebuilt from the marks"),
        "{}",
        out.all()
    );
    assert!(!banner.exists(), "the removed File was not pruned");
    let aside: Vec<_> = std::fs::read_dir(shop.state())
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("state.json.unreadable-")
        })
        .collect();
    assert_eq!(aside.len(), 1, "the damaged state was not kept aside");
    let status = shop.sluice(&["status", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert!(v["storeLost"].is_null(), "{}", status.stdout);
    assert!(
        v["targets"]["local"]["lastGood"]["commit"].is_string(),
        "{}",
        status.stdout
    );
    assert_eq!(
        common::history_kinds(&v),
        ["deploy:succeeded", "deploy:succeeded"],
        "{}",
        status.stdout
    );
}

/// Damaged records of the host target are repaired from what runs, never
/// read as "nothing": with web's instance record and the resource records
/// emptied, a release of catalog keeps web routed (every request through
/// its route answered), starts no second web, and the records come back.
#[test]
fn emptied_instance_and_resource_records_are_repaired_from_what_runs() {
    let shop = Shop::new(&["1.0.0"; 3]);
    assert_eq!(shop.sluice(&["apply"]).code, 0);
    let web = shop.service_pids()["web"];
    let instances = shop.state().join("host/local/instances");
    let web_record = std::fs::read_dir(&instances)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            let n = p.file_name().unwrap().to_string_lossy().to_string();
            n.starts_with("web") && n.ends_with(".json") && !n.ends_with(".state.json")
        })
        .expect("web's instance record");
    std::fs::write(&web_record, "").unwrap();
    std::fs::write(shop.state().join("host/local/resources.json"), "").unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let probe = {
        let (stop, port) = (stop.clone(), shop.ports["web"]);
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0, 0);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match http_get(port, "/") {
                    Ok((200, _)) => ok += 1,
                    _ => failed += 1,
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            (ok, failed)
        })
    };
    shop.set_versions(&["2.0.0", "1.0.0", "1.0.0"]);
    shop.commit("catalog 2.0.0");
    let out = shop.sluice(&["apply"]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = probe.join().unwrap();
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(ok > 20, "{ok} requests answered");
    assert_eq!(
        failed,
        0,
        "web's route failed {failed} of {} requests\n{}",
        ok + failed,
        out.all()
    );
    assert!(
        out.stderr.contains("resource records unreadable"),
        "{}",
        out.all()
    );
    assert_eq!(shop.service_pids()["web"], web, "web was started again");
    assert_eq!(shop.get_json("catalog", "/")["version"], "2.0.0");
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&web_record).unwrap()).expect("record restored");
    assert_eq!(record["resource"], "web");
}

/// A tmpfs of its own (as root; CI runs as root), unmounted on drop.
struct SmallDisk {
    at: std::path::PathBuf,
}

impl SmallDisk {
    fn mount(at: &std::path::Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(at).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .expect("mount");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallDisk {
            at: at.to_path_buf(),
        }
    }

    /// Fills the disk to the last byte; the filler is removed by `free`.
    fn fill(&self) {
        let filler = self.at.join("filler");
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 64 * 1024];
        use std::io::Write;
        while f.write_all(&block).is_ok() {}
        let _ = f.write_all(&[0]);
        let _ = f.sync_all();
    }

    fn free(&self) {
        let _ = std::fs::remove_file(self.at.join("filler"));
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.at)
            .status();
    }
}

/// A full disk in the middle of a rollout: the host target's records, the
/// supervisors' records and the router's persisted configuration live on
/// a small tmpfs that fills up once 1.0.0 runs. The release of 2.0.0 fails
/// with a clear "No space left on device"; once space is freed, the next
/// reconcile converges to one whole commit (the last good one: the failed
/// commit is not retried): every route serves 1.0.0 five times out of
/// five, one process and supervisor each, status healthy, no drift.
#[test]
fn a_full_disk_mid_rollout_converges_once_space_is_back() {
    if nix::unistd::Uid::effective().as_raw() != 0 {
        eprintln!("needs root to mount a tmpfs (CI runs as root): not run");
        return;
    }
    full_disk(false);
    full_disk(true);
}

/// The disk fills before the rollout (`mid`: false: the first write of
/// the new release fails) or in its first wave, once catalog 2.0.0 runs
/// (`mid`: the switch of the routes to it fails).
fn full_disk(mid: bool) {
    let shop = Shop::new(&["1.0.0"; 3]);
    let disk = SmallDisk::mount(&shop.state().join("host"), "8m");
    assert_eq!(shop.sluice(&["apply"]).code, 0);
    shop.set_versions(&["2.0.0"; 3]);
    // catalog 2.0.0 takes 2 s to become ready: its records are written,
    // then the disk fills, then the router is to switch to it.
    shop.edit(
        "services/catalog/catalog.yaml",
        "\"demo\",",
        "\"demo\", \"--ready-after-ms\", \"2000\",",
    );
    shop.commit("2.0.0 on a full disk");
    if !mid {
        disk.fill();
    }
    let mut cmd = std::process::Command::new(common::SLUICE);
    cmd.arg("apply").args(shop.flags());
    let apply = std::thread::spawn(move || common::run_with_timeout(cmd, Duration::from_secs(120)));
    let instances = shop.state().join("host/local/instances");
    let deadline = Instant::now() + Duration::from_secs(30);
    while mid
        && !std::fs::read_dir(&instances).unwrap().flatten().any(|e| {
            let n = e.file_name().to_string_lossy().to_string();
            n.starts_with("catalog-2.0.0") && n.ends_with(".state.json")
        })
    {
        assert!(Instant::now() < deadline, "catalog 2.0.0 never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    disk.fill();
    let out = apply.join().unwrap();
    assert_ne!(out.code, 0, "{}", out.all());
    assert!(
        out.all().contains("No space left on device"),
        "{}",
        out.all()
    );
    // The router kept serving what it could persist: 1.0.0.
    for _ in 0..5 {
        assert_eq!(
            shop.get_json("catalog", "/")["version"],
            "1.0.0",
            "{}",
            out.all()
        );
    }
    eprintln!(
        "on a full disk ({}): {}",
        if mid {
            "mid-wave"
        } else {
            "before the rollout"
        },
        out.all()
            .lines()
            .rev()
            .find(|l| l.contains("No space"))
            .unwrap_or("")
    );
    disk.free();
    let again = shop.sluice(&["apply"]);
    assert!(matches!(again.code, 0 | 1), "{}", again.all());
    let mine = |what: &str| {
        common::procs()
            .into_iter()
            .filter(|p| p.cwd.starts_with(shop.tmp.path()) && p.args.iter().any(|a| a == what))
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while (mine("demo"), mine("supervise")) != (3, 4) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        (mine("demo"), mine("supervise")),
        (3, 4),
        "{}\n--- status\n{}\n--- the first apply\n{}\n{:?}",
        again.all(),
        shop.sluice(&["status"]).all(),
        out.all(),
        common::procs()
            .into_iter()
            .filter(|p| p.cwd.starts_with(shop.tmp.path()))
            .map(|p| p.args.join(" "))
            .collect::<Vec<_>>()
    );
    for s in common::SERVICES {
        for _ in 0..5 {
            assert_eq!(
                shop.get_json(s, "/")["version"],
                "1.0.0",
                "{s}\n{}",
                again.all()
            );
        }
    }
    let status = shop.sluice(&["status", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert!(v["inProgress"].is_null(), "{}", status.stdout);
    for r in v["resources"]["local"].as_array().unwrap() {
        assert_eq!(r["health"], "healthy", "{r}");
    }
    let drift = shop.sluice(&["drift", "-o", "json"]);
    assert_eq!(drift.code, 0, "{}", drift.all());
    assert!(
        !drift.stdout.contains("\"modified\"") && !drift.stdout.contains("\"missing\""),
        "{}",
        drift.stdout
    );
    drop(disk);
}
