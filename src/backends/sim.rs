//! A simulated backend (as stratisd keeps `sim_engine` beside its real engine): units, storage and
//! store in memory, with knobs for delays, failures and vanishing units, and events like the real
//! watcher's. For in-process tests of the core (`core::tests`); it proves nothing about systemd,
//! podman or btrfs themselves, which the testbed's e2e suite does.
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::core::Backends;
use crate::domain::ids::Forbidden;
use crate::domain::limits::{Limits, SliceSettings};
use crate::domain::master::{Report, ReportKind};
use crate::domain::project::{ActiveState, ProjectId, ProjectState, RunConfig, UnitInfo};
use crate::domain::reserve::Space;
use crate::domain::snapshots::SnapshotName;
use crate::ports::{
    self, Helper, ProjectRow, QuotaMode, Role, StartError, StartPlan, StorageError, StoreError,
    Subvolume, UnitError, UnitEvent, UnitEvents, Usage,
};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Simulated units, storage and store, shared by every host built over them (a "restart" is a
/// new host over the same simulation).
#[derive(Debug, Clone, Default)]
pub struct Sim {
    /// the units
    pub units: Arc<SimUnits>,
    /// the storage
    pub storage: Arc<SimStorage>,
    /// the store
    pub store: Arc<SimStore>,
}

impl Sim {
    /// An empty simulation.
    pub fn new() -> Sim {
        Sim::default()
    }

    /// The backends for a host.
    pub fn backends(&self) -> Backends {
        Backends {
            units: self.units.clone(),
            storage: self.storage.clone(),
            store: self.store.clone(),
        }
    }
}

/// What a start of a given project does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartFault {
    /// The unit fails: the start returns this reason.
    Fail(String),
    /// The start job succeeds, but the unit is gone right after (collected, or stopped by
    /// someone else) before the host reads it.
    Vanish,
}

/// Simulated project units.
#[derive(Debug, Default)]
pub struct SimUnits {
    units: Mutex<HashMap<ProjectId, UnitInfo>>,
    watchers: Mutex<Vec<mpsc::UnboundedSender<UnitEvent>>>,
    faults: Mutex<HashMap<ProjectId, StartFault>>,
    start_delay: Mutex<Duration>,
    stop_delay: Mutex<Duration>,
    next_pid: AtomicU64,
    /// Start jobs run, by all hosts.
    pub starts: AtomicUsize,
    /// Stop jobs run.
    pub stops: AtomicUsize,
    /// Helper jobs run.
    pub helpers: Mutex<Vec<Helper>>,
    /// CPU quota last set per project (`None`: lifted).
    pub cpu: Mutex<HashMap<ProjectId, Option<f64>>>,
    /// The last start plan per project.
    pub plans: Mutex<HashMap<ProjectId, StartPlan>>,
    /// What a project's port is in the simulation: a local listener (see [`SimUnits::listen`]).
    ports: Mutex<HashMap<(ProjectId, u16), std::net::SocketAddr>>,
    /// Projects whose connect cache was dropped, in order.
    pub forgotten: Mutex<Vec<ProjectId>>,
    /// The units' journal: one line per start and stop, and what tests log.
    journal: Mutex<Vec<(ProjectId, ports::LogLine)>>,
    /// Units whose processes are frozen.
    frozen: Mutex<std::collections::HashSet<ProjectId>>,
    /// Freeze and thaw calls, in order (`true`: freeze).
    pub freezes: Mutex<Vec<(ProjectId, bool)>>,
    /// CPU time per unit (ns) set by tests (`burn`); default 250 ms.
    cpu_ns: Mutex<HashMap<ProjectId, u64>>,
    /// Freezing fails (as on a host without a usable freezer).
    pub freeze_fails: std::sync::atomic::AtomicBool,
}

