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
    post_text(port, path, headers, body).0
}

/// A GitHub push payload (the fields sluice reads, shaped as GitHub sends
/// them) of `reference` to the repository at `clone_url`.
fn github_push(reference: &str, clone_url: &str) -> Vec<u8> {
    serde_json::json!({
        "ref": reference,
        "marker": "PAYLOAD-MARKER-42",
        "repository": {
            "full_name": "acme/shop",
            "clone_url": clone_url,
            "ssh_url": "git@github.com:acme/shop.git",
            "html_url": "https://github.com/acme/shop",
        },
    })
    .to_string()
    .into_bytes()
}

fn post_text(port: u16, path: &str, headers: &[(&str, &str)], body: Vec<u8>) -> (u16, String) {
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
    match req.send() {
        Ok(r) => (r.status().as_u16(), r.text().unwrap_or_default()),
        Err(_) => (0, String::new()),
    }
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

    let repo = shop.repo().canonicalize().unwrap().display().to_string();
    let payload = github_push("refs/heads/main", &repo);
    let push_text = |sig: Option<&str>, body: Vec<u8>| {
        let mut h = vec![
            ("x-github-event", "push"),
            ("content-type", "application/json"),
        ];
        if let Some(s) = sig {
            h.push(("x-hub-signature-256", s));
        }
        post_text(agent.port, "/webhook/github", &h, body)
    };
    let push = |sig: Option<&str>, body: Vec<u8>| push_text(sig, body).0;
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
    // Scoped as Argo CD scopes them: another repository, another branch, a
    // tag: acknowledged, ignored, saying why.
    for (body, why) in [
        (
            github_push("refs/heads/main", "https://github.com/acme/other.git"),
            "another repository",
        ),
        (github_push("refs/heads/feature", &repo), "another branch"),
        (github_push("refs/tags/v1.1.0", &repo), "a tag push"),
    ] {
        let (code, text) = push_text(Some(&sign("s3cret", &body)), body);
        assert_eq!(code, 202);
        assert!(
            text.starts_with("ignored: ") && text.contains(why),
            "{text}"
        );
    }
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

/// GitLab, with no `--branch`: the watched branch is the remote's default
/// (main here), learned from the first poll; a wrong token says so.
#[test]
fn gitlab_pushes_are_scoped_to_the_default_branch_and_a_wrong_token_is_named() {
    let shop = Shop::new(&["1.0.0"; 3]);
    let agent = Agent::start_with(
        &shop,
        &["--interval", "1h"],
        &[("SLUICE_GITLAB_WEBHOOK_TOKEN", "t0ken")],
    );
    agent.wait_idle();
    let repo = shop.repo().canonicalize().unwrap().display().to_string();
    let push = |token: &str, reference: &str| {
        let body = serde_json::json!({
            "object_kind": "push",
            "ref": reference,
            "project": {"path_with_namespace": "acme/shop", "git_http_url": repo, "git_ssh_url": "git@gitlab.example.com:acme/shop.git"},
        })
        .to_string()
        .into_bytes();
        post_text(
            agent.port,
            "/webhook/gitlab",
            &[("x-gitlab-token", token), ("x-gitlab-event", "Push Hook")],
            body,
        )
    };
    let (code, text) = push("wrong", "refs/heads/main");
    assert_eq!((code, text.trim()), (401, "bad token"));
    let (code, text) = push("t0ken", "refs/heads/dev");
    assert_eq!(code, 202);
    assert!(text.contains("another branch"), "{text}");
    shop.set_versions(&["1.0.0", "1.0.0", "1.1.0"]);
    shop.commit("web 1.1.0");
    let (code, text) = push("t0ken", "refs/heads/main");
    assert_eq!((code, text.trim()), (202, "reconcile requested"));
    shop.wait_version("web", "1.1.0", Duration::from_secs(20));
}
