use std::collections::BTreeMap;

use super::*;
use crate::source::{CommitId, Revision};

fn snapshot(files: &[(&str, &str)]) -> Snapshot {
    let revision = Revision {
        commit: CommitId::parse(&"c".repeat(40)).unwrap(),
        time: 0,
        summary: "t".into(),
    };
    Snapshot::from_texts(revision, files)
}

/// Renders, plans against an empty live system (as `sluice policy test`
/// does), loads the pack and evaluates it.
fn check(files: &[(&str, &str)]) -> Result<Report, GuardError> {
    let snapshot = snapshot(files);
    let rendered = crate::render::render(&snapshot).expect("renders");
    let plan = crate::plan::plan(
        &rendered.topology,
        &rendered.desired,
        &BTreeMap::new(),
        &BTreeMap::new(),
    )
    .expect("plans");
    let pack = Pack::load(&snapshot, &rendered.topology.policies)?;
    evaluate(&*pack.compile()?, &Input::new(&rendered, &plan))
}

const TOPO: &str = "apiVersion: sluice.dev/v1\nkind: Topology\ntargets:\n  - name: prod\n    type: kubernetes\n  - name: vm\n    type: host\nservices:\n  api:\n    path: api\n";

fn deployment(image: &str, container_extra: &str, labels: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: api\n  namespace: shop\n{labels}spec:\n  template:\n    spec:\n      containers:\n        - name: app\n          image: {image}\n          resources:\n            limits: {{memory: 256Mi, cpu: 500m}}\n{container_extra}"
    )
}

fn process(version: &str, extra: &str) -> String {
    format!("apiVersion: sluice.dev/v1\nkind: Process\nmetadata:\n  name: worker\n{extra}spec:\n  command: sluice\n  version: \"{version}\"\n")
}

fn denies(r: &Report) -> Vec<String> {
    r.denies().map(|f| f.message.clone()).collect()
}

fn one_deny(files: &[(&str, &str)], needle: &str) {
    let r = check(files).unwrap();
    let d = denies(&r);
    assert!(
        d.len() == 1 && d[0].contains(needle),
        "expected one deny containing {needle:?}, got {d:?}"
    );
}

fn clean(files: &[(&str, &str)]) {
    let r = check(files).unwrap();
    assert_eq!(denies(&r), Vec::<String>::new());
}

#[test]
fn mutable_image_tags_are_denied_unless_allowed() {
    for bad in ["nginx:latest", "nginx", "registry.local:5000/team/nginx"] {
        one_deny(
            &[
                ("sluice.yaml", TOPO),
                ("api/d.yaml", &deployment(bad, "", "")),
            ],
            "mutable image",
        );
    }
    for good in [
        "nginx:1.27.2",
        "registry.local:5000/nginx:1.27",
        "nginx@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
    ] {
        clean(&[
            ("sluice.yaml", TOPO),
            ("api/d.yaml", &deployment(good, "", "")),
        ]);
    }
    let allowed = deployment(
        "nginx:latest",
        "",
        "  labels:\n    sluice.dev/allow-mutable-tag: \"true\"\n",
    );
    clean(&[("sluice.yaml", TOPO), ("api/d.yaml", &allowed)]);
    one_deny(
        &[
            ("sluice.yaml", TOPO),
            ("api/p.yaml", &process("latest", "")),
        ],
        "version \"latest\" is mutable",
    );
    clean(&[("sluice.yaml", TOPO), ("api/p.yaml", &process("1.4.2", ""))]);
}

#[test]
fn downloaded_artifacts_need_a_digest() {
    let with = |sha: &str| {
        format!(
            "{}  artifacts:\n    - name: bin\n      url: https://example.com/bin\n{sha}",
            process("1", "")
        )
    };
    one_deny(
        &[("sluice.yaml", TOPO), ("api/p.yaml", &with(""))],
        "without a sha256 digest",
    );
    let pinned = with(&format!("      sha256: {}\n", "a".repeat(64)));
    clean(&[("sluice.yaml", TOPO), ("api/p.yaml", &pinned)]);
}

