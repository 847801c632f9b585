//! `sluice`: the command-line edge. Parses flags, wires the engine to real
//! parts (git, the host target, the state store), and maps outcomes to
//! output and exit codes: 0 done, 1 failed or reverted, 2 bad input.
#![forbid(unsafe_code)]

mod demo;
mod forge;
mod hostexec;
mod output;
mod prometheus;
mod report;
mod run;
mod setup;
mod webhook;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use sluice_core::engine::{ApplyOptions, EngineError, Reconciled};

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "GitOps reconciliation agent: a merged pull request becomes a safe, progressive, automatically reverted deployment",
    after_help = "Exit codes: 0 done, 1 failed or reverted, 2 bad input or configuration."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Flags shared by the commands that read a repository.
#[derive(Args, Clone, Debug)]
pub struct Common {
    /// Repository: a local path, file://, https:// or ssh URL. A local path
    /// inside a git work tree selects the enclosing repository and that
    /// folder. Only committed content is ever applied.
    #[arg(long, env = "SLUICE_REPO", default_value = ".")]
    pub repo: String,
    /// Branch to follow (default: the remote's default branch).
    #[arg(long, env = "SLUICE_BRANCH")]
    pub branch: Option<String>,
    /// Folder inside the repository holding sluice.yaml.
    #[arg(long, env = "SLUICE_PATH", default_value = "")]
    pub path: String,
    /// Where the agent keeps its state (default: /var/lib/sluice as root,
    /// else $XDG_STATE_HOME/sluice or ~/.local/state/sluice).
    #[arg(long, env = "SLUICE_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Root under which host File resources are written (default:
    /// <state-dir>/files/<target>).
    #[arg(long, env = "SLUICE_FILE_ROOT")]
    pub file_root: Option<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Text)]
    pub output: Format,
    /// Environment variable holding an https token for the repository.
    #[arg(long, default_value = "SLUICE_GIT_TOKEN")]
    pub git_token_env: String,
    /// File holding an https token for the repository.
    #[arg(long, env = "SLUICE_GIT_TOKEN_FILE")]
    pub git_token_file: Option<PathBuf>,
    /// SSH private key for ssh repositories (default: the ssh agent, else
    /// ssh's own default keys).
    #[arg(long, env = "SLUICE_SSH_KEY")]
    pub ssh_key: Option<PathBuf>,
    /// File holding the passphrase of an encrypted --ssh-key (or the
    /// variable SLUICE_SSH_KEY_PASSPHRASE).
    #[arg(long, env = "SLUICE_SSH_KEY_PASSPHRASE_FILE")]
    pub ssh_key_passphrase_file: Option<PathBuf>,
    /// known_hosts file(s) that ssh host keys are checked against
    /// (repeatable; default ~/.ssh/known_hosts). /etc/ssh/ssh_known_hosts
    /// is always checked too. Unknown keys are refused.
    #[arg(
        long = "known-hosts",
        env = "SLUICE_KNOWN_HOSTS",
        value_delimiter = ','
    )]
    pub known_hosts: Vec<PathBuf>,
    /// An ssh config file instead of ~/.ssh/config (host aliases, ports).
    #[arg(long, env = "SLUICE_SSH_CONFIG")]
    pub ssh_config: Option<PathBuf>,
    /// Extra CA certificates (PEM) trusted for https repositories.
    #[arg(long, env = "SLUICE_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Connecting to the repository and listing its branch must finish
    /// within this.
    #[arg(long, env = "SLUICE_GIT_CONNECT_TIMEOUT", default_value = "15s", value_parser = parse_duration)]
    pub git_connect_timeout: Duration,
    /// A fetch or push with no progress for this long is stopped.
    #[arg(long, env = "SLUICE_GIT_STALL_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub git_stall_timeout: Duration,
    /// Allow plain http:// and git:// repositories (e.g. a loopback test
    /// server). Off by default, as in Flux.
    #[arg(long, env = "SLUICE_ALLOW_INSECURE")]
    pub allow_insecure: bool,
    /// Canary analysis reads its counters from this Prometheus (which
    /// scrapes each router's admin /metrics), e.g. http://127.0.0.1:9090.
    /// Default: the router's own counters.
    #[arg(long, env = "SLUICE_PROMETHEUS_URL")]
    pub prometheus_url: Option<String>,
    /// Kubeconfig for kubernetes targets (default: $KUBECONFIG,
    /// ~/.kube/config, or the in-cluster service account).
    #[arg(long, env = "SLUICE_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Kubeconfig context of a kubernetes target, as TARGET=CONTEXT
    /// (repeatable, or comma-separated). Default: the context named like
    /// the target if there is one, else the current context.
    #[arg(
        long = "kube-context",
        env = "SLUICE_KUBE_CONTEXT",
        value_delimiter = ','
    )]
    pub kube_contexts: Vec<String>,
    /// The admin address (and /metrics) of a host target's router, as
    /// TARGET=ADDR (repeatable, or comma-separated), e.g.
    /// local=127.0.0.1:9901. Default: the address the router had last,
    /// else a free port chosen once and kept.
    #[arg(
        long = "router-admin",
        env = "SLUICE_ROUTER_ADMIN",
        value_delimiter = ','
    )]
    pub router_admin: Vec<String>,
    /// Requests a second to each Kubernetes cluster, on average (as
    /// client-go's QPS).
    #[arg(long, env = "SLUICE_KUBE_QPS", default_value_t = sluice_kube::client::DEFAULT_QPS)]
    pub kube_qps: f64,
    /// Requests to each Kubernetes cluster at once, after a pause (as
    /// client-go's Burst).
    #[arg(long, env = "SLUICE_KUBE_BURST", default_value_t = sluice_kube::client::DEFAULT_BURST)]
    pub kube_burst: u32,
    #[command(flatten)]
    pub fleet: FleetArgs,
    #[command(flatten)]
    pub forge: ForgeArgs,
}

