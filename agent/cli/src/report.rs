//! The pull-request report as a comment people read: what merging changes
//! in the live system, as unified diffs (a File's content, anything else
//! its manifest; live against the merged commit, secrets redacted), flag
//! changes flag by flag, the rollout per service with its steps, the drift
//! a merge overwrites, the policies, and where live differs from the base
//! branch.
//!
//! # Guarantees
//! - Nothing from a repository or the live system is markup: every value
//!   sits in a code span or a fenced block whose fence is longer than any
//!   backtick run in it, so no HTML, no link, no mention and no reference
//!   is made from inside values (GitHub does not link inside code).
//! - `<details>` blocks and fences are closed however the report is cut;
//!   the comment stays under GitHub's 65,536 characters, cut at a resource
//!   boundary with the number of changes left out stated.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

use serde_json::Value;
use sluice_core::engine::{Contents, DriftKind, PrReport};
use sluice_core::guard::Level;
use sluice_core::plan::{Action, Change, Plan};

/// GitHub's limit on a comment's size; reports stay under it.
pub const COMMENT_LIMIT: usize = 65_536;

/// The hidden marker a sticky pull-request comment is found again by.
pub const REPORT_MARKER: &str = "<!-- sluice-report -->";

/// Lines of one resource's diff shown before the rest is counted.
const DIFF_LINES: usize = 60;

/// The longest run of backticks in `s`.
fn backtick_run(s: &str) -> usize {
    let (mut best, mut run) = (0, 0);
    for c in s.chars() {
        if c == '`' {
            run += 1;
            best = best.max(run);
        } else {
            run = 0;
        }
    }
    best
}

/// `s` as inline code, whatever it holds: fenced with more backticks than
/// any run inside (CommonMark), on one line.
pub fn code(s: &str) -> String {
    let s = s.replace(['\n', '\r'], " ");
    let fence = "`".repeat(backtick_run(&s) + 1);
    let pad = if s.starts_with('`') || s.ends_with('`') || s.starts_with(' ') {
        " "
    } else {
        ""
    };
    format!("{fence}{pad}{s}{pad}{fence}")
}

/// `text` verbatim in a fenced block of `lang`.
fn block(lang: &str, text: &str) -> String {
    let fence = "`".repeat(backtick_run(text).max(2) + 1);
    let mut t = text.to_string();
    if !t.ends_with('\n') {
        t.push('\n');
    }
    format!("{fence}{lang}\n{t}{fence}\n")
}

/// A unified diff of `old` → `new` (3 lines of context), its first
/// [`DIFF_LINES`] lines and how many were left out.
fn unified(old: &str, new: &str) -> (String, usize) {
    let diff = similar::TextDiff::from_lines(old, new);
    let text = diff.unified_diff().context_radius(3).to_string();
    let lines: Vec<&str> = text.lines().collect();
    let shown = lines.len().min(DIFF_LINES);
    (lines[..shown].join("\n"), lines.len() - shown)
}

/// What a resource's diff shows: a File's content alone, anything else its
/// manifest as YAML.
fn text_of(kind: &str, body: &Value) -> String {
    if kind == "File" {
        if let Some(c) = body["spec"]["content"].as_str() {
            return c.to_string();
        }
    }
    serde_yaml::to_string(body).unwrap_or_default()
}

/// The flags a flagd file (the published `feature-flags` File) holds:
/// name → what a reader cares about (default variant, or "targeted").
fn flag_states(body: Option<&Value>) -> BTreeMap<String, String> {
    let Some(content) = body.and_then(|b| b["spec"]["content"].as_str()) else {
        return BTreeMap::new();
    };
    let doc: Value = serde_json::from_str(content).unwrap_or(Value::Null);
    doc["flags"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(name, f)| {
            let mut state = f["defaultVariant"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| f["defaultVariant"].to_string());
            if f["state"] == "DISABLED" {
                state.push_str(" (disabled)");
            }
            if let Some(t) = f.get("targeting").filter(|t| !t.is_null()) {
                let _ = write!(state, ", targeting {}", sluice_core::plan::compact(t));
            }
            (name.clone(), state)
        })
        .collect()
}

