//! sluice's HTTP router: its own long-lived process (`sluice router`),
//! reconfigured live by the agent, measuring requests per version.
#![forbid(unsafe_code)]

mod proxy;

pub use proxy::{
    serve, serve_with, AdminClient, Backend, Histogram, RouteConfig, RouteStats, RouterConfig,
    RouterError, Stats, VersionStats,
};
