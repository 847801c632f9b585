//! Policies end to end: a `deny` from a guardrail (shipped or the
//! repository's own conftest-style policy) blocks the rollout and leaves the
//! live system exactly as it was; `sluice policy test` exits non-zero on a
//! deny; fixing the commit lets it roll out. Real git, real processes.

#[path = "common/mod.rs"]
mod common;

use common::Shop;

const TEAM_POLICY: &str = "package main\n\n# Rego v0, as written for conftest.\ndeny[msg] {\n  input.kind == \"Process\"\n  not input.metadata.labels.team\n  msg := sprintf(\"Process %s needs a team label\", [input.metadata.name])\n}\n";

#[test]
fn a_deny_blocks_the_rollout_and_live_stays_as_it_was() {
    let shop = Shop::new(&["1.0.0"; 3]);
    assert_eq!(shop.sluice(&["apply"]).code, 0);
    let pids = shop.service_pids();

    // A new release of catalog, plus a repository policy that web breaks.
    shop.set_versions(&["2.0.0", "1.0.0", "1.0.0"]);
    shop.write("policies/team.rego", TEAM_POLICY);
    for s in ["catalog", "orders"] {
        shop.edit(
            &format!("services/{s}/{s}.yaml"),
            &format!("  name: {s}\nspec:\n  command"),
            &format!("  name: {s}\n  labels:\n    team: shop\nspec:\n  command"),
        );
    }
    // And a shipped guardrail: `latest` is a mutable version.
    shop.edit(
        "services/web/web.yaml",
        "version: \"1.0.0\"",
        "version: latest",
    );
    let bad = shop.commit("catalog 2.0.0; web on latest without a team");

    let test = shop.sluice(&["policy", "test"]);
    assert_eq!(test.code, 1, "{}", test.all());
    assert!(
        test.stdout.contains("Process web needs a team label"),
        "{}",
        test.stdout
    );
    assert!(test.stdout.contains("data.main.deny"), "{}", test.stdout);
    assert!(
        test.stdout.contains("data.sluice.guardrails.images.deny")
            && test.stdout.contains("version \"latest\" is mutable"),
        "{}",
        test.stdout
    );
    assert!(
        test.stdout.contains("policies/team.rego (repository)"),
        "{}",
        test.stdout
    );

    let plan = shop.sluice(&["plan"]);
    assert_eq!(plan.code, 0, "{}", plan.all());
    assert!(plan.stdout.contains("Policy findings"), "{}", plan.stdout);

    let apply = shop.sluice(&["apply"]);
    assert_eq!(apply.code, 2, "a deny is bad input: {}", apply.all());
    assert!(
        apply.stderr.contains("denied by policy; nothing applied")
            && apply.stderr.contains("Process web needs a team label"),
        "{}",
        apply.stderr
    );
    // Nothing changed: same processes, same versions, catalog still 1.0.0.
    assert_eq!(shop.service_pids(), pids);
    assert_eq!(shop.get_json("catalog", "/")["version"], "1.0.0");
    let status = shop.sluice(&["status", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert!(
        v["lastError"]
            .as_str()
            .is_some_and(|e| e.contains(&bad[..10]) && e.contains("denied by policy")),
        "{}",
        status.stdout
    );
    let applied = &v["targets"]["local"]["applied"]["commit"];
    assert!(applied.is_string() && applied != bad.as_str(), "{applied}");

    // Fixed: the rollout proceeds.
    shop.edit(
        "services/web/web.yaml",
        "version: latest",
        "version: \"1.0.1\"",
    );
    shop.edit(
        "services/web/web.yaml",
        "  name: web\nspec:\n  command",
        "  name: web\n  labels:\n    team: shop\nspec:\n  command",
    );
    shop.commit("pin web, label it");
    assert_eq!(shop.sluice(&["policy", "test"]).code, 0);
    let apply = shop.sluice(&["apply"]);
    assert_eq!(apply.code, 0, "{}", apply.all());
    assert_eq!(shop.get_json("catalog", "/")["version"], "2.0.0");
    assert_eq!(shop.get_json("web", "/")["version"], "1.0.1");
}

#[test]
fn policy_test_shows_the_rollout_each_service_gets_from_the_policy() {
    let shop = Shop::new(&["1.0.0"; 3]);
    shop.edit(
        "sluice.yaml",
        "    path: services/orders\n",
        "    path: services/orders\n    criticality: critical\n",
    );
    shop.write(
        "policies/rollout.yaml",
        "criticality:\n  critical:\n    strategy: bluegreen\n",
    );
    shop.commit("orders is critical; critical rolls blue-green here");
    let out = shop.sluice(&["policy", "test", "-o", "json"]);
    assert_eq!(out.code, 0, "{}", out.all());
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["denied"], false);
    assert_eq!(v["rolloutFromRepository"], true);
    assert_eq!(v["rollouts"]["orders"]["strategy"], "bluegreen");
    assert_eq!(v["rollouts"]["orders"]["analysis"]["maxErrorRatio"], 1.2);
    assert_eq!(v["rollouts"]["catalog"]["strategy"], "rolling");
    assert_eq!(v["rollouts"]["catalog"]["analysis"]["maxErrorRatio"], 1.5);

    shop.write("policies/rollout.yaml", "canary:\n  steps: [50, 10]\n");
    shop.commit("bad steps");
    let out = shop.sluice(&["policy", "test"]);
    assert_eq!(out.code, 2, "{}", out.all());
    assert!(
        out.stderr.contains("policies/rollout.yaml") && out.stderr.contains("canary.steps"),
        "{}",
        out.stderr
    );
}
