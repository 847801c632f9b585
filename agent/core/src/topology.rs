//! Loading `sluice.yaml`: targets, services, their dependency graph, and
//! the rollout every service gets once the defaults are resolved. Pure.

use std::collections::{BTreeMap, BTreeSet};

use crate::error::RenderError;
use crate::model::{TargetKind, Topology, API_VERSION, TOPOLOGY_FILE};
use crate::source::{normalise, PathError, Snapshot};
use crate::yaml::{find_line, parse_typed, utf8};

/// Reads and validates `sluice.yaml` and resolves every service's rollout
/// through the commit's rollout defaults (shipped, with the repository's
/// `policies/rollout.yaml` over them).
pub fn load(snapshot: &Snapshot) -> Result<Topology, RenderError> {
    let mut topology = read(snapshot)?;
    let (defaults, from_repository) = crate::rollout::load(snapshot)?;
    crate::rollout::apply_defaults(&defaults, &mut topology);
    topology.rollout_from_repository = from_repository;
    Ok(topology)
}

/// Dependency level of every service: 0 for a service that depends on
/// nothing, else one more than its highest dependency.
pub fn levels(topology: &Topology) -> BTreeMap<String, usize> {
    fn level(t: &Topology, s: &str, memo: &mut BTreeMap<String, usize>, depth: usize) -> usize {
        if let Some(l) = memo.get(s) {
            return *l;
        }
        // Cycles are refused at load; the depth cap only keeps a
        // hand-built topology from recursing forever.
        let l = match t.services.get(s) {
            Some(def) if depth < 1024 => def
                .depends_on
                .iter()
                .map(|d| level(t, d, memo, depth + 1) + 1)
                .max()
                .unwrap_or(0),
            _ => 0,
        };
        memo.insert(s.to_string(), l);
        l
    }
    let mut memo = BTreeMap::new();
    for s in topology.services.keys() {
        level(topology, s, &mut memo, 0);
    }
    memo
}

fn read(snapshot: &Snapshot) -> Result<Topology, RenderError> {
    let bytes = snapshot.read("", TOPOLOGY_FILE).map_err(|e| match e {
        PathError::NotFound { .. } => RenderError::invalid(
            TOPOLOGY_FILE,
            None,
            None,
            "not found at the root of the watched path",
        ),
        source => RenderError::Path {
            file: TOPOLOGY_FILE.to_string(),
            source,
        },
    })?;
    let text = utf8(TOPOLOGY_FILE, bytes)?;
    let mut topology: Topology = parse_typed(TOPOLOGY_FILE, text, 0)?;
    expand_host_groups(&mut topology, text)?;
    validate_topology(snapshot, &topology, text)?;
    Ok(topology)
}

/// Host groups become one target per host, and a service naming a group
/// among its `targets` runs on each of them.
fn expand_host_groups(t: &mut Topology, text: &str) -> Result<(), RenderError> {
    let err = |field: String, keys: &[&str], reason: String| {
        RenderError::invalid(TOPOLOGY_FILE, Some(&field), find_line(text, keys), reason)
    };
    for (i, target) in t.targets.iter().enumerate() {
        if let Some(dest) = &target.ssh {
            let field = format!("targets[{i}].ssh");
            if target.kind != TargetKind::Host {
                return Err(err(
                    field,
                    &["targets", &target.name, "ssh"],
                    "only a host target is reached over SSH".into(),
                ));
            }
            if let Err(reason) = check_ssh(dest) {
                return Err(err(field, &["targets", &target.name, "ssh"], reason));
            }
        }
    }
    let mut names: BTreeSet<String> = t.targets.iter().map(|x| x.name.clone()).collect();
    let mut members: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (i, g) in t.host_groups.iter().enumerate() {
        let field = format!("hostGroups[{i}]");
        if let Err(reason) = check_name(&g.name) {
            return Err(err(
                format!("{field}.name"),
                &["hostGroups", &g.name],
                reason,
            ));
        }
        if g.hosts.is_empty() {
            return Err(err(
                format!("{field}.hosts"),
                &["hostGroups", &g.name],
                "a host group needs at least one host".into(),
            ));
        }
        if t.targets.iter().any(|x| x.name == g.name) {
            return Err(err(
                format!("{field}.name"),
                &["hostGroups", &g.name],
                format!("{:?} names a target already", g.name),
            ));
        }
        for (j, h) in g.hosts.iter().enumerate() {
            if let Err(reason) = check_ssh(h.ssh()) {
                return Err(err(
                    format!("{field}.hosts[{j}]"),
                    &["hostGroups", &g.name, h.ssh()],
                    reason,
                ));
            }
        }
        let targets = g.targets();
        for (j, x) in targets.iter().enumerate() {
            if let Err(reason) = check_name(&x.name) {
                return Err(err(
                    format!("{field}.hosts[{j}].name"),
                    &["hostGroups", &g.name, g.hosts[j].ssh()],
                    reason,
                ));
            }
            if !names.insert(x.name.clone()) {
                return Err(err(
                    format!("{field}.hosts[{j}]"),
                    &["hostGroups", &g.name, g.hosts[j].ssh()],
                    format!(
                        "host target {:?} is declared twice (give the host a `name:`)",
                        x.name
                    ),
                ));
            }
        }
        members.insert(
            g.name.clone(),
            targets.iter().map(|x| x.name.clone()).collect(),
        );
        t.targets.extend(targets);
    }
    let expand = |names: Vec<String>| -> Vec<String> {
        names
            .into_iter()
            .flat_map(|name| members.get(&name).cloned().unwrap_or_else(|| vec![name]))
            .collect()
    };
    for s in t.services.values_mut() {
        s.targets = expand(std::mem::take(&mut s.targets));
    }
    for w in &mut t.windows {
        w.targets = expand(std::mem::take(&mut w.targets));
    }
    Ok(())
}

