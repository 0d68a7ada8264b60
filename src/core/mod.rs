//! The core: project lifecycle over the ports (units, storage, store), per-project locks, state
//! kept in memory from the units' events, reconcile on start, every task owned (`tasks`). Knows
//! nothing of HTTP or D-Bus serving, nor of systemd, podman, btrfs or SQLite (see `crate::ports`).
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use tokio::sync::broadcast;

use crate::config::Settings;
use crate::domain::limits::{self, ConfigView, Limits, LimitsPatch, LimitsUpdate};
use crate::domain::project::{
    ActiveState, DiskStatus, InvalidConfig, InvalidProjectId, ProjectId, ProjectState, RunConfig,
    Status, UnitInfo,
};
use crate::domain::snapshots::{InvalidSnapshotName, SnapshotName};
use crate::ports::{
    self, Helper, StartError, StartPlan, StorageError, StoreError, UnitError as SystemdError,
    UnitEvent,
};

mod events;
mod files;
pub mod idle;
#[cfg(test)]
mod idle_tests;
mod ids;
pub mod link;
#[cfg(test)]
mod master_tests;
pub mod metrics;
#[cfg(test)]
mod move_tests;
pub mod moves;
mod net;
#[cfg(test)]
mod observe_tests;
mod remove;
mod reserve;
mod ssh;
mod storage;
mod tasks;
#[cfg(test)]
mod tests;
pub use events::{EventRing, Numbered, Replay};
pub use idle::{ProjectStream, SessionGuard};
pub use storage::{SnapshotInfo, SweepOutcome};
pub use tasks::Tasks;

/// A failure of a core call. Adapters map it to an HTTP status, a D-Bus error name or an exit code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The id is not a project id.
    #[error(transparent)]
    InvalidProjectId(#[from] InvalidProjectId),
    /// The run config is not acceptable.
    #[error(transparent)]
    InvalidConfig(#[from] InvalidConfig),
    /// The project could not be started; nothing of it is left running.
    #[error("start of project {id} failed: {reason}")]
    StartFailed {
        /// the project
        id: ProjectId,
        /// what failed
        reason: String,
        /// the tail of the unit's journal
        journal: String,
    },
    /// The project could not be stopped.
    #[error("stop of project {id} failed: {reason}")]
    StopFailed {
        /// the project
        id: ProjectId,
        /// what failed
        reason: String,
    },
    /// Project storage is not usable.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// systemd could not be reached or refused.
    #[error(transparent)]
    Systemd(#[from] SystemdError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// New limits could not be applied to the running project; it keeps its old ones.
    #[error("limits of project {id} could not be changed: {reason}")]
    UpdateFailed {
        /// the project
        id: ProjectId,
        /// what failed
        reason: String,
    },
    /// The project has no home on this host (it was never started here).
    #[error("project {0} has no storage on this host")]
    NoSuchProject(ProjectId),
    /// The snapshot name is not valid.
    #[error(transparent)]
    InvalidSnapshotName(#[from] InvalidSnapshotName),
    /// `auto-…` names belong to the rolling snapshots.
    #[error(
        "snapshot name {0} is reserved: names starting with \"auto-\" are the rolling snapshots'"
    )]
    ReservedSnapshotName(SnapshotName),
    /// No such snapshot.
    #[error("project {id} has no snapshot {name}")]
    NoSuchSnapshot {
        /// the project
        id: ProjectId,
        /// the name asked for
        name: SnapshotName,
    },
    /// A snapshot of that name exists.
    #[error("project {id} already has a snapshot {name}")]
    SnapshotExists {
        /// the project
        id: ProjectId,
        /// the name
        name: SnapshotName,
    },
    /// The operation needs the project stopped.
    #[error("project {0} is running: stop it before restoring a snapshot")]
    ProjectRunning(ProjectId),
    /// The project storage has less free space than its reserve (`storage.reserve`).
    #[error(
        "project storage is full: {free} bytes free, below the reserve of {reserve} (storage.reserve); new starts, quota raises and writes that grow a project wait for space"
    )]
    StorageFull {
        /// bytes available
        free: u64,
        /// bytes the reserve keeps
        reserve: u64,
    },
    /// The image is not a plain reference, or not one the host allows.
    #[error(transparent)]
    ImageNotAllowed(#[from] crate::domain::images::ImageError),
    /// An SSH key list is not acceptable.
    #[error(transparent)]
    InvalidSshKey(#[from] crate::domain::ssh_keys::KeyError),
    /// The operation needs the project running (a connection into it).
    #[error("project {0} is not running")]
    ProjectNotRunning(ProjectId),
    /// Nothing answers on the port inside the project.
    #[error("project {id}: cannot connect to port {port}: {reason}")]
    BackendUnavailable {
        /// the project
        id: ProjectId,
        /// the port inside it
        port: u16,
        /// why
        reason: String,
    },
    /// A move to another host holds the project's snapshots.
    #[error("project {0} is being moved: its snapshots are locked, it cannot be deleted now")]
    SnapshotsLocked(ProjectId),
    /// The project's journal could not be read.
    #[error("logs of project {id} cannot be read: {reason}")]
    Journal {
        /// the project
        id: ProjectId,
        /// why
        reason: String,
    },
    /// A move was refused or failed (see `core::moves`).
    #[error("move rejected: {0}")]
    MoveRejected(String),
    /// No such operation.
    #[error("no such operation {0}")]
    NoSuchOperation(String),
}

impl Error {
    /// A stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Error::InvalidProjectId(_) => "invalid_project_id",
            Error::InvalidConfig(_) => "invalid_config",
            Error::StartFailed { .. } => "start_failed",
            Error::StopFailed { .. } => "stop_failed",
            Error::Storage(_) => "storage_unavailable",
            Error::Systemd(_) => "systemd_unavailable",
            Error::Store(_) => "store_failed",
            Error::UpdateFailed { .. } => "update_failed",
            Error::NoSuchProject(_) => "no_such_project",
            Error::InvalidSnapshotName(_) | Error::ReservedSnapshotName(_) => {
                "invalid_snapshot_name"
            }
            Error::NoSuchSnapshot { .. } => "no_such_snapshot",
            Error::SnapshotExists { .. } => "snapshot_exists",
            Error::ProjectRunning(_) => "project_running",
            Error::StorageFull { .. } => "storage_full",
            Error::ImageNotAllowed(_) => "image_not_allowed",
            Error::InvalidSshKey(_) => "invalid_ssh_key",
            Error::ProjectNotRunning(_) => "project_not_running",
            Error::BackendUnavailable { .. } => "backend_unavailable",
            Error::SnapshotsLocked(_) => "snapshots_locked",
            Error::Journal { .. } => "systemd_unavailable",
            Error::MoveRejected(_) => "move_rejected",
            Error::NoSuchOperation(_) => "no_such_operation",
        }
    }
}

