//! Guardrails: the Rego policies every commit must pass before anything is
//! applied. Pure and offline: the input is the rendered documents and their
//! change context, the output is findings; no target, no state.
//!
//! # What runs (conftest's conventions)
//! The shipped pack (`policies/guardrails/` at the top of this repository,
//! compiled into the agent) and the watched repository's `policies/`
//! folder: a `.rego` file at a shipped path replaces that guardrail, any
//! other is added; `*_test.rego` files are left to `opa test`. In each
//! selected package, every `deny`, `violation` and `warn` rule (also with a
//! `_suffix`) is evaluated on its own, partial sets and complete rules
//! alike: an undefined rule contributes nothing and never hides another.
//! Packages are selected as conftest's `--namespace` does (`sluice.yaml`
//! `policies.namespaces`, default `main`, `"*"` for all); the shipped
//! `sluice.guardrails.*` always run. `exception` rules work as in conftest:
//! `exception contains ["run_as_root"]` in a package excepts its
//! `deny_run_as_root` (and `violation_`/`warn_`) for that input, reported as
//! an exception. Packages in `policies.combine` see one input per target
//! holding every document rendered for it (`[{path, contents}]`, conftest's
//! `--combine`), for rules across resources.
//!
//! `input` is one rendered document exactly as conftest would read the
//! manifest; `data` holds the repository's data files (`policies/data/**`
//! `*.yaml`, `*.yml`, `*.json`, placed by folder as OPA's loader places
//! them) and, at `data.sluice`, the change context ([`Input`]). Sensitive
//! values reach policies as `"(redacted)"`, so no message can print them.
//!
//! # Engines
//! Rules are evaluated by regorus's interpreter, except the shipped
//! packages, which run on its compiled virtual machine (the same modules,
//! about ten times faster; tests keep the two in agreement). A package with
//! any repository module in it runs on the interpreter. The compiled pack
//! is cached by the digest of its modules and data across reconciles.
//!
//! # Caveats
//! regorus differs from OPA where the README's "Policies" section says so;
//! the one common idiom it rejects (a body-less set rule iterating an
//! undefined reference, konstraint's `volumes[pod.spec.volumes[_]]`) is
//! rewritten to its OPA meaning before compiling.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use regorus::Value as Rv;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::model::{PolicySettings, TargetKind};
use crate::plan::{Action, Plan};
use crate::render::Rendered;
use crate::source::{PathError, Snapshot};

/// The policy folder of the watched path.
pub const POLICY_DIR: &str = "policies";
/// Data files for policies, below the policy folder.
pub const DATA_DIR: &str = "policies/data";

/// The shipped guardrails: (path, Rego).
pub const SHIPPED: &[(&str, &str)] = &[
    (
        "policies/guardrails/lib.rego",
        include_str!("../../../policies/guardrails/lib.rego"),
    ),
    (
        "policies/guardrails/workload.rego",
        include_str!("../../../policies/guardrails/workload.rego"),
    ),
    (
        "policies/guardrails/images.rego",
        include_str!("../../../policies/guardrails/images.rego"),
    ),
    (
        "policies/guardrails/artifacts.rego",
        include_str!("../../../policies/guardrails/artifacts.rego"),
    ),
    (
        "policies/guardrails/resources.rego",
        include_str!("../../../policies/guardrails/resources.rego"),
    ),
    (
        "policies/guardrails/privileged.rego",
        include_str!("../../../policies/guardrails/privileged.rego"),
    ),
    (
        "policies/guardrails/flags.rego",
        include_str!("../../../policies/guardrails/flags.rego"),
    ),
    (
        "policies/guardrails/migrations.rego",
        include_str!("../../../policies/guardrails/migrations.rego"),
    ),
];

/// Packages that always run, once per document.
const SHIPPED_PREFIX: &str = "sluice.guardrails";
/// Largest policy file read from a repository.
const MAX_POLICY_BYTES: usize = 256 * 1024;
/// Largest total of data files.
const MAX_DATA_BYTES: usize = 8 * 1024 * 1024;
/// Most findings kept (the rest are counted).
const MAX_FINDINGS: usize = 1000;
/// How long one evaluation of one input may run before it is an error.
const EVAL_TIME_LIMIT: Duration = Duration::from_secs(10);
/// Compiled packs kept across reconciles.
const CACHE_SIZE: usize = 4;
/// The package of the module that collects verdicts on the interpreter.
const COLLECTOR: &str = "sluice_guard_collect";

/// Why a commit's policies could not be used. Each is bad input: the
/// commit is not applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuardError {
    /// A policy file is not valid Rego (or too large, or not text).
    #[error("{at}")]
    Compile { at: Box<Located> },
    /// A rule failed while it was evaluated.
    #[error("{at}\n  (evaluating {resource} from {file})")]
    Evaluate {
        at: Box<Located>,
        resource: String,
        file: String,
    },
    /// A rule's value is not something conftest reads as findings.
    #[error("{rule} ({module}): {reason} (evaluating {resource})")]
    Result {
        rule: String,
        module: String,
        reason: String,
        resource: String,
    },
    /// A data file is not valid YAML or JSON, or conflicts with another.
    #[error("{file}: {reason}")]
    Data { file: String, reason: String },
    /// A path leaves the repository.
    #[error("{file}: {source}")]
    Path {
        file: String,
        #[source]
        source: PathError,
    },
}

impl GuardError {
    /// A policy file that cannot be read as a policy at all.
    fn unreadable(file: &str, message: String) -> GuardError {
        GuardError::Compile {
            at: Box::new(Located {
                file: file.to_string(),
                line: None,
                col: None,
                message,
                excerpt: Vec::new(),
            }),
        }
    }
}

/// A place in a policy file and the engine's whole message about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Located {
    pub file: String,
    pub line: Option<u32>,
    pub col: Option<u32>,
    pub message: String,
    /// The source line and the caret under the column, as the engine
    /// printed them.
    pub excerpt: Vec<String>,
}

impl fmt::Display for Located {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
            if let Some(c) = self.col {
                write!(f, ":{c}")?;
            }
        }
        write!(f, ": {}", self.message)?;
        for line in &self.excerpt {
            write!(f, "\n    {line}")?;
        }
        Ok(())
    }
}

