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

/// The analysis as the traffic needs it: a first step long enough
/// for the canary's share of a few hundred requests a second to tell 5%
/// errors or a slow tail from the baseline's noise (`cargo bench --bench
/// canary` prints how often each is caught at which traffic).
const CANARY: &str = "    canary:\n      steps: [{weight: 20, for: 8s}, {weight: 50, for: 3s}, 100]\n      interval: 2s\n    analysis:\n      minRequests: 50\n";

/// Baseline-like noise for every catalog release: each request fails with
/// probability 0.5%, latency 10 ms plus exponential jitter of mean 5 ms;
/// seeded, so a release serves the same sequence each run.
const NOISE: [(&str, &str); 4] = [
    ("DEMO_ERROR_RATE", "0.005"),
    ("DEMO_LATENCY_MS", "10"),
    ("DEMO_LATENCY_JITTER_MS", "5"),
    ("DEMO_SEED", "1"),
];

/// Sets catalog's environment variables, replacing a value already set.
fn set_env(shop: &Shop, vars: &[(&str, &str)]) {
    let rel = "services/catalog/catalog.yaml";
    let path = shop.repo().join(rel);
    let mut text = std::fs::read_to_string(&path).unwrap();
    for (k, v) in vars {
        let line = format!("    {k}: \"{v}\"\n");
        match text.find(&format!("    {k}: ")) {
            Some(at) => {
                let end = at + text[at..].find('\n').unwrap() + 1;
                text.replace_range(at..end, &line);
            }
            None => text = text.replacen("  env:\n", &format!("  env:\n{line}"), 1),
        }
    }
    std::fs::write(path, text).unwrap();
}

/// A shop with baseline-like noise on catalog, rolled out with `CANARY`
/// (`first` replacing the first step).
fn noisy_shop(first: &str) -> Shop {
    let shop = Shop::new(&["1.0.0"; 3]);
    set_env(&shop, &NOISE);
    let settings = CANARY.replace("{weight: 20, for: 8s}", first);
    shop.edit(
        "sluice.yaml",
        "  catalog:\n    path: services/catalog\n",
        &format!("  catalog:\n    path: services/catalog\n    strategy: canary\n    criticality: critical\n    soak: 0s\n{settings}"),
    );
    shop.commit("catalog rolls out as a canary; noisy like a real service");
    let first = shop.sluice(&["apply"]);
    assert_eq!(first.code, 0, "{}", first.all());
    shop
}

/// Releases catalog 2.0.0 with these environment variables changed (and a
/// seed of its own).
fn release_with(shop: &Shop, vars: &[(&str, &str)]) -> String {
    shop.set_versions(&["2.0.0", "1.0.0", "1.0.0"]);
    set_env(shop, &[("DEMO_SEED", "2")]);
    set_env(shop, vars);
    shop.commit("catalog 2.0.0")
}

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

/// Rolls the release out under load (4 client loops); the stopped
/// rollout's decision, with its verdicts, and what the clients saw.
fn stopped(shop: &Shop) -> (Value, Tally) {
    let load = Load::start(shop.ports["catalog"], 4, Duration::ZERO);
    let out = shop.sluice(&["apply"]);
    let tally = load.stop();
    assert_eq!(out.code, 1, "the rollout must be reverted: {}", out.all());
    (last_deploy(shop), tally)
}

