//! The request and answer types of the API, shared by HTTP (as JSON), D-Bus and the CLI. Each
//! answer is built from the core's value in one `From`, serialized by serde for HTTP, and turned
//! into its D-Bus shape by a derive over the same struct, so the transports cannot disagree on a
//! field; the CLI decodes the bus's answers back into these types.
use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use zbus::{OwnedVariant, Variant};

use crate::core::{SnapshotInfo, SweepOutcome};
use crate::domain::limits::{ConfigView, Limits, LimitsUpdate};
use crate::domain::project::{DiskStatus, RunConfig, Status};

use super::error::{ErrorKind, WireError};

/// A D-Bus `a{sv}` as the methods take and return it.
pub type BusDict = HashMap<String, OwnedVariant>;

fn to_bus_dict(v: Variant<'_>) -> Result<BusDict, WireError> {
    let enc = |e: zbus::Error| WireError::new(ErrorKind::Internal, format!("cannot encode: {e}"));
    let m = HashMap::<String, Variant<'_>>::try_from(v).map_err(enc)?;
    m.into_iter()
        .map(|(k, v)| Ok((k, OwnedVariant::try_from(v).map_err(enc)?)))
        .collect()
}

fn from_bus_dict(d: &BusDict) -> Result<HashMap<String, Variant<'static>>, WireError> {
    d.iter()
        .map(|(k, v)| {
            let v = v.try_clone().map_err(|e| {
                WireError::new(ErrorKind::Internal, format!("cannot decode {k}: {e}"))
            })?;
            Ok((k.clone(), Variant::from(v)))
        })
        .collect()
}

fn decode_err(what: &str) -> impl Fn(zbus::Error) -> WireError + '_ {
    move |e| {
        WireError::new(
            ErrorKind::Internal,
            format!("unexpected {what} from the daemon: {e}"),
        )
    }
}

/// Disk quota and usage of a project's home, in bytes (`null` in JSON, absent on the bus: none
/// or unknown).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, Variant)]
#[zbus(signature = "dict")]
pub struct DiskAnswer {
    /// the limit in force
    pub quota: Option<u64>,
    /// referenced bytes (unknown when quotas are off)
    pub used: Option<u64>,
}

impl From<&DiskStatus> for DiskAnswer {
    fn from(d: &DiskStatus) -> DiskAnswer {
        DiskAnswer {
            quota: d.quota,
            used: d.used,
        }
    }
}

/// The host's project storage is below its reserve (present only then).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Variant)]
#[zbus(signature = "dict")]
pub struct StorageFullAnswer {
    /// bytes free
    pub free: u64,
    /// bytes the reserve (`storage.reserve`) keeps
    pub reserve: u64,
}

/// A project's status: `GET /projects/:id/status`, the bus's `GetProjectStatus` and the answers
/// of start and stop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Variant)]
#[zbus(signature = "dict")]
pub struct StatusAnswer {
    /// `opened | starting | running | stopping | frozen`
    pub state: String,
    /// this host's id
    pub server: String,
    /// the project's unit
    pub unit: String,
    /// the unit's `SubState`, when it has a unit
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub_state: Option<String>,
    /// PID of the unit's main process
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub main_pid: Option<u32>,
    /// memory used by the unit's cgroup, bytes
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_current: Option<u64>,
    /// when the unit became active, ms since the epoch
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<u64>,
    /// disk quota and usage, when the project has a home here
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskAnswer>,
    /// present when the host's project storage is below its reserve: starts, quota raises and
    /// writes that grow a home are refused until space is freed
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_full: Option<StorageFullAnswer>,
    /// ms per phase of the project's last start (while it runs, after a start by this daemon)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase_timings_ms: Option<PhaseTimingsAnswer>,
    /// why the project counts as active and when it is frozen or stopped for being idle
    /// (while its unit is up)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activity: Option<ActivityAnswer>,
}

