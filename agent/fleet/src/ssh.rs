//! One multiplexed OpenSSH connection per host.
//!
//! The system `ssh` client is the master of each connection (ControlMaster
//! on a socket in the agent's state folder), so `~/.ssh/config`,
//! known_hosts, keys and the ssh agent work as they do for `ssh` itself;
//! commands then go over the master's socket with the `openssh` crate's
//! native mux client: one TCP connection and one authentication per host,
//! no ssh process per command.
//!
//! # Guarantees
//! - Host keys are checked against known_hosts (`StrictHostKeyChecking
//!   yes`): an unknown or changed key fails the connection. Accepting new
//!   keys is an explicit option (`accept-new`), never the default.
//! - No password or passphrase prompt (`BatchMode yes`): a host that
//!   wants one fails with ssh's reason.
//! - The master gets the environment sluice passes to the processes it
//!   starts ([`sluice_host::inherited_env`]) plus `SSH_AUTH_SOCK`: none of
//!   the agent's tokens. That is why sluice starts the master itself
//!   (with the flags the crate's own builder passes) and resumes it with
//!   the crate, rather than let the crate start it with the agent's whole
//!   environment.
//! - Every step has a deadline: the connection (`ConnectTimeout` and a
//!   limit on the master's start), each command, and a dead peer is
//!   noticed by keepalives (`ServerAliveInterval` × 3).
//! - A master outlives the agent by `ControlPersist` idle seconds: a
//!   restarted agent finds it by its socket and goes on without a new
//!   handshake.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use openssh::{Session, Stdio};
use sha2::Digest as _;
use tokio::io::AsyncWriteExt as _;

/// How sluice reaches hosts over SSH (the agent's flags).
#[derive(Clone, Debug)]
pub struct SshOptions {
    /// `ssh -F`: an ssh config file instead of `~/.ssh/config`.
    pub config: Option<PathBuf>,
    /// `ssh -i` (with `IdentitiesOnly`): the one key to offer.
    pub identity: Option<PathBuf>,
    /// `UserKnownHostsFile`: where host keys are checked.
    pub known_hosts: Option<PathBuf>,
    /// `StrictHostKeyChecking accept-new` (trust on first use) instead of
    /// `yes`. Off by default.
    pub accept_new_host_keys: bool,
    /// TCP connect and handshake.
    pub connect_timeout: Duration,
    /// A read (observe, status) on a host.
    pub read_timeout: Duration,
    /// A change on a host (apply, stage, installing the binary): it may
    /// wait for processes to become ready.
    pub write_timeout: Duration,
    /// Keepalive: a peer silent for three of these is dead.
    pub alive_interval: Duration,
    /// How long a master with no command stays up.
    pub persist: Duration,
    /// Where control sockets and master logs live (mode 0700).
    pub control_dir: PathBuf,
}

impl Default for SshOptions {
    fn default() -> Self {
        SshOptions {
            config: None,
            identity: None,
            known_hosts: None,
            accept_new_host_keys: false,
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(600),
            alive_interval: Duration::from_secs(5),
            persist: Duration::from_secs(600),
            control_dir: std::env::temp_dir().join("sluice-ssh"),
        }
    }
}

/// What went wrong reaching a host.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("connecting to {dest}: {reason}")]
    Connect { dest: String, reason: String },
    #[error("{what} on {dest}: no answer within {}s", .after.as_secs())]
    Timeout {
        dest: String,
        what: String,
        after: Duration,
    },
    #[error("{what} on {dest}: {reason}")]
    Command {
        dest: String,
        what: String,
        reason: String,
    },
}

/// An SSH destination as the repository writes it: `[user@]host[:port]`,
/// `[user@][v6addr]:port`, or an alias of the ssh config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dest {
    pub user: Option<String>,
    pub host: String,
    pub port: Option<u16>,
}

