//! The D-Bus interface `com.cocalc.ProjectHost1` on the system bus, modelled on
//! `org.freedesktop.systemd1`: a manager object plus one object per known project. A thin adapter
//! over [`Host`]: every method is one core call; state changes made through any adapter come back
//! from the core as events and are published here as signals.
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use zbus::object_server::SignalEmitter;
use zbus::{Connection, OwnedObjectPath, OwnedVariant, Variant};

use crate::host::SnapshotInfo;
use crate::host::{self, Host, HostEvent};
use crate::limits::{LimitsPatch, LimitsUpdate};
use crate::project::{ProjectId, RunConfig, Status};
use crate::snapshots::SnapshotName;
use crate::systemd::bus_label_escape;

/// Well-known bus name.
pub const BUS_NAME: &str = "com.cocalc.ProjectHost1";
/// Path of the manager object.
pub const MANAGER_PATH: &str = "/com/cocalc/ProjectHost1";
/// Prefix of the project objects' paths.
pub const PROJECT_PATH_PREFIX: &str = "/com/cocalc/ProjectHost1/project/";

/// The object path of a project (`-` escaped as `_2d`, a leading digit as `_3N`, like systemd).
pub fn project_path(id: &ProjectId) -> OwnedObjectPath {
    let p = format!("{PROJECT_PATH_PREFIX}{}", bus_label_escape(&id.to_string()));
    // the escaped label holds only [A-Za-z0-9_]: always a valid path
    OwnedObjectPath::try_from(p)
        .unwrap_or_else(|_| OwnedObjectPath::from(zbus::ObjectPath::from_static_str_unchecked("/")))
}

/// Errors as D-Bus error names `com.cocalc.ProjectHost1.Error.*`.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "com.cocalc.ProjectHost1.Error")]
pub enum Error {
    /// Transport errors.
    #[zbus(error)]
    ZBus(zbus::Error),
    /// The id is not a lowercase UUID.
    InvalidProjectId(String),
    /// The config JSON is malformed or has a bad value.
    InvalidConfig(String),
    /// The image is not a plain reference the host allows.
    ImageNotAllowed(String),
    /// No such project on this host.
    NotFound(String),
    /// The project could not be started.
    StartFailed(String),
    /// The project could not be stopped.
    StopFailed(String),
    /// New limits could not be applied; the project keeps its old ones.
    UpdateFailed(String),
    /// The snapshot name is not valid (or reserved for rolling snapshots).
    InvalidSnapshotName(String),
    /// No such snapshot.
    NoSuchSnapshot(String),
    /// A snapshot of that name exists.
    SnapshotExists(String),
    /// The operation needs the project stopped.
    ProjectRunning(String),
    /// systemd or the storage are not available.
    Unavailable(String),
    /// Anything else.
    Failed(String),
}

impl From<host::Error> for Error {
    fn from(e: host::Error) -> Error {
        use host::Error as E;
        let m = e.to_string();
        match e {
            E::InvalidProjectId(_) => Error::InvalidProjectId(m),
            E::InvalidConfig(_) => Error::InvalidConfig(m),
            E::ImageNotAllowed(_) => Error::ImageNotAllowed(m),
            E::StartFailed { .. } => Error::StartFailed(m),
            E::StopFailed { .. } => Error::StopFailed(m),
            E::UpdateFailed { .. } => Error::UpdateFailed(m),
            E::NoSuchProject(_) => Error::NotFound(m),
            E::InvalidSnapshotName(_) | E::ReservedSnapshotName(_) => Error::InvalidSnapshotName(m),
            E::NoSuchSnapshot { .. } => Error::NoSuchSnapshot(m),
            E::SnapshotExists { .. } => Error::SnapshotExists(m),
            E::ProjectRunning(_) => Error::ProjectRunning(m),
            E::Storage(_) | E::Systemd(_) => Error::Unavailable(m),
            E::Store(_) => Error::Failed(m),
        }
    }
}

fn parse_id(id: &str) -> Result<ProjectId, Error> {
    id.parse()
        .map_err(|e: crate::project::InvalidProjectId| Error::InvalidProjectId(e.to_string()))
}

fn parse_config(json: &str) -> Result<Option<RunConfig>, Error> {
    if json.trim().is_empty() {
        return Ok(None);
    }
    let c: Option<RunConfig> = serde_json::from_str(json)
        .map_err(|e| Error::InvalidConfig(format!("invalid config JSON: {e}")))?;
    Ok(c)
}