#[test]
fn containers_need_limits_and_may_not_be_privileged() {
    let no_limits = deployment("nginx:1.27", "", "").replace(
        "          resources:\n            limits: {memory: 256Mi, cpu: 500m}\n",
        "",
    );
    let r = check(&[("sluice.yaml", TOPO), ("api/d.yaml", &no_limits)]).unwrap();
    assert_eq!(denies(&r).len(), 1, "{r:?}");
    assert!(denies(&r)[0].contains("no memory limit"));
    assert_eq!(r.warnings().count(), 1, "no CPU request/limit warns");
    let privileged = deployment(
        "nginx:1.27",
        "          securityContext:\n            privileged: true\n",
        "",
    );
    one_deny(
        &[("sluice.yaml", TOPO), ("api/d.yaml", &privileged)],
        "is privileged",
    );
    let cap = deployment(
        "nginx:1.27",
        "          securityContext:\n            capabilities: {add: [SYS_ADMIN]}\n",
        "",
    );
    one_deny(
        &[("sluice.yaml", TOPO), ("api/d.yaml", &cap)],
        "adds the capability SYS_ADMIN",
    );
    let fine = deployment(
        "nginx:1.27",
        "          securityContext:\n            privileged: false\n",
        "",
    );
    clean(&[("sluice.yaml", TOPO), ("api/d.yaml", &fine)]);
}

#[test]
fn flags_need_an_owner_and_an_expiry_date() {
    let flags = |extra: &str| {
        format!("apiVersion: sluice.dev/v1\nkind: Flags\nflags:\n  dark-mode:\n    kind: release\n    state: enabled\n    default: on\n{extra}")
    };
    let p1 = process("1", "");
    let base = [("sluice.yaml", TOPO), ("api/p.yaml", p1.as_str())];
    let both = flags("    owner: ui-team\n    expires: 2030-01-01\n");
    let no_owner = flags("    expires: 2030-01-01\n");
    let no_expiry = flags("    owner: ui-team\n");
    clean(&[base[0], base[1], ("flags.yaml", &both)]);
    one_deny(
        &[base[0], base[1], ("flags.yaml", &no_owner)],
        "has no owner",
    );
    one_deny(
        &[base[0], base[1], ("flags.yaml", &no_expiry)],
        "no expiry date",
    );
}

#[test]
fn a_migration_never_shares_a_wave_with_code_that_depends_on_it() {
    let migration = process("7", "  labels:\n    sluice.dev/migration: \"true\"\n")
        .replace("name: worker", "name: migrate");
    one_deny(
        &[
            ("sluice.yaml", TOPO),
            ("api/p.yaml", &process("2", "")),
            ("api/m.yaml", &migration),
        ],
        "schema migration rolls in wave 1 together with Process/worker",
    );
    let topo = format!("{TOPO}    dependsOn: [schema]\n  schema:\n    path: schema\n");
    clean(&[
        ("sluice.yaml", &topo),
        ("api/p.yaml", &process("2", "")),
        ("schema/m.yaml", &migration),
    ]);
}

#[test]
fn a_repository_brings_conftest_policies_and_overrides_shipped_ones() {
    // Written for conftest in Rego v0, as many existing packs are.
    let team = "package main\n\ndeny[msg] {\n  input.kind == \"Process\"\n  not input.metadata.labels.team\n  msg := sprintf(\"%s needs a team label\", [input.metadata.name])\n}\n\nwarn_replicas[msg] {\n  input.spec.replicas < 2\n  msg := \"single replica\"\n}\n";
    let p1 = process("1", "");
    let files = [
        ("sluice.yaml", TOPO),
        ("api/p.yaml", p1.as_str()),
        ("policies/team.rego", team),
    ];
    let r = check(&files).unwrap();
    assert_eq!(denies(&r), vec!["worker needs a team label".to_string()]);
    assert_eq!(r.denies().next().unwrap().rule, "data.main.deny");
    assert_eq!(r.warnings().count(), 1);
    let labelled = process("1", "  labels:\n    team: core\n");
    let r = check(&[files[0], ("api/p.yaml", &labelled), files[2]]).unwrap();
    assert!(!r.is_denied());
    // A file with a shipped path replaces the shipped guardrail.
    let off = "package sluice.guardrails.images\n";
    clean(&[
        ("sluice.yaml", TOPO),
        ("api/p.yaml", &process("latest", "")),
        ("policies/guardrails/images.rego", off),
    ]);
}

