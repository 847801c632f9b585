//! End to end on the host target, with real parts only: git repositories
//! made by the test, the `sluice` binary, its supervisor, router and demo
//! service as real processes, HTTP on 127.0.0.1.

#[path = "common/mod.rs"]
mod common;

use std::time::Duration;

use common::{Agent, Shop};

#[test]
fn apply_brings_the_shop_up_and_processes_outlive_the_agent() {
    let shop = Shop::new(&["1.0.0"; 3]);
    let out = shop.sluice(&["apply"]);
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(out.stdout.contains("Applied"), "{}", out.all());
    // The one-shot apply has exited; the services keep serving.
    let body = shop.get_json("web", "/");
    assert_eq!(body["version"], "1.0.0", "{body}");
    assert_eq!(shop.get_json("catalog", "/")["service"], "catalog");
    let pids = shop.service_pids();
    assert_eq!(pids.len(), 3, "{pids:?}");

    // Applying the same commit again changes nothing.
    let again = shop.sluice(&["apply"]);
    assert_eq!(again.code, 0, "{}", again.all());
    assert!(
        again.stdout.contains("nothing to change"),
        "{}",
        again.all()
    );
    assert_eq!(shop.service_pids(), pids);

    let status = shop.sluice(&["status", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&status.stdout).expect("status json");
    let commit = shop.head();
    assert_eq!(v["targets"]["local"]["applied"]["commit"], commit.as_str());
    assert!(v["targets"]["local"]["applied"]["digest"]
        .as_str()
        .unwrap()
        .starts_with("sha256:"));
    let healths: Vec<_> = v["resources"]["local"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["health"].as_str().unwrap().to_string())
        .collect();
    assert!(healths.iter().all(|h| h == "healthy"), "{healths:?}");
    assert_eq!(v["history"].as_array().unwrap().len(), 1);
}

#[test]
fn a_new_commit_is_live_within_one_poll_in_dependency_order() {
    let shop = Shop::new(&["1.0.0"; 3]);
    let agent = Agent::start(&shop, "1s");
    shop.wait_version("web", "1.0.0", Duration::from_secs(60));
    shop.set_versions(&["2.0.0"; 3]);
    shop.commit("release 2.0.0");
    shop.wait_version("web", "2.0.0", Duration::from_secs(30));
    // Waves in dependency order, read from the processes' start times.
    let started = shop.service_start_times();
    assert!(
        started["catalog"] < started["orders"] && started["orders"] < started["web"],
        "{started:?}"
    );
    // The record follows once the last gate has passed.
    agent.wait_idle_on(&shop.head());
    // /metrics as Prometheus expects it, checked by the real promtool:
    // counters and histograms to compute rates and quantiles from, one
    // info series per target, the target synced.
    let (_, m) = common::http_get(agent.port, "/metrics").unwrap();
    let mut check = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (tests/run installs prometheus)");
    use std::io::Write as _;
    check.stdin.take().unwrap().write_all(m.as_bytes()).unwrap();
    let checked = check.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "{}{}\n{m}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    for want in [
        "sluice_deployments_total{outcome=\"succeeded\"} 2",
        "sluice_lead_time_seconds_count 2",
        "sluice_target_synced{target=\"local\"} 1",
        "sluice_reconcile_duration_seconds_bucket{le=\"+Inf\"}",
    ] {
        assert!(m.contains(want), "{want}\n{m}");
    }
    assert_eq!(m.matches("sluice_applied_commit_info{").count(), 1, "{m}");
}

#[test]
fn a_removed_resource_is_pruned_and_nothing_else() {
    let shop = Shop::new(&["1.0.0"; 3]);
    shop.write(
        "services/orders/extra.yaml",
        &shop.file_manifest("extra", "extra.txt", "hello"),
    );
    shop.commit("add a file");
    assert_eq!(shop.sluice(&["apply"]).code, 0);
    let extra = shop.file_root().join("local/extra.txt");
    assert_eq!(std::fs::read_to_string(&extra).unwrap(), "hello");
    // A file sluice did not create sits next to it.
    let mine = shop.file_root().join("local/not-sluice.txt");
    std::fs::write(&mine, "hand-made").unwrap();
    shop.remove("services/orders/extra.yaml");
    shop.commit("remove the file");
    let out = shop.sluice(&["apply"]);
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(out.stdout.contains("- local/File/extra"), "{}", out.all());
    assert!(!extra.exists());
    assert!(mine.exists());
}