/// A status as `a{sv}`: the same fields as the HTTP API's status.
pub fn status_dict(s: &Status) -> HashMap<String, OwnedVariant> {
    let mut d = HashMap::new();
    let mut put = |k: &str, v: Variant<'_>| {
        if let Ok(v) = OwnedVariant::try_from(v) {
            d.insert(k.to_string(), v);
        }
    };
    put("state", Variant::from(s.state.as_str()));
    put("server", Variant::from(s.server.as_str()));
    put("unit", Variant::from(s.unit.as_str()));
    if let Some(v) = &s.sub_state {
        put("sub_state", Variant::from(v.as_str()));
    }
    if let Some(v) = s.main_pid {
        put("main_pid", Variant::from(v));
    }
    if let Some(v) = s.memory_current {
        put("memory_current", Variant::from(v));
    }
    if let Some(v) = s.started_at {
        put("started_at", Variant::from(v));
    }
    d
}

fn parse_snapshot_name(name: &str) -> Result<SnapshotName, Error> {
    name.parse()
        .map_err(|e: crate::snapshots::InvalidSnapshotName| {
            Error::InvalidSnapshotName(e.to_string())
        })
}

/// A snapshot as `(name, kind, created ms, exclusive bytes, referenced bytes)`; 0 = unknown.
type SnapshotTuple = (String, String, u64, u64, u64);

fn snapshot_tuple(i: &SnapshotInfo) -> SnapshotTuple {
    (
        i.name.to_string(),
        i.kind.to_string(),
        i.created.unwrap_or(0),
        i.exclusive.unwrap_or(0),
        i.referenced.unwrap_or(0),
    )
}

fn parse_limits(json: &str) -> Result<LimitsPatch, Error> {
    serde_json::from_str(json)
        .map_err(|e| Error::InvalidConfig(format!("invalid limits JSON: {e}")))
}

/// The result of a limits change as `a{sv}`: state, server, live, and the limits in force.
pub fn limits_dict(u: &LimitsUpdate) -> HashMap<String, OwnedVariant> {
    let mut d = HashMap::new();
    let mut put = |k: &str, v: Variant<'_>| {
        if let Ok(v) = OwnedVariant::try_from(v) {
            d.insert(k.to_string(), v);
        }
    };
    put("state", Variant::from(u.state.as_str()));
    put("server", Variant::from(u.server.as_str()));
    put("live", Variant::from(u.live));
    put("memory", Variant::from(u.limits.memory));
    put("swap", Variant::from(u.limits.swap));
    put("cpu", Variant::from(u.limits.cpu));
    put("pids", Variant::from(u.limits.pids));
    put("cpu_weight", Variant::from(u.limits.cpu_weight));
    put("io_weight", Variant::from(u.limits.io_weight));
    d
}

/// `com.cocalc.ProjectHost1.Manager` on [`MANAGER_PATH`].
#[derive(Debug)]
pub struct Manager {
    host: Arc<Host>,
}

#[zbus::interface(name = "com.cocalc.ProjectHost1.Manager")]
impl Manager {
    /// Known projects: (id, state, last touched in ms since the epoch, object path), most
    /// recently touched first.
    fn list_projects(&self) -> Vec<(String, String, u64, OwnedObjectPath)> {
        self.host
            .list()
            .iter()
            .map(|&(id, last)| {
                (
                    id.to_string(),
                    self.host.peek_status(id).state.to_string(),
                    last,
                    project_path(&id),
                )
            })
            .collect()
    }

    /// The object path of a known project.
    fn get_project(&self, id: &str) -> Result<OwnedObjectPath, Error> {
        let id = parse_id(id)?;
        if !self.host.is_known(id) {
            return Err(Error::NotFound(format!(
                "no such project on this host: {id}"
            )));
        }
        Ok(project_path(&id))
    }

    /// Status of a project (as `GET /projects/:id/status`; a never-seen project is `opened`).
    fn get_project_status(&self, id: &str) -> Result<HashMap<String, OwnedVariant>, Error> {
        Ok(status_dict(&self.host.status(parse_id(id)?)))
    }

    /// Starts a project; `config_json` is the start config as JSON (`""` = the stored one).
    async fn start_project(
        &self,
        id: &str,
        config_json: &str,
    ) -> Result<HashMap<String, OwnedVariant>, Error> {
        let id = parse_id(id)?;
        let config = parse_config(config_json)?;
        Ok(status_dict(&self.host.start(id, config).await?))
    }

    /// Stops a project; `force` kills it at once.
    async fn stop_project(
        &self,
        id: &str,
        force: bool,
    ) -> Result<HashMap<String, OwnedVariant>, Error> {
        Ok(status_dict(&self.host.stop(parse_id(id)?, force).await?))
    }

