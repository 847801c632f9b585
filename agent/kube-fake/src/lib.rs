//! An in-process fake Kubernetes API server, at the HTTP level, for tests.
//!
//! No API server can run on the machines the suite runs on, so sluice's
//! Kubernetes adapter is tested against this one. It answers as the
//! exchanges recorded from a real kube-apiserver 1.32 do
//! (`tests/fixtures/kube-apiserver-1.32/`): the same paths, status codes,
//! `Status` bodies and object shapes.
//!
//! # Real behaviours it models
//! - Discovery: `/api`, `/api/v1`, `/apis`, `/apis/{group}/{version}`, for
//!   the built-in kinds listed in [`BUILTIN`] and for every
//!   CustomResourceDefinition applied to it (served once applied, and the
//!   CRD reports `Established`).
//! - Server-side apply (`application/apply-patch+yaml`): field ownership per
//!   manager recorded in `metadata.managedFields` as FieldsV1 (lists of
//!   objects keyed by `name`, ports by `containerPort`/`port` and
//!   `protocol`, other lists atomic); fields a manager stops applying are
//!   removed; 409 `FieldManagerConflict` naming the field and the other
//!   manager when it applies a different value to a field another manager
//!   owns, unless `force=true`; `dryRun=All`; 201 on create, 200 after; a
//!   no-op apply keeps `resourceVersion`; `generation` moves with `spec`;
//!   optimistic concurrency on `metadata.resourceVersion`.
//! - Defaults as the real server fills them for Deployments, Services and
//!   Secrets (`stringData` stored base64 in `data`), so diffs meet them.
//! - Validation: a Deployment's negative replicas, selector not matching
//!   the template labels, no containers (422 `Invalid`, one cause per
//!   field); unknown `spec` fields of a Deployment under
//!   `fieldValidation=Strict` (500, as recorded); objects in a missing
//!   namespace (404 on the namespace).
//! - Authentication by bearer token and RBAC from the Roles, ClusterRoles
//!   and bindings applied to it, with the recorded 401/403 answers (see
//!   [`rbac`]); the kubeconfig's own token is the cluster admin.
//! - GET, LIST with `labelSelector` (`k=v`, `k`), DELETE (200 `Status`
//!   then 404), the `status` subresource (merge patch), merge patches,
//!   PUT with resourceVersion checks, Leases.
//! - Controllers, standing in for the kube-controller-manager and kubelets
//!   that a real cluster has: a changed Deployment/StatefulSet/DaemonSet
//!   rolls out at once (status written through the status subresource as
//!   in fixture 18) unless its image matches [`Fake::fail_images`], in which
//!   case no replica ever becomes available; a Job completes (or fails on
//!   such an image); a PVC binds; a Service gets a clusterIP.
//!
//! # Not modelled
//! WATCH, pagination, impersonation, aggregated ClusterRoles, admission
//! webhooks, OpenAPI schemas beyond the checks above, conversion
//! between versions, owner references and garbage collection (deleting a
//! Namespace does not delete its objects), finalizers, pods and
//! ReplicaSets, rate limiting (it never answers 429 unless told to with
//! [`Fake::throttle`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::{json, Map, Value};

pub mod rbac;

/// A kind the fake serves: (group, version, kind, plural, namespaced).
type TypeDef = (String, String, String, String, bool);

/// The built-in kinds served before any CRD is applied.
pub const BUILTIN: [(&str, &str, &str, &str, bool); 17] = [
    ("", "v1", "Namespace", "namespaces", false),
    ("", "v1", "ConfigMap", "configmaps", true),
    ("", "v1", "Secret", "secrets", true),
    ("", "v1", "Service", "services", true),
    ("", "v1", "ServiceAccount", "serviceaccounts", true),
    (
        "",
        "v1",
        "PersistentVolumeClaim",
        "persistentvolumeclaims",
        true,
    ),
    ("apps", "v1", "Deployment", "deployments", true),
    ("apps", "v1", "StatefulSet", "statefulsets", true),
    ("apps", "v1", "DaemonSet", "daemonsets", true),
    ("batch", "v1", "Job", "jobs", true),
    ("coordination.k8s.io", "v1", "Lease", "leases", true),
    (
        "apiextensions.k8s.io",
        "v1",
        "CustomResourceDefinition",
        "customresourcedefinitions",
        false,
    ),
    (
        "rbac.authorization.k8s.io",
        "v1",
        "ClusterRole",
        "clusterroles",
        false,
    ),
    (
        "rbac.authorization.k8s.io",
        "v1",
        "ClusterRoleBinding",
        "clusterrolebindings",
        false,
    ),
    ("rbac.authorization.k8s.io", "v1", "Role", "roles", true),
    (
        "rbac.authorization.k8s.io",
        "v1",
        "RoleBinding",
        "rolebindings",
        true,
    ),
    ("networking.k8s.io", "v1", "Ingress", "ingresses", true),
];

/// (group, plural, namespace, name).
type Key = (String, String, String, String);
/// Per object: manager → (operation, owned FieldsV1).
type Owners = BTreeMap<String, (String, Value)>;

/// One request the fake served, for assertions.
#[derive(Clone, Debug)]
pub struct Logged {
    pub method: String,
    pub path: String,
    pub field_manager: Option<String>,
    pub status: u16,
}

#[derive(Default)]
struct Inner {
    types: Vec<TypeDef>,
    /// (group, plural, namespace, name) → object.
    objects: BTreeMap<(String, String, String, String), Value>,
    /// Per object: manager → (operation, owned FieldsV1).
    owners: BTreeMap<Key, Owners>,
    rv: u64,
    fail_images: Vec<String>,
    /// Whether the stand-in controllers run (the recorded server had none).
    controllers: bool,
    throttle: u32,
    /// (method, path suffix) answered 403, as RBAC would.
    forbidden: Vec<(String, String)>,
    log: Vec<Logged>,
}

/// The fake server. Cheap to clone; every clone sees the same cluster.
#[derive(Clone)]
pub struct Fake {
    inner: Arc<Mutex<Inner>>,
    pub addr: SocketAddr,
}

