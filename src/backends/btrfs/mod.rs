//! Project storage on btrfs: the filesystem (a configured mount, or a loop image under the state
//! directory set up by `cocalc-project-host storage-setup`) and one subvolume per project.
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cmd::{self, CmdError};
use crate::config::Settings;
use crate::domain::project::ProjectId;
use crate::domain::snapshots::SnapshotName;

mod remove;
pub mod sendrecv;
pub mod stream;
mod subvol;
pub use subvol::{
    Qgroup, QuotaMode, Role, SCRATCH_DIR, SNAPSHOTS_DIR, Subvol, parse_qgroups, parse_subvolumes,
    role,
};

const BTRFS: &str = "/usr/bin/btrfs";
const TIMEOUT: Duration = Duration::from_secs(60);
/// The root directory of a btrfs subvolume always has this inode number.
const SUBVOLUME_ROOT_INO: u64 = 256;
/// Free space left to the host beyond a new storage image's full size (`storage-setup`).
const IMAGE_MARGIN: u64 = 1 << 30;
/// Magic of a btrfs superblock, at 64 KiB + 0x40.
const SUPER_MAGIC: &[u8; 8] = b"_BHRfS_M";

/// A storage failure.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The storage path is not a mounted btrfs.
    #[error(
        "project storage {0} is not a mounted btrfs filesystem (run `cocalc-project-host storage-setup` or set storage.mount)"
    )]
    NotBtrfs(PathBuf),
    /// A path exists but is not what it must be.
    #[error("{0} exists but is not a btrfs subvolume; refusing to touch it")]
    NotSubvolume(PathBuf),
    /// A filesystem call failed.
    #[error("{path}: {source}")]
    Io {
        /// the path
        path: PathBuf,
        /// the error
        source: std::io::Error,
    },
    /// An external program failed.
    #[error(transparent)]
    Cmd(#[from] CmdError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StorageError + '_ {
    move |source| StorageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Whether `path` is on btrfs.
pub fn is_btrfs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::BTRFS_SUPER_MAGIC)
}

/// Free space of the filesystem holding `path` (statvfs).
pub fn space(path: &Path) -> std::io::Result<crate::domain::reserve::Space> {
    let v = nix::sys::statvfs::statvfs(path).map_err(std::io::Error::from)?;
    let frsize = v.fragment_size();
    Ok(crate::domain::reserve::Space {
        available: v.blocks_available().saturating_mul(frsize),
        total: v.blocks().saturating_mul(frsize),
    })
}

/// Whether `path` is a mount point (its device differs from its parent's).
fn is_mountpoint(path: &Path) -> bool {
    let (Ok(m), Ok(p)) = (std::fs::metadata(path), std::fs::metadata(path.join(".."))) else {
        return false;
    };
    m.dev() != p.dev() || m.ino() == p.ino()
}

fn has_btrfs_superblock(image: &Path) -> bool {
    let mut buf = [0u8; 8];
    std::fs::File::open(image)
        .and_then(|mut f| {
            f.seek(SeekFrom::Start(0x10040))?;
            f.read_exact(&mut buf)
        })
        .is_ok()
        && &buf == SUPER_MAGIC
}

/// The host's project storage.
#[derive(Debug, Clone)]
pub struct Storage {
    root: PathBuf,
    owner_uid: u32,
    /// The quota mode once known to be on (see `ensure_quotas`).
    quota: std::sync::Arc<tokio::sync::Mutex<Option<QuotaMode>>>,
}

impl Storage {
    /// Storage as configured (nothing is touched until used).
    pub fn new(settings: &Settings) -> Storage {
        Storage {
            root: settings.storage_mount(),
            owner_uid: settings.host_user_uid(),
            quota: Default::default(),
        }
    }

    /// The mount point.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A project's home subvolume (it may not exist yet).
    pub fn home(&self, id: &ProjectId) -> PathBuf {
        self.root.join(id.subvolume_name())
    }

