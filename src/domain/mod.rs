//! The domain: the host's own vocabulary, free of any external system (ids, states, run
//! configs, limits, snapshot names and retention).
pub mod idle;
pub mod ids;
pub mod images;
pub mod limits;
pub mod master;
pub mod moves;
pub mod phases;
pub mod project;
pub mod reserve;
pub mod snapshots;
pub mod ssh_keys;
