//! What the commands print: text for people, JSON for machines.

use std::fmt::Write as _;

use chrono::Utc;
use serde_json::json;
use sluice_core::engine::{Reconciled, Status};
use sluice_core::guard;
use sluice_core::plan::{to_text, Action, Plan};
use sluice_core::store::{HistoryEntry, HistoryKind, Outcome};

use crate::Format;

/// An error with its causes, one line.
pub fn chain(e: &anyhow::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = cause.source();
    }
    s
}

fn print_json(v: &impl serde::Serialize) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("error: encoding output: {e}"),
    }
}

pub fn plan(format: Format, plan: &Plan) {
    match format {
        Format::Json => print_json(plan),
        Format::Text => print!("{}", to_text(plan)),
        Format::Markdown => print!("{}", plan_markdown(plan)),
    }
}

/// Text from manifests made inert for markdown: no HTML, no code fences,
/// no emphasis, no links (autolinked URLs are broken by a word joiner
/// after `://` and `www.`), no @mentions (a word joiner after `@`).
pub fn md_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let s = s
        .replace("://", ":\u{2060}//")
        .replace("www.", "www\u{2060}.");
    for c in s.chars() {
        match c {
            '@' => out.push_str("@\u{2060}"),
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '`' | '*' | '_' | '[' | ']' | '|' | '\\' | '#' | '~' | '!' => {
                out.push('\\');
                out.push(c);
            }
            '\n' | '\r' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

pub fn plan_markdown(plan: &Plan) -> String {
    use sluice_core::plan::compact;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "### sluice plan for `{}`\n\n{}.\n",
        plan.revision.commit.short(),
        plan.summary()
    );
    for w in &plan.waves {
        let _ = writeln!(
            s,
            "<details><summary>Wave {} — ring {}: {}</summary>\n",
            w.index + 1,
            w.ring,
            md_escape(&w.services.join(", "))
        );
        for c in &w.changes {
            let _ = writeln!(s, "- **{:?}** {}", c.action, md_escape(&c.id.to_string()));
            for f in &c.fields {
                let show = |v: &Option<serde_json::Value>| {
                    v.as_ref().map(compact).unwrap_or_else(|| "∅".into())
                };
                let _ = writeln!(
                    s,
                    "  - {}: {} → {}",
                    md_escape(&f.path),
                    md_escape(&show(&f.old)),
                    md_escape(&show(&f.new))
                );
            }
        }
        let _ = writeln!(s, "\n</details>\n");
    }
    s
}

pub fn drift(format: Format, reports: &[sluice_core::engine::DriftReport]) {
    use sluice_core::engine::DriftKind;
    match format {
        Format::Json => print_json(&reports),
        Format::Text | Format::Markdown => {
            let md = format == Format::Markdown;
            let esc = |t: &str| if md { md_escape(t) } else { t.to_string() };
            let mut s = String::new();
            if md {
                let _ = writeln!(s, "### sluice drift\n");
            }
            for r in reports {
                let _ = writeln!(
                    s,
                    "Target {} (applied {}): {} drifted",
                    esc(&r.target),
                    r.commit.short(),
                    r.items.len()
                );
                for i in &r.items {
                    let what = match i.kind {
                        DriftKind::Missing => "missing",
                        DriftKind::Modified => "modified",
                    };
                    let failed = r.heal_failed.iter().find(|(id, _)| id == &i.id);
                    let healed = if r.healed.contains(&i.id) {
                        " (healed)".to_string()
                    } else if let Some((_, why)) = failed {
                        format!(" (NOT healed: {})", esc(why))
                    } else {
                        String::new()
                    };
                    let _ = writeln!(
                        s,
                        "{}{what} {} ({}){healed}",
                        if md { "- " } else { "  " },
                        esc(&i.id.to_string()),
                        esc(&i.service)
                    );
                    for f in &i.fields {
                        let show = |v: &Option<serde_json::Value>| {
                            v.as_ref()
                                .map(sluice_core::plan::compact)
                                .unwrap_or_else(|| "∅".into())
                        };
                        let _ = writeln!(
                            s,
                            "{}{}: live {} → desired {}",
                            if md { "  - " } else { "      " },
                            esc(&f.path),
                            esc(&show(&f.old)),
                            esc(&show(&f.new))
                        );
                    }
                }
            }
            if reports.is_empty() {
                let _ = writeln!(s, "Nothing applied yet: no drift to scan.");
            }
            print!("{s}");
        }
    }
}

pub fn line(format: Format, result: &str, message: &str) {
    match format {
        Format::Json => print_json(&json!({ "result": result, "message": message })),
        Format::Text | Format::Markdown => println!("{message}"),
    }
}

pub fn reconciled(format: Format, r: &Reconciled) {
    if format == Format::Json {
        let v = match r {
            Reconciled::UpToDate { revision } => {
                json!({"result": "up-to-date", "revision": revision})
            }
            Reconciled::Waiting {
                revision,
                until,
                reason,
            } => {
                json!({"result": "waiting", "revision": revision, "until": until, "reason": reason})
            }
            Reconciled::Applied { plan, duration } => {
                json!({"result": "applied", "plan": plan, "durationMs": duration.as_millis() as u64})
            }
            Reconciled::SkippedFailed { revision, reason } => {
                json!({"result": "skipped-failed", "revision": revision, "reason": reason})
            }
            Reconciled::Rejected { plan, error } => {
                json!({"result": "rejected", "plan": plan, "error": error})
            }
            Reconciled::Reverted {
                plan,
                error,
                reverted_to,
            } => {
                json!({"result": "reverted", "plan": plan, "error": error, "revertedTo": reverted_to})
            }
        };
        return print_json(&v);
    }
    match r {
        Reconciled::UpToDate { revision } => {
            println!("{} is live; nothing to change.", revision.commit.short())
        }
        Reconciled::Waiting { revision, until, reason } => println!(
            "{} waits for a sync window{}: {reason} (--override rolls it out now)",
            revision.commit.short(),
            until.map(|u| format!(" until {}", u.format("%Y-%m-%d %H:%M UTC"))).unwrap_or_default()
        ),
        Reconciled::Applied { plan, duration } => {
            print!("{}", to_text(plan));
            println!(
                "\nApplied {} in {:.1}s.",
                plan.revision.commit.short(),
                duration.as_secs_f64()
            );
        }
        Reconciled::SkippedFailed { revision, reason } => println!(
            "{} failed before and is not retried until a newer commit arrives (use --retry to force): {reason}",
            revision.commit.short()
        ),
        Reconciled::Rejected { plan, error } => {
            print!("{}", to_text(plan));
            println!(
                "\n{} REJECTED before anything was written: {error}\nNothing changed, so nothing was reverted; fix the commit and push a new one.",
                plan.revision.commit.short()
            );
        }
        Reconciled::Reverted {
            plan,
            error,
            reverted_to,
        } => {
            print!("{}", to_text(plan));
            println!("\nRollout of {} FAILED: {error}", plan.revision.commit.short());
            match reverted_to {
                Some(c) => println!("Reverted to the last good commit {}.", c.short()),
                None => println!("No last good commit to revert to; live state left as the failed rollout left it."),
            }
        }
    }
}

/// What `sluice down` removed (or, without --yes, would remove).
pub fn down(format: Format, plan: &Plan, errors: &[String], done: bool) {
    if format == Format::Json {
        return print_json(&json!({"done": done, "plan": plan, "errors": errors}));
    }
    if plan.is_empty() {
        println!("Nothing of sluice's is on these targets.");
        return;
    }
    print!("{}", to_text(plan));
    let n = plan.count(Action::Delete);
    let kept = plan.count(Action::Release);
    let released = if kept > 0 {
        format!(" ({kept} released, left in place)")
    } else {
        String::new()
    };
    if !done {
        println!(
            "\nWould remove {n} resource(s){released}. Run again with --yes to take them down."
        );
    } else if errors.is_empty() {
        println!("\nTook down {n} resource(s){released}.");
    } else {
        println!(
            "\nTook down {} of {n} resource(s){released}; not removed:",
            n - errors.len().min(n)
        );
        for e in errors {
            println!("  {e}");
        }
    }
}

pub fn status(format: Format, s: &Status) {
    if format == Format::Json {
        return print_json(&json!({
            "source": s.state.source,
            "lastError": s.state.last_error,
            "storeLost": s.state.lost,
            "inProgress": s.state.in_progress,
            "waiting": s.state.waiting,
            "drift": s.state.drift,
            "targets": s.state.targets,
            "resources": s.resources,
            "history": s.history,
            "dora": dora(&s.history),
        }));
    }
    print!("{}", status_text(s));
}

pub fn status_text(s: &Status) -> String {
    let mut out = String::new();
    let src = &s.state.source;
    let _ = writeln!(
        out,
        "Source: {}",
        if src.describe.is_empty() {
            "(never polled)"
        } else {
            &src.describe
        }
    );
    if let Some(rev) = &src.last_seen {
        let _ = writeln!(out, "  head: {} {}", rev.commit.short(), rev.summary);
    }
    if let Some(t) = src.last_poll {
        let _ = writeln!(out, "  last poll: {}", ago(t));
    }
    if let Some(e) = &src.last_error {
        let _ = writeln!(
            out,
            "  ERROR ({} consecutive): {e}",
            src.consecutive_failures
        );
    }
    if let Some(e) = &s.state.last_error {
        let _ = writeln!(out, "Last reconcile error: {e}");
    }
    if let Some(e) = &s.state.lost {
        let _ = writeln!(
            out,
            "STORE LOST: {e}; nothing is pruned until the inventory is rebuilt from the live resources (at the next reconcile)"
        );
    }
    if let Some(w) = &s.state.waiting {
        let _ = writeln!(
            out,
            "Waiting: {} for a sync window{}: {}",
            w.commit.short(),
            w.until
                .map(|u| format!(" until {}", u.format("%Y-%m-%d %H:%M UTC")))
                .unwrap_or_default(),
            w.reason
        );
    }
    if let Some(p) = &s.state.in_progress {
        let _ = writeln!(
            out,
            "In progress: {:?} of {} — wave {}/{}, {} (for {})",
            p.kind,
            p.commit.short(),
            p.wave + 1,
            p.waves,
            p.step,
            ago(p.step_started).trim_end_matches(" ago")
        );
        if let Some(t) = &p.traffic {
            let _ = writeln!(
                out,
                "  Traffic: {:?} of {}: {} {}% | {} {}% (step {}/{} of {:?}); metrics from {}",
                t.strategy,
                t.resource,
                t.baseline,
                100 - t.weight.min(100),
                t.canary,
                t.weight,
                t.step,
                t.steps.len(),
                t.steps,
                t.metrics
            );
        }
        for v in &p.analysis {
            let _ = writeln!(out, "  {}", verdict_line(v));
        }
    }
    if s.state.targets.is_empty() {
        let _ = writeln!(out, "\nNothing applied yet.");
    }
    for (name, rec) in &s.state.targets {
        match &rec.ssh {
            Some(dest) => {
                let _ = writeln!(out, "\nTarget {name} (host {dest}, over SSH)");
            }
            None => {
                let _ = writeln!(out, "\nTarget {name}");
            }
        }
        // A revert that could not reach this host yet.
        if let Some(p) = s.state.in_progress.as_ref().filter(|p| {
            p.kind == sluice_core::store::HistoryKind::Revert
                && p.attempts > 0
                && p.targets.contains(name)
        }) {
            let _ = writeln!(
                out,
                "  PENDING REVERT to {} ({} attempt(s) so far; retried by every reconcile)",
                p.commit.short(),
                p.attempts
            );
        }
        match &rec.applied {
            Some(a) => {
                let _ = writeln!(
                    out,
                    "  applied:   {} {} ({})",
                    a.commit.short(),
                    a.summary,
                    ago(a.at)
                );
            }
            None => {
                let _ = writeln!(out, "  applied:   nothing");
            }
        }
        if let Some(g) = &rec.last_good {
            let _ = writeln!(out, "  last good: {} {}", g.commit.short(), g.summary);
        }
        if let Some(f) = &rec.failed {
            let _ = writeln!(
                out,
                "  failed:    {} — {} (not retried until a newer commit)",
                f.commit.short(),
                f.reason
            );
            // Git should say again what is live: name the revert to make.
            if src.last_seen.as_ref().is_some_and(|h| h.commit == f.commit) {
                let _ = writeln!(
                    out,
                    "  git still says {}: make it say what is live with `git revert {}` (or push a fix)",
                    f.commit.short(),
                    f.commit
                );
            }
        }
        if let Some(e) = &rec.last_error {
            let _ = writeln!(out, "  last error: {e}");
        }
        let resources = s.resources.get(name).cloned().unwrap_or_default();
        let mut services: std::collections::BTreeMap<&str, Vec<_>> = Default::default();
        for r in &resources {
            services.entry(r.service.as_str()).or_default().push(r);
        }
        for (service, list) in services {
            let worst = list
                .iter()
                .map(|r| r.health)
                .max()
                .unwrap_or(sluice_core::resource::Health::Unknown);
            let _ = writeln!(out, "  {service:<16} {worst}");
            for r in list {
                let msg = r
                    .message
                    .as_deref()
                    .map(|m| format!(" — {m}"))
                    .unwrap_or_default();
                let _ = writeln!(
                    out,
                    "    {:<8} {:<24} {}{msg}",
                    r.id.kind, r.id.name, r.health
                );
            }
        }
    }
    if let Some(scan) = &s.state.drift {
        let n: usize = scan.items.values().map(Vec::len).sum();
        let _ = writeln!(out, "\nDrift (scanned {}): {n} resource(s)", ago(scan.at));
        for (target, items) in &scan.items {
            for i in items {
                let _ = writeln!(out, "  {target}: {i}");
            }
        }
    }
    if let Some(last) = s.history.last() {
        // A deploy that succeeded is history: say how live is now.
        let unwell: Vec<String> = s
            .resources
            .iter()
            .flat_map(|(target, list)| {
                let mut worst: std::collections::BTreeMap<&str, sluice_core::resource::Health> =
                    Default::default();
                for r in list {
                    let w = worst.entry(r.service.as_str()).or_insert(r.health);
                    *w = (*w).max(r.health);
                }
                worst
                    .into_iter()
                    .filter(|(_, h)| *h != sluice_core::resource::Health::Healthy)
                    .map(move |(svc, h)| format!("{target}/{svc} {h}"))
            })
            .collect();
        let now = if unwell.is_empty() {
            String::new()
        } else {
            format!("; live now: {} NOT healthy", unwell.join(", "))
        };
        let _ = writeln!(
            out,
            "\nLast {}: {} {:?} {:?} ({}){now}",
            kind(last.kind),
            last.commit.short(),
            last.summary,
            last.outcome,
            ago(last.at)
        );
        if let Some(e) = &last.error {
            let _ = writeln!(out, "  error: {e}");
        }
    }
    // The last rollout's analysis verdicts, if it had any.
    if let Some(last) = s.history.last().filter(|e| !e.analysis.is_empty()) {
        let _ = writeln!(out, "  analysis:");
        for v in &last.analysis {
            let _ = writeln!(out, "    {}", verdict_line(v));
        }
    }
    // The newest abort's decision record: which gate, what, against what.
    if let Some(d) = s.history.iter().rev().find_map(|e| e.decision.as_ref()) {
        let _ = writeln!(
            out,
            "Last abort: wave {}, gate {} at {}: {} (threshold: {}){}",
            d.wave,
            d.gate,
            d.at.format("%Y-%m-%d %H:%M:%S UTC"),
            d.measurement,
            d.threshold,
            d.restored_ms
                .map(|ms| format!("; all traffic back on the baseline in {ms} ms"))
                .unwrap_or_default()
        );
    }
    let d = dora(&s.history);
    let _ = writeln!(
        out,
        "DORA: {} deployments ({} succeeded, {} failed; {:.2} successful/day), lead time {}, change failure rate {}, time to restore {}",
        d["deployments"],
        d["succeeded"],
        d["failed"],
        d["deploymentsPerDay"].as_f64().unwrap_or(0.0),
        secs(d["leadTimeSeconds"].as_f64()),
        d["changeFailureRate"]
            .as_f64()
            .map(|r| format!("{:.0}% ({} of {})", r * 100.0, d["failed"], d["deployments"]))
            .unwrap_or_else(|| "n/a".into()),
        secs(d["timeToRestoreSeconds"].as_f64()),
    );
    out
}

/// One analysis verdict: step, weight, outcome and the numbers behind it.
fn verdict_line(v: &sluice_core::store::IntervalVerdict) -> String {
    use sluice_core::analysis::Judgement;
    let outcome = match &v.judgement {
        Judgement::Pass { .. } => "pass".to_string(),
        Judgement::Fail {
            metric,
            measurement,
            threshold,
        } => format!("FAIL {metric}: {measurement} (threshold: {threshold})"),
        Judgement::Inconclusive { reason } => format!("inconclusive: {reason}"),
    };
    format!(
        "{} step {} at {}%: {outcome}; baseline {} req, {} err, p99 {} ms; canary {} req, {} err, p99 {} ms",
        v.resource,
        v.step,
        v.weight,
        v.baseline.requests,
        v.baseline.errors,
        v.baseline.p99_ms,
        v.canary.requests,
        v.canary.errors,
        v.canary.p99_ms
    )
}

fn kind(k: HistoryKind) -> &'static str {
    match k {
        HistoryKind::Deploy => "deploy",
        HistoryKind::Revert => "revert",
        HistoryKind::Heal => "heal",
        HistoryKind::Down => "down",
    }
}

