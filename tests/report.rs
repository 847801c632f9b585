//! The pull-request report: head against live and against base, the drift
//! a merge would overwrite, values made inert, and the comment size cap.

#[path = "common/mod.rs"]
mod common;

use common::{git, Shop};

#[test]
fn the_report_shows_live_changes_drift_and_stays_inert_and_small() {
    let shop = Shop::new(&["1.0.0"; 3]);
    assert_eq!(shop.sluice(&["apply"]).code, 0);
    let repo = shop.repo();
    git(&repo, &["checkout", "-q", "-b", "feature"]);
    shop.set_versions(&["1.0.0", "1.0.0", "1.1.0"]);
    let hostile =
        "```\n</details><script>alert(1)</script> [x](javascript:alert(1)) **bold** | pipe";
    shop.write(
        "services/web/banner.yaml",
        &shop.file_manifest("banner", "banner.txt", hostile),
    );
    // Enough changes to overflow a comment.
    let mut many = String::new();
    for i in 0..1500 {
        many.push_str(&shop.file_manifest(&format!("f{i}"), &format!("many/f{i}.txt"), "x"));
        many.push_str("---\n");
    }
    shop.write("services/catalog/many.yaml", &many);
    shop.commit("feature");
    git(&repo, &["checkout", "-q", "main"]);

    // By hand, web's whole supervisor group killed: drift the merge overwrites.
    shop.kill_service("web");
    let before = shop.service_pids();

    let out = shop.sluice(&[
        "plan", "--base", "main", "--head", "feature", "-o", "markdown",
    ]);
    assert_eq!(out.code, 0, "{}", out.all());
    let md = &out.stdout;
    assert!(md.starts_with("<!-- sluice-report -->"), "{md}");
    assert!(md.len() <= 65_536, "{} characters", md.len());
    assert!(
        md.contains("**Against the live system:**") && md.contains("**Against the base branch:**"),
        "{md}"
    );
    assert!(
        md.contains("Drift this merge would overwrite:** 1")
            && md.contains("missing local/Process/web"),
        "{md}"
    );
    assert!(md.contains("cut to fit a comment"), "no cut note");
    assert!(md.contains("| 1 | 0 | catalog | rolling |"), "{md}");
    assert!(
        !md.contains("<script>") && !md.contains("```") && !md.contains("](javascript"),
        "hostile value not escaped"
    );
    // The summary survived the cut; nothing live changed.
    assert_eq!(shop.service_pids(), before);

    let json = shop.sluice(&["plan", "--base", "main", "--head", "feature", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    let base_changes: usize = v["againstBase"]["waves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["changes"].as_array().unwrap().len())
        .sum();
    // Against base: 1,500 files, the banner and web's version; live adds web's recreation.
    assert_eq!(base_changes, 1502, "{}", json.stdout.len());
    assert_eq!(v["driftOverwritten"][0]["kind"], "missing");
}