impl SimUnits {
    /// Every start waits this long before the unit is up.
    pub fn set_start_delay(&self, d: Duration) {
        *lock(&self.start_delay) = d;
    }
    /// Every stop waits this long.
    pub fn set_stop_delay(&self, d: Duration) {
        *lock(&self.stop_delay) = d;
    }
    /// The next starts of `id` meet `fault` (until cleared with `None`).
    pub fn set_fault(&self, id: ProjectId, fault: Option<StartFault>) {
        let mut f = lock(&self.faults);
        match fault {
            Some(x) => f.insert(id, x),
            None => f.remove(&id),
        };
    }
    /// The unit's state as the simulated systemd has it.
    pub fn state(&self, id: ProjectId) -> Option<ActiveState> {
        lock(&self.units).get(&id).map(|u| u.active_state)
    }
    /// Sets a unit's state from outside the host (`None`: removes it), with its event.
    pub fn set_external(&self, id: ProjectId, state: Option<ActiveState>) {
        match state {
            Some(s) => {
                let pid = self.next_pid.fetch_add(1, Ordering::Relaxed) as u32 + 100;
                self.put(
                    id,
                    UnitInfo {
                        active_state: s,
                        sub_state: format!("{s:?}").to_lowercase(),
                        main_pid: pid,
                        active_enter_usec: 1,
                    },
                );
            }
            None => self.remove(id),
        }
    }
    fn put(&self, id: ProjectId, info: UnitInfo) {
        lock(&self.units).insert(id, info.clone());
        self.emit(UnitEvent::Changed {
            id,
            active_state: Some(info.active_state),
            sub_state: Some(info.sub_state),
            main_pid: Some(info.main_pid),
            active_enter_usec: Some(info.active_enter_usec),
        });
    }
    fn remove(&self, id: ProjectId) {
        lock(&self.frozen).remove(&id);
        if lock(&self.units).remove(&id).is_some() {
            self.emit(UnitEvent::Removed(id));
        }
    }
    /// Adds CPU time to the unit (as its processes using the CPU).
    pub fn burn(&self, id: ProjectId, ns: u64) {
        *lock(&self.cpu_ns).entry(id).or_insert(250_000_000) += ns;
    }
    /// Whether the unit's processes are frozen.
    pub fn frozen(&self, id: ProjectId) -> bool {
        lock(&self.frozen).contains(&id)
    }
    /// Makes `port` of project `id` reach `addr` (a listener of the test) while the project runs.
    pub fn listen(&self, id: ProjectId, port: u16, addr: std::net::SocketAddr) {
        lock(&self.ports).insert((id, port), addr);
    }
    fn emit(&self, ev: UnitEvent) {
        lock(&self.watchers).retain(|w| w.send(ev.clone()).is_ok());
    }
    /// Writes a line to the unit's journal (as the container printing it).
    pub fn log(&self, id: ProjectId, message: &str) {
        let mut j = lock(&self.journal);
        let i = j.len() + 1;
        j.push((
            id,
            ports::LogLine {
                cursor: format!("s={:032x};i={i:x};b={:032x};m=0;t=0;x=0", 0x51, 0),
                time_usec: crate::core::now_ms() * 1000 + i as u64,
                priority: 6,
                message: message.to_string(),
                suppressed: None,
            },
        ));
    }
}

