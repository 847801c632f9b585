//! `sluice demo`: a small HTTP service for the examples and the tests, whose
//! version, latency, error rate, readiness and crashes are set by flags, so
//! good and bad releases can be staged with a one-line commit.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Mutex;

#[derive(clap::Args, Clone, Debug)]
pub struct DemoArgs {
    /// Port to listen on (127.0.0.1).
    #[arg(long, env = "PORT")]
    pub port: u16,
    #[arg(long, env = "SERVICE_NAME", default_value = "demo")]
    pub name: String,
    #[arg(long, env = "SERVICE_VERSION", default_value = "0.0.0")]
    pub version: String,
    /// Added to every `/` response.
    #[arg(long, env = "DEMO_LATENCY_MS", default_value_t = 0)]
    pub latency_ms: u64,
    /// Plus a random delay, exponentially distributed with this mean, per
    /// request (how real services' latency spreads).
    #[arg(long, env = "DEMO_LATENCY_JITTER_MS", default_value_t = 0)]
    pub latency_jitter_ms: u64,
    /// A share of `/` requests (0.0 to 1.0) slower by `--slow-ms`: a slow
    /// tail, which moves p99 and hardly the median.
    #[arg(long, env = "DEMO_SLOW_SHARE", default_value_t = 0.0)]
    pub slow_share: f64,
    #[arg(long, env = "DEMO_SLOW_MS", default_value_t = 0)]
    pub slow_ms: u64,
    /// Each `/` request fails (500) with this probability (0.0 to 1.0),
    /// independently of the others.
    #[arg(long, env = "DEMO_ERROR_RATE", default_value_t = 0.0)]
    pub error_rate: f64,
    /// Requests fail only from this long after start (errors that start
    /// late, as a leak or an expiring cache would make them).
    #[arg(long, env = "DEMO_ERRORS_AFTER_MS", default_value_t = 0)]
    pub errors_after_ms: u64,
    /// Requests fail only while more than this many are in flight (errors
    /// under concurrency, as an exhausted pool makes them).
    #[arg(long, env = "DEMO_ERRORS_ABOVE_CONCURRENCY")]
    pub errors_above_concurrency: Option<u64>,
    /// Seed of the random errors and delays: the same seed gives the same
    /// sequence per request number (default: from the clock and pid).
    #[arg(long, env = "DEMO_SEED")]
    pub seed: Option<u64>,
    /// /healthz answers 503 until this long after start.
    #[arg(long, env = "DEMO_READY_AFTER_MS", default_value_t = 0)]
    pub ready_after_ms: u64,
    /// /healthz never answers 200.
    #[arg(long, env = "DEMO_NEVER_READY")]
    pub never_ready: bool,
    /// Exit with code 3 this long after start.
    #[arg(long, env = "DEMO_CRASH_AFTER_MS")]
    pub crash_after_ms: Option<u64>,
    /// Exit 1 at once.
    #[arg(long, env = "DEMO_FAIL_START")]
    pub fail_start: bool,
    /// Services to call on `/` (repeatable or comma-separated), e.g.
    /// http://127.0.0.1:8082.
    #[arg(long, env = "DEMO_UPSTREAM", value_delimiter = ',')]
    pub upstream: Vec<String>,
    /// OpenFeature flagd flag-definition JSON; re-read when it changes.
    #[arg(long, env = "DEMO_FLAGS_FILE")]
    pub flags_file: Option<PathBuf>,
}

/// `sluice load`: steady demo traffic through a route, so a canary has
/// something to be judged on; prints what each version served per second.
#[derive(clap::Args, Clone, Debug)]
pub struct LoadArgs {
    /// The URL to request, e.g. http://127.0.0.1:8080/.
    #[arg(long, default_value = "http://127.0.0.1:8080/")]
    pub url: String,
    /// Requests per second.
    #[arg(long, default_value_t = 50)]
    pub rps: u32,
    /// Stop after this many seconds (default: until interrupted).
    #[arg(long)]
    pub seconds: Option<u64>,
}

