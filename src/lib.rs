//! cocalc-project-host: a systemd-native runner node for CoCalc-style multi-project hosting.
//!
//! The layout (docs/architecture.md has the map):
//! - `domain`: the host's own vocabulary (project ids, states, run configs, limits, snapshot
//!   names and retention), free of any external system;
//! - `core`: the project lifecycle and storage logic, per-project locks, reconcile, and the
//!   owner of every task (`core::tasks`); it speaks only through `ports`;
//! - `ports`: the small async traits the core needs (`Units`, `Storage`, `Store`);
//! - `backends`: what answers the ports: systemd over zbus with podman's argv (`units`,
//!   `systemd`, `podman`), `btrfs`, `sqlite`, and `sim`, the in-memory one for in-process tests;
//! - adapters over the core: `http` (with `auth`), `dbus`, `client` (the CLI's side);
//! - `config`, `activation` (socket activation, sd_notify), `logging`, `seccomp`, and `cmd`, the
//!   one runner of external programs.
pub mod activation;
pub mod auth;
pub mod backends;
pub mod client;
pub mod cmd;
pub mod config;
pub mod core;
pub mod dbus;
pub mod domain;
pub mod http;
pub mod logging;
pub mod ports;
pub mod seccomp;
pub mod units;

// transitional: removed when adapters move (i11-wire) and config/auth use the new paths (i11-config)
pub mod host {
    //! The core under its old name.
    pub use crate::core::*;
}
// transitional: removed when adapters move (i11-wire) and config/auth use the new paths (i11-config)
pub use backends::systemd;
// transitional: removed when adapters move (i11-wire) and config/auth use the new paths (i11-config)
pub use domain::{limits, project}; // also tests/props.rs (project)
// `snapshots` stays at the top too while tests/e2e/storage.rs imports it from there
// transitional: removed when adapters move (i11-wire) and tests/e2e/storage.rs uses domain::snapshots
pub use domain::snapshots;
