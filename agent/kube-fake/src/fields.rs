//! FieldsV1 sets, as the API server's structured-merge-diff keeps them in
//! `metadata.managedFields`, and the merges that write objects: JSON merge
//! patches, strategic merge patches and server-side apply.
//!
//! Lists are keyed (`x-kubernetes-list-type: map`) where the built-in
//! schemas key them ([`list_key`]), `finalizers` is a set, every other list
//! is atomic; label and Service selectors are atomic maps.

use serde_json::{json, Map, Value};

/// Deep merge as a JSON merge patch (null deletes).
pub(crate) fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

/// The key fields of list `field`'s items, if the built-in schemas key it
/// (`x-kubernetes-list-type: map`); every other list is atomic, as lists
/// in CRDs are unless their schema says otherwise.
pub(crate) fn list_key(field: &str, items: &[Value]) -> Option<Vec<&'static str>> {
    let all = |f: &str| items.iter().all(|i| i.get(f).is_some());
    match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets"
            if all("name") =>
        {
            Some(vec!["name"])
        }
        "volumeMounts" if all("mountPath") => Some(vec!["mountPath"]),
        "ports" if all("containerPort") => Some(vec!["containerPort", "protocol"]),
        "ports" if all("port") => Some(vec!["port", "protocol"]),
        "conditions" if all("type") => Some(vec!["type"]),
        _ => None,
    }
}

pub(crate) fn item_key(item: &Value, key: &[&str]) -> String {
    let mut m = Map::new();
    for f in key {
        let v = match (item.get(*f), *f) {
            (Some(v), _) => v.clone(),
            (None, "protocol") => json!("TCP"),
            (None, _) => Value::Null,
        };
        m.insert(f.to_string(), v);
    }
    format!("k:{}", Value::Object(m))
}

/// FieldsV1 of everything `v` sets.
pub(crate) fn fields_of(v: &Value) -> Value {
    fields_in("", v)
}

/// FieldsV1 of `v`, the value of field `name`.
pub(crate) fn fields_in(name: &str, v: &Value) -> Value {
    match v {
        // Label selectors and Service selectors are atomic maps.
        Value::Object(_) if name == "selector" => json!({}),
        Value::Object(o) => {
            let mut m = Map::new();
            for (k, x) in o {
                m.insert(format!("f:{k}"), fields_in(k, x));
            }
            Value::Object(m)
        }
        // Finalizers are a set (`x-kubernetes-list-type: set`): one
        // `v:` entry per value (fixture 57e).
        Value::Array(items) if name == "finalizers" => Value::Object(
            items
                .iter()
                .map(|i| (format!("v:{i}"), json!({})))
                .collect(),
        ),
        Value::Array(items) => match list_key(name, items) {
            Some(key) => {
                let mut m = Map::new();
                for item in items {
                    let mut sub = fields_in("", item);
                    if let Value::Object(s) = &mut sub {
                        s.insert(".".into(), json!({}));
                    }
                    m.insert(item_key(item, &key), sub);
                }
                Value::Object(m)
            }
            None => json!({}),
        },
        _ => json!({}),
    }
}

/// Map-typed fields of the built-in schemas (`map[string]...`): an Update
/// that creates one owns the map itself too (`.`), as the real server
/// records it (fixture 59a's `kube-root-ca.crt`); structs do not get one
/// (fixture 61a's Lease `spec`).
const MAP_FIELDS: [&str; 9] = [
    "labels",
    "annotations",
    "data",
    "binaryData",
    "stringData",
    "limits",
    "requests",
    "nodeSelector",
    "matchLabels",
];

/// FieldsV1 of `v` (field `name`) as an Update that created it owns it:
/// as [`fields_in`], plus `.` on new maps, new keyed lists and their items.
pub(crate) fn created_fields(name: &str, v: &Value) -> Value {
    match v {
        Value::Object(_) if name == "selector" => json!({}),
        Value::Object(o) => {
            let mut m = Map::new();
            if MAP_FIELDS.contains(&name) {
                m.insert(".".into(), json!({}));
            }
            for (k, x) in o {
                m.insert(format!("f:{k}"), created_fields(k, x));
            }
            Value::Object(m)
        }
        Value::Array(items) => match list_key(name, items) {
            Some(key) => {
                let mut m = Map::new();
                m.insert(".".into(), json!({}));
                for item in items {
                    let mut sub = created_fields("", item);
                    if let Value::Object(s) = &mut sub {
                        s.insert(".".into(), json!({}));
                    }
                    m.insert(item_key(item, &key), sub);
                }
                Value::Object(m)
            }
            None => fields_in(name, v),
        },
        _ => json!({}),
    }
}

