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

use crate::render::RenderError;
use crate::source::Snapshot;

/// Names kustomize accepts for the kustomization file.
const NAMES: [&str; 3] = ["kustomization.yaml", "kustomization.yml", "Kustomization"];

/// The kustomization file of `root` in `snapshot`, if it is a kustomize
/// folder.
pub fn kustomization_file(snapshot: &Snapshot, root: &str) -> Option<String> {
    NAMES.iter().find_map(|n| {
        let path = if root.is_empty() {
            n.to_string()
        } else {
            format!("{root}/{n}")
        };
        snapshot.files.contains_key(&path).then_some(path)
    })
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
pub fn build(snapshot: &Snapshot, root: &str, file: &str) -> Result<String, RenderError> {
    let invalid = |reason: String| RenderError::invalid(file, None, None, reason);
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
    let output = cmd
        .arg(&target)
        .env_remove("KUBECONFIG")
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
