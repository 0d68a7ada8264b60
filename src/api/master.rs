//! The master protocol's messages (`docs/master-protocol.md`; the master side's JSON Schema is
//! `docs/master-protocol.schema.json`, checked against these in the tests), and `GET /host`.
use serde::{Deserialize, Serialize};

use crate::api::{ErrorKind, WireError};
use crate::domain::master::{LinkState, Report};
use crate::domain::project::ProjectState;

/// What the host has to offer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Capacity {
    /// CPUs the host has.
    pub cores: u64,
    /// Memory, bytes.
    pub memory_bytes: u64,
    /// Size of the project storage, bytes.
    pub disk_total_bytes: u64,
    /// Free space on the project storage, bytes.
    pub disk_free_bytes: u64,
}

/// `POST /register`: sent on start and after every reconnect.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Register {
    /// The host's id (persisted in its store).
    pub host_id: String,
    /// A new id at every daemon start.
    pub session_id: String,
    /// The kernel's boot id.
    pub boot_id: String,
    /// `master.name`.
    pub name: String,
    /// `master.region`.
    pub region: Option<String>,
    /// `master.public_url`: where the host's proxy is reached.
    pub public_url: Option<String>,
    /// `master.ssh_endpoint`: where the host's SSH gateway is reached.
    pub ssh_endpoint: Option<String>,
    /// The daemon's version.
    pub version: String,
    /// What it has.
    pub capacity: Capacity,
    /// The master public keys the host trusts (PEM), in force now.
    pub public_keys: Vec<String>,
    /// The host's SSH host key (OpenSSH public key line), once it has one.
    pub ssh_host_key: Option<String>,
    /// When it was sent (ms since the epoch).
    pub sent_at_ms: u64,
}

/// The master's answer to `register`: every field is optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterAnswer {
    /// A new set of master public keys (PEM) replacing the host's (none: keep them).
    #[serde(default)]
    pub public_keys: Option<Vec<String>>,
    /// Token ids (`jti`) to refuse from now on (kept as long as a token can live).
    #[serde(default)]
    pub revoked: Vec<String>,
}

/// PSI averages over 10 s (percent of time some task waited), where the kernel has them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Pressure {
    /// CPU.
    pub cpu: Option<f64>,
    /// Memory.
    pub memory: Option<f64>,
    /// IO.
    pub io: Option<f64>,
}

/// `POST /heartbeat`: every `master.heartbeat_interval`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The host's id.
    pub host_id: String,
    /// The daemon start it comes from.
    pub session_id: String,
    /// Projects with a unit up.
    pub running: u64,
    /// Projects the host knows.
    pub known: u64,
    /// Load averages over 1, 5 and 15 minutes.
    pub load: [f64; 3],
    /// Memory, bytes.
    pub memory_total_bytes: u64,
    /// Memory available, bytes.
    pub memory_available_bytes: u64,
    /// Pressure stall information.
    pub pressure: Pressure,
    /// Free space on the project storage, bytes.
    pub disk_free_bytes: u64,
    /// Reports waiting to be delivered.
    pub outbox_depth: u64,
    /// When it was sent (ms since the epoch).
    pub sent_at_ms: u64,
}

/// `POST /project-state`: queued reports, oldest first, sequence numbers increasing.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProjectStates {
    /// The host's id.
    pub host_id: String,
    /// The daemon start it comes from.
    pub session_id: String,
    /// The reports.
    pub reports: Vec<Report>,
}

/// The master's answer to `project-state`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportAnswer {
    /// Every report up to this sequence number is had (the host forgets them).
    pub acked: u64,
}

/// The link's state as `GET /host`, D-Bus and the CLI show it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LinkStatus {
    /// standalone, connecting, connected, offline
    pub state: LinkState,
    /// `master.url` (none: standalone).
    pub url: Option<String>,
    /// Reports waiting.
    pub outbox_depth: u64,
    /// The last failure, while not connected.
    pub last_error: Option<String>,
    /// The last successful exchange (ms since the epoch).
    pub last_contact_ms: Option<u64>,
}

/// `GET /host`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostView {
    /// The host's id.
    pub host_id: String,
    /// The daemon's version.
    pub version: String,
    /// What it has.
    pub capacity: Capacity,
    /// Projects with a unit up.
    pub running: u64,
    /// Projects the host knows.
    pub known: u64,
    /// The master link.
    pub master: LinkStatus,
    /// The SSH gateway's host key (OpenSSH public key line), once it has one.
    pub ssh_host_key: Option<String>,
}

/// Parses the query of `GET /projects`: nothing, or `state=<opened|starting|running|stopping>`.
pub fn parse_list_query(query: Option<&str>) -> Result<Option<ProjectState>, WireError> {
    let mut state = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let bad = |m: String| WireError::new(ErrorKind::InvalidQuery, m);
        match pair.split_once('=') {
            Some(("state", v)) if state.is_none() => {
                state = Some(
                    serde_json::from_value::<ProjectState>(serde_json::Value::String(v.into()))
                        .map_err(|_| {
                            bad(format!(
                                "state must be opened, starting, running or stopping, not {:?}",
                                v.chars().take(40).collect::<String>()
                            ))
                        })?,
                );
            }
            Some(("state", _)) => return Err(bad("state is given twice".into())),
            _ => {
                return Err(bad(format!(
                    "unknown query parameter {:?} (GET /projects takes state=)",
                    pair.chars().take(40).collect::<String>()
                )));
            }
        }
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_queries() {
        assert_eq!(parse_list_query(None).unwrap(), None);
        assert_eq!(parse_list_query(Some("")).unwrap(), None);
        assert_eq!(
            parse_list_query(Some("state=running")).unwrap(),
            Some(ProjectState::Running)
        );
        assert_eq!(
            parse_list_query(Some("state=opened")).unwrap(),
            Some(ProjectState::Opened)
        );
        for bad in [
            "state=x",
            "state=running&state=opened",
            "foo=1",
            "state",
            "state=Running",
        ] {
            let e = parse_list_query(Some(bad)).unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidQuery, "{bad}");
        }
    }
}