/// An SSH destination sluice passes to `ssh`: `[user@]host[:port]` or an
/// alias of the ssh config. Never an option (a leading `-`), no spaces or
/// control characters.
fn check_ssh(dest: &str) -> Result<(), String> {
    if dest.is_empty() {
        return Err("an SSH destination is needed, e.g. deploy@10.0.0.11".into());
    }
    if dest.starts_with('-') {
        return Err(format!(
            "{dest:?} is not an SSH destination (it starts with `-`)"
        ));
    }
    if let Some(c) = dest.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("{dest:?} is not an SSH destination ({c:?} in it)"));
    }
    Ok(())
}

fn validate_topology(snapshot: &Snapshot, t: &Topology, text: &str) -> Result<(), RenderError> {
    let line = |keys: &[&str]| find_line(text, keys);
    let err = |field: String, keys: &[&str], reason: String| {
        RenderError::invalid(TOPOLOGY_FILE, Some(&field), line(keys), reason)
    };
    if t.api_version != API_VERSION {
        return Err(err(
            "apiVersion".into(),
            &["apiVersion"],
            format!("must be {API_VERSION:?}"),
        ));
    }
    if t.targets.is_empty() {
        return Err(err(
            "targets".into(),
            &["targets"],
            "at least one target is needed".into(),
        ));
    }
    let mut names = BTreeSet::new();
    for (i, target) in t.targets.iter().enumerate() {
        let field = format!("targets[{i}].name");
        if let Err(reason) = check_name(&target.name) {
            return Err(err(field, &["targets", &target.name], reason));
        }
        if !names.insert(target.name.as_str()) {
            return Err(err(
                field,
                &["targets", &target.name],
                format!("target {:?} is declared twice", target.name),
            ));
        }
    }
    if t.services.is_empty() {
        return Err(err(
            "services".into(),
            &["services"],
            "at least one service is needed".into(),
        ));
    }
    for (name, s) in &t.services {
        let at = |f: &str| format!("services.{name}.{f}");
        if let Err(reason) = check_name(name) {
            return Err(err(format!("services.{name}"), &["services", name], reason));
        }
        for target in &s.targets {
            if !names.contains(target.as_str()) {
                return Err(err(
                    at("targets"),
                    &["services", name, "targets", target],
                    format!(
                        "unknown target {target:?} (declared targets: {})",
                        join(&names)
                    ),
                ));
            }
        }
        for dep in &s.depends_on {
            if !t.services.contains_key(dep) {
                return Err(err(
                    at("dependsOn"),
                    &["services", name, "dependsOn", dep],
                    format!(
                        "unknown service {dep:?} (services: {})",
                        join(&t.services.keys().map(String::as_str).collect())
                    ),
                ));
            }
            if dep == name {
                return Err(RenderError::Cycle {
                    cycle: vec![name.clone(), name.clone()],
                });
            }
        }
        let path = normalise(&s.path, "").map_err(|_| {
            err(
                at("path"),
                &["services", name, "path"],
                "must be a folder inside the repository (no absolute path, no `..` above the root)"
                    .into(),
            )
        })?;
        if path.is_empty() || !snapshot.is_dir(&path) {
            return Err(err(
                at("path"),
                &["services", name, "path"],
                format!("folder {:?} not found in the commit", s.path),
            ));
        }
        if let Some(steps) = s.canary.as_ref().and_then(|c| c.steps.as_ref()) {
            crate::rollout::check_steps(steps).map_err(|r| {
                err(
                    at("canary.steps"),
                    &["services", name, "canary", "steps"],
                    r,
                )
            })?;
        }
        if let Some(ratio) = s.analysis.as_ref().and_then(|a| a.max_error_ratio) {
            if !(ratio.is_finite() && ratio >= 1.0) {
                return Err(err(
                    at("analysis.maxErrorRatio"),
                    &["services", name, "analysis", "maxErrorRatio"],
                    "must be a number of at least 1.0".into(),
                ));
            }
        }
    }
    for (i, w) in t.windows.iter().enumerate() {
        let field = format!("windows[{i}]");
        w.validate()
            .map_err(|reason| err(field.clone(), &["windows"], reason))?;
        for target in &w.targets {
            if !names.contains(target.as_str()) {
                return Err(err(
                    format!("{field}.targets"),
                    &["windows", target],
                    format!("unknown target {target:?}"),
                ));
            }
        }
        for service in &w.services {
            if !t.services.contains_key(service) {
                return Err(err(
                    format!("{field}.services"),
                    &["windows", service],
                    format!("unknown service {service:?}"),
                ));
            }
        }
    }
    check_policy_settings(t, text)?;
    if let Some(cycle) = find_cycle(t) {
        return Err(RenderError::Cycle { cycle });
    }
    Ok(())
}