impl Located {
    /// Reads a regorus message:
    ///
    /// ```text
    /// --> policies/x.rego:5:25
    ///   |
    /// 5 | volumes[pod.spec.volumes[_]]
    ///   |                         ^
    /// error: item cannot be indexed
    /// ```
    ///
    /// Anything else is kept whole as the message, under `file`.
    fn parse(file: &str, text: &str) -> Located {
        let mut at = Located {
            file: file.to_string(),
            line: None,
            col: None,
            message: String::new(),
            excerpt: Vec::new(),
        };
        let mut message = Vec::new();
        for line in text.lines() {
            let t = line.trim();
            if let Some(loc) = t.strip_prefix("--> ") {
                let mut parts = loc.rsplitn(3, ':');
                let col = parts.next().and_then(|c| c.parse().ok());
                let row = parts.next().and_then(|l| l.parse().ok());
                if let (Some(c), Some(l), Some(path)) = (col, row, parts.next()) {
                    at.file = path.to_string();
                    at.line = Some(l);
                    at.col = Some(c);
                    continue;
                }
            }
            if let Some(m) = t.strip_prefix("error: ") {
                message.push(m.to_string());
            } else if t.contains(" | ") || t.ends_with('|') || t.starts_with("| ") {
                if t != "|" {
                    at.excerpt.push(line.trim_end().to_string());
                }
            } else if !t.is_empty() && !t.starts_with("Stack backtrace") {
                message.push(t.to_string());
            }
        }
        at.message = if message.is_empty() {
            text.trim().to_string()
        } else {
            message.join(" ")
        };
        at
    }
}

/// Where a policy module came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    Shipped,
    Repository,
}

/// One Rego module.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Module {
    pub path: String,
    pub origin: Origin,
    #[serde(skip)]
    pub source: String,
}

/// One data file, already parsed, and where in `data` it goes.
#[derive(Clone, Debug, PartialEq)]
pub struct DataFile {
    pub path: String,
    /// Folders below `policies/data`, as OPA's loader nests them.
    pub at: Vec<String>,
    pub value: Value,
}

/// The effective policy of one commit: the shipped guardrails with the
/// repository's `policies/` over them, its data files, and which packages
/// run how.
#[derive(Clone, Debug)]
pub struct Pack {
    pub modules: Vec<Module>,
    pub data: Vec<DataFile>,
    pub settings: PolicySettings,
    /// `sha256:` of modules, data and settings: the compile cache key.
    pub digest: String,
}

impl Pack {
    /// The shipped guardrails alone.
    pub fn shipped() -> Pack {
        let modules = SHIPPED
            .iter()
            .map(|(path, source)| Module {
                path: path.to_string(),
                origin: Origin::Shipped,
                source: source.to_string(),
            })
            .collect();
        Pack::new(modules, Vec::new(), PolicySettings::default())
    }

    fn new(modules: Vec<Module>, data: Vec<DataFile>, settings: PolicySettings) -> Pack {
        let mut h = Sha256::new();
        for m in &modules {
            h.update(m.path.as_bytes());
            h.update([0, m.origin as u8]);
            h.update(m.source.as_bytes());
            h.update([0]);
        }
        for d in &data {
            h.update(d.path.as_bytes());
            h.update(d.value.to_string().as_bytes());
            h.update([0]);
        }
        h.update(serde_json::to_vec(&settings).unwrap_or_default());
        let digest = format!("sha256:{}", hex::encode(h.finalize()));
        Pack {
            modules,
            data,
            settings,
            digest,
        }
    }

    /// The policies of a commit, compiled (or found in the cache), so that
    /// a broken policy is an error naming its file and line before
    /// anything is planned.
    pub fn load(snapshot: &Snapshot, settings: &PolicySettings) -> Result<Pack, GuardError> {
        let mut modules: Vec<Module> = Pack::shipped().modules;
        let mut data = Vec::new();
        let mut data_bytes = 0usize;
        let files: Vec<String> = snapshot.list(POLICY_DIR).map(|(p, _)| p.clone()).collect();
        for path in files {
            let in_data = path.starts_with(&format!("{DATA_DIR}/"));
            let is_rego = path.ends_with(".rego") && !path.ends_with("_test.rego");
            let is_data = in_data && [".yaml", ".yml", ".json"].iter().any(|e| path.ends_with(e));
            if !(is_rego || is_data) {
                continue;
            }
            let bytes = snapshot
                .read("", &path)
                .map_err(|source| GuardError::Path {
                    file: path.clone(),
                    source,
                })?;
            let text = std::str::from_utf8(bytes)
                .map_err(|_| GuardError::unreadable(&path, "not UTF-8 text".into()))?;
            if is_rego {
                if bytes.len() > MAX_POLICY_BYTES {
                    return Err(GuardError::unreadable(
                        &path,
                        format!("larger than {MAX_POLICY_BYTES} bytes"),
                    ));
                }
                let module = Module {
                    path: path.clone(),
                    origin: Origin::Repository,
                    source: text.to_string(),
                };
                match modules.iter_mut().find(|m| m.path == path) {
                    Some(m) => *m = module,
                    None => modules.push(module),
                }
            } else {
                data_bytes += bytes.len();
                if data_bytes > MAX_DATA_BYTES {
                    return Err(GuardError::Data {
                        file: path,
                        reason: format!("data files add up to more than {MAX_DATA_BYTES} bytes"),
                    });
                }
                data.push(read_data(&path, text)?);
            }
        }
        let pack = Pack::new(modules, data, settings.clone());
        pack.compile()?;
        Ok(pack)
    }

    /// The compiled pack, from the cache when this digest was compiled
    /// before. Idempotent.
    pub fn compile(&self) -> Result<Arc<Compiled>, GuardError> {
        static CACHE: Mutex<Vec<Arc<Compiled>>> = Mutex::new(Vec::new());
        {
            let cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(c) = cache.iter().find(|c| c.digest == self.digest) {
                return Ok(c.clone());
            }
        }
        let compiled = Arc::new(Compiled::new(self)?);
        let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
        cache.retain(|c| c.digest != compiled.digest);
        cache.push(compiled.clone());
        if cache.len() > CACHE_SIZE {
            cache.remove(0);
        }
        Ok(compiled)
    }
}

/// Parses one data file; its folders below `policies/data` nest it in
/// `data` (`policies/data/teams/owners.yaml` holding `{owners: …}` is
/// `data.teams.owners`), as OPA's loader does.
fn read_data(path: &str, text: &str) -> Result<DataFile, GuardError> {
    let err = |reason: String| GuardError::Data {
        file: path.to_string(),
        reason,
    };
    let value: Value = if path.ends_with(".json") {
        serde_json::from_str(text).map_err(|e| err(format!("not valid JSON: {e}")))?
    } else {
        let yaml: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| {
            err(format!(
                "not valid YAML: {}",
                crate::yaml::scrub(&e.to_string())
            ))
        })?;
        serde_json::to_value(yaml).map_err(|e| err(format!("not representable as JSON: {e}")))?
    };
    if !(value.is_object() || value.is_null()) {
        return Err(err(
            "must be a mapping at the top (its keys become data.<key>)".into(),
        ));
    }
    let rel = path.strip_prefix(&format!("{DATA_DIR}/")).unwrap_or(path);
    let at: Vec<String> = rel
        .split('/')
        .rev()
        .skip(1)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .map(str::to_string)
        .collect();
    if at.is_empty() && value.get("sluice").is_some() {
        return Err(err(
            "`sluice` at the top of data is reserved for the change context".into(),
        ));
    }
    if at.first().is_some_and(|f| f == "sluice") {
        return Err(err(
            "the folder policies/data/sluice is reserved for the change context".into(),
        ));
    }
    Ok(DataFile {
        path: path.to_string(),
        at,
        value: if value.is_null() { json!({}) } else { value },
    })
}

