//! cocalc-project-host: a systemd-native runner node for CoCalc-style multi-project hosting.
//!
//! `host` is the core; `http` and `dbus` are thin adapters over it; `systemd`, `podman`, `btrfs`
//! and `store` each speak to one external system; `cmd` runs every external program.
pub mod activation;
pub mod auth;
pub mod btrfs;
pub mod client;
pub mod cmd;
pub mod config;
pub mod dbus;
pub mod egress;
pub mod host;
pub mod http;
pub mod idmap;
pub mod images;
pub mod journal;
pub mod limits;
pub mod logging;
pub mod podman;
pub mod project;
pub mod seccomp;
pub mod snapshots;
pub mod store;
pub mod systemd;
