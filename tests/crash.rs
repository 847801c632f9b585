//! kill -9 of the agent in the middle of a rollout, then a restart: the
//! live state converges to one whole commit (the new one if its gates pass,
//! else the last good one), with no duplicate processes and no lost history.
//! (A crash in the middle of a revert is covered by the engine's own tests,
//! where the crash point can be placed exactly.)

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
