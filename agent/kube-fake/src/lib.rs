//! An in-process fake Kubernetes API server, at the HTTP level, for tests.
//!
//! No API server can run on the machines the suite runs on, so sluice's
//! Kubernetes adapter is tested against this one. It answers as the
//! exchanges recorded from real kube-apiservers do: 1.32
//! (`tests/fixtures/kube-apiserver-1.32/`) and 1.28 with RBAC, type errors,
//! watches, pagination and namespace termination
//! (`tests/fixtures/kube-apiserver-1.28/`); `tests/recorded.rs` replays
//! every one of them and compares the answers.
//!
//! # Real behaviours it models
//! - Discovery: `/api`, `/api/v1`, `/apis`, `/apis/{group}/{version}`, and
//!   aggregated discovery negotiated as 1.28 does (see [`discovery`]), for
//!   the built-in kinds of [`BUILTIN`] and every CustomResourceDefinition
//!   applied to it (served once applied, and the CRD reports
//!   `Established`). An unknown resource of a served group is a 404
//!   `Status`; an unknown group a `text/plain` 404 page.
//! - Server-side apply (`application/apply-patch+yaml`): field ownership per
//!   manager, operation and subresource in `metadata.managedFields` as
//!   FieldsV1 (see [`fields`]); fields a manager stops applying are
//!   removed; 409 `FieldManagerConflict` naming the field and the other
//!   manager (`"kubectl" with subresource "scale" using apps/v1` for an
//!   Update) when an apply sets a different value on a field another
//!   manager owns, unless `force=true`; a value applied equal to another
//!   manager's is owned by both; `dryRun=All`; 201 on create, 200 after; a
//!   no-op apply keeps `resourceVersion`; `generation` moves with `spec`;
//!   optimistic concurrency on `metadata.resourceVersion`, even under
//!   force.
//! - Updates (merge and strategic merge patches, PUT, POST, the `status`
//!   and `scale` subresources): the manager owns the fields whose values
//!   it changed and takes them from the others; ownership of a removed
//!   field ends.
//! - Defaults and canonical values as the real server stores them
//!   (Deployments, Services with their cluster IP, Secrets' `stringData`
//!   folded into `data`, quantities such as `0.5` → `500m`, nulls in
//!   ConfigMap data stored as `""`), so diffs meet them; type errors and,
//!   under `fieldValidation=Strict`, undeclared fields as the real 500 (see
//!   [`objects`]); a Deployment's invalid values as 422 with causes.
//! - Authentication by bearer token and RBAC from the Roles, ClusterRoles
//!   and bindings applied to it, impersonation of ServiceAccounts, with the
//!   recorded 401/403 answers (see [`rbac`]); the kubeconfig's own token is
//!   the cluster admin.
//! - GET; LIST with `labelSelector`, `fieldSelector` (`metadata.name`,
//!   `metadata.namespace`) and pagination (`limit`, `continue` tokens in
//!   the real server's format, `remainingItemCount`, 400 on a bad token);
//!   WATCH (see [`watch`]); DELETE (200 `Status`, or the object when
//!   finalizers hold it); finalizers; PUT; POST.
//! - Namespace termination: a deleted Namespace is `Terminating`, refuses
//!   new content (403 `NamespaceTerminating`) but takes updates of
//!   existing objects; after [`Fake::namespace_sync`] its controller
//!   deletes the content, marks what finalizers hold, writes the five
//!   conditions, and removes the Namespace once it is empty.
//! - Controllers, standing in for the kube-controller-manager and kubelets
//!   of a real cluster: the root-CA publisher and namespace lifecycle
//!   ([`Fake::core_controllers`]), and workload controllers
//!   ([`Fake::controllers`]): a changed Deployment/StatefulSet/DaemonSet
//!   rolls out at once (status written through the status subresource as
//!   in fixture 18) unless its image matches [`Fake::fail_images`], in
//!   which case no replica ever becomes available; a Job completes (or
//!   fails on such an image); a PVC binds.
//!
//! # Not modelled
//! Aggregated ClusterRoles, admission webhooks, OpenAPI schemas beyond the
//! checks above, conversion between versions, owner references and
//! garbage collection, pods and ReplicaSets, JSON patches, rate limiting
//! (it never answers 429 unless told to with [`Fake::throttle`]),
//! protobuf.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::{json, Map, Value};

mod discovery;
mod fields;
mod objects;
pub mod rbac;
mod watch;

use fields::{
    changed_fields, created_fields, fields_of, has_path, leaves, merge, merge_applied, remove_at,
    retain_existing, strategic_merge, subtract, union, value_at,
};
use objects::{defaults, status_defaults, strip_meta, typed_error, validate_deployment};

/// A kind the fake serves: (group, version, kind, plural, namespaced).
pub(crate) type TypeDef = (String, String, String, String, bool);

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
pub(crate) type Key = (String, String, String, String);
/// Who owns fields: (manager, operation `Apply`/`Update`, subresource or "").
type OwnerId = (String, String, String);
/// Per object: owner → owned FieldsV1.
type Owners = BTreeMap<OwnerId, Value>;

/// The time the fake writes into managedFields entries and timestamps.
const TIME: &str = "2026-11-22T13:53:07Z";

/// One request the fake served, for assertions.
#[derive(Clone, Debug)]
pub struct Logged {
    pub method: String,
    pub path: String,
    pub field_manager: Option<String>,
    pub status: u16,
    /// Whether it was a WATCH (one long-lived request).
    pub watch: bool,
    /// Whether it was a dry run (`dryRun=All`): nothing written.
    pub dry_run: bool,
}

