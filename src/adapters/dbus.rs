//! The D-Bus interface `com.cocalc.ProjectHost1` on the system bus, modelled on
//! `org.freedesktop.systemd1`: a manager object plus one object per known project. A thin adapter
//! over [`Host`]: every method is one core call; state changes made through any adapter come back
//! from the core as events and are published here as signals.
use std::collections::HashSet;
use std::sync::{Arc, Weak};

use zbus::message::Header;
use zbus::names::OwnedErrorName;
use zbus::object_server::SignalEmitter;
use zbus::{Connection, OwnedObjectPath};

use crate::api::{self, BusDict, ErrorKind, LimitsAnswer, SnapshotTuple, StatusAnswer, WireError};
use crate::backends::systemd::bus_label_escape;
use crate::core::{self, Host, HostEvent};
use crate::domain::project::ProjectId;

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

/// A method's failure on the bus: the error table's name for its kind, and its message.
#[derive(Debug)]
pub struct Error {
    name: OwnedErrorName,
    message: String,
}

impl Error {
    /// The D-Bus error name.
    pub fn error_name(&self) -> &str {
        self.name.as_str()
    }
}

impl From<WireError> for Error {
    fn from(e: WireError) -> Error {
        let name = OwnedErrorName::try_from(e.kind.dbus_name())
            // every name in the table is valid (a unit test checks): never taken
            .unwrap_or_else(|_| {
                OwnedErrorName::from(zbus::names::ErrorName::from_static_str_unchecked(
                    "org.freedesktop.DBus.Error.Failed",
                ))
            });
        Error {
            name,
            message: e.message,
        }
    }
}

impl From<core::Error> for Error {
    fn from(e: core::Error) -> Error {
        Error::from(WireError::from(e))
    }
}

/// What zbus itself fails with (a bad argument, a lost connection) keeps its own name.
impl From<zbus::Error> for Error {
    fn from(e: zbus::Error) -> Error {
        let (name, message) = match &e {
            zbus::Error::MethodError(name, desc, _) => {
                (name.clone(), desc.clone().unwrap_or_default())
            }
            zbus::Error::FDO(f) => {
                let f: &zbus::fdo::Error = f;
                (
                    zbus::DBusError::name(f).into(),
                    zbus::DBusError::description(f)
                        .unwrap_or_default()
                        .to_string(),
                )
            }
            _ => {
                return Error::from(WireError::new(ErrorKind::Internal, e.to_string()));
            }
        };
        Error { name, message }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.name, self.message)
    }
}

impl std::error::Error for Error {}

impl zbus::DBusError for Error {
    fn create_reply(&self, call: &zbus::message::Header<'_>) -> zbus::Result<zbus::Message> {
        zbus::Message::error(call, self.name.as_ref()).build(&self.message.as_str())
    }

    fn name(&self) -> zbus::names::ErrorName<'_> {
        self.name.as_ref()
    }

    fn description(&self) -> Option<&str> {
        Some(&self.message)
    }
}

/// The daemon's own check behind the bus policy ([`super::local_access`]): a refusal is the
/// table's `AccessDenied`.
async fn operator(conn: &Connection, hdr: &Header<'_>) -> Result<(), Error> {
    super::local_access::check(conn, Some(hdr))
        .await
        .map_err(|m| Error::from(WireError::new(ErrorKind::AccessDenied, m)))
}

/// [`operator`] for property getters (no header: the daemon's own read for a change signal).
async fn operator_prop(conn: &Connection, hdr: Option<Header<'_>>) -> zbus::fdo::Result<()> {
    super::local_access::check(conn, hdr.as_ref())
        .await
        .map_err(zbus::fdo::Error::AccessDenied)
}

fn parse_id(id: &str) -> Result<ProjectId, Error> {
    Ok(api::parse_id(id)?)
}

/// The host, while the daemon serves. The bus objects and the publisher hold it weakly: the
/// connection outliving the core (or holding it alive) would keep the core's loops running.
fn op_json(v: &crate::core::moves::OperationView) -> Result<String, Error> {
    serde_json::to_string(v).map_err(|e| {
        Error::from(WireError::new(
            ErrorKind::Internal,
            format!("cannot encode the answer: {e}"),
        ))
    })
}

fn upgrade(host: &Weak<Host>) -> Result<Arc<Host>, Error> {
    host.upgrade().ok_or_else(|| {
        Error::from(WireError::new(
            ErrorKind::SystemdUnavailable,
            "the daemon is shutting down",
        ))
    })
}

