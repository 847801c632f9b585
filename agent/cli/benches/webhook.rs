//! Time from a push webhook arriving to the first wave being applied, on
//! the host shop: the agent polls once an hour, so only the webhook can
//! start the rollout. The first wave here is web's new version, ready and
//! routed; the figure ends when the route serves it.
//!
//! `cargo bench -p sluice --bench webhook`. Prints figures only.

#[path = "../../../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{Agent, Shop};
use hmac::{Hmac, Mac};

const RUNS: usize = 5;

fn main() {
    let shop = Shop::new(&["1.0.0"; 3]);
    let agent = Agent::start_with(
        &shop,
        &["--interval", "1h", "--branch", "main"],
        &[("SLUICE_GITHUB_WEBHOOK_SECRET", "bench")],
    );
    agent.wait_idle();
    let body = br#"{"ref":"refs/heads/main"}"#.to_vec();
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(b"bench").unwrap();
    mac.update(&body);
    let sig = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    let client = reqwest::blocking::Client::builder()
        .no_proxy()
        .build()
        .unwrap();
    let mut figures = Vec::new();
    for run in 1..=RUNS {
        let version = format!("1.0.{run}");
        shop.set_versions(&["1.0.0", "1.0.0", &version]);
        let head = shop.commit(&format!("web {version}"));
        let t0 = Instant::now();
        let code = client
            .post(format!("http://127.0.0.1:{}/webhook/github", agent.port))
            .header("x-github-event", "push")
            .header("x-hub-signature-256", &sig)
            .body(body.clone())
            .send()
            .unwrap()
            .status();
        assert_eq!(code.as_u16(), 202);
        loop {
            if let Ok((200, b)) = common::http_get(shop.ports["web"], "/") {
                if serde_json::from_str::<serde_json::Value>(&b)
                    .is_ok_and(|v| v["version"] == version.as_str())
                {
                    break;
                }
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "never applied");
            std::thread::sleep(Duration::from_millis(2));
        }
        let ms = t0.elapsed().as_secs_f64() * 1000.0;
        println!("run {run}: webhook → first wave serving {ms:.0} ms");
        figures.push(ms);
        agent.wait_idle_on(&head);
    }
    figures.sort_by(|a, b| a.total_cmp(b));
    println!(
        "push webhook → first wave applied, host shop, {RUNS} runs: median {:.0} ms, max {:.0} ms",
        figures[RUNS / 2],
        figures[RUNS - 1]
    );
}
