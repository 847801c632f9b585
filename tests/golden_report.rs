//! The pull-request report of the host example as a golden file:
//! `tests/golden/host-shop-report.md`. Regenerate after an intended change
//! with `UPDATE_GOLDEN=1 cargo test -p sluice --test golden_report`.

#[path = "common/mod.rs"]
mod common;

use std::path::Path;

use common::{git, run_with_timeout, SLUICE};

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

#[test]
fn the_host_example_report_matches_its_golden_file() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("shop");
    copy(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/host-shop"),
        &repo,
    );
    git(&repo, &["init", "-q", "-b", "main"]);
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-qm", "shop 1.0.0"]);
    let base = git(&repo, &["rev-parse", "HEAD"]);
    git(&repo, &["checkout", "-q", "-b", "feature"]);
    for f in ["services/web/web.yaml", "services/orders/orders.yaml"] {
        let p = repo.join(f);
        let s = std::fs::read_to_string(&p)
            .unwrap()
            .replace("version: \"1.0.0\"", "version: \"1.1.0\"");
        std::fs::write(p, s).unwrap();
    }
    std::fs::write(
        repo.join("services/orders/config.json"),
        "{\"currency\": \"EUR\", \"maxItems\": 50}\n",
    )
    .unwrap();
    git(&repo, &["commit", "-qam", "orders and web 1.1.0"]);
    let head = git(&repo, &["rev-parse", "HEAD"]);

    let mut cmd = std::process::Command::new(SLUICE);
    cmd.args([
        "plan",
        "--repo",
        &repo.display().to_string(),
        "--branch",
        "main",
    ])
    .args([
        "--state-dir",
        &tmp.path().join("state").display().to_string(),
    ])
    .args(["--base", "main", "--head", "feature", "-o", "markdown"]);
    let out = run_with_timeout(cmd, std::time::Duration::from_secs(60));
    assert_eq!(out.code, 0, "{}", out.all());
    // Commit ids differ per run: name them.
    let report = out
        .stdout
        .replace(&base[..10], "<base>")
        .replace(&head[..10], "<head>");
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