/// What an Update (a merge, strategic-merge or PUT) changed from `before`
/// to `after`, as FieldsV1: the real server gives an Update's manager the
/// fields whose values it changed or added (fixture 55a: `kubectl set env`
/// owns only the env value it changed), not every field it sent. None:
/// nothing changed.
pub(crate) fn changed_fields(name: &str, before: &Value, after: &Value) -> Option<Value> {
    if before == after {
        return None;
    }
    match (before, after) {
        (Value::Object(b), Value::Object(a)) if name != "selector" => {
            let mut m = Map::new();
            for (k, av) in a {
                let f = match b.get(k) {
                    None => Some(created_fields(k, av)),
                    Some(bv) => changed_fields(k, bv, av),
                };
                if let Some(f) = f {
                    m.insert(format!("f:{k}"), f);
                }
            }
            // Only removals: nothing this write owns.
            (!m.is_empty()).then_some(Value::Object(m))
        }
        (Value::Array(b), Value::Array(a)) => match (list_key(name, a), list_key(name, b)) {
            (Some(key), Some(_)) => {
                let mut m = Map::new();
                for item in a {
                    let k = item_key(item, &key);
                    let f = match b.iter().find(|x| item_key(x, &key) == k) {
                        None => {
                            let mut sub = created_fields("", item);
                            if let Value::Object(s) = &mut sub {
                                s.insert(".".into(), json!({}));
                            }
                            Some(sub)
                        }
                        Some(old) => changed_fields("", old, item),
                    };
                    if let Some(f) = f {
                        m.insert(k, f);
                    }
                }
                (!m.is_empty()).then_some(Value::Object(m))
            }
            _ => Some(fields_in(name, after)),
        },
        // A field present as null (a CRD's `status.conditions`) is not
        // created by the write: its lists get no `.` (fixture 31).
        (Value::Null, v) => Some(fields_in(name, v)),
        _ => Some(json!({})),
    }
}

/// `a` ∪ `b`, two FieldsV1 sets.
pub(crate) fn union(a: &mut Value, b: &Value) {
    match (a.as_object_mut(), b.as_object()) {
        (Some(am), Some(bm)) => {
            for (k, bv) in bm {
                union(am.entry(k.clone()).or_insert(json!({})), bv);
            }
        }
        _ => *a = b.clone(),
    }
}

/// Drops from `fields` the paths an Update removed (present in `before`,
/// gone from `after`): ownership of a removed field ends with it (fixture
/// 57f: removing the finalizers ends sluice's ownership of them). Fields
/// never stored (a Secret's `stringData`) stay owned.
pub(crate) fn retain_existing(fields: &mut Value, before: &Value, after: &Value) {
    let mut all = Vec::new();
    leaves(fields, &mut Vec::new(), &mut all);
    for path in all {
        if !path.is_empty() && value_at(before, &path).is_some() && value_at(after, &path).is_none()
        {
            let mut single = json!({});
            let mut cur = &mut single;
            for p in &path {
                cur = cur
                    .as_object_mut()
                    .map(|o| o.entry(p.clone()).or_insert(json!({})))
                    .unwrap_or_else(|| unreachable!("built from objects"));
            }
            subtract(fields, &single);
        }
    }
}