/// How host targets with an `ssh:` destination (and host groups) are
/// reached: the system OpenSSH client, its config and known_hosts.
#[derive(Args, Clone, Debug)]
pub struct FleetArgs {
    /// An ssh config file instead of ~/.ssh/config (ssh -F).
    #[arg(long, env = "SLUICE_FLEET_SSH_CONFIG")]
    pub fleet_ssh_config: Option<PathBuf>,
    /// The private key to use, and only it (ssh -i, IdentitiesOnly).
    /// Default: the ssh config's and the ssh agent's keys.
    #[arg(long, env = "SLUICE_FLEET_SSH_KEY")]
    pub fleet_ssh_key: Option<PathBuf>,
    /// The known_hosts file host keys are checked against (default:
    /// ~/.ssh/known_hosts, or what the ssh config says).
    #[arg(long, env = "SLUICE_FLEET_KNOWN_HOSTS")]
    pub fleet_known_hosts: Option<PathBuf>,
    /// Trust a host's key on first connection and record it (ssh's
    /// StrictHostKeyChecking=accept-new). Off: an unknown key fails.
    #[arg(long, env = "SLUICE_FLEET_ACCEPT_NEW_HOST_KEYS")]
    pub fleet_accept_new_host_keys: bool,
    /// Hosts worked on at once (commands in flight across the fleet).
    #[arg(long, env = "SLUICE_FLEET_PARALLEL", default_value_t = 10)]
    pub fleet_parallel: usize,
    /// Connecting to a host (TCP and handshake).
    #[arg(long, env = "SLUICE_FLEET_CONNECT_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub fleet_connect_timeout: Duration,
    /// A read on a host (observe, status); changes get --fleet-apply-timeout.
    #[arg(long, env = "SLUICE_FLEET_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub fleet_timeout: Duration,
    /// A change on a host (apply, stage, install): it may wait for
    /// processes to become ready.
    #[arg(long, env = "SLUICE_FLEET_APPLY_TIMEOUT", default_value = "10m", value_parser = parse_duration)]
    pub fleet_apply_timeout: Duration,
    /// Keepalive interval: a host silent for three is taken as gone.
    #[arg(long, env = "SLUICE_FLEET_ALIVE_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub fleet_alive_interval: Duration,
    /// The sluice binary installed on hosts (default: this one). For hosts
    /// of another platform, or an older libc, e.g. a static musl build.
    #[arg(long, env = "SLUICE_FLEET_SLUICE")]
    pub fleet_sluice: Option<PathBuf>,
}

