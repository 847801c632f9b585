//! The router: an HTTP reverse proxy that runs as its own process (`sluice
//! router`), so restarting, crashing or upgrading the agent never drops
//! traffic. The agent reconfigures it live over a small admin API.
//!
//! # Guarantees
//! - `PUT /routes` is atomic: every new listen address is bound first; if one
//!   fails, nothing changes and the answer is 409.
//! - A reconfiguration never drops a connection or an in-flight request: the
//!   next request picks its backend from the new table; a removed listener
//!   stops accepting while its open connections finish.
//! - The accepted configuration is persisted atomically; a restarted router
//!   serves the same routes at once.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Body as _;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{info, warn};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouterConfig {
    pub routes: BTreeMap<String, RouteConfig>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteConfig {
    pub listen: SocketAddr,
    pub backends: Vec<Backend>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Backend {
    pub id: String,
    pub version: String,
    pub addr: SocketAddr,
    pub weight: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("binding {addr} for route {route}: {source}")]
    Bind {
        route: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("loading {path}: {reason}")]
    LoadConfig { path: String, reason: String },
    #[error("persisting {path}: {source}")]
    PersistConfig {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("admin API at {addr}: {reason}")]
    Admin { addr: SocketAddr, reason: String },
}

/// Per-version counters of one route.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct VersionStats {
    pub requests: u64,
    /// 5xx answers, connection failures and timeouts.
    pub errors: u64,
    pub latency: Histogram,
}

/// Latency histogram with fixed buckets (seconds).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Histogram {
    pub bounds: Vec<f64>,
    pub counts: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

impl Default for Histogram {
    /// The analysis' buckets (log-spaced, within 12.5% of any latency),
    /// finite ones only: the last count is the overflow.
    fn default() -> Self {
        let bounds: Vec<f64> = sluice_core::traffic::latency_bounds()
            .into_iter()
            .filter(|b| b.is_finite())
            .collect();
        Histogram {
            counts: vec![0; bounds.len() + 1],
            bounds,
            sum: 0.0,
            count: 0,
        }
    }
}