/// What a rule's value means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Deny,
    Warn,
    Exception,
}

/// Which input a rule sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// One rendered document.
    Document,
    /// Every document of one target (conftest `--combine`).
    Combined,
}

/// One rule to evaluate.
#[derive(Clone, Debug)]
struct Rule {
    package: String,
    name: String,
    kind: Kind,
    mode: Mode,
    /// `data.<package>.<name>`.
    path: String,
    /// The module that first defines it (for messages).
    module: String,
    /// On the virtual machine (shipped packages), at this entry point.
    fast: Option<usize>,
}

/// A pack ready to evaluate: every module compiled once.
pub struct Compiled {
    digest: String,
    rules: Vec<Rule>,
    /// The interpreter over every module, the collector module and the
    /// data files.
    full: regorus::Engine,
    /// The virtual machine over the shipped modules, when they compiled.
    fast: Option<Fast>,
    /// Repository packages with verdict rules that no setting selects.
    pub unselected: Vec<(String, String)>,
    /// The selected namespaces, for notes about the others.
    namespaces: Vec<String>,
    modules: Vec<Module>,
}

struct Fast {
    policy: regorus::CompiledPolicy,
    program: Arc<regorus::rvm::program::Program>,
    /// The data files, as the virtual machine needs them on every input.
    data: Rv,
}

fn engine() -> regorus::Engine {
    let mut e = regorus::Engine::new();
    e.set_policy_length_config(regorus::PolicyLengthConfig {
        // Generated policies have long lines; the file cap above bounds them.
        max_col: NonZeroU32::new(1 << 16).unwrap_or(NonZeroU32::MIN),
        max_file_bytes: NonZeroUsize::new(MAX_POLICY_BYTES + 1).unwrap_or(NonZeroUsize::MIN),
        max_lines: NonZeroUsize::new(100_000).unwrap_or(NonZeroUsize::MIN),
    });
    e.set_execution_timer_config(regorus::utils::limits::ExecutionTimerConfig {
        limit: EVAL_TIME_LIMIT,
        check_interval: NonZeroU32::new(64).unwrap_or(NonZeroU32::MIN),
    });
    e
}

/// Adds a module in Rego v1 (conftest's default since OPA 1.0), else v0
/// (`deny[msg] { … }`), as written; the engine's first complaint is kept.
fn add_module(e: &mut regorus::Engine, path: &str, source: &str) -> Result<(), GuardError> {
    let v1 = e.add_policy(path.to_string(), source.to_string());
    let Err(e1) = v1 else {
        return Ok(());
    };
    e.set_rego_v0(true);
    let v0 = e.add_policy(path.to_string(), source.to_string());
    e.set_rego_v0(false);
    match v0 {
        Ok(_) => Ok(()),
        Err(e0) => {
            // Report the syntax the file looks like it is written in.
            let looks_v0 = !source.contains(" if ") && !source.contains(" contains ");
            let chosen = if looks_v0 { e0 } else { e1 };
            Err(GuardError::Compile {
                at: Box::new(Located::parse(path, &chosen.to_string())),
            })
        }
    }
}

/// What one package declares: where its modules come from, and its
/// verdict and exception rules (name, kind, first module).
#[derive(Default)]
struct Declared {
    origins: BTreeSet<Origin>,
    rules: Vec<(String, Kind, String)>,
}

/// Every package of the compiled modules with the conftest rules it
/// declares, read from the rule heads (a rule is counted once however many
/// bodies it has).
fn declared(e: &mut regorus::Engine, pack: &Pack) -> BTreeMap<String, Declared> {
    use regorus::unstable::{Expr, Rule as AstRule, RuleHead};
    let origin: BTreeMap<&str, Origin> = pack
        .modules
        .iter()
        .map(|m| (m.path.as_str(), m.origin))
        .collect();
    let mut packages: BTreeMap<String, Declared> = BTreeMap::new();
    for module in e.get_modules().iter() {
        let file = module.package.span.source.get_path().to_string();
        let entry = packages
            .entry(module.package.refr.span().text().to_string())
            .or_default();
        if let Some(o) = origin.get(file.as_str()) {
            entry.origins.insert(*o);
        }
        for rule in &module.policy {
            let refr = match rule.as_ref() {
                AstRule::Spec { head, .. } => match head {
                    RuleHead::Compr { refr, .. } | RuleHead::Set { refr, .. } => refr,
                    RuleHead::Func { .. } => continue,
                },
                AstRule::Default { refr, .. } => refr,
            };
            if !matches!(refr.as_ref(), Expr::Var { .. }) {
                continue;
            }
            let name = refr.span().text().to_string();
            if let Some(kind) = kind_of(&name) {
                if !entry.rules.iter().any(|(n, _, _)| *n == name) {
                    entry.rules.push((name, kind, file.clone()));
                }
            }
        }
    }
    packages
}

/// konstraint's `volumes[pod.spec.volumes[_]]`: a set rule with no body
/// whose key iterates a reference. OPA leaves it empty when the reference
/// is undefined; regorus raises "item cannot be indexed". The same rule
/// with the iteration in a body means the same in OPA and works in both.
fn rewrite_head_iteration(e: &mut regorus::Engine, source: &str) -> Option<String> {
    use regorus::unstable::{Expr, Rule as AstRule, RuleHead};
    let module = e.get_modules().last()?.clone();
    let mut edits: Vec<(usize, usize, String)> = Vec::new();
    for rule in &module.policy {
        let AstRule::Spec { span, head, bodies } = rule.as_ref() else {
            continue;
        };
        let RuleHead::Set {
            refr,
            key: Some(key),
            ..
        } = head
        else {
            continue;
        };
        if !bodies.is_empty() || !matches!(refr.as_ref(), Expr::Var { .. }) {
            continue;
        }
        let key_text = key.span().text();
        if !key_text.contains('[') {
            continue;
        }
        let name = refr.span().text();
        let replacement = if module.rego_v1 {
            format!("{name} contains __sluice_item if {{ __sluice_item := {key_text} }}")
        } else {
            format!("{name}[__sluice_item] {{ __sluice_item := {key_text} }}")
        };
        edits.push((span.start as usize, span.end as usize, replacement));
    }
    if edits.is_empty() {
        return None;
    }
    let mut out = source.to_string();
    for (start, end, text) in edits.into_iter().rev() {
        if end > out.len()
            || start > end
            || !out.is_char_boundary(start)
            || !out.is_char_boundary(end)
        {
            return None;
        }
        out.replace_range(start..end, &text);
    }
    Some(out)
}

/// conftest's rule names: `deny`, `violation`, `warn`, optionally `_suffix`.
fn kind_of(rule: &str) -> Option<Kind> {
    let is = |prefix: &str| {
        rule == prefix
            || rule.strip_prefix(prefix).is_some_and(|rest| {
                rest.starts_with('_')
                    && rest.len() > 1
                    && rest[1..]
                        .split('_')
                        .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric()))
            })
    };
    if is("deny") || is("violation") {
        Some(Kind::Deny)
    } else if is("warn") {
        Some(Kind::Warn)
    } else if rule == "exception" {
        Some(Kind::Exception)
    } else {
        None
    }
}