#[async_trait]
impl ports::Units for SimUnits {
    fn unit_name(&self, id: ProjectId) -> String {
        format!("sim-{id}")
    }
    async fn watch(&self) -> Result<UnitEvents, UnitError> {
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.watchers).push(tx);
        Ok(Box::pin(futures_util::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|e| (e, rx)) },
        )))
    }
    async fn list(&self) -> Result<Vec<(ProjectId, UnitInfo)>, UnitError> {
        Ok(lock(&self.units)
            .iter()
            .map(|(id, u)| (*id, u.clone()))
            .collect())
    }
    async fn info(&self, id: ProjectId) -> Result<Option<UnitInfo>, UnitError> {
        Ok(lock(&self.units).get(&id).cloned())
    }
    async fn start(&self, plan: StartPlan) -> Result<ports::StartTimings, StartError> {
        let id = plan.id;
        let t0 = std::time::Instant::now();
        lock(&self.plans).insert(id, plan);
        if lock(&self.units).contains_key(&id) {
            // as systemd: a loaded unit of that name refuses a new transient one
            return Err(StartError::Unit {
                reason: format!("unit {} exists", self.unit_name_of(id)),
                journal: String::new(),
            });
        }
        self.starts.fetch_add(1, Ordering::SeqCst);
        self.set_external(id, Some(ActiveState::Activating));
        let delay = *lock(&self.start_delay);
        tokio::time::sleep(delay).await;
        let fault = lock(&self.faults).get(&id).cloned();
        match fault {
            Some(StartFault::Fail(reason)) => {
                self.set_external(id, Some(ActiveState::Failed));
                Err(StartError::Unit {
                    reason,
                    journal: "Starting sim\nError: simulated failure".into(),
                })
            }
            Some(StartFault::Vanish) => {
                self.remove(id);
                Ok(ports::StartTimings::default())
            }
            None => {
                self.set_external(id, Some(ActiveState::Active));
                self.log(id, "Started sim unit.");
                // the simulated job is taken at once; the delay is podman's
                Ok(ports::StartTimings {
                    unit: Duration::ZERO,
                    podman: t0.elapsed(),
                })
            }
        }
    }
    async fn stop(&self, id: ProjectId, _timeout: Duration) -> Result<(), UnitError> {
        if !lock(&self.units).contains_key(&id) {
            return Ok(());
        }
        self.stops.fetch_add(1, Ordering::SeqCst);
        if let Some(u) = lock(&self.units).get_mut(&id)
            && u.active_state != ActiveState::Failed
        {
            u.active_state = ActiveState::Deactivating;
        }
        let delay = *lock(&self.stop_delay);
        tokio::time::sleep(delay).await;
        // a failed unit stays loaded until reset; anything else is collected
        if self.state(id) != Some(ActiveState::Failed) {
            self.remove(id);
        }
        Ok(())
    }
    async fn kill(&self, _id: ProjectId) -> Result<(), UnitError> {
        Ok(())
    }
    async fn reset_failed(&self, id: ProjectId) {
        if self.state(id) == Some(ActiveState::Failed) {
            self.remove(id);
        }
    }
    async fn set_limits(&self, id: ProjectId, l: &Limits) -> Result<(), UnitError> {
        lock(&self.cpu).insert(id, Some(l.cpu));
        Ok(())
    }
    async fn set_cpu_quota(&self, id: ProjectId, cores: Option<f64>) -> Result<(), UnitError> {
        lock(&self.cpu).insert(id, cores);
        Ok(())
    }
    async fn set_slice_limits(&self, _s: &SliceSettings) -> Result<(), UnitError> {
        Ok(())
    }
    async fn memory_current(&self, id: ProjectId) -> Option<u64> {
        lock(&self.units).contains_key(&id).then_some(1 << 20)
    }
    async fn run_helper(&self, helper: Helper) -> Result<(), String> {
        lock(&self.helpers).push(helper);
        Ok(())
    }
    async fn connect(
        &self,
        id: ProjectId,
        main_pid: u32,
        port: u16,
        timeout: Duration,
    ) -> std::io::Result<tokio::net::TcpStream> {
        let running = lock(&self.units)
            .get(&id)
            .is_some_and(|u| u.active_state == ActiveState::Active && u.main_pid == main_pid);
        let addr = lock(&self.ports).get(&(id, port)).copied();
        match addr.filter(|_| running) {
            Some(a) => tokio::time::timeout(timeout, tokio::net::TcpStream::connect(a))
                .await
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?,
            None => Err(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
        }
    }
    fn forget(&self, id: ProjectId) {
        lock(&self.forgotten).push(id);
    }
    async fn cpu_usage_nsec(&self, id: ProjectId) -> Option<u64> {
        if !lock(&self.units).contains_key(&id) {
            return None;
        }
        Some(lock(&self.cpu_ns).get(&id).copied().unwrap_or(250_000_000))
    }
    async fn freeze(&self, id: ProjectId) -> Result<(), UnitError> {
        if self.freeze_fails.load(Ordering::SeqCst) {
            return Err(crate::backends::systemd::SystemdError::Freezer(
                "simulated: no freezer".into(),
            ));
        }
        if self.state(id) != Some(ActiveState::Active) {
            return Err(crate::backends::systemd::SystemdError::Freezer(
                "simulated: unit not active".into(),
            ));
        }
        lock(&self.freezes).push((id, true));
        lock(&self.frozen).insert(id);
        Ok(())
    }
    async fn thaw(&self, id: ProjectId) -> Result<(), UnitError> {
        lock(&self.freezes).push((id, false));
        lock(&self.frozen).remove(&id);
        Ok(())
    }
    fn is_frozen(&self, id: ProjectId) -> Option<bool> {
        lock(&self.units)
            .contains_key(&id)
            .then(|| lock(&self.frozen).contains(&id))
    }
    async fn journal(
        &self,
        id: ProjectId,
        q: &ports::LogQuery,
    ) -> Result<Vec<ports::LogLine>, String> {
        let j = lock(&self.journal);
        let mine = j.iter().filter(|(p, _)| *p == id).map(|(_, l)| l);
        let after: Vec<&ports::LogLine> = match &q.since {
            None => mine.collect(),
            Some(ports::LogSince::Time(us)) => mine.filter(|l| l.time_usec >= *us).collect(),
            Some(ports::LogSince::Cursor(c)) => {
                let all: Vec<_> = mine.collect();
                match all.iter().position(|l| l.cursor == c.as_str()) {
                    Some(at) => all[at + 1..].to_vec(),
                    None => all,
                }
            }
        };
        let skip = after.len().saturating_sub(q.lines as usize);
        Ok(after[skip..].iter().map(|l| (*l).clone()).collect())
    }
}

