//! Remote hosts: the host target on machines reached over SSH.
//!
//! A remote host runs the very host-target code the agent runs locally:
//! the agent installs its own `sluice` binary on the host (once per agent
//! version, checked by sha256 before every use) and sends each operation
//! to `sluice host-exec` on it as one typed JSON request, reading one
//! typed JSON response ([`sluice_host::wire`]). Processes, supervisors and
//! the router it starts there are detached from the SSH session: they
//! keep running when the agent or the connection goes, and the next call
//! adopts them, as on the local host.
//!
//! # Cost
//! One observe is one round trip per host (every resource of the host in
//! one request); a change is one round trip per resource. All hosts share
//! a limit on commands in flight ([`Fleet::new`]'s `parallel`).
//!
//! # Artifacts
//! A Process's artifact is downloaded and verified (sha256) by the host
//! itself, in `prepare`: the host uses its own network path and mirror,
//! and the agent's bandwidth does not multiply by the size of the fleet.
//! The digest pinned in the repository is checked on the host either way.
#![forbid(unsafe_code)]

pub mod ssh;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use sha2::Digest as _;
use sluice_core::model::TargetKind;
use sluice_core::resource::{DesiredResource, LiveResource, ResourceId};
use sluice_core::target::{Target, TargetError};
use sluice_core::traffic::{Counters, Metrics, MetricsError, Split, Traffic};
use sluice_host::wire::{Request, Response, WireResource};
use tokio::sync::{OnceCell, Semaphore};
use tracing::{debug, info};

use ssh::Input;
pub use ssh::{Dest, SshError, SshOptions};

/// The binary installed on hosts: its bytes are read once, when a host
/// first needs them.
struct Binary {
    path: PathBuf,
    sha256: String,
}

/// Everything remote hosts share: options, the limit on parallel hosts, the
/// binary they run.
pub struct Fleet {
    opts: Arc<SshOptions>,
    /// Commands in flight across all hosts.
    slots: Arc<Semaphore>,
    binary: Arc<OnceCell<Binary>>,
    binary_path: PathBuf,
    /// target → its router's admin address on the host (`--router-admin`).
    router_admin: BTreeMap<String, SocketAddr>,
    /// Every host built so far, for their figures.
    hosts: std::sync::Mutex<BTreeMap<String, RemoteHost>>,
}

impl Fleet {
    /// `binary`: the sluice binary hosts run (this agent's own, or one
    /// built for the hosts' platform); `parallel`: hosts worked on at once.
    pub fn new(
        opts: SshOptions,
        binary: PathBuf,
        parallel: usize,
        router_admin: BTreeMap<String, SocketAddr>,
    ) -> Fleet {
        Fleet {
            opts: Arc::new(opts),
            slots: Arc::new(Semaphore::new(parallel.max(1))),
            binary: Arc::new(OnceCell::new()),
            binary_path: binary,
            router_admin,
            hosts: Default::default(),
        }
    }

    /// Each host's round trips and bytes so far.
    pub fn traffic(&self) -> BTreeMap<String, HostTraffic> {
        self.hosts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(name, h)| (name.clone(), h.traffic()))
            .collect()
    }

    /// The remote host target `name` at `dest` (built once per agent: it
    /// holds the host's connection).
    pub fn host(&self, name: &str, dest: &str) -> RemoteHost {
        let host = RemoteHost {
            inner: Arc::new(Inner {
                name: name.to_string(),
                conn: ssh::Connection::new(Dest::parse(dest), self.opts.clone()),
                opts: self.opts.clone(),
                slots: self.slots.clone(),
                binary: self.binary.clone(),
                binary_path: self.binary_path.clone(),
                installed: OnceCell::new(),
                router_admin: self.router_admin.get(name).copied(),
                channel: tokio::sync::Mutex::new(None),
            }),
        };
        self.hosts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), host.clone());
        host
    }
}

