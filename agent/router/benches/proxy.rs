//! Router benchmark (`cargo bench -p sluice-router --bench proxy`).
//!
//! 1. Overhead against nginx: the same backend served directly, through
//!    sluice's router and through nginx (Debian package `nginx-light`,
//!    upstream keep-alive as a production config has it), each driven by
//!    wrk at the same threads, connections and duration in the same run.
//!    Prints requests/s and p99 saturated (32 connections), and with one
//!    connection the p99 each proxy adds to a request.
//! 2. Time from a failing verdict to 100% of traffic on the baseline: a
//!    route split 50/50 gets the baseline-only table (what an abort sends);
//!    timed until the router has acknowledged it, then 200 requests check
//!    that none reaches the canary.
//!
//! Installs nginx-light and wrk with apt-get when they are missing and it
//! runs as root; otherwise says how.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use sluice_router::{AdminClient, Backend, RouteConfig, RouterConfig};
use tokio::net::TcpListener;

const THREADS: &str = "2";
const CONNECTIONS: &str = "32";
const DURATION: &str = "5s";
const ROUNDS: usize = 3;

fn main() {
    if !ensure_tools() {
        return;
    }
    let backend_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let backend_a = backend_rt.block_on(backend("baseline"));
    let backend_b = backend_rt.block_on(backend("canary"));
    let router_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = router_rt.block_on(async {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let cfg = dir.path().join("router.json");
        tokio::spawn(sluice_router::serve(l, cfg, std::future::pending()));
        addr
    });
    let client = AdminClient::new(admin);
    let router_port = free_port();
    let route = |weights: (u32, u32)| RouterConfig {
        routes: [(
            "bench".to_string(),
            RouteConfig {
                listen: SocketAddr::from(([127, 0, 0, 1], router_port)),
                backends: vec![
                    Backend {
                        id: "a".into(),
                        version: "baseline".into(),
                        addr: backend_a,
                        weight: weights.0,
                    },
                    Backend {
                        id: "b".into(),
                        version: "canary".into(),
                        addr: backend_b,
                        weight: weights.1,
                    },
                ],
            },
        )]
        .into(),
    };
    router_rt
        .block_on(client.put(&route((1, 0))))
        .expect("router config");
    let nginx_port = free_port();
    let nginx = Nginx::start(nginx_port, backend_a);

    println!(
        "router benchmark: wrk -t{THREADS} -c{CONNECTIONS} -d{DURATION}, one backend (tiny hyper server), {ROUNDS} rounds interleaved in one run, medians"
    );
    // Saturated (throughput), then one connection (the latency a proxy
    // adds per request, without queueing hiding it). Rounds interleave
    // the three so a busy moment of the machine hits each alike.
    let ports = [backend_a.port(), router_port, nginx_port];
    let mut c32: [Vec<Wrk>; 3] = Default::default();
    let mut c1: [Vec<Wrk>; 3] = Default::default();
    for _ in 0..ROUNDS {
        for (i, port) in ports.iter().enumerate() {
            c32[i].push(wrk(*port));
            c1[i].push(wrk_with(*port, "1", "1"));
        }
    }
    drop(nginx);
    let median = |v: &[Wrk], f: fn(&Wrk) -> f64| {
        let mut x: Vec<f64> = v.iter().map(f).collect();
        x.sort_by(f64::total_cmp);
        x[x.len() / 2]
    };
    println!(
        "  {:<20} {:>11} {:>9} | {:>14} {:>9} {:>10}",
        "", "c32 req/s", "c32 p99", "c1 req/s", "c1 p99", "added p99"
    );
    let direct_p99 = median(&c1[0], |w| w.p99_ms);
    for (i, name) in ["backend direct", "sluice router", "nginx (keep-alive)"]
        .iter()
        .enumerate()
    {
        println!(
            "  {:<20} {:>11.0} {:>7.2}ms | {:>14.0} {:>7.3}ms {:>8.3}ms   (c32 req/s per round: {})",
            name,
            median(&c32[i], |w| w.rps),
            median(&c32[i], |w| w.p99_ms),
            median(&c1[i], |w| w.rps),
            median(&c1[i], |w| w.p99_ms),
            median(&c1[i], |w| w.p99_ms) - direct_p99,
            c32[i].iter().map(|w| format!("{:.0}", w.rps)).collect::<Vec<_>>().join(", ")
        );
    }

    // Failing verdict → all traffic on the baseline.
    let mut times = Vec::new();
    for _ in 0..20 {
        router_rt
            .block_on(client.put(&route((50, 50))))
            .expect("split");
        let started = Instant::now();
        router_rt
            .block_on(client.put(&route((1, 0))))
            .expect("abort");
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        let http = reqwest_free_get(router_port, 200);
        assert_eq!(
            http, 0,
            "{http} requests reached the canary after the abort"
        );
    }
    times.sort_by(f64::total_cmp);
    println!(
        "  failing verdict → 100% on the baseline (router acknowledged; 200 requests after each, none to the canary): median {:.2} ms, max {:.2} ms over {} aborts",
        times[times.len() / 2],
        times[times.len() - 1],
        times.len()
    );
}

