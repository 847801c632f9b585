//! sluice's core: the pipeline stages as typed modules, and the traits that
//! every side effect (git, targets, state store, clock) sits behind.
//!
//! source ──► snapshot ──► render ──► plan ──► rollout ──► record
//!
//! The pure stages (`model`, `render`, `plan`, `diff`) do no I/O; `engine`
//! drives them over the traits in `source`, `target`, `store` and `clock`.
#![forbid(unsafe_code)]

pub mod analysis;
pub mod clock;
pub mod diff;
pub mod engine;
pub mod flags;
pub mod gate;
pub mod managed;
pub mod model;
pub mod plan;
pub mod policy;
pub mod progressive;
pub mod render;
pub mod resource;
pub mod source;
pub mod store;
pub mod target;
pub mod traffic;
pub mod window;