#[test]
fn an_undefined_complete_rule_hides_nothing() {
    // conftest's examples/kubernetes/violation.rego shape: undefined for
    // everything that is not a Deployment.
    let violation = "package main\n\nviolation := [{\"msg\": \"no deployments\"}] if {\n  input.kind == \"Deployment\"\n}\n";
    let files = [
        ("sluice.yaml", TOPO),
        ("api/p.yaml", &process("latest", "")),
        ("policies/violation.rego", violation),
    ];
    one_deny(&files, "version \"latest\" is mutable");
    let dep = deployment("nginx:latest", "", "");
    let r = check(&[files[0], ("api/d.yaml", &dep), files[2]]).unwrap();
    let mut d = denies(&r);
    d.sort();
    assert_eq!(d.len(), 2, "{d:?}");
    assert!(
        d[0].contains("mutable image") && d[1] == "no deployments",
        "{d:?}"
    );
}

#[test]
fn every_rule_form_and_syntax_yields_its_findings() {
    let v1 = "package main\n\ndeny contains msg if { input.kind == \"Process\"; msg := \"v1 partial\" }\n\ndeny_named contains {\"msg\": \"v1 object\", \"id\": \"X-1\"} if input.kind == \"Process\"\n\nviolation_list := [\"v1 complete array\"] if input.kind == \"Process\"\n\nwarn_one := \"v1 complete string\" if input.kind == \"Process\"\n\nwarn_bool if input.kind == \"Process\"\n\nwarn_never contains \"never\" if false\n";
    let v0 = "package main\n\nimport data.lib.kinds\n\nviolation[{\"msg\": msg}] {\n  kinds.is_process\n  msg := \"v0 object\"\n}\n\nwarn[msg] { kinds.is_process; msg := \"v0 warn\" }\n";
    let lib = "package lib.kinds\n\nis_process { input.kind == \"Process\" }\n";
    let r = check(&[
        ("sluice.yaml", TOPO),
        ("api/p.yaml", &process("1", "")),
        ("policies/v1.rego", v1),
        ("policies/v0.rego", v0),
        ("policies/lib/kinds.rego", lib),
    ])
    .unwrap();
    let mut d = denies(&r);
    d.sort();
    assert_eq!(
        d,
        ["v0 object", "v1 complete array", "v1 object", "v1 partial"],
        "{r:#?}"
    );
    let mut w: Vec<&str> = r.warnings().map(|f| f.message.as_str()).collect();
    w.sort();
    assert_eq!(
        w,
        ["denied (the rule is true)", "v0 warn", "v1 complete string"]
    );
    let object = r.denies().find(|f| f.message == "v1 object").unwrap();
    assert_eq!(object.rule, "data.main.deny_named");
    assert_eq!(object.metadata, Some(json!({"id": "X-1"})));
    // conftest's count: one test per rule per input.
    assert!(r.tests >= 8 && r.passed == r.tests - 7, "{}", r.summary());
}

#[test]
fn an_object_message_without_msg_is_an_error_naming_the_rule() {
    let bad =
        "package main\n\ndeny contains {\"message\": \"oops\"} if input.kind == \"Process\"\n";
    let e = check(&[
        ("sluice.yaml", TOPO),
        ("api/p.yaml", &process("1", "")),
        ("policies/bad.rego", bad),
    ])
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("data.main.deny") && e.contains("policies/bad.rego") && e.contains("msg"),
        "{e}"
    );
}