/// The first dependency cycle found, in a deterministic order, closed (the
/// first service repeated at the end).
pub fn find_cycle(t: &Topology) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Active,
        Done,
    }
    fn visit(
        t: &Topology,
        n: &str,
        marks: &mut BTreeMap<String, Mark>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match marks.get(n).copied().unwrap_or(Mark::New) {
            Mark::Done => return None,
            Mark::Active => {
                let start = stack.iter().position(|s| s == n).unwrap_or(0);
                let mut cycle = stack[start..].to_vec();
                cycle.push(n.to_string());
                return Some(cycle);
            }
            Mark::New => {}
        }
        marks.insert(n.to_string(), Mark::Active);
        stack.push(n.to_string());
        if let Some(s) = t.services.get(n) {
            let mut deps: Vec<&String> = s.depends_on.iter().collect();
            deps.sort();
            for d in deps {
                if let Some(c) = visit(t, d, marks, stack) {
                    return Some(c);
                }
            }
        }
        stack.pop();
        marks.insert(n.to_string(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for name in t.services.keys() {
        if let Some(c) = visit(t, name, &mut marks, &mut Vec::new()) {
            return Some(c);
        }
    }
    None
}

/// Names of services, targets and resources: what is safe in a file name,
/// a label and a URL path.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(
            "must be 1-63 characters of a-z, 0-9, `-` and `.`, starting with a letter or digit"
                .into(),
        )
    }
}

fn join(names: &BTreeSet<&str>) -> String {
    names.iter().copied().collect::<Vec<_>>().join(", ")
}

