//! Prometheus as the canary analysis' metrics source: PromQL instant
//! queries over its HTTP API (`/api/v1/query`) on the router's series
//! (`sluice_router_requests_total`, `sluice_router_errors_total`,
//! `sluice_router_request_duration_seconds_bucket`), which Prometheus
//! scrapes from each router's admin `/metrics`.
//!
//! Readings lag by up to one scrape interval; the analysis only compares
//! differences between readings, so the lag shifts the window, not the
//! verdict.

use std::time::Duration;

use serde_json::Value;
use sluice_core::traffic::{Counters, Metrics, MetricsError, Split};

pub struct Prometheus {
    base: String,
    http: reqwest::Client,
}

impl Prometheus {
    pub fn new(url: &str) -> Result<Self, String> {
        let base = url.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(format!("{url:?} is not an http(s) URL"));
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Prometheus { base, http })
    }

    /// Runs one instant query; returns (labels, value) per series.
    async fn query(&self, q: &str) -> Result<Vec<(Value, f64)>, MetricsError> {
        let err = |reason: String| MetricsError::Query {
            source_name: self.describe(),
            query: q.to_string(),
            reason,
        };
        let url = reqwest::Url::parse_with_params(
            &format!("{}/api/v1/query", self.base),
            &[("query", q)],
        )
        .map_err(|e| err(e.to_string()))?;
        let resp = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| MetricsError::Unavailable {
                source_name: self.describe(),
                reason: e.without_url().to_string(),
            })?;
        let code = resp.status();
        let body: Value = resp
            .json()
            .await
            .map_err(|e| err(format!("answer is not JSON ({code}): {e}")))?;
        if body["status"] != "success" {
            return Err(err(format!(
                "{code}: {} {}",
                body["errorType"].as_str().unwrap_or(""),
                body["error"].as_str().unwrap_or("")
            )));
        }
        let Some(result) = body["data"]["result"].as_array() else {
            return Err(err("no data.result in the answer".into()));
        };
        result
            .iter()
            .map(|s| {
                let v = s["value"][1]
                    .as_str()
                    .and_then(|v| v.parse::<f64>().ok())
                    .ok_or_else(|| err(format!("a sample without a number: {s}")))?;
                Ok((s["metric"].clone(), v))
            })
            .collect()
    }

    async fn version(&self, split: &Split, version: &str) -> Result<Counters, MetricsError> {
        let routes = split
            .routes
            .iter()
            .map(|r| regex_escape(r))
            .collect::<Vec<_>>()
            .join("|");
        let sel = format!(
            "{{route=~\"{}\",version=\"{}\"}}",
            label_escape(&routes),
            label_escape(version)
        );
        let scalar = |rows: Vec<(Value, f64)>| rows.first().map(|r| r.1 as u64).unwrap_or(0);
        let requests = scalar(
            self.query(&format!("sum(sluice_router_requests_total{sel})"))
                .await?,
        );
        let errors = scalar(
            self.query(&format!("sum(sluice_router_errors_total{sel})"))
                .await?,
        );
        let mut buckets: Vec<(f64, u64)> = self
            .query(&format!(
                "sum by (le) (sluice_router_request_duration_seconds_bucket{sel})"
            ))
            .await?
            .into_iter()
            .filter_map(|(m, v)| {
                let le = m["le"].as_str()?;
                let bound = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((bound, v as u64))
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        Ok(Counters {
            requests,
            errors,
            buckets,
        })
    }
}

#[async_trait::async_trait]
impl Metrics for Prometheus {
    fn describe(&self) -> String {
        format!(
            "prometheus at {} (latency from the histogram buckets of sluice_router_request_duration_seconds)",
            self.base
        )
    }

    async fn counters(&self, split: &Split) -> Result<(Counters, Counters), MetricsError> {
        Ok((
            self.version(split, &split.baseline).await?,
            self.version(split, &split.canary).await?,
        ))
    }
}

/// Escapes a PromQL string literal (double-quoted).
fn label_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// Escapes RE2 metacharacters so a route name matches only itself.
fn regex_escape(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_escaped_for_promql() {
        assert_eq!(regex_escape("web.v1"), "web\\.v1");
        assert_eq!(label_escape("a\"b"), "a\\\"b");
        assert!(Prometheus::new("ftp://x").is_err());
    }
}