impl SimUnits {
    fn unit_name_of(&self, id: ProjectId) -> String {
        ports::Units::unit_name(self, id)
    }
}

#[derive(Debug, Default)]
struct SnapshotEntry {
    id: u64,
    created_generation: u64,
}

/// Simulated project storage.
#[derive(Debug, Default)]
pub struct SimStorage {
    homes: Mutex<HashMap<ProjectId, (u64, u64)>>,
    snapshots: Mutex<HashMap<ProjectId, BTreeMap<SnapshotName, SnapshotEntry>>>,
    limits: Mutex<HashMap<ProjectId, Option<u64>>>,
    /// bytes used by a home, set by a test (default 4096)
    used: Mutex<HashMap<ProjectId, u64>>,
    next_id: AtomicU64,
    generation: AtomicU64,
    quotas: Mutex<bool>,
    /// free space set by a test (`None`: 1 TiB free of 2 TiB)
    space: Mutex<Option<Space>>,
    owners: Mutex<HashMap<ProjectId, u32>>,
    given: Mutex<HashMap<PathBuf, u32>>,
    reserved: Mutex<Forbidden>,
    /// a real directory holding homes and snapshots for file access (`set_files_dir`)
    files_dir: Mutex<Option<PathBuf>>,
    /// moves' live-state snapshots, by project
    move_snaps: Mutex<HashMap<ProjectId, std::collections::BTreeSet<String>>>,
}

/// The owner of a new simulated home: the user of the default pool's first slot, as the real
/// backend's (`Settings::host_user_uid`).
pub const NEW_HOME_OWNER: u32 = (1 << 30) + 1000;