/// One host reached over SSH.
#[derive(Clone)]
pub struct RemoteHost {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    conn: ssh::Connection,
    opts: Arc<SshOptions>,
    slots: Arc<Semaphore>,
    binary: Arc<OnceCell<Binary>>,
    binary_path: PathBuf,
    /// Where the binary is on the host and the host's sluice folder, once
    /// checked (per connection of this agent).
    installed: OnceCell<Installed>,
    router_admin: Option<SocketAddr>,
    /// The conversation with the host's `sluice host-exec --serve`, opened
    /// on first use and again after it ended.
    channel: tokio::sync::Mutex<Option<Arc<Channel>>>,
}

/// One conversation with a host's host-target server: requests go out as
/// lines, answers come back as lines matched by id, so requests overlap
/// and each is one network round trip (no shell, no process per request).
struct Channel {
    stdin: tokio::sync::Mutex<openssh::ChildStdin>,
    /// Requests sent, awaiting their answer.
    pending: std::sync::Mutex<BTreeMap<u64, tokio::sync::oneshot::Sender<Response>>>,
    next: std::sync::atomic::AtomicU64,
    /// False once the conversation ended (the host, the connection or the
    /// server went): every request after that opens a new one.
    alive: std::sync::atomic::AtomicBool,
    /// Why it ended, for the requests that were waiting.
    ended: std::sync::Mutex<Option<String>>,
    /// Kept so the remote process lives as long as the channel.
    _child: tokio::sync::Mutex<openssh::Child<Arc<openssh::Session>>>,
}

impl Channel {
    fn end(&self, why: String) {
        self.alive.store(false, Ordering::SeqCst);
        self.ended
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(why);
        // Dropping the senders wakes every waiting request.
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    fn why(&self) -> String {
        self.ended
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_else(|| "the connection ended".into())
    }
}

#[derive(Clone, Debug)]
struct Installed {
    exe: String,
    home: String,
}

/// Figures of one host's connection, for benchmarks and `/metrics`.
#[derive(Clone, Copy, Debug, Default)]
pub struct HostTraffic {
    pub commands: u64,
    pub sent: u64,
    pub received: u64,
    pub connects: u64,
}

/// The shell prelude every command on a host starts with: the host's
/// sluice folder in `$H`, as `sluice host-exec` would choose it.
const HOME_SH: &str = r#"H="${SLUICE_HOME:-}"; if [ -z "$H" ]; then if [ "$(id -u)" = 0 ]; then H=/var/lib/sluice; else H="${HOME:-/tmp}/.local/share/sluice"; fi; fi"#;

impl Inner {
    fn unavailable(&self, reason: impl std::fmt::Display) -> TargetError {
        TargetError::Unavailable {
            target: self.name.clone(),
            reason: reason.to_string(),
        }
    }

    async fn binary(&self) -> Result<&Binary, TargetError> {
        self.binary
            .get_or_try_init(|| async {
                let path = self.binary_path.clone();
                let sha256 = tokio::task::spawn_blocking(move || -> std::io::Result<String> {
                    let mut f = std::fs::File::open(&path)?;
                    let mut h = sha2::Sha256::new();
                    std::io::copy(&mut f, &mut h)?;
                    Ok(hex::encode(h.finalize()))
                })
                .await
                .map_err(|e| self.unavailable(e))?
                .map_err(|e| {
                    self.unavailable(format!(
                        "reading the sluice binary for hosts ({}): {e}",
                        self.binary_path.display()
                    ))
                })?;
                Ok(Binary {
                    path: self.binary_path.clone(),
                    sha256,
                })
            })
            .await
    }

