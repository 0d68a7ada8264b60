//! What file access (the HTTP file server, SFTP) needs of the core: a project's files opened
//! for `backends::safefs`, whether or not the project runs, new files given to its user.
use super::{Error, Host};
use crate::backends::safefs::{Owner, ProjectFs};
use crate::domain::project::ProjectId;
use crate::ports::StorageError;

impl Host {
    /// The host uid of the project's user (`projects.user_uid` inside its container, mapped
    /// through the project's own id range; allocated the first time). Its gid is the same.
    pub async fn project_user_uid(&self, id: ProjectId) -> Result<u32, Error> {
        Ok(self.id_range(id).await? + self.settings.projects.user_uid)
    }

    /// The project's home and snapshots opened for safe file access (see `backends::safefs`):
    /// what is created is given to the project's user. `NoSuchProject` without a home here.
    pub async fn project_files(&self, id: ProjectId) -> Result<ProjectFs, Error> {
        let Some((home, snapshots)) = self.storage.file_roots(id)? else {
            return Err(Error::NoSuchProject(id));
        };
        let uid = self.project_user_uid(id).await?;
        let owner = Some(Owner { uid, gid: uid });
        tokio::task::spawn_blocking(move || {
            ProjectFs::open(&home, &snapshots, owner).map_err(|e| {
                Error::Storage(StorageError::Io {
                    path: home,
                    source: std::io::Error::other(e.to_string()),
                })
            })
        })
        .await
        .map_err(|e| {
            Error::Storage(StorageError::Io {
                path: "project files".into(),
                source: std::io::Error::other(e.to_string()),
            })
        })?
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use super::*;
    use crate::backends::safefs::{FsError, RelPath};
    use crate::backends::sim::{NEW_HOME_OWNER, Sim};
    use crate::config::Settings;

    fn id(n: u32) -> ProjectId {
        format!("6f1c2d3e-0000-4000-8000-{n:012x}")
            .parse()
            .expect("a valid id")
    }

    #[tokio::test]
    async fn files_of_a_stopped_project_are_given_to_its_user() {
        let dir = std::env::temp_dir().join(format!("core-files-{}", uuid::Uuid::new_v4()));
        let sim = Sim::new();
        sim.storage.set_files_dir(dir.clone());
        let h = Host::with_backends(Settings::default(), sim.backends())
            .await
            .expect("host");
        let p = id(1);
        // no home on this host: nothing to open
        assert!(matches!(
            h.project_files(p).await,
            Err(Error::NoSuchProject(q)) if q == p
        ));
        h.start(p, None).await.expect("start");
        h.stop(p, false).await.expect("stop");
        let uid = h.project_user_uid(p).await.expect("uid");
        assert_eq!(uid, NEW_HOME_OWNER);
        let fs = h
            .project_files(p)
            .await
            .expect("files of a stopped project");
        let path = RelPath::parse("a/b.txt").expect("path");
        let (tree, rel) = fs.locate(&path);
        let mut f = tree.create_atomic(&rel, true).expect("create");
        f.write_all(b"hi").expect("write");
        f.commit().expect("commit");
        let home = dir.join(format!("project-{p}"));
        for p in ["a", "a/b.txt"] {
            let m = std::fs::metadata(home.join(p)).expect("written");
            assert_eq!((m.uid(), m.gid()), (uid, uid), "{p}");
        }
        let snap = RelPath::parse(".snapshots/s/f").expect("path");
        let (tree, rel) = fs.locate(&snap);
        assert!(matches!(
            tree.create_atomic(&rel, true),
            Err(FsError::ReadOnly)
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