/// The rollout stopped at its first step on `metric`, traffic back on the
/// baseline, no request lost.
fn stopped_at_first_step(entry: &Value, tally: &Tally, metric: &str) {
    let d = &entry["decision"];
    assert_eq!(d["gate"], format!("canary analysis: {metric}"), "{entry:#}");
    assert!(d["restoredMs"].as_u64().is_some(), "{entry:#}");
    let v = verdicts(entry);
    assert!(v.iter().all(|(step, w, _)| *step == 1 && *w == 20), "{v:?}");
    assert_eq!(v.last().map(|x| x.2.as_str()), Some("fail"), "{v:?}");
    assert_eq!(tally.lost, 0, "{tally:?}");
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
    // Any answer, a noisy baseline's 500s included, names its version.
    for _ in 0..30 {
        let (_, body) = shop.get("catalog", "/").expect("catalog answers");
        let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        assert_eq!(
            v["version"], "1.0.0",
            "traffic not back on the baseline: {body}"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while catalog_versions(shop) != ["1.0.0"] && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(catalog_versions(shop), ["1.0.0"], "the canary still runs");
}

#[test]
fn a_release_with_5_percent_errors_is_stopped_at_the_first_step() {
    let shop = noisy_shop("{weight: 20, for: 8s}");
    release_with(&shop, &[("DEMO_ERROR_RATE", "0.05")]);
    let (entry, tally) = stopped(&shop);
    stopped_at_first_step(&entry, &tally, "error-rate");
    let m = entry["decision"]["measurement"].as_str().unwrap();
    assert!(m.contains("error rate") && m.contains("vs baseline"), "{m}");
    // The clients saw the canary's errors.
    assert!(
        tally.failed.get("2.0.0").is_some_and(|n| *n >= 5),
        "{tally:?}"
    );
    all_on_baseline(&shop);
    let text = shop.sluice(&["status"]).stdout;
    assert!(
        text.contains("all traffic back on the baseline in"),
        "{text}"
    );
    // One wave, numbered the same in the record and the text; the DORA
    // line's figures share one denominator.
    assert_eq!(entry["decision"]["wave"], 1, "{entry:#}");
    assert!(
        text.contains("Last abort: wave 1, gate canary analysis: error-rate"),
        "{text}"
    );
    assert!(
        text.contains("DORA: 2 deployments (1 succeeded, 1 failed;")
            && text.contains("change failure rate 50% (1 of 2)"),
        "{text}"
    );
}

#[test]
fn a_release_200ms_slower_is_stopped_at_the_first_step() {
    let shop = noisy_shop("{weight: 20, for: 8s}");
    release_with(&shop, &[("DEMO_LATENCY_MS", "210")]);
    let (entry, tally) = stopped(&shop);
    let gate = entry["decision"]["gate"].as_str().unwrap_or("").to_string();
    let metric = gate.trim_start_matches("canary analysis: ");
    assert!(
        ["latency-p95", "latency-p99"].contains(&metric),
        "{entry:#}"
    );
    stopped_at_first_step(&entry, &tally, metric);
    all_on_baseline(&shop);
}

#[test]
fn a_slow_tail_of_2_percent_is_stopped_at_the_first_step_on_p99() {
    // 2% of requests 400 ms slower: the median and p95 do not move, p99
    // does. The first step is longer: a 2% tail takes a thousand canary
    // requests or so to tell from noise.
    let shop = noisy_shop("{weight: 20, for: 20s}");
    release_with(
        &shop,
        &[("DEMO_SLOW_SHARE", "0.02"), ("DEMO_SLOW_MS", "400")],
    );
    let (entry, tally) = stopped(&shop);
    stopped_at_first_step(&entry, &tally, "latency-p99");
    let m = entry["decision"]["measurement"].as_str().unwrap();
    assert!(m.starts_with("p99 "), "{m}");
    all_on_baseline(&shop);
}

#[test]
fn errors_that_start_mid_step_are_stopped_in_that_step() {
    // Clean for 6 s after the canary starts, then 10% errors: judged on
    // the windows since they started, not diluted by the clean part.
    let shop = noisy_shop("{weight: 20, for: 20s}");
    release_with(
        &shop,
        &[("DEMO_ERROR_RATE", "0.1"), ("DEMO_ERRORS_AFTER_MS", "6000")],
    );
    let (entry, tally) = stopped(&shop);
    stopped_at_first_step(&entry, &tally, "error-rate");
    // Not before the onset: the failing verdict counts several seconds of
    // the canary's traffic in the step (about 40 requests a second).
    let last = entry["analysis"].as_array().and_then(|a| a.last()).unwrap();
    assert!(
        last["canary"]["requests"].as_u64().unwrap() >= 150,
        "{last:#}"
    );
    all_on_baseline(&shop);
}

#[test]
fn a_release_that_exits_at_start_fails_after_its_third_exit() {
    let shop = noisy_shop("{weight: 20, for: 8s}");
    release_with(&shop, &[("DEMO_FAIL_START", "true")]);
    let out = shop.sluice(&["apply"]);
    assert_eq!(out.code, 1, "{}", out.all());
    let entry = last_deploy(&shop);
    let d = &entry["decision"];
    assert_eq!(d["gate"], "canary analysis: start", "{entry:#}");
    let m = d["measurement"].as_str().unwrap();
    // The policy's three exits, not the readiness timeout; the exit status
    // and the release's own last words.
    assert!(m.contains("exited 3 time(s) while starting"), "{m}");
    assert!(m.contains("exit status: 1") || m.contains("code 1"), "{m}");
    assert!(m.contains("failing at start as asked"), "{m}");
    all_on_baseline(&shop);
}

#[test]
fn a_release_that_crashes_after_it_was_ready_fails_as_a_crash() {
    let shop = noisy_shop("{weight: 20, for: 20s}");
    release_with(&shop, &[("DEMO_CRASH_AFTER_MS", "3000")]);
    let (entry, _) = stopped(&shop);
    let d = &entry["decision"];
    assert_eq!(d["gate"], "canary analysis: crash", "{entry:#}");
    let m = d["measurement"].as_str().unwrap();
    assert!(m.contains("exited after it was ready"), "{m}");
    assert!(m.contains("crashing as asked"), "{m}");
    all_on_baseline(&shop);
}

#[test]
fn a_good_release_promotes_through_every_step() {
    // Baseline-like noise in both releases: nothing changed but the
    // version, and nothing is aborted.
    let shop = noisy_shop("{weight: 20, for: 8s}");
    release_with(&shop, &[]);
    let load = Load::start(shop.ports["catalog"], 4, Duration::ZERO);
    let out = shop.sluice(&["apply"]);
    std::thread::sleep(Duration::from_millis(1000));
    let tally = load.stop();
    assert_eq!(out.code, 0, "{}", out.all());
    let entry = last_deploy(&shop);
    assert_eq!(entry["outcome"], "succeeded");
    let v = verdicts(&entry);
    // One passing verdict per judged step (20%, 50%); then 100% promotes.
    let passed: Vec<(u64, u64)> = v
        .iter()
        .filter(|x| x.2 == "pass")
        .map(|x| (x.0, x.1))
        .collect();
    assert_eq!(passed, [(1, 20), (2, 50)], "{v:?}");
    assert!(tally.ok.get("2.0.0").is_some_and(|n| *n > 200), "{tally:?}");
    assert_eq!(tally.lost, 0, "{tally:?}");
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
        "    canary:\n      steps: [{weight: 20, for: 10s}, {weight: 50, for: 3s}, 100]\n      interval: 3s\n    analysis:\n      minRequests: 20\n",
    );
    let admin = std::fs::read_to_string(shop.state().join("host/local/router.addr"))
        .expect("the router's admin address");
    let prom = Prometheus::start(admin.trim());
    let url = format!("http://127.0.0.1:{}", prom.port);

    // A bad release is stopped at its first step, judged by Prometheus.
    release(&shop, "    DEMO_ERROR_RATE: \"0.1\"\n");
    let load = Load::start(shop.ports["catalog"], 4, Duration::ZERO);
    let out = shop.sluice(&["apply", "--prometheus-url", &url]);
    load.stop();
    assert_eq!(out.code, 1, "{}", out.all());
    let entry = last_deploy(&shop);
    assert_eq!(
        entry["decision"]["gate"], "canary analysis: error-rate",
        "{entry:#}"
    );
    assert!(verdicts(&entry).iter().all(|x| x.1 == 20), "{entry:#}");
    assert!(
        out.all().contains(&format!("prometheus at {url}")),
        "the analysis did not use Prometheus: {}",
        out.all()
    );
    all_on_baseline(&shop);

    // A good one promotes through every step.
    shop.edit(
        "services/catalog/catalog.yaml",
        "    DEMO_ERROR_RATE: \"0.1\"\n",
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
    assert_eq!(passed, [20, 50]);
}