impl Fake {
    /// Starts the fake on 127.0.0.1 (an ephemeral port) on the current
    /// tokio runtime.
    pub async fn start() -> Fake {
        let inner = Inner {
            types: BUILTIN
                .iter()
                .map(|(g, v, k, p, n)| {
                    (
                        g.to_string(),
                        v.to_string(),
                        k.to_string(),
                        p.to_string(),
                        *n,
                    )
                })
                .collect(),
            rv: 100,
            controllers: true,
            ..Inner::default()
        };
        let inner = Arc::new(Mutex::new(inner));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1");
        let addr = listener.local_addr().expect("local addr");
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(inner.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Fake { inner, addr }
    }

    /// Starts the fake on a runtime of its own thread, for tests and
    /// processes that are not async themselves.
    pub fn start_in_thread() -> Fake {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let fake = Fake::start().await;
                tx.send(fake).expect("send");
                std::future::pending::<()>().await;
            });
        });
        rx.recv().expect("fake started")
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig with one context, `name`, pointing at this fake, as
    /// its admin.
    pub fn kubeconfig(&self, contexts: &[&str]) -> String {
        self.kubeconfig_with_token(contexts, rbac::ADMIN_TOKEN)
    }

    /// The token of a ServiceAccount: requests with it are authorised by
    /// the Roles and bindings applied to the fake (see [`rbac`]).
    pub fn service_account_token(namespace: &str, name: &str) -> String {
        rbac::User::token(namespace, name)
    }

    /// A kubeconfig whose user presents `token`.
    pub fn kubeconfig_with_token(&self, contexts: &[&str], token: &str) -> String {
        let mut s = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\nusers:\n- name: fake\n  user:\n    token: {token}\ncontexts:\n",
            self.url()
        );
        for c in contexts {
            s.push_str(&format!(
                "- name: {c}\n  context:\n    cluster: fake\n    user: fake\n"
            ));
        }
        s.push_str(&format!(
            "current-context: {}\n",
            contexts.first().copied().unwrap_or("fake")
        ));
        s
    }

    /// Pods whose image contains `pattern` never become ready.
    pub fn fail_images(&self, pattern: &str) {
        self.lock().fail_images.push(pattern.to_string());
    }

    /// Turns the stand-in controllers (rollouts, Jobs, PVC binding,
    /// clusterIPs) on or off; off, objects keep the status clients write,
    /// as on the recorded server, which had no controller manager. CRDs
    /// are established either way: the API server itself does that.
    pub fn controllers(&self, on: bool) {
        self.lock().controllers = on;
    }

    /// The next `n` requests are answered 429 Too Many Requests.
    pub fn throttle(&self, n: u32) {
        self.lock().throttle = n;
    }

    /// Answers `method` on paths ending in `suffix` with 403 Forbidden, as
    /// the real server does when RBAC does not allow it.
    pub fn forbid(&self, method: &str, suffix: &str) {
        self.lock()
            .forbidden
            .push((method.to_string(), suffix.to_string()));
    }

    /// Lifts every [`Fake::forbid`].
    pub fn allow_all(&self) {
        self.lock().forbidden.clear();
    }

    /// Every request served so far.
    pub fn log(&self) -> Vec<Logged> {
        self.lock().log.clone()
    }

    /// One object, as stored.
    pub fn get(&self, group: &str, plural: &str, namespace: &str, name: &str) -> Option<Value> {
        let key = (
            group.to_string(),
            plural.to_string(),
            namespace.to_string(),
            name.to_string(),
        );
        self.lock().objects.get(&key).cloned()
    }

    /// Every stored object's `group/plural/namespace/name`.
    pub fn names(&self) -> Vec<String> {
        self.lock()
            .objects
            .keys()
            .map(|(g, p, ns, n)| format!("{g}/{p}/{ns}/{n}"))
            .collect()
    }

    /// Changes an object as another client would (a manual `kubectl
    /// edit`): merges `patch` as manager `manager` with an Update
    /// operation, taking ownership of the fields it sets.
    pub fn edit(
        &self,
        group: &str,
        plural: &str,
        namespace: &str,
        name: &str,
        manager: &str,
        patch: Value,
    ) {
        let mut inner = self.lock();
        let key = (
            group.to_string(),
            plural.to_string(),
            namespace.to_string(),
            name.to_string(),
        );
        let Some(mut obj) = inner.objects.get(&key).cloned() else {
            panic!("edit: no {key:?}");
        };
        merge(&mut obj, &patch);
        let fields = fields_of(&patch);
        let owners = inner.owners.entry(key.clone()).or_default();
        for (m, (_, owned)) in owners.iter_mut() {
            if m != manager {
                subtract(owned, &fields);
            }
        }
        owners.insert(manager.to_string(), ("Update".into(), fields));
        inner.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(inner.rv.to_string());
        inner.objects.insert(key.clone(), obj);
        let obj = render_managed(&inner, &key);
        inner.objects.insert(key, obj);
    }

    /// Creates an object directly, as another tool would (not sluice).
    pub fn create(&self, obj: Value, manager: &str) {
        let mut inner = self.lock();
        let (group, version) = split_api_version(obj["apiVersion"].as_str().unwrap_or_default());
        let kind = obj["kind"].as_str().unwrap_or_default().to_string();
        let t = inner
            .types
            .iter()
            .find(|t| t.0 == group && t.1 == version && t.2 == kind)
            .cloned()
            .expect("a served kind");
        let ns = if t.4 {
            obj["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string()
        } else {
            String::new()
        };
        let name = obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let key = (group, t.3.clone(), ns, name);
        let fields = fields_of(&obj);
        let mut obj = obj;
        inner.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(inner.rv.to_string());
        obj["metadata"]["uid"] = json!(format!("uid-{}", inner.rv));
        inner
            .owners
            .entry(key.clone())
            .or_default()
            .insert(manager.to_string(), ("Update".into(), fields));
        inner.objects.insert(key.clone(), obj);
        let obj = render_managed(&inner, &key);
        inner.objects.insert(key.clone(), obj.clone());
        if kind == "CustomResourceDefinition" {
            register_crd(&mut inner, &obj);
        }
        run_controllers(&mut inner, &key);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn split_api_version(av: &str) -> (String, String) {
    match av.split_once('/') {
        Some((g, v)) => (g.to_string(), v.to_string()),
        None => (String::new(), av.to_string()),
    }
}

fn status(code: u16, reason: &str, message: String, details: Value) -> Response {
    let mut body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "code": code,
    });
    if !reason.is_empty() {
        body["reason"] = json!(reason);
    }
    if !details.is_null() {
        body["details"] = details;
    }
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        axum::Json(body),
    )
        .into_response()
}

fn ok(code: u16, body: Value) -> Response {
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::OK),
        axum::Json(body),
    )
        .into_response()
}