#[test]
fn exceptions_suppress_exactly_the_named_rule_and_are_reported() {
    // conftest's examples/exceptions, in a repository: two Deployments,
    // one excepted from run_as_root.
    let policy = "package main\nimport rego.v1\n\nis_deployment if input.kind = \"Deployment\"\n\ndeny_run_as_root contains msg if {\n  is_deployment\n  not input.spec.template.spec.securityContext.runAsNonRoot\n  msg = sprintf(\"Containers must not run as root in Deployment %s\", [input.metadata.name])\n}\n\ndeny_no_team contains \"no team\" if { is_deployment; not input.metadata.labels.team }\n";
    let exception = "package main\nimport rego.v1\n\nexception contains rules if {\n  input.kind = \"Deployment\"\n  input.metadata.name = \"can-run-as-root\"\n  rules = [\"run_as_root\"]\n}\n";
    let two = format!(
        "{}---\n{}",
        deployment("nginx:1.27", "", "").replace("name: api", "name: cannot-run-as-root"),
        deployment("nginx:1.27", "", "").replace("name: api", "name: can-run-as-root")
    );
    let r = check(&[
        ("sluice.yaml", TOPO),
        ("api/d.yaml", &two),
        ("policies/policy.rego", policy),
        ("policies/exception.rego", exception),
    ])
    .unwrap();
    let runs_as_root: Vec<&Finding> = r
        .findings
        .iter()
        .filter(|f| f.rule == "data.main.deny_run_as_root")
        .collect();
    assert_eq!(runs_as_root.len(), 2, "{:#?}", r.findings);
    let fail = runs_as_root
        .iter()
        .find(|f| f.level == Level::Deny)
        .unwrap();
    assert!(fail.message.contains("cannot-run-as-root"), "{fail:?}");
    let exc = runs_as_root
        .iter()
        .find(|f| f.level == Level::Exception)
        .unwrap();
    assert!(exc.resource.contains("can-run-as-root"), "{exc:?}");
    // The other rule is not excepted: both Deployments fail it.
    assert_eq!(
        r.denies()
            .filter(|f| f.rule == "data.main.deny_no_team")
            .count(),
        2
    );
    assert_eq!(r.exceptions().count(), 1);
}

#[test]
fn packages_are_chosen_per_repository() {
    let other = "package team.rules\n\ndeny contains \"team rule\" if input.kind == \"Process\"\n";
    let main = "package main\n\ndeny contains \"main rule\" if input.kind == \"Process\"\n";
    let p = process("1", "");
    let files = |topo: &str| {
        vec![
            ("sluice.yaml".to_string(), topo.to_string()),
            ("api/p.yaml".to_string(), p.clone()),
            ("policies/team.rego".to_string(), other.to_string()),
            ("policies/main.rego".to_string(), main.to_string()),
        ]
    };
    let run = |topo: &str| {
        let f = files(topo);
        let refs: Vec<(&str, &str)> = f.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        check(&refs).unwrap()
    };
    // Default: main only, and a note says what was left out.
    let r = run(TOPO);
    assert_eq!(denies(&r), ["main rule"]);
    assert!(
        r.notes
            .iter()
            .any(|n| n.contains("policies/team.rego") && n.contains("team.rules")),
        "{:?}",
        r.notes
    );
    let r = run(&format!("{TOPO}policies:\n  namespaces: [team.rules]\n"));
    assert_eq!(denies(&r), ["team rule"]);
    let r = run(&format!("{TOPO}policies:\n  namespaces: [\"*\"]\n"));
    let mut d = denies(&r);
    d.sort();
    assert_eq!(d, ["main rule", "team rule"]);
    assert!(r.notes.is_empty());
}

