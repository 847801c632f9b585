//! sluice's git source: the git command line for the network (protocol v2,
//! shallow first fetch, deadlines), git2 for reading commits from the
//! mirror's object database.
#![forbid(unsafe_code)]

pub mod credential;
mod mirror;
pub mod transport;

pub use mirror::{redact, validate_url, Auth, GitConfig, GitSource, Secret, KEEP_REFS, MAX_PACKS};
pub use transport::{SshOptions, Timeouts};