    /// The host's sluice binary, installed if missing or not this one.
    async fn installed(&self) -> Result<&Installed, TargetError> {
        self.installed
            .get_or_try_init(|| async {
                let bin = self.binary().await?;
                let dir = &bin.sha256[..16];
                let probe = format!(
                    r#"{HOME_SH}; F="$H/bin/{dir}/sluice"; printf '%s\n%s\n' "$H" "$(uname -sm)"; if [ -x "$F" ] && [ "$(sha256sum "$F" | cut -d' ' -f1)" = "{sha}" ]; then echo have; else echo need; fi"#,
                    sha = bin.sha256
                );
                let out = self.sh("checking sluice on the host", &probe, Input::Bytes(b""), self.opts.read_timeout).await?;
                let text = String::from_utf8_lossy(&out);
                let mut lines = text.lines();
                let (Some(home), Some(platform), Some(have)) = (lines.next(), lines.next(), lines.next()) else {
                    return Err(self.unavailable(format!("unexpected answer to the install check: {text:?}")));
                };
                let ours = format!("{} {}", uname_os(), uname_machine());
                if !platform.trim().eq_ignore_ascii_case(&ours) {
                    return Err(TargetError::Invalid {
                        id: self.name.clone(),
                        reason: format!(
                            "the host is {platform}, this agent's sluice binary is for {ours}: pass --fleet-sluice with a binary built for the host"
                        ),
                    });
                }
                let exe = format!("{home}/bin/{dir}/sluice");
                if have.trim() != "have" {
                    let install = format!(
                        r#"set -e; umask 022; {HOME_SH}; D="$H/bin/{dir}"; mkdir -p "$D"; T="$D/.sluice.$$"; trap 'rm -f "$T"' EXIT; cat > "$T"; S="$(sha256sum "$T" | cut -d' ' -f1)"; if [ "$S" != "{sha}" ]; then echo "copied binary has sha256 $S, expected {sha}" >&2; exit 3; fi; chmod 755 "$T"; mv -f "$T" "$D/sluice"; trap - EXIT; echo ok"#,
                        sha = bin.sha256
                    );
                    self.sh("installing sluice", &install, Input::File(&bin.path), self.opts.write_timeout)
                        .await?;
                    info!(target = %self.name, host = %self.conn.dest(), exe = %exe, sha256 = %bin.sha256, "sluice installed on the host");
                }
                Ok(Installed {
                    exe,
                    home: home.to_string(),
                })
            })
            .await
    }

    /// Runs a shell script on the host (as `sh -c`), its stdout back.
    async fn sh(
        &self,
        what: &str,
        script: &str,
        input: Input<'_>,
        limit: Duration,
    ) -> Result<Vec<u8>, TargetError> {
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|e| self.unavailable(e))?;
        let out = self
            .conn
            .run(what, "sh", &["-c", script], input, limit)
            .await
            .map_err(|e| self.unavailable(e))?;
        if out.status != Some(0) {
            return Err(self.unavailable(format!(
                "{what}: exit {}: {}",
                out.status.map_or("by signal".into(), |c| c.to_string()),
                tail(&out.stderr)
            )));
        }
        Ok(out.stdout)
    }