/// A running project's activity (see `domain::idle`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, Variant)]
#[zbus(signature = "dict")]
pub struct ActivityAnswer {
    /// its last activity, ms since the epoch
    pub last_active_at: u64,
    /// seconds since then
    pub idle_s: u64,
    /// why it counts as active now: `ssh_session`, `connection`, `cpu`, `recent` (empty: idle)
    pub active: Vec<String>,
    /// SSH sessions open
    pub ssh_sessions: u32,
    /// connections open into it (proxy, WebSockets, SSH -L)
    pub connections: u32,
    /// seconds idle after which it is frozen (absent: never)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze_after_s: Option<u64>,
    /// seconds idle after which it is stopped (absent: never)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_after_s: Option<u64>,
}

/// ms per start phase (see `domain::phases`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, Variant)]
#[zbus(signature = "dict")]
pub struct PhaseTimingsAnswer {
    /// home, id range, snapshots dir, scratch
    pub storage: u64,
    /// until systemd took the start job
    pub unit: u64,
    /// the job taken to the unit up
    pub podman: u64,
    /// the unit up to the host recording it
    pub ready: u64,
    /// the whole start
    pub total: u64,
}

impl From<&Status> for StatusAnswer {
    fn from(s: &Status) -> StatusAnswer {
        StatusAnswer {
            state: s.state.as_str().to_string(),
            server: s.server.clone(),
            unit: s.unit.clone(),
            sub_state: s.sub_state.clone(),
            main_pid: s.main_pid,
            memory_current: s.memory_current,
            started_at: s.started_at,
            disk: s.disk.as_ref().map(DiskAnswer::from),
            storage_full: s.storage_full.map(|f| StorageFullAnswer {
                free: f.free,
                reserve: f.reserve,
            }),
            phase_timings_ms: s.phase_timings_ms.map(|p| PhaseTimingsAnswer {
                storage: p.storage,
                unit: p.unit,
                podman: p.podman,
                ready: p.ready,
                total: p.total,
            }),
            activity: s.activity.as_ref().map(|a| ActivityAnswer {
                last_active_at: a.last_active_at,
                idle_s: a.idle_s,
                active: a.active.iter().map(|r| r.as_str().to_string()).collect(),
                ssh_sessions: a.ssh_sessions,
                connections: a.connections,
                freeze_after_s: a.freeze_after_s,
                stop_after_s: a.stop_after_s,
            }),
        }
    }
}

impl StatusAnswer {
    /// The bus's `a{sv}`.
    pub fn to_bus(&self) -> Result<BusDict, WireError> {
        to_bus_dict(Variant::from(self.clone()))
    }

    /// Decodes the bus's `a{sv}`.
    pub fn from_bus(d: &BusDict) -> Result<StatusAnswer, WireError> {
        StatusAnswer::try_from(Variant::from(from_bus_dict(d)?)).map_err(decode_err("status"))
    }
}

/// The limits in force (a part of [`LimitsAnswer`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Variant)]
#[zbus(signature = "dict")]
pub struct LimitsValues {
    /// bytes
    pub memory: u64,
    /// may swap
    pub swap: bool,
    /// cores
    pub cpu: f64,
    /// most tasks
    pub pids: u64,
    /// 1..=10000
    pub cpu_weight: u64,
    /// 1..=10000
    pub io_weight: u64,
}

impl From<&Limits> for LimitsValues {
    fn from(l: &Limits) -> LimitsValues {
        LimitsValues {
            memory: l.memory,
            swap: l.swap,
            cpu: l.cpu,
            pids: l.pids,
            cpu_weight: l.cpu_weight,
            io_weight: l.io_weight,
        }
    }
}

/// The answer to a limits change (`PATCH /projects/:id/config`, `SetProjectLimits`). On the bus
/// the limits sit beside `state`, `server` and `live` in one flat `a{sv}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LimitsAnswer {
    /// the project's state
    pub state: String,
    /// this host's id
    pub server: String,
    /// applied to the running project (else at its next start)
    pub live: bool,
    /// the limits in force (or at the next start)
    pub limits: LimitsValues,
}

impl From<&LimitsUpdate> for LimitsAnswer {
    fn from(u: &LimitsUpdate) -> LimitsAnswer {
        LimitsAnswer {
            state: u.state.as_str().to_string(),
            server: u.server.clone(),
            live: u.live,
            limits: LimitsValues::from(&u.limits),
        }
    }
}

