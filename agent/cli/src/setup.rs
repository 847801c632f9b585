//! Wiring: the engine over real parts, from the command-line flags.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::Digest as _;
use sluice_core::clock::SystemClock;
use sluice_core::engine::Engine;
use sluice_core::model::{TargetDef, TargetKind};
use sluice_core::source::Limits;
use sluice_core::store::FileStore;
use sluice_core::target::{Target, TargetError, TargetProvider};
use sluice_git::{Auth, GitConfig, GitSource, Secret};
use sluice_host::{HostConfig, HostTarget};

use crate::Common;

/// A flag or setting that is wrong: exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

pub fn logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json = std::env::var("SLUICE_LOG_FORMAT").is_ok_and(|v| v == "json");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only for a terminal: journald, files and pipes get text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

pub fn state_dir(common: &Common) -> PathBuf {
    if let Some(d) = &common.state_dir {
        return d.clone();
    }
    if nix::unistd::Uid::effective().is_root() {
        return PathBuf::from("/var/lib/sluice");
    }
    if let Some(d) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("sluice");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".local/state/sluice")
}

pub fn store(common: &Common) -> Result<FileStore, ConfigError> {
    let dir = state_dir(common);
    FileStore::open(&dir).map_err(|e| ConfigError(format!("--state-dir: {e}")))
}

/// The git source of `--repo`, keeping its mirror in `cache_dir`.
pub fn source(common: &Common, cache_dir: PathBuf) -> Result<GitSource, ConfigError> {
    let (url, path) = locate(&common.repo, &common.path)?;
    let auth = auth(common, &url)?;
    for f in common
        .known_hosts
        .iter()
        .chain(&common.ssh_config)
        .chain(&common.ca_file)
    {
        if !f.is_file() {
            return Err(ConfigError(format!(
                "{}: no such file (given with --known-hosts, --ssh-config or --ca-file)",
                f.display()
            )));
        }
    }
    GitSource::new(GitConfig {
        url,
        branch: common.branch.clone(),
        path,
        cache_dir,
        auth,
        allow_insecure: common.allow_insecure,
        timeouts: sluice_git::Timeouts {
            connect: common.git_connect_timeout,
            stall: common.git_stall_timeout,
        },
        ssh: sluice_git::SshOptions {
            known_hosts: common.known_hosts.clone(),
            config: common.ssh_config.clone(),
        },
        ca_file: common.ca_file.clone(),
        helper: None,
    })
    .map_err(|e| ConfigError(format!("--repo: {e}")))
}

/// The engine over git, the host target and the file store.
pub fn engine(common: &Common) -> Result<Engine, ConfigError> {
    Ok(engine_and_fleet(common)?.0)
}