/// The name an exception uses for a rule: without its severity prefix.
fn exception_name(rule: &str) -> &str {
    let r = rule.strip_prefix("violation_").unwrap_or(rule);
    let r = r.strip_prefix("deny_").unwrap_or(r);
    r.strip_prefix("warn_").unwrap_or(r)
}

fn mode_of(package: &str, settings: &PolicySettings) -> Option<Mode> {
    if package == SHIPPED_PREFIX || package.starts_with(&format!("{SHIPPED_PREFIX}.")) {
        return Some(Mode::Document);
    }
    let named = |list: &[String]| list.iter().any(|n| n == package);
    let any = |list: &[String]| list.iter().any(|n| n == "*");
    let s = settings;
    if named(&s.combine) || (any(&s.combine) && !named(&s.namespaces)) {
        Some(Mode::Combined)
    } else if named(&s.namespaces) || any(&s.namespaces) {
        Some(Mode::Document)
    } else {
        None
    }
}

impl Compiled {
    fn new(pack: &Pack) -> Result<Compiled, GuardError> {
        Compiled::build(pack, true)
    }

    /// Every rule on the interpreter (to check the two engines agree).
    #[cfg(test)]
    fn new_on_interpreter(pack: &Pack) -> Result<Compiled, GuardError> {
        Compiled::build(pack, false)
    }

    fn build(pack: &Pack, use_fast: bool) -> Result<Compiled, GuardError> {
        let mut full = engine();
        for m in &pack.modules {
            add_module(&mut full, &m.path, &for_regorus(m)?)?;
        }
        let packages = declared(&mut full, pack);
        let mut rules = Vec::new();
        let mut unselected = Vec::new();
        for (package, declared) in &packages {
            if !declared.rules.iter().any(|(_, k, _)| *k != Kind::Exception) {
                continue;
            }
            let from_repository = declared.origins.contains(&Origin::Repository);
            let Some(mode) = mode_of(package, &pack.settings) else {
                if from_repository {
                    let file = declared.rules[0].2.clone();
                    unselected.push((file, package.clone()));
                }
                continue;
            };
            for (name, kind, module) in &declared.rules {
                rules.push(Rule {
                    package: package.clone(),
                    name: name.clone(),
                    kind: *kind,
                    mode,
                    path: format!("data.{package}.{name}"),
                    module: module.clone(),
                    fast: (!from_repository).then_some(0),
                });
            }
        }
        for d in &pack.data {
            let mut value = d.value.clone();
            for folder in d.at.iter().rev() {
                value = json!({ folder: value });
            }
            let value = regorus::Value::from(value);
            full.add_data(value).map_err(|e| GuardError::Data {
                file: d.path.clone(),
                reason: format!("conflicts with another data file: {e}"),
            })?;
        }
        let fast = if use_fast {
            Fast::new(pack, &mut rules, &full)
        } else {
            rules.iter_mut().for_each(|r| r.fast = None);
            None
        };
        // The collector: one interpreter rule per input gathers every
        // verdict of the interpreter's rules, each under its own index, so
        // an undefined one is simply absent.
        let mut collector = format!("package {COLLECTOR}\n\n");
        for (i, r) in rules.iter().enumerate().filter(|(_, r)| r.fast.is_none()) {
            let set = match r.mode {
                Mode::Document => "document",
                Mode::Combined => "combined",
            };
            collector.push_str(&format!(
                "{set} contains [{i}, v] if {{\n\tv := {} with input as input.doc with data.sluice.context as input.ctx\n}}\n\n",
                r.path
            ));
        }
        collector.push_str(
            "document contains [-1, null] if false\ncombined contains [-1, null] if false\n",
        );
        add_module(&mut full, "(sluice collector)", &collector)?;
        Ok(Compiled {
            digest: pack.digest.clone(),
            rules,
            full,
            fast,
            unselected,
            namespaces: pack.settings.namespaces.clone(),
            modules: pack.modules.clone(),
        })
    }
}

/// The module's source as regorus should compile it: as written, or with
/// [`rewrite_head_iteration`] applied.
fn for_regorus(m: &Module) -> Result<String, GuardError> {
    let mut scratch = engine();
    add_module(&mut scratch, &m.path, &m.source)?;
    Ok(rewrite_head_iteration(&mut scratch, &m.source).unwrap_or_else(|| m.source.clone()))
}

impl Fast {
    /// Compiles the shipped-only rules for the virtual machine; None (all
    /// rules stay on the interpreter) if it cannot.
    fn new(pack: &Pack, rules: &mut [Rule], full: &regorus::Engine) -> Option<Fast> {
        let entries: Vec<usize> = (0..rules.len())
            .filter(|i| rules[*i].fast.is_some())
            .collect();
        if entries.is_empty() {
            return None;
        }
        let mut e = engine();
        for m in pack.modules.iter().filter(|m| m.origin == Origin::Shipped) {
            add_module(&mut e, &m.path, &for_regorus(m).ok()?).ok()?;
        }
        let paths: Vec<String> = entries.iter().map(|i| rules[*i].path.clone()).collect();
        let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
        let first: regorus::Rc<str> = refs[0].into();
        let compiled = e.compile_with_entrypoint(&first);
        let program = compiled.as_ref().ok().and_then(|c| {
            regorus::languages::rego::compiler::Compiler::compile_from_policy(c, &refs).ok()
        });
        let (Ok(policy), Some(program)) = (compiled, program) else {
            tracing::debug!("shipped guardrails stay on the interpreter: not compilable");
            for i in entries {
                rules[i].fast = None;
            }
            return None;
        };
        for (n, i) in entries.iter().enumerate() {
            rules[*i].fast = Some(n);
        }
        Some(Fast {
            policy,
            program,
            data: full.get_data(),
        })
    }
}

/// How serious a finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Deny,
    Warn,
    /// A deny or warning that an `exception` rule excepted.
    Exception,
}

/// One message of one rule about one input.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    pub level: Level,
    /// The resource (`target/kind/name`), the document (`flags.yaml`), or
    /// the target of a combined input (`target (combined)`).
    pub resource: String,
    /// The manifest file it came from.
    pub file: String,
    /// `data.<package>.<rule>`.
    pub rule: String,
    pub message: String,
    /// The other fields of an object message (`{"msg": …, "id": …}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
}

impl Finding {
    fn key(&self) -> (Level, &str, &str, &str, &str, String) {
        (
            self.level,
            &self.file,
            &self.resource,
            &self.rule,
            &self.message,
            self.metadata
                .as_ref()
                .map(Value::to_string)
                .unwrap_or_default(),
        )
    }
}

/// Findings sort by level, file, resource, rule and message: a stable
/// order for reports and for removing duplicates.
impl Ord for Finding {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key().cmp(&other.key())
    }
}

