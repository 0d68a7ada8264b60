//! cocalc-project-host: a systemd-native runner node for CoCalc-style multi-project hosting.
//!
//! `host` is the core; `adapters/` (http, dbus, cli) are thin adapters over it; `systemd`, `podman`, `btrfs`
//! and `store` each speak to one external system; `cmd` runs every external program.
pub mod activation;
pub mod adapters;
pub mod api;
pub mod auth;
pub mod btrfs;
pub mod cmd;
pub mod config;
pub mod host;
pub mod limits;
pub mod logging;
pub mod podman;
pub mod project;
pub mod seccomp;
pub mod snapshots;
pub mod store;
pub mod systemd;

// Transitional paths for code written before the adapters moved (tests/props.rs, open branches).
pub use adapters::{dbus, http};
