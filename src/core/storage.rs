//! The storage side of the core: disk quotas, snapshots, atomic restore, the rolling-snapshot
//! sweep, and each start's scratch and /tmp. Knows nothing of HTTP or D-Bus, nor of btrfs.
use std::collections::HashMap;
use std::path::PathBuf;

use serde::Serialize;

use super::{Error, Host, HostEvent, now_ms};
use crate::domain::project::{
    DiskStatus, InvalidConfig, MAX_BYTES, MIN_DISK, ProjectId, ProjectState, RunConfig,
};
use crate::domain::snapshots::{self, SnapshotName};
use crate::ports::Role;
use crate::ports::StorageError;

/// One snapshot of a project.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotInfo {
    /// Its name.
    pub name: SnapshotName,
    /// When it was taken (ms since the epoch).
    pub created: Option<u64>,
    /// `auto` (rolling, pruned by the sweep) or `manual` (kept until deleted).
    pub kind: &'static str,
    /// Bytes only this snapshot holds (what deleting it frees), when quotas are on.
    pub exclusive: Option<u64>,
    /// Bytes it references, when quotas are on.
    pub referenced: Option<u64>,
}

/// What a sweep did to one project.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SweepOutcome {
    /// The project.
    pub project_id: ProjectId,
    /// The rolling snapshot taken, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created: Option<SnapshotName>,
    /// Rolling snapshots deleted (before taking the new one).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub deleted: Vec<SnapshotName>,
    /// Why the project was left alone: `untouched`, `unchanged`, `no_home`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<&'static str>,
    /// What failed, if anything did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl SweepOutcome {
    fn new(project_id: ProjectId) -> SweepOutcome {
        SweepOutcome {
            project_id,
            created: None,
            deleted: Vec::new(),
            skipped: None,
            error: None,
        }
    }
}

impl Host {
    fn require_home(&self, id: ProjectId) -> Result<(), Error> {
        if self.storage.has_home(id) {
            Ok(())
        } else {
            Err(Error::NoSuchProject(id))
        }
    }

    /// Refuses (`StorageFull`) when the project storage has less free space than its reserve.
    pub(super) fn check_reserve(&self, id: ProjectId, what: &'static str) -> Result<(), Error> {
        // unreadable storage is reported by whatever uses it next
        let Ok(space) = self.storage.space() else {
            return Ok(());
        };
        if let Err((free, reserve)) =
            crate::domain::reserve::check(space, self.settings.storage.reserve)
        {
            tracing::warn!(
                project_id = %id,
                free,
                reserve,
                "{what} refused: the project storage is below its reserve (storage.reserve)"
            );
            return Err(Error::StorageFull { free, reserve });
        }
        Ok(())
    }

    /// The disk quota in force for a config (its own, else the host default).
    pub(super) fn disk_limit(&self, config: &RunConfig) -> Option<u64> {
        config.disk.or(self.settings.storage.disk_quota)
    }

    /// Before a cold start: the home's quota, the snapshot directory, a fresh scratch. Returns
    /// the snapshots directory, the scratch and the size of /tmp for the start plan.
    pub(super) async fn prepare_storage(
        &self,
        id: ProjectId,
        config: &RunConfig,
        id_base: u32,
    ) -> Result<(PathBuf, Option<PathBuf>, Option<u64>), Error> {
        let s = &self.settings.storage;
        let disk = self.disk_limit(config);
        let scratch = config.scratch.or(s.scratch);
        if disk.is_some() || scratch.is_some() {
            self.storage.ensure_quotas().await?;
        }
        if self.storage.quota_mode().await.is_some() {
            self.storage.set_home_limit(id, disk).await?;
            self.set_disk_quota_in_memory(id, disk);
        }
        let snapshots = self.storage.ensure_snapshots_dir(id)?;
        self.storage.clear_snapshots_mountpoint(id, now_ms())?;
        let scratch = self.storage.recreate_scratch(id, scratch).await?;
        if let Some(path) = &scratch {
            // a fresh scratch is the project user's, in the project's own id range
            let uid = id_base + self.settings.projects.user_uid;
            self.storage
                .give_to(path, uid)
                .await
                .map_err(|reason| Error::StartFailed {
                    id,
                    reason,
                    journal: String::new(),
                })?;
        }
        Ok((snapshots, scratch, config.tmp.or(s.tmp)))
    }