fn secs(v: Option<f64>) -> String {
    match v {
        None => "n/a".into(),
        Some(s) if s < 120.0 => format!("{s:.0}s"),
        Some(s) if s < 7200.0 => format!("{:.0}m", s / 60.0),
        Some(s) => format!("{:.1}h", s / 3600.0),
    }
}

fn ago(t: chrono::DateTime<Utc>) -> String {
    let s = (Utc::now() - t).num_seconds().max(0);
    match s {
        0..=119 => format!("{s}s ago"),
        120..=7199 => format!("{}m ago", s / 60),
        _ => format!("{}h ago", s / 3600),
    }
}

/// The four DORA figures from the history: deployment frequency, median
/// lead time (commit to live), change failure rate, median time to restore
/// (failed deploy to the next successful deploy or revert).
pub fn dora(history: &[HistoryEntry]) -> serde_json::Value {
    let deploys: Vec<&HistoryEntry> = history
        .iter()
        .filter(|e| e.kind == HistoryKind::Deploy)
        .collect();
    let ok: Vec<&&HistoryEntry> = deploys
        .iter()
        .filter(|e| e.outcome == Outcome::Succeeded)
        .collect();
    let failed = deploys.len() - ok.len();
    let days = match (deploys.first(), deploys.last()) {
        (Some(a), Some(b)) => ((b.at - a.at).num_seconds() as f64 / 86400.0).max(1.0),
        _ => 1.0,
    };
    let mut leads: Vec<f64> = ok
        .iter()
        .map(|e| (e.at.timestamp() - e.commit_time).max(0) as f64)
        .collect();
    let mut restores = Vec::new();
    for (i, e) in history.iter().enumerate() {
        if e.kind == HistoryKind::Deploy && e.outcome == Outcome::Failed {
            if let Some(next) = history[i + 1..]
                .iter()
                .find(|n| n.outcome == Outcome::Succeeded)
            {
                restores.push((next.at - e.at).num_milliseconds().max(0) as f64 / 1000.0);
            }
        }
    }
    json!({
        // Every figure counts the same deployments: all attempts, of which
        // `failed` failed; the frequency is of the successful ones.
        "deployments": deploys.len(),
        "succeeded": ok.len(),
        "failed": failed,
        "deploymentsPerDay": ok.len() as f64 / days,
        "leadTimeSeconds": median(&mut leads),
        "changeFailureRate": if deploys.is_empty() { None } else { Some(failed as f64 / deploys.len() as f64) },
        "timeToRestoreSeconds": median(&mut restores),
    })
}

fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Some(v[v.len() / 2])
}

pub use crate::report::REPORT_MARKER;

pub fn report(format: Format, r: &sluice_core::engine::PrReport) {
    match format {
        Format::Json => print_json(r),
        Format::Text => {
            let name = |n: &Option<String>, c: &sluice_core::source::CommitId| match n {
                Some(n) => format!("{n} ({})", c.short()),
                None => c.short().to_string(),
            };
            println!(
                "Merging {} into {}:",
                name(&r.head_name, &r.head.commit),
                name(&r.base_name, &r.base.commit)
            );
            println!("\n== against the live system ==");
            print!("{}", to_text(&r.against_live));
            println!("\n== against {} ==", r.base.commit.short());
            print!("{}", to_text(&r.against_base));
            if !r.drift_overwritten.is_empty() {
                println!("\nDrift this merge would overwrite:");
                for d in &r.drift_overwritten {
                    println!("  {:?} {} ({})", d.kind, d.id, d.service);
                }
            }
        }
        Format::Markdown => print!("{}", crate::report::markdown(r)),
    }
}

pub fn flags(
    format: Format,
    flags: Option<&sluice_core::flags::FlagsFile>,
    today: chrono::NaiveDate,
) {
    let Some(f) = flags else {
        return line(format, "none", "no flags.yaml in this commit");
    };
    if format == Format::Json {
        let expired: Vec<&String> = f.expired(today).into_iter().map(|(n, _)| n).collect();
        return print_json(&json!({ "flags": f.flags, "expired": expired }));
    }
    println!(
        "{:<24} {:<11} {:<16} {:<11} {:<9} default (per target)",
        "FLAG", "KIND", "OWNER", "EXPIRES", "STATE"
    );
    for (name, flag) in &f.flags {
        let per_target: Vec<String> = flag
            .targets
            .iter()
            .map(|(t, v)| format!("{t}={v}"))
            .collect();
        let expired = if flag.expires.is_some_and(|e| e < today) {
            "  EXPIRED"
        } else {
            ""
        };
        println!(
            "{:<24} {:<11} {:<16} {:<11} {:<9} {}{}{expired}",
            name,
            format!("{:?}", flag.kind).to_lowercase(),
            flag.owner.as_deref().unwrap_or("-"),
            flag.expires
                .map(|e| e.to_string())
                .unwrap_or_else(|| "-".into()),
            format!("{:?}", flag.state).to_lowercase(),
            flag.default,
            if per_target.is_empty() {
                String::new()
            } else {
                format!(" ({})", per_target.join(", "))
            }
        );
    }
}