impl SimStorage {
    /// Sets the filesystem's free space (`available` of `total` bytes).
    pub fn set_space(&self, available: u64, total: u64) {
        *lock(&self.space) = Some(Space { available, total });
    }
    /// Sets the bytes a home uses.
    pub fn set_used(&self, id: ProjectId, bytes: u64) {
        lock(&self.used).insert(id, bytes);
    }
    /// The limit on a home (`None`: never set; `Some(None)`: none).
    pub fn limit(&self, id: ProjectId) -> Option<Option<u64>> {
        lock(&self.limits).get(&id).copied()
    }
    /// Makes a home exist (as one left from before).
    pub fn add_home(&self, id: ProjectId) {
        let sub = self.next_id.fetch_add(1, Ordering::Relaxed) + 256;
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        lock(&self.homes).entry(id).or_insert((sub, generation));
    }
    /// The host uid owning the home's root (after conversions).
    pub fn owner(&self, id: ProjectId) -> Option<u32> {
        lock(&self.homes).contains_key(&id).then(|| {
            lock(&self.owners)
                .get(&id)
                .copied()
                .unwrap_or(NEW_HOME_OWNER)
        })
    }
    /// Makes the home's root belong to `uid` (a home of another range).
    pub fn set_owner(&self, id: ProjectId, uid: u32) {
        lock(&self.owners).insert(id, uid);
    }
    /// The owner a path was given (`give_to`).
    pub fn given(&self, path: &std::path::Path) -> Option<u32> {
        lock(&self.given).get(path).copied()
    }
    /// Host ids no range may overlap (as /etc/subuid etc. would say).
    pub fn set_reserved(&self, f: Forbidden) {
        *lock(&self.reserved) = f;
    }
    /// Gives file access real directories: `<dir>/project-<id>` (the home, made with the
    /// simulated one) and `<dir>/.snapshots/project-<id>`.
    pub fn set_files_dir(&self, dir: PathBuf) {
        *lock(&self.files_dir) = Some(dir);
    }
    /// The moves' live-state snapshots a project has.
    pub fn move_snapshots(&self, id: ProjectId) -> Vec<String> {
        lock(&self.move_snaps)
            .get(&id)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }
    /// Removes a home (lost storage).
    pub fn remove_home(&self, id: ProjectId) {
        lock(&self.homes).remove(&id);
    }
    /// A write into the home (bumps its generation).
    pub fn write(&self, id: ProjectId) {
        let g = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(h) = lock(&self.homes).get_mut(&id) {
            h.1 = g;
        }
    }
}

/// The simulated UUID of a project's subvolume (`SimStorage::move_subvolume_uuid`).
pub fn sim_uuid(id: ProjectId, name: &str) -> crate::domain::moves::SubvolUuid {
    use sha2::Digest as _;
    let h = sha2::Sha256::digest(format!("{id}/{name}").as_bytes());
    let x: String = h[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &x[..8],
        &x[8..12],
        &x[12..16],
        &x[16..20],
        &x[20..32]
    )
    .parse()
    .unwrap_or_else(|_| unreachable!("a non-nil hex UUID"))
}