    fn set_disk_quota_in_memory(&self, id: ProjectId, quota: Option<u64>) {
        let mut map = self.entries();
        let e = map.entry(id).or_default();
        let used = e.disk.and_then(|d| d.used);
        e.disk = Some(DiskStatus { quota, used });
    }

    /// Reads quota and usage of every home from btrfs (one command) into memory, where status
    /// answers from (after a change; the disk refresh loop does it in `refresh_storage`). Does
    /// nothing while quotas are off.
    pub(super) async fn refresh_disk(&self) {
        if self.storage.quota_mode().await.is_none() {
            return;
        }
        match self.storage.home_usage().await {
            Ok(usage) => self.record_usage(usage),
            Err(e) => tracing::warn!(error = %e, "cannot read disk usage"),
        }
    }

    /// Puts quota and usage of the homes into memory, where status answers from.
    /// Publishes [`HostEvent::QuotaHit`] when a home reaches its quota (once per crossing).
    pub(super) fn record_usage(&self, usage: HashMap<ProjectId, crate::ports::Usage>) {
        let mut hits = Vec::new();
        {
            let mut map = self.entries();
            for (id, u) in usage {
                if let Some(e) = map.get_mut(&id) {
                    let full = |d: Option<DiskStatus>| {
                        d.and_then(|d| Some(d.used? >= d.quota?)).unwrap_or(false)
                    };
                    let before = full(e.disk);
                    e.disk = Some(DiskStatus {
                        quota: u.quota,
                        used: Some(u.used),
                    });
                    if let (false, true, Some(quota)) = (before, full(e.disk), u.quota) {
                        hits.push(HostEvent::QuotaHit {
                            id,
                            used: u.used,
                            quota,
                        });
                    }
                }
            }
        }
        for h in hits {
            self.emit(h);
        }
    }

    /// Changes a project's disk quota (`None`: no limit) at once, running or not, and keeps it
    /// for its next starts.
    pub async fn set_disk_quota(&self, id: ProjectId, bytes: Option<u64>) -> Result<(), Error> {
        if let Some(b) = bytes
            && !(MIN_DISK..=MAX_BYTES).contains(&b)
        {
            return Err(Error::InvalidConfig(InvalidConfig {
                field: "disk",
                reason: format!("{b} bytes is not in {MIN_DISK}..={MAX_BYTES}"),
            }));
        }
        let max = self.settings.limits.max.disk;
        if let Some(b) = bytes
            && b > max
        {
            return Err(Error::InvalidConfig(InvalidConfig {
                field: "disk",
                reason: format!("{b} bytes is above this host's maximum of {max}"),
            }));
        }
        let lock = self.lock(id);
        let _guard = lock.lock().await;
        self.require_home(id)?;
        let current = self
            .read_entries()
            .get(&id)
            .and_then(|e| e.disk)
            .and_then(|d| d.quota);
        let raise = match (bytes, current) {
            (Some(b), Some(c)) => b > c,
            (None, Some(_)) => true,
            (_, None) => false,
        };
        if raise {
            self.check_reserve(id, "quota raise")?;
        }
        if bytes.is_some() {
            self.storage.ensure_quotas().await?;
        }
        if self.storage.quota_mode().await.is_some() {
            self.storage.set_home_limit(id, bytes).await?;
        }
        let entry = self.read_entries().get(&id).cloned();
        if let Some(e) = entry.filter(|e| e.known) {
            let mut config = self.stored_config(id).await?;
            config.disk = bytes;
            self.store
                .upsert(id, e.state(), Some(config), e.last_touched.max(1))
                .await?;
        }
        tracing::info!(project_id = %id, quota = bytes, "disk quota set");
        self.set_disk_quota_in_memory(id, bytes);
        self.refresh_disk().await;
        Ok(())
    }

    /// A project's snapshots, oldest first; touches the project (an API client's interest).
    pub async fn snapshots(&self, id: ProjectId) -> Result<Vec<SnapshotInfo>, Error> {
        self.require_home(id)?;
        self.touch(id);
        self.snapshot_list(id).await
    }