/// The engine, and the remote hosts it reaches (for their figures).
pub fn engine_and_fleet(
    common: &Common,
) -> Result<(Engine, Arc<sluice_fleet::Fleet>), ConfigError> {
    let dir = state_dir(common);
    let store = store(common)?;
    let source = source(common, dir.join("git"))?;
    let exe = std::env::current_exe()
        .map_err(|e| ConfigError(format!("locating the sluice binary: {e}")))?;
    if !(common.kube_qps.is_finite() && common.kube_qps > 0.0) || common.kube_burst == 0 {
        return Err(ConfigError(format!(
            "--kube-qps {} --kube-burst {}: both must be above zero",
            common.kube_qps, common.kube_burst
        )));
    }
    let mut contexts = BTreeMap::new();
    for pair in &common.kube_contexts {
        let (target, context) = pair
            .split_once('=')
            .filter(|(t, c)| !t.is_empty() && !c.is_empty())
            .ok_or_else(|| {
                ConfigError(format!(
                    "--kube-context {pair:?}: expected TARGET=CONTEXT, e.g. prod=gke-prod"
                ))
            })?;
        contexts.insert(target.to_string(), context.to_string());
    }
    let mut router_admin = BTreeMap::new();
    for pair in &common.router_admin {
        let parsed = pair
            .split_once('=')
            .and_then(|(t, a)| Some((t, a.parse::<std::net::SocketAddr>().ok()?)))
            .filter(|(t, _)| !t.is_empty());
        let Some((target, addr)) = parsed else {
            return Err(ConfigError(format!(
                "--router-admin {pair:?}: expected TARGET=ADDRESS, e.g. local=127.0.0.1:9901"
            )));
        };
        router_admin.insert(target.to_string(), addr);
    }
    let fleet = Arc::new(sluice_fleet::Fleet::new(
        sluice_fleet::SshOptions {
            config: common.fleet.fleet_ssh_config.clone(),
            identity: common.fleet.fleet_ssh_key.clone(),
            known_hosts: common.fleet.fleet_known_hosts.clone(),
            accept_new_host_keys: common.fleet.fleet_accept_new_host_keys,
            connect_timeout: common.fleet.fleet_connect_timeout,
            read_timeout: common.fleet.fleet_timeout,
            write_timeout: common.fleet.fleet_apply_timeout,
            alive_interval: common.fleet.fleet_alive_interval,
            persist: Duration::from_secs(600),
            control_dir: ssh_control_dir(&dir),
        },
        common
            .fleet
            .fleet_sluice
            .clone()
            .unwrap_or_else(|| exe.clone()),
        common.fleet.fleet_parallel,
        router_admin.clone(),
    ));
    let provider = Provider {
        host: HostProvider {
            fleet: fleet.clone(),
            router_admin,
            state_dir: dir.join("host"),
            file_root: common
                .file_root
                .clone()
                .unwrap_or_else(|| dir.join("files")),
            exe,
            built: Mutex::new(BTreeMap::new()),
        },
        kube: KubeProvider {
            kubeconfig: common.kubeconfig.clone(),
            rate: (common.kube_qps, common.kube_burst),
            contexts,
            built: Mutex::new(BTreeMap::new()),
        },
    };
    let engine = Engine {
        source: Arc::new(source),
        targets: Arc::new(provider),
        store: Arc::new(store),
        clock: Arc::new(SystemClock),
        limits: Limits::default(),
        gate_poll: Duration::from_millis(100),
        gate_factories: Vec::new(),
        metrics: match &common.prometheus_url {
            Some(url) => Some(Arc::new(
                crate::prometheus::Prometheus::new(url)
                    .map_err(|e| ConfigError(format!("--prometheus-url: {e}")))?,
            )),
            None => None,
        },
        forge: common
            .forge
            .connect()?
            .map(|f| Arc::new(f) as Arc<dyn sluice_core::target::PullRequests>),
        kustomize: Arc::new(sluice_kube::kustomize::Kubectl),
    };
    Ok((engine, fleet))
}

/// A local path inside a git work tree becomes (work tree root, folder):
/// `--repo examples/host-shop` just works from a checkout of sluice.
fn locate(repo: &str, path: &str) -> Result<(String, String), ConfigError> {
    // URLs, scp-like addresses and transport forms (`ext::`, refused by
    // the source with a clear reason) are not local paths.
    let is_url = repo.contains("://")
        || repo.contains("::")
        || repo.starts_with('-')
        || (repo.contains('@') && repo.contains(':'))
        || is_ssh(repo);
    if is_url {
        return Ok((repo.to_string(), path.to_string()));
    }
    let abs =
        std::fs::canonicalize(repo).map_err(|e| ConfigError(format!("--repo {repo:?}: {e}")))?;
    let mut dir: &Path = &abs;
    loop {
        if dir.join(".git").exists() {
            let sub = abs.strip_prefix(dir).unwrap_or(Path::new(""));
            let mut folder = sub.to_string_lossy().to_string();
            if !path.is_empty() {
                folder = if folder.is_empty() {
                    path.to_string()
                } else {
                    format!("{folder}/{path}")
                };
            }
            return Ok((dir.to_string_lossy().to_string(), folder));
        }
        match dir.parent() {
            Some(p) => dir = p,
            // A bare repository or a plain path: let the source decide.
            None => return Ok((abs.to_string_lossy().to_string(), path.to_string())),
        }
    }
}

/// Whether a repository address is reached over ssh (`ssh://` or the
/// scp form `[user@]host:path`).
fn is_ssh(url: &str) -> bool {
    url.starts_with("ssh://")
        || (!url.contains("://")
            && url
                .split_once(':')
                .is_some_and(|(host, _)| !host.is_empty() && !host.contains('/'))
            && !Path::new(url).exists())
}

