//! `sluice run` (the long-running agent) and `sluice router`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use sluice_core::clock::Backoff;
use sluice_core::engine::{ApplyOptions, Engine, EngineError, Reconciled};
use tokio::sync::Notify;
use tracing::{debug, error, info, warn};

use crate::webhook::{self, Provider};
use crate::{output, setup, Common};

/// `sluice router`: serves until SIGTERM/SIGINT.
pub async fn router(
    admin: SocketAddr,
    addr_file: Option<PathBuf>,
    config: PathBuf,
) -> anyhow::Result<ExitCode> {
    // Port 0 means "any": the one this router had before if it is free
    // (a restart keeps its address, so scrapes keep working), else any.
    let previous = addr_file
        .as_ref()
        .filter(|_| admin.port() == 0)
        .and_then(|f| std::fs::read_to_string(f).ok())
        .and_then(|t| t.trim().parse::<SocketAddr>().ok());
    let listener = match previous {
        Some(prev) => match tokio::net::TcpListener::bind(prev).await {
            Ok(l) => l,
            Err(_) => tokio::net::TcpListener::bind(admin).await?,
        },
        None => tokio::net::TcpListener::bind(admin).await?,
    };
    if let Some(f) = addr_file {
        let bound = listener.local_addr()?.to_string();
        sluice_core::store::write_file_atomic(&f, bound.as_bytes(), None)?;
    }
    sluice_router::serve(listener, config, shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Counters for /metrics; the DORA figures come from the history.
#[derive(Default)]
pub struct Metrics {
    reconciles: AtomicU64,
    reconcile_errors: AtomicU64,
    poll_errors: AtomicU64,
    rollouts: AtomicU64,
    reverts: AtomicU64,
    /// How long reconcile passes took, as a Prometheus histogram.
    reconcile_seconds: Histogram,
}

/// Upper bounds (seconds) of the reconcile-duration histogram, and of the
/// lead-time one (commit to live).
const RECONCILE_BUCKETS: [f64; 10] = [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];
const LEAD_TIME_BUCKETS: [f64; 9] = [
    60.0, 300.0, 900.0, 1800.0, 3600.0, 10800.0, 21600.0, 86400.0, 604800.0,
];

/// A cumulative histogram with fixed bounds, lock-free.
#[derive(Default)]
struct Histogram {
    /// Per bound of RECONCILE_BUCKETS, then +Inf.
    counts: [AtomicU64; 11],
    sum_micros: AtomicU64,
}

impl Histogram {
    fn observe(&self, seconds: f64) {
        let i = RECONCILE_BUCKETS
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(RECONCILE_BUCKETS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }
}

/// Writes a histogram in the exposition format: cumulative buckets, sum,
/// count.
fn write_histogram(
    out: &mut String,
    name: &str,
    help: &str,
    bounds: &[f64],
    counts: &[u64],
    sum: f64,
) {
    use std::fmt::Write as _;
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    let mut seen = 0;
    for (b, c) in bounds.iter().zip(counts) {
        seen += c;
        let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {seen}");
    }
    let total: u64 = counts.iter().sum();
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {total}");
    let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {total}");
}

struct Shared {
    engine: Arc<Engine>,
    /// The remote hosts, for their SSH figures in /metrics.
    fleet: Arc<sluice_fleet::Fleet>,
    /// The branch webhooks must name to wake the loop (None: the branch
    /// the source follows, the remote's default).
    branch: Option<String>,
    /// The repository webhooks must name (`--repo`; a local path made
    /// absolute).
    repo: String,
    /// Shared secrets of the webhook providers; a provider without one is
    /// refused.
    github_secret: Option<Vec<u8>>,
    gitlab_token: Option<Vec<u8>>,
    /// Where pull-request reports go (None: reports are not posted).
    forge: Option<Arc<crate::forge::Forge>>,
    store: sluice_core::store::FileStore,
    metrics: Metrics,
    /// Woken by webhooks (and tests) to reconcile without waiting.
    wake: Notify,
    /// Set after the first reconcile attempt finished: /readyz.
    ready: std::sync::atomic::AtomicBool,
    /// The services' health as last observed for /metrics, and when:
    /// scrapes within [`HEALTH_TTL`] reuse it instead of observing every
    /// target again.
    health: tokio::sync::Mutex<Option<(std::time::Instant, ServiceHealth)>>,
}

/// (target, service) → worst health of its resources, and whether it runs
/// the applied commit as it is.
type ServiceHealth =
    std::collections::BTreeMap<(String, String), (sluice_core::resource::Health, bool)>;

/// How long one observation of the targets serves /metrics scrapes.
const HEALTH_TTL: Duration = Duration::from_secs(10);

impl Shared {
    /// Per service: its worst resource health and whether it is synced
    /// (no drift listed for its resources, no rollout of it under way).
    async fn service_health(&self) -> ServiceHealth {
        let mut cache = self.health.lock().await;
        if let Some((at, h)) = cache.as_ref() {
            if at.elapsed() < HEALTH_TTL {
                return h.clone();
            }
        }
        let mut out = ServiceHealth::new();
        if let Ok(st) = self.engine.status().await {
            let drifted: std::collections::BTreeSet<String> = st
                .state
                .drift
                .iter()
                .flat_map(|d| d.items.values().flatten())
                .filter_map(|line| line.split_whitespace().nth(1).map(str::to_string))
                .collect();
            let busy: Vec<String> = st
                .state
                .in_progress
                .iter()
                .flat_map(|p| p.targets.clone())
                .collect();
            for (target, list) in &st.resources {
                for r in list {
                    let e = out
                        .entry((target.clone(), r.service.clone()))
                        .or_insert((r.health, true));
                    e.0 = e.0.max(r.health);
                    if drifted.contains(&r.id.to_string()) || busy.contains(target) {
                        e.1 = false;
                    }
                }
            }
        }
        *cache = Some((std::time::Instant::now(), out.clone()));
        out
    }
}

/// Where the webhook secrets come from.
#[derive(clap::Args, Clone, Debug)]
pub struct Webhooks {
    /// File holding the GitHub webhook secret (or SLUICE_GITHUB_WEBHOOK_SECRET).
    #[arg(long, env = "SLUICE_GITHUB_WEBHOOK_SECRET_FILE")]
    pub github_secret_file: Option<PathBuf>,
    /// File holding the GitLab webhook token (or SLUICE_GITLAB_WEBHOOK_TOKEN).
    #[arg(long, env = "SLUICE_GITLAB_WEBHOOK_TOKEN_FILE")]
    pub gitlab_token_file: Option<PathBuf>,
}

/// When `sluice run` scans for drift.
#[derive(clap::Args, Clone, Debug)]
pub struct DriftSchedule {
    /// Time between drift scans ("0s" turns them off).
    #[arg(long, env = "SLUICE_DRIFT_INTERVAL", default_value = "5m", value_parser = crate::parse_duration)]
    pub drift_interval: Duration,
    /// A cron schedule for drift scans instead (with seconds, in UTC), e.g.
    /// "0 */10 * * * *".
    #[arg(long, env = "SLUICE_DRIFT_SCHEDULE")]
    pub drift_schedule: Option<String>,
}

impl DriftSchedule {
    /// The delay until the next scan, None when scans are off.
    fn next(&self, schedule: &Option<cron::Schedule>) -> Option<Duration> {
        match schedule {
            Some(s) => s
                .upcoming(chrono::Utc)
                .next()
                .map(|t| (t - chrono::Utc::now()).to_std().unwrap_or_default()),
            None if self.drift_interval.is_zero() => None,
            None => Some(self.drift_interval),
        }
    }
}

fn secret(file: &Option<PathBuf>, env: &str) -> Result<Option<Vec<u8>>, setup::ConfigError> {
    if let Some(f) = file {
        let s = std::fs::read_to_string(f)
            .map_err(|e| setup::ConfigError(format!("{}: {e}", f.display())))?;
        return Ok(Some(s.trim().as_bytes().to_vec()).filter(|s| !s.is_empty()));
    }
    Ok(std::env::var(env)
        .ok()
        .filter(|s| !s.is_empty())
        .map(String::into_bytes))
}

/// Leader election among agent replicas (in-cluster installs).
#[derive(clap::Args, Clone, Debug)]
pub struct Election {
    /// Apply only while holding a coordination.k8s.io Lease, so that of
    /// several replicas exactly one applies at a time.
    #[arg(long, env = "SLUICE_LEADER_ELECT")]
    pub leader_elect: bool,
    /// Kubeconfig context of the cluster holding the Lease (default: the
    /// cluster the agent runs in, when in a pod; else the current
    /// context). Never a target's context unless named here.
    #[arg(long, env = "SLUICE_LEASE_CONTEXT")]
    pub lease_context: Option<String>,
    /// Namespace of the Lease (default: $POD_NAMESPACE, else sluice-system).
    #[arg(long, env = "SLUICE_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,
    #[arg(long, env = "SLUICE_LEASE_NAME", default_value = "sluice-leader")]
    pub lease_name: String,
    /// How long a Lease stays valid without renewal; a follower takes over
    /// after it expires.
    #[arg(long, default_value = "15s", value_parser = crate::parse_duration)]
    pub lease_duration: Duration,
    /// With leader election: the ConfigMap (in the Lease's namespace) that
    /// holds a copy of the agent's state, so a new leader or a replaced pod
    /// keeps the inventory, the last good commit and the history.
    #[arg(long, env = "SLUICE_STATE_CONFIGMAP", default_value = "sluice-state")]
    pub state_configmap: String,
}

/// What leading needs: the Lease to keep, and the copy of the state.
struct Leadership {
    lease: Arc<sluice_kube::Lease>,
    mirror: Arc<sluice_kube::mirror::StateMirror>,
}

impl Election {
    /// Connects and waits for the Lease; None when not electing.
    async fn lead(&self, common: &Common) -> Result<Option<Leadership>, setup::ConfigError> {
        if !self.leader_elect {
            return Ok(None);
        }
        // The Lease lives on the agent's own cluster: in a pod, the one it
        // runs in, whatever kubeconfig the targets use.
        let in_pod = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
        let cluster = match (&self.lease_context, in_pod) {
            (None, true) => sluice_kube::Cluster::in_cluster(),
            (context, _) => {
                sluice_kube::Cluster::connect(common.kubeconfig.as_deref(), context.as_deref())
                    .await
            }
        }
        .and_then(|c| c.with_rate(common.kube_qps, common.kube_burst))
        .map_err(|e| setup::ConfigError(format!("--leader-elect: {e}")))?;
        info!(server = %cluster.server, context = self.lease_context.as_deref().unwrap_or(if in_pod { "in-cluster" } else { "current" }), "leader election cluster");
        let namespace = self
            .lease_namespace
            .clone()
            .or_else(|| {
                std::env::var("POD_NAMESPACE")
                    .ok()
                    .filter(|s| !s.is_empty())
            })
            .unwrap_or_else(|| "sluice-system".into());
        let identity = std::env::var("POD_NAME")
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| {
                let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|h| h.trim().to_string())
                    .unwrap_or_else(|_| "sluice".into());
                format!("{host}-{}", std::process::id())
            });
        let cluster = Arc::new(cluster);
        let mirror = Arc::new(sluice_kube::mirror::StateMirror::new(
            cluster.clone(),
            &namespace,
            &self.state_configmap,
        ));
        let lease = Arc::new(sluice_kube::Lease::new(
            cluster,
            &namespace,
            &self.lease_name,
            &identity,
            self.lease_duration,
        ));
        info!(lease = %self.lease_name, namespace = %namespace, identity = %identity, "waiting for the leader lease");
        lease.acquire().await;
        info!(identity = %identity, "leading: this replica applies");
        // The previous leader's state, before anything is reconciled.
        let dir = setup::state_dir(common);
        if let Err(e) = mirror.restore(&dir).await {
            warn!(error = %e, "restoring the agent's state from the cluster failed; starting from this pod's");
        }
        Ok(Some(Leadership { lease, mirror }))
    }
}

pub async fn agent(
    common: Common,
    interval: Duration,
    backoff_max: Duration,
    listen: SocketAddr,
    hooks: Webhooks,
    drift: DriftSchedule,
    election: Election,
) -> anyhow::Result<ExitCode> {
    let schedule = match &drift.drift_schedule {
        Some(expr) => Some(
            expr.parse::<cron::Schedule>()
                .map_err(|e| setup::ConfigError(format!("--drift-schedule {expr:?}: {e}")))?,
        ),
        None => None,
    };
    let github_secret = secret(&hooks.github_secret_file, "SLUICE_GITHUB_WEBHOOK_SECRET")?;
    let gitlab_token = secret(&hooks.gitlab_token_file, "SLUICE_GITLAB_WEBHOOK_TOKEN")?;
    let (engine, fleet) = setup::engine_and_fleet(&common)?;
    let engine = Arc::new(engine);
    let store = setup::store(&common)?;
    // One agent per state dir; applies (ours, `sluice apply`, `sluice
    // revert`) take turns on the apply lock.
    let _run_lock = store
        .try_lock_named("run.lock")
        .map_err(EngineError::from)?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| setup::ConfigError(format!("--listen {listen}: {e}")))?;
    info!(addr = %listener.local_addr()?, source = %engine.source.describe(), "sluice agent starting");
    let shared = Arc::new(Shared {
        engine,
        fleet,
        branch: common.branch.clone(),
        repo: std::fs::canonicalize(&common.repo)
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| common.repo.clone()),
        github_secret,
        gitlab_token,
        forge: common.forge.connect()?.map(Arc::new),
        store,
        metrics: Metrics::default(),
        wake: Notify::new(),
        ready: false.into(),
        health: tokio::sync::Mutex::new(None),
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(serve(listener, shared.clone(), {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.changed().await;
        }
    }));
    let backoff = Backoff {
        initial: Duration::from_millis(100),
        max: backoff_max,
    };
    // A follower serves probes and metrics but applies nothing until it
    // leads.
    // With leader election every replica is ready at once: a standby
    // serves status and metrics, and a rolling update of the agent's own
    // Deployment must not wait for a Lease only one replica can hold.
    if election.leader_elect {
        shared
            .ready
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
    let leader = tokio::select! {
        lead = election.lead(&common) => lead?,
        _ = shutdown_signal() => {
            let _ = stop_tx.send(true);
            let _ = server.await;
            return Ok(ExitCode::SUCCESS);
        }
    };
    let mirror_task = leader.as_ref().map(|l| {
        let (mirror, dir, stop) = (l.mirror.clone(), setup::state_dir(&common), stop_rx.clone());
        tokio::spawn(async move { mirror.run(&dir, stop).await })
    });
    let drift_task = tokio::spawn(drift_loop(shared.clone(), drift, schedule, stop_rx.clone()));
    let loop_task = tokio::spawn(reconcile_loop(shared.clone(), interval, backoff, stop_rx));
    let lost = async {
        match &leader {
            Some(l) => l.lease.keep().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = shutdown_signal() => {}
        _ = lost => {
            // Another replica may take over from now on: stop at once,
            // mid-rollout or not; the next leader finishes or reverts it.
            tracing::error!("lost the leader lease; exiting so that two replicas never apply at once");
            std::process::exit(1);
        }
    }
    info!("shutting down; supervised processes keep running");
    let _ = stop_tx.send(true);
    let _ = loop_task.await;
    let _ = drift_task.await;
    let _ = server.await;
    if let Some(task) = mirror_task {
        let _ = task.await;
    }
    if let Some(l) = leader {
        l.lease.release().await;
    }
    Ok(ExitCode::SUCCESS)
}

/// Reconciles on every tick, webhook or after a backoff delay. Never
/// sleeps inside a reconcile; the delay comes from the outcome.
async fn reconcile_loop(
    shared: Arc<Shared>,
    interval: Duration,
    backoff: Backoff,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut failures = 0u32;
    loop {
        let started = std::time::Instant::now();
        let result = {
            let store = shared.store.clone();
            let lock = tokio::task::spawn_blocking(move || store.lock()).await;
            match lock {
                Ok(Ok(_held)) => shared.engine.reconcile(ApplyOptions::default()).await,
                Ok(Err(e)) => Err(EngineError::from(e)),
                Err(e) => Err(EngineError::Store(
                    sluice_core::store::StoreError::Corrupt {
                        path: "apply.lock".into(),
                        reason: e.to_string(),
                    },
                )),
            }
        };
        shared.metrics.reconciles.fetch_add(1, Ordering::Relaxed);
        debug!(
            ms = started.elapsed().as_millis() as u64,
            ok = result.is_ok(),
            "reconcile done"
        );
        shared
            .metrics
            .reconcile_seconds
            .observe(started.elapsed().as_secs_f64());
        let delay = match result {
            Ok(r) => {
                failures = 0;
                match &r {
                    Reconciled::Applied { plan, duration } => {
                        shared.metrics.rollouts.fetch_add(1, Ordering::Relaxed);
                        info!(commit = %plan.revision.commit, ms = duration.as_millis() as u64, "applied");
                    }
                    Reconciled::Rejected { plan, error } => {
                        warn!(commit = %plan.revision.commit, %error, "commit rejected before anything was written");
                    }
                    Reconciled::Reverted {
                        plan,
                        error,
                        reverted_to,
                    } => {
                        shared.metrics.rollouts.fetch_add(1, Ordering::Relaxed);
                        shared.metrics.reverts.fetch_add(1, Ordering::Relaxed);
                        let to = reverted_to.as_ref().map_or_else(
                            || "nothing (no good commit yet)".to_string(),
                            |c| c.to_string(),
                        );
                        warn!(commit = %plan.revision.commit, %error, reverted_to = %to, "rollout failed and was reverted");
                    }
                    _ => {}
                }
                interval
            }
            Err(e) => {
                shared
                    .metrics
                    .reconcile_errors
                    .fetch_add(1, Ordering::Relaxed);
                // Any trouble with the remote (down, stalled, a refused
                // credential, an untrusted host) backs off up to
                // --backoff-max, one attempt at a time; a webhook or POST
                // /reconcile still wakes the loop at once.
                let source = matches!(e, EngineError::Source(_));
                let transient = source
                    || matches!(
                        e,
                        EngineError::Target(sluice_core::target::TargetError::Unavailable { .. })
                    );
                if source {
                    shared.metrics.poll_errors.fetch_add(1, Ordering::Relaxed);
                }
                if transient {
                    failures += 1;
                    let d = backoff.delay(failures);
                    warn!(error = %e, retry_in_ms = d.as_millis() as u64, "reconcile failed; live state untouched");
                    d
                } else {
                    error!(error = %e, "reconcile failed; live state untouched until the repository is fixed");
                    interval
                }
            }
        };
        shared.ready.store(true, Ordering::Relaxed);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shared.wake.notified() => {}
            _ = stop.changed() => return,
        }
    }
}

/// Scans for drift on its schedule, healing where a service says `heal`.
/// Takes the apply lock like any change, so it never races a rollout.
async fn drift_loop(
    shared: Arc<Shared>,
    drift: DriftSchedule,
    schedule: Option<cron::Schedule>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let Some(delay) = drift.next(&schedule) else {
            return;
        };
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.changed() => return,
        }
        let store = shared.store.clone();
        let Ok(Ok(_held)) = tokio::task::spawn_blocking(move || store.lock()).await else {
            continue;
        };
        match shared.engine.drift(true).await {
            Ok(reports) => {
                let drifted: usize = reports.iter().map(|r| r.items.len() - r.healed.len()).sum();
                let healed: usize = reports.iter().map(|r| r.healed.len()).sum();
                if drifted + healed > 0 {
                    warn!(drifted, healed, "drift found");
                }
            }
            Err(e) => warn!(error = %e, "drift scan failed"),
        }
    }
}

