//! The plan stage: desired vs live, grouped into waves. Pure.
//!
//! # Ordering (deterministic, documented)
//! 1. Dependency level: a service rolls after everything in its `dependsOn`
//!    (level = 1 + the highest level of its dependencies).
//! 2. Target ring: ring 0 before ring 1, inside one level. With a wave
//!    limit (policy `waves.maxShare`), a ring's targets are split over
//!    several waves, in target name order.
//! 3. Inside a wave: deletes last; creates and updates by kind order
//!    (`File` before `Process` before `Route` on hosts, so configuration is
//!    in place before the process that reads it, and a route only points at
//!    a running process), then by name.
//!
//! Namespaces and CustomResourceDefinitions are created and updated in the
//! first wave of their ring, whichever service declares them.
//!
//! Resources of services that no longer exist are pruned in a final wave.
//!
//! # Pruning
//! Only resources in the inventory (what sluice recorded creating) and no
//! longer desired are deleted: a set difference of inventories, never
//! "everything live that is not in the render".

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::diff::{diff, FieldChange};
use crate::error::RenderError;
use crate::model::{Strategy, Topology};
use crate::resource::{DesiredState, Health, LiveResource, ResourceId};
use crate::source::Revision;
use crate::topology::{find_cycle, levels};

/// What will happen to one resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Create,
    Update,
    Delete,
    /// Dropped from sluice's inventory and left in place: a Namespace, CRD
    /// or PersistentVolumeClaim not annotated `sluice.dev/prune: "true"`,
    /// or anything annotated `"false"`. Deleting those loses data.
    Release,
    Unchanged,
}

/// Kinds whose objects are only deleted on opt-in (`sluice.dev/prune:
/// "true"`): deleting them deletes what they hold.
pub const PRUNE_PROTECTED: [&str; 3] = [
    "Namespace",
    "apiextensions.k8s.io/CustomResourceDefinition",
    "PersistentVolumeClaim",
];

/// The annotation that opts an object into pruning ("true") or out ("false").
pub const PRUNE_ANNOTATION: &str = "sluice.dev/prune";

/// Whether an object sluice no longer wants is released rather than
/// deleted, from its kind and its live annotation.
pub fn released(id: &ResourceId, live: Option<&LiveResource>) -> bool {
    let prune = live.and_then(|l| l.body["metadata"]["annotations"][PRUNE_ANNOTATION].as_str());
    prune == Some("false") || (PRUNE_PROTECTED.contains(&id.kind.as_str()) && prune != Some("true"))
}

/// One resource's change.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Change {
    pub id: ResourceId,
    pub service: String,
    pub action: Action,
    /// Field paths that differ (empty for create and delete).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<FieldChange>,
}

/// A group of changes applied together and gated together.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Wave {
    pub index: usize,
    /// Dependency level (0: depends on nothing).
    pub level: usize,
    pub ring: u32,
    pub services: Vec<String>,
    pub changes: Vec<Change>,
    /// Whether this is the final wave pruning services that were removed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub prune: bool,
}

/// The whole plan for one commit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub revision: Revision,
    pub digest: String,
    pub waves: Vec<Wave>,
    /// Resources already as desired.
    pub unchanged: Vec<ResourceId>,
    /// Strategy per changed service, as the rollout will use it.
    pub strategies: BTreeMap<String, Strategy>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.waves.is_empty()
    }

    pub fn changes(&self) -> impl Iterator<Item = &Change> {
        self.waves.iter().flat_map(|w| w.changes.iter())
    }

    /// "2 to create, 1 to update, 0 to delete, 4 unchanged, in 2 wave(s)",
    /// with "1 to release (kept, no longer managed)" when there are any.
    pub fn summary(&self) -> String {
        let released = match self.count(Action::Release) {
            0 => String::new(),
            n => format!(", {n} to release (kept, no longer managed)"),
        };
        format!(
            "{} to create, {} to update, {} to delete{released}, {} unchanged, in {} wave(s)",
            self.count(Action::Create),
            self.count(Action::Update),
            self.count(Action::Delete),
            self.count(Action::Unchanged),
            self.waves.len()
        )
    }

    pub fn count(&self, action: Action) -> usize {
        match action {
            Action::Unchanged => self.unchanged.len(),
            a => self.changes().filter(|c| c.action == a).count(),
        }
    }
}