    /// Makes sure the project's home subvolume exists and belongs to the container's `user`.
    /// Never replaces or deletes anything that is already there.
    pub async fn ensure_home(&self, id: &ProjectId) -> Result<PathBuf, StorageError> {
        if !is_btrfs(&self.root) {
            return Err(StorageError::NotBtrfs(self.root.clone()));
        }
        let home = self.home(id);
        match std::fs::symlink_metadata(&home) {
            Ok(m) if m.is_dir() && m.ino() == SUBVOLUME_ROOT_INO => return Ok(home),
            Ok(_) => return Err(StorageError::NotSubvolume(home)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&home)(e)),
        }
        cmd::run(
            BTRFS,
            ["-q", "subvolume", "create"]
                .iter()
                .map(|s| s.as_ref())
                .chain([home.as_os_str()]),
            TIMEOUT,
        )
        .await?;
        let uid = nix::unistd::Uid::from_raw(self.owner_uid);
        let gid = nix::unistd::Gid::from_raw(self.owner_uid);
        nix::unistd::chown(&home, Some(uid), Some(gid)).map_err(|e| io(&home)(e.into()))?;
        std::fs::set_permissions(&home, std::os::unix::fs::PermissionsExt::from_mode(0o750))
            .map_err(io(&home))?;
        tracing::info!(project_id = %id, path = %home.display(), "created home subvolume");
        Ok(home)
    }
}

/// Prepares the storage (the oneshot `cocalc-project-host-storage.service` runs this): with
/// `storage.mount` set, checks it is a mounted btrfs; otherwise creates (once) a sparse image under
/// the state directory, formats it (only if it holds no btrfs yet) and loop-mounts it. Idempotent.
pub async fn setup(settings: &Settings) -> Result<PathBuf, StorageError> {
    let mount = settings.storage_mount();
    if settings.storage.mount.is_some() {
        return if is_btrfs(&mount) {
            Ok(mount)
        } else {
            Err(StorageError::NotBtrfs(mount))
        };
    }
    if is_mountpoint(&mount) && is_btrfs(&mount) {
        Storage::new(settings).ensure_quotas().await?;
        return Ok(mount);
    }
    let image = settings.storage_image();
    std::fs::create_dir_all(&settings.state_dir).map_err(io(&settings.state_dir))?;
    std::fs::create_dir_all(&mount).map_err(io(&mount))?;
    if !image.exists() {
        // the image is sparse: refuse one that could grow past the host's free space unnoticed
        let available = space(&settings.state_dir)
            .map_err(io(&settings.state_dir))?
            .available;
        crate::domain::reserve::check_image_fits(
            available,
            settings.storage.image_size,
            IMAGE_MARGIN,
        )
        .map_err(|m| StorageError::Io {
            path: image.clone(),
            source: std::io::Error::other(m),
        })?;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&image)
            .map_err(io(&image))?;
        f.set_len(settings.storage.image_size).map_err(io(&image))?;
        tracing::info!(path = %image.display(), size = settings.storage.image_size, "created storage image");
    }
    if !has_btrfs_superblock(&image) {
        cmd::run(
            "/usr/sbin/mkfs.btrfs",
            [std::ffi::OsStr::new("-q"), image.as_os_str()],
            TIMEOUT,
        )
        .await?;
        tracing::info!(path = %image.display(), "formatted storage image");
    }
    cmd::run(
        "/usr/bin/mount",
        [
            std::ffi::OsStr::new("-o"),
            "loop,noatime".as_ref(),
            image.as_os_str(),
            mount.as_os_str(),
        ],
        TIMEOUT,
    )
    .await?;
    tracing::info!(path = %mount.display(), "mounted project storage");
    // the image is ours: quotas on from the start (cheapest while it is empty)
    Storage::new(settings).ensure_quotas().await?;
    Ok(mount)
}