pub(crate) struct Inner {
    pub(crate) types: Vec<TypeDef>,
    pub(crate) objects: BTreeMap<Key, Value>,
    owners: BTreeMap<Key, Owners>,
    pub(crate) rv: u64,
    fail_images: Vec<String>,
    /// Whether the workload controllers run (the recorded servers had none).
    controllers: bool,
    /// Whether the kube-controller-manager's namespace lifecycle and
    /// root-CA publisher run (the 1.28 recording had them, 1.32 did not).
    core_controllers: bool,
    throttle: u32,
    /// (method, path suffix) answered 403, as RBAC would.
    forbidden: Vec<(String, String)>,
    log: Vec<Logged>,
    /// Recent changes, for watches that start in the past.
    pub(crate) events: VecDeque<watch::Event>,
    /// Watches from before this resourceVersion are "too old" (410).
    pub(crate) compacted: u64,
    /// Woken on every change, for open watches.
    pub(crate) changed: Arc<tokio::sync::Notify>,
    /// How often watches send bookmarks; None: half their timeout, 1-60 s.
    pub(crate) bookmark_every: Option<Duration>,
    /// How long after a Namespace is deleted its controller first acts.
    namespace_sync: Duration,
    /// Namespaces being deleted, since when.
    terminating: BTreeMap<String, Instant>,
    /// This server's address, for `/api`.
    pub(crate) address: String,
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
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1");
        let addr = listener.local_addr().expect("local addr");
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
            objects: BTreeMap::new(),
            owners: BTreeMap::new(),
            rv: 100,
            fail_images: Vec::new(),
            controllers: true,
            core_controllers: true,
            throttle: 0,
            forbidden: Vec::new(),
            log: Vec::new(),
            events: VecDeque::new(),
            compacted: 100,
            changed: Arc::new(tokio::sync::Notify::new()),
            bookmark_every: None,
            namespace_sync: Duration::ZERO,
            terminating: BTreeMap::new(),
            address: addr.to_string(),
        };
        let inner = Arc::new(Mutex::new(inner));
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

    /// Turns the stand-in workload controllers (rollouts, Jobs, PVC
    /// binding) on or off; off, objects keep the status clients write, as
    /// on the recorded servers, which ran none. CRDs are established and
    /// Services get their cluster IP either way: the API server itself
    /// does that.
    pub fn controllers(&self, on: bool) {
        self.lock().controllers = on;
    }

    /// Turns the namespace lifecycle and root-CA publisher of the
    /// kube-controller-manager on or off (on by default; off, a deleted
    /// Namespace stays Terminating, as on a server without one).
    pub fn core_controllers(&self, on: bool) {
        self.lock().core_controllers = on;
    }

    /// How long after a Namespace is deleted the namespace controller
    /// first acts (the real one takes a few seconds; default: at once).
    pub fn namespace_sync(&self, after: Duration) {
        self.lock().namespace_sync = after;
    }

    /// Sends watch bookmarks this often (default: half the watch's
    /// timeout, between 1 and 60 s).
    pub fn bookmark_every(&self, every: Duration) {
        self.lock().bookmark_every = Some(every);
    }

    /// Forgets every event so far, as etcd compaction does: a watch from
    /// an older resourceVersion gets 410 Expired.
    pub fn compact(&self) {
        let mut inner = self.lock();
        inner.events.clear();
        inner.compacted = inner.rv;
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
        let mut inner = self.lock();
        tick(&mut inner);
        inner.objects.get(&key).cloned()
    }

    /// Every stored object's `group/plural/namespace/name`.
    pub fn names(&self) -> Vec<String> {
        let mut inner = self.lock();
        tick(&mut inner);
        inner
            .objects
            .keys()
            .map(|(g, p, ns, n)| format!("{g}/{p}/{ns}/{n}"))
            .collect()
    }

    /// Changes an object as another client would (a manual `kubectl
    /// edit`): merges `patch` as manager `manager` with an Update
    /// operation, which takes ownership of the fields it changes.
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
        let Some(before) = inner.objects.get(&key).cloned() else {
            panic!("edit: no {key:?}");
        };
        let mut after = before.clone();
        merge(&mut after, &patch);
        let kind = before["kind"].as_str().unwrap_or_default().to_string();
        update(&mut inner, &kind, &key, (manager, ""), before, after);
    }

    /// Creates an object directly, as another tool would (not sluice),
    /// with an Update operation of `manager`.
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
        create_object(&mut inner, &t, &key, manager, obj);
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

fn api_version_of(t: &TypeDef) -> String {
    if t.0.is_empty() {
        t.1.clone()
    } else {
        format!("{}/{}", t.0, t.1)
    }
}

/// `plural.group`, as the real server names a resource in messages.
fn qualified(group: &str, plural: &str) -> String {
    if group.is_empty() {
        plural.to_string()
    } else {
        format!("{plural}.{group}")
    }
}

pub(crate) fn status(code: u16, reason: &str, message: String, details: Value) -> Response {
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

pub(crate) fn ok(code: u16, body: Value) -> Response {
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::OK),
        axum::Json(body),
    )
        .into_response()
}

/// `details` of a Status about one object: name, group (when not core),
/// kind (the plural).
fn details(group: &str, plural: &str, name: &str) -> Value {
    let mut d = json!({"name": name, "kind": plural});
    if !group.is_empty() {
        d["group"] = json!(group);
    }
    d
}

fn parse_query(q: Option<&str>) -> BTreeMap<String, String> {
    q.map(|q| {
        q.split('&')
            .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
            .map(|(k, v)| (k.to_string(), decode(v)))
            .collect()
    })
    .unwrap_or_default()
}

async fn handle(State(shared): State<Arc<Mutex<Inner>>>, req: Request) -> Response {
    let method = req.method().clone();
    let uri = req.uri().clone();
    let headers = req.headers().clone();
    let body = axum::body::to_bytes(req.into_body(), 16 << 20)
        .await
        .unwrap_or_default();
    let query = parse_query(uri.query());
    let watching =
        method == Method::GET && query.get("watch").is_some_and(|w| w == "true" || w == "1");
    let mut guard = shared.lock().unwrap_or_else(|e| e.into_inner());
    tick(&mut guard);
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
    } else if watching {
        match watch_request(&guard, &uri, &query) {
            Ok(w) => {
                guard.log.push(Logged {
                    method: method.to_string(),
                    path: uri.path().to_string(),
                    field_manager: None,
                    status: 200,
                    watch: true,
                    dry_run: false,
                });
                drop(guard);
                return watch::start(shared.clone(), w);
            }
            Err(r) => *r,
        }
    } else {
        serve(&mut guard, &method, &uri, &query, &headers, &body)
    };
    guard.log.push(Logged {
        method: method.to_string(),
        path: uri.path().to_string(),
        field_manager: query.get("fieldManager").cloned(),
        status: response.status().as_u16(),
        watch: false,
        dry_run: query.contains_key("dryRun"),
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

/// Where a resource path points.
struct Route {
    t: TypeDef,
    namespace: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

/// The 404 of a path in a group (version) the server does not serve at
/// all: a plain-text page, not a Status (fixture 56d).
fn page_not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        "404 page not found\n",
    )
        .into_response()
}

/// The 404 of an unknown resource in a served group (fixture 56c).
fn not_found_page() -> Response {
    status(
        404,
        "NotFound",
        "the server could not find the requested resource".into(),
        json!({}),
    )
}

fn route(inner: &Inner, path: &str) -> Result<Route, Box<Response>> {
    let segs: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => (String::new(), v.to_string(), rest),
        ["apis", g, v, rest @ ..] => (g.to_string(), v.to_string(), rest),
        _ => return Err(Box::new(page_not_found())),
    };
    if !inner.types.iter().any(|t| t.0 == group && t.1 == version) {
        return Err(Box::new(page_not_found()));
    }
    let (namespace, rest): (Option<String>, &[&str]) = match rest {
        ["namespaces", ns, plural, ..]
            if inner
                .types
                .iter()
                .any(|t| t.0 == group && t.3 == *plural && t.4) =>
        {
            (Some(ns.to_string()), &rest[2..])
        }
        _ => (None, rest),
    };
    let Some(plural) = rest.first() else {
        return Err(Box::new(not_found_page()));
    };
    let Some(t) = inner
        .types
        .iter()
        .find(|t| t.0 == group && t.1 == version && t.3 == *plural)
        .cloned()
    else {
        return Err(Box::new(not_found_page()));
    };
    if t.4 && namespace.is_none() && rest.len() > 1 {
        return Err(Box::new(not_found_page()));
    }
    Ok(Route {
        t,
        namespace,
        name: rest.get(1).map(|s| s.to_string()),
        sub: rest.get(2).map(|s| s.to_string()),
    })
}