#[test]
fn data_files_are_placed_by_folder() {
    let policy = "package main\n\ndeny contains msg if {\n  input.kind == \"Process\"\n  not input.metadata.name in data.allowed.processes\n  msg := sprintf(\"%s is not an allowed process (owner %s)\", [input.metadata.name, data.teams.owners.platform])\n}\n";
    let r = check(&[
        ("sluice.yaml", TOPO),
        ("api/p.yaml", &process("1", "")),
        ("policies/main.rego", policy),
        (
            "policies/data/allowed.yaml",
            "allowed:\n  processes: [web]\n",
        ),
        (
            "policies/data/teams/owners.json",
            "{\"owners\": {\"platform\": \"ops\"}}",
        ),
    ])
    .unwrap();
    assert_eq!(denies(&r), ["worker is not an allowed process (owner ops)"]);
    let e = check(&[
        ("sluice.yaml", TOPO),
        ("api/p.yaml", &process("1", "")),
        ("policies/data/bad.yaml", "sluice: {context: {}}\n"),
    ])
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("policies/data/bad.yaml") && e.contains("reserved"),
        "{e}"
    );
}

#[test]
fn combined_mode_sees_every_document_of_a_target() {
    let topo = format!("{TOPO}policies:\n  combine: [cross]\n");
    let cross = "package cross\n\ndeployments := {d.contents | some d in input; d.contents.kind == \"Deployment\"}\n\ndeny contains msg if {\n  some s in input\n  s.contents.kind == \"Service\"\n  not selects_something(s.contents)\n  msg := sprintf(\"Service %s selects no Deployment\", [s.contents.metadata.name])\n}\n\nselects_something(svc) if {\n  some d in deployments\n  every k, v in svc.spec.selector { d.spec.template.metadata.labels[k] == v }\n}\n\ndeny contains msg if {\n  some a in input\n  some b in input\n  a.contents.kind == \"Ingress\"\n  b.contents.kind == \"Ingress\"\n  a.contents.metadata.name < b.contents.metadata.name\n  some ra in a.contents.spec.rules\n  some rb in b.contents.spec.rules\n  ra.host == rb.host\n  msg := sprintf(\"Ingresses %s and %s both claim host %s\", [a.contents.metadata.name, b.contents.metadata.name, ra.host])\n}\n";
    let dep = deployment("nginx:1.27", "", "").replace(
        "  template:\n    spec:",
        "  template:\n    metadata:\n      labels: {app: api}\n    spec:",
    );
    let svc = |name: &str, app: &str| {
        format!("apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: shop\nspec:\n  selector: {{app: {app}}}\n")
    };
    let ing = |name: &str, host: &str| {
        format!("apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata:\n  name: {name}\n  namespace: shop\nspec:\n  rules:\n    - host: {host}\n")
    };
    let docs = [
        dep,
        svc("api", "api"),
        svc("orphan", "nothing"),
        ing("a", "shop.example"),
        ing("b", "shop.example"),
        ing("c", "other.example"),
    ]
    .join("---\n");
    let r = check(&[
        ("sluice.yaml", &topo),
        ("api/all.yaml", &docs),
        ("policies/cross.rego", cross),
    ])
    .unwrap();
    let mut d = denies(&r);
    d.sort();
    assert_eq!(
        d,
        [
            "Ingresses a and b both claim host shop.example",
            "Service orphan selects no Deployment"
        ]
    );
    assert!(r.denies().all(|f| f.resource == "prod (combined)"));
}

#[test]
fn a_broken_policy_names_its_file_line_and_column() {
    let e = check(&[
        ("sluice.yaml", TOPO),
        ("api/p.yaml", &process("1", "")),
        (
            "policies/bad.rego",
            "package main\n\ndeny contains msg if {\n  msg := \n}\n",
        ),
    ])
    .unwrap_err();
    let GuardError::Compile { at } = &e else {
        panic!("{e:?}");
    };
    assert_eq!(at.file, "policies/bad.rego");
    assert!(at.line.is_some() && at.col.is_some(), "{at:?}");
    assert!(!at.message.is_empty() && !at.excerpt.is_empty(), "{at:?}");
}