    /// The open conversation with the host, or a new one.
    async fn channel(&self) -> Result<Arc<Channel>, TargetError> {
        let mut held = self.channel.lock().await;
        if let Some(c) = held.as_ref().filter(|c| c.alive.load(Ordering::SeqCst)) {
            return Ok(c.clone());
        }
        *held = None;
        let installed = self.installed().await?.clone();
        let mut args = vec![
            "host-exec",
            "--serve",
            "--target",
            &self.name,
            "--dir",
            &installed.home,
        ];
        let admin = self.router_admin.map(|a| a.to_string());
        if let Some(a) = &admin {
            args.extend(["--router-admin", a]);
        }
        let opening = self
            .slots
            .acquire()
            .await
            .map_err(|e| self.unavailable(e))?;
        let mut child = self
            .conn
            .open("starting sluice host-exec", &installed.exe, &args)
            .await
            .map_err(|e| self.unavailable(e))?;
        drop(opening);
        let (Some(stdin), Some(stdout), Some(stderr)) = (
            child.stdin().take(),
            child.stdout().take(),
            child.stderr().take(),
        ) else {
            return Err(self.unavailable("sluice host-exec started without its pipes"));
        };
        let channel = Arc::new(Channel {
            stdin: tokio::sync::Mutex::new(stdin),
            pending: Default::default(),
            next: Default::default(),
            alive: true.into(),
            ended: Default::default(),
            _child: tokio::sync::Mutex::new(child),
        });
        // Answers, to whoever waits for them.
        let reading = Arc::downgrade(&channel);
        let received = self.conn.traffic_handle();
        tokio::spawn(async move {
            use tokio::io::AsyncBufReadExt as _;
            let mut lines = tokio::io::BufReader::new(stdout);
            let why = loop {
                let mut line = Vec::new();
                match lines.read_until(b'\n', &mut line).await {
                    Ok(0) => break "the host closed the conversation".to_string(),
                    Err(e) => break format!("reading from the host: {e}"),
                    Ok(n) => {
                        received.received.fetch_add(n as u64, Ordering::Relaxed);
                        let Some(channel) = reading.upgrade() else {
                            return;
                        };
                        match serde_json::from_slice::<sluice_host::wire::Reply>(&line) {
                            Ok(reply) => {
                                let waiting = channel
                                    .pending
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .remove(&reply.id);
                                if let Some(tx) = waiting {
                                    let _ = tx.send(reply.response);
                                }
                            }
                            Err(e) => break format!("an unreadable answer from the host: {e}"),
                        }
                    }
                }
            };
            if let Some(channel) = reading.upgrade() {
                channel.end(why);
            }
        });
        // The server's log: kept at debug, its last lines in errors.
        let name = self.name.clone();
        let log_to = Arc::downgrade(&channel);
        tokio::spawn(async move {
            use tokio::io::AsyncBufReadExt as _;
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            let mut last = Vec::new();
            while let Ok(Some(line)) = lines.next_line().await {
                debug!(target = %name, log = %line, "host log");
                last.push(line);
                if last.len() > 3 {
                    last.remove(0);
                }
            }
            if let Some(channel) = log_to.upgrade() {
                if !last.is_empty() {
                    channel.end(format!("sluice host-exec ended: {}", last.join("; ")));
                }
            }
        });
        *held = Some(channel.clone());
        Ok(channel)
    }

    /// One host-target operation on the host: one round trip on the
    /// conversation.
    async fn call(&self, req: Request) -> Result<Response, TargetError> {
        let what = op_name(&req);
        let limit = if req.writes() {
            self.opts.write_timeout
        } else {
            self.opts.read_timeout
        };
        // The conversation first: opening it (and installing the binary)
        // takes slots of its own; holding one meanwhile would deadlock a
        // fleet larger than the limit.
        let channel = self.channel().await?;
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|e| self.unavailable(e))?;
        let id = channel.next.fetch_add(1, Ordering::Relaxed);
        let mut line = serde_json::to_vec(&sluice_host::wire::Envelope { id, request: req })
            .map_err(|e| self.unavailable(e))?;
        line.push(b'\n');
        let (tx, rx) = tokio::sync::oneshot::channel();
        channel
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        let sent = async {
            use tokio::io::AsyncWriteExt as _;
            let mut stdin = channel.stdin.lock().await;
            stdin.write_all(&line).await?;
            stdin.flush().await
        };
        let started = std::time::Instant::now();
        let answered = tokio::time::timeout(limit, async {
            sent.await.map_err(|e| format!("sending {what}: {e}"))?;
            rx.await.map_err(|_| channel.why())
        })
        .await;
        let t = &self.conn.traffic;
        t.commands.fetch_add(1, Ordering::Relaxed);
        t.sent.fetch_add(line.len() as u64, Ordering::Relaxed);
        match answered {
            Ok(Ok(Response::Error { error })) => Err(error.into()),
            Ok(Ok(r)) => {
                debug!(target = %self.name, op = what, ms = started.elapsed().as_millis() as u64, "host answered");
                Ok(r)
            }
            Ok(Err(why)) => {
                channel.end(why.clone());
                Err(self.unavailable(format!("{what}: {why}")))
            }
            Err(_) => {
                // A host that does not answer in time is taken as gone: the
                // next request starts over.
                channel.end(format!("no answer to {what} within {}s", limit.as_secs()));
                self.conn.forget().await;
                Err(self.unavailable(format!("{what}: no answer within {}s", limit.as_secs())))
            }
        }
    }

    fn unexpected(&self, r: Response) -> TargetError {
        self.unavailable(format!("unexpected answer from the host: {r:?}"))
    }
}

