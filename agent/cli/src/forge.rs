//! Forges (GitHub, GitLab): the sticky report comment on a pull request,
//! the commit status on its head, and pull requests that write a revert
//! back to git. Thin REST clients over reqwest; tokens never logged.

use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, USER_AGENT};
use serde_json::{json, Value};

use crate::output::REPORT_MARKER;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    Github,
    Gitlab,
}

#[derive(Debug, thiserror::Error)]
pub enum ForgeError {
    #[error("{kind:?} API {what}: {reason}")]
    Request {
        kind: Kind,
        what: String,
        reason: String,
    },
    #[error("forge token: {0}")]
    Token(String),
}

/// A commit status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Pending,
    Success,
    Failure,
}

pub struct Forge {
    kind: Kind,
    /// API root, e.g. https://api.github.com or https://gitlab.com/api/v4.
    api: String,
    /// owner/name on GitHub; the project id or url-encoded path on GitLab.
    project: String,
    http: reqwest::Client,
}

impl Forge {
    pub fn new(kind: Kind, api: &str, project: &str, token: &str) -> Result<Self, ForgeError> {
        let mut h = HeaderMap::new();
        let secret = |v: String| {
            let mut v = HeaderValue::from_str(&v)
                .map_err(|_| ForgeError::Token("not a valid header value".into()))?;
            v.set_sensitive(true);
            Ok::<_, ForgeError>(v)
        };
        match kind {
            Kind::Github => {
                h.insert(AUTHORIZATION, secret(format!("Bearer {token}"))?);
                h.insert(
                    ACCEPT,
                    HeaderValue::from_static("application/vnd.github+json"),
                );
            }
            Kind::Gitlab => {
                h.insert("private-token", secret(token.to_string())?);
            }
        }
        h.insert(USER_AGENT, HeaderValue::from_static("sluice"));
        let http = reqwest::Client::builder()
            .default_headers(h)
            .timeout(std::time::Duration::from_secs(30))
            .build()
            .map_err(|e| ForgeError::Token(e.to_string()))?;
        let project = match kind {
            Kind::Github => project.to_string(),
            Kind::Gitlab => project.replace('/', "%2F"),
        };
        Ok(Forge {
            kind,
            api: api.trim_end_matches('/').to_string(),
            project,
            http,
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, ForgeError> {
        let url = format!("{}{}", self.api, path);
        let what = format!("{method} {path}");
        let mut req = self.http.request(method, &url);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let err = |reason: String| ForgeError::Request {
            kind: self.kind,
            what: what.clone(),
            reason,
        };
        let resp = req
            .send()
            .await
            .map_err(|e| err(e.without_url().to_string()))?;
        let code = resp.status();
        let text = resp
            .text()
            .await
            .map_err(|e| err(e.without_url().to_string()))?;
        if !code.is_success() {
            let short: String = text.chars().take(300).collect();
            return Err(err(format!("{code}: {short}")));
        }
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Creates the report comment, or updates the one carrying the marker
    /// (one sticky comment per pull request). Returns the comment's id.
    pub async fn upsert_report(&self, pr: u64, body: &str) -> Result<u64, ForgeError> {
        use reqwest::Method;
        let (list, item) = match self.kind {
            Kind::Github => (
                format!("/repos/{}/issues/{pr}/comments", self.project),
                format!("/repos/{}/issues/comments", self.project),
            ),
            Kind::Gitlab => (
                format!("/projects/{}/merge_requests/{pr}/notes", self.project),
                format!("/projects/{}/merge_requests/{pr}/notes", self.project),
            ),
        };
        let mut found = None;
        for page in 1..=20 {
            let comments = self
                .call(
                    Method::GET,
                    &format!("{list}?per_page=100&page={page}"),
                    None,
                )
                .await?;
            let Some(items) = comments.as_array() else {
                break;
            };
            if let Some(c) = items.iter().find(|c| {
                c["body"]
                    .as_str()
                    .is_some_and(|b| b.contains(REPORT_MARKER))
            }) {
                found = c["id"].as_u64();
                break;
            }
            if items.len() < 100 {
                break;
            }
        }
        let body = json!({ "body": body });
        let resp = match (found, self.kind) {
            (Some(id), Kind::Github) => {
                self.call(Method::PATCH, &format!("{item}/{id}"), Some(body))
                    .await?
            }
            (Some(id), Kind::Gitlab) => {
                self.call(Method::PUT, &format!("{item}/{id}"), Some(body))
                    .await?
            }
            (None, _) => self.call(Method::POST, &list, Some(body)).await?,
        };
        Ok(resp["id"].as_u64().or(found).unwrap_or(0))
    }

    /// Sets the `sluice` commit status on `sha`.
    pub async fn set_status(
        &self,
        sha: &str,
        state: State,
        description: &str,
    ) -> Result<(), ForgeError> {
        let description: String = description.chars().take(140).collect();
        let (path, body) = match self.kind {
            Kind::Github => (
                format!("/repos/{}/statuses/{sha}", self.project),
                json!({ "state": match state { State::Pending => "pending", State::Success => "success", State::Failure => "failure" }, "context": "sluice", "description": description }),
            ),
            Kind::Gitlab => (
                format!("/projects/{}/statuses/{sha}", self.project),
                json!({ "state": match state { State::Pending => "pending", State::Success => "success", State::Failure => "failed" }, "name": "sluice", "description": description }),
            ),
        };
        self.call(reqwest::Method::POST, &path, Some(body))
            .await
            .map(|_| ())
    }

    /// Opens a pull (merge) request from `branch` into `base`; returns its
    /// web URL.
    pub async fn open_pull_request(
        &self,
        branch: &str,
        base: &str,
        title: &str,
        body: &str,
    ) -> Result<String, ForgeError> {
        let (path, req) = match self.kind {
            Kind::Github => (
                format!("/repos/{}/pulls", self.project),
                json!({ "title": title, "head": branch, "base": base, "body": body }),
            ),
            Kind::Gitlab => (
                format!("/projects/{}/merge_requests", self.project),
                json!({ "title": title, "source_branch": branch, "target_branch": base, "description": body }),
            ),
        };
        let resp = self.call(reqwest::Method::POST, &path, Some(req)).await?;
        Ok(resp["html_url"]
            .as_str()
            .or(resp["web_url"].as_str())
            .unwrap_or_default()
            .to_string())
    }
}

#[async_trait::async_trait]
impl sluice_core::target::PullRequests for Forge {
    async fn open(
        &self,
        branch: &str,
        base: &str,
        title: &str,
        body: &str,
    ) -> Result<String, String> {
        self.open_pull_request(branch, base, title, body)
            .await
            .map_err(|e| e.to_string())
    }
}

/// Plans `head` against `base` and live, then posts the report on pull
/// request `pr` (one sticky comment) with a commit status on the head:
/// pending while planning, then success, or failure with the reason.
/// Returns the comment's id.
pub async fn post_report(
    engine: &sluice_core::engine::Engine,
    forge: &Forge,
    pr: u64,
    base: &str,
    head: &str,
) -> anyhow::Result<u64> {
    use sluice_core::engine::EngineError;
    let head_rev = engine
        .source
        .fetch_ref(head)
        .await
        .map_err(EngineError::from)?;
    let sha = head_rev.commit.to_string();
    forge
        .set_status(&sha, State::Pending, "sluice is planning this change")
        .await?;
    let base_rev = engine
        .source
        .fetch_ref(base)
        .await
        .map_err(EngineError::from)?;
    match engine.report(&base_rev, &head_rev).await {
        Ok(mut report) => {
            report.base_name = Some(base.to_string());
            report.head_name = Some(head.to_string());
            let body = crate::report::markdown(&report);
            let id = forge.upsert_report(pr, &body).await?;
            let denies = report.guard.denies().count();
            if denies > 0 {
                let description = format!("{denies} policy deny: this change will not be applied");
                forge.set_status(&sha, State::Failure, &description).await?;
                return Ok(id);
            }
            let description = format!(
                "{}; {} drifted resource(s) would be overwritten",
                report.against_live.summary(),
                report.drift_overwritten.len()
            );
            forge.set_status(&sha, State::Success, &description).await?;
            Ok(id)
        }
        Err(e) => {
            let body = format!(
                "{REPORT_MARKER}\n### sluice: this change cannot be applied\n\n{}\n",
                crate::output::md_escape(&e.to_string())
            );
            forge.upsert_report(pr, &body).await?;
            forge
                .set_status(&sha, State::Failure, &e.to_string())
                .await?;
            Err(e.into())
        }
    }
}