/// `policies:`: package names as Rego spells them, each in one list; the
/// shipped guardrails are not the repository's to choose.
fn check_policy_settings(t: &Topology, text: &str) -> Result<(), RenderError> {
    let p = &t.policies;
    let lists = [("namespaces", &p.namespaces), ("combine", &p.combine)];
    for (name, list) in lists {
        let field = format!("policies.{name}");
        let err = |reason: String| {
            RenderError::invalid(
                TOPOLOGY_FILE,
                Some(&field),
                find_line(text, &["policies", name]),
                reason,
            )
        };
        for ns in list.iter() {
            let ok = ns == "*"
                || ns.split('.').all(|part| {
                    let mut chars = part.chars();
                    chars
                        .next()
                        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
                });
            if !ok {
                return Err(err(format!(
                    "{ns:?} is not a package name (e.g. main, policy.k8s) or \"*\""
                )));
            }
            if ns == "sluice" || ns.starts_with("sluice.") {
                return Err(err(format!(
                    "{ns:?}: the shipped guardrails (sluice.guardrails.*) always run once per document; list only the repository's packages"
                )));
            }
        }
    }
    let both: Vec<&String> = p
        .namespaces
        .iter()
        .filter(|n| p.combine.contains(n) && *n != "*")
        .collect();
    if let Some(ns) = both.first() {
        return Err(RenderError::invalid(
            TOPOLOGY_FILE,
            Some("policies.combine"),
            find_line(text, &["policies", "combine"]),
            format!("package {ns:?} is listed in both policies.namespaces and policies.combine; a package is evaluated one way"),
        ));
    }
    if p.namespaces.iter().any(|n| n == "*") && p.combine.iter().any(|n| n == "*") {
        return Err(RenderError::invalid(
            TOPOLOGY_FILE,
            Some("policies.combine"),
            find_line(text, &["policies", "combine"]),
            "\"*\" in both policies.namespaces and policies.combine; name the combined packages",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{CommitId, Revision};

    fn load_with(policies: &str) -> Result<Topology, RenderError> {
        load_text(&format!("apiVersion: sluice.dev/v1\nkind: Topology\ntargets:\n  - name: vm\n    type: host\nservices:\n  api:\n    path: api\n{policies}"))
    }

    /// The topology `topo` over one service folder `api` with one File.
    fn load_text(topo: &str) -> Result<Topology, RenderError> {
        let p = "apiVersion: sluice.dev/v1\nkind: File\nmetadata:\n  name: f\nspec:\n  path: f\n  content: x\n";
        let revision = Revision {
            commit: CommitId::parse(&"c".repeat(40)).unwrap(),
            time: 0,
            summary: "t".into(),
        };
        load(&Snapshot::from_texts(
            revision,
            &[("sluice.yaml", topo), ("api/f.yaml", p)],
        ))
    }

    #[test]
    fn policy_settings_default_to_main_and_are_checked() {
        let t = load_with("").unwrap();
        assert_eq!(t.policies.namespaces, ["main"]);
        assert!(t.policies.combine.is_empty());
        let t = load_with("policies:\n  namespaces: [\"*\"]\n  combine: [k8s.cross]\n").unwrap();
        assert_eq!(t.policies.combine, ["k8s.cross"]);
        for (bad, needle) in [
            (
                "policies:\n  namespaces: [main, \"a-b\"]\n",
                "not a package name",
            ),
            ("policies:\n  combine: [main]\n", "both"),
            (
                "policies:\n  namespaces: [sluice.guardrails.images]\n",
                "always run",
            ),
            ("policies:\n  namspaces: [main]\n", "namspaces"),
        ] {
            let e = load_with(bad).unwrap_err().to_string();
            assert!(
                e.contains("sluice.yaml") && e.contains(needle),
                "{bad}: {e}"
            );
        }
    }

    fn load_groups(groups: &str, services: &str) -> Result<Topology, RenderError> {
        load_text(&format!(
            "apiVersion: sluice.dev/v1\nkind: Topology\nhostGroups:\n{groups}services:\n{services}"
        ))
    }

    #[test]
    fn a_host_group_is_one_target_per_host_in_rings_by_share() {
        let t = load_groups(
            "  - name: web\n    hosts: [deploy@10.0.0.1, 10.0.0.2, \"web-3:2222\", {ssh: root@web-4.example, name: four}, {ssh: web-5, ring: 0}]\n    rings: [1, 25%, 100%]\n",
            "  api:\n    path: api\n    targets: [web]\n",
        )
        .unwrap();
        let got: Vec<(&str, u32, Option<&str>)> = t
            .targets
            .iter()
            .map(|x| (x.name.as_str(), x.ring, x.ssh.as_deref()))
            .collect();
        // 1 host, then ceil(25% of 5) = 2, then the rest; web-5 in ring 0
        // by its own word.
        assert_eq!(
            got,
            [
                ("web-10-0-0-1", 0, Some("deploy@10.0.0.1")),
                ("web-10-0-0-2", 1, Some("10.0.0.2")),
                ("web-web-3", 1, Some("web-3:2222")),
                ("web-four", 2, Some("root@web-4.example")),
                ("web-web-5", 0, Some("web-5")),
            ]
        );
        assert_eq!(
            t.services["api"].targets,
            [
                "web-10-0-0-1",
                "web-10-0-0-2",
                "web-web-3",
                "web-four",
                "web-web-5"
            ]
        );
        // No rings: one ring for all.
        let t = load_groups(
            "  - name: db\n    hosts: [a, b]\n    ring: 3\n",
            "  api:\n    path: api\n",
        )
        .unwrap();
        assert!(t.targets.iter().all(|x| x.ring == 3), "{:?}", t.targets);
    }

    #[test]
    fn bad_host_groups_and_destinations_name_their_field() {
        for (groups, needle) in [
            ("  - name: web\n    hosts: []\n", "hostGroups[0].hosts"),
            (
                "  - name: web\n    hosts: [\"-oProxyCommand=x\"]\n",
                "hostGroups[0].hosts[0]",
            ),
            ("  - name: web\n    hosts: [a, a]\n", "declared twice"),
            ("  - name: Web\n    hosts: [a]\n", "hostGroups[0].name"),
        ] {
            let e = load_groups(groups, "  api:\n    path: api\n")
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("sluice.yaml") && e.contains(needle),
                "{groups}: {e}"
            );
        }
    }
}