/// Guardrail findings after a plan (text and markdown).
pub fn policy_findings(format: Format, report: &guard::Report) {
    if report.findings.is_empty() && report.notes.is_empty() {
        return;
    }
    match format {
        Format::Markdown => {
            println!("\n**Policy findings** ({})\n", report.summary());
            for f in &report.findings {
                println!("- {}", md_escape(&f.to_string()));
            }
            for n in &report.notes {
                println!("- note: {}", md_escape(n));
            }
        }
        _ => {
            println!("\nPolicy findings ({}):", report.summary());
            for f in &report.findings {
                println!("  {f}");
            }
            for n in &report.notes {
                println!("  note: {n}");
            }
        }
    }
}

/// `sluice policy test`: the rollout each service gets, and every finding
/// as conftest prints them.
pub fn policy_test(format: Format, checked: &sluice_core::engine::Checked) {
    let topo = &checked.rendered.topology;
    let report = &checked.guard;
    if format == Format::Json {
        let rollouts: std::collections::BTreeMap<&String, _> =
            topo.services.iter().map(|(n, d)| (n, &d.rollout)).collect();
        print_json(&json!({
            "commit": checked.plan.revision.commit,
            "denied": report.is_denied(),
            "findings": report.findings,
            "evaluated": report.evaluated,
            "tests": report.tests,
            "passed": report.passed,
            "dropped": report.dropped,
            "notes": report.notes,
            "modules": report.modules,
            "rolloutFromRepository": topo.rollout_from_repository,
            "rollouts": rollouts,
            "waveLimit": topo.wave_limit.map(|w| w.to_string()),
        }));
        return;
    }
    let shipped = report
        .modules
        .iter()
        .filter(|m| m.origin == guard::Origin::Shipped)
        .count();
    println!(
        "commit {}: {} module(s) ({shipped} shipped, {} from the repository) over {} input(s); rollout defaults: {}",
        checked.plan.revision.commit.short(),
        report.modules.len(),
        report.modules.len() - shipped,
        report.evaluated,
        if topo.rollout_from_repository {
            "shipped + policies/rollout.yaml"
        } else {
            "shipped"
        }
    );
    for m in report
        .modules
        .iter()
        .filter(|m| m.origin == guard::Origin::Repository)
    {
        println!("  {} (repository)", m.path);
    }
    println!("\nRollout per service:");
    for (name, d) in &topo.services {
        let r = &d.rollout;
        let mut line = format!(
            "  {name:<16} {:<9} {:<9} soak {:<6} gate timeout {:<6}",
            format!("{:?}", r.criticality).to_lowercase(),
            format!("{:?}", r.strategy).to_lowercase(),
            sluice_core::duration::format(r.soak),
            sluice_core::duration::format(r.gate_timeout),
        );
        match r.strategy {
            sluice_core::model::Strategy::Canary => {
                let _ = write!(
                    line,
                    " steps {:?} every {}, errors <= {}x baseline, min {} requests, inconclusive: {:?}",
                    r.canary.steps,
                    sluice_core::duration::format(r.canary.interval),
                    r.analysis.max_error_ratio,
                    r.analysis.min_requests,
                    r.inconclusive
                );
            }
            sluice_core::model::Strategy::Rolling => {
                let _ = write!(line, " maxUnavailable {}", r.max_unavailable);
            }
            sluice_core::model::Strategy::Bluegreen => {
                let _ = write!(
                    line,
                    " keep warm {}",
                    sluice_core::duration::format(r.keep_warm)
                );
            }
            sluice_core::model::Strategy::Recreate => {}
        }
        println!("{}", line.trim_end());
    }
    println!();
    for f in &report.findings {
        println!("{f}");
    }
    if report.dropped > 0 {
        println!("... and {} more", report.dropped);
    }
    for n in &report.notes {
        println!("note: {n}");
    }
    if !report.findings.is_empty() || !report.notes.is_empty() {
        println!();
    }
    println!(
        "{}{}",
        report.summary(),
        if report.is_denied() {
            ": this commit would not be applied"
        } else {
            ""
        }
    );
}