impl LimitsAnswer {
    /// The bus's flat `a{sv}`.
    pub fn to_bus(&self) -> Result<BusDict, WireError> {
        let mut d = to_bus_dict(Variant::from(self.limits))?;
        for (k, v) in [
            ("state", Variant::from(self.state.as_str())),
            ("server", Variant::from(self.server.as_str())),
            ("live", Variant::from(self.live)),
        ] {
            let v = OwnedVariant::try_from(v)
                .map_err(|e| WireError::new(ErrorKind::Internal, format!("cannot encode: {e}")))?;
            d.insert(k.to_string(), v);
        }
        Ok(d)
    }

    /// Decodes the bus's flat `a{sv}`.
    pub fn from_bus(d: &BusDict) -> Result<LimitsAnswer, WireError> {
        let mut m = from_bus_dict(d)?;
        let mut take = |k: &str| {
            m.remove(k)
                .ok_or_else(|| WireError::new(ErrorKind::Internal, format!("no {k} in the answer")))
        };
        let state: String = take("state")?.downcast().map_err(decode_err("state"))?;
        let server: String = take("server")?.downcast().map_err(decode_err("server"))?;
        let live: bool = take("live")?.downcast().map_err(decode_err("live"))?;
        let limits = LimitsValues::try_from(Variant::from(m)).map_err(decode_err("limits"))?;
        Ok(LimitsAnswer {
            state,
            server,
            live,
            limits,
        })
    }
}

/// A project's stored config and the limits it resolves to (`GET /projects/:id/config`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigAnswer {
    /// the config the next start uses
    pub config: RunConfig,
    /// its limits over the host's defaults
    pub limits: LimitsValues,
}

impl From<&ConfigView> for ConfigAnswer {
    fn from(v: &ConfigView) -> ConfigAnswer {
        ConfigAnswer {
            config: v.config.clone(),
            limits: LimitsValues::from(&v.limits),
        }
    }
}

/// A snapshot: JSON object over HTTP, `(name, kind, created, exclusive, referenced)` with 0 for
/// unknown on the bus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotAnswer {
    /// its name
    pub name: String,
    /// when it was taken, ms since the epoch
    pub created: Option<u64>,
    /// `auto` or `manual`
    pub kind: String,
    /// bytes only it holds
    pub exclusive: Option<u64>,
    /// bytes it references
    pub referenced: Option<u64>,
}

/// A snapshot on the bus: `(name, kind, created ms, exclusive bytes, referenced bytes)`.
pub type SnapshotTuple = (String, String, u64, u64, u64);

impl From<&SnapshotInfo> for SnapshotAnswer {
    fn from(i: &SnapshotInfo) -> SnapshotAnswer {
        SnapshotAnswer {
            name: i.name.to_string(),
            created: i.created,
            kind: i.kind.to_string(),
            exclusive: i.exclusive,
            referenced: i.referenced,
        }
    }
}

impl SnapshotAnswer {
    /// The bus's tuple (0 = unknown).
    pub fn to_bus(&self) -> SnapshotTuple {
        (
            self.name.clone(),
            self.kind.clone(),
            self.created.unwrap_or(0),
            self.exclusive.unwrap_or(0),
            self.referenced.unwrap_or(0),
        )
    }

    /// Decodes the bus's tuple.
    pub fn from_bus(t: &SnapshotTuple) -> SnapshotAnswer {
        let opt = |n: u64| (n != 0).then_some(n);
        SnapshotAnswer {
            name: t.0.clone(),
            kind: t.1.clone(),
            created: opt(t.2),
            exclusive: opt(t.3),
            referenced: opt(t.4),
        }
    }
}

/// `GET /projects/:id/snapshots`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotList {
    /// oldest first
    pub snapshots: Vec<SnapshotAnswer>,
}