/// Something adapters publish (D-Bus signals): the core emits these whatever caused them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostEvent {
    /// A project became known to this host (first successful start, or adopted from systemd).
    New(ProjectId),
    /// A project's state changed.
    State(ProjectId, ProjectState),
    /// A project was deleted from this host (`DELETE /projects/:id`): it is no longer known.
    Removed(ProjectId),
    /// A start failed (the reason as the start answer gives it).
    StartFailed(ProjectId, String),
    /// A snapshot was taken.
    SnapshotCreated(ProjectId, SnapshotName),
    /// A snapshot was deleted.
    SnapshotDeleted(ProjectId, SnapshotName),
    /// A project's home reached its disk quota (once per crossing, from the disk refresh).
    QuotaHit {
        /// the project
        id: ProjectId,
        /// bytes referenced
        used: u64,
        /// the quota
        quota: u64,
    },
}

#[derive(Debug, Default, Clone)]
struct Entry {
    /// in the store (started at least once, or adopted)
    known: bool,
    last_touched: u64,
    unit: Option<UnitInfo>,
    memory_current: Option<u64>,
    /// quota and usage of the home, refreshed from btrfs
    disk: Option<DiskStatus>,
    /// the last touch time sent to the store
    persisted_touch: u64,
    /// CPU time of the unit (ns), refreshed with the memory
    cpu_nsec: Option<u64>,
    /// the phases of the last start by this daemon (while the unit is up)
    phases: Option<crate::domain::phases::PhaseTimings>,
    /// its processes are frozen for being idle (`idle`)
    frozen: bool,
    /// its run config's `idle_freeze`, `idle_stop` (seconds; 0: never)
    idle_override: (Option<u64>, Option<u64>),
}

/// Known projects with their last touch (ms), most recent first; shared, not copied.
pub type ProjectList = Arc<Vec<(ProjectId, u64)>>;

/// The write guard of the project map: every change bumps the generation (before the lock is
/// released), so a cached list is never newer than what it was computed from.
struct EntriesMut<'a> {
    guard: std::sync::RwLockWriteGuard<'a, HashMap<ProjectId, Entry>>,
    generation: &'a std::sync::atomic::AtomicU64,
}

impl std::ops::Deref for EntriesMut<'_> {
    type Target = HashMap<ProjectId, Entry>;
    fn deref(&self) -> &Self::Target {
        &self.guard
    }
}

impl std::ops::DerefMut for EntriesMut<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.guard
    }
}

impl Drop for EntriesMut<'_> {
    fn drop(&mut self) {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::Release);
    }
}

impl Entry {
    fn state(&self) -> ProjectState {
        let s = self.unit.as_ref().map_or(ProjectState::Opened, |u| {
            ProjectState::from_active_state(u.active_state)
        });
        if s == ProjectState::Running && self.frozen {
            ProjectState::Frozen
        } else {
            s
        }
    }
}

/// The project host.
#[derive(Debug)]
pub struct Host {
    settings: Settings,
    host_id: String,
    store: Arc<dyn ports::Store>,
    units: Arc<dyn ports::Units>,
    storage: Arc<dyn ports::Storage>,
    /// The SSH gateway's host key (OpenSSH public key line), once the SSH server has loaded it:
    /// `GET /host` and the master's `register` carry it.
    ssh_host_key: std::sync::OnceLock<String>,
    projects: RwLock<HashMap<ProjectId, Entry>>,
    locks: Mutex<HashMap<ProjectId, Arc<tokio::sync::Mutex<()>>>>,
    changes: broadcast::Sender<HostEvent>,
    /// bumped by every change to `projects`; keys `list_cache`
    generation: std::sync::atomic::AtomicU64,
    /// the sorted project list at a generation (`GET /projects` under load re-sorts nothing)
    list_cache: Mutex<(u64, ProjectList)>,
    /// owner of every task the host spawns
    tasks: Tasks,
    /// the storage reserve as of the last disk refresh, and the homes held because of it
    reserve: Mutex<reserve::ReserveState>,
    /// the master link, once started (`link`)
    link: std::sync::OnceLock<Arc<link::Link>>,
    /// every published event, numbered, for `GET /events`
    events: events::EventRing,
    /// what `/metrics` exposes
    metrics: Arc<metrics::Metrics>,
    /// move operations (`moves`)
    moves: moves::Moves,
    /// each project's activity (`idle`)
    cells: idle::Cells,
}