/// Sends `rps` requests a second and prints, per second, the answers by
/// version and status: the view a user watches while a canary runs.
pub async fn load(args: LoadArgs) -> anyhow::Result<ExitCode> {
    if args.rps == 0 || args.rps > 10_000 {
        anyhow::bail!("--rps must be between 1 and 10000");
    }
    let url: reqwest::Url = args
        .url
        .parse()
        .map_err(|e| anyhow::anyhow!("--url {:?}: {e}", args.url))?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .no_proxy()
        .build()?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, u16, Duration)>();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rps as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started = Instant::now();
    let mut report = tokio::time::interval(Duration::from_secs(1));
    report.tick().await;
    let mut second: BTreeMap<(String, u16), u64> = BTreeMap::new();
    let mut latencies: Vec<Duration> = Vec::new();
    let stop = crate::run::shutdown_signal();
    tokio::pin!(stop);
    eprintln!("sending {} requests/s to {url}; Ctrl-C stops", args.rps);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => {
                let (client, url, tx) = (client.clone(), url.clone(), tx.clone());
                tokio::spawn(async move {
                    let t = Instant::now();
                    let (version, code) = match client.get(url).send().await {
                        Ok(r) => {
                            let code = r.status().as_u16();
                            let v: Value = r.json().await.unwrap_or(Value::Null);
                            (v["version"].as_str().unwrap_or("?").to_string(), code)
                        }
                        Err(_) => ("-".to_string(), 0),
                    };
                    let _ = tx.send((version, code, t.elapsed()));
                });
            }
            Some((version, code, took)) = rx.recv() => {
                *second.entry((version, code)).or_default() += 1;
                latencies.push(took);
            }
            _ = report.tick() => {
                latencies.sort();
                let p99 = latencies
                    .get((latencies.len() * 99 / 100).min(latencies.len().saturating_sub(1)))
                    .map(|d| d.as_millis())
                    .unwrap_or(0);
                let parts: Vec<String> = second
                    .iter()
                    .map(|((v, c), n)| match c {
                        0 => format!("{n} failed to connect"),
                        200 => format!("{v}: {n}"),
                        c => format!("{v}: {n} x {c}"),
                    })
                    .collect();
                println!(
                    "{:>4}s  {:>4} answers  p99 {:>4} ms  {}",
                    started.elapsed().as_secs(),
                    latencies.len(),
                    p99,
                    parts.join(", ")
                );
                second.clear();
                latencies.clear();
                if args.seconds.is_some_and(|s| started.elapsed().as_secs() >= s) {
                    break;
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

struct App {
    args: DemoArgs,
    started: Instant,
    seed: u64,
    requests: AtomicU64,
    in_flight: AtomicU64,
    /// Flags file cache: (mtime, resolved values).
    flags: Mutex<(Option<SystemTime>, Value)>,
}

pub async fn main(args: DemoArgs) -> anyhow::Result<ExitCode> {
    if args.fail_start {
        eprintln!(
            "{} {}: failing at start as asked (--fail-start)",
            args.name, args.version
        );
        return Ok(ExitCode::from(1));
    }
    if !(0.0..=1.0).contains(&args.error_rate) {
        anyhow::bail!("--error-rate must be between 0 and 1");
    }
    if !(0.0..=1.0).contains(&args.slow_share) {
        anyhow::bail!("--slow-share must be between 0 and 1");
    }
    let seed = args.seed.unwrap_or_else(|| {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        now.as_nanos() as u64 ^ u64::from(std::process::id()) << 32
    });
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", args.port)).await?;
    eprintln!(
        "{} {} listening on 127.0.0.1:{} (pid {})",
        args.name,
        args.version,
        args.port,
        std::process::id()
    );
    if let Some(ms) = args.crash_after_ms {
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(ms));
            eprintln!("crashing as asked (--crash-after-ms {ms})");
            std::process::exit(3);
        });
    }
    let app = Arc::new(App {
        args,
        started: Instant::now(),
        seed,
        requests: AtomicU64::new(0),
        in_flight: AtomicU64::new(0),
        flags: Mutex::new((None, json!({}))),
    });
    let router = Router::new()
        .route("/", get(root))
        .route("/healthz", get(healthz))
        .route("/livez", get(|| async { "ok\n" }))
        .with_state(app);
    axum::serve(listener, router)
        .with_graceful_shutdown(crate::run::shutdown_signal())
        .await?;
    Ok(ExitCode::SUCCESS)
}

async fn healthz(State(app): State<Arc<App>>) -> Response {
    let a = &app.args;
    let ready = !a.never_ready && app.started.elapsed() >= Duration::from_millis(a.ready_after_ms);
    if ready {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

async fn root(State(app): State<Arc<App>>) -> Response {
    let n = app.requests.fetch_add(1, Ordering::Relaxed);
    let concurrent = app.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
    let _leave = InFlight(&app.in_flight);
    let a = &app.args;
    // Independent draws per request number: 0 errors, 1 jitter, 2 tail.
    let draw = |k: u64| uniform(app.seed, n, k);
    let mut delay = a.latency_ms as f64;
    if a.latency_jitter_ms > 0 {
        delay -= a.latency_jitter_ms as f64 * (1.0 - draw(1)).ln();
    }
    if draw(2) < a.slow_share {
        delay += a.slow_ms as f64;
    }
    if delay > 0.0 {
        tokio::time::sleep(Duration::from_secs_f64(delay / 1000.0)).await;
    }
    let flags = app.flags().await;
    let mut upstreams = Vec::new();
    for u in &a.upstream {
        upstreams.push(match fetch(u).await {
            Ok(v) => v,
            Err(e) => json!({ "url": u, "error": e }),
        });
    }
    let body = json!({
        "service": a.name,
        "version": a.version,
        "pid": std::process::id(),
        "flags": flags,
        "upstreams": upstreams,
    });
    let failing = app.started.elapsed() >= Duration::from_millis(a.errors_after_ms)
        && a.errors_above_concurrency.is_none_or(|c| concurrent > c);
    if failing && draw(0) < a.error_rate {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({ "error": "injected failure", "service": a.name, "version": a.version })),
        )
            .into_response();
    }
    Json(body).into_response()
}

