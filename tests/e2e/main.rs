//! End-to-end tests: real systemd (PID 1), D-Bus, podman and btrfs in the testbed, against the
//! installed .deb. Run with `scripts/test` (root). Tests share one machine: run them with
//! `--test-threads=1`; each leaves the machine as it found it.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report
mod auth;
mod authority;
mod cgroup;
mod dbus;
mod files;
mod idle;
mod isolation;
mod lifecycle;
mod limits;
mod master;
mod move_streams;
mod moves;
mod observe;
mod packaging;
mod proxy;
mod spine;
mod ssh;
mod storage;
mod tb;
mod wire;
