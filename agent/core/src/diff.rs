//! Field-level diff of two JSON documents. Pure.
//!
//! Paths are dotted (`spec.env.LOG_LEVEL`, `spec.args[1]`). Values under a
//! redacted path are never carried: the change says only that they changed.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The placeholder shown instead of a redacted value.
pub const REDACTED: &str = "(redacted)";

/// One changed field.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FieldChange {
    pub path: String,
    /// Absent when the field is added.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old: Option<Value>,
    /// Absent when the field is removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new: Option<Value>,
}

/// Differences from `old` to `new`, in path order. `redact` lists dotted
/// path prefixes whose values are replaced by [`REDACTED`].
pub fn diff(old: &Value, new: &Value, redact: &[String]) -> Vec<FieldChange> {
    let mut out = Vec::new();
    walk("", old, new, &mut out);
    for change in &mut out {
        if is_redacted(&change.path, redact) {
            change.old = change.old.as_ref().map(|_| Value::String(REDACTED.into()));
            change.new = change.new.as_ref().map(|_| Value::String(REDACTED.into()));
        }
    }
    out
}

/// Whether `path` is at or under one of the `redact` prefixes.
pub fn is_redacted(path: &str, redact: &[String]) -> bool {
    redact.iter().any(|r| {
        path == r
            || path.starts_with(&format!("{r}."))
            || path.starts_with(&format!("{r}["))
            // A whole parent object replaced: its redacted child is inside.
            || r.starts_with(&format!("{path}."))
    })
}

fn walk(path: &str, old: &Value, new: &Value, out: &mut Vec<FieldChange>) {
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let p = join(path, k);
                match (a.get(k), b.get(k)) {
                    (Some(x), Some(y)) => walk(&p, x, y, out),
                    (Some(x), None) => out.push(FieldChange {
                        path: p,
                        old: Some(x.clone()),
                        new: None,
                    }),
                    (None, Some(y)) => out.push(FieldChange {
                        path: p,
                        old: None,
                        new: Some(y.clone()),
                    }),
                    (None, None) => {}
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                walk(&format!("{path}[{i}]"), x, y, out);
            }
        }
        _ if old == new => {}
        _ => out.push(FieldChange {
            path: path.to_string(),
            old: Some(old.clone()),
            new: Some(new.clone()),
        }),
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// `body` with the values at the `redact` paths (dotted) replaced by
/// "(redacted)": what reports and policies may see of a resource.
pub fn redact_body<'a>(body: &'a Value, paths: &[String]) -> std::borrow::Cow<'a, Value> {
    if paths.is_empty() {
        return std::borrow::Cow::Borrowed(body);
    }
    let mut body = body.clone();
    for path in paths {
        let pointer = format!("/{}", path.replace('~', "~0").replace('.', "/"));
        if let Some(v) = body.pointer_mut(&pointer) {
            *v = Value::String(REDACTED.into());
        }
    }
    std::borrow::Cow::Owned(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reports_changed_added_and_removed_fields_by_path() {
        let a = json!({"spec": {"version": "1", "args": ["a", "b"], "env": {"X": "1"}}});
        let b = json!({"spec": {"version": "2", "args": ["a", "c"], "env": {"Y": "2"}}});
        let d = diff(&a, &b, &[]);
        let paths: Vec<_> = d.iter().map(|c| c.path.as_str()).collect();
        assert_eq!(
            paths,
            ["spec.args[1]", "spec.env.X", "spec.env.Y", "spec.version"]
        );
        assert_eq!(d[3].old, Some(json!("1")));
        assert_eq!(d[3].new, Some(json!("2")));
        assert!(d[1].new.is_none() && d[2].old.is_none());
    }

    #[test]
    fn redacted_values_never_appear() {
        let a = json!({"spec": {"content": "old-secret"}});
        let b = json!({"spec": {"content": "new-secret"}});
        let d = diff(&a, &b, &["spec.content".into()]);
        let text = serde_json::to_string(&d).unwrap();
        assert!(!text.contains("secret"), "{text}");
        assert_eq!(d[0].path, "spec.content");
        // A redacted field inside a replaced parent is hidden too.
        let d = diff(
            &json!({"spec": 1}),
            &json!({"spec": {"content": "s3cret"}}),
            &["spec.content".into()],
        );
        assert!(!serde_json::to_string(&d).unwrap().contains("s3cret"));
    }

    #[test]
    fn equal_documents_have_no_changes() {
        let a = json!({"a": [1, {"b": null}]});
        assert!(diff(&a, &a.clone(), &[]).is_empty());
    }
}