impl Histogram {
    /// The upper bound of the bucket holding quantile `q` (0..1).
    pub fn quantile(&self, q: f64) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        let rank = (q * self.count as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return self.bounds.get(i).copied().unwrap_or(f64::INFINITY);
            }
        }
        f64::INFINITY
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RouteStats {
    pub versions: BTreeMap<String, VersionStats>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Stats {
    pub routes: BTreeMap<String, RouteStats>,
}

/// Counters of one version of one route, lock-free: every request adds
/// to them without a lock or an allocation.
struct Counters {
    requests: AtomicU64,
    errors: AtomicU64,
    buckets: Vec<AtomicU64>,
    sum_nanos: AtomicU64,
}

impl Counters {
    fn new(from: Option<&VersionStats>) -> Self {
        let h = Histogram::default();
        let c = Counters {
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            buckets: h.counts.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
        };
        // Counters carry on across a restart (persisted stats).
        if let Some(v) = from.filter(|v| v.latency.bounds == h.bounds) {
            c.requests.store(v.requests, Ordering::Relaxed);
            c.errors.store(v.errors, Ordering::Relaxed);
            for (b, n) in c.buckets.iter().zip(&v.latency.counts) {
                b.store(*n, Ordering::Relaxed);
            }
            c.sum_nanos
                .store((v.latency.sum * 1e9) as u64, Ordering::Relaxed);
        }
        c
    }

    fn record(&self, error: bool, took: Duration) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if error {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        let secs = took.as_secs_f64();
        let i = BOUNDS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BOUNDS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
    }

    fn snapshot(&self) -> VersionStats {
        let mut latency = Histogram::default();
        latency.counts = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        latency.count = latency.counts.iter().sum();
        latency.sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        VersionStats {
            requests: self.requests.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            latency,
        }
    }
}

/// The histogram's finite bounds, once.
static BOUNDS: std::sync::LazyLock<Vec<f64>> =
    std::sync::LazyLock::new(|| Histogram::default().bounds);

/// Idle keep-alive connections to one backend address. A connection goes
/// back to the pool once its response has been read to the end; one the
/// backend closed is dropped when next taken.
struct Upstream {
    addr: SocketAddr,
    idle: Mutex<Vec<SendRequest<Incoming>>>,
}

/// Idle connections kept per backend (nginx's `keepalive` directive).
const IDLE_PER_BACKEND: usize = 256;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Why an upstream request failed, and the request if it was never sent
/// (so an idempotent one can go to another backend).
struct SendFailed {
    error: String,
    request: Option<Request<Incoming>>,
}

impl Upstream {
    async fn send(
        self: &Arc<Self>,
        mut req: Request<Incoming>,
    ) -> Result<Response<Body>, SendFailed> {
        loop {
            let pooled = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let Some(mut sender) = pooled else { break };
            // Back in the pool as its last response ended: ready at once,
            // or closed by the backend.
            if sender.is_closed() || sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(self.pooled(resp, sender)),
                // A connection the backend closed meanwhile: the request
                // was not sent; the next connection takes it.
                Err(mut e) => match e.take_message() {
                    Some(r) => req = r,
                    None => {
                        return Err(SendFailed {
                            error: e.into_error().to_string(),
                            request: None,
                        })
                    }
                },
            }
        }
        let stream =
            match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(self.addr)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    return Err(SendFailed {
                        error: format!("connecting to {}: {e}", self.addr),
                        request: Some(req),
                    })
                }
                Err(_) => {
                    return Err(SendFailed {
                        error: format!("connecting to {}: timed out", self.addr),
                        request: Some(req),
                    })
                }
            };
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) = match http1::Builder::new()
            .writev(false)
            .handshake(TokioIo::new(stream))
            .await
        {
            Ok(h) => h,
            Err(e) => {
                return Err(SendFailed {
                    error: e.to_string(),
                    request: Some(req),
                })
            }
        };
        tokio::spawn(async move {
            let _ = conn.await;
        });
        match sender.try_send_request(req).await {
            Ok(resp) => Ok(self.pooled(resp, sender)),
            Err(mut e) => Err(SendFailed {
                request: e.take_message(),
                error: e.into_error().to_string(),
            }),
        }
    }

    /// The response, its body returning `sender` to the pool the moment
    /// it ends (before the client has it: the next request finds it).
    fn pooled(
        self: &Arc<Self>,
        resp: Response<Incoming>,
        sender: SendRequest<Incoming>,
    ) -> Response<Body> {
        let (parts, body) = resp.into_parts();
        let mut pooled = Pooled {
            body,
            back: Some((sender, self.clone())),
        };
        if pooled.body.is_end_stream() {
            pooled.release();
        }
        Response::from_parts(parts, Body::Pooled(pooled))
    }

    fn put(&self, sender: SendRequest<Incoming>) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < IDLE_PER_BACKEND {
            idle.push(sender);
        }
    }
}

/// A response body that gives its connection back to the pool when it has
/// been read to the end; one dropped half-way (the client went away)
/// takes its connection with it.
struct Pooled {
    body: Incoming,
    back: Option<(SendRequest<Incoming>, Arc<Upstream>)>,
}

impl Pooled {
    fn release(&mut self) {
        if let Some((sender, upstream)) = self.back.take() {
            upstream.put(sender);
        }
    }
}

impl hyper::body::Body for Pooled {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        let frame = std::task::ready!(std::pin::Pin::new(&mut self.body).poll_frame(cx));
        match &frame {
            None => self.release(),
            Some(Ok(_)) if self.body.is_end_stream() => self.release(),
            Some(Err(_)) => self.back = None,
            Some(Ok(_)) => {}
        }
        std::task::Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// A backend as a table serves it: where it is, each worker's pool of
/// connections to it, its version's counters, its header value ready.
struct Target {
    backend: Backend,
    upstreams: Vec<Arc<Upstream>>,
    counters: Arc<Counters>,
    header: Option<HeaderValue>,
}

/// One route's live table: backends and the smooth weighted round-robin
/// state (nginx's algorithm: even spread, deterministic).
struct Table {
    name: Arc<str>,
    targets: Vec<Target>,
    current: Mutex<Vec<i64>>,
}

impl Table {
    #[cfg(test)]
    fn new(backends: Vec<Backend>) -> Self {
        let targets = backends
            .into_iter()
            .map(|b| Target {
                upstreams: vec![Arc::new(Upstream {
                    addr: b.addr,
                    idle: Mutex::new(Vec::new()),
                })],
                counters: Arc::new(Counters::new(None)),
                header: None,
                backend: b,
            })
            .collect();
        Table::of("test", targets)
    }

    fn of(name: &str, targets: Vec<Target>) -> Self {
        let n = targets.len();
        Table {
            name: name.into(),
            targets,
            current: Mutex::new(vec![0; n]),
        }
    }