fn watch_request(
    inner: &Inner,
    uri: &Uri,
    query: &BTreeMap<String, String>,
) -> Result<watch::Request, Box<Response>> {
    let r = route(inner, uri.path())?;
    let since = match query.get("resourceVersion").map(String::as_str) {
        None | Some("") | Some("0") => None,
        Some(rv) => match rv.parse::<u64>() {
            Ok(rv) => Some(rv),
            Err(_) => {
                return Err(Box::new(status(
                    400,
                    "BadRequest",
                    format!("invalid resource version: {rv}"),
                    Value::Null,
                )))
            }
        },
    };
    let mut fields = query.get("fieldSelector").cloned().unwrap_or_default();
    if let Some(name) = &r.name {
        fields = format!("metadata.name={name}");
    }
    Ok(watch::Request {
        group: r.t.0.clone(),
        plural: r.t.3.clone(),
        namespace: r.namespace,
        labels: query.get("labelSelector").cloned().unwrap_or_default(),
        fields,
        since,
        timeout: Duration::from_secs(
            query
                .get("timeoutSeconds")
                .and_then(|s| s.parse().ok())
                .unwrap_or(1800),
        ),
        bookmarks: query
            .get("allowWatchBookmarks")
            .is_some_and(|b| b == "true"),
        kind: r.t.2.clone(),
        api_version: api_version_of(&r.t),
    })
}

/// A `continue` token as the real server writes it: unpadded URL-safe
/// base64 of `{"v":"meta.k8s.io/v1","rv":N,"start":"<key>\u0000"}`.
fn continue_token(rv: u64, last: &str) -> String {
    let start = serde_json::to_string(&format!("{last}\u{0}")).unwrap_or_default();
    let json = format!("{{\"v\":\"meta.k8s.io/v1\",\"rv\":{rv},\"start\":{start}}}");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
}