/// Where reports and revert pull requests go (optional for every command
/// but `report`).
#[derive(Args, Clone, Debug)]
pub struct ForgeArgs {
    #[arg(long, value_enum, env = "SLUICE_FORGE")]
    pub forge: Option<forge::Kind>,
    /// API root (default: https://api.github.com or https://gitlab.com/api/v4).
    #[arg(long, env = "SLUICE_FORGE_API")]
    pub forge_api: Option<String>,
    /// owner/name (GitHub) or the project path or id (GitLab).
    #[arg(long, env = "SLUICE_FORGE_PROJECT")]
    pub project: Option<String>,
    /// File holding the forge token (else SLUICE_FORGE_TOKEN).
    #[arg(long, env = "SLUICE_FORGE_TOKEN_FILE")]
    pub forge_token_file: Option<PathBuf>,
}

impl ForgeArgs {
    /// The forge, or None when none is configured.
    pub fn connect(&self) -> Result<Option<forge::Forge>, setup::ConfigError> {
        let Some(kind) = self.forge else {
            return Ok(None);
        };
        let project = self
            .project
            .as_deref()
            .ok_or_else(|| setup::ConfigError("--project is needed with --forge".into()))?;
        let token = match &self.forge_token_file {
            Some(f) => std::fs::read_to_string(f)
                .map_err(|e| {
                    setup::ConfigError(format!("--forge-token-file {}: {e}", f.display()))
                })?
                .trim()
                .to_string(),
            None => std::env::var("SLUICE_FORGE_TOKEN").unwrap_or_default(),
        };
        if token.is_empty() {
            return Err(setup::ConfigError(
                "a forge token is needed: SLUICE_FORGE_TOKEN or --forge-token-file".into(),
            ));
        }
        let api = self.forge_api.clone().unwrap_or_else(|| match kind {
            forge::Kind::Github => "https://api.github.com".into(),
            forge::Kind::Gitlab => "https://gitlab.com/api/v4".into(),
        });
        forge::Forge::new(kind, &api, project, &token)
            .map(Some)
            .map_err(|e| setup::ConfigError(e.to_string()))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
    Markdown,
}

#[derive(Subcommand)]
enum Command {
    /// Long-running agent: poll (and webhooks), reconcile, serve /healthz,
    /// /readyz, /metrics and /status.
    Run {
        #[command(flatten)]
        common: Common,
        /// Time between polls of the repository.
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        interval: Duration,
        /// Cap of the retry backoff after failures (starts at 100ms, doubles).
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        backoff_max: Duration,
        /// Address of the HTTP server (status, metrics, webhooks).
        #[arg(long, env = "SLUICE_LISTEN", default_value = "127.0.0.1:8181")]
        listen: SocketAddr,
        #[command(flatten)]
        webhooks: run::Webhooks,
        #[command(flatten)]
        drift: run::DriftSchedule,
        #[command(flatten)]
        election: run::Election,
    },
    /// Show what a commit would change in the live system; changes nothing.
    Plan {
        #[command(flatten)]
        common: Common,
        /// Commit, branch or tag to plan (default: the watched branch's head).
        #[arg(long, conflicts_with = "head")]
        rev: Option<String>,
        /// Pull-request report: the base branch (or commit) the head would
        /// merge into. Shows head against live and against base, and the
        /// drift the merge would overwrite.
        #[arg(long)]
        base: Option<String>,
        /// The pull request's head (branch, `refs/pull/N/head`, commit).
        #[arg(long, requires = "base")]
        head: Option<String>,
    },
    /// One reconcile of one commit, then exit (CI, cron, VMs).
    Apply {
        #[command(flatten)]
        common: Common,
        /// Commit, branch or tag to apply (default: the watched branch's head).
        #[arg(long)]
        rev: Option<String>,
        /// Apply a commit that failed before (recorded in the history).
        #[arg(long)]
        retry: bool,
        /// Roll out even outside the sync windows (recorded in the history).
        #[arg(long = "override")]
        window_override: bool,
    },
    /// Per target and service: commit, health, last error, history.
    Status {
        #[command(flatten)]
        common: Common,
    },
    /// Post the pull-request report as one sticky comment (updated in place
    /// on every push) and set the `sluice` commit status on its head.
    Report {
        #[command(flatten)]
        common: Common,
        /// Pull (merge) request number.
        #[arg(long)]
        pr: u64,
        /// Base branch of the pull request.
        #[arg(long)]
        base: String,
        /// Its head: branch, `refs/pull/N/head` or commit.
        #[arg(long)]
        head: String,
    },
    /// The feature-flag inventory of a commit (default: the branch head),
    /// with expired flags marked.
    Flags {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        rev: Option<String>,
    },
    /// Policies of a commit: `sluice policy test` evaluates the guardrails
    /// over everything it renders (exit 1 on any deny).
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// One drift scan: live against the applied commit, per target.
    Drift {
        #[command(flatten)]
        common: Common,
        /// Re-apply drifted resources of services whose policy is `heal`.
        #[arg(long)]
        heal: bool,
        /// Exit 1 when drift is found (for CI and cron).
        #[arg(long)]
        exit_code: bool,
    },
    /// Take down everything sluice created on the targets (processes,
    /// files, routes, the router; Kubernetes objects), in reverse wave
    /// order, recorded in the history. Without --yes, only says what it
    /// would remove.
    Down {
        #[command(flatten)]
        common: Common,
        /// Only these targets (repeatable; default: every target).
        #[arg(long = "target")]
        targets: Vec<String>,
        /// Really remove it.
        #[arg(long)]
        yes: bool,
    },
    /// Put the targets back to the last good commit, or to --to.
    Revert {
        #[command(flatten)]
        common: Common,
        /// Commit to revert to (default: the last good commit per target).
        #[arg(long)]
        to: Option<String>,
    },
    /// The demo HTTP service used by the examples (version, latency, errors,
    /// readiness and crashes set by flags).
    Demo(demo::DemoArgs),
    /// Demo traffic: steady requests through a route, answers per version
    /// printed every second (watch a canary get judged).
    Load(demo::LoadArgs),
    /// Internal: the traffic router, a long-lived process of its own.
    #[command(hide = true)]
    Router {
        /// Admin API address (port 0: any free port, see --addr-file).
        #[arg(long)]
        admin: SocketAddr,
        /// Where to write the admin address actually bound.
        #[arg(long)]
        addr_file: Option<PathBuf>,
        #[arg(long)]
        config: PathBuf,
    },
    /// Internal: one operation of the host target, as an agent sends it to
    /// a remote host over SSH (JSON request on stdin, response on stdout).
    #[command(hide = true, name = "host-exec")]
    HostExec {
        /// The target this host is in sluice.yaml.
        #[arg(long)]
        target: String,
        /// Where this host keeps sluice's state and files (default:
        /// $SLUICE_HOME, else /var/lib/sluice for root, else
        /// ~/.local/share/sluice).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The router's admin address on this host.
        #[arg(long)]
        router_admin: Option<SocketAddr>,
        /// A conversation: a request per line on stdin, an answer per line
        /// on stdout, until stdin closes.
        #[arg(long)]
        serve: bool,
    },
    /// Internal: supervise one process instance (started by the host target).
    #[command(hide = true)]
    Supervise {
        #[arg(long)]
        spec: PathBuf,
        /// Take over the running process the state file records (its
        /// supervisor died) instead of starting one.
        #[arg(long)]
        adopt: bool,
    },
    /// Internal: git's credential helper for the watched repository.
    #[command(hide = true, name = "git-credential")]
    GitCredential {
        #[arg(long)]
        origin: String,
        #[arg(long)]
        token_file: PathBuf,
        action: String,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Render a commit (default: the branch head) and evaluate the policy
    /// pack over it, as a rollout would: denies, warnings, and the rollout
    /// each service gets. Exit 0 clean, 1 on any deny, 2 on bad input.
    Test {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        rev: Option<String>,
    },
}

/// Errors are printed with their messages, never their backtraces, so
/// capturing one is wasted work: with `RUST_BACKTRACE=1` set (as many
/// users have it) every error a library creates, even one it handles
/// itself, would walk the stack. The standard library reads
/// `RUST_LIB_BACKTRACE` once, on the first capture; it is set for that
/// moment only and put back, so no process sluice starts inherits it.
/// Panics keep printing their backtraces: they read `RUST_BACKTRACE`.
fn library_backtraces_off() {
    let previous = std::env::var_os("RUST_LIB_BACKTRACE");
    std::env::set_var("RUST_LIB_BACKTRACE", "0");
    drop(std::backtrace::Backtrace::capture());
    match previous {
        Some(v) => std::env::set_var("RUST_LIB_BACKTRACE", v),
        None => std::env::remove_var("RUST_LIB_BACKTRACE"),
    }
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    sluice_core::model::duration::parse(s)
}

fn main() -> ExitCode {
    library_backtraces_off();
    // ssh runs this binary as its passphrase prompt.
    if sluice_git::credential::askpass(std::io::stdout()) {
        return ExitCode::SUCCESS;
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Supervise { spec, adopt } => sluice_host::supervise::run(&spec, adopt),
        Command::GitCredential {
            origin,
            token_file,
            action,
        } => {
            let stdin = std::io::stdin();
            match sluice_git::credential::answer(
                &origin,
                &token_file,
                &action,
                stdin.lock(),
                std::io::stdout(),
            ) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("sluice git-credential: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Demo(args) => plain_runtime(demo::main(args), 1),
        Command::Load(args) => plain_runtime(demo::load(args), 2),
        Command::Router {
            admin,
            addr_file,
            config,
        } => runtime(|| run::router(admin, addr_file, config)),
        Command::HostExec {
            target,
            dir,
            router_admin,
            serve,
        } => plain_runtime(hostexec::main(target, dir, router_admin, serve), 2),
        Command::Run {
            common,
            interval,
            backoff_max,
            listen,
            webhooks,
            drift,
            election,
        } => runtime(|| {
            run::agent(
                common,
                interval,
                backoff_max,
                listen,
                webhooks,
                drift,
                election,
            )
        }),
        Command::Plan {
            common,
            rev,
            base,
            head,
        } => runtime(|| plan(common, rev, base, head)),
        Command::Apply {
            common,
            rev,
            retry,
            window_override,
        } => runtime(|| {
            apply(
                common,
                rev,
                ApplyOptions {
                    retry,
                    window_override,
                },
            )
        }),
        Command::Status { common } => runtime(|| status(common)),
        Command::Revert { common, to } => runtime(|| revert(common, to)),
        Command::Down {
            common,
            targets,
            yes,
        } => runtime(|| down(common, targets, yes)),
        Command::Report {
            common,
            pr,
            base,
            head,
        } => runtime(|| report(common, pr, base, head)),
        Command::Flags { common, rev } => runtime(|| flags(common, rev)),
        Command::Policy(PolicyCommand::Test { common, rev }) => {
            runtime(|| policy_test(common, rev))
        }
        Command::Drift {
            common,
            heal,
            exit_code,
        } => runtime(|| drift(common, heal, exit_code)),
    }
}

/// Builds the async runtime and reports an error with its causes.
fn runtime<F, Fut>(f: F) -> ExitCode
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<ExitCode, anyhow::Error>>,
{
    setup::logging();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(f()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", output::chain(&e));
            exit_for(&e)
        }
    }
}

/// Runs the demo tools (the demo service, the load generator) on a small
/// runtime of their own; they log nothing through tracing. An error exits
/// with `error_code`.
fn plain_runtime(
    fut: impl std::future::Future<Output = anyhow::Result<ExitCode>>,
    error_code: u8,
) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(fut) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(error_code)
        }
    }
}