    /// Changes a project's limits (`limits_json` as the body of `PATCH /projects/:id/config`):
    /// at once when it runs, and for its next start.
    async fn set_project_limits(
        &self,
        id: &str,
        limits_json: &str,
    ) -> Result<HashMap<String, OwnedVariant>, Error> {
        let id = parse_id(id)?;
        Ok(limits_dict(
            &self.host.set_limits(id, parse_limits(limits_json)?).await?,
        ))
    }

    /// Takes and prunes the rolling snapshots of every project now (what
    /// cocalc-project-host-snapshots.timer asks for); returns what it did as JSON.
    async fn sweep_snapshots(&self) -> Result<String, Error> {
        let now = host::now_ms();
        let outcomes = self.host.sweep_snapshots(Some(now), None).await?;
        Ok(serde_json::json!({ "now": now, "projects": outcomes }).to_string())
    }

    /// Version of the daemon.
    #[zbus(property(emits_changed_signal = "const"))]
    fn version(&self) -> String {
        env!("CARGO_PKG_VERSION").to_string()
    }

    /// This host's id.
    #[zbus(property(emits_changed_signal = "const"))]
    fn host_id(&self) -> String {
        self.host.host_id().to_string()
    }

    /// Number of known projects.
    #[zbus(property)]
    fn project_count(&self) -> u32 {
        self.host.list().len() as u32
    }

    /// Number of projects whose unit is up (starting, running or stopping).
    #[zbus(property)]
    fn running_count(&self) -> u32 {
        self.host.running_count() as u32
    }

    /// A project's state changed (whichever adapter or outside event caused it).
    #[zbus(signal)]
    async fn project_state_changed(
        emitter: &SignalEmitter<'_>,
        id: &str,
        state: &str,
    ) -> zbus::Result<()>;

    /// A project became known to this host (first start, or adopted from systemd).
    #[zbus(signal)]
    async fn project_new(
        emitter: &SignalEmitter<'_>,
        id: &str,
        path: zbus::ObjectPath<'_>,
    ) -> zbus::Result<()>;

    /// A project was forgotten by this host.
    #[zbus(signal)]
    async fn project_removed(
        emitter: &SignalEmitter<'_>,
        id: &str,
        path: zbus::ObjectPath<'_>,
    ) -> zbus::Result<()>;
}

/// `com.cocalc.ProjectHost1.Project`, one object per known project.
#[derive(Debug)]
pub struct Project {
    host: Arc<Host>,
    id: ProjectId,
}

#[zbus::interface(name = "com.cocalc.ProjectHost1.Project")]
impl Project {
    /// Starts the project; `config_json` as for `Manager.StartProject`.
    async fn start(&self, config_json: &str) -> Result<HashMap<String, OwnedVariant>, Error> {
        let config = parse_config(config_json)?;
        Ok(status_dict(&self.host.start(self.id, config).await?))
    }

    /// Stops the project; `force` kills it at once.
    async fn stop(&self, force: bool) -> Result<HashMap<String, OwnedVariant>, Error> {
        Ok(status_dict(&self.host.stop(self.id, force).await?))
    }

    /// Changes the project's limits, as `Manager.SetProjectLimits`.
    async fn set_limits(&self, limits_json: &str) -> Result<HashMap<String, OwnedVariant>, Error> {
        Ok(limits_dict(
            &self
                .host
                .set_limits(self.id, parse_limits(limits_json)?)
                .await?,
        ))
    }

    /// The project's snapshots, oldest first: (name, kind `auto|manual`, created ms,
    /// exclusive bytes, referenced bytes); 0 where unknown.
    async fn list_snapshots(&self) -> Result<Vec<SnapshotTuple>, Error> {
        Ok(self
            .host
            .snapshots(self.id)
            .await?
            .iter()
            .map(snapshot_tuple)
            .collect())
    }

    /// Takes a read-only snapshot (`name` empty: `manual-<UTC time>`).
    async fn create_snapshot(&self, name: &str) -> Result<SnapshotTuple, Error> {
        let name = if name.is_empty() {
            None
        } else {
            Some(parse_snapshot_name(name)?)
        };
        Ok(snapshot_tuple(
            &self.host.create_snapshot(self.id, name).await?,
        ))
    }

    /// Deletes a snapshot.
    async fn delete_snapshot(&self, name: &str) -> Result<(), Error> {
        Ok(self
            .host
            .delete_snapshot(self.id, &parse_snapshot_name(name)?)
            .await?)
    }

    /// Replaces the home with a snapshot, atomically; the project must be stopped.
    async fn restore_snapshot(&self, name: &str) -> Result<(), Error> {
        Ok(self
            .host
            .restore_snapshot(self.id, &parse_snapshot_name(name)?)
            .await?)
    }

