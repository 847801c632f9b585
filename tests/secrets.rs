//! Secret values planted in manifests (an env var named like a password, a
//! File marked secret, and one that fails to apply) appear in no plan,
//! report, drift report, status, error, log line or metric.

#[path = "common/mod.rs"]
mod common;

use common::{git, http_get, Agent, Shop};

const CANARY: &str = "S3CRET-canary";

fn secret_file(name: &str, path: &str, value: &str) -> String {
    format!("apiVersion: sluice.dev/v1\nkind: File\nmetadata:\n  name: {name}\nspec:\n  path: {path}\n  content: {value:?}\n  secret: true\n")
}

#[test]
fn planted_secrets_never_reach_an_output() {
    let shop = Shop::new(&["1.0.0"; 3]);
    shop.edit(
        "services/orders/orders.yaml",
        "    SERVICE_VERSION:",
        &format!("    DB_PASSWORD: \"{CANARY}-env-1\"\n    SERVICE_VERSION:"),
    );
    shop.write(
        "services/orders/secret.yaml",
        &secret_file(
            "orders-secret",
            "orders.secret",
            &format!("{CANARY}-file-1"),
        ),
    );
    shop.commit("secrets");
    let mut seen = Vec::new();
    let apply = shop.sluice(&["apply"]);
    assert_eq!(apply.code, 0, "{}", apply.all());
    seen.push(apply.all());

    // New values: plans, reports and drift show that they change, not what to.
    let base = shop.head();
    shop.edit(
        "services/orders/orders.yaml",
        &format!("{CANARY}-env-1"),
        &format!("{CANARY}-env-2"),
    );
    shop.write(
        "services/orders/secret.yaml",
        &secret_file(
            "orders-secret",
            "orders.secret",
            &format!("{CANARY}-file-2"),
        ),
    );
    shop.commit("rotate");
    git(&shop.repo(), &["branch", "-f", "rotated", "HEAD"]);
    for args in [
        vec!["plan"],
        vec!["plan", "-o", "json"],
        vec![
            "plan", "--base", &base, "--head", "rotated", "-o", "markdown",
        ],
        vec!["plan", "--base", &base, "--head", "rotated", "-o", "json"],
    ] {
        let out = shop.sluice(&args);
        assert_eq!(out.code, 0, "{args:?}: {}", out.all());
        seen.push(out.all());
    }
    assert!(
        seen[1].contains("spec.env.DB_PASSWORD") && seen[1].contains("(redacted)"),
        "{}",
        seen[1]
    );
    assert!(seen[1].contains("spec.content"), "{}", seen[1]);

    // Drift of a secret file edited by hand.
    std::fs::write(
        shop.file_root().join("local/orders.secret"),
        format!("{CANARY}-by-hand"),
    )
    .unwrap();
    for args in [
        vec!["drift"],
        vec!["drift", "-o", "json"],
        vec!["drift", "-o", "markdown"],
        vec!["status"],
        vec!["status", "-o", "json"],
    ] {
        seen.push(shop.sluice(&args).all());
    }
    assert!(
        seen.iter()
            .any(|o| o.contains("modified local/File/orders-secret")),
        "drift not reported"
    );

    // One that fails to apply: its error names the resource, not the value.
    std::os::unix::fs::symlink("/tmp", shop.file_root().join("local/out")).unwrap();
    shop.write(
        "services/web/bad-secret.yaml",
        &secret_file("bad-secret", "out/leak", &format!("{CANARY}-invalid")),
    );
    shop.commit("a secret that cannot be written");
    let failed = shop.sluice(&["apply"]);
    assert_eq!(failed.code, 1, "{}", failed.all());
    assert!(failed.all().contains("bad-secret"), "{}", failed.all());
    seen.push(failed.all());

    // The agent's logs and metrics.
    let agent = Agent::start(&shop, "1s");
    std::thread::sleep(std::time::Duration::from_secs(2));
    if let Ok((_, metrics)) = http_get(agent.port, "/metrics") {
        seen.push(metrics);
    }
    if let Ok((_, status)) = http_get(agent.port, "/status") {
        seen.push(status);
    }
    seen.push(agent.log());

    for (i, out) in seen.iter().enumerate() {
        assert!(!out.contains(CANARY), "output {i} leaks a secret:\n{out}");
    }
}
