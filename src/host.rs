//! The core: project lifecycle over systemd, podman and btrfs, per-project locks, state kept in
//! memory from systemd's signals, reconcile on start. Knows nothing of HTTP or D-Bus serving.
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{broadcast, mpsc};

use crate::btrfs::{Storage, StorageError};
use crate::cmd;
use crate::config::Settings;
use crate::podman;
use crate::project::{
    InvalidConfig, InvalidProjectId, ProjectId, ProjectState, RunConfig, Status, UnitInfo,
};
use crate::store::{Store, StoreError};
use crate::systemd::{self, Systemd, SystemdError, UnitEvent};

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
        }
    }
}

/// A state change of a project, for adapters that publish them (D-Bus signals).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateChange {
    /// the project
    pub id: ProjectId,
    /// its new state
    pub state: ProjectState,
}

#[derive(Debug, Default, Clone)]
struct Entry {
    /// in the store (started at least once, or adopted)
    known: bool,
    last_touched: u64,
    unit: Option<UnitInfo>,
    memory_current: Option<u64>,
}

impl Entry {
    fn state(&self) -> ProjectState {
        self.unit.as_ref().map_or(ProjectState::Opened, |u| {
            ProjectState::from_active_state(&u.active_state)
        })
    }
}

/// The project host.
#[derive(Debug)]
pub struct Host {
    settings: Settings,
    host_id: String,
    store: Store,
    systemd: Systemd,
    storage: Storage,
    projects: RwLock<HashMap<ProjectId, Entry>>,
    locks: Mutex<HashMap<ProjectId, Arc<tokio::sync::Mutex<()>>>>,
    changes: broadcast::Sender<StateChange>,
}

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Host {
    /// Opens the store, connects to systemd, starts watching project units and reconciles the
    /// picture from systemd and the store (adopting projects that kept running).
    pub async fn new(settings: Settings) -> anyhow::Result<Arc<Host>> {
        use anyhow::Context as _;
        std::fs::create_dir_all(&settings.state_dir).with_context(|| {
            format!(
                "cannot create state directory {}",
                settings.state_dir.display()
            )
        })?;
        let store =
            Store::open(&settings.state_dir.join("state.db")).context("cannot open the store")?;
        let host_id = store.host_id().await?;
        let systemd = Systemd::connect()
            .await
            .context("cannot connect to systemd on the system bus")?;
        let storage = Storage::new(&settings);
        let (changes, _) = broadcast::channel(1024);
        let host = Arc::new(Host {
            settings,
            host_id,
            store,
            systemd,
            storage,
            projects: RwLock::new(HashMap::new()),
            locks: Mutex::new(HashMap::new()),
            changes,
        });
        // watch before reading, so no change falls between the read and the stream
        let (tx, mut rx) = mpsc::unbounded_channel();
        host.systemd.watch(tx).await?;
        let weak = Arc::downgrade(&host);
        tokio::spawn(async move {
            while let Some(ev) = rx.recv().await {
                let Some(h) = weak.upgrade() else { break };
                h.apply(ev);
            }
        });
        host.reconcile().await?;
        let weak = Arc::downgrade(&host);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                let Some(h) = weak.upgrade() else { break };
                h.refresh_memory().await;
            }
        });
        Ok(host)
    }

    /// This host's id (stable across restarts).
    pub fn host_id(&self) -> &str {
        &self.host_id
    }

    /// The settings in force.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Subscribes to project state changes.
    pub fn subscribe(&self) -> broadcast::Receiver<StateChange> {
        self.changes.subscribe()
    }

    fn entries(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<ProjectId, Entry>> {
        self.projects.write().unwrap_or_else(|p| p.into_inner())
    }

    fn read_entries(&self) -> std::sync::RwLockReadGuard<'_, HashMap<ProjectId, Entry>> {
        self.projects.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets a project's unit info, publishing a state change when there is one.
    fn set_unit(&self, id: ProjectId, unit: Option<UnitInfo>) {
        let changed = {
            let mut map = self.entries();
            let e = map.entry(id).or_default();
            let before = e.state();
            if unit.is_none() {
                e.memory_current = None;
            }
            e.unit = unit;
            let after = e.state();
            (before != after).then_some(after)
        };
        if let Some(state) = changed {
            tracing::info!(project_id = %id, state = %state, "project state changed");
            let _ = self.changes.send(StateChange { id, state });
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

    async fn reconcile(&self) -> anyhow::Result<()> {
        let rows = self.store.projects().await?;
        let units = self.systemd.list_project_units().await?;
        let now = now_ms();
        {
            let mut map = self.entries();
            for r in &rows {
                let e = map.entry(r.id).or_default();
                e.known = true;
                e.last_touched = e.last_touched.max(r.last_touched);
            }
        }
        let mut adopted = 0;
        for (id, info) in units {
            let state = ProjectState::from_active_state(&info.active_state);
            if !rows.iter().any(|r| r.id == id && r.state == state) {
                self.store.upsert(id, state, None, now).await?;
            }
            {
                let mut map = self.entries();
                let e = map.entry(id).or_default();
                e.known = true;
                if e.last_touched == 0 {
                    e.last_touched = now;
                }
            }
            self.set_unit(id, Some(info));
            adopted += 1;
        }
        // the store remembers projects running that systemd no longer has: they stopped meanwhile
        for r in rows.iter().filter(|r| r.state != ProjectState::Opened) {
            if self
                .read_entries()
                .get(&r.id)
                .is_some_and(|e| e.unit.is_none())
            {
                self.store
                    .upsert(r.id, ProjectState::Opened, None, r.last_touched)
                    .await?;
            }
        }
        tracing::info!(
            known = rows.len(),
            running_units = adopted,
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
            let m = self.systemd.memory_current(&id.unit_name()).await;
            if let Some(e) = self.entries().get_mut(&id) {
                e.memory_current = m;
            }
        }
    }

    fn lock(&self, id: ProjectId) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id)
            .or_default()
            .clone()
    }

    fn status_of(&self, id: ProjectId) -> Status {
        let map = self.read_entries();
        let e = map.get(&id).cloned().unwrap_or_default();
        let u = e.unit.as_ref();
        Status {
            state: e.state(),
            server: self.host_id.clone(),
            unit: id.unit_name(),
            sub_state: u.map(|u| u.sub_state.clone()),
            main_pid: u.map(|u| u.main_pid).filter(|p| *p != 0),
            memory_current: e.memory_current,
            started_at: u.map(|u| u.active_enter_usec / 1000).filter(|t| *t != 0),
        }
    }

    fn touch(&self, id: ProjectId) {
        let now = now_ms();
        let known = {
            let mut map = self.entries();
            match map.get_mut(&id) {
                Some(e) if e.known => {
                    e.last_touched = e.last_touched.max(now);
                    true
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
        self.touch(id);
        self.status_of(id)
    }

    /// Known projects with their last touch (ms), most recent first.
    pub fn list(&self) -> Vec<(ProjectId, u64)> {
        let mut v: Vec<(ProjectId, u64)> = self
            .read_entries()
            .iter()
            .filter(|(_, e)| e.known)
            .map(|(id, e)| (*id, e.last_touched))
            .collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v
    }

    /// Starts a project (idempotent: a running project is left as it is). `config` replaces the
    /// stored config of the project when given.
    pub async fn start(&self, id: ProjectId, config: Option<RunConfig>) -> Result<Status, Error> {
        if let Some(c) = &config {
            c.validate()?;
        }
        let lock = self.lock(id);
        let _guard = lock.lock().await;
        let unit = id.unit_name();
        if let Some(info) = self.systemd.unit_info(&unit).await? {
            match ProjectState::from_active_state(&info.active_state) {
                ProjectState::Running | ProjectState::Starting => {
                    self.set_unit(id, Some(info));
                    self.touch(id);
                    return Ok(self.status_of(id));
                }
                // a stop in progress (made outside the host): let it finish, then start anew
                ProjectState::Stopping => self.systemd.stop(&unit, self.stop_wait()).await?,
                ProjectState::Opened => self.systemd.reset_failed(&unit).await,
            }
        }
        let config = match config {
            Some(c) => c,
            None => self.stored_config(id).await?,
        };
        let home = self.storage.ensure_home(&id).await?;
        let argv = podman::run_argv(&id, &self.settings, &config, &home);
        let props = systemd::unit_properties(&id, argv, self.settings.projects.stop_timeout_secs);
        let since = SystemTime::now();
        tracing::info!(project_id = %id, unit = %unit, "starting project");
        if let Err(e) = self.start_unit(&unit, &props).await {
            let journal = self.journal_tail(&unit, since).await;
            self.clean_up_failed_start(id).await;
            let now = now_ms();
            if self.read_entries().get(&id).is_some_and(|e| e.known) {
                self.store
                    .upsert(id, ProjectState::Opened, None, now)
                    .await?;
            }
            tracing::warn!(project_id = %id, error = %e, journal = %journal, "project start failed");
            // podman says what went wrong in its "Error: …" line; lead with it
            let reason = match journal
                .lines()
                .find_map(|l| l.trim().strip_prefix("Error: "))
            {
                Some(podman) => format!("{podman} ({e})"),
                None => e.to_string(),
            };
            return Err(Error::StartFailed {
                id,
                reason,
                journal: cmd::tail(&journal, 6),
            });
        }
        let info = self.systemd.unit_info(&unit).await?;
        self.set_unit(id, info);
        let status = self.status_of(id);
        let now = now_ms();
        self.store
            .upsert(id, status.state, Some(config), now)
            .await?;
        {
            let mut map = self.entries();
            let e = map.entry(id).or_default();
            e.known = true;
            e.last_touched = e.last_touched.max(now);
        }
        tracing::info!(project_id = %id, state = %status.state, main_pid = status.main_pid, "project started");
        Ok(status)
    }

    /// StartTransientUnit, retrying while an old unit of the same name is being collected.
    async fn start_unit(
        &self,
        unit: &str,
        props: &[(&str, zbus::Variant<'_>)],
    ) -> Result<(), SystemdError> {
        let timeout = Duration::from_secs(150);
        for _ in 0..50 {
            match self.systemd.start_transient(unit, props, timeout).await {
                Err(SystemdError::Bus(zbus::Error::MethodError(n, _, _)))
                    if n.as_str() == "org.freedesktop.systemd1.UnitExists" =>
                {
                    self.systemd.reset_failed(unit).await;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                r => return r,
            }
        }
        self.systemd.start_transient(unit, props, timeout).await
    }

    async fn clean_up_failed_start(&self, id: ProjectId) {
        let unit = id.unit_name();
        if let Err(e) = self.systemd.stop(&unit, self.stop_wait()).await {
            tracing::warn!(project_id = %id, error = %e, "cleanup: stopping the failed unit");
        }
        self.systemd.reset_failed(&unit).await;
        // podman runs as a unit of its own, outside the daemon's sandbox
        let argv = std::iter::once(podman::PODMAN.to_string())
            .chain(podman::rm_by_name_argv(&id))
            .collect();
        if let Err(e) = self
            .systemd
            .run_oneshot(
                &format!("cocalc-project-cleanup-{id}.service"),
                &format!("Remove the container of CoCalc project {id}"),
                argv,
                Duration::from_secs(30),
            )
            .await
        {
            tracing::warn!(project_id = %id, error = %e, "cleanup: removing the container");
        }
        let info = self.systemd.unit_info(&unit).await.ok().flatten();
        self.set_unit(id, info);
    }

    async fn journal_tail(&self, unit: &str, since: SystemTime) -> String {
        let secs = since.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let args = [
            "-u",
            unit,
            "--since",
            &format!("@{secs}"),
            "-n",
            "15",
            "-o",
            "cat",
            "--no-pager",
            "-q",
        ];
        // journald may still be writing the last lines of the failed unit
        tokio::time::sleep(Duration::from_millis(200)).await;
        match cmd::run("/usr/bin/journalctl", args, Duration::from_secs(10)).await {
            // only this attempt: from the last "Starting …" line on
            Ok(out) => {
                let lines: Vec<&str> = out.lines().collect();
                let from = lines
                    .iter()
                    .rposition(|l| l.starts_with("Starting "))
                    .unwrap_or(0);
                lines[from..].join("\n")
            }
            Err(e) => format!("(journal unavailable: {e})"),
        }
    }

    async fn stored_config(&self, id: ProjectId) -> Result<RunConfig, Error> {
        Ok(self
            .store
            .projects()
            .await?
            .into_iter()
            .find(|r| r.id == id)
            .map(|r| r.config)
            .unwrap_or_default())
    }

    fn stop_wait(&self) -> Duration {
        Duration::from_secs(self.settings.projects.stop_timeout_secs + 60)
    }

    /// Stops a project (idempotent). `force` kills it at once instead of a graceful stop.
    pub async fn stop(&self, id: ProjectId, force: bool) -> Result<Status, Error> {
        let lock = self.lock(id);
        let _guard = lock.lock().await;
        let unit = id.unit_name();
        if self.systemd.unit_info(&unit).await?.is_some() {
            tracing::info!(project_id = %id, force, "stopping project");
            if force {
                self.systemd
                    .kill(&unit, nix::sys::signal::Signal::SIGKILL as i32)
                    .await?;
            }
            let stopped = self.systemd.stop(&unit, self.stop_wait()).await;
            let info = self.systemd.unit_info(&unit).await?;
            let still_up = info.as_ref().is_some_and(|i| {
                !matches!(
                    ProjectState::from_active_state(&i.active_state),
                    ProjectState::Opened
                )
            });
            if let (Err(e), true) = (stopped, still_up) {
                self.set_unit(id, info);
                return Err(Error::StopFailed {
                    id,
                    reason: e.to_string(),
                });
            }
            if info.as_ref().is_some_and(|i| i.active_state == "failed") {
                self.systemd.reset_failed(&unit).await;
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
}