/// The credential for `url`, one rule: the URL's scheme decides. https
/// takes a token (`--git-token-file`, else the variable `--git-token-env`
/// names); ssh takes `--ssh-key` (with its passphrase), else the ssh agent
/// and ssh's own default keys. A credential for the other kind of URL is
/// an error when given by flag, and ignored when only an environment
/// variable holds it.
fn auth(common: &Common, url: &str) -> Result<Auth, ConfigError> {
    let ssh = is_ssh(url);
    let https = url.starts_with("https://") || url.starts_with("http://");
    if ssh {
        if common.git_token_file.is_some() {
            return Err(ConfigError(
                "--git-token-file is for https repositories; this one is reached over ssh (use --ssh-key)"
                    .into(),
            ));
        }
        let Some(key) = &common.ssh_key else {
            return Ok(Auth::SshAgent);
        };
        let text = std::fs::read_to_string(key)
            .map_err(|e| ConfigError(format!("--ssh-key {}: {e}", key.display())))?;
        let (passphrase, passphrase_file) = match &common.ssh_key_passphrase_file {
            Some(f) => {
                let p = std::fs::read_to_string(f).map_err(|e| {
                    ConfigError(format!("--ssh-key-passphrase-file {}: {e}", f.display()))
                })?;
                (
                    Some(Secret::new(p.trim_end_matches(['\n', '\r']).to_string())),
                    Some(f.clone()),
                )
            }
            None => (
                std::env::var("SLUICE_SSH_KEY_PASSPHRASE")
                    .ok()
                    .filter(|p| !p.is_empty())
                    .map(Secret::new),
                None,
            ),
        };
        if passphrase.is_none() && key_is_encrypted(&text) {
            return Err(ConfigError(format!(
                "--ssh-key {} is encrypted: give its passphrase with --ssh-key-passphrase-file or SLUICE_SSH_KEY_PASSPHRASE",
                key.display()
            )));
        }
        return Ok(Auth::SshKey {
            private_key: key.clone(),
            passphrase,
            passphrase_file,
        });
    }
    if common.ssh_key.is_some() {
        return Err(ConfigError(
            "--ssh-key is for ssh repositories; this one is not (an https repository takes --git-token-file or --git-token-env)"
                .into(),
        ));
    }
    if !https {
        return Ok(Auth::None);
    }
    if let Some(file) = &common.git_token_file {
        let token = std::fs::read_to_string(file)
            .map_err(|e| ConfigError(format!("--git-token-file {}: {e}", file.display())))?;
        return Ok(Auth::Token {
            token: Secret::new(token.trim().to_string()),
            file: Some(file.clone()),
        });
    }
    match std::env::var(&common.git_token_env) {
        Ok(token) if !token.is_empty() => Ok(Auth::Token {
            token: Secret::new(token),
            file: None,
        }),
        _ => Ok(Auth::None),
    }
}