#[async_trait]
impl ports::Storage for SimStorage {
    async fn move_snapshot(&self, id: ProjectId, name: &str) -> Result<(), String> {
        if !self.has_home(id) {
            return Err(format!("no home of {id}"));
        }
        lock(&self.move_snaps)
            .entry(id)
            .or_default()
            .insert(name.to_string());
        Ok(())
    }
    fn has_move_subvolume(&self, id: ProjectId, name: &str) -> bool {
        lock(&self.move_snaps)
            .get(&id)
            .is_some_and(|s| s.contains(name))
            || name
                .parse::<SnapshotName>()
                .is_ok_and(|n| self.has_snapshot(id, &n))
    }
    /// A simulated send: one chunk `send <name> <parent>` (no real stream).
    async fn send_subvolume(
        &self,
        id: ProjectId,
        name: &str,
        parent: Option<&str>,
        sink: &tokio::sync::mpsc::Sender<Vec<u8>>,
    ) -> Result<u64, String> {
        if !self.has_move_subvolume(id, name) {
            return Err(format!("no subvolume {name} of {id}"));
        }
        let b = format!("send {name} {}", parent.unwrap_or("-")).into_bytes();
        let n = b.len() as u64;
        sink.send(b)
            .await
            .map_err(|_| "the connection to the target ended".to_string())?;
        Ok(n)
    }
    /// A simulated UUID: derived from the project and the subvolume's name.
    async fn move_subvolume_uuid(
        &self,
        id: ProjectId,
        name: &str,
    ) -> Result<crate::domain::moves::SubvolUuid, String> {
        if !self.has_move_subvolume(id, name) {
            return Err(format!("no subvolume {name} of {id}"));
        }
        Ok(sim_uuid(id, name))
    }
    async fn drop_move_snapshots(
        &self,
        id: ProjectId,
        mv: crate::domain::moves::MoveId,
        keep: Option<&str>,
    ) {
        if let Some(s) = lock(&self.move_snaps).get_mut(&id) {
            s.retain(|n| !crate::domain::moves::is_live_name(&mv, n) || keep == Some(n.as_str()));
        }
    }
    async fn reserved_ids(&self) -> Forbidden {
        lock(&self.reserved).clone()
    }
    async fn home_owner(&self, id: ProjectId) -> Result<u32, String> {
        self.owner(id).ok_or_else(|| format!("no home of {id}"))
    }
    async fn convert_home_ids(
        &self,
        id: ProjectId,
        from: u32,
        to: u32,
        count: u32,
    ) -> Result<u64, String> {
        let owner = self.owner(id).ok_or_else(|| format!("no home of {id}"))?;
        let new = crate::domain::ids::remap(owner, from, to, count);
        if new == owner {
            return Ok(0);
        }
        self.set_owner(id, new);
        Ok(1)
    }
    async fn give_to(&self, path: &std::path::Path, uid: u32) -> Result<(), String> {
        lock(&self.given).insert(path.to_path_buf(), uid);
        Ok(())
    }
    async fn delete_project(&self, id: ProjectId) -> Result<(), StorageError> {
        lock(&self.move_snaps).remove(&id);
        lock(&self.snapshots).remove(&id);
        lock(&self.homes).remove(&id);
        lock(&self.limits).remove(&id);
        Ok(())
    }
    fn has_home(&self, id: ProjectId) -> bool {
        lock(&self.homes).contains_key(&id)
    }
    fn file_roots(&self, id: ProjectId) -> Result<Option<(PathBuf, PathBuf)>, StorageError> {
        let Some(dir) = lock(&self.files_dir).clone() else {
            return Ok(None);
        };
        if !lock(&self.homes).contains_key(&id) {
            return Ok(None);
        }
        let (home, snaps) = (
            dir.join(format!("project-{id}")),
            dir.join(".snapshots").join(format!("project-{id}")),
        );
        for d in [&home, &snaps] {
            std::fs::create_dir_all(d).map_err(|source| StorageError::Io {
                path: d.clone(),
                source,
            })?;
        }
        Ok(Some((home, snaps)))
    }
    async fn ensure_home(&self, id: ProjectId) -> Result<PathBuf, StorageError> {
        self.add_home(id);
        Ok(PathBuf::from(format!("/sim/project-{id}")))
    }
    async fn ensure_quotas(&self) -> Result<(), StorageError> {
        *lock(&self.quotas) = true;
        Ok(())
    }
    async fn quota_mode(&self) -> Option<QuotaMode> {
        lock(&self.quotas).then_some(QuotaMode::Qgroup)
    }
    async fn set_home_limit(&self, id: ProjectId, bytes: Option<u64>) -> Result<(), StorageError> {
        lock(&self.limits).insert(id, bytes);
        Ok(())
    }
    fn space(&self) -> Result<Space, StorageError> {
        Ok(lock(&self.space).unwrap_or(Space {
            available: 1 << 40,
            total: 2 << 40,
        }))
    }
    async fn home_usage(&self) -> Result<HashMap<ProjectId, Usage>, StorageError> {
        let limits = lock(&self.limits);
        let used = lock(&self.used);
        Ok(lock(&self.homes)
            .keys()
            .map(|id| {
                let u = Usage {
                    quota: limits.get(id).copied().flatten(),
                    used: used.get(id).copied().unwrap_or(4096),
                };
                (*id, u)
            })
            .collect())
    }
    fn ensure_snapshots_dir(&self, id: ProjectId) -> Result<PathBuf, StorageError> {
        Ok(PathBuf::from(format!("/sim/.snapshots/project-{id}")))
    }
    fn clear_snapshots_mountpoint(&self, _id: ProjectId, _now: u64) -> Result<(), StorageError> {
        Ok(())
    }
    async fn recreate_scratch(
        &self,
        id: ProjectId,
        limit: Option<u64>,
    ) -> Result<Option<PathBuf>, StorageError> {
        Ok(limit.map(|_| PathBuf::from(format!("/sim/.scratch/project-{id}"))))
    }
    async fn subvolumes(&self, snapshots_only: bool) -> Result<Vec<Subvolume>, StorageError> {
        let mut v = Vec::new();
        if !snapshots_only {
            for (id, (sub, generation)) in lock(&self.homes).iter() {
                v.push(Subvolume {
                    id: *sub,
                    role: Role::Home(*id),
                    generation: *generation,
                    created_generation: 0,
                    otime: None,
                });
            }
        }
        for (id, snaps) in lock(&self.snapshots).iter() {
            for (name, e) in snaps {
                v.push(Subvolume {
                    id: e.id,
                    role: Role::Snapshot(*id, name.clone()),
                    generation: e.created_generation,
                    created_generation: e.created_generation,
                    otime: Some(0),
                });
            }
        }
        Ok(v)
    }
    async fn sizes(&self) -> Result<HashMap<u64, (u64, u64)>, StorageError> {
        Ok(HashMap::new())
    }
    async fn sync(&self) -> Result<(), StorageError> {
        Ok(())
    }
    fn has_snapshot(&self, id: ProjectId, name: &SnapshotName) -> bool {
        lock(&self.snapshots)
            .get(&id)
            .is_some_and(|s| s.contains_key(name))
    }
    async fn create_snapshot(
        &self,
        id: ProjectId,
        name: &SnapshotName,
    ) -> Result<(), StorageError> {
        let created_generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let sub = self.next_id.fetch_add(1, Ordering::Relaxed) + 256;
        lock(&self.snapshots).entry(id).or_default().insert(
            name.clone(),
            SnapshotEntry {
                id: sub,
                created_generation,
            },
        );
        Ok(())
    }
    async fn delete_snapshot(
        &self,
        id: ProjectId,
        name: &SnapshotName,
    ) -> Result<(), StorageError> {
        if let Some(s) = lock(&self.snapshots).get_mut(&id) {
            s.remove(name);
        }
        Ok(())
    }
    async fn restore(
        &self,
        id: ProjectId,
        _name: &SnapshotName,
        _limit: Option<u64>,
        _quotas: bool,
    ) -> Result<(), StorageError> {
        self.write(id);
        Ok(())
    }
}

