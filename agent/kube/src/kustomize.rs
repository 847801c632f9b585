//! Kustomize folders, built by the real kustomize, as Argo CD and Flux do.
//!
//! A service folder holding a `kustomization.yaml` is rendered by running
//! `kubectl kustomize` (or a standalone `kustomize build`) on a private
//! copy of the commit's files, written from the [`Snapshot`] (git objects),
//! never from a checkout: what is built is exactly the commit. Symbolic
//! links are resolved inside the snapshot and ones that leave it are not
//! copied; kustomize's own load restrictor keeps every file a
//! kustomization reads inside its folder tree. The output is then read like
//! any multi-document manifest file.

use std::path::{Path, PathBuf};
use std::process::Command;

use sluice_core::render::{Kustomize, RenderError};
use sluice_core::source::Snapshot;

/// The real kustomize, run as a process.
pub struct Kubectl;

impl Kustomize for Kubectl {
    fn build(&self, snapshot: &Snapshot, root: &str, file: &str) -> Result<String, RenderError> {
        build(snapshot, root, file)
    }
}

/// The program that builds kustomizations: `$SLUICE_KUSTOMIZE`, else
/// `kubectl` (kustomize built in), else `kustomize`, from `PATH`.
fn program() -> Option<(PathBuf, bool)> {
    let standalone = |p: &Path| p.file_name().is_some_and(|n| n == "kustomize");
    if let Some(p) = std::env::var_os("SLUICE_KUSTOMIZE").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        let s = standalone(&p);
        return Some((p, s));
    }
    let path = std::env::var_os("PATH")?;
    for name in ["kubectl", "kustomize"] {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Some((candidate, name == "kustomize"));
            }
        }
    }
    None
}

/// Builds the kustomization at `root`; `file` names it in errors.
fn build(snapshot: &Snapshot, root: &str, file: &str) -> Result<String, RenderError> {
    let invalid = |reason: String| RenderError::Invalid {
        file: file.to_string(),
        line: None,
        field: None,
        reason,
    };
    let (program, standalone) = program().ok_or_else(|| {
        invalid(
            "a kustomize folder, but neither `kubectl` nor `kustomize` is on PATH: install \
             kubectl (https://kubernetes.io/docs/tasks/tools/, kustomize is built in) or \
             kustomize (https://kubectl.docs.kubernetes.io/installation/kustomize/), or set \
             SLUICE_KUSTOMIZE to one of them"
                .to_string(),
        )
    })?;
    let dir = tempfile::tempdir()
        .map_err(|e| invalid(format!("creating a folder for kustomize: {e}")))?;
    for path in snapshot.files.keys() {
        // Directories, and links leaving the snapshot, are not copied.
        let Ok(bytes) = snapshot.read("", path) else {
            continue;
        };
        let dest = dir.path().join(path);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| invalid(format!("copying the commit for kustomize: {e}")))?;
        }
        std::fs::write(&dest, bytes)
            .map_err(|e| invalid(format!("copying the commit for kustomize: {e}")))?;
    }
    let target = dir.path().join(root);
    let mut cmd = Command::new(&program);
    if standalone {
        cmd.arg("build");
    } else {
        cmd.arg("kustomize");
    }
    // kustomize needs no cluster and none of the agent's secrets: the
    // basics, and the proxies remote bases are fetched through.
    let keep = |k: &str| {
        matches!(
            k,
            "PATH"
                | "HOME"
                | "USER"
                | "LANG"
                | "TZ"
                | "TMPDIR"
                | "HTTPS_PROXY"
                | "HTTP_PROXY"
                | "NO_PROXY"
                | "https_proxy"
                | "http_proxy"
                | "no_proxy"
        ) || k.starts_with("LC_")
    };
    let output = cmd
        .arg(&target)
        .env_clear()
        .envs(std::env::vars().filter(|(k, _)| keep(k)))
        .output()
        .map_err(|e| invalid(format!("running {}: {e}", program.display())))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let prefix = dir.path().to_string_lossy().to_string();
        // Kustomize names files by their temporary path: name them as the
        // repository does.
        let message: String = stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .take(5)
            .map(|l| l.replace(&format!("{prefix}/"), "").replace(&prefix, "."))
            .collect::<Vec<_>>()
            .join("; ");
        return Err(invalid(format!("kustomize failed: {message}")));
    }
    String::from_utf8(output.stdout).map_err(|_| invalid("kustomize output is not UTF-8".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_core::model::TOPOLOGY_FILE;
    use sluice_core::render::render_with;
    use sluice_core::source::{CommitId, Revision};

    fn snapshot(files: &[(&str, &str)]) -> Snapshot {
        let revision = Revision {
            commit: CommitId::parse(&"a".repeat(40)).unwrap(),
            time: 0,
            summary: String::new(),
        };
        Snapshot::from_texts(revision, files)
    }

    const KTOPO: &str = "apiVersion: sluice.dev/v1\nkind: Topology\ntargets:\n  - name: cluster\n    type: kubernetes\nservices:\n  shop:\n    path: apps/shop\n";

    /// Runs the real kustomize (`kubectl kustomize`), which the suite
    /// installs; a base outside the service folder is allowed, as in
    /// kustomize.
    #[test]
    fn kustomize_folders_are_built_by_kustomize() {
        let r = render_with(&snapshot(&[
            (TOPOLOGY_FILE, KTOPO),
            ("base/kustomization.yaml", "resources: [deploy.yaml]\n"),
            (
                "base/deploy.yaml",
                "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  template:\n    spec:\n      containers:\n      - name: web\n        image: web:1\n",
            ),
            (
                "apps/shop/kustomization.yaml",
                "namespace: shop\nresources: [../../base]\nimages:\n- name: web\n  newTag: \"2\"\nconfigMapGenerator:\n- name: web-config\n  literals: [mode=fast]\n",
            ),
            // Not listed in the kustomization: not rendered.
            ("apps/shop/stray.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: stray\n"),
        ]), &Kubectl)
        .unwrap();
        let ids: Vec<String> = r
            .desired
            .resources
            .keys()
            .map(|id| id.to_string())
            .collect();
        assert_eq!(ids.len(), 2, "{ids:?}");
        assert!(
            ids[0].starts_with("cluster/ConfigMap/shop/web-config-"),
            "{ids:?}"
        );
        assert_eq!(ids[1], "cluster/apps/Deployment/shop/web");
        let web = r.desired.resources.values().nth(1).unwrap();
        assert_eq!(
            web.body["spec"]["template"]["spec"]["containers"][0]["image"],
            "web:2"
        );
        assert_eq!(web.file, "apps/shop/kustomization.yaml");
        let e = render_with(
            &snapshot(&[
                (TOPOLOGY_FILE, KTOPO),
                (
                    "apps/shop/kustomization.yaml",
                    "resources: [missing.yaml]\n",
                ),
            ]),
            &Kubectl,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("apps/shop/kustomization.yaml: kustomize failed:"),
            "{e}"
        );
        assert!(e.contains("missing.yaml") && !e.contains("/tmp/"), "{e}");
    }
}
