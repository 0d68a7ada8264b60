//! Quotas (qgroups), read-only snapshots, atomic restore and scratch subvolumes of project storage.
//!
//! Layout under the storage root (only the home is ever visible to a project, plus its own
//! snapshot directory mounted read-only):
//! ```text
//! project-<id>                     the home subvolume (qgroup 0/<subvolid> carries the quota)
//! .snapshots/                      root 0700
//! .snapshots/project-<id>/         root 0755: read-only snapshots of the home, one per name
//! .scratch/project-<id>            the scratch subvolume, recreated on each cold start
//! .restore-project-<id>            transient: the restored home before the atomic swap
//! ```
use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use super::{BTRFS, SUBVOLUME_ROOT_INO, Storage, StorageError, TIMEOUT, io};
use crate::cmd;
use crate::domain::project::ProjectId;
use crate::domain::snapshots::SnapshotName;

/// Directory of the snapshot directories, under the storage root.
pub const SNAPSHOTS_DIR: &str = ".snapshots";
/// Directory of the scratch subvolumes, under the storage root.
pub const SCRATCH_DIR: &str = ".scratch";
const RESTORE_PREFIX: &str = ".restore-";
/// Rescans can take long on a big filesystem.
const RESCAN_TIMEOUT: Duration = Duration::from_secs(600);

/// How the filesystem accounts space per subvolume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QuotaMode {
    /// Classic qgroups (full backref accounting).
    Qgroup,
    /// Simple quotas (kernel ≥ 6.7 and btrfs-progs ≥ 6.7, `btrfs quota enable --simple`).
    Squota,
}

/// One line of `btrfs qgroup show --raw -re`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qgroup {
    /// `0/<subvolume id>` for level 0.
    pub id: String,
    /// Referenced bytes.
    pub referenced: u64,
    /// Exclusive bytes.
    pub exclusive: u64,
    /// Limit on referenced bytes.
    pub max_referenced: Option<u64>,
    /// The subvolume's path relative to the top level (btrfs-progs ≥ 6.0), when it has one.
    pub path: Option<String>,
}

/// One line of `btrfs subvolume list -g -c [-s]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subvol {
    /// Subvolume id.
    pub id: u64,
    /// Generation of the last change.
    pub generation: u64,
    /// Generation when created.
    pub created_generation: u64,
    /// Creation time (ms since the epoch, UTC), listed for snapshots only.
    pub otime: Option<u64>,
    /// Path relative to the top level.
    pub path: String,
}

/// What a subvolume of the storage is, from its path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// A project's home.
    Home(ProjectId),
    /// A snapshot of a project's home.
    Snapshot(ProjectId, SnapshotName),
    /// A project's scratch.
    Scratch(ProjectId),
    /// A restore in progress (or left by a crash).
    Restore(ProjectId),
}

fn project_of(component: &str) -> Option<ProjectId> {
    component.strip_prefix("project-")?.parse().ok()
}

/// Classifies a subvolume path (relative to the top level; only its last components matter, so
/// a storage root below the top level works the same).
pub fn role(path: &str) -> Option<Role> {
    let mut rev = path.rsplit('/');
    let last = rev.next()?;
    let parent = rev.next();
    let grand = rev.next();
    if let Some(rest) = last.strip_prefix(RESTORE_PREFIX) {
        return project_of(rest).map(Role::Restore);
    }
    if let (Some(p), Some(SNAPSHOTS_DIR)) = (parent, grand) {
        let id = project_of(p)?;
        return last.parse().ok().map(|n| Role::Snapshot(id, n));
    }
    let id = project_of(last)?;
    Some(match parent {
        Some(SCRATCH_DIR) => Role::Scratch(id),
        _ => Role::Home(id),
    })
}

/// Parses `btrfs qgroup show --raw -re` (btrfs-progs 6.x; the Path column is optional).
pub fn parse_qgroups(out: &str) -> Vec<Qgroup> {
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 5 || !f[0].contains('/') || !f[0].as_bytes()[0].is_ascii_digit() {
                return None;
            }
            let num = |s: &str| s.parse::<u64>().ok();
            let path = (f.len() > 5)
                .then(|| f[5..].join(" "))
                .filter(|p| !p.starts_with('<'));
            Some(Qgroup {
                id: f[0].to_string(),
                referenced: num(f[1])?,
                exclusive: num(f[2])?,
                max_referenced: num(f[3]),
                path,
            })
        })
        .collect()
}

