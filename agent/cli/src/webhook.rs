//! Webhooks from GitHub and GitLab: a push wakes the loop at once.
//!
//! # Guarantees
//! - The body is capped before anything else is done with it; the
//!   signature is checked over the bounded body, and only then is it parsed.
//! - A provider with no secret configured is refused; a missing or bad
//!   signature gets 401 and is logged without the payload.
//! - Comparisons are constant-time.
//! - A webhook carries no desired state: it only triggers a refresh from
//!   git, so a replayed delivery is harmless.

use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// Bodies above this size are refused (GitHub caps payloads at 25 MiB;
/// pushes that matter here are far smaller).
pub const MAX_BODY: usize = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Provider {
    GitHub,
    GitLab,
}

/// Why a delivery was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("no secret configured for this provider")]
    NotConfigured,
    #[error("missing signature")]
    MissingSignature,
    #[error("bad signature")]
    BadSignature,
    /// GitLab sends a shared token, not a signature.
    #[error("bad token")]
    BadToken,
}

/// What a verified delivery asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// A push of `reference` to the repositories the payload names (its
    /// clone, SSH and web URLs).
    Push {
        reference: Option<Ref>,
        repositories: Vec<String>,
    },
    /// A pull/merge request opened or updated: its number, base branch and
    /// the ref its head can be fetched from.
    PullRequest {
        number: u64,
        base: String,
        head: String,
    },
    /// Anything else (ping, issues, ...): acknowledged, ignored.
    Other(String),
}

/// Verifies a GitHub delivery: `X-Hub-Signature-256: sha256=<hex>` is the
/// HMAC-SHA256 of the body with the shared secret.
pub fn verify_github(
    secret: Option<&[u8]>,
    signature: Option<&str>,
    body: &[u8],
) -> Result<(), Refused> {
    let secret = secret
        .filter(|s| !s.is_empty())
        .ok_or(Refused::NotConfigured)?;
    let signature = signature.ok_or(Refused::MissingSignature)?;
    let hex_sig = signature
        .strip_prefix("sha256=")
        .ok_or(Refused::BadSignature)?;
    let expected = hex::decode(hex_sig).map_err(|_| Refused::BadSignature)?;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).map_err(|_| Refused::NotConfigured)?;
    mac.update(body);
    mac.verify_slice(&expected)
        .map_err(|_| Refused::BadSignature)
}

/// Verifies a GitLab delivery: `X-Gitlab-Token` equals the shared token.
pub fn verify_gitlab(token: Option<&[u8]>, header: Option<&str>) -> Result<(), Refused> {
    let token = token
        .filter(|s| !s.is_empty())
        .ok_or(Refused::NotConfigured)?;
    let header = header.ok_or(Refused::MissingSignature)?;
    if bool::from(header.as_bytes().ct_eq(token)) {
        Ok(())
    } else {
        Err(Refused::BadToken)
    }
}

/// What a push updated.
#[derive(Debug, PartialEq, Eq)]
pub enum Ref {
    Branch(String),
    Tag(String),
    Other(String),
}

#[derive(Deserialize)]
struct PushBody {
    #[serde(rename = "ref")]
    reference: Option<String>,
    /// GitHub's `repository`; GitLab sends both `repository` and `project`.
    repository: Option<RepoUrls>,
    project: Option<RepoUrls>,
}

/// Every address a provider gives a repository under.
#[derive(Deserialize)]
struct RepoUrls {
    clone_url: Option<String>,
    ssh_url: Option<String>,
    html_url: Option<String>,
    git_url: Option<String>,
    git_http_url: Option<String>,
    git_ssh_url: Option<String>,
    web_url: Option<String>,
    url: Option<String>,
    homepage: Option<String>,
}

/// `https://GitHub.com/Acme/Shop.git`, `git@github.com:acme/shop.git` and
/// `ssh://git@github.com/acme/shop` as one key: host and path, lowercase,
/// without scheme, user, port of ssh, `.git` or trailing slash. A local
/// path stays a path.
pub fn repository_key(url: &str) -> String {
    let u = url.trim().trim_end_matches('/');
    let u = u.strip_suffix(".git").unwrap_or(u);
    let rest = match u.split_once("://") {
        Some(("file", rest)) => return rest.to_string(),
        Some((_, rest)) => rest.to_string(),
        // scp form: [user@]host:path
        None if !u.starts_with('/') && u.contains(':') => u.replacen(':', "/", 1),
        None => return u.to_string(),
    };
    let rest = rest.rsplit_once('@').map_or(rest.as_str(), |(_, r)| r);
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let host = host.split(':').next().unwrap_or(host);
    format!("{}/{}", host, path).to_lowercase()
}

/// Whether the payload's addresses include `watched` (`--repo`).
pub fn names_repository(repositories: &[String], watched: &str) -> bool {
    let want = repository_key(watched);
    repositories.iter().any(|r| repository_key(r) == want)
}