/// 2 for bad input or configuration, 1 for anything else.
fn exit_for(e: &anyhow::Error) -> ExitCode {
    let bad = e
        .downcast_ref::<EngineError>()
        .is_some_and(EngineError::is_bad_input)
        || e.downcast_ref::<setup::ConfigError>().is_some();
    ExitCode::from(if bad { 2 } else { 1 })
}

async fn plan(
    common: Common,
    rev: Option<String>,
    base: Option<String>,
    head: Option<String>,
) -> anyhow::Result<ExitCode> {
    let engine = setup::engine(&common)?;
    // Read-only commands poll the source without recording it: the state
    // belongs to whoever holds the apply lock.
    if let Some(base) = base {
        let watched = engine.source.poll().await.map_err(EngineError::from)?;
        let fetch = |r: String| {
            let engine = &engine;
            async move { engine.source.fetch_ref(&r).await.map_err(EngineError::from) }
        };
        let base_name = base.clone();
        let base = fetch(base).await?;
        let head_name = head.clone().or(common.branch.clone());
        let head = match head {
            Some(h) => fetch(h).await?,
            None => watched,
        };
        let mut report = engine.report(&base, &head).await?;
        report.base_name = Some(base_name);
        report.head_name = head_name;
        output::report(common.output, &report);
        return Ok(ExitCode::SUCCESS);
    }
    let revision = revision(&engine, rev.as_deref()).await?;
    let prepared = engine.prepare(&revision).await?;
    output::plan(common.output, &prepared.plan);
    if common.output != Format::Json {
        output::policy_findings(common.output, &prepared.guard);
    }
    Ok(ExitCode::SUCCESS)
}