/// What a sweep did to one project.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SweepProject {
    /// the project
    pub project_id: String,
    /// the rolling snapshot taken
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    /// rolling snapshots deleted
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deleted: Vec<String>,
    /// why it was left alone
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
    /// what failed
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl From<&SweepOutcome> for SweepProject {
    fn from(o: &SweepOutcome) -> SweepProject {
        SweepProject {
            project_id: o.project_id.to_string(),
            created: o.created.as_ref().map(ToString::to_string),
            deleted: o.deleted.iter().map(ToString::to_string).collect(),
            skipped: o.skipped.map(str::to_string),
            error: o.error.clone(),
        }
    }
}

/// The answer of a sweep (`POST /snapshots/sweep`; JSON text on the bus's `SweepSnapshots`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SweepAnswer {
    /// the sweep's clock, ms
    pub now: u64,
    /// per project
    pub projects: Vec<SweepProject>,
}

/// `{"deleted": name}` / `{"restored": name}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotDone {
    /// a snapshot was deleted
    #[serde(rename = "deleted")]
    Deleted(String),
    /// the home was restored from it
    #[serde(rename = "restored")]
    Restored(String),
}

/// `POST /projects/:id/start`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    /// the start config (absent or `null`: the stored one)
    #[serde(default, deserialize_with = "super::parse::config_object_or_null")]
    pub config: Option<RunConfig>,
}

/// `POST /projects/:id/stop`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StopRequest {
    /// kill at once
    #[serde(default)]
    pub force: bool,
}

/// `POST /projects/:id/snapshots`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshotRequest {
    /// the name (default `manual-<UTC time>`)
    #[serde(default)]
    pub name: Option<String>,
}

/// `POST /projects/:id/quota`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaRequest {
    /// required: bytes, or null for no limit
    #[serde(deserialize_with = "Option::deserialize")]
    pub disk: Option<u64>,
}

/// `POST /snapshots/sweep`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepRequest {
    /// the sweep's clock in ms (a test hook; default: now)
    #[serde(default)]
    pub now: Option<u64>,
    /// only these projects (default: every known project)
    #[serde(default)]
    pub projects: Option<Vec<String>>,
}

/// `PUT /projects/:id/authorized-keys` and its answer (also of `GET`): OpenSSH public key
/// lines (`"ssh-ed25519 AAAA… comment"`), at most 1000.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizedKeys {
    /// the keys (required in a `PUT`; `[]` removes them all)
    pub keys: Vec<String>,
}

/// `POST /auth/revoked`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeRequest {
    /// the token ids to revoke (required; checked by `auth::revocation::parse_list`)
    #[serde(default)]
    pub jti: Vec<String>,
}

/// The answer of `POST /auth/revoked`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokeAnswer {
    /// how many distinct ids this push revoked
    pub revoked: usize,
    /// unix seconds until which they are kept (no token accepted here lives longer)
    pub until: u64,
    /// how many entries the list holds now
    pub kept: usize,
}

/// A file or directory of a project after a change (`PUT`, `POST ?mkdir` on `/<id>/files/…`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    /// its path under the home
    pub path: String,
    /// `file`, `dir`, `symlink` or `other`
    #[serde(rename = "type")]
    pub kind: String,
    /// bytes
    pub size: u64,
    /// last modification, ms since the epoch
    pub mtime: u64,
}

/// One entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    /// its name
    pub name: String,
    /// `file`, `dir`, `symlink` (listed, never followed out of the home) or `other`
    #[serde(rename = "type")]
    pub kind: String,
    /// bytes
    pub size: u64,
    /// last modification, ms since the epoch
    pub mtime: u64,
}

/// A directory of a project (`GET /<id>/files/<dir>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirListing {
    /// the directory, under the home ("" for the home)
    pub path: String,
    /// its entries, by name
    pub entries: Vec<DirEntry>,
    /// whether entries were left out (more than the file server lists at once)
    pub truncated: bool,
}

