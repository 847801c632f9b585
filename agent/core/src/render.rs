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
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::flags::{FlagsFile, FLAGS_FILE, FLAGS_PATH};
use crate::model::{
    ArtifactSpec, FileSpec, HostResource, Metadata, ProcessSpec, RouteSpec, ServiceDef, TargetKind,
    Topology, API_VERSION, TOPOLOGY_FILE,
};
use crate::resource::{DesiredResource, DesiredState, ResourceId};
use crate::source::{normalise, PathError, Snapshot};

/// The most resources one commit may render.
pub const MAX_RESOURCES: usize = 50_000;
/// The most YAML documents one file may hold.
pub const MAX_DOCUMENTS_PER_FILE: usize = 5_000;

/// Why a commit could not be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    /// A value is missing, malformed or refers to something that does not
    /// exist.
    #[error("{}", fmt_invalid(.file, .line, .field, .reason))]
    Invalid {
        file: String,
        line: Option<usize>,
        field: Option<String>,
        reason: String,
    },
    /// A path leaves its folder (symlink, `..`, absolute).
    #[error("{file}: {source}")]
    Path {
        file: String,
        #[source]
        source: PathError,
    },
    /// `dependsOn` forms a cycle; the services are listed in cycle order.
    #[error("{TOPOLOGY_FILE}: dependsOn cycle: {}", .cycle.join(" → "))]
    Cycle { cycle: Vec<String> },
    /// The commit renders no resources: refused, so that an accidental
    /// empty commit never prunes everything.
    #[error(
        "the commit renders no resources; refusing to apply it (an empty render never prunes)"
    )]
    Empty,
}

fn fmt_invalid(file: &str, line: &Option<usize>, field: &Option<String>, reason: &str) -> String {
    let mut s = file.to_string();
    if let Some(l) = line {
        s.push_str(&format!(":{l}"));
    }
    if let Some(f) = field {
        s.push_str(&format!(": field `{f}`"));
    }
    s.push_str(": ");
    s.push_str(reason);
    s
}

impl RenderError {
    pub(crate) fn invalid(
        file: &str,
        field: Option<&str>,
        line: Option<usize>,
        reason: impl fmt::Display,
    ) -> Self {
        RenderError::Invalid {
            file: file.to_string(),
            line,
            field: field.map(str::to_string),
            reason: reason.to_string(),
        }
    }
}