#[test]
fn bad_input_is_named_and_leaves_the_live_state_as_it_was() {
    let shop = Shop::new(&["1.0.0"; 3]);
    assert_eq!(shop.sluice(&["apply"]).code, 0);
    let pids = shop.service_pids();
    let good = shop.head();
    type Breaker = Box<dyn Fn(&Shop)>;
    let cases: Vec<(&str, Breaker, &[&str])> = vec![
        (
            "malformed yaml",
            Box::new(|s| s.write("services/web/web.yaml", "apiVersion: [\n")),
            &["services/web/web.yaml:"],
        ),
        (
            "unknown field",
            Box::new(|s| s.edit("services/web/web.yaml", "readiness:", "readyness:")),
            &["services/web/web.yaml", "readyness"],
        ),
        (
            "missing path",
            Box::new(|s| {
                s.edit(
                    "sluice.yaml",
                    "path: services/web",
                    "path: services/nowhere",
                )
            }),
            &["sluice.yaml", "services.web.path", "nowhere"],
        ),
        (
            "unknown dependency",
            Box::new(|s| {
                s.edit(
                    "sluice.yaml",
                    "dependsOn: [orders]",
                    "dependsOn: [payments]",
                )
            }),
            &["sluice.yaml", "services.web.dependsOn", "payments"],
        ),
        (
            "dependency cycle",
            Box::new(|s| {
                s.edit(
                    "sluice.yaml",
                    "path: services/catalog",
                    "path: services/catalog\n    dependsOn: [web]",
                )
            }),
            &["cycle"],
        ),
        (
            "symlink outside",
            Box::new(|s| s.symlink("services/web/passwd.yaml", "/etc/passwd")),
            &["services/web/passwd.yaml", "symbolic link"],
        ),
        (
            "symlink to another service",
            Box::new(|s| s.symlink("services/web/stolen.yaml", "../orders/orders.yaml")),
            &["services/web/stolen.yaml", "symbolic link"],
        ),
        (
            "dot-dot path",
            Box::new(|s| s.edit("sluice.yaml", "path: services/web", "path: ../../etc")),
            &["services.web.path"],
        ),
    ];
    for (name, break_it, expect) in cases {
        break_it(&shop);
        shop.commit(name);
        let out = shop.sluice(&["apply"]);
        assert_eq!(out.code, 2, "{name}: {}", out.all());
        for e in expect {
            assert!(
                out.stderr.contains(e),
                "{name}: expected {e:?} in: {}",
                out.stderr
            );
        }
        assert!(
            !out.all().contains("root:x:0:0"),
            "{name}: leaked /etc/passwd"
        );
        assert_eq!(shop.service_pids(), pids, "{name}: live processes changed");
        assert_eq!(shop.get_json("web", "/")["version"], "1.0.0");
        let status = shop.sluice(&["status", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
        assert_eq!(
            v["targets"]["local"]["applied"]["commit"],
            good.as_str(),
            "{name}"
        );
        assert!(
            v["lastError"]
                .as_str()
                .is_some_and(|e| e.contains(expect[0])),
            "{name}: {v}"
        );
        shop.reset_to(&good);
    }
}

#[test]
fn kill_9_of_the_agent_and_a_restart_adopt_the_running_processes() {
    let shop = Shop::new(&["1.0.0"; 3]);
    let agent = Agent::start(&shop, "1s");
    shop.wait_version("web", "1.0.0", Duration::from_secs(60));
    agent.wait_idle();
    let pids = shop.service_pids();
    let routers = shop.router_pids();
    assert_eq!(routers.len(), 1, "{routers:?}");
    agent.kill9();
    // Traffic keeps flowing with no agent at all.
    assert_eq!(shop.get_json("web", "/")["version"], "1.0.0");
    let agent = Agent::start(&shop, "1s");
    agent.wait_idle();
    assert_eq!(
        shop.service_pids(),
        pids,
        "a restart must adopt, not restart"
    );
    assert_eq!(shop.router_pids(), routers);
    // And it still rolls forward.
    shop.set_versions(&["1.0.0", "1.0.0", "1.1.0"]);
    shop.commit("web 1.1.0");
    shop.wait_version("web", "1.1.0", Duration::from_secs(30));
    assert_eq!(shop.service_pids().len(), 3, "no duplicates after the roll");
}

#[test]
fn a_bad_release_in_wave_2_reverts_wave_1_and_never_touches_wave_3() {
    let shop = Shop::new(&["1.0.0"; 3]);
    assert_eq!(shop.sluice(&["apply"]).code, 0);
    let web_pid = shop.service_pids()["web"];
    shop.set_versions(&["2.0.0"; 3]);
    shop.edit(
        "services/orders/orders.yaml",
        "\"demo\",",
        "\"demo\", \"--never-ready\",",
    );
    let bad = shop.commit("bad orders");
    let out = shop.sluice(&["apply"]);
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(
        out.stdout.contains("FAILED") && out.stdout.contains("Reverted"),
        "{}",
        out.all()
    );
    assert_eq!(shop.get_json("catalog", "/")["version"], "1.0.0");
    assert_eq!(shop.get_json("orders", "/")["version"], "1.0.0");
    assert_eq!(shop.service_pids()["web"], web_pid, "wave 3 was touched");
    // Not retried.
    let again = shop.sluice(&["apply"]);
    assert_eq!(again.code, 1);
    assert!(again.stdout.contains("not retried"), "{}", again.all());
    let v: serde_json::Value =
        serde_json::from_str(&shop.sluice(&["status", "-o", "json"]).stdout).unwrap();
    assert_eq!(v["targets"]["local"]["failed"]["commit"], bad.as_str());
    let kinds = common::history_kinds(&v);
    assert_eq!(
        kinds,
        ["deploy:succeeded", "deploy:failed", "revert:succeeded"]
    );
    assert!(v["history"][1]["decision"]["measurement"]
        .as_str()
        .unwrap()
        .contains("orders"));
    // Status says what to revert so git says again what is live.
    let text = shop.sluice(&["status"]);
    assert!(
        text.stdout.contains(&format!("git revert {bad}")),
        "{}",
        text.all()
    );
    assert!(
        text.stdout.contains("Last abort: wave 2, gate apply"),
        "{}",
        text.all()
    );
    // A deliberate retry runs it again, and says so in the history.
    let retry = shop.sluice(&["apply", "--retry"]);
    assert_eq!(retry.code, 1, "{}", retry.all());
    let v: serde_json::Value =
        serde_json::from_str(&shop.sluice(&["status", "-o", "json"]).stdout).unwrap();
    let retried = v["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["retry"] == true)
        .count();
    assert_eq!(retried, 1, "{v}");
    assert_eq!(shop.get_json("orders", "/")["version"], "1.0.0");
    // A newer good commit rolls forward.
    shop.edit(
        "services/orders/orders.yaml",
        "\"demo\", \"--never-ready\",",
        "\"demo\",",
    );
    shop.commit("fix orders");
    assert_eq!(shop.sluice(&["apply"]).code, 0);
    assert_eq!(shop.get_json("web", "/")["version"], "2.0.0");
}

#[test]
fn revert_to_a_commit_by_hand() {
    let shop = Shop::new(&["1.0.0"; 3]);
    assert_eq!(shop.sluice(&["apply"]).code, 0);
    let first = shop.head();
    shop.set_versions(&["2.0.0"; 3]);
    shop.commit("2.0.0");
    assert_eq!(shop.sluice(&["apply"]).code, 0);
    assert_eq!(shop.get_json("web", "/")["version"], "2.0.0");
    let out = shop.sluice(&["revert", "--to", &first[..12]]);
    assert_eq!(out.code, 0, "{}", out.all());
    assert_eq!(shop.get_json("web", "/")["version"], "1.0.0");
    // The loop does not undo a revert by hand.
    let again = shop.sluice(&["apply"]);
    assert_eq!(again.code, 1, "{}", again.all());
    assert_eq!(shop.get_json("web", "/")["version"], "1.0.0");
}

#[test]
fn plan_shows_waves_and_field_paths_and_changes_nothing() {
    let shop = Shop::new(&["1.0.0"; 3]);
    let first = shop.sluice(&["plan", "-o", "json"]);
    assert_eq!(first.code, 0, "{}", first.all());
    let v: serde_json::Value = serde_json::from_str(&first.stdout).unwrap();
    let waves: Vec<_> = v["waves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["services"][0].as_str().unwrap().to_string())
        .collect();
    assert_eq!(waves, ["catalog", "orders", "web"]);
    assert!(shop.service_pids().is_empty(), "plan started something");

    assert_eq!(shop.sluice(&["apply"]).code, 0);
    let pids = shop.service_pids();
    shop.set_versions(&["1.0.0", "1.1.0", "1.0.0"]);
    shop.commit("orders 1.1.0");
    let out = shop.sluice(&["plan", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["waves"].as_array().unwrap().len(), 1, "{v}");
    let change = &v["waves"][0]["changes"][0];
    assert_eq!(change["action"], "update");
    assert_eq!(change["id"]["name"], "orders");
    assert_eq!(change["fields"][0]["path"], "spec.version");
    assert_eq!(change["fields"][0]["old"], "1.0.0");
    assert_eq!(change["fields"][0]["new"], "1.1.0");
    let text = shop.sluice(&["plan"]);
    assert!(
        text.stdout.contains("~ local/Process/orders")
            && text.stdout.contains("spec.version: \"1.0.0\" → \"1.1.0\""),
        "{}",
        text.all()
    );
    assert_eq!(shop.service_pids(), pids);
}

#[test]
fn a_deny_window_holds_the_rollout_and_an_override_is_recorded() {
    let shop = Shop::new(&["1.0.0"; 3]);
    shop.edit(
        "sluice.yaml",
        "targets:",
        "windows:\n  - kind: deny\n    schedule: \"0 * * * * *\"\n    duration: 2m\n    timeZone: Europe/Berlin\ntargets:",
    );
    shop.commit("freeze");
    let out = shop.sluice(&["apply"]);
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(
        out.stdout.contains("waits for a sync window") && out.stdout.contains("deny window"),
        "{}",
        out.all()
    );
    assert!(
        shop.service_pids().is_empty(),
        "something rolled out in a deny window"
    );
    let status = shop.sluice(&["status"]);
    assert!(status.stdout.contains("Waiting:"), "{}", status.all());
    let forced = shop.sluice(&["apply", "--override"]);
    assert_eq!(forced.code, 0, "{}", forced.all());
    let v: serde_json::Value =
        serde_json::from_str(&shop.sluice(&["status", "-o", "json"]).stdout).unwrap();
    assert_eq!(v["history"][0]["windowOverride"], true, "{v}");
    assert!(v["waiting"].is_null());
}

/// `sluice down` takes everything sluice created off the host: without
/// --yes it only says what it would remove; with it, services, supervisors
/// and the router are gone, the route ports refuse connections, the
/// history says so, and `sluice revert` brings the last good commit back.
#[test]
fn down_removes_everything_sluice_created_and_revert_brings_it_back() {
    let shop = Shop::new(&["1.0.0"; 3]);
    assert_eq!(shop.sluice(&["apply"]).code, 0);
    let ours = || {
        common::procs()
            .into_iter()
            .filter(|p| {
                p.args
                    .iter()
                    .any(|a| a.starts_with(&shop.tmp.path().display().to_string()))
                    || p.cwd.starts_with(shop.tmp.path())
            })
            .count()
    };
    assert!(
        ours() >= 7,
        "three services, their supervisors and the router"
    );
    let dry = shop.sluice(&["down"]);
    assert_eq!(dry.code, 0, "{}", dry.all());
    assert!(
        dry.stdout.contains("Would remove 6 resource(s)"),
        "{}",
        dry.all()
    );
    assert_eq!(shop.get_json("web", "/")["version"], "1.0.0");
    // Reverse wave order: web's resources first, catalog's last.
    let web = dry
        .stdout
        .find("Wave 1")
        .and_then(|w| dry.stdout[w..].find("web"));
    assert!(web.is_some(), "{}", dry.stdout);
    let out = shop.sluice(&["down", "--yes"]);
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(
        out.stdout.contains("Took down 6 resource(s)."),
        "{}",
        out.all()
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while ours() > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(ours(), 0, "processes of sluice's left running");
    for s in common::SERVICES {
        assert!(shop.get(s, "/").is_err(), "{s} still answers");
    }
    let status = shop.sluice(&["status", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    let last = v["history"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        (last["kind"].as_str(), last["outcome"].as_str()),
        (Some("down"), Some("succeeded"))
    );
    // Again: nothing left to take down.
    let again = shop.sluice(&["down", "--yes"]);
    assert!(
        again.stdout.contains("Nothing of sluice's"),
        "{}",
        again.all()
    );
    // The last good commit is still known: revert brings the shop back.
    let back = shop.sluice(&["revert"]);
    assert_eq!(back.code, 0, "{}", back.all());
    assert_eq!(shop.get_json("web", "/")["version"], "1.0.0");
}

/// kill -9 of a service's supervisor leaves its process running: it keeps
/// serving and stays routed through the next rollout (which re-syncs every
/// route), and that reconcile adopts it with a new supervisor, which
/// restarts it when it exits.
#[test]
fn a_process_whose_supervisor_was_killed_stays_routed() {
    let shop = Shop::new(&["1.0.0"; 3]);
    assert_eq!(shop.sluice(&["apply"]).code, 0);
    let supervisor = common::procs()
        .into_iter()
        .find(|p| {
            p.args.iter().any(|a| a == "supervise")
                && p.args.iter().any(|a| a.contains("/web-"))
                && p.args
                    .iter()
                    .any(|a| a.starts_with(&shop.state().display().to_string()))
        })
        .expect("web's supervisor");
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &supervisor.pid.to_string()])
        .status();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(shop.get_json("web", "/")["version"], "1.0.0");
    // A release of catalog only: its wave re-syncs the router's routes.
    let port = shop.ports["web"];
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0, 0);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match common::http_get(port, "/") {
                    Ok((200, _)) => ok += 1,
                    _ => failed += 1,
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            (ok, failed)
        })
    };
    shop.set_versions(&["1.1.0", "1.0.0", "1.0.0"]);
    shop.commit("catalog 1.1.0");
    let out = shop.sluice(&["apply"]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = watcher.join().unwrap();
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(ok > 0 && failed == 0, "{ok} answered, {failed} failed");
    // The apply adopted web's process with a new supervisor: the same
    // process (no second copy), supervised again, and restarted by it when
    // it exits.
    assert!(out.stderr.contains("adopted again"), "{}", out.all());
    let web = shop.service_pids()["web"];
    let webs = common::procs()
        .into_iter()
        .filter(|p| {
            p.args.iter().any(|a| a == "demo")
                && p.args.windows(2).any(|w| w == ["--name", "web"])
                && p.cwd.starts_with(shop.tmp.path())
        })
        .count();
    assert_eq!(webs, 1, "a second copy of web");
    let status = shop.sluice(&["status"]);
    assert!(
        !status.stdout.contains("supervisor of web-"),
        "{}",
        status.all()
    );
    shop.kill_service("web");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while shop.service_pids().get("web").is_none_or(|p| *p == web)
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_ne!(shop.service_pids().get("web"), Some(&web), "not restarted");
    shop.wait_version("web", "1.0.0", Duration::from_secs(10));
}
