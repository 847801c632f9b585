//! Drift made by hand on the host target, found and healed: a managed file
//! edited, a process (its whole supervisor group) killed. Real processes,
//! real files, the real binary.

#[path = "common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{http_get, Agent, Shop};

#[test]
fn drift_is_reported_per_policy_healed_where_asked_and_shown_in_metrics() {
    let shop = Shop::new(&["1.0.0"; 3]);
    shop.write(
        "services/orders/config.yaml",
        &shop.file_manifest("orders-config", "orders.conf", "currency=EUR"),
    );
    shop.edit(
        "sluice.yaml",
        "path: services/orders\n",
        "path: services/orders\n    drift: heal\n",
    );
    shop.commit("orders config, heal drift");
    assert_eq!(shop.sluice(&["apply"]).code, 0);
    let clean = shop.sluice(&["drift", "--exit-code"]);
    assert_eq!(clean.code, 0, "{}", clean.all());

    // By hand: the config edited, web's supervisor group killed.
    let conf = shop.file_root().join("local/orders.conf");
    std::fs::write(&conf, "currency=USD").unwrap();
    shop.kill_service("web");

    let out = shop.sluice(&["drift", "-o", "json", "--exit-code"]);
    assert_eq!(out.code, 1, "{}", out.all());
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let items: Vec<String> = v[0]["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            format!(
                "{} {}",
                i["kind"].as_str().unwrap(),
                i["id"]["name"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(items, ["modified orders-config", "missing web"], "{v}");
    let fields = &v[0]["items"][0]["fields"][0];
    assert_eq!(fields["path"], "spec.content");
    assert_eq!(
        (fields["old"].as_str(), fields["new"].as_str()),
        (Some("currency=USD"), Some("currency=EUR"))
    );

    let md = shop.sluice(&["drift", "-o", "markdown"]);
    assert!(
        md.stdout.contains("modified local/File/orders-config"),
        "{}",
        md.all()
    );

    // Heal: only where the service says so.
    let healed = shop.sluice(&["drift", "--heal", "-o", "json"]);
    assert_eq!(healed.code, 0, "{}", healed.all());
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), "currency=EUR");
    assert!(
        shop.get("web", "/").map(|(c, _)| c != 200).unwrap_or(true),
        "web was healed against its policy"
    );
    let status: serde_json::Value =
        serde_json::from_str(&shop.sluice(&["status", "-o", "json"]).stdout).unwrap();
    assert_eq!(
        status["history"].as_array().unwrap().last().unwrap()["kind"],
        "heal"
    );
    let drift = status["drift"]["items"]["local"].as_array().unwrap();
    assert_eq!(drift.len(), 1, "{status}");
    assert!(drift[0]
        .as_str()
        .unwrap()
        .starts_with("missing local/Process/web"));

    // The agent scans on its own schedule and exports the count; the loop
    // itself leaves drift to that policy (web stays missing: "report").
    let before = status["drift"]["at"].as_str().unwrap().to_string();
    let agent = Agent::start_with(&shop, &["--interval", "1h", "--drift-interval", "1s"], &[]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let scanned = agent
            .try_status()
            .and_then(|s| s["drift"]["at"].as_str().map(str::to_string));
        if scanned.is_some_and(|at| at > before) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agent never scanned\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (_, m) = http_get(agent.port, "/metrics").unwrap();
    assert!(
        m.contains("sluice_drift_resources{target=\"local\"} 1")
            && m.contains("sluice_heals_total{outcome=\"succeeded\"} 1")
            && m.contains(
                "sluice_service_health{target=\"local\",service=\"web\",status=\"missing\"} 1"
            )
            && m.contains("sluice_service_synced{target=\"local\",service=\"web\"} 0")
            && m.contains("sluice_service_synced{target=\"local\",service=\"catalog\"} 1"),
        "{m}"
    );
    assert!(
        shop.get("web", "/").map(|(c, _)| c != 200).unwrap_or(true),
        "the loop healed a report-only service"
    );
}

#[test]
fn a_replaced_executable_is_drift_in_what_the_process_runs() {
    let shop = Shop::new(&["1.0.0"; 3]);
    let bin = shop.tmp.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let app = bin.join("app");
    std::fs::copy("/bin/sleep", &app).unwrap();
    shop.write(
        "services/web/app.yaml",
        &format!("apiVersion: sluice.dev/v1\nkind: Process\nmetadata:\n  name: app\nspec:\n  command: {}\n  args: [\"300\"]\n  version: \"1\"\n", app.display()),
    );
    shop.commit("app");
    assert_eq!(shop.sluice(&["apply"]).code, 0);
    assert_eq!(shop.sluice(&["drift", "--exit-code"]).code, 0);
    // By hand: a new build dropped over the running one.
    let fresh = bin.join("app.new");
    std::fs::copy("/bin/sleep", &fresh).unwrap();
    std::fs::rename(&fresh, &app).unwrap();
    let out = shop.sluice(&["drift", "-o", "json", "--exit-code"]);
    assert_eq!(out.code, 1, "{}", out.all());
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let item = &v[0]["items"][0];
    assert_eq!(
        (item["kind"].as_str(), item["id"]["name"].as_str()),
        (Some("modified"), Some("app")),
        "{v}"
    );
    assert_eq!(item["fields"][0]["path"], "spec.command");
    assert!(
        item["fields"][0]["old"]
            .as_str()
            .unwrap()
            .contains("replaced on disk"),
        "{v}"
    );
}

/// A replica that is gone (its supervisor and process killed by hand) is
/// drift: `missing`, with how many replicas run of how many; status does
/// not call the service healthy; `drift: heal` starts it again.
#[test]
fn a_killed_replica_is_missing_and_healed() {
    let shop = Shop::new(&["1.0.0"; 3]);
    shop.edit(
        "services/orders/orders.yaml",
        "  stopTimeout: 3s\n",
        "  stopTimeout: 3s\n  replicas: 2\n",
    );
    shop.edit(
        "sluice.yaml",
        "path: services/orders\n",
        "path: services/orders\n    drift: heal\n",
    );
    shop.commit("two orders");
    assert_eq!(shop.sluice(&["apply"]).code, 0);
    let orders = || -> Vec<common::Proc> {
        common::procs()
            .into_iter()
            .filter(|p| {
                p.cwd.starts_with(shop.tmp.path())
                    && p.args.iter().any(|a| a == "demo")
                    && p.args.iter().any(|a| a == "orders")
            })
            .collect()
    };
    assert_eq!(orders().len(), 2);
    let victim = &orders()[0];
    let _ = std::process::Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", victim.pgid)])
        .status();
    let deadline = Instant::now() + Duration::from_secs(5);
    while orders().len() != 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = shop.sluice(&["drift", "-o", "json", "--exit-code"]);
    assert_eq!(out.code, 1, "{}", out.all());
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let item = &v[0]["items"][0];
    assert_eq!(
        (item["kind"].as_str(), item["id"]["name"].as_str()),
        (Some("missing"), Some("orders")),
        "{v}"
    );
    assert_eq!(item["fields"][0]["path"], "spec.replicas");
    assert_eq!(
        (
            item["fields"][0]["old"].as_u64(),
            item["fields"][0]["new"].as_u64()
        ),
        (Some(1), Some(2))
    );
    let status = shop.sluice(&["status"]);
    assert!(
        status
            .stdout
            .contains("local/orders progressing NOT healthy")
            || status.stdout.contains("local/orders degraded NOT healthy"),
        "{}",
        status.all()
    );
    let healed = shop.sluice(&["drift", "--heal"]);
    assert_eq!(healed.code, 0, "{}", healed.all());
    assert_eq!(orders().len(), 2, "the replica was not started again");
    let clean = shop.sluice(&["drift", "--exit-code"]);
    assert_eq!(clean.code, 0, "{}", clean.all());
    assert!(!shop.sluice(&["status"]).stdout.contains("NOT healthy"));
}
