//! `sluice host-exec`: the remote end of a host target reached over SSH.
//! The agent runs it on the host (the binary it installed there) and
//! speaks typed JSON with it: with `--serve`, one conversation per
//! connection (a request per line on stdin, an answer per line on stdout,
//! matched by id, requests served at once); without, one request and one
//! answer. Every operation runs the same host-target code as on the
//! agent's own machine. Processes, supervisors and the router it starts
//! are detached: they outlive the SSH session, and the next call adopts
//! them.
//!
//! # Guarantees
//! - Operations that change the host hold an exclusive lock on the host's
//!   state folder: two agents (or two requests) never change one host at
//!   once.
//! - Logs go to stderr (the agent keeps them with a failed call's error);
//!   stdout carries answers only.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use sluice_host::wire::{self, Envelope, Reply, Request, Response};
use sluice_host::{HostConfig, HostTarget};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};

/// Largest request accepted (a commit's resources for one host, with the
/// repository files they need).
const MAX_REQUEST: u64 = 256 << 20;

/// The folder this host keeps sluice's state in.
fn home(dir: Option<PathBuf>) -> PathBuf {
    if let Some(d) = dir.or_else(|| std::env::var_os("SLUICE_HOME").map(PathBuf::from)) {
        return d;
    }
    if nix::unistd::Uid::effective().is_root() {
        return PathBuf::from("/var/lib/sluice");
    }
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"))
        .join(".local/share/sluice")
}

/// Holds the host's write lock (taken off the async runtime: it blocks).
async fn lock(path: PathBuf) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    tokio::task::spawn_blocking(move || {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| anyhow::anyhow!("locking the host: {e}"))
    })
    .await?
}

/// One request, under the host's lock if it changes the host.
async fn answer(t: &HostTarget, lock_path: &Path, req: Request) -> Response {
    let _held = if req.writes() {
        match lock(lock_path.to_path_buf()).await {
            Ok(l) => Some(l),
            Err(e) => {
                return Response::Error {
                    error: wire::WireError::Unavailable {
                        target: "host".into(),
                        reason: e.to_string(),
                    },
                }
            }
        }
    } else {
        None
    };
    wire::serve(t, req).await
}

pub async fn main(
    target: String,
    dir: Option<PathBuf>,
    router_admin: Option<SocketAddr>,
    serve: bool,
) -> anyhow::Result<ExitCode> {
    crate::setup::logging();
    let home = home(dir);
    let exe = std::env::current_exe()?;
    let extra_path = exe
        .parent()
        .map(|p| vec![p.to_path_buf()])
        .unwrap_or_default();
    let state_dir = home.join("host").join(&target);
    std::fs::create_dir_all(&state_dir)?;
    let lock_path = state_dir.join("host-exec.lock");
    let t = Arc::new(HostTarget::new(HostConfig {
        name: target.clone(),
        state_dir,
        file_root: home.join("files").join(&target),
        exe,
        port_range: 20000..=29999,
        extra_path,
        router_admin,
    })?);
    if !serve {
        let mut input = Vec::new();
        tokio::io::stdin()
            .take(MAX_REQUEST + 1)
            .read_to_end(&mut input)
            .await?;
        anyhow::ensure!(
            input.len() as u64 <= MAX_REQUEST,
            "request over {MAX_REQUEST} bytes"
        );
        let req: Request = serde_json::from_slice(&input)
            .map_err(|e| anyhow::anyhow!("reading the request: {e}"))?;
        let mut line = serde_json::to_vec(&answer(&t, &lock_path, req).await)?;
        line.push(b'\n');
        let mut out = tokio::io::stdout();
        out.write_all(&line).await?;
        out.flush().await?;
        return Ok(ExitCode::SUCCESS);
    }
    // A conversation: until the agent closes stdin (or the connection
    // goes), then the requests in flight finish.
    let mut input = tokio::io::BufReader::new(tokio::io::stdin());
    let out = Arc::new(tokio::sync::Mutex::new(tokio::io::stdout()));
    let lock_path = Arc::new(lock_path);
    let mut running = tokio::task::JoinSet::new();
    loop {
        let mut line = Vec::new();
        let n = (&mut input)
            .take(MAX_REQUEST + 1)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            break;
        }
        anyhow::ensure!(
            line.len() as u64 <= MAX_REQUEST,
            "request over {MAX_REQUEST} bytes"
        );
        let Envelope { id, request } =
            serde_json::from_slice(&line).map_err(|e| anyhow::anyhow!("reading a request: {e}"))?;
        let (t, out, lock_path) = (t.clone(), out.clone(), lock_path.clone());
        running.spawn(async move {
            let response = answer(&t, &lock_path, request).await;
            let Ok(mut line) = serde_json::to_vec(&Reply { id, response }) else {
                return;
            };
            line.push(b'\n');
            let mut out = out.lock().await;
            if out.write_all(&line).await.is_ok() {
                let _ = out.flush().await;
            }
        });
        // Finished requests are collected as the conversation goes on.
        while running.try_join_next().is_some() {}
    }
    while running.join_next().await.is_some() {}
    Ok(ExitCode::SUCCESS)
}
