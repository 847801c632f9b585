//! Webhooks against the real agent over real HTTP: only a valid signature
//! wakes it, bodies are capped, replays are harmless, payloads stay out of
//! the logs.

#[path = "common/mod.rs"]
mod common;

use std::time::Duration;

use common::{Agent, Shop};
use hmac::{Hmac, Mac};
use sha2::Sha256;

fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

fn post(port: u16, path: &str, headers: &[(&str, &str)], body: Vec<u8>) -> u16 {
    let client = reqwest::blocking::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut req = client
        .post(format!("http://127.0.0.1:{port}{path}"))
        .body(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().map(|r| r.status().as_u16()).unwrap_or(0)
}

#[test]
fn only_a_signed_push_wakes_the_agent_and_replays_are_harmless() {
    let shop = Shop::new(&["1.0.0"; 3]);
    // Polling every hour: only a webhook can make the next commit live soon.
    let agent = Agent::start_with(
        &shop,
        &["--interval", "1h", "--branch", "main"],
        &[("SLUICE_GITHUB_WEBHOOK_SECRET", "s3cret")],
    );
    agent.wait_idle();
    shop.set_versions(&["1.0.0", "1.0.0", "1.1.0"]);
    shop.commit("web 1.1.0");

    let payload = br#"{"ref":"refs/heads/main","marker":"PAYLOAD-MARKER-42"}"#.to_vec();
    let push = |sig: Option<&str>, body: Vec<u8>| {
        let mut h = vec![
            ("x-github-event", "push"),
            ("content-type", "application/json"),
        ];
        if let Some(s) = sig {
            h.push(("x-hub-signature-256", s));
        }
        post(agent.port, "/webhook/github", &h, body)
    };
    assert_eq!(push(None, payload.clone()), 401);
    assert_eq!(push(Some(&sign("wrong", &payload)), payload.clone()), 401);
    assert_eq!(push(Some("sha256=zz"), payload.clone()), 401);
    assert_eq!(
        push(Some(&sign("s3cret", &payload)), vec![b'x'; 2 << 20]),
        413
    );
    // A provider with no secret configured is refused.
    assert_eq!(
        post(
            agent.port,
            "/webhook/gitlab",
            &[
                ("x-gitlab-token", "anything"),
                ("x-gitlab-event", "Push Hook")
            ],
            payload.clone()
        ),
        403
    );
    // Well-formed JSON with mistyped fields: accepted, no panic, no wake for another branch.
    let odd = br#"{"ref":42}"#.to_vec();
    assert_eq!(push(Some(&sign("s3cret", &odd)), odd), 202);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        shop.get_json("web", "/")["version"],
        "1.0.0",
        "a refused webhook woke the agent"
    );

    assert_eq!(push(Some(&sign("s3cret", &payload)), payload.clone()), 202);
    shop.wait_version("web", "1.1.0", Duration::from_secs(20));
    agent.wait_idle_on(&shop.head());
    let deploys = agent.status()["history"].as_array().unwrap().len();
    // The same delivery again: a refresh with nothing new.
    assert_eq!(push(Some(&sign("s3cret", &payload)), payload.clone()), 202);
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(agent.status()["history"].as_array().unwrap().len(), deploys);
    assert!(!agent.log().contains("PAYLOAD-MARKER-42"), "payload logged");
    assert!(agent.log().contains("webhook refused"));
}
