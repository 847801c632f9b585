//! The pull-request report: what merging changes in the live system (diffs,
//! flags, waves), the drift a merge would overwrite, values made inert, and
//! the comment size cap; checked as markdown and as the HTML a real GFM
//! renderer (Debian's `cmark-gfm`, GitHub's fork of cmark, with GitHub's
//! extensions) makes of it.

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
    let hostile = "```\n</details><script>alert(1)</script> [x](javascript:alert(1)) **bold** | pipe\nping @octocat about #1, see https://evil.example/x and www.evil.example\n";
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
        md.contains("### sluice: merging `feature` (`") && md.contains("into `main` (`"),
        "branch names and short hashes in the header: {}",
        &md[..300]
    );
    assert!(
        md.contains("**What merging changes in the live system:**"),
        "{md}"
    );
    assert!(
        md.contains("Drift this merge would overwrite:** 1")
            && md.contains("missing `local/Process/web`"),
        "{md}"
    );
    assert!(
        md.contains("more change(s) not shown")
            && md.contains("`sluice plan --base main --head feature`"),
        "no cut note"
    );
    assert!(
        md.contains("| 1 | 0 | `catalog` | `local` | rolling, "),
        "{md}"
    );
    // web is gone from live (killed by hand): the merge re-creates it, not
    // because of this pull request, and the report says so.
    assert!(
        md.contains("not from this pull request, marked ⚠️ below: `local/Process/web`"),
        "{}",
        &md[..md.len().min(4000)]
    );
    let html = gfm(md);
    assert_eq!(
        html.matches("<details>").count(),
        html.matches("</details>").count(),
        "unbalanced <details>"
    );
    let fences = md
        .lines()
        .filter(|l| l.starts_with("```") && l.ends_with("diff"))
        .count();
    assert!(fences > 0);
    assert_eq!(
        html.matches("<pre><code class=\"language-diff\">").count(),
        fences,
        "a diff block was broken"
    );
    assert!(!html.contains("<script"), "raw HTML from a value");
    assert!(!html.contains("<a "), "a link made from inside a value");
    // Outside code, no mention, reference or URL from the values is left.
    let prose = without_code(&html);
    for bad in [
        "@octocat",
        "#1,",
        "https://evil",
        "javascript:",
        "</details><script",
    ] {
        assert!(!prose.contains(bad), "{bad} outside code:\n{prose}");
    }
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

/// Markdown rendered to HTML by the real GFM renderer, with GitHub's
/// extensions (tables, autolinks, the tag filter, strikethrough).
fn gfm(md: &str) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("cmark-gfm")
        .args([
            "-e",
            "table",
            "-e",
            "autolink",
            "-e",
            "tagfilter",
            "-e",
            "strikethrough",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("cmark-gfm (tests/run installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(md.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

/// The HTML without its code (inline and blocks), where values live.
fn without_code(html: &str) -> String {
    let mut out = String::new();
    let mut rest = html;
    while let Some(i) = rest.find("<code") {
        out.push_str(&rest[..i]);
        match rest[i..].find("</code>") {
            Some(j) => rest = &rest[i + j + "</code>".len()..],
            None => {
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}