async fn handle(State(inner): State<Arc<Mutex<Inner>>>, req: Request) -> Response {
    let method = req.method().clone();
    let uri = req.uri().clone();
    let headers = req.headers().clone();
    let body = axum::body::to_bytes(req.into_body(), 16 << 20)
        .await
        .unwrap_or_default();
    let mut guard = inner.lock().unwrap_or_else(|e| e.into_inner());
    let query: BTreeMap<String, String> = uri
        .query()
        .map(|q| {
            q.split('&')
                .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
                .map(|(k, v)| (k.to_string(), decode(v)))
                .collect()
        })
        .unwrap_or_default();
    let forbidden = guard
        .forbidden
        .iter()
        .any(|(m, suffix)| m == method.as_str() && uri.path().ends_with(suffix.as_str()));
    let denied = authorize(&guard, &method, &uri, &query, &headers);
    let response = if let Some(denied) = denied {
        denied
    } else if forbidden {
        let segs: Vec<&str> = uri.path().rsplit('/').take(2).collect();
        let (name, plural) = (
            segs.first().copied().unwrap_or(""),
            segs.get(1).copied().unwrap_or(""),
        );
        status(
            403,
            "Forbidden",
            format!("{plural} \"{name}\" is forbidden: User \"system:serviceaccount:sluice-system:sluice\" cannot {} resource \"{plural}\"", method.as_str().to_lowercase()),
            json!({"name": name, "kind": plural}),
        )
    } else if guard.throttle > 0 {
        guard.throttle -= 1;
        status(
            429,
            "TooManyRequests",
            "the server has received too many requests and has asked us to try again later".into(),
            Value::Null,
        )
    } else {
        serve(&mut guard, &method, &uri, &query, &headers, &body)
    };
    guard.log.push(Logged {
        method: method.to_string(),
        path: uri.path().to_string(),
        field_manager: query.get("fieldManager").cloned(),
        status: response.status().as_u16(),
    });
    response
}

/// Authentication and RBAC (see [`rbac`]): None when allowed, else the
/// real server's 401 or 403.
fn authorize(
    inner: &Inner,
    method: &Method,
    uri: &Uri,
    query: &BTreeMap<String, String>,
    headers: &HeaderMap,
) -> Option<Response> {
    let header = headers.get("authorization").and_then(|v| v.to_str().ok());
    let Some(requester) = rbac::User::from_header(header) else {
        return Some(status(
            401,
            "Unauthorized",
            "Unauthorized".into(),
            Value::Null,
        ));
    };
    let impersonate = headers
        .get("impersonate-user")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if matches!(requester, rbac::User::Admin) && impersonate.is_none() {
        return None;
    }
    let watch = query.get("watch").is_some_and(|w| w == "true" || w == "1");
    let a = rbac::Attributes::of(method.as_str(), uri.path(), watch);
    let store: rbac::Store = inner
        .objects
        .iter()
        .filter(|((g, p, _, _), _)| {
            g == "rbac.authorization.k8s.io"
                && matches!(
                    p.as_str(),
                    "clusterroles" | "clusterrolebindings" | "roles" | "rolebindings"
                )
        })
        .map(|((_, p, ns, n), v)| ((p.as_str(), ns.as_str(), n.as_str()), v))
        .collect();
    let details = || {
        let mut d = json!({"kind": a.resource});
        if !a.name.is_empty() {
            d["name"] = json!(a.name);
        }
        if !a.group.is_empty() {
            d["group"] = json!(a.group);
        }
        d
    };
    // Impersonation: the requester needs `impersonate` on the account;
    // then the request is authorised as the account (fixtures 60a, 60b).
    let user = match impersonate {
        None => requester,
        Some(name) => {
            let Some(sa) = rbac::User::service_account(&name) else {
                return Some(status(
                    403,
                    "Forbidden",
                    format!("users \"{name}\" is forbidden: only ServiceAccounts can be impersonated here"),
                    Value::Null,
                ));
            };
            let rbac::User::ServiceAccount {
                namespace,
                name: sa_name,
            } = &sa
            else {
                unreachable!("service_account gives a ServiceAccount")
            };
            let may = rbac::Attributes {
                verb: "impersonate".into(),
                group: String::new(),
                resource: "serviceaccounts".into(),
                subresource: String::new(),
                namespace: namespace.clone(),
                name: sa_name.clone(),
                path: uri.path().into(),
            };
            if !rbac::allowed(&requester, &may, &store) {
                return Some(status(
                    403,
                    "Forbidden",
                    format!(
                        "serviceaccounts \"{sa_name}\" is forbidden: User \"{}\" cannot impersonate resource \"serviceaccounts\" in API group \"\" in the namespace \"{namespace}\"",
                        requester.name()
                    ),
                    json!({"name": sa_name, "kind": "serviceaccounts"}),
                ));
            }
            sa
        }
    };
    if !rbac::allowed(&user, &a, &store) {
        return Some(status(403, "Forbidden", rbac::denial(&user, &a), details()));
    }
    // A server-side apply that creates the object needs `create` as well
    // (fixtures 51c, 51f); the real server's message then names no verb.
    let applying = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("application/apply-patch"));
    if a.verb == "patch" && applying && a.subresource.is_empty() {
        let key = (
            a.group.clone(),
            a.resource.clone(),
            a.namespace.clone(),
            a.name.clone(),
        );
        if !inner.objects.contains_key(&key) {
            let create = rbac::Attributes {
                verb: "create".into(),
                ..rbac::Attributes::of(method.as_str(), uri.path(), false)
            };
            if !rbac::allowed(&user, &create, &store) {
                let qualified = if a.group.is_empty() {
                    a.resource.clone()
                } else {
                    format!("{}.{}", a.resource, a.group)
                };
                return Some(status(
                    403,
                    "Forbidden",
                    format!("{qualified} \"{}\" is forbidden: ", a.name),
                    details(),
                ));
            }
        }
    }
    None
}

fn decode(s: &str) -> String {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).to_string()
}

fn resource_list(inner: &Inner, group: &str, version: &str) -> Option<Value> {
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    let resources: Vec<Value> = inner
        .types
        .iter()
        .filter(|t| t.0 == group && t.1 == version)
        .flat_map(|t| {
            let verbs = json!(["create", "delete", "get", "list", "patch", "update"]);
            let mut v = vec![json!({"name": t.3, "singularName": t.2.to_lowercase(), "namespaced": t.4, "kind": t.2, "verbs": verbs})];
            if matches!(t.2.as_str(), "Deployment" | "StatefulSet" | "DaemonSet" | "Job" | "CustomResourceDefinition" | "PersistentVolumeClaim") {
                v.push(json!({"name": format!("{}/status", t.3), "singularName": "", "namespaced": t.4, "kind": t.2, "verbs": ["get", "patch", "update"]}));
            }
            v
        })
        .collect();
    (!resources.is_empty()).then(|| json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}))
}

