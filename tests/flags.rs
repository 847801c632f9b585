//! Feature flags: published to each host target as a flagd file; flipping
//! one changes only that file, and the running demo serves the new value
//! without a restart. Expired flags show in `sluice flags` and PR reports.

#[path = "common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{git, Shop};

fn flags(default: &str, extra: &str) -> String {
    format!(
        "apiVersion: sluice.dev/v1\nkind: Flags\nflags:\n  new-checkout:\n    kind: release\n    owner: shop-team\n    expires: 2099-12-31\n    state: enabled\n    default: {default}\n{extra}"
    )
}

#[test]
fn a_flag_flip_changes_only_the_flag_file_and_the_running_service_sees_it() {
    let shop = Shop::new(&["1.0.0"; 3]);
    shop.edit(
        "services/web/web.yaml",
        "\"demo\",",
        "\"demo\", \"--flags-file\", \"flags.json\",",
    );
    shop.write("flags.yaml", &flags("on", ""));
    shop.commit("flags");
    assert_eq!(shop.sluice(&["apply"]).code, 0);
    assert_eq!(shop.get_json("web", "/")["flags"]["new-checkout"], true);
    let pids = shop.service_pids();

    shop.write(
        "flags.yaml",
        &flags("on", "    targets:\n      local: off\n"),
    );
    shop.commit("new checkout off here");
    let plan = shop.sluice(&["plan", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&plan.stdout).unwrap();
    let changed: Vec<String> = v["waves"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|w| {
            w["changes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["id"]["name"].as_str().unwrap().to_string())
        })
        .collect();
    assert_eq!(changed, ["feature-flags"], "{}", plan.stdout);
    assert_eq!(shop.sluice(&["apply"]).code, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while shop.get_json("web", "/")["flags"]["new-checkout"] != false {
        assert!(
            Instant::now() < deadline,
            "the running service never saw the flip"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(shop.service_pids(), pids, "a flag flip restarted something");
}

#[test]
fn expired_and_invalid_flags_are_reported() {
    let shop = Shop::new(&["1.0.0"; 3]);
    shop.write("flags.yaml", &flags("on", ""));
    shop.commit("flags");
    let base = shop.head();
    git(&shop.repo(), &["checkout", "-q", "-b", "feature"]);
    shop.write(
        "flags.yaml",
        &flags("on", "").replace("2099-12-31", "2020-01-01"),
    );
    shop.commit("old flag");
    let listed = shop.sluice(&["flags"]);
    assert!(
        listed.stdout.contains("new-checkout") && listed.stdout.contains("EXPIRED"),
        "{}",
        listed.all()
    );
    let report = shop.sluice(&[
        "plan", "--base", &base, "--head", "feature", "-o", "markdown",
    ]);
    assert!(
        report.stdout.contains(
            "Expired feature flags:** `new-checkout (owner shop-team, expired 2020-01-01)`"
        ),
        "{}",
        report.all()
    );

    shop.write("flags.yaml", &flags("maybe", ""));
    shop.commit("bad default");
    let out = shop.sluice(&["apply"]);
    assert_eq!(out.code, 2, "{}", out.all());
    assert!(
        out.stderr.contains("flags.yaml") && out.stderr.contains("flags.new-checkout.default"),
        "{}",
        out.stderr
    );
}
