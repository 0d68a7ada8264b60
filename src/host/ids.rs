//! Each project's own host id range (see `idmap`): allocated in the store on its first start,
//! and its home converted before a start when it belongs to another range.
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::{Error, Host};
use crate::idmap;
use crate::project::ProjectId;

impl Host {
    /// The base of the project's id range, allocated the first time.
    pub(super) async fn id_range(&self, id: ProjectId) -> Result<u32, Error> {
        let p = &self.settings.projects;
        let (start, count) = (p.uid_base, p.uid_count);
        // read before the store's transaction: the host's files, not the store's lock, are slow
        let forbidden = tokio::task::spawn_blocking(idmap::Forbidden::from_host)
            .await
            .unwrap_or_default();
        let base = self
            .store
            .id_range(id, move |taken| {
                idmap::allocate(taken, &forbidden, start, count)
            })
            .await?;
        base.ok_or_else(|| Error::StartFailed {
            id,
            reason: "no free host id range left (projects.uid_base, projects.uid_count)".into(),
            journal: String::new(),
        })
    }

    /// Converts a home (and the scratch) to the project's range when its root belongs to
    /// another one: a home of the shared range of older versions, one restored from a snapshot
    /// taken before the upgrade, one moved from another host. The project is stopped (its lock is
    /// held and its unit is not running), so nothing inside changes during the walk.
    pub(super) async fn convert_home(
        &self,
        id: ProjectId,
        home: &Path,
        base: u32,
    ) -> Result<(), Error> {
        let p = &self.settings.projects;
        let (user, count) = (p.user_uid, p.uid_count);
        let want = base + user;
        let failed = |reason: String| Error::StartFailed {
            id,
            reason,
            journal: String::new(),
        };
        let owner = std::fs::symlink_metadata(home)
            .map_err(|e| failed(format!("{}: {e}", home.display())))?
            .uid();
        if owner == want {
            return Ok(());
        }
        let Some(from) = owner.checked_sub(user) else {
            return Err(failed(format!(
                "its home belongs to uid {owner}, not to a project user: refusing to convert it"
            )));
        };
        tracing::info!(project_id = %id, from, to = base, "converting the home to the project's own id range");
        let t0 = std::time::Instant::now();
        let h = home.to_path_buf();
        let changed =
            tokio::task::spawn_blocking(move || idmap::convert_tree(&h, from, base, count))
                .await
                .map_err(|e| failed(format!("id conversion task: {e}")))?
                .map_err(|e| failed(format!("converting the home's owners: {e}")))?;
        tracing::info!(project_id = %id, from, to = base, changed, ms = t0.elapsed().as_millis() as u64, "home converted");
        Ok(())
    }
}

/// Gives a fresh directory (the scratch) to the project's user.
pub(super) fn give_to(path: &Path, uid: u32) -> std::io::Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(uid))
}
