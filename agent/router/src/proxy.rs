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
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
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
    fn observe(&mut self, secs: f64) {
        let i = self
            .bounds
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(self.bounds.len());
        self.counts[i] += 1;
        self.sum += secs;
        self.count += 1;
    }

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

/// One route's live table: backends and the smooth weighted round-robin
/// state (nginx's algorithm: even spread, deterministic).
struct Table {
    backends: Vec<Backend>,
    current: Mutex<Vec<i64>>,
}

impl Table {
    fn new(backends: Vec<Backend>) -> Self {
        let n = backends.len();
        Table {
            backends,
            current: Mutex::new(vec![0; n]),
        }
    }

    fn pick(&self) -> Option<&Backend> {
        let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let total: i64 = self.backends.iter().map(|b| b.weight as i64).sum();
        if total == 0 {
            return None;
        }
        let mut best = None;
        for (i, b) in self.backends.iter().enumerate() {
            cur[i] += b.weight as i64;
            if b.weight > 0 && best.is_none_or(|j: usize| cur[i] > cur[j]) {
                best = Some(i);
            }
        }
        let i = best?;
        cur[i] -= total;
        self.backends.get(i)
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
    stats: Mutex<Stats>,
    config_path: PathBuf,
    client: Client<HttpConnector, BoxBody<Bytes, hyper::Error>>,
    upstream_timeout: Duration,
    requests: AtomicU64,
}

type Body = BoxBody<Bytes, hyper::Error>;

fn full(s: impl Into<Bytes>) -> Body {
    Full::new(s.into()).map_err(|never| match never {}).boxed()
}

/// Runs the router until `shutdown` resolves.
pub async fn serve(
    admin: TcpListener,
    config_path: PathBuf,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RouterError> {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(Duration::from_secs(3)));
    connector.set_nodelay(true);
    let client = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector);
    let (tables, _) = watch::channel(Arc::new(BTreeMap::new()));
    let state = Arc::new(State {
        config: Mutex::new(RouterConfig::default()),
        tables,
        listeners: Mutex::new(BTreeMap::new()),
        stats: Mutex::new(Stats::default()),
        config_path: config_path.clone(),
        client,
        upstream_timeout: Duration::from_secs(30),
        requests: AtomicU64::new(0),
    });
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
    info!("router stopped");
    Ok(())
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
        match TcpListener::bind(route.listen).await {
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
    let tables: BTreeMap<String, Arc<Table>> = cfg
        .routes
        .iter()
        .map(|(n, r)| (n.clone(), Arc::new(Table::new(r.backends.clone()))))
        .collect();
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
        for (name, listener) in bound {
            let addr = listener.local_addr().unwrap_or(cfg.routes[&name].listen);
            let (stop, rx) = watch::channel(false);
            tokio::spawn(accept_loop(state.clone(), name.clone(), listener, rx));
            listeners.insert(name, Listener { addr, stop });
        }
    }
    *state.config.lock().unwrap_or_else(|e| e.into_inner()) = cfg;
    Ok(())
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
) {
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            accepted = listener.accept() => {
                let Ok((stream, peer)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let state = state.clone();
                let route = route.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| proxy(state.clone(), route.clone(), peer, req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        }
    }
}

/// The route currently listening on `route`'s address (it may have been
/// renamed in the config); falls back to the name itself.
fn table_for(state: &State, route: &str) -> Option<(String, Arc<Table>)> {
    let tables = state.tables.borrow().clone();
    if let Some(t) = tables.get(route) {
        return Some((route.to_string(), t.clone()));
    }
    let addr = state.listeners.lock().ok()?.get(route).map(|l| l.addr)?;
    let cfg = state.config.lock().ok()?;
    let (name, _) = cfg.routes.iter().find(|(_, r)| r.listen == addr)?;
    tables.get(name).map(|t| (name.clone(), t.clone()))
}

async fn proxy(
    state: Arc<State>,
    route: String,
    peer: SocketAddr,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    state.requests.fetch_add(1, Ordering::Relaxed);
    let Some((route, table)) = table_for(&state, &route) else {
        return Ok(reply(StatusCode::SERVICE_UNAVAILABLE, "no such route\n"));
    };
    let Some(backend) = table.pick().cloned() else {
        return Ok(reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "no backend available\n",
        ));
    };
    let started = Instant::now();
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let uri = match format!("http://{}{}", backend.addr, path).parse() {
        Ok(u) => u,
        Err(_) => return Ok(reply(StatusCode::BAD_REQUEST, "bad request target\n")),
    };
    *req.uri_mut() = uri;
    strip_hop_by_hop(req.headers_mut());
    if let Ok(v) = HeaderValue::from_str(&peer.ip().to_string()) {
        req.headers_mut()
            .append(HeaderName::from_static("x-forwarded-for"), v);
    }
    // Idempotent bodyless requests are retried once on another backend
    // when the first never answered (a replica that just stopped), as
    // nginx's proxy_next_upstream does; the failed attempt still counts
    // against its version.
    let retry = matches!(*req.method(), hyper::Method::GET | hyper::Method::HEAD)
        .then(|| (req.method().clone(), req.headers().clone()));
    let req = req.map(|b| b.boxed());
    let mut result = tokio::time::timeout(state.upstream_timeout, state.client.request(req)).await;
    let mut backend = backend;
    if let (Ok(Err(e)), Some((method, headers))) = (&result, retry) {
        let other = (0..table.backends.len())
            .filter_map(|_| table.pick())
            .find(|b| b.id != backend.id)
            .cloned();
        if let Some(other) = other {
            warn!(route = %route, backend = %backend.id, error = %e, retry = %other.id, "upstream failed; retrying on another backend");
            record(&state, &route, &backend.version, true, started.elapsed());
            let mut again = Request::new(full(Bytes::new()));
            *again.method_mut() = method;
            *again.headers_mut() = headers;
            if let Ok(uri) = format!("http://{}{}", other.addr, path).parse() {
                *again.uri_mut() = uri;
                backend = other;
                result =
                    tokio::time::timeout(state.upstream_timeout, state.client.request(again)).await;
            }
        }
    }
    let (resp, error) = match result {
        Ok(Ok(resp)) => {
            let error = resp.status().is_server_error();
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            (Response::from_parts(parts, body.boxed()), error)
        }
        Ok(Err(e)) => {
            warn!(route = %route, backend = %backend.id, error = %e, "upstream failed");
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
    if let Ok(v) = HeaderValue::from_str(&backend.id) {
        resp.headers_mut()
            .insert(HeaderName::from_static("x-sluice-backend"), v);
    }
    record(&state, &route, &backend.version, error, started.elapsed());
    Ok(resp)
}

/// Counts one request against `version` of `route`.
fn record(state: &State, route: &str, version: &str, error: bool, took: Duration) {
    let mut stats = state.stats.lock().unwrap_or_else(|e| e.into_inner());
    let v = stats
        .routes
        .entry(route.to_string())
        .or_default()
        .versions
        .entry(version.to_string())
        .or_default();
    v.requests += 1;
    if error {
        v.errors += 1;
    }
    v.latency.observe(took.as_secs_f64());
}

fn strip_hop_by_hop(h: &mut hyper::HeaderMap) {
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
    ] {
        h.remove(name);
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
        ("GET", "/stats") => {
            let stats = state
                .stats
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            json(StatusCode::OK, &stats)
        }
        ("GET", "/metrics") => {
            let stats = state
                .stats
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let mut r = Response::new(full(metrics_text(&stats)));
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
        _ => reply(StatusCode::NOT_FOUND, "not found\n"),
    })
}

fn metrics_text(stats: &Stats) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
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
            *counts.entry(t.pick().unwrap().id.clone()).or_insert(0) += 1;
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
        let mut h = Histogram::default();
        for _ in 0..90 {
            h.observe(0.002);
        }
        for _ in 0..10 {
            h.observe(0.2);
        }
        // Each quantile is its bucket's upper bound: the first bound at or
        // above the latency, within 25% of it.
        let (p50, p95) = (h.quantile(0.5), h.quantile(0.95));
        assert!((0.002..0.0025).contains(&p50), "{p50}");
        assert!((0.2..0.25).contains(&p95), "{p95}");
        let below = h.bounds.iter().rev().find(|b| **b < p50).copied();
        assert!(below.is_some_and(|b| b < 0.002), "{below:?}");
    }
}