/// A strategic merge patch (`application/strategic-merge-patch+json`, as
/// `kubectl set`, `edit` and `scale` send): lists with a merge key (the
/// keyed lists of [`list_key`]) merge item by item, `$patch: delete`
/// removes an item, `$setElementOrder/…` and `$retainKeys` directives are
/// accepted and not modelled (order is kept as stored), null deletes.
pub(crate) fn strategic_merge(name: &str, target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if k.starts_with("$setElementOrder/") || k == "$retainKeys" || k == "$patch" {
                    continue;
                }
                if v.is_null() {
                    t.remove(k);
                } else {
                    strategic_merge(k, t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (Value::Array(t), Value::Array(p)) if list_key(name, p).is_some() => {
            let key = list_key(name, p).unwrap_or_default();
            for item in p {
                let k = item_key(item, &key);
                let at = t.iter().position(|x| item_key(x, &key) == k);
                if item["$patch"] == "delete" {
                    if let Some(i) = at {
                        t.remove(i);
                    }
                    continue;
                }
                match at {
                    Some(i) => strategic_merge("", &mut t[i], item),
                    None => {
                        let mut fresh = Value::Null;
                        strategic_merge("", &mut fresh, item);
                        t.push(fresh);
                    }
                }
            }
        }
        (t @ Value::Null, Value::Object(p)) => {
            *t = json!({});
            strategic_merge(name, t, &Value::Object(p.clone()));
        }
        (t, p) => *t = p.clone(),
    }
}

/// Leaf paths of a FieldsV1 set.
pub(crate) fn leaves(fields: &Value, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    match fields.as_object() {
        Some(m) if m.keys().any(|k| k != ".") => {
            for (k, v) in m.iter().filter(|(k, _)| *k != ".") {
                prefix.push(k.clone());
                leaves(v, prefix, out);
                prefix.pop();
            }
        }
        _ => out.push(prefix.clone()),
    }
}

/// Removes from `owned` every leaf path in `taken`.
pub(crate) fn subtract(owned: &mut Value, taken: &Value) {
    let (Some(o), Some(t)) = (owned.as_object_mut(), taken.as_object()) else {
        return;
    };
    for (k, tv) in t {
        if k == "." {
            continue;
        }
        let leaf = tv.as_object().is_none_or(|m| m.keys().all(|k| k == "."));
        if leaf {
            o.remove(k);
        } else if let Some(ov) = o.get_mut(k) {
            subtract(ov, tv);
            if ov.as_object().is_some_and(|m| m.keys().all(|k| k == "."))
                && ov.as_object().is_some_and(|m| m.is_empty())
            {
                o.remove(k);
            }
        }
    }
}

pub(crate) fn has_path(fields: &Value, path: &[String]) -> bool {
    let mut cur = fields;
    for p in path {
        match cur.get(p) {
            Some(next) => cur = next,
            None => return false,
        }
    }
    true
}

/// The value at a FieldsV1 path in an object.
pub(crate) fn value_at<'a>(obj: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut cur = obj;
    for p in path {
        if let Some(f) = p.strip_prefix("f:") {
            cur = cur.get(f)?;
        } else if let Some(v) = p.strip_prefix("v:") {
            let v: Value = serde_json::from_str(v).ok()?;
            cur = cur.as_array()?.iter().find(|item| **item == v)?;
        } else if let Some(k) = p.strip_prefix("k:") {
            let key: Map<String, Value> = serde_json::from_str(k).ok()?;
            cur = cur.as_array()?.iter().find(|item| {
                key.iter().all(|(f, v)| {
                    item.get(f).unwrap_or(&Value::Null) == v
                        || (f == "protocol" && item.get(f).is_none() && v == "TCP")
                })
            })?;
        } else {
            return None;
        }
    }
    Some(cur)
}

/// Removes a FieldsV1 leaf path from an object.
pub(crate) fn remove_at(obj: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut cur = obj;
    for p in parents {
        let next = if let Some(f) = p.strip_prefix("f:") {
            cur.get_mut(f)
        } else if let Some(k) = p.strip_prefix("k:") {
            let Ok(key) = serde_json::from_str::<Map<String, Value>>(k) else {
                return;
            };
            cur.as_array_mut().and_then(|a| {
                a.iter_mut().find(|item| {
                    key.iter().all(|(f, v)| {
                        item.get(f) == Some(v) || (f == "protocol" && item.get(f).is_none())
                    })
                })
            })
        } else {
            None
        };
        match next {
            Some(n) => cur = n,
            None => return,
        }
    }
    if let Some(f) = last.strip_prefix("f:") {
        if let Some(o) = cur.as_object_mut() {
            o.remove(f);
        }
    } else if let (Some(v), Some(a)) = (last.strip_prefix("v:"), cur.as_array_mut()) {
        if let Ok(v) = serde_json::from_str::<Value>(v) {
            a.retain(|item| *item != v);
        }
    } else if let Some(k) = last.strip_prefix("k:") {
        if let (Ok(key), Some(a)) = (
            serde_json::from_str::<Map<String, Value>>(k),
            cur.as_array_mut(),
        ) {
            a.retain(|item| {
                !key.iter().all(|(f, v)| {
                    item.get(f) == Some(v) || (f == "protocol" && item.get(f).is_none())
                })
            });
        }
    }
}

/// Merges an applied configuration: maps by key, keyed lists by key,
/// everything else replaced.
pub(crate) fn merge_applied(target: &mut Value, applied: &Value) {
    merge_in("", target, applied)
}

pub(crate) fn merge_in(name: &str, target: &mut Value, applied: &Value) {
    match (target, applied) {
        (Value::Object(t), Value::Object(a)) => {
            for (k, v) in a {
                merge_in(k, t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (Value::Array(t), Value::Array(a))
            if list_key(name, a).is_some() && list_key(name, t).is_some() =>
        {
            let key = list_key(name, a).unwrap_or_default();
            for item in a {
                let k = item_key(item, &key);
                match t.iter_mut().find(|x| item_key(x, &key) == k) {
                    Some(existing) => merge_in("", existing, item),
                    None => t.push(item.clone()),
                }
            }
        }
        (t, a) => *t = a.clone(),
    }
}