    fn pick(&self) -> Option<&Target> {
        let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let total: i64 = self.targets.iter().map(|t| t.backend.weight as i64).sum();
        if total == 0 {
            return None;
        }
        let mut best = None;
        for (i, t) in self.targets.iter().enumerate() {
            cur[i] += t.backend.weight as i64;
            if t.backend.weight > 0 && best.is_none_or(|j: usize| cur[i] > cur[j]) {
                best = Some(i);
            }
        }
        let i = best?;
        cur[i] -= total;
        self.targets.get(i)
    }
}

struct Listener {
    addr: SocketAddr,
    /// Tells the accept loop to stop; open connections carry on.
    stop: watch::Sender<bool>,
}

struct State {
    config: Mutex<RouterConfig>,
    /// route name → table, swapped whole on every PUT.
    tables: watch::Sender<Arc<BTreeMap<String, Arc<Table>>>>,
    listeners: Mutex<BTreeMap<String, Listener>>,
    /// (route, version) → its counters, kept across reconfigurations (and,
    /// persisted beside the configuration, across restarts).
    counters: Mutex<BTreeMap<(String, String), Arc<Counters>>>,
    /// (worker, backend address) → that worker's pool of keep-alive
    /// connections to it.
    upstreams: Mutex<BTreeMap<(usize, SocketAddr), Arc<Upstream>>>,
    /// The workers: one single-threaded event loop each (see [`serve`]).
    workers: Vec<tokio::runtime::Handle>,
    config_path: PathBuf,
    upstream_timeout: Duration,
    /// Unix time the router started: counters reset then unless persisted.
    started: f64,
}

impl State {
    fn stats(&self) -> Stats {
        let mut stats = Stats::default();
        for ((route, version), c) in self
            .counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            stats
                .routes
                .entry(route.clone())
                .or_default()
                .versions
                .insert(version.clone(), c.snapshot());
        }
        stats
    }

    fn stats_path(&self) -> PathBuf {
        self.config_path.with_extension("stats.json")
    }
}

/// Every body the router answers with: an upstream's (no allocation, no
/// dynamic dispatch on the hot path) or its own.
enum Body {
    Pooled(Pooled),
    Full(Full<Bytes>),
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            Body::Pooled(p) => std::pin::Pin::new(p).poll_frame(cx),
            Body::Full(f) => std::pin::Pin::new(f)
                .poll_frame(cx)
                .map(|o| o.map(|r| r.map_err(|never| match never {}))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Pooled(p) => p.is_end_stream(),
            Body::Full(f) => f.is_end_stream(),
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            Body::Pooled(p) => p.size_hint(),
            Body::Full(f) => f.size_hint(),
        }
    }
}

fn full(s: impl Into<Bytes>) -> Body {
    Body::Full(Full::new(s.into()))
}

/// Runs the router until `shutdown` resolves, with a worker per core.
pub async fn serve(
    admin: TcpListener,
    config_path: PathBuf,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RouterError> {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    serve_with(admin, config_path, workers, shutdown).await
}

/// Runs the router until `shutdown` resolves.
///
/// Proxying runs as nginx's workers do: `workers` threads, each a
/// single-threaded event loop with its own listening socket per route
/// (SO_REUSEPORT: the kernel spreads connections over them) and its own
/// keep-alive pools. A request and its upstream exchange never leave the
/// thread that accepted it: no wake-ups across threads, no shared pool.
/// Tables and counters are shared (swapped whole, atomics). The admin API
/// runs on the caller's runtime.
pub async fn serve_with(
    admin: TcpListener,
    config_path: PathBuf,
    workers: usize,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RouterError> {
    let (stop_workers, stopped) = watch::channel(false);
    let mut handles = Vec::new();
    for i in 0..workers.max(1) {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut stopped = stopped.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("router-worker-{i}"))
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let _ = tx.send(Ok(rt.handle().clone()));
                rt.block_on(async move {
                    let _ = stopped.wait_for(|s| *s).await;
                });
            });
        let handle = spawned
            .map_err(|e| e.to_string())
            .and_then(|_| rx.recv().map_err(|e| e.to_string()))
            .and_then(|r| r.map_err(|e| e.to_string()))
            .map_err(|reason| RouterError::Admin {
                addr: admin
                    .local_addr()
                    .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0))),
                reason: format!("starting worker {i}: {reason}"),
            })?;
        handles.push(handle);
    }
    let (tables, _) = watch::channel(Arc::new(BTreeMap::new()));
    let state = Arc::new(State {
        workers: handles,
        config: Mutex::new(RouterConfig::default()),
        tables,
        listeners: Mutex::new(BTreeMap::new()),
        counters: Mutex::new(BTreeMap::new()),
        upstreams: Mutex::new(BTreeMap::new()),
        config_path: config_path.clone(),
        upstream_timeout: Duration::from_secs(30),
        started: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0),
    });
    // The counters of the previous run carry on.
    if let Some(saved) = std::fs::read(state.stats_path())
        .ok()
        .and_then(|b| serde_json::from_slice::<Stats>(&b).ok())
    {
        let mut counters = state.counters.lock().unwrap_or_else(|e| e.into_inner());
        for (route, r) in &saved.routes {
            for (version, v) in &r.versions {
                counters.insert(
                    (route.clone(), version.clone()),
                    Arc::new(Counters::new(Some(v))),
                );
            }
        }
    }
    tokio::spawn(keep_stats(state.clone()));
    if config_path.exists() {
        let bytes = std::fs::read(&config_path).map_err(|e| RouterError::LoadConfig {
            path: config_path.display().to_string(),
            reason: e.to_string(),
        })?;
        let cfg: RouterConfig =
            serde_json::from_slice(&bytes).map_err(|e| RouterError::LoadConfig {
                path: config_path.display().to_string(),
                reason: e.to_string(),
            })?;
        apply(&state, cfg).await?;
    }
    info!(admin = %admin.local_addr().map(|a| a.to_string()).unwrap_or_default(), "router started");
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = admin.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let state = state.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| admin_request(state.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        }
    }
    for (_, l) in state
        .listeners
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
    {
        let _ = l.stop.send(true);
    }
    save_stats(&state);
    let _ = stop_workers.send(true);
    info!("router stopped");
    Ok(())
}