impl PartialOrd for Finding {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Finding {
    /// conftest's line: `FAIL - file - resource - rule - message`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} - {} - {} - {} - {}",
            match self.level {
                Level::Deny => "FAIL",
                Level::Warn => "WARN",
                Level::Exception => "EXCEPTION",
            },
            self.file,
            self.resource,
            self.rule,
            self.message
        )
    }
}

/// The guardrails' verdict on one commit.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Report {
    pub findings: Vec<Finding>,
    /// Inputs evaluated (documents, plus one per target in combined mode).
    pub evaluated: usize,
    /// conftest's count: one test per rule and input.
    pub tests: usize,
    /// Tests with no finding and no exception.
    pub passed: usize,
    /// Modules loaded, with where each came from.
    pub modules: Vec<Module>,
    /// Findings beyond the cap, counted only.
    pub dropped: usize,
    /// Things a policy author should know (packages no setting selects).
    pub notes: Vec<String>,
}

impl Report {
    pub fn denies(&self) -> impl Iterator<Item = &Finding> {
        self.findings.iter().filter(|f| f.level == Level::Deny)
    }

    pub fn warnings(&self) -> impl Iterator<Item = &Finding> {
        self.findings.iter().filter(|f| f.level == Level::Warn)
    }

    pub fn exceptions(&self) -> impl Iterator<Item = &Finding> {
        self.findings.iter().filter(|f| f.level == Level::Exception)
    }

    pub fn is_denied(&self) -> bool {
        self.denies().next().is_some()
    }

    /// conftest's closing line: "12 tests, 9 passed, 1 warning, 1 failure,
    /// 1 exception".
    pub fn summary(&self) -> String {
        let n = |count: usize, word: &str| {
            format!("{count} {word}{}", if count == 1 { "" } else { "s" })
        };
        format!(
            "{}, {} passed, {}, {}, {}",
            n(self.tests, "test"),
            self.passed,
            n(self.warnings().count(), "warning"),
            n(self.denies().count(), "failure"),
            n(self.exceptions().count(), "exception"),
        )
    }
}

/// One input: a document (or a target's combined documents) and its
/// change context.
#[derive(Clone, Debug)]
pub struct Document<'a> {
    /// What findings name: `target/kind/name`, `flags.yaml`, or
    /// `target (combined)`.
    pub resource: String,
    pub file: &'a str,
    /// The document as conftest would read it, sensitive values redacted.
    pub body: std::borrow::Cow<'a, Value>,
    /// What `data.sluice.context` says while it is evaluated.
    pub context: Context<'a>,
}

/// The change context of one input (see [`Input`] for its fields in Rego).
#[derive(Clone, Debug, PartialEq)]
pub enum Context<'a> {
    /// A rendered resource.
    Resource {
        service: &'a str,
        target: &'a str,
        target_kind: TargetKind,
        ring: u32,
        action: Action,
        /// Index into the plan's waves; None when unchanged.
        wave: Option<usize>,
    },
    /// The `flags.yaml` document.
    Flags,
    /// Every document of one target.
    Combined {
        target: &'a str,
        target_kind: TargetKind,
        ring: u32,
    },
}

/// The typed input of the guard stage: every rendered document with its
/// change context, and the plan.
///
/// `data.sluice.context` (per document): `commit`, `service`, `target`,
/// `targetKind`, `ring`, `file`, `action` (create, update, unchanged),
/// `dependents` (services whose `dependsOn` names this one) and `wave`
/// (`index`, `level`, `ring`, `services`; null for an unchanged resource).
/// For the flags document: `commit` and `file`. For a combined input
/// (every document of one target, `[{path, contents}]`): `commit`,
/// `target`, `targetKind`, `ring` and `combined: true`.
/// `data.sluice.plan.waves[i]` is every wave with its `resources` (target,
/// service, kind, namespace, name, action, labels).
#[derive(Clone, Debug)]
pub struct Input<'a> {
    pub documents: Vec<Document<'a>>,
    /// `data.sluice.plan`, built once as the engines hold it: its strings
    /// (targets, services, kinds, label keys) shared, not copied per
    /// resource.
    plan: Rv,
    pub commit: String,
    /// Each wave without its resources, as `context.wave` shows it.
    waves: Vec<Value>,
    /// Services whose `dependsOn` names each service.
    dependents: BTreeMap<&'a str, Vec<&'a str>>,
    /// Per target: its ring and kind, for combined inputs.
    targets: BTreeMap<&'a str, (u32, TargetKind)>,
}

impl<'a> Input<'a> {
    /// The input for `rendered` as `plan` would roll it out. For a check
    /// with no live state (`sluice policy test`), `plan` is the plan
    /// against an empty system: every resource a create, waves as the
    /// dependency order gives them.
    pub fn new(rendered: &'a Rendered, plan: &Plan) -> Input<'a> {
        let topo = &rendered.topology;
        let mut dependents: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (name, def) in &topo.services {
            for d in &def.depends_on {
                dependents.entry(d.as_str()).or_default().push(name);
            }
        }
        let mut wave_of = BTreeMap::new();
        let mut full = Vec::new();
        let mut waves = Vec::new();
        let mut convert = Converter::default();
        let mut strings: BTreeMap<String, Rv> = BTreeMap::new();
        let mut shared = |s: &str| match strings.get(s) {
            Some(v) => v.clone(),
            None => {
                let v = Rv::from(s);
                strings.insert(s.to_string(), v.clone());
                v
            }
        };
        for w in &plan.waves {
            let mut resources = Vec::with_capacity(w.changes.len());
            for c in &w.changes {
                wave_of.insert(&c.id, (w.index, c.action));
                let want = rendered.desired.resources.get(&c.id);
                let labels = want
                    .map(|r| convert.value(&r.body["metadata"]["labels"]))
                    .unwrap_or(Rv::Null);
                let mut m = BTreeMap::new();
                m.insert(convert.key("target"), shared(&c.id.target));
                m.insert(convert.key("service"), shared(&c.service));
                m.insert(convert.key("kind"), shared(&c.id.kind));
                m.insert(
                    convert.key("namespace"),
                    c.id.namespace
                        .as_deref()
                        .map(&mut shared)
                        .unwrap_or(Rv::Null),
                );
                m.insert(convert.key("name"), Rv::from(c.id.name.as_str()));
                m.insert(convert.key("action"), Rv::from(action_name(c.action)));
                m.insert(convert.key("labels"), labels);
                resources.push(Rv::from(m));
            }
            let summary = json!({
                "index": w.index, "level": w.level, "ring": w.ring, "services": w.services,
            });
            let mut with = convert.value(&summary);
            if let Ok(o) = with.as_object_mut() {
                o.insert(convert.key("resources"), Rv::from(resources));
            }
            full.push(with);
            waves.push(summary);
        }
        let mut plan_rv = BTreeMap::new();
        plan_rv.insert(Rv::from("waves"), Rv::from(full));
        let targets: BTreeMap<&str, (u32, TargetKind)> = topo
            .targets
            .iter()
            .map(|t| (t.name.as_str(), (t.ring, t.kind)))
            .collect();
        let mut documents = Vec::with_capacity(rendered.desired.resources.len() + 1);
        for r in rendered.desired.resources.values() {
            let (ring, target_kind) = targets
                .get(r.id.target.as_str())
                .copied()
                .unwrap_or((0, TargetKind::Host));
            let (wave, action) = match wave_of.get(&r.id) {
                Some((i, a)) => (Some(*i), *a),
                None => (None, Action::Unchanged),
            };
            documents.push(Document {
                resource: r.id.to_string(),
                file: &r.file,
                body: crate::diff::redact_body(&r.body, &r.redact),
                context: Context::Resource {
                    service: &r.service,
                    target: &r.id.target,
                    target_kind,
                    ring,
                    action,
                    wave,
                },
            });
        }
        if let Some(flags) = &rendered.flags {
            documents.push(Document {
                resource: crate::flags::FLAGS_FILE.to_string(),
                file: crate::flags::FLAGS_FILE,
                body: std::borrow::Cow::Owned(serde_json::to_value(flags).unwrap_or(Value::Null)),
                context: Context::Flags,
            });
        }
        Input {
            documents,
            plan: Rv::from(plan_rv),
            commit: rendered.desired.revision.commit.to_string(),
            waves,
            dependents,
            targets,
        }
    }

    /// One input per target holding every document rendered for it, as
    /// conftest's `--combine` builds it (each document its own entry).
    pub fn combined(&self) -> Vec<Document<'a>> {
        let mut by_target: BTreeMap<&'a str, Vec<Value>> = BTreeMap::new();
        for d in &self.documents {
            if let Context::Resource { target, .. } = d.context {
                by_target
                    .entry(target)
                    .or_default()
                    .push(json!({ "path": d.file, "contents": d.body.as_ref() }));
            }
        }
        by_target
            .into_iter()
            .map(|(target, docs)| {
                let (ring, target_kind) = self
                    .targets
                    .get(target)
                    .copied()
                    .unwrap_or((0, TargetKind::Host));
                Document {
                    resource: format!("{target} (combined)"),
                    file: "(combined)",
                    body: std::borrow::Cow::Owned(Value::Array(docs)),
                    context: Context::Combined {
                        target,
                        target_kind,
                        ring,
                    },
                }
            })
            .collect()
    }