/// What the inventory knows of a resource sluice created.
pub type Inventory = BTreeMap<ResourceId, String>;

/// Compares `desired` with `live` and orders the differences into waves.
///
/// `live` holds what the targets observed for the desired resources and the
/// inventory; `inventory` is what sluice created before (resource → service).
pub fn plan(
    topology: &Topology,
    desired: &DesiredState,
    live: &BTreeMap<ResourceId, LiveResource>,
    inventory: &Inventory,
) -> Result<Plan, RenderError> {
    if let Some(cycle) = find_cycle(topology) {
        return Err(RenderError::Cycle { cycle });
    }
    let levels = levels(topology);
    let rings: BTreeMap<&str, u32> = topology
        .targets
        .iter()
        .map(|t| (t.name.as_str(), t.ring))
        .collect();
    let max_level = levels.values().copied().max().unwrap_or(0);

    let mut buckets: BTreeMap<(bool, usize, u32), Vec<Change>> = BTreeMap::new();
    let mut unchanged = Vec::new();
    for (id, want) in &desired.resources {
        let change = match live.get(id) {
            None => Change {
                id: id.clone(),
                service: want.service.clone(),
                action: Action::Create,
                fields: Vec::new(),
            },
            Some(have) => {
                let fields = match &have.managed {
                    Some(managed) => diff(
                        &crate::managed::project(&have.body, &want.body, managed),
                        &crate::managed::normalise_desired(&want.body),
                        &want.redact,
                    ),
                    None => diff(&have.body, &want.body, &want.redact),
                };
                // A resource whose body matches but which is gone or broken
                // is re-applied too: the apply is idempotent.
                let broken = matches!(have.health, Health::Missing);
                if fields.is_empty() && !broken {
                    unchanged.push(id.clone());
                    continue;
                }
                Change {
                    id: id.clone(),
                    service: want.service.clone(),
                    action: Action::Update,
                    fields,
                }
            }
        };
        // Namespaces and CRDs go in the first wave of their ring, whichever
        // service declares them: any service's objects may need them.
        let level = if kind_rank(&id.kind) <= FOUNDATION_RANK {
            0
        } else {
            levels.get(&want.service).copied().unwrap_or(0)
        };
        let ring = rings.get(id.target.as_str()).copied().unwrap_or(0);
        buckets
            .entry((false, level, ring))
            .or_default()
            .push(change);
    }
    for (id, service) in inventory {
        if desired.resources.contains_key(id) {
            continue;
        }
        let action = if released(id, live.get(id)) {
            Action::Release
        } else {
            Action::Delete
        };
        let change = Change {
            id: id.clone(),
            service: service.clone(),
            action,
            fields: Vec::new(),
        };
        let ring = rings.get(id.target.as_str()).copied().unwrap_or(0);
        let key = match levels.get(service) {
            Some(level) => (false, *level, ring),
            None => (true, max_level + 1, ring),
        };
        buckets.entry(key).or_default().push(change);
    }

    let ring_size = |ring: u32| topology.targets.iter().filter(|t| t.ring == ring).count();
    let mut strategies = BTreeMap::new();
    let mut waves = Vec::new();
    for ((prune, level, ring), changes) in buckets {
        // Wave limit: at most `share` of the ring's targets per wave.
        let per_wave = topology
            .wave_limit
            .map(|share| share.of(ring_size(ring)))
            .unwrap_or(usize::MAX);
        let mut by_target: BTreeMap<String, Vec<Change>> = BTreeMap::new();
        for c in changes {
            by_target.entry(c.id.target.clone()).or_default().push(c);
        }
        let groups: Vec<Vec<Change>> = if by_target.len() > per_wave {
            let targets: Vec<Vec<Change>> = by_target.into_values().collect();
            targets
                .chunks(per_wave)
                .map(|chunk| chunk.concat())
                .collect()
        } else {
            vec![by_target.into_values().flatten().collect()]
        };
        for mut changes in groups {
            changes.sort_by(|a, b| order_key(a).cmp(&order_key(b)));
            let services: BTreeSet<String> = changes.iter().map(|c| c.service.clone()).collect();
            for s in &services {
                if let Some(def) = topology.services.get(s) {
                    strategies.insert(s.clone(), def.rollout.strategy);
                }
            }
            waves.push(Wave {
                index: waves.len(),
                level,
                ring,
                services: services.into_iter().collect(),
                changes,
                prune,
            });
        }
    }
    Ok(Plan {
        revision: desired.revision.clone(),
        digest: desired.digest.clone(),
        waves,
        unchanged,
        strategies,
    })
}