/// The backends a host runs on (real ones from [`Host::new`], simulated ones in tests).
#[derive(Debug, Clone)]
pub struct Backends {
    /// project units
    pub units: Arc<dyn ports::Units>,
    /// project storage
    pub storage: Arc<dyn ports::Storage>,
    /// the store
    pub store: Arc<dyn ports::Store>,
}

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Host {
    /// Creates the state directory and opens the store in it (the daemon shares this handle
    /// with the token revocation list, which talks to the store directly).
    pub fn open_store(settings: &Settings) -> anyhow::Result<crate::backends::sqlite::Store> {
        use anyhow::Context as _;
        std::fs::create_dir_all(&settings.state_dir).with_context(|| {
            format!(
                "cannot create state directory {}",
                settings.state_dir.display()
            )
        })?;
        crate::backends::sqlite::Store::open(&settings.state_dir.join("state.db"))
            .context("cannot open the store")
    }

    /// Connects to systemd, starts watching project units and reconciles the picture from
    /// systemd and `store` (from [`Host::open_store`]), adopting projects that kept running.
    pub async fn new(
        settings: Settings,
        store: crate::backends::sqlite::Store,
    ) -> anyhow::Result<Arc<Host>> {
        use anyhow::Context as _;
        let units = crate::backends::units::SystemdUnits::connect(settings.clone())
            .await
            .context("cannot connect to systemd on the system bus")?;
        let storage = crate::backends::btrfs::Storage::new(&settings);
        let backends = Backends {
            units: Arc::new(units),
            storage: Arc::new(storage),
            store: Arc::new(store),
        };
        Host::with_backends(settings, backends).await
    }

    /// A host over the given backends: watches their units, reconciles, puts the slice limits
    /// on, and starts its refresh loops (owned by its [`Tasks`]).
    pub async fn with_backends(settings: Settings, b: Backends) -> anyhow::Result<Arc<Host>> {
        use anyhow::Context as _;
        let host_id = b.store.host_id().await?;
        let (changes, _) = broadcast::channel(1024);
        let metrics = Arc::new(metrics::Metrics::new());
        let store: Arc<dyn ports::Store> = Arc::new(metrics::TimedStore {
            inner: b.store,
            metrics: metrics.clone(),
        });
        let (cells, thaw_rx) = idle::Cells::new();
        let host = Arc::new(Host {
            settings,
            host_id,
            store,
            units: b.units,
            storage: b.storage,
            ssh_host_key: std::sync::OnceLock::new(),
            projects: RwLock::new(HashMap::new()),
            locks: Mutex::new(HashMap::new()),
            changes,
            generation: std::sync::atomic::AtomicU64::new(1),
            list_cache: Mutex::new((0, Arc::new(Vec::new()))),
            tasks: Tasks::new(),
            reserve: Mutex::new(reserve::ReserveState::default()),
            link: std::sync::OnceLock::new(),
            events: events::EventRing::new(events::CAPACITY, now_ms().saturating_mul(1000)),
            metrics,
            moves: Default::default(),
            cells,
        });
        // watch before reading, so no change falls between the read and the stream
        let mut events = host.units.watch().await?;
        let weak = Arc::downgrade(&host);
        host.tasks.spawn_loop("unit watcher", async move {
            while let Some(ev) = events.next().await {
                let Some(h) = weak.upgrade() else { break };
                h.apply(ev);
            }
            tracing::warn!("unit event stream ended");
        });
        host.reconcile().await?;
        host.recover_moves().await;
        host.units
            .set_slice_limits(&host.settings.slice)
            .await
            .context("cannot set the host-wide limits on the projects' slice")?;
        let weak = Arc::downgrade(&host);
        host.tasks.spawn_loop("memory refresh", async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                let Some(h) = weak.upgrade() else { break };
                h.refresh_memory().await;
            }
        });
        let weak = Arc::downgrade(&host);
        host.tasks.spawn_loop("idle freeze and stop", async move {
            let mut tick = tokio::time::interval(idle::TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(h) = weak.upgrade() else { break };
                h.idle_tick().await;
            }
        });
        let weak = Arc::downgrade(&host);
        host.tasks.spawn_loop("thaw on write", async move {
            let Some(h) = weak.upgrade() else { return };
            let token = h.tasks.token();
            drop(h);
            // the receiver ends with the host's cells; the token ends it at shutdown
            let mut rx = thaw_rx;
            loop {
                let id = tokio::select! {
                    id = rx.recv() => id,
                    () = token.cancelled() => None,
                };
                let Some(id) = id else { break };
                let Some(h) = weak.upgrade() else { break };
                let host = h.clone();
                drop(h.tasks.spawn_work(async move {
                    if let Err(e) = host.thaw_if_frozen(id).await {
                        tracing::warn!(project_id = %id, error = %e, "cannot thaw the project");
                    }
                }));
            }
        });
        let weak = Arc::downgrade(&host);
        let every = (host.settings.moves.staging_ttl / 4)
            .clamp(Duration::from_secs(1), Duration::from_secs(600));
        host.tasks.spawn_loop("move staging expiry", async move {
            // the first tick is at once: what expired while the daemon was down goes at start
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(h) = weak.upgrade() else { break };
                h.expire_moves().await;
            }
        });
        let weak = Arc::downgrade(&host);
        host.tasks.spawn_loop("disk refresh", async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                let Some(h) = weak.upgrade() else { break };
                h.refresh_storage().await;
            }
        });
        Ok(host)
    }

    /// The token cancelled when the host shuts down: adapters end their own loops on it (the
    /// D-Bus publisher must, to let go of its `Arc<Host>`).
    pub fn shutdown_token(&self) -> tokio_util::sync::CancellationToken {
        self.tasks.token()
    }

    /// Shuts the core down, in order: lets in-flight starts, stops and limit changes finish
    /// (waiting at most `drain`), then cancels the loops and waits for them. Call after the
    /// adapters stopped taking requests.
    pub async fn shutdown(&self, drain: Duration) {
        self.tasks.shutdown(drain).await
    }

    /// Records the SSH gateway's host key (set once, by the SSH server at start).
    pub fn set_ssh_host_key(&self, public_key_line: String) {
        let _ = self.ssh_host_key.set(public_key_line);
    }

    /// The SSH gateway's host key, if SSH is served.
    pub fn ssh_host_key(&self) -> Option<String> {
        self.ssh_host_key.get().cloned()
    }

    /// This host's id (stable across restarts).
    pub fn host_id(&self) -> &str {
        &self.host_id
    }

    /// The settings in force.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Subscribes to the core's events.
    pub fn subscribe(&self) -> broadcast::Receiver<HostEvent> {
        self.changes.subscribe()
    }

    /// The numbered ring of the core's events (`GET /events`).
    pub fn events(&self) -> &EventRing {
        &self.events
    }

    /// Where the core and adapters record metrics.
    pub fn metrics(&self) -> &metrics::Metrics {
        &self.metrics
    }

    /// Publishes an event: numbered into the ring, then to subscribers (D-Bus).
    fn emit(&self, ev: HostEvent) {
        self.events.push(ev.clone(), now_ms());
        let _ = self.changes.send(ev);
    }

    /// The metrics exposition (from memory: no fork, no D-Bus call).
    pub fn render_metrics(&self) -> String {
        self.metrics
            .render(&self.samples(), crate::backends::procself::read())
    }

    /// What the core holds of each project (known, or with a unit up) for metrics and `top`.
    pub fn samples(&self) -> Vec<metrics::ProjectSample> {
        self.read_entries()
            .iter()
            .filter(|(_, e)| e.known || e.unit.is_some())
            .map(|(id, e)| metrics::ProjectSample {
                id: *id,
                state: e.state(),
                started_at_ms: e
                    .unit
                    .as_ref()
                    .map(|u| u.active_enter_usec / 1000)
                    .filter(|t| *t != 0),
                memory: e.memory_current,
                cpu_nsec: e.cpu_nsec,
                disk_used: e.disk.and_then(|d| d.used),
                disk_quota: e.disk.and_then(|d| d.quota),
            })
            .collect()
    }

    /// A project's journal (the container's output and its unit's messages), oldest first.
    pub async fn logs(
        &self,
        id: ProjectId,
        q: &ports::LogQuery,
    ) -> Result<Vec<ports::LogLine>, Error> {
        self.units
            .journal(id, q)
            .await
            .map_err(|reason| Error::Journal { id, reason })
    }

    fn entries(&self) -> EntriesMut<'_> {
        EntriesMut {
            guard: self.projects.write().unwrap_or_else(|p| p.into_inner()),
            generation: &self.generation,
        }
    }

    fn read_entries(&self) -> std::sync::RwLockReadGuard<'_, HashMap<ProjectId, Entry>> {
        self.projects.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets a project's unit info, publishing a state change when there is one.
    fn set_unit(&self, id: ProjectId, unit: Option<UnitInfo>) {
        let changed = {
            let mut map = self.entries();
            // never grow the map for ids that have no unit and are not known (random ids on stop)
            if unit.is_none() && !map.contains_key(&id) {
                return;
            }
            let e = map.entry(id).or_default();
            let before = e.state();
            if unit.is_none() {
                e.frozen = false;
                self.forget_frozen(id);
                e.memory_current = None;
                // a stopped project's network namespace is not used again
                self.units.forget(id);
                e.cpu_nsec = None;
                e.phases = None;
            }
            e.unit = unit;
            let after = e.state();
            (before != after).then_some(after)
        };
        if let Some(state) = changed {
            tracing::info!(project_id = %id, state = %state, "project state changed");
            self.emit(HostEvent::State(id, state));
        }
    }

    fn apply(&self, ev: UnitEvent) {
        match ev {
            UnitEvent::Removed(id) => self.set_unit(id, None),
            UnitEvent::Changed {
                id,
                active_state,
                sub_state,
                main_pid,
                active_enter_usec,
            } => {
                let mut info = self
                    .read_entries()
                    .get(&id)
                    .and_then(|e| e.unit.clone())
                    .unwrap_or_default();
                if let Some(v) = active_state {
                    info.active_state = v;
                }
                if let Some(v) = sub_state {
                    info.sub_state = v;
                }
                if let Some(v) = main_pid {
                    info.main_pid = v;
                }
                if let Some(v) = active_enter_usec {
                    info.active_enter_usec = v;
                }
                self.set_unit(id, Some(info));
            }
        }
    }

    /// Brings the in-memory picture and the store in line with the units systemd has loaded:
    /// one listing of the units (`Units::list`: one `ListUnitsByPatterns` and pipelined property
    /// reads), then only the store rows that disagree are written, many in flight at once (the
    /// store serializes them on its own thread; no round trip is awaited per project).
    async fn reconcile(&self) -> anyhow::Result<()> {
        /// Store writes in flight at once.
        const WRITES: usize = 32;
        let t0 = std::time::Instant::now();
        let rows = self.store.projects().await?;
        let units = self.units.list().await?;
        let units_ms = t0.elapsed().as_millis() as u64;
        let now = now_ms();
        let stored: HashMap<ProjectId, ProjectState> =
            rows.iter().map(|r| (r.id, r.state)).collect();
        {
            let mut map = self.entries();
            for r in &rows {
                let e = map.entry(r.id).or_default();
                e.known = true;
                e.last_touched = e.last_touched.max(r.last_touched);
                e.idle_override = (r.config.idle_freeze, r.config.idle_stop);
            }
        }
        // (id, state, last_touched) the store must be told
        let mut writes: Vec<(ProjectId, ProjectState, u64)> = Vec::new();
        let mut adopted = 0;
        for (id, info) in units {
            let state = ProjectState::from_active_state(info.active_state);
            if stored.get(&id) != Some(&state) {
                writes.push((id, state, now));
            }
            self.mark_known(id, now);
            let up = state == ProjectState::Running;
            self.set_unit(id, Some(info));
            if up {
                self.adopt_frozen(id);
            }
            adopted += 1;
        }
        // the store remembers projects running that systemd no longer has: they stopped meanwhile
        {
            let map = self.read_entries();
            for r in rows.iter().filter(|r| r.state != ProjectState::Opened) {
                if map.get(&r.id).is_some_and(|e| e.unit.is_none()) {
                    writes.push((r.id, ProjectState::Opened, r.last_touched));
                }
            }
        }
        let corrected = writes.len();
        let mut results = futures_util::stream::iter(writes)
            .map(|(id, state, at)| async move { self.store.upsert(id, state, None, at).await })
            .buffer_unordered(WRITES);
        while let Some(r) = results.next().await {
            r?;
        }
        tracing::info!(
            known = rows.len(),
            running_units = adopted,
            store_corrected = corrected,
            units_ms,
            took_ms = t0.elapsed().as_millis() as u64,
            "reconciled with systemd and the store"
        );
        Ok(())
    }

    async fn refresh_memory(&self) {
        let running: Vec<ProjectId> = self
            .read_entries()
            .iter()
            .filter(|(_, e)| e.unit.is_some())
            .map(|(id, _)| *id)
            .collect();
        for id in running {
            let m = self.units.memory_current(id).await;
            let cpu = self.units.cpu_usage_nsec(id).await;
            if let Some(e) = self.entries().get_mut(&id) {
                e.memory_current = m;
                e.cpu_nsec = cpu;
            }
        }
    }

    /// Records that a project is known (in the store) and touched at `now`; publishes
    /// [`HostEvent::New`] the first time.
    fn mark_known(&self, id: ProjectId, now: u64) {
        let new = {
            let mut map = self.entries();
            let e = map.entry(id).or_default();
            e.last_touched = e.last_touched.max(now);
            !std::mem::replace(&mut e.known, true)
        };
        if new {
            self.emit(HostEvent::New(id));
        }
    }

    /// Whether this host knows the project (started it at least once, or adopted it).
    pub fn is_known(&self, id: ProjectId) -> bool {
        self.read_entries().get(&id).is_some_and(|e| e.known)
    }

    /// When a known project was last touched (ms since the epoch).
    pub fn last_touched(&self, id: ProjectId) -> Option<u64> {
        self.read_entries()
            .get(&id)
            .filter(|e| e.known)
            .map(|e| e.last_touched)
    }

    /// How many projects have a unit up (starting, running or stopping).
    pub fn running_count(&self) -> usize {
        self.read_entries()
            .values()
            .filter(|e| e.state() != ProjectState::Opened)
            .count()
    }

    /// A project's status from memory, without touching it (for property reads).
    pub fn peek_status(&self, id: ProjectId) -> Status {
        self.status_of(id)
    }

    fn lock(&self, id: ProjectId) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        // drop locks nobody holds or waits for, so random ids cannot grow the map for ever
        if locks.len() > 4096 {
            locks.retain(|_, l| Arc::strong_count(l) > 1);
        }
        locks.entry(id).or_default().clone()
    }

    fn status_of(&self, id: ProjectId) -> Status {
        let e = self.read_entries().get(&id).cloned().unwrap_or_default();
        let state = e.state();
        let u = e.unit.as_ref();
        Status {
            state,
            server: self.host_id.clone(),
            unit: self.units.unit_name(id),
            sub_state: u.map(|u| u.sub_state.clone()),
            main_pid: u.map(|u| u.main_pid).filter(|p| *p != 0),
            memory_current: e.memory_current,
            started_at: u.map(|u| u.active_enter_usec / 1000).filter(|t| *t != 0),
            disk: e.disk,
            storage_full: self.storage_full(),
            phase_timings_ms: e.phases.filter(|_| u.is_some()),
            activity: state
                .is_up()
                .then(|| self.activity_status(id, state == ProjectState::Frozen))
                .flatten(),
        }
    }

    /// Records that an API call touched the project: its place in `GET /projects`, and
    /// activity for idle freeze and stop.
    fn touch(&self, id: ProjectId) {
        if self.is_known(id) {
            self.bump_activity(id);
        }
        self.touch_listed(id);
    }

    /// Moves the project up in `GET /projects` only (a status read: a client polling the
    /// status does not keep a project from being idle).
    fn touch_listed(&self, id: ProjectId) {
        let now = now_ms();
        let known = {
            let mut map = self.entries();
            match map.get_mut(&id) {
                Some(e) if e.known => {
                    e.last_touched = e.last_touched.max(now);
                    // the store keeps touches to the second: a status poll is not a write each
                    let persist = now >= e.persisted_touch + 1000;
                    if persist {
                        e.persisted_touch = now;
                    }
                    persist
                }
                _ => false,
            }
        };
        if known {
            self.store.touch(id, now);
        }
    }

    /// The status of a project, from memory. A project this host has never seen is `opened`
    /// (as the seed API answers) and is not recorded.
    pub fn status(&self, id: ProjectId) -> Status {
        self.touch_listed(id);
        self.status_of(id)
    }

    /// Known projects with their last touch (ms), most recent first.
    pub fn list(&self) -> ProjectList {
        use std::sync::atomic::Ordering;
        let generation = self.generation.load(Ordering::Acquire);
        {
            let cache = self.list_cache.lock().unwrap_or_else(|p| p.into_inner());
            if cache.0 == generation {
                return cache.1.clone();
            }
        }
        let mut v: Vec<(ProjectId, u64)> = self
            .read_entries()
            .iter()
            .filter(|(_, e)| e.known)
            .map(|(id, e)| (*id, e.last_touched))
            .collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let v = Arc::new(v);
        *self.list_cache.lock().unwrap_or_else(|p| p.into_inner()) = (generation, v.clone());
        v
    }

    /// Starts a project (idempotent: a running project is left as it is). `config` replaces the
    /// stored config of the project when given.
    ///
    /// Runs to completion on its own task: a client that goes away mid-start (an HTTP timeout)
    /// cannot leave the project half-recorded.
    pub async fn start(
        self: &Arc<Self>,
        id: ProjectId,
        config: Option<RunConfig>,
    ) -> Result<Status, Error> {
        let host = self.clone();
        let t0 = std::time::Instant::now();
        let r = match self
            .tasks
            .spawn_work(async move { host.start_now(id, config).await })
            .await
        {
            Ok(r) => r,
            Err(e) => Err(Error::StartFailed {
                id,
                reason: format!("start task failed: {e}"),
                journal: String::new(),
            }),
        };
        self.metrics.start(r.is_ok(), t0.elapsed());
        if let Err(Error::StartFailed { reason, .. }) = &r {
            self.emit(HostEvent::StartFailed(id, reason.clone()));
        }
        r
    }

    /// The image a config runs, when it is a plain reference the host allows (nothing else may
    /// reach podman: it would import archives and directories whatever `--pull` says).
    fn image_of(&self, cfg: &RunConfig) -> Result<crate::domain::images::ImageRef, Error> {
        let p = &self.settings.projects;
        let allow = crate::domain::images::Allowlist::new(&p.image, &p.images).map_err(|e| {
            crate::domain::images::ImageError::NotAllowed(format!("(config projects.images: {e})"))
        })?;
        Ok(allow.resolve(cfg.image.as_deref())?)
    }

    async fn start_now(&self, id: ProjectId, config: Option<RunConfig>) -> Result<Status, Error> {
        let t_start = std::time::Instant::now();
        if let Some(c) = &config {
            c.validate()?;
            self.image_of(c)?;
            self.limits_of(c)?;
        }
        let lock = self.lock(id);
        let _guard = lock.lock().await;
        if let Some(info) = self.units.info(id).await? {
            match ProjectState::from_active_state(info.active_state) {
                ProjectState::Running | ProjectState::Starting | ProjectState::Frozen => {
                    self.set_unit(id, Some(info));
                    // a start of a frozen project thaws it
                    self.thaw_locked(id).await?;
                    if !self.is_known(id) {
                        // running but unrecorded (its starter went away before recording it)
                        let state = self.status_of(id).state;
                        self.store.upsert(id, state, config, now_ms()).await?;
                        self.mark_known(id, now_ms());
                    }
                    self.touch(id);
                    return Ok(self.status_of(id));
                }
                // a stop in progress (made outside the host): let it finish, then start anew
                ProjectState::Stopping => self.units.stop(id, self.stop_wait()).await?,
                ProjectState::Opened => self.units.reset_failed(id).await,
            }
        }
        let config = match config {
            Some(c) => c,
            None => self.stored_config(id).await?,
        };
        let image = self.image_of(&config)?;
        self.check_reserve(id, "start")?;
        let t_storage = std::time::Instant::now();
        let home = self.storage.ensure_home(id).await?;
        let limits = self.limits_of(&config)?;
        let id_base = self.id_range(id).await?;
        self.convert_home(id, id_base).await?;
        let (snapshots, scratch, tmp) = self.prepare_storage(id, &config, id_base).await?;
        let plan = StartPlan {
            id,
            config: config.clone(),
            image,
            id_base,
            home,
            snapshots,
            scratch,
            tmp,
            limits,
        };
        let storage_took = t_storage.elapsed();
        tracing::info!(project_id = %id, unit = %self.units.unit_name(id), "starting project");
        let t_unit = std::time::Instant::now();
        let unit_timings = match self.units.start(plan).await {
            Ok(t) => t,
            Err(StartError::Prepare(reason)) => {
                return Err(Error::StartFailed {
                    id,
                    reason,
                    journal: String::new(),
                });
            }
            Err(StartError::Unit { reason, journal }) => {
                self.clean_up_failed_start(id).await;
                let now = now_ms();
                if self.read_entries().get(&id).is_some_and(|e| e.known) {
                    self.store
                        .upsert(id, ProjectState::Opened, None, now)
                        .await?;
                }
                let failed = crate::domain::master::ReportKind::Failed;
                self.store
                    .report(id, failed, ProjectState::Opened, now)
                    .await?;
                tracing::warn!(project_id = %id, error = %reason, journal = %journal, "project start failed");
                return Err(Error::StartFailed {
                    id,
                    reason,
                    journal: crate::cmd::tail(&journal, 6),
                });
            }
        };
        let t_ready = std::time::Instant::now();
        // what the backend did not account to itself (its own preparation) counts as the unit's
        let unit_took = t_unit.elapsed().saturating_sub(unit_timings.podman);
        // the CPU quota and the read of the unit's state: two calls to PID 1 at once
        let (quota, info) = tokio::join!(
            self.units.set_cpu_quota(id, Some(limits.cpu)),
            self.units.info(id)
        );
        if let Err(e) = quota {
            // never leave a project running without its CPU limit
            self.clean_up_failed_start(id).await;
            return Err(Error::StartFailed {
                id,
                reason: format!("cannot set its CPU quota: {e}"),
                journal: String::new(),
            });
        }
        self.set_unit(id, info?);
        let state = self.status_of(id).state;
        let now = now_ms();
        self.store
            .upsert(id, state, Some(config.clone()), now)
            .await?;
        self.mark_known(id, now);
        self.bump_activity(id);
        let phases = crate::domain::phases::PhaseTimings::new(
            storage_took,
            unit_took,
            unit_timings.podman,
            t_ready.elapsed(),
            t_start.elapsed(),
        );
        if let Some(e) = self.entries().get_mut(&id) {
            e.phases = Some(phases);
            e.idle_override = (config.idle_freeze, config.idle_stop);
        }
        let status = self.status_of(id);
        // journald fields PROJECT_ID, PHASE_*_MS (the journald layer upper-cases field names)
        tracing::info!(
            project_id = %id,
            state = %status.state,
            main_pid = status.main_pid,
            phase_storage_ms = phases.storage,
            phase_unit_ms = phases.unit,
            phase_podman_ms = phases.podman,
            phase_ready_ms = phases.ready,
            phase_total_ms = phases.total,
            "project started"
        );
        Ok(status)
    }

    async fn clean_up_failed_start(&self, id: ProjectId) {
        if let Err(e) = self.units.stop(id, self.stop_wait()).await {
            tracing::warn!(project_id = %id, error = %e, "cleanup: stopping the failed unit");
        }
        self.units.reset_failed(id).await;
        if let Err(e) = self.units.run_helper(Helper::RemoveContainer(id)).await {
            tracing::warn!(project_id = %id, error = %e, "cleanup: removing the container");
        }
        let info = self.units.info(id).await.ok().flatten();
        self.set_unit(id, info);
    }

    async fn stored_config(&self, id: ProjectId) -> Result<RunConfig, Error> {
        Ok(self
            .store
            .project(id)
            .await?
            .map(|r| r.config)
            .unwrap_or_default())
    }

    fn stop_wait(&self) -> Duration {
        Duration::from_secs(self.settings.projects.stop_timeout.as_secs() + 60)
    }

    /// Stops a project (idempotent). `force` kills it at once instead of a graceful stop.
    /// Runs to completion on its own task, like [`Host::start`].
    pub async fn stop(self: &Arc<Self>, id: ProjectId, force: bool) -> Result<Status, Error> {
        let host = self.clone();
        let t0 = std::time::Instant::now();
        let r = match self
            .tasks
            .spawn_work(async move { host.stop_now(id, force).await })
            .await
        {
            Ok(r) => r,
            Err(e) => Err(Error::StopFailed {
                id,
                reason: format!("stop task failed: {e}"),
            }),
        };
        self.metrics.stop(r.is_ok(), t0.elapsed());
        r
    }

    async fn stop_now(&self, id: ProjectId, force: bool) -> Result<Status, Error> {
        let lock = self.lock(id);
        let _guard = lock.lock().await;
        self.stop_locked(id, force).await
    }

    /// Stops the project (not forced) if `still` holds once its lock is taken; the idle stop.
    pub(crate) async fn stop_if(
        self: &Arc<Self>,
        id: ProjectId,
        still: impl FnOnce() -> bool + Send + 'static,
    ) -> Result<(), Error> {
        let host = self.clone();
        let t0 = std::time::Instant::now();
        let r = self
            .tasks
            .spawn_work(async move {
                let lock = host.lock(id);
                let _guard = lock.lock().await;
                if !still() {
                    return Ok(false);
                }
                host.stop_locked(id, false).await.map(|_| true)
            })
            .await
            .map_err(|e| Error::StopFailed {
                id,
                reason: format!("stop task failed: {e}"),
            })?;
        if !matches!(r, Ok(false)) {
            self.metrics.stop(r.is_ok(), t0.elapsed());
        }
        r.map(|_| ())
    }

    async fn stop_locked(&self, id: ProjectId, force: bool) -> Result<Status, Error> {
        if self.units.info(id).await?.is_some() {
            // a frozen project cannot handle its SIGTERM: thaw it first
            if let Err(e) = self.thaw_locked(id).await {
                tracing::warn!(project_id = %id, error = %e, "cannot thaw the project before stopping it");
            }
            tracing::info!(project_id = %id, force, "stopping project");
            // podman stop runs in the unit's cgroup: not at the project's CPU quota (see start)
            if let Err(e) = self.units.set_cpu_quota(id, None).await {
                tracing::debug!(project_id = %id, error = %e, "cannot lift the CPU quota before stopping");
            }
            if force {
                self.units.kill(id).await?;
            }
            let stopped = self.units.stop(id, self.stop_wait()).await;
            let info = self.units.info(id).await?;
            let still_up = info.as_ref().is_some_and(|i| {
                !matches!(
                    ProjectState::from_active_state(i.active_state),
                    ProjectState::Opened
                )
            });
            match (stopped, still_up) {
                (Err(e), true) => {
                    self.set_unit(id, info);
                    return Err(Error::StopFailed {
                        id,
                        reason: e.to_string(),
                    });
                }
                // the unit is gone but its stop failed (a timeout: systemd killed what was
                // left, `podman rm` among it): the container may still be recorded
                (Err(e), false) => {
                    tracing::warn!(project_id = %id, error = %e, "the unit's stop failed: removing the container");
                    if let Err(e) = self.units.run_helper(Helper::RemoveContainer(id)).await {
                        tracing::warn!(project_id = %id, error = %e, "cleanup: removing the container");
                    }
                }
                (Ok(()), _) => {}
            }
            if info
                .as_ref()
                .is_some_and(|i| i.active_state == ActiveState::Failed)
            {
                self.units.reset_failed(id).await;
            }
            self.set_unit(id, None);
        } else {
            self.set_unit(id, None);
        }
        if self.read_entries().get(&id).is_some_and(|e| e.known) {
            self.store
                .upsert(id, ProjectState::Opened, None, now_ms())
                .await?;
            self.touch(id);
        }
        Ok(self.status_of(id))
    }

    /// The limits `cfg` gives on this host: its fields over the host's defaults, at most the
    /// host's maxima.
    fn limits_of(&self, cfg: &RunConfig) -> Result<Limits, Error> {
        let l = limits::resolve(cfg, &self.settings.limits.default);
        limits::check(&l, &self.settings.limits.max)?;
        let network = cfg.network.unwrap_or(self.settings.projects.network);
        limits::check_config(cfg, network, &self.settings.limits.max)?;
        Ok(l)
    }

    /// A project's stored config (what its next start uses) and the limits it gives.
    pub async fn config(&self, id: ProjectId) -> Result<ConfigView, Error> {
        let config = self.stored_config(id).await?;
        let limits = limits::resolve(&config, &self.settings.limits.default);
        Ok(ConfigView { config, limits })
    }

    /// Changes a project's limits. Always stored for its next start; when it runs, applied at
    /// once without a restart: `podman update` for what the container's own cgroup holds (memory,
    /// swap), then `SetUnitProperties` (runtime) on its unit. If either step fails the project
    /// keeps its old limits and nothing is stored.
    /// Runs to completion on its own task, like [`Host::start`].
    pub async fn set_limits(
        self: &Arc<Self>,
        id: ProjectId,
        patch: LimitsPatch,
    ) -> Result<LimitsUpdate, Error> {
        let host = self.clone();
        match self
            .tasks
            .spawn_work(async move { host.set_limits_now(id, patch).await })
            .await
        {
            Ok(r) => r,
            Err(e) => Err(Error::UpdateFailed {
                id,
                reason: format!("update task failed: {e}"),
            }),
        }
    }

    async fn set_limits_now(
        &self,
        id: ProjectId,
        patch: LimitsPatch,
    ) -> Result<LimitsUpdate, Error> {
        let mut probe = RunConfig::default();
        patch.apply(&mut probe);
        probe.validate()?;
        let lock = self.lock(id);
        let _guard = lock.lock().await;
        let old = self.stored_config(id).await?;
        let mut config = old.clone();
        patch.apply(&mut config);
        config.validate()?;
        let new = self.limits_of(&config)?;
        let before = limits::resolve(&old, &self.settings.limits.default);
        let info = self.units.info(id).await?;
        let state = info.as_ref().map_or(ProjectState::Opened, |i| {
            ProjectState::from_active_state(i.active_state)
        });
        let live = matches!(state, ProjectState::Running | ProjectState::Starting);
        if live {
            self.apply_live(id, &before, &new).await?;
        }
        let now = now_ms();
        self.store.upsert(id, state, Some(config), now).await?;
        self.mark_known(id, now);
        tracing::info!(
            project_id = %id,
            live,
            memory = new.memory,
            swap = new.swap,
            cpu = new.cpu,
            pids = new.pids,
            cpu_weight = new.cpu_weight,
            io_weight = new.io_weight,
            "project limits changed"
        );
        Ok(LimitsUpdate {
            state,
            server: self.host_id.clone(),
            live,
            limits: new,
        })
    }

    async fn apply_live(&self, id: ProjectId, before: &Limits, new: &Limits) -> Result<(), Error> {
        let failed = |reason: String| Error::UpdateFailed { id, reason };
        // The container's own memory limit first: lowering it below what is in use fails here
        // (cgroup v1), before the unit has changed; raising it above the unit's is allowed.
        let container = limits::podman_update_flags(before) != limits::podman_update_flags(new);
        if container {
            self.units
                .run_helper(Helper::UpdateContainer(id, *new))
                .await
                .map_err(failed)?;
        }
        if let Err(e) = self.units.set_limits(id, new).await {
            if container
                && let Err(undo) = self
                    .units
                    .run_helper(Helper::UpdateContainer(id, *before))
                    .await
            {
                tracing::warn!(project_id = %id, error = %undo, "cannot restore the container's limits");
            }
            return Err(failed(e.to_string()));
        }
        Ok(())
    }
}