/// Counts a request out of flight when it is answered (or dropped).
struct InFlight<'a>(&'a AtomicU64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A uniform number in [0, 1) for request `n`'s `k`th draw: SplitMix64 of
/// the three, so a seed replays the same requests the same way.
fn uniform(seed: u64, n: u64, k: u64) -> f64 {
    let mut x =
        seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ k.wrapping_mul(0xD1B5_4A32_D192_ED03);
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    (x >> 11) as f64 / (1u64 << 53) as f64
}

impl App {
    /// The flags file's values, re-read only when its mtime changed.
    async fn flags(&self) -> Value {
        let Some(path) = &self.args.flags_file else {
            return json!({});
        };
        let mtime = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        let mut cache = self.flags.lock().await;
        if cache.0 != mtime || mtime.is_none() {
            let resolved = std::fs::read(path)
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                .map(|doc| resolve_flags(&doc))
                .unwrap_or_else(|| json!({ "error": "flags file missing or not JSON" }));
            *cache = (mtime, resolved);
        }
        cache.1.clone()
    }
}

/// Resolves a flagd flag-definition document to each flag's value: the
/// default variant's value when ENABLED, absent when DISABLED.
pub fn resolve_flags(doc: &Value) -> Value {
    let mut out = BTreeMap::new();
    if let Some(flags) = doc.get("flags").and_then(Value::as_object) {
        for (name, f) in flags {
            if f.get("state").and_then(Value::as_str) != Some("ENABLED") {
                continue;
            }
            let variant = f
                .get("defaultVariant")
                .and_then(Value::as_str)
                .unwrap_or("");
            if let Some(v) = f.get("variants").and_then(|v| v.get(variant)) {
                out.insert(name.clone(), v.clone());
            }
        }
    }
    json!(out)
}

/// GET `url` (http://host:port[/path]) with HTTP/1.1 over a plain socket:
/// enough for the demo's dependency chain, with a 5 s limit.
async fn fetch(url: &str) -> Result<Value, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or("only http:// upstreams")?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let work = async {
        let mut s = tokio::net::TcpStream::connect(hostport)
            .await
            .map_err(|e| e.to_string())?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        s.take(1 << 20)
            .read_to_end(&mut buf)
            .await
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&buf);
        let (head, body) = text.split_once("\r\n\r\n").ok_or("malformed response")?;
        let status = head.split_whitespace().nth(1).unwrap_or("?").to_string();
        let chunked = head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked");
        let body = if chunked {
            dechunk(body)
        } else {
            body.to_string()
        };
        let mut v: Value = serde_json::from_str(&body).unwrap_or_else(|_| json!({ "body": body }));
        if status != "200" {
            v["status"] = json!(status);
        }
        Ok::<Value, String>(v)
    };
    tokio::time::timeout(Duration::from_secs(5), work)
        .await
        .map_err(|_| "timeout".to_string())?
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_are_uniform_independent_and_replayable() {
        // 100,000 draws: the share under 0.05 is 5% within 4 standard
        // deviations (0.28%), the same seed gives the same draws, and a
        // request's draws for errors and for delay do not move together.
        let n = 100_000;
        let under = (0..n).filter(|i| uniform(42, *i, 0) < 0.05).count() as f64 / n as f64;
        assert!((under - 0.05).abs() < 0.0028, "{under}");
        assert_eq!(uniform(42, 7, 0), uniform(42, 7, 0));
        assert_ne!(uniform(42, 7, 0), uniform(43, 7, 0));
        let both = (0..n)
            .filter(|i| uniform(42, *i, 0) < 0.1 && uniform(42, *i, 1) < 0.1)
            .count() as f64
            / n as f64;
        assert!((both - 0.01).abs() < 0.0013, "{both}");
        // Failures are not evenly spread: some 100-request runs hold more
        // than 5 of them at a 5% rate.
        let runs: Vec<usize> = (0..100)
            .map(|r| {
                (r * 100..r * 100 + 100)
                    .filter(|i| uniform(1, *i, 0) < 0.05)
                    .count()
            })
            .collect();
        assert!(
            runs.iter().any(|c| *c >= 9) && runs.iter().any(|c| *c <= 1),
            "{runs:?}"
        );
    }

    #[test]
    fn flags_resolve_to_default_variants_of_enabled_flags() {
        let doc = json!({"flags": {
            "new-checkout": {"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "off"},
            "banner": {"state": "ENABLED", "variants": {"a": "hello"}, "defaultVariant": "a"},
            "old": {"state": "DISABLED", "variants": {"on": true}, "defaultVariant": "on"}
        }});
        assert_eq!(
            resolve_flags(&doc),
            json!({"new-checkout": false, "banner": "hello"})
        );
        assert_eq!(resolve_flags(&json!({"flags": 3})), json!({}));
    }

    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(
            dechunk("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
            "hello world"
        );
    }
}