/// The simulated store.
#[derive(Debug, Default)]
pub struct SimStore {
    rows: Mutex<HashMap<ProjectId, ProjectRow>>,
    ranges: Mutex<HashMap<ProjectId, u32>>,
    fail_upserts: Mutex<bool>,
    ssh_keys: Mutex<HashMap<ProjectId, Vec<String>>>,
    /// the master outbox: (last sequence number, queue); kept only once enabled (limit > 0)
    outbox: Mutex<(u64, Vec<Report>)>,
    outbox_limit: AtomicUsize,
    outbox_notify: tokio::sync::Notify,
}

impl SimStore {
    /// Makes every upsert fail (a crash between "unit started" and "store written").
    pub fn set_fail_upserts(&self, fail: bool) {
        *lock(&self.fail_upserts) = fail;
    }
    /// A row as stored.
    pub fn row(&self, id: ProjectId) -> Option<ProjectRow> {
        lock(&self.rows).get(&id).cloned()
    }
    /// Puts a row in (a store left from before).
    pub fn put(&self, id: ProjectId, state: ProjectState, last_touched: u64) {
        lock(&self.rows).insert(
            id,
            ProjectRow {
                id,
                state,
                config: RunConfig::default(),
                created: last_touched,
                last_touched,
            },
        );
    }
    /// The queued reports, in order.
    pub fn outbox(&self) -> Vec<Report> {
        lock(&self.outbox).1.clone()
    }
    fn append(&self, id: ProjectId, event: ReportKind, state: ProjectState, now_ms: u64) {
        let limit = self.outbox_limit.load(Ordering::Relaxed);
        if limit == 0 {
            return;
        }
        let mut o = lock(&self.outbox);
        o.0 += 1;
        let seq = o.0;
        o.1.push(Report {
            seq,
            project_id: id,
            event,
            state,
            at_ms: now_ms,
        });
        crate::domain::master::bound(&mut o.1, limit);
        drop(o);
        self.outbox_notify.notify_one();
    }
    /// How many rows there are.
    pub fn len(&self) -> usize {
        lock(&self.rows).len()
    }
    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[async_trait]
impl ports::Store for SimStore {
    async fn host_id(&self) -> Result<String, StoreError> {
        Ok("00000000-0000-4000-8000-00000000510a".into())
    }
    async fn projects(&self) -> Result<Vec<ProjectRow>, StoreError> {
        Ok(lock(&self.rows).values().cloned().collect())
    }
    async fn project(&self, id: ProjectId) -> Result<Option<ProjectRow>, StoreError> {
        Ok(self.row(id))
    }
    async fn upsert(
        &self,
        id: ProjectId,
        state: ProjectState,
        config: Option<RunConfig>,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        if *lock(&self.fail_upserts) {
            return Err(StoreError::Gone);
        }
        let mut rows = lock(&self.rows);
        // one lock for the row and its report, as the real store's transaction
        if let Some(kind) = ReportKind::of_change(rows.get(&id).map(|r| r.state), state) {
            self.append(id, kind, state, now_ms);
        }
        let r = rows.entry(id).or_insert_with(|| ProjectRow {
            id,
            state,
            config: RunConfig::default(),
            created: now_ms,
            last_touched: now_ms,
        });
        r.state = state;
        if let Some(c) = config {
            r.config = c;
        }
        r.last_touched = r.last_touched.max(now_ms);
        Ok(())
    }
    fn touch(&self, id: ProjectId, now_ms: u64) {
        if let Some(r) = lock(&self.rows).get_mut(&id) {
            r.last_touched = r.last_touched.max(now_ms);
        }
    }
    async fn id_range(
        &self,
        id: ProjectId,
        alloc: ports::IdAlloc,
    ) -> Result<Option<u32>, StoreError> {
        // one lock for the read and the insert, as the real store's transaction
        let mut ranges = lock(&self.ranges);
        if let Some(b) = ranges.get(&id) {
            return Ok(Some(*b));
        }
        let taken: Vec<u32> = ranges.values().copied().collect();
        let Some(base) = alloc(&taken) else {
            return Ok(None);
        };
        ranges.insert(id, base);
        Ok(Some(base))
    }
    async fn ssh_keys(&self, id: ProjectId) -> Result<Vec<String>, StoreError> {
        Ok(lock(&self.ssh_keys).get(&id).cloned().unwrap_or_default())
    }
    async fn set_ssh_keys(&self, id: ProjectId, keys: Vec<String>) -> Result<(), StoreError> {
        if *lock(&self.fail_upserts) {
            return Err(StoreError::Gone);
        }
        lock(&self.ssh_keys).insert(id, keys);
        Ok(())
    }
    async fn report(
        &self,
        id: ProjectId,
        kind: ReportKind,
        state: ProjectState,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        self.append(id, kind, state, now_ms);
        Ok(())
    }
    async fn remove(&self, id: ProjectId, now_ms: u64) -> Result<bool, StoreError> {
        let mut rows = lock(&self.rows);
        lock(&self.ranges).remove(&id);
        let known = rows.remove(&id).is_some();
        if known {
            self.append(id, ReportKind::Removed, ProjectState::Opened, now_ms);
        }
        Ok(known)
    }
    fn enable_outbox(&self, limit: usize) {
        self.outbox_limit.store(limit.max(1), Ordering::Relaxed);
    }
    async fn outbox_batch(&self, max: usize) -> Result<Vec<Report>, StoreError> {
        Ok(lock(&self.outbox).1.iter().take(max).cloned().collect())
    }
    async fn outbox_ack(&self, seq: u64) -> Result<(), StoreError> {
        lock(&self.outbox).1.retain(|r| r.seq > seq);
        Ok(())
    }
    async fn outbox_depth(&self) -> Result<u64, StoreError> {
        Ok(lock(&self.outbox).1.len() as u64)
    }
    async fn outbox_wait(&self) {
        self.outbox_notify.notified().await
    }
}