    /// A project's snapshots, oldest first, without touching it (a local reader's look).
    pub async fn snapshot_list(&self, id: ProjectId) -> Result<Vec<SnapshotInfo>, Error> {
        self.require_home(id)?;
        let subs = self.storage.subvolumes(true).await?;
        let sizes: HashMap<u64, (u64, u64)> = if self.storage.quota_mode().await.is_some() {
            self.storage.sizes().await?
        } else {
            HashMap::new()
        };
        let mut v: Vec<SnapshotInfo> = subs
            .into_iter()
            .filter_map(|s| match s.role {
                Role::Snapshot(pid, name) if pid == id => {
                    let size = sizes.get(&s.id);
                    Some(SnapshotInfo {
                        created: name.auto_time().or(s.otime),
                        kind: if name.is_auto() { "auto" } else { "manual" },
                        exclusive: size.map(|s| s.0),
                        referenced: size.map(|s| s.1),
                        name,
                    })
                }
                _ => None,
            })
            .collect();
        v.sort_by(|a, b| a.created.cmp(&b.created).then(a.name.cmp(&b.name)));
        Ok(v)
    }

    /// Takes a read-only snapshot of the home, named `name` or `manual-<UTC time>`. Names
    /// starting with `auto-` belong to the rolling snapshots and are refused.
    pub async fn create_snapshot(
        &self,
        id: ProjectId,
        name: Option<SnapshotName>,
    ) -> Result<SnapshotInfo, Error> {
        let now = now_ms();
        if let Some(n) = &name
            && n.is_auto()
        {
            return Err(Error::ReservedSnapshotName(n.clone()));
        }
        let name = name.unwrap_or_else(|| SnapshotName::manual_at(now));
        let lock = self.lock(id);
        let _guard = lock.lock().await;
        self.require_home(id)?;
        self.touch(id);
        if self.storage.has_snapshot(id, &name) {
            return Err(Error::SnapshotExists { id, name });
        }
        let t0 = std::time::Instant::now();
        let made = self.storage.create_snapshot(id, &name).await;
        self.metrics.snapshot(made.is_ok(), t0.elapsed());
        made?;
        tracing::info!(project_id = %id, snapshot = %name, "snapshot taken");
        self.emit(HostEvent::SnapshotCreated(id, name.clone()));
        Ok(SnapshotInfo {
            name,
            created: Some(now / 1000 * 1000),
            kind: "manual",
            exclusive: None,
            referenced: None,
        })
    }

    /// Deletes a snapshot.
    pub async fn delete_snapshot(&self, id: ProjectId, name: &SnapshotName) -> Result<(), Error> {
        let lock = self.lock(id);
        let _guard = lock.lock().await;
        if !self.storage.has_snapshot(id, name) {
            return Err(Error::NoSuchSnapshot {
                id,
                name: name.clone(),
            });
        }
        self.touch(id);
        self.storage.delete_snapshot(id, name).await?;
        tracing::info!(project_id = %id, snapshot = %name, "snapshot deleted");
        self.emit(HostEvent::SnapshotDeleted(id, name.clone()));
        Ok(())
    }

    /// Replaces the project's home with the snapshot. The project must be stopped. Atomic: the
    /// home is swapped in one rename, so a crash leaves the old or the new home, never a mix. The
    /// snapshot itself stays.
    pub async fn restore_snapshot(&self, id: ProjectId, name: &SnapshotName) -> Result<(), Error> {
        let lock = self.lock(id);
        let _guard = lock.lock().await;
        self.require_home(id)?;
        if !self.storage.has_snapshot(id, name) {
            return Err(Error::NoSuchSnapshot {
                id,
                name: name.clone(),
            });
        }
        if let Some(info) = self.units.info(id).await?
            && ProjectState::from_active_state(info.active_state) != ProjectState::Opened
        {
            return Err(Error::ProjectRunning(id));
        }
        self.touch(id);
        let config = self.stored_config(id).await?;
        let quotas = self.storage.quota_mode().await.is_some();
        self.storage
            .restore(id, name, self.disk_limit(&config), quotas)
            .await?;
        self.refresh_disk().await;
        Ok(())
    }

