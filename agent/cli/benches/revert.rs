//! Time from a failed gate to the previous version serving again, for the
//! three-service shop on the host target (soak excluded: the shop has none).
//!
//! Each run applies 1.0.0, then a 2.0.0 whose last wave (web) never becomes
//! ready; catalog and orders, already on 2.0.0, are reverted. The figure is
//! the decision record's time (the gate failed) to the revert's end (every
//! service back on 1.0.0, ready and routed), cross-checked by a client
//! polling catalog through its route.
//!
//! `cargo bench -p sluice --bench revert`. Prints figures only.

#[path = "../../../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::Shop;

const RUNS: usize = 5;

fn main() {
    let mut figures = Vec::new();
    for run in 0..RUNS {
        let shop = Shop::new(&["1.0.0"; 3]);
        assert_eq!(shop.sluice(&["apply"]).code, 0);
        shop.set_versions(&["2.0.0"; 3]);
        shop.edit(
            "services/web/web.yaml",
            "\"demo\",",
            "\"demo\", \"--never-ready\",",
        );
        shop.commit("bad web");
        // A client watching catalog: when does 1.0.0 serve again?
        let port = shop.ports["catalog"];
        let watcher = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut saw_v2 = false;
            while Instant::now() < deadline {
                if let Ok((200, body)) = common::http_get(port, "/") {
                    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                    match v["version"].as_str() {
                        Some("2.0.0") => saw_v2 = true,
                        Some("1.0.0") if saw_v2 => return Some(chrono::Utc::now()),
                        _ => {}
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            None
        });
        let out = shop.sluice(&["apply"]);
        assert_eq!(out.code, 1, "{}", out.all());
        let back = watcher
            .join()
            .unwrap()
            .expect("catalog never served 1.0.0 again");
        let status: serde_json::Value =
            serde_json::from_str(&shop.sluice(&["status", "-o", "json"]).stdout).unwrap();
        let history = status["history"].as_array().unwrap();
        let failed = history.iter().find(|h| h["outcome"] == "failed").unwrap();
        let revert = history
            .iter()
            .rev()
            .find(|h| h["kind"] == "revert")
            .unwrap();
        let at = |v: &serde_json::Value| {
            chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap())
                .unwrap()
                .with_timezone(&chrono::Utc)
        };
        let gate_failed = at(&failed["decision"]["at"]);
        let reverted = at(&revert["at"]);
        let total = (reverted - gate_failed).num_milliseconds();
        let serving = (back - gate_failed).num_milliseconds();
        println!("run {}: gate failed → revert done {total} ms; → catalog 1.0.0 serving {serving} ms (revert itself {} ms)", run + 1, revert["durationMs"]);
        figures.push(total);
    }
    figures.sort();
    println!(
        "revert after a failed gate, three-service shop, {RUNS} runs: median {} ms, max {} ms",
        figures[RUNS / 2],
        figures[RUNS - 1]
    );
}