/// Writes the counters beside the configuration every two seconds when
/// they moved, so a restarted router counts on from there (at most two
/// seconds of requests uncounted after a kill -9).
async fn keep_stats(state: Arc<State>) {
    let mut last = 0;
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let total: u64 = state
            .counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|c| c.requests.load(Ordering::Relaxed))
            .sum();
        if total != last {
            last = total;
            save_stats(&state);
        }
    }
}

fn save_stats(state: &State) {
    let stats = state.stats();
    if let Ok(bytes) = serde_json::to_vec(&stats) {
        if let Err(e) = sluice_core::store::write_file_atomic(&state.stats_path(), &bytes, None) {
            warn!(error = %e, "could not persist the router's counters");
        }
    }
}

/// Replaces the configuration: binds new listeners first (all or nothing),
/// persists, swaps the tables, stops listeners no longer wanted.
async fn apply(state: &Arc<State>, cfg: RouterConfig) -> Result<(), RouterError> {
    let existing: BTreeMap<String, SocketAddr> = state
        .listeners
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(n, l)| (n.clone(), l.addr))
        .collect();
    let mut bound = Vec::new();
    for (name, route) in &cfg.routes {
        if existing.get(name) == Some(&route.listen) {
            continue;
        }
        // A listen address moving between routes is reused, not rebound.
        if existing.values().any(|a| *a == route.listen) {
            continue;
        }
        match bind_everywhere(state, route.listen).await {
            Ok(l) => bound.push((name.clone(), l)),
            Err(source) => {
                return Err(RouterError::Bind {
                    route: name.clone(),
                    addr: route.listen,
                    source,
                })
            }
        }
    }
    // Persisted before it is served: if the write fails (a full disk),
    // the new listeners close as they drop and nothing changed, so what
    // the router serves is always what a restart would load.
    persist(&state.config_path, &cfg)?;
    let tables: BTreeMap<String, Arc<Table>> = {
        let mut counters = state.counters.lock().unwrap_or_else(|e| e.into_inner());
        let mut upstreams = state.upstreams.lock().unwrap_or_else(|e| e.into_inner());
        // Pools of backends no longer routed go with their connections.
        upstreams.retain(|(_, addr), _| {
            cfg.routes
                .values()
                .any(|r| r.backends.iter().any(|b| b.addr == *addr))
        });
        let workers = state.workers.len();
        cfg.routes
            .iter()
            .map(|(n, r)| {
                let targets = r
                    .backends
                    .iter()
                    .map(|b| Target {
                        upstreams: (0..workers)
                            .map(|w| {
                                upstreams
                                    .entry((w, b.addr))
                                    .or_insert_with(|| {
                                        Arc::new(Upstream {
                                            addr: b.addr,
                                            idle: Mutex::new(Vec::new()),
                                        })
                                    })
                                    .clone()
                            })
                            .collect(),
                        counters: counters
                            .entry((n.clone(), b.version.clone()))
                            .or_insert_with(|| Arc::new(Counters::new(None)))
                            .clone(),
                        header: HeaderValue::from_str(&b.id).ok(),
                        backend: b.clone(),
                    })
                    .collect();
                (n.clone(), Arc::new(Table::of(n, targets)))
            })
            .collect()
    };
    state.tables.send_replace(Arc::new(tables));
    {
        let mut listeners = state.listeners.lock().unwrap_or_else(|e| e.into_inner());
        // Stop listeners whose route is gone or moved elsewhere.
        let stale: Vec<String> = listeners
            .iter()
            .filter(|(n, l)| cfg.routes.get(*n).map(|r| r.listen) != Some(l.addr))
            .map(|(n, _)| n.clone())
            .collect();
        for n in stale {
            let keep_for = cfg
                .routes
                .iter()
                .find(|(_, r)| Some(r.listen) == listeners.get(&n).map(|l| l.addr))
                .map(|(k, _)| k.clone());
            if let Some(l) = listeners.remove(&n) {
                match keep_for {
                    Some(other) => {
                        listeners.insert(other, l);
                    }
                    None => {
                        let _ = l.stop.send(true);
                    }
                }
            }
        }
        for (name, sockets) in bound {
            let addr = cfg.routes[&name].listen;
            let (stop, rx) = watch::channel(false);
            for (worker, listener) in sockets.into_iter().enumerate() {
                state.workers[worker].spawn(accept_loop(
                    state.clone(),
                    name.clone(),
                    listener,
                    rx.clone(),
                    worker,
                ));
            }
            listeners.insert(name, Listener { addr, stop });
        }
    }
    *state.config.lock().unwrap_or_else(|e| e.into_inner()) = cfg;
    Ok(())
}