/// One flag per line: `flag` on `target`: `old` → `new`.
fn flag_lines(target: &str, c: &Contents) -> String {
    let old = flag_states(c.live.as_ref());
    let new = flag_states(c.head.as_ref());
    let names: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    let mut s = String::new();
    for name in names {
        let (o, n) = (old.get(name), new.get(name));
        if o == n {
            continue;
        }
        let show = |v: Option<&String>| v.map(|v| code(v)).unwrap_or_else(|| "(none)".into());
        let _ = writeln!(
            s,
            "- flag {} on {}: {} → {}",
            code(name),
            code(target),
            show(o),
            show(n)
        );
    }
    s
}

/// The markdown of one change: a headline, and its diff, content or flag
/// lines; `callout` notes it is not this pull request's doing.
fn change_md(c: &Change, contents: Option<&Contents>, callout: Option<&str>) -> String {
    let mut s = String::new();
    let (sign, what) = match c.action {
        Action::Create => ("+", "new"),
        Action::Update => ("~", "changed"),
        Action::Delete => ("-", "removed"),
        Action::Release => ("0", "released: kept, no longer managed"),
        Action::Unchanged => ("=", "unchanged"),
    };
    let fields: Vec<String> = c.fields.iter().map(|f| code(&f.path)).collect();
    let _ = write!(
        s,
        "**{sign}** {} · {} · {what}",
        code(&c.id.to_string()),
        code(&c.service)
    );
    if !fields.is_empty() {
        let _ = write!(s, " · {}", fields.join(", "));
    }
    s.push_str("\n\n");
    if let Some(note) = callout {
        let _ = writeln!(s, "> ⚠️ {note}\n");
    }
    let Some(contents) = contents else {
        return s;
    };
    let secret_changed = c.fields.iter().any(|f| {
        contents
            .redacted
            .iter()
            .any(|r| f.path == *r || f.path.starts_with(&format!("{r}.")))
    });
    if secret_changed {
        s.push_str("A secret value changed (not shown).\n\n");
    }
    let flags = c.service == "flags" && c.id.kind == "File";
    match c.action {
        Action::Update if flags => {
            s.push_str(&flag_lines(&c.id.target, contents));
            s.push('\n');
        }
        Action::Update => {
            let old = contents
                .live
                .as_ref()
                .map(|b| text_of(&c.id.kind, b))
                .unwrap_or_default();
            let new = contents
                .head
                .as_ref()
                .map(|b| text_of(&c.id.kind, b))
                .unwrap_or_default();
            let (diff, left) = unified(&old, &new);
            if !diff.trim().is_empty() {
                s.push_str(&block("diff", &diff));
                if left > 0 {
                    let _ = writeln!(s, "_…and {left} more line(s) of this diff._");
                }
                s.push('\n');
            }
        }
        Action::Create => {
            let new = contents
                .head
                .as_ref()
                .map(|b| text_of(&c.id.kind, b))
                .unwrap_or_default();
            let (diff, left) = unified("", &new);
            let lines = new.lines().count();
            let _ = writeln!(
                s,
                "<details><summary>content ({lines} line{})</summary>\n",
                if lines == 1 { "" } else { "s" }
            );
            s.push_str(&block("diff", &diff));
            if left > 0 {
                let _ = writeln!(s, "_…and {left} more line(s)._");
            }
            s.push_str("\n</details>\n\n");
        }
        Action::Delete | Action::Release | Action::Unchanged => {}
    }
    s
}

/// Where the live system, not the pull request, makes a change: ids changed
/// against live that the base → head diff does not change (or changes
/// differently).
fn not_from_this_pr(r: &PrReport) -> BTreeSet<sluice_core::resource::ResourceId> {
    let by_base: BTreeMap<_, _> = r.against_base.changes().map(|c| (&c.id, c)).collect();
    r.against_live
        .changes()
        .filter(|c| match by_base.get(&c.id) {
            None => true,
            Some(b) => b.action != c.action,
        })
        .map(|c| c.id.clone())
        .collect()
}

fn ref_name(name: Option<&String>, commit: &sluice_core::source::CommitId) -> String {
    match name {
        Some(n) => format!("{} ({})", code(n), code(commit.short())),
        None => code(commit.short()),
    }
}

