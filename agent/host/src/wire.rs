//! The host target over a wire: what an agent sends a remote host's
//! `sluice host-exec` (one JSON request on stdin) and what comes back (one
//! JSON response on stdout), so every host, local or remote, runs the same
//! host-target code. Typed both ways; errors keep their kind, so the engine
//! treats a remote failure as it treats a local one.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sluice_core::model::Share;
use sluice_core::resource::{DesiredResource, LiveResource, ResourceId};
use sluice_core::target::{Target, TargetError};
use sluice_core::traffic::{Counters, Split, Traffic};

use crate::HostTarget;

/// A desired resource with what its serialisation leaves out (the rollout
/// settings render resolved, the repository files it needs).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WireResource {
    pub resource: DesiredResource,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unavailable: Option<Share>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crash_restarts: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_timeout_ms: Option<u64>,
    /// sha256 hex → content, base64.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub blobs: BTreeMap<String, String>,
}

impl WireResource {
    pub fn of(r: &DesiredResource) -> Self {
        WireResource {
            resource: r.clone(),
            max_unavailable: r.max_unavailable,
            crash_restarts: r.crash_restarts,
            start_timeout_ms: r.start_timeout.map(|d| d.as_millis() as u64),
            blobs: r
                .blobs
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        base64::engine::general_purpose::STANDARD.encode(v.as_slice()),
                    )
                })
                .collect(),
        }
    }

    pub fn into_resource(self) -> Result<DesiredResource, String> {
        let mut r = self.resource;
        r.max_unavailable = self.max_unavailable;
        r.crash_restarts = self.crash_restarts;
        r.start_timeout = self.start_timeout_ms.map(Duration::from_millis);
        for (k, v) in self.blobs {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(v)
                .map_err(|e| format!("blob {k}: {e}"))?;
            r.blobs.insert(k, Arc::new(bytes));
        }
        Ok(r)
    }
}

/// One operation of the host target.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase")]
pub enum Request {
    /// Is the host there (and its sluice the agent's)?
    Ping,
    Observe {
        ids: Vec<ResourceId>,
    },
    Prepare {
        resources: Vec<WireResource>,
    },
    Apply {
        resource: WireResource,
    },
    Delete {
        id: ResourceId,
    },
    Maintain,
    Marked,
    Splittable {
        resource: WireResource,
    },
    Stage {
        resource: WireResource,
    },
    SetWeight {
        split: Split,
        percent: u8,
    },
    Promote {
        split: Split,
        resource: WireResource,
    },
    Abort {
        split: Split,
    },
    Crashed {
        split: Split,
    },
    Counters {
        split: Split,
    },
}

impl Request {
    /// Whether the operation changes the host (such operations take the
    /// host's lock: one at a time, whoever sends them).
    pub fn writes(&self) -> bool {
        !matches!(
            self,
            Request::Ping
                | Request::Observe { .. }
                | Request::Marked
                | Request::Splittable { .. }
                | Request::Crashed { .. }
                | Request::Counters { .. }
        )
    }
}

/// A [`TargetError`] on the wire.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum WireError {
    Invalid { id: String, reason: String },
    Prepare { id: String, reason: String },
    Apply { id: String, reason: String },
    Delete { id: String, reason: String },
    Observe { target: String, reason: String },
    Unavailable { target: String, reason: String },
}

impl From<TargetError> for WireError {
    fn from(e: TargetError) -> Self {
        match e {
            TargetError::Invalid { id, reason } => WireError::Invalid { id, reason },
            TargetError::Prepare { id, reason } => WireError::Prepare { id, reason },
            TargetError::Apply { id, reason } => WireError::Apply { id, reason },
            TargetError::Delete { id, reason } => WireError::Delete { id, reason },
            TargetError::Observe { target, reason } => WireError::Observe { target, reason },
            TargetError::Unavailable { target, reason } => {
                WireError::Unavailable { target, reason }
            }
        }
    }
}

