//! The render stage: one commit's files → typed desired resources.
//!
//! Pure: reads only the [`Snapshot`] it is given; a kustomize folder is
//! built through the [`Kustomize`] it is given (the real one runs
//! `kubectl kustomize`, a side effect kept out of this module). Every
//! error names the
//! file, the field and, where it can, the line; no value from a manifest is
//! echoed in an error (it could be a secret).
//!
//! # Guarantees
//! - Every file read stays inside its service's folder after resolving `..`
//!   and symbolic links ([`Snapshot::read`]).
//! - A render either yields every resource of the commit or an error: there
//!   is no partial result, so a failed render can never prune anything.
//! - A render with no resources at all is an error for the same reason.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

pub use crate::error::RenderError;
use crate::flags::{FlagsFile, FLAGS_FILE, FLAGS_PATH};
use crate::model::{
    ArtifactSpec, FileSpec, HostResource, Metadata, ProcessSpec, RouteSpec, ServiceDef, TargetKind,
    Topology, API_VERSION, TOPOLOGY_FILE,
};
use crate::resource::{DesiredResource, DesiredState, ResourceId};
use crate::source::{normalise, FileEntry, PathError, Snapshot};
use crate::topology::check_name;
use crate::yaml::{find_line, parse_typed, split_documents, utf8, yaml_error};

/// The most resources one commit may render.
pub const MAX_RESOURCES: usize = 50_000;

/// A rendered commit: its topology and everything it wants.
#[derive(Clone, Debug)]
pub struct Rendered {
    pub topology: Topology,
    pub desired: DesiredState,
    /// The commit's `flags.yaml`, if any.
    pub flags: Option<FlagsFile>,
}

/// Builds kustomize folders: the real kustomize runs as a process, so it
/// sits behind this trait and render stays pure.
pub trait Kustomize: Send + Sync {
    /// The built manifests of the kustomization `file` at `root` of
    /// `snapshot`, as multi-document YAML; errors name `file`.
    fn build(&self, snapshot: &Snapshot, root: &str, file: &str) -> Result<String, RenderError>;
}

/// For callers that cannot run kustomize: a kustomize folder is an error.
pub struct NoKustomize;

impl Kustomize for NoKustomize {
    fn build(&self, _: &Snapshot, _: &str, file: &str) -> Result<String, RenderError> {
        Err(RenderError::invalid(
            file,
            None,
            None,
            "a kustomize folder, and this command cannot build kustomizations",
        ))
    }
}

/// Names kustomize accepts for the kustomization file.
const KUSTOMIZATION_FILES: [&str; 3] = ["kustomization.yaml", "kustomization.yml", "Kustomization"];

/// The kustomization file of `root` in `snapshot`, if it is a kustomize
/// folder.
pub fn kustomization_file(snapshot: &Snapshot, root: &str) -> Option<String> {
    KUSTOMIZATION_FILES.iter().find_map(|n| {
        let path = if root.is_empty() {
            n.to_string()
        } else {
            format!("{root}/{n}")
        };
        snapshot.files.contains_key(&path).then_some(path)
    })
}

/// Renders one commit with no kustomize (a kustomize folder is an error).
pub fn render(snapshot: &Snapshot) -> Result<Rendered, RenderError> {
    render_with(snapshot, &NoKustomize)
}

/// Renders one commit. See the module docs for the guarantees.
pub fn render_with(
    snapshot: &Snapshot,
    kustomize: &dyn Kustomize,
) -> Result<Rendered, RenderError> {
    let topology = crate::topology::load(snapshot)?;
    let mut resources: BTreeMap<ResourceId, DesiredResource> = BTreeMap::new();
    for rendered in render_services(snapshot, kustomize, &topology) {
        for resource in rendered? {
            if let Some(previous) = resources.get(&resource.id) {
                return Err(RenderError::invalid(
                    &resource.file,
                    Some("metadata.name"),
                    None,
                    format!(
                        "{} is also declared in {} (service {})",
                        resource.id, previous.file, previous.service
                    ),
                ));
            }
            resources.insert(resource.id.clone(), resource);
            if resources.len() > MAX_RESOURCES {
                return Err(RenderError::invalid(
                    TOPOLOGY_FILE,
                    None,
                    None,
                    format!("the commit renders more than {MAX_RESOURCES} resources"),
                ));
            }
        }
    }
    let flags = load_flags(snapshot, &topology)?;
    if let Some(f) = &flags {
        for t in topology
            .targets
            .iter()
            .filter(|t| t.kind == TargetKind::Host)
        {
            let r = flags_resource(f, &t.name);
            if let Some(previous) = resources.get(&r.id) {
                return Err(RenderError::invalid(
                    &previous.file,
                    Some("metadata.name"),
                    None,
                    format!("{} is the name of the published flags file", r.id),
                ));
            }
            resources.insert(r.id.clone(), r);
        }
    }
    if resources.is_empty() {
        return Err(RenderError::Empty);
    }
    Ok(Rendered {
        topology,
        desired: DesiredState::new(snapshot.revision.clone(), resources),
        flags,
    })
}