/// A backend answering "ok" with its name in a header.
async fn backend(name: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |_req: Request<hyper::body::Incoming>| async move {
                        let mut r = Response::new(Full::new(Bytes::from_static(b"ok\n")));
                        r.headers_mut()
                            .insert("x-backend", hyper::header::HeaderValue::from_static(name));
                        Ok::<_, Infallible>(r)
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// Sends `n` GETs through the router; returns how many the canary served.
fn reqwest_free_get(port: u16, n: usize) -> usize {
    use std::io::{Read, Write};
    let mut canary = 0;
    for _ in 0..n {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .expect("write");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        if out.contains("x-backend: canary") {
            canary += 1;
        }
    }
    canary
}

#[derive(Default)]
struct Wrk {
    rps: f64,
    p99_ms: f64,
}

fn wrk(port: u16) -> Wrk {
    wrk_with(port, THREADS, CONNECTIONS)
}

fn wrk_with(port: u16, threads: &str, connections: &str) -> Wrk {
    let out = Command::new("wrk")
        .args([
            "-t",
            threads,
            "-c",
            connections,
            "-d",
            DURATION,
            "--latency",
            &format!("http://127.0.0.1:{port}/"),
        ])
        .output()
        .expect("wrk");
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    let p99_ms = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))
        .map(|v| duration_ms(v.trim()))
        .unwrap_or(f64::NAN);
    Wrk { rps, p99_ms }
}

/// wrk's "1.23ms", "850.00us", "1.02s".
fn duration_ms(v: &str) -> f64 {
    let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len()));
    let n: f64 = num.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => f64::NAN,
    }
}

struct Nginx {
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Nginx {
    fn start(port: u16, backend: SocketAddr) -> Nginx {
        let dir = tempfile::tempdir().expect("tempdir");
        let conf = format!(
            "worker_processes 2;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\ndaemon off;\nevents {{ worker_connections 1024; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {d};\n  proxy_temp_path {d};\n  upstream b {{ server {backend}; keepalive 64; }}\n  server {{\n    listen 127.0.0.1:{port};\n    location / {{ proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}\n  }}\n}}\n",
            d = dir.path().display()
        );
        std::fs::write(dir.path().join("nginx.conf"), conf).expect("nginx.conf");
        let child = Command::new(which("nginx").unwrap_or_else(|| "nginx".into()))
            .args(["-c", &dir.path().join("nginx.conf").display().to_string()])
            .args(["-p", &dir.path().display().to_string()])
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nginx");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "nginx did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Nginx { child, _dir: dir }
    }
}

impl Drop for Nginx {
    /// SIGTERM to the master, which stops its workers (SIGKILL would
    /// orphan them).
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// `cmd` on PATH or in /usr/sbin (where Debian puts nginx).
fn which(cmd: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([std::path::PathBuf::from("/usr/sbin")])
        .map(|d| d.join(cmd))
        .find(|p| p.is_file())
}

/// nginx and wrk, installed with apt-get if missing and possible.
fn ensure_tools() -> bool {
    let missing: Vec<&str> = [("nginx", "nginx-light"), ("wrk", "wrk")]
        .into_iter()
        .filter(|(cmd, _)| which(cmd).is_none())
        .map(|(_, pkg)| pkg)
        .collect();
    if missing.is_empty() {
        return true;
    }
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0"));
    if root {
        let ok = Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return true;
        }
    }
    eprintln!(
        "router benchmark skipped: needs {}: apt-get install {}",
        missing.join(", "),
        missing.join(" ")
    );
    false
}
