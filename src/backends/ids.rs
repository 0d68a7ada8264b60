//! The host side of per-project id ranges (`domain::ids`): the host's accounts and subordinate
//! ranges no project range may overlap, and the walk that converts a home to another range.
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::domain::ids::{Forbidden, remap};

/// The store's table of ranges (created with the store's schema).
pub const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS id_ranges (
    project TEXT PRIMARY KEY,
    base INTEGER NOT NULL UNIQUE
);";

/// Reads the host's files (missing ones count as empty): `/etc/subuid`, `/etc/subgid`, the ids
/// of `/etc/passwd` and `/etc/group`.
pub fn forbidden_from_host() -> Forbidden {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let mut f = Forbidden::default();
    f.add_subid(&read("/etc/subuid"));
    f.add_subid(&read("/etc/subgid"));
    f.add_ids(&read("/etc/passwd"));
    f.add_ids(&read("/etc/group"));
    f
}

/// Gives every file under `root` (itself included, symlinks not followed, not crossing into
/// other filesystems or subvolumes) owned by an id of `[from, from+count)` the same id of
/// `[to, to+count)`. Run only while the project is stopped (nothing inside changes the tree).
/// Returns how many entries changed. chown clears set-uid/set-gid bits, as it always does.
pub fn convert_tree(root: &Path, from: u32, to: u32, count: u32) -> std::io::Result<u64> {
    let dev = std::fs::symlink_metadata(root)?.dev();
    let mut stack = vec![root.to_path_buf()];
    let mut changed = 0;
    while let Some(p) = stack.pop() {
        let m = std::fs::symlink_metadata(&p)?;
        let (uid, gid) = (
            remap(m.uid(), from, to, count),
            remap(m.gid(), from, to, count),
        );
        if (uid, gid) != (m.uid(), m.gid()) {
            std::os::unix::fs::lchown(&p, Some(uid), Some(gid))?;
            changed += 1;
        }
        if m.file_type().is_dir() && m.dev() == dev {
            for e in std::fs::read_dir(&p)? {
                stack.push(e?.path());
            }
        }
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn convert_tree_remaps_owners_without_following_symlinks() {
        let d = std::env::temp_dir().join(format!("idmap-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(d.join("a/b")).unwrap();
        std::fs::write(d.join("a/b/f"), "x").unwrap();
        std::fs::write(d.join("keep"), "x").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", d.join("a/link")).unwrap();
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test chowns files: run the unit tests as root (scripts/test does)"
        );
        for p in ["", "a", "a/b", "a/b/f", "a/link"] {
            std::os::unix::fs::lchown(d.join(p), Some(101_000), Some(101_000)).unwrap();
        }
        std::os::unix::fs::lchown(d.join("keep"), Some(7), Some(7)).unwrap();
        let passwd = std::fs::metadata("/etc/passwd").unwrap();
        assert_eq!(convert_tree(&d, 100_000, 500_000, 65_536).unwrap(), 5);
        for p in ["", "a", "a/b", "a/b/f", "a/link"] {
            let m = std::fs::symlink_metadata(d.join(p)).unwrap();
            assert_eq!((m.uid(), m.gid()), (501_000, 501_000), "{p}");
        }
        let k = std::fs::metadata(d.join("keep")).unwrap();
        assert_eq!((k.uid(), k.gid()), (7, 7));
        let after = std::fs::metadata("/etc/passwd").unwrap();
        assert_eq!((after.uid(), after.gid()), (passwd.uid(), passwd.gid()));
        assert_eq!(convert_tree(&d, 100_000, 500_000, 65_536).unwrap(), 0);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
