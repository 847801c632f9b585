//! `sluice host-exec`: the remote end of a host target reached over SSH.
//! An agent runs it on the host (the binary it installed there) with one
//! JSON [`Request`] on stdin; it runs that operation with the same
//! host-target code as on the agent's own machine and prints one JSON
//! [`Response`]. Processes, supervisors and the router it starts are
//! detached: they outlive the SSH session, and the next call adopts them.
//!
//! # Guarantees
//! - Operations that change the host hold an exclusive lock on the host's
//!   state folder: two agents (or two calls) never change one host at once.
//! - Logs go to stderr (the agent keeps them with a failed call's error);
//!   stdout carries the response only.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use sluice_host::wire::{self, Request, Response};
use sluice_host::{HostConfig, HostTarget};

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

pub async fn main(
    target: String,
    dir: Option<PathBuf>,
    router_admin: Option<SocketAddr>,
) -> anyhow::Result<ExitCode> {
    crate::setup::logging();
    let mut input = Vec::new();
    std::io::stdin()
        .take(MAX_REQUEST + 1)
        .read_to_end(&mut input)?;
    anyhow::ensure!(
        input.len() as u64 <= MAX_REQUEST,
        "request over {MAX_REQUEST} bytes"
    );
    let req: Request =
        serde_json::from_slice(&input).map_err(|e| anyhow::anyhow!("reading the request: {e}"))?;
    let home = home(dir);
    let exe = std::env::current_exe()?;
    let extra_path = exe
        .parent()
        .map(|p| vec![p.to_path_buf()])
        .unwrap_or_default();
    let state_dir = home.join("host").join(&target);
    std::fs::create_dir_all(&state_dir)?;
    // One change at a time on this host, whoever asks.
    let _lock = if req.writes() {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(state_dir.join("host-exec.lock"))?;
        Some(
            nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
                .map_err(|(_, e)| anyhow::anyhow!("locking the host: {e}"))?,
        )
    } else {
        None
    };
    let t = HostTarget::new(HostConfig {
        name: target.clone(),
        state_dir,
        file_root: home.join("files").join(&target),
        exe,
        port_range: 20000..=29999,
        extra_path,
        router_admin,
    })?;
    let resp: Response = wire::serve(&t, req).await;
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, &resp)?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}