/// The key a `continue` token starts from, or the real server's 400.
fn continue_start(token: &str) -> Result<(u64, String), Box<Response>> {
    let bad = |why: String| {
        Box::new(status(
            400,
            "BadRequest",
            format!("invalid continue token: continue key is not valid: {why}"),
            Value::Null,
        ))
    };
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|e| {
            let at = match e {
                base64::DecodeError::InvalidByte(at, _) => at,
                base64::DecodeError::InvalidLastSymbol(at, _) => at,
                _ => token.len().saturating_sub(1),
            };
            bad(format!("illegal base64 data at input byte {at}"))
        })?;
    let v: Value = serde_json::from_slice(&raw).map_err(|e| bad(e.to_string()))?;
    match (v["rv"].as_u64(), v["start"].as_str()) {
        (Some(rv), Some(start)) => Ok((rv, start.to_string())),
        _ => Err(bad("no resourceVersion or start key".into())),
    }
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
    match segs.as_slice() {
        ["api"] => return discovery::core(inner, headers),
        ["apis"] => return discovery::groups(inner, headers),
        ["api", v] => {
            return discovery::resource_list(inner, "", v)
                .map(|b| ok(200, b))
                .unwrap_or_else(page_not_found);
        }
        ["apis", g, v] => {
            return discovery::resource_list(inner, g, v)
                .map(|b| ok(200, b))
                .unwrap_or_else(page_not_found);
        }
        _ => {}
    }
    let r = match route(inner, uri.path()) {
        Ok(r) => r,
        Err(e) => return *e,
    };
    let t = r.t.clone();
    let group = t.0.clone();
    let namespace = r.namespace.clone().unwrap_or_default();
    let gr = qualified(&group, &t.3);
    let not_found = |name: &str| {
        status(
            404,
            "NotFound",
            format!("{gr} \"{name}\" not found"),
            details(&group, &t.3, name),
        )
    };
    let key_of = |name: &str| {
        (
            group.clone(),
            t.3.clone(),
            namespace.clone(),
            name.to_string(),
        )
    };
    let sub = r.sub.as_deref();
    match (method, r.name) {
        (&Method::GET, None) => list(inner, &t, r.namespace.as_deref(), query),
        (&Method::GET, Some(name)) => match (inner.objects.get(&key_of(&name)), sub) {
            (Some(o), Some("scale")) => ok(200, scale_of(o)),
            (Some(o), _) => ok(200, o.clone()),
            (None, _) => not_found(&name),
        },
        (&Method::DELETE, Some(name)) => delete(inner, &t, &key_of(&name)),
        (&Method::PATCH, Some(name)) => {
            let ctype = headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let applying = ctype.starts_with("application/apply-patch");
            let parsed: Result<Value, String> = if applying {
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
            let key = key_of(&name);
            if t.4 && !inner.objects.contains_key(&key) {
                if let Some(refused) = namespace_refuses(inner, &t, &namespace, &name) {
                    return refused;
                }
            }
            let manager = query.get("fieldManager").cloned();
            if applying {
                let Some(manager) = manager else {
                    return status(
                        400,
                        "BadRequest",
                        "PATCH request failed: fieldManager is required for apply requests".into(),
                        Value::Null,
                    );
                };
                apply(
                    inner,
                    &t,
                    &key,
                    &manager,
                    patch,
                    ApplyOptions {
                        force: query.get("force").is_some_and(|f| f == "true"),
                        dry_run: query.contains_key("dryRun"),
                        strict: query.get("fieldValidation").is_some_and(|v| v == "Strict"),
                        subresource: sub.unwrap_or_default().to_string(),
                    },
                )
            } else {
                let Some(before) = inner.objects.get(&key).cloned() else {
                    return not_found(&name);
                };
                let manager = manager.unwrap_or_else(|| user_agent_manager(headers));
                let mut after = before.clone();
                let strategic = ctype.starts_with("application/strategic-merge-patch");
                // The scale subresource is a Scale object: its replicas are
                // the parent's (fixture 54b).
                let patch = match sub {
                    Some("scale") => {
                        json!({"spec": {"replicas": patch["spec"]["replicas"].clone()}})
                    }
                    _ => patch,
                };
                if strategic {
                    strategic_merge("", &mut after, &patch);
                } else {
                    merge(&mut after, &patch);
                }
                if sub == Some("status") {
                    status_defaults(&t.2, &mut after);
                }
                let stored = update(
                    inner,
                    &t.2,
                    &key,
                    (&manager, sub.unwrap_or_default()),
                    before,
                    after,
                );
                after_write(inner, &key, false);
                match sub {
                    Some("scale") => ok(200, scale_of(&stored)),
                    _ => ok(200, stored),
                }
            }
        }
        (&Method::PUT, Some(name)) => {
            let Ok(mut obj) = serde_json::from_slice::<Value>(body) else {
                return status(400, "BadRequest", "error decoding body".into(), Value::Null);
            };
            let key = key_of(&name);
            let Some(live) = inner.objects.get(&key).cloned() else {
                return not_found(&name);
            };
            if obj["metadata"]["resourceVersion"].is_string()
                && obj["metadata"]["resourceVersion"] != live["metadata"]["resourceVersion"]
            {
                return conflict_modified(&group, &t.3, &name);
            }
            for k in [
                "uid",
                "creationTimestamp",
                "generation",
                "deletionTimestamp",
            ] {
                if !live["metadata"][k].is_null() {
                    obj["metadata"][k] = live["metadata"][k].clone();
                }
            }
            if let Some(m) = obj["metadata"].as_object_mut() {
                m.remove("managedFields");
            }
            // A PUT of the object leaves its status alone, and of the
            // status subresource everything else.
            let after = if sub == Some("status") {
                let mut a = live.clone();
                a["status"] = obj["status"].clone();
                a
            } else {
                if let Some(s) = live.get("status") {
                    obj["status"] = s.clone();
                }
                obj
            };
            let manager = query
                .get("fieldManager")
                .cloned()
                .unwrap_or_else(|| user_agent_manager(headers));
            let stored = update(
                inner,
                &t.2,
                &key,
                (&manager, sub.unwrap_or_default()),
                live,
                after,
            );
            after_write(inner, &key, false);
            ok(200, stored)
        }
        (&Method::POST, None) => {
            let Ok(obj) = serde_json::from_slice::<Value>(body) else {
                return status(400, "BadRequest", "error decoding body".into(), Value::Null);
            };
            let name = obj["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let key = key_of(&name);
            if inner.objects.contains_key(&key) {
                return status(
                    409,
                    "AlreadyExists",
                    format!("{gr} \"{name}\" already exists"),
                    details(&group, &t.3, &name),
                );
            }
            if t.4 {
                if let Some(refused) = namespace_refuses(inner, &t, &namespace, &name) {
                    return refused;
                }
            }
            let manager = query
                .get("fieldManager")
                .cloned()
                .unwrap_or_else(|| user_agent_manager(headers));
            let stored = create_object(inner, &t, &key, &manager, obj);
            ok(201, stored)
        }
        _ => status(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource".to_string(),
            Value::Null,
        ),
    }
}

/// Without `fieldManager` the real server names the manager after the
/// client's User-Agent (fixture 18: `curl`; 58d: `fixture-recorder`).
fn user_agent_manager(headers: &HeaderMap) -> String {
    headers
        .get("user-agent")
        .and_then(|v| v.to_str().ok())
        .and_then(|ua| ua.split('/').next())
        .filter(|s| !s.is_empty())
        .unwrap_or("unknown")
        .to_string()
}

/// Why an object cannot be created in `namespace`: it does not exist
/// (404 on the namespace) or is being deleted (403, fixture 57c).
fn namespace_refuses(inner: &Inner, t: &TypeDef, namespace: &str, name: &str) -> Option<Response> {
    let ns_key = (
        String::new(),
        "namespaces".to_string(),
        String::new(),
        namespace.to_string(),
    );
    match inner.objects.get(&ns_key) {
        None => Some(status(
            404,
            "NotFound",
            format!("namespaces \"{namespace}\" not found"),
            json!({"name": namespace, "kind": "namespaces"}),
        )),
        Some(ns) if ns["metadata"]["deletionTimestamp"].is_string() => {
            let mut d = details(&t.0, &t.3, name);
            d["causes"] = json!([{"reason": "NamespaceTerminating", "message": format!("namespace {namespace} is being terminated"), "field": "metadata.namespace"}]);
            Some(status(
                403,
                "Forbidden",
                format!(
                    "{} \"{name}\" is forbidden: unable to create new content in namespace {namespace} because it is being terminated",
                    qualified(&t.0, &t.3)
                ),
                d,
            ))
        }
        Some(_) => None,
    }
}

/// The `autoscaling/v1` Scale of a Deployment or StatefulSet (54b).
fn scale_of(obj: &Value) -> Value {
    let m = &obj["metadata"];
    let selector = obj["spec"]["selector"]["matchLabels"]
        .as_object()
        .map(|l| {
            l.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    json!({
        "kind": "Scale", "apiVersion": "autoscaling/v1",
        "metadata": {"name": m["name"], "namespace": m["namespace"], "uid": m["uid"], "resourceVersion": m["resourceVersion"], "creationTimestamp": m["creationTimestamp"]},
        "spec": {"replicas": obj["spec"]["replicas"]},
        "status": {"replicas": obj["status"]["replicas"].as_i64().unwrap_or(0), "selector": selector},
    })
}

fn list(
    inner: &Inner,
    t: &TypeDef,
    namespace: Option<&str>,
    query: &BTreeMap<String, String>,
) -> Response {
    let selector = query.get("labelSelector").cloned().unwrap_or_default();
    let fields = query.get("fieldSelector").cloned().unwrap_or_default();
    let limit: usize = query.get("limit").and_then(|l| l.parse().ok()).unwrap_or(0);
    let (rv, start) = match query.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => match continue_start(token) {
            Ok((rv, start)) => (rv, Some(start)),
            Err(e) => return *e,
        },
        None => (inner.rv, None),
    };
    // The storage key order: by namespace, then name.
    let key_of = |(_, _, ns, name): &Key| -> String {
        if namespace.is_none() && !ns.is_empty() {
            format!("{ns}/{name}")
        } else {
            name.clone()
        }
    };
    let matching: Vec<(String, &Value)> = inner
        .objects
        .iter()
        .filter(|((g, p, n, _), _)| *g == t.0 && *p == t.3 && namespace.is_none_or(|ns| n == ns))
        .filter(|(_, o)| matches_selector(o, &selector) && matches_fields(o, &fields))
        .map(|(k, o)| (key_of(k), o))
        .filter(|(k, _)| start.as_ref().is_none_or(|s| k.as_str() >= s.as_str()))
        .collect();
    let take = if limit == 0 {
        matching.len()
    } else {
        limit.min(matching.len())
    };
    let items: Vec<Value> = matching[..take]
        .iter()
        // List items carry no apiVersion and kind (fixture 20).
        .map(|(_, o)| {
            let mut o = (*o).clone();
            if let Some(m) = o.as_object_mut() {
                m.remove("apiVersion");
                m.remove("kind");
            }
            o
        })
        .collect();
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if take < matching.len() {
        meta["continue"] = json!(continue_token(rv, &matching[take - 1].0));
        meta["remainingItemCount"] = json!(matching.len() - take);
    }
    ok(
        200,
        json!({"kind": format!("{}List", t.2), "apiVersion": api_version_of(t), "metadata": meta, "items": items}),
    )
}

fn delete(inner: &mut Inner, t: &TypeDef, key: &Key) -> Response {
    let Some(live) = inner.objects.get(key).cloned() else {
        return status(
            404,
            "NotFound",
            format!("{} \"{}\" not found", qualified(&t.0, &t.3), key.3),
            details(&t.0, &t.3, &key.3),
        );
    };
    if live["metadata"]["deletionTimestamp"].is_string() {
        return ok(200, live);
    }
    // A Namespace terminates: its controller removes the content first
    // (fixture 57a answers with the Namespace itself).
    if t.2 == "Namespace" {
        let mut obj = live;
        obj["metadata"]["deletionTimestamp"] = json!(TIME);
        obj["status"]["phase"] = json!("Terminating");
        inner.terminating.insert(key.3.clone(), Instant::now());
        // The recorded Namespace carries no managedFields from here on
        // (57a, 57b, 57d), its controller's writes included.
        inner.owners.remove(key);
        let stored = store(inner, key, obj, false);
        return ok(200, stored);
    }
    if live["metadata"]["finalizers"]
        .as_array()
        .is_some_and(|f| !f.is_empty())
    {
        let mut obj = live;
        obj["metadata"]["deletionTimestamp"] = json!(TIME);
        obj["metadata"]["deletionGracePeriodSeconds"] = json!(0);
        let stored = store(inner, key, obj, false);
        return ok(200, stored);
    }
    let uid = live["metadata"]["uid"].clone();
    remove(inner, key);
    let mut d = details(&t.0, &t.3, &key.3);
    d["uid"] = uid;
    ok(
        200,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": d}),
    )
}

fn conflict_modified(group: &str, plural: &str, name: &str) -> Response {
    status(
        409,
        "Conflict",
        format!("Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again", qualified(group, plural)),
        details(group, plural, name),
    )
}

pub(crate) fn matches_selector(o: &Value, selector: &str) -> bool {
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

/// `fieldSelector` terms on `metadata.name` and `metadata.namespace`.
pub(crate) fn matches_fields(o: &Value, selector: &str) -> bool {
    selector.split(',').filter(|s| !s.is_empty()).all(|term| {
        let (field, want, equal) = match term.split_once("!=") {
            Some((f, v)) => (f, v, false),
            None => match term.split_once('=') {
                Some((f, v)) => (f, v.trim_start_matches('='), true),
                None => return true,
            },
        };
        let have = match field {
            "metadata.name" => o["metadata"]["name"].as_str(),
            "metadata.namespace" => o["metadata"]["namespace"].as_str(),
            _ => return true,
        };
        (have == Some(want)) == equal
    })
}

/// How a conflict names another owner: Apply managers by name, Updates
/// with their API version, subresources named (54d, 55b).
fn describe_owner(id: &OwnerId, api_version: &str) -> String {
    let mut s = format!("\"{}\"", id.0);
    if !id.2.is_empty() {
        s.push_str(&format!(" with subresource \"{}\"", id.2));
    }
    if id.1 == "Update" {
        s.push_str(&format!(" using {api_version}"));
    }
    s
}

/// A FieldsV1 path as the real server prints it in conflicts:
/// `.spec.template.spec.containers[name="web"].env[name="LOG_LEVEL"].value`.
fn dotted(path: &[String]) -> String {
    path.iter()
        .map(|p| {
            if let Some(f) = p.strip_prefix("f:") {
                format!(".{f}")
            } else if let Some(k) = p.strip_prefix("k:") {
                let key: Map<String, Value> = serde_json::from_str(k).unwrap_or_default();
                let parts: Vec<String> = key.iter().map(|(f, v)| format!("{f}={v}")).collect();
                format!("[{}]", parts.join(","))
            } else if let Some(v) = p.strip_prefix("v:") {
                format!("[={v}]")
            } else {
                p.clone()
            }
        })
        .collect()
}

/// A FieldsV1 set holding only `path`.
fn single(path: &[String]) -> Value {
    let mut one = json!({});
    let mut cur = &mut one;
    for p in path {
        cur = cur
            .as_object_mut()
            .map(|o| o.entry(p.clone()).or_insert(json!({})))
            .unwrap_or_else(|| unreachable!("built from objects"));
    }
    one
}

struct ApplyOptions {
    force: bool,
    dry_run: bool,
    strict: bool,
    /// "" or `status`.
    subresource: String,
}

fn apply(
    inner: &mut Inner,
    t: &TypeDef,
    key: &Key,
    manager: &str,
    mut body: Value,
    o: ApplyOptions,
) -> Response {
    let (group, plural, namespace, name) = key;
    let api_version = api_version_of(t);
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
    if let Some(message) = typed_error(&t.2, &api_version, namespace, name, &body, o.strict) {
        return status(500, "", message, Value::Null);
    }
    if t.2 == "Deployment" {
        if let Some(e) = validate_deployment(&body, name) {
            return e;
        }
    }
    let live = inner.objects.get(key).cloned();
    if let (Some(rv), Some(l)) = (body["metadata"]["resourceVersion"].as_str(), &live) {
        if l["metadata"]["resourceVersion"].as_str() != Some(rv) {
            return conflict_modified(group, plural, name);
        }
    }
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
    let me: OwnerId = (manager.to_string(), "Apply".into(), o.subresource.clone());
    let owners = inner.owners.get(key).cloned().unwrap_or_default();
    let created = live.is_none();
    let mut obj = live.clone().unwrap_or_else(
        || json!({"kind": t.2, "apiVersion": api_version, "metadata": {"name": name}}),
    );
    if t.4 {
        obj["metadata"]["namespace"] = json!(namespace);
    }
    // Fields this manager applied before and no longer does, and nobody
    // else owns, are removed.
    if let Some(before) = owners.get(&me) {
        let mut old = Vec::new();
        leaves(before, &mut Vec::new(), &mut old);
        for path in old {
            let still = has_path(&fields, &path);
            let others = owners
                .iter()
                .any(|(id, owned)| *id != me && has_path(owned, &path));
            if !still && !others {
                remove_at(&mut obj, &path);
            }
        }
    }
    if let Some(m) = body.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("resourceVersion");
    }
    // Nulls in ConfigMap and Secret data are stored as "" (fixture 53).
    if matches!(t.2.as_str(), "ConfigMap" | "Secret") {
        for field in ["data", "binaryData", "stringData"] {
            for v in body
                .get_mut(field)
                .and_then(Value::as_object_mut)
                .into_iter()
                .flat_map(|m| m.values_mut())
            {
                if v.is_null() {
                    *v = json!("");
                }
            }
        }
    }
    // Secrets: stringData is write-only, folded into data, and wins over
    // data on a shared key (fixtures 21, 62a).
    let string_data = body.as_object_mut().and_then(|b| b.remove("stringData"));
    merge_applied(&mut obj, &body);
    if let Some(Value::Object(sd)) = string_data {
        for (k, v) in sd {
            obj["data"][&k] =
                json!(base64::engine::general_purpose::STANDARD
                    .encode(v.as_str().unwrap_or_default()));
        }
    }
    defaults(&t.2, &mut obj, inner.rv + 1);
    // Conflicts: another owner holds a field this apply changes.
    let mut mine = Vec::new();
    leaves(&fields, &mut Vec::new(), &mut mine);
    let mut causes: Vec<(String, String)> = Vec::new();
    let mut taken = Vec::new();
    if let Some(l) = &live {
        for path in &mine {
            for (other, owned) in owners.iter().filter(|(id, _)| **id != me) {
                if has_path(owned, path) && value_at(l, path) != value_at(&obj, path) {
                    causes.push((describe_owner(other, &api_version), dotted(path)));
                    taken.push(path.clone());
                }
            }
        }
    }
    if !causes.is_empty() && !o.force {
        let message = if causes.len() == 1 {
            format!(
                "Apply failed with 1 conflict: conflict with {}: {}",
                causes[0].0, causes[0].1
            )
        } else {
            let mut by: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
            for (m, f) in &causes {
                by.entry(m).or_default().push(f);
            }
            let lines: Vec<String> = by
                .iter()
                .map(|(m, fs)| {
                    format!(
                        "conflicts with {m}:\n{}",
                        fs.iter()
                            .map(|f| format!("- {f}"))
                            .collect::<Vec<_>>()
                            .join("\n")
                    )
                })
                .collect();
            format!(
                "Apply failed with {} conflicts: {}",
                causes.len(),
                lines.join("\n")
            )
        };
        let causes: Vec<Value> = causes
            .iter()
            .map(|(m, f)| json!({"reason": "FieldManagerConflict", "message": format!("conflict with {m}"), "field": f}))
            .collect();
        return status(409, "Conflict", message, json!({"causes": causes}));
    }
    let mut new_owners = owners.clone();
    for path in &taken {
        for (id, owned) in new_owners.iter_mut() {
            if *id != me {
                subtract(owned, &single(path));
            }
        }
    }
    new_owners.retain(|_, f| f.as_object().is_some_and(|m| !m.is_empty()));
    new_owners.insert(me, fields);
    // A no-op apply writes nothing (fixtures 13/14, 53c, 54f, 62c, 63c).
    let unchanged = live
        .as_ref()
        .is_some_and(|l| strip_meta(l) == strip_meta(&obj))
        && new_owners == owners;
    if unchanged {
        return ok(200, live.unwrap_or_default());
    }
    bump_generation(&t.2, live.as_ref(), &mut obj);
    if created {
        let uid_rv = inner.rv + 1;
        obj["metadata"]["uid"] = json!(format!("00000000-0000-4000-8000-{uid_rv:012}"));
        obj["metadata"]["creationTimestamp"] = json!(TIME);
    }
    if o.dry_run {
        let mut shown = obj.clone();
        if created {
            // A dry-run create has no resourceVersion (fixture 12).
            if let Some(m) = shown["metadata"].as_object_mut() {
                m.remove("resourceVersion");
            }
        } else {
            shown["metadata"]["resourceVersion"] = json!(inner.rv.to_string());
        }
        shown["metadata"]["managedFields"] = managed_fields_json(&new_owners, &api_version);
        return ok(if created { 201 } else { 200 }, shown);
    }
    inner.owners.insert(key.clone(), new_owners);
    // The answer is the object as written, before controllers reacted.
    let stored = store(inner, key, obj, created);
    after_write(inner, key, created);
    ok(if created { 201 } else { 200 }, stored)
}

/// `generation` moves when `spec` changes (not for kinds without one).
fn bump_generation(kind: &str, live: Option<&Value>, obj: &mut Value) {
    if obj.get("spec").is_none()
        || matches!(
            kind,
            "Lease" | "Service" | "PersistentVolumeClaim" | "Namespace"
        )
    {
        return;
    }
    let changed = live.is_none_or(|l| l.get("spec") != obj.get("spec"));
    if changed {
        let g = live
            .and_then(|l| l["metadata"]["generation"].as_i64())
            .unwrap_or(0);
        obj["metadata"]["generation"] = json!(g + 1);
    }
}

/// An Update by `who` = (manager, subresource) from `before` to `after`:
/// the manager owns what it changed, taken from every other owner. An
/// object whose last finalizer went while it was being deleted is gone
/// (fixture 57f). Returns the object as answered; the caller runs
/// [`after_write`] (controllers write through here too).
fn update(
    inner: &mut Inner,
    kind: &str,
    key: &Key,
    who: (&str, &str),
    before: Value,
    mut after: Value,
) -> Value {
    let me: OwnerId = (who.0.to_string(), "Update".into(), who.1.to_string());
    let changed = changed_fields(
        "",
        &strip_meta_for_fields(&before),
        &strip_meta_for_fields(&after),
    )
    .unwrap_or_else(|| json!({}));
    let owners = inner.owners.entry(key.clone()).or_default();
    for (id, owned) in owners.iter_mut() {
        if *id != me {
            subtract(owned, &changed);
        }
        // An Update that removes a field ends everyone's ownership of it.
        retain_existing(owned, &before, &after);
    }
    union(owners.entry(me).or_insert_with(|| json!({})), &changed);
    bump_generation(kind, Some(&before), &mut after);
    // (A Namespace goes when its controller has emptied it, not here.)
    let finalized = kind != "Namespace"
        && after["metadata"]["deletionTimestamp"].is_string()
        && after["metadata"]["finalizers"]
            .as_array()
            .is_none_or(|f| f.is_empty());
    if finalized {
        if let Some(m) = after["metadata"].as_object_mut() {
            m.remove("finalizers");
        }
        inner
            .owners
            .entry(key.clone())
            .or_default()
            .retain(|_, f| f.as_object().is_some_and(|m| !m.is_empty()));
        inner.objects.insert(key.clone(), after);
        let answer = render_managed(inner, key);
        remove(inner, key);
        return answer;
    }
    if strip_meta(&before) == strip_meta(&after)
        && inner.objects.contains_key(key)
        && changed.as_object().is_some_and(|m| m.is_empty())
    {
        inner.objects.insert(key.clone(), after);
        let obj = render_managed(inner, key);
        inner.objects.insert(key.clone(), obj.clone());
        return obj;
    }
    store(inner, key, after, false)
}

/// The object without the metadata the server writes, for field diffs.
fn strip_meta_for_fields(o: &Value) -> Value {
    let mut o = o.clone();
    if let Some(m) = o.get_mut("metadata").and_then(Value::as_object_mut) {
        for k in [
            "managedFields",
            "resourceVersion",
            "generation",
            "uid",
            "creationTimestamp",
            "name",
            "namespace",
        ] {
            m.remove(k);
        }
        if m.is_empty() {
            o.as_object_mut().map(|x| x.remove("metadata"));
        }
    }
    for k in ["apiVersion", "kind"] {
        o.as_object_mut().map(|x| x.remove(k));
    }
    o
}

/// Creates an object with an Update (POST, or a tool other than sluice):
/// its manager owns every field it set, maps and keyed lists included.
fn create_object(
    inner: &mut Inner,
    t: &TypeDef,
    key: &Key,
    manager: &str,
    mut obj: Value,
) -> Value {
    let fields = created_fields("", &strip_meta_for_fields(&obj));
    if t.4 {
        obj["metadata"]["namespace"] = json!(key.2);
    }
    obj["apiVersion"] = json!(api_version_of(t));
    obj["kind"] = json!(t.2);
    if let Some(m) = obj["metadata"].as_object_mut() {
        m.remove("resourceVersion");
    }
    defaults(&t.2, &mut obj, inner.rv + 1);
    bump_generation(&t.2, None, &mut obj);
    obj["metadata"]["uid"] = json!(format!("uid-{}", inner.rv + 1));
    obj["metadata"]["creationTimestamp"] = json!(TIME);
    let mut owners = Owners::new();
    if fields.as_object().is_some_and(|m| !m.is_empty()) {
        owners.insert(
            (manager.to_string(), "Update".into(), String::new()),
            fields,
        );
    }
    inner.owners.insert(key.clone(), owners);
    let stored = store(inner, key, obj, true);
    after_write(inner, key, true);
    stored
}

/// Writes `obj` as the next resourceVersion: managedFields are rendered,
/// and watches hear of it.
fn store(inner: &mut Inner, key: &Key, mut obj: Value, created: bool) -> Value {
    inner.rv += 1;
    obj["metadata"]["resourceVersion"] = json!(inner.rv.to_string());
    if let Some(owners) = inner.owners.get_mut(key) {
        owners.retain(|_, f| f.as_object().is_some_and(|m| !m.is_empty()));
    }
    inner.objects.insert(key.clone(), obj);
    let obj = render_managed(inner, key);
    inner.objects.insert(key.clone(), obj.clone());
    record(
        inner,
        if created { "ADDED" } else { "MODIFIED" },
        key,
        obj.clone(),
    );
    obj
}

/// Deletes an object now; watches see it DELETED with the deletion's
/// resourceVersion (fixture 58b).
fn remove(inner: &mut Inner, key: &Key) -> Option<Value> {
    let mut obj = inner.objects.remove(key)?;
    inner.owners.remove(key);
    inner.rv += 1;
    obj["metadata"]["resourceVersion"] = json!(inner.rv.to_string());
    if obj["kind"] == "CustomResourceDefinition" {
        let g = obj["spec"]["group"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let k = obj["spec"]["names"]["kind"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        inner.types.retain(|x| !(x.0 == g && x.2 == k));
    }
    if obj["kind"] == "Namespace" {
        inner.terminating.remove(&key.3);
    }
    record(inner, "DELETED", key, obj.clone());
    Some(obj)
}

fn record(inner: &mut Inner, kind: &'static str, key: &Key, object: Value) {
    inner.events.push_back(watch::Event {
        rv: inner.rv,
        kind,
        key: key.clone(),
        object,
    });
    while inner.events.len() > watch::KEPT {
        if let Some(e) = inner.events.pop_front() {
            inner.compacted = e.rv;
        }
    }
    inner.changed.notify_waiters();
}

fn managed_fields_json(owners: &Owners, api_version: &str) -> Value {
    let mut entries: Vec<(&OwnerId, &Value)> = owners
        .iter()
        .filter(|(_, f)| f.as_object().is_some_and(|m| !m.is_empty()))
        .collect();
    // As the real server orders them: operation, time (none first),
    // manager, subresource.
    entries.sort_by_key(|(id, _)| (id.1.clone(), id.2 != "scale", id.0.clone(), id.2.clone()));
    Value::Array(
        entries
            .into_iter()
            .map(|((manager, operation, sub), f)| {
                let mut e = json!({"manager": manager, "operation": operation, "apiVersion": api_version, "fieldsType": "FieldsV1", "fieldsV1": f});
                // The scale subresource records no time (fixture 54c).
                if sub != "scale" {
                    e["time"] = json!(TIME);
                }
                if !sub.is_empty() {
                    e["subresource"] = json!(sub);
                }
                e
            })
            .collect(),
    )
}

fn render_managed(inner: &Inner, key: &Key) -> Value {
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

/// What the API server and controllers do after a write: serve a new
/// CRD, publish the root CA into a new Namespace, run the workload
/// controllers.
fn after_write(inner: &mut Inner, key: &Key, created: bool) {
    let Some(obj) = inner.objects.get(key).cloned() else {
        return;
    };
    let kind = obj["kind"].as_str().unwrap_or_default().to_string();
    if kind == "CustomResourceDefinition" {
        register_crd(inner, &obj);
        establish(inner, key, obj);
        return;
    }
    if kind == "Namespace" && created && inner.core_controllers {
        publish_root_ca(inner, &key.3);
    }
    run_controllers(inner, key);
}

/// The root-CA publisher's ConfigMap in every Namespace (fixture 59a).
fn publish_root_ca(inner: &mut Inner, namespace: &str) {
    let t = (
        "".to_string(),
        "v1".to_string(),
        "ConfigMap".to_string(),
        "configmaps".to_string(),
        true,
    );
    let key = (
        String::new(),
        "configmaps".to_string(),
        namespace.to_string(),
        "kube-root-ca.crt".to_string(),
    );
    if inner.objects.contains_key(&key) {
        return;
    }
    let cm = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "kube-root-ca.crt", "namespace": namespace, "annotations": {"kubernetes.io/description": "Contains a CA bundle that can be used to verify the kube-apiserver when using internal endpoints such as the internal service IP or kubernetes.default.svc. No other usage is guaranteed across distributions of Kubernetes clusters."}},
        "data": {"ca.crt": "-----BEGIN CERTIFICATE-----\nfake\n-----END CERTIFICATE-----\n"},
    });
    create_object(inner, &t, &key, "kube-controller-manager", cm);
}

/// The namespace controller, run before each request: a Namespace deleted
/// at least [`Inner::namespace_sync`] ago has its content deleted (what
/// finalizers hold is marked being deleted and stays), its conditions
/// written (fixture 57d), and is removed once nothing is left (57g).
fn tick(inner: &mut Inner) {
    if !inner.core_controllers {
        return;
    }
    let due: Vec<String> = inner
        .terminating
        .iter()
        .filter(|(_, since)| since.elapsed() >= inner.namespace_sync)
        .map(|(ns, _)| ns.clone())
        .collect();
    for ns in due {
        let content: Vec<Key> = inner
            .objects
            .keys()
            .filter(|k| k.2 == ns && !(k.1 == "namespaces" && k.0.is_empty()))
            .cloned()
            .collect();
        for key in content {
            let Some(obj) = inner.objects.get(&key).cloned() else {
                continue;
            };
            let held = obj["metadata"]["finalizers"]
                .as_array()
                .is_some_and(|f| !f.is_empty());
            if !held {
                remove(inner, &key);
            } else if !obj["metadata"]["deletionTimestamp"].is_string() {
                let mut o = obj;
                o["metadata"]["deletionTimestamp"] = json!(TIME);
                o["metadata"]["deletionGracePeriodSeconds"] = json!(0);
                store(inner, &key, o, false);
            }
        }
        let left: Vec<&Value> = inner
            .objects
            .iter()
            .filter(|(k, _)| k.2 == ns && !(k.1 == "namespaces" && k.0.is_empty()))
            .map(|(_, o)| o)
            .collect();
        let ns_key = (
            String::new(),
            "namespaces".to_string(),
            String::new(),
            ns.clone(),
        );
        if left.is_empty() {
            remove(inner, &ns_key);
            continue;
        }
        let mut resources: BTreeMap<String, usize> = BTreeMap::new();
        let mut finalizers: BTreeMap<String, usize> = BTreeMap::new();
        for o in &left {
            let plural = inner
                .types
                .iter()
                .find(|t| Some(t.2.as_str()) == o["kind"].as_str())
                .map(|t| qualified(&t.0, &t.3))
                .unwrap_or_default();
            *resources.entry(plural).or_default() += 1;
            for f in o["metadata"]["finalizers"].as_array().into_iter().flatten() {
                *finalizers
                    .entry(f.as_str().unwrap_or_default().to_string())
                    .or_default() += 1;
            }
        }
        let remaining = resources
            .iter()
            .map(|(r, n)| format!("{r}. has {n} resource instances"))
            .collect::<Vec<_>>()
            .join(", ");
        let held = finalizers
            .iter()
            .map(|(f, n)| format!("{f} in {n} resource instances"))
            .collect::<Vec<_>>()
            .join(", ");
        let condition = |t: &str, s: &str, r: &str, m: String| json!({"type": t, "status": s, "lastTransitionTime": TIME, "reason": r, "message": m});
        let conditions = json!([
            condition(
                "NamespaceDeletionDiscoveryFailure",
                "False",
                "ResourcesDiscovered",
                "All resources successfully discovered".into()
            ),
            condition(
                "NamespaceDeletionGroupVersionParsingFailure",
                "False",
                "ParsedGroupVersions",
                "All legacy kube types successfully parsed".into()
            ),
            condition(
                "NamespaceDeletionContentFailure",
                "False",
                "ContentDeleted",
                "All content successfully deleted, may be waiting on finalization".into()
            ),
            condition(
                "NamespaceContentRemaining",
                "True",
                "SomeResourcesRemain",
                format!("Some resources are remaining: {remaining}")
            ),
            condition(
                "NamespaceFinalizersRemaining",
                if finalizers.is_empty() {
                    "False"
                } else {
                    "True"
                },
                if finalizers.is_empty() {
                    "ContentHasNoFinalizers"
                } else {
                    "SomeFinalizersRemain"
                },
                if finalizers.is_empty() {
                    "All content-preserving finalizers finished".to_string()
                } else {
                    format!("Some content in the namespace has finalizers remaining: {held}")
                }
            ),
        ]);
        if let Some(before) = inner.objects.get(&ns_key).cloned() {
            if before["status"]["conditions"] != conditions {
                let mut after = before;
                after["status"]["conditions"] = conditions;
                store(inner, &ns_key, after, false);
            }
        }
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
fn run_controllers(inner: &mut Inner, key: &Key) {
    let Some(obj) = inner.objects.get(key).cloned() else {
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
        _ => return,
    };
    if obj.get("status") == Some(&status) {
        return;
    }
    let mut after = obj.clone();
    after["status"] = status;
    update(
        inner,
        &kind,
        key,
        ("kube-controller-manager", "status"),
        obj,
        after,
    );
}

/// The API server accepts a CRD's names and serves it: Established.
fn establish(inner: &mut Inner, key: &Key, mut obj: Value) {
    if obj["status"]["conditions"].is_array() {
        return;
    }
    let now = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string();
    let accepted = obj["spec"]["names"].clone();
    let update_ = json!({
        "acceptedNames": accepted,
        "conditions": [
            {"type": "NamesAccepted", "status": "True", "lastTransitionTime": now, "reason": "NoConflicts", "message": "no conflicts found"},
            {"type": "Established", "status": "True", "lastTransitionTime": now, "reason": "InitialNamesAccepted", "message": "the initial names have been accepted"},
        ],
    });
    let before = obj.clone();
    merge(&mut obj["status"], &update_);
    crate::update(
        inner,
        "CustomResourceDefinition",
        key,
        ("kube-apiserver", "status"),
        before,
        obj,
    );
}
