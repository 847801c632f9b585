//! The in-cluster install renders with the real kustomize (`kubectl
//! kustomize manifests/`, as `kubectl apply -k` does) and holds what the
//! README promises: least-privilege RBAC without wildcards, a non-root,
//! read-only agent with probes and resource limits, a Service for webhooks
//! and metrics. The VM unit sits beside it.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn kustomize(dir: &str) -> Vec<Value> {
    let out = Command::new("kubectl")
        .args(["kustomize", dir])
        .current_dir(root())
        .output()
        .expect("kubectl (installed by tests/run)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    text.split("\n---\n")
        .map(|d| serde_yaml::from_str::<Value>(d).unwrap())
        .collect()
}

#[test]
fn the_in_cluster_install_renders_least_privilege_and_locked_down() {
    let docs = kustomize("manifests");
    let kinds: Vec<String> = docs
        .iter()
        .map(|d| {
            format!(
                "{}/{}",
                d["kind"].as_str().unwrap(),
                d["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect();
    for want in [
        "Namespace/sluice-system",
        "ServiceAccount/sluice",
        "ClusterRole/sluice",
        "ClusterRoleBinding/sluice",
        "Deployment/sluice",
        "Service/sluice",
    ] {
        assert!(
            kinds.iter().any(|k| k == want),
            "{want} missing from {kinds:?}"
        );
    }
    assert!(
        kinds.iter().any(|k| k.starts_with("Role/")),
        "no Role for the Lease: {kinds:?}"
    );
    // No wildcard verbs or resources unless the user opts in.
    for d in docs
        .iter()
        .filter(|d| d["kind"] == "ClusterRole" || d["kind"] == "Role")
    {
        for rule in d["rules"].as_array().unwrap() {
            for field in ["verbs", "resources", "apiGroups"] {
                let values = rule[field].as_array().cloned().unwrap_or_default();
                assert!(
                    !values.iter().any(|v| v == "*"),
                    "wildcard {field} in {}",
                    d["metadata"]["name"]
                );
            }
        }
    }
    // Cluster-wide, sluice itself may only impersonate (its deploy
    // accounts) and read discovery: no Secrets, no Namespaces, nothing in
    // kube-system (the wide role is optional/cluster-wide.yaml, opt-in).
    for d in docs.iter().filter(|d| d["kind"] == "ClusterRole") {
        for rule in d["rules"].as_array().unwrap() {
            if rule["nonResourceURLs"].is_array() {
                assert_eq!(rule["verbs"], serde_json::json!(["get"]));
                continue;
            }
            assert_eq!(rule["verbs"], serde_json::json!(["impersonate"]), "{rule}");
            assert_eq!(
                rule["resources"],
                serde_json::json!(["serviceaccounts"]),
                "{rule}"
            );
            assert!(rule["resourceNames"].is_array(), "{rule}");
        }
    }
    let role_text = serde_json::to_string(&docs).unwrap();
    assert!(role_text.contains("leases"), "leader election needs leases");
    let dep = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let pod = &dep["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "sluice");
    let c = &pod["containers"][0];
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["runAsNonRoot"], true);
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert!(
        c["resources"]["requests"]["memory"].is_string()
            && c["resources"]["limits"]["memory"].is_string()
    );
    // The agent's configuration reaches it, with leader election on.
    let cm = docs.iter().find(|d| d["kind"] == "ConfigMap").unwrap();
    assert_eq!(cm["data"]["SLUICE_LEADER_ELECT"], "true");
    let cm_name = cm["metadata"]["name"].as_str().unwrap();
    assert_eq!(
        c["envFrom"][0]["configMapRef"]["name"], cm_name,
        "the generated name is wired in"
    );
    // The opt-in wildcard role is not installed by default.
    assert!(!role_text.contains("manage-any-kind"));
    // And the VM install sits beside it.
    assert!(root().join("manifests/vm/sluice.service").is_file());
}

#[test]
fn the_kubernetes_example_kustomize_folder_renders() {
    let docs = kustomize("examples/kubernetes-shop/services/catalog");
    assert!(
        docs.iter().all(|d| d["metadata"]["namespace"] == "shop"),
        "{docs:?}"
    );
    assert!(docs.iter().any(|d| d["kind"] == "Deployment"));
}

/// The VM unit, checked by Debian's systemd (the real `systemd-analyze`):
/// it verifies (with ExecStart pointed at the built binary), and its
/// offline security exposure is at most 4.0 (systemd counts tenths).
#[test]
fn the_vm_unit_verifies_and_is_hardened() {
    let unit = std::fs::read_to_string(root().join("manifests/vm/sluice.service")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/sluice", env!("CARGO_BIN_EXE_sluice")),
    )
    .unwrap();
    let verify = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (tests/run installs systemd)");
    // Nothing said about this unit (the machine's other units may get
    // warnings of their own).
    let said = String::from_utf8_lossy(&verify.stderr);
    assert!(
        verify.status.success() && !said.contains("sluice.service"),
        "{said}"
    );
    let security = std::process::Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--threshold=40", "--no-pager"])
        .arg(&path)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&security.stdout);
    assert!(security.status.success(), "{report}");
    assert!(report.contains("Overall exposure level"), "{report}");
}
