//! Everything that crosses the network goes through the git command line,
//! as Argo CD does: libgit2 speaks only protocol v0, so every poll of a
//! GitHub-sized repository would download its whole ref list (18,000 refs,
//! 1.2 MB), where git's protocol v2 asks only for the watched branch. git2
//! keeps reading objects from the mirror.
//!
//! # Guarantees
//! - Every run has a deadline: the connection (and a listing) must finish
//!   within the connect timeout, a transfer must make progress at least
//!   every stall timeout. Past either, git and everything it started (ssh,
//!   `git-remote-https`) are killed as a process group.
//! - git gets a clean environment: no variable of the agent's (tokens
//!   included) reaches it but PATH, HOME, locale and proxy settings, and no
//!   user or system git configuration applies.
//! - An https token is handed to git by a credential helper (this binary,
//!   `sluice git-credential`) that answers only for the repository's
//!   scheme, host and port: a redirect to another origin gets nothing. The
//!   token never appears in an argument or an environment variable; when
//!   it came from one, it sits in a 0600 file in the mirror's folder for
//!   the length of the run.
//! - ssh runs as the system OpenSSH with host keys checked strictly
//!   against the configured known_hosts files (never trust on first use),
//!   in batch mode (no prompt), with the ssh config file honoured.
//!
//! # Caveats
//! An unchanged poll is one protocol v2 `ls-refs` with the branch as its
//! prefix; only the first fetch is shallow (depth 1), later ones fetch the
//! new commits since the last. A force-push to an unrelated history makes
//! the next fetch download that history whole.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;

use crate::mirror::{Auth, Secret};

/// How long git may take, by what it is waiting for.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// Connecting and listing the remote's refs.
    pub connect: Duration,
    /// A transfer with no progress at all for this long is stalled.
    pub stall: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(15),
            stall: Duration::from_secs(60),
        }
    }
}

/// How ssh is run.
#[derive(Clone, Debug, Default)]
pub struct SshOptions {
    /// known_hosts files checked (besides /etc/ssh/ssh_known_hosts);
    /// empty: ~/.ssh/known_hosts.
    pub known_hosts: Vec<PathBuf>,
    /// An ssh config file instead of ~/.ssh/config.
    pub config: Option<PathBuf>,
}

/// What failed, so the source can say it in the words of the cause.
#[derive(Debug)]
pub enum Failure {
    /// No answer in time (connect, listing, or a stalled transfer).
    Timeout(String),
    /// The server refused the credential.
    Rejected(String),
    /// The server's ssh host key is not in the known_hosts files.
    UnknownHostKey(String),
    /// The server's ssh host key differs from the one recorded.
    ChangedHostKey(String),
    /// The TLS certificate could not be verified.
    Tls(String),
    /// The branch or ref does not exist on the remote.
    NoSuchRef(String),
    /// The remote could not be reached (refused, no route, no such host)
    /// or is not a git server.
    Unreachable(String),
    /// Anything else git said.
    Other(String),
}

impl Failure {
    pub fn message(&self) -> &str {
        match self {
            Failure::Timeout(m)
            | Failure::Rejected(m)
            | Failure::UnknownHostKey(m)
            | Failure::ChangedHostKey(m)
            | Failure::Tls(m)
            | Failure::NoSuchRef(m)
            | Failure::Unreachable(m)
            | Failure::Other(m) => m,
        }
    }
}

/// The git command line for one repository.
#[derive(Clone)]
pub struct Transport {
    /// The URL as git gets it.
    pub url: String,
    pub auth: Auth,
    pub ssh: SshOptions,
    pub ca_file: Option<PathBuf>,
    pub timeouts: Timeouts,
    /// This binary: git runs it as its credential helper, ssh as its
    /// passphrase prompt.
    pub helper: PathBuf,
    /// A private folder (0700) for the files that hand secrets over.
    pub scratch: PathBuf,
}

/// What one run printed.
pub struct Ran {
    pub stdout: String,
}

/// A file holding a secret for the length of one run, deleted after.
struct SecretFile(PathBuf);

