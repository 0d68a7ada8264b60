//! Moving projects between hosts (`core::moves`): `btrfs send` of a project's snapshots and live
//! state on the source, and on the target the staging area a stream is received into, its
//! inspection, the placement of what it holds and its cleanup. `btrfs receive` itself runs in a
//! sandboxed transient unit (`ports::Helper::Receive`), confined to the staging area.
//!
//! Layout under the storage root: `.moves/` (root, 0700, outside every home and every mount
//! into a container) holds `<move>.stream` (the spooled stream), `<move>/` (the staging area)
//! and `used/<move>` (a move id taken once, kept for replays).
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use tokio::io::AsyncReadExt as _;

use super::subvol::{is_subvolume, mkdir_mode};
use super::{BTRFS, Storage, StorageError, io};
use crate::cmd::{self, CmdError};
use crate::domain::moves::{MoveId, live_name};
use crate::domain::project::ProjectId;
use crate::domain::snapshots::SnapshotName;

/// The directory of moves under the storage root.
pub const MOVES_DIR: &str = ".moves";

/// What the receive unit may write: the whole project storage (`<root>/.moves/<move>` → `<root>`).
/// Not just the staging area: a bind mount of a subdirectory makes btrfs-progs lose the parent
/// of an incremental stream, like `--chroot` does.
pub fn receive_writable(staging: &Path) -> &Path {
    staging.ancestors().nth(2).unwrap_or(staging)
}

/// `btrfs send` argv (after the program) of one subvolume, incremental to `parent` when given.
pub fn send_args(path: &Path, parent: Option<&Path>) -> Vec<std::ffi::OsString> {
    let mut v: Vec<std::ffi::OsString> = vec!["send".into(), "-q".into()];
    if let Some(p) = parent {
        v.push("-p".into());
        v.push(p.into());
    }
    v.push(path.into());
    v
}

/// `btrfs receive` argv (with the program): reads the spooled stream into the staging area and
/// stops at the first error. Not `--chroot`: btrfs-progs 6.2 then cannot find the parent of an
/// incremental stream ("you have changed your default subvolume"), measured in the testbed.
pub fn receive_argv(spool: &Path, staging: &Path) -> Vec<String> {
    vec![
        BTRFS.to_string(),
        "receive".into(),
        "-E".into(),
        "1".into(),
        "-f".into(),
        spool.display().to_string(),
        staging.display().to_string(),
    ]
}

impl Storage {
    fn moves_dir(&self) -> PathBuf {
        self.root.join(MOVES_DIR)
    }

    /// The staging area of a move.
    pub fn staging(&self, mv: &MoveId) -> PathBuf {
        self.moves_dir().join(mv.to_string())
    }

    /// Where a move's stream is spooled.
    pub fn spool(&self, mv: &MoveId) -> PathBuf {
        self.moves_dir().join(format!("{mv}.stream"))
    }

    /// The path of the move's live-state snapshot on the source (beside the project's
    /// snapshots, hidden from the project: a dot name is never a snapshot's).
    pub fn move_snapshot(&self, id: &ProjectId, mv: &MoveId) -> PathBuf {
        self.snapshots_dir(id).join(live_name(mv))
    }

    /// Takes a move id once: false when it was taken before (a replay). Creates the staging
    /// area (root, 0700) and returns it with the spool path.
    pub fn take_move_id(&self, mv: &MoveId) -> Result<Option<(PathBuf, PathBuf)>, StorageError> {
        let dir = self.moves_dir();
        mkdir_mode(&dir, 0o700)?;
        mkdir_mode(&dir.join("used"), 0o700)?;
        let marker = dir.join("used").join(mv.to_string());
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&marker)
        {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(None),
            Err(e) => return Err(io(&marker)(e)),
        }
        let staging = self.staging(mv);
        std::fs::create_dir(&staging).map_err(io(&staging))?;
        std::fs::set_permissions(
            &staging,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .map_err(io(&staging))?;
        Ok(Some((staging, self.spool(mv))))
    }