impl Dest {
    pub fn parse(s: &str) -> Dest {
        let (user, rest) = match s.rsplit_once('@') {
            Some((u, h)) => (Some(u.to_string()), h),
            None => (None, s),
        };
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            match v6.split_once(']') {
                Some((h, p)) => (h, p.strip_prefix(':').and_then(|p| p.parse().ok())),
                None => (rest, None),
            }
        } else {
            match rest.rsplit_once(':') {
                // One colon: host:port. More: a bare IPv6 address.
                Some((h, p)) if !h.contains(':') => match p.parse() {
                    Ok(p) => (h, Some(p)),
                    Err(_) => (rest, None),
                },
                _ => (rest, None),
            }
        };
        Dest {
            user,
            host: host.to_string(),
            port,
        }
    }
}

impl std::fmt::Display for Dest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(u) = &self.user {
            write!(f, "{u}@")?;
        }
        match (self.port, self.host.contains(':')) {
            (Some(p), true) => write!(f, "[{}]:{p}", self.host),
            (Some(p), false) => write!(f, "{}:{p}", self.host),
            (None, _) => write!(f, "{}", self.host),
        }
    }
}

/// Round trips and bytes of one host's connection, since the agent started.
#[derive(Debug, Default)]
pub struct Traffic {
    pub commands: AtomicU64,
    pub sent: AtomicU64,
    pub received: AtomicU64,
    pub connects: AtomicU64,
}

/// The connection to one host: its master, started on first use and again
/// after it died.
pub struct Connection {
    dest: Dest,
    opts: Arc<SshOptions>,
    /// The control socket: named by the destination, so a restarted agent
    /// finds a master that is still up.
    ctl: PathBuf,
    session: tokio::sync::Mutex<Option<Arc<Session>>>,
    pub traffic: Arc<Traffic>,
}