#[test]
fn an_evaluation_error_names_the_policy_line_and_the_resource() {
    let bad = "package main\n\ndeny contains msg if {\n  input.kind == \"Process\"\n  msg := sprintf(\"%s\", input.metadata.name)\n}\n";
    let e = check(&[
        ("sluice.yaml", TOPO),
        ("api/p.yaml", &process("1", "")),
        ("policies/bad.rego", bad),
    ])
    .unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, GuardError::Evaluate { .. }), "{e:?}");
    assert!(
        text.contains("policies/bad.rego:5") && text.contains("vm/Process/worker"),
        "{text}"
    );
}

#[test]
fn konstraint_head_iteration_over_an_undefined_reference_is_empty_as_in_opa() {
    // konstraint's lib, Rego v0: `volumes` iterates `pod.spec.volumes` in
    // the rule head; for a Process `pod` is false and the set is empty.
    let pods = "package lib.pods\n\ndefault pod = false\n\npod = input.spec.template { input.kind == \"Deployment\" }\n\nvolumes[pod.spec.volumes[_]]\n";
    let policy = "package main\n\nimport data.lib.pods\n\nviolation[{\"msg\": msg}] {\n  v := pods.volumes[_]\n  v.hostPath\n  msg := sprintf(\"hostPath volume %s\", [v.name])\n}\n";
    let with_volume = deployment("nginx:1.27", "", "").replace(
        "      containers:",
        "      volumes:\n        - name: host\n          hostPath: {path: /var}\n      containers:",
    );
    let p = process("1", "");
    let r = check(&[
        ("sluice.yaml", TOPO),
        ("api/p.yaml", &p),
        ("api/d.yaml", &with_volume),
        ("policies/lib/pods.rego", pods),
        ("policies/main.rego", policy),
    ])
    .unwrap();
    assert_eq!(denies(&r), ["hostPath volume host"]);
}

#[test]
fn fifty_long_named_services_with_a_large_context_evaluate() {
    let mut topo = String::from(
        "apiVersion: sluice.dev/v1\nkind: Topology\ntargets:\n  - name: a-rather-long-target-name-for-the-fleet\n    type: host\nservices:\n",
    );
    let mut files = Vec::new();
    for i in 0..50 {
        let name = format!("service-number-{i:02}-with-a-long-descriptive-name");
        topo.push_str(&format!("  {name}:\n    path: {name}\n"));
        if i > 0 {
            topo.push_str(&format!(
                "    dependsOn: [service-number-{:02}-with-a-long-descriptive-name]\n",
                i - 1
            ));
        }
        files.push((
            format!("{name}/f.yaml"),
            format!("apiVersion: sluice.dev/v1\nkind: File\nmetadata:\n  name: f{i:02}\nspec:\n  path: f{i:02}.conf\n  content: \"x\"\n"),
        ));
    }
    files.push(("sluice.yaml".into(), topo));
    files.push((
        "policies/ctx.rego".into(),
        "package main\n\nwarn contains msg if {\n  count(data.sluice.plan.waves) == 50\n  data.sluice.context.wave.index == 49\n  msg := sprintf(\"%s is last\", [data.sluice.context.service])\n}\n".into(),
    ));
    let refs: Vec<(&str, &str)> = files
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let r = check(&refs).unwrap();
    assert!(!r.is_denied());
    assert_eq!(
        r.warnings().map(|f| f.message.as_str()).collect::<Vec<_>>(),
        ["service-number-49-with-a-long-descriptive-name is last"]
    );
    assert_eq!(r.evaluated, 50);
}

#[test]
fn a_policy_line_longer_than_1024_columns_compiles() {
    let long = format!(
        "package main\n\nallowed := {{{}}}\n\ndeny contains \"not allowed\" if {{ input.kind == \"Process\"; not input.metadata.name in allowed }}\n",
        (0..200)
            .map(|i| format!("\"name-{i}\""))
            .collect::<Vec<_>>()
            .join(", ")
    );
    assert!(long.lines().any(|l| l.len() > 1024));
    let r = check(&[
        ("sluice.yaml", TOPO),
        ("api/p.yaml", &process("1", "")),
        ("policies/long.rego", &long),
    ])
    .unwrap();
    assert_eq!(denies(&r), ["not allowed"]);
}