fn order_key(c: &Change) -> (bool, i32, &ResourceId) {
    let kind_rank = kind_rank(&c.id.kind);
    let delete = matches!(c.action, Action::Delete | Action::Release);
    // Deletes go last and in reverse kind order (routes before processes).
    (delete, if delete { -kind_rank } else { kind_rank }, &c.id)
}

/// Kinds up to this rank (Namespaces, CRDs) are applied in the first wave.
const FOUNDATION_RANK: i32 = 1;

/// Apply order of kinds: things others need come first.
pub fn kind_rank(kind: &str) -> i32 {
    match kind {
        "Namespace" => 0,
        "apiextensions.k8s.io/CustomResourceDefinition" => 1,
        "File" | "ConfigMap" | "Secret" | "ServiceAccount" => 2,
        "Process" => 3,
        "Route" => 5,
        _ => 4,
    }
}

/// The plan for people.
pub fn to_text(plan: &Plan) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Plan for {} ({}) {}",
        plan.revision.commit.short(),
        plan.revision.summary,
        plan.digest
    );
    if plan.is_empty() {
        let _ = writeln!(
            s,
            "No changes: {} resources already as desired.",
            plan.unchanged.len()
        );
        return s;
    }
    let _ = writeln!(s, "{}", plan.summary());
    for w in &plan.waves {
        let kind = if w.prune {
            " (prune removed services)"
        } else {
            ""
        };
        let on: BTreeSet<&str> = w.changes.iter().map(|c| c.id.target.as_str()).collect();
        let _ = writeln!(
            s,
            "\nWave {} — level {}, ring {}: {}{} — on {}",
            w.index + 1,
            w.level,
            w.ring,
            w.services.join(", "),
            kind,
            on.into_iter().collect::<Vec<_>>().join(", ")
        );
        for c in &w.changes {
            let sign = match c.action {
                Action::Create => "+",
                Action::Update => "~",
                Action::Delete => "-",
                Action::Release => "0",
                Action::Unchanged => "=",
            };
            let _ = writeln!(s, "  {sign} {} ({})", c.id, c.service);
            for f in &c.fields {
                let show = |v: &Option<serde_json::Value>| match v {
                    None => "∅".to_string(),
                    Some(v) => compact(v),
                };
                let _ = writeln!(s, "      {}: {} → {}", f.path, show(&f.old), show(&f.new));
            }
        }
    }
    s
}