    /// Sets the disk quota in bytes (0: no limit), at once and for later starts.
    async fn set_disk_quota(&self, bytes: u64) -> Result<(), Error> {
        Ok(self
            .host
            .set_disk_quota(self.id, (bytes != 0).then_some(bytes))
            .await?)
    }

    /// The project id.
    #[zbus(property(emits_changed_signal = "const"))]
    fn id(&self) -> String {
        self.id.to_string()
    }

    /// `opened`, `starting`, `running` or `stopping`.
    #[zbus(property)]
    fn state(&self) -> String {
        self.host.peek_status(self.id).state.to_string()
    }

    /// The systemd unit running the project.
    #[zbus(property(emits_changed_signal = "const"))]
    fn unit(&self) -> String {
        self.id.unit_name()
    }

    /// PID of the unit's main process (0 when not running).
    #[zbus(property, name = "MainPID")]
    fn main_pid(&self) -> u32 {
        self.host.peek_status(self.id).main_pid.unwrap_or(0)
    }

    /// Last touched, ms since the epoch.
    #[zbus(property(emits_changed_signal = "false"))]
    fn last_touched(&self) -> u64 {
        self.host.last_touched(self.id).unwrap_or(0)
    }
}

/// Connects to the system bus, exports the objects, takes the bus name and keeps the objects and
/// signals in step with the core's events.
pub async fn serve(host: Arc<Host>) -> zbus::Result<Connection> {
    // subscribe before exporting, so no event falls between the two
    let mut events = host.subscribe();
    let conn = zbus::connection::Builder::system()
        .serve_at(MANAGER_PATH, Manager { host: host.clone() })
        .build()
        .await?;
    let mut exported = HashSet::new();
    for &(id, _) in host.list().iter() {
        conn.object_server()
            .at(
                project_path(&id),
                Project {
                    host: host.clone(),
                    id,
                },
            )
            .await?;
        exported.insert(id);
    }
    conn.request_name(BUS_NAME).await?;
    let c = conn.clone();
    tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(ev) => {
                    if let Err(e) = publish(&c, &host, &mut exported, ev).await {
                        tracing::warn!(error = %e, "cannot publish a D-Bus signal");
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(
                        missed = n,
                        "D-Bus publisher lagged behind the core's events"
                    );
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            }
        }
    });
    Ok(conn)
}

async fn publish(
    conn: &Connection,
    host: &Arc<Host>,
    exported: &mut HashSet<ProjectId>,
    ev: HostEvent,
) -> zbus::Result<()> {
    let server = conn.object_server();
    let manager = server.interface::<_, Manager>(MANAGER_PATH).await?;
    match ev {
        HostEvent::New(id) => {
            if exported.insert(id) {
                let path = project_path(&id);
                server
                    .at(
                        path.clone(),
                        Project {
                            host: host.clone(),
                            id,
                        },
                    )
                    .await?;
                Manager::project_new(manager.signal_emitter(), &id.to_string(), path.as_ref())
                    .await?;
                manager
                    .get()
                    .await
                    .project_count_changed(manager.signal_emitter())
                    .await?;
            }
        }
        HostEvent::State(id, state) => {
            Manager::project_state_changed(
                manager.signal_emitter(),
                &id.to_string(),
                state.as_str(),
            )
            .await?;
            manager
                .get()
                .await
                .running_count_changed(manager.signal_emitter())
                .await?;
            if exported.contains(&id) {
                let p = server.interface::<_, Project>(project_path(&id)).await?;
                let iface = p.get().await;
                iface.state_changed(p.signal_emitter()).await?;
                iface.main_p_i_d_changed(p.signal_emitter()).await?; // zbus derives the name from "MainPID"
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn project_paths_are_escaped_labels() {
        let id: ProjectId = "6f1c2d3e-0000-4000-8000-000000000001".parse().unwrap();
        assert_eq!(
            project_path(&id).as_str(),
            "/com/cocalc/ProjectHost1/project/_36f1c2d3e_2d0000_2d4000_2d8000_2d000000000001"
        );
    }

    #[test]
    fn config_json_parses_or_names_the_problem() {
        assert_eq!(parse_config("").unwrap(), None);
        assert_eq!(parse_config("null").unwrap(), None);
        assert!(parse_config(r#"{"memory":1048576000}"#).unwrap().is_some());
        assert!(
            matches!(parse_config(r#"{"imgae":"x"}"#), Err(Error::InvalidConfig(m)) if m.contains("imgae"))
        );
        assert!(matches!(parse_id("x"), Err(Error::InvalidProjectId(_))));
    }
}