/// The report as a pull-request comment: summary first, every change with
/// its diff (folded per wave), never over [`COMMENT_LIMIT`].
pub fn markdown(r: &PrReport) -> String {
    let base = r
        .base_name
        .as_ref()
        .map(|n| code(n))
        .unwrap_or_else(|| code(r.base.commit.short()));
    let mut s = String::new();
    let _ = writeln!(s, "{REPORT_MARKER}");
    let _ = writeln!(
        s,
        "### sluice: merging {} into {}\n",
        ref_name(r.head_name.as_ref(), &r.head.commit),
        ref_name(r.base_name.as_ref(), &r.base.commit)
    );
    let _ = writeln!(
        s,
        "**What merging changes in the live system:** {}\n",
        r.against_live.summary()
    );
    if r.drift_overwritten.is_empty() {
        let _ = writeln!(s, "- **Drift:** none that this merge would overwrite");
    } else {
        let _ = writeln!(
            s,
            "- **Drift this merge would overwrite:** {} resource(s) changed by hand",
            r.drift_overwritten.len()
        );
        for d in &r.drift_overwritten {
            let kind = match d.kind {
                DriftKind::Missing => "missing",
                DriftKind::Modified => "modified",
            };
            let fields: Vec<String> = d.fields.iter().map(|f| code(&f.path)).collect();
            let _ = writeln!(
                s,
                "  - {kind} {} {}",
                code(&d.id.to_string()),
                fields.join(", ")
            );
        }
    }
    let elsewhere = not_from_this_pr(r);
    let live_ids: BTreeSet<_> = r.against_live.changes().map(|c| &c.id).collect();
    let already: Vec<String> = r
        .against_base
        .changes()
        .filter(|c| !live_ids.contains(&c.id))
        .map(|c| code(&c.id.to_string()))
        .collect();
    if elsewhere.is_empty() && already.is_empty() {
        let _ = writeln!(
            s,
            "- **Live against {base}:** the same; every change above is this pull request's"
        );
    } else {
        if !elsewhere.is_empty() {
            let mut ids: Vec<String> = elsewhere
                .iter()
                .take(10)
                .map(|id| code(&id.to_string()))
                .collect();
            if elsewhere.len() > 10 {
                ids.push(format!("and {} more", elsewhere.len() - 10));
            }
            let _ = writeln!(
                s,
                "- **Live differs from {base}:** {} change(s) come from live differing from {base} (changed by hand, or {base} not yet live), not from this pull request, marked ⚠️ below: {}",
                elsewhere.len(),
                ids.join(", ")
            );
        }
        if !already.is_empty() {
            let _ = writeln!(
                s,
                "- **Already live:** this pull request changes {} that live already has: {}",
                if already.len() == 1 {
                    "one resource"
                } else {
                    "resources"
                },
                already.join(", ")
            );
        }
    }
    if !r.expired_flags.is_empty() {
        let names: Vec<String> = r.expired_flags.iter().map(|f| code(f)).collect();
        let _ = writeln!(s, "- **Expired feature flags:** {}", names.join("; "));
    }
    policies(&mut s, r);
    waves_table(&mut s, &r.against_live, &r.rollouts);

    // The details, per wave, cut at a change's boundary to fit.
    let budget = COMMENT_LIMIT - 500;
    let total = r.against_live.changes().count();
    let mut shown = 0;
    let mut cut = false;
    if total > 0 {
        s.push_str("#### Changes\n\n");
    }
    'waves: for w in &r.against_live.waves {
        let open = format!(
            "<details><summary>Wave {} — ring {} — {} ({} change{})</summary>\n\n",
            w.index + 1,
            w.ring,
            w.services.join(", ").replace(['<', '>', '&'], "_"),
            w.changes.len(),
            if w.changes.len() == 1 { "" } else { "s" }
        );
        let close = "</details>\n\n";
        if s.len() + open.len() + close.len() > budget {
            cut = true;
            break;
        }
        s.push_str(&open);
        for c in &w.changes {
            let callout = elsewhere.contains(&c.id).then_some(
                "Not part of this pull request: live differs from the base branch here.",
            );
            let md = change_md(c, r.contents.get(&c.id.to_string()), callout);
            if s.len() + md.len() + close.len() > budget {
                s.push_str(close);
                cut = true;
                break 'waves;
            }
            s.push_str(&md);
            shown += 1;
        }
        s.push_str(close);
    }
    if cut {
        let head = r
            .head_name
            .clone()
            .unwrap_or_else(|| r.head.commit.short().to_string());
        let base = r
            .base_name
            .clone()
            .unwrap_or_else(|| r.base.commit.short().to_string());
        let _ = writeln!(
            s,
            "_…{} more change(s) not shown: the comment would pass GitHub's limit of {COMMENT_LIMIT} characters. {} lists them all._",
            total - shown,
            code(&format!("sluice plan --base {base} --head {head}"))
        );
    }
    s
}