#[derive(Deserialize)]
struct GitHubPr {
    action: Option<String>,
    number: Option<u64>,
    pull_request: Option<GitHubPrBody>,
}

#[derive(Deserialize)]
struct GitHubPrBody {
    base: Option<GitHubRef>,
}

#[derive(Deserialize)]
struct GitHubRef {
    #[serde(rename = "ref")]
    reference: Option<String>,
}

#[derive(Deserialize)]
struct GitLabMr {
    object_attributes: Option<GitLabMrAttrs>,
}

#[derive(Deserialize)]
struct GitLabMrAttrs {
    iid: Option<u64>,
    target_branch: Option<String>,
    action: Option<String>,
}

/// Reads the event from a verified body. Missing or mistyped fields give
/// `Other`, never a panic.
pub fn parse(provider: Provider, event: &str, body: &[u8]) -> Event {
    let push = matches!(
        (provider, event),
        (Provider::GitHub, "push") | (Provider::GitLab, "Push Hook")
    );
    let pr = matches!(
        (provider, event),
        (Provider::GitHub, "pull_request") | (Provider::GitLab, "Merge Request Hook")
    );
    if push {
        let Ok(b) = serde_json::from_slice::<PushBody>(body) else {
            return Event::Push {
                reference: None,
                repositories: Vec::new(),
            };
        };
        let reference = b.reference.map(|r| {
            if let Some(branch) = r.strip_prefix("refs/heads/") {
                Ref::Branch(branch.to_string())
            } else if let Some(tag) = r.strip_prefix("refs/tags/") {
                Ref::Tag(tag.to_string())
            } else {
                Ref::Other(r.chars().take(200).collect())
            }
        });
        let repositories = [b.repository, b.project]
            .into_iter()
            .flatten()
            .flat_map(|r| {
                [
                    r.clone_url,
                    r.ssh_url,
                    r.html_url,
                    r.git_url,
                    r.git_http_url,
                    r.git_ssh_url,
                    r.web_url,
                    r.url,
                    r.homepage,
                ]
            })
            .flatten()
            .collect();
        return Event::Push {
            reference,
            repositories,
        };
    }
    if pr {
        let parsed = match provider {
            Provider::GitHub => serde_json::from_slice::<GitHubPr>(body).ok().and_then(|b| {
                let opened = matches!(
                    b.action.as_deref(),
                    Some("opened" | "synchronize" | "reopened")
                );
                let base = b.pull_request?.base?.reference?;
                let n = b.number?;
                opened.then(|| (n, base, format!("refs/pull/{n}/head")))
            }),
            Provider::GitLab => serde_json::from_slice::<GitLabMr>(body).ok().and_then(|b| {
                let a = b.object_attributes?;
                let opened = matches!(a.action.as_deref(), Some("open" | "update" | "reopen"));
                let n = a.iid?;
                opened.then(|| {
                    (
                        n,
                        a.target_branch.unwrap_or_default(),
                        format!("refs/merge-requests/{n}/head"),
                    )
                })
            }),
        };
        if let Some((number, base, head)) = parsed.filter(|(_, base, _)| !base.is_empty()) {
            return Event::PullRequest { number, base, head };
        }
    }
    Event::Other(event.chars().take(64).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(secret: &[u8], body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
        mac.update(body);
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    }

    #[test]
    fn github_signatures_are_checked() {
        let body = br#"{"ref":"refs/heads/main"}"#;
        let good = sign(b"s3cret", body);
        assert_eq!(verify_github(Some(b"s3cret"), Some(&good), body), Ok(()));
        assert_eq!(
            verify_github(Some(b"other"), Some(&good), body),
            Err(Refused::BadSignature)
        );
        assert_eq!(
            verify_github(Some(b"s3cret"), Some(&good), b"{}"),
            Err(Refused::BadSignature)
        );
        assert_eq!(
            verify_github(Some(b"s3cret"), None, body),
            Err(Refused::MissingSignature)
        );
        assert_eq!(
            verify_github(Some(b"s3cret"), Some("sha1=abc"), body),
            Err(Refused::BadSignature)
        );
        assert_eq!(
            verify_github(Some(b"s3cret"), Some("sha256=zz"), body),
            Err(Refused::BadSignature)
        );
        assert_eq!(
            verify_github(None, Some(&good), body),
            Err(Refused::NotConfigured)
        );
        assert_eq!(
            verify_github(Some(b""), Some(&good), body),
            Err(Refused::NotConfigured)
        );
    }

    #[test]
    fn gitlab_tokens_are_checked() {
        assert_eq!(verify_gitlab(Some(b"tok"), Some("tok")), Ok(()));
        assert_eq!(
            verify_gitlab(Some(b"tok"), Some("tok2")),
            Err(Refused::BadToken)
        );
        assert_eq!(Refused::BadToken.to_string(), "bad token");
        assert_eq!(
            verify_gitlab(Some(b"tok"), None),
            Err(Refused::MissingSignature)
        );
        assert_eq!(
            verify_gitlab(None, Some("tok")),
            Err(Refused::NotConfigured)
        );
    }

    #[test]
    fn pushes_name_their_repository_as_github_and_gitlab_send_it() {
        // Shaped like octokit/webhooks' push example and go-gitlab's
        // push event test data.
        let github = br#"{"ref":"refs/heads/main","repository":{"full_name":"Codertocat/Hello-World","html_url":"https://github.com/Codertocat/Hello-World","url":"https://github.com/Codertocat/Hello-World","git_url":"git://github.com/Codertocat/Hello-World.git","ssh_url":"git@github.com:Codertocat/Hello-World.git","clone_url":"https://github.com/Codertocat/Hello-World.git"}}"#;
        let Event::Push {
            reference,
            repositories,
        } = parse(Provider::GitHub, "push", github)
        else {
            panic!("a push")
        };
        assert_eq!(reference, Some(Ref::Branch("main".into())));
        for watched in [
            "https://github.com/codertocat/hello-world.git",
            "https://github.com/Codertocat/Hello-World",
            "git@github.com:Codertocat/Hello-World.git",
            "ssh://git@github.com/Codertocat/Hello-World.git",
            "ssh://git@github.com:22/Codertocat/Hello-World",
        ] {
            assert!(names_repository(&repositories, watched), "{watched}");
        }
        assert!(!names_repository(
            &repositories,
            "https://github.com/Codertocat/Other.git"
        ));
        assert!(!names_repository(
            &repositories,
            "https://gitlab.com/Codertocat/Hello-World.git"
        ));
        let gitlab = br#"{"object_kind":"push","ref":"refs/heads/master","project":{"path_with_namespace":"mike/diaspora","web_url":"http://example.com/mike/diaspora","git_ssh_url":"git@example.com:mike/diaspora.git","git_http_url":"http://example.com/mike/diaspora.git"},"repository":{"name":"Diaspora","url":"git@example.com:mike/diaspora.git","homepage":"http://example.com/mike/diaspora"}}"#;
        let Event::Push { repositories, .. } = parse(Provider::GitLab, "Push Hook", gitlab) else {
            panic!("a push")
        };
        assert!(names_repository(
            &repositories,
            "https://example.com/mike/diaspora.git"
        ));
        assert!(names_repository(
            &repositories,
            "git@example.com:mike/diaspora.git"
        ));
        assert!(!names_repository(
            &repositories,
            "git@example.com:mike/other.git"
        ));
        // A payload naming no repository names none.
        assert!(!names_repository(
            &[],
            "https://example.com/mike/diaspora.git"
        ));
        assert_eq!(
            repository_key("file:///srv/repo"),
            repository_key("/srv/repo")
        );
    }

    #[test]
    fn events_parse_without_panicking_on_odd_bodies() {
        assert_eq!(
            parse(Provider::GitHub, "push", br#"{"ref":"refs/heads/main"}"#),
            Event::Push {
                reference: Some(Ref::Branch("main".into())),
                repositories: Vec::new()
            }
        );
        assert_eq!(
            parse(Provider::GitHub, "push", br#"{"ref":"refs/tags/v1"}"#),
            Event::Push {
                reference: Some(Ref::Tag("v1".into())),
                repositories: Vec::new()
            }
        );
        assert_eq!(
            parse(Provider::GitHub, "push", br#"{"ref":42}"#),
            Event::Push {
                reference: None,
                repositories: Vec::new()
            }
        );
        assert_eq!(
            parse(Provider::GitHub, "push", b"not json"),
            Event::Push {
                reference: None,
                repositories: Vec::new()
            }
        );
        assert_eq!(
            parse(
                Provider::GitHub,
                "pull_request",
                br#"{"action":"synchronize","number":7,"pull_request":{"base":{"ref":"main"}}}"#
            ),
            Event::PullRequest {
                number: 7,
                base: "main".into(),
                head: "refs/pull/7/head".into()
            }
        );
        assert_eq!(
            parse(
                Provider::GitHub,
                "pull_request",
                br#"{"action":"closed","number":7,"pull_request":{"base":{"ref":"main"}}}"#
            ),
            Event::Other("pull_request".into())
        );
        assert_eq!(
            parse(Provider::GitHub, "pull_request", br#"{"number":"7"}"#),
            Event::Other("pull_request".into())
        );
        assert_eq!(
            parse(
                Provider::GitLab,
                "Merge Request Hook",
                br#"{"object_attributes":{"iid":3,"action":"open","target_branch":"main"}}"#
            ),
            Event::PullRequest {
                number: 3,
                base: "main".into(),
                head: "refs/merge-requests/3/head".into()
            }
        );
        assert_eq!(
            parse(
                Provider::GitLab,
                "Push Hook",
                br#"{"ref":"refs/heads/dev"}"#
            ),
            Event::Push {
                reference: Some(Ref::Branch("dev".into())),
                repositories: Vec::new()
            }
        );
        assert_eq!(
            parse(Provider::GitHub, "ping", b"{}"),
            Event::Other("ping".into())
        );
    }
}