/// A rendered commit: its topology and everything it wants.
#[derive(Clone, Debug)]
pub struct Rendered {
    pub topology: Topology,
    pub desired: DesiredState,
    /// The commit's `flags.yaml`, if any.
    pub flags: Option<FlagsFile>,
    /// The effective policy: the shipped pack with the repository's over it.
    pub policy: crate::policy::PolicyPack,
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
    let (topology, policy) = load_topology_with_policy(snapshot)?;
    let mut resources: BTreeMap<ResourceId, DesiredResource> = BTreeMap::new();
    for (name, service) in &topology.services {
        for resource in render_service(snapshot, kustomize, &topology, name, service)? {
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
        policy,
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
    let flags: FlagsFile = parse_typed(FLAGS_FILE, text, 0)?;
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
        blobs: BTreeMap::new(),
    }
}

/// Reads and validates `sluice.yaml`, with every service's rollout resolved
/// through the commit's policy.
pub fn load_topology(snapshot: &Snapshot) -> Result<Topology, RenderError> {
    Ok(load_topology_with_policy(snapshot)?.0)
}

/// [`load_topology`], also returning the effective policy.
pub fn load_topology_with_policy(
    snapshot: &Snapshot,
) -> Result<(Topology, crate::policy::PolicyPack), RenderError> {
    let mut topology = load_topology_only(snapshot)?;
    let pack = crate::policy::load(snapshot)?;
    crate::policy::apply_defaults(&pack.rollout, &mut topology);
    Ok((topology, pack))
}

fn load_topology_only(snapshot: &Snapshot) -> Result<Topology, RenderError> {
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
    let topology: Topology = parse_typed(TOPOLOGY_FILE, text, 0)?;
    validate_topology(snapshot, &topology, text)?;
    Ok(topology)
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
            crate::policy::check_steps(steps).map_err(|r| {
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
    let mut sources: Vec<(String, String)> = Vec::new();
    if let Some(k) = kustomization_file(snapshot, &root) {
        sources.push((k.clone(), kustomize.build(snapshot, &root, &k)?));
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
            let text = utf8(&file, bytes)?.to_string();
            sources.push((file, text));
        }
    }
    for (file, text) in &sources {
        let text = text.as_str();
        for (doc, offset) in split_documents(file, text)? {
            let value: serde_yaml::Value =
                serde_yaml::from_str(doc).map_err(|e| yaml_error(file, offset, None, &e))?;
            if value.is_null() {
                continue;
            }
            let api_version = value
                .get("apiVersion")
                .and_then(|v| v.as_str())
                .ok_or_else(|| {
                    RenderError::invalid(
                        file,
                        Some("apiVersion"),
                        Some(offset + 1),
                        "missing or not a string",
                    )
                })?;
            let (kind_of_target, mut bodies) = if api_version == API_VERSION {
                let (resource, meta) = parse_host(file, doc, offset)?;
                let r = host_body(snapshot, &root, file, name, &resource, &meta)?;
                (TargetKind::Host, vec![r])
            } else {
                (
                    TargetKind::Kubernetes,
                    vec![kube_body(file, offset, &value)?],
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
                for t in &fitting {
                    out.push(DesiredResource {
                        id: ResourceId {
                            target: t.name.clone(),
                            kind: kind.clone(),
                            namespace: namespace.clone(),
                            name: meta_name.clone(),
                        },
                        service: name.to_string(),
                        file: file.clone(),
                        body: body.clone(),
                        redact: redact.clone(),
                        strategy,
                        max_unavailable: Some(service.rollout.max_unavailable),
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

fn parse_host(
    file: &str,
    doc: &str,
    offset: usize,
) -> Result<(HostResource, Metadata), RenderError> {
    let value: serde_yaml::Value =
        serde_yaml::from_str(doc).map_err(|e| yaml_error(file, offset, None, &e))?;
    let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
    let (resource, metadata) = match kind {
        "Process" => {
            let d: Doc<ProcessSpec> = parse_typed(file, doc, offset)?;
            (HostResource::Process(d.spec), d.metadata)
        }
        "File" => {
            let d: Doc<FileSpec> = parse_typed(file, doc, offset)?;
            (HostResource::File(d.spec), d.metadata)
        }
        "Route" => {
            let d: Doc<RouteSpec> = parse_typed(file, doc, offset)?;
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

fn kube_body(file: &str, offset: usize, value: &serde_yaml::Value) -> Result<Body, RenderError> {
    let body: Value = serde_json::to_value(value)
        .map_err(|e| RenderError::invalid(file, None, Some(offset + 1), scrub(&e.to_string())))?;
    let api_version = body["apiVersion"].as_str().unwrap_or_default();
    let kind = body["kind"].as_str().ok_or_else(|| {
        RenderError::invalid(
            file,
            Some("kind"),
            Some(offset + 1),
            "missing or not a string",
        )
    })?;
    let name = body["metadata"]["name"].as_str().ok_or_else(|| {
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

fn utf8<'a>(file: &str, bytes: &'a [u8]) -> Result<&'a str, RenderError> {
    std::str::from_utf8(bytes).map_err(|e| {
        RenderError::invalid(
            file,
            None,
            None,
            format!("not UTF-8 text (byte {})", e.valid_up_to()),
        )
    })
}

/// Splits a multi-document YAML file at `---` lines, keeping each
/// document's line offset so errors point at the right line of the file.
fn split_documents<'a>(file: &str, text: &'a str) -> Result<Vec<(&'a str, usize)>, RenderError> {
    let mut docs = Vec::new();
    let mut start = 0;
    let mut start_line = 0;
    let mut pos = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let trimmed = line.trim_end();
        if trimmed == "---" || trimmed.starts_with("--- ") || trimmed == "..." {
            docs.push((&text[start..pos], start_line));
            start = pos + line.len();
            start_line = i + 1;
        }
        pos += line.len();
    }
    docs.push((&text[start..], start_line));
    docs.retain(|(d, _)| !d.trim().is_empty());
    if docs.len() > MAX_DOCUMENTS_PER_FILE {
        return Err(RenderError::invalid(
            file,
            None,
            None,
            format!("more than {MAX_DOCUMENTS_PER_FILE} documents"),
        ));
    }
    Ok(docs)
}

/// Deserialises `text` strictly into `T`, reporting the field path and line.
fn parse_typed<T: DeserializeOwned>(
    file: &str,
    text: &str,
    offset: usize,
) -> Result<T, RenderError> {
    let de = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let field = (path != ".").then_some(path);
        yaml_error(file, offset, field, e.inner())
    })
}

fn yaml_error(
    file: &str,
    offset: usize,
    field: Option<String>,
    e: &serde_yaml::Error,
) -> RenderError {
    let message = e.to_string();
    let reason = match message.rsplit_once(" at line ") {
        Some((head, _)) => head.to_string(),
        None => message,
    };
    let reason = reason
        .split_once(": ")
        .filter(|(head, _)| {
            field.as_deref().is_some_and(|f| f.starts_with(head.trim())) && !head.contains(' ')
        })
        .map(|(_, tail)| tail.to_string())
        .unwrap_or(reason);
    RenderError::Invalid {
        file: file.to_string(),
        line: e.location().map(|l| l.line() + offset),
        field,
        reason: scrub(&reason),
    }
}

/// Removes quoted values from a parser message ("invalid type: string
/// \"hunter2\", expected …"): a manifest value may be a secret.
fn scrub(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(i) = rest.find(" \"") {
        let (head, tail) = rest.split_at(i);
        out.push_str(head);
        match tail[2..].find('"') {
            Some(j) => {
                out.push_str(" \"…\"");
                rest = &tail[2 + j + 1..];
            }
            None => {
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// Best-effort line of a nested key: the first line holding `keys[0]`, then
/// from there the first holding `keys[1]`, and so on. 1-based.
pub(crate) fn find_line(text: &str, keys: &[&str]) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let mut at = 0;
    let mut found = None;
    for key in keys {
        let i = lines[at..].iter().position(|l| {
            let l = l.trim_start().trim_start_matches("- ");
            l.starts_with(&format!("{key}:"))
                || l.contains(&format!(" {key}"))
                || l == *key
                || l.contains(&format!("[{key}"))
                || l.contains(&format!("{key}]"))
                || l.contains(&format!("name: {key}"))
        })?;
        at += i;
        found = Some(at + 1);
    }
    found
}

fn join(names: &BTreeSet<&str>) -> String {
    names.iter().copied().collect::<Vec<_>>().join(", ")
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
        assert!(e.contains("api/p.yaml") && e.contains("recursion"), "{e}");
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
        let e = err(&[
            ("sluice.yaml", &TOPO.replace("path: api", "path: ../api")),
            ("api/p.yaml", PROC),
        ]);
        assert!(e.contains("services.api.path"), "{e}");
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
