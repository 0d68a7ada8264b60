//! cocalc-project-host: a systemd-native runner node for CoCalc-style multi-project hosting.
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

// transitional: the old paths, until every file uses the new ones
pub mod host {
    pub use crate::core::*;
}
pub use backends::sqlite as store;
pub use backends::{btrfs, podman, systemd};
pub use domain::{limits, project, snapshots};