    /// `data.sluice.plan`, as policies see it.
    pub fn plan_json(&self) -> Value {
        serde_json::to_value(&self.plan).unwrap_or(Value::Null)
    }

    /// `data.sluice.context` of one document, as policies see it.
    pub fn context_json(&self, doc: &Document) -> Value {
        serde_json::to_value(Contexts::new(self).of(doc)).unwrap_or(Value::Null)
    }
}

/// How the plan names an action (`create`, `update`, ...).
fn action_name(a: Action) -> &'static str {
    match a {
        Action::Create => "create",
        Action::Update => "update",
        Action::Delete => "delete",
        Action::Release => "release",
        Action::Unchanged => "unchanged",
    }
}

/// The parts of every context, converted once per thread: the values
/// shared by many documents (a wave, a service's dependents) are shared.
struct Contexts<'i> {
    commit: Rv,
    waves: Vec<Rv>,
    dependents: BTreeMap<&'i str, Rv>,
    none: Rv,
}

impl<'i> Contexts<'i> {
    fn new(input: &'i Input<'i>) -> Contexts<'i> {
        let rv = |v: &Value| Rv::deserialize(v).unwrap_or(Rv::Undefined);
        Contexts {
            commit: Rv::from(input.commit.as_str()),
            waves: input.waves.iter().map(rv).collect(),
            dependents: input
                .dependents
                .iter()
                .map(|(s, d)| (*s, rv(&json!(d))))
                .collect(),
            none: Rv::from(Vec::<Rv>::new()),
        }
    }

    fn of(&self, doc: &Document) -> Rv {
        let mut m: BTreeMap<Rv, Rv> = BTreeMap::new();
        let mut put = |k: &str, v: Rv| {
            m.insert(Rv::from(k), v);
        };
        put("commit", self.commit.clone());
        let kind = |k: &TargetKind| Rv::from(k.to_string());
        match &doc.context {
            Context::Resource {
                service,
                target,
                target_kind,
                ring,
                action,
                wave,
            } => {
                put("service", Rv::from(*service));
                put("target", Rv::from(*target));
                put("targetKind", kind(target_kind));
                put("ring", Rv::from(*ring));
                put("file", Rv::from(doc.file));
                put("action", Rv::from(action_name(*action)));
                put(
                    "wave",
                    wave.and_then(|w| self.waves.get(w))
                        .cloned()
                        .unwrap_or(Rv::Null),
                );
                put(
                    "dependents",
                    self.dependents
                        .get(service)
                        .cloned()
                        .unwrap_or_else(|| self.none.clone()),
                );
            }
            Context::Flags => put("file", Rv::from(doc.file)),
            Context::Combined {
                target,
                target_kind,
                ring,
            } => {
                put("target", Rv::from(*target));
                put("targetKind", kind(target_kind));
                put("ring", Rv::from(*ring));
                put("combined", Rv::from(true));
            }
        }
        Rv::from(m)
    }
}

/// Evaluates every selected rule of `compiled` over `input`, on as many
/// threads as the machine has cores (at most one per 64 documents).
pub fn evaluate(compiled: &Compiled, input: &Input) -> Result<Report, GuardError> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    evaluate_with(compiled, input, cores)
}

/// [`evaluate`] on at most `threads` threads.
pub fn evaluate_with(
    compiled: &Compiled,
    input: &Input,
    threads: usize,
) -> Result<Report, GuardError> {
    let mut report = Report {
        modules: compiled.modules.clone(),
        notes: compiled
            .unselected
            .iter()
            .map(|(file, package)| {
                format!(
                    "{file}: package {package} is not evaluated (sluice.yaml policies.namespaces is {:?}); add it there, or \"*\" for every package",
                    compiled.namespaces
                )
            })
            .collect(),
        ..Default::default()
    };
    let plan = input.plan.clone();
    let has = |mode: Mode| compiled.rules.iter().any(|r| r.mode == mode);
    let mut outcomes = Vec::new();
    let contexts = Contexts::new(input);
    if has(Mode::Document) {
        outcomes.extend(evaluate_all(
            compiled,
            &input.documents,
            Mode::Document,
            &plan,
            &contexts,
            threads,
        )?);
        report.evaluated += input.documents.len();
    }
    if has(Mode::Combined) {
        let combined = input.combined();
        outcomes.extend(evaluate_all(
            compiled,
            &combined,
            Mode::Combined,
            &plan,
            &contexts,
            threads,
        )?);
        report.evaluated += combined.len();
    }
    for o in outcomes {
        report.tests += o.tests;
        report.passed += o.passed;
        for f in o.findings {
            if report.findings.len() >= MAX_FINDINGS {
                report.dropped += 1;
            } else {
                report.findings.push(f);
            }
        }
    }
    let unique: BTreeSet<Finding> = report.findings.drain(..).collect();
    report.findings = unique.into_iter().collect();
    Ok(report)
}