#[test]
fn the_virtual_machine_and_the_interpreter_agree_on_the_shipped_pack() {
    // Documents that exercise every shipped rule, passing and failing.
    let mut docs = vec![
        process("latest", ""),
        process("1", ""),
        process(
            "1",
            "  labels:\n    sluice.dev/allow-mutable-tag: \"true\"\n",
        )
        .replace("\"1\"", "latest"),
        format!(
            "{}  artifacts:\n    - name: bin\n      url: https://example.com/bin\n",
            process("2", "")
        ),
    ];
    for (image, extra, labels) in [
        ("nginx", "", ""),
        (
            "nginx:1.27",
            "          securityContext:\n            privileged: true\n",
            "",
        ),
        (
            "nginx:latest",
            "          securityContext:\n            capabilities: {add: [ALL]}\n",
            "  labels:\n    sluice.dev/allow-privileged: \"true\"\n",
        ),
    ] {
        docs.push(deployment(image, extra, labels));
    }
    docs.push(
        deployment("nginx:1.27", "", "")
            .replace("kind: Deployment", "kind: CronJob")
            .replace("  template:\n    spec:", "  jobTemplate:\n    spec:\n      template:\n        spec:\n          hostNetwork: true")
            .replace("      containers:\n        - name: app\n          image: nginx:1.27\n          resources:\n            limits: {memory: 256Mi, cpu: 500m}\n", "          containers:\n            - name: job\n              image: busybox\n"),
    );
    let mut files = vec![("sluice.yaml".to_string(), TOPO.to_string())];
    for (i, d) in docs.iter().enumerate() {
        files.push((
            format!("api/{i}.yaml"),
            d.replace("name: worker", &format!("name: w{i}"))
                .replace("name: api\n", &format!("name: api{i}\n")),
        ));
    }
    let refs: Vec<(&str, &str)> = files
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let snapshot = snapshot(&refs);
    let rendered = crate::render::render(&snapshot).unwrap();
    let plan = crate::plan::plan(
        &rendered.topology,
        &rendered.desired,
        &BTreeMap::new(),
        &BTreeMap::new(),
    )
    .unwrap();
    let pack = Pack::shipped();
    let fast = Compiled::new(&pack).unwrap();
    assert!(fast.fast.is_some(), "the shipped pack compiles for the VM");
    let slow = Compiled::new_on_interpreter(&pack).unwrap();
    let input = Input::new(&rendered, &plan);
    let a = evaluate(&fast, &input).unwrap();
    let b = evaluate(&slow, &input).unwrap();
    assert_eq!(a.denies().count(), 7, "{:#?}", a.findings);
    assert_eq!(a.warnings().count(), 2, "{:#?}", a.findings);
    assert_eq!(a.findings, b.findings);
    assert_eq!((a.tests, a.passed), (b.tests, b.passed));
}

#[test]
fn repository_policies_can_use_the_shipped_library() {
    let policy = "package main\n\nimport data.sluice.lib\n\ndeny contains msg if {\n  some c in lib.containers\n  not c.securityContext.runAsNonRoot\n  not lib.allowed(\"root\")\n  msg := sprintf(\"%s: %s may run as root\", [lib.name, c.name])\n}\n";
    let r = check(&[
        ("sluice.yaml", TOPO),
        ("api/d.yaml", &deployment("nginx:1.27", "", "")),
        ("policies/root.rego", policy),
    ])
    .unwrap();
    assert_eq!(denies(&r), ["Deployment/api: app may run as root"]);
    let allowed = deployment(
        "nginx:1.27",
        "",
        "  labels:\n    sluice.dev/allow-root: \"true\"\n",
    );
    clean(&[
        ("sluice.yaml", TOPO),
        ("api/d.yaml", &allowed),
        ("policies/root.rego", policy),
    ]);
}