fn serve(
    inner: &mut Inner,
    method: &Method,
    uri: &Uri,
    query: &BTreeMap<String, String>,
    headers: &HeaderMap,
    body: &Bytes,
) -> Response {
    let segs: Vec<&str> = uri
        .path()
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    // Discovery (as fixtures 01-04).
    match segs.as_slice() {
        ["api"] => return ok(200, json!({"kind": "APIVersions", "versions": ["v1"]})),
        ["apis"] => {
            let mut groups: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
            for t in inner.types.iter().filter(|t| !t.0.is_empty()) {
                groups.entry(&t.0).or_default().insert(&t.1);
            }
            let groups: Vec<Value> = groups
                .iter()
                .map(|(g, vs)| {
                    let versions: Vec<Value> = vs
                        .iter()
                        .map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
                        .collect();
                    let preferred = versions.last().cloned().unwrap_or(Value::Null);
                    json!({"name": g, "versions": versions, "preferredVersion": preferred})
                })
                .collect();
            return ok(
                200,
                json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}),
            );
        }
        ["api", v] => {
            return resource_list(inner, "", v)
                .map(|b| ok(200, b))
                .unwrap_or_else(not_found_page);
        }
        ["apis", g, v] => {
            return resource_list(inner, g, v)
                .map(|b| ok(200, b))
                .unwrap_or_else(not_found_page);
        }
        _ => {}
    }
    let (group, version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => (String::new(), v.to_string(), rest),
        ["apis", g, v, rest @ ..] => (g.to_string(), v.to_string(), rest),
        _ => return not_found_page(),
    };
    // rest: [plural] | [plural, name] | [plural, name, sub] |
    //       [namespaces, ns, plural, ...]
    let (ns, rest): (Option<String>, &[&str]) = match rest {
        ["namespaces", ns, plural, more @ ..]
            if inner
                .types
                .iter()
                .any(|t| t.0 == group && t.3 == *plural && t.4) =>
        {
            let _ = plural;
            (Some(ns.to_string()), &rest[2..more.len() + 3])
        }
        _ => (None, rest),
    };
    let Some(plural) = rest.first() else {
        return not_found_page();
    };
    let Some(t) = inner
        .types
        .iter()
        .find(|t| t.0 == group && t.1 == version && t.3 == *plural)
        .cloned()
    else {
        return not_found_page();
    };
    if t.4 && ns.is_none() && rest.len() > 1 {
        return not_found_page();
    }
    let name = rest.get(1).map(|s| s.to_string());
    let sub = rest.get(2).copied();
    let namespace = ns.clone().unwrap_or_default();
    let gr = if group.is_empty() {
        t.3.clone()
    } else {
        format!("{}.{}", t.3, group)
    };
    let not_found = |name: &str| {
        status(
            404,
            "NotFound",
            format!("{gr} \"{name}\" not found"),
            json!({"name": name, "group": group, "kind": t.3}),
        )
    };
    match (method, name) {
        (&Method::GET, None) => {
            if query.get("watch").is_some_and(|w| w == "true" || w == "1") {
                return status(
                    405,
                    "MethodNotAllowed",
                    "watch is not supported by this fake".into(),
                    Value::Null,
                );
            }
            let selector = query.get("labelSelector").cloned().unwrap_or_default();
            let items: Vec<Value> = inner
                .objects
                .iter()
                .filter(|((g, p, n, _), _)| {
                    *g == group && *p == t.3 && (ns.is_none() || *n == namespace)
                })
                .map(|(_, o)| o.clone())
                .filter(|o| matches_selector(o, &selector))
                // List items carry no apiVersion and kind (fixture 20).
                .map(|mut o| {
                    if let Some(m) = o.as_object_mut() {
                        m.remove("apiVersion");
                        m.remove("kind");
                    }
                    o
                })
                .collect();
            ok(
                200,
                json!({"kind": format!("{}List", t.2), "apiVersion": if group.is_empty() { version.clone() } else { format!("{group}/{version}") }, "metadata": {"resourceVersion": inner.rv.to_string()}, "items": items}),
            )
        }
        (&Method::GET, Some(name)) => {
            let key = (group.clone(), t.3.clone(), namespace.clone(), name.clone());
            match inner.objects.get(&key) {
                Some(o) => ok(200, o.clone()),
                None => not_found(&name),
            }
        }
        (&Method::DELETE, Some(name)) => {
            let key = (group.clone(), t.3.clone(), namespace.clone(), name.clone());
            match inner.objects.remove(&key) {
                Some(o) => {
                    inner.owners.remove(&key);
                    if t.2 == "CustomResourceDefinition" {
                        let g = o["spec"]["group"].as_str().unwrap_or_default().to_string();
                        let k = o["spec"]["names"]["kind"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string();
                        inner.types.retain(|x| !(x.0 == g && x.2 == k));
                    }
                    ok(
                        200,
                        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": {"name": name, "group": group, "kind": t.3, "uid": o["metadata"]["uid"]}}),
                    )
                }
                None => not_found(&name),
            }
        }
        (&Method::PATCH, Some(name)) => {
            let ctype = headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let parsed: Result<Value, String> = if ctype.starts_with("application/apply-patch") {
                serde_yaml::from_slice::<Value>(body).map_err(|e| e.to_string())
            } else {
                serde_json::from_slice::<Value>(body).map_err(|e| e.to_string())
            };
            let patch = match parsed {
                Ok(p) => p,
                Err(e) => {
                    return status(
                        400,
                        "BadRequest",
                        format!("error decoding patch: {e}"),
                        Value::Null,
                    )
                }
            };
            let key = (group.clone(), t.3.clone(), namespace.clone(), name.clone());
            if t.4
                && !inner.objects.contains_key(&(
                    String::new(),
                    "namespaces".into(),
                    String::new(),
                    namespace.clone(),
                ))
            {
                return status(
                    404,
                    "NotFound",
                    format!("namespaces \"{namespace}\" not found"),
                    json!({"name": namespace, "kind": "namespaces"}),
                );
            }
            let manager = query.get("fieldManager").cloned();
            if ctype.starts_with("application/apply-patch") {
                let Some(manager) = manager else {
                    return status(
                        400,
                        "BadRequest",
                        "PATCH request failed: fieldManager is required for apply requests".into(),
                        Value::Null,
                    );
                };
                let force = query.get("force").is_some_and(|f| f == "true");
                let dry = query.contains_key("dryRun");
                let strict = query.get("fieldValidation").is_some_and(|v| v == "Strict");
                apply(
                    inner,
                    &t,
                    &key,
                    &manager,
                    patch,
                    force,
                    dry,
                    strict,
                    sub == Some("status"),
                )
            } else {
                let Some(before) = inner.objects.get(&key).cloned() else {
                    return not_found(&name);
                };
                let mut obj = before.clone();
                merge(&mut obj, &patch);
                status_defaults(&t.2, &mut obj);
                // Without fieldManager the real server names the manager
                // after the client's User-Agent (fixture 18: curl).
                let manager = manager.unwrap_or_else(|| {
                    headers
                        .get("user-agent")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|ua| ua.split('/').next())
                        .filter(|s| !s.is_empty())
                        .unwrap_or("unknown")
                        .to_string()
                });
                let fields = update_fields(&take(&obj, &patch), &before, "");
                let owners = inner.owners.entry(key.clone()).or_default();
                for (m, (_, owned)) in owners.iter_mut() {
                    if *m != manager {
                        subtract(owned, &fields);
                    }
                }
                let op = if sub == Some("status") {
                    "Update/status"
                } else {
                    "Update"
                };
                owners.insert(manager, (op.into(), fields));
                inner.rv += 1;
                obj["metadata"]["resourceVersion"] = json!(inner.rv.to_string());
                inner.objects.insert(key.clone(), obj);
                let obj = render_managed(inner, &key);
                inner.objects.insert(key, obj.clone());
                ok(200, obj)
            }
        }
        (&Method::PUT, Some(name)) => {
            let Ok(mut obj) = serde_json::from_slice::<Value>(body) else {
                return status(400, "BadRequest", "error decoding body".into(), Value::Null);
            };
            let key = (group.clone(), t.3.clone(), namespace.clone(), name.clone());
            let Some(live) = inner.objects.get(&key).cloned() else {
                return not_found(&name);
            };
            if obj["metadata"]["resourceVersion"] != live["metadata"]["resourceVersion"] {
                return conflict_modified(&gr, &name);
            }
            inner.rv += 1;
            obj["metadata"]["resourceVersion"] = json!(inner.rv.to_string());
            obj["metadata"]["uid"] = live["metadata"]["uid"].clone();
            inner.objects.insert(key.clone(), obj);
            let obj = render_managed(inner, &key);
            inner.objects.insert(key, obj.clone());
            ok(200, obj)
        }
        (&Method::POST, None) => {
            let Ok(obj) = serde_json::from_slice::<Value>(body) else {
                return status(400, "BadRequest", "error decoding body".into(), Value::Null);
            };
            let name = obj["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let key = (group.clone(), t.3.clone(), namespace.clone(), name.clone());
            if inner.objects.contains_key(&key) {
                return status(
                    409,
                    "AlreadyExists",
                    format!("{gr} \"{name}\" already exists"),
                    json!({"name": name, "group": group, "kind": t.3}),
                );
            }
            let manager = query
                .get("fieldManager")
                .cloned()
                .unwrap_or_else(|| "unknown".into());
            apply(inner, &t, &key, &manager, obj, true, false, false, false)
        }
        _ => status(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource".to_string(),
            Value::Null,
        ),
    }
}