impl SecretFile {
    fn write(dir: &Path, secret: &Secret) -> std::io::Result<SecretFile> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let name = format!(
            "secret-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        );
        let path = dir.join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        f.write_all(secret.expose().as_bytes())?;
        Ok(SecretFile(path))
    }
}

impl Drop for SecretFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Variables of the agent's environment that git and ssh may see: where
/// programs are, the user's home (ssh's own files), the locale, and the
/// proxies the network needs.
pub fn inherited_env() -> Vec<(String, String)> {
    const KEEP: [&str; 10] = [
        "PATH",
        "HOME",
        "USER",
        "LANG",
        "TZ",
        // The user's ssh agent, for ssh repositories without a key file.
        "SSH_AUTH_SOCK",
        "HTTPS_PROXY",
        "HTTP_PROXY",
        "NO_PROXY",
        "ALL_PROXY",
    ];
    std::env::vars()
        .filter(|(k, _)| {
            let upper = k.to_ascii_uppercase();
            KEEP.contains(&upper.as_str()) || k.starts_with("LC_")
        })
        .collect()
}

/// `'…'` quoting for a shell word (git runs `!` helpers through sh).
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The scheme, host and port a URL talks to (`https://host:443`).
pub fn origin(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split('/').next()?;
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let default = match scheme {
        "https" => 443,
        "http" => 80,
        "ssh" => 22,
        "git" => 9418,
        _ => 0,
    };
    let (name, port) = match host.rsplit_once(':') {
        Some((n, p)) if !n.ends_with(']') || host.starts_with('[') => (n, p.parse::<u16>().ok()?),
        _ => (host, default),
    };
    Some(format!(
        "{}://{}:{port}",
        scheme.to_ascii_lowercase(),
        name.to_ascii_lowercase()
    ))
}

impl Transport {
    /// `git ls-remote --symref <url> HEAD`: the remote's default branch.
    pub async fn default_branch(&self) -> Result<Option<String>, Failure> {
        let ran = self
            .run(
                None,
                &["ls-remote", "--symref", "--", &self.url, "HEAD"],
                false,
            )
            .await?;
        Ok(ran.stdout.lines().find_map(|l| {
            l.strip_prefix("ref: ")
                .and_then(|r| r.strip_suffix("\tHEAD"))
                .and_then(|r| r.strip_prefix("refs/heads/"))
                .map(str::to_string)
        }))
    }

    /// Fetches `refspec` into the mirror: shallow (`depth`) or the commits
    /// since what the mirror has.
    pub async fn fetch(
        &self,
        mirror: &Path,
        refspec: &str,
        depth: Option<u32>,
    ) -> Result<(), Failure> {
        let depth_arg = depth.map(|d| format!("--depth={d}"));
        let mut args = vec![
            "fetch",
            "--no-tags",
            "--no-write-fetch-head",
            "--no-recurse-submodules",
            "--progress",
        ];
        if let Some(d) = &depth_arg {
            args.push(d);
        }
        args.extend(["--", &self.url, refspec]);
        self.run(Some(mirror), &args, true).await.map(|_| ())
    }

    /// Deepens the mirror's shallow history by `by` commits.
    pub async fn deepen(&self, mirror: &Path, refspec: &str, by: u32) -> Result<(), Failure> {
        let deepen = format!("--deepen={by}");
        let args = [
            "fetch",
            "--no-tags",
            "--no-write-fetch-head",
            "--progress",
            &deepen,
            "--",
            &self.url,
            refspec,
        ];
        self.run(Some(mirror), &args, true).await.map(|_| ())
    }

    /// Pushes `refspec` from the mirror.
    pub async fn push(&self, mirror: &Path, refspec: &str) -> Result<(), Failure> {
        let args = [
            "push",
            "--progress",
            "--porcelain",
            "--",
            &self.url,
            refspec,
        ];
        self.run(Some(mirror), &args, true).await.map(|_| ())
    }

