//! The wire schema: the request and answer types every adapter (HTTP, D-Bus, CLI) speaks, the
//! parsers they share, and the one error table (kind → HTTP status + JSON code, D-Bus error
//! name, CLI exit code).
pub mod error;
pub mod master;
pub mod parse;
pub mod types;

pub use error::{ErrorKind, WireError};
pub use parse::{parse_body, parse_config_json, parse_id, parse_limits_json, parse_snapshot_name};
pub use types::*;
