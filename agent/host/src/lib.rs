//! sluice's host target: supervised processes, files, routes and artifacts
//! on the machine the agent runs on.
#![forbid(unsafe_code)]

pub mod instance;
mod split;
pub mod supervise;
mod target;
pub mod wire;

pub use split::{counters_of, RouterMetrics};
pub use target::{HostConfig, HostTarget};

/// What a process the host target starts (a supervisor, a service, the
/// router) inherits from the agent's environment: where programs are, the
/// user, the locale and the time zone. Nothing else: the agent's tokens
/// (`--git-token-env`'s variable, forge and webhook secrets, any
/// `SLUICE_*`) and whatever else its environment holds stay with it.
pub fn inherited_env() -> std::collections::BTreeMap<String, String> {
    const KEEP: [&str; 8] = [
        "PATH", "HOME", "USER", "LOGNAME", "LANG", "TZ", "TMPDIR", "SHELL",
    ];
    std::env::vars()
        .filter(|(k, _)| KEEP.contains(&k.as_str()) || k.starts_with("LC_"))
        .collect()
}