    /// What the staging area holds: (name, is a subvolume, is read-only) of each entry.
    pub async fn inspect_staging(
        &self,
        mv: &MoveId,
    ) -> Result<Vec<(String, bool, bool)>, StorageError> {
        let staging = self.staging(mv);
        let mut out = Vec::new();
        for e in std::fs::read_dir(&staging).map_err(io(&staging))? {
            let e = e.map_err(io(&staging))?;
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            let subvol = is_subvolume(&p);
            let ro = subvol
                && cmd::run(
                    BTRFS,
                    [
                        "property".as_ref(),
                        "get".as_ref(),
                        "-ts".as_ref(),
                        p.as_os_str(),
                        "ro".as_ref(),
                    ],
                    super::TIMEOUT,
                )
                .await?
                .trim()
                    == "ro=true";
            out.push((name, subvol, ro));
        }
        Ok(out)
    }

    /// Places a checked staging area: a read-only snapshot of each received snapshot into the
    /// project's snapshots directory and a writable snapshot of the live state as the home. The project has no home here (checked before the stream was taken).
    pub async fn place_moved(
        &self,
        id: &ProjectId,
        mv: &MoveId,
        snapshots: &[SnapshotName],
    ) -> Result<PathBuf, StorageError> {
        let staging = self.staging(mv);
        let home = self.home(id);
        if std::fs::symlink_metadata(&home).is_ok() {
            return Err(StorageError::NotSubvolume(home));
        }
        let dir = self.ensure_snapshots_dir(id)?;
        // a read-only snapshot of each (O(1), sharing every extent): a read-only subvolume
        // cannot be renamed into another directory (EROFS), and flipping its flag would drop
        // what makes it a received one; the staging copies go with the staging area
        for s in snapshots {
            let (from, to) = (staging.join(s.as_str()), dir.join(s.as_str()));
            super::subvol::btrfs([
                "subvolume".as_ref(),
                "snapshot".as_ref(),
                "-r".as_ref(),
                from.as_os_str(),
                to.as_os_str(),
            ])
            .await?;
        }
        let live = staging.join(live_name(mv));
        super::subvol::btrfs([
            "subvolume".as_ref(),
            "snapshot".as_ref(),
            live.as_os_str(),
            home.as_os_str(),
        ])
        .await?;
        std::fs::set_permissions(&home, std::os::unix::fs::PermissionsExt::from_mode(0o750))
            .map_err(io(&home))?;
        self.clean_move(mv).await;
        Ok(home)
    }

    /// Deletes a move's staging area and spool (whatever a failed or refused receive left);
    /// the used-id marker stays. Errors are logged: nothing else can be done about them.
    pub async fn clean_move(&self, mv: &MoveId) {
        let staging = self.staging(mv);
        if let Ok(rd) = std::fs::read_dir(&staging) {
            for e in rd.flatten() {
                let p = e.path();
                let r = if is_subvolume(&p) {
                    // a received subvolume is read-only; deleting it needs no flag change
                    self.delete_subvolume(&p).await.map_err(|e| e.to_string())
                } else if e.file_type().is_ok_and(|t| t.is_dir()) {
                    std::fs::remove_dir_all(&p).map_err(|e| e.to_string())
                } else {
                    std::fs::remove_file(&p).map_err(|e| e.to_string())
                };
                if let Err(err) = r {
                    tracing::warn!(move_id = %mv, path = %p.display(), error = %err, "cannot clean the staging area");
                }
            }
        }
        let _ = std::fs::remove_dir(&staging);
        let _ = std::fs::remove_file(self.spool(mv));
    }

    /// Free bytes of the project storage.
    pub fn free_bytes(&self) -> u64 {
        super::space(&self.root).map_or(0, |s| s.available)
    }

    /// The owner of a subvolume's root (the source sends its id range with the stream).
    pub fn owner_of(p: &Path) -> Option<u32> {
        std::fs::symlink_metadata(p).ok().map(|m| m.uid())
    }
}