async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/reconcile", axum::routing::post(wake))
        .route("/webhook/github", axum::routing::post(github))
        .route("/webhook/gitlab", axum::routing::post(gitlab))
        // Caps every body before a handler sees it: oversized → 413.
        .layer(axum::extract::DefaultBodyLimit::max(webhook::MAX_BODY))
        .with_state(shared);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        error!(error = %e, "http server failed");
    }
}

/// Consecutive failed polls before /readyz says the agent cannot do its
/// work (one blip does not flap the probe).
const READY_FAILED_POLLS: u32 = 3;

/// Ready once the first reconcile ran, and while the repository can be
/// polled: after [`READY_FAILED_POLLS`] failed polls in a row it answers
/// 503 with the error, until a poll succeeds.
async fn readyz(State(s): State<Arc<Shared>>) -> Response {
    if !s.ready.load(Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response();
    }
    let store = s.store.clone();
    let state = tokio::task::spawn_blocking(move || {
        use sluice_core::store::StateStore;
        store.load()
    })
    .await;
    if let Ok(Ok(state)) = state {
        let src = &state.source;
        if src.consecutive_failures >= READY_FAILED_POLLS {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "source failing: {} consecutive polls failed; last: {}\n",
                    src.consecutive_failures,
                    src.last_error.as_deref().unwrap_or("unknown")
                ),
            )
                .into_response();
        }
    }
    (StatusCode::OK, "ready\n").into_response()
}