fn policies(s: &mut String, r: &PrReport) {
    let denies: Vec<_> = r.guard.denies().collect();
    let warnings: Vec<_> = r.guard.warnings().collect();
    let exceptions: Vec<_> = r.guard.exceptions().collect();
    if denies.is_empty() && warnings.is_empty() {
        let _ = writeln!(
            s,
            "- **Policies:** passed ({} tests of {} modules over {} resources and documents{})\n",
            r.guard.tests,
            r.guard.modules.len(),
            r.guard.evaluated,
            match exceptions.len() {
                0 => String::new(),
                n => format!("; {n} exception{}", if n == 1 { "" } else { "s" }),
            }
        );
        return;
    }
    let _ = writeln!(
        s,
        "- **Policies:** {} deny, {} warning{}",
        denies.len(),
        warnings.len(),
        if denies.is_empty() {
            ""
        } else {
            " — **this change will not be applied until every deny is fixed**"
        }
    );
    for f in denies.iter().chain(&warnings).chain(&exceptions) {
        let _ = writeln!(
            s,
            "  - {} {} {}: {}",
            match f.level {
                Level::Deny => "⛔ deny",
                Level::Warn => "⚠️ warn",
                Level::Exception => "➖ exception",
            },
            code(&f.resource),
            code(&f.rule),
            code(&f.message)
        );
    }
    s.push('\n');
}

/// One row per service and wave: how it rolls out, with its steps.
fn waves_table(s: &mut String, plan: &Plan, rollouts: &BTreeMap<String, String>) {
    if plan.waves.is_empty() {
        return;
    }
    s.push_str("| wave | ring | service | on | rolls out |\n|---|---|---|---|---|\n");
    for w in &plan.waves {
        for svc in &w.services {
            let only_removals = w
                .changes
                .iter()
                .filter(|c| &c.service == svc)
                .all(|c| matches!(c.action, Action::Delete | Action::Release));
            let how = if only_removals {
                "removed (pruned in reverse order)".to_string()
            } else if svc == "flags" {
                "feature flags: the flagd file, read live by the services (no restart)".to_string()
            } else {
                rollouts
                    .get(svc)
                    .cloned()
                    .unwrap_or_else(|| "applied directly".into())
            };
            let on: BTreeSet<&str> = w
                .changes
                .iter()
                .filter(|c| &c.service == svc)
                .map(|c| c.id.target.as_str())
                .collect();
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} |",
                w.index + 1,
                w.ring,
                code(svc).replace('|', "\\|"),
                some_of(&on).replace('|', "\\|"),
                how.replace('|', "\\|")
            );
        }
    }
    s.push('\n');
}

/// Targets named, the first few of a long list (a fleet's ring).
fn some_of(targets: &BTreeSet<&str>) -> String {
    const SHOWN: usize = 4;
    let mut names: Vec<String> = targets.iter().take(SHOWN).map(|t| code(t)).collect();
    if targets.len() > SHOWN {
        names.push(format!("and {} more", targets.len() - SHOWN));
    }
    names.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_spans_hold_any_text_inert() {
        assert_eq!(code("a"), "`a`");
        assert_eq!(code("a`b"), "``a`b``");
        assert_eq!(code("`x`"), "`` `x` ``");
        assert_eq!(code("l1\nl2"), "`l1 l2`");
        assert!(block("diff", "```\n+x\n").starts_with("````diff\n"));
    }

    #[test]
    fn long_diffs_are_cut_with_a_count() {
        let old: String = (0..200).map(|i| format!("{i}\n")).collect();
        let new: String = (0..200).map(|i| format!("{}\n", i * 2)).collect();
        let (diff, left) = unified(&old, &new);
        assert_eq!(diff.lines().count(), DIFF_LINES);
        assert!(left > 100, "{left}");
    }
}
