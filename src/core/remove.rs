//! Deleting a project from this host (`DELETE /projects/:id`, for the master placing projects
//! elsewhere): stop it, delete its home, snapshots and scratch, forget it; the store queues the
//! `removed` report to the master in the same transaction as it forgets the row.
use std::sync::Arc;

use super::{Error, Host, now_ms};
use crate::domain::project::{ProjectId, ProjectState};
use crate::ports::Helper;

/// What a delete did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Removed {
    /// The project.
    pub id: ProjectId,
    /// Whether there was anything of it (false: an unknown id, nothing done).
    pub removed: bool,
}

impl Host {
    /// Whether a move to another host holds the project's snapshots (a delete must never race
    /// a send of snapshots).
    fn snapshots_locked(&self, id: ProjectId) -> bool {
        self.moving(id)
    }

    /// Stops the project, deletes its storage and forgets it. Idempotent: an unknown id answers
    /// `removed: false`. Runs to completion on its own task, like [`Host::start`].
    pub async fn remove(self: &Arc<Self>, id: ProjectId) -> Result<Removed, Error> {
        let host = self.clone();
        match self
            .tasks
            .spawn_work(async move { host.remove_now(id).await })
            .await
        {
            Ok(r) => r,
            Err(e) => Err(Error::StopFailed {
                id,
                reason: format!("delete task failed: {e}"),
            }),
        }
    }

    async fn remove_now(self: &Arc<Self>, id: ProjectId) -> Result<Removed, Error> {
        if self.snapshots_locked(id) {
            return Err(Error::SnapshotsLocked(id));
        }
        // a start may slip in between the stop and the lock: stop again, a few times at most
        for _ in 0..3 {
            self.stop_now(id, false).await?;
            let lock = self.lock(id);
            let _guard = lock.lock().await;
            if self.units.info(id).await?.is_some_and(|i| {
                ProjectState::from_active_state(i.active_state) != ProjectState::Opened
            }) {
                continue;
            }
            if self.snapshots_locked(id) {
                return Err(Error::SnapshotsLocked(id));
            }
            // the unit's stop removes the container; one left behind by a conmon that died
            // without its cleanup (the next start would `--replace` it) must not outlive the
            // project: `podman rm --ignore` by name
            if let Err(e) = self.units.run_helper(Helper::RemoveContainer(id)).await {
                tracing::warn!(project_id = %id, error = %e, "delete: removing the container");
            }
            let had_storage = self.storage.has_home(id);
            self.storage.delete_project(id).await?;
            let known = self.store.remove(id, now_ms()).await?;
            if self.entries().remove(&id).is_some() {
                let _ = self.changes.send(super::HostEvent::Removed(id));
            }
            let removed = known || had_storage;
            if removed {
                tracing::info!(project_id = %id, "project deleted from this host");
            }
            return Ok(Removed { id, removed });
        }
        Err(Error::StopFailed {
            id,
            reason: "it was started again while being deleted".into(),
        })
    }
}
