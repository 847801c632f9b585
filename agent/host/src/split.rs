//! Traffic splitting on the host: a Process's new release runs beside the
//! recorded one and the router weights traffic between them (canary,
//! blue-green). The split is recorded in `splits.json` before the router is
//! told, so a restarted agent and the router agree on it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use sluice_core::model::ProcessSpec;
use sluice_core::resource::{digest_of, DesiredResource};
use sluice_core::target::TargetError;
use sluice_core::traffic::{Counters, Metrics, MetricsError, Split, Traffic};
use sluice_router::{AdminClient, VersionStats};
use tracing::info;

use crate::target::{distinct_label, spec_of, HostTarget, SplitRecord};

impl HostTarget {
    /// Routes whose recorded spec points at `process`.
    fn routes_of(&self, process: &str) -> Vec<String> {
        self.records()
            .iter()
            .filter_map(|(k, v)| {
                let name = k.strip_prefix("Route/")?;
                (v["spec"]["process"].as_str() == Some(process)).then(|| name.to_string())
            })
            .collect()
    }

    fn split_error(&self, split: &Split, reason: String) -> TargetError {
        TargetError::Apply {
            id: split.resource.to_string(),
            reason,
        }
    }

    /// Sets the recorded split's weight and tells the router.
    async fn weigh(&self, split: &Split, percent: u8) -> Result<(), TargetError> {
        let mut rec = self
            .splits()
            .get(&split.resource.name)
            .cloned()
            .ok_or_else(|| self.split_error(split, "no traffic split is recorded".into()))?;
        rec.weight = Some(percent.min(100));
        self.save_split(&split.resource.name, Some(rec))?;
        self.sync_routes().await
    }
}

#[async_trait::async_trait]
impl Traffic for HostTarget {
    async fn splittable(&self, r: &DesiredResource) -> bool {
        if r.id.kind != "Process" || r.id.target != self.cfg.name {
            return false;
        }
        let Some(active) = self.records().get(&Self::record_key(&r.id)).map(digest_of) else {
            return false;
        };
        let serving = self
            .sup
            .list()
            .iter()
            .any(|i| i.alive && i.spec.resource == r.id.name && i.spec.digest == active);
        active != digest_of(&r.body) && serving && !self.routes_of(&r.id.name).is_empty()
    }

    async fn stage(&self, r: &DesiredResource) -> Result<Split, TargetError> {
        let _guard = self.lock.lock().await;
        let spec: ProcessSpec = spec_of(r)?;
        let records = self.records();
        let baseline = records
            .get(&Self::record_key(&r.id))
            .and_then(|b| b["spec"]["version"].as_str())
            .unwrap_or_default()
            .to_string();
        let digest = digest_of(&r.body);
        let canary = distinct_label(&baseline, &spec.version, &digest);
        let wanted = self.launch_specs(r, &spec)?;
        self.start_and_wait(r, &spec, &wanted).await?;
        let restarts_at_stage = self.canary_restarts(&r.id.name, &digest);
        self.save_split(
            &r.id.name,
            Some(SplitRecord {
                canary_digest: digest,
                baseline: baseline.clone(),
                canary: canary.clone(),
                weight: Some(0),
                restarts_at_stage,
            }),
        )?;
        self.sync_routes().await?;
        info!(target = %self.cfg.name, resource = %r.id.name, %baseline, %canary, "canary staged beside the baseline");
        Ok(Split {
            resource: r.id.clone(),
            routes: self.routes_of(&r.id.name),
            baseline,
            canary,
        })
    }

    async fn crashed(&self, split: &Split) -> Option<String> {
        let rec = self.splits().get(&split.resource.name).cloned()?;
        self.canary_crash(
            &split.resource.name,
            &rec.canary_digest,
            rec.restarts_at_stage,
        )
    }

    async fn set_weight(&self, split: &Split, percent: u8) -> Result<(), TargetError> {
        let _guard = self.lock.lock().await;
        self.weigh(split, percent).await?;
        info!(target = %self.cfg.name, resource = %split.resource.name, canary = %split.canary, percent, "traffic weighted");
        Ok(())
    }