/// One listening socket on `addr` per worker, each made on its worker's
/// loop (SO_REUSEPORT, so they share the address); all or none.
async fn bind_everywhere(state: &State, addr: SocketAddr) -> std::io::Result<Vec<TcpListener>> {
    let mut out = Vec::new();
    for worker in &state.workers {
        let bound = worker
            .spawn(async move {
                let socket = match addr {
                    SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                    SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
                };
                socket.set_reuseaddr(true)?;
                socket.set_reuseport(true)?;
                socket.set_nodelay(true)?;
                socket.bind(addr)?;
                socket.listen(1024)
            })
            .await
            .map_err(std::io::Error::other)??;
        out.push(bound);
    }
    Ok(out)
}

fn persist(path: &Path, cfg: &RouterConfig) -> Result<(), RouterError> {
    let err = |source| RouterError::PersistConfig {
        path: path.display().to_string(),
        source,
    };
    let bytes = serde_json::to_vec_pretty(cfg).map_err(|e| err(std::io::Error::other(e)))?;
    sluice_core::store::write_file_atomic(path, &bytes, None).map_err(err)
}

/// Accepts on one route's address until told to stop. The route is looked
/// up by name per request, so a listener follows live reconfiguration.
async fn accept_loop(
    state: Arc<State>,
    route: String,
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
    worker: usize,
) {
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            accepted = listener.accept() => {
                let Ok((stream, peer)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let state = state.clone();
                let route: Arc<str> = route.as_str().into();
                let forwarded = HeaderValue::from_str(&peer.ip().to_string()).ok();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| proxy(state.clone(), route.clone(), forwarded.clone(), worker, req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .writev(false)
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        }
    }
}

/// The route currently listening on `route`'s address (it may have been
/// renamed in the config); falls back to the name itself.
fn table_for(state: &State, route: &str) -> Option<Arc<Table>> {
    let tables = state.tables.borrow();
    if let Some(t) = tables.get(route) {
        return Some(t.clone());
    }
    let addr = state.listeners.lock().ok()?.get(route).map(|l| l.addr)?;
    let cfg = state.config.lock().ok()?;
    let (name, _) = cfg.routes.iter().find(|(_, r)| r.listen == addr)?;
    tables.get(name).cloned()
}

async fn proxy(
    state: Arc<State>,
    route: Arc<str>,
    forwarded: Option<HeaderValue>,
    worker: usize,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let Some(table) = table_for(&state, &route) else {
        return Ok(reply(StatusCode::SERVICE_UNAVAILABLE, "no such route\n"));
    };
    let Some(mut target) = table.pick() else {
        return Ok(reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "no backend available\n",
        ));
    };
    let started = Instant::now();
    // The request goes upstream in origin form, its Host as the client
    // sent it (nginx's `proxy_set_header Host $host`).
    if req.uri().scheme().is_some() {
        let pq = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| hyper::http::uri::PathAndQuery::from_static("/"));
        *req.uri_mut() = pq.into();
    }
    strip_hop_by_hop(req.headers_mut());
    if let Some(v) = forwarded {
        req.headers_mut()
            .append(HeaderName::from_static("x-forwarded-for"), v);
    }
    // Idempotent requests a backend never received (a replica that just
    // stopped: connection refused) go once to another, as nginx's
    // proxy_next_upstream does; the failed attempt counts against its
    // version.
    let idempotent = matches!(*req.method(), hyper::Method::GET | hyper::Method::HEAD);
    let pool = |t: &Target| t.upstreams[worker.min(t.upstreams.len() - 1)].clone();
    let mut result = tokio::time::timeout(state.upstream_timeout, pool(target).send(req)).await;
    if let Ok(Err(SendFailed {
        request: Some(again),
        error,
    })) = result
    {
        let other = (0..table.targets.len())
            .filter_map(|_| table.pick())
            .find(|t| t.backend.id != target.backend.id);
        match other {
            Some(other) if idempotent => {
                warn!(route = %table.name, backend = %target.backend.id, %error, retry = %other.backend.id, "upstream failed; retrying on another backend");
                target.counters.record(true, started.elapsed());
                target = other;
                result =
                    tokio::time::timeout(state.upstream_timeout, pool(target).send(again)).await;
            }
            _ => {
                result = Ok(Err(SendFailed {
                    error,
                    request: None,
                }))
            }
        }
    }
    let (resp, error) = match result {
        Ok(Ok(mut resp)) => {
            let error = resp.status().is_server_error();
            strip_hop_by_hop(resp.headers_mut());
            (resp, error)
        }
        Ok(Err(e)) => {
            warn!(route = %table.name, backend = %target.backend.id, error = %e.error, "upstream failed");
            (
                reply(StatusCode::BAD_GATEWAY, "upstream unavailable\n"),
                true,
            )
        }
        Err(_) => (
            reply(StatusCode::GATEWAY_TIMEOUT, "upstream timed out\n"),
            true,
        ),
    };
    let mut resp = resp;
    if let Some(v) = &target.header {
        resp.headers_mut()
            .insert(HeaderName::from_static("x-sluice-backend"), v.clone());
    }
    target.counters.record(error, started.elapsed());
    Ok(resp)
}

