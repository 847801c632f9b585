//! Server-side apply semantics for diffs: which part of a live Kubernetes
//! object sluice's apply would touch. Pure.
//!
//! A live object holds far more than the manifest: server defaults
//! (`imagePullPolicy`, `strategy`, `protocol: TCP`), fields other managers
//! own (an HPA's `replicas`, an injected sidecar), `status`. Comparing the
//! whole object with the manifest would report all of that as drift. Like
//! `kubectl diff --server-side`, sluice compares only the fields it manages:
//! those the manifest sets, plus those sluice's field manager owns on the
//! live object (`metadata.managedFields`, FieldsV1) — the latter so that a
//! field removed from the manifest shows as removed, as the next apply will
//! remove it.
//!
//! Normalisations, so that equal intents compare equal:
//! - quantities under `requests`, `limits`, `capacity`, `hard`,
//!   `allocatable` compare by value (`1000m` = `1` = `1.0`, `1Gi` =
//!   `1024Mi`);
//! - a Secret's write-only `stringData` compares as the base64 `data` the
//!   server stores it as.
//!
//! Known limits: list items are matched by FieldsV1 key (`k:{...}`), else
//! by `name`, else by index; list order is the live order.

use base64::Engine as _;
use serde_json::{Map, Value};

/// The keys under which Kubernetes quantities live.
const QUANTITY_PARENTS: [&str; 5] = ["requests", "limits", "capacity", "hard", "allocatable"];

/// `live` cut down to the fields `desired` sets or `managed` (sluice's
/// FieldsV1) owns, with equal quantities written as `desired` writes them.
pub fn project(live: &Value, desired: &Value, managed: &Value) -> Value {
    let desired = normalise_desired(desired);
    // An empty set at the top owns nothing (unlike `{}` below a field,
    // which owns that field whole).
    let managed = managed.as_object().filter(|m| !m.is_empty());
    proj(live, Some(&desired), managed, "", "", false).unwrap_or(Value::Null)
}

/// The manifest as the server will store it, for comparison: a Secret's
/// `stringData` merged into `data`, base64-encoded.
pub fn normalise_desired(desired: &Value) -> Value {
    let mut d = desired.clone();
    let is_secret = d["kind"] == "Secret" && d["apiVersion"] == "v1";
    if is_secret {
        if let Some(Value::Object(string_data)) =
            d.as_object_mut().and_then(|o| o.remove("stringData"))
        {
            let data = d
                .as_object_mut()
                .map(|o| o.entry("data").or_insert_with(|| Value::Object(Map::new())));
            if let Some(Value::Object(data)) = data {
                for (k, v) in string_data {
                    let text = v
                        .as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| v.to_string());
                    data.insert(
                        k,
                        Value::String(base64::engine::general_purpose::STANDARD.encode(text)),
                    );
                }
            }
        }
    }
    d
}

/// `key` is the field `live` sits under, `parent` the one above it.
fn proj(
    live: &Value,
    want: Option<&Value>,
    mask: Option<&Map<String, Value>>,
    key: &str,
    parent: &str,
    within_atomic: bool,
) -> Option<Value> {
    // An owned leaf (`{}`) over a map or list: owned whole (atomic), and
    // so is every list below it.
    let atomic = mask.is_some_and(|m| m.is_empty());
    let whole = atomic || within_atomic;
    match live {
        Value::Object(l) if !atomic || want.is_some_and(Value::is_object) => {
            let mut out = Map::new();
            for (k, v) in l {
                let wk = want.and_then(|w| w.get(k));
                let mk = mask
                    .and_then(|m| m.get(&format!("f:{k}")))
                    .and_then(Value::as_object);
                if wk.is_none() && mk.is_none() && !atomic {
                    continue;
                }
                if let Some(p) = proj(v, wk, mk, k, key, whole) {
                    out.insert(k.clone(), p);
                }
            }
            Some(Value::Object(out))
        }
        // An atomic list is owned whole, but its items still compare by
        // what the manifest sets, so defaults inside them are not changes.
        Value::Array(items) if !atomic || want.is_some_and(Value::is_array) => {
            let atomic = whole;
            let want_items = want.and_then(Value::as_array);
            let mut out = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let counterpart = want_items.and_then(|w| counterpart(w, item, i));
                let sub = if atomic {
                    None
                } else {
                    mask.and_then(|m| item_mask(m, item, i))
                };
                if counterpart.is_none() && sub.is_none() && !whole {
                    continue;
                }
                let sub_fields = sub
                    .and_then(Value::as_object)
                    .filter(|o| o.keys().any(|k| k != "."));
                match (counterpart, sub_fields) {
                    // Owned whole: an atomic list's item, a set item.
                    (None, None) => out.push(item.clone()),
                    (c, m) => {
                        if let Some(p) = proj(item, c, m, key, parent, whole) {
                            out.push(p);
                        }
                    }
                }
            }
            Some(Value::Array(out))
        }
        scalar => Some(match want {
            Some(w) if QUANTITY_PARENTS.contains(&parent) && same_quantity(w, scalar) => w.clone(),
            _ => scalar.clone(),
        }),
    }
}