/// Whether an ssh private key needs a passphrase: an OpenSSH key whose
/// cipher is not "none", or a PEM key marked ENCRYPTED.
fn key_is_encrypted(text: &str) -> bool {
    if text.contains("ENCRYPTED") {
        return true;
    }
    let body: String = text
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<Vec<_>>()
        .concat();
    use base64::Engine as _;
    let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(body.trim()) else {
        return false;
    };
    // "openssh-key-v1\0", then the cipher name as a length-prefixed string.
    let Some(rest) = bytes.strip_prefix(b"openssh-key-v1\0") else {
        return false;
    };
    let Some(len) = rest
        .get(..4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
    else {
        return false;
    };
    rest.get(4..4 + len).is_some_and(|cipher| cipher != b"none")
}

/// Where ssh's control sockets go: under the state folder, unless that
/// path is too long for a Unix socket (108 bytes with ssh's temporary
/// suffix), then a private folder in the temporary directory.
fn ssh_control_dir(state: &Path) -> PathBuf {
    let dir = state.join("ssh");
    if dir.as_os_str().len() <= 60 {
        return dir;
    }
    let tag = hex::encode(&sha2::Sha256::digest(state.as_os_str().as_encoded_bytes())[..6]);
    std::env::temp_dir().join(format!("sluice-ssh-{tag}"))
}

/// Builds host targets on demand, once each: a host target adopts the
/// processes it finds, so it must not be built twice per process.
struct HostProvider {
    /// Remote hosts (a target with `ssh:`).
    fleet: Arc<sluice_fleet::Fleet>,
    /// target → its router's admin address (`--router-admin`).
    router_admin: BTreeMap<String, std::net::SocketAddr>,
    state_dir: PathBuf,
    file_root: PathBuf,
    exe: PathBuf,
    built: Mutex<BTreeMap<String, Arc<dyn Target>>>,
}

impl TargetProvider for HostProvider {
    fn target(&self, def: &TargetDef) -> Result<Arc<dyn Target>, TargetError> {
        let mut built = self.built.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = built.get(&def.name) {
            return Ok(t.clone());
        }
        if let Some(dest) = &def.ssh {
            let target: Arc<dyn Target> = Arc::new(self.fleet.host(&def.name, dest));
            built.insert(def.name.clone(), target.clone());
            return Ok(target);
        }
        let extra_path = self
            .exe
            .parent()
            .map(|p| vec![p.to_path_buf()])
            .unwrap_or_default();
        let target: Arc<dyn Target> = Arc::new(HostTarget::new(HostConfig {
            name: def.name.clone(),
            state_dir: self.state_dir.join(&def.name),
            file_root: self.file_root.join(&def.name),
            exe: self.exe.clone(),
            port_range: 20000..=29999,
            extra_path,
            router_admin: self.router_admin.get(&def.name).copied(),
        })?);
        built.insert(def.name.clone(), target.clone());
        Ok(target)
    }

    fn supports(&self, kind: TargetKind) -> bool {
        kind == TargetKind::Host
    }
}

/// Every target kind this agent drives.
struct Provider {
    host: HostProvider,
    kube: KubeProvider,
}

impl TargetProvider for Provider {
    fn target(&self, def: &TargetDef) -> Result<Arc<dyn Target>, TargetError> {
        match def.kind {
            TargetKind::Host => self.host.target(def),
            TargetKind::Kubernetes => self.kube.target(def),
        }
    }

    fn supports(&self, kind: TargetKind) -> bool {
        self.host.supports(kind) || kind == TargetKind::Kubernetes
    }
}

/// Connects to each Kubernetes target's cluster once, on first use.
struct KubeProvider {
    kubeconfig: Option<PathBuf>,
    /// Requests a second and at once, per cluster.
    rate: (f64, u32),
    /// target → kubeconfig context (`--kube-context`).
    contexts: BTreeMap<String, String>,
    built: Mutex<BTreeMap<String, Arc<dyn Target>>>,
}

impl KubeProvider {
    /// The context for `target`: as mapped, else one named like the
    /// target if the kubeconfig has it, else the current one (or the
    /// in-cluster service account).
    fn context(&self, target: &str) -> Option<String> {
        if let Some(c) = self.contexts.get(target) {
            return Some(c.clone());
        }
        // kube's own lookup ($KUBECONFIG, merged, else ~/.kube/config).
        let kc = match &self.kubeconfig {
            Some(path) => kube::config::Kubeconfig::read_from(path),
            None => kube::config::Kubeconfig::read(),
        }
        .ok()?;
        kc.contexts
            .iter()
            .any(|c| c.name == target)
            .then(|| target.to_string())
    }
}

impl TargetProvider for KubeProvider {
    fn target(&self, def: &TargetDef) -> Result<Arc<dyn Target>, TargetError> {
        let mut built = self.built.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = built.get(&def.name) {
            return Ok(t.clone());
        }
        let context = self.context(&def.name);
        let (qps, burst) = self.rate;
        let connect = async {
            sluice_kube::Cluster::connect(self.kubeconfig.as_deref(), context.as_deref())
                .await?
                .with_rate(qps, burst)
        };
        // Loading a kubeconfig may run credential plugins: async, while
        // providers are called from sync code on the multi-thread runtime.
        let cluster =
            tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(connect))
                .map_err(|e| TargetError::Unavailable {
                    target: def.name.clone(),
                    reason: format!(
                        "connecting (context {}): {e}",
                        context.as_deref().unwrap_or("current")
                    ),
                })?;
        tracing::info!(target = %def.name, server = %cluster.server, context = context.as_deref().unwrap_or("current"), "kubernetes target");
        let target: Arc<dyn Target> = Arc::new(sluice_kube::KubeTarget::new(
            &def.name,
            Arc::new(cluster),
            def.service_account_name.clone(),
        ));
        built.insert(def.name.clone(), target.clone());
        Ok(target)
    }

    fn supports(&self, kind: TargetKind) -> bool {
        kind == TargetKind::Kubernetes
    }
}