/// Headers that belong to one connection, not to the request (RFC 9110
/// 7.6.1), as parsed header names: no parsing per request.
static HOP_BY_HOP: std::sync::LazyLock<[HeaderName; 8]> = std::sync::LazyLock::new(|| {
    use hyper::header;
    [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::TE,
        header::TRAILER,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
    ]
});

fn strip_hop_by_hop(h: &mut hyper::HeaderMap) {
    for name in HOP_BY_HOP.iter() {
        if h.contains_key(name) {
            h.remove(name);
        }
    }
}

fn reply(code: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = code;
    r
}

fn json<T: Serialize>(code: StatusCode, v: &T) -> Response<Body> {
    let mut r = Response::new(full(serde_json::to_vec(v).unwrap_or_default()));
    *r.status_mut() = code;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

async fn admin_request(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    Ok(match (method.as_str(), path.as_str()) {
        ("GET", "/healthz") => reply(StatusCode::OK, "ok\n"),
        ("GET", "/routes") => {
            let cfg = state
                .config
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            json(StatusCode::OK, &cfg)
        }
        ("PUT", "/routes") => {
            let body = match http_body_util::Limited::new(req.into_body(), 4 << 20)
                .collect()
                .await
            {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    return Ok(json(
                        StatusCode::BAD_REQUEST,
                        &serde_json::json!({"error": e.to_string()}),
                    ))
                }
            };
            match serde_json::from_slice::<RouterConfig>(&body) {
                Err(e) => json(
                    StatusCode::BAD_REQUEST,
                    &serde_json::json!({"error": e.to_string()}),
                ),
                Ok(cfg) => match apply(&state, cfg).await {
                    Ok(()) => json(StatusCode::OK, &serde_json::json!({"ok": true})),
                    Err(e @ RouterError::Bind { .. }) => json(
                        StatusCode::CONFLICT,
                        &serde_json::json!({"error": e.to_string()}),
                    ),
                    Err(e) => json(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        &serde_json::json!({"error": e.to_string()}),
                    ),
                },
            }
        }
        ("GET", "/stats") => json(StatusCode::OK, &state.stats()),
        ("GET", "/metrics") => {
            let mut r = Response::new(full(metrics_text(&state.stats(), state.started)));
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
        _ => reply(StatusCode::NOT_FOUND, "not found\n"),
    })
}

fn metrics_text(stats: &Stats, started: f64) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(s, "# HELP sluice_router_start_time_seconds When this router process started (its counters carry on from the last one's, persisted).\n# TYPE sluice_router_start_time_seconds gauge\nsluice_router_start_time_seconds {started}");
    let _ = writeln!(s, "# HELP sluice_router_requests_total Requests proxied.\n# TYPE sluice_router_requests_total counter");
    for (route, r) in &stats.routes {
        for (version, v) in &r.versions {
            let _ = writeln!(
                s,
                "sluice_router_requests_total{{route=\"{route}\",version=\"{version}\"}} {}",
                v.requests
            );
        }
    }
    let _ = writeln!(s, "# HELP sluice_router_errors_total 5xx answers, connection failures and timeouts.\n# TYPE sluice_router_errors_total counter");
    for (route, r) in &stats.routes {
        for (version, v) in &r.versions {
            let _ = writeln!(
                s,
                "sluice_router_errors_total{{route=\"{route}\",version=\"{version}\"}} {}",
                v.errors
            );
        }
    }
    let _ = writeln!(s, "# HELP sluice_router_request_duration_seconds Request latency.\n# TYPE sluice_router_request_duration_seconds histogram");
    for (route, r) in &stats.routes {
        for (version, v) in &r.versions {
            let mut cum = 0;
            for (i, b) in v.latency.bounds.iter().enumerate() {
                cum += v.latency.counts[i];
                let _ = writeln!(s, "sluice_router_request_duration_seconds_bucket{{route=\"{route}\",version=\"{version}\",le=\"{b}\"}} {cum}");
            }
            let _ = writeln!(s, "sluice_router_request_duration_seconds_bucket{{route=\"{route}\",version=\"{version}\",le=\"+Inf\"}} {}", v.latency.count);
            let _ = writeln!(s, "sluice_router_request_duration_seconds_sum{{route=\"{route}\",version=\"{version}\"}} {}", v.latency.sum);
            let _ = writeln!(s, "sluice_router_request_duration_seconds_count{{route=\"{route}\",version=\"{version}\"}} {}", v.latency.count);
        }
    }
    s
}

