//! The backends behind the core's ports (`crate::ports`): the real ones (systemd over zbus with
//! podman's argv in `units`, btrfs, SQLite) and a simulated one (`sim`) for in-process tests.
pub mod btrfs;
pub mod cgroup;
pub mod egress;
pub mod ids;
pub mod journal;
pub mod journal_read;
pub mod master;
pub mod netns;
pub mod outbox_sql;
pub mod podman;
pub mod procself;
pub mod safefs;
pub mod session;
pub mod sim;
pub mod sim_master;
pub mod sqlite;
pub mod systemd;
pub mod tls_client;
pub mod units;
