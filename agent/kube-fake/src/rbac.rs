//! Authentication and RBAC, as the recorded kube-apiserver 1.28 does them
//! (fixtures 51a-51f): bearer tokens name a user, Roles and ClusterRoles
//! applied to the fake grant verbs on resources through RoleBindings and
//! ClusterRoleBindings, and a request nothing allows is answered 403 with
//! the real server's message.
//!
//! The admin token of [`crate::Fake::kubeconfig`] is `system:masters`
//! (allowed everything, as on a real cluster); a service account's token
//! comes from [`crate::Fake::service_account_token`]. `Impersonate-User`
//! of a ServiceAccount needs `impersonate` on `serviceaccounts`; the
//! request is then authorised as that account. Not modelled: aggregated
//! ClusterRoles, `escalate`/`bind` checks, impersonating users and groups.

use std::collections::BTreeMap;

use serde_json::Value;

/// The admin token every fake kubeconfig carries.
pub const ADMIN_TOKEN: &str = "fake-token";
const SA_PREFIX: &str = "fake-sa-token:";

/// Who a request is from.
pub enum User {
    Admin,
    ServiceAccount { namespace: String, name: String },
}

impl User {
    /// From the Authorization header; None for a token nobody issued.
    pub fn from_header(header: Option<&str>) -> Option<User> {
        let token = match header {
            None => return Some(User::Admin),
            Some(h) => h.strip_prefix("Bearer ")?.trim(),
        };
        if token == ADMIN_TOKEN {
            return Some(User::Admin);
        }
        let (namespace, name) = token.strip_prefix(SA_PREFIX)?.split_once(':')?;
        Some(User::ServiceAccount {
            namespace: namespace.to_string(),
            name: name.to_string(),
        })
    }

    /// The account a `system:serviceaccount:<ns>:<name>` user name is.
    pub fn service_account(user: &str) -> Option<User> {
        let (namespace, name) = user
            .strip_prefix("system:serviceaccount:")?
            .split_once(':')?;
        Some(User::ServiceAccount {
            namespace: namespace.to_string(),
            name: name.to_string(),
        })
    }

    pub fn token(namespace: &str, name: &str) -> String {
        format!("{SA_PREFIX}{namespace}:{name}")
    }

    pub fn name(&self) -> String {
        match self {
            User::Admin => "admin".into(),
            User::ServiceAccount { namespace, name } => {
                format!("system:serviceaccount:{namespace}:{name}")
            }
        }
    }

    fn groups(&self) -> Vec<String> {
        match self {
            User::Admin => vec!["system:masters".into()],
            User::ServiceAccount { namespace, .. } => vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{namespace}"),
                "system:authenticated".into(),
            ],
        }
    }
}

/// What a request asks to do, as RBAC sees it.
#[derive(Debug)]
pub struct Attributes {
    pub verb: String,
    pub group: String,
    /// Plural resource name; empty for a non-resource URL.
    pub resource: String,
    pub subresource: String,
    pub namespace: String,
    pub name: String,
    pub path: String,
}

impl Attributes {
    /// From the method, path and query; `exists` says whether the named
    /// object is there (a server-side apply that creates needs `create`).
    pub fn of(method: &str, path: &str, watch: bool) -> Attributes {
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (group, rest): (&str, &[&str]) = match segs.as_slice() {
            ["api", _version, rest @ ..] => ("", rest),
            ["apis", group, _version, rest @ ..] => (group, rest),
            _ => ("", &[]),
        };
        let (namespace, resource, name, sub) = match rest {
            ["namespaces", ns, plural, tail @ ..] if !matches!(*plural, "status" | "finalize") => {
                (*ns, *plural, tail.first().copied(), tail.get(1).copied())
            }
            [plural, tail @ ..] => ("", *plural, tail.first().copied(), tail.get(1).copied()),
            [] => ("", "", None, None),
        };
        // Non-resource URLs (discovery) are authorised by the HTTP verb.
        let verb = match (method, name.is_some()) {
            _ if resource.is_empty() => "get",
            ("GET", true) => "get",
            ("GET", false) if watch => "watch",
            ("GET", false) => "list",
            ("POST", _) => "create",
            ("PUT", _) => "update",
            ("PATCH", _) => "patch",
            ("DELETE", true) => "delete",
            ("DELETE", false) => "deletecollection",
            _ => "get",
        };
        Attributes {
            verb: verb.into(),
            group: group.into(),
            resource: resource.into(),
            subresource: sub.unwrap_or_default().into(),
            namespace: namespace.into(),
            name: name.unwrap_or_default().into(),
            path: path.into(),
        }
    }
}