fn not_found_page() -> Response {
    status(
        404,
        "NotFound",
        "the server could not find the requested resource".into(),
        json!({}),
    )
}

fn conflict_modified(gr: &str, name: &str) -> Response {
    status(
        409,
        "Conflict",
        format!("Operation cannot be fulfilled on {gr} \"{name}\": the object has been modified; please apply your changes to the latest version and try again"),
        json!({"name": name}),
    )
}

fn matches_selector(o: &Value, selector: &str) -> bool {
    selector.split(',').filter(|s| !s.is_empty()).all(|term| {
        let labels = &o["metadata"]["labels"];
        match term.split_once("!=") {
            Some((k, v)) => labels[k] != json!(v),
            None => match term.split_once('=') {
                Some((k, v)) => labels[k.trim_end_matches('=')] == json!(v),
                None => labels.get(term).is_some(),
            },
        }
    })
}

/// Deep merge as a JSON merge patch (null deletes).
fn merge(target: &mut Value, patch: &Value) {
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
fn list_key(field: &str, items: &[Value]) -> Option<Vec<&'static str>> {
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

fn item_key(item: &Value, key: &[&str]) -> String {
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
fn fields_of(v: &Value) -> Value {
    fields_in("", v)
}

/// FieldsV1 of `v`, the value of field `name`.
fn fields_in(name: &str, v: &Value) -> Value {
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

/// The part of `obj` a merge `patch` wrote: the patch's paths, with
/// whole values (defaults filled in) at its leaves.
fn take(obj: &Value, patch: &Value) -> Value {
    match (obj, patch) {
        (Value::Object(o), Value::Object(p)) => Value::Object(
            p.keys()
                .filter_map(|k| o.get(k).map(|v| (k.clone(), take(v, &p[k]))))
                .collect(),
        ),
        (o, _) => o.clone(),
    }
}

/// FieldsV1 of an Update: as [`fields_of`], and a keyed list the update
/// created is owned itself too (`.`), as the real server records it.
fn update_fields(written: &Value, before: &Value, name: &str) -> Value {
    let mut f = fields_in(name, written);
    if let (Value::Object(w), Some(fm)) = (written, f.as_object_mut()) {
        for (k, v) in w {
            let sub = update_fields(v, before.get(k).unwrap_or(&Value::Null), k);
            fm.insert(format!("f:{k}"), sub);
        }
    }
    if let (Value::Array(items), Some(fm)) = (written, f.as_object_mut()) {
        if list_key(name, items).is_some() && !before.is_array() {
            fm.insert(".".into(), json!({}));
        }
    }
    f
}

/// Fields the API server fills in on status writes.
fn status_defaults(kind: &str, obj: &mut Value) {
    if kind == "Deployment" {
        for c in obj["status"]["conditions"]
            .as_array_mut()
            .into_iter()
            .flatten()
        {
            if let Some(c) = c.as_object_mut() {
                c.entry("lastUpdateTime").or_insert(Value::Null);
                c.entry("lastTransitionTime").or_insert(Value::Null);
            }
        }
    }
}

/// Leaf paths of a FieldsV1 set.
fn leaves(fields: &Value, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
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
fn subtract(owned: &mut Value, taken: &Value) {
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

fn has_path(fields: &Value, path: &[String]) -> bool {
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
fn value_at<'a>(obj: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut cur = obj;
    for p in path {
        if let Some(f) = p.strip_prefix("f:") {
            cur = cur.get(f)?;
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
fn remove_at(obj: &mut Value, path: &[String]) {
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
fn merge_applied(target: &mut Value, applied: &Value) {
    merge_in("", target, applied)
}

fn merge_in(name: &str, target: &mut Value, applied: &Value) {
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

#[allow(clippy::too_many_arguments)]
fn apply(
    inner: &mut Inner,
    t: &TypeDef,
    key: &(String, String, String, String),
    manager: &str,
    mut body: Value,
    force: bool,
    dry_run: bool,
    strict: bool,
    status_sub: bool,
) -> Response {
    let (group, plural, namespace, name) = key;
    let gr = if group.is_empty() {
        plural.clone()
    } else {
        format!("{plural}.{group}")
    };
    let api_version = if group.is_empty() {
        t.1.clone()
    } else {
        format!("{group}/{}", t.1)
    };
    if body["kind"].as_str().is_some_and(|k| k != t.2)
        || body["metadata"]["name"].as_str().is_some_and(|n| n != name)
    {
        return status(
            400,
            "BadRequest",
            "the name or kind of the object does not match the request".into(),
            Value::Null,
        );
    }
    // Secrets: stringData is write-only (fixture 21).
    let mut fields = fields_of(&body);
    if let Some(fm) = fields.get_mut("f:metadata").and_then(Value::as_object_mut) {
        for k in ["f:name", "f:namespace", "f:resourceVersion"] {
            fm.remove(k);
        }
        if fm.is_empty() {
            fields.as_object_mut().map(|f| f.remove("f:metadata"));
        }
    }
    for k in ["f:apiVersion", "f:kind"] {
        fields.as_object_mut().map(|f| f.remove(k));
    }
    if t.2 == "Deployment" {
        if let Some(e) = validate_deployment(&body, namespace, name, strict) {
            return e;
        }
    }
    let live = inner.objects.get(key).cloned();
    if let (Some(rv), Some(l)) = (body["metadata"]["resourceVersion"].as_str(), &live) {
        if l["metadata"]["resourceVersion"].as_str() != Some(rv) {
            return conflict_modified(&gr, name);
        }
    }
    let owners = inner.owners.get(key).cloned().unwrap_or_default();
    // Conflicts: another manager owns a field this apply sets differently.
    let mut mine = Vec::new();
    leaves(&fields, &mut Vec::new(), &mut mine);
    let mut causes = Vec::new();
    let mut taken = Vec::new();
    if let Some(l) = &live {
        for path in &mine {
            for (other, (_, owned)) in owners.iter().filter(|(m, _)| *m != manager) {
                if has_path(owned, path) && value_at(l, path) != value_at(&body, path) {
                    let dotted: String = path
                        .iter()
                        .map(|p| match p.strip_prefix("f:") {
                            Some(f) => format!(".{f}"),
                            None => format!("[{}]", &p[2..]),
                        })
                        .collect();
                    causes.push((other.clone(), dotted));
                    taken.push(path.clone());
                }
            }
        }
    }
    if !causes.is_empty() && !force {
        let n = causes.len();
        let list: Vec<String> = causes
            .iter()
            .map(|(m, f)| format!("conflict with \"{m}\": {f}"))
            .collect();
        let message = if n == 1 {
            format!("Apply failed with 1 conflict: {}", list[0])
        } else {
            format!("Apply failed with {n} conflicts: {}", list.join("\n"))
        };
        let causes: Vec<Value> = causes.iter().map(|(m, f)| json!({"reason": "FieldManagerConflict", "message": format!("conflict with \"{m}\""), "field": f})).collect();
        return status(409, "Conflict", message, json!({"causes": causes}));
    }
    let created = live.is_none();
    let mut obj = live.clone().unwrap_or_else(
        || json!({"kind": t.2, "apiVersion": api_version, "metadata": {"name": name}}),
    );
    if t.4 {
        obj["metadata"]["namespace"] = json!(namespace);
    }
    // Fields this manager applied before and no longer does, and nobody
    // else owns, are removed.
    if let Some((_, before)) = owners.get(manager) {
        let mut old = Vec::new();
        leaves(before, &mut Vec::new(), &mut old);
        for path in old {
            let still = has_path(&fields, &path);
            let others = owners
                .iter()
                .any(|(m, (_, o))| m != manager && has_path(o, &path));
            if !still && !others {
                remove_at(&mut obj, &path);
            }
        }
    }
    if let Some(m) = body.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("resourceVersion");
    }
    let string_data = body.as_object_mut().and_then(|b| b.remove("stringData"));
    merge_applied(&mut obj, &body);
    if let Some(Value::Object(sd)) = string_data {
        for (k, v) in sd {
            obj["data"][&k] =
                json!(base64::engine::general_purpose::STANDARD
                    .encode(v.as_str().unwrap_or_default()));
        }
    }
    defaults(&t.2, &mut obj);
    let mut new_owners = owners.clone();
    for path in &taken {
        for (m, (_, owned)) in new_owners.iter_mut() {
            if m != manager {
                let mut single = json!({});
                let mut cur = &mut single;
                for p in path {
                    cur = cur
                        .as_object_mut()
                        .map(|o| o.entry(p.clone()).or_insert(json!({})))
                        .unwrap_or_else(|| unreachable!());
                }
                subtract(owned, &single);
            }
        }
    }
    let op = if status_sub { "Apply/status" } else { "Apply" };
    new_owners.insert(manager.to_string(), (op.into(), fields));
    // A no-op apply writes nothing (fixtures 13/14).
    let unchanged = live
        .as_ref()
        .is_some_and(|l| strip_meta(l) == strip_meta(&obj))
        && new_owners == owners;
    if unchanged {
        return ok(200, live.unwrap_or_default());
    }
    let spec_changed = live
        .as_ref()
        .is_none_or(|l| l.get("spec") != obj.get("spec"));
    let mut rv = inner.rv + 1;
    if dry_run {
        rv = inner.rv;
    }
    obj["metadata"]["resourceVersion"] = json!(rv.to_string());
    if created {
        obj["metadata"]["uid"] = json!(format!("00000000-0000-4000-8000-{rv:012}"));
        obj["metadata"]["creationTimestamp"] = json!("2026-11-22T13:53:07Z");
    }
    if obj.get("spec").is_some()
        && !matches!(
            t.2.as_str(),
            "Lease" | "Service" | "PersistentVolumeClaim" | "Namespace"
        )
    {
        let g = obj["metadata"]["generation"].as_i64().unwrap_or(0);
        if spec_changed || created {
            obj["metadata"]["generation"] = json!(g + 1);
        }
    }
    if dry_run {
        let mut shown = obj.clone();
        // A dry-run create has no resourceVersion (fixture 12).
        if created {
            if let Some(m) = shown["metadata"].as_object_mut() {
                m.remove("resourceVersion");
            }
        }
        shown["metadata"]["managedFields"] = managed_fields_json(&new_owners, &api_version);
        return ok(if created { 201 } else { 200 }, shown);
    }
    inner.rv = rv;
    inner.owners.insert(key.clone(), new_owners);
    inner.objects.insert(key.clone(), obj);
    let obj = render_managed(inner, key);
    inner.objects.insert(key.clone(), obj.clone());
    if t.2 == "CustomResourceDefinition" {
        register_crd(inner, &obj);
    }
    let answer = obj.clone();
    run_controllers(inner, key);
    ok(if created { 201 } else { 200 }, answer)
}

fn strip_meta(o: &Value) -> Value {
    let mut o = o.clone();
    if let Some(m) = o.get_mut("metadata").and_then(Value::as_object_mut) {
        for k in [
            "managedFields",
            "resourceVersion",
            "generation",
            "uid",
            "creationTimestamp",
        ] {
            m.remove(k);
        }
    }
    o
}

fn managed_fields_json(owners: &BTreeMap<String, (String, Value)>, api_version: &str) -> Value {
    Value::Array(
        owners
            .iter()
            .filter(|(_, (_, f))| f.as_object().is_some_and(|m| !m.is_empty()))
            .map(|(m, (op, f))| {
                let (operation, sub) = match op.split_once('/') {
                    Some((o, s)) => (o.to_string(), Some(s.to_string())),
                    None => (op.clone(), None),
                };
                let mut e = json!({"manager": m, "operation": operation, "apiVersion": api_version, "time": "2026-11-22T13:53:07Z", "fieldsType": "FieldsV1", "fieldsV1": f});
                if let Some(s) = sub {
                    e["subresource"] = json!(s);
                }
                e
            })
            .collect(),
    )
}

fn render_managed(inner: &Inner, key: &(String, String, String, String)) -> Value {
    let mut obj = inner.objects.get(key).cloned().unwrap_or_default();
    let av = obj["apiVersion"].as_str().unwrap_or_default().to_string();
    let owners = inner.owners.get(key).cloned().unwrap_or_default();
    let fields = managed_fields_json(&owners, &av);
    match obj["metadata"].as_object_mut() {
        Some(m) if fields.as_array().is_some_and(|a| a.is_empty()) => {
            m.remove("managedFields");
        }
        Some(m) => {
            m.insert("managedFields".into(), fields);
        }
        None => {}
    }
    obj
}

fn validate_deployment(
    body: &Value,
    namespace: &str,
    name: &str,
    strict: bool,
) -> Option<Response> {
    const KNOWN: [&str; 8] = [
        "replicas",
        "selector",
        "template",
        "strategy",
        "minReadySeconds",
        "revisionHistoryLimit",
        "paused",
        "progressDeadlineSeconds",
    ];
    if strict {
        if let Some(spec) = body["spec"].as_object() {
            if let Some(unknown) = spec.keys().find(|k| !KNOWN.contains(&k.as_str())) {
                return Some(status(500, "", format!("failed to create typed patch object ({namespace}/{name}; apps/v1, Kind=Deployment): .spec.{unknown}: field not declared in schema"), Value::Null));
            }
        }
    }
    let mut causes = Vec::new();
    if let Some(r) = body["spec"]["replicas"].as_i64().filter(|r| *r < 0) {
        causes.push((
            "FieldValueInvalid",
            format!("Invalid value: {r}: must be greater than or equal to 0"),
            "spec.replicas",
        ));
    }
    let selector = body["spec"]["selector"]["matchLabels"].as_object();
    let labels = &body["spec"]["template"]["metadata"]["labels"];
    if let Some(sel) = selector {
        if !sel.iter().all(|(k, v)| labels.get(k) == Some(v)) {
            causes.push((
                "FieldValueInvalid",
                format!(
                    "Invalid value: map[string]string{{{}}}: `selector` does not match template `labels`",
                    labels
                        .as_object()
                        .map(|m| m
                            .iter()
                            .map(|(k, v)| format!("{:?}:{}", k, v))
                            .collect::<Vec<_>>()
                            .join(", "))
                        .unwrap_or_default()
                ),
                "spec.template.metadata.labels",
            ));
        }
    }
    if body["spec"]["template"]["spec"]["containers"]
        .as_array()
        .is_some_and(|c| c.is_empty())
    {
        causes.push((
            "FieldValueRequired",
            "Required value".to_string(),
            "spec.template.spec.containers",
        ));
    }
    if causes.is_empty() {
        return None;
    }
    let summary: Vec<String> = causes.iter().map(|(_, m, f)| format!("{f}: {m}")).collect();
    let causes: Vec<Value> = causes
        .iter()
        .map(|(r, m, f)| json!({"reason": r, "message": m, "field": f}))
        .collect();
    Some(status(
        422,
        "Invalid",
        format!(
            "Deployment.apps \"{name}\" is invalid: [{}]",
            summary.join(", ")
        ),
        json!({"name": name, "group": "apps", "kind": "Deployment", "causes": causes}),
    ))
}

/// Server defaults, as in fixture 13.
fn defaults(kind: &str, obj: &mut Value) {
    let set = |v: &mut Value, k: &str, d: Value| {
        if let Some(o) = v.as_object_mut() {
            o.entry(k.to_string()).or_insert(d);
        }
    };
    match kind {
        "Deployment" | "StatefulSet" | "DaemonSet" => {
            let spec = &mut obj["spec"];
            if kind != "DaemonSet" {
                set(spec, "replicas", json!(1));
            }
            if kind == "Deployment" {
                set(
                    spec,
                    "strategy",
                    json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"}}),
                );
                set(spec, "progressDeadlineSeconds", json!(600));
            }
            set(spec, "revisionHistoryLimit", json!(10));
            let tpl = &mut spec["template"];
            set(&mut tpl["metadata"], "creationTimestamp", Value::Null);
            let pod = &mut tpl["spec"];
            for (k, v) in [
                ("restartPolicy", json!("Always")),
                ("terminationGracePeriodSeconds", json!(30)),
                ("dnsPolicy", json!("ClusterFirst")),
                ("securityContext", json!({})),
                ("schedulerName", json!("default-scheduler")),
            ] {
                set(pod, k, v);
            }
            if let Some(cs) = pod["containers"].as_array_mut() {
                for c in cs {
                    let latest = c["image"].as_str().is_some_and(|i| {
                        i.ends_with(":latest") || !i.rsplit('/').next().unwrap_or("").contains(':')
                    });
                    set(c, "terminationMessagePath", json!("/dev/termination-log"));
                    set(c, "terminationMessagePolicy", json!("File"));
                    set(
                        c,
                        "imagePullPolicy",
                        json!(if latest { "Always" } else { "IfNotPresent" }),
                    );
                    if let Some(ps) = c["ports"].as_array_mut() {
                        for p in ps {
                            set(p, "protocol", json!("TCP"));
                        }
                    }
                }
            }
            set(obj, "status", json!({}));
        }
        "Service" => {
            let spec = &mut obj["spec"];
            set(spec, "type", json!("ClusterIP"));
            set(spec, "sessionAffinity", json!("None"));
            if let Some(ps) = spec["ports"].as_array_mut() {
                for p in ps {
                    set(p, "protocol", json!("TCP"));
                    let port = p["port"].clone();
                    set(p, "targetPort", port);
                }
            }
        }
        "Secret" => set(obj, "type", json!("Opaque")),
        "CustomResourceDefinition" => {
            set(&mut obj["spec"], "conversion", json!({"strategy": "None"}));
            let list_kind = format!(
                "{}List",
                obj["spec"]["names"]["kind"].as_str().unwrap_or_default()
            );
            set(&mut obj["spec"]["names"], "listKind", json!(list_kind));
            let stored: Vec<Value> = obj["spec"]["versions"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|v| v["storage"] == true)
                .map(|v| v["name"].clone())
                .collect();
            set(
                obj,
                "status",
                json!({"acceptedNames": {"kind": "", "plural": ""}, "conditions": null, "storedVersions": stored}),
            );
        }
        "Namespace" => {
            let name = obj["metadata"]["name"].clone();
            obj["metadata"]["labels"]["kubernetes.io/metadata.name"] = name;
            set(obj, "spec", json!({"finalizers": ["kubernetes"]}));
            set(obj, "status", json!({"phase": "Active"}));
        }
        // The defaults in the Gateway API v1.4.0 CRD schema (fixture 40).
        "HTTPRoute" => {
            for p in obj["spec"]["parentRefs"]
                .as_array_mut()
                .into_iter()
                .flatten()
            {
                set(p, "group", json!("gateway.networking.k8s.io"));
                set(p, "kind", json!("Gateway"));
            }
            if obj["spec"].is_object() {
                set(&mut obj["spec"], "rules", json!([{}]));
            }
            for rule in obj["spec"]["rules"].as_array_mut().into_iter().flatten() {
                set(
                    rule,
                    "matches",
                    json!([{"path": {"type": "PathPrefix", "value": "/"}}]),
                );
                for b in rule["backendRefs"].as_array_mut().into_iter().flatten() {
                    set(b, "group", json!(""));
                    set(b, "kind", json!("Service"));
                    set(b, "weight", json!(1));
                }
            }
        }
        _ => {}
    }
}

fn register_crd(inner: &mut Inner, crd: &Value) {
    let group = crd["spec"]["group"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let kind = crd["spec"]["names"]["kind"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let plural = crd["spec"]["names"]["plural"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let namespaced = crd["spec"]["scope"] != "Cluster";
    for v in crd["spec"]["versions"].as_array().into_iter().flatten() {
        if v["served"] == true {
            let version = v["name"].as_str().unwrap_or_default().to_string();
            if !inner
                .types
                .iter()
                .any(|t| t.0 == group && t.1 == version && t.2 == kind)
            {
                inner.types.push((
                    group.clone(),
                    version,
                    kind.clone(),
                    plural.clone(),
                    namespaced,
                ));
            }
        }
    }
}

/// What a real cluster's controllers and kubelets would do, at once.
fn run_controllers(inner: &mut Inner, key: &(String, String, String, String)) {
    let Some(mut obj) = inner.objects.get(key).cloned() else {
        return;
    };
    let kind = obj["kind"].as_str().unwrap_or_default().to_string();
    let images: Vec<String> = obj["spec"]["template"]["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["image"].as_str().map(str::to_string))
        .collect();
    let failing = images
        .iter()
        .any(|i| inner.fail_images.iter().any(|p| i.contains(p.as_str())));
    let generation = obj["metadata"]["generation"].clone();
    if kind == "CustomResourceDefinition" {
        establish(inner, key, obj);
        return;
    }
    if !inner.controllers {
        return;
    }
    let status = match kind.as_str() {
        "Deployment" | "StatefulSet" => {
            let replicas = obj["spec"]["replicas"].as_i64().unwrap_or(1);
            let available = if failing { 0 } else { replicas };
            let mut s = json!({"observedGeneration": generation, "replicas": replicas, "updatedReplicas": replicas, "readyReplicas": available, "availableReplicas": available});
            if kind == "StatefulSet" {
                s["currentReplicas"] = json!(replicas);
                s["updateRevision"] = json!("r1");
                s["currentRevision"] = json!("r1");
            }
            s["conditions"] = if failing {
                json!([{"type": "Available", "status": "False", "reason": "MinimumReplicasUnavailable", "message": "Deployment does not have minimum availability."}, {"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated", "message": "ReplicaSet is progressing."}])
            } else {
                json!([{"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable", "message": "Deployment has minimum availability."}, {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable", "message": "ReplicaSet has successfully progressed."}])
            };
            s
        }
        "DaemonSet" => {
            let n = 3;
            json!({"observedGeneration": generation, "desiredNumberScheduled": n, "currentNumberScheduled": n, "updatedNumberScheduled": n, "numberReady": if failing { 0 } else { n }, "numberAvailable": if failing { 0 } else { n }})
        }
        "Job" => {
            if failing {
                json!({"failed": 1, "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"}]})
            } else {
                json!({"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]})
            }
        }
        "PersistentVolumeClaim" => json!({"phase": "Bound"}),
        "CustomResourceDefinition" => {
            json!({"conditions": [{"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found"}, {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted"}], "acceptedNames": obj["spec"]["names"].clone(), "storedVersions": ["v1"]})
        }
        "Service" => {
            if obj["spec"]["clusterIP"].is_null() {
                obj["spec"]["clusterIP"] = json!(format!("10.96.0.{}", inner.rv % 250 + 2));
            }
            obj.get("status")
                .cloned()
                .unwrap_or(json!({"loadBalancer": {}}))
        }
        _ => return,
    };
    if obj.get("status") == Some(&status) {
        inner.objects.insert(key.clone(), obj);
        return;
    }
    obj["status"] = status.clone();
    inner.rv += 1;
    obj["metadata"]["resourceVersion"] = json!(inner.rv.to_string());
    let owners = inner.owners.entry(key.clone()).or_default();
    owners.insert(
        "kube-controller-manager".into(),
        (
            "Update/status".into(),
            json!({"f:status": fields_of(&status)}),
        ),
    );
    inner.objects.insert(key.clone(), obj);
    let obj = render_managed(inner, key);
    inner.objects.insert(key.clone(), obj);
}

/// The API server accepts a CRD's names and serves it: Established.
fn establish(inner: &mut Inner, key: &Key, mut obj: Value) {
    if obj["status"]["conditions"].is_array() {
        return;
    }
    let now = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string();
    let accepted = obj["spec"]["names"].clone();
    let update = json!({
        "acceptedNames": accepted,
        "conditions": [
            {"type": "NamesAccepted", "status": "True", "lastTransitionTime": now, "reason": "NoConflicts", "message": "no conflicts found"},
            {"type": "Established", "status": "True", "lastTransitionTime": now, "reason": "InitialNamesAccepted", "message": "the initial names have been accepted"},
        ],
    });
    // The conditions field existed (null) since the create: not new.
    let fields = update_fields(&update, &json!({"conditions": []}), "status");
    merge(&mut obj["status"], &update);
    inner.rv += 1;
    obj["metadata"]["resourceVersion"] = json!(inner.rv.to_string());
    inner.owners.entry(key.clone()).or_default().insert(
        "kube-apiserver".into(),
        ("Update/status".into(), json!({"f:status": fields})),
    );
    inner.objects.insert(key.clone(), obj);
    let obj = render_managed(inner, key);
    inner.objects.insert(key.clone(), obj);
}