/// Parses `btrfs subvolume list -g -c [-s]` run with `TZ=UTC0`.
pub fn parse_subvolumes(out: &str) -> Vec<Subvol> {
    out.lines()
        .filter_map(|l| {
            let (head, path) = l.split_once(" path ")?;
            let f: Vec<&str> = head.split_whitespace().collect();
            let after = |key: &str| -> Option<&str> {
                let i = f.iter().position(|w| *w == key)?;
                f.get(i + 1).copied()
            };
            let num = |key: &str| after(key).and_then(|v| v.parse::<u64>().ok());
            let otime = f.iter().position(|w| *w == "otime").and_then(|i| {
                let (d, t) = (f.get(i + 1)?, f.get(i + 2)?);
                crate::domain::snapshots::parse_basic_iso(&format!(
                    "{}T{}Z",
                    d.replace('-', ""),
                    t.replace(':', "")
                ))
            });
            Some(Subvol {
                id: num("ID")?,
                generation: num("gen")?,
                created_generation: num("cgen").unwrap_or(0),
                otime,
                path: path.to_string(),
            })
        })
        .collect()
}

pub(super) fn is_subvolume(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir() && m.ino() == SUBVOLUME_ROOT_INO)
}

pub(super) fn mkdir_mode(p: &Path, mode: u32) -> Result<(), StorageError> {
    match std::fs::create_dir(p) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io(p)(e)),
    }
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).map_err(io(p))
}

pub(super) async fn btrfs<S: AsRef<std::ffi::OsStr>>(
    args: impl IntoIterator<Item = S>,
) -> Result<String, StorageError> {
    Ok(cmd::run(BTRFS, args, TIMEOUT).await?)
}

impl Storage {
    /// The directory holding a project's snapshots.
    pub fn snapshots_dir(&self, id: &ProjectId) -> PathBuf {
        self.root.join(SNAPSHOTS_DIR).join(id.subvolume_name())
    }

    /// One snapshot of a project.
    pub fn snapshot_path(&self, id: &ProjectId, name: &SnapshotName) -> PathBuf {
        self.snapshots_dir(id).join(name.as_str())
    }

    /// A project's scratch subvolume.
    pub fn scratch(&self, id: &ProjectId) -> PathBuf {
        self.root.join(SCRATCH_DIR).join(id.subvolume_name())
    }

    fn restore_path(&self, id: &ProjectId) -> PathBuf {
        self.root
            .join(format!("{RESTORE_PREFIX}{}", id.subvolume_name()))
    }

    /// Whether the project's home subvolume exists.
    pub fn has_home(&self, id: &ProjectId) -> bool {
        is_subvolume(&self.home(id))
    }

    /// Whether the snapshot exists.
    pub fn has_snapshot(&self, id: &ProjectId, name: &SnapshotName) -> bool {
        is_subvolume(&self.snapshot_path(id, name))
    }

    /// Makes sure the project's snapshot directory exists (root-owned, readable: it is mounted
    /// read-only into the container).
    pub fn ensure_snapshots_dir(&self, id: &ProjectId) -> Result<PathBuf, StorageError> {
        mkdir_mode(&self.root.join(SNAPSHOTS_DIR), 0o700)?;
        let d = self.snapshots_dir(id);
        mkdir_mode(&d, 0o755)?;
        Ok(d)
    }

