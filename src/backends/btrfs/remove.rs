//! Deleting a project from the storage (`DELETE /projects/:id`): its snapshots, scratch and
//! home subvolumes, then its (empty) snapshots directory. Idempotent: what is gone is skipped,
//! so a delete cut off halfway is finished by the next.
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::{SUBVOLUME_ROOT_INO, Storage, StorageError, io};
use crate::domain::project::ProjectId;

fn is_subvolume(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir() && m.ino() == SUBVOLUME_ROOT_INO)
}

impl Storage {
    /// Deletes every subvolume of the project and its snapshots directory.
    pub async fn delete_project(&self, id: &ProjectId) -> Result<(), StorageError> {
        let dir = self.snapshots_dir(id);
        match std::fs::read_dir(&dir) {
            Ok(entries) => {
                for e in entries {
                    let p = e.map_err(io(&dir))?.path();
                    if is_subvolume(&p) {
                        self.delete_subvolume(&p).await?;
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&dir)(e)),
        }
        for p in [self.scratch(id), self.home(id)] {
            if is_subvolume(&p) {
                self.delete_subvolume(&p).await?;
            }
        }
        match std::fs::remove_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&dir)(e)),
        }
        tracing::info!(project_id = %id, "deleted the project's home, snapshots and scratch");
        Ok(())
    }
}