impl From<WireError> for TargetError {
    fn from(e: WireError) -> Self {
        match e {
            WireError::Invalid { id, reason } => TargetError::Invalid { id, reason },
            WireError::Prepare { id, reason } => TargetError::Prepare { id, reason },
            WireError::Apply { id, reason } => TargetError::Apply { id, reason },
            WireError::Delete { id, reason } => TargetError::Delete { id, reason },
            WireError::Observe { target, reason } => TargetError::Observe { target, reason },
            WireError::Unavailable { target, reason } => {
                TargetError::Unavailable { target, reason }
            }
        }
    }
}

/// What a request gives back.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "camelCase")]
pub enum Response {
    /// Ping: the host's sluice version.
    Pong {
        version: String,
    },
    Live {
        live: Vec<LiveResource>,
    },
    Done,
    Repaired {
        instances: Vec<String>,
    },
    Marked {
        marks: Vec<(ResourceId, String)>,
    },
    Bool {
        value: bool,
    },
    Staged {
        split: Split,
    },
    Crashed {
        reason: Option<String>,
    },
    Counters {
        baseline: Counters,
        canary: Counters,
    },
    Error {
        error: WireError,
    },
}

/// A request on a conversation (`sluice host-exec --serve`): one JSON line
/// each way, matched by `id`, so requests can overlap (a status read while
/// an apply waits for readiness).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Envelope {
    pub id: u64,
    pub request: Request,
}

/// The answer to the request `id`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Reply {
    pub id: u64,
    pub response: Response,
}

/// Runs one request on the host target `t` (the remote end of the wire).
pub async fn serve(t: &HostTarget, req: Request) -> Response {
    let result: Result<Response, TargetError> =
        async {
            let resource = |w: WireResource| {
                w.into_resource().map_err(|reason| TargetError::Invalid {
                    id: "request".into(),
                    reason,
                })
            };
            Ok(match req {
                Request::Ping => Response::Pong {
                    version: env!("CARGO_PKG_VERSION").to_string(),
                },
                Request::Observe { ids } => Response::Live {
                    live: t.observe(&ids).await?.into_values().collect(),
                },
                Request::Prepare { resources } => {
                    let rs = resources
                        .into_iter()
                        .map(resource)
                        .collect::<Result<Vec<_>, _>>()?;
                    let refs: Vec<&DesiredResource> = rs.iter().collect();
                    t.prepare(&refs).await?;
                    Response::Done
                }
                Request::Apply { resource: r } => {
                    t.apply(&resource(r)?).await?;
                    Response::Done
                }
                Request::Delete { id } => {
                    t.delete(&id).await?;
                    Response::Done
                }
                Request::Maintain => Response::Repaired {
                    instances: t.maintain().await?,
                },
                Request::Marked => Response::Marked {
                    marks: t.marked(&[]).await?.unwrap_or_default(),
                },
                Request::Splittable { resource: r } => Response::Bool {
                    value: t.splittable(&resource(r)?).await,
                },
                Request::Stage { resource: r } => Response::Staged {
                    split: t.stage(&resource(r)?).await?,
                },
                Request::SetWeight { split, percent } => {
                    t.set_weight(&split, percent).await?;
                    Response::Done
                }
                Request::Promote { split, resource: r } => {
                    t.promote(&split, &resource(r)?).await?;
                    Response::Done
                }
                Request::Abort { split } => {
                    t.abort(&split).await?;
                    Response::Done
                }
                Request::Crashed { split } => Response::Crashed {
                    reason: t.crashed(&split).await,
                },
                Request::Counters { split } => {
                    let (baseline, canary) = t.metrics().counters(&split).await.map_err(|e| {
                        TargetError::Unavailable {
                            target: "router".into(),
                            reason: e.to_string(),
                        }
                    })?;
                    Response::Counters { baseline, canary }
                }
            })
        }
        .await;
    result.unwrap_or_else(|e| Response::Error { error: e.into() })
}