impl RemoteHost {
    /// The host's SSH destination.
    pub fn dest(&self) -> &Dest {
        self.inner.conn.dest()
    }

    /// Round trips and bytes so far.
    pub fn traffic(&self) -> HostTraffic {
        let t = &self.inner.conn.traffic;
        HostTraffic {
            commands: t.commands.load(Ordering::Relaxed),
            sent: t.sent.load(Ordering::Relaxed),
            received: t.received.load(Ordering::Relaxed),
            connects: t.connects.load(Ordering::Relaxed),
        }
    }

    async fn done(&self, req: Request) -> Result<(), TargetError> {
        match self.inner.call(req).await? {
            Response::Done => Ok(()),
            r => Err(self.inner.unexpected(r)),
        }
    }
}

#[async_trait::async_trait]
impl Target for RemoteHost {
    fn name(&self) -> &str {
        &self.inner.name
    }

    fn kind(&self) -> TargetKind {
        TargetKind::Host
    }

    async fn observe(
        &self,
        ids: &[ResourceId],
    ) -> Result<BTreeMap<ResourceId, LiveResource>, TargetError> {
        match self
            .inner
            .call(Request::Observe { ids: ids.to_vec() })
            .await
        {
            Ok(Response::Live { live }) => {
                Ok(live.into_iter().map(|l| (l.id.clone(), l)).collect())
            }
            Ok(r) => Err(self.inner.unexpected(r)),
            // The engine reads an unobservable target as unreachable.
            Err(TargetError::Unavailable { target, reason }) => {
                Err(TargetError::Observe { target, reason })
            }
            Err(e) => Err(e),
        }
    }

    async fn prepare(&self, resources: &[&DesiredResource]) -> Result<(), TargetError> {
        self.done(Request::Prepare {
            resources: resources.iter().map(|r| WireResource::of(r)).collect(),
        })
        .await
    }

    async fn apply(&self, resource: &DesiredResource) -> Result<(), TargetError> {
        self.done(Request::Apply {
            resource: WireResource::of(resource),
        })
        .await
    }

    async fn delete(&self, id: &ResourceId) -> Result<(), TargetError> {
        self.done(Request::Delete { id: id.clone() }).await
    }

    async fn marked(
        &self,
        _scope: &[ResourceId],
    ) -> Result<Option<Vec<(ResourceId, String)>>, TargetError> {
        match self.inner.call(Request::Marked).await? {
            Response::Marked { marks } => Ok(Some(marks)),
            r => Err(self.inner.unexpected(r)),
        }
    }

    async fn reachable(&self) -> Result<(), TargetError> {
        match self.inner.call(Request::Ping).await? {
            Response::Pong { .. } => Ok(()),
            r => Err(self.inner.unexpected(r)),
        }
    }

    async fn maintain(&self) -> Result<Vec<String>, TargetError> {
        match self.inner.call(Request::Maintain).await? {
            Response::Repaired { instances } => Ok(instances),
            r => Err(self.inner.unexpected(r)),
        }
    }

    fn traffic(&self) -> Option<&dyn Traffic> {
        Some(self)
    }
}