/// Asks the loop to reconcile now. Carries no desired state, so repeating
/// it is harmless.
async fn wake(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    s.wake.notify_one();
    (StatusCode::ACCEPTED, "reconcile requested\n")
}

async fn github(State(s): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let signature = header_str(&headers, "x-hub-signature-256");
    if let Err(e) = webhook::verify_github(s.github_secret.as_deref(), signature, &body) {
        return refuse("github", e, body.len());
    }
    let event = header_str(&headers, "x-github-event").unwrap_or("");
    on_event(&s, "github", webhook::parse(Provider::GitHub, event, &body))
}

async fn gitlab(State(s): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let token = header_str(&headers, "x-gitlab-token");
    if let Err(e) = webhook::verify_gitlab(s.gitlab_token.as_deref(), token) {
        return refuse("gitlab", e, body.len());
    }
    let event = header_str(&headers, "x-gitlab-event").unwrap_or("");
    on_event(&s, "gitlab", webhook::parse(Provider::GitLab, event, &body))
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Logged without the payload: it is unauthenticated input.
fn refuse(provider: &str, why: webhook::Refused, bytes: usize) -> Response {
    warn!(provider, reason = %why, bytes, "webhook refused");
    let code = match why {
        webhook::Refused::NotConfigured => StatusCode::FORBIDDEN,
        _ => StatusCode::UNAUTHORIZED,
    };
    (code, format!("{why}\n")).into_response()
}

fn on_event(s: &Shared, provider: &'static str, event: webhook::Event) -> Response {
    match event {
        webhook::Event::Push {
            reference,
            repositories,
        } => {
            // As Argo CD does: only a push to the watched repository and
            // branch (the remote's default branch when none was given);
            // anything else is acknowledged and ignored, saying why.
            let ignored = |why: &str| {
                info!(provider, why, "push webhook ignored");
                (StatusCode::ACCEPTED, format!("ignored: {why}\n")).into_response()
            };
            if !webhook::names_repository(&repositories, &s.repo) {
                return ignored("a push to another repository");
            }
            let watched = s
                .branch
                .clone()
                .or_else(|| s.engine.source.watched_branch());
            match (reference, watched) {
                (Some(webhook::Ref::Branch(b)), Some(w)) if b != w => {
                    ignored("a push to another branch")
                }
                (Some(webhook::Ref::Branch(b)), _) => {
                    info!(provider, branch = %b, "push webhook: reconciling now");
                    s.wake.notify_one();
                    (StatusCode::ACCEPTED, "reconcile requested\n").into_response()
                }
                (Some(webhook::Ref::Tag(_)), _) => ignored("a tag push (sluice watches a branch)"),
                _ => ignored("the push names no branch"),
            }
        }
        webhook::Event::PullRequest { number, base, head } => match &s.forge {
            Some(forge) => {
                info!(provider, number, "pull request webhook: posting its report");
                let (engine, forge) = (s.engine.clone(), forge.clone());
                tokio::spawn(async move {
                    if let Err(e) =
                        crate::forge::post_report(&engine, &forge, number, &base, &head).await
                    {
                        warn!(number, error = %e, "pull request report failed");
                    }
                });
                (StatusCode::ACCEPTED, "report requested\n").into_response()
            }
            None => (
                StatusCode::ACCEPTED,
                "no forge configured; no report posted\n",
            )
                .into_response(),
        },
        webhook::Event::Other(kind) => {
            (StatusCode::OK, format!("event {kind:?} ignored\n")).into_response()
        }
    }
}

async fn status(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    match s.engine.status().await {
        Ok(st) => {
            let body = serde_json::json!({
                "source": st.state.source,
                "lastError": st.state.last_error,
                "inProgress": st.state.in_progress,
                "waiting": st.state.waiting,
                "drift": st.state.drift,
                "targets": st.state.targets,
                "resources": st.resources,
                // The newest 50, oldest first (as `sluice status -o json`).
                "history": &st.history[st.history.len().saturating_sub(50)..],
                "dora": output::dora(&st.history),
            });
            (StatusCode::OK, axum::Json(body)).into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn metrics(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    use std::fmt::Write as _;
    let m = &s.metrics;
    // Taken first: the observe this scrape may cause counts in the next.
    let fleet = s.fleet.traffic();
    let mut out = String::new();
    let counter = |out: &mut String, name: &str, help: &str, v: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
        );
    };
    counter(
        &mut out,
        "sluice_reconciles_total",
        "Reconcile passes.",
        m.reconciles.load(Ordering::Relaxed),
    );
    counter(
        &mut out,
        "sluice_reconcile_errors_total",
        "Reconcile passes that failed before changing anything.",
        m.reconcile_errors.load(Ordering::Relaxed),
    );
    counter(
        &mut out,
        "sluice_poll_errors_total",
        "Failed polls of the repository.",
        m.poll_errors.load(Ordering::Relaxed),
    );
    counter(
        &mut out,
        "sluice_rollouts_total",
        "Rollouts started.",
        m.rollouts.load(Ordering::Relaxed),
    );
    counter(
        &mut out,
        "sluice_reverts_total",
        "Automatic reverts.",
        m.reverts.load(Ordering::Relaxed),
    );
    let h = &m.reconcile_seconds;
    let counts: Vec<u64> = h.counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    write_histogram(
        &mut out,
        "sluice_reconcile_duration_seconds",
        "How long reconcile passes took.",
        &RECONCILE_BUCKETS,
        &counts,
        h.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
    );
    // DORA from the history as counters and a histogram, so rates and
    // quantiles come from PromQL (README: the queries).
    // One read of the history for every figure derived from it.
    let history = s.engine.store.history().ok();
    if let Some(history) = &history {
        use sluice_core::store::{HistoryKind, Outcome};
        let _ = writeln!(out, "# HELP sluice_deployments_total Deployments recorded in the history, by outcome.\n# TYPE sluice_deployments_total counter");
        for (outcome, label) in [
            (Outcome::Succeeded, "succeeded"),
            (Outcome::Failed, "failed"),
        ] {
            let n = history
                .iter()
                .filter(|e| e.kind == HistoryKind::Deploy && e.outcome == outcome)
                .count();
            let _ = writeln!(out, "sluice_deployments_total{{outcome=\"{label}\"}} {n}");
        }
        let leads: Vec<f64> = history
            .iter()
            .filter(|e| e.kind == HistoryKind::Deploy && e.outcome == Outcome::Succeeded)
            .map(|e| (e.at.timestamp() - e.commit_time).max(0) as f64)
            .collect();
        let mut counts = vec![0u64; LEAD_TIME_BUCKETS.len() + 1];
        for l in &leads {
            let i = LEAD_TIME_BUCKETS
                .iter()
                .position(|b| l <= b)
                .unwrap_or(LEAD_TIME_BUCKETS.len());
            counts[i] += 1;
        }
        write_histogram(
            &mut out,
            "sluice_lead_time_seconds",
            "Time from commit to live of each successful deployment.",
            &LEAD_TIME_BUCKETS,
            &counts,
            leads.iter().sum(),
        );
    }
    if let Some(history) = &history {
        let d = output::dora(history);
        let gauge = |out: &mut String, name: &str, help: &str, v: Option<f64>| {
            if let Some(v) = v {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
            }
        };
        gauge(
            &mut out,
            "sluice_dora_deployments_per_day",
            "Successful deployments per day.",
            d["deploymentsPerDay"].as_f64(),
        );
        gauge(
            &mut out,
            "sluice_dora_lead_time_seconds",
            "Median time from commit to live.",
            d["leadTimeSeconds"].as_f64(),
        );
        gauge(
            &mut out,
            "sluice_dora_change_failure_rate",
            "Share of deployments that failed.",
            d["changeFailureRate"].as_f64(),
        );
        gauge(
            &mut out,
            "sluice_dora_time_to_restore_seconds",
            "Median time from a failed deployment to the next good state.",
            d["timeToRestoreSeconds"].as_f64(),
        );
    }
    if let Some(history) = &history {
        use sluice_core::store::{HistoryKind, Outcome};
        let _ = writeln!(out, "# HELP sluice_heals_total Drift heals recorded in the history, by outcome (failed: a resource could not be healed, e.g. a field another manager owns).\n# TYPE sluice_heals_total counter");
        for (outcome, label) in [
            (Outcome::Succeeded, "succeeded"),
            (Outcome::Failed, "failed"),
        ] {
            let n = history
                .iter()
                .filter(|h| h.kind == HistoryKind::Heal && h.outcome == outcome)
                .count();
            let _ = writeln!(out, "sluice_heals_total{{outcome=\"{label}\"}} {n}");
        }
    }
    if let Ok(state) = s.engine.store.load() {
        let _ = writeln!(
            out,
            "# HELP sluice_store_inventory_lost 1 while the inventory is lost (state.json unreadable or gone) and pruning is refused, until it is rebuilt from the live resources.\n# TYPE sluice_store_inventory_lost gauge\nsluice_store_inventory_lost {}",
            u8::from(state.lost.is_some())
        );
        if let Some(scan) = &state.drift {
            let _ = writeln!(out, "# HELP sluice_drift_resources Resources that differ from the applied commit, at the last scan.\n# TYPE sluice_drift_resources gauge");
            for (target, items) in &scan.items {
                let _ = writeln!(
                    out,
                    "sluice_drift_resources{{target=\"{target}\"}} {}",
                    items.len()
                );
            }
        }
        let _ = writeln!(out, "# HELP sluice_applied_commit_info The commit applied per target.\n# TYPE sluice_applied_commit_info gauge");
        for (name, rec) in &state.targets {
            if let Some(a) = &rec.applied {
                let _ = writeln!(
                    out,
                    "sluice_applied_commit_info{{target=\"{name}\",commit=\"{}\"}} 1",
                    a.commit
                );
            }
        }
        // Per service, as kube-state-metrics does for pods: one series per
        // status, 1 for the current one.
        let services = s.service_health().await;
        let _ = writeln!(out, "# HELP sluice_service_health Health of each service (its worst resource): 1 for its current status, 0 for the others.\n# TYPE sluice_service_health gauge");
        for ((target, service), (health, _)) in &services {
            for status in ["healthy", "progressing", "degraded", "missing", "unknown"] {
                let _ = writeln!(
                    out,
                    "sluice_service_health{{target=\"{target}\",service=\"{service}\",status=\"{status}\"}} {}",
                    u8::from(health.to_string() == status)
                );
            }
        }
        let _ = writeln!(out, "# HELP sluice_service_synced Whether the service runs its applied commit as it is: no drift, no rollout under way (1) or not (0).\n# TYPE sluice_service_synced gauge");
        for ((target, service), (_, synced)) in &services {
            let _ = writeln!(
                out,
                "sluice_service_synced{{target=\"{target}\",service=\"{service}\"}} {}",
                u8::from(*synced)
            );
        }
        if !fleet.is_empty() {
            type Figure = fn(&sluice_fleet::HostTraffic) -> u64;
            let figures: [(&str, &str, Figure); 4] = [
                (
                    "sluice_fleet_ssh_commands_total",
                    "Commands run on each remote host over SSH (one round trip each).",
                    |t| t.commands,
                ),
                (
                    "sluice_fleet_ssh_sent_bytes_total",
                    "Bytes sent to each remote host's commands (requests, the installed binary).",
                    |t| t.sent,
                ),
                (
                    "sluice_fleet_ssh_received_bytes_total",
                    "Bytes each remote host's commands answered with.",
                    |t| t.received,
                ),
                (
                    "sluice_fleet_ssh_connects_total",
                    "SSH connections (masters) opened to each remote host.",
                    |t| t.connects,
                ),
            ];
            for (name, help, get) in figures {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
                for (target, t) in &fleet {
                    let _ = writeln!(out, "{name}{{target=\"{target}\"}} {}", get(t));
                }
            }
        }
        // Synced: the target runs the newest commit seen on the branch.
        let head = state.source.last_seen.as_ref().map(|r| &r.commit);
        let _ = writeln!(out, "# HELP sluice_target_synced Whether the target runs the newest commit of the watched branch (1) or not (0).\n# TYPE sluice_target_synced gauge");
        for (name, rec) in &state.targets {
            let synced = rec
                .applied
                .as_ref()
                .is_some_and(|a| Some(&a.commit) == head);
            let _ = writeln!(
                out,
                "sluice_target_synced{{target=\"{name}\"}} {}",
                u8::from(synced)
            );
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}
