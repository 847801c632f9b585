//! Canary and blue-green on the host target, end to end: real git, real
//! demo processes, the real router splitting real HTTP traffic from client
//! loops running through it, analysis from the router's counters (and, in
//! `prometheus_as_the_metrics_source`, from a real Prometheus server
//! scraping the router).

#[path = "common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{Prometheus, Shop};
use serde_json::Value;

/// Requests seen by a client loop, by answer.
#[derive(Debug, Default)]
struct Tally {
    /// 200 answers by the version that served them.
    ok: BTreeMap<String, u64>,
    /// Non-200 answers by version ("?" when the body says none).
    failed: BTreeMap<String, u64>,
    /// Connection errors and timeouts: requests lost.
    lost: u64,
    /// Versions of the last 50 answers, oldest first.
    recent: Vec<String>,
}

impl Tally {
    fn merge(&mut self, o: Tally) {
        for (k, v) in o.ok {
            *self.ok.entry(k).or_default() += v;
        }
        for (k, v) in o.failed {
            *self.failed.entry(k).or_default() += v;
        }
        self.lost += o.lost;
        self.recent.extend(o.recent);
    }
}

/// Client loops sending requests through a route until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Tally>>,
}

impl Load {
    /// `threads` loops, each pausing `pause` between requests.
    fn start(port: u16, threads: usize, pause: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..threads)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let client = reqwest::blocking::Client::builder()
                        .timeout(Duration::from_secs(5))
                        .no_proxy()
                        .build()
                        .unwrap();
                    let url = format!("http://127.0.0.1:{port}/");
                    let mut t = Tally::default();
                    while !stop.load(Ordering::Relaxed) {
                        match client.get(&url).send() {
                            Ok(r) => {
                                let code = r.status().as_u16();
                                let v: Value = r.json().unwrap_or(Value::Null);
                                let version = v["version"].as_str().unwrap_or("?").to_string();
                                if code == 200 {
                                    *t.ok.entry(version.clone()).or_default() += 1;
                                } else {
                                    *t.failed.entry(version.clone()).or_default() += 1;
                                }
                                t.recent.push(version);
                                if t.recent.len() > 50 {
                                    t.recent.remove(0);
                                }
                            }
                            Err(_) => t.lost += 1,
                        }
                        std::thread::sleep(pause);
                    }
                    t
                })
            })
            .collect();
        Load { stop, threads }
    }

    fn stop(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Tally::default();
        for t in self.threads {
            all.merge(t.join().unwrap());
        }
        all
    }
}

/// A shop whose catalog rolls out with `strategy` and these settings.
fn shop(strategy: &str, settings: &str) -> Shop {
    let shop = Shop::new(&["1.0.0"; 3]);
    shop.edit(
        "sluice.yaml",
        "  catalog:\n    path: services/catalog\n",
        &format!("  catalog:\n    path: services/catalog\n    strategy: {strategy}\n{settings}"),
    );
    shop.commit("catalog rolls out progressively");
    let first = shop.sluice(&["apply"]);
    assert_eq!(first.code, 0, "{}", first.all());
    shop
}

const CANARY: &str = "    canary:\n      steps: [10, 50, 100]\n      interval: 2s\n    analysis:\n      minRequests: 20\n";

/// Releases catalog 2.0.0 with `env` added to its environment.
fn release(shop: &Shop, env: &str) -> String {
    shop.set_versions(&["2.0.0", "1.0.0", "1.0.0"]);
    if !env.is_empty() {
        shop.edit(
            "services/catalog/catalog.yaml",
            "  env:\n",
            &format!("  env:\n{env}"),
        );
    }
    shop.commit("catalog 2.0.0")
}

fn status(shop: &Shop) -> Value {
    let out = shop.sluice(&["status", "-o", "json"]);
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.all()))
}

fn last_deploy(shop: &Shop) -> Value {
    status(shop)["history"]
        .as_array()
        .and_then(|h| h.iter().rev().find(|e| e["kind"] == "deploy").cloned())
        .expect("a deploy in the history")
}