#[async_trait::async_trait]
impl Traffic for RemoteHost {
    async fn splittable(&self, r: &DesiredResource) -> bool {
        match self
            .inner
            .call(Request::Splittable {
                resource: WireResource::of(r),
            })
            .await
        {
            Ok(Response::Bool { value }) => value,
            _ => false,
        }
    }

    async fn stage(&self, r: &DesiredResource) -> Result<Split, TargetError> {
        match self
            .inner
            .call(Request::Stage {
                resource: WireResource::of(r),
            })
            .await?
        {
            Response::Staged { split } => Ok(split),
            r => Err(self.inner.unexpected(r)),
        }
    }

    async fn set_weight(&self, split: &Split, percent: u8) -> Result<(), TargetError> {
        self.done(Request::SetWeight {
            split: split.clone(),
            percent,
        })
        .await
    }

    async fn promote(&self, split: &Split, r: &DesiredResource) -> Result<(), TargetError> {
        self.done(Request::Promote {
            split: split.clone(),
            resource: WireResource::of(r),
        })
        .await
    }

    async fn abort(&self, split: &Split) -> Result<(), TargetError> {
        self.done(Request::Abort {
            split: split.clone(),
        })
        .await
    }

    async fn crashed(&self, split: &Split) -> Option<String> {
        match self
            .inner
            .call(Request::Crashed {
                split: split.clone(),
            })
            .await
        {
            Ok(Response::Crashed { reason }) => reason,
            _ => None,
        }
    }

    fn metrics(&self) -> Arc<dyn Metrics> {
        Arc::new(RemoteRouter(self.clone()))
    }
}

/// The router on a remote host, read over the same connection.
struct RemoteRouter(RemoteHost);

#[async_trait::async_trait]
impl Metrics for RemoteRouter {
    fn describe(&self) -> String {
        format!(
            "the router of host {} ({}, over SSH)",
            self.0.inner.name,
            self.0.dest()
        )
    }

    async fn counters(&self, split: &Split) -> Result<(Counters, Counters), MetricsError> {
        match self
            .0
            .inner
            .call(Request::Counters {
                split: split.clone(),
            })
            .await
        {
            Ok(Response::Counters { baseline, canary }) => Ok((baseline, canary)),
            Ok(r) => Err(MetricsError::Unavailable {
                source_name: self.describe(),
                reason: format!("unexpected answer: {r:?}"),
            }),
            Err(e) => Err(MetricsError::Unavailable {
                source_name: self.describe(),
                reason: e.to_string(),
            }),
        }
    }
}

fn op_name(req: &Request) -> &'static str {
    match req {
        Request::Ping => "ping",
        Request::Observe { .. } => "observe",
        Request::Prepare { .. } => "prepare",
        Request::Apply { .. } => "apply",
        Request::Delete { .. } => "delete",
        Request::Maintain => "maintain",
        Request::Marked => "marked",
        Request::Splittable { .. } => "splittable",
        Request::Stage { .. } => "stage",
        Request::SetWeight { .. } => "set-weight",
        Request::Promote { .. } => "promote",
        Request::Abort { .. } => "abort",
        Request::Crashed { .. } => "crashed",
        Request::Counters { .. } => "counters",
    }
}

/// The last lines of a command's stderr, for an error.
fn tail(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(3)..].join("; ");
    if tail.is_empty() {
        "(no output)".into()
    } else {
        tail
    }
}

/// `uname -s` of this agent's platform.
fn uname_os() -> &'static str {
    match std::env::consts::OS {
        "linux" => "Linux",
        "macos" => "Darwin",
        "freebsd" => "FreeBSD",
        other => other,
    }
}

/// `uname -m` of this agent's platform.
fn uname_machine() -> &'static str {
    match std::env::consts::ARCH {
        "aarch64" => "aarch64",
        "x86_64" => "x86_64",
        other => other,
    }
}
