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

/// An ordinary repository: fifty services with long names, one File each,
/// no policies of its own. Its change context is far larger than any
/// query an engine would take as text; it plans, passes and applies.
#[test]
fn fifty_services_with_long_names_plan_pass_and_apply() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    common::git(&repo, &["init", "-q", "-b", "main"]);
    let mut topo = String::from(
        "apiVersion: sluice.dev/v1\nkind: Topology\ntargets:\n  - name: local\n    type: host\nservices:\n",
    );
    for i in 1..=50 {
        let name = format!("service-number-{i:02}-of-the-shop-front-end");
        topo.push_str(&format!("  {name}:\n    path: services/{name}\n"));
        if i > 1 {
            topo.push_str(&format!(
                "    dependsOn: [service-number-{:02}-of-the-shop-front-end]\n",
                i - 1
            ));
        }
        let dir = repo.join("services").join(&name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("file.yaml"),
            format!("apiVersion: sluice.dev/v1\nkind: File\nmetadata:\n  name: f{i:02}\nspec:\n  path: f{i:02}.conf\n  content: \"setting = {i}\\n\"\n"),
        )
        .unwrap();
    }
    std::fs::write(repo.join("sluice.yaml"), topo).unwrap();
    commit_all(&repo, "fifty services");
    let run = |args: &[&str]| {
        let mut cmd = std::process::Command::new(common::SLUICE);
        cmd.args(args)
            .arg("--repo")
            .arg(&repo)
            .arg("--state-dir")
            .arg(tmp.path().join("state"))
            .arg("--file-root")
            .arg(tmp.path().join("files"));
        common::run_with_timeout(cmd, std::time::Duration::from_secs(120))
    };
    let test = run(&["policy", "test"]);
    assert_eq!(test.code, 0, "{}", test.all());
    assert!(test.stdout.contains("0 failures"), "{}", test.stdout);
    let plan = run(&["plan"]);
    assert_eq!(plan.code, 0, "{}", plan.all());
    assert!(plan.stdout.contains("50 to create"), "{}", plan.stdout);
    let apply = run(&["apply"]);
    assert_eq!(apply.code, 0, "{}", apply.all());
    let written = std::fs::read_to_string(tmp.path().join("files/local/f50.conf")).unwrap();
    assert_eq!(written, "setting = 50\n");
}

/// conftest's `violation.rego` shape next to the shipped guardrails: a
/// complete rule undefined for everything but Deployments hides nothing,
/// so `version: latest` is still denied and nothing is applied.
#[test]
fn an_undefined_repository_rule_keeps_the_shipped_deny() {
    let shop = Shop::new(&["1.0.0"; 3]);
    shop.write(
        "policies/violation.rego",
        "package main\n\nviolation := [{\"msg\": \"no deployments\"}] if {\n  input.kind == \"Deployment\"\n}\n",
    );
    shop.edit(
        "services/web/web.yaml",
        "version: \"1.0.0\"",
        "version: latest",
    );
    shop.commit("web on latest");
    let test = shop.sluice(&["policy", "test"]);
    assert_eq!(test.code, 1, "{}", test.all());
    assert!(
        test.stdout.contains(
            "FAIL - services/web/web.yaml - local/Process/web - data.sluice.guardrails.images.deny"
        ),
        "{}",
        test.stdout
    );
    let apply = shop.sluice(&["apply"]);
    assert_eq!(apply.code, 2, "{}", apply.all());
    assert!(shop.service_pids().is_empty(), "nothing may run");
}

/// A copy of examples/kubernetes-shop as a git repository.
fn kubernetes_example() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let example =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/kubernetes-shop");
    let out = std::process::Command::new("cp")
        .arg("-r")
        .arg(format!("{}/.", example.display()))
        .arg(&repo)
        .output()
        .unwrap();
    assert!(out.status.success());
    common::git(&repo, &["init", "-q", "-b", "main"]);
    commit_all(&repo, "the example");
    tmp
}

fn commit_all(repo: &std::path::Path, message: &str) {
    common::git(repo, &["add", "-A"]);
    common::git(repo, &["commit", "-q", "-m", message]);
}

/// `sluice policy test` as a CI job on a pull request runs it: no
/// kubeconfig, no cluster, no state dir. The findings are the ones a
/// run with a cluster (the in-process fake API server, as no real one can
/// run here) and a state dir gives; exit codes 0 clean, 1 deny, 2 bad
/// input.
#[test]
fn policy_test_needs_no_cluster_and_no_state() {
    let tmp = kubernetes_example();
    let repo = tmp.path().join("repo");
    let home = tmp.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let offline = |extra: &[&str]| {
        let mut cmd = std::process::Command::new(common::SLUICE);
        cmd.args(["policy", "test", "-o", "json", "--repo"])
            .arg(&repo)
            .args(extra)
            .env("HOME", &home)
            .env("XDG_STATE_HOME", home.join("state"))
            .env("KUBECONFIG", home.join("no-such-kubeconfig"))
            .env_remove("SLUICE_STATE_DIR");
        common::run_with_timeout(cmd, std::time::Duration::from_secs(120))
    };
    let out = offline(&[]);
    assert_eq!(out.code, 0, "{}", out.all());
    let alone: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert!(alone["tests"].as_u64().unwrap() > 0, "{alone}");
    assert!(
        std::fs::read_dir(&home).unwrap().next().is_none(),
        "policy test wrote into HOME: {:?}",
        std::fs::read_dir(&home).unwrap().collect::<Vec<_>>()
    );
    // With a cluster and a state dir: the same verdict.
    let fake = sluice_kube_fake::Fake::start_in_thread();
    let kubeconfig = tmp.path().join("kubeconfig");
    std::fs::write(&kubeconfig, fake.kubeconfig(&["cluster"])).unwrap();
    let state = tmp.path().join("state");
    let out = offline(&[
        "--kubeconfig",
        &kubeconfig.display().to_string(),
        "--state-dir",
        &state.display().to_string(),
    ]);
    assert_eq!(out.code, 0, "{}", out.all());
    let with: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    for key in ["findings", "tests", "passed", "evaluated", "denied"] {
        assert_eq!(alone[key], with[key], "{key}");
    }
    assert!(
        fake.log().is_empty(),
        "policy test called the API server: {:?}",
        fake.log()
    );
    // A deny: exit 1, the finding named as conftest names it.
    std::fs::write(
        repo.join("services/web/debug.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: debug\n  namespace: shop\nspec:\n  containers:\n    - name: shell\n      image: busybox\n      resources:\n        limits: {memory: 64Mi}\n",
    )
    .unwrap();
    commit_all(&repo, "a debug pod");
    let out = offline(&[]);
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(
        out.stdout.contains("mutable image \\\"busybox\\\""),
        "{}",
        out.stdout
    );
    // A broken policy: exit 2, its file and line named.
    std::fs::create_dir_all(repo.join("policies")).unwrap();
    std::fs::write(
        repo.join("policies/broken.rego"),
        "package main\n\ndeny contains msg if {\n  msg :=\n}\n",
    )
    .unwrap();
    commit_all(&repo, "a broken policy");
    let out = offline(&[]);
    assert_eq!(out.code, 2, "{}", out.all());
    assert!(
        out.stderr.contains("policies/broken.rego:"),
        "{}",
        out.stderr
    );
}
