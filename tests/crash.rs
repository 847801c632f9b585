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

/// Every write of the store during a rollout, one kill point each:
/// `SLUICE_CRASH_AFTER_WRITE=N` aborts `sluice apply` right after its Nth
/// write of the state or the history (no unwinding, children left running,
/// as kill -9 would leave them), then a plain `sluice apply` restarts. A
/// release of all three services in three waves; with `failing`, orders
/// exits at start (caught by the crash-loop check) after catalog's wave
/// was applied, so a kill can land between any two steps of the rollout,
/// the failure, the revert and their records. After each kill point:
/// every service answers one commit's version (the release's, or the last
/// good one's when it fails), one process per service, nothing in
/// progress, and each deploy and revert in the history exactly once.
/// Returns the number of kill points.
fn kill_after_each_write(failing: bool) -> usize {
    let shop = Shop::new(&["1.0.0"; 3]);
    assert_eq!(shop.sluice(&["apply"]).code, 0);
    if failing {
        shop.edit(
            "services/orders/orders.yaml",
            "\"demo\",",
            "\"demo\", \"--fail-start\",",
        );
    }
    let demo_processes = || {
        common::procs()
            .into_iter()
            .filter(|p| p.cwd.starts_with(shop.tmp.path()) && p.args.iter().any(|a| a == "demo"))
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
                "after write {n}: {}",
                again.all()
            );
        } else {
            assert_eq!(
                out.code,
                i32::from(failing),
                "write {n} is past the last: {}",
                out.all()
            );
        }
        let want = if failing { "1.0.0" } else { version.as_str() };
        for s in common::SERVICES {
            assert_eq!(
                shop.get_json(s, "/")["version"],
                want,
                "{s} after a kill at write {n}"
            );
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while demo_processes() != 3 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(
            demo_processes(),
            3,
            "duplicate or missing processes after write {n}"
        );
        let status = shop.sluice(&["status", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
        assert!(
            v["inProgress"].is_null(),
            "after write {n}: {}",
            status.stdout
        );
        let history = v["history"].as_array().unwrap();
        let count = |kind: &str, outcome: &str| {
            history
                .iter()
                .filter(|e| e["kind"] == kind && e["outcome"] == outcome)
                .count()
        };
        let n = n as usize;
        let (failed, reverts, succeeded) = if failing { (n, n, 1) } else { (0, 0, n + 1) };
        assert_eq!(
            count("deploy", "failed"),
            failed,
            "after write {n}: {}",
            status.stdout
        );
        assert_eq!(
            count("revert", "succeeded"),
            reverts,
            "after write {n}: {}",
            status.stdout
        );
        assert_eq!(
            count("deploy", "succeeded"),
            succeeded,
            "after write {n}: {}",
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
    let points = kill_after_each_write(true);
    eprintln!("failed rollout: {points} kill points tried, all converged");
}

#[test]
fn a_good_rollout_killed_after_each_store_write_converges() {
    let points = kill_after_each_write(false);
    eprintln!("good rollout: {points} kill points tried, all converged");
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