    /// The rolling-snapshot sweep (the timer's oneshot asks for it every 15 minutes). For each
    /// project (all known ones, or `only`) that is running or was touched within
    /// `snapshots.skip_untouched`: deletes the rolling snapshots the policy no longer keeps, then
    /// takes a new one if the home changed since the newest (btrfs generation of the home vs.
    /// creation generation of the snapshot). `now` (ms) is the sweep's clock: the real one unless
    /// a caller (a test) passes another.
    pub async fn sweep_snapshots(
        &self,
        now: Option<u64>,
        only: Option<Vec<ProjectId>>,
    ) -> Result<Vec<SweepOutcome>, Error> {
        let cfg = &self.settings.snapshots;
        if !cfg.enabled {
            return Ok(Vec::new());
        }
        let now = now.unwrap_or_else(now_ms);
        let ids: Vec<ProjectId> = match only {
            Some(v) => v,
            None => self.list().iter().map(|&(id, _)| id).collect(),
        };
        // commit first, so the generations below include every write made so far
        self.storage.sync().await?;
        let mut homes: HashMap<ProjectId, u64> = HashMap::new();
        let mut autos: HashMap<ProjectId, Vec<(SnapshotName, u64)>> = HashMap::new();
        for s in self.storage.subvolumes(false).await? {
            match s.role {
                Role::Home(id) => {
                    homes.insert(id, s.generation);
                }
                Role::Snapshot(id, name) if name.is_auto() => {
                    autos
                        .entry(id)
                        .or_default()
                        .push((name, s.created_generation));
                }
                _ => {}
            }
        }
        let mut out = Vec::new();
        for id in ids {
            let mut o = SweepOutcome::new(id);
            let Some(&home_gen) = homes.get(&id) else {
                o.skipped = Some("no_home");
                out.push(o);
                continue;
            };
            let (running, touched) = self.read_entries().get(&id).map_or((false, 0), |e| {
                (e.state() != ProjectState::Opened, e.last_touched)
            });
            if !running && now.saturating_sub(touched) > cfg.skip_untouched.as_millis() as u64 {
                o.skipped = Some("untouched");
                out.push(o);
                continue;
            }
            let mine = autos.remove(&id).unwrap_or_default();
            let newest = mine
                .iter()
                .filter_map(|(n, g)| n.auto_time().map(|t| (t, *g)))
                .max();
            let changed = newest.is_none_or(|(_, gen_at_creation)| home_gen > gen_at_creation);
            let names: Vec<SnapshotName> = mine.into_iter().map(|(n, _)| n).collect();
            let plan = snapshots::plan_sweep(&names, changed, now, &cfg.retention);
            if let Err(e) = self.apply_sweep(id, &plan, &mut o).await {
                tracing::warn!(project_id = %id, error = %e, "snapshot sweep failed");
                o.error = Some(e.to_string());
            }
            if o.created.is_none() && o.error.is_none() && !changed {
                o.skipped = Some("unchanged");
            }
            out.push(o);
        }
        let created = out.iter().filter(|o| o.created.is_some()).count();
        let deleted: usize = out.iter().map(|o| o.deleted.len()).sum();
        tracing::info!(
            projects = out.len(),
            created,
            deleted,
            now,
            "snapshot sweep done"
        );
        Ok(out)
    }

    async fn apply_sweep(
        &self,
        id: ProjectId,
        plan: &snapshots::SweepPlan,
        o: &mut SweepOutcome,
    ) -> Result<(), StorageError> {
        let lock = self.lock(id);
        let _guard = lock.lock().await;
        // expired first: never run out of space because of snapshots about to go
        for name in &plan.delete {
            if self.storage.has_snapshot(id, name) {
                self.storage.delete_snapshot(id, name).await?;
                self.emit(HostEvent::SnapshotDeleted(id, name.clone()));
            }
            o.deleted.push(name.clone());
        }
        if let Some(name) = &plan.create
            && self.storage.has_home(id)
            && !self.storage.has_snapshot(id, name)
        {
            let t0 = std::time::Instant::now();
            let made = self.storage.create_snapshot(id, name).await;
            self.metrics.snapshot(made.is_ok(), t0.elapsed());
            made?;
            self.emit(HostEvent::SnapshotCreated(id, name.clone()));
            o.created = Some(name.clone());
        }
        Ok(())
    }
}
