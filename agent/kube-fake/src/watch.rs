//! WATCH, as the recorded kube-apiserver 1.28 streams it (fixtures 58a-g):
//! a 200 `application/json` response of one JSON event per line, from the
//! requested `resourceVersion` on (no ADDED for objects that already
//! existed at it; from `0` or none, an ADDED for each first), `BOOKMARK`s
//! carrying only the current `resourceVersion` when asked for, and the
//! stream ended by the server at `timeoutSeconds`. A `resourceVersion`
//! older than the server keeps events for is an `ERROR` event holding a
//! 410 `Expired` Status inside the 200 stream, not an HTTP 410 (58g).

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use crate::{matches_fields, matches_selector, Inner, Key};

/// One change to one object, kept so watches can start in the past.
#[derive(Clone)]
pub(crate) struct Event {
    pub rv: u64,
    pub kind: &'static str,
    pub key: Key,
    /// The object after the change (DELETED: its last state, with the
    /// deletion's resourceVersion).
    pub object: Value,
}

/// How many events the fake keeps; older resourceVersions are "too old".
pub(crate) const KEPT: usize = 20_000;

/// What one WATCH request asks for.
pub(crate) struct Request {
    pub group: String,
    pub plural: String,
    pub namespace: Option<String>,
    pub labels: String,
    pub fields: String,
    /// None: from now, with an ADDED for every existing object first.
    pub since: Option<u64>,
    pub timeout: Duration,
    pub bookmarks: bool,
    pub kind: String,
    pub api_version: String,
}

impl Request {
    fn wants(&self, key: &Key, obj: &Value) -> bool {
        key.0 == self.group
            && key.1 == self.plural
            && self.namespace.as_ref().is_none_or(|ns| *ns == key.2)
            && matches_selector(obj, &self.labels)
            && matches_fields(obj, &self.fields)
    }
}

fn line(event: &str, object: &Value) -> Bytes {
    let mut s =
        serde_json::to_string(&json!({"type": event, "object": object})).unwrap_or_default();
    s.push('\n');
    Bytes::from(s)
}

/// Starts the stream for `req`; it runs on its own task and ends at the
/// request's timeout or when the client goes away.
pub(crate) fn start(shared: Arc<Mutex<Inner>>, req: Request) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + req.timeout;
        let every = {
            let inner = shared.lock().unwrap_or_else(|e| e.into_inner());
            inner.bookmark_every.unwrap_or_else(|| {
                (req.timeout / 2).clamp(Duration::from_secs(1), Duration::from_secs(60))
            })
        };
        let mut next_bookmark = tokio::time::Instant::now() + every;
        let changed = shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .changed
            .clone();
        let mut since = req.since;
        loop {
            let notified = changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (out, now_rv, expired) = {
                let inner = shared.lock().unwrap_or_else(|e| e.into_inner());
                let mut out = Vec::new();
                let mut expired = None;
                match since {
                    None => {
                        for (key, obj) in &inner.objects {
                            if req.wants(key, obj) {
                                out.push(line("ADDED", obj));
                            }
                        }
                        since = Some(inner.rv);
                    }
                    Some(rv) if rv < inner.compacted => {
                        let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                            "message": format!("too old resource version: {rv} ({})", inner.compacted),
                            "reason": "Expired", "code": 410});
                        expired = Some(line("ERROR", &status));
                    }
                    Some(rv) => {
                        for e in inner.events.iter().filter(|e| e.rv > rv) {
                            if req.wants(&e.key, &e.object) {
                                out.push(line(e.kind, &e.object));
                            }
                        }
                        since = Some(inner.rv.max(rv));
                    }
                }
                (out, inner.rv, expired)
            };
            if let Some(error) = expired {
                let _ = tx.send(error).await;
                return;
            }
            for l in out {
                if tx.send(l).await.is_err() {
                    return;
                }
            }
            let wake = next_bookmark.min(deadline);
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(wake) => {
                    if tokio::time::Instant::now() >= deadline {
                        return;
                    }
                    if req.bookmarks {
                        let mark = json!({"kind": req.kind, "apiVersion": req.api_version,
                            "metadata": {"resourceVersion": now_rv.to_string(), "creationTimestamp": null}});
                        if tx.send(line("BOOKMARK", &mark)).await.is_err() {
                            return;
                        }
                    }
                    next_bookmark = tokio::time::Instant::now() + every;
                }
                _ = tx.closed() => return,
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(stream),
    )
        .into_response()
}