#[async_trait::async_trait]
impl crate::ports::Storage for Storage {
    async fn move_snapshot(&self, id: ProjectId, name: &str) -> Result<(), String> {
        self.take_move_snapshot(&id, name).await
    }
    fn has_move_subvolume(&self, id: ProjectId, name: &str) -> bool {
        self.move_subvolume(&id, name)
            .is_some_and(|p| subvol::is_subvolume(&p))
    }
    async fn send_subvolume(
        &self,
        id: ProjectId,
        name: &str,
        parent: Option<&str>,
        sink: &tokio::sync::mpsc::Sender<Vec<u8>>,
    ) -> Result<u64, String> {
        self.send_move_subvolume(&id, name, parent, sink).await
    }
    async fn move_subvolume_uuid(
        &self,
        id: ProjectId,
        name: &str,
    ) -> Result<crate::domain::moves::SubvolUuid, String> {
        self.send_identity(&id, name).await
    }
    async fn drop_move_snapshots(
        &self,
        id: ProjectId,
        mv: crate::domain::moves::MoveId,
        keep: Option<&str>,
    ) {
        self.drop_live_snapshots(&id, &mv, keep).await
    }
    async fn move_record(
        &self,
        mv: crate::domain::moves::MoveId,
    ) -> Result<Option<Option<crate::domain::moves::TargetState>>, StorageError> {
        self.read_move_record(&mv)
    }
    async fn save_move_record(
        &self,
        mv: crate::domain::moves::MoveId,
        st: &crate::domain::moves::TargetState,
    ) -> Result<(PathBuf, PathBuf), StorageError> {
        self.write_move_record(&mv, st)
    }
    async fn inspect_move(
        &self,
        mv: crate::domain::moves::MoveId,
    ) -> Result<Vec<crate::domain::moves::Staged>, StorageError> {
        self.inspect_staging(&mv).await
    }
    async fn check_move_stream(
        &self,
        mv: crate::domain::moves::MoveId,
        m: &crate::domain::moves::Manifest,
    ) -> Result<(), String> {
        self.check_spooled(&mv, m).await
    }
    async fn sweep_move(&self, mv: crate::domain::moves::MoveId, keep: &[String]) {
        self.sweep_staging(&mv, keep).await
    }
    async fn place_move(
        &self,
        id: ProjectId,
        mv: crate::domain::moves::MoveId,
        snapshots: &[SnapshotName],
        live: &str,
    ) -> Result<(), StorageError> {
        self.place_moved(&id, &mv, snapshots, live)
            .await
            .map(|_| ())
    }
    async fn clean_move(&self, mv: crate::domain::moves::MoveId) {
        Storage::clean_move(self, &mv).await
    }
    fn open_moves(&self) -> Vec<crate::domain::moves::MoveId> {
        self.open_move_ids()
    }
    fn move_touched_ms(&self, mv: crate::domain::moves::MoveId) -> Option<u64> {
        self.move_touched(&mv)
    }
    async fn reserved_ids(&self) -> crate::domain::ids::Forbidden {
        tokio::task::spawn_blocking(crate::backends::ids::forbidden_from_host)
            .await
            .unwrap_or_default()
    }
    async fn home_owner(&self, id: ProjectId) -> Result<u32, String> {
        use std::os::unix::fs::MetadataExt as _;
        let home = self.home(&id);
        std::fs::symlink_metadata(&home)
            .map(|m| m.uid())
            .map_err(|e| format!("{}: {e}", home.display()))
    }
    async fn convert_home_ids(
        &self,
        id: ProjectId,
        from: u32,
        to: u32,
        count: u32,
    ) -> Result<u64, String> {
        let home = self.home(&id);
        tokio::task::spawn_blocking(move || {
            crate::backends::ids::convert_tree(&home, from, to, count)
        })
        .await
        .map_err(|e| format!("id conversion task: {e}"))?
        .map_err(|e| e.to_string())
    }
    async fn give_to(&self, path: &std::path::Path, uid: u32) -> Result<(), String> {
        std::os::unix::fs::chown(path, Some(uid), Some(uid))
            .map_err(|e| format!("{}: {e}", path.display()))
    }
    fn has_home(&self, id: ProjectId) -> bool {
        Storage::has_home(self, &id)
    }
    async fn ensure_home(&self, id: ProjectId) -> Result<PathBuf, StorageError> {
        Storage::ensure_home(self, &id).await
    }
    fn file_roots(&self, id: ProjectId) -> Result<Option<(PathBuf, PathBuf)>, StorageError> {
        if !Storage::has_home(self, &id) {
            return Ok(None);
        }
        Ok(Some((
            self.home(&id),
            Storage::ensure_snapshots_dir(self, &id)?,
        )))
    }
    async fn ensure_quotas(&self) -> Result<(), StorageError> {
        Storage::ensure_quotas(self).await.map(drop)
    }
    async fn quota_mode(&self) -> Option<QuotaMode> {
        Storage::quota_mode(self).await
    }
    async fn set_home_limit(&self, id: ProjectId, bytes: Option<u64>) -> Result<(), StorageError> {
        self.set_limit(&self.home(&id), bytes).await
    }
    async fn home_usage(
        &self,
    ) -> Result<std::collections::HashMap<ProjectId, crate::ports::Usage>, StorageError> {
        Ok(Storage::home_usage(self)
            .await?
            .into_iter()
            .map(|(id, q)| {
                let u = crate::ports::Usage {
                    quota: q.max_referenced,
                    used: q.referenced,
                };
                (id, u)
            })
            .collect())
    }
    fn space(&self) -> Result<crate::domain::reserve::Space, StorageError> {
        space(&self.root).map_err(io(&self.root))
    }
    fn ensure_snapshots_dir(&self, id: ProjectId) -> Result<PathBuf, StorageError> {
        Storage::ensure_snapshots_dir(self, &id)
    }
    fn clear_snapshots_mountpoint(&self, id: ProjectId, now_ms: u64) -> Result<(), StorageError> {
        Storage::clear_snapshots_mountpoint(self, &id, now_ms)
    }
    async fn recreate_scratch(
        &self,
        id: ProjectId,
        limit: Option<u64>,
    ) -> Result<Option<PathBuf>, StorageError> {
        Storage::recreate_scratch(self, &id, limit).await
    }
    async fn subvolumes(
        &self,
        snapshots_only: bool,
    ) -> Result<Vec<crate::ports::Subvolume>, StorageError> {
        Ok(Storage::subvolumes(self, snapshots_only)
            .await?
            .into_iter()
            .filter_map(|s| {
                Some(crate::ports::Subvolume {
                    role: role(&s.path)?,
                    id: s.id,
                    generation: s.generation,
                    created_generation: s.created_generation,
                    otime: s.otime,
                })
            })
            .collect())
    }
    async fn sizes(&self) -> Result<std::collections::HashMap<u64, (u64, u64)>, StorageError> {
        // level-0 qgroups carry the subvolume's id: `0/<id>`
        Ok(self
            .qgroups()
            .await?
            .into_iter()
            .filter_map(|q| {
                let id = q.id.strip_prefix("0/")?.parse().ok()?;
                Some((id, (q.exclusive, q.referenced)))
            })
            .collect())
    }
    async fn sync(&self) -> Result<(), StorageError> {
        Storage::sync(self).await
    }
    fn has_snapshot(&self, id: ProjectId, name: &SnapshotName) -> bool {
        Storage::has_snapshot(self, &id, name)
    }
    async fn create_snapshot(
        &self,
        id: ProjectId,
        name: &SnapshotName,
    ) -> Result<(), StorageError> {
        Storage::create_snapshot(self, &id, name).await.map(drop)
    }
    async fn delete_snapshot(
        &self,
        id: ProjectId,
        name: &SnapshotName,
    ) -> Result<(), StorageError> {
        self.delete_subvolume(&self.snapshot_path(&id, name)).await
    }
    async fn restore(
        &self,
        id: ProjectId,
        name: &SnapshotName,
        limit: Option<u64>,
        quotas: bool,
    ) -> Result<(), StorageError> {
        Storage::restore(self, &id, name, limit, quotas).await
    }
    async fn delete_project(&self, id: ProjectId) -> Result<(), StorageError> {
        Storage::delete_project(self, &id).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn space_of_the_root_filesystem() {
        let s = space(Path::new("/")).unwrap();
        assert!(s.total > 0 && s.available <= s.total, "{s:?}");
        assert!(space(Path::new("/no/such/path")).is_err());
    }

    #[test]
    fn superblock_detection() {
        let p = std::env::temp_dir().join(format!("cph-sb-{}", std::process::id()));
        std::fs::write(&p, vec![0u8; 0x20000]).unwrap();
        assert!(!has_btrfs_superblock(&p));
        let mut b = vec![0u8; 0x20000];
        b[0x10040..0x10048].copy_from_slice(SUPER_MAGIC);
        std::fs::write(&p, b).unwrap();
        assert!(has_btrfs_superblock(&p));
        std::fs::remove_file(&p).unwrap();
        assert!(!has_btrfs_superblock(&p));
    }

    #[test]
    fn root_is_a_mountpoint() {
        assert!(is_mountpoint(Path::new("/")));
    }
}
