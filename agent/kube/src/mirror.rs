//! A copy of the agent's state in the cluster, for in-cluster installs.
//!
//! An agent pod keeps its store (applied and last good commit per target,
//! the inventory, the rollout in progress, the history) in a local folder,
//! which a replaced pod or a new leader does not have. The leader therefore
//! copies the store's files into a ConfigMap whenever they change, and a
//! replica that becomes leader restores them before it reconciles: the
//! inventory (so pruning still knows what sluice created), the last good
//! commit (so a failed rollout still reverts), the rollout in progress and
//! the DORA history survive pod restarts and failovers.
//!
//! The copy lags the files by at most one [`PERIOD`]. The history is
//! trimmed to its newest entries to stay within a ConfigMap's 1 MiB.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::{json, Value};
use tracing::{info, warn};

use crate::client::{Cluster, KubeError};

/// The store's files that are copied (as `FileStore` names them).
const FILES: [&str; 2] = ["state.json", "history.jsonl"];
/// How often the files are checked for changes.
pub const PERIOD: Duration = Duration::from_secs(1);
/// Room left for the state itself within the 1 MiB a ConfigMap may hold.
const HISTORY_BUDGET: usize = 700 * 1024;

pub struct StateMirror {
    cluster: Arc<Cluster>,
    namespace: String,
    name: String,
}

impl StateMirror {
    pub fn new(cluster: Arc<Cluster>, namespace: &str, name: &str) -> Self {
        StateMirror {
            cluster,
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }

    /// Writes the copy's files into `dir` (the copy is the leader's, so it
    /// wins over whatever this pod has). False when there is no copy yet.
    pub async fn restore(&self, dir: &Path) -> Result<bool, KubeError> {
        let kind = self.config_map_kind().await?;
        let Some(cm) = self
            .cluster
            .get(&kind, Some(&self.namespace), &self.name)
            .await?
        else {
            return Ok(false);
        };
        std::fs::create_dir_all(dir)
            .map_err(|e| KubeError::Transport(format!("{}: {e}", dir.display())))?;
        for file in FILES {
            if let Some(text) = cm["data"][file].as_str() {
                let tmp = dir.join(format!(".{file}.restore"));
                std::fs::write(&tmp, text)
                    .and_then(|_| std::fs::rename(&tmp, dir.join(file)))
                    .map_err(|e| KubeError::Transport(format!("{}: {e}", dir.display())))?;
            }
        }
        info!(configmap = %self.name, namespace = %self.namespace, "restored the agent's state from the cluster");
        Ok(true)
    }

    /// Copies the files of `dir` into the ConfigMap.
    pub async fn push(&self, dir: &Path) -> Result<(), KubeError> {
        let kind = self.config_map_kind().await?;
        let mut data = serde_json::Map::new();
        for file in FILES {
            let Ok(text) = std::fs::read_to_string(dir.join(file)) else {
                continue;
            };
            let text = if file == "history.jsonl" {
                newest_lines(&text, HISTORY_BUDGET)
            } else {
                text
            };
            data.insert(file.to_string(), Value::String(text));
        }
        let body = json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {
                "name": self.name, "namespace": self.namespace,
                "labels": {"app.kubernetes.io/name": "sluice", "app.kubernetes.io/component": "state"},
            },
            "data": data,
        });
        self.cluster
            .apply(&kind, Some(&self.namespace), &self.name, &body, true, false)
            .await
            .map(|_| ())
    }

    /// Pushes whenever the files change, until `stop`.
    pub async fn run(&self, dir: &Path, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut last = None;
        loop {
            let now = signature(dir);
            if Some(&now) != last.as_ref() {
                match self.push(dir).await {
                    Ok(()) => last = Some(now),
                    Err(e) => {
                        warn!(configmap = %self.name, error = %e, "copying the agent's state to the cluster failed; retrying")
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(PERIOD) => {}
                _ = stop.changed() => {
                    // One last copy of what the shutdown wrote.
                    if Some(signature(dir)) != last {
                        let _ = self.push(dir).await;
                    }
                    return;
                }
            }
        }
    }

    async fn config_map_kind(&self) -> Result<crate::client::Kind, KubeError> {
        self.cluster
            .resolve("v1", "ConfigMap")
            .await?
            .ok_or_else(|| KubeError::Transport("the cluster does not serve ConfigMaps".into()))
    }
}

/// Size and modification time of each file: what changes when the store
/// writes.
fn signature(dir: &Path) -> Vec<(u64, Option<SystemTime>)> {
    FILES
        .iter()
        .map(|f| match std::fs::metadata(dir.join(f)) {
            Ok(m) => (m.len(), m.modified().ok()),
            Err(_) => (0, None),
        })
        .collect()
}

/// The newest whole lines of `text` that fit in `budget` bytes (a line
/// still being appended, without its newline, is left out).
fn newest_lines(text: &str, budget: usize) -> String {
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => return String::new(),
    };
    let mut kept: Vec<&str> = Vec::new();
    let mut size = 0;
    for line in complete.split_inclusive('\n').rev() {
        if size + line.len() > budget {
            break;
        }
        size += line.len();
        kept.push(line);
    }
    kept.reverse();
    kept.concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_keeps_the_newest_whole_lines_within_budget() {
        let text = "a1\nb22\nc333\npartial";
        assert_eq!(newest_lines(text, 100), "a1\nb22\nc333\n");
        assert_eq!(newest_lines(text, 9), "b22\nc333\n");
        assert_eq!(newest_lines("", 9), "");
    }
}
