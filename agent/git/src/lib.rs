//! sluice's git source (git2): ls-remote first, fetch only when the watched
//! branch moved, read commits from the object database.
#![forbid(unsafe_code)]

mod mirror;

pub use mirror::{redact, validate_url, Auth, GitConfig, GitSource, Secret};
