//! The pull-request report of the host example as a golden file:
//! `tests/golden/host-shop-report.md`. The example's base runs for real
//! (its ports moved to free ones), and a pull request changes two
//! services' versions, a config file, a feature flag and adds a File: the
//! report shows what merging changes in the live system. Regenerate after
//! an intended change with `UPDATE_GOLDEN=1 cargo test -p sluice --test
//! golden_report`.

#[path = "common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};

use common::{free_port, git, run_with_timeout, SLUICE};

fn copy(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

fn edit(path: &Path, from: &str, to: &str) {
    let s = std::fs::read_to_string(path).unwrap();
    assert!(s.contains(from), "{}: no {from:?}", path.display());
    std::fs::write(path, s.replace(from, to)).unwrap();
}

/// The example deployed from `dir`, taken down when dropped.
struct Deployed {
    dir: PathBuf,
}

impl Deployed {
    fn sluice(&self, args: &[&str]) -> common::Output {
        let mut cmd = std::process::Command::new(SLUICE);
        cmd.arg(args[0])
            .args(["--repo", &self.dir.join("shop").display().to_string()])
            .args(["--state-dir", &self.dir.join("state").display().to_string()])
            .args(["--file-root", &self.dir.join("files").display().to_string()])
            .args(&args[1..]);
        run_with_timeout(cmd, std::time::Duration::from_secs(120))
    }
}

impl Drop for Deployed {
    fn drop(&mut self) {
        let _ = self.sluice(&["down", "--yes"]);
    }
}

#[test]
fn the_host_example_report_matches_its_golden_file() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("shop");
    copy(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/host-shop"),
        &repo,
    );
    // Free ports instead of 8080-8082, named back in the report.
    let ports: Vec<(String, String)> = (8080..=8082)
        .map(|p| {
            (
                format!("127.0.0.1:{p}"),
                format!("127.0.0.1:{}", free_port()),
            )
        })
        .collect();
    for f in [
        "services/web/web.yaml",
        "services/orders/orders.yaml",
        "services/catalog/catalog.yaml",
    ] {
        for (from, to) in &ports {
            let p = repo.join(f);
            let s = std::fs::read_to_string(&p).unwrap().replace(from, to);
            std::fs::write(p, s).unwrap();
        }
    }
    edit(&repo.join("sluice.yaml"), "soak: 2s", "soak: 0s");
    git(&repo, &["init", "-q", "-b", "main"]);
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-qm", "shop 1.0.0"]);
    let base = git(&repo, &["rev-parse", "HEAD"]);
    let shop = Deployed {
        dir: tmp.path().to_path_buf(),
    };
    let out = shop.sluice(&["apply"]);
    assert_eq!(out.code, 0, "{}", out.all());

    git(&repo, &["checkout", "-q", "-b", "feature"]);
    for f in ["services/web/web.yaml", "services/orders/orders.yaml"] {
        edit(&repo.join(f), "version: \"1.0.0\"", "version: \"1.1.0\"");
    }
    edit(
        &repo.join("services/orders/config.json"),
        "\"maxItems\": 20",
        "\"maxItems\": 50",
    );
    edit(&repo.join("flags.yaml"), "local: on ", "local: off");
    std::fs::write(
        repo.join("services/web/robots.yaml"),
        "apiVersion: sluice.dev/v1\nkind: File\nmetadata:\n  name: robots\nspec:\n  path: web/robots.txt\n  content: |\n    User-agent: *\n    Disallow: /checkout\n",
    )
    .unwrap();
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-qm", "orders and web 1.1.0"]);
    let head = git(&repo, &["rev-parse", "HEAD"]);

    let out = shop.sluice(&[
        "plan", "--base", "main", "--head", "feature", "-o", "markdown",
    ]);
    assert_eq!(out.code, 0, "{}", out.all());
    // Commit ids and ports differ per run: name them.
    let mut report = out
        .stdout
        .replace(&base[..10], "<base>")
        .replace(&head[..10], "<head>");
    for (example, free) in &ports {
        report = report.replace(free, example);
    }
    let golden =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden/host-shop-report.md");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&golden, &report).unwrap();
    }
    let want = std::fs::read_to_string(&golden).expect("golden file (UPDATE_GOLDEN=1 writes it)");
    assert_eq!(
        report, want,
        "the report changed; if intended, regenerate with UPDATE_GOLDEN=1"
    );
}
