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
//! - `api`: the wire schema shared by every adapter (request/answer types, parsers, the error
//!   table);
//! - `adapters`: thin layers over the core: `http` (with `auth`), `dbus`, `cli` (the CLI's side);
//! - `docgen`: the man pages and shell completions, made from the CLI and the config code;
//! - `config`, `activation` (socket activation, sd_notify), `logging`, `seccomp`, and `cmd`, the
//!   one runner of external programs.
pub mod activation;
pub mod adapters;
pub mod api;
pub mod auth;
pub mod backends;
pub mod cmd;
pub mod config;
pub mod core;
pub mod docgen;
pub mod domain;
pub mod logging;
pub mod ports;
pub mod seccomp;
pub mod units;
