//! `sluice report` against a local HTTP server that implements the GitHub
//! and GitLab REST endpoints sluice uses (list / create / update comment,
//! commit status). The fake models: paging by `page`, ids assigned on
//! create, PATCH (GitHub) and PUT (GitLab) updates, and token headers. It
//! does not model rate limits or permissions.

#[path = "common/mod.rs"]
mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, Uri};
use axum::Router;
use common::{git, run_with_timeout, Shop, SLUICE};
use serde_json::{json, Value};

#[derive(Default)]
struct Fake {
    requests: Vec<(String, String, Value, String)>,
    comments: Vec<(u64, String)>,
}

fn serve() -> (u16, Arc<Mutex<Fake>>, std::thread::JoinHandle<()>) {
    let fake = Arc::new(Mutex::new(Fake::default()));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let state = fake.clone();
    let handle = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let app = Router::new().fallback(
                move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                    let state = state.clone();
                    async move { handle(&state, method, uri, headers, body) }
                },
            );
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let _ =
                tokio::time::timeout(Duration::from_secs(120), axum::serve(listener, app)).await;
        });
    });
    (port, fake, handle)
}

fn handle(
    state: &Mutex<Fake>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> axum::Json<Value> {
    let mut f = state.lock().unwrap();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let auth = headers
        .get("authorization")
        .or_else(|| headers.get("private-token"))
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let path = uri.path().to_string();
    f.requests
        .push((method.to_string(), path.clone(), body.clone(), auth));
    let list = path.ends_with("/comments") || path.ends_with("/notes");
    let reply = match method.as_str() {
        "GET" if list => {
            let page: usize = uri
                .query()
                .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("page=")))
                .and_then(|p| p.parse().ok())
                .unwrap_or(1);
            let all: Vec<Value> = f
                .comments
                .iter()
                .map(|(id, b)| json!({"id": id, "body": b}))
                .collect();
            json!(all
                .into_iter()
                .skip((page - 1) * 100)
                .take(100)
                .collect::<Vec<_>>())
        }
        "POST" if list => {
            let id = f.comments.len() as u64 + 1;
            f.comments
                .push((id, body["body"].as_str().unwrap_or("").to_string()));
            json!({"id": id})
        }
        "PATCH" | "PUT" => {
            let id: u64 = path
                .rsplit('/')
                .next()
                .and_then(|i| i.parse().ok())
                .unwrap_or(0);
            if let Some(c) = f.comments.iter_mut().find(|(i, _)| *i == id) {
                c.1 = body["body"].as_str().unwrap_or("").to_string();
            }
            json!({"id": id})
        }
        "POST" if path.ends_with("/pulls") => {
            json!({"number": 8, "html_url": "http://forge.test/acme/shop/pull/8"})
        }
        _ => json!({"ok": true}),
    };
    axum::Json(reply)
}

fn report(shop: &Shop, forge: &str, port: u16) -> common::Output {
    let mut cmd = std::process::Command::new(SLUICE);
    cmd.arg("report")
        .args(shop.flags())
        .args([
            "--forge",
            forge,
            "--forge-api",
            &format!("http://127.0.0.1:{port}"),
            "--project",
            "acme/shop",
        ])
        .args(["--pr", "7", "--base", "main", "--head", "feature"])
        .env("SLUICE_FORGE_TOKEN", "tok-s3cret-123");
    run_with_timeout(cmd, Duration::from_secs(60))
}

fn feature_branch(shop: &Shop, version: &str) {
    git(&shop.repo(), &["checkout", "-q", "-B", "feature", "main"]);
    shop.set_versions(&["1.0.0", "1.0.0", version]);
    shop.commit(&format!("web {version}"));
    git(&shop.repo(), &["checkout", "-q", "main"]);
}

#[test]
fn one_sticky_comment_per_pull_request_updated_in_place_with_a_commit_status() {
    for (forge, update, status_path, auth) in [
        (
            "github",
            "PATCH",
            "/repos/acme/shop/statuses/",
            "Bearer tok-s3cret-123",
        ),
        (
            "gitlab",
            "PUT",
            "/projects/acme%2Fshop/statuses/",
            "tok-s3cret-123",
        ),
    ] {
        let shop = Shop::new(&["1.0.0"; 3]);
        assert_eq!(shop.sluice(&["apply"]).code, 0);
        let (port, fake, _server) = serve();
        feature_branch(&shop, "1.1.0");
        let out = report(&shop, forge, port);
        assert_eq!(out.code, 0, "{forge}: {}", out.all());
        assert!(!out.all().contains("tok-s3cret"), "token printed");
        feature_branch(&shop, "1.2.0");
        let head = git(&shop.repo(), &["rev-parse", "feature"]);
        let out = report(&shop, forge, port);
        assert_eq!(out.code, 0, "{forge}: {}", out.all());

        let f = fake.lock().unwrap();
        assert_eq!(f.comments.len(), 1, "{forge}: one sticky comment");
        let body = &f.comments[0].1;
        assert!(
            body.starts_with("<!-- sluice-report -->")
                && body.contains("-  version: 1.0.0\n+  version: 1.2.0"),
            "{forge}: {body}"
        );
        let methods: Vec<&str> = f.requests.iter().map(|r| r.0.as_str()).collect();
        assert!(
            methods.contains(&update),
            "{forge}: no in-place update: {methods:?}"
        );
        assert!(
            f.requests.iter().all(|r| r.3 == auth),
            "{forge}: token header"
        );
        let statuses: Vec<&Value> = f
            .requests
            .iter()
            .filter(|r| r.1.starts_with(status_path))
            .map(|r| &r.2)
            .collect();
        let states: Vec<&str> = statuses
            .iter()
            .map(|s| s["state"].as_str().unwrap())
            .collect();
        assert_eq!(
            states,
            ["pending", "success", "pending", "success"],
            "{forge}"
        );
        assert!(
            f.requests.iter().any(|r| r.1.ends_with(&head)),
            "{forge}: status not on the head commit"
        );
    }
}