/// What a command reads on its stdin.
pub enum Input<'a> {
    Bytes(&'a [u8]),
    /// A file, streamed (the binary installed on hosts: never held in
    /// memory, once per host).
    File(&'a Path),
}

/// What a command gave back.
pub struct Output {
    pub status: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Connection {
    pub fn new(dest: Dest, opts: Arc<SshOptions>) -> Connection {
        let key = hex::encode(sha2::Sha256::digest(dest.to_string().as_bytes()));
        let ctl = opts.control_dir.join(&key[..16]);
        Connection {
            dest,
            opts,
            ctl,
            session: tokio::sync::Mutex::new(None),
            traffic: Arc::default(),
        }
    }

    pub fn dest(&self) -> &Dest {
        &self.dest
    }

    /// The counters, for a task that outlives a borrow of the connection.
    pub fn traffic_handle(&self) -> Arc<Traffic> {
        self.traffic.clone()
    }

    fn connect_error(&self, reason: impl Into<String>) -> SshError {
        SshError::Connect {
            dest: self.dest.to_string(),
            reason: reason.into(),
        }
    }

    /// The live session: the one in hand if its master is up, else a
    /// master left by an earlier agent, else a new one.
    async fn session(&self) -> Result<Arc<Session>, SshError> {
        let mut held = self.session.lock().await;
        if let Some(s) = held.as_ref() {
            if s.check().await.is_ok() {
                return Ok(s.clone());
            }
            *held = None;
        }
        if self.ctl.exists() {
            let s = Session::resume_mux(self.ctl.clone().into_boxed_path(), None);
            if s.check().await.is_ok() {
                let s = Arc::new(s);
                *held = Some(s.clone());
                return Ok(s);
            }
            // A socket whose master is gone.
            let _ = std::fs::remove_file(&self.ctl);
        }
        self.launch_master().await?;
        let s = Arc::new(Session::resume_mux(
            self.ctl.clone().into_boxed_path(),
            None,
        ));
        // `ssh -f` returns once authenticated; the socket follows at once.
        let mut last = None;
        for _ in 0..50 {
            match s.check().await {
                Ok(()) => {
                    self.traffic.connects.fetch_add(1, Ordering::Relaxed);
                    *held = Some(s.clone());
                    return Ok(s);
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(self.connect_error(format!(
            "the ssh master did not answer on its socket: {}",
            last.map(|e| e.to_string()).unwrap_or_default()
        )))
    }

    /// Starts `ssh -M -N -f` for the destination.
    async fn launch_master(&self) -> Result<(), SshError> {
        let o = &self.opts;
        create_private_dir(&o.control_dir)
            .map_err(|e| self.connect_error(format!("{}: {e}", o.control_dir.display())))?;
        let log = self.ctl.with_extension("log");
        let _ = std::fs::remove_file(&log);
        let mut cmd = tokio::process::Command::new("ssh");
        cmd.arg("-M")
            .arg("-N")
            .arg("-f")
            .arg("-S")
            .arg(&self.ctl)
            .arg("-E")
            .arg(&log)
            .args([
                "-o",
                &format!("ControlPersist={}", o.persist.as_secs().max(1)),
            ])
            .args(["-o", "BatchMode=yes"])
            .args([
                "-o",
                if o.accept_new_host_keys {
                    "StrictHostKeyChecking=accept-new"
                } else {
                    "StrictHostKeyChecking=yes"
                },
            ])
            .args([
                "-o",
                &format!("ConnectTimeout={}", o.connect_timeout.as_secs().max(1)),
            ])
            .args([
                "-o",
                &format!("ServerAliveInterval={}", o.alive_interval.as_secs().max(1)),
            ])
            .args(["-o", "ServerAliveCountMax=3"]);
        if let Some(f) = &o.config {
            cmd.arg("-F").arg(f);
        }
        if let Some(k) = &o.identity {
            cmd.args(["-o", "IdentitiesOnly=yes"]).arg("-i").arg(k);
        }
        if let Some(k) = &o.known_hosts {
            cmd.arg("-o")
                .arg(format!("UserKnownHostsFile={}", k.display()));
        }
        if let Some(p) = self.dest.port {
            cmd.arg("-p").arg(p.to_string());
        }
        if let Some(u) = &self.dest.user {
            cmd.arg("-l").arg(u);
        }
        // `--`: a destination is never read as an option.
        cmd.arg("--").arg(&self.dest.host);
        cmd.env_clear()
            .envs(sluice_host::inherited_env())
            .envs(std::env::var_os("SSH_AUTH_SOCK").map(|v| ("SSH_AUTH_SOCK", v)))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| self.connect_error(format!("starting ssh: {e}")))?;
        let limit = o.connect_timeout + Duration::from_secs(10);
        let status = match tokio::time::timeout(limit, child.wait()).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(self.connect_error(e.to_string())),
            Err(_) => {
                return Err(SshError::Timeout {
                    dest: self.dest.to_string(),
                    what: "connecting".into(),
                    after: limit,
                })
            }
        };
        if !status.success() {
            let said = std::fs::read_to_string(&log).unwrap_or_default();
            let said: Vec<&str> = said
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            let tail = said[said.len().saturating_sub(3)..].join("; ");
            return Err(self.connect_error(if tail.is_empty() {
                format!("ssh exited with {status}")
            } else {
                tail
            }));
        }
        tracing::debug!(dest = %self.dest, "ssh master up");
        Ok(())
    }

    /// Runs `program args…` on the host with `input` on its stdin, within
    /// `limit`. A connection that fails is dropped, so the next command
    /// connects again.
    pub async fn run(
        &self,
        what: &str,
        program: &str,
        args: &[&str],
        input: Input<'_>,
        limit: Duration,
    ) -> Result<Output, SshError> {
        let attempt = async {
            let session = self.session().await?;
            let fail = |reason: String| SshError::Command {
                dest: self.dest.to_string(),
                what: what.to_string(),
                reason,
            };
            let mut child = session
                .command(program)
                .args(args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .await
                .map_err(|e| fail(e.to_string()))?;
            let mut stdin = child
                .stdin()
                .take()
                .ok_or_else(|| fail("no stdin".into()))?;
            // Written while the output is read: neither side's pipe fills.
            let writing = async move {
                let n = match input {
                    Input::Bytes(b) => {
                        stdin.write_all(b).await?;
                        b.len() as u64
                    }
                    Input::File(p) => {
                        let mut f = tokio::fs::File::open(p).await?;
                        tokio::io::copy(&mut f, &mut stdin).await?
                    }
                };
                stdin.shutdown().await?;
                Ok::<u64, std::io::Error>(n)
            };
            let (written, output) = tokio::join!(writing, child.wait_with_output());
            let output = output.map_err(|e| fail(e.to_string()))?;
            let sent = match written {
                Ok(n) => n,
                Err(e) if output.status.success() => {
                    return Err(fail(format!("sending the input: {e}")))
                }
                Err(_) => 0,
            };
            self.traffic.commands.fetch_add(1, Ordering::Relaxed);
            self.traffic.sent.fetch_add(sent, Ordering::Relaxed);
            self.traffic.received.fetch_add(
                (output.stdout.len() + output.stderr.len()) as u64,
                Ordering::Relaxed,
            );
            Ok(Output {
                status: output.status.code(),
                stdout: output.stdout,
                stderr: output.stderr,
            })
        };
        let started = std::time::Instant::now();
        let out = self.bounded(what, limit, attempt).await?;
        tracing::debug!(dest = %self.dest, what, ms = started.elapsed().as_millis() as u64, received = out.stdout.len(), "ssh command");
        Ok(out)
    }

    /// Runs `attempt` within `limit`; on a failure or a timeout the
    /// connection is forgotten, so the next call opens a new one.
    async fn bounded<T>(
        &self,
        what: &str,
        limit: Duration,
        attempt: impl std::future::Future<Output = Result<T, SshError>>,
    ) -> Result<T, SshError> {
        match tokio::time::timeout(limit, attempt).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                self.forget().await;
                Err(e)
            }
            Err(_) => {
                self.forget().await;
                Err(SshError::Timeout {
                    dest: self.dest.to_string(),
                    what: what.to_string(),
                    after: limit,
                })
            }
        }
    }

    /// Starts `program args…` on the host with its stdin, stdout and
    /// stderr piped, for a conversation (the host-target server): the
    /// caller reads and writes; dropping the child ends it.
    pub async fn open(
        &self,
        what: &str,
        program: &str,
        args: &[&str],
    ) -> Result<openssh::Child<Arc<Session>>, SshError> {
        let limit = self.opts.connect_timeout + self.opts.read_timeout;
        let attempt = async {
            let session = self.session().await?;
            session
                .arc_command(program)
                .args(args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .await
                .map_err(|e| SshError::Command {
                    dest: self.dest.to_string(),
                    what: what.to_string(),
                    reason: e.to_string(),
                })
        };
        self.bounded(what, limit, attempt).await
    }

    /// Drops the session in hand (its master may be dead); the next command
    /// checks and reconnects.
    pub async fn forget(&self) {
        *self.session.lock().await = None;
    }
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_parse_as_ssh_reads_them() {
        let d = |s: &str| Dest::parse(s);
        assert_eq!(
            d("deploy@10.0.0.1:2222"),
            Dest {
                user: Some("deploy".into()),
                host: "10.0.0.1".into(),
                port: Some(2222)
            }
        );
        assert_eq!(d("web-3").host, "web-3");
        assert_eq!(d("web-3").port, None);
        assert_eq!(d("root@[fd00::1]:22").host, "fd00::1");
        assert_eq!(d("root@[fd00::1]:22").port, Some(22));
        assert_eq!(d("fd00::1").host, "fd00::1");
        assert_eq!(d("fd00::1").port, None);
        for s in ["deploy@10.0.0.1:2222", "web-3", "root@[fd00::1]:22"] {
            assert_eq!(d(s).to_string(), s);
        }
    }
}