    async fn promote(&self, split: &Split, r: &DesiredResource) -> Result<(), TargetError> {
        let _guard = self.lock.lock().await;
        let digest = digest_of(&r.body);
        self.record(r)?;
        self.clear_split(&r.id.name)?;
        self.sync_routes().await?;
        for i in self
            .sup
            .list()
            .into_iter()
            .filter(|i| i.spec.resource == r.id.name && i.spec.digest != digest)
        {
            self.sup.stop(&i).await;
        }
        info!(target = %self.cfg.name, resource = %r.id.name, version = %split.canary, "canary promoted; baseline stopped");
        Ok(())
    }

    async fn abort(&self, split: &Split) -> Result<(), TargetError> {
        let _guard = self.lock.lock().await;
        let canary_digest = self
            .splits()
            .get(&split.resource.name)
            .map(|s| s.canary_digest.clone());
        // Traffic first: the router stops choosing the canary for the very
        // next request; only then are its replicas stopped.
        self.clear_split(&split.resource.name)?;
        self.sync_routes().await?;
        let active = self
            .records()
            .get(&Self::record_key(&split.resource))
            .map(digest_of);
        for i in self.sup.list().into_iter().filter(|i| {
            i.spec.resource == split.resource.name
                && Some(&i.spec.digest) != active.as_ref()
                && (canary_digest.is_none() || Some(&i.spec.digest) == canary_digest.as_ref())
        }) {
            self.sup.stop(&i).await;
        }
        info!(target = %self.cfg.name, resource = %split.resource.name, baseline = %split.baseline, "canary aborted; all traffic on the baseline");
        Ok(())
    }

    fn metrics(&self) -> Arc<dyn Metrics> {
        Arc::new(RouterMetrics {
            addr_file: self.cfg.state_dir.join("router.addr"),
            target: self.cfg.name.clone(),
        })
    }
}

/// The router's own counters, read over its admin API (`GET /stats`).
pub struct RouterMetrics {
    addr_file: PathBuf,
    target: String,
}

impl RouterMetrics {
    fn client(&self) -> Result<AdminClient, MetricsError> {
        let text =
            std::fs::read_to_string(&self.addr_file).map_err(|e| MetricsError::Unavailable {
                source_name: self.describe(),
                reason: format!("{}: {e}", self.addr_file.display()),
            })?;
        let addr: SocketAddr = text.trim().parse().map_err(|_| MetricsError::Unavailable {
            source_name: self.describe(),
            reason: format!("{} holds no address", self.addr_file.display()),
        })?;
        Ok(AdminClient::new(addr))
    }
}

/// Counters from the router's per-version stats.
pub fn counters_of(v: &VersionStats) -> Counters {
    let mut cum = 0;
    let mut buckets: Vec<(f64, u64)> = v
        .latency
        .bounds
        .iter()
        .zip(&v.latency.counts)
        .map(|(b, c)| {
            cum += c;
            (*b, cum)
        })
        .collect();
    buckets.push((f64::INFINITY, v.latency.count));
    Counters {
        requests: v.requests,
        errors: v.errors,
        buckets,
    }
}

#[async_trait::async_trait]
impl Metrics for RouterMetrics {
    fn describe(&self) -> String {
        format!(
            "the router of target {} (latency histogram with buckets 25% apart, 0.5 ms to 60 s)",
            self.target
        )
    }

    async fn counters(&self, split: &Split) -> Result<(Counters, Counters), MetricsError> {
        let stats = self
            .client()?
            .stats()
            .await
            .map_err(|e| MetricsError::Unavailable {
                source_name: self.describe(),
                reason: e.to_string(),
            })?;
        let readings: Vec<_> = split
            .routes
            .iter()
            .filter_map(|r| stats.routes.get(r))
            .map(|r| {
                r.versions
                    .iter()
                    .map(|(k, v)| (k.clone(), counters_of(v)))
                    .collect()
            })
            .collect();
        Ok(sluice_core::traffic::sum_routes(readings.iter(), split))
    }
}