/// One event of `GET /events` (the `data` of its SSE frame; `type` is also the frame's `event`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventAnswer {
    /// monotonically increasing (the frame's `id`, what `Last-Event-ID` resumes from)
    pub id: u64,
    /// ms since the epoch
    pub time: u64,
    /// `new | state | start_failed | snapshot_created | snapshot_deleted | quota_hit | lost`
    #[serde(rename = "type")]
    pub kind: String,
    /// the project (absent for `lost`)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project_id: Option<String>,
    /// the new state (`state`)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// the snapshot (`snapshot_*`)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// why (`start_failed`)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// bytes used and the quota (`quota_hit`)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used: Option<u64>,
    /// the quota, bytes (`quota_hit`)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<u64>,
    /// first and last id missed (`lost`: the ring no longer holds them)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<u64>,
    /// last id missed (`lost`)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<u64>,
}

impl EventAnswer {
    fn bare(id: u64, time: u64, kind: &str) -> EventAnswer {
        EventAnswer {
            id,
            time,
            kind: kind.to_string(),
            project_id: None,
            state: None,
            name: None,
            reason: None,
            used: None,
            quota: None,
            from: None,
            to: None,
        }
    }

    /// The gap event: ids `from..=to` are gone from the ring.
    pub fn lost(from: u64, to: u64, time: u64) -> EventAnswer {
        EventAnswer {
            from: Some(from),
            to: Some(to),
            ..EventAnswer::bare(to, time, "lost")
        }
    }
}

impl From<&crate::core::Numbered> for EventAnswer {
    fn from(n: &crate::core::Numbered) -> EventAnswer {
        use crate::core::HostEvent as E;
        let (kind, id) = match &n.event {
            E::New(id) => ("new", id),
            E::State(id, _) => ("state", id),
            E::StartFailed(id, _) => ("start_failed", id),
            E::SnapshotCreated(id, _) => ("snapshot_created", id),
            E::SnapshotDeleted(id, _) => ("snapshot_deleted", id),
            E::QuotaHit { id, .. } => ("quota_hit", id),
            E::Removed(id) => ("removed", id),
        };
        let mut a = EventAnswer {
            project_id: Some(id.to_string()),
            ..EventAnswer::bare(n.id, n.time_ms, kind)
        };
        match &n.event {
            E::New(_) | E::Removed(_) => {}
            E::State(_, s) => a.state = Some(s.as_str().to_string()),
            E::StartFailed(_, r) => a.reason = Some(r.clone()),
            E::SnapshotCreated(_, name) | E::SnapshotDeleted(_, name) => {
                a.name = Some(name.to_string())
            }
            E::QuotaHit { used, quota, .. } => {
                a.used = Some(*used);
                a.quota = Some(*quota);
            }
        }
        a
    }
}

/// One line of `GET /projects/:id/logs` (a JSON line, or the `data` of an SSE `log` frame).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogAnswer {
    /// the journal cursor: `since=<cursor>` or `Last-Event-ID` resumes after this line
    pub cursor: String,
    /// RFC 3339, UTC, µs
    pub time: String,
    /// µs since the epoch (`since=<µs>` takes it)
    pub usec: u64,
    /// syslog priority, 0 (emerg) .. 7 (debug)
    pub priority: u8,
    /// the line
    pub message: String,
    /// lines journald dropped under the project's log rate limit (this entry stands for them)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suppressed: Option<u64>,
}