fn status(s: &crate::domain::project::Status) -> Result<BusDict, Error> {
    Ok(StatusAnswer::from(s).to_bus()?)
}

/// `com.cocalc.ProjectHost1.Manager` on [`MANAGER_PATH`].
#[derive(Debug)]
pub struct Manager {
    host: Weak<Host>,
}

impl Manager {
    fn host(&self) -> Result<Arc<Host>, Error> {
        upgrade(&self.host)
    }

    /// `MoveProject` and `MoveProjectWith`: the body checked as over HTTP, the move started.
    async fn start_move(&self, id: &str, body: super::moves::MoveBody) -> Result<String, Error> {
        let id = parse_id(id)?;
        let host = self.host()?;
        let (req, link) = body
            .into_request(&host.settings().moves)
            .map_err(|e| Error::from(WireError::new(ErrorKind::InvalidBody, e)))?;
        let stall = host.settings().moves.stall_timeout;
        let v = host
            .start_move(id, req, super::moves::sender(link, stall))
            .await?;
        tracing::info!(project_id = %id, op = %v.op, target = %v.target, "move started over D-Bus");
        op_json(&v)
    }
}

/// A property of an object whose host is gone.
fn prop_host(host: &Weak<Host>) -> zbus::fdo::Result<Arc<Host>> {
    host.upgrade()
        .ok_or_else(|| zbus::fdo::Error::Failed("the daemon is shutting down".into()))
}

