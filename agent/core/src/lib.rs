//! sluice's core: the pipeline stages as typed modules, and the traits that
//! every side effect (git, targets, state store, clock) sits behind.
//!
//! source ──► snapshot ──► render ──► plan ──► guard ──► rollout ──► record
//!
//! The pure stages import in one direction: `source`, `duration`,
//! `analysis`, `flags` and `diff` need nothing else; `model` (what a user
//! writes) builds on those; `rollout` (the defaults by criticality) and
//! `topology` (loading `sluice.yaml` with them resolved) on `model`;
//! `render` on `topology`; `plan` on `render`; `guard` (the Rego
//! guardrails, offline) on `plan`. `engine` drives them over the traits in
//! `source`, `target`, `store` and `clock`.
#![forbid(unsafe_code)]

pub mod analysis;
pub mod clock;
pub mod diff;
pub mod duration;
pub mod engine;
pub mod error;
pub mod flags;
pub mod gate;
pub mod guard;
pub mod managed;
pub mod model;
pub mod plan;
pub mod progressive;
pub mod render;
pub mod resource;
pub mod rollout;
pub mod source;
pub mod store;
pub mod target;
pub mod topology;
pub mod traffic;
pub mod window;
pub mod yaml;