/// The desired item a live list item corresponds to: same `name`, else the
/// same position.
fn counterpart<'a>(want: &'a [Value], item: &Value, index: usize) -> Option<&'a Value> {
    match item.get("name") {
        Some(name) => want.iter().find(|w| w.get("name") == Some(name)),
        None => want.get(index),
    }
}

/// The FieldsV1 entry owning a live list item: `k:{fields}` whose fields
/// all equal the item's, `v:value`, or `i:index`.
fn item_mask<'a>(mask: &'a Map<String, Value>, item: &Value, index: usize) -> Option<&'a Value> {
    mask.iter().find_map(|(key, sub)| {
        let hit = if let Some(k) = key.strip_prefix("k:") {
            serde_json::from_str::<Map<String, Value>>(k)
                .ok()
                .is_some_and(|fields| {
                    fields
                        .iter()
                        .all(|(f, v)| item.get(f).is_some_and(|iv| same_scalar(iv, v)))
                })
        } else if let Some(v) = key.strip_prefix("v:") {
            serde_json::from_str::<Value>(v).ok().as_ref() == Some(item)
        } else if let Some(i) = key.strip_prefix("i:") {
            i.parse::<usize>().ok() == Some(index)
        } else {
            false
        };
        hit.then_some(sub)
    })
}

fn same_scalar(a: &Value, b: &Value) -> bool {
    a == b || a.as_f64().zip(b.as_f64()).is_some_and(|(x, y)| x == y)
}

fn same_quantity(a: &Value, b: &Value) -> bool {
    match (quantity(a), quantity(b)) {
        (Some(x), Some(y)) => (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1.0),
        _ => false,
    }
}