#[zbus::interface(name = "com.cocalc.ProjectHost1.Manager")]
impl Manager {
    /// Known projects: (id, state, last touched in ms since the epoch, object path), most
    /// recently touched first.
    async fn list_projects(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<Vec<(String, String, u64, OwnedObjectPath)>, Error> {
        operator(conn, &hdr).await?;
        let host = self.host()?;
        Ok(host
            .list()
            .iter()
            .map(|&(id, last)| {
                (
                    id.to_string(),
                    host.peek_status(id).state.to_string(),
                    last,
                    project_path(&id),
                )
            })
            .collect())
    }

    /// The object path of a known project.
    async fn get_project(
        &self,
        id: &str,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath, Error> {
        operator(conn, &hdr).await?;
        let id = parse_id(id)?;
        if !self.host()?.is_known(id) {
            return Err(WireError::new(
                ErrorKind::NoSuchProject,
                format!("no such project on this host: {id}"),
            )
            .into());
        }
        Ok(project_path(&id))
    }

    /// Status of a project (as `GET /projects/:id/status`; a never-seen project is `opened`). A
    /// read only: unlike an authenticated HTTP call it does not touch the project (a local reader
    /// must not keep projects active).
    async fn get_project_status(
        &self,
        id: &str,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<BusDict, Error> {
        operator(conn, &hdr).await?;
        status(&self.host()?.peek_status(parse_id(id)?))
    }

    /// Starts a project; `config_json` is the start config as JSON (`""` = the stored one).
    async fn start_project(&self, id: &str, config_json: &str) -> Result<BusDict, Error> {
        let id = parse_id(id)?;
        let config = api::parse_config_json(config_json)?;
        status(&self.host()?.start(id, config).await?)
    }

    /// Stops a project; `force` kills it at once.
    async fn stop_project(&self, id: &str, force: bool) -> Result<BusDict, Error> {
        status(&self.host()?.stop(parse_id(id)?, force).await?)
    }

    /// Changes a project's limits (`limits_json` as the body of `PATCH /projects/:id/config`):
    /// at once when it runs, and for its next start.
    async fn set_project_limits(&self, id: &str, limits_json: &str) -> Result<BusDict, Error> {
        let id = parse_id(id)?;
        let patch = api::parse_limits_json(limits_json)?;
        let u = self.host()?.set_limits(id, patch).await?;
        Ok(LimitsAnswer::from(&u).to_bus()?)
    }

    /// The SSH public keys stored for a project (as `GET /projects/:id/authorized-keys`).
    async fn get_authorized_keys(
        &self,
        id: &str,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<Vec<String>, Error> {
        operator(conn, &hdr).await?;
        Ok(self.host()?.authorized_keys(parse_id(id)?).await?)
    }

    /// Replaces a project's SSH public keys (validated, at most 1000; none removes them all);
    /// the keys as stored.
    async fn set_authorized_keys(&self, id: &str, keys: Vec<String>) -> Result<Vec<String>, Error> {
        let id = parse_id(id)?;
        Ok(self.host()?.set_authorized_keys(id, &keys).await?)
    }

    /// Takes and prunes the rolling snapshots of every project now (what
    /// cocalc-project-host-snapshots.timer asks for); returns what it did as JSON.
    async fn sweep_snapshots(&self) -> Result<String, Error> {
        let now = core::now_ms();
        let outcomes = self.host()?.sweep_snapshots(Some(now), None).await?;
        let answer = api::SweepAnswer {
            now,
            projects: outcomes.iter().map(api::SweepProject::from).collect(),
        };
        serde_json::to_string(&answer).map_err(|e| {
            Error::from(WireError::new(
                ErrorKind::Internal,
                format!("cannot encode the answer: {e}"),
            ))
        })
    }

    /// A project's journal as `GET /projects/:id/logs` gives it: JSON lines (one string each),
    /// oldest first; at most `lines` (0: 200), after `since` (`""`: the newest; else an RFC 3339
    /// time, µs since the epoch, or a journal cursor). `cocalc-project-host logs` follows by
    /// asking again after the last cursor.
    async fn get_project_logs(
        &self,
        id: &str,
        lines: u32,
        since: &str,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<Vec<String>, Error> {
        operator(conn, &hdr).await?;
        let id = parse_id(id)?;
        let q = super::observe_cli::log_query(lines, since)?;
        let lines = self.host()?.logs(id, &q).await?;
        Ok(lines
            .iter()
            .map(|l| serde_json::to_string(&api::LogAnswer::from(l)).unwrap_or_default())
            .collect())
    }

    /// The events after id `after` as `GET /events` sends them (JSON strings, a `lost` one first
    /// when the ring no longer holds some), and the newest id. `after` = 0: none, just the newest
    /// id (where a follower starts).
    async fn get_events(
        &self,
        after: u64,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(u64, Vec<String>), Error> {
        operator(conn, &hdr).await?;
        let host = self.host()?;
        if after == 0 {
            return Ok((host.events().latest(), Vec::new()));
        }
        Ok(super::observe_cli::replay(
            &host.events().since(Some(after)),
        ))
    }

    /// The projects with a unit up, for `cocalc-project-host top`: (id, state, started at ms,
    /// memory bytes, CPU ns, disk used bytes, disk quota bytes), 0 where unknown.
    async fn get_top(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<Vec<(String, String, u64, u64, u64, u64, u64)>, Error> {
        operator(conn, &hdr).await?;
        Ok(self
            .host()?
            .samples()
            .into_iter()
            .filter(|p| p.state != crate::domain::project::ProjectState::Opened)
            .map(|p| {
                (
                    p.id.to_string(),
                    p.state.to_string(),
                    p.started_at_ms.unwrap_or(0),
                    p.memory.unwrap_or(0),
                    p.cpu_nsec.unwrap_or(0),
                    p.disk_used.unwrap_or(0),
                    p.disk_quota.unwrap_or(0),
                )
            })
            .collect())
    }

    /// Moves a project to another host (as `POST /projects/:id/move`): `target` is the target
    /// host's API (`https://host:port`, see `MoveProjectWith` for a pin), `token` the master's
    /// move token for it; a failed move of the project to the same target is resumed. The
    /// operation as JSON (`GET /operations/:op`'s shape).
    async fn move_project(
        &self,
        id: &str,
        target: &str,
        token: &str,
        start: bool,
    ) -> Result<String, Error> {
        let body = super::moves::MoveBody {
            target: target.to_string(),
            token: token.to_string(),
            start,
            pin_sha256: None,
        };
        self.start_move(id, body).await
    }

    /// As `MoveProject`, with `body_json` exactly `POST /projects/:id/move`'s body (`target`,
    /// `token`, `start`, `pin_sha256`).
    async fn move_project_with(&self, id: &str, body_json: &str) -> Result<String, Error> {
        let body: super::moves::MoveBody = serde_json::from_str(body_json)
            .map_err(|e| Error::from(WireError::new(ErrorKind::InvalidBody, e.to_string())))?;
        self.start_move(id, body).await
    }

    /// An operation as JSON (as `GET /operations/:op`).
    async fn get_operation(
        &self,
        op: &str,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<String, Error> {
        operator(conn, &hdr).await?;
        op_json(&self.host()?.operation(op)?)
    }

    /// Cancels an operation (as `DELETE /operations/:op`); it as JSON.
    async fn cancel_operation(&self, op: &str) -> Result<String, Error> {
        op_json(&self.host()?.cancel_operation(op).await?)
    }

    /// Version of the daemon.
    #[zbus(property(emits_changed_signal = "const"))]
    fn version(&self) -> String {
        env!("CARGO_PKG_VERSION").to_string()
    }

    /// This host's id.
    #[zbus(property(emits_changed_signal = "const"))]
    fn host_id(&self) -> zbus::fdo::Result<String> {
        Ok(prop_host(&self.host)?.host_id().to_string())
    }

    /// Number of known projects.
    #[zbus(property)]
    fn project_count(&self) -> zbus::fdo::Result<u32> {
        Ok(prop_host(&self.host)?.list().len() as u32)
    }

    /// Number of projects whose unit is up (starting, running, frozen or stopping).
    #[zbus(property)]
    fn running_count(&self) -> zbus::fdo::Result<u32> {
        Ok(prop_host(&self.host)?.running_count() as u32)
    }

    /// The link to the master: standalone, connecting, connected or offline.
    #[zbus(property(emits_changed_signal = "false"))]
    fn master_state(&self) -> zbus::fdo::Result<String> {
        Ok(prop_host(&self.host)?.link_status().state.as_str().into())
    }

    /// Project-state reports waiting to be delivered to the master.
    #[zbus(property(emits_changed_signal = "false"))]
    fn outbox_depth(&self) -> zbus::fdo::Result<u64> {
        Ok(prop_host(&self.host)?.link_status().outbox_depth)
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
    host: Weak<Host>,
    id: ProjectId,
}

impl Project {
    fn host(&self) -> Result<Arc<Host>, Error> {
        upgrade(&self.host)
    }
}

#[zbus::interface(name = "com.cocalc.ProjectHost1.Project")]
impl Project {
    /// Starts the project; `config_json` as for `Manager.StartProject`.
    async fn start(&self, config_json: &str) -> Result<BusDict, Error> {
        let config = api::parse_config_json(config_json)?;
        status(&self.host()?.start(self.id, config).await?)
    }

    /// Stops the project; `force` kills it at once.
    async fn stop(&self, force: bool) -> Result<BusDict, Error> {
        status(&self.host()?.stop(self.id, force).await?)
    }

    /// Changes the project's limits, as `Manager.SetProjectLimits`.
    async fn set_limits(&self, limits_json: &str) -> Result<BusDict, Error> {
        let patch = api::parse_limits_json(limits_json)?;
        let u = self.host()?.set_limits(self.id, patch).await?;
        Ok(LimitsAnswer::from(&u).to_bus()?)
    }

    /// The project's snapshots, oldest first: (name, kind `auto|manual`, created ms,
    /// exclusive bytes, referenced bytes); 0 where unknown.
    async fn list_snapshots(&self) -> Result<Vec<SnapshotTuple>, Error> {
        let list = self.host()?.snapshot_list(self.id).await?;
        Ok(list
            .iter()
            .map(|i| api::SnapshotAnswer::from(i).to_bus())
            .collect())
    }

    /// Takes a read-only snapshot (`name` empty: `manual-<UTC time>`).
    async fn create_snapshot(&self, name: &str) -> Result<SnapshotTuple, Error> {
        let name = if name.is_empty() {
            None
        } else {
            Some(api::parse_snapshot_name(name)?)
        };
        let info = self.host()?.create_snapshot(self.id, name).await?;
        Ok(api::SnapshotAnswer::from(&info).to_bus())
    }

    /// Deletes a snapshot.
    async fn delete_snapshot(&self, name: &str) -> Result<(), Error> {
        let name = api::parse_snapshot_name(name)?;
        Ok(self.host()?.delete_snapshot(self.id, &name).await?)
    }

    /// Replaces the home with a snapshot, atomically; the project must be stopped.
    async fn restore_snapshot(&self, name: &str) -> Result<(), Error> {
        let name = api::parse_snapshot_name(name)?;
        Ok(self.host()?.restore_snapshot(self.id, &name).await?)
    }

    /// Sets the disk quota in bytes (0: no limit), at once and for later starts.
    async fn set_disk_quota(&self, bytes: u64) -> Result<(), Error> {
        Ok(self
            .host()?
            .set_disk_quota(self.id, (bytes != 0).then_some(bytes))
            .await?)
    }

    /// The project id.
    #[zbus(property(emits_changed_signal = "const"))]
    async fn id(
        &self,
        #[zbus(header)] hdr: Option<Header<'_>>,
        #[zbus(connection)] conn: &Connection,
    ) -> zbus::fdo::Result<String> {
        operator_prop(conn, hdr).await?;
        Ok(self.id.to_string())
    }

    /// `opened`, `starting`, `running`, `stopping` or `frozen` (up, its processes frozen for
    /// being idle; a connection or login thaws it).
    #[zbus(property)]
    async fn state(
        &self,
        #[zbus(header)] hdr: Option<Header<'_>>,
        #[zbus(connection)] conn: &Connection,
    ) -> zbus::fdo::Result<String> {
        operator_prop(conn, hdr).await?;
        Ok(prop_host(&self.host)?
            .peek_status(self.id)
            .state
            .to_string())
    }

    /// The systemd unit running the project.
    #[zbus(property(emits_changed_signal = "const"))]
    async fn unit(
        &self,
        #[zbus(header)] hdr: Option<Header<'_>>,
        #[zbus(connection)] conn: &Connection,
    ) -> zbus::fdo::Result<String> {
        operator_prop(conn, hdr).await?;
        Ok(self.id.unit_name())
    }

    /// PID of the unit's main process (0 when not running).
    #[zbus(property, name = "MainPID")]
    async fn main_pid(
        &self,
        #[zbus(header)] hdr: Option<Header<'_>>,
        #[zbus(connection)] conn: &Connection,
    ) -> zbus::fdo::Result<u32> {
        operator_prop(conn, hdr).await?;
        Ok(prop_host(&self.host)?
            .peek_status(self.id)
            .main_pid
            .unwrap_or(0))
    }

    /// Last touched, ms since the epoch.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn last_touched(
        &self,
        #[zbus(header)] hdr: Option<Header<'_>>,
        #[zbus(connection)] conn: &Connection,
    ) -> zbus::fdo::Result<u64> {
        operator_prop(conn, hdr).await?;
        Ok(prop_host(&self.host)?.last_touched(self.id).unwrap_or(0))
    }
}

/// Connects to the system bus, exports the objects, takes the bus name and keeps the objects and
/// signals in step with the core's events. Nothing here holds the core strongly: the publisher
/// ends when the core (the sender of its events) is dropped, and a call that comes after that
/// is answered `Unavailable`.
pub async fn serve(host: Arc<Host>) -> zbus::Result<Connection> {
    // subscribe before exporting, so no event falls between the two
    let mut events = host.subscribe();
    let weak = Arc::downgrade(&host);
    let conn = zbus::connection::Builder::system()
        .serve_at(MANAGER_PATH, Manager { host: weak.clone() })
        .build()
        .await?;
    let mut exported = HashSet::new();
    for &(id, _) in host.list().iter() {
        conn.object_server()
            .at(
                project_path(&id),
                Project {
                    host: weak.clone(),
                    id,
                },
            )
            .await?;
        exported.insert(id);
    }
    // the publisher ends with the core's loops (it holds the core only by `Weak`)
    let cancel = host.shutdown_token();
    drop(host);
    conn.request_name(BUS_NAME).await?;
    let c = conn.clone();
    tokio::spawn(async move {
        loop {
            let ev = tokio::select! {
                () = cancel.cancelled() => break,
                ev = events.recv() => ev,
            };
            match ev {
                Ok(ev) => {
                    if let Err(e) = publish(&c, &weak, &mut exported, ev).await {
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
    host: &Weak<Host>,
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
        HostEvent::Removed(id) => {
            if exported.remove(&id) {
                let path = project_path(&id);
                server.remove::<Project, _>(&path).await?;
                Manager::project_removed(manager.signal_emitter(), &id.to_string(), path.as_ref())
                    .await?;
                manager
                    .get()
                    .await
                    .project_count_changed(manager.signal_emitter())
                    .await?;
            }
        }
        // no D-Bus signal of their own: `GET /events` carries them
        HostEvent::StartFailed(..)
        | HostEvent::SnapshotCreated(..)
        | HostEvent::SnapshotDeleted(..)
        | HostEvent::QuotaHit { .. } => {}
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
    fn errors_carry_the_tables_bus_names() {
        let e = Error::from(api::parse_id("x").unwrap_err());
        assert_eq!(
            e.error_name(),
            "com.cocalc.ProjectHost1.Error.InvalidProjectId"
        );
        let e = Error::from(api::parse_config_json("[\"busybox\"]").unwrap_err());
        assert_eq!(
            e.error_name(),
            "com.cocalc.ProjectHost1.Error.InvalidConfig"
        );
        for k in ErrorKind::ALL {
            let e = Error::from(WireError::new(k, "m"));
            assert_eq!(e.error_name(), k.dbus_name());
            assert_eq!(zbus::DBusError::description(&e), Some("m"));
        }
    }
}