/// Reads `flags.yaml` if the commit has one.
pub fn load_flags(
    snapshot: &Snapshot,
    topology: &Topology,
) -> Result<Option<FlagsFile>, RenderError> {
    let bytes = match snapshot.read("", FLAGS_FILE) {
        Ok(b) => b,
        Err(PathError::NotFound { .. }) => return Ok(None),
        Err(source) => {
            return Err(RenderError::Path {
                file: FLAGS_FILE.to_string(),
                source,
            })
        }
    };
    let text = utf8(FLAGS_FILE, bytes)?;
    let mut flags: FlagsFile = parse_typed(FLAGS_FILE, text, 0)?;
    // A host group stands for each of its hosts; a host named on its own
    // wins over its group.
    let groups = topology.group_members();
    for f in flags.flags.values_mut() {
        for (group, hosts) in &groups {
            if let Some(v) = f.targets.remove(group) {
                for h in hosts {
                    f.targets.entry(h.clone()).or_insert_with(|| v.clone());
                }
            }
        }
    }
    if flags.api_version != API_VERSION {
        return Err(RenderError::invalid(
            FLAGS_FILE,
            Some("apiVersion"),
            find_line(text, &["apiVersion"]),
            format!("must be {API_VERSION:?}"),
        ));
    }
    let targets: Vec<&str> = topology.targets.iter().map(|t| t.name.as_str()).collect();
    flags.validate(&targets).map_err(|(field, reason)| {
        let keys: Vec<&str> = field.split('.').collect();
        RenderError::invalid(FLAGS_FILE, Some(&field), find_line(text, &keys), reason)
    })?;
    Ok(Some(flags))
}

/// The flagd file of one host target, as a File resource of the `flags`
/// service: a flag flip changes this file and nothing else.
fn flags_resource(flags: &FlagsFile, target: &str) -> DesiredResource {
    let content = serde_json::to_string_pretty(&flags.flagd(target)).unwrap_or_default() + "\n";
    let id = ResourceId::new(target, "File", "feature-flags");
    DesiredResource {
        id,
        service: "flags".into(),
        file: FLAGS_FILE.into(),
        body: json!({
            "apiVersion": API_VERSION,
            "kind": "File",
            "metadata": { "name": "feature-flags" },
            "spec": { "path": FLAGS_PATH, "content": content, "source": null, "mode": "0644", "secret": false },
        }),
        redact: Vec::new(),
        strategy: Default::default(),
        max_unavailable: None,
        crash_restarts: None,
        start_timeout: None,
        impersonate: None,
        blobs: BTreeMap::new(),
    }
}