/// The commit `--rev` names (after a poll, so new branches and tags are
/// known), or the watched branch's head.
async fn revision(
    engine: &sluice_core::engine::Engine,
    rev: Option<&str>,
) -> Result<sluice_core::source::Revision, EngineError> {
    match rev {
        Some(r) => {
            engine.source.poll().await.ok();
            Ok(engine.source.resolve(r).await?)
        }
        None => Ok(engine.source.poll().await?),
    }
}

/// Offline: no target is contacted and no state is read or written. The
/// commit comes from `--repo` through a private mirror (the state dir's,
/// if `--state-dir` is given), so a CI job on a pull request needs nothing
/// else.
async fn policy_test(common: Common, rev: Option<String>) -> anyhow::Result<ExitCode> {
    use sluice_core::source::Source as _;
    let scratch;
    let cache = match &common.state_dir {
        Some(dir) => dir.join("git"),
        None => {
            scratch = tempfile::tempdir()
                .map_err(|e| setup::ConfigError(format!("a scratch folder for the mirror: {e}")))?;
            scratch.path().join("git")
        }
    };
    let source = setup::source(&common, cache)?;
    let revision = match rev {
        Some(r) => {
            source.poll().await.ok();
            source.resolve(&r).await.map_err(EngineError::from)?
        }
        None => source.poll().await.map_err(EngineError::from)?,
    };
    let snapshot = source
        .snapshot(&revision.commit, &sluice_core::source::Limits::default())
        .await
        .map_err(EngineError::from)?;
    let checked = tokio::task::spawn_blocking(move || {
        sluice_core::engine::check(&snapshot, &sluice_kube::kustomize::Kubectl)
    })
    .await??;
    output::policy_test(common.output, &checked);
    Ok(if checked.guard.is_denied() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

async fn apply(
    common: Common,
    rev: Option<String>,
    opts: ApplyOptions,
) -> anyhow::Result<ExitCode> {
    let engine = setup::engine(&common)?;
    let store = setup::store(&common)?;
    let _lock = store.lock().map_err(EngineError::from)?;
    engine.finish_interrupted().await?;
    let revision = match rev {
        Some(r) => {
            // A fetch failure must not stop applying a commit we already have.
            if let Err(e) = engine.poll().await {
                tracing::warn!(error = %e, "poll failed; using the local copy");
            }
            engine.source.resolve(&r).await.map_err(EngineError::from)?
        }
        None => engine.poll().await?,
    };
    let result = engine.apply(revision, opts).await?;
    output::reconciled(common.output, &result);
    Ok(match result {
        Reconciled::Applied { .. } | Reconciled::UpToDate { .. } => ExitCode::SUCCESS,
        Reconciled::Reverted { .. }
        | Reconciled::Rejected { .. }
        | Reconciled::SkippedFailed { .. }
        | Reconciled::Waiting { .. } => ExitCode::from(1),
    })
}

async fn status(common: Common) -> anyhow::Result<ExitCode> {
    let engine = setup::engine(&common)?;
    let status = engine.status().await?;
    output::status(common.output, &status);
    Ok(ExitCode::SUCCESS)
}

async fn revert(common: Common, to: Option<String>) -> anyhow::Result<ExitCode> {
    let engine = setup::engine(&common)?;
    let store = setup::store(&common)?;
    let _lock = store.lock().map_err(EngineError::from)?;
    let to = match to {
        Some(r) => Some(
            engine
                .source
                .resolve(&r)
                .await
                .map_err(EngineError::from)?
                .commit,
        ),
        None => None,
    };
    if engine
        .store
        .load()
        .map_err(EngineError::from)?
        .targets
        .is_empty()
    {
        return Err(setup::ConfigError(
            "nothing has been applied from this state dir yet; nothing to revert".into(),
        )
        .into());
    }
    match engine.revert_by_hand(to.as_ref()).await? {
        Some(commit) => {
            output::line(common.output, "reverted", &format!("reverted to {commit}"));
            Ok(ExitCode::SUCCESS)
        }
        None => {
            Err(setup::ConfigError("no last good commit recorded; use --to <commit>".into()).into())
        }
    }
}

async fn down(common: Common, targets: Vec<String>, yes: bool) -> anyhow::Result<ExitCode> {
    let engine = setup::engine(&common)?;
    let store = setup::store(&common)?;
    let _lock = store.lock().map_err(EngineError::from)?;
    let (plan, errors) = engine.down(&targets, !yes).await?;
    output::down(common.output, &plan, &errors, yes);
    Ok(if errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

async fn drift(common: Common, heal: bool, exit_code: bool) -> anyhow::Result<ExitCode> {
    let engine = setup::engine(&common)?;
    // A scan writes the state (and a heal applies): one writer at a time.
    let store = setup::store(&common)?;
    let _lock = store.lock().map_err(EngineError::from)?;
    let reports = engine.drift(heal).await?;
    output::drift(common.output, &reports);
    let drifted = reports.iter().any(|r| r.items.len() > r.healed.len());
    // A heal that could not re-apply is a failure whatever --exit-code says.
    let failed = reports.iter().any(|r| !r.heal_failed.is_empty());
    if failed {
        for (id, why) in reports.iter().flat_map(|r| &r.heal_failed) {
            eprintln!("error: {id} not healed: {why}");
        }
    }
    Ok(if failed || (exit_code && drifted) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

async fn report(common: Common, pr: u64, base: String, head: String) -> anyhow::Result<ExitCode> {
    let forge = common.forge.connect()?.ok_or_else(|| {
        setup::ConfigError("sluice report needs --forge github|gitlab and --project".into())
    })?;
    let engine = setup::engine(&common)?;
    if let Err(e) = engine.source.poll().await {
        tracing::warn!(error = %e, "poll failed; using the local copy");
    }
    let id = forge::post_report(&engine, &forge, pr, &base, &head).await?;
    output::line(
        common.output,
        "posted",
        &format!("report posted on #{pr} (comment {id})"),
    );
    Ok(ExitCode::SUCCESS)
}

async fn flags(common: Common, rev: Option<String>) -> anyhow::Result<ExitCode> {
    let engine = setup::engine(&common)?;
    let revision = revision(&engine, rev.as_deref()).await?;
    let commit = revision.commit.to_string();
    let snapshot = engine
        .source
        .snapshot(&revision.commit, &engine.limits)
        .await
        .map_err(EngineError::from)?;
    let render_err = |source| EngineError::Render {
        commit: commit.clone(),
        source,
    };
    let topology = sluice_core::topology::load(&snapshot).map_err(render_err)?;
    let flags = sluice_core::render::load_flags(&snapshot, &topology).map_err(render_err)?;
    output::flags(
        common.output,
        flags.as_ref(),
        chrono::Utc::now().date_naive(),
    );
    Ok(ExitCode::SUCCESS)
}
