//! The real backends behind the core's ports: systemd over zbus, podman's argv, btrfs, SQLite.
pub mod btrfs;
pub mod podman;
pub mod sqlite;
pub mod systemd;