/// Every service's resources, in service order, rendered on as many threads
/// as there are cores: services are independent until their resources
/// are merged (where duplicates are found, in that same order).
fn render_services(
    snapshot: &Snapshot,
    kustomize: &dyn Kustomize,
    topology: &Topology,
) -> Vec<Result<Vec<DesiredResource>, RenderError>> {
    let services: Vec<(&String, &ServiceDef)> = topology.services.iter().collect();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = cores.min(services.len()).max(1);
    let one = |(name, service): &(&String, &ServiceDef)| {
        render_service(snapshot, kustomize, topology, name, service)
    };
    if threads == 1 {
        return services.iter().map(one).collect();
    }
    // Interleaved, so that services of similar size spread evenly.
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let services = &services;
                s.spawn(move || {
                    services
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| i % threads == t)
                        .map(|(i, svc)| (i, one(svc)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all: Vec<(usize, Result<Vec<DesiredResource>, RenderError>)> = Vec::new();
        for h in handles {
            match h.join() {
                Ok(part) => all.extend(part),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        all.sort_by_key(|(i, _)| *i);
        all.into_iter().map(|(_, r)| r).collect()
    })
}

fn render_service(
    snapshot: &Snapshot,
    kustomize: &dyn Kustomize,
    topology: &Topology,
    name: &str,
    service: &ServiceDef,
) -> Result<Vec<DesiredResource>, RenderError> {
    let root = normalise(&service.path, "").unwrap_or_default();
    let targets: Vec<_> = topology
        .targets
        .iter()
        .filter(|t| service.targets.is_empty() || service.targets.contains(&t.name))
        .collect();
    let strategy = service.rollout.strategy;
    let mut out = Vec::new();
    // A symbolic link anywhere in the folder to outside the repository,
    // to a file or a directory, is refused whether or not anything reads
    // it (as Argo CD does since CVE-2022-24904): kustomize or a later
    // reader would follow it.
    for (path, entry) in snapshot.list(&root) {
        if let FileEntry::Symlink { target } = entry {
            let dir = path.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
            if normalise(target, dir).is_err() {
                return Err(RenderError::Path {
                    file: path.clone(),
                    source: PathError::SymlinkEscapes {
                        path: path.clone(),
                        root: "the repository".into(),
                    },
                });
            }
        }
    }
    // Plain files are read where the snapshot holds them, not copied.
    let mut sources: Vec<(String, std::borrow::Cow<str>)> = Vec::new();
    if let Some(k) = kustomization_file(snapshot, &root) {
        let built = kustomize.build(snapshot, &root, &k)?;
        sources.push((k, built.into()));
    } else {
        let files: Vec<String> = snapshot
            .list(&root)
            .filter(|(p, _)| p.ends_with(".yaml") || p.ends_with(".yml"))
            .map(|(p, _)| p.clone())
            .collect();
        for file in files {
            let bytes = snapshot
                .read(&root, &file)
                .map_err(|source| RenderError::Path {
                    file: file.clone(),
                    source,
                })?;
            let text = utf8(&file, bytes)?;
            sources.push((file, text.into()));
        }
    }
    for (file, text) in &sources {
        let text: &str = text;
        for (doc, offset) in split_documents(file, text)? {
            let crate::yaml::Json(value) =
                serde_yaml::from_str(doc).map_err(|e| yaml_error(file, offset, None, &e))?;
            if value.is_null() {
                continue;
            }
            let is_host = value
                .get("apiVersion")
                .and_then(|v| v.as_str())
                .map(|v| v == API_VERSION)
                .ok_or_else(|| {
                    RenderError::invalid(
                        file,
                        Some("apiVersion"),
                        Some(offset + 1),
                        "missing or not a string",
                    )
                })?;
            let (kind_of_target, mut bodies) = if is_host {
                let (resource, meta) = parse_host(file, doc, offset, value)?;
                let r = host_body(snapshot, &root, file, name, &resource, &meta)?;
                (TargetKind::Host, vec![r])
            } else {
                (
                    TargetKind::Kubernetes,
                    vec![kube_body(file, doc, offset, value)?],
                )
            };
            let fitting: Vec<_> = targets
                .iter()
                .filter(|t| t.kind == kind_of_target)
                .collect();
            if fitting.is_empty() {
                return Err(RenderError::invalid(
                    file,
                    Some("apiVersion"),
                    Some(offset + 1),
                    format!(
                        "a {kind_of_target} resource, but service {name:?} runs on no {kind_of_target} target"
                    ),
                ));
            }
            for (kind, meta_name, namespace, body, redact, blobs) in bodies.drain(..) {
                // One copy per target; the last target takes the original.
                let mut body = Some(body);
                for (i, t) in fitting.iter().enumerate() {
                    let body = if i + 1 == fitting.len() {
                        body.take().unwrap_or_default()
                    } else {
                        body.clone().unwrap_or_default()
                    };
                    let impersonate = match (&service.service_account_name, &t.service_account_name)
                    {
                        _ if t.kind != TargetKind::Kubernetes => None,
                        (Some(sa), _) | (None, Some(sa)) => {
                            Some(impersonated(sa, namespace.as_deref()).map_err(|reason| {
                                RenderError::invalid(file, Some("metadata.namespace"), None, reason)
                            })?)
                        }
                        (None, None) => None,
                    };
                    out.push(DesiredResource {
                        id: ResourceId {
                            target: t.name.clone(),
                            kind: kind.clone(),
                            namespace: namespace.clone(),
                            name: meta_name.clone(),
                        },
                        service: name.to_string(),
                        file: file.clone(),
                        body,
                        redact: redact.clone(),
                        strategy,
                        max_unavailable: Some(service.rollout.max_unavailable),
                        crash_restarts: Some(service.rollout.crash_restarts),
                        start_timeout: Some(service.rollout.gate_timeout),
                        impersonate,
                        blobs: blobs.clone(),
                    });
                }
            }
        }
    }
    if out.is_empty() {
        return Err(RenderError::invalid(
            TOPOLOGY_FILE,
            Some(&format!("services.{name}.path")),
            None,
            format!(
                "folder {:?} holds no manifests (*.yaml, *.yml)",
                service.path
            ),
        ));
    }
    check_routes(&out)?;
    Ok(out)
}

type Body = (
    String,
    String,
    Option<String>,
    Value,
    Vec<String>,
    BTreeMap<String, Arc<Vec<u8>>>,
);

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Doc<S> {
    #[allow(dead_code)]
    api_version: String,
    #[allow(dead_code)]
    kind: String,
    metadata: Metadata,
    spec: S,
}

/// A host document, typed from its parsed `value`; only an invalid one is
/// parsed again from `doc`, for the line of the error.
fn parse_host(
    file: &str,
    doc: &str,
    offset: usize,
    value: Value,
) -> Result<(HostResource, Metadata), RenderError> {
    fn typed<S: serde::de::DeserializeOwned>(
        file: &str,
        doc: &str,
        offset: usize,
        value: Value,
    ) -> Result<Doc<S>, RenderError> {
        serde_path_to_error::deserialize(value).or_else(|_| parse_typed(file, doc, offset))
    }
    let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
    let (resource, metadata) = match kind {
        "Process" => {
            let d: Doc<ProcessSpec> = typed(file, doc, offset, value)?;
            (HostResource::Process(d.spec), d.metadata)
        }
        "File" => {
            let d: Doc<FileSpec> = typed(file, doc, offset, value)?;
            (HostResource::File(d.spec), d.metadata)
        }
        "Route" => {
            let d: Doc<RouteSpec> = typed(file, doc, offset, value)?;
            (HostResource::Route(d.spec), d.metadata)
        }
        _ => {
            return Err(RenderError::invalid(
                file,
                Some("kind"),
                Some(offset + find_line(doc, &["kind"]).unwrap_or(1)),
                format!(
                    "unknown kind for {API_VERSION}; expected one of {}",
                    HostResource::KINDS.join(", ")
                ),
            ))
        }
    };
    check_name(&metadata.name).map_err(|reason| {
        RenderError::invalid(
            file,
            Some("metadata.name"),
            Some(offset + find_line(doc, &["metadata", "name"]).unwrap_or(1)),
            reason,
        )
    })?;
    Ok((resource, metadata))
}

/// Validates a host resource beyond its types and builds its body.
fn host_body(
    snapshot: &Snapshot,
    root: &str,
    file: &str,
    _service: &str,
    resource: &HostResource,
    meta: &Metadata,
) -> Result<Body, RenderError> {
    let invalid =
        |field: &str, reason: String| RenderError::invalid(file, Some(field), None, reason);
    let mut redact = Vec::new();
    let mut blobs = BTreeMap::new();
    let mut resource = resource.clone();
    match &mut resource {
        HostResource::Process(p) => {
            if p.command.trim().is_empty() {
                return Err(invalid("spec.command", "must not be empty".into()));
            }
            if p.version.trim().is_empty() {
                return Err(invalid("spec.version", "must not be empty".into()));
            }
            if p.replicas == 0 || p.replicas > 64 {
                return Err(invalid("spec.replicas", "must be between 1 and 64".into()));
            }
            if p.port.is_some() && p.replicas > 1 {
                return Err(invalid("spec.port", "a fixed port needs replicas: 1 (leave it unset and the agent assigns one per replica)".into()));
            }
            if p.port == Some(0) {
                return Err(invalid(
                    "spec.port",
                    "must be 1-65535 (leave it unset to have one assigned)".into(),
                ));
            }
            if let Some(r) = &p.readiness {
                if r.http.is_some() == r.tcp {
                    return Err(invalid(
                        "spec.readiness",
                        "set exactly one of `http: /path` or `tcp: true`".into(),
                    ));
                }
                if let Some(path) = &r.http {
                    if !path.starts_with('/') {
                        return Err(invalid(
                            "spec.readiness.http",
                            "must be a path starting with /".into(),
                        ));
                    }
                }
            }
            if let Some(dir) = &p.working_dir {
                if normalise(dir, "").is_err() {
                    return Err(invalid(
                        "spec.workingDir",
                        "must be relative to the file root, without `..` above it".into(),
                    ));
                }
            }
            let mut names = BTreeSet::new();
            for (i, a) in p.artifacts.iter_mut().enumerate() {
                let field = format!("spec.artifacts[{i}]");
                check_artifact(snapshot, root, a, &field, file, &mut blobs)?;
                if !names.insert(a.name.clone()) {
                    return Err(invalid(
                        &format!("{field}.name"),
                        format!("artifact {:?} declared twice", a.name),
                    ));
                }
            }
            for key in p.env.keys() {
                if looks_secret(key) {
                    redact.push(format!("spec.env.{key}"));
                }
            }
        }
        HostResource::File(f) => {
            match normalise(&f.path, "") {
                Ok(p) if !p.is_empty() => {}
                _ => {
                    return Err(invalid(
                        "spec.path",
                        "must be a relative path inside the file root (no absolute path, no `..`)"
                            .into(),
                    ))
                }
            }
            match (&f.content, &f.source) {
                (Some(_), None) => {}
                (None, Some(source)) => {
                    let path = normalise(source, root).map_err(|_| {
                        invalid(
                            "spec.source",
                            "must be a file of the service's folder".into(),
                        )
                    })?;
                    let bytes = snapshot
                        .read(root, &path)
                        .map_err(|source| RenderError::Path {
                            file: file.to_string(),
                            source,
                        })?;
                    let text = std::str::from_utf8(bytes).map_err(|_| {
                        invalid(
                            "spec.source",
                            "is not UTF-8 text; ship binary files as an artifact".into(),
                        )
                    })?;
                    f.content = Some(text.to_string());
                }
                _ => {
                    return Err(invalid(
                        "spec",
                        "set exactly one of `content` or `source`".into(),
                    ))
                }
            }
            if u32::from_str_radix(f.mode.trim_start_matches("0o"), 8).map_or(true, |m| m > 0o7777)
            {
                return Err(invalid(
                    "spec.mode",
                    "must be octal permission bits such as \"0644\"".into(),
                ));
            }
            if f.secret {
                redact.push("spec.content".to_string());
            }
        }
        HostResource::Route(r) => {
            if r.listen.parse::<SocketAddr>().is_err() {
                return Err(invalid(
                    "spec.listen",
                    "must be an address such as 127.0.0.1:8080".into(),
                ));
            }
        }
    }
    let kind = resource.kind();
    let typed = serde_json::to_value(&resource).map_err(|e| invalid("spec", e.to_string()))?;
    let spec = typed.get("spec").cloned().unwrap_or(Value::Null);
    let mut metadata = json!({ "name": meta.name });
    if !meta.labels.is_empty() {
        metadata["labels"] = json!(meta.labels);
    }
    let body =
        json!({ "apiVersion": API_VERSION, "kind": kind, "metadata": metadata, "spec": spec });
    Ok((
        kind.to_string(),
        meta.name.clone(),
        None,
        body,
        redact,
        blobs,
    ))
}

/// Checks an artifact. A repository file is pinned by the commit itself: its
/// digest is computed (and checked against `sha256` when given). A download
/// without `sha256` is left unpinned here: the default guardrail denies it
/// with the plan, and the host target refuses it.
fn check_artifact(
    snapshot: &Snapshot,
    root: &str,
    a: &mut ArtifactSpec,
    field: &str,
    file: &str,
    blobs: &mut BTreeMap<String, Arc<Vec<u8>>>,
) -> Result<(), RenderError> {
    let invalid = |f: &str, reason: String| {
        RenderError::invalid(file, Some(&format!("{field}.{f}")), None, reason)
    };
    check_name(&a.name).map_err(|r| invalid("name", r))?;
    if let Some(sha) = &a.sha256 {
        if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid("sha256", "must be 64 hex digits".into()));
        }
    }
    match (&a.url, &a.path) {
        (Some(url), None) => {
            let scheme_ok = url.starts_with("https://")
                || url.starts_with("http://")
                || url.starts_with("file://");
            if !scheme_ok {
                return Err(invalid(
                    "url",
                    "must be an https:// (or file://) URL".into(),
                ));
            }
        }
        (None, Some(path)) => {
            let path = normalise(path, root)
                .map_err(|_| invalid("path", "must be a file of the service's folder".into()))?;
            let bytes = snapshot
                .read(root, &path)
                .map_err(|source| RenderError::Path {
                    file: file.to_string(),
                    source,
                })?;
            let actual = hex::encode(Sha256::digest(bytes));
            if let Some(expected) = &a.sha256 {
                if !actual.eq_ignore_ascii_case(expected) {
                    return Err(invalid(
                        "sha256",
                        format!(
                            "digest mismatch for {path}: expected {expected}, content has {actual}"
                        ),
                    ));
                }
            }
            a.sha256 = Some(actual.clone());
            blobs.insert(actual, Arc::new(bytes.to_vec()));
        }
        _ => return Err(invalid("url", "set exactly one of `url` or `path`".into())),
    }
    Ok(())
}

fn kube_body(file: &str, doc: &str, offset: usize, mut body: Value) -> Result<Body, RenderError> {
    if !body.is_object() {
        return Err(RenderError::invalid(
            file,
            None,
            Some(offset + 1),
            "a manifest must be a mapping",
        ));
    }
    let api_version = body["apiVersion"].as_str().unwrap_or_default().to_string();
    let kind = body["kind"].as_str().map(str::to_string).ok_or_else(|| {
        RenderError::invalid(
            file,
            Some("kind"),
            Some(offset + 1),
            "missing or not a string",
        )
    })?;
    let name = body["metadata"]["name"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| {
            RenderError::invalid(
                file,
                Some("metadata.name"),
                Some(offset + 1),
                "missing or not a string",
            )
        })?;
    let namespace = body["metadata"]["namespace"].as_str().map(str::to_string);
    let group = api_version.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
    let kind_id = if group.is_empty() {
        kind.to_string()
    } else {
        format!("{group}/{kind}")
    };
    if group.is_empty() && (kind == "ConfigMap" || kind == "Secret") {
        string_data(file, doc, offset, &kind, &mut body)?;
    }
    let mut redact = Vec::new();
    if kind == "Secret" && group.is_empty() {
        redact.push("data".to_string());
        redact.push("stringData".to_string());
    }
    Ok((
        kind_id,
        name.to_string(),
        namespace,
        body,
        redact,
        BTreeMap::new(),
    ))
}

/// ConfigMap and Secret data are maps of strings: the API server refuses
/// anything else at apply, with a 500 naming no file (`data: {enabled:
/// true}`), so render does, naming file, line and key. A null value is
/// what the server stores as "": it is written as "" here, so the plan
/// compares like with like and converges. Values are never echoed (a
/// Secret's are secret).
fn string_data(
    file: &str,
    doc: &str,
    offset: usize,
    kind: &str,
    body: &mut Value,
) -> Result<(), RenderError> {
    let fields: &[&str] = if kind == "Secret" {
        &["data", "stringData"]
    } else {
        &["data", "binaryData"]
    };
    for field in fields {
        let at = |keys: &[&str]| Some(offset + find_line(doc, keys).unwrap_or(1));
        let Some(map) = body.get_mut(*field) else {
            continue;
        };
        let map = match map {
            Value::Null => continue,
            Value::Object(m) => m,
            _ => {
                return Err(RenderError::invalid(
                    file,
                    Some(field),
                    at(&[field]),
                    format!("{kind} {field} must be a mapping of keys to strings"),
                ))
            }
        };
        for (key, value) in map.iter_mut() {
            let what = match value {
                Value::String(_) => continue,
                Value::Null => {
                    *value = Value::String(String::new());
                    continue;
                }
                Value::Bool(_) => "a boolean",
                Value::Number(_) => "a number",
                Value::Array(_) => "a list",
                Value::Object(_) => "a mapping",
            };
            return Err(RenderError::invalid(
                file,
                Some(&format!("{field}.{key}")),
                at(&[field, key]),
                format!(
                    "{kind} {field} values must be strings, not {what}: quote it (\"...\") as the API server takes only strings here"
                ),
            ));
        }
    }
    Ok(())
}

/// The user a `serviceAccountName` stands for, for an object in
/// `namespace`: `ns/name` is that account, `name` the one of that name in
/// the object's own namespace.
pub fn impersonated(sa: &str, namespace: Option<&str>) -> Result<String, String> {
    let (ns, name) = match sa.split_once('/') {
        Some((ns, name)) => (ns, name),
        None => match namespace {
            Some(ns) => (ns, sa),
            None => {
                return Err(format!(
                    "serviceAccountName {sa:?} names an account in the object's namespace, and this object has none: give it a metadata.namespace or write serviceAccountName as namespace/name"
                ))
            }
        },
    };
    let valid = |s: &str| {
        !s.is_empty()
            && s.len() <= 253
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    };
    if !valid(ns) || !valid(name) {
        return Err(format!("serviceAccountName {sa:?}: not a namespace/name of lowercase letters, digits, '-' and '.'"));
    }
    Ok(format!("system:serviceaccount:{ns}:{name}"))
}

/// A Route must point at a Process of the same service.
fn check_routes(resources: &[DesiredResource]) -> Result<(), RenderError> {
    for r in resources.iter().filter(|r| r.id.kind == "Route") {
        let process = r.body["spec"]["process"].as_str().unwrap_or_default();
        let found = resources.iter().any(|p| {
            p.id.kind == "Process"
                && p.id.name == process
                && p.id.target == r.id.target
                && p.service == r.service
        });
        if !found {
            return Err(RenderError::invalid(
                &r.file,
                Some("spec.process"),
                None,
                format!("no Process named {process:?} in service {:?}", r.service),
            ));
        }
    }
    Ok(())
}

/// Environment variable names whose values are kept out of every output.
pub fn looks_secret(key: &str) -> bool {
    let k = key.to_ascii_uppercase();
    [
        "SECRET",
        "TOKEN",
        "PASSWORD",
        "PASSWD",
        "KEY",
        "CREDENTIAL",
        "AUTH",
    ]
    .iter()
    .any(|w| k.contains(w))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{CommitId, FileEntry, Revision};
    use std::path::Path;

    fn snapshot(files: &[(&str, &str)]) -> Snapshot {
        let revision = Revision {
            commit: CommitId::parse(&"d".repeat(40)).unwrap(),
            time: 0,
            summary: "t".into(),
        };
        Snapshot::from_texts(revision, files)
    }

    fn from_dir(dir: &Path) -> Snapshot {
        fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, String)>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    walk(root, &p, out);
                } else {
                    let rel = p.strip_prefix(root).unwrap().to_string_lossy().to_string();
                    out.push((rel, std::fs::read_to_string(&p).unwrap()));
                }
            }
        }
        let mut files = Vec::new();
        walk(dir, dir, &mut files);
        let refs: Vec<(&str, &str)> = files
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        snapshot(&refs)
    }

    const TOPO: &str = "apiVersion: sluice.dev/v1\nkind: Topology\ntargets:\n  - name: local\n    type: host\nservices:\n  api:\n    path: api\n";
    const PROC: &str = "apiVersion: sluice.dev/v1\nkind: Process\nmetadata:\n  name: api\nspec:\n  command: sluice-demo\n  version: \"1\"\n";

    fn err(files: &[(&str, &str)]) -> String {
        render(&snapshot(files)).unwrap_err().to_string()
    }

    #[test]
    fn the_host_example_renders_in_dependency_waves() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/host-shop");
        let r = render(&from_dir(&dir)).unwrap();
        let kinds: Vec<String> = r
            .desired
            .resources
            .keys()
            .map(|id| format!("{}/{}", id.kind, id.name))
            .collect();
        assert_eq!(
            kinds,
            [
                "File/feature-flags",
                "File/orders-config",
                "Process/catalog",
                "Process/orders",
                "Process/web",
                "Route/catalog",
                "Route/orders",
                "Route/web"
            ]
        );
        let file = &r.desired.resources[&ResourceId::new("local", "File", "orders-config")];
        assert!(file.body["spec"]["content"]
            .as_str()
            .unwrap()
            .contains("EUR"));
        assert!(r.desired.digest.starts_with("sha256:"));
        let p = crate::plan::plan(
            &r.topology,
            &r.desired,
            &BTreeMap::new(),
            &Default::default(),
        )
        .unwrap();
        let order: Vec<_> = p.waves.iter().map(|w| w.services.join(",")).collect();
        assert_eq!(order, ["catalog,flags", "orders", "web"]);
    }

    #[test]
    fn unknown_field_names_file_field_and_line() {
        let bad = PROC.replace("command:", "comand:");
        let e = err(&[("sluice.yaml", TOPO), ("api/p.yaml", &bad)]);
        assert!(e.starts_with("api/p.yaml:6: field `spec"), "{e}");
        assert!(e.contains("unknown field `comand`"), "{e}");
        let e = err(&[
            (
                "sluice.yaml",
                &TOPO.replace("    path: api", "    path: api\n    dependson: [x]"),
            ),
            ("api/p.yaml", PROC),
        ]);
        assert!(
            e.starts_with(
                "sluice.yaml:9: field `services.api.dependson`: unknown field `dependson`"
            ),
            "{e}"
        );
    }

    #[test]
    fn malformed_yaml_names_the_line_of_its_document() {
        let two = format!(
            "{PROC}---\n{}",
            PROC.replace("name: api", "name: api2")
                .replace("version: \"1\"", "version: [1")
        );
        let e = err(&[("sluice.yaml", TOPO), ("api/p.yaml", &two)]);
        assert!(e.starts_with("api/p.yaml:1"), "{e}");
    }

    #[test]
    fn a_flag_set_for_a_host_group_is_set_on_each_host_but_one_named_alone() {
        let topo = "apiVersion: sluice.dev/v1\nkind: Topology\nhostGroups:\n  - name: web\n    hosts: [{ssh: a, name: a}, {ssh: b, name: b}]\nservices:\n  api:\n    path: api\n";
        let flags = "apiVersion: sluice.dev/v1\nkind: Flags\nflags:\n  f:\n    kind: ops\n    state: enabled\n    default: off\n    targets:\n      web: on\n      web-b: off\n";
        let r = render(&snapshot(&[
            ("sluice.yaml", topo),
            ("api/p.yaml", PROC),
            ("flags.yaml", flags),
        ]))
        .unwrap();
        let f = r.flags.unwrap();
        assert_eq!(f.flagd("web-a")["flags"]["f"]["defaultVariant"], "on");
        assert_eq!(f.flagd("web-b")["flags"]["f"]["defaultVariant"], "off");
    }

    #[test]
    fn missing_path_unknown_dependency_unknown_target_and_cycles_are_named() {
        let e = err(&[
            ("sluice.yaml", &TOPO.replace("path: api", "path: nope")),
            ("api/p.yaml", PROC),
        ]);
        assert!(
            e.contains("services.api.path") && e.contains("\"nope\" not found"),
            "{e}"
        );
        let e = err(&[
            (
                "sluice.yaml",
                &TOPO.replace("path: api", "path: api\n    dependsOn: [payments]"),
            ),
            ("api/p.yaml", PROC),
        ]);
        assert!(
            e.contains("services.api.dependsOn") && e.contains("unknown service \"payments\""),
            "{e}"
        );
        let e = err(&[
            (
                "sluice.yaml",
                &TOPO.replace("path: api", "path: api\n    targets: [prod]"),
            ),
            ("api/p.yaml", PROC),
        ]);
        assert!(e.contains("unknown target \"prod\""), "{e}");
        let cyc = format!("{TOPO}    dependsOn: [b]\n  b:\n    path: api\n    dependsOn: [api]\n");
        let e = err(&[("sluice.yaml", &cyc), ("api/p.yaml", PROC)]);
        assert!(e.contains("cycle: api → b → api"), "{e}");
    }

    #[test]
    fn billion_laughs_is_refused_quickly() {
        let mut doc = String::from(
            "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
        );
        for i in 1..9 {
            let prev = (b'a' + i - 1) as char;
            let cur = (b'a' + i) as char;
            doc.push_str(&format!("{cur}: &{cur} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]\n"));
        }
        let bomb = format!("{PROC}  env:\n    X: *i\n{doc}");
        let started = std::time::Instant::now();
        let e = err(&[
            ("sluice.yaml", TOPO),
            ("api/p.yaml", &format!("{doc}---\n{bomb}")),
        ]);
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        assert!(e.contains("api/p.yaml"), "{e}");
        let e = err(&[
            ("sluice.yaml", &format!("{TOPO}{doc}")),
            ("api/p.yaml", PROC),
        ]);
        assert!(e.contains("sluice.yaml"), "{e}");
    }

    #[test]
    fn deep_nesting_is_refused() {
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        let e = err(&[
            ("sluice.yaml", TOPO),
            ("api/p.yaml", &format!("{PROC}  args: {deep}\n")),
        ]);
        assert!(
            e.contains("api/p.yaml") && e.contains("nested more than 64 levels"),
            "{e}"
        );
    }

    #[test]
    fn files_outside_the_service_folder_are_refused_without_leaking() {
        let mut s = snapshot(&[
            ("sluice.yaml", &TOPO.replace("path: api", "path: api\n  other:\n    path: other")),
            ("api/p.yaml", PROC),
            ("other/p.yaml", &PROC.replace("name: api", "name: other")),
            ("other/secret.txt", "TOP-SECRET"),
            ("api/f.yaml", "apiVersion: sluice.dev/v1\nkind: File\nmetadata:\n  name: f\nspec:\n  path: f\n  source: ../other/secret.txt\n"),
        ]);
        let e = render(&s).unwrap_err().to_string();
        assert!(e.contains("api/f.yaml") && !e.contains("TOP-SECRET"), "{e}");
        s.files.insert("api/f.yaml".into(), FileEntry::Blob {
            data: b"apiVersion: sluice.dev/v1\nkind: File\nmetadata:\n  name: f\nspec:\n  path: f\n  source: link\n".to_vec(),
            executable: false,
        });
        s.files.insert(
            "api/link".into(),
            FileEntry::Symlink {
                target: "../other/secret.txt".into(),
            },
        );
        let e = render(&s).unwrap_err().to_string();
        assert!(
            e.contains("symbolic link points outside") && !e.contains("TOP-SECRET"),
            "{e}"
        );
        s.files.insert(
            "api/link".into(),
            FileEntry::Symlink {
                target: "/etc/passwd".into(),
            },
        );
        let e = render(&s).unwrap_err().to_string();
        assert!(e.contains("symbolic link") && !e.contains("root:"), "{e}");
        // A link out of the repository that nothing reads, to a directory,
        // deep in the folder: refused all the same.
        s.files.remove("api/link");
        s.files.remove("api/f.yaml");
        assert!(render(&s).is_ok(), "{:?}", render(&s).err());
        s.files.insert(
            "api/conf/etc".into(),
            FileEntry::Symlink {
                target: "../../../etc".into(),
            },
        );
        let e = render(&s).unwrap_err().to_string();
        assert!(
            e.contains("api/conf/etc") && e.contains("symbolic link points outside"),
            "{e}"
        );
        let e = err(&[
            ("sluice.yaml", &TOPO.replace("path: api", "path: ../api")),
            ("api/p.yaml", PROC),
        ]);
        assert!(e.contains("services.api.path"), "{e}");
    }

    #[test]
    fn config_map_data_must_be_strings_and_nulls_read_as_the_server_stores_them() {
        let topo = "apiVersion: sluice.dev/v1\nkind: Topology\ntargets:\n  - name: k\n    type: kubernetes\nservices:\n  api:\n    path: api\n";
        let cm = |data: &str| {
            format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\n  namespace: n\ndata:\n{data}")
        };
        let e = err(&[
            ("sluice.yaml", topo),
            ("api/c.yaml", &cm("  name: x\n  enabled: true\n")),
        ]);
        assert!(
            e.contains("api/c.yaml:8:") && e.contains("`data.enabled`"),
            "{e}"
        );
        assert!(e.contains("not a boolean"), "{e}");
        let secret = "apiVersion: v1\nkind: Secret\nmetadata:\n  name: s\n  namespace: n\nstringData:\n  pin: 12345\n";
        let e = err(&[("sluice.yaml", topo), ("api/s.yaml", secret)]);
        assert!(e.contains("stringData.pin") && !e.contains("12345"), "{e}");
        let r = render(&snapshot(&[
            ("sluice.yaml", topo),
            ("api/c.yaml", &cm("  empty: ~\n")),
        ]))
        .unwrap();
        let (_, c) = r
            .desired
            .resources
            .iter()
            .find(|(id, _)| id.kind == "ConfigMap")
            .unwrap();
        assert_eq!(c.body["data"]["empty"], "");
    }

    #[test]
    fn service_account_names_become_the_user_sluice_impersonates() {
        assert_eq!(
            impersonated("team-a/deployer", None).unwrap(),
            "system:serviceaccount:team-a:deployer"
        );
        assert_eq!(
            impersonated("deployer", Some("shop")).unwrap(),
            "system:serviceaccount:shop:deployer"
        );
        assert!(impersonated("deployer", None)
            .unwrap_err()
            .contains("namespace/name"));
        assert!(impersonated("Team/x y", None).is_err());
    }

    #[test]
    fn values_are_not_echoed_in_errors() {
        let bad = PROC.replace(
            "version: \"1\"",
            "version: \"1\"\n  port: \"hunter2-secret\"",
        );
        let e = err(&[("sluice.yaml", TOPO), ("api/p.yaml", &bad)]);
        assert!(e.contains("spec.port") && !e.contains("hunter2"), "{e}");
    }

    #[test]
    fn empty_render_and_duplicates_are_refused() {
        let e = err(&[("sluice.yaml", TOPO), ("api/README.md", "x")]);
        assert!(e.contains("holds no manifests"), "{e}");
        let e = err(&[
            ("sluice.yaml", TOPO),
            ("api/a.yaml", PROC),
            ("api/b.yaml", PROC),
        ]);
        assert!(e.contains("also declared in api/a.yaml"), "{e}");
    }

    #[test]
    fn path_artifacts_are_verified_at_render() {
        let art = |sha: &str| {
            format!(
                "{PROC}  artifacts:\n    - name: bin\n      path: tool.sh\n      sha256: {sha}\n"
            )
        };
        let good = hex::encode(Sha256::digest(b"echo hi\n"));
        let r = render(&snapshot(&[
            ("sluice.yaml", TOPO),
            ("api/p.yaml", &art(&good)),
            ("api/tool.sh", "echo hi\n"),
        ]))
        .unwrap();
        let res = r.desired.resources.values().next().unwrap();
        assert_eq!(res.blobs.keys().next().unwrap(), &good);
        let e = err(&[
            ("sluice.yaml", TOPO),
            ("api/p.yaml", &art(&"0".repeat(64))),
            ("api/tool.sh", "echo hi\n"),
        ]);
        assert!(e.contains("digest mismatch"), "{e}");
    }

    #[test]
    fn secret_env_and_files_are_marked_for_redaction() {
        let p = PROC.replace(
            "version: \"1\"",
            "version: \"1\"\n  env:\n    DB_PASSWORD: x\n    LOG: y",
        );
        let r = render(&snapshot(&[("sluice.yaml", TOPO), ("api/p.yaml", &p)])).unwrap();
        let res = r.desired.resources.values().next().unwrap();
        assert_eq!(res.redact, vec!["spec.env.DB_PASSWORD".to_string()]);
    }
}
