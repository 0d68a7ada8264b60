//! The ways in: each adapter turns its transport's requests into core calls and the core's
//! answers and errors into its transport's shapes, through the one wire schema in [`crate::api`].
pub mod cli;
pub mod connlimit;
pub mod dbus;
pub mod files;
pub mod http;
pub mod local_access;
pub mod move_cli;
pub mod moves;
pub mod observe_cli;
pub mod proxy;
pub mod sse;
pub mod ssh;
pub mod tls;
pub mod top;