#[test]
fn a_failed_rollout_opens_a_pull_request_that_reverts_it_in_git() {
    let shop = Shop::new(&["1.0.0"; 3]);
    // A real git server that accepts pushes, on 127.0.0.1.
    let daemon = common::GitDaemon::start(shop.tmp.path());
    let url = daemon.url("repo");
    let (port, fake, _server) = serve();
    let apply = || {
        let mut cmd = std::process::Command::new(SLUICE);
        cmd.args(["apply", "--repo", &url, "--allow-insecure"])
            .args([
                "--state-dir",
                &shop.state().display().to_string(),
                "--file-root",
                &shop.file_root().display().to_string(),
            ])
            .args([
                "--forge",
                "github",
                "--forge-api",
                &format!("http://127.0.0.1:{port}"),
                "--project",
                "acme/shop",
            ])
            .env("SLUICE_FORGE_TOKEN", "tok-s3cret-123");
        run_with_timeout(cmd, Duration::from_secs(120))
    };
    assert_eq!(apply().code, 0);
    let good = shop.head();
    shop.set_versions(&["2.0.0"; 3]);
    shop.edit(
        "services/orders/orders.yaml",
        "\"demo\",",
        "\"demo\", \"--never-ready\",",
    );
    let bad = shop.commit("bad orders");
    let out = apply();
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(!out.all().contains("tok-s3cret"), "token printed");

    let branch = format!("sluice/revert-{}", &bad[..10]);
    let f = fake.lock().unwrap();
    let pr = f
        .requests
        .iter()
        .find(|r| r.1 == "/repos/acme/shop/pulls")
        .unwrap_or_else(|| panic!("no pull request opened\n{}", out.all()));
    assert_eq!(pr.2["head"], branch.as_str());
    assert_eq!(pr.2["base"], "main");
    let body = pr.2["body"].as_str().unwrap();
    assert!(
        body.contains(&bad) && body.contains("Decision: wave 2, gate apply"),
        "{body}"
    );
    // The branch holds exactly the last good state.
    let diff = git(&shop.repo(), &["diff", "--stat", &good, &branch]);
    assert!(diff.is_empty(), "{diff}");
    let status: Value =
        serde_json::from_str(&shop.sluice(&["status", "-o", "json"]).stdout).unwrap();
    assert_eq!(
        status["targets"]["local"]["failed"]["revertPr"],
        "http://forge.test/acme/shop/pull/8"
    );
}

#[test]
fn a_pull_request_webhook_posts_its_report() {
    use hmac::{Hmac, Mac};
    let shop = Shop::new(&["1.0.0"; 3]);
    let (port, fake, _server) = serve();
    let agent = common::Agent::start_with(
        &shop,
        &[
            "--interval",
            "1h",
            "--forge",
            "github",
            "--forge-api",
            &format!("http://127.0.0.1:{port}"),
            "--project",
            "acme/shop",
        ],
        &[
            ("SLUICE_GITHUB_WEBHOOK_SECRET", "hook"),
            ("SLUICE_FORGE_TOKEN", "tok-s3cret-123"),
        ],
    );
    agent.wait_idle();
    feature_branch(&shop, "1.3.0");
    git(&shop.repo(), &["update-ref", "refs/pull/7/head", "feature"]);
    let body = br#"{"action":"synchronize","number":7,"pull_request":{"base":{"ref":"main"}}}"#;
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(b"hook").unwrap();
    mac.update(body);
    let sig = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    let client = reqwest::blocking::Client::builder()
        .no_proxy()
        .build()
        .unwrap();
    let code = client
        .post(format!("http://127.0.0.1:{}/webhook/github", agent.port))
        .header("x-github-event", "pull_request")
        .header("x-hub-signature-256", sig)
        .body(body.to_vec())
        .send()
        .unwrap()
        .status();
    assert_eq!(code.as_u16(), 202);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let posted = fake.lock().unwrap().comments.first().map(|c| c.1.clone());
        if let Some(b) = posted {
            assert!(b.contains("-  version: 1.0.0\n+  version: 1.3.0"), "{b}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no report posted\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!agent.log().contains("tok-s3cret"), "token logged");
}