/// A Kubernetes quantity (`100m`, `1.5`, `64Mi`, `1e3`, `2G`) as a number.
pub fn quantity(v: &Value) -> Option<f64> {
    let s = match v {
        Value::Number(n) => return n.as_f64(),
        Value::String(s) => s.trim(),
        _ => return None,
    };
    const SUFFIXES: [(&str, f64); 14] = [
        ("Ki", 1024.0),
        ("Mi", 1048576.0),
        ("Gi", 1073741824.0),
        ("Ti", 1099511627776.0),
        ("Pi", 1125899906842624.0),
        ("Ei", 1152921504606846976.0),
        ("n", 1e-9),
        ("u", 1e-6),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
    ];
    let (number, scale) = SUFFIXES
        .iter()
        .find_map(|(suffix, scale)| s.strip_suffix(suffix).map(|n| (n, *scale)))
        .or_else(|| s.strip_suffix('E').map(|n| (n, 1e18)))
        .unwrap_or((s, 1.0));
    if number.is_empty()
        || !number.starts_with(|c: char| c.is_ascii_digit() || c == '.' || c == '-' || c == '+')
    {
        return None;
    }
    number
        .parse::<f64>()
        .ok()
        .filter(|n| n.is_finite())
        .map(|n| n * scale)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diff::diff;
    use serde_json::json;

    /// The Deployment sluice applied and what the API server answered
    /// (fixture 13 of the recorded kube-apiserver 1.32 exchanges).
    fn fixture(name: &str) -> Value {
        let path = format!(
            "{}/../../tests/fixtures/kube-apiserver-1.32/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        serde_json::from_str(&text).unwrap()
    }

    fn applied(name: &str) -> (Value, Value, Value) {
        let f = fixture(name);
        let body = f["request"]["body"].as_str().unwrap();
        let desired: Value = serde_yaml::from_str(body).unwrap();
        let live = f["response"]["body"].clone();
        let managed = live["metadata"]["managedFields"]
            .as_array()
            .and_then(|m| m.iter().find(|e| e["manager"] == "sluice"))
            .map(|e| e["fieldsV1"].clone())
            .unwrap();
        (desired, live, managed)
    }

    #[test]
    fn server_defaults_and_status_are_not_differences() {
        let (desired, live, managed) = applied("13-ssa-deployment-create.json");
        assert!(
            live["spec"]["strategy"].is_object(),
            "the fixture has defaults"
        );
        let seen = project(&live, &desired, &managed);
        assert_eq!(diff(&seen, &desired, &[]), vec![], "{seen:#}");
    }

    #[test]
    fn an_object_sluice_never_applied_compares_by_the_manifest_only() {
        // Adopted: made by another tool, so sluice owns nothing on it yet.
        let (desired, live, _) = applied("13-ssa-deployment-create.json");
        assert_eq!(
            diff(&project(&live, &desired, &json!({})), &desired, &[]),
            vec![]
        );
    }

    #[test]
    fn equal_quantities_compare_equal_and_changes_show_per_path() {
        let (mut desired, mut live, managed) = applied("13-ssa-deployment-create.json");
        desired["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] =
            json!("1000m");
        desired["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["memory"] =
            json!("0.0625Gi");
        assert_eq!(
            diff(&project(&live, &desired, &managed), &desired, &[]),
            vec![]
        );
        // Someone scaled by hand, and the manifest moved on: both show.
        live["spec"]["replicas"] = json!(7);
        desired["spec"]["template"]["spec"]["containers"][0]["image"] = json!("web:2");
        let d = diff(&project(&live, &desired, &managed), &desired, &[]);
        let paths: Vec<_> = d.iter().map(|c| c.path.as_str()).collect();
        assert_eq!(
            paths,
            ["spec.replicas", "spec.template.spec.containers[0].image"]
        );
        assert_eq!(d[0].old, Some(json!(7)));
    }

    #[test]
    fn a_field_dropped_from_the_manifest_shows_as_removed() {
        let (mut desired, live, managed) = applied("13-ssa-deployment-create.json");
        desired["metadata"]
            .as_object_mut()
            .unwrap()
            .remove("labels");
        let d = diff(&project(&live, &desired, &managed), &desired, &[]);
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0].path, "metadata.labels");
        assert!(d[0].new.is_none());
    }

    #[test]
    fn secret_string_data_compares_as_data_and_values_never_show() {
        let (desired, live, managed) = applied("21-ssa-secret.json");
        let redact = vec!["data".to_string(), "stringData".to_string()];
        let want = normalise_desired(&desired);
        assert_eq!(
            diff(&project(&live, &desired, &managed), &want, &redact),
            vec![]
        );
        let mut changed = desired.clone();
        changed["stringData"]["password"] = json!("another-value");
        let d = diff(
            &project(&live, &changed, &managed),
            &normalise_desired(&changed),
            &redact,
        );
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].path, "data.password");
        let text = serde_json::to_string(&d).unwrap();
        assert!(
            !text.contains("CANARY") && !text.contains("Q0FOQVJZ") && !text.contains("another"),
            "{text}"
        );
    }

    #[test]
    fn defaults_inside_atomic_lists_are_not_differences() {
        // HTTPRoute rules are atomic lists; the server fills in backendRef
        // group and kind and a default match (fixture 40).
        let (desired, live, managed) = applied("40-ssa-httproute-weights.json");
        assert_eq!(managed["f:spec"]["f:rules"], json!({}));
        assert_eq!(
            diff(&project(&live, &desired, &managed), &desired, &[]),
            vec![]
        );
        let mut moved = desired.clone();
        moved["spec"]["rules"][0]["backendRefs"][0]["weight"] = json!(50);
        moved["spec"]["rules"][0]["backendRefs"][1]["weight"] = json!(50);
        let d = diff(&project(&live, &moved, &managed), &moved, &[]);
        let paths: Vec<_> = d.iter().map(|c| c.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "spec.rules[0].backendRefs[0].weight",
                "spec.rules[0].backendRefs[1].weight"
            ]
        );
    }

    #[test]
    fn an_item_left_in_an_atomic_list_shows() {
        // A crash left the canary's backendRef in the route, weight 0.
        let (desired, mut live, managed) = applied("40-ssa-httproute-weights.json");
        live["spec"]["rules"][0]["backendRefs"]
            .as_array_mut()
            .unwrap()
            .push(json!({"group": "", "kind": "Service", "name": "left-over", "port": 80, "weight": 0}));
        let d = diff(&project(&live, &desired, &managed), &desired, &[]);
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0].path, "spec.rules[0].backendRefs");
    }

    #[test]
    fn quantities_parse() {
        assert_eq!(quantity(&json!("100m")), Some(0.1));
        assert_eq!(quantity(&json!("64Mi")), Some(67108864.0));
        assert_eq!(quantity(&json!(2)), Some(2.0));
        assert_eq!(quantity(&json!("1e3")), Some(1000.0));
        assert_eq!(quantity(&json!("web")), None);
        assert_eq!(quantity(&json!("Mi")), None);
    }
}