/// The RBAC objects stored in the fake, by (plural, namespace, name).
pub type Store<'a> = BTreeMap<(&'a str, &'a str, &'a str), &'a Value>;

/// Whether `user` may do `a`, from the Roles and bindings in `store`.
pub fn allowed(user: &User, a: &Attributes, store: &Store) -> bool {
    if matches!(user, User::Admin) {
        return true;
    }
    // The bootstrap ClusterRoleBinding system:discovery lets every
    // authenticated user read the discovery documents.
    if a.resource.is_empty()
        && a.verb == "get"
        && ["/api", "/apis", "/version"]
            .iter()
            .any(|p| a.path == *p || a.path.starts_with(&format!("{p}/")))
    {
        return true;
    }
    let groups = user.groups();
    let is_subject = |binding: &Value| {
        binding["subjects"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|s| match (s["kind"].as_str(), user) {
                (Some("ServiceAccount"), User::ServiceAccount { namespace, name }) => {
                    s["name"] == name.as_str() && s["namespace"] == namespace.as_str()
                }
                (Some("User"), _) => s["name"] == user.name().as_str(),
                (Some("Group"), _) => groups.iter().any(|g| s["name"] == g.as_str()),
                _ => false,
            })
    };
    let role = |kind: &str, namespace: &str, name: &str| -> Option<&Value> {
        match kind {
            "ClusterRole" => store.get(&("clusterroles", "", name)).copied(),
            "Role" => store.get(&("roles", namespace, name)).copied(),
            _ => None,
        }
    };
    let grants = |r: &Value| {
        r["rules"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|rule| rule_allows(rule, a))
    };
    for ((plural, namespace, _), binding) in store {
        let applies = match *plural {
            "clusterrolebindings" => true,
            // A RoleBinding grants only inside its namespace.
            "rolebindings" => !a.namespace.is_empty() && a.namespace == *namespace,
            _ => false,
        };
        if !applies || !is_subject(binding) {
            continue;
        }
        let r = &binding["roleRef"];
        let kind = r["kind"].as_str().unwrap_or_default();
        let name = r["name"].as_str().unwrap_or_default();
        if role(kind, namespace, name).is_some_and(grants) {
            return true;
        }
    }
    false
}

fn rule_allows(rule: &Value, a: &Attributes) -> bool {
    let has = |field: &str, want: &str| {
        rule[field]
            .as_array()
            .is_some_and(|v| v.iter().any(|x| x == "*" || x == want))
    };
    if !has("verbs", &a.verb) {
        return false;
    }
    if a.resource.is_empty() {
        // A non-resource URL (discovery).
        return rule["nonResourceURLs"].as_array().is_some_and(|urls| {
            urls.iter()
                .filter_map(Value::as_str)
                .any(|u| match u.strip_suffix('*') {
                    Some(prefix) => a.path.starts_with(prefix),
                    None => a.path == u,
                })
        });
    }
    let resource = if a.subresource.is_empty() {
        a.resource.clone()
    } else {
        format!("{}/{}", a.resource, a.subresource)
    };
    if !has("apiGroups", &a.group) || !has("resources", &resource) {
        return false;
    }
    match rule["resourceNames"].as_array() {
        Some(names) if !names.is_empty() => {
            !a.name.is_empty()
                && !matches!(
                    a.verb.as_str(),
                    "create" | "list" | "watch" | "deletecollection"
                )
                && names.iter().any(|n| n == a.name.as_str())
        }
        _ => true,
    }
}

/// The real server's 403 message for `a` (fixtures 51a, 51b).
pub fn denial(user: &User, a: &Attributes) -> String {
    if a.resource.is_empty() {
        return format!(
            "forbidden: User \"{}\" cannot {} path \"{}\"",
            user.name(),
            a.verb,
            a.path
        );
    }
    let qualified = if a.group.is_empty() {
        a.resource.clone()
    } else {
        format!("{}.{}", a.resource, a.group)
    };
    let what = if a.name.is_empty() {
        qualified
    } else {
        format!("{qualified} \"{}\"", a.name)
    };
    let resource = if a.subresource.is_empty() {
        a.resource.clone()
    } else {
        format!("{}/{}", a.resource, a.subresource)
    };
    let scope = if a.namespace.is_empty() {
        "at the cluster scope".to_string()
    } else {
        format!("in the namespace \"{}\"", a.namespace)
    };
    format!(
        "{what} is forbidden: User \"{}\" cannot {} resource \"{resource}\" in API group \"{}\" {scope}",
        user.name(),
        a.verb,
        a.group
    )
}
