//! sluice's host target: supervised processes, files, routes and artifacts
//! on the machine the agent runs on.
#![forbid(unsafe_code)]

pub mod instance;
mod split;
pub mod supervise;
mod target;

pub use split::{counters_of, RouterMetrics};
pub use target::{HostConfig, HostTarget};