/// Runs `btrfs send` of `path` (incremental to `parent`) and hands its output to `sink` in
/// chunks; the error carries btrfs' own message. Dropping the future kills `btrfs send`.
pub async fn send_one(
    path: &Path,
    parent: Option<&Path>,
    sink: &tokio::sync::mpsc::Sender<Vec<u8>>,
) -> Result<u64, String> {
    let mut child = cmd::spawn_piped(BTRFS, send_args(path, parent)).map_err(|e| e.to_string())?;
    let mut out = child.stdout.take().ok_or("btrfs send: no stdout")?;
    let mut err = child.stderr.take().ok_or("btrfs send: no stderr")?;
    let errs = tokio::spawn(async move {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s).await;
        s
    });
    let mut total = 0u64;
    loop {
        let mut buf = vec![0u8; 256 * 1024];
        let n = out
            .read(&mut buf)
            .await
            .map_err(|e| format!("btrfs send: reading its output: {e}"))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        buf.truncate(n);
        sink.send(buf)
            .await
            .map_err(|_| "the connection to the target ended".to_string())?;
    }
    let status = child.wait().await.map_err(|e| format!("btrfs send: {e}"))?;
    let stderr = errs.await.unwrap_or_default();
    if !status.success() {
        return Err(CmdError::Failed {
            program: BTRFS.into(),
            status: status.to_string(),
            stderr: cmd::tail(&stderr, 5),
        }
        .to_string());
    }
    Ok(total)
}

impl Storage {
    /// Sends, for a move, every snapshot in order (each incremental to the one before) and then
    /// a read-only snapshot of the live home taken now (incremental to the newest snapshot); the
    /// live snapshot is deleted afterwards, whatever happened.
    pub async fn send_for_move(
        &self,
        id: &ProjectId,
        mv: &MoveId,
        snapshots: &[SnapshotName],
        sink: &tokio::sync::mpsc::Sender<Vec<u8>>,
    ) -> Result<u64, String> {
        let live = self.move_snapshot(id, mv);
        super::subvol::btrfs([
            "subvolume".as_ref(),
            "snapshot".as_ref(),
            "-r".as_ref(),
            self.home(id).as_os_str(),
            live.as_os_str(),
        ])
        .await
        .map_err(|e| e.to_string())?;
        // the kernel refuses (EINVAL) to send a snapshot its transaction has not committed yet
        if let Err(e) = self.sync().await {
            tracing::warn!(project_id = %id, error = %e, "btrfs filesystem sync before the send failed");
        }
        let r = async {
            let mut total = 0;
            let mut parent: Option<PathBuf> = None;
            for s in snapshots {
                let p = self.snapshot_path(id, s);
                total += send_one(&p, parent.as_deref(), sink).await?;
                parent = Some(p);
            }
            total += send_one(&live, parent.as_deref(), sink).await?;
            Ok(total)
        }
        .await;
        if let Err(e) = self.delete_subvolume(&live).await {
            tracing::warn!(project_id = %id, error = %e, "cannot delete the move's live snapshot");
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argvs() {
        let a = send_args(Path::new("/s/b"), Some(Path::new("/s/a")));
        assert_eq!(
            a,
            ["send", "-q", "-p", "/s/a", "/s/b"].map(std::ffi::OsString::from)
        );
        assert_eq!(
            send_args(Path::new("/s/a"), None),
            ["send", "-q", "/s/a"].map(std::ffi::OsString::from)
        );
        assert_eq!(
            receive_writable(Path::new("/var/lib/p/.moves/m")),
            Path::new("/var/lib/p")
        );
        let r = receive_argv(Path::new("/m/x.stream"), Path::new("/m/x"));
        assert_eq!(
            r,
            [BTRFS, "receive", "-E", "1", "-f", "/m/x.stream", "/m/x"]
        );
    }
}