fn verdicts(entry: &Value) -> Vec<(u64, u64, String)> {
    entry["analysis"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|v| {
                    (
                        v["step"].as_u64().unwrap_or(0),
                        v["weight"].as_u64().unwrap_or(0),
                        v["judgement"]["verdict"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The versions of the catalog demo processes running, sorted.
fn catalog_versions(shop: &Shop) -> Vec<String> {
    let mut v: Vec<String> = common::procs()
        .into_iter()
        .filter(|p| p.cwd.starts_with(shop.tmp.path()) && p.args.iter().any(|a| a == "demo"))
        .filter(|p| {
            p.args
                .windows(2)
                .any(|w| w[0] == "--name" && w[1] == "catalog")
        })
        .filter_map(|p| {
            let env = std::fs::read(format!("/proc/{}/environ", p.pid)).ok()?;
            String::from_utf8_lossy(&env)
                .split('\0')
                .find_map(|kv| kv.strip_prefix("SERVICE_VERSION="))
                .map(str::to_string)
        })
        .collect();
    v.sort();
    v
}

/// After an abort: the next answers all come from the baseline and only
/// the baseline runs.
fn all_on_baseline(shop: &Shop) {
    for _ in 0..30 {
        let v = shop.get_json("catalog", "/");
        assert_eq!(v["version"], "1.0.0", "traffic not back on the baseline");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while catalog_versions(shop) != ["1.0.0"] && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(catalog_versions(shop), ["1.0.0"], "the canary still runs");
}

#[test]
fn a_release_with_5_percent_errors_is_stopped_at_the_first_step() {
    let shop = shop("canary", CANARY);
    release(&shop, "    DEMO_ERROR_RATE: \"0.05\"\n");
    let load = Load::start(shop.ports["catalog"], 2, Duration::from_millis(5));
    let out = shop.sluice(&["apply"]);
    let tally = load.stop();
    assert_eq!(out.code, 1, "the rollout must be reverted: {}", out.all());
    let entry = last_deploy(&shop);
    let d = &entry["decision"];
    assert_eq!(d["gate"], "canary analysis: error-rate", "{entry:#}");
    assert!(d["restoredMs"].as_u64().is_some(), "{entry:#}");
    assert!(
        d["measurement"].as_str().unwrap().contains("error rate"),
        "{d}"
    );
    // Stopped at the first step: every verdict is at 10%, the last a fail.
    let v = verdicts(&entry);
    assert!(v.iter().all(|(step, w, _)| *step == 1 && *w == 10), "{v:?}");
    assert_eq!(v.last().map(|x| x.2.as_str()), Some("fail"), "{v:?}");
    // The clients saw the canary's errors, and never one from the baseline.
    assert!(
        tally.failed.get("2.0.0").is_some_and(|n| *n >= 1),
        "{tally:?}"
    );
    assert_eq!(tally.failed.get("1.0.0"), None, "{tally:?}");
    assert_eq!(tally.lost, 0, "{tally:?}");
    all_on_baseline(&shop);
    let text = shop.sluice(&["status"]).stdout;
    assert!(
        text.contains("all traffic back on the baseline in"),
        "{text}"
    );
}

#[test]
fn a_release_200ms_slower_is_stopped() {
    let shop = shop("canary", CANARY);
    release(&shop, "    DEMO_LATENCY_MS: \"200\"\n");
    let load = Load::start(shop.ports["catalog"], 4, Duration::from_millis(5));
    let out = shop.sluice(&["apply"]);
    let tally = load.stop();
    assert_eq!(out.code, 1, "{}", out.all());
    let entry = last_deploy(&shop);
    let gate = entry["decision"]["gate"].as_str().unwrap_or("").to_string();
    assert!(gate.starts_with("canary analysis: latency-p9"), "{entry:#}");
    assert_eq!(verdicts(&entry).last().map(|x| x.1), Some(10), "{entry:#}");
    assert_eq!(tally.lost, 0, "{tally:?}");
    all_on_baseline(&shop);
}

#[test]
fn a_good_release_promotes_through_every_step() {
    let shop = shop("canary", CANARY);
    release(&shop, "");
    let load = Load::start(shop.ports["catalog"], 2, Duration::from_millis(5));
    let out = shop.sluice(&["apply"]);
    std::thread::sleep(Duration::from_millis(1000));
    let tally = load.stop();
    assert_eq!(out.code, 0, "{}", out.all());
    let entry = last_deploy(&shop);
    assert_eq!(entry["outcome"], "succeeded");
    let v = verdicts(&entry);
    // One passing verdict per judged step (10%, 50%); then 100% promotes.
    let passed: Vec<(u64, u64)> = v
        .iter()
        .filter(|x| x.2 == "pass")
        .map(|x| (x.0, x.1))
        .collect();
    assert_eq!(passed, [(1, 10), (2, 50)], "{v:?}");
    assert!(tally.ok.get("2.0.0").is_some_and(|n| *n > 20), "{tally:?}");
    assert!(tally.failed.is_empty() && tally.lost == 0, "{tally:?}");
    assert!(tally.recent.iter().all(|v| v == "2.0.0"), "{tally:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while catalog_versions(&shop) != ["2.0.0"] && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        catalog_versions(&shop),
        ["2.0.0"],
        "the baseline still runs"
    );
}

#[test]
fn a_blue_green_switch_loses_no_request() {
    let shop = shop(
        "bluegreen",
        "    keepWarm: 2s\n    analysis:\n      minRequests: 20\n",
    );
    // The baseline's record: what blue-green judges the new release by.
    let warm = Load::start(shop.ports["catalog"], 1, Duration::from_millis(5));
    std::thread::sleep(Duration::from_millis(500));
    let before = warm.stop();
    assert!(
        before.ok.get("1.0.0").is_some_and(|n| *n >= 20),
        "{before:?}"
    );
    release(&shop, "");
    let load = Load::start(shop.ports["catalog"], 3, Duration::from_millis(2));
    let out = shop.sluice(&["apply"]);
    std::thread::sleep(Duration::from_millis(1000));
    let tally = load.stop();
    assert_eq!(out.code, 0, "{}", out.all());
    assert_eq!(tally.lost, 0, "requests lost: {tally:?}");
    assert!(tally.failed.is_empty(), "requests failed: {tally:?}");
    assert!(tally.ok.get("1.0.0").is_some_and(|n| *n > 0), "{tally:?}");
    assert!(tally.ok.get("2.0.0").is_some_and(|n| *n > 20), "{tally:?}");
    assert!(tally.recent.iter().all(|v| v == "2.0.0"), "{tally:?}");
    let entry = last_deploy(&shop);
    assert_eq!(
        verdicts(&entry).last().map(|x| (x.1, x.2.clone())),
        Some((100, "pass".to_string())),
        "{entry:#}"
    );
}

#[test]
fn a_low_traffic_service_stays_inconclusive_then_does_what_the_policy_says() {
    // Policy `fail`: no traffic at all, so the first step ends inconclusive
    // and the rollout is aborted.
    let shop = shop(
        "canary",
        "    canary:\n      steps: [50, 100]\n      interval: 1s\n    analysis:\n      minRequests: 20\n      inconclusive: fail\n",
    );
    release(&shop, "");
    let out = shop.sluice(&["apply"]);
    assert_eq!(out.code, 1, "{}", out.all());
    let entry = last_deploy(&shop);
    assert_eq!(entry["decision"]["gate"], "canary analysis: inconclusive");
    assert_eq!(
        verdicts(&entry).last().map(|x| x.2.clone()),
        Some("inconclusive".into())
    );
    all_on_baseline(&shop);

    // Policy `hold`: the step holds while traffic is too low (status shows
    // the running verdicts), and passes once enough arrives.
    shop.edit(
        "sluice.yaml",
        "      inconclusive: fail\n",
        "      inconclusive: hold\n      holdTimeout: 60s\n",
    );
    shop.commit("hold when inconclusive");
    let mut cmd = std::process::Command::new(common::SLUICE);
    cmd.arg("apply").args(shop.flags()).arg("--retry");
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for two inconclusive verdicts in the live status.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Value::Null;
    while Instant::now() < deadline {
        seen = status(&shop)["inProgress"].clone();
        let n = seen["analysis"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|v| v["judgement"]["verdict"] == "inconclusive")
                    .count()
            })
            .unwrap_or(0);
        if n >= 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(seen["traffic"]["weight"], 50, "{seen:#}");
    let text = shop.sluice(&["status"]).stdout;
    assert!(
        text.contains("Traffic: Canary of local/Process/catalog"),
        "{text}"
    );
    assert!(text.contains("inconclusive"), "{text}");
    // Traffic arrives: the held step is decided and the release promotes.
    let load = Load::start(shop.ports["catalog"], 2, Duration::from_millis(5));
    let out = child.wait_with_output().unwrap();
    load.stop();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v = verdicts(&last_deploy(&shop));
    assert!(v.iter().any(|x| x.2 == "inconclusive"), "{v:?}");
    assert_eq!(v.last().map(|x| x.2.as_str()), Some("pass"), "{v:?}");
}

#[test]
fn rolling_replaces_replicas_in_batches_and_loses_no_request() {
    let shop = Shop::new(&["1.0.0"; 3]);
    shop.edit(
        "sluice.yaml",
        "  catalog:\n    path: services/catalog\n",
        "  catalog:\n    path: services/catalog\n    strategy: rolling\n    maxUnavailable: 1\n",
    );
    shop.edit(
        "services/catalog/catalog.yaml",
        "  version:",
        "  replicas: 3\n  version:",
    );
    shop.commit("three catalog replicas, rolled one at a time");
    assert_eq!(shop.sluice(&["apply"]).code, 0);
    assert_eq!(catalog_versions(&shop), ["1.0.0", "1.0.0", "1.0.0"]);
    release(&shop, "");
    let load = Load::start(shop.ports["catalog"], 2, Duration::from_millis(2));
    let out = shop.sluice(&["apply"]);
    std::thread::sleep(Duration::from_millis(1000));
    let tally = load.stop();
    assert_eq!(out.code, 0, "{}", out.all());
    // One replica per batch, three batches.
    let batches: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.contains("rolling batch ready"))
        .collect();
    assert_eq!(batches.len(), 3, "{}", out.stderr);
    assert!(
        batches.iter().all(|l| l.contains("replaced=1")),
        "{batches:?}"
    );
    assert_eq!(tally.lost, 0, "{tally:?}");
    assert!(tally.failed.is_empty(), "{tally:?}");
    // Both releases served while rolling, only the new one after.
    assert!(tally.ok.get("1.0.0").is_some_and(|n| *n > 0), "{tally:?}");
    assert!(tally.recent.iter().all(|v| v == "2.0.0"), "{tally:?}");
    assert_eq!(catalog_versions(&shop), ["2.0.0", "2.0.0", "2.0.0"]);
}

#[test]
fn prometheus_as_the_metrics_source() {
    let shop = shop(
        "canary",
        "    canary:\n      steps: [10, 50, 100]\n      interval: 3s\n    analysis:\n      minRequests: 20\n",
    );
    let admin = std::fs::read_to_string(shop.state().join("host/local/router.addr"))
        .expect("the router's admin address");
    let prom = Prometheus::start(admin.trim());
    let url = format!("http://127.0.0.1:{}", prom.port);

    // A bad release is stopped at its first step, judged by Prometheus.
    release(&shop, "    DEMO_ERROR_RATE: \"0.05\"\n");
    let load = Load::start(shop.ports["catalog"], 2, Duration::from_millis(5));
    let out = shop.sluice(&["apply", "--prometheus-url", &url]);
    load.stop();
    assert_eq!(out.code, 1, "{}", out.all());
    let entry = last_deploy(&shop);
    assert_eq!(
        entry["decision"]["gate"], "canary analysis: error-rate",
        "{entry:#}"
    );
    assert!(verdicts(&entry).iter().all(|x| x.1 == 10), "{entry:#}");
    assert!(
        out.all().contains(&format!("prometheus at {url}")),
        "the analysis did not use Prometheus: {}",
        out.all()
    );
    all_on_baseline(&shop);

    // A good one promotes through every step.
    shop.edit(
        "services/catalog/catalog.yaml",
        "    DEMO_ERROR_RATE: \"0.05\"\n",
        "",
    );
    shop.set_versions(&["2.0.1", "1.0.0", "1.0.0"]);
    shop.commit("catalog 2.0.1");
    let load = Load::start(shop.ports["catalog"], 2, Duration::from_millis(5));
    let out = shop.sluice(&["apply", "--prometheus-url", &url]);
    load.stop();
    assert_eq!(out.code, 0, "{}", out.all());
    let passed: Vec<u64> = verdicts(&last_deploy(&shop))
        .iter()
        .filter(|x| x.2 == "pass")
        .map(|x| x.1)
        .collect();
    assert_eq!(passed, [10, 50]);
}
