//! sluice's Kubernetes target: server-side apply of any kind found by
//! discovery, an inventory so that only what sluice created is pruned,
//! health per kind, canaries through Gateway API HTTPRoute weights, and
//! leader election with a Lease.
//!
//! Tested against the in-process fake API server (`sluice-kube-fake`),
//! which answers as the recorded kube-apiserver 1.32 exchanges do.

pub mod canary;
pub mod client;
pub mod health;
pub mod kustomize;
pub mod lease;
pub mod mirror;
pub mod target;

pub use client::{Cluster, KubeError};
pub use lease::Lease;
pub use target::KubeTarget;