impl From<&crate::ports::LogLine> for LogAnswer {
    fn from(l: &crate::ports::LogLine) -> LogAnswer {
        let time = i64::try_from(l.time_usec)
            .ok()
            .and_then(|us| jiff::Timestamp::from_microsecond(us).ok())
            .map_or_else(String::new, |t| format!("{t:.6}"));
        LogAnswer {
            cursor: l.cursor.clone(),
            time,
            usec: l.time_usec,
            priority: l.priority,
            message: l.message.clone(),
            suppressed: l.suppressed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::project::ProjectState;

    fn full_status() -> Status {
        Status {
            state: ProjectState::Running,
            server: "h1".into(),
            unit: "cocalc-project-x.service".into(),
            sub_state: Some("running".into()),
            main_pid: Some(42),
            memory_current: Some(1 << 20),
            started_at: Some(1_795_966_945_890),
            disk: Some(DiskStatus {
                quota: Some(1 << 30),
                used: Some(12345),
            }),
            storage_full: Some(crate::domain::reserve::Shortfall {
                free: 10,
                reserve: 50,
            }),
            phase_timings_ms: Some(crate::domain::phases::PhaseTimings {
                storage: 1,
                unit: 2,
                podman: 3,
                ready: 4,
                total: 11,
            }),
            activity: Some(crate::domain::idle::ActivityStatus {
                last_active_at: 1_795_966_945_890,
                idle_s: 12,
                active: vec![
                    crate::domain::idle::Reason::SshSession,
                    crate::domain::idle::Reason::Recent,
                ],
                ssh_sessions: 1,
                connections: 0,
                freeze_after_s: Some(1800),
                stop_after_s: None,
            }),
        }
    }

    /// HTTP's JSON is exactly what the core's status serialized to before.
    #[test]
    fn status_json_is_the_cores() {
        let s = full_status();
        let ours = serde_json::to_value(StatusAnswer::from(&s)).unwrap();
        assert_eq!(ours, serde_json::to_value(&s).unwrap());
        let bare = Status {
            sub_state: None,
            main_pid: None,
            memory_current: None,
            started_at: None,
            disk: Some(DiskStatus::default()),
            storage_full: None,
            phase_timings_ms: None,
            ..s
        };
        let ours = serde_json::to_value(StatusAnswer::from(&bare)).unwrap();
        assert_eq!(ours, serde_json::to_value(&bare).unwrap());
    }

    /// The bus dict has the JSON's keys with the same values, and decodes back.
    #[test]
    fn status_bus_dict_is_the_json() {
        let a = StatusAnswer::from(&full_status());
        let d = a.to_bus().unwrap();
        let json = serde_json::to_value(&a).unwrap();
        let mut keys: Vec<&String> = d.keys().collect();
        keys.sort();
        let json_keys: Vec<&String> = json.as_object().unwrap().keys().collect();
        assert_eq!(keys, json_keys);
        assert_eq!(u32::try_from(&d["main_pid"]).unwrap(), 42);
        assert_eq!(StatusAnswer::from_bus(&d).unwrap(), a);
        // absent fields are absent on the bus too
        let bare = StatusAnswer {
            sub_state: None,
            main_pid: None,
            disk: Some(DiskAnswer {
                quota: None,
                used: Some(7),
            }),
            storage_full: None,
            phase_timings_ms: None,
            ..a
        };
        let d = bare.to_bus().unwrap();
        assert!(!d.contains_key("main_pid"));
        assert!(!d.contains_key("storage_full"));
        assert_eq!(StatusAnswer::from_bus(&d).unwrap(), bare);
    }

    #[test]
    fn limits_answer_round_trips_over_the_bus() {
        let u = LimitsUpdate {
            state: ProjectState::Opened,
            server: "h".into(),
            live: false,
            limits: Limits::default(),
        };
        let a = LimitsAnswer::from(&u);
        assert_eq!(
            serde_json::to_value(&a).unwrap(),
            serde_json::to_value(&u).unwrap()
        );
        let d = a.to_bus().unwrap();
        let mut keys: Vec<&str> = d.keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "cpu",
                "cpu_weight",
                "io_weight",
                "live",
                "memory",
                "pids",
                "server",
                "state",
                "swap"
            ]
        );
        assert_eq!(LimitsAnswer::from_bus(&d).unwrap(), a);
    }

    #[test]
    fn snapshot_answers_match_the_cores() {
        let i = SnapshotInfo {
            name: "before-x".parse().unwrap(),
            created: Some(5),
            kind: "manual",
            exclusive: None,
            referenced: Some(9),
        };
        let a = SnapshotAnswer::from(&i);
        assert_eq!(
            serde_json::to_value(&a).unwrap(),
            serde_json::to_value(&i).unwrap()
        );
        assert_eq!(SnapshotAnswer::from_bus(&a.to_bus()), a);
        assert_eq!(
            serde_json::to_string(&SnapshotDone::Deleted("x".into())).unwrap(),
            r#"{"deleted":"x"}"#
        );
    }
}
