//! Each project's own host id range (`domain::ids`): allocated in the store on its first start,
//! and its home converted before a start when it belongs to another range.
use super::{Error, Host};
use crate::domain::ids;
use crate::domain::project::ProjectId;

impl Host {
    /// The base of the project's id range, allocated the first time.
    pub(super) async fn id_range(&self, id: ProjectId) -> Result<u32, Error> {
        let p = &self.settings.projects;
        let (start, count) = (p.uid_base, p.uid_count);
        // read before the store's transaction: the host's files, not the store's lock, are slow
        let forbidden = self.storage.reserved_ids().await;
        let base = self
            .store
            .id_range(
                id,
                Box::new(move |taken| ids::allocate(taken, &forbidden, start, count)),
            )
            .await?;
        base.ok_or_else(|| Error::StartFailed {
            id,
            reason: "no free host id range left (projects.uid_base, projects.uid_count)".into(),
            journal: String::new(),
        })
    }

    /// Converts a home to the project's range when its root belongs to another one: a home of
    /// the shared range of older versions, one restored from a snapshot taken before the
    /// upgrade, one moved from another host. The project is stopped (its lock is held and its
    /// unit is not running), so nothing inside changes during the walk.
    pub(super) async fn convert_home(&self, id: ProjectId, base: u32) -> Result<(), Error> {
        let p = &self.settings.projects;
        let (user, count) = (p.user_uid, p.uid_count);
        let want = base + user;
        let failed = |reason: String| Error::StartFailed {
            id,
            reason,
            journal: String::new(),
        };
        let owner = self.storage.home_owner(id).await.map_err(failed)?;
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
        let changed = self
            .storage
            .convert_home_ids(id, from, base, count)
            .await
            .map_err(|e| failed(format!("converting the home's owners: {e}")))?;
        tracing::info!(project_id = %id, from, to = base, changed, ms = t0.elapsed().as_millis() as u64, "home converted");
        Ok(())
    }
}