/// The agent's side of the admin API.
#[derive(Clone)]
pub struct AdminClient {
    admin: SocketAddr,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl AdminClient {
    pub fn new(admin: SocketAddr) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        AdminClient {
            admin,
            client: Client::builder(TokioExecutor::new()).build(connector),
        }
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(StatusCode, Bytes), RouterError> {
        let err = |reason: String| RouterError::Admin {
            addr: self.admin,
            reason,
        };
        let req = Request::builder()
            .method(method)
            .uri(format!("http://{}{}", self.admin, path))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| err(e.to_string()))?;
        let resp = tokio::time::timeout(Duration::from_secs(10), self.client.request(req))
            .await
            .map_err(|_| err("timed out".into()))?
            .map_err(|e| err(e.to_string()))?;
        let code = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| err(e.to_string()))?
            .to_bytes();
        Ok((code, body))
    }

    pub async fn get(&self) -> Result<RouterConfig, RouterError> {
        let (code, body) = self.call("GET", "/routes", Vec::new()).await?;
        if !code.is_success() {
            return Err(RouterError::Admin {
                addr: self.admin,
                reason: format!("GET /routes: {code}"),
            });
        }
        serde_json::from_slice(&body).map_err(|e| RouterError::Admin {
            addr: self.admin,
            reason: e.to_string(),
        })
    }

    pub async fn put(&self, cfg: &RouterConfig) -> Result<(), RouterError> {
        let body = serde_json::to_vec(cfg).map_err(|e| RouterError::Admin {
            addr: self.admin,
            reason: e.to_string(),
        })?;
        let (code, body) = self.call("PUT", "/routes", body).await?;
        if code.is_success() {
            return Ok(());
        }
        let reason = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| code.to_string());
        Err(RouterError::Admin {
            addr: self.admin,
            reason,
        })
    }

    pub async fn stats(&self) -> Result<Stats, RouterError> {
        let (_, body) = self.call("GET", "/stats", Vec::new()).await?;
        serde_json::from_slice(&body).map_err(|e| RouterError::Admin {
            addr: self.admin,
            reason: e.to_string(),
        })
    }

    pub async fn healthy(&self) -> bool {
        matches!(self.call("GET", "/healthz", Vec::new()).await, Ok((c, _)) if c.is_success())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(id: &str, weight: u32) -> Backend {
        Backend {
            id: id.into(),
            version: id.into(),
            addr: "127.0.0.1:1".parse().unwrap(),
            weight,
        }
    }

    #[test]
    fn smooth_weighted_round_robin_spreads_by_weight() {
        let t = Table::new(vec![backend("a", 80), backend("b", 20), backend("c", 0)]);
        let mut counts = BTreeMap::new();
        for _ in 0..1000 {
            *counts
                .entry(t.pick().unwrap().backend.id.clone())
                .or_insert(0) += 1;
        }
        assert_eq!(counts.get("a"), Some(&800));
        assert_eq!(counts.get("b"), Some(&200));
        assert_eq!(counts.get("c"), None);
        assert!(Table::new(vec![backend("x", 0)]).pick().is_none());
    }

    /// A replica that stopped (its port refuses connections) costs the
    /// client nothing on a GET: the router retries on another backend, and
    /// counts the failed attempt against the stopped replica's version.
    #[tokio::test]
    async fn a_configuration_that_cannot_be_persisted_is_not_served() {
        // The config path's folder is a file: every write fails, as on a
        // full disk.
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("not-a-dir");
        std::fs::write(&blocker, b"x").unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_addr = admin.local_addr().unwrap();
        tokio::spawn(serve(admin, blocker.join("r.json"), std::future::pending()));
        let client = AdminClient::new(admin_addr);
        let listen = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let cfg = RouterConfig {
            routes: [(
                "r".to_string(),
                RouteConfig {
                    listen,
                    backends: Vec::new(),
                },
            )]
            .into(),
        };
        assert!(client.put(&cfg).await.is_err());
        // Nothing changed: no route, nothing listening on its address.
        assert!(client.stats().await.unwrap().routes.is_empty());
        assert!(std::net::TcpStream::connect(listen).is_err());
    }

    #[tokio::test]
    async fn a_get_to_a_stopped_backend_is_retried_on_another() {
        let live = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let live_addr = live.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = live.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_req: Request<Incoming>| async {
                        Ok::<_, Infallible>(Response::new(full("ok\n")))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        // A port nothing listens on.
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead_addr = dead.local_addr().unwrap();
        drop(dead);
        let listen = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_addr = admin.local_addr().unwrap();
        tokio::spawn(serve(
            admin,
            dir.path().join("r.json"),
            std::future::pending(),
        ));
        let client = AdminClient::new(admin_addr);
        let mk = |id: &str, addr| Backend {
            id: id.into(),
            version: id.into(),
            addr,
            weight: 1,
        };
        let cfg = RouterConfig {
            routes: [(
                "r".to_string(),
                RouteConfig {
                    listen,
                    backends: vec![mk("dead", dead_addr), mk("live", live_addr)],
                },
            )]
            .into(),
        };
        client.put(&cfg).await.unwrap();
        let http: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build(HttpConnector::new());
        for _ in 0..10 {
            let resp = http
                .get(format!("http://{listen}/").parse().unwrap())
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
        }
        let stats = client.stats().await.unwrap();
        let r = &stats.routes["r"].versions;
        assert_eq!(r["live"].requests, 10);
        assert_eq!(r["live"].errors, 0);
        assert_eq!(r["dead"].errors, r["dead"].requests);
        assert!(r["dead"].requests >= 4, "{:?}", r["dead"]);
    }

    #[test]
    fn histogram_quantiles() {
        let c = Counters::new(None);
        for _ in 0..90 {
            c.record(false, Duration::from_millis(2));
        }
        for _ in 0..10 {
            c.record(false, Duration::from_millis(200));
        }
        let h = c.snapshot().latency;
        // Each quantile is its bucket's upper bound: the first bound at or
        // above the latency, within 25% of it.
        let (p50, p95) = (h.quantile(0.5), h.quantile(0.95));
        assert!((0.002..0.0025).contains(&p50), "{p50}");
        assert!((0.2..0.25).contains(&p95), "{p95}");
        let below = h.bounds.iter().rev().find(|b| **b < p50).copied();
        assert!(below.is_some_and(|b| b < 0.002), "{below:?}");
    }
}
