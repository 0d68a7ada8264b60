//! Writes refused below the storage reserve (`storage.reserve`). Every disk refresh (5 s) checks
//! the free space of the project storage; below the reserve it holds the home of every running
//! project at its usage (its quota lowered to what it uses, never raised), so further writes
//! fail with EDQUOT inside the project while it can still read and delete. Back above the
//! reserve, each held home gets its configured quota again (its stored config's, else
//! `storage.disk_quota`, as a start would put on).
//!
//! Which homes are held lives in memory only. After a restart, a previous daemon may have left
//! homes held: until one pass above the reserve has compared every home's limit with its
//! configured one (and put that on where they differ), the restore pass covers all homes, not
//! just the ones this daemon held.
use std::collections::{HashMap, HashSet};

use super::Host;
use crate::domain::project::ProjectId;
use crate::domain::reserve::{self, Shortfall};
use crate::ports::Usage;

/// What the refresh knows of the reserve.
#[derive(Debug, Default)]
pub(super) struct ReserveState {
    /// below the reserve at the last refresh
    pub(super) below: Option<Shortfall>,
    /// homes this daemon held at their usage and has not given their quota back yet
    held: HashSet<ProjectId>,
    /// every home's limit was seen to be its configured one (false at startup)
    checked: bool,
}

impl Host {
    fn reserve_state(&self) -> std::sync::MutexGuard<'_, ReserveState> {
        self.reserve.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The project storage is below its reserve (as of the last refresh).
    pub(super) fn storage_full(&self) -> Option<Shortfall> {
        self.reserve_state().below
    }

    /// The disk refresh loop's tick: the reserve check, holding or giving back the homes'
    /// quotas, then quota and usage of every home into memory (one read of the qgroups).
    pub(super) async fn refresh_storage(&self) {
        // unreadable free space: keep what was known
        let below = match self.storage.space() {
            Ok(space) => reserve::check(space, self.settings.storage.reserve)
                .err()
                .map(|(free, reserve)| Shortfall { free, reserve }),
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the project storage's free space");
                self.reserve_state().below
            }
        };
        let was = std::mem::replace(&mut self.reserve_state().below, below);
        if self.storage.quota_mode().await.is_none() {
            // nothing to hold writes with: starts are still refused (`check_reserve`)
            match (below, was) {
                (Some(s), None) => tracing::warn!(
                    free = s.free,
                    reserve = s.reserve,
                    "project storage below its reserve (storage.reserve): starts refused; quotas are off, so running projects can still write"
                ),
                (None, Some(_)) => {
                    tracing::info!("project storage above its reserve again: starts allowed")
                }
                _ => {}
            }
            return;
        }
        let mut usage = match self.storage.home_usage().await {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read disk usage");
                return;
            }
        };
        match below {
            Some(s) => {
                let held = self.hold_homes(&mut usage).await;
                if was.is_none() {
                    tracing::warn!(
                        free = s.free,
                        reserve = s.reserve,
                        held,
                        "project storage below its reserve (storage.reserve): starts, quota raises and writes of projects refused until space is freed"
                    );
                }
            }
            None => {
                let (restored, pending) = self.give_back_homes(&mut usage).await;
                if was.is_some() {
                    tracing::info!(
                        restored,
                        pending,
                        "project storage above its reserve again: starts and writes of projects allowed, quotas restored"
                    );
                }
            }
        }
        let held = self.reserve_state().held.clone();
        self.note_quota_hits(&usage, &held).await;
        self.record_usage(usage);
    }

    /// Holds the home of every running project at its usage; how many homes it changed.
    async fn hold_homes(&self, usage: &mut HashMap<ProjectId, Usage>) -> usize {
        let running: Vec<ProjectId> = self
            .read_entries()
            .iter()
            .filter(|(_, e)| e.unit.is_some())
            .map(|(id, _)| *id)
            .collect();
        let mut n = 0;
        for id in running {
            let Some(u) = usage.get_mut(&id) else {
                continue;
            };
            let Some(limit) = reserve::clamp_to(u.quota, u.used) else {
                continue;
            };
            // a start or quota change holding the lock: the next tick sees its result
            let lock = self.lock(id);
            let Ok(_guard) = lock.try_lock() else {
                continue;
            };
            match self.storage.set_home_limit(id, Some(limit)).await {
                Ok(()) => {
                    tracing::debug!(project_id = %id, limit, "home held at its usage");
                    u.quota = Some(limit);
                    self.reserve_state().held.insert(id);
                    n += 1;
                }
                Err(e) => {
                    tracing::warn!(project_id = %id, error = %e, "cannot hold the home at its usage");
                }
            }
        }
        n
    }

    /// Puts the configured quota back on the held homes (on every home whose limit differs from
    /// its configured one, until that was done once since startup). (restored, still pending).
    async fn give_back_homes(&self, usage: &mut HashMap<ProjectId, Usage>) -> (usize, usize) {
        let targets: Vec<ProjectId> = {
            let mut st = self.reserve_state();
            st.held.retain(|id| usage.contains_key(id));
            if st.checked {
                st.held.iter().copied().collect()
            } else {
                usage.keys().copied().collect()
            }
        };
        if targets.is_empty() {
            self.reserve_state().checked = true;
            return (0, 0);
        }
        let configs: HashMap<ProjectId, _> = match self.store.projects().await {
            Ok(rows) => rows.into_iter().map(|r| (r.id, r.config)).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the stored quotas to restore them");
                return (0, targets.len());
            }
        };
        let (mut restored, mut pending) = (0, 0);
        for id in targets {
            let Some(u) = usage.get_mut(&id) else {
                continue;
            };
            let want = self.disk_limit(&configs.get(&id).cloned().unwrap_or_default());
            if u.quota == want {
                self.reserve_state().held.remove(&id);
                continue;
            }
            // a start (which puts the configured quota on itself) or a quota change is under
            // way: try again next tick
            let lock = self.lock(id);
            let Ok(_guard) = lock.try_lock() else {
                pending += 1;
                continue;
            };
            match self.storage.set_home_limit(id, want).await {
                Ok(()) => {
                    tracing::debug!(project_id = %id, quota = want, "home quota restored");
                    u.quota = want;
                    self.reserve_state().held.remove(&id);
                    restored += 1;
                }
                Err(e) => {
                    tracing::warn!(project_id = %id, error = %e, "cannot restore the home's quota");
                    pending += 1;
                }
            }
        }
        if pending == 0 {
            self.reserve_state().checked = true;
        }
        (restored, pending)
    }
}