    /// Consolidates the mirror's packs into one (local work: no deadline
    /// but a generous one).
    pub async fn repack(&self, mirror: &Path) -> Result<(), Failure> {
        let mut local = self.clone();
        local.auth = Auth::None;
        local.timeouts = Timeouts {
            connect: Duration::from_secs(600),
            stall: Duration::from_secs(600),
        };
        local
            .run(Some(mirror), &["repack", "-a", "-d", "-q"], false)
            .await
            .map(|_| ())
    }

    /// Runs git on the mirror (or outside any repository), under the
    /// deadlines of [`Timeouts`]; `transfer` runs may take as long as they
    /// keep making progress.
    async fn run(&self, dir: Option<&Path>, args: &[&str], transfer: bool) -> Result<Ran, Failure> {
        let mut cmd = tokio::process::Command::new("git");
        cmd.env_clear()
            .envs(inherited_env())
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("LC_ALL", "C");
        // Configuration as arguments: none of it is secret.
        let stall = self.timeouts.stall.as_secs().max(1).to_string();
        let mut config: Vec<String> = vec![
            "protocol.version=2".into(),
            "http.lowSpeedLimit=1".into(),
            format!("http.lowSpeedTime={stall}"),
            "gc.auto=0".into(),
            "maintenance.auto=false".into(),
            "fetch.writeCommitGraph=false".into(),
            // Blobs over 1 MiB are streamed to disk, not inflated in
            // memory, by index-pack and repack: a 300 MB file pushed by
            // mistake costs 5 MB of memory, not 300 (it is then refused
            // from its size in the object header, never read).
            "core.bigFileThreshold=1m".into(),
            "core.askPass=".into(),
            // Only a helper of ours: none from any configuration.
            "credential.helper=".into(),
        ];
        if let Some(ca) = &self.ca_file {
            config.push(format!("http.sslCAInfo={}", ca.display()));
        }
        let mut _secret_file = None;
        match &self.auth {
            Auth::Token { token, file } => {
                let path = match file {
                    Some(f) => f.clone(),
                    None => {
                        let f = SecretFile::write(&self.scratch, token).map_err(|e| {
                            Failure::Other(format!("handing the token to git: {e}"))
                        })?;
                        let p = f.0.clone();
                        _secret_file = Some(f);
                        p
                    }
                };
                if let Some(origin) = origin(&self.url) {
                    config.push(format!(
                        "credential.helper=!{} git-credential --origin {} --token-file {}",
                        sh_quote(&self.helper.display().to_string()),
                        sh_quote(&origin),
                        sh_quote(&path.display().to_string()),
                    ));
                }
            }
            Auth::SshKey { .. } | Auth::SshAgent | Auth::None => {}
        }
        if self.is_ssh() {
            config.push(format!("core.sshCommand={}", self.ssh_command()));
            if let Auth::SshKey {
                passphrase: Some(p),
                passphrase_file,
                ..
            } = &self.auth
            {
                let path = match passphrase_file {
                    Some(f) => f.clone(),
                    None => {
                        let f = SecretFile::write(&self.scratch, p).map_err(|e| {
                            Failure::Other(format!("handing the key's passphrase to ssh: {e}"))
                        })?;
                        let path = f.0.clone();
                        _secret_file = Some(f);
                        path
                    }
                };
                cmd.env("SSH_ASKPASS", &self.helper)
                    .env("SSH_ASKPASS_REQUIRE", "force")
                    .env("SLUICE_ASKPASS_FILE", path)
                    .env("DISPLAY", "sluice");
            }
        }
        for c in &config {
            cmd.arg("-c").arg(c);
        }
        if let Some(d) = dir {
            cmd.arg("-C").arg(d);
        }
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| Failure::Other(format!("running git: {e} (is git installed?)")))?;
        let group = child.id().map(|p| nix::unistd::Pid::from_raw(p as i32));
        let started = Instant::now();
        // Milliseconds after `started` of the last byte git printed.
        let progress = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let read = |pipe: Option<Box<dyn tokio::io::AsyncRead + Send + Unpin>>| {
            let progress = progress.clone();
            tokio::spawn(async move {
                let mut kept = Vec::new();
                let Some(mut pipe) = pipe else {
                    return kept;
                };
                let mut buf = [0u8; 8192];
                while let Ok(n) = pipe.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    progress.store(
                        started.elapsed().as_millis() as u64,
                        std::sync::atomic::Ordering::Relaxed,
                    );
                    // Progress lines run long; a listing is what matters.
                    if kept.len() < 4 << 20 {
                        kept.extend_from_slice(&buf[..n]);
                    }
                }
                kept
            })
        };
        let out_task = read(child.stdout.take().map(|p| Box::new(p) as Box<_>));
        let err_task = read(child.stderr.take().map(|p| Box::new(p) as Box<_>));
        let connect = self.timeouts.connect;
        let stall = self.timeouts.stall;
        let deadline = |progress: &std::sync::atomic::AtomicU64| {
            let last = started
                + Duration::from_millis(progress.load(std::sync::atomic::Ordering::Relaxed));
            if transfer {
                // Connecting has its own deadline; after that, a transfer
                // only has to keep moving.
                (started + connect).max(last + stall)
            } else {
                started + connect
            }
        };
        let outcome = loop {
            let until = deadline(&progress);
            tokio::select! {
                status = child.wait() => break Ok(status),
                _ = tokio::time::sleep_until(until.into()) => {
                    if Instant::now() >= deadline(&progress) {
                        break Err(());
                    }
                }
            }
        };
        if outcome.is_err() {
            if let Some(g) = group {
                let _ = nix::sys::signal::killpg(g, nix::sys::signal::Signal::SIGKILL);
            }
            let _ = child.wait().await;
        }
        let out = out_task.await.unwrap_or_default();
        let err = err_task.await.unwrap_or_default();
        let stderr_text = String::from_utf8_lossy(&err).to_string();
        match outcome {
            Err(()) => {
                let waited = if transfer && started.elapsed() > self.timeouts.connect {
                    format!(
                        "the transfer made no progress for {}s (--git-stall-timeout)",
                        self.timeouts.stall.as_secs()
                    )
                } else {
                    format!(
                        "no answer within {}s (--git-connect-timeout)",
                        self.timeouts.connect.as_secs()
                    )
                };
                Err(Failure::Timeout(waited))
            }
            Ok(Ok(status)) if status.success() => Ok(Ran {
                stdout: String::from_utf8_lossy(&out).to_string(),
            }),
            Ok(Ok(_)) => match self.classify(&stderr_text) {
                Failure::Tls(m)
                    if !m.contains("its issuer")
                        && !m.contains("expired")
                        && !m.contains("not for this host") =>
                {
                    // git built on GnuTLS does not say why: ask the server
                    // ourselves, with the same trust.
                    let (url, ca, t) = (
                        self.url.clone(),
                        self.ca_file.clone(),
                        self.timeouts.connect,
                    );
                    let why =
                        tokio::task::spawn_blocking(move || tls_verdict(&url, ca.as_deref(), t))
                            .await
                            .ok()
                            .flatten();
                    Err(Failure::Tls(match why {
                        Some(why) => format!(
                            "the server's TLS certificate was refused: {}",
                            explain_tls(&why)
                        ),
                        None => m,
                    }))
                }
                f => Err(f),
            },
            Ok(Err(e)) => Err(Failure::Other(format!("waiting for git: {e}"))),
        }
    }

    fn is_ssh(&self) -> bool {
        self.url.starts_with("ssh://")
            || (!self.url.contains("://")
                && self.url.contains(':')
                && !Path::new(&self.url).exists())
    }

    /// The ssh git runs: strict host keys from the configured files, batch
    /// mode, keepalives that end a dead connection, the key if one is set.
    fn ssh_command(&self) -> String {
        let mut words: Vec<String> = vec!["ssh".into()];
        if let Some(c) = &self.ssh.config {
            words.push("-F".into());
            words.push(c.display().to_string());
        }
        let known: Vec<String> = if self.ssh.known_hosts.is_empty() {
            vec!["~/.ssh/known_hosts".into()]
        } else {
            self.ssh
                .known_hosts
                .iter()
                .map(|p| p.display().to_string())
                .collect()
        };
        let connect = self.timeouts.connect.as_secs().max(1);
        let alive = (self.timeouts.stall.as_secs() / 3).max(1);
        // ssh keeps the first value of an option: each is given once.
        let prompts = matches!(
            &self.auth,
            Auth::SshKey {
                passphrase: Some(_),
                ..
            }
        );
        let mut options = vec![
            // A passphrase comes from SSH_ASKPASS; nothing else may ask.
            format!("BatchMode={}", if prompts { "no" } else { "yes" }),
            "PasswordAuthentication=no".to_string(),
            "KbdInteractiveAuthentication=no".into(),
            "StrictHostKeyChecking=yes".into(),
            format!("UserKnownHostsFile={}", known.join(" ")),
            "GlobalKnownHostsFile=/etc/ssh/ssh_known_hosts".into(),
            format!("ConnectTimeout={connect}"),
            format!("ServerAliveInterval={alive}"),
            "ServerAliveCountMax=3".into(),
            // For the fingerprint of an unknown host key ("Server host
            // key: ..."); debug lines are left out of every message.
            "LogLevel=DEBUG1".into(),
        ];
        if let Auth::SshKey { .. } = &self.auth {
            options.push("IdentitiesOnly=yes".into());
        }
        for o in options {
            words.push("-o".into());
            words.push(o);
        }
        if let Auth::SshKey { private_key, .. } = &self.auth {
            words.push("-i".into());
            words.push(private_key.display().to_string());
        }
        words
            .iter()
            .map(|w| sh_quote(w))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// What git (or ssh, or curl through git) said, by cause.
    fn classify(&self, stderr: &str) -> Failure {
        let lines: Vec<&str> = stderr
            .lines()
            .map(str::trim)
            .filter(|l| {
                !l.is_empty()
                    && !l.starts_with("debug1:")
                    && !l.starts_with("remote: Counting")
                    && !l.starts_with("remote: Compressing")
                    && !l.starts_with("Receiving objects")
                    && !l.starts_with("Resolving deltas")
            })
            .collect();
        let text = lines.join("; ");
        let has = |s: &str| stderr.contains(s);
        if has("REMOTE HOST IDENTIFICATION HAS CHANGED")
            || has("Host key for") && has("has changed")
        {
            let fingerprint = stderr
                .lines()
                .skip_while(|l| !l.contains("The fingerprint for the"))
                .nth(1)
                .unwrap_or("")
                .trim()
                .trim_end_matches('.');
            let offending = stderr
                .lines()
                .find_map(|l| l.trim().strip_prefix("Offending "))
                .unwrap_or("");
            return Failure::ChangedHostKey(format!(
                "the server's ssh host key has CHANGED from the one recorded ({offending}); it now offers {fingerprint}. If the change is expected, replace that line; otherwise someone may be intercepting the connection"
            ));
        }
        if has("host key is known for") || has("Host key verification failed") {
            let known = if self.ssh.known_hosts.is_empty() {
                "~/.ssh/known_hosts and /etc/ssh/ssh_known_hosts".to_string()
            } else {
                format!(
                    "{} and /etc/ssh/ssh_known_hosts",
                    self.ssh
                        .known_hosts
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            let offered = stderr
                .lines()
                .find_map(|l| l.split("Server host key: ").nth(1))
                .map(|k| format!("it offers {}; ", k.trim()))
                .unwrap_or_default();
            return Failure::UnknownHostKey(format!(
                "the server's ssh host key is not in {known}; {offered}add it once its owner confirms the fingerprint (ssh-keyscan), or point --known-hosts at a file that has it ({text})"
            ));
        }
        if has("Authentication failed")
            || has("Permission denied (publickey")
            || has("Invalid username or password")
            || has("HTTP Basic: Access denied")
            || has("The requested URL returned error: 403")
        {
            return Failure::Rejected(text);
        }
        if has("could not read Username") || has("could not read Password") {
            return Failure::Rejected(format!(
                "the server asks for credentials and none are configured for {} ({text})",
                origin(&self.url).unwrap_or_default()
            ));
        }
        if has("SSL certificate problem")
            || has("server certificate verification failed")
            || has("SSL: no alternative certificate subject name")
            || has("certificate subject name")
        {
            return Failure::Tls(format!(
                "the server's TLS certificate was refused: {} ({text})",
                explain_tls(stderr)
            ));
        }
        if has("couldn't find remote ref") || has("Remote branch") && has("not found") {
            return Failure::NoSuchRef(text);
        }
        if has("unable to connect")
            || has("Could not resolve host")
            || has("Could not resolve hostname")
            || has("Connection refused")
            || has("Failed to connect")
            || has("No route to host")
            || has("Connection timed out")
            || has("not valid: is this a git repository")
            || has("does not appear to be a git repository")
            || has("Could not read from remote repository")
            || has("The remote end hung up unexpectedly") && !has("Receiving objects")
        {
            return Failure::Unreachable(text);
        }
        Failure::Other(if text.is_empty() {
            "git failed without saying why".into()
        } else {
            text
        })
    }
}

/// Why a TLS certificate does not verify, in the words a person acts on.
fn explain_tls(said: &str) -> String {
    let has = |s: &str| said.contains(s);
    if has("unable to get local issuer certificate")
        || has("self-signed certificate")
        || has("self signed certificate")
        || has("unable to verify the first certificate")
        || has("unknown issuer")
    {
        "its issuer is not a trusted authority (a private CA? pass --ca-file)".into()
    } else if has("certificate has expired") {
        "it has expired".into()
    } else if has("not yet valid") {
        "it is not valid yet (check the clock)".into()
    } else if has("mismatch") || has("subject name") || has("does not match") {
        "it is not for this host name".into()
    } else {
        format!("({})", said.lines().next().unwrap_or("").trim())
    }
}

/// The verdict of an OpenSSL handshake with the server (trusting the
/// system's authorities and `ca_file`), None if it verifies or cannot be
/// asked. Used to explain a refusal that git did not.
fn tls_verdict(url: &str, ca_file: Option<&Path>, timeout: Duration) -> Option<String> {
    use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
    use std::net::ToSocketAddrs;
    let authority = url.strip_prefix("https://")?.split('/').next()?;
    let hostport = authority.rsplit('@').next()?;
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || hostport.starts_with('[') => (h, p.parse().ok()?),
        _ => (hostport, 443u16),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let addr = (host, port).to_socket_addrs().ok()?.next()?;
    let tcp = std::net::TcpStream::connect_timeout(&addr, timeout).ok()?;
    tcp.set_read_timeout(Some(timeout)).ok()?;
    tcp.set_write_timeout(Some(timeout)).ok()?;
    let mut builder = SslConnector::builder(SslMethod::tls_client()).ok()?;
    if let Some(ca) = ca_file {
        builder.set_ca_file(ca).ok()?;
    }
    // Complete the handshake whatever the verdict, then read it.
    builder.set_verify(SslVerifyMode::NONE);
    let mut config = builder.build().configure().ok()?;
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        config.set_use_server_name_indication(false);
        config.set_verify_hostname(false);
        config.param_mut().set_ip(ip).ok()?;
    }
    let stream = config.connect(host, tcp).ok()?;
    let verdict = stream.ssl().verify_result();
    (verdict != openssl::x509::X509VerifyResult::OK).then(|| verdict.error_string().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_name_scheme_host_and_port() {
        assert_eq!(
            origin("https://tok@Git.Example.com/org/repo.git").as_deref(),
            Some("https://git.example.com:443")
        );
        assert_eq!(
            origin("https://127.0.0.1:8443/r.git").as_deref(),
            Some("https://127.0.0.1:8443")
        );
        assert_eq!(
            origin("http://[::1]:8080/r").as_deref(),
            Some("http://[::1]:8080")
        );
        assert_eq!(origin("git@example.com:org/r.git"), None);
    }

    #[test]
    fn shell_words_are_quoted() {
        assert_eq!(sh_quote("/a b/c'd"), "'/a b/c'\\''d'");
    }
}