    /// Makes sure `~/.snapshots` in the home can take the snapshots' mount: anything there that
    /// is not a plain directory (a file, a symlink the user made) is renamed aside, so that it
    /// cannot keep the project from starting. Call only while the project is stopped.
    pub fn clear_snapshots_mountpoint(
        &self,
        id: &ProjectId,
        now_ms: u64,
    ) -> Result<(), StorageError> {
        let home = self.home(id);
        let p = home.join(".snapshots");
        match std::fs::symlink_metadata(&p) {
            Ok(m) if !m.is_dir() => {
                let aside = home.join(format!(".snapshots.moved-{now_ms}"));
                std::fs::rename(&p, &aside).map_err(io(&p))?;
                tracing::warn!(project_id = %id, moved_to = %aside.display(), "moved aside what was at ~/.snapshots");
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// The quota mode in force, or `None` when quotas are off (asks btrfs once it knows they are
    /// on, then remembers).
    pub async fn quota_mode(&self) -> Option<QuotaMode> {
        if let Some(m) = *self.quota.lock().await {
            return Some(m);
        }
        let m = self.detect_quota_mode().await;
        if m.is_some() {
            *self.quota.lock().await = m;
        }
        m
    }

    async fn detect_quota_mode(&self) -> Option<QuotaMode> {
        btrfs([
            "qgroup".as_ref(),
            "show".as_ref(),
            "--raw".as_ref(),
            self.root.as_os_str(),
        ])
        .await
        .ok()?;
        // sysfs says which mode when it is visible (it is not inside systemd-nspawn)
        let mode = match self.fs_uuid().await {
            Some(u) => std::fs::read_to_string(format!("/sys/fs/btrfs/{u}/qgroups/mode"))
                .unwrap_or_default(),
            None => String::new(),
        };
        Some(if mode.trim() == "squota" {
            QuotaMode::Squota
        } else {
            QuotaMode::Qgroup
        })
    }

    async fn fs_uuid(&self) -> Option<String> {
        let out = btrfs([
            "filesystem".as_ref(),
            "show".as_ref(),
            self.root.as_os_str(),
        ])
        .await
        .ok()?;
        let i = out.find("uuid: ")?;
        out[i + 6..].split_whitespace().next().map(str::to_owned)
    }

    /// Turns quotas on if they are off: simple quotas when both the kernel
    /// (`/sys/fs/btrfs/features/simple_quota`) and btrfs-progs (`quota enable --simple`) have
    /// them, classic qgroups otherwise (then waits for the initial rescan).
    pub async fn ensure_quotas(&self) -> Result<QuotaMode, StorageError> {
        let mut cached = self.quota.lock().await;
        if let Some(m) = *cached {
            return Ok(m);
        }
        if let Some(m) = self.detect_quota_mode().await {
            *cached = Some(m);
            return Ok(m);
        }
        let kernel = Path::new("/sys/fs/btrfs/features/simple_quota").exists();
        let progs = cmd::run(BTRFS, ["quota", "enable", "--help"], TIMEOUT)
            .await
            .is_ok_and(|h| h.contains("--simple"));
        let mode = if kernel && progs {
            btrfs([
                "quota".as_ref(),
                "enable".as_ref(),
                "--simple".as_ref(),
                self.root.as_os_str(),
            ])
            .await?;
            QuotaMode::Squota
        } else {
            btrfs(["quota".as_ref(), "enable".as_ref(), self.root.as_os_str()]).await?;
            cmd::run(
                BTRFS,
                [
                    "quota".as_ref(),
                    "rescan".as_ref(),
                    "-w".as_ref(),
                    self.root.as_os_str(),
                ],
                RESCAN_TIMEOUT,
            )
            .await?;
            QuotaMode::Qgroup
        };
        tracing::info!(path = %self.root.display(), mode = ?mode, simple_in_kernel = kernel, simple_in_progs = progs, "enabled btrfs quotas");
        *cached = Some(mode);
        Ok(mode)
    }

    /// Sets (or with `None` removes) the limit on the referenced bytes of the subvolume at `path`.
    /// Takes effect at once, also for a running project.
    pub async fn set_limit(&self, path: &Path, bytes: Option<u64>) -> Result<(), StorageError> {
        // By qgroup id through the storage root, not through `path`: the ioctl starts a
        // transaction on the root of the fd it is given, and on a subvolume already over its
        // limit that reservation fails with EDQUOT, so the limit of a full project could never
        // be raised again (measured). A limit below current usage is accepted: the project is
        // then over quota, its writes fail and it can still delete.
        let rootid = btrfs([
            "inspect-internal".as_ref(),
            "rootid".as_ref(),
            path.as_os_str(),
        ])
        .await?;
        let qgroup = format!("0/{}", rootid.trim());
        let v = bytes.map_or_else(|| "none".to_string(), |b| b.to_string());
        btrfs([
            "qgroup".as_ref(),
            "limit".as_ref(),
            v.as_ref(),
            qgroup.as_ref(),
            self.root.as_os_str(),
        ])
        .await?;
        Ok(())
    }

    /// Every level-0 qgroup of the filesystem (one command).
    pub async fn qgroups(&self) -> Result<Vec<Qgroup>, StorageError> {
        let out = btrfs([
            "qgroup".as_ref(),
            "show".as_ref(),
            "--raw".as_ref(),
            "-re".as_ref(),
            self.root.as_os_str(),
        ])
        .await?;
        Ok(parse_qgroups(&out))
    }

    /// Every subvolume of the filesystem with generations (one command); `snapshots_only` adds
    /// creation times and lists snapshots only.
    pub async fn subvolumes(&self, snapshots_only: bool) -> Result<Vec<Subvol>, StorageError> {
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "subvolume".as_ref(),
            "list".as_ref(),
            "-g".as_ref(),
            "-c".as_ref(),
        ];
        if snapshots_only {
            args.push("-s".as_ref());
        }
        args.push(self.root.as_os_str());
        let out = cmd::run_env(BTRFS, args, &[("TZ", "UTC0")], TIMEOUT).await?;
        Ok(parse_subvolumes(&out))
    }

    /// Commits the filesystem's transaction, so generations reflect every write made so far.
    pub async fn sync(&self) -> Result<(), StorageError> {
        btrfs([
            "filesystem".as_ref(),
            "sync".as_ref(),
            self.root.as_os_str(),
        ])
        .await?;
        Ok(())
    }

    /// Takes a read-only snapshot of the home. O(1) in the size of the home.
    pub async fn create_snapshot(
        &self,
        id: &ProjectId,
        name: &SnapshotName,
    ) -> Result<PathBuf, StorageError> {
        self.ensure_snapshots_dir(id)?;
        let dst = self.snapshot_path(id, name);
        btrfs([
            "subvolume".as_ref(),
            "snapshot".as_ref(),
            "-r".as_ref(),
            self.home(id).as_os_str(),
            dst.as_os_str(),
        ])
        .await?;
        Ok(dst)
    }

    /// Deletes a subvolume (a snapshot, a scratch, a leftover of a restore).
    pub async fn delete_subvolume(&self, path: &Path) -> Result<(), StorageError> {
        if !is_subvolume(path) {
            return Err(StorageError::NotSubvolume(path.to_path_buf()));
        }
        btrfs(["subvolume".as_ref(), "delete".as_ref(), path.as_os_str()]).await?;
        Ok(())
    }

    /// Replaces the home with a writable copy of the snapshot, atomically: the copy is made beside
    /// the home, given the home's quota, then swapped with it by one `renameat2(RENAME_EXCHANGE)`;
    /// the old home is deleted afterwards. A crash at any point leaves the home either whole old
    /// or whole new (plus, at worst, a `.restore-…` subvolume that the next restore removes).
    pub async fn restore(
        &self,
        id: &ProjectId,
        name: &SnapshotName,
        limit: Option<u64>,
        quotas: bool,
    ) -> Result<(), StorageError> {
        let tmp = self.restore_path(id);
        if is_subvolume(&tmp) {
            tracing::warn!(project_id = %id, path = %tmp.display(), "removing a leftover restore");
            self.delete_subvolume(&tmp).await?;
        }
        btrfs([
            "subvolume".as_ref(),
            "snapshot".as_ref(),
            self.snapshot_path(id, name).as_os_str(),
            tmp.as_os_str(),
        ])
        .await?;
        if quotas {
            self.set_limit(&tmp, limit).await?;
        }
        let dir = std::fs::File::open(&self.root).map_err(io(&self.root))?;
        let home_name = id.subvolume_name();
        let tmp_name = tmp
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_default();
        nix::fcntl::renameat2(
            &dir,
            home_name.as_str(),
            &dir,
            tmp_name.as_os_str(),
            nix::fcntl::RenameFlags::RENAME_EXCHANGE,
        )
        .map_err(|e| io(&tmp)(e.into()))?;
        tracing::info!(project_id = %id, snapshot = %name, "restored home from snapshot");
        // the old home, now at the temporary name
        self.delete_subvolume(&tmp).await
    }

    /// Recreates the project's scratch subvolume empty (`Some(limit)`), or removes it (`None`).
    pub async fn recreate_scratch(
        &self,
        id: &ProjectId,
        limit: Option<u64>,
    ) -> Result<Option<PathBuf>, StorageError> {
        let path = self.scratch(id);
        if is_subvolume(&path) {
            self.delete_subvolume(&path).await?;
        }
        let Some(limit) = limit else { return Ok(None) };
        mkdir_mode(&self.root.join(SCRATCH_DIR), 0o711)?;
        btrfs([
            "-q".as_ref(),
            "subvolume".as_ref(),
            "create".as_ref(),
            path.as_os_str(),
        ])
        .await?;
        let uid = nix::unistd::Uid::from_raw(self.owner_uid);
        let gid = nix::unistd::Gid::from_raw(self.owner_uid);
        nix::unistd::chown(&path, Some(uid), Some(gid)).map_err(|e| io(&path)(e.into()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o750))
            .map_err(io(&path))?;
        self.set_limit(&path, Some(limit)).await?;
        Ok(Some(path))
    }

    /// Referenced bytes and limit of every project home, by project (one command).
    pub async fn home_usage(&self) -> Result<HashMap<ProjectId, Qgroup>, StorageError> {
        Ok(self
            .qgroups()
            .await?
            .into_iter()
            .filter_map(|q| match q.path.as_deref().and_then(role) {
                Some(Role::Home(id)) => Some((id, q)),
                _ => None,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "6f1c2d3e-0000-4000-8000-000000000001";

    #[test]
    fn roles_come_from_the_last_path_components() {
        let id: ProjectId = ID.parse().unwrap();
        let n: SnapshotName = "auto-20250101T000000Z".parse().unwrap();
        assert_eq!(role(&format!("project-{ID}")), Some(Role::Home(id)));
        assert_eq!(
            role(&format!("srv/projects/project-{ID}")),
            Some(Role::Home(id))
        );
        assert_eq!(
            role(&format!(".snapshots/project-{ID}/{n}")),
            Some(Role::Snapshot(id, n.clone()))
        );
        assert_eq!(
            role(&format!("x/.snapshots/project-{ID}/{n}")),
            Some(Role::Snapshot(id, n))
        );
        assert_eq!(
            role(&format!(".scratch/project-{ID}")),
            Some(Role::Scratch(id))
        );
        assert_eq!(
            role(&format!(".restore-project-{ID}")),
            Some(Role::Restore(id))
        );
        assert_eq!(role(&format!("project-{ID}/nested")), None);
        assert_eq!(role(&format!(".snapshots/project-{ID}/..")), None);
        assert_eq!(role("home1"), None);
        assert_eq!(role(""), None);
    }

    #[test]
    fn qgroup_show_parses() {
        let out = "\
Qgroupid    Referenced    Exclusive  Max referenced  Max exclusive   Path
--------    ----------    ---------  --------------  -------------   ----
0/5              16384        16384            none           none   <toplevel>
0/256         52412416     52412416        52428800           none   project-6f1c2d3e-0000-4000-8000-000000000001
0/266            16384        16384        52428800           none   .snapshots/p/s1
0/270            16384        16384            none           none   <stale>
1/100                0            0            none           none   
";
        let q = parse_qgroups(out);
        assert_eq!(q.len(), 5);
        assert_eq!(q[0].path, None);
        assert_eq!(
            q[1],
            Qgroup {
                id: "0/256".into(),
                referenced: 52_412_416,
                exclusive: 52_412_416,
                max_referenced: Some(52_428_800),
                path: Some(format!("project-{ID}")),
            }
        );
        assert_eq!(q[3].path, None);
        assert_eq!(q[4].max_referenced, None);
        // older progs: no Path column
        let q = parse_qgroups("qgroupid rfer excl max_rfer max_excl\n0/257 1 2 none none\n");
        assert_eq!(q[0].path, None);
        assert_eq!(q[0].exclusive, 2);
    }

    #[test]
    fn subvolume_list_parses_with_and_without_otime() {
        let out = "\
ID 265 gen 14 cgen 13 top level 5 path home2
ID 266 gen 22 cgen 13 top level 5 otime 2026-11-29 15:52:51 path .snapshots/home 2/s1
";
        let s = parse_subvolumes(out);
        assert_eq!(
            s[0],
            Subvol {
                id: 265,
                generation: 14,
                created_generation: 13,
                otime: None,
                path: "home2".into()
            }
        );
        assert_eq!(s[1].path, ".snapshots/home 2/s1");
        assert_eq!(
            s[1].otime,
            crate::domain::snapshots::parse_basic_iso("20261129T155251Z")
        );
        assert!(parse_subvolumes("garbage\n").is_empty());
    }
}