/// The findings and counts of one input.
struct Outcome {
    findings: Vec<Finding>,
    tests: usize,
    passed: usize,
}

fn evaluate_all(
    compiled: &Compiled,
    docs: &[Document],
    mode: Mode,
    plan: &Rv,
    contexts: &Contexts,
    threads: usize,
) -> Result<Vec<Outcome>, GuardError> {
    let threads = threads.min(docs.len().div_ceil(64)).max(1);
    if threads == 1 {
        let mut w = Worker::new(compiled, plan, mode, contexts);
        return docs.iter().map(|d| w.run(d)).collect();
    }
    let chunk = docs.len().div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = docs
            .chunks(chunk)
            .map(|part| {
                s.spawn(move || {
                    let mut w = Worker::new(compiled, plan, mode, contexts);
                    part.iter().map(|d| w.run(d)).collect::<Result<Vec<_>, _>>()
                })
            })
            .collect();
        let mut all = Vec::with_capacity(docs.len());
        for h in handles {
            match h.join() {
                Ok(r) => all.extend(r?),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        Ok(all)
    })
}

/// JSON to regorus values directly (no serde visitor per node); object
/// keys, which repeat in every document, are built once per thread.
#[derive(Default)]
struct Converter {
    keys: std::collections::HashMap<String, Rv>,
}

impl Converter {
    /// Distinct keys kept; ConfigMap data can have any number of them.
    const MAX_KEYS: usize = 4096;

    fn value(&mut self, v: &Value) -> Rv {
        match v {
            Value::Null => Rv::Null,
            Value::Bool(b) => Rv::from(*b),
            Value::Number(n) => match (n.as_i64(), n.as_u64()) {
                (Some(i), _) => Rv::from(i),
                (None, Some(u)) => Rv::from(u),
                _ => Rv::from(n.as_f64().unwrap_or(0.0)),
            },
            Value::String(s) => Rv::from(s.as_str()),
            Value::Array(items) => {
                Rv::from(items.iter().map(|i| self.value(i)).collect::<Vec<_>>())
            }
            Value::Object(o) => {
                let mut m = BTreeMap::new();
                for (k, v) in o {
                    let key = self.key(k);
                    m.insert(key, self.value(v));
                }
                Rv::from(m)
            }
        }
    }

    fn key(&mut self, k: &str) -> Rv {
        if let Some(v) = self.keys.get(k) {
            return v.clone();
        }
        let v = Rv::from(k);
        if self.keys.len() < Self::MAX_KEYS {
            self.keys.insert(k.to_string(), v.clone());
        }
        v
    }
}

/// One thread's engines.
struct Worker<'c> {
    compiled: &'c Compiled,
    mode: Mode,
    contexts: &'c Contexts<'c>,
    convert: Converter,
    /// The interpreter, with the plan in its data.
    full: Option<regorus::Engine>,
    vm: Option<regorus::rvm::vm::RegoVM>,
    /// `data` for the virtual machine, less the per-input context.
    fast_data: Rv,
    plan: Rv,
}

impl<'c> Worker<'c> {
    fn new(
        compiled: &'c Compiled,
        plan: &Rv,
        mode: Mode,
        contexts: &'c Contexts<'c>,
    ) -> Worker<'c> {
        let on_full = compiled
            .rules
            .iter()
            .any(|r| r.mode == mode && r.fast.is_none());
        let on_fast = compiled
            .rules
            .iter()
            .any(|r| r.mode == mode && r.fast.is_some());
        let full = on_full.then(|| {
            let mut e = compiled.full.clone();
            let mut sluice = BTreeMap::new();
            sluice.insert(Rv::from("plan"), plan.clone());
            let mut top = BTreeMap::new();
            top.insert(Rv::from("sluice"), Rv::from(sluice));
            // Cannot conflict: data files may not use `sluice`.
            let _ = e.add_data(Rv::from(top));
            e
        });
        let (vm, fast_data) = match (&compiled.fast, on_fast) {
            (Some(fast), true) => {
                let mut vm = regorus::rvm::vm::RegoVM::new_with_policy(fast.policy.clone());
                vm.load_program(fast.program.clone());
                vm.set_max_instructions(50_000_000);
                vm.set_execution_timer_config(Some(regorus::utils::limits::ExecutionTimerConfig {
                    limit: EVAL_TIME_LIMIT,
                    check_interval: NonZeroU32::new(64).unwrap_or(NonZeroU32::MIN),
                }));
                (Some(vm), fast.data.clone())
            }
            _ => (None, Rv::Undefined),
        };
        Worker {
            compiled,
            mode,
            contexts,
            convert: Converter::default(),
            full,
            vm,
            fast_data,
            plan: plan.clone(),
        }
    }

    fn run(&mut self, doc: &Document) -> Result<Outcome, GuardError> {
        let body = self.convert.value(doc.body.as_ref());
        let context = self.contexts.of(doc);
        let mut values: BTreeMap<usize, Rv> = BTreeMap::new();
        if let Some(mut vm) = self.vm.take() {
            let mut data = match &self.fast_data {
                Rv::Object(o) => o.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                _ => BTreeMap::new(),
            };
            let mut sluice = BTreeMap::new();
            sluice.insert(Rv::from("plan"), self.plan.clone());
            sluice.insert(Rv::from("context"), context.clone());
            data.insert(Rv::from("sluice"), Rv::from(sluice));
            let ok = vm.set_data(Rv::from(data)).is_ok();
            vm.set_input(body.clone());
            for (i, r) in self.compiled.rules.iter().enumerate() {
                let (Some(entry), true) = (r.fast, r.mode == self.mode) else {
                    continue;
                };
                let value = if ok {
                    vm.execute_entry_point_by_index(entry).ok()
                } else {
                    None
                };
                match value {
                    Some(v) => {
                        values.insert(i, v);
                    }
                    // The interpreter says what went wrong, with the line.
                    None => match self.explain(r, &body, &context, doc) {
                        Ok(v) => {
                            values.insert(i, v);
                        }
                        Err(e) => {
                            self.vm = Some(vm);
                            return Err(e);
                        }
                    },
                }
            }
            self.vm = Some(vm);
        }
        if let Some(full) = &mut self.full {
            let mut wrapper = BTreeMap::new();
            wrapper.insert(Rv::from("doc"), body.clone());
            wrapper.insert(Rv::from("ctx"), context.clone());
            full.set_input(Rv::from(wrapper));
            let set = match self.mode {
                Mode::Document => "document",
                Mode::Combined => "combined",
            };
            let collected = full
                .eval_rule(format!("data.{COLLECTOR}.{set}"))
                .map_err(|e| GuardError::Evaluate {
                    at: Box::new(located(self.compiled, &e.to_string())),
                    resource: doc.resource.clone(),
                    file: doc.file.to_string(),
                })?;
            if let Rv::Set(items) = collected {
                for item in items.iter() {
                    let Ok(pair) = item.as_array() else {
                        continue;
                    };
                    let (Some(i), Some(v)) = (
                        pair.get(0)
                            .and_then(|i| i.as_i64().ok())
                            .and_then(|i| usize::try_from(i).ok()),
                        pair.get(1),
                    ) else {
                        continue;
                    };
                    values.insert(i, v.clone());
                }
            }
        }
        self.outcome(doc, &values)
    }

    /// Evaluates one shipped rule on the interpreter, for its error.
    fn explain(
        &self,
        rule: &Rule,
        body: &Rv,
        context: &Rv,
        doc: &Document,
    ) -> Result<Rv, GuardError> {
        let mut e = self.compiled.full.clone();
        let mut wrapper = BTreeMap::new();
        wrapper.insert(Rv::from("doc"), body.clone());
        wrapper.insert(Rv::from("ctx"), context.clone());
        wrapper.insert(Rv::from("plan"), self.plan.clone());
        e.set_input(Rv::from(wrapper));
        let query = format!(
            "{} with input as input.doc with data.sluice.context as input.ctx with data.sluice.plan as input.plan",
            rule.path
        );
        match e.eval_query(query, false) {
            Ok(r) => Ok(r
                .result
                .into_iter()
                .next()
                .and_then(|r| r.expressions.into_iter().next())
                .map(|e| e.value)
                .unwrap_or(Rv::Undefined)),
            Err(err) => Err(GuardError::Evaluate {
                at: Box::new(located(self.compiled, &err.to_string())),
                resource: doc.resource.clone(),
                file: doc.file.to_string(),
            }),
        }
    }

    fn outcome(&self, doc: &Document, values: &BTreeMap<usize, Rv>) -> Result<Outcome, GuardError> {
        let rules = &self.compiled.rules;
        // Names excepted per package.
        let mut excepted: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
        for (i, v) in values {
            let r = &rules[*i];
            if r.kind == Kind::Exception {
                excepted
                    .entry(r.package.as_str())
                    .or_default()
                    .extend(exception_names(v));
            }
        }
        let mut out = Outcome {
            findings: Vec::new(),
            tests: 0,
            passed: 0,
        };
        for (i, r) in rules.iter().enumerate() {
            if r.mode != self.mode || r.kind == Kind::Exception {
                continue;
            }
            out.tests += 1;
            let short = exception_name(&r.name);
            if excepted
                .get(r.package.as_str())
                .is_some_and(|e| e.contains(short))
            {
                out.findings.push(Finding {
                    level: Level::Exception,
                    resource: doc.resource.clone(),
                    file: doc.file.to_string(),
                    rule: r.path.clone(),
                    message: format!("excepted by data.{}.exception ({short:?})", r.package),
                    metadata: None,
                });
                continue;
            }
            let level = if r.kind == Kind::Warn {
                Level::Warn
            } else {
                Level::Deny
            };
            let found = match values.get(&i) {
                Some(v) => messages(v).map_err(|reason| GuardError::Result {
                    rule: r.path.clone(),
                    module: r.module.clone(),
                    reason,
                    resource: doc.resource.clone(),
                })?,
                None => Vec::new(),
            };
            if found.is_empty() {
                out.passed += 1;
            }
            for (message, metadata) in found {
                out.findings.push(Finding {
                    level,
                    resource: doc.resource.clone(),
                    file: doc.file.to_string(),
                    rule: r.path.clone(),
                    message,
                    metadata,
                });
            }
        }
        Ok(out)
    }
}