/// A one-line rendering of a value, cut to keep plans readable.
pub fn compact(v: &serde_json::Value) -> String {
    let s = match v {
        serde_json::Value::String(s) => format!("{s:?}"),
        v => v.to_string(),
    };
    if s.chars().count() > 120 {
        let cut: String = s.chars().take(117).collect();
        format!("{cut}...")
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Defaults, ServiceDef, TargetDef, TargetKind, TopologyKind};
    use crate::resource::DesiredResource;
    use crate::source::CommitId;
    use serde_json::json;

    fn topology(deps: &[(&str, &[&str])], targets: &[(&str, u32)]) -> Topology {
        Topology {
            api_version: crate::model::API_VERSION.into(),
            kind: TopologyKind::Topology,
            defaults: Defaults::default(),
            windows: Vec::new(),
            wave_limit: None,
            policies: Default::default(),
            rollout_from_repository: false,
            host_groups: Vec::new(),
            targets: targets
                .iter()
                .map(|(n, r)| TargetDef {
                    ssh: None,
                    name: n.to_string(),
                    kind: TargetKind::Host,
                    ring: *r,
                    service_account_name: None,
                })
                .collect(),
            services: deps
                .iter()
                .map(|(n, d)| {
                    (
                        n.to_string(),
                        ServiceDef {
                            path: n.to_string(),
                            depends_on: d.iter().map(|s| s.to_string()).collect(),
                            ..Default::default()
                        },
                    )
                })
                .collect(),
        }
    }

    fn desired(items: &[(&str, &str, &str, serde_json::Value)]) -> DesiredState {
        let resources = items
            .iter()
            .map(|(target, service, name, spec)| {
                let id = ResourceId::new(target, "Process", name);
                let r = DesiredResource {
                    id: id.clone(),
                    service: service.to_string(),
                    file: format!("{service}/p.yaml"),
                    body: json!({"spec": spec}),
                    redact: vec![],
                    strategy: Strategy::Rolling,
                    max_unavailable: None,
                    crash_restarts: None,
                    start_timeout: None,
                    impersonate: None,
                    blobs: Default::default(),
                };
                (id, r)
            })
            .collect();
        DesiredState::new(
            Revision {
                commit: CommitId::parse(&"b".repeat(40)).unwrap(),
                time: 0,
                summary: "test".into(),
            },
            resources,
        )
    }

    #[test]
    fn a_wave_limit_splits_a_ring_into_shares_of_its_targets() {
        let mut t = topology(
            &[("api", &[])],
            &[
                ("canary", 0),
                ("a", 1),
                ("b", 1),
                ("c", 1),
                ("d", 1),
                ("e", 1),
            ],
        );
        t.wave_limit = Some(crate::model::Share::Percent(40));
        let items: Vec<_> = ["canary", "a", "b", "c", "d", "e"]
            .iter()
            .map(|target| (*target, "api", "api", json!({"v": 2})))
            .collect();
        let p = plan(&t, &desired(&items), &BTreeMap::new(), &Inventory::new()).unwrap();
        let shape: Vec<(u32, Vec<&str>)> = p
            .waves
            .iter()
            .map(|w| {
                let targets = w.changes.iter().map(|c| c.id.target.as_str()).collect();
                (w.ring, targets)
            })
            .collect();
        // 40% of five ring-1 targets is two per wave; ring 0 goes first.
        assert_eq!(
            shape,
            vec![
                (0, vec!["canary"]),
                (1, vec!["a", "b"]),
                (1, vec!["c", "d"]),
                (1, vec!["e"]),
            ]
        );
    }

    #[test]
    fn waves_follow_dependencies_then_rings() {
        let t = topology(
            &[
                ("catalog", &[]),
                ("orders", &["catalog"]),
                ("web", &["orders"]),
                ("docs", &[]),
            ],
            &[("canary", 0), ("main", 1)],
        );
        let mut items = vec![];
        for target in ["main", "canary"] {
            for s in ["web", "orders", "catalog", "docs"] {
                items.push((target, s, s, json!({"v": 2})));
            }
        }
        let d = desired(&items);
        let p = plan(&t, &d, &BTreeMap::new(), &Inventory::new()).unwrap();
        let shape: Vec<(usize, u32, Vec<String>)> = p
            .waves
            .iter()
            .map(|w| (w.level, w.ring, w.services.clone()))
            .collect();
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            shape,
            vec![
                (0, 0, s(&["catalog", "docs"])),
                (0, 1, s(&["catalog", "docs"])),
                (1, 0, s(&["orders"])),
                (1, 1, s(&["orders"])),
                (2, 0, s(&["web"])),
                (2, 1, s(&["web"])),
            ]
        );
    }

    #[test]
    fn namespaces_and_crds_go_in_the_first_wave_whoever_declares_them() {
        let t = topology(&[("db", &[]), ("web", &["db"])], &[("cluster", 0)]);
        let mut d = desired(&[("cluster", "db", "db", json!({"v": 1}))]);
        for (kind, name) in [
            ("Namespace", "web"),
            (
                "apiextensions.k8s.io/CustomResourceDefinition",
                "widgets.example.com",
            ),
            ("apps/Deployment", "web"),
        ] {
            let id = ResourceId::new("cluster", kind, name);
            let mut r = d.resources.values().next().unwrap().clone();
            r.id = id.clone();
            r.service = "web".into();
            d.resources.insert(id, r);
        }
        let p = plan(&t, &d, &BTreeMap::new(), &Inventory::new()).unwrap();
        let waves: Vec<Vec<String>> = p
            .waves
            .iter()
            .map(|w| w.changes.iter().map(|c| c.id.kind.clone()).collect())
            .collect();
        assert_eq!(
            waves,
            [
                vec![
                    "Namespace",
                    "apiextensions.k8s.io/CustomResourceDefinition",
                    "Process"
                ],
                vec!["apps/Deployment"],
            ]
        );
    }

    #[test]
    fn unchanged_resources_are_left_out_and_updates_carry_field_paths() {
        let t = topology(&[("a", &[]), ("b", &[])], &[("local", 0)]);
        let d = desired(&[
            ("local", "a", "a", json!({"v": 1})),
            ("local", "b", "b", json!({"v": 2})),
        ]);
        let live: BTreeMap<_, _> = [("a", 1), ("b", 1)]
            .iter()
            .map(|(n, v)| {
                let id = ResourceId::new("local", "Process", n);
                (
                    id.clone(),
                    LiveResource {
                        id,
                        body: json!({"spec": {"v": v}}),
                        health: Health::Healthy,
                        managed: None,
                        message: None,
                    },
                )
            })
            .collect();
        let p = plan(&t, &d, &live, &Inventory::new()).unwrap();
        assert_eq!(p.unchanged, vec![ResourceId::new("local", "Process", "a")]);
        let changes: Vec<_> = p.changes().collect();
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].action, Action::Update);
        assert_eq!(changes[0].fields[0].path, "spec.v");
    }

    #[test]
    fn prune_is_the_inventory_minus_the_desired_set() {
        let t = topology(&[("a", &[])], &[("local", 0)]);
        let d = desired(&[("local", "a", "a", json!({}))]);
        let mut inv = Inventory::new();
        inv.insert(ResourceId::new("local", "Process", "a"), "a".into());
        inv.insert(ResourceId::new("local", "Process", "old"), "a".into());
        inv.insert(
            ResourceId::new("local", "Process", "gone"),
            "removed-service".into(),
        );
        // Live things sluice never created are not touched.
        let p = plan(&t, &d, &BTreeMap::new(), &inv).unwrap();
        let deletes: Vec<_> = p
            .changes()
            .filter(|c| c.action == Action::Delete)
            .map(|c| {
                (
                    c.id.name.as_str(),
                    p.waves
                        .iter()
                        .find(|w| w.changes.contains(c))
                        .unwrap()
                        .prune,
                )
            })
            .collect();
        assert_eq!(deletes, vec![("old", false), ("gone", true)]);
    }
}