/// The policy file and line of an engine error, with the collector's own
/// lines pointing at the rule they call.
fn located(compiled: &Compiled, text: &str) -> Located {
    let at = Located::parse(POLICY_DIR, text);
    if at.file == "(sluice collector)" {
        // An error in the `with` line: the rule it evaluates failed as a
        // whole; name it.
        let rule = at
            .excerpt
            .iter()
            .find_map(|l| l.split(":= ").nth(1))
            .and_then(|l| l.split(" with ").next())
            .unwrap_or_default()
            .to_string();
        let module = compiled
            .rules
            .iter()
            .find(|r| r.path == rule)
            .map(|r| r.module.clone())
            .unwrap_or_else(|| POLICY_DIR.to_string());
        return Located {
            file: module,
            line: None,
            col: None,
            message: format!("{rule}: {}", at.message),
            excerpt: Vec::new(),
        };
    }
    at
}

/// A verdict rule's messages: a set or array of strings or `{msg: …}`
/// objects (conftest), or one such value, or `true`. Unlike conftest,
/// which ignores a value that is not a collection, every defined value
/// other than `false`, `null` and the empty collections is at least one
/// finding: nothing a policy says is dropped.
fn messages(v: &Rv) -> Result<Vec<(String, Option<Value>)>, String> {
    fn one(v: &Rv) -> Result<Option<(String, Option<Value>)>, String> {
        Ok(match v {
            Rv::String(s) => Some((s.to_string(), None)),
            Rv::Object(o) => {
                let msg = o.get(&Rv::from("msg"));
                let Some(Rv::String(m)) = msg else {
                    return Err(
                        "returned an object without a string `msg` (conftest needs {\"msg\": \"...\"})"
                            .into(),
                    );
                };
                let rest: BTreeMap<String, Value> = o
                    .iter()
                    .filter(|(k, _)| **k != Rv::from("msg"))
                    .map(|(k, v)| {
                        (
                            k.as_string()
                                .map(|s| s.to_string())
                                .unwrap_or_else(|_| k.to_string()),
                            serde_json::to_value(v).unwrap_or(Value::Null),
                        )
                    })
                    .collect();
                Some((
                    m.to_string(),
                    (!rest.is_empty()).then(|| serde_json::to_value(rest).unwrap_or(Value::Null)),
                ))
            }
            Rv::Bool(false) | Rv::Null | Rv::Undefined => None,
            Rv::Bool(true) => Some(("denied (the rule is true)".into(), None)),
            other => Some((other.to_string(), None)),
        })
    }
    let mut out = Vec::new();
    match v {
        Rv::Set(items) => {
            for i in items.iter() {
                out.extend(one(i)?);
            }
        }
        Rv::Array(items) => {
            for i in items.iter() {
                out.extend(one(i)?);
            }
        }
        other => out.extend(one(other)?),
    }
    Ok(out)
}

/// Rule names an `exception` value lists: a set of arrays of names
/// (`exception contains ["run_as_root"]`), or of names.
fn exception_names(v: &Rv) -> Vec<String> {
    fn items(v: &Rv) -> Vec<Rv> {
        match v {
            Rv::Set(s) => s.iter().cloned().collect(),
            Rv::Array(a) => a.iter().cloned().collect(),
            other => vec![other.clone()],
        }
    }
    let mut out = Vec::new();
    for outer in items(v) {
        for inner in items(&outer) {
            if let Rv::String(s) = inner {
                out.push(s.to_string());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests;
